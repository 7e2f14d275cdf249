//! Requests that only look: `status`, `events` and `metrics`. None of them waits on a
//! worker: each reads the instances' published views and counters.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use crate::daemon::connection::Peer;
use crate::daemon::shared::Shared;
use crate::error::Result;
use crate::protocol::{DaemonStatus, QueueStatus, Response, StatusReport};

pub(crate) fn status(shared: &Arc<Shared>, peer: &mut Peer) -> Result<()> {
    peer.reply(&Response::Status(report(shared)))
}

pub(crate) fn metrics(shared: &Arc<Shared>, peer: &mut Peer) -> Result<()> {
    let text = crate::daemon::metrics::render(&report(shared));
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

/// The daemon, its queue and every instance, as `status` reports them.
pub(crate) fn report(shared: &Shared) -> StatusReport {
    let gpu = shared.services.gpu.latest();
    let live = shared.live.read().clone();
    let budget = crate::daemon::scheduler::budget(&live, gpu.as_ref());
    let instances: Vec<_> = shared
        .table
        .all()
        .iter()
        .map(|instance| {
            let mut status = instance.snapshot().status();
            status.rss_bytes = status.pid.and_then(crate::process::rss_bytes);
            status.vram_bytes = status.pid.and_then(|pid| gpu.as_ref()?.used_by_pid.get(&pid).copied());
            status
        })
        .collect();
    StatusReport {
        daemon: DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: shared.started.elapsed().as_millis() as u64,
            socket: shared.paths.socket.display().to_string(),
            rss_bytes: crate::process::rss_bytes(std::process::id()),
            state_file_error: shared.state_file_error.lock().clone(),
            budget_bytes: budget.ram,
            vram_budget_bytes: budget.vram,
            max_instances: budget.max_instances,
            evictions: instances.iter().map(|i| u64::from(i.evictions)).sum(),
            event_subscribers: shared.services.events.subscribers(),
            settings: shared.settings.describe(&live),
            llama_server: shared.llama_server.read().clone(),
            listening: shared.listeners.addresses(),
        },
        queue: QueueStatus {
            depth: shared.admission.depth(),
            waiting: shared.admission.waiting(),
            rejected: shared.admission.rejected(),
        },
        instances,
        caches: Box::new(shared.services.caches.report()),
    }
}
