//! The models `llmctl pull` downloaded, on disk: one directory per Hugging Face repository
//! under the models directory (`MODELS/OWNER/REPO/`), holding the GGUF files and a small
//! manifest that records what was pulled, from where, with which digest.
//!
//! The manifest is what makes a file llmctl's to remove: `llmctl rm` deletes only files a
//! manifest lists. This module reads and writes manifests and answers "which pulled model
//! is this name"; it never talks to the network (that is `hub`).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::paths::{write_atomically, Paths};

/// The manifest file in each repository directory.
pub(crate) const MANIFEST: &str = "llmctl-pull.json";
/// The quantization a repository name without a tag means, as llama.cpp's `-hf` does.
pub(crate) const DEFAULT_TAG: &str = "Q4_K_M";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// `OWNER/REPO` on the Hub.
    pub repo: String,
    pub pulls: Vec<Pull>,
}

/// One `llmctl pull`: the files of one model (several for a split model, first part first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Pull {
    /// The quantization asked for (`OWNER/REPO:TAG`); none when the default was taken.
    pub tag: Option<String>,
    /// The Hub endpoint it came from.
    pub endpoint: String,
    pub files: Vec<PulledFile>,
    /// Milliseconds since the Unix epoch.
    pub pulled_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PulledFile {
    /// The file name in the repository directory.
    pub name: String,
    /// Its path in the Hub repository (`rfilename`).
    pub remote_name: String,
    pub size: u64,
    pub sha256: Option<String>,
}

/// A pulled model found on disk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pulled {
    pub repo: String,
    pub dir: PathBuf,
    pub pull: Pull,
}

impl Pulled {
    /// The name it answers to as MODEL: `OWNER/REPO` or `OWNER/REPO:TAG`.
    pub(crate) fn name(&self) -> String {
        match &self.pull.tag {
            Some(tag) => format!("{}:{tag}", self.repo),
            None => self.repo.clone(),
        }
    }

    /// The file llama-server loads: the only one, or the first part of a split model.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(&self.pull.files[0].name)
    }

    pub(crate) fn size(&self) -> u64 {
        self.pull.files.iter().map(|file| file.size).sum()
    }

    /// The Hub page it came from.
    pub(crate) fn source(&self) -> String {
        format!("{}/{}", self.pull.endpoint.trim_end_matches('/'), self.repo)
    }
}

/// A MODEL name in the form `OWNER/REPO[:TAG]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RepoName {
    pub repo: String,
    pub tag: Option<String>,
}

impl RepoName {
    /// Parses `OWNER/REPO[:TAG]`, also written `hf.co/OWNER/REPO[:TAG]` or
    /// `huggingface.co/OWNER/REPO[:TAG]` as Ollama takes them (with or without
    /// `https://`); the error says what is wrong with it.
    pub(crate) fn parse(text: &str) -> Result<RepoName, String> {
        let original = text;
        let without_scheme = text.strip_prefix("https://").unwrap_or(text);
        let text =
            ["hf.co/", "huggingface.co/"].iter().find_map(|host| without_scheme.strip_prefix(host)).unwrap_or(text);
        RepoName::parse_bare(text).map_err(|message| message.replace(&format!("`{text}`"), &format!("`{original}`")))
    }

    fn parse_bare(text: &str) -> Result<RepoName, String> {
        let (repo, tag) = match text.split_once(':') {
            Some((repo, tag)) => (repo, Some(tag)),
            None => (text, None),
        };
        let mut parts = repo.split('/');
        let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "`{text}` is not OWNER/REPO[:QUANT] (for example unsloth/gemma-3-270m-it-GGUF:Q4_K_M)"
            ));
        };
        for part in [owner, name] {
            if !is_hub_name(part) {
                return Err(format!(
                    "`{part}` in `{text}` is not a Hugging Face name: use letters, digits, `-`, `_` and `.`"
                ));
            }
        }
        if let Some(tag) = tag {
            if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(format!("`{tag}` in `{text}` is not a quantization name such as Q4_K_M"));
            }
        }
        Ok(RepoName { repo: repo.to_string(), tag: tag.map(str::to_string) })
    }
}

