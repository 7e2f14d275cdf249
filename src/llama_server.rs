//! Finding the llama-server binary llmctl would run, and asking it what it is: the search
//! order (flag, environment, config, PATH, the one `llmctl setup` installed), its version
//! and build number, and the backend of an installed one.
//!
//! Asking a binary its version runs it, and a binary may hang (a wrapper script waiting on
//! a lock, a broken build): every `--version` has a deadline, after which the child and
//! anything it started are killed and reaped, so no caller (`--version`, `config`, `setup`,
//! the daemon at start) ever waits longer than [`VERSION_TIMEOUT`]. This module finds and
//! asks; building and installing are `setup`'s.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::paths::{Paths, LLAMA_CPP_BUILD};

/// What a llama-server is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Backend {
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
    pub(crate) fn dir_name(&self) -> String {
        match self {
            Backend::Cpu { portable: false } => "cpu".into(),
            Backend::Cpu { portable: true } => "cpu-portable".into(),
            Backend::CpuWithoutAmx => "cpu-noamx".into(),
            Backend::Cuda { architectures } => format!("cuda-sm{}", architectures.replace(';', "-")),
            Backend::Vulkan => "vulkan".into(),
        }
    }

    pub(crate) fn from_dir_name(name: &str) -> Option<Backend> {
        Some(match name {
            "cpu" => Backend::Cpu { portable: false },
            "cpu-portable" => Backend::Cpu { portable: true },
            "cpu-noamx" => Backend::CpuWithoutAmx,
            "vulkan" => Backend::Vulkan,
            other => Backend::Cuda { architectures: other.strip_prefix("cuda-sm")?.replace('-', ";") },
        })
    }

    pub(crate) fn is_gpu(&self) -> bool {
        !matches!(self, Backend::Cpu { .. } | Backend::CpuWithoutAmx)
    }
}

/// The longest `llama-server --version` may take. A real one answers in about 10 ms (it
/// prints and exits before loading anything); 5 s leaves room for a slow disk or a loaded
/// machine while keeping a hanging binary from blocking anyone for long.
pub(crate) const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// The most output of `--version` that is read: a real answer is a few lines.
const VERSION_OUTPUT_LIMIT: u64 = 64 * 1024;

/// The llama-server to run: a path the user named (flag or environment, then the config),
/// else `llama-server` on PATH, else the one `llmctl setup` installed at `installed`. The
/// error lists where it looked, for the message when it is nowhere.
pub(crate) fn find_binary(
    explicit: Option<&Path>,
    configured: Option<&Path>,
    installed: &Path,
) -> Result<PathBuf, String> {
    let mut searched = Vec::new();
    // A path the user named is the one they mean: say what is wrong with it rather than
    // quietly running another llama-server.
    for candidate in [explicit, configured].into_iter().flatten() {
        if is_executable(candidate) {
            return Ok(candidate.to_path_buf());
        }
        if candidate.is_file() {
            return Err(format!("{} (not executable)", candidate.display()));
        }
        searched.push(format!("{} (missing)", candidate.display()));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("llama-server");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
        searched.push("PATH".to_string());
    }
    if is_executable(installed) {
        return Ok(installed.to_path_buf());
    }
    searched.push(installed.display().to_string());
    Err(searched.join(", "))
}

/// A regular file with an execute bit (following links).
pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The backend of the llama-server `llmctl setup` installed, if it knows it: the current
/// install is a link into its backend's directory.
pub(crate) fn installed_backend(paths: &Paths) -> Option<Backend> {
    let target = fs::read_link(paths.installed_llama_server()).ok()?;
    let dir = target.parent()?.file_name()?.to_str()?;
    Backend::from_dir_name(dir.strip_prefix(&format!("b{LLAMA_CPP_BUILD}-"))?)
}

/// The llama-server llmctl would use, and a line describing it (path, build, backend).
pub(crate) fn describe_llama_server(paths: &Paths, explicit: Option<&Path>, configured: Option<&Path>) -> String {
    let installed = paths.installed_llama_server();
    match find_binary(explicit, configured, &installed) {
        Ok(binary) if binary == installed => {
            let backend = installed_backend(paths).map_or("cpu, portable".into(), |backend| backend.dir_name());
            format!("{} ({}, backend {backend}, installed by llmctl setup)", binary.display(), version_of(&binary))
        }
        Ok(binary) => format!("{} ({})", binary.display(), version_of(&binary)),
        Err(searched) => format!("none found (searched {searched}); `llmctl setup` builds one"),
    }
}

