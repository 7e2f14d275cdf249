//! Which model a request means, and the models `serve` lists.
//!
//! A request names a model by alias, by the name of a pulled model, by a file name in the
//! models directory, or by the path or file stem of one of those; a name llmctl does not
//! know goes to the model whose `answers_to` patterns match it; a request that names none,
//! or one nothing matches, goes to the default for its purpose. A path that no known model
//! has is never loaded: a client cannot make llmctl load a file by naming it.

use serde_json::{json, Value};

use crate::config::Config;
use crate::daemon::shared::Shared;
use crate::error::{Error, Result};
use crate::model::{ModelSpec, DEMO_ALIAS, DEMO_FILE};

/// What an endpoint needs of the instance it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Generate,
    Embed,
    Rerank,
}

/// Every name a request may use: config aliases, the demo, pulled models (`OWNER/REPO`)
/// and the other GGUF files in the models directory, by file name.
fn known_names(shared: &Shared, config: &Config) -> Vec<String> {
    let paths = &shared.paths;
    let mut names: Vec<String> = config.models.keys().cloned().collect();
    if paths.models_dir().join(DEMO_FILE).exists() && !config.models.contains_key(DEMO_ALIAS) {
        names.push(DEMO_ALIAS.to_string());
    }
    names.extend(crate::library::list(paths).iter().map(crate::library::Pulled::name));
    for file in crate::library::loose_files(paths) {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name != DEMO_FILE {
            names.push(name);
        }
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names
}

/// The model a request goes to: the one it names (an alias, a path, or a file stem), the
/// one whose `answers_to` matches the name, or else the default for its purpose: an
/// embeddings or reranking model for those endpoints, `default_model`, or the only model
/// there is.
pub(crate) fn choose(shared: &Shared, config: &Config, name: Option<&str>, purpose: Purpose) -> Result<ModelSpec> {
    if let Some(name) = name.filter(|name| !name.is_empty()) {
        match resolve(shared, config, name) {
            Err(Error::UnknownModel { .. }) | Err(Error::ModelNotFound { .. }) => {}
            other => return other,
        }
        // The config refuses patterns of two models that overlap, so one model at most
        // answers to the name.
        if let Some(alias) = answering(config, name) {
            return resolve_known(shared, config, alias);
        }
    }
    let for_purpose = config.models.iter().find(|(_, model)| match purpose {
        Purpose::Embed => model.embeddings,
        Purpose::Rerank => model.reranking,
        Purpose::Generate => false,
    });
    if let Some(alias) = for_purpose.map(|(alias, _)| alias.clone()).or_else(|| config.default_model.clone()) {
        return resolve_known(shared, config, &alias);
    }
    let names = known_names(shared, config);
    match names.as_slice() {
        [only] => resolve_known(shared, config, only),
        _ => Err(Error::NoDefaultModel { asked: name.map(str::to_string), known: names }),
    }
}

/// The model of the config whose `answers_to` matches `name`.
pub(crate) fn answering<'a>(config: &'a Config, name: &str) -> Option<&'a str> {
    config.models.iter().find_map(|(alias, model)| {
        model.answers_to.iter().any(|pattern| crate::config::glob_matches(pattern, name)).then_some(alias.as_str())
    })
}

/// Resolves a name among the models llmctl knows: by name, or by the path or file stem of
/// one of them; else the name of a model loaded by path, which `/v1/models` lists too.
fn resolve(shared: &Shared, config: &Config, name: &str) -> Result<ModelSpec> {
    // An alias, a pulled model or a file in the models directory by its own name is found
    // without listing the directory: every request names one, and a directory of hundreds
    // of pulled models would take milliseconds to list.
    if config.models.contains_key(name) || name == DEMO_ALIAS || named_in_models_dir(shared, name) {
        return resolve_known(shared, config, name);
    }
    let known = known_names(shared, config);
    if known.iter().any(|known| known == name) {
        return resolve_known(shared, config, name);
    }
    let named_path = std::path::Path::new(name).canonicalize().ok();
    for known in &known {
        let Ok(spec) = resolve_known(shared, config, known) else {
            continue;
        };
        let stem = spec.path.file_stem().map(|stem| stem.to_string_lossy().into_owned());
        if spec.remote.is_none() && (stem.as_deref() == Some(name) || named_path.as_ref() == Some(&spec.path)) {
            return Ok(spec);
        }
    }
    loaded_by_path(shared, name).ok_or_else(|| Error::UnknownModel { name: name.to_string() })
}

/// Whether `name` is one of [`known_names`] from the models directory, looked up directly:
/// a pulled model's `OWNER/REPO[:TAG]` as its manifest names it, or a loose GGUF file's
/// name.
fn named_in_models_dir(shared: &Shared, name: &str) -> bool {
    let paths = &shared.paths;
    if name.contains('/') {
        return crate::library::find(paths, name).is_some_and(|pulled| pulled.name() == name);
    }
    let is_gguf = std::path::Path::new(name).extension().is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"));
    is_gguf
        && name != DEMO_FILE
        && std::fs::metadata(paths.models_dir().join(name)).is_ok_and(|metadata| !metadata.is_dir())
}

