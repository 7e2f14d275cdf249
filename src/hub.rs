//! The Hugging Face Hub, as `llmctl pull` uses it: list a repository's files, pick the GGUF
//! for a quantization the way llama.cpp's `-hf` does, and download it so that no half file
//! ever carries its final name.
//!
//! `GET {endpoint}/api/models/OWNER/REPO?blobs=true` lists the files with sizes and LFS
//! digests; `GET {endpoint}/OWNER/REPO/resolve/main/FILE` downloads one. A download goes to
//! `FILE.part`, resumes from there with a Range request, is checked for size and SHA-256,
//! and only then is renamed. The endpoint comes from `HF_ENDPOINT`, a token from
//! `HF_TOKEN`. This module does the network and file work; the manifest is `library`'s.
//! [`Hub::plan`] and [`Hub::pull`] are the whole of a pull, for `llmctl pull` and for
//! `serve`'s `POST /api/pull`, which follows its progress.

use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::library::DEFAULT_TAG;
use crate::percent;
use crate::sha256::Sha256;

pub(crate) const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// How long a connection may take, and how long the Hub may go silent mid-download.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const BUFFER: usize = 1 << 20;

/// A file of a Hub repository, from its listing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RemoteFile {
    /// Its path in the repository.
    pub name: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

impl RemoteFile {
    /// The name it gets in the local repository directory.
    pub(crate) fn local_name(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or(&self.name)
    }
}

#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: Option<String>,
    size: Option<u64>,
}

