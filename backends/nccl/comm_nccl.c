// backends/nccl/comm_nccl.c: the "nccl" comm plugin (comm ABI v2, include/dsmoe/comm_plugin.h):
// collectives on CUDA device memory through NCCL, STREAM-ORDERED on the kernel plugin's cudaStream_t
// (stream->native). docs/nccl.md is the user's view. This file has the collectives and the table;
// nccl_comms.c the contexts, communicators, errors and the watchdog. The two build two plugins:
// - "nccl" (lib/dsmoe): linked against libnccl and the CUDA runtime; mem_kinds CUDA.
// - "ncclsim" (-DCOMM_NCCL_SIM, test-only, <build>/tests/plugins): the same code linked against
//   tests/nccl_double (NCCL's calls over MPI on host memory, run at once); mem_kinds HOST. A CUDA
//   stream orders work by itself; the double has none, so here every collective is a closure put on the
//   caller's queue (stream->enqueue_host) that issues the very NCCL calls of "nccl" when the queue runs
//   it. The comm conformance suite then sees a stream-ordered plugin and checks its ordering.
// - "nccl" on the CUDA emulator (-DCOMM_NCCL_EMU, test-only, <build>/tests/plugins/cuda_emu): this file's
//   "nccl" code (device memory, issued on the stream) linked against the same double, beside the cuda
//   plugin built for tests/cuda_emu. The emulator's streams have finished every operation when the call
//   returns and its device memory is host memory, so the double's calls made at once keep stream order.
//
// Collectives: all-to-all (equal and variable blocks) is a grouped ncclSend/ncclRecv to every rank,
// the rest are NCCL's own collectives. No DSMOE_CCAP_DETERMINISTIC: NCCL's float sums depend on the
// algorithm and protocol it picks (ring, tree, NVLS...), so the core uses its own fixed-order path where
// a run needs bitwise reproducibility.
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nccl_internal.h"

// ------------------------------------------------------------------------------------------------
// collectives: validated at the call, then issued on the stream (nccl) or from the queue (ncclsim)

typedef enum { C_ALLTOALL, C_ALLTOALLV, C_ALLGATHER, C_BROADCAST, C_ALLREDUCE, C_REDUCE_SCATTER } coll_kind;
static const char *const coll_name[] = {"alltoall", "alltoallv", "allgather", "broadcast", "allreduce",
                                        "reduce_scatter"};

typedef struct coll {
    coll_kind kind;
    dsmoe_comm_group *g;
    const void *send; // allreduce in place: recv
    void *recv;       // broadcast: the buffer
    size_t n;         // bytes (alltoall, allgather, broadcast) or elements (allreduce, reduce_scatter)
    ncclDataType_t dt;
    ncclRedOp_t op;
    int root;
    const size_t *sc, *sd, *rc, *rd; // alltoallv: (size) counts and displacements in bytes
} coll;

// The NCCL calls of one collective, on stream st. Equal blocks are the variable case with counts b.
static ncclResult_t issue(const coll *c, cudaStream_t st) {
    ncclComm_t comm = c->g->nc->comm;
    int p = c->g->size;
    const char *send = c->send;
    char *recv = c->recv;
    switch (c->kind) {
    case C_ALLTOALL:
    case C_ALLTOALLV: {
        if (c->kind == C_ALLTOALL && c->n == 0) return ncclSuccess;
        ncclResult_t r = ncclGroupStart(), e;
        for (int j = 0; j < p && r == ncclSuccess; j++) {
            size_t sn = c->kind == C_ALLTOALL ? c->n : c->sc[j], so = c->kind == C_ALLTOALL ? j * c->n : c->sd[j];
            size_t rn = c->kind == C_ALLTOALL ? c->n : c->rc[j], ro = c->kind == C_ALLTOALL ? j * c->n : c->rd[j];
            if (sn) r = ncclSend(send + so, sn, ncclUint8, j, comm, st);
            if (rn && r == ncclSuccess) r = ncclRecv(recv + ro, rn, ncclUint8, j, comm, st);
        }
        e = ncclGroupEnd(); // always closes the group, also after a failed call in it
        return r != ncclSuccess ? r : e;
    }
    case C_ALLGATHER: return c->n ? ncclAllGather(send, recv, c->n, ncclUint8, comm, st) : ncclSuccess;
    case C_BROADCAST: return c->n ? ncclBroadcast(recv, recv, c->n, ncclUint8, c->root, comm, st) : ncclSuccess;
    case C_ALLREDUCE: return c->n ? ncclAllReduce(send, recv, c->n, c->dt, c->op, comm, st) : ncclSuccess;
    case C_REDUCE_SCATTER: return c->n ? ncclReduceScatter(send, recv, c->n, c->dt, c->op, comm, st) : ncclSuccess;
    }
    return ncclInternalError;
}

