// backends/nccl/comm_nccl.c: the "nccl" comm plugin (comm ABI v2, include/dsmoe/comm_plugin.h):
// collectives on CUDA device memory through NCCL, STREAM-ORDERED on the kernel plugin's cudaStream_t
// (stream->native). docs/nccl.md is the user's view. This one file builds two plugins:
// - "nccl" (lib/dsmoe): linked against libnccl and the CUDA runtime; mem_kinds CUDA.
// - "ncclsim" (-DCOMM_NCCL_SIM, test-only, <build>/tests/plugins): the same code linked against
//   tests/nccl_double (NCCL's calls over MPI on host memory, run at once); mem_kinds HOST. A CUDA
//   stream orders work by itself; the double has none, so here every collective is a closure put on the
//   caller's queue (stream->enqueue_host) that issues the very NCCL calls of "nccl" when the queue runs
//   it. The comm conformance suite then sees a stream-ordered plugin and checks its ordering.
//
// Groups: the core's bootstrap carries NCCL's unique id (rank 0 makes it, broadcast reaches the others),
// then ncclCommInitRank. One NCCL communicator per distinct member list (world ranks in group order):
// a second group over the same members shares it (no NCCL call), and the last group to go destroys it.
// The core creates its groups at start-up and destroys them at exit.
//
// Collectives: all-to-all (equal and variable blocks) is a grouped ncclSend/ncclRecv to every rank,
// the rest are NCCL's own collectives. No DSMOE_CCAP_DETERMINISTIC: NCCL's float sums depend on the
// algorithm and protocol it picks (ring, tree, NVLS...), so the core uses its own fixed-order path where
// a run needs bitwise reproducibility.
//
// Errors: a failing NCCL call returns DSMOE_ERR_SYSTEM with NCCL's words. A failed or hung peer shows up
// as an asynchronous error (ncclCommGetAsyncError): a watchdog thread polls it every watchdog_ms, and the
// places that wait (group_destroy, finalize) and every call poll it too (dsmoe_comm_nccl_poll is the
// same check, exported). On one, every communicator of the context is aborted (ncclCommAbort: nothing
// is left waiting on the GPU), the message goes to the core's log, and every later call returns it
// (sticky), so the core ends the job with that message.
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "dsmoe/comm_plugin.h"

#ifdef COMM_NCCL_SIM
#define PLUGIN_NAME "ncclsim"
#else
#define PLUGIN_NAME "nccl"
#endif
#define TAG "comm " PLUGIN_NAME ": "

// One NCCL communicator, shared by the groups over the same members.
typedef struct ncomm {
    struct ncomm *next;
    ncclComm_t comm;
    int size, rank;
    int *world_ranks; // (size) the key
    int users;        // groups using it (under ctx->lock)
    cudaEvent_t last; // recorded after the latest collective: what a wait polls
    int aborted;      // ncclCommAbort was called: the handle is gone
} ncomm;

struct dsmoe_comm_ctx {
    char error[1024]; // last_error of the caller's thread
    dsmoe_log_fn log;
    void *log_user;
    int wait_timeout_s; // how long group_destroy/finalize let enqueued work finish
    int watchdog_ms;    // poll period of the watchdog thread; 0: none
    pthread_mutex_t lock; // the list of communicators and their aborted flags
    ncomm *comms;
    atomic_int refs;    // 1 for the caller, + 1 per queued closure (ncclsim)
    atomic_flag sticky_claimed;
    atomic_int sticky;  // dsmoe_status of the first fatal error; its text in sticky_msg
    char sticky_msg[1024];
    pthread_t watchdog;
    pthread_cond_t wake; // with lock, on CLOCK_MONOTONIC: ends the watchdog's wait at once when stopping
    int has_watchdog;
    atomic_int stop;
};

struct dsmoe_comm_group {
    ncomm *nc;
    int rank, size;
    atomic_int refs; // 1 for the owner, + 1 per queued closure
};

