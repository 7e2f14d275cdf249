//! `llmctl serve --listen ADDR`: an OpenAI-compatible HTTP front for everything llmctl runs.
//!
//! It is a translator, not a second daemon: each HTTP request becomes one request to the
//! daemon over its socket, so admission, the memory budget and the exit-code taxonomy are
//! the same as on the command line, and errors map onto HTTP statuses from one table. A
//! client that disconnects from a stream closes the daemon connection, which cancels the
//! generation upstream. Listening beyond loopback requires an API key, compared in constant
//! time.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::cli::{LoadArgs, ServeArgs};
use crate::client;
use crate::commands::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{DEMO_ALIAS, DEMO_FILE};
use crate::protocol::{Done, Mode, Request, Response, RunRequest, Sampling};

/// The largest request body accepted.
const MAX_BODY: u64 = 16 << 20;

static STOPPING: AtomicBool = AtomicBool::new(false);

struct Served {
    context: Context,
    api_key: Option<String>,
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
    crate::setup::on_first_use(context, None)?;
    let server = tiny_http::Server::http(address).map_err(|e| Error::DaemonUnavailable {
        socket: std::path::PathBuf::from(address.to_string()),
        reason: format!("cannot listen: {e}"),
    })?;
    let server = Arc::new(server);
    let stopper = Arc::clone(&server);
    let _ = ctrlc::set_handler(move || {
        STOPPING.store(true, Ordering::SeqCst);
        stopper.unblock();
    });
    eprintln!("llmctl: serving the OpenAI API on http://{address}/v1");
    let served = Arc::new(Served { context: context.clone(), api_key });
    for request in server.incoming_requests() {
        if STOPPING.load(Ordering::SeqCst) {
            break;
        }
        let served = Arc::clone(&served);
        let spawned = std::thread::Builder::new().name("http".into()).spawn(move || handle(&served, request));
        if let Err(error) = spawned {
            log::warn!("cannot start a thread for an HTTP request: {error}");
        }
    }
    Ok(())
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

fn error_body(kind: ErrorKind, message: &str) -> String {
    let kind_name = match kind {
        ErrorKind::Usage | ErrorKind::Data | ErrorKind::NotFound => "invalid_request_error",
        ErrorKind::Busy => "rate_limit_error",
        _ => "server_error",
    };
    json!({"error": {"message": message, "type": kind_name, "code": kind.name()}}).to_string()
}

fn respond(request: tiny_http::Request, status: u16, content_type: &str, body: String, extra: &[(&str, String)]) {
    let mut response = tiny_http::Response::from_string(body).with_status_code(status);
    for (name, value) in std::iter::once(&("Content-Type", content_type.to_string())).chain(extra) {
        if let Ok(header) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(header);
        }
    }
    let _ = request.respond(response);
}

/// `per_model`: a busy model's own limit is 429; the daemon's full queue is 503.
fn respond_error(
    request: tiny_http::Request,
    kind: ErrorKind,
    message: &str,
    retry_after_ms: Option<u64>,
    per_model: bool,
) {
    let extra: Vec<(&str, String)> =
        retry_after_ms.map(|ms| vec![("Retry-After", ms.div_ceil(1000).max(1).to_string())]).unwrap_or_default();
    let status = if kind == ErrorKind::Busy && per_model { 429 } else { http_status(kind) };
    respond(request, status, "application/json", error_body(kind, message), &extra);
}

/// Compares without stopping at the first difference, so timing reveals nothing of the key.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (i, byte) in expected.iter().enumerate() {
        difference |= usize::from(given.get(i).copied().unwrap_or(0) ^ byte);
    }
    difference == 0
}

fn header<'a>(request: &'a tiny_http::Request, name: &str) -> Option<&'a str> {
    request.headers().iter().find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
}

fn handle(served: &Served, mut request: tiny_http::Request) {
    if let Some(key) = &served.api_key {
        let given = header(&request, "Authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        if !same_secret(given.as_bytes(), key.as_bytes()) {
            return respond(request, 401, "application/json", error_body(ErrorKind::Usage, "invalid API key"), &[]);
        }
    }
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let method = request.method().as_str().to_ascii_uppercase();
    match (method.as_str(), path.as_str()) {
        ("GET", "/health") => respond(request, 200, "application/json", json!({"status": "ok"}).to_string(), &[]),
        ("GET", "/v1/models") => match models(&served.context) {
            Ok(list) => respond(request, 200, "application/json", list.to_string(), &[]),
            Err(error) => respond_error(request, error.kind(), &error.to_string(), None, false),
        },
        ("GET", "/metrics") => match metrics(&served.context) {
            Ok(text) => respond(request, 200, "text/plain; version=0.0.4", text, &[]),
            Err(error) => respond_error(request, error.kind(), &error.to_string(), None, false),
        },
        ("POST", "/v1/chat/completions") | ("POST", "/v1/completions") => {
            let mut body = Vec::new();
            if request.as_reader().take(MAX_BODY + 1).read_to_end(&mut body).is_err() || body.len() as u64 > MAX_BODY {
                return respond_error(
                    request,
                    ErrorKind::Usage,
                    "the request body is unreadable or too large",
                    None,
                    false,
                );
            }
            let chat = path == "/v1/chat/completions";
            match parse_completion(&served.context, &body, chat) {
                Ok((run, stream, include_usage)) => generate(served, request, run, chat, stream, include_usage),
                Err(error) => respond_error(request, error.kind(), &error.to_string(), None, false),
            }
        }
        _ => respond_error(request, ErrorKind::NotFound, &format!("no route for {method} {path}"), None, false),
    }
}

