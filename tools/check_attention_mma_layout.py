#!/usr/bin/env python3
"""Checks the index math of the tensor-core attention kernel (runtime/src/kernels/cuda/kernels.cu,
attention_mma_tile) without a GPU: each lane's registers are emulated with the fragment layouts
PTX documents for mma.sync.m16n8k16 with bf16 operands, the kernel's loads, online softmax and
stores are followed lane by lane, and the result is compared with float64 attention. A layout
mistake gives errors of order 1; bf16 rounding gives about 3e-3.

Run (numpy from PyPI; CI never runs this): .venv/bin/python tools/check_attention_mma_layout.py
"""
import numpy as np
def bf(x):  # round to bf16 (nearest even), back to f32
    x = np.asarray(x, np.float32).copy(); u = x.view(np.uint32)
    u = ((u + 0x7fff + ((u >> 16) & 1)) >> 16) << 16
    return u.view(np.float32)
def mma(c, a, b):
    # c[lane][4], a[lane][8] (a0..a7), b[lane][4] (b0..b3) -> D = A B + C in lane layout
    A = np.zeros((16,16)); B = np.zeros((16,8)); C = np.zeros((16,8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(8):
            row = g if i in (0,1,4,5) else g + 8
            col = t*2 + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = a[lane][i]
        for i in range(4):
            B[t*2 + (i & 1) + (8 if i >= 2 else 0), g] = b[lane][i]
        for i in range(4):
            C[g + (8 if i >= 2 else 0), t*2 + (i & 1)] = c[lane][i]
    D = A @ B + C
    return [[D[(lane>>2) + (8 if i >= 2 else 0), (lane&3)*2 + (i&1)] for i in range(4)] for lane in range(32)]
def b_fragments(smem, n, kk):
    """Each lane's B registers for 8-column tile n and k-step kk, read as the kernel reads them
    from shared memory held [n][k] (K as [key][d], V transposed as [d][key])."""
    frags = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        row, base = smem[n*8 + g], kk*16 + t*2
        frags.append([row[base], row[base+1], row[base+8], row[base+9]])
    return frags
def kernel(q, k, v, mask, DP, scale):
    Lq, D = q.shape; Lk = k.shape[0]
    out = np.zeros((Lq, D))
    KEYS = 64
    for blk in range((Lq + 63)//64):
        for warp in range(4):
            # per-lane state
            qa = {}; o = {}; m0={}; m1={}; l0={}; l1={}
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                r0 = blk*64 + warp*16 + g; r1 = r0 + 8
                regs = []
                for kk in range(DP//16):
                    fr = [0.0]*8
                    for half in range(2):
                        c = kk*16 + half*8 + t*2
                        def ld(r, cc): return float(q[r, cc]*scale) if r < Lq and cc < D else 0.0
                        # reg half*2: row r0 (a0,a1 or a4,a5); reg half*2+1: row r1
                        fr[half*4 + 0] = bf(ld(r0, c)); fr[half*4 + 1] = bf(ld(r0, c+1))
                        fr[half*4 + 2] = bf(ld(r1, c)); fr[half*4 + 3] = bf(ld(r1, c+1))
                    regs.append(fr)
                qa[lane] = regs
                o[lane] = [[0.0]*4 for _ in range(DP//8)]
                m0[lane]=m1[lane]=-np.inf; l0[lane]=l1[lane]=0.0
            for k0 in range(0, Lk, KEYS):
                ks = np.zeros((KEYS, DP)); vt = np.zeros((DP, KEYS))
                for key in range(KEYS):
                    for c in range(DP):
                        if k0+key < Lk and c < D:
                            ks[key, c] = bf(k[k0+key, c]); vt[c, key] = bf(v[k0+key, c])
                s = {lane: [[0.0]*4 for _ in range(KEYS//8)] for lane in range(32)}
                for n in range(KEYS//8):
                    for kk in range(DP//16):
                        a = [qa[lane][kk] for lane in range(32)]
                        res = mma([s[l][n] for l in range(32)], a, b_fragments(ks, n, kk))
                        for l in range(32): s[l][n] = res[l]
                bm0 = {}; bm1 = {}
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    r0 = blk*64 + warp*16 + g; r1 = r0 + 8
                    x0 = x1 = -np.inf
                    for n in range(KEYS//8):
                        for e in range(2):
                            key = k0 + n*8 + t*2 + e
                            if key >= Lk: s[lane][n][e] = -np.inf; s[lane][n][2+e] = -np.inf
                            else:
                                if mask is not None and r0 < Lq: s[lane][n][e] += mask[r0, key]
                                if mask is not None and r1 < Lq: s[lane][n][2+e] += mask[r1, key]
                            x0 = max(x0, s[lane][n][e]); x1 = max(x1, s[lane][n][2+e])
                    bm0[lane] = x0; bm1[lane] = x1
                # The row maxima, reduced over the quad of lanes that share the rows.
                quad = lambda l: [(l & ~3) + i for i in range(4)]
                B0 = {l: max(bm0[x] for x in quad(l)) for l in range(32)}
                B1 = {l: max(bm1[x] for x in quad(l)) for l in range(32)}
                ps0 = {}; ps1 = {}; al0={}; al1={}
                for lane in range(32):
                    mn0 = max(m0[lane], B0[lane]); mn1 = max(m1[lane], B1[lane])
                    def alpha(m, mn): return (1.0 if mn == -np.inf else 0.0) if (mn == -np.inf or m == -np.inf) else np.exp(m - mn)
                    al0[lane] = alpha(m0[lane], mn0); al1[lane] = alpha(m1[lane], mn1)
                    p0s = p1s = 0.0
                    for n in range(KEYS//8):
                        for e in range(2):
                            p0 = 0.0 if s[lane][n][e] == -np.inf else np.exp(s[lane][n][e] - mn0)
                            p1 = 0.0 if s[lane][n][2+e] == -np.inf else np.exp(s[lane][n][2+e] - mn1)
                            s[lane][n][e] = p0; s[lane][n][2+e] = p1; p0s += p0; p1s += p1
                    ps0[lane] = p0s; ps1[lane] = p1s
                    m0[lane] = mn0; m1[lane] = mn1
                for lane in range(32):
                    qd = [(lane & ~3)+i for i in range(4)]
                    l0[lane] = l0[lane]*al0[lane] + sum(ps0[x] for x in qd)
                    l1[lane] = l1[lane]*al1[lane] + sum(ps1[x] for x in qd)
                    for n in range(DP//8):
                        o[lane][n][0] *= al0[lane]; o[lane][n][1] *= al0[lane]
                        o[lane][n][2] *= al1[lane]; o[lane][n][3] *= al1[lane]
                for j in range(KEYS//16):
                    pa = []
                    for lane in range(32):
                        S = s[lane]
                        pa.append([bf(S[2*j][0]), bf(S[2*j][1]), bf(S[2*j][2]), bf(S[2*j][3]),
                                   bf(S[2*j+1][0]), bf(S[2*j+1][1]), bf(S[2*j+1][2]), bf(S[2*j+1][3])])
                    for n in range(DP//8):
                        res = mma([o[l][n] for l in range(32)], pa, b_fragments(vt, n, j))
                        for l in range(32): o[l][n] = res[l]
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                r0 = blk*64 + warp*16 + g; r1 = r0 + 8
                inv0 = 1/l0[lane] if l0[lane] > 0 else 0; inv1 = 1/l1[lane] if l1[lane] > 0 else 0
                for n in range(DP//8):
                    for e in range(2):
                        c = n*8 + t*2 + e
                        if c < D and r0 < Lq: out[r0, c] = o[lane][n][e]*inv0
                        if c < D and r1 < Lq: out[r1, c] = o[lane][n][2+e]*inv1
    return out
def ref(q, k, v, mask, scale):
    s = q.astype(np.float64) @ k.T.astype(np.float64) * scale
    if mask is not None: s = s + mask
    out = np.zeros((q.shape[0], v.shape[1]))
    for i in range(q.shape[0]):
        if np.all(np.isinf(s[i])): continue
        p = np.exp(s[i] - s[i].max()); out[i] = p @ v / p.sum()
    return out
rng = np.random.default_rng(0)
for (Lq, Lk, D, DP, masked) in [(20, 70, 40, 64, False), (17, 64, 72, 128, True), (5, 3, 64, 64, False)]:
    q, k, v = (rng.standard_normal((Lq, D)).astype(np.float32), rng.standard_normal((Lk, D)).astype(np.float32),
               rng.standard_normal((Lk, D)).astype(np.float32))
    mask = None
    if masked:
        mask = np.zeros((Lq, Lk), np.float32); mask[:, 0] = -np.inf; mask[2, :] = -np.inf
    got = kernel(q, k, v, mask, DP, 1/np.sqrt(D)); want = ref(q, k, v, mask, 1/np.sqrt(D))
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"Lq {Lq}, Lk {Lk}, D {D} (padded to {DP}), mask {masked}: relative error {err:.2e}")
    assert err < 1e-2, err
    assert not masked or np.all(got[2] == 0), "a fully masked row gives zeros"
