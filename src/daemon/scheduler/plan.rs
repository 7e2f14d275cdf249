//! Who gets memory next, as a pure function: the loads waiting for room, the instances
//! holding it, the budget, what loads and waits have cost so far, and the time, in; the
//! orders (grant, evict, refuse, read ahead), each waiting load's place and estimated wait,
//! and when to look again, out. No I/O and no clocks of its own, so every case is a table
//! row and every ordering a seeded random schedule (see the tests).
//!
//! The rules, in the order they apply:
//! - **What is loaded is served first.** A request for a ready instance never comes here
//!   (it takes a slot at once); a load waits while the instances it would replace are
//!   busy, and only idle ones are evicted for it. This is what every peer does; serving
//!   models round-robin multiplies the swaps.
//! - **The wait is bounded.** A load whose oldest request has waited `max_wait` is
//!   *overdue*: it goes first. The busy instances it needs stop taking requests and drain
//!   (never killed) as long before that as their requests in flight and the load's first
//!   token take, so the swap comes just before the bound and the load's first token within
//!   `max_wait` and its load (plus whatever those requests run over their mean). From about
//!   one request before such a drain may begin, children are sent no request beyond their
//!   slots, which the drain would have to run first. `max_wait = 0` serves loads in strict
//!   arrival order.
//! - **No ping-pong.** A busy instance loaded less than `min_residency` ago is not drained
//!   for anyone; an idle one may be evicted.
//! - **A moment for the next request.** An instance that has just gone idle is kept for
//!   [`linger_ms`] before it is evicted for a load that is not overdue and that few
//!   requests wait for: a client that was just answered often asks the same model again
//!   at once, and a request served there costs a few milliseconds where one more swap
//!   costs two loads.
//! - **Victims by cost.** Among the instances that may go, the cheapest to lose go first:
//!   least recently used, with the time each took to load (per GiB it frees) counted as
//!   extra recency. Those not needed in the end are kept.
//! - **Loads that fit together start together**, in priority order: overdue loads and
//!   those an instance was already asked to unload for, by age; then the loads with the
//!   most requests waiting (one swap serves them all), then by age. Room freed for a load
//!   goes to it, never to the model that just left.
//!   A load that must wait keeps its room reserved, so those behind it never take it.

use crate::budget::{self, Budget, Need};

/// A waiting load, as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Waiting {
    pub(crate) id: usize,
    pub(crate) name: String,
    pub(crate) need: Need,
    /// Requests waiting for it.
    pub(crate) requests: usize,
    /// When its oldest request began to wait, in ms of the plan's clock.
    pub(crate) since_ms: u64,
    /// How long its last load took, if it ever loaded.
    pub(crate) load_ms: Option<u64>,
    /// How long its requests take from their slot to their first token (a weighted mean),
    /// if it ever answered one.
    pub(crate) first_token_ms: Option<u64>,
    /// An instance was already asked to unload for it: the room that frees is its own.
    pub(crate) promised: bool,
}

/// An instance holding memory, as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resident {
    pub(crate) id: usize,
    pub(crate) name: String,
    pub(crate) ram: u64,
    pub(crate) vram: u64,
    /// When a request last used it (or it became ready), in ms of the plan's clock.
    pub(crate) last_used_ms: u64,
    /// When it became ready; none while it loads.
    pub(crate) ready_ms: Option<u64>,
    pub(crate) load_ms: Option<u64>,
    /// About how long a drain begun now would take (see [`drain_ms`]).
    pub(crate) drain_ms: Option<u64>,
    /// How long one of its requests holds a slot (a weighted mean), once one has ended.
    pub(crate) service_ms: Option<u64>,
    pub(crate) pinned: bool,
    /// Requests in flight or waiting for it, or a load under way.
    pub(crate) busy: bool,
    /// Already asked to unload: its memory comes back once it has stopped.
    pub(crate) releasing: bool,
}

/// How long a load may wait, and how long an instance stays before it may be drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rules {
    /// None: derived from the waiting model's measured load time (see [`max_wait_ms`]).
    pub(crate) max_wait_ms: Option<u64>,
    /// None: derived from the instance's measured load time (see [`min_residency_ms`]).
    pub(crate) min_residency_ms: Option<u64>,
}

/// What a load is charged until it has loaded once: about a small model's load here.
const UNMEASURED_LOAD_MS: u64 = 1000;

