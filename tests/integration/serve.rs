//! `llmctl serve` with real HTTP clients: ureq from the tests, curl, and the official
//! `openai` Python package (installed by tests/run into a virtual environment).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use crate::support::*;
use crate::tiny_model;

/// A running `llmctl serve`, stopped with SIGINT when dropped.
pub(crate) struct Server {
    child: Child,
    pub(crate) base: String,
}

impl Server {
    pub(crate) fn start(env: &Env, extra: &[&str]) -> Server {
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
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).stderr(Stdio::null()).status();
        let _ = self.child.wait();
    }
}

pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

fn post(server: &Server, path: &str, body: serde_json::Value) -> (u16, String) {
    post_to(&server.base, path, body)
}

fn post_to(base: &str, path: &str, body: serde_json::Value) -> (u16, String) {
    let mut response = agent().post(format!("{base}{path}")).send(body.to_string()).unwrap();
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

fn post_raw(server: &Server, path: &str, body: &[u8]) -> (u16, String) {
    let mut response = agent().post(format!("{}{path}", server.base)).send(body).unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
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
    let ok = metrics.lines().find(|line| line.starts_with("llmctl_requests_total{model=\"tiny\",instance=\""));
    assert!(ok.is_some_and(|line| line.ends_with(",outcome=\"ok\"} 3")), "{metrics}");
}

#[test]
fn errors_are_openai_shaped_with_the_table_statuses() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!(
        "memory_budget = \"1MiB\"\n[models.m]\npath = \"{0}\"\n[models.n]\npath = \"{0}\"\n",
        model.display()
    ));
    let server = Server::start(&env, &[]);
    // A GGUF file no alias names cannot be loaded by naming its path.
    let stranger = env.tiny_model("stranger.gguf");
    let table = [
        (serde_json::json!({"model": "nope", "prompt": "x"}), 404, "not_found"),
        (serde_json::json!({"model": stranger, "prompt": "x"}), 404, "not_found"),
        (serde_json::json!({"model": model, "prompt": "x"}), 507, "no_capacity"),
        (serde_json::json!({"prompt": "x"}), 404, "not_found"),
        (serde_json::json!({"model": "m", "prompt": "x"}), 507, "no_capacity"),
    ];
    for (body, status, code) in table {
        let (got, text) = post(&server, "/v1/completions", body.clone());
        assert_eq!(got, status, "{body}: {text}");
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["kind"], code, "{text}");
        assert_eq!(error["error"]["code"], status, "the code is the status, as llama-server gives it: {text}");
        assert!(error["error"]["message"].as_str().unwrap().len() > 10);
    }
    // A 404 for an unknown model names the models there are.
    let (_, text) = post(&server, "/v1/chat/completions", serde_json::json!({"model": "gpt-4o-mini"}));
    assert!(text.contains("known models: m, n"), "{text}");
    let (status, text) = post_raw(&server, "/v1/chat/completions", b"{not json");
    assert_eq!(status, 400, "{text}");
    let (status, _) = post(&server, "/v1/nothing", serde_json::json!({}));
    assert_eq!(status, 404);
    let status = agent().get(format!("{}/v1/chat/completions", server.base)).call().unwrap().status();
    assert_eq!(status, 404, "llama-server answers another method on a POST route with 404");
}

#[test]
fn a_model_loaded_by_path_answers_to_the_name_the_model_list_gives_it() {
    let env = Env::fake();
    // Two aliases, so a request that names nothing known has no default to fall back on.
    let aliased = env.tiny_model("aliased.gguf");
    env.write_config(&format!("[models.a]\npath = \"{0}\"\n[models.b]\npath = \"{0}\"\n", aliased.display()));
    let elsewhere = env.tiny_model("elsewhere.gguf");
    let server = Server::start(&env, &[]);
    let request = serde_json::json!({"model": "elsewhere.gguf", "prompt": "x"});
    let (status, text) = post(&server, "/completion", request.clone());
    assert_eq!(status, 404, "not listed, not loaded: {text}");
    assert_success(&env.run(&["warm", elsewhere.to_str().unwrap()]));
    let models: serde_json::Value = serde_json::from_str(
        &agent().get(format!("{}/v1/models", server.base)).call().unwrap().body_mut().read_to_string().unwrap(),
    )
    .unwrap();
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == "elsewhere.gguf"), "{models}");
    let requests = || {
        let instances = env.status_json()["instances"].as_array().unwrap().clone();
        assert_eq!(instances.len(), 1, "only the instance loaded by path: {instances:?}");
        instances[0]["requests"].as_u64().unwrap()
    };
    let before = requests();
    let (status, text) = post(&server, "/completion", request);
    assert_eq!(status, 200, "every name the list gives is answered: {text}");
    assert_eq!(requests(), before + 1, "the request went to the instance loaded by path");
    // Its path stays refused: naming a file loads nothing a user did not load.
    let (status, text) = post(&server, "/completion", serde_json::json!({"model": elsewhere, "prompt": "x"}));
    assert_eq!(status, 404, "{text}");
}

#[test]
fn the_model_list_reads_a_header_again_once_its_file_changed() {
    let env = Env::fake();
    std::fs::create_dir_all(env.path("data/models")).unwrap();
    let file = env.path("data/models/loose.gguf");
    tiny_model::write(&file, "llama");
    let server = Server::start(&env, &[]);
    let architecture = || {
        let models: serde_json::Value = serde_json::from_str(
            &agent().get(format!("{}/v1/models", server.base)).call().unwrap().body_mut().read_to_string().unwrap(),
        )
        .unwrap();
        let entry = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "loose.gguf").cloned();
        entry.unwrap_or_else(|| panic!("{models}"))["meta"]["architecture"].clone()
    };
    assert_eq!(architecture(), "llama");
    assert_eq!(architecture(), "llama", "the same from the daemon's copy");
    // Another size, so the change shows whatever the clock's granularity.
    tiny_model::write(&file, "gemma3");
    assert_eq!(architecture(), "gemma3");
}

#[test]
fn an_unknown_model_error_names_a_dozen_models_and_counts_the_rest() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    let aliases: String = (0..30).map(|i| format!("[models.m{i:02}]\npath = \"{}\"\n", model.display())).collect();
    env.write_config(&aliases);
    let server = Server::start(&env, &[]);
    let (status, text) = post(&server, "/v1/completions", serde_json::json!({"model": "nope", "prompt": "x"}));
    assert_eq!(status, 404, "{text}");
    let message =
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("known models: m00, m01,"), "{message}");
    assert!(message.contains("m11 and 18 more (GET /v1/models lists them all)"), "{message}");
    assert!(!message.contains("m12"), "{message}");
}

