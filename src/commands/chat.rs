//! `llmctl chat MODEL` (and `llmctl run MODEL` at a terminal without a prompt): a multi-turn
//! conversation on the terminal, with line editing and history (rustyline).
//!
//! Each turn sends the whole conversation as chat messages in one run request, over a
//! connection of its own, and streams the answer to stdout. Ctrl-C while an answer streams
//! stops that answer (the socket is shut down, so the daemon cancels upstream) and returns to
//! the prompt; the unanswered turn is dropped. `/bye` or Ctrl-D leaves. The conversation
//! lives in this process only.

use std::io::{self, IsTerminal, Write};

use rustyline::error::ReadlineError;
use serde_json::json;

use crate::cli::ChatArgs;
use crate::client::interrupt;
use crate::client::stream::{self, Ended, Progress, Sink};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::protocol::{Mode, Request, RunRequest, Sampling};

const PROMPT: &str = ">>> ";
const HELP: &str = "\
/bye                          leave (Ctrl-D too)
/clear                        forget the conversation (the system message stays)
/system TEXT                  set the system message (also /set system TEXT)
/set parameter NAME VALUE     sampling for the next answers: temperature, top_p, top_k,
                              min_p, repeat_penalty, seed, num_predict (0: no limit),
                              stop (one or more words)
/set temperature X            the same as /set parameter temperature X
/show info                    the model: file, architecture, size, context
/show parameters              the sampling parameters in use
/show system                  the system message
/help                         this list
\"\"\" starts a message of several lines, ended by a line ending in \"\"\"; a line
ending in \\ continues on the next. Ctrl-C stops an answer.";

/// A conversation: the system message, then user and assistant turns.
#[derive(Debug, Default)]
struct Conversation {
    system: Option<String>,
    turns: Vec<(String, String)>,
}

impl Conversation {
    fn messages(&self, next_user: &str) -> Vec<serde_json::Value> {
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        for (user, assistant) in &self.turns {
            messages.push(json!({"role": "user", "content": user}));
            messages.push(json!({"role": "assistant", "content": assistant}));
        }
        messages.push(json!({"role": "user", "content": next_user}));
        messages
    }
}

/// What a line typed at the prompt asks for.
#[derive(Debug, PartialEq)]
enum Input {
    Say(String),
    Bye,
    Clear,
    System(String),
    Set(Parameter),
    Show(Shown),
    Help,
    Nothing,
    Bad(String),
}

/// A sampling parameter `/set parameter` changes, with Ollama's names.
#[derive(Debug, PartialEq)]
enum Parameter {
    Temperature(f32),
    TopP(f32),
    TopK(u32),
    MinP(f32),
    RepeatPenalty(f32),
    Seed(u64),
    /// The most tokens in an answer; none for no limit.
    NumPredict(Option<u32>),
    Stop(Vec<String>),
}

/// What `/show` prints.
#[derive(Debug, PartialEq)]
enum Shown {
    Info,
    Parameters,
    System,
}

const SET_USAGE: &str = "usage: /set parameter NAME VALUE (temperature, top_p, top_k, min_p, repeat_penalty, seed, \
                         num_predict, stop), /set system TEXT";

fn parse(line: &str) -> Input {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Input::Nothing;
    }
    if !trimmed.starts_with('/') {
        return Input::Say(line.trim_end().to_string());
    }
    let (command, rest) = trimmed.split_once(char::is_whitespace).unwrap_or((trimmed, ""));
    let rest = rest.trim();
    match command {
        "/bye" | "/exit" | "/quit" => Input::Bye,
        "/clear" => Input::Clear,
        "/help" | "/?" => Input::Help,
        "/system" if rest.is_empty() => Input::Bad("/system needs the text of the system message".into()),
        "/system" => Input::System(rest.to_string()),
        "/set" => {
            let (what, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let value = value.trim();
            match what {
                "parameter" => {
                    let (name, value) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
                    parse_parameter(name, value.trim())
                }
                "system" if !value.is_empty() => Input::System(value.to_string()),
                "temperature" => parse_parameter("temperature", value),
                _ => Input::Bad(SET_USAGE.into()),
            }
        }
        "/show" => match rest {
            "info" => Input::Show(Shown::Info),
            "parameters" => Input::Show(Shown::Parameters),
            "system" => Input::Show(Shown::System),
            _ => Input::Bad("usage: /show info, /show parameters or /show system".into()),
        },
        other => Input::Bad(format!("unknown command {other}; /help lists them")),
    }
}

