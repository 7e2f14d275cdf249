//! One file per subcommand: the client side of each. They share a [`Context`] with the
//! resolved paths, the global flags and the config, read once.

pub(crate) mod chat;
pub(crate) mod config;
pub(crate) mod daemon;
pub(crate) mod embed;
pub(crate) mod events;
pub(crate) mod logs;
pub(crate) mod ls;
pub(crate) mod pin;
pub(crate) mod ps;
pub(crate) mod pull;
pub(crate) mod reload;
pub(crate) mod rm;
pub(crate) mod run;
pub(crate) mod serve;
pub(crate) mod setup;
pub(crate) mod show;
pub(crate) mod shutdown;
pub(crate) mod status;
pub(crate) mod stop;
pub(crate) mod switch;
pub(crate) mod warm;

pub(crate) use crate::context::Context;
use crate::error::Error;

/// Adds "did you mean" to an unknown model: the known names closest to it (aliases, pulled
/// models, files in the models directory). Any other error passes unchanged.
pub(crate) fn suggest_names(context: &Context, error: Error) -> Error {
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
    let suggestions = crate::similar::closest(&name, names);
    if suggestions.is_empty() && !pullable {
        return error;
    }
    Error::UnknownModelNear { name, suggestions, pullable }
}
