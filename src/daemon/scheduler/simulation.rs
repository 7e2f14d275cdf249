//! The plan and several instance state machines driven together by seeded random
//! schedules on a simulated clock: requests arrive for random models (one client hammers
//! one model, to starve the others if it could), loads take their time, requests take
//! theirs, a child holds one request beyond its slots unless the plan says a drain is near,
//! stops take a moment; the scheduler plans after every event and at the times the plan
//! asks to look again. After every step it checks: never over budget or
//! `max_instances`; no busy instance stopped; every request answered at most once; the
//! oldest waiting load is served within its bound of becoming the oldest. At the end every request was
//! answered: nothing is stuck, so no two loads waited on each other. A failure prints the
//! seed and the trace.

use std::collections::{BTreeMap, BinaryHeap, HashMap};

use super::plan::{self, Order, Resident, Rules, Waiting};
use crate::budget::{Budget, Need};
use crate::instance::state::tests::Rng;
use crate::instance::state::{Action, Event, JobId, Machine, Phase, Unload};

const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SimEvent {
    /// A request for this model arrives; `hammer` ones come back at once when done.
    Arrive {
        model: usize,
        hammer: bool,
    },
    Loaded {
        model: usize,
        generation: u64,
    },
    Done {
        model: usize,
        generation: u64,
        job: JobId,
        hammer: bool,
    },
    Stopped {
        model: usize,
    },
    Plan,
}

struct Model {
    need: Need,
    load_ms: u64,
    request_ms: u64,
    /// The child's own slots; its machine grants one more unless a drain is near, and
    /// that request waits inside the child for a slot.
    parallel: u32,
    /// When each of the child's slots is next free.
    slot_free: Vec<u64>,
    machine: Machine,
    /// When the current child became ready.
    ready_ms: Option<u64>,
    last_used_ms: u64,
    /// Requests in flight: (job, generation).
    leases: Vec<(JobId, u64)>,
    /// Which of the waiting jobs belong to the hammering client.
    hammer_jobs: Vec<JobId>,
}

struct Sim {
    seed: u64,
    now: u64,
    seq: u64,
    events: BinaryHeap<std::cmp::Reverse<(u64, u64, SimEvent)>>,
    models: Vec<Model>,
    budget: Budget,
    rules: Rules,
    next_job: JobId,
    arrivals: HashMap<JobId, u64>,
    answered: std::collections::HashSet<JobId>,
    /// Loads waiting for room: (model, since).
    line: Vec<(usize, u64)>,
    /// Room granted: model → (token, releasing for).
    holding: BTreeMap<usize, (u64, Option<usize>)>,
    /// Loads an instance was asked to unload for: evicted → the load it made room for.
    promises: HashMap<usize, usize>,
    token: u64,
    /// The time the plan last asked to look again.
    planned: Option<u64>,
    /// The oldest waiting load, and since when it is the oldest.
    oldest: Option<(usize, u64)>,
    /// What the last plan said: children hold nothing beyond their slots.
    drain_near: bool,
    trace: Vec<String>,
}

impl Sim {
    fn schedule(&mut self, at: u64, event: SimEvent) {
        self.seq += 1;
        self.events.push(std::cmp::Reverse((at, self.seq, event)));
    }

    fn fail(&self, what: &str) -> ! {
        let start = self
            .trace
            .len()
            .saturating_sub(std::env::var("LLMCTL_TRACE_LINES").ok().and_then(|n| n.parse().ok()).unwrap_or(80));
        panic!(
            "seed {}: {what} at {} ms ({}); the last steps:\n{}",
            self.seed,
            self.now,
            self.trace[0],
            self.trace[start..].join("\n")
        );
    }

