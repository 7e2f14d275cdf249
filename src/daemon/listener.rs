//! The Unix socket's accept loop: each connection goes to an idle connection thread, or a
//! new one when none is idle; idle threads exit after a while, so a burst leaves nothing
//! behind. Reusing threads saves a thread creation (and its fresh stack's page faults) per
//! request.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::bounded;

use super::connection;
use super::shared::Shared;
use crate::error::Error;
use crate::protocol::{self, Response};

/// Connections beyond the queue depth: enough for every stream in flight and control
/// commands next to a full queue.
const CONNECTION_HEADROOM: usize = 256;
/// Connections beyond that which only control requests (`status`, `stop`, `shutdown`...)
/// may use: however many streams and `events` followers are open, those always get in.
pub(crate) const CONTROL_HEADROOM: usize = 64;

/// The connections that requests which hold one for long (generations, `events`,
/// `serve`) may take together.
pub(crate) fn long_connection_cap(shared: &Shared) -> usize {
    shared.settings.queue_depth.saturating_add(CONNECTION_HEADROOM)
}
/// How long an idle connection thread waits for another connection before it exits.
const IDLE_CONNECTION_THREAD: Duration = Duration::from_secs(30);

/// Tells a client over the connection cap that the daemon is busy, without waiting on it.
fn refuse_connection(stream: &UnixStream, cap: usize) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let error = Error::Busy {
        message: format!("the daemon has {cap} connections open, its limit"),
        retry_after_ms: 1000,
        per_model: false,
    };
    let _ = protocol::write_message(&mut &*stream, &Response::error(&error));
}

/// Accepts until the daemon shuts down (woken by a connection to itself).
pub(crate) fn accept_loop(shared: &Arc<Shared>, listener: UnixListener) {
    // A rendezvous channel: a send succeeds only when a thread is waiting for work.
    let (work_tx, work_rx) = bounded::<UnixStream>(0);
    for stream in listener.incoming() {
        if shared.is_shutting_down() {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            // Shut down (its socket file may be gone: the daemon wakes the accept itself).
            Err(_) if shared.is_shutting_down() => break,
            Err(error) => {
                log::warn!("accept failed: {error}");
                // Out of descriptors or similar: back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // Each connection holds a thread: beyond the cap, a client is told busy at once
        // instead of growing the daemon without bound.
        let cap = long_connection_cap(shared) + CONTROL_HEADROOM;
        if shared.connections.load(Ordering::SeqCst) >= cap {
            refuse_connection(&stream, cap);
            continue;
        }
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let stream = match work_tx.try_send(stream) {
            Ok(()) => continue,
            Err(crossbeam_channel::TrySendError::Full(stream)) => stream,
            Err(crossbeam_channel::TrySendError::Disconnected(stream)) => stream,
        };
        let conn_shared = Arc::clone(shared);
        let work_rx = work_rx.clone();
        let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
            let mut next = Some(stream);
            while let Some(stream) = next.take() {
                connection::serve(&conn_shared, stream);
                conn_shared.connections.fetch_sub(1, Ordering::SeqCst);
                next = work_rx.recv_timeout(IDLE_CONNECTION_THREAD).ok();
            }
        });
        if let Err(error) = spawned {
            // The closure (and the stream) were dropped: the client sees the connection close.
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            log::warn!("cannot start a connection thread: {error}");
        }
    }
}
