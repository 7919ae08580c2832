// ditflow CUDA kernels, compiled at run time by NVRTC (no headers needed).
//
// All maths is f32; f16 and bf16 are converted with explicit bit manipulation or single PTX
// conversions, so that no CUDA header has to be found at run time. The kernels that carry a
// DiT's activations also read and write them in bf16 or f16 ("activation storage" below). Every
// kernel uses grid-stride loops or one block per row, so any launch size is correct.
//
// The parts between "BEGIN HOST-TESTABLE" and "END HOST-TESTABLE" markers are also plain C++:
// tests/cuda.rs compiles them together with the host's compiler (with stand-ins for CUDA's
// intrinsics, and grid-stride kernels run as one thread) to check the block decoders and the
// half-precision activation kernels against the CPU's ops on a machine without a GPU.

// BEGIN HOST-TESTABLE
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define DT_F32 1
#define DT_F16 2
#define DT_BF16 3
#define DT_I64 4
#define DT_I32 5
#define DT_U8 6

#define ACT_NONE 0
#define ACT_GELU 1
#define ACT_GELU_TANH 2
#define ACT_SILU 3
#define ACT_RELU 4

struct Dims8 { i64 v[8]; };

__device__ __forceinline__ float act_apply(int act, float x) {
    switch (act) {
    case ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case ACT_SILU: return x / (1.0f + expf(-x));
    case ACT_RELU: return fmaxf(x, 0.0f);
    default: return x;
    }
}

// --- half-precision bits ------------------------------------------------------------------

__device__ float f16_to_f32(unsigned short h) {
    u32 sign = (u32)(h & 0x8000) << 16;
    u32 exp = (h >> 10) & 0x1f;
    u32 man = h & 0x3ff;
    u32 bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {
            // subnormal: normalise
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400) == 0);
            bits = sign | ((u32)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    return __uint_as_float(bits);
}

__device__ unsigned short f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000;
    u32 exp = (x >> 23) & 0xff;
    u32 man = x & 0x7fffff;
    if (exp == 0xff) return (unsigned short)(sign | 0x7c00 | (man ? 0x200 : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (unsigned short)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return (unsigned short)sign;
        man |= 0x800000;
        u32 shift = (u32)(14 - e);
        u32 half_man = man >> shift;
        u32 rem = man & ((1u << shift) - 1);
        u32 halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (half_man & 1))) half_man++;
        return (unsigned short)(sign | half_man);
    }
    u32 h = sign | ((u32)e << 10) | (man >> 13);
    u32 rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (unsigned short)h;
}

__device__ float bf16_to_f32(unsigned short b) { return __uint_as_float(((u32)b) << 16); }

__device__ unsigned short f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7f800000u) == 0x7f800000u && (x & 0x7fffff)) return (unsigned short)((x >> 16) | 0x40);
    u32 rounding = 0x7fff + ((x >> 16) & 1);
    return (unsigned short)((x + rounding) >> 16);
}

// --- ggml's block formats ------------------------------------------------------------------
//
// The codes are `weights::quant::BlockFormat`'s order. Every product and sum is rounded as
// ggml's (and the CPU's `weights::quant`) are, and never fused: the `_rn` intrinsics are not
// contracted into FMAs.

#define BF_Q8_0 0
#define BF_Q4_0 1
#define BF_Q4_1 2
#define BF_Q5_0 3
#define BF_Q5_1 4
#define BF_Q4_K 5
#define BF_Q5_K 6
#define BF_Q6_K 7

__device__ __forceinline__ float bf_half(const unsigned char* b, int at) {
    return f16_to_f32((unsigned short)(b[at] | (b[at + 1] << 8)));
}

// Values [32·part, 32·part + 32) of block `b` of `format` into out[0..32) (part 0 for the
// 32-value formats, 0..7 for the 256-value K-quants).
__device__ void bf_decode(int format, const unsigned char* b, int part, float* out) {
    switch (format) {
    case BF_Q8_0: {
        float d = bf_half(b, 0);
        for (int j = 0; j < 32; j++) out[j] = __fmul_rn((float)(signed char)b[2 + j], d);
        break;
    }
    case BF_Q4_0:
    case BF_Q4_1: {
        int min = format == BF_Q4_1;
        float d = bf_half(b, 0), m = min ? bf_half(b, 2) : 0.0f;
        const unsigned char* qs = b + (min ? 4 : 2);
        for (int j = 0; j < 16; j++) {
            int lo = qs[j] & 0x0F, hi = qs[j] >> 4;
            if (min) {
                out[j] = __fadd_rn(__fmul_rn(d, (float)lo), m);
                out[j + 16] = __fadd_rn(__fmul_rn(d, (float)hi), m);
            } else {
                out[j] = __fmul_rn(d, (float)(lo - 8));
                out[j + 16] = __fmul_rn(d, (float)(hi - 8));
            }
        }
        break;
    }
    case BF_Q5_0:
    case BF_Q5_1: {
        int min = format == BF_Q5_1, at = min ? 4 : 2;
        float d = bf_half(b, 0), m = min ? bf_half(b, 2) : 0.0f;
        u32 qh = (u32)b[at] | ((u32)b[at + 1] << 8) | ((u32)b[at + 2] << 16) | ((u32)b[at + 3] << 24);
        const unsigned char* qs = b + at + 4;
        for (int i = 0; i < 32; i++) {
            int low = (qs[i % 16] >> (4 * (i / 16))) & 0x0F;
            int q = low | (int)(((qh >> i) & 1u) << 4);
            out[i] = min ? __fadd_rn(__fmul_rn(d, (float)q), m) : __fmul_rn(d, (float)(q - 16));
        }
        break;
    }
    case BF_Q4_K:
    case BF_Q5_K: {
        int high = format == BF_Q5_K, s = part;
        float d = bf_half(b, 0), dmin = bf_half(b, 2);
        const unsigned char* sc = b + 4;
        const unsigned char* qh = b + 16;
        const unsigned char* qs = b + (high ? 48 : 16);
        int scale, mn;
        if (s < 4) {
            scale = sc[s] & 0x3F;
            mn = sc[s + 4] & 0x3F;
        } else {
            int k = s - 4;
            scale = (sc[k + 8] & 0x0F) | ((sc[k] >> 2) & 0x30);
            mn = (sc[k + 8] >> 4) | ((sc[k + 4] >> 2) & 0x30);
        }
        float ds = __fmul_rn(d, (float)scale), dm = __fmul_rn(dmin, (float)mn);
        const unsigned char* chunk = qs + (s / 2) * 32;
        for (int l = 0; l < 32; l++) {
            int q = (chunk[l] >> (4 * (s % 2))) & 0x0F;
            if (high) q |= ((qh[l] >> s) & 1) << 4;
            out[l] = __fsub_rn(__fmul_rn(ds, (float)q), dm);
        }
        break;
    }
    default: {  // BF_Q6_K
        const unsigned char* ql = b;
        const unsigned char* qh = b + 128;
        const unsigned char* scales = b + 192;
        float d = bf_half(b, 208);
        for (int j = 0; j < 32; j++) {
            int e = part * 32 + j;
            int half = e / 128, within = e % 128;
            int low = (ql[half * 64 + within % 64] >> (4 * (within / 64))) & 0x0F;
            int hi2 = (qh[half * 32 + within % 32] >> (2 * (within / 32))) & 0x03;
            int q = (low | (hi2 << 4)) - 32;
            float ds = __fmul_rn(d, (float)(signed char)scales[e / 16]);
            out[j] = __fmul_rn(ds, (float)q);
        }
        break;
    }
    }
}

