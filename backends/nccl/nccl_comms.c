// backends/nccl/nccl_comms.c: the nccl comm plugin's contexts, communicators, errors and watchdog
// (comm_nccl.c has the collectives and the table; docs/nccl.md the user's view).
//
// Groups: the core's bootstrap carries NCCL's unique id (rank 0 makes it, broadcast reaches the others),
// then ncclCommInitRankConfig. One NCCL communicator per distinct member list (world ranks in group
// order): a second group over the same members shares it (no NCCL call), and the last group to go
// finalises and destroys it. The core creates its groups at start-up and destroys them at exit.
//
// Errors: a failing NCCL call returns DSMOE_ERR_SYSTEM with NCCL's words. A peer whose failure NCCL sees
// (a transport's lost connection) shows up as an asynchronous error (ncclCommGetAsyncError; a hang
// raises none: NCCL has no time limit, run.watchdog ends that): a watchdog thread polls it every
// watchdog_ms, and the places that wait (group_destroy, finalize) and every call poll it too
// (dsmoe_comm_nccl_poll is the same check, exported). On one, every communicator of the context is
// aborted (ncclCommAbort: nothing is left waiting on the GPU), the message goes to the core's log, and
// every later call returns it (sticky), so the core ends the job with that message.
//
// Threads: NCCL frees a communicator in ncclCommAbort, so the watchdog's abort must never overlap
// another call on it. Every NCCL call on a listed communicator is made holding ctx->lock, and the
// communicators are non-blocking (config.blocking = 0: no call blocks waiting for a peer). A call may
// return ncclInProgress: the communicator's state then reads ncclInProgress until the call has done its
// host-side work (microseconds for an enqueue, longer when it connects to its peers), and it is polled
// until it settles before the lock is let go or another call made; meanwhile that polling does the
// watchdog's work (settle(): an asynchronous error, or wait_timeout passing, is the caller's to act on).
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nccl_internal.h"

dsmoe_status fail(dsmoe_comm_ctx *ctx, dsmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
    return s;
}

