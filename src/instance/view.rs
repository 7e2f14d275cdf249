//! What others may read of an instance: the [`View`] its worker publishes after every
//! message, and the [`Stats`] that leases and the worker count into.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::lease::Report;
use super::state::Phase;
use crate::config::Ttl;
use crate::gguf::ModelInfo;
use crate::model::ModelSpec;
use crate::protocol::{InstanceState, InstanceStatus, Usage};

/// What identifies the content of a model file: a replaced file (new inode, size or
/// modification time) is a new model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct FileStamp {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) len: u64,
    pub(super) modified: Option<SystemTime>,
}

impl FileStamp {
    /// For a model that is not a file.
    pub(crate) fn none() -> FileStamp {
        FileStamp::default()
    }

    pub(crate) fn of(metadata: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp { dev: metadata.dev(), ino: metadata.ino(), len: metadata.len(), modified: metadata.modified().ok() }
    }
}

/// Samples kept for the percentiles in `status`.
const SAMPLES: usize = 1024;

/// Counters and samples for `status`: written by the worker (restarts, evictions, loads)
/// and by leases as they are granted and end (requests, tokens, outcomes, last use).
#[derive(Debug, Default, Clone)]
pub(crate) struct Stats {
    pub(crate) requests: u64,
    pub(crate) usage: Usage,
    pub(crate) restarts: u32,
    pub(crate) rejected: u64,
    pub(crate) evictions: u32,
    pub(crate) waits: VecDeque<Duration>,
    pub(crate) first_tokens: VecDeque<Duration>,
    pub(crate) outcomes: BTreeMap<String, u64>,
    pub(crate) last_load: Option<Duration>,
    /// When a request last ended (the LRU order).
    pub(crate) last_used: Option<SystemTime>,
    /// How long a request holds a slot, on average (an exponentially weighted mean), for
    /// the wait a refused client is told.
    pub(crate) service_ms: Option<f64>,
    /// How long a request takes from its slot to its first token, on average (weighted as
    /// `service_ms`), for how long before a bound a busy model drains for this one.
    pub(crate) slot_first_token_ms: Option<f64>,
}

impl Stats {
    fn sample(samples: &mut VecDeque<Duration>, value: Duration) {
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(value);
    }

    /// A request got a slot after waiting `waited`.
    pub(crate) fn granted(&mut self, waited: Duration) {
        self.requests += 1;
        Stats::sample(&mut self.waits, waited);
    }

    /// A request ended at `now` with `report`, served for `served` (from its grant, or for
    /// one that waited inside the child, from the end of the request ahead of it).
    pub(crate) fn finished(&mut self, report: &Report, now: SystemTime, served: Duration) {
        self.last_used = Some(now);
        if report.counted_again {
            self.requests = self.requests.saturating_sub(1);
        }
        if report.outcome.is_some() {
            Stats::weigh(&mut self.service_ms, served);
        }
        self.usage.prompt_tokens += report.usage.prompt_tokens;
        self.usage.completion_tokens += report.usage.completion_tokens;
        if let Some(outcome) = report.outcome {
            *self.outcomes.entry(outcome.to_string()).or_insert(0) += 1;
        }
        if let Some(first_token) = report.first_token {
            Stats::sample(&mut self.first_tokens, first_token);
        }
        if let Some(from_slot) = report.slot_first_token {
            Stats::weigh(&mut self.slot_first_token_ms, from_slot);
        }
    }

    /// Weighs `value` into the exponentially weighted mean `mean_ms`.
    fn weigh(mean_ms: &mut Option<f64>, value: Duration) {
        let ms = value.as_secs_f64() * 1000.0;
        *mean_ms = Some(mean_ms.map_or(ms, |mean| mean * 0.8 + ms * 0.2));
    }
}

/// What the worker publishes of its instance; written only by the worker.
#[derive(Debug, Clone)]
pub(crate) struct View {
    pub(crate) spec: ModelSpec,
    pub(crate) info: ModelInfo,
    pub(crate) stamp: FileStamp,
    pub(crate) phase: Phase,
    /// Requests on slots the worker granted; lent slots in use are added by the handle.
    pub(crate) in_flight: u32,
    pub(crate) queued: usize,
    pub(crate) slots: u32,
    pub(crate) failure: Option<String>,
    pub(crate) crash_loop: bool,
    pub(crate) pid: Option<u32>,
    pub(crate) start_time: Option<u64>,
    pub(crate) port: Option<u16>,
    /// The Unix socket the child listens on.
    pub(crate) socket: Option<std::path::PathBuf>,
    pub(crate) ready_since: Option<SystemTime>,
    /// Remembered from an earlier daemon, until a request here ends.
    pub(crate) restored_last_use: Option<SystemTime>,
    pub(crate) pinned_by_command: bool,
    pub(crate) pinned_until: Option<SystemTime>,
}

impl View {
    pub(crate) fn new(spec: ModelSpec, info: ModelInfo, stamp: FileStamp) -> View {
        View {
            slots: spec.load.parallel,
            spec,
            info,
            stamp,
            phase: Phase::Stopped,
            in_flight: 0,
            queued: 0,
            failure: None,
            crash_loop: false,
            pid: None,
            start_time: None,
            port: None,
            socket: None,
            ready_since: None,
            restored_last_use: None,
            pinned_by_command: false,
            pinned_until: None,
        }
    }

