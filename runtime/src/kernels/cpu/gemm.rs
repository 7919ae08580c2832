//! f32 GEMM on the CPU: `C = A·B (+ C)`, then an optional bias and activation fused into the
//! store.
//!
//! BLIS's structure (Van Zee & van de Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS
//! Functionality", 2015): B is packed into KC×NR column panels shared by all threads, each thread
//! packs its own MC×KC block of A into MR-row panels, and a micro-kernel runs over panel pairs:
//! 24×16 with AVX-512 (one zmm register per row), 6×16 with AVX2/FMA, or portable code, picked
//! at run time. Every path sums each element of C in the same order with fused multiply-adds, so
//! AVX-512 and AVX2 give bit-identical products. Any strides work, so transposed operands need no
//! copy. Packing buffers are per-thread and reused: nothing is allocated per tile.
//!
//! Products of at most [`super::gemv::GEMV_ROWS`] rows against a weight stored row by row go to
//! [`super::gemv`] instead, which reads each weight row once at memory speed.

use super::aligned::AlignedBuf;
use super::{simd, Activation};
use crate::weights::quant::BlockFormat;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of the AVX2 and portable micro-tile (also used by attention).
pub const MR: usize = 6;
/// Columns of every micro-tile, and the width of a packed B panel.
pub const NR: usize = 16;
/// Rows of the AVX-512 micro-tile: 24 accumulators of one zmm register each.
const MR_AVX512: usize = 24;
/// The most rows a micro-tile has.
const MR_MAX: usize = MR_AVX512;
/// K steps per block. Each block adds its partial sums into C, so C goes through the caches
/// K / KC times: 512 halves that traffic against 256 (measured at Wan's and PixArt-Σ's shapes,
/// interleaved on 2 threads: the median 3-11% faster) while a packed A block (MC × KC) still
/// fits a core's L2.
const KC: usize = 512;
const NC: usize = 4080;
/// Columns per block of a B packed already: its KC-step slice (2 MiB) stays in a core's cache
/// whatever K is.
const NC_PACKED: usize = 2048;

/// A read-only strided matrix: element (i, j) is at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a `MatRef` is only read, and callers keep the data alive for the call.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}

impl MatRef {
    /// A row-major `rows × cols` matrix, or its transpose when `trans`.
    pub fn row_major(data: &[f32], cols: usize, trans: bool) -> MatRef {
        let (rs, cs) = if trans {
            (1, cols as isize)
        } else {
            (cols as isize, 1)
        };
        MatRef {
            ptr: data.as_ptr(),
            rs,
            cs,
        }
    }

    /// The transpose (no copy).
    fn transposed(self) -> MatRef {
        MatRef {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    #[inline]
    unsafe fn at(&self, i: usize, j: usize) -> *const f32 {
        self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
    }
}

/// A read-only strided matrix of bf16 values (their bits): element (i, j) is at
/// `ptr + i*rs + j*cs`. As a B operand it is converted to f32 while it is packed, per call, so a
/// bf16 weight needs no resident f32 copy.
#[derive(Clone, Copy)]
pub struct MatRefBf16 {
    pub ptr: *const u16,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: as for `MatRef`.
unsafe impl Send for MatRefBf16 {}
unsafe impl Sync for MatRefBf16 {}

impl MatRefBf16 {
    /// A row-major `rows × cols` matrix of bf16 bits, or its transpose when `trans`.
    pub fn row_major(data: &[u16], cols: usize, trans: bool) -> MatRefBf16 {
        let (rs, cs) = if trans {
            (1, cols as isize)
        } else {
            (cols as isize, 1)
        };
        MatRefBf16 {
            ptr: data.as_ptr(),
            rs,
            cs,
        }
    }

    #[inline]
    unsafe fn get(&self, i: usize, j: usize) -> f32 {
        bf16_to_f32(*self.ptr.offset(i as isize * self.rs + j as isize * self.cs))
    }
}

/// A matrix in one of ggml's block formats, read transposed as a GEMM's B operand: column j of
/// B is row j of the stored `[n, k]` weight, `row_bytes` apart, its k values in blocks. Rows are
/// dequantised while packed, per call, so the weight stays quantized in memory.
#[derive(Clone, Copy)]
pub struct MatRefQuant {
    pub ptr: *const u8,
    pub row_bytes: usize,
    pub format: BlockFormat,
}

// SAFETY: as for `MatRef`.
unsafe impl Send for MatRefQuant {}
unsafe impl Sync for MatRefQuant {}

/// A bf16 value (its bits) as f32: exact, the bits shifted into the high half.
#[inline]
pub(super) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// What happens to C after the product: an optional bias (per column or per row) and an
/// activation, applied once the whole K sum is in.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Add the product to C instead of overwriting it.
    pub accumulate: bool,
    pub bias: Bias<'a>,
    pub act: Activation,
}

#[derive(Clone, Copy, Default)]
pub enum Bias<'a> {
    #[default]
    None,
    /// One value per column of C (a linear layer's bias).
    PerColumn(&'a [f32]),
    /// One value per row of C (a convolution's bias, channels as rows).
    PerRow(&'a [f32]),
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint tiles of C.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Where C goes: one row-major matrix (`parts` of one), or `n / part_w` matrices side by side,
/// each `[m, part_w]` at its own address, so one product fills separate outputs (a fused QKV
/// projection as three tensors) without copies.
pub(super) struct Out {
    bases: Vec<OutPtr>,
    part_w: usize,
    ldc: usize,
}

impl Out {
    /// The address of C(i, j); `j..j + width` must stay inside one part.
    #[inline]
    pub(super) unsafe fn at(&self, i: usize, j: usize) -> *mut f32 {
        self.bases[j / self.part_w]
            .get()
            .add(i * self.ldc + j % self.part_w)
    }

    /// Calls `f(j, row)` for row `i`, columns `j0..j1`, a stretch in one part at a time.
    pub(super) unsafe fn for_stretches(
        &self,
        i: usize,
        j0: usize,
        j1: usize,
        mut f: impl FnMut(usize, &mut [f32]),
    ) {
        let mut j = j0;
        while j < j1 {
            let end = ((j / self.part_w + 1) * self.part_w).min(j1);
            f(j, std::slice::from_raw_parts_mut(self.at(i, j), end - j));
            j = end;
        }
    }
}

thread_local! {
    static PACK_A: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf::new()) };
    static PACK_B: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf::new()) };
    /// One panel's rows of a quantized B, dequantised before they are turned into the panel.
    static DEQUANT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// B packed once into NR-wide panels over all of K (`[panel][k][NR]`), for a weight used by many
/// products: a linear layer's packed weight skips the per-call packing.
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    data: AlignedBuf,
}

impl PackedB {
    /// Packs the `k×n` matrix `b`.
    ///
    /// # Safety
    /// `b` must address `k×n` readable elements.
    pub unsafe fn new(k: usize, n: usize, b: MatRef) -> PackedB {
        let panels = n.div_ceil(NR);
        let mut data = AlignedBuf::zeroed(panels * NR * k);
        let out = OutPtr(data.as_mut_ptr());
        (0..panels).into_par_iter().for_each(|p| {
            let j0 = p * NR;
            pack_b(k, NR.min(n - j0), b, 0, j0, out.get().add(p * NR * k));
        });
        PackedB { k, n, data }
    }

