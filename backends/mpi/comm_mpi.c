// backends/mpi/comm_mpi.c: the "mpi" comm plugin (comm ABI v2, include/dsmoe/comm_plugin.h):
// collectives on host memory over MPI. This one file builds three plugins:
// - "mpi" (lib/dsmoe): HOST-PROGRESSED. Every collective runs at the call and ignores `stream`; caps
//   DETERMINISTIC | NONBLOCKING.
// - "mpistream" (-DCOMM_MPI_STREAM_ORDERED, test-only, <build>/tests/plugins): STREAM-ORDERED, caps
//   DETERMINISTIC. Every collective copies its arguments into a heap closure and enqueues it on the
//   caller's kernel queue (stream->enqueue_host); the closure runs the very MPI code of "mpi" when the
//   queue reaches it. Under a kernel plugin that runs host callbacks at once this behaves as "mpi";
//   under the strict test kernel plugin a collective completes only when that queue runs, so a core
//   that reads a result before ordering itself after the collective reads stale data and fails.
//   An error inside a closure is sticky: every later call returns it, and last_error gives it.
//   Lifetimes: a closure holds a reference on its group and on the context, so group_destroy and
//   finalize with closures still queued are safe (the last reference frees; the core may also
//   synchronise its queues first). The closure runs MPI on whichever thread the queue runs host
//   callbacks on: if that is not the thread that makes the other MPI calls, MPI needs
//   MPI_THREAD_MULTIPLE. A group's collectives must reach MPI in one order on every rank: keep them on
//   one queue (or order the queues), as the core keeps them in one order across ranks anyway.
// - "mpi_cuda" (-DCOMM_MPI_CUDA_AWARE, lib/dsmoe): HOST-PROGRESSED like "mpi", on HOST or CUDA memory:
//   device buffers go straight to a CUDA-aware MPI, which moves them itself (GPUDirect, or its own
//   staging). init refuses an MPI that does not say it is CUDA-aware (MPIX_Query_cuda_support). The
//   plugin never touches a buffer on the host, so its reductions are MPI's own (MPI_Allreduce,
//   MPI_Reduce_scatter_block), whose float sums are in whatever order MPI's algorithm picks: caps 0, no
//   DETERMINISTIC, and the core's fixed-order sums (core/plugins/comm_ordered.c, run.fixed_order_sums)
//   go in front of it. No NONBLOCKING: CUDA-aware MPIs differ in what their non-blocking collectives
//   take. bfloat16 and float16 sums are refused, as in "mpi" (MPI has no such type).
//
// The core owns MPI_Init/Finalize. A group is made from the bootstrap's world ranks with
// MPI_Comm_create_group (collective over the members only), with MPI_ERRORS_RETURN set on it, so every
// MPI failure on it comes back as a dsmoe_status and a last_error message built with MPI_Error_string.
// (World-level and datatype calls stay under the core's handler; they fail only when MPI is broken.)
//
// Sizes are size_t in the ABI and int in MPI. A byte block larger than max_count (the setting below,
// INT_MAX by default) travels as one element of a derived datatype of exactly that many bytes (the
// BigMPI trick); element-wise reductions are cut into pieces of at most max_count elements.
//
// Determinism: MPI_Allreduce's summation order depends on the algorithm the library picks (Open MPI's
// coll/tuned chooses recursive doubling, ring, Rabenseifner... by message size and group size; hcoll or
// ucc, MCA parameters or another MPI build choose differently), so float sums could change bits with
// the message size or the machine. Float SUM therefore does its own fixed-order reduction (see
// sum_fixed_order): every element is the sum in rank order ((x0 + x1) + x2) + ..., whatever the piece
// or chunk it falls in. reduce_scatter adds in that same order, so its block is bitwise allreduce's.
// Integer sums and MAX/MIN are exact in any order and use MPI_Allreduce.
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_mpi.h" // the context, the group, the cm_* helpers shared with comm_mpi_nonblocking.c
#if defined(COMM_MPI_CUDA_AWARE) && defined(OPEN_MPI) && OPEN_MPI
#include <mpi-ext.h> // MPIX_Query_cuda_support, where this Open MPI has the cuda extension
#endif

// MPI_Comm_create_group's tag (at most 32767, the smallest MPI_TAG_UB the standard allows).
#define GROUP_CREATE_TAG 0x6473

