//! Prompt caches kept across unloads, the files half: one private directory (0700) under
//! the state directory, which every child gets as its `--slot-save-path`, and the index of
//! what is kept there. Workers write and read slot files through it; `status`, `stop
//! --forget` and a reload of `cache_budget` read and trim it.
//!
//! Each kept cache is two files named by the instance's identity and the slot:
//! `KEY-SLOT.bin`, llama-server's own slot file, and `KEY-SLOT.json`, llmctl's manifest
//! with the whole identity, the file's size and its SHA-256. A child writes
//! `KEY-SLOT.partial`; llmctl checks its size, takes its digest, renames it to
//! `KEY-SLOT.bin` and then writes the manifest (through a temporary name too). So a daemon
//! killed at any point leaves either a complete pair or files that do not check, and a
//! file is handed to a child only when its manifest names the child's identity and the
//! bytes still match the digest: a truncated file (which makes llama-server abort) or one
//! of another model (which it would load without a word) is never restored. Nothing is
//! fsynced, since the digest catches what a power cut could leave half written, and an
//! eviction must not wait for the disk.
//!
//! The lock guards the index and the counters only: digests, renames and deletions happen
//! after its guard is dropped, by the worker (or the request) that decided them. Files in
//! the directory that llmctl did not name are logged once and left alone.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::cache::{self, Identity, Kept, ServerBuild, SlotState, KEY_LEN};
use super::view::FileStamp;
use crate::backend::client::Client;
use crate::backend::slots::SlotFile;
use crate::model::{LoadOptions, ModelSpec};
use crate::protocol::{CacheCounters, CacheEntryStatus, CacheStatus};

/// The manifest format; a manifest of another is ignored.
const MANIFEST_FORMAT: u32 = 1;
/// A manifest is a few hundred bytes; anything much larger is not one.
const MANIFEST_LIMIT: u64 = 64 << 10;
/// How long `GET /slots` may take before a stop goes ahead without saving.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// llmctl's note beside a slot file: whose it is and what it must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: u32,
    /// The instance's whole identity digest (the file name holds its first part).
    identity: String,
    /// Model file and load options, without the file's stamp or the build: caches of the
    /// same instance under an older identity are useless and dropped.
    instance: String,
    name: String,
    model: PathBuf,
    load: LoadOptions,
    slot: u32,
    tokens: u64,
    bytes: u64,
    sha256: String,
    saved_ms: u64,
    used_ms: u64,
}

/// What a file name in the directory is, for the part named `KEY-SLOT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Data,
    Manifest,
    Partial,
    ManifestTemp,
}

const SUFFIXES: [(&str, FileKind); 4] = [
    (".json.tmp", FileKind::ManifestTemp),
    (".partial", FileKind::Partial),
    (".json", FileKind::Manifest),
    (".bin", FileKind::Data),
];

/// `KEY-SLOT` and the kind, for the names llmctl gives; none for any other name.
fn parse_name(name: &str) -> Option<(&str, u32, FileKind)> {
    let (stem, kind) = SUFFIXES.iter().find_map(|(suffix, kind)| Some((name.strip_suffix(suffix)?, *kind)))?;
    let (key, slot) = stem.split_once('-')?;
    let hex = key.len() == KEY_LEN && key.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let digits = !slot.is_empty() && slot.len() <= 5 && slot.bytes().all(|b| b.is_ascii_digit());
    (hex && digits).then_some((stem, slot.parse().ok()?, kind))
}

fn stem_of(identity: &Identity, slot: u32) -> String {
    format!("{}-{slot}", identity.key())
}

/// A kept cache that matches an instance, to be checked and restored.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    stem: String,
    manifest: Manifest,
}

/// A slot file a child wrote, not yet checked.
#[derive(Debug)]
pub(crate) struct Written {
    slot: u32,
    answer: SlotFile,
    /// How long the child took to answer the save.
    took: Duration,
}

/// A cache kept or restored, for its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Done {
    pub(crate) slot: u32,
    pub(crate) tokens: u64,
    pub(crate) bytes: u64,
    pub(crate) ms: u64,
}

/// How restoring went.
#[derive(Debug, Default)]
pub(crate) struct RestoreReport {
    pub(crate) restored: Vec<Done>,
    /// A restore failed: the child may have broken, the caller checks it.
    pub(crate) failed: bool,
}

#[derive(Default)]
struct Index {
    entries: BTreeMap<String, Manifest>,
    /// Models whose caches are being forgotten (`None`: all): nothing is saved for them.
    forgetting: Vec<Option<PathBuf>>,
    counters: CacheCounters,
    /// The build of each llama-server binary seen, so `--version` is asked once per file.
    builds: Vec<ServerBuild>,
}

