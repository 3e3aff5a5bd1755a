// plugins/cuda/cuda_memory.c: memory of the cuda plugin: alloc() from a stream-ordered pool of its own,
// host_alloc() as pinned host memory, and the copy members (cudaMemcpyAsync and friends on the queue's
// stream).
// defines: cu_memory_init, cu_memory_release, cu_alloc, cu_free, cu_host_alloc, cu_host_free,
//          cu_copy_to_device, cu_copy_to_host, cu_copy, cu_copy_2d, cu_zero
//
// Ordering (include/dsmoe/kernel_plugin.h, "memory"): alloc() is a host call, not queued, and its buffer
// is usable by any queue at once. It allocates on the default queue's stream and waits for that stream,
// so the allocation (and the zeroing of DSMOE_ALLOC_ZERO) is complete before any later work anywhere;
// the core allocates at set-up, so the wait costs nothing in a step. free() must wait for the work queued
// before it on EVERY queue: the default stream waits for the current end of each other queue (an
// event), then frees in its own order, and the pool hands the block out again only to work ordered
// after that. The pool never returns memory to the driver (release threshold UINT64_MAX), and neither
// does the device's default pool, where the launchers' scratch (cudaMallocAsync) comes from: a step
// reuses the memory of the last one instead of asking the driver each time. Only an allocation that finds
// the device full makes both pools give back what no allocation holds, and tries once more
// (dsmoe_cu_trim_pools: what one pool keeps would otherwise be missing to the other).
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

// alloc(0) still gets a unique pointer: a block of the pool's smallest alignment.
#define CU_MIN_BLOCK 256

// ---------------------------------------------------------------------------------------------------
// The table of live buffers: open addressing on the pointer, linear probing, deletion by backward shift.

static size_t block_hash(const void *p, size_t cap) {
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return (size_t)x & (cap - 1);
}

static cu_block *block_find(cu_blocks *t, const void *p) {
    if (!t->cap)
        return NULL;
    for (size_t i = block_hash(p, t->cap);; i = (i + 1) & (t->cap - 1)) {
        if (t->slot[i].p == p)
            return &t->slot[i];
        if (!t->slot[i].p)
            return NULL;
    }
}

static void block_put(cu_blocks *t, void *p, size_t bytes, int host) {
    size_t i = block_hash(p, t->cap);
    while (t->slot[i].p)
        i = (i + 1) & (t->cap - 1);
    t->slot[i] = (cu_block){p, bytes, host};
    t->n++;
    if (!host)
        t->device_bytes += bytes;
}

// Room for one more entry at a load of at most 1/2, so that block_put after a successful allocation
// cannot fail. Returns 0, or -1 when the host is out of memory.
static int block_reserve(cu_blocks *t) {
    if (2 * (t->n + 1) <= t->cap)
        return 0;
    size_t cap = t->cap ? 2 * t->cap : 64;
    cu_block *old = t->slot;
    size_t old_cap = t->cap;
    cu_block *slot = calloc(cap, sizeof *slot);
    if (!slot)
        return -1;
    t->slot = slot;
    t->cap = cap;
    t->n = 0;
    t->device_bytes = 0;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].p)
            block_put(t, old[i].p, old[i].bytes, old[i].host);
    free(old);
    return 0;
}

static void block_remove(cu_blocks *t, cu_block *b) {
    size_t mask = t->cap - 1, hole = (size_t)(b - t->slot);
    t->n--;
    if (!b->host)
        t->device_bytes -= b->bytes;
    b->p = NULL;
    // Entries after the hole whose home slot is not in (hole, j] would become unreachable: move them up.
    for (size_t j = (hole + 1) & mask; t->slot[j].p; j = (j + 1) & mask) {
        size_t home = block_hash(t->slot[j].p, t->cap);
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (stays)
            continue;
        t->slot[hole] = t->slot[j];
        t->slot[j].p = NULL;
        hole = j;
    }
}

// ---------------------------------------------------------------------------------------------------
// The pool

