//! Model instances: one llama-server child (or one remote model) per model and load options.
//!
//! Each instance has one owner, its worker thread ([`worker`]): it alone spawns, health
//! checks, stops, reaps and restarts the child and runs the state machine ([`state`]). Every
//! other thread talks to it through its inbox ([`Handle::send`]) and hears back on channels:
//! a request sends a [`Job`] and receives [`JobEvent`]s, ending with a [`Lease`] on a slot
//! or an error. Dropping the lease gives the slot back, as a message to the worker.
//!
//! The worker mirrors what others may read (state, counters, pid) into a [`View`] behind a
//! lock that guards that data only; `status`, the scheduler and the state file read it.

pub mod state;
pub mod table;
pub mod worker;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};

use crate::backend::llama;
use crate::budget::Need;
use crate::config::Ttl;
use crate::error::Error;
use crate::gguf::ModelInfo;
use crate::memory;
use crate::model::{ModelSpec, Policy};
use crate::protocol::{InstanceStatus, Usage};
pub use state::{JobId, Phase, RoomToken, Unload};

/// Fixed cost of one llama-server process beyond weights and KV cache (measured: a tiny
/// model's child is about 40 MiB resident on CPU).
const PROCESS_OVERHEAD_BYTES: u64 = 48 << 20;
/// Samples kept for the percentiles in `status`.
const SAMPLES: usize = 1024;

/// The instance table's key: a model (file, or remote name) and its load options.
pub type Key = (std::path::PathBuf, crate::model::LoadOptions);

pub fn key_of(spec: &ModelSpec) -> Key {
    (spec.path.clone(), spec.load.clone())
}

/// What identifies the content of a model file: a replaced file (new inode, size or
/// modification time) is a new model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    /// For a model that is not a file.
    pub fn none() -> FileStamp {
        FileStamp::default()
    }

    pub fn of(metadata: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp { dev: metadata.dev(), ino: metadata.ino(), len: metadata.len(), modified: metadata.modified().ok() }
    }
}

/// A request for a slot, sent to the instance's worker.
pub struct Job {
    pub id: JobId,
    /// Where the worker answers: progress, then a lease or an error.
    pub events: Sender<JobEvent>,
    /// The model's latest policy from the config, applied without a reload.
    pub policy: Policy,
    /// The model file as the request found it, when it differs from what the instance has.
    pub file: Option<(ModelInfo, FileStamp)>,
}

pub enum JobEvent {
    /// The model is being loaded for this request (sent once).
    Loading,
    /// The request waits for a slot at this place (1 = next).
    Queued(usize),
    Granted(Box<Lease>),
    Failed(Error),
}

/// How one load of the child ended, for the requests that ran on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The child exited on its own: its exit status and last output.
    Exited { status: String, stderr_tail: String },
    /// llmctl stopped it; the message says who and why.
    Stopped(String),
}

/// One load of an instance: the child it started (or the remote servers it checked), and
/// how it ended. A lease holds the generation it was granted on, so a request classifies a
/// broken stream by what happened to *its* child, never a newer one.
pub struct Generation {
    pub number: u64,
    ended: Mutex<Option<Ended>>,
    changed: Condvar,
    /// Set when llmctl stopped the child: streams on it stop relaying at the next token,
    /// whatever the child does with SIGTERM.
    stopped: std::sync::atomic::AtomicBool,
}

impl Generation {
    pub fn new(number: u64) -> Generation {
        Generation { number, ended: Mutex::new(None), changed: Condvar::new(), stopped: Default::default() }
    }

    /// Records how the generation ended; the first word stays.
    pub fn end(&self, ended: Ended) {
        if matches!(ended, Ended::Stopped(_)) {
            self.stopped.store(true, Ordering::SeqCst);
        }
        let mut slot = self.ended.lock();
        if slot.is_none() {
            *slot = Some(ended);
        }
        drop(slot);
        self.changed.notify_all();
    }

