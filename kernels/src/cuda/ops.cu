// Forward-pass kernels. The residual stream and every reduction are f32; tensors that feed
// a GEMM are written in the model's compute type (`O`: bf16, f16 or f32), weights are read
// in their storage type (`W`). Each kernel names its CPU reference in kernels/src/ops.rs.
//
// Block reductions use 256 threads and warp shuffles; one block per row for row-wise
// kernels, so a row's reduction order is fixed (results do not depend on the launch).

#define BLOCK 256

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the block; every thread gets the result. `sh` holds BLOCK / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.0f;
    return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* sh) {
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = lane < (int)(blockDim.x >> 5) ? sh[lane] : NEG_INF;
    return warp_max(t);
}

// x[r, :] = table[tokens[r], :] (embedding lookup). Grid: rows.
template <typename W>
__device__ void embed(const u32* tokens, const typename Storage<W>::T* table, float* x, int h) {
    const u64 r = blockIdx.x;
    const typename Storage<W>::T* src = table + (u64)tokens[r] * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) x[r * h + i] = Storage<W>::load(src[i]);
}

// RMSNorm (ops::rms_norm): out = w * (x * rsqrt(mean(x^2) + eps)). Grid: rows.
template <typename W, typename O>
__device__ void rms_norm(const float* x, const typename Storage<W>::T* w, float eps,
                         typename Storage<O>::T* out, int h) {
    __shared__ float sh[BLOCK / 32];
    const float* row = x + (u64)blockIdx.x * h;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) ss += row[i] * row[i];
    ss = block_sum(ss, sh);
    const float r = rsqrtf(ss / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x)
        out[(u64)blockIdx.x * h + i] = Storage<O>::store(Storage<W>::load(w[i]) * (row[i] * r));
}

// LayerNorm (ops::layer_norm), biased variance, two passes. Grid: rows.
template <typename W, typename O>
__device__ void layer_norm(const float* x, const typename Storage<W>::T* w,
                           const typename Storage<W>::T* b, float eps,
                           typename Storage<O>::T* out, int h) {
    __shared__ float sh[BLOCK / 32];
    const float* row = x + (u64)blockIdx.x * h;
    float s = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) s += row[i];
    const float mean = block_sum(s, sh) / h;
    float v = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) v += (row[i] - mean) * (row[i] - mean);
    const float r = rsqrtf(block_sum(v, sh) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x)
        out[(u64)blockIdx.x * h + i] = Storage<O>::store(
            (row[i] - mean) * r * Storage<W>::load(w[i]) + Storage<W>::load(b[i]));
}

// y[r, j] += bias[j]. Grid-stride over rows * n.
template <typename W>
__device__ void add_bias(float* y, const typename Storage<W>::T* bias, u64 rows, int n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < rows * n;
         i += (u64)gridDim.x * blockDim.x)
        y[i] += Storage<W>::load(bias[i % n]);
}

// Elementwise conversion of f32 activations to the compute type.
template <typename O>
__device__ void to_compute(const float* x, typename Storage<O>::T* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = Storage<O>::store(x[i]);
}

// Activation (ops::activate) then optional multiply: kind 0 silu, 1 exact gelu, 2 tanh
// gelu, 3 relu; `up` may be null.
template <typename O>
__device__ void act_mul(const float* x, const float* up, int kind, typename Storage<O>::T* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = x[i];
        float a;
        if (kind == 0) a = v / (1.0f + expf(-v));
        else if (kind == 1) a = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        else if (kind == 2) a = 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        else a = fmaxf(v, 0.0f);
        out[i] = Storage<O>::store(up ? a * up[i] : a);
    }
}

