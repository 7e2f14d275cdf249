//! The client end of the socket: connect (starting the daemon when none answers), shake
//! hands, send a request, read responses. [`stream`] reads a generation as it comes, for
//! `run` and `chat`; [`interrupt`] is the one Ctrl-C handler of a foreground command.
//!
//! One daemon serves a user and state directory. When none answers at this command's
//! socket but the state directory's lock names a running daemon at another socket (cron's
//! environment picks another socket than a login shell), the command uses that daemon
//! rather than starting a second one. When the lock names this very socket but nothing
//! answers there (the socket was removed under the daemon), or a daemon answers that it is
//! shutting down, the command waits for that daemon to exit, then goes on as if none ran.

pub(crate) mod interrupt;
pub(crate) mod stream;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::context::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::process;
use crate::protocol::{self, Request, Response, VERSION};

/// How long a client waits for a daemon it started to answer.
const AUTOSTART_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon may take to answer the handshake: it answers at once unless it is
/// stopped (SIGSTOP) or wedged.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a control request (status, stop, shutdown, pin) may go without an answer.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_POLL: Duration = Duration::from_millis(2);
/// How long a client waits for a daemon that is shutting down, or whose socket is gone, to
/// exit. It notices a lost socket within half a second and stops its instances, which takes
/// their stop grace at most.
const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: Vec<u8>,
    socket_path: std::path::PathBuf,
    /// The longest wait for the daemon's next message; none waits for good.
    reply_timeout: Option<Duration>,
    /// The daemon's pid, from its handshake.
    pub daemon_pid: u32,
}

impl Connection {
    /// Bounds every wait for the daemon's next message (none: wait for good, as `events`).
    pub(crate) fn set_reply_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.reader.get_ref().set_read_timeout(timeout).map_err(|e| self.lost(e))?;
        self.reply_timeout = timeout;
        Ok(())
    }

    pub(crate) fn send(&mut self, request: &Request) -> Result<()> {
        let buffer = protocol::encode_line(request).map_err(|e| Error::internal(e.to_string()))?;
        // The daemon refuses longer lines; say so here, naming the size, instead of meeting
        // a closed socket.
        if buffer.len() > protocol::MAX_LINE {
            return Err(Error::InvalidParameter {
                message: format!(
                    "the request is {:.1} MiB, over the {} MiB limit; shorten the prompt or what is piped to stdin",
                    buffer.len() as f64 / (1 << 20) as f64,
                    protocol::MAX_LINE >> 20
                ),
            });
        }
        self.writer.write_all(&buffer).map_err(|e| self.lost(e))
    }

    /// The next response; the end of the stream is an error, since every request ends with
    /// a final response.
    pub(crate) fn recv(&mut self) -> Result<Response> {
        match protocol::read_message(&mut self.reader, &mut self.line) {
            Ok(Some(response)) => Ok(response),
            Ok(None) => {
                Err(self.lost(io::Error::new(io::ErrorKind::UnexpectedEof, "the daemon closed the connection")))
            }
            Err(error) => Err(self.lost(error)),
        }
    }

    /// True when a complete response may already be buffered, so an output flush can wait.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.reader.buffer().is_empty()
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.writer.as_raw_fd()
    }

    fn lost(&self, error: io::Error) -> Error {
        let reason = match (error.kind(), self.reply_timeout) {
            (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(timeout)) => format!(
                "it did not answer within {} s; it may be stopped or wedged (its pid is in {}; `kill -CONT` \
                 resumes a stopped one)",
                timeout.as_secs(),
                lock_file(&self.socket_path).display()
            ),
            _ => error.to_string(),
        };
        Error::DaemonUnavailable { socket: self.socket_path.clone(), reason }
    }

    /// Sends `request` and reads until its final response; a daemon error becomes `Err`.
    pub(crate) fn call(&mut self, request: &Request) -> Result<Response> {
        self.send(request)?;
        loop {
            match self.recv()? {
                Response::Error { kind, message, .. } => return Err(Error::FromDaemon { kind, message }),
                Response::Loading { .. } | Response::Queued { .. } | Response::Log { .. } => continue,
                response => return Ok(response),
            }
        }
    }
}

