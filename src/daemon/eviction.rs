//! The daemon's half of the memory budget: measure, ask the policy in `budget`, act.
//!
//! Before a spawn, the loading instance asks [`Room::make_room`]: the other instances are
//! described as residents (estimate until they run, then measured RSS and GPU memory), the
//! policy answers, and idle victims are evicted least recently used first. Busy instances
//! are never killed; the load waits for them to drain, up to a deadline, and otherwise is
//! refused with the reason (exit 73). The supervisor also unloads instances whose TTL ran out.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::{self, Budget, Plan, Resident};
use crate::error::{Error, Result};
use crate::instance::{Instance, Room};
use crate::memory::{self, GpuReading};

use super::Shared;

/// How long a load waits for busy instances to finish before it gives up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const DRAIN_POLL: Duration = Duration::from_millis(20);

impl Shared {
    pub fn budget(&self, gpu: Option<&GpuReading>) -> Budget {
        let ram = budget::parse_size(&self.settings.memory_budget, memory::mem_total()).unwrap_or(u64::MAX);
        let vram = gpu.map(|gpu| budget::parse_size(&self.settings.vram_budget, gpu.total_bytes).unwrap_or(u64::MAX));
        Budget { ram, vram, max_instances: self.settings.max_instances }
    }

    fn residents(&self, except: &Instance, gpu: Option<&GpuReading>) -> (Vec<Arc<Instance>>, Vec<Resident>) {
        let others: Vec<Arc<Instance>> =
            self.table.all().into_iter().filter(|other| !std::ptr::eq(other.as_ref(), except)).collect();
        let residents = others.iter().enumerate().filter_map(|(id, other)| other.resident(id, gpu)).collect();
        (others, residents)
    }

    /// Unloads `victim` if it is still idle; true when it did.
    pub fn evict(&self, victim: &Instance, reason: &str) -> bool {
        if !victim.try_begin_eviction() {
            return false;
        }
        log::info!("unloading {}: {reason}", victim.spec.name);
        victim.finish_eviction(self.stop_grace(), &self.kill_now);
        let kind = if reason.starts_with("idle") { "expired" } else { "evicted" };
        self.events.publish(victim, kind, Some(reason.to_string()));
        self.evictions.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Unloads every instance whose TTL has run out. Called by the supervisor tick.
    pub fn expire_ttls(&self) {
        for instance in self.table.all() {
            if instance.ttl_expired(self.settings.default_ttl) {
                self.evict(&instance, "idle for longer than its TTL");
            }
        }
    }
}

impl Room for Shared {
    fn llama_server(&self) -> std::result::Result<std::path::PathBuf, String> {
        let installed = self.paths.installed_llama_server();
        crate::backend::llama::find_binary(self.settings.llama_server.as_deref(), None, &installed)
    }

    fn notify(&self, instance: &Instance, event: &str, detail: Option<String>) {
        self.events.publish(instance, event, detail);
    }

    fn make_room(&self, instance: &Instance) -> Result<()> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let gpu = self.gpu.reading();
            let budget = self.budget(gpu.as_ref());
            let need = instance.need(gpu.is_some());
            let (others, residents) = self.residents(instance, gpu.as_ref());
            match budget::plan(&budget, &residents, need) {
                Plan::Fits => return Ok(()),
                Plan::Evict(victims) => {
                    for id in victims {
                        let reason = format!("evicted to make room for {}", instance.spec.name);
                        self.evict(&others[id], &reason);
                    }
                }
                Plan::Drain(busy) => {
                    if Instant::now() >= deadline {
                        let names: Vec<&str> = busy.iter().map(|&id| others[id].spec.name.as_str()).collect();
                        return Err(Error::NoCapacity {
                            message: format!(
                                "cannot load {}: it fits only once {} finish, and they stayed busy for {} s",
                                instance.spec.name,
                                names.join(", "),
                                DRAIN_TIMEOUT.as_secs()
                            ),
                        });
                    }
                    std::thread::sleep(DRAIN_POLL);
                }
                Plan::NoCapacity(message) => {
                    return Err(Error::NoCapacity { message: format!("cannot load {}: {message}", instance.spec.name) })
                }
            }
        }
    }
}
