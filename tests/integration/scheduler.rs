//! The scheduler with room for one model, against the fake llama-server: what is loaded is
//! served first, a waiting model is served within `max_wait` even while the loaded one
//! stays busy (and only once it goes idle without a bound), and a waiting request knows its
//! place and its estimated wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::support::*;

/// Models `a` (each request about 1 s) and `b` (quick), with room for one, and `extra`.
fn two_models(env: &Env, extra: &str) {
    env.write_config(&format!("max_instances = 1\n{extra}"));
    env.add_model("a", &["--fake-tokens", "40", "--fake-token-ms", "25"], "");
    env.add_model("b", &[], "");
}

/// `clients` clients that keep `a` busy (one generating, the others waiting) until `stop`
/// is set; returns how many requests they finished.
fn keep_busy(env: &Arc<Env>, stop: &Arc<AtomicBool>, clients: usize) -> Vec<std::thread::JoinHandle<usize>> {
    (0..clients)
        .map(|_| {
            let (env, stop) = (Arc::clone(env), Arc::clone(stop));
            std::thread::spawn(move || {
                let mut done = 0;
                while !stop.load(Ordering::SeqCst) {
                    assert_success(&env.run(&["run", "a", "busy"]));
                    done += 1;
                }
                done
            })
        })
        .collect()
}

fn instance(env: &Env, name: &str) -> serde_json::Value {
    let status = env.status_json();
    status["instances"].as_array().unwrap().iter().find(|i| i["name"] == name).cloned().unwrap_or_default()
}

/// Also: once a drain for the waiting model is near, no child holds a request beyond its
/// slots. A drain must run what the child holds before the room is free, where a request
/// queued in llmctl waits for its model's next load. Here a's requests take a second and
/// b's bound is two, so the drain is near from b's first moment; three clients keep a's
/// one slot busy, one held in the child and one queued in llmctl, which the child would be
/// sent as the next of a's requests ends.
#[test]
fn a_waiting_model_is_served_within_max_wait_while_the_loaded_one_stays_busy() {
    let mut env = Env::fake();
    let held_path = env.path("held.txt");
    env.set("FAKE_LLAMA_HELD", held_path.to_str().unwrap());
    let env = Arc::new(env);
    two_models(&env, "max_wait = \"2s\"\nmin_residency = \"0\"\n");
    assert_success(&env.run(&["warm", "a"]));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = keep_busy(&env, &stop, 3);
    let finished = || {
        let outcomes = instance(&env, "a")["outcomes"].clone();
        outcomes.as_object().map_or(0, |outcomes| outcomes.values().filter_map(|n| n.as_u64()).sum::<u64>())
    };
    wait_until("a has finished a request, so its service time is measured", || finished() >= 1);
    wait_until("a is busy with two waiting", || instance(&env, "a")["queued"] == 2);
    // b waits while a is busy, then a drains for it: b is answered while a's clients go on.
    let waiting = env.spawn(&["run", "b", "served in time"]);
    wait_until("b waits for room", || instance(&env, "b")["state"] == "waiting");
    let held_before = held(&held_path);
    let output = waiting.wait_with_output().unwrap();
    assert_success(&output);
    assert_eq!(stdout(&output), "served in time");
    assert_eq!(held(&held_path), held_before, "a's child was sent a request beyond its slot while its drain was near");
    let served_while_busy = !stop.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let done: usize = clients.into_iter().map(|client| client.join().unwrap()).sum();
    assert!(served_while_busy && done > 0, "b was served only after a went idle");
    let status = env.status_json();
    assert!(status["daemon"]["swaps"].as_u64().unwrap() >= 1, "{status}");
    // a's waiting request was not refused: it waited for a's next load.
    assert_eq!(instance(&env, "a")["outcomes"].get("unavailable"), None);
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// How many requests the fake children held beyond their slots (`FAKE_LLAMA_HELD`).
fn held(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().lines().count()
}

/// Also: while the waiting model's bound is far off, a's child goes on holding the next
/// request beyond its slot, so a loses no time between its requests.
#[test]
fn what_is_loaded_is_served_first_and_the_waiting_request_knows_its_place_and_wait() {
    let mut env = Env::fake();
    let held_path = env.path("held.txt");
    env.set("FAKE_LLAMA_HELD", held_path.to_str().unwrap());
    let env = Arc::new(env);
    // No bound to speak of: b waits for as long as a stays busy.
    two_models(&env, "max_wait = \"10m\"\n");
    assert_success(&env.run(&["warm", "a"]));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = keep_busy(&env, &stop, 2);
    wait_until("a is busy with one waiting", || instance(&env, "a")["queued"] == 1);
    wait_until("nobody waiting for room, a's child holds the second client's request", || held(&held_path) >= 1);
    let mut events = env.spawn(&["events"]);
    let waiting = env.spawn(&["run", "b", "after a"]);
    wait_until("b waits for room, first in line", || {
        let b = instance(&env, "b");
        b["state"] == "waiting" && b["waiting_position"] == 1 && b["eta_ms"].is_u64()
    });
    // Meanwhile a keeps being served: its clients finish request after request. Held
    // requests are counted once one has ended since b asked, so that any sent before has
    // reached the child.
    let requests = || instance(&env, "a")["requests"].as_u64().unwrap();
    let before = requests();
    wait_until("a serves on while b waits", || requests() > before);
    let held_before = held(&held_path);
    wait_until("a's child holds the next request while b's bound is far off", || held(&held_path) > held_before);
    wait_until("a serves two more", || requests() >= before + 3);
    assert_eq!(instance(&env, "b")["state"], "waiting", "b did not jump ahead of a's clients");
    let table = stdout(&env.run(&["status"]));
    assert!(table.contains("waiting (1st in line, ~"), "{table}");
    // Once a's clients stop, a goes idle and b loads.
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap();
    }
    let output = waiting.wait_with_output().unwrap();
    assert_success(&output);
    assert_eq!(stdout(&output), "after a");
    let _ = events.kill();
    let events_output = events.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&events_output.stdout);
    let waiting_event = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["event"] == "waiting" && event["model"] == "b")
        .unwrap_or_else(|| panic!("no waiting event for b: {text}"));
    assert!(waiting_event["detail"].as_str().unwrap().starts_with("1st in line, about "), "{waiting_event}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_refused_client_is_told_a_wait_measured_from_the_model_not_a_constant() {
    let env = Env::fake();
    let a = env.tiny_model("a.gguf");
    env.write_config(&format!(
        "[models.a]\npath = \"{}\"\nmax_queued = 1\nargs = [\"--fake-tokens\", \"100\", \"--fake-token-ms\", \"30\"]\n",
        a.display()
    ));
    // One request measured: about 3 s on its slot.
    assert_success(&env.run(&["run", "a", "x"]));
    let holder = env.spawn(&["run", "a", "x"]);
    wait_until("the slot is taken", || env.status_json()["instances"][0]["in_flight"] == 1);
    let waiter = env.spawn(&["run", "a", "x"]);
    wait_until("one waits", || env.status_json()["instances"][0]["queued"] == 1);
    let output = env.run(&["run", "a", "x"]);
    assert_exit(&output, 75);
    let message = stderr(&output);
    let seconds: f64 = message
        .rsplit("try again in ")
        .next()
        .and_then(|rest| rest.split(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no retry hint: {message}"));
    assert!(seconds >= 2.0, "the hint follows the measured service time: {message}");
    for client in [holder, waiter] {
        assert_success(&client.wait_with_output().unwrap());
    }
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}
