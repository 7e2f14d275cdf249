//! The optional TOML config file: aliases, per-model load options, daemon settings.
//!
//! Unknown keys and wrong types are errors that name the line, so a typo never silently
//! changes behaviour. This module parses and resolves; it does not watch the file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Parallel slots of a llama-server child unless configured.
pub(crate) const DEFAULT_PARALLEL: u32 = 1;
/// Admission queue depth unless configured.
pub(crate) const DEFAULT_QUEUE_DEPTH: usize = 64;
/// The most slots llama-server takes (its `--parallel`; more aborts it at start).
pub(crate) const MAX_PARALLEL: u32 = 256;
/// The largest context asked for: 16 Mi tokens, far beyond any GGUF model's training context.
pub(crate) const MAX_CTX_SIZE: u32 = 1 << 24;
/// More layers than any model has; llama-server offloads all of them at any larger value.
pub(crate) const MAX_GPU_LAYERS: u32 = 1000;
/// The deepest queue the daemon keeps.
pub(crate) const MAX_QUEUE_DEPTH: usize = 1 << 20;
/// Ten years: the longest timeout or TTL, so seconds never overflow a clock.
pub(crate) const MAX_SECONDS: u64 = 10 * 365 * 86400;
/// The most tokens `run` and `chat` generate unless told otherwise. Without a limit
/// llama-server generates until the model stops or the context is full, and a small model
/// may never stop (the demo model was still writing a commit message after 120 s). 1024
/// tokens is a long answer (about 750 English words, or a page of code) and takes about 10 s
/// at the demo model's 100 tokens/s on two cores. `-n 0` or `max_tokens = 0` lifts it.
pub(crate) const DEFAULT_MAX_TOKENS: u32 = 1024;
/// The largest token limit taken: as many tokens as the largest context.
pub(crate) const MAX_TOKENS: u32 = MAX_CTX_SIZE;

/// The token limit of a generation: `-n` if given, else `max_tokens` from the config,
/// else [`DEFAULT_MAX_TOKENS`]; 0 means none.
pub(crate) fn max_tokens(flag: Option<u32>, config: &Config) -> Option<u32> {
    let limit = flag.or(config.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS);
    (limit > 0).then_some(limit)
}