#[test]
fn requests_without_a_known_model_go_to_the_default() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!(
        "default_model = \"b\"\n[models.a]\npath = \"{0}\"\nparallel = 1\n[models.b]\npath = \"{0}\"\nparallel = 2\n",
        model.display()
    ));
    // A model file in the models directory is a model too, by its file name.
    std::fs::create_dir_all(env.path("data/models")).unwrap();
    tiny_model::write(&env.path("data/models/loose.gguf"), "llama");
    let server = Server::start(&env, &[]);
    for body in [
        serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
    ] {
        let (status, text) = post(&server, "/v1/chat/completions", body);
        assert_eq!(status, 200, "{text}");
    }
    // A model named by something other than a string is a bad request, never the default.
    for model in [serde_json::json!(42), serde_json::json!(["a"]), serde_json::json!(true), serde_json::json!({})] {
        let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let (status, text) = post(&server, "/v1/chat/completions", body);
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("`model` must be a string"), "{text}");
    }
    let status = env.status_json();
    let instances = status["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{status}");
    assert_eq!(instances[0]["name"], "b");
    assert_eq!(instances[0]["requests"], 2);
    let models: serde_json::Value = serde_json::from_str(
        &agent().get(format!("{}/v1/models", server.base)).call().unwrap().body_mut().read_to_string().unwrap(),
    )
    .unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "loose.gguf"], "{models}");
    let (status, text) = post(
        &server,
        "/v1/chat/completions",
        serde_json::json!({"model": "loose.gguf", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(models["data"][1]["default"], true);
    assert_eq!(models["data"][1]["loaded"], true);
    assert_eq!(models["data"][0]["loaded"], false);
    assert!(models["data"][0]["context_length"].as_u64().unwrap() > 0, "{models}");
}

#[test]
fn a_full_queue_is_503_with_retry_after() {
    let env = Env::fake();
    let (server, holder, handed) = one_busy_one_waiting(&env, "queue_depth = 1\n", "");
    // The waiter above was handed to the child; this one fills the queue.
    let waiter = env.spawn(&["run", "m", "x"]);
    wait_until("a second request waits", || env.status_json()["instances"][0]["queued"] == 2);
    let response = complete(&server, "m");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers().get("retry-after").unwrap(), "1");
    for waiting in [holder, handed, waiter] {
        assert_success(&waiting.wait_with_output().unwrap());
    }
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
    let body =
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true}).to_string();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the answer ended before its first event");
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
    for address in ["notaport", "127.0.0.1:99999", ""] {
        let output = env.run(&["serve", "--listen", address]);
        assert_exit(&output, 2);
        assert!(stderr(&output).contains("as an address to listen on"), "{}", stderr(&output));
    }
    // Refused before a daemon was started for them.
    assert_exit(&env.run(&["status", "--no-autostart"]), 69);

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
"#,
        base = server.base
    );
    let out = python(&script);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, [expected.as_str(), expected.as_str(), " Pipes carry bytes"], "{out}");
}