// Issues c under ctx->lock (see "Threads" at the top), lets it settle, records the group's `last` event
// after it, and turns a failure into the sticky error (an enqueued collective that failed leaves the
// communicator in an unknown state: nothing goes on).
static dsmoe_status run(dsmoe_comm_ctx *ctx, const coll *c, cudaStream_t st) {
    ncomm *nc = c->g->nc;
    pthread_mutex_lock(&ctx->lock);
    if (nc->aborted) { // the watchdog found an error since the call was checked
        pthread_mutex_unlock(&ctx->lock);
        return fail(ctx, DSMOE_ERR_SYSTEM, "%s", ctx->sticky_msg);
    }
    int timed_out;
    ncclResult_t r = settle(ctx, nc->comm, issue(c, st), &timed_out);
    cudaError_t ce = r == ncclSuccess ? cudaEventRecord(nc->last, st) : cudaSuccess;
    if (r == ncclSuccess && ce == cudaSuccess) {
        pthread_mutex_unlock(&ctx->lock);
        return DSMOE_OK;
    }
    char why[512], what[768];
    if (r != ncclSuccess) {
        describe(ctx, nc->comm, r, timed_out, why, sizeof why);
        snprintf(what, sizeof what, "%s of %zu %s over %d ranks failed: %s", coll_name[c->kind], c->n,
                 c->kind == C_ALLREDUCE || c->kind == C_REDUCE_SCATTER ? "elements" : "bytes", c->g->size, why);
    } else {
        snprintf(what, sizeof what, "%s: cudaEventRecord failed: %s", coll_name[c->kind], cudaGetErrorString(ce));
    }
    fatal_locked(ctx, nc, what);
    pthread_mutex_unlock(&ctx->lock);
    return fail(ctx, DSMOE_ERR_SYSTEM, "%s", ctx->sticky_msg);
}

#ifdef COMM_NCCL_SIM
// A queued collective: the call's arguments, and its own copy of alltoallv's arrays.
typedef struct queued {
    dsmoe_comm_ctx *ctx;
    coll c;
    size_t v[]; // alltoallv: (4, size)
} queued;

static void queued_run(void *arg) {
    queued *q = arg;
    if (sticky_get(q->ctx) == DSMOE_OK) run(q->ctx, &q->c, NULL); // the double has no streams
    group_release(q->ctx, q->c.g);
    ctx_release(q->ctx);
    free(q);
}

static dsmoe_status submit(dsmoe_comm_ctx *ctx, const coll *c, const dsmoe_comm_stream *stream) {
    size_t nv = c->kind == C_ALLTOALLV ? 4 * (size_t)c->g->size : 0;
    queued *q = malloc(sizeof *q + nv * sizeof(size_t));
    if (!q) return fail(ctx, DSMOE_ERR_NOMEM, TAG "%s: out of memory for the queued call", coll_name[c->kind]);
    q->ctx = ctx, q->c = *c;
    if (nv) {
        size_t p = (size_t)c->g->size;
        memcpy(q->v, c->sc, p * sizeof(size_t)), memcpy(q->v + p, c->sd, p * sizeof(size_t));
        memcpy(q->v + 2 * p, c->rc, p * sizeof(size_t)), memcpy(q->v + 3 * p, c->rd, p * sizeof(size_t));
        q->c.sc = q->v, q->c.sd = q->v + p, q->c.rc = q->v + 2 * p, q->c.rd = q->v + 3 * p;
    }
    atomic_fetch_add(&ctx->refs, 1); // before enqueueing: a queue may run fn at once
    atomic_fetch_add(&c->g->refs, 1);
    dsmoe_status s = stream->enqueue_host(stream->owner, queued_run, q);
    if (s != DSMOE_OK) {
        fail(ctx, s, TAG "%s: the kernel queue refused the host callback (%s)", coll_name[c->kind],
             dsmoe_status_name(s));
        atomic_fetch_sub(&c->g->refs, 1);
        atomic_fetch_sub(&ctx->refs, 1); // the caller's references remain
        free(q);
    }
    return s;
}
#define STREAM_OK(st) ((st) && (st)->enqueue_host)
#define STREAM_WHY(st) ((st) ? "has no enqueue_host" : "is NULL")
#else
static dsmoe_status submit(dsmoe_comm_ctx *ctx, const coll *c, const dsmoe_comm_stream *stream) {
    return run(ctx, c, (cudaStream_t)stream->native);
}
#define STREAM_OK(st) ((st) && (st)->native)
#define STREAM_WHY(st) ((st) ? "has no native cudaStream_t: is the kernel plugin a CUDA one?" : "is NULL")
#endif

