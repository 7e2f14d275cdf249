//! How a request on a lease ended, decided from what is known of it: the backend's result,
//! whether llmctl stopped the child, whether the model is remote and the answer had begun,
//! and (only when it matters) how the child ended. A pure function: the table below tests
//! every case without a process.

use super::lease::Ended;
use crate::backend::GenerateError;
use crate::error::Error;
use crate::protocol::Done;

/// What is known of the request when it ends.
#[derive(Debug, Clone)]
pub(crate) struct Facts<'a> {
    pub(crate) model: &'a str,
    /// `stop` or `shutdown` stopped the child under the request.
    pub(crate) stopped: bool,
    /// The remote server it ran on, for a remote model.
    pub(crate) replica: Option<&'a str>,
    /// Some of the answer already reached the client.
    pub(crate) answered: bool,
    /// The child served other requests while this one waited for its answer (tokens
    /// relayed, requests ended): no answer then is no stall of the child. A request sent to
    /// a child whose slots are all busy waits inside it.
    pub(crate) others_served: bool,
    /// The outcome of a finished request: "ok", or for a forwarded answer that carried an
    /// HTTP error status, the kind of that error; none for a load (`warm`), which counts
    /// as no request's outcome.
    pub(crate) ok: Option<&'static str>,
    /// The configured token timeout, for the message of a stalled request.
    pub(crate) token_timeout_s: u64,
}

/// What happens next.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// It finished; the client hears `done`.
    Finished(Done),
    /// The client went away: nobody is left to tell.
    Cancelled,
    /// A remote server failed before any byte of the answer: try another.
    OtherReplica,
    /// Nothing came for the token timeout while the child served others: the child is
    /// fine, the request is sent again.
    Again,
    Failed(Error),
}

/// What the lease reports for the instance's counters and its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marks {
    /// None for an attempt that is retried on another server: the retry counts.
    pub(crate) outcome: Option<&'static str>,
    /// No token came in time: the worker restarts the child.
    pub(crate) stalled: bool,
    /// The remote replica failed: the worker leaves it out for a while.
    pub(crate) replica_failed: bool,
}

/// Decides how the request ended. `ended` says how the lease's child ended, and is asked
/// only for a broken local stream (it may wait a moment for the worker to find out).
pub(crate) fn classify(
    result: Result<Done, GenerateError>,
    facts: &Facts<'_>,
    ended: impl FnOnce() -> Option<Ended>,
) -> (Verdict, Marks) {
    let marks = |outcome, stalled, replica_failed| Marks { outcome: Some(outcome), stalled, replica_failed };
    let error = match result {
        Ok(done) => {
            return (Verdict::Finished(done), Marks { outcome: facts.ok, stalled: false, replica_failed: false })
        }
        // `stop` or `shutdown` cut the stream off: whatever the transport says.
        Err(_) if facts.stopped => match ended() {
            Some(Ended::Stopped(message)) => Error::Stopped { message },
            _ => Error::Stopped { message: format!("{} was stopped", facts.model) },
        },
        // The client went away; dropping the connection upstream made the backend stop.
        Err(GenerateError::Cancelled) => return (Verdict::Cancelled, marks("cancelled", false, false)),
        Err(GenerateError::Broken(_)) if facts.replica.is_some() && !facts.answered => {
            return (Verdict::OtherReplica, Marks { outcome: None, stalled: false, replica_failed: true })
        }
        Err(GenerateError::Rejected(message)) => Error::InvalidParameter { message },
        Err(GenerateError::Stalled) if facts.others_served && !facts.answered => {
            return (Verdict::Again, Marks { outcome: None, stalled: false, replica_failed: false })
        }
        Err(GenerateError::Stalled) => {
            let error = Error::Timeout {
                what: format!(
                    "waiting for a token from {}: none came for {} s (token_timeout in the config); the instance \
                     was stopped, and the next request loads it again",
                    facts.model, facts.token_timeout_s
                ),
            };
            return (Verdict::Failed(error), marks(crate::error::ErrorKind::Timeout.name(), true, false));
        }
        Err(GenerateError::Broken(message)) => match facts.replica {
            Some(server) => {
                let error = Error::RemoteDown {
                    message: format!(
                        "the server {server} for {} failed: {message}; it is retried with backoff",
                        facts.model
                    ),
                };
                let name = error_name(&error);
                return (Verdict::Failed(error), marks(name, false, true));
            }
            None => match ended() {
                Some(Ended::Exited { status, stderr_tail }) => {
                    Error::LlamaExited { model: facts.model.to_string(), status, stderr_tail }
                }
                Some(Ended::Stopped(message)) => Error::Stopped { message },
                None => Error::Backend { model: facts.model.to_string(), message },
            },
        },
    };
    let name = error_name(&error);
    (Verdict::Failed(error), marks(name, false, false))
}