/// The Python with the `openai` package that tests/run installs.
pub(crate) fn test_python() -> String {
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

/// A chat template from the llama.cpp sources, copied by tests/fetch-test-models.
pub(crate) fn template(name: &str) -> std::path::PathBuf {
    let path = gemma_model().with_file_name(name);
    assert!(path.exists(), "{} is missing: run tests/fetch-test-models (tests/run does)", path.display());
    path
}

/// A llama-server started by the test with the argv llmctl gave one of its children, but
/// on a loopback port; killed when dropped.
struct Direct {
    child: Child,
    base: String,
}

impl Direct {
    /// Starts a server with the command line of the child `pid`.
    fn like(pid: u32) -> Direct {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let mut argv: Vec<String> =
            cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let host = argv.iter().position(|a| a == "--host").expect("the child's argv has --host");
        argv.splice(host..host + 2, ["--host".to_string(), "127.0.0.1".into(), "--port".into(), port.to_string()]);
        let child =
            Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        wait_until("the direct llama-server is ready", || {
            agent().get(format!("{base}/health")).call().is_ok_and(|r| r.status() == 200)
        });
        Direct { child, base }
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An answer with what differs between two servers by nature (ids, clocks, timings) taken
/// out: JSON bodies and every SSE event's JSON.
fn comparable(content_type: &str, body: &str) -> String {
    fn scrub(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for key in ["id", "created", "created_at", "completed_at", "timings", "system_fingerprint"] {
                    map.remove(key);
                }
                map.values_mut().for_each(scrub);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(scrub),
            _ => {}
        }
    }
    let scrubbed = |text: &str| match serde_json::from_str::<serde_json::Value>(text) {
        Ok(mut value) => {
            scrub(&mut value);
            value.to_string()
        }
        Err(_) => text.to_string(),
    };
    if content_type.starts_with("text/event-stream") {
        body.split("\n\n")
            .map(|event| {
                event
                    .lines()
                    .map(|line| match line.strip_prefix("data: ") {
                        Some(data) => format!("data: {}", scrubbed(data)),
                        None => line.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n\n")
    } else {
        scrubbed(body)
    }
}

/// Status, content type, comparable body and end-to-end headers of one request.
fn exchange_with(base: &str, path: &str, body: &serde_json::Value) -> (u16, String, String, Vec<(String, String)>) {
    let mut response = agent().post(format!("{base}{path}")).send(body.to_string()).unwrap();
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    // The child's headers pass through `serve`; what frames one connection (and the clock)
    // is each server's own.
    let mut headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(name, _)| {
            !["date", "content-length", "transfer-encoding", "connection", "keep-alive"].contains(&name.as_str())
        })
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("").to_string()))
        .collect();
    headers.sort();
    let text = response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap();
    let comparable = comparable(&content_type, &text);
    (status, content_type, comparable, headers)
}

/// A tiny model that answers with a tool call in the markup of Qwen 2.5's template.
pub(crate) fn tool_calling_model(env: &Env) -> std::path::PathBuf {
    let path = env.path("models/caller.gguf");
    tiny_model::write_words(
        &path,
        "llama",
        &[
            "<tool_call>",
            "\n{\"name\":",
            "▁\"get_weather\",",
            "▁\"arguments\":",
            "▁{\"city\":",
            "▁\"Paris\"}}\n",
            "</tool_call>",
        ],
    );
    path
}

pub(crate) const WEATHER_TOOL: &str = r#"[{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]"#;

#[test]
fn every_endpoint_answers_byte_for_byte_as_llama_server_with_the_same_argv() {
    let env = Env::real();
    let qwen = template("Qwen-Qwen2.5-7B-Instruct.jinja");
    let caller = tool_calling_model(&env);
    env.write_config(&format!(
        "[models.smol]\npath = \"{demo}\"\nargs = [\"--jinja\", \"--chat-template-file\", \"{qwen}\"]\n\
         [models.caller]\npath = \"{caller}\"\nargs = [\"--jinja\", \"--chat-template-file\", \"{qwen}\"]\n",
        demo = demo_model().display(),
        qwen = qwen.display(),
        caller = caller.display(),
    ));
    let server = Server::start(&env, &[]);
    let tools: serde_json::Value = serde_json::from_str(WEATHER_TOOL).unwrap();
    let chat = |extra: serde_json::Value| {
        let mut body = serde_json::json!({"model": "smol", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Name a colour."}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let schema = serde_json::json!({"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"], "additionalProperties": false});
    let cases: Vec<(&str, serde_json::Value)> = vec![
        ("/v1/chat/completions", chat(serde_json::json!({}))),
        ("/v1/chat/completions", chat(serde_json::json!({"stream": true, "stream_options": {"include_usage": true}}))),
        (
            "/v1/chat/completions",
            chat(
                serde_json::json!({"max_tokens": 24, "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}),
            ),
        ),
        ("/v1/chat/completions", chat(serde_json::json!({"logprobs": true, "top_logprobs": 2, "max_tokens": 3}))),
        ("/v1/chat/completions", chat(serde_json::json!({"n": 2}))),
        ("/v1/chat/completions", chat(serde_json::json!({"tools": tools, "max_tokens": 4}))),
        ("/v1/chat/completions", chat(serde_json::json!({"model": "caller", "tools": tools, "max_tokens": 32}))),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"model": "caller", "tools": tools, "max_tokens": 32, "stream": true})),
        ),
        ("/chat/completions", chat(serde_json::json!({"grammar": "root ::= \"red\" | \"blue\""}))),
        ("/v1/completions", serde_json::json!({"model": "smol", "prompt": "Once", "max_tokens": 6, "temperature": 0})),
        (
            "/completions",
            serde_json::json!({"model": "smol", "prompt": "Once", "max_tokens": 6, "temperature": 0, "stream": true}),
        ),
        (
            "/completion",
            serde_json::json!({"model": "smol", "prompt": "Once", "n_predict": 6, "temperature": 0, "stream": true}),
        ),
        ("/tokenize", serde_json::json!({"model": "smol", "content": "Hello world", "with_pieces": true})),
        ("/detokenize", serde_json::json!({"model": "smol", "tokens": [19556, 905]})),
        ("/apply-template", serde_json::json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}]})),
        (
            "/infill",
            serde_json::json!({"model": "smol", "input_prefix": "def f(", "input_suffix": "):", "n_predict": 3}),
        ),
        (
            "/v1/messages",
            serde_json::json!({"model": "smol", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/messages",
            serde_json::json!({"model": "smol", "max_tokens": 6, "temperature": 0, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/messages/count_tokens",
            serde_json::json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/responses",
            serde_json::json!({"model": "smol", "input": "hi", "max_output_tokens": 6, "temperature": 0}),
        ),
    ];
    let mut served = Vec::new();
    for (path, body) in &cases {
        served.push(exchange_with(&server.base, path, body));
    }
    // Embeddings and reranking run on instances of their own, started with those flags.
    let embed = serde_json::json!({"model": "smol", "input": ["red", "blue"]});
    let rerank = serde_json::json!({"model": "smol", "query": "red", "documents": ["red", "blue"]});
    let embedded = exchange_with(&server.base, "/v1/embeddings", &embed);
    let reranked = exchange_with(&server.base, "/v1/rerank", &rerank);

    let status = env.status_json();
    let pid_of = |name: &str, flag: &str| {
        let instances = status["instances"].as_array().unwrap();
        let pid = instances.iter().map(|i| i["pid"].as_u64().unwrap() as u32).find(|pid| {
            let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).into_owned();
            let special = cmdline.contains("--embeddings") || cmdline.contains("--reranking");
            cmdline.contains(&format!("--alias\0{name}\0"))
                && if flag.is_empty() { !special } else { cmdline.contains(flag) }
        });
        pid.unwrap_or_else(|| panic!("no child for {name} {flag}: {status}"))
    };
    let smol = Direct::like(pid_of("smol", ""));
    let caller_direct = Direct::like(pid_of("caller", ""));
    for ((path, body), got) in cases.iter().zip(&served) {
        let base = if body["model"] == "caller" { &caller_direct.base } else { &smol.base };
        let direct = exchange_with(base, path, body);
        assert_eq!(*got, direct, "{path} {body}");
    }
    // What the cases show beyond equality: the features reached the model.
    let tool_call = &served[6].2;
    assert!(tool_call.contains("\"tool_calls\"") && tool_call.contains("get_weather"), "{tool_call}");
    assert!(served[7].2.contains("\"tool_calls\""), "{}", served[7].2);
    let json_reply: serde_json::Value = serde_json::from_str(&served[2].2).unwrap();
    let content = json_reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(content).is_ok_and(|v| v["colour"].is_string()), "{content}");
    assert!(served[3].2.contains("top_logprobs"), "{}", served[3].2);
    assert_eq!(served[4].0, 400, "llama-server refuses n > 1, and so does serve");
    drop((smol, caller_direct));

    let embed_direct = Direct::like(pid_of("smol", "--embeddings"));
    assert_eq!(embedded, exchange_with(&embed_direct.base, "/v1/embeddings", &embed));
    assert_eq!(embedded.0, 200, "{}", embedded.2);
    drop(embed_direct);
    let rerank_direct = Direct::like(pid_of("smol", "--reranking"));
    assert_eq!(reranked, exchange_with(&rerank_direct.base, "/v1/rerank", &rerank));
    assert_eq!(reranked.0, 200, "{}", reranked.2);
    drop(rerank_direct);
    drop(server);
    drop(env);
}

/// Runs a Python script with the test virtual environment's packages; returns stdout.
pub(crate) fn python(script: &str) -> String {
    let mut child = Command::new(test_python())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_openai_and_anthropic_sdks_get_tools_schemas_logprobs_reasoning_and_embeddings() {
    let env = Env::real();
    let qwen = template("Qwen-Qwen2.5-7B-Instruct.jinja");
    let r1 = template("llama-cpp-deepseek-r1.jinja");
    let caller = tool_calling_model(&env);
    env.write_config(&format!(
        "default_model = \"smol\"\n\
         [models.smol]\npath = \"{demo}\"\n\
         [models.caller]\npath = \"{caller}\"\nargs = [\"--jinja\", \"--chat-template-file\", \"{qwen}\"]\n\
         [models.thinker]\npath = \"{demo}\"\nargs = [\"--jinja\", \"--chat-template-file\", \"{r1}\", \"--reasoning-format\", \"deepseek\"]\n\
         [models.embedder]\npath = \"{demo}\"\nembeddings = true\n",
        demo = demo_model().display(),
        qwen = qwen.display(),
        caller = caller.display(),
        r1 = r1.display(),
    ));
    let key_file = env.path("key");
    std::fs::write(&key_file, "k3y\n").unwrap();
    let server = Server::start(&env, &["--api-key-file", key_file.to_str().unwrap()]);
    let script = format!(
        r#"
import json, openai, anthropic
client = openai.OpenAI(base_url="{base}/v1", api_key="k3y")
tools = json.loads('''{tools}''')
reply = client.chat.completions.create(model="caller", messages=[{{"role": "user", "content": "Weather in Paris?"}}], tools=tools)
call = reply.choices[0].message.tool_calls[0]
print("tool", call.function.name, json.loads(call.function.arguments)["city"], reply.choices[0].finish_reason)
names, arguments = set(), ""
for chunk in client.chat.completions.create(model="caller", messages=[{{"role": "user", "content": "Weather?"}}], tools=tools, stream=True):
    for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
        if delta.function.name: names.add(delta.function.name)
        arguments += delta.function.arguments or ""
print("streamed", sorted(names), json.loads(arguments)["city"])
schema = {{"type": "object", "properties": {{"colour": {{"enum": ["red", "green", "blue"]}}, "n": {{"type": "integer", "minimum": 0, "maximum": 9}}}},
    "required": ["colour", "n"], "additionalProperties": False}}
reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "A colour"}}], max_tokens=60, temperature=0,
    response_format={{"type": "json_schema", "json_schema": {{"name": "c", "schema": schema}}}})
value = json.loads(reply.choices[0].message.content)
print("schema", sorted(value), type(value["n"]).__name__)
reply = client.chat.completions.create(model="smol", messages=[{{"role": "user", "content": "hi"}}], max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
print("logprobs", len(reply.choices[0].logprobs.content), len(reply.choices[0].logprobs.content[0].top_logprobs))
thought = ""
for chunk in client.chat.completions.create(model="thinker", messages=[{{"role": "user", "content": "hi"}}], max_tokens=8, temperature=0, stream=True):
    if chunk.choices: thought += (chunk.choices[0].delta.model_extra or {{}}).get("reasoning_content") or ""
print("reasoning", len(thought) > 0)
vectors = client.embeddings.create(model="embedder", input=["red", "blue"])
print("embeddings", len(vectors.data), len(vectors.data[0].embedding), vectors.usage.prompt_tokens > 0)
vectors = client.embeddings.create(model="anything", input="red")
print("default embeddings", len(vectors.data))
try:
    openai.OpenAI(base_url="{base}/v1", api_key="wrong").models.list()
except openai.AuthenticationError as error:
    print("auth", error.status_code)
claude = anthropic.Anthropic(base_url="{base}", api_key="k3y")
message = claude.messages.create(model="smol", max_tokens=6, temperature=0, messages=[{{"role": "user", "content": "hi"}}])
print("anthropic", message.role, message.stop_reason, message.usage.output_tokens)
text = ""
with claude.messages.stream(model="smol", max_tokens=6, temperature=0, messages=[{{"role": "user", "content": "hi"}}]) as stream:
    for piece in stream.text_stream: text += piece
print("anthropic stream", len(text) > 0)
print("count", claude.messages.count_tokens(model="smol", messages=[{{"role": "user", "content": "hi"}}]).input_tokens > 0)
"#,
        base = server.base,
        tools = WEATHER_TOOL,
    );
    let out = python(&script);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "tool get_weather Paris tool_calls",
            "streamed ['get_weather'] Paris",
            "schema ['colour', 'n'] int",
            "logprobs 3 2",
            "reasoning True",
            "embeddings 2 576 True",
            "default embeddings 1",
            "auth 401",
            "anthropic assistant max_tokens 6",
            "anthropic stream True",
            "count True",
        ],
        "{out}"
    );
    // Usage is counted for forwarded requests as for `run`.
    let status = env.status_json();
    let smol = status["instances"].as_array().unwrap().iter().find(|i| i["name"] == "smol").unwrap().clone();
    assert!(smol["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{status}");
    drop(server);
    drop(env);
}

