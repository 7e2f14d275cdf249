//! The CLI contract against the fake llama-server: pipelines, exit codes, bad input.

use std::io::Read;

use crate::support::*;

fn fake_model(env: &Env) -> String {
    env.tiny_model("model.gguf").display().to_string()
}

#[test]
fn run_streams_only_generated_text_to_stdout() {
    let env = Env::fake();
    let model = fake_model(&env);
    let output = env.run(&["run", &model, "hello", "pipes", "and", "sockets"]);
    assert_success(&output);
    // The fake echoes the prompt; nothing else may appear on stdout, and stderr stays quiet
    // when it is not a terminal.
    assert_eq!(stdout(&output), "hello pipes and sockets");
    assert_eq!(stderr(&output), "");
}

#[test]
fn piped_stdin_follows_the_prompt_after_a_blank_line() {
    let env = Env::fake();
    let model = fake_model(&env);
    let output = env.run_with_stdin(&["run", &model, "Summarise:"], "line one\nline two\n");
    assert_success(&output);
    assert_eq!(stdout(&output), "Summarise:\n\nline one\nline two\n");

    let output = env.run_with_stdin(&["run", &model], "only stdin");
    assert_eq!(stdout(&output), "only stdin");

    let output = env.run_with_stdin(&["run", "--no-stdin", &model, "args only"], "ignored");
    assert_eq!(stdout(&output), "args only");

    let output = env.run_with_stdin(&["run", &model], "");
    assert_exit(&output, 2);
    assert!(stderr(&output).contains("no prompt"), "{}", stderr(&output));
}

#[test]
fn json_mode_writes_token_lines_and_a_done_line() {
    let env = Env::fake();
    let model = fake_model(&env);
    let output = env.run(&["run", "--json", "-n", "2", &model, "one two three"]);
    assert_success(&output);
    let lines: Vec<serde_json::Value> =
        stdout(&output).lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(stdout(&output).starts_with("{\"type\":\"token\""));
    assert_eq!(lines[0]["text"], "one ");
    assert_eq!(lines[1]["text"], "two ");
    assert_eq!(lines[2]["type"], "done");
    assert_eq!(lines[2]["finish_reason"], "length");
    assert_eq!(lines[2]["usage"]["completion_tokens"], 2);
    assert!(lines[2]["timings"].is_object());
}

#[test]
fn sampling_options_pass_through_and_never_reload_the_model() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    let model = fake_model(&env);
    let args = [
        "run",
        "--temperature",
        "0.25",
        "--top-p",
        "0.5",
        "--top-k",
        "7",
        "--min-p",
        "0.1",
        "--repeat-penalty",
        "1.2",
        "--seed",
        "42",
        "--stop",
        "END",
        "--stop",
        "\n\n",
        "-n",
        "9",
        "--system",
        "be brief",
        &model,
        "hi",
    ];
    assert_success(&env.run(&args));
    let pid_before = env.status_json()["instances"][0]["pid"].clone();
    assert_success(&env.run(&["run", "--temperature", "1.5", &model, "again"]));
    assert_success(&env.run(&["run", "--raw", &model, "raw text"]));

    let requests: Vec<serde_json::Value> =
        std::fs::read_to_string(&record).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let first = &requests[0];
    assert_eq!(first["temperature"], 0.25);
    assert_eq!(first["top_p"], 0.5);
    assert_eq!(first["top_k"], 7);
    assert_eq!(first["repeat_penalty"].as_f64().map(|v| (v * 10.0).round()), Some(12.0));
    assert_eq!(first["seed"], 42);
    assert_eq!(first["stop"], serde_json::json!(["END", "\n\n"]));
    assert_eq!(first["max_tokens"], 9);
    assert_eq!(first["messages"][0], serde_json::json!({"role": "system", "content": "be brief"}));
    assert_eq!(first["messages"][1], serde_json::json!({"role": "user", "content": "hi"}));
    assert_eq!(requests[2]["prompt"], "raw text", "--raw goes to /completion");

    let status = env.status_json();
    let instances = status["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "a sampling option must not create an instance: {status}");
    assert_eq!(instances[0]["pid"], pid_before, "a sampling option must not reload");
    assert_eq!(instances[0]["requests"], 3);
}

