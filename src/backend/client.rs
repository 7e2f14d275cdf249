//! HTTP to one server: a llama-server child over its Unix socket (or loopback TCP with a
//! key), or a remote server llmctl fronts (TCP or TLS, with its own bearer token).
//!
//! Every call has a connect and a read timeout. Health checks have their own short ones
//! ([`PROBE_TIMEOUT`]): a child that accepts a connection and never answers must not make
//! its worker deaf for the token timeout. Connections are pooled; a pooled one the server
//! closed while it sat idle is retried once on a fresh connection.

use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::GenerateError;

/// The longest a health check or readiness probe waits to connect and for an answer.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle connections kept per child: enough for its parallel slots in most setups.
const IDLE_CONNECTIONS: usize = 16;

/// Timeouts for the HTTP calls to a server; every call has both.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    /// Longest wait for the next bytes of a response (the progress watchdog).
    pub(crate) read: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts { connect: Duration::from_secs(5), read: Duration::from_secs(300) }
    }
}

/// HTTP to one server.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    /// Keeps idle connections for reuse: a request then skips the handshake.
    pub(super) agent: ureq::Agent,
    /// Opens a fresh connection for every request: the retry when a pooled connection turns
    /// out to have been closed by the server while it sat idle.
    pub(super) fresh: ureq::Agent,
    /// Health checks, with their own short timeouts.
    probe: ureq::Agent,
    pub(super) base: String,
    /// `Authorization` header value for a remote server that wants a bearer token.
    pub(super) authorization: Option<String>,
}

impl Client {
    /// A client for a child on a loopback port that wants `api_key`.
    pub(crate) fn new(port: u16, api_key: &str, timeouts: Timeouts) -> Client {
        Client::for_url(&format!("http://127.0.0.1:{port}"), Some(api_key), None, timeouts)
    }

    /// A client for a child listening on the Unix socket at `path`.
    pub(crate) fn for_socket(path: &Path, timeouts: Timeouts) -> Client {
        let agent = |timeouts, idle| {
            ureq::Agent::with_parts(
                agent_config(None, timeouts, idle),
                super::unix::UnixConnector { path: path.to_path_buf() },
                super::unix::NoLookup,
            )
        };
        // The host only names the server in the Host header; the connector ignores it.
        Client {
            agent: agent(timeouts, IDLE_CONNECTIONS),
            fresh: agent(timeouts, 0),
            probe: agent(probe_timeouts(), 0),
            base: "http://localhost".into(),
            authorization: None,
        }
    }

    /// Reads the CA certificates in a PEM file, for [`Client::for_url`].
    pub(crate) fn load_ca_file(path: &Path) -> Result<ureq::tls::RootCerts, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => Some(Ok(cert)),
                Ok(_) => None,
                Err(error) => Some(Err(error)),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{} holds no certificate", path.display()));
        }
        Ok(ureq::tls::RootCerts::new_with_certs(&certs))
    }

    /// A client for a server llmctl does not run: `http://host:port` or `https://...`.
    pub(crate) fn for_url(
        base: &str,
        bearer: Option<&str>,
        roots: Option<&ureq::tls::RootCerts>,
        timeouts: Timeouts,
    ) -> Client {
        let tls = match roots {
            Some(roots) => ureq::tls::TlsConfig::builder().root_certs(roots.clone()).build(),
            None => ureq::tls::TlsConfig::default(),
        };
        // ureq's chain, with a TCP connector whose reads ask the cancel check.
        let agent = |timeouts, idle| {
            use ureq::unversioned::transport::{ConnectProxyConnector, Connector, RustlsConnector};
            let connector =
                ().chain(ConnectProxyConnector::default())
                    .chain(super::unix::TcpConnector)
                    .chain(RustlsConnector::default());
            ureq::Agent::with_parts(
                agent_config(Some(tls.clone()), timeouts, idle),
                connector,
                ureq::unversioned::resolver::DefaultResolver::default(),
            )
        };
        Client {
            agent: agent(timeouts, IDLE_CONNECTIONS),
            fresh: agent(timeouts, 0),
            probe: agent(probe_timeouts(), 0),
            base: base.trim_end_matches('/').to_string(),
            authorization: bearer.map(|token| format!("Bearer {token}")),
        }
    }

    pub(crate) fn base_url(&self) -> &str {
        &self.base
    }

    fn with_authorization<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("Authorization", value),
            None => request,
        }
    }

    fn post_with(&self, agent: &ureq::Agent, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        self.with_authorization(agent.post(format!("{}{path}", self.base)).header("Content-Type", "application/json"))
    }

    /// POSTs `body`, [`Client::retrying`] once on a fresh connection.
    pub(super) fn send(&self, path: &str, body: &str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        self.retrying(|agent| self.post_with(agent, path).send(body))
    }

    /// Makes `call` on a pooled connection and, when that fails before any byte of the
    /// answer (the server closed it while it sat idle, perhaps just as it was taken), once
    /// more on a fresh connection.
    pub(super) fn retrying<T>(&self, call: impl Fn(&ureq::Agent) -> Result<T, ureq::Error>) -> Result<T, ureq::Error> {
        match call(&self.agent) {
            Err(ureq::Error::Io(error)) if is_closed_connection(&error) => {
                log::debug!("a pooled connection to {} was closed ({error}); retrying on a new one", self.base);
                call(&self.fresh)
            }
            other => other,
        }
    }

    /// The status of `GET path` with the probe's short timeouts, its body read and dropped.
    fn probe_status(&self, path: &str) -> Result<u16, String> {
        let request = self.with_authorization(self.probe.get(format!("{}{path}", self.base)));
        match request.call() {
            Ok(mut response) => {
                let _ = response.body_mut().with_config().limit(1 << 20).read_to_vec();
                Ok(response.status().as_u16())
            }
            Err(error) => Err(error.to_string()),
        }
    }

    /// For a server llmctl does not run: `/health` (llama-server) or, where there is none,
    /// `/v1/models` (any OpenAI-compatible server) answers 200.
    pub(crate) fn remote_healthy(&self) -> Result<(), String> {
        match self.probe_status("/health")? {
            200 => Ok(()),
            404 => match self.probe_status("/v1/models")? {
                200 => Ok(()),
                other => Err(format!("/v1/models answered HTTP {other}")),
            },
            other => Err(format!("/health answered HTTP {other}")),
        }
    }

    /// True when `/health` answers 200 within the probe's timeout; false while loading, not
    /// yet listening, or not answering.
    pub(crate) fn healthy(&self) -> bool {
        self.probe_status("/health") == Ok(200)
    }

    /// A one-token completion, so the weights are paged in and the server proven to answer.
    pub(crate) fn ping(&self) -> Result<(), GenerateError> {
        let body = json!({"prompt": "Hello", "n_predict": 1, "stream": false});
        match self.send("/completion", &body.to_string()) {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let text = response.body_mut().with_config().limit(1 << 20).read_to_string().unwrap_or_default();
                if status == 200 {
                    Ok(())
                } else {
                    Err(GenerateError::Broken(error_message(&text).unwrap_or(format!("HTTP {status}"))))
                }
            }
            Err(error) => Err(classify_transport(error)),
        }
    }
}