/// `/set parameter NAME VALUE`, each value checked as the command line checks it.
fn parse_parameter(name: &str, value: &str) -> Input {
    let number = |low: f32, high: f32| -> Result<f32, String> {
        match value.parse::<f32>() {
            Ok(x) if x.is_finite() && x >= low && x <= high => Ok(x),
            _ if high.is_infinite() => Err(format!("`{value}` is not a number >= {low} for {name}")),
            _ => Err(format!("`{value}` is not a number from {low} to {high} for {name}")),
        }
    };
    let parsed = match name {
        "temperature" => number(0.0, f32::INFINITY).map(Parameter::Temperature),
        "top_p" => number(0.0, 1.0).map(Parameter::TopP),
        "min_p" => number(0.0, 1.0).map(Parameter::MinP),
        "repeat_penalty" => number(0.0, f32::INFINITY).map(Parameter::RepeatPenalty),
        "top_k" => value.parse().map(Parameter::TopK).map_err(|_| format!("`{value}` is not a count for top_k")),
        "seed" => value.parse().map(Parameter::Seed).map_err(|_| format!("`{value}` is not a seed (a number)")),
        // Ollama's -1 (and 0) mean no limit.
        "num_predict" => match value.parse::<i64>() {
            Ok(-1 | 0) => Ok(Parameter::NumPredict(None)),
            Ok(n) if n > 0 && n <= i64::from(crate::config::MAX_TOKENS) => Ok(Parameter::NumPredict(Some(n as u32))),
            _ => Err(format!("`{value}` is not a token count for num_predict (0 or -1: no limit)")),
        },
        "stop" if !value.is_empty() => Ok(Parameter::Stop(value.split_whitespace().map(str::to_string).collect())),
        "stop" => Err("/set parameter stop needs one or more words".into()),
        "" => Err(SET_USAGE.into()),
        other => Err(format!("unknown parameter {other}; {SET_USAGE}")),
    };
    match parsed {
        Ok(parameter) => Input::Set(parameter),
        Err(message) => Input::Bad(message),
    }
}

/// Applies `parameter` to the sampling of the next answers; returns what to confirm.
fn apply(sampling: &mut Sampling, parameter: Parameter) -> String {
    match parameter {
        Parameter::Temperature(x) => {
            sampling.temperature = Some(x);
            format!("temperature {x}")
        }
        Parameter::TopP(x) => {
            sampling.top_p = Some(x);
            format!("top_p {x}")
        }
        Parameter::TopK(k) => {
            sampling.top_k = Some(k);
            format!("top_k {k}")
        }
        Parameter::MinP(x) => {
            sampling.min_p = Some(x);
            format!("min_p {x}")
        }
        Parameter::RepeatPenalty(x) => {
            sampling.repeat_penalty = Some(x);
            format!("repeat_penalty {x}")
        }
        Parameter::Seed(seed) => {
            sampling.seed = Some(seed);
            format!("seed {seed}")
        }
        Parameter::NumPredict(limit) => {
            sampling.max_tokens = limit;
            format!("num_predict {}", limit.map_or("0 (no limit)".into(), |n| n.to_string()))
        }
        Parameter::Stop(words) => {
            let shown = words.join(" ");
            sampling.stop = words;
            format!("stop {shown}")
        }
    }
}

/// `/show parameters`: each parameter set, with Ollama's names; the token limit always.
fn describe_parameters(sampling: &Sampling) -> String {
    let mut lines = Vec::new();
    let mut add = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            lines.push(format!("{name:<16}{value}"));
        }
    };
    add("temperature", sampling.temperature.map(|x| x.to_string()));
    add("top_p", sampling.top_p.map(|x| x.to_string()));
    add("top_k", sampling.top_k.map(|x| x.to_string()));
    add("min_p", sampling.min_p.map(|x| x.to_string()));
    add("repeat_penalty", sampling.repeat_penalty.map(|x| x.to_string()));
    add("seed", sampling.seed.map(|x| x.to_string()));
    add("num_predict", Some(sampling.max_tokens.map_or("0 (no limit)".into(), |n| n.to_string())));
    add("stop", (!sampling.stop.is_empty()).then(|| sampling.stop.join(" ")));
    lines.join("\n") + "\n(parameters not listed are llama-server's defaults)"
}

