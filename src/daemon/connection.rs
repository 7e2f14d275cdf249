//! One client connection: handshake, one request, its responses.
//!
//! Each request type has a handler of the same name as the client command that sends it.
//! Handlers decide nothing about instances: they send the instance's worker a job or a
//! message and relay what comes back. A handler returns an error instead of writing one, so
//! every failure reaches the client as a typed `Error` message. A panic in a handler is
//! caught here: it is logged with its backtrace, the client gets an internal error, and the
//! lease's `Drop` gives back any slot.

use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::RecvTimeoutError;

use crate::backend::forward::Part;
use crate::backend::llama::GenerateError;
use crate::backend::unix::Cancel;
use crate::error::{Error, ErrorKind, Result};
use crate::gguf::{self, ModelInfo};
use crate::instance::{key_of, Ended, FileStamp, Handle, Job, JobEvent, Lease, Message, Phase, Pin, Unload};
use crate::model::ModelSpec;
use crate::protocol::{
    self, DaemonStatus, Done, ForwardRequest, QueueStatus, Request, Response, RunRequest, StatusReport, VERSION,
};
use crate::sys;

use super::{scheduler, Shared, ShutdownRequest};

/// How long a client may take to send its handshake and request. A connection that sends
/// half a line and stalls is closed after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a request waiting for its slot checks that its client is still there. The slot
/// itself arrives on a channel the moment it is free; this only bounds how long a client
/// that left keeps its place.
const CLIENT_CHECK: Duration = Duration::from_millis(100);
/// The longest a write to a client may block (less when `token_timeout` is shorter).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a broken stream waits to learn whether its child died.
const EXIT_PATIENCE: Duration = Duration::from_millis(500);

type Writer = BufWriter<UnixStream>;
/// A model file that changed since its instance loaded it: its header and stamp.
type NewFile = (ModelInfo, FileStamp);

pub fn serve(shared: &Arc<Shared>, stream: UnixStream) {
    match sys::peer_uid(&stream) {
        Ok(uid) if uid == sys::current_uid() => {}
        Ok(uid) => {
            log::warn!("refused a connection from uid {uid}");
            let error = Error::Remote {
                kind: ErrorKind::Unavailable,
                message: "this llmctl daemon belongs to another user".into(),
            };
            let _ = protocol::write_message(&mut &stream, &Response::error(&error));
            return;
        }
        Err(error) => {
            log::warn!("cannot read the peer credentials of a connection: {error}");
            return;
        }
    }
    // A client that stops reading must not hold its slot (or an events thread) for good:
    // a write that cannot proceed for this long fails, which cancels the generation.
    let _ = stream.set_write_timeout(Some(shared.settings.token_timeout.min(CLIENT_WRITE_TIMEOUT)));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = BufWriter::with_capacity(1 << 16, stream);
    let (request, size) = match read_request(&mut reader, &mut writer) {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(error) => {
            let _ = send_final(&mut writer, &Response::error(&error));
            return;
        }
    };
    drop(reader);
    // Large prompts are held at most twice (the request, the body sent on), and only
    // LARGE_REQUEST_POOL bytes of them at once: beyond that a client is told busy.
    let reservation = match LargeRequest::reserve(size) {
        Ok(reservation) => reservation,
        Err(error) => {
            let _ = send_final(&mut writer, &Response::error(&error));
            return;
        }
    };
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| handle(shared, request, &mut writer)));
    drop(reservation);
    let result = match outcome {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log::error!("a request handler panicked: {message}\n{}", std::backtrace::Backtrace::force_capture());
            Err(Error::internal(format!("the daemon hit a bug while serving the request: {message}")))
        }
    };
    if let Err(error) = result {
        log::debug!("request failed: {error}");
        let _ = send_final(&mut writer, &Response::error(&error));
    }
}

/// A request line this long or longer is a large request.
const LARGE_REQUEST: usize = 1 << 20;
/// Bytes of large requests the daemon holds at once (each counted twice: the request and
/// the body it becomes).
const LARGE_REQUEST_POOL: usize = 512 << 20;
static LARGE_REQUEST_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A share of the large-request pool; when the last large request ends, the memory it held
/// is given back to the system (glibc keeps freed memory in its heap otherwise: measured,
/// the daemon grew from 51 to 68 MB after two 15 MB prompts).
struct LargeRequest(usize);