/// What a first token is charged until the model has answered once: a small model's takes
/// 20-60 ms on two CPUs.
const UNMEASURED_FIRST_TOKEN_MS: u64 = 100;

/// The bound on a wait, the same for every model: configured, or ten of the longest load
/// measured among the models the plan sees, from 5 s to 2 min. A wait that long is a
/// small share of the time a busy model keeps serving, and models that load in a second
/// are never held up for more than a few.
pub(crate) fn max_wait_ms(rules: &Rules, load_ms: Option<u64>) -> u64 {
    rules.max_wait_ms.unwrap_or_else(|| (10 * load_ms.unwrap_or(UNMEASURED_LOAD_MS)).clamp(5_000, 120_000))
}

/// The default residency: four of the instance's own loads, from 1 s to 30 s, so a swap
/// is not undone before it has paid for itself.
pub(crate) fn min_residency_ms(rules: &Rules, load_ms: Option<u64>) -> u64 {
    rules.min_residency_ms.unwrap_or_else(|| (4 * load_ms.unwrap_or(UNMEASURED_LOAD_MS)).clamp(1_000, 30_000))
}

/// How long an instance that has just gone idle is kept for a load that is not overdue: a
/// tenth of its own load time, from 10 to 100 ms. Long enough for a client to send its
/// next request on a busy machine, short enough that a load waiting for the room loses
/// little when none comes.
pub(crate) fn linger_ms(load_ms: Option<u64>) -> u64 {
    (load_ms.unwrap_or(UNMEASURED_LOAD_MS) / 10).clamp(10, 100)
}

/// An instance lingers only for a load this few requests wait for. A swap pays for itself
/// over the requests it serves; with many waiting, the next request of the model going out
/// joins its next load's batch at little cost, and the linger would only delay them all.
const LINGER_FOR: usize = 2;

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Order {
    /// Start this load now.
    Grant(usize),
    /// Unload `victim` for the load of `for_id`: at once if idle, else after its requests
    /// in flight (it takes no new ones).
    Evict { victim: usize, for_id: usize },
    /// This load cannot fit even with every unpinned instance gone.
    Refuse(usize, String),
    /// Read this load's model file into the page cache while the room is freed.
    ReadAhead(usize),
}

/// A waiting load's place and estimated wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Eta {
    pub(crate) id: usize,
    /// 1 = next.
    pub(crate) position: usize,
    pub(crate) eta_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) orders: Vec<Order>,
    pub(crate) etas: Vec<Eta>,
    /// When the plan changes by itself (a load becomes overdue, a resident old enough to
    /// drain, a drain near), in ms of the plan's clock.
    pub(crate) next_ms: Option<u64>,
    /// A busy instance may begin to drain for a waiting load within about one of its
    /// requests (half of `max_wait` until one has ended): no child is to be sent a request
    /// beyond its slots, which that drain would have to run before the room is free. Until
    /// then children hold one as ever, so that a model serving while others wait loses no
    /// time between its requests.
    pub(crate) drain_near: bool,
}