// Gathers one attention operand out of the projection output into [batch, heads, seq, hd]
// in the compute type, for cuBLAS strided-batched GEMMs. Head h of the destination reads
// source head h / group (grouped-query attention: key/value heads repeated). Source
// element (row r, head g, dim d) is at src[r * row_stride + offset + g * head_stride + d].
// Rotary embeddings (ops::apply_rope, rotate_half convention) are applied on the way when
// rot_dim > 0; cos/sin are [positions, rot_dim / 2].
template <typename O>
__device__ void gather_heads(const float* src, int row_stride, int offset, int head_stride,
                             typename Storage<O>::T* dst, int batch, int seq, int heads, int group,
                             int hd, int rot_dim, const float* cos, const float* sin) {
    // Grid: batch * seq source rows; a row's heads * hd elements are read in order and
    // each head's hd land contiguously. 32-bit index arithmetic within the row (64-bit
    // divisions per element made this kernel several times slower than its bytes).
    const u64 r = blockIdx.x;
    const int p = (int)(r % (u64)seq);
    const u64 b = r / (u64)seq;
    const int half = rot_dim / 2;
    const float* row = src + r * row_stride + offset;
    for (int i = threadIdx.x; i < heads * hd; i += blockDim.x) {
        const int h = i / hd, d = i - h * hd;
        const float* head = row + (h / group) * head_stride;
        float v = head[d];
        if (d < rot_dim) {
            const int j = d < half ? d : d - half;
            const float c = cos[(u64)p * half + j], s = sin[(u64)p * half + j];
            v = d < half ? v * c - head[d + half] * s : v * c + head[d - half] * s;
        }
        dst[((b * heads + h) * seq + p) * hd + d] = Storage<O>::store(v);
    }
}

// Scatters attention output [batch, heads, seq, hd] (f32) back to rows [batch * seq,
// heads * hd] in the compute type, ready for the output projection.
template <typename O>
__device__ void scatter_heads(const float* src, typename Storage<O>::T* dst, int batch, int seq,
                              int heads, int hd) {
    const u64 n = (u64)batch * heads * seq * hd;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const int d = i % hd;
        const u64 t = i / hd;
        const int p = t % seq;
        const u64 bh = t / seq;
        const int h = bh % heads;
        const u64 b = bh / heads;
        dst[(b * seq + p) * heads * hd + (u64)h * hd + d] = Storage<O>::store(src[i]);
    }
}

// Causal masked softmax over score rows [batch * heads * seq, seq] (f32, already scaled):
// row i at position p = i % seq keeps columns 0..=p, the rest become 0. Output in the
// compute type for the probabilities-times-values GEMM. Grid: rows.
// With ALiBi (`slopes` not null: Baichuan 2 13B, ops::causal_attention_biased), query
// head h's score for key j gains slopes[h] * j first; the rows are [items = windows *
// heads, seq] so row r is head (r / seq) % heads.
template <typename O>
__device__ void causal_softmax(const float* scores, typename Storage<O>::T* probs, int seq,
                               const float* slopes, int heads) {
    __shared__ float sh[BLOCK / 32];
    const u64 r = blockIdx.x;
    const int p = r % seq;
    const float* row = scores + r * seq;
    const float slope = slopes ? slopes[(r / seq) % heads] : 0.0f;
#define SCORE(j) (slopes ? row[j] + slope * (float)(j) : row[j])
    float m = NEG_INF;
    for (int j = threadIdx.x; j <= p; j += blockDim.x) m = fmaxf(m, SCORE(j));
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j <= p; j += blockDim.x) s += expf(SCORE(j) - m);
    const float inv = 1.0f / block_sum(s, sh);
    for (int j = threadIdx.x; j < seq; j += blockDim.x)
        probs[r * seq + j] = Storage<O>::store(j <= p ? expf(SCORE(j) - m) * inv : 0.0f);
#undef SCORE
}

// Fused log-softmax / cross-entropy (ops::nll_sum) over a chunk of logits rows
// [rows, vocab] (f32): nll[r] = logsumexp(row) - row[target[r]], in f64 per row so the
// host adds rows in order, exactly as the CPU does. Grid: rows.
// A logits row's maximum and its sum of exp(x - max), every thread of the block.
__device__ float2 row_max_expsum(const float* row, int vocab, float* sh) {
    float m = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(row[j] - m);
    return make_float2(m, block_sum(s, sh));
}

