//! The scheduler: the one thread that decides which instances hold memory.
//!
//! Workers ask it for room before they spawn ([`RoomRequest::Want`]) and give the room back
//! once their child is reaped ([`RoomRequest::Return`]). Each time something changes (a
//! request for room, room given back, an instance becoming idle, a load becoming overdue)
//! it describes the waiting loads and the instances holding room to [`plan::plan`], a pure
//! function, and carries out its orders: grant, evict (the worker drains first), refuse,
//! read a model file ahead. It publishes each waiting load's place and estimated wait.
//!
//! Memory is counted from the grant until the worker reports the child gone, so it is never
//! booked twice; a load whose clients all left is withdrawn, and evictions made for it are
//! called off. A load that waits longer than [`DRAIN_TIMEOUT`] anyway is refused with 124.

pub(crate) mod plan;
#[cfg(test)]
mod simulation;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{select_biased, Receiver};

use super::shared::Shared;
use crate::budget::{Budget, Need};
use crate::error::Error;
use crate::instance::view::millis_since_epoch;
use crate::instance::{Message, Phase, RoomRequest, RoomToken, Unload};
use crate::memory::{self, GpuReading};
use crate::process;
use plan::{Eta, Order, Resident, Rules, Waiting};

/// How long a load may wait for room before it gives up, whatever the plan.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

struct WaitingLoad {
    id: usize,
    need: Need,
    since: SystemTime,
    path: PathBuf,
    read_ahead: bool,
    /// An instance was asked to unload for it.
    promised: bool,
}

struct Holding {
    token: RoomToken,
    need: Need,
    /// Asked to unload to make room for the waiting load of this instance.
    releasing_for: Option<usize>,
}

pub(crate) fn budget(settings: &crate::settings::LiveSettings, gpu: Option<&GpuReading>) -> Budget {
    let ram = crate::budget::parse_size(&settings.memory_budget, memory::mem_total()).unwrap_or(u64::MAX);
    let vram = gpu.map(|gpu| crate::budget::parse_size(&settings.vram_budget, gpu.total_bytes).unwrap_or(u64::MAX));
    Budget { ram, vram, max_instances: settings.max_instances }
}

/// Runs until `stop` closes.
pub(crate) fn run(shared: &Arc<Shared>, requests: &Receiver<RoomRequest>, stop: &Receiver<()>) {
    let mut scheduler = Scheduler {
        shared,
        line: Vec::new(),
        holding: BTreeMap::new(),
        next_token: 0,
        next_plan: None,
        etas: HashMap::new(),
    };
    loop {
        let now = SystemTime::now();
        let hard = scheduler.line.iter().map(|w| w.since + DRAIN_TIMEOUT).min();
        let wake = [hard, scheduler.next_plan].into_iter().flatten().min();
        let timeout = wake.map_or(Duration::from_secs(3600), |at| at.duration_since(now).unwrap_or(Duration::ZERO));
        select_biased! {
            recv(stop) -> _ => return,
            recv(requests) -> request => match request {
                Ok(request) => scheduler.hear(request),
                Err(_) => return,
            },
            default(timeout) => {}
        }
        // Take everything already sent before planning once.
        while let Ok(request) = requests.try_recv() {
            scheduler.hear(request);
        }
        scheduler.plan();
    }
}

struct Scheduler<'a> {
    shared: &'a Arc<Shared>,
    /// Loads waiting for room.
    line: Vec<WaitingLoad>,
    /// Instances holding granted room, by id.
    holding: BTreeMap<usize, Holding>,
    next_token: RoomToken,
    /// When the plan changes by itself next.
    next_plan: Option<SystemTime>,
    /// The places and waits last told.
    etas: HashMap<usize, Eta>,
}

