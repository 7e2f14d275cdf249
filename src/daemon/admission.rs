//! Admission: how a request gets a slot, from whichever door it came in (the Unix socket or
//! HTTP).
//!
//! A request for a ready instance with a free slot takes a lent slot from the instance's
//! handle at once: no queue place, no message to the worker (see `instance::lease`).
//! Otherwise it takes a place in the daemon-wide queue (`daemon::queue`), sends the worker
//! a job and waits for its slot on a channel, checking every [`CLIENT_CHECK`] that its
//! client is still there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use super::shared::Shared;
use crate::error::{Error, Result};
use crate::gguf::{self, ModelInfo};
use crate::instance::{FileStamp, Handle, Job, JobEvent, JobId, Lease, Message};
use crate::model::ModelSpec;

/// How often a request waiting for its slot checks that its client is still there. The slot
/// itself arrives on a channel the moment it is free; this only bounds how long a client
/// that left keeps its place.
pub(crate) const CLIENT_CHECK: Duration = Duration::from_millis(100);

/// A model file that changed since its instance loaded it: its header and stamp.
pub(crate) type NewFile = (ModelInfo, FileStamp);

/// What a waiting request tells its client, and how it knows the client left.
pub(crate) trait Waiter {
    /// The model is being loaded for this request (once).
    fn loading(&mut self, model: &str);
    /// The request waits for a slot at this place (1 = next).
    fn queued(&mut self, position: usize);
    /// The load it waits for is at this place in line, with this estimated wait.
    fn waiting(&mut self, _model: &str, _position: usize, _eta_ms: u64) {}
    /// True once the client has gone away.
    fn gone(&self) -> bool;
}

/// A waiter that tells nobody and never leaves (a background load).
pub(crate) struct Detached;

impl Waiter for Detached {
    fn loading(&mut self, _model: &str) {}
    fn queued(&mut self, _position: usize) {}
    fn gone(&self) -> bool {
        false
    }
}

/// The instance for `spec`, after checking the file again: it may have been replaced since
/// the instance loaded it. Returns the file as found when it differs from the instance's.
pub(crate) fn instance_for(shared: &Shared, spec: &ModelSpec) -> Result<(Arc<Handle>, Option<NewFile>)> {
    shared.refuse_if_shutting_down()?;
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

/// A slot on `instance` for request `id` about `spec`: a lent one at once when there is one,
/// else through the queue and the worker, at the place `id` gives it (a request sent again
/// keeps the number it was first sent with).
pub(crate) fn lease(
    shared: &Shared,
    instance: &Handle,
    spec: &ModelSpec,
    id: JobId,
    file: Option<NewFile>,
    waiter: &mut dyn Waiter,
) -> Result<Lease> {
    if file.is_none() {
        if let Some(lease) = instance.take_lent(&spec.policy) {
            return Ok(told_if_waiting_in_child(lease, waiter));
        }
    }
    let _place = shared.admission.enter().map_err(|error| {
        instance.note_rejected();
        // The wait it is told: what the requests ahead take on this model, as measured.
        match error {
            Error::Busy { message, per_model, .. } => {
                let snapshot = instance.snapshot();
                let slots = snapshot.view.slots.max(1) as usize;
                let retry_after_ms =
                    crate::instance::policy::retry_after_ms(snapshot.stats.service_ms, shared.admission.depth(), slots);
                Error::Busy { message, retry_after_ms, per_model }
            }
            other => other,
        }
    })?;
    Ok(told_if_waiting_in_child(acquire(shared, instance, spec, id, file, waiter)?, waiter))
}

/// A request sent to a child whose slots are all busy waits inside it, next in line: its
/// client hears so, as from the queue.
fn told_if_waiting_in_child(lease: Lease, waiter: &mut dyn Waiter) -> Lease {
    if lease.waits_in_child() {
        waiter.queued(1);
    }
    lease
}

/// Sends a job to `instance` and waits for its slot: a blocking receive, woken by the
/// worker the moment a slot is free. Every [`CLIENT_CHECK`] it looks whether the client
/// left, and if so gives its place up.
fn acquire(
    shared: &Shared,
    instance: &Handle,
    spec: &ModelSpec,
    id: JobId,
    file: Option<NewFile>,
    waiter: &mut dyn Waiter,
) -> Result<Lease> {
    let (events, replies) = crossbeam_channel::unbounded();
    let job = Job { id, events, policy: spec.policy.clone(), file };
    if !instance.send(Message::Arrive(job)) {
        return Err(Error::Stopped { message: "the llmctl daemon is shutting down".into() });
    }
    let deadline = Instant::now() + shared.settings.queue_timeout;
    loop {
        match replies.recv_timeout(CLIENT_CHECK.min(deadline.saturating_duration_since(Instant::now()))) {
            Ok(JobEvent::Granted(lease)) => return Ok(*lease),
            Ok(JobEvent::Failed(error)) => return Err(error),
            Ok(JobEvent::Loading) => waiter.loading(&spec.name),
            Ok(JobEvent::Queued(position)) => waiter.queued(position),
            Ok(JobEvent::Waiting { position, eta_ms }) => waiter.waiting(&spec.name, position, eta_ms),
            Err(RecvTimeoutError::Timeout) => {
                let error = if waiter.gone() {
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
