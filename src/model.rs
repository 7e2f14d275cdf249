//! Turns what the user typed as MODEL into a model file plus load options.
//!
//! MODEL is an alias from the config file, the built-in `demo` alias that `llmctl setup`
//! installs, or a path. Paths are made absolute and canonical so that the same file always
//! maps to the same instance, whatever directory the client ran in.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{parse_ttl, Config, Ttl, DEFAULT_PARALLEL};
use crate::error::{Error, Result};
use crate::paths::Paths;

/// The demo model `llmctl setup` installs, and its alias.
pub(crate) const DEMO_ALIAS: &str = "demo";
pub(crate) const DEMO_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Options that change how llama-server loads a model. Two requests that differ here run
/// on two instances; sampling options never appear here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LoadOptions {
    pub ctx_size: Option<u32>,
    pub parallel: u32,
    #[serde(default)]
    pub gpu_layers: Option<u32>,
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Serves embeddings (llama-server `--embeddings`): an instance of its own, so it never
    /// disturbs a chat instance of the same file.
    #[serde(default)]
    pub embeddings: bool,
    /// Serves reranking (llama-server `--reranking`).
    #[serde(default)]
    pub reranking: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ctx_size: None,
            parallel: DEFAULT_PARALLEL,
            gpu_layers: None,
            extra_args: Vec::new(),
            embeddings: false,
            reranking: false,
        }
    }
}

/// A resolved model: what to load and how.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelSpec {
    /// What the user calls it: the alias, or the file name.
    pub name: String,
    pub path: PathBuf,
    pub load: LoadOptions,
    #[serde(default)]
    pub policy: Policy,
    /// Servers that already run and serve this model; none for a file llmctl runs.
    #[serde(default)]
    pub remote: Option<Remote>,
}

impl ModelSpec {
    /// Reads the file's GGUF header, refusing a file that is not a usable model (remote
    /// models have no file). Milliseconds for a large vocabulary, so done only where no
    /// daemon will (it reads each file's header once).
    pub(crate) fn check_header(&self) -> Result<()> {
        if self.remote.is_none() {
            crate::gguf::inspect(&self.path).map_err(|reason| Error::BadModel { path: self.path.clone(), reason })?;
        }
        Ok(())
    }

    /// A log file name that is readable and unique per model file and load options, the same
    /// whichever alias named them (the instance is the same), and stable across llmctl versions
    /// (FNV-1a over the path and options, not std's hasher), so `llmctl logs` finds what a
    /// daemon wrote.
    pub fn log_file_name(&self) -> String {
        let key = format!("{}\0{:?}", self.path.display(), self.load);
        let hash = key
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
        let file_stem = self.path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
        let stem: String = file_stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
            .collect();
        format!("{stem}-{:08x}.log", hash as u32)
    }
}

/// Servers llmctl fronts but does not run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Remote {
    pub urls: Vec<String>,
    /// The environment variable with the bearer token, read by the daemon.
    pub api_key_env: Option<String>,
    /// CA certificates to trust for https, instead of the built-in roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// How the daemon keeps an instance; changing it never reloads the model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Policy {
    /// Pinned in the config: never evicted, never unloaded by a TTL.
    pub pinned: bool,
    /// The model's own TTL; none means the daemon's default.
    pub ttl: Option<Ttl>,
    /// The most requests that may wait for this model's slots.
    #[serde(default)]
    pub max_queued: Option<u32>,
}

/// Load options given on the command line; each overrides the config.
#[derive(Debug, Clone, Default)]
pub struct LoadOverrides {
    pub ctx_size: Option<u32>,
    pub parallel: Option<u32>,
    pub gpu_layers: Option<u32>,
}

