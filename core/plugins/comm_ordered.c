// core/plugins/comm_ordered.c: the core's fixed-order float sums in front of a comm plugin that does not
// declare DSMOE_CCAP_DETERMINISTIC. defines: dsmoe_comm_ordered_open
//
// Same deck + seed must give the same numbers. A plugin like nccl picks its reduction algorithm (ring,
// tree, NVLS, ...) by message size, group size and machine, so the order in which it adds the ranks'
// floats, hence the bits of a gradient sum, may change between runs and layouts. With run.fixed_order_sums
// (on by default) the runtime puts this adapter in front of such a plugin: an allreduce or
// reduce_scatter that SUMs floats becomes data movement, which every plugin does exactly, plus additions
// in rank order 0, 1, ..., p-1 on the kernel plugin's queue:
//
//   1. alltoallv: rank r receives chunk r of every rank's vector, rank i's at row i   // (p, c_r)
//   2. rows 1 .. p-1 added into row 0 one after the other (the kernel plugin's axpy, alpha = 1: x + y
//      rounded once, as a plain addition), so chunk r = ((v_0 + v_1) + v_2) + ... in every run;
//   3. alltoallv: every rank sends its summed chunk to every rank (allreduce; reduce_scatter stops at 2).
//
// The bits are those of the rank-order sum the mpi plugin computes (docs/plugins.md, Determinism), and the
// traffic is a ring allreduce's (2n per rank), in 2 collectives. float32 adds on the device (no wait);
// float64 (the core's small loss statistics) has no kernel op, so its rows are added on the host after a
// wait. float16 and bfloat16 sums are refused (the core does not sum them; an adapter that rounded them
// its own way would not be the plugin's sum either). Integer sums, MAX, MIN and all data movement go
// straight through: they are exact in any order. Group size 1: straight through.
//
// The adapter keeps the inner plugin's progress model: on a stream-ordered plugin everything is
// enqueued on the core's queue (q; the stream the core passes is q's) and the call returns at once; on a
// host-progressed one the results are in place on return. It is never non-blocking.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

typedef struct ordered_ctx {
    dsmoe_comm_plugin_v2 table;     // first: the runtime's rt->comm points here
    const dsmoe_comm_plugin_v2 *in; // the plugin whose sums are not in a fixed order
    dsmoe_comm_ctx *in_ctx;
    const dsmoe_kernel_plugin_v3 *kern;
    dsmoe_kernel_ctx *kctx;
    dsmoe_kernel_queue *q;
    dsmoe_kernel_event *ev;
    int stream_ordered;             // the inner plugin's DSMOE_CCAP_STREAM_ORDERED
    void *rows;                     // (p, c) device scratch of the exchanged chunks, grown, never shrunk
    size_t rows_bytes;
    double *host;                   // (p, c) float64 rows on the host
    size_t host_bytes;
    size_t *counts;                 // 4 arrays of group size for the alltoallv calls
    int counts_n;
    char error[1024];
} ordered_ctx;

#define OCTX(ctx) ((ordered_ctx *)(ctx))

static dsmoe_status fail(ordered_ctx *x, dsmoe_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static dsmoe_status fail(ordered_ctx *x, dsmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->error, sizeof x->error, fmt, ap);
    va_end(ap);
    return s;
}

static dsmoe_status kern_fail(ordered_ctx *x, dsmoe_status s, const char *what) {
    return fail(x, s, "fixed-order sums: kernel plugin '%s': %s: %s", x->kern->name, what, x->kern->last_error(x->kctx));
}

static dsmoe_status inner_fail(ordered_ctx *x, dsmoe_status s) {
    if (s != DSMOE_OK) snprintf(x->error, sizeof x->error, "%s", x->in->last_error(x->in_ctx));
    return s;
}

// Waits for everything queued on q so far.
static dsmoe_status drain(ordered_ctx *x) {
    dsmoe_status s = x->kern->event_record(x->kctx, x->ev, x->q);
    if (s == DSMOE_OK) s = x->kern->event_synchronize(x->kctx, x->ev);
    return s == DSMOE_OK ? s : kern_fail(x, s, "waiting for the queue");
}

