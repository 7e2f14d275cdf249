//! Requests that change what runs: `warm`, `switch`, `stop`, `pin`, `reload`, `shutdown`,
//! and `serve`'s HTTP listener. Loads go through admission like every request.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::daemon::admission::{self, Detached};
use crate::daemon::peer::Peer;
use crate::daemon::shared::{Shared, ShutdownRequest};
use crate::daemon::work;
use crate::error::Result;
use crate::instance::{key_of, Handle, Message, Phase, Pin, Unload};
use crate::model::ModelSpec;
use crate::protocol::{ListenRequest, Response};

pub(crate) fn warm(shared: &Arc<Shared>, spec: &ModelSpec, ttl_s: Option<u64>, peer: &mut Peer) -> Result<()> {
    work::load(shared, spec, peer)?;
    if let Some(seconds) = ttl_s {
        let (instance, _) = admission::instance_for(shared, spec)?;
        instance.pin(Pin::Until(SystemTime::now() + Duration::from_secs(seconds)));
        // Said done, a pin survives the daemon's death, however soon.
        shared.save_state_for(&format!("{} is kept loaded for {seconds} s", spec.name))?;
    }
    peer.reply(&Response::Ok { message: None })
}

pub(crate) fn switch(
    shared: &Arc<Shared>,
    spec: &ModelSpec,
    wait: bool,
    exclusive: bool,
    peer: &mut Peer,
) -> Result<()> {
    let (instance, _) = admission::instance_for(shared, spec)?;
    let epoch = if exclusive {
        let mut latest = shared.exclusive_epoch.lock();
        *latest += 1;
        *latest
    } else {
        0
    };
    if !wait {
        // The caller detaches; this thread goes on loading for the daemon.
        let _ = peer.send(&Response::Ok { message: Some(format!("loading {}", spec.name)) });
    }
    let loaded = if wait { work::load(shared, spec, peer) } else { work::load(shared, spec, &mut Detached) };
    if loaded.is_ok() && exclusive {
        let others: Vec<Arc<Handle>> =
            shared.table.all().into_iter().filter(|other| !Arc::ptr_eq(other, &instance)).collect();
        // The latest exclusive switch wins: an earlier one that finishes loading after a
        // later one began leaves the others alone rather than unloading the winner.
        let waiting = {
            let latest = shared.exclusive_epoch.lock();
            if *latest == epoch {
                send_unloads(shared, &others, Unload::Exclusive, |name| {
                    format!("{name} was unloaded by `llmctl switch --exclusive {}`", spec.name)
                })
            } else {
                log::info!("switch --exclusive {} was overtaken by a later one", spec.name);
                Vec::new()
            }
        };
        for stopped in waiting {
            let _ = stopped.recv();
        }
    }
    match (loaded, wait) {
        (Ok(()), true) => peer.reply(&Response::Ok { message: None }),
        (Err(error), true) => Err(error),
        (Ok(()), false) => Ok(()),
        (Err(error), false) => {
            log::warn!("background load of {} failed: {error}", spec.name);
            Ok(())
        }
    }
}

/// Stops the instances of `model` (its alias's own instance, or every instance of a file
/// named by path), or every instance. Requests in flight and waiting are told who stopped
/// them. With `forget`, the saved prompt caches of the file (or all of them) are dropped,
/// and the stop saves none.
pub(crate) fn stop(shared: &Arc<Shared>, model: Option<&ModelSpec>, forget: bool, peer: &mut Peer) -> Result<()> {
    let caches = &shared.services.caches;
    let forgotten_path = model.map(|spec| spec.path.as_path());
    let suppressed = forget.then(|| caches.suppress(forgotten_path));
    let targets: Vec<Arc<Handle>> = match model {
        Some(spec) => {
            let key = key_of(spec);
            shared
                .table
                .all()
                .into_iter()
                .filter(|instance| {
                    instance.with_view(|view| {
                        key_of(&view.spec) == key || (view.spec.path == spec.path && view.spec.name == spec.name)
                    })
                })
                .collect()
        }
        None => shared.table.all(),
    };
    let stopped =
        unload_and_wait(shared, &targets, Unload::Stop, |name| format!("{name} was stopped by `llmctl stop`"));
    let mut message = format!("stopped {stopped} instance{}", if stopped == 1 { "" } else { "s" });
    if forget {
        let (count, bytes) = caches.forget(forgotten_path);
        drop(suppressed);
        message += &format!(
            ", dropped {count} saved prompt cache{} ({})",
            if count == 1 { "" } else { "s" },
            crate::budget::human(bytes)
        );
    }
    peer.reply(&Response::Ok { message: Some(message) })
}

