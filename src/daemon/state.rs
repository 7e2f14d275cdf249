//! The daemon's state file: which children it runs, by pid and kernel start time.
//!
//! If the daemon is SIGKILLed, `PR_SET_PDEATHSIG` already takes the children along; the
//! state file is the second line of defence, read at the next start to kill any leftover
//! that is still the same process. A pid whose start time differs belongs to someone else
//! and is never touched. The file is always replaced atomically (temp, fsync, rename); when
//! it cannot be written the daemon logs the problem and keeps serving.
//!
//! It also keeps what must outlive a daemon: every instance's model and load options, when
//! it was last used (the LRU order), and its pins, restored at the next start.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::instance::table::InstanceTable;
use crate::instance::view::millis_since_epoch;
use crate::model::ModelSpec;
use crate::paths;
use crate::process;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChildRecord {
    pub pid: u32,
    pub start_time: u64,
    pub model: String,
}

/// An instance as it is remembered across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InstanceRecord {
    pub model: ModelSpec,
    pub last_used_ms: Option<u64>,
    pub pinned: bool,
    pub pinned_until_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    daemon_pid: u32,
    /// The daemon's kernel start time, so a reused pid is never taken for it.
    #[serde(default)]
    daemon_start_time: Option<u64>,
    children: Vec<ChildRecord>,
    #[serde(default)]
    instances: Vec<InstanceRecord>,
}

/// Everything the state file holds now.
pub(crate) fn snapshot(table: &InstanceTable) -> Snapshot {
    (children(table), instances(table))
}

fn instances(table: &InstanceTable) -> Vec<InstanceRecord> {
    table
        .all()
        .iter()
        .map(|instance| {
            let last_used_ms = instance.last_used().map(millis_since_epoch);
            instance.with_view(|view| InstanceRecord {
                model: view.spec.clone(),
                last_used_ms,
                pinned: view.pinned_by_command,
                pinned_until_ms: view.pinned_until.map(millis_since_epoch),
            })
        })
        .collect()
}

/// What the state file holds, to tell when it must be written again.
pub(crate) type Snapshot = (Vec<ChildRecord>, Vec<InstanceRecord>);

/// How much two snapshots differ: children, models or pins, which a restart after a crash
/// needs at once, or only when models were last used, which moves with every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    LastUse,
    Shape,
}

pub(crate) fn change(written: &Snapshot, current: &Snapshot) -> Change {
    if written == current {
        return Change::None;
    }
    let same_but_last_use = written.0 == current.0
        && written.1.len() == current.1.len()
        && written.1.iter().zip(&current.1).all(|(old, new)| {
            old.model == new.model && old.pinned == new.pinned && old.pinned_until_ms == new.pinned_until_ms
        });
    if same_but_last_use {
        Change::LastUse
    } else {
        Change::Shape
    }
}

/// What an earlier daemon left: the state file, read once at start. A file that cannot be
/// read as a state (not UTF-8, not JSON, a wrong shape) is kept aside as `state.json.corrupt`
/// for a person to look at, and logged; the daemon starts without it.
pub(crate) fn load(path: &Path) -> Remembered {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Remembered::default(),
        Err(e) => {
            log::warn!("cannot read the state file {}: {e}; starting without it", path.display());
            return Remembered::default();
        }
    };
    match serde_json::from_slice::<StateFile>(&bytes) {
        Ok(state) => Remembered {
            owner: state.daemon_start_time.map(|start_time| (state.daemon_pid, start_time)),
            children: state.children,
            instances: state.instances,
        },
        Err(error) => {
            let aside = path.with_extension("json.corrupt");
            let kept = fs::rename(path, &aside).map(|()| format!("kept as {}", aside.display()));
            log::error!(
                "the state file {} is unreadable ({error}); {}; LRU order and pins start afresh",
                path.display(),
                kept.unwrap_or_else(|e| format!("cannot keep it aside: {e}"))
            );
            Remembered::default()
        }
    }
}

