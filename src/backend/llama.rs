//! The llama-server adapter: command line, output capture, readiness, and generation.
//!
//! The child gets `--port 0`, so the kernel picks a free port at bind time and there is no
//! pick-then-bind race; the port comes from the child's own log line
//! `listening on http://127.0.0.1:PORT`, which llama-server prints once the model is loaded.
//! Readiness is then confirmed by polling `/health`. Output goes through a pipe that a
//! thread drains into the per-instance log file and a bounded in-memory tail, so a child can
//! never block on a full pipe and an error can quote its last lines.
//!
//! This module does HTTP and parsing; it never sends signals (see `process`).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::gguf::ModelInfo;
use crate::model::ModelSpec;
use crate::protocol::{Done, Mode, RunRequest, Usage};

/// Lines of child output kept in memory for error messages.
const TAIL_LINES: usize = 40;
/// Lines quoted in an error message.
const QUOTED_LINES: usize = 12;
/// How often readiness is checked; DESIGN.md asks for 10-25 ms.
pub const READY_POLL: Duration = Duration::from_millis(10);

/// The last lines a child printed, and when it last printed anything.
#[derive(Debug)]
pub struct OutputTail {
    inner: Mutex<TailInner>,
}

#[derive(Debug)]
struct TailInner {
    lines: VecDeque<String>,
    last_output: Instant,
}

impl OutputTail {
    /// An empty tail, for an instance whose output llmctl does not capture (a remote one).
    pub fn empty() -> OutputTail {
        OutputTail { inner: Mutex::new(TailInner { lines: VecDeque::new(), last_output: Instant::now() }) }
    }

    fn push(&self, line: &str) {
        let mut inner = self.inner.lock();
        if inner.lines.len() == TAIL_LINES {
            inner.lines.pop_front();
        }
        inner.lines.push_back(line.trim_end().to_string());
        inner.last_output = Instant::now();
    }

    /// The last lines, for an error message.
    pub fn quote(&self) -> String {
        let inner = self.inner.lock();
        let skip = inner.lines.len().saturating_sub(QUOTED_LINES);
        inner.lines.iter().skip(skip).map(|line| format!("  {line}\n")).collect()
    }

    pub fn last_output(&self) -> Instant {
        self.inner.lock().last_output
    }
}

/// Where a child listens; either way only llmctl can use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket in llmctl's private runtime directory: no TCP port at all.
    Socket(PathBuf),
    /// A loopback TCP port the kernel picks, guarded by a key only the daemon knows (passed
    /// in the child's environment, which other users cannot read, never in its argv) and a
    /// CORS origin no browser page has.
    Tcp { api_key: String },
}

/// The only origin a child allows for CORS: reserved (RFC 6761), so no web page has it
/// (llama-server's default is every origin).
const NO_ORIGIN: &str = "http://llmctl.invalid";

/// The llama-server command line for `spec`, whose file's header is `info`.
pub fn command(binary: &Path, spec: &ModelSpec, info: &ModelInfo, listen: &Listen) -> Command {
    let mut command = Command::new(binary);
    // The alias names the model in llama-server's answers, as the client named it.
    command.arg("--model").arg(&spec.path).arg("--alias").arg(&spec.name);
    match listen {
        Listen::Socket(path) => {
            command.arg("--host").arg(path).args(["--cors-origins", NO_ORIGIN]);
            // A key the user set for their own servers would lock llmctl out.
            command.env_remove("LLAMA_API_KEY");
        }
        Listen::Tcp { api_key } => {
            command.args(["--host", "127.0.0.1", "--port", "0", "--cors-origins", NO_ORIGIN]);
            command.env("LLAMA_API_KEY", api_key);
        }
    }
    command.args(["--no-webui", "--log-colors", "off"]).arg("--parallel").arg(spec.load.parallel.to_string());
    if let Some(ctx_size) = spec.load.ctx_size {
        command.arg("--ctx-size").arg(ctx_size.to_string());
    }
    if let Some(gpu_layers) = spec.load.gpu_layers {
        command.arg("--n-gpu-layers").arg(gpu_layers.to_string());
    }
    if spec.load.embeddings {
        command.arg("--embeddings");
        // A chat model's header names no pooling, and llama-server then gives one vector
        // per token, which the OpenAI endpoint refuses: average them instead.
        let pooling_given = spec.load.extra_args.iter().any(|arg| arg.starts_with("--pooling"));
        if info.pooling_type.is_none() && !pooling_given {
            command.args(["--pooling", "mean"]);
        }
    }
    if spec.load.reranking {
        command.arg("--reranking");
    }
    command.args(&spec.load.extra_args);
    command.stdin(Stdio::null());
    command
}

