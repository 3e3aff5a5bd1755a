// backends/mpi/comm_mpi.c: the "mpi" comm plugin: collectives on host memory over MPI.
//
// The core owns MPI_Init/Finalize. A group is an MPI_Comm_dup of the communicator the core hands us,
// with MPI_ERRORS_RETURN set on the dup, so every MPI failure on it comes back as a dsmoe_status and a
// last_error message built with MPI_Error_string. (Datatype calls are not tied to a communicator; their
// errors go to MPI's default handler, which the core owns. They fail only when MPI is out of memory.)
//
// Sizes are size_t in the ABI and int in MPI. A byte block larger than max_count (INT_MAX) travels as
// one element of a derived datatype of exactly that many bytes (the BigMPI trick); element-wise
// reductions are cut into pieces of at most max_count elements.
//
// Determinism: MPI_Allreduce's summation order depends on the algorithm the library picks (Open MPI's
// coll/tuned chooses recursive doubling, ring, Rabenseifner... by message size and group size; hcoll or
// ucc, MCA parameters or another MPI build choose differently), so float sums could change bits with
// the message size or the machine. Float SUM therefore does its own fixed-order reduction (see
// sum_fixed_order); integer sums and MAX/MIN are exact in any order and use MPI_Allreduce.
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "dsmoe/comm_plugin.h"

struct dsmoe_comm_ctx {
    size_t max_count; // largest count handed to MPI as an int: INT_MAX, or DSMOE_COMM_MPI_MAX_COUNT (tests)
    char error[1024]; // last_error()
};

struct dsmoe_comm_group {
    MPI_Comm comm;     // our dup of the caller's communicator, MPI_ERRORS_RETURN
    int rank, size;
    int *iv;           // (4, size) int counts/displacements for MPI's v-collectives
    void *scratch;     // sum_fixed_order: (size, chunk) contributions to this rank's chunk
    size_t scratch_bytes;
    // Non-blocking allreduces: each outstanding request runs on its own dup of comm, so that the
    // second phase of one (started whenever a rank sees the first phase done, which differs from
    // rank to rank) never meets another request's collective out of order. Slot k is taken at
    // start and given back at wait; both happen in the same order on every rank, so every rank
    // picks the same slot. Dups are made lazily (collective, at a start every rank makes).
    MPI_Comm *pool;
    unsigned char *pool_busy;
    int pool_len;
};

static dsmoe_status fail(dsmoe_comm_ctx *ctx, dsmoe_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static dsmoe_status fail(dsmoe_comm_ctx *ctx, dsmoe_status status, const char *fmt, ...) {
    if (!ctx) return status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
    return status;
}

// Turns an MPI error code into last_error: "<what> failed: <MPI's message>".
static dsmoe_status mpi_fail(dsmoe_comm_ctx *ctx, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "MPI error code %d", rc);
    return fail(ctx, DSMOE_ERR_SYSTEM, "comm mpi: %s failed: %s", what, msg);
}

