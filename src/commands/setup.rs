//! `llmctl setup`: llama-server built for this machine, and the demo model, ahead of time
//! (`run`, `warm` and `serve` do the same on first use). The work is in [`crate::setup`].

use crate::cli::{BackendArg, SetupArgs};
use crate::context::Context;
use crate::error::Result;
use crate::setup::{self, BackendChoice, Options, Reporter};

pub(crate) fn run(context: &Context, args: SetupArgs) -> Result<()> {
    let options = Options {
        jobs: args.jobs,
        backend: args.backend.map(|backend| match backend {
            BackendArg::Cpu => BackendChoice::Cpu,
            BackendArg::Cuda => BackendChoice::Cuda,
            BackendArg::Vulkan => BackendChoice::Vulkan,
        }),
        portable: args.portable,
        dry_run: args.dry_run,
    };
    setup::setup(context, &options, !args.no_model, &Reporter::new(args.quiet))
}
