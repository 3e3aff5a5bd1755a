// tests/cuda_emu/emu_runtime.cc: the CUDA runtime API as the cuda plugin calls it (plugins/cuda/*.c,
// kernels/*.cu, kernels/cuda_env.c), emulated on the host for tests: the plugin, compiled by the host
// compiler and linked against this file instead of libcudart, runs where there is no GPU. Kernel launches
// are emulated elsewhere and report errors through dsmoe_emu_set_last_error (emu_runtime.h);
// cudaLaunchKernel and cudaLaunchCooperativeKernel are refused (cudaErrorNotSupported), since a call that
// reaches them bypassed that emulator. Test-only, never installed.
//
// The device: one, ordinal 0, sm_90-like, 4 multiprocessors, 8 GiB that live device allocations may not
// exceed. Its memory is host memory, 256-byte aligned as cudaMalloc's is: a device pointer works on the
// host too, as under unified addressing. A registry of the live device allocations and of the pinned host
// memory (cudaHostAlloc, cudaHostRegister) answers cudaPointerGetAttributes, interior pointers included.
//
// Stream order is emu_streams.cc's: work queued on a created stream runs only when something needs it
// (a synchronisation, a query, an event waited for, a copy to pageable host memory, cudaFree), so a
// missing wait shows as a result not yet there. Copies follow CUDA's rules for host memory: from pageable
// memory the bytes are taken at the call (the caller may reuse the buffer when it returns), to pageable
// memory the call returns once the copy is done; pinned memory (cudaHostAlloc, cudaHostRegister) is read
// and written when the copy runs. Kernels (emu_device.cc), cuBLAS (emu_cublas.cc) and cub's sorts queue
// their work the same way. DSMOE_EMU_STREAMS=immediate runs everything at once instead.
//
// Checked, as CUDA refuses it (cudaErrorInvalidValue unless said otherwise):
// - frees: cudaFree/cudaFreeAsync of anything but the start of a live device allocation, cudaFreeHost of
//   anything but a live cudaHostAlloc block: a double free is an error, not a crash;
// - copies and memsets: each side that is device memory (by the kind; for cudaMemcpyDefault, a side that
//   points into a device allocation) must lie with all its bytes inside one live device allocation, which
//   catches an out-of-range copy that a GPU may let pass;
// - handles: streams and events must be live (cudaErrorInvalidResourceHandle), pools too;
// - launches (emu_device.cc): more dynamic shared memory than the kernel's limit, 48 KiB unless
//   cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) raised it.
// New device memory and cudaHostAlloc memory is filled with 0xFF bytes (NaN as float32 and bfloat16), so
// that a result computed from memory nothing wrote shows, as uninitialised device memory would.
//
// Errors: the last error is per thread; every call that fails sets it. An error from the launch emulator
// that breaks a context on a GPU (an illegal address, a device assert, ...) is sticky for the process
// (there is no cudaDeviceReset): synchronisations, queries, cudaGetLastError and every call that queues
// work or allocates return it from then on. Frees and destroys still work: teardown leaks nothing.
//
// DSMOE_EMU_COMPUTE_CAPABILITY=MAJOR.MINOR: cudaGetDeviceProperties reports that compute capability.
// DSMOE_EMU_FAIL_MALLOC_AFTER=N (read at the first device allocation): the first N device allocations of
// the process succeed, every later one fails with cudaErrorMemoryAllocation (for out-of-memory paths).
#include "emu_runtime.h"
#include "emu_streams.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_set>