/// Output capture for one child: the pipe its stdout and stderr share, and the thread
/// that drains it.
pub struct Capture {
    pub tail: Arc<OutputTail>,
    pub port: Receiver<u16>,
    pub drain: JoinHandle<()>,
}

/// Points `command`'s stdout and stderr at one pipe and starts the thread that copies it to
/// `log_path`, keeps the tail and reports the port; `on_close` runs when the child closes
/// its output (it is exiting), `on_listening` when it says it listens (so readiness is
/// checked at once rather than at the next poll). Call before spawning; the write ends in `command` are closed
/// in this process when `command` is dropped.
pub fn capture_output(
    command: &mut Command,
    log_path: &Path,
    on_listening: impl FnOnce() + Send + 'static,
    on_close: impl FnOnce() + Send + 'static,
) -> io::Result<Capture> {
    let (reader, writer) = io::pipe()?;
    command.stdout(writer.try_clone()?).stderr(writer);
    let mut log = File::options().create(true).append(true).open(log_path)?;
    let tail = Arc::new(OutputTail::empty());
    let (port_tx, port_rx) = crossbeam_channel::bounded(1);
    let drain_tail = Arc::clone(&tail);
    let drain = thread::Builder::new().name("child-output".into()).spawn(move || {
        drain_output(reader, &mut log, &drain_tail, port_tx, on_listening);
        on_close();
    })?;
    Ok(Capture { tail, port: port_rx, drain })
}

fn drain_output(pipe: impl Read, log: &mut File, tail: &OutputTail, port_tx: Sender<u16>, on_listening: impl FnOnce()) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    let mut port_sent = false;
    let mut on_listening = Some(on_listening);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let _ = log.write_all(&line);
        let text = String::from_utf8_lossy(&line);
        tail.push(&text);
        if !port_sent {
            if let Some(port) = parse_listening_port(&text) {
                port_sent = port_tx.send(port).is_ok();
            }
        }
        if text.contains("listening on ") {
            if let Some(on_listening) = on_listening.take() {
                on_listening();
            }
        }
    }
}

/// The port in llama-server's `listening on http://127.0.0.1:PORT` line.
pub fn parse_listening_port(line: &str) -> Option<u16> {
    let rest = &line[line.find("listening on http://")? + "listening on http://".len()..];
    let address = rest.split_whitespace().next()?;
    address.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

/// HTTP to one llama-server child.
#[derive(Debug, Clone)]
pub struct Client {
    /// Keeps idle connections for reuse: a request then skips the TCP handshake.
    pub(super) agent: ureq::Agent,
    /// Opens a fresh connection for every request: the retry when a pooled connection turns
    /// out to have been closed by the server while it sat idle.
    pub(super) fresh: ureq::Agent,
    pub(super) base: String,
    /// `Authorization` header value for a remote server that wants a bearer token.
    pub(super) authorization: Option<String>,
    /// The child's Unix socket, when it listens on one: a forwarded request gets a
    /// connection of its own there, which it can give up when its client leaves.
    pub(super) socket: Option<PathBuf>,
    pub(super) timeouts: Timeouts,
}

/// How a generation failed, for the caller to classify with what it knows of the child.
#[derive(Debug)]
pub enum GenerateError {
    /// The reader of the tokens went away; the upstream request was dropped.
    Cancelled,
    /// llama-server refused the request (HTTP 4xx): a parameter it cannot take.
    Rejected(String),
    /// No token came for the per-read timeout.
    Stalled,
    /// The connection failed or the server answered 5xx: the caller checks the child.
    Broken(String),
}

/// Timeouts for the HTTP calls to a child; every call has both.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Longest wait for the next bytes of a response (the progress watchdog).
    pub read: Duration,
}

impl Client {
    /// A client for a child on a loopback port that wants `api_key`.
    pub fn new(port: u16, api_key: &str, timeouts: Timeouts) -> Client {
        Client::for_url(&format!("http://127.0.0.1:{port}"), Some(api_key), None, timeouts)
    }

    /// A client for a child listening on the Unix socket at `path`.
    pub fn for_socket(path: &Path, timeouts: Timeouts) -> Client {
        let agent = |idle| {
            ureq::Agent::with_parts(
                agent_config(None, timeouts, idle),
                super::unix::UnixConnector { path: path.to_path_buf(), cancel: None },
                ureq::unversioned::resolver::DefaultResolver::default(),
            )
        };
        // The host only names the server in the Host header; the connector ignores it.
        Client {
            agent: agent(IDLE_CONNECTIONS),
            fresh: agent(0),
            base: "http://localhost".into(),
            authorization: None,
            socket: Some(path.to_path_buf()),
            timeouts,
        }
    }

