//! The daemon's core under concurrency: many clients over several models with room for one,
//! loads interleaved with stop, `switch --exclusive`, TTL expiry and replaced files, and the
//! promises around draining. Every test checks that no child outlives the daemon.

use std::process::{Child, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

/// How long any one client may take before the test calls it hung.
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

/// Counts the fake llama-server children of `env` many times a second while `body` runs,
/// and returns the most seen at once.
fn most_children_during(env: &Env, body: impl FnOnce()) -> usize {
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let needle = env.dir.path().to_string_lossy().into_owned();
    let monitor = {
        let (done, most) = (Arc::clone(&done), Arc::clone(&most));
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                // The daemon's own command line names the fake server too: count the children.
                let children =
                    processes_mentioning(&needle).iter().filter(|(_, cmd)| cmd.starts_with(FAKE_SERVER)).count();
                most.fetch_max(children, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    body();
    done.store(true, Ordering::SeqCst);
    monitor.join().unwrap();
    most.load(Ordering::SeqCst)
}

/// Waits for every client with a deadline; a client still running then has hung.
fn finish_all(clients: Vec<(String, Child)>) -> Vec<(String, Output)> {
    let deadline = Instant::now() + CLIENT_DEADLINE;
    clients
        .into_iter()
        .map(|(model, mut child)| {
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    panic!("a client of {model} hung for {} s", CLIENT_DEADLINE.as_secs());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (model, child.wait_with_output().unwrap())
        })
        .collect()
}

fn add_models(env: &Env, names: &[&str], args: &[&str], head: &str) {
    env.write_config(head);
    for name in names {
        env.add_model(name, args, "");
    }
}

fn shut_down(env: &Env) {
    assert_success(&env.command(&["shutdown"]).env("LLMCTL_NO_AUTOSTART", "1").output().unwrap());
    env.assert_nothing_survives();
}

#[test]
fn sixty_clients_over_three_models_with_room_for_one_all_finish() {
    let env = Env::fake();
    let models = ["m0", "m1", "m2"];
    add_models(&env, &models, &["--fake-token-ms", "1"], "max_instances = 1\n");
    assert_success(&env.run(&["status"]));
    let mut outputs = Vec::new();
    let most = most_children_during(&env, || {
        let clients: Vec<(String, Child)> = (0..60)
            .map(|i| {
                let model = models[i % 3];
                (model.to_string(), env.spawn(&["run", model, "one two three"]))
            })
            .collect();
        outputs = finish_all(clients);
    });
    for (model, output) in &outputs {
        let code = output.status.code();
        assert!(code == Some(0) || code == Some(75), "{model}: exit {code:?}: {}", stderr(output));
        if code == Some(0) {
            assert_eq!(stdout(output), "one two three", "{model}");
        }
    }
    let succeeded = outputs.iter().filter(|(_, output)| output.status.success()).count();
    // The daemon's queue holds 64, so nobody needed to be turned away.
    assert_eq!(succeeded, 60, "every client fits the queue");
    assert!(most <= 1, "{most} children ran at once with max_instances = 1");
    shut_down(&env);
}

/// Connection threads wait in `accept` themselves: a burst of clients grows them, every
/// client is answered, and after the burst the extra threads leave while the one that never
/// does still answers; the daemon then shuts down with nothing left.
#[test]
fn a_burst_of_clients_is_answered_and_its_connection_threads_leave_after_it() {
    let mut env = Env::fake();
    env.set("LLMCTL_TEST_IDLE_THREAD_MS", "300");
    add_models(&env, &["m"], &["--fake-token-ms", "100"], "");
    assert_success(&env.run(&["warm", "m"]));
    let daemon = env.daemon_pid().unwrap();
    let at_rest = threads_of(daemon);
    let clients: Vec<(String, Child)> =
        (0..24).map(|i| (i.to_string(), env.spawn(&["run", "m", &format!("client {i}")]))).collect();
    wait_until("the burst holds a thread a client", || threads_of(daemon) >= at_rest + 20);
    for (i, output) in finish_all(clients) {
        assert_success(&output);
        assert_eq!(stdout(&output), format!("client {i}"));
    }
    wait_until("the burst's threads leave", || threads_of(daemon) <= at_rest + 1);
    let output = env.run(&["run", "m", "still answered"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "still answered");
    shut_down(&env);
}

/// A small deterministic generator: the schedule of a failing run is replayed from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn a_budget_for_one_model_holds_under_stops_switches_ttls_and_replaced_files() {
    let seed = std::env::var("LLMCTL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    let env = Env::fake();
    let models = ["m0", "m1", "m2"];
    // Each child holds about 42 MiB and is estimated at about 49 MiB before it runs: one
    // fits 80 MiB, two do not.
    add_models(
        &env,
        &models,
        &["--fake-rss-mb", "40", "--fake-token-ms", "2"],
        "memory_budget = \"80MiB\"\ndefault_ttl = \"1s\"\n",
    );
    assert_success(&env.run(&["status"]));
    let mut rng = Rng(seed);
    let mut outputs = Vec::new();
    let mut operations = Vec::new();
    let most = most_children_during(&env, || {
        let mut clients = Vec::new();
        for step in 0..40 {
            let model = models[rng.below(3) as usize];
            match rng.below(10) {
                0 => {
                    operations.push(format!("{step}: stop {model}"));
                    assert_success(&env.run(&["stop", model]));
                }
                1 => {
                    operations.push(format!("{step}: switch --exclusive {model}"));
                    clients.push((format!("switch {model}"), env.spawn(&["switch", "--wait", "--exclusive", model])));
                }
                2 => {
                    operations.push(format!("{step}: replace {model}"));
                    let fresh = env.path(&format!("models/{model}.new"));
                    crate::tiny_model::write_words(&fresh, "llama", &["▁fresh", "▁words", &format!("▁{step}")]);
                    std::fs::rename(&fresh, env.path(&format!("models/{model}.gguf"))).unwrap();
                }
                3 => {
                    operations.push(format!("{step}: wait for TTLs"));
                    std::thread::sleep(Duration::from_millis(1200));
                }
                _ => clients.push((model.to_string(), env.spawn(&["run", model, "a b c d"]))),
            }
            if rng.below(3) == 0 {
                std::thread::sleep(Duration::from_millis(rng.below(50)));
            }
        }
        outputs = finish_all(clients);
    });
    let context = format!("seed {seed} (rerun with LLMCTL_TEST_SEED={seed}); operations: {operations:?}");
    for (who, output) in &outputs {
        match output.status.code() {
            Some(0) => {
                if !who.starts_with("switch") {
                    assert_eq!(stdout(output), "a b c d", "{who}: {context}");
                }
            }
            Some(75) => {}
            // Cut off by a stop or refused by an exclusive switch, and told so.
            Some(69) => assert!(
                stderr(output).contains("by `llmctl stop`") || stderr(output).contains("by `llmctl switch --exclusive"),
                "{who}: {}; {context}",
                stderr(output)
            ),
            code => panic!("{who}: exit {code:?}: {}; {context}", stderr(output)),
        }
    }
    assert!(most <= 1, "{most} children at once under a budget for one; {context}");
    assert_success(&env.run(&["status"]));
    shut_down(&env);
}

#[test]
fn switch_exclusive_lets_a_running_stream_finish_and_refuses_the_waiting() {
    let env = Env::fake();
    let busy = env.tiny_model("busy.gguf").display().to_string();
    let other = env.tiny_model("other.gguf").display().to_string();
    // The request handed to the child waits there past the token timeout: it is sent
    // again on its own lease, and the drain waits for it; nothing loads busy again.
    env.write_config(&format!(
        "token_timeout = 1\n[models.busy]\npath = \"{busy}\"\nargs = [\"--fake-tokens\", \"40\", \"--fake-token-ms\", \"50\"]\n"
    ));
    let streaming = env.spawn(&["run", "busy", "go"]);
    wait_until("busy streams", || env.status_json()["instances"][0]["state"] == "busy");
    // One request more than its slot is handed to the child, which starts it next: it is
    // in flight too. The one after it waits in llmctl's queue.
    let handed = env.spawn(&["run", "busy", "next"]);
    wait_until("a second request waits inside the child", || env.status_json()["instances"][0]["queued"] == 1);
    let waiting = env.spawn(&["run", "busy", "later"]);
    wait_until("a third request waits in the queue", || env.status_json()["instances"][0]["queued"] == 2);
    assert_success(&env.run(&["switch", "--wait", "--exclusive", &other]));
    for started in [streaming, handed] {
        let streamed = started.wait_with_output().unwrap();
        assert_success(&streamed);
        assert_eq!(stdout(&streamed), "t ".repeat(40), "the stream completed");
    }
    let refused = waiting.wait_with_output().unwrap();
    assert_exit(&refused, 69);
    assert!(
        stderr(&refused).contains("busy was unloaded by `llmctl switch --exclusive other.gguf`"),
        "{}",
        stderr(&refused)
    );
    let status = env.status_json();
    let state = |name: &str| {
        status["instances"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap()["state"].clone()
    };
    assert_eq!(state("busy"), "stopped", "{status}");
    assert_eq!(state("other.gguf"), "ready", "{status}");
    shut_down(&env);
}

#[test]
fn stop_tells_a_streaming_client_who_stopped_it_at_once() {
    let mut env = Env::fake();
    // A child that ignores SIGTERM keeps streaming through the whole grace period; the
    // client must be cut off anyway, before `stop` returns.
    env.set("LLMCTL_STOP_GRACE_MS", "3000");
    let model = env.tiny_model("slow.gguf").display().to_string();
    env.write_config(&format!(
        "[models.slow]\npath = \"{model}\"\nargs = [\"--fake-tokens\", \"1000\", \"--fake-token-ms\", \"20\", \"--fake-ignore-term\"]\n"
    ));
    let mut client = env.spawn(&["run", "slow", "go"]);
    wait_until("slow streams", || env.status_json()["instances"][0]["state"] == "busy");
    assert_success(&env.run(&["stop", "slow"]));
    assert!(client.try_wait().unwrap().is_some(), "the client was still streaming when `stop` returned");
    let output = client.wait_with_output().unwrap();
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("slow was stopped by `llmctl stop`"), "{}", stderr(&output));
    shut_down(&env);
}

#[test]
fn a_waiting_load_whose_client_left_is_dropped() {
    let env = Env::fake();
    add_models(&env, &["long", "never"], &["--fake-tokens", "30", "--fake-token-ms", "50"], "max_instances = 1\n");
    let streaming = env.spawn(&["run", "long", "go"]);
    wait_until("long streams", || env.status_json()["instances"][0]["state"] == "busy");
    let mut impatient = env.spawn(&["run", "never", "hi"]);
    wait_until("never waits for room", || {
        env.status_json()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "never" && i["state"] == "waiting")
    });
    impatient.kill().unwrap();
    impatient.wait().unwrap();
    wait_until("never gave up its place", || {
        env.status_json()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "never" && i["state"] == "stopped")
    });
    assert_success(&streaming.wait_with_output().unwrap());
    assert!(
        env.processes().iter().all(|(_, cmd)| !(cmd.starts_with(FAKE_SERVER) && cmd.contains("never.gguf"))),
        "a load nobody waits for never started"
    );
    // The eviction it asked for was called off: long stays loaded.
    let status = env.status_json();
    let long = status["instances"].as_array().unwrap().iter().find(|i| i["name"] == "long").unwrap().clone();
    assert_eq!(long["state"], "ready", "{status}");
    assert_eq!(long["evictions"], 0, "{status}");
    shut_down(&env);
}

#[test]
fn stopping_one_alias_leaves_another_alias_of_the_same_file() {
    let env = Env::fake();
    let path = env.tiny_model("shared.gguf").display().to_string();
    env.write_config(&format!(
        "[models.plain]\npath = \"{path}\"\n[models.tuned]\npath = \"{path}\"\nargs = [\"--fake-token-ms\", \"1\"]\n"
    ));
    assert_success(&env.run(&["warm", "plain"]));
    assert_success(&env.run(&["warm", "tuned"]));
    assert_success(&env.run(&["stop", "plain"]));
    let status = env.status_json();
    let state = |name: &str| {
        status["instances"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap()["state"].clone()
    };
    assert_eq!(state("plain"), "stopped", "{status}");
    assert_eq!(state("tuned"), "ready", "{status}");
    shut_down(&env);
}

#[test]
fn a_replaced_model_file_is_served_from_the_new_file() {
    let env = Env::real();
    let path = env.path("models/model.gguf");
    crate::tiny_model::write(&path, "llama");
    let model = path.display().to_string();
    let first = env.run(&["run", "--raw", &model, "Hello"]);
    assert_success(&first);
    assert_eq!(stdout(&first), crate::tiny_model::expected_text());
    let first_pid = env.status_json()["instances"][0]["pid"].clone();
    // A new file moved over the old one, as a download tool or `mv` does.
    let fresh = env.path("models/model.gguf.part");
    crate::tiny_model::write_words(&fresh, "llama", &["▁Files", "▁change", "▁under", "▁us", "."]);
    std::fs::rename(&fresh, &path).unwrap();
    let second = env.run(&["run", "--raw", &model, "Hello"]);
    assert_success(&second);
    assert_eq!(stdout(&second), " Files change under us.");
    let status = env.status_json();
    assert_ne!(status["instances"][0]["pid"], first_pid, "a new child serves the new file: {status}");
    assert_eq!(status["instances"].as_array().unwrap().len(), 1, "{status}");
    shut_down(&env);
}

#[test]
fn of_two_exclusive_switches_at_once_one_model_stays_loaded() {
    let env = Env::fake();
    add_models(&env, &["a", "b", "c", "d"], &["--fake-start-ms", "100"], "");
    assert_success(&env.run(&["warm", "a"]));
    assert_success(&env.run(&["warm", "b"]));
    let to_c = env.spawn(&["switch", "--wait", "--exclusive", "c"]);
    let to_d = env.spawn(&["switch", "--wait", "--exclusive", "d"]);
    let outputs = finish_all(vec![("c".into(), to_c), ("d".into(), to_d)]);
    for (model, output) in &outputs {
        // The later switch wins; the earlier one succeeds or is told it lost its model.
        let code = output.status.code();
        assert!(
            code == Some(0) || (code == Some(69) && stderr(output).contains("switch --exclusive")),
            "switch {model}: {code:?} {}",
            stderr(output)
        );
    }
    let status = env.status_json();
    let ready: Vec<String> = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "ready")
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ready.len(), 1, "exactly one model stays loaded: {status}");
    assert!(ready[0] == "c" || ready[0] == "d", "{status}");
    shut_down(&env);
}
