// core/plugins/comm_adapt_v1.c: a comm plugin of ABI 1 behind a v2 table (the loader's adapter).
// defines: dsmoe_comm_adapt_v1
//
// v1 collectives are blocking, on host-reachable memory of the plugin's mem_kinds, over groups built
// from MPI communicators; v2 builds groups from a bootstrap and may order collectives on a kernel
// queue. The adapter is therefore HOST-PROGRESSED (no DSMOE_CCAP_STREAM_ORDERED): every collective
// ignores its stream, and has its results when it returns. group_create turns the bootstrap's world
// ranks into an MPI communicator (MPI_Comm_create_group: collective over the members only) and hands
// it to v1 group_create; v1 lets the plugin dup it while the caller keeps ownership, so the adapter
// keeps it until group_destroy.
//
// Capabilities: DSMOE_CCAP_DETERMINISTIC, because the v1 contract already promised allreduce results
// identical on every rank and from run to run for a group size; DSMOE_CCAP_NONBLOCKING exactly when
// the v1 plugin has the optional allreduce_start / request_test / request_wait. mpi_abi is this core's
// MPI: a v1 plugin took MPI_Comm from the core's <mpi.h> by construction.
//
// reduce_scatter is required in v2 but absent in v1. It is composed from v1 allreduce: the whole
// (size * recvcount) vector into a host scratch, then this rank's block copied out (bitwise the block a
// native reduce_scatter gives, which adds in allreduce's order). That needs scratch memory of the
// plugin's kind and host access to recvbuf, which the adapter has only for a plugin whose mem_kinds is
// host memory alone; for any other it returns DSMOE_ERR_UNSUPPORTED with a message saying so.
//
// v2 init() gets no table pointer, so each adapted table has its own init: one trampoline per slot of a
// fixed array (DSMOE_ADAPT_V1_SLOTS, 8 adapted comm plugins loaded at once).
#include <mpi.h> // first: DSMOE_MPI_ABI_STRING names this MPI

#include "plugin_adapt.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(sizeof(DSMOE_MPI_ABI_STRING) > 1, "<mpi.h> must come before dsmoe/comm_plugin.h in this file");

// The tag of MPI_Comm_create_group: members call group_create in the same order, so one tag suffices.
#define GROUP_TAG 0x6473

typedef struct cadapter {
    dsmoe_plugin_adapter base; // first: what the loader sees
    int slot;
    const dsmoe_comm_plugin_v1 *v1;
    dsmoe_comm_plugin_v2 table;
} cadapter;

static dsmoe_adapt_slots slots = DSMOE_ADAPT_SLOTS_INIT;

// What a v2 dsmoe_comm_ctx * points to when it comes from an adapted table.
typedef struct cctx {
    const dsmoe_comm_plugin_v1 *v1;
    dsmoe_comm_ctx *in; // the v1 plugin's own context
    char error[1024];   // last_error()
    void *scratch;      // (scratch_bytes) host: reduce_scatter's whole reduced vector
    size_t scratch_bytes;
} cctx;

// What a v2 dsmoe_comm_group * points to: group_rank and group_size get no context, so it names v1 too.
typedef struct cgroup {
    const dsmoe_comm_plugin_v1 *v1;
    dsmoe_comm_group *in; // the v1 plugin's group
    MPI_Comm comm;        // its communicator, ours until group_destroy
} cgroup;

#define CCTX(ctx) ((cctx *)(ctx))
#define CGROUP(g) ((cgroup *)(g))

static dsmoe_status fail(cctx *x, dsmoe_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static dsmoe_status fail(cctx *x, dsmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->error, sizeof x->error, fmt, ap);
    va_end(ap);
    return s;
}

// ABI 1 had the dtypes float32, float64, int32, int64 and uint8; bfloat16 and float16 came with ABI 2. A
// v1 plugin would call them unknown (DSMOE_ERR_INVALID), where v2 wants a dtype a plugin does not reduce
// refused as unsupported, so the adapter refuses them itself. An unknown value goes on to the plugin.
static dsmoe_status v1_dtype(cctx *x, const char *op, dsmoe_dtype dtype) {
    if ((unsigned)dtype <= (unsigned)DSMOE_UINT8 || dsmoe_dtype_size(dtype) == 0) return DSMOE_OK;
    return fail(x, DSMOE_ERR_UNSUPPORTED, "comm plugin '%s' speaks ABI 1 (run through an adapter), whose %s takes no "
                "%s (ABI 1 has float32, float64, int32, int64 and uint8); use a comm plugin of ABI 2", x->v1->name,
                op, dsmoe_dtype_name(dtype));
}

