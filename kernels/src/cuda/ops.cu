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

// SwiGLU (ops::silu_mul): out = silu(gate) * up.
template <typename O>
__device__ void silu_mul(const float* gate, const float* up, typename Storage<O>::T* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = Storage<O>::store(g / (1.0f + expf(-g)) * up[i]);
    }
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
    const u64 n = (u64)batch * heads * seq * hd;
    const int half = rot_dim / 2;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const int d = i % hd;
        const u64 t = i / hd;
        const int p = t % seq;
        const u64 bh = t / seq;
        const int h = bh % heads;
        const u64 b = bh / heads;
        const float* head = src + (b * seq + p) * row_stride + offset + (u64)(h / group) * head_stride;
        float v = head[d];
        if (d < rot_dim) {
            const int j = d < half ? d : d - half;
            const float c = cos[(u64)p * half + j], s = sin[(u64)p * half + j];
            v = d < half ? v * c - head[d + half] * s : v * c + head[d - half] * s;
        }
        dst[i] = Storage<O>::store(v);
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
template <typename O>
__device__ void causal_softmax(const float* scores, typename Storage<O>::T* probs, int seq) {
    __shared__ float sh[BLOCK / 32];
    const u64 r = blockIdx.x;
    const int p = r % seq;
    const float* row = scores + r * seq;
    float m = NEG_INF;
    for (int j = threadIdx.x; j <= p; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j <= p; j += blockDim.x) s += expf(row[j] - m);
    const float inv = 1.0f / block_sum(s, sh);
    for (int j = threadIdx.x; j < seq; j += blockDim.x)
        probs[r * seq + j] = Storage<O>::store(j <= p ? expf(row[j] - m) * inv : 0.0f);
}

// Fused log-softmax / cross-entropy (ops::nll_sum) over a chunk of logits rows
// [rows, vocab] (f32): nll[r] = logsumexp(row) - row[target[r]], in f64 per row so the
// host adds rows in order, exactly as the CPU does. Grid: rows.
extern "C" __global__ void __launch_bounds__(BLOCK)
nll_rows(const float* logits, const u32* targets, double* nll, int vocab) {
    __shared__ float sh[BLOCK / 32];
    const u64 r = blockIdx.x;
    const float* row = logits + r * vocab;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(row[j] - m);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) nll[r] = (double)m + log((double)s) - (double)row[targets[r]];
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
extern "C" __global__ void silu_mul_##NAME(const float* g, const float* u, Storage<TAG>::T* out, u64 n) { \
    silu_mul<TAG>(g, u, out, n);                                                                  \
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
    causal_softmax<TAG>(scores, probs, seq);                                                      \
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