pub(crate) struct Hub {
    pub endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Hub {
    /// The Hub named by `HF_ENDPOINT` (default huggingface.co), with `HF_TOKEN` if set.
    pub(crate) fn from_env() -> Hub {
        let non_empty = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
        let endpoint = non_empty("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .http_status_as_error(false)
            // Redirects are followed by `Hub::get`, which decides where the token goes.
            .max_redirects(0)
            .user_agent(concat!("llmctl/", env!("CARGO_PKG_VERSION")))
            .build();
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: non_empty("HF_TOKEN").map(|token| token.trim().to_string()),
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// GETs `url`, with `range` on every hop, following redirects here rather than in ureq:
    /// the token goes only to the endpoint's own origin (scheme, host and port), never to
    /// the CDN the Hub redirects downloads to, nor to another port of the same host (ureq's
    /// `SameHost` compares host names alone). The error is a reason for the user.
    fn get(&self, url: &str, range: Option<&str>) -> std::result::Result<ureq::http::Response<ureq::Body>, String> {
        let endpoint_origin = origin(&self.endpoint);
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut request = self.agent.get(&url);
            if let Some(range) = range {
                request = request.header("Range", range);
            }
            if let Some(token) =
                self.token.as_ref().filter(|_| endpoint_origin.is_some() && origin(&url) == endpoint_origin)
            {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            let response = request.call().map_err(|e| format!("cannot reach {}: {e}", self.endpoint))?;
            let location = response.headers().get("location").and_then(|value| value.to_str().ok());
            match (response.status().as_u16(), location) {
                (301 | 302 | 303 | 307 | 308, Some(location)) => url = resolve(&url, location)?,
                _ => return Ok(response),
            }
        }
        Err(format!("{} redirected more than {MAX_REDIRECTS} times", self.endpoint))
    }

    fn denied_or_missing(&self, repo: &str, status: u16, what: &str) -> Option<Error> {
        match status {
            401 | 403 => Some(Error::HubDenied { repo: repo.to_string(), status, token_set: self.token.is_some() }),
            404 => Some(Error::HubNotFound {
                repo: repo.to_string(),
                reason: format!("{what} was not found on {}", self.endpoint),
            }),
            _ => None,
        }
    }

    /// The files of `repo`.
    pub(crate) fn list(&self, repo: &str) -> Result<Vec<RemoteFile>> {
        let url = format!("{}/api/models/{repo}?blobs=true", self.endpoint);
        let unreachable = |reason: String| Error::Download { file: format!("the file list of {repo}"), reason };
        let response = self.get(&url, None).map_err(unreachable)?;
        let status = response.status().as_u16();
        if let Some(error) = self.denied_or_missing(repo, status, "the repository") {
            return Err(error);
        }
        if status != 200 {
            return Err(unreachable(format!("{url} answered HTTP {status}")));
        }
        let text = response
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| unreachable(format!("reading the answer of {url}: {e}")))?;
        let listing: Listing =
            serde_json::from_str(&text).map_err(|e| unreachable(format!("{url} did not answer a file list: {e}")))?;
        Ok(listing
            .siblings
            .into_iter()
            .map(|sibling| RemoteFile {
                size: sibling.lfs.as_ref().and_then(|lfs| lfs.size).or(sibling.size),
                sha256: sibling.lfs.and_then(|lfs| lfs.sha256).filter(|digest| is_sha256(digest)),
                name: sibling.rfilename,
            })
            .collect())
    }

    /// Downloads `file` of `repo` into `dir`, resuming a `.part` left by an earlier try.
    /// Returns the final path; it exists only once size and digest were checked.
    ///
    /// The part is written only when it is a regular file of this user's with no other
    /// name (never through a symlink or a hard link, so no other file is ever changed), and
    /// never past the size the Hub lists. When the download fails, the part stays only as a
    /// start to resume from: something in it, no more than the file's size, not known bad.
    ///
    /// `on_progress` is told the bytes there are after each read; when it fails (its reader
    /// went away), the download stops where it is, resumable.
    pub(crate) fn download_with(
        &self,
        repo: &str,
        file: &RemoteFile,
        dir: &Path,
        on_progress: &mut dyn FnMut(u64) -> io::Result<()>,
    ) -> Result<PathBuf> {
        let final_path = dir.join(file.local_name());
        if let (Ok(metadata), Some(size)) = (fs::symlink_metadata(&final_path), file.size) {
            // Only a checked file ever gets its final name, so a complete one is done.
            if metadata.is_file() && metadata.len() == size {
                return Ok(final_path);
            }
        }
        let part_path = dir.join(format!("{}.part", file.local_name()));
        // A part this pull cannot own (another pull's, or not a file of ours) is never removed.
        let mut part = open_part(&part_path, &file.name)?;
        let result = self.fetch(repo, file, &mut part, &part_path, &final_path, on_progress);
        if result.is_err() {
            let left = part.metadata().map(|metadata| metadata.len()).unwrap_or(0);
            if left == 0 || file.size.is_some_and(|size| left > size) {
                let _ = fs::remove_file(&part_path);
            }
        }
        result
    }

    fn fetch(
        &self,
        repo: &str,
        file: &RemoteFile,
        part: &mut File,
        part_path: &Path,
        final_path: &Path,
        on_progress: &mut dyn FnMut(u64) -> io::Result<()>,
    ) -> Result<PathBuf> {
        let write_error = |e: io::Error| write_failure(part_path, e);
        let mut have = part.metadata().map_err(write_error)?.len();
        if file.size.is_some_and(|size| have > size) {
            part.set_len(0).map_err(write_error)?;
            have = 0;
        }
        // The digest covers the whole file: hash what an earlier try left first.
        let mut hasher = Sha256::new();
        if have > 0 {
            hash_prefix(part, have, &mut hasher).map_err(write_error)?;
        }

        let url = format!("{}/{repo}/resolve/main/{}", self.endpoint, percent::encode_path(&file.name));
        let broken = |reason: String| Error::Download { file: file.name.clone(), reason };
        let complete = file.size.is_some_and(|size| have == size);
        if !complete {
            let range = (have > 0).then(|| format!("bytes={have}-"));
            let response = self.get(&url, range.as_deref()).map_err(broken)?;
            let status = response.status().as_u16();
            if let Some(error) = self.denied_or_missing(repo, status, &format!("the file {}", file.name)) {
                return Err(error);
            }
            match status {
                206 if have > 0 => {}
                // The server sent the whole file: start again.
                200 => {
                    part.set_len(0).map_err(write_error)?;
                    have = 0;
                    hasher = Sha256::new();
                }
                // What was asked for starts at the end: the part may be complete already.
                416 => {}
                _ => return Err(broken(format!("{url} answered HTTP {status}"))),
            }
            if status != 416 {
                let mut body = response.into_body();
                // The most the file may have: the size the Hub lists, else what this answer
                // announces. Nothing past it is ever written, so a server that sends more
                // cannot fill the disk.
                let announced = body.content_length().map(|length| have.saturating_add(length));
                let limit = file.size.or(announced);
                let too_long = |limit: u64| {
                    let _ = fs::remove_file(part_path);
                    broken(format!(
                        "the server sent more than the {limit} bytes the Hub lists for it (the partial file was \
                         deleted)"
                    ))
                };
                if let (Some(limit), Some(announced)) = (limit, announced) {
                    if announced > limit {
                        return Err(too_long(limit));
                    }
                }
                let mut progress = Progress::new(file.local_name(), have, file.size);
                let mut body = body.as_reader();
                let mut buffer = vec![0u8; BUFFER];
                loop {
                    let n = match body.read(&mut buffer) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            progress.finish(have);
                            return Err(broken(format!(
                                "the connection broke after {have} bytes ({e}); run the same command again to resume"
                            )));
                        }
                    };
                    if let Some(limit) = limit.filter(|&limit| have.saturating_add(n as u64) > limit) {
                        progress.finish(have);
                        return Err(too_long(limit));
                    }
                    part.write_all(&buffer[..n]).map_err(write_error)?;
                    hasher.update(&buffer[..n]);
                    have += n as u64;
                    progress.update(have);
                    if on_progress(have).is_err() {
                        progress.finish(have);
                        return Err(Error::Interrupted);
                    }
                }
                progress.finish(have);
            }
        }
        part.sync_all().map_err(write_error)?;
        if let Some(size) = file.size {
            if have != size {
                // Short: kept, the next pull resumes it.
                return Err(broken(format!(
                    "it has {have} bytes where the Hub lists {size}; run the same command again"
                )));
            }
        }
        if let Some(expected) = &file.sha256 {
            let actual = hasher.hex();
            if !actual.eq_ignore_ascii_case(expected) {
                let _ = fs::remove_file(part_path);
                return Err(Error::ChecksumMismatch { file: file.name.clone(), expected: expected.clone(), actual });
            }
        }
        fs::rename(part_path, final_path).map_err(write_error)?;
        if let Some(dir) = final_path.parent().and_then(|dir| File::open(dir).ok()) {
            let _ = dir.sync_all();
        }
        Ok(final_path.to_path_buf())
    }
}

