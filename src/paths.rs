//! Where llmctl keeps its socket, state, config and installed files.
//!
//! Each location follows the same precedence: flag, then an `LLMCTL_*` environment variable,
//! then the XDG variable, then a default under the home directory. This module only computes
//! paths; it creates nothing except through [`ensure_private_dir`] and
//! [`ensure_own_private_dir`].

use std::env;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The llama.cpp build `llmctl setup` installs and the tests run against.
pub(crate) const LLAMA_CPP_BUILD: u32 = 11434;

/// Paths one process works with, resolved once at start.
#[derive(Debug, Clone)]
pub struct Paths {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Per-instance llama-server logs.
    pub instance_logs_dir: PathBuf,
}

impl Paths {
    pub fn resolve(socket_flag: Option<&Path>, config_flag: Option<&Path>) -> Paths {
        let state_dir = from_env_or("LLMCTL_STATE_DIR", "XDG_STATE_HOME", ".local/state");
        Paths {
            socket: absolute(socket_flag.map(Path::to_path_buf).unwrap_or_else(default_socket)),
            instance_logs_dir: state_dir.join("logs"),
            state_dir,
            config: config_flag.map(Path::to_path_buf).unwrap_or_else(default_config),
            data_dir: from_env_or("LLMCTL_DATA_DIR", "XDG_DATA_HOME", ".local/share"),
            cache_dir: from_env_or("LLMCTL_CACHE_DIR", "XDG_CACHE_HOME", ".cache"),
        }
    }

    /// The lock file that makes one daemon the owner of a socket: the socket's path with
    /// `.lock` added (never replacing an extension, so `./Cargo.sock` cannot name
    /// `./Cargo.lock`).
    pub fn lock_file(&self) -> PathBuf {
        let mut name = self.socket.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// The lock file that makes one daemon the owner of the state directory, and names
    /// its pid and socket, so every way of reaching llmctl from this account finds it.
    pub fn daemon_lock(&self) -> PathBuf {
        self.state_dir.join("daemon.lock")
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.state_dir.join("daemon.log")
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    /// Where prompt caches saved on unload are kept: private to the user (0700).
    pub fn prompt_cache_dir(&self) -> PathBuf {
        self.state_dir.join("prompt-caches")
    }

    /// Where `llmctl setup` installs the llama-server it builds.
    pub fn installed_llama_server(&self) -> PathBuf {
        self.data_dir.join("llama.cpp").join(format!("b{LLAMA_CPP_BUILD}")).join("llama-server")
    }

    pub fn models_dir(&self) -> PathBuf {
        self.data_dir.join("models")
    }
}

/// A relative path made absolute against the working directory, so the daemon (which
/// starts elsewhere) and every client agree on it.
fn absolute(path: PathBuf) -> PathBuf {
    if path.is_relative() {
        if let Ok(dir) = env::current_dir() {
            return dir.join(path);
        }
    }
    path
}

fn non_empty_env(name: &str) -> Option<PathBuf> {
    env::var_os(name).filter(|value| !value.is_empty()).map(PathBuf::from)
}

/// A base directory from the environment (`HOME`, `XDG_*`), only when absolute: the XDG
/// spec has relative ones ignored, and one relative to wherever a command runs would give
/// the same user another daemon and other files in each directory.
fn absolute_env(name: &str) -> Option<PathBuf> {
    non_empty_env(name).filter(|path| path.is_absolute())
}

/// `$HOME`; without one (or with a relative one), the home the password database gives
/// (cron and `env -i` may leave it out, and the files must be the ones the user's shell
/// finds); `/` only for a user with no home at all.
pub(crate) fn home() -> PathBuf {
    absolute_env("HOME").or_else(crate::sys::passwd_home).unwrap_or_else(|| PathBuf::from("/"))
}

fn from_env_or(own: &str, xdg: &str, home_relative: &str) -> PathBuf {
    if let Some(path) = non_empty_env(own) {
        return path;
    }
    absolute_env(xdg).unwrap_or_else(|| home().join(home_relative)).join("llmctl")
}

fn default_socket() -> PathBuf {
    let uid = crate::sys::current_uid();
    let run_user = PathBuf::from(format!("/run/user/{uid}"));
    let run_user_is_ours = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&run_user).is_ok_and(|metadata| metadata.is_dir() && metadata.uid() == uid)
    };
    socket_location(
        non_empty_env("LLMCTL_SOCKET"),
        absolute_env("XDG_RUNTIME_DIR"),
        run_user_is_ours.then_some(run_user),
        uid,
    )
}