namespace {

constexpr size_t kTotalMem = size_t(8) << 30, kAlign = 256;
constexpr int kSmemOptin = 232448, kSmemDefault = 49152, kVersion = 13000;

enum Kind { kDevice, kHostAlloc, kRegistered };
struct Block { size_t bytes; Kind kind; };
struct Stream { unsigned flags; };
struct Event { unsigned flags; bool recorded; };
struct Pool { bool is_default; };
using Handles = std::unordered_set<const void *>;

// Never destroyed: an atexit handler or a static destructor of a test may still free through the plugin.
struct State {
    std::mutex mu;
    std::map<uintptr_t, Block> blocks; // by start address
    size_t device_bytes = 0;           // the live device blocks' sizes together
    unsigned long long device_allocs = 0;
    Handles streams, events, pools;
    Pool default_pool{true};
    std::map<const void *, int> dynamic_shared_limit; // by kernel: cudaFuncAttributeMaxDynamicSharedMemorySize
};
State &st = *new State;

thread_local cudaError_t last_error = cudaSuccess;
std::atomic<int> sticky{cudaSuccess};

cudaError_t broken() { return static_cast<cudaError_t>(sticky.load(std::memory_order_relaxed)); }

// Every failure goes through here: the real runtime records most of its errors in the last-error slot.
cudaError_t fail(cudaError_t e) {
    if (e != cudaSuccess && e != cudaErrorNotReady) last_error = e;
    return e;
}

template <class T> cudaError_t put(T *out, T v) {
    if (!out) return fail(cudaErrorInvalidValue);
    *out = v;
    return cudaSuccess;
}

long long fail_malloc_after() {
    static const long long v = [] {
        const char *s = getenv("DSMOE_EMU_FAIL_MALLOC_AFTER");
        if (!s || !*s) return -1LL;
        char *end;
        errno = 0;
        long long n = strtoll(s, &end, 10);
        if (!*end && !errno && n >= 0) return n;
        fprintf(stderr, "dsmoe cuda emulator: DSMOE_EMU_FAIL_MALLOC_AFTER='%s' is not a count >= 0: ignored\n", s);
        return -1LL;
    }();
    return v;
}

// The errors that leave a CUDA context unusable on a GPU.
bool is_sticky(cudaError_t e) {
    switch (e) {
    case cudaErrorIllegalAddress: case cudaErrorLaunchFailure: case cudaErrorLaunchTimeout: case cudaErrorAssert:
    case cudaErrorHardwareStackError: case cudaErrorIllegalInstruction: case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace: case cudaErrorInvalidPc: return true;
    default: return false;
    }
}

// The live block holding p (its start or a byte inside; a 0-byte block only its start), or end(). Under mu.
std::map<uintptr_t, Block>::iterator find_block(const void *p) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = st.blocks.upper_bound(a);
    if (it == st.blocks.begin()) return st.blocks.end();
    --it;
    return a - it->first < std::max<size_t>(it->second.bytes, 1) ? it : st.blocks.end();
}

bool is_device(const void *p) {
    auto it = find_block(p);
    return it != st.blocks.end() && it->second.kind == kDevice;
}

// Whether [p, p + n) lies inside one live device allocation. Under mu.
bool device_range(const void *p, size_t n) {
    auto it = find_block(p);
    if (it == st.blocks.end() || it->second.kind != kDevice) return false;
    size_t off = reinterpret_cast<uintptr_t>(p) - it->first;
    return off <= it->second.bytes && n <= it->second.bytes - off;
}

bool live(Handles &set, const void *h) {
    std::lock_guard<std::mutex> g(st.mu);
    return h && set.count(h) != 0;
}

// A new handle is the object's address, kept in its set until destroyed.
template <class T, class H> cudaError_t make(Handles &set, T *obj, H *out) {
    std::lock_guard<std::mutex> g(st.mu);
    set.insert(obj);
    *out = reinterpret_cast<H>(obj);
    return cudaSuccess;
}

template <class T> cudaError_t destroy(Handles &set, const void *h, cudaError_t unknown) {
    std::lock_guard<std::mutex> g(st.mu);
    if (!h || !set.erase(h)) return fail(unknown);
    delete static_cast<const T *>(h);
    return cudaSuccess;
}

// NULL and the two special handles name default streams, which always exist.
bool live_stream(cudaStream_t s) {
    return !s || s == cudaStreamLegacy || s == cudaStreamPerThread || live(st.streams, s);
}

bool live_pool(cudaMemPool_t p) { return reinterpret_cast<Pool *>(p) == &st.default_pool || live(st.pools, p); }

