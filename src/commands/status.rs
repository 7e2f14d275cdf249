//! `llmctl status [--json]`: the daemon, its queue and every instance.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cli::StatusArgs;
use crate::client;
use crate::commands::Context;
use crate::error::{Error, Result};
use crate::protocol::{Request, Response, StatusReport};

pub fn run(context: &Context, args: StatusArgs) -> Result<()> {
    let mut connection = client::connect(context)?;
    let Response::Status(report) = connection.call(&Request::Status)? else {
        return Err(Error::internal("the daemon answered status with something else"));
    };
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&report).map_err(|e| Error::internal(e.to_string()))?;
        json.push('\n');
        json
    } else {
        render(&report, now_ms())
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

/// The human-readable table.
pub fn render(report: &StatusReport, now_ms: u64) -> String {
    let daemon = &report.daemon;
    let mut out = format!(
        "daemon  pid {}, up {}, memory {}, socket {}\nserver  {}\nqueue   {} waiting of {}, {} rejected\n",
        daemon.pid,
        duration(daemon.uptime_ms),
        daemon.rss_bytes.map(bytes).unwrap_or_else(|| "-".into()),
        daemon.socket,
        if daemon.llama_server.is_empty() { "-" } else { &daemon.llama_server },
        report.queue.waiting,
        report.queue.depth,
        report.queue.rejected,
    );
    if report.instances.is_empty() {
        out.push_str("no models loaded\n");
        return out;
    }
    let mut rows =
        vec![["MODEL", "STATE", "PID", "PORT", "SLOTS", "MEMORY", "ESTIMATE", "LAST USE", "REQUESTS", "TOKENS IN/OUT"]
            .map(String::from)];
    for instance in &report.instances {
        rows.push([
            instance.name.clone(),
            match (instance.pinned, &instance.remote) {
                (_, Some(_)) => format!("{} (remote)", instance.state),
                (true, None) => format!("{} (pinned)", instance.state),
                (false, None) => instance.state.clone(),
            },
            instance.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            instance.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            format!("{}/{}", instance.in_flight, instance.slots),
            instance.rss_bytes.map(bytes).unwrap_or_else(|| "-".into()),
            bytes(instance.estimate_bytes),
            instance
                .last_used_ms
                .map(|t| format!("{} ago", duration(now_ms.saturating_sub(t))))
                .unwrap_or_else(|| "never".into()),
            instance.requests.to_string(),
            format!("{}/{}", instance.usage.prompt_tokens, instance.usage.completion_tokens),
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
    for instance in &report.instances {
        if let Some(failure) = &instance.failure {
            let first_line = failure.lines().next().unwrap_or_default();
            out.push_str(&format!("{}: {first_line}\n", instance.name));
        }
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

    #[test]
    fn renders_a_table() {
        let mut report = StatusReport::default();
        report.daemon.pid = 42;
        report.daemon.uptime_ms = 65_000;
        report.instances.push(InstanceStatus {
            name: "demo".into(),
            state: "ready".into(),
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
        let text = render(&report, 31_000);
        assert!(text.contains("up 1m05s"), "{text}");
        assert!(
            text.contains("demo   ready  7    4000  0/1    150 MiB  200 MiB   30s ago   3         10/20"),
            "{text}"
        );
    }
}
