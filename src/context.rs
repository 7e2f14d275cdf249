//! What a client command works with: the global options, the resolved paths, and the
//! config file, parsed at most once per command.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::config::Config;
use crate::error::Result;
use crate::model::{self, LoadOverrides, ModelSpec};
use crate::paths::Paths;
use crate::settings;

/// The options every command takes, as the command line gave them.
#[derive(Debug, Clone, Default)]
pub struct Global {
    pub socket: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub llama_server: Option<PathBuf>,
    pub no_autostart: bool,
    pub verbose: u8,
}

#[derive(Clone)]
pub(crate) struct Context {
    pub global: Global,
    pub paths: Paths,
    config: Arc<OnceLock<Result<Arc<Config>>>>,
}

impl Context {
    pub(crate) fn new(global: Global) -> Context {
        Context {
            paths: Paths::resolve(global.socket.as_deref(), global.config.as_deref()),
            global,
            config: Arc::default(),
        }
    }

    /// The config file, read and parsed the first time it is asked for.
    pub(crate) fn config(&self) -> Result<Arc<Config>> {
        self.config.get_or_init(|| Config::load(&self.paths.config).map(Arc::new)).clone()
    }

    /// The longest a request that loads and generates may wait for the daemon's next
    /// message: the longest silence the daemon itself allows (queue wait, a load without
    /// output, a token) plus a margin, so a wedged daemon cannot hold a client for good.
    pub(crate) fn generation_timeout(&self) -> Duration {
        let config = self.config().unwrap_or_default();
        let longest = [
            settings::QUEUE_TIMEOUT_S,
            config.load_timeout.unwrap_or(settings::DEFAULT_LOAD_TIMEOUT_S),
            config.token_timeout.unwrap_or(settings::DEFAULT_TOKEN_TIMEOUT_S),
        ]
        .into_iter()
        .max()
        .unwrap_or(600);
        Duration::from_secs(longest + 60)
    }

    /// Resolves MODEL to a file and load options.
    pub(crate) fn resolve_model(&self, name: &str, overrides: &LoadOverrides) -> Result<ModelSpec> {
        let config = self.config()?;
        model::resolve(name, &config, &self.paths, overrides)
    }
}
