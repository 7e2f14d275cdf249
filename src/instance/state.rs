//! The instance state machine, as a pure function: an [`Event`] in, the new phase and a list
//! of [`Action`]s out. No I/O, no clocks, no channels: the worker feeds it what happened and
//! carries out what it answers, so every ordering of events can be tested with tables and
//! random schedules, without processes.
//!
//! Phases: `Stopped → WaitingRoom → Starting → Ready → Stopping → Stopped`, and `Failed`
//! (stopped, with a reason) after a load failed or the child died. Requests ("jobs") wait in
//! one first-come-first-served queue; a job gets a slot only on a ready instance with a free
//! slot. Every job that enters either gets a slot or is failed: the machine never drops one.
//!
//! Unloading always names why ([`Unload`]). Eviction, TTL expiry, a replaced model file and
//! `switch --exclusive` never stop a child with requests in flight: the instance first
//! drains. `stop` and `shutdown` stop at once. Jobs are numbered by the daemon when they are
//! sent, so an unload carries a cutoff: jobs sent before it are the ones it concerns, even
//! when they reach the worker after it.

use std::collections::VecDeque;

/// A request's number, given when it is sent: later requests have larger numbers.
pub(crate) type JobId = u64;
/// The scheduler's number for one grant of memory; a release names the grant it is for.
pub(crate) type RoomToken = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No child and no memory.
    Stopped,
    /// No child; the last load or the child failed.
    Failed,
    /// Asked the scheduler for memory to load.
    WaitingRoom,
    /// The child is starting.
    Starting,
    Ready,
    /// The child is being stopped.
    Stopping,
}

impl Phase {
    /// True while the instance holds memory the scheduler granted.
    pub(crate) fn holds_room(self) -> bool {
        matches!(self, Phase::Starting | Phase::Ready | Phase::Stopping)
    }
}

/// Why an instance is unloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unload {
    /// The scheduler needs its memory: drain, then stop; later requests load it again.
    Evict,
    /// Its TTL ran out; only while it is idle.
    Expire,
    /// Its model file was replaced: drain, stop, then load the new file for later requests.
    Reload,
    /// A request stalled: stop now; waiting requests load it again.
    Restart,
    /// `switch --exclusive` loaded another model: requests sent before fail, the ones in
    /// flight finish, then it stops.
    Exclusive,
    /// `llmctl stop` or the daemon's shutdown: requests sent before fail, the ones in flight
    /// are cut off, the child stops now.
    Stop,
}

impl Unload {
    /// Requests in flight finish before the child stops.
    fn drains(self) -> bool {
        matches!(self, Unload::Evict | Unload::Expire | Unload::Reload | Unload::Exclusive)
    }

    /// Requests sent before the unload are refused rather than served or reloaded for.
    fn refuses_earlier(self) -> bool {
        matches!(self, Unload::Exclusive | Unload::Stop)
    }
}

/// Why a job is failed; the worker holds the details (the error of the refusal or load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The scheduler refused the memory, or the worker refused to ask (no binary, crash loop).
    Refused,
    /// The load it waited for failed.
    LoadFailed,
    /// The instance was stopped or unloaded exclusively with this job waiting.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Arrived(JobId),
    /// The job's client went away before it got a slot.
    Left(JobId),
    RoomGranted(RoomToken),
    RoomRefused,
    /// The child answers: the instance is ready.
    Loaded,
    LoadFailed,
    /// A request finished and gave back its slot on the given generation (the count of
    /// spawns: a request that ran on an earlier child frees nothing on the current one).
    SlotFreed(u64),
    /// The child exited on its own while ready.
    ChildExited,
    /// Unload for `why`; `cutoff` is the last job sent before it. `room` names the grant an
    /// eviction is for (ignored for other reasons).
    Unload {
        why: Unload,
        cutoff: JobId,
        room: Option<RoomToken>,
    },
    /// The child is gone after a stop.
    ChildStopped,
    /// The load an eviction of grant `room` was for is gone: keep serving if still draining.
    Keep(RoomToken),
    /// The worker lent this many free slots out (see [`Machine::lendable`]): they count as
    /// in flight until they come back.
    Lent(u32),
    /// This many lent slots came back unused when the worker called the lending back.
    Returned(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Ask the scheduler for memory.
    AskRoom,
    /// Tell the scheduler the memory is no longer wanted.
    WithdrawRoom,
    /// Give the granted memory back: nothing runs any more.
    ReturnRoom,
    Spawn,
    /// Tell the job the model is loading, once.
    Loading(JobId),
    /// Tell the job its place in the queue (1 = next).
    Queued(JobId, usize),
    /// Hand the job a slot.
    Grant(JobId),
    Fail(JobId, Cause),
    /// Stop the child: gracefully for a drained unload, at once otherwise.
    StopChild(Unload),
}

