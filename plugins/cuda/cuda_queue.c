// plugins/cuda/cuda_queue.c: the error rules of the cuda plugin, its queues (one non-blocking CUDA stream
// each) and events (cudaEvent_t without timing), and every synchronisation, which is where errors found
// while running become sticky.
// defines: cu_cuda, cu_blas, cu_enter, cu_begin, cu_queue_init, cu_queue_release, cu_bind_blas,
//          cu_after_wait, cu_wait_all, and the queue and event members (cu_default_queue ... cu_event_query)
//
// How a running error reaches the caller (include/dsmoe/kernel_plugin.h, "Errors"): a kernel that finds
// bad data records it in the context's fault record (mapped pinned host memory, kernels/cuda_env.h) and
// goes on; a device fault makes the CUDA context fail. Both are looked at only after a synchronisation
// (queue_synchronize, synchronize, event_synchronize, event_query answering done), and the first one
// becomes the sticky error: every later call returns it, last_error() keeps its message.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_internal.h"

// ---------------------------------------------------------------------------------------------------
// Errors

dsmoe_status cu_cuda(dsmoe_kernel_ctx *ctx, cudaError_t e, const char *op, const char *call) {
    if (e == cudaSuccess)
        return DSMOE_OK;
    (void)cudaGetLastError(); // a non-sticky error stays in this slot; the next launcher's check must not see it
    switch (e) {
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidPitchValue:
    case cudaErrorInvalidMemcpyDirection:
        return cu_fail(ctx, DSMOE_ERR_INVALID, "cuda: %s: %s: %s (%s)", op, call, cudaGetErrorString(e),
                       cudaGetErrorName(e));
    case cudaErrorMemoryAllocation:
        return cu_fail(ctx, DSMOE_ERR_NOMEM, "cuda: %s: %s: %s (%s)", op, call, cudaGetErrorString(e),
                       cudaGetErrorName(e));
    default:
        return cu_sticky(ctx, DSMOE_ERR_SYSTEM, "cuda: %s: %s: %s (%s)", op, call, cudaGetErrorString(e),
                         cudaGetErrorName(e));
    }
}

dsmoe_status cu_blas(dsmoe_kernel_ctx *ctx, cublasStatus_t s, const char *op, const char *call) {
    if (s == CUBLAS_STATUS_SUCCESS)
        return DSMOE_OK;
    return cu_fail(ctx, s == CUBLAS_STATUS_ALLOC_FAILED ? DSMOE_ERR_NOMEM : DSMOE_ERR_SYSTEM, "cuda: %s: %s: %s (%s)",
                   op, call, cublasGetStatusString(s), cublasGetStatusName(s));
}

dsmoe_status cu_enter(dsmoe_kernel_ctx *ctx, const char *op) {
    if (!ctx)
        return DSMOE_ERR_INVALID;
    if (ctx->sticky != DSMOE_OK)
        return ctx->sticky;
    return cu_cuda(ctx, cudaSetDevice(ctx->device), op, "cudaSetDevice");
}