static dsmoe_status fail(dsmoe_comm_ctx *ctx, dsmoe_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static dsmoe_status fail(dsmoe_comm_ctx *ctx, dsmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
    return s;
}

static dsmoe_status sticky_get(dsmoe_comm_ctx *ctx) {
    return (dsmoe_status)atomic_load_explicit(&ctx->sticky, memory_order_acquire);
}

// Keeps the first fatal error (later ones follow from it) and logs it once.
static void sticky_set(dsmoe_comm_ctx *ctx, dsmoe_status s, const char *msg) {
    if (atomic_flag_test_and_set(&ctx->sticky_claimed)) return;
    snprintf(ctx->sticky_msg, sizeof ctx->sticky_msg, "%s", msg);
    atomic_store_explicit(&ctx->sticky, (int)s, memory_order_release);
    if (ctx->log) ctx->log(ctx->log_user, DSMOE_LOG_ERROR, msg);
}

// Aborts every communicator of ctx (caller holds ctx->lock): the job is ending, and a communicator
// left alone would keep its kernels waiting for the lost peer.
static void abort_all_locked(dsmoe_comm_ctx *ctx) {
    for (ncomm *nc = ctx->comms; nc; nc = nc->next)
        if (!nc->aborted) ncclCommAbort(nc->comm), nc->aborted = 1;
}

static void fatal_locked(dsmoe_comm_ctx *ctx, const ncomm *nc, const char *what) {
    char msg[1024];
    snprintf(msg, sizeof msg, TAG "%s (group of %d ranks, this rank %d); every NCCL communicator of this process "
             "was aborted: a peer failed, hung or lost its network, see its own output", what, nc->size, nc->rank);
    sticky_set(ctx, DSMOE_ERR_SYSTEM, msg);
    abort_all_locked(ctx);
}

// One look at every communicator's asynchronous error (caller holds ctx->lock).
static dsmoe_status poll_locked(dsmoe_comm_ctx *ctx) {
    for (ncomm *nc = ctx->comms; nc && sticky_get(ctx) == DSMOE_OK; nc = nc->next) {
        if (nc->aborted) continue;
        ncclResult_t async = ncclSuccess;
        ncclResult_t r = ncclCommGetAsyncError(nc->comm, &async);
        if (r != ncclSuccess) async = r;
        if (async != ncclSuccess && async != ncclInProgress) {
            char what[512];
            const char *last = ncclGetLastError(nc->comm);
            snprintf(what, sizeof what, "NCCL asynchronous error: %s%s%s", ncclGetErrorString(async),
                     last && *last ? ": " : "", last ? last : "");
            fatal_locked(ctx, nc, what);
        }
    }
    return sticky_get(ctx);
}

// The progress / watchdog check, exported for a core or a test that wants to drive it itself: polls
// every communicator's asynchronous error once; on one, aborts them all, and returns the sticky error
// (its text in last_error).
DSMOE_PLUGIN_EXPORT dsmoe_status dsmoe_comm_nccl_poll(dsmoe_comm_ctx *ctx) {
    if (!ctx) return DSMOE_ERR_INVALID;
    pthread_mutex_lock(&ctx->lock);
    dsmoe_status s = poll_locked(ctx);
    pthread_mutex_unlock(&ctx->lock);
    return s == DSMOE_OK ? s : fail(ctx, s, "%s", ctx->sticky_msg);
}

// Polls every watchdog_ms. It waits on a condition variable rather than sleeping so that finalize does
// not wait out a period; the lock is free while it waits.
static void *watchdog_main(void *arg) {
    dsmoe_comm_ctx *ctx = arg;
    pthread_mutex_lock(&ctx->lock);
    while (!atomic_load(&ctx->stop)) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        long ns = until.tv_nsec + (long)(ctx->watchdog_ms % 1000) * 1000000L;
        until.tv_sec += ctx->watchdog_ms / 1000 + ns / 1000000000L;
        until.tv_nsec = ns % 1000000000L;
        while (!atomic_load(&ctx->stop) && pthread_cond_timedwait(&ctx->wake, &ctx->lock, &until) != ETIMEDOUT) {}
        if (!atomic_load(&ctx->stop)) poll_locked(ctx);
    }
    pthread_mutex_unlock(&ctx->lock);
    return NULL;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

// Waits until nc's enqueued collectives are done, polling the asynchronous error; aborts everything
// on an error or after wait_timeout_s. Caller holds ctx->lock.
static void drain_locked(dsmoe_comm_ctx *ctx, ncomm *nc) {
    double t0 = now_s();
    while (!nc->aborted) {
        cudaError_t q = cudaEventQuery(nc->last);
        if (q == cudaSuccess) return;
        if (q != cudaErrorNotReady) {
            char what[256];
            snprintf(what, sizeof what, "waiting for the group's collectives: cudaEventQuery failed: %s",
                     cudaGetErrorString(q));
            fatal_locked(ctx, nc, what);
            return;
        }
        if (poll_locked(ctx) != DSMOE_OK) return;
        if (ctx->wait_timeout_s > 0 && now_s() - t0 > ctx->wait_timeout_s) {
            char what[256];
            snprintf(what, sizeof what, "the group's collectives did not finish within wait_timeout = %d s",
                     ctx->wait_timeout_s);
            fatal_locked(ctx, nc, what);
            return;
        }
        pthread_mutex_unlock(&ctx->lock); // let the watchdog in
        nanosleep(&(struct timespec){0, 1000000L}, NULL);
        pthread_mutex_lock(&ctx->lock);
    }
}

// ------------------------------------------------------------------------------------------------
// lifecycle

static const dsmoe_param_decl nccl_params[] = {
    {.name = "watchdog_ms", .type = DSMOE_PARAM_INT, .default_value = "100",
     .help = "milliseconds between two polls of NCCL's asynchronous errors by a background thread (a failed "
             "peer then aborts the communicators); 0: no thread, errors surface at the next call"},
    {.name = "wait_timeout", .type = DSMOE_PARAM_INT, .default_value = "600",
     .help = "seconds group_destroy and finalize let enqueued collectives finish before aborting the "
             "communicators; 0: no limit"},
};

static int parse_nonneg(const char *text, int *out) {
    char *end;
    if (!text || *text < '0' || *text > '9') return -1;
    long v = strtol(text, &end, 10);
    if (*end || v < 0 || v > 86400000) return -1;
    *out = (int)v;
    return 0;
}

static dsmoe_status nccl_init(const dsmoe_comm_options *opt, dsmoe_comm_ctx **ctx, char *errbuf, size_t errlen) {
    if (!ctx) return DSMOE_ERR_INVALID;
    *ctx = NULL;
    int values[2] = {100, 600};
    for (int i = 0; i < 2; i++) {
        const char *text = opt && opt->param_values && opt->n_param_values > i ? opt->param_values[i] : NULL;
        if (text && parse_nonneg(text, &values[i]) != 0) {
            snprintf(errbuf, errlen, TAG "init: %s='%s' is not an integer >= 0", nccl_params[i].name, text);
            return DSMOE_ERR_INVALID;
        }
    }
    dsmoe_comm_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(errbuf, errlen, TAG "init: out of memory");
        return DSMOE_ERR_NOMEM;
    }
    c->watchdog_ms = values[0], c->wait_timeout_s = values[1];
    if (opt) c->log = opt->log, c->log_user = opt->log_user;
    pthread_mutex_init(&c->lock, NULL);
    atomic_init(&c->refs, 1);
    atomic_flag_clear(&c->sticky_claimed);
    atomic_init(&c->sticky, DSMOE_OK);
    atomic_init(&c->stop, 0);
    if (c->watchdog_ms > 0) {
        pthread_condattr_t attr;
        int rc = pthread_condattr_init(&attr);
        if (rc == 0) {
            rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
            if (rc == 0) rc = pthread_cond_init(&c->wake, &attr);
            pthread_condattr_destroy(&attr);
        }
        if (rc == 0 && (rc = pthread_create(&c->watchdog, NULL, watchdog_main, c)) != 0) pthread_cond_destroy(&c->wake);
        if (rc != 0) {
            snprintf(errbuf, errlen, TAG "init: cannot start the watchdog thread (%s); set watchdog_ms = 0 to run "
                     "without it", strerror(rc));
            pthread_mutex_destroy(&c->lock);
            free(c);
            return DSMOE_ERR_SYSTEM;
        }
        c->has_watchdog = 1;
    }
    *ctx = c;
    return DSMOE_OK;
}

