//! Admission against the fake llama-server: per-model slots, the global queue, fairness
//! between models, and the queue figures in `status`.

use std::io::{BufRead, BufReader};

use crate::support::*;

fn slow_model(env: &Env, name: &str) -> String {
    env.add_model(name, &["--fake-tokens", "40", "--fake-token-ms", "10"], "parallel = 1\n")
}

#[test]
fn a_flood_on_one_model_does_not_delay_another() {
    let env = Env::fake();
    env.write_config("queue_depth = 32\n");
    let hot = slow_model(&env, "hot");
    let cold = slow_model(&env, "cold");
    assert_success(&env.run(&["warm", &hot]));
    assert_success(&env.run(&["warm", &cold]));
    // Six requests for one slot: they take about six generations' time in turn.
    let flood: Vec<_> = (0..6).map(|_| env.spawn(&["run", &hot, "x"])).collect();
    wait_until("the flood is queued", || {
        env.status_json()["instances"].as_array().unwrap().iter().any(|i| i["name"] == "hot" && i["queued"] == 5)
    });
    let output = env.run(&["run", &cold, "x"]);
    assert_success(&output);
    // The other model's request finished while the flood was still waiting its turn.
    let status = env.status_json();
    let hot_status = status["instances"].as_array().unwrap().iter().find(|i| i["name"] == "hot").unwrap().clone();
    assert!(hot_status["queued"].as_u64().unwrap() >= 1, "the flood was already over: {hot_status}");
    for child in flood {
        assert_success(&child.wait_with_output().unwrap());
    }
    let status = env.status_json();
    let hot_status = status["instances"].as_array().unwrap().iter().find(|i| i["name"] == "hot").unwrap().clone();
    assert_eq!(hot_status["requests"], 7); // warm's ping and the six requests
    let p50 = hot_status["wait_p50_ms"].as_f64().unwrap();
    let p99 = hot_status["wait_p99_ms"].as_f64().unwrap();
    assert!(p99 >= p50 && p99 > 0.0, "{hot_status}");
}

#[test]
fn a_full_queue_answers_busy_at_once_and_counts_it_per_model() {
    let env = Env::fake();
    env.write_config("queue_depth = 1\n");
    let model = slow_model(&env, "busy");
    assert_success(&env.run(&["warm", &model]));
    let first = env.spawn(&["run", &model, "x"]);
    wait_until("the first request holds the slot", || env.status_json()["instances"][0]["in_flight"] == 1);
    // The second waits inside the child (sent beyond its slot), the third in the queue.
    let second = env.spawn(&["run", &model, "x"]);
    wait_until("the second request waits inside the child", || env.status_json()["instances"][0]["queued"] == 1);
    let third = env.spawn(&["run", &model, "x"]);
    wait_until("the third request waits in the queue", || env.status_json()["instances"][0]["queued"] == 2);
    let output = env.run(&["run", &model, "x"]);
    assert_exit(&output, 75);
    assert!(stderr(&output).contains("try again in"), "{}", stderr(&output));
    for waiting in [first, second, third] {
        assert_success(&waiting.wait_with_output().unwrap());
    }
    let status = env.status_json();
    assert_eq!(status["instances"][0]["rejected"], 1);
    assert_eq!(status["queue"]["rejected"], 1);
}

#[test]
fn a_waiting_client_hears_its_position_and_can_give_up() {
    let env = Env::fake();
    let model = slow_model(&env, "one");
    assert_success(&env.run(&["warm", &model]));
    let holder = env.spawn(&["run", &model, "x"]);
    wait_until("the slot is taken", || env.status_json()["instances"][0]["in_flight"] == 1);
    // Speak the protocol directly to see the position message a terminal would show.
    let mut waiter = std::os::unix::net::UnixStream::connect(env.socket()).unwrap();
    let spec = serde_json::json!({"name": "one", "path": env.path("models/one.gguf"), "load": {"ctx_size": null, "parallel": 1, "extra_args": ["--fake-tokens", "40", "--fake-token-ms", "10"]}});
    let request = serde_json::json!({"type": "run", "model": spec, "mode": "raw", "prompt": "x", "system": null, "sampling": {"stop": []}});
    std::io::Write::write_all(
        &mut waiter,
        format!("{{\"type\":\"hello\",\"version\":{}}}\n{request}\n", llmctl::protocol::VERSION).as_bytes(),
    )
    .unwrap();
    let mut lines = BufReader::new(waiter.try_clone().unwrap()).lines();
    let _hello = lines.next().unwrap().unwrap();
    let queued: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(queued["type"], "queued");
    assert_eq!(queued["position"], 1);
    drop(lines);
    drop(waiter);
    wait_until("the abandoned request leaves the queue", || env.status_json()["instances"][0]["queued"] == 0);
    assert_success(&holder.wait_with_output().unwrap());
}

