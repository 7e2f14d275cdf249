//! llama.cpp's own server tests (`tools/server/tests`, fetched by tests/fetch-test-models)
//! run twice, against a direct llama-server and against `llmctl serve`, both started by
//! `tests/upstream/llama-server` with the argv the tests give: every test that passes
//! directly passes through `serve`, except the deliberate differences the README's serve
//! section lists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::serve::test_python;
use crate::support::*;

/// The test files with a test that passes against llama-server with the stand-in models.
/// Left out: the files where none does (tool calls, chat templates, infill, context shift
/// and slot saving need the models they name), router mode's (`test_router`,
/// `test_mcp_servers`, `test_tools_builtin`, `test_stream`) and Vertex AI's prediction mode
/// (`test_compat_gcp`), which are llama-server's own ways of running, not one model behind a
/// server.
const FILES: &[&str] = &[
    "test_basic.py",
    "test_chat_completion.py",
    "test_completion.py",
    "test_compat_anthropic.py",
    "test_compat_oai_responses.py",
    "test_embedding.py",
    "test_ignore_eos.py",
    "test_kv_keep_only_active.py",
    "test_metrics.py",
    "test_proxy.py",
    "test_rerank.py",
    "test_security.py",
    "test_sleep.py",
    "test_tokenize.py",
];

/// Tests that pass against llama-server and deliberately not through `serve`, each with
/// the reason the README's table of differences gives.
const DIFFERENCES: &[(&str, &str)] = &[
    ("unit/test_basic.py::test_server_model_aliases_and_tags", "a model has one name, others answer by answers_to"),
    ("unit/test_kv_keep_only_active.py::test_clear_and_restore", "the child's log is the model's log, not serve's"),
    ("unit/test_metrics.py::test_metrics_disabled", "/metrics is llmctl's, for every model"),
    ("unit/test_metrics.py::test_metrics_predicted_total_matches_requests", "/metrics is llmctl's"),
    ("unit/test_metrics.py::test_metrics_prometheus_format", "/metrics is llmctl's"),
    ("unit/test_metrics.py::test_metrics_prompt_processed_and_cached", "/metrics is llmctl's"),
    ("unit/test_sleep.py::test_server_sleep_metrics_buckets", "/metrics is llmctl's"),
    ("unit/test_sleep.py::test_server_sleep_read_only_endpoints", "/metrics is llmctl's"),
    ("unit/test_proxy.py::test_mcp_proxy_custom_port", "/cors-proxy is refused"),
    ("unit/test_proxy.py::test_mcp_proxy_no_content", "/cors-proxy is refused"),
    ("unit/test_security.py::test_cors_proxy_only_forwards_explicit_proxy_headers", "/cors-proxy is refused"),
    ("unit/test_security.py::test_cors_options[localhost-Access-Control-Allow-Origin-localhost]", "CORS default"),
    ("unit/test_security.py::test_cors_options[origin-Access-Control-Allow-Credentials-true]", "CORS default"),
    ("unit/test_security.py::test_cors_options[web.mydomain.fr-Access-Control-Allow-Headers-*]", "CORS default"),
    (
        "unit/test_security.py::test_cors_options[web.mydomain.fr-Access-Control-Allow-Methods-GET, POST, DELETE, OPTIONS]",
        "CORS default",
    ),
    ("unit/test_security.py::test_cors_options[web.mydomain.fr-Access-Control-Allow-Origin-web.mydomain.fr]", "CORS default"),
];

/// Tests whose result depends on when parallel requests reach the child, not on what is
/// answered: four requests share one 256-token KV cache and one stops a token short or not
/// as their slots overlap. They are left out of both checks.
const TIMED: &[&str] = &["unit/test_completion.py::test_completion_unified[256-4-n_predict_vals3-expected_success3]"];

fn server_tests() -> PathBuf {
    let dir = match std::env::var_os("LLMCTL_TEST_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/llmctl/test-models"),
    };
    let tests = dir.join("llama-server-tests");
    assert!(
        tests.join("utils.py").exists(),
        "{} is missing: run tests/fetch-test-models (tests/run does)",
        tests.display()
    );
    tests
}

