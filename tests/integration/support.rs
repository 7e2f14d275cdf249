//! Runs the real `llmctl` binary in an isolated environment: its own socket, state, data,
//! config and HOME in a temporary directory, and a `Drop` that shuts down any daemon the
//! test started and kills whatever is left.
//!
//! Every process a test starts names the temporary directory on its command line (the
//! daemon its socket, a llama-server its model), so "nothing survives" is checked by looking
//! for processes that mention it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const LLMCTL: &str = env!("CARGO_BIN_EXE_llmctl");
pub(crate) const FAKE_SERVER: &str = env!("CARGO_BIN_EXE_fake-llama-server");

/// How long any polled condition may take before the test fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

pub(crate) struct Env {
    pub dir: tempfile::TempDir,
    pub llama_server: PathBuf,
    vars: Vec<(String, String)>,
    removed: Vec<String>,
}

impl Env {
    /// An environment whose daemon runs the fake llama-server.
    pub(crate) fn fake() -> Env {
        Env::with_server(Path::new(FAKE_SERVER))
    }

    /// An environment whose daemon runs the real llama-server built by `llmctl setup`.
    pub(crate) fn real() -> Env {
        Env::with_server(&real_llama_server())
    }

    pub(crate) fn with_server(server: &Path) -> Env {
        let dir = tempfile::Builder::new().prefix("llmctl-test-").tempdir().expect("temp dir");
        for sub in ["home", "models", "run"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Env { dir, llama_server: server.to_path_buf(), vars: Vec::new(), removed: Vec::new() }
    }

    pub(crate) fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.path("run/llmctl.sock")
    }

    /// Sets an environment variable for every command (and so for an autostarted daemon).
    pub(crate) fn set(&mut self, name: &str, value: &str) {
        self.vars.push((name.to_string(), value.to_string()));
    }

    /// Leaves an environment variable out of every command, even one this builder sets.
    pub(crate) fn unset(&mut self, name: &str) {
        self.removed.push(name.to_string());
    }

    pub(crate) fn write_config(&self, text: &str) {
        fs::write(self.path("config.toml"), text).unwrap();
    }

    /// Adds `[models.NAME]` to the config: a tiny model file of its own, whose server is
    /// started with `args`, and any more `keys` (whole lines). Returns the alias. Every test
    /// that configures a model of the fake server does it here.
    pub(crate) fn add_model(&self, name: &str, args: &[&str], keys: &str) -> String {
        let path = self.tiny_model(&format!("{name}.gguf"));
        let args: Vec<String> = args.iter().map(|arg| format!("{arg:?}")).collect();
        let config_path = self.path("config.toml");
        let mut config = fs::read_to_string(&config_path).unwrap_or_default();
        config += &format!("[models.{name}]\npath = \"{}\"\nargs = [{}]\n{keys}", path.display(), args.join(", "));
        fs::write(config_path, config).unwrap();
        name.to_string()
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(LLMCTL);
        command.args(args);
        self.configure(&mut command);
        command
    }

    /// The command run as another user (through `setpriv`), with the same environment.
    pub(crate) fn command_as_user(&self, uid: u32, args: &[&str]) -> Command {
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(LLMCTL)
            .args(args);
        self.configure(&mut command);
        command
    }

    fn configure(&self, command: &mut Command) {
        let root = self.dir.path();
        command
            .env_remove("RUST_LOG")
            .env_remove("LLMCTL_NO_AUTOSTART")
            // Tests that want setup on first use remove this.
            .env("LLMCTL_NO_SETUP", "1")
            .env("HOME", root.join("home"))
            .env("XDG_RUNTIME_DIR", root.join("run"))
            .env("XDG_STATE_HOME", root.join("home/state"))
            .env("XDG_CONFIG_HOME", root.join("home/config"))
            .env("XDG_DATA_HOME", root.join("home/data"))
            .env("XDG_CACHE_HOME", root.join("home/cache"))
            .env("LLMCTL_SOCKET", self.socket())
            .env("LLMCTL_STATE_DIR", root.join("state"))
            .env("LLMCTL_CONFIG", root.join("config.toml"))
            .env("LLMCTL_DATA_DIR", root.join("data"))
            .env("LLMCTL_CACHE_DIR", root.join("cache"))
            .env("LLMCTL_LLAMA_SERVER", &self.llama_server)
            .stdin(Stdio::null());
        for (name, value) in &self.vars {
            command.env(name, value);
        }
        for name in &self.removed {
            command.env_remove(name);
        }
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run llmctl")
    }

    pub(crate) fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child =
            self.command(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    pub(crate) fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn llmctl")
    }

    /// A copy of the tiny deterministic model in this environment.
    pub(crate) fn tiny_model(&self, name: &str) -> PathBuf {
        let path = self.path(&format!("models/{name}"));
        crate::tiny_model::write(&path, "llama");
        path
    }

    pub(crate) fn status_json(&self) -> serde_json::Value {
        let output = self.run(&["status", "--json"]);
        assert_success(&output);
        serde_json::from_slice(&output.stdout).expect("status --json is JSON")
    }