    /// Feeds `event` to `model`'s machine and carries out its actions.
    fn feed(&mut self, model: usize, event: Event) {
        // As a worker does at each message.
        let slots = self.models[model].parallel + u32::from(!self.drain_near);
        self.models[model].machine.set_slots(slots);
        let actions = self.models[model].machine.step(event);
        for action in actions {
            self.trace.push(format!("  m{model}: {action:?}"));
            match action {
                Action::AskRoom => {
                    if !self.line.iter().any(|&(m, _)| m == model) {
                        self.line.push((model, self.now));
                    }
                }
                Action::WithdrawRoom => {
                    self.promises.retain(|_, &mut for_id| for_id != model);
                    self.line.retain(|&(m, _)| m != model);
                }
                Action::ReturnRoom => {
                    self.holding.remove(&model);
                }
                Action::Spawn => {
                    self.models[model].slot_free = vec![0; self.models[model].parallel as usize];
                    let generation = self.models[model].machine.generation();
                    let at = self.now + self.models[model].load_ms;
                    self.schedule(at, SimEvent::Loaded { model, generation });
                }
                Action::Grant(job) => {
                    if !self.answered.insert(job) {
                        self.fail(&format!("job {job} answered twice"));
                    }
                    let generation = self.models[model].machine.generation();
                    let hammer = self.models[model].hammer_jobs.contains(&job);
                    self.models[model].hammer_jobs.retain(|&j| j != job);
                    self.models[model].leases.push((job, generation));
                    // It runs on the slot free first, once it is free.
                    let m = &mut self.models[model];
                    let slot = (0..m.slot_free.len()).min_by_key(|&s| m.slot_free[s]).unwrap();
                    let at = m.slot_free[slot].max(self.now) + m.request_ms;
                    m.slot_free[slot] = at;
                    self.schedule(at, SimEvent::Done { model, generation, job, hammer });
                }
                Action::Fail(job, _) => {
                    if !self.answered.insert(job) {
                        self.fail(&format!("job {job} answered twice"));
                    }
                    // A refused hammering client tries again.
                    if self.models[model].hammer_jobs.contains(&job) {
                        self.models[model].hammer_jobs.retain(|&j| j != job);
                        self.schedule(self.now + 50, SimEvent::Arrive { model, hammer: true });
                    }
                }
                Action::StopChild(why) => {
                    let generation = self.models[model].machine.generation();
                    let running = self.models[model].leases.iter().filter(|(_, g)| *g == generation).count();
                    if running > 0 && !matches!(why, Unload::Stop | Unload::Restart) {
                        self.fail(&format!("m{model} stopped ({why:?}) with {running} requests in flight"));
                    }
                    self.models[model].ready_ms = None;
                    self.schedule(self.now + 5, SimEvent::Stopped { model });
                }
                Action::Loading(_) | Action::Queued(..) => {}
            }
        }
    }

    fn handle(&mut self, event: SimEvent) {
        self.trace.push(format!("{} ms {event:?}", self.now));
        match event {
            SimEvent::Arrive { model, hammer } => {
                self.next_job += 1;
                let job = self.next_job;
                self.arrivals.insert(job, self.now);
                if hammer {
                    self.models[model].hammer_jobs.push(job);
                }
                self.feed(model, Event::Arrived(job));
            }
            SimEvent::Loaded { model, generation } => {
                if self.models[model].machine.generation() == generation
                    && self.models[model].machine.phase() == Phase::Starting
                {
                    self.models[model].ready_ms = Some(self.now);
                    self.feed(model, Event::Loaded);
                }
            }
            SimEvent::Done { model, generation, job, hammer } => {
                self.models[model].leases.retain(|&(j, _)| j != job);
                self.models[model].last_used_ms = self.now;
                self.feed(model, Event::SlotFreed(generation));
                if hammer && self.now < HAMMER_UNTIL {
                    self.schedule(self.now + 1, SimEvent::Arrive { model, hammer: true });
                }
            }
            SimEvent::Stopped { model } => self.feed(model, Event::ChildStopped),
            SimEvent::Plan => {}
        }
        self.plan();
        self.check();
    }

