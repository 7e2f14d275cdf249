//! Model instances: one llama-server child per model and load options, and its state.
//!
//! States: `Starting → Ready ⇄ Busy → Stopping → Stopped`, and `Failed` with the reason
//! (`Busy` is `Ready` with requests in flight). One request loads an instance; the others
//! that arrive meanwhile wait for that load instead of starting their own.
//!
//! Two locks per instance, each guarding data only: `inner` holds the state machine and
//! counters, `process` holds the child handle so a stop can take it out. Neither is held
//! across a spawn, an HTTP call or a wait for a child; `try_wait` under `process` is a
//! non-blocking syscall.

pub mod table;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::backend::llama::{self, OutputTail, Timeouts};
use crate::budget::{Need, Resident};
use crate::config::Ttl;
use crate::daemon::launcher::Launcher;
use crate::error::{Error, ErrorKind, Result};
use crate::gguf::ModelInfo;
use crate::memory::{self, GpuReading};
use crate::model::{ModelSpec, Policy, Remote};
use crate::process::{self, ChildGroup};
use crate::protocol::{InstanceStatus, Usage};

/// Fixed cost of one llama-server process beyond weights and KV cache (measured: a tiny
/// model's child is about 40 MiB resident on CPU).
const PROCESS_OVERHEAD_BYTES: u64 = 48 << 20;
/// How long a waiter sleeps between checks of its deadline and its client.
const WAIT_SLICE: Duration = Duration::from_millis(20);
/// How long a failed remote replica is left out at first, and at most.
const REPLICA_BACKOFF: Duration = Duration::from_secs(1);
const REPLICA_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Slot waits kept for the percentiles in `status`.
const WAIT_SAMPLES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Ready,
    Stopping,
    Stopped,
    Failed,
}

impl State {
    pub fn name(self, in_flight: u32) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready if in_flight > 0 => "busy",
            State::Ready => "ready",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }
}

/// What an instance needs from the daemon to load.
pub struct LoadEnv<'a> {
    pub launcher: &'a Launcher,
    pub log_dir: &'a Path,
    /// Longest a load may go without any output from the child.
    pub load_timeout: Duration,
    pub http: Timeouts,
    pub crash_loop: CrashLoop,
    /// Frees memory for a load, evicting other instances as the budget requires.
    pub room: &'a dyn Room,
}

/// The daemon's side of the memory budget, asked before each spawn.
pub trait Room {
    fn make_room(&self, instance: &Instance) -> Result<()>;
    /// Finds the llama-server binary; asked only when a child is spawned, since looking
    /// through PATH costs a stat per directory.
    fn llama_server(&self) -> std::result::Result<PathBuf, String>;
    /// Hears a state change of `instance`, for `llmctl events`.
    fn notify(&self, instance: &Instance, event: &str, detail: Option<String>);
}

/// The crash-loop breaker: after `limit` crashes within `window`, an instance is not
/// restarted until `llmctl stop` clears it or the window has passed since the last crash.
#[derive(Debug, Clone, Copy)]
pub struct CrashLoop {
    pub limit: usize,
    pub window: Duration,
}

/// A running child and the thread draining its output.
struct Running {
    child: ChildGroup,
    drain: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops the child (if still running) and waits for its output to be drained.
    fn finish(mut self, grace: Duration, abort: &AtomicBool) -> std::io::Result<std::process::ExitStatus> {
        let status = self.child.stop(grace, abort);
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
        status
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Why the last load or run failed, with its kind so waiters can report it.
    failure: Option<(ErrorKind, String)>,
    /// Counts loads; a waiter only trusts a failure from the load it waited for.
    load_generation: u64,
    client: Option<llama::Client>,
    tail: Option<Arc<OutputTail>>,
    pid: Option<u32>,
    port: Option<u16>,
    in_flight: u32,
    /// Tickets of requests waiting for a slot, first come first served.
    queue: VecDeque<u64>,
    next_ticket: u64,
    last_used: Option<SystemTime>,
    requests: u64,
    usage: Usage,
    restarts: u32,
    /// When the child crashed or failed to load, most recent last.
    crashes: VecDeque<Instant>,
    /// Requests the full queue refused.
    rejected: u64,
    /// How long the last requests waited for a slot.
    waits: VecDeque<Duration>,
    /// The model's latest policy (from the config), applied without a reload.
    policy: Policy,
    /// Pinned with `llmctl pin`.
    pinned_by_command: bool,
    /// Pinned by `llmctl warm --ttl` until then.
    pinned_until: Option<SystemTime>,
    /// Times this instance was evicted for memory or unloaded by its TTL.
    evictions: u32,
    /// When the last load finished, for a TTL that starts before any request.
    ready_since: Option<SystemTime>,
    /// The load generation that `stop` cancelled, so its waiters fail instead of reloading.
    cancelled_load: Option<u64>,
    /// Requests waiting for a load to finish.
    load_waiters: usize,
    /// How long the last successful load took.
    last_load: Option<Duration>,
    /// Time to first token of the last requests.
    first_tokens: VecDeque<Duration>,
    /// Requests by outcome: "ok", "cancelled", or an error kind.
    outcomes: std::collections::BTreeMap<String, u64>,
    /// The servers of a remote model.
    replicas: Vec<Replica>,
}

/// One server of a remote model.
#[derive(Debug)]
struct Replica {
    client: llama::Client,
    in_flight: u32,
    /// Left out of the rotation until then, after a failure.
    down_until: Option<Instant>,
    backoff: Duration,
}

/// Size and modification time of a model file, to notice when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    /// For a model that is not a file.
    pub fn none() -> FileStamp {
        FileStamp { len: 0, modified: None }
    }