/// What one pull fetches: the model named, and its files in the repository.
pub(crate) struct PullPlan {
    pub wanted: crate::library::RepoName,
    pub files: Vec<RemoteFile>,
}

impl Hub {
    /// The files a pull of `wanted` downloads, from the repository's listing: a name the
    /// Hub does not have fails here, before anything is written.
    pub(crate) fn plan(&self, wanted: crate::library::RepoName) -> Result<PullPlan> {
        let listing = self.list(&wanted.repo)?;
        let files = choose(&wanted.repo, &listing, wanted.tag.as_deref())?;
        Ok(PullPlan { wanted, files })
    }

    /// Downloads the files of `plan` into the models directory and records them, so that the
    /// name works as MODEL everywhere; returns the file llama-server loads. `on_progress`
    /// hears each file and the bytes there are of it, and stops the pull by failing.
    pub(crate) fn pull(
        &self,
        paths: &crate::paths::Paths,
        plan: &PullPlan,
        on_progress: &mut dyn FnMut(&RemoteFile, u64) -> io::Result<()>,
    ) -> Result<PathBuf> {
        use crate::library::{self, Pull, PulledFile};
        let dir = library::repo_dir(paths, &plan.wanted.repo);
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        let mut pulled_files = Vec::new();
        let mut result = Ok(());
        for file in &plan.files {
            let downloaded = self.download_with(&plan.wanted.repo, file, &dir, &mut |have| on_progress(file, have));
            match downloaded.and_then(|path| {
                fs::metadata(&path).map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))
            }) {
                Ok(metadata) => pulled_files.push(PulledFile {
                    name: file.local_name().to_string(),
                    remote_name: file.name.clone(),
                    size: metadata.len(),
                    sha256: file.sha256.clone(),
                }),
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        if let Err(error) = result {
            // Directories this pull created and left empty go; a `.part` to resume from stays.
            let _ = fs::remove_dir(&dir);
            if let Some(owner_dir) = dir.parent() {
                let _ = fs::remove_dir(owner_dir);
            }
            return Err(error);
        }
        // A file that is not a model is refused now, not when it is first run.
        let first = dir.join(&pulled_files[0].name);
        if let Err(reason) = crate::gguf::inspect(&first) {
            for file in &pulled_files {
                let _ = fs::remove_file(dir.join(&file.name));
            }
            return Err(Error::BadModel { path: first, reason: format!("{reason} (the download was deleted)") });
        }
        let pull = Pull {
            tag: plan.wanted.tag.clone(),
            endpoint: self.endpoint.clone(),
            files: pulled_files,
            pulled_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        library::record(&dir, &plan.wanted.repo, pull)
            .map_err(|e| Error::io(format!("cannot write the manifest in {}", dir.display()), e))?;
        Ok(first)
    }
}

/// The most redirects one request follows (the Hub uses one, to its CDN).
const MAX_REDIRECTS: usize = 10;

/// Scheme, host and port of `url`, the port filled in from the scheme; none for a URL that
/// is not http or https.
fn origin(url: &str) -> Option<(String, String, u16)> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host = uri.host()?.to_ascii_lowercase();
    Some((scheme, host, uri.port_u16().unwrap_or(default_port)))
}