static dsmoe_status v1_status(cctx *x, dsmoe_status s) {
    if (s != DSMOE_OK) snprintf(x->error, sizeof x->error, "%s", x->v1->last_error(x->in));
    return s;
}
#define V1(ctx, member, ...) v1_status(CCTX(ctx), CCTX(ctx)->v1->member(CCTX(ctx)->in, __VA_ARGS__))

// ------------------------------------------------------------------------------------------------
// lifecycle

static dsmoe_status adapt_init(int slot, const dsmoe_comm_options *opt, dsmoe_comm_ctx **out, char *errbuf,
                               size_t errlen) {
    *out = NULL;
    const dsmoe_comm_plugin_v1 *v1 = dsmoe_adapt_slot_v1(&slots, slot);
    if (!v1) {
        snprintf(errbuf, errlen, "comm v1 adapter: init of slot %d, whose plugin was unloaded", slot);
        return DSMOE_ERR_INTERNAL;
    }
    cctx *x = calloc(1, sizeof *x);
    if (!x) {
        snprintf(errbuf, errlen, "comm v1 adapter: cannot allocate a context for plugin '%s'", v1->name);
        return DSMOE_ERR_NOMEM;
    }
    // The world bootstrap, logger and settings have no v1 counterpart: v1 init only needs MPI.
    dsmoe_status s = v1->init(&x->in, errbuf, errlen);
    if (s != DSMOE_OK) {
        free(x);
        return s;
    }
    x->v1 = v1;
    *out = (dsmoe_comm_ctx *)x;
    return DSMOE_OK;
}

#define INIT_SLOT(i)                                                                               \
    static dsmoe_status init_slot_##i(const dsmoe_comm_options *o, dsmoe_comm_ctx **c, char *e, size_t n) { \
        return adapt_init(i, o, c, e, n);                                                          \
    }
INIT_SLOT(0) INIT_SLOT(1) INIT_SLOT(2) INIT_SLOT(3) INIT_SLOT(4) INIT_SLOT(5) INIT_SLOT(6) INIT_SLOT(7)
typedef dsmoe_status (*init_fn)(const dsmoe_comm_options *, dsmoe_comm_ctx **, char *, size_t);
static const init_fn init_slots[] = {init_slot_0, init_slot_1, init_slot_2, init_slot_3,
                                     init_slot_4, init_slot_5, init_slot_6, init_slot_7};
_Static_assert(sizeof init_slots / sizeof init_slots[0] == DSMOE_ADAPT_V1_SLOTS, "one init trampoline per slot");

static void c_finalize(dsmoe_comm_ctx *ctx) {
    if (!ctx) return;
    CCTX(ctx)->v1->finalize(CCTX(ctx)->in);
    free(CCTX(ctx)->scratch);
    free(ctx);
}

static const char *c_last_error(dsmoe_comm_ctx *ctx) { return ctx ? CCTX(ctx)->error : ""; }

// ------------------------------------------------------------------------------------------------
// groups

static dsmoe_status mpi_fail(cctx *x, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return fail(x, DSMOE_ERR_SYSTEM, "comm v1 adapter: group_create: %s failed: %s", what, msg);
}

// What this member can see wrong in the bootstrap by itself ("" when nothing).
static void bootstrap_fault(const dsmoe_bootstrap *bs, char *why, size_t n) {
    int world_rank, world_size;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    if (bs->rank < 0 || bs->rank >= bs->size) {
        snprintf(why, n, "rank %d is not in [0, %d)", bs->rank, bs->size);
        return;
    }
    if (bs->world_ranks[bs->rank] != world_rank) {
        snprintf(why, n, "world_ranks[%d] = %d is not this process (world rank %d)", bs->rank,
                 bs->world_ranks[bs->rank], world_rank);
        return;
    }
    unsigned char *seen = calloc((size_t)world_size, 1);
    if (!seen) {
        snprintf(why, n, "out of memory");
        return;
    }
    for (int i = 0; i < bs->size && !why[0]; i++) {
        int w = bs->world_ranks[i];
        if (w < 0 || w >= world_size)
            snprintf(why, n, "world_ranks[%d] = %d is not in [0, %d)", i, w, world_size);
        else if (seen[w]++)
            snprintf(why, n, "world rank %d appears twice in world_ranks", w);
    }
    free(seen);
}

