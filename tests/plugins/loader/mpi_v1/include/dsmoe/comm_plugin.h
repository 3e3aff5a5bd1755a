// dsmoe/comm_plugin.h: the ABI of communication backends (mpi, cuda-aware mpi, nccl, ...).
//
// A comm plugin is a shared object exporting one function, DSMOE_COMM_PLUGIN_ENTRY:
// `DSMOE_PLUGIN_EXPORT const dsmoe_comm_plugin_v1 *DSMOE_COMM_PLUGIN_ENTRY(void)`. The core owns MPI (MPI_Init/Finalize); a plugin builds its
// groups from MPI communicators the core gives it and never calls MPI_Init itself.
//
// Conventions for every member:
// - Collectives are blocking and must be called by every rank of the group in the same order with
//   matching sizes (the core guarantees this; it agrees sizes before any exchange).
// - Buffers may live in any memory kind listed in mem_kinds; the plugin never frees them.
// - Counts are in elements of the given dtype; byte-wise members say so.
// - Errors: members return a dsmoe_status; last_error(ctx) then gives a one-line message.
#ifndef DSMOE_COMM_PLUGIN_H
#define DSMOE_COMM_PLUGIN_H
#include <stddef.h>
#include <stdint.h>
#include <mpi.h>
#include "dsmoe/status.h"

#define DSMOE_COMM_API_VERSION 1
#define DSMOE_COMM_PLUGIN_ENTRY dsmoe_comm_plugin_entry_v1
#define DSMOE_COMM_PLUGIN_SYMBOL "dsmoe_comm_plugin_entry_v1"

typedef struct dsmoe_comm_ctx dsmoe_comm_ctx;     // opaque, one per process
typedef struct dsmoe_comm_group dsmoe_comm_group; // opaque, one per communicator
typedef struct dsmoe_comm_request dsmoe_comm_request; // opaque, one per non-blocking collective

typedef enum dsmoe_dtype {
    DSMOE_FLOAT32 = 0,
    DSMOE_FLOAT64 = 1,
    DSMOE_INT32 = 2,
    DSMOE_INT64 = 3,
    DSMOE_UINT8 = 4,
} dsmoe_dtype;

typedef enum dsmoe_reduce_op {
    DSMOE_SUM = 0,
    DSMOE_MAX = 1,
    DSMOE_MIN = 2,
} dsmoe_reduce_op;

// Pass as sendbuf to reduce in place in recvbuf.
#define DSMOE_IN_PLACE ((const void *)1)

typedef struct dsmoe_comm_plugin_v1 {
    uint32_t api_version;    // DSMOE_COMM_API_VERSION
    const char *name;        // short name, e.g. "mpi"; what decks select
    const char *description; // one line for --version
    uint32_t mem_kinds;      // bitmask of DSMOE_MEM_* that buffers may live in

    // Creates the process context. MPI is already initialised. On failure *ctx is NULL and the
    // message is in errbuf.
    dsmoe_status (*init)(dsmoe_comm_ctx **ctx, char *errbuf, size_t errlen);
    // Frees the context; every group must be destroyed first. NULL is a no-op.
    void (*finalize)(dsmoe_comm_ctx *ctx);
    // Message of the last failing call (never NULL; "" when none).
    const char *(*last_error)(dsmoe_comm_ctx *ctx);

    // Collective over comm: creates a group of its ranks (the plugin may dup comm; the caller keeps
    // ownership of comm).
    dsmoe_status (*group_create)(dsmoe_comm_ctx *ctx, MPI_Comm comm, dsmoe_comm_group **group);
    // Collective: destroys a group. NULL is a no-op.
    void (*group_destroy)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group);
    // Rank and size of the caller in the group.
    int (*group_rank)(const dsmoe_comm_group *group);
    int (*group_size)(const dsmoe_comm_group *group);

    // Each rank sends `bytes` bytes to every rank: block j of sendbuf goes to rank j and block i of
    // rank j's recvbuf comes from rank i. sendbuf and recvbuf do not overlap.
    dsmoe_status (*alltoall)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf,
                             void *recvbuf, size_t bytes);
    // Variable all-to-all in bytes: sendcounts/sdispls/recvcounts/rdispls are HOST arrays of group
    // size; a zero count sends nothing.
    dsmoe_status (*alltoallv)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf,
                              const size_t *sendcounts, const size_t *sdispls, void *recvbuf,
                              const size_t *recvcounts, const size_t *rdispls);
    // recvbuf (count) = op over ranks of sendbuf (count); sendbuf may be DSMOE_IN_PLACE.
    // Results are identical on every rank and, for a given group size, from run to run.
    dsmoe_status (*allreduce)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf,
                              void *recvbuf, size_t count, dsmoe_dtype dtype, dsmoe_reduce_op op);
    // recvbuf (size * bytes) = concatenation over ranks of sendbuf (bytes).
    dsmoe_status (*allgather)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf,
                              void *recvbuf, size_t bytes);
    // buf (bytes) of rank root copied to every rank.
    dsmoe_status (*broadcast)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, void *buf, size_t bytes, int root);
    dsmoe_status (*barrier)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group);

    // OPTIONAL (may be NULL; then the core uses the blocking allreduce). Non-blocking in-place
    // allreduce of buf (count): starts it and returns at once with *req. The result, once
    // request_wait returns, is bitwise the one allreduce(DSMOE_IN_PLACE, buf, ...) gives. Every rank
    // of the group starts, and waits for, its requests in the same order; several may be
    // outstanding at once, and blocking collectives on the group may run meanwhile. buf must not be
    // touched until request_wait returns.
    dsmoe_status (*allreduce_start)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, void *buf, size_t count,
                                    dsmoe_dtype dtype, dsmoe_reduce_op op, dsmoe_comm_request **req);
    // OPTIONAL: drives progress of req and never blocks; *done = 1 once the result is in buf.
    dsmoe_status (*request_test)(dsmoe_comm_ctx *ctx, dsmoe_comm_request *req, int *done);
    // OPTIONAL: blocks until req completes, then frees it (also on error). NULL is a no-op.
    dsmoe_status (*request_wait)(dsmoe_comm_ctx *ctx, dsmoe_comm_request *req);
} dsmoe_comm_plugin_v1;

typedef const dsmoe_comm_plugin_v1 *(*dsmoe_comm_plugin_entry_fn)(void);

#endif
