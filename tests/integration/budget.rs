//! The memory budget against the fake llama-server (which can hold a chosen amount of
//! resident memory): LRU eviction, pins, draining busy instances, no capacity, TTLs,
//! persistence across restarts, and GPU memory read through a fake `nvidia-smi`.

use crate::support::*;

/// Adds `[models.NAME]` whose fake server holds `rss_mb` MiB, plus `extra` config lines.
fn add_model(env: &Env, name: &str, rss_mb: u32, extra: &str) -> String {
    env.add_model(name, &["--fake-rss-mb", &rss_mb.to_string()], extra)
}

fn instance(status: &serde_json::Value, name: &str) -> serde_json::Value {
    status["instances"].as_array().unwrap().iter().find(|i| i["name"] == name).cloned().unwrap_or_default()
}

fn state_of(env: &Env, name: &str) -> String {
    instance(&env.status_json(), name)["state"].as_str().unwrap_or("").to_string()
}

#[test]
fn the_idle_model_cheapest_to_load_again_is_evicted_not_merely_the_least_recently_used() {
    let env = Env::fake();
    env.write_config("memory_budget = \"160MiB\"\n");
    // b takes 3 s to load; a loads at once.
    let b = add_model(&env, "b", 60, "");
    let a = add_model(&env, "a", 60, "");
    let c = add_model(&env, "c", 60, "");
    let config = std::fs::read_to_string(env.path("config.toml")).unwrap();
    env.write_config(&config.replacen(
        "\"--fake-rss-mb\", \"60\"]",
        "\"--fake-rss-mb\", \"60\", \"--fake-start-ms\", \"3000\"]",
        1,
    ));
    assert_success(&env.run(&["warm", &b]));
    assert_success(&env.run(&["warm", &a]));
    assert_success(&env.run(&["run", &a, "a is used again"]));
    // b is the least recently used, but a, used after it, is much cheaper to load again.
    assert_success(&env.run(&["warm", &c]));
    let status = env.status_json();
    assert_eq!(instance(&status, "a")["state"], "stopped", "{status}");
    assert_eq!(instance(&status, "a")["evictions"], 1);
    assert_eq!(instance(&status, "b")["state"], "ready");
    assert_eq!(instance(&status, "c")["state"], "ready");
    assert_eq!(status["daemon"]["evictions"], 1);
    assert_eq!(status["daemon"]["swaps"], 1);
    assert_eq!(status["daemon"]["budget_bytes"], 160 << 20);
    assert!(instance(&status, "b")["rss_bytes"].as_u64().unwrap() > 60 << 20, "RSS is measured");
}

#[test]
fn pinned_models_stay_and_no_capacity_says_why() {
    let env = Env::fake();
    env.write_config("memory_budget = \"100MiB\"\n");
    let a = add_model(&env, "a", 60, "pinned = true\n");
    let b = add_model(&env, "b", 60, "");
    assert_success(&env.run(&["warm", &a]));
    let output = env.run(&["run", &b, "hi"]);
    assert_exit(&output, 73);
    let err = stderr(&output);
    assert!(err.contains("cannot load b") && err.contains("pinned: a"), "{err}");
    assert_eq!(state_of(&env, "a"), "ready");
    assert_eq!(state_of(&env, "b"), "stopped");
    assert!(env.processes().iter().filter(|(_, cmd)| cmd.contains("b.gguf")).count() == 0, "b never started");
}

#[test]
fn pin_unpin_and_warm_ttl_protect_a_model() {
    let env = Env::fake();
    env.write_config("memory_budget = \"100MiB\"\n");
    let a = add_model(&env, "a", 60, "");
    let b = add_model(&env, "b", 60, "");
    assert_success(&env.run(&["warm", "--ttl", "1h", &a]));
    assert_eq!(instance(&env.status_json(), "a")["pinned"], true);
    assert_exit(&env.run(&["warm", &b]), 73);
    assert_success(&env.run(&["unpin", &a]));
    assert_success(&env.run(&["warm", &b]));
    assert_eq!(state_of(&env, "a"), "stopped");

    assert_success(&env.run(&["pin", &b]));
    assert_exit(&env.run(&["warm", &a]), 73);
    assert_success(&env.run(&["unpin", &b]));
    assert_success(&env.run(&["warm", &a]));
    assert_eq!(state_of(&env, "b"), "stopped");
}