/// Refuses a number outside `min..=max`, naming the range.
fn check_range(value: Option<u64>, min: u64, max: u64) -> Result<(), String> {
    match value {
        Some(value) if value < min || value > max => Err(format!("is outside {min}..={max}")),
        _ => Ok(()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path of the llama-server binary.
    pub llama_server: Option<PathBuf>,
    /// How many requests may wait for a slot before new ones are refused as busy.
    pub queue_depth: Option<usize>,
    /// Seconds a child may take to load before the load fails.
    pub load_timeout: Option<u64>,
    /// Seconds without a token before a generation is declared stalled.
    pub token_timeout: Option<u64>,
    /// Failures within `crash_window` seconds after which an instance is not restarted.
    pub crash_limit: Option<usize>,
    pub crash_window: Option<u64>,
    /// Memory all instances may use together: bytes, "12GiB" or "75%" of MemTotal.
    pub memory_budget: Option<String>,
    /// GPU memory all instances may use together, where nvidia-smi exists; "90%" of the GPU.
    pub vram_budget: Option<String>,
    /// The most instances loaded at once.
    pub max_instances: Option<usize>,
    /// Disk the prompt caches saved on unload may use: bytes or "4GiB"; "0" saves none.
    pub cache_budget: Option<String>,
    /// Unload an instance after this long without a request, unless its model says
    /// otherwise: "30m", "2h", "never" (the default).
    pub default_ttl: Option<String>,
    /// The longest a load waits while the models it would replace stay busy: a duration
    /// ("20s"), "0" for strict arrival order, or "auto" (the default, from measured load times).
    pub max_wait: Option<String>,
    /// How long a busy instance stays before it may be drained for a waiting model:
    /// a duration or "auto" (the default).
    pub min_residency: Option<String>,
    /// The most tokens `run` and `chat` generate unless `-n` says otherwise; 0 for no limit.
    pub max_tokens: Option<u32>,
    /// The model `serve` answers with when a request names none, or one llmctl does not
    /// know (clients often send a fixed name such as "gpt-4o-mini").
    pub default_model: Option<String>,
    /// Web origins `serve` allows for CORS, as `scheme://host[:port]`, or "*" for any;
    /// unset allows pages served from this machine (localhost, 127.0.0.1, [::1]) only.
    pub cors_origins: Option<Vec<String>>,
    /// Addresses (`HOST:PORT`) the daemon serves llama-server's HTTP API on from its start,
    /// as `llmctl serve --listen` does while it runs (for a daemon under systemd).
    #[serde(default)]
    pub listen: Vec<String>,
    /// The file holding the API key for the `listen` addresses (required beyond loopback).
    pub api_key_file: Option<PathBuf>,
    /// `Host` values `serve` answers besides this machine's loopback names, for a listener
    /// without a key reached by another name (a reverse proxy's); "*" for any.
    pub allowed_hosts: Option<Vec<String>>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A GGUF file llmctl runs; or else `url`/`urls` of servers that already run.
    pub path: Option<PathBuf>,
    /// An existing llama-server or OpenAI-compatible server: llmctl fronts it and never
    /// spawns or kills it.
    pub url: Option<String>,
    /// Several replicas of one model; each request goes to the least busy healthy one.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The environment variable holding a bearer token for the remote servers (never the
    /// token itself: the config file is not a place for secrets).
    pub api_key_env: Option<String>,
    /// A PEM file of CA certificates to trust for `https://` servers instead of the
    /// built-in Mozilla roots (for a private CA or a self-signed server).
    pub ca_file: Option<PathBuf>,
    pub ctx_size: Option<u32>,
    pub parallel: Option<u32>,
    /// Layers to offload to the GPU (llama-server --n-gpu-layers).
    pub gpu_layers: Option<u32>,
    #[serde(default)]
    pub args: Vec<String>,
    /// Never evicted for memory and never unloaded by its TTL.
    #[serde(default)]
    pub pinned: bool,
    /// Unload after this long without a request: "30m", "2h", "never".
    pub ttl: Option<String>,
    /// The most requests that may wait for this model's slots; more get busy (HTTP 429).
    pub max_queued: Option<u32>,
    /// An embedding model: started with llama-server's `--embeddings`, and the model
    /// `serve` answers `/v1/embeddings` with when a request names none.
    #[serde(default)]
    pub embeddings: bool,
    /// A reranking model: started with `--reranking`; answers `/v1/rerank`.
    #[serde(default)]
    pub reranking: bool,
    /// Glob patterns (`*` any text, `?` one character) of the names `serve` answers with
    /// this model, for clients that send a fixed name: `["claude-*", "gpt-4o*"]`. A name
    /// llmctl knows as it is comes first; two models' patterns may not overlap.
    #[serde(default)]
    pub answers_to: Vec<String>,
}

impl Config {
    /// Reads the config at `path`; a missing file is an empty config. Every error names its
    /// line, the key and what to write instead.
    pub fn load(path: &Path) -> Result<Config> {
        match Config::load_what_it_can(path) {
            (config, None) => Ok(config),
            (_, Some(error)) => Err(error),
        }
    }

    /// The settings of the config at `path` that can be read, and the error about the rest:
    /// for `llmctl config`, which shows what it can even when one line is wrong.
    pub fn load_what_it_can(path: &Path) -> (Config, Option<Error>) {
        let bad = |reason: String| (Config::default(), Some(Error::BadConfig { path: path.to_path_buf(), reason }));
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Config::default(), None),
            Err(e) => return bad(e.to_string()),
        };
        // A byte-order mark (some Windows editors write one) is not part of the text.
        let bytes = match bytes.strip_prefix("\u{feff}".as_bytes()) {
            Some(rest) => rest.to_vec(),
            None => bytes,
        };
        // A line that is not UTF-8 is an error of its own, and left out; the rest is read.
        let mut not_text = Vec::new();
        let lines: Vec<&str> = bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .map(|(number, line)| {
                std::str::from_utf8(line).unwrap_or_else(|e| {
                    let column = e.valid_up_to() + 1;
                    let byte = line[e.valid_up_to()];
                    not_text.push(format!(
                        "line {}: byte 0x{byte:02X} at column {column} is not UTF-8 text, which TOML is",
                        number + 1
                    ));
                    ""
                })
            })
            .collect();
        let (config, errors) = Config::parse_what_it_can(&lines.join("\n"));
        let errors: Vec<String> = not_text.into_iter().chain(errors).collect();
        let error =
            (!errors.is_empty()).then(|| Error::BadConfig { path: path.to_path_buf(), reason: errors.join("\n  ") });
        (config, error)
    }

    /// Parses a whole config; the error lists every problem found, one per line.
    pub fn parse(text: &str) -> Result<Config, String> {
        match Config::parse_what_it_can(text) {
            (config, errors) if errors.is_empty() => Ok(config),
            (_, errors) => Err(errors.join("\n  ")),
        }
    }

    /// Parses `text`, leaving out what is wrong: each error's lines are blanked (the line
    /// of a bad key, or the whole table of a bad model) and the rest parsed again, so the
    /// settings that are right are still read and every error is found, not only the first.
    pub fn parse_what_it_can(text: &str) -> (Config, Vec<String>) {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let mut errors: Vec<(Option<usize>, String)> = Vec::new();
        // Each round blanks at least one line, so this ends; the bound is for safety.
        for _ in 0..=lines.len() {
            let attempt = lines.join("\n");
            match parse_once(&attempt) {
                Ok(config) => return (config, in_line_order(errors)),
                Err(error) => {
                    errors.push((error.lines.as_ref().map(|range| range.start), error.message));
                    let Some(range) = error.lines.filter(|range| range.start < lines.len()) else {
                        break;
                    };
                    let range = range.start..range.end.min(lines.len());
                    // Nothing left to blank: the error does not go away by leaving lines out.
                    if lines[range.clone()].iter().all(|line| line.trim().is_empty()) {
                        break;
                    }
                    for line in &mut lines[range] {
                        line.clear();
                    }
                }
            }
        }
        (Config::default(), in_line_order(errors))
    }
}

/// Error messages in the order of their lines (those without a line last), as found.
fn in_line_order(mut errors: Vec<(Option<usize>, String)>) -> Vec<String> {
    errors.sort_by_key(|(line, _)| line.unwrap_or(usize::MAX));
    errors.into_iter().map(|(_, message)| message).collect()
}

