//! `llmctl pull OWNER/REPO[:QUANT]`: download a GGUF model from the Hugging Face Hub into
//! the models directory and record it, so that the same name works as MODEL everywhere.
//! The network and the file checks are `hub`'s; the record is `library`'s.

use std::io::IsTerminal;

use crate::cli::PullArgs;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::library::RepoName;

pub(crate) fn run(context: &Context, args: PullArgs) -> Result<()> {
    let wanted = RepoName::parse(&args.model).map_err(|message| Error::Usage { message })?;
    let hub = Hub::from_env();
    let plan = hub.plan(wanted.clone())?;
    // Progress goes to a terminal's stderr from the download itself.
    let first = hub.pull(&context.paths, &plan, &mut |_, _| Ok(()))?;
    let size: u64 = plan.files.iter().filter_map(|file| file.size).sum();
    let quantization = crate::gguf::inspect(&first).map(|info| info.quantization()).unwrap_or_default();
    // One line on success, to stderr even off a terminal: a script's log says what arrived
    // and where; stdout stays empty. The name is the one it now answers to as MODEL.
    let name = match &wanted.tag {
        Some(tag) => format!("{}:{tag}", wanted.repo),
        None => wanted.repo.clone(),
    };
    let hint = if std::io::stderr().is_terminal() {
        format!("; run it with `llmctl run {name} PROMPT`")
    } else {
        String::new()
    };
    eprintln!("pulled {name} ({quantization}, {}) to {}{hint}", crate::budget::human(size), first.display());
    Ok(())
}
