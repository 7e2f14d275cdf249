//! The daemon-wide admission queue: a bounded crossbeam channel used as a counting
//! semaphore. A request waiting for a slot holds a place; a full queue is an answer (Busy,
//! with a retry hint), never a blocked thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use crate::error::{Error, Result};

/// How long a refused client is told to wait before trying again.
const RETRY_AFTER_MS: u64 = 1000;

#[derive(Debug, Clone)]
pub(crate) struct Admission {
    places: Sender<()>,
    returned: Receiver<()>,
    depth: usize,
    rejected: Arc<AtomicU64>,
}

/// One place in the queue; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct QueuePlace {
    returned: Receiver<()>,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        // Every live place holds one message in the channel, so this never finds it empty.
        let _ = self.returned.try_recv();
    }
}

impl Admission {
    pub(crate) fn new(depth: usize) -> Admission {
        let (places, returned) = bounded(depth);
        Admission { places, returned, depth, rejected: Arc::new(AtomicU64::new(0)) }
    }

    /// Takes a place in the queue, or refuses at once when it is full.
    pub(crate) fn enter(&self) -> Result<QueuePlace> {
        match self.places.try_send(()) {
            Ok(()) => Ok(QueuePlace { returned: self.returned.clone() }),
            Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                Err(Error::Busy {
                    message: format!("the daemon's queue is full ({} requests waiting)", self.depth),
                    retry_after_ms: RETRY_AFTER_MS,
                    per_model: false,
                })
            }
        }
    }

    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    pub(crate) fn waiting(&self) -> usize {
        self.places.len()
    }

    /// A request refused busy before it could ask for a place (the connection cap).
    pub(crate) fn note_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_answers_busy_and_places_come_back() {
        let admission = Admission::new(2);
        let first = admission.enter().unwrap();
        let _second = admission.enter().unwrap();
        let error = admission.enter().unwrap_err();
        assert_eq!(error.exit_code(), 75);
        assert_eq!(admission.rejected(), 1);
        drop(first);
        assert_eq!(admission.waiting(), 1);
        assert!(admission.enter().is_ok());
    }
}
