//! `llmctl serve` with real HTTP clients: ureq from the tests, curl, and the official
//! `openai` Python package (installed by tests/run into a virtual environment).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use crate::support::*;
use crate::tiny_model;

/// A running `llmctl serve`, stopped with SIGINT when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(env: &Env, extra: &[&str]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", "--listen", &listen];
        args.extend_from_slice(extra);
        let child = env.command(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let base = format!("http://{listen}");
        wait_until("serve answers", || TcpStream::connect(("127.0.0.1", port)).is_ok());
        Server { child, base }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

fn post(server: &Server, path: &str, body: serde_json::Value) -> (u16, String) {
    let mut response = agent().post(format!("{}{path}", server.base)).send(body.to_string()).unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

/// A slow model `m` with one request generating and one waiting, and `serve` in front.
/// `global` and `model` are extra config lines for the daemon and for the model.
fn one_busy_one_waiting(env: &Env, global: &str, model: &str) -> (Server, Child, Child) {
    let path = env.tiny_model("m.gguf");
    env.write_config(&format!(
        "{global}[models.m]\npath = \"{}\"\n{model}args = [\"--fake-tokens\", \"100\", \"--fake-token-ms\", \"10\"]\n",
        path.display()
    ));
    assert_success(&env.run(&["warm", "m"]));
    let server = Server::start(env, &[]);
    let holder = env.spawn(&["run", "m", "x"]);
    wait_until("the slot is taken", || env.status_json()["instances"][0]["in_flight"] == 1);
    let waiter = env.spawn(&["run", "m", "x"]);
    wait_until("one request waits", || env.status_json()["instances"][0]["queued"] == 1);
    (server, holder, waiter)
}

fn complete(server: &Server, model: &str) -> ureq::http::Response<ureq::Body> {
    agent()
        .post(format!("{}/v1/completions", server.base))
        .send(serde_json::json!({"model": model, "prompt": "x"}).to_string())
        .unwrap()
}

#[test]
fn chat_and_completions_match_the_openai_shapes_on_a_real_server() {
    let env = Env::real();
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!("[models.tiny]\npath = \"{}\"\n", model.display()));
    let server = Server::start(&env, &[]);
    let expected = tiny_model::expected_text();

    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["message"]["content"], expected);
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    assert!(reply["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Streaming, by the model file's stem.
    let mut response = agent()
        .post(format!("{}/v1/chat/completions", server.base))
        .send(
            serde_json::json!({"model": "tiny", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        )
        .unwrap();
    assert_eq!(response.headers().get("content-type").unwrap(), "text/event-stream");
    let text = response.body_mut().read_to_string().unwrap();
    let mut streamed = String::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(line).unwrap();
        streamed += chunk["choices"][0]["delta"]["content"].as_str().unwrap_or("");
    }
    assert_eq!(streamed, expected);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    let (status, body) =
        post(&server, "/v1/completions", serde_json::json!({"model": "tiny", "prompt": "x", "max_tokens": 3}));
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["choices"][0]["text"], " Pipes carry bytes");
    assert_eq!(reply["choices"][0]["finish_reason"], "length");

    let models: serde_json::Value = serde_json::from_str(
        &agent().get(format!("{}/v1/models", server.base)).call().unwrap().body_mut().read_to_string().unwrap(),
    )
    .unwrap();
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == "tiny"), "{models}");
    let health = agent().get(format!("{}/health", server.base)).call().unwrap().status();
    assert_eq!(health, 200);
    let metrics = agent().get(format!("{}/metrics", server.base)).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(metrics.contains("llmctl_requests_total{model=\"tiny\",outcome=\"ok\"} 3"), "{metrics}");
}

#[test]
fn errors_are_openai_shaped_with_the_table_statuses() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!("memory_budget = \"1MiB\"\n[models.m]\npath = \"{}\"\n", model.display()));
    let server = Server::start(&env, &[]);
    let table = [
        (serde_json::json!({"model": "nope", "prompt": "x"}), 404, "not_found"),
        (serde_json::json!({"model": "m", "prompt": "x", "temperature": -1}), 400, "usage"),
        (serde_json::json!({"prompt": "x"}), 400, "usage"),
        (serde_json::json!({"model": "m", "prompt": "x"}), 507, "no_capacity"),
    ];
    for (body, status, code) in table {
        let (got, text) = post(&server, "/v1/completions", body.clone());
        assert_eq!(got, status, "{body}: {text}");
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["code"], code, "{text}");
        assert!(error["error"]["message"].as_str().unwrap().len() > 10);
    }
    let (status, _) = post(&server, "/v1/nothing", serde_json::json!({}));
    assert_eq!(status, 404);
}

