//! `llmctl chat` (and `run` at a terminal without a prompt) under a pseudo-terminal: a
//! small Python harness (`pty` module) runs llmctl on a pty, types lines, and waits for
//! what should appear, with a deadline for each step.

use std::process::Command;

use serde_json::{json, Value};

use crate::support::*;

/// Runs the harness steps against `llmctl ARGS` on a pty; returns the exit code and the
/// transcript. A step is `("expect", TEXT)` (wait until TEXT appears after the previous
/// match) or `("send", KEYS)`.
const HARNESS: &str = r#"
import json, os, pty, select, sys, time
argv, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
buf, pos = b"", 0
def read_some(deadline):
    global buf
    ready, _, _ = select.select([fd], [], [], max(0, deadline - time.time()))
    if ready:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            return False
        buf += data
    return True
def fail(why):
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    sys.stdout.write(buf.decode(errors="replace") + "\n[" + why + "]\n")
    sys.exit(99)
for kind, value in steps:
    if kind == "expect":
        deadline, needle = time.time() + 60, value.encode()
        while buf.find(needle, pos) < 0:
            if time.time() > deadline or not read_some(deadline):
                fail("no %r" % value)
        pos = buf.find(needle, pos) + len(needle)
    else:
        os.write(fd, value.encode())
deadline = time.time() + 30
while time.time() < deadline and read_some(deadline):
    pass
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.time() > deadline:
        fail("llmctl did not exit")
    time.sleep(0.01)
