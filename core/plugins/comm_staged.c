// core/plugins/comm_staged.c: a host-memory comm plugin in front of a device kernel plugin, through pinned host
// staging buffers. defines: dsmoe_comm_staged_open, dsmoe_comm_staged_close
//
// `cuda` + `mpi` must run on any cluster (no CUDA-aware MPI, no NCCL), and several ranks may share one
// GPU. When the kernel plugin's memory kind is not one the comm plugin accepts but the comm plugin takes
// host memory, the runtime puts this adapter between them: each collective copies its device input into
// the kernel plugin's host_alloc (pinned) memory, waits for the copy, runs the host collective there, and
// copies the result back on the compute queue, then waits for that copy too, so that the results are in
// place on return, as a host-progressed collective promises. The adapter is host-progressed and never
// non-blocking whatever the inner plugin says (a non-blocking all-reduce would need the copy-back at
// request_wait; the GPU has nothing to overlap with while the host reduces anyway). Groups are the
// inner plugin's own: group_rank / group_size go straight through.
//
// Staging buffers grow to the largest collective and are reused: a copy into the device from them is
// queued before the next collective's copy out of the device into them on the same queue, so the queue
// order protects them.
//
// A group of one member stages nothing: its collectives are copies within the device (the kernel plugin's
// `copy`, on the compute queue; none at all when the result is already in place). Expert-parallel
// exchanges with expert_parallel = 1 and the gradient all-reduce of a one-rank run are such
// collectives: through the host they cost two PCIe crossings of every byte.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

typedef struct staged_ctx {
    dsmoe_comm_plugin_v2 table;       // first: the runtime's rt->comm points here
    const dsmoe_comm_plugin_v2 *in;   // the host comm plugin
    dsmoe_comm_ctx *in_ctx;
    const dsmoe_kernel_plugin_v3 *kern;
    dsmoe_kernel_ctx *kctx;
    dsmoe_kernel_queue *q;
    dsmoe_kernel_event *ev;
    void *send, *recv; // (send_bytes), (recv_bytes) pinned host memory of the kernel plugin
    size_t send_bytes, recv_bytes;
    char error[1024];
} staged_ctx;

#define SCTX(ctx) ((staged_ctx *)(ctx))

static dsmoe_status fail(staged_ctx *x, dsmoe_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static dsmoe_status fail(staged_ctx *x, dsmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->error, sizeof x->error, fmt, ap);
    va_end(ap);
    return s;
}

static dsmoe_status kern_fail(staged_ctx *x, dsmoe_status s, const char *what) {
    return fail(x, s, "host staging: kernel plugin '%s': %s: %s", x->kern->name, what, x->kern->last_error(x->kctx));
}

static dsmoe_status inner_fail(staged_ctx *x, dsmoe_status s) {
    if (s != DSMOE_OK) snprintf(x->error, sizeof x->error, "%s", x->in->last_error(x->in_ctx));
    return s;
}

// Grows a staging buffer to at least `bytes` (freed after queued work, so a pending copy is safe).
static dsmoe_status grow(staged_ctx *x, void **buf, size_t *have, size_t bytes) {
    if (bytes <= *have) return DSMOE_OK;
    x->kern->host_free(x->kctx, *buf);
    *buf = NULL;
    *have = 0;
    size_t want = bytes < 4096 ? 4096 : bytes;
    dsmoe_status s = x->kern->host_alloc(x->kctx, want, buf);
    if (s != DSMOE_OK) return kern_fail(x, s, "host_alloc of a staging buffer");
    *have = want;
    return DSMOE_OK;
}

// Waits for everything queued on q so far.
static dsmoe_status drain(staged_ctx *x) {
    dsmoe_status s = x->kern->event_record(x->kctx, x->ev, x->q);
    if (s == DSMOE_OK) s = x->kern->event_synchronize(x->kctx, x->ev);
    return s == DSMOE_OK ? s : kern_fail(x, s, "waiting for a staging copy");
}