pub(crate) struct CacheStore {
    dir: PathBuf,
    /// False when the directory could not be made private: nothing is saved.
    usable: bool,
    /// `cache_budget` in bytes; 0 turns saving and restoring off.
    budget: AtomicU64,
    timeout: Duration,
    index: Mutex<Index>,
}

impl CacheStore {
    /// The store in `dir`, created private if missing; what a daemon before this one kept
    /// is indexed, and what it left half done is removed.
    pub(crate) fn open(dir: PathBuf, budget: u64, timeout: Duration) -> CacheStore {
        let usable = match crate::paths::ensure_own_private_dir(&dir) {
            Ok(()) => true,
            Err(error) => {
                log::warn!("prompt caches are not saved: {error}");
                false
            }
        };
        let store =
            CacheStore { dir, usable, budget: AtomicU64::new(budget), timeout, index: Mutex::new(Index::default()) };
        if usable {
            store.load_index();
            store.enforce_budget();
        }
        store
    }

    pub(crate) fn enabled(&self) -> bool {
        self.usable && self.budget() > 0
    }

    pub(crate) fn budget(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new `cache_budget` (a reload): caches beyond it are dropped now.
    pub(crate) fn set_budget(&self, budget: u64) {
        self.budget.store(budget, Ordering::Relaxed);
        self.enforce_budget();
    }

    /// The identity a child of `spec` running `binary` gets, when its caches are saved and
    /// restored at all: a local model for generation whose arguments leave the slots to
    /// llmctl, with the store on and its directory there.
    pub(crate) fn identity_for(&self, spec: &ModelSpec, stamp: FileStamp, binary: &Path) -> Option<Identity> {
        if !self.enabled() || !cache::applies_to(spec) {
            return None;
        }
        // The directory may have been removed under a running daemon, and llama-server
        // refuses to start with a save path that is not a directory.
        if let Err(error) = crate::paths::ensure_own_private_dir(&self.dir) {
            log::warn!("prompt caches of {} are not saved: {error}", spec.name);
            self.lose_index();
            return None;
        }
        let build = self.build_of(binary);
        Some(Identity::of(&spec.path, stamp, &spec.load, &build))
    }

    fn build_of(&self, binary: &Path) -> ServerBuild {
        let stamp = fs::metadata(binary).map(|metadata| FileStamp::of(&metadata)).unwrap_or_default();
        let known = self.index.lock().builds.iter().find(|b| b.path == binary && b.stamp == stamp).cloned();
        if let Some(build) = known {
            return build;
        }
        // Asked without the lock: it runs a process, for up to five seconds.
        let version = crate::llama_server::version_of(binary);
        let build = ServerBuild { path: binary.to_path_buf(), stamp, version };
        self.index.lock().builds.push(build.clone());
        build
    }

    /// Saving the caches of `model` now would be undone: it is being forgotten.
    fn forgetting(&self, model: &Path) -> bool {
        self.index.lock().forgetting.iter().any(|forgotten| forgotten.as_deref().is_none_or(|path| path == model))
    }

    /// Asks the child to write every slot worth keeping, each to its `.partial` name, by
    /// `deadline`. Called before the child is stopped; [`CacheStore::keep`] finishes the
    /// job once it is gone.
    pub(crate) fn write_slots(
        &self,
        client: &Client,
        identity: &Identity,
        spec: &ModelSpec,
        deadline: Instant,
    ) -> Vec<Written> {
        if !self.enabled() || self.forgetting(&spec.path) {
            return Vec::new();
        }
        let remaining = || deadline.saturating_duration_since(Instant::now());
        let slots = match client.slots(remaining().min(LIST_TIMEOUT)).and_then(|body| cache::parse_slots(&body)) {
            Ok(slots) => slots,
            Err(error) => {
                log::warn!("not saving the prompt caches of {}: its slots could not be listed: {error}", spec.name);
                return Vec::new();
            }
        };
        let mut written = Vec::new();
        for SlotState { id, tokens, .. } in cache::slots_to_save(&slots, cache::MIN_SAVED_TOKENS) {
            let started = Instant::now();
            let partial = format!("{}.partial", stem_of(identity, id));
            if remaining().is_zero() {
                log::warn!("not saving slot {id} of {} ({tokens} tokens): out of time", spec.name);
                self.index.lock().counters.save_failures += 1;
                continue;
            }
            match client.save_slot(id, &partial, remaining()) {
                Ok(answer) => written.push(Written { slot: id, answer, took: started.elapsed() }),
                Err(error) => {
                    log::warn!("slot {id} of {} ({tokens} tokens) was not saved: {error}", spec.name);
                    self.index.lock().counters.save_failures += 1;
                    // A child still writing it keeps the file open and is about to be killed.
                    let _ = fs::remove_file(self.dir.join(&partial));
                }
            }
        }
        written
    }

    /// Checks, digests and renames what the child wrote, writes the manifests and keeps the
    /// budget. Called once the child is gone.
    pub(crate) fn keep(&self, identity: &Identity, spec: &ModelSpec, written: Vec<Written>) -> Vec<Done> {
        let mut kept = Vec::new();
        for Written { slot, answer, took } in written {
            let stem = stem_of(identity, slot);
            let started = Instant::now();
            match self.keep_one(identity, spec, &stem, slot, answer) {
                // The save's own time: the child's write and llmctl's check, not the stop
                // between them.
                Ok(manifest) => kept.push(Done {
                    slot,
                    tokens: manifest.tokens,
                    bytes: manifest.bytes,
                    ms: (took + started.elapsed()).as_millis() as u64,
                }),
                Err(error) => {
                    log::warn!("the prompt cache of slot {slot} of {} was not kept: {error}", spec.name);
                    self.index.lock().counters.save_failures += 1;
                    let _ = fs::remove_file(self.dir.join(format!("{stem}.partial")));
                }
            }
        }
        let dropped = self.enforce_budget();
        kept.retain(|done| !dropped.contains(&stem_of(identity, done.slot)));
        kept
    }

    fn keep_one(
        &self,
        identity: &Identity,
        spec: &ModelSpec,
        stem: &str,
        slot: u32,
        answer: SlotFile,
    ) -> Result<Manifest, String> {
        let partial = self.dir.join(format!("{stem}.partial"));
        let (bytes, sha256) = digest_of(&partial)?;
        if answer.bytes != 0 && bytes != answer.bytes {
            return Err(format!("the file holds {bytes} bytes where llama-server wrote {}", answer.bytes));
        }
        let now = cache::now_ms();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            identity: identity.digest.clone(),
            instance: cache::instance_key(&spec.path, &spec.load),
            name: spec.name.clone(),
            model: spec.path.clone(),
            load: spec.load.clone(),
            slot,
            tokens: answer.tokens,
            bytes,
            sha256,
            saved_ms: now,
            used_ms: now,
        };
        // The slot file first, then its manifest: a manifest never names a file that is not
        // whole, and an older manifest beside a newer file fails its digest.
        let data = self.dir.join(format!("{stem}.bin"));
        fs::rename(&partial, &data).map_err(|e| format!("cannot rename it: {e}"))?;
        // llama-server creates it with the umask's mode; the conversation in it is private.
        let _ = fs::set_permissions(&data, fs::Permissions::from_mode(0o600));
        self.write_manifest(stem, &manifest)?;
        let mut index = self.index.lock();
        if index.forgetting.iter().any(|forgotten| forgotten.as_deref().is_none_or(|path| path == spec.path)) {
            drop(index);
            self.remove_files(stem);
            return Err("it was forgotten meanwhile".into());
        }
        index.entries.insert(stem.to_string(), manifest.clone());
        index.counters.saves += 1;
        index.counters.saved_tokens += manifest.tokens;
        Ok(manifest)
    }

