//! The optional TOML config file: aliases, per-model load options, daemon settings.
//!
//! Unknown keys and wrong types are errors that name the line, so a typo never silently
//! changes behaviour. This module parses and resolves; it does not watch the file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Parallel slots of a llama-server child unless configured.
pub const DEFAULT_PARALLEL: u32 = 1;
/// Admission queue depth unless configured.
pub const DEFAULT_QUEUE_DEPTH: usize = 64;

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
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub ctx_size: Option<u32>,
    pub parallel: Option<u32>,
    #[serde(default)]
    pub args: Vec<String>,
}

impl Config {
    /// Reads the config at `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => {
                return Err(Error::BadConfig {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        };
        Config::parse(&text).map_err(|reason| Error::BadConfig {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
        if config.queue_depth == Some(0) {
            return Err("queue_depth must be at least 1".into());
        }
        for (name, model) in &config.models {
            if model.parallel == Some(0) {
                return Err(format!("models.{name}.parallel must be at least 1"));
            }
        }
        Ok(config)
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
        assert_eq!(coder.path, PathBuf::from("/m/coder.gguf"));
        assert_eq!(coder.ctx_size, Some(4096));
        assert_eq!(coder.args, ["--flash-attn", "on"]);
    }

    #[test]
    fn errors_name_the_line() {
        let table = [
            ("queue_depth = 8\nqueue_dept = 9\n", "line 2"),
            ("[models.a]\npath = \"/x\"\nctx_size = \"big\"\n", "line 3"),
            ("[models.a]\nctx_size = 5\n", "path"),
            ("queue_depth = 0\n", "at least 1"),
        ];
        for (text, expected) in table {
            let error = Config::parse(text).unwrap_err();
            assert!(
                error.contains(expected),
                "{error:?} should mention {expected}"
            );
        }
    }
}
