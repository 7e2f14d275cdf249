//! The instance table: every instance the daemon knows, keyed by model file and load
//! options. The lock guards the map only; callers clone the `Arc` out and drop the guard
//! before touching an instance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::gguf::ModelInfo;
use crate::instance::{FileStamp, Instance};
use crate::model::{LoadOptions, ModelSpec};

type Key = (PathBuf, LoadOptions);

#[derive(Default)]
pub struct InstanceTable {
    instances: Mutex<BTreeMap<Key, Arc<Instance>>>,
}

impl InstanceTable {
    /// The instance for `spec`, created (stopped) if it is new.
    pub fn get_or_insert(&self, spec: &ModelSpec, info: ModelInfo, stamp: FileStamp) -> Arc<Instance> {
        let key = (spec.path.clone(), spec.load.clone());
        let mut instances = self.instances.lock();
        Arc::clone(instances.entry(key).or_insert_with(|| Arc::new(Instance::new(spec.clone(), info, stamp))))
    }

    /// The instance for `spec`, if there is one.
    pub fn get(&self, spec: &ModelSpec) -> Option<Arc<Instance>> {
        let key = (spec.path.clone(), spec.load.clone());
        self.instances.lock().get(&key).cloned()
    }

    /// Every instance of the model file at `path`, whatever its load options.
    pub fn for_path(&self, path: &Path) -> Vec<Arc<Instance>> {
        let instances = self.instances.lock();
        instances.iter().filter(|((p, _), _)| p == path).map(|(_, i)| Arc::clone(i)).collect()
    }

    pub fn all(&self) -> Vec<Arc<Instance>> {
        self.instances.lock().values().cloned().collect()
    }
}