#[test]
fn invalid_values_are_refused_before_anything_starts() {
    let env = Env::fake();
    let model = fake_model(&env);
    for args in [
        vec!["run", "--temperature", "-1", &model, "x"],
        vec!["run", "--top-p", "1.5", &model, "x"],
        vec!["run", "--min-p", "nan", &model, "x"],
        vec!["run", "-n", "-1", &model, "x"],
        vec!["run", "--top-k", "many", &model, "x"],
        vec!["run", "--stop", "", &model, "x"],
        vec!["run", "--system", "s", "--raw", &model, "x"],
        vec!["stop"],
        vec!["frobnicate"],
    ] {
        let output = env.run(&args);
        assert_exit(&output, 2);
        assert!(!stderr(&output).is_empty());
    }
    assert!(!env.socket().exists(), "no daemon may start for a bad command line");
}

#[test]
fn bad_models_get_their_exit_codes_without_a_daemon() {
    let env = Env::fake();
    let not_gguf = env.path("models/notes.gguf");
    std::fs::write(&not_gguf, "these are notes, not a model\n").unwrap();
    let full = std::fs::read(env.tiny_model("full.gguf")).unwrap();
    let truncated = env.path("models/truncated.gguf");
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let header_only = env.path("models/header.gguf");
    std::fs::write(&header_only, &full[..20]).unwrap();
    let missing = env.path("models/missing.gguf");
    let directory = env.path("models");

    let table: [(&str, i32, &str); 6] = [
        (missing.to_str().unwrap(), 66, "not found"),
        ("no-such-alias", 66, "unknown model"),
        (not_gguf.to_str().unwrap(), 65, "GGUF magic"),
        (truncated.to_str().unwrap(), 65, "truncated"),
        (header_only.to_str().unwrap(), 65, "truncated"),
        (directory.to_str().unwrap(), 65, "directory"),
    ];
    for (model, code, message) in table {
        let output = env.run(&["run", model, "hi"]);
        assert_exit(&output, code);
        assert!(stderr(&output).contains(message), "{model}: {}", stderr(&output));
        assert!(stdout(&output).is_empty());
    }
    assert!(!env.socket().exists(), "no daemon may start for a bad model");
}

