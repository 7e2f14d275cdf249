//! The README's examples that use the demo model, run as a shell runs them against the
//! real llama-server: every command line in a `sh` block (and every `$ ` line of a
//! `console` block) that names `demo`, pipelines included, and the `curl` lines against
//! the `llmctl serve` the README starts. Each must end on its own, succeed, and print what
//! it should: every example has a check of its own below, so an example added to the
//! README without one fails this test until it gets one.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// The longest one example may take: the unbounded-looking ones stop at the default token
/// limit (1024 tokens, about 10 s of the demo model on two cores, more under load).
const EXAMPLE_DEADLINE: Duration = Duration::from_secs(240);

/// One example: the command line as the README has it, and for a `console` block the
/// output the README shows after it.
#[derive(Debug)]
struct Example {
    command: String,
    shown_output: Option<String>,
}

/// Whether a command line uses the demo model: `demo` as a word of the command (comments
/// aside), or as the `model` of an HTTP request.
fn uses_demo(command: &str) -> bool {
    let code = command.split(" #").next().unwrap_or(command);
    code.split_whitespace().any(|word| word == "demo") || code.contains(r#""model":"demo""#)
}

/// The shell examples of `readme`: command lines, `\` continuations joined.
fn shell_examples(readme: &str) -> Vec<Example> {
    let mut examples: Vec<Example> = Vec::new();
    let mut block: Option<&str> = None;
    let mut pending = String::new();
    let mut collecting_output = false;
    for line in readme.lines() {
        if let Some(kind) = line.strip_prefix("```") {
            block = match block {
                None => Some(if kind == "sh" || kind == "console" { kind } else { "other" }),
                Some(_) => None,
            };
            collecting_output = false;
            continue;
        }
        let command_line = match block {
            Some("sh") if pending.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) => None,
            Some("sh") => Some(line),
            Some("console") => match line.strip_prefix("$ ") {
                Some(command) => Some(command),
                None if !pending.is_empty() => Some(line),
                None => {
                    // A line the README shows as the output of the command before it.
                    if collecting_output {
                        if let Some(example) = examples.last_mut() {
                            let output = example.shown_output.get_or_insert_with(String::new);
                            output.push_str(line);
                            output.push('\n');
                        }
                    }
                    None
                }
            },
            _ => None,
        };
        let Some(command_line) = command_line else { continue };
        match command_line.strip_suffix('\\') {
            Some(start) => pending.push_str(start),
            None => {
                pending.push_str(command_line);
                let command = std::mem::take(&mut pending);
                collecting_output = false;
                if uses_demo(&command) || command.starts_with("llmctl serve ") {
                    collecting_output = block == Some("console");
                    examples.push(Example { command, shown_output: None });
                }
            }
        }
    }
    examples
}

/// What an example must print, by a phrase of its command line.
type Check = fn(&str) -> Result<(), String>;

