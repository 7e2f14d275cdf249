//! One type owns a child process: [`ChildGroup`].
//!
//! The child runs in its own process group so a stop reaches anything it forked, and with
//! `PR_SET_PDEATHSIG` so a SIGKILLed daemon takes it along. Stopping is TERM to the group,
//! a grace period, KILL to the group, and always a reap; `Drop` kills and reaps as the last
//! defence. **Only this module sends signals.** The `unsafe` lines of llmctl live here.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process
//! (prctl(2)), so callers must spawn from a thread that lives as long as the daemon.
//!
//! A helper the child starts in a session of its own (`setsid`) leaves the process group,
//! and may outlive the child holding its output pipe. Each child therefore carries a mark
//! in its environment ([`MARK_VARIABLE`]), which its descendants inherit: when a child is
//! stopped or found dead, every process of this user that still carries its mark is killed
//! too ([`kill_marked`]).

pub(crate) mod launcher;

use std::fs;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often a stop checks whether the child has gone.
const POLL: Duration = Duration::from_millis(5);

/// The environment variable that marks a child and everything it starts.
pub(crate) const MARK_VARIABLE: &str = "LLMCTL_CHILD";

#[derive(Debug)]
pub(crate) struct ChildGroup {
    child: Child,
    pid: u32,
    start_time: Option<u64>,
    status: Option<ExitStatus>,
    /// The value of [`MARK_VARIABLE`] the child was started with, if any.
    mark: Option<String>,
}

impl ChildGroup {
    /// Spawns `command` as the leader of a new process group that dies with this thread.
    pub(crate) fn spawn(mut command: Command) -> io::Result<ChildGroup> {
        // SAFETY: getpid is async-signal-safe and has no preconditions.
        let parent_pid = unsafe { libc::getpid() };
        command.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid); it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl; then no signal would come.
                if libc::getppid() != parent_pid {
                    return Err(io::Error::other("parent exited before the child started"));
                }
                Ok(())
            });
        }
        let mark = command
            .get_envs()
            .find(|(name, _)| *name == MARK_VARIABLE)
            .and_then(|(_, value)| value.map(|value| value.to_string_lossy().into_owned()));
        let child = command.spawn()?;
        let pid = child.id();
        Ok(ChildGroup { child, pid, start_time: start_time(pid), status: None, mark })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The kernel's start time of the child (clock ticks since boot), to tell it apart from a
    /// later process that reuses its pid.
    pub(crate) fn start_time(&self) -> Option<u64> {
        self.start_time
    }

    /// The exit status if the leader has exited; the process is reaped then, and whatever
    /// it left in its group is killed.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        if !self.has_exited()? {
            return Ok(None);
        }
        // The leader is a zombie: its pid and group id cannot be reused yet, so killing the
        // group here reaches only its own descendants.
        self.signal_group(libc::SIGKILL);
        self.kill_escaped();
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(Some(status))
    }

    /// True once the leader has exited, without reaping it.
    fn has_exited(&self) -> io::Result<bool> {
        // SAFETY: siginfo_t is plain data; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: the pid is our own unreaped child; WNOWAIT leaves it waitable.
        let rc = unsafe {
            libc::waitid(libc::P_PID, self.pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: si_pid is valid to read after a successful waitid.
        Ok(unsafe { info.si_pid() } != 0)
    }

    /// TERM to the group, up to `grace` for the leader to exit (cut short when `abort` is
    /// set), then KILL; always reaps.
    pub(crate) fn stop(&mut self, grace: Duration, abort: &AtomicBool) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !abort.load(Ordering::Relaxed) {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(POLL);
        }
        log::warn!("pid {} ignored SIGTERM for {:?}; sending SIGKILL", self.pid, grace);
        self.kill()
    }

    /// KILL to the group at once, then reap.
    pub(crate) fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        self.signal_group(libc::SIGKILL);
        self.kill_escaped();
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }

    /// Kills what the child started outside its group (a `setsid` helper), found by its mark.
    fn kill_escaped(&self) {
        if let Some(mark) = &self.mark {
            let killed = kill_marked(mark, self.pid);
            if killed > 0 {
                log::warn!("killed {killed} process(es) llama-server pid {} left outside its group", self.pid);
            }
        }
    }

    fn signal_group(&self, signal: libc::c_int) {
        // SAFETY: killpg only sends a signal. The group id is the pid of our own child,
        // which is not reaped yet, so the id cannot belong to an unrelated group.
        unsafe {
            libc::killpg(self.pid as libc::pid_t, signal);
        }
    }
}

