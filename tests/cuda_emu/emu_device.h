// tests/cuda_emu/emu_device.h: the device side of the CUDA emulator that runs the cuda plugin on a host
// without a GPU (tests only). The build compiles each kernels/*.cu as C++ with this header included first
// (-include) and DSMOE_CUDA_EMU defined; kernels/cuda_common.cuh then launches through dsmoe_emu_launch
// instead of <<<...>>>.
//
// The model (emu_device.cc has the scheduler):
// - A CUDA thread is a fiber with its own stack; a block's fibers run on one host thread, each until it
//   reaches a barrier, a warp operation or its end. Barriers and warp operations complete when every
//   thread they concern has arrived, as on the GPU: __syncthreads (and _count, _or) waits for the
//   block's threads that have not exited, a warp operation for the lanes of its mask, grid.sync() for
//   the whole cooperative grid. A barrier that cannot complete (threads of one block waiting at different
//   barriers, a shuffle naming a lane that has exited) is a kernel bug: the emulator names the kernel
//   and aborts, where a GPU would hang or return undefined values.
// - Blocks of an ordinary launch run one after the other in a shuffled order; within a block, warp by
//   warp, each as far as it can go (to a __syncthreads or its end) before the next, in alternating
//   orders, and lanes in alternating directions. Results that depend on the order of blocks, or on a
//   write and a read of shared memory with no barrier between them, change with it.
// - __shared__ variables are `static thread_local`: one copy per host thread, which is one block at a
//   time (ordinary launches) or one block (cooperative launches, each block on a host thread of its own).
//   Dynamic shared memory comes from DSMOE_CU_DYNAMIC_SHARED.
// - Atomics are the compiler's __atomic builtins; fences are full fences.
// What it does not model: memory out of bounds (use the runtime's range checks and ordinary host tools),
// fused multiply-add contraction as nvcc does it (results can differ from a GPU's in the last bits), and
// timing.
#ifndef DSMOE_CUDA_EMU_DEVICE_H
#define DSMOE_CUDA_EMU_DEVICE_H

// Before the CUDA headers: host_defines.h keeps a __shared__ that is defined already.
#define __shared__ static thread_local
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------
// Built-in variables: the running fiber's, set by the scheduler at each switch.

// Plain uint3 (dim3 has constructors, which would make every access call an initialiser) in an ordinary
// global, not a thread_local: the kernels read these all the time, and a thread_local of a dlopen'ed module
// costs a __tls_get_addr call per read. One host thread at a time runs kernel code (emu_device.cc's lock).
struct dsmoe_emu_ids {
    uint3 thread_idx, block_idx, block_dim, grid_dim;
};
extern dsmoe_emu_ids dsmoe_emu_now;
#define threadIdx (dsmoe_emu_now.thread_idx)
#define blockIdx (dsmoe_emu_now.block_idx)
#define blockDim (dsmoe_emu_now.block_dim)
#define gridDim (dsmoe_emu_now.grid_dim)
#define warpSize 32

// ---------------------------------------------------------------------------------------------------
// Synchronisation (emu_device.cc). Each call may switch to another fiber.

extern "C" {
void dsmoe_emu_syncthreads(void);
int dsmoe_emu_syncthreads_count(int pred);
int dsmoe_emu_syncthreads_or(int pred);
int dsmoe_emu_syncthreads_and(int pred);
void dsmoe_emu_syncwarp(unsigned mask);
unsigned dsmoe_emu_ballot(unsigned mask, int pred);
// The bits of the value lane src_lane passed (bits: this lane's value; src_lane: the lane it reads).
uint64_t dsmoe_emu_shuffle(unsigned mask, uint64_t bits, int src_lane);
void dsmoe_emu_grid_sync(void);
// Stops the run naming the running kernel and what it did wrong (a kernel's own checks in the emulator build).
[[noreturn]] void dsmoe_emu_kernel_bug(const char *what);
void *dsmoe_emu_dynamic_shared(void);
// One launch: body(ctx) is run by every thread of the grid, in the stream's order (emu_streams.h), and
// release(ctx) after the grid (or at once when the launch is refused). Returns cudaSuccess or the launch
// error (also set as the runtime's last error), as cudaLaunchKernel would.
cudaError_t dsmoe_emu_run(const void *kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                          int cooperative, void (*body)(void *), void *ctx, void (*release)(void *));
}