/// The URL a `Location` header names, from the URL that answered with it (RFC 9110
/// §10.2.2: absolute, scheme-relative, absolute-path or relative reference).
fn resolve(base: &str, location: &str) -> std::result::Result<String, String> {
    let bad = || format!("the server redirected to `{location}`, which is not a URL llmctl follows");
    // A reference with a scheme is absolute; only http and https are followed.
    let scheme_end = location.find(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)));
    let starts_with_letter = location.starts_with(|c: char| c.is_ascii_alphabetic());
    if starts_with_letter && scheme_end.is_some_and(|end| location[end..].starts_with(':')) {
        return origin(location).map(|_| location.to_string()).ok_or_else(bad);
    }
    let uri: ureq::http::Uri = base.parse().map_err(|_| bad())?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(bad());
    };
    let resolved = if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let directory = uri.path().rsplit_once('/').map(|(directory, _)| directory).unwrap_or("");
        format!("{scheme}://{authority}{directory}/{location}")
    };
    origin(&resolved).map(|_| resolved.clone()).ok_or_else(bad)
}

/// Opens (or creates) the part file for appending, and locks it, so two pulls never append
/// to one file. `O_NOFOLLOW` refuses a symlink in its place; the checks on the open
/// descriptor refuse a FIFO, a device, a hard link (a second name of another file) and a
/// file of another user's.
fn open_part(path: &Path, name: &str) -> Result<File> {
    let refused = |what: &str| Error::Download {
        file: name.to_string(),
        reason: format!(
            "{} is {what}; llmctl writes a download only into a file of its own: remove it and pull again",
            path.display()
        ),
    };
    let part = File::options()
        .create(true)
        .append(true)
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused("a symbolic link"),
            _ => write_failure(path, e),
        })?;
    let metadata = part.metadata().map_err(|e| write_failure(path, e))?;
    if !metadata.is_file() {
        return Err(refused("not a regular file"));
    }
    if metadata.nlink() != 1 {
        return Err(refused("a hard link to another file"));
    }
    if metadata.uid() != crate::sys::current_uid() {
        return Err(refused("another user's file"));
    }
    lock(&part).map_err(|_| Error::Download {
        file: name.to_string(),
        reason: format!("another llmctl pull is downloading it into {} now", path.display()),
    })?;
    Ok(part)
}

fn is_sha256(digest: &str) -> bool {
    digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit())
}

fn write_failure(path: &Path, error: io::Error) -> Error {
    // ENOSPC: say it plainly; the part stays, so the pull resumes once there is room.
    if error.raw_os_error() == Some(libc::ENOSPC) {
        return Error::io(
            format!("the disk is full while writing {} (free some space and pull again)", path.display()),
            error,
        );
    }
    Error::io(format!("cannot write {}", path.display()), error)
}

