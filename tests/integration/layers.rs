//! The layers of `src/`, checked: each module may use only modules of its own layer or
//! below, and the modules of the foundation never use one another in a circle. The table
//! in [`LAYERS`] is the map a newcomer reads; a `use` that goes up fails this test and
//! names the file, the module it reached and both layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// From the top down: a module belongs to the layer of the longest prefix that names it.
const LAYERS: &[(&str, &[&str])] = &[
    ("the entry point", &["", "main"]),
    ("commands", &["commands"]),
    ("the command line's definition", &["cli"]),
    ("first-use setup", &["setup"]),
    ("the client", &["client"]),
    ("the daemon's start and its Unix socket", &["daemon", "daemon/listener"]),
    ("a connection", &["daemon/connection"]),
    ("requests by family, and the HTTP API", &["daemon/handlers", "daemon/serve"]),
    ("a request's life on a slot", &["daemon/work"]),
    ("admission and the peer", &["daemon/admission", "daemon/peer"]),
    ("the daemon's threads", &["daemon/scheduler", "daemon/supervisor", "daemon/report"]),
    ("what the daemon's threads share", &["daemon/shared"]),
    ("the daemon's parts", &["daemon/listeners", "daemon/state", "daemon/metrics", "daemon/queue"]),
    ("the instance table and workers", &["instance", "instance/table", "instance/worker"]),
    ("what workers use", &["instance/outcome", "instance/cache_store", "instance/policy"]),
    (
        "what an instance is made of",
        &["instance/inbox", "instance/lease", "instance/view", "instance/state", "instance/cache"],
    ),
    ("talking to llama-server", &["backend"]),
    ("the llama-server binary", &["llama_server"]),
    ("processes", &["process"]),
];

/// Everything else is the foundation: small modules that know nothing above them.
const FOUNDATION: &str = "the foundation";

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are `a/b`; `lib.rs` and `main.rs` are the root.
fn module_of(file: &Path) -> String {
    let relative = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = relative.iter().map(|part| part.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("/")
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            into.push(path);
        }
    }
}

/// The code without comments, string literals and `#[cfg(test)]` modules (tests may reach
/// anywhere).
fn code_of(text: &str) -> String {
    // A test module is inline (its line ends in `{`) and comes last.
    let test_module = text.match_indices("#[cfg(test)]\n").find(|(at, marker)| {
        let next = text[at + marker.len()..].lines().next().unwrap_or("");
        next.contains("mod ") && next.trim_end().ends_with('{')
    });
    let text = match test_module {
        Some((at, _)) => &text[..at],
        None => text,
    };
    let mut code = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        code.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
                code.push_str("\"\"");
            }
            // A char literal ('"' or '{') must not open a string or a group; a lifetime
            // ('a) is left alone.
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                let length = if rest.starts_with('\\') {
                    rest.find('\'').map(|i| i + 1)
                } else {
                    (rest.chars().nth(1) == Some('\'')).then_some(2)
                };
                match length {
                    Some(length) => {
                        for _ in 0..length {
                            chars.next();
                        }
                        code.push_str("' '");
                    }
                    None => code.push(c),
                }
            }
            _ => code.push(c),
        }
    }
    code
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into whole paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else { return vec![tree.split(" as ").next().unwrap().trim().to_string()] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|part| !part.trim().is_empty())
        .flat_map(|part| expand(part).into_iter().map(|path| format!("{prefix}{path}")))
        .collect()
}