// A weight of `parts` 32-value parts (its blocks in order, `parts_per_block` each) dequantised
// into f32: one thread a part, for the linear layer about to read it.
extern "C" __global__ void dequantize(const unsigned char* src, float* dst, i64 parts, int format,
                                      int block_bytes, int parts_per_block) {
    for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < parts; t += (i64)gridDim.x * blockDim.x) {
        i64 blk = t / parts_per_block;
        bf_decode(format, src + blk * block_bytes, (int)(t % parts_per_block), dst + t * 32);
    }
}

__device__ double load_as_double(const void* p, int dt, i64 i) {
    switch (dt) {
    case DT_F32: return ((const float*)p)[i];
    case DT_F16: return f16_to_f32(((const unsigned short*)p)[i]);
    case DT_BF16: return bf16_to_f32(((const unsigned short*)p)[i]);
    case DT_I64: return (double)((const i64*)p)[i];
    case DT_I32: return ((const int*)p)[i];
    default: return ((const unsigned char*)p)[i];
    }
}

// --- activation storage -------------------------------------------------------------------
//
// The kernels that carry activations are templates over their storage type T: f32, or bf16 or
// f16 (half-precision activations, `ditflow::kernels::set_gpu_activations`). Values are loaded
// into f32, computed in f32 and rounded once when stored, so a half kernel gives what widening,
// the f32 kernel and narrowing back would, without the two extra passes. `NAME` is the f32
// kernel, `NAME_bf16` and `NAME_f16` its half ones; weights, biases, modulations, gates, rotary
// tables and masks stay f32.

struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, i64 i) { return bf16_to_f32(p[i].bits); }
__device__ __forceinline__ float ld(const f16_t* p, i64 i) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i].bits));
    return f;
#else
    return f16_to_f32(p[i].bits);
#endif
}
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, i64 i, float v) { p[i].bits = f32_to_bf16(v); }
__device__ __forceinline__ void st(f16_t* p, i64 i, float v) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i].bits = h;
#else
    p[i].bits = f32_to_f16(v);
#endif
}

extern "C" __global__ void cast(const void* src, int sdt, void* dst, int ddt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        double v = load_as_double(src, sdt, i);
        switch (ddt) {
        case DT_F32: ((float*)dst)[i] = (sdt == DT_F32) ? ((const float*)src)[i] : (float)v; break;
        case DT_F16: ((unsigned short*)dst)[i] = f32_to_f16((float)v); break;
        case DT_BF16: ((unsigned short*)dst)[i] = f32_to_bf16((float)v); break;
        case DT_I64: ((i64*)dst)[i] = (i64)v; break;
        case DT_I32: ((int*)dst)[i] = (int)v; break;
        default: ((unsigned char*)dst)[i] = (unsigned char)fmin(fmax(v, 0.0), 255.0); break;
        }
    }
}

// END HOST-TESTABLE

// --- Philox4x32-10 noise (same stream as the CPU's) -----------------------------------------

__device__ void philox(u32 c[4], u32 k0, u32 k1) {
    for (int r = 0; r < 10; r++) {
        if (r > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    }
}

extern "C" __global__ void randn(float* out, i64 n, u64 seed, u64 stream) {
    i64 blocks = (n + 3) / 4;
    for (i64 b = blockIdx.x * (i64)blockDim.x + threadIdx.x; b < blocks; b += (i64)gridDim.x * blockDim.x) {
        u32 c[4] = {(u32)b, (u32)((u64)b >> 32), (u32)stream, (u32)(stream >> 32)};
        philox(c, (u32)seed, (u32)(seed >> 32));
        for (int p = 0; p < 2; p++) {
            double u1 = ((double)c[2 * p] + 1.0) * (1.0 / 4294967296.0);
            double u2 = ((double)c[2 * p + 1] + 1.0) * (1.0 / 4294967296.0);
            double r = sqrt(-2.0 * log(u1));
            double th = 6.283185307179586 * u2;
            i64 i = b * 4 + 2 * p;
            if (i < n) out[i] = (float)(r * cos(th));
            if (i + 1 < n) out[i + 1] = (float)(r * sin(th));
        }
    }
}

// BEGIN HOST-TESTABLE
// --- epilogues ------------------------------------------------------------------------------

// y[r, j] = act(src[r, j] + bias_col[j] + bias_row[r]) ; either bias may be NULL. The f32
// kernel works in place (src = y); the half ones store a GEMM's f32 sums as activations.
template <typename T>
__device__ void bias_act_impl(const float* src, T* y, const float* bias_col, const float* bias_row,
                              i64 rows, i64 cols, int act) {
    i64 n = rows * cols;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float v = src[i];
        if (bias_col) v += bias_col[i % cols];
        if (bias_row) v += bias_row[i / cols];
        st(y, i, act_apply(act, v));
    }
}

extern "C" __global__ void bias_act(float* y, const float* bias_col, const float* bias_row, i64 rows, i64 cols, int act) {
    bias_act_impl(y, y, bias_col, bias_row, rows, cols, act);
}

extern "C" __global__ void bias_act_bf16(const float* src, bf16_t* y, const float* bias_col, const float* bias_row,
                                         i64 rows, i64 cols, int act) {
    bias_act_impl(src, y, bias_col, bias_row, rows, cols, act);
}

extern "C" __global__ void bias_act_f16(const float* src, f16_t* y, const float* bias_col, const float* bias_row,
                                        i64 rows, i64 cols, int act) {
    bias_act_impl(src, y, bias_col, bias_row, rows, cols, act);
}

// END HOST-TESTABLE

// --- reductions within a block ---------------------------------------------------------------

__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) / 32;
    float t = (threadIdx.x < nw) ? shared[threadIdx.x] : 0.0f;
    if (warp == 0) for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) shared[0] = t;
    __syncthreads();
    return shared[0];
}