/// One problem of a config file: the message (which names its line when it has one), and
/// the lines to leave out to read the rest (0-based, end excluded).
struct ParseError {
    message: String,
    lines: Option<std::ops::Range<usize>>,
}

/// Keys whose values are durations or sizes in strings: what a fix for an unquoted value says.
const DURATION_KEYS: [&str; 4] = ["default_ttl", "ttl", "max_wait", "min_residency"];
const SIZE_KEYS: [&str; 3] = ["memory_budget", "vram_budget", "cache_budget"];

fn parse_once(text: &str) -> Result<Config, ParseError> {
    let config: Config = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
    // Every value is checked where it enters, against what llama-server and the daemon can
    // really use (a zero timeout would make every load hang, an overflow would wrap), and
    // every error names the line of its key.
    // A problem that reads on from the value ("is outside 1..=256") follows it; any other
    // ("`soon` is not a duration") comes after a colon.
    let at_key = |key: &str, problem: String| -> ParseError {
        let exact = find_key(text, key);
        // Inside an inline table the key has no line of its own: the line that names it.
        let line = exact.or_else(|| find_key_inline(text, key));
        let shown = exact.map_or_else(|| key.to_string(), |n| key_and_value(text, n, key));
        let separator = if problem.starts_with("is ") { " " } else { ": " };
        ParseError {
            message: match line {
                Some(n) => format!("line {}: {shown}{separator}{problem}", n + 1),
                None => format!("{shown}{separator}{problem}"),
            },
            lines: line.map(|n| n..n + 1),
        }
    };
    let at_table = |table: &str, problem: String| -> ParseError {
        let range = find_table(text, table);
        ParseError {
            message: match &range {
                Some(range) => format!("line {}: [{table}] {problem}", range.start + 1),
                None => format!("[{table}] {problem}"),
            },
            lines: range,
        }
    };
    let limits: [(&str, Option<u64>, u64, u64); 7] = [
        ("queue_depth", config.queue_depth.map(|v| v as u64), 1, MAX_QUEUE_DEPTH as u64),
        ("load_timeout", config.load_timeout, 1, MAX_SECONDS),
        ("token_timeout", config.token_timeout, 1, MAX_SECONDS),
        ("crash_limit", config.crash_limit.map(|v| v as u64), 1, 1000),
        ("crash_window", config.crash_window, 1, MAX_SECONDS),
        ("max_instances", config.max_instances.map(|v| v as u64), 1, 1024),
        ("max_tokens", config.max_tokens.map(u64::from), 0, MAX_TOKENS.into()),
    ];
    for (key, value, min, max) in limits {
        check_range(value, min, max).map_err(|problem| at_key(key, problem))?;
    }
    for (name, model) in &config.models {
        let key = |field: &str| format!("models.{name}.{field}");
        let model_limits: [(&str, Option<u64>, u64, u64); 4] = [
            ("parallel", model.parallel.map(u64::from), 1, MAX_PARALLEL.into()),
            ("ctx_size", model.ctx_size.map(u64::from), 16, MAX_CTX_SIZE.into()),
            ("gpu_layers", model.gpu_layers.map(u64::from), 0, MAX_GPU_LAYERS.into()),
            ("max_queued", model.max_queued.map(u64::from), 1, MAX_QUEUE_DEPTH as u64),
        ];
        for (field, value, min, max) in model_limits {
            check_range(value, min, max).map_err(|problem| at_key(&key(field), problem))?;
        }
        let remote = model.url.is_some() || !model.urls.is_empty();
        if remote == model.path.is_some() {
            return Err(at_table(
                &format!("models.{name}"),
                "needs exactly one of `path` (a model file) and `url`/`urls` (servers that already run)".into(),
            ));
        }
        if let Some(url) = &model.url {
            check_url(url).map_err(|problem| at_key(&key("url"), problem))?;
        }
        for url in &model.urls {
            check_url(url).map_err(|problem| at_key(&key("urls"), problem))?;
        }
        if let Some(ttl) = &model.ttl {
            parse_ttl(ttl).map_err(|problem| at_key(&key("ttl"), problem))?;
        }
        for pattern in &model.answers_to {
            check_pattern(pattern).map_err(|problem| at_key(&key("answers_to"), problem))?;
        }
    }
    // Two models answering to one name would make the answer depend on the order of the
    // file: any name both match is an error, with one such name as the example.
    let answering: Vec<(&String, &String)> =
        config.models.iter().flat_map(|(name, model)| model.answers_to.iter().map(move |p| (name, p))).collect();
    for (i, (first_model, first)) in answering.iter().enumerate() {
        for (second_model, second) in &answering[i + 1..] {
            if first_model == second_model {
                continue;
            }
            if let Some(example) = glob_overlap(first, second) {
                return Err(at_key(
                    &format!("models.{second_model}.answers_to"),
                    format!(
                        "`{second}` overlaps `{first}` of models.{first_model}: both answer to `{example}`; make the \
                         patterns of the two models disjoint"
                    ),
                ));
            }
        }
    }
    if let Some(ttl) = &config.default_ttl {
        parse_ttl(ttl).map_err(|problem| at_key("default_ttl", problem))?;
    }
    for (key, value) in [("max_wait", &config.max_wait), ("min_residency", &config.min_residency)] {
        if let Some(value) = value {
            parse_wait(value).map_err(|problem| at_key(key, problem))?;
        }
    }
    for address in &config.listen {
        check_listen(address).map_err(|problem| at_key("listen", problem))?;
        // As `serve --listen` refuses it: beyond loopback only with a key, from a file (the
        // same for every command, whatever its environment).
        if reaches_beyond_loopback(address) && config.api_key_file.is_none() {
            return Err(at_key(
                "listen",
                format!(
                    "`{address}` reaches beyond this machine: set api_key_file to a file holding the key clients \
                     must send"
                ),
            ));
        }
    }
    for origin in config.cors_origins.iter().flatten() {
        let well_formed = origin == "*"
            || ((origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.trim_start_matches("https://").trim_start_matches("http://").contains('/'));
        if !well_formed {
            return Err(at_key("cors_origins", format!("`{origin}` is not \"*\" nor an origin like http://host:8080")));
        }
    }
    for (key, value) in [("memory_budget", &config.memory_budget), ("vram_budget", &config.vram_budget)] {
        if let Some(value) = value {
            crate::budget::parse_size(value, 100).map_err(|problem| at_key(key, problem))?;
        }
    }
    if let Some(value) = &config.cache_budget {
        // A share of what? The disk is not llmctl's to measure: a size it is.
        if value.trim().ends_with('%') {
            return Err(at_key(
                "cache_budget",
                format!("`{value}` is a share; write a size such as \"4GiB\", or \"0\""),
            ));
        }
        crate::budget::parse_size(value, 0).map_err(|problem| at_key("cache_budget", problem))?;
    }
    Ok(config)
}

/// A name pattern of `answers_to`: not empty, printable, and not a lone `*` (which would
/// take every name, as `default_model` does).
fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.chars().any(char::is_control) {
        return Err(format!("{pattern:?} is not a name pattern such as \"claude-*\""));
    }
    if pattern.chars().all(|c| c == '*') {
        return Err(format!("`{pattern}` matches every name; use default_model for that"));
    }
    Ok(())
}

