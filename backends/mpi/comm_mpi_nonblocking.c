// backends/mpi/comm_mpi_nonblocking.c: the non-blocking in-place allreduce of the "mpi" plugin
// (allreduce_start, request_test, request_wait; DSMOE_CCAP_NONBLOCKING). Not in "mpistream": a
// stream-ordered allreduce returns at once anyway.
//
// The result is bitwise the blocking allreduce's: the float sum runs as MPI_Ialltoallv of the chunks,
// then (when a test or wait sees it done) the rank-order sum of cm_reduce_in_rank_order and
// MPI_Iallgatherv; integers and MAX/MIN go through MPI_Iallreduce. Because the second phase starts
// whenever a rank happens to see the first finish, each outstanding request runs on its own dup of the
// group's communicator (g->pool), so collectives of different requests never match out of order.
#include <stdio.h>
#include <stdlib.h>

#include "comm_mpi.h" // the context, the group, the cm_* helpers

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
    size_t max_count = ctx->env.max_count;
    r->n = r->count - r->off < max_count ? r->count - r->off : max_count;
    char *dst = r->buf + r->off * r->esize;
    r->phase = 0;
    if (!r->fixed_order) {
        int rc = MPI_Iallreduce(MPI_IN_PLACE, dst, (int)r->n, r->type, r->mop, comm, &r->mreq);
        return rc == MPI_SUCCESS ? DSMOE_OK : cm_mpi_fail(&ctx->env, rc, "allreduce_start: MPI_Iallreduce");
    }
    int p = g->size, me = g->rank;
    int *cnt = r->iv, *dsp = cnt + p, *rcnt = dsp + p, *rdsp = rcnt + p;
    size_t n = r->n, len = cm_chunk_first(n, p, me + 1) - cm_chunk_first(n, p, me);
    for (int j = 0; j < p; j++) {
        size_t f = cm_chunk_first(n, p, j);
        cnt[j] = (int)(cm_chunk_first(n, p, j + 1) - f), dsp[j] = (int)f;
        rcnt[j] = (int)len, rdsp[j] = (int)((size_t)j * len);
    }
    size_t need = (size_t)p * len * r->esize;
    if (cm_grow(&r->scratch, &r->scratch_bytes, need))
        return cm_fail(&ctx->env, DSMOE_ERR_NOMEM, TAG "allreduce_start: out of memory for %zu bytes", need);
    int rc = MPI_Ialltoallv(dst, cnt, dsp, r->type, r->scratch, rcnt, rdsp, r->type, comm, &r->mreq);
    return rc == MPI_SUCCESS ? DSMOE_OK : cm_mpi_fail(&ctx->env, rc, "allreduce_start: MPI_Ialltoallv of the chunks");
}

// Called when the MPI request of the current phase has completed: moves to the next phase/piece.
static dsmoe_status request_advance(dsmoe_comm_ctx *ctx, dsmoe_comm_request *r) {
    if (r->fixed_order && r->phase == 0) {
        dsmoe_comm_group *g = r->g;
        int p = g->size;
        size_t first = cm_chunk_first(r->n, p, g->rank), len = cm_chunk_first(r->n, p, g->rank + 1) - first;
        char *mine = r->buf + (r->off + first) * r->esize;
        cm_reduce_in_rank_order(r->dtype, DSMOE_SUM, mine, r->scratch, len, p);
        int *cnt = r->iv, *dsp = cnt + p;
        int rc = MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, r->buf + r->off * r->esize, cnt, dsp, r->type,
                                 g->pool[r->slot], &r->mreq);
        if (rc != MPI_SUCCESS) return cm_mpi_fail(&ctx->env, rc, "request_test: MPI_Iallgatherv of the sums");
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

dsmoe_status cm_allreduce_start(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, void *buf, size_t count, dsmoe_dtype dtype,
                                dsmoe_reduce_op op, dsmoe_comm_request **req) {
    dsmoe_status s = cm_check_call(ctx, g, "allreduce_start", (count > 0 && !buf) || !req, 0, NULL);
    if (s == DSMOE_OK) s = cm_check_reduction(&ctx->env, "allreduce_start", dtype, op);
    if (s != DSMOE_OK) return s;
    *req = NULL;
    dsmoe_comm_request *r = calloc(1, sizeof *r);
    if (!r) return cm_fail(&ctx->env, DSMOE_ERR_NOMEM, TAG "allreduce_start: out of memory");
    r->g = g, r->slot = -1, r->buf = buf, r->count = count, r->dtype = dtype;
    cm_dtype_info(dtype, &r->type, &r->esize);
    cm_op_info(op, &r->mop);
    r->fixed_order = cm_is_float_sum(dtype, op);
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
            return cm_fail(&ctx->env, DSMOE_ERR_NOMEM, TAG "allreduce_start: out of memory");
        }
        int rc = MPI_Comm_dup(g->comm, &g->pool[slot]);
        if (rc != MPI_SUCCESS) {
            free(r);
            return cm_mpi_fail(&ctx->env, rc, "allreduce_start: MPI_Comm_dup for a request");
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
        return cm_fail(&ctx->env, DSMOE_ERR_NOMEM, TAG "allreduce_start: out of memory for %d ranks", g->size);
    }
    s = piece_start(ctx, r);
    if (s != DSMOE_OK) {
        request_free(r);
        return s;
    }
    *req = r;
    return DSMOE_OK;
}

dsmoe_status cm_request_test(dsmoe_comm_ctx *ctx, dsmoe_comm_request *r, int *done) {
    if (!ctx) return DSMOE_ERR_INVALID;
    if (!r || !done) return cm_fail(&ctx->env, DSMOE_ERR_INVALID, TAG "request_test: request or done is NULL");
    while (r->phase != 2) {
        int flag = 0;
        int rc = MPI_Test(&r->mreq, &flag, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) return cm_mpi_fail(&ctx->env, rc, "request_test: MPI_Test");
        if (!flag) break;
        dsmoe_status s = request_advance(ctx, r);
        if (s != DSMOE_OK) return s;
    }
    *done = r->phase == 2;
    return DSMOE_OK;
}

dsmoe_status cm_request_wait(dsmoe_comm_ctx *ctx, dsmoe_comm_request *r) {
    if (!r) return DSMOE_OK;
    if (!ctx) return DSMOE_ERR_INVALID;
    dsmoe_status s = DSMOE_OK;
    while (r->phase != 2) {
        int rc = MPI_Wait(&r->mreq, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            s = cm_mpi_fail(&ctx->env, rc, "request_wait: MPI_Wait");
            break;
        }
        s = request_advance(ctx, r);
        if (s != DSMOE_OK) break;
    }
    request_free(r);
    return s;
}