impl LargeRequest {
    fn reserve(size: usize) -> Result<Option<LargeRequest>> {
        if size < LARGE_REQUEST {
            return Ok(None);
        }
        let charge = size.saturating_mul(2);
        let held = LARGE_REQUEST_BYTES.fetch_add(charge, Ordering::SeqCst);
        if held.saturating_add(charge) > LARGE_REQUEST_POOL {
            LARGE_REQUEST_BYTES.fetch_sub(charge, Ordering::SeqCst);
            return Err(Error::Busy {
                message: format!("the daemon already holds {} MiB of large prompts", held >> 20),
                retry_after_ms: 1000,
                per_model: false,
            });
        }
        Ok(Some(LargeRequest(charge)))
    }
}

impl Drop for LargeRequest {
    fn drop(&mut self) {
        if LARGE_REQUEST_BYTES.fetch_sub(self.0, Ordering::SeqCst) == self.0 {
            // SAFETY: malloc_trim only returns free heap memory to the kernel.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// Reads the handshake and the request, answering the handshake; returns the request and
/// the length of its line. `Ok(None)` when the client closed without a request.
fn read_request(reader: &mut BufReader<UnixStream>, writer: &mut Writer) -> Result<Option<(Request, usize)>> {
    let bad = |what: String| Error::Usage { message: format!("bad request: {what}") };
    let _ = reader.get_ref().set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut line = Vec::new();
    let hello: Request = match protocol::read_message(reader, &mut line) {
        Ok(Some(message)) => message,
        Ok(None) => return Ok(None),
        Err(error) => return Err(bad(error.to_string())),
    };
    match hello {
        Request::Hello { version } if version == VERSION => {}
        Request::Hello { version } => {
            return Err(Error::Remote {
                kind: ErrorKind::Unavailable,
                message: format!(
                    "the daemon speaks protocol {VERSION} but this client speaks {version}; \
                     restart the daemon with `llmctl shutdown`"
                ),
            })
        }
        _ => return Err(bad("the first message must be a hello".into())),
    }
    send_final(writer, &Response::Hello { version: VERSION, pid: std::process::id() })
        .map_err(|e| Error::io("cannot answer the handshake", e))?;
    let mut request = match protocol::read_message(reader, &mut line) {
        Ok(Some(Request::Hello { .. })) => return Err(bad("a second hello".into())),
        Ok(Some(request)) => request,
        Ok(None) => return Ok(None),
        Err(error) => return Err(bad(error.to_string())),
    };
    let mut size = line.len();
    if let Request::Forward(forward) = &mut request {
        protocol::read_payload(reader, forward.body_len, protocol::MAX_BODY, &mut forward.body)
            .map_err(|error| bad(format!("the forwarded body: {error}")))?;
        size += forward.body_len;
    }
    let _ = reader.get_ref().set_read_timeout(None);
    Ok(Some((request, size)))
}

fn send_final(writer: &mut Writer, response: &Response) -> std::io::Result<()> {
    protocol::write_message(writer, response)?;
    writer.flush()
}

fn reply(writer: &mut Writer, response: &Response) -> Result<()> {
    send_final(writer, response).map_err(|e| Error::io("cannot reply to the client", e))
}

fn handle(shared: &Arc<Shared>, request: Request, writer: &mut Writer) -> Result<()> {
    match request {
        Request::Hello { .. } => unreachable!("handled by the handshake"),
        Request::Run(run_request) => run(shared, run_request, writer),
        Request::Forward(forward_request) => forward(shared, forward_request, writer),
        Request::Status => reply(writer, &Response::Status(status(shared))),
        Request::Warm { model, ttl_s } => {
            let instance = warm(shared, &model, writer)?;
            if let Some(seconds) = ttl_s {
                instance.send(Message::Pin(Pin::Until(SystemTime::now() + Duration::from_secs(seconds))));
            }
            reply(writer, &Response::Ok { message: None })
        }
        Request::Switch { model, wait, exclusive } => switch(shared, &model, wait, exclusive, writer),
        Request::Stop { model } => {
            let stopped = stop(shared, model.as_ref());
            let message = format!("stopped {stopped} instance{}", if stopped == 1 { "" } else { "s" });
            reply(writer, &Response::Ok { message: Some(message) })
        }
        Request::Pin { model, pinned } => {
            let (instance, _) = instance_for(shared, &model)?;
            instance.send(Message::Pin(Pin::Set(pinned)));
            reply(writer, &Response::Ok { message: None })
        }
        Request::Events => events(shared, writer),
        Request::Reload => {
            let message = shared.reload()?;
            reply(writer, &Response::Ok { message: Some(message) })
        }
        Request::Metrics => {
            let text = super::metrics::render(&status(shared));
            reply(writer, &Response::Metrics { text })
        }
        Request::Shutdown => {
            let (done_tx, done_rx) = crossbeam_channel::bounded(1);
            let _ = shared.shutdown.send(ShutdownRequest::Client(done_tx));
            let _ = done_rx.recv();
            reply(writer, &Response::Ok { message: None })
        }
    }
}

/// The instance for `spec`, after checking the file again: it may have been replaced since
/// the instance loaded it. Returns the file as found when it differs from the instance's.
fn instance_for(shared: &Shared, spec: &ModelSpec) -> Result<(Arc<Handle>, Option<NewFile>)> {
    refuse_if_shutting_down(shared)?;
    let start = |info, stamp| {
        shared
            .table
            .get_or_start(spec, info, stamp, &shared.services)
            .map_err(|e| Error::io("cannot start a thread for the instance", e))
    };
    if spec.remote.is_some() {
        let handle = match shared.table.get(spec) {
            Some(handle) => handle,
            None => start(ModelInfo::default(), FileStamp::none())?,
        };
        return Ok((handle, None));
    }
    let metadata = std::fs::metadata(&spec.path).map_err(|_| Error::ModelNotFound { path: spec.path.clone() })?;
    let stamp = FileStamp::of(&metadata);
    let existing = shared.table.get(spec);
    // A header takes milliseconds to read (a vocabulary is megabytes); an unchanged file
    // needs no second look.
    if let Some(handle) = &existing {
        if handle.with_view(|view| view.stamp == stamp) {
            return Ok((Arc::clone(handle), None));
        }
    }
    let info = gguf::inspect(&spec.path).map_err(|reason| Error::BadModel { path: spec.path.clone(), reason })?;
    match existing {
        Some(handle) => Ok((handle, Some((info, stamp)))),
        None => Ok((start(info, stamp)?, None)),
    }
}

fn refuse_if_shutting_down(shared: &Shared) -> Result<()> {
    if shared.shutting_down.load(Ordering::SeqCst) {
        return Err(Error::Stopped { message: "the llmctl daemon is shutting down".into() });
    }
    Ok(())
}

/// What a waiting request does with the worker's progress reports.
struct Progress<'a> {
    on_loading: &'a mut dyn FnMut(),
    on_queued: &'a mut dyn FnMut(usize),
    /// True once the client has gone away.
    client_gone: &'a dyn Fn() -> bool,
}

/// Sends a job to `instance` and waits for its slot: a blocking receive, woken by the
/// worker the moment a slot is free. Every `CLIENT_CHECK` it looks whether the client left,
/// and if so gives its place up.
fn acquire(
    shared: &Shared,
    instance: &Handle,
    spec: &ModelSpec,
    file: Option<NewFile>,
    progress: Progress<'_>,
) -> Result<Lease> {
    let (events, replies) = crossbeam_channel::unbounded();
    let id = shared.next_job();
    let job = Job { id, events, policy: spec.policy.clone(), file };
    if !instance.send(Message::Arrive(job)) {
        return Err(Error::Stopped { message: "the llmctl daemon is shutting down".into() });
    }
    let deadline = Instant::now() + shared.settings.queue_timeout;
    loop {
        match replies.recv_timeout(CLIENT_CHECK.min(deadline.saturating_duration_since(Instant::now()))) {
            Ok(JobEvent::Granted(lease)) => return Ok(*lease),
            Ok(JobEvent::Failed(error)) => return Err(error),
            Ok(JobEvent::Loading) => (progress.on_loading)(),
            Ok(JobEvent::Queued(position)) => (progress.on_queued)(position),
            Err(RecvTimeoutError::Timeout) => {
                let error = if (progress.client_gone)() {
                    Error::Interrupted
                } else if Instant::now() >= deadline {
                    Error::Timeout {
                        what: format!(
                            "waiting for a free slot on {} ({} s)",
                            spec.name,
                            shared.settings.queue_timeout.as_secs()
                        ),
                    }
                } else {
                    continue;
                };
                // A lease granted meanwhile is dropped with `replies`, which frees it.
                instance.send(Message::Leave(id));
                return Err(error);
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::Stopped { message: format!("{} was stopped", spec.name) })
            }
        }
    }
}

fn run(shared: &Arc<Shared>, request: RunRequest, writer: &mut Writer) -> Result<()> {
    let started = Instant::now();
    on_lease(shared, &request.model, writer, |lease, writer| {
        // A fault hook for the test suite: a handler that panics while it holds a slot.
        #[cfg(feature = "testing")]
        if request.prompt == "__llmctl_test_panic__" {
            panic!("fault injected by the test suite");
        }
        stream(shared, lease, &request, started, writer)
    })
}

/// An HTTP request from `serve`: passed to the model's server unchanged, the answer relayed
/// byte for byte. Admission, the budget and accounting are those of `run`.
fn forward(shared: &Arc<Shared>, request: ForwardRequest, writer: &mut Writer) -> Result<()> {
    let started = Instant::now();
    on_lease(shared, &request.model, writer, |lease, writer| relay(shared, lease, &request, started, writer))
}

/// Admits a request for `spec`, waits for a slot (telling the client about loading and
/// queueing), and runs `work` on the lease; for a remote model, a server that fails before
/// answering is left out and `work` runs again on another.
fn on_lease(
    shared: &Arc<Shared>,
    spec: &ModelSpec,
    writer: &mut Writer,
    mut work: impl FnMut(Lease, &mut Writer) -> std::result::Result<(), Retry>,
) -> Result<()> {
    let (instance, mut file) = instance_for(shared, spec)?;
    let place = shared.admission.enter().inspect_err(|_| instance.note_rejected())?;
    let client_socket = writer.get_ref().try_clone().map_err(|e| Error::io("cannot watch the client", e))?;
    let model = spec.name.clone();
    let mut place = Some(place);
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Both progress callbacks write to the client, one at a time.
        let progress_writer = std::cell::RefCell::new(&mut *writer);
        let lease = acquire(
            shared,
            &instance,
            spec,
            file.take(),
            Progress {
                on_loading: &mut || {
                    let _ = send_final(&mut progress_writer.borrow_mut(), &Response::Loading { model: model.clone() });
                },
                on_queued: &mut |position| {
                    let _ = send_final(&mut progress_writer.borrow_mut(), &Response::Queued { position });
                },
                client_gone: &|| sys::peer_closed(&client_socket),
            },
        )?;
        drop(place.take());
        match work(lease, writer) {
            Err(Retry::OtherReplica) if attempt < MAX_REPLICA_TRIES => continue,
            Err(Retry::OtherReplica) => {
                return Err(Error::RemoteDown {
                    message: format!("every server for {} failed; they are retried with backoff", spec.name),
                })
            }
            Err(Retry::No(error)) => return Err(error),
            Ok(()) => return Ok(()),
        }
    }
}