    pub fn of(metadata: &std::fs::Metadata) -> FileStamp {
        FileStamp { len: metadata.len(), modified: metadata.modified().ok() }
    }
}

pub struct Instance {
    pub spec: ModelSpec,
    pub info: ModelInfo,
    /// The model file as it was when its header was read.
    pub file_stamp: FileStamp,
    inner: Mutex<Inner>,
    /// Signalled on every state change and every released slot.
    changed: Condvar,
    process: Mutex<Option<Running>>,
}

/// A slot on a ready instance; dropping it gives the slot back, even on panic.
pub struct Slot {
    instance: Arc<Instance>,
    pub client: llama::Client,
    usage: Usage,
    /// The remote replica serving this request, if the model is remote.
    pub replica: Option<usize>,
}

impl Slot {
    pub fn record_usage(&mut self, usage: Usage) {
        self.usage = usage;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.instance.inner.lock();
        inner.in_flight -= 1;
        if let Some(replica) = self.replica.and_then(|index| inner.replicas.get_mut(index)) {
            replica.in_flight -= 1;
        }
        inner.last_used = Some(SystemTime::now());
        inner.usage.prompt_tokens += self.usage.prompt_tokens;
        inner.usage.completion_tokens += self.usage.completion_tokens;
        drop(inner);
        self.instance.changed.notify_all();
    }
}

/// Why no slot was given.
pub enum AcquireError {
    /// The instance is not ready (stopped, failed or stopping): load it again.
    NotReady,
    Error(Error),
}

impl Instance {
    pub fn new(spec: ModelSpec, info: ModelInfo, file_stamp: FileStamp) -> Instance {
        let policy = spec.policy.clone();
        Instance {
            spec,
            info,
            file_stamp,
            inner: Mutex::new(Inner {
                state: State::Stopped,
                failure: None,
                load_generation: 0,
                client: None,
                tail: None,
                pid: None,
                port: None,
                in_flight: 0,
                queue: VecDeque::new(),
                next_ticket: 0,
                last_used: None,
                requests: 0,
                usage: Usage::default(),
                restarts: 0,
                crashes: VecDeque::new(),
                rejected: 0,
                waits: VecDeque::new(),
                policy,
                pinned_by_command: false,
                pinned_until: None,
                evictions: 0,
                ready_since: None,
                cancelled_load: None,
                load_waiters: 0,
                last_load: None,
                first_tokens: VecDeque::new(),
                outcomes: Default::default(),
                replicas: Vec::new(),
            }),
            changed: Condvar::new(),
            process: Mutex::new(None),
        }
    }

    /// Bytes this instance is expected to use before it runs: weights, KV cache, process.
    pub fn estimate_bytes(&self) -> u64 {
        if self.spec.remote.is_some() {
            return 0;
        }
        let n_ctx = self.spec.load.ctx_size.map(u64::from).or(self.info.context_length).unwrap_or(4096);
        self.info.tensor_bytes + self.info.kv_cache_bytes(n_ctx) + PROCESS_OVERHEAD_BYTES
    }

