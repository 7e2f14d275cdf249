//! A llama-server child as a process: its command line, where it listens, and its output.
//!
//! The child gets `--port 0` (or a Unix socket path), so the kernel picks a free port at
//! bind time and there is no pick-then-bind race; the port comes from the child's own log
//! line `listening on http://127.0.0.1:PORT`, which llama-server prints once the model is
//! loaded. Output goes through a pipe that a thread drains into the per-instance log file
//! and a bounded in-memory tail, so a child can never block on a full pipe, an error can
//! quote its last lines, and no line, however long, is held whole: a line is kept up to
//! [`MAX_OUTPUT_LINE`] bytes and the rest of it dropped, in the log and in memory.
//!
//! This module builds commands and reads output; spawning and signals are `process`'s.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::sse::{Line, Lines};
use crate::gguf::ModelInfo;
use crate::model::ModelSpec;

/// Lines of child output kept in memory for error messages.
const TAIL_LINES: usize = 40;
/// Lines quoted in an error message.
const QUOTED_LINES: usize = 12;
/// The longest line of a child's output that is kept, in its log and its tail; the rest of
/// a longer line is dropped (llama-server's own lines are under 1 KiB; a child printing one
/// endless line grew the daemon without bound before this cap).
pub(crate) const MAX_OUTPUT_LINE: usize = 16 << 10;
/// How often readiness is checked; DESIGN.md asks for 10-25 ms.
pub(crate) const READY_POLL: Duration = Duration::from_millis(10);

/// The last lines a child printed, and when it last printed anything.
#[derive(Debug)]
pub(crate) struct OutputTail {
    inner: Mutex<TailInner>,
}

#[derive(Debug)]
struct TailInner {
    lines: VecDeque<String>,
    last_output: Instant,
}

impl OutputTail {
    /// An empty tail, for an instance whose output llmctl does not capture (a remote one).
    pub(crate) fn empty() -> OutputTail {
        OutputTail { inner: Mutex::new(TailInner { lines: VecDeque::new(), last_output: Instant::now() }) }
    }

    fn push(&self, line: &str) {
        let mut inner = self.inner.lock();
        if inner.lines.len() == TAIL_LINES {
            inner.lines.pop_front();
        }
        inner.lines.push_back(line.trim_end().to_string());
        inner.last_output = Instant::now();
    }

    /// Output arrived that is not a whole line yet (a long line, or progress dots).
    fn touch(&self) {
        self.inner.lock().last_output = Instant::now();
    }

    /// The last lines, for an error message.
    pub(crate) fn quote(&self) -> String {
        let inner = self.inner.lock();
        let skip = inner.lines.len().saturating_sub(QUOTED_LINES);
        inner.lines.iter().skip(skip).map(|line| format!("  {line}\n")).collect()
    }

    pub(crate) fn last_output(&self) -> Instant {
        self.inner.lock().last_output
    }
}

/// Where a child listens; either way only llmctl can use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listen {
    /// A Unix socket in llmctl's private runtime directory: no TCP port at all.
    Socket(PathBuf),
    /// A loopback TCP port the kernel picks, guarded by a key only the daemon knows (passed
    /// in the child's environment, which other users cannot read, never in its argv) and a
    /// CORS origin no browser page has.
    Tcp { api_key: String },
}

/// The only origin a child allows for CORS: reserved (RFC 6761), so no web page has it
/// (llama-server's default is every origin).
const NO_ORIGIN: &str = "http://llmctl.invalid";

/// The llama-server command line for `spec`, whose file's header is `info`.
pub(crate) fn command(binary: &Path, spec: &ModelSpec, info: &ModelInfo, listen: &Listen) -> Command {
    let mut command = Command::new(binary);
    // The alias names the model in llama-server's answers, as the client named it.
    command.arg("--model").arg(&spec.path).arg("--alias").arg(&spec.name);
    match listen {
        Listen::Socket(path) => {
            command.arg("--host").arg(path).args(["--cors-origins", NO_ORIGIN]);
            // A key the user set for their own servers would lock llmctl out.
            command.env_remove("LLAMA_API_KEY");
        }
        Listen::Tcp { api_key } => {
            command.args(["--host", "127.0.0.1", "--port", "0", "--cors-origins", NO_ORIGIN]);
            command.env("LLAMA_API_KEY", api_key);
        }
    }
    command.args(["--no-webui", "--log-colors", "off"]).arg("--parallel").arg(spec.load.parallel.to_string());
    if let Some(ctx_size) = spec.load.ctx_size {
        command.arg("--ctx-size").arg(ctx_size.to_string());
    }
    if let Some(gpu_layers) = spec.load.gpu_layers {
        command.arg("--n-gpu-layers").arg(gpu_layers.to_string());
    }
    if spec.load.embeddings {
        command.arg("--embeddings");
        // A chat model's header names no pooling, and llama-server then gives one vector
        // per token, which the OpenAI endpoint refuses: average them instead.
        let pooling_given = spec.load.extra_args.iter().any(|arg| arg.starts_with("--pooling"));
        if info.pooling_type.is_none() && !pooling_given {
            command.args(["--pooling", "mean"]);
        }
    }
    if spec.load.reranking {
        command.arg("--reranking");
    }
    command.args(&spec.load.extra_args);
    command.stdin(Stdio::null());
    command
}

/// Output capture for one child: the pipe its stdout and stderr share, and the thread
/// that drains it.
pub(crate) struct Capture {
    pub(crate) tail: Arc<OutputTail>,
    pub(crate) port: Receiver<u16>,
    pub(crate) drain: JoinHandle<()>,
}

