//! The daemon: owns the socket, the instance table and, through the instance workers, every
//! llama-server child.
//!
//! Threads, each named; [`run`] joins all but the connection threads, which it waits for:
//! - `signals`: SIGINT/SIGTERM → the shutdown channel (a second SIGINT kills at once);
//!   SIGHUP reloads the config;
//! - `listener`: accepts connections and hands each to an idle `conn` thread, starting one
//!   when none is idle (idle ones exit after a while);
//! - `conn`: one request at a time: reads it, sends jobs and messages to instance workers,
//!   relays their answers (see `connection`);
//! - `instance-N`: one worker per instance, the only owner of its child (see `instance`);
//! - `scheduler`: the only place that grants memory and picks instances to unload;
//! - `supervisor`: a timer for TTL expiry, GPU readings and the state file;
//! - `launcher`: forks children (see `process::launcher` for why one thread does it).
//!
//! Startup takes an exclusive lock next to the socket, so a second daemon refuses to start
//! and a socket left by a crashed daemon is known to be stale and replaced.

pub mod connection;
pub mod metrics;
pub mod scheduler;
pub mod state;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select_biased, unbounded, Receiver, Sender};

use crate::admission::Admission;
use crate::backend::llama::Timeouts;
use crate::config::{parse_ttl, Config, Ttl, DEFAULT_QUEUE_DEPTH};
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::instance::table::InstanceTable;
use crate::instance::worker::{self, CrashLoop, Services};
use crate::instance::{JobId, Message, Unload};
use crate::memory::Gpu;
use crate::paths::{self, Paths};
use crate::process::launcher::Launcher;
use crate::sys;

/// The memory budget unless configured: three quarters of MemTotal leaves room for the
/// rest of the machine.
pub const DEFAULT_MEMORY_BUDGET: &str = "75%";
/// The GPU memory budget unless configured.
pub const DEFAULT_VRAM_BUDGET: &str = "90%";
/// Time a child gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Allocations at least this large get their own mapping (see `run`).
const LARGE_BUFFER: usize = 1 << 20;
/// How long a request may wait for a slot, in seconds.
pub const QUEUE_TIMEOUT_S: u64 = 600;
/// How often the supervisor looks for expired TTLs and a changed state file.
const SUPERVISOR_TICK: Duration = Duration::from_millis(100);
/// How long a failed state-file write waits before the next try.
const STATE_RETRY: Duration = Duration::from_secs(10);
/// How often GPU memory is read in the background (and after every load).
const GPU_INTERVAL: Duration = Duration::from_secs(2);

/// Daemon settings after flags, environment and config are applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub queue_depth: usize,
    pub load_timeout: Duration,
    pub token_timeout: Duration,
    pub queue_timeout: Duration,
    pub stop_grace: Duration,
    pub llama_server: Option<PathBuf>,
    pub crash_loop: CrashLoop,
    /// The memory budget as written: bytes, a size, or a share of MemTotal.
    pub memory_budget: String,
    pub vram_budget: String,
    pub max_instances: Option<usize>,
    pub default_ttl: Ttl,
}

/// The daemon's flags, kept so a reload applies the config under them again.
#[derive(Debug, Clone, Default)]
pub struct StartFlags {
    pub queue_depth: Option<usize>,
    pub llama_server: Option<PathBuf>,
}

/// The settings a reload changes while the daemon runs; the others need a new daemon.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveSettings {
    pub memory_budget: String,
    pub vram_budget: String,
    pub max_instances: Option<usize>,
    pub default_ttl: Ttl,
}

impl Settings {
    pub fn from_config(config: &Config, flags: &StartFlags) -> Settings {
        Settings::new(config, flags.queue_depth, flags.llama_server.clone())
    }

    pub fn live(&self) -> LiveSettings {
        LiveSettings {
            memory_budget: self.memory_budget.clone(),
            vram_budget: self.vram_budget.clone(),
            max_instances: self.max_instances,
            default_ttl: self.default_ttl,
        }
    }

