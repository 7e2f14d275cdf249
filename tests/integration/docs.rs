//! The man pages and shell completions are generated from the clap definition; this test
//! fails when the committed copies drift. Run with `LLMCTL_UPDATE_DOCS=1` to rewrite them.

use std::path::Path;

fn generated() -> Vec<(String, Vec<u8>)> {
    let command = llmctl::cli::command();
    let mut files = Vec::new();
    files.push(("man/llmctl.1".to_string(), main_page(&command)));
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
        let script =
            with_model_names(shell, String::from_utf8(script).unwrap(), &command, &model_subcommands(&command));
        files.push((file.to_string(), script.into_bytes()));
    }
    files
}

/// llmctl(1): clap_mangen's sections, except that what follows the options in `--help`
/// becomes one man page section per heading of `cli::help_sections()` (CONFIGURATION,
/// ENVIRONMENT, FILES, EXIT STATUS) instead of a single EXTRA section.
fn main_page(command: &clap::Command) -> Vec<u8> {
    let man = clap_mangen::Man::new(command.clone());
    let sections: [RenderSection; 6] = [
        clap_mangen::Man::render_title,
        clap_mangen::Man::render_name_section,
        clap_mangen::Man::render_synopsis_section,
        clap_mangen::Man::render_description_section,
        clap_mangen::Man::render_options_section,
        clap_mangen::Man::render_subcommands_section,
    ];
    let mut page = Vec::new();
    for render in sections {
        let mut section = Vec::new();
        render(&man, &mut section).unwrap();
        // Every piece clap_mangen renders opens with the same preamble; the page needs it once.
        let section =
            if page.is_empty() { &section[..] } else { section.strip_prefix(ROFF_PREAMBLE).unwrap_or(&section) };
        page.extend_from_slice(section);
    }
    for (heading, body) in llmctl::cli::help_sections() {
        page.extend_from_slice(format!(".SH \"{heading}\"\n.nf\n").as_bytes());
        for line in body.lines() {
            page.extend_from_slice(roff_line(line).as_bytes());
            page.push(b'\n');
        }
        page.extend_from_slice(b".fi\n");
    }
    let mut version = Vec::new();
    man.render_version_section(&mut version).unwrap();
    page.extend_from_slice(version.strip_prefix(ROFF_PREAMBLE).unwrap_or(&version));
    page
}

/// One of clap_mangen's `Man::render_*` methods.
type RenderSection = fn(&clap_mangen::Man, &mut dyn std::io::Write) -> std::io::Result<()>;

