//! The man pages and shell completions are generated from the clap definition; this test
//! fails when the committed copies drift. Run with `LLMCTL_UPDATE_DOCS=1` to rewrite them.

use std::path::Path;

fn generated() -> Vec<(String, Vec<u8>)> {
    let command = llmctl::cli::command();
    let mut files = Vec::new();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page).unwrap();
    files.push(("man/llmctl.1".to_string(), page));
    for sub in command.get_subcommands() {
        let name = format!("llmctl-{}", sub.get_name());
        let mut page = Vec::new();
        let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(sub.clone().name(static_name)).render(&mut page).unwrap();
        files.push((format!("man/{name}.1"), page));
    }
    for (shell, file) in [
        (clap_complete::Shell::Bash, "completions/llmctl.bash"),
        (clap_complete::Shell::Zsh, "completions/_llmctl"),
        (clap_complete::Shell::Fish, "completions/llmctl.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command.clone(), "llmctl", &mut script);
        files.push((file.to_string(), script));
    }
    files
}

#[test]
fn man_pages_and_completions_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var_os("LLMCTL_UPDATE_DOCS").is_some();
    let mut stale = Vec::new();
    for (relative, contents) in generated() {
        let path = root.join(&relative);
        if std::fs::read(&path).ok().as_deref() != Some(&contents[..]) {
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &contents).unwrap();
            } else {
                stale.push(relative);
            }
        }
    }
    assert!(stale.is_empty(), "out of date (rerun with LLMCTL_UPDATE_DOCS=1): {stale:?}");
}

#[test]
fn the_man_page_has_the_exit_status_table() {
    let page = String::from_utf8(generated().remove(0).1).unwrap();
    for code in ["65", "66", "69", "70", "73", "75", "124", "130"] {
        assert!(page.contains(code), "exit status {code} missing from the man page");
    }
}
