//! The daemon: owns the socket, the instance table, the HTTP listeners and, through the
//! instance workers, every llama-server child.
//!
//! Reading in order: [`shared`] (what the threads share), [`listener`] and [`connection`]
//! (the Unix socket), [`handlers`] (its requests by family), [`serve`] (the HTTP API) and
//! [`listeners`] (its open addresses), [`work`] and [`admission`] (how any request gets a
//! slot) with [`queue`] (the bounded admission queue) and [`peer`] (the client's end of a
//! connection), [`scheduler`] (who holds memory), [`supervisor`] (TTLs, GPU readings, the
//! state file), [`state`], [`report`] (the status snapshot) and [`metrics`].
//!
//! Threads, each named; [`run`] joins all but the connection threads, which it waits for:
//! - `signals`: SIGINT/SIGTERM → the shutdown channel (a second SIGINT kills at once);
//!   SIGHUP reloads the config, on a thread of its own so no child can make it deaf;
//! - `listener`: accepts Unix connections and hands each to a `conn` thread;
//! - `http-listener` and `http`: one accept thread per HTTP listener, and its workers;
//! - `instance-N`: one worker per instance, the only owner of its child (see `instance`);
//! - `scheduler`: the only place that grants memory and picks instances to unload;
//! - `supervisor`: a timer for TTL expiry, GPU readings and the state file;
//! - `launcher`: forks children (see `process::launcher` for why one thread does it).
//!
//! Startup takes two exclusive locks: one beside the socket, so a second daemon on the same
//! socket refuses to start and a socket left by a crashed daemon is known to be stale; and
//! one in the state directory, so a second daemon of the same user and state (another
//! socket, as cron's environment picks) refuses too, naming the running one, and never
//! takes that daemon's children for leftovers.

pub(crate) mod admission;
pub(crate) mod connection;
pub(crate) mod handlers;
pub(crate) mod listener;
pub(crate) mod listeners;
pub(crate) mod metrics;
pub(crate) mod peer;
pub(crate) mod queue;
pub(crate) mod report;
pub(crate) mod scheduler;
pub(crate) mod serve;
pub(crate) mod shared;
pub(crate) mod state;
pub(crate) mod supervisor;
pub(crate) mod work;

use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::backend::client::Timeouts;
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::instance::cache_store::CacheStore;
use crate::instance::worker::{self, Services};
use crate::instance::Message;
use crate::memory::Gpu;
use crate::paths::{self, Paths};
use crate::process::launcher::Launcher;
use crate::settings::{Settings, StartFlags};
use crate::sys;
use shared::{Shared, ShutdownRequest};

/// Allocations at least this large get their own mapping (see `run`).
const LARGE_BUFFER: usize = 1 << 20;
/// Free memory at the top of a heap that glibc keeps instead of giving back (see `run`).
const KEPT_FREE_HEAP: usize = 1 << 20;