/// Whether `name` matches the glob `pattern`: `*` is any text (empty too), `?` any one
/// character, anything else itself (case-sensitive, as model names are).
pub(crate) fn glob_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // The classic two-pointer match with one backtrack point: the last `*` seen.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == '?' || (pattern[p] != '*' && pattern[p] == name[n])) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((star_p, star_n)) = star {
            p = star_p + 1;
            n = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// A name both globs match, if there is one. Each glob is a small automaton (a position
/// in the pattern); the search walks their product, one character at a time, and a state
/// where both patterns are used up is a common name.
pub(crate) fn glob_overlap(a: &str, b: &str) -> Option<String> {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut seen = std::collections::HashSet::new();
    let mut queue = std::collections::VecDeque::from([((0usize, 0usize), String::new())]);
    while let Some(((i, j), name)) = queue.pop_front() {
        if !seen.insert((i, j)) {
            continue;
        }
        if i == a.len() && j == b.len() {
            return Some(name);
        }
        // A `*` may match nothing.
        if a.get(i) == Some(&'*') {
            queue.push_back(((i + 1, j), name.clone()));
        }
        if b.get(j) == Some(&'*') {
            queue.push_back(((i, j + 1), name.clone()));
        }
        let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) else { continue };
        // One character both accept: a literal of either side, else any (`x` stands for it).
        let character = match (x, y) {
            ('*' | '?', '*' | '?') => 'x',
            ('*' | '?', literal) | (literal, '*' | '?') => literal,
            (left, right) if left == right => left,
            _ => continue,
        };
        let next_i = if x == '*' { i } else { i + 1 };
        let next_j = if y == '*' { j } else { j + 1 };
        let mut longer = name.clone();
        longer.push(character);
        queue.push_back(((next_i, next_j), longer));
    }
    None
}

/// A `listen` address as HOST:PORT, checked by its form alone: a name is not looked up
/// here (the daemon does, when it opens the listener).
fn check_listen(address: &str) -> Result<(), String> {
    let example = "HOST:PORT, e.g. 127.0.0.1:8080";
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("`{address}` is not {example}"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("`{address}`: the port `{port}` is not a number from 0 to 65535"));
    }
    let host_ok = match host.strip_prefix('[').and_then(|inner| inner.strip_suffix(']')) {
        Some(inner) => inner.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            host.parse::<std::net::Ipv4Addr>().is_ok()
                || (!host.is_empty()
                    && host
                        .split('.')
                        .all(|label| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')))
        }
    };
    if host.is_empty() {
        return Err(format!("`{address}` has no host ({example}; 0.0.0.0:PORT for every address)"));
    }
    if !host_ok {
        return Err(format!("`{address}`: `{host}` is not a host name or address ({example}; [::1]:8080 for IPv6)"));
    }
    Ok(())
}

/// True for a `listen` address whose host is an IP address other than loopback (a name is
/// not looked up here; `localhost` is loopback).
fn reaches_beyond_loopback(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| !ip.is_loopback())
}

fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(format!("`{url}` is not an http:// or https:// URL"))
    }
}

