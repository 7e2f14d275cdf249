//! `llmctl daemon`: run the daemon in the foreground.

use crate::cli::DaemonArgs;
use crate::commands::Context;
use crate::daemon::{self, Settings};
use crate::error::Result;

pub fn run(context: &Context, args: DaemonArgs) -> Result<()> {
    let config = context.config()?;
    let queue_depth = args.queue_depth.map(|depth| depth as usize);
    let settings = Settings::new(&config, queue_depth, context.global.llama_server.clone());
    daemon::run(context.paths.clone(), settings)
}