static void ctx_release(dsmoe_comm_ctx *ctx) {
    if (atomic_fetch_sub(&ctx->refs, 1) != 1) return;
    if (ctx->has_watchdog) {
        pthread_mutex_lock(&ctx->lock);
        atomic_store(&ctx->stop, 1);
        pthread_cond_signal(&ctx->wake);
        pthread_mutex_unlock(&ctx->lock);
        pthread_join(ctx->watchdog, NULL);
        pthread_cond_destroy(&ctx->wake);
    }
    pthread_mutex_lock(&ctx->lock); // groups left undestroyed: their communicators go now
    for (ncomm *nc = ctx->comms; nc; nc = nc->next) drain_locked(ctx, nc);
    while (ctx->comms) {
        ncomm *nc = ctx->comms;
        ctx->comms = nc->next;
        if (!nc->aborted) ncclCommDestroy(nc->comm);
        cudaEventDestroy(nc->last);
        free(nc->world_ranks);
        free(nc);
    }
    pthread_mutex_unlock(&ctx->lock);
    pthread_mutex_destroy(&ctx->lock);
    free(ctx);
}

static void nccl_finalize(dsmoe_comm_ctx *ctx) {
    if (ctx) ctx_release(ctx);
}

static const char *nccl_last_error(dsmoe_comm_ctx *ctx) {
    if (!ctx) return TAG "no context";
    return sticky_get(ctx) != DSMOE_OK ? ctx->sticky_msg : ctx->error;
}