/// The name of the table a `[header]` line opens, quotes and spaces aside; none for
/// another line.
fn table_header(line: &str) -> Option<String> {
    let inside = line.trim().strip_prefix('[')?.split(']').next()?;
    Some(inside.chars().filter(|c| *c != '"' && *c != '\'' && !c.is_whitespace()).collect())
}

/// The key a `key = value` line sets, with its table: `models.coder.ttl` for `ttl = ...`
/// under `[models.coder]`.
fn full_key(table: &str, line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key: String = key.chars().filter(|c| *c != '"' && *c != '\'' && !c.is_whitespace()).collect();
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    Some(if table.is_empty() { key } else { format!("{table}.{key}") })
}

/// The 0-based line that sets `key` (dotted, as `models.coder.ttl`).
fn find_key(text: &str, key: &str) -> Option<usize> {
    let mut table = String::new();
    for (number, line) in text.lines().enumerate() {
        if let Some(header) = table_header(line) {
            table = header;
        } else if full_key(&table, line).as_deref() == Some(key) {
            return Some(number);
        }
    }
    None
}

/// The 0-based line where an inline table (`models = { x = { parallel = 0 } }`) sets
/// `key`: the first that names each of its parts, the last followed by `=`.
fn find_key_inline(text: &str, key: &str) -> Option<usize> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, before) = parts.split_last()?;
    text.lines().position(|line| {
        let line: String = line.chars().filter(|c| !c.is_whitespace() && *c != '"' && *c != '\'').collect();
        line.contains(&format!("{last}=")) && before.iter().all(|part| line.contains(part))
    })
}

/// The 0-based lines of `[table]`: its header to the line before the next header.
fn find_table(text: &str, table: &str) -> Option<std::ops::Range<usize>> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|line| table_header(line).as_deref() == Some(table))?;
    let end =
        lines[start + 1..].iter().position(|line| table_header(line).is_some()).map_or(lines.len(), |n| start + 1 + n);
    Some(start..end)
}

/// `default_ttl = "soon"` (or `models.coder.ttl = "soon"` for a key of a table), with the
/// value as the file has it on line `number` (0-based), comment aside.
fn key_and_value(text: &str, number: usize, key: &str) -> String {
    let line = text.lines().nth(number).unwrap_or_default();
    let value = line.split_once('=').map_or("", |(_, value)| value).trim();
    format!("{key} = {}", without_comment(value))
}

/// A value with a trailing `# comment` taken off, unless the `#` is inside quotes.
fn without_comment(value: &str) -> &str {
    let mut quote = None;
    for (index, c) in value.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(open), c) if c == open => quote = None,
            (None, '#') => return value[..index].trim_end(),
            _ => {}
        }
    }
    value.trim_end()
}

/// toml's own message names no key and spans several lines with a caret: lead with the
/// line, and for the mistakes people make (an unquoted duration, size or word, a
/// misspelled key) say what to write.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> ParseError {
    let message = error.message().trim_end().to_string();
    let Some(span) = error.span() else {
        return ParseError { message, lines: None };
    };
    let number = text[..span.start.min(text.len())].matches('\n').count();
    let line = text.lines().nth(number).unwrap_or_default();
    // A bad table header takes its table with it: its keys read under the table before
    // would each be a false "unknown key".
    let lines = match table_header(line) {
        Some(_) => {
            let rest = text.lines().skip(number + 1).take_while(|line| table_header(line).is_none()).count();
            Some(number..number + 1 + rest)
        }
        None => Some(number..number + 1),
    };
    let prefix = format!("line {}", number + 1);
    if let Some(field) = message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next()) {
        let known = message.split("expected one of ").nth(1).unwrap_or_default();
        let known: Vec<&str> = known.split(", ").map(|name| name.trim_matches('`')).collect();
        let suggestion = match crate::similar::closest(field, known.iter().copied()).first() {
            Some(name) => format!("; did you mean `{name}`?"),
            None => "; `llmctl --help` lists the keys".into(),
        };
        return ParseError { message: format!("{prefix}: unknown key `{field}`{suggestion}"), lines };
    }
    if let Some((key, value)) = line.split_once('=') {
        let key = key.trim();
        let value = without_comment(value.trim());
        let bare = !value.is_empty() && !value.starts_with(['"', '\'', '[', '{']);
        let short_key = key.rsplit('.').next().unwrap_or(key);
        let string_key = DURATION_KEYS.contains(&short_key) || SIZE_KEYS.contains(&short_key);
        // A value TOML reads (`-1`, `1.5`, `true`) is of the wrong type or repeated, not
        // unquoted text: toml's own message says which, below.
        let valid_value = toml::from_str::<toml::Table>(&format!("v = {value}")).is_ok();
        let numeric = value.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+');
        if bare && numeric && !valid_value && !string_key {
            let problem = if value.trim_start_matches(['+', '-']).chars().all(|c| c.is_ascii_digit() || c == '_') {
                format!("is too large (TOML's integers end at {})", i64::MAX)
            } else {
                "is not a number TOML reads".to_string()
            };
            return ParseError { message: format!("{prefix}: {key} = {value} {problem}"), lines };
        }
        if bare && (string_key || !valid_value) && !key.is_empty() && !key.contains(char::is_whitespace) {
            let kind = if DURATION_KEYS.contains(&short_key) {
                "durations are strings"
            } else if SIZE_KEYS.contains(&short_key) {
                "sizes are strings"
            } else {
                "text is written in quotes"
            };
            let fixed = format!("{key} = \"{}\"", value.replace('"', "\\\""));
            return ParseError {
                message: match valid_value {
                    true => format!("{prefix}: {key} = {value}: {kind}, write {fixed}"),
                    false => format!("{prefix}: {key} = {value} is not valid TOML: {kind}, write {fixed}"),
                },
                lines,
            };
        }
    }
    // toml says why a header is invalid (a table given twice) on the line after.
    let mut first = in_words(message.lines().next().unwrap_or_default());
    if first == "invalid table header" {
        if let Some(why) = message.lines().nth(1).filter(|why| !why.trim().is_empty()) {
            first = format!("{first}: {}", why.trim());
        }
    }
    match line.split_once('=') {
        Some((key, value)) => {
            let key = key.trim();
            ParseError { message: format!("{prefix}: {key} = {}: {first}", without_comment(value.trim())), lines }
        }
        None => ParseError { message: format!("{prefix}: {first}"), lines },
    }
}

