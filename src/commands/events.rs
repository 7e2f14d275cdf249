//! `llmctl events`: the daemon's state changes as JSON lines, live, until the daemon stops
//! or the reader goes away. `llmctl metrics`: the daemon's counters for Prometheus.

use std::io::{self, Write};

use crate::client;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::protocol::{Request, Response};

pub(crate) fn events(context: &Context) -> Result<()> {
    let mut connection = client::connect(context)?;
    connection.call(&Request::Events)?;
    // Subscribed: events come when they come.
    connection.set_reply_timeout(None)?;
    let mut out = io::stdout().lock();
    loop {
        let event = match connection.recv() {
            Ok(Response::Event(event)) => event,
            Ok(Response::Error { kind, message, .. }) => return Err(Error::FromDaemon { kind, message }),
            Ok(other) => return Err(Error::internal(format!("unexpected message from the daemon: {other:?}"))),
            // The daemon shut down: the stream is over.
            Err(_) => return Ok(()),
        };
        let mut line = serde_json::to_string(&event).map_err(|e| Error::internal(e.to_string()))?;
        line.push('\n');
        match out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(Error::io("cannot write to stdout", e)),
        }
    }
}

pub(crate) fn metrics(context: &Context) -> Result<()> {
    let mut connection = client::connect(context)?;
    let Response::Metrics { text } = connection.call(&Request::Metrics)? else {
        return Err(Error::internal("the daemon answered metrics with something else"));
    };
    match io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Error::io("cannot write to stdout", e)),
        _ => Ok(()),
    }
}
