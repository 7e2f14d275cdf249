//! The memory budget and the eviction policy, as a pure function over a snapshot.
//!
//! Before a model loads, the daemon describes every instance that holds memory as a
//! [`Resident`] and asks [`plan`] what to do: it fits; evict these idle instances (least
//! recently used first, never a pinned one); wait for these busy ones to drain; or it cannot
//! fit even with every idle, unpinned instance gone. The function does no I/O, so the
//! policy is tested with tables of cases and no processes.

use std::fmt::Write;

/// Limits the daemon keeps to. `vram` is none on a machine without a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub ram: u64,
    pub vram: Option<u64>,
    pub max_instances: Option<usize>,
}

/// An instance that holds memory now, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub id: usize,
    pub name: String,
    pub ram: u64,
    pub vram: u64,
    /// Milliseconds since the epoch of the last request; 0 if never used.
    pub last_used_ms: u64,
    pub pinned: bool,
    /// Requests in flight or waiting, or a load in progress: never stopped, only drained.
    pub busy: bool,
    /// Already asked to unload: its memory comes back once it has drained and stopped.
    pub releasing: bool,
}

/// What a new instance needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub ram: u64,
    pub vram: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Start it now.
    Fits,
    /// Unload these instances (idle ones stop at once, busy ones drain first), least
    /// recently used first; it fits once they are gone.
    Release(Vec<usize>),
    /// It fits once the instances already releasing are gone: wait for them.
    Wait,
    /// It cannot fit; the message says how much is needed and what holds the memory.
    NoCapacity(String),
}

fn fits(budget: &Budget, kept: &[&Resident], need: Need) -> bool {
    let ram: u64 = kept.iter().map(|r| r.ram).fold(0, u64::saturating_add);
    let vram: u64 = kept.iter().map(|r| r.vram).fold(0, u64::saturating_add);
    let ram_ok = ram.saturating_add(need.ram) <= budget.ram;
    let vram_ok = budget.vram.is_none_or(|limit| vram.saturating_add(need.vram) <= limit);
    let count_ok = budget.max_instances.is_none_or(|max| kept.len() < max);
    ram_ok && vram_ok && count_ok
}

/// Decides what a load needs: start now, release some instances first, wait for releases
/// under way, or refuse because even every unpinned instance gone would not make room.
/// Memory is counted until an instance is really gone, so it is never booked twice.
pub fn plan(budget: &Budget, residents: &[Resident], need: Need) -> Plan {
    let all: Vec<&Resident> = residents.iter().collect();
    if fits(budget, &all, need) {
        return Plan::Fits;
    }
    if need.ram > budget.ram {
        return Plan::NoCapacity(format!(
            "the model needs {} of memory but the whole memory budget is {}; raise memory_budget in the config, \
             then `llmctl reload`",
            human(need.ram),
            human(budget.ram),
        ));
    }
    if let Some(limit) = budget.vram.filter(|&limit| need.vram > limit) {
        return Plan::NoCapacity(format!(
            "the model needs {} of GPU memory (its offloaded layers plus the CUDA context) but the whole GPU budget \
             is {}; lower gpu_layers, or raise vram_budget in the config, then `llmctl reload`",
            human(need.vram),
            human(limit),
        ));
    }
    let mut kept: Vec<&Resident> = residents.iter().filter(|r| !r.releasing).collect();
    if fits(budget, &kept, need) {
        return Plan::Wait;
    }
    let mut candidates: Vec<&Resident> = kept.iter().copied().filter(|r| !r.pinned).collect();
    // Idle before busy, then least recently used first.
    candidates.sort_by_key(|r| (r.busy, r.last_used_ms, r.id));
    let mut release = Vec::new();
    for victim in candidates {
        kept.retain(|r| r.id != victim.id);
        release.push(victim.id);
        if fits(budget, &kept, need) {
            return Plan::Release(release);
        }
    }
    Plan::NoCapacity(no_capacity_message(budget, residents, need))
}

