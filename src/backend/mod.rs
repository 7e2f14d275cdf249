//! Backends serve requests for an instance: a llama-server child that llmctl spawns and
//! owns, or a server that already runs elsewhere. Reading in order:
//!
//! - [`local`]: a child's command line, its output captured into a log and a bounded tail,
//!   and the port or socket it listens on;
//! - [`client`]: HTTP to a child (over its Unix socket, [`unix`]) or to a remote server
//!   (TCP or TLS), with health checks that have their own short timeouts;
//! - [`bodies`]: the request bodies of `llmctl run`, built from its options;
//! - [`generate`]: a generation streamed token by token, for `run` and `chat`;
//! - [`forward`]: an HTTP request passed on unchanged and its answer relayed as it comes,
//!   for `serve`;
//! - [`sse`]: the one reader of server-sent events, with a cap on line length, under both;
//! - [`slots`]: llama-server's slot API, to save a slot's prompt cache and restore it.
//!
//! This layer does HTTP and parsing; it never sends signals (see `process`).

pub(crate) mod bodies;
pub(crate) mod client;
pub(crate) mod forward;
pub(crate) mod generate;
pub(crate) mod local;
pub(crate) mod slots;
pub(crate) mod sse;
pub mod unix;

/// How a request to a backend failed, for the caller to classify with what it knows of the
/// child (see `instance::outcome`).
#[derive(Debug)]
pub(crate) enum GenerateError {
    /// The reader of the answer went away; the upstream request was dropped.
    Cancelled,
    /// llama-server refused the request (HTTP 4xx): a parameter it cannot take.
    Rejected(String),
    /// No bytes came for the per-read timeout.
    Stalled,
    /// The connection failed, the server answered 5xx or broke the protocol: the caller
    /// checks the child.
    Broken(String),
}