// The start of every call that queues work on a stream or waits for one.
cudaError_t enqueue_check(cudaStream_t s) {
    if (cudaError_t e = broken()) return fail(e);
    return live_stream(s) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

// n bytes of 0xFF, 256-byte aligned, registered as a block of the kind. Exactly n bytes (not rounded up as
// a GPU's allocator does): under AddressSanitizer an access one byte past the end is then reported.
void *new_block(size_t n, Kind kind) {
    void *p = nullptr;
    if (posix_memalign(&p, kAlign, std::max<size_t>(n, 1)) != 0) return nullptr;
    memset(p, 0xFF, std::max<size_t>(n, 1));
    std::lock_guard<std::mutex> g(st.mu);
    st.blocks[reinterpret_cast<uintptr_t>(p)] = Block{n, kind};
    if (kind == kDevice) st.device_bytes += n;
    return p;
}

cudaError_t alloc_device(void **out, size_t n, cudaStream_t s) {
    if (!out) return fail(cudaErrorInvalidValue);
    if (cudaError_t e = enqueue_check(s)) return e;
    const long long limit = fail_malloc_after();
    {
        std::lock_guard<std::mutex> g(st.mu);
        if ((limit >= 0 && ++st.device_allocs > static_cast<unsigned long long>(limit)) ||
            n > kTotalMem - st.device_bytes)
            return fail(cudaErrorMemoryAllocation);
    }
    void *p = new_block(n, kDevice);
    return p ? put(out, p) : fail(cudaErrorMemoryAllocation);
}

// The live block of the kind that starts at p, or end(). Under mu.
std::map<uintptr_t, Block>::iterator block_at(const void *p, Kind kind) {
    auto it = st.blocks.find(reinterpret_cast<uintptr_t>(p));
    return it != st.blocks.end() && it->second.kind == kind ? it : st.blocks.end();
}

cudaError_t free_block(void *p, Kind kind) {
    if (!p) return cudaSuccess;
    std::lock_guard<std::mutex> g(st.mu);
    auto it = block_at(p, kind);
    if (it == st.blocks.end()) return fail(cudaErrorInvalidValue);
    if (kind == kDevice) st.device_bytes -= it->second.bytes;
    st.blocks.erase(it);
    free(p);
    return cudaSuccess;
}

// A copy as queued: the rows, and the copy of pageable source bytes it owns. memmove: overlapping ranges
// are undefined in CUDA, not a crash here.
struct CopyOp {
    void *dst;
    size_t dpitch;
    const void *src;
    size_t spitch, width, height;
    char *snapshot;
};

void copy_op(void *arg) {
    CopyOp *c = static_cast<CopyOp *>(arg);
    for (size_t r = 0; r < c->height; r++)
        memmove(static_cast<char *>(c->dst) + r * c->dpitch, static_cast<const char *>(c->src) + r * c->spitch,
                c->width);
    free(c->snapshot);
    delete c;
}

// Every copy; a 1-D one is one row.
cudaError_t copy(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                 cudaMemcpyKind kind, cudaStream_t s) {
    bool dst_pageable, src_pageable; // host memory the runtime does not know (not pinned)
    if (cudaError_t e = enqueue_check(s)) return e;
    if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return fail(cudaErrorInvalidMemcpyDirection);
    if (dpitch < width || spitch < width) return fail(cudaErrorInvalidPitchValue);
    if (!width || !height) return cudaSuccess;
    size_t dext, sext; // the bytes from dst and from src that the rows span
    if (!dst || !src || __builtin_mul_overflow(dpitch, height - 1, &dext) ||
        __builtin_add_overflow(dext, width, &dext) || __builtin_mul_overflow(spitch, height - 1, &sext) ||
        __builtin_add_overflow(sext, width, &sext))
        return fail(cudaErrorInvalidValue);
    {
        std::lock_guard<std::mutex> g(st.mu);
        bool dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice ||
                  (kind == cudaMemcpyDefault && is_device(dst));
        bool sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice ||
                  (kind == cudaMemcpyDefault && is_device(src));
        if ((dd && !device_range(dst, dext)) || (sd && !device_range(src, sext))) return fail(cudaErrorInvalidValue);
        dst_pageable = !dd && find_block(dst) == st.blocks.end();
        src_pageable = !sd && find_block(src) == st.blocks.end();
    }
    CopyOp *op = new CopyOp{dst, dpitch, src, spitch, width, height, nullptr};
    if (dst_pageable) {
        dsmoe_emu_drain(s); // the call returns once the copy is done: the stream's work before it first
        copy_op(op);
        return cudaSuccess;
    }
    if (src_pageable && dsmoe_emu_defers(s)) { // the bytes as they are now: the caller may reuse its buffer
        op->snapshot = static_cast<char *>(malloc(height * width));
        if (!op->snapshot) {
            delete op;
            return fail(cudaErrorMemoryAllocation);
        }
        for (size_t r = 0; r < height; r++)
            memcpy(op->snapshot + r * width, static_cast<const char *>(src) + r * spitch, width);
        op->src = op->snapshot, op->spitch = width;
    }
    dsmoe_emu_enqueue(s, copy_op, op);
    return cudaSuccess;
}

struct SetOp {
    void *p;
    int value;
    size_t n;
};

void set_op(void *arg) {
    SetOp *o = static_cast<SetOp *>(arg);
    memset(o->p, o->value, o->n);
    delete o;
}

cudaError_t set(void *p, int value, size_t n, cudaStream_t s) {
    if (cudaError_t e = enqueue_check(s)) return e;
    if (!n) return cudaSuccess;
    {
        std::lock_guard<std::mutex> g(st.mu);
        if (!device_range(p, n)) return fail(cudaErrorInvalidValue);
    }
    dsmoe_emu_enqueue(s, set_op, new SetOp{p, value, n});
    return cudaSuccess;
}

void free_op(void *p) { free_block(p, kDevice); }

} // namespace

