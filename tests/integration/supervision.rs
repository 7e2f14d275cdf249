//! Supervision against the fake llama-server: crashes, stalls, stubborn children, killed
//! daemons, stale sockets, and protocol abuse. Each test asserts what the user sees and
//! that nothing is left behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;

use crate::support::*;

fn model_with_args(env: &Env, name: &str, args: &[&str]) -> String {
    let path = env.tiny_model(&format!("{name}.gguf"));
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    let config_path = env.path("config.toml");
    let mut config = std::fs::read_to_string(&config_path).unwrap_or_default();
    config += &format!(
        "[models.{name}]\npath = \"{}\"\nargs = [{}]\n",
        path.display(),
        args.join(", ")
    );
    std::fs::write(config_path, config).unwrap();
    name.to_string()
}

#[test]
fn child_dying_while_loading_fails_at_once_with_its_output() {
    let env = Env::fake();
    // A generous load timeout: the failure must come from the exit, not from a deadline.
    env.write_config("load_timeout = 600\n");
    let model = model_with_args(&env, "broken", &["--fake-crash-at-start"]);
    let output = env.run(&["run", &model, "hi"]);
    assert_exit(&output, 70);
    let err = stderr(&output);
    assert!(err.contains("exited with status 3"), "{err}");
    assert!(err.contains("failed to load the model on purpose"), "{err}");
    let status = env.status_json();
    assert_eq!(status["instances"][0]["state"], "failed");
    assert!(status["instances"][0]["pid"].is_null());
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn crash_mid_stream_reports_the_signal_and_the_next_request_restarts() {
    let env = Env::fake();
    let model = model_with_args(&env, "crashy", &["--fake-crash-after", "2"]);
    let output = env.run(&["run", &model, "one two three four"]);
    assert_exit(&output, 70);
    assert_eq!(
        stdout(&output),
        "one two ",
        "tokens before the crash reach the user"
    );
    let err = stderr(&output);
    assert!(err.contains("SIGABRT"), "{err}");
    assert!(err.contains("crashing mid-stream on purpose"), "{err}");
    assert_eq!(env.status_json()["instances"][0]["state"], "failed");

    let output = env.run(&["run", &model, "short"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "short");
    assert_eq!(env.status_json()["instances"][0]["restarts"], 1);
}

#[test]
fn concurrent_requests_share_one_slow_load() {
    let env = Env::fake();
    let model = model_with_args(&env, "slow", &["--fake-start-ms", "700"]);
    let children: Vec<_> = (0..4)
        .map(|i| env.spawn(&["run", &model, &format!("client{i}")]))
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert_success(&output);
        assert_eq!(stdout(&output), format!("client{i}"));
    }
    assert_eq!(
        env.instance_log()
            .matches("fake llama-server starting")
            .count(),
        1,
        "one load for all"
    );
    assert_eq!(env.status_json()["instances"][0]["requests"], 4);
}

#[test]
fn a_child_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let mut env = Env::fake();
    env.set("LLMCTL_STOP_GRACE_MS", "300");
    let model = model_with_args(&env, "stubborn", &["--fake-ignore-term"]);
    assert_success(&env.run(&["warm", &model]));
    let pid = env.status_json()["instances"][0]["pid"].as_u64().unwrap() as u32;
    assert_success(&env.run(&["stop", &model]));
    assert!(!alive(pid), "the stubborn child survived stop");
    assert_success(&env.run(&["warm", &model]));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn stopping_kills_the_whole_process_group() {
    let env = Env::fake();
    let model = model_with_args(&env, "forking", &["--fake-grandchild"]);
    assert_success(&env.run(&["warm", &model]));
    let log = env.instance_log();
    let grandchild: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("fake grandchild pid "))
        .and_then(|p| p.trim().parse().ok())
        .expect("the fake logs its grandchild");
    assert!(alive(grandchild));
    assert_success(&env.run(&["stop", "--all"]));
    wait_until("the grandchild is gone", || !alive(grandchild));
}

#[test]
fn a_stalled_child_times_out_with_124_and_is_restarted() {
    let env = Env::fake();
    env.write_config("token_timeout = 1\n");
    let model = model_with_args(&env, "stalled", &["--fake-stall"]);
    let output = env.run(&["run", &model, "hi"]);
    assert_exit(&output, 124);
    assert!(
        stderr(&output).contains("token_timeout"),
        "{}",
        stderr(&output)
    );
    wait_until("the stalled child is stopped", || {
        env.status_json()["instances"][0]["state"] == "stopped"
    });
}