/// Runs the daemon until a signal or `llmctl shutdown`.
pub(crate) fn run(paths: Paths, settings: Settings, flags: StartFlags) -> Result<()> {
    // Buffers of a megabyte or more (large prompts) are mapped on their own and unmapped
    // when freed. glibc otherwise raises this threshold after the first large free and
    // serves later large buffers from its heap, which it keeps: measured, the daemon stayed
    // 47 MB larger after two 15 MB prompts. Below that, glibc gives free memory at the top of
    // a heap back as soon as it passes 128 KiB, and a request's buffers (the connection's,
    // the child's) are about that much: every request then faulted its pages in again and
    // zeroed them (perf: a third of a connection thread's time); up to a megabyte is kept.
    // SAFETY: mallopt only changes allocator tuning; called before the daemon's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE_BUFFER as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEPT_FREE_HEAP as libc::c_int);
    }
    paths::check_socket_path(&paths.socket)?;
    let socket_dir = paths.socket.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    paths::ensure_private_dir(&socket_dir)?;
    paths::create_private_dirs(&paths.instance_logs_dir)
        .map_err(|e| Error::io(format!("cannot create {}", paths.instance_logs_dir.display()), e))?;

    let _state_lock = OwnLock::take(&paths.daemon_lock(), &paths)?;
    let _socket_lock = OwnLock::take(&paths.lock_file(), &paths)?;
    // We hold the lock, so a socket file here is left over from a daemon that died; only a
    // socket is ever removed.
    paths::remove_stale_socket(&paths.socket)
        .map_err(|reason| Error::DaemonUnavailable { socket: paths.socket.clone(), reason })?;
    let remembered = state::load(&paths.state_file());
    state::kill_leftovers(&remembered);
    // Children's sockets sit next to the daemon's, in a directory only this user can enter;
    // any socket in it was left by a daemon that died.
    let children_dir = socket_dir.join(format!(
        "{}.children",
        paths.socket.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    paths::ensure_own_private_dir(&children_dir)?;
    if let Ok(entries) = fs::read_dir(&children_dir) {
        for entry in entries.flatten() {
            let _ = paths::remove_stale_socket(&entry.path());
        }
    }

    let listener = UnixListener::bind(&paths.socket)
        .map_err(|e| Error::io(format!("cannot listen on {}", paths.socket.display()), e))?;
    fs::set_permissions(&paths.socket, fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("cannot make {} private", paths.socket.display()), e))?;
    let listener_fd = listener.as_raw_fd();
    let socket_watch = supervisor::SocketWatch::new(&paths.socket)
        .map_err(|e| Error::io(format!("cannot read {}", paths.socket.display()), e))?;

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
        kill_now: Default::default(),
        scheduler: room_tx,
        events: EventBus::default(),
        gpu: Gpu::default(),
        llama_server: Box::new(move || crate::llama_server::find_binary(configured.as_deref(), None, &installed)),
        room: Default::default(),
        mark_prefix: format!(
            "{}-{}",
            std::process::id(),
            crate::process::start_time(std::process::id()).unwrap_or_default()
        ),
        caches: CacheStore::open(
            paths.prompt_cache_dir(),
            settings.live().cache_budget_bytes(),
            settings.cache_timeout,
        ),
    };
    // The first GPU reading before any request, so the first load is planned with it.
    services.gpu.sample();
    let shared = Arc::new(Shared::new(paths, settings, flags, services, shutdown_tx.clone()));
    restore_instances(&shared, remembered.instances);
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
                // The conventional "read your config again", off this thread: a reload asks
                // llama-server for its version, and a binary that hangs must not make the
                // daemon deaf to SIGTERM.
                let reload_shared = Arc::clone(&signal_shared);
                let _ = spawn_named("reload", move || {
                    if let Err(error) = reload_shared.reload() {
                        log::error!("SIGHUP: the config was not reloaded: {error}");
                    }
                });
                continue;
            }
            interrupts += usize::from(signal == signal_hook::consts::SIGINT);
            let request = if interrupts >= 2 { ShutdownRequest::Kill } else { ShutdownRequest::Signal };
            if shutdown_tx.send(request).is_err() {
                break;
            }
        }
    })?;

    let (supervisor_stop, supervisor_stopped) = bounded::<()>(0);
    let supervisor_thread = {
        let shared = Arc::clone(&shared);
        spawn_named("supervisor", move || supervisor::run(&shared, supervisor_stopped, socket_watch))?
    };
    let (scheduler_stop, scheduler_stopped) = bounded::<()>(0);
    let scheduler_thread = {
        let shared = Arc::clone(&shared);
        spawn_named("scheduler", move || scheduler::run(&shared, &room_rx, &scheduler_stopped))?
    };
    {
        // The description asks the binary for its version: not on the way to answering.
        let shared = Arc::clone(&shared);
        let _ = spawn_named("describe", move || shared.describe_llama_server());
    }
    // Before the socket answers: a command that started the daemon finds the config's
    // listeners open once it is answered.
    open_configured_listeners(&shared);
    {
        // Not joined: its threads serve connections, the shutdown request's among them;
        // the count of open connections is what the shutdown waits for.
        let shared = Arc::clone(&shared);
        spawn_named("listener", move || listener::accept_loop(&shared, listener))?;
    }

    let waiters = wait_for_shutdown(&shared, &shutdown_rx);

    // Wake every thread in `accept` so it sees the flag (whatever happened to the socket's
    // file), then let connections finish their replies.
    shared.listeners.close_all();
    sys::shutdown_socket(listener_fd);
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
    shared.write_state();
    signals_handle.close();
    let _ = signal_thread.join();
    let _ = paths::remove_stale_socket(&shared.paths.socket);
    // Nothing left in a shared directory: the children's directory (empty by now). The lock
    // files go when their guards drop, still held, so no daemon can be starting on them.
    let _ = fs::remove_dir(&shared.services.children_dir);
    log::info!("daemon stopped");
    Ok(())
}

