//! Files llmctl does not control: crafted GGUF headers, a FIFO where a model should be,
//! escape sequences in metadata and file names. Each must get its documented exit code
//! quickly and leave nothing behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::catalog::ls_json;
use crate::support::*;

/// How long a refusal may take: bad input is answered in well under a second; the bound
/// leaves room for a loaded machine and fails a hang rather than waiting on it forever.
const QUICKLY: Duration = Duration::from_secs(10);

/// Runs llmctl and fails the test when it takes longer than [`QUICKLY`] (the process is
/// killed first, so a hang never outlives the test).
fn run_quickly(env: &Env, args: &[&str]) -> Output {
    let mut child = env.spawn(args);
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > QUICKLY {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("llmctl {args:?} took more than {QUICKLY:?}; stderr: {}", stderr(&output));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A GGUF header with no tensors and one key `x` holding `value` (its type, then its bytes).
fn header_with(value: &[u8]) -> Vec<u8> {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.push(b'x');
    bytes.extend(value);
    bytes
}

/// An array of `element_type` claiming `len` elements, as a value (type 9 first).
fn array(element_type: u32, len: u64) -> Vec<u8> {
    let mut bytes = 9u32.to_le_bytes().to_vec();
    bytes.extend(element_type.to_le_bytes());
    bytes.extend(len.to_le_bytes());
    bytes
}

/// Crafted headers: arrays nested a million deep (a stack overflow for a recursive
/// reader), and counts no file of that size can hold.
fn crafted_models(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut nested = array(9, 1);
    for _ in 0..1_000_000 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    let mut huge_tensors = header_with(&8u32.to_le_bytes());
    huge_tensors[8..16].copy_from_slice(&(1u64 << 19).to_le_bytes());
    huge_tensors.extend(0u64.to_le_bytes());
    let files = [
        ("nested.gguf", header_with(&nested), "nested more than 8 deep"),
        ("huge-array.gguf", header_with(&array(8, 1 << 24)), "needs more bytes than the file holds"),
        ("endless-array.gguf", header_with(&array(0, u64::MAX)), "array of 18446744073709551615 elements"),
        ("huge-tensors.gguf", huge_tensors, "more than the file holds"),
    ];
    files
        .into_iter()
        .map(|(name, bytes, reason)| {
            let path = dir.join(name);
            fs::write(&path, bytes).unwrap();
            (path, reason)
        })
        .collect()
}

#[test]
fn crafted_headers_are_bad_models_for_ls_show_and_a_running_daemon() {
    let env = Env::fake();
    let models = env.path("data/models");
    fs::create_dir_all(&models).unwrap();
    let crafted = crafted_models(&models);

    let listed = ls_json(&env);
    for (path, reason) in &crafted {
        let name = path.file_name().unwrap().to_str().unwrap();
        let entry = listed.iter().find(|model| model["name"] == name).unwrap_or_else(|| panic!("{listed:?}"));
        assert!(entry["error"].as_str().unwrap().contains(reason), "{entry}");
        let output = run_quickly(&env, &["show", path.to_str().unwrap()]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains(reason), "{}", stderr(&output));
        // No daemon runs yet: the client reads the header itself.
        assert_exit(&run_quickly(&env, &["run", path.to_str().unwrap(), "hi"]), 65);
    }
    assert_success(&run_quickly(&env, &["ls"]));
    assert!(!env.socket().exists(), "nothing so far starts a daemon");

    // With a daemon running, the daemon reads the header: it refuses and serves on.
    let tiny = env.tiny_model("tiny.gguf");
    assert_success(&env.run(&["run", tiny.to_str().unwrap(), "hi"]));
    let daemon = env.daemon_pid().expect("a daemon runs");
    for (path, reason) in &crafted {
        let output = run_quickly(&env, &["run", path.to_str().unwrap(), "hi"]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains(reason), "{}", stderr(&output));
    }
    assert_success(&run_quickly(&env, &["status"]));
    assert_eq!(env.daemon_pid(), Some(daemon), "the same daemon answers");
    assert!(alive(daemon));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn a_fifo_named_like_a_model_is_refused_at_once_and_the_daemon_lives() {
    let env = Env::fake();
    let models = env.path("data/models");
    fs::create_dir_all(&models).unwrap();
    let fifo = models.join("x.gguf");
    mkfifo(&fifo);
    // An alias to it too: `ls` reads an alias's header.
    env.write_config(&format!("[models.piped]\npath = \"{}\"\n", fifo.display()));
    let fifo_arg = fifo.to_str().unwrap();

    let output = run_quickly(&env, &["ls", "--json"]);
    assert_success(&output);
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let piped = listed.as_array().unwrap().iter().find(|model| model["name"] == "piped").unwrap();
    assert!(piped["error"].as_str().unwrap().contains("it is a FIFO, not a model file"), "{listed}");
    let output = run_quickly(&env, &["ls"]);
    assert_success(&output);
    assert!(stdout(&output).contains("piped: it is a FIFO, not a model file"), "{}", stdout(&output));

    for name in ["x.gguf", "piped", fifo_arg] {
        let output = run_quickly(&env, &["show", name]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains("FIFO"), "{name}: {}", stderr(&output));
    }
    assert_exit(&run_quickly(&env, &["run", "x.gguf", "hi"]), 65);
    assert!(!env.socket().exists(), "a refused model starts no daemon");

    let tiny = env.tiny_model("tiny.gguf");
    assert_success(&env.run(&["run", tiny.to_str().unwrap(), "hi"]));
    let daemon = env.daemon_pid().expect("a daemon runs");
    for name in ["x.gguf", "piped", fifo_arg] {
        let output = run_quickly(&env, &["run", name, "hi"]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains("FIFO"), "{name}: {}", stderr(&output));
    }
    let output = run_quickly(&env, &["status"]);
    assert_success(&output);
    assert_eq!(env.daemon_pid(), Some(daemon));
    // The daemon still serves, on a thread not stuck in an open().
    assert_success(&run_quickly(&env, &["run", tiny.to_str().unwrap(), "hi"]));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// True when `bytes` holds a byte a terminal acts on: ESC, BEL, or another C0 control
/// except the newline between lines.
fn has_control_bytes(bytes: &[u8]) -> bool {
    bytes.iter().any(|&byte| (byte < 0x20 && byte != b'\n') || byte == 0x7f)
}

#[test]
fn escape_sequences_in_headers_and_file_names_never_reach_the_terminal() {
    let env = Env::fake();
    let models = env.path("data/models");
    fs::create_dir_all(&models).unwrap();
    let evil_name = "evil\x1b[31m.gguf";
    let title = "\x1b]0;pwned\x07";
    let model = models.join(evil_name);
    llmctl::tiny_model::write_with_strings(
        &model,
        &[
            ("general.name", title),
            ("general.author", "author\x1b[2J"),
            ("general.license", "licence\r\nforged: line"),
            ("tokenizer.chat_template", "{{ messages }}\n\x1b[8mhidden\x1b[0m\n"),
        ],
    )
    .unwrap();

    let output = env.run(&["ls"]);
    assert_success(&output);
    assert!(!has_control_bytes(&output.stdout), "{:?}", stdout(&output));
    assert!(stdout(&output).contains("evil\\x1b[31m.gguf"), "{}", stdout(&output));
    let output = env.run(&["ls", "--names"]);
    assert!(!has_control_bytes(&output.stdout), "{:?}", stdout(&output));
    // JSON carries the name as it is, escaped by JSON itself.
    assert_eq!(ls_json(&env)[0]["name"], evil_name);

    let output = env.run(&["show", evil_name]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(!has_control_bytes(&output.stdout), "{text:?}");
    for shown in ["\\x1b]0;pwned\\x07", "author\\x1b[2J", "licence\\x0d\\x0aforged: line", "evil\\x1b[31m.gguf"] {
        assert!(text.contains(shown), "{shown} in {text}");
    }
    let output = env.run(&["show", "--template", evil_name]);
    assert_success(&output);
    assert_eq!(stdout(&output), "{{ messages }}\n\\x1b[8mhidden\\x1b[0m\n", "lines kept, escapes shown");
    let output = env.run(&["show", "--json", evil_name]);
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["general_name"], title);

    // Error messages name the file: escaped too.
    let missing = env.path("missing\x1b]0;pwned\x07.gguf");
    let output = env.run(&["show", missing.to_str().unwrap()]);
    assert_exit(&output, 66);
    assert!(!has_control_bytes(&output.stderr), "{:?}", stderr(&output));
    assert!(stderr(&output).contains("missing\\x1b]0;pwned\\x07.gguf"), "{}", stderr(&output));

    // A loaded instance keeps the file's name: `ps` and `status` escape it.
    assert_success(&env.run(&["warm", evil_name]));
    for args in [&["ps"][..], &["status"][..]] {
        let output = env.run(args);
        assert_success(&output);
        assert!(!has_control_bytes(&output.stdout), "{args:?}: {:?}", stdout(&output));
        assert!(stdout(&output).contains("evil\\x1b[31m.gguf"), "{args:?}: {}", stdout(&output));
    }
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}