// ------------------------------------------------------------------------------------------------
// groups

static void group_release(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    if (atomic_fetch_sub(&g->refs, 1) != 1) return;
    ncomm *nc = g->nc;
    free(g);
    pthread_mutex_lock(&ctx->lock);
    if (--nc->users == 0) {
        drain_locked(ctx, nc); // after its enqueued collectives, or aborted
        for (ncomm **p = &ctx->comms; *p; p = &(*p)->next)
            if (*p == nc) {
                *p = nc->next;
                break;
            }
        if (!nc->aborted) ncclCommDestroy(nc->comm);
        cudaEventDestroy(nc->last);
        free(nc->world_ranks);
        free(nc);
    }
    pthread_mutex_unlock(&ctx->lock);
}

static ncomm *find_locked(dsmoe_comm_ctx *ctx, const dsmoe_bootstrap *b) {
    for (ncomm *nc = ctx->comms; nc; nc = nc->next)
        if (!nc->aborted && nc->size == b->size &&
            memcmp(nc->world_ranks, b->world_ranks, (size_t)b->size * sizeof(int)) == 0)
            return nc;
    return NULL;
}

// The unique id as rank 0 sends it: whether it has one, and the id.
typedef struct id_msg {
    int ok;
    ncclResult_t why;
    ncclUniqueId id;
} id_msg;

