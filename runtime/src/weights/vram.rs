//! The VRAM cap on weights (`--max-vram`): how many bytes of model weights each GPU holds.
//!
//! A model loaded for a GPU with a cap set uploads its weights while the device's loaded weights
//! fit under the cap ([`try_charge`]) and leaves the rest in host memory, as stored (memory-mapped
//! where the file allows). An op on the GPU that meets such a weight stages it ([`Staged`]): the
//! device copy is made on first use and kept among the device's staged weights, which give up
//! their least recently used copies when the next would pass what the loaded weights leave of the
//! cap. So a model larger than the cap runs with about the cap of its weights on the device and
//! the rest uploaded per use. The bytes uploaded are counted with the memory cap's streamed bytes
//! ([`super::residency::streamed_bytes`]) and so reported in `weights_streamed` events. The
//! values are the same either way, and so is the result. A weight larger than the whole cap is
//! an error that names the cap.
//!
//! Uploads run ahead of use. The staged weights remember which weight followed which the last
//! time through (a model's forward uses its weights in the same order at every step), and when a
//! weight is used the next [`AHEAD`] are uploaded on a second stream, so the copies overlap the
//! kernels that use this one ([`Upload::ahead`]). The first use of a copy made ahead waits for
//! it on the compute stream ([`Upload::ready`]). The first forward, with nothing learnt yet,
//! uploads each weight on first use.

use crate::tensor::{DType, Tensor};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The cap in bytes per device; 0: none.
static CAP: AtomicUsize = AtomicUsize::new(0);
/// Bytes of weights uploaded at load and still alive, by device ordinal.
static LOADED: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);

/// Sets the cap on each GPU's weights (`None`: no cap, the default). It applies to models
/// loaded and weights staged from then on.
pub fn set_cap(bytes: Option<usize>) {
    CAP.store(bytes.unwrap_or(0), Ordering::Relaxed);
}

/// The cap on each GPU's weights, if one is set.
pub fn cap() -> Option<usize> {
    Some(CAP.load(Ordering::Relaxed)).filter(|&c| c > 0)
}

fn with_loaded<T>(f: impl FnOnce(&mut HashMap<usize, usize>) -> T) -> T {
    let mut guard = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(HashMap::new))
}

/// Charges `bytes` of a weight being loaded to device `ordinal` when they fit under the cap;
/// false leaves the weight in host memory. Always true, charging nothing, without a cap.
pub(crate) fn try_charge(ordinal: usize, bytes: usize) -> bool {
    let Some(cap) = cap() else {
        return true;
    };
    with_loaded(|loaded| {
        let used = loaded.entry(ordinal).or_default();
        if *used + bytes <= cap {
            *used += bytes;
            true
        } else {
            false
        }
    })
}

/// Returns the charge of a loaded weight whose device copy is gone.
pub(crate) fn uncharge(ordinal: usize, bytes: usize) {
    with_loaded(|loaded| {
        if let Some(used) = loaded.get_mut(&ordinal) {
            *used = used.saturating_sub(bytes);
        }
    })
}

/// Bytes of loaded weights on device `ordinal`.
pub(crate) fn loaded_bytes(ordinal: usize) -> usize {
    with_loaded(|loaded| loaded.get(&ordinal).copied().unwrap_or(0))
}

/// What identifies a host weight: its storage, dtype and shape.
type Key = (usize, DType, Vec<usize>);

/// How many weights past the one in use are uploaded ahead.
pub(crate) const AHEAD: usize = 2;

/// How a device makes copies of host weights.
pub(crate) trait Upload<C> {
    /// A copy of `w` for use now.
    fn now(&mut self, w: &Tensor) -> Result<C, String>;
    /// A copy of `w` begun ahead of use (on a second stream); not to be read before [`ready`].
    ///
    /// [`ready`]: Upload::ready
    fn ahead(&mut self, w: &Tensor) -> Result<C, String>;
    /// Makes what runs next wait for the copy `c` that [`Upload::ahead`] began.
    fn ready(&mut self, c: &C) -> Result<(), String>;
}

struct Entry<C> {
    copy: C,
    bytes: usize,
    last_use: u64,
    /// Begun ahead of use and not yet waited for.
    pending: bool,
    /// Whether the host weight is still alive (a dead one's key may be reused).
    host: Tensor,
}

/// One device's staged weights: device copies (`C`) of host weights, least recently used first
/// to go.
pub(crate) struct Staged<C> {
    entries: HashMap<Key, Entry<C>>,
    bytes: usize,
    clock: u64,
    /// The weight staged after each one the last time through, with its host tensor.
    next: HashMap<Key, (Key, Tensor)>,
    /// The weight staged last.
    last: Option<Key>,
}

