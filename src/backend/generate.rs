//! A generation streamed token by token from llama-server's SSE answer, for `run` and
//! `chat`: chat chunks (`/v1/chat/completions`) or raw ones (`/completion`), read with the
//! one line reader in [`super::sse`].

use std::io::{self, BufRead, BufReader};
use std::ops::ControlFlow;

use serde::Deserialize;
use serde_json::Value;

use super::client::{classify_io, classify_transport, error_message, finish_body, Client};
use super::sse::{self, Field, Line, Lines};
use super::GenerateError;
use crate::protocol::{Done, Mode, RunRequest, Usage};

impl Client {
    /// Generates for `request`, calling `on_token` for each piece of text with whether more
    /// is already buffered (so the caller may batch its flush). When `on_token` fails the
    /// request is dropped, which closes the connection; llama-server then stops the
    /// generation and frees the slot.
    pub(crate) fn generate(
        &self,
        request: &RunRequest,
        mut on_token: impl FnMut(&str, bool) -> io::Result<()>,
    ) -> Result<Done, GenerateError> {
        let (path, body) = super::bodies::for_request(request);
        let mut response = self.send(path, &body).map_err(classify_transport)?;
        let status = response.status().as_u16();
        if status != 200 {
            let text = response.body_mut().with_config().limit(1 << 20).read_to_string().unwrap_or_default();
            let message = error_message(&text).unwrap_or_else(|| format!("HTTP {status}"));
            return Err(if (400..500).contains(&status) {
                GenerateError::Rejected(message)
            } else {
                GenerateError::Broken(format!("HTTP {status}: {message}"))
            });
        }
        // ureq's reader cannot read into uninitialised memory, so the buffer is zeroed once
        // per request: no larger than the connection's own input buffer (see `client`).
        let mut reader = BufReader::with_capacity(16 << 10, response.body_mut().as_reader());
        let mut lines = Lines::default();
        let mut done = Done::default();
        loop {
            let chunk = match reader.fill_buf() {
                Ok([]) => {
                    return if done.finish_reason.is_empty() {
                        Err(GenerateError::Broken("the stream ended before the last chunk".into()))
                    } else {
                        Ok(done)
                    }
                }
                Ok(chunk) => chunk,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(classify_io(error)),
            };
            let used = chunk.len();
            let flow = lines.feed(chunk, |line, rest| {
                let Line::Complete(line) = line else {
                    let message = format!("llama-server sent an event over {} MiB", sse::MAX_LINE >> 20);
                    return ControlFlow::Break(Err(GenerateError::Broken(message)));
                };
                let Some((field, payload)) = sse::field(line) else { return ControlFlow::Continue(()) };
                if payload == b"[DONE]" {
                    return ControlFlow::Break(Ok(()));
                }
                if field == Field::Error {
                    let text = String::from_utf8_lossy(payload);
                    let message = error_message(&text).unwrap_or(text.into_owned());
                    return ControlFlow::Break(Err(GenerateError::Broken(message)));
                }
                // Another event already read means more tokens are on their way: the
                // caller may batch its flush instead of paying a syscall per token. The
                // blank line that ends each SSE event does not count.
                let more_buffered = rest.iter().any(|b| !b.is_ascii_whitespace());
                let text = match request.mode {
                    Mode::Chat => parse_chat_chunk(payload, &mut done),
                    Mode::Raw => parse_raw_chunk(payload, &mut done),
                };
                let text = match text {
                    Ok(text) => text,
                    Err(e) => {
                        let message = format!("unreadable chunk from llama-server: {e}");
                        return ControlFlow::Break(Err(GenerateError::Broken(message)));
                    }
                };
                if let Some(text) = text.filter(|t| !t.is_empty()) {
                    if on_token(&text, more_buffered).is_err() {
                        return ControlFlow::Break(Err(GenerateError::Cancelled));
                    }
                }
                if request.mode == Mode::Raw && !done.finish_reason.is_empty() {
                    return ControlFlow::Break(Ok(()));
                }
                ControlFlow::Continue(())
            });
            reader.consume(used);
            match flow {
                ControlFlow::Continue(()) => {}
                ControlFlow::Break(Ok(())) => {
                    finish_body(&mut reader);
                    return Ok(done);
                }
                ControlFlow::Break(Err(error)) => return Err(error),
            }
        }
    }
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
}
