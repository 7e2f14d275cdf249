//! Hostile input and odd environments: every number checked where it enters, environment
//! failures reported as such (69), bad input as bad input (65), a daemon that does not
//! answer never holds a client for good, a client that stops reading never holds a slot.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;

use crate::support::*;

fn fake_model(env: &Env) -> String {
    env.tiny_model("m.gguf").display().to_string()
}

#[test]
fn numbers_out_of_range_are_refused_where_they_enter() {
    let env = Env::fake();
    let model = fake_model(&env);
    for args in [
        vec!["warm", "--ttl", "18446744073709551615", &model],
        vec!["warm", "--ttl", "999999999999d", &model],
        vec!["run", "--gpu-layers", "4294967295", &model, "hi"],
        vec!["run", "--parallel", "100000", &model, "hi"],
        vec!["run", "--ctx-size", "4294967295", &model, "hi"],
    ] {
        let output = env.run(&args);
        assert_exit(&output, 2);
    }
    for (config, key) in [
        ("token_timeout = 0\n", "token_timeout = 0 is outside 1..="),
        ("load_timeout = 0\n", "load_timeout = 0 is outside"),
        ("crash_limit = 0\n", "crash_limit = 0 is outside"),
        ("max_instances = 0\n", "max_instances = 0 is outside"),
        ("default_ttl = \"18446744073709551615s\"\n", "longer than ten years"),
    ] {
        env.write_config(config);
        let output = env.run(&["run", &model, "hi"]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains(key), "{config}: {}", stderr(&output));
        // Met through `status`, which starts the daemon: the same error, not a timeout.
        let output = env.run(&["status"]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains(key), "{config}: {}", stderr(&output));
    }
    env.write_config(&format!("[models.wide]\npath = \"{model}\"\nparallel = 100000\n"));
    let output = env.run(&["run", "wide", "hi"]);
    assert_exit(&output, 65);
    assert!(stderr(&output).contains("models.wide.parallel = 100000 is outside 1..=256"), "{}", stderr(&output));
    assert!(env.processes().is_empty(), "nothing started for bad input: {:?}", env.processes());
}

/// Runs llmctl with `stdin` piped in; llmctl may stop reading early (that is the point).
fn run_feeding(env: &Env, args: &[&str], stdin: String) -> std::process::Output {
    let mut child = env
        .command(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = pipe.write_all(stdin.as_bytes());
    });
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    output
}

#[test]
fn a_prompt_over_the_protocol_limit_is_bad_input() {
    let env = Env::fake();
    let model = fake_model(&env);
    let big = "x".repeat(17 << 20);
    let output = run_feeding(&env, &["run", &model, "summarize:"], big);
    assert_exit(&output, 65);
    assert!(stderr(&output).contains("16 MiB"), "{}", stderr(&output));
    // A prompt under the limit whose JSON is over it (escaped control characters) is named
    // by its size too, before anything is sent.
    let escaped = "\u{1}".repeat(4 << 20);
    let output = run_feeding(&env, &["run", &model, "x"], escaped);
    assert_exit(&output, 65);
    assert!(stderr(&output).contains("MiB limit"), "{}", stderr(&output));
}

#[test]
fn environment_failures_are_unavailable_not_bugs() {
    let env = Env::fake();
    let model = fake_model(&env);
    // A state directory that cannot be created (its parent is a file).
    std::fs::write(env.path("file"), "").unwrap();
    let output = env.command(&["run", &model, "hi"]).env("LLMCTL_STATE_DIR", env.path("file/state")).output().unwrap();
    assert_exit(&output, 69);
    // A socket path longer than a Unix socket address holds.
    let long = env.path(&format!("{}/llmctl.sock", "d".repeat(120)));
    let output = env.command(&["status"]).env("LLMCTL_SOCKET", &long).output().unwrap();
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("bytes, over the 107"), "{}", stderr(&output));
    env.assert_nothing_survives();
}

