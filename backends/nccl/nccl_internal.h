// backends/nccl/nccl_internal.h: what the two files of the nccl comm plugin share (comm_nccl.c: the
// collectives and the table; nccl_comms.c: contexts, communicators, errors and the watchdog). Private to
// the plugin: nothing here is exported (the plugin is built with hidden visibility).
#ifndef DSMOE_NCCL_INTERNAL_H
#define DSMOE_NCCL_INTERNAL_H
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>

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
    char error[1024]; // last_error: the latest failed call's message (one per context: its callers make one
                      // call at a time; the watchdog thread writes sticky_msg, never this)
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

// nccl_comms.c

// Writes the caller's error text and returns s.
dsmoe_status fail(dsmoe_comm_ctx *ctx, dsmoe_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
dsmoe_status sticky_get(dsmoe_comm_ctx *ctx);
// One poll of every communicator's asynchronous error (exported for a caller that drives it itself).
DSMOE_PLUGIN_EXPORT dsmoe_status dsmoe_comm_nccl_poll(dsmoe_comm_ctx *ctx);
// Makes `what` the sticky error (naming nc's group) and aborts every listed communicator. Holds ctx->lock.
void fatal_locked(dsmoe_comm_ctx *ctx, const ncomm *nc, const char *what);
// Polls a non-blocking communicator after a call that returned r until it settles (see nccl_comms.c).
ncclResult_t settle(const dsmoe_comm_ctx *ctx, ncclComm_t comm, ncclResult_t r, int *timed_out);
// NCCL's words for r (with its last message), or the timeout, into out.
void describe(const dsmoe_comm_ctx *ctx, ncclComm_t comm, ncclResult_t r, int timed_out, char *out, size_t len);
// Drop one reference; the last one ends the group (its communicator with the last group over it) or the
// context.
void group_release(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g);
void ctx_release(dsmoe_comm_ctx *ctx);

// The table's members that live in nccl_comms.c.
#define NCCL_N_PARAMS 2
extern const dsmoe_param_decl nccl_params[NCCL_N_PARAMS];
dsmoe_status nccl_init(const dsmoe_comm_options *opt, dsmoe_comm_ctx **ctx, char *errbuf, size_t errlen);
void nccl_finalize(dsmoe_comm_ctx *ctx);
const char *nccl_last_error(dsmoe_comm_ctx *ctx);
dsmoe_status nccl_group_create(dsmoe_comm_ctx *ctx, const dsmoe_bootstrap *b, dsmoe_comm_group **group);
void nccl_group_destroy(dsmoe_comm_ctx *ctx, dsmoe_comm_group *g);
int nccl_group_rank(const dsmoe_comm_group *g);
int nccl_group_size(const dsmoe_comm_group *g);
#endif
