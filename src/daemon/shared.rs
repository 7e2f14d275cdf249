//! What every daemon thread shares, and why each part is shared the way it is.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};

use super::listeners::Listeners;
use super::queue::Admission;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::gguf::ModelInfo;
use crate::instance::table::InstanceTable;
use crate::instance::worker::Services;
use crate::instance::{FileStamp, JobId, RoomRequest};
use crate::paths::Paths;
use crate::settings::{LiveSettings, Settings, StartFlags};

/// Why the daemon stops, and who waits for it.
pub(crate) enum ShutdownRequest {
    Signal,
    /// A second SIGINT: kill children without a grace period.
    Kill,
    /// `llmctl shutdown`; the sender is told once every child is stopped.
    Client(Sender<()>),
}

/// Connections beyond the queue depth: enough for every stream in flight and control
/// commands next to a full queue.
const CONNECTION_HEADROOM: usize = 256;
/// Connections beyond that which only control requests (`status`, `stop`, `shutdown`...)
/// may use: however many streams and `events` followers are open, those always get in.
const CONTROL_HEADROOM: usize = 64;

pub(crate) struct Shared {
    pub(crate) paths: Paths,
    pub(crate) settings: Settings,
    pub(crate) table: InstanceTable,
    pub(crate) admission: Admission,
    /// What instance workers use: launcher, scheduler inbox, events, GPU readings.
    pub(crate) services: Arc<Services>,
    pub(crate) started: Instant,
    pub(crate) shutdown: Sender<ShutdownRequest>,
    pub(crate) shutting_down: AtomicBool,
    /// Unix-socket connections open now (each holds a thread).
    pub(crate) connections: AtomicUsize,
    /// Of those, the ones whose request holds its connection for long (generations,
    /// `events`, `listen`, `warm`, `switch`).
    pub(crate) long_connections: AtomicUsize,
    /// Of those, the ones that have not sent their request yet.
    pub(crate) unheard: crate::unheard::Unheard,
    /// The last failure to write the state file; cleared by the next success. Held while
    /// the file is written, so one thread writes it at a time.
    pub(crate) state_file_error: Mutex<Option<String>>,
    /// The number of the last request sent to a worker.
    jobs: AtomicU64,
    /// The llama-server it would spawn, described (path, build, backend); read at start and
    /// at each reload, since asking the binary for its version takes a process.
    pub(crate) llama_server: RwLock<String>,
    /// What a reload may change while the daemon runs.
    pub(crate) live: RwLock<LiveSettings>,
    /// The flags the daemon started with, applied again at a reload.
    pub(crate) flags: StartFlags,
    /// Counts `switch --exclusive` requests, so the latest one wins. The lock is held only
    /// to compare and to send the unload messages (channel sends), never while waiting.
    pub(crate) exclusive_epoch: Mutex<u64>,
    /// Bytes of large requests held now (see `connection`).
    pub(crate) large_requests: AtomicUsize,
    /// The config file as last read, for what the daemon resolves itself (`serve`).
    pub(crate) config: ConfigCache,
    /// The HTTP listeners of `llmctl serve` and of the config's `listen`.
    pub(crate) listeners: Listeners,
    /// Instances evicted to make room for another model, since the start.
    pub(crate) swaps: AtomicU64,
    /// Each waiting load's place in line and estimated wait in ms, by instance, as the
    /// scheduler last planned.
    pub(crate) etas: Mutex<std::collections::HashMap<usize, (usize, u64)>>,
    /// Each model's `GET /props` as its llama-server last answered it, with that child's
    /// pid, by name: what `serve` answers while that child runs, and, marked sleeping,
    /// while the model is not loaded.
    pub(crate) props: Mutex<std::collections::HashMap<String, (Option<u32>, serde_json::Value)>>,
    /// GGUF headers read for listings, by path, with the file's stamp when read (see
    /// [`Shared::model_info`]).
    headers: Mutex<std::collections::HashMap<std::path::PathBuf, (FileStamp, Arc<ModelInfo>)>>,
}

/// The most headers [`Shared::model_info`] keeps; past it the cache starts again.
const HEADERS_KEPT: usize = 1024;

impl Shared {
    /// Writes the state file now; true when that failed. A failure is logged when it is new
    /// and kept for `status` until a write succeeds.
    pub(crate) fn write_state(&self) -> bool {
        let mut last_error = self.state_file_error.lock();
        let result = super::state::write(&self.paths.state_file(), &self.table);
        match (&result, last_error.as_ref()) {
            (Err(message), Some(previous)) if message == previous => {}
            (Err(message), _) => log::error!("{message}; serving on without it, retrying every 10 s"),
            (Ok(()), Some(_)) => log::info!("the state file is written again"),
            (Ok(()), None) => {}
        }
        let failed = result.is_err();
        *last_error = result.err();
        failed
    }

    /// Writes the state file for a change a command made (`done` says what), which is in
    /// effect either way: when it cannot be written the command is told so (exit 69), since
    /// a restarted daemon will not know of the change.
    pub(crate) fn save_state_for(&self, done: &str) -> Result<()> {
        if !self.write_state() {
            return Ok(());
        }
        let reason = self.state_file_error.lock().clone().unwrap_or_default();
        Err(Error::FromDaemon {
            kind: crate::error::ErrorKind::Unavailable,
            message: format!("{done} now, but it is not saved ({reason}); a restarted daemon will not know it"),
        })
    }