/// What the roff crate writes at the top of every document it renders.
const ROFF_PREAMBLE: &[u8] = b".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// One line of preformatted text as roff reads it literally: backslashes escaped, and a
/// leading `.` or `'` kept from being read as a request.
fn roff_line(line: &str) -> String {
    let escaped = line.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// Subcommands whose first argument is a local MODEL (not `pull`, whose MODEL is on the Hub).
fn model_subcommands(command: &clap::Command) -> Vec<String> {
    let mut built = command.clone();
    built.build();
    built
        .get_subcommands()
        .filter(|sub| {
            sub.get_name() != "pull" && sub.get_positionals().next().is_some_and(|arg| arg.get_id() == "model")
        })
        .map(|sub| sub.get_name().to_string())
        .collect()
}

/// The options that take a value (`-n`, `--max-tokens`, ...), of `subcommand` or, with
/// none, the global ones: bash must skip their values to find MODEL.
fn value_options(command: &clap::Command, subcommand: Option<&str>) -> Vec<String> {
    let mut built = command.clone();
    built.build();
    let target = match subcommand {
        Some(name) => built.find_subcommand(name).expect("a subcommand of llmctl").clone(),
        None => built.clone(),
    };
    let mut names = Vec::new();
    for arg in target.get_arguments() {
        let global = arg.is_global_set();
        let wanted = if subcommand.is_some() { !global } else { global };
        if arg.is_positional() || !wanted || !arg.get_action().takes_values() {
            continue;
        }
        names.extend(arg.get_short_and_visible_aliases().into_iter().flatten().map(|c| format!("-{c}")));
        names.extend(arg.get_long_and_visible_aliases().into_iter().flatten().map(|l| format!("--{l}")));
    }
    names
}

/// clap_complete completes MODEL as a file only; this teaches each shell to offer the names
/// `llmctl ls --names` prints (aliases, pulled models, files of the models directory) too.
fn with_model_names(
    shell: clap_complete::Shell,
    script: String,
    command: &clap::Command,
    subcommands: &[String],
) -> String {
    let list = subcommands.join(" ");
    match shell {
        clap_complete::Shell::Bash => {
            let global = value_options(command, None).join(" ");
            let per_subcommand: String = subcommands
                .iter()
                .map(|sub| format!("            {sub}) takes_value=\" {} \" ;;\n", value_options(command, Some(sub)).join(" ")))
                .collect();
            script
                + &format!(
                    r#"
# Moves `i` past the option at COMP_WORDS[i]: with its value when it is in the list $1, or
# written `--option=value` (which bash splits into three words at the `=`).
_llmctl_skip_option() {{
    if [[ ${{COMP_WORDS[i+1]}} == "=" ]]; then
        (( i += 3 ))
    elif [[ $1 == *" ${{COMP_WORDS[i]}} "* ]]; then
        (( i += 2 ))
    else
        (( i += 1 ))
    fi
}}

# MODEL, the first argument of {list}: the names `llmctl ls --names` prints, and files.
# MODEL is the first word after the subcommand that is neither an option nor the value of
# an option that takes one (`llmctl run -n 64 de<TAB>` offers demo).
_llmctl_with_models() {{
    _llmctl "$@"
    local cur="${{COMP_WORDS[COMP_CWORD]}}"
    if declare -F _get_comp_words_by_ref >/dev/null; then
        _get_comp_words_by_ref -n : cur
    fi
    [[ ${{cur}} == -* ]] && return
    local global_takes_value=" {global} " takes_value word i=1
    # The subcommand: the first word that is not a global option or its value.
    while (( i < COMP_CWORD )); do
        word="${{COMP_WORDS[i]}}"
        [[ ${{word}} == -* ]] || break
        _llmctl_skip_option "${{global_takes_value}}"
    done
    (( i >= COMP_CWORD )) && return
    case "${{COMP_WORDS[i]}}" in
{per_subcommand}            *) return ;;
    esac
    takes_value+="${{global_takes_value}}"
    (( i++ ))
    while (( i < COMP_CWORD )); do
        word="${{COMP_WORDS[i]}}"
        # A word that is no option is MODEL, given already.
        [[ ${{word}} == -* ]] || return
        _llmctl_skip_option "${{takes_value}}"
    done
    # Past the current word: it is the value of the option before it.
    (( i > COMP_CWORD )) && return
    local IFS=$'\n'
    COMPREPLY=( $(compgen -W "$(llmctl ls --names 2>/dev/null)" -- "${{cur}}") $(compgen -f -- "${{cur}}") )
    if declare -F __ltrim_colon_completions >/dev/null; then
        __ltrim_colon_completions "${{cur}}"
    fi
}}
complete -F _llmctl_with_models -o bashdefault -o default llmctl
"#
                )
        }
        clap_complete::Shell::Zsh => {
            let helper = r#"(( $+functions[_llmctl_models] )) ||
_llmctl_models() {
    local -a models
    models=(${(f)"$(_call_program models llmctl ls --names 2>/dev/null)"})
    models=(${models//:/\:})
    _describe -t models 'model' models
    _files
}

"#;
            let mut out = String::new();
            let mut section = "";
            for line in script.lines() {
                if let Some(name) = line.trim_start().strip_prefix('(').and_then(|rest| rest.strip_suffix(')')) {
                    section = name;
                }
                let is_model = subcommands.iter().any(|sub| sub == section);
                if is_model && (line.starts_with("':model -- ") || line.starts_with("'::model -- ")) && line.ends_with(":_default' \\") {
                    out.push_str(&line.replace(":_default' \\", ":_llmctl_models' \\"));
                } else {
                    if line.starts_with("if [ \"$funcstack[1]\" = \"_llmctl\" ]") {
                        out.push_str(helper);
                    }
                    out.push_str(line);
                }
                out.push('\n');
            }
            out
        }
        clap_complete::Shell::Fish => {
            script
                + &format!(
                    "complete -c llmctl -n \"__fish_llmctl_using_subcommand {list}\" -a \"(llmctl ls --names 2>/dev/null)\" -d 'model'\n"
                )
        }
        _ => script,
    }
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

/// The README's exit status table is the table in `error.rs`, row for row.
#[test]
fn the_readme_exit_status_table_is_the_one_in_error_rs() {
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("## Exit status\n").nth(1).unwrap().split("\n## ").next().unwrap();
    let rows: Vec<String> = section
        .lines()
        .filter(|line| line.starts_with("| ") && !line.starts_with("| code"))
        .map(String::from)
        .collect();
    let table: Vec<String> =
        llmctl::error::EXIT_STATUSES.iter().map(|(code, meaning)| format!("| {code} | {meaning} |")).collect();
    assert_eq!(rows, table, "README.md's exit status table differs from error::EXIT_STATUSES");
}

#[test]
fn the_man_page_has_configuration_environment_files_and_exit_status_sections() {
    let page = String::from_utf8(generated().remove(0).1).unwrap();
    for heading in ["CONFIGURATION", "ENVIRONMENT", "FILES", "EXIT STATUS"] {
        assert!(page.contains(&format!(".SH \"{heading}\"\n")), "no {heading} section in llmctl(1)");
    }
    for key in ["default_model", "cors_origins", "embeddings", "reranking", "LLMCTL_SOCKET", "HF_TOKEN", "config.toml"]
    {
        assert!(page.contains(&key.replace('-', "\\-")), "{key} missing from llmctl(1)");
    }
}

#[test]
fn long_help_has_the_same_sections_as_the_man_page() {
    let help = llmctl::cli::command().term_width(1000).render_long_help().to_string();
    for (heading, body) in llmctl::cli::help_sections() {
        assert!(help.contains(&format!("{heading}:\n{body}")), "{heading} missing from --help:\n{help}");
    }
}

/// The systemd user unit in README.md: the three sections, and an ExecStart that runs a
/// subcommand llmctl has.
#[test]
fn the_readme_systemd_unit_is_well_formed() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let unit =
        readme.split("```ini\n").nth(1).and_then(|rest| rest.split("```").next()).expect("an ini block in README.md");
    let sections: Vec<&str> = unit.lines().filter(|line| line.starts_with('[')).collect();
    assert_eq!(sections, ["[Unit]", "[Service]", "[Install]"], "{unit}");
    for line in unit.lines().filter(|line| !line.is_empty() && !line.starts_with('[')) {
        assert!(line.split_once('=').is_some_and(|(key, value)| !key.is_empty() && !value.is_empty()), "{line}");
    }
    let exec_start = unit.lines().find_map(|line| line.strip_prefix("ExecStart=")).expect("ExecStart");
    let words: Vec<&str> = exec_start.split_whitespace().collect();
    assert!(words[0].ends_with("/llmctl"), "{exec_start}");
    let command = llmctl::cli::command();
    assert!(command.find_subcommand(words[1]).is_some(), "no subcommand {}", words[1]);
    assert!(unit.contains("Restart=on-failure") && unit.contains("WantedBy=default.target"), "{unit}");
}
