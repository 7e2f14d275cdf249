//! Every model llmctl can run, for `ls`, completion and "did you mean": the aliases of the
//! config file, the demo, the models `llmctl pull` downloaded and the `*.gguf` files in the
//! models directory.
//!
//! What `ls` shows of a file comes from its GGUF header, cached by path, size and mtime in
//! `CACHE_DIR/models.json` so that a second `ls` reads no header. This module only reads
//! files and writes that cache; asking the daemon what is loaded is `commands/ls`'s job.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::gguf;
use crate::library;
use crate::model::{DEMO_ALIAS, DEMO_FILE};
use crate::paths::{write_atomically, Paths};

const CACHE_FILE: &str = "models.json";
const CACHE_VERSION: u32 = 1;

/// Where a model comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `[models.NAME]` with a path in the config file.
    Alias,
    /// `[models.NAME]` with the URL of a server llmctl fronts.
    Remote,
    /// The demo model of `llmctl setup`.
    Demo,
    /// Downloaded by `llmctl pull`.
    Pulled,
    /// A `.gguf` file in the models directory.
    File,
}

/// A known model, before its header is read.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub name: String,
    pub source: Source,
    /// None for a remote model.
    pub path: Option<PathBuf>,
    /// The bytes on disk, all parts of a split model together.
    pub size: Option<u64>,
}

/// Every known model, in the order `ls` shows them: aliases, the demo, pulled models, then
/// loose files. A file already listed under another name is not listed again.
pub fn known(config: &Config, paths: &Paths) -> Vec<Known> {
    let mut known = Vec::new();
    let config_dir = paths.config.parent().map(Path::to_path_buf).unwrap_or_default();
    for (alias, model) in &config.models {
        match &model.path {
            Some(path) => {
                let path = expand(path, &config_dir);
                known.push(Known {
                    name: alias.clone(),
                    source: Source::Alias,
                    size: file_size(&path),
                    path: Some(path),
                });
            }
            None => known.push(Known { name: alias.clone(), source: Source::Remote, path: None, size: None }),
        }
    }
    let demo = paths.models_dir().join(DEMO_FILE);
    if !config.models.contains_key(DEMO_ALIAS) && demo.is_file() {
        known.push(Known { name: DEMO_ALIAS.into(), source: Source::Demo, size: file_size(&demo), path: Some(demo) });
    }
    for pulled in library::list(paths) {
        known.push(Known {
            name: pulled.name(),
            source: Source::Pulled,
            size: Some(pulled.size()),
            path: Some(pulled.path()),
        });
    }
    for path in library::loose_files(paths) {
        let canonical = path.canonicalize().ok();
        let listed = known.iter().any(|k| k.path.as_ref().and_then(|p| p.canonicalize().ok()) == canonical);
        if listed {
            continue;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        known.push(Known { name, source: Source::File, size: file_size(&path), path: Some(path) });
    }
    known
}

fn expand(path: &Path, config_dir: &Path) -> PathBuf {
    let path = match path.strip_prefix("~") {
        Ok(rest) => crate::paths::home().join(rest),
        Err(_) => path.to_path_buf(),
    };
    if path.is_relative() {
        config_dir.join(path)
    } else {
        path
    }
}

fn file_size(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().filter(|m| m.is_file()).map(|m| m.len())
}

/// What `ls` shows of a model file, read from its header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub architecture: String,
    /// None for a split model, whose first part holds only some of the weights.
    pub parameters: Option<u64>,
    pub quantization: String,
    pub context_length: Option<u64>,
}

impl Summary {
    pub fn of(info: &gguf::ModelInfo) -> Summary {
        Summary {
            architecture: info.architecture.clone(),
            parameters: if info.details.split_count.is_some_and(|n| n > 1) {
                None
            } else {
                Some(info.details.parameter_count)
            },
            quantization: info.quantization(),
            context_length: info.context_length,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cache {
    version: u32,
    entries: BTreeMap<PathBuf, CacheEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheEntry {
    size: u64,
    mtime_ns: i128,
    summary: Summary,
}

/// Reads headers through the cache; [`HeaderCache::save`] writes back what changed.
pub struct HeaderCache {
    path: PathBuf,
    cache: Cache,
    used: Vec<PathBuf>,
    changed: bool,
}

impl HeaderCache {
    pub fn open(paths: &Paths) -> HeaderCache {
        let path = paths.cache_dir.join(CACHE_FILE);
        let cache = fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Cache>(&bytes).ok())
            .filter(|cache| cache.version == CACHE_VERSION)
            .unwrap_or_default();
        HeaderCache { path, cache, used: Vec::new(), changed: false }
    }

    /// The summary of `path`: from the cache while its size and mtime are unchanged, else
    /// from its header. The error is the header's problem, for the user.
    pub fn summary(&mut self, path: &Path) -> Result<Summary, String> {
        let metadata = fs::metadata(path).map_err(|e| format!("cannot stat it: {e}"))?;
        let mtime_ns = i128::from(metadata.mtime()) * 1_000_000_000 + i128::from(metadata.mtime_nsec());
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        self.used.push(key.clone());
        if let Some(entry) = self.cache.entries.get(&key) {
            if entry.size == metadata.len() && entry.mtime_ns == mtime_ns {
                return Ok(entry.summary.clone());
            }
        }
        let summary = Summary::of(&gguf::inspect(path)?);
        self.cache.entries.insert(key, CacheEntry { size: metadata.len(), mtime_ns, summary: summary.clone() });
        self.changed = true;
        Ok(summary)
    }

    /// Writes the cache if a header was read, keeping only the files asked about, so it
    /// never grows with files long gone. A cache that cannot be written only costs time.
    pub fn save(mut self) {
        let before = self.cache.entries.len();
        self.cache.entries.retain(|path, _| self.used.contains(path));
        if !self.changed && before == self.cache.entries.len() {
            return;
        }
        self.cache.version = CACHE_VERSION;
        let Ok(json) = serde_json::to_vec(&self.cache) else {
            return;
        };
        if let Some(dir) = self.path.parent() {
            let _ = fs::create_dir_all(dir);
        }
        if let Err(error) = write_atomically(&self.path, &json) {
            log::info!("cannot write the header cache {}: {error}", self.path.display());
        }
    }
}

/// Human parameter counts: 135M, 1.2B, 7B.
pub fn human_count(n: u64) -> String {
    let n = n as f64;
    let (value, unit) = match n {
        _ if n >= 1e9 => (n / 1e9, "B"),
        _ if n >= 1e6 => (n / 1e6, "M"),
        _ if n >= 1e3 => (n / 1e3, "K"),
        _ => return format!("{n}"),
    };
    if value < 10.0 {
        format!("{value:.1}{unit}")
    } else {
        format!("{value:.0}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_like_model_sizes() {
        assert_eq!(human_count(134_515_008), "135M");
        assert_eq!(human_count(1_235_814_400), "1.2B");
        assert_eq!(human_count(7_000_000_000), "7.0B");
        assert_eq!(human_count(12_000), "12K");
        assert_eq!(human_count(5), "5");
    }
}