/// Sends one request on a fresh connection and returns the connection without reading.
fn send_request(server: &Server, path: &str, body: &serde_json::Value) -> TcpStream {
    let mut stream = TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    let body = body.to_string();
    let host = server.base.trim_start_matches("http://");
    write!(stream, "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    stream
}

fn instance(env: &Env, name: &str) -> serde_json::Value {
    let status = env.status_json();
    status["instances"].as_array().unwrap().iter().find(|i| i["name"] == name).cloned().unwrap_or_default()
}

#[test]
fn a_client_that_leaves_a_non_streamed_generation_frees_the_slot_at_once() {
    let env = Env::real();
    env.write_config(&format!("[models.smol]\npath = \"{}\"\n", demo_model().display()));
    let server = Server::start(&env, &[]);
    assert_success(&env.run(&["warm", "smol"]));
    // 4,000 tokens take the 135M model tens of seconds here; the slot must come back long
    // before that.
    let body = serde_json::json!({"model": "smol", "prompt": "Once upon a time", "max_tokens": 4000,
        "ignore_eos": true, "temperature": 1});
    let stream = send_request(&server, "/v1/completions", &body);
    wait_until("the generation runs", || instance(&env, "smol")["in_flight"] == 1);
    let left = std::time::Instant::now();
    drop(stream);
    wait_until("the slot is free", || instance(&env, "smol")["in_flight"] == 0);
    eprintln!("slot freed {:?} after the client left", left.elapsed());
    assert_eq!(instance(&env, "smol")["outcomes"]["cancelled"], 1);
    // The child is fine and serves the next request.
    let (status, text) =
        post(&server, "/v1/completions", serde_json::json!({"model": "smol", "prompt": "x", "max_tokens": 2}));
    assert_eq!(status, 200, "{text}");
}

#[test]
fn a_client_that_leaves_while_queued_or_loading_gives_its_place_up() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    let (server, holder, waiter) = one_busy_one_waiting(&env, "", "");
    let queued = send_request(
        &server,
        "/v1/chat/completions",
        &serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "QUEUED-MARKER"}]}),
    );
    wait_until("the HTTP request waits", || instance(&env, "m")["queued"] == 2);
    drop(queued);
    wait_until("it left the queue", || instance(&env, "m")["queued"] == 1);
    assert_success(&holder.wait_with_output().unwrap());
    assert_success(&waiter.wait_with_output().unwrap());
    assert!(!std::fs::read_to_string(&record).unwrap().contains("QUEUED-MARKER"));

    // A model that takes 3 s to load: the request leaves during the load and never reaches it.
    let slow = env.tiny_model("slow.gguf");
    env.write_config(&format!(
        "[models.slow]\npath = \"{}\"\nargs = [\"--fake-start-ms\", \"3000\"]\n",
        slow.display()
    ));
    let loading = send_request(
        &server,
        "/v1/chat/completions",
        &serde_json::json!({"model": "slow", "messages": [{"role": "user", "content": "LOADING-MARKER"}]}),
    );
    wait_until("the model loads", || instance(&env, "slow")["state"] == "starting");
    drop(loading);
    wait_until("the request left", || instance(&env, "slow")["queued"] == 0);
    assert_success(&env.run(&["warm", "slow"]));
    assert!(!std::fs::read_to_string(&record).unwrap().contains("LOADING-MARKER"));
}

