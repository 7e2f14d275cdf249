//! `llmctl run MODEL [PROMPT]...`: generate, streaming tokens to stdout.
//!
//! stdout carries the generated text and nothing else, flushed as tokens arrive (batched
//! only when more are already buffered). Progress goes to stderr and only to a terminal.
//! When the reader of stdout goes away, dropping the connection makes the daemon cancel the
//! generation upstream, and the command succeeds. Ctrl-C cancels the same way and exits 130.
//! On a terminal the text always ends with a newline, even when cut short, so the shell
//! prompt starts a fresh line; a pipe gets exactly the generated text.

use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::path::Path;

use serde::Serialize;

use crate::cli::RunArgs;
use crate::client::interrupt;
use crate::client::stream::{self, Ended, Progress, Sink};
use crate::client::{self};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::protocol::{Done, Mode, Request, RunRequest, Sampling, Usage};

pub(crate) fn run(context: &Context, args: RunArgs) -> Result<()> {
    let sampling = Sampling {
        max_tokens: crate::config::max_tokens(args.max_tokens, &*context.config()?),
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        stop: args.stop.clone(),
        json_schema: args.json_schema.as_deref().map(read_schema).transpose()?,
        grammar: args.grammar.as_deref().map(read_grammar).transpose()?,
    };
    // What the user typed (model, schema, grammar) is checked before a first use sets up.
    let model = crate::setup::resolve_on_first_use(context, &args.model, &args.load.overrides())?;
    let stdin = io::stdin();
    // No prompt, typed at a terminal: a conversation, as `llmctl chat`.
    if args.prompt.is_empty() && !args.raw && !args.json && !args.no_stdin && stdin.is_terminal() {
        return super::chat::session(context, model, args.system.clone(), sampling);
    }
    let piped = if args.no_stdin || stdin.is_terminal() { None } else { Some(read_stdin(stdin)?) };
    let prompt = compose_prompt(&args.prompt, piped.as_deref())?;
    let request = RunRequest {
        model,
        mode: if args.raw { Mode::Raw } else { Mode::Chat },
        prompt,
        system: args.system.clone(),
        messages: None,
        sampling,
    };

    let mut output = Output::new(args.json);
    let model = request.model.clone();
    let request = Request::Run(request);
    let result = crate::setup::retry_after_setup(context, || {
        let mut connection = client::connect_for(context, &model, crate::client::AtCap::Refuse)?;
        connection.set_reply_timeout(Some(context.generation_timeout()))?;
        let _watch = interrupt::Watch::socket(connection.raw_fd())?;
        stream::generate(&mut connection, &request, &mut output)
    });
    match result {
        Ok(Ended::Done(done)) => {
            let written = output.done(&done);
            if context.global.verbose > 0 {
                eprintln!("{}", timings_summary(&done));
            }
            match written {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                Err(e) => Err(Error::io("cannot write to stdout", e)),
                Ok(()) => Ok(()),
            }
        }
        // The reader of stdout went away (`| head`): that is its choice, not a failure.
        // Returning drops the connection, and the daemon cancels the generation.
        Ok(Ended::SinkClosed(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Ok(Ended::SinkClosed(e)) => Err(Error::io("cannot write to stdout", e)),
        Err(error) => {
            output.end_early();
            if interrupt::interrupted() {
                Err(Error::Interrupted)
            } else {
                Err(error)
            }
        }
    }
}

/// stdout of `run`: the generated text (or `--json` lines), and progress on a terminal's
/// stderr only.
struct Output {
    out: BufWriter<io::StdoutLock<'static>>,
    json: bool,
    stdout_is_terminal: bool,
    stderr_is_terminal: bool,
    progress_shown: bool,
    last_byte: u8,
}

impl Output {
    fn new(json: bool) -> Output {
        Output {
            out: BufWriter::with_capacity(1 << 16, io::stdout().lock()),
            json,
            stdout_is_terminal: io::stdout().is_terminal(),
            stderr_is_terminal: io::stderr().is_terminal(),
            progress_shown: false,
            last_byte: b'\n',
        }
    }

    fn clear_progress(&mut self) {
        if self.progress_shown {
            eprint!("\r\x1b[K");
            self.progress_shown = false;
        }
    }

    /// The end of a whole answer: the `done` line, or on a terminal a final newline so the
    /// shell prompt starts a line of its own; pipes get the text as is.
    fn done(&mut self, done: &Done) -> io::Result<()> {
        self.clear_progress();
        if self.json {
            self.out.write_all(done_line(done).as_bytes())?;
        } else if self.stdout_is_terminal && self.last_byte != b'\n' {
            self.out.write_all(b"\n")?;
        }
        self.out.flush()
    }

    /// Whatever ends the stream early (Ctrl-C, an error, a broken connection) leaves the
    /// terminal as the shell expects it: progress cleared, and the next line fresh.
    fn end_early(&mut self) {
        self.clear_progress();
        if self.stdout_is_terminal && !self.json && self.last_byte != b'\n' {
            let _ = self.out.write_all(b"\n");
        }
        let _ = self.out.flush();
    }
}

impl Sink for Output {
    fn progress(&mut self, progress: Progress) {
        if !self.stderr_is_terminal {
            return;
        }
        match progress {
            Progress::Loading { model, position: Some(position), eta_ms } => eprint!(
                "\r\x1b[Kwaiting for {}: {} in line, about {} s",
                crate::term::escape(&model),
                crate::term::ordinal(position),
                eta_ms.unwrap_or(0).div_ceil(1000)
            ),
            Progress::Loading { model, .. } => eprint!("\r\x1b[Kloading {}...", crate::term::escape(&model)),
            Progress::Queued { position } => eprint!("\rwaiting for a slot: position {position}..."),
        }
        self.progress_shown = true;
    }

    fn token(&mut self, text: &str, more: bool) -> io::Result<()> {
        self.clear_progress();
        if self.json {
            let mut line = serde_json::to_string(&TokenLine { kind: "token", text }).map_err(io::Error::other)?;
            line.push('\n');
            self.out.write_all(line.as_bytes())?;
        } else {
            self.last_byte = *text.as_bytes().last().unwrap_or(&self.last_byte);
            self.out.write_all(text.as_bytes())?;
        }
        if !more {
            self.out.flush()?;
        }
        Ok(())
    }
}

/// `--json-schema`: the schema itself when it looks like JSON, else a file holding it.
fn read_schema(given: &str) -> Result<serde_json::Value> {
    let (text, source) = if given.trim_start().starts_with('{') {
        (given.to_string(), "the --json-schema argument".to_string())
    } else {
        (read_small_file(Path::new(given), "--json-schema")?, given.to_string())
    };
    let schema: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidParameter { message: format!("{source} is not JSON: {e}") })?;
    if !schema.is_object() {
        return Err(Error::InvalidParameter { message: format!("{source} is not a JSON Schema object") });
    }
    Ok(schema)
}

fn read_grammar(path: &Path) -> Result<String> {
    read_small_file(path, "--grammar")
}

/// A schema or grammar file: missing is 66, unreadable or too large is 65.
fn read_small_file(path: &Path, flag: &str) -> Result<String> {
    const LIMIT: u64 = 1 << 20;
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::FileNotFound { what: flag.to_string(), path: path.to_path_buf() },
        _ => Error::io(format!("{flag}: cannot read {}", path.display()), e),
    })?;
    let mut text = String::new();
    file.take(LIMIT + 1)
        .read_to_string(&mut text)
        .map_err(|_| Error::InvalidParameter { message: format!("{flag}: {} is not UTF-8 text", path.display()) })?;
    if text.len() as u64 > LIMIT {
        return Err(Error::InvalidParameter { message: format!("{flag}: {} is over 1 MiB", path.display()) });
    }
    Ok(text)
}

