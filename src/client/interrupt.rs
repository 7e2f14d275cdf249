//! The one Ctrl-C (and SIGTERM) handler of a foreground command: it marks the command
//! interrupted and shuts down the socket being waited on, so a blocked read returns at once
//! and the daemon, seeing the hang-up, cancels the request upstream. `ctrlc` replaces any
//! other handler, so it is installed once, here, and commands only say which socket to
//! wake ([`Watch`]).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::error::{Error, Result};

/// Set by the handler; read when the connection breaks.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The socket the handler shuts down; -1 when none.
static SOCKET_FD: AtomicI32 = AtomicI32::new(-1);

/// While alive, Ctrl-C (or SIGTERM) shuts down the socket `fd` names.
pub(crate) struct Watch(());

impl Watch {
    /// Installs the handler (once per process) and watches `fd`; the interrupted mark is
    /// cleared, so a conversation can be interrupted answer after answer.
    pub(crate) fn socket(fd: RawFd) -> Result<Watch> {
        install()?;
        INTERRUPTED.store(false, Ordering::SeqCst);
        SOCKET_FD.store(fd, Ordering::SeqCst);
        Ok(Watch(()))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        SOCKET_FD.store(-1, Ordering::SeqCst);
    }
}

/// True once Ctrl-C (or SIGTERM) came while a socket was watched.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn install() -> Result<()> {
    let installed = ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        let fd = SOCKET_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            crate::sys::shutdown_socket(fd);
        }
    });
    match installed {
        // A handler from an earlier call in this process is still in place and still works.
        Ok(()) | Err(ctrlc::Error::MultipleHandlers) => Ok(()),
        Err(error) => Err(Error::internal(format!("cannot install the Ctrl-C handler: {error}"))),
    }
}