// What every collective checks first: a context, no sticky error, a kernel queue, a group, buffers
// where bytes move.
static dsmoe_status check_call(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const char *op, int missing_buffer,
                               const dsmoe_comm_stream *stream) {
    if (!ctx) return DSMOE_ERR_INVALID;
    dsmoe_status s = dsmoe_comm_nccl_poll(ctx);
    if (s != DSMOE_OK) return s;
    if (!STREAM_OK(stream))
        return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: stream-ordered plugin '" PLUGIN_NAME "' needs a kernel queue "
                    "(stream %s)", op, STREAM_WHY(stream));
    if (!g) return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: group is NULL", op);
    if (missing_buffer) return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: a buffer is NULL but the size is not 0", op);
    return DSMOE_OK;
}

// NCCL before 2.24 declares ncclBfloat16 only where cuda_bf16.h's C++ types exist, which a C file never
// sees; the library has taken the type, value 9, since 2.10.
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE < 22400 && !defined(__CUDA_BF16_TYPES_EXIST__)
#define NCCL_BF16 ((ncclDataType_t)9)
#else
#define NCCL_BF16 ncclBfloat16
#endif

static dsmoe_status check_reduction(dsmoe_comm_ctx *ctx, const char *what, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                    ncclDataType_t *dt, ncclRedOp_t *nop) {
    switch (dtype) {
    case DSMOE_FLOAT32: *dt = ncclFloat32; break;
    case DSMOE_FLOAT64: *dt = ncclFloat64; break;
    case DSMOE_INT32: *dt = ncclInt32; break;
    case DSMOE_INT64: *dt = ncclInt64; break;
    case DSMOE_UINT8: *dt = ncclUint8; break;
    case DSMOE_BFLOAT16: *dt = NCCL_BF16; break;
    case DSMOE_FLOAT16: *dt = ncclFloat16; break;
    default: return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: unknown dtype %d", what, (int)dtype);
    }
    switch (op) {
    case DSMOE_SUM: *nop = ncclSum; break;
    case DSMOE_MAX: *nop = ncclMax; break;
    case DSMOE_MIN: *nop = ncclMin; break;
    default: return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: unknown op %d", what, (int)op);
    }
    return DSMOE_OK;
}