static dsmoe_status c_group_create(dsmoe_comm_ctx *ctx, const dsmoe_bootstrap *bs, dsmoe_comm_group **group) {
    cctx *x = CCTX(ctx);
    if (!group) return fail(x, DSMOE_ERR_INVALID, "comm v1 adapter: group_create: group is NULL");
    *group = NULL;
    if (!bs || bs->size < 1 || !bs->world_ranks || !bs->allgather)
        return fail(x, DSMOE_ERR_INVALID, "comm v1 adapter: group_create: the bootstrap is NULL, has no members, "
                    "or lacks world_ranks or allgather");
    // The members' verdicts through the bootstrap, so that all refuse together: one refusing alone would
    // leave the others waiting in MPI_Comm_create_group.
    char why[256] = "";
    bootstrap_fault(bs, why, sizeof why);
    int ok = why[0] == 0, bad = -1;
    int *oks = malloc((size_t)bs->size * sizeof *oks);
    if (!oks) return fail(x, DSMOE_ERR_NOMEM, "comm v1 adapter: group_create: out of memory");
    dsmoe_status agreed = bs->allgather(bs->ctx, &ok, oks, sizeof ok);
    for (int i = 0; i < bs->size && agreed == DSMOE_OK && bad < 0; i++)
        if (!oks[i]) bad = i;
    free(oks);
    if (agreed != DSMOE_OK)
        return fail(x, agreed, "comm v1 adapter: group_create: the bootstrap's allgather failed (%s)",
                    dsmoe_status_name(agreed));
    if (!ok) return fail(x, DSMOE_ERR_INVALID, "comm v1 adapter: group_create: bad bootstrap: %s", why);
    if (bad >= 0)
        return fail(x, DSMOE_ERR_INVALID, "comm v1 adapter: group_create: member %d refused the bootstrap", bad);
    // Group rank i is world rank world_ranks[i]: MPI_Group_incl keeps the order it is given.
    MPI_Group world, members;
    MPI_Comm comm = MPI_COMM_NULL;
    int rc = MPI_Comm_group(MPI_COMM_WORLD, &world);
    if (rc != MPI_SUCCESS) return mpi_fail(x, rc, "MPI_Comm_group");
    rc = MPI_Group_incl(world, bs->size, bs->world_ranks, &members);
    MPI_Group_free(&world);
    if (rc != MPI_SUCCESS) return mpi_fail(x, rc, "MPI_Group_incl");
    rc = MPI_Comm_create_group(MPI_COMM_WORLD, members, GROUP_TAG, &comm);
    MPI_Group_free(&members);
    if (rc != MPI_SUCCESS) return mpi_fail(x, rc, "MPI_Comm_create_group");

    cgroup *g = calloc(1, sizeof *g);
    if (!g) {
        MPI_Comm_free(&comm);
        return fail(x, DSMOE_ERR_NOMEM, "comm v1 adapter: group_create: out of memory");
    }
    g->v1 = x->v1;
    g->comm = comm;
    dsmoe_status s = V1(ctx, group_create, comm, &g->in);
    if (s != DSMOE_OK) {
        MPI_Comm_free(&g->comm);
        free(g);
        return s;
    }
    *group = (dsmoe_comm_group *)g;
    return DSMOE_OK;
}

static void c_group_destroy(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group) {
    if (!group) return;
    cgroup *g = CGROUP(group);
    CCTX(ctx)->v1->group_destroy(CCTX(ctx)->in, g->in);
    MPI_Comm_free(&g->comm);
    free(g);
}

static int c_group_rank(const dsmoe_comm_group *group) { return CGROUP(group)->v1->group_rank(CGROUP(group)->in); }

static int c_group_size(const dsmoe_comm_group *group) { return CGROUP(group)->v1->group_size(CGROUP(group)->in); }

// ------------------------------------------------------------------------------------------------
// collectives: blocking v1 calls; the stream is ignored (host-progressed)

