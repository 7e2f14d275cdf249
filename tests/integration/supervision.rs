//! Supervision against the fake llama-server: crashes, stalls, stubborn children, killed
//! daemons, stale sockets, and protocol abuse. Each test asserts what the user sees and
//! that nothing is left behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;

use crate::support::*;

fn model_with_args(env: &Env, name: &str, args: &[&str]) -> String {
    env.add_model(name, args, "")
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
    // The worker publishes what it saw right after it told the client.
    wait_until("status shows the failure", || env.status_json()["instances"][0]["state"] == "failed");
    assert!(env.status_json()["instances"][0]["pid"].is_null());
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn crash_mid_stream_reports_the_signal_and_the_next_request_restarts() {
    let env = Env::fake();
    let model = model_with_args(&env, "crashy", &["--fake-crash-after", "2"]);
    let output = env.run(&["run", &model, "one two three four"]);
    assert_exit(&output, 70);
    assert_eq!(stdout(&output), "one two ", "tokens before the crash reach the user");
    let err = stderr(&output);
    assert!(err.contains("SIGABRT"), "{err}");
    assert!(err.contains("crashing mid-stream on purpose"), "{err}");
    wait_until("status shows the crash", || env.status_json()["instances"][0]["state"] == "failed");

    let output = env.run(&["run", &model, "short"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "short");
    assert_eq!(env.status_json()["instances"][0]["restarts"], 1);
}

#[test]
fn concurrent_requests_share_one_slow_load() {
    let env = Env::fake();
    let model = model_with_args(&env, "slow", &["--fake-start-ms", "700"]);
    let children: Vec<_> = (0..4).map(|i| env.spawn(&["run", &model, &format!("client{i}")])).collect();
    for (i, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert_success(&output);
        assert_eq!(stdout(&output), format!("client{i}"));
    }
    assert_eq!(env.instance_log().matches("fake llama-server starting").count(), 1, "one load for all");
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
    assert!(stderr(&output).contains("token_timeout"), "{}", stderr(&output));
    assert!(stderr(&output).contains("the next request loads it again"), "{}", stderr(&output));
    wait_until("the stalled child is stopped", || env.status_json()["instances"][0]["state"] == "stopped");
}

#[test]
fn sigkilled_daemon_takes_its_children_along() {
    let env = Env::fake();
    let first = env.tiny_model("a.gguf").display().to_string();
    let second = env.tiny_model("b.gguf").display().to_string();
    assert_success(&env.run(&["warm", &first]));
    assert_success(&env.run(&["warm", &second]));
    let daemon = env.daemon_pid().unwrap();
    let children: Vec<u32> =
        env.status_json()["instances"].as_array().unwrap().iter().map(|i| i["pid"].as_u64().unwrap() as u32).collect();
    assert_eq!(children.len(), 2);
    assert!(Command::new("kill").args(["-KILL", &daemon.to_string()]).status().unwrap().success());
    for child in children {
        wait_until("the child dies with its daemon", || !alive(child));
    }
    env.assert_nothing_survives();

    // The socket left behind is stale; the next command recovers it.
    assert!(env.socket().exists());
    let output = env.run(&["run", &first, "recovered"]);
    let log = std::fs::read_to_string(env.path("state/daemon.log")).unwrap_or_default();
    assert_eq!(stdout(&output), "recovered", "{}\nthe daemon's log:\n{log}", stderr(&output));
}

#[test]
fn leftovers_in_the_state_file_are_killed_only_if_still_the_same_process() {
    let env = Env::fake();
    std::fs::create_dir_all(env.path("state")).unwrap();
    let mut leftover = Command::new("sleep").arg("600").spawn().unwrap();
    let leftover_start = start_time(leftover.id());
    let mut bystander = Command::new("sleep").arg("600").spawn().unwrap();
    let state = serde_json::json!({
        "daemon_pid": 1,
        "children": [
            {"pid": leftover.id(), "start_time": leftover_start, "model": "x"},
            // A live pid with another start time: a reused pid.
            {"pid": bystander.id(), "start_time": start_time(bystander.id()) + 100_000, "model": "y"},
        ]
    });
    std::fs::write(env.path("state/state.json"), state.to_string()).unwrap();
    assert_success(&env.run(&["status"]));
    wait_until("the leftover is killed", || leftover.try_wait().unwrap().is_some());
    assert!(bystander.try_wait().unwrap().is_none(), "a reused pid was killed");
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
    assert!(stderr(&output).contains("already serves"), "{}", stderr(&output));

    // The test made `run` itself (0755): llmctl uses it as it is and changes nothing.
    let dir_mode = std::fs::metadata(env.path("run")).unwrap().permissions().mode() & 0o777;
    let socket_mode = std::fs::metadata(env.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!((dir_mode, socket_mode), (0o755, 0o600));
}

#[test]
fn a_daemon_starting_while_a_client_probes_its_lock_waits_for_the_probe() {
    use std::os::fd::AsRawFd;
    let env = Env::fake();
    // A client asks whether a daemon holds the state directory by taking the daemon's lock
    // shared for a moment. Here the moment lasts until the starting daemon has the lock
    // file open; before, it exited at once saying another daemon served the socket.
    std::fs::create_dir_all(env.path("state")).unwrap();
    let lock = env.path("state/daemon.lock");
    let probe = std::fs::File::options().read(true).write(true).create(true).truncate(false).open(&lock).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(probe.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) }, 0);
    let mut daemon = env.command(&["daemon"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    let holds_open = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == lock)))
            .unwrap_or(false)
    };
    wait_until("the daemon opens its lock, or exits", || {
        daemon.try_wait().unwrap().is_some() || holds_open(daemon.id())
    });
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon took a client's probe for another daemon");
    drop(probe);
    wait_until("the daemon answers", || env.socket().exists() && UnixStream::connect(env.socket()).is_ok());
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon took a client's probe for another daemon");
    assert_eq!(env.status_json()["daemon"]["pid"], daemon.id(), "the daemon started here answers");
    assert_success(&env.run(&["shutdown"]));
    assert!(daemon.wait().unwrap().success());
    env.assert_nothing_survives();
}

