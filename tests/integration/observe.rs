//! Observability against the fake llama-server: `logs`, `events` and `metrics`.

use std::io::{BufRead, BufReader};

use crate::support::*;

#[test]
fn logs_print_a_models_llama_server_output_and_the_daemons() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf").display().to_string();
    let output = env.run(&["logs", &model]);
    assert_exit(&output, 66);
    assert!(stderr(&output).contains("not been loaded"), "{}", stderr(&output));
    assert_success(&env.run(&["warm", &model]));
    let output = env.run(&["logs", &model]);
    assert_success(&output);
    assert!(stdout(&output).contains("server is listening on unix://"), "{}", stdout(&output));
    let output = env.run(&["logs", "-n", "1", &model]);
    assert_eq!(stdout(&output).lines().count(), 1, "{}", stdout(&output));
    let output = env.run(&["logs", "--daemon"]);
    assert!(stdout(&output).contains("spawned llama-server pid"), "{}", stdout(&output));
}

#[test]
fn events_stream_state_changes_as_json_lines() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf").display().to_string();
    assert_success(&env.run(&["status"]));
    let mut watcher = env.spawn(&["events"]);
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    wait_until("the watcher is subscribed", || env.status_json()["daemon"]["event_subscribers"] == 1);
    assert_success(&env.run(&["warm", &model]));
    assert_success(&env.run(&["stop", &model]));
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("stopped") {
        let line = lines.next().expect("an event").unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["model"], "m.gguf");
        assert!(event["time_ms"].as_u64().unwrap() > 0);
        seen.push(event["event"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, ["loading", "ready", "stopped"]);
    assert_success(&env.run(&["shutdown"]));
    let status = watcher.wait().unwrap();
    assert!(status.success(), "events ends with the daemon: {status:?}");
}

#[test]
fn metrics_are_prometheus_text() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf").display().to_string();
    assert_success(&env.run(&["run", &model, "one two"]));
    let output = env.run(&["metrics"]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.contains("# TYPE llmctl_queue_waiting gauge"), "{text}");
    // Each instance's series carry its model and the instance that tells two apart.
    let instance = env.status_json()["instances"][0]["instance"].as_str().unwrap().to_string();
    let labels = format!("model=\"m.gguf\",instance=\"{instance}\"");
    for expected in [
        format!("llmctl_requests_total{{{labels},outcome=\"ok\"}} 1"),
        format!("llmctl_tokens_total{{{labels},direction=\"out\"}} 2"),
        format!("llmctl_instance_memory_bytes{{{labels},kind=\"rss\"}}"),
        format!("llmctl_first_token_seconds{{{labels},quantile=\"0.5\"}}"),
        format!("llmctl_load_seconds{{{labels}}}"),
        "llmctl_swaps_total 0".to_string(),
    ] {
        assert!(text.contains(&expected), "missing {expected}:\n{text}");
    }
    // A second instance of the same model (another context size): Prometheus's own parser
    // reads the scrape, and no two samples share a name and labels (a scrape with such a
    // duplicate is refused whole).
    assert_success(&env.run(&["run", "--ctx-size", "1024", &model, "three"]));
    let text = stdout(&env.run(&["metrics"]));
    std::fs::write(env.path("metrics.txt"), &text).unwrap();
    let parsed = crate::serve::python(&format!(
        "from prometheus_client.parser import text_string_to_metric_families\n\
         seen = set()\n\
         for family in text_string_to_metric_families(open({:?}).read()):\n\
         \x20   for sample in family.samples:\n\
         \x20       key = (sample.name, tuple(sorted(sample.labels.items())))\n\
         \x20       assert key not in seen, key\n\
         \x20       seen.add(key)\n\
         print(len({{labels for name, labels in seen if name == 'llmctl_instance_up'}}))\n",
        env.path("metrics.txt").display().to_string()
    ));
    assert_eq!(parsed.trim(), "2", "two instances, two series:\n{text}");
}