// A NULL group is refused here, as v2 wants (DSMOE_ERR_INVALID): the adapter would otherwise hand the
// plugin what a NULL group points to.
#define NEED_GROUP(ctx, group, op)                                                                 \
    do {                                                                                           \
        if (!(group)) return fail(CCTX(ctx), DSMOE_ERR_INVALID, "comm v1 adapter: %s: group is NULL", op); \
    } while (0)

static dsmoe_status c_alltoall(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf, void *recvbuf,
                               size_t bytes, const dsmoe_comm_stream *stream) {
    NEED_GROUP(ctx, group, "alltoall");
    return V1(ctx, alltoall, CGROUP(group)->in, sendbuf, recvbuf, bytes);
}

static dsmoe_status c_allreduce(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf, void *recvbuf,
                                size_t count, dsmoe_dtype dtype, dsmoe_reduce_op op, const dsmoe_comm_stream *stream) {
    NEED_GROUP(ctx, group, "allreduce");
    dsmoe_status s = v1_dtype(CCTX(ctx), "allreduce", dtype);
    if (s != DSMOE_OK) return s;
    return V1(ctx, allreduce, CGROUP(group)->in, sendbuf, recvbuf, count, dtype, op);
}

static dsmoe_status c_allgather(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf, void *recvbuf,
                                size_t bytes, const dsmoe_comm_stream *stream) {
    NEED_GROUP(ctx, group, "allgather");
    return V1(ctx, allgather, CGROUP(group)->in, sendbuf, recvbuf, bytes);
}

// recvbuf (recvcount) = block `rank` of allreduce(sendbuf (size * recvcount)), through a host scratch.
static dsmoe_status c_reduce_scatter(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf,
                                     void *recvbuf, size_t recvcount, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                     const dsmoe_comm_stream *stream) {
    NEED_GROUP(ctx, group, "reduce_scatter");
    cctx *x = CCTX(ctx);
    if (x->v1->mem_kinds != DSMOE_MEM_HOST)
        return fail(x, DSMOE_ERR_UNSUPPORTED,
                    "comm plugin '%s' speaks ABI 1 (run through an adapter), which has no reduce_scatter; the "
                    "adapter composes it from allreduce for host-memory plugins only, and this one accepts other "
                    "memory kinds (0x%x); use a comm plugin of ABI 2", x->v1->name, (unsigned)x->v1->mem_kinds);
    size_t esize = dsmoe_dtype_size(dtype);
    if (esize == 0)
        return fail(x, DSMOE_ERR_INVALID, "comm v1 adapter: reduce_scatter: unknown dtype %d", (int)dtype);
    if (sendbuf == DSMOE_IN_PLACE || (recvcount > 0 && (!sendbuf || !recvbuf)))
        return fail(x, DSMOE_ERR_INVALID, "comm v1 adapter: reduce_scatter: expected separate send and receive "
                    "buffers, both non-NULL");
    dsmoe_status s = v1_dtype(x, "reduce_scatter", dtype);
    if (s != DSMOE_OK || recvcount == 0) return s; // every member passes the same recvcount: all return here
    cgroup *g = CGROUP(group);
    size_t size = (size_t)x->v1->group_size(g->in), rank = (size_t)x->v1->group_rank(g->in);
    size_t bytes = size * recvcount * esize;
    if (bytes > x->scratch_bytes) {
        void *p = realloc(x->scratch, bytes);
        if (!p)
            return fail(x, DSMOE_ERR_NOMEM, "comm v1 adapter: reduce_scatter: cannot allocate %zu bytes of scratch",
                        bytes);
        x->scratch = p;
        x->scratch_bytes = bytes;
    }
    s = V1(ctx, allreduce, g->in, sendbuf, x->scratch, size * recvcount, dtype, op);
    if (s != DSMOE_OK) return s;
    memcpy(recvbuf, (const char *)x->scratch + rank * recvcount * esize, recvcount * esize);
    return DSMOE_OK;
}

static dsmoe_status c_alltoallv(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, const void *sendbuf,
                                const size_t *sendcounts, const size_t *sdispls, void *recvbuf,
                                const size_t *recvcounts, const size_t *rdispls, const dsmoe_comm_stream *stream) {
    NEED_GROUP(ctx, group, "alltoallv");
    return V1(ctx, alltoallv, CGROUP(group)->in, sendbuf, sendcounts, sdispls, recvbuf, recvcounts, rdispls);
}