/// What the state file said.
#[derive(Debug, Default)]
pub(crate) struct Remembered {
    /// The daemon that wrote it: pid and start time.
    pub owner: Option<(u32, u64)>,
    pub children: Vec<ChildRecord>,
    pub instances: Vec<InstanceRecord>,
}

/// The children running now, in a stable order.
fn children(table: &InstanceTable) -> Vec<ChildRecord> {
    let mut children: Vec<ChildRecord> = table
        .all()
        .iter()
        .filter_map(|instance| {
            instance.with_view(|view| {
                Some(ChildRecord {
                    pid: view.pid?,
                    start_time: view.start_time?,
                    model: view.spec.path.display().to_string(),
                })
            })
        })
        .collect();
    children.sort_by_key(|child| child.pid);
    children
}

/// Writes the state file; on failure logs it and returns the reason for `status`.
pub(crate) fn write(path: &Path, table: &InstanceTable) -> Result<(), String> {
    let state = StateFile {
        daemon_pid: std::process::id(),
        daemon_start_time: process::start_time(std::process::id()),
        children: children(table),
        instances: instances(table),
    };
    let mut json = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
    json.push(b'\n');
    if let Some(dir) = path.parent() {
        let _ = crate::paths::create_private_dirs(dir);
    }
    paths::write_atomically(path, &json)
        .map_err(|error| format!("cannot write the state file {}: {error}", path.display()))
}

/// Kills the children recorded by a daemon that did not shut down cleanly. A daemon that
/// still runs is never "earlier": its children are left alone.
pub(crate) fn kill_leftovers(remembered: &Remembered) {
    if let Some((pid, start_time)) = remembered.owner {
        let alive = pid != std::process::id() && process::start_time(pid) == Some(start_time);
        if alive {
            // One that is still exiting after a shutdown has stopped its children already.
            if !remembered.children.is_empty() {
                log::warn!(
                    "the state file belongs to a running llmctl daemon (pid {pid}); its children are left alone"
                );
            }
            return;
        }
    }
    for child in &remembered.children {
        if process::kill_leftover(child.pid, child.start_time) {
            log::warn!("killed llama-server pid {} left by an earlier daemon ({})", child.pid, child.model);
        } else {
            log::info!("pid {} from the state file is gone or reused; left alone", child.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, Policy};

    fn record(name: &str, last_used_ms: u64, pinned: bool) -> InstanceRecord {
        InstanceRecord {
            model: ModelSpec {
                name: name.into(),
                path: format!("/models/{name}.gguf").into(),
                load: LoadOptions::default(),
                policy: Policy::default(),
                remote: None,
            },
            last_used_ms: Some(last_used_ms),
            pinned,
            pinned_until_ms: None,
        }
    }

    #[test]
    fn a_new_last_use_alone_is_told_from_a_change_a_restart_needs() {
        let child = ChildRecord { pid: 7, start_time: 100, model: "/models/a.gguf".into() };
        let written: Snapshot = (vec![child.clone()], vec![record("a", 1_000, false), record("b", 900, false)]);
        assert_eq!(change(&written, &written.clone()), Change::None);

        let used = (vec![child.clone()], vec![record("a", 2_000, false), record("b", 900, false)]);
        assert_eq!(change(&written, &used), Change::LastUse);

        let pinned = (vec![child.clone()], vec![record("a", 2_000, true), record("b", 900, false)]);
        assert_eq!(change(&written, &pinned), Change::Shape, "a pin, even with a new last use");
        let stopped = (vec![], vec![record("a", 1_000, false), record("b", 900, false)]);
        assert_eq!(change(&written, &stopped), Change::Shape, "a child gone");
        let added = (vec![child], vec![record("a", 1_000, false), record("b", 900, false), record("c", 0, false)]);
        assert_eq!(change(&written, &added), Change::Shape, "a model added");
    }
}