/// Takes an exclusive lock on the part file, so two pulls never append to one file.
fn lock(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor this function borrows; it does not outlive `file`.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn hash_prefix(file: &mut File, len: u64, hasher: &mut Sha256) -> io::Result<()> {
    file.rewind()?;
    let mut reader = (&*file).take(len);
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    file.seek(io::SeekFrom::End(0))?;
    Ok(())
}

/// Picks the files to download for `tag`, as llama.cpp's `-hf` does: the GGUF whose name
/// contains the tag (case aside); without a tag Q4_K_M, else the first GGUF. Multimodal
/// projectors (`mmproj`) are never the model. A split model comes whole: every part, first
/// part first.
pub(crate) fn choose(repo: &str, files: &[RemoteFile], tag: Option<&str>) -> Result<Vec<RemoteFile>> {
    let mut ggufs: Vec<&RemoteFile> = files
        .iter()
        .filter(|file| file.name.to_ascii_lowercase().ends_with(".gguf"))
        .filter(|file| !file.local_name().to_ascii_lowercase().contains("mmproj"))
        .collect();
    ggufs.sort_by(|a, b| a.name.cmp(&b.name));
    if ggufs.is_empty() {
        return Err(Error::HubNotFound { repo: repo.to_string(), reason: "the repository has no GGUF file".into() });
    }
    let containing = |tag: &str| -> Vec<&RemoteFile> {
        let tag = tag.to_ascii_lowercase();
        ggufs.iter().copied().filter(|file| file.local_name().to_ascii_lowercase().contains(&tag)).collect()
    };
    let candidates = match tag {
        Some(tag) => containing(tag),
        None => match containing(DEFAULT_TAG) {
            found if found.is_empty() => ggufs.clone(),
            found => found,
        },
    };
    let Some(first) = candidates.first() else {
        let names: Vec<&str> = ggufs.iter().map(|file| file.local_name()).collect();
        return Err(Error::HubNotFound {
            repo: repo.to_string(),
            reason: format!("no GGUF file matches `{}`; it has {}", tag.unwrap_or_default(), names.join(", ")),
        });
    };
    let Some((prefix, count)) = split_part(&first.name) else {
        return Ok(vec![(*first).clone()]);
    };
    let mut parts = Vec::new();
    for index in 1..=count {
        let name = format!("{prefix}-{index:05}-of-{count:05}.gguf");
        match files.iter().find(|file| file.name == name) {
            Some(file) => parts.push(file.clone()),
            None => {
                return Err(Error::HubNotFound {
                    repo: repo.to_string(),
                    reason: format!("{} is part of a split model, but part {name} is missing", first.name),
                })
            }
        }
    }
    Ok(parts)
}

/// `model-00001-of-00003.gguf` → (`model`, 3).
fn split_part(name: &str) -> Option<(&str, u32)> {
    let stem = name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, index) = rest.rsplit_once('-')?;
    let valid = |digits: &str| digits.len() == 5 && digits.chars().all(|c| c.is_ascii_digit());
    if !valid(count) || !valid(index) {
        return None;
    }
    Some((prefix, count.parse().ok()?))
}

/// Bytes, rate and time left on stderr, redrawn on one line, only when stderr is a
/// terminal.
struct Progress {
    name: String,
    total: Option<u64>,
    started: Instant,
    start_bytes: u64,
    last_draw: Option<Instant>,
    enabled: bool,
}

