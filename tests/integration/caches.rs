//! Prompt caches kept across unloads: saved before a child stops, restored when the same
//! model loads again, never restored into anything else. End to end against the real
//! llama-server (SmolLM2 for the follow-up after a swap, the tiny model where only the
//! bookkeeping is at stake), and against the fake one for what a real server does not do
//! on demand: a save that never finishes, a refused restore.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

const COLORS: [&str; 3] = ["red", "blue", "green"];

/// A prompt of plain sentences, over the 256 tokens a slot needs to be saved: 36 of them
/// are about 320 SmolLM2 tokens, 12 about 430 of the tiny model (whose vocabulary spells
/// most words a byte at a time).
fn sentences(count: usize) -> String {
    (0..count).map(|i| format!("Item {i} is a {} ball.", COLORS[i % 3])).collect::<Vec<_>>().join(" ")
}

const SMOL_SENTENCES: usize = 36;
const TINY_SENTENCES: usize = 12;

/// The prefix of `count` sentences and a few words more, as the next turn of a
/// conversation would be.
fn follow_up(count: usize) -> String {
    format!("{} Item {count} is a", sentences(count))
}

/// `llmctl run --raw --json -n 1` with `extra` options; the final `done` line.
fn run_json(env: &Env, model: &str, prompt: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["run", "--raw", "--json", "-n", "1"];
    args.extend_from_slice(extra);
    args.extend([model, prompt]);
    let output = env.run(&args);
    assert_success(&output);
    let last = stdout(&output).lines().last().map(str::to_string).unwrap_or_default();
    let done: serde_json::Value = serde_json::from_str(&last).expect("a done line");
    assert_eq!(done["type"], "done", "{last}");
    done
}

/// The prompt tokens llama-server computed for a request (not those it took from a cache).
fn prompt_n(done: &serde_json::Value) -> u64 {
    done["timings"]["prompt_n"].as_u64().unwrap_or_else(|| panic!("no timings.prompt_n in {done}"))
}

fn cache_dir(env: &Env) -> PathBuf {
    env.path("state/prompt-caches")
}

/// The files in the cache directory, by name.
fn cache_files(env: &Env) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache_dir(env))
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn cache_bytes_on_disk(env: &Env) -> u64 {
    cache_files(env).iter().map(|name| std::fs::metadata(cache_dir(env).join(name)).map_or(0, |m| m.len())).sum()
}

fn caches(env: &Env) -> serde_json::Value {
    env.status_json()["caches"].clone()
}

fn entries(env: &Env) -> Vec<serde_json::Value> {
    caches(env)["entries"].as_array().cloned().unwrap_or_default()
}

fn counter(env: &Env, name: &str) -> u64 {
    caches(env)["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name}"))
}

fn daemon_log(env: &Env) -> String {
    std::fs::read_to_string(env.path("state/daemon.log")).unwrap_or_default()
}

/// `llmctl events`, read on a thread of its own while the test goes on.
struct Events {
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Events {
    fn follow(env: &Env) -> Events {
        assert_success(&env.run(&["status"]));
        let mut watcher = env.spawn(&["events"]);
        let lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(serde_json::from_str(&line).unwrap());
            }
            let _ = watcher.wait();
        });
        wait_until("the watcher is subscribed", || env.status_json()["daemon"]["event_subscribers"] == 1);
        Events { seen }
    }

    fn of_kind(&self, kind: &str) -> Vec<serde_json::Value> {
        self.seen.lock().unwrap().iter().filter(|event| event["event"] == kind).cloned().collect()
    }

    fn wait_for(&self, kind: &str, count: usize) -> Vec<serde_json::Value> {
        wait_until(&format!("{count} `{kind}` events"), || self.of_kind(kind).len() >= count);
        self.of_kind(kind)
    }
}