/// How many servers of a remote model one request tries.
const MAX_REPLICA_TRIES: usize = 4;

enum Retry {
    /// The remote server failed before any byte of the answer: try another.
    OtherReplica,
    No(Error),
}

/// Streams one generation on `lease` to the client.
fn stream(
    shared: &Shared,
    mut lease: Lease,
    request: &RunRequest,
    request_started: Instant,
    writer: &mut Writer,
) -> std::result::Result<(), Retry> {
    let client = &lease.client;
    let generation = &lease.generation;
    let report = &mut lease.report;
    let result = client.generate(request, |text, more_buffered| {
        if generation.is_stopped() {
            // `stop` or `shutdown`: cut the stream off now, even if the child ignores SIGTERM.
            return Err(std::io::Error::other("the instance was stopped"));
        }
        if report.first_token.is_none() {
            report.first_token = Some(request_started.elapsed());
        }
        protocol::write_message(writer, &Response::Token { text: text.to_string() })?;
        if !more_buffered {
            writer.flush()?;
        }
        Ok(())
    });
    let answered = lease.report.first_token.is_some();
    conclude(shared, lease, &request.model, result, "ok", answered, writer)
}

/// Relays one forwarded request on `lease`: the answer's head, then its bytes as they come.
fn relay(
    shared: &Shared,
    mut lease: Lease,
    request: &ForwardRequest,
    started: Instant,
    writer: &mut Writer,
) -> std::result::Result<(), Retry> {
    let client_socket = match writer.get_ref().try_clone() {
        Ok(socket) => socket,
        Err(error) => return Err(Retry::No(Error::io("cannot watch the client", error))),
    };
    let cancel: Cancel = Arc::new(move || sys::peer_closed(&client_socket));
    let generation = &lease.generation;
    let report = &mut lease.report;
    let mut status = 0;
    let result = lease.client.forward(request, Some(cancel), |part| {
        if generation.is_stopped() {
            return Err(std::io::Error::other("the instance was stopped"));
        }
        match part {
            Part::Head { status: code, content_type, content_length } => {
                status = code;
                let head =
                    Response::Head { status: code, content_type: content_type.map(str::to_string), content_length };
                protocol::write_message(writer, &head)?;
            }
            Part::Bytes(bytes) => {
                if report.first_token.is_none() {
                    report.first_token = Some(started.elapsed());
                }
                protocol::write_bytes(writer, bytes)?;
            }
        }
        writer.flush()
    });
    // What llama-server answered with is passed on as it is; the outcome counts its status.
    let ok = match status {
        400..=499 => ErrorKind::Data.name(),
        500.. => ErrorKind::Backend.name(),
        _ => "ok",
    };
    conclude(shared, lease, &request.model, result, ok, status != 0, writer)
}

