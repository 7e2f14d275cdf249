//! `llmctl serve [--listen ADDR]`: asks the daemon (starting it if needed) to serve
//! llama-server's HTTP API on ADDR, then stays in the foreground printing the URL and the
//! access log. Ctrl-C or SIGTERM closes the listener, and nothing else: the daemon, its
//! models and requests in flight stay. The daemon does the serving itself, so one llmctl
//! process stands between an HTTP client and a model (see `daemon::serve`).

use std::io::Write;

use crate::cli::ServeArgs;
use crate::client::{self, interrupt};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::protocol::{ListenRequest, Request, Response};

pub(crate) fn run(context: &Context, args: ServeArgs) -> Result<()> {
    let api_key = match &args.api_key_file {
        Some(path) => Some(
            crate::paths::read_key_file(path)
                .map_err(|e| Error::io(format!("cannot read the API key file {}", path.display()), e))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("LLMCTL_API_KEY").ok().filter(|key| !key.is_empty()),
    };
    if api_key.as_deref() == Some("") {
        return Err(Error::Usage { message: "the API key file is empty".into() });
    }
    // A bad address, and a bad config, are refused before any daemon is started or asked.
    crate::daemon::serve::listen_address(&args.listen, api_key.as_deref())?;
    context.config()?;
    crate::setup::on_first_use(context, None)?;
    let mut connection = client::connect(context)?;
    // The log arrives as requests come; the daemon checks every 200 ms that we are here.
    connection.set_reply_timeout(None)?;
    let _watch = interrupt::Watch::socket(connection.raw_fd())?;
    connection.send(&Request::Listen(ListenRequest { address: args.listen.clone(), api_key }))?;
    let address = match connection.recv() {
        Ok(Response::Listening { address }) => address,
        Ok(Response::Error { kind, message, .. }) => return Err(Error::FromDaemon { kind, message }),
        Ok(other) => return Err(Error::internal(format!("the daemon answered serve with {other:?}"))),
        Err(_) if interrupt::interrupted() => return Ok(()),
        Err(error) => return Err(error),
    };
    eprintln!("llmctl: serving llama-server's API on http://{address} (OpenAI-compatible under /v1)");
    let mut stderr = std::io::stderr();
    loop {
        match connection.recv() {
            Ok(Response::Log { line }) => {
                let _ = writeln!(stderr, "{line}");
            }
            Ok(_) => {}
            // Ctrl-C or SIGTERM shut the connection: the daemon closes the listener.
            Err(_) if interrupt::interrupted() => return Ok(()),
            Err(_) => {
                return Err(Error::DaemonUnavailable {
                    socket: context.paths.socket.clone(),
                    reason: "the daemon stopped serving (it shut down)".into(),
                })
            }
        }
    }
}