static dsmoe_status nccl_group_create(dsmoe_comm_ctx *ctx, const dsmoe_bootstrap *b, dsmoe_comm_group **group) {
    if (!ctx) return DSMOE_ERR_INVALID;
    if (!group) return fail(ctx, DSMOE_ERR_INVALID, TAG "group_create: group is NULL");
    *group = NULL;
    if (!b || !b->allgather || !b->broadcast || !b->world_ranks || b->size < 1)
        return fail(ctx, DSMOE_ERR_INVALID, TAG "group_create: the bootstrap is NULL, has no members, or lacks "
                    "world_ranks, allgather or broadcast");
    if (b->rank < 0 || b->rank >= b->size)
        return fail(ctx, DSMOE_ERR_INVALID, TAG "group_create: bootstrap rank %d is not in [0, %d)", b->rank, b->size);
    dsmoe_status s = dsmoe_comm_nccl_poll(ctx);
    if (s != DSMOE_OK) return s;
    dsmoe_comm_group *g = calloc(1, sizeof *g);
    if (!g) return fail(ctx, DSMOE_ERR_NOMEM, TAG "group_create: out of memory");
    g->rank = b->rank, g->size = b->size;
    atomic_init(&g->refs, 1);

    // Every member has made and destroyed the same groups over these members, so all find the same.
    pthread_mutex_lock(&ctx->lock);
    ncomm *nc = find_locked(ctx, b);
    if (nc) nc->users++;
    pthread_mutex_unlock(&ctx->lock);
    if (nc) {
        g->nc = nc;
        *group = g;
        return DSMOE_OK;
    }

    id_msg m = {0};
    if (b->rank == 0) {
        m.why = ncclGetUniqueId(&m.id);
        m.ok = m.why == ncclSuccess;
    }
    s = b->broadcast(b->ctx, &m, sizeof m, 0); // every member learns rank 0's verdict: all go on or none
    if (s != DSMOE_OK) {
        free(g);
        return fail(ctx, s, TAG "group_create: the bootstrap's broadcast of the NCCL unique id failed (%s)",
                    dsmoe_status_name(s));
    }
    if (!m.ok) {
        free(g);
        return fail(ctx, DSMOE_ERR_SYSTEM, TAG "group_create: ncclGetUniqueId failed on the group's rank 0: %s",
                    ncclGetErrorString(m.why));
    }
    // What can fail here fails on one member alone, and the others would wait for it in
    // ncclCommInitRank: every member's verdict is all-gathered first, so all go on or none.
    nc = calloc(1, sizeof *nc);
    int *wr = malloc((size_t)b->size * sizeof *wr), *oks = malloc((size_t)b->size * sizeof *oks);
    cudaError_t ce = nc ? cudaEventCreateWithFlags(&nc->last, cudaEventDisableTiming) : cudaSuccess;
    int ok = nc && wr && oks && ce == cudaSuccess, bad = -1;
    s = oks ? b->allgather(b->ctx, &ok, oks, sizeof ok) : DSMOE_ERR_NOMEM;
    for (int i = 0; i < b->size && s == DSMOE_OK && bad < 0; i++)
        if (!oks[i]) bad = i;
    free(oks);
    if (s != DSMOE_OK || bad >= 0) {
        if (nc && ce == cudaSuccess) cudaEventDestroy(nc->last);
        free(nc), free(wr), free(g);
        if (ce != cudaSuccess)
            return fail(ctx, DSMOE_ERR_SYSTEM, TAG "group_create: cudaEventCreateWithFlags failed: %s",
                        cudaGetErrorString(ce));
        if (!ok || s == DSMOE_ERR_NOMEM)
            return fail(ctx, DSMOE_ERR_NOMEM, TAG "group_create: out of memory for %d members", b->size);
        if (s != DSMOE_OK)
            return fail(ctx, s, TAG "group_create: the bootstrap's allgather of the members' verdicts failed (%s)",
                        dsmoe_status_name(s));
        return fail(ctx, DSMOE_ERR_SYSTEM, TAG "group_create: member %d of %d could not set up its side of the "
                    "communicator (see its own message)", bad, b->size);
    }
    memcpy(wr, b->world_ranks, (size_t)b->size * sizeof *wr);
    ncclResult_t r = ncclCommInitRank(&nc->comm, b->size, m.id, b->rank);
    if (r != ncclSuccess) {
        cudaEventDestroy(nc->last);
        free(nc), free(wr), free(g);
        return fail(ctx, DSMOE_ERR_SYSTEM, TAG "group_create: ncclCommInitRank (rank %d of %d) failed: %s", b->rank,
                    b->size, ncclGetErrorString(r));
    }
    nc->size = b->size, nc->rank = b->rank, nc->world_ranks = wr, nc->users = 1;
    pthread_mutex_lock(&ctx->lock);
    nc->next = ctx->comms;
    ctx->comms = nc;
    pthread_mutex_unlock(&ctx->lock);
    g->nc = nc;
    *group = g;
    return DSMOE_OK;
}

static void nccl_group_destroy(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    if (ctx && g) group_release(ctx, g);
}

static int nccl_group_rank(const dsmoe_comm_group *g) { return g ? g->rank : -1; }
static int nccl_group_size(const dsmoe_comm_group *g) { return g ? g->size : 0; }

// ------------------------------------------------------------------------------------------------
// collectives: validated at the call, then issued on the stream (nccl) or from the queue (ncclsim)

typedef enum { C_ALLTOALL, C_ALLTOALLV, C_ALLGATHER, C_BROADCAST, C_ALLREDUCE, C_REDUCE_SCATTER } coll_kind;
static const char *const coll_name[] = {"alltoall", "alltoallv", "allgather", "broadcast", "allreduce",
                                        "reduce_scatter"};

typedef struct coll {
    coll_kind kind;
    dsmoe_comm_group *g;
    const void *send; // allreduce in place: recv
    void *recv;       // broadcast: the buffer
    size_t n;         // bytes (alltoall, allgather, broadcast) or elements (allreduce, reduce_scatter)
    ncclDataType_t dt;
    ncclRedOp_t op;
    int root;
    const size_t *sc, *sd, *rc, *rd; // alltoallv: (size) counts and displacements in bytes
} coll;