__device__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) / 32;
    float t = (threadIdx.x < nw) ? shared[threadIdx.x] : -INFINITY;
    if (warp == 0) for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    if (threadIdx.x == 0) shared[0] = t;
    __syncthreads();
    return shared[0];
}

// --- normalisation (one block per row) -------------------------------------------------------

template <typename T>
__device__ void layer_norm_impl(const T* x, T* y, const float* w, const float* b,
                                const float* shift, const float* scale, i64 rows, int d,
                                i64 per_group, float eps) {
    __shared__ float sh[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        float s = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) s += ld(xr, j);
        float mean = block_sum(s, sh) / d;
        float v = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) { float t = ld(xr, j) - mean; v += t * t; }
        float inv = rsqrtf(block_sum(v, sh) / d + eps);
        i64 g = r / per_group;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float o = (ld(xr, j) - mean) * inv;
            if (w) o *= w[j];
            if (b) o += b[j];
            if (scale) o += o * scale[g * d + j];
            if (shift) o += shift[g * d + j];
            st(y, r * d + j, o);
        }
    }
}

extern "C" __global__ void layer_norm(const float* x, float* y, const float* w, const float* b,
                                      const float* shift, const float* scale, i64 rows, int d,
                                      i64 per_group, float eps) {
    layer_norm_impl(x, y, w, b, shift, scale, rows, d, per_group, eps);
}

extern "C" __global__ void layer_norm_bf16(const bf16_t* x, bf16_t* y, const float* w, const float* b,
                                           const float* shift, const float* scale, i64 rows, int d,
                                           i64 per_group, float eps) {
    layer_norm_impl(x, y, w, b, shift, scale, rows, d, per_group, eps);
}

extern "C" __global__ void layer_norm_f16(const f16_t* x, f16_t* y, const float* w, const float* b,
                                          const float* shift, const float* scale, i64 rows, int d,
                                          i64 per_group, float eps) {
    layer_norm_impl(x, y, w, b, shift, scale, rows, d, per_group, eps);
}

template <typename T>
__device__ void rms_norm_impl(const T* x, T* y, const float* w, i64 rows, int d, float eps) {
    __shared__ float sh[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        float s = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) { float t = ld(xr, j); s += t * t; }
        float inv = rsqrtf(block_sum(s, sh) / d + eps);
        for (int j = threadIdx.x; j < d; j += blockDim.x) st(y, r * d + j, ld(xr, j) * inv * (w ? w[j] : 1.0f));
    }
}

extern "C" __global__ void rms_norm(const float* x, float* y, const float* w, i64 rows, int d, float eps) {
    rms_norm_impl(x, y, w, rows, d, eps);
}

extern "C" __global__ void rms_norm_bf16(const bf16_t* x, bf16_t* y, const float* w, i64 rows, int d, float eps) {
    rms_norm_impl(x, y, w, rows, d, eps);
}

extern "C" __global__ void rms_norm_f16(const f16_t* x, f16_t* y, const float* w, i64 rows, int d, float eps) {
    rms_norm_impl(x, y, w, rows, d, eps);
}

// One block per (sample, group): x [N, C, S].
extern "C" __global__ void group_norm(const float* x, float* y, const float* w, const float* b,
                                      i64 n, i64 c, i64 s, i64 groups, float eps, int act) {
    __shared__ float sh[32];
    i64 cg = c / groups, len = cg * s;
    for (i64 i = blockIdx.x; i < n * groups; i += gridDim.x) {
        const float* xs = x + i * len;
        float acc = 0.0f;
        for (i64 j = threadIdx.x; j < len; j += blockDim.x) acc += xs[j];
        float mean = block_sum(acc, sh) / len;
        float v = 0.0f;
        for (i64 j = threadIdx.x; j < len; j += blockDim.x) { float t = xs[j] - mean; v += t * t; }
        float inv = rsqrtf(block_sum(v, sh) / len + eps);
        i64 g = i % groups;
        for (i64 j = threadIdx.x; j < len; j += blockDim.x) {
            i64 ch = g * cg + j / s;
            float o = (xs[j] - mean) * inv * (w ? w[ch] : 1.0f) + (b ? b[ch] : 0.0f);
            y[i * len + j] = act_apply(act, o);
        }
    }
}

// Softmax over the middle axis of [outer, dim, inner]; one block per (outer, inner) line.
template <typename T>
__device__ void softmax_impl(const T* x, T* y, i64 outer, i64 dim, i64 inner) {
    __shared__ float sh[32];
    for (i64 line = blockIdx.x; line < outer * inner; line += gridDim.x) {
        i64 o = line / inner, in = line % inner;
        const T* xl = x + o * dim * inner + in;
        T* yl = y + o * dim * inner + in;
        float m = -INFINITY;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x) m = fmaxf(m, ld(xl, j * inner));
        m = block_max(m, sh);
        float s = 0.0f;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x) s += (m == -INFINITY) ? 0.0f : expf(ld(xl, j * inner) - m);
        s = block_sum(s, sh);
        float inv = s > 0.0f ? 1.0f / s : 0.0f;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x)
            st(yl, j * inner, (m == -INFINITY) ? 0.0f : expf(ld(xl, j * inner) - m) * inv);
    }
}

extern "C" __global__ void softmax(const float* x, float* y, i64 outer, i64 dim, i64 inner) {
    softmax_impl(x, y, outer, dim, inner);
}

extern "C" __global__ void softmax_bf16(const bf16_t* x, bf16_t* y, i64 outer, i64 dim, i64 inner) {
    softmax_impl(x, y, outer, dim, inner);
}

extern "C" __global__ void softmax_f16(const f16_t* x, f16_t* y, i64 outer, i64 dim, i64 inner) {
    softmax_impl(x, y, outer, dim, inner);
}

// --- attention: one warp per query row, 32 keys at a time, online softmax --------------------
// q [BH, Lq, D], k [BH, Lk, D], v [BH, Lk, Dv], out [BH, Lq, Dv].
// mask (may be NULL): additive f32 at b*msb + h*msh + q*msq + key.
//
// `attention`: D, Dv <= 128. A block holds 8 query rows of one head (grid: Lq/8 x B*H); each
// 32-key tile of K (transposed, padded against bank conflicts) and V is loaded into shared
// memory once and used by all 8 warps. `attention_wide` (D, Dv <= 256) reads K and V from
// global memory, 4 rows per block.

#define ATT_ROWS 8
#define ATT_TILE_D 128

