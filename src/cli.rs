//! The command line, as clap definitions. The man page and shell completions are generated
//! from [`command`], so this file is the one source of truth for flags and help text.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// The sections after the options in `llmctl --help` and in the man page, as (heading,
/// body): both are generated from here so they cannot disagree.
pub fn help_sections() -> [(&'static str, String); 4] {
    [
        ("CONFIGURATION", CONFIGURATION_HELP.to_string()),
        ("ENVIRONMENT", ENVIRONMENT_HELP.to_string()),
        ("FILES", FILES_HELP.to_string()),
        ("EXIT STATUS", exit_status_help()),
    ]
}

pub const CONFIGURATION_HELP: &str = "\
The config file is TOML; every key is optional. An unknown key, a wrong type or a bad
value is an error (exit 65) that names its line and what to write instead; strings,
durations (\"30m\") and sizes (\"12GiB\") are in quotes.
`llmctl config` prints the effective settings and where each came from; `llmctl reload`
makes a running daemon read the file again.

Top-level keys:
    llama_server     path of the llama-server binary
    queue_depth      requests that may wait for a slot before new ones get exit 75 (64)
    memory_budget    memory of all instances together: bytes, \"12GiB\" or \"75%\" of MemTotal
    vram_budget      GPU memory of all instances together, where nvidia-smi exists (\"90%\")
    max_instances    the most instances loaded at once, 1..=1024
    default_ttl      unload an instance idle this long: \"30m\", \"2h\", \"never\" (the default)
    max_wait         the longest a load waits for busy models before they drain for it:
                     a duration, \"0\" (strict arrival order) or \"auto\" (the default)
    min_residency    how long a busy model stays before it may be drained (\"auto\")
    load_timeout     seconds a load may go without any llama-server output (120)
    token_timeout    seconds without a token before a generation fails with 124 (300)
    crash_limit      failures within crash_window seconds after which a model is not
    crash_window     restarted until `llmctl stop MODEL` (3 within 60)
    max_tokens       the most tokens `run` and `chat` generate without -n (1024; 0: no limit)
    cache_budget     disk for prompt caches saved when a model is unloaded (\"4GiB\"; \"0\": off)
    default_model    the model `serve` answers with when a request names none it knows
                     (and no model's answers_to matches)
    cors_origins     web origins allowed to call `serve`, or [\"*\"]; default: this machine
    listen           addresses the daemon serves `serve`'s API on from its start
    api_key_file     the API key file for `listen` (required beyond loopback)
    allowed_hosts    Host values a key-less `serve` answers besides loopback names

Per-model keys, in a [models.NAME] table (NAME is then an alias for MODEL):
    path             the .gguf file; relative to the config file's directory
    ctx_size         context size in tokens (llama-server -c), 16..=16777216
    parallel         parallel slots (llama-server -np), 1..=256
    gpu_layers       layers to offload to the GPU, 0..=1000
    args             more llama-server arguments, passed as they are
    pinned           true: never evicted for memory, never unloaded by its TTL
    ttl              this model's idle TTL
    max_queued       requests that may wait for this model; more get exit 75
    embeddings       start llama-server with --embeddings (answers /v1/embeddings)
    reranking        start llama-server with --reranking (answers /v1/rerank)
    answers_to       name patterns `serve` answers with this model: [\"claude-*\", \"gpt-4o*\"]
    url, urls        a server that already runs, fronted but never started or stopped
    api_key_env      the variable holding the bearer token for url/urls
    ca_file          a CA to trust for https url/urls instead of Mozilla's roots";

pub const ENVIRONMENT_HELP: &str = "    LLMCTL_SOCKET           the daemon's Unix socket (as --socket)
    LLMCTL_CONFIG           the config file (as --config)
    LLMCTL_LLAMA_SERVER     the llama-server binary (as --llama-server)
    LLMCTL_NO_AUTOSTART     set (not 0 or false): fail instead of starting the daemon
    LLMCTL_NO_SETUP         set (not 0): never build llama-server or install the demo
                            model on first use
    LLMCTL_MEMORY_BUDGET    overrides memory_budget of the config file
    LLMCTL_API_KEY          the key `serve` requires (or --api-key-file)
    LLMCTL_CHILDREN_ON_TCP  1: llama-server children listen on loopback TCP, each with a
                            random key, instead of a private Unix socket
    LLMCTL_STOP_GRACE_MS    milliseconds a child gets after SIGTERM before SIGKILL (5000)
    LLMCTL_CACHE_TIMEOUT_MS milliseconds saving prompt caches may delay a stop, and restoring
                            them a load (10000)
    LLMCTL_STATE_DIR        state directory (logs, state.json)
    LLMCTL_DATA_DIR         data directory (llama-server, demo and pulled models)
    LLMCTL_CACHE_DIR        cache directory (setup downloads and builds, header cache)
    XDG_RUNTIME_DIR, XDG_STATE_HOME, XDG_CONFIG_HOME, XDG_DATA_HOME, XDG_CACHE_HOME
                            where the directories above are when no LLMCTL_* names them
    HF_ENDPOINT             the Hugging Face Hub `pull` downloads from
    HF_TOKEN                a Hub token, for gated or private repositories
    VULKAN_SDK              where `setup` looks for the Vulkan headers
    RUST_LOG                log filter for diagnostics on stderr (overrides -v)";

pub const FILES_HELP: &str = "    $XDG_RUNTIME_DIR/llmctl/llmctl.sock, else /run/user/$UID/llmctl/llmctl.sock,
    else /tmp/llmctl-$UID/llmctl.sock
        the daemon's socket and lock file; SOCKET.children/ holds the children's sockets
    $XDG_CONFIG_HOME/llmctl/config.toml, else ~/.config/llmctl/config.toml
        the config file (optional)
    $XDG_STATE_HOME/llmctl, else ~/.local/state/llmctl
        the daemon log, per-model llama-server logs (logs/), state.json and the saved
        prompt caches (prompt-caches/, 0700)
    $XDG_DATA_HOME/llmctl, else ~/.local/share/llmctl
        the installed llama-server, the demo model and pulled models (models/)
    $XDG_CACHE_HOME/llmctl, else ~/.cache/llmctl
        setup downloads and build tree, the set-up lock (setup.lock), the GGUF header
        cache of `ls`
    ~ is $HOME; where HOME is unset, empty or relative (cron, env -i), the home
    directory the password database gives the user; relative XDG_* directories are ignored";

/// The EXIT STATUS section, from the table in `error.rs`: each meaning wrapped to the
/// width of the other sections, under its status.
pub fn exit_status_help() -> String {
    const WIDTH: usize = 88;
    let mut text = String::new();
    for (code, meaning) in crate::error::EXIT_STATUSES {
        let mut line = format!("    {code:<5}");
        for word in meaning.split(' ') {
            if line.len() + 1 + word.len() > WIDTH && line.trim_start().len() > 5 {
                text.push_str(&line);
                text.push('\n');
                line = " ".repeat(9);
            } else if !line.ends_with(' ') {
                line.push(' ');
            }
            line.push_str(word);
        }
        text.push_str(&line);
        text.push('\n');
    }
    text.pop();
    text
}

/// `llmctl --help` after the options: every section of [`help_sections`] under its heading.
fn after_long_help() -> String {
    help_sections().iter().map(|(heading, body)| format!("{heading}:\n{body}")).collect::<Vec<_>>().join("\n\n")
}

#[derive(Debug, Parser)]
#[command(
    name = "llmctl",
    version,
    about = "Run local GGUF language models from the shell",
    long_about = "Run local GGUF language models from the shell.\n\n\
        `llmctl run MODEL PROMPT` streams generated text to stdout. Behind it a small daemon, \
        reached over a Unix socket and started on demand, runs one llama.cpp llama-server per \
        model, keeps loaded models warm and never leaves a child process behind.",
    after_long_help = after_long_help()
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
// Their variables are read in `to_global` (the paths' in `Paths::resolve`), not by clap,
// which counts a variable as an option given and shows it in the usage line of every error,
// as if it were required.
pub struct GlobalArgs {
    /// Unix socket of the daemon
    ///
    /// May also be given with the LLMCTL_SOCKET environment variable.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Config file
    ///
    /// May also be given with the LLMCTL_CONFIG environment variable.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// llama-server binary the daemon runs
    ///
    /// May also be given with the LLMCTL_LLAMA_SERVER environment variable.
    #[arg(long, global = true, value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// Fail instead of starting the daemon when none answers
    ///
    /// May also be given with the LLMCTL_NO_AUTOSTART environment variable (set, and not 0 or false).
    #[arg(long, global = true)]
    pub no_autostart: bool,
    /// More diagnostics on stderr (timings with `run`; repeat for debug logs)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Each subcommand's arguments are built only when that subcommand is the one used (or
/// when help, completions or a man page need them all): building every one on each start
/// was a third of the heap and of the page faults of a command as short as `status`.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum Command {
    /// Generate text; tokens go to stdout as they arrive
    Run(RunArgs),
    /// Print the embedding of each TEXT (or of each line of stdin) as a JSON line:
    /// {"index":N,"embedding":[...]}
    Embed(EmbedArgs),
    /// Show the daemon, its queue and every model instance
    Status(StatusArgs),
    /// Load MODEL and return once it answers; quiet and idempotent, for cron
    Warm(WarmArgs),
    /// Keep MODEL loaded: never evicted for memory, never unloaded by its TTL
    Pin(PinArgs),
    /// Let MODEL be evicted and unloaded again
    Unpin(PinArgs),
    /// Make MODEL the loaded one, in the background unless --wait
    Switch(SwitchArgs),
    /// Unload a model (or all of them) gracefully
    Stop(StopArgs),
    /// Run the daemon in the foreground (for systemd or debugging)
    Daemon(DaemonArgs),
    /// Stop every model gracefully, then the daemon
    Shutdown,
    /// Make the running daemon read its config again (as SIGHUP does): budgets, instance
    /// limit and default TTL change at once; the reply names settings that need `shutdown`
    Reload,
    /// Print the effective configuration and where each value came from
    Config(ConfigArgs),
    /// Print a model's llama-server log, or the daemon's
    Logs(LogsArgs),
    /// Print the daemon's state changes as JSON lines as they happen
    Events,
    /// Print the daemon's counters in Prometheus text format
    Metrics,
    /// Serve llama-server's HTTP API (OpenAI and Anthropic compatible) for every model llmctl
    /// knows, from the daemon, until Ctrl-C; requests are forwarded unchanged and answers
    /// relayed byte for byte
    Serve(ServeArgs),
    /// List every model llmctl can run: aliases, pulled models, the demo, files in the
    /// models directory
    Ls(LsArgs),
    /// Show a model's details from its GGUF header: architecture, size, context, memory
    Show(ShowArgs),
    /// Download a GGUF model from the Hugging Face Hub (OWNER/REPO[:QUANT])
    Pull(PullArgs),
    /// Remove a model that `llmctl pull` downloaded
    Rm(RmArgs),
    /// List the loaded models, one line each
    Ps(PsArgs),
    /// Chat with MODEL on the terminal: the conversation is kept across turns
    Chat(ChatArgs),
    /// Find or build llama-server and install the demo model
    Setup(SetupArgs),
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Context size in tokens for this instance (llama-server -c)
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(16..=i64::from(crate::config::MAX_CTX_SIZE)))]
    pub ctx_size: Option<u32>,
    /// Parallel slots of this instance (llama-server -np)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::config::MAX_PARALLEL)))]
    pub parallel: Option<u32>,
    /// Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::config::MAX_GPU_LAYERS)))]
    pub gpu_layers: Option<u32>,
}

impl LoadArgs {
    /// The load options given, each overriding the config.
    pub fn overrides(&self) -> crate::model::LoadOverrides {
        crate::model::LoadOverrides { ctx_size: self.ctx_size, parallel: self.parallel, gpu_layers: self.gpu_layers }
    }
}

impl GlobalArgs {
    /// The options as a command's context takes them, each flag over its variable.
    pub fn to_global(&self) -> crate::context::Global {
        let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
        crate::context::Global {
            socket: self.socket.clone(),
            config: self.config.clone(),
            llama_server: self.llama_server.clone().or_else(|| var("LLMCTL_LLAMA_SERVER").map(PathBuf::from)),
            no_autostart: self.no_autostart || var("LLMCTL_NO_AUTOSTART").is_some_and(|value| !falsey(&value)),
            verbose: self.verbose,
        }
    }
}

/// A variable's value that means "no", as clap reads a boolean variable: `0`, `false`,
/// `no`, `off`, `f` or `n`, in any case.
fn falsey(value: &std::ffi::OsStr) -> bool {
    let value = value.to_string_lossy().to_ascii_lowercase();
    ["0", "false", "no", "off", "f", "n"].contains(&value.as_str())
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Path to a .gguf file, or an alias from the config file (`demo` after `llmctl setup`)
    pub model: String,
    /// The prompt; words are joined with spaces. Piped stdin is appended after a blank line
    pub prompt: Vec<String>,
    /// System message (chat mode)
    #[arg(long, value_name = "TEXT", conflicts_with = "raw")]
    pub system: Option<String>,
    /// Send the prompt as is, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// Write JSON lines: one per chunk, then a final `done` line with usage and timings
    #[arg(long)]
    pub json: bool,
    /// Do not read stdin even when it is not a terminal
    #[arg(long)]
    pub no_stdin: bool,
    /// Most tokens to generate: 1024 unless `max_tokens` in the config says otherwise; 0 for
    /// no limit
    #[arg(short = 'n', long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::config::MAX_TOKENS)))]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 for greedy
    #[arg(long, value_name = "T", value_parser = parse_non_negative)]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold, in [0, 1]
    #[arg(long, value_name = "P", value_parser = parse_unit)]
    pub top_p: Option<f32>,
    /// Sample from the K most likely tokens (0 disables)
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,
    /// Minimum probability relative to the most likely token, in [0, 1]
    #[arg(long, value_name = "P", value_parser = parse_unit)]
    pub min_p: Option<f32>,
    /// Penalty for repeated tokens (1 disables)
    #[arg(long, value_name = "X", value_parser = parse_non_negative)]
    pub repeat_penalty: Option<f32>,
    /// Random seed, for reproducible sampling
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Stop when this text is generated (repeatable; not empty)
    #[arg(long, value_name = "TEXT", value_parser = parse_stop)]
    pub stop: Vec<String>,
    /// Make the output JSON valid for this JSON Schema: a file, or the schema itself
    #[arg(short = 's', long, value_name = "FILE|JSON", conflicts_with = "grammar")]
    pub json_schema: Option<String>,
    /// Make the output follow this GBNF grammar file (llama.cpp's grammar format)
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Path to a .gguf file, an alias, or OWNER/REPO[:QUANT] of a pulled model; it runs on an
    /// instance of its own, started with --embeddings
    pub model: String,
    /// The texts, one vector each, in order; without any, each line of stdin is one text
    pub text: Vec<String>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the status as one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WarmArgs {
    /// Path to a .gguf file or an alias
    pub model: String,
    /// Keep it loaded (pinned) at least this long: 90s, 30m, 8h
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<u64>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// Path to a .gguf file or an alias
    pub model: String,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
pub struct SwitchArgs {
    /// Path to a .gguf file or an alias
    pub model: String,
    /// Return only once the model is ready
    #[arg(long)]
    pub wait: bool,
    /// Unload every other model once this one is ready
    #[arg(long)]
    pub exclusive: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("target").required(true))]
pub struct StopArgs {
    /// Path to a .gguf file or an alias
    #[arg(group = "target")]
    pub model: Option<String>,
    /// Unload every model
    #[arg(long, group = "target")]
    pub all: bool,
    /// Also drop the model's saved prompt caches (with --all: every saved cache), and save none
    #[arg(long)]
    pub forget: bool,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Requests that may wait for a slot before new ones are refused as busy
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_depth: Option<u64>,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true))]
pub struct LogsArgs {
    /// Path to a .gguf file or an alias
    #[arg(group = "source")]
    pub model: Option<String>,
    /// The daemon's own log instead of a model's
    #[arg(long, group = "source")]
    pub daemon: bool,
    /// Keep printing what is appended, until Ctrl-C
    #[arg(short, long)]
    pub follow: bool,
    /// Print only the last N lines first
    #[arg(short = 'n', long, value_name = "N")]
    pub lines: Option<usize>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; beyond loopback an API key is required
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// File holding the API key clients must send as `Authorization: Bearer KEY` or
    /// `x-api-key: KEY` (or set LLMCTL_API_KEY)
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print the list as a JSON array
    #[arg(long, conflicts_with = "names")]
    pub json: bool,
    /// Print only the names, one per line (for shell completion)
    #[arg(long, hide = true)]
    pub names: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Path to a .gguf file, an alias, OWNER/REPO[:QUANT] of a pulled model, or a file name in
    /// the models directory
    pub model: String,
    /// Print the chat template (alone, or as `chat_template` with --json)
    #[arg(long)]
    pub template: bool,
    /// Print the details as one JSON object
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// OWNER/REPO on the Hub, with an optional quantization: `OWNER/REPO:Q8_0`. Without one,
    /// Q4_K_M, else the first GGUF file. `hf.co/` or `huggingface.co/` in front is taken, as
    /// Ollama takes it. HF_ENDPOINT and HF_TOKEN are honoured
    pub model: String,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// A pulled model: OWNER/REPO[:QUANT] as `llmctl ls` names it
    pub model: String,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Path to a .gguf file, an alias, or OWNER/REPO[:QUANT] of a pulled model
    pub model: String,
    /// System message for the conversation (`/system TEXT` changes it)
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Sampling temperature, 0 for greedy (`/set temperature X` changes it)
    #[arg(long, value_name = "T", value_parser = parse_non_negative)]
    pub temperature: Option<f32>,
    /// Most tokens in one answer: 1024 unless `max_tokens` in the config says otherwise; 0 for
    /// no limit (`/set parameter num_predict N` changes it)
    #[arg(short = 'n', long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::config::MAX_TOKENS)))]
    pub max_tokens: Option<u32>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print the loaded instances as a JSON array
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Print the settings as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Parallel compile jobs when building llama-server (default: number of CPUs)
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    /// Do not install the demo model
    #[arg(long)]
    pub no_model: bool,
    /// Print nothing but errors
    #[arg(short, long)]
    pub quiet: bool,
    /// Build llama-server for this backend instead of the one detected (CUDA with an NVIDIA
    /// GPU and nvcc, Vulkan with its SDK, else the CPU)
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
    /// For the CPU: a build that runs on any x86-64 of its class, not only this CPU
    #[arg(long)]
    pub portable: bool,
    /// Print the backend, CMake options and install path that setup would use; change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BackendArg {
    Cpu,
    Cuda,
    Vulkan,
}

fn parse_duration(text: &str) -> Result<u64, String> {
    match crate::config::parse_ttl(text)? {
        crate::config::Ttl::Seconds(seconds) => Ok(seconds),
        crate::config::Ttl::Never => Err("use `llmctl pin` to keep a model loaded for good".into()),
    }
}

fn parse_non_negative(text: &str) -> Result<f32, String> {
    let value: f32 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text} must be a finite number >= 0"));
    }
    Ok(value)
}

/// A stop string: an empty one would match before the first token and empty every answer.
fn parse_stop(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("a stop string cannot be empty (it would end every answer before its first token)".into());
    }
    Ok(text.to_string())
}

fn parse_unit(text: &str) -> Result<f32, String> {
    let value = parse_non_negative(text)?;
    if value > 1.0 {
        return Err(format!("{text} must be between 0 and 1"));
    }
    Ok(value)
}

/// Subcommands that stop or delete something. A typo is never answered with one of them:
/// `llmctl shotdown` must not teach the user to type `shutdown` on autopilot.
const DESTRUCTIVE_SUBCOMMANDS: [&str; 3] = ["shutdown", "stop", "rm"];

/// Parses the command line like [`Parser::try_parse_from`], except that an error never
/// suggests a destructive subcommand; where it would have, it points at `--help` instead.
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, clap::Error> {
    use clap::error::{ContextKind, ContextValue};

    Cli::try_parse_from(args).map_err(|mut error| {
        let Some(ContextValue::Strings(suggested)) = error.get(ContextKind::SuggestedSubcommand) else {
            return error;
        };
        let safe: Vec<String> =
            suggested.iter().filter(|name| !DESTRUCTIVE_SUBCOMMANDS.contains(&name.as_str())).cloned().collect();
        if safe.len() == suggested.len() {
            return error;
        }
        if safe.is_empty() {
            error.remove(ContextKind::SuggestedSubcommand);
        } else {
            error.insert(ContextKind::SuggestedSubcommand, ContextValue::Strings(safe));
        }
        let mut tips = match error.remove(ContextKind::Suggested) {
            Some(ContextValue::StyledStrs(tips)) => tips,
            _ => Vec::new(),
        };
        tips.push("`llmctl --help` lists every subcommand".into());
        error.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
        error
    })
}

/// The clap command, for the man page and completion generators.
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn a_typo_never_suggests_a_destructive_subcommand() {
        for typo in ["shotdown", "shutdwn", "stpo", "sotp", "rmm"] {
            let error = parse(["llmctl".into(), typo.into()]).unwrap_err();
            assert_eq!(error.kind(), clap::error::ErrorKind::InvalidSubcommand, "{typo}");
            let message = error.render().to_string();
            for destructive in DESTRUCTIVE_SUBCOMMANDS {
                assert!(!message.contains(&format!("'{destructive}'")), "{typo} suggested {destructive}:\n{message}");
            }
            assert!(message.contains("llmctl --help"), "{message}");
        }
    }

    #[test]
    fn a_typo_still_gets_a_harmless_suggestion() {
        let message = parse(["llmctl".into(), "stauts".into()]).unwrap_err().render().to_string();
        assert!(message.contains("'status'"), "{message}");
    }

    #[test]
    fn sampling_values_are_checked() {
        assert!(parse_unit("0.5").is_ok());
        for bad in ["1.5", "-0.1", "NaN", "inf", "x"] {
            assert!(parse_unit(bad).is_err(), "{bad}");
        }
        assert!(parse_non_negative("-1").is_err());
    }
}
