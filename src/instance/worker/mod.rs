//! The worker: one thread per instance, the only owner of its child and its state.
//!
//! It waits on its inbox (a blocking receive; while a child starts, with the readiness poll
//! interval as the deadline; while it is ready, with a liveness check as the deadline),
//! feeds what it hears to the state machine, and carries out the actions the machine
//! answers: ask the scheduler for memory, spawn, grant slots, fail requests, stop the
//! child. Blocking work (spawning, stopping with its grace period, checking remote servers)
//! happens here and delays only this instance's messages. Decisions that are policy (the
//! breaker, replica choice, the queue limit) are asked of [`super::policy`].
//!
//! Around every message the worker calls its lent slots back first and lends what is free
//! afterwards (see [`super::lease`]), so requests for a ready instance with a free slot
//! never need it, and anything it decides sees every slot.
//!
//! The child handle lives in [`Running`] together with the [`Generation`] it belongs to: a
//! stop, a crash or a reload ends that generation and nothing else.
//!
//! Prompt caches (see [`super::cache`]): a stop for a reason that saves asks the child to
//! write its slots before it is stopped, and keeps the files once it is gone; a new child
//! gets back what was kept for its identity after it answers and before any request gets
//! a slot.
//!
//! The worker's rooms: this file is the thread, its inbox and the machine's actions;
//! [`child`] spawns, polls, notices the death of and stops the child; [`caches`] saves and
//! restores prompt caches; [`remote`] checks the servers of a remote model.

mod caches;
mod child;
mod remote;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use super::cache::Identity;
use super::cache_store::CacheStore;
use super::lease::{Generation, Home, Lease, Lending};
use super::policy::{self, Breaker, CrashLoop, ReplicaHealth};
use super::state::{Action, Cause, Event, Machine, Phase, Unload};
use super::{FileStamp, Handle, Job, JobEvent, JobId, Message, Pin, RoomFlags, RoomRequest, Stats, View};
use crate::backend::client::{Client, Timeouts};
use crate::backend::local;
use crate::error::Error;
use crate::events::{EventBus, EventKind};
use crate::gguf::ModelInfo;
use crate::memory::Gpu;
use crate::model::ModelSpec;
use crate::process::launcher::Launcher;
use child::{Loading, Running};
use remote::Replica;

/// How long a worker waits for a child whose output closed to be reported as exited.
const EXIT_PATIENCE: Duration = Duration::from_secs(2);
/// How often a ready child is checked for having died unnoticed (a helper it started may
/// hold its output open, so the pipe never says so) or lost its socket.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);
/// What every worker needs from the daemon.
pub(crate) struct Services {
    pub(crate) launcher: Launcher,
    pub(crate) log_dir: PathBuf,
    /// Where children's Unix sockets live: a directory only this user can enter.
    pub(crate) children_dir: PathBuf,
    /// Children listen on loopback TCP with a key instead of a Unix socket (for comparing
    /// the two; also used when a socket path would be too long).
    pub(crate) children_on_tcp: bool,
    /// Longest a load may go without any output from the child.
    pub(crate) load_timeout: Duration,
    pub(crate) http: Timeouts,
    pub(crate) crash_loop: CrashLoop,
    pub(crate) stop_grace: Duration,
    /// Set to cut every grace period short (a second SIGINT).
    pub(crate) kill_now: AtomicBool,
    pub(crate) scheduler: Sender<RoomRequest>,
    pub(crate) events: EventBus,
    pub(crate) gpu: Gpu,
    /// Finds the llama-server binary; asked only when a child is spawned, since looking
    /// through PATH costs a stat per directory.
    pub(crate) llama_server: Box<dyn Fn() -> Result<PathBuf, String> + Send + Sync>,
    /// Marks this daemon's children (see `process::MARK_VARIABLE`).
    pub(crate) mark_prefix: String,
    /// Set by the scheduler: whether loads wait for room, and whether a drain for one is near.
    pub(crate) room: Arc<RoomFlags>,
    /// The prompt caches saved on unload and restored on load.
    pub(crate) caches: CacheStore,
}

impl Services {
    fn grace(&self) -> Duration {
        if self.kill_now.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            self.stop_grace
        }
    }
}

