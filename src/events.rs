//! The daemon's event bus: state changes (loading, ready, failed, crashed, stopped,
//! evicted, expired, reloading) fanned out to `llmctl events` subscribers.
//!
//! Publishing never blocks: each subscriber has a bounded channel, and one that falls
//! behind by more than its capacity is dropped rather than slowing the daemon.

use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::Mutex;

use crate::protocol::Event;

/// Events a subscriber may fall behind by before it is dropped.
const SUBSCRIBER_BACKLOG: usize = 1024;

/// The state changes `llmctl events` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Loading,
    Ready,
    Failed,
    Refused,
    Crashed,
    Stopped,
    Evicted,
    Expired,
    Reloading,
    /// A load waits for room: its place in line and estimated wait.
    Waiting,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Loading => "loading",
            EventKind::Ready => "ready",
            EventKind::Failed => "failed",
            EventKind::Refused => "refused",
            EventKind::Crashed => "crashed",
            EventKind::Stopped => "stopped",
            EventKind::Evicted => "evicted",
            EventKind::Expired => "expired",
            EventKind::Reloading => "reloading",
            EventKind::Waiting => "waiting",
        }
    }
}

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

    /// Sends a state change of the instance `model` (at `path`, child `pid`) to every
    /// subscriber.
    pub fn publish(&self, kind: EventKind, model: &str, path: &str, pid: Option<u32>, detail: Option<String>) {
        let event = Event {
            time_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            event: kind.name().to_string(),
            model: model.to_string(),
            path: path.to_string(),
            pid,
            detail,
        };
        log::info!("event {} {model}", kind.name());
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
