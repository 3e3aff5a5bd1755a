// tests/comm_conformance.h: what the comm conformance suite (tests/plugins/comm/test_comm_mpi.c) needs besides its
// cases, without the core (header-only): a comm plugin opened by name with dlopen, bootstraps built
// over MPI communicators, and a host queue that keeps the closures of a stream-ordered plugin until
// the test runs them.
// defines: conf_load_comm, conf_boot (conf_boot_make, conf_boot_free), conf_queue (conf_queue_enqueue,
// conf_queue_run, conf_queue_free)
#ifndef DSMOE_COMM_CONFORMANCE_H
#define DSMOE_COMM_CONFORMANCE_H
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mpi.h> // before comm_plugin.h: DSMOE_MPI_ABI_STRING then names this MPI

#include "dsmoe/comm_plugin.h"

// ------------------------------------------------------------------------------------------------
// loading: libdsmoe_comm_<name>.so from the first directory of `dirs` (':'-separated) that has it

static inline const dsmoe_comm_plugin_v2 *conf_load_comm(const char *name, const char *dirs, void **handle, char *path,
                                                  size_t path_len, char *why, size_t why_len) {
    *handle = NULL;
    char *list = strdup(dirs);
    for (char *save = NULL, *dir = strtok_r(list, ":", &save); dir; dir = strtok_r(NULL, ":", &save)) {
        snprintf(path, path_len, "%s/libdsmoe_comm_%s.so", dir, name);
        if (access(path, F_OK) == 0) break;
        path[0] = 0;
    }
    free(list);
    if (!path[0]) {
        snprintf(why, why_len, "comm plugin '%s' not found: no libdsmoe_comm_%s.so in %s (set "
                 "DSMOE_CONFORMANCE_PLUGIN_DIRS)", name, name, dirs);
        return NULL;
    }
    *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!*handle) {
        snprintf(why, why_len, "%s found but failed to load: %s", path, dlerror());
        return NULL;
    }
    dsmoe_comm_plugin_entry_fn entry = (dsmoe_comm_plugin_entry_fn)dlsym(*handle, DSMOE_COMM_PLUGIN_SYMBOL);
    const dsmoe_comm_plugin_v2 *p = entry ? entry() : NULL;
    if (!p)
        snprintf(why, why_len, "%s: %s", path, entry ? "the entry returned NULL" : "no symbol " DSMOE_COMM_PLUGIN_SYMBOL);
    return p;
}

// ------------------------------------------------------------------------------------------------
// bootstraps: the members of an MPI communicator, group rank = rank in it

typedef struct conf_boot {
    dsmoe_bootstrap b; // b.ctx points back here: keep a conf_boot where it was made
    MPI_Comm comm;     // owned
    int *world_ranks;  // (size)
} conf_boot;

static inline dsmoe_status conf_boot_allgather(void *ctx, const void *send, void *recv, size_t bytes) {
    conf_boot *cb = ctx;
    if (bytes > INT_MAX) return DSMOE_ERR_UNSUPPORTED;
    int rc = MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, cb->comm);
    return rc == MPI_SUCCESS ? DSMOE_OK : DSMOE_ERR_SYSTEM;
}

static inline dsmoe_status conf_boot_broadcast(void *ctx, void *buf, size_t bytes, int root) {
    conf_boot *cb = ctx;
    if (bytes > INT_MAX) return DSMOE_ERR_UNSUPPORTED;
    return MPI_Bcast(buf, (int)bytes, MPI_BYTE, root, cb->comm) == MPI_SUCCESS ? DSMOE_OK : DSMOE_ERR_SYSTEM;
}

// Takes comm (collective over its members).
static inline void conf_boot_make(conf_boot *cb, MPI_Comm comm) {
    int r, n, wr, wn;
    MPI_Comm_rank(comm, &r);
    MPI_Comm_size(comm, &n);
    MPI_Comm_rank(MPI_COMM_WORLD, &wr);
    MPI_Comm_size(MPI_COMM_WORLD, &wn);
    cb->comm = comm;
    cb->world_ranks = malloc((size_t)n * sizeof *cb->world_ranks);
    MPI_Allgather(&wr, 1, MPI_INT, cb->world_ranks, 1, MPI_INT, comm);
    cb->b = (dsmoe_bootstrap){.rank = r, .size = n, .world_ranks = cb->world_ranks, .world_rank = wr,
                              .world_size = wn, .ctx = cb, .allgather = conf_boot_allgather,
                              .broadcast = conf_boot_broadcast};
}

static inline void conf_boot_free(conf_boot *cb) {
    MPI_Comm_free(&cb->comm);
    free(cb->world_ranks);
    memset(cb, 0, sizeof *cb);
}

// ------------------------------------------------------------------------------------------------
// a host queue: enqueue_host keeps closures, conf_queue_run (the test's "synchronize") runs them in order

typedef struct conf_queue {
    struct conf_item {
        void (*fn)(void *arg);
        void *arg;
    } *items;
    size_t n, cap;
} conf_queue;

static inline dsmoe_status conf_queue_enqueue(void *owner, void (*fn)(void *arg), void *arg) {
    conf_queue *q = owner;
    if (!q || !fn) return DSMOE_ERR_INVALID;
    if (q->n == q->cap) {
        size_t cap = q->cap ? 2 * q->cap : 16;
        struct conf_item *grown = realloc(q->items, cap * sizeof *grown);
        if (!grown) return DSMOE_ERR_NOMEM;
        q->items = grown, q->cap = cap;
    }
    q->items[q->n++] = (struct conf_item){fn, arg};
    return DSMOE_OK;
}

static inline void conf_queue_run(conf_queue *q) {
    for (size_t i = 0; i < q->n; i++) q->items[i].fn(q->items[i].arg); // re-read: a closure may enqueue
    q->n = 0;
}

static inline void conf_queue_free(conf_queue *q) {
    free(q->items);
    memset(q, 0, sizeof *q);
}

#endif
