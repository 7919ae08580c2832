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
