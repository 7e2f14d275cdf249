//! `llmctl serve --listen ADDR`: llama-server's HTTP API, for every model llmctl knows.
//!
//! It forwards, it does not translate: each request is passed to the daemon as it came
//! (method, path, body), the daemon gives it to the model's llama-server (or remote server)
//! under the same admission, budget and accounting as `run`, and the answer comes back byte
//! for byte, streamed as produced. `serve` reads only `model` from the body, to pick the
//! instance. When the HTTP client goes away the daemon connection is closed (a
//! watcher checks every in-flight client each [`WATCH_EVERY`]), which cancels the request
//! wherever it is: queued, loading or generating. Listening beyond loopback requires an API
//! key, compared in constant time.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cli::ServeArgs;
use crate::client;
use crate::commands::Context;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::http::{self, Exchange, Request};
use crate::model::{ModelSpec, DEMO_ALIAS, DEMO_FILE};
use crate::protocol::{self, ForwardRequest, Response};

static STOPPING: AtomicBool = AtomicBool::new(false);

/// How often in-flight HTTP clients are checked for having gone away.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// What an endpoint needs of the instance it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Generate,
    Embed,
    Rerank,
}

/// llama-server's POST endpoints that `serve` forwards, and what each needs.
const ROUTES: &[(&str, Purpose)] = &[
    ("/v1/chat/completions", Purpose::Generate),
    ("/chat/completions", Purpose::Generate),
    ("/v1/completions", Purpose::Generate),
    ("/completions", Purpose::Generate),
    ("/completion", Purpose::Generate),
    ("/v1/responses", Purpose::Generate),
    ("/responses", Purpose::Generate),
    ("/v1/messages", Purpose::Generate),
    ("/v1/messages/count_tokens", Purpose::Generate),
    ("/v1/chat/completions/input_tokens", Purpose::Generate),
    ("/v1/responses/input_tokens", Purpose::Generate),
    ("/infill", Purpose::Generate),
    ("/tokenize", Purpose::Generate),
    ("/detokenize", Purpose::Generate),
    ("/apply-template", Purpose::Generate),
    ("/v1/embeddings", Purpose::Embed),
    ("/embeddings", Purpose::Embed),
    ("/embedding", Purpose::Embed),
    ("/v1/rerank", Purpose::Rerank),
    ("/rerank", Purpose::Rerank),
    ("/reranking", Purpose::Rerank),
    ("/v1/reranking", Purpose::Rerank),
];

struct Served {
    context: Context,
    api_key: Option<String>,
    watch: Watch,
}

pub fn run(context: &Context, args: ServeArgs) -> Result<()> {
    let address: SocketAddr =
        args.listen.to_socket_addrs().ok().and_then(|mut addresses| addresses.next()).ok_or_else(|| Error::Usage {
            message: format!("cannot use `{}` as an address to listen on", args.listen),
        })?;
    let api_key = match &args.api_key_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("cannot read the API key file {}", path.display()), e))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("LLMCTL_API_KEY").ok().filter(|key| !key.is_empty()),
    };
    if api_key.as_deref() == Some("") {
        return Err(Error::Usage { message: "the API key file is empty".into() });
    }
    if !address.ip().is_loopback() && api_key.is_none() {
        return Err(Error::Usage {
            message: format!(
                "listening on {address} reaches beyond this machine; give an API key with \
                 --api-key-file or LLMCTL_API_KEY"
            ),
        });
    }
    // A bad config is refused now rather than on every request.
    context.config()?;
    crate::setup::on_first_use(context, None)?;
    let listener = TcpListener::bind(address).map_err(|e| Error::DaemonUnavailable {
        socket: std::path::PathBuf::from(address.to_string()),
        reason: format!("cannot listen: {e}"),
    })?;
    let listener_fd = listener.as_raw_fd();
    let _ = ctrlc::set_handler(move || {
        STOPPING.store(true, Ordering::SeqCst);
        // Wakes the blocked accept.
        crate::sys::shutdown_socket(listener_fd);
    });
    let served = Arc::new(Served { context: context.clone(), api_key, watch: Watch::start()? });
    let bound = listener.local_addr().unwrap_or(address);
    eprintln!("llmctl: serving llama-server's API on http://{bound} (OpenAI-compatible under /v1)");
    let handler: http::Handler = Arc::new(move |request, exchange| handle(&served, request, exchange));
    http::serve(listener, http::Limits::default(), handler, &STOPPING)
        .map_err(|e| Error::io("cannot start the HTTP workers", e))
}