    /// Reads the CA certificates in a PEM file, for [`Client::for_url`].
    pub fn load_ca_file(path: &Path) -> Result<ureq::tls::RootCerts, String> {
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
    pub fn for_url(
        base: &str,
        bearer: Option<&str>,
        roots: Option<&ureq::tls::RootCerts>,
        timeouts: Timeouts,
    ) -> Client {
        let tls = match roots {
            Some(roots) => ureq::tls::TlsConfig::builder().root_certs(roots.clone()).build(),
            None => ureq::tls::TlsConfig::default(),
        };
        let config = |idle| agent_config(Some(tls.clone()), timeouts, idle);
        Client {
            agent: config(IDLE_CONNECTIONS).into(),
            fresh: config(0).into(),
            base: base.trim_end_matches('/').to_string(),
            authorization: bearer.map(|token| format!("Bearer {token}")),
            socket: None,
            timeouts,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn get(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let request = self.agent.get(format!("{}{path}", self.base));
        match &self.authorization {
            Some(value) => request.header("Authorization", value),
            None => request,
        }
    }

    fn post(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        self.post_with(&self.agent, path)
    }

    /// POSTs `body`; when a pooled connection fails before any byte of the answer (the
    /// server closed it while it sat idle), tries once more on a fresh connection.
    fn send(&self, path: &str, body: &str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        match self.post(path).send(body) {
            Err(ureq::Error::Io(error)) if is_closed_connection(&error) => {
                log::debug!("a pooled connection to {} was closed ({error}); retrying on a new one", self.base);
                self.post_with(&self.fresh, path).send(body)
            }
            other => other,
        }
    }

    fn post_with(&self, agent: &ureq::Agent, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        let request = agent.post(format!("{}{path}", self.base)).header("Content-Type", "application/json");
        match &self.authorization {
            Some(value) => request.header("Authorization", value),
            None => request,
        }
    }

    /// For a server llmctl does not run: `/health` (llama-server) or, where there is none,
    /// `/v1/models` (any OpenAI-compatible server) answers 200.
    pub fn remote_healthy(&self) -> Result<(), String> {
        let status = |path: &str| match self.get(path).call() {
            Ok(mut response) => {
                let _ = response.body_mut().read_to_vec();
                Ok(response.status().as_u16())
            }
            Err(error) => Err(error.to_string()),
        };
        match status("/health")? {
            200 => Ok(()),
            404 => match status("/v1/models")? {
                200 => Ok(()),
                other => Err(format!("/v1/models answered HTTP {other}")),
            },
            other => Err(format!("/health answered HTTP {other}")),
        }
    }

    /// True when `/health` answers 200; false while loading or not yet listening.
    pub fn healthy(&self) -> bool {
        match self.get("/health").call() {
            Ok(mut response) => {
                let ok = response.status() == 200;
                let _ = response.body_mut().read_to_vec();
                ok
            }
            Err(_) => false,
        }
    }

    /// Generates for `request`, calling `on_token` for each chunk of text. When `on_token`
    /// fails the request is dropped, which closes the connection; llama-server then stops
    /// the generation and frees the slot.
    pub fn generate(
        &self,
        request: &RunRequest,
        mut on_token: impl FnMut(&str, bool) -> io::Result<()>,
    ) -> Result<Done, GenerateError> {
        let (path, body) = match request.mode {
            Mode::Chat => ("/v1/chat/completions", chat_body(request)),
            Mode::Raw => ("/completion", raw_body(request)),
        };
        let response = self.send(path, &body);
        let mut response = match response {
            Ok(response) => response,
            Err(error) => return Err(classify_transport(error)),
        };
        let status = response.status().as_u16();
        if status != 200 {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            let message = error_message(&text).unwrap_or_else(|| format!("HTTP {status}"));
            return Err(if (400..500).contains(&status) {
                GenerateError::Rejected(message)
            } else {
                GenerateError::Broken(format!("HTTP {status}: {message}"))
            });
        }
        let mut reader = BufReader::with_capacity(1 << 16, response.body_mut().as_reader());
        let mut line = Vec::with_capacity(512);
        let mut done = Done::default();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => {
                    return if done.finish_reason.is_empty() {
                        Err(GenerateError::Broken("the stream ended before the last chunk".into()))
                    } else {
                        Ok(done)
                    }
                }
                Ok(_) => {}
                Err(error) => return Err(classify_io(error)),
            }
            let Some(payload) = sse_payload(&line) else {
                continue;
            };
            if payload == b"[DONE]" {
                finish_body(&mut reader);
                return Ok(done);
            }
            if line.starts_with(b"error:") {
                let text = String::from_utf8_lossy(payload);
                return Err(GenerateError::Broken(error_message(&text).unwrap_or(text.into_owned())));
            }
            // Another event already buffered means more tokens are on their way: the caller
            // may batch its flush instead of paying a syscall per token. The blank line that
            // ends each SSE event does not count.
            let more_buffered = reader.buffer().iter().any(|b| !b.is_ascii_whitespace());
            let text = match request.mode {
                Mode::Chat => parse_chat_chunk(payload, &mut done),
                Mode::Raw => parse_raw_chunk(payload, &mut done),
            }
            .map_err(|e| GenerateError::Broken(format!("unreadable chunk from llama-server: {e}")))?;
            if let Some(text) = text.filter(|t| !t.is_empty()) {
                if on_token(&text, more_buffered).is_err() {
                    return Err(GenerateError::Cancelled);
                }
            }
            if request.mode == Mode::Raw && !done.finish_reason.is_empty() {
                finish_body(&mut reader);
                return Ok(done);
            }
        }
    }

    /// A one-token completion, so the weights are paged in and the server proven to answer.
    pub fn ping(&self) -> Result<(), GenerateError> {
        let body = json!({"prompt": "Hello", "n_predict": 1, "stream": false});
        let response = self.send("/completion", &body.to_string());
        match response {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let text = response.body_mut().read_to_string().unwrap_or_default();
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

/// Idle connections kept per child: enough for its parallel slots in most setups.
pub(super) const IDLE_CONNECTIONS: usize = 16;

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
pub(super) fn is_closed_connection(error: &io::Error) -> bool {
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
    let timed_out = matches!(error.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
        || error.get_ref().is_some_and(|inner| inner.to_string().contains("timeout"));
    if timed_out {
        GenerateError::Stalled
    } else {
        GenerateError::Broken(error.to_string())
    }
}

fn sse_payload(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"data:").or_else(|| line.strip_prefix(b"error:"))?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

fn error_message(body: &str) -> Option<String> {
    let value: Value = serde_json::from_str(body).ok()?;
    let error = value.get("error").unwrap_or(&value);
    error.get("message").and_then(Value::as_str).map(str::to_string)
}

fn sampling_fields(request: &RunRequest, body: &mut serde_json::Map<String, Value>) {
    let sampling = &request.sampling;
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            body.insert(key.to_string(), value);
        }
    };
    put("temperature", sampling.temperature.map(Value::from));
    put("top_p", sampling.top_p.map(Value::from));
    put("top_k", sampling.top_k.map(Value::from));
    put("min_p", sampling.min_p.map(Value::from));
    put("repeat_penalty", sampling.repeat_penalty.map(Value::from));
    put("seed", sampling.seed.map(Value::from));
    put("json_schema", sampling.json_schema.clone());
    put("grammar", sampling.grammar.clone().map(Value::from));
    if !sampling.stop.is_empty() {
        put("stop", Some(Value::from(sampling.stop.clone())));
    }
}

/// One chat message, borrowed from the request: the prompt is serialized straight from it.
#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

/// A request body whose prompt part is borrowed, so a large prompt is copied once, into
/// the body, and never into an intermediate JSON tree.
#[derive(Serialize)]
struct Body<P: Serialize> {
    #[serde(flatten)]
    prompt: P,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ChatMessages<'a> {
    Given { messages: &'a [Value] },
    Built { messages: Vec<Message<'a>> },
}

fn chat_body(request: &RunRequest) -> String {
    let prompt = match &request.messages {
        Some(messages) => ChatMessages::Given { messages },
        None => {
            let mut messages = Vec::new();
            if let Some(system) = &request.system {
                messages.push(Message { role: "system", content: system });
            }
            messages.push(Message { role: "user", content: &request.prompt });
            ChatMessages::Built { messages }
        }
    };
    let mut rest = serde_json::Map::new();
    rest.insert("stream".into(), Value::from(true));
    rest.insert("stream_options".into(), json!({"include_usage": true}));
    if let Some(max_tokens) = request.sampling.max_tokens {
        rest.insert("max_tokens".into(), Value::from(max_tokens));
    }
    sampling_fields(request, &mut rest);
    serde_json::to_string(&Body { prompt, rest }).unwrap_or_default()
}

fn raw_body(request: &RunRequest) -> String {
    #[derive(Serialize)]
    struct Prompt<'a> {
        prompt: &'a str,
    }
    let mut rest = serde_json::Map::new();
    rest.insert("stream".into(), Value::from(true));
    if let Some(max_tokens) = request.sampling.max_tokens {
        rest.insert("n_predict".into(), Value::from(max_tokens));
    }
    sampling_fields(request, &mut rest);
    serde_json::to_string(&Body { prompt: Prompt { prompt: &request.prompt }, rest }).unwrap_or_default()
}

#[derive(Deserialize)]
struct ChatChunk {
    #[serde(default)]
    choices: Vec<ChatChoice>,
    usage: Option<Usage>,
    timings: Option<Value>,
}

#[derive(Deserialize)]
struct ChatChoice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct Delta {
    content: Option<String>,
}

fn parse_chat_chunk(payload: &[u8], done: &mut Done) -> serde_json::Result<Option<String>> {
    let chunk: ChatChunk = serde_json::from_slice(payload)?;
    if let Some(usage) = chunk.usage {
        done.usage = usage;
    }
    if chunk.timings.is_some() {
        done.timings = chunk.timings;
    }
    let mut text = None;
    for choice in chunk.choices {
        if let Some(reason) = choice.finish_reason {
            done.finish_reason = reason;
        }
        if choice.delta.content.is_some() {
            text = choice.delta.content;
        }
    }
    Ok(text)
}

#[derive(Deserialize)]
struct RawChunk {
    #[serde(default)]
    content: String,
    #[serde(default)]
    stop: bool,
    stop_type: Option<String>,
    timings: Option<Value>,
    tokens_evaluated: Option<u64>,
    tokens_predicted: Option<u64>,
}

fn parse_raw_chunk(payload: &[u8], done: &mut Done) -> serde_json::Result<Option<String>> {
    let chunk: RawChunk = serde_json::from_slice(payload)?;
    if chunk.stop {
        done.finish_reason = match chunk.stop_type.as_deref() {
            Some("limit") => "length".to_string(),
            _ => "stop".to_string(),
        };
        done.usage = Usage {
            prompt_tokens: chunk.tokens_evaluated.unwrap_or(0),
            completion_tokens: chunk.tokens_predicted.unwrap_or(0),
        };
        done.timings = chunk.timings;
    }
    Ok(Some(chunk.content))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_in_log_line() {
        let table = [
            ("main: server is listening on http://127.0.0.1:41537 - starting the main loop", Some(41537)),
            ("srv  main: listening on http://127.0.0.1:8080\n", Some(8080)),
            ("llama_server: listening on http://127.0.0.1:5/", Some(5)),
            ("load_model: loading model", None),
            ("listening on unix:///tmp/x.sock", None),
        ];
        for (line, port) in table {
            assert_eq!(parse_listening_port(line), port, "{line}");
        }
    }

    #[test]
    fn parses_chat_stream_chunks() {
        let mut done = Done::default();
        let text =
            parse_chat_chunk(br#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null,"index":0}]}"#, &mut done);
        assert_eq!(text.unwrap().as_deref(), Some("Hi"));
        parse_chat_chunk(br#"{"choices":[{"delta":{},"finish_reason":"length","index":0}]}"#, &mut done).unwrap();
        parse_chat_chunk(
            br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10},"timings":{"predicted_per_second":120.5}}"#,
            &mut done,
        )
        .unwrap();
        assert_eq!(done.finish_reason, "length");
        assert_eq!(done.usage, Usage { prompt_tokens: 7, completion_tokens: 3 });
        assert_eq!(done.timings.unwrap()["predicted_per_second"], 120.5);
    }

    #[test]
    fn parses_raw_stream_chunks() {
        let mut done = Done::default();
        let text = parse_raw_chunk(br#"{"content":" the","stop":false}"#, &mut done).unwrap();
        assert_eq!(text.as_deref(), Some(" the"));
        parse_raw_chunk(
            br#"{"content":"","stop":true,"stop_type":"limit","tokens_evaluated":4,"tokens_predicted":8,"timings":{}}"#,
            &mut done,
        )
        .unwrap();
        assert_eq!(done.finish_reason, "length");
        assert_eq!(done.usage.completion_tokens, 8);
    }

    #[test]
    fn sse_lines() {
        assert_eq!(sse_payload(b"data: {}\n"), Some(&b"{}"[..]));
        assert_eq!(sse_payload(b"data: [DONE]\r\n"), Some(&b"[DONE]"[..]));
        assert_eq!(sse_payload(b"\n"), None);
        assert_eq!(sse_payload(b": keep-alive\n"), None);
    }
}
