//! Ollama's API on `serve`, on the same port and under the same admission, budget, auth,
//! CORS, cancellation and accounting as llama-server's routes: `/`, `/api/version`,
//! `/api/tags`, `/api/ps`, `/api/show`, `/api/chat`, `/api/generate`, `/api/embed`,
//! `/api/embeddings`, `/api/pull` and `/api/delete`.
//!
//! llama-server does not speak Ollama, so this module translates, and only here does
//! `serve` translate: a chat or generate request becomes a streamed request to the child's
//! `/v1/chat/completions` (or `/v1/completions` for `raw`), its server-sent events become
//! Ollama's NDJSON lines (or one object with `"stream": false`), and the counts and timings
//! llama-server reports become Ollama's `*_count` and `*_duration` fields. Every field of a
//! request is either translated or refused with a 400 that names it; none is dropped.
//! `keep_alive` is llmctl's TTL machinery (a pin for a while, a pin for good, or an unload
//! after the answer); `num_ctx` and `num_gpu` are load options, so another value is another
//! instance. Field names and shapes follow Ollama's `api/types.go` and `server/routes.go`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::embeddings::{self, upstream_error};
use super::models::{self, Purpose};
use super::routes::HttpWaiter;
use crate::backend::forward::{Outgoing, Part};
use crate::backend::sse::{Line, Lines};
use crate::backend::unix::Cancel;
use crate::config::Config;
use crate::daemon::shared::Shared;
use crate::daemon::work::{self, Attempt};
use crate::error::{Error, ErrorKind, Result};
use crate::http::{Exchange, Request};
use crate::instance::{Message, Pin, Unload};
use crate::model::ModelSpec;

/// The Ollama release whose API these routes follow; `GET /api/version` reports it, since
/// clients compare it with the release a feature needs.
pub(crate) const OLLAMA_VERSION: &str = "0.32.15";

/// Whether `path` is one of Ollama's: its routes, and the probe of its root.
pub(crate) fn is_ollama_path(path: &str) -> bool {
    path == "/" || path == "/api" || path.starts_with("/api/")
}

/// The routes and the methods each takes, for 405s.
const ROUTES: &[(&str, &str)] = &[
    ("/", "GET, HEAD"),
    ("/api/version", "GET, HEAD"),
    ("/api/tags", "GET, HEAD"),
    ("/api/ps", "GET"),
    ("/api/show", "POST"),
    ("/api/chat", "POST"),
    ("/api/generate", "POST"),
    ("/api/embed", "POST"),
    ("/api/embeddings", "POST"),
    ("/api/pull", "POST"),
    ("/api/delete", "DELETE"),
];

/// Ollama's routes that change what a model is, which llmctl does not have: a model is a
/// GGUF file, named in the config or pulled from the Hugging Face Hub.
const NOT_PROVIDED: &[&str] = &["/api/create", "/api/copy", "/api/push", "/api/blobs/"];

/// Answers one request on Ollama's routes; the caller has checked Host, origin and key.
pub(crate) fn handle(shared: &Arc<Shared>, config: &Config, request: Request, exchange: &mut Exchange) {
    let received = Instant::now();
    let method = request.method.to_ascii_uppercase();
    let path = request.path().to_string();
    let head = method == "HEAD";
    let result = match (method.as_str(), path.as_str()) {
        ("GET" | "HEAD", "/") => {
            // The text clients probe for; a HEAD gets the headers alone.
            let body: &[u8] = if head { b"" } else { b"Ollama is running" };
            exchange.respond(200, "text/plain; charset=utf-8", body, &[]);
            Ok(())
        }
        ("GET" | "HEAD", "/api/version") => {
            answer_json(exchange, head, &json!({"version": OLLAMA_VERSION, "llmctl": env!("CARGO_PKG_VERSION")}));
            Ok(())
        }
        ("GET" | "HEAD", "/api/tags") => {
            answer_json(exchange, head, &tags(shared, config));
            Ok(())
        }
        ("GET", "/api/ps") => {
            answer_json(exchange, false, &ps(shared, config));
            Ok(())
        }
        ("POST", "/api/show") => show(shared, config, &request).map(|shown| answer_json(exchange, false, &shown)),
        ("POST", "/api/chat") => generate(shared, config, &request, exchange, Endpoint::Chat, received),
        ("POST", "/api/generate") => generate(shared, config, &request, exchange, Endpoint::Generate, received),
        ("POST", "/api/embed") => embed(shared, config, &request, exchange, received, false),
        ("POST", "/api/embeddings") => embed(shared, config, &request, exchange, received, true),
        ("POST", "/api/pull") => pull(shared, &request, exchange),
        ("DELETE", "/api/delete") => delete(shared, config, &request, exchange),
        (_, path)
            if NOT_PROVIDED.iter().any(|route| path == *route || (route.ends_with('/') && path.starts_with(route))) =>
        {
            refuse(
                exchange,
                501,
                &format!(
                    "{path} is not provided by llmctl: a model is a GGUF file, named in the config or pulled from the \
                     Hugging Face Hub with /api/pull"
                ),
                &[],
            );
            Ok(())
        }
        (_, path) => match ROUTES.iter().find(|(route, _)| *route == path) {
            Some((_, allowed)) => {
                refuse(exchange, 405, &format!("{path} takes {allowed}"), &[("Allow", allowed)]);
                Ok(())
            }
            None => {
                refuse(exchange, 404, &format!("no route for {method} {path}"), &[]);
                Ok(())
            }
        },
    };
    if let Err(error) = result {
        fail(exchange, &error);
    }
}

/// An error in Ollama's shape, `{"error": "..."}`, with its status.
pub(crate) fn refuse(exchange: &mut Exchange, status: u16, message: &str, extra: &[(&str, &str)]) {
    exchange.respond(
        status,
        "application/json; charset=utf-8",
        json!({"error": message}).to_string().as_bytes(),
        extra,
    );
}

/// Answers `error` with its status from the exit-status table, in Ollama's shape; a
/// cancelled request gets nothing, since its client is gone.
fn fail(exchange: &mut Exchange, error: &Error) {
    if matches!(error, Error::Interrupted) {
        return exchange.abort();
    }
    let (retry, per_model) = match error {
        Error::Busy { retry_after_ms, per_model, .. } => (Some(*retry_after_ms), *per_model),
        _ => (None, false),
    };
    let kind = error.kind();
    let status = if kind == ErrorKind::Busy && per_model { 429 } else { kind.http_status() };
    let retry = retry.map(|ms| ms.div_ceil(1000).max(1).to_string());
    let extra: Vec<(&str, &str)> = retry.as_deref().map(|value| vec![("Retry-After", value)]).unwrap_or_default();
    refuse(exchange, status, &error.to_string(), &extra);
}

fn answer_json(exchange: &mut Exchange, head: bool, value: &Value) {
    let body = if head { Vec::new() } else { value.to_string().into_bytes() };
    exchange.respond(200, "application/json; charset=utf-8", &body, &[]);
}

fn bad(message: impl Into<String>) -> Error {
    Error::InvalidParameter { message: message.into() }
}

/// A request's JSON object, taken field by field: what is left at the end is a field this
/// API does not translate, and is refused by name. A `null` is an absent field, as Ollama
/// reads it.
struct Fields {
    map: Map<String, Value>,
    /// What the fields belong to, for messages: `the request`, `messages[2]`, `options`.
    what: String,
}

