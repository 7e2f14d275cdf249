//! The model catalog: `ls`, `show`, `pull`, `rm`, `ps` and "did you mean", against the fake
//! llama-server and a fake Hugging Face Hub.
//!
//! The fake Hub is a small HTTP/1.1 server on a loopback port, run by a thread of the test.
//! It plays the two endpoints `llmctl pull` uses (`/api/models/OWNER/REPO` and
//! `/OWNER/REPO/resolve/main/FILE`), honours Range requests, answers 401 or 404 on demand,
//! redirects downloads to a "CDN" (another host name, or a second listener on another
//! port), can break a connection in the middle of a file, and can send more bytes than it
//! lists. It does not do chunked bodies or keep-alive: every answer closes its connection.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{json, Value};

use crate::support::*;

#[derive(Default)]
pub(crate) struct HubState {
    /// `OWNER/REPO` → file path in the repository → contents.
    repos: HashMap<String, Vec<(String, Vec<u8>)>>,
    /// Digests the listing claims instead of the real ones.
    wrong_sha256: bool,
    /// Answer every request with this status.
    status: Option<u16>,
    /// Downloads are redirected to `localhost` (another host name, as the Hub's CDN is).
    redirect: bool,
    /// Downloads answer 404 although the listing names the files.
    files_gone: bool,
    /// Downloads are redirected to this base URL instead (`http://127.0.0.1:PORT`).
    pub redirect_to: Option<String>,
    /// Break the next download after this many bytes.
    break_after: Option<usize>,
    /// Send this many zero bytes after each file; with `extra_announced` the Content-Length
    /// counts them, else the answer has none and ends when the connection closes.
    pub extra_bytes: usize,
    pub extra_announced: bool,
    /// Each request: path and Range and Authorization headers.
    requests: Vec<(String, Option<String>, Option<String>)>,
}

pub(crate) struct FakeHub {
    pub url: String,
    pub state: Arc<Mutex<HubState>>,
    address: std::net::SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    pub(crate) fn start() -> FakeHub {
        FakeHub::sharing(Arc::new(Mutex::new(HubState::default())))
    }