static dsmoe_status c_broadcast(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, void *buf, size_t bytes, int root,
                                const dsmoe_comm_stream *stream) {
    NEED_GROUP(ctx, group, "broadcast");
    return V1(ctx, broadcast, CGROUP(group)->in, buf, bytes, root);
}

static dsmoe_status c_barrier(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group) {
    NEED_GROUP(ctx, group, "barrier");
    return V1(ctx, barrier, CGROUP(group)->in);
}

// The non-blocking trio: v1 requests pass through unwrapped (they need no group or stream).
static dsmoe_status c_allreduce_start(dsmoe_comm_ctx *ctx, dsmoe_comm_group *group, void *buf, size_t count,
                                      dsmoe_dtype dtype, dsmoe_reduce_op op, dsmoe_comm_request **req) {
    NEED_GROUP(ctx, group, "allreduce_start");
    dsmoe_status s = v1_dtype(CCTX(ctx), "allreduce_start", dtype);
    if (s != DSMOE_OK) return s;
    return V1(ctx, allreduce_start, CGROUP(group)->in, buf, count, dtype, op, req);
}

static dsmoe_status c_request_test(dsmoe_comm_ctx *ctx, dsmoe_comm_request *req, int *done) {
    return V1(ctx, request_test, req, done);
}

static dsmoe_status c_request_wait(dsmoe_comm_ctx *ctx, dsmoe_comm_request *req) {
    return V1(ctx, request_wait, req);
}

// ------------------------------------------------------------------------------------------------
// the adapted table

static void release(dsmoe_plugin_adapter *self) {
    cadapter *a = (cadapter *)self;
    dsmoe_adapt_slot_release(&slots, a->slot, a);
    free(a);
}

dsmoe_status dsmoe_comm_adapt_v1(const dsmoe_comm_plugin_v1 *v1, const dsmoe_comm_plugin_v2 **table,
                                 dsmoe_plugin_adapter **adapter, char *errbuf, size_t errlen) {
    *table = NULL;
    *adapter = NULL;
    cadapter *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(errbuf, errlen, "out of memory for the adapter");
        return DSMOE_ERR_NOMEM;
    }
    int slot = dsmoe_adapt_slot_claim(&slots, a, v1);
    if (slot < 0) {
        free(a);
        snprintf(errbuf, errlen, "%d comm plugins of ABI 1 are loaded already, the most the adapter runs at once "
                 "(DSMOE_ADAPT_V1_SLOTS); unload one first", DSMOE_ADAPT_V1_SLOTS);
        return DSMOE_ERR_UNSUPPORTED;
    }
    int nonblocking = v1->allreduce_start && v1->request_test && v1->request_wait;
    a->base.release = release;
    a->slot = slot;
    a->v1 = v1;
    a->table = (dsmoe_comm_plugin_v2){
        .api_version = DSMOE_COMM_API_VERSION,
        .name = v1->name,
        .description = v1->description,
        .mem_kinds = v1->mem_kinds,
        .caps = DSMOE_CCAP_DETERMINISTIC | (nonblocking ? DSMOE_CCAP_NONBLOCKING : 0u),
        .mpi_abi = DSMOE_MPI_ABI_STRING,
        .params = NULL,
        .n_params = 0,

        .init = init_slots[slot],
        .finalize = c_finalize,
        .last_error = c_last_error,
        .group_create = c_group_create,
        .group_destroy = c_group_destroy,
        .group_rank = c_group_rank,
        .group_size = c_group_size,
        .alltoall = c_alltoall,
        .allreduce = c_allreduce,
        .allgather = c_allgather,
        .reduce_scatter = c_reduce_scatter, // composed from allreduce, host-memory plugins only (top of file)

        .alltoallv = c_alltoallv,
        .broadcast = c_broadcast,
        .barrier = c_barrier,
        .allreduce_start = nonblocking ? c_allreduce_start : NULL,
        .request_test = nonblocking ? c_request_test : NULL,
        .request_wait = nonblocking ? c_request_wait : NULL,
    };
    *table = &a->table;
    *adapter = &a->base;
    return DSMOE_OK;
}
