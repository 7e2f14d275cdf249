//! `llmctl ps [--json]`: the loaded models, one short line each, from the daemon's status.
//! With no daemon running nothing is loaded: the header alone (or `[]`), exit 0, and no
//! daemon is started.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::cli::PsArgs;
use crate::client;
use crate::commands::ls::{loaded_instances, table, write_stdout};
use crate::context::Context;
use crate::error::{Error, Result};
#[cfg(test)]
use crate::protocol::InstanceState;
use crate::protocol::{InstanceStatus, Request, Response};
use crate::term;

pub(crate) fn run(context: &Context, args: PsArgs) -> Result<()> {
    let report = match client::try_connect(context)? {
        Some(mut connection) => match connection.call(&Request::Status)? {
            Response::Status(report) => Some(report),
            _ => return Err(Error::internal("the daemon answered status with something else")),
        },
        None => None,
    };
    let loaded: Vec<&InstanceStatus> =
        report.as_ref().map(|report| loaded_instances(report).collect()).unwrap_or_default();
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&loaded).map_err(|e| Error::internal(e.to_string()))?;
        json.push('\n');
        json
    } else {
        render(&loaded, now_ms())
    };
    write_stdout(&text)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn render(loaded: &[&InstanceStatus], now_ms: u64) -> String {
    let mut rows = vec![["NAME", "STATE", "PID", "MEMORY", "CONTEXT", "SLOTS", "LAST USE"].map(String::from)];
    for instance in loaded {
        // The name is a file name or an alias: escaped, so none can drive the terminal.
        rows.push([
            match instance.embeddings {
                true => format!("{} (embeddings)", term::escape(&instance.name)),
                false => term::escape(&instance.name).into_owned(),
            },
            if instance.pinned { format!("{} (pinned)", instance.state) } else { instance.state.to_string() },
            instance.pid.map(|pid| pid.to_string()).unwrap_or_else(|| "-".into()),
            crate::budget::human(instance.rss_bytes.unwrap_or(instance.estimate_bytes)),
            instance.ctx_size.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            format!("{}/{}", instance.in_flight, instance.slots),
            instance
                .last_used_ms
                .map(|at| format!("{} s ago", now_ms.saturating_sub(at) / 1000))
                .unwrap_or_else(|| "never".into()),
        ]);
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_instance() {
        let instance = InstanceStatus {
            name: "demo".into(),
            state: InstanceState::Ready,
            pid: Some(7),
            slots: 1,
            ctx_size: Some(2048),
            rss_bytes: Some(150 << 20),
            last_used_ms: Some(1_000),
            ..InstanceStatus::default()
        };
        let text = render(&[&instance], 31_000);
        assert_eq!(
            text,
            "NAME  STATE  PID  MEMORY   CONTEXT  SLOTS  LAST USE\ndemo  ready  7    150 MiB  2048     0/1    30 s ago\n"
        );
        let embeddings = InstanceStatus { embeddings: true, ..instance.clone() };
        let text = render(&[&instance, &embeddings], 31_000);
        assert!(text.ends_with("\ndemo (embeddings)  ready  7    150 MiB  2048     0/1    30 s ago\n"), "{text}");
    }
}
