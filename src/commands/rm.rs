//! `llmctl rm MODEL`: remove a model `llmctl pull` downloaded. Anything else is refused:
//! llmctl deletes only files its manifest says it downloaded. A running daemon is asked to
//! stop the model's instances first, so no llama-server keeps a deleted file mapped, and to
//! drop the prompt caches saved for it, which no other file could use.

use crate::cli::RmArgs;
use crate::client;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::library;
use crate::model::ModelSpec;
use crate::protocol::{Request, Response};

pub(crate) fn run(context: &Context, args: RmArgs) -> Result<()> {
    let Some(pulled) = library::find(&context.paths, &args.model) else {
        let no_overrides = crate::model::LoadOverrides::default();
        // Say what the name is, if it is anything: a file or an alias llmctl did not pull.
        let spec = context.resolve_model(&args.model, &no_overrides)?;
        let path = spec.remote.is_none().then_some(spec.path);
        return Err(Error::NotPulled { name: args.model.clone(), path });
    };
    stop_instances_of(context, &pulled.path())?;
    let deleted = library::remove(&context.paths, &pulled)
        .map_err(|e| Error::io(format!("cannot remove {} from {}", pulled.name(), pulled.dir.display()), e))?;
    // One line on success, to stderr even off a terminal, as `pull` does.
    eprintln!("removed {} ({} file{})", pulled.name(), deleted.len(), if deleted.len() == 1 { "" } else { "s" });
    Ok(())
}

/// Stops every instance of the file, whatever name it was loaded under, and drops its saved
/// prompt caches; nothing to do when no daemon runs.
fn stop_instances_of(context: &Context, path: &std::path::Path) -> Result<()> {
    let Some(mut connection) = client::try_connect(context)? else {
        return Ok(());
    };
    let Response::Status(report) = connection.call(&Request::Status)? else {
        return Err(Error::internal("the daemon answered status with something else"));
    };
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut names: Vec<String> = report
        .instances
        .iter()
        .filter(|instance| std::path::Path::new(&instance.path) == canonical)
        .map(|instance| instance.name.clone())
        .collect();
    let has_caches = report.caches.entries.iter().any(|entry| std::path::Path::new(&entry.path) == canonical);
    if names.is_empty() && has_caches {
        names.push(canonical.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default());
    }
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !seen.insert(name.clone()) {
            continue;
        }
        let spec = ModelSpec {
            name,
            path: canonical.clone(),
            load: Default::default(),
            policy: Default::default(),
            remote: None,
        };
        // The daemon answers one request per connection.
        if let Some(mut connection) = client::try_connect(context)? {
            connection.call(&Request::Stop { model: Some(spec), forget: true })?;
        }
    }
    Ok(())
}
