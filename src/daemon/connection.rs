//! One client connection: handshake, one request, its responses.
//!
//! Each request type has a handler of the same name as the client command that sends it.
//! A handler returns an error instead of writing one, so every failure reaches the client
//! as a typed `Error` message. A panic in a handler is caught here: it is logged with its
//! backtrace, the client gets an internal error, and `Slot`'s `Drop` gives back any slot.

use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::llama::GenerateError;
use crate::error::{Error, ErrorKind, Result};
use crate::gguf;
use crate::instance::{AcquireError, FileStamp, Instance, Slot};
use crate::model::ModelSpec;
use crate::protocol::{self, DaemonStatus, QueueStatus, Request, Response, RunRequest, StatusReport, VERSION};
use crate::sys;

use super::{Shared, ShutdownRequest};

/// How long a client may take to send its handshake and request. A connection that sends
/// half a line and stalls is closed after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a request reloads an instance that stopped under it before giving up.
const LOAD_ATTEMPTS: usize = 3;

type Writer = BufWriter<UnixStream>;

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
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = BufWriter::with_capacity(1 << 16, stream);
    let request = match read_request(&mut reader, &mut writer) {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(error) => {
            let _ = send_final(&mut writer, &Response::error(&error));
            return;
        }
    };
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| handle(shared, request, &mut writer)));
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

/// Reads the handshake and the request, answering the handshake. `Ok(None)` when the
/// client closed without a request.
fn read_request(reader: &mut BufReader<UnixStream>, writer: &mut Writer) -> Result<Option<Request>> {
    let bad = |what: String| Error::Remote { kind: ErrorKind::Usage, message: format!("bad request: {what}") };
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
    let request = match protocol::read_message(reader, &mut line) {
        Ok(Some(Request::Hello { .. })) => return Err(bad("a second hello".into())),
        Ok(Some(request)) => request,
        Ok(None) => return Ok(None),
        Err(error) => return Err(bad(error.to_string())),
    };
    let _ = reader.get_ref().set_read_timeout(None);
    Ok(Some(request))
}

fn send_final(writer: &mut Writer, response: &Response) -> std::io::Result<()> {
    protocol::write_message(writer, response)?;
    writer.flush()
}

fn handle(shared: &Arc<Shared>, request: Request, writer: &mut Writer) -> Result<()> {
    match request {
        Request::Hello { .. } => unreachable!("handled by the handshake"),
        Request::Run(run_request) => run(shared, run_request, writer),
        Request::Status => {
            let report = status(shared);
            send_final(writer, &Response::Status(report)).map_err(|e| Error::io("cannot send the status", e))
        }
        Request::Warm { model, ttl_s } => {
            let instance = warm(shared, &model, writer)?;
            if let Some(seconds) = ttl_s {
                instance.pin_until(std::time::SystemTime::now() + Duration::from_secs(seconds));
            }
            send_final(writer, &Response::Ok { message: None }).map_err(|e| Error::io("cannot reply", e))
        }
        Request::Switch { model, wait, exclusive } => switch(shared, &model, wait, exclusive, writer),
        Request::Stop { model } => {
            let stopped = stop(shared, model.as_ref());
            let message = format!("stopped {stopped} instance{}", if stopped == 1 { "" } else { "s" });
            send_final(writer, &Response::Ok { message: Some(message) }).map_err(|e| Error::io("cannot reply", e))
        }
        Request::Pin { model, pinned } => {
            let instance = instance_for(shared, &model)?;
            instance.set_pinned(pinned);
            send_final(writer, &Response::Ok { message: None }).map_err(|e| Error::io("cannot reply", e))
        }
        Request::Events => events(shared, writer),
        Request::Metrics => {
            let text = super::metrics::render(&status(shared));
            send_final(writer, &Response::Metrics { text }).map_err(|e| Error::io("cannot reply", e))
        }
        Request::Shutdown => {
            let (done_tx, done_rx) = crossbeam_channel::bounded(1);
            let _ = shared.shutdown.send(ShutdownRequest::Client(done_tx));
            let _ = done_rx.recv();
            send_final(writer, &Response::Ok { message: None }).map_err(|e| Error::io("cannot reply", e))
        }
    }
}