    /// Each setting as `llmctl config` writes it, for `status` and for telling apart what
    /// the daemon uses from what the config says now.
    pub fn describe(&self, live: &LiveSettings) -> std::collections::BTreeMap<String, String> {
        let ttl = |ttl: Ttl| match ttl {
            Ttl::Never => "never".to_string(),
            Ttl::Seconds(seconds) => format!("{seconds}s"),
        };
        [
            ("queue_depth", self.queue_depth.to_string()),
            ("memory_budget", live.memory_budget.clone()),
            ("vram_budget", live.vram_budget.clone()),
            ("max_instances", live.max_instances.map_or("none".into(), |max| max.to_string())),
            ("default_ttl", ttl(live.default_ttl)),
            ("load_timeout", format!("{}s", self.load_timeout.as_secs())),
            ("token_timeout", format!("{}s", self.token_timeout.as_secs())),
            ("crash_limit", self.crash_loop.limit.to_string()),
            ("crash_window", format!("{}s", self.crash_loop.window.as_secs())),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
    }

    pub fn new(config: &Config, queue_depth_flag: Option<usize>, llama_server_flag: Option<PathBuf>) -> Settings {
        Settings {
            queue_depth: queue_depth_flag.or(config.queue_depth).unwrap_or(DEFAULT_QUEUE_DEPTH),
            load_timeout: Duration::from_secs(config.load_timeout.unwrap_or(120)),
            token_timeout: Duration::from_secs(config.token_timeout.unwrap_or(300)),
            queue_timeout: Duration::from_secs(QUEUE_TIMEOUT_S),
            stop_grace: env_duration_ms("LLMCTL_STOP_GRACE_MS").unwrap_or(STOP_GRACE),
            llama_server: llama_server_flag.or_else(|| config.llama_server.clone()),
            crash_loop: CrashLoop {
                limit: config.crash_limit.unwrap_or(3),
                window: Duration::from_secs(config.crash_window.unwrap_or(60)),
            },
            memory_budget: std::env::var("LLMCTL_MEMORY_BUDGET")
                .ok()
                .or_else(|| config.memory_budget.clone())
                .unwrap_or_else(|| DEFAULT_MEMORY_BUDGET.to_string()),
            vram_budget: config.vram_budget.clone().unwrap_or_else(|| DEFAULT_VRAM_BUDGET.to_string()),
            max_instances: config.max_instances,
            default_ttl: config.default_ttl.as_deref().and_then(|ttl| parse_ttl(ttl).ok()).unwrap_or(Ttl::Never),
        }
    }
}

fn env_duration_ms(name: &str) -> Option<Duration> {
    std::env::var(name).ok()?.parse().ok().map(Duration::from_millis)
}

/// Why the daemon stops, and who waits for it.
pub enum ShutdownRequest {
    Signal,
    /// A second SIGINT: kill children without a grace period.
    Kill,
    /// `llmctl shutdown`; the sender is told once every child is stopped.
    Client(Sender<()>),
}

/// What every daemon thread shares.
pub struct Shared {
    pub paths: Paths,
    pub settings: Settings,
    pub table: InstanceTable,
    pub admission: Admission,
    /// What instance workers use: launcher, scheduler inbox, events, GPU readings.
    pub services: Arc<Services>,
    pub started: Instant,
    pub shutdown: Sender<ShutdownRequest>,
    pub shutting_down: AtomicBool,
    pub connections: AtomicUsize,
    /// The last failure to write the state file; cleared by the next success.
    pub state_file_error: parking_lot::Mutex<Option<String>>,
    /// The number of the last request sent to a worker.
    jobs: AtomicU64,
    /// The llama-server it would spawn, described (path, build, backend); read at start and
    /// at each reload, since asking the binary for its version takes a process.
    pub llama_server: parking_lot::RwLock<String>,
    /// What a reload may change while the daemon runs.
    pub live: parking_lot::RwLock<LiveSettings>,
    /// The flags the daemon started with, applied again at a reload.
    pub flags: StartFlags,
    /// Counts `switch --exclusive` requests, so the latest one wins. The lock is held only
    /// to compare and to send the unload messages (channel sends), never while waiting.
    pub exclusive_epoch: parking_lot::Mutex<u64>,
}

impl Shared {
    /// Numbers a new request; later requests get larger numbers.
    pub fn next_job(&self) -> JobId {
        self.jobs.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The number of the last request numbered so far: an unload decided now concerns the
    /// requests up to it.
    pub fn last_job(&self) -> JobId {
        self.jobs.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn describe_llama_server(&self) {
        let description =
            crate::llama_server::describe_llama_server(&self.paths, self.settings.llama_server.as_deref(), None);
        *self.llama_server.write() = description;
    }

    /// Reads the config again: the live settings (budgets, instance limit, default TTL)
    /// change at once; the others are named as needing a new daemon. A bad config changes
    /// nothing and is the error (65).
    pub fn reload(&self) -> Result<String> {
        let config = Config::load(&self.paths.config)?;
        let fresh = Settings::from_config(&config, &self.flags);
        let fresh_live = fresh.live();
        let before = self.settings.describe(&self.live.read());
        let after = fresh.describe(&fresh_live);
        let live_keys = ["memory_budget", "vram_budget", "max_instances", "default_ttl"];
        let mut applied = Vec::new();
        let mut pending = Vec::new();
        for (key, value) in &after {
            if before.get(key) != Some(value) {
                let change = format!("{key} {} -> {value}", before.get(key).map_or("", String::as_str));
                if live_keys.contains(&key.as_str()) {
                    applied.push(change);
                } else {
                    pending.push(change);
                }
            }
        }
        if fresh.llama_server != self.settings.llama_server {
            pending.push("llama_server".to_string());
        }
        *self.live.write() = fresh_live;
        self.describe_llama_server();
        // A bigger budget may let a waiting load in.
        let _ = self.services.scheduler.send(crate::instance::RoomRequest::Replan);
        let mut message = if applied.is_empty() {
            "reloaded the config; nothing the daemon can change while it runs has changed".to_string()
        } else {
            format!("reloaded the config: {}", applied.join(", "))
        };
        if !pending.is_empty() {
            message += &format!("; these need `llmctl shutdown` and a new daemon: {}", pending.join(", "));
        }
        log::info!("{message}");
        Ok(message)
    }
}

/// Runs the daemon until a signal or `llmctl shutdown`.
pub fn run(paths: Paths, settings: Settings, flags: StartFlags) -> Result<()> {
    // Buffers of a megabyte or more (large prompts) are mapped on their own and unmapped
    // when freed. glibc otherwise raises this threshold after the first large free and
    // serves later large buffers from its heap, which it keeps: measured, the daemon stayed
    // 47 MB larger after two 15 MB prompts.
    // SAFETY: mallopt only changes allocator tuning; called before the daemon's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE_BUFFER as libc::c_int);
    }
    paths::check_socket_path(&paths.socket)?;
    let socket_dir = paths.socket.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    paths::ensure_private_dir(&socket_dir)?;
    fs::create_dir_all(&paths.instance_logs_dir)
        .map_err(|e| Error::io(format!("cannot create {}", paths.instance_logs_dir.display()), e))?;

    let _lock = acquire_lock(&paths)?;
    // We hold the lock, so any socket file here is left over from a daemon that died.
    match fs::remove_file(&paths.socket) {
        Ok(()) => log::info!("removed stale socket {}", paths.socket.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("cannot remove stale socket {}", paths.socket.display()), e)),
    }
    let remembered = state::load(&paths.state_file());
    state::kill_leftovers(&remembered.children);
    // Children's sockets sit next to the daemon's, in a directory only this user can enter;
    // any socket in it was left by a daemon that died.
    let children_dir = socket_dir.join(format!(
        "{}.children",
        paths.socket.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    paths::ensure_own_private_dir(&children_dir)?;
    if let Ok(entries) = fs::read_dir(&children_dir) {
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }

    let listener = UnixListener::bind(&paths.socket)
        .map_err(|e| Error::io(format!("cannot listen on {}", paths.socket.display()), e))?;
    fs::set_permissions(&paths.socket, fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("cannot make {} private", paths.socket.display()), e))?;

    let (shutdown_tx, shutdown_rx) = unbounded();
    let (room_tx, room_rx) = unbounded();
    let installed = paths.installed_llama_server();
    let configured = settings.llama_server.clone();
    let services = Services {
        launcher: Launcher::start().map_err(|e| Error::io("cannot start the launcher thread", e))?,
        log_dir: paths.instance_logs_dir.clone(),
        children_dir,
        children_on_tcp: std::env::var("LLMCTL_CHILDREN_ON_TCP").is_ok_and(|value| value == "1"),
        load_timeout: settings.load_timeout,
        http: Timeouts { connect: Duration::from_secs(5), read: settings.token_timeout },
        crash_loop: settings.crash_loop,
        stop_grace: settings.stop_grace,
        kill_now: AtomicBool::new(false),
        scheduler: room_tx,
        events: EventBus::default(),
        gpu: Gpu::default(),
        llama_server: Box::new(move || crate::llama_server::find_binary(configured.as_deref(), None, &installed)),
    };
    // The first GPU reading before any request, so the first load is planned with it.
    services.gpu.sample();
    let live = settings.live();
    let shared = Arc::new(Shared {
        admission: Admission::new(settings.queue_depth),
        paths,
        settings,
        table: InstanceTable::default(),
        services: Arc::new(services),
        started: Instant::now(),
        shutdown: shutdown_tx.clone(),
        shutting_down: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        state_file_error: parking_lot::Mutex::new(None),
        jobs: AtomicU64::new(0),
        live: parking_lot::RwLock::new(live),
        llama_server: parking_lot::RwLock::new(String::new()),
        flags,
        exclusive_epoch: parking_lot::Mutex::new(0),
    });
    restore_instances(&shared, remembered.instances);
    shared.describe_llama_server();
    log::info!(
        "llmctl daemon {} (pid {}) listening on {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        shared.paths.socket.display()
    );

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| Error::io("cannot install signal handlers", e))?;
    let signals_handle = signals.handle();
    let signal_shared = Arc::clone(&shared);
    let signal_thread = spawn_named("signals", move || {
        let mut interrupts = 0;
        for signal in signals.forever() {
            if signal == signal_hook::consts::SIGHUP {
                // The conventional "read your config again".
                if let Err(error) = signal_shared.reload() {
                    log::error!("SIGHUP: the config was not reloaded: {error}");
                }
                continue;
            }
            interrupts += usize::from(signal == signal_hook::consts::SIGINT);
            let request = if interrupts >= 2 { ShutdownRequest::Kill } else { ShutdownRequest::Signal };
            if shutdown_tx.send(request).is_err() {
                break;
            }
        }
    })?;

