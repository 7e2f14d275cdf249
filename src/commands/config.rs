//! `llmctl config`: the effective configuration, and where each value came from (flag,
//! environment, config file or default), and where a running daemon uses something else.
//! It reads; it changes nothing.

use std::io::Write;

use serde::Serialize;

use crate::cli::ConfigArgs;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::settings::{self, Applies, Settings, StartFlags};

#[derive(Serialize)]
struct Setting {
    name: String,
    value: String,
    source: String,
    /// What the running daemon uses, when it differs from `value`.
    #[serde(skip_serializing_if = "Option::is_none")]
    daemon: Option<String>,
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The source of a path that a flag or `LLMCTL_*` variable may set, else XDG or default.
fn path_source(own_env: &str, xdg: Option<&str>) -> String {
    if env_set(own_env) {
        format!("environment {own_env}")
    } else if let Some(xdg) = xdg.filter(|x| env_set(x)) {
        format!("environment {xdg}")
    } else {
        "default".into()
    }
}

/// The source of a path a flag may set (the flag wins over its variable).
fn flag_or(given: bool, own_env: &str, flag: &str, xdg: Option<&str>) -> String {
    if given {
        format!("flag {flag}")
    } else {
        path_source(own_env, xdg)
    }
}

pub(crate) fn run(context: &Context, args: ConfigArgs) -> Result<()> {
    // A config with a mistake still shows what it sets right; the error comes after it.
    let (config, config_error) = crate::config::Config::load_what_it_can(&context.paths.config);
    let paths = &context.paths;
    let config_exists = paths.config.exists();
    let from_config = |present: bool, default: &str| -> String {
        if present {
            format!("config {}", paths.config.display())
        } else {
            default.to_string()
        }
    };
    let mut settings = vec![
        Setting {
            name: "socket".into(),
            value: paths.socket.display().to_string(),
            source: flag_or(context.global.socket.is_some(), "LLMCTL_SOCKET", "--socket", Some("XDG_RUNTIME_DIR")),
            daemon: None,
        },
        Setting {
            name: "config".into(),
            value: format!("{}{}", paths.config.display(), if config_exists { "" } else { " (absent)" }),
            source: flag_or(context.global.config.is_some(), "LLMCTL_CONFIG", "--config", Some("XDG_CONFIG_HOME")),
            daemon: None,
        },
        Setting {
            name: "state_dir".into(),
            value: paths.state_dir.display().to_string(),
            source: path_source("LLMCTL_STATE_DIR", Some("XDG_STATE_HOME")),
            daemon: None,
        },
        Setting {
            name: "data_dir".into(),
            value: paths.data_dir.display().to_string(),
            source: path_source("LLMCTL_DATA_DIR", Some("XDG_DATA_HOME")),
            daemon: None,
        },
        Setting {
            name: "cache_dir".into(),
            value: paths.cache_dir.display().to_string(),
            source: path_source("LLMCTL_CACHE_DIR", Some("XDG_CACHE_HOME")),
            daemon: None,
        },
    ];
    // The context folds the flag and LLMCTL_LLAMA_SERVER together (the flag first); the
    // variable's own value came from it.
    let installed = paths.installed_llama_server();
    let from_env = std::env::var_os("LLMCTL_LLAMA_SERVER").filter(|value| !value.is_empty());
    let (llama_server, source) = match (&context.global.llama_server, &config.llama_server) {
        (Some(path), _) if from_env.as_deref() == Some(path.as_os_str()) => {
            (path.display().to_string(), "environment LLMCTL_LLAMA_SERVER".to_string())
        }
        (Some(path), _) => (path.display().to_string(), "flag --llama-server".to_string()),
        (None, Some(path)) => (path.display().to_string(), from_config(true, "")),
        (None, None) => match crate::llama_server::find_binary(None, None, &installed) {
            Ok(path) if path == installed => (path.display().to_string(), "installed by llmctl setup".into()),
            Ok(path) => (path.display().to_string(), "PATH".into()),
            Err(_) => ("(none found; run llmctl setup)".into(), "-".into()),
        },
    };
    settings.push(Setting { name: "llama_server".into(), value: llama_server, source, daemon: None });
    let or_default = |value: Option<String>, default: &str| value.unwrap_or_else(|| default.to_string());
    // The daemon's settings, from the one table that gives their defaults and the daemon
    // applies them from.
    let flags = StartFlags { queue_depth: None, llama_server: context.global.llama_server.clone() };
    let described = {
        let applied = Settings::from_config(&config, &flags);
        applied.describe(&applied.live())
    };
    for entry in settings::TABLE {
        let source = match entry.env {
            Some(name) if env_set(name) => format!("environment {name}"),
            _ => from_config(settings::configured(&config, entry.key), "default"),
        };
        let value = described.get(entry.key).cloned().unwrap_or_else(|| entry.default.to_string());
        settings.push(Setting { name: entry.key.to_string(), value, source, daemon: None });
    }
    settings.extend([
        // Read by `run` and `chat` themselves, so a change applies to the next one.
        Setting {
            name: "max_tokens".into(),
            value: match crate::config::max_tokens(None, &config) {
                Some(limit) => limit.to_string(),
                None => "0 (no limit)".into(),
            },
            source: from_config(config.max_tokens.is_some(), "default"),
            daemon: None,
        },
        // Read by `serve` at each request, so a change applies at once.
        Setting {
            name: "default_model".into(),
            value: or_default(config.default_model.clone(), "none (the only model, if there is one)"),
            source: from_config(config.default_model.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "cors_origins".into(),
            value: match &config.cors_origins {
                Some(origins) => origins.join(" "),
                None => "this machine's pages (localhost, 127.0.0.1, [::1])".into(),
            },
            source: from_config(config.cors_origins.is_some(), "default"),
            daemon: None,
        },
    ]);
    for (alias, model) in &config.models {
        let mut value = match &model.path {
            Some(path) => path.display().to_string(),
            None => model.url.iter().chain(&model.urls).cloned().collect::<Vec<_>>().join(" "),
        };
        if let Some(ctx_size) = model.ctx_size {
            value += &format!(" ctx_size={ctx_size}");
        }
        if let Some(parallel) = model.parallel {
            value += &format!(" parallel={parallel}");
        }
        if let Some(gpu_layers) = model.gpu_layers {
            value += &format!(" gpu_layers={gpu_layers}");
        }
        if model.pinned {
            value += " pinned";
        }
        if model.embeddings {
            value += " embeddings";
        }
        if model.reranking {
            value += " reranking";
        }
        if let Some(ttl) = &model.ttl {
            value += &format!(" ttl={ttl}");
        }
        if !model.answers_to.is_empty() {
            value += &format!(" answers_to={:?}", model.answers_to);
        }
        if !model.args.is_empty() {
            value += &format!(" args={:?}", model.args);
        }
        settings.push(Setting { name: format!("models.{alias}"), value, source: from_config(true, ""), daemon: None });
    }

    // A running daemon keeps what it read at start (or at the last reload): say where it
    // differs from the file now.
    if let Ok(Some(mut connection)) = crate::client::try_connect(context) {
        if let Ok(crate::protocol::Response::Status(status)) = connection.call(&crate::protocol::Request::Status) {
            for setting in &mut settings {
                if let Some(in_force) = status.daemon.settings.get(&setting.name) {
                    // "5m" in the file is "300s" in the daemon: compare durations as such.
                    let same_duration = matches!(
                        (crate::config::parse_ttl(in_force), crate::config::parse_ttl(&setting.value)),
                        (Ok(a), Ok(b)) if a == b
                    );
                    if *in_force != setting.value && !same_duration {
                        setting.daemon = Some(in_force.clone());
                    }
                }
            }
        }
    }
    let live = |name: &str| settings::entry(name).is_some_and(|entry| entry.applies == Applies::Live);
    let text = if args.json {
        serde_json::to_string_pretty(&settings).map_err(|e| Error::internal(e.to_string()))? + "\n"
    } else {
        let width = settings.iter().map(|s| s.name.len()).max().unwrap_or(0);
        settings
            .iter()
            .map(|s| {
                let note = match &s.daemon {
                    Some(in_force) if live(&s.name) => {
                        format!("  [the daemon uses {in_force}: `llmctl reload`]")
                    }
                    Some(in_force) => format!("  [the daemon uses {in_force}: `llmctl shutdown` to change]"),
                    None => String::new(),
                };
                format!("{:<width$}  {}  ({}){note}\n", s.name, s.value, s.source)
            })
            .collect()
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("cannot write to stdout", e)),
        _ => config_error.map_or(Ok(()), Err),
    }
}