    /// A second listener (another port) serving the same repositories and recording into
    /// the same request list.
    pub(crate) fn sharing(state: Arc<Mutex<HubState>>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("fake-hub".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    if !serve(stream, &shared) {
                        return;
                    }
                }
            })
            .unwrap();
        FakeHub { url: format!("http://{address}"), state, address, thread: Some(thread) }
    }

    pub(crate) fn add(&self, repo: &str, files: Vec<(&str, Vec<u8>)>) {
        let files = files.into_iter().map(|(name, bytes)| (name.to_string(), bytes)).collect();
        self.state.lock().unwrap().repos.insert(repo.to_string(), files);
    }

    pub(crate) fn requests(&self) -> Vec<(String, Option<String>, Option<String>)> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        // A request for /quit ends the accept loop; then the thread is joined.
        if let Ok(mut stream) = TcpStream::connect(self.address) {
            let _ = stream.write_all(b"GET /quit HTTP/1.1\r\n\r\n");
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one request; false when told to quit.
fn serve(stream: TcpStream, state: &Mutex<HubState>) -> bool {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return true;
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    if path == "/quit" {
        return false;
    }
    let mut state = state.lock().unwrap();
    state.requests.push((path.clone(), headers.get("range").cloned(), headers.get("authorization").cloned()));
    let mut stream = stream;
    let port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut answer = |status: u16, extra: &str, body: &[u8]| {
        let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n", body.len());
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    };
    if let Some(status) = state.status {
        answer(status, "", b"{\"error\":\"refused\"}");
        return true;
    }
    if let Some(repo) = path.strip_prefix("/api/models/") {
        let repo = repo.split('?').next().unwrap_or(repo);
        let Some(files) = state.repos.get(repo) else {
            answer(404, "", b"{\"error\":\"Repository not found\"}");
            return true;
        };
        let siblings: Vec<Value> = files
            .iter()
            .map(|(name, bytes)| {
                let digest = if state.wrong_sha256 { "0".repeat(64) } else { sha256(bytes) };
                json!({"rfilename": name, "size": bytes.len(), "lfs": {"sha256": digest, "size": bytes.len()}})
            })
            .collect();
        answer(200, "Content-Type: application/json\r\n", json!({ "siblings": siblings }).to_string().as_bytes());
        return true;
    }
    let redirect_base = match &state.redirect_to {
        Some(base) => Some(base.clone()),
        None => state.redirect.then(|| format!("http://localhost:{port}")),
    };
    if let Some(base) = redirect_base.filter(|_| !path.starts_with("/cdn/") && path.contains("/resolve/main/")) {
        let location = format!("Location: {base}/cdn{path}\r\n");
        answer(302, &location, b"");
        return true;
    }
    let path = path.strip_prefix("/cdn").unwrap_or(&path);
    let found = path.split_once("/resolve/main/").and_then(|(repo, file)| {
        state.repos.get(repo.trim_start_matches('/'))?.iter().find(|(name, _)| name == file).map(|(_, b)| b.clone())
    });
    let Some(bytes) = found.filter(|_| !state.files_gone) else {
        answer(404, "", b"not found");
        return true;
    };
    let start: usize =
        headers.get("range").and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()).unwrap_or(0);
    if start >= bytes.len() && start > 0 {
        answer(416, "", b"");
        return true;
    }
    let (status, extra) = if start > 0 {
        (206, format!("Content-Range: bytes {start}-{}/{}\r\n", bytes.len() - 1, bytes.len()))
    } else {
        (200, String::new())
    };
    match state.break_after.take() {
        // Promise the whole rest, send part of it, hang up.
        Some(cut) => {
            let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n{extra}\r\n", bytes.len() - start);
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&bytes[start..start + cut]);
        }
        None if state.extra_bytes > 0 => {
            // The file, then more than it lists: a broken or hostile server.
            let length = match state.extra_announced {
                true => format!("Content-Length: {}\r\n", bytes.len() - start + state.extra_bytes),
                false => String::new(),
            };
            let head = format!("HTTP/1.1 {status} X\r\n{length}Connection: close\r\n{extra}\r\n");
            let extra_bytes = state.extra_bytes;
            drop(state);
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&bytes[start..]);
            let zeros = vec![0u8; 1 << 16];
            let mut sent = 0;
            while sent < extra_bytes {
                let n = zeros.len().min(extra_bytes - sent);
                if stream.write_all(&zeros[..n]).is_err() {
                    break;
                }
                sent += n;
            }
        }
        None => answer(status, &extra, &bytes[start..]),
    }
    true
}

fn sha256(bytes: &[u8]) -> String {
    let mut hasher = llmctl::sha256::Sha256::new();
    hasher.update(bytes);
    hasher.hex()
}

pub(crate) fn tiny_bytes(env: &Env) -> Vec<u8> {
    fs::read(env.tiny_model("source.gguf")).unwrap()
}

pub(crate) fn env_with_hub() -> (Env, FakeHub) {
    let mut env = Env::fake();
    let hub = FakeHub::start();
    env.set("HF_ENDPOINT", &hub.url);
    (env, hub)
}

pub(crate) fn pulled_dir(env: &Env, repo: &str) -> PathBuf {
    env.path("data/models").join(repo)
}

pub(crate) fn ls_json(env: &Env) -> Vec<Value> {
    let output = env.run(&["ls", "--json"]);
    assert_success(&output);
    serde_json::from_slice::<Value>(&output.stdout).unwrap().as_array().unwrap().clone()
}