#[test]
fn a_missing_demo_and_a_model_never_loaded_are_not_found() {
    let env = Env::fake();
    let output = env.run(&["run", "demo", "hi"]);
    assert_exit(&output, 66);
    assert!(stderr(&output).contains("llmctl setup"), "{}", stderr(&output));
    let model = fake_model(&env);
    let output = env.run(&["logs", &model]);
    assert_exit(&output, 66);
}

#[test]
fn a_stopped_daemon_gets_a_clear_answer_not_a_hang() {
    let env = Env::fake();
    assert_success(&env.run(&["status"]));
    let pid = env.daemon_pid().unwrap();
    let signal = |name: &str| std::process::Command::new("kill").args([name, &pid.to_string()]).status().unwrap();
    signal("-STOP");
    let output = env.run(&["status"]);
    signal("-CONT");
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("did not answer within 5 s"), "{}", stderr(&output));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_client_that_stops_reading_gives_its_slot_back() {
    let env = Env::fake();
    let path = fake_model(&env);
    env.write_config(&format!(
        "token_timeout = 3\n[models.flood]\npath = \"{path}\"\nargs = [\"--fake-tokens\", \"10000000\"]\n"
    ));
    assert_success(&env.run(&["warm", "flood"]));
    let spec = env.status_json()["instances"][0].clone();
    assert_eq!(spec["name"], "flood");
    // A raw client asks for ten million tokens and then reads nothing.
    let mut stalled = UnixStream::connect(env.socket()).unwrap();
    let model = serde_json::json!({"name": "flood", "path": path, "load": {"ctx_size": null, "parallel": 1, "gpu_layers": null, "extra_args": ["--fake-tokens", "10000000"]}});
    let request = serde_json::json!({"type": "run", "model": model, "mode": "raw", "prompt": "go", "system": null, "sampling": {"stop": []}});
    stalled
        .write_all(format!("{{\"type\":\"hello\",\"version\":{}}}\n{request}\n", llmctl::protocol::VERSION).as_bytes())
        .unwrap();
    wait_until("the stalled client holds the slot", || env.status_json()["instances"][0]["in_flight"] == 1);
    wait_until("the slot comes back", || env.status_json()["instances"][0]["in_flight"] == 0);
    // Reading again, the client hears why its request ended: a timeout, not a Ctrl-C.
    let reader = std::thread::spawn(move || {
        let lines = BufReader::new(stalled).lines().map_while(Result::ok);
        lines.last().unwrap_or_default()
    });
    let output = env.run(&["run", "--raw", "-n", "3", "flood", "go"]);
    assert_success(&output);
    let last: serde_json::Value = serde_json::from_str(&reader.join().unwrap()).unwrap();
    assert_eq!((last["type"].as_str(), last["kind"].as_str()), (Some("error"), Some("timeout")), "{last}");
    assert!(last["message"].as_str().unwrap().contains("read nothing for 3 s"), "{last}");
}

#[test]
fn a_relative_model_path_in_the_config_is_relative_to_the_config_file() {
    let env = Env::fake();
    env.tiny_model("relative.gguf");
    // The config sits in the test directory; `models/relative.gguf` is next to it.
    env.write_config("[models.near]\npath = \"models/relative.gguf\"\n");
    let output = env.command(&["run", "near", "found"]).current_dir("/").output().unwrap();
    assert_success(&output);
    assert_eq!(stdout(&output), "found");
}

#[test]
fn a_corrupt_state_file_is_kept_aside_and_the_daemon_serves() {
    let env = Env::fake();
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::write(env.path("state/state.json"), [0xff, 0xfe, b'{', 0x80]).unwrap();
    let model = fake_model(&env);
    assert_success(&env.run(&["run", &model, "still serving"]));
    assert_eq!(std::fs::read(env.path("state/state.json.corrupt")).unwrap(), [0xff, 0xfe, b'{', 0x80]);
    let log = std::fs::read_to_string(env.path("state/daemon.log")).unwrap();
    assert!(log.contains("state.json.corrupt"), "{log}");
}