dsmoe_status cu_memory_init(dsmoe_kernel_ctx *ctx) {
    const char *op = "init";
    int supported = 0;
    CU_TRY(cu_cuda(ctx, cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, ctx->device), op,
                   "cudaDeviceGetAttribute(cudaDevAttrMemoryPoolsSupported)"));
    if (!supported)
        return cu_fail(ctx, DSMOE_ERR_UNSUPPORTED, "cuda: init: device %d (%s) does not support stream-ordered "
                       "memory pools (cudaMallocAsync), which this plugin needs", ctx->device, ctx->device_name);
    struct cudaMemPoolProps props;
    memset(&props, 0, sizeof props);
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = ctx->device;
    CU_TRY(cu_cuda(ctx, cudaMemPoolCreate(&ctx->pool, &props), op, "cudaMemPoolCreate"));
    uint64_t keep = UINT64_MAX;
    CU_TRY(cu_cuda(ctx, cudaMemPoolSetAttribute(ctx->pool, cudaMemPoolAttrReleaseThreshold, &keep), op,
                   "cudaMemPoolSetAttribute(cudaMemPoolAttrReleaseThreshold)"));
    cudaMemPool_t scratch;
    CU_TRY(cu_cuda(ctx, cudaDeviceGetDefaultMemPool(&scratch, ctx->device), op, "cudaDeviceGetDefaultMemPool"));
    CU_TRY(cu_cuda(ctx, cudaMemPoolSetAttribute(scratch, cudaMemPoolAttrReleaseThreshold, &keep), op,
                   "cudaMemPoolSetAttribute(default pool, cudaMemPoolAttrReleaseThreshold)"));
    return DSMOE_OK;
}