    /// What this instance needs from the budget: RAM and, with GPU layers on a machine with
    /// a GPU, GPU memory (the offloaded share of weights and KV cache plus a CUDA context).
    pub fn need(&self, gpu_present: bool) -> Need {
        let total = self.estimate_bytes();
        let layers = self.info.block_count.unwrap_or(1).max(1);
        let offloaded = match (gpu_present, self.spec.load.gpu_layers) {
            (true, Some(n)) if n > 0 => (u64::from(n).min(layers + 1) as f64 / (layers + 1) as f64).min(1.0),
            _ => return Need { ram: total, vram: 0 },
        };
        let model_bytes = total - PROCESS_OVERHEAD_BYTES;
        let on_gpu = (model_bytes as f64 * offloaded) as u64;
        Need { ram: total - on_gpu, vram: on_gpu + memory::CUDA_CONTEXT_BYTES }
    }

    /// This instance as the eviction policy sees it, or none when it holds no memory.
    pub fn resident(&self, id: usize, gpu: Option<&GpuReading>) -> Option<Resident> {
        // A remote model uses no memory here.
        if self.spec.remote.is_some() {
            return None;
        }
        let inner = self.inner.lock();
        if matches!(inner.state, State::Stopped | State::Failed) && inner.pid.is_none() {
            return None;
        }
        let state = inner.state;
        let busy = state != State::Ready || inner.in_flight > 0 || !inner.queue.is_empty();
        let pinned = self.pinned_now(&inner);
        let pid = inner.pid;
        let last_used_ms = inner.last_used.or(inner.ready_since).map_or(0, millis_since_epoch);
        drop(inner);
        let need = self.need(gpu.is_some());
        // Until it runs, an instance is charged its estimate; then what it really uses.
        let measured_ram = if state == State::Ready { pid.and_then(process::rss_bytes) } else { None };
        let measured_vram = pid.and_then(|pid| gpu?.used_by_pid.get(&pid).copied());
        Some(Resident {
            id,
            name: self.spec.name.clone(),
            ram: measured_ram.unwrap_or(need.ram),
            vram: measured_vram.unwrap_or(need.vram),
            last_used_ms,
            pinned,
            busy,
        })
    }

    fn pinned_now(&self, inner: &Inner) -> bool {
        inner.policy.pinned
            || inner.pinned_by_command
            || inner.pinned_until.is_some_and(|until| until > SystemTime::now())
    }

    /// Takes the model's latest policy from a request.
    pub fn apply_policy(&self, policy: &Policy) {
        self.inner.lock().policy = policy.clone();
    }

    pub fn set_pinned(&self, pinned: bool) {
        let mut inner = self.inner.lock();
        inner.pinned_by_command = pinned;
        if !pinned {
            inner.pinned_until = None;
        }
    }

    /// Keeps the instance loaded at least until `until`.
    pub fn pin_until(&self, until: SystemTime) {
        let mut inner = self.inner.lock();
        inner.pinned_until = Some(inner.pinned_until.map_or(until, |current| current.max(until)));
    }

    /// Marks an idle, ready instance as stopping so nothing new starts on it; false if it
    /// is busy or not loaded. The caller then calls [`Instance::finish_eviction`].
    pub fn try_begin_eviction(&self) -> bool {
        let mut inner = self.inner.lock();
        if inner.state != State::Ready || inner.in_flight > 0 || !inner.queue.is_empty() {
            return false;
        }
        inner.state = State::Stopping;
        inner.evictions += 1;
        drop(inner);
        self.changed.notify_all();
        true
    }

    pub fn finish_eviction(&self, grace: Duration, abort: &AtomicBool) {
        self.stop_with(grace, abort);
    }

    /// True when a ready, idle, unpinned instance has gone unused for its TTL.
    pub fn ttl_expired(&self, default_ttl: Ttl) -> bool {
        let inner = self.inner.lock();
        if inner.state != State::Ready || inner.in_flight > 0 || self.pinned_now(&inner) {
            return false;
        }
        let Ttl::Seconds(seconds) = inner.policy.ttl.unwrap_or(default_ttl) else { return false };
        let since = inner.last_used.or(inner.ready_since);
        since.and_then(|t| t.elapsed().ok()).is_some_and(|idle| idle >= Duration::from_secs(seconds))
    }

    /// The snapshot kept in the state file, so LRU order and pins survive a restart.
    pub fn memory(&self) -> (Option<u64>, bool, Option<u64>) {
        let inner = self.inner.lock();
        (inner.last_used.map(millis_since_epoch), inner.pinned_by_command, inner.pinned_until.map(millis_since_epoch))
    }

    /// Restores what [`Instance::memory`] saved.
    pub fn restore(&self, last_used_ms: Option<u64>, pinned: bool, pinned_until_ms: Option<u64>) {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let mut inner = self.inner.lock();
        inner.last_used = last_used_ms.map(at);
        inner.pinned_by_command = pinned;
        inner.pinned_until = pinned_until_ms.map(at);
    }