// The NCCL calls of one collective, on stream st. Equal blocks are the variable case with counts b.
static ncclResult_t issue(const coll *c, cudaStream_t st) {
    ncclComm_t comm = c->g->nc->comm;
    int p = c->g->size;
    const char *send = c->send;
    char *recv = c->recv;
    switch (c->kind) {
    case C_ALLTOALL:
    case C_ALLTOALLV: {
        if (c->kind == C_ALLTOALL && c->n == 0) return ncclSuccess;
        ncclResult_t r = ncclGroupStart(), e;
        for (int j = 0; j < p && r == ncclSuccess; j++) {
            size_t sn = c->kind == C_ALLTOALL ? c->n : c->sc[j], so = c->kind == C_ALLTOALL ? j * c->n : c->sd[j];
            size_t rn = c->kind == C_ALLTOALL ? c->n : c->rc[j], ro = c->kind == C_ALLTOALL ? j * c->n : c->rd[j];
            if (sn) r = ncclSend(send + so, sn, ncclUint8, j, comm, st);
            if (rn && r == ncclSuccess) r = ncclRecv(recv + ro, rn, ncclUint8, j, comm, st);
        }
        e = ncclGroupEnd(); // always closes the group, also after a failed call in it
        return r != ncclSuccess ? r : e;
    }
    case C_ALLGATHER: return c->n ? ncclAllGather(send, recv, c->n, ncclUint8, comm, st) : ncclSuccess;
    case C_BROADCAST: return c->n ? ncclBroadcast(recv, recv, c->n, ncclUint8, c->root, comm, st) : ncclSuccess;
    case C_ALLREDUCE: return c->n ? ncclAllReduce(send, recv, c->n, c->dt, c->op, comm, st) : ncclSuccess;
    case C_REDUCE_SCATTER: return c->n ? ncclReduceScatter(send, recv, c->n, c->dt, c->op, comm, st) : ncclSuccess;
    }
    return ncclInternalError;
}

// Issues c, records the group's `last` event after it, and turns a failure into the sticky error (an
// enqueued collective that failed leaves the communicator in an unknown state: nothing goes on).
static dsmoe_status run(dsmoe_comm_ctx *ctx, const coll *c, cudaStream_t st) {
    ncomm *nc = c->g->nc;
    ncclResult_t r = issue(c, st);
    cudaError_t ce = r == ncclSuccess ? cudaEventRecord(nc->last, st) : cudaSuccess;
    if (r == ncclSuccess && ce == cudaSuccess) return DSMOE_OK;
    char what[512];
    if (r != ncclSuccess) {
        const char *last = nc->aborted ? "" : ncclGetLastError(nc->comm);
        snprintf(what, sizeof what, "%s of %zu %s over %d ranks failed: %s%s%s", coll_name[c->kind], c->n,
                 c->kind == C_ALLREDUCE || c->kind == C_REDUCE_SCATTER ? "elements" : "bytes", c->g->size,
                 ncclGetErrorString(r), last && *last ? ": " : "", last ? last : "");
    } else {
        snprintf(what, sizeof what, "%s: cudaEventRecord failed: %s", coll_name[c->kind], cudaGetErrorString(ce));
    }
    pthread_mutex_lock(&ctx->lock);
    fatal_locked(ctx, nc, what);
    pthread_mutex_unlock(&ctx->lock);
    return fail(ctx, DSMOE_ERR_SYSTEM, "%s", ctx->sticky_msg);
}

#ifdef COMM_NCCL_SIM
// A queued collective: the call's arguments, and its own copy of alltoallv's arrays.
typedef struct queued {
    dsmoe_comm_ctx *ctx;
    coll c;
    size_t v[]; // alltoallv: (4, size)
} queued;

static void queued_run(void *arg) {
    queued *q = arg;
    if (sticky_get(q->ctx) == DSMOE_OK) run(q->ctx, &q->c, NULL); // the double has no streams
    group_release(q->ctx, q->c.g);
    ctx_release(q->ctx);
    free(q);
}

static dsmoe_status submit(dsmoe_comm_ctx *ctx, const coll *c, const dsmoe_comm_stream *stream) {
    size_t nv = c->kind == C_ALLTOALLV ? 4 * (size_t)c->g->size : 0;
    queued *q = malloc(sizeof *q + nv * sizeof(size_t));
    if (!q) return fail(ctx, DSMOE_ERR_NOMEM, TAG "%s: out of memory for the queued call", coll_name[c->kind]);
    q->ctx = ctx, q->c = *c;
    if (nv) {
        size_t p = (size_t)c->g->size;
        memcpy(q->v, c->sc, p * sizeof(size_t)), memcpy(q->v + p, c->sd, p * sizeof(size_t));
        memcpy(q->v + 2 * p, c->rc, p * sizeof(size_t)), memcpy(q->v + 3 * p, c->rd, p * sizeof(size_t));
        q->c.sc = q->v, q->c.sd = q->v + p, q->c.rc = q->v + 2 * p, q->c.rd = q->v + 3 * p;
    }
    atomic_fetch_add(&ctx->refs, 1); // before enqueueing: a queue may run fn at once
    atomic_fetch_add(&c->g->refs, 1);
    dsmoe_status s = stream->enqueue_host(stream->owner, queued_run, q);
    if (s != DSMOE_OK) {
        fail(ctx, s, TAG "%s: the kernel queue refused the host callback (%s)", coll_name[c->kind],
             dsmoe_status_name(s));
        atomic_fetch_sub(&c->g->refs, 1);
        atomic_fetch_sub(&ctx->refs, 1); // the caller's references remain
        free(q);
    }
    return s;
}
#define STREAM_OK(st) ((st) && (st)->enqueue_host)
#define STREAM_WHY(st) ((st) ? "has no enqueue_host" : "is NULL")
#else
static dsmoe_status submit(dsmoe_comm_ctx *ctx, const coll *c, const dsmoe_comm_stream *stream) {
    return run(ctx, c, (cudaStream_t)stream->native);
}
#define STREAM_OK(st) ((st) && (st)->native)
#define STREAM_WHY(st) ((st) ? "has no native cudaStream_t: is the kernel plugin a CUDA one?" : "is NULL")
#endif

