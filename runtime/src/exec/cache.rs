//! The output cache: node outputs by cache key, an LRU bounded in bytes.

use super::plan::CacheKey;
use crate::registry::PluginInfo;
use crate::value::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The outputs of one node execution.
pub type Outputs = Arc<[Option<Arc<Value>>]>;

struct Entry {
    outputs: Outputs,
    /// The plugin whose node made the outputs, to drop them when it is reloaded.
    origin: Option<Arc<PluginInfo>>,
    bytes: usize,
    tick: u64,
}

/// A byte-bounded LRU of node outputs.
pub struct Cache {
    entries: HashMap<CacheKey, Entry>,
    /// Recency order: tick → key.
    order: BTreeMap<u64, CacheKey>,
    tick: u64,
    bytes: usize,
    capacity: usize,
}

/// Counters for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub capacity: usize,
}

impl Cache {
    /// A cache holding at most `capacity` bytes of outputs.
    pub fn new(capacity: usize) -> Cache {
        Cache {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            capacity,
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The outputs stored under `key`, marking them recently used.
    pub fn get(&mut self, key: CacheKey) -> Option<Outputs> {
        let tick = self.next_tick();
        let entry = self.entries.get_mut(&key)?;
        self.order.remove(&entry.tick);
        entry.tick = tick;
        self.order.insert(tick, key);
        Some(entry.outputs.clone())
    }

    /// Stores outputs, evicting the least recently used entries to stay within capacity. Outputs
    /// larger than the whole capacity are not stored.
    pub fn insert(&mut self, key: CacheKey, outputs: Outputs) {
        self.insert_from(key, outputs, None)
    }

    /// [`Cache::insert`], remembering which plugin made the outputs.
    pub fn insert_from(
        &mut self,
        key: CacheKey,
        outputs: Outputs,
        origin: Option<Arc<PluginInfo>>,
    ) {
        let bytes: usize = outputs.iter().flatten().map(|v| v.byte_size()).sum();
        self.remove(key);
        if bytes > self.capacity {
            return;
        }
        while self.bytes + bytes > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.bytes;
            }
        }
        let tick = self.next_tick();
        self.order.insert(tick, key);
        self.entries.insert(
            key,
            Entry {
                outputs,
                origin,
                bytes,
                tick,
            },
        );
        self.bytes += bytes;
    }

    pub fn remove(&mut self, key: CacheKey) {
        if let Some(e) = self.entries.remove(&key) {
            self.order.remove(&e.tick);
            self.bytes -= e.bytes;
        }
    }

    /// Drops every entry made by a plugin for which `stale` is true; returns how many.
    pub fn remove_from(&mut self, stale: impl Fn(&PluginInfo) -> bool) -> usize {
        let keys: Vec<CacheKey> = self
            .entries
            .iter()
            .filter(|(_, e)| e.origin.as_deref().is_some_and(&stale))
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            self.remove(*k);
        }
        keys.len()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        while self.bytes > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.bytes;
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            bytes: self.bytes,
            capacity: self.capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(s: &str) -> Outputs {
        vec![Some(Arc::new(Value::string(s)))].into()
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let one = out("aaaa")
            .iter()
            .flatten()
            .map(|v| v.byte_size())
            .sum::<usize>();
        let mut c = Cache::new(2 * one);
        c.insert(CacheKey(1), out("aaaa"));
        c.insert(CacheKey(2), out("bbbb"));
        assert!(c.get(CacheKey(1)).is_some()); // 1 is now the most recent
        c.insert(CacheKey(3), out("cccc"));
        assert!(
            c.get(CacheKey(2)).is_none(),
            "2 was the least recently used"
        );
        assert!(c.get(CacheKey(1)).is_some() && c.get(CacheKey(3)).is_some());
        assert_eq!(c.stats().bytes, 2 * one);
        assert_eq!(c.stats().entries, 2);
    }

    #[test]
    fn oversized_outputs_are_not_stored_and_replacing_keeps_accounting() {
        let mut c = Cache::new(8);
        c.insert(CacheKey(1), out("this is far too long for the cache"));
        assert_eq!(
            c.stats(),
            CacheStats {
                entries: 0,
                bytes: 0,
                capacity: 8
            }
        );
        let mut c = Cache::new(1 << 20);
        c.insert(CacheKey(1), out("x"));
        c.insert(CacheKey(1), out("y"));
        assert_eq!(c.stats().entries, 1);
        c.set_capacity(0);
        assert_eq!(c.stats().bytes, 0);
    }
}
