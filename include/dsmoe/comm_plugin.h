// dsmoe/comm_plugin.h: ABI version 2 of communication plugins (mpi, cuda-aware mpi, nccl, ...).
// docs/plugins.md explains it member by member; include/dsmoe/v1/comm_plugin_v1.h is version 1, still
// loaded through an adapter.
//
// A comm plugin is a shared object exporting one function, DSMOE_COMM_PLUGIN_ENTRY:
// `DSMOE_PLUGIN_EXPORT const dsmoe_comm_plugin_v2 *DSMOE_COMM_PLUGIN_ENTRY(void)`. The core owns MPI and
// the process layout: a plugin builds its groups from a BOOTSTRAP the core hands it (rank, size, the
// world ranks of the members, an all-gather and a broadcast of bytes), so this header needs no <mpi.h>.
// A plugin that calls MPI itself must run on the very MPI library the core uses: it names it in
// `mpi_abi` (DSMOE_MPI_ABI_STRING below, expanded where <mpi.h> is included) and the loader refuses a
// mismatch, naming both.
//
// Conventions for every collective:
// - Every rank of the group calls it in the same order with matching sizes (the core agrees sizes
//   before any exchange). Counts are in elements of dtype; byte-wise members say so.
// - Buffers may live in any memory kind listed in mem_kinds; the plugin never frees them.
// - Ordering against compute: each collective takes the kernel queue it belongs to (`stream`).
//   * With DSMOE_CCAP_STREAM_ORDERED the collective is enqueued on that queue and returns at once: it
//     reads its inputs when the queue reaches it, and work enqueued after it sees its results. The
//     caller may enqueue it right after the kernels that produce its inputs.
//   * Without it the collective is HOST-PROGRESSED: it ignores `stream`, reads its inputs during the
//     call and has written its results when it returns (or when request_wait returns for the
//     non-blocking trio). The caller must have waited for the kernels producing the inputs (an event
//     recorded after them), and the results are ready for any queue on return.
// - Errors: members return a dsmoe_status; last_error(ctx) then gives a one-line message. A
//   stream-ordered plugin may report an error of an enqueued collective at a later call (sticky).
#ifndef DSMOE_COMM_PLUGIN_H
#define DSMOE_COMM_PLUGIN_H
#include <stddef.h>
#include <stdint.h>
#include "dsmoe/types.h"

DSMOE_EXTERN_C_BEGIN

#define DSMOE_COMM_API_VERSION 2
#define DSMOE_COMM_PLUGIN_ENTRY dsmoe_comm_plugin_entry_v2
#define DSMOE_COMM_PLUGIN_SYMBOL "dsmoe_comm_plugin_entry_v2"

// The MPI a translation unit is compiled against, as text ("Open MPI 4.1", "MPICH 4.0"); "" without
// <mpi.h>. A plugin that calls MPI sets mpi_abi = DSMOE_MPI_ABI_STRING (include <mpi.h> first).
#define DSMOE_MPI_ABI_STR_(x) #x
#define DSMOE_MPI_ABI_STR(x) DSMOE_MPI_ABI_STR_(x)
#if defined(OMPI_MAJOR_VERSION)
#define DSMOE_MPI_ABI_STRING "Open MPI " DSMOE_MPI_ABI_STR(OMPI_MAJOR_VERSION) "." DSMOE_MPI_ABI_STR(OMPI_MINOR_VERSION)
#elif defined(MPICH_VERSION)
#define DSMOE_MPI_ABI_STRING "MPICH " MPICH_VERSION
#elif defined(MPI_VERSION)
#define DSMOE_MPI_ABI_STRING "MPI " DSMOE_MPI_ABI_STR(MPI_VERSION) "." DSMOE_MPI_ABI_STR(MPI_SUBVERSION)
#else
#define DSMOE_MPI_ABI_STRING ""
#endif

typedef struct dsmoe_comm_ctx dsmoe_comm_ctx;         // opaque, one per process
typedef struct dsmoe_comm_group dsmoe_comm_group;     // opaque, one per group of ranks
typedef struct dsmoe_comm_request dsmoe_comm_request; // opaque, one per non-blocking collective

// Capabilities (the `caps` member).
enum {
    DSMOE_CCAP_STREAM_ORDERED = 1u << 0, // collectives are enqueued on the caller's kernel queue
    DSMOE_CCAP_DETERMINISTIC = 1u << 1,  // allreduce / reduce_scatter sums: bitwise identical on every
                                         // rank and from run to run for a given group size (a fixed
                                         // order of addition); without it the core does not rely on it
    DSMOE_CCAP_NONBLOCKING = 1u << 2,    // allreduce_start, request_test and request_wait are present
};

// Pass as sendbuf to reduce in place in recvbuf.
#define DSMOE_IN_PLACE ((const void *)1)

// What the core gives a plugin to build a group: valid during the call it is passed to only. The
// functions are collective over the group's members and blocking; they move host memory.
typedef struct dsmoe_bootstrap {
    int rank, size;          // the caller's place in the group, and the group's size
    const int *world_ranks;  // (size) world rank of each member, in group order
    int world_rank, world_size;
    void *ctx;
    // recv (size * bytes) = concatenation over members of send (bytes).
    dsmoe_status (*allgather)(void *ctx, const void *send, void *recv, size_t bytes);
    // buf (bytes) of member root copied to every member.
    dsmoe_status (*broadcast)(void *ctx, void *buf, size_t bytes, int root);
} dsmoe_bootstrap;