#[test]
fn the_socket_directory_is_created_private_and_an_existing_one_is_never_changed() {
    let env = Env::fake();
    let with_socket =
        |socket: &std::path::Path| env.command(&["status"]).env("LLMCTL_SOCKET", socket).output().unwrap();
    // A directory llmctl creates is private from the start.
    let created = env.path("fresh/llmctl");
    assert_success(&with_socket(&created.join("llmctl.sock")));
    assert_eq!(std::fs::metadata(&created).unwrap().permissions().mode() & 0o7777, 0o700);
    assert_success(&env.command(&["shutdown"]).env("LLMCTL_SOCKET", created.join("llmctl.sock")).output().unwrap());
    // A shared sticky directory like /tmp is used as it is: nothing loses its bits.
    let sticky = env.path("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    assert_success(&with_socket(&sticky.join("llmctl.sock")));
    assert_eq!(std::fs::metadata(&sticky).unwrap().permissions().mode() & 0o7777, 0o1777);
    assert_success(&env.command(&["shutdown"]).env("LLMCTL_SOCKET", sticky.join("llmctl.sock")).output().unwrap());
    // A directory others may write to without the sticky bit is refused, and left alone.
    let open = env.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = with_socket(&open.join("llmctl.sock"));
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("writable by other users"), "{}", stderr(&output));
    assert_eq!(std::fs::metadata(&open).unwrap().permissions().mode() & 0o7777, 0o777);
    env.assert_nothing_survives();
}

