//! Prometheus text exposition of the daemon's counters, rendered from a status snapshot
//! (a pure function, so the format is tested without a daemon). Served by `llmctl metrics`.

use std::fmt::Write;

use crate::protocol::StatusReport;

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub(crate) fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let mut scalar = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    scalar(
        "llmctl_queue_waiting",
        "gauge",
        "Requests waiting in the admission queue.",
        report.queue.waiting.to_string(),
    );
    scalar("llmctl_queue_depth", "gauge", "Capacity of the admission queue.", report.queue.depth.to_string());
    scalar(
        "llmctl_queue_rejected_total",
        "counter",
        "Requests refused because the queue was full.",
        report.queue.rejected.to_string(),
    );
    scalar(
        "llmctl_evictions_total",
        "counter",
        "Instances evicted for memory or unloaded by a TTL.",
        report.daemon.evictions.to_string(),
    );
    scalar(
        "llmctl_swaps_total",
        "counter",
        "Instances evicted to make room for another model.",
        report.daemon.swaps.to_string(),
    );
    scalar(
        "llmctl_swaps_per_request",
        "gauge",
        "Swaps per finished request since the daemon started.",
        format!("{:.4}", report.daemon.swaps_per_request),
    );
    scalar("llmctl_memory_budget_bytes", "gauge", "The memory budget.", report.daemon.budget_bytes.to_string());
    if let Some(rss) = report.daemon.rss_bytes {
        scalar("llmctl_daemon_resident_bytes", "gauge", "Resident memory of the daemon.", rss.to_string());
    }
    let caches = &report.caches;
    let counters = &caches.counters;
    for (name, kind, help, value) in [
        ("llmctl_prompt_cache_bytes", "gauge", "Disk used by saved prompt caches.", caches.used_bytes),
        ("llmctl_prompt_cache_budget_bytes", "gauge", "The disk budget for saved prompt caches.", caches.budget_bytes),
        ("llmctl_prompt_cache_entries", "gauge", "Saved prompt caches kept.", caches.entries.len() as u64),
        ("llmctl_prompt_cache_saves_total", "counter", "Slots saved on unload.", counters.saves),
        ("llmctl_prompt_cache_saved_tokens_total", "counter", "Tokens in the slots saved.", counters.saved_tokens),
        ("llmctl_prompt_cache_save_failures_total", "counter", "Saves that did not complete.", counters.save_failures),
        ("llmctl_prompt_cache_restores_total", "counter", "Slots restored on load.", counters.restores),
        ("llmctl_prompt_cache_restored_tokens_total", "counter", "Tokens restored.", counters.restored_tokens),
        (
            "llmctl_prompt_cache_restore_failures_total",
            "counter",
            "Restores refused by llama-server.",
            counters.restore_failures,
        ),
    ] {
        scalar(name, kind, help, value.to_string());
    }
    let _ = writeln!(
        out,
        "# HELP llmctl_prompt_cache_dropped_total Saved prompt caches dropped, by reason.\n\
         # TYPE llmctl_prompt_cache_dropped_total counter"
    );
    for (reason, count) in [
        ("budget", counters.dropped),
        ("stale", counters.discarded),
        ("corrupt", counters.ignored),
        ("forgotten", counters.forgotten),
    ] {
        let _ = writeln!(out, "llmctl_prompt_cache_dropped_total{{reason=\"{reason}\"}} {count}");
    }

    let mut per_instance =
        |name: &str,
         kind: &str,
         help: &str,
         value: &dyn Fn(&crate::protocol::InstanceStatus) -> Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for instance in &report.instances {
                // Two instances of one model (another context size, an embeddings instance)
                // are two series: the instance label tells them apart.
                let model = format!("model=\"{}\",instance=\"{}\"", escape(&instance.name), escape(&instance.instance));
                for (extra, number) in value(instance) {
                    let labels = if extra.is_empty() { model.clone() } else { format!("{model},{extra}") };
                    let _ = writeln!(out, "{name}{{{labels}}} {number}");
                }
            }
        };
    per_instance("llmctl_instance_up", "gauge", "1 when the instance is ready or busy.", &|i| {
        vec![(String::new(), u8::from(i.state.is_loaded()).to_string())]
    });
    per_instance("llmctl_requests_total", "counter", "Finished requests by outcome.", &|i| {
        i.outcomes.iter().map(|(outcome, n)| (format!("outcome=\"{}\"", escape(outcome)), n.to_string())).collect()
    });
    per_instance("llmctl_tokens_total", "counter", "Prompt and completion tokens.", &|i| {
        vec![
            ("direction=\"in\"".into(), i.usage.prompt_tokens.to_string()),
            ("direction=\"out\"".into(), i.usage.completion_tokens.to_string()),
        ]
    });
    per_instance("llmctl_in_flight", "gauge", "Requests being generated.", &|i| {
        vec![(String::new(), i.in_flight.to_string())]
    });
    per_instance("llmctl_queued", "gauge", "Requests waiting for a slot or a load.", &|i| {
        vec![(String::new(), i.queued.to_string())]
    });
    per_instance("llmctl_rejected_total", "counter", "Requests refused by the full queue.", &|i| {
        vec![(String::new(), i.rejected.to_string())]
    });
    per_instance("llmctl_queue_wait_seconds", "summary", "Time requests waited for a slot.", &|i| {
        quantiles(i.wait_p50_ms, i.wait_p99_ms)
    });
    per_instance("llmctl_first_token_seconds", "summary", "Time from request to first token.", &|i| {
        quantiles(i.first_token_p50_ms, i.first_token_p99_ms)
    });
    per_instance("llmctl_load_seconds", "gauge", "Duration of the last load.", &|i| {
        i.load_ms.map(|ms| vec![(String::new(), format!("{:.3}", ms as f64 / 1000.0))]).unwrap_or_default()
    });
    per_instance("llmctl_instance_memory_bytes", "gauge", "Estimated and measured memory.", &|i| {
        let mut values = vec![("kind=\"estimate\"".to_string(), i.estimate_bytes.to_string())];
        if let Some(rss) = i.rss_bytes {
            values.push(("kind=\"rss\"".into(), rss.to_string()));
        }
        if let Some(vram) = i.vram_bytes {
            values.push(("kind=\"vram\"".into(), vram.to_string()));
        }
        values
    });
    per_instance("llmctl_restarts_total", "counter", "Loads after a failure.", &|i| {
        vec![(String::new(), i.restarts.to_string())]
    });
    per_instance("llmctl_instance_evictions_total", "counter", "Times the instance was evicted or expired.", &|i| {
        vec![(String::new(), i.evictions.to_string())]
    });
    out
}