dsmoe_status cm_fail(mpi_env *e, dsmoe_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->error, sizeof e->error, fmt, ap);
    va_end(ap);
    return status;
}

// Turns an MPI error code into the error text: "<what> failed: <MPI's message>".
dsmoe_status cm_mpi_fail(mpi_env *e, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "MPI error code %d", rc);
    return cm_fail(e, DSMOE_ERR_SYSTEM, TAG "%s failed: %s", what, msg);
}

static dsmoe_status sticky_get(dsmoe_comm_ctx *ctx) {
    return (dsmoe_status)atomic_load_explicit(&ctx->sticky, memory_order_acquire);
}

// Checks what every call shares: a context, no sticky error, a kernel queue for a queued collective
// (stream-ordered build), a group, and buffers where bytes move.
dsmoe_status cm_check_call(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const char *op, int missing_buffer, int queued,
                           const dsmoe_comm_stream *stream) {
    if (!ctx) return DSMOE_ERR_INVALID;
    dsmoe_status s = sticky_get(ctx);
    if (s != DSMOE_OK) return cm_fail(&ctx->env, s, "%s", ctx->sticky_msg);
#ifdef COMM_MPI_STREAM_ORDERED
    if (queued && (!stream || !stream->enqueue_host))
        return cm_fail(&ctx->env, DSMOE_ERR_INVALID, TAG "%s: stream-ordered plugin '" PLUGIN_NAME "' needs a kernel "
                       "queue (stream %s)", op, stream ? "has no enqueue_host" : "is NULL");
#endif
    if (!g) return cm_fail(&ctx->env, DSMOE_ERR_INVALID, TAG "%s: group is NULL", op);
    if (missing_buffer)
        return cm_fail(&ctx->env, DSMOE_ERR_INVALID, TAG "%s: a buffer is NULL but the size is not 0", op);
    return DSMOE_OK;
}

// Grows *buf to at least need bytes; 0 on success.
int cm_grow(void **buf, size_t *bytes, size_t need) {
    if (need <= *bytes) return 0;
    void *grown = realloc(*buf, need);
    if (!grown) return -1;
    *buf = grown, *bytes = need;
    return 0;
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
// lifecycle

static const dsmoe_param_decl mpi_params[] = {
    {.name = "max_count", .type = DSMOE_PARAM_INT, .default_value = "2147483647",
     .help = "largest count handed to MPI as an int: longer byte blocks travel as one derived-datatype "
             "element, reductions go in pieces of this many elements (small values exercise those paths)"},
};

#ifdef COMM_MPI_CUDA_AWARE
// Whether the MPI library says, at run time, that it takes CUDA device buffers (Open MPI's
// MPIX_Query_cuda_support; 0 for an MPI without such a query).
static int mpi_is_cuda_aware(void) {
#if defined(MPIX_CUDA_AWARE_SUPPORT)
    return MPIX_Query_cuda_support() == 1;
#else
    return 0;
#endif
}

// An MPI that is not CUDA-aware would read device pointers as host memory and crash: refused at init,
// naming the library and what to do instead.
static dsmoe_status refuse_not_cuda_aware(char *errbuf, size_t errlen) {
    char lib[MPI_MAX_LIBRARY_VERSION_STRING] = "";
    int len = 0;
    MPI_Get_library_version(lib, &len);
    char *nl = strchr(lib, '\n');
    if (nl) *nl = 0;
    snprintf(errbuf, errlen, TAG "init: this MPI library (%s) is not CUDA-aware (MPIX_Query_cuda_support says no, "
             "or the library has no such query), so it cannot take device buffers; use run.comm_backend = nccl, or "
             "run.comm_backend = mpi (device buffers then go through the core's host staging), or build dsmoe "
             "against an MPI built with CUDA support", lib[0] ? lib : "unknown");
    return DSMOE_ERR_UNSUPPORTED;
}
#endif

// A count in [1, INT_MAX]: decimal, with an optional K, M, G (10^3, 10^6, 10^9) or Ki, Mi, Gi (2^10,
// 2^20, 2^30) suffix, as the core reads INT settings. 0 on success.
static int parse_count(const char *text, size_t *out) {
    char *end;
    if (*text < '0' || *text > '9') return -1;
    unsigned long long v = strtoull(text, &end, 10), mult = 1;
    if (*end == 'K' || *end == 'k') mult = 1000;
    else if (*end == 'M') mult = 1000000;
    else if (*end == 'G') mult = 1000000000;
    if (mult > 1 && *++end == 'i') mult = mult == 1000 ? 1ull << 10 : mult == 1000000 ? 1ull << 20 : 1ull << 30, end++;
    if (*end || v < 1 || v > INT_MAX || v * mult > INT_MAX) return -1;
    *out = (size_t)(v * mult);
    return 0;
}

static dsmoe_status mpi_init(const dsmoe_comm_options *opt, dsmoe_comm_ctx **ctx, char *errbuf, size_t errlen) {
    if (!ctx) return DSMOE_ERR_INVALID;
    *ctx = NULL;
    int initialized = 0, finalized = 0, world_size = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized) {
        snprintf(errbuf, errlen, TAG "init: MPI is %s; the core must call MPI_Init before comm init",
                 finalized ? "already finalized" : "not initialised");
        return DSMOE_ERR_INVALID;
    }
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    if (opt && opt->world && opt->world->world_size != world_size) {
        snprintf(errbuf, errlen, TAG "init: the core's world has %d ranks but MPI_COMM_WORLD has %d; this plugin "
                 "builds its groups from MPI_COMM_WORLD", opt->world->world_size, world_size);
        return DSMOE_ERR_INVALID;
    }
    size_t max_count = INT_MAX;
    const char *text = opt && opt->param_values && opt->n_param_values >= 1 ? opt->param_values[0] : NULL;
    if (text && parse_count(text, &max_count) != 0) {
        snprintf(errbuf, errlen, TAG "init: max_count='%s' is not an integer in [1, %d]", text, INT_MAX);
        return DSMOE_ERR_INVALID;
    }
#ifdef COMM_MPI_CUDA_AWARE
    if (!mpi_is_cuda_aware()) return refuse_not_cuda_aware(errbuf, errlen);
#endif
    dsmoe_comm_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(errbuf, errlen, TAG "init: out of memory");
        return DSMOE_ERR_NOMEM;
    }
    c->env.max_count = max_count;
    atomic_init(&c->refs, 1);
    atomic_flag_clear(&c->sticky_claimed);
    atomic_init(&c->sticky, DSMOE_OK);
    *ctx = c;
    return DSMOE_OK;
}