    /// True once llmctl has stopped this generation's child.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// How it ended, waiting up to `patience` for the worker to find out: a crash closes
    /// the connection a moment before the kernel reports the exit.
    pub fn wait_ended(&self, patience: Duration) -> Option<Ended> {
        let mut slot = self.ended.lock();
        if slot.is_none() {
            self.changed.wait_for(&mut slot, patience);
        }
        slot.clone()
    }
}

/// What a finished request reports when its lease is dropped.
#[derive(Debug, Default)]
pub struct Report {
    pub usage: Usage,
    /// "ok", "cancelled" or an error kind; none for a lease used to load (warm, switch).
    pub outcome: Option<String>,
    pub first_token: Option<Duration>,
    /// No token came within the token timeout: the child is restarted.
    pub stalled: bool,
    /// The remote replica failed: it is left out for a while.
    pub replica_failed: bool,
    /// How long the request waited for its slot.
    pub waited: Duration,
}

/// A slot on a ready instance. Dropping it gives the slot back to the worker, even on panic.
pub struct Lease {
    pub generation: Arc<Generation>,
    pub client: llama::Client,
    /// The remote replica serving this request, if the model is remote.
    pub replica: Option<usize>,
    pub report: Report,
    inbox: Sender<Message>,
    released: bool,
}

impl Lease {
    /// Gives the slot back and waits (briefly) until the worker has taken it, so that what
    /// the client does next (`status`, another request) sees the instance idle.
    pub fn release(mut self) {
        let (ack, acked) = crossbeam_channel::bounded(1);
        self.send_finished(Some(ack));
        let _ = acked.recv_timeout(RELEASE_ACK_WAIT);
    }

    fn send_finished(&mut self, ack: Option<Sender<()>>) {
        if self.released {
            return;
        }
        self.released = true;
        let report = std::mem::take(&mut self.report);
        // A worker that is gone has nothing left to account.
        let _ = self.inbox.send(Message::Finished {
            replica: self.replica,
            generation: self.generation.number,
            report,
            ack,
        });
    }
}

/// The longest a released lease waits for the worker to take the slot back.
const RELEASE_ACK_WAIT: Duration = Duration::from_secs(1);

impl Drop for Lease {
    fn drop(&mut self) {
        self.send_finished(None);
    }
}

/// Pins set by commands.
#[derive(Debug, Clone, Copy)]
pub enum Pin {
    Set(bool),
    Until(SystemTime),
}

/// What a worker hears.
pub enum Message {
    Arrive(Job),
    /// The job's client went away before it got a slot.
    Leave(JobId),
    /// A lease was dropped; `ack` hears when the slot is back.
    Finished {
        replica: Option<usize>,
        generation: u64,
        report: Report,
        ack: Option<Sender<()>>,
    },
    RoomGranted(RoomToken),
    RoomRefused(Error),
    /// The load an eviction was for no longer needs the room: stay loaded if not yet gone.
    Keep(RoomToken),
    /// Unload for `why`. `cutoff` is the last job sent before the decision; `room` names
    /// the grant an eviction is for; `message` is what refused and cut-off requests are
    /// told; `done` hears when the instance has stopped (or at once if nothing runs).
    Unload {
        why: Unload,
        cutoff: JobId,
        room: Option<RoomToken>,
        message: String,
        done: Option<Sender<()>>,
    },
    Pin(Pin),
    /// The child's output closed: it is exiting.
    OutputClosed {
        generation: u64,
    },
    /// The child says it listens: check readiness now.
    Listening {
        generation: u64,
    },
    /// When it was last used, as a daemon before this one remembered.
    Restore {
        last_used: SystemTime,
    },
    /// Stop the child and end the worker.
    Shutdown {
        message: String,
    },
}

/// What the scheduler hears from workers.
#[derive(Debug)]
pub enum RoomRequest {
    /// Instance `id` needs memory to load; the answer is [`Message::RoomGranted`] or
    /// [`Message::RoomRefused`].
    Want { id: usize, need: Need },
    /// It no longer needs the room it asked for.
    Withdraw { id: usize },
    /// It gave back the room it was granted: its child is gone.
    Return { id: usize },
    /// The budget changed (a reload): plan the waiting loads again.
    Replan,
}