// Device `src` (bytes) into host staging `dst`, finished on return.
static dsmoe_status stage_out(staged_ctx *x, void *dst, const void *src, size_t bytes) {
    if (bytes == 0) return DSMOE_OK;
    dsmoe_status s = x->kern->copy_to_host(x->kctx, x->q, dst, src, bytes);
    if (s != DSMOE_OK) return kern_fail(x, s, "copy_to_host");
    return drain(x);
}

// Host staging `src` (bytes) back into device `dst`, finished on return.
static dsmoe_status stage_in(staged_ctx *x, void *dst, const void *src, size_t bytes) {
    if (bytes == 0) return DSMOE_OK;
    dsmoe_status s = x->kern->copy_to_device(x->kctx, x->q, dst, src, bytes);
    if (s != DSMOE_OK) return kern_fail(x, s, "copy_to_device");
    return drain(x);
}

// A one-member group's collective: dst = src (bytes) on the compute queue, in queue order with the work
// before and after it (what the caller reads next is queued after it; the host reads device memory only
// through copy_to_host, queued after it too).
static dsmoe_status self_copy(staged_ctx *x, void *dst, const void *src, size_t bytes) {
    if (bytes == 0 || dst == src) return DSMOE_OK;
    dsmoe_status s = x->kern->copy(x->kctx, x->q, dst, src, bytes);
    return s == DSMOE_OK ? s : kern_fail(x, s, "copy within the device (a one-member group)");
}

static int alone(staged_ctx *x, dsmoe_comm_group *g) { return x->in->group_size(g) == 1; }

// A reduction over one member is a copy, but the dtype and op are still the inner plugin's to refuse (a
// host plugin may sum no bfloat16): it is asked with no element, on a host scratch word.
static dsmoe_status reduction_allowed(staged_ctx *x, dsmoe_comm_group *g, int scatter, dsmoe_dtype dtype,
                                      dsmoe_reduce_op op, const dsmoe_comm_stream *stream) {
    static _Alignas(16) char none[16];
    return inner_fail(x, scatter ? x->in->reduce_scatter(x->in_ctx, g, none, none + 8, 0, dtype, op, stream)
                                 : x->in->allreduce(x->in_ctx, g, none, none + 8, 0, dtype, op, stream));
}

// --- the table ----------------------------------------------------------------------------------------

static const char *staged_last_error(dsmoe_comm_ctx *ctx) { return SCTX(ctx)->error; }

static dsmoe_status staged_group_create(dsmoe_comm_ctx *ctx, const dsmoe_bootstrap *bs, dsmoe_comm_group **g) {
    staged_ctx *x = SCTX(ctx);
    return inner_fail(x, x->in->group_create(x->in_ctx, bs, g));
}

static void staged_group_destroy(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    staged_ctx *x = SCTX(ctx);
    x->in->group_destroy(x->in_ctx, g);
}

static dsmoe_status staged_alltoall(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, void *recv, size_t bytes,
                                    const dsmoe_comm_stream *stream) {
    staged_ctx *x = SCTX(ctx);
    if (alone(x, g)) return self_copy(x, recv, send, bytes);
    size_t total = bytes * (size_t)x->in->group_size(g);
    DSMOE_TRY(grow(x, &x->send, &x->send_bytes, total));
    DSMOE_TRY(grow(x, &x->recv, &x->recv_bytes, total));
    DSMOE_TRY(stage_out(x, x->send, send, total));
    DSMOE_TRY(inner_fail(x, x->in->alltoall(x->in_ctx, g, x->send, x->recv, bytes, stream)));
    return stage_in(x, recv, x->recv, total);
}

static dsmoe_status staged_allreduce(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, void *recv, size_t count,
                                     dsmoe_dtype dtype, dsmoe_reduce_op op, const dsmoe_comm_stream *stream) {
    staged_ctx *x = SCTX(ctx);
    size_t bytes = count * dsmoe_dtype_size(dtype);
    if (alone(x, g)) { // the sum (max, min) of one value is that value
        DSMOE_TRY(reduction_allowed(x, g, 0, dtype, op, stream));
        return self_copy(x, recv, send == DSMOE_IN_PLACE ? recv : send, bytes);
    }
    DSMOE_TRY(grow(x, &x->recv, &x->recv_bytes, bytes));
    DSMOE_TRY(stage_out(x, x->recv, send == DSMOE_IN_PLACE ? recv : send, bytes));
    DSMOE_TRY(inner_fail(x, x->in->allreduce(x->in_ctx, g, DSMOE_IN_PLACE, x->recv, count, dtype, op, stream)));
    return stage_in(x, recv, x->recv, bytes);
}

