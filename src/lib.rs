//! llmctl runs local GGUF models through llama.cpp's `llama-server` from the shell.
//!
//! # Code map, in the order a request travels
//! - `cli`: the clap definition; man page and completions are generated from it.
//! - `commands/*`: one file per subcommand; the client side of each.
//! - `client`: connects to the daemon (starting it when needed) and speaks the protocol.
//! - `protocol`: the NDJSON messages and the line codec.
//! - `daemon`: the threads and what they share; `daemon/connection` reads one request and
//!   relays it to an instance worker; `daemon/scheduler` grants memory; `daemon/state` is
//!   the state file; `daemon/metrics` renders Prometheus text.
//! - `admission`: the daemon-wide bounded queue that answers Busy instead of blocking.
//! - `instance`: handles, jobs, leases and views; `instance/worker` is the thread that owns
//!   one child; `instance/state` its pure state machine; `instance/table` the lookup;
//!   `instance/cache` and `instance/cache_store` the prompt caches kept across unloads.
//! - `budget`: the memory policy, a pure function; `memory` measures RAM and GPUs.
//! - `backend/llama`: llama-server's command line, output capture, readiness, streaming;
//!   `backend/forward` passes `serve`'s requests through unchanged; `backend/unix` is HTTP
//!   over a child's Unix socket.
//! - `http`: the HTTP/1.1 server under `commands/serve`, with its limits.
//! - `process`: the one owner of child processes and signals; `process/launcher` the thread
//!   that forks them.
//! - `events`: state changes for `llmctl events`.
//! - `setup`: llama-server built for this machine's accelerator, and the demo model;
//!   `llama_server`: finding the binary and asking its version, with a deadline.
//! - `model`, `gguf`, `config`, `paths`, `error`: resolution of names, file checks,
//!   settings, locations and the exit-status table.
//! - `catalog`: every model llmctl can run (`ls`, completion, "did you mean"), with a cache
//!   of headers; `library`: the models `pull` downloaded and their manifests; `hub`: the
//!   Hugging Face Hub client of `pull`; `sha256`: the digest that checks a download;
//!   `percent`: URL percent-encoding.
//! - `term`: untrusted text (file names, header strings, a child's output) escaped for the
//!   terminal.
//!
//! # Threads of the daemon and what each owns
//! - `listener` accepts; `conn` threads (reused, one request each at a time) send jobs and
//!   messages to workers and wait on channels for the answers.
//! - `instance-N`, one per instance: **the only thread that touches its child or its state**.
//! - `scheduler`: **the only place that decides who holds memory**; loads are granted in
//!   arrival order and counted until the child is reaped.
//! - `supervisor`: a timer for TTLs, GPU readings and the state file; it asks, workers act.
//! - `launcher`: forks every child, so `PR_SET_PDEATHSIG` follows the daemon's life.
//! - `signals`: SIGINT/SIGTERM to the shutdown channel.
//!
//! # Invariants
//! - **Only `process` sends signals.**
//! - **No lock is held across I/O**: locks guard the instance table, the views and the
//!   event subscribers; the guard is dropped before anything is sent, spawned or killed.
//! - **No busy child is stopped except by `stop` or `shutdown`**: unloads drain first.
//! - **Only `protocol` knows the wire format.**
//! - **Only `main` decides the exit code**: everything below returns an [`error::Error`].
//! - **stdout of `run` carries generated text and nothing else.**

pub mod backend;
pub mod budget;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod context;
pub mod daemon;
pub mod error;
pub mod estimate;
pub mod events;
pub mod gguf;
pub mod http;
pub mod hub;
pub mod instance;
pub mod library;
pub mod llama_server;
pub mod memory;
pub mod model;
pub mod paths;
pub mod percent;
pub mod process;
pub mod protocol;
pub mod settings;
pub mod setup;
pub mod sha256;
pub mod similar;
pub mod sys;
pub mod term;
pub mod tiny_model;

use std::ffi::OsString;
use std::io::Write;

