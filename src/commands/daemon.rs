//! `llmctl daemon`: run the daemon in the foreground.

use crate::cli::DaemonArgs;
use crate::context::Context;
use crate::daemon;
use crate::error::Result;
use crate::settings::{Settings, StartFlags};

pub(crate) fn run(context: &Context, args: DaemonArgs) -> Result<()> {
    let config = context.config()?;
    let queue_depth = args.queue_depth.map(|depth| depth as usize);
    let flags = StartFlags { queue_depth, llama_server: context.global.llama_server.clone() };
    let settings = Settings::from_config(&config, &flags);
    daemon::run(context.paths.clone(), settings, flags)
}