#[test]
fn aliases_and_bad_config() {
    let env = Env::fake();
    let model = fake_model(&env);
    env.write_config(&format!("[models.echo]\npath = \"{model}\"\nctx_size = 512\n"));
    let output = env.run(&["run", "echo", "via alias"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "via alias");
    assert_eq!(env.status_json()["instances"][0]["ctx_size"], 512);

    env.write_config("[models.echo]\npath = \"/x.gguf\"\ncontext = 5\n");
    let output = env.run(&["run", "echo", "hi"]);
    assert_exit(&output, 65);
    assert!(stderr(&output).contains("line 3"), "{}", stderr(&output));
}

#[test]
fn a_bad_config_line_is_named_with_its_fix_and_config_shows_the_rest() {
    let env = Env::fake();
    let model = fake_model(&env);
    env.write_config(&format!(
        "queue_depth = 8\nmax_instances = 2\ndefault_ttl = 30m\nmemory_budget = \"lots\"\n\
         [models.echo]\npath = \"{model}\"\nttl = \"soon\"\n"
    ));
    let fix = "line 3: default_ttl = 30m is not valid TOML: durations are strings, write default_ttl = \"30m\"";
    // Every command names each mistake with its line and what to write.
    for args in [&["status"][..], &["run", "echo", "hi"][..], &["ls"][..]] {
        let output = env.run(args);
        assert_exit(&output, 65);
        let err = stderr(&output);
        assert!(err.contains(fix), "{args:?}: {err}");
        assert!(err.contains("line 4: memory_budget = \"lots\": `lots` is not a size"), "{args:?}: {err}");
        assert!(err.contains("line 7: models.echo.ttl = \"soon\": `soon` is not a duration"), "{args:?}: {err}");
    }
    // `config` prints the settings it could read, then the same errors.
    let output = env.run(&["config"]);
    assert_exit(&output, 65);
    let settings = stdout(&output);
    for (name, value) in [("queue_depth", "8"), ("max_instances", "2"), ("default_ttl", "never")] {
        let line = settings.lines().find(|line| line.starts_with(&format!("{name} "))).unwrap_or_default();
        assert!(line.split_whitespace().nth(1) == Some(value), "{name} {value}: {settings}");
    }
    assert!(stderr(&output).contains(fix), "{}", stderr(&output));
    assert!(!env.socket().exists(), "no daemon starts on a bad config");
}

#[test]
fn run_stops_at_a_documented_token_limit_unless_told_otherwise() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    let model = fake_model(&env);
    // The limit each request carried: `max_tokens` in chat mode, `n_predict` raw.
    let limits = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&record)
            .unwrap()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .map(|request| request.get("max_tokens").or(request.get("n_predict")).cloned().unwrap_or_default())
            .collect()
    };
    assert_success(&env.run(&["run", &model, "default"]));
    assert_success(&env.run(&["run", "--raw", &model, "default raw"]));
    assert_success(&env.run(&["run", "-n", "0", &model, "no limit"]));
    assert_success(&env.run(&["run", "-n", "5", &model, "five"]));
    env.write_config("max_tokens = 64\n");
    assert_success(&env.run(&["run", &model, "configured"]));
    env.write_config("max_tokens = 0\n");
    assert_success(&env.run(&["run", &model, "configured without a limit"]));
    let none = serde_json::Value::Null;
    assert_eq!(limits(), [1024.into(), 1024.into(), none.clone(), 5.into(), 64.into(), none]);
    let output = env.run(&["config"]);
    let settings = stdout(&output);
    let line = settings.lines().find(|line| line.starts_with("max_tokens ")).unwrap_or_default();
    assert!(line.contains(" 0 (no limit)") && line.contains("(config "), "{settings}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn no_llama_server_binary_is_unavailable_and_never_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("llama-server");
    let env = Env::with_server(&binary);
    let model = fake_model(&env);
    // More tries than the crash-loop breaker allows: a missing binary is no crash.
    for _ in 0..4 {
        let output = env.command(&["run", &model, "hi"]).env("PATH", "/usr/bin:/bin").output().unwrap();
        assert_exit(&output, 69);
        assert!(stderr(&output).contains("llmctl setup"), "{}", stderr(&output));
        assert!(stderr(&output).contains("llmctl shutdown"), "says how a running daemon gets it: {}", stderr(&output));
    }
    // Installed now: the running daemon finds it at the next request.
    std::os::unix::fs::symlink(FAKE_SERVER, &binary).unwrap();
    let output = env.command(&["run", &model, "hi"]).env("PATH", "/usr/bin:/bin").output().unwrap();
    assert_success(&output);
    assert_eq!(stdout(&output), "hi");
}

#[test]
fn autostart_can_be_turned_off() {
    let env = Env::fake();
    let model = fake_model(&env);
    let output = env.command(&["run", &model, "hi"]).env("LLMCTL_NO_AUTOSTART", "1").output().unwrap();
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("autostart is off"), "{}", stderr(&output));
    let output = env.run(&["--no-autostart", "status"]);
    assert_exit(&output, 69);
}

#[test]
fn closing_stdout_cancels_upstream_and_exits_zero() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    env.set("FAKE_LLAMA_TOKENS", "10000000");
    let model = fake_model(&env);
    assert_success(&env.run(&["warm", &model]));

    // `-n 0`: no token limit, so the generation is still going when the reader leaves.
    let mut child = env.spawn(&["run", "-n", "0", &model, "go"]);
    let mut first = [0u8; 20];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    drop(child.stdout.take()); // what `| head -c 20` does
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert_eq!(err, "");
    wait_until("the fake server sees the client go away", || {
        std::fs::read_to_string(&record).unwrap_or_default().contains("cancelled")
    });
    wait_until("the slot is free again", || env.status_json()["instances"][0]["in_flight"] == 0);
}