pub(crate) fn pin(shared: &Arc<Shared>, spec: &ModelSpec, pinned: bool, peer: &mut Peer) -> Result<()> {
    let (instance, _) = admission::instance_for(shared, spec)?;
    instance.pin(Pin::Set(pinned));
    if !pinned {
        // A pin set under load options the config no longer gives stays on that instance,
        // which no command names any more: unpinning the model clears it too.
        for other in shared.table.all() {
            let same_model = other.with_view(|view| {
                view.pinned_by_command && (view.spec.name == spec.name || view.spec.path == spec.path)
            });
            if same_model && !Arc::ptr_eq(&other, &instance) {
                other.pin(Pin::Set(false));
            }
        }
    }
    // Said done, the change survives the daemon's death, however soon.
    shared.save_state_for(&format!("{} is {}", spec.name, if pinned { "pinned" } else { "unpinned" }))?;
    peer.reply(&Response::Ok { message: None })
}

pub(crate) fn reload(shared: &Arc<Shared>, peer: &mut Peer) -> Result<()> {
    let message = shared.reload()?;
    peer.reply(&Response::Ok { message: Some(message) })
}

pub(crate) fn shutdown(shared: &Arc<Shared>, peer: &mut Peer) -> Result<()> {
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let _ = shared.shutdown.send(ShutdownRequest::Client(done_tx));
    let _ = done_rx.recv();
    peer.reply(&Response::Ok { message: None })
}

/// `llmctl serve`: opens an HTTP listener in the daemon, tells the client where, then sends
/// it the access log until the client goes away, which closes the listener (and nothing
/// else: requests in flight finish).
pub(crate) fn listen(shared: &Arc<Shared>, request: ListenRequest, peer: &mut Peer) -> Result<()> {
    let owner = peer.writer.get_ref().try_clone().ok();
    let listener = crate::daemon::serve::open(shared, &request.address, request.api_key, owner)?;
    peer.reply(&Response::Listening { address: listener.address().to_string() })?;
    let log = listener.log();
    loop {
        match log.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if peer.send(&Response::Log { line }).is_err() {
                    break;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if peer.gone() || shared.is_shutting_down() {
                    break;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
    }
    shared.listeners.close(&listener);
    Ok(())
}

/// Asks each instance to unload for `why` and waits until every one has stopped. Returns how
/// many had something loaded or loading.
pub(crate) fn unload_and_wait(
    shared: &Shared,
    instances: &[Arc<Handle>],
    why: Unload,
    message: impl Fn(&str) -> String,
) -> usize {
    let active = instances
        .iter()
        .filter(|instance| instance.with_view(|view| view.phase.holds_room() || view.phase == Phase::WaitingRoom))
        .count();
    // A worker answers once its child is gone; one that ends drops the sender instead.
    for stopped in send_unloads(shared, instances, why, message) {
        let _ = stopped.recv();
    }
    active
}

/// Asks each instance to unload for `why`, now; returns where each says it has stopped.
fn send_unloads(
    shared: &Shared,
    instances: &[Arc<Handle>],
    why: Unload,
    message: impl Fn(&str) -> String,
) -> Vec<crossbeam_channel::Receiver<()>> {
    let cutoff = shared.last_job();
    let mut waiting = Vec::new();
    for instance in instances {
        let name = instance.with_view(|view| view.spec.name.clone());
        let (done, stopped) = crossbeam_channel::bounded(1);
        if instance.send(Message::Unload { why, cutoff, room: None, message: message(&name), done: Some(done) }) {
            waiting.push(stopped);
        }
    }
    waiting
}