/// Requests a local child is sent beyond its slots. llama-server holds them and starts one
/// the moment a slot frees, so back-to-back requests hand over inside the child rather than
/// through the worker, a waiting thread and a new request parsed by the child (one-token
/// requests over HTTP, one slot, against router mode: 0.94-0.97 of its rate at 8 clients
/// and 0.97-1.03 at 64 without, 0.98-1.04 and 1.04-1.15 with; two gave no more, and one
/// run a p99 of 379 ms). Remote servers get no more than their slots, and neither does a
/// model with a `max_queued`: its limit counts every request that waits.
///
/// Nor does any child while a busy instance may soon drain for a waiting load: a drain must
/// finish what a child holds, but leaves what waits in llmctl's queue for the model's next
/// load, so a request held in the child would lengthen the drain by a whole request (see
/// [`Lease::take_lent`] for slots lent before). While the drain is still far off, a child
/// holds one as ever: under thrash a model is loaded while others wait most of the time.
const QUEUED_IN_CHILD: u32 = 1;

/// The slots the machine grants for a local child: its own, and [`QUEUED_IN_CHILD`] more
/// unless the model has a `max_queued` or a drain for a waiting load is near.
fn machine_slots(parallel: u32, policy: &crate::model::Policy, drain_near: bool) -> u32 {
    if policy.max_queued.is_some() || drain_near {
        parallel
    } else {
        parallel + QUEUED_IN_CHILD
    }
}

/// Starts the worker of a new instance and returns its handle.
pub(crate) fn start(
    id: usize,
    spec: ModelSpec,
    info: ModelInfo,
    stamp: FileStamp,
    services: Arc<Services>,
) -> std::io::Result<Handle> {
    let (inbox_tx, inbox) = unbounded();
    let view = Arc::new(Mutex::new(View::new(spec.clone(), info.clone(), stamp)));
    let home = Home {
        inbox: inbox_tx,
        scheduler: Some((services.scheduler.clone(), Arc::clone(&services.room))),
        lending: Arc::new(Mutex::new(Lending::default())),
        stats: Arc::new(Mutex::new(Stats::default())),
        returning: Arc::default(),
    };
    let worker = Worker {
        id,
        machine: Machine::new(machine_slots(spec.load.parallel, &spec.policy, false)),
        breaker: Breaker::new(services.crash_loop),
        spec,
        info,
        stamp,
        services,
        home: home.clone(),
        view: Arc::clone(&view),
        lent: 0,
        returned: 0,
        jobs: HashMap::new(),
        arrivals: HashMap::new(),
        pending_file: None,
        generation: None,
        running: None,
        loading: None,
        client: None,
        replicas: Vec::new(),
        failure: None,
        refusal: None,
        load_error: None,
        stop_message: String::new(),
        stop_waiters: Vec::new(),
        ready_since: None,
        just_ready: false,
        pinned_by_command: false,
        pinned_until: None,
        cache_identity: None,
        restore_retried: false,
    };
    let thread = thread::Builder::new().name(format!("instance-{id}")).spawn(move || worker.run(inbox))?;
    Ok(Handle { home, view, rejected: Default::default(), thread: Mutex::new(Some(thread)) })
}

struct Worker {
    id: usize,
    services: Arc<Services>,
    /// The inbox, lending and counters, as leases hold them.
    home: Home,
    view: Arc<Mutex<View>>,
    machine: Machine,
    breaker: Breaker,
    spec: ModelSpec,
    info: ModelInfo,
    stamp: FileStamp,
    /// Slots lent out since they were last called back (free or taken).
    lent: u32,
    /// Leases whose slot came back since the view was last published: uncounted from
    /// `home.returning` as the view shows them gone.
    returned: u32,
    /// Requests waiting for a slot, by number.
    jobs: HashMap<JobId, Job>,
    arrivals: HashMap<JobId, Instant>,
    /// A replaced model file, loaded once the old child has drained and stopped.
    pending_file: Option<(ModelInfo, FileStamp)>,
    generation: Option<Arc<Generation>>,
    running: Option<Running>,
    loading: Option<Loading>,
    client: Option<Client>,
    replicas: Vec<Replica>,
    failure: Option<String>,
    /// Why the last request for memory was refused.
    refusal: Option<Error>,
    /// Why the last load failed.
    load_error: Option<Error>,
    /// What requests cut off by the current unload are told.
    stop_message: String,
    /// Who waits for the instance to stop.
    stop_waiters: Vec<Sender<()>>,
    ready_since: Option<SystemTime>,
    /// Became ready since the scheduler was last told.
    just_ready: bool,
    pinned_by_command: bool,
    pinned_until: Option<SystemTime>,
    /// What the running child's prompt caches are saved under; none when they are not.
    cache_identity: Option<Identity>,
    /// This load already started its child again after a restore brought the first down.
    restore_retried: bool,
}

