//! The daemon's event bus: state changes (loading, ready, failed, crashed, stopped,
//! evicted, expired) fanned out to `llmctl events` subscribers.
//!
//! Publishing never blocks: each subscriber has a bounded channel, and one that falls
//! behind by more than its capacity is dropped rather than slowing the daemon.

use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::Mutex;

use crate::instance::Instance;
use crate::protocol::Event;

/// Events a subscriber may fall behind by before it is dropped.
const SUBSCRIBER_BACKLOG: usize = 1024;

#[derive(Default)]
pub struct EventBus {
    /// Guards the subscriber list only; sending is `try_send`, which never blocks.
    subscribers: Mutex<Vec<Sender<Event>>>,
}

impl EventBus {
    pub fn subscribe(&self) -> Receiver<Event> {
        let (sender, receiver) = bounded(SUBSCRIBER_BACKLOG);
        self.subscribers.lock().push(sender);
        receiver
    }

    pub fn publish(&self, instance: &Instance, kind: &str, detail: Option<String>) {
        let event = Event {
            time_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            event: kind.to_string(),
            model: instance.spec.name.clone(),
            path: instance.spec.path.display().to_string(),
            pid: instance.child_identity().map(|(pid, _)| pid),
            detail,
        };
        log::info!("event {kind} {}", instance.spec.name);
        self.subscribers.lock().retain(|subscriber| match subscriber.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// Clients following `llmctl events` now.
    pub fn subscribers(&self) -> usize {
        self.subscribers.lock().len()
    }

    /// Ends every subscription, at shutdown.
    pub fn close(&self) {
        self.subscribers.lock().clear();
    }
}