static dsmoe_status staged_allgather(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, void *recv, size_t bytes,
                                     const dsmoe_comm_stream *stream) {
    staged_ctx *x = SCTX(ctx);
    if (alone(x, g)) return self_copy(x, recv, send, bytes);
    size_t total = bytes * (size_t)x->in->group_size(g);
    DSMOE_TRY(grow(x, &x->send, &x->send_bytes, bytes));
    DSMOE_TRY(grow(x, &x->recv, &x->recv_bytes, total));
    DSMOE_TRY(stage_out(x, x->send, send, bytes));
    DSMOE_TRY(inner_fail(x, x->in->allgather(x->in_ctx, g, x->send, x->recv, bytes, stream)));
    return stage_in(x, recv, x->recv, total);
}

static dsmoe_status staged_reduce_scatter(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, void *recv,
                                          size_t recvcount, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                          const dsmoe_comm_stream *stream) {
    staged_ctx *x = SCTX(ctx);
    // DSMOE_IN_PLACE is the plugin's to refuse (comm_plugin.h defines it for allreduce only).
    if (send == DSMOE_IN_PLACE)
        return inner_fail(x, x->in->reduce_scatter(x->in_ctx, g, send, recv, recvcount, dtype, op, stream));
    size_t bytes = recvcount * dsmoe_dtype_size(dtype), total = bytes * (size_t)x->in->group_size(g);
    if (alone(x, g)) {
        DSMOE_TRY(reduction_allowed(x, g, 1, dtype, op, stream));
        return self_copy(x, recv, send, bytes);
    }
    DSMOE_TRY(grow(x, &x->send, &x->send_bytes, total));
    DSMOE_TRY(grow(x, &x->recv, &x->recv_bytes, bytes));
    DSMOE_TRY(stage_out(x, x->send, send, total));
    DSMOE_TRY(inner_fail(x, x->in->reduce_scatter(x->in_ctx, g, x->send, x->recv, recvcount, dtype, op, stream)));
    return stage_in(x, recv, x->recv, bytes);
}

// Byte extent of a variable layout: the end of its farthest block.
static size_t extent(const size_t *counts, const size_t *displs, int n) {
    size_t end = 0;
    for (int i = 0; i < n; i++)
        if (counts[i] && displs[i] + counts[i] > end) end = displs[i] + counts[i];
    return end;
}

static dsmoe_status staged_alltoallv(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, const size_t *scounts,
                                     const size_t *sdispls, void *recv, const size_t *rcounts, const size_t *rdispls,
                                     const dsmoe_comm_stream *stream) {
    staged_ctx *x = SCTX(ctx);
    int n = x->in->group_size(g);
    if (n == 1 && scounts[0] == rcounts[0]) // one block to oneself (unequal counts: the inner plugin's error)
        return self_copy(x, (char *)recv + rdispls[0], (const char *)send + sdispls[0], rcounts[0]);
    size_t sext = extent(scounts, sdispls, n), rext = extent(rcounts, rdispls, n);
    DSMOE_TRY(grow(x, &x->send, &x->send_bytes, sext));
    DSMOE_TRY(grow(x, &x->recv, &x->recv_bytes, rext));
    DSMOE_TRY(stage_out(x, x->send, send, sext));
    // Bytes between the received blocks keep their device values: stage them out too.
    DSMOE_TRY(stage_out(x, x->recv, recv, rext));
    DSMOE_TRY(inner_fail(x, x->in->alltoallv(x->in_ctx, g, x->send, scounts, sdispls, x->recv, rcounts, rdispls, stream)));
    return stage_in(x, recv, x->recv, rext);
}