/// Every path the code names that starts at the crate or at a parent module.
fn paths_in(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        rest = &rest[at + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest.find(';').unwrap_or(rest.len());
        paths.extend(expand(&rest[..end].replace(char::is_whitespace, "")));
    }
    // Paths used inline (`crate::process::rss_bytes(pid)`).
    for (at, _) in code.match_indices("crate::").chain(code.match_indices("super::")) {
        if code[..at].ends_with("super::") || code[..at].ends_with("use ") {
            continue;
        }
        let path: String = code[at..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
        paths.push(path);
    }
    paths
}

/// The module a path reaches from the module `from`: the longest run of its segments that
/// is a module (`super` is the parent, for a `mod.rs` as for any other file).
fn target_of(path: &str, from: &str, modules: &BTreeSet<String>) -> Option<String> {
    let mut segments: Vec<&str> = path.split("::").filter(|segment| !segment.is_empty()).collect();
    let mut base: Vec<String> = match segments.first() {
        Some(&"crate") => {
            segments.remove(0);
            Vec::new()
        }
        Some(&"super") => {
            let mut base: Vec<String> = from.split('/').filter(|s| !s.is_empty()).map(String::from).collect();
            while segments.first() == Some(&"super") {
                segments.remove(0);
                base.pop();
            }
            base
        }
        _ => return None,
    };
    let mut found = base.join("/");
    for segment in segments {
        base.push(segment.to_string());
        let candidate = base.join("/");
        if !modules.contains(&candidate) {
            break;
        }
        found = candidate;
    }
    Some(found)
}

fn layer_of(module: &str) -> (usize, &'static str) {
    let mut best: Option<(usize, usize, &'static str)> = None;
    for (rank, (name, prefixes)) in LAYERS.iter().enumerate() {
        for prefix in *prefixes {
            let matches = module == *prefix || (!prefix.is_empty() && module.starts_with(&format!("{prefix}/")));
            if matches && best.is_none_or(|(length, _, _)| prefix.len() >= length) {
                best = Some((prefix.len(), rank, name));
            }
        }
    }
    best.map_or((LAYERS.len(), FOUNDATION), |(_, rank, name)| (rank, name))
}

/// Which module uses which, across modules (a module's use of its own children and items
/// is not an edge).
fn uses() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().map(|file| module_of(file)).collect();
    let mut uses: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for file in &files {
        let from = module_of(file);
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for path in paths_in(&code) {
            let Some(target) = target_of(&path, &from, &modules) else { continue };
            if target != from && !target.starts_with(&format!("{from}/")) && !target.is_empty() {
                let relative = file.strip_prefix(src()).unwrap().to_path_buf();
                uses.entry(from.clone()).or_default().entry(target).or_insert(relative);
            }
        }
    }
    uses
}

#[test]
fn every_module_uses_only_its_own_layer_and_those_below() {
    let mut upward = Vec::new();
    for (from, targets) in uses() {
        let (from_rank, from_layer) = layer_of(&from);
        for (target, file) in targets {
            let (target_rank, target_layer) = layer_of(&target);
            if target_rank < from_rank {
                upward.push(format!(
                    "src/{} ({from_layer}) uses {target} ({target_layer}, a layer above)",
                    file.display()
                ));
            }
        }
    }
    assert!(upward.is_empty(), "uses that go up a layer:\n{}", upward.join("\n"));
}

#[test]
fn the_foundation_has_no_circle() {
    let uses = uses();
    let foundation: BTreeMap<&String, Vec<&String>> = uses
        .iter()
        .filter(|(module, _)| layer_of(module).1 == FOUNDATION)
        .map(|(module, targets)| {
            (module, targets.keys().filter(|target| layer_of(target).1 == FOUNDATION).collect::<Vec<_>>())
        })
        .collect();
    // Depth-first search; a module met again on the current path closes a circle.
    fn visit<'a>(
        module: &'a String,
        graph: &BTreeMap<&'a String, Vec<&'a String>>,
        path: &mut Vec<&'a String>,
        done: &mut BTreeSet<&'a String>,
        circles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|m| *m == module) {
            let circle: Vec<&str> = path[at..].iter().chain([&module]).map(|m| m.as_str()).collect();
            circles.push(circle.join(" -> "));
            return;
        }
        if !done.insert(module) {
            return;
        }
        path.push(module);
        for target in graph.get(module).into_iter().flatten() {
            visit(target, graph, path, done, circles);
        }
        path.pop();
    }
    let (mut done, mut circles) = (BTreeSet::new(), Vec::new());
    for module in foundation.keys() {
        visit(module, &foundation, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(circles.is_empty(), "the foundation's modules use one another in a circle:\n{}", circles.join("\n"));
}

/// The checker itself: a `use` tree expands to every path in it, and comments, strings
/// and test modules are not code.
#[test]
fn the_checker_reads_use_trees_and_skips_what_is_not_code() {
    assert_eq!(
        expand("crate::{a::{b,c::D},e}"),
        vec!["crate::a::b".to_string(), "crate::a::c::D".to_string(), "crate::e".to_string()]
    );
    let code =
        code_of("use crate::x; // crate::y\nlet s = \"crate::z\";\n#[cfg(test)]\nmod tests {\n    use crate::w;\n}\n");
    assert_eq!(paths_in(&code), vec!["crate::x".to_string()]);
    let modules: BTreeSet<String> = ["daemon", "daemon/shared", "instance"].iter().map(|m| m.to_string()).collect();
    assert_eq!(target_of("super::shared::Shared", "daemon/work", &modules).as_deref(), Some("daemon/shared"));
    assert_eq!(target_of("super::Message", "instance/lease", &modules).as_deref(), Some("instance"));
    assert_eq!(target_of("crate::instance::Message", "daemon", &modules).as_deref(), Some("instance"));
    assert_eq!(layer_of("daemon/serve/ollama").1, "requests by family, and the HTTP API");
    assert_eq!(layer_of("gguf").1, FOUNDATION);
}