#[test]
fn a_follow_up_after_a_swap_computes_only_its_new_tokens() {
    let env = Env::real();
    env.write_config("max_instances = 1\n");
    let smol = demo_model().display().to_string();
    let tiny = env.tiny_model("tiny.gguf").display().to_string();
    let events = Events::follow(&env);
    let prefix = sentences(SMOL_SENTENCES);
    let first = prompt_n(&run_json(&env, &smol, &prefix, &[]));
    assert!(first >= 256, "the prefix is {first} tokens");

    // Room for one model: the tiny one evicts SmolLM2, whose slot is saved first.
    assert_success(&env.run(&["run", "--raw", "-n", "1", &tiny, "x"]));
    let saved = events.wait_for("saved", 1).remove(0);
    assert_eq!(saved["path"], smol.as_str(), "{saved}");
    assert!(saved["tokens"].as_u64().unwrap() >= first, "the whole prompt is saved: {saved}");
    assert!(saved["bytes"].as_u64().unwrap() > 1 << 20 && saved["ms"].is_u64(), "{saved}");
    let kept = entries(&env);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["bytes"], saved["bytes"]);

    let follow = prompt_n(&run_json(&env, &smol, &follow_up(SMOL_SENTENCES), &[]));
    assert!(follow * 10 <= first, "the follow-up computed {follow} of the prefix's {first} tokens");
    let restored = events.wait_for("restored", 1).remove(0);
    assert_eq!(restored["tokens"], saved["tokens"], "{restored}");
    assert!(restored["ms"].is_u64(), "{restored}");
    let metrics = stdout(&env.run(&["metrics"]));
    for line in ["llmctl_prompt_cache_saves_total 1", "llmctl_prompt_cache_restores_total 1"] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // Without the feature, the same follow-up computes the whole prefix again.
    env.write_config("max_instances = 1\ncache_budget = \"0\"\n");
    assert_success(&env.run(&["reload"]));
    assert!(entries(&env).is_empty() && cache_files(&env).is_empty(), "{:?}", cache_files(&env));
    assert_success(&env.run(&["run", "--raw", "-n", "1", &tiny, "x"]));
    let again = prompt_n(&run_json(&env, &smol, &follow_up(SMOL_SENTENCES), &[]));
    assert!(again >= first, "without saved caches the follow-up computed {again} of {first} tokens");
    assert_eq!(events.of_kind("restored").len(), 1);
}

