//! The status report: the daemon, its queue and every instance, from the published views
//! and counters; no worker is asked. `status`, `metrics` and `serve`'s `/metrics` read it.

use super::shared::Shared;
use crate::protocol::{DaemonStatus, QueueStatus, StatusReport};

/// The daemon, its queue and every instance, as `status` reports them.
pub(crate) fn report(shared: &Shared) -> StatusReport {
    let gpu = shared.services.gpu.latest();
    let live = shared.live.read().clone();
    let budget = super::scheduler::budget(&live, gpu.as_ref());
    let etas = shared.etas.lock().clone();
    let instances: Vec<_> = shared
        .table
        .all_with_ids()
        .iter()
        .map(|(id, instance)| {
            let mut status = instance.snapshot().status();
            if let Some(&(position, eta_ms)) = etas.get(id) {
                status.waiting_position = Some(position);
                status.eta_ms = Some(eta_ms);
            }
            status.rss_bytes = status.pid.and_then(crate::process::rss_bytes);
            status.vram_bytes = status.pid.and_then(|pid| gpu.as_ref()?.used_by_pid.get(&pid).copied());
            status
        })
        .collect();
    let swaps = shared.swaps.load(std::sync::atomic::Ordering::Relaxed);
    let finished: u64 = instances.iter().map(|i| i.outcomes.values().sum::<u64>()).sum();
    StatusReport {
        daemon: DaemonStatus {
            swaps,
            swaps_per_request: if finished == 0 { 0.0 } else { swaps as f64 / finished as f64 },
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
