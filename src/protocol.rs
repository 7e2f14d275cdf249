//! The wire format between the client and the daemon: newline-delimited JSON.
//!
//! Every connection opens with a `Hello` from each side carrying [`VERSION`]; a daemon
//! refuses a client of another version with a typed error, so the handshake stays the first
//! message forever. Then the client sends one request and reads responses until a final one
//! (`Done`, `Status`, `Ok` or `Error`). Lines are capped at [`MAX_LINE`] bytes.
//!
//! `llmctl serve` does not carry HTTP over this socket: it asks the daemon to listen
//! ([`ListenRequest`]), and the daemon serves HTTP itself. **Only this module knows the wire
//! format.**

use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};
use crate::model::ModelSpec;

/// Bumped whenever a message changes shape.
pub const VERSION: u32 = 4;
/// The longest line either side accepts; prompts piped from stdin fit comfortably.
pub const MAX_LINE: usize = 16 << 20;
/// The largest HTTP request body `serve` takes.
pub const MAX_BODY: usize = 16 << 20;

// One request is decoded per connection and moved once: its size costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Hello {
        version: u32,
    },
    Run(RunRequest),
    /// `llmctl embed`: the vectors of `inputs` from the model's embeddings instance; the
    /// answer is one `Embedding` per input, in their order, then `Done`.
    Embed {
        model: ModelSpec,
        inputs: Vec<String>,
    },
    Status,
    /// Load the model and return once it answers a one-token request; with `ttl_s`, keep
    /// it loaded at least that long.
    Warm {
        model: ModelSpec,
        ttl_s: Option<u64>,
    },
    /// Pin or unpin a model: a pinned instance is never evicted nor unloaded by its TTL.
    Pin {
        model: ModelSpec,
        pinned: bool,
    },
    /// Stream state changes as they happen, until the client goes away.
    Events,
    /// The daemon's counters in Prometheus text format.
    Metrics,
    /// Read the config again; the reply says what changed and what needs a new daemon.
    Reload,
    /// Load the model in the background; `wait` returns once it is ready.
    Switch {
        model: ModelSpec,
        wait: bool,
        exclusive: bool,
    },
    /// Unload one model, or every model when `model` is none; with `forget`, also drop its
    /// saved prompt caches (every one when `model` is none) instead of saving them.
    Stop {
        model: Option<ModelSpec>,
        #[serde(default)]
        forget: bool,
    },
    Shutdown,
    /// Serve llama-server's HTTP API on an address while this connection stays open.
    Listen(ListenRequest),
}

/// `llmctl serve`: where to listen, and the key clients must send (required beyond
/// loopback). The answer is `Listening`, then `Log` lines until the client goes away.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenRequest {
    pub address: String,
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The model's chat template, through `/v1/chat/completions`.
    Chat,
    /// The prompt as is, through `/completion`.
    Raw,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub model: ModelSpec,
    pub mode: Mode,
    pub prompt: String,
    pub system: Option<String>,
    pub sampling: Sampling,
    /// A whole conversation (chat mode, from `serve`); when present it replaces `system`
    /// and `prompt`. Each message is passed to llama-server as it came.
    #[serde(default)]
    pub messages: Option<Vec<serde_json::Value>>,
}

/// Sampling options; they never change which instance serves the request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Constrains the output to JSON of this schema (llama-server's `json_schema`).
    #[serde(default)]
    pub json_schema: Option<serde_json::Value>,
    /// Constrains the output to this GBNF grammar (llama-server's `grammar`).
    #[serde(default)]
    pub grammar: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        pid: u32,
    },
    /// The model is being loaded; sent once before the first token of a cold start, and
    /// again while its load waits for room, with its place in line and estimated wait.
    Loading {
        model: String,
        #[serde(default)]
        position: Option<usize>,
        #[serde(default)]
        eta_ms: Option<u64>,
    },
    /// The request waits for a slot at this position.
    Queued {
        position: usize,
    },
    Token {
        text: String,
    },
    /// The vector of input `index` of an `Embed` request.
    Embedding {
        index: usize,
        embedding: Vec<f64>,
    },
    /// The daemon serves HTTP on this address (the port it bound, when 0 was asked).
    Listening {
        address: String,
    },
    /// One line of a listener's access log.
    Log {
        line: String,
    },
    Event(Event),
    Metrics {
        text: String,
    },
    Done(Done),
    Status(StatusReport),
    Ok {
        message: Option<String>,
    },
    Error {
        kind: ErrorKind,
        message: String,
        retry_after_ms: Option<u64>,
        /// Refused by the model's own queue limit (HTTP 429), not the daemon's queue (503).
        #[serde(default)]
        per_model: bool,
    },
}