extern "C" __global__ void __launch_bounds__(BLOCK)
nll_rows(const float* logits, const u32* targets, double* nll, int vocab) {
    __shared__ float sh[BLOCK / 32];
    const u64 r = blockIdx.x;
    const float* row = logits + r * vocab;
    const float2 ms = row_max_expsum(row, vocab, sh);
    if (threadIdx.x == 0) nll[r] = (double)ms.x + log((double)ms.y) - (double)row[targets[r]];
}

// Per-row log-probability (f64) of the target under softmax of f32 logit rows, and
// whether the target is the row's first maximum (ops::target_logprob: a multiple-choice
// continuation token and lm-evaluation-harness's is_greedy). Grid: rows.
extern "C" __global__ void __launch_bounds__(BLOCK)
logprob_rows(const float* logits, const u32* targets, double* logprob, unsigned char* greedy,
             int vocab) {
    __shared__ float sh[BLOCK / 32];
    const u64 r = blockIdx.x;
    const float* row = logits + r * vocab;
    const int t = (int)targets[r];
    const float2 ms = row_max_expsum(row, vocab, sh);
    const float m = ms.x;
    // A maximum before the target (m is the row's maximum: >= means ==).
    int earlier = 0;
    for (int j = threadIdx.x; j < t; j += blockDim.x) earlier |= row[j] >= m;
    earlier = __syncthreads_or(earlier);
    if (threadIdx.x == 0) {
        logprob[r] = (double)row[t] - ((double)m + log((double)ms.y));
        greedy[r] = (!earlier && row[t] == m) ? 1 : 0;
    }
}

// dst[i, :] = src[idx[i], :] (the scored rows, before the output head). Grid: idx rows.
template <typename O>
__device__ void gather_rows(const typename Storage<O>::T* src, const u32* idx,
                            typename Storage<O>::T* dst, int h) {
    const u64 r = blockIdx.x;
    const typename Storage<O>::T* row = src + (u64)idx[r] * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) dst[r * h + i] = row[i];
}

// x += y (residual add), f32.
extern "C" __global__ void add_f32(float* x, const float* y, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// x = clamp(x, -limit, limit) in place, f32 (ops::clamp: OLMo's clip_qkv). Comparisons,
// not fminf/fmaxf, so that a NaN stays NaN as Rust's f32::clamp keeps it.
extern "C" __global__ void clamp_f32(float* x, float limit, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = x[i];
        x[i] = v < -limit ? -limit : (v > limit ? limit : v);
    }
}

// Baichuan 2's NormHead (Model::norm_head_scale): out[r] = 1 / max(||w[r, :]||, 1e-12) for
// each row of the head, squares summed in f64 per thread. Grid: rows.
template <typename W>
__device__ void row_inv_norm(const typename Storage<W>::T* w, float* out, int h) {
    __shared__ float sh[BLOCK / 32];
    const typename Storage<W>::T* row = w + (u64)blockIdx.x * h;
    double ss = 0.0;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const double v = Storage<W>::load(row[i]);
        ss += v * v;
    }
    const float t = block_sum((float)ss, sh);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)(1.0 / fmax(sqrt((double)t), 1e-12));
}

// x[r, j] *= s[j]: the NormHead's scale on a block of logits (Model::project). Grid-stride
// over rows * n.
extern "C" __global__ void scale_cols_f32(float* x, const float* s, u64 rows, int n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < rows * n;
         i += (u64)gridDim.x * blockDim.x)
        x[i] *= s[i % n];
}

// ---- extern "C" instantiations: name_<weight>_<compute> ----
#define WO(W, O, NAME)                                                                          \
extern "C" __global__ void __launch_bounds__(BLOCK)                                             \
rms_norm_##NAME(const float* x, const Storage<W>::T* w, float eps, Storage<O>::T* out, int h) { \
    rms_norm<W, O>(x, w, eps, out, h);                                                          \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(BLOCK)                                             \