    pub fn nbytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// The B operand of a product: any strided matrix (packed per call), a strided bf16 matrix
/// (converted while packed per call), a block-quantized one (dequantised while packed per
/// call), or packed already.
#[derive(Clone, Copy)]
pub enum BOperand<'a> {
    Strided(MatRef),
    Bf16(MatRefBf16),
    Quant(MatRefQuant),
    Packed(&'a PackedB),
}

/// `C[m×n] (row stride ldc) = A[m×k]·B[k×n]`, then the epilogue. Runs on the rayon pool when
/// `parallel` and the product is large enough to pay for it.
///
/// # Safety
/// `a`, `b` must address `m×k` and `k×n` readable elements, `c` `m` rows of `ldc >= n` writable
/// elements, not overlapping A or B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    ldc: usize,
    ep: Epilogue,
    parallel: bool,
) {
    sgemm_with(m, n, k, a, BOperand::Strided(b), c, ldc, ep, parallel)
}

/// [`sgemm`] with B given as a [`BOperand`] (a packed B must be `k×n`).
///
/// # Safety
/// As for [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_with(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BOperand,
    c: *mut f32,
    ldc: usize,
    ep: Epilogue,
    parallel: bool,
) {
    let out = Out {
        bases: vec![OutPtr(c)],
        part_w: n.max(1),
        ldc,
    };
    sgemm_out(m, n, k, a, b, out, ep, parallel)
}

/// [`sgemm_with`] into `outs.len()` row-major matrices `[m, n / outs.len()]`, C's columns in
/// order: one product, several outputs. Each part's width must be a multiple of [`NR`] (so no
/// micro-tile straddles two parts); [`parts_fit`] says whether it is.
///
/// # Safety
/// As for [`sgemm`], with each output addressing `m × n / outs.len()` writable elements.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_parts(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BOperand,
    outs: &[*mut f32],
    ep: Epilogue,
    parallel: bool,
) {
    assert!(
        parts_fit(n, outs.len()),
        "{} parts of {n} columns",
        outs.len()
    );
    let part_w = n / outs.len();
    let out = Out {
        bases: outs.iter().map(|&p| OutPtr(p)).collect(),
        part_w,
        ldc: part_w,
    };
    sgemm_out(m, n, k, a, b, out, ep, parallel)
}

/// Whether `n` columns split into `parts` outputs for [`sgemm_parts`].
pub fn parts_fit(n: usize, parts: usize) -> bool {
    parts > 0 && n.is_multiple_of(parts) && (n / parts).is_multiple_of(NR)
}

#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_out(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BOperand,
    out: Out,
    ep: Epilogue,
    parallel: bool,
) {
    if super::gemv::fits(m, &b) {
        return super::gemv::gemv(m, n, k, a, b, &out, ep, parallel);
    }
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx512() {
        return sgemm_blocked::<Avx512Tile>(m, n, k, a, b, out, ep, parallel);
    }
    sgemm_blocked::<Tile6x16>(m, n, k, a, b, out, ep, parallel)
}

/// A micro-kernel: an `MR×NR` tile of C from an MR-row panel of A and an NR-wide panel of B.
trait MicroTile {
    /// Rows of the tile (and of a packed A panel).
    const MR: usize;
    /// Rows of A per block (a multiple of `MR`), packed per task.
    const MC: usize;
    /// `C (+)= A·B` over `kc` steps: `a` a packed panel (`[p][r]`), `b` a packed panel
    /// (`[p][c]`), C with row stride `ldc`; `next` the B panel to fetch into cache meanwhile
    /// (or null).
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        kc: usize,
        a: *const f32,
        b: *const f32,
        next: *const f32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    );
    /// [`pack_panel`] at this tile's width: `rows` of A's transpose `at`, zero-padded to `MR`.
    unsafe fn pack(kc: usize, rows: usize, at: MatRef, p0: usize, i0: usize, out: *mut f32);
    /// Two full tiles side by side: the same A panel against B panels `b[0]` and `b[1]`, into
    /// `c[0]` and `c[1]` (each `MR×NR`, row stride `ldc`), with `next[i]` fetched meanwhile (or
    /// null). Each element is summed as [`MicroTile::run`] sums it, so the bits are the same.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn run_pair(
        kc: usize,
        a: *const f32,
        b: [*const f32; 2],
        next: [*const f32; 2],
        c: [*mut f32; 2],
        ldc: usize,
        acc: bool,
    ) {
        for i in 0..2 {
            Self::run(kc, a, b[i], next[i], c[i], ldc, acc);
        }
    }
}

/// The 6×16 tile: AVX2/FMA, or portable code.
struct Tile6x16;

impl MicroTile for Tile6x16 {
    const MR: usize = MR;
    const MC: usize = 72;
    #[inline]
    unsafe fn run(
        kc: usize,
        a: *const f32,
        b: *const f32,
        _next: *const f32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        micro_kernel(kc, a, 1, MR, b, c, ldc, acc)
    }
    unsafe fn pack(kc: usize, rows: usize, at: MatRef, p0: usize, i0: usize, out: *mut f32) {
        pack_panel::<MR>(kc, rows, at, p0, i0, out)
    }
}

/// The 24×16 AVX-512 tile.
#[cfg(target_arch = "x86_64")]
struct Avx512Tile;

#[cfg(target_arch = "x86_64")]
impl MicroTile for Avx512Tile {
    const MR: usize = MR_AVX512;
    const MC: usize = 144;
    #[inline]
    unsafe fn run(
        kc: usize,
        a: *const f32,
        b: *const f32,
        next: *const f32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        avx512_packed_kernel(kc, a, b, next, c, ldc, acc)
    }
    unsafe fn pack(kc: usize, rows: usize, at: MatRef, p0: usize, i0: usize, out: *mut f32) {
        pack_panel::<MR_AVX512>(kc, rows, at, p0, i0, out)
    }
    /// Two 12×32 halves: per K step two B loads feed 24 FMAs (the 24×16 tile needs a load
    /// per FMA), as BLIS's Skylake-X kernel does.
    #[inline]
    unsafe fn run_pair(
        kc: usize,
        a: *const f32,
        b: [*const f32; 2],
        next: [*const f32; 2],
        c: [*mut f32; 2],
        ldc: usize,
        acc: bool,
    ) {
        const H: usize = MR_AVX512 / 2;
        let packed = (1, MR_AVX512);
        avx512_wide_kernel::<true>(kc, a, packed, b, next[0], c, ldc, acc);
        let lower = [c[0].add(H * ldc), c[1].add(H * ldc)];
        avx512_wide_kernel::<true>(kc, a.add(H), packed, b, next[1], lower, ldc, acc);
    }
}