fn checks() -> Vec<(&'static str, Check)> {
    vec![
        // Sampled, not greedy: what the model writes varies, and a one-word answer is an
        // answer; the check is that text, not an error or JSON, comes out.
        ("-n 64 demo \"Write a haiku about Unix pipes\"", |out| words(out, 1)),
        ("git diff | llmctl run -n 40 demo", |out| words(out, 1)),
        ("| head -n 5", |out| {
            let lines = out.lines().count();
            if lines > 5 {
                return Err(format!("{lines} lines through head -n 5"));
            }
            words(out, 1)
        }),
        ("jq -j", |out| {
            // `jq -r` would print each token on a line of its own; `-j` joins them.
            if out.contains("{\"type\"") {
                return Err("JSON lines, not the text".into());
            }
            let lines = out.lines().count();
            if lines > 6 {
                return Err(format!("{lines} lines for a 32-token answer: one token per line?"));
            }
            words(out, 1)
        }),
        ("| jq -r .answer", |out| match out {
            "yes\n" | "no\n" => Ok(()),
            other => Err(format!("{other:?} is not yes or no")),
        }),
        ("--grammar yes-no.gbnf", |out| match out.trim() {
            "yes" | "no" => Ok(()),
            other => Err(format!("{other:?} is not yes or no")),
        }),
        (
            "show demo --template",
            |out| {
                if out.contains("<|im_start|>") {
                    Ok(())
                } else {
                    Err("no ChatML template".into())
                }
            },
        ),
        ("show demo ", |out| {
            for field in ["architecture     llama", "quantization     Q4_1", "memory "] {
                if !out.contains(field) {
                    return Err(format!("no `{field}`"));
                }
            }
            Ok(())
        }),
        ("\"stream\":true", |out| {
            let events: Vec<&str> = out.lines().filter(|line| !line.is_empty()).collect();
            if let Some(line) = events.iter().find(|line| !line.starts_with("data: ")) {
                return Err(format!("{line:?} is not a server-sent event"));
            }
            if events.last() != Some(&"data: [DONE]") {
                return Err("the stream does not end with data: [DONE]".into());
            }
            let chunks = events.iter().filter(|line| line.contains("\"delta\"")).count();
            if chunks < 2 {
                return Err(format!("{chunks} chunks"));
            }
            Ok(())
        }),
        (".choices[0].message.content", |out| words(out, 1)),
        ("jq -r .message.content", |out| words(out, 1)),
        ("embed demo", |out| {
            let lines: Vec<&str> = out.lines().collect();
            if lines.len() != 2 {
                return Err(format!("{} lines for two texts", lines.len()));
            }
            for (index, line) in lines.iter().enumerate() {
                let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
                if value["index"] != index || value["embedding"].as_array().is_none_or(|v| v.len() != 576) {
                    return Err(format!("line {index} is not {{\"index\":{index},\"embedding\":[576 numbers]}}"));
                }
            }
            Ok(())
        }),
        // `stop` says what it did on a terminal's stderr only; stdout stays empty.
        ("stop --forget demo", |out| if out.is_empty() { Ok(()) } else { Err(format!("{out:?} on stdout")) }),
    ]
}

/// At least `n` words of text, and not a JSON document or error.
fn words(out: &str, n: usize) -> Result<(), String> {
    if out.trim_start().starts_with('{') {
        return Err("JSON instead of text".into());
    }
    let count = out.split_whitespace().count();
    if count < n {
        return Err(format!("{count} words, wanted at least {n}"));
    }
    Ok(())
}