impl<C: Clone> Default for Staged<C> {
    fn default() -> Self {
        Staged {
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
            next: HashMap::new(),
            last: None,
        }
    }
}

fn key_of(w: &Tensor) -> Key {
    (w.storage_id(), w.dtype(), w.shape().to_vec())
}

impl<C: Clone> Staged<C> {
    /// The device copy of host weight `w`, made by `up` unless staged already, within `budget`
    /// bytes of staged weights (what the loaded weights leave of the cap): older copies are let
    /// go first. `cap` is the whole cap, for the error when `w` alone passes it. Then the
    /// weights that followed `w` last time are begun ahead, as far as the budget allows without
    /// letting go of `w` or of each other.
    pub(crate) fn stage(
        &mut self,
        w: &Tensor,
        budget: usize,
        cap: usize,
        up: &mut impl Upload<C>,
    ) -> Result<C, String> {
        self.clock += 1;
        let key = key_of(w);
        if let Some(prev) = self.last.replace(key.clone()) {
            if prev != key && self.next.get(&prev).map(|(k, _)| k) != Some(&key) {
                self.next.insert(prev, (key.clone(), w.clone()));
            }
        }
        let copy = if let Some(e) = self.entries.get_mut(&key) {
            e.last_use = self.clock;
            if e.pending {
                up.ready(&e.copy)?;
                e.pending = false;
            }
            e.copy.clone()
        } else {
            let bytes = w.nbytes();
            if bytes > cap {
                return Err(format!(
                    "a {} weight {:?} of {} MiB does not fit under the VRAM cap of {} MiB: raise \
                     --max-vram to at least its size",
                    w.dtype().name(),
                    w.shape(),
                    bytes >> 20,
                    cap >> 20
                ));
            }
            self.make_room(bytes, budget, &[]);
            let copy = up.now(w)?;
            self.insert(key.clone(), w, copy.clone(), false);
            copy
        };
        self.stage_ahead(key, budget, up);
        Ok(copy)
    }

    /// Begins copies of the [`AHEAD`] weights that followed `key` last time.
    fn stage_ahead(&mut self, key: Key, budget: usize, up: &mut impl Upload<C>) {
        let mut keep = vec![key.clone()];
        let mut at = key;
        for _ in 0..AHEAD {
            let Some((k, host)) = self.next.get(&at).cloned() else {
                break;
            };
            if keep.contains(&k) {
                break;
            }
            keep.push(k.clone());
            if let Some(e) = self.entries.get_mut(&k) {
                // Staged already: keep it from going before its use.
                e.last_use = self.clock;
            } else {
                let bytes = host.nbytes();
                if !self.make_room(bytes, budget, &keep) {
                    break;
                }
                // A copy that cannot be begun is made on use, where its error is reported.
                let Ok(copy) = up.ahead(&host) else {
                    break;
                };
                self.insert(k.clone(), &host, copy, true);
            }
            at = k;
        }
    }

