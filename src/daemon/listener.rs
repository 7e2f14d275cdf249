//! The Unix socket's accept loop: each connection goes to an idle connection thread, or a
//! new one when none is idle; idle threads exit after a while, so a burst leaves nothing
//! behind. Reusing threads saves a thread creation (and its fresh stack's page faults) per
//! request.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};

use super::connection;
use super::shared::Shared;
use crate::error::Error;
use crate::protocol::{self, Response};

/// How long an idle connection thread waits for another connection before it exits.
const IDLE_CONNECTION_THREAD: Duration = Duration::from_secs(30);

/// Refused connections waiting for the refuser thread. When they are all taken, the accept
/// loop waits up to [`REFUSAL_PATIENCE`] for a place, then closes the connection at once.
const REFUSALS_PENDING: usize = 256;
/// How long the refuser waits for a refused client to read its answer and hang up.
const REFUSAL_PATIENCE: Duration = Duration::from_millis(200);

/// Tells clients over the connection cap that the daemon is busy, on a thread of its own so
/// the accept loop never waits on one. What a client sent is read and dropped before the
/// socket closes: a Unix socket closed with unread data resets the connection, and the
/// client would never see its answer.
fn start_refuser(cap: impl Fn() -> usize + Send + 'static) -> std::io::Result<Sender<UnixStream>> {
    let (refusals, pending) = bounded::<UnixStream>(REFUSALS_PENDING);
    thread::Builder::new().name("refuser".into()).spawn(move || {
        for stream in pending {
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let error = Error::Busy {
                message: format!("the daemon has {} connections open, its limit", cap()),
                retry_after_ms: 1000,
                per_model: false,
            };
            let _ = protocol::write_message(&mut &stream, &Response::error(&error));
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let deadline = std::time::Instant::now() + REFUSAL_PATIENCE;
            let mut discard = [0u8; 4096];
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                match (&stream).read(&mut discard) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    })?;
    Ok(refusals)
}

/// Accepts until the daemon shuts down (woken by a connection to itself).
pub(crate) fn accept_loop(shared: &Arc<Shared>, listener: UnixListener) {
    // A rendezvous channel: a send succeeds only when a thread is waiting for work.
    let (work_tx, work_rx) = bounded::<UnixStream>(0);
    let cap_shared = Arc::clone(shared);
    let refuser = start_refuser(move || cap_shared.connection_cap());
    if let Err(error) = &refuser {
        log::warn!("cannot start the refuser thread ({error}); connections over the cap are closed at once");
    }
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
        let cap = shared.connection_cap();
        if shared.connections.load(Ordering::SeqCst) >= cap {
            shared.admission.note_rejected();
            if let Ok(refuser) = &refuser {
                // When the refuser is far behind, the stream is dropped here: closed at once.
                let _ = refuser.send_timeout(stream, REFUSAL_PATIENCE);
            }
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