    fn write_manifest(&self, stem: &str, manifest: &Manifest) -> Result<(), String> {
        let text = serde_json::to_vec_pretty(manifest).map_err(|e| e.to_string())?;
        let temp = self.dir.join(format!("{stem}.json.tmp"));
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .and_then(|mut file| file.write_all(&text))
            .and_then(|()| fs::rename(&temp, self.dir.join(format!("{stem}.json"))));
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written.map_err(|e| format!("cannot write its manifest {}: {e}", temp.display()))
    }

    /// The kept caches of `identity`, to be checked one by one with [`CacheStore::check`].
    /// Caches of the same model and options under another identity (the file or the build
    /// changed since) can never be restored: they are dropped now.
    pub(crate) fn candidates(&self, identity: &Identity, spec: &ModelSpec) -> Vec<Candidate> {
        if !self.enabled() {
            return Vec::new();
        }
        let instance = cache::instance_key(&spec.path, &spec.load);
        let (candidates, stale) = {
            let mut index = self.index.lock();
            let stale: Vec<String> = index
                .entries
                .iter()
                .filter(|(_, m)| m.instance == instance && m.identity != identity.digest)
                .map(|(stem, _)| stem.clone())
                .collect();
            for stem in &stale {
                index.entries.remove(stem);
            }
            index.counters.discarded += stale.len() as u64;
            let candidates: Vec<Candidate> = index
                .entries
                .iter()
                .filter(|(_, m)| m.identity == identity.digest)
                .map(|(stem, manifest)| Candidate { stem: stem.clone(), manifest: manifest.clone() })
                .collect();
            (candidates, stale)
        };
        if !stale.is_empty() {
            log::info!(
                "dropped {} saved prompt cache{} of {}: the model file or llama-server changed since",
                stale.len(),
                if stale.len() == 1 { "" } else { "s" },
                spec.name
            );
        }
        for stem in stale {
            self.remove_files(&stem);
        }
        candidates
    }

