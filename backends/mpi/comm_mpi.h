// backends/mpi/comm_mpi.h: what the files of the mpi comm plugin share (private to the plugin):
// its context and group, the error helpers and the reduction helpers.
// defines: mpi_env, struct dsmoe_comm_ctx, struct dsmoe_comm_group, cm_* (comm_mpi.c; the reductions in comm_mpi_reduce.c), and the
// non-blocking trio cm_allreduce_start/cm_request_test/cm_request_wait (comm_mpi_nonblocking.c, "mpi" only)
// Three plugins build from these files: "mpi", "mpistream" (COMM_MPI_STREAM_ORDERED, test-only) and
// "mpi_cuda" (COMM_MPI_CUDA_AWARE: device buffers straight to a CUDA-aware MPI); comm_mpi.c says how
// they differ.
#ifndef DSMOE_COMM_MPI_H
#define DSMOE_COMM_MPI_H
#include <stdatomic.h>
#include <stddef.h>

#include <mpi.h> // before comm_plugin.h: DSMOE_MPI_ABI_STRING then names this MPI

#include "dsmoe/comm_plugin.h"

#if defined(COMM_MPI_STREAM_ORDERED)
#define PLUGIN_NAME "mpistream"
#elif defined(COMM_MPI_CUDA_AWARE)
#define PLUGIN_NAME "mpi_cuda"
#else
#define PLUGIN_NAME "mpi"
#endif
#define TAG "comm " PLUGIN_NAME ": "

// What the MPI code needs: the piece size and where its error text goes. The context owns one; a
// queued closure uses its own, so that it never writes text the caller's thread may be reading.
typedef struct mpi_env {
    size_t max_count; // largest count handed to MPI as an int
    char error[1024];
} mpi_env;

struct dsmoe_comm_ctx {
    mpi_env env;     // env.error: last_error() of a failing call
    atomic_int refs; // 1 for the caller, + 1 per queued closure (stream-ordered)
    // Stream-ordered: the first error of a closure. The closure that claims sticky_claimed writes
    // sticky_msg, then publishes sticky (release); readers load sticky (acquire) before the text.
    atomic_flag sticky_claimed;
    atomic_int sticky; // dsmoe_status
    char sticky_msg[1024];
};

struct dsmoe_comm_group {
    MPI_Comm comm;      // over the bootstrap's world ranks, in bootstrap order; MPI_ERRORS_RETURN
    MPI_Comm host_comm; // stream-ordered: barrier runs at the call, on this dup, never meeting a queued
                        // collective on comm; MPI_COMM_NULL otherwise
    int rank, size;
    atomic_int refs;    // 1 for the owner, + 1 per queued closure
    int *iv;            // (4, size) int counts/displacements for MPI's v-collectives
    void *scratch;      // (size, piece) contributions to this rank's chunk or block
    size_t scratch_bytes;
    void *pack;         // reduce_scatter in pieces: (size, piece) the piece of every block, packed
    size_t pack_bytes;
    // Non-blocking allreduces: each outstanding request runs on its own dup of comm, so that the
    // second phase of one (started whenever a rank sees the first phase done, which differs from
    // rank to rank) never meets another request's collective out of order. Slot k is taken at
    // start and given back at wait; both happen in the same order on every rank, so every rank
    // picks the same slot. Dups are made lazily (collective, at a start every rank makes).
    MPI_Comm *pool;
    unsigned char *pool_busy;
    int pool_len;
};

// Error text "<fmt>" into e->error; returns status.
dsmoe_status cm_fail(mpi_env *e, dsmoe_status status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
// Error text "comm <name>: <what> failed: <MPI's message>"; returns DSMOE_ERR_SYSTEM.
dsmoe_status cm_mpi_fail(mpi_env *e, int rc, const char *what);
// The checks every call shares (queued: the call takes a kernel queue).
dsmoe_status cm_check_call(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const char *op, int missing_buffer, int queued,
                           const dsmoe_comm_stream *stream);
// Refuses a dtype or op the reductions cannot do.
dsmoe_status cm_check_reduction(mpi_env *e, const char *what, dsmoe_dtype dtype, dsmoe_reduce_op op);
int cm_grow(void **buf, size_t *bytes, size_t need); // *buf to at least need bytes; 0 on success
size_t cm_chunk_first(size_t n, int p, int j);      // first element of chunk j of n split over p ranks
int cm_dtype_info(dsmoe_dtype dtype, MPI_Datatype *type, size_t *esize);
int cm_op_info(dsmoe_reduce_op op, MPI_Op *mop);
int cm_is_float_sum(dsmoe_dtype dtype, dsmoe_reduce_op op); // the sums done in fixed rank order
// acc (len) = c[0] op c[1] op ... op c[p-1] in that order; c is (p, len), by source rank.
void cm_reduce_in_rank_order(dsmoe_dtype dtype, dsmoe_reduce_op op, void *acc, const void *c, size_t len, int p);
// The reductions themselves (comm_mpi_reduce.c), run at the call or from the queue: recvbuf (count) =
// op over the group of sendbuf (NULL = in place); recvbuf (n) = block `rank` of the reduction.
dsmoe_status cm_do_allreduce(mpi_env *e, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf, size_t count,
                             dsmoe_dtype dtype, dsmoe_reduce_op op);
dsmoe_status cm_do_reduce_scatter(mpi_env *e, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf, size_t n,
                                  dsmoe_dtype dtype, dsmoe_reduce_op op);

#if !defined(COMM_MPI_STREAM_ORDERED) && !defined(COMM_MPI_CUDA_AWARE)
dsmoe_status cm_allreduce_start(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, void *buf, size_t count, dsmoe_dtype dtype,
                                dsmoe_reduce_op op, dsmoe_comm_request **req);
dsmoe_status cm_request_test(dsmoe_comm_ctx *ctx, dsmoe_comm_request *r, int *done);
dsmoe_status cm_request_wait(dsmoe_comm_ctx *ctx, dsmoe_comm_request *r);
#endif

#endif