    pub(crate) fn daemon_pid(&self) -> Option<u32> {
        fs::read_to_string(self.path("run/llmctl.sock.lock")).ok()?.lines().next()?.trim().parse().ok()
    }

    /// Processes whose command line mentions this environment's directory.
    pub(crate) fn processes(&self) -> Vec<(u32, String)> {
        processes_mentioning(&self.dir.path().to_string_lossy())
    }

    /// Fails unless every process of this environment is gone before the deadline.
    pub(crate) fn assert_nothing_survives(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = self.processes();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "processes survived: {left:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn instance_log(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = fs::read_dir(self.path("state/logs")) {
            for entry in entries.flatten() {
                text += &fs::read_to_string(entry.path()).unwrap_or_default();
            }
        }
        text
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.command(&["shutdown"]).env("LLMCTL_NO_AUTOSTART", "1").output();
        for (pid, _) in self.processes() {
            // SAFETY-free: the kill command only sends a signal to a process of this test.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).output();
        }
    }
}

pub(crate) fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && !is_zombie(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

pub(crate) fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(true)
}

pub(crate) fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

/// The threads of process `pid` now.
pub(crate) fn threads_of(pid: u32) -> usize {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|line| line.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

/// Polls `condition` until it holds; fails the test with `what` at the deadline.
pub(crate) fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
pub(crate) fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(output),
        stderr(output)
    );
}

#[track_caller]
pub(crate) fn assert_exit(output: &Output, code: i32) {
    assert_eq!(output.status.code(), Some(code), "stdout: {}\nstderr: {}", stdout(output), stderr(output));
}

/// The llama-server `llmctl setup` installed (or `LLMCTL_TEST_LLAMA_SERVER`).
pub(crate) fn real_llama_server() -> PathBuf {
    if let Some(path) = std::env::var_os("LLMCTL_TEST_LLAMA_SERVER") {
        return PathBuf::from(path);
    }
    let path = default_data_dir().join("llama.cpp/b11434/llama-server");
    assert!(path.exists(), "{} is missing: run `llmctl setup` (tests/run does) before the tests", path.display());
    path
}

/// The demo model `llmctl setup` installed (or `LLMCTL_TEST_DEMO_MODEL`).
pub(crate) fn demo_model() -> PathBuf {
    if let Some(path) = std::env::var_os("LLMCTL_TEST_DEMO_MODEL") {
        return PathBuf::from(path);
    }
    let path = default_data_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run `llmctl setup` (tests/run does) before the tests", path.display());
    path
}

/// Gemma 3 270M, installed by `tests/fetch-test-models` (or `LLMCTL_TEST_GEMMA`).
pub(crate) fn gemma_model() -> PathBuf {
    if let Some(path) = std::env::var_os("LLMCTL_TEST_GEMMA") {
        return PathBuf::from(path);
    }
    let dir = match std::env::var_os("LLMCTL_TEST_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/llmctl/test-models"),
    };
    let path = dir.join("gemma-3-270m-q4_k_m.gguf");
    assert!(path.exists(), "{} is missing: run tests/fetch-test-models (tests/run does)", path.display());
    path
}

fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LLMCTL_DATA_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(dir) => PathBuf::from(dir).join("llmctl"),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".local/share/llmctl"),
    }
}

/// The TCP ports `pid` listens on, from /proc/net/tcp{,6} and its socket descriptors.
pub(crate) fn tcp_listeners_of(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok())
                .filter_map(|link| {
                    link.to_string_lossy().strip_prefix("socket:[").map(|s| s.trim_end_matches(']').to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut listeners = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(3) == Some(&"0A");
            if listening && inodes.iter().any(|i| Some(&i.as_str()) == fields.get(9)) {
                listeners.push(line.to_string());
            }
        }
    }
    listeners
}

/// A directory standing for PATH: a link to every program on it (the first of each name),
/// but those in `leave_out`.
pub(crate) fn tools_without(env: &Env, leave_out: &[&str]) -> std::path::PathBuf {
    let bin = env.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap()) {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name_text) = name.to_str() else { continue };
            if leave_out.contains(&name_text) || bin.join(&name).exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(entry.path(), bin.join(&name));
        }
    }
    bin
}

/// PATH as [`tools_without`] makes it, without any C++ or C compiler (versioned names such
/// as g++-12 included) and without llama-server: a build of llama-server started there
/// fails at once, before it downloads or creates anything.
pub(crate) fn tools_without_a_compiler(env: &Env) -> std::path::PathBuf {
    let mut leave_out: Vec<String> =
        ["c++", "g++", "clang++", "cc", "gcc", "clang", "llama-server"].iter().map(|c| c.to_string()).collect();
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap()) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains("g++") || name.contains("clang++") || name.ends_with("-c++") {
                leave_out.push(name);
            }
        }
    }
    let leave_out: Vec<&str> = leave_out.iter().map(String::as_str).collect();
    tools_without(env, &leave_out)
}

/// A size under 1 MiB as llmctl prints it: "620 KiB".
pub(crate) fn human_kib(bytes: usize) -> String {
    format!("{} KiB", bytes.div_ceil(1024))
}