/// Where the socket is: `$LLMCTL_SOCKET`; else in `$XDG_RUNTIME_DIR`; else in `/run/user/$UID`
/// when it exists and is the user's (what systemd sets XDG_RUNTIME_DIR to, so a cron job,
/// which has no XDG_RUNTIME_DIR, finds the same daemon as the user's shell); else in
/// `/tmp/llmctl-$UID`.
pub(crate) fn socket_location(
    explicit: Option<PathBuf>,
    xdg_runtime: Option<PathBuf>,
    run_user: Option<PathBuf>,
    uid: u32,
) -> PathBuf {
    if let Some(path) = explicit {
        return path;
    }
    match xdg_runtime.or(run_user) {
        Some(runtime) => runtime.join("llmctl").join("llmctl.sock"),
        None => PathBuf::from(format!("/tmp/llmctl-{uid}")).join("llmctl.sock"),
    }
}

fn default_config() -> PathBuf {
    if let Some(path) = non_empty_env("LLMCTL_CONFIG") {
        return path;
    }
    absolute_env("XDG_CONFIG_HOME").unwrap_or_else(|| home().join(".config")).join("llmctl").join("config.toml")
}

/// The longest path a Unix socket can have (`sun_path` holds 108 bytes with the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Refuses a socket path the kernel cannot bind, naming its length and the way out.
pub(crate) fn check_socket_path(socket: &Path) -> Result<()> {
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::DaemonUnavailable {
            socket: socket.to_path_buf(),
            reason: format!(
                "the path is {len} bytes, over the {MAX_SOCKET_PATH} a Unix socket allows; set LLMCTL_SOCKET or \
                 --socket to a shorter path"
            ),
        });
    }
    Ok(())
}

/// Makes sure `dir` can hold the daemon's socket safely. A directory llmctl creates is
/// made private (0700). An existing one is never changed (it may be `/tmp` or `$HOME`), only
/// checked: it must belong to this user and must not be writable by others unless sticky, or
/// another user could swap the socket; otherwise it is refused (exit 69).
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let unusable = |reason: String| Error::DaemonUnavailable { socket: dir.to_path_buf(), reason };
    if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty() && !parent.exists()) {
        fs::create_dir_all(parent).map_err(|e| unusable(format!("cannot create {}: {e}", parent.display())))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        // Created now, by us, private from the start (the mode is subject to the umask,
        // which can only take bits away).
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(unusable(format!("cannot create the directory: {e}"))),
    }
    let metadata = fs::metadata(dir).map_err(|e| unusable(format!("cannot inspect the directory: {e}")))?;
    if !metadata.is_dir() {
        return Err(unusable("it is not a directory".into()));
    }
    let uid = crate::sys::current_uid();
    if metadata.uid() != uid {
        return Err(unusable(format!(
            "the directory belongs to uid {}, not to you (uid {uid}); choose another place with --socket or \
             LLMCTL_SOCKET",
            metadata.uid()
        )));
    }
    let mode = metadata.permissions().mode();
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(unusable(format!(
            "the directory is writable by other users (mode {:o}), so one of them could replace the socket; \
             choose another place with --socket or LLMCTL_SOCKET",
            mode & 0o7777
        )));
    }
    Ok(())
}

/// Makes sure `dir` is a directory only this user can enter, creating it (0700) if needed:
/// for the children's sockets. An existing one that others can enter is refused.
pub(crate) fn ensure_own_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let unusable = |reason: String| Error::io(format!("cannot use {}", dir.display()), std::io::Error::other(reason));
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(unusable(format!("cannot create the directory: {e}"))),
    }
    let metadata = fs::symlink_metadata(dir).map_err(|e| unusable(format!("cannot inspect the directory: {e}")))?;
    if !metadata.is_dir() || metadata.uid() != crate::sys::current_uid() || metadata.permissions().mode() & 0o077 != 0 {
        return Err(unusable("it exists but is not a directory private to you (0700); remove it".into()));
    }
    Ok(())
}

/// Removes `path` if it is a socket (left by a process that died); anything else there is
/// not llmctl's and stays. Returns an error naming what is there when it is not a socket.
pub(crate) fn remove_stale_socket(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot inspect {}: {e}", path.display())),
        Ok(metadata) if metadata.file_type().is_socket() => {
            fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))
        }
        Ok(metadata) => Err(format!(
            "{} exists and is not a socket (it is {}); llmctl never removes it: choose another path with \
             --socket or LLMCTL_SOCKET",
            path.display(),
            describe_file_type(&metadata.file_type())
        )),
    }
}

/// "a regular file", "a directory", ... for messages about what sits at a path.
pub(crate) fn describe_file_type(file_type: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device"
    } else {
        "a regular file"
    }
}

/// Writes `contents` to `path` so that readers see either the old file or the whole new
/// one: a temporary file in the same directory, fsync, rename, then fsync of the directory.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    write_atomically_counting(path, contents, &WRITES)
}

