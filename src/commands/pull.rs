//! `llmctl pull OWNER/REPO[:QUANT]`: download a GGUF model from the Hugging Face Hub into
//! the models directory and record it, so that the same name works as MODEL everywhere.
//! The network and the file checks are `hub`'s; the record is `library`'s.

use std::io::IsTerminal;

use crate::cli::PullArgs;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::library::RepoName;

pub fn run(context: &Context, args: PullArgs) -> Result<()> {
    let wanted = RepoName::parse(&args.model).map_err(|message| Error::Usage { message })?;
    let hub = Hub::from_env();
    let plan = hub.plan(wanted)?;
    // Progress goes to a terminal's stderr from the download itself.
    let first = hub.pull(&context.paths, &plan, &mut |_, _| Ok(()))?;
    if std::io::stderr().is_terminal() {
        eprintln!("pulled {} ({}); run it with `llmctl run {} PROMPT`", args.model, first.display(), args.model);
    }
    Ok(())
}
