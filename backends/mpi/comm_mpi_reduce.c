// backends/mpi/comm_mpi_reduce.c: the reductions of the mpi comm plugin (comm_mpi.c explains the plugin):
// float sums in one fixed rank order, whatever algorithm MPI would pick, so that allreduce and
// reduce_scatter give the same bits on every rank and from run to run; other dtypes and ops through MPI.
// The CUDA-aware build ("mpi_cuda") may not add on the host (its buffers may be device memory): every
// reduction is MPI's own there, and the core puts its fixed-order float sums in front.
// defines: cm_chunk_first, cm_reduce_in_rank_order, cm_dtype_info, cm_op_info, cm_is_float_sum,
//          cm_check_reduction, cm_do_allreduce, cm_do_reduce_scatter
#include <mpi.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_mpi.h"

// Element i of chunk j of an n-vector split over p ranks: chunk j starts at cm_chunk_first(n, p, j).
size_t cm_chunk_first(size_t n, int p, int j) {
    return (size_t)j * (n / (size_t)p) + ((size_t)j < n % (size_t)p ? (size_t)j : n % (size_t)p);
}

// acc (len) = c[0] op c[1] op ... op c[p-1], applied in that order; c is (p, len), by source rank.
// This is THE order of this plugin's float sums: allreduce and reduce_scatter both reduce through it.
// Integer sums wrap (computed in the unsigned type U), as MPI_SUM does in practice.
// It goes through acc in tiles of REDUCE_TILE elements summed in a local buffer, so acc (the caller's
// buffer, which a kernel may be writing next to: the gradient slab while another block's backward runs)
// is written once and never read, and the loops over a tile have no aliasing to rule out (they
// vectorize); each element still sums in rank order, so the bits do not change.
#define REDUCE_TILE 512
#define DEFINE_REDUCE_IN_RANK_ORDER(T, U)                                                          \
    static void reduce_in_rank_order_##T(T *restrict acc, const T *restrict c, size_t len, int p,  \
                                         dsmoe_reduce_op op) {                                     \
        T t[REDUCE_TILE];                                                                          \
        for (size_t i0 = 0; i0 < len; i0 += REDUCE_TILE) {                                         \
            size_t m = len - i0 < REDUCE_TILE ? len - i0 : REDUCE_TILE;                            \
            memcpy(t, c + i0, m * sizeof(T));                                                      \
            for (int q = 1; q < p; q++) {                                                          \
                const T *restrict x = c + (size_t)q * len + i0;                                    \
                if (op == DSMOE_SUM)                                                               \
                    for (size_t i = 0; i < m; i++) t[i] = (T)((U)t[i] + (U)x[i]);                  \
                else if (op == DSMOE_MAX)                                                          \
                    for (size_t i = 0; i < m; i++) t[i] = x[i] > t[i] ? x[i] : t[i];               \
                else                                                                               \
                    for (size_t i = 0; i < m; i++) t[i] = x[i] < t[i] ? x[i] : t[i];               \
            }                                                                                      \
            memcpy(acc + i0, t, m * sizeof(T));                                                    \
        }                                                                                          \
    }
DEFINE_REDUCE_IN_RANK_ORDER(float, float)
DEFINE_REDUCE_IN_RANK_ORDER(double, double)
DEFINE_REDUCE_IN_RANK_ORDER(int32_t, uint32_t)
DEFINE_REDUCE_IN_RANK_ORDER(int64_t, uint64_t)
DEFINE_REDUCE_IN_RANK_ORDER(uint8_t, uint32_t)

void cm_reduce_in_rank_order(dsmoe_dtype dtype, dsmoe_reduce_op op, void *acc, const void *c, size_t len, int p) {
    if (len == 0) return; // nothing to reduce, and c may be NULL (an empty chunk needs no scratch)
    switch (dtype) {
    case DSMOE_FLOAT32: reduce_in_rank_order_float(acc, c, len, p, op); break;
    case DSMOE_FLOAT64: reduce_in_rank_order_double(acc, c, len, p, op); break;
    case DSMOE_INT32: reduce_in_rank_order_int32_t(acc, c, len, p, op); break;
    case DSMOE_INT64: reduce_in_rank_order_int64_t(acc, c, len, p, op); break;
    case DSMOE_UINT8: reduce_in_rank_order_uint8_t(acc, c, len, p, op); break;
    default: break; // refused by check_reduction
    }
}