impl Worker {
    fn run(mut self, inbox: Receiver<Message>) {
        loop {
            let wait = if self.loading.is_some() {
                Some(local::READY_POLL)
            } else if self.machine.phase() == Phase::Ready && self.running.is_some() {
                Some(LIVENESS_CHECK)
            } else {
                None
            };
            let message = match wait {
                Some(wait) => match inbox.recv_timeout(wait) {
                    Ok(message) => Some(message),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match inbox.recv() {
                    Ok(message) => Some(message),
                    Err(_) => break,
                },
            };
            let shutdown = matches!(message, Some(Message::Shutdown { .. }));
            match message {
                Some(message) => {
                    self.reclaim();
                    self.set_slots();
                    self.handle(message);
                }
                None if self.loading.is_some() => self.poll_load(),
                None => self.check_alive(),
            }
            if !shutdown {
                self.lend();
            }
            self.publish_view();
            self.tell_scheduler_if_ready_or_idle();
            if shutdown {
                break;
            }
        }
        // Whatever happened, the child does not outlive its owner.
        self.reclaim();
        self.finish_child(Duration::ZERO);
        self.notify_stop_waiters();
        self.publish_view();
    }

    /// Sets the machine's slots for a local child from the policy and whether a drain for a
    /// waiting load is near; a count lowered below the requests in flight grants nothing
    /// until enough of them end.
    fn set_slots(&mut self) {
        if self.spec.remote.is_none() {
            let drain_near = self.services.room.drain_near.load(Ordering::SeqCst);
            self.machine.set_slots(machine_slots(self.spec.load.parallel, &self.spec.policy, drain_near));
        }
    }

    /// While loads wait for room, an instance that became idle may be evicted for one, and
    /// one that became ready may have to drain for one: the plan must know when.
    fn tell_scheduler_if_ready_or_idle(&mut self) {
        let just_ready = std::mem::take(&mut self.just_ready);
        let in_use = self.machine.in_flight() - self.lent + self.home.lending.lock().taken();
        let idle = self.machine.phase() == Phase::Ready && self.machine.queued() == 0 && in_use == 0;
        if (idle || just_ready) && self.services.room.wanted.load(Ordering::SeqCst) && self.spec.remote.is_none() {
            let _ = self.services.scheduler.send(RoomRequest::Replan);
        }
    }

    /// Calls the lent slots back: the free ones return to the machine, the taken ones are
    /// from now on ordinary leases that give their slot back with a message.
    fn reclaim(&mut self) {
        if self.lent == 0 {
            return;
        }
        // The view's lock before the lending's, as in `Handle::snapshot`.
        let reclaimed = {
            let mut view = self.view.lock();
            let reclaimed = self.home.lending.lock().reclaim();
            view.in_flight += reclaimed.taken;
            reclaimed
        };
        self.lent = 0;
        self.feed(Event::Returned(reclaimed.free));
    }

    /// Lends what is free while the instance is ready, not draining and nobody waits.
    fn lend(&mut self) {
        let slots = self.machine.lendable();
        let (Some(generation), Some(client)) = (&self.generation, &self.client) else { return };
        if slots == 0 || self.spec.remote.is_some() {
            return;
        }
        let (generation, client) = (Arc::clone(generation), client.clone());
        self.feed(Event::Lent(slots));
        self.lent += slots;
        self.home.lending.lock().lend(slots, &generation, &client, &self.spec.policy);
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Arrive(job) => self.arrive(job),
            Message::Leave(job) => {
                if self.jobs.remove(&job).is_some() {
                    self.arrivals.remove(&job);
                    self.feed(Event::Left(job));
                }
            }
            Message::Finished { replica, generation, stalled, replica_failed } => {
                self.returned += 1;
                self.finished(replica, generation, stalled, replica_failed);
            }
            Message::RoomGranted(token) => self.feed(Event::RoomGranted(token)),
            Message::Keep(token) => self.feed(Event::Keep(token)),
            Message::RoomRefused(error) => {
                self.publish(EventKind::Refused, None, Some(error.to_string()));
                self.refusal = Some(error);
                self.feed(Event::RoomRefused);
            }
            Message::Unload { why, cutoff, room, message, done } => {
                if why == Unload::Stop {
                    // `llmctl stop` also clears the crash-loop breaker.
                    self.breaker.clear();
                    self.failure = None;
                }
                self.stop_message = message;
                self.stop_waiters.extend(done);
                self.feed(Event::Unload { why, cutoff, room });
            }
            Message::Pin { pin, done } => {
                match pin {
                    Pin::Set(pinned) => {
                        self.pinned_by_command = pinned;
                        if !pinned {
                            self.pinned_until = None;
                        }
                    }
                    Pin::Until(until) => {
                        self.pinned_until = Some(self.pinned_until.map_or(until, |current| current.max(until)));
                    }
                }
                self.publish_view();
                let _ = done.send(());
            }
            Message::OutputClosed { generation } => self.output_closed(generation),
            Message::Suspect { generation } => {
                if self.generation.as_ref().is_some_and(|g| g.number == generation) {
                    self.check_alive();
                }
            }
            Message::Waiting { position, eta_ms } => {
                if self.machine.phase() == Phase::WaitingRoom {
                    for job in self.jobs.values() {
                        let _ = job.events.send(JobEvent::Waiting { position, eta_ms });
                    }
                    let place = crate::term::ordinal(position);
                    let seconds = eta_ms.div_ceil(1000);
                    self.publish(EventKind::Waiting, None, Some(format!("{place} in line, about {seconds} s")));
                }
            }
            Message::Listening { generation } => {
                if self.generation.as_ref().is_some_and(|g| g.number == generation) {
                    self.poll_load();
                }
            }
            Message::Restore { last_used, pinned, pinned_until, done } => {
                self.view.lock().restored_last_use = last_used;
                self.pinned_by_command = pinned;
                self.pinned_until = pinned_until;
                self.publish_view();
                let _ = done.send(());
            }
            Message::Shutdown { message } => {
                self.stop_message = message;
                self.feed(Event::Unload { why: Unload::Stop, cutoff: JobId::MAX, room: None });
            }
        }
        if !self.machine.phase().holds_room() {
            self.notify_stop_waiters();
        }
    }