// Checks the arguments every collective shares: a context, a group, and buffers where bytes move.
static dsmoe_status check_call(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const char *op, int missing_buffer) {
    if (!ctx) return DSMOE_ERR_INVALID;
    if (!g) return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: %s: group is NULL", op);
    if (missing_buffer) return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: %s: a buffer is NULL but the size is not 0", op);
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// byte blocks of any size

// `bytes` contiguous bytes as (count, type): (bytes, MPI_BYTE) up to max_count, else one element of a
// committed derived type whose size and extent are `bytes` (release with byte_msg_free).
typedef struct byte_msg {
    int count;
    MPI_Datatype type;
} byte_msg;

static int byte_msg_make(size_t bytes, size_t max_count, byte_msg *m) {
    m->count = (int)bytes;
    m->type = MPI_BYTE;
    if (bytes <= max_count) return MPI_SUCCESS;
    size_t q = bytes / max_count, r = bytes % max_count;
    if (q > INT_MAX) return MPI_ERR_COUNT;
    MPI_Datatype chunk, blocks, whole;
    int rc = MPI_Type_contiguous((int)max_count, MPI_BYTE, &chunk);
    if (rc != MPI_SUCCESS) return rc;
    rc = MPI_Type_contiguous((int)q, chunk, &blocks); // q * max_count bytes
    MPI_Type_free(&chunk);
    if (rc != MPI_SUCCESS) return rc;
    if (r == 0) {
        whole = blocks;
    } else { // blocks, then the r remaining bytes right after them
        int lens[2] = {1, (int)r};
        MPI_Aint displs[2] = {0, (MPI_Aint)(q * max_count)};
        MPI_Datatype types[2] = {blocks, MPI_BYTE};
        rc = MPI_Type_create_struct(2, lens, displs, types, &whole);
        MPI_Type_free(&blocks);
        if (rc != MPI_SUCCESS) return rc;
    }
    rc = MPI_Type_commit(&whole);
    if (rc != MPI_SUCCESS) {
        MPI_Type_free(&whole);
        return rc;
    }
    m->count = 1;
    m->type = whole;
    return MPI_SUCCESS;
}

static void byte_msg_free(byte_msg *m) {
    if (m->type != MPI_BYTE) MPI_Type_free(&m->type);
    m->type = MPI_BYTE;
}

// ------------------------------------------------------------------------------------------------
// lifecycle and groups

static dsmoe_status mpi_init(dsmoe_comm_ctx **ctx, char *errbuf, size_t errlen) {
    *ctx = NULL;
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized) {
        snprintf(errbuf, errlen, "comm mpi: init: MPI is %s; the core must call MPI_Init before comm init",
                 finalized ? "already finalized" : "not initialised");
        return DSMOE_ERR_INVALID;
    }
    size_t max_count = INT_MAX;
    // Test knob: a small limit sends small messages through the large-message paths.
    const char *knob = getenv("DSMOE_COMM_MPI_MAX_COUNT");
    if (knob && *knob) {
        char *end;
        unsigned long long v = strtoull(knob, &end, 10);
        if (*end || v < 1 || v > INT_MAX) {
            snprintf(errbuf, errlen, "comm mpi: init: DSMOE_COMM_MPI_MAX_COUNT='%s' is not an integer in [1, %d]",
                     knob, INT_MAX);
            return DSMOE_ERR_INVALID;
        }
        max_count = (size_t)v;
    }
    dsmoe_comm_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(errbuf, errlen, "comm mpi: init: out of memory");
        return DSMOE_ERR_NOMEM;
    }
    c->max_count = max_count;
    *ctx = c;
    return DSMOE_OK;
}

static void mpi_finalize(dsmoe_comm_ctx *ctx) { free(ctx); }

static const char *mpi_last_error(dsmoe_comm_ctx *ctx) { return ctx ? ctx->error : "comm mpi: no context"; }

static void group_free(dsmoe_comm_group *g) {
    free(g->iv);
    free(g->scratch);
    free(g);
}