/// Points `command`'s stdout and stderr at one pipe and starts the thread that copies it to
/// `log_path`, keeps the tail and reports the port; `on_close` runs when the child closes
/// its output (it is exiting), `on_listening` when it says it listens (so readiness is
/// checked at once rather than at the next poll). Call before spawning; the write ends in
/// `command` are closed in this process when `command` is dropped.
pub(crate) fn capture_output(
    command: &mut Command,
    log_path: &Path,
    on_listening: impl FnOnce() + Send + 'static,
    on_close: impl FnOnce() + Send + 'static,
) -> io::Result<Capture> {
    let (reader, writer) = io::pipe()?;
    command.stdout(writer.try_clone()?).stderr(writer);
    let mut log = crate::paths::open_log(log_path)?;
    let tail = Arc::new(OutputTail::empty());
    let (port_tx, port_rx) = crossbeam_channel::bounded(1);
    let drain_tail = Arc::clone(&tail);
    let drain = thread::Builder::new().name("child-output".into()).spawn(move || {
        drain_output(reader, &mut log, &drain_tail, port_tx, on_listening);
        on_close();
    })?;
    Ok(Capture { tail, port: port_rx, drain })
}

fn drain_output(
    mut pipe: impl Read,
    log: &mut impl Write,
    tail: &OutputTail,
    port_tx: Sender<u16>,
    on_listening: impl FnOnce(),
) {
    let mut lines = Lines::with_max(MAX_OUTPUT_LINE);
    let mut buffer = vec![0u8; 16 << 10];
    // The whole lines of one read, written to the log in one write: a line and its newline
    // never reach the file apart.
    let mut out: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut port_sent = false;
    let mut on_listening = Some(on_listening);
    loop {
        let read = match pipe.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        tail.touch();
        let _: ControlFlow<()> = lines.feed(&buffer[..read], |line, _| {
            let text = match line {
                Line::TooLong => {
                    out.extend_from_slice(b"[llmctl: an output line over 16 KiB was left out]\n");
                    return ControlFlow::Continue(());
                }
                Line::Complete(line) => {
                    out.extend_from_slice(line);
                    out.push(b'\n');
                    String::from_utf8_lossy(line).into_owned()
                }
            };
            tail.push(&text);
            if !port_sent {
                if let Some(port) = parse_listening_port(&text) {
                    port_sent = port_tx.send(port).is_ok();
                }
            }
            if text.contains("listening on ") {
                if let Some(on_listening) = on_listening.take() {
                    on_listening();
                }
            }
            ControlFlow::Continue(())
        });
        if !out.is_empty() {
            let _ = log.write_all(&out);
            out.clear();
        }
    }
    if let Some(Line::Complete(line)) = lines.finish() {
        out.extend_from_slice(line);
        out.push(b'\n');
        let _ = log.write_all(&out);
        tail.push(&String::from_utf8_lossy(line));
    }
}

/// The port in llama-server's `listening on http://127.0.0.1:PORT` line.
pub(crate) fn parse_listening_port(line: &str) -> Option<u16> {
    let rest = &line[line.find("listening on http://")? + "listening on http://".len()..];
    let address = rest.split_whitespace().next()?;
    address.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_in_log_line() {
        let table = [
            ("main: server is listening on http://127.0.0.1:41537 - starting the main loop", Some(41537)),
            ("srv  main: listening on http://127.0.0.1:8080\n", Some(8080)),
            ("llama_server: listening on http://127.0.0.1:5/", Some(5)),
            ("load_model: loading model", None),
            ("listening on unix:///tmp/x.sock", None),
        ];
        for (line, port) in table {
            assert_eq!(parse_listening_port(line), port, "{line}");
        }
    }

    #[test]
    fn an_endless_output_line_is_cut_in_the_log_and_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("child.log");
        let mut log = std::fs::File::create(&log_path).unwrap();
        let tail = OutputTail::empty();
        let (port_tx, port_rx) = crossbeam_channel::bounded(1);
        let mut output = vec![b'x'; 10 * MAX_OUTPUT_LINE];
        output.extend_from_slice(b"\nmain: server is listening on http://127.0.0.1:4242 - starting\n");
        drain_output(&output[..], &mut log, &tail, port_tx, || {});
        assert_eq!(port_rx.try_recv(), Ok(4242), "the line after the long one is read");
        let logged = std::fs::read_to_string(&log_path).unwrap();
        assert!(logged.len() < 2 * MAX_OUTPUT_LINE, "the long line is not logged whole: {} bytes", logged.len());
        assert!(logged.contains("left out") && logged.contains("listening on"), "{logged}");
        assert!(tail.quote().contains("listening on"));
    }

    /// Records each write it is given.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.push(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_lines_of_one_read_reach_the_log_in_one_write_each_line_whole() {
        // Two reads: two lines and the start of a third, then its end and an unended last.
        let reads = [&b"one\ntwo\nthr"[..], &b"ee\nlast"[..]];
        let pipe = std::io::Read::chain(reads[0], reads[1]);
        let mut log = Writes::default();
        let (port_tx, _port_rx) = crossbeam_channel::bounded(1);
        drain_output(pipe, &mut log, &OutputTail::empty(), port_tx, || {});
        let writes: Vec<String> = log.0.iter().map(|w| String::from_utf8_lossy(w).into_owned()).collect();
        assert_eq!(writes, ["one\ntwo\n", "three\n", "last\n"]);
    }
}