    let listener_thread = {
        let shared = Arc::clone(&shared);
        spawn_named("listener", move || accept_loop(&shared, listener))?
    };
    let (supervisor_stop, supervisor_stopped) = bounded::<()>(0);
    let supervisor_thread = {
        let shared = Arc::clone(&shared);
        spawn_named("supervisor", move || supervise(&shared, supervisor_stopped))?
    };
    let (scheduler_stop, scheduler_stopped) = bounded::<()>(0);
    let scheduler_thread = {
        let shared = Arc::clone(&shared);
        spawn_named("scheduler", move || scheduler::run(&shared, &room_rx, &scheduler_stopped))?
    };

    let waiters = wait_for_shutdown(&shared, &shutdown_rx);

    // Wake the listener so it sees the flag, then let connections finish their replies.
    let _ = UnixStream::connect(&shared.paths.socket);
    let _ = listener_thread.join();
    let deadline = Instant::now() + Duration::from_secs(3);
    for waiter in waiters {
        let _ = waiter.send(());
    }
    while shared.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    drop(supervisor_stop);
    let _ = supervisor_thread.join();
    drop(scheduler_stop);
    let _ = scheduler_thread.join();
    let _ = state::write(&shared.paths.state_file(), &shared.table);
    signals_handle.close();
    let _ = signal_thread.join();
    let _ = fs::remove_file(&shared.paths.socket);
    // Nothing left in a shared directory: the children's directory (empty by now) and the
    // lock file go too. The lock is still held, so no daemon can be starting on it.
    let _ = fs::remove_dir(&shared.services.children_dir);
    let _ = fs::remove_file(shared.paths.lock_file());
    log::info!("daemon stopped");
    Ok(())
}

/// Blocks until a shutdown is asked for, then stops every instance: gracefully, unless a
/// second SIGINT arrives meanwhile. Returns the clients to tell once the daemon is done.
fn wait_for_shutdown(shared: &Arc<Shared>, requests: &Receiver<ShutdownRequest>) -> Vec<Sender<()>> {
    let mut waiters = Vec::new();
    let note = |request: ShutdownRequest, waiters: &mut Vec<Sender<()>>| match request {
        ShutdownRequest::Signal => {}
        ShutdownRequest::Kill => shared.services.kill_now.store(true, Ordering::SeqCst),
        ShutdownRequest::Client(waiter) => waiters.push(waiter),
    };
    match requests.recv() {
        Ok(request) => note(request, &mut waiters),
        Err(_) => return waiters,
    }
    log::info!("shutting down: stopping every instance");
    shared.shutting_down.store(true, Ordering::SeqCst);
    // Every worker stops its child at once, in parallel; each ends when its child is gone.
    let instances = shared.table.all();
    for instance in &instances {
        let name = instance.with_view(|view| view.spec.name.clone());
        instance.send(Message::Shutdown { message: format!("{name} was stopped: the llmctl daemon is shutting down") });
    }
    let joiner = spawn_named("stop-all", move || {
        for instance in instances {
            instance.join();
        }
    });
    let Ok(joiner) = joiner else { return waiters };
    while !joiner.is_finished() {
        // A second SIGINT meanwhile cuts the grace periods short.
        if let Ok(request) = requests.recv_timeout(Duration::from_millis(10)) {
            note(request, &mut waiters);
        }
    }
    let _ = joiner.join();
    shared.services.events.close();
    while let Ok(request) = requests.try_recv() {
        note(request, &mut waiters);
    }
    waiters
}

/// Recreates, stopped, the instances an earlier daemon knew, with their LRU order and pins.
fn restore_instances(shared: &Shared, remembered: Vec<state::InstanceRecord>) {
    for record in remembered {
        let Ok(metadata) = fs::metadata(&record.model.path) else { continue };
        let Ok(info) = crate::gguf::inspect(&record.model.path) else { continue };
        let stamp = crate::instance::FileStamp::of(&metadata);
        match shared.table.get_or_start(&record.model, info, stamp, &shared.services) {
            Ok(handle) => worker::restore(&handle, record.last_used_ms, record.pinned, record.pinned_until_ms),
            Err(error) => log::warn!("cannot restore {}: {error}", record.model.name),
        }
    }
}

fn acquire_lock(paths: &Paths) -> Result<File> {
    let lock_path = paths.lock_file();
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("cannot open {}", lock_path.display()), e))?;
    let locked =
        sys::try_lock_exclusive(&file).map_err(|e| Error::io(format!("cannot lock {}", lock_path.display()), e))?;
    if !locked {
        let pid = fs::read_to_string(&lock_path).ok().and_then(|s| s.trim().parse().ok());
        return Err(Error::DaemonRunning { socket: paths.socket.clone(), pid });
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(|e| Error::io(format!("cannot write {}", lock_path.display()), e))?;
    Ok(file)
}

