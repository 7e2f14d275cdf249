//! The request bodies `llmctl run` and `chat` send to llama-server, built from their
//! options: chat (`/v1/chat/completions`, the model's template) or raw (`/completion`).
//! A large prompt is serialized straight from the request, copied once into the body.

use serde::Serialize;
use serde_json::{json, Value};

use crate::protocol::{Mode, RunRequest};

/// The endpoint and body for `request`.
pub(crate) fn for_request(request: &RunRequest) -> (&'static str, String) {
    match request.mode {
        Mode::Chat => ("/v1/chat/completions", chat_body(request)),
        Mode::Raw => ("/completion", raw_body(request)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;
    use crate::protocol::Sampling;

    fn request(mode: Mode) -> RunRequest {
        RunRequest {
            model: ModelSpec {
                name: "m".into(),
                path: "/m.gguf".into(),
                load: Default::default(),
                policy: Default::default(),
                remote: None,
            },
            mode,
            prompt: "Hi \"there\"".into(),
            system: Some("be brief".into()),
            sampling: Sampling {
                max_tokens: Some(8),
                temperature: Some(0.5),
                stop: vec!["\n".into()],
                ..Sampling::default()
            },
            messages: None,
        }
    }

    #[test]
    fn chat_and_raw_bodies_carry_the_options() {
        let (path, body) = for_request(&request(Mode::Chat));
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(body["messages"][0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(body["messages"][1]["content"], "Hi \"there\"");
        assert_eq!((body["max_tokens"].clone(), body["stream"].clone()), (json!(8), json!(true)));
        assert_eq!(body["stop"], json!(["\n"]));
        let (path, body) = for_request(&request(Mode::Raw));
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(path, "/completion");
        assert_eq!((body["prompt"].clone(), body["n_predict"].clone()), (json!("Hi \"there\""), json!(8)));
        assert_eq!(body["temperature"], json!(0.5));
    }
}
