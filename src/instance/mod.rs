//! Model instances: one llama-server child (or one remote model) per model and load options.
//!
//! Each instance has one owner, its worker thread ([`worker`]): it alone spawns, health
//! checks, stops, reaps and restarts the child and runs the state machine ([`state`]); its
//! policy decisions (the crash-loop breaker, replica choice, queue limits) are pure
//! functions in [`policy`]. Every other thread talks to it through its inbox
//! ([`Handle::send`]) and hears back on channels: a request sends a [`Job`] and receives
//! [`JobEvent`]s, ending with a [`Lease`] on a slot or an error. While the instance is ready
//! and nobody waits, the worker lends its free slots out ([`lease`]), so a request takes one
//! without a round trip to the worker.
//!
//! The worker mirrors what others may read into a [`View`] behind a lock that guards that
//! data only; counters live beside it in [`Stats`]. [`outcome`] classifies how a request on
//! a lease ended. [`cache`] and [`cache_store`] keep slots' prompt caches across unloads.

pub(crate) mod cache;
pub(crate) mod cache_store;
pub(crate) mod inbox;
pub(crate) mod lease;
pub(crate) mod outcome;
pub(crate) mod policy;
pub(crate) mod state;
pub(crate) mod table;
pub(crate) mod view;
pub(crate) mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::model::{ModelSpec, Policy};
pub(crate) use inbox::{Job, JobEvent, Message, Pin, RoomFlags, RoomRequest};
pub(crate) use lease::Lease;
pub(crate) use state::{JobId, Phase, RoomToken, Unload};
pub(crate) use view::{FileStamp, Snapshot, Stats, View};

/// The instance table's key: a model (file, or remote name) and its load options.
pub(crate) type Key = (std::path::PathBuf, crate::model::LoadOptions);

pub(crate) fn key_of(spec: &ModelSpec) -> Key {
    (spec.path.clone(), spec.load.clone())
}

/// An instance as the rest of the daemon holds it: the worker's inbox, its view, its
/// counters and its lent slots.
pub(crate) struct Handle {
    home: lease::Home,
    view: Arc<Mutex<View>>,
    /// Requests the daemon's full queue refused before they reached the worker.
    rejected: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    /// Sends `message` to the worker; false when the worker has ended (daemon shutdown).
    pub(crate) fn send(&self, message: Message) -> bool {
        self.home.inbox.send(message).is_ok()
    }

    /// Sets or clears a pin and returns once the instance's view shows it.
    pub(crate) fn pin(&self, pin: Pin) {
        let (done, applied) = crossbeam_channel::bounded(1);
        if self.send(Message::Pin { pin, done }) {
            // The worker answers between two messages; the bound is for one that died.
            let _ = applied.recv_timeout(std::time::Duration::from_secs(5));
        }
    }

    /// A lent slot, when the instance is ready with one free and the request's policy is
    /// the one the worker lent under: no message, no wait.
    pub(crate) fn take_lent(&self, policy: &Policy) -> Option<Lease> {
        Lease::take_lent(&self.home, policy)
    }

    /// The view and counters, with the lent slots in use counted as in flight and the
    /// leases on their way back to the worker not. The view's lock is taken before the
    /// lending's, here and in the worker, so the two agree.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let view = {
            let view_guard = self.view.lock();
            let mut view = view_guard.clone();
            view.in_flight = self.in_flight(&view_guard);
            view
        };
        let mut stats = self.home.stats.lock().clone();
        stats.rejected += self.rejected.load(Ordering::Relaxed);
        Snapshot { view, stats }
    }

    /// True when the instance is ready, idle and unpinned and has gone unused for its TTL;
    /// read without copying the counters (the supervisor asks ten times a second).
    pub(crate) fn ttl_expired(&self, default_ttl: crate::config::Ttl) -> bool {
        let view = self.view.lock();
        let in_flight = self.in_flight(&view);
        let last_used = self.home.stats.lock().last_used;
        view::ttl_expired(&view, in_flight, last_used, default_ttl)
    }

    /// Requests in flight, given the view under its lock: the worker's count, plus lent
    /// slots taken, less leases ended whose slot the worker has not taken back yet. (A
    /// lease of a child that crashed is in neither count: while it returns, the figure is
    /// one low.)
    fn in_flight(&self, view: &View) -> u32 {
        let lent = self.home.lending.lock().taken();
        (view.in_flight + lent).saturating_sub(self.home.returning.load(Ordering::SeqCst))
    }

    /// When a request on it last ended (or an earlier daemon remembered one).
    pub(crate) fn last_used(&self) -> Option<SystemTime> {
        let remembered = self.view.lock().restored_last_use;
        self.home.stats.lock().last_used.or(remembered)
    }

    /// Reads a few fields without copying the whole view (requests on lent slots are not
    /// in `in_flight` here: use [`Handle::snapshot`] for that).
    pub(crate) fn with_view<T>(&self, read: impl FnOnce(&View) -> T) -> T {
        read(&self.view.lock())
    }

    pub(crate) fn note_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits for the worker thread to end (after [`Message::Shutdown`]).
    pub(crate) fn join(&self) {
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}