impl Fields {
    fn of_body(body: &[u8]) -> Result<Fields> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(bad("missing request body"));
        }
        let value: Value =
            serde_json::from_slice(body).map_err(|error| bad(format!("the body is not JSON: {error}")))?;
        Fields::of(value, "the request")
    }

    fn of(value: Value, what: &str) -> Result<Fields> {
        match value {
            Value::Object(map) => Ok(Fields { map, what: what.to_string() }),
            _ => Err(bad(format!("{what} is not a JSON object"))),
        }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|value| !value.is_null())
    }

    fn string(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(bad(format!("`{key}` of {} must be a string", self.what))),
        }
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(flag)) => Ok(Some(flag)),
            Some(_) => Err(bad(format!("`{key}` of {} must be true or false", self.what))),
        }
    }

    /// Refuses a field llmctl cannot honour when it asks for anything: a non-empty string
    /// or list, a true, a number.
    fn refuse_set(&mut self, key: &str, why: &str) -> Result<()> {
        let set = match self.take(key) {
            None => false,
            Some(Value::String(text)) => !text.is_empty(),
            Some(Value::Array(items)) => !items.is_empty(),
            Some(Value::Bool(flag)) => flag,
            Some(_) => true,
        };
        if set {
            return Err(bad(format!("`{key}` is not supported by llmctl's Ollama API: {why}")));
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(bad(format!("`{key}` of {} is not supported by llmctl's Ollama API", self.what))),
        }
    }
}

/// How long the model stays loaded after this request (Ollama's `keep_alive`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum KeepAlive {
    /// `0`: unload once it is idle after the answer.
    Unload,
    /// A duration: pinned (never evicted, never unloaded by its TTL) at least this long.
    For(Duration),
    /// Negative: pinned until `llmctl unpin`.
    Forever,
}

/// Ollama's `keep_alive`: seconds as a number, or a Go duration (`"5m"`, `"1h30m"`,
/// `"300ms"`, `"-1m"`), or seconds in a string.
fn keep_alive(value: &Value) -> Result<KeepAlive> {
    let seconds = match value {
        Value::Number(number) => number.as_f64().unwrap_or(0.0),
        Value::String(text) => match text.trim().parse::<f64>() {
            Ok(seconds) => seconds,
            Err(_) => go_duration(text.trim()).ok_or_else(|| {
                bad(format!("keep_alive `{text}` is not a duration (seconds, or as \"5m\", \"1h30m\", \"-1\")"))
            })?,
        },
        _ => return Err(bad("keep_alive must be a number of seconds or a duration string")),
    };
    Ok(if !seconds.is_finite() || seconds < 0.0 {
        KeepAlive::Forever
    } else if seconds == 0.0 {
        KeepAlive::Unload
    } else {
        KeepAlive::For(Duration::from_secs_f64(seconds.min(crate::config::MAX_SECONDS as f64)))
    })
}

/// Seconds of a Go duration string (`time.ParseDuration`): a sign, then numbers with units.
fn go_duration(text: &str) -> Option<f64> {
    let (sign, mut rest) = match text.strip_prefix('-') {
        Some(rest) => (-1.0, rest),
        None => (1.0, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    let mut total = 0.0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += number * scale;
    }
    Some(sign * total)
}

/// Applies `keep_alive` to the instance of `spec` once its answer is out.
fn apply_keep_alive(shared: &Shared, spec: &ModelSpec, keep: Option<KeepAlive>) {
    let (Some(keep), Some(instance)) = (keep, shared.table.get(spec)) else { return };
    match keep {
        KeepAlive::Forever => {
            instance.send(Message::Pin(Pin::Set(true)));
        }
        KeepAlive::For(duration) => {
            instance.send(Message::Pin(Pin::Until(SystemTime::now() + duration)));
        }
        KeepAlive::Unload => {
            // A pin of the config or of `llmctl pin` is the operator's and stays; a pin for
            // a while, from an earlier keep_alive, gives way. The worker unloads only an
            // idle instance: another request in flight keeps it.
            let pinned = instance.with_view(|view| view.spec.policy.pinned || view.pinned_by_command);
            if !pinned {
                instance.send(Message::Unload {
                    why: Unload::Expire,
                    cutoff: shared.last_job(),
                    room: None,
                    message: format!("{} was unloaded after its answer, as keep_alive 0 asked", spec.name),
                    done: None,
                });
            }
        }
    }
}

/// The model a request names (`model`, or the older `name`), and what the answer calls it.
fn model_of(fields: &mut Fields) -> Result<String> {
    let model = fields.string("model")?;
    let name = fields.string("name")?;
    Ok(model.filter(|m| !m.is_empty()).or(name).unwrap_or_default())
}

/// The instance a request goes to, as `serve` chooses for every route. Ollama's clients add
/// `:latest` to a name without a tag: a name llmctl knows without it is that model.
fn choose(shared: &Shared, config: &Config, name: &str, purpose: Purpose) -> Result<ModelSpec> {
    let name = match name.strip_suffix(":latest") {
        Some(bare) if !models::knows(shared, config, name) && models::knows(shared, config, bare) => bare,
        _ => name,
    };
    let name = (!name.is_empty()).then_some(name);
    let mut spec = models::choose(shared, config, name, purpose)?;
    if purpose == Purpose::Embed {
        spec.load.embeddings = true;
    }
    Ok(spec)
}

/// Which of Ollama's generation routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `/api/chat`: messages in, `message` out.
    Chat,
    /// `/api/generate`: a prompt in, `response` out.
    Generate,
}

/// A generation request, translated.
struct Translated {
    spec: ModelSpec,
    /// The name the client used, echoed as `model` in every answer.
    name: String,
    /// llama-server's route and body.
    upstream: &'static str,
    body: Map<String, Value>,
    stream: bool,
    keep: Option<KeepAlive>,
    /// No prompt and no messages: Ollama's way to load (or with `keep_alive` 0, unload).
    empty: bool,
}