layer_norm_##NAME(const float* x, const Storage<W>::T* w, const Storage<W>::T* b, float eps,    \
                  Storage<O>::T* out, int h) {                                                  \
    layer_norm<W, O>(x, w, b, eps, out, h);                                                     \
}

#define ONE(TAG, NAME)                                                                            \
extern "C" __global__ void embed_##NAME(const u32* tokens, const Storage<TAG>::T* table, float* x, int h) { \
    embed<TAG>(tokens, table, x, h);                                                              \
}                                                                                               \
extern "C" __global__ void add_bias_##NAME(float* y, const Storage<TAG>::T* b, u64 rows, int n) { \
    add_bias<TAG>(y, b, rows, n);                                                                 \
}                                                                                               \
extern "C" __global__ void to_compute_##NAME(const float* x, Storage<TAG>::T* out, u64 n) {       \
    to_compute<TAG>(x, out, n);                                                                   \
}                                                                                               \
extern "C" __global__ void act_mul_##NAME(const float* x, const float* up, int kind,            \
                                          Storage<TAG>::T* out, u64 n) {                          \
    act_mul<TAG>(x, up, kind, out, n);                                                            \
}                                                                                               \
extern "C" __global__ void gather_heads_##NAME(const float* src, int row_stride, int offset,     \
        int head_stride, Storage<TAG>::T* dst, int batch, int seq, int heads, int group, int hd,  \
        int rot_dim, const float* cos, const float* sin) {                                      \
    gather_heads<TAG>(src, row_stride, offset, head_stride, dst, batch, seq, heads, group, hd,    \
                    rot_dim, cos, sin);                                                         \
}                                                                                               \
extern "C" __global__ void scatter_heads_##NAME(const float* src, Storage<TAG>::T* dst, int batch, \
        int seq, int heads, int hd) {                                                           \
    scatter_heads<TAG>(src, dst, batch, seq, heads, hd);                                          \
}                                                                                               \
extern "C" __global__ void gather_rows_##NAME(const Storage<TAG>::T* src, const u32* idx,          \
                                              Storage<TAG>::T* dst, int h) {                    \
    gather_rows<TAG>(src, idx, dst, h);                                                         \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(BLOCK)                                             \
causal_softmax_##NAME(const float* scores, Storage<TAG>::T* probs, int seq) {                     \
    causal_softmax<TAG>(scores, probs, seq, nullptr, 1);                                          \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(BLOCK)                                             \
causal_softmax_alibi_##NAME(const float* scores, Storage<TAG>::T* probs, int seq,               \
                            const float* slopes, int heads) {                                   \
    causal_softmax<TAG>(scores, probs, seq, slopes, heads);                                       \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(BLOCK)                                             \
row_inv_norm_##NAME(const Storage<TAG>::T* w, float* out, int h) {                               \
    row_inv_norm<TAG>(w, out, h);                                                               \
}

ONE(bf16_tag, bf16)
ONE(f16_tag, f16)
ONE(f32_tag, f32)
WO(bf16_tag, bf16_tag, bf16_bf16)
WO(bf16_tag, f32_tag, bf16_f32)
WO(f16_tag, f16_tag, f16_f16)
WO(f16_tag, f32_tag, f16_f32)
WO(f32_tag, f32_tag, f32_f32)
WO(f32_tag, bf16_tag, f32_bf16)

// ---- Causal flash attention (FlashAttention-2's schedule) for bf16 and f16 ----
// softmax(q k^T * scale + causal mask) v without materialising the scores: a block owns
// 64 query rows of one (window, head), 16 per warp; it walks the key tiles of 64 up to
// its diagonal, keeps a running row max and sum in f32 (online softmax), and accumulates
// O in f32 registers through tensor-core MMAs (m16n8k16, f32 accumulation). P is rounded
// to the compute type before the P V product, as the materialised path rounds its
// probabilities. q: [batch, heads, seq, D]; k, v: [batch, heads / group, seq, D]; out:
// rows [batch * seq, heads * D] in the compute type, ready for the output projection.
// The CPU reference is ops::causal_attention; `scale_log2` is scale * log2(e).
#define FA_BQ 64
#define FA_BK 64