/// The lock file beside a socket (see `Paths::lock_file`).
fn lock_file(socket: &std::path::Path) -> std::path::PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    std::path::PathBuf::from(name)
}

/// What a command does when the daemon is at its connection cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtCap {
    /// Asks again for up to [`BUSY_PATIENCE`]: a command that asks no model for work. The
    /// cap keeps room for such commands beyond what long requests may hold, and silent
    /// connections give theirs up, so the daemon is full only while a burst of connections
    /// is being sorted out.
    Wait,
    /// Answers busy (75) at once: a request for a model's work (`run`, `embed`, `chat`,
    /// `warm`, `switch`), which a flooded daemon refuses so that its caller backs off.
    Refuse,
}

/// How long a command that waits at the cap keeps asking.
const BUSY_PATIENCE: Duration = Duration::from_secs(12);

/// Connects for a request about `model`. A running daemon checks the model's header
/// itself (and remembers it); when none runs, the header is checked here first, so a
/// wrong or truncated file is refused without starting anything.
pub(crate) fn connect_for(context: &Context, model: &crate::model::ModelSpec, at_cap: AtCap) -> Result<Connection> {
    if let Some(connection) = find_daemon(context, true, at_cap)? {
        return Ok(connection);
    }
    model.check_header()?;
    connect(context)
}

/// Connects to the daemon, starting it first unless autostart is off.
pub(crate) fn connect(context: &Context) -> Result<Connection> {
    match try_connect(context)? {
        Some(connection) => Ok(connection),
        None if context.global.no_autostart => Err(Error::DaemonUnavailable {
            socket: context.paths.socket.clone(),
            reason: "no daemon is running and autostart is off".into(),
        }),
        None => start_daemon(context),
    }
}

/// Connects to a running daemon; `Ok(None)` when none answers. When none answers at this
/// command's socket, a daemon that holds the state directory at another socket is used.
/// A daemon that is shutting down is waited for, and then counts as none.
pub(crate) fn try_connect(context: &Context) -> Result<Option<Connection>> {
    find_daemon(context, true, AtCap::Wait)
}

/// As [`try_connect`], but a daemon that is shutting down is not waited for: the answer is
/// an error of kind [`ErrorKind::ShuttingDown`], for `shutdown`, which has nothing to do
/// then but wait for that daemon to be gone.
pub(crate) fn try_connect_unless_shutting_down(context: &Context) -> Result<Option<Connection>> {
    find_daemon(context, false, AtCap::Wait)
}

fn find_daemon(context: &Context, wait_for_shutdown: bool, at_cap: AtCap) -> Result<Option<Connection>> {
    let wait = |error: &Error| wait_for_shutdown && error.kind() == ErrorKind::ShuttingDown;
    match connect_at(&context.paths.socket, at_cap) {
        Ok(Some(connection)) => return Ok(Some(connection)),
        Ok(None) => {}
        Err(error) if wait(&error) => return wait_for_exit(context, &context.paths.socket, &error.to_string(), at_cap),
        Err(error) => return Err(error),
    }
    let Some((pid, socket)) = daemon_of_state_dir(&context.paths) else { return Ok(None) };
    if socket == context.paths.socket {
        let why = format!(
            "the llmctl daemon (pid {pid}) holds this state directory but no longer answers at {}",
            socket.display()
        );
        return wait_for_exit(context, &socket, &why, at_cap);
    }
    match connect_at(&socket, at_cap) {
        Ok(Some(connection)) => {
            log::info!("using the llmctl daemon (pid {pid}) of this state directory, at {}", socket.display());
            Ok(Some(connection))
        }
        Ok(None) => Err(Error::DaemonRunning { socket, pid: Some(pid) }),
        Err(error) if wait(&error) => wait_for_exit(context, &socket, &error.to_string(), at_cap),
        Err(error) => Err(error),
    }
}