fn read_stdin(stdin: io::Stdin) -> Result<String> {
    let mut bytes = Vec::new();
    // Never more than one request can carry: a huge or endless stdin is refused, not held.
    let limit = crate::protocol::MAX_LINE as u64;
    stdin.lock().take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io("cannot read stdin", e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::InvalidParameter {
            message: format!("stdin is over the {} MiB a request can carry; shorten it", limit >> 20),
        });
    }
    String::from_utf8(bytes).map_err(|_| Error::InvalidParameter { message: "stdin is not valid UTF-8 text".into() })
}

/// The prompt: the words, then a blank line, then piped stdin; either alone when the other
/// is empty.
pub(crate) fn compose_prompt(words: &[String], piped: Option<&str>) -> Result<String> {
    let typed = words.join(" ");
    let piped = piped.unwrap_or("");
    let prompt = match (typed.is_empty(), piped.is_empty()) {
        (false, false) => format!("{typed}\n\n{piped}"),
        (false, true) => typed,
        (true, false) => piped.to_string(),
        (true, true) => {
            return Err(Error::Usage {
                message: "no prompt: give it as arguments or pipe it on stdin (llmctl run MODEL \"prompt\")".into(),
            })
        }
    };
    Ok(prompt)
}

/// The `--json` lines, with `type` first so a reader can dispatch on the line's start.
#[derive(Serialize)]
struct TokenLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct DoneLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    finish_reason: &'a str,
    usage: &'a Usage,
    timings: &'a Option<serde_json::Value>,
}

