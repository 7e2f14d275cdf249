//! The one error type of llmctl and the exit-status table.
//!
//! Every failure a user can meet is a variant here, carrying the context the message needs.
//! `exit_code()` is the single mapping from failures to exit statuses; `main` is the only
//! place that turns it into the process status. Errors cross the daemon socket as an
//! [`ErrorKind`] plus message, so the client picks the same exit code the daemon meant.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How many known models an error names; a models directory of hundreds would make the
/// message pages long.
const NAMES_SHOWN: usize = 12;

/// Exit statuses. What each means is said once, in [`EXIT_STATUSES`]; `--help`, the man
/// page and the README's table are made from (or checked against) it.
pub mod exit {
    pub const OK: i32 = 0;
    pub const INTERNAL: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const DATA: i32 = 65;
    pub const NOT_FOUND: i32 = 66;
    pub const UNAVAILABLE: i32 = 69;
    pub const BACKEND: i32 = 70;
    pub const NO_CAPACITY: i32 = 73;
    pub const BUSY: i32 = 75;
    pub const TIMEOUT: i32 = 124;
    pub const INTERRUPTED: i32 = 130;
}

/// Every exit status and what it means.
pub const EXIT_STATUSES: &[(i32, &str)] = &[
    (exit::OK, "success; also when the reader of stdout went away"),
    (exit::INTERNAL, "unexpected internal error (a bug)"),
    (exit::USAGE, "bad command line"),
    (
        exit::DATA,
        "bad input data: not a GGUF file, truncated file, invalid parameter, bad config, a download whose \
         SHA-256 does not match",
    ),
    (
        exit::NOT_FOUND,
        "model not found: no such file, unknown alias, demo not installed, no such Hub repository or no GGUF \
         file in it for `pull`",
    ),
    (
        exit::UNAVAILABLE,
        "unavailable: daemon cannot be reached or started, no llama-server binary, stopped by `llmctl stop`, \
         an environment failure (disk, permissions), the Hub refused access (set `HF_TOKEN`) or a download broke \
         off",
    ),
    (exit::BACKEND, "the backend failed: llama-server exited or crashed while loading or generating"),
    (exit::NO_CAPACITY, "no capacity: the model cannot fit the memory budget"),
    (exit::BUSY, "busy, try later: admission queue full or per-model limit reached"),
    (exit::TIMEOUT, "timed out: load, queue wait or generation deadline"),
    (exit::INTERRUPTED, "interrupted (SIGINT)"),
];

/// The class of a failure, as carried over the socket. Each kind has one exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Internal,
    Usage,
    Data,
    NotFound,
    Unavailable,
    Backend,
    NoCapacity,
    Busy,
    Timeout,
    Interrupted,
    /// Unavailable because no llama-server binary was found: the case first use sets up.
    NoLlamaServer,
    /// Unavailable because the daemon is shutting down: a client waits for it to exit.
    ShuttingDown,
}

impl ErrorKind {
    /// The name on the wire and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Internal => "internal",
            ErrorKind::Usage => "usage",
            ErrorKind::Data => "data",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Backend => "backend",
            ErrorKind::NoCapacity => "no_capacity",
            ErrorKind::Busy => "busy",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::NoLlamaServer => "no_llama_server",
            ErrorKind::ShuttingDown => "shutting_down",
        }
    }

    /// The HTTP status `serve` answers a failure of this kind with (a model's own queue
    /// limit is 429 rather than 503; `serve` tells the two apart).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::Usage | ErrorKind::Data => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Unavailable | ErrorKind::Busy | ErrorKind::NoLlamaServer | ErrorKind::ShuttingDown => 503,
            ErrorKind::Backend => 502,
            ErrorKind::NoCapacity => 507,
            ErrorKind::Timeout => 504,
            ErrorKind::Internal | ErrorKind::Interrupted => 500,
        }
    }

    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Internal => exit::INTERNAL,
            ErrorKind::Usage => exit::USAGE,
            ErrorKind::Data => exit::DATA,
            ErrorKind::NotFound => exit::NOT_FOUND,
            ErrorKind::Unavailable => exit::UNAVAILABLE,
            ErrorKind::Backend => exit::BACKEND,
            ErrorKind::NoCapacity => exit::NO_CAPACITY,
            ErrorKind::Busy => exit::BUSY,
            ErrorKind::Timeout => exit::TIMEOUT,
            ErrorKind::Interrupted => exit::INTERRUPTED,
            ErrorKind::NoLlamaServer | ErrorKind::ShuttingDown => exit::UNAVAILABLE,
        }
    }
}

