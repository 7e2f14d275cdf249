//! llama-server's streamed answer rewritten as Ollama's: NDJSON lines (or one object), with
//! the message, tool calls, thinking, logprobs and Ollama's counts and durations.

use super::*;

/// How often a whole answer being gathered looks whether its client is still there.
const CLIENT_LOOK: std::time::Duration = std::time::Duration::from_millis(100);

/// `POST /api/chat` and `POST /api/generate`.
pub(super) fn generate(
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
        let mut looked = Instant::now();
        let result = lease.client.forward(outgoing, Some(Arc::clone(&cancel)), |part| {
            if !lease.generation.relay_token() {
                return Err(std::io::Error::other("the instance was stopped"));
            }
            // A whole answer is gathered from the child's stream without a write to the
            // client, whose leaving the reads notice only while they wait: look now and then.
            if !reply.stream && looked.elapsed() >= CLIENT_LOOK {
                looked = Instant::now();
                if cancel() {
                    return Err(std::io::Error::other("the client went away"));
                }
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

pub(super) fn error_line(message: &str) -> Vec<u8> {
    let mut line = json!({"error": message}).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// When a request arrived and when it had its slot: Ollama's `total_duration` and
/// `load_duration` are measured from these.
pub(super) struct Timing {
    pub(super) received: Instant,
    pub(super) loaded: Instant,
}

/// A tool call as its pieces stream in.
#[derive(Default)]
pub(super) struct ToolCall {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) arguments: String,
}

/// Ollama's answer to one generation, built from llama-server's events as they come:
/// NDJSON lines when streamed, else gathered into one object.
pub(super) struct Reply {
    pub(super) endpoint: Endpoint,
    pub(super) name: String,
    pub(super) stream: bool,
    /// The upstream route, which says where the text is in each event.
    pub(super) upstream: &'static str,
    pub(super) status: u16,
    pub(super) lines: Lines,
    /// Whether any text or thinking came (for the time to first token).
    pub(super) has_output: bool,
    pub(super) content: String,
    pub(super) thinking: String,
    pub(super) tool_calls: Vec<ToolCall>,
    pub(super) logprobs: Vec<Value>,
    pub(super) finish_reason: Option<String>,
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u64,
    pub(super) prompt_ms: f64,
    pub(super) predicted_ms: f64,
    /// An error event in the stream.
    pub(super) error: Option<String>,
    /// The body of an answer that is an error (status 400 and above).
    pub(super) error_body: Vec<u8>,
}

impl Reply {
    pub(super) fn new(endpoint: Endpoint, name: &str, stream: bool, upstream: &'static str) -> Reply {
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
    pub(super) fn restart(&mut self) {
        *self = Reply::new(self.endpoint, &self.name, self.stream, self.upstream);
    }

    /// Reads `bytes` of the answer; returns the NDJSON lines to send now (none when not
    /// streamed).
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
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
    pub(super) fn event(&mut self, line: &[u8], out: &mut Vec<u8>) {
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
    pub(super) fn piece(&self, text: &str, thinking: &str) -> Value {
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
    pub(super) fn ollama_tool_calls(&self) -> Vec<Value> {
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
    pub(super) fn tool_call_line(&self) -> Vec<u8> {
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
    pub(super) fn finish_fields(&self, answer: &mut Value, timing: &Timing) {
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
    pub(super) fn final_line(&self, timing: &Timing) -> Vec<u8> {
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
    pub(super) fn whole(&self, timing: &Timing) -> Vec<u8> {
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

pub(super) fn push_line(out: &mut Vec<u8>, value: &Value) {
    let _ = serde_json::to_writer(&mut *out, value);
    out.push(b'\n');
}