fn translate(shared: &Shared, config: &Config, request: &Request, endpoint: Endpoint) -> Result<Translated> {
    let mut fields = Fields::of_body(&request.body)?;
    let name = model_of(&mut fields)?;
    let mut spec = choose(shared, config, &name, Purpose::Generate)?;
    let stream = fields.bool("stream")?.unwrap_or(true);
    let keep = fields.take("keep_alive").as_ref().map(keep_alive).transpose()?;
    let mut body = Map::new();
    let (upstream, empty) = match endpoint {
        Endpoint::Chat => {
            let messages = match fields.take("messages") {
                None => Vec::new(),
                Some(Value::Array(messages)) => messages,
                Some(_) => return Err(bad("`messages` must be a list")),
            };
            let empty = messages.is_empty();
            let messages = messages
                .into_iter()
                .enumerate()
                .map(|(i, message)| chat_message(i, message))
                .collect::<Result<Vec<_>>>()?;
            body.insert("messages".into(), Value::Array(messages));
            match fields.take("tools") {
                None => {}
                Some(Value::Array(tools)) if tools.is_empty() => {}
                Some(Value::Array(tools)) => {
                    body.insert("tools".into(), Value::Array(tools));
                }
                Some(_) => return Err(bad("`tools` must be a list")),
            }
            ("/v1/chat/completions", empty)
        }
        Endpoint::Generate => {
            let prompt = fields.string("prompt")?.unwrap_or_default();
            let system = fields.string("system")?.unwrap_or_default();
            let raw = fields.bool("raw")?.unwrap_or(false);
            fields.refuse_set(
                "suffix",
                "fill-in-the-middle goes to llama-server's own /infill, which `serve` passes on as it is",
            )?;
            fields
                .refuse_set("template", "llama-server applies the model's chat template (or --chat-template-file)")?;
            fields.refuse_set("context", "it is not returned either; send the conversation to /api/chat")?;
            let empty = prompt.is_empty();
            if raw {
                if !system.is_empty() {
                    return Err(bad("raw mode does not support system"));
                }
                body.insert("prompt".into(), Value::String(prompt));
                ("/v1/completions", empty)
            } else {
                let mut messages = Vec::new();
                if !system.is_empty() {
                    messages.push(json!({"role": "system", "content": system}));
                }
                messages.push(json!({"role": "user", "content": prompt}));
                body.insert("messages".into(), Value::Array(messages));
                ("/v1/chat/completions", empty)
            }
        }
    };
    fields.refuse_set("images", "llmctl starts llama-server without a multimodal projector")?;
    if let Some(format) = fields.take("format") {
        match format {
            Value::String(text) if text.is_empty() => {}
            // Ollama's "json" is its JSON grammar, whose root is an object.
            Value::String(text) if text == "json" => {
                body.insert("json_schema".into(), json!({"type": "object"}));
            }
            Value::Object(schema) => {
                body.insert("json_schema".into(), Value::Object(schema));
            }
            _ => return Err(bad("`format` must be \"json\" or a JSON schema object")),
        }
    }
    if let Some(think) = fields.take("think") {
        think_fields(&think, upstream, &mut body)?;
    }
    if let Some(logprobs) = fields.bool("logprobs")? {
        body.insert("logprobs".into(), Value::Bool(logprobs));
    }
    if let Some(top) = fields.take("top_logprobs") {
        match top.as_u64().filter(|n| *n <= 20) {
            Some(0) => {}
            Some(n) => {
                body.insert("top_logprobs".into(), Value::from(n));
            }
            None => return Err(bad("top_logprobs must be between 0 and 20")),
        }
    }
    fields.refuse_set("truncate", "llama-server refuses a prompt longer than the context instead of cutting it")?;
    fields.refuse_set("shift", "context shifting is llama-server's --context-shift, set in the model's args")?;
    fields.refuse_set("_debug_render_only", "llama-server's /apply-template renders a chat, passed on as it is")?;
    if let Some(options) = fields.take("options") {
        apply_options(options, &mut body, &mut spec, Purpose::Generate)?;
    }
    fields.finish()?;
    body.insert("model".into(), Value::String(spec.name.clone()));
    body.insert("stream".into(), Value::Bool(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    let name = if name.is_empty() { spec.name.clone() } else { name };
    Ok(Translated { spec, name, upstream, body, stream, keep, empty })
}

/// One of Ollama's chat messages as llama-server's OpenAI messages: tool calls with their
/// arguments as a JSON string, `thinking` as `reasoning_content`, `tool_name` as `name`.
fn chat_message(index: usize, message: Value) -> Result<Value> {
    let mut fields = Fields::of(message, &format!("messages[{index}]"))?;
    let mut out = Map::new();
    let role = fields.string("role")?.ok_or_else(|| bad(format!("messages[{index}] has no role")))?;
    out.insert("role".into(), Value::String(role.to_ascii_lowercase()));
    out.insert("content".into(), Value::String(fields.string("content")?.unwrap_or_default()));
    if let Some(thinking) = fields.string("thinking")?.filter(|t| !t.is_empty()) {
        out.insert("reasoning_content".into(), Value::String(thinking));
    }
    if let Some(name) = fields.string("tool_name")? {
        out.insert("name".into(), Value::String(name));
    }
    if let Some(id) = fields.string("tool_call_id")? {
        out.insert("tool_call_id".into(), Value::String(id));
    }
    match fields.take("tool_calls") {
        None => {}
        Some(Value::Array(calls)) => {
            let mut translated = Vec::new();
            for (call_index, call) in calls.into_iter().enumerate() {
                let what = format!("messages[{index}].tool_calls[{call_index}]");
                let mut call = Fields::of(call, &what)?;
                let id = call.string("id")?.unwrap_or_else(|| format!("call_{index}_{call_index}"));
                let mut function =
                    Fields::of(call.take("function").unwrap_or(Value::Null), &format!("{what}.function"))?;
                let name = function.string("name")?.ok_or_else(|| bad(format!("{what} has no function name")))?;
                let arguments = function.take("arguments").unwrap_or_else(|| json!({}));
                // Its place in the list is its index; the number itself says nothing more.
                function.take("index");
                function.finish()?;
                call.take("type");
                call.finish()?;
                translated.push(json!({"id": id, "type": "function",
                    "function": {"name": name, "arguments": arguments.to_string()}}));
            }
            out.insert("tool_calls".into(), Value::Array(translated));
        }
        Some(_) => return Err(bad(format!("messages[{index}].tool_calls must be a list"))),
    }
    fields.refuse_set("images", "llmctl starts llama-server without a multimodal projector")?;
    fields.finish()?;
    Ok(Value::Object(out))
}

/// Ollama's `think`: false turns reasoning off (`reasoning_effort: "none"`), true turns it on,
/// a level is passed as `reasoning_effort` (Ollama reads "max" as "high" too).
fn think_fields(think: &Value, upstream: &str, body: &mut Map<String, Value>) -> Result<()> {
    if upstream == "/v1/completions" {
        return Err(bad("`think` needs the chat template; raw prompts are sent as they are"));
    }
    match think {
        Value::Bool(false) => {
            body.insert("reasoning_effort".into(), json!("none"));
        }
        Value::Bool(true) => {
            body.insert("chat_template_kwargs".into(), json!({"enable_thinking": true}));
        }
        Value::String(level) if ["low", "medium", "high", "max"].contains(&level.as_str()) => {
            let level = if level == "max" { "high" } else { level.as_str() };
            body.insert("reasoning_effort".into(), json!(level));
            body.insert("chat_template_kwargs".into(), json!({"enable_thinking": true}));
        }
        _ => return Err(bad("`think` must be true, false, \"low\", \"medium\", \"high\" or \"max\"")),
    }
    Ok(())
}

/// Sampling options as llama-server names them, and whether each takes integers.
const SAMPLING_OPTIONS: &[(&str, &str, bool)] = &[
    ("temperature", "temperature", false),
    ("top_p", "top_p", false),
    ("top_k", "top_k", true),
    ("min_p", "min_p", false),
    ("typical_p", "typical_p", false),
    ("repeat_penalty", "repeat_penalty", false),
    ("repeat_last_n", "repeat_last_n", true),
    ("presence_penalty", "presence_penalty", false),
    ("frequency_penalty", "frequency_penalty", false),
    ("seed", "seed", true),
    ("num_keep", "n_keep", true),
    ("mirostat", "mirostat", true),
    ("mirostat_tau", "mirostat_tau", false),
    ("mirostat_eta", "mirostat_eta", false),
];

/// Ollama's `options`: sampling options go into the body; `num_ctx` and `num_gpu` change
/// the load options of `spec` (another instance when they differ); any other is refused.
fn apply_options(options: Value, body: &mut Map<String, Value>, spec: &mut ModelSpec, purpose: Purpose) -> Result<()> {
    let mut options = Fields::of(options, "options")?;
    let number = |key: &str, value: &Value, integer: bool| -> Result<Value> {
        let Some(x) = value.as_f64() else {
            return Err(bad(format!("option `{key}` must be a number")));
        };
        if integer {
            if x.fract() != 0.0 {
                return Err(bad(format!("option `{key}` must be a whole number")));
            }
            return Ok(Value::from(x as i64));
        }
        Ok(value.clone())
    };
    if purpose == Purpose::Generate {
        for (ollama, llama, integer) in SAMPLING_OPTIONS {
            if let Some(value) = options.take(ollama) {
                body.insert(llama.to_string(), number(ollama, &value, *integer)?);
            }
        }
        if let Some(predict) = options.take("num_predict") {
            // -1: no limit; -2: until the context is full (llama-server's n_predict reads both).
            let predict = number("num_predict", &predict, true)?;
            if predict.as_i64().is_some_and(|n| n < -2) {
                return Err(bad("option `num_predict` must be -2, -1 or a number of tokens"));
            }
            body.insert("n_predict".into(), predict);
        }
        match options.take("stop") {
            None => {}
            Some(Value::String(stop)) => {
                body.insert("stop".into(), json!([stop]));
            }
            Some(Value::Array(stops)) if stops.iter().all(Value::is_string) => {
                body.insert("stop".into(), Value::Array(stops));
            }
            Some(_) => return Err(bad("option `stop` must be a list of strings")),
        }
    }
    if let Some(ctx) = options.take("num_ctx") {
        let ctx = number("num_ctx", &ctx, true)?.as_i64().unwrap_or(0);
        let ctx = u32::try_from(ctx)
            .ok()
            .filter(|ctx| (16..=crate::config::MAX_CTX_SIZE).contains(ctx))
            .ok_or_else(|| bad(format!("option `num_ctx` must be in 16..={}", crate::config::MAX_CTX_SIZE)))?;
        // The context the instance has anyway (configured, else the model's own) is no
        // change: clients that echo what /api/show said get the same instance.
        if effective_context(spec) != Some(u64::from(ctx)) {
            if spec.remote.is_some() {
                return Err(bad(format!(
                    "option `num_ctx` is a load option and {} is a server llmctl does not start",
                    spec.name
                )));
            }
            spec.load.ctx_size = Some(ctx);
        }
    }
    if let Some(layers) = options.take("num_gpu") {
        let layers = number("num_gpu", &layers, true)?.as_i64().unwrap_or(0);
        if layers >= 0 {
            let layers = u32::try_from(layers)
                .ok()
                .filter(|n| *n <= crate::config::MAX_GPU_LAYERS)
                .ok_or_else(|| bad(format!("option `num_gpu` must be -1 or 0..={}", crate::config::MAX_GPU_LAYERS)))?;
            if spec.remote.is_some() {
                return Err(bad(format!(
                    "option `num_gpu` is a load option and {} is a server llmctl does not start",
                    spec.name
                )));
            }
            spec.load.gpu_layers = Some(layers);
        }
    }
    match options.map.keys().next() {
        None => Ok(()),
        Some(key) if purpose == Purpose::Embed && SAMPLING_OPTIONS.iter().any(|(name, _, _)| name == key) => {
            Err(bad(format!("option `{key}` does not apply to embeddings")))
        }
        Some(key) => Err(bad(format!(
            "option `{key}` is not supported by llmctl's Ollama API; llama-server's other settings go in the model's \
             `args` in the config"
        ))),
    }
}

/// The context an instance of `spec` runs with: configured, else the model's training
/// context (llama-server's default).
fn effective_context(spec: &ModelSpec) -> Option<u64> {
    spec.load.ctx_size.map(u64::from).or_else(|| {
        if spec.remote.is_some() {
            return None;
        }
        crate::gguf::inspect(&spec.path).ok().and_then(|info| info.context_length)
    })
}

/// `POST /api/chat` and `POST /api/generate`.
fn generate(
    shared: &Arc<Shared>,
    config: &Config,
    request: &Request,
    exchange: &mut Exchange,
    endpoint: Endpoint,
    received: Instant,
) -> Result<()> {
    let translated = translate(shared, config, request, endpoint)?;
    let Ok(client_socket) = exchange.stream().try_clone() else {
        return Err(Error::internal("cannot watch the connection"));
    };
    let mut waiter = HttpWaiter(&client_socket);
    if translated.empty {
        // Ollama loads a model for a request without a prompt, and unloads it for one with
        // keep_alive 0 too.
        let reason = if translated.keep == Some(KeepAlive::Unload) {
            apply_keep_alive(shared, &translated.spec, translated.keep);
            "unload"
        } else {
            work::load(shared, &translated.spec, &mut waiter)?;
            apply_keep_alive(shared, &translated.spec, translated.keep);
            "load"
        };
        let mut answer = json!({"model": translated.name, "created_at": rfc3339(SystemTime::now()), "done": true,
            "done_reason": reason});
        match endpoint {
            Endpoint::Chat => answer["message"] = json!({"role": "assistant", "content": ""}),
            Endpoint::Generate => answer["response"] = json!(""),
        }
        answer_json(exchange, false, &answer);
        return Ok(());
    }
    let watched = client_socket.try_clone().ok();
    let cancel: Cancel = Arc::new(move || watched.as_ref().is_none_or(crate::sys::peer_closed));
    let body = Value::Object(translated.body.clone()).to_string();
    let mut reply = Reply::new(endpoint, &translated.name, translated.stream, translated.upstream);
    let mut loaded_at = None;
    let result = work::on_lease(shared, &translated.spec, &mut waiter, |lease, started| {
        loaded_at.get_or_insert_with(Instant::now);
        reply.restart();
        let outgoing = Outgoing {
            method: "POST",
            target: translated.upstream,
            content_type: Some("application/json"),
            body: body.as_bytes(),
        };
        let mut first_token = None;
        let result = lease.client.forward(outgoing, Some(Arc::clone(&cancel)), |part| {
            if lease.generation.is_stopped() {
                return Err(std::io::Error::other("the instance was stopped"));
            }
            match part {
                Part::Head { status, .. } => {
                    reply.status = status;
                    if status == 200 && reply.stream {
                        let headers = [("Content-Type".to_string(), "application/x-ndjson".to_string())];
                        exchange.start(200, &headers, None)?;
                    }
                    Ok(())
                }
                Part::Bytes(bytes) => {
                    let lines = reply.feed(bytes);
                    if reply.has_output {
                        first_token.get_or_insert_with(|| started.elapsed());
                    }
                    if lines.is_empty() {
                        Ok(())
                    } else {
                        exchange.write(&lines)
                    }
                }
            }
        });
        Attempt { result, answered: reply.status != 0, ok: Attempt::ok_for_status(reply.status), first_token }
    });
    let timing = Timing { received, loaded: loaded_at.unwrap_or(received) };
    match result {
        Ok(_) if reply.status != 200 => {
            let error = upstream_error(&translated.spec.name, reply.status, &reply.error_body);
            if exchange.started() {
                let _ = exchange.write(&error_line(&error.to_string()));
                exchange.finish();
            } else {
                fail(exchange, &error);
            }
        }
        Ok(_) => {
            if reply.stream {
                let mut end = reply.tool_call_line();
                end.extend_from_slice(&reply.final_line(&timing));
                let _ = exchange.write(&end);
                exchange.finish();
            } else {
                let whole = reply.whole(&timing);
                exchange.respond(200, "application/json; charset=utf-8", &whole, &[]);
            }
            apply_keep_alive(shared, &translated.spec, translated.keep);
        }
        Err(Error::Interrupted) => exchange.abort(),
        // Ollama ends a stream that failed with an error line; its clients read it as the
        // failure it is.
        Err(error) if exchange.started() => {
            log::warn!("an Ollama answer broke off: {error}");
            let _ = exchange.write(&error_line(&error.to_string()));
            exchange.finish();
        }
        Err(error) => fail(exchange, &error),
    }
    Ok(())
}

fn error_line(message: &str) -> Vec<u8> {
    let mut line = json!({"error": message}).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// When a request arrived and when it had its slot: Ollama's `total_duration` and
/// `load_duration` are measured from these.
struct Timing {
    received: Instant,
    loaded: Instant,
}

/// A tool call as its pieces stream in.
#[derive(Default)]
struct ToolCall {
    id: String,
    name: String,
    arguments: String,
}

/// Ollama's answer to one generation, built from llama-server's events as they come:
/// NDJSON lines when streamed, else gathered into one object.
struct Reply {
    endpoint: Endpoint,
    name: String,
    stream: bool,
    /// The upstream route, which says where the text is in each event.
    upstream: &'static str,
    status: u16,
    lines: Lines,
    /// Whether any text or thinking came (for the time to first token).
    has_output: bool,
    content: String,
    thinking: String,
    tool_calls: Vec<ToolCall>,
    logprobs: Vec<Value>,
    finish_reason: Option<String>,
    prompt_tokens: u64,
    completion_tokens: u64,
    prompt_ms: f64,
    predicted_ms: f64,
    /// An error event in the stream.
    error: Option<String>,
    /// The body of an answer that is an error (status 400 and above).
    error_body: Vec<u8>,
}

impl Reply {
    fn new(endpoint: Endpoint, name: &str, stream: bool, upstream: &'static str) -> Reply {
        Reply {
            endpoint,
            name: name.to_string(),
            stream,
            upstream,
            status: 0,
            lines: Lines::default(),
            has_output: false,
            content: String::new(),
            thinking: String::new(),
            tool_calls: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            prompt_ms: 0.0,
            predicted_ms: 0.0,
            error: None,
            error_body: Vec::new(),
        }
    }

    /// Forgets a try on another server that failed before it answered.
    fn restart(&mut self) {
        *self = Reply::new(self.endpoint, &self.name, self.stream, self.upstream);
    }

    /// Reads `bytes` of the answer; returns the NDJSON lines to send now (none when not
    /// streamed).
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.status != 200 {
            if self.error_body.len() < 64 << 10 {
                self.error_body.extend_from_slice(bytes);
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut lines = std::mem::take(&mut self.lines);
        let _: std::ops::ControlFlow<()> = lines.feed(bytes, |line, _| {
            if let Line::Complete(line) = line {
                self.event(line, &mut out);
            }
            std::ops::ControlFlow::Continue(())
        });
        self.lines = lines;
        out
    }

    /// One line of the SSE stream.
    fn event(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let Some(payload) = line.strip_prefix(b"data:") else {
            return;
        };
        let payload = payload.trim_ascii();
        if payload == b"[DONE]" {
            return;
        }
        let Ok(event) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        if let Some(error) = event.get("error") {
            let message =
                error.get("message").and_then(Value::as_str).or(error.as_str()).unwrap_or("llama-server failed");
            self.error = Some(message.to_string());
            return;
        }
        if let Some(usage) = event.get("usage") {
            let count = |key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0);
            self.prompt_tokens = self.prompt_tokens.max(count("prompt_tokens"));
            self.completion_tokens = self.completion_tokens.max(count("completion_tokens"));
        }
        if let Some(timings) = event.get("timings") {
            let ms = |key: &str| timings.get(key).and_then(Value::as_f64).unwrap_or(0.0);
            self.prompt_ms = ms("prompt_ms");
            self.predicted_ms = ms("predicted_ms");
        }
        let Some(choice) = event.pointer("/choices/0") else {
            return;
        };
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_string());
        }
        let (text, thinking) = if self.upstream == "/v1/completions" {
            (choice.get("text").and_then(Value::as_str).unwrap_or(""), "")
        } else {
            let delta = choice.get("delta").unwrap_or(&Value::Null);
            for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                let index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                if index >= 1024 {
                    continue;
                }
                while self.tool_calls.len() <= index {
                    self.tool_calls.push(ToolCall::default());
                }
                let gathered = &mut self.tool_calls[index];
                if let Some(id) = call.get("id").and_then(Value::as_str) {
                    gathered.id = id.to_string();
                }
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    gathered.name.push_str(name);
                }
                if let Some(arguments) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    gathered.arguments.push_str(arguments);
                }
            }
            (
                delta.get("content").and_then(Value::as_str).unwrap_or(""),
                delta.get("reasoning_content").and_then(Value::as_str).unwrap_or(""),
            )
        };
        let logprobs: Vec<Value> =
            choice.pointer("/logprobs/content").and_then(Value::as_array).cloned().unwrap_or_default();
        if text.is_empty() && thinking.is_empty() && logprobs.is_empty() {
            return;
        }
        self.has_output = true;
        if self.stream {
            let mut piece = self.piece(text, thinking);
            if !logprobs.is_empty() {
                piece["logprobs"] = Value::Array(logprobs);
            }
            push_line(out, &piece);
        } else {
            self.content.push_str(text);
            self.thinking.push_str(thinking);
            self.logprobs.extend(logprobs);
        }
    }

    /// A line of the answer with `text` (and `thinking`), not done.
    fn piece(&self, text: &str, thinking: &str) -> Value {
        let mut piece = json!({"model": self.name, "created_at": rfc3339(SystemTime::now())});
        match self.endpoint {
            Endpoint::Chat => {
                let mut message = json!({"role": "assistant", "content": text});
                if !thinking.is_empty() {
                    message["thinking"] = json!(thinking);
                }
                piece["message"] = message;
            }
            Endpoint::Generate => {
                piece["response"] = json!(text);
                if !thinking.is_empty() {
                    piece["thinking"] = json!(thinking);
                }
            }
        }
        piece["done"] = json!(false);
        piece
    }

    /// The tool calls in Ollama's shape: arguments as an object, not a string.
    fn ollama_tool_calls(&self) -> Vec<Value> {
        self.tool_calls
            .iter()
            .filter(|call| !call.name.is_empty())
            .enumerate()
            .map(|(index, call)| {
                let arguments: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
                let mut value = json!({"function": {"index": index, "name": call.name, "arguments": arguments}});
                if !call.id.is_empty() {
                    value["id"] = json!(call.id);
                }
                value
            })
            .collect()
    }

    /// Ollama sends the tool calls of a streamed chat whole, in one line before the last.
    fn tool_call_line(&self) -> Vec<u8> {
        let calls = self.ollama_tool_calls();
        let mut out = Vec::new();
        if !calls.is_empty() {
            let mut piece = self.piece("", "");
            piece["message"]["tool_calls"] = Value::Array(calls);
            push_line(&mut out, &piece);
        }
        out
    }

    /// The `done` fields: why it ended, and the counts and durations in nanoseconds.
    fn finish_fields(&self, answer: &mut Value, timing: &Timing) {
        let nanos = |d: Duration| d.as_nanos() as u64;
        let reason = match self.finish_reason.as_deref() {
            Some("length") => "length",
            // A tool call ends the turn as a stop does, in Ollama's words.
            _ => "stop",
        };
        answer["done"] = json!(true);
        answer["done_reason"] = json!(reason);
        answer["total_duration"] = json!(nanos(timing.received.elapsed()));
        answer["load_duration"] = json!(nanos(timing.loaded.saturating_duration_since(timing.received)));
        answer["prompt_eval_count"] = json!(self.prompt_tokens);
        answer["prompt_eval_duration"] = json!((self.prompt_ms * 1e6) as u64);
        answer["eval_count"] = json!(self.completion_tokens);
        answer["eval_duration"] = json!((self.predicted_ms * 1e6) as u64);
    }

    /// The last line of a streamed answer, or an error line when llama-server sent one.
    fn final_line(&self, timing: &Timing) -> Vec<u8> {
        if let Some(error) = &self.error {
            return error_line(error);
        }
        let mut last = self.piece("", "");
        self.finish_fields(&mut last, timing);
        let mut out = Vec::new();
        push_line(&mut out, &last);
        out
    }

    /// The whole answer of a request not streamed.
    fn whole(&self, timing: &Timing) -> Vec<u8> {
        if let Some(error) = &self.error {
            return json!({"error": error}).to_string().into_bytes();
        }
        let mut answer = self.piece(&self.content, &self.thinking);
        let calls = self.ollama_tool_calls();
        if !calls.is_empty() {
            match self.endpoint {
                Endpoint::Chat => answer["message"]["tool_calls"] = Value::Array(calls),
                Endpoint::Generate => answer["tool_calls"] = Value::Array(calls),
            }
        }
        if !self.logprobs.is_empty() {
            answer["logprobs"] = Value::Array(self.logprobs.clone());
        }
        self.finish_fields(&mut answer, timing);
        answer.to_string().into_bytes()
    }
}

