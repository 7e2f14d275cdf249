//! `llmctl switch MODEL`: load MODEL in the background (or wait with `--wait`);
//! `--exclusive` unloads the others once it is ready.

use crate::cli::SwitchArgs;
use crate::context::Context;
use crate::error::Result;
use crate::protocol::Request;

pub(crate) fn run(context: &Context, args: SwitchArgs) -> Result<()> {
    let model = crate::setup::resolve_on_first_use(context, &args.model, &args.load.overrides())?;
    // In the background the daemon's answer comes before the load: set up first.
    if !args.wait && model.remote.is_none() {
        crate::setup::on_first_use(context, None)?;
    }
    let request = Request::Switch { model: model.clone(), wait: args.wait, exclusive: args.exclusive };
    crate::setup::retry_after_setup(context, || {
        let mut connection = crate::client::connect_for(context, &model, crate::client::AtCap::Refuse)?;
        connection.set_reply_timeout(Some(context.generation_timeout()))?;
        connection.call(&request)
    })?;
    Ok(())
}