/// serde's names of types in toml's messages, as a config's reader knows them.
fn in_words(message: &str) -> String {
    // The value itself is shown before the message (toml writes `1e300` out in full).
    let mut message = message.to_string();
    if message.starts_with("invalid type: ") || message.starts_with("invalid value: ") {
        if let Some((kind, rest)) = message.split_once(", expected ") {
            let kind = kind.split(['`', '"']).next().unwrap_or(kind).trim_end();
            message = format!("{kind}, expected {rest}");
        }
    }
    let whole = "expected a whole number (0 or more)";
    let words = [
        ("expected usize", whole),
        ("expected u64", whole),
        ("expected u32", whole),
        ("expected u16", whole),
        ("expected u8", whole),
        ("expected a sequence", "expected a list, as [\"...\"]"),
        ("floating point", "decimal number"),
    ];
    words.iter().fold(message, |message, (from, to)| message.replace(from, to))
}

/// How long an idle instance stays loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ttl {
    Never,
    Seconds(u64),
}

/// A scheduler wait: "auto" (none: derived from measured load times) or a duration
/// ("20s", "2m", "0"), in milliseconds.
pub(crate) fn parse_wait(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim();
    if text == "auto" {
        return Ok(None);
    }
    match parse_ttl(text) {
        Ok(Ttl::Seconds(seconds)) => Ok(Some(seconds * 1000)),
        _ => Err(format!("`{text}` is not \"auto\" nor a duration (use 20s, 2m or 0)")),
    }
}