/// The blocked product with micro-tile `T`.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_blocked<T: MicroTile>(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BOperand,
    out: Out,
    ep: Epilogue,
    parallel: bool,
) {
    if let BOperand::Packed(p) = b {
        assert!(
            p.k == k && p.n == n,
            "packed B is {}x{}, the product needs {k}x{n}",
            p.k,
            p.n
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            out.for_stretches(i, 0, n, |j0, row| {
                if !ep.accumulate {
                    row.fill(0.0);
                }
                finish_row(row, i, j0, ep);
            });
        }
        return;
    }
    let threads = if parallel && (m * n * k) >= 64 * 64 * 64 {
        rayon::current_num_threads()
    } else {
        1
    };
    // Columns per outer block: NC, so the KC-step slice of B that all row blocks share at a
    // time stays in cache (a B packed already is walked in such blocks: its panels for columns
    // jc.. start at panel jc / NR); a B packed per call also keeps its whole block (all of
    // K × nc) within 16M floats (64 MiB, reused). Fewer blocks mean fewer re-packings of A.
    let nc_cap = ((16usize << 20) / k).max(NR) / NR * NR;
    let nc_block = match b {
        BOperand::Packed(_) => NC_PACKED,
        _ => NC.min(nc_cap),
    };
    PACK_B.with(|pb| {
        let mut pb = pb.borrow_mut();
        for jc in (0..n).step_by(nc_block) {
            let nc = nc_block.min(n - jc);
            let n_panels = nc.div_ceil(NR);
            // All of B[:, jc..jc+nc] in panels: panel p holds K steps of NR values, so the
            // KC-step block at `pc` starts at `p·NR·k + pc·NR`.
            let bpack = match b {
                BOperand::Packed(p) => OutPtr(p.data.as_ptr().add(jc / NR * NR * k) as *mut f32),
                BOperand::Strided(_) | BOperand::Bf16(_) | BOperand::Quant(_) => {
                    let need = n_panels * NR * k;
                    pb.grow(need);
                    let bpack = OutPtr(pb.as_mut_ptr());
                    let pack_panel = |p: usize| {
                        let j0 = jc + p * NR;
                        let out = bpack.get().add(p * NR * k);
                        match b {
                            BOperand::Strided(b) => pack_b(k, NR.min(n - j0), b, 0, j0, out),
                            BOperand::Bf16(b) => pack_b_bf16(k, NR.min(n - j0), b, j0, out),
                            BOperand::Quant(b) => pack_b_quant(k, NR.min(n - j0), b, j0, out),
                            BOperand::Packed(_) => unreachable!("packed B needs no packing"),
                        }
                    };
                    if threads > 1 {
                        (0..n_panels).into_par_iter().for_each(pack_panel);
                    } else {
                        (0..n_panels).for_each(pack_panel);
                    }
                    bpack
                }
            };
            // Row blocks of about MC rows, a multiple of the thread count, with the MR panels
            // spread over them as evenly as they go (sizes differ by one panel at most, the
            // larger ones interleaved), so each thread's half of the blocks is as much work as
            // the other's; column groups when row blocks are scarce.
            let m_panels = m.div_ceil(T::MR);
            let mut m_blocks = m.div_ceil(T::MC);
            if threads > 1 {
                m_blocks = m_blocks.div_ceil(threads) * threads;
            }
            let m_blocks = m_blocks.min(m_panels);
            // Block `ib`'s rows.
            let block_rows = |ib: usize| {
                let (p0, p1) = (ib * m_panels / m_blocks, (ib + 1) * m_panels / m_blocks);
                (p0 * T::MR, (p1 * T::MR).min(m))
            };
            let groups = if threads > 1 {
                (2 * threads).div_ceil(m_blocks).clamp(1, n_panels)
            } else {
                1
            };
            let per_group = n_panels.div_ceil(groups);
            // A task computes a block of C (rows i0.., panels p0..p1) for the K steps in `ks`.
            let task = |t: usize, ks: std::ops::Range<usize>| {
                let (ib, g) = (t / groups, t % groups);
                let (i0, i1) = block_rows(ib);
                let p0 = g * per_group;
                let p1 = (p0 + per_group).min(n_panels);
                if i0 >= i1 || p0 >= p1 {
                    return;
                }
                let mc = i1 - i0;
                PACK_A.with(|pa| {
                    let mut pa = pa.borrow_mut();
                    let need = mc.div_ceil(T::MR) * T::MR * KC.min(k);
                    pa.grow(need);
                    let finishes = ks.end == k;
                    for pc in ks.step_by(KC) {
                        let kc = KC.min(k - pc);
                        pack_a::<T>(mc, kc, a, i0, pc, pa.as_mut_ptr());
                        let tile = Tile {
                            out: &out,
                            overwrite: pc == 0 && !ep.accumulate,
                        };
                        let mut p = p0;
                        while p < p1 {
                            let j0 = jc + p * NR;
                            let bp = bpack.get().add(p * NR * k + pc * NR) as *const f32;
                            if p + 1 < p1 && j0 + 2 * NR <= n {
                                // Two whole panels at once; the next two are fetched meanwhile.
                                let b = [bp, bp.add(NR * k)];
                                let next = if p + 3 < p1 {
                                    [bp.add(2 * NR * k), bp.add(3 * NR * k)]
                                } else {
                                    [std::ptr::null(); 2]
                                };
                                for ir in 0..mc.div_ceil(T::MR) {
                                    let (i, mr) = (i0 + ir * T::MR, T::MR.min(mc - ir * T::MR));
                                    let ap = pa.as_ptr().add(ir * T::MR * kc);
                                    let next = if ir == 0 { next } else { [std::ptr::null(); 2] };
                                    if mr == T::MR {
                                        let c = [out.at(i, j0), out.at(i, j0 + NR)];
                                        T::run_pair(kc, ap, b, next, c, out.ldc, !tile.overwrite);
                                    } else {
                                        for h in 0..2 {
                                            let j = j0 + h * NR;
                                            tile.run::<T>(kc, ap, (b[h], next[h]), i, j, mr, NR);
                                        }
                                    }
                                }
                                p += 2;
                                continue;
                            }
                            let nr = NR.min(n - j0);
                            // The next panel's K block, fetched while this one's first tile runs
                            // (the panels lie NR·k apart, too far for the hardware's prefetch).
                            let next = if p + 1 < p1 {
                                bp.add(NR * k)
                            } else {
                                std::ptr::null()
                            };
                            for ir in 0..mc.div_ceil(T::MR) {
                                let mr = T::MR.min(mc - ir * T::MR);
                                let ap = pa.as_ptr().add(ir * T::MR * kc);
                                let next = if ir == 0 { next } else { std::ptr::null() };
                                tile.run::<T>(kc, ap, (bp, next), i0 + ir * T::MR, j0, mr, nr);
                            }
                            p += 1;
                        }
                    }
                    // Bias and activation once the sums are complete, over whole row stretches
                    // of this task's block (still in cache).
                    let has_epilogue = !matches!(ep.bias, Bias::None) || ep.act != Activation::None;
                    if finishes && has_epilogue {
                        let j0 = jc + p0 * NR;
                        let j1 = (jc + p1 * NR).min(n);
                        for r in i0..i0 + mc {
                            out.for_stretches(r, j0, j1, |j, row| finish_row(row, r, j, ep));
                        }
                    }
                });
            };
            let tasks = m_blocks * groups;
            if threads == 1 {
                (0..tasks).for_each(|t| task(t, 0..k));
            } else if m_blocks <= 2 * threads {
                // Few row blocks: each task runs its whole K sum (one synchronisation).
                (0..tasks).into_par_iter().for_each(|t| task(t, 0..k));
            } else {
                // Many row blocks: all tasks work on the same KC block at a time, so the packed
                // B block is shared in cache.
                for pc in (0..k).step_by(KC) {
                    let end = (pc + KC).min(k);
                    (0..tasks).into_par_iter().for_each(|t| task(t, pc..end));
                }
            }
        }
    });
}