    /// Lets go of the least recently used copies, except those of `keep`, until `bytes` more
    /// fit in `budget`; false if they cannot.
    fn make_room(&mut self, bytes: usize, budget: usize, keep: &[Key]) -> bool {
        while self.bytes + bytes > budget {
            let Some(oldest) = self
                .entries
                .iter()
                .filter(|(k, _)| !keep.contains(k))
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| k.clone())
            else {
                return false;
            };
            self.remove(&oldest);
        }
        true
    }

    fn insert(&mut self, key: Key, host: &Tensor, copy: C, pending: bool) {
        let bytes = host.nbytes();
        super::residency::count_streamed(bytes as u64);
        self.bytes += bytes;
        self.entries.insert(
            key,
            Entry {
                copy,
                bytes,
                last_use: self.clock,
                pending,
                host: host.clone(),
            },
        );
    }

    fn remove(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            self.bytes -= e.bytes;
        }
    }

    /// Bytes of staged copies.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lets go of the copies, and of what was learnt of the order, whose host weight nothing
    /// else holds (its model is gone).
    pub(crate) fn forget_dropped(&mut self) {
        let mut ours: HashMap<usize, usize> = HashMap::new();
        let hosts = self.entries.values().map(|e| &e.host);
        for t in hosts.chain(self.next.values().map(|(_, t)| t)) {
            *ours.entry(t.storage_id()).or_default() += 1;
        }
        let dead = |t: &Tensor| t.storage_refs() <= ours[&t.storage_id()];
        let gone: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| dead(&e.host))
            .map(|(k, _)| k.clone())
            .collect();
        self.next.retain(|_, (_, t)| !dead(t));
        for k in &gone {
            self.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(n: usize) -> Tensor {
        Tensor::from_f32(&[n], &vec![1.0; n]).unwrap()
    }

    /// Copies numbered in the order they are made; logs how each was made.
    #[derive(Default)]
    struct Fake {
        made: u32,
        log: Vec<String>,
    }

    impl Upload<u32> for Fake {
        fn now(&mut self, _: &Tensor) -> Result<u32, String> {
            self.made += 1;
            self.log.push(format!("now {}", self.made));
            Ok(self.made)
        }
        fn ahead(&mut self, _: &Tensor) -> Result<u32, String> {
            self.made += 1;
            self.log.push(format!("ahead {}", self.made));
            Ok(self.made)
        }
        fn ready(&mut self, c: &u32) -> Result<(), String> {
            self.log.push(format!("ready {c}"));
            Ok(())
        }
    }

    #[test]
    fn staged_copies_are_reused_and_the_least_recently_used_go_past_the_budget() {
        let (a, b, c) = (weight(100), weight(100), weight(100));
        let mut staged = Staged::<u32>::default();
        let mut up = Fake::default();
        let mut stage = |s: &mut Staged<u32>, w: &Tensor| s.stage(w, 800, 1000, &mut up);
        assert_eq!(stage(&mut staged, &a), Ok(1));
        assert_eq!(stage(&mut staged, &b), Ok(2));
        // a is staged, and so is b, which followed it: nothing is begun ahead.
        assert_eq!(stage(&mut staged, &a), Ok(1), "a staged copy is reused");
        assert_eq!(staged.bytes(), 800);
        // c passes the budget: one of the others goes.
        assert_eq!(stage(&mut staged, &c), Ok(3));
        assert_eq!(staged.bytes(), 800);
        // A weight larger than the whole cap is an error naming it.
        let big = weight(1000);
        let e = stage(&mut staged, &big).unwrap_err();
        assert!(e.contains("VRAM cap") && e.contains("--max-vram"), "{e}");
        // Copies of weights whose model is gone are let go.
        drop((a, b, c, big));
        staged.forget_dropped();
        assert_eq!(staged.bytes(), 0);
        assert!(staged.next.is_empty(), "and what was learnt of their order");
    }

    #[test]
    fn the_weights_that_followed_last_time_are_begun_ahead_and_waited_for_on_use() {
        // Six weights of 100 bytes (400 for f32 of 100 elements) used in order, twice, under a
        // budget of three of them: the first pass uploads each on use; the second begins the
        // next two ahead of each use and waits for each before its use.
        let ws: Vec<Tensor> = (0..6).map(|_| weight(100)).collect();
        let mut staged = Staged::<u32>::default();
        let mut up = Fake::default();
        for w in &ws {
            staged.stage(w, 1200, 1200, &mut up).unwrap();
        }
        assert_eq!(
            up.log,
            (1..=6).map(|i| format!("now {i}")).collect::<Vec<_>>()
        );
        up.log.clear();
        for w in &ws {
            staged.stage(w, 1200, 1200, &mut up).unwrap();
        }
        // w0 comes on use (7), and w1, w2 ahead (8, 9); from then on each use finds its copy
        // begun, waits for it, and begins the one two ahead. Past w5 comes w0 again (the next
        // step's forward), so w4 and w5 begin w0 and w1.
        assert_eq!(
            up.log,
            [
                "now 7", "ahead 8", "ahead 9", "ready 8", "ahead 10", "ready 9", "ahead 11",
                "ready 10", "ahead 12", "ready 11", "ahead 13", "ready 12", "ahead 14",
            ]
        );
        assert_eq!(staged.bytes(), 1200, "the budget holds");
        // From then on, no weight waits for an upload on use.
        up.log.clear();
        for w in &ws {
            staged.stage(w, 1200, 1200, &mut up).unwrap();
        }
        assert!(!up.log.iter().any(|l| l.starts_with("now")), "{:?}", up.log);
        assert_eq!(up.log.iter().filter(|l| l.starts_with("ready")).count(), 6);
    }

    #[test]
    fn loaded_weights_are_charged_while_they_fit_under_the_cap() {
        // A device ordinal no other test uses. No other unit test loads for a GPU, so setting
        // the process-wide cap here changes nothing else.
        assert!(
            try_charge(90, usize::MAX / 2),
            "no cap: everything is uploaded"
        );
        assert_eq!(loaded_bytes(90), 0, "and nothing is charged");
        set_cap(Some(1000));
        let fits = [
            try_charge(90, 600),
            try_charge(90, 600),
            try_charge(90, 400),
        ];
        let used = loaded_bytes(90);
        uncharge(90, 600);
        let after = (try_charge(90, 600), loaded_bytes(90));
        set_cap(None);
        assert_eq!(fits, [true, false, true]);
        assert_eq!(used, 1000);
        assert_eq!(after, (true, 1000));
    }
}
