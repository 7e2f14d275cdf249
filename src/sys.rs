//! Safe wrappers over the few libc calls llmctl needs outside process control (which lives
//! in `process`): socket peer credentials, hang-up detection, file locks and descriptor
//! shutdown.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

/// The uid of the process at the other end of a Unix socket (SO_PEERCRED).
pub(crate) fn peer_uid(socket: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: ucred is plain data; getsockopt writes at most `len` bytes into it.
    let mut credentials: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the descriptor is a live socket borrowed for the call; the pointers are valid.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(credentials.uid)
}

pub(crate) fn current_uid() -> u32 {
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    // SAFETY: getuid has no preconditions and cannot fail.
    *UID.get_or_init(|| unsafe { libc::getuid() })
}

/// This process's id, asked of the kernel once (glibc asks on every call).
pub(crate) fn own_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// True when the peer of `socket` has closed or shut down its side, without reading.
pub(crate) fn peer_closed(socket: &impl AsRawFd) -> bool {
    fd_peer_closed(socket.as_raw_fd())
}

/// [`peer_closed`] for a descriptor held by number.
pub(crate) fn fd_peer_closed(fd: RawFd) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout; poll only writes `revents`.
    let rc = unsafe { libc::poll(&mut poll, 1, 0) };
    rc > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// The home directory the password database gives the current user, for a process whose
/// environment has no `HOME` (`env -i`, some service managers).
pub(crate) fn passwd_home() -> Option<std::path::PathBuf> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;
    let mut buffer = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: an all-zero passwd is a valid value for getpwuid_r to fill in.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, and the buffer's length is its own;
    // getpwuid_r writes only into `entry`, `buffer` and `found`.
    let rc = unsafe { libc::getpwuid_r(current_uid(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
    if rc != 0 || found.is_null() || entry.pw_dir.is_null() {
        return None;
    }
    // SAFETY: on success `pw_dir` points to a NUL-terminated string inside `buffer`.
    let dir = unsafe { CStr::from_ptr(entry.pw_dir) };
    let dir = std::path::Path::new(std::ffi::OsStr::from_bytes(dir.to_bytes()));
    (dir.is_absolute()).then(|| dir.to_path_buf())
}

/// Writes what of `bytes` the socket `fd` takes at once, without waiting and without
/// SIGPIPE; for a last word before a hang-up, which may be lost.
pub(crate) fn send_without_waiting(fd: RawFd, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: `bytes` is valid for its length; send(2) only reads it.
    unsafe {
        libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    }
}

/// True when the socket `fd` has bytes to read (or its peer hung up) now.
pub(crate) fn readable(fd: RawFd) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout; poll only writes `revents`.
    let rc = unsafe { libc::poll(&mut poll, 1, 0) };
    rc > 0 && poll.revents & libc::POLLIN != 0
}

/// Takes an exclusive advisory lock on `file` without waiting; false if another process
/// holds it. The lock lasts as long as the file stays open.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(error)
    }
}

/// Takes a shared advisory lock on `file` without waiting, to learn whether another
/// process holds it exclusively: false if one does. The lock lasts as long as the file
/// stays open.
pub(crate) fn try_lock_shared(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(error)
    }
}

/// Takes an exclusive advisory lock on `file`, waiting as long as another process holds
/// it. The lock lasts as long as the file stays open, and the kernel drops it when its
/// holder dies, however it dies.
pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own for the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        // A signal handler that returns (Ctrl-C in a foreground command) interrupts the wait.
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Sets `SO_RCVTIMEO` on a socket: on a listening one, `accept` then fails with
/// `WouldBlock` after `timeout` without a connection.
pub(crate) fn set_receive_timeout(socket: &impl AsRawFd, timeout: Duration) -> io::Result<()> {
    let value = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: timeout.subsec_micros().into(),
    };
    // SAFETY: the option value is a timeval of the size passed, alive for the call.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Shuts down both directions of a socket by raw descriptor, from a signal handler or
/// another thread, so a blocked read returns at once.
pub(crate) fn shutdown_socket(fd: RawFd) {
    // SAFETY: shutdown takes any descriptor and fails harmlessly on a stale one.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Asks the kernel to read the file at `path` into the page cache in the background
/// (`posix_fadvise(WILLNEED)`), so a load that follows reads from memory. Only a regular
/// file is opened, without blocking on a FIFO.
pub(crate) fn read_ahead(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    // SAFETY: posix_fadvise only gives the kernel advice about a descriptor we own; offset
    // 0 and length 0 mean the whole file.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// `bytes` random bytes from the kernel, as lowercase hex: for secrets such as a child's key.
pub(crate) fn random_hex(bytes: usize) -> io::Result<String> {
    use std::io::Read;
    let mut buffer = vec![0u8; bytes];
    File::open("/dev/urandom")?.read_exact(&mut buffer)?;
    Ok(buffer.iter().map(|byte| format!("{byte:02x}")).collect())
}
