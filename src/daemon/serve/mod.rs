//! `llmctl serve`: llama-server's HTTP API for every model llmctl knows, hosted by the
//! daemon itself, so one llmctl process stands between an HTTP client and a child, as in
//! llama-server's own router mode.
//!
//! A listener opens when `llmctl serve` asks (it closes when that client goes away) or, for
//! the config's `listen` addresses, with the daemon. Each is an `http` server of its own
//! (its limits, its threads started as connections need them) whose handler is
//! [`routes::handle`]. It forwards, it does not translate: a request goes to the model's
//! llama-server (or remote server) under the same admission, budget and accounting as
//! `run`, and the answer comes back as it is produced. The one exception is Ollama's API
//! ([`ollama`]), which llama-server does not speak: those requests become llama-server's
//! OpenAI requests, and the answers become Ollama's, on the same path through admission.
//! Listening beyond loopback needs an API key, compared in constant time.

pub(crate) mod embeddings;
pub(crate) mod models;
pub(crate) mod ollama;
pub(crate) mod routes;

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::listeners::{Listener, LOG_BACKLOG};
use super::shared::Shared;
use crate::error::{Error, Result};
use crate::http;

/// The socket address `address` (`HOST:PORT`) names, if it may be listened on with
/// `api_key`: beyond loopback a key is required. `serve` asks this before it starts or
/// reaches a daemon, and the daemon again for whoever asks it to listen.
pub(crate) fn listen_address(address: &str, api_key: Option<&str>) -> Result<SocketAddr> {
    let wanted: SocketAddr =
        address.to_socket_addrs().ok().and_then(|mut addresses| addresses.next()).ok_or_else(|| Error::Usage {
            message: format!("cannot use `{address}` as an address to listen on (HOST:PORT, e.g. 127.0.0.1:8080)"),
        })?;
    if api_key == Some("") {
        return Err(Error::Usage { message: "the API key is empty".into() });
    }
    if !wanted.ip().is_loopback() && api_key.is_none() {
        return Err(Error::Usage {
            message: format!(
                "listening on {wanted} reaches beyond this machine; give an API key with --api-key-file or \
                 LLMCTL_API_KEY"
            ),
        });
    }
    Ok(wanted)
}

/// Opens an HTTP listener on `address` (see [`listen_address`]). An address the daemon
/// already listens on, or one another program holds, is refused with a message that says
/// which; one held by a listener whose `serve` has gone is taken over. `owner` is the
/// connection of the `serve` asking, if one is.
pub(crate) fn open(
    shared: &Arc<Shared>,
    address: &str,
    api_key: Option<String>,
    owner: Option<UnixStream>,
) -> Result<Arc<Listener>> {
    let wanted = listen_address(address, api_key.as_deref())?;
    shared.refuse_if_shutting_down()?;
    let mut open = shared.listeners.open.lock();
    let collides = |listener: &Arc<Listener>| listener.address == wanted || same_port_any(listener.address, wanted);
    // A `serve` killed a moment ago: its handler notices within a poll, but the address
    // is free to take now.
    let mut took_over = false;
    open.retain(|listener| {
        let stale = collides(listener) && listener.abandoned();
        if stale {
            listener.stop();
            took_over = true;
        }
        !stale
    });
    if let Some(existing) = open.iter().find(|listener| collides(listener)) {
        return Err(Error::AddressInUse {
            address: wanted.to_string(),
            by: format!("this llmctl daemon (pid {}) already serves http://{}", std::process::id(), existing.address),
        });
    }
    let listener = bind(wanted, took_over).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => Error::AddressInUse {
            address: wanted.to_string(),
            by: "another program listens there; choose another port with --listen".into(),
        },
        _ => Error::io(format!("cannot listen on {wanted}"), e),
    })?;
    let bound = listener.local_addr().unwrap_or(wanted);
    let (log, log_rx) = crossbeam_channel::bounded(LOG_BACKLOG);
    let stopping = Arc::new(AtomicBool::new(false));
    let entry = Arc::new(Listener {
        address: bound,
        api_key,
        stopping: Arc::clone(&stopping),
        fd: listener.as_raw_fd(),
        log,
        log_rx,
        owner,
    });
    let handler_shared = Arc::downgrade(shared);
    let handler_listener = Arc::downgrade(&entry);
    let handler: http::Handler = Arc::new(move |request, exchange| {
        if let (Some(shared), Some(listener)) = (handler_shared.upgrade(), handler_listener.upgrade()) {
            routes::handle(&shared, &listener, request, exchange);
        } else {
            exchange.error(503, "the server is shutting down", &[]);
        }
    });
    std::thread::Builder::new()
        .name("http-listener".into())
        .spawn(move || {
            if let Err(error) = http::serve(listener, http::Limits::default(), handler, stopping) {
                log::error!("the HTTP listener on {bound} failed: {error}");
            }
        })
        .map_err(|e| Error::io("cannot start the HTTP listener thread", e))?;
    log::info!("serving llama-server's API on http://{bound}");
    open.push(Arc::clone(&entry));
    Ok(entry)
}

/// Binds `address`; after taking one over, waits a moment for the old listener's thread
/// to let its socket go.
fn bind(address: SocketAddr, took_over: bool) -> std::io::Result<TcpListener> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match TcpListener::bind(address) {
            Err(error)
                if took_over
                    && error.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            result => return result,
        }
    }
}

/// A wildcard address and a specific one on the same port collide on bind.
fn same_port_any(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && b.port() != 0 && (a.ip().is_unspecified() || b.ip().is_unspecified())
}
