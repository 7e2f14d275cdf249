//! The benchmark harness: what llmctl costs next to llama-server itself.
//!
//! `cargo bench --features testing` (after `llmctl setup`). Each comparison runs both sides
//! in the same process, interleaved, several times, and reports medians and ratios; the
//! machines this runs on are shared and noisy, so absolute times alone mean little. Nothing
//! here asserts: it prints a Markdown report for the README.
//!
//! 1. Streaming: SmolLM2 through `llmctl run` vs the same request straight to the same
//!    llama-server (tokens/s, time to first token); the fake server at full speed through
//!    the whole path (tokens/s, µs per token).
//! 2. Control plane: `llmctl status` round trip, whole process.
//! 3. Cold start: `llmctl run` on an unloaded model to the first token vs llama-server
//!    alone (spawn, port from its log, `/health` polled every millisecond, first token).
//!    Router mode: a running router, first request for an unloaded model.
//! 4. Swap between SmolLM2 and Gemma 270M with one model at a time: llmctl vs router mode.
//! 5. Admission: requests/s and p99 at 1, 8 and 64 concurrent clients, fake server at full
//!    speed, through the daemon vs straight to the server.
//! 6. Footprint: binary size, daemon RSS idle and with a model loaded.
//! 7. Scaling: `status` and `run` times and daemon RSS with 1, 2, 4 and 8 instances.
//! 8. `llmctl serve`: streaming over the OpenAI API vs llama-server directly and its router.
//! 9. Children on a Unix socket (the default) vs loopback TCP: admission and time to first
//!    token.
//! 10. llama-server built for this CPU (`GGML_NATIVE=ON`) vs a portable build, SmolLM2 and
//!     Gemma 270M: generation and prompt tokens/s.
//! 11. Prompt caches kept across a swap (`BENCH_ONLY=caches`): a 2,000-token SmolLM2
//!     conversation, a swap to another model and back, then a follow-up; time to first token
//!     with saved caches and without (`cache_budget = "0"`), the reload subtracted, the
//!     save and restore times, the slot file's size and what saving adds to the eviction.
//! 12. Ollama's `/api/chat` vs `/v1/chat/completions`, both streamed through `llmctl serve` to
//!     the same SmolLM2 instance: time to first token and tokens/s (`BENCH_ONLY=ollama`).
//!
//! Thrash (after 4): concurrent clients over three models with room for one, llmctl vs the
//! router with `--models-max 1`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LLMCTL: &str = env!("CARGO_BIN_EXE_llmctl");
const FAKE: &str = env!("CARGO_BIN_EXE_fake-llama-server");

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test` probes benches this way.
    }
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(9);
    let server = data_dir().join("llama.cpp/b11434/llama-server");
    let demo = data_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(server.exists() && demo.exists(), "run `llmctl setup` first");

    // `BENCH_ONLY=native` runs only the comparison of builds (it needs no daemon).
    if std::env::var("BENCH_ONLY").as_deref() == Ok("native") {
        println!("machine: {}, {} CPUs; {} repetitions, medians\n", cpu_model(), cpus(), reps);
        native_vs_portable(reps, &demo, gemma_model().as_ref());
        return;
    }
    // `BENCH_ONLY=serve` runs only the comparison of `llmctl serve` and `llmctl run` with
    // llama-server and its router mode.
    if std::env::var("BENCH_ONLY").as_deref() == Ok("serve") {
        println!("machine: {}, {} CPUs; {} repetitions, medians\n", cpu_model(), cpus(), reps);
        let env = Bench::new(&server);
        serve_vs_direct_and_router(&env, &server, &demo, reps);
        short_requests_and_first_tokens(&env, &server, &demo, reps);
        return;
    }
    // `BENCH_ONLY=short` runs only its second half: one-token requests over HTTP, a whole
    // command's first token, `status` and the daemon's footprint (seconds, so it can be
    // run many times over on a noisy machine).
    if std::env::var("BENCH_ONLY").as_deref() == Ok("short") {
        println!("machine: {}, {} CPUs; {} repetitions, medians\n", cpu_model(), cpus(), reps);
        let env = Bench::new(&server);
        short_requests_and_first_tokens(&env, &server, &demo, reps);
        return;
    }
    // `BENCH_ONLY=thrash` runs only the scheduler's traces against router mode.
    if std::env::var("BENCH_ONLY").as_deref() == Ok("thrash") {
        println!("machine: {}, {} CPUs; medians\n", cpu_model(), cpus());
        match gemma_model() {
            Some(gemma) => thrash_and_starvation(&server, &demo, &gemma),
            None => println!("(Gemma 270M is not installed: run tests/fetch-test-models)"),
        }
        return;
    }
    // `BENCH_ONLY=ollama` runs only the comparison of Ollama's API with the OpenAI one.
    if std::env::var("BENCH_ONLY").as_deref() == Ok("ollama") {
        println!("machine: {}, {} CPUs; {} repetitions, medians\n", cpu_model(), cpus(), reps);
        ollama_vs_openai_through_serve(&Bench::new(&server), &demo, reps);
        return;
    }
    // `BENCH_ONLY=admission` runs only section 5, the admission of short requests.
    if std::env::var("BENCH_ONLY").as_deref() == Ok("admission") {
        println!("machine: {}, {} CPUs; medians\n", cpu_model(), cpus());
        let dir = tempfile::tempdir().unwrap();
        let fake_model = dir.path().join("fake.gguf");
        std::fs::copy(&demo, &fake_model).unwrap();
        admission(&fake_model);
        return;
    }
    // `BENCH_ONLY=caches` runs only the prompt caches across a swap.
    if std::env::var("BENCH_ONLY").as_deref() == Ok("caches") {
        println!("machine: {}, {} CPUs; {} repetitions, medians\n", cpu_model(), cpus(), reps);
        prompt_caches_across_a_swap(&server, &demo, reps);
        return;
    }
    println!("## llmctl benchmark\n");
    println!("machine: {}, {} CPUs; {} repetitions, medians\n", cpu_model(), cpus(), reps);
    let env = Bench::new(&server);

    // 1a. SmolLM2 streaming, warm instance.
    let tokens = 128;
    env.llmctl(&["warm", demo.to_str().unwrap()]);
    let target = env.instance_target();
    let prompt = "1, 2, 3, 4, 5, 6,"; // counting goes on until the token limit
                                      // Twice: requests back to back, and with an idle gap before each, as when a person types
                                      // commands. Right after a request llama-server's compute threads still spin on both
                                      // cores, which slows a process that is just starting far more than an open connection.
    for (label, gap) in [("back to back", Duration::ZERO), ("300 ms idle before each", Duration::from_millis(300))] {
        let mut via_llmctl = Vec::new();
        let mut direct = Vec::new();
        let tokens_arg = tokens.to_string();
        let args = ["run", "--raw", "--temperature", "0", "-n", &tokens_arg, demo.to_str().unwrap(), prompt];
        for _ in 0..reps {
            std::thread::sleep(gap);
            via_llmctl.push(env.timed_run(&args));
            std::thread::sleep(gap);
            direct.push(direct_stream(&target, prompt, tokens));
        }
        let (llmctl_ttft, llmctl_total) = medians(&via_llmctl);
        let (direct_ttft, direct_total) = medians(&direct);
        let llmctl_rate = tokens as f64 / (llmctl_total - llmctl_ttft).as_secs_f64();
        let direct_rate = tokens as f64 / (direct_total - direct_ttft).as_secs_f64();
        println!("### Streaming, SmolLM2-135M Q4_1, {tokens} tokens, warm, {label}\n");
        println!("| path | time to first token | generation tokens/s | whole request |");
        println!("|---|---|---|---|");
        println!(
            "| llama-server directly (HTTP, in process) | {} | {direct_rate:.1} | {} |",
            ms(direct_ttft),
            ms(direct_total)
        );
        println!("| `llmctl run` (whole process) | {} | {llmctl_rate:.1} | {} |", ms(llmctl_ttft), ms(llmctl_total));
        println!(
            "\ntokens/s ratio llmctl/direct: **{:.3}**; added time to first token: **{:+.2} ms**\n",
            llmctl_rate / direct_rate,
            (llmctl_ttft.as_secs_f64() - direct_ttft.as_secs_f64()) * 1000.0
        );
    }

    // 1b. Fake server at full speed through daemon, socket, client and stdout.
    let fake_tokens = 200_000;
    let fake_env = Bench::new(Path::new(FAKE));
    let fake_model = fake_env.dir.path().join("fake.gguf");
    std::fs::copy(&demo, &fake_model).unwrap();
    fake_env.set_fake_tokens(fake_tokens);
    fake_env.llmctl(&["warm", fake_model.to_str().unwrap()]);
    let fake_target = fake_env.instance_target();
    let mut through = Vec::new();
    let mut straight = Vec::new();
    for _ in 0..reps.min(5) {
        // `-n 0`: no token limit, so all of the fake's tokens come through.
        through.push(fake_env.timed_run(&["run", "--raw", "-n", "0", fake_model.to_str().unwrap(), "go"]).1);
        straight.push(direct_stream(&fake_target, "go", fake_tokens).1);
    }
    let through = median(&through);
    let straight = median(&straight);
    println!("### Streaming, fake llama-server at full speed, {fake_tokens} tokens\n");
    println!("| path | tokens/s | µs per token |");
    println!("|---|---|---|");
    for (name, time) in [("fake server directly (HTTP, in process)", straight), ("`llmctl run > /dev/null`", through)] {
        println!(
            "| {name} | {:.0} | {:.2} |",
            fake_tokens as f64 / time.as_secs_f64(),
            time.as_secs_f64() * 1e6 / fake_tokens as f64
        );
    }
    println!();

    // 2. Control plane.
    let status: Vec<Duration> = (0..reps * 5).map(|_| env.timed(&["status"])).collect();
    let warm: Vec<Duration> = (0..reps).map(|_| env.timed(&["warm", demo.to_str().unwrap()])).collect();
    println!("### Control plane, whole process, warm daemon\n");
    println!("| command | median | p99 |\n|---|---|---|");
    println!("| `llmctl status` | {} | {} |", ms(median(&status)), ms(p99(&status)));
    println!("| `llmctl warm` (loaded model, one-token request) | {} | {} |\n", ms(median(&warm)), ms(p99(&warm)));

    // 3. Cold start.
    let mut cold_llmctl = Vec::new();
    let mut cold_alone = Vec::new();
    for _ in 0..reps.min(5) {
        env.llmctl(&["stop", "--all"]);
        cold_llmctl
            .push(env.timed_run(&["run", "--raw", "-n", "1", "--ctx-size", "4096", demo.to_str().unwrap(), "Hello"]).0);
        cold_alone.push(cold_start_alone(&server, &demo));
    }
    let (cold_llmctl, cold_alone) = (median(&cold_llmctl), median(&cold_alone));
    println!("### Cold start to first token, SmolLM2, 4096-token context, one slot\n");
    println!("| path | median |\n|---|---|");
    println!("| llama-server alone (spawn, log port, /health every 1 ms, request) | {} |", ms(cold_alone));
    println!("| `llmctl run` on an unloaded model | {} |", ms(cold_llmctl));
    println!("\ndifference: **{:+.1} ms**\n", (cold_llmctl.as_secs_f64() - cold_alone.as_secs_f64()) * 1000.0);

    // 3b. Router mode, cold: a running router, the model not loaded, first request.
    let router_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&demo, router_dir.path().join("smol.gguf")).unwrap();
    let gemma = gemma_model();
    if let Some(gemma) = &gemma {
        std::os::unix::fs::symlink(gemma, router_dir.path().join("gemma.gguf")).unwrap();
    }
    let mut cold_router = Vec::new();
    for _ in 0..reps.min(5) {
        let router = Router::start(&server, router_dir.path(), 1);
        let start = Instant::now();
        router.first_token("smol");
        cold_router.push(start.elapsed());
    }
    println!("| llama-server router mode (running router, first request) | {} |\n", ms(median(&cold_router)));

    // 4. Swap between two real models under a one-model limit.
    if let Some(gemma) = &gemma {
        let swap_env = Bench::new(&server);
        std::fs::write(
            swap_env.dir.path().join("config.toml"),
            format!(
                "max_instances = 1\n[models.smol]\npath = \"{}\"\nctx_size = 4096\n[models.gemma]\npath = \"{}\"\nctx_size = 4096\n",
                demo.display(),
                gemma.display()
            ),
        )
        .unwrap();
        swap_env.llmctl(&["warm", "smol"]);
        let router = Router::start(&server, router_dir.path(), 1);
        router.first_token("smol");
        let mut llmctl_swaps = Vec::new();
        let mut router_swaps = Vec::new();
        for round in 0..reps.min(6) {
            let model = if round % 2 == 0 { "gemma" } else { "smol" };
            llmctl_swaps.push(swap_env.timed_run(&["run", "--raw", "-n", "1", model, "Hello"]).0);
            let start = Instant::now();
            router.first_token(model);
            router_swaps.push(start.elapsed());
        }
        let (llmctl_swap, router_swap) = (median(&llmctl_swaps), median(&router_swaps));
        println!("### Swap between SmolLM2 and Gemma 270M, one model at a time, to first token\n");
        println!("| path | median |\n|---|---|");
        println!("| llama-server router mode, `--models-max 1` | {} |", ms(router_swap));
        println!("| llmctl, `max_instances = 1` | {} |", ms(llmctl_swap));
        println!("\nratio llmctl/router: **{:.2}**\n", llmctl_swap.as_secs_f64() / router_swap.as_secs_f64());
    }

    // 4b. Thrash: concurrent clients over three models with room for one.
    if let Some(gemma) = &gemma {
        std::os::unix::fs::symlink(&demo, router_dir.path().join("smol2.gguf")).unwrap();
        let thrash_env = Bench::new(&server);
        std::fs::write(
            thrash_env.dir.path().join("config.toml"),
            format!(
                "max_instances = 1\n[models.smol]\npath = \"{demo}\"\nctx_size = 4096\n\
                 [models.smol2]\npath = \"{demo}\"\nctx_size = 2048\n\
                 [models.gemma]\npath = \"{gemma}\"\nctx_size = 4096\n",
                demo = demo.display(),
                gemma = gemma.display()
            ),
        )
        .unwrap();
        thrash_env.llmctl(&["status"]);
        let router = Router::start(&server, router_dir.path(), 1);
        let models = ["smol", "smol2", "gemma"];
        println!("### Thrash: clients over three models with room for one, 4-token completions\n");
        println!("| clients | requests | llmctl req/s | router req/s | ratio llmctl/router |\n|---|---|---|---|---|");
        for clients in [3usize, 12] {
            let per_client = 4;
            let pick = |client: usize, round: usize| models[(client + round) % models.len()];
            let counter = std::sync::atomic::AtomicUsize::new(0);
            let next = || counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (llmctl_rate, _) = load(clients, per_client, || {
                let n = next();
                thrash_env.timed_run(&["run", "--raw", "-n", "4", pick(n % clients, n / clients), "Hello"]);
            });
            counter.store(0, std::sync::atomic::Ordering::SeqCst);
            let (router_rate, _) = load(clients, per_client, || {
                let n = next();
                router.complete(pick(n % clients, n / clients), 4);
            });
            println!(
                "| {clients} | {} | {llmctl_rate:.2} | {router_rate:.2} | **{:.2}** |",
                clients * per_client,
                llmctl_rate / router_rate
            );
        }
        println!();
    }

    // 5. Admission: many concurrent clients, fake server at full speed, short generations.
    admission(&fake_model);

    // 9. Children on a Unix socket (the default) against loopback TCP with a key.
    {
        println!("### Children on a Unix socket vs loopback TCP\n");
        println!("| measure | Unix socket | TCP | ratio socket/TCP |\n|---|---|---|---|");
        let socket_env = Bench::new(Path::new(FAKE));
        let mut tcp_env = Bench::new(Path::new(FAKE));
        tcp_env.children_on_tcp = true;
        let mut specs = Vec::new();
        for bench in [&socket_env, &tcp_env] {
            bench.set_fake_tokens(16);
            std::fs::write(bench.dir.path().join("config.toml"), "queue_depth = 256\n").unwrap();
            let model = bench.dir.path().join("fake.gguf");
            std::fs::copy(&demo, &model).unwrap();
            bench.llmctl(&["warm", "--parallel", "64", model.to_str().unwrap()]);
            specs.push(serde_json::json!({"name": "fake.gguf", "path": model, "load": {"ctx_size": null, "parallel": 64, "gpu_layers": null, "extra_args": []}}));
        }
        for clients in [1usize, 8, 64] {
            let per_client = (512 / clients).max(8);
            let (socket_rate, _) = load(clients, per_client, || daemon_request(&socket_env.socket(), &specs[0]));
            let (tcp_rate, _) = load(clients, per_client, || daemon_request(&tcp_env.socket(), &specs[1]));
            println!(
                "| admission req/s, {clients} clients, fake server | {socket_rate:.0} | {tcp_rate:.0} | {:.2} |",
                socket_rate / tcp_rate
            );
        }
        let smol_socket = Bench::new(&server);
        let mut smol_tcp = Bench::new(&server);
        smol_tcp.children_on_tcp = true;
        let args = ["run", "--raw", "--temperature", "0", "-n", "8", demo.to_str().unwrap(), "1, 2, 3,"];
        smol_socket.llmctl(&args);
        smol_tcp.llmctl(&args);
        let (mut via_socket, mut via_tcp) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            via_socket.push(smol_socket.timed_run(&args).0);
            via_tcp.push(smol_tcp.timed_run(&args).0);
        }
        let (socket_ttft, tcp_ttft) = (median(&via_socket), median(&via_tcp));
        println!(
            "| `llmctl run` time to first token, SmolLM2 | {} | {} | {:.2} |\n",
            ms(socket_ttft),
            ms(tcp_ttft),
            socket_ttft.as_secs_f64() / tcp_ttft.as_secs_f64()
        );
    }

    native_vs_portable(reps, &demo, gemma.as_ref());

    // 7. Scaling: control plane and streaming with more instances loaded.
    println!("### Scaling with loaded instances (fake servers)\n");
    println!("| instances | `llmctl status` median | `llmctl run` 16 tokens median | daemon RSS |");
    println!("|---|---|---|---|");
    let scale_env = Bench::new(Path::new(FAKE));
    scale_env.set_fake_tokens(16);
    let mut loaded = 0;
    for target in [1usize, 2, 4, 8] {
        while loaded < target {
            let model = scale_env.dir.path().join(format!("m{loaded}.gguf"));
            std::fs::copy(&fake_model, &model).unwrap();
            scale_env.llmctl(&["warm", model.to_str().unwrap()]);
            loaded += 1;
        }
        let first = scale_env.dir.path().join("m0.gguf");
        let status: Vec<Duration> = (0..reps * 3).map(|_| scale_env.timed(&["status"])).collect();
        let runs: Vec<Duration> =
            (0..reps * 2).map(|_| scale_env.timed_run(&["run", "--raw", first.to_str().unwrap(), "x"]).1).collect();
        println!(
            "| {target} | {} | {} | {:.1} MiB |",
            ms(median(&status)),
            ms(median(&runs)),
            mib(scale_env.daemon_rss())
        );
    }
    println!();

    // 8. Through `llmctl serve` vs llama-server directly vs router mode.
    serve_vs_direct_and_router(&env, &server, &demo, reps);

    // 6. Footprint.
    let idle = Bench::new(&server);
    idle.llmctl(&["status"]);
    let idle_rss = idle.daemon_rss();
    let loaded_rss = env.daemon_rss();
    let size = std::fs::metadata(LLMCTL).map(|m| m.len()).unwrap_or(0);
    println!("### Footprint\n");
    println!("| what | size |\n|---|---|");
    println!(
        "| `llmctl` binary ({}) | {:.1} MiB |",
        if LLMCTL.contains("release") { "release" } else { "this build" },
        mib(size)
    );
    println!("| daemon RSS, idle | {:.1} MiB |", mib(idle_rss));
    println!("| daemon RSS, one model loaded and used | {:.1} MiB |", mib(loaded_rss));
}

/// An isolated llmctl environment with its own daemon.
struct Bench {
    dir: tempfile::TempDir,
    server: PathBuf,
    fake_tokens: std::sync::OnceLock<usize>,
    /// Children on loopback TCP (with a key) instead of Unix sockets.
    children_on_tcp: bool,
}

impl Bench {
    fn new(server: &Path) -> Bench {
        let dir = tempfile::Builder::new().prefix("llmctl-bench-").tempdir().unwrap();
        Bench { dir, server: server.to_path_buf(), fake_tokens: std::sync::OnceLock::new(), children_on_tcp: false }
    }

    fn set_fake_tokens(&self, n: usize) {
        let _ = self.fake_tokens.set(n);
    }

    fn command(&self, args: &[&str]) -> Command {
        let root = self.dir.path();
        let mut command = Command::new(LLMCTL);
        command
            .args(args)
            .env("LLMCTL_SOCKET", root.join("llmctl.sock"))
            .env("LLMCTL_STATE_DIR", root.join("state"))
            .env("LLMCTL_CONFIG", root.join("config.toml"))
            .env("LLMCTL_LLAMA_SERVER", &self.server)
            .stdin(Stdio::null());
        if self.children_on_tcp {
            command.env("LLMCTL_CHILDREN_ON_TCP", "1");
        }
        if let Some(n) = self.fake_tokens.get().copied() {
            command.env("FAKE_LLAMA_TOKENS", n.to_string());
        }
        command
    }

    fn llmctl(&self, args: &[&str]) -> String {
        let output = self.command(args).output().unwrap();
        assert!(output.status.success(), "llmctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn timed(&self, args: &[&str]) -> Duration {
        let start = Instant::now();
        self.llmctl(args);
        start.elapsed()
    }

    /// (time to first byte on stdout, time to exit) of a `llmctl` process.
    fn timed_run(&self, args: &[&str]) -> (Duration, Duration) {
        let start = Instant::now();
        let mut child = self.command(args).stdout(Stdio::piped()).spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        stdout.read_exact(&mut first).unwrap();
        let ttft = start.elapsed();
        let mut sink = [0u8; 1 << 16];
        while stdout.read(&mut sink).unwrap() > 0 {}
        assert!(child.wait().unwrap().success());
        (ttft, start.elapsed())
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.llmctl(&["status", "--json"])).unwrap()
    }

    /// Where the first instance's child listens.
    fn instance_target(&self) -> Target {
        let instance = &self.status()["instances"][0];
        match instance["socket"].as_str() {
            Some(socket) => Target::Socket(PathBuf::from(socket)),
            None => Target::Port(instance["port"].as_u64().unwrap() as u16),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("llmctl.sock")
    }

    fn daemon_rss(&self) -> u64 {
        self.status()["daemon"]["rss_bytes"].as_u64().unwrap()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.command(&["shutdown"]).env("LLMCTL_NO_AUTOSTART", "1").output();
    }
}

/// (time to first token, whole request) of a streaming raw completion straight to a server.
/// Where a llama-server listens: a loopback port, or a Unix socket (llmctl's children).
enum Target {
    Port(u16),
    Socket(PathBuf),
}

fn direct_stream(target: &Target, prompt: &str, tokens: usize) -> (Duration, Duration) {
    let body = serde_json::json!({"prompt": prompt, "n_predict": tokens, "temperature": 0, "stream": true});
    target_stream(target, "/completion", &body)
}

/// A streaming POST of `body` to `path` on `target`, as a client on this machine makes it.
fn target_stream(target: &Target, path: &str, body: &serde_json::Value) -> (Duration, Duration) {
    match target {
        Target::Port(port) => sse_stream(&format!("http://127.0.0.1:{port}{path}"), body),
        Target::Socket(socket) => {
            let agent = ureq::Agent::with_parts(
                ureq::Agent::config_builder().build(),
                llmctl::backend::unix::UnixConnector { path: socket.clone() },
                ureq::unversioned::resolver::DefaultResolver::default(),
            );
            stream_with(&agent, &format!("http://localhost{path}"), body)
        }
    }
}

/// (time to first event, whole request) of a streaming POST to `url`.
fn sse_stream(url: &str, body: &serde_json::Value) -> (Duration, Duration) {
    stream_with(&ureq::Agent::new_with_defaults(), url, body)
}

fn stream_with(agent: &ureq::Agent, url: &str, body: &serde_json::Value) -> (Duration, Duration) {
    let start = Instant::now();
    let mut response = agent.post(url).send(body.to_string()).unwrap();
    let mut reader = BufReader::new(response.body_mut().as_reader());
    let mut line = String::new();
    let mut ttft = None;
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.starts_with("data: ") {
            ttft.get_or_insert_with(|| start.elapsed());
            if line.contains("\"stop\":true") || line.starts_with("data: [DONE]") {
                break;
            }
        }
    }
    (ttft.unwrap_or_else(|| start.elapsed()), start.elapsed())
}

/// llama-server on its own: spawn, read the port from its log, poll `/health` every
/// millisecond, then time the first token of a one-token request.
fn cold_start_alone(server: &Path, model: &Path) -> Duration {
    let start = Instant::now();
    let mut child: Child = Command::new(server)
        .args([
            "--model",
            model.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-webui",
            "--log-colors",
            "off",
            "--ctx-size",
            "4096",
            "--parallel",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let drain = std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let port: u16 = rest.trim().rsplit(':').next().unwrap().parse().unwrap();
                    sent = port_tx.send(port).is_ok();
                }
            }
        }
    });
    let port = port_rx.recv().unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    while agent.get(format!("http://127.0.0.1:{port}/health")).call().map(|r| r.status() != 200).unwrap_or(true) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = direct_stream(&Target::Port(port), "Hello", 1);
    let elapsed = start.elapsed();
    child.kill().unwrap();
    child.wait().unwrap();
    drain.join().unwrap();
    elapsed
}

/// Section 10: llama-server built for this CPU (what setup installs: `GGML_NATIVE=ON`, or without AMX
/// where the native build cannot run) against the portable build (`GGML_NATIVE=OFF`), same
/// source, same machine, interleaved.
fn native_vs_portable(reps: usize, demo: &Path, gemma: Option<&PathBuf>) {
    let portable = data_dir().join("llama.cpp/b11434-cpu-portable/llama-server");
    println!("### llama-server for this CPU vs a portable build\n");
    println!("| model | native build | native gen tok/s | portable gen tok/s | ratio | native prompt tok/s | portable prompt tok/s | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    let models: Vec<(&str, PathBuf)> = std::iter::once(("SmolLM2 135M", demo.to_path_buf()))
        .chain(gemma.map(|g| ("Gemma 3 270M", g.clone())))
        .collect();
    for (name, model) in models {
        let Some(portable_server) = Standalone::start(&portable, &model) else {
            println!(
                "| {name} | (no portable build at {}: `llmctl setup --portable`) | | | | | | |",
                portable.display()
            );
            continue;
        };
        // The native build, or where it cannot run here, the native build without AMX.
        let mut native = None;
        for variant in ["cpu", "cpu-noamx"] {
            let binary = data_dir().join(format!("llama.cpp/b11434-{variant}/llama-server"));
            if !binary.exists() {
                continue;
            }
            match Standalone::start(&binary, &model) {
                Some(server) => {
                    native = Some((variant, server));
                    break;
                }
                None => println!("| {name} | {variant}: crashed while loading | | | | | | |"),
            }
        }
        let Some((variant, native_server)) = native else { continue };
        let servers = [native_server, portable_server];
        let (mut native_gen, mut portable_gen, mut native_prompt, mut portable_prompt) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let (gen, prompt) = servers[0].speeds();
            native_gen.push(gen);
            native_prompt.push(prompt);
            let (gen, prompt) = servers[1].speeds();
            portable_gen.push(gen);
            portable_prompt.push(prompt);
        }
        let m = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (ng, pg, np, pp) =
            (m(&mut native_gen), m(&mut portable_gen), m(&mut native_prompt), m(&mut portable_prompt));
        println!("| {name} | {variant} | {ng:.1} | {pg:.1} | {:.3} | {np:.1} | {pp:.1} | {:.3} |", ng / pg, np / pp);
    }
    println!();
}

/// One llama-server started by the bench itself on a loopback port, stopped on drop.
struct Standalone {
    child: Child,
    port: u16,
}

impl Standalone {
    /// None when the server dies before it answers.
    fn start(binary: &Path, model: &Path) -> Option<Standalone> {
        let port = free_port();
        // A build that is not installed is reported by the caller, like one that crashed.
        let child = Command::new(binary)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "-c", "4096", "-np", "1", "--no-webui"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut server = Standalone { child, port };
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        while agent.get(format!("http://127.0.0.1:{port}/health")).call().map(|r| r.status() != 200).unwrap_or(true) {
            if server.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(server)
    }

    /// (generation tokens/s, prompt tokens/s) of a 128-token completion, as the server
    /// times them; the prompt differs each time so nothing comes from the cache.
    fn speeds(&self) -> (f64, f64) {
        static ROUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let round = ROUND.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let prompt =
            format!("Round {round}. Write a long story about a lighthouse keeper and the sea, with many details.");
        let body = serde_json::json!({"prompt": prompt, "n_predict": 128, "temperature": 0, "ignore_eos": true, "cache_prompt": false});
        let mut response =
            ureq::post(format!("http://127.0.0.1:{}/completion", self.port)).send(body.to_string()).unwrap();
        let answer: serde_json::Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        let timings = &answer["timings"];
        (timings["predicted_per_second"].as_f64().unwrap_or(0.0), timings["prompt_per_second"].as_f64().unwrap_or(0.0))
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A llama-server in router mode over `dir`, stopped on drop.
struct Router {
    child: Child,
    port: u16,
}

impl Router {
    fn start(server: &Path, dir: &Path, models_max: u32) -> Router {
        let port = free_port();
        let child = Command::new(server)
            .args(["--models-dir", dir.to_str().unwrap(), "--models-max", &models_max.to_string()])
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--no-webui", "-c", "4096", "-np", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        while agent.get(format!("http://127.0.0.1:{port}/health")).call().map(|r| r.status() != 200).unwrap_or(true) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Router { child, port }
    }

    /// Streams a one-token request for `model` and returns at its first token.
    fn first_token(&self, model: &str) {
        let body = serde_json::json!({"model": model, "prompt": "Hello", "n_predict": 1, "stream": true});
        let mut response =
            ureq::post(format!("http://127.0.0.1:{}/completion", self.port)).send(body.to_string()).unwrap();
        let mut reader = BufReader::new(response.body_mut().as_reader());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 && !line.starts_with("data: ") {
            line.clear();
        }
    }
}

impl Router {
    /// A whole `n`-token completion for `model`, streamed to its end.
    fn complete(&self, model: &str, n: usize) {
        let body = serde_json::json!({"model": model, "prompt": "Hello", "n_predict": n, "stream": true});
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut response =
            agent.post(format!("http://127.0.0.1:{}/completion", self.port)).send(body.to_string()).unwrap();
        assert_eq!(response.status(), 200, "router answered {}", response.status());
        let _ = response.body_mut().read_to_vec();
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        // SIGTERM lets the router stop its own children.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn gemma_model() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("HOME")?).join(".cache/llmctl/test-models/gemma-3-270m-q4_k_m.gguf");
    path.exists().then_some(path)
}

/// One run request straight over the daemon's socket, read to its final message.
fn daemon_request(socket: &Path, spec: &serde_json::Value) {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let request = serde_json::json!({"type": "run", "model": spec, "mode": "raw", "prompt": "x", "system": null, "sampling": {"stop": []}});
    stream
        .write_all(format!("{{\"type\":\"hello\",\"version\":{}}}\n{request}\n", llmctl::protocol::VERSION).as_bytes())
        .unwrap();
    for line in BufReader::new(stream).lines() {
        let line = line.unwrap();
        if line.starts_with("{\"type\":\"done\"") {
            return;
        }
        assert!(!line.starts_with("{\"type\":\"error\""), "{line}");
    }
    panic!("the daemon closed the connection without a final message");
}

/// Runs `request` from `clients` threads, `per_client` times each: (requests/s, p99).
fn load(clients: usize, per_client: usize, request: impl Fn() + Sync) -> (f64, Duration) {
    let (rate, latencies) = load_samples(clients, per_client, request);
    (rate, p99(&latencies))
}

/// As [`load`], with every request's latency.
fn load_samples(clients: usize, per_client: usize, request: impl Fn() + Sync) -> (f64, Vec<Duration>) {
    let start = Instant::now();
    let latencies: Vec<Duration> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    (0..per_client)
                        .map(|_| {
                            let t = Instant::now();
                            request();
                            t.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let rate = latencies.len() as f64 / start.elapsed().as_secs_f64();
    (rate, latencies)
}

/// p50, p90, p99 and the slowest of `samples`, for a table.
fn spread(samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
    [at(0.5), at(0.9), at(0.99), at(1.0)].map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0)).join(" / ")
}

fn medians(samples: &[(Duration, Duration)]) -> (Duration, Duration) {
    let first: Vec<Duration> = samples.iter().map(|s| s.0).collect();
    let whole: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    (median(&first), median(&whole))
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn p99(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[((sorted.len() as f64 * 0.99).ceil() as usize).min(sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn data_dir() -> PathBuf {
    match std::env::var_os("LLMCTL_DATA_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap()).join(".local/share/llmctl"),
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Section 8: streaming through `llmctl serve` (requests forwarded to the child) vs
/// llama-server directly vs its router mode, warm, back to back.
fn serve_vs_direct_and_router(env: &Bench, server: &Path, demo: &Path, reps: usize) {
    let tokens = 128;
    let prompt = "1, 2, 3, 4, 5, 6,";
    let router_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(demo, router_dir.path().join("smol.gguf")).unwrap();
    env.llmctl(&["warm", demo.to_str().unwrap()]);
    let target = env.instance_target();
    let serve_port = free_port();
    let mut serve = env
        .command(&["serve", "--listen", &format!("127.0.0.1:{serve_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", serve_port)).is_err() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let router = Router::start(server, router_dir.path(), 1);
    let demo_name = demo.to_str().unwrap();
    let body = |model: Option<&str>, openai: bool| {
        let mut body = if openai {
            serde_json::json!({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": true})
        } else {
            serde_json::json!({"prompt": prompt, "n_predict": tokens, "temperature": 0, "stream": true})
        };
        if let Some(model) = model {
            body["model"] = serde_json::Value::from(model);
        }
        body
    };
    sse_stream(&format!("http://127.0.0.1:{}/completion", router.port), &body(Some("smol"), false));
    let (mut via_serve, mut direct, mut via_router) = (Vec::new(), Vec::new(), Vec::new());
    // The same request to all three: serve forwards it to the child unchanged. A request
    // that follows another process's generation pays for that process's threads, still busy
    // on the cores for a few milliseconds, so the order changes every repetition (all six
    // orders in turn) and no path always follows the same other one.
    const ORDERS: [[usize; 3]; 6] = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1], [2, 1, 0], [1, 0, 2]];
    for rep in 0..reps {
        for path in ORDERS[rep % ORDERS.len()] {
            match path {
                0 => via_serve.push(sse_stream(
                    &format!("http://127.0.0.1:{serve_port}/completion"),
                    &body(Some(demo_name), false),
                )),
                1 => direct.push(target_stream(&target, "/completion", &body(None, false))),
                _ => via_router.push(sse_stream(
                    &format!("http://127.0.0.1:{}/completion", router.port),
                    &body(Some("smol"), false),
                )),
            }
        }
    }
    let _ = Command::new("kill").args(["-INT", &serve.id().to_string()]).status();
    let _ = serve.wait();
    println!("### Streaming through `llmctl serve`, SmolLM2, {tokens} tokens, warm, back to back\n");
    println!("| path | time to first token | generation tokens/s | tokens/s vs direct |");
    println!("|---|---|---|---|");
    let (direct_ttft, direct_total) = medians(&direct);
    let direct_rate = tokens as f64 / (direct_total - direct_ttft).as_secs_f64();
    for (name, samples) in
        [("llama-server directly", &direct), ("llama-server router mode", &via_router), ("`llmctl serve`", &via_serve)]
    {
        let (ttft, total) = medians(samples);
        let rate = tokens as f64 / (total - ttft).as_secs_f64();
        println!("| {name} | {} | {rate:.1} | {:.3} |", ms(ttft), rate / direct_rate);
    }
    let added =
        |samples: &[(Duration, Duration)]| (medians(samples).0.as_secs_f64() - direct_ttft.as_secs_f64()) * 1000.0;
    println!(
        "\nadded time to first token: through serve **{:+.2} ms**, through router mode **{:+.2} ms**\n",
        added(&via_serve),
        added(&via_router)
    );
}

/// A `llmctl serve` of `env` on a free loopback port, stopped on drop.
struct Serving {
    child: Child,
    port: u16,
}

impl Serving {
    fn start(env: &Bench) -> Serving {
        let port = free_port();
        let child = env
            .command(&["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        Serving { child, port }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// `llmctl events` of one bench daemon, collected on a thread of its own.
struct EventLog {
    seen: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    child: Child,
}

impl EventLog {
    fn follow(env: &Bench) -> EventLog {
        env.llmctl(&["status"]);
        let mut child = env.command(&["events"]).stdout(Stdio::piped()).spawn().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(event);
                }
            }
        });
        while env.status()["daemon"]["event_subscribers"] != 1 {
            std::thread::sleep(Duration::from_millis(5));
        }
        EventLog { seen, child }
    }

    /// The events of `kind` so far, taken out of the log.
    fn take(&self, kind: &str) -> Vec<serde_json::Value> {
        let mut seen = self.seen.lock().unwrap();
        let (taken, kept): (Vec<_>, Vec<_>) = seen.drain(..).partition(|event| event["event"] == kind);
        *seen = kept;
        taken
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A whole `n`-token streamed completion of `model` at `port`, read to its end; the time
/// to its first event.
fn http_complete(agent: &ureq::Agent, port: u16, model: &str, n: usize) -> Duration {
    let body = serde_json::json!({"model": model, "prompt": "Hello", "n_predict": n, "stream": true});
    stream_with(agent, &format!("http://127.0.0.1:{port}/completion"), &body).0
}

/// Sections for issue "one hop": 1-token requests through HTTP at 1, 8 and 64 clients
/// (serve against router mode), `llmctl run`'s first token against `curl -N` to router mode
/// and an in-process client, and the daemon's footprint while it listens.
fn short_requests_and_first_tokens(env: &Bench, server: &Path, demo: &Path, reps: usize) {
    let router_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(demo, router_dir.path().join("smol.gguf")).unwrap();
    env.llmctl(&["warm", demo.to_str().unwrap()]);
    let serving = Serving::start(env);
    let router = Router::start(server, router_dir.path(), 1);
    router.first_token("smol");
    let demo_name = demo.to_str().unwrap();
    println!("### Short requests through HTTP, SmolLM2, 1 token each, warm, one slot\n");
    println!(
        "| clients | serve req/s | router req/s | ratio serve/router | serve p99 | router p99 | serve p50 / p90 / p99 / max ms | router p50 / p90 / p99 / max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for clients in [1usize, 8, 64] {
        let per_client = (256 / clients).max(4);
        let agent: ureq::Agent = ureq::Agent::config_builder().max_idle_connections(128).build().into();
        let (serve_rate, serve) = load_samples(clients, per_client, || {
            http_complete(&agent, serving.port, demo_name, 1);
        });
        let (router_rate, router) = load_samples(clients, per_client, || {
            http_complete(&agent, router.port, "smol", 1);
        });
        println!(
            "| {clients} | {serve_rate:.1} | {router_rate:.1} | **{:.2}** | {} | {} | {} | {} |",
            serve_rate / router_rate,
            ms(p99(&serve)),
            ms(p99(&router)),
            spread(&serve),
            spread(&router)
        );
    }
    println!();

    // `llmctl run` as a whole process, against `curl -N` to router mode (also a process),
    // and against a client in this process straight to the child.
    let target = env.instance_target();
    let prompt = "1, 2, 3, 4, 5, 6,";
    let curl_body =
        serde_json::json!({"model": "smol", "prompt": prompt, "n_predict": 8, "temperature": 0, "stream": true})
            .to_string();
    let router_url = format!("http://127.0.0.1:{}/completion", router.port);
    let (mut via_run, mut via_curl, mut in_process) = (Vec::new(), Vec::new(), Vec::new());
    let args = ["run", "--raw", "--temperature", "0", "-n", "8", demo_name, prompt];
    for _ in 0..reps * 2 {
        via_run.push(env.timed_run(&args).0);
        via_curl.push(timed_first_byte(Command::new("curl").args(["-sN", &router_url, "-d", &curl_body])));
        in_process.push(direct_stream(&target, prompt, 8).0);
    }
    let (run_ttft, curl_ttft, direct_ttft) = (median(&via_run), median(&via_curl), median(&in_process));
    println!("### First token of a whole command, SmolLM2, warm\n");
    println!("| path | time to first token |\n|---|---|");
    println!("| a client in the bench process, straight to the child | {} |", ms(direct_ttft));
    println!("| `curl -N` to router mode (a process) | {} |", ms(curl_ttft));
    println!("| `llmctl run` (a process) | {} |", ms(run_ttft));
    println!(
        "\n`llmctl run` vs curl to router mode: **{:+.2} ms**; vs the in-process client: **{:+.2} ms**\n",
        (run_ttft.as_secs_f64() - curl_ttft.as_secs_f64()) * 1000.0,
        (run_ttft.as_secs_f64() - direct_ttft.as_secs_f64()) * 1000.0
    );
    drop(router);

    // The control plane and the footprint while the daemon listens for HTTP.
    let status: Vec<Duration> = (0..reps * 5).map(|_| env.timed(&["status"])).collect();
    let idle = Bench::new(server);
    idle.llmctl(&["status"]);
    let listening = Serving::start(&idle);
    let rss = idle.daemon_rss();
    drop(listening);
    println!("### Control plane and footprint\n");
    println!("| what | figure |\n|---|---|");
    println!("| `llmctl status`, whole process, median | {} |", ms(median(&status)));
    println!("| daemon RSS, idle, serving HTTP | {:.1} MiB |\n", mib(rss));
    drop(serving);
}

/// The time from spawning `command` to the first byte on its stdout, read to its end.
fn timed_first_byte(command: &mut Command) -> Duration {
    let start = Instant::now();
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    let ttft = start.elapsed();
    let mut sink = Vec::new();
    let _ = stdout.read_to_end(&mut sink);
    let _ = child.wait();
    ttft
}

/// Requests of a seeded trace: each client's list of models, in order.
fn thrash_trace(seed: u64, clients: usize, per_client: usize, models: &[&'static str]) -> Vec<Vec<&'static str>> {
    // xorshift64*: the same trace for the same seed, on every machine.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    (0..clients).map(|_| (0..per_client).map(|_| models[(next() % models.len() as u64) as usize]).collect()).collect()
}

/// The fewest loads, and the cheapest in load seconds, with which one instance at a time can
/// serve `trace`: each load of a model serves every client whose next request is for it, as
/// many in a row as it has (a client's requests go in its order). A shortest path over how
/// far each client has got, weighted by `load_s` of the model loaded.
fn cheapest_loads(trace: &[Vec<&'static str>], load_s: &dyn Fn(&str) -> f64) -> (usize, f64) {
    use std::collections::{BinaryHeap, HashMap};
    // Each client's requests with repeats merged: one load serves a run of them.
    let runs: Vec<Vec<&str>> = trace
        .iter()
        .map(|requests| {
            let mut runs: Vec<&str> = requests.clone();
            runs.dedup();
            runs
        })
        .collect();
    let mut models: Vec<&str> = runs.iter().flatten().copied().collect();
    models.sort_unstable();
    models.dedup();
    let micros = |model: &str| (load_s(model) * 1e6).round() as u64;
    let goal: Vec<usize> = runs.iter().map(Vec::len).collect();
    let mut best: HashMap<Vec<usize>, u64> = HashMap::from([(vec![0; runs.len()], 0)]);
    let mut open = BinaryHeap::from([std::cmp::Reverse((0u64, 0usize, vec![0usize; runs.len()]))]);
    while let Some(std::cmp::Reverse((cost, loads, at))) = open.pop() {
        if at == goal {
            return (loads, cost as f64 / 1e6);
        }
        if best.get(&at).is_some_and(|&known| known < cost) {
            continue;
        }
        for &model in &models {
            let next: Vec<usize> =
                at.iter().zip(&runs).map(|(&p, runs)| p + usize::from(runs.get(p) == Some(&model))).collect();
            let next_cost = cost + micros(model);
            if next != at && best.get(&next).is_none_or(|&known| next_cost < known) {
                best.insert(next.clone(), next_cost);
                open.push(std::cmp::Reverse((next_cost, loads + 1, next)));
            }
        }
    }
    unreachable!("every trace can be served");
}

/// Runs `trace` against the HTTP API at `port` (serve or the router), every client in a
/// thread of its own: requests/s.
fn run_trace(port: u16, trace: &[Vec<&'static str>], n: usize) -> f64 {
    run_trace_timed(port, trace, n).rate
}

/// A run of a trace: its requests/s, and when each request ended, with its model.
struct TraceRun {
    rate: f64,
    ends: Vec<(Duration, &'static str)>,
}

impl TraceRun {
    /// The run's time split at its changes of model, read from the order in which requests
    /// ended: a change is a request that ended for another model than the one before it, and
    /// its gap (from the last end of the old model to the first of the new) holds the drain's
    /// tail, the stop, the load and the new model's first request. The time to the first end
    /// holds the first load; every other gap is service, between two ends of one model.
    fn split(&self, models: &[&str]) -> Split {
        let mut ends = self.ends.clone();
        ends.sort();
        let mut changes = Vec::new();
        let mut service: Vec<(&str, f64)> = Vec::new();
        for pair in ends.windows(2) {
            let gap = (pair[1].0 - pair[0].0).as_secs_f64();
            if pair[0].1 == pair[1].1 {
                service.push((pair[1].1, gap));
            } else {
                changes.push(gap);
            }
        }
        let median = |mut gaps: Vec<f64>| {
            gaps.sort_by(f64::total_cmp);
            gaps.get(gaps.len() / 2).map_or(0.0, |gap| gap * 1000.0)
        };
        Split {
            changes: changes.len(),
            in_changes: changes.iter().sum(),
            median_change_ms: median(changes),
            first_end: ends.first().map_or(0.0, |(end, _)| end.as_secs_f64()),
            serving: service.iter().map(|(_, gap)| gap).sum(),
            median_gap_ms: models
                .iter()
                .map(|&model| median(service.iter().filter(|(m, _)| *m == model).map(|(_, gap)| *gap).collect()))
                .collect(),
        }
    }
}

impl TraceRun {
    /// The order of service: each model with the number of its answers in a row.
    fn order(&self) -> String {
        let mut ends = self.ends.clone();
        ends.sort();
        let mut runs: Vec<(&str, usize)> = Vec::new();
        for (_, model) in ends {
            match runs.last_mut() {
                Some((last, n)) if *last == model => *n += 1,
                _ => runs.push((model, 1)),
            }
        }
        runs.iter().map(|(model, n)| format!("{model}×{n}")).collect::<Vec<_>>().join(" ")
    }
}

/// A [`TraceRun`] split at its changes of model.
struct Split {
    changes: usize,
    in_changes: f64,
    median_change_ms: f64,
    first_end: f64,
    serving: f64,
    /// Per model, in the order asked for: the median gap between two ends of it in a row.
    median_gap_ms: Vec<f64>,
}

/// [`run_trace`], with each request's end kept.
fn run_trace_timed(port: u16, trace: &[Vec<&'static str>], n: usize) -> TraceRun {
    let start = Instant::now();
    let ends = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for requests in trace {
            let ends = &ends;
            scope.spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(600)))
                    .build()
                    .into();
                for &model in requests {
                    http_complete(&agent, port, model, n);
                    ends.lock().unwrap().push((start.elapsed(), model));
                }
            });
        }
    });
    let total: usize = trace.iter().map(Vec::len).sum();
    TraceRun { rate: total as f64 / start.elapsed().as_secs_f64(), ends: ends.into_inner().unwrap() }
}

/// A router over `dir` with `--models-max 1` whose log is kept, to count its loads.
fn router_with_log(server: &Path, dir: &Path, log: &Path) -> Router {
    let port = free_port();
    let log_file = std::fs::File::create(log).unwrap();
    let child = Command::new(server)
        .args(["--models-dir", dir.to_str().unwrap(), "--models-max", "1"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--no-webui", "-c", "4096", "-np", "1"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    while agent.get(format!("http://127.0.0.1:{port}/health")).call().map(|r| r.status() != 200).unwrap_or(true) {
        std::thread::sleep(Duration::from_millis(1));
    }
    Router { child, port }
}

/// Loads the router's log counts (it prints a line for each instance it spawns).
fn router_loads(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches("spawning server instance with name=").count()
}

/// Sections for issue "scheduler": the same seeded trace over three models with room for
/// one through `serve` and through router mode, at 3, 12 and 48 clients, with swaps per
/// request for both; then the starvation trace: four clients keep one model busy for 20 s
/// and a request for another arrives at 2 s.
fn thrash_and_starvation(server: &Path, demo: &Path, gemma: &Path) {
    let seed: u64 = std::env::var("BENCH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(11434);
    let router_dir = tempfile::tempdir().unwrap();
    for (name, file) in [("smol", demo), ("smol2", demo), ("gemma", gemma)] {
        std::os::unix::fs::symlink(file, router_dir.path().join(format!("{name}.gguf"))).unwrap();
    }
    let config = format!(
        "max_instances = 1\n[models.smol]\npath = \"{demo}\"\nctx_size = 4096\n\
         [models.smol2]\npath = \"{demo}\"\nctx_size = 2048\n\
         [models.gemma]\npath = \"{gemma}\"\nctx_size = 4096\n",
        demo = demo.display(),
        gemma = gemma.display()
    );
    let models = ["smol", "smol2", "gemma"];
    println!("### Thrash: the same seeded trace over three models with room for one, 4-token completions over HTTP\n");
    println!("trace seed {seed} (`BENCH_SEED` replays it)\n");
    println!(
        "| clients | requests | llmctl req/s | router req/s | ratio llmctl/router | llmctl swaps/request | router swaps/request | service ms/request smol, smol2, gemma | ceiling req/s | ceiling/router | bound swaps | bound req/s | bound/router |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut splits, mut orders) = (Vec::new(), Vec::new());
    for clients in [3usize, 12, 48] {
        let per_client = (96 / clients).max(2);
        let trace = thrash_trace(seed + clients as u64, clients, per_client, &models);
        let total = clients * per_client;
        let env = Bench::new(server);
        std::fs::write(env.dir.path().join("config.toml"), &config).unwrap();
        env.llmctl(&["status"]);
        let serving = Serving::start(&env);
        let llmctl_run = run_trace_timed(serving.port, &trace, 4);
        let llmctl_rate = llmctl_run.rate;
        let status = env.status();
        let llmctl_swaps = status["daemon"]["swaps"].as_u64().unwrap_or(0);
        // The ceiling of any scheduler on this trace: its requests all for one model (one
        // load, no swap), plus the other two models' loads, the fewest the trace needs.
        let load_s = |name: &str| {
            status["instances"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"] == name)
                .and_then(|i| i["load_ms"].as_u64())
                .unwrap_or(0) as f64
                / 1000.0
        };
        // Each model's service time per request on this trace's concurrency, warm and
        // alone: the trace's requests all for that model, its load made before the clock.
        let service_s = |model: &'static str| {
            env.llmctl(&["warm", model]);
            let all: Vec<Vec<&'static str>> = trace.iter().map(|requests| vec![model; requests.len()]).collect();
            1.0 / run_trace(serving.port, &all, 4)
        };
        let service: Vec<(&str, f64)> = models.iter().map(|&model| (model, service_s(model))).collect();
        let per_request = |name: &str| service.iter().find(|(model, _)| *model == name).map_or(0.0, |(_, s)| *s);
        // The ceiling of any scheduler on this trace: its requests all for one model (one
        // load, no swap), plus one load of each model.
        let ceiling =
            total as f64 / (total as f64 * per_request("smol") + models.iter().map(|&m| load_s(m)).sum::<f64>());
        // The bound of any order of service, even one that knows every request to come: each
        // request's own model's service time, and the loads of the cheapest sequence of loads
        // that lets every client make its requests in its order (its measured load time
        // each); nothing for drains and stops.
        let (fewest_loads, load_seconds) = cheapest_loads(&trace, &|name| load_s(name));
        let trace_service: f64 = trace.iter().flatten().map(|model| per_request(model)).sum();
        let bound = total as f64 / (trace_service + load_seconds);
        drop(serving);
        drop(env);
        let log = router_dir.path().join("router.log");
        let router = router_with_log(server, router_dir.path(), &log);
        let router_run = run_trace_timed(router.port, &trace, 4);
        let router_rate = router_run.rate;
        drop(router);
        let router_swaps = router_loads(&log).saturating_sub(1);
        println!(
            "| {clients} | {total} | {llmctl_rate:.2} | {router_rate:.2} | **{:.2}** | {:.2} | {:.2} | {} | {ceiling:.2} | {:.2} | {} | {bound:.2} | {:.2} |",
            llmctl_rate / router_rate,
            llmctl_swaps as f64 / total as f64,
            router_swaps as f64 / total as f64,
            service.iter().map(|(_, s)| format!("{:.1}", s * 1000.0)).collect::<Vec<_>>().join(", "),
            ceiling / router_rate,
            fewest_loads - 1,
            bound / router_rate
        );
        let (ours, theirs) = (llmctl_run.split(&models), router_run.split(&models));
        let gaps =
            |split: &Split| split.median_gap_ms.iter().map(|ms| format!("{ms:.0}")).collect::<Vec<_>>().join(", ");
        orders.push(format!(
            "| {clients} | llmctl | {} |\n| {clients} | router | {} |",
            llmctl_run.order(),
            router_run.order()
        ));
        splits.push(format!(
            "| {clients} | {:.2} / {:.2} | {} / {} | {:.2} / {:.2} | {:.0} / {:.0} | {:.2} / {:.2} | {} / {} |",
            ours.first_end,
            theirs.first_end,
            ours.changes,
            theirs.changes,
            ours.in_changes,
            theirs.in_changes,
            ours.median_change_ms,
            theirs.median_change_ms,
            ours.serving,
            theirs.serving,
            gaps(&ours),
            gaps(&theirs)
        ));
    }
    println!();
    println!("The same runs split at their changes of model (from the order requests ended in), llmctl / router:\n");
    println!(
        "| clients | first answer s | changes | seconds in changes | median change ms | seconds serving | median ms between two answers of smol, smol2, gemma |\n|---|---|---|---|---|---|---|"
    );
    for row in splits {
        println!("{row}");
    }
    println!("\nThe order of service (each model, with its answers in a row):\n");
    println!("| clients | path | order |\n|---|---|---|");
    for row in orders {
        println!("{row}");
    }
    println!();

    // Starvation: four clients keep smol busy for 20 s; one request for gemma at 2 s.
    println!("### Starvation: four clients keep one model busy for 20 s, a request for another arrives at 2 s\n");
    println!("| path | the other model's first token after its request |\n|---|---|");
    let busy_for = Duration::from_secs(20);
    let starve = |port: u16| -> Duration {
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                    while start.elapsed() < busy_for {
                        http_complete(&agent, port, "smol", 32);
                    }
                });
            }
            let other = scope.spawn(|| {
                std::thread::sleep(Duration::from_secs(2));
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                http_complete(&agent, port, "gemma", 4)
            });
            other.join().unwrap()
        })
    };
    let env = Bench::new(server);
    std::fs::write(env.dir.path().join("config.toml"), &config).unwrap();
    env.llmctl(&["warm", "smol"]);
    let serving = Serving::start(&env);
    let llmctl_wait = starve(serving.port);
    let status = env.status();
    let gemma_load = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "gemma")
        .and_then(|i| i["load_ms"].as_u64())
        .unwrap_or(0);
    let max_wait = status["daemon"]["settings"]["max_wait"].as_str().unwrap_or("auto").to_string();
    drop(serving);
    drop(env);
    let router = Router::start(server, router_dir.path(), 1);
    router.first_token("smol");
    let router_wait = starve(router.port);
    drop(router);
    println!("| llmctl (max_wait {max_wait}; gemma loads in {gemma_load} ms) | {} |", ms(llmctl_wait));
    println!("| llama-server router mode | {} |\n", ms(router_wait));
}

/// Rounds of each path in the admission section.
const ADMISSION_ROUNDS: usize = 5;

/// The median requests/s and the median p99 of several rounds.
fn median_round(rounds: &[(f64, Duration)]) -> (f64, Duration) {
    let mut rates: Vec<f64> = rounds.iter().map(|round| round.0).collect();
    rates.sort_by(f64::total_cmp);
    let p99s: Vec<Duration> = rounds.iter().map(|round| round.1).collect();
    (rates[rates.len() / 2], median(&p99s))
}

/// Section 5: requests/s and p99 through the daemon's socket and straight to the child, at
/// 1, 8 and 64 concurrent clients, fake server at full speed, short generations, the two
/// paths turn about.
fn admission(fake_model: &Path) {
    let admission_env = Bench::new(Path::new(FAKE));
    admission_env.set_fake_tokens(16);
    std::fs::write(admission_env.dir.path().join("config.toml"), "queue_depth = 256\n").unwrap();
    admission_env.llmctl(&["warm", "--parallel", "64", fake_model.to_str().unwrap()]);
    let admission_target = admission_env.instance_target();
    let spec = serde_json::json!({"name": "fake.gguf", "path": fake_model, "load": {"ctx_size": null, "parallel": 64, "gpu_layers": null, "extra_args": []}});
    println!("### Admission, fake server at full speed, 16-token requests (medians of {ADMISSION_ROUNDS} rounds each, turn about)\n");
    println!("| clients | daemon req/s | direct req/s | ratio | daemon p99 | direct p99 | added p99 |");
    println!("|---|---|---|---|---|---|---|");
    for clients in [1usize, 8, 64] {
        let per_client = (512 / clients).max(8);
        let socket = admission_env.socket();
        // Turn about, ADMISSION_ROUNDS times each, medians: on two cores the rate of either
        // path moves by a third from one moment to the next.
        let (mut daemon, mut direct) = (Vec::new(), Vec::new());
        for _ in 0..ADMISSION_ROUNDS {
            daemon.push(load(clients, per_client, || daemon_request(&socket, &spec)));
            direct.push(load(clients, per_client, || {
                direct_stream(&admission_target, "x", 16);
            }));
        }
        let (daemon_rate, daemon_p99) = median_round(&daemon);
        let (direct_rate, direct_p99) = median_round(&direct);
        println!(
            "| {clients} | {daemon_rate:.0} | {direct_rate:.0} | {:.2} | {} | {} | {:+.2} ms |",
            daemon_rate / direct_rate,
            ms(daemon_p99),
            ms(direct_p99),
            (daemon_p99.as_secs_f64() - direct_p99.as_secs_f64()) * 1000.0
        );
    }
    println!();
}

/// (time to first text, whole request, tokens generated) of one streamed chat through
/// `serve`: Ollama's NDJSON lines (`/api/chat`) or OpenAI's events (`/v1/chat/completions`).
fn chat_stream(base: &str, ollama: bool, model: &str, prompt: &str, tokens: usize) -> (Duration, Duration, u64) {
    let messages = serde_json::json!([{"role": "user", "content": prompt}]);
    let (url, body) = if ollama {
        (
            format!("{base}/api/chat"),
            serde_json::json!({"model": model, "messages": messages, "stream": true,
                "options": {"num_predict": tokens, "temperature": 0}}),
        )
    } else {
        (
            format!("{base}/v1/chat/completions"),
            serde_json::json!({"model": model, "messages": messages, "stream": true, "max_tokens": tokens,
                "temperature": 0, "stream_options": {"include_usage": true}}),
        )
    };
    let start = Instant::now();
    let mut response = ureq::Agent::new_with_defaults().post(&url).send(body.to_string()).unwrap();
    let mut reader = BufReader::new(response.body_mut().as_reader());
    let (mut line, mut first, mut generated) = (String::new(), None, 0);
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let json = if ollama { line.trim() } else { line.trim().strip_prefix("data: ").unwrap_or("") };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(json) else { continue };
        let text = if ollama { &event["message"]["content"] } else { &event["choices"][0]["delta"]["content"] };
        if text.as_str().is_some_and(|text| !text.is_empty()) {
            first.get_or_insert_with(|| start.elapsed());
        }
        let count = if ollama { &event["eval_count"] } else { &event["usage"]["completion_tokens"] };
        if let Some(count) = count.as_u64() {
            generated = count;
        }
    }
    (first.unwrap_or_else(|| start.elapsed()), start.elapsed(), generated)
}

/// Section 11: the same chat, streamed through `serve` over Ollama's API and over OpenAI's,
/// turn about, to one warm SmolLM2 instance: the translation's cost in time to first token
/// and tokens/s (the target: within 1 ms and 2 %).
fn ollama_vs_openai_through_serve(env: &Bench, demo: &Path, reps: usize) {
    let tokens = 128;
    // Counting goes on until the token limit, so both sides generate the same number.
    let prompt = "Count from 1 to 500, one number after another, separated by commas.";
    env.llmctl(&["warm", demo.to_str().unwrap()]);
    let port = free_port();
    let mut serve = env
        .command(&["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let base = format!("http://127.0.0.1:{port}");
    let model = demo.to_str().unwrap();
    chat_stream(&base, true, model, prompt, 8);
    let (mut ollama, mut openai) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        ollama.push(chat_stream(&base, true, model, prompt, tokens));
        openai.push(chat_stream(&base, false, model, prompt, tokens));
    }
    let _ = Command::new("kill").args(["-INT", &serve.id().to_string()]).status();
    let _ = serve.wait();
    let summary = |samples: &[(Duration, Duration, u64)]| {
        let pairs: Vec<(Duration, Duration)> = samples.iter().map(|(first, total, _)| (*first, *total)).collect();
        let (first, total) = medians(&pairs);
        let mut generated: Vec<u64> = samples.iter().map(|(_, _, n)| *n).collect();
        generated.sort_unstable();
        let generated = generated[generated.len() / 2];
        (first, generated as f64 / (total - first).as_secs_f64(), generated)
    };
    let (ollama_first, ollama_rate, ollama_tokens) = summary(&ollama);
    let (openai_first, openai_rate, openai_tokens) = summary(&openai);
    println!("### Ollama's API vs the OpenAI API through `llmctl serve`, SmolLM2, {tokens} tokens, warm\n");
    println!("| route | time to first token | generation tokens/s | tokens generated |");
    println!("|---|---|---|---|");
    println!("| `POST /v1/chat/completions` (forwarded) | {} | {openai_rate:.1} | {openai_tokens} |", ms(openai_first));
    println!("| `POST /api/chat` (translated) | {} | {ollama_rate:.1} | {ollama_tokens} |", ms(ollama_first));
    println!(
        "\ntokens/s ratio Ollama/OpenAI: **{:.3}**; added time to first token: **{:+.2} ms** (target: within 2 % and \
         1 ms)\n",
        ollama_rate / openai_rate,
        (ollama_first.as_secs_f64() - openai_first.as_secs_f64()) * 1000.0
    );
}

/// (time to first byte on stdout, the final `done` line) of `llmctl run --json`.
fn timed_json_run(env: &Bench, args: &[&str]) -> (Duration, serde_json::Value) {
    let start = Instant::now();
    let mut child = env.command(args).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let ttft = start.elapsed();
    let mut last = line.clone();
    loop {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        last = line.clone();
    }
    assert!(child.wait().unwrap().success(), "llmctl {args:?}");
    (ttft, serde_json::from_str(&last).unwrap())
}

/// Section 11: a conversation of about 2,000 SmolLM2 tokens, a swap to another model with
/// room for one, and a follow-up sharing the conversation: with saved caches and without,
/// side by side in the same run. The second model is the same file with another context
/// size (an instance of its own), so both loads cost the same.
fn prompt_caches_across_a_swap(server: &Path, demo: &Path, reps: usize) {
    let with_caches = Bench::new(server);
    std::fs::write(with_caches.dir.path().join("config.toml"), "max_instances = 1\n").unwrap();
    let without = Bench::new(server);
    std::fs::write(without.dir.path().join("config.toml"), "max_instances = 1\ncache_budget = \"0\"\n").unwrap();
    let demo = demo.to_str().unwrap();
    let events = [EventLog::follow(&with_caches), EventLog::follow(&without)];
    // (time to first token, the reload in it, prompt tokens computed) of each follow-up,
    // the whole eviction run, and for the side with caches the save and restore events.
    let mut follow_ups: [Vec<(Duration, Duration, u64)>; 2] = [Vec::new(), Vec::new()];
    let mut evictions: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let (mut saves, mut restores, mut slot_bytes, mut prefix_tokens) = (Vec::new(), Vec::new(), 0, 0);
    for round in 0..reps {
        // 225 sentences are about 2,000 tokens; each round's own first words keep any cache
        // of an earlier round from helping.
        let conversation: String = std::iter::once(format!("Conversation {round}."))
            .chain((0..225).map(|i| format!("Item {i} is a {} ball.", ["red", "blue", "green"][i % 3])))
            .collect::<Vec<_>>()
            .join(" ");
        let follow_up = format!("{conversation} Item 225 is a");
        for (side, env) in [&with_caches, &without].into_iter().enumerate() {
            let (_, done) = timed_json_run(env, &["run", "--raw", "--json", "-n", "1", demo, &conversation]);
            prefix_tokens = done["timings"]["prompt_n"].as_u64().unwrap_or(0);
            let started = Instant::now();
            env.llmctl(&["run", "--raw", "-n", "1", "--ctx-size", "2048", demo, "x"]);
            evictions[side].push(started.elapsed());
            let (ttft, done) = timed_json_run(env, &["run", "--raw", "--json", "-n", "1", demo, &follow_up]);
            let status = env.status();
            let instance = status["instances"].as_array().unwrap().iter().find(|i| i["ctx_size"].is_null()).cloned();
            let reload = Duration::from_millis(instance.and_then(|i| i["load_ms"].as_u64()).unwrap_or(0));
            follow_ups[side].push((ttft, reload, done["timings"]["prompt_n"].as_u64().unwrap_or(0)));
        }
        for saved in events[0].take("saved").iter().filter(|e| e["path"] == demo) {
            saves.push(Duration::from_millis(saved["ms"].as_u64().unwrap_or(0)));
            slot_bytes = saved["bytes"].as_u64().unwrap_or(0);
        }
        for restored in events[0].take("restored") {
            restores.push(Duration::from_millis(restored["ms"].as_u64().unwrap_or(0)));
        }
    }
    let summary = |samples: &[(Duration, Duration, u64)]| {
        let ttft = median(&samples.iter().map(|s| s.0).collect::<Vec<_>>());
        let reload = median(&samples.iter().map(|s| s.1).collect::<Vec<_>>());
        let rest = median(&samples.iter().map(|s| s.0.saturating_sub(s.1)).collect::<Vec<_>>());
        let mut computed: Vec<u64> = samples.iter().map(|s| s.2).collect();
        computed.sort();
        (ttft, reload, rest, computed[computed.len() / 2])
    };
    let on = summary(&follow_ups[0]);
    let off = summary(&follow_ups[1]);
    println!("### Prompt caches across a swap, SmolLM2, a {prefix_tokens}-token conversation, room for one model\n");
    println!(
        "| follow-up after the swap | time to first token | the reload in it | the rest | prompt tokens computed |"
    );
    println!("|---|---|---|---|---|");
    for (name, (ttft, reload, rest, computed)) in [("caches saved and restored", on), ("`cache_budget = \"0\"`", off)] {
        println!("| {name} | {} | {} | {} | {computed} |", ms(ttft), ms(reload), ms(rest));
    }
    println!(
        "\nthe rest, with caches / without: **{:.3}**",
        on.2.as_secs_f64() / off.2.as_secs_f64().max(f64::EPSILON)
    );
    let (eviction_on, eviction_off) = (median(&evictions[0]), median(&evictions[1]));
    println!("\n| the swap (`run` on the other model, whole process) | median |\n|---|---|");
    println!("| saving the evicted slot first | {} |", ms(eviction_on));
    println!("| `cache_budget = \"0\"` | {} |", ms(eviction_off));
    println!(
        "\nsaving adds **{:+.1} ms** to the eviction; save {} and restore {} (medians, llmctl's own timing: the \
         child's write or read, and the SHA-256); slot file {:.1} MiB\n",
        (eviction_on.as_secs_f64() - eviction_off.as_secs_f64()) * 1000.0,
        if saves.is_empty() { "-".to_string() } else { ms(median(&saves)) },
        if restores.is_empty() { "-".to_string() } else { ms(median(&restores)) },
        mib(slot_bytes)
    );
}
