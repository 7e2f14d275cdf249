//! `llmctl warm MODEL`: load the model and return once it answers a one-token request.
//! Quiet on success and idempotent, for cron.

use crate::cli::WarmArgs;
use crate::context::Context;
use crate::error::Result;
use crate::protocol::Request;

pub(crate) fn run(context: &Context, args: WarmArgs) -> Result<()> {
    let model = crate::setup::resolve_on_first_use(context, &args.model, &args.load.overrides())?;
    let request = Request::Warm { model: model.clone(), ttl_s: args.ttl };
    crate::setup::retry_after_setup(context, || {
        let mut connection = crate::client::connect_for(context, &model, crate::client::AtCap::Refuse)?;
        connection.set_reply_timeout(Some(context.generation_timeout()))?;
        connection.call(&request)
    })?;
    Ok(())
}
