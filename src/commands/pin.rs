//! `llmctl pin MODEL` / `llmctl unpin MODEL`: keep a model loaded, or let it go again.
//! A pinned instance is never evicted for memory and never unloaded by its TTL; pins
//! survive a daemon restart.

use crate::cli::PinArgs;
use crate::context::Context;
use crate::error::Result;
use crate::protocol::Request;

pub(crate) fn run(context: &Context, args: PinArgs, pinned: bool) -> Result<()> {
    let model = context.resolve_model(&args.model, &args.load.overrides())?;
    if !pinned && model.policy.pinned {
        // The config's pin holds whatever a command says; changing it is an edit.
        eprintln!(
            "llmctl: {} stays pinned: `pinned = true` in {} pins it; remove that, then `llmctl reload`",
            model.name,
            context.paths.config.display()
        );
    }
    let mut connection = crate::client::connect_for(context, &model, crate::client::AtCap::Wait)?;
    connection.call(&Request::Pin { model, pinned })?;
    Ok(())
}
