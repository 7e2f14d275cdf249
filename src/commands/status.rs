//! `llmctl status [--json]`: the daemon, its queue and every instance.
//!
//! The JSON is the daemon's report as it is. The table tells instances of one model apart
//! by their context size and by the load options on the child's command line (read from
//! `/proc/PID/cmdline`, since the report does not carry them), and leaves out instances that
//! stopped or failed more than a day ago.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cli::StatusArgs;
use crate::client;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::protocol::{CacheStatus, InstanceState, InstanceStatus, Request, Response, StatusReport};
use crate::term::escape;

/// Stopped and failed instances last used longer ago than this are left out of the table.
const FORGET_AFTER_MS: u64 = 24 * 3600 * 1000;

pub(crate) fn run(context: &Context, args: StatusArgs) -> Result<()> {
    let mut connection = client::connect(context)?;
    let Response::Status(report) = connection.call(&Request::Status)? else {
        return Err(Error::internal("the daemon answered status with something else"));
    };
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&report).map_err(|e| Error::internal(e.to_string()))?;
        json.push('\n');
        json
    } else {
        render(&report, now_ms(), cmdline_of)
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("cannot write to stdout", e)),
        _ => Ok(()),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The command line of process `pid`, if it still runs and is ours to read.
fn cmdline_of(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|&b| b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

/// What sets an instance apart beyond its model, context size and slots, from the child's
/// command line: `embeddings`, `reranking`, the GPU layers and the extra arguments. The
/// arguments every child gets (see `backend::llama::command`) are left out.
fn load_options(argv: &[String]) -> String {
    // Flags llmctl passes with a value that the table shows elsewhere or that never differ.
    const WITH_VALUE: [&str; 9] = [
        "--model",
        "--alias",
        "--host",
        "--port",
        "--cors-origins",
        "--log-colors",
        "--parallel",
        "--ctx-size",
        "--slot-save-path",
    ];
    let mut options = Vec::new();
    let mut args = argv.iter().skip(1).peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            flag if WITH_VALUE.contains(&flag) => {
                args.next();
            }
            "--no-webui" => {}
            "--n-gpu-layers" => options.push(format!("gpu-layers {}", args.next().map(String::as_str).unwrap_or("?"))),
            "--embeddings" => {
                options.push("embeddings".to_string());
                // llmctl adds mean pooling right after --embeddings when the model names none.
                if args.peek().is_some_and(|next| *next == "--pooling") {
                    args.next();
                    args.next();
                }
            }
            "--reranking" => options.push("reranking".to_string()),
            other => options.push(other.to_string()),
        }
    }
    options.join(" ")
}

/// Stopped or failed, not in a crash loop (which needs `llmctl stop`), and last used more
/// than [`FORGET_AFTER_MS`] ago.
fn is_forgotten(instance: &InstanceStatus, now_ms: u64) -> bool {
    matches!(instance.state, InstanceState::Stopped | InstanceState::Failed)
        && !instance.crash_loop
        && instance.last_used_ms.is_some_and(|t| now_ms.saturating_sub(t) > FORGET_AFTER_MS)
}

