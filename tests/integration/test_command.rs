//! `tests/run`, the test command, on fakes: its functions are sourced and run against
//! made-up cargo output and a made-up target directory, never against the real suite.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// Runs `script` in bash after sourcing tests/run, in the checkout.
fn with_test_command(script: &str) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new("bash")
        .arg("-c")
        .arg(format!("source tests/run\n{script}"))
        .current_dir(root)
        .output()
        .expect("bash runs")
}

const PASSING: &str = "running 3 tests\ntest a ... ok\ntest result: ok. 3 passed; 0 failed; 0 ignored; 0 measured\n";
const FAILING: &str =
    "running 2 tests\ntest b ... FAILED\ntest result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured\n";

#[test]
fn the_test_command_always_closes_with_its_summary_and_fails_when_a_test_failed() {
    let env = Env::fake();
    let passing = env.path("passing.txt");
    let failing = env.path("failing.txt");
    std::fs::write(&passing, PASSING).unwrap();
    std::fs::write(&failing, FAILING).unwrap();
    // A suite whose second binary fails, and whose command exits 101 as cargo test does,
    // under the script's own `set -euo pipefail`.
    let output = with_test_command(&format!(
        "set -euo pipefail\nrun_suite bash -c 'cat {}; cat {}; exit 101'\necho not reached",
        passing.display(),
        failing.display()
    ));
    assert_eq!(output.status.code(), Some(101), "{}", stderr(&output));
    let printed = stdout(&output);
    assert!(printed.ends_with("tests: 4 passed, 1 failed\n"), "{printed}");
    assert!(printed.contains("test b ... FAILED"), "the suite's own output is shown: {printed}");

    // All passing: the summary, and success.
    let output = with_test_command(&format!("set -euo pipefail\nrun_suite cat {}", passing.display()));
    assert_success(&output);
    assert!(stdout(&output).ends_with("tests: 3 passed, 0 failed\n"), "{}", stdout(&output));

    // A failed test in output whose command still exited 0, or output with no test result
    // (a build that broke), fails too.
    let output = with_test_command(&format!("run_suite cat {}", failing.display()));
    assert_eq!(output.status.code(), Some(1));
    let output = with_test_command("run_suite echo 'error: could not compile'");
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).ends_with("tests: 0 passed, 0 failed\n"), "{}", stdout(&output));
}

#[test]
fn the_test_command_finds_the_binary_where_cargo_target_dir_puts_it() {
    let env = Env::fake();
    let elsewhere = env.path("elsewhere");
    let output = Command::new("bash")
        .arg("-c")
        .arg("source tests/run && target_dir")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &elsewhere)
        .output()
        .unwrap();
    assert_success(&output);
    assert_eq!(stdout(&output).trim(), elsewhere.display().to_string());
    let output = Command::new("bash")
        .arg("-c")
        .arg("source tests/run && target_dir")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert_success(&output);
    assert!(stdout(&output).trim().ends_with("/target"), "{}", stdout(&output));
    // Sourcing runs nothing: no build, no set-up.
    let output = with_test_command("echo sourced");
    assert_eq!(stdout(&output), "sourced\n");
}