/// Where a micro-tile's result goes.
struct Tile<'a> {
    out: &'a Out,
    overwrite: bool,
}

impl Tile<'_> {
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn run<T: MicroTile>(
        &self,
        kc: usize,
        a: *const f32,
        (b, next): (*const f32, *const f32),
        i0: usize,
        j0: usize,
        mr: usize,
        nr: usize,
    ) {
        let (c, ldc) = (self.out.at(i0, j0), self.out.ldc);
        if mr == T::MR && nr == NR {
            T::run(kc, a, b, next, c, ldc, !self.overwrite);
        } else {
            let mut acc = [0f32; MR_MAX * NR];
            T::run(kc, a, b, next, acc.as_mut_ptr(), NR, false);
            for r in 0..mr {
                let row = std::slice::from_raw_parts_mut(c.add(r * ldc), nr);
                let src = &acc[r * NR..r * NR + nr];
                if self.overwrite {
                    row.copy_from_slice(src);
                } else {
                    for (d, s) in row.iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// Bias and activation on a finished stretch of row `i` starting at column `j0`.
#[inline]
pub(super) fn finish_row(row: &mut [f32], i: usize, j0: usize, ep: Epilogue) {
    match ep.bias {
        Bias::None => {}
        Bias::PerColumn(bias) => {
            for (d, b) in row.iter_mut().zip(&bias[j0..]) {
                *d += b;
            }
        }
        Bias::PerRow(bias) => {
            let b = bias[i];
            for d in row.iter_mut() {
                *d += b;
            }
        }
    }
    simd::activate(ep.act, row);
}

/// Packs rows `i0..i0+mc`, columns `p0..p0+kc` of A into MR-row panels (`[panel][p][r]`),
/// zero-padding the last panel.
unsafe fn pack_a<T: MicroTile>(
    mc: usize,
    kc: usize,
    a: MatRef,
    i0: usize,
    p0: usize,
    out: *mut f32,
) {
    let at = a.transposed();
    for ir in 0..mc.div_ceil(T::MR) {
        let rows = T::MR.min(mc - ir * T::MR);
        T::pack(kc, rows, at, p0, i0 + ir * T::MR, out.add(ir * T::MR * kc));
    }
}

/// Packs rows `p0..p0+kc`, columns `j0..j0+cols` (cols <= NR) of B into one panel
/// (`[p][c]`), zero-padded to NR columns.
pub(crate) unsafe fn pack_b(
    kc: usize,
    cols: usize,
    b: MatRef,
    p0: usize,
    j0: usize,
    out: *mut f32,
) {
    pack_panel::<NR>(kc, cols, b, p0, j0, out)
}

/// [`pack_b`] of a bf16 matrix over all of its `k` rows, converting to f32.
unsafe fn pack_b_bf16(k: usize, cols: usize, b: MatRefBf16, j0: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if b.rs == 1 && cols == NR && simd::has_avx2() {
        let col = |c: usize| b.ptr.offset((j0 + c) as isize * b.cs);
        return transpose_into_panel::<NR, u16>(k, &std::array::from_fn(col), out);
    }
    for c in 0..NR {
        if c < cols {
            for p in 0..k {
                *out.add(p * NR + c) = b.get(p, j0 + c);
            }
        } else {
            for p in 0..k {
                *out.add(p * NR + c) = 0.0;
            }
        }
    }
}

/// [`pack_b`] of a block-quantized matrix over all of its `k` rows: each of the panel's
/// columns (a stored row) dequantised whole, then turned into the panel.
unsafe fn pack_b_quant(k: usize, cols: usize, b: MatRefQuant, j0: usize, out: *mut f32) {
    DEQUANT.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < NR * k {
            buf.resize(NR * k, 0.0);
        }
        for c in 0..NR {
            let dst = &mut buf[c * k..(c + 1) * k];
            if c < cols {
                let row =
                    std::slice::from_raw_parts(b.ptr.add((j0 + c) * b.row_bytes), b.row_bytes);
                b.format.dequantize(row, dst);
            } else {
                dst.fill(0.0);
            }
        }
        let m = MatRef {
            ptr: buf.as_ptr(),
            rs: 1,
            cs: k as isize,
        };
        pack_panel::<NR>(k, NR, m, 0, 0, out);
    })
}

/// Writes `out[p·W + c] = m(p0 + p, j0 + c)` for `p < kc`, `c < cols`, and zeros for
/// `cols <= c < W`: the panel layout both GEMM operands use.
unsafe fn pack_panel<const W: usize>(
    kc: usize,
    cols: usize,
    m: MatRef,
    p0: usize,
    j0: usize,
    out: *mut f32,
) {
    if m.cs == 1 && cols == W {
        for p in 0..kc {
            std::ptr::copy_nonoverlapping(m.at(p0 + p, j0), out.add(p * W), W);
        }
    } else if m.rs == 1 {
        #[cfg(target_arch = "x86_64")]
        if W.is_multiple_of(8) && cols == W && simd::has_avx2() {
            let col = |c: usize| m.at(p0, j0 + c);
            return transpose_into_panel::<W, f32>(kc, &std::array::from_fn(col), out);
        }
        for c in 0..W {
            if c < cols {
                let src = m.at(p0, j0 + c);
                for p in 0..kc {
                    *out.add(p * W + c) = *src.add(p);
                }
            } else {
                for p in 0..kc {
                    *out.add(p * W + c) = 0.0;
                }
            }
        }
    } else {
        for p in 0..kc {
            for c in 0..W {
                *out.add(p * W + c) = if c < cols { *m.at(p0 + p, j0 + c) } else { 0.0 };
            }
        }
    }
}

/// A source of panel columns for [`transpose_into_panel`]: f32 values, or bf16 bits widened.
#[cfg(target_arch = "x86_64")]
trait PanelSource: Copy {
    /// Eight consecutive values from `ptr` as f32.
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256;
    /// One value as f32.
    unsafe fn get(ptr: *const Self) -> f32;
}

#[cfg(target_arch = "x86_64")]
impl PanelSource for f32 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(ptr: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(ptr)
    }
    #[inline]
    unsafe fn get(ptr: *const f32) -> f32 {
        *ptr
    }
}

#[cfg(target_arch = "x86_64")]
impl PanelSource for u16 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(ptr: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(ptr as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
    }
    #[inline]
    unsafe fn get(ptr: *const u16) -> f32 {
        bf16_to_f32(*ptr)
    }
}

/// `out[p·W + c] = col[c][p]` for `p < kc`, `c < W` (W a multiple of 8): each column read
/// contiguously, eight columns by eight steps turned by an 8×8 register transpose. The
/// values are only moved (bf16 widened exactly), so the panel is the scalar loop's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_into_panel<const W: usize, T: PanelSource>(
    kc: usize,
    col: &[*const T; W],
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let whole = kc / 8 * 8;
    for g in (0..W).step_by(8) {
        let mut p = 0;
        while p < whole {
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, v) in r.iter_mut().enumerate() {
                *v = T::load8(col[g + i].add(p));
            }
            let t = transpose8(r);
            for (j, v) in t.iter().enumerate() {
                _mm256_storeu_ps(out.add((p + j) * W + g), *v);
            }
            p += 8;
        }
        for p in whole..kc {
            for i in 0..8 {
                *out.add(p * W + g + i) = T::get(col[g + i].add(p));
            }
        }
    }
}

