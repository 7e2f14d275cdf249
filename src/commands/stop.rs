//! `llmctl stop MODEL` / `llmctl stop --all`: unload gracefully.

use std::io::IsTerminal;

use crate::cli::{LoadArgs, StopArgs};
use crate::client;
use crate::commands::Context;
use crate::error::Result;
use crate::protocol::{Request, Response};

pub fn run(context: &Context, args: StopArgs) -> Result<()> {
    let model = match &args.model {
        Some(name) if !args.all => {
            let no_overrides = LoadArgs { ctx_size: None, parallel: None, gpu_layers: None };
            Some(context.resolve_model(name, &no_overrides)?)
        }
        _ => None,
    };
    // Nothing is loaded when no daemon runs, so there is nothing to start one for.
    let Some(mut connection) = client::try_connect(context)? else {
        return Ok(());
    };
    if let Response::Ok { message: Some(message) } = connection.call(&Request::Stop { model })? {
        if std::io::stderr().is_terminal() {
            eprintln!("{message}");
        }
    }
    Ok(())
}
