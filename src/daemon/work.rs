//! A request's life on a slot, the same from either door (the Unix socket or HTTP): the
//! instance found, a lease taken (see `admission`), the work done on it, and the outcome
//! decided (see `instance::outcome`): the slot back before the client hears `done`, a
//! cancellation noted, another server tried when a remote one failed before answering, a
//! failure classified by what happened to the lease's own child.

use std::time::{Duration, Instant};

use super::admission::{self, Waiter};
use super::shared::Shared;
use crate::backend::GenerateError;
use crate::error::{Error, Result};
use crate::instance::outcome::{self, Facts, Verdict};
use crate::instance::{Lease, Message};
use crate::model::ModelSpec;
use crate::protocol::Done;

/// How many servers of a remote model one request tries.
const MAX_REPLICA_TRIES: usize = 4;
/// How long a broken stream waits to learn whether its child died.
const EXIT_PATIENCE: Duration = Duration::from_millis(500);

/// What one try on a lease came to.
pub(crate) struct Attempt {
    pub(crate) result: std::result::Result<Done, GenerateError>,
    /// Some of the answer reached the client (so another server cannot be tried).
    pub(crate) answered: bool,
    /// The outcome when the backend finished (see [`Facts::ok`]).
    pub(crate) ok: Option<&'static str>,
    pub(crate) first_token: Option<Duration>,
}

impl Attempt {
    /// The outcome of a finished answer with HTTP `status`: llama-server's own errors are
    /// passed on as they are, and counted by their class.
    pub(crate) fn ok_for_status(status: u16) -> Option<&'static str> {
        Some(match status {
            400..=499 => crate::error::ErrorKind::Data.name(),
            500.. => crate::error::ErrorKind::Backend.name(),
            _ => "ok",
        })
    }
}

/// Admits a request for `spec`, waits for a slot (telling `waiter` about loading and
/// queueing), and runs `work` on the lease; for a remote model, a server that fails before
/// answering is left out and `work` runs again on another.
pub(crate) fn on_lease(
    shared: &Shared,
    spec: &ModelSpec,
    waiter: &mut dyn Waiter,
    mut work: impl FnMut(&Lease, Instant) -> Attempt,
) -> Result<Done> {
    let (instance, mut file) = admission::instance_for(shared, spec)?;
    let (mut replicas_tried, mut resent) = (0, false);
    // Every try keeps the request's first place in the queue.
    let id = shared.next_job();
    loop {
        let started = Instant::now();
        let mut lease = admission::lease(shared, &instance, spec, id, file.take(), waiter)?;
        let (verdict, marks, replica, answered) = loop {
            let progress = lease.generation.progress();
            let tried = work(&lease, started);
            lease.record_first_token(started, tried.first_token);
            let replica = lease.replica.map(|_| lease.client.base_url().to_string());
            let answered = tried.answered;
            let facts = Facts {
                model: &spec.name,
                stopped: lease.generation.is_stopped(),
                replica: replica.as_deref(),
                answered,
                others_served: lease.generation.progress() != progress,
                ok: tried.ok,
                token_timeout_s: shared.settings.token_timeout.as_secs(),
            };
            let (verdict, marks) =
                outcome::classify(tried.result, &facts, || lease.generation.wait_ended(EXIT_PATIENCE));
            match verdict {
                // On the same lease and child, for as long as it could have waited in the
                // queue: its place among the waiting stays, and a drain waits for it as for
                // any request in flight.
                Verdict::Again if started.elapsed() < shared.settings.queue_timeout => {
                    log::info!(
                        "a request for {} waited {} s inside its busy child without an answer; it is sent again",
                        spec.name,
                        shared.settings.token_timeout.as_secs()
                    );
                }
                Verdict::Again => {
                    // Not the child's fault: it is not restarted.
                    let error = Error::Timeout {
                        what: format!(
                            "waiting for a free slot on {} ({} s): it served others all along",
                            spec.name,
                            shared.settings.queue_timeout.as_secs()
                        ),
                    };
                    let marks = outcome::Marks {
                        outcome: Some(crate::error::ErrorKind::Timeout.name()),
                        stalled: false,
                        replica_failed: false,
                    };
                    break (Verdict::Failed(error), marks, replica, false);
                }
                verdict => break (verdict, marks, replica, answered),
            }
        };
        lease.report.outcome = marks.outcome;
        lease.report.stalled = marks.stalled;
        lease.report.replica_failed = marks.replica_failed;
        match verdict {
            Verdict::Finished(done) => {
                lease.report.usage = done.usage;
                drop(lease);
                return Ok(done);
            }
            Verdict::Cancelled => {
                log::debug!("the client of {} went away; its request was cancelled", spec.name);
                return Err(Error::Interrupted);
            }
            Verdict::OtherReplica => {
                log::warn!("the server {} for {} failed before answering", replica.unwrap_or_default(), spec.name);
                drop(lease);
                replicas_tried += 1;
                if replicas_tried == MAX_REPLICA_TRIES {
                    return Err(Error::RemoteDown {
                        message: format!("every server for {} failed; they are retried with backoff", spec.name),
                    });
                }
            }
            Verdict::Again => unreachable!("a request is sent again on its lease"),
            // A request that waited inside a child that crashed, stalled or was restarted
            // for a stalled request never started: it goes to the next child, once (the
            // crash may have been its own doing after all), at its place in the queue. A
            // stall it saw itself still restarts the child (its lease says so).
            Verdict::Failed(ref error)
                if lease.waits_in_child()
                    && !answered
                    && !resent
                    && (matches!(error, Error::LlamaExited { .. })
                        || marks.stalled
                        || (matches!(error, Error::Stopped { .. }) && lease.generation.restarted())) =>
            {
                log::info!(
                    "a request for {} waited inside a child that crashed or stalled; it is sent to the next",
                    spec.name
                );
                resent = true;
                lease.report.outcome = None;
                lease.report.counted_again = true;
                drop(lease);
            }
            Verdict::Failed(error) => {
                if replica.is_none() && matches!(error, Error::Backend { .. }) {
                    // The stream broke and the child has not been seen to die: its worker
                    // looks now rather than at its next liveness check.
                    instance.send(Message::Suspect { generation: lease.generation.number });
                }
                return Err(error);
            }
        }
    }
}

/// Loads `spec` (unless loaded) and proves it answers a one-token request: `warm` and
/// `switch`, through admission like every request.
pub(crate) fn load(shared: &Shared, spec: &ModelSpec, waiter: &mut dyn Waiter) -> Result<()> {
    on_lease(shared, spec, waiter, |lease, _| {
        let result = match lease.client.ping() {
            // A ping cut short by its client still loaded the model.
            Ok(()) | Err(GenerateError::Cancelled) => Ok(Done::default()),
            Err(error) => Err(error),
        };
        Attempt { result, answered: false, ok: None, first_token: None }
    })
    .map(|_| ())
}
