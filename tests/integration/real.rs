//! End to end against the real llama-server that `llmctl setup` builds: the tiny
//! deterministic model the suite writes (exact output), a model llama-server refuses, and
//! the SmolLM2 demo model. The README's own examples are run by `readme.rs`.

use std::io::Read;

use crate::support::*;
use crate::tiny_model;

#[test]
fn tiny_model_output_is_exact_in_raw_and_chat_mode() {
    let env = Env::real();
    let model = env.tiny_model("tiny.gguf").display().to_string();
    let expected = tiny_model::expected_text();

    let output = env.run(&["run", "--raw", &model, "Where do bytes go?"]);
    assert_success(&output);
    assert_eq!(stdout(&output), expected);
    assert_eq!(stderr(&output), "");

    let output = env.run(&["run", &model, "Tell me about pipes"]);
    assert_success(&output);
    assert_eq!(stdout(&output), expected);

    let output = env.run(&["run", "--json", &model, "hi"]);
    assert_success(&output);
    let lines: Vec<serde_json::Value> = stdout(&output).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let done = lines.last().unwrap();
    let text: String = lines.iter().filter(|l| l["type"] == "token").map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(text, expected);
    assert_eq!(done["type"], "done");
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["usage"]["completion_tokens"].as_u64(), Some(tiny_model::WORDS.len() as u64 + 1));
    assert!(done["timings"]["predicted_per_second"].is_number(), "{done}");
}

#[test]
fn max_tokens_limits_the_real_server() {
    let env = Env::real();
    let model = env.tiny_model("tiny.gguf").display().to_string();
    let output = env.run(&["run", "--raw", "--json", "-n", "3", &model, "x"]);
    assert_success(&output);
    let lines: Vec<serde_json::Value> = stdout(&output).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let done = lines.last().unwrap();
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["completion_tokens"], 3);
    let text: String = lines.iter().filter(|l| l["type"] == "token").map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(text, " Pipes carry bytes");
}

#[test]
fn a_model_llama_server_refuses_fails_fast_with_its_reason() {
    let env = Env::real();
    env.write_config("load_timeout = 600\n");
    let path = env.path("models/alien.gguf");
    tiny_model::write(&path, "nosucharch");
    let output = env.run(&["run", path.to_str().unwrap(), "hi"]);
    assert_exit(&output, 70);
    let err = stderr(&output);
    assert!(err.contains("exited with status"), "{err}");
    assert!(err.contains("nosucharch"), "llama-server's own reason is quoted: {err}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn closing_stdout_frees_the_real_slot() {
    let env = Env::real();
    let demo = demo_model().display().to_string();
    // Greedy, so the text is the same every run: a sampled one may end in fewer than 20 bytes.
    let args = ["run", "--temperature", "0", "-n", "4000", "--raw", &demo, "Count from one to one thousand:"];
    let mut child = env.spawn(&args);
    let mut first = [0u8; 20];
    if let Err(error) = child.stdout.as_mut().unwrap().read_exact(&mut first) {
        let output = child.wait_with_output().unwrap();
        panic!("no 20 bytes of output ({error}): exit {:?}, stderr: {}", output.status.code(), stderr(&output));
    }
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert_exit(&output, 0);
    assert_eq!(stderr(&output), "");
    wait_until("the slot is free", || env.status_json()["instances"][0]["in_flight"] == 0);
    // With one slot, this only answers if llama-server stopped the cancelled generation.
    let output = env.run(&["run", "-n", "4", "--raw", &demo, "Hello"]);
    assert_success(&output);
    assert!(!output.stdout.is_empty());
}

#[test]
fn demo_model_writes_a_haiku_deterministically() {
    let env = Env::real();
    let demo = demo_model().display().to_string();
    let args = ["run", "--temperature", "0", "-n", "24", &demo, "Write a haiku about Unix pipes"];
    let first = env.run(&args);
    assert_success(&first);
    assert!(stdout(&first).trim().len() > 10, "{}", stdout(&first));
    let second = env.run(&args);
    assert_eq!(stdout(&first), stdout(&second), "greedy decoding is deterministic");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn two_real_models_alternate_under_a_budget_for_one() {
    let env = Env::real();
    env.write_config(&format!(
        "memory_budget = \"400MiB\"\n\
         [models.smol]\npath = \"{}\"\nctx_size = 2048\n\
         [models.gemma]\npath = \"{}\"\nctx_size = 2048\n",
        demo_model().display(),
        gemma_model().display()
    ));
    let mut outputs = Vec::new();
    for (round, model) in ["smol", "gemma", "smol", "gemma"].iter().enumerate() {
        let output = env.run(&["run", "--raw", "--temperature", "0", "-n", "8", model, "The capital of France is"]);
        assert_success(&output);
        assert!(!output.stdout.is_empty(), "round {round}: {model} wrote nothing");
        outputs.push(stdout(&output));
        let status = env.status_json();
        let ready: Vec<&str> = status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] == "ready")
            .map(|i| i["name"].as_str().unwrap())
            .collect();
        assert_eq!(ready, [*model], "round {round}: only the model in use is loaded: {status}");
        assert_eq!(status["daemon"]["evictions"], round as u64, "round {round}");
    }
    assert_eq!(outputs[0], outputs[2], "greedy output survives an eviction and reload");
    assert_eq!(outputs[1], outputs[3]);
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}