dsmoe_status cu_begin(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const char *op) {
    CU_TRY(cu_enter(ctx, op));
    if (!q || q->ctx != ctx)
        return cu_fail(ctx, DSMOE_ERR_INVALID, "cuda: %s: the queue is %s", op,
                       q ? "not one of this context's queues" : "NULL");
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// The fault record and synchronisation

// The fault in words. The launchers fill a and b per code (kernels/cuda_env.h); the op is implied by
// the code, since the record does not say which kernel raised it.
static void fault_text(int code, long long a, long long b, char *buf, size_t len) {
    switch (code) {
    case DSMOE_CU_FAULT_TOKEN_RANGE:
        snprintf(buf, len, "embedding: token id %lld at index %lld is outside [0, V)", b, a);
        break;
    case DSMOE_CU_FAULT_TARGET_RANGE:
        snprintf(buf, len, "cross-entropy: target id %lld of row %lld is outside [0, V)", b, a);
        break;
    case DSMOE_CU_FAULT_COUNT_RANGE:
        snprintf(buf, len, "grouped GEMM: group %lld has a count of %lld rows, outside [0, m_max]", a, b);
        break;
    case DSMOE_CU_FAULT_KV_RANGE:
        snprintf(buf, len, "positions: sequence %lld would use positions up to %lld, outside [0, T_max] of the KV "
                 "cache or the position table", a, b);
        break;
    case DSMOE_CU_FAULT_CHOICE_RANGE:
        snprintf(buf, len, "MoE routing table: token %lld has expert id or slot %lld, outside [0, E) or [-1, C)", a,
                 b);
        break;
    case DSMOE_CU_FAULT_SLOT_TWICE:
        snprintf(buf, len, "MoE routing table: tokens %lld and %lld both hold slot %lld of expert %lld (a table from "
                 "gate_assign never does)", a >> 32, a & 0xffffffffLL, b & 0xffffffffLL, b >> 32);
        break;
    default:
        snprintf(buf, len, "unknown fault code %d (a=%lld, b=%lld)", code, a, b);
        break;
    }
}

static double fault_clock(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

dsmoe_status cu_after_wait(dsmoe_kernel_ctx *ctx, cudaError_t e, const char *op, const char *call) {
    if (e != cudaSuccess)
        (void)cudaGetLastError();
    // The record first: a kernel that read a bad token id may also have made a later kernel fault, and
    // the bad data is the cause worth reporting. The device wrote it before the wait returned.
    const volatile dsmoe_cu_fault *f = ctx->fault;
    int code = f ? f->code : 0;
    if (code != DSMOE_CU_FAULT_NONE) {
        // The kernel that set the code may run on a queue this wait did not cover and still be writing a
        // and b: it publishes them right after. Waiting for the queues instead could block for good (one
        // may wait on a peer that is gone) and would make event_query block. The flag is read with acquire
        // order, so that a and b are read after it also on a host that reorders loads (aarch64).
        double until = fault_clock() + 1.0;
        int published;
        while (!(published = __atomic_load_n(&f->published, __ATOMIC_ACQUIRE)) && fault_clock() < until) {}
        char what[256];
        if (published)
            fault_text(code, f->a, f->b, what, sizeof what);
        else
            snprintf(what, sizeof what, "fault code %d, whose values its kernel had not written after 1 s", code);
        if (e != cudaSuccess)
            return cu_sticky(ctx, DSMOE_ERR_INVALID, "cuda: %s: a kernel found bad data: %s (and then %s: %s)", op,
                             what, call, cudaGetErrorString(e));
        return cu_sticky(ctx, DSMOE_ERR_INVALID, "cuda: %s: a kernel found bad data: %s", op, what);
    }
    if (e != cudaSuccess)
        return cu_sticky(ctx, DSMOE_ERR_SYSTEM, "cuda: %s: %s: %s (%s): a kernel or copy queued earlier failed on "
                         "the device", op, call, cudaGetErrorString(e), cudaGetErrorName(e));
    return ctx->sticky;
}

dsmoe_status cu_wait_all(dsmoe_kernel_ctx *ctx, const char *op) {
    cudaError_t first = cudaStreamSynchronize(ctx->queue.stream);
    for (dsmoe_kernel_queue *q = ctx->queues; q; q = q->next) {
        cudaError_t e = cudaStreamSynchronize(q->stream);
        if (first == cudaSuccess)
            first = e;
    }
    return cu_after_wait(ctx, first, op, "cudaStreamSynchronize");
}

// ---------------------------------------------------------------------------------------------------
// Queues

dsmoe_status cu_queue_init(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) {
    q->ctx = ctx;
    CU_TRY(cu_cuda(ctx, cudaStreamCreateWithFlags(&q->stream, cudaStreamNonBlocking), "queue_create",
                   "cudaStreamCreateWithFlags"));
    CU_TRY(cu_cuda(ctx, cudaEventCreateWithFlags(&q->tail, cudaEventDisableTiming), "queue_create",
                   "cudaEventCreateWithFlags"));
    q->env = (dsmoe_cu_env){
        .stream = q->stream,
        .fault = ctx->fault_dev,
        .device = ctx->device,
        .sm_count = ctx->sm_count,
        .allow_tf32 = ctx->tf32,
        .cublas = ctx->blas,
        .cublaslt = ctx->blaslt,
        .fused_epilogues = ctx->fused,
        .attention_tc = ctx->attention_tc,
        .expert_rows_max = ctx->expert_rows_max,
        .decode_split_keys = ctx->decode_split_keys,
        .alloc_pool = ctx->pool,
        .blas_workspace = NULL, // cu_bind_blas, at the queue's first op
        .blas_workspace_bytes = 0,
        .msg = ctx->launch_msg,
        .msg_len = sizeof ctx->launch_msg,
    };
    return DSMOE_OK;
}

void cu_queue_release(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) {
    if (q->stream)
        (void)cudaStreamSynchronize(q->stream);
    // The handle must not keep a stream and a workspace that are about to go: back to the default queue's
    // stream (which resets cuBLAS to its own workspace); the next op binds again.
    if (ctx->blas_queue == q) {
        if (ctx->blas && ctx->queue.stream && q != &ctx->queue)
            (void)cublasSetStream(ctx->blas, ctx->queue.stream);
        ctx->blas_queue = NULL;
    }
    if (q->env.blas_workspace)
        (void)cudaFree(q->env.blas_workspace);
    if (q->tail)
        (void)cudaEventDestroy(q->tail);
    if (q->stream)
        (void)cudaStreamDestroy(q->stream);
    q->env.blas_workspace = NULL;
    q->tail = NULL;
    q->stream = NULL;
    (void)cudaGetLastError();
}

// One workspace per queue: GEMMs on two queues may run at once, and cuBLAS is reproducible across streams
// only with a workspace per stream. cublasSetStream resets the workspace, so both are set together.
dsmoe_status cu_bind_blas(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const char *op) {
    if (ctx->blas_queue == q)
        return DSMOE_OK;
    if (!q->env.blas_workspace && ctx->workspace_bytes) {
        cudaError_t e = cudaMalloc(&q->env.blas_workspace, ctx->workspace_bytes);
        if (e != cudaSuccess) {
            q->env.blas_workspace = NULL;
            (void)cudaGetLastError();
            return cu_fail(ctx, DSMOE_ERR_NOMEM, "cuda: %s: cannot allocate this queue's cuBLAS workspace (%zu bytes, "
                           "setting cublas_workspace_bytes): %s", op, ctx->workspace_bytes, cudaGetErrorString(e));
        }
        q->env.blas_workspace_bytes = ctx->workspace_bytes;
    }
    cublasStatus_t s = cublasSetStream(ctx->blas, q->stream);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasSetWorkspace(ctx->blas, q->env.blas_workspace, q->env.blas_workspace_bytes);
    if (s != CUBLAS_STATUS_SUCCESS) {
        ctx->blas_queue = NULL;
        return cu_sticky(ctx, DSMOE_ERR_SYSTEM, "cuda: %s: binding cuBLAS to the queue: %s (%s)", op,
                         cublasGetStatusString(s), cublasGetStatusName(s));
    }
    ctx->blas_queue = q;
    return DSMOE_OK;
}

dsmoe_kernel_queue *cu_default_queue(dsmoe_kernel_ctx *ctx) { return ctx ? &ctx->queue : NULL; }

dsmoe_status cu_queue_create(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue **q) {
    if (!ctx)
        return DSMOE_ERR_INVALID;
    CU_REQUIRE(ctx, q, "cuda: queue_create: NULL q");
    *q = NULL;
    CU_TRY(cu_enter(ctx, "queue_create"));
    dsmoe_kernel_queue *n = calloc(1, sizeof *n);
    if (!n)
        return cu_fail(ctx, DSMOE_ERR_NOMEM, "cuda: queue_create: out of host memory");
    dsmoe_status s = cu_queue_init(ctx, n);
    if (s != DSMOE_OK) {
        cu_queue_release(ctx, n);
        free(n);
        return s;
    }
    n->next = ctx->queues;
    ctx->queues = n;
    *q = n;
    return DSMOE_OK;
}

// Waits for the queue's work (cu_queue_release), errors or not: the queue goes either way.
void cu_queue_destroy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) {
    if (!ctx || !q)
        return;
    if (q == &ctx->queue) {
        cu_fail(ctx, DSMOE_ERR_INVALID, "cuda: queue_destroy: the default queue belongs to the context");
        return;
    }
    for (dsmoe_kernel_queue **p = &ctx->queues; *p; p = &(*p)->next)
        if (*p == q) {
            *p = q->next;
            (void)cudaSetDevice(ctx->device);
            cu_queue_release(ctx, q);
            free(q);
            return;
        }
    cu_fail(ctx, DSMOE_ERR_INVALID, "cuda: queue_destroy: not one of this context's queues");
}

void *cu_queue_native(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) {
    return ctx && q && q->ctx == ctx ? (void *)q->stream : NULL;
}

// cudaHostFn_t is void (*)(void *): fn runs on a CUDA thread once the stream reaches it, and the stream
// waits for it to return.
dsmoe_status cu_queue_enqueue_host(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void (*fn)(void *arg), void *arg) {
    CU_TRY(cu_begin(ctx, q, "queue_enqueue_host"));
    CU_REQUIRE(ctx, fn, "cuda: queue_enqueue_host: NULL fn");
    return cu_cuda(ctx, cudaLaunchHostFunc(q->stream, fn, arg), "queue_enqueue_host", "cudaLaunchHostFunc");
}

dsmoe_status cu_queue_synchronize(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) {
    CU_TRY(cu_begin(ctx, q, "queue_synchronize"));
    return cu_after_wait(ctx, cudaStreamSynchronize(q->stream), "queue_synchronize", "cudaStreamSynchronize");
}

dsmoe_status cu_synchronize(dsmoe_kernel_ctx *ctx) {
    CU_TRY(cu_enter(ctx, "synchronize"));
    return cu_wait_all(ctx, "synchronize");
}

// ---------------------------------------------------------------------------------------------------
// Events

dsmoe_status cu_event_create(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event **ev) {
    if (!ctx)
        return DSMOE_ERR_INVALID;
    CU_REQUIRE(ctx, ev, "cuda: event_create: NULL ev");
    *ev = NULL;
    CU_TRY(cu_enter(ctx, "event_create"));
    dsmoe_kernel_event *e = calloc(1, sizeof *e);
    if (!e)
        return cu_fail(ctx, DSMOE_ERR_NOMEM, "cuda: event_create: out of host memory");
    dsmoe_status s = cu_cuda(ctx, cudaEventCreateWithFlags(&e->ev, cudaEventDisableTiming), "event_create",
                             "cudaEventCreateWithFlags");
    if (s != DSMOE_OK) {
        free(e);
        return s;
    }
    e->ctx = ctx;
    e->next = ctx->events;
    ctx->events = e;
    *ev = e;
    return DSMOE_OK;
}

// The event may still be pending: CUDA releases it once it completes.
void cu_event_destroy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev) {
    if (!ctx || !ev)
        return;
    for (dsmoe_kernel_event **p = &ctx->events; *p; p = &(*p)->next)
        if (*p == ev) {
            *p = ev->next;
            (void)cudaSetDevice(ctx->device);
            (void)cudaEventDestroy(ev->ev);
            (void)cudaGetLastError();
            free(ev);
            return;
        }
    cu_fail(ctx, DSMOE_ERR_INVALID, "cuda: event_destroy: not one of this context's events");
}

