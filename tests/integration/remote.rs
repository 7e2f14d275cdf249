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
    // Both answer when llmctl first checks them; then one goes away. Requests that meet it
    // go on to the other one rather than fail.
    assert_success(&env.run(&["warm", "pair"]));
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

/// A TLS server that answers like a llama-server (health, and a two-chunk completion),
/// written in Python's standard library, with a self-signed certificate made by openssl.
struct TlsServer {
    child: Child,
    url: String,
}

impl TlsServer {
    fn start(dir: &Path) -> TlsServer {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let extensions = dir.join("leaf.ext");
        std::fs::write(&extensions, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "openssl {args:?} failed");
        };
        // A throwaway CA, and a server certificate it signs.
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=llmctl test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ]);
        let script = r#"
import http.server, json, ssl, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def reply(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply(b'{"status":"ok"}', "application/json")
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        chunks = [{"content": "secure ", "stop": False}, {"content": "channel", "stop": False},
                  {"content": "", "stop": True, "stop_type": "eos", "tokens_predicted": 2, "tokens_evaluated": 1}]
        body = "".join("data: " + json.dumps(c) + "\n\n" for c in chunks).encode()
        self.reply(body, "text/event-stream")
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;
        let mut child = Command::new("python3")
            .args(["-c", script])
            .arg(&cert)
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut port = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut port).unwrap();
        TlsServer { child, url: format!("https://127.0.0.1:{}", port.trim()) }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn https_servers_are_verified_against_the_configured_ca() {
    let env = Env::fake();
    let server = TlsServer::start(env.dir.path());
    let cert = env.path("ca.pem");
    env.write_config(&format!(
        "[models.secure]\nurl = \"{url}\"\nca_file = \"{}\"\n[models.untrusted]\nurl = \"{url}\"\n",
        cert.display(),
        url = server.url
    ));
    let output = env.run(&["run", "--raw", "secure", "x"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "secure channel");
    // Without the CA the self-signed certificate is refused: the server counts as down.
    let output = env.run(&["run", "--raw", "untrusted", "x"]);
    assert_exit(&output, 69);
    assert!(stderr(&output).to_lowercase().contains("certificate"), "{}", stderr(&output));
}

#[test]
fn serve_passes_requests_to_a_remote_server_unchanged_with_its_token() {
    let mut env = Env::real();
    env.set("LLMCTL_TEST_REMOTE_KEY", "k3y");
    let model = env.tiny_model("tiny.gguf");
    let remote = External::start(&model, &["--api-key", "k3y"]);
    env.write_config(&format!("[models.far]\nurl = \"{}\"\napi_key_env = \"LLMCTL_TEST_REMOTE_KEY\"\n", remote.url));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut serve =
        env.command(&["serve", "--listen", &format!("127.0.0.1:{port}")]).stderr(Stdio::null()).spawn().unwrap();
    wait_until("serve answers", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let ask = |base: &str, path: &str, body: &serde_json::Value| {
        let mut response =
            agent.post(format!("{base}{path}")).header("Authorization", "Bearer k3y").send(body.to_string()).unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    };
    let body = serde_json::json!({"model": "far", "content": "Pipes carry bytes"});
    let through = ask(&format!("http://127.0.0.1:{port}"), "/tokenize", &body);
    assert_eq!(through, ask(&remote.url, "/tokenize", &body));
    assert_eq!(through.0, 200, "{}", through.1);
    let chat = serde_json::json!({"model": "far", "messages": [{"role": "user", "content": "hi"}]});
    let (status, text) = ask(&format!("http://127.0.0.1:{port}"), "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&tiny_model::expected_text()), "{text}");
    let _ = Command::new("kill").args(["-INT", &serve.id().to_string()]).status();
    let _ = serve.wait();
}