#[test]
fn foreground_daemon_stops_children_on_sigterm() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf").display().to_string();
    let mut daemon = env.spawn(&["daemon"]);
    wait_until("the daemon listens", || UnixStream::connect(env.socket()).is_ok());
    assert_success(&env.run(&["warm", &model]));
    let child = env.status_json()["instances"][0]["pid"].as_u64().unwrap() as u32;
    assert!(Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap().success());
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
    wrong_version.write_all(b"{\"type\":\"hello\",\"version\":999}\n").unwrap();
    let reply = read_reply(&wrong_version).expect("an error reply");
    assert!(reply["message"].as_str().unwrap().contains("protocol"), "{reply}");

    let mut wrong_shape = connect();
    wrong_shape
        .write_all(
            format!(
                "{{\"type\":\"hello\",\"version\":{}}}\n{{\"type\":\"run\",\"prompt\":5}}\n",
                llmctl::protocol::VERSION
            )
            .as_bytes(),
        )
        .unwrap();
    let mut reader = BufReader::new(wrong_shape.try_clone().unwrap());
    let mut hello = String::new();
    reader.read_line(&mut hello).unwrap();
    let mut error = String::new();
    reader.read_line(&mut error).unwrap();
    assert!(error.contains("\"error\""), "{error}");

    // Numbers out of the ranges the command line and the config allow are bad requests,
    // not a panic and not an instance of no slot.
    let model = env.tiny_model("m.gguf");
    for (parallel, ttl) in [(1u64, u64::MAX), (0, 60), (u64::from(u32::MAX), 60)] {
        let warm = serde_json::json!({
            "type": "warm", "ttl_s": ttl,
            "model": {"name": "m.gguf", "path": model, "load": {"ctx_size": null, "parallel": parallel, "extra_args": []}},
        });
        let mut stream = connect();
        stream
            .write_all(format!("{{\"type\":\"hello\",\"version\":{}}}\n{warm}\n", llmctl::protocol::VERSION).as_bytes())
            .unwrap();
        let mut lines = BufReader::new(stream).lines();
        let _hello = lines.next();
        let reply: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(reply["kind"], "usage", "parallel {parallel}, ttl {ttl}: {reply}");
        assert!(reply["message"].as_str().unwrap().contains("outside"), "{reply}");
    }
    assert!(env.status_json()["instances"].as_array().unwrap().is_empty(), "nothing was loaded");

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
    assert!(read.is_ok(), "the stalled connection is closed, not left hanging: {read:?}");

    // Meanwhile everyone else is served.
    assert_success(&env.run(&["status"]));
    let model = env.tiny_model("m.gguf").display().to_string();
    assert_eq!(stdout(&env.run(&["run", &model, "still serving"])), "still serving");
}

#[test]
fn a_crash_loop_stops_restarts_until_stop_clears_it() {
    let env = Env::fake();
    env.write_config("crash_limit = 3\ncrash_window = 600\n");
    let model = model_with_args(&env, "looping", &["--fake-crash-at-start"]);
    for _ in 0..3 {
        assert_exit(&env.run(&["run", &model, "hi"]), 70);
    }
    let starts = || env.instance_log().matches("fake llama-server starting").count();
    assert_eq!(starts(), 3);
    let output = env.run(&["run", &model, "hi"]);
    assert_exit(&output, 70);
    assert!(stderr(&output).contains("stopped restarting"), "{}", stderr(&output));
    assert_eq!(starts(), 3, "the breaker must not spawn again");
    let status = env.status_json();
    assert_eq!(status["instances"][0]["crash_loop"], true);
    assert!(stdout(&env.run(&["status"])).contains("failed"));

    assert_success(&env.run(&["stop", &model]));
    assert_eq!(env.status_json()["instances"][0]["crash_loop"], false);
    assert_exit(&env.run(&["run", &model, "hi"]), 70);
    assert_eq!(starts(), 4, "stop clears the breaker");
}

#[test]
fn an_unwritable_state_file_is_reported_and_serving_goes_on() {
    let env = Env::fake();
    // A directory where the state file should be: every atomic rename onto it fails.
    std::fs::create_dir_all(env.path("state/state.json/blocker")).unwrap();
    let model = env.tiny_model("m.gguf").display().to_string();
    let output = env.run(&["run", &model, "still works"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "still works");
    // The supervisor tries the write as it starts and reports the failure.
    wait_until("the problem is reported", || env.status_json()["daemon"]["state_file_error"].is_string());
    let status = env.status_json();
    let error = status["daemon"]["state_file_error"].as_str().expect("the problem is reported");
    assert!(error.contains("state.json"), "{error}");
    let leftovers: Vec<_> = std::fs::read_dir(env.path("state"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no half-written temp file is left: {leftovers:?}");
}

#[test]
fn steady_requests_do_not_rewrite_the_state_file_each_time() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::fake();
    let model = env.tiny_model("m.gguf").display().to_string();
    assert_success(&env.run(&["run", &model, "load"]));
    let state_file = env.path("state/state.json");
    let read_state = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&state_file).unwrap_or_default()).unwrap_or_default()
    };
    let pid = env.status_json()["instances"][0]["pid"].clone();
    wait_until("the child is in the state file", || read_state()["children"][0]["pid"] == pid);
    let written = std::fs::metadata(&state_file).unwrap().ino();
    // Requests for well over the supervisor's ten ticks a second, each a new last use.
    let started = std::time::Instant::now();
    let mut requests = 0;
    while started.elapsed() < std::time::Duration::from_millis(1500) || requests < 10 {
        assert_success(&env.run(&["run", &model, "again"]));
        requests += 1;
    }
    assert_eq!(std::fs::metadata(&state_file).unwrap().ino(), written, "not replaced by {requests} requests");
    let used = env.status_json()["instances"][0]["last_used_ms"].clone();
    assert!(read_state()["instances"][0]["last_used_ms"].as_u64() < used.as_u64());
    // A shutdown writes the last use all the same.
    assert_success(&env.run(&["shutdown"]));
    assert_eq!(read_state()["instances"][0]["last_used_ms"], used);
    assert_eq!(read_state()["children"], serde_json::json!([]));
}

