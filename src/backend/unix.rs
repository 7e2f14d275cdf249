//! HTTP to a llama-server child over its Unix socket: a ureq connector that ignores the
//! URL's host and connects to one socket path.
//!
//! Children listen on a socket in llmctl's private runtime directory (0700), so no other
//! user and no web page can reach them: there is no TCP port at all. ureq 3 builds its
//! transports from connectors (`Agent::with_parts`); this one stands where `TcpConnector`
//! would, and the rest of ureq (HTTP/1.1, pooling, timeouts) is unchanged.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport};

/// Asked while a read waits: true when the request should be given up (its client left).
pub type Cancel = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

/// How often a read with a [`Cancel`] asks it.
const CANCEL_CHECK: Duration = Duration::from_millis(100);

/// Connects every request to the socket at `path`.
pub struct UnixConnector {
    pub path: PathBuf,
    /// Set for a forwarded request's own connection: reads wait in short steps and fail
    /// once it says so, which closes the connection and makes llama-server stop.
    pub cancel: Option<Cancel>,
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
        let config = details.config;
        let buffers = LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size());
        Ok(Some(UnixTransport {
            stream,
            buffers,
            read_timeout: None,
            write_timeout: None,
            cancel: self.cancel.clone(),
        }))
    }
}

pub struct UnixTransport {
    stream: UnixStream,
    buffers: LazyBuffers,
    /// The timeouts last set on the socket, to skip a syscall when they do not change.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    cancel: Option<Cancel>,
}

impl fmt::Debug for UnixTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixTransport").finish()
    }
}

/// The socket timeout for a ureq deadline: none when it never happens, and never zero
/// (which the socket would take as "no timeout").
fn socket_timeout(timeout: &NextTimeout) -> Option<Duration> {
    if timeout.after.is_not_happening() {
        None
    } else {
        Some((*timeout.after).max(Duration::from_millis(1)))
    }
}

/// The error a cancelled read gives.
pub const CANCELLED: &str = "the client went away";

fn timed_out(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Transport for UnixTransport {
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
        let started = std::time::Instant::now();
        let amount = loop {
            // With a cancel check, wait in steps of CANCEL_CHECK up to the real timeout.
            let left = wanted.map(|wanted| wanted.saturating_sub(started.elapsed()).max(Duration::from_millis(1)));
            let step = match (&self.cancel, left) {
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
                    if self.cancel.as_ref().is_some_and(|cancel| cancel()) {
                        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, CANCELLED).into());
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