template <typename Tag> struct Mma;
template <> struct Mma<bf16_tag> {
    static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Mma<f16_tag> {
    static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// Two values in one register, the lower column in the low half (the MMA operand layout),
// by the sm_80 paired conversion: round to nearest even, as Storage<Tag>::store rounds
// (they differ only in the bits of a NaN).
template <typename Tag> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<bf16_tag>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ u32 pack2<f16_tag>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2^x on the special-function unit; results below 2^-126 flush to 0 (a probability that
// small adds nothing to a sum of at least 1).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// One K and one V tile, row-major [key][d], 16 bytes per copy; zeros past the end. With
// ASYNC the copies are cp.async (the caller commits and waits), else plain loads/stores.
template <int D, bool ASYNC>
__device__ __forceinline__ void fa_load_tile(u16* ks, u16* vs, const u16* kh, const u16* vh,
                                             int k0, int seq) {
    constexpr int KP = D + 8;
    for (int i = threadIdx.x; i < FA_BK * D / 8; i += blockDim.x) {
        const int key = i / (D / 8), c = (i % (D / 8)) * 8;
        const bool in = k0 + key < seq;
        const u64 off = in ? (u64)(k0 + key) * D + c : 0;
        if (ASYNC) {
            const int n = in ? 16 : 0;  // 0 bytes read: the 16 are zero-filled
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                         :: "r"(smem_addr(ks + key * KP + c)), "l"(kh + off), "r"(n) : "memory");
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                         :: "r"(smem_addr(vs + key * KP + c)), "l"(vh + off), "r"(n) : "memory");
        } else {
            uint4 kk = make_uint4(0, 0, 0, 0), vv = kk;
            if (in) {
                kk = *(const uint4*)(kh + off);
                vv = *(const uint4*)(vh + off);
            }
            *(uint4*)(ks + key * KP + c) = kk;
            *(uint4*)(vs + key * KP + c) = vv;
        }
    }
}

// WARPS warps of 16 query rows each per block; ASYNC: the next K/V tile is copied with
// cp.async while this one is used (two buffers), instead of load, barrier, compute.
template <typename Tag, int D, int WARPS, bool ASYNC>
__device__ void flash_attention(const u16* q, const u16* k, const u16* v, u16* out, int seq,
                                int heads, int group, float scale_log2) {
    constexpr int KP = D + 8;  // padded row (halves): conflict-free fragment reads
    constexpr int BQ = 16 * WARPS;
    constexpr int STAGES = ASYNC ? 2 : 1;
    __shared__ __align__(16) u16 ks[STAGES][FA_BK * KP];
    __shared__ __align__(16) u16 vs[STAGES][FA_BK * KP];
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kv_heads = heads / group;
    const u16* qh = q + ((u64)b * heads + h) * seq * D;
    const u64 kv0 = ((u64)b * kv_heads + h / group) * seq * D;
    const u16* kh = k + kv0;
    const u16* vh = v + kv0;
    const int row0 = qb * BQ + warp * 16;  // this warp's first query row
    const int r_lo = row0 + g, r_hi = r_lo + 8;

    // This warp's 16 query rows as A fragments, one per 16 dims.
    u32 qf[D / 16][4];
#pragma unroll
    for (int s = 0; s < D / 16; ++s) {
        const int c = s * 16 + 2 * t;
        qf[s][0] = r_lo < seq ? *(const u32*)(qh + (u64)r_lo * D + c) : 0u;
        qf[s][1] = r_hi < seq ? *(const u32*)(qh + (u64)r_hi * D + c) : 0u;
        qf[s][2] = r_lo < seq ? *(const u32*)(qh + (u64)r_lo * D + c + 8) : 0u;
        qf[s][3] = r_hi < seq ? *(const u32*)(qh + (u64)r_hi * D + c + 8) : 0u;
    }
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;

    const int keys = min(seq, (qb + 1) * BQ);
    if (ASYNC) {
        fa_load_tile<D, true>(ks[0], vs[0], kh, vh, 0, seq);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    for (int k0 = 0, it = 0; k0 < keys; k0 += FA_BK, ++it) {
        const int st = ASYNC ? (it & 1) : 0;
        if (ASYNC) {
            if (k0 + FA_BK < keys) {  // the next tile into the other buffer, then wait for this one
                fa_load_tile<D, true>(ks[st ^ 1], vs[st ^ 1], kh, vh, k0 + FA_BK, seq);
                asm volatile("cp.async.commit_group;" ::: "memory");
                asm volatile("cp.async.wait_group 1;" ::: "memory");
            } else {
                asm volatile("cp.async.wait_group 0;" ::: "memory");
            }
        } else {
            __syncthreads();  // the previous tile is consumed
            fa_load_tile<D, false>(ks[0], vs[0], kh, vh, k0, seq);
        }
        __syncthreads();
        // A tile wholly above this warp's rows is all masked: skip it (no barrier inside).
        if (k0 <= row0 + 15) {
            const u16* kt = ks[st];
            const u16* vt = vs[st];
            // S = Q K^T for 16 rows x 64 keys: B(d, key) = K[key][d].
            float sc[FA_BK / 8][4];
#pragma unroll
            for (int j = 0; j < FA_BK / 8; ++j) {
                sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
                const u16* kr = kt + (j * 8 + g) * KP + 2 * t;
#pragma unroll
                for (int s = 0; s < D / 16; ++s)
                    Mma<Tag>::run(sc[j], qf[s], *(const u32*)(kr + s * 16), *(const u32*)(kr + s * 16 + 8));
            }
            // Causal mask (only a tile reaching past the warp's first row needs it; keys
            // past the end are in such a tile) and the running max of the raw scores; the
            // scaling to log2 units is folded into the exponent's FMA below.
            const bool diagonal = k0 + FA_BK - 1 > row0;
            float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
            for (int j = 0; j < FA_BK / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (diagonal && k0 + j * 8 + 2 * t + (e & 1) > (e < 2 ? r_lo : r_hi))
                        sc[j][e] = NEG_INF;
                    if (e < 2) mx_lo = fmaxf(mx_lo, sc[j][e]); else mx_hi = fmaxf(mx_hi, sc[j][e]);
                }
            }
#pragma unroll
            for (int w = 1; w <= 2; w <<= 1) {
                mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, w));
                mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, w));
            }
            const float mn_lo = fmaxf(m_lo, mx_lo * scale_log2);
            const float mn_hi = fmaxf(m_hi, mx_hi * scale_log2);
            // A row with every key so far masked keeps base 0 (no -inf - -inf).
            const float base_lo = mn_lo == NEG_INF ? 0.0f : mn_lo;
            const float base_hi = mn_hi == NEG_INF ? 0.0f : mn_hi;
            const float c_lo = ex2(m_lo - base_lo), c_hi = ex2(m_hi - base_hi);
            m_lo = mn_lo;
            m_hi = mn_hi;
            float s_lo = 0.0f, s_hi = 0.0f;