/// Runs `command` under bash with `pipefail`, as the README's reader would, in `dir`; fails
/// the test if it does not end within the deadline.
fn run_shell(env: &Env, dir: &Path, command: &str) -> std::process::Output {
    let bin_dir = Path::new(LLMCTL).parent().unwrap();
    let mut shell = Command::new("bash");
    for (name, value) in env.command(&[]).get_envs() {
        match value {
            Some(value) => shell.env(name, value),
            None => shell.env_remove(name),
        };
    }
    let mut child = shell
        .args(["-o", "pipefail", "-c", command])
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > EXAMPLE_DEADLINE {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("{command} did not end within {EXAMPLE_DEADLINE:?}; it printed {:?}", stdout(&output));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A working directory where the examples find what they name: a git repository with an
/// uncommitted change (for `git diff`) and the grammar file the README describes.
fn working_directory(env: &Env) -> std::path::PathBuf {
    let dir = env.path("work");
    std::fs::create_dir_all(&dir).unwrap();
    let git = |args: &[&str]| {
        let output = Command::new("git")
            .args(["-c", "user.name=llmctl", "-c", "user.email=llmctl@localhost"])
            .args(args)
            .current_dir(&dir)
            .env("HOME", env.path("home"))
            .output()
            .unwrap();
        assert_success(&output);
    };
    git(&["init", "-q"]);
    std::fs::write(dir.join("greeting.sh"), "#!/bin/sh\necho hello\n").unwrap();
    git(&["add", "greeting.sh"]);
    git(&["commit", "-q", "-m", "A greeting"]);
    std::fs::write(dir.join("greeting.sh"), "#!/bin/sh\necho \"hello, $USER\"\n").unwrap();
    std::fs::write(dir.join("yes-no.gbnf"), "root ::= \"yes\" | \"no\"\n").unwrap();
    dir
}

#[test]
fn readme_examples_with_the_demo_model_work_as_written() {
    let env = Env::real();
    // `demo` is the model `llmctl setup` installs into the data directory.
    let models_dir = env.path("data/models");
    std::fs::create_dir_all(&models_dir).unwrap();
    std::os::unix::fs::symlink(demo_model(), models_dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let examples = shell_examples(&readme);
    let dir = working_directory(&env);

    // The README's `llmctl serve` runs on a free port here, and its curl lines go there.
    let serves: Vec<&Example> = examples.iter().filter(|e| e.command.starts_with("llmctl serve ")).collect();
    assert_eq!(serves.len(), 1, "one `llmctl serve` line: {serves:?}");
    let readme_address = serves[0].command.split_whitespace().last().unwrap().to_string();
    let readme_port = readme_address.rsplit(':').next().unwrap().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let serve_command = serves[0].command.replace(&readme_address, &format!("127.0.0.1:{port}"));
    let words: Vec<String> = serve_command.split_whitespace().map(str::to_string).collect();
    assert_eq!(words[0], "llmctl");
    let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    let mut serve = env.command(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_until("serve answers", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    let checks = checks();
    let mut ran = 0;
    for example in examples.iter().filter(|e| !e.command.starts_with("llmctl serve ")) {
        let command = example.command.replace(&format!("localhost:{readme_port}"), &format!("localhost:{port}"));
        let started = Instant::now();
        let output = run_shell(&env, &dir, &command);
        // Shown with --nocapture: which examples take the time.
        eprintln!("{:>6.1} s  {command}", started.elapsed().as_secs_f64());
        assert!(output.status.success(), "{command}: exit {:?}: {}", output.status.code(), stderr(&output));
        let printed = stdout(&output);
        match &example.shown_output {
            // A console block shows what the command printed on one machine. Greedy decoding
            // of the same model starts the same everywhere, but builds for other CPUs and
            // GPUs round differently and part ways a few words in (measured: the portable
            // and the native CPU build differ at the 18th word here).
            Some(shown) => {
                let start = |text: &str| text.split_whitespace().take(4).collect::<Vec<_>>().join(" ");
                assert_eq!(start(&printed), start(shown), "{command} starts as the README shows");
                assert!(printed.split_whitespace().count() >= 8, "{command} printed {printed:?}");
            }
            None => {
                let check = checks
                    .iter()
                    .find(|(phrase, _)| command.contains(phrase))
                    .unwrap_or_else(|| panic!("no check for the README example {command:?}: add one to readme.rs"));
                if let Err(problem) = (check.1)(&printed) {
                    panic!("{command}: {problem}; it printed {printed:?}");
                }
            }
        }
        ran += 1;
    }
    assert!(ran >= 10, "{examples:?}");
    let _ = Command::new("kill").args(["-INT", &serve.id().to_string()]).status();
    let _ = serve.wait();
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn the_readme_examples_are_found_as_a_shell_reads_them() {
    let readme = "```console\n$ llmctl run -n 4 demo \"Hi\"\nHello there\n```\n\
                  ```sh\n# a comment naming demo\ngit diff | llmctl run demo \"Say\" \\\n  \"more\"\n\
                  llmctl run other.gguf hi   # not the demo\n\
                  curl -N localhost:8080/v1/chat/completions -d '{\"model\":\"demo\"}'\n```\n\
                  ```toml\nmodel = \"demo\"\n```\n";
    let examples = shell_examples(readme);
    let commands: Vec<&str> = examples.iter().map(|e| e.command.as_str()).collect();
    assert_eq!(
        commands,
        [
            "llmctl run -n 4 demo \"Hi\"",
            "git diff | llmctl run demo \"Say\"   \"more\"",
            "curl -N localhost:8080/v1/chat/completions -d '{\"model\":\"demo\"}'"
        ]
    );
    assert_eq!(examples[0].shown_output.as_deref(), Some("Hello there\n"));
    assert_eq!(examples[1].shown_output, None);
}