#[test]
fn pull_downloads_checks_and_the_name_works_as_model() {
    let (mut env, hub) = env_with_hub();
    env.set("HF_TOKEN", "secret-token");
    let model = tiny_bytes(&env);
    hub.add(
        "test/tiny-GGUF",
        vec![
            ("README.md", b"# tiny".to_vec()),
            ("tiny-Q8_0.gguf", model.clone()),
            ("tiny-Q4_K_M.gguf", model.clone()),
            ("mmproj-tiny-f16.gguf", b"not the model".to_vec()),
        ],
    );
    let output = env.run(&["pull", "test/tiny-GGUF"]);
    assert_success(&output);
    let dir = pulled_dir(&env, "test/tiny-GGUF");
    let said = stderr(&output);
    let size = crate::support::human_kib(model.len());
    assert!(said.starts_with(&format!("pulled test/tiny-GGUF (F32, {size}) to /")), "{said}");
    assert!(said.ends_with("/test/tiny-GGUF/tiny-Q4_K_M.gguf\n") && said.lines().count() == 1, "{said}");
    assert_eq!(stdout(&output), "");
    assert_eq!(fs::read(dir.join("tiny-Q4_K_M.gguf")).unwrap(), model, "Q4_K_M is the default");
    assert!(!dir.join("tiny-Q4_K_M.gguf.part").exists());
    assert!(!dir.join("tiny-Q8_0.gguf").exists());
    let requests = hub.requests();
    assert_eq!(requests[0].0, "/api/models/test/tiny-GGUF?blobs=true");
    assert!(requests.iter().all(|(_, _, auth)| auth.as_deref() == Some("Bearer secret-token")), "{requests:?}");

    // A tag picks another file, case aside; both are listed under their names.
    assert_success(&env.run(&["pull", "test/tiny-GGUF:q8_0"]));
    assert!(dir.join("tiny-Q8_0.gguf").exists());
    let names: Vec<Value> = ls_json(&env).iter().map(|m| m["name"].clone()).collect();
    assert_eq!(names, [json!("test/tiny-GGUF"), json!("test/tiny-GGUF:q8_0")]);

    // The name works as MODEL: show, run (through the daemon), ps, ls's loaded column.
    let output = env.run(&["show", "--json", "test/tiny-GGUF"]);
    assert_success(&output);
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["architecture"], "llama");
    assert_eq!(shown["source"], format!("{}/test/tiny-GGUF", hub.url));
    let output = env.run(&["run", "test/tiny-GGUF", "hello", "hub"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "hello hub");
    let output = env.run(&["ps"]);
    assert_success(&output);
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].starts_with("test/tiny-GGUF "), "{lines:?}");
    let listed = ls_json(&env);
    assert_eq!(listed[0]["loaded"], true, "{listed:?}");
    assert_eq!(listed[1]["loaded"], false, "{listed:?}");

    // Pulling again downloads nothing.
    let before = hub.requests().len();
    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
    assert_eq!(hub.requests().len(), before + 1, "only the listing: {:?}", &hub.requests()[before..]);

    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn pull_takes_the_hub_host_in_front_of_the_name_as_ollama_does() {
    let (env, hub) = env_with_hub();
    hub.add("test/tiny-GGUF", vec![("tiny-Q8_0.gguf", tiny_bytes(&env)), ("tiny-Q4_K_M.gguf", tiny_bytes(&env))]);
    for name in ["hf.co/test/tiny-GGUF:Q8_0", "huggingface.co/test/tiny-GGUF"] {
        let output = env.run(&["pull", name]);
        assert_success(&output);
        assert!(stderr(&output).starts_with("pulled test/tiny-GGUF"), "{name}: {}", stderr(&output));
    }
    let names: Vec<Value> = ls_json(&env).iter().map(|m| m["name"].clone()).collect();
    assert_eq!(names, [json!("test/tiny-GGUF"), json!("test/tiny-GGUF:Q8_0")]);
    // The prefixed name works as MODEL too.
    let output = env.run(&["run", "hf.co/test/tiny-GGUF:Q8_0", "via", "the", "host"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "via the host");
    assert_success(&env.run(&["rm", "hf.co/test/tiny-GGUF:Q8_0"]));
    assert_exit(&env.run(&["pull", "example.com/test/tiny-GGUF"]), 2);
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn a_broken_download_resumes_with_a_range_request() {
    let (env, hub) = env_with_hub();
    let model = tiny_bytes(&env);
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", model.clone())]);
    let half = model.len() / 2;
    hub.state.lock().unwrap().break_after = Some(half);

    let output = env.run(&["pull", "test/tiny-GGUF"]);
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("run the same command again to resume"), "{}", stderr(&output));
    let dir = pulled_dir(&env, "test/tiny-GGUF");
    assert!(!dir.join("tiny-Q4_K_M.gguf").exists(), "never a half file under its final name");
    assert_eq!(fs::metadata(dir.join("tiny-Q4_K_M.gguf.part")).unwrap().len(), half as u64);
    assert!(ls_json(&env).is_empty(), "a failed pull is not a model");

    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
    let ranges: Vec<Option<String>> = hub.requests().into_iter().map(|(_, range, _)| range).collect();
    assert!(ranges.contains(&Some(format!("bytes={half}-"))), "{ranges:?}");
    assert_eq!(fs::read(dir.join("tiny-Q4_K_M.gguf")).unwrap(), model);
    assert!(!dir.join("tiny-Q4_K_M.gguf.part").exists());
    env.assert_nothing_survives();
}

#[test]
fn a_checksum_mismatch_leaves_no_file() {
    let (env, hub) = env_with_hub();
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", tiny_bytes(&env))]);
    hub.state.lock().unwrap().wrong_sha256 = true;
    let output = env.run(&["pull", "test/tiny-GGUF"]);
    assert_exit(&output, 65);
    assert!(stderr(&output).contains("SHA-256"), "{}", stderr(&output));
    let dir = pulled_dir(&env, "test/tiny-GGUF");
    assert!(!dir.join("tiny-Q4_K_M.gguf").exists());
    assert!(!dir.join("tiny-Q4_K_M.gguf.part").exists());
}

#[test]
fn split_models_are_pulled_whole() {
    let (env, hub) = env_with_hub();
    let model = tiny_bytes(&env);
    hub.add(
        "test/split-GGUF",
        vec![
            ("Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", b"second part".to_vec()),
            ("Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", model.clone()),
        ],
    );
    assert_success(&env.run(&["pull", "test/split-GGUF:Q4_K_M"]));
    let dir = pulled_dir(&env, "test/split-GGUF");
    assert_eq!(fs::read(dir.join("m-Q4_K_M-00001-of-00002.gguf")).unwrap(), model);
    assert_eq!(fs::read(dir.join("m-Q4_K_M-00002-of-00002.gguf")).unwrap(), b"second part");
    let listed = ls_json(&env);
    assert_eq!(listed[0]["size_bytes"], model.len() + 11, "{listed:?}");
    assert!(listed[0]["path"].as_str().unwrap().ends_with("m-Q4_K_M-00001-of-00002.gguf"));
}

#[test]
fn hub_failures_have_clear_messages_and_exit_codes() {
    let (env, hub) = env_with_hub();
    hub.add("test/docs", vec![("README.md", b"no model here".to_vec())]);
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", tiny_bytes(&env))]);
    hub.add("test/fake-GGUF", vec![("fake-Q4_K_M.gguf", b"not a model at all".to_vec())]);
    let table: [(&[&str], i32, &str); 6] = [
        (&["pull", "test/missing"], 66, "not found"),
        (&["pull", "test/fake-GGUF"], 65, "GGUF magic"),
        (&["pull", "test/docs"], 66, "no GGUF file"),
        (&["pull", "test/tiny-GGUF:Q2_K"], 66, "tiny-Q4_K_M.gguf"),
        (&["pull", "not-a-repo"], 2, "OWNER/REPO"),
        (&["pull", "../etc/passwd"], 2, "OWNER/REPO"),
    ];
    for (args, code, expected) in table {
        let output = env.run(args);
        assert_exit(&output, code);
        assert!(stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
    }
    // The listing names a file the Hub then cannot find: no empty part, no directory left.
    hub.state.lock().unwrap().files_gone = true;
    let output = env.run(&["pull", "test/tiny-GGUF"]);
    assert_exit(&output, 66);
    assert!(stderr(&output).contains("tiny-Q4_K_M.gguf was not found"), "{}", stderr(&output));
    assert!(!pulled_dir(&env, "test/tiny-GGUF").exists());
    hub.state.lock().unwrap().status = Some(401);
    let output = env.run(&["pull", "test/tiny-GGUF"]);
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("HF_TOKEN"), "{}", stderr(&output));
    // Nothing was left behind, and nothing was started.
    assert!(!env.path("data/models/test/missing").exists());
    assert!(
        !pulled_dir(&env, "test/fake-GGUF").join("fake-Q4_K_M.gguf").exists(),
        "a file that is no model is deleted"
    );
    assert!(ls_json(&env).is_empty());
    assert!(!env.socket().exists());
}

#[test]
fn rm_removes_pulled_models_only_and_stops_them_first() {
    let (env, hub) = env_with_hub();
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", tiny_bytes(&env))]);
    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
    assert_success(&env.run(&["warm", "test/tiny-GGUF"]));
    let pid = env.status_json()["instances"][0]["pid"].as_u64().unwrap() as u32;

    let output = env.run(&["rm", "test/tiny-GGUF"]);
    assert_success(&output);
    assert_eq!(stderr(&output), "removed test/tiny-GGUF (1 file)\n", "one line, also off a terminal");
    wait_until("the instance of the removed model is gone", || !alive(pid));
    assert!(!pulled_dir(&env, "test/tiny-GGUF").exists());
    assert!(!env.path("data/models/test").exists());
    assert!(ls_json(&env).is_empty());
    let output = env.run(&["rm", "test/tiny-GGUF"]);
    assert_exit(&output, 66);

    // A file llmctl did not download is never removed.
    let own = env.path("data/models/mine.gguf");
    fs::copy(env.tiny_model("mine.gguf"), &own).unwrap();
    for name in ["mine.gguf", own.to_str().unwrap()] {
        let output = env.run(&["rm", name]);
        assert_exit(&output, 2);
        assert!(stderr(&output).contains("did not download"), "{}", stderr(&output));
    }
    assert!(own.exists());
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn ls_lists_every_kind_of_model_and_caches_headers() {
    let env = Env::fake();
    let aliased = env.tiny_model("aliased.gguf");
    env.write_config(&format!(
        "[models.coder]\npath = \"{}\"\n\n[models.far]\nurl = \"http://127.0.0.1:9\"\n",
        aliased.display()
    ));
    fs::create_dir_all(env.path("data/models")).unwrap();
    let loose = env.path("data/models/loose.gguf");
    fs::copy(&aliased, &loose).unwrap();
    fs::write(env.path("data/models/broken.gguf"), b"GGUF but not really").unwrap();
    fs::write(env.path("data/models/notes.txt"), b"not a model").unwrap();

    let output = env.run(&["ls", "--names"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "coder\nfar\nbroken.gguf\nloose.gguf\n");

    let listed = ls_json(&env);
    let by_name = |name: &str| listed.iter().find(|m| m["name"] == name).unwrap().clone();
    let coder = by_name("coder");
    assert_eq!(coder["source"], "alias");
    assert_eq!(coder["architecture"], "llama");
    assert_eq!(coder["context_length"], 2048);
    assert_eq!(coder["quantization"], "F32");
    assert!(coder["parameters"].as_u64().unwrap() > 10_000);
    assert_eq!(coder["loaded"], false);
    assert_eq!(by_name("far")["source"], "remote");
    assert_eq!(by_name("loose.gguf")["source"], "file");
    assert!(by_name("broken.gguf")["error"].as_str().unwrap().contains("GGUF version"), "{listed:?}");

    let table = env.run(&["ls"]);
    assert_success(&table);
    let text = stdout(&table);
    assert!(text.starts_with("NAME "), "{text}");
    assert!(text.lines().any(|l| l.starts_with("coder ") && l.contains(" llama ") && l.ends_with(" no")), "{text}");
    assert!(text.contains("broken.gguf: "), "{text}");
    assert!(!env.socket().exists(), "ls never starts a daemon");

    // The second ls reads the cache: a planted value shows until the file changes.
    let cache_path = env.path("cache/models.json");
    let mut cache: Value = serde_json::from_slice(&fs::read(&cache_path).unwrap()).unwrap();
    let key = loose.canonicalize().unwrap().display().to_string();
    cache["entries"][&key]["summary"]["architecture"] = json!("from-the-cache");
    fs::write(&cache_path, cache.to_string()).unwrap();
    assert_eq!(ls_json(&env).iter().find(|m| m["name"] == "loose.gguf").unwrap()["architecture"], "from-the-cache");
    let file = fs::File::options().append(true).open(&loose).unwrap();
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(ls_json(&env).iter().find(|m| m["name"] == "loose.gguf").unwrap()["architecture"], "llama");

    // A bare file name of the models directory works as MODEL.
    let output = env.run(&["show", "loose.gguf"]);
    assert_success(&output);
    assert!(stdout(&output).contains("architecture"), "{}", stdout(&output));
}

#[test]
fn show_prints_the_header_and_the_memory_estimate() {
    let env = Env::fake();
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!(
        "[models.tiny]\npath = \"{}\"\nctx_size = 512\n\n[models.far]\nurl = \"http://127.0.0.1:9\"\n",
        model.display()
    ));
    let output = env.run(&["show", "--json", "tiny"]);
    assert_success(&output);
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["architecture"], "llama");
    assert_eq!(shown["layers"], 2);
    assert_eq!(shown["embedding_length"], 64);
    assert_eq!(shown["general_name"], "llmctl-tiny");
    assert_eq!(shown["ctx_size"], 512, "the config's context");
    assert_eq!(shown["has_chat_template"], false);
    assert!(shown.get("chat_template").is_none());
    // 2 (K, V) × 2 layers × 512 tokens × 64 wide × 2 bytes.
    assert_eq!(shown["kv_cache_bytes"], 2 * 2 * 512 * 64 * 2);
    assert!(shown["memory_estimate_bytes"].as_u64().unwrap() > shown["kv_cache_bytes"].as_u64().unwrap());
    let output = env.run(&["show", "--json", "--ctx-size", "1024", "tiny"]);
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["ctx_size"], 1024);

    let output = env.run(&["show", "tiny"]);
    assert_success(&output);
    assert!(stdout(&output).contains("memory"), "{}", stdout(&output));

    let output = env.run(&["show", "--template", "tiny"]);
    assert_exit(&output, 65);
    assert!(stderr(&output).contains("no chat template"), "{}", stderr(&output));
    assert_exit(&env.run(&["show", "far"]), 2);
    assert_exit(&env.run(&["show", env.path("nothing.gguf").to_str().unwrap()]), 66);
    fs::write(env.path("bad.gguf"), b"PK\x03\x04").unwrap();
    assert_exit(&env.run(&["show", env.path("bad.gguf").to_str().unwrap()]), 65);
    assert!(!env.socket().exists(), "show never starts a daemon");
}