/// A drain in progress: no new jobs start beyond `cutoff` (for an exclusive unload, none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Draining {
    why: Unload,
    cutoff: JobId,
}

#[derive(Debug, Clone)]
pub(crate) struct Machine {
    phase: Phase,
    slots: u32,
    in_flight: u32,
    queue: VecDeque<JobId>,
    /// Jobs told they wait for a load, so they hear it once.
    announced: Vec<JobId>,
    draining: Option<Draining>,
    /// Jobs up to this number are refused (an exclusive unload or a stop covered them).
    refuse_upto: Option<JobId>,
    /// The grant this instance's memory came from.
    room: Option<RoomToken>,
    /// Why the child is being stopped, while `Stopping`.
    stopping: Option<Unload>,
    /// Spawns so far; the current child is generation `generation` while `live`.
    generation: u64,
    live: bool,
    /// Requests still out on a child that is gone (cut off by a stop or a crash): they give
    /// their slot back to nobody.
    stale: u32,
}

impl Machine {
    pub(crate) fn new(slots: u32) -> Machine {
        Machine {
            phase: Phase::Stopped,
            slots: slots.max(1),
            in_flight: 0,
            queue: VecDeque::new(),
            announced: Vec::new(),
            draining: None,
            refuse_upto: None,
            room: None,
            stopping: None,
            generation: 0,
            live: false,
            stale: 0,
        }
    }

    /// The generation a slot granted now belongs to.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// True when a job arriving now would wait in the queue rather than start.
    pub(crate) fn would_wait(&self) -> bool {
        !(self.phase == Phase::Ready && self.draining.is_none() && self.in_flight < self.slots && self.queue.is_empty())
    }

    /// Idle: ready, nothing in flight, nothing waiting, not draining.
    pub(crate) fn idle(&self) -> bool {
        self.phase == Phase::Ready && self.in_flight == 0 && self.queue.is_empty() && self.draining.is_none()
    }

    /// Free slots the worker may lend out: only while ready, not draining and with nobody
    /// waiting, so a lent slot never jumps the queue or delays a drain.
    pub(crate) fn lendable(&self) -> u32 {
        if self.phase == Phase::Ready && self.draining.is_none() && self.queue.is_empty() {
            self.slots.saturating_sub(self.in_flight)
        } else {
            0
        }
    }

    /// Changes the number of slots (remote models: one per replica and parallel slot).
    pub(crate) fn set_slots(&mut self, slots: u32) {
        self.slots = slots.max(1);
    }