/// What a finished generation or forwarded request leaves: the slot back before the client
/// hears `done`; a cancellation noted; another server to try when a remote one failed
/// before `answered`; or the failure classified.
fn conclude(
    shared: &Shared,
    mut lease: Lease,
    spec: &ModelSpec,
    result: std::result::Result<Done, GenerateError>,
    ok: &str,
    answered: bool,
    writer: &mut Writer,
) -> std::result::Result<(), Retry> {
    let error = match result {
        Ok(done) => {
            lease.report.usage = done.usage;
            lease.report.outcome = Some(ok.to_string());
            lease.release();
            let _ = send_final(writer, &Response::Done(done));
            return Ok(());
        }
        // `stop` or `shutdown` cut the stream off.
        Err(GenerateError::Cancelled) if lease.generation.is_stopped() => {
            generation_failed(shared, &mut lease, spec, GenerateError::Broken("stopped".into()))
        }
        // The client went away; dropping the HTTP response closed the upstream connection,
        // which makes llama-server stop generating and free the slot.
        Err(GenerateError::Cancelled) => {
            log::debug!("client of {} went away; its request was cancelled", spec.name);
            lease.report.outcome = Some("cancelled".into());
            return Ok(());
        }
        Err(GenerateError::Broken(message)) if lease.replica.is_some() && !answered => {
            log::warn!("the server {} for {} failed: {message}", lease.client.base_url(), spec.name);
            lease.report.replica_failed = true;
            return Err(Retry::OtherReplica);
        }
        Err(error) => generation_failed(shared, &mut lease, spec, error),
    };
    lease.report.outcome = Some(error.kind().name().to_string());
    Err(Retry::No(error))
}

