//! `llmctl stop MODEL` / `llmctl stop --all`: unload gracefully; with `--forget`, drop the
//! saved prompt caches too.

use std::io::IsTerminal;

use crate::cli::StopArgs;
use crate::client;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::protocol::{Request, Response};

pub(crate) fn run(context: &Context, args: StopArgs) -> Result<()> {
    let model = match &args.model {
        Some(name) if !args.all => {
            let no_overrides = crate::model::LoadOverrides::default();
            match context.resolve_model(name, &no_overrides) {
                Ok(spec) => Some(spec),
                // The file may be gone while its instance still runs: stop it by its path.
                Err(Error::ModelNotFound { path }) => {
                    let path = std::env::current_dir().map(|dir| dir.join(&path)).unwrap_or(path);
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    Some(ModelSpec { name, path, load: Default::default(), policy: Default::default(), remote: None })
                }
                Err(error) => return Err(error),
            }
        }
        _ => None,
    };
    // Nothing is loaded when no daemon runs, so there is nothing to start one for; but saved
    // caches stay on disk, and only a daemon touches them.
    let mut connection = if args.forget {
        client::connect(context)?
    } else {
        let Some(connection) = client::try_connect(context)? else {
            return Ok(());
        };
        connection
    };
    if let Response::Ok { message: Some(message) } = connection.call(&Request::Stop { model, forget: args.forget })? {
        if std::io::stderr().is_terminal() {
            eprintln!("{message}");
        }
    }
    Ok(())
}
