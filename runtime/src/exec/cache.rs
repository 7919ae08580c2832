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
    /// Bytes of model weights among the outputs ([`Value::model_bytes`]).
    model_bytes: usize,
    tick: u64,
}

/// A byte-bounded LRU of node outputs. Outputs count their own bytes against the capacity;
/// loaded models count their weights against a separate cap (the memory cap, when one is set),
/// so a session keeps every model it uses until they pass the cap, and then lets go of the least
/// recently used ones.
pub struct Cache {
    entries: HashMap<CacheKey, Entry>,
    /// Recency order: tick → key.
    order: BTreeMap<u64, CacheKey>,
    tick: u64,
    bytes: usize,
    capacity: usize,
    model_bytes: usize,
    model_cap: Option<usize>,
    /// Entries dropped to make room for models, since the cache was made.
    models_evicted: usize,
}

/// Counters for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub capacity: usize,
    /// Entries holding loaded models, and the bytes of their weights.
    pub models: usize,
    pub model_bytes: usize,
    /// Cached models let go because the models passed the memory cap.
    pub models_evicted: usize,
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
            model_bytes: 0,
            model_cap: None,
            models_evicted: 0,
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
    /// larger than the whole capacity are not stored. Outputs holding models first evict the
    /// least recently used models until all fit under the model cap; the newest model is kept
    /// even when it alone is larger (its weights stream from their files under the cap).
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
        let model_bytes: usize = outputs.iter().flatten().map(|v| v.model_bytes()).sum();
        self.remove(key);
        if bytes > self.capacity {
            return;
        }
        while self.bytes + bytes > self.capacity {
            let Some(&oldest) = self.order.values().next() else {
                break;
            };
            self.remove(oldest);
        }
        if let Some(cap) = self.model_cap.filter(|_| model_bytes > 0) {
            self.evict_models(cap.saturating_sub(model_bytes));
        }
        let tick = self.next_tick();
        self.order.insert(tick, key);
        self.entries.insert(
            key,
            Entry {
                outputs,
                origin,
                bytes,
                model_bytes,
                tick,
            },
        );
        self.bytes += bytes;
        self.model_bytes += model_bytes;
    }

    /// Drops the least recently used entries holding models until their weights take at most
    /// `limit` bytes.
    fn evict_models(&mut self, limit: usize) {
        while self.model_bytes > limit {
            let Some(oldest) = self
                .order
                .values()
                .find(|k| self.entries.get(k).is_some_and(|e| e.model_bytes > 0))
                .copied()
            else {
                break;
            };
            self.remove(oldest);
            self.models_evicted += 1;
        }
    }

    pub fn remove(&mut self, key: CacheKey) {
        if let Some(e) = self.entries.remove(&key) {
            self.order.remove(&e.tick);
            self.bytes -= e.bytes;
            self.model_bytes -= e.model_bytes;
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
        self.model_bytes = 0;
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        while self.bytes > self.capacity {
            let Some(&oldest) = self.order.values().next() else {
                break;
            };
            self.remove(oldest);
        }
    }

    /// Sets the cap on cached models' weights (`None`: none); models past it are let go, least
    /// recently used first, except the newest.
    pub fn set_model_cap(&mut self, cap: Option<usize>) {
        self.model_cap = cap;
        if let Some(cap) = cap {
            let newest = self
                .order
                .values()
                .rev()
                .find_map(|k| {
                    self.entries
                        .get(k)
                        .map(|e| e.model_bytes)
                        .filter(|&b| b > 0)
                })
                .unwrap_or(0);
            self.evict_models(cap.max(newest));
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            bytes: self.bytes,
            capacity: self.capacity,
            models: self.entries.values().filter(|e| e.model_bytes > 0).count(),
            model_bytes: self.model_bytes,
            models_evicted: self.models_evicted,
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

    /// A model value whose weights take `bytes`.
    fn model(bytes: usize) -> Outputs {
        let mut o = crate::value::Object::new("m".into(), std::ptr::dangling_mut(), None, None);
        o.weight_bytes = bytes;
        vec![Some(Arc::new(Value::Object(Arc::new(o))))].into()
    }

    #[test]
    fn models_past_the_model_cap_go_least_recently_used_first_and_the_newest_stays() {
        let mut c = Cache::new(1 << 20);
        c.insert(CacheKey(1), model(600));
        c.insert(CacheKey(2), model(600));
        c.insert(CacheKey(9), out("not a model"));
        assert_eq!(
            (c.stats().models, c.stats().model_bytes),
            (2, 1200),
            "no cap: all kept"
        );
        c.set_model_cap(Some(1000));
        assert!(c.get(CacheKey(1)).is_none(), "the older model goes");
        assert!(c.get(CacheKey(2)).is_some());
        c.insert(CacheKey(3), model(300));
        assert_eq!(c.stats().model_bytes, 900);
        assert!(c.get(CacheKey(2)).is_some()); // 3 is now the least recently used
        c.insert(CacheKey(4), model(200));
        assert!(
            c.get(CacheKey(3)).is_none(),
            "3 was the least recently used model"
        );
        assert_eq!(c.stats().model_bytes, 800);
        // A model larger than the cap alone: kept, every other model let go.
        c.insert(CacheKey(5), model(5000));
        assert_eq!((c.stats().models, c.stats().model_bytes), (1, 5000));
        assert!(c.get(CacheKey(5)).is_some());
        assert!(
            c.get(CacheKey(9)).is_some(),
            "outputs that are not models stay"
        );
        assert_eq!(c.stats().models_evicted, 4);
        c.set_model_cap(None);
        c.insert(CacheKey(6), model(5000));
        assert_eq!(c.stats().models, 2, "no cap again: both kept");
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
                capacity: 8,
                ..CacheStats::default()
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