#ifndef COMM_MPI_CUDA_AWARE
// Float SUM whose bits do not depend on the MPI library: chunk j of the vector is owned by rank j.
// Every rank sends its chunk j to rank j (MPI_Alltoallv), the owner adds the p contributions in rank
// order ((x0 + x1) + x2) + ..., and MPI_Allgatherv hands the summed chunks to everyone. Each element
// is summed once, in one fixed order, so every rank gets the same bits, run after run, whatever
// algorithm MPI picks. Traffic is about 2n elements per rank, as for a ring allreduce.
// src (n) is NULL for in place (the data is in dst); n <= max_count <= INT_MAX.
static dsmoe_status sum_fixed_order(mpi_env *e, dsmoe_comm_group *g, const void *src, void *dst, size_t n,
                                    MPI_Datatype type, size_t esize, dsmoe_dtype dtype) {
    int p = g->size, me = g->rank;
    int *cnt = g->iv, *dsp = cnt + p, *rcnt = dsp + p, *rdsp = rcnt + p;
    size_t first = cm_chunk_first(n, p, me), len = cm_chunk_first(n, p, me + 1) - first;
    for (int j = 0; j < p; j++) {
        size_t f = cm_chunk_first(n, p, j);
        cnt[j] = (int)(cm_chunk_first(n, p, j + 1) - f), dsp[j] = (int)f;
        rcnt[j] = (int)len, rdsp[j] = (int)((size_t)j * len); // (p, len) contributions, by source rank
    }
    size_t need = (size_t)p * len * esize;
    if (cm_grow(&g->scratch, &g->scratch_bytes, need))
        return cm_fail(e, DSMOE_ERR_NOMEM, TAG "allreduce: out of memory for %zu bytes", need);
    int rc = MPI_Alltoallv(src ? src : dst, cnt, dsp, type, g->scratch, rcnt, rdsp, type, g->comm);
    if (rc != MPI_SUCCESS) return cm_mpi_fail(e, rc, "allreduce (fixed-order sum): MPI_Alltoallv of the chunks");
    char *mine = (char *)dst + first * esize; // the alltoallv is done: dst may now be overwritten
    cm_reduce_in_rank_order(dtype, DSMOE_SUM, mine, g->scratch, len, p);
    rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, dst, cnt, dsp, type, g->comm);
    if (rc != MPI_SUCCESS) return cm_mpi_fail(e, rc, "allreduce (fixed-order sum): MPI_Allgatherv of the sums");
    return DSMOE_OK;
}
#endif

int cm_dtype_info(dsmoe_dtype dtype, MPI_Datatype *type, size_t *esize) {
    switch (dtype) {
    case DSMOE_FLOAT32: *type = MPI_FLOAT, *esize = 4; return 1;
    case DSMOE_FLOAT64: *type = MPI_DOUBLE, *esize = 8; return 1;
    case DSMOE_INT32: *type = MPI_INT32_T, *esize = 4; return 1;
    case DSMOE_INT64: *type = MPI_INT64_T, *esize = 8; return 1;
    case DSMOE_UINT8: *type = MPI_UINT8_T, *esize = 1; return 1;
    default: return 0; // bfloat16 and float16: host MPI has no such type
    }
}

int cm_op_info(dsmoe_reduce_op op, MPI_Op *mop) {
    switch (op) {
    case DSMOE_SUM: *mop = MPI_SUM; return 1;
    case DSMOE_MAX: *mop = MPI_MAX; return 1;
    case DSMOE_MIN: *mop = MPI_MIN; return 1;
    }
    return 0;
}

int cm_is_float_sum(dsmoe_dtype dtype, dsmoe_reduce_op op) {
    return op == DSMOE_SUM && (dtype == DSMOE_FLOAT32 || dtype == DSMOE_FLOAT64);
}

// Refuses a dtype or op the reductions cannot do, before anything moves (every rank refuses alike).
dsmoe_status cm_check_reduction(mpi_env *e, const char *what, dsmoe_dtype dtype, dsmoe_reduce_op op) {
    MPI_Datatype type;
    size_t esize;
    MPI_Op mop;
    if (dtype == DSMOE_BFLOAT16 || dtype == DSMOE_FLOAT16)
        return cm_fail(e, DSMOE_ERR_UNSUPPORTED, TAG "%s: dtype %s is not supported (MPI has no such type)", what,
                       dsmoe_dtype_name(dtype));
    if (!cm_dtype_info(dtype, &type, &esize))
        return cm_fail(e, DSMOE_ERR_INVALID, TAG "%s: unknown dtype %d", what, (int)dtype);
    if (!cm_op_info(op, &mop)) return cm_fail(e, DSMOE_ERR_INVALID, TAG "%s: unknown op %d", what, (int)op);
    return DSMOE_OK;
}

// The MPI type, element size and op of a reduction cm_check_reduction accepted.
typedef struct mpi_reduction {
    MPI_Datatype type;
    size_t esize;
    MPI_Op op;
} mpi_reduction;

static mpi_reduction reduction_of(dsmoe_dtype dtype, dsmoe_reduce_op op) {
    mpi_reduction r = {MPI_DATATYPE_NULL, 0, MPI_OP_NULL};
    cm_dtype_info(dtype, &r.type, &r.esize);
    cm_op_info(op, &r.op);
    return r;
}