fn push_line(out: &mut Vec<u8>, value: &Value) {
    let _ = serde_json::to_writer(&mut *out, value);
    out.push(b'\n');
}

/// `POST /api/embed` (`legacy` false) and `POST /api/embeddings` (`legacy` true: one
/// `prompt`, a vector as the model pools it, as Ollama's older route answers).
fn embed(
    shared: &Arc<Shared>,
    config: &Config,
    request: &Request,
    exchange: &mut Exchange,
    received: Instant,
    legacy: bool,
) -> Result<()> {
    let mut fields = Fields::of_body(&request.body)?;
    let name = model_of(&mut fields)?;
    let mut spec = choose(shared, config, &name, Purpose::Embed)?;
    let keep = fields.take("keep_alive").as_ref().map(keep_alive).transpose()?;
    let inputs: Vec<String> = if legacy {
        fields.string("prompt")?.filter(|prompt| !prompt.is_empty()).into_iter().collect()
    } else {
        match fields.take("input") {
            None => Vec::new(),
            Some(Value::String(text)) if text.is_empty() => Vec::new(),
            Some(Value::String(text)) => vec![text],
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(text) => Ok(text),
                    _ => Err(bad("invalid input type: `input` is a string or a list of strings")),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("invalid input type: `input` is a string or a list of strings")),
        }
    };
    let dimensions = if legacy {
        None
    } else {
        match fields.take("dimensions") {
            None => None,
            Some(value) => Some(value.as_u64().ok_or_else(|| bad("`dimensions` must be a positive number"))? as usize),
        }
    };
    if !legacy && fields.bool("truncate")? == Some(true) {
        return Err(bad(
            "`truncate` is not supported by llmctl's Ollama API: llama-server refuses an input longer than the \
             context instead of cutting it",
        ));
    }
    if let Some(options) = fields.take("options") {
        apply_options(options, &mut Map::new(), &mut spec, Purpose::Embed)?;
    }
    fields.finish()?;
    let name = if name.is_empty() { spec.name.clone() } else { name };
    let Ok(client_socket) = exchange.stream().try_clone() else {
        return Err(Error::internal("cannot watch the connection"));
    };
    let mut waiter = HttpWaiter(&client_socket);
    if inputs.is_empty() {
        // An empty request loads the model, as Ollama does.
        work::load(shared, &spec, &mut waiter)?;
        apply_keep_alive(shared, &spec, keep);
        let answer = if legacy { json!({"embedding": []}) } else { json!({"model": name, "embeddings": []}) };
        answer_json(exchange, false, &answer);
        return Ok(());
    }
    let watched = client_socket.try_clone().ok();
    let cancel: Cancel = Arc::new(move || watched.as_ref().is_none_or(crate::sys::peer_closed));
    let embedded = embeddings::embed(shared, &spec, &inputs, !legacy, &mut waiter, Some(cancel))?;
    let answer = if legacy {
        json!({"embedding": embedded.vectors.into_iter().next().unwrap_or_default()})
    } else {
        let vectors: Vec<Vec<f64>> = embedded
            .vectors
            .into_iter()
            .map(|vector| match dimensions {
                // Ollama cuts a vector to the dimensions asked for, and normalizes it again.
                Some(n) if n > 0 && n < vector.len() => normalize(vector[..n].to_vec()),
                _ => vector,
            })
            .collect();
        json!({"model": name, "embeddings": vectors,
            "total_duration": received.elapsed().as_nanos() as u64,
            "load_duration": embedded.waited.as_nanos() as u64,
            "prompt_eval_count": embedded.done.usage.prompt_tokens})
    };
    answer_json(exchange, false, &answer);
    apply_keep_alive(shared, &spec, keep);
    Ok(())
}