impl Scheduler<'_> {
    fn hear(&mut self, request: RoomRequest) {
        match request {
            RoomRequest::Want { id, need, path } => {
                if !self.line.iter().any(|waiting| waiting.id == id) {
                    let since = SystemTime::now();
                    self.line.push(WaitingLoad { id, need, since, path, read_ahead: false, promised: false });
                }
            }
            RoomRequest::Withdraw { id } => self.line.retain(|waiting| waiting.id != id),
            RoomRequest::Return { id } => {
                self.holding.remove(&id);
            }
            RoomRequest::Replan => {}
        }
    }

    fn send(&self, id: usize, message: Message) {
        if let Some(handle) = self.shared.table.by_id(id) {
            handle.send(message);
        }
    }

    fn name(&self, id: usize) -> String {
        self.shared.table.by_id(id).map(|handle| handle.with_view(|view| view.spec.name.clone())).unwrap_or_default()
    }

    fn plan(&mut self) {
        self.refuse_overdue();
        let gpu = self.shared.services.gpu.latest();
        let live = self.shared.live.read().clone();
        let budget = budget(&live, gpu.as_ref());
        let rules = Rules { max_wait_ms: live.max_wait_ms, min_residency_ms: live.min_residency_ms };
        let waiting = self.waiting();
        let residents = self.residents(gpu.as_ref());
        let now_ms = millis_since_epoch(SystemTime::now());
        let outcome = plan::plan(&budget, &waiting, &residents, &rules, now_ms);
        for order in outcome.orders {
            match order {
                Order::Grant(id) => self.grant(id),
                Order::Evict { victim, for_id } => self.evict(victim, for_id),
                Order::Refuse(id, reason) => {
                    self.line.retain(|waiting| waiting.id != id);
                    let error = Error::NoCapacity { message: format!("cannot load {}: {reason}", self.name(id)) };
                    self.send(id, Message::RoomRefused(error));
                }
                Order::ReadAhead(id) => self.read_ahead(id),
            }
        }
        self.next_plan = outcome.next_ms.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        self.call_off_releases();
        // Before the places are told: whoever sees one also sees these.
        let room = &self.shared.services.room;
        room.wanted.store(!self.line.is_empty(), Ordering::SeqCst);
        room.drain_near.store(outcome.drain_near, Ordering::SeqCst);
        self.publish(outcome.etas);
    }

    /// Loads that waited past the hard limit are refused with 124.
    fn refuse_overdue(&mut self) {
        let now = SystemTime::now();
        let (late, on_time): (Vec<WaitingLoad>, Vec<WaitingLoad>) = std::mem::take(&mut self.line)
            .into_iter()
            .partition(|w| now.duration_since(w.since).unwrap_or_default() >= DRAIN_TIMEOUT);
        self.line = on_time;
        for waiting in late {
            let busy: Vec<String> =
                self.holding.iter().filter(|(_, h)| h.releasing_for.is_some()).map(|(&id, _)| self.name(id)).collect();
            let error = Error::Timeout {
                what: format!(
                    "waiting for memory to load {}: {} stayed busy for {} s",
                    self.name(waiting.id),
                    if busy.is_empty() { "other models".to_string() } else { busy.join(", ") },
                    DRAIN_TIMEOUT.as_secs()
                ),
            };
            self.send(waiting.id, Message::RoomRefused(error));
        }
    }

    fn grant(&mut self, id: usize) {
        let Some(index) = self.line.iter().position(|w| w.id == id) else { return };
        let waiting = self.line.remove(index);
        self.next_token += 1;
        let token = self.next_token;
        self.holding.insert(id, Holding { token, need: waiting.need, releasing_for: None });
        self.etas.remove(&id);
        self.send(id, Message::RoomGranted(token));
    }

    fn evict(&mut self, victim: usize, for_id: usize) {
        let for_whom = self.name(for_id);
        let Some(holding) = self.holding.get_mut(&victim) else { return };
        holding.releasing_for = Some(for_id);
        if let Some(waiting) = self.line.iter_mut().find(|w| w.id == for_id) {
            waiting.promised = true;
        }
        let token = holding.token;
        self.shared.swaps.fetch_add(1, Ordering::Relaxed);
        log::info!("unloading {} to make room for {for_whom}", self.name(victim));
        // Cutoff 0: it finishes what runs and takes nothing more; its waiting requests wait
        // for its next load.
        self.send(
            victim,
            Message::Unload {
                why: Unload::Evict,
                cutoff: 0,
                room: Some(token),
                message: format!("unloaded to make room for {for_whom}"),
                done: None,
            },
        );
    }

    /// Reads the waiting model's file into the page cache, once, while room is freed for it.
    fn read_ahead(&mut self, id: usize) {
        let Some(waiting) = self.line.iter_mut().find(|w| w.id == id && !w.read_ahead) else { return };
        waiting.read_ahead = true;
        let path = waiting.path.clone();
        let _ = std::thread::Builder::new().name("read-ahead".into()).spawn(move || {
            if let Err(error) = crate::sys::read_ahead(&path) {
                log::debug!("cannot read {} ahead: {error}", path.display());
            }
        });
    }

    /// Instances still draining for a load that is gone stay loaded.
    fn call_off_releases(&mut self) {
        let waiting: Vec<usize> = self.line.iter().map(|w| w.id).collect();
        let mut called_off = Vec::new();
        for (&id, holding) in self.holding.iter_mut() {
            if holding.releasing_for.is_some_and(|for_id| !waiting.contains(&for_id)) {
                holding.releasing_for = None;
                called_off.push((id, holding.token));
            }
        }
        for (id, token) in called_off {
            log::info!("{} stays loaded: the load it was unloading for is gone", self.name(id));
            self.send(id, Message::Keep(token));
        }
    }

    /// Tells each waiting load its place and wait when they change.
    fn publish(&mut self, etas: Vec<Eta>) {
        let fresh: HashMap<usize, Eta> = etas.into_iter().map(|eta| (eta.id, eta)).collect();
        for (id, eta) in &fresh {
            let changed = self
                .etas
                .get(id)
                .is_none_or(|old| old.position != eta.position || old.eta_ms.abs_diff(eta.eta_ms) >= 1000);
            if changed {
                self.send(*id, Message::Waiting { position: eta.position, eta_ms: eta.eta_ms });
            }
        }
        self.etas = fresh;
        *self.shared.etas.lock() = self.etas.iter().map(|(&id, eta)| (id, (eta.position, eta.eta_ms))).collect();
    }

    /// The waiting loads, as the plan sees them.
    fn waiting(&self) -> Vec<Waiting> {
        self.line
            .iter()
            .map(|w| {
                let snapshot = self.shared.table.by_id(w.id).map(|handle| handle.snapshot());
                Waiting {
                    id: w.id,
                    name: snapshot.as_ref().map(|s| s.view.spec.name.clone()).unwrap_or_default(),
                    need: w.need,
                    requests: snapshot.as_ref().map_or(1, |s| s.view.queued.max(1)),
                    since_ms: millis_since_epoch(w.since),
                    load_ms: snapshot.as_ref().and_then(|s| s.stats.last_load).map(|d| d.as_millis() as u64),
                    first_token_ms: snapshot.and_then(|s| s.stats.slot_first_token_ms).map(|ms| ms as u64),
                    promised: w.promised,
                }
            })
            .collect()
    }

    /// The instances holding room, as the plan sees them.
    fn residents(&self, gpu: Option<&GpuReading>) -> Vec<Resident> {
        self.holding
            .iter()
            .map(|(&id, holding)| {
                let snapshot = self.shared.table.by_id(id).map(|handle| handle.snapshot());
                let releasing = holding.releasing_for.is_some();
                let Some(snapshot) = snapshot else {
                    return Resident {
                        id,
                        name: String::new(),
                        ram: holding.need.ram,
                        vram: holding.need.vram,
                        last_used_ms: 0,
                        ready_ms: None,
                        load_ms: None,
                        drain_ms: None,
                        service_ms: None,
                        pinned: false,
                        busy: true,
                        releasing,
                    };
                };
                let view = &snapshot.view;
                // Until it runs, an instance is charged its estimate; then what it really uses.
                let measured_ram =
                    if view.phase == Phase::Ready { view.pid.and_then(process::rss_bytes) } else { None };
                let measured_vram = view.pid.and_then(|pid| gpu?.used_by_pid.get(&pid).copied());
                let ready_ms = (view.phase == Phase::Ready).then(|| view.ready_since.map(millis_since_epoch)).flatten();
                Resident {
                    id,
                    name: view.spec.name.clone(),
                    ram: measured_ram.unwrap_or(holding.need.ram),
                    vram: measured_vram.unwrap_or(holding.need.vram),
                    last_used_ms: snapshot.last_used().or(view.ready_since).map_or(0, millis_since_epoch),
                    ready_ms,
                    load_ms: snapshot.stats.last_load.map(|d| d.as_millis() as u64),
                    drain_ms: snapshot.stats.service_ms.map(|ms| plan::drain_ms(ms, view.in_flight, view.slots)),
                    service_ms: snapshot.stats.service_ms.map(|ms| ms as u64),
                    pinned: view.pinned(),
                    busy: !snapshot.idle(),
                    releasing,
                }
            })
            .collect()
    }
}