static inline void __syncthreads(void) { dsmoe_emu_syncthreads(); }
static inline int __syncthreads_count(int pred) { return dsmoe_emu_syncthreads_count(pred); }
static inline int __syncthreads_or(int pred) { return dsmoe_emu_syncthreads_or(pred); }
static inline int __syncthreads_and(int pred) { return dsmoe_emu_syncthreads_and(pred); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { dsmoe_emu_syncwarp(mask); }
static inline unsigned __ballot_sync(unsigned mask, int pred) { return dsmoe_emu_ballot(mask, pred); }

template <typename T> static inline T dsmoe_emu_shfl(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    bits = dsmoe_emu_shuffle(mask, bits, src);
    memcpy(&v, &bits, sizeof v);
    return v;
}
// Lanes are numbered within segments of `width` lanes; a source outside the segment reads its own value.
static inline int dsmoe_emu_lane(void) {
    return (int)((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) & 31;
}
template <typename T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const int lane = dsmoe_emu_lane(), base = lane & ~(width - 1);
    return dsmoe_emu_shfl(mask, v, base + (src & (width - 1)));
}
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = dsmoe_emu_lane(), base = lane & ~(width - 1), src = lane ^ lane_mask;
    return dsmoe_emu_shfl(mask, v, src >= base && src < base + width ? src : lane);
}
template <typename T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = dsmoe_emu_lane(), base = lane & ~(width - 1), src = lane + (int)delta;
    return dsmoe_emu_shfl(mask, v, src < base + width ? src : lane);
}
template <typename T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = dsmoe_emu_lane(), base = lane & ~(width - 1), src = lane - (int)delta;
    return dsmoe_emu_shfl(mask, v, src >= base ? src : lane);
}

namespace cooperative_groups {
struct grid_group {
    void sync() const { dsmoe_emu_grid_sync(); }
};
static inline grid_group this_grid() { return grid_group(); }
} // namespace cooperative_groups

// ---------------------------------------------------------------------------------------------------
// Atomics and fences

template <typename T> static inline T atomicAdd(T *p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <typename T> static inline T atomicSub(T *p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <typename T> static inline T atomicOr(T *p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <typename T> static inline T atomicAnd(T *p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
template <typename T> static inline T atomicExch(T *p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <typename T> static inline T atomicCAS(T *p, T expected, T desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected; // the old value, whether or not it was replaced
}
template <typename T> static inline T atomicMin(T *p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
template <typename T> static inline T atomicMax(T *p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline void __threadfence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------------
// Device functions the host's libm and compiler do not have under these names

static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
static inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
static inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }

// CUDA's min and max take mixed integer types and floats; the usual arithmetic conversions pick the type.
template <typename A, typename B> static inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)b < (C)a ? (C)b : (C)a;
}
template <typename A, typename B> static inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)b : (C)a;
}

// ---------------------------------------------------------------------------------------------------
// Launches: the parameters are converted to the kernel's types once, as a launch copies them, and every
// thread calls the kernel on its own copy.

template <typename... P> struct dsmoe_emu_call {
    void (*kernel)(P...);
    std::tuple<typename std::decay<P>::type...> params;
    static void run(void *self) {
        dsmoe_emu_call *c = (dsmoe_emu_call *)self;
        std::tuple<typename std::decay<P>::type...> mine = c->params;
        std::apply(c->kernel, mine);
    }
    static void release(void *self) { delete (dsmoe_emu_call *)self; }
};

template <typename T> struct dsmoe_emu_same {
    typedef T type;
};

// The arguments take the kernel's parameter types (a non-deduced context), so that they convert at the
// call as they would at a <<<...>>> launch (NULL to a pointer, int to size_t).
template <typename... P>
static inline cudaError_t dsmoe_emu_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes,
                                           cudaStream_t stream, int cooperative,
                                           typename dsmoe_emu_same<P>::type... args) {
    // On the heap: the grid may run after this returns (a stream's queued work), with the parameters
    // as they were at the launch.
    dsmoe_emu_call<P...> *call =
        new dsmoe_emu_call<P...>{kernel, std::tuple<typename std::decay<P>::type...>(args...)};
    return dsmoe_emu_run((const void *)kernel, grid, block, shared_bytes, stream, cooperative,
                         &dsmoe_emu_call<P...>::run, call, &dsmoe_emu_call<P...>::release);
}

#endif