#[test]
fn logs_of_an_alias_find_the_instance_another_alias_loaded() {
    let env = Env::fake();
    let path = fake_model(&env);
    env.write_config(&format!("[models.first]\npath = \"{path}\"\n[models.second]\npath = \"{path}\"\n"));
    assert_success(&env.run(&["warm", "first"]));
    let output = env.run(&["logs", "second"]);
    assert_success(&output);
    assert!(stdout(&output).contains("listening on"), "{}", stdout(&output));
}

#[test]
fn reload_applies_live_settings_and_names_the_rest() {
    let env = Env::fake();
    env.write_config("memory_budget = \"1GiB\"\n");
    assert_success(&env.run(&["status"]));
    assert_eq!(env.status_json()["daemon"]["budget_bytes"], 1u64 << 30);
    env.write_config("memory_budget = \"2GiB\"\nqueue_depth = 9\n");
    // `config` tells what the file says from what the daemon uses, and how to close the gap.
    let shown = stdout(&env.run(&["config"]));
    let line = |key: &str| shown.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_string();
    assert!(line("memory_budget").contains("the daemon uses 1GiB: `llmctl reload`"), "{shown}");
    assert!(line("queue_depth").contains("the daemon uses 64: `llmctl shutdown`"), "{shown}");
    let output = env.run(&["reload"]);
    assert_success(&output);
    assert!(stdout(&output).contains("memory_budget 1GiB -> 2GiB"), "{}", stdout(&output));
    assert!(stdout(&output).contains("need `llmctl shutdown`") && stdout(&output).contains("queue_depth"));
    assert_eq!(env.status_json()["daemon"]["budget_bytes"], 2u64 << 30);
    // SIGHUP does the same, and the daemon lives on.
    env.write_config("memory_budget = \"3GiB\"\n");
    let pid = env.daemon_pid().unwrap();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
    wait_until("SIGHUP reloads the budget", || env.status_json()["daemon"]["budget_bytes"] == 3u64 << 30);
    // A bad config changes nothing and is bad input.
    env.write_config("memory_budget = \"lots\"\n");
    let output = env.run(&["reload"]);
    assert_exit(&output, 65);
    assert_eq!(env.status_json()["daemon"]["budget_bytes"], 3u64 << 30);
    assert_eq!(env.daemon_pid(), Some(pid));
}

#[test]
fn the_daemon_gives_back_the_memory_of_large_prompts() {
    let env = Env::fake();
    let path = fake_model(&env);
    env.write_config(&format!("[models.one]\npath = \"{path}\"\nargs = [\"--fake-tokens\", \"1\"]\n"));
    assert_success(&env.run(&["run", "one", "warm up"]));
    let rss = |env: &Env| env.status_json()["daemon"]["rss_bytes"].as_u64().unwrap();
    let before = rss(&env);
    let prompt = "word ".repeat(3 << 20);
    for _ in 0..2 {
        let output = env.run_with_stdin(&["run", "one", "summarize:"], &prompt);
        assert_success(&output);
    }
    let after = rss(&env);
    // Two 15 MiB prompts passed through; what the daemon keeps of them is small.
    assert!(after < before + (8 << 20), "daemon RSS grew from {before} to {after} bytes");
}

#[test]
fn a_daemon_in_a_shared_directory_leaves_nothing_behind() {
    let env = Env::fake();
    let shared = env.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let model = fake_model(&env);
    // A relative socket path, from inside the shared directory.
    let run =
        |args: &[&str]| env.command(args).env("LLMCTL_SOCKET", "here.sock").current_dir(&shared).output().unwrap();
    assert_success(&run(&["run", &model, "hi"]));
    assert!(shared.join("here.sock").exists());
    assert_success(&run(&["shutdown"]));
    let left: Vec<String> =
        std::fs::read_dir(&shared).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    env.assert_nothing_survives();
}

