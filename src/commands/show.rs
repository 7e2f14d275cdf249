//! `llmctl show MODEL [--json] [--template]`: what a model's GGUF header says, and the
//! memory llmctl expects it to take at the context it would load it with (the same
//! estimate the daemon plans with). Reads the file; talks to no daemon.

use serde::Serialize;

use crate::catalog;
use crate::cli::ShowArgs;
use crate::commands::ls::write_stdout;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::gguf;
use crate::library;
use crate::term;

#[derive(Debug, Serialize)]
struct Shown {
    name: String,
    path: String,
    /// Where it came from, for a pulled model: the Hub repository.
    source: Option<String>,
    size_bytes: u64,
    architecture: String,
    parameters: Option<u64>,
    quantization: String,
    /// The context the model was trained for.
    context_length: Option<u64>,
    /// The context llmctl would load it with (the config's or --ctx-size, else the trained one).
    ctx_size: u64,
    embedding_length: Option<u64>,
    layers: Option<u64>,
    head_count: Option<u64>,
    head_count_kv: Option<u64>,
    general_name: Option<String>,
    license: Option<String>,
    author: Option<String>,
    has_chat_template: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    chat_template: Option<String>,
    /// RAM expected at `ctx_size`: weights, KV cache and the process.
    memory_estimate_bytes: u64,
    kv_cache_bytes: u64,
}

/// The context an instance gets when neither the config nor the command line sets one; the
/// daemon's estimate uses the same fallback.
const FALLBACK_CTX: u64 = 4096;

pub(crate) fn run(context: &Context, args: ShowArgs) -> Result<()> {
    let spec = context.resolve_model(&args.model, &args.load.overrides())?;
    if spec.remote.is_some() {
        return Err(Error::Usage {
            message: format!("`{}` is a remote model: its server has the file, llmctl has nothing to read", spec.name),
        });
    }
    let info = gguf::inspect(&spec.path).map_err(|reason| Error::BadModel { path: spec.path.clone(), reason })?;
    if args.template && !args.json {
        let Some(template) = &info.details.chat_template else {
            return Err(Error::BadModel {
                path: spec.path.clone(),
                reason: "it has no chat template; run it with `llmctl run --raw`".into(),
            });
        };
        // A template is text from the file: its lines are kept, anything a terminal would act
        // on is escaped.
        let mut text = term::escape_lines(template).into_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        return write_stdout(&text);
    }
    let pulled = library::find(&context.paths, &spec.name).filter(|pulled| pulled.path() == spec.path);
    let ctx_size = spec.load.ctx_size.map(u64::from).or(info.context_length).unwrap_or(FALLBACK_CTX);
    let shown = Shown {
        name: spec.name.clone(),
        path: spec.path.display().to_string(),
        source: pulled.as_ref().map(|pulled| pulled.source()),
        size_bytes: pulled.as_ref().map(|pulled| pulled.size()).unwrap_or(info.file_size),
        architecture: info.architecture.clone(),
        parameters: catalog::Summary::of(&info).parameters,
        quantization: info.quantization(),
        context_length: info.context_length,
        ctx_size,
        embedding_length: info.embedding_length,
        layers: info.block_count,
        head_count: info.head_count,
        head_count_kv: info.head_count_kv,
        general_name: info.name.clone(),
        license: info.details.license.clone(),
        author: info.details.author.clone(),
        has_chat_template: info.details.chat_template.is_some(),
        chat_template: if args.template { info.details.chat_template.clone() } else { None },
        memory_estimate_bytes: crate::estimate::bytes(&spec, &info),
        kv_cache_bytes: info.kv_cache_bytes(ctx_size),
    };
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&shown).map_err(|e| Error::internal(e.to_string()))?;
        json.push('\n');
        json
    } else {
        render(&shown)
    };
    write_stdout(&text)
}

/// The lines of `show`. Every value that comes from the file, its name or the Hub is
/// escaped, so no header can drive the terminal.
fn render(shown: &Shown) -> String {
    let human = crate::budget::human;
    let mut lines: Vec<(&str, String)> = vec![("name", shown.name.clone()), ("path", shown.path.clone())];
    if let Some(source) = &shown.source {
        lines.push(("pulled from", source.clone()));
    }
    lines.push(("size", human(shown.size_bytes)));
    lines.push(("architecture", shown.architecture.clone()));
    if let Some(parameters) = shown.parameters {
        lines.push(("parameters", format!("{} ({parameters})", catalog::human_count(parameters))));
    }
    lines.push(("quantization", shown.quantization.clone()));
    if let Some(context_length) = shown.context_length {
        lines.push(("context length", context_length.to_string()));
    }
    if let Some(embedding) = shown.embedding_length {
        lines.push(("embedding size", embedding.to_string()));
    }
    if let Some(layers) = shown.layers {
        lines.push(("layers", layers.to_string()));
    }
    match (shown.head_count, shown.head_count_kv) {
        (Some(heads), Some(kv)) if kv != heads => lines.push(("attention heads", format!("{heads} ({kv} for K/V)"))),
        (Some(heads), _) => lines.push(("attention heads", heads.to_string())),
        _ => {}
    }
    for (label, value) in
        [("general.name", &shown.general_name), ("license", &shown.license), ("author", &shown.author)]
    {
        if let Some(value) = value {
            lines.push((label, value.clone()));
        }
    }
    lines.push((
        "chat template",
        if shown.has_chat_template { "yes (--template prints it)".into() } else { "none (use `run --raw`)".into() },
    ));
    lines.push((
        "memory",
        format!(
            "about {} at context {} ({} of it KV cache)",
            human(shown.memory_estimate_bytes),
            shown.ctx_size,
            human(shown.kv_cache_bytes)
        ),
    ));
    let width = lines.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    lines.iter().map(|(label, value)| format!("{label:<width$}  {}\n", term::escape(value))).collect()
}