#[test]
fn ctrl_c_cancels_upstream_and_exits_130() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    env.set("FAKE_LLAMA_TOKENS", "100000");
    env.set("FAKE_LLAMA_TOKEN_MS", "5");
    let model = fake_model(&env);
    let mut child = env.spawn(&["run", &model, "go"]);
    let mut first = [0u8; 4];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    assert_exit(&output, 130);
    wait_until("the fake server sees the cancellation", || {
        std::fs::read_to_string(&record).unwrap_or_default().contains("cancelled")
    });
}

#[test]
fn warm_is_quiet_and_idempotent_and_stop_unloads() {
    let env = Env::fake();
    let model = fake_model(&env);
    for _ in 0..2 {
        let output = env.run(&["warm", &model]);
        assert_success(&output);
        assert!(output.stdout.is_empty() && output.stderr.is_empty());
    }
    let status = env.status_json();
    assert_eq!(status["instances"].as_array().unwrap().len(), 1);
    assert_eq!(status["instances"][0]["state"], "ready");
    let pid = status["instances"][0]["pid"].as_u64().unwrap() as u32;

    assert_success(&env.run(&["stop", &model]));
    assert!(!alive(pid), "stop returned before the child was gone");
    assert_eq!(env.status_json()["instances"][0]["state"], "stopped");

    // The next request loads it again.
    assert_eq!(stdout(&env.run(&["run", &model, "back"])), "back");
    assert_success(&env.run(&["stop", "--all"]));
    assert_success(&env.run(&["shutdown"]));
    assert!(!env.socket().exists());
    env.assert_nothing_survives();
}

