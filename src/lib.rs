//! llmctl runs local GGUF models through llama.cpp's `llama-server` from the shell.
//!
//! # Code map, by layer, from the top down
//! Each layer uses only its own and the ones below; `tests/integration/layers.rs` holds the
//! same table and fails on a `use` that goes up.
//! - `main` and this file: parse the command line, run the command, decide the exit code.
//! - `commands/*`: one file per subcommand, the client side of each.
//! - `cli`: the clap definition; `--help`, the man pages and completions come from it.
//! - `setup`: llama-server built for this machine's accelerator, and the demo model, on
//!   first use (`setup/machine`, `setup/build`, `setup/demo`).
//! - `client`: connects to the daemon (starting it when none answers), shakes hands and
//!   speaks the protocol; `client/stream` reads a generation as it comes, for `run` and
//!   `chat`; `client/interrupt` is the one Ctrl-C handler.
//! - `daemon`: its start, locks and threads, and the Unix socket's `listener`;
//!   `daemon/connection` reads one request and dispatches it to `daemon/handlers` (by
//!   family: generate, control, observe) or to `daemon/serve` (the HTTP API: llama-server's
//!   routes forwarded, Ollama's translated, `/v1/models`, embeddings); `daemon/work` is a
//!   request's life on a slot; `daemon/admission` how it gets one and `daemon/peer` how it
//!   notices its client left; `daemon/scheduler` grants memory (its `plan` is a pure
//!   function), `daemon/supervisor` is the timer, `daemon/report` the status; below them
//!   `daemon/shared` (what the threads share), `daemon/queue`, `daemon/listeners`,
//!   `daemon/state` (the state file) and `daemon/metrics` (Prometheus text).
//! - `instance`: the handle others hold; `instance/table` the lookup; `instance/worker`
//!   the thread that owns one child; what it uses: `instance/outcome` (how a request on a
//!   lease ended, a pure function), `instance/policy` (the crash-loop breaker, replica
//!   choice, queue limits), `instance/cache_store` (saved prompt caches on disk); what an
//!   instance is made of: `instance/inbox` (what a worker hears and answers),
//!   `instance/lease`, `instance/view`, `instance/state` (the pure state machine) and
//!   `instance/cache` (which caches may be saved and restored).
//! - `backend`: talking to llama-server: a child's command line and output (`local`), HTTP
//!   over its Unix socket or to a remote server (`client`, `unix`), request bodies, one SSE
//!   reader, generation for `run`, forwarding for `serve`, the slot API.
//! - `llama_server`: finding the binary and asking its version, with a deadline.
//! - `process`: the one owner of child processes and signals; `process/launcher` the
//!   thread that forks them.
//! - The foundation, which knows nothing above it: `protocol` (the NDJSON messages and
//!   their codec; only it knows the wire format), `http` (the HTTP/1.1 server with its
//!   limits), `error` (the one error type, exit statuses and HTTP statuses), `config` and
//!   `settings` (the file, and the one table of settings with defaults), `context` (what a
//!   command loads once), `paths`, `model` (names to files), `gguf` (the bounded header
//!   reader), `catalog`, `library`, `hub` (what `ls` lists, what `pull` downloaded, the Hub
//!   client), `budget`, `estimate` and `memory` (the memory policy, a model's need, RAM and
//!   GPU readings), `events`, `term` (untrusted text escaped for the terminal), `similar`
//!   ("did you mean"), `sha256`, `percent`, `sys` (the few system calls std lacks) and
//!   `tiny_model` (the deterministic model tests use).
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
pub(crate) mod budget;
pub mod catalog;
pub mod cli;
pub(crate) mod client;
pub(crate) mod commands;
pub(crate) mod config;
pub(crate) mod context;
pub(crate) mod daemon;
pub mod error;
pub(crate) mod estimate;
pub(crate) mod events;
pub mod gguf;
pub(crate) mod http;
pub(crate) mod hub;
pub(crate) mod instance;
pub(crate) mod library;
pub(crate) mod llama_server;
pub(crate) mod memory;
pub(crate) mod model;
pub(crate) mod paths;
pub(crate) mod percent;
pub(crate) mod process;
pub mod protocol;
pub(crate) mod settings;
pub(crate) mod setup;
pub mod sha256;
pub(crate) mod similar;
pub(crate) mod sys;
pub(crate) mod term;
pub mod tiny_model;
pub(crate) mod unheard;

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