/// [`write_atomically`], numbering its temporary files with `writes`.
fn write_atomically_counting(
    path: &Path,
    contents: &[u8],
    writes: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().and_then(|name| name.to_str()).unwrap_or("file");
    // The temporary file is always a new one (O_EXCL, which never follows a symbolic
    // link): whatever else sits at a name it tries, another name is taken, and that thing
    // is neither written nor removed.
    let (temp, mut file) = {
        let mut tries = 0;
        loop {
            let temp = dir.join(format!(
                ".{file_name}.{}.{}.tmp",
                std::process::id(),
                writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            match fs::File::options().write(true).create_new(true).open(&temp) {
                Ok(file) => break (temp, file),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
                Err(error) => return Err(error),
            }
        }
    };
    let result = (|| {
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Opens a log for appending: a regular file at that very name, created if need be. A
/// symbolic link, a FIFO or a device in its place is refused before anything is written,
/// so no file but llmctl's own log is ever changed.
pub(crate) fn open_log(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|error| match error.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::other(format!(
                "{} is a symbolic link; llmctl writes its logs only into files of its own",
                path.display()
            )),
            _ => error,
        })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!("{} is not a regular file; it is left alone", path.display())));
    }
    Ok(file)
}

/// A log written afresh: [`open_log`], emptied.
pub(crate) fn create_log(path: &Path) -> std::io::Result<fs::File> {
    let file = open_log(path)?;
    file.set_len(0)?;
    Ok(file)
}

/// The longest API key file read: a key is one line.
const MAX_KEY_FILE: u64 = 64 << 10;

/// Reads a small secret such as an API key file: a regular file (through a symbolic link
/// too) of at most 64 KiB. A FIFO, a device or a larger file is refused before anything is
/// read, so no file can make a reader wait or fill its memory.
pub(crate) fn read_key_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    if metadata.len() > MAX_KEY_FILE {
        return Err(std::io::Error::other(format!("it is over {} KiB; a key is one line", MAX_KEY_FILE >> 10)));
    }
    let mut text = String::new();
    (&file).take(MAX_KEY_FILE).read_to_string(&mut text)?;
    Ok(text)
}

/// Creates a directory and its missing parents, those it creates private to this user
/// (0700); directories already there are left as they are.
pub(crate) fn create_private_dirs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Whether the file system holding `dir` has no space left for this user.
pub(crate) fn disk_is_full(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stats` a buffer of the type statvfs
    // fills; it is read only when the call succeeded.
    let filled = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } == 0;
    // SAFETY: statvfs returned 0, so it initialised `stats`.
    filled && unsafe { stats.assume_init() }.f_bavail == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_never_writes_through_what_sits_at_its_temporary_names() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        // Links at the first temporary names a write would try.
        for n in 0..4 {
            let name = format!(".state.json.{}.{n}.tmp", std::process::id());
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        let target = dir.path().join("state.json");
        let writes = std::sync::atomic::AtomicU64::new(0);
        write_atomically_counting(&target, b"{}", &writes).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "{}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(writes.load(std::sync::atomic::Ordering::Relaxed), 5, "four names were taken");
        // The links are not llmctl's: they are left where they are.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 6);
    }

    #[test]
    fn logs_and_key_files_are_only_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let link = dir.path().join("linked.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(open_log(&link).unwrap_err().to_string().contains("symbolic link"));
        assert!(create_log(&link).is_err());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let fifo = dir.path().join("key");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path and a mode; mkfifo reads nothing else.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        assert!(read_key_file(&fifo).unwrap_err().to_string().contains("not a regular file"));
        assert!(read_key_file(Path::new("/dev/zero")).unwrap_err().to_string().contains("not a regular file"));
        let big = dir.path().join("big");
        fs::write(&big, vec![b'k'; 100 << 10]).unwrap();
        assert!(read_key_file(&big).unwrap_err().to_string().contains("KiB"));
        fs::write(&big, "s3cret\n").unwrap();
        assert_eq!(read_key_file(&big).unwrap(), "s3cret\n");
        assert_eq!(read_key_file(&link).unwrap(), "precious", "through a link to a regular file too");
    }

    #[test]
    fn cron_and_the_shell_find_the_same_socket() {
        let run_user = Some(PathBuf::from("/run/user/1000"));
        // A login shell under systemd has XDG_RUNTIME_DIR=/run/user/1000; cron has none.
        let shell = socket_location(None, run_user.clone(), run_user.clone(), 1000);
        let cron = socket_location(None, None, run_user, 1000);
        assert_eq!(shell, cron);
        assert_eq!(cron, PathBuf::from("/run/user/1000/llmctl/llmctl.sock"));
        assert_eq!(socket_location(None, None, None, 7), PathBuf::from("/tmp/llmctl-7/llmctl.sock"));
        let explicit = Some(PathBuf::from("/x.sock"));
        assert_eq!(socket_location(explicit, None, None, 7), PathBuf::from("/x.sock"));
    }

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn failed_atomic_write_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("state.json");
        assert!(write_atomically(&path, b"x").is_err());
        assert!(!path.exists());
    }
}
