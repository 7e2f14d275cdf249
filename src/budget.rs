//! The memory budget: what fits beside what (RAM, GPU memory, the number of instances),
//! and why a model can never fit. Pure functions; the scheduler's plan
//! (`daemon::scheduler::plan`) decides with them who holds memory.

use std::fmt::Write;

/// Limits the daemon keeps to. `vram` is none on a machine without a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    pub ram: u64,
    pub vram: Option<u64>,
    pub max_instances: Option<usize>,
}

/// Memory an instance holds (or will hold), as the budget sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    pub ram: u64,
    pub vram: u64,
    pub name: String,
    pub pinned: bool,
}

/// What a new instance needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Need {
    pub ram: u64,
    pub vram: u64,
}

/// True when `need` fits beside `held`, with `extra` more instances promised room.
pub(crate) fn fits(budget: &Budget, held: &[Held], need: Need, extra: usize) -> bool {
    let ram: u64 = held.iter().map(|r| r.ram).fold(0, u64::saturating_add);
    let vram: u64 = held.iter().map(|r| r.vram).fold(0, u64::saturating_add);
    let ram_ok = ram.saturating_add(need.ram) <= budget.ram;
    let vram_ok = budget.vram.is_none_or(|limit| vram.saturating_add(need.vram) <= limit);
    let count_ok = budget.max_instances.is_none_or(|max| held.len() + extra < max);
    ram_ok && vram_ok && count_ok
}

/// Why `need` can never fit, even with every unpinned instance gone (`pinned` are the
/// pinned ones): the message says how much is needed and what holds the memory.
pub(crate) fn never_fits(budget: &Budget, pinned: &[Held], need: Need) -> Option<String> {
    if need.ram > budget.ram {
        return Some(format!(
            "the model needs {} of memory but the whole memory budget is {}; raise memory_budget in the config, \
             then `llmctl reload`",
            human(need.ram),
            human(budget.ram),
        ));
    }
    if let Some(limit) = budget.vram.filter(|&limit| need.vram > limit) {
        return Some(format!(
            "the model needs {} of GPU memory (its offloaded layers plus the CUDA context) but the whole GPU budget \
             is {}; lower gpu_layers, or raise vram_budget in the config, then `llmctl reload`",
            human(need.vram),
            human(limit),
        ));
    }
    if fits(budget, pinned, need, 0) {
        return None;
    }
    Some(no_capacity_message(budget, pinned, need))
}

fn no_capacity_message(budget: &Budget, pinned: &[Held], need: Need) -> String {
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
pub(crate) fn human(bytes: u64) -> String {
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
pub(crate) fn parse_size(text: &str, total: u64) -> Result<u64, String> {
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

    fn held(name: &str, ram_gib: u64, pinned: bool) -> Held {
        Held { ram: ram_gib * GIB, vram: 0, name: name.into(), pinned }
    }

    fn budget(ram_gib: u64) -> Budget {
        Budget { ram: ram_gib * GIB, vram: None, max_instances: None }
    }

    fn need(ram_gib: u64) -> Need {
        Need { ram: ram_gib * GIB, vram: 0 }
    }

    #[test]
    fn fitting_counts_bytes_gpu_memory_and_instances() {
        assert!(fits(&budget(8), &[held("a", 3, false)], need(4), 0));
        assert!(!fits(&budget(8), &[held("a", 5, false)], need(4), 0));
        let one = Budget { ram: 100 * GIB, vram: None, max_instances: Some(2) };
        assert!(fits(&one, &[held("a", 1, false)], need(1), 0));
        assert!(!fits(&one, &[held("a", 1, false)], need(1), 1), "a promised instance counts");
        let gpu = Budget { ram: 64 * GIB, vram: Some(8 * GIB), max_instances: None };
        let mut on_gpu = held("g", 1, false);
        on_gpu.vram = 6 * GIB;
        assert!(!fits(&gpu, &[on_gpu], Need { ram: GIB, vram: 4 * GIB }, 0));
    }

    #[test]
    fn no_capacity_explains_itself() {
        let message = never_fits(&budget(8), &[held("m1", 6, true)], need(4)).expect("no capacity");
        assert!(message.contains("4.0 GiB") && message.contains("pinned: m1"), "{message}");
        let message = never_fits(&budget(8), &[], need(9)).expect("no capacity");
        assert!(message.contains("whole memory budget"), "{message}");
        assert_eq!(never_fits(&budget(8), &[held("m1", 2, true)], need(4)), None);
    }

    #[test]
    fn a_gpu_shortage_names_the_gpu_budget() {
        let budget = Budget { ram: 64 * GIB, vram: Some(GIB), max_instances: None };
        let message = never_fits(&budget, &[], Need { ram: GIB, vram: 2 * GIB }).expect("no capacity");
        assert!(message.contains("vram_budget") && !message.contains("memory_budget"), "{message}");
        let mut pinned = held("m1", 1, true);
        pinned.vram = GIB / 2;
        let message = never_fits(&budget, &[pinned], Need { ram: GIB, vram: GIB * 3 / 4 }).expect("no capacity");
        assert!(message.contains("vram_budget") && message.contains("pinned: m1"), "{message}");
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