/// The HTTP status for a failure, from the exit-status table.
pub fn http_status(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::Usage | ErrorKind::Data => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::Unavailable | ErrorKind::Busy => 503,
        ErrorKind::Backend => 502,
        ErrorKind::NoCapacity => 507,
        ErrorKind::Timeout => 504,
        ErrorKind::Internal | ErrorKind::Interrupted => 500,
    }
}

/// `per_model`: a busy model's own limit is 429; the daemon's full queue is 503.
fn respond_error(
    exchange: &mut Exchange,
    kind: ErrorKind,
    message: &str,
    retry_after_ms: Option<u64>,
    per_model: bool,
) {
    let status = if kind == ErrorKind::Busy && per_model { 429 } else { http_status(kind) };
    let retry = retry_after_ms.map(|ms| ms.div_ceil(1000).max(1).to_string());
    let extra: Vec<(&str, &str)> = retry.as_deref().map(|value| vec![("Retry-After", value)]).unwrap_or_default();
    let kind_name = match kind {
        ErrorKind::Usage | ErrorKind::Data | ErrorKind::NotFound => "invalid_request_error",
        ErrorKind::Busy => "rate_limit_error",
        _ => "server_error",
    };
    let body = json!({"error": {"message": message, "type": kind_name, "code": kind.name()}});
    exchange.respond(status, "application/json", body.to_string().as_bytes(), &extra);
}

fn fail(exchange: &mut Exchange, error: &Error) {
    let (retry, per_model) = match error {
        Error::Busy { retry_after_ms, per_model, .. } => (Some(*retry_after_ms), *per_model),
        _ => (None, false),
    };
    respond_error(exchange, error.kind(), &error.to_string(), retry, per_model);
}

/// Compares without stopping at the first difference, so timing reveals nothing of the key.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (i, byte) in expected.iter().enumerate() {
        difference |= usize::from(given.get(i).copied().unwrap_or(0) ^ byte);
    }
    difference == 0
}

/// The key a client sent: `Authorization: Bearer KEY` (any case of the scheme), or
/// `x-api-key: KEY` as Anthropic's clients send it.
fn given_key(request: &Request) -> &str {
    if let Some(value) = request.header("authorization") {
        if let Some((scheme, key)) = value.trim().split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") {
                return key.trim();
            }
        }
    }
    request.header("x-api-key").map(str::trim).unwrap_or("")
}

/// Whether a page from `origin` may call this server: a configured list, or by default
/// pages served from this machine.
fn origin_allowed(origin: &str, configured: Option<&[String]>) -> bool {
    match configured {
        Some(list) => list.iter().any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin)),
        None => {
            let Some(rest) = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) else {
                return false;
            };
            let host = if rest.starts_with('[') {
                rest.split_inclusive(']').next().unwrap_or("")
            } else {
                rest.split(':').next().unwrap_or("")
            };
            let port_ok = match rest[host.len()..].strip_prefix(':') {
                Some(port) => port.parse::<u16>().is_ok(),
                None => rest.len() == host.len(),
            };
            port_ok && matches!(host.to_ascii_lowercase().as_str(), "localhost" | "127.0.0.1" | "[::1]")
        }
    }
}

/// A header value a client sent that is safe to echo: header-name characters only.
fn token_list(value: &str) -> bool {
    value.len() < 1024 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(&b))
}