/// Connections beyond the queue depth: enough for every stream in flight and control
/// commands next to a full queue.
const CONNECTION_HEADROOM: usize = 256;

/// Tells a client over the connection cap that the daemon is busy, without waiting on it.
fn refuse_connection(stream: &UnixStream, cap: usize) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let error = Error::Busy {
        message: format!("the daemon has {cap} connections open, its limit"),
        retry_after_ms: 1000,
        per_model: false,
    };
    let _ = crate::protocol::write_message(&mut &*stream, &crate::protocol::Response::error(&error));
}

/// How long an idle connection thread waits for another connection before it exits.
const IDLE_CONNECTION_THREAD: Duration = Duration::from_secs(30);

/// Accepts connections and hands each to an idle connection thread, starting a new one
/// when none is idle. Reusing threads saves a thread creation (and its fresh stack's page
/// faults) per request; idle threads exit after a while, so a burst leaves nothing behind.
fn accept_loop(shared: &Arc<Shared>, listener: UnixListener) {
    // A rendezvous channel: a send succeeds only when a thread is waiting for work.
    let (work_tx, work_rx) = bounded::<UnixStream>(0);
    for stream in listener.incoming() {
        if shared.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                log::warn!("accept failed: {error}");
                // Out of descriptors or similar: back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // Each connection holds a thread: beyond the cap, a client is told busy at once
        // instead of growing the daemon without bound.
        let cap = shared.settings.queue_depth.saturating_add(CONNECTION_HEADROOM);
        if shared.connections.load(Ordering::SeqCst) >= cap {
            refuse_connection(&stream, cap);
            continue;
        }
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let stream = match work_tx.try_send(stream) {
            Ok(()) => continue,
            Err(crossbeam_channel::TrySendError::Full(stream)) => stream,
            Err(crossbeam_channel::TrySendError::Disconnected(stream)) => stream,
        };
        let conn_shared = Arc::clone(shared);
        let work_rx = work_rx.clone();
        let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
            let mut next = Some(stream);
            while let Some(stream) = next.take() {
                connection::serve(&conn_shared, stream);
                conn_shared.connections.fetch_sub(1, Ordering::SeqCst);
                next = work_rx.recv_timeout(IDLE_CONNECTION_THREAD).ok();
            }
        });
        if let Err(error) = spawned {
            // The closure (and the stream) were dropped: the client sees the connection close.
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            log::warn!("cannot start a connection thread: {error}");
        }
    }
}

/// The supervisor: a timer, not an owner. It asks idle instances whose TTL ran out to
/// unload (their worker decides whether they still are idle), reads GPU memory in the
/// background, and keeps the state file current.
fn supervise(shared: &Arc<Shared>, stop: Receiver<()>) {
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
            default(SUPERVISOR_TICK) => {}
        }
        if gpu_read_at.elapsed() >= GPU_INTERVAL {
            gpu.sample();
            gpu_read_at = Instant::now();
        }
        for instance in shared.table.all() {
            let default_ttl = shared.live.read().default_ttl;
            if instance.with_view(|view| view.ttl_expired(default_ttl)) {
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

fn spawn_named<F: FnOnce() + Send + 'static>(name: &str, body: F) -> Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .map_err(|e| Error::io(format!("cannot start the {name} thread"), e))
}
