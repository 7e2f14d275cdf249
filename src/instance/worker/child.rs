//! The worker's child: spawning it (or connecting a remote model), polling its load,
//! noticing it died, and stopping it with its grace period and a reap.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

use super::{Worker, EXIT_PATIENCE};
use crate::backend::client::Client;
use crate::backend::local::{self, Listen, OutputTail};
use crate::error::Error;
use crate::events::EventKind;
use crate::instance::lease::{Ended, Generation};
use crate::instance::state::{Event, Phase, Unload};
use crate::instance::Message;
use crate::process::{self, ChildGroup};

/// A running child and the thread draining its output.
pub(super) struct Running {
    pub(super) child: ChildGroup,
    pub(super) drain: Option<JoinHandle<()>>,
    /// Closed when the drain thread ends.
    pub(super) drained: Receiver<()>,
    pub(super) tail: Arc<OutputTail>,
    /// The Unix socket it listens on, removed once it is gone.
    pub(super) socket: Option<PathBuf>,
}

impl Running {
    /// After the child is reaped: its output drained (for a moment at most: a helper it left
    /// could hold the pipe), its socket file gone.
    pub(super) fn cleanup(&mut self) {
        if let Some(drain) = self.drain.take() {
            match self.drained.recv_timeout(DRAIN_PATIENCE) {
                Err(RecvTimeoutError::Timeout) => {
                    log::warn!("llama-server pid {}'s output is still held open; not waiting for it", self.child.pid())
                }
                _ => {
                    let _ = drain.join();
                }
            }
        }
        if let Some(socket) = self.socket.take() {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// A load in progress: waiting for the port in the child's log (TCP), then for `/health`.
pub(super) struct Loading {
    pub(super) started: Instant,
    pub(super) port: Receiver<u16>,
    /// The key a TCP child wants.
    pub(super) api_key: Option<String>,
    pub(super) client: Option<Client>,
}

/// The longest a stop waits for a child's output to be drained once the child is gone.
const DRAIN_PATIENCE: Duration = Duration::from_secs(2);

impl Worker {
    pub(super) fn spawn(&mut self) -> Option<Event> {
        // The machine counts spawns; the child's generation is that count.
        let slots = if self.spec.remote.is_some() { u32::MAX } else { self.spec.load.parallel };
        let generation = Arc::new(Generation::new(self.machine.generation(), slots));
        self.generation = Some(Arc::clone(&generation));
        self.restore_retried = false;
        if self.failure.is_some() {
            self.home.stats.lock().restarts += 1;
        }
        self.failure = None;
        self.publish(EventKind::Loading, None, None);
        if let Some(remote) = self.spec.remote.clone() {
            let started = Instant::now();
            return Some(match self.connect_remote(&remote) {
                Ok(()) => {
                    self.became_ready(started);
                    Event::Loaded
                }
                Err(error) => {
                    self.load_failed(error);
                    Event::LoadFailed
                }
            });
        }
        match self.spawn_child(generation.number) {
            Ok(loading) => {
                self.loading = Some(loading);
                None
            }
            Err(error) => {
                self.load_failed(error);
                Some(Event::LoadFailed)
            }
        }
    }

    pub(super) fn spawn_child(&mut self, generation: u64) -> Result<Loading, Error> {
        let binary = (self.services.llama_server)().map_err(|searched| Error::NoLlamaServer { searched })?;
        let listen = self.listen(generation)?;
        let mut command = local::command(&binary, &self.spec, &self.info, &listen);
        self.cache_identity = self.services.caches.identity_for(&self.spec, self.stamp, &binary);
        if self.cache_identity.is_some() {
            command.arg("--slot-save-path").arg(self.services.caches.dir());
        }
        command.env(process::MARK_VARIABLE, format!("{}-{}-{generation}", self.services.mark_prefix, self.id));
        // The directory may have been removed under a running daemon: make it again.
        let _ = crate::paths::create_private_dirs(&self.services.log_dir);
        let log_path = self.services.log_dir.join(self.spec.log_file_name());
        let (inbox, listening_inbox) = (self.home.inbox.clone(), self.home.inbox.clone());
        let on_listening = move || {
            let _ = listening_inbox.send(Message::Listening { generation });
        };
        let (drained_tx, drained) = crossbeam_channel::bounded::<()>(0);
        let on_close = move || {
            drop(drained_tx);
            let _ = inbox.send(Message::OutputClosed { generation });
        };
        let capture = local::capture_output(&mut command, &log_path, on_listening, on_close).map_err(|e| {
            Error::io(format!("cannot capture the output of llama-server in {}", log_path.display()), e)
        })?;
        // `command` (and the pipe's write ends in it) goes with the spawn; only the child
        // holds them afterwards.
        let child = match self.services.launcher.spawn(command) {
            Ok(child) => child,
            Err(error) => {
                let _ = capture.drain.join();
                return Err(Error::NoLlamaServer {
                    searched: format!("{} could not be started: {error}", binary.display()),
                });
            }
        };
        log::info!("spawned llama-server pid {} for {}", child.pid(), self.path());
        let (socket, api_key, client) = match listen {
            Listen::Socket(path) => {
                let client = Client::for_socket(&path, self.services.http);
                (Some(path), None, Some(client))
            }
            Listen::Tcp { api_key } => (None, Some(api_key), None),
        };
        self.running = Some(Running { child, drain: Some(capture.drain), drained, tail: capture.tail, socket });
        Ok(Loading { started: Instant::now(), port: capture.port, api_key, client })
    }

    /// Where the child of `generation` listens: a Unix socket in the private children
    /// directory, or loopback TCP with a fresh key when sockets are off or the path would
    /// not fit a socket address.
    pub(super) fn listen(&self, generation: u64) -> Result<Listen, Error> {
        let path = self.services.children_dir.join(format!("{}-{generation}.sock", self.id));
        if !self.services.children_on_tcp && path.as_os_str().len() <= crate::paths::MAX_SOCKET_PATH {
            // A leftover of an earlier daemon would make the bind fail; only a socket is
            // ever removed, in a directory only this user can enter.
            let _ = crate::paths::remove_stale_socket(&path);
            return Ok(Listen::Socket(path));
        }
        let api_key =
            crate::sys::random_hex(16).map_err(|e| Error::io("cannot read random bytes for a child's key", e))?;
        Ok(Listen::Tcp { api_key })
    }

    /// Between messages while a child starts: the port, then `/health`, then ready. A
    /// child that exits while loading fails the load at once, even when a helper it left
    /// keeps its output open.
    pub(super) fn poll_load(&mut self) {
        if let Some(error) = self.exit_error(Duration::ZERO) {
            return self.child_died(error);
        }
        let Some(loading) = self.loading.as_mut() else { return };
        if loading.client.is_none() {
            if let Ok(port) = loading.port.try_recv() {
                let api_key = loading.api_key.as_deref().unwrap_or_default();
                loading.client = Some(Client::new(port, api_key, self.services.http));
                self.view.lock().port = Some(port);
            }
        }
        if let Some(client) = &loading.client {
            if client.healthy() {
                let started = loading.started;
                self.client = loading.client.take();
                self.loading = None;
                self.became_ready(started);
                if self.restore_caches() {
                    self.feed(Event::Loaded);
                }
                return;
            }
        }
        let last_progress =
            self.running.as_ref().map_or(loading.started, |r| r.tail.last_output().max(loading.started));
        if last_progress.elapsed() > self.services.load_timeout {
            let error = Error::Timeout {
                what: format!(
                    "loading {}: llama-server printed nothing for {} s (raise load_timeout in the config for very \
                     large models)",
                    self.spec.name,
                    self.services.load_timeout.as_secs()
                ),
            };
            self.loading = None;
            self.finish_child(Duration::ZERO);
            self.load_failed(error);
            self.feed(Event::LoadFailed);
        }
    }

    pub(super) fn became_ready(&mut self, started: Instant) {
        self.home.stats.lock().last_load = Some(started.elapsed());
        self.ready_since = Some(SystemTime::now());
        self.just_ready = true;
        self.publish(EventKind::Ready, self.pid(), Some(format!("loaded in {} ms", started.elapsed().as_millis())));
        self.services.gpu.refresh_soon();
    }

    pub(super) fn load_failed(&mut self, error: Error) {
        self.breaker.record(Instant::now());
        self.failure = Some(error.to_string());
        self.publish(EventKind::Failed, None, Some(error.to_string()));
        self.load_error = Some(error);
        // Whatever was spawned for the failed load does not outlive it.
        self.finish_child(Duration::ZERO);
    }

    pub(super) fn stop_child(&mut self, why: Unload) -> Event {
        let message = match why {
            Unload::Evict | Unload::Expire | Unload::Reload => format!("{} was unloaded", self.spec.name),
            _ => self.stop_message.clone(),
        };
        if let Some(generation) = &self.generation {
            if why == Unload::Restart {
                generation.mark_restarted();
            }
            generation.end(Ended::Stopped(message));
        }
        let pid = self.pid();
        self.loading = None;
        let written = self.write_caches(why);
        self.client = None;
        // An evicted child is idle and holds nothing worth a graceful exit, and a load
        // waits for its memory: SIGKILL ends it in about 1 ms, where llama-server's own
        // teardown after SIGTERM takes 21-25 ms (measured with SmolLM2).
        let grace = if why == Unload::Evict { Duration::ZERO } else { self.services.grace() };
        self.finish_child(grace);
        self.keep_caches(written, pid);
        let (kind, detail) = match why {
            Unload::Evict => {
                self.home.stats.lock().evictions += 1;
                (EventKind::Evicted, Some("evicted to make room for another model".to_string()))
            }
            Unload::Expire => {
                self.home.stats.lock().evictions += 1;
                (EventKind::Expired, Some("idle for longer than its TTL".to_string()))
            }
            Unload::Reload => (EventKind::Stopped, Some("the model file was replaced".to_string())),
            Unload::Restart => (
                EventKind::Stopped,
                Some("stopped after a stalled request; the next request loads it again".to_string()),
            ),
            Unload::Exclusive | Unload::Stop => (EventKind::Stopped, Some(self.stop_message.clone())),
        };
        self.publish(kind, pid, detail);
        if let Some((info, stamp)) = self.pending_file.take() {
            self.adopt_file(info, stamp);
        }
        self.replicas.clear();
        Event::ChildStopped
    }

    /// Stops the child (if any) with `grace` and waits for its output to be drained.
    pub(super) fn finish_child(&mut self, grace: Duration) {
        let Some(mut running) = self.running.take() else { return };
        let pid = running.child.pid();
        let stopped =
            if grace.is_zero() { running.child.kill() } else { running.child.stop(grace, &self.services.kill_now) };
        match stopped {
            Ok(status) => log::info!("llama-server pid {pid} {}", process::describe_status(status)),
            Err(error) => log::warn!("cannot reap llama-server pid {pid}: {error}"),
        }
        running.cleanup();
    }

    /// If the child has exited (waiting up to `patience`), reaps it and describes the exit.
    pub(super) fn exit_error(&mut self, patience: Duration) -> Option<Error> {
        let deadline = Instant::now() + patience;
        let running = self.running.as_mut()?;
        loop {
            if let Ok(Some(_)) = running.child.try_wait() {
                break;
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let mut running = self.running.take()?;
        let status = running.child.try_wait().ok().flatten()?;
        // Join the drain so the tail holds the child's last words.
        running.cleanup();
        let status = process::describe_status(status);
        let stderr_tail = running.tail.quote();
        if let Some(generation) = &self.generation {
            generation.end(Ended::Exited { status: status.clone(), stderr_tail: stderr_tail.clone() });
        }
        Some(Error::LlamaExited { model: self.spec.name.clone(), status, stderr_tail })
    }

    /// The child's output closed: it is exiting. Reap it and fail the load or the instance.
    pub(super) fn output_closed(&mut self, generation: u64) {
        let current = self.generation.as_ref().is_some_and(|g| g.number == generation);
        if !current || self.running.is_none() || !matches!(self.machine.phase(), Phase::Starting | Phase::Ready) {
            return;
        }
        // Said of a child before this one of the same load (started again after a restore
        // brought it down): this one's output is still open.
        if self.running.as_ref().is_some_and(|running| running.drained.try_recv() == Err(TryRecvError::Empty)) {
            return;
        }
        // A child that closed its output but lives on is unusual, and harmless until it exits.
        if let Some(error) = self.exit_error(EXIT_PATIENCE) {
            self.child_died(error);
        }
    }

    /// A ready child that died without its output closing (a helper holds it), or whose
    /// socket is gone, is a crash: restarted for the next request, under the breaker.
    pub(super) fn check_alive(&mut self) {
        if !matches!(self.machine.phase(), Phase::Starting | Phase::Ready) || self.running.is_none() {
            return;
        }
        if let Some(error) = self.exit_error(Duration::ZERO) {
            return self.child_died(error);
        }
        let socket = self.running.as_ref().and_then(|running| running.socket.clone());
        if socket.is_some_and(|socket| !socket.exists()) {
            let pid = self.pid().unwrap_or_default();
            let tail = self.running.as_ref().map(|running| running.tail.quote()).unwrap_or_default();
            self.finish_child(Duration::ZERO);
            let error = Error::LlamaExited {
                model: self.spec.name.clone(),
                status: format!("(pid {pid}) lost its socket and was restarted"),
                stderr_tail: tail,
            };
            if let Some(generation) = &self.generation {
                generation.end(Ended::Exited { status: "lost its socket".into(), stderr_tail: String::new() });
            }
            self.child_died(error);
        }
    }

    /// Fails the load, or marks the instance crashed (waiting requests load it again).
    pub(super) fn child_died(&mut self, error: Error) {
        self.reclaim();
        log::warn!("{error}");
        if self.machine.phase() == Phase::Starting {
            self.loading = None;
            self.load_failed(error);
            self.feed(Event::LoadFailed);
        } else {
            self.breaker.record(Instant::now());
            self.failure = Some(error.to_string());
            self.client = None;
            self.publish(EventKind::Crashed, None, Some(error.to_string()));
            self.feed(Event::ChildExited);
        }
    }
}
