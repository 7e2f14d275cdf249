//! HTTP to a llama-server child over its Unix socket: a ureq connector that ignores the
//! URL's host and connects to one socket path.
//!
//! Children listen on a socket in llmctl's private runtime directory (0700), so no other
//! user and no web page can reach them: there is no TCP port at all. ureq 3 builds its
//! transports from connectors (`Agent::with_parts`); this one stands where `TcpConnector`
//! would, and the rest of ureq (HTTP/1.1, pooling, timeouts) is unchanged.
//!
//! The connector ignores the address, so [`NoLookup`] gives ureq one without asking the
//! system resolver (which reads `/etc/hosts` and `nsswitch.conf` on every request).
//!
//! A request can be given up while it waits for an answer: [`with_cancel`] sets, for the
//! calling thread, a check that reads ask in short steps. ureq runs a request on the calling
//! thread, so this works on pooled connections too; a cancelled read fails with
//! [`Cancelled`], a type, which closes the connection and makes llama-server stop. The same
//! transport runs over TCP ([`TcpConnector`], for remote servers and children on TCP, TLS
//! on top), so their requests are given up the same way.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, Transport,
};

/// A resolver that looks nothing up: every name is 127.0.0.1 on the URL's port, which the
/// Unix connector never uses.
#[derive(Debug, Default)]
pub(crate) struct NoLookup;

impl ureq::unversioned::resolver::Resolver for NoLookup {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let mut addresses = self.empty();
        let port = uri.port_u16().unwrap_or(80);
        addresses.push(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        Ok(addresses)
    }
}

/// Asked while a read waits: true when the request should be given up (its client left).
pub(crate) type Cancel = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

/// How often a read with a cancel check asks it.
const CANCEL_CHECK: Duration = Duration::from_millis(100);

thread_local! {
    /// The cancel check of the request this thread is making, if any.
    static CANCEL: RefCell<Option<Cancel>> = const { RefCell::new(None) };
}

/// Runs `work` (a request to a child) with `cancel` asked while it waits for an answer.
pub(crate) fn with_cancel<T>(cancel: Option<Cancel>, work: impl FnOnce() -> T) -> T {
    let previous = CANCEL.with(|slot| slot.replace(cancel));
    let result = work();
    CANCEL.with(|slot| *slot.borrow_mut() = previous);
    result
}

fn current_cancel() -> Option<Cancel> {
    CANCEL.with(|slot| slot.borrow().clone())
}

/// The error of a read given up because its client left.
#[derive(Debug)]
pub(crate) struct Cancelled;

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the client went away")
    }
}

impl std::error::Error for Cancelled {}

/// True when `error` is, or wraps, a [`Cancelled`] read.
pub(crate) fn is_cancelled(error: &io::Error) -> bool {
    match error.get_ref() {
        Some(inner) if inner.is::<Cancelled>() => true,
        Some(inner) => match inner.downcast_ref::<ureq::Error>() {
            Some(ureq::Error::Io(io)) => is_cancelled(io),
            _ => false,
        },
        None => false,
    }
}

/// Connects every request to the socket at `path`.
pub struct UnixConnector {
    pub path: PathBuf,
}

impl fmt::Debug for UnixConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixConnector").field("path", &self.path).finish()
    }
}

impl<In: Transport> Connector<In> for UnixConnector {
    type Out = UnixTransport;

    fn connect(&self, details: &ConnectionDetails, _chained: Option<In>) -> Result<Option<UnixTransport>, ureq::Error> {
        let stream = UnixStream::connect(&self.path)?;
        Ok(Some(SocketTransport::new(stream, details)))
    }
}

/// Connects over TCP to the resolved address, as ureq's own connector does, with reads
/// that ask the cancel check: a remote server's request is given up when its client
/// leaves, as a child's is. After a CONNECT proxy (a transport already made) it stands
/// aside; TLS goes on top of it.
#[derive(Debug, Default)]
pub struct TcpConnector;

impl<In: Transport> Connector<In> for TcpConnector {
    type Out = Either<In, SocketTransport<std::net::TcpStream>>;

    fn connect(&self, details: &ConnectionDetails, chained: Option<In>) -> Result<Option<Self::Out>, ureq::Error> {
        if let Some(chained) = chained {
            return Ok(Some(Either::A(chained)));
        }
        let timeout = details.timeout.after;
        let mut last_error = None;
        for address in &details.addrs {
            let connected = if timeout.is_not_happening() {
                std::net::TcpStream::connect(address)
            } else {
                std::net::TcpStream::connect_timeout(address, (*timeout).max(Duration::from_millis(1)))
            };
            match connected {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(Some(Either::B(SocketTransport::new(stream, details))));
                }
                Err(error) if error.kind() == io::ErrorKind::TimedOut => {
                    return Err(ureq::Error::Timeout(details.timeout.reason))
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::new(io::ErrorKind::ConnectionRefused, "no address")).into())
    }
}

/// A stream socket a [`SocketTransport`] can run over: a child's Unix socket, or TCP to a
/// remote server (or a child on TCP).
pub trait Socket: Read + Write + Send + Sync + 'static {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()>;
}

impl Socket for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        UnixStream::set_nonblocking(self, nonblocking)
    }
}

impl Socket for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, timeout)
    }
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        std::net::TcpStream::set_nonblocking(self, nonblocking)
    }
}

