// core/parallel/control.c: the control plane (see control.h): communicators, bootstraps for the comm plugin,
// node discovery and host-side statistics.
#include <mpi.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control.h"

struct dsmoe_ctl_group {
    MPI_Comm comm;
    int rank, size;
    int *world_ranks; // (size)
    int world_rank, world_size;
};

static dsmoe_status mpi_failed(dsmoe_err *err, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "MPI error %d", rc);
    return dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "control plane: %s failed: %s", what, msg);
}

// Takes ownership of comm: fills in ranks and the members' world ranks.
static dsmoe_status wrap(MPI_Comm comm, dsmoe_ctl_group **out, dsmoe_err *err) {
    dsmoe_ctl_group *g = calloc(1, sizeof *g);
    if (!g) {
        MPI_Comm_free(&comm);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "control plane: out of memory for a group");
    }
    g->comm = comm;
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm, &g->rank);
    MPI_Comm_size(comm, &g->size);
    MPI_Comm_rank(MPI_COMM_WORLD, &g->world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g->world_size);
    g->world_ranks = malloc((size_t)g->size * sizeof *g->world_ranks);
    int rc = g->world_ranks ? MPI_Allgather(&g->world_rank, 1, MPI_INT, g->world_ranks, 1, MPI_INT, comm) : MPI_SUCCESS;
    if (!g->world_ranks || rc != MPI_SUCCESS) {
        dsmoe_status s = g->world_ranks ? mpi_failed(err, rc, "MPI_Allgather of world ranks")
                                        : dsmoe_err_set(err, DSMOE_ERR_NOMEM, "control plane: out of memory for a group");
        dsmoe_ctl_free(g);
        return s;
    }
    *out = g;
    return DSMOE_OK;
}

dsmoe_status dsmoe_ctl_world(dsmoe_ctl_group **out, dsmoe_err *err) {
    MPI_Comm c;
    int rc = MPI_Comm_dup(MPI_COMM_WORLD, &c);
    if (rc != MPI_SUCCESS) return mpi_failed(err, rc, "MPI_Comm_dup(MPI_COMM_WORLD)");
    return wrap(c, out, err);
}

dsmoe_status dsmoe_ctl_split(const dsmoe_ctl_group *parent, int color, int key, dsmoe_ctl_group **out, dsmoe_err *err) {
    MPI_Comm c;
    int rc = MPI_Comm_split(parent->comm, color, key, &c);
    if (rc != MPI_SUCCESS) return mpi_failed(err, rc, "MPI_Comm_split");
    return wrap(c, out, err);
}

void dsmoe_ctl_free(dsmoe_ctl_group *g) {
    if (!g) return;
    if (g->comm != MPI_COMM_NULL) MPI_Comm_free(&g->comm);
    free(g->world_ranks);
    free(g);
}

int dsmoe_ctl_rank(const dsmoe_ctl_group *g) { return g->rank; }
int dsmoe_ctl_size(const dsmoe_ctl_group *g) { return g->size; }

static dsmoe_status bs_allgather(void *ctx, const void *send, void *recv, size_t bytes) {
    const dsmoe_ctl_group *g = ctx;
    if (bytes > (size_t)INT32_MAX) return DSMOE_ERR_INVALID;
    return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, g->comm) == MPI_SUCCESS
               ? DSMOE_OK : DSMOE_ERR_SYSTEM;
}

static dsmoe_status bs_broadcast(void *ctx, void *buf, size_t bytes, int root) {
    const dsmoe_ctl_group *g = ctx;
    if (bytes > (size_t)INT32_MAX) return DSMOE_ERR_INVALID;
    return MPI_Bcast(buf, (int)bytes, MPI_BYTE, root, g->comm) == MPI_SUCCESS ? DSMOE_OK : DSMOE_ERR_SYSTEM;
}

void dsmoe_ctl_bootstrap(dsmoe_ctl_group *g, dsmoe_bootstrap *bs) {
    *bs = (dsmoe_bootstrap){.rank = g->rank, .size = g->size, .world_ranks = g->world_ranks,
                            .world_rank = g->world_rank, .world_size = g->world_size, .ctx = g,
                            .allgather = bs_allgather, .broadcast = bs_broadcast};
}

