//! `llmctl chat MODEL` (and `llmctl run MODEL` at a terminal without a prompt): a multi-turn
//! conversation on the terminal, with line editing and history (rustyline).
//!
//! Each turn sends the whole conversation as chat messages in one run request, over a
//! connection of its own, and streams the answer to stdout. Ctrl-C while an answer streams
//! stops that answer (the socket is shut down, so the daemon cancels upstream) and returns to
//! the prompt; the unanswered turn is dropped. `/bye` or Ctrl-D leaves. The conversation
//! lives in this process only.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use rustyline::error::ReadlineError;
use serde_json::json;

use crate::cli::ChatArgs;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::protocol::{Mode, Request, Response, RunRequest, Sampling};
use crate::sys;

/// Set by the Ctrl-C handler while an answer streams.
static STOPPED: AtomicBool = AtomicBool::new(false);
/// The socket of the answer streaming now; -1 when none.
static SOCKET_FD: AtomicI32 = AtomicI32::new(-1);

const PROMPT: &str = ">>> ";
const HELP: &str = "\
/bye                 leave (Ctrl-D too)
/clear               forget the conversation (the system message stays)
/system TEXT         set the system message
/set temperature X   sampling temperature, 0 for greedy
/help                this list
Ctrl-C stops an answer; a line ending in \\ continues on the next";

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
    Temperature(f32),
    Help,
    Nothing,
    Bad(String),
}

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
        "/set" => match rest.split_whitespace().collect::<Vec<_>>()[..] {
            ["temperature", value] => match value.parse::<f32>() {
                Ok(t) if t.is_finite() && t >= 0.0 => Input::Temperature(t),
                _ => Input::Bad(format!("`{value}` is not a temperature (a number >= 0)")),
            },
            _ => Input::Bad("usage: /set temperature X".into()),
        },
        other => Input::Bad(format!("unknown command {other}; /help lists them")),
    }
}

pub fn run(context: &Context, args: ChatArgs) -> Result<()> {
    let model = crate::setup::resolve_on_first_use(context, &args.model, &args.load.overrides())?;
    let max_tokens = crate::config::max_tokens(args.max_tokens, &*context.config()?);
    let sampling = Sampling { max_tokens, temperature: args.temperature, ..Sampling::default() };
    session(context, model, args.system, sampling)
}

/// The chat loop, for `chat` and for `run` at a terminal without a prompt.
pub fn session(context: &Context, model: ModelSpec, system: Option<String>, mut sampling: Sampling) -> Result<()> {
    let mut editor = rustyline::DefaultEditor::new().map_err(|e| Error::internal(format!("line editor: {e}")))?;
    let history = context.paths.state_dir.join("chat_history");
    let _ = editor.load_history(&history);
    install_interrupt_handler()?;
    let mut conversation = Conversation { system, turns: Vec::new() };
    eprintln!("chatting with {}; /help for commands, /bye or Ctrl-D to leave", model.name);
    loop {
        let line = match read_input(&mut editor) {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(error) => return Err(error),
        };
        match parse(&line) {
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
            Input::Temperature(t) => {
                sampling.temperature = Some(t);
                eprintln!("(temperature {t})");
            }
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

/// One input, joining lines that end in a backslash; none at Ctrl-D or `/bye`.
fn read_input(editor: &mut rustyline::DefaultEditor) -> Result<Option<String>> {
    let mut text = String::new();
    loop {
        let prompt = if text.is_empty() { PROMPT } else { "... " };
        match editor.readline(prompt) {
            Ok(line) => match line.strip_suffix('\\') {
                Some(start) => {
                    text.push_str(start);
                    text.push('\n');
                }
                None => {
                    text.push_str(&line);
                    return Ok(Some(text));
                }
            },
            // Ctrl-C at the prompt drops the line, as in a shell.
            Err(ReadlineError::Interrupted) => {
                eprintln!("(Ctrl-D or /bye leaves)");
                text.clear();
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
    let mut connection = crate::client::connect_for(context, model)?;
    connection.set_reply_timeout(Some(context.generation_timeout()))?;
    STOPPED.store(false, Ordering::SeqCst);
    SOCKET_FD.store(connection.raw_fd(), Ordering::SeqCst);
    let result = stream(&mut connection, &Request::Run(request));
    SOCKET_FD.store(-1, Ordering::SeqCst);
    let stopped = STOPPED.swap(false, Ordering::SeqCst);
    match result {
        _ if stopped => {
            println!();
            Ok(None)
        }
        other => other.map(Some),
    }
}

fn stream(connection: &mut crate::client::Connection, request: &Request) -> Result<String> {
    connection.send(request)?;
    let mut stdout = io::stdout().lock();
    // Progress only on a terminal; a piped conversation gets no control codes.
    let progress = io::stderr().is_terminal();
    let mut reply = String::new();
    loop {
        match connection.recv()? {
            Response::Loading { model } if progress => eprint!("\rloading {model}...\r"),
            Response::Queued { position } if progress => eprint!("\rwaiting for a slot: position {position}...\r"),
            Response::Loading { .. } | Response::Queued { .. } => {}
            Response::Token { text } => {
                if reply.is_empty() && progress {
                    eprint!("\x1b[K");
                }
                reply.push_str(&text);
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
            Response::Done(_) => {
                let _ = writeln!(stdout);
                let _ = stdout.flush();
                return Ok(reply);
            }
            Response::Error { kind, message, .. } => return Err(Error::Remote { kind, message }),
            other => return Err(Error::internal(format!("unexpected message from the daemon: {other:?}"))),
        }
    }
}

fn install_interrupt_handler() -> Result<()> {
    let installed = ctrlc::set_handler(|| {
        let fd = SOCKET_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            STOPPED.store(true, Ordering::SeqCst);
            // Wakes the blocked read; the daemon sees the hang-up and cancels upstream.
            sys::shutdown_socket(fd);
        }
    });
    match installed {
        Ok(()) | Err(ctrlc::Error::MultipleHandlers) => Ok(()),
        Err(error) => Err(Error::internal(format!("cannot install the Ctrl-C handler: {error}"))),
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
            ("/set temperature 0.5", Input::Temperature(0.5)),
        ];
        for (line, expected) in table {
            assert_eq!(parse(line), expected, "{line}");
        }
        for bad in ["/set temperature -1", "/set temperature hot", "/set top_k 3", "/system", "/frobnicate"] {
            assert!(matches!(parse(bad), Input::Bad(_)), "{bad}");
        }
    }

    #[test]
    fn the_conversation_is_sent_whole() {
        let conversation = Conversation { system: Some("s".into()), turns: vec![("q1".into(), "a1".into())] };
        let roles: Vec<String> =
            conversation.messages("q2").iter().map(|m| format!("{}:{}", m["role"], m["content"])).collect();
        assert_eq!(roles, ["\"system\":\"s\"", "\"user\":\"q1\"", "\"assistant\":\"a1\"", "\"user\":\"q2\""]);
    }
}
