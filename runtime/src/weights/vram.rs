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
//! Not yet: uploads ahead of use on a second stream; each staging upload runs on the compute
//! stream, so it does not overlap the kernels.

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

struct Entry<C> {
    copy: C,
    bytes: usize,
    last_use: u64,
    /// Whether the host weight is still alive (a dead one's key may be reused).
    host: Tensor,
}

/// One device's staged weights: device copies (`C`) of host weights, least recently used first
/// to go.
pub(crate) struct Staged<C> {
    entries: HashMap<Key, Entry<C>>,
    bytes: usize,
    clock: u64,
}

impl<C: Clone> Default for Staged<C> {
    fn default() -> Self {
        Staged {
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
        }
    }
}

impl<C: Clone> Staged<C> {
    /// The device copy of host weight `w`, made by `upload` unless staged already, within
    /// `budget` bytes of staged weights (what the loaded weights leave of the cap): older copies
    /// are let go first. `cap` is the whole cap, for the error when `w` alone passes it.
    pub(crate) fn stage(
        &mut self,
        w: &Tensor,
        budget: usize,
        cap: usize,
        upload: impl FnOnce() -> Result<C, String>,
    ) -> Result<C, String> {
        self.clock += 1;
        let key = (w.storage_id(), w.dtype(), w.shape().to_vec());
        if let Some(e) = self.entries.get_mut(&key) {
            e.last_use = self.clock;
            return Ok(e.copy.clone());
        }
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
        while self.bytes + bytes > budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
        let copy = upload()?;
        super::residency::count_streamed(bytes as u64);
        self.bytes += bytes;
        self.entries.insert(
            key,
            Entry {
                copy: copy.clone(),
                bytes,
                last_use: self.clock,
                host: w.clone(),
            },
        );
        Ok(copy)
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

    /// Lets go of the copies whose host weight nothing else holds (its model is gone).
    pub(crate) fn forget_dropped(&mut self) {
        let dead: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| e.host.storage_refs() == 1)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &dead {
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

    #[test]
    fn staged_copies_are_reused_and_the_least_recently_used_go_past_the_budget() {
        let (a, b, c) = (weight(100), weight(100), weight(100));
        let mut staged = Staged::<u32>::default();
        let uploads = std::cell::Cell::new(0);
        let stage = |s: &mut Staged<u32>, w: &Tensor| {
            s.stage(w, 800, 1000, || {
                uploads.set(uploads.get() + 1);
                Ok(uploads.get())
            })
        };
        assert_eq!(stage(&mut staged, &a), Ok(1));
        assert_eq!(stage(&mut staged, &b), Ok(2));
        assert_eq!(stage(&mut staged, &a), Ok(1), "a staged copy is reused");
        assert_eq!(staged.bytes(), 800);
        // c passes the budget: b, the least recently used, goes.
        assert_eq!(stage(&mut staged, &c), Ok(3));
        assert_eq!(staged.bytes(), 800);
        assert_eq!(stage(&mut staged, &a), Ok(1));
        assert_eq!(stage(&mut staged, &b), Ok(4), "b is uploaded again");
        // A weight larger than the whole cap is an error naming it.
        let big = weight(1000);
        let e = stage(&mut staged, &big).unwrap_err();
        assert!(e.contains("VRAM cap") && e.contains("--max-vram"), "{e}");
        // Copies of weights whose model is gone are let go.
        drop((a, c));
        staged.forget_dropped();
        assert_eq!(staged.bytes(), 400);
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
