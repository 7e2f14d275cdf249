//! Prompt caches kept across unloads, the policy half: which unloads save, which slots are
//! worth saving, what a saved cache belongs to (its [`Identity`]), and which saved caches
//! the disk budget drops. Pure functions and plain data, tested with tables; the files are
//! [`super::cache_store`]'s, the HTTP calls `backend::slots`'s.
//!
//! A saved cache is llama-server's own slot file (`POST /slots/ID?action=save`): the
//! slot's tokens and its KV cache, which only the same model, loaded the same way by the
//! same build, can use. llama-server checks none of that when it restores one (its file
//! names the architecture at most), and a truncated file makes it abort (`GGML_ASSERT(nread
//! <= state_size)` in b11434's `state_seq_load_file`, seen with SmolLM2), so llmctl never
//! hands it a file it has not matched to the instance and checked byte for byte.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::state::Unload;
use super::view::FileStamp;
use crate::model::{LoadOptions, ModelSpec};

/// A slot is saved when it holds at least this many tokens: below it, recomputing the
/// prompt takes about as long as reading the file back (SmolLM2 reads 256 tokens in under
/// a second on two cores, and its file for them is 6 MiB).
pub(crate) const MIN_SAVED_TOKENS: u64 = 256;

/// Bumped when the meaning of an identity changes, so older saved caches are never taken
/// for current ones.
const IDENTITY_FORMAT: u32 = 1;

/// True when an unload of this kind saves the slots first. Not for `Restart` (a stalled
/// child is stopped at once, and what it holds is suspect) nor for `Reload` (the model file
/// was replaced, so a cache of the old one could never be restored); a crash never reaches
/// a stop at all.
pub(crate) fn saves_on(why: Unload) -> bool {
    match why {
        Unload::Evict | Unload::Expire | Unload::Exclusive | Unload::Stop => true,
        Unload::Reload | Unload::Restart => false,
    }
}

/// True for the instances whose caches are saved: a local model that generates (embedding
/// and reranking requests keep no conversation), whose arguments leave the slot files to
/// llmctl (`--slot-save-path` of its own) and keep the slot list it reads (`--no-slots`).
pub(crate) fn applies_to(spec: &ModelSpec) -> bool {
    let own_slot_handling = spec
        .load
        .extra_args
        .iter()
        .any(|arg| arg == "--no-slots" || arg == "--slot-save-path" || arg.starts_with("--slot-save-path="));
    spec.remote.is_none() && !spec.load.embeddings && !spec.load.reranking && !own_slot_handling
}

/// The llama-server binary a child runs, as far as it tells builds apart: its path, the
/// file there (a rebuild is a new file) and what `--version` says (a wrapper script stays
/// the same file while the binary behind it changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerBuild {
    pub(crate) path: PathBuf,
    pub(crate) stamp: FileStamp,
    pub(crate) version: String,
}

/// What a saved cache belongs to: the model file's content (device, inode, size and
/// modification time), the load options and the llama-server build. Only a cache of the
/// same identity is ever restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// SHA-256 of [`Identity::description`], in hex.
    pub(crate) digest: String,
    pub(crate) description: String,
}

impl Identity {
    pub(crate) fn of(model: &Path, stamp: FileStamp, load: &LoadOptions, server: &ServerBuild) -> Identity {
        // serde_json writes struct fields in declaration order: the same options give the
        // same text.
        let load_text = serde_json::to_string(load).unwrap_or_default();
        let description = format!(
            "llmctl prompt cache {IDENTITY_FORMAT}\nmodel {}\nmodel file {}\nload {load_text}\nserver {}\nserver file \
             {}\nserver version {}\n",
            model.display(),
            describe_stamp(stamp),
            server.path.display(),
            describe_stamp(server.stamp),
            server.version,
        );
        let mut hasher = crate::sha256::Sha256::new();
        hasher.update(description.as_bytes());
        Identity { digest: hasher.hex(), description }
    }

    /// The part of the digest that names the files (128 bits: no two identities meet).
    pub(crate) fn key(&self) -> &str {
        &self.digest[..KEY_LEN]
    }
}

/// Hex digits of the identity in file names.
pub(crate) const KEY_LEN: usize = 32;

fn describe_stamp(stamp: FileStamp) -> String {
    let modified_ns = stamp.modified.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    format!("dev {} ino {} len {} mtime_ns {modified_ns}", stamp.dev, stamp.ino, stamp.len)
}

/// What the instance a cache was saved from is called: for `status`, and to find the
/// caches a changed file or build has made useless (same model and options, another
/// identity).
pub(crate) fn instance_key(model: &Path, load: &LoadOptions) -> String {
    let mut hasher = crate::sha256::Sha256::new();
    hasher.update(model.as_os_str().as_encoded_bytes());
    hasher.update(b"\0");
    hasher.update(serde_json::to_string(load).unwrap_or_default().as_bytes());
    hasher.hex()[..KEY_LEN].to_string()
}