/// Counters and samples for `status`.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub requests: u64,
    pub usage: Usage,
    pub restarts: u32,
    pub rejected: u64,
    pub evictions: u32,
    pub waits: VecDeque<Duration>,
    pub first_tokens: VecDeque<Duration>,
    pub outcomes: BTreeMap<String, u64>,
    pub last_load: Option<Duration>,
}

impl Stats {
    pub fn sample(samples: &mut VecDeque<Duration>, value: Duration) {
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(value);
    }
}

/// What others may read of an instance; written only by its worker.
#[derive(Debug, Clone)]
pub struct View {
    pub spec: ModelSpec,
    pub info: ModelInfo,
    pub stamp: FileStamp,
    pub phase: Phase,
    pub in_flight: u32,
    pub queued: usize,
    pub slots: u32,
    pub failure: Option<String>,
    pub crash_loop: bool,
    pub pid: Option<u32>,
    pub start_time: Option<u64>,
    pub port: Option<u16>,
    /// The Unix socket the child listens on.
    pub socket: Option<std::path::PathBuf>,
    pub last_used: Option<SystemTime>,
    pub ready_since: Option<SystemTime>,
    pub pinned_by_command: bool,
    pub pinned_until: Option<SystemTime>,
    pub stats: Stats,
}

impl View {
    pub fn new(spec: ModelSpec, info: ModelInfo, stamp: FileStamp) -> View {
        View {
            slots: spec.load.parallel,
            spec,
            info,
            stamp,
            phase: Phase::Stopped,
            in_flight: 0,
            queued: 0,
            failure: None,
            crash_loop: false,
            pid: None,
            start_time: None,
            port: None,
            socket: None,
            last_used: None,
            ready_since: None,
            pinned_by_command: false,
            pinned_until: None,
            stats: Stats::default(),
        }
    }

    pub fn pinned(&self) -> bool {
        self.spec.policy.pinned
            || self.pinned_by_command
            || self.pinned_until.is_some_and(|until| until > SystemTime::now())
    }

    /// True when a ready, idle, unpinned instance has gone unused for its TTL.
    pub fn ttl_expired(&self, default_ttl: Ttl) -> bool {
        if self.phase != Phase::Ready || self.in_flight > 0 || self.queued > 0 || self.pinned() {
            return false;
        }
        let Ttl::Seconds(seconds) = self.spec.policy.ttl.unwrap_or(default_ttl) else { return false };
        let since = self.last_used.or(self.ready_since);
        since.and_then(|t| t.elapsed().ok()).is_some_and(|idle| idle >= Duration::from_secs(seconds))
    }

    pub fn status(&self) -> InstanceStatus {
        let ms = |t: SystemTime| millis_since_epoch(t);
        InstanceStatus {
            name: self.spec.name.clone(),
            path: self.spec.path.display().to_string(),
            state: self.phase.name(self.in_flight).to_string(),
            failure: self.failure.clone(),
            pid: self.pid,
            port: self.port.filter(|_| self.spec.remote.is_none()),
            socket: self.socket.as_ref().map(|path| path.display().to_string()),
            remote: self.spec.remote.as_ref().map(|remote| remote.urls.clone()),
            ctx_size: self.spec.load.ctx_size,
            slots: self.slots,
            in_flight: self.in_flight,
            estimate_bytes: estimate_bytes(&self.spec, &self.info),
            rss_bytes: None,
            last_used_ms: self.last_used.map(ms),
            requests: self.stats.requests,
            usage: self.stats.usage,
            restarts: self.stats.restarts,
            crash_loop: self.crash_loop,
            queued: self.queued,
            rejected: self.stats.rejected,
            wait_p50_ms: percentile_ms(&self.stats.waits, 0.50),
            wait_p99_ms: percentile_ms(&self.stats.waits, 0.99),
            pinned: self.pinned(),
            pinned_until_ms: self.pinned_until.map(ms),
            ttl_s: match self.spec.policy.ttl {
                Some(Ttl::Seconds(seconds)) => Some(seconds),
                _ => None,
            },
            evictions: self.stats.evictions,
            vram_bytes: None,
            load_ms: self.stats.last_load.map(|d| d.as_millis() as u64),
            first_token_p50_ms: percentile_ms(&self.stats.first_tokens, 0.50),
            first_token_p99_ms: percentile_ms(&self.stats.first_tokens, 0.99),
            outcomes: self.stats.outcomes.clone(),
        }
    }
}