pub(crate) fn resolve(name: &str, config: &Config, paths: &Paths, overrides: &LoadOverrides) -> Result<ModelSpec> {
    let mut policy = Policy::default();
    let (display, path, mut load) = if let Some(model) = config.models.get(name) {
        let load = LoadOptions {
            ctx_size: model.ctx_size,
            parallel: model.parallel.unwrap_or(DEFAULT_PARALLEL),
            gpu_layers: model.gpu_layers,
            extra_args: model.args.clone(),
            embeddings: model.embeddings,
            reranking: model.reranking,
        };
        policy.pinned = model.pinned;
        policy.max_queued = model.max_queued;
        policy.ttl = model.ttl.as_deref().map(parse_ttl).transpose().map_err(|reason| Error::BadConfig {
            path: paths.config.clone(),
            reason: format!("models.{name}.ttl: {reason}"),
        })?;
        let Some(path) = &model.path else {
            let urls: Vec<String> = model.url.iter().chain(&model.urls).cloned().collect();
            return Ok(ModelSpec {
                name: name.to_string(),
                // Remote models are keyed by name; no file is involved.
                path: PathBuf::from(format!("remote:{name}")),
                load,
                policy,
                remote: Some(Remote {
                    urls,
                    api_key_env: model.api_key_env.clone(),
                    ca_file: model.ca_file.as_deref().map(expand_home).map(|ca_file| match paths.config.parent() {
                        Some(dir) if ca_file.is_relative() => dir.join(ca_file),
                        _ => ca_file,
                    }),
                }),
            });
        };
        // A relative path is relative to the config file, as in other tools' configs, not
        // to wherever the client happens to run.
        let path = expand_home(path);
        let path = match paths.config.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path,
        };
        if !path.exists() {
            return Err(Error::ModelNotFound { path });
        }
        (name.to_string(), path, load)
    } else if name == DEMO_ALIAS && !Path::new(name).exists() {
        let path = paths.models_dir().join(DEMO_FILE);
        if !path.exists() {
            return Err(Error::DemoMissing);
        }
        (name.to_string(), path, LoadOptions::default())
    } else if let Some((display, path)) = in_models_dir(name, paths) {
        (display, path, LoadOptions::default())
    } else {
        let path = PathBuf::from(name);
        if !path.exists() {
            let looks_like_path = name.contains('/') || name.ends_with(".gguf");
            return Err(if looks_like_path {
                Error::ModelNotFound { path }
            } else {
                Error::UnknownModel { name: name.to_string() }
            });
        }
        let display = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (display, path, LoadOptions::default())
    };
    if path.is_dir() {
        return Err(Error::BadModel { path, reason: "it is a directory, not a file".into() });
    }
    let path = path.canonicalize().map_err(|e| Error::io(format!("cannot resolve {}", path.display()), e))?;
    if let Some(ctx_size) = overrides.ctx_size {
        load.ctx_size = Some(ctx_size);
    }
    if let Some(parallel) = overrides.parallel {
        load.parallel = parallel;
    }
    if let Some(gpu_layers) = overrides.gpu_layers {
        load.gpu_layers = Some(gpu_layers);
    }
    Ok(ModelSpec { name: display, path, load, policy, remote: None })
}

/// A model of the models directory that `name` means when it is not a path here: a model
/// `llmctl pull` downloaded (`OWNER/REPO[:QUANT]`), or a file there by its bare name.
fn in_models_dir(name: &str, paths: &Paths) -> Option<(String, PathBuf)> {
    if Path::new(name).exists() {
        return None;
    }
    if let Some(pulled) = crate::library::find(paths, name) {
        return Some((pulled.name(), pulled.path()));
    }
    let bare = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    let path = paths.models_dir().join(name);
    // Anything there but a directory: the header check then says what is wrong with a FIFO
    // or a device of that name, instead of "not found".
    let exists = std::fs::metadata(&path).is_ok_and(|metadata| !metadata.is_dir());
    (bare && exists).then(|| (name.to_string(), path))
}

fn expand_home(path: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => crate::paths::home().join(rest),
        Err(_) => path.to_path_buf(),
    }
}