/// One slot as `GET /slots` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotState {
    pub(crate) id: u32,
    /// Tokens the slot holds: the last prompt and what was generated after it.
    pub(crate) tokens: u64,
    /// A request still runs on it (a `stop` cut it off): its cache is half made.
    pub(crate) processing: bool,
}

/// The slots in llama-server's answer to `GET /slots`: an array of objects with `id`,
/// `is_processing` and, once a request ran there, `n_prompt_tokens`.
pub(crate) fn parse_slots(body: &str) -> Result<Vec<SlotState>, String> {
    let value: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let slots = value.as_array().ok_or("not an array of slots")?;
    slots
        .iter()
        .map(|slot| {
            let id = slot.get("id").and_then(serde_json::Value::as_u64).ok_or("a slot without an id")?;
            Ok(SlotState {
                id: u32::try_from(id).map_err(|_| "a slot id out of range")?,
                tokens: slot.get("n_prompt_tokens").and_then(serde_json::Value::as_u64).unwrap_or(0),
                processing: slot.get("is_processing").and_then(serde_json::Value::as_bool).unwrap_or(false),
            })
        })
        .collect()
}

/// The slots worth saving: idle, holding at least `min_tokens`.
pub(crate) fn slots_to_save(slots: &[SlotState], min_tokens: u64) -> Vec<SlotState> {
    slots.iter().filter(|slot| !slot.processing && slot.tokens >= min_tokens).cloned().collect()
}

/// A saved cache as the budget sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kept<'a> {
    pub(crate) name: &'a str,
    pub(crate) bytes: u64,
    /// When it was saved or last restored, in ms since the epoch: the LRU order.
    pub(crate) used_ms: u64,
}

