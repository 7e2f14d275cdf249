//! A slot on a ready instance, and how it goes back.
//!
//! Two ways to a slot. While an instance is ready and nobody waits, its worker *lends* its
//! free slots to the [`Lending`] beside its handle: a request takes one there under a short
//! lock, without a message to the worker, and gives it back the same way. When the worker
//! must decide something (a request queues, an unload, a crash) it first calls the lent
//! slots back ([`Lending::reclaim`]); from then on, leases out on them give their slot back
//! with a message, as leases the worker granted itself always do. Either way the worker
//! stays the only thread that changes the instance's state or touches its child.
//!
//! Counters (requests, tokens, outcomes, last use) are not state: a lease records its own
//! into the instance's [`Stats`] when it ends, under their own lock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};

use super::inbox::{Message, RoomFlags, RoomRequest};
use super::view::Stats;
use crate::backend::client::Client;
use crate::model::Policy;
use crate::protocol::Usage;

/// How one load of the child ended, for the requests that ran on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The child exited on its own: its exit status and last output.
    Exited { status: String, stderr_tail: String },
    /// llmctl stopped it; the message says who and why.
    Stopped(String),
}

/// One load of an instance: the child it started (or the remote servers it checked), and
/// how it ended. A lease holds the generation it was granted on, so a request classifies a
/// broken stream by what happened to *its* child, never a newer one.
pub(crate) struct Generation {
    pub(crate) number: u64,
    /// The child's own slots: a lease granted while this many are out waits inside the
    /// child until one frees (see `worker::QUEUED_IN_CHILD`).
    slots: u32,
    /// Leases out on this generation now.
    out: AtomicU32,
    /// Tokens relayed from the child and leases ended on it: a child that moves this
    /// serves someone.
    progress: AtomicU64,
    /// When the last lease on it ended.
    last_end: Mutex<Option<std::time::Instant>>,
    ended: Mutex<Option<Ended>>,
    changed: Condvar,
    /// Set when llmctl stopped the child: streams on it stop relaying at the next token,
    /// whatever the child does with SIGTERM.
    stopped: AtomicBool,
    /// Set when the stop was a restart after a stalled request: no one asked for it, so a
    /// request that waited inside the child goes to the next one, as after a crash.
    restarted: AtomicBool,
}

impl Generation {
    /// Generation `number` of a child with `slots` slots of its own (`u32::MAX` for remote
    /// servers, which are never sent more requests than their slots).
    pub(crate) fn new(number: u64, slots: u32) -> Generation {
        Generation {
            number,
            slots,
            out: AtomicU32::new(0),
            progress: AtomicU64::new(0),
            last_end: Mutex::new(None),
            ended: Mutex::new(None),
            changed: Condvar::new(),
            stopped: AtomicBool::new(false),
            restarted: AtomicBool::new(false),
        }
    }

    /// Tokens relayed and leases ended so far.
    pub(crate) fn progress(&self) -> u64 {
        self.progress.load(Ordering::SeqCst)
    }

    /// A token of this generation is about to be relayed: counted as the child's progress.
    /// False once llmctl has stopped the child: the stream is then cut off at once, even if
    /// the child ignores SIGTERM.
    pub(crate) fn relay_token(&self) -> bool {
        self.progress.fetch_add(1, Ordering::Relaxed);
        !self.is_stopped()
    }

    /// Records how the generation ended; the first word stays.
    pub(crate) fn end(&self, ended: Ended) {
        if matches!(ended, Ended::Stopped(_)) {
            self.stopped.store(true, Ordering::SeqCst);
        }
        let mut slot = self.ended.lock();
        if slot.is_none() {
            *slot = Some(ended);
        }
        drop(slot);
        self.changed.notify_all();
    }

    /// True once llmctl has stopped this generation's child.
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// The child is being stopped to be restarted after a stalled request (before [`end`]).
    ///
    /// [`end`]: Generation::end
    pub(crate) fn mark_restarted(&self) {
        self.restarted.store(true, Ordering::SeqCst);
    }

    pub(crate) fn restarted(&self) -> bool {
        self.restarted.load(Ordering::SeqCst)
    }

    /// How it ended, waiting up to `patience` for the worker to find out: a crash closes
    /// the connection a moment before the kernel reports the exit.
    pub(crate) fn wait_ended(&self, patience: Duration) -> Option<Ended> {
        let mut slot = self.ended.lock();
        if slot.is_none() {
            self.changed.wait_for(&mut slot, patience);
        }
        slot.clone()
    }
}

