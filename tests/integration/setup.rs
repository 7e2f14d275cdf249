//! Setting up on a fresh machine: errors in what the user typed come before any set-up,
//! concurrent first uses share one set-up under a lock, and a llama-server that hangs when
//! asked its version never blocks a command. No test here builds llama-server: where a
//! set-up could start, the tools it needs are left out so it would fail at once, and the
//! test checks that it never started.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;

/// Writes an executable shell script at `path`.
fn write_script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A llama-server that never answers `--version`: it starts a `sleep` and waits for it,
/// leaving the sleep's pid in `DIR/sleep.pids` so the test can check it was killed too.
fn hanging_llama_server(env: &Env) -> PathBuf {
    let path = env.path("hanging/llama-server");
    let pids = env.path("sleep.pids");
    write_script(&path, &format!("sleep 1000 &\necho $! >> {}\nwait", pids.display()));
    path
}

fn sleepers_of(env: &Env) -> Vec<u32> {
    std::fs::read_to_string(env.path("sleep.pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

#[test]
fn a_llama_server_that_hangs_on_version_never_blocks_a_command() {
    let mut env = Env::fake();
    let hanging = hanging_llama_server(&env);
    env.set("LLMCTL_LLAMA_SERVER", hanging.to_str().unwrap());
    for args in [&["--version"][..], &["setup", "--no-model"][..]] {
        let started = Instant::now();
        let output = env.run(args);
        let took = started.elapsed();
        assert_success(&output);
        let said = stdout(&output) + &stderr(&output);
        assert!(said.contains("did not answer --version"), "{args:?}: {said}");
        assert!(took < Duration::from_secs(9), "{args:?} took {took:?}: the deadline is 5 s");
    }
    let sleepers = sleepers_of(&env);
    assert_eq!(sleepers.len(), 2, "each --version started its sleep: {sleepers:?}");
    for pid in sleepers {
        wait_until(&format!("the hanging llama-server's sleep {pid} is killed"), || !alive(pid));
    }
    env.assert_nothing_survives();
}

/// A command in a fresh environment with setup on first use on: no llama-server named or
/// on PATH, none installed, no demo model, and no compiler, so a set-up that starts fails
/// at once with "no C++ compiler" (exit 69).
fn first_use_command(env: &Env, args: &[&str]) -> std::process::Command {
    let bin = tools_without_a_compiler(env);
    let mut command = env.command(args);
    command
        .env_remove("LLMCTL_NO_SETUP")
        .env_remove("LLMCTL_LLAMA_SERVER")
        .env("PATH", bin)
        .current_dir(env.dir.path());
    command
}

#[test]
fn what_the_user_typed_is_checked_before_any_set_up() {
    let env = Env::with_server(Path::new("/nonexistent"));
    std::fs::write(env.path("README.md"), "# not a model\n").unwrap();
    let table: [(&[&str], i32, &str); 8] = [
        (&["run", "dmeo", "hi"], 66, "did you mean `demo`?"),
        (&["run", "llama3.2", "hi"], 66, "unknown model `llama3.2`"),
        (&["run", "./missing.gguf", "hi"], 66, "missing.gguf does not exist"),
        (&["run", "README.md", "hi"], 65, "README.md is not a usable GGUF model"),
        (&["warm", "dmeo"], 66, "did you mean `demo`?"),
        (&["switch", "dmeo"], 66, "did you mean `demo`?"),
        (&["chat", "README.md"], 65, "not a usable GGUF model"),
        (&["run", "-s", "no-such-schema.json", "demo", "hi"], 66, "no-such-schema.json"),
    ];
    for (args, code, message) in table {
        let started = Instant::now();
        let output = first_use_command(&env, args).output().unwrap();
        let took = started.elapsed();
        assert_exit(&output, code);
        let err = stderr(&output);
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(!err.contains("setting up") && !err.contains("C++ compiler"), "{args:?} started a set-up: {err}");
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
    }
    assert!(!env.path("cache/llama.cpp-b11434").exists(), "no build was started");
    assert!(!env.path("data/llama.cpp").exists() && !env.path("data/models").exists(), "nothing was installed");
    assert!(!env.socket().exists(), "no daemon was started");

    // A good model file in the same environment does start the set-up, which fails at once
    // here for want of a compiler: the checks above are what kept it from starting.
    let model = env.tiny_model("tiny.gguf");
    let output = first_use_command(&env, &["run", model.to_str().unwrap(), "hi"]).output().unwrap();
    assert_exit(&output, 69);
    let err = stderr(&output);
    assert!(err.contains("first use: setting up") && err.contains("no C++ compiler"), "{err}");
    env.assert_nothing_survives();
}
