//! `llmctl reload`: the daemon reads its config again (as on SIGHUP). Prints what changed
//! and what needs a new daemon. Succeeds when no daemon runs: the next one reads the config.

use crate::client;
use crate::context::Context;
use crate::error::Result;
use crate::protocol::{Request, Response};

pub(crate) fn run(context: &Context) -> Result<()> {
    let Some(mut connection) = client::try_connect(context)? else {
        println!("no daemon runs; the next one reads the config as it is");
        return Ok(());
    };
    if let Response::Ok { message: Some(message) } = connection.call(&Request::Reload)? {
        println!("{message}");
    }
    Ok(())
}
