//! `llmctl shutdown`: stop every child gracefully, then the daemon. Succeeds when no
//! daemon runs, so it is safe in scripts.

use std::time::{Duration, Instant};

use crate::client;
use crate::commands::Context;
use crate::error::{Error, Result};
use crate::protocol::Request;

/// How long to wait for the daemon process to be gone after it acknowledged.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(context: &Context) -> Result<()> {
    let Some(mut connection) = client::try_connect(context)? else {
        return Ok(());
    };
    connection.call(&Request::Shutdown)?;
    drop(connection);
    // The daemon answers once its children are stopped; wait until it has let go of the
    // socket too, so a following command starts from a clean slate.
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while context.paths.socket.exists() {
        if Instant::now() >= deadline {
            return Err(Error::Timeout { what: "waiting for the daemon to exit".into() });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}