/// Waits for the daemon at `socket`, which is shutting down or whose socket file is gone
/// (`why` says which), to release the state directory; `Ok(None)` once it has, so a fresh
/// daemon can start, and the connection when a daemon answers there meanwhile.
fn wait_for_exit(context: &Context, socket: &std::path::Path, why: &str, at_cap: AtCap) -> Result<Option<Connection>> {
    log::info!("{why}; waiting for it to exit");
    let deadline = Instant::now() + DAEMON_EXIT_TIMEOUT;
    loop {
        match connect_at(socket, at_cap) {
            // Another command started a daemon meanwhile.
            Ok(Some(connection)) => return Ok(Some(connection)),
            Ok(None) if daemon_of_state_dir(&context.paths).is_none() => return Ok(None),
            Ok(None) => {}
            Err(error) if error.kind() == ErrorKind::ShuttingDown => {}
            Err(error) => return Err(error),
        }
        if Instant::now() >= deadline {
            let holder = daemon_of_state_dir(&context.paths).map(|(pid, _)| pid);
            return Err(Error::DaemonUnavailable {
                socket: socket.to_path_buf(),
                reason: format!(
                    "{why}, and it has not exited within {} s{}",
                    DAEMON_EXIT_TIMEOUT.as_secs(),
                    holder.map(|pid| format!("; stop it with `kill {pid}`")).unwrap_or_default()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon that holds the state directory's lock now, and its socket.
pub(crate) fn daemon_of_state_dir(paths: &crate::paths::Paths) -> Option<(u32, std::path::PathBuf)> {
    let lock_path = paths.daemon_lock();
    let file = File::open(&lock_path).ok()?;
    // A lock we can take is nobody's: its daemon is gone.
    if crate::sys::try_lock_shared(&file).ok()? {
        return None;
    }
    let text = fs::read_to_string(&lock_path).ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let socket = std::path::PathBuf::from(lines.next()?);
    Some((pid, socket))
}

/// How long a client keeps trying a daemon that hangs up during the handshake without a
/// word: one that is dying (SIGKILLed, its listener not yet closed) or starting to shut
/// down. Once its socket refuses connections, the caller starts a fresh daemon.
const HUNG_UP_RETRY: Duration = Duration::from_secs(2);

/// What one handshake came to.
enum Handshake {
    Done(Option<Connection>),
    /// The daemon closed the connection (or reset it) before it answered.
    HungUp(io::Error),
}

/// Connects and shakes hands at `socket_path`; `Ok(None)` when nothing listens there.
/// A daemon at its connection cap answers busy at the handshake: `at_cap` says whether
/// to ask again.
fn connect_at(socket_path: &std::path::Path, at_cap: AtCap) -> Result<Option<Connection>> {
    let start = Instant::now();
    loop {
        match handshake(socket_path) {
            Ok(Handshake::Done(connection)) => return Ok(connection),
            Ok(Handshake::HungUp(error)) if start.elapsed() >= HUNG_UP_RETRY => {
                return Err(Error::DaemonUnavailable {
                    socket: socket_path.to_path_buf(),
                    reason: format!("it closed every connection before answering ({error})"),
                })
            }
            Ok(Handshake::HungUp(_)) => std::thread::sleep(Duration::from_millis(20)),
            Err(error)
                if error.kind() == ErrorKind::Busy && at_cap == AtCap::Wait && start.elapsed() < BUSY_PATIENCE =>
            {
                log::debug!("{error}; asking again");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(error) => return Err(error),
        }
    }
}

fn handshake(socket_path: &std::path::Path) -> Result<Handshake> {
    let socket_path = &socket_path.to_path_buf();
    crate::paths::check_socket_path(socket_path)?;
    let stream = match UnixStream::connect(socket_path) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Ok(Handshake::Done(None))
        }
        Err(e) => return Err(Error::DaemonUnavailable { socket: socket_path.clone(), reason: e.to_string() }),
    };
    let reader_stream = stream
        .try_clone()
        .map_err(|e| Error::DaemonUnavailable { socket: socket_path.clone(), reason: e.to_string() })?;
    let mut connection = Connection {
        reader: BufReader::with_capacity(1 << 16, reader_stream),
        writer: stream,
        line: Vec::with_capacity(256),
        socket_path: socket_path.clone(),
        reply_timeout: None,
        daemon_pid: 0,
    };
    connection.set_reply_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let _ = connection.writer.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    // A daemon that refuses us (another user's, another protocol, its connection cap)
    // answers and hangs up without reading, so our hello may meet a closed socket: its
    // answer still explains.
    let sent = protocol::send_message(&mut connection.writer, &Request::Hello { version: VERSION });
    let hung_up = |error: &io::Error| {
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
        )
    };
    let answer = match protocol::read_message::<Response>(&mut connection.reader, &mut connection.line) {
        Ok(Some(answer)) => answer,
        Ok(None) => {
            return Ok(Handshake::HungUp(io::Error::new(io::ErrorKind::UnexpectedEof, "closed without an answer")))
        }
        Err(error) if hung_up(&error) => return Ok(Handshake::HungUp(error)),
        Err(error) => return Err(connection.lost(error)),
    };
    match (answer, sent) {
        (Response::Error { kind, message, .. }, _) => Err(Error::FromDaemon { kind, message }),
        (_, Err(error)) if hung_up(&error) => Ok(Handshake::HungUp(error)),
        (_, Err(error)) => Err(connection.lost(error)),
        (Response::Hello { pid, .. }, Ok(())) => {
            connection.daemon_pid = pid;
            // Commands that wait longer (run, warm, switch, events) say so themselves.
            connection.set_reply_timeout(Some(CONTROL_TIMEOUT))?;
            let _ = connection.writer.set_write_timeout(Some(CONTROL_TIMEOUT));
            Ok(Handshake::Done(Some(connection)))
        }
        (other, Ok(())) => Err(Error::internal(format!("unexpected handshake answer {other:?}"))),
    }
}

fn start_daemon(context: &Context) -> Result<Connection> {
    let paths = &context.paths;
    // A daemon would refuse a bad config or an unsafe socket directory and exit; say what
    // is wrong here, as it is, rather than after waiting for an answer.
    context.config()?;
    if let Some(dir) = paths.socket.parent() {
        crate::paths::ensure_private_dir(dir)?;
    }
    crate::paths::create_private_dirs(&paths.state_dir)
        .map_err(|e| Error::io(format!("cannot create {}", paths.state_dir.display()), e))?;
    // One command of a burst starts the daemon; the others wait here and find it. Were each
    // to start one, a latecomer that reached the state directory's lock after the first had
    // shut down would become a daemon nobody asked for.
    let _starting = take_start_lock(paths);
    if let Some(connection) = try_connect(context)? {
        return Ok(connection);
    }
    let log_path = paths.daemon_log();
    let log =
        crate::paths::open_log(&log_path).map_err(|e| Error::io(format!("cannot open {}", log_path.display()), e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot find the llmctl executable", e))?;
    // Replaced while this process ran (an upgrade): start the binary that is there now.
    let exe = match exe.to_str().and_then(|path| path.strip_suffix(" (deleted)")) {
        Some(path) => std::path::PathBuf::from(path),
        None => exe,
    };
    let mut command = Command::new(exe);
    command.arg("daemon").arg("--socket").arg(&paths.socket).arg("--config").arg(&paths.config);
    if let Some(binary) = &context.global.llama_server {
        command.arg("--llama-server").arg(binary);
    }
    let log_err = log.try_clone().map_err(|e| Error::io("cannot open the daemon log", e))?;
    command.stdin(Stdio::null()).stdout(log).stderr(log_err);
    let mut daemon = process::spawn_detached(command).map_err(|e| Error::DaemonUnavailable {
        socket: paths.socket.clone(),
        reason: format!("cannot start it: {e}"),
    })?;
    log::info!("started the daemon, pid {}", daemon.id());

    let deadline = Instant::now() + AUTOSTART_TIMEOUT;
    let mut exited_at = None;
    loop {
        if let Some(connection) = try_connect(context)? {
            return Ok(connection);
        }
        // A daemon that lost the start race to another one exits at once while the winner
        // comes up, so an exit is only final when nothing answers shortly after it.
        if exited_at.is_none() && matches!(daemon.try_wait(), Ok(Some(status)) if !status.success()) {
            exited_at = Some(Instant::now());
        }
        let gave_up = exited_at.is_some_and(|at| at.elapsed() > Duration::from_millis(500));
        if gave_up || Instant::now() >= deadline {
            return Err(daemon_failed(context, &log_path, gave_up));
        }
        std::thread::sleep(CONNECT_POLL);
    }
}

/// The lock a command holds while it starts the daemon, released when dropped. Waited for
/// as long as a start may take; without it (a read-only state directory, a holder that is
/// stopped, something other than a file in its place), the command starts a daemon anyway,
/// and the daemons' own lock settles which one serves.
fn take_start_lock(paths: &crate::paths::Paths) -> Option<File> {
    // Opened as logs are: never through a symbolic link, never blocking on a FIFO, only a
    // regular file of its own.
    let file = crate::paths::open_log(&paths.state_dir.join("start.lock")).ok()?;
    let deadline = Instant::now() + AUTOSTART_TIMEOUT;
    loop {
        match crate::sys::try_lock_exclusive(&file) {
            Ok(true) => return Some(file),
            Ok(false) if Instant::now() < deadline => std::thread::sleep(CONNECT_POLL),
            _ => return None,
        }
    }
}

fn daemon_failed(context: &Context, log_path: &std::path::Path, exited: bool) -> Error {
    let tail = File::open(log_path)
        .map(|file| {
            let lines: Vec<String> = BufReader::new(file).lines().map_while(|l| l.ok()).collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        })
        .unwrap_or_default();
    // A daemon that cannot write its log cannot say why it stopped; a full disk is the
    // usual reason, and it is checked here.
    let state_dir = &context.paths.state_dir;
    if tail.trim().is_empty() && crate::paths::disk_is_full(state_dir) {
        return Error::DaemonUnavailable {
            socket: context.paths.socket.clone(),
            reason: format!(
                "the daemon {} at start: the disk holding {} is full, so it can write neither its lock nor its \
                 log; free some space",
                if exited { "exited" } else { "did not answer" },
                state_dir.display()
            ),
        };
    }
    Error::DaemonUnavailable {
        socket: context.paths.socket.clone(),
        reason: if exited {
            format!("the daemon exited at start; its log ({}) ends with:\n{tail}", log_path.display())
        } else {
            format!(
                "the daemon did not answer within {} s; its log ({}) ends with:\n{tail}",
                AUTOSTART_TIMEOUT.as_secs(),
                log_path.display()
            )
        },
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;

    /// A daemon at its connection cap for its first `full_for` connections (each is told
    /// busy and hung up, as the listener does), which then shakes hands; the number of
    /// connections it saw.
    fn daemon_full_for(socket: &std::path::Path, full_for: usize) -> thread::JoinHandle<usize> {
        let listener = UnixListener::bind(socket).unwrap();
        thread::spawn(move || {
            let busy = Error::Busy {
                message: "the daemon has 321 connections open, its limit".into(),
                retry_after_ms: 1000,
                per_model: false,
            };
            for seen in 1.. {
                let (stream, _) = listener.accept().unwrap();
                let mut hello = String::new();
                BufReader::new(&stream).read_line(&mut hello).unwrap();
                let answer = if seen > full_for {
                    Response::Hello { version: VERSION, pid: std::process::id() }
                } else {
                    Response::error(&busy)
                };
                (&stream).write_all(&protocol::encode_line(&answer).unwrap()).unwrap();
                if seen > full_for {
                    return seen;
                }
            }
            unreachable!()
        })
    }

    #[test]
    fn a_command_that_asks_no_model_for_work_waits_for_room_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let daemon = daemon_full_for(&socket, 3);
        let connection = connect_at(&socket, AtCap::Wait).unwrap().expect("a connection once there is room");
        assert_eq!(connection.daemon_pid, std::process::id());
        assert_eq!(daemon.join().unwrap(), 4, "three busy answers, then the handshake");
    }

    #[test]
    fn a_request_for_work_is_told_busy_at_once_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let _daemon = daemon_full_for(&socket, 1);
        let error = connect_at(&socket, AtCap::Refuse).err().expect("busy");
        assert_eq!(error.kind(), ErrorKind::Busy);
        assert!(error.to_string().contains("connections open"), "{error}");
    }
}
