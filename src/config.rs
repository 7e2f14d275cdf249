//! The optional TOML config file: aliases, per-model load options, daemon settings.
//!
//! Unknown keys and wrong types are errors that name the line, so a typo never silently
//! changes behaviour. This module parses and resolves; it does not watch the file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Parallel slots of a llama-server child unless configured.
pub const DEFAULT_PARALLEL: u32 = 1;
/// Admission queue depth unless configured.
pub const DEFAULT_QUEUE_DEPTH: usize = 64;
/// The most slots llama-server takes (its `--parallel`; more aborts it at start).
pub const MAX_PARALLEL: u32 = 256;
/// The largest context asked for: 16 Mi tokens, far beyond any GGUF model's training context.
pub const MAX_CTX_SIZE: u32 = 1 << 24;
/// More layers than any model has; llama-server offloads all of them at any larger value.
pub const MAX_GPU_LAYERS: u32 = 1000;
/// The deepest queue the daemon keeps.
pub const MAX_QUEUE_DEPTH: usize = 1 << 20;
/// Ten years: the longest timeout or TTL, so seconds never overflow a clock.
pub const MAX_SECONDS: u64 = 10 * 365 * 86400;

/// Refuses a number outside `min..=max`, naming the key and the range.
fn check_range(key: &str, value: Option<u64>, min: u64, max: u64) -> Result<(), String> {
    match value {
        Some(value) if value < min || value > max => Err(format!("{key} = {value} is outside {min}..={max}")),
        _ => Ok(()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path of the llama-server binary.
    pub llama_server: Option<PathBuf>,
    /// How many requests may wait for a slot before new ones are refused as busy.
    pub queue_depth: Option<usize>,
    /// Seconds a child may take to load before the load fails.
    pub load_timeout: Option<u64>,
    /// Seconds without a token before a generation is declared stalled.
    pub token_timeout: Option<u64>,
    /// Failures within `crash_window` seconds after which an instance is not restarted.
    pub crash_limit: Option<usize>,
    pub crash_window: Option<u64>,
    /// Memory all instances may use together: bytes, "12GiB" or "75%" of MemTotal.
    pub memory_budget: Option<String>,
    /// GPU memory all instances may use together, where nvidia-smi exists; "90%" of the GPU.
    pub vram_budget: Option<String>,
    /// The most instances loaded at once.
    pub max_instances: Option<usize>,
    /// Unload an instance after this long without a request, unless its model says
    /// otherwise: "30m", "2h", "never" (the default).
    pub default_ttl: Option<String>,
    /// The model `serve` answers with when a request names none, or one llmctl does not
    /// know (clients often send a fixed name such as "gpt-4o-mini").
    pub default_model: Option<String>,
    /// Web origins `serve` allows for CORS, as `scheme://host[:port]`, or "*" for any;
    /// unset allows pages served from this machine (localhost, 127.0.0.1, [::1]) only.
    pub cors_origins: Option<Vec<String>>,
    /// Addresses (`HOST:PORT`) the daemon serves llama-server's HTTP API on from its start,
    /// as `llmctl serve --listen` does while it runs (for a daemon under systemd).
    #[serde(default)]
    pub listen: Vec<String>,
    /// The file holding the API key for the `listen` addresses (required beyond loopback).
    pub api_key_file: Option<PathBuf>,
    /// `Host` values `serve` answers besides this machine's loopback names, for a listener
    /// without a key reached by another name (a reverse proxy's); "*" for any.
    pub allowed_hosts: Option<Vec<String>>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A GGUF file llmctl runs; or else `url`/`urls` of servers that already run.
    pub path: Option<PathBuf>,
    /// An existing llama-server or OpenAI-compatible server: llmctl fronts it and never
    /// spawns or kills it.
    pub url: Option<String>,
    /// Several replicas of one model; each request goes to the least busy healthy one.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The environment variable holding a bearer token for the remote servers (never the
    /// token itself: the config file is not a place for secrets).
    pub api_key_env: Option<String>,
    /// A PEM file of CA certificates to trust for `https://` servers instead of the
    /// built-in Mozilla roots (for a private CA or a self-signed server).
    pub ca_file: Option<PathBuf>,
    pub ctx_size: Option<u32>,
    pub parallel: Option<u32>,
    /// Layers to offload to the GPU (llama-server --n-gpu-layers).
    pub gpu_layers: Option<u32>,
    #[serde(default)]
    pub args: Vec<String>,
    /// Never evicted for memory and never unloaded by its TTL.
    #[serde(default)]
    pub pinned: bool,
    /// Unload after this long without a request: "30m", "2h", "never".
    pub ttl: Option<String>,
    /// The most requests that may wait for this model's slots; more get busy (HTTP 429).
    pub max_queued: Option<u32>,
    /// An embedding model: started with llama-server's `--embeddings`, and the model
    /// `serve` answers `/v1/embeddings` with when a request names none.
    #[serde(default)]
    pub embeddings: bool,
    /// A reranking model: started with `--reranking`; answers `/v1/rerank`.
    #[serde(default)]
    pub reranking: bool,
}

impl Config {
    /// Reads the config at `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(Error::BadConfig { path: path.to_path_buf(), reason: e.to_string() }),
        };
        Config::parse(&text).map_err(|reason| Error::BadConfig { path: path.to_path_buf(), reason })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
        // Every number is checked where it enters, against what llama-server and the daemon
        // can really use: a zero timeout would make every load hang, an overflow would wrap.
        let limits: [(&str, Option<u64>, u64, u64); 6] = [
            ("queue_depth", config.queue_depth.map(|v| v as u64), 1, MAX_QUEUE_DEPTH as u64),
            ("load_timeout", config.load_timeout, 1, MAX_SECONDS),
            ("token_timeout", config.token_timeout, 1, MAX_SECONDS),
            ("crash_limit", config.crash_limit.map(|v| v as u64), 1, 1000),
            ("crash_window", config.crash_window, 1, MAX_SECONDS),
            ("max_instances", config.max_instances.map(|v| v as u64), 1, 1024),
        ];
        for (key, value, min, max) in limits {
            check_range(key, value, min, max)?;
        }
        for (name, model) in &config.models {
            check_range(&format!("models.{name}.parallel"), model.parallel.map(u64::from), 1, MAX_PARALLEL.into())?;
            check_range(&format!("models.{name}.ctx_size"), model.ctx_size.map(u64::from), 16, MAX_CTX_SIZE.into())?;
            check_range(
                &format!("models.{name}.gpu_layers"),
                model.gpu_layers.map(u64::from),
                0,
                MAX_GPU_LAYERS.into(),
            )?;
            check_range(
                &format!("models.{name}.max_queued"),
                model.max_queued.map(u64::from),
                1,
                MAX_QUEUE_DEPTH as u64,
            )?;
            let remote = model.url.is_some() || !model.urls.is_empty();
            if remote == model.path.is_some() {
                return Err(format!("models.{name} needs exactly one of `path` and `url`/`urls`"));
            }
            for url in model.url.iter().chain(&model.urls) {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!("models.{name}: `{url}` is not an http:// or https:// URL"));
                }
            }
            if let Some(ttl) = &model.ttl {
                parse_ttl(ttl).map_err(|e| format!("models.{name}.ttl: {e}"))?;
            }
        }
        if let Some(ttl) = &config.default_ttl {
            parse_ttl(ttl).map_err(|e| format!("default_ttl: {e}"))?;
        }
        for origin in config.cors_origins.iter().flatten() {
            let well_formed = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.trim_start_matches("https://").trim_start_matches("http://").contains('/'));
            if !well_formed {
                return Err(format!("cors_origins: `{origin}` is not \"*\" nor an origin like http://host:8080"));
            }
        }
        for (key, value) in [("memory_budget", &config.memory_budget), ("vram_budget", &config.vram_budget)] {
            if let Some(value) = value {
                crate::budget::parse_size(value, 100).map_err(|e| format!("{key}: {e}"))?;
            }
        }
        Ok(config)
    }
}