template <typename T>
__device__ void attention_impl(const T* q, const T* k, const T* v, const float* mask,
                               T* out, int B, int H, int Lq, int Lk, int D, int Dv,
                               i64 msb, i64 msh, i64 msq, float scale) {
    __shared__ float ks[ATT_TILE_D][33];
    __shared__ float vs[32][ATT_TILE_D];
    __shared__ float qs[ATT_ROWS][ATT_TILE_D];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    i64 bh = blockIdx.y;
    int qi = blockIdx.x * ATT_ROWS + warp;
    bool active = qi < Lq;
    int bi = (int)(bh / H), hi = (int)(bh % H);
    if (active) for (int j = lane; j < D; j += 32) qs[warp][j] = ld(q, (bh * Lq + qi) * D + j) * scale;
    const T* kh = k + bh * (i64)Lk * D;
    const T* vh = v + bh * (i64)Lk * Dv;
    const float* mrow = (mask && active) ? mask + bi * msb + hi * msh + qi * msq : 0;
    float acc[ATT_TILE_D / 32];
    for (int t = 0; t < ATT_TILE_D / 32; t++) acc[t] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int k0 = 0; k0 < Lk; k0 += 32) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < 32 * D; idx += blockDim.x) {
            int key = idx / D, d = idx % D;
            ks[d][key] = (k0 + key < Lk) ? ld(kh, (i64)(k0 + key) * D + d) : 0.0f;
        }
        for (int idx = threadIdx.x; idx < 32 * Dv; idx += blockDim.x) {
            int key = idx / Dv, c = idx % Dv;
            vs[key][c] = (k0 + key < Lk) ? ld(vh, (i64)(k0 + key) * Dv + c) : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        int key = k0 + lane;
        float s = -INFINITY;
        if (key < Lk) {
            float dot = 0.0f;
            for (int j = 0; j < D; j++) dot += qs[warp][j] * ks[j][lane];
            s = dot + (mrow ? mrow[key] : 0.0f);
        }
        float bm = s;
        for (int o = 16; o > 0; o >>= 1) bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, o));
        float m_new = fmaxf(m, bm);
        if (m_new == -INFINITY) continue;
        float p = (s == -INFINITY) ? 0.0f : expf(s - m_new);
        float alpha = (m == -INFINITY) ? 0.0f : expf(m - m_new);
        float ps = p;
        for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
        l = l * alpha + ps;
        m = m_new;
        for (int t = 0; t < ATT_TILE_D / 32; t++) acc[t] *= alpha;
        for (int j = 0; j < 32; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            for (int t = 0; t < ATT_TILE_D / 32; t++) {
                int c = t * 32 + lane;
                if (c < Dv) acc[t] += pj * vs[j][c];
            }
        }
    }
    if (!active) return;
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int t = 0; t < ATT_TILE_D / 32; t++) {
        int c = t * 32 + lane;
        if (c < Dv) st(out, (bh * Lq + qi) * Dv + c, acc[t] * inv);
    }
}

extern "C" __global__ void attention(const float* q, const float* k, const float* v, const float* mask,
                                     float* out, int B, int H, int Lq, int Lk, int D, int Dv,
                                     i64 msb, i64 msh, i64 msq, float scale) {
    attention_impl(q, k, v, mask, out, B, H, Lq, Lk, D, Dv, msb, msh, msq, scale);
}

extern "C" __global__ void attention_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* mask,
                                          bf16_t* out, int B, int H, int Lq, int Lk, int D, int Dv,
                                          i64 msb, i64 msh, i64 msq, float scale) {
    attention_impl(q, k, v, mask, out, B, H, Lq, Lk, D, Dv, msb, msh, msq, scale);
}

extern "C" __global__ void attention_f16(const f16_t* q, const f16_t* k, const f16_t* v, const float* mask,
                                         f16_t* out, int B, int H, int Lq, int Lk, int D, int Dv,
                                         i64 msb, i64 msh, i64 msq, float scale) {
    attention_impl(q, k, v, mask, out, B, H, Lq, Lk, D, Dv, msb, msh, msq, scale);
}

#define ATT_WARPS 4
#define ATT_MAXD 256

template <typename T>
__device__ void attention_wide_impl(const T* q, const T* k, const T* v, const float* mask,
                                    T* out, int B, int H, int Lq, int Lk, int D, int Dv,
                                    i64 msb, i64 msh, i64 msq, float scale) {
    __shared__ float qs[ATT_WARPS][ATT_MAXD];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    i64 row = (i64)blockIdx.x * ATT_WARPS + warp;
    i64 total = (i64)B * H * Lq;
    if (row >= total) return;
    i64 bh = row / Lq;
    int qi = (int)(row % Lq);
    int bi = (int)(bh / H), hi = (int)(bh % H);
    const T* qr = q + row * D;
    for (int j = lane; j < D; j += 32) qs[warp][j] = ld(qr, j) * scale;
    __syncwarp();
    const T* kh = k + bh * (i64)Lk * D;
    const T* vh = v + bh * (i64)Lk * Dv;
    const float* mrow = mask ? mask + bi * msb + hi * msh + qi * msq : 0;
    float acc[ATT_MAXD / 32];
    for (int t = 0; t < ATT_MAXD / 32; t++) acc[t] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int k0 = 0; k0 < Lk; k0 += 32) {
        int key = k0 + lane;
        float s = -INFINITY;
        if (key < Lk) {
            const T* kr = kh + (i64)key * D;
            float dot = 0.0f;
            for (int j = 0; j < D; j++) dot += qs[warp][j] * ld(kr, j);
            s = dot + (mrow ? mrow[key] : 0.0f);
        }
        float bm = s;
        for (int o = 16; o > 0; o >>= 1) bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, o));
        float m_new = fmaxf(m, bm);
        if (m_new == -INFINITY) continue;
        float p = (s == -INFINITY) ? 0.0f : expf(s - m_new);
        float alpha = (m == -INFINITY) ? 0.0f : expf(m - m_new);
        float ps = p;
        for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
        l = l * alpha + ps;
        m = m_new;
        for (int t = 0; t < ATT_MAXD / 32; t++) acc[t] *= alpha;
        int nk = min(32, Lk - k0);
        for (int j = 0; j < nk; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            const T* vr = vh + (i64)(k0 + j) * Dv;
            for (int t = 0; t < ATT_MAXD / 32; t++) {
                int c = t * 32 + lane;
                if (c < Dv) acc[t] += pj * ld(vr, c);
            }
        }
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int t = 0; t < ATT_MAXD / 32; t++) {
        int c = t * 32 + lane;
        if (c < Dv) st(out, row * Dv + c, acc[t] * inv);
    }
}

extern "C" __global__ void attention_wide(const float* q, const float* k, const float* v, const float* mask,
                                     float* out, int B, int H, int Lq, int Lk, int D, int Dv,
                                     i64 msb, i64 msh, i64 msq, float scale) {
    attention_wide_impl(q, k, v, mask, out, B, H, Lq, Lk, D, Dv, msb, msh, msq, scale);
}