// The kernel queue a collective belongs to (see "Ordering against compute" above).
typedef struct dsmoe_comm_stream {
    void *native; // the kernel plugin's queue_native() (cudaStream_t for cuda), NULL for host queues
    // Enqueues fn(arg) on that queue (the kernel plugin's queue_enqueue_host); NULL when it has none.
    dsmoe_status (*enqueue_host)(void *owner, void (*fn)(void *arg), void *arg);
    void *owner;
} dsmoe_comm_stream;

typedef struct dsmoe_comm_options {
    dsmoe_log_fn log; // may be NULL
    void *log_user;
    const char *const *param_values; // the plugin's settings resolved by the core (types.h); NULL if none
    int n_param_values;
    const dsmoe_bootstrap *world;    // the world, valid during init only
} dsmoe_comm_options;

typedef struct dsmoe_comm_plugin_v2 {
    uint32_t api_version;    // DSMOE_COMM_API_VERSION (2)
    const char *name;        // short name, e.g. "mpi"; what decks select
    const char *description; // one line for --version
    uint32_t mem_kinds;      // bitmask of DSMOE_MEM_* that buffers may live in
    uint32_t caps;           // DSMOE_CCAP_*
    const char *mpi_abi;     // DSMOE_MPI_ABI_STRING when the plugin calls MPI, else NULL
    const dsmoe_param_decl *params; // the plugin's settings (types.h); NULL when n_params == 0
    int n_params;

    // Creates the process context (collective over the world). MPI, if the plugin uses it, is already
    // initialised by the core. On failure *ctx is NULL and the message is in errbuf.
    dsmoe_status (*init)(const dsmoe_comm_options *opt, dsmoe_comm_ctx **ctx, char *errbuf, size_t errlen);
    // Frees the context; every group must be destroyed first. NULL is a no-op.
    void (*finalize)(dsmoe_comm_ctx *ctx);
    // Message of the last failing call (never NULL; "" when none).
    const char *(*last_error)(dsmoe_comm_ctx *ctx);

    // Collective over the bootstrap's members: a group of them, in bootstrap order.
    dsmoe_status (*group_create)(dsmoe_comm_ctx *ctx, const dsmoe_bootstrap *bootstrap, dsmoe_comm_group **group);
    // Collective: destroys a group after its enqueued collectives. NULL is a no-op.
    void (*group_destroy)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group);
    int (*group_rank)(const dsmoe_comm_group *group);
    int (*group_size)(const dsmoe_comm_group *group);

    // Each rank sends `bytes` bytes to every rank: block j of sendbuf goes to rank j and block i of rank
    // j's recvbuf comes from rank i. sendbuf and recvbuf do not overlap.
    dsmoe_status (*alltoall)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf, void *recvbuf,
                             size_t bytes, const dsmoe_comm_stream *stream);
    // recvbuf (count) = op over ranks of sendbuf (count); sendbuf may be DSMOE_IN_PLACE.
    dsmoe_status (*allreduce)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf, void *recvbuf,
                              size_t count, dsmoe_dtype dtype, dsmoe_reduce_op op, const dsmoe_comm_stream *stream);
    // recvbuf (size * bytes) = concatenation over ranks of sendbuf (bytes).
    dsmoe_status (*allgather)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf, void *recvbuf,
                              size_t bytes, const dsmoe_comm_stream *stream);
    // recvbuf (recvcount) = block `rank` of op over ranks of sendbuf (size * recvcount).
    dsmoe_status (*reduce_scatter)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf, void *recvbuf,
                                   size_t recvcount, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                   const dsmoe_comm_stream *stream);

    // --- OPTIONAL members (NULL when absent) --------------------------------------------------------
    // Variable all-to-all in bytes: the four arrays are HOST arrays of group size (consumed before
    // return); a zero count sends nothing.
    dsmoe_status (*alltoallv)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf,
                              const size_t *sendcounts, const size_t *sdispls, void *recvbuf,
                              const size_t *recvcounts, const size_t *rdispls, const dsmoe_comm_stream *stream);
    // buf (bytes) of rank root copied to every rank.
    dsmoe_status (*broadcast)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, void *buf, size_t bytes, int root,
                              const dsmoe_comm_stream *stream);
    dsmoe_status (*barrier)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group);
    // Non-blocking in-place allreduce of host-progressed plugins (DSMOE_CCAP_NONBLOCKING): starts it and
    // returns at once with *req; the result, once request_wait returns, is bitwise what allreduce(
    // DSMOE_IN_PLACE, buf, ...) gives. Every rank starts and waits for its requests in the same order;
    // several may be outstanding, and blocking collectives on the group may run meanwhile. buf must not
    // be touched until request_wait returns. (Stream-ordered plugins need none: allreduce returns at
    // once.)
    dsmoe_status (*allreduce_start)(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, void *buf, size_t count,
                                    dsmoe_dtype dtype, dsmoe_reduce_op op, dsmoe_comm_request **req);
    // Drives progress of req and never blocks; *done = 1 once the result is in buf.
    dsmoe_status (*request_test)(dsmoe_comm_ctx *ctx, dsmoe_comm_request *req, int *done);
    // Blocks until req completes, then frees it (also on error). NULL is a no-op.
    dsmoe_status (*request_wait)(dsmoe_comm_ctx *ctx, dsmoe_comm_request *req);
} dsmoe_comm_plugin_v2;

typedef const dsmoe_comm_plugin_v2 *(*dsmoe_comm_plugin_entry_fn)(void);

DSMOE_EXTERN_C_END

#endif
