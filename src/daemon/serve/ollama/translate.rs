//! Ollama's chat and generate requests translated into llama-server's OpenAI requests:
//! messages, images, `think`, `options` (sampling fields and load options) and `format`.

use super::*;

/// Which of Ollama's generation routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// `/api/chat`: messages in, `message` out.
    Chat,
    /// `/api/generate`: a prompt in, `response` out.
    Generate,
}

/// A generation request, translated.
pub(super) struct Translated {
    pub(super) spec: ModelSpec,
    /// The name the client used, echoed as `model` in every answer.
    pub(super) name: String,
    /// llama-server's route and body.
    pub(super) upstream: &'static str,
    pub(super) body: Map<String, Value>,
    pub(super) stream: bool,
    pub(super) keep: Option<KeepAlive>,
    /// No prompt and no messages: Ollama's way to load (or with `keep_alive` 0, unload).
    pub(super) empty: bool,
}

pub(super) fn translate(shared: &Shared, config: &Config, request: &Request, endpoint: Endpoint) -> Result<Translated> {
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
pub(super) fn chat_message(index: usize, message: Value) -> Result<Value> {
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
pub(super) fn think_fields(think: &Value, upstream: &str, body: &mut Map<String, Value>) -> Result<()> {
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
pub(super) const SAMPLING_OPTIONS: &[(&str, &str, bool)] = &[
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
pub(super) fn apply_options(
    options: Value,
    body: &mut Map<String, Value>,
    spec: &mut ModelSpec,
    purpose: Purpose,
) -> Result<()> {
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
/// context (llama-server's default), read from its header.
pub(super) fn effective_context(spec: &ModelSpec) -> Option<u64> {
    context_with(spec, || crate::gguf::inspect(&spec.path).ok().and_then(|info| info.context_length))
}

/// [`effective_context`] with the training context from `trained`, asked only when no
/// context is configured: for a caller that has the header already.
pub(super) fn context_with(spec: &ModelSpec, trained: impl FnOnce() -> Option<u64>) -> Option<u64> {
    spec.load.ctx_size.map(u64::from).or_else(|| if spec.remote.is_some() { None } else { trained() })
}
