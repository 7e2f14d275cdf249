//! The one loop that reads a generation from the daemon as it comes, for `run` and `chat`:
//! progress (loading, a place in line) to a [`Sink`]'s `progress`, each piece of text to its
//! `token` (with whether more is already buffered, so output may be flushed less often),
//! and the final `done` or error. A sink that fails to write (its reader went away) ends
//! the loop; dropping the connection then makes the daemon cancel the request upstream.

use std::io;

use super::Connection;
use crate::error::{Error, Result};
use crate::protocol::{Done, Request, Response};

/// What a waiting request hears before its first token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The model loads for this request; while its load waits for room, its place in line
    /// and the estimated wait.
    Loading {
        model: String,
        position: Option<usize>,
        eta_ms: Option<u64>,
    },
    Queued {
        position: usize,
    },
}

/// Where a generation goes.
pub(crate) trait Sink {
    fn progress(&mut self, progress: Progress);
    /// A piece of text; `more` is true when more is already buffered.
    fn token(&mut self, text: &str, more: bool) -> io::Result<()>;
}

/// How a generation ended on the client's side.
#[derive(Debug)]
pub(crate) enum Ended {
    Done(Done),
    /// The sink could not write (its reader went away): not a failure.
    SinkClosed(io::Error),
}

/// Sends `request` and feeds what comes back to `sink` until the generation ends.
pub(crate) fn generate(connection: &mut Connection, request: &Request, sink: &mut dyn Sink) -> Result<Ended> {
    connection.send(request)?;
    loop {
        let response = connection.recv()?;
        match response {
            Response::Loading { model, position, eta_ms } => {
                sink.progress(Progress::Loading { model, position, eta_ms })
            }
            Response::Queued { position } => sink.progress(Progress::Queued { position }),
            Response::Token { text } => {
                if let Err(error) = sink.token(&text, connection.has_buffered()) {
                    return Ok(Ended::SinkClosed(error));
                }
            }
            Response::Done(done) => return Ok(Ended::Done(done)),
            Response::Error { kind, message, .. } => return Err(Error::FromDaemon { kind, message }),
            other => return Err(Error::internal(format!("unexpected message from the daemon: {other:?}"))),
        }
    }
}