/// `/show info`: what the model's header says.
fn describe_model(model: &ModelSpec) -> String {
    if let Some(remote) = &model.remote {
        return format!("{:<16}{}\n{:<16}{}", "model", model.name, "servers", remote.urls.join(" "));
    }
    let mut lines = vec![format!("{:<16}{}", "model", model.name), format!("{:<16}{}", "path", model.path.display())];
    match crate::gguf::inspect(&model.path) {
        Ok(info) => {
            let count = info.details.parameter_count;
            lines.push(format!("{:<16}{}", "architecture", info.architecture));
            if count > 0 {
                lines.push(format!("{:<16}{}", "parameters", crate::catalog::human_count(count)));
            }
            lines.push(format!("{:<16}{}", "quantization", info.quantization()));
            if let Some(context) = info.context_length {
                lines.push(format!("{:<16}{context}", "context length"));
            }
            if let Some(size) = model.load.ctx_size {
                lines.push(format!("{:<16}{size}", "loaded context"));
            }
        }
        Err(reason) => lines.push(format!("{:<16}unreadable: {reason}", "header")),
    }
    lines.join("\n")
}

pub(crate) fn run(context: &Context, args: ChatArgs) -> Result<()> {
    let model = crate::setup::resolve_on_first_use(context, &args.model, &args.load.overrides())?;
    // A session connects at its first message: a file that is not a model is refused before
    // it opens.
    model.check_header()?;
    let max_tokens = crate::config::max_tokens(args.max_tokens, &*context.config()?);
    let sampling = Sampling { max_tokens, temperature: args.temperature, ..Sampling::default() };
    session(context, model, args.system, sampling)
}

/// The chat loop, for `chat` and for `run` at a terminal without a prompt.
pub(crate) fn session(
    context: &Context,
    model: ModelSpec,
    system: Option<String>,
    mut sampling: Sampling,
) -> Result<()> {
    let mut editor = rustyline::DefaultEditor::new().map_err(|e| Error::internal(format!("line editor: {e}")))?;
    let history = context.paths.state_dir.join("chat_history");
    let _ = editor.load_history(&history);
    let mut conversation = Conversation { system, turns: Vec::new() };
    eprintln!("chatting with {}; /help for commands, /bye or Ctrl-D to leave", model.name);
    loop {
        let line = match read_input(&mut editor) {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(error) => return Err(error),
        };
        let input = match line {
            Typed::Line(line) => parse(&line),
            // A message between `"""` lines is said as it is, even when it starts with `/`.
            Typed::Quoted(text) if text.trim().is_empty() => Input::Nothing,
            Typed::Quoted(text) => Input::Say(text),
        };
        match input {
            Input::Nothing => {}
            Input::Bye => break,
            Input::Help => eprintln!("{HELP}"),
            Input::Clear => {
                conversation.turns.clear();
                eprintln!("(conversation cleared)");
            }
            Input::System(text) => {
                conversation.system = Some(text);
                eprintln!("(system message set)");
            }
            Input::Set(parameter) => eprintln!("({})", apply(&mut sampling, parameter)),
            Input::Show(Shown::Parameters) => eprintln!("{}", describe_parameters(&sampling)),
            Input::Show(Shown::System) => match &conversation.system {
                Some(system) => eprintln!("{system}"),
                None => eprintln!("(no system message)"),
            },
            Input::Show(Shown::Info) => eprintln!("{}", describe_model(&model)),
            Input::Bad(message) => eprintln!("{message}"),
            Input::Say(text) => {
                let _ = editor.add_history_entry(text.as_str());
                match answer(context, &model, &conversation, &text, &sampling) {
                    Ok(Some(reply)) => conversation.turns.push((text, reply)),
                    Ok(None) => eprintln!("(stopped)"),
                    Err(error) => eprintln!("llmctl: {error}"),
                }
            }
        }
    }
    if let Some(dir) = history.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = editor.save_history(&history);
    Ok(())
}