    /// True when `candidate`'s file is still exactly what was saved; otherwise it is
    /// dropped with one log line.
    fn check(&self, candidate: &Candidate) -> bool {
        let path = self.dir.join(format!("{}.bin", candidate.stem));
        let problem = match digest_of(&path) {
            Ok((bytes, _)) if bytes != candidate.manifest.bytes => {
                Some(format!("it holds {bytes} bytes, {} were saved", candidate.manifest.bytes))
            }
            Ok((_, sha256)) if sha256 != candidate.manifest.sha256 => {
                Some("its bytes changed since it was saved".into())
            }
            Ok(_) => None,
            Err(error) => Some(error),
        };
        let Some(problem) = problem else { return true };
        log::warn!("ignored the saved prompt cache {}: {problem}", path.display());
        self.drop_entry(&candidate.stem, |counters| counters.ignored += 1);
        false
    }

    /// Restores every kept cache of `identity` into the new child, by `deadline`. Each is
    /// checked first; one llama-server refuses, or that gives back no token, is dropped and
    /// logged, and the slot starts empty as if nothing had been saved.
    pub(crate) fn restore(
        &self,
        client: &Client,
        identity: &Identity,
        spec: &ModelSpec,
        deadline: Instant,
    ) -> RestoreReport {
        let mut report = RestoreReport::default();
        for candidate in self.candidates(identity, spec) {
            let started = Instant::now();
            let remaining = deadline.saturating_duration_since(started);
            if remaining.is_zero() || !self.check(&candidate) {
                continue;
            }
            let slot = candidate.manifest.slot;
            let file_name = format!("{}.bin", candidate.stem);
            let outcome = client.restore_slot(slot, &file_name, remaining).and_then(|answer| {
                if answer.tokens == 0 {
                    Err("llama-server restored no token".to_string())
                } else {
                    Ok(answer)
                }
            });
            match outcome {
                Ok(answer) => {
                    self.touch(&candidate.stem);
                    report.restored.push(Done {
                        slot,
                        tokens: answer.tokens,
                        bytes: candidate.manifest.bytes,
                        ms: started.elapsed().as_millis() as u64,
                    });
                }
                Err(error) => {
                    log::warn!(
                        "the saved prompt cache of slot {slot} of {} was not restored, so its prompt is computed \
                         again: {error}",
                        spec.name
                    );
                    // Never tried again: a file that broke a child would break the next one.
                    self.drop_entry(&candidate.stem, |counters| counters.restore_failures += 1);
                    report.failed = true;
                }
            }
        }
        report
    }

    /// A restore went well: the cache is the most recently used, on disk too.
    fn touch(&self, stem: &str) {
        let manifest = {
            let mut index = self.index.lock();
            let Some(manifest) = index.entries.get_mut(stem) else { return };
            manifest.used_ms = cache::now_ms();
            let manifest = manifest.clone();
            index.counters.restores += 1;
            index.counters.restored_tokens += manifest.tokens;
            manifest
        };
        if let Err(error) = self.write_manifest(stem, &manifest) {
            log::warn!(
                "the restore of the prompt cache of slot {} of {} is not recorded on disk: {error}",
                manifest.slot,
                manifest.name
            );
        }
    }

    fn drop_entry(&self, stem: &str, count: impl FnOnce(&mut CacheCounters)) {
        {
            let mut index = self.index.lock();
            index.entries.remove(stem);
            count(&mut index.counters);
        }
        self.remove_files(stem);
    }

    /// The directory was replaced under the daemon (a file, a link, another owner's): what
    /// the index lists there can no longer be restored, so it is no longer listed. Nothing
    /// is removed through a path that is not the store's own.
    fn lose_index(&self) {
        let mut index = self.index.lock();
        let lost = std::mem::take(&mut index.entries).len();
        if lost > 0 {
            index.counters.dropped += lost as u64;
            log::warn!(
                "{lost} saved prompt cache(s) in {} are forgotten: the directory is no longer usable",
                self.dir.display()
            );
        }
    }