    fn plan(&mut self) {
        let waiting: Vec<Waiting> = self
            .line
            .iter()
            .map(|&(model, since)| Waiting {
                id: model,
                name: format!("m{model}"),
                need: self.models[model].need,
                requests: self.models[model].machine.queued().max(1),
                since_ms: since,
                load_ms: Some(self.models[model].load_ms),
                first_token_ms: None,
                promised: self.promises.values().any(|&for_id| for_id == model),
            })
            .collect();
        let residents: Vec<Resident> = self
            .holding
            .iter()
            .map(|(&model, &(_, releasing_for))| {
                let m = &self.models[model];
                Resident {
                    id: model,
                    name: format!("m{model}"),
                    ram: m.need.ram,
                    vram: 0,
                    last_used_ms: m.last_used_ms,
                    ready_ms: m.ready_ms.filter(|_| m.machine.phase() == Phase::Ready),
                    load_ms: Some(m.load_ms),
                    drain_ms: Some(plan::drain_ms(m.request_ms as f64, m.machine.in_flight(), m.parallel)),
                    service_ms: Some(m.request_ms),
                    pinned: false,
                    busy: !m.machine.idle(),
                    releasing: releasing_for.is_some(),
                }
            })
            .collect();
        let outcome = plan::plan(&self.budget, &waiting, &residents, &self.rules, self.now);
        self.drain_near = outcome.drain_near;
        for order in outcome.orders {
            self.trace.push(format!("  plan: {order:?}"));
            match order {
                Order::Grant(model) => {
                    // Room freed for a load is its own: the model that left never takes
                    // it back while that load still waits.
                    if let Some(&for_id) = self.promises.get(&model) {
                        if self.line.iter().any(|&(m, _)| m == for_id) {
                            self.fail(&format!("m{model} took back the room it was unloaded for m{for_id} to have"));
                        }
                    }
                    self.promises.remove(&model);
                    self.promises.retain(|_, &mut for_id| for_id != model);
                    self.line.retain(|&(m, _)| m != model);
                    self.token += 1;
                    self.holding.insert(model, (self.token, None));
                    self.feed(model, Event::RoomGranted(self.token));
                }
                Order::Evict { victim, for_id } => {
                    let Some(holding) = self.holding.get_mut(&victim) else { continue };
                    holding.1 = Some(for_id);
                    self.promises.insert(victim, for_id);
                    let room = Some(holding.0);
                    self.feed(victim, Event::Unload { why: Unload::Evict, cutoff: 0, room });
                }
                Order::Refuse(model, _) => {
                    self.promises.retain(|_, &mut for_id| for_id != model);
                    self.line.retain(|&(m, _)| m != model);
                    self.feed(model, Event::RoomRefused);
                }
                Order::ReadAhead(_) => {}
            }
        }
        // Evictions for loads that are gone are called off.
        let waiting: Vec<usize> = self.line.iter().map(|&(m, _)| m).collect();
        let called_off: Vec<(usize, u64)> = self
            .holding
            .iter_mut()
            .filter(|(_, h)| h.1.is_some_and(|for_id| !waiting.contains(&for_id)))
            .map(|(&model, h)| {
                h.1 = None;
                (model, h.0)
            })
            .collect();
        for (model, token) in called_off {
            self.feed(model, Event::Keep(token));
        }
        if let Some(next) = outcome.next_ms.filter(|&next| next > self.now && Some(next) != self.planned) {
            self.planned = Some(next);
            self.schedule(next, SimEvent::Plan);
        }
    }

    fn check(&mut self) {
        let ram: u64 = self.holding.keys().map(|&m| self.models[m].need.ram).sum();
        if ram > self.budget.ram {
            self.fail(&format!("{} GiB held over a {} GiB budget", ram / GIB, self.budget.ram / GIB));
        }
        if self.budget.max_instances.is_some_and(|max| self.holding.len() > max) {
            self.fail(&format!("{} instances over max_instances", self.holding.len()));
        }
        // The oldest waiting load is served within its bound from when it became the oldest
        // (loads ahead of it go first): max_wait, the load and the residency of an
        // instance loaded for another meanwhile, one drain (a request's time), a stop.
        let oldest = self.line.iter().min_by_key(|&&(_, since)| since).map(|&(model, _)| model);
        if oldest != self.oldest.map(|(model, _)| model) {
            self.oldest = oldest.map(|model| (model, self.now));
        }
        if let Some((model, since)) = self.oldest {
            let longest_request = self.models.iter().map(|m| m.request_ms).max().unwrap_or(0);
            let longest_residency =
                self.models.iter().map(|m| plan::min_residency_ms(&self.rules, Some(m.load_ms))).max().unwrap_or(0);
            let longest_load = self.models.iter().map(|m| m.load_ms).max();
            // An instance loaded for another waiting load meanwhile may still be loading.
            let bound = plan::max_wait_ms(&self.rules, longest_load)
                + longest_load.unwrap_or(0)
                + longest_residency
                + longest_request
                + 10;
            if self.now - since > bound {
                let waited = self.now - since;
                self.fail(&format!(
                    "the load of m{model} has waited {waited} ms as the oldest, over its bound of {bound} ms"
                ));
            }
        }
    }
}