fn probe_timeouts() -> Timeouts {
    Timeouts { connect: PROBE_TIMEOUT, read: PROBE_TIMEOUT }
}

/// The settings of every agent talking to a child or a remote server.
pub(super) fn agent_config(
    tls: Option<ureq::tls::TlsConfig>,
    timeouts: Timeouts,
    idle_connections: usize,
) -> ureq::config::Config {
    ureq::Agent::config_builder()
        .tls_config(tls.unwrap_or_default())
        .timeout_connect(Some(timeouts.connect))
        .timeout_per_read(Some(timeouts.read))
        .timeout_per_write(Some(timeouts.read))
        .http_status_as_error(false)
        // Credentials are given for one origin: a redirect is passed to the client, never
        // followed with them.
        .max_redirects(0)
        // A response dropped before its end (a cancelled generation) closes its connection,
        // which is how llama-server learns to stop; only connections whose answer was read
        // to the end go back to the pool.
        .max_idle_connections(idle_connections)
        .max_idle_connections_per_host(idle_connections)
        // ureq zeroes 128 KiB buffers per connection by default, which was the daemon's
        // largest cost per request (perf: page faults in memset). SSE lines and
        // llama-server's headers are small.
        .input_buffer_size(32 << 10)
        .output_buffer_size(16 << 10)
        .max_response_header_size(16 << 10)
        .build()
}

/// Reads what is left of a finished answer (the end of the chunked body), so its connection
/// can go back to the pool; a server that keeps talking is left to the drop.
pub(super) fn finish_body(reader: &mut impl Read) {
    let mut rest = [0u8; 256];
    for _ in 0..4 {
        match reader.read(&mut rest) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// True for the errors of a connection the server had already closed.
fn is_closed_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

pub(super) fn classify_transport(error: ureq::Error) -> GenerateError {
    match error {
        ureq::Error::Timeout(_) => GenerateError::Stalled,
        ureq::Error::Io(io) => classify_io(io),
        other => GenerateError::Broken(other.to_string()),
    }
}

pub(super) fn classify_io(error: io::Error) -> GenerateError {
    if super::unix::is_cancelled(&error) {
        return GenerateError::Cancelled;
    }
    let timed_out = matches!(error.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
        || error
            .get_ref()
            .is_some_and(|inner| matches!(inner.downcast_ref::<ureq::Error>(), Some(ureq::Error::Timeout(_))));
    if timed_out {
        GenerateError::Stalled
    } else {
        GenerateError::Broken(error.to_string())
    }
}

/// The message of an error answer: OpenAI's `{"error": {"message": ...}}` or a bare
/// `{"message": ...}`.
pub(super) fn error_message(body: &str) -> Option<String> {
    let value: Value = serde_json::from_str(body).ok()?;
    let error = value.get("error").unwrap_or(&value);
    error.get("message").and_then(Value::as_str).map(str::to_string)
}