/// Classifies a failed generation by what happened to the lease's own child or server.
fn generation_failed(shared: &Shared, lease: &mut Lease, spec: &ModelSpec, error: GenerateError) -> Error {
    match error {
        GenerateError::Cancelled => Error::Interrupted,
        GenerateError::Rejected(message) => Error::InvalidParameter { message },
        GenerateError::Stalled => {
            lease.report.stalled = true;
            let seconds = shared.settings.token_timeout.as_secs();
            Error::Timeout {
                what: format!(
                    "waiting for a token from {}: none came for {seconds} s (token_timeout in the config); \
                     the instance was restarted",
                    spec.name
                ),
            }
        }
        GenerateError::Broken(message) if lease.replica.is_some() => {
            lease.report.replica_failed = true;
            Error::RemoteDown {
                message: format!(
                    "the server {} for {} failed: {message}; it is retried with backoff",
                    lease.client.base_url(),
                    spec.name
                ),
            }
        }
        GenerateError::Broken(message) => match lease.generation.wait_ended(EXIT_PATIENCE) {
            Some(Ended::Exited { status, stderr_tail }) => {
                Error::LlamaExited { model: spec.name.clone(), status, stderr_tail }
            }
            Some(Ended::Stopped(message)) => Error::Stopped { message },
            None => Error::Backend { model: spec.name.clone(), message },
        },
    }
}