/// The 8×8 transpose of eight rows of eight f32: `out[j][i] = r[i][j]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// One full MR×NR tile: `C (+)= Σ_p A[0..MR][p] ⊗ B[p][0..NR]`, where A's element (r, p) is at
/// `a + r·a_rs + p·a_cs` (a packed panel has `a_rs = 1, a_cs = MR`; a row-major block has
/// `a_rs = lda, a_cs = 1`), B is a packed NR-wide panel, and C has row stride `ldc`.
///
/// # Safety
/// All pointers must address the elements described, for `kc` steps.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn micro_kernel(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2() {
        return avx2_kernel(kc, a, a_rs, a_cs, b, c, ldc, accumulate);
    }
    let mut acc = [0f32; MR * NR];
    for p in 0..kc {
        for r in 0..MR {
            let av = *a.add(r * a_rs + p * a_cs);
            for j in 0..NR {
                acc[r * NR + j] += av * *b.add(p * NR + j);
            }
        }
    }
    for r in 0..MR {
        for j in 0..NR {
            let d = c.add(r * ldc + j);
            *d = if accumulate {
                *d + acc[r * NR + j]
            } else {
                acc[r * NR + j]
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_kernel(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 12];
    let rows = [
        a,
        a.add(a_rs),
        a.add(2 * a_rs),
        a.add(3 * a_rs),
        a.add(4 * a_rs),
        a.add(5 * a_rs),
    ];
    let mut b = b;
    let mut off = 0usize;
    macro_rules! step {
        () => {{
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            let a0 = _mm256_broadcast_ss(&*rows[0].add(off));
            acc[0] = _mm256_fmadd_ps(a0, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(a0, b1, acc[1]);
            let a1 = _mm256_broadcast_ss(&*rows[1].add(off));
            acc[2] = _mm256_fmadd_ps(a1, b0, acc[2]);
            acc[3] = _mm256_fmadd_ps(a1, b1, acc[3]);
            let a2 = _mm256_broadcast_ss(&*rows[2].add(off));
            acc[4] = _mm256_fmadd_ps(a2, b0, acc[4]);
            acc[5] = _mm256_fmadd_ps(a2, b1, acc[5]);
            let a3 = _mm256_broadcast_ss(&*rows[3].add(off));
            acc[6] = _mm256_fmadd_ps(a3, b0, acc[6]);
            acc[7] = _mm256_fmadd_ps(a3, b1, acc[7]);
            let a4 = _mm256_broadcast_ss(&*rows[4].add(off));
            acc[8] = _mm256_fmadd_ps(a4, b0, acc[8]);
            acc[9] = _mm256_fmadd_ps(a4, b1, acc[9]);
            let a5 = _mm256_broadcast_ss(&*rows[5].add(off));
            acc[10] = _mm256_fmadd_ps(a5, b0, acc[10]);
            acc[11] = _mm256_fmadd_ps(a5, b1, acc[11]);
            off += a_cs;
            b = b.add(NR);
        }};
    }
    let mut p = 0;
    while p + 4 <= kc {
        step!();
        step!();
        step!();
        step!();
        p += 4;
    }
    while p < kc {
        step!();
        p += 1;
    }
    for (r, pair) in acc.chunks_exact(2).enumerate() {
        let d = c.add(r * ldc);
        let (mut v0, mut v1) = (pair[0], pair[1]);
        if accumulate {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(d));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(d.add(8)));
        }
        _mm256_storeu_ps(d, v0);
        _mm256_storeu_ps(d.add(8), v1);
    }
}

/// The 24×16 AVX-512 tile: C row r is one zmm accumulator, fed by a broadcast of A(r, p) and
/// the B panel's row p. A's element (r, p) is at `a + r·a_rs + p·a_cs`, as for
/// [`micro_kernel`]. Each element's sum runs over p in order with fused multiply-adds, as in
/// [`avx2_kernel`], so both give the same bits.
///
/// # Safety
/// `a` must address 24 rows of A and `b` a packed NR-wide panel, for `kc` steps; `c` 24 rows of
/// 16 writable elements at stride `ldc`; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512_kernel(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    const R: usize = MR_AVX512;
    if a_rs == 1 && a_cs == R {
        return avx512_packed_kernel(kc, a, b, std::ptr::null(), c, ldc, accumulate);
    }
    let mut acc = [_mm512_setzero_ps(); R];
    let mut b = b;
    // Rows `a_rs` apart (attention's Q and P blocks), walked by three pointers of 8 rows.
    let rows = [a, a.add(8 * a_rs), a.add(16 * a_rs)];
    let mut off = 0usize;
    for _ in 0..kc {
        let bv = _mm512_loadu_ps(b);
        for (g, base) in rows.iter().enumerate() {
            for i in 0..8 {
                let v = &mut acc[g * 8 + i];
                *v = _mm512_fmadd_ps(_mm512_set1_ps(*base.add(i * a_rs + off)), bv, *v);
            }
        }
        off += a_cs;
        b = b.add(NR);
    }
    store_rows(&acc, c, ldc, accumulate)
}

/// [`avx512_kernel`] on a packed A panel, with cache hints, which on an Intel Xeon took about
/// 5% off a Wan forward (`tools/bench_wan.py`): C's tile is fetched before the sums (it is
/// written after them), A's panel (streaming from L2) 16 steps ahead, and `next` (the B panel
/// the next tiles use, or null) a line per step.
///
/// # Safety
/// As for [`avx512_kernel`] with `a` a packed 24-row panel; `next`, when not null, must
/// address `kc·NR` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512_packed_kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    next: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    const R: usize = MR_AVX512;
    for r in 0..R {
        _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc) as *const i8);
    }
    let mut acc = [_mm512_setzero_ps(); R];
    let (mut a, mut b) = (a, b);
    // A null `next` fetches this panel's own (cached) lines: no branch in the loop.
    let mut next = if next.is_null() { b } else { next };
    for _ in 0..kc {
        _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(16 * R) as *const i8);
        let bv = _mm512_loadu_ps(b);
        for (r, v) in acc.iter_mut().enumerate() {
            *v = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r)), bv, *v);
        }
        a = a.add(R);
        b = b.add(NR);
        next = next.wrapping_add(NR);
    }
    store_rows(&acc, c, ldc, accumulate)
}