#[test]
fn a_panicking_handler_is_an_internal_error_and_the_daemon_serves_on() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf").display().to_string();
    let output = env.run(&["run", &model, "__llmctl_test_panic__"]);
    assert_exit(&output, 1);
    assert!(stderr(&output).contains("internal error"), "{}", stderr(&output));
    let status = env.status_json();
    assert_eq!(status["instances"][0]["in_flight"], 0, "the slot was given back");
    // One slot: this only answers if the panicking request released it.
    assert_eq!(stdout(&env.run(&["run", &model, "after the panic"])), "after the panic");
    let log = std::fs::read_to_string(env.path("state/daemon.log")).unwrap();
    assert!(log.contains("panicked") && log.contains("fault injected"), "{log}");
}

#[test]
fn a_thousand_clients_get_an_answer_or_busy_and_none_hangs() {
    let mut env = Env::fake();
    env.write_config("queue_depth = 8\n");
    env.set("FAKE_LLAMA_TOKENS", "20");
    env.set("FAKE_LLAMA_TOKEN_MS", "1");
    let model = env.tiny_model("m.gguf");
    assert_success(&env.run(&["warm", model.to_str().unwrap()]));
    let request = serde_json::json!({
        "type": "run",
        "model": {"name": "m.gguf", "path": model, "load": {"ctx_size": null, "parallel": 1, "extra_args": []}},
        "mode": "raw", "prompt": "x", "system": null, "sampling": {"stop": []},
    });
    let message = format!("{{\"type\":\"hello\",\"version\":{}}}\n{request}\n", llmctl::protocol::VERSION);
    let socket = env.socket();
    let clients: Vec<_> = (0..1000)
        .map(|_| {
            let socket = socket.clone();
            let message = message.clone();
            std::thread::spawn(move || {
                let mut stream = UnixStream::connect(&socket).expect("connect");
                stream.set_read_timeout(Some(DEADLINE * 4)).unwrap();
                stream.write_all(message.as_bytes()).unwrap();
                let mut last = String::new();
                for line in BufReader::new(stream).lines() {
                    last = line.expect("no client may hang");
                }
                let last: serde_json::Value = serde_json::from_str(&last).unwrap();
                match (last["type"].as_str(), last["kind"].as_str()) {
                    (Some("done"), _) => "done",
                    (Some("error"), Some("busy")) => {
                        assert!(last["retry_after_ms"].as_u64().unwrap() > 0);
                        "busy"
                    }
                    _ => panic!("unexpected final message {last}"),
                }
            })
        })
        .collect();
    let outcomes: Vec<&str> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let done = outcomes.iter().filter(|o| **o == "done").count();
    let busy = outcomes.len() - done;
    assert!(done >= 1 && busy >= 1, "done {done}, busy {busy}");
    let status = env.status_json();
    assert_eq!(status["queue"]["waiting"], 0);
    assert_eq!(status["queue"]["rejected"].as_u64(), Some(busy as u64));
    let rss = status["daemon"]["rss_bytes"].as_u64().unwrap();
    assert!(rss < 256 << 20, "daemon memory grew to {rss} bytes");
    let output = env.run(&["run", model.to_str().unwrap(), "serving on"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "t ".repeat(20));
}

#[test]
fn a_client_killed_mid_stream_frees_its_slot() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    env.set("FAKE_LLAMA_TOKENS", "100000");
    env.set("FAKE_LLAMA_TOKEN_MS", "2");
    let model = env.tiny_model("m.gguf").display().to_string();
    let mut child = env.spawn(&["run", &model, "go"]);
    let mut first = [0u8; 4];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("upstream sees the cancellation", || {
        std::fs::read_to_string(&record).unwrap_or_default().contains("cancelled")
    });
    wait_until("the slot is free", || env.status_json()["instances"][0]["in_flight"] == 0);
}

