//! `llmctl shutdown`: stop every child gracefully, then the daemon. Succeeds when no
//! daemon runs, so it is safe in scripts.

use std::time::{Duration, Instant};

use crate::client;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::protocol::Request;

/// How long to wait for the daemon process to be gone after it acknowledged.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn run(context: &Context) -> Result<()> {
    let Some(mut connection) = client::try_connect(context)? else {
        return Ok(());
    };
    connection.call(&Request::Shutdown)?;
    let pid = connection.daemon_pid;
    drop(connection);
    // The daemon answers once its children are stopped; wait until it has exited (and so
    // removed its socket and lock file), so a following command starts from a clean slate.
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let running = || {
        let alive = pid != 0
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'));
        alive || context.paths.socket.exists()
    };
    while running() {
        if Instant::now() >= deadline {
            return Err(Error::Timeout { what: "waiting for the daemon to exit".into() });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}