/// Cloneable, so one failure (a refused load, a stop) can answer every request that waited
/// on it.
#[derive(Debug, Clone)]
pub enum Error {
    /// The command line was wrong in a way clap could not see.
    Usage { message: String },
    /// A model path that does not exist.
    ModelNotFound { path: PathBuf },
    /// A name that is neither a file nor an alias.
    UnknownModel { name: String },
    /// Something of a model that exists only once it was loaded (its log) is not there.
    NotLoaded { message: String },
    /// The demo model is not installed.
    DemoMissing,
    /// A file that is not a usable GGUF model.
    BadModel { path: PathBuf, reason: String },
    /// The config file could not be read or parsed.
    BadConfig { path: PathBuf, reason: String },
    /// A request parameter the backend cannot take.
    InvalidParameter { message: String },
    /// No llama-server binary could be found.
    NoLlamaServer { searched: String },
    /// The daemon could not be reached or started.
    DaemonUnavailable { socket: PathBuf, reason: String },
    /// The daemon is stopping its instances before it exits, and takes no new connection.
    ShuttingDown { pid: u32 },
    /// Another daemon already owns the socket or the state directory; `socket` is where
    /// it listens.
    DaemonRunning { socket: PathBuf, pid: Option<u32> },
    /// The daemon at the socket belongs to another user.
    ForeignDaemon { uid: u32 },
    /// The daemon and the client speak different protocol versions.
    ProtocolMismatch { daemon: u32, client: u32 },
    /// `serve` cannot listen on an address: the daemon or another program holds it.
    AddressInUse { address: String, by: String },
    /// A request to `serve` names no model it knows, and there is no default.
    NoDefaultModel { asked: Option<String>, known: Vec<String> },
    /// A file named on the command line (a schema, a grammar) does not exist.
    FileNotFound { what: String, path: PathBuf },
    /// llama-server exited while loading or generating.
    LlamaExited { model: String, status: String, stderr_tail: String },
    /// llama-server answered with an error or broke the protocol.
    Backend { model: String, message: String },
    /// The daemon refused the request: queue full or per-model limit.
    /// `per_model`: the model's own queue limit, rather than the daemon's whole queue.
    Busy { message: String, retry_after_ms: u64, per_model: bool },
    /// The model cannot fit the memory budget.
    NoCapacity { message: String },
    /// A deadline passed.
    Timeout { what: String },
    /// The instance was stopped or unloaded under the request; the message says by what.
    Stopped { message: String },
    /// The remote server of a model failed or is down.
    RemoteDown { message: String },
    /// The user pressed Ctrl-C.
    Interrupted,
    /// `llmctl setup` could not finish.
    Setup { message: String },
    /// An I/O failure with what was being done: exit 69, the environment is at fault.
    Io { context: String, source: std::sync::Arc<std::io::Error> },
    /// An error reported by the daemon, already classified.
    FromDaemon { kind: ErrorKind, message: String },
    /// A name that is neither a file nor an alias, with the known names closest to it;
    /// `pullable` when it reads as a Hugging Face repository `llmctl pull` could fetch.
    UnknownModelNear { name: String, suggestions: Vec<String>, pullable: bool },
    /// The Hugging Face Hub has no such repository, or no GGUF file in it that matches.
    HubNotFound { repo: String, reason: String },
    /// The Hub refused access (HTTP 401 or 403): a gated or private repository.
    HubDenied { repo: String, status: u16, token_set: bool },
    /// A download from the Hub failed or broke off; what arrived is kept for a resume.
    Download { file: String, reason: String },
    /// A downloaded file does not have the digest the Hub lists; it was deleted.
    ChecksumMismatch { file: String, expected: String, actual: String },
    /// `llmctl rm` was given a model llmctl did not download.
    NotPulled { name: String, path: Option<PathBuf> },
    /// A bug.
    Internal { message: String },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source: std::sync::Arc::new(source) }
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::Internal { message: message.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Usage { .. } => ErrorKind::Usage,
            Error::ModelNotFound { .. } | Error::UnknownModel { .. } | Error::NotLoaded { .. } | Error::DemoMissing => {
                ErrorKind::NotFound
            }
            Error::BadModel { .. } | Error::BadConfig { .. } | Error::InvalidParameter { .. } => ErrorKind::Data,
            Error::NoLlamaServer { .. } => ErrorKind::NoLlamaServer,
            Error::ShuttingDown { .. } => ErrorKind::ShuttingDown,
            Error::DaemonUnavailable { .. }
            | Error::DaemonRunning { .. }
            | Error::ForeignDaemon { .. }
            | Error::ProtocolMismatch { .. }
            | Error::AddressInUse { .. }
            | Error::Setup { .. } => ErrorKind::Unavailable,
            Error::NoDefaultModel { .. } | Error::FileNotFound { .. } => ErrorKind::NotFound,
            Error::LlamaExited { .. } | Error::Backend { .. } => ErrorKind::Backend,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Stopped { .. } | Error::RemoteDown { .. } => ErrorKind::Unavailable,
            Error::NoCapacity { .. } => ErrorKind::NoCapacity,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Interrupted => ErrorKind::Interrupted,
            // What fails on I/O is the environment (a full disk, a read-only or missing
            // directory, a permission), not llmctl: unavailable, with what was being done.
            Error::Io { .. } => ErrorKind::Unavailable,
            Error::Internal { .. } => ErrorKind::Internal,
            Error::FromDaemon { kind, .. } => *kind,
            Error::UnknownModelNear { .. } | Error::HubNotFound { .. } => ErrorKind::NotFound,
            Error::HubDenied { .. } | Error::Download { .. } => ErrorKind::Unavailable,
            Error::ChecksumMismatch { .. } => ErrorKind::Data,
            Error::NotPulled { .. } => ErrorKind::Usage,
        }
    }

    pub fn exit_code(&self) -> i32 {
        self.kind().exit_code()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage { message } => write!(f, "{message}"),
            Error::ModelNotFound { path } => write!(
                f,
                "model not found: {} does not exist; check the path or run `llmctl setup` for the demo model",
                path.display()
            ),
            Error::UnknownModel { name } => write!(
                f,
                "unknown model `{name}`: not a file and not an alias in the config file; \
                 give a path to a .gguf file or add `[models.{name}]` to the config"
            ),
            Error::NotLoaded { message } => write!(f, "{message}"),
            Error::DemoMissing => {
                write!(f, "the demo model is not installed; run `llmctl setup` to install it (94 MiB)")
            }
            Error::BadModel { path, reason } => {
                write!(f, "{} is not a usable GGUF model: {reason}", path.display())
            }
            Error::BadConfig { path, reason } => {
                write!(f, "bad config file {}: {reason}", path.display())
            }
            Error::InvalidParameter { message } => write!(f, "invalid parameter: {message}"),
            Error::NoLlamaServer { searched } => write!(
                f,
                "no llama-server binary found (searched {searched}); run `llmctl setup` to build \
                 one, or name one with `llama_server = \"PATH\"` in the config or LLMCTL_LLAMA_SERVER \
                 and restart the daemon with `llmctl shutdown` (a running daemon keeps the one it \
                 started with)"
            ),
            Error::ShuttingDown { pid } => write!(
                f,
                "the llmctl daemon (pid {pid}) is shutting down: it is stopping its instances and takes no new requests"
            ),
            Error::DaemonUnavailable { socket, reason } => write!(
                f,
                "cannot reach the llmctl daemon at {}: {reason}; start it with `llmctl daemon` \
                 or check its log with `llmctl logs --daemon`",
                socket.display()
            ),
            Error::DaemonRunning { socket, pid } => match pid {
                Some(pid) => write!(
                    f,
                    "another llmctl daemon (pid {pid}) already serves {}; stop it with `llmctl shutdown`",
                    socket.display()
                ),
                None => write!(
                    f,
                    "another llmctl daemon already serves {}; stop it with `llmctl shutdown`",
                    socket.display()
                ),
            },
            Error::ForeignDaemon { uid } => {
                write!(f, "the llmctl daemon at this socket belongs to another user (uid {uid})")
            }
            Error::ProtocolMismatch { daemon, client } => write!(
                f,
                "the daemon speaks protocol {daemon} but this client speaks {client}; restart the daemon with \
                 `llmctl shutdown`"
            ),
            Error::AddressInUse { address, by } => write!(f, "cannot serve on {address}: {by}"),
            Error::NoDefaultModel { asked, known } => {
                match asked {
                    Some(name) => write!(f, "no model `{name}`")?,
                    None => write!(f, "no `model` given")?,
                }
                write!(f, " and no default_model or answers_to in the config; known models: ")?;
                match known.len() {
                    0 => write!(f, "none is configured"),
                    count if count <= NAMES_SHOWN => write!(f, "{}", known.join(", ")),
                    count => write!(
                        f,
                        "{} and {} more (GET /v1/models lists them all)",
                        known[..NAMES_SHOWN].join(", "),
                        count - NAMES_SHOWN
                    ),
                }
            }
            Error::FileNotFound { what, path } => write!(f, "{what}: no file {}", path.display()),
            Error::LlamaExited { model, status, stderr_tail } => {
                write!(f, "llama-server for {model} {status}")?;
                if stderr_tail.trim().is_empty() {
                    write!(f, " without output")
                } else {
                    write!(f, "; its last output:\n{}", stderr_tail.trim_end())
                }
            }
            Error::Backend { model, message } => write!(f, "llama-server for {model}: {message}"),
            Error::Busy { message, retry_after_ms, .. } => {
                write!(f, "{message}; try again in {:.1} s", *retry_after_ms as f64 / 1000.0)
            }
            Error::NoCapacity { message } => write!(f, "{message}"),
            Error::Timeout { what } => write!(f, "timed out {what}"),
            Error::Stopped { message } | Error::RemoteDown { message } => write!(f, "{message}"),
            Error::Interrupted => write!(f, "interrupted"),
            Error::Setup { message } => write!(f, "setup failed: {message}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::FromDaemon { message, .. } => write!(f, "{message}"),
            Error::Internal { message } => write!(f, "internal error (a bug in llmctl): {message}"),
            Error::UnknownModelNear { name, suggestions, pullable } => {
                write!(f, "unknown model `{name}`: ")?;
                if !suggestions.is_empty() {
                    let quoted: Vec<String> = suggestions.iter().map(|s| format!("`{s}`")).collect();
                    write!(f, "did you mean {}? ", quoted.join(" or "))?;
                } else {
                    write!(f, "not a file, an alias or a pulled model; ")?;
                }
                if *pullable {
                    write!(f, "`llmctl pull {name}` downloads it from the Hugging Face Hub, ")?;
                }
                write!(f, "`llmctl ls` lists the models llmctl can run")
            }
            Error::HubNotFound { repo, reason } => write!(f, "cannot pull {repo}: {reason}"),
            Error::HubDenied { repo, status, token_set } => {
                write!(f, "the Hugging Face Hub refused access to {repo} (HTTP {status}): ")?;
                if *token_set {
                    write!(f, "the token in HF_TOKEN cannot read it; accept the model's terms on its Hub page or use another token")
                } else {
                    write!(
                        f,
                        "it is gated, private or does not exist; set HF_TOKEN to an access token that can read it"
                    )
                }
            }
            Error::Download { file, reason } => write!(f, "download of {file} failed: {reason}"),
            Error::ChecksumMismatch { file, expected, actual } => write!(
                f,
                "{file} arrived damaged: its SHA-256 is {actual}, the Hub lists {expected}; the file was deleted, \
                 run the same `llmctl pull` again"
            ),
            Error::NotPulled { name, path } => match path {
                Some(path) => write!(
                    f,
                    "`{name}` is {}, which `llmctl pull` did not download; llmctl removes only models it pulled \
                     (delete the file yourself if you mean to)",
                    path.display()
                ),
                None => write!(f, "`{name}` is not a file; llmctl removes only models it pulled"),
            },
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_documented_code() {
        let table = [
            (ErrorKind::Internal, 1),
            (ErrorKind::Usage, 2),
            (ErrorKind::Data, 65),
            (ErrorKind::NotFound, 66),
            (ErrorKind::Unavailable, 69),
            (ErrorKind::Backend, 70),
            (ErrorKind::NoCapacity, 73),
            (ErrorKind::Busy, 75),
            (ErrorKind::Timeout, 124),
            (ErrorKind::Interrupted, 130),
        ];
        for (kind, code) in table {
            assert_eq!(kind.exit_code(), code, "{kind:?}");
        }
    }

    #[test]
    fn every_kind_has_its_http_status() {
        let table = [
            (ErrorKind::Usage, 400),
            (ErrorKind::Data, 400),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::Backend, 502),
            (ErrorKind::NoCapacity, 507),
            (ErrorKind::Busy, 503),
            (ErrorKind::Timeout, 504),
            (ErrorKind::Internal, 500),
        ];
        for (kind, status) in table {
            assert_eq!(kind.http_status(), status, "{kind:?}");
        }
    }

    #[test]
    fn a_protocol_mismatch_reads_as_one_sentence() {
        let error = Error::ProtocolMismatch { daemon: 7, client: 8 };
        assert_eq!(
            error.to_string(),
            "the daemon speaks protocol 7 but this client speaks 8; restart the daemon with `llmctl shutdown`"
        );
    }

    #[test]
    fn remote_errors_keep_their_kind() {
        let error = Error::FromDaemon { kind: ErrorKind::Busy, message: "queue full".into() };
        assert_eq!(error.exit_code(), 75);
    }
}