impl Response {
    pub fn error(error: &Error) -> Response {
        let (retry_after_ms, per_model) = match error {
            Error::Busy { retry_after_ms, per_model, .. } => (Some(*retry_after_ms), *per_model),
            _ => (None, false),
        };
        Response::Error { kind: error.kind(), message: error.to_string(), retry_after_ms, per_model }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub finish_reason: String,
    pub usage: Usage,
    pub timings: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon: DaemonStatus,
    pub queue: QueueStatus,
    pub instances: Vec<InstanceStatus>,
    /// The prompt caches saved on unload, to be restored when the same model loads again
    /// (boxed: every streamed token is a `Response`, which is as large as its largest kind).
    #[serde(default)]
    pub caches: Box<CacheStatus>,
}

/// The saved prompt caches: where, how much of the budget they use, each one kept, and
/// what happened to them since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    pub dir: String,
    /// False when `cache_budget` is 0 or the directory cannot be used.
    pub enabled: bool,
    pub budget_bytes: u64,
    pub used_bytes: u64,
    pub entries: Vec<CacheEntryStatus>,
    pub counters: CacheCounters,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheEntryStatus {
    /// The model's name when it was saved, and its file.
    pub model: String,
    pub path: String,
    pub ctx_size: Option<u32>,
    pub slot: u32,
    pub tokens: u64,
    pub bytes: u64,
    /// Milliseconds since the Unix epoch: when it was saved, and last saved or restored.
    pub saved_ms: u64,
    pub used_ms: u64,
}

/// Counts since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheCounters {
    pub saves: u64,
    pub saved_tokens: u64,
    /// Saves that did not complete: no answer in time, an error, a file that did not check.
    pub save_failures: u64,
    pub restores: u64,
    pub restored_tokens: u64,
    /// Restores llama-server refused or that gave back no token.
    pub restore_failures: u64,
    /// Files that were truncated, altered or not what their manifest says.
    pub ignored: u64,
    /// Caches of a model file or llama-server build that changed since, dropped.
    pub discarded: u64,
    /// Caches dropped to stay within `cache_budget`.
    pub dropped: u64,
    /// Caches dropped by `llmctl stop --forget`.
    pub forgotten: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub uptime_ms: u64,
    pub socket: String,
    pub rss_bytes: Option<u64>,
    /// Why the state file could not be written, if it could not.
    pub state_file_error: Option<String>,
    /// The memory budget in bytes, GPU memory budget where a GPU exists, instance limit.
    pub budget_bytes: u64,
    pub vram_budget_bytes: Option<u64>,
    pub max_instances: Option<usize>,
    /// Instances evicted for memory or unloaded by a TTL since the daemon started.
    pub evictions: u64,
    /// Clients following `llmctl events`.
    pub event_subscribers: usize,
    /// The llama-server the daemon would spawn: path, build and backend.
    #[serde(default)]
    pub llama_server: String,
    /// The daemon-wide settings in force, as `llmctl config` writes them.
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, String>,
    /// The HTTP addresses the daemon serves `serve`'s API on.
    #[serde(default)]
    pub listening: Vec<String>,
    /// Instances evicted to make room for another model, and that per finished request.
    #[serde(default)]
    pub swaps: u64,
    #[serde(default)]
    pub swaps_per_request: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    pub depth: usize,
    pub waiting: usize,
    pub rejected: u64,
}

/// The state of an instance as every reader sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// No child and no memory.
    #[default]
    Stopped,
    /// No child; the last load or the child failed.
    Failed,
    /// Waiting for memory to load.
    Waiting,
    /// The child is starting.
    Starting,
    /// Loaded, with nothing in flight.
    Ready,
    /// Loaded, with requests in flight.
    Busy,
    /// The child is being stopped.
    Stopping,
}

impl InstanceState {
    /// Loaded and answering: ready or busy.
    pub fn is_loaded(self) -> bool {
        matches!(self, InstanceState::Ready | InstanceState::Busy)
    }

    /// A child is there (starting, loaded or stopping), holding memory.
    pub fn is_up(self) -> bool {
        matches!(self, InstanceState::Starting | InstanceState::Ready | InstanceState::Busy | InstanceState::Stopping)
    }