fn normalize(mut vector: Vec<f64>) -> Vec<f64> {
    let norm = vector.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    vector.iter_mut().for_each(|x| *x /= norm);
    vector
}

/// `POST /api/pull`: `llmctl pull` of an `OWNER/REPO[:QUANT]` name, its progress as
/// Ollama's status lines (or only the last, with `"stream": false`).
fn pull(shared: &Arc<Shared>, request: &Request, exchange: &mut Exchange) -> Result<()> {
    let mut fields = Fields::of_body(&request.body)?;
    let name = model_of(&mut fields)?;
    let stream = fields.bool("stream")?.unwrap_or(true);
    // Ollama ignores these too: a Hub download is always over https, with HF_TOKEN.
    for ignored in ["insecure", "username", "password"] {
        fields.take(ignored);
    }
    fields.finish()?;
    let wanted = crate::library::RepoName::parse(name.strip_suffix(":latest").unwrap_or(&name)).map_err(|reason| {
        bad(format!("{reason}; llmctl pulls GGUF models from the Hugging Face Hub by OWNER/REPO[:QUANT]"))
    })?;
    let hub = crate::hub::Hub::from_env();
    // The listing first: a name the Hub does not have is a 404, not a line in a stream.
    let plan = hub.plan(wanted)?;
    let mut progress = PullProgress { exchange, stream, last: None, started: false };
    progress.line(json!({"status": "pulling manifest"}))?;
    let pulled = hub.pull(&shared.paths, &plan, &mut |file, have| progress.file(file, have));
    match pulled {
        Ok(_) => {
            progress.line(json!({"status": "verifying sha256 digest"}))?;
            progress.line(json!({"status": "writing manifest"}))?;
            progress.line(json!({"status": "success"}))?;
            if progress.stream {
                progress.exchange.finish();
            } else {
                answer_json(progress.exchange, false, &json!({"status": "success"}));
            }
            Ok(())
        }
        Err(Error::Interrupted) => {
            progress.exchange.abort();
            Ok(())
        }
        Err(error) if progress.started => {
            let _ = progress.exchange.write(&error_line(&error.to_string()));
            progress.exchange.finish();
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// The progress lines of one pull, at most five a second for each file.
struct PullProgress<'a, 'b> {
    exchange: &'a mut Exchange<'b>,
    stream: bool,
    /// When the last line about a file was sent, and which file.
    last: Option<(Instant, String)>,
    started: bool,
}

impl PullProgress<'_, '_> {
    fn line(&mut self, value: Value) -> Result<()> {
        if !self.stream {
            // Only the end is answered; the connection is still watched.
            return if self.exchange.client_gone() { Err(Error::Interrupted) } else { Ok(()) };
        }
        if !self.started {
            let headers = [("Content-Type".to_string(), "application/x-ndjson".to_string())];
            self.exchange.start(200, &headers, None).map_err(|_| Error::Interrupted)?;
            self.started = true;
        }
        let mut line = Vec::new();
        push_line(&mut line, &value);
        self.exchange.write(&line).map_err(|_| Error::Interrupted)
    }

    fn file(&mut self, file: &crate::hub::RemoteFile, have: u64) -> std::io::Result<()> {
        let complete = file.size == Some(have);
        let due = match &self.last {
            Some((at, name)) => name != &file.name || at.elapsed() >= Duration::from_millis(200) || complete,
            None => true,
        };
        if !due {
            return Ok(());
        }
        self.last = Some((Instant::now(), file.name.clone()));
        let mut line = json!({"status": format!("pulling {}", file.name), "completed": have});
        if let Some(total) = file.size {
            line["total"] = json!(total);
        }
        if let Some(digest) = &file.sha256 {
            line["digest"] = json!(format!("sha256:{digest}"));
        }
        self.line(line).map_err(|_| std::io::Error::other("the client of the pull went away"))
    }
}

/// `DELETE /api/delete`: removes a model `llmctl pull` downloaded, after stopping its
/// instances; anything else is refused, as `llmctl rm` refuses it.
fn delete(shared: &Arc<Shared>, config: &Config, request: &Request, exchange: &mut Exchange) -> Result<()> {
    let mut fields = Fields::of_body(&request.body)?;
    let name = model_of(&mut fields)?;
    fields.finish()?;
    let pulled = crate::library::find(&shared.paths, &name)
        .or_else(|| name.strip_suffix(":latest").and_then(|bare| crate::library::find(&shared.paths, bare)));
    let Some(pulled) = pulled else {
        if models::knows(shared, config, &name) {
            let spec = models::choose(shared, config, Some(&name), Purpose::Generate)?;
            let path = spec.remote.is_none().then_some(spec.path);
            return Err(Error::NotPulled { name, path });
        }
        return Err(Error::UnknownModel { name });
    };
    let path = pulled.path().canonicalize().unwrap_or_else(|_| pulled.path());
    let instances: Vec<_> =
        shared.table.all().into_iter().filter(|instance| instance.with_view(|view| view.spec.path == path)).collect();
    crate::daemon::handlers::control::unload_and_wait(shared, &instances, Unload::Stop, |model| {
        format!("{model} was deleted through /api/delete")
    });
    crate::library::remove(&shared.paths, &pulled)
        .map_err(|e| Error::io(format!("cannot remove {} from {}", pulled.name(), pulled.dir.display()), e))?;
    exchange.respond(200, "application/json; charset=utf-8", b"", &[]);
    Ok(())
}

/// What `/api/tags`, `/api/ps` and `/api/show` say of a model file.
struct Described {
    info: Option<crate::gguf::ModelInfo>,
    size: u64,
    modified: SystemTime,
    digest: String,
}

fn describe(spec: &ModelSpec) -> Described {
    if spec.remote.is_some() {
        return Described { info: None, size: 0, modified: UNIX_EPOCH, digest: digest_of(&spec.name) };
    }
    let metadata = std::fs::metadata(&spec.path).ok();
    let modified = metadata.as_ref().and_then(|m| m.modified().ok()).unwrap_or(UNIX_EPOCH);
    let size = metadata.as_ref().map(|m| m.len()).unwrap_or(0);
    // An identity of the file's version (path, size, time), not a hash of its bytes: a
    // digest of gigabytes for every listing would take seconds.
    let digest = digest_of(&format!("{}\0{size}\0{:?}", spec.path.display(), modified));
    Described { info: crate::gguf::inspect(&spec.path).ok(), size, modified, digest }
}

fn digest_of(text: &str) -> String {
    let mut hasher = crate::sha256::Sha256::new();
    hasher.update(text.as_bytes());
    hasher.hex()
}

/// Ollama's `details` of a model.
fn details(described: &Described) -> Value {
    match &described.info {
        Some(info) => json!({"parent_model": "", "format": "gguf", "family": info.architecture,
            "families": [info.architecture],
            "parameter_size": crate::catalog::human_count(info.details.parameter_count),
            "quantization_level": info.quantization()}),
        None => json!({"parent_model": "", "format": "", "family": "", "families": [], "parameter_size": "",
            "quantization_level": ""}),
    }
}

/// `GET /api/tags`: every model a client can name (not the `answers_to` patterns).
fn tags(shared: &Shared, config: &Config) -> Value {
    let models: Vec<Value> = models::known_models(shared, config)
        .iter()
        .map(|spec| {
            let described = describe(spec);
            json!({"name": spec.name, "model": spec.name, "modified_at": rfc3339(described.modified),
                "size": described.size, "digest": described.digest, "details": details(&described)})
        })
        .collect();
    json!({"models": models})
}

/// `GET /api/ps`: the instances loaded now, with their memory and when they unload.
fn ps(shared: &Shared, config: &Config) -> Value {
    let report = crate::daemon::report::report(shared);
    let default_ttl = shared.live.read().default_ttl;
    let models: Vec<Value> = report
        .instances
        .iter()
        .filter(|instance| instance.state.is_loaded() || instance.state == crate::protocol::InstanceState::Starting)
        .map(|instance| {
            let spec = models::known_models(shared, config).into_iter().find(|spec| spec.name == instance.name);
            let described = spec.as_ref().map(describe);
            let context = instance
                .ctx_size
                .map(u64::from)
                .or_else(|| described.as_ref().and_then(|d| d.info.as_ref()).and_then(|info| info.context_length));
            let expires = expires_at(instance, default_ttl);
            json!({"name": instance.name, "model": instance.name,
                "size": instance.rss_bytes.unwrap_or(instance.estimate_bytes),
                "size_vram": instance.vram_bytes.unwrap_or(0),
                "digest": described.as_ref().map(|d| d.digest.clone()).unwrap_or_default(),
                "details": described.as_ref().map(details).unwrap_or_else(|| json!({})),
                "expires_at": rfc3339(expires), "context_length": context.unwrap_or(0)})
        })
        .collect();
    json!({"models": models})
}

/// When an instance unloads if nothing uses it: its pin's end, else its last use plus its
/// TTL; a model kept for good says ten years ahead.
fn expires_at(instance: &crate::protocol::InstanceStatus, default_ttl: crate::config::Ttl) -> SystemTime {
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    let forever = SystemTime::now() + Duration::from_secs(crate::config::MAX_SECONDS);
    let pinned_until = instance.pinned_until_ms.map(at).filter(|until| *until > SystemTime::now());
    if instance.pinned && pinned_until.is_none() {
        return forever;
    }
    let ttl = instance.ttl_s.map(crate::config::Ttl::Seconds).unwrap_or(default_ttl);
    let by_ttl = match ttl {
        crate::config::Ttl::Seconds(seconds) => {
            instance.last_used_ms.map(at).unwrap_or_else(SystemTime::now) + Duration::from_secs(seconds)
        }
        crate::config::Ttl::Never => forever,
    };
    match pinned_until {
        Some(until) => until.max(by_ttl),
        None => by_ttl,
    }
}

/// `POST /api/show`: a model's details from its GGUF header, its chat template and what
/// it can do.
fn show(shared: &Shared, config: &Config, request: &Request) -> Result<Value> {
    let mut fields = Fields::of_body(&request.body)?;
    let name = model_of(&mut fields)?;
    if name.is_empty() {
        return Err(bad("model is required"));
    }
    // `verbose` asks for every header key and the tensors; llmctl shows the same either way.
    fields.take("verbose");
    fields.refuse_set("system", "llmctl keeps no system message with a model")?;
    fields.refuse_set("template", "llama-server applies the model's chat template")?;
    fields.refuse_set("options", "llmctl keeps no parameters with a model")?;
    fields.finish()?;
    let spec = choose(shared, config, &name, Purpose::Generate)?;
    let described = describe(&spec);
    let template = chat_template(&spec, described.info.as_ref());
    let mut model_info = Map::new();
    let mut parameters = String::new();
    let mut capabilities = Vec::new();
    if let Some(info) = &described.info {
        let arch = &info.architecture;
        let mut put = |key: String, value: Option<Value>| {
            if let Some(value) = value {
                model_info.insert(key, value);
            }
        };
        put("general.architecture".into(), Some(json!(arch)));
        put("general.name".into(), info.name.clone().map(Value::from));
        put("general.parameter_count".into(), Some(json!(info.details.parameter_count)));
        put("general.file_type".into(), info.details.file_type.map(Value::from));
        put("general.license".into(), info.details.license.clone().map(Value::from));
        put(format!("{arch}.context_length"), info.context_length.map(Value::from));
        put(format!("{arch}.embedding_length"), info.embedding_length.map(Value::from));
        put(format!("{arch}.block_count"), info.block_count.map(Value::from));
        put(format!("{arch}.attention.head_count"), info.head_count.map(Value::from));
        put(format!("{arch}.attention.head_count_kv"), info.head_count_kv.map(Value::from));
        if spec.load.embeddings || info.pooling_type.is_some() {
            capabilities.push("embedding");
        }
    }
    if !capabilities.contains(&"embedding") {
        capabilities.push("completion");
        // What the template renders is what the model can be asked for (Ollama reads its
        // capabilities from the template too).
        let template = template.as_deref().unwrap_or("");
        if template.contains("tools") {
            capabilities.push("tools");
        }
        if template.contains("<think>") || template.contains("enable_thinking") || template.contains("reasoning") {
            capabilities.push("thinking");
        }
    }
    if let Some(context) = effective_context(&spec) {
        parameters = format!("{:<30} {context}", "num_ctx");
    }
    let modelfile = match &spec.remote {
        Some(remote) => format!("# {} is served by {}\n", spec.name, remote.urls.join(", ")),
        None => format!("# llmctl runs {} from its GGUF file\nFROM {}\n", spec.name, spec.path.display()),
    };
    Ok(json!({
        "license": described.info.as_ref().and_then(|info| info.details.license.clone()).unwrap_or_default(),
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template.unwrap_or_default(),
        "details": details(&described),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": rfc3339(described.modified),
    }))
}

/// The chat template llama-server uses: the file of `--chat-template-file` in the model's
/// args, else the one in the GGUF header.
fn chat_template(spec: &ModelSpec, info: Option<&crate::gguf::ModelInfo>) -> Option<String> {
    let args = &spec.load.extra_args;
    let file = args.iter().position(|arg| arg == "--chat-template-file").and_then(|i| args.get(i + 1));
    if let Some(file) = file {
        let mut text = String::new();
        let read = std::fs::File::open(file)
            .and_then(|file| std::io::Read::read_to_string(&mut std::io::Read::take(file, 1 << 20), &mut text));
        if read.is_ok() {
            return Some(text);
        }
    }
    info.and_then(|info| info.details.chat_template.clone())
}

/// `time` as RFC 3339 in UTC with nanoseconds, as Ollama writes `created_at`.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_reads_numbers_and_go_durations() {
        let table = [
            (json!(0), KeepAlive::Unload),
            (json!("0"), KeepAlive::Unload),
            (json!("0s"), KeepAlive::Unload),
            (json!(-1), KeepAlive::Forever),
            (json!("-1"), KeepAlive::Forever),
            (json!("-1m"), KeepAlive::Forever),
            (json!(300), KeepAlive::For(Duration::from_secs(300))),
            (json!("5m"), KeepAlive::For(Duration::from_secs(300))),
            (json!("1h30m"), KeepAlive::For(Duration::from_secs(5400))),
            (json!("1.5s"), KeepAlive::For(Duration::from_millis(1500))),
            (json!("300ms"), KeepAlive::For(Duration::from_millis(300))),
        ];
        for (value, expected) in table {
            assert_eq!(keep_alive(&value).unwrap(), expected, "{value}");
        }
        for bad in [json!("soon"), json!("5 minutes"), json!("m"), json!(true), json!("")] {
            assert!(keep_alive(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chat_messages_become_openai_messages() {
        let message = json!({"role": "Assistant", "content": "", "thinking": "hm",
            "tool_calls": [{"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]});
        let translated = chat_message(3, message).unwrap();
        assert_eq!(translated["role"], "assistant");
        assert_eq!(translated["reasoning_content"], "hm");
        let call = &translated["tool_calls"][0];
        assert_eq!((call["id"].as_str(), call["type"].as_str()), (Some("call_3_0"), Some("function")));
        assert_eq!(call["function"]["arguments"], "{\"city\":\"Paris\"}");
        let tool = chat_message(4, json!({"role": "tool", "content": "22 C", "tool_name": "get_weather"})).unwrap();
        assert_eq!(tool["name"], "get_weather");
        let error = chat_message(0, json!({"role": "user", "content": "hi", "images": ["aGk="]})).unwrap_err();
        assert!(error.to_string().contains("`images`"), "{error}");
        let error = chat_message(1, json!({"role": "user", "content": "hi", "mood": "good"})).unwrap_err();
        assert!(error.to_string().contains("`mood` of messages[1]"), "{error}");
    }

    fn spec() -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            path: "/nowhere/m.gguf".into(),
            load: Default::default(),
            policy: Default::default(),
            remote: None,
        }
    }

    #[test]
    fn options_are_sampling_fields_or_load_options_or_refused() {
        let mut body = Map::new();
        let mut spec = spec();
        let options = json!({"temperature": 0.5, "top_k": 40.0, "num_keep": 4, "num_predict": 16, "stop": "\n",
            "seed": null, "num_ctx": 2048, "num_gpu": -1});
        apply_options(options, &mut body, &mut spec, Purpose::Generate).unwrap();
        assert_eq!(body["temperature"], json!(0.5));
        assert_eq!(body["top_k"], json!(40));
        assert_eq!(body["n_keep"], json!(4));
        assert_eq!(body["n_predict"], json!(16));
        assert_eq!(body["stop"], json!(["\n"]));
        assert!(!body.contains_key("seed"), "null is absent");
        assert_eq!(spec.load.ctx_size, Some(2048));
        assert_eq!(spec.load.gpu_layers, None, "-1 leaves the layers to the config");
        for (options, phrase) in [
            (json!({"num_thread": 8}), "`num_thread` is not supported"),
            (json!({"top_k": 1.5}), "whole number"),
            (json!({"temperature": "hot"}), "must be a number"),
            (json!({"num_ctx": 4}), "16..="),
            (json!({"num_predict": -3}), "num_predict"),
        ] {
            let error = apply_options(options.clone(), &mut Map::new(), &mut self::spec(), Purpose::Generate);
            assert!(error.unwrap_err().to_string().contains(phrase), "{options}");
        }
        let error = apply_options(json!({"temperature": 1}), &mut Map::new(), &mut self::spec(), Purpose::Embed);
        assert!(error.unwrap_err().to_string().contains("does not apply to embeddings"));
    }

    #[test]
    fn a_stream_of_events_becomes_ollama_lines_with_counts() {
        let mut reply = Reply::new(Endpoint::Chat, "tiny", true, "/v1/chat/completions");
        reply.status = 200;
        let events = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n\
                      data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"why\"}}]}\n\n\
                      data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\":\"}}]}}]}\n\n\
                      data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]}}]}\n\n\
                      data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3},\"timings\":{\"prompt_ms\":1.5,\"predicted_ms\":20.0}}\n\n\
                      data: [DONE]\n\n";
        // Split anywhere, the same lines come out.
        let (first, second) = events.split_at(37);
        let mut out = reply.feed(first.as_bytes());
        out.extend(reply.feed(second.as_bytes()));
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"]["content"], "Hel");
        assert_eq!(lines[1]["message"]["thinking"], "why");
        assert_eq!(lines[0]["done"], false);
        let calls: Value = serde_json::from_slice(&reply.tool_call_line()).unwrap();
        assert_eq!(calls["message"]["tool_calls"][0]["function"]["arguments"], json!({"city": "Paris"}));
        let timing = Timing { received: Instant::now(), loaded: Instant::now() };
        let last: Value = serde_json::from_slice(&reply.final_line(&timing)).unwrap();
        assert_eq!((last["done"].clone(), last["done_reason"].clone()), (json!(true), json!("stop")));
        assert_eq!((last["prompt_eval_count"].clone(), last["eval_count"].clone()), (json!(7), json!(3)));
        assert_eq!(last["prompt_eval_duration"], json!(1_500_000));
        assert_eq!(last["eval_duration"], json!(20_000_000));
    }

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let leap_day = UNIX_EPOCH + Duration::new(951_782_400 + 3661, 5);
        assert_eq!(rfc3339(leap_day), "2000-02-29T01:01:01.000000005Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_767_225_599);
        assert_eq!(rfc3339(later), "2025-12-31T23:59:59.000000000Z");
    }
}