#[test]
fn sigkilled_daemon_takes_its_children_along() {
    let env = Env::fake();
    let first = env.tiny_model("a.gguf").display().to_string();
    let second = env.tiny_model("b.gguf").display().to_string();
    assert_success(&env.run(&["warm", &first]));
    assert_success(&env.run(&["warm", &second]));
    let daemon = env.daemon_pid().unwrap();
    let children: Vec<u32> = env.status_json()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(children.len(), 2);
    assert!(Command::new("kill")
        .args(["-KILL", &daemon.to_string()])
        .status()
        .unwrap()
        .success());
    for child in children {
        wait_until("the child dies with its daemon", || !alive(child));
    }
    env.assert_nothing_survives();

    // The socket left behind is stale; the next command recovers it.
    assert!(env.socket().exists());
    let output = env.run(&["run", &first, "recovered"]);
    assert_eq!(stdout(&output), "recovered");
}

#[test]
fn leftovers_in_the_state_file_are_killed_only_if_still_the_same_process() {
    let env = Env::fake();
    std::fs::create_dir_all(env.path("state")).unwrap();
    let mut leftover = Command::new("sleep").arg("600").spawn().unwrap();
    let start_time = start_time(leftover.id());
    let mut bystander = Command::new("sleep").arg("600").spawn().unwrap();
    let state = serde_json::json!({
        "daemon_pid": 1,
        "children": [
            {"pid": leftover.id(), "start_time": start_time, "model": "x"},
            // Same pid as a live process but another start time: a reused pid.
            {"pid": bystander.id(), "start_time": start_time + 1, "model": "y"},
        ]
    });
    std::fs::write(env.path("state/state.json"), state.to_string()).unwrap();
    assert_success(&env.run(&["status"]));
    wait_until("the leftover is killed", || {
        leftover.try_wait().unwrap().is_some()
    });
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a reused pid was killed"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(19).unwrap().parse().unwrap()
}

#[test]
fn second_daemon_refuses_and_stale_sockets_are_replaced() {
    let env = Env::fake();
    // A socket file nobody listens on, as a crashed daemon leaves it.
    drop(UnixListener::bind(env.socket()).unwrap());
    assert!(env.socket().exists());
    assert_success(&env.run(&["status"]));

    let output = env.run(&["daemon"]);
    assert_exit(&output, 69);
    assert!(
        stderr(&output).contains("already serves"),
        "{}",
        stderr(&output)
    );

    let dir_mode = std::fs::metadata(env.path("run"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    let socket_mode = std::fs::metadata(env.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!((dir_mode, socket_mode), (0o700, 0o600));
}

#[test]
fn foreground_daemon_stops_children_on_sigterm() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf").display().to_string();
    let mut daemon = env.spawn(&["daemon"]);
    wait_until("the daemon listens", || {
        UnixStream::connect(env.socket()).is_ok()
    });
    assert_success(&env.run(&["warm", &model]));
    let child = env.status_json()["instances"][0]["pid"].as_u64().unwrap() as u32;
    assert!(Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!alive(child));
    assert!(!env.socket().exists());
    env.assert_nothing_survives();
}

fn read_reply(stream: &UnixStream) -> Option<serde_json::Value> {
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => serde_json::from_str(&line).ok(),
    }
}

#[test]
fn protocol_abuse_gets_an_error_and_harms_no_one() {
    let env = Env::fake();
    assert_success(&env.run(&["status"]));
    let connect = || {
        let stream = UnixStream::connect(env.socket()).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream
    };

    let mut garbage = connect();
    garbage.write_all(b"\x00\xffnot json at all\n").unwrap();
    let reply = read_reply(&garbage).expect("an error reply");
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["kind"], "usage");

    let mut wrong_version = connect();
    wrong_version
        .write_all(b"{\"type\":\"hello\",\"version\":999}\n")
        .unwrap();
    let reply = read_reply(&wrong_version).expect("an error reply");
    assert!(
        reply["message"].as_str().unwrap().contains("protocol"),
        "{reply}"
    );

    let mut wrong_shape = connect();
    wrong_shape
        .write_all(b"{\"type\":\"hello\",\"version\":1}\n{\"type\":\"run\",\"prompt\":5}\n")
        .unwrap();
    let mut reader = BufReader::new(wrong_shape.try_clone().unwrap());
    let mut hello = String::new();
    reader.read_line(&mut hello).unwrap();
    let mut error = String::new();
    reader.read_line(&mut error).unwrap();
    assert!(error.contains("\"error\""), "{error}");

    // A line over the cap: the daemon answers or hangs up, and never buffers it all.
    let mut huge = connect();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..20 {
        if huge.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut rest = Vec::new();
    let _ = huge.read_to_end(&mut rest);

    // Half a line, then silence: the daemon closes the connection after its timeout.
    let mut stalled = connect();
    stalled.write_all(b"{\"type\":\"hel").unwrap();
    let mut buffer = Vec::new();
    let read = stalled.read_to_end(&mut buffer);
    assert!(
        read.is_ok(),
        "the stalled connection is closed, not left hanging: {read:?}"
    );

    // Meanwhile everyone else is served.
    assert_success(&env.run(&["status"]));
    let model = env.tiny_model("m.gguf").display().to_string();
    assert_eq!(
        stdout(&env.run(&["run", &model, "still serving"])),
        "still serving"
    );
}
