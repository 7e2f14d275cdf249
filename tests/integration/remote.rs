//! Remote mode: llmctl fronting llama-servers it did not start (real ones, started by the
//! test), with replicas, a bearer token, and a server that goes down.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::support::*;
use crate::tiny_model;

/// A real llama-server started by the test, killed when dropped.
struct External {
    child: Child,
    url: String,
}

impl External {
    fn start(model: &Path, extra: &[&str]) -> External {
        let mut child = Command::new(real_llama_server())
            .args(["--model", model.to_str().unwrap(), "--host", "127.0.0.1", "--port", "0", "--no-webui"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("llama-server printed its address").unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.trim().to_string();
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        External { child, url }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for External {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn llmctl_fronts_a_server_it_did_not_start_and_never_kills_it() {
    let env = Env::real();
    let model = env.tiny_model("tiny.gguf");
    let mut server = External::start(&model, &[]);
    env.write_config(&format!("[models.far]\nurl = \"{}\"\n", server.url));
    let output = env.run(&["run", "--raw", "far", "x"]);
    assert_success(&output);
    assert_eq!(stdout(&output), tiny_model::expected_text());
    let status = env.status_json();
    assert_eq!(status["instances"][0]["remote"][0], server.url);
    assert!(status["instances"][0]["pid"].is_null());
    assert_eq!(status["instances"][0]["estimate_bytes"], 0);

    assert_success(&env.run(&["stop", "far"]));
    assert_success(&env.run(&["shutdown"]));
    assert!(alive(server.pid()), "llmctl must never stop a server it did not start");

    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let output = env.run(&["run", "--raw", "far", "x"]);
    assert_exit(&output, 69);
    assert!(stderr(&output).contains(&server.url), "{}", stderr(&output));
}

#[test]
fn replicas_route_around_a_server_that_is_down_and_tokens_pass_through() {
    let mut env = Env::real();
    env.set("LLMCTL_TEST_REMOTE_KEY", "k3y");
    let model = env.tiny_model("tiny.gguf");
    let down = External::start(&model, &["--api-key", "k3y"]);
    let up = External::start(&model, &["--api-key", "k3y"]);
    env.write_config(&format!(
        "[models.pair]\nurls = [\"{}\", \"{}\"]\napi_key_env = \"LLMCTL_TEST_REMOTE_KEY\"\nparallel = 1\n",
        down.url, up.url
    ));
    let down_url = down.url.clone();
    drop(down);
    for _ in 0..3 {
        let output = env.run(&["run", "--raw", "pair", "x"]);
        assert_success(&output);
        assert_eq!(stdout(&output), tiny_model::expected_text());
    }
    let status = env.status_json();
    let urls: Vec<&str> =
        status["instances"][0]["remote"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert_eq!(urls, [down_url.as_str(), up.url.as_str()]);
}
