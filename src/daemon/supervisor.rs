//! The supervisor: a timer, not an owner. It asks idle instances whose TTL ran out to
//! unload (their worker decides whether they still are idle), reads GPU memory in the
//! background, and keeps the state file current.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select_biased, Receiver};

use super::shared::Shared;
use super::state;
use crate::instance::{Message, Unload};

/// How often the supervisor looks for expired TTLs and a changed state file.
const TICK: Duration = Duration::from_millis(100);
/// How long a failed state-file write waits before the next try.
const STATE_RETRY: Duration = Duration::from_secs(10);
/// How often GPU memory is read in the background (and after every load).
const GPU_INTERVAL: Duration = Duration::from_secs(2);

/// Runs until `stop` closes.
pub(crate) fn run(shared: &Arc<Shared>, stop: Receiver<()>) {
    let mut written = state::snapshot(&shared.table);
    // A failed write is retried, but not every tick: a full disk or a read-only directory
    // stays so for a while, and the log should say it once, not ten times a second.
    let write_state = || {
        let result = state::write(&shared.paths.state_file(), &shared.table);
        let failed = result.is_err();
        let mut last_error = shared.state_file_error.lock();
        match (&result, last_error.as_ref()) {
            (Err(message), Some(previous)) if message == previous => {}
            (Err(message), _) => log::error!("{message}; serving on without it, retrying every 10 s"),
            (Ok(()), Some(_)) => log::info!("the state file is written again"),
            (Ok(()), None) => {}
        }
        *last_error = result.err();
        failed
    };
    let mut retry = write_state();
    let mut failed_at = retry.then(Instant::now);
    let gpu = &shared.services.gpu;
    let mut gpu_read_at = Instant::now();
    loop {
        select_biased! {
            recv(stop) -> _ => return,
            recv(gpu.pokes()) -> _ => {
                gpu.sample();
                gpu_read_at = Instant::now();
            }
            default(TICK) => {}
        }
        if gpu_read_at.elapsed() >= GPU_INTERVAL {
            gpu.sample();
            gpu_read_at = Instant::now();
        }
        let default_ttl = shared.live.read().default_ttl;
        for instance in shared.table.all() {
            if instance.ttl_expired(default_ttl) {
                instance.send(Message::Unload {
                    why: Unload::Expire,
                    cutoff: shared.last_job(),
                    room: None,
                    message: "unloaded after its TTL".into(),
                    done: None,
                });
            }
        }
        let current = state::snapshot(&shared.table);
        let retry_due = failed_at.is_none_or(|at| at.elapsed() >= STATE_RETRY);
        if (current != written || retry) && retry_due {
            retry = write_state();
            failed_at = retry.then(Instant::now);
            written = current;
        }
    }
}