#[test]
fn a_second_sigint_kills_at_once() {
    let mut env = Env::fake();
    // A grace period longer than the test's deadline: only the second SIGINT can end this.
    env.set("LLMCTL_STOP_GRACE_MS", "600000");
    let model = model_with_args(&env, "stubborn", &["--fake-ignore-term"]);
    let log_path = env.path("foreground.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut daemon = env.command(&["daemon"]).stderr(log).spawn().unwrap();
    wait_until("the daemon listens", || UnixStream::connect(env.socket()).is_ok());
    assert_success(&env.run(&["warm", &model]));
    let child = env.status_json()["instances"][0]["pid"].as_u64().unwrap() as u32;
    let pid = daemon.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    wait_until("the daemon begins its graceful stop", || {
        std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("shutting down"))
    });
    assert!(alive(child), "the child is still in its grace period");
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    wait_until("the daemon exits", || daemon.try_wait().unwrap().is_some());
    assert!(!alive(child));
    env.assert_nothing_survives();
}

#[test]
fn a_binary_that_is_not_executable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("llama-server");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let env = Env::with_server(&not_executable);
    let model = env.tiny_model("m.gguf").display().to_string();
    let output = env.command(&["run", &model, "hi"]).env("PATH", "/usr/bin:/bin").output().unwrap();
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("llama-server (not executable)"), "{}", stderr(&output));
}

#[test]
fn the_daemon_opens_no_tcp_port_and_refuses_other_users() {
    let env = Env::fake();
    assert_success(&env.run(&["status"]));
    let daemon = env.daemon_pid().unwrap();
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{daemon}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| link.to_string_lossy().strip_prefix("socket:[").map(|s| s.trim_end_matches(']').to_string()))
        .collect();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(3) == Some(&"0A");
            assert!(!(listening && inodes.iter().any(|i| Some(&i.as_str()) == fields.get(9))), "TCP listener: {line}");
        }
    }

    // Open the way to the socket for another user; the uid check must still refuse them.
    for path in [env.dir.path().to_path_buf(), env.path("run")] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(env.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = env
        .command_as_user(65534, &["--no-autostart", "status"])
        .env("HOME", "/tmp")
        .env_remove("LLMCTL_STATE_DIR")
        .env_remove("LLMCTL_CONFIG")
        .env("XDG_STATE_HOME", "/tmp")
        .env("XDG_CONFIG_HOME", "/tmp/llmctl-test-none")
        .env("LLMCTL_CONFIG", "/tmp/llmctl-test-none/config.toml")
        .output()
        .unwrap();
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("another user"), "{}", stderr(&output));
}

#[test]
fn an_unreadable_model_is_bad_input_for_its_user() {
    let env = Env::fake();
    let model = env.tiny_model("secret.gguf");
    std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Another user may reach the file but not read it (root reads anything, so the client
    // runs as nobody); nothing is started for it.
    for path in [env.dir.path().to_path_buf(), env.path("models")] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let output = env
        .command_as_user(65534, &["run", model.to_str().unwrap(), "hi"])
        .env("HOME", "/tmp")
        .env("LLMCTL_SOCKET", "/tmp/llmctl-test-nobody/none.sock")
        .env("LLMCTL_STATE_DIR", "/tmp/llmctl-test-nobody/state")
        .env("LLMCTL_CONFIG", "/tmp/llmctl-test-nobody/config.toml")
        .env("LLMCTL_NO_AUTOSTART", "1")
        .output()
        .unwrap();
    assert_exit(&output, 65);
    assert!(stderr(&output).contains("cannot open it"), "{}", stderr(&output));
}