/// The human-readable table; `cmdline_of` gives a child's command line by pid.
pub(crate) fn render(report: &StatusReport, now_ms: u64, cmdline_of: impl Fn(u32) -> Option<Vec<String>>) -> String {
    let daemon = &report.daemon;
    let mut out = format!(
        "daemon  pid {}, up {}, memory {}, socket {}\nserver  {}\nqueue   {} waiting of {}, {} rejected; {} swaps{}\n",
        daemon.pid,
        duration(daemon.uptime_ms),
        daemon.rss_bytes.map(bytes).unwrap_or_else(|| "-".into()),
        escape(&daemon.socket),
        if daemon.llama_server.is_empty() { "-".into() } else { escape(&daemon.llama_server) },
        report.queue.waiting,
        report.queue.depth,
        report.queue.rejected,
        daemon.swaps,
        if daemon.swaps > 0 { format!(" ({:.2} per request)", daemon.swaps_per_request) } else { String::new() },
    );
    if !daemon.listening.is_empty() {
        let urls: Vec<String> = daemon.listening.iter().map(|address| format!("http://{address}")).collect();
        out.push_str(&format!("serving {}\n", urls.join(", ")));
    }
    let instances: Vec<&InstanceStatus> =
        report.instances.iter().filter(|instance| !is_forgotten(instance, now_ms)).collect();
    let forgotten = report.instances.len() - instances.len();
    let forgotten_note = match forgotten {
        0 => String::new(),
        n => format!("{n} stopped or failed more than a day ago not shown; `llmctl status --json` lists them\n"),
    };
    if instances.is_empty() {
        out.push_str("no models loaded\n");
        out.push_str(&forgotten_note);
        out.push_str(&render_caches(&report.caches, now_ms));
        return out;
    }
    let mut rows = vec![[
        "MODEL",
        "STATE",
        "PID",
        "PORT",
        "CTX",
        "SLOTS",
        "MEMORY",
        "ESTIMATE",
        "LAST USE",
        "REQUESTS",
        "TOKENS IN/OUT",
        "OPTIONS",
    ]
    .map(String::from)];
    for instance in &instances {
        let options = match instance.pid.and_then(&cmdline_of) {
            Some(argv) => load_options(&argv),
            // No child to ask (stopped, failed, loading): what the model's settings say.
            None if instance.embeddings => "embeddings".to_string(),
            None => String::new(),
        };
        // Names, options and failures hold file names, arguments and a child's output:
        // escaped, so none can drive the terminal.
        rows.push([
            escape(&instance.name).into_owned(),
            match (instance.pinned, &instance.remote, instance.pinned_until_ms) {
                (_, Some(_), _) => format!("{} (remote)", instance.state),
                (true, None, Some(until)) if until > now_ms => {
                    // Rounded up, so a fresh `warm --ttl 2h` reads "2h00m", not "1h59m".
                    format!("{} (pinned {})", instance.state, duration((until - now_ms).div_ceil(1000) * 1000))
                }
                (true, None, _) => format!("{} (pinned)", instance.state),
                (false, None, _) => match (instance.waiting_position, instance.eta_ms) {
                    // A load waiting for room: its place in line and estimated wait.
                    (Some(position), Some(eta_ms)) => format!(
                        "{} ({} in line, ~{})",
                        instance.state,
                        crate::term::ordinal(position),
                        duration(eta_ms.div_ceil(1000) * 1000)
                    ),
                    _ => instance.state.to_string(),
                },
            },
            instance.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            instance.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            instance.ctx_size.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            format!("{}/{}", instance.in_flight, instance.slots),
            instance.rss_bytes.map(bytes).unwrap_or_else(|| "-".into()),
            bytes(instance.estimate_bytes),
            instance
                .last_used_ms
                .map(|t| format!("{} ago", duration(now_ms.saturating_sub(t))))
                .unwrap_or_else(|| "never".into()),
            instance.requests.to_string(),
            format!("{}/{}", instance.usage.prompt_tokens, instance.usage.completion_tokens),
            if options.is_empty() { "-".into() } else { escape(&options).into_owned() },
        ]);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    out.push('\n');
    for row in &rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&forgotten_note);
    for instance in &instances {
        if let Some(failure) = &instance.failure {
            let first_line = failure.lines().next().unwrap_or_default();
            out.push_str(&format!("{}: {}\n", escape(&instance.name), escape(first_line)));
        }
    }
    out.push_str(&render_caches(&report.caches, now_ms));
    out
}

/// The saved prompt caches: how much of the budget they take, then one line each.
fn render_caches(caches: &CacheStatus, now_ms: u64) -> String {
    if !caches.enabled {
        return if caches.dir.is_empty() {
            String::new()
        } else {
            "\nprompt caches  not saved (cache_budget = 0, or the directory is unusable)\n".to_string()
        };
    }
    let mut out = format!(
        "\nprompt caches  {} saved, {} of {} in {}\n",
        caches.entries.len(),
        bytes(caches.used_bytes),
        bytes(caches.budget_bytes),
        escape(&caches.dir)
    );
    for entry in &caches.entries {
        out.push_str(&format!(
            "  {}  slot {}  {} tokens  {}  used {} ago\n",
            escape(&entry.model),
            entry.slot,
            entry.tokens,
            bytes(entry.bytes),
            duration(now_ms.saturating_sub(entry.used_ms))
        ));
    }
    out
}

fn bytes(n: u64) -> String {
    crate::budget::human(n)
}

