// The fused multi-tensor N-way weighted sum: `dst = sum_i w_i * src_i` for every tensor
// of a model in one launch. Numerics follow the CPU reference (kernels/src/merge.rs) bit
// for bit: exact widening to f32, one chain of fused multiply-adds in source order
// starting from -0.0, one round-to-nearest-even to the output type.
//
// Work layout: each tensor is cut into tiles of TILE elements; `tiles[t].first_tile` is
// the prefix sum, so block b finds its tensor by binary search and needs no host-side
// per-tensor launch. Each thread moves 16 bytes per source per step (uint4 loads), which
// needs every pointer 16-byte aligned: the host allocates tensors at 256-byte boundaries
// and checks.

#define MAX_SOURCES 16
#define THREADS 256
#define STEPS 4

struct MergeTile {
    u64 first_tile;  // first tile (block) index of this tensor
    u64 len;         // elements
    u64 dst;
    u64 src[MAX_SOURCES];
};

template <typename Tag>
__device__ __forceinline__ void merge_body(const MergeTile* __restrict__ tensors, int n_tensors,
                                           const float* __restrict__ weights, int n_src) {
    typedef typename Storage<Tag>::T T;
    const int VEC = 16 / sizeof(T);
    const u64 TILE = (u64)THREADS * VEC * STEPS;

    __shared__ int tensor;
    __shared__ float w[MAX_SOURCES];
    if (threadIdx.x == 0) {
        int lo = 0, hi = n_tensors - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (tensors[mid].first_tile <= (u64)blockIdx.x) lo = mid; else hi = mid - 1;
        }
        tensor = lo;
    }
    if (threadIdx.x < n_src) w[threadIdx.x] = weights[threadIdx.x];
    __syncthreads();

    const MergeTile& m = tensors[tensor];
    const u64 base = ((u64)blockIdx.x - m.first_tile) * TILE;
    T* dst = (T*)m.dst;
    #pragma unroll
    for (int s = 0; s < STEPS; s++) {
        const u64 e0 = base + ((u64)s * THREADS + threadIdx.x) * VEC;
        if (e0 + VEC <= m.len) {
            float acc[VEC];
            #pragma unroll
            for (int k = 0; k < VEC; k++) acc[k] = -0.0f;
            for (int i = 0; i < n_src; i++) {
                uint4 raw = *(const uint4*)((const T*)m.src[i] + e0);
                const T* v = (const T*)&raw;
                #pragma unroll
                for (int k = 0; k < VEC; k++) acc[k] = __fmaf_rn(w[i], Storage<Tag>::load(v[k]), acc[k]);
            }
            uint4 out;
            T* o = (T*)&out;
            #pragma unroll
            for (int k = 0; k < VEC; k++) o[k] = Storage<Tag>::store(acc[k]);
            *(uint4*)(dst + e0) = out;
        } else if (e0 < m.len) {
            for (u64 e = e0; e < m.len; e++) {
                float acc = -0.0f;
                for (int i = 0; i < n_src; i++)
                    acc = __fmaf_rn(w[i], Storage<Tag>::load(((const T*)m.src[i])[e]), acc);
                dst[e] = Storage<Tag>::store(acc);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
merge_bf16(const MergeTile* tensors, int n_tensors, const float* weights, int n_src) {
    merge_body<bf16_tag>(tensors, n_tensors, weights, n_src);
}
extern "C" __global__ void __launch_bounds__(THREADS)
merge_f16(const MergeTile* tensors, int n_tensors, const float* weights, int n_src) {
    merge_body<f16_tag>(tensors, n_tensors, weights, n_src);
}
extern "C" __global__ void __launch_bounds__(THREADS)
merge_f32(const MergeTile* tensors, int n_tensors, const float* weights, int n_src) {
    merge_body<f32_tag>(tensors, n_tensors, weights, n_src);
}