// After cu_wait_all: every queue is idle, so the buffers the caller left go at once.
void cu_memory_release(dsmoe_kernel_ctx *ctx) {
    cu_blocks *t = &ctx->blocks;
    for (size_t i = 0; i < t->cap; i++) {
        if (!t->slot[i].p)
            continue;
        if (t->slot[i].host)
            (void)cudaFreeHost(t->slot[i].p);
        else if (ctx->queue.stream)
            (void)cudaFreeAsync(t->slot[i].p, ctx->queue.stream);
    }
    if (ctx->queue.stream)
        (void)cudaStreamSynchronize(ctx->queue.stream);
    free(t->slot);
    memset(t, 0, sizeof *t);
    for (int i = 0; i < CU_STAGE_SLOTS; i++) { // after cu_wait_all: no copy reads them any more
        cu_stage *st = &ctx->stage[i];
        if (st->p)
            (void)cudaFreeHost(st->p);
        if (st->done)
            (void)cudaEventDestroy(st->done);
        memset(st, 0, sizeof *st);
    }
    if (ctx->pool)
        (void)cudaMemPoolDestroy(ctx->pool);
    ctx->pool = NULL;
    (void)cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// alloc, free, host_alloc, host_free

// Human-readable bytes for messages: "512 MiB", "1.50 GiB".
static const char *fmt_bytes(size_t b, char *buf, size_t len) {
    if (b >= ((size_t)1 << 30))
        snprintf(buf, len, "%.2f GiB", (double)b / (double)((size_t)1 << 30));
    else if (b >= ((size_t)1 << 20))
        snprintf(buf, len, "%.2f MiB", (double)b / (double)((size_t)1 << 20));
    else
        snprintf(buf, len, "%zu byte%s", b, b == 1 ? "" : "s");
    return buf;
}

dsmoe_status cu_alloc(dsmoe_kernel_ctx *ctx, size_t bytes, uint32_t flags, void **ptr) {
    if (!ctx)
        return DSMOE_ERR_INVALID;
    CU_REQUIRE(ctx, ptr, "cuda: alloc: NULL ptr");
    *ptr = NULL;
    CU_TRY(cu_enter(ctx, "alloc"));
    CU_REQUIRE(ctx, (flags & ~(uint32_t)DSMOE_ALLOC_ZERO) == 0, "cuda: alloc: unknown flags 0x%x", flags);
    size_t n = bytes ? bytes : CU_MIN_BLOCK;
    cu_blocks *t = &ctx->blocks;
    if (ctx->pool_limit && (n > ctx->pool_limit || t->device_bytes > ctx->pool_limit - n)) {
        char a[32], b[32], c[32];
        return cu_fail(ctx, DSMOE_ERR_NOMEM, "cuda: alloc: %s more would bring this context's buffers to more than "
                       "pool_limit_bytes=%zu (%s); %s are allocated now", fmt_bytes(n, a, sizeof a),
                       ctx->pool_limit, fmt_bytes(ctx->pool_limit, b, sizeof b),
                       fmt_bytes(t->device_bytes, c, sizeof c));
    }
    if (block_reserve(t))
        return cu_fail(ctx, DSMOE_ERR_NOMEM, "cuda: alloc: out of host memory for the buffer table");
    cudaStream_t s = ctx->queue.stream;
    void *p = NULL;
    cudaError_t e = cudaMallocFromPoolAsync(&p, n, ctx->pool, s);
    if (e == cudaErrorMemoryAllocation) { // the frees queued so far complete, the pools give back, once more
        (void)cudaGetLastError();
        (void)cudaStreamSynchronize(s);
        dsmoe_cu_trim_pools(ctx->device, ctx->pool);
        e = cudaMallocFromPoolAsync(&p, n, ctx->pool, s);
    }
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        char a[32], b[32];
        return cu_fail(ctx, DSMOE_ERR_NOMEM, "cuda: alloc: device %d has no room for %s more (this context's "
                       "buffers hold %s): %s", ctx->device, fmt_bytes(n, a, sizeof a),
                       fmt_bytes(t->device_bytes, b, sizeof b), cudaGetErrorString(e));
    }
    CU_TRY(cu_cuda(ctx, e, "alloc", "cudaMallocFromPoolAsync"));
    block_put(t, p, n, 0); // from here on, finalize frees it whatever happens below
    if (flags & DSMOE_ALLOC_ZERO)
        CU_TRY(cu_cuda(ctx, cudaMemsetAsync(p, 0, n, s), "alloc", "cudaMemsetAsync"));
    CU_TRY(cu_cuda(ctx, cudaStreamSynchronize(s), "alloc", "cudaStreamSynchronize"));
    *ptr = p;
    return DSMOE_OK;
}

void cu_free(dsmoe_kernel_ctx *ctx, void *ptr) {
    if (!ctx || !ptr)
        return;
    if (cu_cuda(ctx, cudaSetDevice(ctx->device), "free", "cudaSetDevice") != DSMOE_OK)
        return;
    cu_block *b = block_find(&ctx->blocks, ptr);
    if (!b || b->host) {
        cu_sticky(ctx, DSMOE_ERR_INVALID, "cuda: free: %p is not a live buffer of this context's alloc() (%s)", ptr,
                  b ? "it is host_alloc memory: host_free frees it" : "freed already, or never allocated here");
        return;
    }
    cudaStream_t s = ctx->queue.stream;
    for (dsmoe_kernel_queue *q = ctx->queues; q; q = q->next) {
        // Without the wait the block could be handed out again while q still uses it: keep it instead.
        if (cu_cuda(ctx, cudaEventRecord(q->tail, q->stream), "free", "cudaEventRecord") != DSMOE_OK ||
            cu_cuda(ctx, cudaStreamWaitEvent(s, q->tail, 0), "free", "cudaStreamWaitEvent") != DSMOE_OK)
            return;
    }
    if (cu_cuda(ctx, cudaFreeAsync(ptr, s), "free", "cudaFreeAsync") == DSMOE_OK)
        block_remove(&ctx->blocks, b);
}