static dsmoe_status staged_broadcast(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, void *buf, size_t bytes, int root,
                                     const dsmoe_comm_stream *stream) {
    staged_ctx *x = SCTX(ctx);
    if (alone(x, g) && root == 0) return DSMOE_OK; // the root's own buffer
    DSMOE_TRY(grow(x, &x->recv, &x->recv_bytes, bytes));
    if (x->in->group_rank(g) == root) DSMOE_TRY(stage_out(x, x->recv, buf, bytes));
    DSMOE_TRY(inner_fail(x, x->in->broadcast(x->in_ctx, g, x->recv, bytes, root, stream)));
    return x->in->group_rank(g) == root ? DSMOE_OK : stage_in(x, buf, x->recv, bytes);
}

static dsmoe_status staged_barrier(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    staged_ctx *x = SCTX(ctx);
    return inner_fail(x, x->in->barrier(x->in_ctx, g));
}

static void staged_finalize(dsmoe_comm_ctx *ctx) {
    staged_ctx *x = SCTX(ctx);
    if (!x) return;
    if (x->kctx) x->kern->synchronize(x->kctx);
    if (x->kctx) {
        x->kern->host_free(x->kctx, x->send);
        x->kern->host_free(x->kctx, x->recv);
        x->kern->event_destroy(x->kctx, x->ev);
    }
    if (x->in_ctx) x->in->finalize(x->in_ctx);
    free(x);
}

// --- what the runtime calls ---------------------------------------------------------------------------

dsmoe_status dsmoe_comm_staged_open(const dsmoe_comm_plugin_v2 *in, dsmoe_comm_ctx *in_ctx,
                                    const dsmoe_kernel_plugin_v3 *kern, dsmoe_kernel_ctx *kctx, dsmoe_kernel_queue *q,
                                    const dsmoe_comm_plugin_v2 **out, dsmoe_comm_ctx **out_ctx, dsmoe_err *err) {
    if (!kern->host_alloc || !kern->host_free || !kern->copy_to_host || !kern->copy_to_device)
        return dsmoe_err_set(err, DSMOE_ERR_UNSUPPORTED,
                             "kernel plugin '%s' has no host_alloc/copy members: comm plugin '%s' (host memory) cannot "
                             "be staged through it",
                             kern->name, in->name);
    staged_ctx *x = calloc(1, sizeof *x);
    if (!x) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "host staging for comm plugin '%s': out of memory", in->name);
    x->in = in;
    x->in_ctx = in_ctx;
    x->kern = kern;
    x->kctx = kctx;
    x->q = q;
    dsmoe_status s = kern->event_create(kctx, &x->ev);
    if (s != DSMOE_OK) {
        free(x);
        return dsmoe_err_set(err, s, "host staging: kernel plugin '%s': event_create: %s", kern->name,
                             kern->last_error(kctx));
    }
    dsmoe_comm_plugin_v2 *t = &x->table;
    *t = *in;
    t->mem_kinds = in->mem_kinds | kern->mem_kind;
    t->caps = in->caps & ~(uint32_t)(DSMOE_CCAP_NONBLOCKING | DSMOE_CCAP_STREAM_ORDERED);
    t->init = NULL; // the inner plugin is initialised already
    t->finalize = staged_finalize;
    t->last_error = staged_last_error;
    t->group_create = staged_group_create;
    t->group_destroy = staged_group_destroy;
    t->alltoall = staged_alltoall;
    t->allreduce = staged_allreduce;
    t->allgather = staged_allgather;
    t->reduce_scatter = staged_reduce_scatter;
    t->alltoallv = in->alltoallv ? staged_alltoallv : NULL;
    t->broadcast = in->broadcast ? staged_broadcast : NULL;
    t->barrier = in->barrier ? staged_barrier : NULL;
    t->allreduce_start = NULL;
    t->request_test = NULL;
    t->request_wait = NULL;
    *out = t;
    *out_ctx = (dsmoe_comm_ctx *)x;
    return DSMOE_OK;
}