dsmoe_status dsmoe_ctl_allgather(const dsmoe_ctl_group *g, const void *send, void *recv, size_t bytes, dsmoe_err *err) {
    if (bytes > (size_t)INT32_MAX)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "control plane: all-gather of %zu bytes per rank", bytes);
    int rc = MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, g->comm);
    return rc == MPI_SUCCESS ? DSMOE_OK : mpi_failed(err, rc, "MPI_Allgather");
}

dsmoe_status dsmoe_ctl_bcast(const dsmoe_ctl_group *g, void *buf, size_t bytes, dsmoe_err *err) {
    if (bytes > (size_t)INT32_MAX)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "control plane: broadcast of %zu bytes", bytes);
    int rc = MPI_Bcast(buf, (int)bytes, MPI_BYTE, 0, g->comm);
    return rc == MPI_SUCCESS ? DSMOE_OK : mpi_failed(err, rc, "MPI_Bcast");
}

dsmoe_status dsmoe_ctl_allreduce_f64(const dsmoe_ctl_group *g, double *v, int n, dsmoe_err *err) {
    int rc = MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, MPI_SUM, g->comm);
    return rc == MPI_SUCCESS ? DSMOE_OK : mpi_failed(err, rc, "MPI_Allreduce of statistics");
}

dsmoe_status dsmoe_ctl_allreduce_i64(const dsmoe_ctl_group *g, int64_t *v, int n, dsmoe_err *err) {
    int rc = MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_INT64_T, MPI_SUM, g->comm);
    return rc == MPI_SUCCESS ? DSMOE_OK : mpi_failed(err, rc, "MPI_Allreduce of statistics");
}

dsmoe_status dsmoe_ctl_gather_bytes(const dsmoe_ctl_group *g, const void *send, size_t n, char **all, size_t *total,
                                    size_t *counts, dsmoe_err *err) {
    *all = NULL;
    *total = 0;
    if (n > (size_t)INT32_MAX)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "control plane: gather of %zu bytes from one rank", n);
    int mine = (int)n, *sizes = NULL, *displs = NULL;
    if (g->rank == 0) {
        sizes = calloc((size_t)g->size, sizeof *sizes);
        displs = calloc((size_t)g->size, sizeof *displs);
    }
    int ok = g->rank != 0 || (sizes && displs), rc = MPI_Gather(&mine, 1, MPI_INT, sizes, 1, MPI_INT, 0, g->comm);
    if (rc != MPI_SUCCESS) {
        free(sizes);
        free(displs);
        return mpi_failed(err, rc, "MPI_Gather of sizes");
    }
    size_t sum = 0;
    if (g->rank == 0 && ok) {
        for (int r = 0; r < g->size; r++) {
            displs[r] = (int)sum;
            sum += (size_t)sizes[r];
            if (counts) counts[r] = (size_t)sizes[r];
        }
        // MPI_Gatherv counts displacements in int: the whole must fit.
        if (sum > (size_t)INT32_MAX) ok = 0;
        else if (!(*all = malloc(sum ? sum : 1))) ok = 0;
    }
    rc = MPI_Bcast(&ok, 1, MPI_INT, 0, g->comm); // nobody sends to a rank 0 that has no room
    if (rc == MPI_SUCCESS && ok) rc = MPI_Gatherv(send, mine, MPI_BYTE, *all, sizes, displs, MPI_BYTE, 0, g->comm);
    free(sizes);
    free(displs);
    if (rc != MPI_SUCCESS) {
        free(*all);
        *all = NULL;
        return mpi_failed(err, rc, "MPI_Gatherv of results");
    }
    if (!ok) {
        free(*all);
        *all = NULL;
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "control plane: rank 0 has no room to gather the results");
    }
    *total = sum;
    return DSMOE_OK;
}

void dsmoe_ctl_abort(int code) {
    MPI_Abort(MPI_COMM_WORLD, code);
    _exit(code); // MPI_Abort does not return; if it did, the launcher still sees this rank fail
}