/// How long an idle instance stays loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ttl {
    Never,
    Seconds(u64),
}

/// "90s", "30m", "2h", "1d", "45" (seconds) or "never".
pub fn parse_ttl(text: &str) -> Result<Ttl, String> {
    let text = text.trim();
    if text == "never" {
        return Ok(Ttl::Never);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration (use 90s, 30m, 2h or never)"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{text}` is not a duration (use 90s, 30m, 2h or never)")),
    };
    match number.checked_mul(seconds) {
        Some(total) if total <= MAX_SECONDS => Ok(Ttl::Seconds(total)),
        _ => Err(format!("`{text}` is longer than ten years; use `never` to keep it loaded")),
    }
}

/// toml's own message spans several lines with a caret; keep it, but lead with the line.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end().to_string();
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_models_and_settings() {
        let config = Config::parse(
            "queue_depth = 8\n[models.coder]\npath = \"/m/coder.gguf\"\nctx_size = 4096\nargs = [\"--flash-attn\", \"on\"]\n",
        )
        .unwrap();
        assert_eq!(config.queue_depth, Some(8));
        let coder = &config.models["coder"];
        assert_eq!(coder.path, Some(PathBuf::from("/m/coder.gguf")));
        assert_eq!(coder.ctx_size, Some(4096));
        assert_eq!(coder.args, ["--flash-attn", "on"]);
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("never"), Ok(Ttl::Never));
        assert_eq!(parse_ttl("90s"), Ok(Ttl::Seconds(90)));
        assert_eq!(parse_ttl("30m"), Ok(Ttl::Seconds(1800)));
        assert_eq!(parse_ttl("2h"), Ok(Ttl::Seconds(7200)));
        assert!(parse_ttl("soon").is_err());
        assert!(Config::parse("default_ttl = \"soon\"\n").unwrap_err().contains("default_ttl"));
        assert!(Config::parse("memory_budget = \"lots\"\n").unwrap_err().contains("memory_budget"));
    }

    #[test]
    fn errors_name_the_line() {
        let table = [
            ("queue_depth = 8\nqueue_dept = 9\n", "line 2"),
            ("[models.a]\npath = \"/x\"\nctx_size = \"big\"\n", "line 3"),
            ("[models.a]\nctx_size = 512\n", "path"),
            ("queue_depth = 0\n", "queue_depth = 0 is outside 1..="),
            ("token_timeout = 0\n", "token_timeout = 0 is outside"),
            ("load_timeout = 0\n", "load_timeout = 0 is outside"),
            ("crash_limit = 0\n", "crash_limit = 0 is outside"),
            ("max_instances = 0\n", "max_instances = 0 is outside"),
            ("[models.a]\npath = \"/x\"\nparallel = 100000\n", "models.a.parallel = 100000 is outside 1..=256"),
            ("[models.a]\npath = \"/x\"\ngpu_layers = 4294967295\n", "models.a.gpu_layers"),
            ("default_ttl = \"18446744073709551615s\"\n", "longer than ten years"),
            ("default_ttl = \"999999999999d\"\n", "longer than ten years"),
            ("[models.a]\npath = \"/x\"\nmax_queued = 0\n", "models.a.max_queued = 0 is outside 1..="),
        ];
        for (text, expected) in table {
            let error = Config::parse(text).unwrap_err();
            assert!(error.contains(expected), "{error:?} should mention {expected}");
        }
    }
}