/// The resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// What one raw exchange gets back (status line and headers, or what there was).
fn raw(address: &str, sent: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let _ = stream.write_all(sent);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Every limit of the HTTP layer, against `server` (whose key is `key`, if any), hosted by
/// the daemon of `env`: the daemon and its child survive it, and `llmctl run` on the Unix
/// socket answers while it goes on.
fn attack(env: &Env, server: &Server, key: Option<&str>) {
    let address = server.base.trim_start_matches("http://").to_string();
    let pid = env.daemon_pid().expect("a daemon runs");
    assert_success(&env.run(&["run", "m", "warm"]));
    let child = instance(env, "m")["pid"].as_u64().expect("the model is loaded") as u32;
    let auth = key.map(|key| format!("Authorization: Bearer {key}\r\n")).unwrap_or_default();

    // A slow head, in the background: 408 once the head timeout passes. It connects here,
    // before the pool is filled below: connections are accepted in the order they came, so
    // it holds a worker when the rest arrive, however late its thread runs.
    let mut slow_stream = TcpStream::connect(&address).unwrap();
    slow_stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    slow_stream.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: ").unwrap();
    let slow = std::thread::spawn(move || {
        let mut answer = Vec::new();
        let _ = slow_stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    });

    let huge = raw(&address, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n");
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    let chunked =
        raw(&address, b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffff\r\n");
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    assert!(raw(&address, b"\x16\x03\x01 not http\r\n\r\n").starts_with("HTTP/1.1 400"));

    // An endless header line: refused once it passes the limit, and the process does not grow.
    let before = rss_kib(pid);
    for _ in 0..4 {
        let mut stream = TcpStream::connect(&address).unwrap();
        let _ = stream.write_all(b"GET /v1/models HTTP/1.1\r\nX-Endless: ");
        let junk = vec![b'a'; 1 << 20];
        for _ in 0..8 {
            if stream.write_all(&junk).is_err() {
                break;
            }
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
    }
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 8 << 10, "the daemon grew {grown} KiB on endless headers");

    // Keep-alive: two requests on one connection, both answered.
    let two = format!("GET /health HTTP/1.1\r\n{auth}\r\nGET /v1/models HTTP/1.1\r\n{auth}Connection: close\r\n\r\n");
    let answer = raw(&address, two.as_bytes());
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");

    let slow = slow.join().unwrap();
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow}");

    // Silent connections fill every worker and the backlog: a request is told busy (503,
    // `Retry-After: 1`) only until they have been silent a second, then they are hung up
    // to make room, and it is answered.
    let held: Vec<TcpStream> = (0..260).map(|_| TcpStream::connect(&address).unwrap()).collect();
    let models = format!("GET /v1/models HTTP/1.1\r\n{auth}Connection: close\r\n\r\n");
    let mut answer = raw(&address, models.as_bytes());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !answer.starts_with("HTTP/1.1 200") && std::time::Instant::now() < deadline {
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("Retry-After: 1"), "{answer}");
        answer = raw(&address, models.as_bytes());
    }
    assert!(answer.starts_with("HTTP/1.1 200"), "silent connections kept every place: {answer}");
    // While they are there, the Unix socket answers too.
    let output = env.run(&["run", "m", "during the attack"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "during the attack");
    drop(held);
    assert!(alive(pid), "the daemon died");
    assert!(alive(child), "the model's child died");
    assert_eq!(env.daemon_pid(), Some(pid));
}

#[test]
fn nothing_a_client_sends_stops_or_bloats_serve_with_or_without_a_key() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!("[models.m]\npath = \"{}\"\n", model.display()));
    let open = Server::start(&env, &[]);
    attack(&env, &open, None);

    let key_file = env.path("key");
    std::fs::write(&key_file, "s3cret\n").unwrap();
    let port = std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    let listen = format!("0.0.0.0:{port}");
    let child = env
        .command(&["serve", "--listen", &listen, "--api-key-file", key_file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("serve answers", || TcpStream::connect(("127.0.0.1", port)).is_ok());
    let keyed = Server { child, base: format!("http://127.0.0.1:{port}") };
    attack(&env, &keyed, Some("s3cret"));
    // The scheme is matched in any case, and Anthropic's header works too.
    // The scheme may be left out, as llama-server allows.
    for header in
        ["Authorization: bearer s3cret", "Authorization: BEARER s3cret", "x-api-key: s3cret", "Authorization: s3cret"]
    {
        let answer = raw(
            keyed.base.trim_start_matches("http://"),
            format!("GET /v1/models HTTP/1.1\r\n{header}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{header}: {answer}");
    }
    let answer = raw(keyed.base.trim_start_matches("http://"), b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answer = raw(
        keyed.base.trim_start_matches("http://"),
        b"GET /v1/models HTTP/1.1\r\nAuthorization: Basic s3cret\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 401"), "another scheme is not a bearer key: {answer}");
    // Health probes need no key, on both of llama-server's paths.
    for path in ["/health", "/v1/health"] {
        let answer = raw(
            keyed.base.trim_start_matches("http://"),
            format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
    drop((open, keyed));
    drop(env);
}

#[test]
fn cors_allows_local_pages_by_default_and_the_configured_origins_otherwise() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!("[models.m]\npath = \"{}\"\n", model.display()));
    let server = Server::start(&env, &[]);
    let preflight = |origin: &str| {
        let response = agent()
            .options(format!("{}/v1/chat/completions", server.base))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization, content-type")
            .call()
            .unwrap();
        let allowed = response.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string());
        (response.status().as_u16(), allowed)
    };
    assert_eq!(preflight("http://localhost:5173"), (200, Some("http://localhost:5173".into())));
    assert_eq!(preflight("http://evil.example"), (200, None));
    let response =
        agent().get(format!("{}/v1/models", server.base)).header("Origin", "http://127.0.0.1:3000").call().unwrap();
    assert_eq!(response.headers().get("access-control-allow-origin").unwrap(), "http://127.0.0.1:3000");

    env.write_config(&format!(
        "cors_origins = [\"https://chat.example\"]\n[models.m]\npath = \"{}\"\n",
        model.display()
    ));
    assert_eq!(preflight("https://chat.example"), (200, Some("https://chat.example".into())));
    assert_eq!(preflight("http://localhost:5173"), (200, None));
    env.write_config("cors_origins = [\"chat.example/x\"]\n");
    let status = agent().get(format!("{}/v1/models", server.base)).call().unwrap().status();
    assert_eq!(status, 400, "a bad cors_origins is a config error");
}

#[test]
fn run_gives_json_for_a_schema_and_follows_a_grammar() {
    let env = Env::real();
    env.write_config(&format!("[models.smol]\npath = \"{}\"\n", demo_model().display()));
    let schema = r#"{"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "why": {"type": "string", "maxLength": 20}},
        "required": ["answer", "why"], "additionalProperties": false}"#;
    // Greedy, and with room enough that the grammar, not the token limit, ends the object.
    let output =
        env.run(&["run", "-s", schema, "smol", "Is the sky blue? Answer in JSON.", "--temperature", "0", "-n", "400"]);
    assert_success(&output);
    let value: serde_json::Value =
        serde_json::from_str(&stdout(&output)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&output)));
    assert!(value["answer"] == "yes" || value["answer"] == "no", "{value}");
    let schema_file = env.path("schema.json");
    std::fs::write(&schema_file, schema).unwrap();
    let output = env.run(&[
        "run",
        "--json-schema",
        schema_file.to_str().unwrap(),
        "smol",
        "Is grass green?",
        "--temperature",
        "0",
        "-n",
        "400",
    ]);
    assert_success(&output);
    assert!(serde_json::from_str::<serde_json::Value>(&stdout(&output)).is_ok(), "{}", stdout(&output));

    let grammar = env.path("yes-no.gbnf");
    std::fs::write(&grammar, "root ::= \"yes\" | \"no\"\n").unwrap();
    let output = env.run(&["run", "--grammar", grammar.to_str().unwrap(), "smol", "Is water wet?"]);
    assert_success(&output);
    assert!(["yes", "no"].contains(&stdout(&output).trim()), "{}", stdout(&output));

    assert_exit(&env.run(&["run", "-s", "{not json", "smol", "x"]), 65);
    assert_exit(&env.run(&["run", "-s", env.path("missing.json").to_str().unwrap(), "smol", "x"]), 66);
    assert_exit(&env.run(&["run", "-s", "{}", "--grammar", grammar.to_str().unwrap(), "smol", "x"]), 2);
    std::fs::write(&grammar, "root ::= broken (\n").unwrap();
    let output = env.run(&["run", "--grammar", grammar.to_str().unwrap(), "smol", "x"]);
    assert_exit(&output, 65);
}