/// The instance for `spec`, after checking the file again: it may have changed since the
/// client looked.
fn instance_for(shared: &Shared, spec: &ModelSpec) -> Result<Arc<Instance>> {
    if spec.remote.is_some() {
        let instance = shared
            .table
            .get(spec)
            .unwrap_or_else(|| shared.table.get_or_insert(spec, crate::gguf::ModelInfo::default(), FileStamp::none()));
        instance.apply_policy(&spec.policy);
        return Ok(instance);
    }
    let metadata = match std::fs::metadata(&spec.path) {
        Ok(metadata) => metadata,
        Err(_) => return Err(Error::ModelNotFound { path: spec.path.clone() }),
    };
    let stamp = FileStamp::of(&metadata);
    // A header takes milliseconds to read (a vocabulary is megabytes); an unchanged file
    // needs no second look.
    if let Some(instance) = shared.table.get(spec) {
        if instance.file_stamp == stamp {
            instance.apply_policy(&spec.policy);
            return Ok(instance);
        }
    }
    let info = gguf::inspect(&spec.path).map_err(|reason| Error::BadModel { path: spec.path.clone(), reason })?;
    Ok(shared.table.get_or_insert(spec, info, stamp))
}

fn refuse_if_shutting_down(shared: &Shared) -> Result<()> {
    if shared.shutting_down.load(Ordering::SeqCst) {
        return Err(Error::Remote {
            kind: ErrorKind::Unavailable,
            message: "the llmctl daemon is shutting down".into(),
        });
    }
    Ok(())
}

/// Loads the instance if needed and takes a slot on it.
fn ready_slot(
    shared: &Shared,
    instance: &Arc<Instance>,
    cancelled: &dyn Fn() -> bool,
    mut on_loading: impl FnMut(),
    on_queued: &mut dyn FnMut(usize),
) -> Result<Slot> {
    let env = shared.load_env();
    let deadline = Instant::now() + shared.settings.queue_timeout;
    for _ in 0..LOAD_ATTEMPTS {
        refuse_if_shutting_down(shared)?;
        instance.ensure_ready(&env, &mut on_loading, cancelled)?;
        match instance.acquire(deadline, cancelled, on_queued) {
            Ok(slot) => return Ok(slot),
            Err(AcquireError::NotReady) => continue,
            Err(AcquireError::Error(error)) => return Err(error),
        }
    }
    refuse_if_shutting_down(shared)?;
    Err(Error::Remote {
        kind: ErrorKind::Unavailable,
        message: format!("{} kept stopping while this request waited for it", instance.spec.name),
    })
}

fn run(shared: &Arc<Shared>, request: RunRequest, writer: &mut Writer) -> Result<()> {
    let request_started = Instant::now();
    let instance = instance_for(shared, &request.model)?;
    let place = shared.admission.enter().inspect_err(|_| instance.note_rejected())?;
    let client_socket = writer.get_ref().try_clone().map_err(|e| Error::io("cannot watch the client", e))?;
    let cancelled = || sys::peer_closed(&client_socket);
    // Both progress callbacks write to the client, one at a time.
    let progress_writer = std::cell::RefCell::new(&mut *writer);
    let mut slot = ready_slot(
        shared,
        &instance,
        &cancelled,
        || {
            let model = instance.spec.name.clone();
            let _ = send_final(&mut progress_writer.borrow_mut(), &Response::Loading { model });
        },
        &mut |position| {
            let _ = send_final(&mut progress_writer.borrow_mut(), &Response::Queued { position });
        },
    )?;
    drop(place);
    // A fault hook for the test suite: a handler that panics while it holds a slot.
    #[cfg(feature = "testing")]
    if request.prompt == "__llmctl_test_panic__" {
        panic!("fault injected by the test suite");
    }

    let mut first_token = true;
    let result = slot.client.generate(&request, |text, more_buffered| {
        if first_token {
            first_token = false;
            instance.note_first_token(request_started.elapsed());
        }
        protocol::write_message(writer, &Response::Token { text: text.to_string() })?;
        if !more_buffered {
            writer.flush()?;
        }
        Ok(())
    });
    let cancelled_by_client = matches!(result, Err(GenerateError::Cancelled));
    let outcome = match result {
        Ok(done) => {
            slot.record_usage(done.usage);
            drop(slot);
            let _ = send_final(writer, &Response::Done(done));
            Ok(())
        }
        // The client went away; dropping the HTTP response closed the upstream connection,
        // which makes llama-server stop generating and free the slot.
        Err(GenerateError::Cancelled) => {
            log::debug!("client of {} went away; generation cancelled", instance.spec.name);
            Ok(())
        }
        Err(GenerateError::Rejected(message)) => Err(Error::InvalidParameter { message }),
        Err(GenerateError::Stalled) => {
            drop(slot);
            let seconds = shared.settings.token_timeout.as_secs();
            log::warn!("{} produced no token for {seconds} s; restarting it", instance.spec.name);
            instance.stop(shared.stop_grace());
            Err(Error::Timeout {
                what: format!(
                    "waiting for a token from {}: none came for {seconds} s (token_timeout in the config); \
                     the instance was restarted",
                    instance.spec.name
                ),
            })
        }
        Err(GenerateError::Broken(message)) => {
            let replica = slot.replica;
            drop(slot);
            let error = match replica {
                Some(replica) => instance.remote_failed(replica, message),
                None => instance.generation_failed(message),
            };
            if matches!(error, Error::LlamaExited { .. }) {
                shared.events.publish(&instance, "crashed", Some(error.to_string()));
            }
            Err(error)
        }
    };
    let label = match &outcome {
        Ok(()) if cancelled_by_client => "cancelled".to_string(),
        Ok(()) => "ok".to_string(),
        Err(error) => error.kind().name().to_string(),
    };
    instance.note_outcome(&label);
    outcome
}