fn handle(served: &Served, request: Request, exchange: &mut Exchange) {
    let config = match served.context.config() {
        Ok(config) => config,
        Err(error) => return fail(exchange, &error),
    };
    let origin = request.header("origin").filter(|origin| origin_allowed(origin, config.cors_origins.as_deref()));
    if let Some(origin) = origin {
        exchange.headers.push(("Access-Control-Allow-Origin".into(), origin.to_string()));
        exchange.headers.push(("Vary".into(), "Origin".into()));
    }
    let method = request.method.to_ascii_uppercase();
    let path = request.path().to_string();
    if method == "OPTIONS" {
        // A preflight: answered for allowed origins, without the key (browsers send none).
        let mut extra = vec![("Access-Control-Allow-Methods", "GET, POST, OPTIONS"), ("Access-Control-Max-Age", "600")];
        let asked = request.header("access-control-request-headers").filter(|value| token_list(value));
        if origin.is_some() {
            extra.push(("Access-Control-Allow-Headers", asked.unwrap_or("Authorization, Content-Type")));
        }
        return exchange.respond(204, "text/plain", b"", &extra);
    }
    if let Some(key) = &served.api_key {
        let public = method == "GET" && path == "/health";
        if !public && !same_secret(given_key(&request).as_bytes(), key.as_bytes()) {
            return exchange.error(401, "invalid API key", &[("WWW-Authenticate", "Bearer")]);
        }
    }
    match (method.as_str(), path.as_str()) {
        ("GET", "/health" | "/v1/health") => {
            exchange.respond(200, "application/json", br#"{"status":"ok"}"#, &[]);
        }
        ("GET", "/v1/models" | "/models") => match models(&served.context, &config) {
            Ok(list) => exchange.respond(200, "application/json", list.to_string().as_bytes(), &[]),
            Err(error) => fail(exchange, &error),
        },
        ("GET", "/metrics") => match metrics(&served.context) {
            Ok(text) => exchange.respond(200, "text/plain; version=0.0.4", text.as_bytes(), &[]),
            Err(error) => fail(exchange, &error),
        },
        ("GET", "/props" | "/v1/props") => {
            let name = request.query("model").map(percent_decode);
            forward(served, &config, request, exchange, Purpose::Generate, name);
        }
        ("POST", _) => match ROUTES.iter().find(|(route, _)| *route == path) {
            Some((_, purpose)) => {
                #[derive(Deserialize)]
                struct Peek {
                    model: Option<Value>,
                }
                let peek: Peek = match serde_json::from_slice(&request.body) {
                    Ok(peek) => peek,
                    Err(error) => return exchange.error(400, &format!("the body is not a JSON object: {error}"), &[]),
                };
                let name = peek.model.as_ref().and_then(Value::as_str).map(str::to_string);
                forward(served, &config, request, exchange, *purpose, name);
            }
            None => exchange.error(404, &format!("no route for POST {path}"), &[]),
        },
        (_, _) if ROUTES.iter().any(|(route, _)| *route == path) => {
            exchange.error(405, &format!("{path} takes POST"), &[("Allow", "POST")]);
        }
        _ => exchange.error(404, &format!("no route for {method} {path}"), &[]),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Passes `request` to the daemon for the model it names (or the default) and relays the
/// answer.
fn forward(
    served: &Served,
    config: &Config,
    request: Request,
    exchange: &mut Exchange,
    purpose: Purpose,
    name: Option<String>,
) {
    let mut spec = match choose_model(&served.context, config, name.as_deref(), purpose) {
        Ok(spec) => spec,
        Err(error) => return fail(exchange, &error),
    };
    match purpose {
        Purpose::Embed => spec.load.embeddings = true,
        Purpose::Rerank => spec.load.reranking = true,
        Purpose::Generate => {}
    }
    let forward = ForwardRequest {
        model: spec,
        method: request.method.to_ascii_uppercase(),
        path: request.target.clone(),
        content_type: request.header("content-type").map(str::to_string),
        body_len: request.body.len(),
        body: request.body,
    };
    let mut connection = match served.context.connect_for(&forward.model) {
        Ok(connection) => connection,
        Err(error) => return fail(exchange, &error),
    };
    let _ = connection.set_reply_timeout(Some(served.context.generation_timeout()));
    // Closing the daemon connection when the HTTP client leaves cancels the request.
    let _watched = match (exchange.socket(), connection.socket()) {
        (Ok(http), Ok(daemon)) => Some(served.watch.add(http, daemon)),
        _ => None,
    };
    if let Err(error) = connection.send(&protocol::Request::Forward(forward)) {
        return fail(exchange, &error);
    }
    let mut payload = Vec::new();
    loop {
        let response = match connection.recv() {
            Ok(response) => response,
            Err(error) => {
                if exchange.started() {
                    exchange.abort();
                } else if !exchange.client_gone() {
                    fail(exchange, &error);
                }
                return;
            }
        };
        match response {
            Response::Loading { .. } | Response::Queued { .. } => {}
            Response::Head { status, content_type, content_length } => {
                if exchange.start(status, content_type.as_deref(), content_length).is_err() {
                    return;
                }
            }
            Response::Bytes { len } => {
                if connection.payload(len, &mut payload).is_err() {
                    exchange.abort();
                    return;
                }
                if exchange.write(&payload).is_err() {
                    return;
                }
            }
            Response::Done(_) => {
                exchange.finish();
                return;
            }
            Response::Error { kind, message, retry_after_ms, per_model } => {
                if exchange.started() {
                    log::warn!("a forwarded answer broke off: {message}");
                    exchange.abort();
                } else {
                    respond_error(exchange, kind, &message, retry_after_ms, per_model);
                }
                return;
            }
            _ => {
                exchange.abort();
                return;
            }
        }
    }
}

/// Every name a request may use: config aliases, the demo, pulled models (`OWNER/REPO`)
/// and the other GGUF files in the models directory, by file name.
fn known_names(context: &Context, config: &Config) -> Vec<String> {
    let mut names: Vec<String> = config.models.keys().cloned().collect();
    if context.paths.models_dir().join(DEMO_FILE).exists() && !config.models.contains_key(DEMO_ALIAS) {
        names.push(DEMO_ALIAS.to_string());
    }
    names.extend(crate::library::list(&context.paths).iter().map(crate::library::Pulled::name));
    for file in crate::library::loose_files(&context.paths) {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name != DEMO_FILE {
            names.push(name);
        }
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names
}

/// The model a request goes to: the one it names (an alias, a path, or a file stem), or
/// else the default for its purpose: an embeddings or reranking model for those endpoints,
/// `default_model`, or the only model there is.
fn choose_model(context: &Context, config: &Config, name: Option<&str>, purpose: Purpose) -> Result<ModelSpec> {
    if let Some(name) = name.filter(|name| !name.is_empty()) {
        match resolve_model(context, config, name) {
            Err(Error::UnknownModel { .. }) | Err(Error::ModelNotFound { .. }) => {}
            other => return other,
        }
    }
    let for_purpose = config.models.iter().find(|(_, model)| match purpose {
        Purpose::Embed => model.embeddings,
        Purpose::Rerank => model.reranking,
        Purpose::Generate => false,
    });
    let names = known_names(context, config);
    let fallback = for_purpose
        .map(|(alias, _)| alias.clone())
        .or_else(|| config.default_model.clone())
        .or_else(|| (names.len() == 1).then(|| names[0].clone()));
    match fallback {
        Some(alias) => resolve_known(context, config, &alias),
        None => {
            let asked = name.map(|name| format!("no model `{name}`")).unwrap_or_else(|| "no `model` given".into());
            let listed = if names.is_empty() { "none is configured".to_string() } else { names.join(", ") };
            Err(Error::Remote {
                kind: ErrorKind::NotFound,
                message: format!("{asked} and no default_model in the config; known models: {listed}"),
            })
        }
    }
}

/// Resolves a name among the models llmctl knows: by name, or by the path or file stem of
/// one of them. Any other path is unknown: a client cannot make llmctl load a file merely
/// by naming it.
fn resolve_model(context: &Context, config: &Config, name: &str) -> Result<ModelSpec> {
    // Aliases first: the common case reads no directory.
    if config.models.contains_key(name) || name == DEMO_ALIAS {
        return resolve_known(context, config, name);
    }
    let known = known_names(context, config);
    if known.iter().any(|known| known == name) {
        return resolve_known(context, config, name);
    }
    let named_path = std::path::Path::new(name).canonicalize().ok();
    for known in &known {
        let Ok(spec) = resolve_known(context, config, known) else {
            continue;
        };
        let stem = spec.path.file_stem().map(|stem| stem.to_string_lossy().into_owned());
        if spec.remote.is_none() && (stem.as_deref() == Some(name) || named_path.as_ref() == Some(&spec.path)) {
            return Ok(spec);
        }
    }
    Err(Error::UnknownModel { name: name.to_string() })
}

/// Resolves a name with the config already read.
fn resolve_known(context: &Context, config: &Config, name: &str) -> Result<ModelSpec> {
    crate::model::resolve(name, config, &context.paths, &crate::model::LoadOverrides::default())
}

/// Every model a client can name, with what it can use: context length, kind, whether it
/// is loaded, which one answers requests that name none.
fn models(context: &Context, config: &Config) -> Result<Value> {
    let status = match client::try_connect(context)? {
        Some(mut connection) => match connection.call(&protocol::Request::Status)? {
            Response::Status(status) => Some(status),
            _ => None,
        },
        None => None,
    };
    let instances = status.map(|status| status.instances).unwrap_or_default();
    let default = choose_model(context, config, None, Purpose::Generate).ok().map(|spec| spec.name);
    let mut data = Vec::new();
    let mut listed = Vec::new();
    for name in known_names(context, config) {
        let Ok(spec) = resolve_model(context, config, &name) else {
            continue;
        };
        let loaded = instances.iter().any(|i| i.name == name && i.state == "ready");
        let context_length = spec.load.ctx_size.map(u64::from).or_else(|| {
            if spec.remote.is_some() {
                return None;
            }
            crate::gguf::inspect(&spec.path).ok().and_then(|info| info.context_length)
        });
        let kind = match (spec.remote.is_some(), spec.load.embeddings, spec.load.reranking) {
            (true, _, _) => "remote",
            (_, true, _) => "embeddings",
            (_, _, true) => "reranking",
            _ => "chat",
        };
        data.push(json!({
            "id": name, "object": "model", "created": 0, "owned_by": "llmctl",
            "context_length": context_length, "kind": kind, "loaded": loaded,
            "default": default.as_deref() == Some(name.as_str()),
        }));
        listed.push(name);
    }
    // Models loaded by path rather than by a name above.
    for instance in &instances {
        if !listed.contains(&instance.name) {
            listed.push(instance.name.clone());
            data.push(json!({
                "id": instance.name, "object": "model", "created": 0, "owned_by": "llmctl",
                "context_length": instance.ctx_size, "kind": "chat", "loaded": instance.state == "ready",
                "default": false,
            }));
        }
    }
    Ok(json!({"object": "list", "data": data}))
}

fn metrics(context: &Context) -> Result<String> {
    let mut connection = client::connect(context)?;
    match connection.call(&protocol::Request::Metrics)? {
        Response::Metrics { text } => Ok(text),
        _ => Err(Error::internal("the daemon answered metrics with something else")),
    }
}

/// In-flight requests whose HTTP client is checked for having left: when it has, the
/// daemon connection is shut down, which wakes the blocked handler and cancels the request
/// in the daemon.
struct Watch {
    watched: Arc<Mutex<HashMap<u64, (TcpStream, UnixStream)>>>,
    next: AtomicU64,
}

/// Stops watching when dropped.
struct Watched<'a> {
    watch: &'a Watch,
    id: u64,
}

impl Watch {
    fn start() -> Result<Watch> {
        let watched: Arc<Mutex<HashMap<u64, (TcpStream, UnixStream)>>> = Arc::default();
        let shared = Arc::clone(&watched);
        std::thread::Builder::new()
            .name("http-watch".into())
            .spawn(move || loop {
                std::thread::sleep(WATCH_EVERY);
                for (http, daemon) in shared.lock().values() {
                    if crate::sys::peer_closed(http) {
                        let _ = daemon.shutdown(std::net::Shutdown::Both);
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the watcher thread", e))?;
        Ok(Watch { watched, next: AtomicU64::new(0) })
    }

    fn add(&self, http: TcpStream, daemon: UnixStream) -> Watched<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.watched.lock().insert(id, (http, daemon));
        Watched { watch: self, id }
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.watch.watched.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_exit_table() {
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
            assert_eq!(http_status(kind), status, "{kind:?}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        for wrong in [&b""[..], b"s3cre", b"s3cret!", b"S3cret"] {
            assert!(!same_secret(wrong, b"s3cret"));
        }
    }

    #[test]
    fn local_origins_are_allowed_by_default() {
        for allowed in ["http://localhost:3000", "http://127.0.0.1", "https://[::1]:8443", "http://LOCALHOST:80"] {
            assert!(origin_allowed(allowed, None), "{allowed}");
        }
        for refused in [
            "http://evil.example",
            "http://localhost.evil.example",
            "http://127.0.0.1.evil.example:80",
            "http://localhost:80/x",
            "null",
            "file://",
            "http://localhost:99999",
        ] {
            assert!(!origin_allowed(refused, None), "{refused}");
        }
        let list = vec!["https://app.example".to_string()];
        assert!(origin_allowed("https://app.example", Some(&list)));
        assert!(!origin_allowed("http://localhost:3000", Some(&list)));
        assert!(origin_allowed("http://anything", Some(&["*".to_string()])));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c%zz%4"), "a/b c%zz%4");
    }
}
