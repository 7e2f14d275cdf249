//! The daemon's event bus: state changes (loading, ready, failed, crashed, stopped,
//! evicted, expired, reloading) and prompt caches saved and restored, fanned out to
//! `llmctl events` subscribers.
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
pub(crate) enum EventKind {
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
    /// A slot's prompt cache was saved before its child stopped.
    Saved,
    /// A saved prompt cache was read back into a slot of a new child.
    Restored,
}

/// What a `saved` or `restored` event measures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Measure {
    pub slot: u32,
    pub tokens: u64,
    pub bytes: u64,
    pub ms: u64,
}

impl EventKind {
    pub(crate) fn name(self) -> &'static str {
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
            EventKind::Saved => "saved",
            EventKind::Restored => "restored",
        }
    }
}

#[derive(Default)]
pub(crate) struct EventBus {
    /// Guards the subscriber list only; sending is `try_send`, which never blocks.
    subscribers: Mutex<Vec<Sender<Event>>>,
}

impl EventBus {
    pub(crate) fn subscribe(&self) -> Receiver<Event> {
        let (sender, receiver) = bounded(SUBSCRIBER_BACKLOG);
        self.subscribers.lock().push(sender);
        receiver
    }

    /// Sends a state change of the instance `model` (at `path`, child `pid`) to every
    /// subscriber.
    pub(crate) fn publish(&self, kind: EventKind, model: &str, path: &str, pid: Option<u32>, detail: Option<String>) {
        self.send(Event {
            time_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            event: kind.name().to_string(),
            model: model.to_string(),
            path: path.to_string(),
            pid,
            detail,
            ..Event::default()
        });
    }

    /// Like [`EventBus::publish`], with what a `saved` or `restored` event measures.
    pub(crate) fn publish_measured(
        &self,
        kind: EventKind,
        model: &str,
        path: &str,
        pid: Option<u32>,
        measure: Measure,
    ) {
        self.send(Event {
            time_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            event: kind.name().to_string(),
            model: model.to_string(),
            path: path.to_string(),
            pid,
            detail: Some(format!(
                "slot {}: {} tokens, {} in {} ms",
                measure.slot,
                measure.tokens,
                crate::budget::human(measure.bytes),
                measure.ms
            )),
            slot: Some(measure.slot),
            tokens: Some(measure.tokens),
            bytes: Some(measure.bytes),
            ms: Some(measure.ms),
        });
    }

    fn send(&self, event: Event) {
        log::info!("event {} {}", event.event, event.model);
        self.subscribers.lock().retain(|subscriber| match subscriber.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// Clients following `llmctl events` now.
    pub(crate) fn subscribers(&self) -> usize {
        self.subscribers.lock().len()
    }

    /// Ends every subscription, at shutdown.
    pub(crate) fn close(&self) {
        self.subscribers.lock().clear();
    }
}