#[test]
fn a_full_queue_is_503_with_retry_after() {
    let env = Env::fake();
    let (server, holder, waiter) = one_busy_one_waiting(&env, "queue_depth = 1\n", "");
    let response = complete(&server, "m");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers().get("retry-after").unwrap(), "1");
    assert_success(&holder.wait_with_output().unwrap());
    assert_success(&waiter.wait_with_output().unwrap());
}

#[test]
fn a_client_that_disconnects_mid_stream_cancels_upstream() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    env.set("FAKE_LLAMA_TOKENS", "100000");
    env.set("FAKE_LLAMA_TOKEN_MS", "2");
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!("[models.m]\npath = \"{}\"\n", model.display()));
    let server = Server::start(&env, &[]);
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&address).unwrap();
    let body = serde_json::json!({"model": "m", "prompt": "x", "stream": true}).to_string();
    write!(stream, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    drop(reader);
    drop(stream);
    wait_until("upstream sees the cancellation", || {
        std::fs::read_to_string(&record).unwrap_or_default().contains("cancelled")
    });
    wait_until("the slot is free", || env.status_json()["instances"][0]["in_flight"] == 0);
}

#[test]
fn beyond_loopback_an_api_key_is_required_and_checked() {
    let env = Env::fake();
    let output = env.run(&["serve", "--listen", "0.0.0.0:0"]);
    assert_exit(&output, 2);
    assert!(stderr(&output).contains("API key"), "{}", stderr(&output));

    let key_file = env.path("key");
    std::fs::write(&key_file, "s3cret\n").unwrap();
    let server = Server::start(&env, &["--api-key-file", key_file.to_str().unwrap()]);
    let status = |key: Option<&str>| {
        let mut request = agent().get(format!("{}/v1/models", server.base));
        if let Some(key) = key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        request.call().unwrap().status().as_u16()
    };
    assert_eq!(status(None), 401);
    assert_eq!(status(Some("wrong")), 401);
    assert_eq!(status(Some("s3cret")), 200);
}

#[test]
fn curl_and_the_openai_python_package_work_against_serve() {
    let env = Env::real();
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!("[models.tiny]\npath = \"{}\"\n", model.display()));
    let server = Server::start(&env, &[]);
    let expected = tiny_model::expected_text();

    let curl = Command::new("curl")
        .args(["-sS", "-N", "--fail-with-body", &format!("{}/v1/chat/completions", server.base)])
        .args(["-H", "Content-Type: application/json", "-d"])
        .arg(r#"{"model":"tiny","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
        .output()
        .unwrap();
    assert!(curl.status.success(), "{}", String::from_utf8_lossy(&curl.stderr));
    assert!(String::from_utf8_lossy(&curl.stdout).contains("data: [DONE]"));

    let script = format!(
        r#"
import openai
client = openai.OpenAI(base_url="{base}/v1", api_key="unused")
reply = client.chat.completions.create(model="tiny", messages=[{{"role": "user", "content": "hi"}}])
print(reply.choices[0].message.content)
stream = client.chat.completions.create(model="tiny", messages=[{{"role": "user", "content": "hi"}}], stream=True)
print("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
done = client.completions.create(model="tiny", prompt="x", max_tokens=3)
print(done.choices[0].text)
try:
    client.completions.create(model="missing", prompt="x")
except openai.NotFoundError as error:
    print("404", error.status_code)
"#,
        base = server.base
    );
    let mut python = Command::new(test_python())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    python.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut out = String::new();
    output.stdout.as_slice().read_to_string(&mut out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, [expected.as_str(), expected.as_str(), " Pipes carry bytes", "404 404"], "{out}");
}

/// The Python with the `openai` package that tests/run installs.
fn test_python() -> String {
    if let Ok(python) = std::env::var("LLMCTL_TEST_PYTHON") {
        return python;
    }
    let venv = std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/llmctl/test-venv/bin/python3");
    assert!(venv.exists(), "{} is missing: run tests/fetch-test-models (tests/run does)", venv.display());
    venv.display().to_string()
}

#[test]
fn a_models_own_queue_limit_is_429_and_exit_75() {
    let env = Env::fake();
    let (server, holder, waiter) = one_busy_one_waiting(&env, "", "max_queued = 1\n");
    let response = complete(&server, "m");
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers().get("retry-after").unwrap(), "1");
    let output = env.run(&["run", "m", "x"]);
    assert_exit(&output, 75);
    assert!(stderr(&output).contains("max_queued"), "{}", stderr(&output));
    assert_success(&holder.wait_with_output().unwrap());
    assert_success(&waiter.wait_with_output().unwrap());
    assert_eq!(env.status_json()["instances"][0]["rejected"], 2);
}
