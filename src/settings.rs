//! The daemon's settings: each one's default, written once here, and how flags, the
//! environment and the config file combine into what the daemon uses (flag > environment >
//! config > default). [`TABLE`] names every setting with its config key, its environment
//! variable and whether a reload changes it while the daemon runs; the daemon, `llmctl
//! config` and the docs read it from here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{parse_ttl, Config, Ttl, DEFAULT_QUEUE_DEPTH};

/// The memory budget unless configured: three quarters of MemTotal leaves room for the
/// rest of the machine.
pub(crate) const DEFAULT_MEMORY_BUDGET: &str = "75%";
/// The GPU memory budget unless configured.
pub(crate) const DEFAULT_VRAM_BUDGET: &str = "90%";
/// Seconds a load may go without output from the child before it fails.
pub(crate) const DEFAULT_LOAD_TIMEOUT_S: u64 = 120;
/// Seconds without a token before a generation is declared stalled.
pub(crate) const DEFAULT_TOKEN_TIMEOUT_S: u64 = 300;
/// Failures within the crash window after which an instance is not restarted.
pub(crate) const DEFAULT_CRASH_LIMIT: usize = 3;
pub(crate) const DEFAULT_CRASH_WINDOW_S: u64 = 60;
/// How long a request may wait for a slot, in seconds.
pub(crate) const QUEUE_TIMEOUT_S: u64 = 600;
/// Time a child gets between SIGTERM and SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);
/// Disk the saved prompt caches may use unless configured: a few conversations of a large
/// model (a 30,000-token context of an 8B model is about 4 GiB), hundreds of a small one.
pub(crate) const DEFAULT_CACHE_BUDGET: &str = "4GiB";
/// The longest saving prompt caches may delay a stop, all slots together, and the longest a
/// restore may delay a load. A child that has not answered by then is stopped (or served)
/// anyway.
pub(crate) const DEFAULT_CACHE_TIMEOUT: Duration = Duration::from_secs(10);

/// The crash-loop breaker's settings: after `limit` crashes within `window`, an instance is
/// not restarted until `llmctl stop` clears it or the window has passed since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CrashLoop {
    pub limit: usize,
    pub window: Duration,
}

/// When a change to a setting takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applies {
    /// `llmctl reload` (or SIGHUP) changes it while the daemon runs.
    Live,
    /// Only a new daemon uses a new value.
    AtStart,
}

/// One setting as the table describes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub key: &'static str,
    pub default: &'static str,
    pub env: Option<&'static str>,
    pub applies: Applies,
}

/// Every daemon setting, in the order `llmctl config` and `status` show them.
pub(crate) const TABLE: &[Entry] = &[
    Entry { key: "queue_depth", default: "64", env: None, applies: Applies::AtStart },
    Entry {
        key: "memory_budget",
        default: DEFAULT_MEMORY_BUDGET,
        env: Some("LLMCTL_MEMORY_BUDGET"),
        applies: Applies::Live,
    },
    Entry { key: "vram_budget", default: DEFAULT_VRAM_BUDGET, env: None, applies: Applies::Live },
    Entry { key: "max_instances", default: "none", env: None, applies: Applies::Live },
    Entry { key: "default_ttl", default: "never", env: None, applies: Applies::Live },
    Entry { key: "max_wait", default: "auto", env: None, applies: Applies::Live },
    Entry { key: "min_residency", default: "auto", env: None, applies: Applies::Live },
    Entry { key: "load_timeout", default: "120s", env: None, applies: Applies::AtStart },
    Entry { key: "token_timeout", default: "300s", env: None, applies: Applies::AtStart },
    Entry { key: "crash_limit", default: "3", env: None, applies: Applies::AtStart },
    Entry { key: "crash_window", default: "60s", env: None, applies: Applies::AtStart },
    Entry { key: "cache_budget", default: DEFAULT_CACHE_BUDGET, env: None, applies: Applies::Live },
];

/// Whether the config file sets `key` of [`TABLE`].
pub(crate) fn configured(config: &Config, key: &str) -> bool {
    match key {
        "queue_depth" => config.queue_depth.is_some(),
        "memory_budget" => config.memory_budget.is_some(),
        "vram_budget" => config.vram_budget.is_some(),
        "max_instances" => config.max_instances.is_some(),
        "default_ttl" => config.default_ttl.is_some(),
        "max_wait" => config.max_wait.is_some(),
        "min_residency" => config.min_residency.is_some(),
        "load_timeout" => config.load_timeout.is_some(),
        "token_timeout" => config.token_timeout.is_some(),
        "crash_limit" => config.crash_limit.is_some(),
        "crash_window" => config.crash_window.is_some(),
        _ => false,
    }
}

/// The table's entry for `key`.
pub(crate) fn entry(key: &str) -> Option<&'static Entry> {
    TABLE.iter().find(|entry| entry.key == key)
}

/// Daemon settings after flags, environment and config are applied.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub max_wait_ms: Option<u64>,
    pub min_residency_ms: Option<u64>,
    pub queue_depth: usize,
    pub load_timeout: Duration,
    pub token_timeout: Duration,
    pub queue_timeout: Duration,
    pub stop_grace: Duration,
    pub llama_server: Option<PathBuf>,
    pub crash_loop: CrashLoop,
    /// The memory budget as written: bytes, a size, or a share of MemTotal.
    pub memory_budget: String,
    pub vram_budget: String,
    pub max_instances: Option<usize>,
    pub default_ttl: Ttl,
    /// Disk for saved prompt caches, as written; "0" turns them off.
    pub cache_budget: String,
    /// The longest saving may delay a stop, and restoring a load.
    pub cache_timeout: Duration,
}