dsmoe_status cu_host_alloc(dsmoe_kernel_ctx *ctx, size_t bytes, void **ptr) {
    if (!ctx)
        return DSMOE_ERR_INVALID;
    CU_REQUIRE(ctx, ptr, "cuda: host_alloc: NULL ptr");
    *ptr = NULL;
    CU_TRY(cu_enter(ctx, "host_alloc"));
    if (block_reserve(&ctx->blocks))
        return cu_fail(ctx, DSMOE_ERR_NOMEM, "cuda: host_alloc: out of host memory for the buffer table");
    size_t n = bytes ? bytes : 64;
    void *p = NULL;
    // Portable: pinned for every CUDA context of the process, not only this device's.
    cudaError_t e = cudaHostAlloc(&p, n, cudaHostAllocPortable);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        char a[32];
        return cu_fail(ctx, e == cudaErrorMemoryAllocation ? DSMOE_ERR_NOMEM : DSMOE_ERR_SYSTEM,
                       "cuda: host_alloc: cannot pin %s of host memory: %s", fmt_bytes(n, a, sizeof a),
                       cudaGetErrorString(e));
    }
    block_put(&ctx->blocks, p, n, 1);
    *ptr = p;
    return DSMOE_OK;
}

// "After queued work": a copy may still read or write the block, so every queue is drained first (a
// host call the core makes at teardown).
void cu_host_free(dsmoe_kernel_ctx *ctx, void *ptr) {
    if (!ctx || !ptr)
        return;
    if (cu_cuda(ctx, cudaSetDevice(ctx->device), "host_free", "cudaSetDevice") != DSMOE_OK)
        return;
    cu_block *b = block_find(&ctx->blocks, ptr);
    if (!b || !b->host) {
        cu_sticky(ctx, DSMOE_ERR_INVALID, "cuda: host_free: %p is not a live buffer of this context's host_alloc() "
                  "(%s)", ptr, b ? "it is alloc() memory: free frees it" : "freed already, or never allocated here");
        return;
    }
    (void)cu_wait_all(ctx, "host_free");
    if (cu_cuda(ctx, cudaFreeHost(ptr), "host_free", "cudaFreeHost") == DSMOE_OK)
        block_remove(&ctx->blocks, b);
}

// ---------------------------------------------------------------------------------------------------
// Copies. Kinds are explicit (the buffers' memory is known from the member).
//
// copy_to_device from ordinary (pageable) host memory: CUDA copies from pageable memory only after the
// stream has caught up ("API synchronization behavior": a stream sync precedes the copy), which would
// make every such copy (token ids each micro-step, the sampled tokens each decode step) wait for the GPU.
// Copies up to CU_STAGE_MAX bytes are instead copied into the next of CU_STAGE_SLOTS pinned slots and
// sent from there (a true DMA, ordered on the stream): the source has been read when the call returns,
// as the contract wants, and the host waits only when the slot's previous copy, CU_STAGE_SLOTS copies
// back, has not run yet. Larger copies (a checkpoint's tensors at load) take the driver's path.
// Memory pinned already (host_alloc, cudaHostRegister) is sent as it is: its copy reads it when the
// stream reaches the copy. copy_to_host into pageable memory returns after the copy; into pinned memory
// it is asynchronous, valid after an event.

static dsmoe_status copy_begin(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const char *op, const void *dst,
                               const void *src, size_t bytes) {
    CU_TRY(cu_begin(ctx, q, op));
    CU_REQUIRE(ctx, bytes == 0 || (dst && src), "cuda: %s: NULL %s with bytes=%zu", op,
               dst ? "source" : "destination", bytes);
    return DSMOE_OK;
}

// Whether host memory at p is ordinary pageable memory (not pinned or registered with CUDA).
static int is_pageable(const void *p) {
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError(); // an address CUDA does not know: pageable
        return 1;
    }
    return a.type == cudaMemoryTypeUnregistered;
}

