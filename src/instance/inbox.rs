//! What a worker hears ([`Message`]) and what it answers a request for a slot with
//! ([`JobEvent`]), and what it tells the scheduler ([`RoomRequest`]).

use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use crossbeam_channel::Sender;

use super::lease::Lease;
use super::state::{JobId, RoomToken, Unload};
use super::view::FileStamp;
use crate::budget::Need;
use crate::error::Error;
use crate::gguf::ModelInfo;
use crate::model::Policy;

/// A request for a slot, sent to the instance's worker.
pub(crate) struct Job {
    pub(crate) id: JobId,
    /// Where the worker answers: progress, then a lease or an error.
    pub(crate) events: Sender<JobEvent>,
    /// The model's latest policy from the config, applied without a reload.
    pub(crate) policy: Policy,
    /// The model file as the request found it, when it differs from what the instance has.
    pub(crate) file: Option<(ModelInfo, FileStamp)>,
}

pub(crate) enum JobEvent {
    /// The model is being loaded for this request (sent once).
    Loading,
    /// The request waits for a slot at this place (1 = next).
    Queued(usize),
    /// The load it waits for is at this place in the scheduler's line, with this estimate.
    Waiting {
        position: usize,
        eta_ms: u64,
    },
    Granted(Box<Lease>),
    Failed(Error),
}

/// Pins set by commands.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pin {
    Set(bool),
    Until(SystemTime),
}

/// What a worker hears.
pub(crate) enum Message {
    Arrive(Job),
    /// The job's client went away before it got a slot.
    Leave(JobId),
    /// A lease granted on `generation` ended (counted in `Home::returning` until the view
    /// shows its slot back).
    Finished {
        replica: Option<usize>,
        generation: u64,
        /// No token came within the token timeout: restart the child.
        stalled: bool,
        /// The remote replica failed: leave it out for a while.
        replica_failed: bool,
    },
    RoomGranted(RoomToken),
    RoomRefused(Error),
    /// The load an eviction was for no longer needs the room: stay loaded if not yet gone.
    Keep(RoomToken),
    /// Unload for `why`. `cutoff` is the last job sent before the decision; `room` names
    /// the grant an eviction is for; `message` is what refused and cut-off requests are
    /// told; `done` hears when the instance has stopped (or at once if nothing runs).
    Unload {
        why: Unload,
        cutoff: JobId,
        room: Option<RoomToken>,
        message: String,
        done: Option<Sender<()>>,
    },
    /// A pin set or cleared; `done` hears once the view shows it, so the command that
    /// asked answers after every later decision can see it.
    Pin {
        pin: Pin,
        done: Sender<()>,
    },
    /// The child's output closed: it is exiting.
    OutputClosed {
        generation: u64,
    },
    /// A request on this generation's child broke: check that the child is alive now.
    Suspect {
        generation: u64,
    },
    /// The scheduler's estimate for a load that waits for room: its place and wait.
    Waiting {
        position: usize,
        eta_ms: u64,
    },
    /// The child says it listens: check readiness now.
    Listening {
        generation: u64,
    },
    /// When it was last used and how it was pinned, as a daemon before this one
    /// remembered; `done` hears once the view shows it.
    Restore {
        last_used: Option<SystemTime>,
        pinned: bool,
        pinned_until: Option<SystemTime>,
        done: Sender<()>,
    },
    /// Stop the child and end the worker.
    Shutdown {
        message: String,
    },
}

/// What the scheduler hears from workers.
#[derive(Debug)]
pub(crate) enum RoomRequest {
    /// Instance `id` needs memory to load; the answer is [`Message::RoomGranted`] or
    /// [`Message::RoomRefused`].
    Want { id: usize, need: Need, path: std::path::PathBuf },
    /// It no longer needs the room it asked for.
    Withdraw { id: usize },
    /// It gave back the room it was granted: its child is gone.
    Return { id: usize },
    /// The budget changed (a reload), or an instance became ready or idle while loads wait:
    /// plan the waiting loads again.
    Replan,
}

/// What the scheduler tells every instance at once, without a message: set before it
/// publishes the places of the loads that wait, so whoever sees a place sees these too.
#[derive(Debug, Default)]
pub(crate) struct RoomFlags {
    /// Loads wait for room: an instance that becomes ready or idle tells the scheduler,
    /// which may now drain or evict it for one.
    pub(crate) wanted: AtomicBool,
    /// A busy instance may begin to drain for a waiting load within about one of its
    /// requests: no child is sent a request beyond its slots, which that drain would have
    /// to run before the room is free (see `plan::Outcome::drain_near`).
    pub(crate) drain_near: AtomicBool,
}
