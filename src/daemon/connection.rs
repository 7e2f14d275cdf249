//! One client connection on the Unix socket: transport and dispatch, nothing else.
//!
//! It checks the peer is this user, reads the handshake and one request (within
//! [`REQUEST_TIMEOUT`], at most `protocol::MAX_LINE` bytes), and hands the request to the
//! handler of its family in `handlers`. A handler returns an error instead of writing one,
//! so every failure reaches the client as a typed error message. A panic in a handler is
//! caught here: it is logged with its backtrace, the client gets an internal error, and any
//! lease's `Drop` gives its slot back.

use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::handlers;
use super::peer::Peer;
use super::shared::Shared;
use crate::error::{Error, Result};
use crate::protocol::{self, Request, Response, VERSION};
use crate::sys;

/// How long a client may take to send its handshake and request. A connection that sends
/// half a line and stalls is closed after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a write to a client may block (less when `token_timeout` is shorter).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A request line this long or longer is a large request.
const LARGE_REQUEST: usize = 1 << 20;
/// Bytes of large requests the daemon holds at once (each counted twice: the request and
/// the body it becomes).
const LARGE_REQUEST_POOL: usize = 512 << 20;

/// Serves one connection to its end.
pub(crate) fn serve(shared: &Arc<Shared>, stream: UnixStream) {
    match sys::peer_uid(&stream) {
        Ok(uid) if uid == sys::current_uid() => {}
        Ok(uid) => {
            log::warn!("refused a connection from uid {uid}");
            let error = Error::ForeignDaemon { uid };
            let _ = protocol::send_message(&mut &stream, &Response::error(&error));
            return;
        }
        Err(error) => {
            log::warn!("cannot read the peer credentials of a connection: {error}");
            return;
        }
    }
    // A client that stops reading must not hold its slot (or an events thread) for good:
    // a write that cannot proceed for this long fails, which cancels the generation.
    let write_timeout = shared.settings.token_timeout.min(CLIENT_WRITE_TIMEOUT);
    let _ = stream.set_write_timeout(Some(write_timeout));
    // The request is read through a borrow and everything after is written through the
    // writer's own handle: no duplicated descriptors.
    let hearing = shared.unheard.enter(&stream);
    let read = read_request(BufReader::new(&stream), &stream);
    if !hearing.heard() {
        // Hung up for a newcomer at the cap, and told it was refused as busy.
        return;
    }
    let mut peer = Peer::new(BufWriter::with_capacity(1 << 16, stream));
    let (request, size) = match read {
        Ok(Some(received)) => {
            if let Some(hello) = received.hello {
                // Goes out with the first reply, which every request writes through `peer`.
                let _ = peer.writer.write_all(&hello);
            }
            (received.request, received.size)
        }
        Ok(None) => return,
        Err(error) => {
            let _ = peer.send(&Response::error(&error));
            return;
        }
    };
    // Beyond the connections long requests may hold, only control requests get in, so no
    // number of streams, embeddings or followers locks out `status`, `stop` or `shutdown`.
    let long = matches!(
        request,
        Request::Run(_)
            | Request::Embed { .. }
            | Request::Events
            | Request::Listen(_)
            | Request::Warm { .. }
            | Request::Switch { .. }
    );
    let cap = shared.long_connection_cap();
    let _long = long.then(|| LongConnection::take(shared));
    if long && shared.long_connections.load(Ordering::SeqCst) > cap {
        let error = Error::Busy {
            message: format!("the daemon has {cap} connections holding long requests (generations, embeddings, loads, event followers), its limit"),
            retry_after_ms: 1000,
            per_model: false,
        };
        shared.admission.note_rejected();
        let _ = peer.send(&Response::error(&error));
        return;
    }
    // Large prompts are held at most twice (the request, the body sent on), and only
    // LARGE_REQUEST_POOL bytes of them at once: beyond that a client is told busy.
    let reservation = match LargeRequest::reserve(shared, size) {
        Ok(reservation) => reservation,
        Err(error) => {
            shared.admission.note_rejected();
            let _ = peer.send(&Response::error(&error));
            return;
        }
    };
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| dispatch(shared, request, &mut peer)));
    drop(reservation);
    let result = match outcome {
        Ok(result) => result,
        Err(payload) => Err(panicked(payload)),
    };
    if let Err(error) = result {
        let error = match error {
            // Cancelled with the client still there: it stopped reading (a stopped process,
            // a full pipe), and may yet read why once it goes on.
            Error::Interrupted if !peer.gone() => Error::Timeout {
                what: format!(
                    "writing to this client: it read nothing for {} s, so its request was cancelled and its slot \
                     given back",
                    write_timeout.as_secs()
                ),
            },
            error => error,
        };
        log::debug!("request failed: {error}");
        let _ = peer.send(&Response::error(&error));
    }
}