// The device scratch and the count arrays, grown to fit. The old scratch goes with free, which waits for
// the work queued before it (the stream-ordered plugin's collectives on the queue included). A
// host-progressed plugin that takes device memory (mpi_cuda) writes the fresh scratch from the host side
// at the call, so the queue is drained after the alloc: a plugin may still be preparing a fresh buffer
// in queue order (strict treats it so; cuda's alloc already waits). Growth happens in the first steps only.
static dsmoe_status reserve(ordered_ctx *x, size_t bytes, int p) {
    if (bytes > x->rows_bytes) {
        x->kern->free(x->kctx, x->rows);
        x->rows = NULL;
        x->rows_bytes = 0;
        dsmoe_status s = x->kern->alloc(x->kctx, bytes, 0, &x->rows);
        if (s != DSMOE_OK) return kern_fail(x, s, "alloc of the exchange scratch");
        x->rows_bytes = bytes;
        if (!x->stream_ordered) DSMOE_TRY(drain(x));
    }
    if (p > x->counts_n) {
        size_t *c = realloc(x->counts, 4 * (size_t)p * sizeof *c);
        if (!c) return fail(x, DSMOE_ERR_NOMEM, "fixed-order sums: out of host memory");
        x->counts = c;
        x->counts_n = p;
    }
    return DSMOE_OK;
}

// Chunk j of n elements over p ranks: the first n % p chunks one longer.
static size_t chunk_len(size_t n, int p, int j) { return n / (size_t)p + ((size_t)j < n % (size_t)p); }
static size_t chunk_off(size_t n, int p, int j) {
    return (size_t)j * (n / (size_t)p) + ((size_t)j < n % (size_t)p ? (size_t)j : n % (size_t)p);
}

// Rows 1 .. p-1 of x->rows (p, c) added into row 0 in rank order.
static dsmoe_status add_rows(ordered_ctx *x, dsmoe_dtype dt, int p, size_t c) {
    if (c == 0) return DSMOE_OK;
    size_t row = c * dsmoe_dtype_size(dt);
    if (dt == DSMOE_FLOAT32) {
        for (int i = 1; i < p; i++) {
            dsmoe_status s = x->kern->axpy(x->kctx, x->q, x->rows, 1.0f, (char *)x->rows + (size_t)i * row, dt, c);
            if (s != DSMOE_OK) return kern_fail(x, s, "axpy");
        }
    } else { // float64: on the host, in the same order
        if ((size_t)p * row > x->host_bytes) {
            double *h = realloc(x->host, (size_t)p * row);
            if (!h) return fail(x, DSMOE_ERR_NOMEM, "fixed-order sums: out of host memory");
            x->host = h;
            x->host_bytes = (size_t)p * row;
        }
        dsmoe_status s = x->kern->copy_to_host(x->kctx, x->q, x->host, x->rows, (size_t)p * row);
        if (s != DSMOE_OK) return kern_fail(x, s, "copy_to_host");
        DSMOE_TRY(drain(x));
        for (int i = 1; i < p; i++)
            for (size_t k = 0; k < c; k++) x->host[k] += x->host[(size_t)i * c + k];
        s = x->kern->copy_to_device(x->kctx, x->q, x->rows, x->host, row); // consumed before return
        if (s != DSMOE_OK) return kern_fail(x, s, "copy_to_device");
    }
    return x->stream_ordered ? DSMOE_OK : drain(x); // a host-progressed plugin reads row 0 next
}

// Whether the adapter adds: a float SUM on more than one rank. float16/bfloat16 sums are refused.
static dsmoe_status takes(ordered_ctx *x, dsmoe_comm_group *g, dsmoe_dtype dt, dsmoe_reduce_op op, const char *what,
                          int *ordered) {
    *ordered = 0;
    if (op != DSMOE_SUM || x->in->group_size(g) == 1) return DSMOE_OK;
    if (dt == DSMOE_FLOAT16 || dt == DSMOE_BFLOAT16)
        return fail(x, DSMOE_ERR_UNSUPPORTED,
                    "comm plugin '%s': %s of %s with run.fixed_order_sums: the core's fixed-order sums take float32 "
                    "and float64 only; set run.fixed_order_sums = false to use the plugin's own (not bitwise "
                    "reproducible) sums", x->in->name, what, dt == DSMOE_FLOAT16 ? "float16" : "bfloat16");
    *ordered = dt == DSMOE_FLOAT32 || dt == DSMOE_FLOAT64;
    return DSMOE_OK;
}