fn quantiles(p50_ms: Option<f64>, p99_ms: Option<f64>) -> Vec<(String, String)> {
    [("0.5", p50_ms), ("0.99", p99_ms)]
        .into_iter()
        .filter_map(|(q, ms)| Some((format!("quantile=\"{q}\""), format!("{:.6}", ms? / 1000.0))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::InstanceState;
    use crate::protocol::InstanceStatus;

    /// Checks `text` the way a Prometheus scrape would: every sample is
    /// `name{labels} value` under a `# TYPE` of its family, with well-formed labels, and
    /// no two samples have the same name and labels. Returns the samples.
    fn parse_exposition(text: &str) -> Vec<(String, String, f64)> {
        let mut typed = std::collections::HashSet::new();
        let mut seen = std::collections::HashSet::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                typed.insert(parts.next().unwrap().to_string());
                assert!(matches!(parts.next(), Some("gauge" | "counter" | "summary")), "{line}");
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"))),
                None => (series, ""),
            };
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad name: {line}");
            let family = name.trim_end_matches("_sum").trim_end_matches("_count");
            assert!(typed.contains(name) || typed.contains(family), "no TYPE before {line}");
            // Labels: name="value" pairs, values with \\, \" and \n escaped.
            let mut rest = labels;
            while !rest.is_empty() {
                let (label, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad labels: {line}"));
                assert!(label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad label: {line}");
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => {
                            chars.next();
                        }
                        Some((i, '"')) => break i,
                        Some(_) => {}
                        None => panic!("unterminated label: {line}"),
                    }
                };
                rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
            }
            assert!(seen.insert(series.to_string()), "a duplicate series: {line}");
            samples.push((name.to_string(), labels.to_string(), value));
        }
        samples
    }

    #[test]
    fn renders_prometheus_text() {
        let mut report = StatusReport::default();
        report.queue.depth = 64;
        let mut instance = InstanceStatus {
            name: "co\"der".into(),
            state: InstanceState::Ready,
            instance: "coder-1a2b3c4d".into(),
            ..Default::default()
        };
        instance.outcomes.insert("ok".into(), 3);
        instance.wait_p50_ms = Some(1.5);
        report.instances.push(instance);
        let text = render(&report);
        assert!(text.contains("# TYPE llmctl_queue_depth gauge\nllmctl_queue_depth 64\n"), "{text}");
        let model = "model=\"co\\\"der\",instance=\"coder-1a2b3c4d\"";
        assert!(text.contains(&format!("llmctl_requests_total{{{model},outcome=\"ok\"}} 3")), "{text}");
        assert!(text.contains(&format!("llmctl_queue_wait_seconds{{{model},quantile=\"0.5\"}} 0.001500")), "{text}");
        assert!(text.contains(&format!("llmctl_instance_up{{{model}}} 1")), "{text}");
        parse_exposition(&text);
        report.caches.counters.restores = 2;
        let text = render(&report);
        assert!(
            text.contains("# TYPE llmctl_prompt_cache_restores_total counter\nllmctl_prompt_cache_restores_total 2\n")
        );
        assert!(text.contains("llmctl_prompt_cache_dropped_total{reason=\"budget\"} 0\n"), "{text}");
        parse_exposition(&text);
    }

    #[test]
    fn two_instances_of_one_model_are_two_series() {
        let mut report = StatusReport::default();
        for (instance, ctx) in [("m-00000001", 512), ("m-00000002", 4096)] {
            report.instances.push(InstanceStatus {
                name: "m".into(),
                instance: instance.into(),
                ctx_size: Some(ctx),
                state: InstanceState::Busy,
                ..Default::default()
            });
        }
        let samples = parse_exposition(&render(&report));
        let up: Vec<_> = samples.iter().filter(|(name, _, _)| name == "llmctl_instance_up").collect();
        assert_eq!(up.len(), 2, "{up:?}");
    }
}