    pub fn state(&self) -> State {
        self.inner.lock().state
    }

    /// The pid and kernel start time of the child, if one runs.
    pub fn child_identity(&self) -> Option<(u32, u64)> {
        let process = self.process.lock();
        let child = &process.as_ref()?.child;
        Some((child.pid(), child.start_time()?))
    }

    /// Returns a client for a ready instance, loading it first if needed. `on_loading` is
    /// called once if this request starts a load or waits for one.
    pub fn ensure_ready(
        self: &Arc<Self>,
        env: &LoadEnv<'_>,
        mut on_loading: impl FnMut(),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<llama::Client> {
        let mut inner = self.inner.lock();
        let mut announced = false;
        let mut waited_generation = None;
        let mut counted = false;
        let outcome = loop {
            match inner.state {
                State::Ready => break Some(Ok(inner.client.clone().expect("a ready instance has a client"))),
                State::Failed if waited_generation == Some(inner.load_generation) => {
                    let (kind, message) = inner.failure.clone().unwrap_or((ErrorKind::Backend, "load failed".into()));
                    break Some(Err(Error::Remote { kind, message }));
                }
                State::Failed => match self.crash_loop_error(&mut inner, env.crash_loop) {
                    Some(error) => break Some(Err(error)),
                    None => break None,
                },
                State::Stopped if waited_generation.is_some() && waited_generation == inner.cancelled_load => {
                    break Some(Err(Error::Remote {
                        kind: ErrorKind::Unavailable,
                        message: format!("{} was stopped while it loaded", self.spec.name),
                    }));
                }
                State::Stopped => break None,
                State::Starting | State::Stopping => {
                    if !announced {
                        announced = true;
                        drop(inner);
                        on_loading();
                        inner = self.inner.lock();
                        continue;
                    }
                    if !counted {
                        counted = true;
                        inner.load_waiters += 1;
                    }
                    if inner.state == State::Starting {
                        waited_generation = Some(inner.load_generation);
                    }
                    if cancelled() {
                        break Some(Err(Error::Interrupted));
                    }
                    self.changed.wait_for(&mut inner, WAIT_SLICE);
                }
            }
        };
        if counted {
            inner.load_waiters -= 1;
        }
        if let Some(result) = outcome {
            return result;
        }
        // This request loads the instance.
        inner.state = State::Starting;
        inner.load_generation += 1;
        if inner.failure.is_some() {
            inner.restarts += 1;
        }
        inner.failure = None;
        let generation = inner.load_generation;
        drop(inner);
        if !announced {
            on_loading();
        }

        let load_started = Instant::now();
        let result = self.load(env, generation);

        let mut inner = self.inner.lock();
        let outcome = match result {
            Ok((client, tail, port)) if inner.state == State::Starting && inner.load_generation == generation => {
                inner.state = State::Ready;
                inner.client = Some(client.clone());
                inner.tail = Some(tail);
                inner.port = Some(port);
                inner.ready_since = Some(SystemTime::now());
                inner.last_load = Some(load_started.elapsed());
                Ok(client)
            }
            Ok(_) => Err(Error::Remote {
                kind: ErrorKind::Unavailable,
                message: format!("{} was stopped while it loaded", self.spec.name),
            }),
            // Refused by the budget: nothing ran, so nothing failed.
            Err(error) if error.kind() == ErrorKind::NoCapacity => {
                if inner.state == State::Starting && inner.load_generation == generation {
                    inner.state = State::Stopped;
                }
                Err(error)
            }
            Err(error) => {
                if inner.state == State::Starting && inner.load_generation == generation {
                    inner.state = State::Failed;
                    inner.failure = Some((error.kind(), error.to_string()));
                    inner.crashes.push_back(Instant::now());
                }
                Err(error)
            }
        };
        drop(inner);
        match &outcome {
            Ok(_) => {
                env.room.notify(self, "ready", Some(format!("loaded in {} ms", load_started.elapsed().as_millis())))
            }
            Err(error) if error.kind() == ErrorKind::NoCapacity => {
                env.room.notify(self, "refused", Some(error.to_string()))
            }
            Err(error) => env.room.notify(self, "failed", Some(error.to_string())),
        }
        self.changed.notify_all();
        if outcome.is_err() {
            // Whatever was spawned for the failed load must not outlive it.
            self.take_and_finish(Duration::ZERO, &AtomicBool::new(true));
        }
        outcome
    }

    fn load(&self, env: &LoadEnv<'_>, generation: u64) -> Result<(llama::Client, Arc<OutputTail>, u16)> {
        if let Some(remote) = &self.spec.remote {
            return self.connect_remote(remote, env);
        }
        let binary = env.room.llama_server().map_err(|searched| Error::NoLlamaServer { searched })?;
        env.room.make_room(self)?;
        env.room.notify(self, "loading", None);
        let mut command = llama::command(&binary, &self.spec);
        let log_path = env.log_dir.join(log_file_name(&self.spec));
        let capture = llama::capture_output(&mut command, &log_path).map_err(|e| {
            Error::io(format!("cannot capture the output of llama-server in {}", log_path.display()), e)
        })?;
        let spawned = env.launcher.spawn(command);
        // `command` (and the pipe's write ends in it) is gone; only the child holds them now.
        let child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let _ = capture.drain.join();
                return Err(Error::NoLlamaServer {
                    searched: format!("{} could not be started: {error}", binary.display()),
                });
            }
        };
        let pid = child.pid();
        log::info!("spawned llama-server pid {pid} for {}", self.spec.path.display());
        *self.process.lock() = Some(Running { child, drain: Some(capture.drain) });
        self.inner.lock().pid = Some(pid);
        self.changed.notify_all();

