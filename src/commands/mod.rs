//! One file per subcommand: the client side of each. They share a [`Context`] with the
//! resolved paths and the global flags.

pub mod chat;
pub mod config;
pub mod daemon;
pub mod events;
pub mod logs;
pub mod ls;
pub mod pin;
pub mod ps;
pub mod pull;
pub mod reload;
pub mod rm;
pub mod run;
pub mod serve;
pub mod setup;
pub mod show;
pub mod shutdown;
pub mod status;
pub mod stop;
pub mod switch;
pub mod warm;

use crate::cli::{GlobalArgs, LoadArgs};
use crate::client::{self, Connection};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::gguf;
use crate::model::{self, LoadOverrides, ModelSpec};
use crate::paths::Paths;

#[derive(Clone)]
pub struct Context {
    pub global: GlobalArgs,
    pub paths: Paths,
}

impl Context {
    pub fn new(global: &GlobalArgs) -> Context {
        Context { paths: Paths::resolve(global.socket.as_deref(), global.config.as_deref()), global: global.clone() }
    }

    pub fn config(&self) -> Result<Config> {
        Config::load(&self.paths.config)
    }

    /// The longest a request that loads and generates may wait for the daemon's next
    /// message: the longest silence the daemon itself allows (queue wait, a load without
    /// output, a token) plus a margin, so a wedged daemon cannot hold a client for good.
    pub fn generation_timeout(&self) -> std::time::Duration {
        let config = self.config().unwrap_or_default();
        let longest =
            [crate::daemon::QUEUE_TIMEOUT_S, config.load_timeout.unwrap_or(120), config.token_timeout.unwrap_or(300)]
                .into_iter()
                .max()
                .unwrap_or(600);
        std::time::Duration::from_secs(longest + 60)
    }

    /// Resolves MODEL to a file and load options.
    pub fn resolve_model(&self, name: &str, load: &LoadArgs) -> Result<ModelSpec> {
        let config = self.config()?;
        let overrides = LoadOverrides { ctx_size: load.ctx_size, parallel: load.parallel, gpu_layers: load.gpu_layers };
        model::resolve(name, &config, &self.paths, &overrides)
    }

    /// Connects for a request about `model`. A running daemon checks the model's header
    /// itself (and remembers it); when none runs, the header is checked here first, so a
    /// wrong or truncated file is refused without starting anything.
    pub fn connect_for(&self, model: &ModelSpec) -> Result<Connection> {
        if let Some(connection) = client::try_connect(self)? {
            return Ok(connection);
        }
        if model.remote.is_none() {
            gguf::inspect(&model.path).map_err(|reason| Error::BadModel { path: model.path.clone(), reason })?;
        }
        client::connect(self)
    }
}

/// Adds "did you mean" to an unknown model: the known names closest to it (aliases, pulled
/// models, files in the models directory). Any other error passes unchanged.
pub fn suggest_names(context: &Context, error: Error) -> Error {
    let name = match &error {
        Error::UnknownModel { name } => name.clone(),
        Error::ModelNotFound { path } if path.is_relative() => path.to_string_lossy().into_owned(),
        _ => return error,
    };
    let pullable = !name.ends_with(".gguf") && crate::library::RepoName::parse(&name).is_ok();
    let config = context.config().unwrap_or_default();
    let known = crate::catalog::known(&config, &context.paths);
    let mut names: Vec<&str> = known.iter().map(|model| model.name.as_str()).collect();
    // `demo` runs even before it is installed (first use installs it), so it is offered too.
    if !names.contains(&crate::model::DEMO_ALIAS) {
        names.push(crate::model::DEMO_ALIAS);
    }
    let suggestions = crate::catalog::closest(&name, names);
    if suggestions.is_empty() && !pullable {
        return error;
    }
    Error::UnknownModelNear { name, suggestions, pullable }
}