dsmoe_status sticky_get(dsmoe_comm_ctx *ctx) {
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
// In one group: newer NCCL (ncclCommAbort joins the group) raises every communicator's abort flag before
// it frees any, so that kernels of several communicators queued on one stream all quit; one by one,
// freeing the first would wait for the stream behind a kernel of a second that still waits for the lost
// peer. Older NCCL aborts each at once, as outside a group. The results are not looked at: this is the
// way out.
static void abort_all_locked(dsmoe_comm_ctx *ctx) {
    (void)ncclGroupStart();
    for (ncomm *nc = ctx->comms; nc; nc = nc->next)
        if (!nc->aborted) (void)ncclCommAbort(nc->comm), nc->aborted = 1;
    (void)ncclGroupEnd();
}

void fatal_locked(dsmoe_comm_ctx *ctx, const ncomm *nc, const char *what) {
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

// Polls a non-blocking communicator's state after a call that returned r, until it leaves
// ncclInProgress: ncclSuccess, or the error (an error the call returned at once is returned as it is).
// Past wait_timeout seconds *timed_out is set and ncclInProgress returned: the caller aborts. The caller
// holds ctx->lock, or owns a communicator no other thread can see yet.
ncclResult_t settle(const dsmoe_comm_ctx *ctx, ncclComm_t comm, ncclResult_t r, int *timed_out) {
    *timed_out = 0;
    if (r != ncclInProgress) return r;
    double t0 = now_s();
    for (unsigned polls = 0;; polls++) {
        ncclResult_t state = ncclInProgress, q = ncclCommGetAsyncError(comm, &state);
        if (q != ncclSuccess) return q;
        if (state != ncclInProgress) return state;
        if (ctx->wait_timeout_s > 0 && now_s() - t0 > ctx->wait_timeout_s) {
            *timed_out = 1;
            return ncclInProgress;
        }
        if (polls < 64) sched_yield(); // an enqueue settles in microseconds; a set-up may take seconds
        else nanosleep(&(struct timespec){0, 50000L}, NULL);
    }
}

// The words for a call that did not settle: NCCL's error and last message, or the timeout.
void describe(const dsmoe_comm_ctx *ctx, ncclComm_t comm, ncclResult_t r, int timed_out, char *out, size_t len) {
    if (timed_out) {
        snprintf(out, len, "still in progress after wait_timeout = %d s", ctx->wait_timeout_s);
        return;
    }
    const char *last = comm ? ncclGetLastError(comm) : NULL;
    snprintf(out, len, "%s%s%s", ncclGetErrorString(r), last && *last ? ": " : "", last ? last : "");
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

// Ends an unlisted communicator whose collectives have drained: ncclCommFinalize (it flushes what was
// issued and settles once the peers are done with it) then ncclCommDestroy, which then frees without
// waiting; a finalisation that fails or does not settle within wait_timeout aborts everything instead.
// Caller holds ctx->lock.
static void close_locked(dsmoe_comm_ctx *ctx, ncomm *nc) {
    if (!nc->aborted) {
        int timed_out;
        ncclResult_t r = settle(ctx, nc->comm, ncclCommFinalize(nc->comm), &timed_out);
        if (r == ncclSuccess) {
            ncclCommDestroy(nc->comm);
        } else {
            char why[512], what[640];
            describe(ctx, nc->comm, r, timed_out, why, sizeof why);
            snprintf(what, sizeof what, "ncclCommFinalize: %s", why);
            fatal_locked(ctx, nc, what); // nc is unlisted: aborted here, not by abort_all_locked
            if (!nc->aborted) ncclCommAbort(nc->comm), nc->aborted = 1;
        }
    }
    cudaEventDestroy(nc->last);
    free(nc->world_ranks);
    free(nc);
}

// ------------------------------------------------------------------------------------------------
// lifecycle

const dsmoe_param_decl nccl_params[NCCL_N_PARAMS] = {
    {.name = "watchdog_ms", .type = DSMOE_PARAM_INT, .default_value = "100",
     .help = "milliseconds between two polls of NCCL's asynchronous errors by a background thread (a failed "
             "peer then aborts the communicators); 0: no thread, errors surface at the next call"},
    {.name = "wait_timeout", .type = DSMOE_PARAM_INT, .default_value = "600",
     .help = "seconds a wait on NCCL may take before the communicators are aborted: a communicator's set-up, "
             "a call in progress, the collectives group_destroy and finalize let finish; 0: no limit"},
};

static int parse_nonneg(const char *text, int *out) {
    char *end;
    if (!text || *text < '0' || *text > '9') return -1;
    long v = strtol(text, &end, 10);
    if (*end || v < 0 || v > 86400000) return -1;
    *out = (int)v;
    return 0;
}

dsmoe_status nccl_init(const dsmoe_comm_options *opt, dsmoe_comm_ctx **ctx, char *errbuf, size_t errlen) {
    if (!ctx) return DSMOE_ERR_INVALID;
    *ctx = NULL;
    int values[NCCL_N_PARAMS] = {100, 600};
    for (int i = 0; i < NCCL_N_PARAMS; i++) {
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

void ctx_release(dsmoe_comm_ctx *ctx) {
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
        close_locked(ctx, nc);
    }
    pthread_mutex_unlock(&ctx->lock);
    pthread_mutex_destroy(&ctx->lock);
    free(ctx);
}

void nccl_finalize(dsmoe_comm_ctx *ctx) {
    if (ctx) ctx_release(ctx);
}

const char *nccl_last_error(dsmoe_comm_ctx *ctx) {
    if (!ctx) return TAG "no context";
    return sticky_get(ctx) != DSMOE_OK ? ctx->sticky_msg : ctx->error;
}

// ------------------------------------------------------------------------------------------------
// groups

void group_release(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
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
        close_locked(ctx, nc);
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

// Every member's verdict on a step of the set-up, all-gathered into oks (size) so that all go on or none:
// *bad is the first member that failed, or -1. Returns the bootstrap's status.
static dsmoe_status agree(const dsmoe_bootstrap *b, int ok, int *oks, int *bad) {
    *bad = -1;
    dsmoe_status s = b->allgather(b->ctx, &ok, oks, sizeof ok);
    for (int i = 0; i < b->size && s == DSMOE_OK && *bad < 0; i++)
        if (!oks[i]) *bad = i;
    return s;
}

static dsmoe_status agree_failed(dsmoe_comm_ctx *ctx, dsmoe_status s) {
    return fail(ctx, s, TAG "group_create: the bootstrap's allgather of the members' verdicts failed (%s)",
                dsmoe_status_name(s));
}

// The unique id as rank 0 sends it: whether it has one, and the id.
typedef struct id_msg {
    int ok;
    ncclResult_t why;
    ncclUniqueId id;
} id_msg;

dsmoe_status nccl_group_create(dsmoe_comm_ctx *ctx, const dsmoe_bootstrap *b, dsmoe_comm_group **group) {
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
    // What can fail here fails on one member alone, and the others would wait for it in the
    // communicator's set-up: every member's verdict is all-gathered first, so all go on or none.
    nc = calloc(1, sizeof *nc);
    int *wr = malloc((size_t)b->size * sizeof *wr), *oks = malloc((size_t)b->size * sizeof *oks);
    cudaError_t ce = nc ? cudaEventCreateWithFlags(&nc->last, cudaEventDisableTiming) : cudaSuccess;
    int ok = nc && wr && oks && ce == cudaSuccess, bad = -1;
    s = oks ? agree(b, ok, oks, &bad) : DSMOE_ERR_NOMEM;
    if (s != DSMOE_OK || bad >= 0) {
        if (nc && ce == cudaSuccess) cudaEventDestroy(nc->last);
        free(nc), free(wr), free(g), free(oks);
        if (ce != cudaSuccess)
            return fail(ctx, DSMOE_ERR_SYSTEM, TAG "group_create: cudaEventCreateWithFlags failed: %s",
                        cudaGetErrorString(ce));
        if (!ok || s == DSMOE_ERR_NOMEM)
            return fail(ctx, DSMOE_ERR_NOMEM, TAG "group_create: out of memory for %d members", b->size);
        if (s != DSMOE_OK) return agree_failed(ctx, s);
        return fail(ctx, DSMOE_ERR_SYSTEM, TAG "group_create: member %d of %d could not set up its side of the "
                    "communicator (see its own message)", bad, b->size);
    }
    memcpy(wr, b->world_ranks, (size_t)b->size * sizeof *wr);

    // Non-blocking (see "Threads" at the top): the set-up returns at once and is polled until it settles.
    // Its outcome is all-gathered too: a member whose set-up failed or timed out must not leave the others
    // with a communicator that waits for it in their first collective.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    int timed_out = 0;
    ncclResult_t r = ncclCommInitRankConfig(&nc->comm, b->size, m.id, b->rank, &config); // sets nc->comm first
    r = settle(ctx, nc->comm, r, &timed_out);
    char why[512] = "";
    if (r != ncclSuccess) describe(ctx, nc->comm, r, timed_out, why, sizeof why);
    s = agree(b, r == ncclSuccess, oks, &bad);
    free(oks);
    if (s != DSMOE_OK || bad >= 0) {
        if (nc->comm) ncclCommAbort(nc->comm); // also a good one: its peers will never use theirs
        cudaEventDestroy(nc->last);
        free(nc), free(wr), free(g);
        if (r != ncclSuccess)
            return fail(ctx, DSMOE_ERR_SYSTEM, TAG "group_create: ncclCommInitRankConfig (rank %d of %d): %s", b->rank,
                        b->size, why);
        if (s != DSMOE_OK) return agree_failed(ctx, s);
        return fail(ctx, DSMOE_ERR_SYSTEM, TAG "group_create: member %d of %d could not create its NCCL communicator "
                    "(see its own message)", bad, b->size);
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

void nccl_group_destroy(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g) {
    if (ctx && g) group_release(ctx, g);
}

int nccl_group_rank(const dsmoe_comm_group *g) { return g ? g->rank : -1; }
int nccl_group_size(const dsmoe_comm_group *g) { return g ? g->size : 0; }

