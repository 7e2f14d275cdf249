//! The routes of `serve`: who may ask (Host, origin, key), what each path does, and the
//! forwarding of a request to its model's server with the answer relayed as it comes.
//!
//! `serve` reads only `model` from a body, to pick the instance; Ollama's routes (`/` and
//! `/api/*`) are translated instead, by [`super::ollama`], and refused in Ollama's error
//! shape. When the HTTP client goes
//! away the request is cancelled wherever it is: queued or loading (the waiter sees the
//! hang-up), generating (the next write fails, or for an answer not streamed, the read from
//! the child asks the same check every 100 ms and gives up).

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::models::{self, Purpose};
use crate::backend::forward::{Outgoing, Part};
use crate::backend::unix::Cancel;
use crate::config::Config;
use crate::daemon::admission::Waiter;
use crate::daemon::listeners::Listener;
use crate::daemon::shared::Shared;
use crate::daemon::work::{self, Attempt};
use crate::error::{Error, ErrorKind};
use crate::http::{Exchange, Request};

/// llama-server's POST endpoints that `serve` forwards, and what each needs. A body's
/// `model` picks the instance.
const ROUTES: &[(&str, Purpose)] = &[
    ("/props", Purpose::Generate),
    ("/chat/completions/input_tokens", Purpose::Generate),
    ("/responses/input_tokens", Purpose::Generate),
    ("/v1/chat/completions/control", Purpose::Generate),
    ("/v1/audio/transcriptions", Purpose::Generate),
    ("/audio/transcriptions", Purpose::Generate),
    ("/v1/systemone", Purpose::Generate),
    ("/lora-adapters", Purpose::Generate),
    ("/v1/streams/lookup", Purpose::Generate),
    ("/tools", Purpose::Generate),
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

/// Answers one HTTP request on `listener`, and logs it.
pub(crate) fn handle(shared: &Arc<Shared>, listener: &Listener, request: Request, exchange: &mut Exchange) {
    let started = Instant::now();
    let (method, target) = (request.method.to_ascii_uppercase(), request.target.clone());
    route(shared, listener, request, exchange);
    let status = if exchange.started() { exchange.status() } else { 0 };
    // The method and target are the client's: they reach the terminal of `serve` escaped.
    let (method, target) = (crate::term::escape(&method), crate::term::escape(&target));
    listener.note(format!("{method} {target} {status} {} ms", started.elapsed().as_millis()));
}

fn route(shared: &Arc<Shared>, listener: &Listener, request: Request, exchange: &mut Exchange) {
    let config = match shared.config.get() {
        Ok(config) => config,
        Err(error) => return fail(exchange, &error),
    };
    let method = request.method.to_ascii_uppercase();
    let path = request.path().to_string();
    let ollama = super::ollama::is_ollama_path(&path);
    // A page elsewhere that rebinds its name to this address (DNS rebinding) sends its own
    // name as Host: without a key, only the names of this address are answered.
    if listener.api_key.is_none()
        && !host_allowed(request.header("host"), listener.address(), config.allowed_hosts.as_deref())
    {
        return refuse(
            exchange,
            ollama,
            403,
            &format!(
                "Host `{}` is not this server's; add it to allowed_hosts in the config if it is",
                request.header("host").unwrap_or("")
            ),
            &[],
        );
    }
    let origin = request.header("origin");
    let allowed_origin = origin.filter(|origin| origin_allowed(origin, config.cors_origins.as_deref()));
    if let Some(origin) = allowed_origin {
        exchange.headers.push(("Access-Control-Allow-Origin".into(), origin.to_string()));
        exchange.headers.push(("Vary".into(), "Origin".into()));
    }
    if method == "OPTIONS" {
        // A preflight: answered for allowed origins, without the key (browsers send none).
        let mut extra = vec![
            ("Access-Control-Allow-Methods", "GET, HEAD, POST, DELETE, OPTIONS"),
            ("Access-Control-Max-Age", "600"),
        ];
        let asked = request.header("access-control-request-headers").filter(|value| token_list(value));
        if allowed_origin.is_some() {
            extra.push(("Access-Control-Allow-Headers", asked.unwrap_or("Authorization, Content-Type")));
        }
        // 200 with an empty body, as llama-server answers a preflight.
        return exchange.respond(200, "text/plain", b"", &extra);
    }
    match &listener.api_key {
        Some(key) => {
            // Health probes come from load balancers and supervisors, which hold no key.
            let public = method == "GET" && matches!(path.as_str(), "/health" | "/v1/health");
            if !public && !same_secret(given_key(&request).as_bytes(), key.as_bytes()) {
                return refuse(exchange, ollama, 401, "invalid API key", &[("WWW-Authenticate", "Bearer")]);
            }
        }
        // Without a key, a page on another site must not make this server work for it: a
        // browser's "simple" cross-site request needs no preflight, so it is refused here.
        None if cross_site(&request, allowed_origin.is_some()) => {
            return refuse(
                exchange,
                ollama,
                403,
                "cross-site requests from a web page are refused without an API key; allow the page's origin with \
                 cors_origins in the config",
                &[],
            );
        }
        None => {}
    }
    // A fault hook for the test suite: a handler that panics.
    #[cfg(feature = "testing")]
    if path == "/__llmctl_test_panic" {
        panic!("fault injected by the test suite");
    }
    if ollama {
        return super::ollama::handle(shared, &config, request, exchange);
    }
    match (method.as_str(), path.as_str()) {
        ("GET", "/health" | "/v1/health") => health(shared, &config, &request, exchange),
        ("GET", "/v1/models" | "/models") => {
            let list = models::list(shared, &config);
            exchange.respond(200, JSON, list.to_string().as_bytes(), &[])
        }
        ("GET", _) if path.starts_with("/v1/models/") || path.starts_with("/models/") => {
            let id = crate::percent::decode_query(path.split_once("/models/").map_or("", |(_, id)| id)).into_owned();
            match models::list(shared, &config)["data"].as_array().and_then(|data| data.iter().find(|m| m["id"] == id))
            {
                Some(model) => exchange.respond(200, JSON, model.to_string().as_bytes(), &[]),
                None => exchange.error(404, &format!("no model `{}` here", crate::term::escape(&id)), &[]),
            }
        }
        ("GET", "/metrics") => {
            let text = crate::daemon::metrics::render(&crate::daemon::report::report(shared));
            exchange.respond(200, "text/plain; version=0.0.4", text.as_bytes(), &[])
        }
        // Routes that read or act on one instance without a body: `?model=` picks it, as
        // llama-server's router reads it.
        ("GET", "/props" | "/v1/props") => props(shared, &config, request, exchange),
        ("GET", "/slots" | "/lora-adapters" | "/tools" | "/v1/stream") | ("DELETE", "/v1/stream") => {
            let name = queried_model(&request);
            forward(shared, &config, request, exchange, Purpose::Generate, name, None);
        }
        ("GET" | "POST", "/cors-proxy") => {
            // It fetches any URL a client names, from this machine: never forwarded.
            exchange.error(403, "this feature is disabled: serve does not fetch URLs for clients", &[])
        }
        ("POST", _) if path.starts_with("/slots/") => slot_action(shared, &config, request, exchange),
        ("POST", _) => match ROUTES.iter().find(|(route, _)| *route == path) {
            Some((_, purpose)) => {
                // Read as llama-server reads it: a key given twice takes its last value.
                let body: serde_json::Map<String, Value> = match serde_json::from_slice(&request.body) {
                    Ok(body) => body,
                    Err(error) => return exchange.error(400, &format!("the body is not a JSON object: {error}"), &[]),
                };
                let name = match body.get("model") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(name)) => Some(name.clone()),
                    // Never read as "no model given", which would serve the default model.
                    Some(other) => {
                        let kind = match other {
                            Value::Number(_) => "a number",
                            Value::Bool(_) => "true or false",
                            Value::Array(_) => "an array",
                            _ => "an object",
                        };
                        return exchange.error(400, &format!("`model` must be a string, not {kind}"), &[]);
                    }
                };
                forward(shared, &config, request, exchange, *purpose, name, None);
            }
            None => exchange.error(404, &format!("no route for POST {path}"), &[]),
        },
        // llama-server answers another method on a POST route with 404, and so does serve.
        (_, _) if ROUTES.iter().any(|(route, _)| *route == path) => {
            exchange.error(404, &format!("no route for {method} {path}: it takes POST"), &[]);
        }
        _ => exchange.error(404, &format!("no route for {method} {path}"), &[]),
    }
}