#[test]
fn unpinning_a_model_the_config_pins_says_where_the_pin_is() {
    let env = Env::fake();
    let path = fake_model(&env);
    env.write_config(&format!("[models.kept]\npath = \"{path}\"\npinned = true\n"));
    assert_success(&env.run(&["warm", "kept"]));
    let output = env.run(&["unpin", "kept"]);
    assert_success(&output);
    assert!(stderr(&output).contains("`pinned = true`"), "{}", stderr(&output));
    assert_eq!(env.status_json()["instances"][0]["pinned"], true);
}

#[test]
fn without_an_absolute_home_the_files_are_where_the_password_database_puts_home() {
    let env = Env::fake();
    let uid = String::from_utf8(std::process::Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    let entry = std::process::Command::new("getent").args(["passwd", uid.trim()]).output().unwrap();
    let entry = String::from_utf8(entry.stdout).unwrap();
    let passwd = entry.trim().split(':').nth(5).expect("the user has a passwd entry").to_string();
    assert!(passwd.starts_with('/') && passwd != "/", "{entry}");
    // Unset, empty, or relative (with relative XDG directories, which are ignored too).
    for home in [None, Some(""), Some("rel")] {
        let mut command = env.command(&["config"]);
        for name in ["XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "LLMCTL_CONFIG", "LLMCTL_DATA_DIR"] {
            command.env_remove(name);
        }
        match home {
            None => command.env_remove("HOME"),
            Some("rel") => command.env("HOME", "rel").env("XDG_CONFIG_HOME", "cfg").env("XDG_DATA_HOME", "data"),
            Some(home) => command.env("HOME", home),
        };
        let output = command.output().unwrap();
        let shown = stdout(&output);
        assert!(shown.contains(&format!("{passwd}/.config/llmctl/config.toml")), "HOME {home:?}: {shown}");
        assert!(shown.contains(&format!("{passwd}/.local/share/llmctl")), "HOME {home:?}: {shown}");
    }
    env.assert_nothing_survives();
}

#[test]
fn a_client_gone_before_its_first_token_gives_its_slot_back_at_once() {
    let env = Env::fake();
    let path = fake_model(&env);
    // A child that never sends a token: a prompt that takes minutes, as far as llmctl can tell.
    env.write_config(&format!(
        "token_timeout = 600\n[models.slow]\npath = \"{path}\"\nparallel = 1\nargs = [\"--fake-stall\"]\n"
    ));
    assert_success(&env.run(&["warm", "slow"]));
    let in_flight = || env.status_json()["instances"][0]["in_flight"].as_u64();
    for signal in ["-KILL", "-INT"] {
        let mut client = env.command(&["run", "slow", "a long prompt"]).stderr(Stdio::null()).spawn().unwrap();
        wait_until("the client holds the slot", || in_flight() == Some(1));
        let _ = std::process::Command::new("kill").args([signal, &client.id().to_string()]).status();
        let _ = client.wait();
        // Given back at once, not after token_timeout's ten minutes.
        wait_until("the slot comes back", || in_flight() == Some(0));
    }
    let status = env.status_json();
    assert_eq!(status["instances"][0]["state"], "ready", "{status}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_client_gone_before_a_remote_server_answers_gives_its_slot_back_at_once() {
    let env = Env::fake();
    // A server llmctl does not run, on TCP, healthy and never answering a generation.
    let mut remote = KilledOnDrop(
        std::process::Command::new(FAKE_SERVER)
            .args(["--port", "0", "--fake-stall"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(remote.0.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the server printed its address").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    env.write_config(&format!("token_timeout = 600\n[models.far]\nurl = \"{url}\"\nparallel = 1\n"));
    let in_flight = || env.status_json()["instances"][0]["in_flight"].as_u64();
    let mut client = env.command(&["run", "far", "a long prompt"]).stderr(Stdio::null()).spawn().unwrap();
    wait_until("the client holds the slot", || in_flight() == Some(1));
    let _ = std::process::Command::new("kill").args(["-KILL", &client.id().to_string()]).status();
    let _ = client.wait();
    wait_until("the slot comes back", || in_flight() == Some(0));
    assert_success(&env.run(&["shutdown"]));
    drop(remote);
    env.assert_nothing_survives();
}

/// A process of the test's own, killed however the test ends.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
