//! Forwarding: an HTTP request passed to llama-server (or a remote server) as it came, and
//! its answer handed back as it is produced, one read and one write per chunk.
//!
//! llmctl reads only what it must from the answer, without changing it: the token counts
//! and the finish reason, for usage accounting. Whatever the endpoint (OpenAI, Anthropic,
//! llama-server's own), they sit in a few well-known fields of the JSON or of each SSE event.

use std::io::{self, BufRead, BufReader};
use std::ops::ControlFlow;

use serde_json::Value;

use super::client::{classify_io, classify_transport, finish_body, Client};
use super::sse::{Line, Lines};
use super::unix::{with_cancel, Cancel};
use super::GenerateError;
use crate::protocol::{Done, Usage};

/// A request to pass on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    pub(crate) method: &'a str,
    /// The path and query, as the client sent them.
    pub(crate) target: &'a str,
    pub(crate) content_type: Option<&'a str>,
    pub(crate) body: &'a [u8],
}

/// A part of the answer, as it arrives.
pub(crate) enum Part<'a> {
    /// The status, the end-to-end headers (hop-by-hop ones and the framing left out: the
    /// server that relays the answer frames it itself) and the length, when known.
    Head {
        status: u16,
        headers: &'a [(String, String)],
        content_length: Option<u64>,
    },
    Bytes(&'a [u8]),
}

/// The longest JSON line or body searched for usage; a longer one (a large batch of
/// embeddings) is passed on without being read.
const MAX_SCANNED: usize = 4 << 20;

/// Headers that describe one connection, not the answer (RFC 9110 §7.6.1), and the framing.
const NOT_PASSED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "content-length",
];