/// A connection counted in `Shared::long_connections` while it lives.
struct LongConnection<'a>(&'a Shared);

impl<'a> LongConnection<'a> {
    fn take(shared: &'a Shared) -> LongConnection<'a> {
        shared.long_connections.fetch_add(1, Ordering::SeqCst);
        LongConnection(shared)
    }
}

impl Drop for LongConnection<'_> {
    fn drop(&mut self) {
        self.0.long_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The error a caught panic becomes, logged with its backtrace.
pub(crate) fn panicked(payload: Box<dyn std::any::Any + Send>) -> Error {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    log::error!("a request handler panicked: {message}\n{}", std::backtrace::Backtrace::force_capture());
    Error::internal(format!("the daemon hit a bug while serving the request: {message}"))
}

/// Checks the numbers a request carries against the same ranges the command line and the
/// config enforce: a client on the socket (another program of this user) may send anything.
fn check_ranges(request: &Request) -> Result<()> {
    use crate::config::{MAX_CTX_SIZE, MAX_GPU_LAYERS, MAX_PARALLEL, MAX_SECONDS};
    let spec = match request {
        Request::Run(run) => Some(&run.model),
        Request::Embed { model, .. }
        | Request::Warm { model, .. }
        | Request::Switch { model, .. }
        | Request::Pin { model, .. } => Some(model),
        Request::Stop { model, .. } => model.as_ref(),
        _ => None,
    };
    let load = spec.map(|spec| &spec.load);
    let ttl = match request {
        Request::Warm { ttl_s, .. } => *ttl_s,
        _ => None,
    };
    for (name, value, low, high) in [
        ("parallel", load.map(|load| u64::from(load.parallel)), 1, u64::from(MAX_PARALLEL)),
        ("ctx_size", load.and_then(|load| load.ctx_size).map(u64::from), 16, u64::from(MAX_CTX_SIZE)),
        ("gpu_layers", load.and_then(|load| load.gpu_layers).map(u64::from), 0, u64::from(MAX_GPU_LAYERS)),
        ("ttl_s", ttl, 0, MAX_SECONDS),
    ] {
        if let Some(value) = value.filter(|value| !(low..=high).contains(value)) {
            return Err(Error::Usage { message: format!("bad request: {name} {value} is outside {low}..={high}") });
        }
    }
    Ok(())
}

fn dispatch(shared: &Arc<Shared>, request: Request, peer: &mut Peer) -> Result<()> {
    check_ranges(&request)?;
    match request {
        Request::Hello { .. } => Err(Error::internal("a hello after the handshake")),
        Request::Run(run) => handlers::generate::run(shared, run, peer),
        Request::Embed { model, inputs } => handlers::generate::embed(shared, &model, &inputs, peer),
        Request::Status => handlers::observe::status(shared, peer),
        Request::Events => handlers::observe::events(shared, peer),
        Request::Metrics => handlers::observe::metrics(shared, peer),
        Request::Warm { model, ttl_s } => handlers::control::warm(shared, &model, ttl_s, peer),
        Request::Switch { model, wait, exclusive } => handlers::control::switch(shared, &model, wait, exclusive, peer),
        Request::Stop { model, forget } => handlers::control::stop(shared, model.as_ref(), forget, peer),
        Request::Pin { model, pinned } => handlers::control::pin(shared, &model, pinned, peer),
        Request::Reload => handlers::control::reload(shared, peer),
        Request::Shutdown => handlers::control::shutdown(shared, peer),
        Request::Listen(listen) => handlers::control::listen(shared, listen, peer),
    }
}

/// A request read from a connection.
struct Received {
    request: Request,
    /// The length of the request's line.
    size: usize,
    /// The handshake's answer, when it waits to go out with the first reply.
    hello: Option<Vec<u8>>,
}

/// Reads the handshake and the request, answering the handshake. `Ok(None)` when the client
/// closed without a request.
fn read_request(mut reader: BufReader<&UnixStream>, stream: &UnixStream) -> Result<Option<Received>> {
    let bad = |what: String| Error::Usage { message: format!("bad request: {what}") };
    let _ = reader.get_ref().set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut line = Vec::new();
    let hello: Request = match protocol::read_message(&mut reader, &mut line) {
        Ok(Some(message)) => message,
        Ok(None) => return Ok(None),
        Err(error) => return Err(bad(error.to_string())),
    };
    match hello {
        Request::Hello { version } if version == VERSION => {}
        Request::Hello { version } => return Err(Error::ProtocolMismatch { daemon: VERSION, client: version }),
        _ => return Err(bad("the first message must be a hello".into())),
    }
    let hello = protocol::encode_line(&Response::Hello { version: VERSION, pid: sys::own_pid() })
        .map_err(|e| Error::internal(format!("cannot write the handshake: {e}")))?;
    let answer =
        |hello: &[u8]| (&mut &*stream).write_all(hello).map_err(|e| Error::io("cannot answer the handshake", e));
    // A client that sent its request with its hello, without waiting for the answer, gets
    // the answer in the same write as the first reply: the client wakes once, not twice.
    // One that waits gets it now, in one write, before anything else is written to it.
    let deferred = reader.buffer().contains(&b'\n');
    if !deferred {
        answer(&hello)?;
    }
    let request = match protocol::read_message(&mut reader, &mut line) {
        Ok(Some(Request::Hello { .. })) => Err(bad("a second hello".into())),
        Ok(Some(request)) => Ok(request),
        Ok(None) => return Ok(None),
        Err(error) => Err(bad(error.to_string())),
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            if deferred {
                answer(&hello)?;
            }
            return Err(error);
        }
    };
    let _ = reader.get_ref().set_read_timeout(None);
    Ok(Some(Received { request, size: line.len(), hello: deferred.then_some(hello) }))
}

/// A share of the large-request pool; when the last large request ends, the memory it held
/// is given back to the system (glibc keeps freed memory in its heap otherwise: measured,
/// the daemon grew from 51 to 68 MB after two 15 MB prompts).
struct LargeRequest<'a> {
    shared: &'a Shared,
    charge: usize,
}

impl<'a> LargeRequest<'a> {
    fn reserve(shared: &'a Shared, size: usize) -> Result<Option<LargeRequest<'a>>> {
        if size < LARGE_REQUEST {
            return Ok(None);
        }
        let charge = size.saturating_mul(2);
        let held = shared.large_requests.fetch_add(charge, Ordering::SeqCst);
        if held.saturating_add(charge) > LARGE_REQUEST_POOL {
            shared.large_requests.fetch_sub(charge, Ordering::SeqCst);
            return Err(Error::Busy {
                message: format!("the daemon already holds {} MiB of large prompts", held >> 20),
                retry_after_ms: 1000,
                per_model: false,
            });
        }
        Ok(Some(LargeRequest { shared, charge }))
    }
}

impl Drop for LargeRequest<'_> {
    fn drop(&mut self) {
        if self.shared.large_requests.fetch_sub(self.charge, Ordering::SeqCst) == self.charge {
            // SAFETY: malloc_trim only returns free heap memory to the kernel.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}