    pub(crate) fn pinned(&self) -> bool {
        self.spec.policy.pinned
            || self.pinned_by_command
            || self.pinned_until.is_some_and(|until| until > SystemTime::now())
    }

    /// Whether the instance may leave the table: no child, no request and no pin.
    pub(crate) fn retirable(&self) -> bool {
        matches!(self.phase, Phase::Stopped | Phase::Failed)
            && self.in_flight == 0
            && self.queued == 0
            && !self.pinned()
    }

    /// The state as the protocol carries it: a ready instance with requests is busy, and
    /// one in a crash loop has failed whatever its last failure left it in.
    pub(crate) fn state(&self) -> InstanceState {
        match self.phase {
            Phase::Stopped if self.crash_loop => InstanceState::Failed,
            Phase::Stopped => InstanceState::Stopped,
            Phase::Failed => InstanceState::Failed,
            Phase::WaitingRoom => InstanceState::Waiting,
            Phase::Starting => InstanceState::Starting,
            Phase::Ready if self.in_flight > 0 => InstanceState::Busy,
            Phase::Ready => InstanceState::Ready,
            Phase::Stopping => InstanceState::Stopping,
        }
    }
}

/// An instance as `status` and the scheduler read it: the view, the lent slots in use
/// added to its requests in flight, and the counters.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) view: View,
    pub(crate) stats: Stats,
}

impl Snapshot {
    /// When it was last used: a request ended, or an earlier daemon remembered one.
    pub(crate) fn last_used(&self) -> Option<SystemTime> {
        self.stats.last_used.or(self.view.restored_last_use)
    }

    /// Idle: ready, nothing in flight, nothing waiting.
    pub(crate) fn idle(&self) -> bool {
        self.view.phase == Phase::Ready && self.view.in_flight == 0 && self.view.queued == 0
    }

    pub(crate) fn status(&self) -> InstanceStatus {
        let (view, stats) = (&self.view, &self.stats);
        InstanceStatus {
            name: view.spec.name.clone(),
            path: view.spec.path.display().to_string(),
            state: view.state(),
            failure: view.failure.clone(),
            pid: view.pid,
            port: view.port.filter(|_| view.spec.remote.is_none()),
            socket: view.socket.as_ref().map(|path| path.display().to_string()),
            remote: view.spec.remote.as_ref().map(|remote| remote.urls.clone()),
            ctx_size: view.spec.load.ctx_size,
            slots: view.slots,
            // A request sent to a child whose slots are all busy waits inside it.
            in_flight: view.in_flight.min(view.slots),
            estimate_bytes: crate::estimate::bytes(&view.spec, &view.info),
            rss_bytes: None,
            last_used_ms: self.last_used().map(millis_since_epoch),
            requests: stats.requests,
            usage: stats.usage,
            restarts: stats.restarts,
            crash_loop: view.crash_loop,
            queued: view.queued + view.in_flight.saturating_sub(view.slots) as usize,
            rejected: stats.rejected,
            wait_p50_ms: percentile_ms(&stats.waits, 0.50),
            wait_p99_ms: percentile_ms(&stats.waits, 0.99),
            pinned: view.pinned(),
            pinned_until_ms: view.pinned_until.map(millis_since_epoch),
            ttl_s: match view.spec.policy.ttl {
                Some(Ttl::Seconds(seconds)) => Some(seconds),
                _ => None,
            },
            evictions: stats.evictions,
            vram_bytes: None,
            load_ms: stats.last_load.map(|d| d.as_millis() as u64),
            first_token_p50_ms: percentile_ms(&stats.first_tokens, 0.50),
            first_token_p99_ms: percentile_ms(&stats.first_tokens, 0.99),
            outcomes: stats.outcomes.clone(),
            waiting_position: None,
            eta_ms: None,
            instance: view.spec.log_file_name().trim_end_matches(".log").to_string(),
            embeddings: view.spec.load.embeddings,
        }
    }
}

/// True when a ready, idle, unpinned instance with `in_flight` requests, last used at
/// `last_used`, has gone unused for its TTL.
pub(crate) fn ttl_expired(view: &View, in_flight: u32, last_used: Option<SystemTime>, default_ttl: Ttl) -> bool {
    if view.phase != Phase::Ready || in_flight > 0 || view.queued > 0 || view.pinned() {
        return false;
    }
    let Ttl::Seconds(seconds) = view.spec.policy.ttl.unwrap_or(default_ttl) else { return false };
    let since = last_used.or(view.restored_last_use).or(view.ready_since);
    since.and_then(|t| t.elapsed().ok()).is_some_and(|idle| idle >= Duration::from_secs(seconds))
}

pub(crate) fn millis_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn percentile_ms(samples: &VecDeque<Duration>, quantile: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted: Vec<Duration> = samples.iter().copied().collect();
    sorted.sort();
    let index = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[index].as_secs_f64() * 1000.0)
}