/// `POST /slots/ID?action=erase|save|restore`. Erasing a slot's cache is forwarded to the
/// instance (`?model=` picks it); saving and restoring are refused, because the file name is
/// the client's and the directory is the one llmctl keeps its own prompt caches in, which
/// it saves and restores across swaps itself.
fn slot_action(shared: &Arc<Shared>, config: &Config, request: Request, exchange: &mut Exchange) {
    match request.query("action") {
        Some("erase") => {
            let name = queried_model(&request);
            forward(shared, config, request, exchange, Purpose::Generate, name, None);
        }
        Some("save" | "restore") => exchange.error(
            403,
            "saving and restoring slots to files a client names is disabled: llmctl saves and restores prompt \
             caches across swaps itself (see cache_budget)",
            &[],
        ),
        _ => exchange.error(400, "action must be erase, save or restore", &[]),
    }
}

/// The content type of every JSON answer of `serve`'s own, as llama-server labels its own.
const JSON: &str = "application/json; charset=utf-8";

/// The model a request names in its query (`?model=NAME`), decoded.
fn queried_model(request: &Request) -> Option<String> {
    request.query("model").map(|value| crate::percent::decode_query(value).into_owned())
}

/// `GET /props` as llama-server answers it, which neither wakes a sleeping model nor keeps
/// one awake: a loaded instance's first request is forwarded and its answer kept, later
/// ones get that answer without a lease (so polling does not reset the idle TTL), and a
/// model that is not loaded is not loaded for it. That one gets the answer its
/// llama-server last gave, or, for a model not loaded since the daemon started, what the
/// GGUF header and the model's settings say, with `is_sleeping` true either way.
fn props(shared: &Arc<Shared>, config: &Config, request: Request, exchange: &mut Exchange) {
    let name = queried_model(&request);
    let spec = match models::choose(shared, config, name.as_deref(), Purpose::Generate) {
        Ok(spec) => spec,
        Err(error) => return fail(exchange, &error),
    };
    let loaded = shared
        .table
        .all()
        .iter()
        .map(|instance| instance.snapshot().status())
        .find(|status| status.name == spec.name && status.state.is_loaded());
    let kept = shared.props.lock().get(&spec.name).cloned();
    let (mut answer, sleeping) = match (loaded, kept) {
        (Some(status), Some((pid, props))) if status.pid.is_some() && status.pid == pid => (props, false),
        (Some(status), _) => {
            let mut body = Vec::new();
            forward(shared, config, request, exchange, Purpose::Generate, name, Some(&mut body));
            if let Ok(props @ Value::Object(_)) = serde_json::from_slice::<Value>(&body) {
                shared.props.lock().insert(spec.name, (status.pid, props));
            }
            return;
        }
        (None, _) if spec.remote.is_some() => {
            return forward(shared, config, request, exchange, Purpose::Generate, name, None);
        }
        (None, Some((_, props))) => (props, true),
        (None, None) => (models::props_unloaded(shared, &spec), true),
    };
    answer["is_sleeping"] = Value::Bool(sleeping);
    exchange.respond(200, JSON, answer.to_string().as_bytes(), &[]);
}