/// The config's `listen` addresses, served from the start; one that cannot be opened is
/// logged and shown by `status`, and the daemon serves on.
fn open_configured_listeners(shared: &Arc<Shared>) {
    let Ok(config) = shared.config.get() else { return };
    if config.listen.is_empty() {
        return;
    }
    let api_key = match &config.api_key_file {
        Some(path) => match paths::read_key_file(path) {
            Ok(key) => Some(key.trim().to_string()),
            Err(error) => {
                log::error!("cannot read api_key_file {}: {error}; not listening", path.display());
                return;
            }
        },
        None => std::env::var("LLMCTL_API_KEY").ok().filter(|key| !key.is_empty()),
    };
    for address in &config.listen {
        if let Err(error) = serve::open(shared, address, api_key.clone(), None) {
            log::error!("cannot serve on {address} (listen in the config): {error}");
        }
    }
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
    shared.listeners.close_all();
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

/// Recreates, stopped, the instances an earlier daemon knew, with their LRU order and pins:
/// the pinned ones and the most recently used of the rest, as many as are kept stopped.
fn restore_instances(shared: &Shared, mut remembered: Vec<state::InstanceRecord>) {
    let now_ms = crate::instance::view::millis_since_epoch(std::time::SystemTime::now());
    let pinned =
        |record: &state::InstanceRecord| record.pinned || record.pinned_until_ms.is_some_and(|until| until > now_ms);
    remembered.sort_by_key(|record| (!pinned(record), std::cmp::Reverse(record.last_used_ms)));
    let kept = remembered.iter().filter(|record| pinned(record)).count() + crate::instance::table::KEPT_STOPPED;
    remembered.truncate(kept);
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

/// An exclusive lock held in a file of llmctl's own, naming this daemon (pid, socket): the
/// file is created if missing, and an existing one is used only when it is a regular file
/// of this user holding nothing but what a daemon writes there. Released and removed (if
/// it still names this daemon) when dropped.
struct OwnLock {
    file: File,
    path: PathBuf,
}

impl OwnLock {
    fn take(path: &Path, paths: &Paths) -> Result<OwnLock> {
        use std::os::unix::fs::MetadataExt;
        // A lock taken on a file another daemon removed a moment before is no lock: take it
        // again on the file that is there now.
        for _ in 0..3 {
            let file = OwnLock::take_once(path, paths)?;
            let same = fs::metadata(path)
                .ok()
                .zip(file.metadata().ok())
                .is_some_and(|(there, held)| there.ino() == held.ino() && there.dev() == held.dev());
            if same {
                return Ok(OwnLock { file, path: path.to_path_buf() });
            }
        }
        Err(Error::DaemonUnavailable {
            socket: paths.socket.clone(),
            reason: format!("{} keeps being replaced while llmctl takes it", path.display()),
        })
    }

    fn take_once(path: &Path, paths: &Paths) -> Result<File> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
        let not_ours = |what: String| Error::DaemonUnavailable {
            socket: paths.socket.clone(),
            reason: format!(
                "{} {what}, so it is not llmctl's lock file and is left alone; choose another path with --socket or \
                 LLMCTL_SOCKET",
                path.display()
            ),
        };
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => not_ours("is a symbolic link".into()),
                _ => Error::io(format!("cannot open {}", path.display()), e),
            })?;
        let metadata = file.metadata().map_err(|e| Error::io(format!("cannot inspect {}", path.display()), e))?;
        if !metadata.is_file() {
            return Err(not_ours(format!("is {}", paths::describe_file_type(&metadata.file_type()))));
        }
        if metadata.uid() != sys::current_uid() {
            return Err(not_ours(format!("belongs to uid {}", metadata.uid())));
        }
        let mut contents = String::new();
        if metadata.len() > 4096 || file.read_to_string(&mut contents).is_err() || !is_lock_text(&contents) {
            return Err(not_ours("holds something else".into()));
        }
        // A client asking whether a daemon holds the lock takes it shared for a moment; a
        // daemon starting just then must not read that as another daemon. A real one holds
        // it for good, so a lock still held after a short while is one.
        let deadline = Instant::now() + LOCK_PROBE_WAIT;
        let locked = loop {
            let locked =
                sys::try_lock_exclusive(&file).map_err(|e| Error::io(format!("cannot lock {}", path.display()), e))?;
            if locked || Instant::now() >= deadline {
                break locked;
            }
            thread::sleep(Duration::from_millis(5));
        };
        if !locked {
            // What the holder wrote after it took the lock, if it did.
            contents.clear();
            let _ = file.rewind().and_then(|()| file.read_to_string(&mut contents));
            let mut lines = contents.lines();
            let pid = lines.next().and_then(|line| line.trim().parse().ok());
            let socket = lines.next().map(PathBuf::from).unwrap_or_else(|| paths.socket.clone());
            return Err(Error::DaemonRunning { socket, pid });
        }
        let text = format!("{}\n{}\n", std::process::id(), paths.socket.display());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(text.as_bytes()))
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        Ok(file)
    }
}

/// How long a starting daemon waits for a lock a client's probe may hold for a moment.
const LOCK_PROBE_WAIT: Duration = Duration::from_millis(500);

/// What a daemon writes in its lock files: its pid, then its socket; or nothing yet.
fn is_lock_text(contents: &str) -> bool {
    let mut lines = contents.lines();
    match lines.next() {
        None => true,
        Some(pid) => pid.trim().parse::<u32>().is_ok() && lines.count() <= 1,
    }
}

impl Drop for OwnLock {
    fn drop(&mut self) {
        let mut contents = String::new();
        let _ = self.file.rewind();
        let _ = self.file.read_to_string(&mut contents);
        if contents.lines().next().and_then(|pid| pid.trim().parse::<u32>().ok()) == Some(std::process::id()) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn spawn_named<F: FnOnce() + Send + 'static>(name: &str, body: F) -> Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .map_err(|e| Error::io(format!("cannot start the {name} thread"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_files_hold_a_pid_and_a_socket_or_nothing() {
        for good in ["", "123\n", "123\n/run/user/1/llmctl/llmctl.sock\n"] {
            assert!(is_lock_text(good), "{good:?}");
        }
        for bad in ["[package]\nname = \"x\"\n", "hello", "1\n2\n3\n"] {
            assert!(!is_lock_text(bad), "{bad:?}");
        }
    }
}