    /// Drops the caches of `model` (every cache when none); returns how many and their bytes.
    pub(crate) fn forget(&self, model: Option<&Path>) -> (usize, u64) {
        let forgotten: Vec<(String, u64)> = {
            let mut index = self.index.lock();
            let stems: Vec<(String, u64)> = index
                .entries
                .iter()
                .filter(|(_, m)| model.is_none_or(|path| m.model == path))
                .map(|(stem, m)| (stem.clone(), m.bytes))
                .collect();
            for (stem, _) in &stems {
                index.entries.remove(stem);
            }
            index.counters.forgotten += stems.len() as u64;
            stems
        };
        for (stem, _) in &forgotten {
            self.remove_files(stem);
        }
        (forgotten.len(), forgotten.iter().map(|(_, bytes)| bytes).sum())
    }

    /// While the guard lives, nothing is saved for `model` (for every model when none): the
    /// stop of `stop --forget` drops what it would save.
    pub(crate) fn suppress(&self, model: Option<&Path>) -> Suppressed<'_> {
        let model = model.map(Path::to_path_buf);
        self.index.lock().forgetting.push(model.clone());
        Suppressed { store: self, model }
    }

    /// Drops the least recently used caches until the rest fit the budget; returns them.
    fn enforce_budget(&self) -> Vec<String> {
        let budget = self.budget();
        let dropped: Vec<(String, u64)> = {
            let mut index = self.index.lock();
            let kept: Vec<Kept> =
                index.entries.iter().map(|(stem, m)| Kept { name: stem, bytes: m.bytes, used_ms: m.used_ms }).collect();
            let names: Vec<String> = cache::over_budget(&kept, budget).into_iter().map(str::to_string).collect();
            let dropped: Vec<(String, u64)> =
                names.into_iter().filter_map(|stem| Some((stem.clone(), index.entries.remove(&stem)?.bytes))).collect();
            index.counters.dropped += dropped.len() as u64;
            dropped
        };
        for (stem, bytes) in &dropped {
            log::info!(
                "dropped the saved prompt cache {stem} ({}) to stay within cache_budget ({})",
                crate::budget::human(*bytes),
                crate::budget::human(budget)
            );
            self.remove_files(stem);
        }
        dropped.into_iter().map(|(stem, _)| stem).collect()
    }

    fn remove_files(&self, stem: &str) {
        for suffix in [".json", ".bin", ".partial", ".json.tmp"] {
            let _ = fs::remove_file(self.dir.join(format!("{stem}{suffix}")));
        }
    }

    /// Reads the manifests a daemon before this one wrote. A complete pair is indexed; a
    /// pair that does not check, a slot file without a manifest and anything half written
    /// are removed, each with one log line; names llmctl never gives are left alone.
    fn load_index(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        let mut names: Vec<String> = entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
        names.sort();
        let mut manifests = BTreeMap::new();
        let mut data = Vec::new();
        for name in &names {
            match parse_name(name) {
                None => log::info!("{} is not a prompt cache of llmctl's; left alone", self.dir.join(name).display()),
                Some((_, _, FileKind::Partial | FileKind::ManifestTemp)) => {
                    log::info!("removed {}, left half written by an earlier daemon", self.dir.join(name).display());
                    let _ = fs::remove_file(self.dir.join(name));
                }
                Some((stem, slot, FileKind::Manifest)) => match self.read_manifest(stem, slot) {
                    Ok(manifest) => {
                        manifests.insert(stem.to_string(), manifest);
                    }
                    Err(problem) => {
                        log::warn!("ignored the saved prompt cache {stem}: {problem}");
                        self.remove_files(stem);
                        self.index.lock().counters.ignored += 1;
                    }
                },
                Some((stem, _, FileKind::Data)) => data.push(stem.to_string()),
            }
        }
        for stem in data.iter().filter(|stem| !manifests.contains_key(*stem)) {
            if self.dir.join(format!("{stem}.bin")).exists() {
                log::info!("removed the prompt cache {stem}, whose manifest was never written");
                self.remove_files(stem);
            }
        }
        self.index.lock().entries = manifests;
    }

    fn read_manifest(&self, stem: &str, slot: u32) -> Result<Manifest, String> {
        let path = self.dir.join(format!("{stem}.json"));
        let metadata = fs::symlink_metadata(&path).map_err(|e| e.to_string())?;
        if !metadata.is_file() || metadata.len() > MANIFEST_LIMIT {
            return Err("its manifest is not a small regular file".into());
        }
        let text = fs::read(&path).map_err(|e| e.to_string())?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| format!("its manifest is unreadable: {e}"))?;
        if manifest.format != MANIFEST_FORMAT
            || !manifest.identity.starts_with(&stem[..KEY_LEN])
            || manifest.slot != slot
        {
            return Err("its manifest names another cache".into());
        }
        let data = fs::symlink_metadata(self.dir.join(format!("{stem}.bin")));
        match data {
            Ok(data) if data.is_file() && data.len() == manifest.bytes => Ok(manifest),
            Ok(data) if data.is_file() => Err(format!("it holds {} bytes, {} were saved", data.len(), manifest.bytes)),
            _ => Err("its slot file is missing".into()),
        }
    }

    /// What `status` shows.
    pub(crate) fn report(&self) -> CacheStatus {
        let index = self.index.lock();
        let entries: Vec<CacheEntryStatus> = index
            .entries
            .values()
            .map(|m| CacheEntryStatus {
                model: m.name.clone(),
                path: m.model.display().to_string(),
                ctx_size: m.load.ctx_size,
                slot: m.slot,
                tokens: m.tokens,
                bytes: m.bytes,
                saved_ms: m.saved_ms,
                used_ms: m.used_ms,
            })
            .collect();
        CacheStatus {
            dir: self.dir.display().to_string(),
            enabled: self.enabled(),
            budget_bytes: self.budget(),
            used_bytes: entries.iter().map(|e| e.bytes).sum(),
            entries,
            counters: index.counters.clone(),
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// See [`CacheStore::suppress`].
pub(crate) struct Suppressed<'a> {
    store: &'a CacheStore,
    model: Option<PathBuf>,
}

impl Drop for Suppressed<'_> {
    fn drop(&mut self) {
        let mut index = self.store.index.lock();
        if let Some(position) = index.forgetting.iter().position(|m| *m == self.model) {
            index.forgetting.remove(position);
        }
    }
}