/// `/health` as llama-server answers it, for the model a request would go to (`?model=`,
/// or the default), without loading or waking anything: 503 "Loading model" while its
/// instance starts or waits for memory, 500 with the reason when its last load failed, and
/// 200 otherwise: loaded, or not loaded yet and loaded by the first request. With no model
/// to go to it answers for the daemon, which is up.
fn health(shared: &Shared, config: &Config, request: &Request, exchange: &mut Exchange) {
    let name = queried_model(request);
    // A model the probe names must exist; with none named and no default, the daemon's
    // own health is the answer.
    let chosen = match models::choose(shared, config, name.as_deref(), Purpose::Generate) {
        Ok(spec) => Some(spec),
        Err(error) if name.is_some() => return fail(exchange, &error),
        Err(_) => None,
    };
    let instances: Vec<_> = shared.table.all().iter().map(|instance| instance.snapshot().status()).collect();
    let of_model: Vec<_> = match &chosen {
        Some(spec) => instances.iter().filter(|status| status.name == spec.name).collect(),
        None => Vec::new(),
    };
    use crate::protocol::InstanceState;
    if of_model.iter().any(|status| status.state.is_loaded()) || of_model.is_empty() {
        return exchange.respond(200, JSON, br#"{"status":"ok"}"#, &[]);
    }
    if of_model.iter().any(|status| matches!(status.state, InstanceState::Starting | InstanceState::Waiting)) {
        return exchange.respond(503, JSON, crate::http::error_body(503, "Loading model", None).as_bytes(), &[]);
    }
    match of_model.iter().find(|status| status.state == InstanceState::Failed) {
        Some(failed) => {
            let reason = failed.failure.as_deref().unwrap_or("the last load failed");
            let body = crate::http::error_body(500, reason, Some("backend"));
            exchange.respond(500, JSON, body.as_bytes(), &[])
        }
        None => exchange.respond(200, JSON, br#"{"status":"ok"}"#, &[]),
    }
}

/// A refusal before any route runs, in the shape the route's clients read: Ollama's
/// `{"error": "..."}` on its routes, OpenAI's elsewhere.
fn refuse(exchange: &mut Exchange, ollama: bool, status: u16, message: &str, extra: &[(&str, &str)]) {
    if ollama {
        super::ollama::refuse(exchange, status, message, extra);
    } else {
        exchange.error(status, message, extra);
    }
}

/// The HTTP client as the admission layer's waiter: it hears nothing while waiting, and has
/// left once its connection closed.
pub(crate) struct HttpWaiter<'a>(pub(crate) &'a std::net::TcpStream);

impl Waiter for HttpWaiter<'_> {
    fn loading(&mut self, _model: &str) {}
    fn queued(&mut self, _position: usize) {}
    fn gone(&self) -> bool {
        crate::sys::peer_closed(self.0)
    }
}