/// Twelve rows of A against two B panels: C rows `r < 12` of `c[0]` (B panel `b[0]`) and
/// `c[1]` (`b[1]`), 24 accumulators, two B loads per 24 FMAs. A's element (r, p) is at
/// `a + r·a_rs + p·a_cs`; `PACKED` fixes `a_rs = 1, a_cs = 24` (a packed 24-row panel) so the
/// offsets are constants. Each element is summed over p in order with FMAs, as in
/// [`avx512_kernel`]. The cache hints are [`avx512_packed_kernel`]'s, with `next` one B panel
/// to fetch (or null).
///
/// # Safety
/// As for [`avx512_kernel`], for 12 rows, both panels and both outputs.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512_wide_kernel<const PACKED: bool>(
    kc: usize,
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: [*const f32; 2],
    next: *const f32,
    c: [*mut f32; 2],
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    const H: usize = MR_AVX512 / 2;
    let (a_rs, a_cs) = if PACKED { (1, MR_AVX512) } else { (a_rs, a_cs) };
    for r in 0..H {
        _mm_prefetch::<_MM_HINT_T0>(c[0].add(r * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c[1].add(r * ldc) as *const i8);
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; H];
    let (mut a, mut b0, mut b1) = (a, b[0], b[1]);
    let mut next = if next.is_null() { b0 } else { next };
    for _ in 0..kc {
        _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
        if PACKED {
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(16 * MR_AVX512) as *const i8);
        }
        let (v0, v1) = (_mm512_loadu_ps(b0), _mm512_loadu_ps(b1));
        for (r, pair) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * a_rs));
            pair[0] = _mm512_fmadd_ps(av, v0, pair[0]);
            pair[1] = _mm512_fmadd_ps(av, v1, pair[1]);
        }
        a = a.add(a_cs);
        b0 = b0.add(NR);
        b1 = b1.add(NR);
        next = next.wrapping_add(NR);
    }
    for (h, &c) in c.iter().enumerate() {
        store_rows(
            &std::array::from_fn::<_, H, _>(|r| acc[r][h]),
            c,
            ldc,
            accumulate,
        );
    }
}

/// Writes (or with `accumulate` adds) accumulator row `r` to `c + r·ldc`.
///
/// # Safety
/// `c` must address `acc.len()` rows of 16 writable elements at stride `ldc`; the CPU must have
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_rows(acc: &[std::arch::x86_64::__m512], c: *mut f32, ldc: usize, accumulate: bool) {
    use std::arch::x86_64::*;
    for (r, v) in acc.iter().enumerate() {
        let d = c.add(r * ldc);
        let v = if accumulate {
            _mm512_add_ps(*v, _mm512_loadu_ps(d))
        } else {
            *v
        };
        _mm512_storeu_ps(d, v);
    }
}

/// Rows of the micro-tile that [`tile_kernel`] runs: 24 with AVX-512, else [`MR`].
pub(crate) fn tile_rows() -> usize {
    if cfg!(target_arch = "x86_64") && simd::has_avx512() {
        MR_AVX512
    } else {
        MR
    }
}

/// One full `tile_rows() × NR` tile with A's element (r, p) at `a + r·a_rs + p·a_cs`, as
/// [`micro_kernel`] runs an `MR × NR` one: the widest kernel the CPU has.
///
/// # Safety
/// As for [`micro_kernel`], with `tile_rows()` rows.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn tile_kernel(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx512() {
        return avx512_kernel(kc, a, a_rs, a_cs, b, c, ldc, accumulate);
    }
    micro_kernel(kc, a, a_rs, a_cs, b, c, ldc, accumulate)
}

/// [`tile_kernel`] for a B panel whose last `NR / 2` columns are padding (a head of 72
/// channels' last V panel, or 8 keys left over): C's first `NR / 2` columns only, the others
/// left as they are, with the same bits as [`tile_kernel`] gives them. On AVX-512 the sums are
/// ymm registers, 12 rows at a time: a CPU that splits zmm operations in two (AMD's Zen 4)
/// runs these in half the time of a full panel, and one with whole zmm units in the same time.
///
/// # Safety
/// As for [`tile_kernel`]; only C's first `NR / 2` columns of each row are written.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn tile_half_kernel(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx512() {
        const H: usize = MR_AVX512 / 2;
        avx2_half_kernel(kc, a, a_rs, a_cs, b, c, ldc, accumulate);
        return avx2_half_kernel(
            kc,
            a.add(H * a_rs),
            a_rs,
            a_cs,
            b,
            c.add(H * ldc),
            ldc,
            accumulate,
        );
    }
    let rows = tile_rows();
    let mut acc = [0f32; MR_MAX * NR];
    tile_kernel(kc, a, a_rs, a_cs, b, acc.as_mut_ptr(), NR, false);
    for r in 0..rows {
        let row = std::slice::from_raw_parts_mut(c.add(r * ldc), NR / 2);
        for (d, s) in row.iter_mut().zip(&acc[r * NR..]) {
            *d = if accumulate { *d + s } else { *s };
        }
    }
}

/// Twelve rows of A against the first 8 columns of a packed B panel, in ymm registers: each
/// element summed over p in order with FMAs, as every other micro-kernel sums it.
///
/// # Safety
/// `a` must address 12 rows of A (element (r, p) at `a + r·a_rs + p·a_cs`) and `b` a packed
/// NR-wide panel, for `kc` steps; `c` 12 rows of 8 writable elements at stride `ldc`; the CPU
/// must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_half_kernel(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    const R: usize = MR_AVX512 / 2;
    let mut acc = [_mm256_setzero_ps(); R];
    let (mut b, mut off) = (b, 0usize);
    for _ in 0..kc {
        let bv = _mm256_loadu_ps(b);
        for (r, v) in acc.iter_mut().enumerate() {
            *v = _mm256_fmadd_ps(_mm256_set1_ps(*a.add(r * a_rs + off)), bv, *v);
        }
        off += a_cs;
        b = b.add(NR);
    }
    for (r, v) in acc.iter().enumerate() {
        let d = c.add(r * ldc);
        let v = if accumulate {
            _mm256_add_ps(*v, _mm256_loadu_ps(d))
        } else {
            *v
        };
        _mm256_storeu_ps(d, v);
    }
}

