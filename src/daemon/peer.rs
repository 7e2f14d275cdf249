//! The client end of a Unix-socket connection as a handler sees it: where to write, and
//! how to tell it left. It is the admission layer's waiter for requests from this socket.

use std::io::{BufWriter, Write};
use std::os::unix::net::UnixStream;

use super::admission::Waiter;
use crate::error::{Error, Result};
use crate::protocol::{self, Response};
use crate::sys;

/// The client end as a handler sees it: where to write, and how to tell it left.
pub(crate) struct Peer {
    pub(crate) writer: BufWriter<UnixStream>,
}

impl Peer {
    pub(crate) fn new(writer: BufWriter<UnixStream>) -> Peer {
        Peer { writer }
    }

    /// Writes one message and flushes it.
    pub(crate) fn send(&mut self, response: &Response) -> std::io::Result<()> {
        protocol::write_message(&mut self.writer, response)?;
        self.writer.flush()
    }

    /// Writes the final answer; a client that left cannot hear it, which is no error.
    pub(crate) fn reply(&mut self, response: &Response) -> Result<()> {
        self.send(response).map_err(|e| Error::io("cannot reply to the client", e))
    }

    /// True once the client has closed its end.
    pub(crate) fn gone(&self) -> bool {
        sys::peer_closed(self.writer.get_ref())
    }
}

impl Waiter for Peer {
    fn loading(&mut self, model: &str) {
        let _ = self.send(&Response::Loading { model: model.to_string(), position: None, eta_ms: None });
    }

    fn waiting(&mut self, model: &str, position: usize, eta_ms: u64) {
        let _ =
            self.send(&Response::Loading { model: model.to_string(), position: Some(position), eta_ms: Some(eta_ms) });
    }

    fn queued(&mut self, position: usize) {
        let _ = self.send(&Response::Queued { position });
    }

    fn gone(&self) -> bool {
        Peer::gone(self)
    }
}