/// Passes `request` to the model it names (or the default) and relays the answer; a
/// successful answer's body is also copied into `keep` (up to 1 MiB), when given.
fn forward(
    shared: &Arc<Shared>,
    config: &Config,
    request: Request,
    exchange: &mut Exchange,
    purpose: Purpose,
    name: Option<String>,
    mut keep: Option<&mut Vec<u8>>,
) {
    let mut spec = match models::choose(shared, config, name.as_deref(), purpose) {
        Ok(spec) => spec,
        Err(error) => return fail(exchange, &error),
    };
    match purpose {
        Purpose::Embed => spec.load.embeddings = true,
        Purpose::Rerank => spec.load.reranking = true,
        Purpose::Generate => {}
    }
    let method = request.method.to_ascii_uppercase();
    let outgoing = Outgoing {
        method: &method,
        target: &request.target,
        content_type: request.header("content-type"),
        body: &request.body,
    };
    let Ok(client_socket) = exchange.stream().try_clone() else {
        return exchange.error(500, "cannot watch the connection", &[]);
    };
    let watched = client_socket.try_clone().ok();
    let cancel: Cancel = Arc::new(move || watched.as_ref().is_none_or(crate::sys::peer_closed));
    let mut waiter = HttpWaiter(&client_socket);
    let result = work::on_lease(shared, &spec, &mut waiter, |lease, started| {
        let mut first_token = None;
        let mut status = 0;
        let result = lease.client.forward(outgoing, Some(Arc::clone(&cancel)), |part| {
            if !lease.generation.relay_token() {
                return Err(std::io::Error::other("the instance was stopped"));
            }
            match part {
                Part::Head { status: code, headers, content_length } => {
                    status = code;
                    exchange.start(code, headers, content_length)
                }
                Part::Bytes(bytes) => {
                    first_token.get_or_insert_with(|| started.elapsed());
                    if let Some(keep) = keep.as_deref_mut().filter(|keep| status == 200 && keep.len() < 1 << 20) {
                        keep.extend_from_slice(bytes);
                    }
                    exchange.write(bytes)
                }
            }
        });
        Attempt { result, answered: status != 0, ok: Attempt::ok_for_status(status), first_token }
    });
    match result {
        Ok(_) => exchange.finish(),
        Err(error) if exchange.started() => {
            log::warn!("a forwarded answer broke off: {error}");
            exchange.abort();
        }
        Err(Error::Interrupted) => exchange.abort(),
        Err(error) => fail(exchange, &error),
    }
}

/// Answers `error` with its status from the exit-status table, in OpenAI's shape.
pub(crate) fn fail(exchange: &mut Exchange, error: &Error) {
    let (status, retry_after) = error_status(error);
    let body = crate::http::error_body(status, &error.to_string(), Some(error.kind().name()));
    exchange.respond(status, "application/json; charset=utf-8", body.as_bytes(), &retry_header(retry_after.as_deref()));
}

/// The `Retry-After` header of an answer, when it has one.
pub(crate) fn retry_header(seconds: Option<&str>) -> Vec<(&'static str, &str)> {
    seconds.map(|value| vec![("Retry-After", value)]).unwrap_or_default()
}

