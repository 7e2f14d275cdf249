//! Files and servers llmctl does not control: crafted GGUF headers, a FIFO where a model
//! should be, escape sequences in metadata and file names, a Hub that sends more than it
//! lists, a full disk, a `.part` file that is not llmctl's, and redirects to another port.
//! Each must get its documented exit code quickly and leave nothing behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::catalog::{env_with_hub, ls_json, pulled_dir, tiny_bytes, FakeHub};
use crate::support::*;

/// How long a refusal may take: bad input is answered in well under a second; the bound
/// leaves room for a loaded machine and fails a hang rather than waiting on it forever.
const QUICKLY: Duration = Duration::from_secs(10);

/// Runs llmctl and fails the test when it takes longer than [`QUICKLY`] (the process is
/// killed first, so a hang never outlives the test).
fn run_quickly(env: &Env, args: &[&str]) -> Output {
    let mut child = env.spawn(args);
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > QUICKLY {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("llmctl {args:?} took more than {QUICKLY:?}; stderr: {}", stderr(&output));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A GGUF header with no tensors and one key `x` holding `value` (its type, then its bytes).
fn header_with(value: &[u8]) -> Vec<u8> {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.push(b'x');
    bytes.extend(value);
    bytes
}

/// An array of `element_type` claiming `len` elements, as a value (type 9 first).
fn array(element_type: u32, len: u64) -> Vec<u8> {
    let mut bytes = 9u32.to_le_bytes().to_vec();
    bytes.extend(element_type.to_le_bytes());
    bytes.extend(len.to_le_bytes());
    bytes
}

/// Crafted headers: arrays nested a million deep (a stack overflow for a recursive
/// reader), and counts no file of that size can hold.
fn crafted_models(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut nested = array(9, 1);
    for _ in 0..1_000_000 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    let mut huge_tensors = header_with(&8u32.to_le_bytes());
    huge_tensors[8..16].copy_from_slice(&(1u64 << 19).to_le_bytes());
    huge_tensors.extend(0u64.to_le_bytes());
    let files = [
        ("nested.gguf", header_with(&nested), "nested more than 8 deep"),
        ("huge-array.gguf", header_with(&array(8, 1 << 24)), "needs more bytes than the file holds"),
        ("endless-array.gguf", header_with(&array(0, u64::MAX)), "array of 18446744073709551615 elements"),
        ("huge-tensors.gguf", huge_tensors, "more than the file holds"),
    ];
    files
        .into_iter()
        .map(|(name, bytes, reason)| {
            let path = dir.join(name);
            fs::write(&path, bytes).unwrap();
            (path, reason)
        })
        .collect()
}

#[test]
fn crafted_headers_are_bad_models_for_ls_show_and_a_running_daemon() {
    let env = Env::fake();
    let models = env.path("data/models");
    fs::create_dir_all(&models).unwrap();
    let crafted = crafted_models(&models);

    let listed = ls_json(&env);
    for (path, reason) in &crafted {
        let name = path.file_name().unwrap().to_str().unwrap();
        let entry = listed.iter().find(|model| model["name"] == name).unwrap_or_else(|| panic!("{listed:?}"));
        assert!(entry["error"].as_str().unwrap().contains(reason), "{entry}");
        let output = run_quickly(&env, &["show", path.to_str().unwrap()]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains(reason), "{}", stderr(&output));
        // No daemon runs yet: the client reads the header itself.
        assert_exit(&run_quickly(&env, &["run", path.to_str().unwrap(), "hi"]), 65);
    }
    assert_success(&run_quickly(&env, &["ls"]));
    assert!(!env.socket().exists(), "nothing so far starts a daemon");

    // With a daemon running, the daemon reads the header: it refuses and serves on.
    let tiny = env.tiny_model("tiny.gguf");
    assert_success(&env.run(&["run", tiny.to_str().unwrap(), "hi"]));
    let daemon = env.daemon_pid().expect("a daemon runs");
    for (path, reason) in &crafted {
        let output = run_quickly(&env, &["run", path.to_str().unwrap(), "hi"]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains(reason), "{}", stderr(&output));
    }
    assert_success(&run_quickly(&env, &["status"]));
    assert_eq!(env.daemon_pid(), Some(daemon), "the same daemon answers");
    assert!(alive(daemon));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn a_fifo_named_like_a_model_is_refused_at_once_and_the_daemon_lives() {
    let env = Env::fake();
    let models = env.path("data/models");
    fs::create_dir_all(&models).unwrap();
    let fifo = models.join("x.gguf");
    mkfifo(&fifo);
    // An alias to it too: `ls` reads an alias's header.
    env.write_config(&format!("[models.piped]\npath = \"{}\"\n", fifo.display()));
    let fifo_arg = fifo.to_str().unwrap();

    let output = run_quickly(&env, &["ls", "--json"]);
    assert_success(&output);
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let piped = listed.as_array().unwrap().iter().find(|model| model["name"] == "piped").unwrap();
    assert!(piped["error"].as_str().unwrap().contains("it is a FIFO, not a model file"), "{listed}");
    let output = run_quickly(&env, &["ls"]);
    assert_success(&output);
    assert!(stdout(&output).contains("piped: it is a FIFO, not a model file"), "{}", stdout(&output));

    for name in ["x.gguf", "piped", fifo_arg] {
        let output = run_quickly(&env, &["show", name]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains("FIFO"), "{name}: {}", stderr(&output));
    }
    assert_exit(&run_quickly(&env, &["run", "x.gguf", "hi"]), 65);
    assert!(!env.socket().exists(), "a refused model starts no daemon");

    let tiny = env.tiny_model("tiny.gguf");
    assert_success(&env.run(&["run", tiny.to_str().unwrap(), "hi"]));
    let daemon = env.daemon_pid().expect("a daemon runs");
    for name in ["x.gguf", "piped", fifo_arg] {
        let output = run_quickly(&env, &["run", name, "hi"]);
        assert_exit(&output, 65);
        assert!(stderr(&output).contains("FIFO"), "{name}: {}", stderr(&output));
    }
    let output = run_quickly(&env, &["status"]);
    assert_success(&output);
    assert_eq!(env.daemon_pid(), Some(daemon));
    // The daemon still serves, on a thread not stuck in an open().
    assert_success(&run_quickly(&env, &["run", tiny.to_str().unwrap(), "hi"]));
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// True when `bytes` holds a byte a terminal acts on: ESC, BEL, or another C0 control
/// except the newline between lines.
fn has_control_bytes(bytes: &[u8]) -> bool {
    bytes.iter().any(|&byte| (byte < 0x20 && byte != b'\n') || byte == 0x7f)
}

#[test]
fn escape_sequences_in_headers_and_file_names_never_reach_the_terminal() {
    let env = Env::fake();
    let models = env.path("data/models");
    fs::create_dir_all(&models).unwrap();
    let evil_name = "evil\x1b[31m.gguf";
    let title = "\x1b]0;pwned\x07";
    let model = models.join(evil_name);
    llmctl::tiny_model::write_with_strings(
        &model,
        &[
            ("general.name", title),
            ("general.author", "author\x1b[2J"),
            ("general.license", "licence\r\nforged: line"),
            ("tokenizer.chat_template", "{{ messages }}\n\x1b[8mhidden\x1b[0m\n"),
        ],
    )
    .unwrap();

    let output = env.run(&["ls"]);
    assert_success(&output);
    assert!(!has_control_bytes(&output.stdout), "{:?}", stdout(&output));
    assert!(stdout(&output).contains("evil\\x1b[31m.gguf"), "{}", stdout(&output));
    let output = env.run(&["ls", "--names"]);
    assert!(!has_control_bytes(&output.stdout), "{:?}", stdout(&output));
    // JSON carries the name as it is, escaped by JSON itself.
    assert_eq!(ls_json(&env)[0]["name"], evil_name);

    let output = env.run(&["show", evil_name]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(!has_control_bytes(&output.stdout), "{text:?}");
    for shown in ["\\x1b]0;pwned\\x07", "author\\x1b[2J", "licence\\x0d\\x0aforged: line", "evil\\x1b[31m.gguf"] {
        assert!(text.contains(shown), "{shown} in {text}");
    }
    let output = env.run(&["show", "--template", evil_name]);
    assert_success(&output);
    assert_eq!(stdout(&output), "{{ messages }}\n\\x1b[8mhidden\\x1b[0m\n", "lines kept, escapes shown");
    let output = env.run(&["show", "--json", evil_name]);
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["general_name"], title);

    // Error messages name the file: escaped too.
    let missing = env.path("missing\x1b]0;pwned\x07.gguf");
    let output = env.run(&["show", missing.to_str().unwrap()]);
    assert_exit(&output, 66);
    assert!(!has_control_bytes(&output.stderr), "{:?}", stderr(&output));
    assert!(stderr(&output).contains("missing\\x1b]0;pwned\\x07.gguf"), "{}", stderr(&output));

    // A loaded instance keeps the file's name: `ps` and `status` escape it.
    assert_success(&env.run(&["warm", evil_name]));
    for args in [&["ps"][..], &["status"][..]] {
        let output = env.run(args);
        assert_success(&output);
        assert!(!has_control_bytes(&output.stdout), "{args:?}: {:?}", stdout(&output));
        assert!(stdout(&output).contains("evil\\x1b[31m.gguf"), "{args:?}: {}", stdout(&output));
    }
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
}

/// A small tmpfs mounted on a directory of the test, unmounted when dropped (before the
/// test's temporary directory goes, so declare it after the `Env`).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs on {} needs root", path.display());
        Tmpfs { path: path.to_path_buf() }
    }

    fn resize(&self, size: &str) {
        let status =
            Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.path).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A daemon that cannot start because the disk of its state directory is full (it can
/// write neither its lock nor its log, so its log cannot say why) is named as such.
#[test]
fn a_full_state_disk_is_named_when_the_daemon_cannot_start() {
    let env = Env::fake();
    let model = env.tiny_model("m.gguf").display().to_string();
    let disk = Tmpfs::mount(&env.path("state"), "64k");
    let mut filler = fs::File::create(env.path("state/filler")).unwrap();
    while filler.write_all(&[0u8; 4096]).is_ok() {}
    drop(filler);
    let output = env.run(&["run", &model, "hi"]);
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("is full"), "{}", stderr(&output));
    env.assert_nothing_survives();
    drop(disk);
}

/// The names in `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_hub_that_sends_more_than_it_lists_never_fills_the_disk() {
    let (env, hub) = env_with_hub();
    let model = tiny_bytes(&env);
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", model.clone())]);
    // Room for the model twice over, not for what the Hub sends: writing past the listed
    // size would end in "the disk is full" instead.
    let _disk = Tmpfs::mount(&env.path("data/models"), &format!("{}", 2 * model.len()));
    for announced in [false, true] {
        {
            let mut state = hub.state.lock().unwrap();
            state.extra_bytes = 64 << 20;
            state.extra_announced = announced;
        }
        let output = run_quickly(&env, &["pull", "test/tiny-GGUF"]);
        assert_exit(&output, 69);
        let expected = format!("sent more than the {} bytes the Hub lists", model.len());
        assert!(stderr(&output).contains(&expected), "announced {announced}: {}", stderr(&output));
        assert!(!pulled_dir(&env, "test/tiny-GGUF").exists(), "nothing left: {:?}", names_in(&env.path("data/models")));
    }
    hub.state.lock().unwrap().extra_bytes = 0;
    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
    assert_eq!(fs::read(pulled_dir(&env, "test/tiny-GGUF").join("tiny-Q4_K_M.gguf")).unwrap(), model);
}

#[test]
fn a_full_disk_fails_the_pull_and_keeps_only_a_part_to_resume() {
    let (env, hub) = env_with_hub();
    let model = tiny_bytes(&env);
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", model.clone())]);
    let disk = Tmpfs::mount(&env.path("data/models"), &format!("{}", model.len() / 2));
    let output = env.run(&["pull", "test/tiny-GGUF"]);
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("the disk is full"), "{}", stderr(&output));
    let dir = pulled_dir(&env, "test/tiny-GGUF");
    assert_eq!(names_in(&dir), ["tiny-Q4_K_M.gguf.part"], "only the part, no final name, no temporary file");
    let part = fs::read(dir.join("tiny-Q4_K_M.gguf.part")).unwrap();
    assert!(!part.is_empty() && part.len() < model.len(), "{}", part.len());
    assert_eq!(part[..], model[..part.len()], "the part is a prefix of the file");

    disk.resize(&format!("{}", 4 * model.len()));
    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
    assert_eq!(fs::read(dir.join("tiny-Q4_K_M.gguf")).unwrap(), model);
    let ranges: Vec<Option<String>> = hub.requests().into_iter().map(|(_, range, _)| range).collect();
    assert!(ranges.contains(&Some(format!("bytes={}-", part.len()))), "resumed: {ranges:?}");
    assert_eq!(names_in(&dir), ["llmctl-pull.json", "tiny-Q4_K_M.gguf"]);
}

#[test]
fn a_part_file_that_is_not_llmctls_is_never_written_or_removed() {
    let (env, hub) = env_with_hub();
    let model = tiny_bytes(&env);
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", model.clone())]);
    let dir = pulled_dir(&env, "test/tiny-GGUF");
    fs::create_dir_all(&dir).unwrap();
    let part = dir.join("tiny-Q4_K_M.gguf.part");
    let victim = env.path("precious.txt");
    fs::write(&victim, b"precious").unwrap();

    let cases: [(&str, &dyn Fn()); 4] = [
        ("a symbolic link", &|| std::os::unix::fs::symlink(&victim, &part).unwrap()),
        ("a hard link to another file", &|| fs::hard_link(&victim, &part).unwrap()),
        ("another user's file", &|| {
            fs::write(&part, b"").unwrap();
            std::os::unix::fs::chown(&part, Some(65534), Some(65534)).unwrap();
        }),
        ("not a regular file", &|| mkfifo(&part)),
    ];
    for (what, plant) in cases {
        plant();
        let output = run_quickly(&env, &["pull", "test/tiny-GGUF"]);
        assert_exit(&output, 69);
        assert!(stderr(&output).contains(&format!("tiny-Q4_K_M.gguf.part is {what}")), "{what}: {}", stderr(&output));
        assert_eq!(fs::read(&victim).unwrap(), b"precious", "{what}: the file it points to is untouched");
        assert!(fs::symlink_metadata(&part).is_ok(), "{what}: what is not llmctl's is not removed either");
        fs::remove_file(&part).unwrap();
    }

    // Another pull holds the part: refused, and its part stays for it.
    let held = fs::File::create(&part).unwrap();
    // SAFETY: flock on a descriptor `held` owns for the whole call.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) }, 0);
    let output = run_quickly(&env, &["pull", "test/tiny-GGUF"]);
    assert_exit(&output, 69);
    assert!(stderr(&output).contains("another llmctl pull"), "{}", stderr(&output));
    assert!(part.exists(), "the other pull's part is left alone");
    drop(held);

    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
    assert_eq!(fs::read(dir.join("tiny-Q4_K_M.gguf")).unwrap(), model);
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn the_token_goes_only_to_the_exact_origin_it_was_given_for() {
    let (mut env, hub) = env_with_hub();
    env.set("HF_TOKEN", "secret-token");
    let model = tiny_bytes(&env);
    hub.add("test/tiny-GGUF", vec![("tiny-Q4_K_M.gguf", model.clone())]);
    // A second listener: the same host, another port.
    let other_port = FakeHub::sharing(std::sync::Arc::clone(&hub.state));
    let cdn_requests = |hub: &FakeHub| -> Vec<(String, Option<String>, Option<String>)> {
        hub.requests().into_iter().filter(|(path, _, _)| path.starts_with("/cdn/")).collect()
    };

    hub.state.lock().unwrap().redirect_to = Some(other_port.url.clone());
    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
    let requests = hub.requests();
    assert_eq!(requests[0].2.as_deref(), Some("Bearer secret-token"), "the endpoint gets the token: {requests:?}");
    let cdn = cdn_requests(&hub);
    assert_eq!(cdn.len(), 1, "{requests:?}");
    assert_eq!(cdn[0].2, None, "another port of the same host is another origin: {cdn:?}");
    assert_eq!(fs::read(pulled_dir(&env, "test/tiny-GGUF").join("tiny-Q4_K_M.gguf")).unwrap(), model);

    // A redirect within the endpoint's own origin keeps it.
    assert_success(&env.run(&["rm", "test/tiny-GGUF"]));
    hub.state.lock().unwrap().redirect_to = Some(hub.url.clone());
    assert_success(&env.run(&["pull", "test/tiny-GGUF"]));
    let cdn = cdn_requests(&hub);
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert_eq!(cdn[1].2.as_deref(), Some("Bearer secret-token"), "{cdn:?}");
}

/// A pin said done is on disk; one that cannot be written is said not to be (69), and is in
/// effect meanwhile.
#[test]
fn a_pin_on_a_full_disk_says_it_is_not_saved() {
    let env = Env::fake();
    env.add_model("a", &[], "");
    let disk = Tmpfs::mount(&env.path("state"), "1m");
    assert_success(&env.run(&["warm", "a"]));
    let mut filler = fs::File::create(env.path("state/filler")).unwrap();
    while filler.write_all(&[0u8; 4096]).is_ok() {}
    drop(filler);
    for (args, done) in [
        (&["pin", "a"][..], "a is pinned now, but it is not saved"),
        (&["warm", "--ttl", "1h", "a"][..], "a is kept loaded for 3600 s now, but it is not saved"),
        (&["unpin", "a"][..], "a is unpinned now, but it is not saved"),
    ] {
        let output = env.run(args);
        assert_exit(&output, 69);
        let message = stderr(&output);
        assert!(message.contains(done) && message.contains("No space left"), "{args:?}: {message}");
    }
    // Room again: the next pin is saved and said done.
    fs::remove_file(env.path("state/filler")).unwrap();
    assert_success(&env.run(&["pin", "a"]));
    let state = fs::read_to_string(env.path("state/state.json")).unwrap();
    assert!(state.contains("\"pinned\": true"), "{state}");
    assert_success(&env.run(&["shutdown"]));
    env.assert_nothing_survives();
    drop(disk);
}
