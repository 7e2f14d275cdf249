//! One daemon per user and state directory, files that are not llmctl's left alone, and
//! children that cannot wedge or outlive their instance.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::*;

/// Writes the config: `extra` lines, then model `m`, whose child is the fake server started
/// with `args`.
fn configure(env: &Env, extra: &str, args: &[&str]) {
    env.write_config(extra);
    env.add_model("m", args, "");
}

#[test]
fn a_socket_path_that_names_someone_elses_file_never_harms_it() {
    let env = Env::fake();
    let notes = env.path("notes.txt");
    std::fs::write(&notes, "my notes\n").unwrap();
    let output = env.command(&["--socket", "./notes.txt", "status"]).current_dir(env.dir.path()).output().unwrap();
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("not a socket"), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes\n", "notes.txt was touched");

    // A socket named like a file next to another: its lock file is SOCKET.lock, never the
    // neighbour with the same stem.
    let cargo_lock = env.path("Cargo.lock");
    std::fs::write(&cargo_lock, "# This file is automatically @generated\n").unwrap();
    let with_socket = |args: &[&str]| {
        let mut all = vec!["--socket", "./Cargo.sock"];
        all.extend_from_slice(args);
        env.command(&all).current_dir(env.dir.path()).output().unwrap()
    };
    assert_success(&with_socket(&["status"]));
    assert!(env.path("Cargo.sock.lock").exists());
    assert_success(&with_socket(&["shutdown"]));
    assert_eq!(std::fs::read_to_string(&cargo_lock).unwrap(), "# This file is automatically @generated\n");
    assert!(!env.path("Cargo.sock.lock").exists(), "the lock file goes with the daemon");
    assert!(!env.path("Cargo.sock").exists(), "the socket goes with the daemon");

    // A lock file path held by something else is refused, not truncated.
    std::fs::write(env.path("other.sock.lock"), "[package]\nname = \"mine\"\n").unwrap();
    let output = env.command(&["--socket", "./other.sock", "status"]).current_dir(env.dir.path()).output().unwrap();
    assert_exit(&output, 69);
    assert_eq!(std::fs::read_to_string(env.path("other.sock.lock")).unwrap(), "[package]\nname = \"mine\"\n");
    env.assert_nothing_survives();
}

