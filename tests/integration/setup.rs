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