/// What a finished request reports when its lease ends.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) usage: Usage,
    /// "ok", "cancelled" or an error kind; none for a lease used to load (warm, switch).
    pub(crate) outcome: Option<&'static str>,
    /// From the request's admission (its wait and any load included) to its first token.
    pub(crate) first_token: Option<Duration>,
    /// From the grant of its slot to its first token.
    pub(crate) slot_first_token: Option<Duration>,
    /// No token came within the token timeout: the child is restarted.
    pub(crate) stalled: bool,
    /// The remote replica failed: it is left out for a while.
    pub(crate) replica_failed: bool,
    /// The request goes on on another lease, which counts it.
    pub(crate) counted_again: bool,
}

impl Report {
    /// Only the worker can act on these: a stalled child or a failed replica.
    fn needs_worker(&self) -> bool {
        self.stalled || self.replica_failed
    }
}

/// The slots a worker has lent out while its instance is ready and nobody waits.
#[derive(Default)]
pub(crate) struct Lending {
    open: Option<Open>,
}

/// Lent slots of one generation, and what a request needs to use one.
struct Open {
    generation: Arc<Generation>,
    client: Client,
    /// The model policy the lending was opened with: a request that brings another one
    /// (the config changed) goes to the worker, which adopts it.
    policy: Policy,
    free: u32,
    taken: u32,
}

impl Lending {
    /// Lends `slots` more slots of `generation`.
    pub(crate) fn lend(&mut self, slots: u32, generation: &Arc<Generation>, client: &Client, policy: &Policy) {
        match &mut self.open {
            Some(open) if open.generation.number == generation.number => open.free += slots,
            _ => {
                self.open = Some(Open {
                    generation: Arc::clone(generation),
                    client: client.clone(),
                    policy: policy.clone(),
                    free: slots,
                    taken: 0,
                })
            }
        }
    }

    /// Calls the lent slots back: returns how many were free. The taken ones become
    /// ordinary leases, which give their slot back with a message.
    pub(crate) fn reclaim(&mut self) -> Reclaimed {
        match self.open.take() {
            Some(open) => Reclaimed { free: open.free, taken: open.taken },
            None => Reclaimed::default(),
        }
    }

    /// Lent slots in use now.
    pub(crate) fn taken(&self) -> u32 {
        self.open.as_ref().map_or(0, |open| open.taken)
    }

    /// Takes a free lent slot for a request that brings `policy`; while a drain for a waiting
    /// load is near, only one of the child's own slots.
    fn take(&mut self, policy: &Policy, drain_near: bool) -> Option<(Arc<Generation>, Client)> {
        let open = self.open.as_mut().filter(|open| {
            open.free > 0
                && open.policy == *policy
                && !(drain_near && open.generation.out.load(Ordering::SeqCst) >= open.generation.slots)
        })?;
        open.free -= 1;
        open.taken += 1;
        Some((Arc::clone(&open.generation), open.client.clone()))
    }

    /// Gives a lent slot of `generation` back; false when the lending closed meanwhile, so
    /// the slot must go back through the worker.
    fn give_back(&mut self, generation: u64) -> bool {
        match &mut self.open {
            Some(open) if open.generation.number == generation && open.taken > 0 => {
                open.taken -= 1;
                open.free += 1;
                true
            }
            _ => false,
        }
    }
}

/// What [`Lending::reclaim`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reclaimed {
    pub(crate) free: u32,
    pub(crate) taken: u32,
}

/// Where a lease goes back to: its worker, and the instance's lending and counters.
#[derive(Clone)]
pub(crate) struct Home {
    pub(crate) inbox: Sender<Message>,
    /// The scheduler, told when a lent slot comes back while loads wait for room, and what
    /// it tells every instance.
    pub(crate) scheduler: Option<(Sender<RoomRequest>, Arc<RoomFlags>)>,
    pub(crate) lending: Arc<Mutex<Lending>>,
    pub(crate) stats: Arc<Mutex<Stats>>,
    /// Leases that ended and told the worker, which has not taken their slot back yet: the
    /// handle counts them out of `in_flight` at once, so what the client does next (`status`,
    /// metrics) sees the instance idle without the lease waiting for the worker.
    pub(crate) returning: Arc<AtomicU32>,
}