/// "90s", "30m", "2h", "1d", "45" (seconds) or "never".
pub(crate) fn parse_ttl(text: &str) -> Result<Ttl, String> {
    let text = text.trim();
    if text == "never" {
        return Ok(Ttl::Never);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration (use 90s, 30m, 2h or never)"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{text}` is not a duration (use 90s, 30m, 2h or never)")),
    };
    match number.checked_mul(seconds) {
        Some(total) if total <= MAX_SECONDS => Ok(Ttl::Seconds(total)),
        _ => Err(format!("`{text}` is longer than ten years; use `never` to keep it loaded")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_models_and_settings() {
        let config = Config::parse(
            "queue_depth = 8\n[models.coder]\npath = \"/m/coder.gguf\"\nctx_size = 4096\nargs = [\"--flash-attn\", \"on\"]\n",
        )
        .unwrap();
        assert_eq!(config.queue_depth, Some(8));
        let coder = &config.models["coder"];
        assert_eq!(coder.path, Some(PathBuf::from("/m/coder.gguf")));
        assert_eq!(coder.ctx_size, Some(4096));
        assert_eq!(coder.args, ["--flash-attn", "on"]);
    }

    #[test]
    fn globs_match_names() {
        let table = [
            ("claude-*", "claude-sonnet-4-5-20250929", true),
            ("claude-*", "claude-", true),
            ("claude-*", "claud", false),
            ("gpt-4o*", "gpt-4o-mini", true),
            ("gpt-4o*", "gpt-4", false),
            ("*-mini", "gpt-4o-mini", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("exact", "exact", true),
            ("exact", "Exact", false),
        ];
        for (pattern, name, expected) in table {
            assert_eq!(glob_matches(pattern, name), expected, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn overlapping_globs_are_found_with_a_name_both_match() {
        let table = [
            ("claude-*", "gpt-4o*", false),
            ("claude-*", "claude-3*", true),
            ("*-mini", "gpt-*", true),
            ("a?c", "ab?", true),
            ("a?c", "ab", false),
            ("x*y", "*z", false),
            ("gpt-4o", "gpt-4o", true),
            ("claude-opus-*", "claude-sonnet-*", false),
        ];
        for (a, b, expected) in table {
            let found = glob_overlap(a, b);
            assert_eq!(found.is_some(), expected, "{a} & {b}: {found:?}");
            if let Some(name) = found {
                assert!(glob_matches(a, &name) && glob_matches(b, &name), "{name} matches {a} and {b}");
            }
        }
    }

    #[test]
    fn answers_to_is_checked_and_two_models_may_not_overlap() {
        let ok = "[models.a]\npath = \"/a\"\nanswers_to = [\"claude-*\", \"gpt-4o*\"]\n\
                  [models.b]\npath = \"/b\"\nanswers_to = [\"gemini-*\"]\n";
        assert_eq!(Config::parse(ok).unwrap().models["a"].answers_to, ["claude-*", "gpt-4o*"]);
        let overlapping = "[models.a]\npath = \"/a\"\nanswers_to = [\"claude-*\"]\n\
                           [models.b]\npath = \"/b\"\nanswers_to = [\"claude-3*\"]\n";
        let error = Config::parse(overlapping).unwrap_err();
        assert!(error.contains("line 6: models.b.answers_to"), "{error}");
        assert!(error.contains("`claude-3*` overlaps `claude-*` of models.a"), "{error}");
        assert!(error.contains("both answer to `claude-3`"), "{error}");
        for bad in ["\"\"", "\"*\""] {
            let text = format!("[models.a]\npath = \"/a\"\nanswers_to = [{bad}]\n");
            assert!(Config::parse(&text).unwrap_err().contains("line 3: models.a.answers_to"), "{bad}");
        }
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("never"), Ok(Ttl::Never));
        assert_eq!(parse_ttl("90s"), Ok(Ttl::Seconds(90)));
        assert_eq!(parse_ttl("30m"), Ok(Ttl::Seconds(1800)));
        assert_eq!(parse_ttl("2h"), Ok(Ttl::Seconds(7200)));
        assert!(parse_ttl("soon").is_err());
        assert!(Config::parse("default_ttl = \"soon\"\n").unwrap_err().contains("default_ttl"));
        assert!(Config::parse("memory_budget = \"lots\"\n").unwrap_err().contains("memory_budget"));
    }

    #[test]
    fn what_can_be_read_is_read_and_every_error_is_named() {
        let text = "queue_depth = 8\ndefault_ttl = 30m\nmax_instances = 2\nmemory_budget = \"lots\"\n\
                    [models.bad]\nctx_size = 512\n[models.good]\npath = \"/m/good.gguf\"\n";
        let (config, errors) = Config::parse_what_it_can(text);
        assert_eq!(config.queue_depth, Some(8));
        assert_eq!(config.max_instances, Some(2));
        assert_eq!(config.default_ttl, None);
        assert_eq!(config.memory_budget, None);
        assert_eq!(config.models.keys().collect::<Vec<_>>(), ["good"]);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("line 2: default_ttl = 30m"), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("line 4: memory_budget")), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("line 5: [models.bad]")), "{errors:?}");
        assert!(Config::parse(text).unwrap_err().contains("line 2: default_ttl = 30m is not valid TOML"));
    }

    #[test]
    fn the_token_limit_comes_from_the_flag_the_config_or_the_default() {
        let none = Config::default();
        let configured = Config { max_tokens: Some(64), ..Config::default() };
        let unlimited = Config { max_tokens: Some(0), ..Config::default() };
        assert_eq!(max_tokens(None, &none), Some(DEFAULT_MAX_TOKENS));
        assert_eq!(max_tokens(None, &configured), Some(64));
        assert_eq!(max_tokens(Some(8), &configured), Some(8));
        assert_eq!(max_tokens(Some(0), &none), None, "-n 0 is no limit");
        assert_eq!(max_tokens(None, &unlimited), None);
        assert_eq!(max_tokens(Some(16), &unlimited), Some(16));
    }

    #[test]
    fn errors_name_the_line() {
        let table = [
            ("queue_depth = 8\nqueue_dept = 9\n", "line 2"),
            ("[models.a]\npath = \"/x\"\nctx_size = \"big\"\n", "line 3"),
            ("[models.a]\nctx_size = 512\n", "path"),
            ("queue_depth = 0\n", "line 1: queue_depth = 0 is outside 1..="),
            ("token_timeout = 0\n", "token_timeout = 0 is outside"),
            ("load_timeout = 0\n", "load_timeout = 0 is outside"),
            ("crash_limit = 0\n", "crash_limit = 0 is outside"),
            ("max_instances = 0\n", "max_instances = 0 is outside"),
            ("[models.a]\npath = \"/x\"\nparallel = 100000\n", "line 3: models.a.parallel = 100000 is outside 1..=256"),
            ("[models.a]\npath = \"/x\"\ngpu_layers = 4294967295\n", "line 3: models.a.gpu_layers"),
            ("default_ttl = \"18446744073709551615s\"\n", "longer than ten years"),
            ("default_ttl = \"999999999999d\"\n", "longer than ten years"),
            ("[models.a]\npath = \"/x\"\nmax_queued = 0\n", "line 3: models.a.max_queued = 0 is outside 1..="),
            (
                "queue_depth = 8\nmax_instances = 2\ndefault_ttl = 30m\n",
                "line 3: default_ttl = 30m is not valid TOML: durations are strings, write default_ttl = \"30m\"",
            ),
            (
                "memory_budget = 12GiB   # most of it\n",
                "line 1: memory_budget = 12GiB is not valid TOML: sizes are strings, write memory_budget = \"12GiB\"",
            ),
            (
                "[models.a]\npath = /m/a.gguf\n",
                "line 2: path = /m/a.gguf is not valid TOML: text is written in quotes, write path = \"/m/a.gguf\"",
            ),
            ("queue_depth = 8\nmemory_budget = \"lots\"\n", "line 2: memory_budget = \"lots\": `lots` is not a size"),
            (
                "[models.a]\npath = \"/x\"\nttl = \"soon\"  # not yet\n",
                "line 3: models.a.ttl = \"soon\": `soon` is not a duration",
            ),
            ("queue_dept = 9\n", "line 1: unknown key `queue_dept`; did you mean `queue_depth`?"),
            ("queue_depth = \"8\"\n", "line 1: queue_depth = \"8\": invalid type"),
            (
                "[models.b]\nurl = \"http://x\"\n[models.a]\nctx_size = 512\n",
                "line 3: [models.a] needs exactly one of `path`",
            ),
            ("max_tokens = 99999999999\n", "line 1: max_tokens = 99999999999"),
            ("cache_budget = \"lots\"\n", "line 1: cache_budget = \"lots\": `lots` is not a size"),
            ("cache_budget = \"10%\"\n", "line 1: cache_budget = \"10%\": `10%` is a share"),
            ("cache_budget = 4GiB\n", "sizes are strings, write cache_budget = \"4GiB\""),
            // Values TOML reads, of the wrong type: named as such, never "write it in quotes".
            ("queue_depth = -1\n", "line 1: queue_depth = -1: invalid value: integer, expected a whole number"),
            ("queue_depth = 1.5\n", "line 1: queue_depth = 1.5: invalid type: decimal number, expected a whole"),
            ("load_timeout = 1e300\n", "line 1: load_timeout = 1e300: invalid type: decimal number, expected"),
            ("queue_depth = true\n", "line 1: queue_depth = true: invalid type: boolean, expected a whole number"),
            ("default_ttl = 5\n", "line 1: default_ttl = 5: durations are strings, write default_ttl = \"5\""),
            ("queue_depth = 1\nqueue_depth = 2\n", "line 2: queue_depth = 2: duplicate key `queue_depth`"),
            ("queue_depth = 99999999999999999999999\n", "queue_depth = 99999999999999999999999 is too large"),
            ("queue_depth = 12abc\n", "line 1: queue_depth = 12abc is not a number TOML reads"),
            ("listen = \"127.0.0.1:8080\"\n", "invalid type: string, expected a list, as [\"...\"]"),
            // Listen addresses are checked by their form.
            ("listen = [\"hello\"]\n", "line 1: listen = [\"hello\"]: `hello` is not HOST:PORT"),
            ("listen = [\"127.0.0.1:99999\"]\n", "the port `99999` is not a number from 0 to 65535"),
            ("listen = [\":8080\"]\n", "`:8080` has no host"),
            ("listen = [\"::1:8080\"]\n", "`::1` is not a host name or address"),
            // A table given twice is named so, and its keys give no false errors of their own.
            (
                "[models.x]\npath = \"/a\"\n[models.x]\nctx_size = 100\n",
                "line 3: invalid table header: duplicate key `x`",
            ),
            (
                "queue_depth = 2\nmodels = { x = { path = \"/a\", parallel = 0 } }\n",
                "line 2: models.x.parallel is outside 1..=256",
            ),
        ];
        for (text, expected) in table {
            let error = Config::parse(text).unwrap_err();
            assert!(error.contains(expected), "{error:?} should mention {expected}");
            assert!(!error.contains("quotes, write") || text.contains("/m/a.gguf"), "{error:?}");
        }
        let good = "listen = [\"127.0.0.1:8080\", \"localhost:9000\", \"[::1]:9001\"]\n";
        assert_eq!(Config::parse(good).unwrap().listen.len(), 3);
        // Beyond loopback, only with a key.
        let open = Config::parse("listen = [\"0.0.0.0:8080\"]\n").unwrap_err();
        assert!(open.contains("line 1: listen = [\"0.0.0.0:8080\"]: `0.0.0.0:8080` reaches beyond"), "{open}");
        let keyed = "listen = [\"0.0.0.0:8080\", \"[::]:8081\"]\napi_key_file = \"/k\"\n";
        assert_eq!(Config::parse(keyed).unwrap().listen.len(), 2);
    }

    #[test]
    fn a_bad_table_header_takes_its_table_with_it() {
        let error = Config::parse("models.x.path = \"/a\"\n[models.x]\nctx_size = 100\n").unwrap_err();
        assert!(error.contains("line 2: invalid table header"), "{error}");
        assert!(!error.contains("unknown key"), "{error}");
    }

    #[test]
    fn a_config_that_is_not_utf8_names_the_line_and_column() {
        let dir = std::env::temp_dir().join(format!("llmctl-config-utf8-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        fs::write(&path, b"queue_depth = 3\nname = \"ab\xffc\"\n").unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        // What can be read is, for `llmctl config`.
        let (config, _) = Config::load_what_it_can(&path);
        // A byte-order mark is no part of the text.
        fs::write(&path, b"\xef\xbb\xbfqueue_depth = 4\n").unwrap();
        let marked = Config::load(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(error.contains("line 2: byte 0xFF at column 11 is not UTF-8 text"), "{error}");
        assert_eq!(config.queue_depth, Some(3));
        assert_eq!(marked.queue_depth, Some(4));
    }
}