fn is_hub_name(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 96
        && !part.starts_with('.')
        && !part.contains("..")
        && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Where the files of `repo` live.
pub(crate) fn repo_dir(paths: &Paths, repo: &str) -> PathBuf {
    paths.models_dir().join(repo)
}

pub(crate) fn read_manifest(dir: &Path) -> Option<Manifest> {
    let text = fs::read_to_string(dir.join(MANIFEST)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every pulled model, in name order. Unreadable manifests are skipped: `ls` shows what
/// it can.
pub(crate) fn list(paths: &Paths) -> Vec<Pulled> {
    let mut found = Vec::new();
    let models_dir = paths.models_dir();
    let Ok(owners) = fs::read_dir(&models_dir) else {
        return found;
    };
    for owner in owners.flatten().filter(|entry| entry.path().is_dir()) {
        let Ok(repos) = fs::read_dir(owner.path()) else {
            continue;
        };
        for repo in repos.flatten() {
            let dir = repo.path();
            let Some(manifest) = read_manifest(&dir) else {
                continue;
            };
            // A manifest moved to another directory does not describe it.
            let expected = format!("{}/{}", owner.file_name().to_string_lossy(), repo.file_name().to_string_lossy());
            if manifest.repo != expected {
                continue;
            }
            for pull in manifest.pulls {
                if !pull.files.is_empty() {
                    found.push(Pulled { repo: manifest.repo.clone(), dir: dir.clone(), pull });
                }
            }
        }
    }
    found.sort_by_key(Pulled::name);
    found
}

/// The pulled model `name` means: `OWNER/REPO:TAG` is the pull made with that tag, else one
/// whose file name contains it (case aside); `OWNER/REPO` is the pull made without a tag,
/// else the default quantization, else the repository's only pull.
pub(crate) fn find(paths: &Paths, name: &str) -> Option<Pulled> {
    let wanted = RepoName::parse(name).ok()?;
    let dir = repo_dir(paths, &wanted.repo);
    let manifest = read_manifest(&dir).filter(|manifest| manifest.repo == wanted.repo)?;
    let pulls: Vec<Pull> = manifest.pulls.into_iter().filter(|pull| !pull.files.is_empty()).collect();
    let file_has = |pull: &Pull, tag: &str| pull.files[0].name.to_ascii_lowercase().contains(&tag.to_ascii_lowercase());
    let chosen = match &wanted.tag {
        Some(tag) => pulls
            .iter()
            .find(|pull| pull.tag.as_deref().is_some_and(|own| own.eq_ignore_ascii_case(tag)))
            .or_else(|| pulls.iter().find(|pull| file_has(pull, tag))),
        None => pulls
            .iter()
            .find(|pull| pull.tag.is_none())
            .or_else(|| pulls.iter().find(|pull| file_has(pull, DEFAULT_TAG)))
            .or_else(|| if pulls.len() == 1 { pulls.first() } else { None }),
    }?;
    Some(Pulled { repo: manifest.repo, dir, pull: chosen.clone() })
}

/// Records `pull` in the manifest of its repository, replacing an earlier pull of the same
/// file. Written atomically, so a crash leaves the old manifest or the new one.
pub(crate) fn record(dir: &Path, repo: &str, pull: Pull) -> std::io::Result<()> {
    let mut manifest = read_manifest(dir)
        .filter(|manifest| manifest.repo == repo)
        .unwrap_or_else(|| Manifest { repo: repo.to_string(), pulls: Vec::new() });
    let first = pull.files[0].name.clone();
    manifest.pulls.retain(|old| old.files.first().map(|file| &file.name) != Some(&first));
    manifest.pulls.push(pull);
    write_manifest(dir, &manifest)
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> std::io::Result<()> {
    let mut json = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
    json.push(b'\n');
    write_atomically(&dir.join(MANIFEST), &json)
}

/// Deletes the files of `pulled` that no other pull of its repository uses, then its entry
/// in the manifest; the directories go when nothing is left in them. Returns the files
/// deleted.
pub(crate) fn remove(paths: &Paths, pulled: &Pulled) -> std::io::Result<Vec<PathBuf>> {
    let mut manifest = read_manifest(&pulled.dir).unwrap_or_default();
    manifest.pulls.retain(|pull| pull.files.first() != pulled.pull.files.first());
    let still_used = |name: &str| manifest.pulls.iter().any(|pull| pull.files.iter().any(|file| file.name == name));
    let mut deleted = Vec::new();
    for file in &pulled.pull.files {
        if still_used(&file.name) {
            continue;
        }
        for path in [pulled.dir.join(&file.name), pulled.dir.join(format!("{}.part", file.name))] {
            match fs::remove_file(&path) {
                Ok(()) => deleted.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    if manifest.pulls.is_empty() {
        fs::remove_file(pulled.dir.join(MANIFEST))?;
        // Only empty directories go; anything the user put there stays.
        let _ = fs::remove_dir(&pulled.dir);
        if let Some(owner_dir) = pulled.dir.parent().filter(|dir| *dir != paths.models_dir()) {
            let _ = fs::remove_dir(owner_dir);
        }
    } else {
        write_manifest(&pulled.dir, &manifest)?;
    }
    Ok(deleted)
}

/// The `*.gguf` entries directly in the models directory, in name order: every one that is
/// not a directory, so that one which is no file at all (a FIFO, a device) is listed with
/// its error rather than hidden. Reading them is the GGUF reader's job, which opens regular
/// files only.
pub(crate) fn loose_files(paths: &Paths) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(paths.models_dir())
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("gguf")))
                .filter(|path| fs::metadata(path).is_ok_and(|metadata| !metadata.is_dir()))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names_are_checked() {
        let parsed = RepoName::parse("unsloth/gemma-3-270m-it-GGUF:q4_k_m").unwrap();
        assert_eq!(parsed.repo, "unsloth/gemma-3-270m-it-GGUF");
        assert_eq!(parsed.tag.as_deref(), Some("q4_k_m"));
        assert_eq!(RepoName::parse("a/b").unwrap().tag, None);
        for prefixed in ["hf.co/a/b:Q8_0", "huggingface.co/a/b:Q8_0", "https://hf.co/a/b:Q8_0"] {
            assert_eq!(RepoName::parse(prefixed), Ok(RepoName { repo: "a/b".into(), tag: Some("Q8_0".into()) }));
        }
        assert!(RepoName::parse("hf.co/a").unwrap_err().contains("`hf.co/a`"));
        assert!(RepoName::parse("example.com/a/b").is_err(), "only the Hub's own hosts");
        for bad in ["model", "a/b/c", "../b", "a/..", "a/b:", "a/b:x y", "/b", "a/", "a b/c", "a/.hidden"] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
    }

    fn pull(tag: Option<&str>, file: &str) -> Pull {
        Pull {
            tag: tag.map(str::to_string),
            endpoint: "https://huggingface.co".into(),
            files: vec![PulledFile { name: file.into(), remote_name: file.into(), size: 1, sha256: None }],
            pulled_at_ms: 0,
        }
    }

    #[test]
    fn names_find_their_pull() {
        let root = tempfile::tempdir().unwrap();
        let paths = Paths { data_dir: root.path().to_path_buf(), ..Paths::resolve(None, None) };
        let dir = repo_dir(&paths, "o/r");
        fs::create_dir_all(&dir).unwrap();
        record(&dir, "o/r", pull(Some("Q8_0"), "m-Q8_0.gguf")).unwrap();
        record(&dir, "o/r", pull(None, "m-Q4_K_M.gguf")).unwrap();
        let name_of = |name: &str| find(&paths, name).map(|p| p.pull.files[0].name.clone());
        assert_eq!(name_of("o/r").as_deref(), Some("m-Q4_K_M.gguf"));
        assert_eq!(name_of("o/r:q8_0").as_deref(), Some("m-Q8_0.gguf"));
        assert_eq!(name_of("o/r:Q4_K_M").as_deref(), Some("m-Q4_K_M.gguf"));
        assert_eq!(name_of("o/r:Q5_K_M"), None);
        assert_eq!(name_of("o/x"), None);
        let names: Vec<String> = list(&paths).iter().map(Pulled::name).collect();
        assert_eq!(names, ["o/r", "o/r:Q8_0"]);

        // Removing one pull keeps the other and the manifest; removing the last clears up.
        fs::write(dir.join("m-Q8_0.gguf"), b"x").unwrap();
        fs::write(dir.join("m-Q4_K_M.gguf"), b"x").unwrap();
        remove(&paths, &find(&paths, "o/r:Q8_0").unwrap()).unwrap();
        assert!(!dir.join("m-Q8_0.gguf").exists());
        assert!(dir.join("m-Q4_K_M.gguf").exists());
        remove(&paths, &find(&paths, "o/r").unwrap()).unwrap();
        assert!(!paths.models_dir().join("o").exists());
    }
}
