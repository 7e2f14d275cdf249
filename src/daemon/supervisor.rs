//! The supervisor: a timer, not an owner. It asks idle instances whose TTL ran out to
//! unload (their worker decides whether they still are idle), reads GPU memory in the
//! background, keeps the state file current, and shuts the daemon down when its socket is
//! gone.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select_biased, Receiver};

use super::shared::{Shared, ShutdownRequest};
use super::state;
use crate::instance::table::KEPT_STOPPED;
use crate::instance::{Message, Unload};

/// How often the supervisor looks for expired TTLs and a changed state file.
const TICK: Duration = Duration::from_millis(100);
/// How long a failed state-file write waits before the next try.
const STATE_RETRY: Duration = Duration::from_secs(10);
/// How often GPU memory is read in the background (and after every load).
const GPU_INTERVAL: Duration = Duration::from_secs(2);
/// How often a machine without `nvidia-smi` is looked at again, for a driver installed
/// while the daemon runs; in between, loads do not ask either. Starting a process every two
/// seconds would take the CPU from the children for nothing.
const NO_GPU_INTERVAL: Duration = Duration::from_secs(60);
/// How often the daemon's socket file is checked, and stopped instances counted.
const SLOW_TICK: Duration = Duration::from_millis(500);
/// How often the state file is written when only the models' last use has changed: every
/// request changes it, and the file is replaced with two fsyncs. A daemon that is killed
/// loses at most this much of the LRU order; one that shuts down writes it all.
const LAST_USE_WRITES: Duration = Duration::from_secs(30);

/// The daemon's socket file as it was bound. A daemon whose socket was removed (a logout
/// clearing `XDG_RUNTIME_DIR`, a cleaner ageing `/tmp`) or replaced can be reached by no
/// client, yet would hold its models and the state directory forever; it shuts down
/// instead, as gpg-agent does, and the next command starts a fresh one. Clients that find
/// the state directory held by a daemon without its socket wait for that.
pub(crate) struct SocketWatch {
    path: PathBuf,
    identity: (u64, u64),
}

impl SocketWatch {
    pub(crate) fn new(path: &Path) -> std::io::Result<SocketWatch> {
        let metadata = std::fs::symlink_metadata(path)?;
        Ok(SocketWatch { path: path.to_path_buf(), identity: (metadata.dev(), metadata.ino()) })
    }

    /// Whether the socket file is still the one this daemon bound. Only a definite answer
    /// counts: a check that fails for another reason (a directory made unreadable) is not
    /// taken for a removal.
    fn still_ours(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(metadata) => (metadata.dev(), metadata.ino()) == self.identity,
            Err(error) => error.kind() != std::io::ErrorKind::NotFound,
        }
    }
}

/// Ends the least recently used stopped instances beyond [`KEPT_STOPPED`].
fn retire_surplus_stopped(shared: &Shared) {
    let mut stopped: Vec<(Option<std::time::SystemTime>, usize)> = shared
        .table
        .all_with_ids()
        .into_iter()
        .filter(|(_, handle)| handle.with_view(|view| view.retirable()))
        .map(|(id, handle)| (handle.last_used(), id))
        .collect();
    if stopped.len() <= KEPT_STOPPED {
        return;
    }
    stopped.sort();
    let surplus = stopped.len() - KEPT_STOPPED;
    for (_, id) in stopped.into_iter().take(surplus) {
        // Held by a request or a report right now: it is looked at again next time.
        if let Some(handle) = shared.table.remove_unused(id) {
            let name = handle.with_view(|view| view.spec.name.clone());
            log::info!("retired the stopped instance of {name}: more than {KEPT_STOPPED} were kept");
            handle.send(Message::Shutdown { message: format!("{name} was retired") });
        }
    }
}

/// Runs until `stop` closes.
pub(crate) fn run(shared: &Arc<Shared>, stop: Receiver<()>, socket: SocketWatch) {
    // Taken once it is found gone: the daemon shuts down once.
    let mut socket = Some(socket);
    let mut slow_tick_at = Instant::now();
    let mut written = state::snapshot(&shared.table);
    // A failed write is retried, but not every tick: a full disk or a read-only directory
    // stays so for a while.
    let mut retry = shared.write_state();
    let mut written_at = Instant::now();
    let mut failed_at = retry.then(Instant::now);
    let gpu = &shared.services.gpu;
    let mut gpu_read_at = Instant::now();
    let mut gpu_interval = GPU_INTERVAL;
    loop {
        let poked = select_biased! {
            recv(stop) -> _ => return,
            recv(gpu.pokes()) -> _ => gpu_interval == GPU_INTERVAL,
            default(TICK) => false,
        };
        if poked || gpu_read_at.elapsed() >= gpu_interval {
            gpu_interval = if gpu.sample() { GPU_INTERVAL } else { NO_GPU_INTERVAL };
            gpu_read_at = Instant::now();
        }
        if slow_tick_at.elapsed() >= SLOW_TICK {
            slow_tick_at = Instant::now();
            retire_surplus_stopped(shared);
            if socket.as_ref().is_some_and(|watch| !watch.still_ours()) {
                let path = socket.take().map(|watch| watch.path).unwrap_or_default();
                log::warn!(
                    "the socket {} was removed or replaced, so no client can reach this daemon: shutting down",
                    path.display()
                );
                let _ = shared.shutdown.send(ShutdownRequest::Signal);
            }
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
        let due = match state::change(&written, &current) {
            state::Change::None => retry,
            state::Change::LastUse => retry || written_at.elapsed() >= LAST_USE_WRITES,
            state::Change::Shape => true,
        };
        if due && retry_due {
            retry = shared.write_state();
            failed_at = retry.then(Instant::now);
            written = current;
            written_at = Instant::now();
        }
    }
}