#pragma unroll
            for (int j = 0; j < FA_BK / 8; ++j) {
                sc[j][0] = ex2(fmaf(sc[j][0], scale_log2, -base_lo));
                sc[j][1] = ex2(fmaf(sc[j][1], scale_log2, -base_lo));
                sc[j][2] = ex2(fmaf(sc[j][2], scale_log2, -base_hi));
                sc[j][3] = ex2(fmaf(sc[j][3], scale_log2, -base_hi));
                s_lo += sc[j][0] + sc[j][1];
                s_hi += sc[j][2] + sc[j][3];
            }
            // Per-thread partial sums: the quad's four are added once, at the end.
            l_lo = l_lo * c_lo + s_lo;
            l_hi = l_hi * c_hi + s_hi;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                o[n][0] *= c_lo;
                o[n][1] *= c_lo;
                o[n][2] *= c_hi;
                o[n][3] *= c_hi;
            }
            // O += P V: P's accumulators are already the A fragments of the next MMA; V's B
            // fragments (B(key, d) = V[key][d]) come transposed out of shared memory.
#pragma unroll
            for (int kk = 0; kk < FA_BK / 16; ++kk) {
                u32 a[4];
                a[0] = pack2<Tag>(sc[2 * kk][0], sc[2 * kk][1]);
                a[1] = pack2<Tag>(sc[2 * kk][2], sc[2 * kk][3]);
                a[2] = pack2<Tag>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
                a[3] = pack2<Tag>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
                const u32 row_addr = smem_addr(vt + (kk * 16 + (lane & 15)) * KP);
#pragma unroll
                for (int n = 0; n < D / 8; ++n) {
                    u32 b0, b1;
                    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                                 : "=r"(b0), "=r"(b1)
                                 : "r"(row_addr + n * 16));
                    Mma<Tag>::run(o[n], a, b0, b1);
                }
            }
        }
        if (ASYNC) __syncthreads();  // this buffer is refilled next iteration
    }