#[test]
fn a_request_handed_to_a_busy_child_waits_past_the_token_timeout_without_restarting_it() {
    let env = Env::fake();
    env.write_config("token_timeout = 1\n");
    let model = env.add_model("long", &["--fake-tokens", "250", "--fake-token-ms", "10"], "parallel = 1\n");
    assert_success(&env.run(&["warm", &model]));
    let pid = env.status_json()["instances"][0]["pid"].clone();
    let holder = env.spawn(&["run", &model, "x"]);
    wait_until("the slot is taken", || env.status_json()["instances"][0]["in_flight"] == 1);
    // Handed to the child, it waits there about 2.5 s, past the token timeout, while the
    // child streams to the holder: no token for it is no stall of the child.
    let handed = env.run(&["run", &model, "y"]);
    assert_success(&handed);
    assert_eq!(stdout(&handed), "t ".repeat(250));
    let held = holder.wait_with_output().unwrap();
    assert_success(&held);
    assert_eq!(stdout(&held), "t ".repeat(250));
    let instance = env.status_json()["instances"][0].clone();
    assert_eq!(instance["pid"], pid, "the child was restarted: {instance}");
    assert_eq!(instance["restarts"], 0, "{instance}");
    assert_eq!(instance["outcomes"].get("timeout"), None, "{instance}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_request_waiting_inside_a_child_that_stalls_goes_to_the_restarted_child() {
    let mut env = Env::fake();
    env.set("LLMCTL_STOP_GRACE_MS", "200");
    env.write_config("token_timeout = 1\n");
    let model = env.add_model("long", &["--fake-tokens", "300", "--fake-token-ms", "10"], "parallel = 1\n");
    assert_success(&env.run(&["warm", &model]));
    let pid = env.status_json()["instances"][0]["pid"].as_u64().unwrap();
    let holder = env.spawn(&["run", &model, "x"]);
    wait_until("the slot is taken", || env.status_json()["instances"][0]["in_flight"] == 1);
    let handed = env.spawn(&["run", &model, "y"]);
    wait_until("it waits inside the child", || env.status_json()["instances"][0]["queued"] == 1);
    // The child stalls: the stream on its slot times out and the child is restarted; the
    // request that waited inside it never started, and the next child answers it.
    assert!(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
    assert_exit(&holder.wait_with_output().unwrap(), 124);
    let handed = handed.wait_with_output().unwrap();
    assert_success(&handed);
    assert_eq!(stdout(&handed), "t ".repeat(300));
    let instance = env.status_json()["instances"][0].clone();
    assert_ne!(instance["pid"].as_u64(), Some(pid), "{instance}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_client_that_leaves_while_its_request_waits_inside_the_child_gives_its_place_up() {
    let env = Env::fake();
    let model = env.add_model("long", &["--fake-tokens", "2000", "--fake-token-ms", "10"], "parallel = 1\n");
    assert_success(&env.run(&["warm", &model]));
    let mut holder = env.spawn(&["run", &model, "x"]);
    wait_until("the slot is taken", || env.status_json()["instances"][0]["in_flight"] == 1);
    let mut handed = env.spawn(&["run", &model, "y"]);
    wait_until("it waits inside the child", || env.status_json()["instances"][0]["queued"] == 1);
    handed.kill().unwrap();
    handed.wait().unwrap();
    wait_until("its place is given up", || env.status_json()["instances"][0]["queued"] == 0);
    assert!(holder.try_wait().unwrap().is_none(), "the holder's 20 s stream ended first");
    let instance = env.status_json()["instances"][0].clone();
    assert_eq!(instance["outcomes"]["cancelled"], 1, "{instance}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_request_waiting_inside_a_child_that_crashes_goes_to_the_next_child_at_its_place() {
    let env = Env::fake();
    let model = env.add_model("long", &["--fake-tokens", "300", "--fake-token-ms", "10"], "parallel = 1\n");
    assert_success(&env.run(&["warm", &model]));
    let holder = env.spawn(&["run", &model, "x"]);
    wait_until("the slot is taken", || env.status_json()["instances"][0]["in_flight"] == 1);
    let mut clients = Vec::new();
    for (name, queued) in [("the one sent again", 1), ("the next", 2), ("the last", 3)] {
        clients.push((name, env.spawn(&["run", &model, name])));
        wait_until(&format!("{name} waits"), || env.status_json()["instances"][0]["queued"] == queued);
    }
    let pid = env.status_json()["instances"][0]["pid"].as_u64().unwrap();
    assert!(std::process::Command::new("kill").args(["-ABRT", &pid.to_string()]).status().unwrap().success());
    // The stream cut off by the crash fails; the request that waited inside the child never
    // started and does not. It goes back to its place, ahead of the two that came after it:
    // the next child takes it and the next at once (one on its slot, one beyond it), and the
    // last waits until one of them ends (each takes 3 s).
    let held = holder.wait_with_output().unwrap();
    assert_exit(&held, 70);
    let mut order = Vec::new();
    wait_until("all three finish", || {
        for (name, client) in &mut clients {
            if !order.contains(name) && client.try_wait().unwrap().is_some() {
                order.push(*name);
            }
        }
        order.len() == clients.len()
    });
    assert_eq!(order.last(), Some(&"the last"), "in the order they finished: {order:?}");
    for (_, client) in clients {
        let output = client.wait_with_output().unwrap();
        assert_success(&output);
        assert_eq!(stdout(&output), "t ".repeat(300));
    }
    let instance = env.status_json()["instances"][0].clone();
    assert_ne!(instance["pid"].as_u64(), Some(pid), "{instance}");
    assert_eq!(instance["requests"], 5, "warm's ping and four requests, each counted once: {instance}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}