// extern "C" again around the definitions: a parameter type that differs from the header's is then a
// compile error ("conflicting declaration") instead of a silent C++ overload that the plugin never calls.
extern "C" {

void dsmoe_emu_set_last_error(cudaError_t e) {
    if (e == cudaSuccess) return;
    int none = cudaSuccess;
    if (is_sticky(e)) sticky.compare_exchange_strong(none, e); // CUDA keeps reporting the first fault
    last_error = e;
}

// A sticky error is never reset: a broken context keeps reporting it, as CUDA's does.
cudaError_t cudaGetLastError(void) {
    cudaError_t e = last_error != cudaSuccess ? last_error : broken();
    last_error = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) { return last_error != cudaSuccess ? last_error : broken(); }

cudaError_t cudaGetDeviceCount(int *count) { return put(count, 1); }
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice); }
cudaError_t cudaGetDevice(int *device) { return put(device, 0); }
cudaError_t cudaDriverGetVersion(int *driverVersion) { return put(driverVersion, kVersion); }
cudaError_t cudaRuntimeGetVersion(int *runtimeVersion) { return put(runtimeVersion, kVersion); }

// unifiedAddressing and canMapHostMemory as well: both are true of the emulation.
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device) {
    if (!prop) return fail(cudaErrorInvalidValue);
    if (device != 0) return fail(cudaErrorInvalidDevice);
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "dsmoe CUDA emulator (host memory)");
    prop->totalGlobalMem = kTotalMem;
    prop->sharedMemPerBlock = kSmemDefault;
    prop->sharedMemPerBlockOptin = kSmemOptin;
    prop->multiProcessorCount = 4;
    prop->major = 9;
    prop->minor = 0;
    // Test hook: DSMOE_EMU_COMPUTE_CAPABILITY=MAJOR.MINOR plays an older (or newer) GPU, read at each call.
    if (const char *cc = getenv("DSMOE_EMU_COMPUTE_CAPABILITY")) {
        int major, minor;
        if (sscanf(cc, "%d.%d", &major, &minor) == 2 && major > 0 && minor >= 0) prop->major = major, prop->minor = minor;
    }
    prop->maxThreadsPerBlock = 1024;
    prop->warpSize = 32;
    prop->pciBusID = 1;
    prop->pciDomainID = prop->pciDeviceID = 0;
    prop->memoryPoolsSupported = prop->cooperativeLaunch = prop->unifiedAddressing = prop->canMapHostMemory = 1;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device) {
    if (device != 0) return fail(cudaErrorInvalidDevice);
    switch (attr) { // those of cudaGetDeviceProperties, and H100 values beyond them
    case cudaDevAttrMultiProcessorCount: return put(value, 4);
    case cudaDevAttrComputeCapabilityMajor: return put(value, 9);
    case cudaDevAttrMaxThreadsPerBlock: case cudaDevAttrMaxBlockDimX: case cudaDevAttrMaxBlockDimY:
        return put(value, 1024);
    case cudaDevAttrMaxBlockDimZ: return put(value, 64);
    case cudaDevAttrMaxGridDimX: return put(value, 0x7fffffff);
    case cudaDevAttrMaxGridDimY: case cudaDevAttrMaxGridDimZ: return put(value, 65535);
    case cudaDevAttrWarpSize: return put(value, 32);
    case cudaDevAttrMaxSharedMemoryPerBlock: return put(value, kSmemDefault);
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: return put(value, kSmemOptin);
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: return put(value, 233472);
    case cudaDevAttrMaxThreadsPerMultiProcessor: return put(value, 2048);
    case cudaDevAttrMaxBlocksPerMultiprocessor: return put(value, 32);
    case cudaDevAttrMaxRegistersPerBlock: return put(value, 65536);
    case cudaDevAttrCooperativeLaunch: case cudaDevAttrMemoryPoolsSupported: case cudaDevAttrUnifiedAddressing:
    case cudaDevAttrCanMapHostMemory: case cudaDevAttrConcurrentKernels: case cudaDevAttrPciBusId: return put(value, 1);
    case cudaDevAttrComputeCapabilityMinor: case cudaDevAttrPciDomainId: case cudaDevAttrPciDeviceId:
    case cudaDevAttrIntegrated: return put(value, 0);
    default: return fail(cudaErrorInvalidValue);
    }
}