#[test]
fn ps_lists_loaded_models_and_starts_no_daemon() {
    let env = Env::fake();
    let output = env.run(&["ps"]);
    assert_success(&output);
    assert_eq!(stdout(&output).lines().count(), 1, "{}", stdout(&output));
    let output = env.run(&["ps", "--json"]);
    assert_success(&output);
    assert_eq!(stdout(&output).trim(), "[]");
    assert!(!env.socket().exists(), "ps never starts a daemon");

    let model = env.tiny_model("tiny.gguf");
    assert_success(&env.run(&["warm", model.to_str().unwrap()]));
    let output = env.run(&["ps", "--json"]);
    let loaded: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(loaded.as_array().unwrap().len(), 1, "{loaded}");
    assert_eq!(loaded[0]["name"], "tiny.gguf");
    assert_success(&env.run(&["stop", "--all"]));
    let output = env.run(&["ps", "--json"]);
    assert_eq!(stdout(&output).trim(), "[]", "a stopped instance is not loaded");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn unknown_models_get_the_closest_names() {
    let env = Env::fake();
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!("[models.coder]\npath = \"{}\"\n", model.display()));
    let output = env.run(&["run", "codr", "hi"]);
    assert_exit(&output, 66);
    assert!(stderr(&output).contains("did you mean `coder`?"), "{}", stderr(&output));
    let output = env.run(&["show", "someone/some-GGUF"]);
    assert_exit(&output, 66);
    assert!(stderr(&output).contains("llmctl pull someone/some-GGUF"), "{}", stderr(&output));
    let output = env.run(&["run", "zzzzzzzz", "hi"]);
    assert_exit(&output, 66);
    assert!(!stderr(&output).contains("did you mean"), "{}", stderr(&output));
    assert!(!env.socket().exists());
}

