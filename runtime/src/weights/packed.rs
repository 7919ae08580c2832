//! Linear weights in the CPU GEMM's panel layout, packed once per weight and kept with it.
//!
//! The first product of more than [`GEMV_ROWS`] rows that reads an f32 linear weight packs it
//! into the GEMM's NR-wide panels ([`PackedB`]), and the packed form stays with the weight's
//! storage ([`Tensor::packed_weight`]): it belongs to the model that holds the weight and goes
//! when the model does. Later products skip per-call packing, a read and a write of the whole
//! weight on every call. A memory-mapped weight's file pages are released once it is packed,
//! so the process keeps one copy resident (the file's pages come back only if something reads
//! the stored layout again: a product of a few rows, or a move to a GPU).
//!
//! bf16, f16 and block-quantized weights are read as stored (widened or dequantised per panel):
//! a packed f32 copy would double or quadruple their memory. Under a memory cap
//! ([`residency`]) f32 weights are packed per call as well, so only capped bytes stay resident.
//! The panels hold the same values either way, and the GEMM sums them in the same order, so the
//! products are bit-identical packed or not.

use super::residency;
use crate::kernels::cpu::gemm::{MatRef, PackedB};
use crate::kernels::cpu::gemv::GEMV_ROWS;
use crate::tensor::{DType, Tensor};

/// The packed form of f32 linear weight `w` (`[n, k]`, read as the `k×n` operand B) for a
/// product of `rows` rows, made now if this is its first use; `None` where the weight is read
/// as stored.
pub(crate) fn packed_linear_weight(w: &Tensor, rows: usize) -> Option<&PackedB> {
    if w.dtype() != DType::F32 || w.rank() != 2 || rows <= GEMV_ROWS {
        return None;
    }
    // Owned weights (a loader's fused q·k·v) keep their bytes: packing them would hold two
    // copies. Under a cap, weights stream from their files instead.
    if !w.has_packed_weight() && (!w.is_mapped() || residency::cap().is_some()) {
        return None;
    }
    // Packing runs on the thread pool; a product already inside it could, while it waits, be
    // handed another product of the same weight, whose first use would then wait on itself.
    if !w.has_packed_weight() && rayon::current_thread_index().is_some() {
        return None;
    }
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let data = w.as_slice::<f32>().ok()?;
    let packed = w.packed_weight(
        |p| p.k == k && p.n == n,
        || {
            // SAFETY: `data` holds the `n×k` weight, read as its `k×n` transpose.
            let p = unsafe { PackedB::new(k, n, MatRef::row_major(data, k, true)) };
            if let Some((map, offset, len)) = w.mapped_range() {
                residency::release_pages(map, offset, len);
            }
            p
        },
    )?;
    Some(packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::ops;
    use std::sync::Arc;

    /// A `[n, k]` f32 weight memory-mapped from a file of its own, and the same values owned.
    fn mapped_and_owned(n: usize, k: usize) -> (Tensor, Tensor) {
        let values: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let path = std::env::temp_dir().join(format!("ditflow-packed-{}.bin", std::process::id()));
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the file is this test's own and is not changed while mapped.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        let _ = std::fs::remove_file(&path);
        let mapped = Tensor::from_mapped(DType::F32, &[n, k], &map, 0, bytes.len()).unwrap();
        (mapped, Tensor::from_f32(&[n, k], &values).unwrap())
    }

    #[test]
    fn a_mapped_weight_is_packed_once_and_gives_the_bits_of_one_packed_per_call() {
        let (n, k) = (48, 40);
        let (mapped, owned) = mapped_and_owned(n, k);
        let x: Vec<f32> = (0..20 * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0)
            .collect();
        let x = Tensor::from_f32(&[20, k], &x).unwrap();
        let act = crate::kernels::cpu::Activation::None;
        // A product of few rows reads the weight as stored and packs nothing.
        let few = ops::slice(&x, 0, 0, 4, 1).unwrap();
        ops::linear(&few, &mapped, None, act).unwrap();
        assert!(!mapped.has_packed_weight());
        let packed = ops::linear(&x, &mapped, None, act).unwrap();
        assert!(
            mapped.has_packed_weight(),
            "the mapped weight was not packed"
        );
        assert!(!owned.has_packed_weight());
        let per_call = ops::linear(&x, &owned, None, act).unwrap();
        assert!(
            !owned.has_packed_weight(),
            "an owned weight is packed per call"
        );
        assert_eq!(packed.as_f32(), per_call.as_f32());
        // Used again: the same packed form, the same bits.
        assert_eq!(
            ops::linear(&x, &mapped, None, act).unwrap().as_f32(),
            per_call.as_f32()
        );
    }
}