// Step 1: chunk `me` of every rank's `src` (n elements, chunks of chunk_len, or `equal` each when
// equal > 0) into the rows (p, c).
static dsmoe_status gather_chunks(ordered_ctx *x, dsmoe_comm_group *g, const void *src, size_t n, size_t equal,
                                  dsmoe_dtype dt, const dsmoe_comm_stream *stream, size_t *c_out) {
    int p = x->in->group_size(g), me = x->in->group_rank(g);
    size_t es = dsmoe_dtype_size(dt), c = equal ? equal : chunk_len(n, p, me);
    DSMOE_TRY(reserve(x, (size_t)p * c * es, p));
    size_t *sc = x->counts, *sd = sc + p, *rc = sd + p, *rd = rc + p;
    for (int j = 0; j < p; j++) {
        sc[j] = (equal ? equal : chunk_len(n, p, j)) * es;
        sd[j] = (equal ? (size_t)j * equal : chunk_off(n, p, j)) * es;
        rc[j] = c * es;
        rd[j] = (size_t)j * c * es;
    }
    *c_out = c;
    return inner_fail(x, x->in->alltoallv(x->in_ctx, g, src, sc, sd, x->rows, rc, rd, stream));
}

// --- the table ----------------------------------------------------------------------------------------

static dsmoe_status ordered_allreduce(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, void *recv,
                                      size_t count, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                      const dsmoe_comm_stream *stream) {
    ordered_ctx *x = OCTX(ctx);
    int ordered;
    DSMOE_TRY(takes(x, g, dtype, op, "allreduce", &ordered));
    // A zero count goes through too: it is how a caller asks the plugin for a sticky error.
    if (!ordered || count == 0)
        return inner_fail(x, x->in->allreduce(x->in_ctx, g, send, recv, count, dtype, op, stream));
    int p = x->in->group_size(g);
    size_t es = dsmoe_dtype_size(dtype), c;
    DSMOE_TRY(gather_chunks(x, g, send == DSMOE_IN_PLACE ? recv : send, count, 0, dtype, stream, &c));
    DSMOE_TRY(add_rows(x, dtype, p, c));
    // Step 3: my chunk to everyone (the same row read p times), everyone's into place in recv.
    size_t *sc = x->counts, *sd = sc + p, *rc = sd + p, *rd = rc + p;
    for (int j = 0; j < p; j++) {
        sc[j] = c * es;
        sd[j] = 0;
        rc[j] = chunk_len(count, p, j) * es;
        rd[j] = chunk_off(count, p, j) * es;
    }
    return inner_fail(x, x->in->alltoallv(x->in_ctx, g, x->rows, sc, sd, recv, rc, rd, stream));
}

static dsmoe_status ordered_reduce_scatter(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, void *recv,
                                           size_t recvcount, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                           const dsmoe_comm_stream *stream) {
    ordered_ctx *x = OCTX(ctx);
    int ordered;
    DSMOE_TRY(takes(x, g, dtype, op, "reduce_scatter", &ordered));
    // DSMOE_IN_PLACE is the plugin's to refuse (comm_plugin.h defines it for allreduce only).
    if (!ordered || recvcount == 0 || send == DSMOE_IN_PLACE)
        return inner_fail(x, x->in->reduce_scatter(x->in_ctx, g, send, recv, recvcount, dtype, op, stream));
    int p = x->in->group_size(g);
    size_t c;
    DSMOE_TRY(gather_chunks(x, g, send, 0, recvcount, dtype, stream, &c));
    DSMOE_TRY(add_rows(x, dtype, p, c));
    dsmoe_status s = x->kern->copy(x->kctx, x->q, recv, x->rows, c * dsmoe_dtype_size(dtype));
    if (s != DSMOE_OK) return kern_fail(x, s, "copy");
    return x->stream_ordered ? DSMOE_OK : drain(x); // a host-progressed collective is done on return
}

static const char *ordered_last_error(dsmoe_comm_ctx *ctx) {
    ordered_ctx *x = OCTX(ctx);
    return x->error[0] ? x->error : x->in->last_error(x->in_ctx);
}