#pragma unroll
    for (int w = 1; w <= 2; w <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, w);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, w);
    }
    const float i_lo = 1.0f / l_lo, i_hi = 1.0f / l_hi;
    const u64 stride = (u64)heads * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int c = h * D + n * 8 + 2 * t;
        if (r_lo < seq)
            *(u32*)(out + ((u64)b * seq + r_lo) * stride + c) = pack2<Tag>(o[n][0] * i_lo, o[n][1] * i_lo);
        if (r_hi < seq)
            *(u32*)(out + ((u64)b * seq + r_hi) * stride + c) = pack2<Tag>(o[n][2] * i_hi, o[n][3] * i_hi);
    }
}

// The forward pass's kernels (`flash_attention_<dtype>_d<D>`) use FLASH_WARPS warps and
// cp.async for head sizes up to FLASH_ASYNC_MAX_D (two K/V tile pairs must fit in 48 KB of
// static shared memory), both defined from ops::FlashVariant when the module is compiled.
// `ckmerge gpu-bench --attention` times the variants below (`..._d<D>_w<warps>[_async]`),
// which compute the same function bit for bit.
#define FLASH(TAG, NAME, D)                                                                     \
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS)                                  \
flash_attention_##NAME##_d##D(const u16* q, const u16* k, const u16* v, u16* out, int seq,      \
                              int heads, int group, float scale_log2) {                         \
    flash_attention<TAG, D, FLASH_WARPS, (D <= FLASH_ASYNC_MAX_D)>(q, k, v, out, seq, heads,    \
                                                                  group, scale_log2);           \
}
#define FLASH_VARIANT(D, W, A, SUFFIX)                                                          \
extern "C" __global__ void __launch_bounds__(32 * W)                                            \
flash_attention_bf16_d##D##_##SUFFIX(const u16* q, const u16* k, const u16* v, u16* out,        \
                                     int seq, int heads, int group, float scale_log2) {         \
    flash_attention<bf16_tag, D, W, A>(q, k, v, out, seq, heads, group, scale_log2);            \
}
FLASH_VARIANT(64, 4, false, w4)
FLASH_VARIANT(64, 8, false, w8)
FLASH_VARIANT(64, 4, true, w4_async)
FLASH_VARIANT(64, 8, true, w8_async)
FLASH_VARIANT(128, 4, false, w4)
FLASH_VARIANT(128, 8, false, w8)
#define FLASH_DIMS(TAG, NAME) \
    FLASH(TAG, NAME, 16) FLASH(TAG, NAME, 32) FLASH(TAG, NAME, 64) FLASH(TAG, NAME, 80) \
    FLASH(TAG, NAME, 96) FLASH(TAG, NAME, 128)
FLASH_DIMS(bf16_tag, bf16)
FLASH_DIMS(f16_tag, f16)
