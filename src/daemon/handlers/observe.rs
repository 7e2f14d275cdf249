//! Requests that only look: `status`, `events` and `metrics`. None of them waits on a
//! worker: each reads the instances' published views and counters.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use crate::daemon::peer::Peer;
use crate::daemon::report;
use crate::daemon::shared::Shared;
use crate::error::Result;
use crate::protocol::Response;

pub(crate) fn status(shared: &Arc<Shared>, peer: &mut Peer) -> Result<()> {
    peer.reply(&Response::Status(report::report(shared)))
}

pub(crate) fn metrics(shared: &Arc<Shared>, peer: &mut Peer) -> Result<()> {
    let text = crate::daemon::metrics::render(&report::report(shared));
    peer.reply(&Response::Metrics { text })
}

/// Streams events to the client until it goes away or the daemon shuts down.
pub(crate) fn events(shared: &Arc<Shared>, peer: &mut Peer) -> Result<()> {
    let subscription = shared.services.events.subscribe();
    // Tell the client it is subscribed, so nothing that happens after this is missed.
    peer.reply(&Response::Ok { message: None })?;
    loop {
        match subscription.recv_timeout(Duration::from_millis(200)) {
            Ok(event) => {
                if peer.send(&Response::Event(event)).is_err() {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if peer.gone() || shared.is_shutting_down() {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}