// dsmoe_ctl_root_status, and whether rank 0 failed (*root_failed).
static dsmoe_status root_status(const dsmoe_ctl_group *g, dsmoe_status s, const char *others, dsmoe_err *err,
                                int *root_failed) {
    int codes[2] = {g->rank == 0 ? (int)s : 0, s != DSMOE_OK};
    *root_failed = 0;
    int rc = MPI_Allreduce(MPI_IN_PLACE, codes, 2, MPI_INT, MPI_MAX, g->comm);
    if (rc != MPI_SUCCESS) return mpi_failed(err, rc, "MPI_Allreduce of a status");
    if (codes[0] != DSMOE_OK) {
        *root_failed = 1;
        rc = MPI_Bcast(err->msg, (int)sizeof err->msg, MPI_CHAR, 0, g->comm);
        if (rc != MPI_SUCCESS) return mpi_failed(err, rc, "MPI_Bcast of rank 0's error");
        err->status = (dsmoe_status)codes[0];
        return err->status;
    }
    if (codes[1] && s == DSMOE_OK) return dsmoe_err_set(err, DSMOE_ERR_IO, "%s", others);
    return s;
}

dsmoe_status dsmoe_ctl_checks_agree(const dsmoe_ctl_group *g, dsmoe_status s, dsmoe_err *err) {
    int root_failed;
    dsmoe_status r = root_status(g, s, "another rank failed its checks (its message is above)", err, &root_failed);
    // A member that failed where rank 0 did not (a file its node cannot read) says why: the collective
    // error that rank 0 prints carries rank 0's message only.
    if (s != DSMOE_OK && !root_failed && g->rank != 0) {
        fprintf(stderr, "dsmoe: error on rank %d of %d: %s\n", g->rank, g->size, err->msg);
        fflush(stderr);
    }
    if (r != DSMOE_OK) err->scope = DSMOE_SCOPE_COLLECTIVE;
    return r;
}

dsmoe_status dsmoe_ctl_root_status(const dsmoe_ctl_group *g, dsmoe_status s, const char *others, dsmoe_err *err) {
    int root_failed;
    return root_status(g, s, others, err, &root_failed);
}

dsmoe_status dsmoe_ctl_gather_spaced(const dsmoe_ctl_group *g, const float *shard, size_t n, float *dst,
                                     dsmoe_err *err) {
    const size_t most = (size_t)1 << 30;
    int rc = MPI_SUCCESS;
    for (size_t at = 0; at < n && rc == MPI_SUCCESS; at += most) {
        int piece = (int)(n - at < most ? n - at : most);
        MPI_Datatype block, spaced;
        MPI_Type_contiguous(piece, MPI_FLOAT, &block);
        MPI_Type_create_resized(block, 0, (MPI_Aint)(n * sizeof(float)), &spaced);
        MPI_Type_commit(&spaced);
        rc = MPI_Gather(shard + at, piece, MPI_FLOAT, dst ? dst + at : NULL, 1, spaced, 0, g->comm);
        MPI_Type_free(&spaced);
        MPI_Type_free(&block);
    }
    return rc == MPI_SUCCESS ? DSMOE_OK : mpi_failed(err, rc, "MPI_Gather of a checkpoint shard");
}

dsmoe_status dsmoe_ctl_node_of_world(int *node, dsmoe_err *err) {
    MPI_Comm shared;
    int rank, size, rc = MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    rc = MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &shared);
    if (rc != MPI_SUCCESS) return mpi_failed(err, rc, "MPI_Comm_split_type(SHARED)");
    int leader = rank;
    rc = MPI_Allreduce(&rank, &leader, 1, MPI_INT, MPI_MIN, shared);
    MPI_Comm_free(&shared);
    if (rc != MPI_SUCCESS) return mpi_failed(err, rc, "MPI_Allreduce finding the node's first rank");
    int *leaders = malloc((size_t)size * sizeof *leaders);
    if (!leaders) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "control plane: out of memory for %d ranks", size);
    rc = MPI_Allgather(&leader, 1, MPI_INT, leaders, 1, MPI_INT, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS) {
        free(leaders);
        return mpi_failed(err, rc, "MPI_Allgather of node leaders");
    }
    // Node index = how many distinct leaders come before mine (leaders are the nodes' first ranks).
    int n = 0;
    for (int r = 0; r < size; r++)
        if (leaders[r] == r && r < leader) n++;
    free(leaders);
    *node = n;
    return DSMOE_OK;
}
