//! `llmctl shutdown`: stop every child gracefully, then the daemon. Succeeds when no
//! daemon runs, so it is safe in scripts.

use std::time::{Duration, Instant};

use crate::client;
use crate::context::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::protocol::Request;

/// How long to wait for the daemon process to be gone after it acknowledged.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a daemon that another command is shutting down: its children may
/// take their whole stop grace.
const OTHERS_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn run(context: &Context) -> Result<()> {
    let mut connection = match client::try_connect_unless_shutting_down(context) {
        Ok(Some(connection)) => connection,
        Ok(None) => return Ok(()),
        // Another command's shutdown is under way: this one is done once that daemon is
        // gone, and leaves alone any daemon a command starts meanwhile.
        Err(error) if error.kind() == ErrorKind::ShuttingDown => {
            return match client::daemon_of_state_dir(&context.paths) {
                Some((pid, _)) => wait_until_gone(pid, OTHERS_SHUTDOWN_TIMEOUT),
                None => Ok(()),
            };
        }
        Err(error) => return Err(error),
    };
    connection.call(&Request::Shutdown)?;
    let pid = connection.daemon_pid;
    drop(connection);
    // The daemon answers once its children are stopped; wait until it has exited (and so
    // removed its socket and lock file), so a following command starts from a clean slate.
    // Only its pid tells: the socket may be another daemon's by then.
    wait_until_gone(pid, EXIT_TIMEOUT)
}

fn wait_until_gone(pid: u32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
    };
    while pid != 0 && running() {
        if Instant::now() >= deadline {
            return Err(Error::Timeout { what: format!("waiting for the daemon (pid {pid}) to exit") });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}