/// ureq's transport over a [`Socket`], whose reads ask the thread's cancel check.
pub struct SocketTransport<S> {
    stream: S,
    buffers: LazyBuffers,
    /// The timeouts last set on the socket, to skip a syscall when they do not change.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

pub type UnixTransport = SocketTransport<UnixStream>;

impl<S: Socket> SocketTransport<S> {
    pub(crate) fn new(stream: S, details: &ConnectionDetails) -> SocketTransport<S> {
        let config = details.config;
        let buffers = LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size());
        SocketTransport { stream, buffers, read_timeout: None, write_timeout: None }
    }
}

impl<S> fmt::Debug for SocketTransport<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketTransport").finish()
    }
}

/// The socket timeout for a ureq deadline: none when it never happens, and never zero
/// (which the socket would take as "no timeout").
fn socket_timeout(timeout: &NextTimeout) -> Option<Duration> {
    if timeout.after.is_not_happening() {
        None
    } else {
        Some(settled(*timeout.after))
    }
}

/// A timeout as the socket is given it: never zero, and from [`WHOLE_SECONDS_FROM`] up
/// rounded up to whole seconds. ureq's per-read deadline starts again at every read, so its
/// exact value differs by microseconds each time; rounded, it stays the same, and the
/// socket's timeout is set once rather than before every chunk of an answer.
fn settled(timeout: Duration) -> Duration {
    if timeout >= WHOLE_SECONDS_FROM {
        Duration::from_secs(timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0))
    } else {
        timeout.max(Duration::from_millis(1))
    }
}

/// Timeouts this long or longer are kept to whole seconds (a second late at most, on a
/// timeout of minutes); shorter ones, the probes', are exact.
const WHOLE_SECONDS_FROM: Duration = Duration::from_secs(2);

fn timed_out(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl<S: Socket> Transport for SocketTransport<S> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        let wanted = socket_timeout(&timeout);
        if wanted != self.write_timeout {
            self.stream.set_write_timeout(wanted)?;
            self.write_timeout = wanted;
        }
        let output = &self.buffers.output()[..amount];
        match self.stream.write_all(output) {
            Ok(()) => Ok(()),
            Err(error) if timed_out(&error) => Err(ureq::Error::Timeout(timeout.reason)),
            Err(error) => Err(error.into()),
        }
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        let wanted = socket_timeout(&timeout);
        let cancel = current_cancel();
        let started = std::time::Instant::now();
        let amount = loop {
            // With a cancel check, wait in steps of CANCEL_CHECK up to the real timeout.
            let left = wanted.map(|wanted| settled(wanted.saturating_sub(started.elapsed())));
            let step = match (&cancel, left) {
                (Some(_), Some(left)) => Some(left.min(CANCEL_CHECK)),
                (Some(_), None) => Some(CANCEL_CHECK),
                (None, left) => left,
            };
            if step != self.read_timeout {
                self.stream.set_read_timeout(step)?;
                self.read_timeout = step;
            }
            match self.stream.read(self.buffers.input_append_buf()) {
                Ok(amount) => break amount,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if timed_out(&error) => {
                    if cancel.as_ref().is_some_and(|cancel| cancel()) {
                        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, Cancelled).into());
                    }
                    if wanted.is_some_and(|wanted| started.elapsed() >= wanted) {
                        return Err(ureq::Error::Timeout(timeout.reason));
                    }
                }
                Err(error) => return Err(error.into()),
            }
        };
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        // A pooled connection is usable when the server has neither closed it nor sent
        // anything unasked: a non-blocking read must find nothing yet.
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let open = matches!(self.stream.read(&mut byte), Err(error) if error.kind() == io::ErrorKind::WouldBlock);
        open && self.stream.set_nonblocking(false).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_timeouts_are_whole_seconds_so_the_socket_is_set_once() {
        // A per-read deadline read a few microseconds apart gives the same socket timeout.
        let first = settled(Duration::from_secs(300) - Duration::from_micros(3));
        let later = settled(Duration::from_secs(300) - Duration::from_micros(250));
        assert_eq!(first, Duration::from_secs(300));
        assert_eq!(first, later);
        assert_eq!(settled(Duration::from_secs(300)), Duration::from_secs(300), "never rounded past a whole second");
        assert_eq!(settled(Duration::from_millis(2500)), Duration::from_secs(3));
        assert_eq!(settled(Duration::from_millis(1500)), Duration::from_millis(1500), "short ones are exact");
        assert_eq!(settled(Duration::ZERO), Duration::from_millis(1), "never zero, which means none");
    }

    #[test]
    fn cancellation_is_a_type_found_through_ureq() {
        let cancelled = io::Error::new(io::ErrorKind::ConnectionAborted, Cancelled);
        assert!(is_cancelled(&cancelled));
        let through_ureq =
            io::Error::other(ureq::Error::Io(io::Error::new(io::ErrorKind::ConnectionAborted, Cancelled)));
        assert!(is_cancelled(&through_ureq));
        let other = io::Error::new(io::ErrorKind::ConnectionAborted, "the client went away");
        assert!(!is_cancelled(&other), "a message that reads the same is not a cancellation");
    }

    #[test]
    fn the_cancel_check_is_per_thread_and_restored() {
        let cancel: Cancel = std::sync::Arc::new(|| true);
        with_cancel(Some(cancel), || {
            assert!(current_cancel().is_some());
            std::thread::spawn(|| assert!(current_cancel().is_none())).join().unwrap();
            with_cancel(None, || assert!(current_cancel().is_none()));
            assert!(current_cancel().is_some(), "restored after the inner call");
        });
        assert!(current_cancel().is_none());
    }
}
