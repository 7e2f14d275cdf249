//! The worker's prompt caches: written before a child stops for a reason that saves, kept
//! once it is gone, and restored into a new child before any request gets a slot.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Worker, EXIT_PATIENCE};
use crate::backend::client::Client;
use crate::error::Error;
use crate::events::{EventKind, Measure};
use crate::instance::cache;
use crate::instance::cache_store;
use crate::instance::lease::Generation;
use crate::instance::state::{Event, Unload};

impl Worker {
    /// Before a stop for `why`: the child writes the slots worth keeping, within the cache
    /// timeout. Nothing for a stop that must be immediate (a second SIGINT, `Restart`), a
    /// child that never became ready, or an instance whose caches are not kept.
    pub(super) fn write_caches(&mut self, why: Unload) -> Vec<cache_store::Written> {
        let (Some(identity), Some(client)) = (&self.cache_identity, &self.client) else { return Vec::new() };
        if !cache::saves_on(why) || self.services.kill_now.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let deadline = Instant::now() + self.services.caches.timeout();
        self.services.caches.write_slots(client, identity, &self.spec, deadline)
    }

    /// After the stop: what the child wrote is checked and kept, and announced.
    pub(super) fn keep_caches(&mut self, written: Vec<cache_store::Written>, pid: Option<u32>) {
        let Some(identity) = self.cache_identity.take() else { return };
        if written.is_empty() {
            return;
        }
        for done in self.services.caches.keep(&identity, &self.spec, written) {
            self.publish_cache(EventKind::Saved, pid, done);
        }
    }

    /// After a new child answers and before any request gets a slot: the caches kept for
    /// its identity are read back. False when a restore broke the child (its load failed).
    pub(super) fn restore_caches(&mut self) -> bool {
        let (Some(identity), Some(client)) = (&self.cache_identity, &self.client) else { return true };
        let deadline = Instant::now() + self.services.caches.timeout();
        let report = self.services.caches.restore(client, identity, &self.spec, deadline);
        for done in report.restored {
            self.publish_cache(EventKind::Restored, self.pid(), done);
        }
        // A refused restore leaves the slot empty and the child serving. One that brought
        // the child down has dropped that file: the child is started again, once, and the
        // requests waiting for the load wait on; only if that fails too does the load.
        if report.failed && !self.client.as_ref().is_some_and(Client::healthy) {
            let error = self.exit_error(EXIT_PATIENCE).unwrap_or_else(|| {
                let tail = self.running.as_ref().map(|running| running.tail.quote()).unwrap_or_default();
                self.finish_child(Duration::ZERO);
                Error::LlamaExited {
                    model: self.spec.name.clone(),
                    status: "stopped answering while it restored a saved prompt cache".into(),
                    stderr_tail: tail,
                }
            });
            if !self.restore_retried {
                self.restore_retried = true;
                log::warn!("{error}; the cache is dropped and {} is started again without it", self.spec.name);
                self.publish(EventKind::Crashed, None, Some(format!("{error}; started again without that cache")));
                self.client = None;
                self.ready_since = None;
                // A generation of its own, as the first child's has ended; no lease was
                // granted on it, so the same number tells no one anything wrong.
                let number = self.machine.generation();
                self.generation = Some(Arc::new(Generation::new(number, self.spec.load.parallel)));
                match self.spawn_child(number) {
                    Ok(loading) => self.loading = Some(loading),
                    Err(error) => {
                        self.load_failed(error);
                        self.feed(Event::LoadFailed);
                    }
                }
                return false;
            }
            self.child_died(error);
            return false;
        }
        true
    }

    pub(super) fn publish_cache(&self, kind: EventKind, pid: Option<u32>, done: cache_store::Done) {
        let measure = Measure { slot: done.slot, tokens: done.tokens, bytes: done.bytes, ms: done.ms };
        self.services.events.publish_measured(kind, &self.spec.name, &self.path(), pid, measure);
    }
}