fn warm(shared: &Arc<Shared>, spec: &ModelSpec, writer: &mut Writer) -> Result<Arc<Handle>> {
    let (instance, file) = instance_for(shared, spec)?;
    let client_socket = writer.get_ref().try_clone().map_err(|e| Error::io("cannot watch the client", e))?;
    let mut lease = acquire(
        shared,
        &instance,
        spec,
        file,
        Progress { on_loading: &mut || {}, on_queued: &mut |_| {}, client_gone: &|| sys::peer_closed(&client_socket) },
    )?;
    match lease.client.ping() {
        Ok(()) | Err(GenerateError::Cancelled) => {
            lease.release();
            Ok(instance)
        }
        Err(error) => Err(generation_failed(shared, &mut lease, spec, error)),
    }
}

fn switch(shared: &Arc<Shared>, spec: &ModelSpec, wait: bool, exclusive: bool, writer: &mut Writer) -> Result<()> {
    let (instance, file) = instance_for(shared, spec)?;
    let epoch = if exclusive {
        let mut latest = shared.exclusive_epoch.lock();
        *latest += 1;
        *latest
    } else {
        0
    };
    if !wait {
        // The caller detaches; this thread goes on loading for the daemon.
        let _ = send_final(writer, &Response::Ok { message: Some(format!("loading {}", spec.name)) });
    }
    let client_socket = writer.get_ref().try_clone().map_err(|e| Error::io("cannot watch the client", e))?;
    let client_gone = || wait && sys::peer_closed(&client_socket);
    let loaded = acquire(
        shared,
        &instance,
        spec,
        file,
        Progress { on_loading: &mut || {}, on_queued: &mut |_| {}, client_gone: &client_gone },
    )
    .map(Lease::release);
    if loaded.is_ok() && exclusive {
        let others: Vec<Arc<Handle>> =
            shared.table.all().into_iter().filter(|other| !Arc::ptr_eq(other, &instance)).collect();
        // The latest exclusive switch wins: an earlier one that finishes loading after a
        // later one began leaves the others alone rather than unloading the winner.
        let waiting = {
            let latest = shared.exclusive_epoch.lock();
            if *latest == epoch {
                send_unloads(shared, &others, Unload::Exclusive, |name| {
                    format!("{name} was unloaded by `llmctl switch --exclusive {}`", spec.name)
                })
            } else {
                log::info!("switch --exclusive {} was overtaken by a later one", spec.name);
                Vec::new()
            }
        };
        for stopped in waiting {
            let _ = stopped.recv();
        }
    }
    match (loaded, wait) {
        (Ok(()), true) => reply(writer, &Response::Ok { message: None }),
        (Err(error), true) => Err(error),
        (Ok(()), false) => Ok(()),
        (Err(error), false) => {
            log::warn!("background load of {} failed: {error}", spec.name);
            Ok(())
        }
    }
}