#[test]
fn a_changed_file_other_options_or_another_build_compute_the_whole_prompt_again() {
    let mut env = Env::real();
    let model = env.tiny_model("m.gguf").display().to_string();
    let full = prompt_n(&run_json(&env, &model, &sentences(TINY_SENTENCES), &[]));
    assert!(full >= 256, "{full}");
    assert_success(&env.run(&["stop", &model]));
    // The same file, options and build: restored.
    let same = prompt_n(&run_json(&env, &model, &follow_up(TINY_SENTENCES), &[]));
    assert!(same * 10 <= full, "the same instance computed {same} of {full}");
    assert_success(&env.run(&["stop", &model]));
    assert_eq!(counter(&env, "restores"), 1);

    // Other options are another instance: nothing of the first is restored into it.
    let other_options = prompt_n(&run_json(&env, &model, &follow_up(TINY_SENTENCES), &["--ctx-size", "1024"]));
    assert!(other_options >= full, "another context size computed {other_options} of {full}");
    assert_success(&env.run(&["stop", "--all"]));
    assert_eq!(entries(&env).len(), 2, "each instance keeps its own");

    // Another llama-server build: a copy of the binary is another file.
    assert_success(&env.run(&["shutdown"]));
    let copy = env.path("other-build/llama-server");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(&env.llama_server, &copy).unwrap();
    env.set("LLMCTL_LLAMA_SERVER", copy.to_str().unwrap());
    let other_build = prompt_n(&run_json(&env, &model, &follow_up(TINY_SENTENCES), &[]));
    assert!(other_build >= full, "another build computed {other_build} of {full}");
    assert_eq!(counter(&env, "discarded"), 1, "the old build's cache of this instance is dropped");
    assert_success(&env.run(&["stop", &model]));

    // A changed file: the same path with another modification time.
    let file = std::fs::File::options().write(true).open(&model).unwrap();
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(60)).unwrap();
    drop(file);
    let changed = prompt_n(&run_json(&env, &model, &follow_up(TINY_SENTENCES), &[]));
    assert!(changed >= full, "a changed file computed {changed} of {full}");
    assert_eq!(counter(&env, "discarded"), 2);
    assert_eq!(counter(&env, "restores"), 0, "nothing was restored since the build changed");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_truncated_or_foreign_save_file_is_ignored_with_one_log_line() {
    let env = Env::real();
    let model = env.tiny_model("m.gguf").display().to_string();
    let full = prompt_n(&run_json(&env, &model, &sentences(TINY_SENTENCES), &[]));
    // Another conversation on another instance of the same file.
    let other = sentences(TINY_SENTENCES).replace("ball", "cube");
    prompt_n(&run_json(&env, &model, &other, &["--ctx-size", "1024"]));
    assert_success(&env.run(&["stop", "--all"]));
    // Which slot file belongs to which instance, from llmctl's manifests.
    let file_of = |ctx_size: serde_json::Value| -> PathBuf {
        let manifest = cache_files(&env)
            .into_iter()
            .filter(|name| name.ends_with(".json"))
            .find(|name| {
                let text = std::fs::read_to_string(cache_dir(&env).join(name)).unwrap();
                serde_json::from_str::<serde_json::Value>(&text).unwrap()["load"]["ctx_size"] == ctx_size
            })
            .expect("a manifest");
        cache_dir(&env).join(manifest.replace(".json", ".bin"))
    };
    let (default_file, small_file) = (file_of(serde_json::Value::Null), file_of(1024.into()));
    // The other instance's file in place of this one's: llama-server would load it without
    // a word. And a file cut in half: llama-server aborts on it (GGML_ASSERT).
    std::fs::copy(&small_file, &default_file).unwrap();
    let bytes = std::fs::read(&small_file).unwrap();
    std::fs::write(&small_file, &bytes[..bytes.len() / 2]).unwrap();

    let foreign = prompt_n(&run_json(&env, &model, &follow_up(TINY_SENTENCES), &[]));
    assert!(foreign >= full, "the foreign file was not used: {foreign} of {full}");
    let truncated = prompt_n(&run_json(&env, &model, &format!("{other} Item 12 is a"), &["--ctx-size", "1024"]));
    assert!(truncated >= full, "the truncated file was not used: {truncated} of {full}");
    let status = env.status_json();
    for instance in status["instances"].as_array().unwrap() {
        assert_eq!(instance["state"], "ready", "{instance}");
        assert_eq!(instance["restarts"], 0, "no child broke: {instance}");
    }
    let log = daemon_log(&env);
    assert_eq!(log.matches("ignored the saved prompt cache").count(), 2, "{log}");
    assert_eq!(counter(&env, "ignored"), 2);
    assert_eq!(counter(&env, "restores"), 0);
    assert!(!default_file.exists() && !small_file.exists(), "{:?}", cache_files(&env));
}

