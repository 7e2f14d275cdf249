//! The launcher thread: the one long-lived thread that forks llama-server children.
//!
//! `PR_SET_PDEATHSIG` is tied to the thread that forked the child, not to the process
//! (prctl(2)). Children spawned from a connection thread would be SIGKILLed as soon as that
//! client disconnected, so every spawn is handed to this thread, which lives as long as the
//! daemon.

use std::io;
use std::process::Command;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{bounded, Sender};

use super::ChildGroup;

type SpawnReply = Sender<io::Result<ChildGroup>>;

pub(crate) struct Launcher {
    requests: Option<Sender<(Command, SpawnReply)>>,
    thread: Option<JoinHandle<()>>,
}

impl Launcher {
    pub(crate) fn start() -> io::Result<Launcher> {
        let (requests, incoming) = bounded::<(Command, SpawnReply)>(0);
        let thread = thread::Builder::new().name("launcher".into()).spawn(move || {
            for (command, reply) in incoming {
                let _ = reply.send(ChildGroup::spawn(command));
            }
        })?;
        Ok(Launcher { requests: Some(requests), thread: Some(thread) })
    }

    /// Spawns `command` from the launcher thread and hands the child back.
    pub(crate) fn spawn(&self, command: Command) -> io::Result<ChildGroup> {
        let (reply, response) = bounded(1);
        let gone = || io::Error::other("the launcher thread has stopped");
        self.requests.as_ref().ok_or_else(gone)?.send((command, reply)).map_err(|_| gone())?;
        response.recv().map_err(|_| gone())?
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