/// A slot on a ready instance. Dropping it gives the slot back, even on panic.
pub(crate) struct Lease {
    pub(crate) generation: Arc<Generation>,
    pub(crate) client: Client,
    /// The remote replica serving this request, if the model is remote.
    pub(crate) replica: Option<usize>,
    pub(crate) report: Report,
    home: Home,
    /// Taken from the lending rather than granted by the worker.
    lent: bool,
    /// Granted while every slot of the child was out, so the request waits inside the
    /// child.
    behind: bool,
    released: bool,
    granted_at: std::time::Instant,
}

impl Lease {
    /// A slot the worker granted.
    pub(crate) fn granted(generation: Arc<Generation>, client: Client, replica: Option<usize>, home: Home) -> Lease {
        Lease::on(generation, client, replica, home, false)
    }

    fn on(generation: Arc<Generation>, client: Client, replica: Option<usize>, home: Home, lent: bool) -> Lease {
        let ahead = generation.out.fetch_add(1, Ordering::SeqCst);
        let behind = ahead >= generation.slots;
        Lease {
            generation,
            client,
            replica,
            report: Report::default(),
            home,
            lent,
            behind,
            released: false,
            granted_at: std::time::Instant::now(),
        }
    }

    /// Records the first token of a request admitted at `admitted`, `first_token` after it:
    /// for the client from its admission, for the scheduler from this grant.
    pub(crate) fn record_first_token(&mut self, admitted: std::time::Instant, first_token: Option<Duration>) {
        self.report.first_token = first_token;
        self.report.slot_first_token =
            first_token.map(|after| (admitted + after).saturating_duration_since(self.granted_at));
    }

    /// Granted while every slot of the child was out: the request waits inside the child.
    pub(crate) fn waits_in_child(&self) -> bool {
        self.behind
    }

    /// A lent slot, if one is free for a request that brings `policy`; counted as a request
    /// that waited for nothing. While a drain for a waiting load is near, a slot lent beyond
    /// the child's own is not taken: the request goes to the worker, which queues it in
    /// llmctl rather than in the child the drain must empty.
    pub(crate) fn take_lent(home: &Home, policy: &Policy) -> Option<Lease> {
        let drain_near = home.scheduler.as_ref().is_some_and(|(_, room)| room.drain_near.load(Ordering::SeqCst));
        let (generation, client) = home.lending.lock().take(policy, drain_near)?;
        home.stats.lock().granted(Duration::ZERO);
        Some(Lease::on(generation, client, None, home.clone(), true))
    }