#[test]
fn one_daemon_serves_a_state_directory_whatever_socket_a_command_names() {
    let env = Env::fake();
    configure(&env, "", &[]);
    assert_success(&env.run(&["warm", "m"]));
    let daemon = env.daemon_pid().unwrap();
    let child = env.status_json()["instances"][0]["pid"].as_u64().unwrap() as u32;
    let other_socket = env.path("run/elsewhere.sock");
    let other = other_socket.to_str().unwrap();

    // A command with another socket (cron's environment) reaches the running daemon.
    let output = env.command(&["--socket", other, "run", "m", "from elsewhere"]).output().unwrap();
    assert_success(&output);
    assert_eq!(stdout(&output), "from elsewhere");
    let status = env.command(&["--socket", other, "status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["daemon"]["pid"], daemon);
    assert!(!other_socket.exists(), "no second daemon started");

    // A second daemon of the same state directory refuses, naming the first, and kills
    // nothing of it.
    let output = env.command(&["daemon", "--socket", other]).output().unwrap();
    assert_exit(&output, 69);
    let message = stderr(&output);
    assert!(message.contains(&daemon.to_string()) && message.contains("llmctl.sock"), "{message}");
    assert!(alive(child), "the first daemon's child was killed");
    assert_eq!(env.status_json()["instances"][0]["pid"], child);
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn the_readme_cron_recipe_reaches_the_shells_daemon_under_env_i() {
    // The shell and cron share HOME (and so the state directory); the shell's socket is
    // its own, and cron's environment names none.
    let env = Env::fake();
    let home = env.path("home");
    let model = env.tiny_model("m.gguf");
    let config_dir = home.join(".config/llmctl");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("config.toml"),
        format!("llama_server = \"{FAKE_SERVER}\"\n[models.demo]\npath = \"{}\"\n", model.display()),
    )
    .unwrap();
    let shell_socket = env.path("run/shell.sock");
    let shell = |args: &[&str]| {
        Command::new(LLMCTL)
            .args(args)
            .env_clear()
            .env("HOME", &home)
            .env("PATH", "/usr/bin:/bin")
            .env("LLMCTL_SOCKET", &shell_socket)
            .env("LLMCTL_NO_SETUP", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    assert_success(&shell(&["warm", "demo"]));
    let status: serde_json::Value = serde_json::from_slice(&shell(&["status", "--json"]).stdout).unwrap();
    let daemon = status["daemon"]["pid"].as_u64().unwrap();
    let child = status["instances"][0]["pid"].clone();
    // The README's line: `env -i HOME=... PATH=/usr/bin:/bin llmctl warm demo`.
    let cron = Command::new("env")
        .args(["-i", &format!("HOME={}", home.display()), "PATH=/usr/bin:/bin", LLMCTL, "warm", "--ttl", "10h", "demo"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_success(&cron);
    assert_eq!(stderr(&cron), "", "warm is quiet");
    let status: serde_json::Value = serde_json::from_slice(&shell(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["daemon"]["pid"], daemon, "cron reached the shell's daemon");
    assert_eq!(status["instances"].as_array().unwrap().len(), 1, "no second copy of the model: {status}");
    assert_eq!(status["instances"][0]["pid"], child);
    assert!(status["instances"][0]["pinned_until_ms"].is_u64(), "cron's --ttl reached the instance");
    assert_success(&shell(&["shutdown"]));
    env.assert_nothing_survives();
}

/// Opens a raw connection that follows `events`.
fn follow_events(socket: &Path) -> Option<UnixStream> {
    let mut stream = UnixStream::connect(socket).ok()?;
    let version = llmctl::protocol::VERSION;
    stream
        .write_all(format!("{{\"type\":\"hello\",\"version\":{version}}}\n{{\"type\":\"events\"}}\n").as_bytes())
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    line.clear();
    reader.read_line(&mut line).ok()?;
    line.contains("\"ok\"").then_some(stream)
}

#[test]
fn no_number_of_followers_locks_out_status_stop_or_shutdown() {
    let env = Env::fake();
    configure(&env, "queue_depth = 1\n", &[]);
    assert_success(&env.run(&["warm", "m"]));
    // The cap for long connections is the queue depth plus 256: go past it.
    let followers: Vec<UnixStream> = (0..320).filter_map(|_| follow_events(&env.socket())).collect();
    assert!(followers.len() >= 250, "only {} followers got in", followers.len());
    assert!(followers.len() < 320, "followers beyond the cap were refused");
    assert_success(&env.run(&["status"]));
    assert_success(&env.run(&["stop", "m"]));
    assert_success(&env.run(&["metrics"]));
    assert_success(&env.run(&["shutdown"]));
    drop(followers);
    env.assert_nothing_survives();
}

/// The pid the fake server's setsid helper printed into its log.
fn helper_pid(env: &Env) -> Option<u32> {
    let logs = std::fs::read_dir(env.path("state/logs")).ok()?;
    for entry in logs.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Some(line) = text.lines().find(|line| line.starts_with("fake setsid helper pid ")) {
            return line.rsplit(' ').next()?.parse().ok();
        }
    }
    None
}

#[test]
fn a_helper_that_leaves_the_group_holding_the_output_neither_wedges_stop_nor_survives() {
    let env = Env::fake();
    configure(&env, "", &["--fake-setsid-helper"]);
    assert_success(&env.run(&["warm", "m"]));
    let helper = helper_pid(&env).expect("the helper started");
    assert!(alive(helper));
    let started = std::time::Instant::now();
    assert_success(&env.run(&["stop", "m"]));
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "stop took {:?}", started.elapsed());
    wait_until("the helper is gone", || !alive(helper));

    // A child that exits while loading, its helper holding the pipe: the request fails
    // with the exit status, and the helper goes too.
    let _ = std::fs::remove_dir_all(env.path("state/logs"));
    configure(&env, "", &["--fake-setsid-helper", "--fake-crash-at-start"]);
    let started = std::time::Instant::now();
    let output = env.run(&["run", "m", "x"]);
    assert_exit(&output, 70);
    assert!(stderr(&output).contains("exited with status 3"), "{}", stderr(&output));
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "the failure took {:?}", started.elapsed());
    let helper = helper_pid(&env).expect("the helper started");
    wait_until("the helper is gone", || !alive(helper));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_child_that_never_answers_fails_its_load_in_load_timeout_and_stop_is_prompt() {
    let env = Env::fake();
    configure(&env, "load_timeout = 2\n", &["--fake-deaf"]);
    let started = std::time::Instant::now();
    let output = env.run(&["run", "m", "x"]);
    assert_exit(&output, 124);
    assert!(stderr(&output).contains("load_timeout"), "{}", stderr(&output));
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "took {:?}", started.elapsed());
    // While it loads (for as long as it likes now), `stop` answers promptly.
    // (load_timeout applies from a daemon's start.)
    assert_success(&env.run(&["shutdown"]));
    configure(&env, "load_timeout = 600\n", &["--fake-deaf"]);
    let mut waiting = env.spawn(&["run", "m", "x"]);
    wait_until("the load runs", || env.status_json()["instances"][0]["state"] == "starting");
    let started = std::time::Instant::now();
    assert_success(&env.run(&["stop", "m"]));
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "stop took {:?}", started.elapsed());
    assert_eq!(waiting.wait().unwrap().code(), Some(69));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn sigterm_stops_the_daemon_even_when_its_socket_file_is_gone() {
    let env = Env::fake();
    configure(&env, "", &[]);
    assert_success(&env.run(&["warm", "m"]));
    let daemon = env.daemon_pid().unwrap();
    std::fs::remove_file(env.socket()).unwrap();
    let _ = Command::new("kill").args(["-TERM", &daemon.to_string()]).status();
    wait_until("the daemon exits", || !alive(daemon));
    // A new daemon starts as if nothing happened.
    assert_success(&env.run(&["status"]));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// A logout clearing `XDG_RUNTIME_DIR`, or a cleaner ageing `/tmp`, removes the socket
/// under a running daemon: it exits by itself, with its child, and the next command that
/// finds it still holding the state directory waits for that and starts a fresh daemon.
#[test]
fn a_daemon_whose_socket_directory_is_removed_exits_and_the_next_command_starts_afresh() {
    let env = Env::fake();
    configure(&env, "", &[]);
    assert_success(&env.run(&["warm", "m"]));
    let daemon = env.daemon_pid().unwrap();
    let child = env.status_json()["instances"][0]["pid"].as_u64().unwrap() as u32;
    std::fs::remove_dir_all(env.path("run")).unwrap();
    // At once, before the daemon noticed: the command waits for it instead of failing.
    let output = env.run(&["run", "m", "a fresh daemon answers"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "a fresh daemon answers");
    assert!(!alive(daemon), "the daemon without a socket exited");
    assert!(!alive(child), "its child went with it");
    assert_ne!(env.daemon_pid(), Some(daemon));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// Each context size is an instance of its own; a client asking for ever new ones leaves
/// at most the kept number of stopped instances (and their threads), in the daemon and in
/// what the next daemon restores.
#[test]
fn ever_new_load_options_leave_a_bounded_number_of_stopped_instances() {
    const KEPT_STOPPED: usize = 16;
    let env = Env::fake();
    configure(&env, "max_instances = 1\n", &[]);
    assert_success(&env.run(&["run", "--ctx-size", "256", "m", "first"]));
    let daemon = env.daemon_pid().unwrap();
    let threads_at_first = threads_of(daemon);
    for ctx in 1..=40 {
        assert_success(&env.run(&["run", "--ctx-size", &(256 + ctx).to_string(), "m", "x"]));
    }
    wait_until("the surplus is retired", || {
        env.status_json()["instances"].as_array().unwrap().len() <= KEPT_STOPPED + 1
    });
    let instances = env.status_json()["instances"].as_array().unwrap().clone();
    // The most recently used are the ones kept: the last run's among them, loaded.
    assert!(instances.iter().any(|i| i["ctx_size"] == 296 && i["state"] == "ready"), "{instances:?}");
    assert!(!instances.iter().any(|i| i["ctx_size"] == 256), "the oldest went first");
    wait_until("their threads end", || threads_of(daemon) <= threads_at_first + KEPT_STOPPED + 2);
    assert_success(&env.run(&["shutdown"]));
    wait_until("the daemon exits", || !alive(daemon));
    assert_success(&env.run(&["status"]));
    assert!(env.status_json()["instances"].as_array().unwrap().len() <= KEPT_STOPPED + 1);
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_child_whose_socket_vanished_is_a_crash_and_is_restarted() {
    let env = Env::fake();
    configure(&env, "", &[]);
    assert_success(&env.run(&["warm", "m"]));
    let first = env.status_json()["instances"][0].clone();
    std::fs::remove_file(first["socket"].as_str().unwrap()).unwrap();
    wait_until("the crash is noticed", || env.status_json()["instances"][0]["pid"] != first["pid"]);
    let output = env.run(&["run", "m", "answers again"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "answers again");
    let now = env.status_json()["instances"][0].clone();
    assert_ne!(now["pid"], first["pid"]);
    assert_eq!(now["restarts"], 1);
    assert!(!alive(first["pid"].as_u64().unwrap() as u32), "the old child is gone");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn an_endless_output_line_from_a_child_does_not_grow_the_daemon() {
    let env = Env::fake();
    configure(&env, "", &["--fake-endless-line", "200"]);
    assert_success(&env.run(&["status"]));
    let daemon = env.daemon_pid().unwrap();
    let before = rss_bytes(daemon);
    assert_success(&env.run(&["warm", "m"]));
    let grown = rss_bytes(daemon).saturating_sub(before);
    assert!(grown < 32 << 20, "the daemon grew {} MiB on a 200 MiB line", grown >> 20);
    let log = std::fs::read_dir(env.path("state/logs")).unwrap().flatten().next().unwrap().path();
    let logged = std::fs::metadata(&log).unwrap().len();
    assert!(logged < 1 << 20, "the log holds {logged} bytes of one line");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// An API key file that is a FIFO (or a device) is refused before a byte is read, so it can
/// neither make the daemon wait nor fill its memory: the daemon logs it, serves, and shuts
/// down when told; `serve` refuses it at once.
#[test]
fn a_key_file_that_is_a_fifo_or_a_device_is_refused_and_blocks_nothing() {
    let env = Env::fake();
    let fifo = env.path("key.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    configure(&env, &format!("listen = [\"127.0.0.1:{port}\"]\napi_key_file = \"{}\"\n", fifo.display()), &[]);
    assert_success(&env.run(&["run", "m", "serving"]));
    wait_until("the daemon logs the refused key file", || {
        std::fs::read_to_string(env.path("state/daemon.log")).unwrap_or_default().contains("not a regular file")
    });
    for key_file in [fifo.to_str().unwrap(), "/dev/zero"] {
        let output = env.run(&["serve", "--listen", "127.0.0.1:0", "--api-key-file", key_file]);
        assert_exit(&output, 69);
        assert!(stderr(&output).contains("not a regular file"), "{key_file}: {}", stderr(&output));
    }
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// The daemon's log and a child's log are written only as regular files of their own
/// name: a symbolic link in their place is refused and the file it points to is untouched.
#[test]
fn logs_are_never_written_through_a_symbolic_link() {
    let env = Env::fake();
    configure(&env, "", &[]);
    let victim = env.path("victim");
    std::fs::write(&victim, "precious").unwrap();
    // A child's log: found after a first load, then replaced by a link.
    assert_success(&env.run(&["run", "m", "first"]));
    assert_success(&env.run(&["shutdown"]));
    let logs: Vec<_> = std::fs::read_dir(env.path("state/logs")).unwrap().flatten().map(|entry| entry.path()).collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    std::fs::remove_file(&logs[0]).unwrap();
    std::os::unix::fs::symlink(&victim, &logs[0]).unwrap();
    let output = env.run(&["run", "m", "second"]);
    assert!(!output.status.success(), "{}", stdout(&output));
    assert!(stderr(&output).contains("symbolic link"), "{}", stderr(&output));
    assert_success(&env.run(&["shutdown"]));
    // The daemon's log.
    let daemon_log = env.path("state/daemon.log");
    std::fs::remove_file(&daemon_log).unwrap();
    std::os::unix::fs::symlink(&victim, &daemon_log).unwrap();
    let output = env.run(&["run", "m", "third"]);
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("symbolic link"), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    env.assert_nothing_survives();
}

/// The daemon's first answer on a fresh connection, read for at most two seconds; none
/// when it does not answer in that time or the connection fails.
fn first_answer(socket: &Path) -> Option<String> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
    let version = llmctl::protocol::VERSION;
    stream.write_all(format!("{{\"type\":\"hello\",\"version\":{version}}}\n").as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line)
}

#[test]
fn a_command_during_a_slow_shutdown_is_told_at_once_and_runs_on_a_fresh_daemon() {
    let mut env = Env::fake();
    // A child that ignores SIGTERM holds the shutdown for its whole grace period.
    env.set("LLMCTL_STOP_GRACE_MS", "3000");
    configure(&env, "", &["--fake-ignore-term"]);
    assert_success(&env.run(&["warm", "m"]));
    let old = env.daemon_pid().expect("a daemon runs");
    let shutdown = env.spawn(&["shutdown"]);
    // While it waits on the child, a new connection is answered at once, not left waiting.
    wait_until("a new connection is told the daemon is shutting down", || {
        first_answer(&env.socket()).is_some_and(|answer| answer.contains("\"shutting_down\""))
    });
    // Connections held open without a word do not hold up the answers of those after them.
    let held: Vec<UnixStream> = (0..40).filter_map(|_| UnixStream::connect(env.socket()).ok()).collect();
    // A second shutdown meanwhile waits for the daemon it found shutting down, and leaves
    // alone the fresh one the run starts.
    let second_shutdown = env.spawn(&["shutdown"]);
    let output = env.run(&["run", "m", "after", "the", "shutdown"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "after the shutdown");
    assert!(!stderr(&output).contains("wedged"), "{}", stderr(&output));
    assert!(!alive(old), "the run was served before the old daemon exited");
    let fresh = env.daemon_pid().expect("the run started a daemon");
    assert_ne!(fresh, old, "the run started a fresh daemon");
    assert_success(&shutdown.wait_with_output().unwrap());
    assert_success(&second_shutdown.wait_with_output().unwrap());
    drop(held);
    assert!(alive(fresh), "a shutdown stopped the daemon started after the one it found");
    assert_eq!(env.status_json()["daemon"]["pid"], fresh);
    assert_success(&env.command(&["shutdown"]).env("LLMCTL_NO_AUTOSTART", "1").output().unwrap());
    env.assert_nothing_survives();
}

#[test]
fn a_burst_of_commands_starts_one_daemon_and_a_shutdown_leaves_none() {
    let env = Env::fake();
    configure(&env, "", &[]);
    // Were each command of a burst to start a daemon, one that reached the state
    // directory's lock after the first had shut down would be left running.
    for _ in 0..5 {
        let burst: Vec<std::process::Child> = (0..8).map(|_| env.spawn(&["status"])).collect();
        for command in burst {
            assert_success(&command.wait_with_output().unwrap());
        }
        assert_success(&env.run(&["shutdown"]));
        env.assert_nothing_survives();
    }
}

#[test]
fn a_fifo_or_a_link_in_place_of_the_start_lock_neither_blocks_nor_writes_elsewhere() {
    let env = Env::fake();
    configure(&env, "", &[]);
    std::fs::create_dir_all(env.path("state")).unwrap();
    let lock = env.path("state/start.lock");
    assert!(Command::new("mkfifo").arg(&lock).status().unwrap().success());
    assert_success(&env.run(&["status"]));
    assert_success(&env.run(&["shutdown"]));
    std::fs::remove_file(&lock).unwrap();
    let elsewhere = env.path("elsewhere");
    std::os::unix::fs::symlink(&elsewhere, &lock).unwrap();
    assert_success(&env.run(&["status"]));
    assert!(!elsewhere.exists(), "a file was created through the link");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn shutdown_gets_past_connections_that_fill_the_cap_without_a_word() {
    let env = Env::fake();
    configure(&env, "queue_depth = 1\n", &[]);
    assert_success(&env.run(&["status"]));
    let daemon = env.daemon_pid().expect("a daemon runs");
    // The cap is the queue depth plus 320: go past it with connections that never speak.
    let held: Vec<UnixStream> = (0..400).filter_map(|_| UnixStream::connect(env.socket()).ok()).collect();
    assert!(held.len() > 330, "only {} connections opened", held.len());
    let output = env.run(&["shutdown"]);
    assert_success(&output);
    assert!(!alive(daemon), "the daemon still runs after shutdown");
    drop(held);
    env.assert_nothing_survives();
}

#[test]
fn connections_that_never_speak_give_their_places_to_status_stop_and_run() {
    let env = Env::fake();
    configure(&env, "queue_depth = 1\n", &[]);
    assert_success(&env.run(&["warm", "m"]));
    // The cap is the queue depth plus 320: fill it with connections that never speak.
    let held: Vec<UnixStream> = (0..400).filter_map(|_| UnixStream::connect(env.socket()).ok()).collect();
    assert!(held.len() > 330, "only {} connections opened", held.len());
    assert_success(&env.run(&["status"]));
    let output = env.run(&["run", "m", "still served"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "still served");
    assert_success(&env.run(&["stop", "m"]));
    assert_success(&env.run(&["shutdown"]));
    drop(held);
    env.assert_nothing_survives();
}

#[test]
fn embed_requests_never_answered_lock_out_nothing_and_leave_when_their_clients_do() {
    let env = Env::fake();
    let mut config = "queue_depth = 1\ntoken_timeout = 600\n".to_string();
    let mut messages = Vec::new();
    for name in ["far", "wide"] {
        let model = env.tiny_model(&format!("{name}.gguf"));
        config +=
            &format!("[models.{name}]\npath = \"{}\"\nparallel = 256\nargs = [\"--fake-stall\"]\n", model.display());
        let spec = serde_json::json!({"name": name, "path": model, "load": {"ctx_size": null, "parallel": 256,
            "gpu_layers": null, "extra_args": ["--fake-stall"], "embeddings": true}});
        let request = serde_json::json!({"type": "embed", "model": spec, "inputs": ["x"]});
        messages.push(format!("{{\"type\":\"hello\",\"version\":{}}}\n{request}\n", llmctl::protocol::VERSION));
    }
    env.write_config(&config);
    assert_success(&env.run(&["status"]));
    let send = |message: &str| {
        let mut stream = UnixStream::connect(env.socket()).ok()?;
        stream.write_all(message.as_bytes()).ok()?;
        Some(stream)
    };
    let status = || env.status_json();
    let in_flight = |status: &serde_json::Value| -> u64 {
        status["instances"].as_array().map_or(0, |all| all.iter().map(|i| i["in_flight"].as_u64().unwrap_or(0)).sum())
    };
    // The first of each loads its model's embeddings instance; then 512 slots are there to
    // wait on, more than every connection the daemon takes (queue depth plus 320).
    let mut clients = Vec::new();
    for (loaded, message) in messages.iter().enumerate() {
        clients.extend(send(message));
        wait_until("the instance is loaded", || in_flight(&status()) == loaded as u64 + 1);
    }
    clients.extend((0..398).filter_map(|n| send(&messages[n % 2])));
    assert_eq!(clients.len(), 400);
    // Each is waiting on a slot or was told busy.
    wait_until("every request is placed", || {
        let status = status();
        in_flight(&status) + status["queue"]["rejected"].as_u64().unwrap_or(0) >= 400
    });
    assert!(in_flight(&status()) >= 250, "{}", status());
    assert_success(&env.run(&["status"]));
    assert_success(&env.run(&["metrics"]));
    // The clients leave: their requests are given up at once, not after token_timeout.
    drop(clients);
    wait_until("every request is given up", || in_flight(&status()) == 0);
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}