// The copy of `bytes` from pageable src through the next staging slot (see above).
static dsmoe_status copy_staged(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes) {
    cu_stage *st = &ctx->stage[ctx->stage_next];
    ctx->stage_next = (ctx->stage_next + 1) % CU_STAGE_SLOTS;
    if (st->done)
        CU_TRY(cu_cuda(ctx, cudaEventSynchronize(st->done), "copy_to_device", "cudaEventSynchronize (staging slot)"));
    else
        CU_TRY(cu_cuda(ctx, cudaEventCreateWithFlags(&st->done, cudaEventDisableTiming), "copy_to_device",
                       "cudaEventCreateWithFlags (staging slot)"));
    if (st->cap < bytes) {
        size_t cap = st->cap ? st->cap : 4096;
        while (cap < bytes)
            cap *= 2;
        if (cap > CU_STAGE_MAX)
            cap = CU_STAGE_MAX;
        if (st->p)
            CU_TRY(cu_cuda(ctx, cudaFreeHost(st->p), "copy_to_device", "cudaFreeHost (staging slot)"));
        st->p = NULL, st->cap = 0;
        cudaError_t e = cudaHostAlloc(&st->p, cap, cudaHostAllocPortable);
        if (e != cudaSuccess) { // no pinned memory left: the driver's path still works
            (void)cudaGetLastError();
            st->p = NULL;
            return cu_cuda(ctx, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, q->stream),
                           "copy_to_device", "cudaMemcpyAsync");
        }
        st->cap = cap;
    }
    memcpy(st->p, src, bytes);
    CU_TRY(cu_cuda(ctx, cudaMemcpyAsync(dst, st->p, bytes, cudaMemcpyHostToDevice, q->stream), "copy_to_device",
                   "cudaMemcpyAsync (from a staging slot)"));
    return cu_cuda(ctx, cudaEventRecord(st->done, q->stream), "copy_to_device", "cudaEventRecord (staging slot)");
}

dsmoe_status cu_copy_to_device(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes) {
    CU_TRY(copy_begin(ctx, q, "copy_to_device", dst, src, bytes));
    if (bytes == 0)
        return DSMOE_OK;
    if (bytes <= CU_STAGE_MAX && is_pageable(src))
        return copy_staged(ctx, q, dst, src, bytes);
    return cu_cuda(ctx, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, q->stream), "copy_to_device",
                   "cudaMemcpyAsync");
}

dsmoe_status cu_copy_to_host(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes) {
    CU_TRY(copy_begin(ctx, q, "copy_to_host", dst, src, bytes));
    if (bytes == 0)
        return DSMOE_OK;
    return cu_cuda(ctx, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, q->stream), "copy_to_host",
                   "cudaMemcpyAsync");
}

dsmoe_status cu_copy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes) {
    CU_TRY(copy_begin(ctx, q, "copy", dst, src, bytes));
    if (bytes == 0)
        return DSMOE_OK;
    return cu_cuda(ctx, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, q->stream), "copy",
                   "cudaMemcpyAsync");
}

dsmoe_status cu_copy_2d(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t dpitch, const void *src,
                        size_t spitch, size_t width, size_t rows) {
    CU_TRY(cu_begin(ctx, q, "copy_2d"));
    CU_REQUIRE(ctx, dpitch >= width && spitch >= width, "cuda: copy_2d: dpitch=%zu spitch=%zu: expected >= width=%zu",
               dpitch, spitch, width);
    if (width == 0 || rows == 0)
        return DSMOE_OK;
    CU_REQUIRE(ctx, dst && src, "cuda: copy_2d: NULL %s with %zu rows of %zu bytes", dst ? "source" : "destination",
               rows, width);
    return cu_cuda(ctx, cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyDeviceToDevice, q->stream),
                   "copy_2d", "cudaMemcpy2DAsync");
}

dsmoe_status cu_zero(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t bytes) {
    CU_TRY(cu_begin(ctx, q, "zero"));
    if (bytes == 0)
        return DSMOE_OK;
    CU_REQUIRE(ctx, dst, "cuda: zero: NULL buffer with bytes=%zu", bytes);
    return cu_cuda(ctx, cudaMemsetAsync(dst, 0, bytes, q->stream), "zero", "cudaMemsetAsync");
}