/// The model of a running instance called `name`, loaded by path (`llmctl run FILE`) rather
/// than by a name above, while its file is there: what [`list`] adds after the known ones.
fn loaded_by_path(shared: &Shared, name: &str) -> Option<ModelSpec> {
    shared.table.all().iter().find_map(|instance| {
        instance.with_view(|view| {
            let listed = view.spec.name == name
                && view.state().is_up()
                && (view.spec.remote.is_some() || view.spec.path.exists());
            listed.then(|| view.spec.clone())
        })
    })
}

/// Whether `name` is a model llmctl knows as it is (not by `answers_to` or a default).
pub(crate) fn knows(shared: &Shared, config: &Config, name: &str) -> bool {
    resolve(shared, config, name).is_ok()
}

/// Every model a client can name, resolved, in the order of [`known_names`].
pub(crate) fn known_models(shared: &Shared, config: &Config) -> Vec<ModelSpec> {
    known_names(shared, config).iter().filter_map(|name| resolve(shared, config, name).ok()).collect()
}

/// Resolves a name with the config already read.
fn resolve_known(shared: &Shared, config: &Config, name: &str) -> Result<ModelSpec> {
    crate::model::resolve(name, config, &shared.paths, &crate::model::LoadOverrides::default())
}

/// A model's entry with llama-server's fields (`id`, `aliases`, `tags`, `object`,
/// `architecture`, `created`, `owned_by`, `meta`), read from the GGUF header rather than a
/// loaded model, so listing loads nothing.
fn described(name: &str, info: Option<&crate::gguf::ModelInfo>, created: u64) -> Value {
    json!({
        "id": name, "aliases": [], "tags": [], "object": "model",
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
        "created": created, "owned_by": "llmctl",
        "meta": {
            "n_ctx_train": info.and_then(|info| info.context_length),
            "n_embd": info.and_then(|info| info.embedding_length),
            "size": info.map(|info| info.tensor_bytes),
            "architecture": info.map(|info| info.architecture.as_str()),
        },
    })
}

/// `GET /props` for a model not loaded since the daemon started, from its GGUF header and
/// its settings: the fields llama-server gives that need no loaded model.
pub(crate) fn props_unloaded(shared: &Shared, spec: &ModelSpec) -> Value {
    let info = shared.model_info(&spec.path);
    let n_ctx = spec.load.ctx_size.map(u64::from).or(info.as_ref().and_then(|info| info.context_length));
    json!({
        "default_generation_settings": {"n_ctx": n_ctx},
        "total_slots": spec.load.parallel,
        "model_alias": spec.name,
        "model_path": spec.path,
        "modalities": {"vision": false, "video": false, "audio": false},
        "endpoint_slots": true,
        "endpoint_props": false,
        "endpoint_metrics": true,
        "ui": false,
        "is_sleeping": true,
    })
}

/// When a model file was last changed, in seconds since the epoch (0 when it cannot say).
fn created(path: &std::path::Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|metadata| metadata.modified())
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_secs())
}

/// Every model a client can name, with what it can use: context length, kind, whether it
/// is loaded, which one answers requests that name none.
pub(crate) fn list(shared: &Shared, config: &Config) -> Value {
    let instances: Vec<_> = shared.table.all().iter().map(|instance| instance.snapshot().status()).collect();
    let default = choose(shared, config, None, Purpose::Generate).ok().map(|spec| spec.name);
    let mut data = Vec::new();
    let mut listed = Vec::new();
    for name in known_names(shared, config) {
        let Ok(spec) = resolve(shared, config, &name) else {
            continue;
        };
        let loaded = instances.iter().any(|i| i.name == name && i.state.is_loaded());
        let info = if spec.remote.is_some() { None } else { shared.model_info(&spec.path) };
        let context_length = spec.load.ctx_size.map(u64::from).or(info.as_ref().and_then(|info| info.context_length));
        let kind = match (spec.remote.is_some(), spec.load.embeddings, spec.load.reranking) {
            (true, _, _) => "remote",
            (_, true, _) => "embeddings",
            (_, _, true) => "reranking",
            _ => "chat",
        };
        let mut entry = described(&name, info.as_deref(), created(&spec.path));
        for (key, value) in [
            ("context_length", json!(context_length)),
            ("kind", json!(kind)),
            ("loaded", json!(loaded)),
            ("default", json!(default.as_deref() == Some(name.as_str()))),
        ] {
            entry[key] = value;
        }
        entry["meta"]["n_ctx"] = json!(context_length);
        data.push(entry);
        listed.push(name);
    }
    // Models loaded by path rather than by a name above, while their file is there.
    for instance in &instances {
        let present = instance.remote.is_some() || std::path::Path::new(&instance.path).exists();
        if !listed.contains(&instance.name) && present && instance.state.is_up() {
            listed.push(instance.name.clone());
            let path = std::path::Path::new(&instance.path);
            let info = if instance.remote.is_some() { None } else { shared.model_info(path) };
            let mut entry = described(&instance.name, info.as_deref(), created(path));
            for (key, value) in [
                ("context_length", json!(instance.ctx_size)),
                ("kind", json!("chat")),
                ("loaded", json!(instance.state.is_loaded())),
                ("default", json!(false)),
            ] {
                entry[key] = value;
            }
            entry["meta"]["n_ctx"] = json!(instance.ctx_size);
            data.push(entry);
        }
    }
    json!({"object": "list", "data": data})
}