/// What `binary --version` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VersionAnswer {
    /// The line that names the version, e.g. `version: 11434 (abcdef0)`.
    Version(String),
    /// It ran, but said nothing that names a version (or could not be started).
    Unknown,
    /// It was still running at the deadline, and was killed.
    NoAnswer,
}

/// The version line of `binary`, for messages: "version unknown" when it names none, and
/// "did not answer --version within 5 s" when it hangs.
pub(crate) fn version_of(binary: &Path) -> String {
    match ask_version(binary, VERSION_TIMEOUT) {
        VersionAnswer::Version(line) => line,
        VersionAnswer::Unknown => "version unknown".into(),
        VersionAnswer::NoAnswer => {
            format!("did not answer --version within {} s", VERSION_TIMEOUT.as_secs())
        }
    }
}

/// The llama.cpp build number a binary reports, e.g. 11434 for `(build 11434, ...)`.
pub(crate) fn build_of(binary: &Path) -> Option<u32> {
    if !is_executable(binary) {
        return None;
    }
    let VersionAnswer::Version(version) = ask_version(binary, VERSION_TIMEOUT) else {
        return None;
    };
    let rest = &version[version.find("build ")? + "build ".len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Runs `binary --version` for at most `timeout`. The child runs in a process group of its
/// own, so at the deadline the kill reaches whatever it started too (a wrapper script's
/// `sleep`), and it is always reaped.
pub(crate) fn ask_version(binary: &Path, timeout: Duration) -> VersionAnswer {
    let Ok((reader, writer)) = io::pipe() else {
        return VersionAnswer::Unknown;
    };
    let Ok(writer_err) = writer.try_clone() else {
        return VersionAnswer::Unknown;
    };
    let mut command = Command::new(binary);
    command.arg("--version").stdin(Stdio::null()).stdout(writer).stderr(writer_err);
    let Ok(mut child) = crate::process::ChildGroup::spawn(command) else {
        return VersionAnswer::Unknown;
    };
    // `command` is gone with its copies of the write end, so the read ends when the child
    // and everything it started have closed theirs, or have been killed.
    let (text_tx, text_rx) = crossbeam_channel::bounded(1);
    let reading = std::thread::Builder::new().name("llama-version".into()).spawn(move || {
        let mut bytes = Vec::new();
        let _ = reader.take(VERSION_OUTPUT_LIMIT).read_to_end(&mut bytes);
        let _ = text_tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    if reading.is_err() {
        let _ = child.kill();
        return VersionAnswer::Unknown;
    }
    let answer = match text_rx.recv_timeout(timeout) {
        Ok(text) => text
            .lines()
            .find(|line| line.contains("version"))
            .map_or(VersionAnswer::Unknown, |line| VersionAnswer::Version(line.trim().to_string())),
        Err(_) => VersionAnswer::NoAnswer,
    };
    // Reaps the child; at the deadline this is what stops it, and the reading thread ends
    // once the kill has closed the last write end.
    let _ = child.kill();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("llama-server");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn the_version_line_and_the_build_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let binary =
            script(dir.path(), "echo 'version: 11434 (deadbeef)'; echo 'built with cc (build 11434, x86_64)' >&2");
        assert_eq!(ask_version(&binary, VERSION_TIMEOUT), VersionAnswer::Version("version: 11434 (deadbeef)".into()));
        let silent = script(dir.path(), "exit 0");
        assert_eq!(version_of(&silent), "version unknown");
    }

    #[test]
    fn a_binary_that_hangs_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("sleep.pid");
        let binary = script(dir.path(), &format!("sleep 1000 &\necho $! > {}\nwait", pid_file.display()));
        let started = Instant::now();
        assert_eq!(ask_version(&binary, Duration::from_millis(300)), VersionAnswer::NoAnswer);
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        let sleeper: u32 = fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        // The kill is delivered at once but the kernel tears the process down on its own
        // time: poll for it, with a deadline.
        let gone = || {
            let stat = fs::read_to_string(format!("/proc/{sleeper}/stat")).unwrap_or_default();
            stat.is_empty() || stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z')
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone() {
            assert!(Instant::now() < deadline, "the script's sleep (pid {sleeper}) survived");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