fn warm(shared: &Arc<Shared>, spec: &ModelSpec, writer: &mut Writer) -> Result<Arc<Instance>> {
    let instance = instance_for(shared, spec)?;
    let client_socket = writer.get_ref().try_clone().map_err(|e| Error::io("cannot watch the client", e))?;
    let cancelled = || sys::peer_closed(&client_socket);
    let slot = ready_slot(shared, &instance, &cancelled, || {}, &mut |_| {})?;
    let result = slot.client.ping();
    drop(slot);
    match result {
        Ok(()) => Ok(instance),
        Err(GenerateError::Broken(message)) => Err(instance.generation_failed(message)),
        Err(GenerateError::Stalled) => Err(Error::Timeout { what: format!("waiting for {} to answer", spec.name) }),
        Err(GenerateError::Rejected(message)) => Err(Error::Backend { model: spec.name.clone(), message }),
        Err(GenerateError::Cancelled) => Ok(instance),
    }
}

fn switch(shared: &Arc<Shared>, spec: &ModelSpec, wait: bool, exclusive: bool, writer: &mut Writer) -> Result<()> {
    refuse_if_shutting_down(shared)?;
    let instance = instance_for(shared, spec)?;
    if !wait {
        // The caller detaches; this thread goes on loading for the daemon.
        let _ = send_final(writer, &Response::Ok { message: Some(format!("loading {}", spec.name)) });
    }
    let env = shared.load_env();
    let loaded = instance.ensure_ready(&env, || {}, &|| false);
    if loaded.is_ok() && exclusive {
        for other in shared.table.all() {
            if !Arc::ptr_eq(&other, &instance) {
                other.stop(shared.stop_grace());
            }
        }
    }
    match (loaded, wait) {
        (Ok(_), true) => send_final(writer, &Response::Ok { message: None }).map_err(|e| Error::io("cannot reply", e)),
        (Err(error), true) => Err(error),
        (Ok(_), false) => Ok(()),
        (Err(error), false) => {
            log::warn!("background load of {} failed: {error}", spec.name);
            Ok(())
        }
    }
}

/// Streams events to the client until it goes away or the daemon shuts down.
fn events(shared: &Arc<Shared>, writer: &mut Writer) -> Result<()> {
    let subscription = shared.events.subscribe();
    let client_socket = writer.get_ref().try_clone().map_err(|e| Error::io("cannot watch the client", e))?;
    // Tell the client it is subscribed, so nothing that happens after this is missed.
    send_final(writer, &Response::Ok { message: None }).map_err(|e| Error::io("cannot reply", e))?;
    loop {
        match subscription.recv_timeout(Duration::from_millis(200)) {
            Ok(event) => {
                if send_final(writer, &Response::Event(event)).is_err() {
                    return Ok(());
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if sys::peer_closed(&client_socket) || shared.shutting_down.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

fn stop(shared: &Arc<Shared>, model: Option<&ModelSpec>) -> usize {
    let instances = match model {
        Some(spec) => shared.table.for_path(&spec.path),
        None => shared.table.all(),
    };
    let running: Vec<_> = instances.into_iter().filter(|i| i.state() != crate::instance::State::Stopped).collect();
    std::thread::scope(|scope| {
        for instance in &running {
            scope.spawn(|| {
                instance.stop(shared.stop_grace());
                shared.events.publish(instance, "stopped", None);
            });
        }
    });
    running.len()
}

fn status(shared: &Arc<Shared>) -> StatusReport {
    let gpu = shared.gpu.fresh_reading();
    let budget = shared.budget(gpu.as_ref());
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
            evictions: shared.evictions.load(std::sync::atomic::Ordering::Relaxed),
            event_subscribers: shared.events.subscribers(),
        },
        queue: QueueStatus {
            depth: shared.admission.depth(),
            waiting: shared.admission.waiting(),
            rejected: shared.admission.rejected(),
        },
        instances: shared
            .table
            .all()
            .iter()
            .map(|instance| {
                let mut status = instance.status(shared.settings.crash_loop);
                status.vram_bytes = status.pid.and_then(|pid| gpu.as_ref()?.used_by_pid.get(&pid).copied());
                status
            })
            .collect(),
    }
}