extern "C" __global__ void attention_wide_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* mask,
                                               bf16_t* out, int B, int H, int Lq, int Lk, int D, int Dv,
                                               i64 msb, i64 msh, i64 msq, float scale) {
    attention_wide_impl(q, k, v, mask, out, B, H, Lq, Lk, D, Dv, msb, msh, msq, scale);
}

extern "C" __global__ void attention_wide_f16(const f16_t* q, const f16_t* k, const f16_t* v, const float* mask,
                                              f16_t* out, int B, int H, int Lq, int Lk, int D, int Dv,
                                              i64 msb, i64 msh, i64 msq, float scale) {
    attention_wide_impl(q, k, v, mask, out, B, H, Lq, Lk, D, Dv, msb, msh, msq, scale);
}

// --- attention on tensor cores ---------------------------------------------------------------
//
// FlashAttention-2's loop (Dao, 2023) on mma.sync.m16n8k16 with bf16 operands and f32
// accumulation (sm_80 and later): a block of 4 warps takes 64 query rows of one head, each warp
// 16 of them, and walks the keys in tiles of 64. Q's fragments are loaded once into registers;
// each tile of K (row-major, [key][d]) and of V (transposed, [d][key]) is converted to bf16 into
// shared memory; S = Q·Kᵀ comes out in the accumulator layout, which for two adjacent 8-key tiles
// is exactly the A fragment of P·V (the FA2 register trick), so P never goes through memory. The
// softmax is online per row (max and sum kept in f32, rows reduced over the 4 lanes that share
// them); an additive mask with strides as `attention`'s; a fully masked row gives zeros. Head
// sizes up to DP (64 or 128) are zero-padded to it. q, k, v and out are of the activation
// storage type T in global memory (bf16 ones are copied into the tiles as they are).

#define MMA_Q_ROWS 64
#define MMA_KEYS 64

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;  // round to nearest even, hi into the upper half
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A value of T as bf16 bits for the tensor-core tiles (exact for bf16 itself).
__device__ __forceinline__ unsigned short to_bf16_bits(const float* p, i64 i) { return f32_to_bf16(p[i]); }
__device__ __forceinline__ unsigned short to_bf16_bits(const bf16_t* p, i64 i) { return p[i].bits; }
__device__ __forceinline__ unsigned short to_bf16_bits(const f16_t* p, i64 i) { return f32_to_bf16(ld(p, i)); }

template <int DP, typename T>
__device__ void attention_mma_tile(const T* q, const T* k, const T* v, const float* mask,
                                   T* out, int H, int Lq, int Lk, int D,
                                   i64 msb, i64 msh, i64 msq, float scale) {
    // K as [key][d] and V transposed as [d][key], bf16, rows padded by 8 (16 bytes) so the
    // 32-bit fragment loads of a warp fall in different banks.
    __shared__ unsigned short ks[MMA_KEYS][DP + 8];
    __shared__ unsigned short vt[DP][MMA_KEYS + 8];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;  // groupID and thread-in-group of the mma layouts
    const i64 bh = blockIdx.y;
    const int bi = (int)(bh / H), hi = (int)(bh % H);
    const int r0 = blockIdx.x * MMA_Q_ROWS + warp * 16 + g, r1 = r0 + 8;  // this thread's rows
    const T* qh = q + bh * (i64)Lq * D;
    const T* kh = k + bh * (i64)Lk * D;
    const T* vh = v + bh * (i64)Lk * D;
    // Q's A fragments for every 16 channels, scaled, zero past D and past Lq.
    u32 qa[DP / 16][4];
    #pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            int c = kk * 16 + half * 8 + t * 2;
            float x00 = 0.f, x01 = 0.f, x10 = 0.f, x11 = 0.f;
            if (r0 < Lq && c < D) x00 = ld(qh, (i64)r0 * D + c) * scale;
            if (r0 < Lq && c + 1 < D) x01 = ld(qh, (i64)r0 * D + c + 1) * scale;
            if (r1 < Lq && c < D) x10 = ld(qh, (i64)r1 * D + c) * scale;
            if (r1 < Lq && c + 1 < D) x11 = ld(qh, (i64)r1 * D + c + 1) * scale;
            qa[kk][half * 2] = pack_bf16(x00, x01);
            qa[kk][half * 2 + 1] = pack_bf16(x10, x11);
        }
    }
    float o[DP / 8][4];
    #pragma unroll
    for (int n = 0; n < DP / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const float* mrow0 = (mask && r0 < Lq) ? mask + bi * msb + hi * msh + (i64)r0 * msq : 0;
    const float* mrow1 = (mask && r1 < Lq) ? mask + bi * msb + hi * msh + (i64)r1 * msq : 0;
    for (int k0 = 0; k0 < Lk; k0 += MMA_KEYS) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < MMA_KEYS * DP; idx += blockDim.x) {
            int key = idx / DP, c = idx % DP;
            bool in = k0 + key < Lk && c < D;
            ks[key][c] = in ? to_bf16_bits(kh, (i64)(k0 + key) * D + c) : (unsigned short)0;
            vt[c][key] = in ? to_bf16_bits(vh, (i64)(k0 + key) * D + c) : (unsigned short)0;
        }
        __syncthreads();
        // S = Q·Kᵀ for this warp's 16 rows and the tile's 64 keys: 8 accumulators of 16x8.
        float s[MMA_KEYS / 8][4];
        #pragma unroll
        for (int n = 0; n < MMA_KEYS / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            #pragma unroll
            for (int kk = 0; kk < DP / 16; kk++) {
                const unsigned short* kr = &ks[n * 8 + g][kk * 16 + t * 2];
                u32 b0 = *(const u32*)kr, b1 = *(const u32*)(kr + 8);
                mma_bf16(s[n], qa[kk], b0, b1);
            }
        }
        // Mask, padding keys, and the row maxima (over the quad of lanes sharing a row).
        float bm0 = -INFINITY, bm1 = -INFINITY;
        #pragma unroll
        for (int n = 0; n < MMA_KEYS / 8; n++) {
            #pragma unroll
            for (int e = 0; e < 2; e++) {
                int key = k0 + n * 8 + t * 2 + e;
                if (key >= Lk) {
                    s[n][e] = -INFINITY;
                    s[n][2 + e] = -INFINITY;
                } else {
                    if (mrow0) s[n][e] += mrow0[key];
                    if (mrow1) s[n][2 + e] += mrow1[key];
                }
                bm0 = fmaxf(bm0, s[n][e]);
                bm1 = fmaxf(bm1, s[n][2 + e]);
            }
        }
        #pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
            bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, x));
            bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, x));
        }
        float mn0 = fmaxf(m0, bm0), mn1 = fmaxf(m1, bm1);
        // A row with no finite score yet keeps m = -inf: its weights are 0 and nothing rescales.
        float a0 = (mn0 == -INFINITY || m0 == -INFINITY) ? (mn0 == -INFINITY ? 1.f : 0.f) : expf(m0 - mn0);
        float a1 = (mn1 == -INFINITY || m1 == -INFINITY) ? (mn1 == -INFINITY ? 1.f : 0.f) : expf(m1 - mn1);
        float ps0 = 0.f, ps1 = 0.f;
        #pragma unroll
        for (int n = 0; n < MMA_KEYS / 8; n++) {
            #pragma unroll
            for (int e = 0; e < 2; e++) {
                float p0 = (s[n][e] == -INFINITY) ? 0.f : expf(s[n][e] - mn0);
                float p1 = (s[n][2 + e] == -INFINITY) ? 0.f : expf(s[n][2 + e] - mn1);
                s[n][e] = p0;
                s[n][2 + e] = p1;
                ps0 += p0;
                ps1 += p1;
            }
        }
        #pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
            ps0 += __shfl_xor_sync(0xffffffffu, ps0, x);
            ps1 += __shfl_xor_sync(0xffffffffu, ps1, x);
        }
        l0 = l0 * a0 + ps0;
        l1 = l1 * a1 + ps1;
        m0 = mn0;
        m1 = mn1;
        #pragma unroll
        for (int n = 0; n < DP / 8; n++) {
            o[n][0] *= a0; o[n][1] *= a0;
            o[n][2] *= a1; o[n][3] *= a1;
        }
        // O += P·V: P's A fragment for keys 16j.. is S's accumulators of key tiles 2j and 2j+1.
        #pragma unroll
        for (int j = 0; j < MMA_KEYS / 16; j++) {
            u32 pa[4] = {pack_bf16(s[2 * j][0], s[2 * j][1]), pack_bf16(s[2 * j][2], s[2 * j][3]),
                         pack_bf16(s[2 * j + 1][0], s[2 * j + 1][1]),
                         pack_bf16(s[2 * j + 1][2], s[2 * j + 1][3])};
            #pragma unroll
            for (int n = 0; n < DP / 8; n++) {
                const unsigned short* vr = &vt[n * 8 + g][j * 16 + t * 2];
                u32 b0 = *(const u32*)vr, b1 = *(const u32*)(vr + 8);
                mma_bf16(o[n], pa, b0, b1);
            }
        }
    }
    float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    T* oh = out + bh * (i64)Lq * D;
    #pragma unroll
    for (int n = 0; n < DP / 8; n++) {
        #pragma unroll
        for (int e = 0; e < 2; e++) {
            int c = n * 8 + t * 2 + e;
            if (c < D && r0 < Lq) st(oh, (i64)r0 * D + c, o[n][e] * inv0);
            if (c < D && r1 < Lq) st(oh, (i64)r1 * D + c, o[n][2 + e] * inv1);
        }
    }
}

