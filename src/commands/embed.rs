//! `llmctl embed MODEL [TEXT]...`: the embedding of each text, or of each line of stdin when
//! no TEXT is given, as one JSON line per input on stdout, `{"index":N,"embedding":[...]}`,
//! in the order of the inputs.
//!
//! The daemon runs the model on an instance of its own started with `--embeddings` (a load
//! option, as for `serve`'s embedding routes), so a chat instance of the same file is left
//! alone. Inputs are checked before anything is sent: an empty one is refused (65). Exit
//! statuses are those of `run`: a reader of stdout that goes away is success, Ctrl-C is 130.

use std::io::{self, BufWriter, IsTerminal, Read, Write};

use serde::Serialize;

use crate::cli::EmbedArgs;
use crate::client::{self, interrupt, Connection};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::protocol::{Request, Response};

pub(crate) fn run(context: &Context, args: EmbedArgs) -> Result<()> {
    // What the user typed is checked before a first use sets anything up.
    let mut model = crate::setup::resolve_on_first_use(context, &args.model, &args.load.overrides())?;
    model.load.embeddings = true;
    let inputs = if args.text.is_empty() {
        let stdin = io::stdin();
        if stdin.is_terminal() {
            return Err(Error::Usage {
                message: "no text: give it as arguments or pipe lines on stdin (llmctl embed MODEL \"text\")".into(),
            });
        }
        read_lines(stdin)?
    } else {
        args.text.clone()
    };
    check_inputs(&inputs, args.text.is_empty())?;
    let mut connection = client::connect_for(context, &model, crate::client::AtCap::Refuse)?;
    connection.set_reply_timeout(Some(context.generation_timeout()))?;
    let _watch = interrupt::Watch::socket(connection.raw_fd())?;
    match print_vectors(&mut connection, &Request::Embed { model, inputs }) {
        Err(_) if interrupt::interrupted() => Err(Error::Interrupted),
        other => other,
    }
}

/// Refuses what cannot be embedded, naming it: no input at all, or an empty one.
fn check_inputs(inputs: &[String], from_stdin: bool) -> Result<()> {
    if inputs.is_empty() {
        return Err(Error::Usage { message: "stdin has no lines to embed".into() });
    }
    if let Some(index) = inputs.iter().position(|text| text.trim().is_empty()) {
        let what = if from_stdin { format!("line {} of stdin", index + 1) } else { format!("TEXT {}", index + 1) };
        return Err(Error::InvalidParameter { message: format!("{what} is empty; every input needs some text") });
    }
    Ok(())
}

/// The lines of stdin, at most what one request can carry.
fn read_lines(stdin: io::Stdin) -> Result<Vec<String>> {
    let limit = crate::protocol::MAX_LINE as u64;
    let mut bytes = Vec::new();
    stdin.lock().take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io("cannot read stdin", e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::InvalidParameter {
            message: format!("stdin is over the {} MiB a request can carry; embed it in parts", limit >> 20),
        });
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::InvalidParameter { message: "stdin is not valid UTF-8 text".into() })?;
    Ok(text.lines().map(str::to_string).collect())
}

/// One line of output, `index` first.
#[derive(Serialize)]
struct VectorLine<'a> {
    index: usize,
    embedding: &'a [f64],
}

/// Sends `request` and prints each vector as it comes.
fn print_vectors(connection: &mut Connection, request: &Request) -> Result<()> {
    connection.send(request)?;
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    loop {
        let written = match connection.recv()? {
            Response::Loading { .. } | Response::Queued { .. } => Ok(()),
            Response::Embedding { index, embedding } => {
                serde_json::to_writer(&mut out, &VectorLine { index, embedding: &embedding })
                    .map_err(io::Error::other)
                    .and_then(|()| out.write_all(b"\n"))
            }
            Response::Done(_) => {
                return match out.flush() {
                    // The reader of stdout went away: that is its choice, not a failure.
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                    Err(e) => Err(Error::io("cannot write to stdout", e)),
                    Ok(()) => Ok(()),
                };
            }
            Response::Error { kind, message, .. } => return Err(Error::FromDaemon { kind, message }),
            other => return Err(Error::internal(format!("unexpected message from the daemon: {other:?}"))),
        };
        match written {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(Error::io("cannot write to stdout", e)),
            Ok(()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_inputs_are_refused_by_position() {
        assert!(check_inputs(&["a".into(), "b".into()], false).is_ok());
        let error = check_inputs(&["a".into(), " ".into()], true).unwrap_err();
        assert_eq!(error.exit_code(), 65);
        assert!(error.to_string().contains("line 2 of stdin is empty"), "{error}");
        assert!(check_inputs(&["".into()], false).unwrap_err().to_string().contains("TEXT 1"));
        assert_eq!(check_inputs(&[], true).unwrap_err().exit_code(), 2);
    }
}
