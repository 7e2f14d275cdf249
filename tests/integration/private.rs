//! Children are reachable only through llmctl: a Unix socket in a directory only this user
//! can enter (no TCP port), or, on TCP, a key only the daemon holds. Checked with the real
//! llama-server, as another user (uid 65534 through `setpriv`) and as a web page would.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use crate::support::*;

/// `curl` as uid 65534 with `args`; its output and whether it succeeded.
fn curl_as_nobody(args: &[&str]) -> (bool, String) {
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-s", "-m", "5"])
        .args(args)
        .output()
        .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A preflight as a page on another site would send it.
fn preflight(connect: &[&str], url: &str) -> String {
    let output = Command::new("curl")
        .args(["-s", "-i", "-m", "5", "-X", "OPTIONS", "-H", "Origin: http://evil.example"])
        .args(["-H", "Access-Control-Request-Method: POST"])
        .args(connect)
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_no_cors_for_strangers(answer: &str) {
    let allowed: Vec<&str> =
        answer.lines().filter(|line| line.to_ascii_lowercase().starts_with("access-control-allow-origin")).collect();
    assert!(
        allowed.iter().all(|line| !line.contains("evil.example") && !line.trim_end().ends_with('*')),
        "a foreign page may use the child: {answer}"
    );
}

/// Lets other users into the test's own directories, so only llmctl's protection is left.
fn open_test_dirs(env: &Env) {
    for path in [env.dir.path().to_path_buf(), env.path("run"), env.path("models")] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn a_child_listens_only_on_a_socket_no_one_else_can_reach() {
    let env = Env::real();
    let model = env.path("models/m.gguf");
    crate::tiny_model::write(&model, "llama");
    let model = model.display().to_string();
    assert_success(&env.run(&["warm", &model]));
    let instance = env.status_json()["instances"][0].clone();
    let pid = instance["pid"].as_u64().unwrap() as u32;
    let socket = instance["socket"].as_str().expect("the child has a socket").to_string();
    assert!(instance["port"].is_null(), "{instance}");
    assert!(tcp_listeners_of(pid).is_empty(), "the child listens on TCP: {:?}", tcp_listeners_of(pid));
    let children_dir = std::path::Path::new(&socket).parent().unwrap();
    let metadata = std::fs::metadata(children_dir).unwrap();
    assert_eq!((metadata.permissions().mode() & 0o777, metadata.uid()), (0o700, sys_uid()));

    open_test_dirs(&env);
    let (reached, body) = curl_as_nobody(&["--unix-socket", &socket, "http://localhost/health"]);
    assert!(!reached, "another user reached the child: {body}");
    // Its owner can (the daemon does), and a web page's preflight is not allowed in.
    let answer = preflight(&["--unix-socket", &socket], "http://localhost/completion");
    assert!(answer.starts_with("HTTP/1.1"), "{answer}");
    assert_no_cors_for_strangers(&answer);

    let output = env.run(&["run", "--raw", &model, "Hello"]);
    assert_success(&output);
    assert_eq!(stdout(&output), crate::tiny_model::expected_text());
    assert_success(&env.run(&["stop", &model]));
    assert!(!std::path::Path::new(&socket).exists(), "the socket is removed with its child");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

#[test]
fn on_tcp_a_child_wants_a_key_that_is_in_no_command_line() {
    let mut env = Env::real();
    env.set("LLMCTL_CHILDREN_ON_TCP", "1");
    let model = env.path("models/m.gguf");
    crate::tiny_model::write(&model, "llama");
    let model = model.display().to_string();
    assert_success(&env.run(&["warm", &model]));
    let instance = env.status_json()["instances"][0].clone();
    let pid = instance["pid"].as_u64().unwrap() as u32;
    let port = instance["port"].as_u64().expect("a TCP child has a port");
    let url = format!("http://127.0.0.1:{port}/completion");
    let (_, body) = curl_as_nobody(&["-d", r#"{"prompt":"Hello","n_predict":1}"#, &url]);
    assert!(body.contains("Invalid API Key") || body.contains("401"), "{body}");
    assert_no_cors_for_strangers(&preflight(&[], &url));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(!cmdline.contains("api-key") && !cmdline.contains("API_KEY"), "{cmdline}");
    let hex_words = cmdline.split(' ').filter(|w| w.len() >= 32 && w.chars().all(|c| c.is_ascii_hexdigit())).count();
    assert_eq!(hex_words, 0, "a secret in the command line: {cmdline}");
    let environ = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat", &format!("/proc/{pid}/environ")])
        .output()
        .unwrap();
    assert!(!environ.status.success(), "another user read the child's environment");
    // llmctl itself holds the key.
    let output = env.run(&["run", "--raw", &model, "Hello"]);
    assert_success(&output);
    assert_eq!(stdout(&output), crate::tiny_model::expected_text());
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

fn sys_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}