static void ctx_release(dsmoe_comm_ctx *ctx) {
    if (atomic_fetch_sub(&ctx->refs, 1) == 1) free(ctx);
}

static void mpi_finalize(dsmoe_comm_ctx *ctx) {
    if (ctx) ctx_release(ctx);
}

static const char *mpi_last_error(dsmoe_comm_ctx *ctx) {
    if (!ctx) return TAG "no context";
    return sticky_get(ctx) != DSMOE_OK ? ctx->sticky_msg : ctx->env.error;
}

// ------------------------------------------------------------------------------------------------
// groups

static void group_free(dsmoe_comm_group *g) {
    for (int k = 0; k < g->pool_len; k++) MPI_Comm_free(&g->pool[k]);
    if (g->host_comm != MPI_COMM_NULL) MPI_Comm_free(&g->host_comm);
    if (g->comm != MPI_COMM_NULL) MPI_Comm_free(&g->comm);
    free(g->pool);
    free(g->pool_busy);
    free(g->iv);
    free(g->scratch);
    free(g->pack);
    free(g);
}

static void group_release(dsmoe_comm_group *g) {
    if (atomic_fetch_sub(&g->refs, 1) == 1) group_free(g);
}

// What a member can see wrong in the bootstrap on its own ("" when nothing).
static void bootstrap_check(const dsmoe_bootstrap *b, char *why, size_t len) {
    int world_rank = -1, world_size = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    if (b->rank < 0 || b->rank >= b->size) {
        snprintf(why, len, "rank %d is not in [0, %d)", b->rank, b->size);
    } else if (b->world_size != world_size || b->world_rank != world_rank) {
        snprintf(why, len, "the bootstrap says world rank %d of %d, MPI_COMM_WORLD says %d of %d", b->world_rank,
                 b->world_size, world_rank, world_size);
    } else if (b->world_ranks[b->rank] != world_rank) {
        snprintf(why, len, "world_ranks[%d] = %d is not this process (world rank %d)", b->rank,
                 b->world_ranks[b->rank], world_rank);
    } else {
        unsigned char *seen = calloc((size_t)world_size, 1);
        if (!seen) {
            snprintf(why, len, "out of memory");
            return;
        }
        for (int i = 0; i < b->size && !*why; i++) {
            int w = b->world_ranks[i];
            if (w < 0 || w >= world_size)
                snprintf(why, len, "world_ranks[%d] = %d is not in [0, %d)", i, w, world_size);
            else if (seen[w]++) snprintf(why, len, "world rank %d appears twice in world_ranks", w);
        }
        free(seen);
    }
}