extern "C" __global__ void attention_mma64(const float* q, const float* k, const float* v, const float* mask,
                                           float* out, int H, int Lq, int Lk, int D,
                                           i64 msb, i64 msh, i64 msq, float scale) {
    attention_mma_tile<64>(q, k, v, mask, out, H, Lq, Lk, D, msb, msh, msq, scale);
}

extern "C" __global__ void attention_mma128(const float* q, const float* k, const float* v, const float* mask,
                                            float* out, int H, int Lq, int Lk, int D,
                                            i64 msb, i64 msh, i64 msq, float scale) {
    attention_mma_tile<128>(q, k, v, mask, out, H, Lq, Lk, D, msb, msh, msq, scale);
}

extern "C" __global__ void attention_mma64_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* mask,
                                                bf16_t* out, int H, int Lq, int Lk, int D,
                                                i64 msb, i64 msh, i64 msq, float scale) {
    attention_mma_tile<64>(q, k, v, mask, out, H, Lq, Lk, D, msb, msh, msq, scale);
}

extern "C" __global__ void attention_mma128_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* mask,
                                                 bf16_t* out, int H, int Lq, int Lk, int D,
                                                 i64 msb, i64 msh, i64 msq, float scale) {
    attention_mma_tile<128>(q, k, v, mask, out, H, Lq, Lk, D, msb, msh, msq, scale);
}

extern "C" __global__ void attention_mma64_f16(const f16_t* q, const f16_t* k, const f16_t* v, const float* mask,
                                               f16_t* out, int H, int Lq, int Lk, int D,
                                               i64 msb, i64 msh, i64 msq, float scale) {
    attention_mma_tile<64>(q, k, v, mask, out, H, Lq, Lk, D, msb, msh, msq, scale);
}

extern "C" __global__ void attention_mma128_f16(const f16_t* q, const f16_t* k, const f16_t* v, const float* mask,
                                                f16_t* out, int H, int Lq, int Lk, int D,
                                                i64 msb, i64 msh, i64 msq, float scale) {
    attention_mma_tile<128>(q, k, v, mask, out, H, Lq, Lk, D, msb, msh, msq, scale);
}

// BEGIN HOST-TESTABLE
// --- positions --------------------------------------------------------------------------------

template <typename T>
__device__ void rope_impl(const T* x, T* y, const float* cs, const float* sn,
                          i64 rows, int l, int d, int r, int interleaved, int heads) {
    // rows: stretches of d (heads side by side in each row of x, all at the row's position).
    int half = r / 2;
    i64 n = rows * d;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / d;
        int j = (int)(i % d);
        int pos = (int)((row / heads) % l);
        const T* xr = x + row * d;
        if (j >= r) { y[i] = xr[j]; continue; }
        int pair, first, a, b;
        if (interleaved) { pair = j / 2; first = (j % 2) == 0; a = 2 * pair; b = a + 1; }
        else { pair = j % half; first = j < half; a = pair; b = pair + half; }
        float c = cs[pos * half + pair], s = sn[pos * half + pair];
        st(y, i, first ? ld(xr, a) * c - ld(xr, b) * s : ld(xr, b) * c + ld(xr, a) * s);
    }
}

extern "C" __global__ void rope(const float* x, float* y, const float* cs, const float* sn,
                                i64 rows, int l, int d, int r, int interleaved, int heads) {
    rope_impl(x, y, cs, sn, rows, l, d, r, interleaved, heads);
}

extern "C" __global__ void rope_bf16(const bf16_t* x, bf16_t* y, const float* cs, const float* sn,
                                     i64 rows, int l, int d, int r, int interleaved, int heads) {
    rope_impl(x, y, cs, sn, rows, l, d, r, interleaved, heads);
}