#[test]
fn many_http_clients_across_three_models_with_one_instance_all_get_answers() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    let mut config = "max_instances = 1\n".to_string();
    for name in ["a", "b", "c"] {
        config += &format!("[models.{name}]\npath = \"{}\"\nargs = [\"--fake-tokens\", \"5\"]\n", model.display());
    }
    env.write_config(&config);
    let server = Server::start(&env, &[]);
    let base = server.base.clone();
    let clients: Vec<_> = (0..45)
        .map(|i| {
            let base = base.clone();
            std::thread::spawn(move || {
                let name = ["a", "b", "c"][i % 3];
                let body = serde_json::json!({"model": name, "stream": i % 2 == 0,
                    "messages": [{"role": "user", "content": "hi"}]});
                let mut response = agent().post(format!("{base}/v1/chat/completions")).send(body.to_string()).unwrap();
                (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
            })
        })
        .collect();
    for client in clients {
        let (status, body) = client.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("t t") || body.matches("\"t \"").count() == 5, "{body}");
    }
    let status = env.status_json();
    let served: u64 = status["instances"].as_array().unwrap().iter().map(|i| i["requests"].as_u64().unwrap()).sum();
    assert_eq!(served, 45, "{status}");
    drop(server);
    drop(env);
}

#[test]
fn serve_killed_closes_the_listener_only_and_a_crashing_child_breaks_the_answer_off() {
    let mut env = Env::fake();
    env.set("FAKE_LLAMA_TOKENS", "100000");
    env.set("FAKE_LLAMA_TOKEN_MS", "5");
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!(
        "[models.m]\npath = \"{0}\"\n[models.crashy]\npath = \"{0}\"\nargs = [\"--fake-crash-after\", \"3\"]\n",
        model.display()
    ));
    let mut server = Server::start(&env, &[]);
    let stream = send_request(
        &server,
        "/v1/chat/completions",
        &serde_json::json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    );
    wait_until("the generation runs", || instance(&env, "m")["in_flight"] == 1);
    let model_pid = instance(&env, "m")["pid"].clone();
    // SIGKILL on `serve`: the daemon closes its listener and nothing else.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let address = server.base.trim_start_matches("http://").to_string();
    wait_until("the listener closes", || TcpStream::connect(&address).is_err());
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    for _ in 0..20 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream in flight goes on");
    }
    assert_eq!(instance(&env, "m")["pid"], model_pid, "the model stays loaded");
    drop(reader);
    drop(stream);
    wait_until("the slot is free", || instance(&env, "m")["in_flight"] == 0);
    assert_eq!(instance(&env, "m")["outcomes"]["cancelled"], 1);

    // A child that dies mid-answer: the streamed body is cut off, never ended as if whole.
    let server = Server::start(&env, &[]);
    let mut response = agent()
        .post(format!("{}/v1/chat/completions", server.base))
        .send(
            serde_json::json!({"model": "crashy", "stream": true, "messages": [{"role": "user", "content": "x"}]})
                .to_string(),
        )
        .unwrap();
    assert_eq!(response.status(), 200);
    let read = response.body_mut().read_to_string();
    assert!(read.is_err() || !read.as_ref().unwrap().contains("[DONE]"), "{read:?}");
    // The restarted child answers; a crash before any answer is a 502 with the reason.
    let (status, text) = post(
        &server,
        "/v1/chat/completions",
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{text}");
    drop(server);
    drop(env);
}