        let tail = capture.tail;
        let started = Instant::now();
        let deadline_passed = |tail: &OutputTail| {
            let last_progress = tail.last_output().max(started);
            last_progress.elapsed() > env.load_timeout
        };
        let still_loading = || {
            let inner = self.inner.lock();
            inner.state == State::Starting && inner.load_generation == generation
        };

        // Between polls: the child may have died, a stop may have cancelled the load, or the
        // child may have gone quiet for longer than the load timeout.
        let check = || -> Result<()> {
            if let Some(error) = self.exit_error(&tail, Duration::ZERO) {
                return Err(error);
            }
            if !still_loading() {
                return Err(self.stopped_while_loading());
            }
            if deadline_passed(&tail) {
                return Err(Error::Timeout { what: self.load_timeout_message(env) });
            }
            Ok(())
        };
        let port = loop {
            match capture.port.recv_timeout(llama::READY_POLL) {
                Ok(port) => break port,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                // The drain thread ended: the child closed its output, so it is exiting.
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    if let Some(error) = self.exit_error(&tail, Duration::from_secs(2)) {
                        return Err(error);
                    }
                }
            }
            check()?;
        };

        let client = llama::Client::new(port, env.http);
        loop {
            if client.healthy() {
                return Ok((client, tail, port));
            }
            check()?;
            std::thread::sleep(llama::READY_POLL);
        }
    }

    fn load_timeout_message(&self, env: &LoadEnv<'_>) -> String {
        format!(
            "loading {}: llama-server printed nothing for {} s (raise load_timeout in the config for very large models)",
            self.spec.name,
            env.load_timeout.as_secs()
        )
    }

    fn stopped_while_loading(&self) -> Error {
        Error::Remote {
            kind: ErrorKind::Unavailable,
            message: format!("{} was stopped while it loaded", self.spec.name),
        }
    }

    /// If the child has exited (waiting up to `patience` for it to do so), reaps it and
    /// returns the error that describes the exit.
    fn exit_error(&self, tail: &OutputTail, patience: Duration) -> Option<Error> {
        let deadline = Instant::now() + patience;
        loop {
            let exited = {
                let mut process = self.process.lock();
                match process.as_mut() {
                    None => return None,
                    Some(running) => match running.child.try_wait() {
                        Ok(Some(status)) => Some((status, process.take())),
                        Ok(None) => None,
                        Err(_) => None,
                    },
                }
            };
            if let Some((status, running)) = exited {
                if let Some(mut running) = running {
                    // Join the drain so the tail holds the child's last words.
                    if let Some(drain) = running.drain.take() {
                        let _ = drain.join();
                    }
                }
                self.inner.lock().pid = None;
                return Some(Error::LlamaExited {
                    model: self.spec.name.clone(),
                    status: process::describe_status(status),
                    stderr_tail: tail.quote(),
                });
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The error to give instead of a restart while the instance is in a crash loop.
    fn crash_loop_error(&self, inner: &mut Inner, breaker: CrashLoop) -> Option<Error> {
        while inner.crashes.front().is_some_and(|at| at.elapsed() > breaker.window) {
            inner.crashes.pop_front();
        }
        if inner.crashes.len() < breaker.limit {
            return None;
        }
        let last = inner.failure.as_ref().map(|(_, message)| message.as_str()).unwrap_or("");
        Some(Error::Remote {
            kind: ErrorKind::Backend,
            message: format!(
                "{} failed {} times within {} s, so llmctl stopped restarting it; fix the cause, then \
                 `llmctl stop {}` to try again. The last failure: {last}",
                self.spec.name,
                inner.crashes.len(),
                breaker.window.as_secs(),
                self.spec.name,
            ),
        })
    }

    /// True while the crash-loop breaker holds the instance down.
    fn crash_looping(&self, inner: &Inner, breaker: CrashLoop) -> bool {
        inner.state == State::Failed
            && inner.crashes.iter().filter(|at| at.elapsed() <= breaker.window).count() >= breaker.limit
    }

    /// Waits for a free slot, first come first served, until `deadline`.
    /// `on_queued` hears the request's position (1 = next) whenever it changes while it
    /// waits; it is called without the lock held.
    pub fn acquire(
        self: &Arc<Self>,
        deadline: Instant,
        cancelled: &dyn Fn() -> bool,
        on_queued: &mut dyn FnMut(usize),
    ) -> std::result::Result<Slot, AcquireError> {
        let started = Instant::now();
        let mut reported_position = 0;
        let mut inner = self.inner.lock();
        let slots = self.spec.load.parallel * (inner.replicas.len().max(1) as u32);
        let must_wait = inner.in_flight >= slots || !inner.queue.is_empty();
        if let Some(max_queued) = inner.policy.max_queued.filter(|_| must_wait) {
            if inner.queue.len() >= max_queued as usize {
                inner.rejected += 1;
                return Err(AcquireError::Error(Error::Busy {
                    message: format!("{} already has {max_queued} requests waiting (max_queued)", self.spec.name),
                    retry_after_ms: 1000,
                    per_model: true,
                }));
            }
        }
        let ticket = inner.next_ticket;
        inner.next_ticket += 1;
        inner.queue.push_back(ticket);
        let give_up = |inner: &mut Inner, error: AcquireError| {
            inner.queue.retain(|&t| t != ticket);
            Err(error)
        };
        loop {
            let slots = self.spec.load.parallel * (inner.replicas.len().max(1) as u32);
            match inner.state {
                State::Ready if inner.in_flight < slots && inner.queue.front() == Some(&ticket) => {
                    // A remote model: the least busy replica that is not known to be down.
                    let replica = if self.spec.remote.is_some() {
                        let now = Instant::now();
                        let candidate = inner
                            .replicas
                            .iter()
                            .enumerate()
                            .filter(|(_, r)| r.down_until.is_none_or(|until| until <= now))
                            .min_by_key(|(_, r)| r.in_flight)
                            .map(|(index, _)| index);
                        match candidate {
                            Some(index) => Some(index),
                            None => {
                                let message = self.replicas_down_message(&inner);
                                let error =
                                    AcquireError::Error(Error::Remote { kind: ErrorKind::Unavailable, message });
                                let result = give_up(&mut inner, error);
                                drop(inner);
                                self.changed.notify_all();
                                return result;
                            }
                        }
                    } else {
                        None
                    };
                    inner.queue.pop_front();
                    inner.in_flight += 1;
                    inner.requests += 1;
                    if inner.waits.len() == WAIT_SAMPLES {
                        inner.waits.pop_front();
                    }
                    inner.waits.push_back(started.elapsed());
                    let client = match replica {
                        Some(index) => {
                            inner.replicas[index].in_flight += 1;
                            inner.replicas[index].client.clone()
                        }
                        None => inner.client.clone().expect("a ready instance has a client"),
                    };
                    drop(inner);
                    // The next in line may also fit a free slot.
                    self.changed.notify_all();
                    return Ok(Slot { instance: Arc::clone(self), client, usage: Usage::default(), replica });
                }
                State::Ready | State::Starting => {}
                State::Stopping | State::Stopped | State::Failed => {
                    let result = give_up(&mut inner, AcquireError::NotReady);
                    drop(inner);
                    self.changed.notify_all();
                    return result;
                }
            }
            if cancelled() {
                let result = give_up(&mut inner, AcquireError::Error(Error::Interrupted));
                drop(inner);
                self.changed.notify_all();
                return result;
            }
            if Instant::now() >= deadline {
                let result = give_up(
                    &mut inner,
                    AcquireError::Error(Error::Timeout {
                        what: format!("waiting for a free slot on {}", self.spec.name),
                    }),
                );
                drop(inner);
                self.changed.notify_all();
                return result;
            }
            let position = inner.queue.iter().position(|&t| t == ticket).map_or(0, |i| i + 1);
            if position != reported_position && inner.state == State::Ready {
                reported_position = position;
                MutexGuard::unlocked(&mut inner, || on_queued(position));
                continue;
            }
            self.changed.wait_for(&mut inner, WAIT_SLICE);
        }
    }

    /// For a remote model: checks every replica, keeps them all, and is ready when one answers.
    fn connect_remote(&self, remote: &Remote, env: &LoadEnv<'_>) -> Result<(llama::Client, Arc<OutputTail>, u16)> {
        env.room.notify(self, "loading", Some(format!("checking {}", remote.urls.join(", "))));
        let token = remote.api_key_env.as_deref().and_then(|name| std::env::var(name).ok());
        let roots = match &remote.ca_file {
            Some(path) => Some(llama::Client::load_ca_file(path).map_err(|reason| Error::Remote {
                kind: ErrorKind::Data,
                message: format!("ca_file of {}: {reason}", self.spec.name),
            })?),
            None => None,
        };
        let mut replicas = Vec::new();
        let mut problems = Vec::new();
        for url in &remote.urls {
            let client = llama::Client::for_url(url, token.as_deref(), roots.as_ref(), env.http);
            let health = client.remote_healthy();
            if let Err(problem) = &health {
                problems.push(format!("{url}: {problem}"));
            }
            replicas.push(Replica {
                down_until: health.is_err().then(|| Instant::now() + REPLICA_BACKOFF),
                backoff: REPLICA_BACKOFF,
                client,
                in_flight: 0,
            });
        }
        let Some(first) = replicas.iter().find(|r| r.down_until.is_none()).map(|r| r.client.clone()) else {
            return Err(Error::Remote {
                kind: ErrorKind::Unavailable,
                message: format!("no server for {} answers: {}", self.spec.name, problems.join("; ")),
            });
        };
        self.inner.lock().replicas = replicas;
        Ok((first, Arc::new(OutputTail::empty()), 0))
    }

    fn replicas_down_message(&self, inner: &Inner) -> String {
        let urls: Vec<&str> = inner.replicas.iter().map(|r| r.client.base_url()).collect();
        format!("every server for {} is down ({}); retrying with backoff", self.spec.name, urls.join(", "))
    }

    /// A remote replica failed a request: it is left out, with a growing backoff, and the
    /// request fails as unavailable (the server is down, not llmctl's child).
    pub fn remote_failed(&self, replica: usize, message: String) -> Error {
        let mut inner = self.inner.lock();
        let url = match inner.replicas.get_mut(replica) {
            Some(replica) => {
                replica.down_until = Some(Instant::now() + replica.backoff);
                replica.backoff = (replica.backoff * 2).min(REPLICA_BACKOFF_MAX);
                replica.client.base_url().to_string()
            }
            None => String::new(),
        };
        drop(inner);
        Error::Remote {
            kind: ErrorKind::Unavailable,
            message: format!("the server {url} for {} failed: {message}; it is retried with backoff", self.spec.name),
        }
    }

    /// Counts a finished request by its outcome.
    pub fn note_outcome(&self, outcome: &str) {
        *self.inner.lock().outcomes.entry(outcome.to_string()).or_insert(0) += 1;
    }

    /// Records a request's time to first token.
    pub fn note_first_token(&self, elapsed: Duration) {
        let mut inner = self.inner.lock();
        if inner.first_tokens.len() == WAIT_SAMPLES {
            inner.first_tokens.pop_front();
        }
        inner.first_tokens.push_back(elapsed);
    }

    /// Counts a request for this instance that the full queue refused.
    pub fn note_rejected(&self) {
        self.inner.lock().rejected += 1;
    }

    /// Classifies a broken generation: if the child died, the instance fails with its exit
    /// status and last output; otherwise the error is the backend's message.
    pub fn generation_failed(&self, message: String) -> Error {
        let tail = self.inner.lock().tail.clone();
        if let Some(tail) = tail {
            // A crash closes the connection a moment before the kernel reports the exit.
            if let Some(error) = self.exit_error(&tail, Duration::from_millis(500)) {
                self.mark_failed(&error);
                return error;
            }
        }
        Error::Backend { model: self.spec.name.clone(), message }
    }

    fn mark_failed(&self, error: &Error) {
        let mut inner = self.inner.lock();
        if matches!(inner.state, State::Ready | State::Starting) {
            inner.state = State::Failed;
            inner.failure = Some((error.kind(), error.to_string()));
            inner.crashes.push_back(Instant::now());
            inner.client = None;
            inner.port = None;
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// Checks whether the child exited on its own; if so the instance fails. Returns true
    /// when something changed. Called by the supervisor tick.
    pub fn reap(&self) -> bool {
        let tail = self.inner.lock().tail.clone();
        let Some(tail) = tail else { return false };
        match self.exit_error(&tail, Duration::ZERO) {
            Some(error) => {
                log::warn!("{error}");
                self.mark_failed(&error);
                true
            }
            None => false,
        }
    }

    /// Unloads the instance: TERM, grace, KILL, reap. Requests in flight fail.
    pub fn stop(&self, grace: Duration) {
        self.stop_with(grace, &AtomicBool::new(false));
    }

    /// Like [`Instance::stop`], with the grace period cut short once `abort` is set.
    pub fn stop_with(&self, grace: Duration, abort: &AtomicBool) {
        let mut inner = self.inner.lock();
        if inner.state == State::Stopped {
            return;
        }
        if inner.state == State::Starting {
            inner.cancelled_load = Some(inner.load_generation);
        }
        inner.state = State::Stopping;
        drop(inner);
        self.changed.notify_all();
        self.take_and_finish(grace, abort);
        let mut inner = self.inner.lock();
        inner.state = State::Stopped;
        inner.failure = None;
        inner.crashes.clear();
        inner.client = None;
        inner.port = None;
        inner.pid = None;
        drop(inner);
        self.changed.notify_all();
    }

    fn take_and_finish(&self, grace: Duration, abort: &AtomicBool) {
        let running = self.process.lock().take();
        if let Some(running) = running {
            let pid = running.child.pid();
            match running.finish(grace, abort) {
                Ok(status) => log::info!("llama-server pid {pid} {}", process::describe_status(status)),
                Err(error) => log::warn!("cannot reap llama-server pid {pid}: {error}"),
            }
        }
        self.inner.lock().pid = None;
    }

    pub fn status(&self, breaker: CrashLoop) -> InstanceStatus {
        let inner = self.inner.lock();
        let crash_loop = self.crash_looping(&inner, breaker);
        let mut status = InstanceStatus {
            name: self.spec.name.clone(),
            path: self.spec.path.display().to_string(),
            state: inner.state.name(inner.in_flight).to_string(),
            failure: inner.failure.as_ref().map(|(_, message)| message.clone()),
            pid: inner.pid,
            port: inner.port.filter(|_| self.spec.remote.is_none()),
            remote: self.spec.remote.as_ref().map(|remote| remote.urls.clone()),
            ctx_size: self.spec.load.ctx_size,
            slots: self.spec.load.parallel,
            in_flight: inner.in_flight,
            estimate_bytes: 0,
            rss_bytes: None,
            last_used_ms: inner.last_used.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64),
            requests: inner.requests,
            usage: inner.usage,
            restarts: inner.restarts,
            crash_loop,
            queued: inner.queue.len() + inner.load_waiters,
            rejected: inner.rejected,
            wait_p50_ms: percentile_ms(&inner.waits, 0.50),
            wait_p99_ms: percentile_ms(&inner.waits, 0.99),
            pinned: self.pinned_now(&inner),
            pinned_until_ms: inner.pinned_until.map(millis_since_epoch),
            ttl_s: match inner.policy.ttl {
                Some(Ttl::Seconds(seconds)) => Some(seconds),
                _ => None,
            },
            evictions: inner.evictions,
            vram_bytes: None,
            load_ms: inner.last_load.map(|d| d.as_millis() as u64),
            first_token_p50_ms: percentile_ms(&inner.first_tokens, 0.50),
            first_token_p99_ms: percentile_ms(&inner.first_tokens, 0.99),
            outcomes: inner.outcomes.clone(),
        };
        drop(inner);
        status.estimate_bytes = self.estimate_bytes();
        status.rss_bytes = status.pid.and_then(process::rss_bytes);
        status
    }
}

fn millis_since_epoch(time: SystemTime) -> u64 {
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

/// A log file name that is readable and unique per model and load options, and stable
/// across llmctl versions (FNV-1a over the path and options, not std's hasher), so
/// `llmctl logs` finds what a daemon wrote.
pub fn log_file_name(spec: &ModelSpec) -> String {
    let key = format!("{}\0{:?}", spec.path.display(), spec.load);
    let hash = key
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
    let stem: String =
        spec.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    format!("{stem}-{:08x}.log", hash as u32)
}