extern "C" __global__ void rope_f16(const f16_t* x, f16_t* y, const float* cs, const float* sn,
                                    i64 rows, int l, int d, int r, int interleaved, int heads) {
    rope_impl(x, y, cs, sn, rows, l, d, r, interleaved, heads);
}

// --- elementwise --------------------------------------------------------------------------------

#define U_NEG 0
#define U_EXP 1
#define U_LOG 2
#define U_SQRT 3
#define U_RSQRT 4
#define U_ABS 5
#define U_TANH 6
#define U_SIGMOID 7
#define U_SQUARE 8
#define U_SIN 9
#define U_COS 10
#define U_ACT 100

template <typename T>
__device__ void unary_impl(const T* x, T* y, i64 n, int op) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float v = ld(x, i);
        float o;
        switch (op) {
        case U_NEG: o = -v; break;
        case U_EXP: o = expf(v); break;
        case U_LOG: o = logf(v); break;
        case U_SQRT: o = sqrtf(v); break;
        case U_RSQRT: o = 1.0f / sqrtf(v); break;
        case U_ABS: o = fabsf(v); break;
        case U_TANH: o = tanhf(v); break;
        case U_SIGMOID: o = 1.0f / (1.0f + expf(-v)); break;
        case U_SQUARE: o = v * v; break;
        case U_SIN: o = sinf(v); break;
        case U_COS: o = cosf(v); break;
        default: o = act_apply(op - U_ACT, v); break;
        }
        st(y, i, o);
    }
}

extern "C" __global__ void unary(const float* x, float* y, i64 n, int op) { unary_impl(x, y, n, op); }

extern "C" __global__ void unary_bf16(const bf16_t* x, bf16_t* y, i64 n, int op) { unary_impl(x, y, n, op); }

extern "C" __global__ void unary_f16(const f16_t* x, f16_t* y, i64 n, int op) { unary_impl(x, y, n, op); }

template <typename T>
__device__ void affine_impl(const T* x, T* y, i64 n, float mul, float add) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(y, i, ld(x, i) * mul + add);
}

extern "C" __global__ void affine(const float* x, float* y, i64 n, float mul, float add) {
    affine_impl(x, y, n, mul, add);
}

extern "C" __global__ void affine_bf16(const bf16_t* x, bf16_t* y, i64 n, float mul, float add) {
    affine_impl(x, y, n, mul, add);
}

extern "C" __global__ void affine_f16(const f16_t* x, f16_t* y, i64 n, float mul, float add) {
    affine_impl(x, y, n, mul, add);
}

#define B_ADD 0
#define B_SUB 1
#define B_MUL 2
#define B_DIV 3
#define B_MAX 4
#define B_MIN 5
#define B_POW 6

// y (of a's type) = a op b; b of a's type or f32 (a modulation or a residual left in f32).
template <typename TA, typename TB>
__device__ void binary_impl(const TA* a, const TB* b, TA* y, i64 n, int rank,
                            Dims8 shape, Dims8 sa, Dims8 sb, int op) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i, oa = 0, ob = 0;
        for (int ax = rank - 1; ax >= 0; ax--) {
            i64 idx = r % shape.v[ax];
            r /= shape.v[ax];
            oa += idx * sa.v[ax];
            ob += idx * sb.v[ax];
        }
        float x = ld(a, oa), z = ld(b, ob), o;
        switch (op) {
        case B_ADD: o = x + z; break;
        case B_SUB: o = x - z; break;
        case B_MUL: o = x * z; break;
        case B_DIV: o = x / z; break;
        case B_MAX: o = fmaxf(x, z); break;
        case B_MIN: o = fminf(x, z); break;
        default: o = powf(x, z); break;
        }
        st(y, i, o);
    }
}

extern "C" __global__ void binary(const float* a, const float* b, float* y, i64 n, int rank,
                                  Dims8 shape, Dims8 sa, Dims8 sb, int op) {
    binary_impl(a, b, y, n, rank, shape, sa, sb, op);
}

extern "C" __global__ void binary_bf16(const bf16_t* a, const bf16_t* b, bf16_t* y, i64 n, int rank,
                                       Dims8 shape, Dims8 sa, Dims8 sb, int op) {
    binary_impl(a, b, y, n, rank, shape, sa, sb, op);
}

extern "C" __global__ void binary_bf16_f32(const bf16_t* a, const float* b, bf16_t* y, i64 n, int rank,
                                           Dims8 shape, Dims8 sa, Dims8 sb, int op) {
    binary_impl(a, b, y, n, rank, shape, sa, sb, op);
}

extern "C" __global__ void binary_f16(const f16_t* a, const f16_t* b, f16_t* y, i64 n, int rank,
                                      Dims8 shape, Dims8 sa, Dims8 sb, int op) {
    binary_impl(a, b, y, n, rank, shape, sa, sb, op);
}

extern "C" __global__ void binary_f16_f32(const f16_t* a, const float* b, f16_t* y, i64 n, int rank,
                                          Dims8 shape, Dims8 sa, Dims8 sb, int op) {
    binary_impl(a, b, y, n, rank, shape, sa, sb, op);
}

template <typename T>
__device__ void gated_residual_impl(const T* x, const T* yv, const float* gate, T* out,
                                    i64 n, i64 d, i64 per_group_elems) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 g = i / per_group_elems;
        st(out, i, ld(x, i) + gate[g * d + i % d] * ld(yv, i));
    }
}

extern "C" __global__ void gated_residual(const float* x, const float* yv, const float* gate, float* out,
                                          i64 n, i64 d, i64 per_group_elems) {
    gated_residual_impl(x, yv, gate, out, n, d, per_group_elems);
}

extern "C" __global__ void gated_residual_bf16(const bf16_t* x, const bf16_t* yv, const float* gate, bf16_t* out,
                                               i64 n, i64 d, i64 per_group_elems) {
    gated_residual_impl(x, yv, gate, out, n, d, per_group_elems);
}

extern "C" __global__ void gated_residual_f16(const f16_t* x, const f16_t* yv, const float* gate, f16_t* out,
                                              i64 n, i64 d, i64 per_group_elems) {
    gated_residual_impl(x, yv, gate, out, n, d, per_group_elems);
}

#define R_SUM 0
#define R_MEAN 1
#define R_MAX 2
#define R_MIN 3

extern "C" __global__ void reduce(const float* x, float* y, i64 outer, i64 dim, i64 inner, int op) {
    i64 n = outer * inner;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 o = i / inner, in = i % inner;
        double acc = (op == R_MAX) ? -INFINITY : (op == R_MIN) ? INFINITY : 0.0;
        for (i64 j = 0; j < dim; j++) {
            double v = x[(o * dim + j) * inner + in];
            if (op == R_MAX) acc = fmax(acc, v);
            else if (op == R_MIN) acc = fmin(acc, v);
            else acc += v;
        }
        if (op == R_MEAN) acc /= (double)dim;
        y[i] = (float)acc;
    }
}

