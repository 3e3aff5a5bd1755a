// kernels/cuda_common.cuh: device helpers every kernels/*.cu uses: element loads and stores for the
// activation dtypes (float32 and bfloat16, computed in float32), the fault record, block reductions in
// a fixed order (deterministic: no floating-point atomics anywhere in kernels/).
#ifndef DSMOE_KERNELS_CUDA_COMMON_CUH
#define DSMOE_KERNELS_CUDA_COMMON_CUH
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include "cuda_env.h"
#ifdef DSMOE_CUDA_EMU
#include <stdio.h> // the emulator's messages (dsmoe_ld16)
#endif

// Activations are float32 or bfloat16; arithmetic is float32. Stores round to nearest even.
__device__ __forceinline__ float dsmoe_ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float dsmoe_ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void dsmoe_st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void dsmoe_st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// GELU, the tanh approximation, with cpu_math.h's constants (tanhf where the cpu plugin has a fast tanh:
// they agree to about 1e-7 absolute). One definition for gelu_forward / gelu_backward (elementwise.cu) and
// the grouped GEMMs' epilogues (gemm.cu, gemm_rows.cu), so that in float32 the core gets the same bits
// whichever it calls.
#define DSMOE_CU_GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)
#define DSMOE_CU_GELU_CUBE 0.044715f

__device__ __forceinline__ float dsmoe_cu_gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(DSMOE_CU_GELU_SCALE * (x + DSMOE_CU_GELU_CUBE * x * x * x)));
}

__device__ __forceinline__ float dsmoe_cu_gelu_grad(float x) {
    float th = tanhf(DSMOE_CU_GELU_SCALE * (x + DSMOE_CU_GELU_CUBE * x * x * x));
    return 0.5f * (1.0f + th) +
           0.5f * x * (1.0f - th * th) * DSMOE_CU_GELU_SCALE * (1.0f + 3.0f * DSMOE_CU_GELU_CUBE * x * x);
}