/// The daemon's flags, kept so a reload applies the config under them again.
#[derive(Debug, Clone, Default)]
pub(crate) struct StartFlags {
    pub queue_depth: Option<usize>,
    pub llama_server: Option<PathBuf>,
}

/// The settings a reload changes while the daemon runs; the others need a new daemon.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LiveSettings {
    /// The bound on a load's wait; none: derived from measured load times.
    pub max_wait_ms: Option<u64>,
    pub min_residency_ms: Option<u64>,
    pub memory_budget: String,
    pub vram_budget: String,
    pub max_instances: Option<usize>,
    pub default_ttl: Ttl,
    pub cache_budget: String,
}

impl LiveSettings {
    /// `cache_budget` in bytes (the config was checked when it was read).
    pub(crate) fn cache_budget_bytes(&self) -> u64 {
        crate::budget::parse_size(&self.cache_budget, 0).unwrap_or(0)
    }
}

impl Settings {
    pub(crate) fn from_config(config: &Config, flags: &StartFlags) -> Settings {
        let wait =
            |value: &Option<String>| value.as_deref().and_then(|text| crate::config::parse_wait(text).ok()).flatten();
        Settings {
            max_wait_ms: wait(&config.max_wait),
            min_residency_ms: wait(&config.min_residency),
            queue_depth: flags.queue_depth.or(config.queue_depth).unwrap_or(DEFAULT_QUEUE_DEPTH),
            load_timeout: Duration::from_secs(config.load_timeout.unwrap_or(DEFAULT_LOAD_TIMEOUT_S)),
            token_timeout: Duration::from_secs(config.token_timeout.unwrap_or(DEFAULT_TOKEN_TIMEOUT_S)),
            queue_timeout: Duration::from_secs(QUEUE_TIMEOUT_S),
            stop_grace: env_duration_ms("LLMCTL_STOP_GRACE_MS").unwrap_or(STOP_GRACE),
            llama_server: flags.llama_server.clone().or_else(|| config.llama_server.clone()),
            crash_loop: CrashLoop {
                limit: config.crash_limit.unwrap_or(DEFAULT_CRASH_LIMIT),
                window: Duration::from_secs(config.crash_window.unwrap_or(DEFAULT_CRASH_WINDOW_S)),
            },
            memory_budget: std::env::var("LLMCTL_MEMORY_BUDGET")
                .ok()
                .filter(|value| !value.is_empty())
                .or_else(|| config.memory_budget.clone())
                .unwrap_or_else(|| DEFAULT_MEMORY_BUDGET.to_string()),
            vram_budget: config.vram_budget.clone().unwrap_or_else(|| DEFAULT_VRAM_BUDGET.to_string()),
            max_instances: config.max_instances,
            default_ttl: config.default_ttl.as_deref().and_then(|ttl| parse_ttl(ttl).ok()).unwrap_or(Ttl::Never),
            cache_budget: config.cache_budget.clone().unwrap_or_else(|| DEFAULT_CACHE_BUDGET.to_string()),
            cache_timeout: env_duration_ms("LLMCTL_CACHE_TIMEOUT_MS").unwrap_or(DEFAULT_CACHE_TIMEOUT),
        }
    }

    pub(crate) fn live(&self) -> LiveSettings {
        LiveSettings {
            max_wait_ms: self.max_wait_ms,
            min_residency_ms: self.min_residency_ms,
            memory_budget: self.memory_budget.clone(),
            vram_budget: self.vram_budget.clone(),
            max_instances: self.max_instances,
            default_ttl: self.default_ttl,
            cache_budget: self.cache_budget.clone(),
        }
    }

    /// Each setting of [`TABLE`] as `llmctl config` writes it, with the live ones from
    /// `live`: for `status`, and to tell what the daemon uses from what the config says now.
    pub(crate) fn describe(&self, live: &LiveSettings) -> BTreeMap<String, String> {
        let ttl = |ttl: Ttl| match ttl {
            Ttl::Never => "never".to_string(),
            Ttl::Seconds(seconds) => format!("{seconds}s"),
        };
        let wait = |ms: Option<u64>| ms.map_or("auto".to_string(), |ms| format!("{}s", ms / 1000));
        let value = |key: &str| -> String {
            match key {
                "queue_depth" => self.queue_depth.to_string(),
                "memory_budget" => live.memory_budget.clone(),
                "vram_budget" => live.vram_budget.clone(),
                "max_instances" => live.max_instances.map_or("none".into(), |max| max.to_string()),
                "default_ttl" => ttl(live.default_ttl),
                "max_wait" => wait(live.max_wait_ms),
                "min_residency" => wait(live.min_residency_ms),
                "load_timeout" => format!("{}s", self.load_timeout.as_secs()),
                "token_timeout" => format!("{}s", self.token_timeout.as_secs()),
                "crash_limit" => self.crash_loop.limit.to_string(),
                "crash_window" => format!("{}s", self.crash_loop.window.as_secs()),
                "cache_budget" => live.cache_budget.clone(),
                _ => String::new(),
            }
        };
        TABLE.iter().map(|entry| (entry.key.to_string(), value(entry.key))).collect()
    }
}

fn env_duration_ms(name: &str) -> Option<Duration> {
    std::env::var(name).ok()?.parse().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_in_the_table_are_the_ones_applied() {
        let settings = Settings::from_config(&Config::default(), &StartFlags::default());
        let described = settings.describe(&settings.live());
        for entry in TABLE {
            if entry.env.is_some_and(|name| std::env::var_os(name).is_some()) {
                continue;
            }
            assert_eq!(described[entry.key], entry.default, "{}", entry.key);
        }
        assert_eq!(described.len(), TABLE.len());
    }
}