    pub(crate) fn step(&mut self, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Arrived(job) => self.arrived(job, &mut actions),
            Event::Left(job) => {
                self.queue.retain(|&j| j != job);
                self.announced.retain(|&j| j != job);
                if self.phase == Phase::WaitingRoom && self.queue.is_empty() {
                    self.phase = Phase::Stopped;
                    actions.push(Action::WithdrawRoom);
                }
                self.maybe_finish_drain(&mut actions);
            }
            Event::RoomGranted(token) => {
                if self.phase == Phase::WaitingRoom {
                    self.phase = Phase::Starting;
                    self.room = Some(token);
                    self.generation += 1;
                    self.live = true;
                    actions.push(Action::Spawn);
                } else {
                    // Withdrawn meanwhile: the scheduler's grant crossed our withdrawal.
                    actions.push(Action::ReturnRoom);
                }
            }
            Event::RoomRefused => {
                if self.phase == Phase::WaitingRoom {
                    self.phase = Phase::Stopped;
                    self.fail_queue(Cause::Refused, &mut actions);
                }
            }
            Event::Loaded => {
                if self.phase == Phase::Starting {
                    self.phase = Phase::Ready;
                    self.announced.clear();
                    self.grant(&mut actions);
                    self.maybe_finish_drain(&mut actions);
                }
            }
            Event::LoadFailed => {
                if self.phase == Phase::Starting {
                    self.live = false;
                    self.phase = Phase::Failed;
                    self.forget_room(&mut actions);
                    self.fail_queue(Cause::LoadFailed, &mut actions);
                }
            }
            Event::SlotFreed(generation) => {
                if self.live && generation == self.generation {
                    self.in_flight = self.in_flight.saturating_sub(1);
                } else {
                    self.stale = self.stale.saturating_sub(1);
                }
                if self.phase == Phase::Ready {
                    self.grant(&mut actions);
                    self.maybe_finish_drain(&mut actions);
                }
            }
            Event::ChildExited => {
                if matches!(self.phase, Phase::Ready | Phase::Starting) {
                    self.orphan_in_flight();
                    self.phase = Phase::Failed;
                    self.forget_room(&mut actions);
                    // Waiting requests load it again (the worker's crash-loop breaker decides).
                    self.ask_room_if_waiting(&mut actions);
                }
            }
            Event::Unload { why, cutoff, room } => self.unload(why, cutoff, room, &mut actions),
            Event::Keep(room) => {
                let evicting = matches!(self.draining, Some(Draining { why: Unload::Evict, .. }));
                if evicting && self.room == Some(room) && matches!(self.phase, Phase::Starting | Phase::Ready) {
                    self.draining = None;
                    if self.phase == Phase::Ready {
                        self.grant(&mut actions);
                    }
                }
            }
            Event::Lent(slots) => {
                // The worker lends only what `lendable` said; more would oversubscribe.
                self.in_flight += slots.min(self.lendable());
            }
            Event::Returned(slots) => {
                self.in_flight = self.in_flight.saturating_sub(slots);
                if self.phase == Phase::Ready {
                    self.grant(&mut actions);
                    self.maybe_finish_drain(&mut actions);
                }
            }
            Event::ChildStopped => {
                if self.phase == Phase::Stopping {
                    self.phase = Phase::Stopped;
                    self.stopping = None;
                    self.forget_room(&mut actions);
                    self.ask_room_if_waiting(&mut actions);
                }
            }
        }
        actions
    }

    fn arrived(&mut self, job: JobId, actions: &mut Vec<Action>) {
        if self.refuse_upto.is_some_and(|upto| job <= upto) {
            actions.push(Action::Fail(job, Cause::Stopped));
            return;
        }
        // In the order the requests were first sent: one sent again (after a crash of the
        // child it waited inside) goes back to its place, ahead of those that came later.
        let place = self.queue.iter().rposition(|&waiting| waiting < job).map_or(0, |ahead| ahead + 1);
        self.queue.insert(place, job);
        match self.phase {
            Phase::Ready => {
                self.grant(actions);
                if let Some(position) = self.queue.iter().position(|&j| j == job) {
                    actions.push(Action::Queued(job, position + 1));
                }
            }
            Phase::Stopped | Phase::Failed => {
                self.announce(job, actions);
                self.phase = Phase::WaitingRoom;
                actions.push(Action::AskRoom);
            }
            Phase::WaitingRoom | Phase::Starting | Phase::Stopping => self.announce(job, actions),
        }
    }

    fn announce(&mut self, job: JobId, actions: &mut Vec<Action>) {
        if !self.announced.contains(&job) {
            self.announced.push(job);
            actions.push(Action::Loading(job));
        }
    }

    /// Hands free slots to the first eligible jobs, and tells the rest where they stand.
    fn grant(&mut self, actions: &mut Vec<Action>) {
        let mut granted_any = false;
        while self.in_flight < self.slots {
            let eligible = match self.draining {
                None => self.queue.front().copied().map(|job| (0, job)),
                Some(Draining { why: Unload::Exclusive, .. }) => None,
                Some(Draining { cutoff, .. }) => {
                    self.queue.iter().enumerate().find(|(_, &job)| job <= cutoff).map(|(index, &job)| (index, job))
                }
            };
            let Some((index, job)) = eligible else { break };
            self.queue.remove(index);
            self.in_flight += 1;
            granted_any = true;
            actions.push(Action::Grant(job));
        }
        if granted_any {
            // Positions moved: the first few waiters hear their new place.
            for (index, &job) in self.queue.iter().enumerate().take(QUEUE_UPDATES) {
                actions.push(Action::Queued(job, index + 1));
            }
        }
    }

    /// Stops the child once a drain has nothing left to serve.
    fn maybe_finish_drain(&mut self, actions: &mut Vec<Action>) {
        let Some(Draining { why, cutoff }) = self.draining else { return };
        if self.phase != Phase::Ready || self.in_flight > 0 {
            return;
        }
        let served_remain = why != Unload::Exclusive && self.queue.iter().any(|&job| job <= cutoff);
        if !served_remain {
            self.draining = None;
            self.begin_stop(why, actions);
        }
    }

    /// The child is gone or going: requests still out on it free no slot of the next one.
    fn orphan_in_flight(&mut self) {
        self.stale += self.in_flight;
        self.in_flight = 0;
        self.live = false;
    }

    fn begin_stop(&mut self, why: Unload, actions: &mut Vec<Action>) {
        self.orphan_in_flight();
        self.phase = Phase::Stopping;
        self.stopping = Some(why);
        actions.push(Action::StopChild(why));
    }

    fn unload(&mut self, why: Unload, cutoff: JobId, room: Option<RoomToken>, actions: &mut Vec<Action>) {
        if why == Unload::Evict && (room.is_none() || room != self.room) {
            // An eviction meant for an earlier grant; this load is another one.
            return;
        }
        if why == Unload::Expire && !self.idle() {
            return;
        }
        if why.refuses_earlier() {
            self.refuse_upto = Some(self.refuse_upto.map_or(cutoff, |upto| upto.max(cutoff)));
            let (refused, kept): (Vec<JobId>, Vec<JobId>) = self.queue.iter().partition(|&&job| job <= cutoff);
            self.queue = kept.into();
            for job in refused {
                self.announced.retain(|&j| j != job);
                actions.push(Action::Fail(job, Cause::Stopped));
            }
        }
        match self.phase {
            Phase::Stopped | Phase::Failed => {}
            Phase::WaitingRoom => {
                if self.queue.is_empty() {
                    self.phase = Phase::Stopped;
                    actions.push(Action::WithdrawRoom);
                }
            }
            Phase::Stopping => {
                // Already stopping; a stop that cuts the grace period short is the worker's
                // business (it reads the kill flag), nothing changes here.
            }
            Phase::Starting if !why.drains() || why == Unload::Exclusive => {
                // Nothing runs on a starting child: stop it now.
                self.draining = None;
                self.begin_stop(why, actions);
            }
            Phase::Starting => {
                let cutoff = self.draining.map_or(cutoff, |d| d.cutoff.min(cutoff));
                self.draining = Some(Draining { why, cutoff });
            }
            Phase::Ready if why.drains() => {
                let cutoff = self.draining.map_or(cutoff, |d| d.cutoff.min(cutoff));
                // An exclusive unload outranks a plain drain: nothing new starts.
                let why = match self.draining {
                    Some(d) if d.why == Unload::Exclusive => Unload::Exclusive,
                    _ => why,
                };
                self.draining = Some(Draining { why, cutoff });
                self.maybe_finish_drain(actions);
            }
            Phase::Ready => {
                self.draining = None;
                self.begin_stop(why, actions);
            }
        }
    }

    fn fail_queue(&mut self, cause: Cause, actions: &mut Vec<Action>) {
        for job in self.queue.drain(..) {
            actions.push(Action::Fail(job, cause));
        }
        self.announced.clear();
        self.draining = None;
    }

    fn forget_room(&mut self, actions: &mut Vec<Action>) {
        if self.room.take().is_some() {
            actions.push(Action::ReturnRoom);
        }
        self.draining = None;
    }

    fn ask_room_if_waiting(&mut self, actions: &mut Vec<Action>) {
        if !self.queue.is_empty() {
            let waiting: Vec<JobId> = self.queue.iter().copied().collect();
            for job in waiting {
                self.announce(job, actions);
            }
            self.phase = Phase::WaitingRoom;
            actions.push(Action::AskRoom);
        }
    }
}