/// One input as typed: a line (lines ending in a backslash joined to the next), or a
/// message of several lines between `"""` lines, as in Ollama.
enum Typed {
    Line(String),
    Quoted(String),
}

/// The quotes that open and close a message of several lines.
const QUOTES: &str = "\"\"\"";

/// One input; none at Ctrl-D. Lines typed ahead (while an answer streamed) or pasted in a
/// burst are read in turn: the terminal keeps what is typed while nothing reads it, and
/// the line editor keeps what it read beyond the line it returned (its `buffer-redux`
/// feature), so no line is lost between two prompts.
fn read_input(editor: &mut rustyline::DefaultEditor) -> Result<Option<Typed>> {
    let mut text = String::new();
    // Within `"""`: the lines read so far.
    let mut quoted: Option<Vec<String>> = None;
    loop {
        let prompt = if text.is_empty() && quoted.is_none() { PROMPT } else { "... " };
        match editor.readline(prompt) {
            Ok(line) => {
                if let Some(lines) = &mut quoted {
                    match line.trim_end().strip_suffix(QUOTES) {
                        Some(last) => {
                            if !last.is_empty() {
                                lines.push(last.to_string());
                            }
                            return Ok(Some(Typed::Quoted(lines.join("\n"))));
                        }
                        None => lines.push(line),
                    }
                    continue;
                }
                if text.is_empty() {
                    if let Some(first) = line.trim_start().strip_prefix(QUOTES) {
                        // `"""one line"""` opens and closes on one line.
                        if let Some(whole) = first.trim_end().strip_suffix(QUOTES) {
                            return Ok(Some(Typed::Quoted(whole.to_string())));
                        }
                        quoted = Some(if first.is_empty() { Vec::new() } else { vec![first.to_string()] });
                        continue;
                    }
                }
                match line.strip_suffix('\\') {
                    Some(start) => {
                        text.push_str(start);
                        text.push('\n');
                    }
                    None => {
                        text.push_str(&line);
                        return Ok(Some(Typed::Line(text)));
                    }
                }
            }
            // Ctrl-C at the prompt drops the line, as in a shell.
            Err(ReadlineError::Interrupted) => {
                eprintln!("(Ctrl-D or /bye leaves)");
                text.clear();
                quoted = None;
            }
            Err(ReadlineError::Eof) => return Ok(None),
            Err(error) => return Err(Error::internal(format!("reading the terminal: {error}"))),
        }
    }
}

/// Streams the answer to `text`; `None` when Ctrl-C stopped it.
fn answer(
    context: &Context,
    model: &ModelSpec,
    conversation: &Conversation,
    text: &str,
    sampling: &Sampling,
) -> Result<Option<String>> {
    let request = RunRequest {
        model: model.clone(),
        mode: Mode::Chat,
        prompt: String::new(),
        system: None,
        messages: Some(conversation.messages(text)),
        sampling: sampling.clone(),
    };
    let mut answer = Answer { stdout: io::stdout().lock(), progress: io::stderr().is_terminal(), reply: String::new() };
    let request = Request::Run(request);
    let result = crate::setup::retry_after_setup(context, || {
        let mut connection = crate::client::connect_for(context, model, crate::client::AtCap::Refuse)?;
        connection.set_reply_timeout(Some(context.generation_timeout()))?;
        // Ctrl-C while it streams stops this answer (cancelled upstream), not the chat.
        let _watch = interrupt::Watch::socket(connection.raw_fd())?;
        stream::generate(&mut connection, &request, &mut answer)
    });
    let _ = writeln!(answer.stdout);
    let _ = answer.stdout.flush();
    match result {
        _ if interrupt::interrupted() => Ok(None),
        Ok(Ended::Done(_)) | Ok(Ended::SinkClosed(_)) => Ok(Some(answer.reply)),
        Err(error) => Err(error),
    }
}

/// An answer as the conversation takes it: written to stdout as it comes, kept whole for
/// the next turn, with progress only on a terminal (a piped chat gets no control codes).
struct Answer {
    stdout: io::StdoutLock<'static>,
    progress: bool,
    reply: String,
}