// What every collective checks first: a context, no sticky error, a kernel queue, a group, buffers
// where bytes move.
static dsmoe_status check_call(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const char *op, int missing_buffer,
                               const dsmoe_comm_stream *stream) {
    if (!ctx) return DSMOE_ERR_INVALID;
    dsmoe_status s = dsmoe_comm_nccl_poll(ctx);
    if (s != DSMOE_OK) return s;
    if (!STREAM_OK(stream))
        return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: stream-ordered plugin '" PLUGIN_NAME "' needs a kernel queue "
                    "(stream %s)", op, STREAM_WHY(stream));
    if (!g) return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: group is NULL", op);
    if (missing_buffer) return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: a buffer is NULL but the size is not 0", op);
    return DSMOE_OK;
}

static dsmoe_status check_reduction(dsmoe_comm_ctx *ctx, const char *what, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                    ncclDataType_t *dt, ncclRedOp_t *nop) {
    switch (dtype) {
    case DSMOE_FLOAT32: *dt = ncclFloat32; break;
    case DSMOE_FLOAT64: *dt = ncclFloat64; break;
    case DSMOE_INT32: *dt = ncclInt32; break;
    case DSMOE_INT64: *dt = ncclInt64; break;
    case DSMOE_UINT8: *dt = ncclUint8; break;
    case DSMOE_BFLOAT16: *dt = ncclBfloat16; break;
    case DSMOE_FLOAT16: *dt = ncclFloat16; break;
    default: return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: unknown dtype %d", what, (int)dtype);
    }
    switch (op) {
    case DSMOE_SUM: *nop = ncclSum; break;
    case DSMOE_MAX: *nop = ncclMax; break;
    case DSMOE_MIN: *nop = ncclMin; break;
    default: return fail(ctx, DSMOE_ERR_INVALID, TAG "%s: unknown op %d", what, (int)op);
    }
    return DSMOE_OK;
}