static dsmoe_status mpi_group_create(dsmoe_comm_ctx *ctx, MPI_Comm comm, dsmoe_comm_group **group) {
    if (!ctx) return DSMOE_ERR_INVALID;
    if (!group) return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: group_create: group is NULL");
    *group = NULL;
    if (comm == MPI_COMM_NULL) return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: group_create: comm is MPI_COMM_NULL");
    dsmoe_comm_group *g = calloc(1, sizeof *g);
    if (!g) return fail(ctx, DSMOE_ERR_NOMEM, "comm mpi: group_create: out of memory");
    int rc = MPI_Comm_dup(comm, &g->comm);
    if (rc != MPI_SUCCESS) {
        free(g);
        return mpi_fail(ctx, rc, "group_create: MPI_Comm_dup");
    }
    rc = MPI_Comm_set_errhandler(g->comm, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(g->comm, &g->rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(g->comm, &g->size);
    if (rc != MPI_SUCCESS) {
        MPI_Comm_free(&g->comm);
        group_free(g);
        return mpi_fail(ctx, rc, "group_create: setting up the duplicated communicator");
    }
    g->iv = malloc(4 * (size_t)g->size * sizeof *g->iv);
    if (!g->iv) {
        int n = g->size;
        MPI_Comm_free(&g->comm);
        group_free(g);
        return fail(ctx, DSMOE_ERR_NOMEM, "comm mpi: group_create: out of memory for %d ranks", n);
    }
    *group = g;
    return DSMOE_OK;
}

static void mpi_group_destroy(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    if (!g) return;
    for (int k = 0; k < g->pool_len; k++) MPI_Comm_free(&g->pool[k]);
    free(g->pool);
    free(g->pool_busy);
    MPI_Comm_free(&g->comm);
    group_free(g);
}

static int mpi_group_rank(const dsmoe_comm_group *g) { return g ? g->rank : -1; }
static int mpi_group_size(const dsmoe_comm_group *g) { return g ? g->size : 0; }

// ------------------------------------------------------------------------------------------------
// data movement

static dsmoe_status mpi_alltoall(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                 size_t bytes) {
    dsmoe_status s = check_call(ctx, g, "alltoall", bytes > 0 && (!sendbuf || !recvbuf));
    if (s != DSMOE_OK) return s;
    byte_msg m;
    int rc = byte_msg_make(bytes, ctx->max_count, &m);
    if (rc == MPI_SUCCESS) rc = MPI_Alltoall(sendbuf, m.count, m.type, recvbuf, m.count, m.type, g->comm);
    byte_msg_free(&m);
    if (rc != MPI_SUCCESS) {
        char what[128];
        snprintf(what, sizeof what, "MPI_Alltoall of %zu bytes per rank over %d ranks", bytes, g->size);
        return mpi_fail(ctx, rc, what);
    }
    return DSMOE_OK;
}

// One pairwise exchange per step: at step k send to rank+k and receive from rank-k, so every pair meets
// exactly once; each side describes its block on its own (MPI matches type signatures, not types).
static int alltoallv_pairwise(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const char *send, const size_t *scounts,
                              const size_t *sdispls, char *recv, const size_t *rcounts, const size_t *rdispls) {
    int rc = MPI_SUCCESS;
    for (int k = 0; k < g->size && rc == MPI_SUCCESS; k++) {
        int dst = (g->rank + k) % g->size, src = (g->rank - k + g->size) % g->size;
        byte_msg sm = {0, MPI_BYTE}, rm = {0, MPI_BYTE};
        rc = byte_msg_make(scounts[dst], ctx->max_count, &sm);
        if (rc == MPI_SUCCESS) rc = byte_msg_make(rcounts[src], ctx->max_count, &rm);
        if (rc == MPI_SUCCESS)
            rc = MPI_Sendrecv(scounts[dst] ? send + sdispls[dst] : send, sm.count, sm.type, dst, 0,
                              rcounts[src] ? recv + rdispls[src] : recv, rm.count, rm.type, src, 0, g->comm,
                              MPI_STATUS_IGNORE);
        byte_msg_free(&sm);
        byte_msg_free(&rm);
    }
    return rc;
}

static dsmoe_status mpi_alltoallv(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf,
                                  const size_t *sendcounts, const size_t *sdispls, void *recvbuf,
                                  const size_t *recvcounts, const size_t *rdispls) {
    dsmoe_status s = check_call(ctx, g, "alltoallv", 0);
    if (s != DSMOE_OK) return s;
    if (!sendcounts || !sdispls || !recvcounts || !rdispls)
        return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: alltoallv: a count or displacement array is NULL");
    size_t sent = 0, received = 0;
    int fits = 1;
    for (int j = 0; j < g->size; j++) {
        sent += sendcounts[j];
        received += recvcounts[j];
        fits &= sendcounts[j] <= ctx->max_count && sdispls[j] <= ctx->max_count &&
                recvcounts[j] <= ctx->max_count && rdispls[j] <= ctx->max_count;
    }
    if ((sent && !sendbuf) || (received && !recvbuf))
        return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: alltoallv: a buffer is NULL but its counts are not all 0");
    // Every rank must take the same path (MPI_Alltoallv on one rank never matches MPI_Sendrecv on
    // another) but each sees only its own counts: agree with one int.
    int rc = g->size > 1 ? MPI_Allreduce(MPI_IN_PLACE, &fits, 1, MPI_INT, MPI_MIN, g->comm) : MPI_SUCCESS;
    const char *what = "MPI_Allreduce agreeing the alltoallv path";
    if (rc == MPI_SUCCESS && fits) {
        int *sc = g->iv, *sd = sc + g->size, *rcn = sd + g->size, *rd = rcn + g->size;
        for (int j = 0; j < g->size; j++) {
            sc[j] = (int)sendcounts[j], sd[j] = (int)sdispls[j];
            rcn[j] = (int)recvcounts[j], rd[j] = (int)rdispls[j];
        }
        what = "MPI_Alltoallv";
        rc = MPI_Alltoallv(sendbuf, sc, sd, MPI_BYTE, recvbuf, rcn, rd, MPI_BYTE, g->comm);
    } else if (rc == MPI_SUCCESS) {
        what = "pairwise MPI_Sendrecv (alltoallv with counts or displacements above INT_MAX)";
        rc = alltoallv_pairwise(ctx, g, sendbuf, sendcounts, sdispls, recvbuf, recvcounts, rdispls);
    }
    if (rc != MPI_SUCCESS) {
        char msg[256];
        snprintf(msg, sizeof msg, "alltoallv: %s (%zu bytes out, %zu in, %d ranks)", what, sent, received, g->size);
        return mpi_fail(ctx, rc, msg);
    }
    return DSMOE_OK;
}

static dsmoe_status mpi_allgather(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                  size_t bytes) {
    dsmoe_status s = check_call(ctx, g, "allgather", bytes > 0 && (!sendbuf || !recvbuf));
    if (s != DSMOE_OK) return s;
    byte_msg m;
    int rc = byte_msg_make(bytes, ctx->max_count, &m);
    if (rc == MPI_SUCCESS) rc = MPI_Allgather(sendbuf, m.count, m.type, recvbuf, m.count, m.type, g->comm);
    byte_msg_free(&m);
    if (rc != MPI_SUCCESS) {
        char what[128];
        snprintf(what, sizeof what, "MPI_Allgather of %zu bytes per rank over %d ranks", bytes, g->size);
        return mpi_fail(ctx, rc, what);
    }
    return DSMOE_OK;
}

static dsmoe_status mpi_broadcast(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, void *buf, size_t bytes, int root) {
    dsmoe_status s = check_call(ctx, g, "broadcast", bytes > 0 && !buf);
    if (s != DSMOE_OK) return s;
    if (root < 0 || root >= g->size)
        return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: broadcast: root %d is not a rank of this group of %d", root,
                    g->size);
    byte_msg m;
    int rc = byte_msg_make(bytes, ctx->max_count, &m);
    if (rc == MPI_SUCCESS) rc = MPI_Bcast(buf, m.count, m.type, root, g->comm);
    byte_msg_free(&m);
    if (rc != MPI_SUCCESS) {
        char what[128];
        snprintf(what, sizeof what, "MPI_Bcast of %zu bytes from root %d over %d ranks", bytes, root, g->size);
        return mpi_fail(ctx, rc, what);
    }
    return DSMOE_OK;
}

static dsmoe_status mpi_barrier(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    dsmoe_status s = check_call(ctx, g, "barrier", 0);
    if (s != DSMOE_OK) return s;
    int rc = MPI_Barrier(g->comm);
    return rc == MPI_SUCCESS ? DSMOE_OK : mpi_fail(ctx, rc, "MPI_Barrier");
}

// ------------------------------------------------------------------------------------------------
// reductions

// Element i of chunk j of an n-vector split over p ranks: chunk j starts at chunk_first(n, p, j).
static size_t chunk_first(size_t n, int p, int j) {
    return (size_t)j * (n / (size_t)p) + ((size_t)j < n % (size_t)p ? (size_t)j : n % (size_t)p);
}

// acc (len) = c[0] + c[1] + ... + c[p-1], added in that order; c is (p, len).
#define DEFINE_ADD_IN_RANK_ORDER(T)                                                                \
    static void add_in_rank_order_##T(T *acc, const T *c, size_t len, int p) {                     \
        for (size_t i = 0; i < len; i++) acc[i] = c[i];                                            \
        for (int q = 1; q < p; q++)                                                                \
            for (size_t i = 0; i < len; i++) acc[i] += c[(size_t)q * len + i];                     \
    }