fn done_line(done: &Done) -> String {
    let line =
        DoneLine { kind: "done", finish_reason: &done.finish_reason, usage: &done.usage, timings: &done.timings };
    let mut text = serde_json::to_string(&line).unwrap_or_default();
    text.push('\n');
    text
}

fn timings_summary(done: &Done) -> String {
    let timings = done.timings.as_ref();
    let number = |key: &str| timings.and_then(|t| t.get(key)).and_then(|v| v.as_f64());
    // llama-server's prompt rate is over the tokens it computed, not those a cache gave it.
    let cached = match number("cache_n") {
        Some(cached) if cached >= 1.0 => format!(" ({cached:.0} from the prompt cache)"),
        _ => String::new(),
    };
    let mut summary = format!(
        "llmctl: {} prompt tokens{cached}, {} generated, finish: {}",
        done.usage.prompt_tokens, done.usage.completion_tokens, done.finish_reason
    );
    if let (Some(prompt), Some(generated)) = (number("prompt_per_second"), number("predicted_per_second")) {
        summary.push_str(&format!("; prompt {prompt:.1} tok/s, generation {generated:.1} tok/s"));
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timings_line_says_how_much_of_the_prompt_came_from_the_cache() {
        let mut done = Done { finish_reason: "stop".into(), ..Done::default() };
        done.usage.prompt_tokens = 752;
        done.usage.completion_tokens = 8;
        done.timings = Some(serde_json::json!({"cache_n": 714, "prompt_n": 38, "prompt_per_second": 38.6,
            "predicted_per_second": 90.31}));
        assert_eq!(
            timings_summary(&done),
            "llmctl: 752 prompt tokens (714 from the prompt cache), 8 generated, finish: stop; \
             prompt 38.6 tok/s, generation 90.3 tok/s"
        );
        done.timings =
            Some(serde_json::json!({"cache_n": 0, "prompt_per_second": 500.0, "predicted_per_second": 90.0}));
        assert_eq!(
            timings_summary(&done),
            "llmctl: 752 prompt tokens, 8 generated, finish: stop; prompt 500.0 tok/s, generation 90.0 tok/s"
        );
    }

    #[test]
    fn prompt_composition() {
        let words = vec!["Summarise".to_string(), "this:".to_string()];
        assert_eq!(compose_prompt(&words, Some("text\n")).unwrap(), "Summarise this:\n\ntext\n");
        assert_eq!(compose_prompt(&words, None).unwrap(), "Summarise this:");
        assert_eq!(compose_prompt(&[], Some("only stdin")).unwrap(), "only stdin");
        assert_eq!(compose_prompt(&[], Some("")).unwrap_err().exit_code(), 2);
    }
}