    /// Records the report and gives the slot back: to the lending if it was lent and the
    /// lending is still open, otherwise to the worker.
    fn finish(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        self.generation.out.fetch_sub(1, Ordering::SeqCst);
        let report = std::mem::take(&mut self.report);
        if !report.stalled {
            self.generation.progress.fetch_add(1, Ordering::SeqCst);
        }
        // A request that waited inside the child was served from the end of a request
        // ahead of it, not from its grant.
        let now = std::time::Instant::now();
        let ahead_ended = self.generation.last_end.lock().replace(now);
        let started = match ahead_ended {
            Some(ended) if self.behind => ended.max(self.granted_at),
            _ => self.granted_at,
        };
        self.home.stats.lock().finished(&report, SystemTime::now(), now - started);
        if self.lent && !report.needs_worker() && self.home.lending.lock().give_back(self.generation.number) {
            // The worker hears nothing of it; the scheduler may want the idle instance.
            if let Some((scheduler, room)) = &self.home.scheduler {
                if room.wanted.load(Ordering::SeqCst) {
                    let _ = scheduler.send(RoomRequest::Replan);
                }
            }
            return;
        }
        // Counted as returning before the worker can hear of it; it uncounts it when it
        // publishes the view the slot is back in. A worker that is gone has nothing left to
        // account.
        self.home.returning.fetch_add(1, Ordering::SeqCst);
        let finished = Message::Finished {
            replica: self.replica,
            generation: self.generation.number,
            stalled: report.stalled,
            replica_failed: report.replica_failed,
        };
        if self.home.inbox.send(finished).is_err() {
            self.home.returning.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client::for_url("http://127.0.0.1:9", None, None, crate::backend::client::Timeouts::default())
    }

    fn home() -> (Home, crossbeam_channel::Receiver<Message>) {
        let (inbox, messages) = crossbeam_channel::unbounded();
        (
            Home { inbox, scheduler: None, lending: Arc::default(), stats: Arc::default(), returning: Arc::default() },
            messages,
        )
    }

    #[test]
    fn lent_slots_come_back_without_a_message_while_lending_is_open() {
        let (home, messages) = home();
        let generation = Arc::new(Generation::new(1, 1));
        home.lending.lock().lend(2, &generation, &client(), &Policy::default());
        let first = Lease::take_lent(&home, &Policy::default()).expect("a free lent slot");
        let second = Lease::take_lent(&home, &Policy::default()).expect("a second one");
        assert!(Lease::take_lent(&home, &Policy::default()).is_none(), "only two were lent");
        assert_eq!(home.lending.lock().taken(), 2);
        drop(first);
        assert!(messages.try_recv().is_err(), "a lent slot goes back without the worker");
        assert!(Lease::take_lent(&home, &Policy::default()).is_some_and(|again| {
            drop(again);
            true
        }));
        // Called back with one out: that one goes back through the worker.
        assert_eq!(home.lending.lock().reclaim(), Reclaimed { free: 1, taken: 1 });
        drop(second);
        assert!(matches!(messages.try_recv(), Ok(Message::Finished { generation: 1, .. })));
        assert_eq!(home.returning.load(Ordering::SeqCst), 1, "counted out until the worker takes it back");
        let stats = home.stats.lock();
        assert_eq!((stats.requests, stats.last_used.is_some()), (3, true));
    }

    #[test]
    fn while_a_drain_is_near_no_lent_slot_beyond_the_childs_own_is_taken() {
        let (mut home, _messages) = home();
        let (scheduler, _requests) = crossbeam_channel::unbounded();
        let room = Arc::new(RoomFlags::default());
        home.scheduler = Some((scheduler, Arc::clone(&room)));
        // A child of one slot, lent two: one of its own and one to hold beyond it.
        let generation = Arc::new(Generation::new(2, 1));
        home.lending.lock().lend(2, &generation, &client(), &Policy::default());
        let own = Lease::take_lent(&home, &Policy::default()).expect("the child's own slot");
        room.drain_near.store(true, Ordering::SeqCst);
        assert!(Lease::take_lent(&home, &Policy::default()).is_none(), "a request held in a child a drain must run");
        // Its own slot free again, it is lent as before; and with no drain near, the one beyond.
        drop(own);
        let own = Lease::take_lent(&home, &Policy::default()).expect("the child's own slot, free again");
        assert!(!own.waits_in_child());
        room.drain_near.store(false, Ordering::SeqCst);
        let beyond = Lease::take_lent(&home, &Policy::default()).expect("the slot beyond, no drain near");
        assert!(beyond.waits_in_child());
    }

    #[test]
    fn the_scheduler_is_told_a_first_token_from_the_slot_the_client_from_its_admission() {
        let (home, _messages) = home();
        let generation = Arc::new(Generation::new(4, 1));
        let mut lease = Lease::granted(generation, client(), None, home.clone());
        // Admitted five seconds before its slot (a wait and a load), first token 30 ms after it.
        let admitted = lease.granted_at - Duration::from_secs(5);
        lease.record_first_token(admitted, Some(Duration::from_millis(5030)));
        lease.report.outcome = Some("ok");
        assert_eq!(lease.report.first_token, Some(Duration::from_millis(5030)));
        assert_eq!(lease.report.slot_first_token, Some(Duration::from_millis(30)));
        drop(lease);
        let stats = home.stats.lock();
        assert_eq!(stats.first_tokens.back(), Some(&Duration::from_millis(5030)));
        assert_eq!(stats.slot_first_token_ms.map(|ms| ms.round()), Some(30.0));
    }

    #[test]
    fn another_policy_or_a_stall_goes_to_the_worker() {
        let (home, messages) = home();
        let generation = Arc::new(Generation::new(3, 1));
        home.lending.lock().lend(1, &generation, &client(), &Policy::default());
        let pinned = Policy { pinned: true, ..Policy::default() };
        assert!(Lease::take_lent(&home, &pinned).is_none(), "a changed policy must reach the worker");
        let mut lease = Lease::take_lent(&home, &Policy::default()).unwrap();
        lease.report.stalled = true;
        drop(lease);
        assert!(matches!(messages.try_recv(), Ok(Message::Finished { stalled: true, .. })));
    }
}