impl Progress {
    fn new(name: &str, have: u64, total: Option<u64>) -> Progress {
        Progress {
            // The name comes from the Hub's listing: escaped, so it cannot drive the terminal.
            name: crate::term::escape(name).into_owned(),
            total,
            started: Instant::now(),
            start_bytes: have,
            last_draw: None,
            enabled: io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, have: u64) {
        if self.last_draw.is_some_and(|at| at.elapsed() < Duration::from_millis(200)) {
            return;
        }
        self.draw(have);
    }

    fn draw(&mut self, have: u64) {
        if !self.enabled {
            return;
        }
        self.last_draw = Some(Instant::now());
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = (have - self.start_bytes) as f64 / seconds;
        let mut line = format!("\r{}: {}", self.name, mib(have));
        if let Some(total) = self.total {
            line += &format!(" / {} ({:.0}%)", mib(total), have as f64 * 100.0 / total.max(1) as f64);
        }
        line += &format!(", {}/s", mib(rate as u64));
        if let (Some(total), true) = (self.total, rate > 0.0) {
            let left = total.saturating_sub(have) as f64 / rate;
            line += &format!(", {} left", clock(left as u64));
        }
        let _ = write!(io::stderr().lock(), "{line}\x1b[K");
    }

    /// Draws where the download ended, and ends the line.
    fn finish(&mut self, have: u64) {
        if self.enabled {
            self.draw(have);
            let _ = writeln!(io::stderr().lock());
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn clock(seconds: u64) -> String {
    match seconds {
        0..=3599 => format!("{}:{:02}", seconds / 60, seconds % 60),
        _ => format!("{}:{:02}:{:02}", seconds / 3600, seconds % 3600 / 60, seconds % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<RemoteFile> {
        names.iter().map(|name| RemoteFile { name: name.to_string(), size: Some(1), sha256: None }).collect()
    }

    fn chosen(names: &[&str], tag: Option<&str>) -> Result<Vec<String>> {
        Ok(choose("o/r", &files(names), tag)?.into_iter().map(|file| file.name).collect())
    }

    #[test]
    fn picks_files_like_llama_cpp() {
        let repo = ["README.md", "m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-f16.gguf", "mmproj-m-f16.gguf"];
        assert_eq!(chosen(&repo, None).unwrap(), ["m-Q4_K_M.gguf"]);
        assert_eq!(chosen(&repo, Some("q8_0")).unwrap(), ["m-Q8_0.gguf"]);
        assert_eq!(chosen(&repo, Some("F16")).unwrap(), ["m-f16.gguf"]);
        assert_eq!(chosen(&["b.gguf", "a.gguf"], None).unwrap(), ["a.gguf"]);
        assert!(matches!(chosen(&repo, Some("Q2_K")), Err(Error::HubNotFound { .. })));
        assert!(matches!(chosen(&["README.md"], None), Err(Error::HubNotFound { .. })));
    }

    #[test]
    fn origins_are_scheme_host_and_port() {
        let hub = origin("https://huggingface.co");
        assert_eq!(hub, Some(("https".into(), "huggingface.co".into(), 443)));
        assert_eq!(origin("HTTPS://HuggingFace.co:443/a/b?c"), hub, "case and the default port aside");
        for other in ["http://huggingface.co", "https://huggingface.co:8443", "https://cdn.huggingface.co"] {
            assert_ne!(origin(other), hub, "{other}");
        }
        assert_eq!(origin("http://127.0.0.1:8000/x"), Some(("http".into(), "127.0.0.1".into(), 8000)));
        assert_eq!(origin("ftp://example.com/"), None);
        assert_eq!(origin("not a url"), None);
    }

    #[test]
    fn redirects_resolve_like_a_browser() {
        let base = "http://127.0.0.1:8000/o/r/resolve/main/m.gguf?x=1";
        let table = [
            ("https://cdn.example/f?sig=1", "https://cdn.example/f?sig=1"),
            ("//cdn.example/f", "http://cdn.example/f"),
            ("/cdn/o/r/m.gguf", "http://127.0.0.1:8000/cdn/o/r/m.gguf"),
            ("other.gguf", "http://127.0.0.1:8000/o/r/resolve/main/other.gguf"),
            ("1:2.gguf", "http://127.0.0.1:8000/o/r/resolve/main/1:2.gguf"),
        ];
        for (location, expected) in table {
            assert_eq!(resolve(base, location).unwrap(), expected, "{location}");
        }
        assert!(resolve(base, "file:///etc/passwd").is_err());
        assert!(resolve(base, "javascript:alert(1)").is_err());
    }

    #[test]
    fn split_models_come_whole() {
        let repo = ["Q4_K_M/m-00002-of-00002.gguf", "Q4_K_M/m-00001-of-00002.gguf", "m-Q8_0.gguf"];
        assert_eq!(chosen(&repo, None).unwrap(), ["Q4_K_M/m-00001-of-00002.gguf", "Q4_K_M/m-00002-of-00002.gguf"]);
        let missing = ["m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00002-of-00003.gguf"];
        assert!(matches!(chosen(&missing, None), Err(Error::HubNotFound { .. })));
        assert_eq!(split_part("x-00001-of-00003.gguf"), Some(("x", 3)));
        assert_eq!(split_part("x-1-of-3.gguf"), None);
    }
}