cudaError_t cudaDeviceGetPCIBusId(char *pciBusId, int len, int device) {
    if (!pciBusId || len <= 0) return fail(cudaErrorInvalidValue);
    if (device != 0) return fail(cudaErrorInvalidDevice);
    snprintf(pciBusId, static_cast<size_t>(len), "0000:01:00.0");
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free, size_t *total) {
    if (!free || !total) return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> g(st.mu);
    *total = kTotalMem;
    *free = kTotalMem - st.device_bytes;
    return cudaSuccess;
}

// cudaMalloc(0) gives NULL, as CUDA's does; the pools give a unique pointer instead.
cudaError_t cudaMalloc(void **devPtr, size_t size) {
    if (!size && !broken()) return put(devPtr, static_cast<void *>(nullptr));
    return alloc_device(devPtr, size, nullptr);
}

cudaError_t cudaMallocAsync(void **devPtr, size_t size, cudaStream_t hStream) {
    return alloc_device(devPtr, size, hStream);
}

cudaError_t cudaMallocFromPoolAsync(void **ptr, size_t size, cudaMemPool_t memPool, cudaStream_t stream) {
    return live_pool(memPool) ? alloc_device(ptr, size, stream) : fail(cudaErrorInvalidValue);
}

// cudaFree waits for the device's work, as CUDA's does; cudaFreeAsync frees when its stream gets there.
cudaError_t cudaFree(void *devPtr) {
    if (devPtr) dsmoe_emu_drain_all();
    return free_block(devPtr, kDevice);
}

cudaError_t cudaFreeAsync(void *devPtr, cudaStream_t hStream) {
    if (!live_stream(hStream)) return fail(cudaErrorInvalidResourceHandle);
    if (!devPtr) return cudaSuccess;
    {
        std::lock_guard<std::mutex> g(st.mu);
        if (block_at(devPtr, kDevice) == st.blocks.end()) return fail(cudaErrorInvalidValue);
    }
    dsmoe_emu_enqueue(hStream, free_op, devPtr);
    return cudaSuccess;
}

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t *memPool, int device) {
    if (device != 0) return fail(cudaErrorInvalidDevice);
    return put(memPool, reinterpret_cast<cudaMemPool_t>(&st.default_pool));
}

