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
//!
//! Here: the routes, the fields of a request and `keep_alive`. [`translate`] turns a request
//! into llama-server's, [`reply`] turns its answer into Ollama's, [`embed`] serves the
//! embedding routes and [`library`] the routes about models.

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
use crate::error::{Error, Result};
use crate::http::{Exchange, Request};
use crate::instance::{Message, Pin, Unload};
use crate::model::ModelSpec;

mod embed;
mod library;
mod reply;
mod translate;

use embed::*;
use library::*;
use reply::*;
use translate::*;

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
    let (status, retry_after) = super::routes::error_status(error);
    refuse(exchange, status, &error.to_string(), &super::routes::retry_header(retry_after.as_deref()));
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
            instance.pin(Pin::Set(true));
        }
        KeepAlive::For(duration) => {
            instance.pin(Pin::Until(SystemTime::now() + duration));
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
