//! The Unix socket's accept loop: idle connection threads wait in `accept` themselves and
//! serve what they accept, one more starting whenever the last one takes a connection; idle
//! threads exit after a while, so a burst leaves nothing behind. Reusing threads saves a
//! thread creation (and its fresh stack's page faults) per request.

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};

use super::connection;
use super::shared::Shared;
use crate::error::Error;
use crate::protocol::{self, Response};
use crate::sys;

/// How long an idle connection thread waits for another connection before it exits.
const IDLE_CONNECTION_THREAD: Duration = Duration::from_secs(30);

/// [`IDLE_CONNECTION_THREAD`], or the test suite's shorter wait.
fn idle_connection_thread() -> Duration {
    #[cfg(feature = "testing")]
    if let Some(ms) = std::env::var("LLMCTL_TEST_IDLE_THREAD_MS").ok().and_then(|ms| ms.parse().ok()) {
        return Duration::from_millis(ms);
    }
    IDLE_CONNECTION_THREAD
}

/// Refused connections waiting for the refuser thread. When they are all taken, the accept
/// loop waits up to [`REFUSAL_PATIENCE`] for a place, then closes the connection at once.
const REFUSALS_PENDING: usize = 256;
/// How long the refuser waits for a refused client to read its answer and hang up.
const REFUSAL_PATIENCE: Duration = Duration::from_millis(200);

/// Tells a client it cannot be served (the daemon is at its connection cap, or shutting
/// down), on a thread of its own so the accept loop never waits on one. What a client sent
/// is read and dropped before the socket closes: a Unix socket closed with unread data
/// resets the connection, and the client would never see its answer. A client sends its
/// hello as it connects, so that is there to drop at once; the refuser then waits a moment
/// for the client to hang up only while no other refusal waits behind it, so connections
/// held open without a word cannot delay the answers of the clients after them.
fn start_refuser() -> std::io::Result<Sender<(UnixStream, Error)>> {
    let (refusals, pending) = bounded::<(UnixStream, Error)>(REFUSALS_PENDING);
    thread::Builder::new().name("refuser".into()).spawn(move || {
        for (stream, error) in &pending {
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = protocol::send_message(&mut &stream, &Response::error(&error));
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let deadline = std::time::Instant::now() + REFUSAL_PATIENCE;
            let mut discard = [0u8; 4096];
            let _ = stream.set_nonblocking(true);
            loop {
                match (&stream).read(&mut discard) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
                if !pending.is_empty() || std::time::Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
    })?;
    Ok(refusals)
}

/// Threads blocked in `accept` on the daemon's socket, each of which serves what it
/// accepted itself: no hand-over from an accepting thread to a serving one, so a request
/// costs one wake-up less (measured on two cores: one context switch of five per request).
struct Acceptors {
    listener: UnixListener,
    refuser: std::io::Result<Sender<(UnixStream, Error)>>,
    /// Threads in `accept` now.
    idle: AtomicUsize,
}

/// Accepts until the daemon shuts down (the socket is shut down to wake every thread in
/// `accept`); the calling thread is the first acceptor and the only one that never leaves.
pub(crate) fn accept_loop(shared: &Arc<Shared>, listener: UnixListener) {
    // Idle acceptors wake this often to see whether they may leave.
    if let Err(error) = sys::set_receive_timeout(&listener, idle_connection_thread()) {
        log::warn!("cannot set the socket's accept timeout ({error}); idle connection threads stay");
    }
    let refuser = start_refuser();
    if let Err(error) = &refuser {
        log::warn!("cannot start the refuser thread ({error}); connections over the cap are closed at once");
    }
    let acceptors = Arc::new(Acceptors { listener, refuser, idle: AtomicUsize::new(0) });
    accept_and_serve(shared, &acceptors, true);
}

/// One acceptor: accepts a connection, makes sure another thread accepts while it serves
/// it, serves it, and accepts again; a thread other than the first leaves after
/// [`IDLE_CONNECTION_THREAD`] without a connection when another acceptor remains.
fn accept_and_serve(shared: &Arc<Shared>, acceptors: &Arc<Acceptors>, first: bool) {
    loop {
        acceptors.idle.fetch_add(1, Ordering::SeqCst);
        let accepted = acceptors.listener.accept();
        let others_accepting = acceptors.idle.fetch_sub(1, Ordering::SeqCst) > 1;
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if !first && others_accepting {
                    return;
                }
                continue;
            }
            // The socket was shut down: the daemon is done with connections.
            Err(_) if shared.is_shutting_down() => return,
            Err(error) => {
                log::warn!("accept failed: {error}");
                // Out of descriptors or similar: back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // Counted before the shutdown flag is looked at: the daemon, which sets the flag and
        // then waits for the count to fall to zero, either waits for this connection or
        // this thread sees the flag. While the daemon stops its instances, a client is told
        // so at once, and waits for the daemon to exit rather than for an answer.
        let open = shared.connections.fetch_add(1, Ordering::SeqCst);
        if shared.is_shutting_down() {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            refuse(acceptors, stream, Error::ShuttingDown { pid: std::process::id() });
            continue;
        }
        // Each connection holds a thread: beyond the cap, a client is told busy at once
        // instead of growing the daemon without bound, unless a connection that has sent
        // nothing gives it its place (the thread of the one hung up leaves at once).
        if open >= shared.connection_cap() {
            let message = format!("the daemon has {} connections open, its limit", shared.connection_cap());
            let busy = Error::Busy { message, retry_after_ms: 1000, per_model: false };
            shared.admission.note_rejected();
            // The one silent longest is told busy (it may only have been slow) and gives
            // this one its place.
            let farewell = protocol::encode_line(&Response::error(&busy)).unwrap_or_default();
            if shared.unheard.hang_up(Duration::ZERO, Duration::ZERO, 1, &farewell) == 0 {
                shared.connections.fetch_sub(1, Ordering::SeqCst);
                refuse(acceptors, stream, busy);
                continue;
            }
        }
        if !others_accepting {
            spawn_acceptor(shared, acceptors);
        }
        connection::serve(shared, stream);
        shared.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hands a connection to the refuser, which answers `error`; when the refuser is far
/// behind, the connection is closed at once.
fn refuse(acceptors: &Acceptors, stream: UnixStream, error: Error) {
    if let Ok(refuser) = &acceptors.refuser {
        let _ = refuser.send_timeout((stream, error), REFUSAL_PATIENCE);
    }
}

/// Starts another acceptor; when no thread can be started, this one serves its connection
/// and the next waits in the socket's backlog until it is done.
fn spawn_acceptor(shared: &Arc<Shared>, acceptors: &Arc<Acceptors>) {
    let (shared, acceptors) = (Arc::clone(shared), Arc::clone(acceptors));
    let spawned =
        thread::Builder::new().name("conn".into()).spawn(move || accept_and_serve(&shared, &acceptors, false));
    if let Err(error) = spawned {
        log::warn!("cannot start a connection thread: {error}");
    }
}