cudaError_t cudaMemPoolCreate(cudaMemPool_t *memPool, const struct cudaMemPoolProps *poolProps) {
    if (!memPool || !poolProps || poolProps->allocType != cudaMemAllocationTypePinned ||
        poolProps->location.type != cudaMemLocationTypeDevice)
        return fail(cudaErrorInvalidValue);
    if (poolProps->location.id != 0) return fail(cudaErrorInvalidDevice);
    return make(st.pools, new Pool{false}, memPool);
}

// What was allocated from the pool stays valid: CUDA, too, releases a pool only once its blocks are freed.
cudaError_t cudaMemPoolDestroy(cudaMemPool_t memPool) {
    return destroy<Pool>(st.pools, memPool, cudaErrorInvalidValue);
}

// Accepted and without effect: a pool here keeps no memory between allocations.
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t memPool, enum cudaMemPoolAttr attr, void *value) {
    if (!value || !live_pool(memPool)) return fail(cudaErrorInvalidValue);
    switch (attr) {
    case cudaMemPoolReuseFollowEventDependencies: case cudaMemPoolReuseAllowOpportunistic:
    case cudaMemPoolReuseAllowInternalDependencies: case cudaMemPoolAttrReleaseThreshold: return cudaSuccess;
    case cudaMemPoolAttrReservedMemHigh: case cudaMemPoolAttrUsedMemHigh: // may only be reset
        return *static_cast<const uint64_t *>(value) == 0 ? cudaSuccess : fail(cudaErrorInvalidValue);
    default: return fail(cudaErrorInvalidValue);
    }
}

cudaError_t cudaMemPoolTrimTo(cudaMemPool_t memPool, size_t) {
    return live_pool(memPool) ? cudaSuccess : fail(cudaErrorInvalidValue);
}

cudaError_t cudaHostAlloc(void **pHost, size_t size, unsigned int flags) {
    if (!pHost || (flags & ~unsigned(cudaHostAllocPortable | cudaHostAllocMapped | cudaHostAllocWriteCombined)))
        return fail(cudaErrorInvalidValue);
    if (cudaError_t e = broken()) return fail(e);
    if (!size) return put(pHost, static_cast<void *>(nullptr));
    void *p = size <= SIZE_MAX - kAlign ? new_block(size, kHostAlloc) : nullptr;
    return p ? put(pHost, p) : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFreeHost(void *ptr) { // waits for the device's work, as CUDA's does
    if (ptr) dsmoe_emu_drain_all();
    return free_block(ptr, kHostAlloc);
}

cudaError_t cudaHostRegister(void *ptr, size_t size, unsigned int flags) {
    const unsigned known =
        cudaHostRegisterPortable | cudaHostRegisterMapped | cudaHostRegisterIoMemory | cudaHostRegisterReadOnly;
    uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
    if (!ptr || !size || (flags & ~known) || size > UINTPTR_MAX - a) return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> g(st.mu);
    // The block before a overlaps if it reaches past a; else the first one after a, if it starts in range.
    auto it = st.blocks.upper_bound(a);
    if (it != st.blocks.begin() && std::prev(it)->first + std::max<size_t>(std::prev(it)->second.bytes, 1) > a) --it;
    if (it != st.blocks.end() && it->first < a + size)
        return fail(it->second.kind == kDevice ? cudaErrorInvalidValue : cudaErrorHostMemoryAlreadyRegistered);
    st.blocks[a] = Block{size, kRegistered};
    return cudaSuccess;
}

cudaError_t cudaHostUnregister(void *ptr) {
    dsmoe_emu_drain_all(); // queued copies may still use it as pinned memory
    std::lock_guard<std::mutex> g(st.mu);
    auto it = st.blocks.find(reinterpret_cast<uintptr_t>(ptr));
    if (!ptr || it == st.blocks.end() || it->second.kind != kRegistered) return fail(cudaErrorHostMemoryNotRegistered);
    st.blocks.erase(it);
    return cudaSuccess;
}

cudaError_t cudaHostGetDevicePointer(void **pDevice, void *pHost, unsigned int flags) {
    if (flags != 0) return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> g(st.mu);
    auto it = find_block(pHost);
    return it == st.blocks.end() || it->second.kind == kDevice ? fail(cudaErrorInvalidValue) : put(pDevice, pHost);
}

// device -2 for memory CUDA does not know is what CUDA 11 and later report.
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *attributes, const void *ptr) {
    if (!attributes) return fail(cudaErrorInvalidValue);
    memset(attributes, 0, sizeof *attributes);
    void *p = const_cast<void *>(ptr);
    std::lock_guard<std::mutex> g(st.mu);
    auto it = find_block(ptr);
    bool known = it != st.blocks.end(), dev = known && it->second.kind == kDevice;
    attributes->type = !known ? cudaMemoryTypeUnregistered : dev ? cudaMemoryTypeDevice : cudaMemoryTypeHost;
    attributes->device = known ? 0 : -2;
    attributes->devicePointer = known ? p : nullptr;
    attributes->hostPointer = dev ? nullptr : p;
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind, cudaStream_t stream) {
    return copy(dst, count, src, count, count, 1, kind, stream);
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind) {
    return copy(dst, count, src, count, count, 1, kind, nullptr);
}

cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                              enum cudaMemcpyKind kind, cudaStream_t stream) {
    return copy(dst, dpitch, src, spitch, width, height, kind, stream);
}

cudaError_t cudaMemsetAsync(void *devPtr, int value, size_t count, cudaStream_t stream) {
    return set(devPtr, value, count, stream);
}

cudaError_t cudaMemset(void *devPtr, int value, size_t count) { return set(devPtr, value, count, nullptr); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *pStream, unsigned int flags) {
    if (!pStream || (flags & ~unsigned(cudaStreamNonBlocking))) return fail(cudaErrorInvalidValue);
    cudaError_t e = make(st.streams, new Stream{flags}, pStream);
    if (e == cudaSuccess) dsmoe_emu_stream_created(*pStream, !(flags & cudaStreamNonBlocking));
    return e;
}

cudaError_t cudaStreamCreate(cudaStream_t *pStream) { return cudaStreamCreateWithFlags(pStream, cudaStreamDefault); }

// As CUDA: the stream's queued work still completes.
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    if (!live(st.streams, stream)) return fail(cudaErrorInvalidResourceHandle);
    dsmoe_emu_stream_destroyed(stream);
    return destroy<Stream>(st.streams, stream, cudaErrorInvalidResourceHandle);
}

// Synchronisations run the queued work they wait for; a query that finds work queued runs it and says
// cudaErrorNotReady, so that a caller's not-ready path runs too (the next query finds it done).
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    if (cudaError_t e = enqueue_check(stream)) return e;
    dsmoe_emu_drain(stream);
    return enqueue_check(stream);
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
    if (cudaError_t e = enqueue_check(stream)) return e;
    int pending = dsmoe_emu_drain(stream);
    if (cudaError_t e = enqueue_check(stream)) return e;
    return pending ? cudaErrorNotReady : cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
    dsmoe_emu_drain_all();
    return enqueue_check(nullptr);
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
    if (cudaError_t e = enqueue_check(stream)) return e;
    if (flags & ~unsigned(cudaEventWaitExternal)) return fail(cudaErrorInvalidValue);
    if (!live(st.events, event)) return fail(cudaErrorInvalidResourceHandle);
    dsmoe_emu_stream_wait_event(stream, event);
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags) {
    const unsigned known = cudaEventBlockingSync | cudaEventDisableTiming | cudaEventInterprocess;
    if (!event || (flags & ~known) || ((flags & cudaEventInterprocess) && !(flags & cudaEventDisableTiming)))
        return fail(cudaErrorInvalidValue);
    return make(st.events, new Event{flags, false}, event);
}

cudaError_t cudaEventCreate(cudaEvent_t *event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    if (cudaError_t e = enqueue_check(stream)) return e;
    {
        std::lock_guard<std::mutex> g(st.mu);
        if (!event || !st.events.count(event)) return fail(cudaErrorInvalidResourceHandle);
        reinterpret_cast<Event *>(event)->recorded = true;
    }
    dsmoe_emu_event_record(event, stream);
    return cudaSuccess;
}

