// Shared by every ckmerge CUDA module. No toolkit headers: bf16 and f16 are carried as
// 16-bit integers and converted here (bf16 by shifts, f16 by PTX `cvt`), so NVRTC needs
// no include path and a worker needs only the driver and libnvrtc at run time.
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// No math.h under NVRTC without toolkit headers.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest, ties to even; NaN stays NaN (quieted, sign kept). The same
// bit manipulation as the CPU reference `f32_to_bf16_bits_rne`.
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if (x != x) return (u16)((b >> 16) | 0x0040u);
    return (u16)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// Element access by storage type: `float` is f32; the two 16-bit formats are told apart
// by a tag type, since both are stored as u16.
struct bf16_tag {};
struct f16_tag {};
struct f32_tag {};

template <typename Tag> struct Storage;
template <> struct Storage<bf16_tag> {
    typedef u16 T;
    static __device__ __forceinline__ float load(T v) { return bf16_to_f32(v); }
    static __device__ __forceinline__ T store(float v) { return f32_to_bf16(v); }
};
template <> struct Storage<f16_tag> {
    typedef u16 T;
    static __device__ __forceinline__ float load(T v) { return f16_to_f32(v); }
    static __device__ __forceinline__ T store(float v) { return f32_to_f16(v); }
};
template <> struct Storage<f32_tag> {
    typedef float T;
    static __device__ __forceinline__ float load(T v) { return v; }
    static __device__ __forceinline__ T store(float v) { return v; }
};