/// The caches to drop so the rest fit in `budget`: one larger than the whole budget first
/// (it could never fit, and must not push out the rest), then the least recently used
/// (ties by name, so the choice is the same every time).
pub(crate) fn over_budget<'a>(kept: &[Kept<'a>], budget: u64) -> Vec<&'a str> {
    let (too_large, fitting): (Vec<&Kept>, Vec<&Kept>) = kept.iter().partition(|k| k.bytes > budget);
    let mut dropped: Vec<&str> = too_large.iter().map(|k| k.name).collect();
    let mut total: u64 = fitting.iter().map(|k| k.bytes).sum();
    let mut order = fitting;
    order.sort_by(|a, b| a.used_ms.cmp(&b.used_ms).then(a.name.cmp(b.name)));
    for entry in order {
        if total <= budget {
            break;
        }
        total -= entry.bytes;
        dropped.push(entry.name);
    }
    dropped
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64, len: u64, modified_s: u64) -> FileStamp {
        FileStamp { dev: 1, ino, len, modified: Some(UNIX_EPOCH + std::time::Duration::from_secs(modified_s)) }
    }

    fn server(version: &str, ino: u64) -> ServerBuild {
        ServerBuild { path: "/opt/llama-server".into(), stamp: stamp(ino, 15 << 20, 100), version: version.into() }
    }

    #[test]
    fn only_unloads_whose_cache_can_come_back_save() {
        let table = [
            (Unload::Evict, true),
            (Unload::Expire, true),
            (Unload::Exclusive, true),
            (Unload::Stop, true),
            (Unload::Reload, false),
            (Unload::Restart, false),
        ];
        for (why, saves) in table {
            assert_eq!(saves_on(why), saves, "{why:?}");
        }
    }

    #[test]
    fn caches_are_kept_for_local_generation_only() {
        let local = ModelSpec {
            name: "m".into(),
            path: "/m.gguf".into(),
            load: LoadOptions::default(),
            policy: Default::default(),
            remote: None,
        };
        let with = |change: fn(&mut ModelSpec)| {
            let mut spec = local.clone();
            change(&mut spec);
            applies_to(&spec)
        };
        assert!(applies_to(&local));
        assert!(with(|s| s.load.extra_args = vec!["--flash-attn".into(), "on".into()]));
        assert!(!with(|s| s.remote = Some(Default::default())), "remote");
        assert!(!with(|s| s.load.embeddings = true), "embeddings");
        assert!(!with(|s| s.load.reranking = true), "reranking");
        assert!(!with(|s| s.load.extra_args = vec!["--slot-save-path".into(), "/x".into()]), "its own directory");
        assert!(!with(|s| s.load.extra_args = vec!["--slot-save-path=/x".into()]), "its own directory");
        assert!(!with(|s| s.load.extra_args = vec!["--no-slots".into()]), "no slot list");
    }

    #[test]
    fn any_difference_of_file_options_or_build_is_another_identity() {
        let model = Path::new("/m/a.gguf");
        let load = LoadOptions::default();
        let base = Identity::of(model, stamp(7, 1000, 50), &load, &server("build 11434", 9));
        assert_eq!(base, Identity::of(model, stamp(7, 1000, 50), &load, &server("build 11434", 9)), "stable");
        let bigger_context = LoadOptions { ctx_size: Some(4096), ..LoadOptions::default() };
        let more_slots = LoadOptions { parallel: 2, ..LoadOptions::default() };
        let other_args = LoadOptions { extra_args: vec!["--flash-attn".into(), "on".into()], ..LoadOptions::default() };
        let others = [
            (
                "another path",
                Identity::of(Path::new("/m/b.gguf"), stamp(7, 1000, 50), &load, &server("build 11434", 9)),
            ),
            ("a replaced file", Identity::of(model, stamp(8, 1000, 50), &load, &server("build 11434", 9))),
            ("a rewritten file", Identity::of(model, stamp(7, 1000, 51), &load, &server("build 11434", 9))),
            ("a longer file", Identity::of(model, stamp(7, 1001, 50), &load, &server("build 11434", 9))),
            ("another context", Identity::of(model, stamp(7, 1000, 50), &bigger_context, &server("build 11434", 9))),
            ("more slots", Identity::of(model, stamp(7, 1000, 50), &more_slots, &server("build 11434", 9))),
            ("other arguments", Identity::of(model, stamp(7, 1000, 50), &other_args, &server("build 11434", 9))),
            ("another build", Identity::of(model, stamp(7, 1000, 50), &load, &server("build 11500", 9))),
            ("a rebuilt binary", Identity::of(model, stamp(7, 1000, 50), &load, &server("build 11434", 10))),
        ];
        for (what, identity) in others {
            assert_ne!(identity.digest, base.digest, "{what}");
            assert_ne!(identity.key(), base.key(), "{what}");
        }
        assert_eq!(base.key().len(), KEY_LEN);
        assert!(base.description.contains("/m/a.gguf") && base.description.contains("build 11434"));
        assert_eq!(instance_key(model, &load), instance_key(model, &load));
        assert_ne!(instance_key(model, &load), instance_key(model, &bigger_context));
    }

    #[test]
    fn slots_are_read_from_llama_servers_answer() {
        // The shape of b11434's GET /slots: a slot that never ran has no token count.
        let body = r#"[{"id":0,"n_ctx":8192,"is_processing":false,"n_prompt_tokens":2905,"prompt":"..."},
                      {"id":1,"n_ctx":8192,"is_processing":true,"n_prompt_tokens":900},
                      {"id":2,"n_ctx":8192,"is_processing":false,"n_prompt_tokens":12},
                      {"id":3,"n_ctx":8192,"is_processing":false}]"#;
        let slots = parse_slots(body).unwrap();
        assert_eq!(slots.len(), 4);
        assert_eq!(slots[0], SlotState { id: 0, tokens: 2905, processing: false });
        assert_eq!(slots[3].tokens, 0);
        let saved: Vec<u32> = slots_to_save(&slots, MIN_SAVED_TOKENS).iter().map(|slot| slot.id).collect();
        assert_eq!(saved, [0], "a busy slot and short ones are not saved");
        for bad in ["", "{}", "[{\"n_ctx\":1}]", "[{\"id\":-1}]", "[{\"id\":99999999999}]"] {
            assert!(parse_slots(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_budget_drops_the_least_recently_used_first() {
        let kept = |name: &'static str, bytes: u64, used_ms: u64| Kept { name, bytes, used_ms };
        // (caches, budget, dropped)
        let table: Vec<(Vec<Kept>, u64, Vec<&str>)> = vec![
            (vec![kept("a", 10, 1), kept("b", 10, 2)], 20, vec![]),
            (vec![kept("a", 10, 1), kept("b", 10, 2)], 19, vec!["a"]),
            (vec![kept("b", 10, 2), kept("a", 10, 1), kept("c", 10, 3)], 10, vec!["a", "b"]),
            (vec![kept("new", 30, 9), kept("old", 5, 1)], 20, vec!["new"]),
            (vec![kept("big", 30, 1), kept("a", 10, 2), kept("b", 10, 3)], 15, vec!["big", "a"]),
            (vec![kept("x", 5, 4), kept("w", 5, 4)], 5, vec!["w"]),
            (vec![kept("a", 1, 1)], 0, vec!["a"]),
            (vec![], 0, vec![]),
        ];
        for (caches, budget, dropped) in table {
            assert_eq!(over_budget(&caches, budget), dropped, "{caches:?} in {budget}");
        }
    }
}