impl Drop for ChildGroup {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill();
        }
    }
}

/// Spawns `command` in a new session, detached from the caller's terminal and process
/// group, for the daemon that a client starts. The caller does not wait for it.
pub(crate) fn spawn_detached(mut command: Command) -> io::Result<Child> {
    // SAFETY: setsid is async-signal-safe and only changes the child's own session.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// "exited with status 1", "was killed by signal 9 (SIGKILL)".
pub(crate) fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(signal) => format!("was killed by signal {signal} ({})", signal_name(signal)),
        None => "exited".to_string(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Kills every process of this user whose environment holds `MARK_VARIABLE=mark`, except
/// `spare` (the leader, reaped by its owner). Returns how many it killed.
pub(crate) fn kill_marked(mark: &str, spare: u32) -> usize {
    let wanted = format!("{MARK_VARIABLE}={mark}");
    let Ok(entries) = fs::read_dir("/proc") else { return 0 };
    let own = std::process::id();
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        if pid == spare || pid == own {
            continue;
        }
        // Another user's process cannot be read, and is never ours to kill.
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else { continue };
        if environ.split(|&b| b == 0).any(|variable| variable == wanted.as_bytes()) {
            // SAFETY: kill only sends a signal, to a process of this user that carries the
            // mark of a child llmctl is stopping.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat); none once
/// it has exited, even while it waits to be reaped (a SIGKILLed daemon stays a zombie
/// until its parent, often a slow init, reaps it, and is no longer running then).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    let mut fields = stat[stat.rfind(')')? + 2..].split(' ');
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Resident memory of `pid` in bytes, from /proc/PID/status.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Kills a process left behind by an earlier daemon, but only if `pid` still names the same
/// process (same start time), so a reused pid is never hit. Returns whether it killed.
pub(crate) fn kill_leftover(pid: u32, recorded_start_time: u64) -> bool {
    if start_time(pid) != Some(recorded_start_time) {
        return false;
    }
    // SAFETY: kill/killpg only send signals; the start time check above makes sure the pid
    // is the process we recorded. The group id equals the pid because we made it a leader.
    unsafe {
        libc::killpg(pid as libc::pid_t, libc::SIGKILL);
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_reaps_a_child_that_ignores_term() {
        let mut command = Command::new("sh");
        command.args(["-c", "trap '' TERM; while :; do sleep 0.05; done"]);
        let mut child = ChildGroup::spawn(command).unwrap();
        let pid = child.pid();
        // Give the shell time to install its trap: poll until it is sleeping in the loop.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !has_child_process(pid) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = child.stop(Duration::from_millis(100), &AtomicBool::new(false)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(start_time(pid).is_none(), "pid {pid} survived");
    }

    fn has_child_process(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).map(|s| !s.trim().is_empty()).unwrap_or(false)
    }

    #[test]
    fn a_helper_in_its_own_session_dies_with_the_child() {
        let mark = format!("test-{}-{}", std::process::id(), start_time(std::process::id()).unwrap_or(0));
        let mut command = Command::new("sh");
        // The helper leaves the group and the session; only the mark follows it.
        command.args(["-c", "setsid sleep 300 & echo started; exec sleep 300"]).env(MARK_VARIABLE, &mark);
        command.stdout(std::process::Stdio::piped());
        let mut child = ChildGroup::spawn(command).unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let leader = child.pid();
        let marked = || {
            fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| pid != leader)
                .filter(|pid| {
                    fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                        environ.split(|&b| b == 0).any(|v| v == format!("{MARK_VARIABLE}={mark}").as_bytes())
                    })
                })
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while marked() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(marked(), 1, "the setsid helper runs");
        child.kill().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while marked() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(marked(), 0, "the helper outlived the child");
    }

    #[test]
    fn start_time_is_known_for_a_running_process_and_not_for_a_zombie() {
        assert!(start_time(std::process::id()).is_some());
        // An exited child not yet reaped is not running.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while start_time(pid).is_some() {
            assert!(Instant::now() < deadline, "pid {pid} still counts as running after it exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(fs::read_to_string(format!("/proc/{pid}/stat")).unwrap().contains(") Z "), "a zombie until reaped");
        child.wait().unwrap();
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn leftover_with_other_start_time_is_spared() {
        assert!(!kill_leftover(std::process::id(), 1));
    }

    #[test]
    fn describes_statuses() {
        assert_eq!(describe_status(ExitStatus::from_raw(1 << 8)), "exited with status 1");
        assert_eq!(describe_status(ExitStatus::from_raw(9)), "was killed by signal 9 (SIGKILL)");
    }
}