    /// The word on the wire and in tables.
    pub fn name(self) -> &'static str {
        match self {
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
            InstanceState::Waiting => "waiting",
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::Busy => "busy",
            InstanceState::Stopping => "stopping",
        }
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub name: String,
    pub path: String,
    pub state: InstanceState,
    pub failure: Option<String>,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    /// The Unix socket the child listens on (none when it listens on a loopback port).
    #[serde(default)]
    pub socket: Option<String>,
    /// The servers of a remote model, which llmctl fronts but does not run.
    pub remote: Option<Vec<String>>,
    pub ctx_size: Option<u32>,
    pub slots: u32,
    pub in_flight: u32,
    pub estimate_bytes: u64,
    pub rss_bytes: Option<u64>,
    /// Milliseconds since the Unix epoch of the last request, if any.
    pub last_used_ms: Option<u64>,
    pub requests: u64,
    pub usage: Usage,
    pub restarts: u32,
    /// Failed too often in a short time; not restarted until `llmctl stop`.
    pub crash_loop: bool,
    /// Requests waiting for a slot, or for the load to finish, now.
    pub queued: usize,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    /// Time requests waited for a slot, over the last 1,024.
    pub wait_p50_ms: Option<f64>,
    pub wait_p99_ms: Option<f64>,
    /// Never evicted now: pinned in the config, by `llmctl pin`, or by `warm --ttl`.
    pub pinned: bool,
    pub pinned_until_ms: Option<u64>,
    /// The model's own TTL in seconds, if it has one.
    pub ttl_s: Option<u64>,
    /// Times it was evicted for memory or unloaded by its TTL.
    pub evictions: u32,
    /// GPU memory measured by nvidia-smi.
    pub vram_bytes: Option<u64>,
    /// How long the last load took.
    pub load_ms: Option<u64>,
    /// Time to first token, over the last 1,024 requests.
    pub first_token_p50_ms: Option<f64>,
    pub first_token_p99_ms: Option<f64>,
    /// Requests by outcome: "ok", "cancelled" or an error kind.
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// While its load waits for room: its place in the scheduler's line (1 = next) and the
    /// estimated wait.
    #[serde(default)]
    pub waiting_position: Option<usize>,
    #[serde(default)]
    pub eta_ms: Option<u64>,
    /// What tells this instance apart from another of the same model (its file and load
    /// options), for metrics labels.
    #[serde(default)]
    pub instance: String,
    /// The instance of the model that answers embeddings (started with `--embeddings`).
    #[serde(default)]
    pub embeddings: bool,
}

/// A state change of an instance, as `llmctl events` prints it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// loading, ready, failed, refused, crashed, stopped, evicted, expired, reloading, saved
    /// or restored.
    pub event: String,
    pub model: String,
    pub path: String,
    pub pid: Option<u32>,
    pub detail: Option<String>,
    /// For `saved` and `restored`: the slot, its tokens, the file's size and how long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
}

/// Reads one line of at most [`MAX_LINE`] bytes, without the newline. `Ok(None)` at a clean
/// end of stream. A longer line is an error and the rest of the stream is not trusted.
pub fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Option<()>> {
    line.clear();
    loop {
        let available = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-line"))
            };
        }
        let (chunk, found_newline) = match memchr(available) {
            Some(i) => (&available[..i], true),
            None => (available, false),
        };
        if line.len() + chunk.len() > MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("message longer than {MAX_LINE} bytes")));
        }
        line.extend_from_slice(chunk);
        let consumed = chunk.len() + usize::from(found_newline);
        reader.consume(consumed);
        if found_newline {
            return Ok(Some(()));
        }
    }
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

/// Reads and decodes one message; `Ok(None)` at a clean end of stream.
pub fn read_message<T: for<'de> Deserialize<'de>>(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
) -> io::Result<Option<T>> {
    if read_line(reader, line)?.is_none() {
        return Ok(None);
    }
    decode(line).map(Some)
}

pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> io::Result<T> {
    serde_json::from_slice(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes one message and its newline. The caller decides when to flush.
pub fn write_message<T: Serialize>(writer: &mut impl Write, message: &T) -> io::Result<()> {
    // The whole line is made first and handed on in one piece: serde writing straight into
    // a buffered stream whose flush fails (a client that stopped reading) stops halfway,
    // and the next message would then go on from the middle of a line.
    thread_local! {
        static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        serde_json::to_writer(&mut *line, message).map_err(io::Error::other)?;
        line.push(b'\n');
        let written = writer.write_all(&line);
        // A long line (a large embedding) is not kept for every later message.
        if line.capacity() > 64 << 10 {
            *line = Vec::new();
        }
        written
    })
}

/// One message and its newline, as bytes to write in one go.
pub fn encode_line<T: Serialize>(message: &T) -> io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// Sends one message and its newline to an unbuffered stream in one write: serde writes a
/// message piece by piece (a hello was 15 writes, each waking the reader).
pub fn send_message<T: Serialize>(stream: &mut impl Write, message: &T) -> io::Result<()> {
    stream.write_all(&encode_line(message)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadOptions;
    use std::io::BufReader;

    /// A socket that takes `room` more bytes, then would block (a client that stopped
    /// reading).
    #[derive(Debug)]
    struct Choking {
        taken: Vec<u8>,
        room: usize,
    }

    impl Write for Choking {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = bytes.len().min(self.room);
            self.taken.extend_from_slice(&bytes[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_that_fails_halfway_leaves_whole_lines_for_the_messages_after_it() {
        let mut writer = io::BufWriter::with_capacity(64, Choking { taken: Vec::new(), room: 100 });
        let token = Response::Token { text: "some text ".into() };
        while write_message(&mut writer, &token).is_ok() {}
        // The client reads again: the rest, then the error, arrive as whole lines.
        writer.get_mut().room = usize::MAX;
        let error = Response::error(&crate::error::Error::Interrupted);
        write_message(&mut writer, &error).unwrap();
        writer.flush().unwrap();
        let taken = String::from_utf8(writer.into_inner().unwrap().taken).unwrap();
        assert!(taken.ends_with('\n'), "{taken}");
        for line in taken.lines() {
            assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "a broken line: {line}");
        }
        assert!(taken.lines().last().unwrap().contains("\"error\""), "{taken}");
    }

    #[test]
    fn requests_round_trip() {
        let request = Request::Run(RunRequest {
            model: ModelSpec {
                name: "m".into(),
                path: "/m.gguf".into(),
                load: LoadOptions::default(),
                policy: Default::default(),
                remote: None,
            },
            mode: Mode::Chat,
            prompt: "hi\nthere".into(),
            system: None,
            messages: None,
            sampling: Sampling { stop: vec!["\n\n".into()], ..Sampling::default() },
        });
        let mut wire = Vec::new();
        write_message(&mut wire, &request).unwrap();
        assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
        let mut reader = BufReader::new(&wire[..]);
        let decoded: Request = read_message(&mut reader, &mut Vec::new()).unwrap().unwrap();
        assert_eq!(decoded, request);
    }

    #[test]
    fn instance_states_are_words_on_the_wire() {
        let status = InstanceStatus { state: InstanceState::Busy, ..InstanceStatus::default() };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "busy");
        assert!(InstanceState::Busy.is_loaded() && InstanceState::Ready.is_loaded());
        assert!(!InstanceState::Starting.is_loaded() && InstanceState::Starting.is_up());
        assert!(!InstanceState::Failed.is_up() && !InstanceState::Waiting.is_up());
    }

    #[test]
    fn stop_forgets_only_when_asked_and_events_carry_measures_only_when_they_have_them() {
        let stop: Request = decode(br#"{"type":"stop","model":null}"#).unwrap();
        assert_eq!(stop, Request::Stop { model: None, forget: false });
        let plain = serde_json::to_value(Event { event: "ready".into(), ..Event::default() }).unwrap();
        assert!(plain.get("tokens").is_none() && plain.get("ms").is_none(), "{plain}");
        let saved = Event { event: "saved".into(), tokens: Some(300), ms: Some(5), ..Event::default() };
        let saved = serde_json::to_value(saved).unwrap();
        assert_eq!((saved["tokens"].as_u64(), saved["ms"].as_u64()), (Some(300), Some(5)));
    }

    #[test]
    fn wrong_shapes_are_errors() {
        for bad in ["{}", "[1]", "{\"type\":\"run\"}", "\u{0}"] {
            assert!(decode::<Request>(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn lines_over_the_cap_are_refused() {
        let long = vec![b'a'; MAX_LINE + 1];
        let mut reader = BufReader::new(&long[..]);
        let error = read_line(&mut reader, &mut Vec::new()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn half_a_line_then_eof_is_an_error() {
        let mut reader = BufReader::new(&b"{\"type\":"[..]);
        assert!(read_line(&mut reader, &mut Vec::new()).is_err());
        let mut empty = BufReader::new(&b""[..]);
        assert!(read_line(&mut empty, &mut Vec::new()).unwrap().is_none());
    }
}
