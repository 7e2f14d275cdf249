//! The instance table: every instance the daemon knows, keyed by model and load options,
//! and by the number the scheduler knows it by. The lock guards the two maps only: callers
//! clone the `Arc<Handle>` out and drop the guard before sending anything. A new instance's
//! worker thread is started under the lock, so one key never gets two workers.
//!
//! Stopped instances are kept, for `status` and the next request, up to
//! [`KEPT_STOPPED`]; the supervisor retires the least recently used beyond that, so a
//! client asking for ever new load options cannot grow the daemon a thread at a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::worker::{self, Services};
use super::{key_of, FileStamp, Handle, Key};
use crate::gguf::ModelInfo;
use crate::model::ModelSpec;

/// Stopped instances kept beyond the ones loaded or pinned.
pub(crate) const KEPT_STOPPED: usize = 16;

#[derive(Default)]
pub(crate) struct InstanceTable {
    inner: Mutex<Maps>,
}

#[derive(Default)]
struct Maps {
    by_key: BTreeMap<Key, Arc<Handle>>,
    by_id: BTreeMap<usize, Arc<Handle>>,
    next_id: usize,
}

impl InstanceTable {
    /// The instance for `spec`, if there is one.
    pub(crate) fn get(&self, spec: &ModelSpec) -> Option<Arc<Handle>> {
        self.inner.lock().by_key.get(&key_of(spec)).cloned()
    }

    /// The instance for `spec`, started (stopped, with its worker waiting) if it is new.
    pub(crate) fn get_or_start(
        &self,
        spec: &ModelSpec,
        info: ModelInfo,
        stamp: FileStamp,
        services: &Arc<Services>,
    ) -> std::io::Result<Arc<Handle>> {
        let mut maps = self.inner.lock();
        let key = key_of(spec);
        if let Some(handle) = maps.by_key.get(&key) {
            return Ok(Arc::clone(handle));
        }
        let id = maps.next_id;
        let handle = Arc::new(worker::start(id, spec.clone(), info, stamp, Arc::clone(services))?);
        maps.next_id += 1;
        maps.by_key.insert(key, Arc::clone(&handle));
        maps.by_id.insert(id, Arc::clone(&handle));
        Ok(handle)
    }

    pub(crate) fn by_id(&self, id: usize) -> Option<Arc<Handle>> {
        self.inner.lock().by_id.get(&id).cloned()
    }

    /// Every instance with the number the scheduler knows it by.
    pub(crate) fn all_with_ids(&self) -> Vec<(usize, Arc<Handle>)> {
        self.inner.lock().by_id.iter().map(|(&id, handle)| (id, Arc::clone(handle))).collect()
    }

    /// Takes instance `id` out of the table when it is stopped (or failed), unpinned and
    /// held by nothing but the table, so that no request can reach it any more; the caller
    /// then ends its worker. Under the table's lock nobody can take a new reference, and a
    /// request holds its reference from lookup to its end, so none is on its way in.
    pub(crate) fn remove_unused(&self, id: usize) -> Option<Arc<Handle>> {
        let mut maps = self.inner.lock();
        let handle = maps.by_id.get(&id)?;
        // One reference in each map; any other is a request, a report or a plan using it.
        if Arc::strong_count(handle) != 2 {
            return None;
        }
        let key = handle.with_view(|view| view.retirable().then(|| key_of(&view.spec)))?;
        maps.by_key.remove(&key);
        maps.by_id.remove(&id)
    }

    pub(crate) fn all(&self) -> Vec<Arc<Handle>> {
        self.inner.lock().by_id.values().cloned().collect()
    }
}