impl Sink for Answer {
    fn progress(&mut self, progress: Progress) {
        if !self.progress {
            return;
        }
        match progress {
            Progress::Loading { model, position: Some(position), eta_ms } => eprint!(
                "\r\x1b[Kwaiting for {}: {} in line, about {} s\r",
                crate::term::escape(&model),
                crate::term::ordinal(position),
                eta_ms.unwrap_or(0).div_ceil(1000)
            ),
            Progress::Loading { model, .. } => eprint!("\r\x1b[Kloading {}...\r", crate::term::escape(&model)),
            Progress::Queued { position } => eprint!("\r\x1b[Kwaiting for a slot: position {position}...\r"),
        }
    }

    fn token(&mut self, text: &str, _more: bool) -> io::Result<()> {
        if self.reply.is_empty() && self.progress {
            eprint!("\x1b[K");
        }
        self.reply.push_str(text);
        self.stdout.write_all(text.as_bytes())?;
        self.stdout.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_at_the_prompt() {
        let table = [
            ("hello there ", Input::Say("hello there".into())),
            ("   ", Input::Nothing),
            ("/bye", Input::Bye),
            ("/clear", Input::Clear),
            ("/system be brief", Input::System("be brief".into())),
            ("/set temperature 0.5", Input::Set(Parameter::Temperature(0.5))),
            ("/set parameter temperature 0", Input::Set(Parameter::Temperature(0.0))),
            ("/set parameter top_p 0.9", Input::Set(Parameter::TopP(0.9))),
            ("/set parameter top_k 40", Input::Set(Parameter::TopK(40))),
            ("/set parameter min_p 0.05", Input::Set(Parameter::MinP(0.05))),
            ("/set parameter repeat_penalty 1.1", Input::Set(Parameter::RepeatPenalty(1.1))),
            ("/set parameter seed 42", Input::Set(Parameter::Seed(42))),
            ("/set parameter num_predict 128", Input::Set(Parameter::NumPredict(Some(128)))),
            ("/set parameter num_predict -1", Input::Set(Parameter::NumPredict(None))),
            ("/set parameter stop END ###", Input::Set(Parameter::Stop(vec!["END".into(), "###".into()]))),
            ("/set system be brief", Input::System("be brief".into())),
            ("/show info", Input::Show(Shown::Info)),
            ("/show parameters", Input::Show(Shown::Parameters)),
            ("/show system", Input::Show(Shown::System)),
        ];
        for (line, expected) in table {
            assert_eq!(parse(line), expected, "{line}");
        }
        for bad in [
            "/set temperature -1",
            "/set temperature hot",
            "/set top_k 3",
            "/set parameter top_p 1.5",
            "/set parameter top_k -3",
            "/set parameter num_predict lots",
            "/set parameter stop",
            "/set parameter mirostat 2",
            "/show template",
            "/system",
            "/frobnicate",
        ] {
            assert!(matches!(parse(bad), Input::Bad(_)), "{bad}");
        }
    }

    #[test]
    fn parameters_apply_to_the_next_answers_and_are_shown() {
        let mut sampling = Sampling { max_tokens: Some(1024), ..Sampling::default() };
        for line in ["/set parameter top_k 7", "/set parameter stop END", "/set parameter num_predict 0"] {
            let Input::Set(parameter) = parse(line) else { panic!("{line}") };
            apply(&mut sampling, parameter);
        }
        assert_eq!((sampling.top_k, sampling.max_tokens, sampling.stop.clone()), (Some(7), None, vec!["END".into()]));
        let shown = describe_parameters(&sampling);
        assert!(shown.contains("top_k           7") && shown.contains("num_predict     0 (no limit)"), "{shown}");
        assert!(!shown.contains("temperature"), "{shown}");
    }

    #[test]
    fn the_conversation_is_sent_whole() {
        let conversation = Conversation { system: Some("s".into()), turns: vec![("q1".into(), "a1".into())] };
        let roles: Vec<String> =
            conversation.messages("q2").iter().map(|m| format!("{}:{}", m["role"], m["content"])).collect();
        assert_eq!(roles, ["\"system\":\"s\"", "\"user\":\"q1\"", "\"assistant\":\"a1\"", "\"user\":\"q2\""]);
    }
}