// END HOST-TESTABLE

// --- layout -------------------------------------------------------------------------------------

// dst (out shape) <- src through src strides (elements), elements of `elem` bytes.
extern "C" __global__ void permute(const unsigned char* src, unsigned char* dst, i64 n, int rank,
                                   Dims8 out_shape, Dims8 src_strides, int elem) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i, off = 0;
        for (int ax = rank - 1; ax >= 0; ax--) {
            off += (r % out_shape.v[ax]) * src_strides.v[ax];
            r /= out_shape.v[ax];
        }
        for (int b = 0; b < elem; b++) dst[i * elem + b] = src[off * elem + b];
    }
}

// Copies `rows` rows of `row_bytes`: src row i at src + i*src_stride (+ src_offset), dst likewise.
extern "C" __global__ void copy_rows(const unsigned char* src, i64 src_stride, unsigned char* dst,
                                     i64 dst_stride, i64 rows, i64 row_bytes) {
    i64 n = rows * row_bytes;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / row_bytes, c = i % row_bytes;
        dst[r * dst_stride + c] = src[r * src_stride + c];
    }
}

// Slice of [outer, dim, inner_bytes] along the middle axis.
extern "C" __global__ void slice(const unsigned char* src, unsigned char* dst, i64 outer, i64 dim,
                                 i64 inner_bytes, i64 start, i64 step, i64 count) {
    i64 n = outer * count * inner_bytes;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 c = i % inner_bytes, rest = i / inner_bytes;
        i64 j = rest % count, o = rest / count;
        dst[i] = src[(o * dim + start + j * step) * inner_bytes + c];
    }
}

extern "C" __global__ void upsample2d(const float* x, float* y, i64 planes, int h, int w, int ho, int wo,
                                      int bilinear, int align) {
    i64 n = planes * ho * wo;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 p = i / ((i64)ho * wo);
        int yo = (int)((i / wo) % ho), xo = (int)(i % wo);
        const float* s = x + p * h * w;
        if (!bilinear) {
            int ys = min((int)(((i64)yo * h) / ho), h - 1), xs = min((int)(((i64)xo * w) / wo), w - 1);
            y[i] = s[ys * w + xs];
            continue;
        }
        float fy, fx;
        if (align) {
            fy = ho > 1 ? yo * (float)(h - 1) / (ho - 1) : 0.0f;
            fx = wo > 1 ? xo * (float)(w - 1) / (wo - 1) : 0.0f;
        } else {
            fy = fmaxf((yo + 0.5f) * h / ho - 0.5f, 0.0f);
            fx = fmaxf((xo + 0.5f) * w / wo - 0.5f, 0.0f);
        }
        int y0 = min((int)fy, h - 1), x0 = min((int)fx, w - 1);
        int y1 = min(y0 + 1, h - 1), x1 = min(x0 + 1, w - 1);
        float ly = fy - y0, lx = fx - x0;
        float top = s[y0 * w + x0] * (1.0f - lx) + s[y0 * w + x1] * lx;
        float bot = s[y1 * w + x0] * (1.0f - lx) + s[y1 * w + x1] * lx;
        y[i] = top * (1.0f - ly) + bot * ly;
    }
}

extern "C" __global__ void embedding(const unsigned char* table, const i64* ids, unsigned char* out,
                                     i64 n_ids, i64 row_bytes) {
    i64 n = n_ids * row_bytes;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / row_bytes, c = i % row_bytes;
        out[i] = table[ids[r] * row_bytes + c];
    }
}

// The k largest of each row of n (ties: the lower index first), descending: one thread a row,
// each pick the largest entry that comes after the previous pick in (value desc, index asc).
extern "C" __global__ void topk_rows(const float* x, float* vals, i64* idx, i64 rows, i64 n, i64 k) {
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < rows; r += (i64)gridDim.x * blockDim.x) {
        const float* row = x + r * n;
        float pv = 0.0f;
        i64 pi = -1;
        for (i64 j = 0; j < k; j++) {
            i64 best = -1;
            float bv = 0.0f;
            for (i64 c = 0; c < n; c++) {
                float v = row[c];
                bool after = pi < 0 || v < pv || (v == pv && c > pi);
                if (after && (best < 0 || v > bv)) {
                    best = c;
                    bv = v;
                }
            }
            vals[r * k + j] = bv;
            idx[r * k + j] = best;
            pv = bv;
            pi = best;
        }
    }
}

// out[index[i], :] += src[i, :] for i < m rows of d (out already holds the input).
extern "C" __global__ void index_add_rows(float* out, const i64* index, const float* src, i64 m, i64 d) {
    i64 n = m * d;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / d, c = i % d;
        atomicAdd(&out[index[r] * d + c], src[i]);
    }
}

// im2col for up to 3 spatial axes: cols[(c*kprod + k), l] for one sample's channel group.
// geo: input[3], kernel[3], stride[3], padding[3], dilation[3], output[3] (unused axes = 1/0).
struct ConvGeo { i64 in_[3]; i64 k[3]; i64 st[3]; i64 pad[3]; i64 dil[3]; i64 out[3]; };

extern "C" __global__ void im2col(const float* x, float* cols, i64 c_in, ConvGeo g) {
    i64 kprod = g.k[0] * g.k[1] * g.k[2];
    i64 lout = g.out[0] * g.out[1] * g.out[2];
    i64 lin = g.in_[0] * g.in_[1] * g.in_[2];
    i64 n = c_in * kprod * lout;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 l = i % lout, row = i / lout;
        i64 kk = row % kprod, c = row / kprod;
        i64 o2 = l % g.out[2], o1 = (l / g.out[2]) % g.out[1], o0 = l / (g.out[2] * g.out[1]);
        i64 k2 = kk % g.k[2], k1 = (kk / g.k[2]) % g.k[1], k0 = kk / (g.k[2] * g.k[1]);
        i64 p0 = o0 * g.st[0] + k0 * g.dil[0] - g.pad[0];
        i64 p1 = o1 * g.st[1] + k1 * g.dil[1] - g.pad[1];
        i64 p2 = o2 * g.st[2] + k2 * g.dil[2] - g.pad[2];
        bool inside = p0 >= 0 && p0 < g.in_[0] && p1 >= 0 && p1 < g.in_[1] && p2 >= 0 && p2 < g.in_[2];
        cols[i] = inside ? x[c * lin + (p0 * g.in_[1] + p1) * g.in_[2] + p2] : 0.0f;
    }
}