dsmoe_status cm_do_allreduce(mpi_env *e, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf, size_t count,
                             dsmoe_dtype dtype, dsmoe_reduce_op op) {
    mpi_reduction r = reduction_of(dtype, op);
    // Element-wise, so pieces of at most max_count elements give the same result as one call.
    for (size_t off = 0; off < count; off += e->max_count) {
        size_t n = count - off < e->max_count ? count - off : e->max_count;
        const char *src = sendbuf ? (const char *)sendbuf + off * r.esize : NULL;
        char *dst = (char *)recvbuf + off * r.esize;
#ifndef COMM_MPI_CUDA_AWARE
        if (cm_is_float_sum(dtype, op)) {
            dsmoe_status s = sum_fixed_order(e, g, src, dst, n, r.type, r.esize, dtype);
            if (s != DSMOE_OK) return s;
            continue;
        }
#endif
        int rc = MPI_Allreduce(src ? (const void *)src : MPI_IN_PLACE, dst, (int)n, r.type, r.op, g->comm);
        if (rc != MPI_SUCCESS) {
            char what[128];
            snprintf(what, sizeof what, "MPI_Allreduce of %zu elements over %d ranks", n, g->size);
            return cm_mpi_fail(e, rc, what);
        }
    }
    return DSMOE_OK;
}

#ifdef COMM_MPI_CUDA_AWARE
// recv (n) = block `rank` of the reduction of every rank's send (size, n), by MPI: buffers that may be
// device memory get no host pass. One MPI_Reduce_scatter_block when a block fits in max_count; longer
// blocks go piece by piece, one MPI_Reduce of piece [off, off + m) of block j to its owner, rank j
// (the same reduction, with p roots instead of one scatter).
dsmoe_status cm_do_reduce_scatter(mpi_env *e, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf, size_t n,
                                  dsmoe_dtype dtype, dsmoe_reduce_op op) {
    mpi_reduction r = reduction_of(dtype, op);
    char what[160];
    if (n <= e->max_count) {
        int rc = MPI_Reduce_scatter_block(sendbuf, recvbuf, (int)n, r.type, r.op, g->comm);
        if (rc == MPI_SUCCESS) return DSMOE_OK;
        snprintf(what, sizeof what, "reduce_scatter: MPI_Reduce_scatter_block of %zu elements per rank over %d ranks",
                 n, g->size);
        return cm_mpi_fail(e, rc, what);
    }
    for (size_t off = 0; off < n; off += e->max_count) {
        size_t m = n - off < e->max_count ? n - off : e->max_count;
        for (int j = 0; j < g->size; j++) {
            const char *src = (const char *)sendbuf + ((size_t)j * n + off) * r.esize;
            void *dst = j == g->rank ? (char *)recvbuf + off * r.esize : NULL; // significant at the root only
            int rc = MPI_Reduce(src, dst, (int)m, r.type, r.op, j, g->comm);
            if (rc != MPI_SUCCESS) {
                snprintf(what, sizeof what, "reduce_scatter: MPI_Reduce of %zu elements to rank %d of %d", m, j, g->size);
                return cm_mpi_fail(e, rc, what);
            }
        }
    }
    return DSMOE_OK;
}
#else
// recv (n) = block `rank` of the reduction of every rank's send (size, n). Rank j receives block j of
// every rank (MPI_Alltoall) and reduces the p contributions in rank order, as sum_fixed_order does for
// its chunk: each element is reduced once, in the one order of this plugin, so for float SUM the block
// is bitwise allreduce's. Every dtype and op takes this path (integer sums, MAX and MIN are exact in
// any order). Blocks longer than max_count go in pieces: piece [off, off + m) of every block is packed
// into g->pack so that one MPI_Alltoall of m elements per rank moves it.
dsmoe_status cm_do_reduce_scatter(mpi_env *e, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf, size_t n,
                                  dsmoe_dtype dtype, dsmoe_reduce_op op) {
    MPI_Datatype type = MPI_DATATYPE_NULL;
    size_t esize = 0;
    cm_dtype_info(dtype, &type, &esize);
    int p = g->size;
    for (size_t off = 0; off < n; off += e->max_count) {
        size_t m = n - off < e->max_count ? n - off : e->max_count, need = (size_t)p * m * esize;
        if (cm_grow(&g->scratch, &g->scratch_bytes, need) || (m < n && cm_grow(&g->pack, &g->pack_bytes, need)))
            return cm_fail(e, DSMOE_ERR_NOMEM, TAG "reduce_scatter: out of memory for %zu bytes", need);
        const void *src = sendbuf; // one piece: the blocks are already laid out as MPI_Alltoall wants
        if (m < n) {
            for (int j = 0; j < p; j++)
                memcpy((char *)g->pack + (size_t)j * m * esize, (const char *)sendbuf + ((size_t)j * n + off) * esize,
                       m * esize);
            src = g->pack;
        }
        int rc = MPI_Alltoall(src, (int)m, type, g->scratch, (int)m, type, g->comm);
        if (rc != MPI_SUCCESS) {
            char what[128];
            snprintf(what, sizeof what, "reduce_scatter: MPI_Alltoall of %zu elements per rank over %d ranks", m, p);
            return cm_mpi_fail(e, rc, what);
        }
        cm_reduce_in_rank_order(dtype, op, (char *)recvbuf + off * esize, g->scratch, m, p);
    }
    return DSMOE_OK;
}
#endif