/// Which of `selected` (test files under `unit/`, or test ids) passed, run with
/// `tests/upstream/llama-server` started `via`; the output is kept as `{log}.log`.
fn passing<S: AsRef<str>>(env: &Env, tests: &Path, via: &str, selected: &[S], log: &str) -> BTreeSet<String> {
    let root = env.path(log);
    std::fs::create_dir_all(root.join("cache")).unwrap();
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/upstream/llama-server");
    let output = Command::new(test_python())
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", "--no-header", "-o", "addopts="])
        .args(selected.iter().map(|test| test.as_ref()))
        .current_dir(tests)
        .env("LLAMA_SERVER_BIN_PATH", &wrapper)
        .env("LLAMA_CACHE", root.join("cache"))
        .env("PORT", free_port().to_string())
        .env("LLMCTL_UPSTREAM_VIA", via)
        .env("LLMCTL_UPSTREAM_ROOT", &root)
        .env("LLMCTL_UPSTREAM_LLAMA_SERVER", real_llama_server())
        .env("LLMCTL_UPSTREAM_LLMCTL", LLMCTL)
        .env("LLMCTL_UPSTREAM_CHAT_MODEL", demo_model())
        .env("LLMCTL_UPSTREAM_GEMMA_MODEL", gemma_model())
        .env_remove("SLOW_TESTS")
        .env_remove("LLAMA_API_KEY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    std::fs::write(env.path(&format!("{log}.log")), text.as_bytes()).unwrap();
    let passed: BTreeSet<String> =
        text.lines().filter_map(|line| line.strip_prefix("PASSED ")).map(|id| id.trim().to_string()).collect();
    let summary = text.lines().rev().find(|line| line.contains(" in ")).unwrap_or("");
    eprintln!("llama.cpp's server tests {log}: {} passed ({summary})", passed.len());
    passed
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn llama_cpps_server_tests_that_pass_against_llama_server_pass_through_serve() {
    let tests = server_tests();
    let env = Env::real();
    let files: Vec<String> = FILES.iter().map(|file| format!("unit/{file}")).collect();
    let direct = passing(&env, &tests, "direct", &files, "direct");
    // With the stand-in models, most of the tests still pass directly; far fewer means the
    // run itself is broken, not serve.
    assert!(direct.len() >= 100, "only {} passed directly:\n{}", direct.len(), env.path("direct.log").display());
    let mut through_serve = passing(&env, &tests, "serve", &files, "serve");
    let deliberate: BTreeSet<&str> = DIFFERENCES.iter().map(|(test, _)| *test).collect();
    let lost = |through_serve: &BTreeSet<String>| -> Vec<String> {
        direct
            .iter()
            .filter(|test| {
                !through_serve.contains(*test) && !deliberate.contains(test.as_str()) && !TIMED.contains(&test.as_str())
            })
            .cloned()
            .collect()
    };
    // Some of these tests time things (sleep after an idle period, a slot's progress) on a
    // machine whose two cores also run the suite: a test lost through serve is run again,
    // alone, up to twice more, and is lost only if it fails through serve every time.
    for again in 1..=2 {
        let retry = lost(&through_serve);
        if retry.is_empty() {
            break;
        }
        eprintln!("llama.cpp's server tests: running {} lost through serve again: {retry:?}", retry.len());
        through_serve.extend(passing(&env, &tests, "serve", &retry, &format!("serve-again-{again}")));
    }
    let lost = lost(&through_serve);
    let serve_log = std::fs::read_to_string(env.path("serve.log")).unwrap_or_default();
    assert!(lost.is_empty(), "pass against llama-server, fail through serve: {lost:#?}\n{serve_log}");
    // A deliberate difference that passes now is no longer one: the list stays true.
    let stale: Vec<&&str> = deliberate.iter().filter(|test| through_serve.contains(**test)).collect();
    assert!(stale.is_empty(), "listed as differences but pass through serve: {stale:?}");
    env.assert_nothing_survives();
}