// Complete once the work queued before its record has run; one never recorded counts as complete in CUDA
// too. A query of an incomplete event runs that work and says cudaErrorNotReady (the next says done).
cudaError_t cudaEventQuery(cudaEvent_t event) {
    if (!live(st.events, event)) return fail(cudaErrorInvalidResourceHandle);
    int complete = dsmoe_emu_event_complete(event, 1);
    if (cudaError_t e = enqueue_check(nullptr)) return e;
    return complete ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    if (!live(st.events, event)) return fail(cudaErrorInvalidResourceHandle);
    dsmoe_emu_event_complete(event, 1);
    return enqueue_check(nullptr);
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
    if (!live(st.events, event)) return fail(cudaErrorInvalidResourceHandle);
    dsmoe_emu_event_destroyed(event);
    return destroy<Event>(st.events, event, cudaErrorInvalidResourceHandle);
}

// No time passes on this device: 0 ms, after CUDA's refusals (a timing-disabled or unrecorded event).
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    {
        std::lock_guard<std::mutex> g(st.mu);
        if (!start || !end || !st.events.count(start) || !st.events.count(end))
            return fail(cudaErrorInvalidResourceHandle);
        const Event *a = reinterpret_cast<const Event *>(start), *b = reinterpret_cast<const Event *>(end);
        if (((a->flags | b->flags) & cudaEventDisableTiming) || !a->recorded || !b->recorded)
            return fail(cudaErrorInvalidResourceHandle);
    }
    if (!dsmoe_emu_event_complete(start, 0) || !dsmoe_emu_event_complete(end, 0)) return cudaErrorNotReady;
    return put(ms, 0.0f);
}

cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t fn, void *userData) {
    if (!fn) return fail(cudaErrorInvalidValue);
    if (cudaError_t e = enqueue_check(stream)) return e;
    dsmoe_emu_enqueue(stream, fn, userData);
    return cudaSuccess;
}

// Without a registry of kernels a function cannot be checked beyond NULL; the limits are the device's.
// A kernel's dynamic shared memory limit is kept for dsmoe_emu_dynamic_shared_limit.
cudaError_t cudaFuncSetAttribute(const void *func, enum cudaFuncAttribute attr, int value) {
    if (!func) return fail(cudaErrorInvalidDeviceFunction);
    if ((attr == cudaFuncAttributeMaxDynamicSharedMemorySize && (value < 0 || value > kSmemOptin)) ||
        (attr == cudaFuncAttributePreferredSharedMemoryCarveout && (value < -1 || value > 100)))
        return fail(cudaErrorInvalidValue);
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        std::lock_guard<std::mutex> lock(st.mu);
        st.dynamic_shared_limit[func] = value;
    }
    return cudaSuccess;
}

size_t dsmoe_emu_dynamic_shared_limit(const void *func) {
    std::lock_guard<std::mutex> lock(st.mu);
    auto it = st.dynamic_shared_limit.find(func);
    return it == st.dynamic_shared_limit.end() ? kSmemDefault : static_cast<size_t>(it->second);
}

// 2 blocks per multiprocessor for a block that fits: a cooperative grid then has 8 blocks, so that a
// grid-wide sync is exercised across blocks. The flags variant is what cuda_runtime.h's template overload
// calls, which a kernel passed by its own type (gating_fused.cu) resolves to.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int *numBlocks, const void *func, int blockSize,
                                                                   size_t dynamicSMemSize, unsigned int flags) {
    if (blockSize <= 0 || (flags & ~unsigned(cudaOccupancyDisableCachingOverride))) return fail(cudaErrorInvalidValue);
    if (!func) return fail(cudaErrorInvalidDeviceFunction);
    return put(numBlocks, blockSize <= 1024 && dynamicSMemSize <= static_cast<size_t>(kSmemOptin) ? 2 : 0);
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *numBlocks, const void *func, int blockSize,
                                                          size_t dynamicSMemSize) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(numBlocks, func, blockSize, dynamicSMemSize, 0);
}

cudaError_t cudaLaunchKernel(const void *, dim3, dim3, void **, size_t, cudaStream_t) {
    return fail(cudaErrorNotSupported);
}

cudaError_t cudaLaunchCooperativeKernel(const void *, dim3, dim3, void **, size_t, cudaStream_t) {
    return fail(cudaErrorNotSupported);
}

} // extern "C"