DEFINE_ADD_IN_RANK_ORDER(float)
DEFINE_ADD_IN_RANK_ORDER(double)

// Float SUM whose bits do not depend on the MPI library: chunk j of the vector is owned by rank j.
// Every rank sends its chunk j to rank j (MPI_Alltoallv), the owner adds the p contributions in rank
// order ((x0 + x1) + x2) + ..., and MPI_Allgatherv hands the summed chunks to everyone. Each element
// is summed once, in one fixed order, so every rank gets the same bits, run after run, whatever
// algorithm MPI picks. Traffic is about 2n elements per rank, as for a ring allreduce.
// src (n) is NULL for in place (the data is in dst); n <= max_count <= INT_MAX.
static dsmoe_status sum_fixed_order(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *src, void *dst,
                                    size_t n, MPI_Datatype type, size_t esize, dsmoe_dtype dtype) {
    int p = g->size, me = g->rank;
    int *cnt = g->iv, *dsp = cnt + p, *rcnt = dsp + p, *rdsp = rcnt + p;
    size_t first = chunk_first(n, p, me), len = chunk_first(n, p, me + 1) - first;
    for (int j = 0; j < p; j++) {
        size_t f = chunk_first(n, p, j);
        cnt[j] = (int)(chunk_first(n, p, j + 1) - f), dsp[j] = (int)f;
        rcnt[j] = (int)len, rdsp[j] = (int)((size_t)j * len); // (p, len) contributions, by source rank
    }
    size_t need = (size_t)p * len * esize;
    if (need > g->scratch_bytes) {
        void *grown = realloc(g->scratch, need);
        if (!grown) return fail(ctx, DSMOE_ERR_NOMEM, "comm mpi: allreduce: out of memory for %zu bytes", need);
        g->scratch = grown, g->scratch_bytes = need;
    }
    int rc = MPI_Alltoallv(src ? src : dst, cnt, dsp, type, g->scratch, rcnt, rdsp, type, g->comm);
    if (rc != MPI_SUCCESS) return mpi_fail(ctx, rc, "allreduce (fixed-order sum): MPI_Alltoallv of the chunks");
    char *mine = (char *)dst + first * esize; // the alltoallv is done: dst may now be overwritten
    if (dtype == DSMOE_FLOAT32) add_in_rank_order_float((float *)mine, g->scratch, len, p);
    else add_in_rank_order_double((double *)mine, g->scratch, len, p);
    rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, dst, cnt, dsp, type, g->comm);
    if (rc != MPI_SUCCESS) return mpi_fail(ctx, rc, "allreduce (fixed-order sum): MPI_Allgatherv of the sums");
    return DSMOE_OK;
}