static dsmoe_status check_event(dsmoe_kernel_ctx *ctx, const dsmoe_kernel_event *ev, const char *op) {
    CU_REQUIRE(ctx, ev && ev->ctx == ctx, "cuda: %s: the event is %s", op,
               ev ? "not one of this context's events" : "NULL");
    return DSMOE_OK;
}

dsmoe_status cu_event_record(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, dsmoe_kernel_queue *q) {
    CU_TRY(cu_begin(ctx, q, "event_record"));
    CU_TRY(check_event(ctx, ev, "event_record"));
    return cu_cuda(ctx, cudaEventRecord(ev->ev, q->stream), "event_record", "cudaEventRecord");
}

dsmoe_status cu_queue_wait_event(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, dsmoe_kernel_event *ev) {
    CU_TRY(cu_begin(ctx, q, "queue_wait_event"));
    CU_TRY(check_event(ctx, ev, "queue_wait_event"));
    return cu_cuda(ctx, cudaStreamWaitEvent(q->stream, ev->ev, 0), "queue_wait_event", "cudaStreamWaitEvent");
}

// A never-recorded CUDA event counts as completed, as the contract wants.
dsmoe_status cu_event_synchronize(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev) {
    CU_TRY(cu_enter(ctx, "event_synchronize"));
    CU_TRY(check_event(ctx, ev, "event_synchronize"));
    return cu_after_wait(ctx, cudaEventSynchronize(ev->ev), "event_synchronize", "cudaEventSynchronize");
}

dsmoe_status cu_event_query(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, int *done) {
    if (done)
        *done = 0;
    CU_TRY(cu_enter(ctx, "event_query"));
    CU_TRY(check_event(ctx, ev, "event_query"));
    CU_REQUIRE(ctx, done, "cuda: event_query: NULL done");
    cudaError_t e = cudaEventQuery(ev->ev);
    if (e == cudaErrorNotReady) {
        (void)cudaGetLastError();
        return DSMOE_OK;
    }
    dsmoe_status s = cu_after_wait(ctx, e, "event_query", "cudaEventQuery");
    if (s == DSMOE_OK)
        *done = 1;
    return s;
}