#[test]
fn the_address_of_a_killed_serve_is_free_again_at_once() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!("[models.m]\npath = \"{}\"\n", model.display()));
    let mut first = Server::start(&env, &[]);
    let listen = first.base.trim_start_matches("http://").to_string();
    let base = first.base.clone();
    // Killed: it never says goodbye, and the daemon looks for it only every 200 ms.
    let _ = Command::new("kill").args(["-KILL", &first.child.id().to_string()]).status();
    let _ = first.child.wait();
    // Reaped: its pid is not to be signalled again by the guard.
    std::mem::forget(first);
    // A client that asks for the address at once, before that look, is given it.
    let mut second = std::os::unix::net::UnixStream::connect(env.socket()).unwrap();
    let request = serde_json::json!({"type": "listen", "address": listen, "api_key": null});
    let hello = serde_json::json!({"type": "hello", "version": llmctl::protocol::VERSION});
    second.write_all(format!("{hello}\n{request}\n").as_bytes()).unwrap();
    let mut lines = BufReader::new(second.try_clone().unwrap()).lines();
    let _hello = lines.next().unwrap().unwrap();
    let answer: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(answer["type"], "listening", "{answer}");
    let (status, text) = post_to(&base, "/completion", serde_json::json!({"model": "m", "prompt": "x"}));
    assert_eq!(status, 200, "{text}");
    drop((second, lines));
    wait_until("the listener closes with its client", || TcpStream::connect(&listen).is_err());
    drop(env);
}

#[test]
fn the_daemon_hosts_the_listener_one_per_address_and_serve_closes_only_its_own() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!("[models.m]\npath = \"{}\"\n", model.display()));
    let first = Server::start(&env, &[]);
    let mut second = Server::start(&env, &[]);
    for server in [&first, &second] {
        let (status, text) = post(server, "/completion", serde_json::json!({"model": "m", "prompt": "x"}));
        assert_eq!(status, 200, "{text}");
    }
    // `serve` is not on the path: stopped, its listener still answers (the daemon serves).
    let _ = Command::new("kill").args(["-STOP", &first.child.id().to_string()]).status();
    let (status, _) = post(&first, "/completion", serde_json::json!({"model": "m", "prompt": "x"}));
    let _ = Command::new("kill").args(["-CONT", &first.child.id().to_string()]).status();
    assert_eq!(status, 200, "the daemon answers while serve is stopped");
    let status = env.status_json();
    assert_eq!(status["daemon"]["listening"].as_array().unwrap().len(), 2, "{status}");

    // The same address twice, and an address another program holds, are refused clearly.
    let listen = first.base.trim_start_matches("http://");
    let output = env.run(&["serve", "--listen", listen]);
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("already serves"), "{}", stderr(&output));
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = other.local_addr().unwrap().to_string();
    let output = env.run(&["serve", "--listen", &taken]);
    assert_exit(&output, 69);
    let message = stderr(&output);
    assert!(message.contains("another program") && !message.contains("cannot reach the llmctl daemon"), "{message}");

    // SIGTERM on one `serve`: its listener closes, nothing else does.
    let model_pid = instance(&env, "m")["pid"].clone();
    let _ = Command::new("kill").args(["-TERM", &second.child.id().to_string()]).status();
    assert!(second.child.wait().unwrap().success(), "serve ends cleanly on SIGTERM");
    let second_address = second.base.trim_start_matches("http://").to_string();
    wait_until("the second listener closes", || TcpStream::connect(&second_address).is_err());
    let (status, _) = post(&first, "/completion", serde_json::json!({"model": "m", "prompt": "x"}));
    assert_eq!(status, 200, "the other listener serves on");
    assert_eq!(instance(&env, "m")["pid"], model_pid, "the model stays loaded");
    drop(first);
    drop(env);
}

#[test]
fn the_config_makes_the_daemon_listen_from_its_start() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    env.write_config(&format!("listen = [\"127.0.0.1:{port}\"]\n[models.m]\npath = \"{}\"\n", model.display()));
    assert_success(&env.run(&["status"]));
    let mut response = agent()
        .post(format!("http://127.0.0.1:{port}/completion"))
        .send(serde_json::json!({"model": "m", "prompt": "hello"}).to_string())
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.body_mut().read_to_string().unwrap().contains("hello"));
    assert_success(&env.run(&["shutdown"]));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "the listener closes with the daemon");
}