/// An instance as the rest of the daemon holds it: the worker's inbox and its view.
pub struct Handle {
    pub id: usize,
    inbox: Sender<Message>,
    view: Arc<Mutex<View>>,
    /// Requests the daemon's full queue refused before they reached the worker.
    rejected: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    /// Sends `message` to the worker; false when the worker has ended (daemon shutdown).
    pub fn send(&self, message: Message) -> bool {
        self.inbox.send(message).is_ok()
    }

    /// A copy of the view, taken under its lock.
    pub fn view(&self) -> View {
        let mut view = self.view.lock().clone();
        view.stats.rejected += self.rejected.load(Ordering::Relaxed);
        view
    }

    /// Reads a few fields without copying the whole view.
    pub fn with_view<T>(&self, read: impl FnOnce(&View) -> T) -> T {
        read(&self.view.lock())
    }

    pub fn note_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits for the worker thread to end (after [`Message::Shutdown`]).
    pub fn join(&self) {
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// Bytes an instance is expected to use before it runs: weights, KV cache, process.
pub fn estimate_bytes(spec: &ModelSpec, info: &ModelInfo) -> u64 {
    if spec.remote.is_some() {
        return 0;
    }
    let n_ctx = spec.load.ctx_size.map(u64::from).or(info.context_length).unwrap_or(4096);
    info.tensor_bytes.saturating_add(info.kv_cache_bytes(n_ctx)).saturating_add(PROCESS_OVERHEAD_BYTES)
}

/// What an instance needs from the budget: RAM and, with GPU layers on a machine with a GPU,
/// GPU memory (the offloaded share of weights and KV cache plus a CUDA context). The CUDA
/// runtime also takes host memory of its own, counted in RAM.
pub fn need(spec: &ModelSpec, info: &ModelInfo, gpu_present: bool) -> Need {
    let total = estimate_bytes(spec, info);
    if total == 0 {
        return Need { ram: 0, vram: 0 };
    }
    let layers = info.block_count.unwrap_or(1).max(1);
    let offloaded = match (gpu_present, spec.load.gpu_layers) {
        (true, Some(n)) if n > 0 => (u64::from(n).min(layers + 1) as f64 / (layers + 1) as f64).min(1.0),
        _ => return Need { ram: total, vram: 0 },
    };
    let model_bytes = total - PROCESS_OVERHEAD_BYTES;
    let on_gpu = (model_bytes as f64 * offloaded) as u64;
    Need {
        ram: (total - on_gpu).saturating_add(memory::CUDA_HOST_BYTES),
        vram: on_gpu.saturating_add(memory::CUDA_CONTEXT_BYTES),
    }
}

pub fn millis_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn percentile_ms(samples: &VecDeque<Duration>, quantile: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted: Vec<Duration> = samples.iter().copied().collect();
    sorted.sort();
    let index = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[index].as_secs_f64() * 1000.0)
}

/// A log file name that is readable and unique per model file and load options, the same
/// whichever alias named them (the instance is the same), and stable across llmctl versions
/// (FNV-1a over the path and options, not std's hasher), so `llmctl logs` finds what a
/// daemon wrote.
pub fn log_file_name(spec: &ModelSpec) -> String {
    let key = format!("{}\0{:?}", spec.path.display(), spec.load);
    let hash = key
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
    let file_stem = spec.path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
    let stem: String =
        file_stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    format!("{stem}-{:08x}.log", hash as u32)
}