static int dtype_info(dsmoe_dtype dtype, MPI_Datatype *type, size_t *esize) {
    switch (dtype) {
    case DSMOE_FLOAT32: *type = MPI_FLOAT, *esize = 4; return 1;
    case DSMOE_FLOAT64: *type = MPI_DOUBLE, *esize = 8; return 1;
    case DSMOE_INT32: *type = MPI_INT32_T, *esize = 4; return 1;
    case DSMOE_INT64: *type = MPI_INT64_T, *esize = 8; return 1;
    case DSMOE_UINT8: *type = MPI_UINT8_T, *esize = 1; return 1;
    }
    return 0;
}

static int op_info(dsmoe_reduce_op op, MPI_Op *mop) {
    switch (op) {
    case DSMOE_SUM: *mop = MPI_SUM; return 1;
    case DSMOE_MAX: *mop = MPI_MAX; return 1;
    case DSMOE_MIN: *mop = MPI_MIN; return 1;
    }
    return 0;
}

static dsmoe_status mpi_allreduce(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                  size_t count, dsmoe_dtype dtype, dsmoe_reduce_op op) {
    dsmoe_status s = check_call(ctx, g, "allreduce", count > 0 && (!sendbuf || !recvbuf));
    if (s != DSMOE_OK) return s;
    MPI_Datatype type;
    size_t esize;
    MPI_Op mop;
    if (!dtype_info(dtype, &type, &esize))
        return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: allreduce: unknown dtype %d", (int)dtype);
    if (!op_info(op, &mop)) return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: allreduce: unknown op %d", (int)op);
    int in_place = sendbuf == DSMOE_IN_PLACE;
    int fixed_order = op == DSMOE_SUM && (dtype == DSMOE_FLOAT32 || dtype == DSMOE_FLOAT64);
    // Element-wise, so pieces of at most max_count elements give the same result as one call.
    for (size_t off = 0; off < count; off += ctx->max_count) {
        size_t n = count - off < ctx->max_count ? count - off : ctx->max_count;
        const char *src = in_place ? NULL : (const char *)sendbuf + off * esize;
        char *dst = (char *)recvbuf + off * esize;
        if (fixed_order) {
            s = sum_fixed_order(ctx, g, src, dst, n, type, esize, dtype);
            if (s != DSMOE_OK) return s;
            continue;
        }
        int rc = MPI_Allreduce(src ? (const void *)src : MPI_IN_PLACE, dst, (int)n, type, mop, g->comm);
        if (rc != MPI_SUCCESS) {
            char what[128];
            snprintf(what, sizeof what, "MPI_Allreduce of %zu elements over %d ranks", n, g->size);
            return mpi_fail(ctx, rc, what);
        }
    }
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// non-blocking allreduce

// One in-place allreduce in flight. The vector goes in pieces of at most max_count elements, one
// after the other (as the blocking path does); a fixed-order float sum piece has two phases.
struct dsmoe_comm_request {
    dsmoe_comm_group *g;
    int slot;          // index into g->pool
    char *buf;         // (count) in place
    size_t count, off, n, esize; // current piece is [off, off + n)
    MPI_Datatype type;
    MPI_Op mop;
    dsmoe_dtype dtype;
    int fixed_order;
    int phase;         // 0: Ialltoallv (or Iallreduce) in flight, 1: Iallgatherv in flight, 2: done
    MPI_Request mreq;
    int *iv;           // (4, size) counts/displacements; MPI reads them until the call completes
    void *scratch;     // (size, chunk) contributions to this rank's chunk
    size_t scratch_bytes;
};

static void request_free(dsmoe_comm_request *r) {
    if (!r) return;
    if (r->slot >= 0) r->g->pool_busy[r->slot] = 0;
    free(r->iv);
    free(r->scratch);
    free(r);
}

// Starts the piece at r->off (phase 0).
static dsmoe_status piece_start(dsmoe_comm_ctx *ctx, dsmoe_comm_request *r) {
    dsmoe_comm_group *g = r->g;
    MPI_Comm comm = g->pool[r->slot];
    r->n = r->count - r->off < ctx->max_count ? r->count - r->off : ctx->max_count;
    char *dst = r->buf + r->off * r->esize;
    r->phase = 0;
    if (!r->fixed_order) {
        int rc = MPI_Iallreduce(MPI_IN_PLACE, dst, (int)r->n, r->type, r->mop, comm, &r->mreq);
        return rc == MPI_SUCCESS ? DSMOE_OK : mpi_fail(ctx, rc, "allreduce_start: MPI_Iallreduce");
    }
    int p = g->size, me = g->rank;
    int *cnt = r->iv, *dsp = cnt + p, *rcnt = dsp + p, *rdsp = rcnt + p;
    size_t n = r->n, len = chunk_first(n, p, me + 1) - chunk_first(n, p, me);
    for (int j = 0; j < p; j++) {
        size_t f = chunk_first(n, p, j);
        cnt[j] = (int)(chunk_first(n, p, j + 1) - f), dsp[j] = (int)f;
        rcnt[j] = (int)len, rdsp[j] = (int)((size_t)j * len);
    }
    size_t need = (size_t)p * len * r->esize;
    if (need > r->scratch_bytes) {
        void *grown = realloc(r->scratch, need);
        if (!grown) return fail(ctx, DSMOE_ERR_NOMEM, "comm mpi: allreduce_start: out of memory for %zu bytes", need);
        r->scratch = grown, r->scratch_bytes = need;
    }
    int rc = MPI_Ialltoallv(dst, cnt, dsp, r->type, r->scratch, rcnt, rdsp, r->type, comm, &r->mreq);
    return rc == MPI_SUCCESS ? DSMOE_OK : mpi_fail(ctx, rc, "allreduce_start: MPI_Ialltoallv of the chunks");
}

// Called when the MPI request of the current phase has completed: moves to the next phase/piece.
static dsmoe_status request_advance(dsmoe_comm_ctx *ctx, dsmoe_comm_request *r) {
    if (r->fixed_order && r->phase == 0) {
        dsmoe_comm_group *g = r->g;
        int p = g->size;
        size_t first = chunk_first(r->n, p, g->rank), len = chunk_first(r->n, p, g->rank + 1) - first;
        char *mine = r->buf + (r->off + first) * r->esize;
        if (r->dtype == DSMOE_FLOAT32) add_in_rank_order_float((float *)mine, r->scratch, len, p);
        else add_in_rank_order_double((double *)mine, r->scratch, len, p);
        int *cnt = r->iv, *dsp = cnt + p;
        int rc = MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, r->buf + r->off * r->esize, cnt, dsp, r->type,
                                 g->pool[r->slot], &r->mreq);
        if (rc != MPI_SUCCESS) return mpi_fail(ctx, rc, "request_test: MPI_Iallgatherv of the sums");
        r->phase = 1;
        return DSMOE_OK;
    }
    r->off += r->n;
    if (r->off >= r->count) {
        r->phase = 2;
        return DSMOE_OK;
    }
    return piece_start(ctx, r);
}