/// The hammering client stops sending then, so the schedule can end.
const HAMMER_UNTIL: u64 = 60_000;

fn run(seed: u64) {
    let mut rng = Rng::new(seed);
    let n_models = 2 + rng.below(3) as usize;
    let models: Vec<Model> = (0..n_models)
        .map(|_| {
            let (need, load_ms, request_ms) =
                (Need { ram: (1 + rng.below(4)) * GIB, vram: 0 }, 100 + rng.below(1900), 20 + rng.below(780));
            let parallel = 1 + rng.below(2) as u32;
            Model {
                need,
                load_ms,
                request_ms,
                parallel,
                slot_free: Vec::new(),
                machine: Machine::new(parallel),
                ready_ms: None,
                last_used_ms: 0,
                leases: Vec::new(),
                hammer_jobs: Vec::new(),
            }
        })
        .collect();
    let budget = if rng.below(2) == 0 {
        Budget { ram: 64 * GIB, vram: None, max_instances: Some(1 + rng.below(2) as usize) }
    } else {
        Budget { ram: (4 + rng.below(5)) * GIB, vram: None, max_instances: None }
    };
    let rules = Rules {
        max_wait_ms: [Some(0), Some(2_000), Some(10_000), None][rng.below(4) as usize],
        min_residency_ms: [Some(0), Some(1_000), None][rng.below(3) as usize],
    };
    let mut sim = Sim {
        seed,
        now: 0,
        seq: 0,
        events: BinaryHeap::new(),
        models,
        budget,
        rules,
        next_job: 0,
        arrivals: HashMap::new(),
        answered: Default::default(),
        line: Vec::new(),
        holding: BTreeMap::new(),
        promises: HashMap::new(),
        token: 0,
        planned: None,
        oldest: None,
        drain_near: false,
        trace: Vec::new(),
    };
    sim.trace.push(format!("budget {:?}, rules {:?}", sim.budget, sim.rules));
    // One client keeps model 0 busy; the others arrive at random.
    sim.schedule(0, SimEvent::Arrive { model: 0, hammer: true });
    let mut at = 0;
    for _ in 0..150 {
        at += rng.below(600);
        let model = rng.below(n_models as u64) as usize;
        sim.schedule(at, SimEvent::Arrive { model, hammer: false });
    }
    let mut steps = 0;
    while let Some(std::cmp::Reverse((time, _, event))) = sim.events.pop() {
        sim.now = time;
        sim.handle(event);
        steps += 1;
        if steps > 200_000 {
            sim.fail("the schedule never ends");
        }
    }
    let unanswered: Vec<JobId> = sim.arrivals.keys().copied().filter(|job| !sim.answered.contains(job)).collect();
    if !unanswered.is_empty() {
        sim.fail(&format!("{} requests were never answered (stuck): {unanswered:?}", unanswered.len()));
    }
}

#[test]
fn random_schedules_of_several_instances_and_the_plan_keep_the_invariants() {
    let seeds: Vec<u64> = match std::env::var("LLMCTL_TEST_SEED").ok().and_then(|seed| seed.parse().ok()) {
        Some(seed) => vec![seed],
        None => (0..200).collect(),
    };
    for seed in seeds {
        run(seed);
    }
}