fn error_name(error: &Error) -> &'static str {
    error.kind().name()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn facts(stopped: bool, replica: Option<&'static str>, answered: bool) -> Facts<'static> {
        Facts { model: "m", stopped, replica, answered, others_served: false, ok: Some("ok"), token_timeout_s: 300 }
    }

    fn broken() -> Result<Done, GenerateError> {
        Err(GenerateError::Broken("connection reset".into()))
    }

    #[test]
    fn outcome_table() {
        let exited = || Some(Ended::Exited { status: "killed by signal 9".into(), stderr_tail: "  oom\n".into() });
        // (name, result, facts, how the child ended, verdict's error kind or a word, outcome)
        type Case =
            (&'static str, Result<Done, GenerateError>, Facts<'static>, Option<Ended>, &'static str, &'static str);
        let cases: Vec<Case> = vec![
            ("finished", Ok(Done::default()), facts(false, None, true), None, "finished", "ok"),
            (
                "the client left",
                Err(GenerateError::Cancelled),
                facts(false, None, true),
                None,
                "cancelled",
                "cancelled",
            ),
            (
                "stopped by llmctl, whatever the transport said",
                Err(GenerateError::Cancelled),
                facts(true, None, true),
                Some(Ended::Stopped("m was stopped by `llmctl stop`".into())),
                "unavailable",
                "unavailable",
            ),
            ("the child crashed", broken(), facts(false, None, true), exited(), "backend", "backend"),
            ("a broken stream with the child alive", broken(), facts(false, None, true), None, "backend", "backend"),
            (
                "a broken stream on a child llmctl stopped",
                broken(),
                facts(false, None, true),
                Some(Ended::Stopped("m was unloaded".into())),
                "unavailable",
                "unavailable",
            ),
            (
                "a remote server failed first: another",
                broken(),
                facts(false, Some("http://a"), false),
                None,
                "retry",
                "-",
            ),
            (
                "a remote server failed mid-answer",
                broken(),
                facts(false, Some("http://a"), true),
                None,
                "unavailable",
                "unavailable",
            ),
            (
                "refused parameters",
                Err(GenerateError::Rejected("bad".into())),
                facts(false, None, false),
                None,
                "data",
                "data",
            ),
            ("stalled", Err(GenerateError::Stalled), facts(false, None, true), None, "timeout", "timeout"),
            (
                "no answer while the child served others: sent again",
                Err(GenerateError::Stalled),
                Facts { others_served: true, ..facts(false, None, false) },
                None,
                "again",
                "-",
            ),
            (
                "stalled mid-answer while the child served others",
                Err(GenerateError::Stalled),
                Facts { others_served: true, ..facts(false, None, true) },
                None,
                "timeout",
                "timeout",
            ),
        ];
        for (name, result, facts, how, expected, outcome) in cases {
            let mut asked = false;
            let (verdict, marks) = classify(result, &facts, || {
                asked = true;
                how.clone()
            });
            let word = match &verdict {
                Verdict::Finished(_) => "finished",
                Verdict::Cancelled => "cancelled",
                Verdict::OtherReplica => "retry",
                Verdict::Again => "again",
                Verdict::Failed(error) => error.kind().name(),
            };
            assert_eq!(word, expected, "{name}: {verdict:?}");
            assert_eq!(marks.outcome.unwrap_or("-"), outcome, "{name}");
            if let Verdict::Failed(Error::LlamaExited { status, .. }) = &verdict {
                assert!(status.contains("signal 9"), "{name}: {status}");
            }
            let needs_exit = matches!(expected, "backend" | "unavailable") && facts.replica.is_none();
            assert!(asked || !needs_exit, "{name}: how the child ended was not asked");
        }
    }

    #[test]
    fn a_stall_restarts_and_a_remote_failure_marks_the_replica() {
        let (_, marks) = classify(Err(GenerateError::Stalled), &facts(false, None, true), || None);
        assert!(marks.stalled && !marks.replica_failed);
        let (verdict, marks) = classify(broken(), &facts(false, Some("http://a"), true), || None);
        assert!(marks.replica_failed);
        assert!(matches!(verdict, Verdict::Failed(error) if error.kind() == ErrorKind::Unavailable));
        let (_, marks) = classify(broken(), &facts(false, Some("http://a"), false), || None);
        assert!(marks.replica_failed, "a replica that failed before answering is left out too");
    }

    #[test]
    fn a_finished_forward_carries_the_outcome_of_its_status() {
        let mut forwarded = facts(false, None, true);
        forwarded.ok = Some("data");
        let (verdict, marks) = classify(Ok(Done::default()), &forwarded, || None);
        assert!(matches!(verdict, Verdict::Finished(_)));
        assert_eq!(marks.outcome, Some("data"));
    }
}