static dsmoe_status nccl_alltoall(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                  size_t bytes, const dsmoe_comm_stream *stream) {
    dsmoe_status s = check_call(ctx, g, "alltoall", bytes > 0 && (!sendbuf || !recvbuf), stream);
    if (s != DSMOE_OK) return s;
    coll c = {.kind = C_ALLTOALL, .g = g, .send = sendbuf, .recv = recvbuf, .n = bytes};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_alltoallv(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf,
                                   const size_t *sendcounts, const size_t *sdispls, void *recvbuf,
                                   const size_t *recvcounts, const size_t *rdispls, const dsmoe_comm_stream *stream) {
    dsmoe_status s = check_call(ctx, g, "alltoallv", 0, stream);
    if (s != DSMOE_OK) return s;
    if (!sendcounts || !sdispls || !recvcounts || !rdispls)
        return fail(ctx, DSMOE_ERR_INVALID, TAG "alltoallv: a count or displacement array is NULL");
    size_t sent = 0, received = 0;
    for (int j = 0; j < g->size; j++) sent += sendcounts[j], received += recvcounts[j];
    if ((sent && !sendbuf) || (received && !recvbuf))
        return fail(ctx, DSMOE_ERR_INVALID, TAG "alltoallv: a buffer is NULL but its counts are not all 0");
    coll c = {.kind = C_ALLTOALLV, .g = g, .send = sendbuf, .recv = recvbuf, .n = sent,
              .sc = sendcounts, .sd = sdispls, .rc = recvcounts, .rd = rdispls};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_allgather(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                   size_t bytes, const dsmoe_comm_stream *stream) {
    dsmoe_status s = check_call(ctx, g, "allgather", bytes > 0 && (!sendbuf || !recvbuf), stream);
    if (s != DSMOE_OK) return s;
    coll c = {.kind = C_ALLGATHER, .g = g, .send = sendbuf, .recv = recvbuf, .n = bytes};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_broadcast(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, void *buf, size_t bytes, int root,
                                   const dsmoe_comm_stream *stream) {
    dsmoe_status s = check_call(ctx, g, "broadcast", bytes > 0 && !buf, stream);
    if (s != DSMOE_OK) return s;
    if (root < 0 || root >= g->size)
        return fail(ctx, DSMOE_ERR_INVALID, TAG "broadcast: root %d is not a rank of this group of %d", root, g->size);
    coll c = {.kind = C_BROADCAST, .g = g, .recv = buf, .n = bytes, .root = root};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_allreduce(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf, void *recvbuf,
                                   size_t count, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                   const dsmoe_comm_stream *stream) {
    ncclDataType_t dt;
    ncclRedOp_t nop;
    dsmoe_status s = check_call(ctx, g, "allreduce", count > 0 && (!sendbuf || !recvbuf), stream);
    if (s == DSMOE_OK) s = check_reduction(ctx, "allreduce", dtype, op, &dt, &nop);
    if (s != DSMOE_OK) return s;
    coll c = {.kind = C_ALLREDUCE, .g = g, .send = sendbuf == DSMOE_IN_PLACE ? recvbuf : sendbuf, .recv = recvbuf,
              .n = count, .dt = dt, .op = nop};
    return submit(ctx, &c, stream);
}

static dsmoe_status nccl_reduce_scatter(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g, const void *sendbuf,
                                        void *recvbuf, size_t recvcount, dsmoe_dtype dtype, dsmoe_reduce_op op,
                                        const dsmoe_comm_stream *stream) {
    ncclDataType_t dt;
    ncclRedOp_t nop;
    dsmoe_status s = check_call(ctx, g, "reduce_scatter", recvcount > 0 && (!sendbuf || !recvbuf), stream);
    if (s == DSMOE_OK) s = check_reduction(ctx, "reduce_scatter", dtype, op, &dt, &nop);
    if (s != DSMOE_OK) return s;
    if (sendbuf == DSMOE_IN_PLACE)
        return fail(ctx, DSMOE_ERR_INVALID, TAG "reduce_scatter: sendbuf is DSMOE_IN_PLACE; pass the input");
    coll c = {.kind = C_REDUCE_SCATTER, .g = g, .send = sendbuf, .recv = recvbuf, .n = recvcount, .dt = dt,
              .op = nop};
    return submit(ctx, &c, stream);
}

// ------------------------------------------------------------------------------------------------
// the table

static const dsmoe_comm_plugin_v2 nccl_plugin = {
    .api_version = DSMOE_COMM_API_VERSION,
    .name = PLUGIN_NAME,
#ifdef COMM_NCCL_SIM
    .description = "TEST ONLY: the nccl plugin over a test double of NCCL (MPI on host memory)",
    .mem_kinds = DSMOE_MEM_HOST,
#else
    .description = "NCCL collectives on CUDA device memory, stream-ordered (float sums not bitwise reproducible)",
    .mem_kinds = DSMOE_MEM_CUDA,
#endif
    .caps = DSMOE_CCAP_STREAM_ORDERED,
    .mpi_abi = NULL,
    .params = nccl_params,
    .n_params = (int)(sizeof nccl_params / sizeof nccl_params[0]),
    .init = nccl_init,
    .finalize = nccl_finalize,
    .last_error = nccl_last_error,
    .group_create = nccl_group_create,
    .group_destroy = nccl_group_destroy,
    .group_rank = nccl_group_rank,
    .group_size = nccl_group_size,
    .alltoall = nccl_alltoall,
    .allreduce = nccl_allreduce,
    .allgather = nccl_allgather,
    .reduce_scatter = nccl_reduce_scatter,
    .alltoallv = nccl_alltoallv,
    .broadcast = nccl_broadcast,
};

DSMOE_PLUGIN_EXPORT const dsmoe_comm_plugin_v2 *DSMOE_COMM_PLUGIN_ENTRY(void) { return &nccl_plugin; }