#[test]
fn bash_completes_model_names_through_ls() {
    let env = Env::fake();
    let model = env.tiny_model("tiny.gguf");
    env.write_config(&format!("[models.coder]\npath = \"{}\"\n", model.display()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/completions/llmctl.bash");
    let bin_dir = std::path::Path::new(LLMCTL).parent().unwrap();
    let complete = |words: &str, cword: usize| {
        let program = format!(
            "source {script}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
             _llmctl_with_models; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let output = std::process::Command::new("bash")
            .arg("-c")
            .arg(program)
            .current_dir(env.path("home"))
            .env("PATH", format!("{}:/usr/bin:/bin", bin_dir.display()))
            .env("LLMCTL_CONFIG", env.path("config.toml"))
            .env("LLMCTL_DATA_DIR", env.path("data"))
            .env("LLMCTL_SOCKET", env.socket())
            .output()
            .unwrap();
        assert_success(&output);
        stdout(&output)
    };
    assert_eq!(complete("llmctl run co", 2), "coder\n");
    assert_eq!(complete("llmctl show co", 2), "coder\n");
    assert!(!complete("llmctl pull co", 2).contains("coder"), "pull takes Hub names");
    assert!(!complete("llmctl run coder co", 3).contains("coder"), "only the first argument is MODEL");
    // After options, and their values, MODEL is still offered.
    assert_eq!(complete("llmctl run -n 64 co", 4), "coder\n");
    assert_eq!(complete("llmctl run --temperature 0.5 --raw --stop END co", 7), "coder\n");
    assert_eq!(complete("llmctl --socket /tmp/x.sock warm --ttl 8h co", 6), "coder\n");
    assert_eq!(complete("llmctl chat --system 'be brief' -n 8 co", 6), "coder\n");
    assert_eq!(complete("llmctl run --max-tokens = 64 co", 5), "coder\n");
    // The value of an option is not MODEL, nor is what follows MODEL.
    assert!(!complete("llmctl run -n co", 3).contains("coder"), "a value of -n");
    assert!(!complete("llmctl run -n 64 coder co", 5).contains("coder"), "MODEL given");
}

#[test]
fn a_pulled_model_runs_on_the_real_llama_server_and_rm_unloads_it() {
    let mut env = Env::real();
    let hub = FakeHub::start();
    env.set("HF_ENDPOINT", &hub.url);
    hub.add("test/tiny-GGUF", vec![("tiny-F32.gguf", tiny_bytes(&env))]);
    assert_success(&env.run(&["pull", "test/tiny-GGUF:f32"]));
    let output = env.run(&["run", "--raw", "test/tiny-GGUF:F32", "Where do bytes go?"]);
    assert_success(&output);
    assert_eq!(stdout(&output), crate::tiny_model::expected_text());
    let loaded = ls_json(&env);
    assert_eq!(loaded[0]["loaded"], true, "{loaded:?}");
    let pid = env.status_json()["instances"][0]["pid"].as_u64().unwrap() as u32;

    assert_success(&env.run(&["rm", "test/tiny-GGUF:f32"]));
    wait_until("the real llama-server of the removed model exits", || !alive(pid));
    assert!(!pulled_dir(&env, "test/tiny-GGUF").exists());
    let output = env.run(&["ps", "--json"]);
    assert_eq!(stdout(&output).trim(), "[]");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn downloads_follow_the_cdn_redirect_without_the_token_and_resume_there() {
    let (mut env, hub) = env_with_hub();
    env.set("HF_TOKEN", "secret-token");
    let model = tiny_bytes(&env);
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", model.clone())]);
    let half = model.len() / 2;
    {
        let mut state = hub.state.lock().unwrap();
        state.redirect = true;
        state.break_after = Some(half);
    }
    assert_exit(&env.run(&["pull", "test/tiny-GGUF"]), 69);
    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
    assert_eq!(fs::read(pulled_dir(&env, "test/tiny-GGUF").join("tiny-Q4_K_M.gguf")).unwrap(), model);
    let cdn: Vec<_> = hub.requests().into_iter().filter(|(path, _, _)| path.starts_with("/cdn/")).collect();
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert!(cdn.iter().all(|(_, _, auth)| auth.is_none()), "the token stays with the Hub: {cdn:?}");
    assert_eq!(cdn[1].1, Some(format!("bytes={half}-")), "the Range survives the redirect");
}

#[test]
fn two_pulls_never_write_one_file() {
    let (env, hub) = env_with_hub();
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", tiny_bytes(&env))]);
    let dir = pulled_dir(&env, "test/tiny-GGUF");
    fs::create_dir_all(&dir).unwrap();
    // Another pull holds the part file.
    let part = fs::File::create(dir.join("tiny-Q4_K_M.gguf.part")).unwrap();
    // SAFETY: flock on a descriptor `part` owns for the whole call.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&part), libc::LOCK_EX) }, 0);
    let output = env.run(&["pull", "test/tiny-GGUF"]);
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("another llmctl pull"), "{}", stderr(&output));
    drop(part);
    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
}

#[test]
fn pull_shows_progress_on_a_terminal_only() {
    let (env, hub) = env_with_hub();
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", tiny_bytes(&env))]);
    let (code, transcript) = crate::chat::on_pty(
        &env,
        &["pull", "test/tiny-GGUF"],
        &[("expect", "tiny-Q4_K_M.gguf: "), ("expect", "MiB/s"), ("expect", "pulled test/tiny-GGUF")],
    );
    assert_eq!(code, 0, "{transcript}");
    assert!(transcript.contains("(100%)"), "{transcript}");
}

#[test]
fn ls_and_status_agree_that_a_model_deleted_while_loaded_is_loaded() {
    let env = Env::fake();
    let model = env.tiny_model("gone.gguf");
    env.write_config(&format!("[models.gone]\npath = \"{}\"\n", model.display()));
    assert_success(&env.run(&["warm", "gone"]));
    std::fs::remove_file(&model).unwrap();
    let listed = ls_json(&env);
    let row = listed.iter().find(|row| row["name"] == "gone").expect("the config's model is listed");
    assert_eq!(row["loaded"], true, "{row}");
    assert_eq!(env.status_json()["instances"][0]["state"], "ready");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}