/// The size and SHA-256 of a regular file (a link or anything else is refused).
fn digest_of(path: &Path) -> Result<(u64, String), String> {
    let metadata = fs::symlink_metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !metadata.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut file = fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = crate::sha256::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                hasher.update(&buffer[..read]);
                bytes += read as u64;
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
        }
    }
    Ok((bytes, hasher.hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_spec(path: &str, ctx_size: Option<u32>) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            path: path.into(),
            load: LoadOptions { ctx_size, ..LoadOptions::default() },
            policy: Default::default(),
            remote: None,
        }
    }

    fn identity_of(spec: &ModelSpec, build: &str) -> Identity {
        let server = ServerBuild { path: "/bin/llama-server".into(), stamp: FileStamp::none(), version: build.into() };
        Identity::of(&spec.path, FileStamp::none(), &spec.load, &server)
    }

    /// Does what a child and a stop do: the child writes `bytes` to the partial name, the
    /// worker keeps it.
    fn save(store: &CacheStore, identity: &Identity, spec: &ModelSpec, slot: u32, bytes: &[u8]) -> Vec<Done> {
        fs::write(store.dir().join(format!("{}.partial", stem_of(identity, slot))), bytes).unwrap();
        let answer = SlotFile { tokens: 300 + u64::from(slot), bytes: bytes.len() as u64, ms: 1.0 };
        store.keep(identity, spec, vec![Written { slot, answer, took: Duration::from_millis(1) }])
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    fn open(dir: &Path, budget: u64) -> CacheStore {
        let store = CacheStore::open(dir.to_path_buf(), budget, Duration::from_secs(1));
        assert!(store.usable, "{} is usable", dir.display());
        store
    }

    /// A directory for the store (the temporary directory itself may be open to others).
    fn cache_dir() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("prompt-caches");
        (root, dir)
    }

    #[test]
    fn a_kept_cache_is_a_checked_pair_in_a_private_directory() {
        let (_root, dir) = cache_dir();
        let store = open(&dir, 1 << 20);
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let spec = model_spec("/m/a.gguf", None);
        let identity = identity_of(&spec, "build 1");
        let kept = save(&store, &identity, &spec, 0, b"slot zero");
        assert_eq!(kept, [Done { slot: 0, tokens: 300, bytes: 9, ms: kept[0].ms }]);
        let stem = stem_of(&identity, 0);
        assert_eq!(names(&dir), [format!("{stem}.bin"), format!("{stem}.json")], "no partial left");
        for name in names(&dir) {
            assert_eq!(fs::metadata(dir.join(&name)).unwrap().permissions().mode() & 0o777, 0o600, "{name}");
        }
        let candidates = store.candidates(&identity, &spec);
        assert_eq!(candidates.len(), 1);
        assert!(store.check(&candidates[0]));
        let report = store.report();
        assert_eq!((report.used_bytes, report.entries.len(), report.counters.saves), (9, 1, 1));
        assert_eq!(report.entries[0].tokens, 300);

        // A daemon after this one finds it as it was left.
        drop(store);
        let store = open(&dir, 1 << 20);
        assert_eq!(store.candidates(&identity, &spec).len(), 1);
        // Another model, other options or another build see nothing of it.
        assert!(store.candidates(&identity_of(&spec, "build 2"), &model_spec("/m/b.gguf", None)).is_empty());
        assert!(store.candidates(&identity_of(&model_spec("/m/a.gguf", Some(512)), "build 1"), &spec).is_empty());
    }

    #[test]
    fn a_file_that_changed_after_it_was_saved_is_ignored_and_dropped() {
        let (_root, dir) = cache_dir();
        let store = open(&dir, 1 << 20);
        let spec = model_spec("/m/a.gguf", None);
        let identity = identity_of(&spec, "build 1");
        save(&store, &identity, &spec, 0, b"the saved bytes");
        save(&store, &identity, &spec, 1, b"the other slot");
        let stem = stem_of(&identity, 0);
        // Same length, other bytes: what a foreign file copied over it would be.
        fs::write(dir.join(format!("{stem}.bin")), b"THE SAVED BYTES").unwrap();
        // Cut short: what a disk full or a power cut could leave.
        let other = stem_of(&identity, 1);
        fs::write(dir.join(format!("{other}.bin")), b"the").unwrap();
        for candidate in store.candidates(&identity, &spec) {
            assert!(!store.check(&candidate), "{}", candidate.stem);
        }
        assert!(store.candidates(&identity, &spec).is_empty());
        assert!(names(&dir).is_empty(), "{:?}", names(&dir));
        assert_eq!(store.report().counters.ignored, 2);
    }

    #[test]
    fn what_an_earlier_daemon_left_half_done_is_removed_and_foreign_files_stay() {
        let (_root, dir) = cache_dir();
        let dir = dir.as_path();
        let spec = model_spec("/m/a.gguf", None);
        let identity = identity_of(&spec, "build 1");
        {
            let store = open(dir, 1 << 20);
            for slot in 0..4 {
                save(&store, &identity, &spec, slot, format!("slot {slot}").as_bytes());
            }
        }
        let stem = |slot| stem_of(&identity, slot);
        // Killed while a child wrote, between the rename and the manifest, while writing a
        // manifest; a manifest over a slot file cut short; and files llmctl never names.
        fs::write(dir.join(format!("{}.partial", stem(7))), b"half").unwrap();
        fs::remove_file(dir.join(format!("{}.json", stem(1)))).unwrap();
        fs::write(dir.join(format!("{}.json.tmp", stem(2))), b"{").unwrap();
        fs::write(dir.join(format!("{}.bin", stem(3))), b"s").unwrap();
        fs::write(dir.join(format!("{}.json", stem(2))), b"not json").unwrap();
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        fs::write(dir.join(format!("{}.bin", "0".repeat(31))), b"not a key").unwrap();
        let store = open(dir, 1 << 20);
        let kept: Vec<u32> = store.candidates(&identity, &spec).iter().map(|c| c.manifest.slot).collect();
        assert_eq!(kept, [0]);
        let mut expected =
            vec![format!("{}.bin", "0".repeat(31)), format!("{}.bin", stem(0)), format!("{}.json", stem(0))];
        expected.push("notes.txt".into());
        expected.sort();
        assert_eq!(names(dir), expected);
        assert_eq!(store.report().counters.ignored, 2, "the unreadable manifest and the short file");
    }

    #[test]
    fn caches_of_a_changed_file_or_build_are_dropped_and_other_options_kept() {
        let (_root, dir) = cache_dir();
        let store = open(&dir, 1 << 20);
        let (small, large) = (model_spec("/m/a.gguf", Some(512)), model_spec("/m/a.gguf", Some(4096)));
        let old_build = identity_of(&small, "build 1");
        save(&store, &old_build, &small, 0, b"old build");
        save(&store, &identity_of(&large, "build 1"), &large, 0, b"other options");
        assert!(store.candidates(&identity_of(&small, "build 2"), &small).is_empty());
        let report = store.report();
        assert_eq!(report.entries.len(), 1, "only the other options' cache is left");
        assert_eq!(report.entries[0].ctx_size, Some(4096));
        assert_eq!(report.counters.discarded, 1);
        assert_eq!(names(&dir).len(), 2);
    }

    #[test]
    fn the_budget_keeps_the_most_recently_used() {
        let (_root, dir) = cache_dir();
        let store = open(&dir, 25);
        let spec = model_spec("/m/a.gguf", None);
        let identity = identity_of(&spec, "build 1");
        for slot in 0..5 {
            save(&store, &identity, &spec, slot, &[b'x'; 10]);
            // Saved in order: a later save is more recent, whatever the clock's resolution.
            store.index.lock().entries.get_mut(&stem_of(&identity, slot)).unwrap().used_ms = u64::from(slot);
            let used = store.report().used_bytes;
            assert!(used <= 25, "{used} bytes kept");
            assert!(names(&dir).len() <= 4, "{:?}", names(&dir));
        }
        let slots: Vec<u32> = store.report().entries.iter().map(|e| e.slot).collect();
        assert_eq!(slots, [3, 4]);
        // One larger than the budget is not kept at all.
        assert!(save(&store, &identity, &spec, 9, &[b'y'; 26]).is_empty());
        store.set_budget(10);
        assert_eq!(store.report().entries.len(), 1);
        store.set_budget(0);
        assert!(store.report().entries.is_empty() && !store.enabled());
        assert!(names(&dir).is_empty());
    }

    #[test]
    fn forgetting_drops_one_models_caches_and_saves_none_meanwhile() {
        let (_root, dir) = cache_dir();
        let store = open(&dir, 1 << 20);
        let (a, b) = (model_spec("/m/a.gguf", None), model_spec("/m/b.gguf", None));
        save(&store, &identity_of(&a, "build 1"), &a, 0, b"a");
        save(&store, &identity_of(&b, "build 1"), &b, 0, b"b");
        {
            let _suppressed = store.suppress(Some(Path::new("/m/a.gguf")));
            assert!(store.forgetting(Path::new("/m/a.gguf")) && !store.forgetting(Path::new("/m/b.gguf")));
            assert!(save(&store, &identity_of(&a, "build 1"), &a, 1, b"a1").is_empty(), "not kept while forgetting");
            assert_eq!(store.forget(Some(Path::new("/m/a.gguf"))), (1, 1));
        }
        assert!(!store.forgetting(Path::new("/m/a.gguf")));
        let left: Vec<String> = store.report().entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(left, ["/m/b.gguf"]);
        assert_eq!(store.forget(None), (1, 1));
        assert!(names(&dir).is_empty());
    }

    #[test]
    fn a_directory_replaced_under_the_store_saves_nothing_and_lists_nothing() {
        let (_root, dir) = cache_dir();
        let store = open(&dir, 1 << 20);
        let spec = model_spec("/m/a.gguf", None);
        let identity = identity_of(&spec, "build 1");
        save(&store, &identity, &spec, 0, b"slot zero");
        assert_eq!(store.report().entries.len(), 1);
        let elsewhere = dir.with_file_name("elsewhere");
        fs::rename(&dir, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        let binary = dir.with_file_name("llama-server");
        assert!(store.identity_for(&spec, FileStamp::none(), &binary).is_none(), "nothing is saved through a link");
        let report = store.report();
        assert!(report.entries.is_empty(), "{:?}", report.entries);
        assert_eq!(report.counters.dropped, 1);
        assert_eq!(names(&elsewhere).len(), 2, "nothing removed through the link");
        fs::remove_file(&dir).unwrap();
        fs::write(&dir, "a file").unwrap();
        assert!(store.identity_for(&spec, FileStamp::none(), &binary).is_none(), "nor into a file");
    }

    #[test]
    fn names_are_recognised_exactly() {
        let key = "0123456789abcdef0123456789abcdef";
        assert_eq!(parse_name(&format!("{key}-0.bin")), Some((&*format!("{key}-0"), 0, FileKind::Data)));
        assert_eq!(parse_name(&format!("{key}-12.json")).map(|n| n.2), Some(FileKind::Manifest));
        assert_eq!(parse_name(&format!("{key}-1.json.tmp")).map(|n| n.2), Some(FileKind::ManifestTemp));
        assert_eq!(parse_name(&format!("{key}-1.partial")).map(|n| n.2), Some(FileKind::Partial));
        for foreign in ["notes.txt", "x-0.bin", &format!("{key}-.bin"), &format!("{key}-a.bin"), &format!("{key}0.bin")]
        {
            assert_eq!(parse_name(foreign), None, "{foreign}");
        }
        assert_eq!(parse_name(&format!("{}-0.bin", key.to_uppercase())), None);
    }
}
