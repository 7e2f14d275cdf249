//! The scheduler: the one thread that decides which instances hold memory.
//!
//! Workers ask it for room before they spawn ([`RoomRequest::Want`]) and give the room back
//! once their child is reaped ([`RoomRequest::Return`]). Requests are answered strictly in
//! arrival order: the head of the line is planned with [`budget::plan`] against what the
//! granted instances hold (their estimate until they run, then measured RSS and GPU memory).
//! It starts at once, or the scheduler asks the least recently used unpinned instances to
//! unload (idle ones stop at once, busy ones drain first) and waits for their memory to come
//! back, or it is refused with 73 when it could not fit even with every unpinned instance
//! gone. Because only the head waits and everything it waits for is already unloading, two
//! loads never wait for each other. A head that waits longer than [`DRAIN_TIMEOUT`] is
//! refused with 124.
//!
//! Memory is counted from the grant until the worker reports the child gone, so it is never
//! booked twice, and a load whose clients all left is withdrawn from the line.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select_biased, Receiver};

use crate::budget::{self, Budget, Need, Plan, Resident};
use crate::error::Error;
use crate::instance::{Message, Phase, RoomRequest, RoomToken, Snapshot, Unload};
use crate::memory::{self, GpuReading};
use crate::process;

use super::shared::Shared;

/// How long the head of the line waits for busy instances to drain before it gives up.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

struct Waiting {
    id: usize,
    need: Need,
    since: Instant,
}

struct Holding {
    token: RoomToken,
    need: Need,
    /// Asked to unload to make room for the waiting load of this instance.
    releasing_for: Option<usize>,
}

pub(crate) fn budget(settings: &crate::settings::LiveSettings, gpu: Option<&GpuReading>) -> Budget {
    let ram = budget::parse_size(&settings.memory_budget, memory::mem_total()).unwrap_or(u64::MAX);
    let vram = gpu.map(|gpu| budget::parse_size(&settings.vram_budget, gpu.total_bytes).unwrap_or(u64::MAX));
    Budget { ram, vram, max_instances: settings.max_instances }
}

/// Runs until `stop` closes.
pub(crate) fn run(shared: &Arc<Shared>, requests: &Receiver<RoomRequest>, stop: &Receiver<()>) {
    let mut scheduler = Scheduler { shared, line: VecDeque::new(), holding: BTreeMap::new(), next_token: 0 };
    loop {
        let timeout = scheduler
            .line
            .front()
            .map_or(Duration::from_secs(3600), |head| DRAIN_TIMEOUT.saturating_sub(head.since.elapsed()));
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
    /// Loads waiting for room, in arrival order.
    line: VecDeque<Waiting>,
    /// Instances holding granted room, by id.
    holding: BTreeMap<usize, Holding>,
    next_token: RoomToken,
}

impl Scheduler<'_> {
    fn hear(&mut self, request: RoomRequest) {
        match request {
            RoomRequest::Want { id, need } => {
                if !self.line.iter().any(|waiting| waiting.id == id) {
                    self.line.push_back(Waiting { id, need, since: Instant::now() });
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
        self.plan_line();
        if self.line.is_empty() {
            self.call_off_releases();
        }
    }

    /// With no load waiting, instances still draining for one that left stay loaded.
    fn call_off_releases(&mut self) {
        let mut called_off = Vec::new();
        for (&id, holding) in self.holding.iter_mut() {
            if holding.releasing_for.take().is_some() {
                called_off.push((id, holding.token));
            }
        }
        for (id, token) in called_off {
            log::info!("{} stays loaded: the load it was unloading for is gone", self.name(id));
            self.send(id, Message::Keep(token));
        }
    }

    fn plan_line(&mut self) {
        while let Some(head) = self.line.front() {
            let (id, need) = (head.id, head.need);
            if head.since.elapsed() >= DRAIN_TIMEOUT {
                self.line.pop_front();
                let busy: Vec<String> = self
                    .holding
                    .iter()
                    .filter(|(_, h)| h.releasing_for.is_some())
                    .map(|(&id, _)| self.name(id))
                    .collect();
                let error = Error::Timeout {
                    what: format!(
                        "waiting for memory to load {}: {} stayed busy for {} s",
                        self.name(id),
                        if busy.is_empty() { "other models".to_string() } else { busy.join(", ") },
                        DRAIN_TIMEOUT.as_secs()
                    ),
                };
                self.send(id, Message::RoomRefused(error));
                continue;
            }
            let gpu = self.shared.services.gpu.latest();
            let budget = budget(&self.shared.live.read(), gpu.as_ref());
            let residents = self.residents(gpu.as_ref());
            match budget::plan(&budget, &residents, need) {
                Plan::Fits => {
                    self.line.pop_front();
                    self.next_token += 1;
                    let token = self.next_token;
                    self.holding.insert(id, Holding { token, need, releasing_for: None });
                    self.send(id, Message::RoomGranted(token));
                }
                Plan::Release(victims) => {
                    let for_whom = self.name(id);
                    let cutoff = self.shared.last_job();
                    for victim in victims {
                        let Some(holding) = self.holding.get_mut(&victim) else { continue };
                        holding.releasing_for = Some(id);
                        let token = holding.token;
                        log::info!("unloading {} to make room for {for_whom}", self.name(victim));
                        self.send(
                            victim,
                            Message::Unload {
                                why: Unload::Evict,
                                cutoff,
                                room: Some(token),
                                message: format!("unloaded to make room for {for_whom}"),
                                done: None,
                            },
                        );
                    }
                    return;
                }
                Plan::Wait => return,
                Plan::NoCapacity(message) => {
                    self.line.pop_front();
                    let error = Error::NoCapacity { message: format!("cannot load {}: {message}", self.name(id)) };
                    self.send(id, Message::RoomRefused(error));
                }
            }
        }
    }

    /// The instances holding room, as the policy sees them.
    fn residents(&self, gpu: Option<&GpuReading>) -> Vec<Resident> {
        self.holding
            .iter()
            .map(|(&id, holding)| {
                let snapshot: Option<Snapshot> = self.shared.table.by_id(id).map(|handle| handle.snapshot());
                let Some(snapshot) = snapshot else {
                    return Resident {
                        id,
                        name: String::new(),
                        ram: holding.need.ram,
                        vram: holding.need.vram,
                        last_used_ms: 0,
                        pinned: false,
                        busy: true,
                        releasing: holding.releasing_for.is_some(),
                    };
                };
                let view = &snapshot.view;
                // Until it runs, an instance is charged its estimate; then what it really uses.
                let measured_ram =
                    if view.phase == Phase::Ready { view.pid.and_then(process::rss_bytes) } else { None };
                let measured_vram = view.pid.and_then(|pid| gpu?.used_by_pid.get(&pid).copied());
                let idle = snapshot.idle();
                Resident {
                    id,
                    name: view.spec.name.clone(),
                    ram: measured_ram.unwrap_or(holding.need.ram),
                    vram: measured_vram.unwrap_or(holding.need.vram),
                    last_used_ms: snapshot
                        .last_used()
                        .or(view.ready_since)
                        .map_or(0, crate::instance::view::millis_since_epoch),
                    pinned: view.pinned(),
                    busy: !idle,
                    releasing: holding.releasing_for.is_some(),
                }
            })
            .collect()
    }
}
