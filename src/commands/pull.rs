//! `llmctl pull OWNER/REPO[:QUANT]`: download a GGUF model from the Hugging Face Hub into
//! the models directory and record it, so that the same name works as MODEL everywhere.
//! The network and the file checks are `hub`'s; the record is `library`'s.

use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cli::PullArgs;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::library::{self, Pull, PulledFile, RepoName};

pub fn run(context: &Context, args: PullArgs) -> Result<()> {
    let wanted = RepoName::parse(&args.model).map_err(|message| Error::Usage { message })?;
    let hub = Hub::from_env();
    let listing = hub.list(&wanted.repo)?;
    let files = crate::hub::choose(&wanted.repo, &listing, wanted.tag.as_deref())?;
    let dir = library::repo_dir(&context.paths, &wanted.repo);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let result = download_all(&hub, &wanted, &files, &dir);
    if result.is_err() {
        // Directories this pull created and left empty go; a `.part` to resume from stays.
        let _ = std::fs::remove_dir(&dir);
        if let Some(owner_dir) = dir.parent() {
            let _ = std::fs::remove_dir(owner_dir);
        }
    }
    let pulled_files = result?;
    // A file that is not a model is refused now, not when it is first run.
    let first = dir.join(&pulled_files[0].name);
    let info = match crate::gguf::inspect(&first) {
        Ok(info) => info,
        Err(reason) => {
            for file in &pulled_files {
                let _ = std::fs::remove_file(dir.join(&file.name));
            }
            return Err(Error::BadModel { path: first, reason: format!("{reason} (the download was deleted)") });
        }
    };
    let size: u64 = pulled_files.iter().map(|file| file.size).sum();
    let pull = Pull {
        tag: wanted.tag.clone(),
        endpoint: hub.endpoint.clone(),
        files: pulled_files,
        pulled_at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
    };
    library::record(&dir, &wanted.repo, pull)
        .map_err(|e| Error::io(format!("cannot write the manifest in {}", dir.display()), e))?;
    // One line on success, to stderr even off a terminal: a script's log says what arrived
    // and where; stdout stays empty. The name is the one it now answers to as MODEL.
    let name = match &wanted.tag {
        Some(tag) => format!("{}:{tag}", wanted.repo),
        None => wanted.repo.clone(),
    };
    let hint = if std::io::stderr().is_terminal() {
        format!("; run it with `llmctl run {name} PROMPT`")
    } else {
        String::new()
    };
    eprintln!("pulled {name} ({}, {}) to {}{hint}", info.quantization(), crate::budget::human(size), first.display());
    Ok(())
}

fn download_all(
    hub: &Hub,
    wanted: &RepoName,
    files: &[crate::hub::RemoteFile],
    dir: &std::path::Path,
) -> Result<Vec<PulledFile>> {
    let mut pulled_files = Vec::new();
    for file in files {
        let path = hub.download(&wanted.repo, file, dir)?;
        let size = std::fs::metadata(&path).map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?.len();
        pulled_files.push(PulledFile {
            name: file.local_name().to_string(),
            remote_name: file.name.clone(),
            size,
            sha256: file.sha256.clone(),
        });
    }
    Ok(pulled_files)
}