#[test]
fn a_busy_model_is_drained_not_killed() {
    let env = Env::fake();
    let path = env.tiny_model("slow.gguf");
    let config = format!(
        "memory_budget = \"100MiB\"\n[models.slow]\npath = \"{}\"\nargs = [\"--fake-rss-mb\", \"60\", \"--fake-tokens\", \"50\", \"--fake-token-ms\", \"10\"]\n",
        path.display()
    );
    env.write_config(&config);
    let b = add_model(&env, "b", 60, "");
    assert_success(&env.run(&["warm", "slow"]));
    let generating = env.spawn(&["run", "slow", "x"]);
    wait_until("slow is generating", || instance(&env.status_json(), "slow")["in_flight"] == 1);
    let output = env.run(&["run", &b, "after the drain"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "after the drain");
    let slow_output = generating.wait_with_output().unwrap();
    assert_success(&slow_output);
    assert_eq!(stdout(&slow_output), "t ".repeat(50), "the busy model finished its request");
    assert_eq!(state_of(&env, "slow"), "stopped");
}

#[test]
fn an_instance_limit_is_a_budget_too() {
    let env = Env::fake();
    env.write_config("max_instances = 1\n");
    let a = add_model(&env, "a", 0, "");
    let b = add_model(&env, "b", 0, "");
    assert_success(&env.run(&["warm", &a]));
    assert_success(&env.run(&["warm", &b]));
    assert_eq!(state_of(&env, "a"), "stopped");
    assert_eq!(env.status_json()["daemon"]["max_instances"], 1);
}

#[test]
fn an_idle_model_is_unloaded_after_its_ttl() {
    let env = Env::fake();
    let a = add_model(&env, "a", 0, "ttl = \"1s\"\n");
    let b = add_model(&env, "b", 0, "");
    assert_success(&env.run(&["warm", &a]));
    assert_success(&env.run(&["warm", &b]));
    assert_eq!(instance(&env.status_json(), "a")["ttl_s"], 1);
    wait_until("a is unloaded after its TTL", || state_of(&env, "a") == "stopped");
    assert_eq!(state_of(&env, "b"), "ready", "no TTL by default");
    assert_eq!(instance(&env.status_json(), "a")["evictions"], 1);
}

#[test]
fn lru_order_and_pins_survive_a_restart() {
    let env = Env::fake();
    let a = add_model(&env, "a", 0, "");
    let b = add_model(&env, "b", 0, "");
    assert_success(&env.run(&["warm", &a]));
    assert_success(&env.run(&["warm", &b]));
    assert_success(&env.run(&["pin", &a]));
    let before = env.status_json();
    assert_success(&env.run(&["shutdown"]));
    let after = env.status_json();
    assert_ne!(before["daemon"]["pid"], after["daemon"]["pid"], "a new daemon");
    for name in ["a", "b"] {
        assert_eq!(instance(&after, name)["state"], "stopped");
        assert_eq!(instance(&after, name)["last_used_ms"], instance(&before, name)["last_used_ms"], "{name}");
    }
    assert_eq!(instance(&after, "a")["pinned"], true);
    assert_eq!(instance(&after, "b")["pinned"], false);
}

#[test]
fn unpin_clears_a_pin_left_on_load_options_the_config_no_longer_gives() {
    let env = Env::fake();
    let a = add_model(&env, "a", 0, "");
    assert_success(&env.run(&["warm", &a]));
    assert_success(&env.run(&["pin", &a]));
    // The same alias with other load options is another instance; the pinned one stays.
    env.write_config("");
    add_model(&env, "a", 1, "");
    assert_success(&env.run(&["warm", &a]));
    let pinned = |status: &serde_json::Value| {
        status["instances"].as_array().unwrap().iter().filter(|i| i["name"] == "a" && i["pinned"] == true).count()
    };
    let status = env.status_json();
    assert_eq!(status["instances"].as_array().unwrap().len(), 2, "{status}");
    assert_eq!(pinned(&status), 1, "{status}");
    assert_success(&env.run(&["unpin", &a]));
    assert_eq!(pinned(&env.status_json()), 0, "no pin is left that no command could name");
    assert_success(&env.run(&["shutdown"]));
    assert_eq!(pinned(&env.status_json()), 0, "nor after a restart");
}

#[test]
fn gpu_memory_is_read_from_nvidia_smi() {
    let mut env = Env::fake();
    // A stand-in nvidia-smi that prints the captured real output, with the fake servers'
    // pids in place of the captured one.
    let bin = env.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nvidia-smi");
    // Each call is counted and takes 25 ms, like a real one (23 ms measured on an H200).
    let calls = env.path("nvidia-smi-calls");
    let script = format!(
        "#!/bin/sh\necho >> {}\nsleep 0.025\ncase \"$*\" in\n*query-gpu*) cat {fixtures}/nvidia-smi-gpu.csv ;;\n*query-compute-apps*) head -n 1 {fixtures}/nvidia-smi-compute-apps.csv\n  for pid in $(pgrep -f '{}'); do echo \"$pid, /opt/llama.cpp/bin/llama-server, 546 MiB\"; done ;;\nesac\n",
        calls.display(),
        env.dir.path().join("models").display()
    );
    let nvidia_smi = bin.join("nvidia-smi");
    std::fs::write(&nvidia_smi, script).unwrap();
    std::fs::set_permissions(&nvidia_smi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.set("PATH", &format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()));
    let model = env.tiny_model("gpu.gguf").display().to_string();
    assert_success(&env.run(&["warm", "--gpu-layers", "99", &model]));
    // Read in the background after the load, not by `status`.
    wait_until("the GPU memory of the child shows", || env.status_json()["instances"][0]["vram_bytes"] == 546 << 20);
    let count = || std::fs::read_to_string(&calls).map_or(0, |text| text.lines().count());
    let before = count();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_success(&env.run(&["status"]));
    }
    // The background reader runs every 2 s (two calls each time): 20 statuses that each ran
    // nvidia-smi would add 20 or more.
    let background = 2 * (started.elapsed().as_secs() as usize / 2 + 1);
    assert!(count() - before <= background, "status ran nvidia-smi: {} calls", count() - before);
    let status = env.status_json();
    let vram_budget = status["daemon"]["vram_budget_bytes"].as_f64().unwrap();
    assert!((vram_budget - (81559u64 << 20) as f64 * 0.9).abs() < 2.0, "90% of the GPU: {vram_budget}");
}

#[test]
fn a_pin_said_done_survives_the_daemon_killed_at_once() {
    let env = Env::fake();
    let a = add_model(&env, "a", 0, "");
    let b = add_model(&env, "b", 0, "");
    assert_success(&env.run(&["warm", &a]));
    assert_success(&env.run(&["pin", &a]));
    assert_success(&env.run(&["warm", &b, "--ttl", "1h"]));
    let old = env.daemon_pid().expect("a daemon runs");
    // SIGKILL right after the answers: no shutdown writes the state for it.
    assert!(std::process::Command::new("kill").args(["-KILL", &old.to_string()]).status().unwrap().success());
    wait_until("the killed daemon is gone", || !alive(old));
    let after = env.status_json();
    assert_ne!(after["daemon"]["pid"], old, "a new daemon");
    assert_eq!(instance(&after, "a")["pinned"], true, "{after}");
    assert!(instance(&after, "b")["pinned_until_ms"].is_u64(), "{after}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}