/// [`tile_kernel`] over two B panels side by side: C's `tile_rows() × 2·NR` tile, the
/// columns of `b[0]` into `c[0]` and of `b[1]` into `c[1]`, with the same bits as two
/// [`tile_kernel`] calls (on AVX-512, two 12×32 halves with two B loads per 24 FMAs).
///
/// # Safety
/// As for [`tile_kernel`], for both panels and both outputs.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn tile_pair_kernel(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: [*const f32; 2],
    c: [*mut f32; 2],
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx512() {
        const H: usize = MR_AVX512 / 2;
        let null = std::ptr::null();
        avx512_wide_kernel::<false>(kc, a, (a_rs, a_cs), b, null, c, ldc, accumulate);
        let lower = [c[0].add(H * ldc), c[1].add(H * ldc)];
        let a = a.add(H * a_rs);
        return avx512_wide_kernel::<false>(kc, a, (a_rs, a_cs), b, null, lower, ldc, accumulate);
    }
    for h in 0..2 {
        micro_kernel(kc, a, a_rs, a_cs, b[h], c[h], ldc, accumulate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::testing::{max_rel_err, Lcg};

    #[test]
    fn the_half_panel_kernel_gives_the_full_kernels_bits_for_its_columns() {
        // Exact: both sum each element over p in order with FMAs. Rows `a_rs` apart, overwrite
        // and accumulate; the columns past 8 are left as they were.
        let mut rng = Lcg(9);
        let rows = tile_rows();
        let kc = 37;
        let a = rng.vec(rows * kc);
        let b = rng.vec(kc * NR);
        let start = rng.vec(rows * NR);
        for accumulate in [false, true] {
            let (mut full, mut half) = (start.clone(), start.clone());
            // SAFETY: A holds `rows` rows of kc (row stride kc), B one packed panel of kc
            // steps, C `rows` rows of NR.
            unsafe {
                tile_kernel(
                    kc,
                    a.as_ptr(),
                    kc,
                    1,
                    b.as_ptr(),
                    full.as_mut_ptr(),
                    NR,
                    accumulate,
                );
                tile_half_kernel(
                    kc,
                    a.as_ptr(),
                    kc,
                    1,
                    b.as_ptr(),
                    half.as_mut_ptr(),
                    NR,
                    accumulate,
                );
            }
            for r in 0..rows {
                assert_eq!(half[r * NR..r * NR + NR / 2], full[r * NR..r * NR + NR / 2]);
                assert_eq!(
                    half[r * NR + NR / 2..(r + 1) * NR],
                    start[r * NR + NR / 2..(r + 1) * NR]
                );
            }
        }
    }

    /// f64 reference of op(A)·op(B).
    /// `sgemm` of random `a` and `b` (transposed as asked) against the f64 reference: the
    /// largest error relative to the largest reference element.
    fn random_product_error(
        rng: &mut Lcg,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) -> f64 {
        let a = rng.vec(m * k);
        let b = rng.vec(k * n);
        let mut c = vec![0f32; m * n];
        let ar = MatRef::row_major(&a, if ta { m } else { k }, ta);
        let br = MatRef::row_major(&b, if tb { k } else { n }, tb);
        unsafe {
            sgemm(
                m,
                n,
                k,
                ar,
                br,
                c.as_mut_ptr(),
                n,
                Epilogue::default(),
                true,
            )
        };
        max_rel_err(&c, &reference(m, n, k, &a, ta, &b, tb))
    }

    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        ta: bool,
        b: &[f32],
        tb: bool,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes_and_transposes() {
        // Tolerance: 1e-5 relative to the largest reference element (f32 sums of <= 600 terms).
        let mut rng = Lcg(7);
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 13, 5),
            (67, 45, 301),
            (130, 257, 33),
            (6, 16, 256),
            (200, 100, 600),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let e = random_product_error(&mut rng, m, n, k, ta, tb);
                assert!(e < 1e-5, "{m}x{n}x{k} ta={ta} tb={tb}: {e}");
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_random_shapes() {
        // Tolerance: 1e-5 relative to the largest reference element.
        let mut rng = Lcg(99);
        for _ in 0..12 {
            let dim = |rng: &mut Lcg, max: usize| {
                1 + ((rng.next() + 1.0) * 0.5 * max as f32) as usize % max
            };
            let (m, n, k) = (dim(&mut rng, 150), dim(&mut rng, 150), dim(&mut rng, 300));
            let (ta, tb) = (rng.next() > 0.0, rng.next() > 0.0);
            let e = random_product_error(&mut rng, m, n, k, ta, tb);
            assert!(e < 1e-5, "{m}x{n}x{k} ta={ta} tb={tb}: {e}");
        }
    }

    #[test]
    fn the_avx512_tile_gives_the_avx2_tiles_bits() {
        // Both tiles sum each element in the same order with FMAs: equal bits on edge-heavy
        // shapes, with accumulation, a bias and an activation, in one and several threads.
        if !simd::has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512 (or DITFLOW_SIMD caps it)");
            return;
        }
        let mut rng = Lcg(17);
        for (m, n, k) in [(1, 16, 3), (25, 33, 257), (150, 70, 600), (300, 4100, 20)] {
            let a = rng.vec(m * k);
            let w = rng.vec(n * k);
            let bias = rng.vec(n);
            let start = rng.vec(m * n);
            let ep = Epilogue {
                accumulate: true,
                bias: Bias::PerColumn(&bias),
                act: Activation::Silu,
            };
            for parallel in [false, true] {
                let run = |wide: bool| {
                    let mut c = start.clone();
                    let out = Out {
                        bases: vec![OutPtr(c.as_mut_ptr())],
                        part_w: n,
                        ldc: n,
                    };
                    let (ar, br) = (
                        MatRef::row_major(&a, k, false),
                        BOperand::Strided(MatRef::row_major(&w, k, true)),
                    );
                    unsafe {
                        if wide {
                            sgemm_blocked::<Avx512Tile>(m, n, k, ar, br, out, ep, parallel)
                        } else {
                            sgemm_blocked::<Tile6x16>(m, n, k, ar, br, out, ep, parallel)
                        }
                    }
                    c
                };
                assert_eq!(run(true), run(false), "{m}x{n}x{k} parallel={parallel}");
            }
        }
    }

    #[test]
    fn the_strided_avx512_tile_gives_four_avx2_tiles_bits() {
        // Attention's use: A rows `a_rs` apart (not packed). One 24-row tile equals four 6-row
        // tiles bit for bit, overwriting and accumulating.
        if !simd::has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512 (or DITFLOW_SIMD caps it)");
            return;
        }
        let mut rng = Lcg(23);
        let (kc, a_rs, ldc) = (37, 41, 20);
        let a = rng.vec(24 * a_rs);
        let b = rng.vec(kc * NR);
        let start = rng.vec(24 * ldc);
        for accumulate in [false, true] {
            let (mut wide, mut narrow) = (start.clone(), start.clone());
            unsafe {
                avx512_kernel(
                    kc,
                    a.as_ptr(),
                    a_rs,
                    1,
                    b.as_ptr(),
                    wide.as_mut_ptr(),
                    ldc,
                    accumulate,
                );
                for t in 0..4 {
                    micro_kernel(
                        kc,
                        a[t * MR * a_rs..].as_ptr(),
                        a_rs,
                        1,
                        b.as_ptr(),
                        narrow[t * MR * ldc..].as_mut_ptr(),
                        ldc,
                        accumulate,
                    );
                }
            }
            assert_eq!(wide, narrow, "accumulate={accumulate}");
        }
    }

    #[test]
    fn prepacked_b_gives_the_same_product() {
        // One column block, and several (n above NC, walked in blocks of the packed panels).
        for (m, n, k) in [(37, 70, 300), (37, 4100, 40)] {
            prepacked_matches(m, n, k);
        }
    }

    fn prepacked_matches(m: usize, n: usize, k: usize) {
        let mut rng = Lcg(5);
        let a = rng.vec(m * k);
        let w = rng.vec(n * k); // [n, k], used transposed as a linear layer's weight
        let wt = MatRef::row_major(&w, k, true);
        let packed = unsafe { PackedB::new(k, n, wt) };
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        unsafe {
            sgemm(
                m,
                n,
                k,
                MatRef::row_major(&a, k, false),
                wt,
                c1.as_mut_ptr(),
                n,
                Epilogue::default(),
                true,
            );
            sgemm_with(
                m,
                n,
                k,
                MatRef::row_major(&a, k, false),
                BOperand::Packed(&packed),
                c2.as_mut_ptr(),
                n,
                Epilogue::default(),
                true,
            );
        }
        assert_eq!(c1, c2);
    }

    /// `a [m, k]` times `w [n, k]` transposed in f32, and times `b` (the same weight in another
    /// form): the two products.
    fn products_with(
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        w: &[f32],
        b: BOperand,
    ) -> (Vec<f32>, Vec<f32>) {
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        let ar = MatRef::row_major(a, k, false);
        let ep = Epilogue::default();
        unsafe {
            let wt = MatRef::row_major(w, k, true);
            sgemm(m, n, k, ar, wt, c1.as_mut_ptr(), n, ep, true);
            sgemm_with(m, n, k, ar, b, c2.as_mut_ptr(), n, ep, true);
        }
        (c1, c2)
    }

    #[test]
    fn a_bf16_b_gives_the_product_of_its_f32_values() {
        // B given as bf16 bits is converted while packed: the product equals the f32 product of
        // the same (bf16-rounded) values bit for bit, over several NC blocks of columns.
        let mut rng = Lcg(9);
        let (m, n, k) = (13, 4100, 40);
        let a = rng.vec(m * k);
        let bits: Vec<u16> = rng
            .vec(n * k)
            .iter()
            .map(|v| (v.to_bits() >> 16) as u16)
            .collect();
        let w: Vec<f32> = bits.iter().map(|&b| bf16_to_f32(b)).collect();
        let b = BOperand::Bf16(MatRefBf16::row_major(&bits, k, true));
        let (c1, c2) = products_with((m, n, k), &a, &w, b);
        assert_eq!(c1, c2);
    }

    #[test]
    fn a_quantized_b_gives_the_product_of_its_dequantised_values() {
        // Each format's rows, dequantised while packed, give the f32 product of the same values
        // bit for bit, over several NC blocks of columns and a partial last panel.
        let mut rng = Lcg(11);
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_1, BlockFormat::Q6K] {
            let (m, n, k) = (13, 4100 + 3, 2 * format.block_len());
            let row_bytes = k / format.block_len() * format.block_bytes();
            let mut bytes: Vec<u8> = (0..n * row_bytes)
                .map(|_| ((rng.next() + 1.0) * 127.0) as u8)
                .collect();
            // Scales (the f16 at each block's start) kept finite and small.
            for blk in bytes.chunks_exact_mut(format.block_bytes()) {
                let d = half::f16::from_f32(0.01 * (1.0 + rng.next())).to_le_bytes();
                let at = if format == BlockFormat::Q6K { 208 } else { 0 };
                blk[at..at + 2].copy_from_slice(&d);
                if format == BlockFormat::Q4_1 {
                    blk[2..4].copy_from_slice(&d);
                }
            }
            let mut w = vec![0f32; n * k];
            format.dequantize(&bytes, &mut w);
            let a = rng.vec(m * k);
            let quant = MatRefQuant {
                ptr: bytes.as_ptr(),
                row_bytes,
                format,
            };
            let (c1, c2) = products_with((m, n, k), &a, &w, BOperand::Quant(quant));
            assert!(c1.iter().all(|v| v.is_finite()), "{format:?}");
            assert_eq!(c1, c2, "{format:?}");
        }
    }

    #[test]
    fn a_product_split_into_parts_equals_the_whole_product() {
        // Three outputs of 48 columns each (a fused QKV as q, k, v), with a bias and an
        // activation, bit-exact with the one-output product's columns; parallel and not.
        let mut rng = Lcg(9);
        let (m, n, k) = (301, 3 * 48, 200);
        let a = rng.vec(m * k);
        let w = rng.vec(n * k);
        let bias = rng.vec(n);
        let wt = MatRef::row_major(&w, k, true);
        let packed = unsafe { PackedB::new(k, n, wt) };
        let ep = Epilogue {
            accumulate: false,
            bias: Bias::PerColumn(&bias),
            act: Activation::GeluTanh,
        };
        assert!(parts_fit(n, 3) && !parts_fit(n, 5) && !parts_fit(100, 2));
        for parallel in [false, true] {
            let mut whole = vec![0f32; m * n];
            let mut parts = vec![vec![0f32; m * n / 3]; 3];
            unsafe {
                sgemm_with(
                    m,
                    n,
                    k,
                    MatRef::row_major(&a, k, false),
                    BOperand::Packed(&packed),
                    whole.as_mut_ptr(),
                    n,
                    ep,
                    parallel,
                );
                let outs: Vec<*mut f32> = parts.iter_mut().map(|p| p.as_mut_ptr()).collect();
                sgemm_parts(
                    m,
                    n,
                    k,
                    MatRef::row_major(&a, k, false),
                    BOperand::Packed(&packed),
                    &outs,
                    ep,
                    parallel,
                );
            }
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(
                        parts[j / 48][i * 48 + j % 48],
                        whole[i * n + j],
                        "({i}, {j})"
                    );
                }
            }
        }
    }

    #[test]
    fn epilogue_adds_bias_accumulates_and_activates() {
        let mut rng = Lcg(3);
        let (m, n, k) = (19, 35, 70);
        let a = rng.vec(m * k);
        let b = rng.vec(k * n);
        let bias = rng.vec(n);
        let row_bias = rng.vec(m);
        let start = rng.vec(m * n);
        let r = reference(m, n, k, &a, false, &b, false);
        let mut c = start.clone();
        let ep = Epilogue {
            accumulate: true,
            bias: Bias::PerColumn(&bias),
            act: Activation::Relu,
        };
        unsafe {
            sgemm(
                m,
                n,
                k,
                MatRef::row_major(&a, k, false),
                MatRef::row_major(&b, n, false),
                c.as_mut_ptr(),
                n,
                ep,
                false,
            )
        };
        let want: Vec<f64> = (0..m * n)
            .map(|i| (r[i] + start[i] as f64 + bias[i % n] as f64).max(0.0))
            .collect();
        assert!(max_rel_err(&c, &want) < 1e-5);
        let ep = Epilogue {
            bias: Bias::PerRow(&row_bias),
            ..Default::default()
        };
        unsafe {
            sgemm(
                m,
                n,
                k,
                MatRef::row_major(&a, k, false),
                MatRef::row_major(&b, n, false),
                c.as_mut_ptr(),
                n,
                ep,
                true,
            )
        };
        let want: Vec<f64> = (0..m * n).map(|i| r[i] + row_bias[i / n] as f64).collect();
        assert!(max_rel_err(&c, &want) < 1e-5);
    }
}