#[test]
fn the_disk_budget_holds_under_many_evictions() {
    let env = Env::real();
    env.write_config("max_instances = 1\n");
    let model = env.tiny_model("m.gguf").display().to_string();
    let prompt = sentences(TINY_SENTENCES);
    run_json(&env, &model, &prompt, &[]);
    assert_success(&env.run(&["stop", &model]));
    let one = entries(&env)[0]["bytes"].as_u64().unwrap();
    // Room for two and a half: every eviction after the second drops the oldest.
    let budget = one * 5 / 2;
    env.write_config(&format!("max_instances = 1\ncache_budget = \"{budget}\"\n"));
    assert_success(&env.run(&["reload"]));
    let contexts = ["1024", "1100", "1200", "1300", "1400", "1500"];
    for ctx_size in contexts {
        // Each context size is an instance of its own; loading it evicts the one before.
        run_json(&env, &model, &prompt, &["--ctx-size", ctx_size]);
        let on_disk = cache_bytes_on_disk(&env);
        assert!(on_disk <= budget, "{on_disk} bytes on disk over the budget of {budget}: {:?}", cache_files(&env));
        assert!(caches(&env)["used_bytes"].as_u64().unwrap() <= budget);
    }
    assert_success(&env.run(&["stop", "--all"]));
    assert!(cache_bytes_on_disk(&env) <= budget);
    let kept: Vec<u64> = entries(&env).iter().map(|e| e["ctx_size"].as_u64().unwrap_or(0)).collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept.contains(&1500) && kept.contains(&1400), "the most recent are kept: {kept:?}");
    assert!(counter(&env, "dropped") >= 4, "{}", caches(&env));
    assert_eq!(cache_files(&env).len(), 4, "two slot files and their manifests: {:?}", cache_files(&env));
}