fn duration(ms: u64) -> String {
    let seconds = ms / 1000;
    match seconds {
        0..=59 => format!("{seconds}s"),
        60..=3599 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{InstanceStatus, Usage};

    const DAY_MS: u64 = 24 * 3600 * 1000;

    fn no_cmdline(_pid: u32) -> Option<Vec<String>> {
        None
    }

    fn argv(text: &str) -> Vec<String> {
        text.split(' ').map(String::from).collect()
    }

    #[test]
    fn renders_a_table() {
        let mut report = StatusReport::default();
        report.daemon.pid = 42;
        report.daemon.uptime_ms = 65_000;
        report.instances.push(InstanceStatus {
            name: "demo".into(),
            state: InstanceState::Ready,
            pid: Some(7),
            port: Some(4000),
            slots: 1,
            estimate_bytes: 200 << 20,
            rss_bytes: Some(150 << 20),
            last_used_ms: Some(1_000),
            requests: 3,
            usage: Usage { prompt_tokens: 10, completion_tokens: 20 },
            ..InstanceStatus::default()
        });
        let text = render(&report, 31_000, no_cmdline);
        assert!(text.contains("up 1m05s"), "{text}");
        assert!(
            text.contains(
                "demo   ready  7    4000  -    0/1    150 MiB  200 MiB   30s ago   3         10/20          -"
            ),
            "{text}"
        );
    }

    #[test]
    fn instances_of_one_model_differ_by_context_and_options() {
        let mut report = StatusReport::default();
        for (pid, ctx_size) in [(7, Some(4096)), (8, None), (9, None), (10, None)] {
            report.instances.push(InstanceStatus {
                name: "smol".into(),
                state: InstanceState::Ready,
                pid: Some(pid),
                ctx_size,
                slots: 1,
                ..InstanceStatus::default()
            });
        }
        let common =
            "llama-server --model /m/smol.gguf --alias smol --host /run/s --cors-origins http://llmctl.invalid \
                      --no-webui --log-colors off --parallel 1 --slot-save-path /state/prompt-caches";
        let text = render(&report, 0, |pid| match pid {
            7 => Some(argv(&format!("{common} --ctx-size 4096"))),
            8 => Some(argv(&format!("{common} --embeddings --pooling mean"))),
            9 => Some(argv(&format!("{common} --reranking --n-gpu-layers 99"))),
            _ => Some(argv(&format!("{common} --flash-attn on"))),
        });
        let rows: Vec<&str> = text.lines().filter(|line| line.starts_with("smol")).collect();
        assert_eq!(rows.len(), 4, "{text}");
        assert!(rows[0].contains(" 4096 ") && rows[0].ends_with(" -"), "{text}");
        assert!(rows[1].ends_with(" embeddings"), "{text}");
        assert!(rows[2].ends_with(" reranking gpu-layers 99"), "{text}");
        assert!(rows[3].ends_with(" --flash-attn on"), "{text}");

        // Without a child (stopped, failed), the embeddings instance is still told apart.
        for instance in &mut report.instances {
            instance.pid = None;
            instance.state = InstanceState::Failed;
        }
        report.instances[1].embeddings = true;
        let text = render(&report, 0, no_cmdline);
        let rows: Vec<&str> = text.lines().filter(|line| line.starts_with("smol")).collect();
        assert!(rows[1].ends_with(" embeddings") && !rows[0].ends_with(" embeddings"), "{text}");
    }

    #[test]
    fn stopped_rows_older_than_a_day_are_left_out() {
        let now = 10 * DAY_MS;
        let mut report = StatusReport::default();
        for (name, state, last_used_ms, crash_loop) in [
            ("fresh", InstanceState::Stopped, Some(now - DAY_MS / 2), false),
            ("old", InstanceState::Stopped, Some(now - 2 * DAY_MS), false),
            ("old-failure", InstanceState::Failed, Some(now - 2 * DAY_MS), false),
            ("crash-loop", InstanceState::Failed, Some(now - 2 * DAY_MS), true),
            ("idle", InstanceState::Ready, Some(now - 2 * DAY_MS), false),
            ("never-used", InstanceState::Stopped, None, false),
        ] {
            report.instances.push(InstanceStatus {
                name: name.into(),
                state,
                last_used_ms,
                crash_loop,
                ..InstanceStatus::default()
            });
        }
        let text = render(&report, now, no_cmdline);
        let names: Vec<&str> = text.lines().skip(5).filter_map(|line| line.split(' ').next()).collect();
        assert_eq!(names, ["fresh", "crash-loop", "idle", "never-used", "2"], "{text}");
        assert!(text.contains("2 stopped or failed more than a day ago not shown"), "{text}");

        report.instances.retain(|instance| instance.name.starts_with("old"));
        let text = render(&report, now, no_cmdline);
        assert!(text.contains("no models loaded\n2 stopped or failed more than a day ago not shown"), "{text}");
    }

    #[test]
    fn saved_caches_are_listed_under_the_table() {
        let mut report = StatusReport {
            caches: Box::new(CacheStatus {
                dir: "/state/prompt-caches".into(),
                enabled: true,
                budget_bytes: 4 << 30,
                used_bytes: 64 << 20,
                entries: vec![crate::protocol::CacheEntryStatus {
                    model: "demo".into(),
                    slot: 0,
                    tokens: 2905,
                    bytes: 64 << 20,
                    used_ms: 1_000,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..StatusReport::default()
        };
        let text = render(&report, 61_000, no_cmdline);
        assert!(text.contains("prompt caches  1 saved, 64 MiB of 4.0 GiB in /state/prompt-caches\n"), "{text}");
        assert!(text.contains("  demo  slot 0  2905 tokens  64 MiB  used 1m00s ago\n"), "{text}");
        report.caches.enabled = false;
        assert!(render(&report, 0, no_cmdline).contains("prompt caches  not saved"));
    }

    #[test]
    fn a_pin_with_an_expiry_shows_the_time_left() {
        let mut report = StatusReport::default();
        report.instances.push(InstanceStatus {
            name: "demo".into(),
            state: InstanceState::Ready,
            pinned: true,
            pinned_until_ms: Some(2 * 3600 * 1000 + 500),
            ..InstanceStatus::default()
        });
        report.instances.push(InstanceStatus {
            name: "forever".into(),
            state: InstanceState::Ready,
            pinned: true,
            ..InstanceStatus::default()
        });
        let text = render(&report, 1_000, no_cmdline);
        assert!(text.contains("demo     ready (pinned 2h00m)"), "{text}");
        assert!(text.contains("forever  ready (pinned)  "), "{text}");
    }
}