/// Asks each instance to unload for `why` and waits until every one has stopped. Returns how
/// many had something loaded or loading.
fn unload_and_wait(shared: &Shared, instances: &[Arc<Handle>], why: Unload, message: impl Fn(&str) -> String) -> usize {
    let active = instances
        .iter()
        .filter(|instance| instance.with_view(|view| view.phase.holds_room() || view.phase == Phase::WaitingRoom))
        .count();
    // A worker answers once its child is gone; one that ends drops the sender instead.
    for stopped in send_unloads(shared, instances, why, message) {
        let _ = stopped.recv();
    }
    active
}

/// Asks each instance to unload for `why`, now; returns where each says it has stopped.
fn send_unloads(
    shared: &Shared,
    instances: &[Arc<Handle>],
    why: Unload,
    message: impl Fn(&str) -> String,
) -> Vec<crossbeam_channel::Receiver<()>> {
    let cutoff = shared.last_job();
    let mut waiting = Vec::new();
    for instance in instances {
        let name = instance.with_view(|view| view.spec.name.clone());
        let (done, stopped) = crossbeam_channel::bounded(1);
        if instance.send(Message::Unload { why, cutoff, room: None, message: message(&name), done: Some(done) }) {
            waiting.push(stopped);
        }
    }
    waiting
}

/// Streams events to the client until it goes away or the daemon shuts down.
fn events(shared: &Arc<Shared>, writer: &mut Writer) -> Result<()> {
    let subscription = shared.services.events.subscribe();
    let client_socket = writer.get_ref().try_clone().map_err(|e| Error::io("cannot watch the client", e))?;
    // Tell the client it is subscribed, so nothing that happens after this is missed.
    reply(writer, &Response::Ok { message: None })?;
    loop {
        match subscription.recv_timeout(Duration::from_millis(200)) {
            Ok(event) => {
                if send_final(writer, &Response::Event(event)).is_err() {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if sys::peer_closed(&client_socket) || shared.shutting_down.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Stops the instances of `model` (its alias's own instance, or every instance of a file
/// named by path), or every instance. Requests in flight and waiting are told who stopped
/// them.
fn stop(shared: &Arc<Shared>, model: Option<&ModelSpec>) -> usize {
    let targets: Vec<Arc<Handle>> = match model {
        Some(spec) => {
            let key = key_of(spec);
            shared
                .table
                .all()
                .into_iter()
                .filter(|instance| {
                    instance.with_view(|view| {
                        key_of(&view.spec) == key || (view.spec.path == spec.path && view.spec.name == spec.name)
                    })
                })
                .collect()
        }
        None => shared.table.all(),
    };
    unload_and_wait(shared, &targets, Unload::Stop, |name| format!("{name} was stopped by `llmctl stop`"))
}

fn status(shared: &Arc<Shared>) -> StatusReport {
    let gpu = shared.services.gpu.latest();
    let live = shared.live.read().clone();
    let budget = scheduler::budget(&live, gpu.as_ref());
    let instances: Vec<_> = shared
        .table
        .all()
        .iter()
        .map(|instance| {
            let view = instance.view();
            let mut status = view.status();
            status.rss_bytes = status.pid.and_then(crate::process::rss_bytes);
            status.vram_bytes = status.pid.and_then(|pid| gpu.as_ref()?.used_by_pid.get(&pid).copied());
            status
        })
        .collect();
    StatusReport {
        daemon: DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: shared.started.elapsed().as_millis() as u64,
            socket: shared.paths.socket.display().to_string(),
            rss_bytes: crate::process::rss_bytes(std::process::id()),
            state_file_error: shared.state_file_error.lock().clone(),
            budget_bytes: budget.ram,
            vram_budget_bytes: budget.vram,
            max_instances: budget.max_instances,
            evictions: instances.iter().map(|i| u64::from(i.evictions)).sum(),
            event_subscribers: shared.services.events.subscribers(),
            settings: shared.settings.describe(&live),
            llama_server: shared.llama_server.read().clone(),
        },
        queue: QueueStatus {
            depth: shared.admission.depth(),
            waiting: shared.admission.waiting(),
            rejected: shared.admission.rejected(),
        },
        instances,
    }
}