static dsmoe_status mpi_allreduce_start(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, void *buf, size_t count,
                                        dsmoe_dtype dtype, dsmoe_reduce_op op, dsmoe_comm_request **req) {
    dsmoe_status s = check_call(ctx, g, "allreduce_start", (count > 0 && !buf) || !req);
    if (s != DSMOE_OK) return s;
    *req = NULL;
    dsmoe_comm_request *r = calloc(1, sizeof *r);
    if (!r) return fail(ctx, DSMOE_ERR_NOMEM, "comm mpi: allreduce_start: out of memory");
    r->g = g, r->slot = -1, r->buf = buf, r->count = count, r->dtype = dtype;
    if (!dtype_info(dtype, &r->type, &r->esize)) {
        free(r);
        return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: allreduce_start: unknown dtype %d", (int)dtype);
    }
    if (!op_info(op, &r->mop)) {
        free(r);
        return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: allreduce_start: unknown op %d", (int)op);
    }
    r->fixed_order = op == DSMOE_SUM && (dtype == DSMOE_FLOAT32 || dtype == DSMOE_FLOAT64);
    if (count == 0) { // nothing moves, so no collective: every rank agrees on count
        r->phase = 2;
        *req = r;
        return DSMOE_OK;
    }
    int slot = 0;
    while (slot < g->pool_len && g->pool_busy[slot]) slot++;
    if (slot == g->pool_len) {
        MPI_Comm *pool = realloc(g->pool, (size_t)(slot + 1) * sizeof *pool);
        if (pool) g->pool = pool;
        unsigned char *busy = realloc(g->pool_busy, (size_t)(slot + 1));
        if (busy) g->pool_busy = busy;
        if (!pool || !busy) {
            free(r);
            return fail(ctx, DSMOE_ERR_NOMEM, "comm mpi: allreduce_start: out of memory");
        }
        int rc = MPI_Comm_dup(g->comm, &g->pool[slot]);
        if (rc != MPI_SUCCESS) {
            free(r);
            return mpi_fail(ctx, rc, "allreduce_start: MPI_Comm_dup for a request");
        }
        MPI_Comm_set_errhandler(g->pool[slot], MPI_ERRORS_RETURN);
        g->pool_busy[slot] = 0;
        g->pool_len = slot + 1;
    }
    g->pool_busy[slot] = 1;
    r->slot = slot;
    r->iv = malloc(4 * (size_t)g->size * sizeof *r->iv);
    if (!r->iv) {
        request_free(r);
        return fail(ctx, DSMOE_ERR_NOMEM, "comm mpi: allreduce_start: out of memory for %d ranks", g->size);
    }
    s = piece_start(ctx, r);
    if (s != DSMOE_OK) {
        request_free(r);
        return s;
    }
    *req = r;
    return DSMOE_OK;
}