#[test]
fn without_a_key_other_sites_cannot_reach_serve_by_dns_rebinding_or_simple_posts() {
    let mut env = Env::fake();
    let record = env.path("requests.jsonl");
    env.set("FAKE_LLAMA_RECORD", &record.display().to_string());
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!("[models.m]\npath = \"{}\"\n", model.display()));
    let server = Server::start(&env, &[]);
    let address = server.base.trim_start_matches("http://").to_string();
    let body = r#"{"model":"m","prompt":"x"}"#;
    let request = |headers: &str| {
        raw(
            &address,
            format!(
                "POST /completion HTTP/1.1\r\n{headers}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    // A page whose name was rebound to 127.0.0.1 sends its own name as Host.
    let rebound = request("Host: attacker.example:80\r\n");
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    let rebound = raw(&address, b"GET /v1/models HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n");
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    // A form or a `fetch` in no-cors mode from another site: a simple request with an Origin.
    let simple = request(&format!("Host: {address}\r\nOrigin: http://attacker.example\r\n"));
    assert!(simple.starts_with("HTTP/1.1 403"), "{simple}");
    let fetch_metadata = request(&format!("Host: {address}\r\nSec-Fetch-Site: cross-site\r\n"));
    assert!(fetch_metadata.starts_with("HTTP/1.1 403"), "{fetch_metadata}");
    assert!(!record.exists() || std::fs::read_to_string(&record).unwrap().is_empty(), "nothing reached the model");
    // The machine's own names, and local pages, are served.
    for host in [address.clone(), address.replace("127.0.0.1", "localhost")] {
        let answer = request(&format!("Host: {host}\r\n"));
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
    let local_page = request(&format!("Host: {address}\r\nOrigin: http://localhost:5173\r\n"));
    assert!(local_page.starts_with("HTTP/1.1 200"), "{local_page}");
}

#[test]
fn a_panic_while_answering_is_a_500_and_the_daemon_serves_on() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf");
    env.write_config(&format!("[models.m]\npath = \"{}\"\n", model.display()));
    let server = Server::start(&env, &[]);
    let pid = env.daemon_pid().unwrap();
    let (status, text) = post(&server, "/__llmctl_test_panic", serde_json::json!({}));
    assert_eq!(status, 500, "{text}");
    let (status, text) = post(&server, "/completion", serde_json::json!({"model": "m", "prompt": "x"}));
    assert_eq!(status, 200, "{text}");
    assert_eq!(env.daemon_pid(), Some(pid));
    assert!(alive(pid));
}

/// `/health` for the model a probe names (or the default), without loading it: 200 before
/// the first load, 503 "Loading model" while its child starts, 200 when ready, 500 with the
/// reason when its load failed.
#[test]
fn health_tells_loading_ready_and_failed_apart_and_never_loads() {
    let env = Env::fake();
    env.add_model("slow", &["--fake-start-ms", "3000"], "");
    env.add_model("broken", &["--fake-crash-at-start"], "");
    let server = Server::start(&env, &[]);
    let health = |query: &str| {
        let mut response = agent().get(format!("{}/health{query}", server.base)).call().unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    };
    assert_eq!(health("?model=slow").0, 200, "nothing loaded: requests will load it");
    assert!(env.status_json()["instances"].as_array().unwrap().is_empty(), "a probe loads nothing");
    let loading = env.spawn(&["warm", "slow"]);
    wait_until("the child starts", || env.status_json()["instances"][0]["state"] == "starting");
    let (status, body) = health("?model=slow");
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["message"], "Loading model");
    assert_eq!(body["error"]["code"], 503);
    assert_eq!(body["error"]["type"], "unavailable_error");
    assert_success(&loading.wait_with_output().unwrap());
    assert_eq!(health("?model=slow"), (200, r#"{"status":"ok"}"#.to_string()));
    assert_exit(&env.run(&["warm", "broken"]), 70);
    wait_until("the load failed", || {
        env.status_json()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "broken" && i["state"] == "failed")
    });
    let (status, body) = health("?model=broken");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("\"kind\":\"backend\""), "{body}");
    for unknown in ["?model=zzz", "?model=/etc/passwd"] {
        let (status, body) = health(unknown);
        assert_eq!(status, 404, "a model that does not exist is not healthy: {body}");
    }
    assert_eq!(health("").0, 200, "no model named and no default: the daemon answers");
    drop(server);
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// What llama-server serves beyond generation is reachable through `serve`: its model
/// fields, one model by id, its slot routes (saving to a client-named file refused), and its
/// answers to a duplicate key, a preflight and the CORS proxy.
#[test]
fn serve_answers_llama_servers_other_routes_as_it_does() {
    let env = Env::real();
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!("[models.tiny]\npath = \"{}\"\n", model.display()));
    let server = Server::start(&env, &[]);
    let get = |path: &str| {
        let mut response = agent().get(format!("{}{path}", server.base)).call().unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (status, text)
    };
    let (status, text) = get("/v1/models");
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&text).unwrap();
    let entry = &list["data"][0];
    for key in ["id", "aliases", "tags", "object", "architecture", "created", "owned_by", "meta"] {
        assert!(!entry[key].is_null(), "{key} in {entry}");
    }
    assert!(entry["created"].as_u64().unwrap() > 1_600_000_000, "the file's time: {entry}");
    assert_eq!(entry["meta"]["architecture"], "llama", "{entry}");
    let (status, text) = get("/v1/models/tiny");
    assert_eq!(status, 200, "{text}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), *entry);
    assert_eq!(get("/v1/models/nope").0, 404);
    assert!(env.status_json()["instances"].as_array().unwrap().is_empty(), "listing loads nothing");

    // A key given twice takes its last value, as llama-server reads it.
    let (status, text) = post_raw(&server, "/tokenize", br#"{"model":"nope","model":"tiny","content":"hi"}"#);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("tokens"), "{text}");
    let (status, text) = post(
        &server,
        "/chat/completions/input_tokens",
        serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 200, "{text}");
    let (status, text) = get("/slots?model=tiny");
    assert_eq!(status, 200, "{text}");
    assert!(serde_json::from_str::<serde_json::Value>(&text).unwrap().is_array(), "{text}");
    let (status, text) = post(&server, "/slots/0?action=erase&model=tiny", serde_json::json!({}));
    assert_eq!(status, 200, "{text}");
    let (status, text) = post(&server, "/slots/0?action=save", serde_json::json!({"filename": "../../x.bin"}));
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("disabled"), "{text}");
    assert_eq!(post(&server, "/cors-proxy", serde_json::json!({})).0, 403);
    let preflight = agent()
        .options(format!("{}/v1/chat/completions", server.base))
        .header("Origin", "http://localhost:3000")
        .header("Access-Control-Request-Method", "POST")
        .call()
        .unwrap();
    assert_eq!(preflight.status(), 200, "as llama-server answers a preflight");
    drop(server);
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// `GET /props` never loads a model, as llama-server's never wakes a sleeping one: a model
/// not loaded yet gets its header's props with `is_sleeping`, a loaded one its child's own
/// answer, and one unloaded since that answer again, marked sleeping.
#[test]
fn props_of_a_model_not_loaded_loads_nothing_and_says_it_sleeps() {
    let env = Env::real();
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!("[models.tiny]\npath = \"{}\"\nparallel = 2\n", model.display()));
    let server = Server::start(&env, &[]);
    let props = || {
        let mut response = agent().get(format!("{}/props?model=tiny", server.base)).call().unwrap();
        assert_eq!(response.status(), 200);
        serde_json::from_str::<serde_json::Value>(&response.body_mut().read_to_string().unwrap()).unwrap()
    };
    let before = props();
    assert_eq!(before["is_sleeping"], true, "{before}");
    assert_eq!(before["total_slots"], 2, "{before}");
    assert_eq!(before["model_alias"], "tiny", "{before}");
    assert!(env.status_json()["instances"].as_array().unwrap().is_empty(), "a probe loads nothing");
    assert_success(&env.run(&["warm", "tiny"]));
    let awake = props();
    assert_eq!(awake["is_sleeping"], false, "the child's own answer: {awake}");
    assert!(awake["build_info"].is_string(), "{awake}");
    // Asking again does not keep the model awake: its idle time is not reset.
    let used = env.status_json()["instances"][0]["last_used_ms"].clone();
    assert_eq!(props(), awake);
    assert_eq!(env.status_json()["instances"][0]["last_used_ms"], used);
    assert_success(&env.run(&["stop", "tiny"]));
    let stopped = || env.status_json()["instances"].as_array().unwrap().iter().all(|i| i["state"] == "stopped");
    wait_until("the model is unloaded", stopped);
    let asleep = props();
    assert_eq!(asleep["is_sleeping"], true, "{asleep}");
    assert_eq!(asleep["build_info"], awake["build_info"], "the child's last answer: {asleep}");
    assert!(stopped(), "a probe loads nothing: {}", env.status_json());
    drop(server);
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}
