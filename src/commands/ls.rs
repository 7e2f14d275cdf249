//! `llmctl ls [--json]`: every model llmctl can run, with what its header says and whether
//! it is loaded. Headers are read through the catalog's cache. A daemon is asked what is
//! loaded only when one already runs: listing files never starts one.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::catalog::{self, HeaderCache, Source};
use crate::cli::LsArgs;
use crate::client;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::protocol::{Request, Response, StatusReport};
use crate::term;

/// One row of `ls`, and one object of `ls --json`.
#[derive(Debug, Serialize)]
pub(crate) struct Listed {
    pub name: String,
    pub source: Source,
    pub path: Option<PathBuf>,
    pub size_bytes: Option<u64>,
    pub architecture: Option<String>,
    pub parameters: Option<u64>,
    pub quantization: Option<String>,
    pub context_length: Option<u64>,
    pub loaded: bool,
    /// Why the header could not be read (a missing or broken file).
    pub error: Option<String>,
}

pub(crate) fn run(context: &Context, args: LsArgs) -> Result<()> {
    let config = context.config()?;
    let known = catalog::known(&config, &context.paths);
    if args.names {
        let text: String = known.iter().map(|model| format!("{}\n", term::escape(&model.name))).collect();
        return write_stdout(&text);
    }
    let loaded = loaded_paths(context);
    let mut cache = HeaderCache::open(&context.paths);
    let listed: Vec<Listed> = known
        .into_iter()
        .map(|model| {
            let (summary, error) = match &model.path {
                Some(path) => match cache.summary(path) {
                    Ok(summary) => (Some(summary), None),
                    Err(reason) => (None, Some(reason)),
                },
                None => (None, None),
            };
            let canonical = model.path.as_ref().and_then(|path| path.canonicalize().ok());
            Listed {
                loaded: match (&canonical, model.source) {
                    (Some(path), _) => loaded.contains(path),
                    (None, Source::Remote) => loaded.contains(&PathBuf::from(format!("remote:{}", model.name))),
                    // Deleted (or moved) while a child still holds it: loaded all the same.
                    (None, _) => model.path.as_ref().is_some_and(|path| loaded.contains(path)),
                },
                name: model.name,
                source: model.source,
                path: canonical.or(model.path),
                size_bytes: model.size,
                architecture: summary.as_ref().map(|s| s.architecture.clone()),
                parameters: summary.as_ref().and_then(|s| s.parameters),
                quantization: summary.as_ref().map(|s| s.quantization.clone()),
                context_length: summary.as_ref().and_then(|s| s.context_length),
                error,
            }
        })
        .collect();
    cache.save();
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&listed).map_err(|e| Error::internal(e.to_string()))?;
        json.push('\n');
        json
    } else {
        render(&listed)
    };
    write_stdout(&text)
}

/// The paths of loaded instances, when a daemon runs; empty when none does (or it cannot
/// answer: `ls` is about files, and says what it can).
fn loaded_paths(context: &Context) -> HashSet<PathBuf> {
    let report = match client::try_connect(context) {
        Ok(Some(mut connection)) => match connection.call(&Request::Status) {
            Ok(Response::Status(report)) => report,
            _ => return HashSet::new(),
        },
        _ => return HashSet::new(),
    };
    loaded_instances(&report).map(|instance| PathBuf::from(&instance.path)).collect()
}

/// Instances that hold a model in memory, or are loading one.
pub(crate) fn loaded_instances(report: &StatusReport) -> impl Iterator<Item = &crate::protocol::InstanceStatus> {
    report.instances.iter().filter(|instance| instance.state.is_up())
}

fn render(listed: &[Listed]) -> String {
    let mut rows = vec![["NAME", "SIZE", "ARCH", "PARAMS", "QUANT", "CONTEXT", "LOADED"].map(String::from)];
    for model in listed {
        let dash = || "-".to_string();
        // Names, architectures and quantizations come from file names and headers anyone
        // may have written: escaped, so none can drive the terminal.
        rows.push([
            term::escape(&model.name).into_owned(),
            model.size_bytes.map(crate::budget::human).unwrap_or_else(dash),
            match (model.source, &model.architecture) {
                (Source::Remote, _) => "remote".into(),
                (_, Some(architecture)) => term::escape(architecture).into_owned(),
                (_, None) => "?".into(),
            },
            model.parameters.map(catalog::human_count).unwrap_or_else(dash),
            model.quantization.as_deref().map(|q| term::escape(q).into_owned()).unwrap_or_else(dash),
            model.context_length.map(|n| n.to_string()).unwrap_or_else(dash),
            if model.loaded { "yes" } else { "no" }.into(),
        ]);
    }
    let mut out = table(&rows);
    for model in listed {
        if let Some(error) = &model.error {
            out.push_str(&format!("{}: {}\n", term::escape(&model.name), term::escape(error)));
        }
    }
    out
}

/// Left-aligned columns two spaces apart.
pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Writes to stdout; a reader that went away (`| head`) is not a failure.
pub(crate) fn write_stdout(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("cannot write to stdout", e)),
        _ => Ok(()),
    }
}
