//! One file per subcommand: the client side of each. They share a [`Context`] with the
//! resolved paths and the global flags.

pub mod config;
pub mod daemon;
pub mod pin;
pub mod run;
pub mod setup;
pub mod shutdown;
pub mod status;
pub mod stop;
pub mod switch;
pub mod warm;

use crate::cli::{GlobalArgs, LoadArgs};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::gguf;
use crate::model::{self, LoadOverrides, ModelSpec};
use crate::paths::Paths;

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

    /// Resolves MODEL and checks its header, so a bad file fails here, before the daemon
    /// is asked for anything.
    pub fn resolve_model(&self, name: &str, load: &LoadArgs) -> Result<ModelSpec> {
        let config = self.config()?;
        let overrides = LoadOverrides { ctx_size: load.ctx_size, parallel: load.parallel, gpu_layers: load.gpu_layers };
        let spec = model::resolve(name, &config, &self.paths, &overrides)?;
        gguf::inspect(&spec.path).map_err(|reason| Error::BadModel { path: spec.path.clone(), reason })?;
        Ok(spec)
    }
}
