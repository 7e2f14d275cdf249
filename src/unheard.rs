//! Connections waiting for a request, oldest first, for the servers that hold a thread per
//! connection (the daemon's Unix socket, `serve`'s HTTP): when every place is taken, silent
//! ones are hung up to make room. Connections opened and left silent (a client library's
//! idle pool, a slow or hostile program) would otherwise hold every thread until their read
//! timeouts close them, and lock `status`, `stop` or a real request out meanwhile. A real
//! client sends its request as it connects; one whose bytes are there to read is never hung
//! up. An HTTP client whose idle kept-alive connection is closed opens another, as it does
//! when any server closes one (nginx closes idle kept-alive connections the same way when
//! it runs out of connections).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Default)]
pub(crate) struct Unheard {
    next: AtomicU64,
    /// By arrival. A descriptor is in here only while its connection holds it open: the
    /// connection takes it out (under this lock) before it can close it, so the descriptor
    /// hung up is never one already reused.
    waiting: Mutex<BTreeMap<u64, (Instant, RawFd)>>,
}

impl Unheard {
    /// Notes `socket` as waiting for a request until the guard is dropped, which must be
    /// before the socket is closed.
    pub(crate) fn enter(&self, socket: &impl AsRawFd) -> Hearing<'_> {
        Hearing { unheard: self, id: self.note(socket) }
    }

    /// Notes `socket` as waiting for a request, for a connection that waits elsewhere
    /// before a thread reads it: [`Unheard::resume`] with the number returned, or
    /// [`Unheard::forget`] it, before the socket is closed.
    pub(crate) fn note(&self, socket: &impl AsRawFd) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.waiting.lock().insert(id, (Instant::now(), socket.as_raw_fd()));
        id
    }

    /// The guard of a connection noted with [`Unheard::note`] (hung up meanwhile or not).
    pub(crate) fn resume(&self, id: u64) -> Hearing<'_> {
        Hearing { unheard: self, id }
    }

    /// Takes the connection out; false when it had been hung up.
    pub(crate) fn forget(&self, id: u64) -> bool {
        self.waiting.lock().remove(&id).is_some()
    }

    /// Hangs up, oldest first, at most `at_most` connections that have nothing to read
    /// and have waited `silent_for` or longer, and with them every other silent one that
    /// has waited `floor` or longer; returns how many. (Two connections silent for about
    /// as long are hung up together, not one now and the other, a moment too young, left
    /// holding the thread the next request needs.) Each is sent `farewell` first if it
    /// will take it without waiting (a client that was only slow reads why it was
    /// refused); its read ends at once, and its thread goes on to the next connection.
    pub(crate) fn hang_up(&self, silent_for: Duration, floor: Duration, at_most: usize, farewell: &[u8]) -> usize {
        let mut waiting = self.waiting.lock();
        let now = Instant::now();
        let silent = |(id, (since, fd)): (&u64, &(Instant, RawFd)), age: Duration| {
            (now.duration_since(*since) >= age && !crate::sys::readable(*fd)).then_some(*id)
        };
        if !waiting.iter().any(|entry| silent(entry, silent_for).is_some()) {
            return 0;
        }
        let chosen: Vec<u64> =
            waiting.iter().filter_map(|entry| silent(entry, floor.min(silent_for))).take(at_most).collect();
        for id in &chosen {
            if let Some((_, fd)) = waiting.remove(id) {
                crate::sys::send_without_waiting(fd, farewell);
                crate::sys::shutdown_socket(fd);
            }
        }
        chosen.len()
    }
}

/// A connection waiting for its request; see [`Unheard`].
pub(crate) struct Hearing<'a> {
    unheard: &'a Unheard,
    id: u64,
}

impl Hearing<'_> {
    /// The request is read: the connection is no longer silent. False when it was hung
    /// up meanwhile (told it was refused, perhaps with the request already read): then
    /// the request must not be served.
    pub(crate) fn heard(self) -> bool {
        let kept = self.unheard.forget(self.id);
        std::mem::forget(self);
        kept
    }
}

impl Drop for Hearing<'_> {
    fn drop(&mut self) {
        self.unheard.forget(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn silent_connections_are_hung_up_oldest_first_and_one_that_spoke_never() {
        let unheard = Unheard::default();
        let pairs: Vec<(UnixStream, UnixStream)> = (0..4).map(|_| UnixStream::pair().unwrap()).collect();
        let hearings: Vec<_> = pairs.iter().map(|(server, _)| unheard.enter(server)).collect();
        let mut hearings = hearings.into_iter();
        drop(hearings.next()); // the oldest has had its request read
        (&pairs[2].1).write_all(b"{").unwrap(); // this one is sending its request
        let ended = |socket: &UnixStream| {
            socket.set_nonblocking(true).unwrap();
            matches!((&mut &*socket).read(&mut [0u8; 1]), Ok(0))
        };
        assert_eq!(
            unheard.hang_up(Duration::from_secs(3600), Duration::ZERO, 8, b""),
            0,
            "none has been silent that long"
        );
        assert_eq!(unheard.hang_up(Duration::ZERO, Duration::ZERO, 1, b"busy\n"), 1);
        assert!(!ended(&pairs[0].0), "a connection whose request was read was hung up");
        assert!(ended(&pairs[1].0), "the oldest silent connection is still open");
        let mut told = String::new();
        (&pairs[1].1).read_to_string(&mut told).unwrap();
        assert_eq!(told, "busy\n", "the client hung up is told why");
        assert!(!ended(&pairs[3].0), "a newer one went first");
        assert_eq!(unheard.hang_up(Duration::ZERO, Duration::ZERO, 8, b""), 1, "the one sending its request stays");
        assert!(ended(&pairs[3].0));
        assert!(!ended(&pairs[2].0));
        drop(hearings);
    }
}