fn no_capacity_message(budget: &Budget, residents: &[Resident], need: Need) -> String {
    let pinned: Vec<&Resident> = residents.iter().filter(|r| r.pinned).collect();
    let pinned_ram: u64 = pinned.iter().map(|r| r.ram).sum();
    let pinned_vram: u64 = pinned.iter().map(|r| r.vram).sum();
    let vram_short = budget.vram.is_some_and(|limit| pinned_vram.saturating_add(need.vram) > limit);
    let mut message = if vram_short {
        format!(
            "the model needs {} of GPU memory, and pinned models hold {} of the {} GPU budget (vram_budget)",
            human(need.vram),
            human(pinned_vram),
            human(budget.vram.unwrap_or(0))
        )
    } else if pinned_ram.saturating_add(need.ram) > budget.ram {
        format!(
            "the model needs {} of memory, and pinned models hold {} of the {} budget (memory_budget)",
            human(need.ram),
            human(pinned_ram),
            human(budget.ram)
        )
    } else {
        let max = budget.max_instances.unwrap_or(0);
        format!("at most {max} instances may run (max_instances), and {} of them are pinned", pinned.len())
    };
    if !pinned.is_empty() {
        let names: Vec<String> = pinned.iter().map(|r| format!("{} ({})", r.name, human(r.ram))).collect();
        let _ = write!(message, "; pinned: {}", names.join(", "));
    }
    let count_short = !vram_short && pinned_ram.saturating_add(need.ram) <= budget.ram;
    message.push_str("; unpin or stop a model");
    message.push_str(if vram_short {
        ", or raise vram_budget"
    } else if count_short {
        ", or raise max_instances"
    } else {
        ", or raise memory_budget"
    });
    message.push_str(" (then `llmctl reload`)");
    message
}