    fn arrive(&mut self, job: Job) {
        self.spec.policy = job.policy.clone();
        self.set_slots();
        if let Some((info, stamp)) = job.file.clone().filter(|(_, stamp)| *stamp != self.stamp) {
            // A child that runs (or starts) has the old file open: drain it and load the new
            // one. Without a child, the next spawn opens the new file anyway.
            if self.machine.phase().holds_room() {
                if self.pending_file.as_ref().map(|(_, pending)| pending) != Some(&stamp) {
                    log::info!("{} changed on disk; reloading it once its requests finish", self.path());
                    self.publish(EventKind::Reloading, self.pid(), Some("the model file was replaced".into()));
                    self.pending_file = Some((info, stamp));
                    self.feed(Event::Unload { why: Unload::Reload, cutoff: job.id.saturating_sub(1), room: None });
                }
            } else {
                self.adopt_file(info, stamp);
            }
        }
        let max_queued = self.spec.policy.max_queued;
        if policy::refuse_queued(self.machine.would_wait(), self.machine.queued(), max_queued) {
            let service_ms = {
                let mut stats = self.home.stats.lock();
                stats.rejected += 1;
                stats.service_ms
            };
            let slots = self.spec.load.parallel.max(1) as usize;
            let retry_after_ms = policy::retry_after_ms(service_ms, self.machine.queued(), slots);
            let error = Error::Busy {
                message: format!(
                    "{} already has {} requests waiting (max_queued)",
                    self.spec.name,
                    max_queued.unwrap_or_default()
                ),
                retry_after_ms,
                per_model: true,
            };
            let _ = job.events.send(JobEvent::Failed(error));
            return;
        }
        if matches!(self.machine.phase(), Phase::Failed | Phase::Stopped) {
            if let Some(error) = self.crash_loop_error() {
                let _ = job.events.send(JobEvent::Failed(error));
                return;
            }
        }
        let id = job.id;
        self.jobs.insert(id, job);
        self.arrivals.insert(id, Instant::now());
        self.feed(Event::Arrived(id));
    }