    /// The header of the model file at `path`, read again only when the file changed. A
    /// listing (`/v1/models`, `/api/tags`) describes every model from its header, and
    /// reading one takes a millisecond or more (the vocabulary is megabytes); clients poll
    /// those lists. None when the file cannot be read as a model.
    pub(crate) fn model_info(&self, path: &Path) -> Option<Arc<ModelInfo>> {
        let stamp = FileStamp::of(&std::fs::metadata(path).ok()?);
        if let Some((known, info)) = self.headers.lock().get(path) {
            if *known == stamp {
                return Some(Arc::clone(info));
            }
        }
        let info = Arc::new(crate::gguf::inspect(path).ok()?);
        let mut headers = self.headers.lock();
        if headers.len() >= HEADERS_KEPT {
            headers.clear();
        }
        headers.insert(path.to_path_buf(), (stamp, Arc::clone(&info)));
        Some(info)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        paths: Paths,
        settings: Settings,
        flags: StartFlags,
        services: Services,
        shutdown: Sender<ShutdownRequest>,
    ) -> Shared {
        let live = settings.live();
        Shared {
            admission: Admission::new(settings.queue_depth),
            config: ConfigCache::new(&paths.config),
            paths,
            settings,
            table: InstanceTable::default(),
            services: Arc::new(services),
            started: Instant::now(),
            shutdown,
            shutting_down: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            long_connections: AtomicUsize::new(0),
            unheard: Default::default(),
            state_file_error: Mutex::new(None),
            jobs: AtomicU64::new(0),
            llama_server: RwLock::new(String::new()),
            live: RwLock::new(live),
            flags,
            exclusive_epoch: Mutex::new(0),
            large_requests: AtomicUsize::new(0),
            listeners: Listeners::default(),
            swaps: AtomicU64::new(0),
            etas: Mutex::new(Default::default()),
            props: Mutex::new(Default::default()),
            headers: Mutex::new(Default::default()),
        }
    }

    /// The connections that requests which hold one for long (generations, `events`,
    /// `serve`) may take together.
    pub(crate) fn long_connection_cap(&self) -> usize {
        self.settings.queue_depth.saturating_add(CONNECTION_HEADROOM)
    }

    /// The connections the listener accepts at once; beyond these it answers busy.
    pub(crate) fn connection_cap(&self) -> usize {
        self.long_connection_cap() + CONTROL_HEADROOM
    }

    /// Numbers a new request; later requests get larger numbers.
    pub(crate) fn next_job(&self) -> JobId {
        self.jobs.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The number of the last request numbered so far: an unload decided now concerns the
    /// requests up to it.
    pub(crate) fn last_job(&self) -> JobId {
        self.jobs.load(Ordering::SeqCst)
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Refuses new work once a shutdown began.
    pub(crate) fn refuse_if_shutting_down(&self) -> Result<()> {
        if self.is_shutting_down() {
            return Err(Error::Stopped { message: "the llmctl daemon is shutting down".into() });
        }
        Ok(())
    }

    pub(crate) fn describe_llama_server(&self) {
        let description =
            crate::llama_server::describe_llama_server(&self.paths, self.settings.llama_server.as_deref(), None);
        *self.llama_server.write() = description;
    }

    /// Reads the config again: the live settings (budgets, instance limit, default TTL)
    /// change at once; the others are named as needing a new daemon. A bad config changes
    /// nothing and is the error (65).
    pub(crate) fn reload(&self) -> Result<String> {
        let config = Config::load(&self.paths.config)?;
        let fresh = Settings::from_config(&config, &self.flags);
        let fresh_live = fresh.live();
        let before = self.settings.describe(&self.live.read());
        let after = fresh.describe(&fresh_live);
        let mut applied = Vec::new();
        let mut pending = Vec::new();
        for (key, value) in &after {
            if before.get(key) != Some(value) {
                let change = format!("{key} {} -> {value}", before.get(key).map_or("", String::as_str));
                let live = crate::settings::entry(key).is_some_and(|e| e.applies == crate::settings::Applies::Live);
                if live {
                    applied.push(change);
                } else {
                    pending.push(change);
                }
            }
        }
        if fresh.llama_server != self.settings.llama_server {
            pending.push("llama_server".to_string());
        }
        self.services.caches.set_budget(fresh_live.cache_budget_bytes());
        *self.live.write() = fresh_live;
        self.describe_llama_server();
        // A bigger budget may let a waiting load in.
        let _ = self.services.scheduler.send(RoomRequest::Replan);
        let mut message = if applied.is_empty() {
            "reloaded the config; nothing the daemon can change while it runs has changed".to_string()
        } else {
            format!("reloaded the config: {}", applied.join(", "))
        };
        if !pending.is_empty() {
            message += &format!("; these need `llmctl shutdown` and a new daemon: {}", pending.join(", "));
        }
        log::info!("{message}");
        Ok(message)
    }
}

/// The config file, read again only when it changed on disk (its inode, size or
/// modification time): one `stat` per use instead of a parse.
pub(crate) struct ConfigCache {
    path: std::path::PathBuf,
    cached: Mutex<Option<(FileIdentity, Arc<Config>)>>,
}

type FileIdentity = Option<(u64, u64, Option<SystemTime>)>;

impl ConfigCache {
    fn new(path: &Path) -> ConfigCache {
        ConfigCache { path: path.to_path_buf(), cached: Mutex::new(None) }
    }

    /// The config as it is on disk now (an absent file is the empty config).
    pub(crate) fn get(&self) -> Result<Arc<Config>> {
        use std::os::unix::fs::MetadataExt;
        let identity: FileIdentity = std::fs::metadata(&self.path).ok().map(|m| (m.ino(), m.len(), m.modified().ok()));
        if let Some((seen, config)) = self.cached.lock().as_ref() {
            if *seen == identity {
                return Ok(Arc::clone(config));
            }
        }
        let config = Arc::new(Config::load(&self.path)?);
        *self.cached.lock() = Some((identity, Arc::clone(&config)));
        Ok(config)
    }
}