// 16 bytes from p (16-byte aligned: a GPU faults on less, and the emulator stops the run with the
// pointer) into float32: 4 floats, or 8 bfloat16 (each the upper half of its float32, so exact).
__device__ __forceinline__ uint4 dsmoe_ld16_raw(const void *p) {
#ifdef DSMOE_CUDA_EMU
    if ((uintptr_t)p % 16u) {
        char what[96];
        snprintf(what, sizeof what, "a 16-byte load from %p, which is not 16-byte aligned", p);
        dsmoe_emu_kernel_bug(what);
    }
#endif
    return *(const uint4 *)p;
}
__device__ __forceinline__ void dsmoe_ld16(const float *p, float v[4]) {
    uint4 u = dsmoe_ld16_raw(p);
    v[0] = __uint_as_float(u.x), v[1] = __uint_as_float(u.y), v[2] = __uint_as_float(u.z), v[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void dsmoe_ld16(const __nv_bfloat16 *p, float v[8]) {
    uint4 u = dsmoe_ld16_raw(p);
    unsigned w[4] = {u.x, u.y, u.z, u.w};
    for (int i = 0; i < 4; i++) v[2 * i] = __uint_as_float(w[i] << 16), v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
}

// The cpu plugin's cpu_exp_fast (plugins/cpu/cpu_math.h), so that softmax probabilities agree to the
// last bits and exp of a very negative x is about 1.6e-38 there and here (clamped at -87), not 0 in one
// of them (cross-entropy, distillation).
__device__ __forceinline__ float dsmoe_exp_fast(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    return y * __int_as_float(((int)n + 127) << 23);
}

// Records the first data fault (see dsmoe_cu_fault_code); later ones are dropped.
__device__ __forceinline__ void dsmoe_cu_raise(dsmoe_cu_fault *f, int code, long long a, long long b) {
    if (atomicCAS(&f->code, 0, code) == 0) {
        f->a = a;
        f->b = b;
        __threadfence_system(); // a and b before the flag, as the host sees them
        *(volatile int32_t *)&f->published = 1;
        __threadfence_system();
    }
}

// Sum of v over the block in a fixed order (warp shuffles, then warp 0 over the warp sums); every
// thread gets the result. blockDim.x must be a multiple of 32, at most 1024. `shared` holds 32 floats.
template <typename T>
__device__ __forceinline__ T dsmoe_block_sum(T v, T *shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads(); // shared may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shared[lane] : (T)0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ T dsmoe_block_max(T v, T *shared) {
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shared[lane] : shared[0];
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Launches: dsmoe_cu_launch(kernel, grid, block, shared_bytes, stream, args...) is kernel<<<grid, block,
// shared_bytes, stream>>>(args...); its arguments take the kernel's parameter types, as at a <<<...>>>
// launch. Built with DSMOE_CUDA_EMU (tests/cuda_emu/, the kernels on a host without a GPU), it runs the
// kernel on the emulator instead, which is why no kernels/*.cu writes <<<...>>> itself; likewise
// DSMOE_CU_DYNAMIC_SHARED for `extern __shared__` arrays. dsmoe_cu_launch_cooperative is
// cudaLaunchCooperativeKernel with typed arguments; it returns the launch's error.
template <typename T> struct dsmoe_cu_same {
    typedef T type;
};
#ifdef DSMOE_CUDA_EMU
template <typename... P>
static inline void dsmoe_cu_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes,
                                   cudaStream_t stream, typename dsmoe_cu_same<P>::type... args) {
    (void)dsmoe_emu_launch(kernel, grid, block, shared_bytes, stream, 0, args...);
}
template <typename... P>
static inline cudaError_t dsmoe_cu_launch_cooperative(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes,
                                                      cudaStream_t stream, typename dsmoe_cu_same<P>::type... args) {
    return dsmoe_emu_launch(kernel, grid, block, shared_bytes, stream, 1, args...);
}
#define DSMOE_CU_DYNAMIC_SHARED(T, name) T *name = (T *)dsmoe_emu_dynamic_shared()
#else
template <typename... P>
static inline void dsmoe_cu_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes,
                                   cudaStream_t stream, typename dsmoe_cu_same<P>::type... args) {
    kernel<<<grid, block, shared_bytes, stream>>>(args...);
}
template <typename... P>
static inline cudaError_t dsmoe_cu_launch_cooperative(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes,
                                                      cudaStream_t stream, typename dsmoe_cu_same<P>::type... args) {
    void *argv[] = {(void *)&args...};
    return cudaLaunchCooperativeKernel((const void *)kernel, grid, block, argv, shared_bytes, stream);
}
#define DSMOE_CU_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// dsmoe_cu_launch with more than the default 48 KiB of dynamic shared memory: the kernel's limit is raised
// to `shared_bytes` first (up to the device's opt-in maximum; past it the attribute call fails). Returns
// that call's error; the launch's own is dsmoe_cu_check_launch's to report.
template <typename... P>
static inline cudaError_t dsmoe_cu_launch_smem(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes,
                                               cudaStream_t stream, typename dsmoe_cu_same<P>::type... args) {
    if (shared_bytes > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute((const void *)kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)shared_bytes);
        if (e != cudaSuccess) return e;
    }
    dsmoe_cu_launch(kernel, grid, block, shared_bytes, stream, args...);
    return cudaSuccess;
}

// Dispatches a templated launch on the activation dtype: DSMOE_CU_DISPATCH(dt, T, { launch<T>(...); }).
#define DSMOE_CU_DISPATCH(dt, T, ...)                                                                      \
    do {                                                                                                   \
        if ((dt) == DSMOE_FLOAT32) {                                                                       \
            typedef float T;                                                                               \
            __VA_ARGS__                                                                                    \
        } else {                                                                                           \
            typedef __nv_bfloat16 T;                                                                       \
            __VA_ARGS__                                                                                    \
        }                                                                                                  \
    } while (0)

// Checks that dt is an activation dtype the cuda plugin computes (float32, bfloat16).
static inline dsmoe_status dsmoe_cu_check_dtype(const dsmoe_cu_env *env, dsmoe_dtype dt, const char *op) {
    if (dt == DSMOE_FLOAT32 || dt == DSMOE_BFLOAT16) return DSMOE_OK;
    return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: dtype %s is not supported (float32 or bfloat16)", op,
                         dsmoe_dtype_name(dt));
}

static inline unsigned dsmoe_cu_blocks(size_t n, unsigned threads) {
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : (b > 65535u * 32u ? 65535u * 32u : b));
}

#endif