    fn finished(&mut self, replica: Option<usize>, generation: u64, stalled: bool, replica_failed: bool) {
        if let Some(replica) = replica.and_then(|index| self.replicas.get_mut(index)) {
            replica.health.in_flight = replica.health.in_flight.saturating_sub(1);
            if replica_failed {
                replica.health.failed(Instant::now());
            }
        }
        let current = self.generation.as_ref().is_some_and(|g| g.number == generation);
        if stalled && current && self.machine.phase() == Phase::Ready {
            // Restart before the slot is free, so no waiting request is handed the same
            // stalled child.
            log::warn!("{} produced no token within the token timeout; restarting it", self.spec.name);
            self.stop_message =
                format!("{} was stopped after a request stalled; the next request loads it again", self.spec.name);
            self.feed(Event::Unload { why: Unload::Restart, cutoff: 0, room: None });
        }
        self.feed(Event::SlotFreed(generation));
    }

    /// Feeds one event to the machine and carries out its actions, and those of any event
    /// the actions cause in turn.
    fn feed(&mut self, event: Event) {
        let mut events = VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            for action in self.machine.step(event) {
                if let Some(next) = self.act(action) {
                    events.push_back(next);
                }
            }
        }
    }

    fn act(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::AskRoom => return self.ask_room(),
            Action::WithdrawRoom => {
                if self.spec.remote.is_none() {
                    let _ = self.services.scheduler.send(RoomRequest::Withdraw { id: self.id });
                }
            }
            Action::ReturnRoom => {
                // Whoever gets the memory may be answered before this loop publishes again,
                // and must not then read this instance as still holding it.
                self.publish_view();
                if self.spec.remote.is_none() {
                    let _ = self.services.scheduler.send(RoomRequest::Return { id: self.id });
                }
            }
            Action::Spawn => return self.spawn(),
            Action::Loading(job) => self.tell(job, JobEvent::Loading),
            Action::Queued(job, position) => {
                // Behind the requests already waiting inside the child.
                let in_child = self.machine.in_flight().saturating_sub(self.spec.load.parallel) as usize;
                self.tell(job, JobEvent::Queued(position + if self.spec.remote.is_some() { 0 } else { in_child }))
            }
            Action::Grant(job) => return self.grant(job),
            Action::Fail(job, cause) => {
                let error = match cause {
                    Cause::Refused => self.refusal.clone(),
                    Cause::LoadFailed => self.load_error.clone(),
                    Cause::Stopped => Some(Error::Stopped { message: self.stop_message.clone() }),
                }
                .unwrap_or_else(|| Error::internal(format!("{} failed without a reason", self.spec.name)));
                self.arrivals.remove(&job);
                if let Some(job) = self.jobs.remove(&job) {
                    let _ = job.events.send(JobEvent::Failed(error));
                }
            }
            Action::StopChild(why) => return Some(self.stop_child(why)),
        }
        None
    }

    fn tell(&self, job: JobId, event: JobEvent) {
        if let Some(job) = self.jobs.get(&job) {
            let _ = job.events.send(event);
        }
    }

    fn ask_room(&mut self) -> Option<Event> {
        if self.spec.remote.is_some() {
            // A remote model uses no memory here.
            return Some(Event::RoomGranted(0));
        }
        if let Some(error) = self.crash_loop_error() {
            self.refusal = Some(error);
            return Some(Event::RoomRefused);
        }
        // A missing binary is no crash: nothing ran.
        if let Err(searched) = (self.services.llama_server)() {
            self.refusal = Some(Error::NoLlamaServer { searched });
            return Some(Event::RoomRefused);
        }
        let gpu_present = self.services.gpu.latest().is_some();
        let need = crate::estimate::need(&self.spec, &self.info, gpu_present);
        let _ = self.services.scheduler.send(RoomRequest::Want { id: self.id, need, path: self.spec.path.clone() });
        None
    }

    fn grant(&mut self, job_id: JobId) -> Option<Event> {
        let waited = self.arrivals.remove(&job_id).map(|at| at.elapsed()).unwrap_or_default();
        let (Some(job), Some(generation)) = (self.jobs.remove(&job_id), self.generation.clone()) else {
            // The machine only grants jobs it holds on a loaded generation; keep the count right.
            return Some(Event::SlotFreed(self.machine.generation()));
        };
        let (client, replica) = if self.spec.remote.is_some() {
            let health: Vec<ReplicaHealth> = self.replicas.iter().map(|replica| replica.health.clone()).collect();
            let Some(index) = policy::choose_replica(&health, Instant::now()) else {
                let urls: Vec<&str> = self.replicas.iter().map(|r| r.client.base_url()).collect();
                let error = Error::RemoteDown {
                    message: format!(
                        "every server for {} is down ({}); retrying with backoff",
                        self.spec.name,
                        urls.join(", ")
                    ),
                };
                let _ = job.events.send(JobEvent::Failed(error));
                return Some(Event::SlotFreed(self.machine.generation()));
            };
            self.replicas[index].health.in_flight += 1;
            (self.replicas[index].client.clone(), Some(index))
        } else {
            match self.client.clone() {
                Some(client) => (client, None),
                None => {
                    let _ = job.events.send(JobEvent::Failed(Error::internal("a ready instance without a client")));
                    return Some(Event::SlotFreed(self.machine.generation()));
                }
            }
        };
        self.home.stats.lock().granted(waited);
        let lease = Lease::granted(generation, client, replica, self.home.clone());
        // A client that left meanwhile drops the lease with the channel; its drop gives
        // the slot back.
        let _ = job.events.send(JobEvent::Granted(Box::new(lease)));
        None
    }

    fn adopt_file(&mut self, info: ModelInfo, stamp: FileStamp) {
        self.info = info;
        self.stamp = stamp;
        let mut view = self.view.lock();
        view.info = self.info.clone();
        view.stamp = stamp;
    }

    /// The error to give instead of a restart while the instance is in a crash loop.
    fn crash_loop_error(&mut self) -> Option<Error> {
        let crashes = self.breaker.tripped(Instant::now())?;
        let last = self.failure.as_deref().unwrap_or("");
        Some(Error::Backend {
            model: self.spec.name.clone(),
            message: format!(
                "failed {crashes} times within {} s, so llmctl stopped restarting it; fix the cause, then `llmctl \
                 stop {}` to try again. The last failure: {last}",
                self.breaker.settings().window.as_secs(),
                self.spec.name,
            ),
        })
    }

    fn notify_stop_waiters(&mut self) {
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(());
        }
    }

    /// Tells `llmctl events` about a state change of this instance.
    fn publish(&self, kind: EventKind, pid: Option<u32>, detail: Option<String>) {
        self.services.events.publish(kind, &self.spec.name, &self.path(), pid, detail);
    }

    fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.child.pid())
    }

    fn path(&self) -> String {
        self.spec.path.display().to_string()
    }

    /// Mirrors what others read into the view.
    fn publish_view(&mut self) {
        // However the last failure left it (failed at start, stopped after a crash mid-stream),
        // an instance without a child whose breaker tripped is in a crash loop.
        let crash_loop = matches!(self.machine.phase(), Phase::Failed | Phase::Stopped)
            && self.breaker.tripped(Instant::now()).is_some();
        let (pid, start_time) = match &self.running {
            Some(running) => (Some(running.child.pid()), running.child.start_time()),
            None => (None, None),
        };
        let mut view = self.view.lock();
        // Under the view's lock, as the handle reads both.
        self.home.returning.fetch_sub(std::mem::take(&mut self.returned), Ordering::SeqCst);
        view.spec = self.spec.clone();
        view.phase = self.machine.phase();
        // Lent slots are counted by the handle as they are taken.
        view.in_flight = self.machine.in_flight() - self.lent;
        view.queued = self.machine.queued();
        view.slots = self.spec.load.parallel * (self.replicas.len().max(1) as u32);
        view.failure = self.failure.clone();
        view.crash_loop = crash_loop;
        view.pid = pid;
        view.start_time = start_time;
        view.socket = self.running.as_ref().and_then(|running| running.socket.clone());
        if pid.is_none() || self.spec.remote.is_some() {
            view.port = None;
        }
        view.ready_since = self.ready_since;
        view.pinned_by_command = self.pinned_by_command;
        view.pinned_until = self.pinned_until;
    }
}

/// Remembered LRU order and pins, restored into a new worker's view before the daemon
/// answers anyone: the first `status`, and the first eviction, see them.
pub(crate) fn restore(handle: &Handle, last_used_ms: Option<u64>, pinned: bool, pinned_until_ms: Option<u64>) {
    let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    let (done, restored) = crossbeam_channel::bounded(1);
    handle.send(Message::Restore {
        last_used: last_used_ms.map(at),
        pinned,
        pinned_until: pinned_until_ms.map(at),
        done,
    });
    // A new worker with nothing else to do answers at once; the bound is for one that died.
    let _ = restored.recv_timeout(Duration::from_secs(5));
}