impl Client {
    /// Sends `request` and hands each part of the answer to `on_part`. When `on_part`
    /// fails, or `cancel` says so while the answer is awaited, the connection is dropped,
    /// which makes llama-server stop the work and free the slot.
    pub(crate) fn forward(
        &self,
        request: Outgoing<'_>,
        cancel: Option<Cancel>,
        on_part: impl FnMut(Part<'_>) -> io::Result<()>,
    ) -> Result<Done, GenerateError> {
        with_cancel(cancel, || self.forward_now(request, on_part))
    }

    fn forward_now(
        &self,
        request: Outgoing<'_>,
        mut on_part: impl FnMut(Part<'_>) -> io::Result<()>,
    ) -> Result<Done, GenerateError> {
        let mut response = self.retrying(|agent| self.send_raw(agent, request)).map_err(classify_transport)?;
        let status = response.status().as_u16();
        let mut content_length = None;
        let mut headers = Vec::with_capacity(8);
        for (name, value) in response.headers() {
            let Ok(value) = value.to_str() else { continue };
            if name == "content-length" {
                content_length = value.parse().ok();
            }
            if !NOT_PASSED.contains(&name.as_str()) {
                headers.push((name.as_str().to_string(), value.to_string()));
            }
        }
        if on_part(Part::Head { status, headers: &headers, content_length }).is_err() {
            return Err(GenerateError::Cancelled);
        }
        let mut scanner = Scanner::default();
        // ureq's reader cannot read into uninitialised memory, so the buffer is zeroed once
        // per request: no larger than the connection's own input buffer (see `client`).
        let mut reader = BufReader::with_capacity(32 << 10, response.body_mut().as_reader());
        loop {
            let chunk = match reader.fill_buf() {
                Ok([]) => break,
                Ok(chunk) => chunk,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(classify_io(error)),
            };
            scanner.feed(chunk);
            if on_part(Part::Bytes(chunk)).is_err() {
                return Err(GenerateError::Cancelled);
            }
            let used = chunk.len();
            reader.consume(used);
        }
        finish_body(&mut reader);
        let mut done = scanner.finish();
        if done.finish_reason.is_empty() {
            done.finish_reason = if status < 400 { "stop".into() } else { format!("http {status}") };
        }
        Ok(done)
    }

    fn send_raw(
        &self,
        agent: &ureq::Agent,
        request: Outgoing<'_>,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut builder =
            ureq::http::Request::builder().method(request.method).uri(format!("{}{}", self.base, request.target));
        if let Some(content_type) = request.content_type {
            builder = builder.header("Content-Type", content_type);
        }
        if let Some(value) = &self.authorization {
            builder = builder.header("Authorization", value);
        }
        let outgoing = builder.body(request.body).map_err(|error| ureq::Error::BadUri(error.to_string()))?;
        agent.run(outgoing)
    }
}

/// Reads the usage and finish reason out of an answer: a JSON body, or SSE events.
struct Scanner {
    lines: Lines,
    done: Done,
}

impl Default for Scanner {
    fn default() -> Scanner {
        Scanner { lines: Lines::with_max(MAX_SCANNED), done: Done::default() }
    }
}

impl Scanner {
    fn feed(&mut self, bytes: &[u8]) {
        let done = &mut self.done;
        let _: ControlFlow<()> = self.lines.feed(bytes, |line, _| {
            if let Line::Complete(line) = line {
                scan_line(line, done);
            }
            ControlFlow::Continue(())
        });
    }

    fn finish(mut self) -> Done {
        if let Some(Line::Complete(line)) = self.lines.finish() {
            scan_line(line, &mut self.done);
        }
        self.done
    }
}

fn scan_line(line: &[u8], done: &mut Done) {
    let payload = line.strip_prefix(b"data:").unwrap_or(line).trim_ascii();
    // Only events that can carry counts or an ending are parsed; tokens are not.
    let interesting = ["usage", "timings", "tokens_predicted", "finish_reason", "stop_reason"]
        .iter()
        .any(|key| contains(payload, key.as_bytes()));
    if interesting && payload.first() == Some(&b'{') {
        if let Ok(value) = serde_json::from_slice::<Value>(payload) {
            read_counts(&value, done);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// Token counts and the finish reason, wherever the endpoint puts them: OpenAI's `usage`
/// (`prompt_tokens`, `completion_tokens`), Anthropic's and the Responses API's
/// (`input_tokens`, `output_tokens`, also inside `message` or `response`), llama-server's
/// `timings` and `/completion` fields.
fn read_counts(value: &Value, done: &mut Done) {
    let count = |value: &Value, key: &str| value.get(key).and_then(Value::as_u64);
    let mut found = Usage::default();
    for holder in
        [value.get("usage"), value.pointer("/message/usage"), value.pointer("/response/usage")].into_iter().flatten()
    {
        if let Some(n) = count(holder, "prompt_tokens").or(count(holder, "input_tokens")) {
            found.prompt_tokens = n;
        }
        if let Some(n) = count(holder, "completion_tokens").or(count(holder, "output_tokens")) {
            found.completion_tokens = n;
        }
    }
    if let Some(n) = count(value, "tokens_evaluated") {
        found.prompt_tokens = n;
    }
    if let Some(n) = count(value, "tokens_predicted") {
        found.completion_tokens = n;
    }
    if let Some(timings) = value.get("timings") {
        done.timings = Some(timings.clone());
        if found.prompt_tokens == 0 {
            found.prompt_tokens = count(timings, "prompt_n").unwrap_or(0);
        }
        if found.completion_tokens == 0 {
            found.completion_tokens = count(timings, "predicted_n").unwrap_or(0);
        }
    }
    // Counts only grow over a stream (Anthropic sends input and output in two events).
    done.usage.prompt_tokens = done.usage.prompt_tokens.max(found.prompt_tokens);
    done.usage.completion_tokens = done.usage.completion_tokens.max(found.completion_tokens);
    let reason = value
        .pointer("/choices/0/finish_reason")
        .or_else(|| value.get("stop_reason"))
        .or_else(|| value.pointer("/delta/stop_reason"))
        .or_else(|| value.get("stop_type"))
        .and_then(Value::as_str);
    if let Some(reason) = reason {
        done.finish_reason = reason.to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(parts: &[&str]) -> Done {
        let mut scanner = Scanner::default();
        for part in parts {
            scanner.feed(part.as_bytes());
        }
        scanner.finish()
    }

    #[test]
    fn counts_from_openai_streams_split_anywhere() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}]}\n\n\
                      data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n\
                      data: [DONE]\n\n";
        for split in 0..stream.len() {
            let done = scan(&[&stream[..split], &stream[split..]]);
            assert_eq!(done.usage, Usage { prompt_tokens: 7, completion_tokens: 3 }, "split at {split}");
            assert_eq!(done.finish_reason, "length");
        }
    }

    #[test]
    fn counts_from_other_endpoints() {
        let anthropic = scan(&[
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":0}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}\n\n",
        ]);
        assert_eq!(anthropic.usage, Usage { prompt_tokens: 12, completion_tokens: 5 });
        assert_eq!(anthropic.finish_reason, "end_turn");
        let native =
            scan(&["{\"content\":\"x\",\"tokens_evaluated\":4,\"tokens_predicted\":2,\"stop_type\":\"limit\"}"]);
        assert_eq!(native.usage, Usage { prompt_tokens: 4, completion_tokens: 2 });
        let embeddings = scan(&["{\"data\":[],\"usage\":{\"prompt_tokens\":9,\"total_tokens\":9}}"]);
        assert_eq!(embeddings.usage.prompt_tokens, 9);
        let timings = scan(&["data: {\"timings\":{\"prompt_n\":3,\"predicted_n\":8}}\n"]);
        assert_eq!(timings.usage, Usage { prompt_tokens: 3, completion_tokens: 8 });
    }

    #[test]
    fn huge_lines_are_skipped_not_held() {
        let mut scanner = Scanner::default();
        let big = vec![b'1'; MAX_SCANNED / 2 + 1];
        scanner.feed(&big);
        scanner.feed(&big);
        assert!(scanner.done.usage.prompt_tokens == 0);
        scanner.feed(b"\n{\"usage\":{\"prompt_tokens\":2}}\n");
        assert_eq!(scanner.finish().usage.prompt_tokens, 2);
    }
}