/// Bytes as a person reads them: "1.5 GiB", "94 MiB", "620 KiB" (never "0 MiB").
pub fn human(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = bytes as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else if mib >= 1.0 || bytes == 0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// Parses a budget: bytes ("8000000000"), a size ("12GiB", "512 MiB", "8G") or a share of
/// `total` ("75%").
pub fn parse_size(text: &str, total: u64) -> Result<u64, String> {
    let text = text.trim();
    if let Some(percent) = text.strip_suffix('%') {
        let percent: f64 = percent.trim().parse().map_err(|_| format!("`{text}` is not a percentage"))?;
        if !(0.0..=100.0).contains(&percent) {
            return Err(format!("`{text}` is not between 0% and 100%"));
        }
        return Ok((total as f64 * percent / 100.0) as u64);
    }
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 =
        number.parse().map_err(|_| format!("`{text}` is not a size (write bytes, \"12GiB\" or \"75%\")"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{text}` (use MiB, GiB or %)")),
    };
    Ok((number * multiplier as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn resident(id: usize, ram_gib: u64, last_used_ms: u64, pinned: bool, busy: bool) -> Resident {
        Resident {
            id,
            name: format!("m{id}"),
            ram: ram_gib * GIB,
            vram: 0,
            last_used_ms,
            pinned,
            busy,
            releasing: false,
        }
    }

    fn budget(ram_gib: u64) -> Budget {
        Budget { ram: ram_gib * GIB, vram: None, max_instances: None }
    }

    fn need(ram_gib: u64) -> Need {
        Need { ram: ram_gib * GIB, vram: 0 }
    }

    #[test]
    fn eviction_table() {
        let cases: Vec<(&str, Budget, Vec<Resident>, Need, Plan)> = vec![
            ("empty machine", budget(8), vec![], need(4), Plan::Fits),
            ("room left", budget(8), vec![resident(1, 3, 10, false, false)], need(4), Plan::Fits),
            (
                "least recently used goes first",
                budget(8),
                vec![resident(1, 3, 30, false, false), resident(2, 3, 10, false, false)],
                need(4),
                Plan::Release(vec![2]),
            ),
            (
                "as many as needed, oldest first",
                budget(8),
                vec![
                    resident(1, 3, 30, false, false),
                    resident(2, 3, 10, false, false),
                    resident(3, 2, 20, false, false),
                ],
                need(7),
                Plan::Release(vec![2, 3, 1]),
            ),
            (
                "pinned instances stay",
                budget(8),
                vec![resident(1, 3, 10, true, false), resident(2, 3, 30, false, false)],
                need(4),
                Plan::Release(vec![2]),
            ),
            (
                "busy instances are released after the idle ones (they drain)",
                budget(8),
                vec![resident(1, 6, 10, false, true), resident(2, 1, 30, false, false)],
                need(4),
                Plan::Release(vec![2, 1]),
            ),
            (
                "idle before busy even when the busy one is older",
                budget(8),
                vec![resident(1, 4, 10, false, true), resident(2, 4, 30, false, false)],
                need(4),
                Plan::Release(vec![2]),
            ),
            (
                "instance count limit",
                Budget { ram: 100 * GIB, vram: None, max_instances: Some(1) },
                vec![resident(1, 1, 10, false, false)],
                need(1),
                Plan::Release(vec![1]),
            ),
        ];
        for (name, budget, residents, need, expected) in cases {
            assert_eq!(plan(&budget, &residents, need), expected, "{name}");
        }
    }

    #[test]
    fn no_capacity_explains_itself() {
        let residents = vec![resident(1, 6, 10, true, false)];
        let Plan::NoCapacity(message) = plan(&budget(8), &residents, need(4)) else { panic!("expected no capacity") };
        assert!(message.contains("4.0 GiB") && message.contains("pinned: m1"), "{message}");
        let Plan::NoCapacity(message) = plan(&budget(8), &[], need(9)) else { panic!("expected no capacity") };
        assert!(message.contains("whole memory budget"), "{message}");
    }

    #[test]
    fn releases_under_way_are_waited_for_not_repeated() {
        let mut releasing = resident(1, 6, 10, false, true);
        releasing.releasing = true;
        let idle = resident(2, 1, 5, false, false);
        assert_eq!(plan(&budget(8), &[releasing.clone(), idle.clone()], need(4)), Plan::Wait);
        // Not enough even when the release is done: one more goes, the idle one.
        assert_eq!(plan(&budget(8), &[releasing, idle], need(8)), Plan::Release(vec![2]));
    }

    #[test]
    fn a_gpu_shortage_names_the_gpu_budget() {
        let budget = Budget { ram: 64 * GIB, vram: Some(GIB), max_instances: None };
        let Plan::NoCapacity(message) = plan(&budget, &[], Need { ram: GIB, vram: 2 * GIB }) else {
            panic!("expected no capacity")
        };
        assert!(message.contains("vram_budget") && !message.contains("memory_budget"), "{message}");
        let mut pinned = resident(1, 1, 10, true, false);
        pinned.vram = GIB / 2;
        let Plan::NoCapacity(message) = plan(&budget, &[pinned], Need { ram: GIB, vram: GIB * 3 / 4 }) else {
            panic!("expected no capacity")
        };
        assert!(message.contains("vram_budget") && message.contains("pinned: m1"), "{message}");
    }

    #[test]
    fn vram_is_budgeted_separately() {
        let budget = Budget { ram: 64 * GIB, vram: Some(8 * GIB), max_instances: None };
        let mut on_gpu = resident(1, 1, 10, false, false);
        on_gpu.vram = 6 * GIB;
        let plan = plan(&budget, &[on_gpu], Need { ram: GIB, vram: 4 * GIB });
        assert_eq!(plan, Plan::Release(vec![1]));
    }

    #[test]
    fn sizes_parse() {
        let table = [("1024", 1024), ("512MiB", 512 << 20), ("2 GiB", 2 << 30), ("1.5G", 3 << 29), ("50%", 500)];
        for (text, expected) in table {
            assert_eq!(parse_size(text, 1000).unwrap(), expected, "{text}");
        }
        for bad in ["lots", "5 parsecs", "150%", "%"] {
            assert!(parse_size(bad, 1000).is_err(), "{bad}");
        }
    }
}