/// Every model the configuration names, plus the demo model and anything loaded.
fn models(context: &Context) -> Result<Value> {
    let config = context.config()?;
    let mut ids: Vec<String> = config.models.keys().cloned().collect();
    if context.paths.models_dir().join(DEMO_FILE).exists() {
        ids.push(DEMO_ALIAS.to_string());
    }
    if let Some(mut connection) = client::try_connect(context)? {
        if let Response::Status(status) = connection.call(&Request::Status)? {
            ids.extend(status.instances.into_iter().map(|instance| instance.name));
        }
    }
    ids.sort();
    ids.dedup();
    let data: Vec<Value> = ids.iter().map(|id| json!({"id": id, "object": "model", "owned_by": "llmctl"})).collect();
    Ok(json!({"object": "list", "data": data}))
}

fn metrics(context: &Context) -> Result<String> {
    let mut connection = client::connect(context)?;
    match connection.call(&Request::Metrics)? {
        Response::Metrics { text } => Ok(text),
        _ => Err(Error::internal("the daemon answered metrics with something else")),
    }
}

fn bad(message: impl Into<String>) -> Error {
    Error::Remote { kind: ErrorKind::Usage, message: message.into() }
}

/// Resolves the `model` field: an alias, a path, or the file stem of a known model.
fn resolve_model(context: &Context, name: &str) -> Result<crate::model::ModelSpec> {
    let no_overrides = LoadArgs { ctx_size: None, parallel: None, gpu_layers: None };
    match context.resolve_model(name, &no_overrides) {
        Err(Error::UnknownModel { .. }) | Err(Error::ModelNotFound { .. }) => {}
        other => return other,
    }
    let config = context.config()?;
    let stem_of = |path: &std::path::Path| path.file_stem().map(|s| s.to_string_lossy().into_owned());
    for (alias, model) in &config.models {
        if model.path.as_deref().and_then(stem_of).as_deref() == Some(name) {
            return context.resolve_model(alias, &no_overrides);
        }
    }
    if stem_of(std::path::Path::new(DEMO_FILE)).as_deref() == Some(name) {
        return context.resolve_model(DEMO_ALIAS, &no_overrides);
    }
    Err(Error::UnknownModel { name: name.to_string() })
}

fn number(body: &Value, key: &str, low: f64, high: f64) -> Result<Option<f32>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_f64() {
            Some(n) if n.is_finite() && (low..=high).contains(&n) => Ok(Some(n as f32)),
            _ => Err(bad(format!("`{key}` must be a number between {low} and {high}"))),
        },
    }
}

fn integer(body: &Value, key: &str) -> Result<Option<u64>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| bad(format!("`{key}` must be a whole number"))),
    }
}

/// The daemon request for an OpenAI request body; also whether to stream, and whether the
/// stream ends with a usage chunk.
fn parse_completion(context: &Context, body: &[u8], chat: bool) -> Result<(RunRequest, bool, bool)> {
    let body: Value = serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let name = body.get("model").and_then(Value::as_str).ok_or_else(|| bad("`model` is required"))?;
    let model = resolve_model(context, name)?;
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(|| bad("`stop` must hold strings")))
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad("`stop` must be a string or an array of strings")),
    };
    let max_tokens = integer(&body, "max_completion_tokens")?.or(integer(&body, "max_tokens")?);
    let sampling = Sampling {
        max_tokens: max_tokens.map(|n| n.min(u64::from(u32::MAX)) as u32).filter(|&n| n > 0),
        temperature: number(&body, "temperature", 0.0, 100.0)?,
        top_p: number(&body, "top_p", 0.0, 1.0)?,
        top_k: integer(&body, "top_k")?.map(|k| k.min(u64::from(u32::MAX)) as u32),
        min_p: number(&body, "min_p", 0.0, 1.0)?,
        repeat_penalty: number(&body, "repeat_penalty", 0.0, 100.0)?,
        seed: integer(&body, "seed")?,
        stop,
    };
    let (prompt, messages) = if chat {
        let messages = body.get("messages").and_then(Value::as_array).filter(|m| !m.is_empty());
        let messages = messages.ok_or_else(|| bad("`messages` must be a non-empty array"))?;
        (String::new(), Some(messages.clone()))
    } else {
        let prompt = match body.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                items[0].as_str().unwrap_or_default().to_string()
            }
            _ => return Err(bad("`prompt` must be a string")),
        };
        (prompt, None)
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let run =
        RunRequest { model, mode: if chat { Mode::Chat } else { Mode::Raw }, prompt, system: None, sampling, messages };
    Ok((run, stream, include_usage))
}