/// The plan for `now_ms`.
pub(crate) fn plan(
    budget: &Budget,
    waiting: &[Waiting],
    residents: &[Resident],
    rules: &Rules,
    now_ms: u64,
) -> Outcome {
    let mut outcome = Outcome::default();
    let longest_load = waiting.iter().filter_map(|w| w.load_ms).chain(residents.iter().filter_map(|r| r.load_ms)).max();
    let max_wait = max_wait_ms(rules, longest_load);
    let overdue = |w: &Waiting| now_ms.saturating_sub(w.since_ms) >= max_wait;
    let mut order: Vec<&Waiting> = waiting.iter().collect();
    order.sort_by_key(|w| {
        // Overdue first, and those room is already being freed for, oldest first; then the
        // most requests per swap; then arrival. A load whose busy victims began to drain
        // for it before its bound keeps its place when they are gone before the bound.
        let first = overdue(w) || w.promised;
        (!first, if first { 0 } else { usize::MAX - w.requests }, w.since_ms, w.id)
    });
    // Room held now: by every resident (those releasing too, until they are gone) and by
    // the loads granted in this plan.
    let mut holding: Vec<Resident> = residents.to_vec();
    // Room promised to loads that wait, so those behind them never take it.
    let mut reserved = Need { ram: 0, vram: 0 };
    let mut reserved_count = 0;
    let mut eta_ms = 0u64;
    let mut position = 0;
    for load in order {
        let with_reserved = Need { ram: load.need.ram + reserved.ram, vram: load.need.vram + reserved.vram };
        if budget::fits(budget, &held(&holding), with_reserved, reserved_count) {
            outcome.orders.push(Order::Grant(load.id));
            holding.push(Resident::loading(load, now_ms));
            continue;
        }
        if let Some(reason) = budget::never_fits(budget, &pinned(residents), load.need) {
            outcome.orders.push(Order::Refuse(load.id, reason));
            continue;
        }
        position += 1;
        // What may be asked to go for this load: idle instances; busy ones only as the load
        // nears its bound, and only once they have been loaded for their residency.
        let late = overdue(load);
        let kept: Vec<Resident> = holding.iter().filter(|r| !r.releasing).cloned().collect();
        let mut candidates: Vec<&Resident> = kept
            .iter()
            .filter(|r| !r.pinned && r.ready_ms.is_some())
            .filter(|r| {
                !r.busy || r.ready_ms.is_some_and(|ready| now_ms >= drains_from(load, r, ready, max_wait, rules))
            })
            .collect();
        candidates.sort_by(|a, b| keep_score(a).total_cmp(&keep_score(b)).then(a.id.cmp(&b.id)));
        let fits_without = |gone: &[usize]| {
            let after: Vec<Resident> = kept.iter().filter(|r| !gone.contains(&r.id)).cloned().collect();
            budget::fits(budget, &held(&after), with_reserved, reserved_count)
        };
        let mut chosen: Vec<usize> = Vec::new();
        let mut fits = fits_without(&chosen);
        for victim in &candidates {
            if fits {
                break;
            }
            chosen.push(victim.id);
            fits = fits_without(&chosen);
        }
        if fits {
            // Keep any victim the others made unnecessary (a small one taken before a
            // large one that alone was enough).
            for id in chosen.clone() {
                let without: Vec<usize> = chosen.iter().copied().filter(|&c| c != id).collect();
                if fits_without(&without) {
                    chosen = without;
                }
            }
        } else {
            // Not yet: nothing is evicted for it now. It waits for instances to become
            // idle, or old enough, or for its own wait to run out.
            chosen.clear();
        }
        // A victim that has only just gone idle is not evicted yet, for a load that few
        // requests wait for and that is not overdue: the same victims are chosen once it has
        // lingered, unless a request came back for it meanwhile.
        let lingering: Vec<u64> = if late || load.requests > LINGER_FOR {
            Vec::new()
        } else {
            kept.iter()
                .filter(|r| chosen.contains(&r.id) && !r.busy && now_ms < lingers_until(r))
                .map(lingers_until)
                .collect()
        };
        if !lingering.is_empty() {
            chosen.clear();
        }
        for &victim in &chosen {
            outcome.orders.push(Order::Evict { victim, for_id: load.id });
            if let Some(resident) = holding.iter_mut().find(|r| r.id == victim) {
                resident.releasing = true;
            }
        }
        if !chosen.is_empty() || (fits && holding.iter().any(|r| r.releasing)) {
            outcome.orders.push(Order::ReadAhead(load.id));
        }
        reserved.ram += load.need.ram;
        reserved.vram += load.need.vram;
        reserved_count += 1;
        // Its wait: the loads before it, and, while it waits for busy instances, what is
        // left of its bound.
        let left = if fits { 0 } else { max_wait.saturating_sub(now_ms.saturating_sub(load.since_ms)) };
        eta_ms += left + load.load_ms.unwrap_or(UNMEASURED_LOAD_MS);
        outcome.etas.push(Eta { id: load.id, position, eta_ms });
        // Look again when it becomes overdue, when an idle instance has lingered, or when
        // a busy instance it waits for may begin to drain for it.
        let mut next = (!late).then(|| load.since_ms + max_wait);
        if let Some(&until) = lingering.iter().max() {
            next = Some(next.map_or(until, |n| n.min(until)));
        }
        if !fits {
            for resident in kept.iter().filter(|r| r.busy && !r.pinned) {
                // One still loading is judged as if it were ready now: the moment it is, it
                // grants its waiters slots.
                let ready_ms = resident.ready_ms.unwrap_or(now_ms);
                let from = drains_from(load, resident, ready_ms, max_wait, rules);
                let near = from.saturating_sub(resident.service_ms.unwrap_or(max_wait / 2));
                if now_ms >= near {
                    outcome.drain_near = true;
                }
                let times = if resident.ready_ms.is_some() { [near, from] } else { [near, near] };
                for at in times.into_iter().filter(|&at| at > now_ms) {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        if let Some(next) = next {
            outcome.next_ms = Some(outcome.next_ms.map_or(next, |n| n.min(next)));
        }
    }
    outcome
}

fn lingers_until(resident: &Resident) -> u64 {
    resident.last_used_ms + linger_ms(resident.load_ms)
}

/// How long a drain begun now takes an instance with `in_flight` requests on `slots` slots,
/// each holding one for `service_ms` on average: those running end, and those sent beyond
/// its slots (which wait inside the child) run after them, a slot's worth at a time.
pub(crate) fn drain_ms(service_ms: f64, in_flight: u32, slots: u32) -> u64 {
    let rounds = in_flight.div_ceil(slots.max(1)).max(1);
    (service_ms * rounds as f64) as u64
}

/// When the busy `resident`, ready since `ready_ms`, may begin to drain for `load`: as long
/// before the load's bound as its drain and the load's first token take (at most half the
/// bound), so that the load's request is answered once it has loaded, as the bound comes;
/// and not before the resident has stayed its residency.
fn drains_from(load: &Waiting, resident: &Resident, ready_ms: u64, max_wait: u64, rules: &Rules) -> u64 {
    let first_token = load.first_token_ms.unwrap_or(UNMEASURED_FIRST_TOKEN_MS);
    let lead = (resident.drain_ms.unwrap_or(0) + first_token).min(max_wait / 2);
    let bound = load.since_ms + max_wait - lead;
    bound.max(ready_ms + min_residency_ms(rules, resident.load_ms))
}

fn held(residents: &[Resident]) -> Vec<budget::Held> {
    residents
        .iter()
        .map(|r| budget::Held { ram: r.ram, vram: r.vram, name: r.name.clone(), pinned: r.pinned })
        .collect()
}

fn pinned(residents: &[Resident]) -> Vec<budget::Held> {
    held(residents).into_iter().filter(|r| r.pinned).collect()
}

/// How much `resident` is worth keeping, in milliseconds of recency: when it was last used,
/// plus the time it took to load per GiB it holds (at least a quarter GiB), the way
/// GreedyDual-Size weighs cost by size. The lowest goes first: among models used about as
/// recently, the one quickest to load again per byte freed; a model slow to load counts as
/// if it had been used that much later. Busy ones only after every idle one.
fn keep_score(resident: &Resident) -> f64 {
    let gib = ((resident.ram + resident.vram) as f64 / (1u64 << 30) as f64).max(0.25);
    let credit = resident.load_ms.unwrap_or(UNMEASURED_LOAD_MS) as f64 / gib;
    let busy = if resident.busy { 1e15 } else { 0.0 };
    busy + resident.last_used_ms as f64 + credit
}

impl Resident {
    /// A load granted in this plan, holding its room from now.
    fn loading(load: &Waiting, now_ms: u64) -> Resident {
        Resident {
            id: load.id,
            name: load.name.clone(),
            ram: load.need.ram,
            vram: load.need.vram,
            last_used_ms: now_ms,
            ready_ms: None,
            load_ms: load.load_ms,
            drain_ms: None,
            service_ms: None,
            pinned: false,
            busy: true,
            releasing: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn budget(ram_gib: u64, max_instances: Option<usize>) -> Budget {
        Budget { ram: ram_gib * GIB, vram: None, max_instances }
    }

    fn waiting(id: usize, ram_gib: u64, requests: usize, since_ms: u64) -> Waiting {
        Waiting {
            id,
            name: format!("w{id}"),
            need: Need { ram: ram_gib * GIB, vram: 0 },
            requests,
            since_ms,
            load_ms: Some(500),
            first_token_ms: Some(100),
            promised: false,
        }
    }

    fn resident(id: usize, ram_gib: u64, busy: bool, ready_ms: u64) -> Resident {
        Resident {
            id,
            name: format!("r{id}"),
            ram: ram_gib * GIB,
            vram: 0,
            last_used_ms: ready_ms,
            ready_ms: Some(ready_ms),
            load_ms: Some(500),
            drain_ms: None,
            service_ms: None,
            pinned: false,
            busy,
            releasing: false,
        }
    }

    /// max_wait 10 s, min_residency 2 s unless a case says otherwise.
    const RULES: Rules = Rules { max_wait_ms: Some(10_000), min_residency_ms: Some(2_000) };

    fn orders(outcome: &Outcome) -> Vec<Order> {
        outcome.orders.clone()
    }

    #[test]
    fn plan_table() {
        use Order::*;
        let now = 100_000;
        let mut pinned = resident(1, 6, false, 0);
        pinned.pinned = true;
        let mut releasing = resident(1, 6, true, 0);
        releasing.releasing = true;
        let mut slow_to_load = resident(1, 2, false, now - 1000);
        slow_to_load.load_ms = Some(5000);
        let mut quick_to_load = resident(2, 2, false, now - 1000);
        quick_to_load.load_ms = Some(300);
        let mut small_cheap = resident(1, 1, false, now - 1000);
        small_cheap.load_ms = Some(10);
        let mut large = resident(2, 6, false, now - 1000);
        large.load_ms = Some(1000);
        let mut just_idle = resident(1, 6, false, now - 5000);
        just_idle.last_used_ms = now - 20;
        let mut cheap_just_idle = resident(3, 2, false, now - 5000);
        cheap_just_idle.last_used_ms = now - 20;
        cheap_just_idle.load_ms = Some(300);
        let mut dear_idle = resident(1, 2, false, now - 1000);
        dear_idle.load_ms = Some(5000);
        let mut drains_in_1500 = resident(1, 3, true, now - 5000);
        drains_in_1500.drain_ms = Some(1500);
        let mut drains_in_20_000 = resident(1, 3, true, now - 5000);
        drains_in_20_000.drain_ms = Some(20_000);
        let mut promised = waiting(5, 4, 1, now - 3000);
        promised.promised = true;
        let one = Some(1);
        // (name, budget, waiting, residents, rules, expected orders)
        type Case = (&'static str, Budget, Vec<Waiting>, Vec<Resident>, Rules, Vec<Order>);
        let cases: Vec<Case> = vec![
            (
                "an empty machine loads at once",
                budget(8, None),
                vec![waiting(5, 4, 1, now)],
                vec![],
                RULES,
                vec![Grant(5)],
            ),
            (
                "room left: loads at once",
                budget(8, None),
                vec![waiting(5, 4, 1, now)],
                vec![resident(1, 3, true, 0)],
                RULES,
                vec![Grant(5)],
            ),
            (
                "an idle instance is evicted, and the file read ahead",
                budget(8, one),
                vec![waiting(5, 4, 1, now)],
                vec![resident(1, 3, false, 0)],
                RULES,
                vec![Evict { victim: 1, for_id: 5 }, ReadAhead(5)],
            ),
            (
                "a busy instance is served first: the load waits",
                budget(8, one),
                vec![waiting(5, 4, 1, now - 1000)],
                vec![resident(1, 3, true, 0)],
                RULES,
                vec![],
            ),
            (
                "an overdue load drains a busy instance that has stayed its residency",
                budget(8, one),
                vec![waiting(5, 4, 1, now - 10_000)],
                vec![resident(1, 3, true, now - 5000)],
                RULES,
                vec![Evict { victim: 1, for_id: 5 }, ReadAhead(5)],
            ),
            (
                "a busy instance drains as long before the bound as its drain and the load's first token take",
                budget(8, one),
                vec![waiting(5, 4, 1, now - 8400)],
                vec![drains_in_1500.clone()],
                RULES,
                vec![Evict { victim: 1, for_id: 5 }, ReadAhead(5)],
            ),
            (
                "and not sooner",
                budget(8, one),
                vec![waiting(5, 4, 1, now - 8399)],
                vec![drains_in_1500.clone()],
                RULES,
                vec![],
            ),
            (
                "nor more than half the bound before it, however long its requests",
                budget(8, one),
                vec![waiting(5, 4, 1, now - 4999)],
                vec![drains_in_20_000.clone()],
                RULES,
                vec![],
            ),
            (
                "not one loaded less than min_residency ago",
                budget(8, one),
                vec![waiting(5, 4, 1, now - 10_000)],
                vec![resident(1, 3, true, now - 1000)],
                RULES,
                vec![],
            ),
            (
                "pinned instances stay: a load that can never fit is refused",
                budget(8, None),
                vec![waiting(5, 4, 1, now)],
                vec![pinned.clone()],
                RULES,
                vec![Refuse(5, never_fits_message(&budget(8, None), &pinned, 4))],
            ),
            (
                "more requests per swap first, when none is overdue",
                budget(8, one),
                vec![waiting(5, 4, 1, now - 3000), waiting(6, 4, 5, now - 1000)],
                vec![],
                RULES,
                vec![Grant(6)],
            ),
            (
                "max_wait 0 is strict arrival order",
                budget(8, one),
                vec![waiting(5, 4, 1, now - 3000), waiting(6, 4, 5, now - 1000)],
                vec![],
                Rules { max_wait_ms: Some(0), min_residency_ms: Some(0) },
                vec![Grant(5)],
            ),
            (
                "an overdue load goes before one with more requests",
                budget(8, one),
                vec![waiting(5, 4, 1, now - 20_000), waiting(6, 4, 5, now - 1000)],
                vec![],
                RULES,
                vec![Grant(5)],
            ),
            (
                "room freed for a load is its own, not the next of the model that left",
                budget(8, one),
                vec![promised.clone(), waiting(6, 4, 5, now - 500)],
                vec![],
                RULES,
                vec![Grant(5)],
            ),
            (
                "loads that fit together start together",
                budget(8, None),
                vec![waiting(5, 3, 1, now), waiting(6, 3, 1, now)],
                vec![],
                RULES,
                vec![Grant(5), Grant(6)],
            ),
            (
                "the victim is the one cheapest to load again",
                budget(8, Some(2)),
                vec![waiting(5, 2, 1, now)],
                vec![slow_to_load, quick_to_load],
                RULES,
                vec![Evict { victim: 2, for_id: 5 }, ReadAhead(5)],
            ),
            (
                "one large instance evicted admits two small loads, which wait together",
                budget(8, None),
                vec![waiting(5, 3, 2, now), waiting(6, 3, 1, now)],
                vec![resident(1, 6, false, now - 5000)],
                RULES,
                vec![Evict { victim: 1, for_id: 5 }, ReadAhead(5), ReadAhead(6)],
            ),
            (
                "a waiting load keeps its room: a smaller one behind it does not take it",
                budget(8, None),
                vec![waiting(5, 4, 2, now), waiting(6, 2, 1, now)],
                vec![resident(1, 5, true, now - 100)],
                RULES,
                vec![],
            ),
            (
                "room being released is waited for, not released again",
                budget(8, one),
                vec![waiting(5, 4, 1, now)],
                vec![releasing, resident(2, 1, false, 0)],
                Rules { max_wait_ms: Some(10_000), min_residency_ms: Some(0) },
                vec![Evict { victim: 2, for_id: 5 }, ReadAhead(5)],
            ),
            (
                "an instance idle for less than its linger is kept for a load not overdue",
                budget(8, None),
                vec![waiting(5, 4, 1, now - 1000)],
                vec![just_idle.clone()],
                RULES,
                vec![],
            ),
            (
                "the victim that lingers is waited for, not replaced by a dearer one",
                budget(8, None),
                vec![waiting(5, 5, 1, now - 1000)],
                vec![cheap_just_idle.clone(), dear_idle.clone()],
                RULES,
                vec![],
            ),
            (
                "and taken once it has lingered",
                budget(8, None),
                vec![waiting(5, 5, 1, now - 1000)],
                vec![Resident { last_used_ms: now - 1000, ..cheap_just_idle.clone() }, dear_idle.clone()],
                RULES,
                vec![Evict { victim: 3, for_id: 5 }, ReadAhead(5)],
            ),
            (
                "nor for a load many requests wait for",
                budget(8, None),
                vec![waiting(5, 4, 3, now - 1000)],
                vec![just_idle.clone()],
                RULES,
                vec![Evict { victim: 1, for_id: 5 }, ReadAhead(5)],
            ),
            (
                "nor for an overdue one",
                budget(8, None),
                vec![waiting(5, 4, 1, now - 10_000)],
                vec![just_idle.clone()],
                RULES,
                vec![Evict { victim: 1, for_id: 5 }, ReadAhead(5)],
            ),
            (
                "nor in strict arrival order",
                budget(8, None),
                vec![waiting(5, 4, 1, now)],
                vec![just_idle.clone()],
                Rules { max_wait_ms: Some(0), min_residency_ms: Some(0) },
                vec![Evict { victim: 1, for_id: 5 }, ReadAhead(5)],
            ),
            (
                "a victim the others made unnecessary stays",
                budget(8, None),
                vec![waiting(5, 6, 1, now)],
                vec![small_cheap, large],
                RULES,
                vec![Evict { victim: 2, for_id: 5 }, ReadAhead(5)],
            ),
        ];
        for (name, budget, waiting, residents, rules, expected) in cases {
            let outcome = plan(&budget, &waiting, &residents, &rules, now);
            assert_eq!(orders(&outcome), expected, "{name}");
        }
    }

    fn never_fits_message(budget: &Budget, pinned: &Resident, need_gib: u64) -> String {
        let held = budget::Held { ram: pinned.ram, vram: 0, name: pinned.name.clone(), pinned: true };
        budget::never_fits(budget, &[held], Need { ram: need_gib * GIB, vram: 0 }).unwrap()
    }

    #[test]
    fn waiting_loads_know_their_place_their_wait_and_when_to_look_again() {
        let now = 50_000;
        let outcome = plan(
            &budget(8, Some(1)),
            &[waiting(5, 4, 3, now - 1000), waiting(6, 4, 1, now - 2000)],
            &[resident(1, 3, true, now - 4000)],
            &RULES,
            now,
        );
        assert!(outcome.orders.is_empty(), "both wait for the busy instance");
        assert_eq!(outcome.etas.iter().map(|e| (e.id, e.position)).collect::<Vec<_>>(), vec![(5, 1), (6, 2)]);
        // The first waits out what is left of its bound, then loads; the second after it.
        assert_eq!(outcome.etas[0].eta_ms, 9000 + 500);
        assert!(outcome.etas[1].eta_ms > outcome.etas[0].eta_ms);
        // Look again as the older nears its bound: the busy instance may begin to drain its
        // first token's 100 ms before it, and the drain is near half the bound before that
        // while none of its requests has ended.
        assert_eq!(outcome.next_ms, Some(now - 2000 + 10_000 - 100 - 5000));
        // Or, where the busy instance's requests take a second and the load's first token
        // 100 ms, that much before it, when it may begin to drain, and one request before
        // that, when the drain is near; a load that never answered is charged 100 ms for
        // its first token too.
        let mut busy = resident(1, 3, true, now - 4000);
        busy.drain_ms = Some(1000);
        busy.service_ms = Some(1000);
        let outcome = plan(&budget(8, Some(1)), &[waiting(6, 4, 1, now - 2000)], &[busy.clone()], &RULES, now);
        assert_eq!(outcome.next_ms, Some(now - 2000 + 10_000 - 1000 - 100 - 1000));
        let near = now - 2000 + 10_000 - 1000 - 100 - 1000;
        let outcome = plan(&budget(8, Some(1)), &[waiting(6, 4, 1, now - 2000)], &[busy.clone()], &RULES, near);
        assert_eq!(outcome.next_ms, Some(now - 2000 + 10_000 - 1000 - 100));
        let mut slow_first_token = waiting(6, 4, 1, now - 2000);
        slow_first_token.first_token_ms = Some(700);
        let outcome = plan(&budget(8, Some(1)), &[slow_first_token.clone()], &[busy.clone()], &RULES, near);
        assert_eq!(outcome.next_ms, Some(now - 2000 + 10_000 - 1000 - 700));
        slow_first_token.first_token_ms = None;
        let outcome = plan(&budget(8, Some(1)), &[slow_first_token], &[busy], &RULES, near);
        assert_eq!(outcome.next_ms, Some(now - 2000 + 10_000 - 1000 - UNMEASURED_FIRST_TOKEN_MS));
        // Overdue, but the busy instance is too young: look again when it is old enough.
        let outcome = plan(
            &budget(8, Some(1)),
            &[waiting(5, 4, 1, now - 20_000)],
            &[resident(1, 3, true, now - 500)],
            &RULES,
            now,
        );
        assert!(outcome.orders.is_empty());
        assert_eq!(outcome.next_ms, Some(now - 500 + 2000));
        // An idle instance that lingers: look again when its linger ends (a tenth of its
        // 500 ms load).
        let mut just_idle = resident(1, 3, false, now - 4000);
        just_idle.last_used_ms = now - 20;
        let outcome = plan(&budget(8, Some(1)), &[waiting(5, 4, 1, now - 1000)], &[just_idle], &RULES, now);
        assert!(outcome.orders.is_empty());
        assert_eq!(outcome.next_ms, Some(now - 20 + 50));
    }

    /// Children hold a request beyond their slots until about one request before a busy
    /// instance may begin to drain for a waiting load: from then on a request held would
    /// lengthen that drain.
    #[test]
    fn a_drain_is_near_one_request_before_a_busy_instance_may_begin_it() {
        let now = 50_000;
        let rules = Rules { max_wait_ms: Some(10_000), min_residency_ms: Some(0) };
        let mut busy = resident(1, 3, true, now - 4000);
        busy.drain_ms = Some(1000);
        busy.service_ms = Some(800);
        let since = now - 2000;
        // It may begin to drain at since + 10 s - (1 s drain + 100 ms first token).
        let from = since + 10_000 - 1100;
        let near_at = |at: u64, resident: Resident| {
            plan(&budget(8, Some(1)), &[waiting(6, 4, 1, since)], &[resident], &rules, at).drain_near
        };
        assert!(!near_at(now, busy.clone()), "the drain is 6 s away");
        assert!(!near_at(from - 801, busy.clone()));
        assert!(near_at(from - 800, busy.clone()), "one request before it");
        // Then the drain itself is ordered; the instance draining takes nothing more.
        let outcome = plan(&budget(8, Some(1)), &[waiting(6, 4, 1, since)], &[busy.clone()], &rules, from);
        assert_eq!(orders(&outcome), vec![Order::Evict { victim: 1, for_id: 6 }, Order::ReadAhead(6)]);
        // Until one of its requests has ended, half the bound before.
        let unmeasured = Resident { service_ms: None, ..busy.clone() };
        assert!(!near_at(from - 5001, unmeasured.clone()));
        assert!(near_at(from - 5000, unmeasured));
        // An idle instance is evicted, not drained; nothing waits: nothing is near.
        assert!(!near_at(from - 800, Resident { busy: false, ..busy.clone() }));
        assert!(!plan(&budget(8, Some(1)), &[], &[busy.clone()], &rules, from - 800).drain_near);
        // A pinned instance never drains for anyone.
        assert!(!near_at(from - 800, Resident { pinned: true, ..busy.clone() }));
        // One still loading is judged as if it were ready now: with no residency and strict
        // arrival order its drain is near at once, since it grants its waiters slots the
        // moment it is ready.
        let strict = Rules { max_wait_ms: Some(0), min_residency_ms: Some(0) };
        let loading = Resident { ready_ms: None, ..busy.clone() };
        let outcome = plan(&budget(8, Some(1)), &[waiting(6, 4, 1, now)], std::slice::from_ref(&loading), &strict, now);
        assert!(outcome.drain_near && outcome.orders.is_empty(), "{outcome:?}");
        // With a residency of 4 s it is not, and the plan looks again when it will be.
        let resident_4s = Rules { max_wait_ms: Some(0), min_residency_ms: Some(4000) };
        let outcome = plan(&budget(8, Some(1)), &[waiting(6, 4, 1, now)], &[loading], &resident_4s, now);
        assert!(!outcome.drain_near);
        assert_eq!(outcome.next_ms, Some(now + 4000 - 800));
    }

    #[test]
    fn defaults_follow_measured_load_times() {
        let auto = Rules { max_wait_ms: None, min_residency_ms: None };
        assert_eq!(max_wait_ms(&auto, Some(300)), 5_000, "a quick model waits at least 5 s");
        assert_eq!(max_wait_ms(&auto, Some(2_000)), 20_000);
        assert_eq!(max_wait_ms(&auto, Some(60_000)), 120_000, "at most 2 min");
        assert_eq!(min_residency_ms(&auto, Some(300)), 1_200);
        assert_eq!(min_residency_ms(&auto, None), 4_000);
        assert_eq!(linger_ms(Some(300)), 30);
        assert_eq!(linger_ms(Some(20)), 10, "at least 10 ms");
        assert_eq!(linger_ms(Some(60_000)), 100, "at most 100 ms");
        assert_eq!(max_wait_ms(&RULES, Some(60_000)), 10_000, "a configured value is used as is");
    }
}