#[test]
fn status_shows_instances_in_a_table() {
    let env = Env::fake();
    let model = fake_model(&env);
    assert_success(&env.run(&["run", &model, "a b c"]));
    let output = env.run(&["status"]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.contains("model.gguf") && text.contains("ready") && text.contains("1/3"), "{text}");
    let status = env.status_json();
    assert!(status["daemon"]["rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(status["instances"][0]["usage"]["completion_tokens"], 3);
    assert!(status["instances"][0]["rss_bytes"].as_u64().unwrap() > 0);
    assert!(status["instances"][0]["estimate_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn status_tells_instances_of_one_model_apart() {
    let env = Env::fake();
    let model = fake_model(&env);
    env.write_config(&format!(
        "[models.embed]\npath = \"{model}\"\nembeddings = true\nargs = [\"--fake-token-ms\", \"1\"]\n"
    ));
    assert_success(&env.run(&["warm", &model, "--ctx-size", "256"]));
    assert_success(&env.run(&["warm", &model, "--ctx-size", "512", "--ttl", "2h"]));
    assert_success(&env.run(&["warm", "embed"]));
    let output = env.run(&["status"]);
    assert_success(&output);
    let text = stdout(&output);
    let row =
        |needle: &str| text.lines().find(|line| line.contains(needle)).unwrap_or_else(|| panic!("{needle}: {text}"));
    assert!(text.lines().any(|line| line.starts_with("MODEL") && line.contains("CTX") && line.ends_with("OPTIONS")));
    assert!(row(" 256 ").starts_with("model.gguf") && row(" 256 ").ends_with(" -"), "{text}");
    assert!(row(" 512 ").contains("ready (pinned 2h00m)") || row(" 512 ").contains("ready (pinned 1h59m)"), "{text}");
    assert!(row("embed ").ends_with(" embeddings --fake-token-ms 1"), "{text}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn switch_loads_in_the_background_and_exclusive_unloads_others() {
    let env = Env::fake();
    let first = env.tiny_model("first.gguf").display().to_string();
    let second = env.tiny_model("second.gguf").display().to_string();
    assert_success(&env.run(&["switch", "--wait", &first]));
    assert_success(&env.run(&["switch", &second, "--exclusive"]));
    wait_until("the second model is ready and the first unloaded", || {
        let status = env.status_json();
        let state_of = |name: &str| {
            status["instances"].as_array().unwrap().iter().find(|i| i["name"] == name).map(|i| i["state"].clone())
        };
        state_of("second.gguf") == Some("ready".into()) && state_of("first.gguf") == Some("stopped".into())
    });
}

#[test]
fn help_and_version_succeed() {
    let env = Env::fake();
    let output = env.run(&["--help"]);
    assert_success(&output);
    assert!(stdout(&output).contains("EXIT STATUS"));
    assert_success(&env.run(&["--version"]));
}

#[test]
fn config_shows_effective_values_and_their_sources() {
    let env = Env::fake();
    let model = fake_model(&env);
    env.write_config(&format!("queue_depth = 9\n[models.coder]\npath = \"{model}\"\nparallel = 2\npinned = true\n"));
    let output = env.command(&["config", "--json"]).env("LLMCTL_MEMORY_BUDGET", "2GiB").output().unwrap();
    assert_success(&output);
    let settings: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let find = |name: &str| settings.iter().find(|s| s["name"] == name).cloned().unwrap();
    assert_eq!(find("queue_depth")["value"], "9");
    assert!(find("queue_depth")["source"].as_str().unwrap().starts_with("config "));
    assert_eq!(find("memory_budget")["value"], "2GiB");
    assert_eq!(find("memory_budget")["source"], "environment LLMCTL_MEMORY_BUDGET");
    assert_eq!(find("max_instances")["source"], "default");
    assert_eq!(find("llama_server")["source"], "environment LLMCTL_LLAMA_SERVER");
    let coder = find("models.coder")["value"].as_str().unwrap().to_string();
    assert!(coder.contains("parallel=2") && coder.contains("pinned"), "{coder}");
    assert!(!env.socket().exists(), "config needs no daemon");
}

#[test]
fn stopping_a_background_load_cancels_it_and_its_waiters() {
    let env = Env::fake();
    let path = env.tiny_model("slow.gguf");
    env.write_config(&format!(
        "[models.slow]\npath = \"{}\"\nargs = [\"--fake-start-ms\", \"60000\"]\n",
        path.display()
    ));
    assert_success(&env.run(&["switch", "slow"]));
    wait_until("the load is under way", || env.status_json()["instances"][0]["state"] == "starting");
    let waiter = env.spawn(&["run", "slow", "hi"]);
    // The switch and the run both wait for the one load.
    wait_until("the waiter waits for the load", || env.status_json()["instances"][0]["queued"] == 2);
    assert_success(&env.run(&["stop", "slow"]));
    let output = waiter.wait_with_output().unwrap();
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("slow was stopped by `llmctl stop`"), "{}", stderr(&output));
    assert_eq!(env.status_json()["instances"][0]["state"], "stopped");
    assert!(env.processes().iter().all(|(_, cmd)| !cmd.contains("slow.gguf")), "the half-started child is gone");
}

#[test]
fn a_running_daemon_refuses_bad_models_with_the_same_codes() {
    let env = Env::fake();
    assert_success(&env.run(&["status"]));
    let full = std::fs::read(env.tiny_model("full.gguf")).unwrap();
    let truncated = env.path("models/truncated.gguf");
    std::fs::write(&truncated, &full[..full.len() - 100]).unwrap();
    let not_gguf = env.path("models/text.gguf");
    std::fs::write(&not_gguf, "plain text").unwrap();
    for (path, message) in [(&truncated, "truncated"), (&not_gguf, "GGUF magic")] {
        let output = env.run(&["run", path.to_str().unwrap(), "hi"]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains(message), "{}", stderr(&output));
    }
    // A file that changes under a loaded instance is checked again.
    let model = env.path("models/changing.gguf");
    std::fs::write(&model, &full).unwrap();
    assert_success(&env.run(&["warm", model.to_str().unwrap()]));
    std::fs::write(&model, &full[..full.len() - 100]).unwrap();
    assert_exit(&env.run(&["run", model.to_str().unwrap(), "hi"]), 65);
}

#[test]
fn setup_names_a_missing_compiler_and_changes_nothing() {
    let env = Env::with_server(std::path::Path::new("/nonexistent"));
    // Everything a build needs but a C++ compiler, and no llama-server anywhere.
    let bin = tools_without_a_compiler(&env);
    let output =
        env.command(&["setup", "--no-model"]).env_remove("LLMCTL_LLAMA_SERVER").env("PATH", &bin).output().unwrap();
    assert_exit(&output, 69);
    let err = stderr(&output);
    assert!(err.contains("no C++ compiler") && err.contains("apt-get install g++"), "{err}");
    assert!(!env.path("data/llama.cpp").exists(), "nothing half-installed");
    assert!(!env.path("cache/llama.cpp-b11434").exists(), "nothing downloaded");
}

#[test]
fn setup_builds_for_the_accelerator_it_finds() {
    let env = Env::with_server(std::path::Path::new("/nonexistent"));
    let bin = tools_without(&env, &[]);
    let fake = |name: &str, script: &str| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    let plan = |args: &[&str], extra: &[(&str, &str)]| {
        let mut command = env.command(&[&["setup", "--dry-run"], args].concat());
        command.env_remove("LLMCTL_LLAMA_SERVER").env("PATH", &bin).env_remove("VULKAN_SDK");
        for (name, value) in extra {
            command.env(name, value);
        }
        let output = command.output().unwrap();
        assert_success(&output);
        stdout(&output)
    };
    // No GPU: a native CPU build, or a portable one when asked.
    let cpu = plan(&[], &[]);
    assert!(cpu.contains("backend: cpu\n") && cpu.contains("-DGGML_NATIVE=ON") && !cpu.contains("CUDA"), "{cpu}");
    assert!(plan(&["--portable"], &[]).contains("-DGGML_NATIVE=OFF"));
    // An H200 and the CUDA toolkit: CUDA for its compute capability.
    fake("nvcc", "echo 'Cuda compilation tools, release 12.4'");
    fake("nvidia-smi", "echo 9.0");
    let cuda = plan(&[], &[]);
    assert!(cuda.contains("backend: cuda-sm90"), "{cuda}");
    assert!(cuda.contains("-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90"), "{cuda}");
    assert!(cuda.contains("llama.cpp/b11434-cuda-sm90/llama-server"), "each backend has its own directory: {cuda}");
    assert!(plan(&["--backend", "cpu"], &[]).contains("backend: cpu\n"), "the choice overrides");
    // A GPU without the toolkit: CPU, and `--version` says how to get a GPU build.
    std::fs::remove_file(bin.join("nvcc")).unwrap();
    assert!(plan(&[], &[]).contains("backend: cpu\n"));
    let output = env.command(&["--version"]).env_remove("LLMCTL_LLAMA_SERVER").env("PATH", &bin).output().unwrap();
    assert!(stdout(&output).contains("NVIDIA GPU but llama-server is a CPU build"), "{}", stdout(&output));
    let output = env
        .command(&["setup", "--dry-run", "--backend", "cuda"])
        .env_remove("LLMCTL_LLAMA_SERVER")
        .env("PATH", &bin)
        .output()
        .unwrap();
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("nvcc"), "{}", stderr(&output));
    // The Vulkan SDK: glslc and the headers.
    std::fs::remove_file(bin.join("nvidia-smi")).unwrap();
    fake("glslc", "true");
    let sdk = env.path("vulkan-sdk");
    std::fs::create_dir_all(sdk.join("include/vulkan")).unwrap();
    std::fs::write(sdk.join("include/vulkan/vulkan.h"), "").unwrap();
    let vulkan = plan(&[], &[("VULKAN_SDK", sdk.to_str().unwrap())]);
    assert!(vulkan.contains("backend: vulkan") && vulkan.contains("-DGGML_VULKAN=ON"), "{vulkan}");
    assert!(!env.path("data/llama.cpp").exists(), "a dry run changes nothing");
}

#[test]
fn first_use_in_a_fresh_environment_sets_everything_up_without_root_tools() {
    // An empty HOME and XDG tree, no llama-server, no demo model, and no cmake or make on
    // PATH: `run demo` installs cmake and ninja from PyPI into llmctl's cache, builds
    // llama-server, fetches the demo model, and answers.
    let env = Env::with_server(std::path::Path::new("/nonexistent"));
    let bin = tools_without(&env, &["cmake", "make", "ctest", "cpack", "ninja"]);
    let output = env
        .command(&["run", "-n", "8", "--temperature", "0", "demo", "Say hello"])
        .env_remove("LLMCTL_LLAMA_SERVER")
        .env_remove("LLMCTL_NO_SETUP")
        .env("PATH", &bin)
        .output()
        .unwrap();
    assert_success(&output);
    assert!(!stdout(&output).trim().is_empty(), "the demo model answered");
    let err = stderr(&output);
    assert!(err.contains("installing cmake and ninja from PyPI"), "{err}");
    assert!(err.contains("installed llama-server build 11434 for cpu"), "{err}");
    assert!(err.contains("installed the demo model"), "{err}");
    assert!(env.path("cache/build-tools/bin/cmake").exists());
    // A second time everything is there: no setup step, the same answer.
    let again = env
        .command(&["run", "-n", "8", "--temperature", "0", "demo", "Say hello"])
        .env_remove("LLMCTL_LLAMA_SERVER")
        .env_remove("LLMCTL_NO_SETUP")
        .env("PATH", &bin)
        .output()
        .unwrap();
    assert_success(&again);
    assert_eq!(stdout(&again), stdout(&output));
    assert!(!stderr(&again).contains("setting up"), "{}", stderr(&again));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn setup_is_quick_and_quiet_about_what_is_already_there() {
    let env = Env::real();
    let output = env.run(&["setup", "--no-model"]);
    assert_success(&output);
    assert!(stderr(&output).contains("using llama-server at"), "{}", stderr(&output));
    let output = env.run(&["setup", "--no-model", "--quiet"]);
    assert_success(&output);
    assert_eq!(stderr(&output), "");
}

#[test]
fn a_terminal_sees_loading_progress_and_a_final_newline() {
    let env = Env::fake();
    let path = env.tiny_model("slow.gguf");
    env.write_config(&format!("[models.slow]\npath = \"{}\"\nargs = [\"--fake-start-ms\", \"300\"]\n", path.display()));
    // `script` gives the command a terminal for stdout and stderr, in this environment.
    let mut command = std::process::Command::new("script");
    command.args(["-qec", &format!("{LLMCTL} run slow terminal words"), "/dev/null"]);
    for (name, value) in env.command(&[]).get_envs() {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    let output = command.stdin(std::process::Stdio::null()).output().expect("script runs");
    assert_success(&output);
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(screen.contains("loading slow..."), "{screen:?}");
    assert!(screen.contains("terminal words\r\n"), "a terminal gets a final newline: {screen:?}");
}

#[test]
fn a_model_whose_file_is_gone_can_still_be_stopped() {
    let env = Env::fake();
    let model = env.tiny_model("doomed.gguf");
    assert_success(&env.run(&["warm", model.to_str().unwrap()]));
    let pid = env.status_json()["instances"][0]["pid"].as_u64().unwrap() as u32;
    std::fs::remove_file(&model).unwrap();
    assert_success(&env.run(&["stop", model.to_str().unwrap()]));
    assert!(!alive(pid), "the instance of a deleted file was not stopped");
}

#[test]
fn a_mistyped_subcommand_is_exit_2_and_never_suggests_a_destructive_one() {
    let env = Env::fake();
    let output = env.run(&["shotdown"]);
    assert_exit(&output, 2);
    let err = stderr(&output);
    assert!(!err.contains("'shutdown'"), "{err}");
    assert!(err.contains("llmctl --help"), "{err}");

    let output = env.run(&["stauts"]);
    assert_exit(&output, 2);
    assert!(stderr(&output).contains("'status'"), "{}", stderr(&output));

    // The usage line shows what the command needs, not the options the environment sets
    // (this one sets LLMCTL_SOCKET, LLMCTL_CONFIG, LLMCTL_LLAMA_SERVER and, here,
    // LLMCTL_NO_AUTOSTART).
    let output = env.command(&["stop"]).env("LLMCTL_NO_AUTOSTART", "1").output().unwrap();
    assert_exit(&output, 2);
    let err = stderr(&output);
    assert!(err.contains("\nUsage: llmctl stop <MODEL|--all>\n"), "{err}");
}