/// Writes one chunk of a chunked HTTP body and flushes it.
fn chunk(writer: &mut dyn Write, data: &str) -> io::Result<()> {
    write!(writer, "{:x}\r\n{data}\r\n", data.len())?;
    writer.flush()
}

fn generate(
    served: &Served,
    request: tiny_http::Request,
    run: RunRequest,
    chat: bool,
    stream: bool,
    include_usage: bool,
) {
    let model_name = run.model.name.clone();
    let id = format!("{}-{:x}", if chat { "chatcmpl" } else { "cmpl" }, nanos());
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut connection = match served.context.connect_for(&run.model) {
        Ok(mut connection) => {
            let _ = connection.set_reply_timeout(Some(served.context.generation_timeout()));
            connection
        }
        Err(error) => return respond_error(request, error.kind(), &error.to_string(), None, false),
    };
    if let Err(error) = connection.send(&Request::Run(run)) {
        return respond_error(request, error.kind(), &error.to_string(), None, false);
    }
    // Wait for the first token (or the failure) before choosing the HTTP status.
    let first = loop {
        match connection.recv() {
            Ok(Response::Loading { .. }) | Ok(Response::Queued { .. }) => continue,
            Ok(response) => break response,
            Err(error) => return respond_error(request, error.kind(), &error.to_string(), None, false),
        }
    };
    if let Response::Error { kind, message, retry_after_ms, per_model } = first {
        return respond_error(request, kind, &message, retry_after_ms, per_model);
    }
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let event = |delta: Option<&str>, finish: Option<&str>| -> String {
        let choice = if chat {
            let delta = match delta {
                Some(text) => json!({"role": "assistant", "content": text}),
                None => json!({}),
            };
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": delta.unwrap_or(""), "finish_reason": finish})
        };
        let payload = json!({"id": id, "object": object, "created": created, "model": model_name, "choices": [choice]});
        format!("data: {payload}\n\n")
    };

    if !stream {
        let mut text = String::new();
        let mut next = first;
        let done = loop {
            match next {
                Response::Token { text: piece } => text.push_str(&piece),
                Response::Done(done) => break done,
                Response::Error { kind, message, retry_after_ms, per_model } => {
                    return respond_error(request, kind, &message, retry_after_ms, per_model)
                }
                _ => {}
            }
            next = match connection.recv() {
                Ok(response) => response,
                Err(error) => return respond_error(request, error.kind(), &error.to_string(), None, false),
            };
        };
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": done.finish_reason})
        } else {
            json!({"index": 0, "text": text, "finish_reason": done.finish_reason})
        };
        let body = json!({
            "id": id, "object": if chat { "chat.completion" } else { "text_completion" }, "created": created,
            "model": model_name, "choices": [choice], "usage": usage(&done),
        });
        return respond(request, 200, "application/json", body.to_string(), &[]);
    }

    let mut writer = request.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if writer.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut next = first;
    loop {
        let written = match &next {
            Response::Token { text } => chunk(&mut writer, &event(Some(text), None)),
            Response::Done(done) => {
                let mut tail = event(None, Some(&done.finish_reason));
                if include_usage {
                    let payload = json!({"id": id, "object": object, "created": created, "model": model_name, "choices": [], "usage": usage(done)});
                    tail += &format!("data: {payload}\n\n");
                }
                tail += "data: [DONE]\n\n";
                let _ = chunk(&mut writer, &tail)
                    .and_then(|()| writer.write_all(b"0\r\n\r\n"))
                    .and_then(|()| writer.flush());
                return;
            }
            Response::Error { kind, message, .. } => {
                let payload = error_body(*kind, message);
                let _ = chunk(&mut writer, &format!("data: {payload}\n\n"))
                    .and_then(|()| writer.write_all(b"0\r\n\r\n"))
                    .and_then(|()| writer.flush());
                return;
            }
            _ => Ok(()),
        };
        // The HTTP client went away: dropping the daemon connection cancels the generation.
        if written.is_err() {
            return;
        }
        next = match connection.recv() {
            Ok(response) => response,
            Err(_) => return,
        };
    }
}

fn usage(done: &Done) -> Value {
    json!({
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "total_tokens": done.usage.prompt_tokens + done.usage.completion_tokens,
    })
}

fn nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
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
}