/// Waiters told their new place after each grant; the rest keep the place they were told.
const QUEUE_UPDATES: usize = 16;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use Action::*;
    use Event::{Arrived, ChildExited, ChildStopped, Left, LoadFailed, Loaded, RoomGranted, RoomRefused, SlotFreed};

    fn unload(why: Unload, cutoff: JobId, room: Option<RoomToken>) -> Event {
        Event::Unload { why, cutoff, room }
    }

    fn ready(slots: u32) -> Machine {
        let mut machine = Machine::new(slots);
        machine.step(Arrived(1));
        machine.step(RoomGranted(7));
        machine.step(Loaded);
        machine.step(SlotFreed(1));
        assert!(machine.idle());
        machine
    }

    #[test]
    fn transition_table() {
        // (name, start, events, expected actions of the last event, expected phase)
        type Case = (&'static str, fn() -> Machine, Vec<Event>, Vec<Action>, Phase);
        let cases: Vec<Case> = vec![
            (
                "first request asks for room",
                || Machine::new(1),
                vec![Arrived(1)],
                vec![Loading(1), AskRoom],
                Phase::WaitingRoom,
            ),
            (
                "a second request waits for the same load",
                || Machine::new(1),
                vec![Arrived(1), Arrived(2)],
                vec![Loading(2)],
                Phase::WaitingRoom,
            ),
            ("room granted spawns", || Machine::new(1), vec![Arrived(1), RoomGranted(3)], vec![Spawn], Phase::Starting),
            (
                "loaded grants the waiters",
                || Machine::new(2),
                vec![Arrived(1), Arrived(2), RoomGranted(3), Loaded],
                vec![Grant(1), Grant(2)],
                Phase::Ready,
            ),
            (
                "a full instance queues and tells the place",
                || ready(1),
                vec![Arrived(10), Arrived(11)],
                vec![Queued(11, 1)],
                Phase::Ready,
            ),
            (
                "a freed slot goes to the next in line",
                || ready(1),
                vec![Arrived(10), Arrived(11), SlotFreed(1)],
                vec![Grant(11)],
                Phase::Ready,
            ),
            (
                "a request sent again after a crash goes back to its place",
                || ready(1),
                vec![Arrived(10), Arrived(11), ChildExited, Arrived(10), RoomGranted(8), Loaded],
                vec![Grant(10), Queued(11, 1)],
                Phase::Ready,
            ),
            (
                "the last waiter leaving withdraws the room",
                || Machine::new(1),
                vec![Arrived(1), Left(1)],
                vec![WithdrawRoom],
                Phase::Stopped,
            ),
            (
                "a grant after withdrawal is given back",
                || Machine::new(1),
                vec![Arrived(1), Left(1), RoomGranted(4)],
                vec![ReturnRoom],
                Phase::Stopped,
            ),
            (
                "refused room fails the waiters",
                || Machine::new(1),
                vec![Arrived(1), Arrived(2), RoomRefused],
                vec![Fail(1, Cause::Refused), Fail(2, Cause::Refused)],
                Phase::Stopped,
            ),
            (
                "a failed load fails the waiters and returns the room",
                || Machine::new(1),
                vec![Arrived(1), RoomGranted(3), LoadFailed],
                vec![ReturnRoom, Fail(1, Cause::LoadFailed)],
                Phase::Failed,
            ),
            (
                "an idle instance is evicted at once",
                || ready(1),
                vec![unload(Unload::Evict, 5, Some(7))],
                vec![StopChild(Unload::Evict)],
                Phase::Stopping,
            ),
            (
                "an eviction for an older grant is ignored",
                || ready(1),
                vec![unload(Unload::Evict, 5, Some(6))],
                vec![],
                Phase::Ready,
            ),
            (
                "a busy instance drains before eviction",
                || ready(1),
                vec![Arrived(10), unload(Unload::Evict, 10, Some(7))],
                vec![],
                Phase::Ready,
            ),
            (
                "the drain ends when the last request finishes",
                || ready(1),
                vec![Arrived(10), unload(Unload::Evict, 10, Some(7)), SlotFreed(1)],
                vec![StopChild(Unload::Evict)],
                Phase::Stopping,
            ),
            (
                "requests sent before an eviction are served first",
                || ready(1),
                vec![Arrived(10), Arrived(11), Arrived(20), unload(Unload::Evict, 15, Some(7)), SlotFreed(1)],
                vec![Grant(11), Queued(20, 1)],
                Phase::Ready,
            ),
            (
                "requests sent after an eviction wait for the next load",
                || ready(1),
                vec![Arrived(10), Arrived(20), unload(Unload::Evict, 15, Some(7)), SlotFreed(1), ChildStopped],
                vec![ReturnRoom, Loading(20), AskRoom],
                Phase::WaitingRoom,
            ),
            (
                "an exclusive unload refuses the waiting and lets the running finish",
                || ready(1),
                vec![Arrived(10), Arrived(11), unload(Unload::Exclusive, 11, None)],
                vec![Fail(11, Cause::Stopped)],
                Phase::Ready,
            ),
            (
                "a late request sent before the exclusive unload is refused too",
                || ready(1),
                vec![unload(Unload::Exclusive, 11, None), Arrived(11)],
                vec![Fail(11, Cause::Stopped)],
                Phase::Stopping,
            ),
            (
                "stop cuts off requests in flight",
                || ready(1),
                vec![Arrived(10), unload(Unload::Stop, 10, None)],
                vec![StopChild(Unload::Stop)],
                Phase::Stopping,
            ),
            (
                "a busy instance does not expire",
                || ready(1),
                vec![Arrived(10), unload(Unload::Expire, 10, None)],
                vec![],
                Phase::Ready,
            ),
            (
                "an idle one does",
                || ready(1),
                vec![unload(Unload::Expire, 10, None)],
                vec![StopChild(Unload::Expire)],
                Phase::Stopping,
            ),
            (
                "a crash with waiters asks for room again",
                || ready(1),
                vec![Arrived(10), Arrived(11), ChildExited],
                vec![ReturnRoom, Loading(11), AskRoom],
                Phase::WaitingRoom,
            ),
            (
                "lent slots count as in flight: a request arriving queues",
                || ready(1),
                vec![Event::Lent(1), Arrived(10)],
                vec![Queued(10, 1)],
                Phase::Ready,
            ),
            (
                "a lent slot called back goes to the first waiter",
                || ready(2),
                vec![Event::Lent(2), Arrived(10), Event::Returned(1)],
                vec![Grant(10)],
                Phase::Ready,
            ),
            (
                "a drain ends once the lent slots are back",
                || ready(1),
                vec![Event::Lent(1), unload(Unload::Evict, 5, Some(7)), Event::Returned(1)],
                vec![StopChild(Unload::Evict)],
                Phase::Stopping,
            ),
            (
                "stop while waiting for room withdraws",
                || Machine::new(1),
                vec![Arrived(1), unload(Unload::Stop, 1, None)],
                vec![Fail(1, Cause::Stopped), WithdrawRoom],
                Phase::Stopped,
            ),
            (
                "stop while starting kills the child",
                || Machine::new(1),
                vec![Arrived(1), RoomGranted(2), unload(Unload::Stop, 1, None)],
                vec![Fail(1, Cause::Stopped), StopChild(Unload::Stop)],
                Phase::Stopping,
            ),
        ];
        for (name, start, events, expected, phase) in cases {
            let mut machine = start();
            let mut last = Vec::new();
            for event in events {
                last = machine.step(event);
            }
            assert_eq!(last, expected, "{name}");
            assert_eq!(machine.phase(), phase, "{name}");
        }
    }

    /// A small deterministic generator, so a failing schedule can be replayed from its seed.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        pub(crate) fn below(&mut self, n: u64) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
        }
    }

    /// Drives the machine with random events, as a worker and its environment would produce
    /// them, and checks the invariants after every step: slots are never oversubscribed, a
    /// child with requests in flight is stopped only by `stop`, and every job is answered
    /// exactly once (a slot or a failure) or is still waiting. The worker's lending is
    /// modelled as the worker does it: before each message it calls the lent slots back
    /// (`Returned`), after each it lends what is free (`Lent`); between messages requests
    /// take and give back lent slots without the machine hearing of it.
    #[test]
    fn random_schedules_keep_the_invariants() {
        for seed in 0..400 {
            check_random_schedule(seed);
        }
    }

    /// What a schedule step does: a message to the worker, or a request taking or giving
    /// back a lent slot (the machine hears nothing of those).
    enum Step {
        Message(Event),
        TakeLent,
        GiveBackLent(usize),
    }

    pub(crate) fn check_random_schedule(seed: u64) {
        let mut rng = Rng::new(seed);
        let slots = 1 + rng.below(3) as u32;
        let mut machine = Machine::new(slots);
        let mut next_job: JobId = 0;
        let mut waiting: Vec<JobId> = Vec::new();
        // Leases out, by the generation they were granted on.
        let mut leases: Vec<u64> = Vec::new();
        // Leases taken from the lending while it is open, by generation.
        let mut lent_leases: Vec<u64> = Vec::new();
        // The lending: open for one generation, with this many free slots.
        let mut lending: Option<(u64, u32)> = None;
        let mut live_generation: Option<u64> = None;
        let mut answered: std::collections::BTreeSet<JobId> = Default::default();
        // Granted jobs, by the generation they were granted on; and jobs whose child died
        // under them, to be sent again with their first number.
        let mut granted: Vec<(JobId, u64)> = Vec::new();
        let mut to_resend: Vec<JobId> = Vec::new();
        let mut room_asked = false;
        let mut token = 0;
        let mut trace: Vec<String> = Vec::new();
        for _ in 0..200 {
            let step = match rng.below(14) {
                0..=2 => {
                    next_job += 1;
                    Step::Message(Arrived(next_job))
                }
                3 if !waiting.is_empty() => Step::Message(Left(waiting[rng.below(waiting.len() as u64) as usize])),
                4 if room_asked => {
                    token += 1;
                    Step::Message(if rng.below(5) == 0 { RoomRefused } else { RoomGranted(token) })
                }
                5 if machine.phase() == Phase::Starting => {
                    Step::Message(if rng.below(6) == 0 { LoadFailed } else { Loaded })
                }
                6 if !leases.is_empty() => {
                    let generation = leases.swap_remove(rng.below(leases.len() as u64) as usize);
                    if let Some(at) = granted.iter().position(|&(_, g)| g == generation) {
                        granted.swap_remove(at);
                    }
                    Step::Message(SlotFreed(generation))
                }
                // A request whose child died under it ends its lease and is sent again.
                12 => {
                    let Some(at) = granted.iter().position(|&(_, g)| Some(g) != live_generation) else { continue };
                    let (job, generation) = granted.swap_remove(at);
                    let lease = leases.iter().position(|&g| g == generation).expect("its lease");
                    leases.swap_remove(lease);
                    to_resend.push(job);
                    Step::Message(SlotFreed(generation))
                }
                13 if !to_resend.is_empty() => {
                    let job = to_resend.swap_remove(rng.below(to_resend.len() as u64) as usize);
                    answered.remove(&job);
                    Step::Message(Arrived(job))
                }
                7 => {
                    let why = [
                        Unload::Evict,
                        Unload::Expire,
                        Unload::Reload,
                        Unload::Exclusive,
                        Unload::Stop,
                        Unload::Restart,
                    ][rng.below(6) as usize];
                    Step::Message(unload(why, next_job, Some(token)))
                }
                8 if machine.phase() == Phase::Stopping => Step::Message(ChildStopped),
                8 => Step::Message(Event::Keep(token)),
                9 if machine.phase() == Phase::Ready && rng.below(4) == 0 => Step::Message(ChildExited),
                10 if lending.is_some_and(|(_, free)| free > 0) => Step::TakeLent,
                11 if !lent_leases.is_empty() => Step::GiveBackLent(rng.below(lent_leases.len() as u64) as usize),
                _ => continue,
            };
            let event = match step {
                Step::TakeLent => {
                    let (generation, free) = lending.as_mut().expect("open");
                    *free -= 1;
                    lent_leases.push(*generation);
                    trace.push("take lent".into());
                    check_counts(&machine, &leases, &lent_leases, lending, live_generation, slots, seed, &trace);
                    continue;
                }
                Step::GiveBackLent(index) => {
                    let generation = lent_leases.swap_remove(index);
                    match lending.as_mut() {
                        Some((open, free)) if *open == generation => {
                            *free += 1;
                            trace.push("give back lent".into());
                            check_counts(
                                &machine,
                                &leases,
                                &lent_leases,
                                lending,
                                live_generation,
                                slots,
                                seed,
                                &trace,
                            );
                            continue;
                        }
                        // The lending closed: the slot goes back as a message.
                        _ => SlotFreed(generation),
                    }
                }
                Step::Message(event) => event,
            };
            // The worker calls the lent slots back before it handles a message; the
            // leases out on them become ordinary ones.
            let mut all_actions = Vec::new();
            if let Some((_, free)) = lending.take() {
                trace.push(format!("{:?}", Event::Returned(free)));
                all_actions.extend(machine.step(Event::Returned(free)));
                leases.append(&mut lent_leases);
            }
            trace.push(format!("{event:?}"));
            all_actions.extend(machine.step(event));
            let mut granted_now = Vec::new();
            if let Left(job) = event {
                waiting.retain(|&j| j != job);
            }
            if let Arrived(job) = event {
                waiting.push(job);
            }
            for action in &all_actions {
                match *action {
                    Grant(job) | Fail(job, _) => {
                        assert!(answered.insert(job), "seed {seed}: job {job} answered twice: {trace:?}");
                        assert!(waiting.contains(&job), "seed {seed}: job {job} was not waiting: {trace:?}");
                        waiting.retain(|&j| j != job);
                        if matches!(action, Grant(_)) {
                            granted_now.push(machine.generation());
                            granted.push((job, machine.generation()));
                        }
                    }
                    AskRoom => room_asked = true,
                    WithdrawRoom => room_asked = false,
                    Spawn => {
                        room_asked = false;
                        live_generation = Some(machine.generation());
                    }
                    StopChild(why) => {
                        let on_child =
                            leases.iter().chain(&granted_now).filter(|&&g| Some(g) == live_generation).count();
                        assert!(
                            on_child == 0 || matches!(why, Unload::Stop | Unload::Restart),
                            "seed {seed}: {why:?} stopped a child with {on_child} requests in flight: {trace:?}"
                        );
                        live_generation = None;
                    }
                    _ => {}
                }
            }
            leases.extend(granted_now);
            if event == RoomRefused {
                room_asked = false;
            }
            if matches!(event, ChildExited | LoadFailed) {
                live_generation = None;
            }
            // After the message, what is free is lent out again.
            let lendable = machine.lendable();
            if lendable > 0 {
                trace.push(format!("{:?}", Event::Lent(lendable)));
                let actions = machine.step(Event::Lent(lendable));
                assert!(actions.is_empty(), "seed {seed}: lending acts: {trace:?}");
                lending = Some((machine.generation(), lendable));
            }
            check_counts(&machine, &leases, &lent_leases, lending, live_generation, slots, seed, &trace);
            assert_eq!(machine.queued(), waiting.len(), "seed {seed}: queue drifted: {trace:?}");
            // A request sent again is back at its place: the line is in the order of first sending.
            assert!(machine.queue.iter().is_sorted(), "seed {seed}: out of order {:?}: {trace:?}", machine.queue);
            if machine.phase() == Phase::Ready && machine.in_flight() < slots {
                // A free slot with an eligible waiter would be a stuck request.
                assert!(
                    machine.draining.is_some() || machine.queue.is_empty(),
                    "seed {seed}: a waiter is stuck behind a free slot: {trace:?}"
                );
            }
            if !waiting.is_empty() {
                // Someone must be working for the waiters: a load asked for or running,
                // a child being stopped (they load next), or slots that will free.
                let running = leases.iter().filter(|&&g| Some(g) == live_generation).count();
                let progressing = matches!(machine.phase(), Phase::WaitingRoom | Phase::Starting | Phase::Stopping)
                    || (machine.phase() == Phase::Ready && (running > 0 || machine.draining.is_none()));
                assert!(progressing, "seed {seed}: waiters with nobody working for them: {trace:?}");
                assert!(lending.is_none(), "seed {seed}: slots lent while requests wait: {trace:?}");
            }
        }
    }

    /// The machine's slots in flight are exactly the leases on the live child, lent or
    /// granted, plus the lent slots nobody took; never more than the slots.
    #[allow(clippy::too_many_arguments)]
    fn check_counts(
        machine: &Machine,
        leases: &[u64],
        lent_leases: &[u64],
        lending: Option<(u64, u32)>,
        live_generation: Option<u64>,
        slots: u32,
        seed: u64,
        trace: &[String],
    ) {
        let running = leases.iter().chain(lent_leases).filter(|&&g| Some(g) == live_generation).count() as u32;
        let lent_free = lending.map_or(0, |(_, free)| free);
        assert!(machine.in_flight() <= slots, "seed {seed}: over the slots: {trace:?}");
        assert_eq!(machine.in_flight(), running + lent_free, "seed {seed}: slot count drifted: {trace:?}");
        if let Some((generation, _)) = lending {
            assert_eq!(Some(generation), live_generation, "seed {seed}: lent slots of a dead child: {trace:?}");
        }
    }
}