sys.stdout.write(buf.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;

pub(crate) fn on_pty(env: &Env, args: &[&str], steps: &[(&str, &str)]) -> (i32, String) {
    let template = env.command(&[]);
    let mut command = Command::new("python3");
    for (name, value) in template.get_envs() {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    let argv: Vec<&str> = std::iter::once(LLMCTL).chain(args.iter().copied()).collect();
    let steps: Vec<Value> = steps.iter().map(|(kind, value)| json!([kind, value])).collect();
    let output = command
        .arg("-c")
        .arg(HARNESS)
        .arg(serde_json::to_string(&argv).unwrap())
        .arg(serde_json::to_string(&steps).unwrap())
        .output()
        .expect("python3 runs the pty harness");
    (output.status.code().unwrap_or(-1), format!("{}{}", stdout(&output), stderr(&output)))
}

fn recorded(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn chat_keeps_the_conversation_and_takes_commands() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    let model = env.tiny_model("tiny.gguf");
    let steps = [
        ("expect", ">>> "),
        ("send", "/system be brief\r"),
        ("expect", ">>> "),
        ("send", "hello there\r"),
        ("expect", ">>> "),
        ("send", "/set temperature 0.5\r"),
        ("expect", ">>> "),
        ("send", "second turn\r"),
        ("expect", ">>> "),
        ("send", "/clear\r"),
        ("expect", ">>> "),
        ("send", "/nonsense\r"),
        ("expect", "unknown command"),
        ("expect", ">>> "),
        ("send", "after clear\r"),
        ("expect", ">>> "),
        ("send", "/bye\r"),
    ];
    let (code, transcript) = on_pty(&env, &["chat", model.to_str().unwrap()], &steps);
    assert_eq!(code, 0, "{transcript}");

    let requests: Vec<Value> = recorded(&record).iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(requests.len(), 3, "{requests:?}");
    let system = json!({"role": "system", "content": "be brief"});
    assert_eq!(requests[0]["messages"], json!([system, {"role": "user", "content": "hello there"}]));
    assert_eq!(
        requests[1]["messages"],
        json!([
            system,
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "second turn"}
        ]),
        "the whole conversation goes with each turn"
    );
    assert_eq!(requests[1]["temperature"], 0.5);
    assert_eq!(requests[2]["messages"], json!([system, {"role": "user", "content": "after clear"}]));
    let history = std::fs::read_to_string(env.path("state/chat_history")).unwrap();
    assert!(history.contains("second turn"), "{history}");

    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn ctrl_c_stops_the_answer_and_ctrl_d_leaves() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!(
        "[models.slow]\npath = \"{}\"\nargs = [\"--fake-token-ms\", \"300\"]\n",
        model.display()
    ));
    let words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omega";
    let typed = format!("{words}\r");
    let steps = [
        ("expect", ">>> "),
        ("send", typed.as_str()),
        // The echo of the typed line, then the first word of the answer.
        ("expect", "omega"),
        ("expect", "alpha"),
        ("send", "\x03"),
        ("expect", "(stopped)"),
        ("expect", ">>> "),
        ("send", "\x04"),
    ];
    let started = std::time::Instant::now();
    let (code, transcript) = on_pty(&env, &["run", "slow"], &steps);
    assert_eq!(code, 0, "{transcript}");
    assert!(!transcript.contains("lambda omega\r\n>>>"), "the answer was not cut: {transcript}");
    assert!(started.elapsed() < std::time::Duration::from_secs(12 * 300 / 1000 + 30));
    wait_until("the fake server saw the client go", || recorded(&record).iter().any(|l| l == "cancelled"));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn chat_with_the_real_demo_model() {
    let env = Env::real();
    let model = demo_model();
    let steps = [
        ("expect", ">>> "),
        ("send", "My name is Ada. Say hello to me.\r"),
        ("expect", ">>> "),
        ("send", "What is my name?\r"),
        ("expect", ">>> "),
        ("send", "/bye\r"),
    ];
    let (code, transcript) = on_pty(&env, &["chat", "-n", "24", "--temperature", "0", model.to_str().unwrap()], &steps);
    assert_eq!(code, 0, "{transcript}");
    let answers: Vec<&str> = transcript.split(">>> ").collect();
    assert_eq!(answers.len(), 4, "{transcript}");
    for answer in &answers[1..3] {
        let lines: Vec<&str> = answer.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 2, "an answer after the typed line: {answer:?}");
    }
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_piped_chat_reads_lines_and_writes_only_answers() {
    let env = Env::fake();
    let model = env.tiny_model("tiny.gguf");
    let output = env.run_with_stdin(&["chat", model.to_str().unwrap()], "hello world\n/clear\nagain\n");
    assert_success(&output);
    assert_eq!(stdout(&output), "hello world\nagain\n");
    assert!(!stderr(&output).contains('\x1b'), "no control codes on a pipe: {:?}", stderr(&output));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn run_on_a_terminal_ends_its_text_with_a_newline() {
    let env = Env::fake();
    let model = env.tiny_model("tiny.gguf");
    // The fake echoes the prompt, which ends without a newline.
    let (code, transcript) = on_pty(&env, &["run", model.to_str().unwrap(), "one two three"], &[]);
    assert_eq!(code, 0, "{transcript}");
    assert!(transcript.ends_with("one two three\r\n"), "{transcript:?}");
    // Piped, the text is exactly what was generated.
    assert_eq!(stdout(&env.run(&["run", model.to_str().unwrap(), "one two three"])), "one two three");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn ctrl_c_during_run_on_a_terminal_leaves_a_fresh_line() {
    let env = Env::fake();
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!(
        "[models.slow]\npath = \"{}\"\nargs = [\"--fake-token-ms\", \"300\"]\n",
        model.display()
    ));
    let steps = [("expect", "alpha"), ("send", "\x03")];
    let (code, transcript) = on_pty(&env, &["run", "slow", "alpha beta gamma delta epsilon zeta eta theta"], &steps);
    assert_eq!(code, 130, "{transcript:?}");
    assert!(!transcript.contains("theta"), "the answer was not cut: {transcript:?}");
    assert!(transcript.ends_with('\n'), "{transcript:?}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn chat_takes_ollamas_commands_quoted_messages_and_lines_typed_ahead() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!(
        "[models.slow]\npath = \"{}\"\nargs = [\"--fake-token-ms\", \"150\"]\n",
        model.display()
    ));
    let steps = [
        ("expect", ">>> "),
        ("send", "/set parameter top_k 7\r"),
        ("expect", "(top_k 7)"),
        ("send", "/set parameter stop END\r"),
        ("expect", "(stop END)"),
        ("send", "/set parameter num_predict 6\r"),
        ("expect", "(num_predict 6)"),
        ("send", "/set parameter seed 42\r"),
        ("expect", "(seed 42)"),
        ("send", "/system be brief\r"),
        ("expect", "(system message set)"),
        ("send", "/show parameters\r"),
        ("expect", "top_k           7"),
        ("send", "/show system\r"),
        ("expect", "be brief"),
        ("send", "/show info\r"),
        ("expect", "architecture    llama"),
        ("expect", ">>> "),
        // A message of several lines, one of them starting with `/`.
        ("send", "\"\"\"\rline one\r/line two\r\"\"\"\r"),
        ("expect", "/line two"),
        ("expect", ">>> "),
        // A line typed while the answer streams is the next question.
        ("send", "alpha beta gamma delta\r"),
        ("expect", "delta"),
        ("expect", "alpha"),
        ("send", "typed ahead\r"),
        // The terminal's echo, the line editor's, then the answer.
        ("expect", "typed ahead"),
        ("expect", "typed ahead"),
        ("expect", "typed ahead"),
        ("expect", ">>> "),
        // Lines pasted in one burst are each a question.
        ("send", "first burst\rsecond burst\r"),
        ("expect", "second burst"),
        ("expect", "second burst"),
        ("expect", ">>> "),
        ("send", "/bye\r"),
    ];
    let (code, transcript) = on_pty(&env, &["chat", "slow"], &steps);
    assert_eq!(code, 0, "{transcript}");

    let requests: Vec<Value> = recorded(&record).iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let asked: Vec<&str> = requests
        .iter()
        .map(|request| request["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap())
        .collect();
    assert_eq!(asked, ["line one\n/line two", "alpha beta gamma delta", "typed ahead", "first burst", "second burst"]);
    let first = &requests[0];
    assert_eq!(first["messages"][0], json!({"role": "system", "content": "be brief"}));
    assert_eq!((first["top_k"].clone(), first["seed"].clone()), (json!(7), json!(42)));
    assert_eq!((first["max_tokens"].clone(), first["stop"].clone()), (json!(6), json!(["END"])));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}