// Everything else is the inner plugin's, with its context.
static dsmoe_status ordered_group_create(dsmoe_comm_ctx *ctx, const dsmoe_bootstrap *bs, dsmoe_comm_group **g) {
    return inner_fail(OCTX(ctx), OCTX(ctx)->in->group_create(OCTX(ctx)->in_ctx, bs, g));
}
static void ordered_group_destroy(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    OCTX(ctx)->in->group_destroy(OCTX(ctx)->in_ctx, g);
}
static dsmoe_status ordered_alltoall(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, void *recv,
                                     size_t bytes, const dsmoe_comm_stream *stream) {
    return inner_fail(OCTX(ctx), OCTX(ctx)->in->alltoall(OCTX(ctx)->in_ctx, g, send, recv, bytes, stream));
}
static dsmoe_status ordered_allgather(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, void *recv,
                                      size_t bytes, const dsmoe_comm_stream *stream) {
    return inner_fail(OCTX(ctx), OCTX(ctx)->in->allgather(OCTX(ctx)->in_ctx, g, send, recv, bytes, stream));
}
static dsmoe_status ordered_alltoallv(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *send, const size_t *sc,
                                      const size_t *sd, void *recv, const size_t *rc, const size_t *rd,
                                      const dsmoe_comm_stream *stream) {
    return inner_fail(OCTX(ctx), OCTX(ctx)->in->alltoallv(OCTX(ctx)->in_ctx, g, send, sc, sd, recv, rc, rd, stream));
}
static dsmoe_status ordered_broadcast(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, void *buf, size_t bytes, int root,
                                      const dsmoe_comm_stream *stream) {
    return inner_fail(OCTX(ctx), OCTX(ctx)->in->broadcast(OCTX(ctx)->in_ctx, g, buf, bytes, root, stream));
}
static dsmoe_status ordered_barrier(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    return inner_fail(OCTX(ctx), OCTX(ctx)->in->barrier(OCTX(ctx)->in_ctx, g));
}

static void ordered_finalize(dsmoe_comm_ctx *ctx) {
    ordered_ctx *x = OCTX(ctx);
    if (!x) return;
    if (x->kctx) {
        x->kern->synchronize(x->kctx);
        x->kern->free(x->kctx, x->rows);
        x->kern->event_destroy(x->kctx, x->ev);
    }
    if (x->in_ctx) x->in->finalize(x->in_ctx);
    free(x->host);
    free(x->counts);
    free(x);
}

// --- what the runtime calls ---------------------------------------------------------------------------

dsmoe_status dsmoe_comm_ordered_open(const dsmoe_comm_plugin_v2 *in, dsmoe_comm_ctx *in_ctx,
                                     const dsmoe_kernel_plugin_v3 *kern, dsmoe_kernel_ctx *kctx, dsmoe_kernel_queue *q,
                                     const dsmoe_comm_plugin_v2 **out, dsmoe_comm_ctx **out_ctx, dsmoe_err *err) {
    if (!in->alltoallv)
        return dsmoe_err_set(err, DSMOE_ERR_UNSUPPORTED,
                             "comm plugin '%s' does not declare DSMOE_CCAP_DETERMINISTIC and has no alltoallv, which "
                             "the core's fixed-order sums are built on; set run.fixed_order_sums = false to use its "
                             "own sums (not bitwise reproducible)", in->name);
    ordered_ctx *x = calloc(1, sizeof *x);
    if (!x) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "fixed-order sums for comm plugin '%s': out of memory", in->name);
    x->in = in;
    x->in_ctx = in_ctx;
    x->kern = kern;
    x->kctx = kctx;
    x->q = q;
    x->stream_ordered = (in->caps & DSMOE_CCAP_STREAM_ORDERED) != 0;
    dsmoe_status s = kern->event_create(kctx, &x->ev);
    if (s != DSMOE_OK) {
        free(x);
        return dsmoe_err_set(err, s, "fixed-order sums: kernel plugin '%s': event_create: %s", kern->name,
                             kern->last_error(kctx));
    }
    dsmoe_comm_plugin_v2 *t = &x->table;
    *t = *in;
    t->caps = (in->caps | DSMOE_CCAP_DETERMINISTIC) & ~(uint32_t)DSMOE_CCAP_NONBLOCKING;
    t->init = NULL; // the inner plugin is initialised already
    t->finalize = ordered_finalize;
    t->last_error = ordered_last_error;
    t->group_create = ordered_group_create;
    t->group_destroy = ordered_group_destroy;
    t->alltoall = ordered_alltoall;
    t->allreduce = ordered_allreduce;
    t->allgather = ordered_allgather;
    t->reduce_scatter = ordered_reduce_scatter;
    t->alltoallv = ordered_alltoallv;
    t->broadcast = in->broadcast ? ordered_broadcast : NULL;
    t->barrier = in->barrier ? ordered_barrier : NULL;
    t->allreduce_start = NULL;
    t->request_test = NULL;
    t->request_wait = NULL;
    *out = t;
    *out_ctx = (dsmoe_comm_ctx *)x;
    return DSMOE_OK;
}