static dsmoe_status mpi_group_create(dsmoe_comm_ctx *ctx, const dsmoe_bootstrap *b, dsmoe_comm_group **group) {
    if (!ctx) return DSMOE_ERR_INVALID;
    mpi_env *e = &ctx->env;
    if (!group) return cm_fail(e, DSMOE_ERR_INVALID, TAG "group_create: group is NULL");
    *group = NULL;
    if (!b || !b->allgather || !b->world_ranks || b->size < 1)
        return cm_fail(e, DSMOE_ERR_INVALID, TAG "group_create: the bootstrap is NULL, has no members, or lacks "
                       "world_ranks or allgather");
    // Local checks, then one all-gather of the verdicts, so that every member refuses together: one
    // returning alone would leave the others waiting in MPI_Comm_create_group.
    char why[256] = "";
    bootstrap_check(b, why, sizeof why);
    int ok = why[0] == 0, bad = -1;
    int *oks = malloc((size_t)b->size * sizeof *oks);
    if (!oks) return cm_fail(e, DSMOE_ERR_NOMEM, TAG "group_create: out of memory for %d members", b->size);
    dsmoe_status s = b->allgather(b->ctx, &ok, oks, sizeof ok);
    for (int i = 0; i < b->size && s == DSMOE_OK && bad < 0; i++)
        if (!oks[i]) bad = i;
    free(oks);
    if (s != DSMOE_OK)
        return cm_fail(e, s, TAG "group_create: the bootstrap's allgather failed (%s)", dsmoe_status_name(s));
    if (!ok) return cm_fail(e, DSMOE_ERR_INVALID, TAG "group_create: bad bootstrap: %s", why);
    if (bad >= 0) return cm_fail(e, DSMOE_ERR_INVALID, TAG "group_create: member %d refused the bootstrap", bad);

    dsmoe_comm_group *g = calloc(1, sizeof *g);
    if (!g) return cm_fail(e, DSMOE_ERR_NOMEM, TAG "group_create: out of memory");
    g->comm = g->host_comm = MPI_COMM_NULL;
    atomic_init(&g->refs, 1);
    MPI_Group world, members;
    int rc = MPI_Comm_group(MPI_COMM_WORLD, &world);
    if (rc == MPI_SUCCESS) {
        rc = MPI_Group_incl(world, b->size, b->world_ranks, &members); // group rank i = world_ranks[i]
        MPI_Group_free(&world);
    }
    if (rc == MPI_SUCCESS) {
        rc = MPI_Comm_create_group(MPI_COMM_WORLD, members, GROUP_CREATE_TAG, &g->comm);
        MPI_Group_free(&members);
    }
    if (rc != MPI_SUCCESS) {
        group_free(g);
        return cm_mpi_fail(e, rc, "group_create: MPI_Comm_create_group over the bootstrap's world ranks");
    }
    rc = MPI_Comm_set_errhandler(g->comm, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(g->comm, &g->rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(g->comm, &g->size);
#ifdef COMM_MPI_STREAM_ORDERED
    if (rc == MPI_SUCCESS) rc = MPI_Comm_dup(g->comm, &g->host_comm);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_set_errhandler(g->host_comm, MPI_ERRORS_RETURN);
#endif
    if (rc != MPI_SUCCESS) {
        group_free(g);
        return cm_mpi_fail(e, rc, "group_create: setting up the group's communicator");
    }
    if (g->rank != b->rank || g->size != b->size) {
        int r = g->rank, n = g->size;
        group_free(g);
        return cm_fail(e, DSMOE_ERR_INTERNAL, TAG "group_create: MPI made rank %d of %d, the bootstrap says %d of %d",
                       r, n, b->rank, b->size);
    }
    g->iv = malloc(4 * (size_t)g->size * sizeof *g->iv);
    if (!g->iv) {
        group_free(g);
        return cm_fail(e, DSMOE_ERR_NOMEM, TAG "group_create: out of memory for %d ranks", b->size);
    }
    *group = g;
    return DSMOE_OK;
}

// Collective. Stream-ordered: closures still queued hold references, so the communicator is freed
// after the last of them has run (the core also synchronises its queue before destroying groups).
static void mpi_group_destroy(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    if (g) group_release(g);
}

static int mpi_group_rank(const dsmoe_comm_group *g) { return g ? g->rank : -1; }
static int mpi_group_size(const dsmoe_comm_group *g) { return g ? g->size : 0; }

// ------------------------------------------------------------------------------------------------
// data movement (the MPI code: run at the call, or from the queue)

static dsmoe_status do_alltoall(mpi_env *e, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf, size_t bytes) {
    byte_msg m;
    int rc = byte_msg_make(bytes, e->max_count, &m);
    if (rc == MPI_SUCCESS) rc = MPI_Alltoall(sendbuf, m.count, m.type, recvbuf, m.count, m.type, g->comm);
    byte_msg_free(&m);
    if (rc != MPI_SUCCESS) {
        char what[128];
        snprintf(what, sizeof what, "MPI_Alltoall of %zu bytes per rank over %d ranks", bytes, g->size);
        return cm_mpi_fail(e, rc, what);
    }
    return DSMOE_OK;
}

// One pairwise exchange per step: at step k send to rank+k and receive from rank-k, so every pair meets
// exactly once; each side describes its block on its own (MPI matches type signatures, not types).
static int alltoallv_pairwise(mpi_env *e, dsmoe_comm_group *g, const char *send, const size_t *scounts,
                              const size_t *sdispls, char *recv, const size_t *rcounts, const size_t *rdispls) {
    int rc = MPI_SUCCESS;
    for (int k = 0; k < g->size && rc == MPI_SUCCESS; k++) {
        int dst = (g->rank + k) % g->size, src = (g->rank - k + g->size) % g->size;
        byte_msg sm = {0, MPI_BYTE}, rm = {0, MPI_BYTE};
        rc = byte_msg_make(scounts[dst], e->max_count, &sm);
        if (rc == MPI_SUCCESS) rc = byte_msg_make(rcounts[src], e->max_count, &rm);
        if (rc == MPI_SUCCESS)
            rc = MPI_Sendrecv(scounts[dst] ? send + sdispls[dst] : send, sm.count, sm.type, dst, 0,
                              rcounts[src] ? recv + rdispls[src] : recv, rm.count, rm.type, src, 0, g->comm,
                              MPI_STATUS_IGNORE);
        byte_msg_free(&sm);
        byte_msg_free(&rm);
    }
    return rc;
}

static dsmoe_status do_alltoallv(mpi_env *e, dsmoe_comm_group *g, const void *sendbuf, const size_t *sendcounts,
                                 const size_t *sdispls, void *recvbuf, const size_t *recvcounts,
                                 const size_t *rdispls) {
    size_t sent = 0, received = 0;
    int fits = 1;
    for (int j = 0; j < g->size; j++) {
        sent += sendcounts[j];
        received += recvcounts[j];
        fits &= sendcounts[j] <= e->max_count && sdispls[j] <= e->max_count && recvcounts[j] <= e->max_count &&
                rdispls[j] <= e->max_count;
    }
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
        what = "pairwise MPI_Sendrecv (alltoallv with counts or displacements above max_count)";
        rc = alltoallv_pairwise(e, g, sendbuf, sendcounts, sdispls, recvbuf, recvcounts, rdispls);
    }
    if (rc != MPI_SUCCESS) {
        char msg[256];
        snprintf(msg, sizeof msg, "alltoallv: %s (%zu bytes out, %zu in, %d ranks)", what, sent, received, g->size);
        return cm_mpi_fail(e, rc, msg);
    }
    return DSMOE_OK;
}

static dsmoe_status do_allgather(mpi_env *e, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf, size_t bytes) {
    byte_msg m;
    int rc = byte_msg_make(bytes, e->max_count, &m);
    if (rc == MPI_SUCCESS) rc = MPI_Allgather(sendbuf, m.count, m.type, recvbuf, m.count, m.type, g->comm);
    byte_msg_free(&m);
    if (rc != MPI_SUCCESS) {
        char what[128];
        snprintf(what, sizeof what, "MPI_Allgather of %zu bytes per rank over %d ranks", bytes, g->size);
        return cm_mpi_fail(e, rc, what);
    }
    return DSMOE_OK;
}

static dsmoe_status do_broadcast(mpi_env *e, dsmoe_comm_group *g, void *buf, size_t bytes, int root) {
    byte_msg m;
    int rc = byte_msg_make(bytes, e->max_count, &m);
    if (rc == MPI_SUCCESS) rc = MPI_Bcast(buf, m.count, m.type, root, g->comm);
    byte_msg_free(&m);
    if (rc != MPI_SUCCESS) {
        char what[128];
        snprintf(what, sizeof what, "MPI_Bcast of %zu bytes from root %d over %d ranks", bytes, root, g->size);
        return cm_mpi_fail(e, rc, what);
    }
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// calls: validated at the call, then run at once (mpi) or from the caller's queue (mpistream)

typedef enum { C_ALLTOALL, C_ALLTOALLV, C_ALLGATHER, C_BROADCAST, C_ALLREDUCE, C_REDUCE_SCATTER } coll_kind;

// One collective, as the entry points validated it.
typedef struct coll {
    coll_kind kind;
    dsmoe_comm_group *g;
    const void *send;  // NULL: allreduce in place
    void *recv;        // broadcast: the buffer
    size_t n;          // bytes (alltoall, allgather, broadcast) or elements (allreduce, reduce_scatter)
    dsmoe_dtype dtype;
    dsmoe_reduce_op op;
    int root;
    const size_t *sc, *sd, *rc, *rd; // alltoallv: (size) counts and displacements
} coll;

static dsmoe_status coll_run(mpi_env *e, const coll *c) {
    switch (c->kind) {
    case C_ALLTOALL: return do_alltoall(e, c->g, c->send, c->recv, c->n);
    case C_ALLTOALLV: return do_alltoallv(e, c->g, c->send, c->sc, c->sd, c->recv, c->rc, c->rd);
    case C_ALLGATHER: return do_allgather(e, c->g, c->send, c->recv, c->n);
    case C_BROADCAST: return do_broadcast(e, c->g, c->recv, c->n, c->root);
    case C_ALLREDUCE: return cm_do_allreduce(e, c->g, c->send, c->recv, c->n, c->dtype, c->op);
    case C_REDUCE_SCATTER: return cm_do_reduce_scatter(e, c->g, c->send, c->recv, c->n, c->dtype, c->op);
    }
    return cm_fail(e, DSMOE_ERR_INTERNAL, TAG "unknown collective %d", (int)c->kind);
}

#ifdef COMM_MPI_STREAM_ORDERED
static const char *const coll_name[] = {"alltoall",  "alltoallv", "allgather",
                                        "broadcast", "allreduce", "reduce_scatter"};

// Keeps the first error of a queued collective; later ones follow from it.
static void sticky_set(dsmoe_comm_ctx *ctx, dsmoe_status s, const char *msg) {
    if (atomic_flag_test_and_set(&ctx->sticky_claimed)) return;
    snprintf(ctx->sticky_msg, sizeof ctx->sticky_msg, "%s", msg);
    atomic_store_explicit(&ctx->sticky, (int)s, memory_order_release);
}

// A queued collective: the call's arguments, and its own copy of alltoallv's arrays (consumed at the call).
typedef struct queued {
    dsmoe_comm_ctx *ctx;
    coll c;
    size_t v[]; // alltoallv: (4, size)
} queued;

static void queued_run(void *arg) {
    queued *q = arg;
    mpi_env e = {.max_count = q->ctx->env.max_count};
    dsmoe_status s = coll_run(&e, &q->c);
    if (s != DSMOE_OK) sticky_set(q->ctx, s, e.error);
    group_release(q->c.g);
    ctx_release(q->ctx);
    free(q);
}

static dsmoe_status submit(dsmoe_comm_ctx *ctx, const coll *c, const dsmoe_comm_stream *stream) {
    size_t nv = c->kind == C_ALLTOALLV ? 4 * (size_t)c->g->size : 0;
    queued *q = malloc(sizeof *q + nv * sizeof(size_t));
    if (!q) return cm_fail(&ctx->env, DSMOE_ERR_NOMEM, TAG "%s: out of memory for the queued call", coll_name[c->kind]);
    q->ctx = ctx, q->c = *c;
    if (nv) {
        size_t p = (size_t)c->g->size;
        memcpy(q->v, c->sc, p * sizeof(size_t)), memcpy(q->v + p, c->sd, p * sizeof(size_t));
        memcpy(q->v + 2 * p, c->rc, p * sizeof(size_t)), memcpy(q->v + 3 * p, c->rd, p * sizeof(size_t));
        q->c.sc = q->v, q->c.sd = q->v + p, q->c.rc = q->v + 2 * p, q->c.rd = q->v + 3 * p;
    }
    atomic_fetch_add(&ctx->refs, 1); // taken before enqueueing: a queue may run fn at once
    atomic_fetch_add(&c->g->refs, 1);
    dsmoe_status s = stream->enqueue_host(stream->owner, queued_run, q);
    if (s != DSMOE_OK) { // not queued, so not run
        cm_fail(&ctx->env, s, TAG "%s: the kernel queue refused the host callback (%s)", coll_name[c->kind],
                dsmoe_status_name(s));
        group_release(c->g);
        ctx_release(ctx); // the caller's reference remains
        free(q);
        return s;
    }
    return DSMOE_OK;
}
#else
static dsmoe_status submit(dsmoe_comm_ctx *ctx, const coll *c, const dsmoe_comm_stream *stream) {
    return coll_run(&ctx->env, c); // host-progressed: `stream` is ignored
}
#endif

static dsmoe_status mpi_alltoall(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                 size_t bytes, const dsmoe_comm_stream *stream) {
    dsmoe_status s = cm_check_call(ctx, g, "alltoall", bytes > 0 && (!sendbuf || !recvbuf), 1, stream);
    if (s != DSMOE_OK) return s;
    coll c = {.kind = C_ALLTOALL, .g = g, .send = sendbuf, .recv = recvbuf, .n = bytes};
    return submit(ctx, &c, stream);
}

static dsmoe_status mpi_alltoallv(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf,
                                  const size_t *sendcounts, const size_t *sdispls, void *recvbuf,
                                  const size_t *recvcounts, const size_t *rdispls, const dsmoe_comm_stream *stream) {
    dsmoe_status s = cm_check_call(ctx, g, "alltoallv", 0, 1, stream);
    if (s != DSMOE_OK) return s;
    if (!sendcounts || !sdispls || !recvcounts || !rdispls)
        return cm_fail(&ctx->env, DSMOE_ERR_INVALID, TAG "alltoallv: a count or displacement array is NULL");
    size_t sent = 0, received = 0;
    for (int j = 0; j < g->size; j++) sent += sendcounts[j], received += recvcounts[j];
    if ((sent && !sendbuf) || (received && !recvbuf))
        return cm_fail(&ctx->env, DSMOE_ERR_INVALID, TAG "alltoallv: a buffer is NULL but its counts are not all 0");
    coll c = {.kind = C_ALLTOALLV, .g = g, .send = sendbuf, .recv = recvbuf,
              .sc = sendcounts, .sd = sdispls, .rc = recvcounts, .rd = rdispls};
    return submit(ctx, &c, stream);
}

static dsmoe_status mpi_allgather(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                  size_t bytes, const dsmoe_comm_stream *stream) {
    dsmoe_status s = cm_check_call(ctx, g, "allgather", bytes > 0 && (!sendbuf || !recvbuf), 1, stream);
    if (s != DSMOE_OK) return s;
    coll c = {.kind = C_ALLGATHER, .g = g, .send = sendbuf, .recv = recvbuf, .n = bytes};
    return submit(ctx, &c, stream);
}

static dsmoe_status mpi_broadcast(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, void *buf, size_t bytes, int root,
                                  const dsmoe_comm_stream *stream) {
    dsmoe_status s = cm_check_call(ctx, g, "broadcast", bytes > 0 && !buf, 1, stream);
    if (s != DSMOE_OK) return s;
    if (root < 0 || root >= g->size)
        return cm_fail(&ctx->env, DSMOE_ERR_INVALID, TAG "broadcast: root %d is not a rank of this group of %d", root,
                       g->size);
    coll c = {.kind = C_BROADCAST, .g = g, .recv = buf, .n = bytes, .root = root};
    return submit(ctx, &c, stream);
}

static dsmoe_status mpi_allreduce(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                  size_t count, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                  const dsmoe_comm_stream *stream) {
    dsmoe_status s = cm_check_call(ctx, g, "allreduce", count > 0 && (!sendbuf || !recvbuf), 1, stream);
    if (s == DSMOE_OK) s = cm_check_reduction(&ctx->env, "allreduce", dtype, op);
    if (s != DSMOE_OK) return s;
    coll c = {.kind = C_ALLREDUCE, .g = g, .send = sendbuf == DSMOE_IN_PLACE ? NULL : sendbuf, .recv = recvbuf,
              .n = count, .dtype = dtype, .op = op};
    return submit(ctx, &c, stream);
}

// DSMOE_IN_PLACE is refused: the header defines it for allreduce only.
static dsmoe_status mpi_reduce_scatter(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                       size_t recvcount, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                       const dsmoe_comm_stream *stream) {
    dsmoe_status s = cm_check_call(ctx, g, "reduce_scatter", recvcount > 0 && (!sendbuf || !recvbuf), 1, stream);
    if (s == DSMOE_OK) s = cm_check_reduction(&ctx->env, "reduce_scatter", dtype, op);
    if (s != DSMOE_OK) return s;
    if (sendbuf == DSMOE_IN_PLACE)
        return cm_fail(&ctx->env, DSMOE_ERR_INVALID, TAG "reduce_scatter: sendbuf is DSMOE_IN_PLACE; pass the input");
    coll c = {.kind = C_REDUCE_SCATTER, .g = g, .send = sendbuf, .recv = recvbuf, .n = recvcount, .dtype = dtype,
              .op = op};
    return submit(ctx, &c, stream);
}

// Host-level in both builds: in mpistream it synchronises the ranks' host threads (on host_comm, so it
// never meets a queued collective), not their queues.
static dsmoe_status mpi_barrier(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    dsmoe_status s = cm_check_call(ctx, g, "barrier", 0, 0, NULL);
    if (s != DSMOE_OK) return s;
    int rc = MPI_Barrier(g->host_comm != MPI_COMM_NULL ? g->host_comm : g->comm);
    return rc == MPI_SUCCESS ? DSMOE_OK : cm_mpi_fail(&ctx->env, rc, "MPI_Barrier");
}

// ------------------------------------------------------------------------------------------------
// the table

static const dsmoe_comm_plugin_v2 mpi_plugin = {
    .api_version = DSMOE_COMM_API_VERSION,
    .name = PLUGIN_NAME,
#ifdef COMM_MPI_STREAM_ORDERED
    .description = "TEST ONLY: the mpi plugin's collectives, run from the caller's kernel queue (stream-ordered)",
    .caps = DSMOE_CCAP_STREAM_ORDERED | DSMOE_CCAP_DETERMINISTIC,
    .mem_kinds = DSMOE_MEM_HOST,
#elif defined(COMM_MPI_CUDA_AWARE)
    .description = "CUDA-aware MPI: collectives on host or CUDA device buffers (float sums in MPI's order)",
    .caps = 0,
    .mem_kinds = DSMOE_MEM_HOST | DSMOE_MEM_CUDA,
#else
    .description = "MPI collectives on host memory (float sums in fixed rank order)",
    .caps = DSMOE_CCAP_DETERMINISTIC | DSMOE_CCAP_NONBLOCKING,
    .allreduce_start = cm_allreduce_start,
    .request_test = cm_request_test,
    .request_wait = cm_request_wait,
    .mem_kinds = DSMOE_MEM_HOST,
#endif
    .mpi_abi = DSMOE_MPI_ABI_STRING,
    .params = mpi_params,
    .n_params = (int)(sizeof mpi_params / sizeof mpi_params[0]),
    .init = mpi_init,
    .finalize = mpi_finalize,
    .last_error = mpi_last_error,
    .group_create = mpi_group_create,
    .group_destroy = mpi_group_destroy,
    .group_rank = mpi_group_rank,
    .group_size = mpi_group_size,
    .alltoall = mpi_alltoall,
    .allreduce = mpi_allreduce,
    .allgather = mpi_allgather,
    .reduce_scatter = mpi_reduce_scatter,
    .alltoallv = mpi_alltoallv,
    .broadcast = mpi_broadcast,
    .barrier = mpi_barrier,
};

DSMOE_PLUGIN_EXPORT const dsmoe_comm_plugin_v2 *DSMOE_COMM_PLUGIN_ENTRY(void) { return &mpi_plugin; }
