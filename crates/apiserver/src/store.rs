//! The objects, one resource version counter for all of them (as etcd's revision), the
//! history watches resume from, and the live watch feed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;

/// Where an object lives: its group and resource (all versions of a kind share it), its
/// namespace (`""` for cluster-scoped kinds) and name.
pub type Key = (String, String, String, String);

/// One change, as watches send it.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub group: String,
    pub resource: String,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    pub object: Value,
    /// When it was recorded (for benchmarks that time the cluster's side of a change).
    pub at: std::time::Instant,
}

impl Event {
    /// The changed object's `metadata.<field>` (`name`, `namespace`), or `""`.
    pub fn meta(&self, field: &str) -> String {
        self.object
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }
}

/// How many changes watches can resume from; older resource versions get `410 Gone`.
const HISTORY: usize = 100_000;

pub struct Store {
    pub rv: u64,
    pub objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
    /// Resource versions at or below this are gone from the history.
    compacted: u64,
    pub feed: tokio::sync::broadcast::Sender<Arc<Event>>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 0,
            feed: tokio::sync::broadcast::channel(65_536).0,
        }
    }
}

impl Store {
    /// Records a change: the next resource version is set on `object`, kept in the history and
    /// sent to the watches.
    pub fn record(&mut self, key: &Key, kind: &'static str, mut object: Value) -> Value {
        self.rv += 1;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        }
        if kind == "DELETED" {
            self.objects.remove(key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        let event = Arc::new(Event {
            rv: self.rv,
            group: key.0.clone(),
            resource: key.1.clone(),
            kind,
            object: object.clone(),
            at: std::time::Instant::now(),
        });
        self.history.push_back(event.clone());
        if self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        let _ = self.feed.send(event);
        object
    }

    /// The changes after `rv` (for a watch resuming there), or `None` when they are
    /// compacted away (the client must list again: `410 Gone`).
    pub fn since(&self, rv: u64) -> Option<Vec<Arc<Event>>> {
        if rv < self.compacted {
            return None;
        }
        Some(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    /// Whether `rv` is still in the history (a list continued from it is consistent enough).
    pub fn current(&self, rv: u64) -> bool {
        rv >= self.compacted
    }

    /// Forgets the history: a watch from any earlier resource version gets `410 Gone`, as
    /// after etcd compacts.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }
}