#[test]
fn remote_models_are_left_alone() {
    let env = Env::real();
    let model = env.tiny_model("far.gguf");
    let own_dir = env.path("far-slots");
    std::fs::create_dir_all(&own_dir).unwrap();
    let mut server = Command::new(&env.llama_server)
        .args(["--model", model.to_str().unwrap(), "--host", "127.0.0.1", "--port", "0", "--no-webui"])
        .arg("--slot-save-path")
        .arg(&own_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("llama-server printed its address").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    env.write_config(&format!("[models.far]\nurl = \"{url}\"\n"));
    run_json(&env, "far", &sentences(TINY_SENTENCES), &[]);
    assert_success(&env.run(&["stop", "far"]));
    assert_success(&env.run(&["run", "--raw", "-n", "1", "far", "x"]));
    assert!(std::fs::read_dir(&own_dir).unwrap().next().is_none(), "llmctl saved a remote server's slot");
    assert!(cache_files(&env).is_empty() && entries(&env).is_empty());
    assert_eq!(counter(&env, "saves") + counter(&env, "restores"), 0);
    let _ = server.kill();
    let _ = server.wait();
}

/// A `[models.m]` of the fake server whose slot 0 holds `tokens` tokens, with more args.
fn fake_model(env: &Env, name: &str, tokens: u32, args: &[&str]) -> String {
    let tokens = tokens.to_string();
    let all: Vec<&str> = ["--fake-slot-tokens", &tokens].into_iter().chain(args.iter().copied()).collect();
    env.add_model(name, &all, "")
}

fn recorded(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_save_that_never_finishes_holds_a_stop_for_the_cache_timeout_at_most() {
    let mut env = Env::fake();
    env.set("LLMCTL_CACHE_TIMEOUT_MS", "1500");
    let model = fake_model(&env, "m", 300, &["--fake-save-stall"]);
    assert_success(&env.run(&["warm", &model]));
    let started = Instant::now();
    assert_success(&env.run(&["stop", &model]));
    let took = started.elapsed();
    // The save never answers, so the stop cannot be done before the deadline.
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(6), "the stop took {took:?}");
    assert_eq!(env.status_json()["instances"][0]["state"], "stopped");
    assert!(cache_files(&env).is_empty(), "the half-written file is removed: {:?}", cache_files(&env));
    assert_eq!(counter(&env, "save_failures"), 1);
    assert!(entries(&env).is_empty());
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_daemon_killed_during_a_save_leaves_nothing_that_is_restored() {
    let mut env = Env::fake();
    let record = env.path("record.txt");
    env.set("FAKE_LLAMA_RECORD", record.to_str().unwrap());
    let model = fake_model(&env, "m", 300, &["--fake-save-stall"]);
    assert_success(&env.run(&["warm", &model]));
    let daemon = env.daemon_pid().unwrap();
    let mut stopping = env.spawn(&["stop", &model]);
    wait_until("the child writes its slot", || cache_files(&env).iter().any(|name| name.ends_with(".partial")));
    assert!(Command::new("kill").args(["-KILL", &daemon.to_string()]).status().unwrap().success());
    let _ = stopping.wait();
    env.assert_nothing_survives();
    let left = cache_files(&env);
    assert!(left.len() == 1 && left[0].ends_with(".partial"), "only the half-written file is left: {left:?}");

    // The next daemon removes it, and restores nothing.
    env.write_config("");
    let model = fake_model(&env, "m", 300, &[]);
    let output = env.run(&["run", &model, "still here"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "still here");
    assert!(cache_files(&env).is_empty(), "{:?}", cache_files(&env));
    assert!(!recorded(&record).contains("restore "), "{}", recorded(&record));
    assert!(daemon_log(&env).contains("left half written by an earlier daemon"), "{}", daemon_log(&env));
    assert_eq!(counter(&env, "restores"), 0);
}

#[test]
fn stop_forget_drops_a_models_saved_caches_and_saves_none() {
    let mut env = Env::fake();
    let record = env.path("record.txt");
    env.set("FAKE_LLAMA_RECORD", record.to_str().unwrap());
    let a = fake_model(&env, "a", 300, &[]);
    let b = fake_model(&env, "b", 300, &[]);
    assert_success(&env.run(&["warm", &a]));
    assert_success(&env.run(&["warm", &b]));
    assert_success(&env.run(&["stop", "--all"]));
    assert_eq!(entries(&env).len(), 2);
    assert_eq!(cache_files(&env).len(), 4);
    // The fake writes 16 bytes a token; both are kept and shown.
    assert_eq!(caches(&env)["used_bytes"], 2 * 300 * 16);

    assert_success(&env.run(&["warm", &a]));
    assert_eq!(recorded(&record).matches("restore ").count(), 1, "{}", recorded(&record));
    assert_eq!(counter(&env, "restores"), 1);
    let saves_before = recorded(&record).matches("save ").count();
    assert_success(&env.run(&["stop", "--forget", &a]));
    assert_eq!(recorded(&record).matches("save ").count(), saves_before, "a forgetting stop saves nothing");
    let left: Vec<String> = entries(&env).iter().map(|e| e["model"].as_str().unwrap().to_string()).collect();
    assert_eq!(left, ["b"]);
    assert_eq!(cache_files(&env).len(), 2);
    assert_eq!(counter(&env, "forgotten"), 1);

    // With no daemon running, `--forget` starts one: only a daemon touches the caches.
    assert_success(&env.run(&["shutdown"]));
    assert_success(&env.run(&["stop", "--forget", "--all"]));
    assert!(entries(&env).is_empty() && cache_files(&env).is_empty(), "{:?}", cache_files(&env));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_restore_llama_server_refuses_is_logged_and_the_request_runs_without_it() {
    for refusal in ["fail", "zero"] {
        let mut env = Env::fake();
        env.set("FAKE_LLAMA_RESTORE", refusal);
        let model = fake_model(&env, "m", 300, &[]);
        assert_success(&env.run(&["warm", &model]));
        assert_success(&env.run(&["stop", &model]));
        assert_eq!(entries(&env).len(), 1, "{refusal}");
        let output = env.run(&["run", &model, "runs anyway"]);
        assert_success(&output);
        assert_eq!(stdout(&output), "runs anyway", "{refusal}");
        let log = daemon_log(&env);
        assert_eq!(log.matches("was not restored").count(), 1, "{refusal}: {log}");
        assert_eq!(counter(&env, "restore_failures"), 1, "{refusal}");
        assert_eq!(counter(&env, "restores"), 0, "{refusal}");
        // Never tried again.
        assert!(entries(&env).is_empty() && cache_files(&env).is_empty(), "{refusal}: {:?}", cache_files(&env));
    }
}

#[test]
fn a_restore_that_brings_the_child_down_drops_the_file_and_the_waiting_requests_are_served() {
    let mut env = Env::fake();
    env.set("FAKE_LLAMA_RESTORE", "crash");
    let model = fake_model(&env, "m", 300, &["--fake-token-ms", "20"]);
    assert_success(&env.run(&["warm", &model]));
    assert_success(&env.run(&["stop", &model]));
    assert_eq!(entries(&env).len(), 1);
    // Three requests wait for the load; its child aborts as it reads the cache back, and
    // the one started again without it serves them all.
    let clients: Vec<_> = (0..3).map(|n| env.spawn(&["run", &model, &format!("waiting {n}")])).collect();
    for (n, client) in clients.into_iter().enumerate() {
        let output = client.wait_with_output().unwrap();
        assert_success(&output);
        assert_eq!(stdout(&output), format!("waiting {n}"));
    }
    let log = daemon_log(&env);
    assert_eq!(log.matches("started again without it").count(), 1, "{log}");
    assert_eq!(counter(&env, "restore_failures"), 1);
    assert!(entries(&env).is_empty() && cache_files(&env).is_empty(), "{:?}", cache_files(&env));
    let instance = env.status_json()["instances"][0].clone();
    assert_eq!(instance["state"], "ready", "{instance}");
    assert_eq!(instance["crash_loop"], false, "{instance}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn every_unload_but_a_crash_or_a_restart_saves() {
    let env = Env::fake();
    env.write_config("token_timeout = 1\n");
    let evicted = fake_model(&env, "evicted", 300, &[]);
    let expired = fake_model(&env, "expired", 300, &[]);
    std::fs::write(
        env.path("config.toml"),
        std::fs::read_to_string(env.path("config.toml")).unwrap() + "ttl = \"1s\"\n",
    )
    .unwrap();
    let excluded = fake_model(&env, "excluded", 300, &[]);
    let exclusive = fake_model(&env, "exclusive", 300, &[]);
    let stopped = fake_model(&env, "stopped", 300, &[]);
    let shut_down = fake_model(&env, "shut-down", 300, &[]);
    let crashed = fake_model(&env, "crashed", 300, &["--fake-crash-after", "1"]);
    let stalled = fake_model(&env, "stalled", 300, &["--fake-stall"]);
    let saved = |env: &Env| -> Vec<String> {
        let mut names: Vec<String> = entries(env).iter().map(|e| e["model"].as_str().unwrap().to_string()).collect();
        names.sort();
        names
    };

    assert_success(&env.run(&["warm", &expired]));
    wait_until("the TTL expires", || saved(&env).contains(&expired));
    assert_success(&env.run(&["warm", &excluded]));
    assert_success(&env.run(&["switch", "--wait", "--exclusive", &exclusive]));
    assert!(saved(&env).contains(&excluded), "{:?}", saved(&env));
    assert_success(&env.run(&["warm", &stopped]));
    assert_success(&env.run(&["stop", &stopped]));
    assert_exit(&env.run(&["run", &crashed, "one two three"]), 70);
    assert_exit(&env.run(&["run", &stalled, "hi"]), 124);
    wait_until("the stalled child is restarted or stopped", || {
        env.status_json()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == stalled.as_str() && i["state"] != "ready")
    });
    // Evictions: room for one model, and another loads.
    assert_success(&env.run(&["warm", &evicted]));
    env.write_config(&format!("max_instances = 1\n{}", std::fs::read_to_string(env.path("config.toml")).unwrap()));
    assert_success(&env.run(&["reload"]));
    assert_success(&env.run(&["warm", &shut_down]));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();

    let kept = saved(&env);
    for name in [&evicted, &expired, &excluded, &exclusive, &stopped, &shut_down] {
        assert!(kept.contains(name), "{name} was not saved: {kept:?}");
    }
    for name in [&crashed, &stalled] {
        assert!(!kept.contains(name), "{name} was saved: {kept:?}");
    }
}