static dsmoe_status mpi_request_test(dsmoe_comm_ctx *ctx, dsmoe_comm_request *r, int *done) {
    if (!ctx) return DSMOE_ERR_INVALID;
    if (!r || !done) return fail(ctx, DSMOE_ERR_INVALID, "comm mpi: request_test: request or done is NULL");
    while (r->phase != 2) {
        int flag = 0;
        int rc = MPI_Test(&r->mreq, &flag, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) return mpi_fail(ctx, rc, "request_test: MPI_Test");
        if (!flag) break;
        dsmoe_status s = request_advance(ctx, r);
        if (s != DSMOE_OK) return s;
    }
    *done = r->phase == 2;
    return DSMOE_OK;
}

static dsmoe_status mpi_request_wait(dsmoe_comm_ctx *ctx, dsmoe_comm_request *r) {
    if (!r) return DSMOE_OK;
    dsmoe_status s = DSMOE_OK;
    while (r->phase != 2) {
        int rc = MPI_Wait(&r->mreq, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            s = mpi_fail(ctx, rc, "request_wait: MPI_Wait");
            break;
        }
        s = request_advance(ctx, r);
        if (s != DSMOE_OK) break;
    }
    request_free(r);
    return s;
}

// ------------------------------------------------------------------------------------------------
// the table

static const dsmoe_comm_plugin_v1 mpi_plugin = {
    .api_version = DSMOE_COMM_API_VERSION,
    .name = "mpi",
    .description = "MPI collectives on host memory (float sums in fixed rank order)",
    .mem_kinds = DSMOE_MEM_HOST,
    .init = mpi_init,
    .finalize = mpi_finalize,
    .last_error = mpi_last_error,
    .group_create = mpi_group_create,
    .group_destroy = mpi_group_destroy,
    .group_rank = mpi_group_rank,
    .group_size = mpi_group_size,
    .alltoall = mpi_alltoall,
    .alltoallv = mpi_alltoallv,
    .allreduce = mpi_allreduce,
    .allgather = mpi_allgather,
    .broadcast = mpi_broadcast,
    .barrier = mpi_barrier,
    .allreduce_start = mpi_allreduce_start,
    .request_test = mpi_request_test,
    .request_wait = mpi_request_wait,
};

DSMOE_PLUGIN_EXPORT const dsmoe_comm_plugin_v1 *DSMOE_COMM_PLUGIN_ENTRY(void) { return &mpi_plugin; }