/// The HTTP status of `error` from the exit-status table, with the `Retry-After` seconds a
/// busy answer carries: 429 when one model's queue is full, 503 when the daemon's is.
pub(crate) fn error_status(error: &Error) -> (u16, Option<String>) {
    let (retry, per_model) = match error {
        Error::Busy { retry_after_ms, per_model, .. } => (Some(*retry_after_ms), *per_model),
        _ => (None, false),
    };
    let kind = error.kind();
    let status = if kind == ErrorKind::Busy && per_model { 429 } else { kind.http_status() };
    (status, retry.map(|ms| ms.div_ceil(1000).max(1).to_string()))
}

/// Compares without stopping at the first difference, so timing reveals nothing of the key.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (i, byte) in expected.iter().enumerate() {
        difference |= usize::from(given.get(i).copied().unwrap_or(0) ^ byte);
    }
    difference == 0
}

/// The key a client sent: `Authorization: Bearer KEY` (any case of the scheme, or none), or
/// `x-api-key: KEY` as Anthropic's clients send it.
fn given_key(request: &Request) -> &str {
    if let Some(value) = request.header("authorization") {
        return match value.trim().split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            Some(_) => "",
            // A key without a scheme, as llama-server accepts it.
            None => value.trim(),
        };
    }
    request.header("x-api-key").map(str::trim).unwrap_or("")
}

/// The host part of an origin or Host value (`[::1]` kept whole) and what follows it.
fn split_host(authority: &str) -> (&str, &str) {
    if authority.starts_with('[') {
        let end = authority.find(']').map_or(authority.len(), |i| i + 1);
        authority.split_at(end)
    } else {
        let end = authority.find(':').unwrap_or(authority.len());
        authority.split_at(end)
    }
}

fn is_loopback_name(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost") || host == "[::1]" || host.starts_with("127.")
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
            let (host, after) = split_host(rest);
            let port_ok = match after.strip_prefix(':') {
                Some(port) => port.parse::<u16>().is_ok(),
                None => after.is_empty(),
            };
            port_ok && matches!(host.to_ascii_lowercase().as_str(), "localhost" | "127.0.0.1" | "[::1]")
        }
    }
}

/// Whether a `Host` names this listener: a loopback name with its port (the port may be
/// left out only when it is 80), or a name in the configured list. A listener on a
/// wildcard address accepts loopback names too; beyond loopback a key guards it instead.
fn host_allowed(host: Option<&str>, listening: std::net::SocketAddr, configured: Option<&[String]>) -> bool {
    let Some(host) = host.map(str::trim) else {
        // HTTP/1.0 clients may send none; they are not browsers.
        return true;
    };
    if configured.is_some_and(|list| list.iter().any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(host))) {
        return true;
    }
    let (name, after) = split_host(host);
    let port = match after.strip_prefix(':') {
        Some(port) => port.parse::<u16>().ok(),
        None if after.is_empty() => Some(80),
        None => None,
    };
    let name_ok = is_loopback_name(name) || name == listening.ip().to_string();
    name_ok && port == Some(listening.port())
}

/// A request a browser sent from a page of another site: it names an Origin that is not
/// allowed (serve has no pages of its own, so any Origin is another site's), or says so in
/// `Sec-Fetch-Site`.
fn cross_site(request: &Request, origin_allowed: bool) -> bool {
    if origin_allowed {
        return false;
    }
    request.header("origin").is_some()
        || request.header("sec-fetch-site").is_some_and(|site| site.eq_ignore_ascii_case("cross-site"))
}

/// A header value a client sent that is safe to echo: header-name characters only.
fn token_list(value: &str) -> bool {
    value.len() < 1024 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn only_this_servers_names_are_answered_without_a_key() {
        let listening: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        for allowed in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080", "app.localhost:8080"] {
            assert!(host_allowed(Some(allowed), listening, None), "{allowed}");
        }
        for refused in
            ["evil.example:8080", "evil.example", "127.0.0.1:8081", "127.0.0.1", "localhost.evil.example:8080"]
        {
            assert!(!host_allowed(Some(refused), listening, None), "{refused}");
        }
        let list = vec!["box.lan:8080".to_string()];
        assert!(host_allowed(Some("box.lan:8080"), listening, Some(&list)));
        let on_port_80: std::net::SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert!(host_allowed(Some("localhost"), on_port_80, None));
        assert!(host_allowed(None, listening, None), "an HTTP/1.0 client without Host");
    }
}
