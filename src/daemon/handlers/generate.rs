//! `llmctl run` and `chat`: one generation streamed to the client as token messages; and
//! `llmctl embed`: the vectors of its inputs, one message each.

use std::sync::Arc;

use crate::daemon::admission::Waiter;
use crate::daemon::peer::Peer;
use crate::daemon::shared::Shared;
use crate::daemon::work::{self, Attempt};
use crate::error::Result;
use crate::model::ModelSpec;
use crate::protocol::{self, Response, RunRequest};

pub(crate) fn run(shared: &Arc<Shared>, request: RunRequest, peer: &mut Peer) -> Result<()> {
    let spec = request.model.clone();
    // The lease's waiter and the stream both write to the client, one after the other.
    let peer_cell = std::cell::RefCell::new(peer);
    let done = work::on_lease(shared, &spec, &mut WaiterOf(&peer_cell), |lease, started| {
        // A fault hook for the test suite: a handler that panics while it holds a slot.
        #[cfg(feature = "testing")]
        if request.prompt == "__llmctl_test_panic__" {
            panic!("fault injected by the test suite");
        }
        let mut first_token = None;
        let mut peer = peer_cell.borrow_mut();
        // A client that leaves before the first token (a long prompt, a place waited for
        // inside the child) gives the slot back at once, not when a token would fail to
        // reach it: llama-server stops when the connection to it closes.
        let cancel = Some(client_gone_check(peer.writer.get_ref()));
        let result = crate::backend::unix::with_cancel(cancel, || {
            lease.client.generate(&request, |text, more_buffered| {
                if !lease.generation.relay_token() {
                    // `stop` or `shutdown`: cut the stream off now, even if the child ignores SIGTERM.
                    return Err(std::io::Error::other("the instance was stopped"));
                }
                first_token.get_or_insert_with(|| started.elapsed());
                protocol::write_message(&mut peer.writer, &Response::Token { text: text.to_string() })?;
                if !more_buffered {
                    std::io::Write::flush(&mut peer.writer)?;
                }
                Ok(())
            })
        });
        Attempt { result, answered: first_token.is_some(), ok: Some("ok"), first_token }
    })?;
    let mut peer = peer_cell.borrow_mut();
    peer.reply(&Response::Done(done))
}

/// `llmctl embed`: the inputs go to the model's embeddings instance (a load option, as for
/// `serve`'s embedding routes, so a chat instance of the same file is left alone), and each
/// vector comes back as a message of its own, so that no one line holds them all.
pub(crate) fn embed(shared: &Arc<Shared>, spec: &ModelSpec, inputs: &[String], peer: &mut Peer) -> Result<()> {
    let cancel = client_gone_check(peer.writer.get_ref());
    let embedded = crate::daemon::serve::embeddings::embed(shared, spec, inputs, true, peer, Some(cancel))?;
    for (index, embedding) in embedded.vectors.into_iter().enumerate() {
        peer.send(&Response::Embedding { index, embedding })
            .map_err(|e| crate::error::Error::io("cannot reply to the client", e))?;
    }
    peer.reply(&Response::Done(embedded.done))
}

/// A check, asked while an answer from the model is awaited, that the client on `socket`
/// has hung up. It holds the descriptor's number only: it is asked while the request is
/// served, and the socket is the connection's, open until then.
fn client_gone_check(socket: &std::os::unix::net::UnixStream) -> crate::backend::unix::Cancel {
    let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
    Arc::new(move || crate::sys::fd_peer_closed(fd))
}

/// The client as the admission layer's waiter, shared with the stream that follows.
struct WaiterOf<'a, 'b>(&'a std::cell::RefCell<&'b mut Peer>);

impl Waiter for WaiterOf<'_, '_> {
    fn loading(&mut self, model: &str) {
        self.0.borrow_mut().loading(model);
    }

    fn queued(&mut self, position: usize) {
        self.0.borrow_mut().queued(position);
    }

    fn waiting(&mut self, model: &str, position: usize, eta_ms: u64) {
        self.0.borrow_mut().waiting(model, position, eta_ms);
    }

    fn gone(&self) -> bool {
        self.0.borrow().gone()
    }
}
