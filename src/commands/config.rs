//! `llmctl config`: the effective configuration, and where each value came from (flag,
//! environment, config file or default), and where a running daemon uses something else.
//! It reads; it changes nothing.

use std::io::Write;

use serde::Serialize;

use crate::cli::ConfigArgs;
use crate::config::DEFAULT_QUEUE_DEPTH;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::settings::{DEFAULT_MEMORY_BUDGET, DEFAULT_VRAM_BUDGET};

#[derive(Serialize)]
struct Setting {
    name: &'static str,
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

/// Clap folds a flag and its variable into one value: the variable tells them apart.
fn flag_or(given: bool, own_env: &str, flag: &str, xdg: Option<&str>) -> String {
    if given && !env_set(own_env) {
        format!("flag {flag}")
    } else {
        path_source(own_env, xdg)
    }
}

pub fn run(context: &Context, args: ConfigArgs) -> Result<()> {
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
            name: "socket",
            value: paths.socket.display().to_string(),
            source: flag_or(context.global.socket.is_some(), "LLMCTL_SOCKET", "--socket", Some("XDG_RUNTIME_DIR")),
            daemon: None,
        },
        Setting {
            name: "config",
            value: format!("{}{}", paths.config.display(), if config_exists { "" } else { " (absent)" }),
            source: flag_or(context.global.config.is_some(), "LLMCTL_CONFIG", "--config", Some("XDG_CONFIG_HOME")),
            daemon: None,
        },
        Setting {
            name: "state_dir",
            value: paths.state_dir.display().to_string(),
            source: path_source("LLMCTL_STATE_DIR", Some("XDG_STATE_HOME")),
            daemon: None,
        },
        Setting {
            name: "data_dir",
            value: paths.data_dir.display().to_string(),
            source: path_source("LLMCTL_DATA_DIR", Some("XDG_DATA_HOME")),
            daemon: None,
        },
        Setting {
            name: "cache_dir",
            value: paths.cache_dir.display().to_string(),
            source: path_source("LLMCTL_CACHE_DIR", Some("XDG_CACHE_HOME")),
            daemon: None,
        },
    ];
    // Clap folds the flag and LLMCTL_LLAMA_SERVER together; tell them apart by the variable.
    let installed = paths.installed_llama_server();
    let (llama_server, source) = match (&context.global.llama_server, &config.llama_server) {
        (Some(path), _) if env_set("LLMCTL_LLAMA_SERVER") => {
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
    settings.push(Setting { name: "llama_server", value: llama_server, source, daemon: None });
    let or_default = |value: Option<String>, default: &str| value.unwrap_or_else(|| default.to_string());
    let budget_from_env = env_set("LLMCTL_MEMORY_BUDGET");
    settings.extend([
        Setting {
            name: "queue_depth",
            value: or_default(config.queue_depth.map(|v| v.to_string()), &DEFAULT_QUEUE_DEPTH.to_string()),
            source: from_config(config.queue_depth.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "memory_budget",
            value: if budget_from_env {
                std::env::var("LLMCTL_MEMORY_BUDGET").unwrap_or_default()
            } else {
                or_default(config.memory_budget.clone(), DEFAULT_MEMORY_BUDGET)
            },
            source: if budget_from_env {
                "environment LLMCTL_MEMORY_BUDGET".into()
            } else {
                from_config(config.memory_budget.is_some(), "default")
            },
            daemon: None,
        },
        Setting {
            name: "vram_budget",
            value: or_default(config.vram_budget.clone(), DEFAULT_VRAM_BUDGET),
            source: from_config(config.vram_budget.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "max_instances",
            value: or_default(config.max_instances.map(|v| v.to_string()), "none"),
            source: from_config(config.max_instances.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "default_ttl",
            value: or_default(config.default_ttl.clone(), "never"),
            source: from_config(config.default_ttl.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "load_timeout",
            value: format!("{}s", config.load_timeout.unwrap_or(120)),
            source: from_config(config.load_timeout.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "token_timeout",
            value: format!("{}s", config.token_timeout.unwrap_or(300)),
            source: from_config(config.token_timeout.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "crash_limit",
            value: config.crash_limit.unwrap_or(3).to_string(),
            source: from_config(config.crash_limit.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "crash_window",
            value: format!("{}s", config.crash_window.unwrap_or(60)),
            source: from_config(config.crash_window.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "cache_budget",
            value: or_default(config.cache_budget.clone(), crate::settings::DEFAULT_CACHE_BUDGET),
            source: from_config(config.cache_budget.is_some(), "default"),
            daemon: None,
        },
        // Read by `run` and `chat` themselves, so a change applies to the next one.
        Setting {
            name: "max_tokens",
            value: match crate::config::max_tokens(None, &config) {
                Some(limit) => limit.to_string(),
                None => "0 (no limit)".into(),
            },
            source: from_config(config.max_tokens.is_some(), "default"),
            daemon: None,
        },
        // Read by `serve` at each request, so a change applies at once.
        Setting {
            name: "default_model",
            value: or_default(config.default_model.clone(), "none (the only model, if there is one)"),
            source: from_config(config.default_model.is_some(), "default"),
            daemon: None,
        },
        Setting {
            name: "cors_origins",
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
        if !model.args.is_empty() {
            value += &format!(" args={:?}", model.args);
        }
        let name: &'static str = Box::leak(format!("models.{alias}").into_boxed_str());
        settings.push(Setting { name, value, source: from_config(true, ""), daemon: None });
    }

    // A running daemon keeps what it read at start (or at the last reload): say where it
    // differs from the file now.
    if let Ok(Some(mut connection)) = crate::client::try_connect(context) {
        if let Ok(crate::protocol::Response::Status(status)) = connection.call(&crate::protocol::Request::Status) {
            for setting in &mut settings {
                if let Some(in_force) = status.daemon.settings.get(setting.name) {
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
    let live = ["memory_budget", "vram_budget", "max_instances", "default_ttl", "cache_budget"];
    let text = if args.json {
        serde_json::to_string_pretty(&settings).map_err(|e| Error::internal(e.to_string()))? + "\n"
    } else {
        let width = settings.iter().map(|s| s.name.len()).max().unwrap_or(0);
        settings
            .iter()
            .map(|s| {
                let note = match &s.daemon {
                    Some(in_force) if live.contains(&s.name) => {
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