use crate::cli::Command;
use crate::error::{exit, Error, Result};

/// Parses `args` and runs the command.
pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<()> {
    let cli = match cli::parse(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return match error.kind() {
                clap::error::ErrorKind::DisplayVersion => {
                    print_llama_server();
                    Ok(())
                }
                clap::error::ErrorKind::DisplayHelp => Ok(()),
                _ => Err(Error::Usage { message: String::new() }),
            };
        }
    };
    init_logging(cli.global.verbose, matches!(cli.command, Command::Daemon(_)));
    let context = context::Context::new(cli.global.to_global());
    match cli.command {
        Command::Run(args) => commands::run::run(&context, args),
        Command::Embed(args) => commands::embed::run(&context, args),
        Command::Status(args) => commands::status::run(&context, args),
        Command::Warm(args) => commands::warm::run(&context, args),
        Command::Switch(args) => commands::switch::run(&context, args),
        Command::Pin(args) => commands::pin::run(&context, args, true),
        Command::Unpin(args) => commands::pin::run(&context, args, false),
        Command::Stop(args) => commands::stop::run(&context, args),
        Command::Daemon(args) => commands::daemon::run(&context, args),
        Command::Shutdown => commands::shutdown::run(&context),
        Command::Reload => commands::reload::run(&context),
        Command::Config(args) => commands::config::run(&context, args),
        Command::Logs(args) => commands::logs::run(&context, args),
        Command::Events => commands::events::events(&context),
        Command::Metrics => commands::events::metrics(&context),
        Command::Serve(args) => commands::serve::run(&context, args),
        Command::Setup(args) => commands::setup::run(&context, args),
        Command::Ls(args) => commands::ls::run(&context, args),
        Command::Show(args) => commands::show::run(&context, args),
        Command::Pull(args) => commands::pull::run(&context, args),
        Command::Rm(args) => commands::rm::run(&context, args),
        Command::Ps(args) => commands::ps::run(&context, args),
        Command::Chat(args) => commands::chat::run(&context, args),
    }
    .map_err(|error| commands::suggest_names(&context, error))
}

/// After `--version`: the llama-server llmctl would use (path, build, backend), and a
/// warning when a GPU machine would run a CPU build.
fn print_llama_server() {
    let paths = paths::Paths::resolve(None, None);
    let explicit = std::env::var_os("LLMCTL_LLAMA_SERVER").filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let configured = config::Config::load(&paths.config).ok().and_then(|config| config.llama_server);
    println!(
        "llama-server: {}",
        llama_server::describe_llama_server(&paths, explicit.as_deref(), configured.as_deref())
    );
    let cpu_build = explicit.is_none()
        && configured.is_none()
        && llama_server::installed_backend(&paths).is_none_or(|backend| !backend.is_gpu());
    if cpu_build && setup::Probes::of_this_machine().has_nvidia_gpu() {
        println!(
            "warning: this machine has an NVIDIA GPU but llama-server is a CPU build; `llmctl setup --backend cuda` \
             builds one for the GPU (it needs the CUDA toolkit)"
        );
    }
}

/// Prints `error` for the user and returns the exit code for it.
pub fn report(error: &Error) -> i32 {
    let code = error.exit_code();
    match error {
        // clap has printed its own message already.
        Error::Usage { message } if message.is_empty() => {}
        Error::Interrupted => {}
        _ => {
            // Messages name files and quote what servers wrote: escaped, lines kept, so no
            // such text can drive the terminal.
            let message = error.to_string();
            let _ = writeln!(std::io::stderr().lock(), "llmctl: {}", term::escape_lines(&message));
        }
    }
    if code == exit::OK {
        exit::INTERNAL
    } else {
        code
    }
}

/// One place sets up diagnostics: warnings by default, `-v` for info, `-vv` for debug;
/// `RUST_LOG` overrides both. The daemon logs info by default, since its log is a file.
fn init_logging(verbose: u8, is_daemon: bool) {
    let default = match (verbose, is_daemon) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .try_init();
}
