//! The HTTP listeners open now: where each listens, its key, its access log and how to
//! close it. `serve` opens them; the daemon's shared state keeps the list, so `status`
//! names them and a shutdown closes them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;

/// Access-log lines a `serve` client may fall behind by before lines are dropped.
pub(crate) const LOG_BACKLOG: usize = 1024;

/// The HTTP listeners open now.
#[derive(Default)]
pub(crate) struct Listeners {
    pub(crate) open: Mutex<Vec<Arc<Listener>>>,
}

impl Listeners {
    /// The addresses listened on, for `status`.
    pub(crate) fn addresses(&self) -> Vec<String> {
        self.open.lock().iter().map(|listener| listener.address.to_string()).collect()
    }

    /// Closes `listener`: no new connection is accepted; requests in flight finish.
    pub(crate) fn close(&self, listener: &Arc<Listener>) {
        self.open.lock().retain(|open| !Arc::ptr_eq(open, listener));
        listener.stop();
    }

    /// Closes every listener (the daemon is shutting down).
    pub(crate) fn close_all(&self) {
        let open: Vec<Arc<Listener>> = self.open.lock().drain(..).collect();
        for listener in open {
            listener.stop();
        }
    }
}

/// One HTTP listener of the daemon.
pub(crate) struct Listener {
    pub(crate) address: SocketAddr,
    /// The key clients must send; none on loopback without one.
    pub(crate) api_key: Option<String>,
    pub(crate) stopping: Arc<AtomicBool>,
    pub(crate) fd: std::os::fd::RawFd,
    pub(crate) log: Sender<String>,
    pub(crate) log_rx: Receiver<String>,
    /// The connection of the `serve` that opened it (none for the config's): once that
    /// hangs up, the listener is its own no longer.
    pub(crate) owner: Option<std::os::unix::net::UnixStream>,
}

impl Listener {
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// The access log: one line per answered request.
    pub(crate) fn log(&self) -> Receiver<String> {
        self.log_rx.clone()
    }

    /// Records one answered request; a reader that falls behind loses lines, never slows
    /// a request.
    pub(crate) fn note(&self, line: String) {
        if let Err(TrySendError::Full(_)) = self.log.try_send(line) {
            log::debug!("the access log of {} is not being read fast enough", self.address);
        }
    }

    /// True when the `serve` that opened the listener has gone (killed, say) though its
    /// handler has not noticed yet.
    pub(crate) fn abandoned(&self) -> bool {
        self.owner.as_ref().is_some_and(crate::sys::peer_closed)
    }

    pub(crate) fn stop(&self) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            crate::http::wake(self.fd);
            log::info!("stopped listening on http://{}", self.address);
        }
    }
}