static dsmoe_status nccl_alltoall(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                  size_t bytes, const dsmoe_comm_stream *stream) {
    dsmoe_status s = check_call(ctx, g, "alltoall", bytes > 0 && (!sendbuf || !recvbuf), stream);
    if (s != DSMOE_OK) return s;
    coll c = {.kind = C_ALLTOALL, .g = g, .send = sendbuf, .recv = recvbuf, .n = bytes};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_alltoallv(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf,
                                   const size_t *sendcounts, const size_t *sdispls, void *recvbuf,
                                   const size_t *recvcounts, const size_t *rdispls, const dsmoe_comm_stream *stream) {
    dsmoe_status s = check_call(ctx, g, "alltoallv", 0, stream);
    if (s != DSMOE_OK) return s;
    if (!sendcounts || !sdispls || !recvcounts || !rdispls)
        return fail(ctx, DSMOE_ERR_INVALID, TAG "alltoallv: a count or displacement array is NULL");
    size_t sent = 0, received = 0;
    for (int j = 0; j < g->size; j++) sent += sendcounts[j], received += recvcounts[j];
    if ((sent && !sendbuf) || (received && !recvbuf))
        return fail(ctx, DSMOE_ERR_INVALID, TAG "alltoallv: a buffer is NULL but its counts are not all 0");
    coll c = {.kind = C_ALLTOALLV, .g = g, .send = sendbuf, .recv = recvbuf, .n = sent,
              .sc = sendcounts, .sd = sdispls, .rc = recvcounts, .rd = rdispls};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_allgather(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                   size_t bytes, const dsmoe_comm_stream *stream) {
    dsmoe_status s = check_call(ctx, g, "allgather", bytes > 0 && (!sendbuf || !recvbuf), stream);
    if (s != DSMOE_OK) return s;
    coll c = {.kind = C_ALLGATHER, .g = g, .send = sendbuf, .recv = recvbuf, .n = bytes};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_broadcast(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, void *buf, size_t bytes, int root,
                                   const dsmoe_comm_stream *stream) {
    dsmoe_status s = check_call(ctx, g, "broadcast", bytes > 0 && !buf, stream);
    if (s != DSMOE_OK) return s;
    if (root < 0 || root >= g->size)
        return fail(ctx, DSMOE_ERR_INVALID, TAG "broadcast: root %d is not a rank of this group of %d", root, g->size);
    coll c = {.kind = C_BROADCAST, .g = g, .recv = buf, .n = bytes, .root = root};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_allreduce(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                   size_t count, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                   const dsmoe_comm_stream *stream) {
    ncclDataType_t dt;
    ncclRedOp_t nop;
    dsmoe_status s = check_call(ctx, g, "allreduce", count > 0 && (!sendbuf || !recvbuf), stream);
    if (s == DSMOE_OK) s = check_reduction(ctx, "allreduce", dtype, op, &dt, &nop);
    if (s != DSMOE_OK) return s;
    coll c = {.kind = C_ALLREDUCE, .g = g, .send = sendbuf == DSMOE_IN_PLACE ? recvbuf : sendbuf, .recv = recvbuf,
              .n = count, .dt = dt, .op = nop};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_reduce_scatter(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf,
                                        void *recvbuf, size_t recvcount, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                        const dsmoe_comm_stream *stream) {
    ncclDataType_t dt;
    ncclRedOp_t nop;
    dsmoe_status s = check_call(ctx, g, "reduce_scatter", recvcount > 0 && (!sendbuf || !recvbuf), stream);
    if (s == DSMOE_OK) s = check_reduction(ctx, "reduce_scatter", dtype, op, &dt, &nop);
    if (s != DSMOE_OK) return s;
    if (sendbuf == DSMOE_IN_PLACE)
        return fail(ctx, DSMOE_ERR_INVALID, TAG "reduce_scatter: sendbuf is DSMOE_IN_PLACE; pass the input");
    coll c = {.kind = C_REDUCE_SCATTER, .g = g, .send = sendbuf, .recv = recvbuf, .n = recvcount, .dt = dt,
              .op = nop};
    return submit(ctx, &c, stream);
}

// ------------------------------------------------------------------------------------------------
// the table

static const dsmoe_comm_plugin_v2 nccl_plugin = {
    .api_version = DSMOE_COMM_API_VERSION,
    .name = PLUGIN_NAME,
#ifdef COMM_NCCL_SIM
    .description = "TEST ONLY: the nccl plugin over a test double of NCCL (MPI on host memory)",
    .mem_kinds = DSMOE_MEM_HOST,
#elif defined(COMM_NCCL_EMU)
    .description = "TEST ONLY: the nccl plugin over a test double of NCCL (MPI), on the CUDA emulator's device memory",
    .mem_kinds = DSMOE_MEM_CUDA,
#else
    .description = "NCCL collectives on CUDA device memory, stream-ordered (float sums not bitwise reproducible)",
    .mem_kinds = DSMOE_MEM_CUDA,
#endif
    .caps = DSMOE_CCAP_STREAM_ORDERED,
    .mpi_abi = NULL,
    .params = nccl_params,
    .n_params = NCCL_N_PARAMS,
    .init = nccl_init,
    .finalize = nccl_finalize,
    .last_error = nccl_last_error,
    .group_create = nccl_group_create,
    .group_destroy = nccl_group_destroy,
    .group_rank = nccl_group_rank,
    .group_size = nccl_group_size,
    .alltoall = nccl_alltoall,
    .allreduce = nccl_allreduce,
    .allgather = nccl_allgather,
    .reduce_scatter = nccl_reduce_scatter,
    .alltoallv = nccl_alltoallv,
    .broadcast = nccl_broadcast,
};

DSMOE_PLUGIN_EXPORT const dsmoe_comm_plugin_v2 *DSMOE_COMM_PLUGIN_ENTRY(void) { return &nccl_plugin; }
