// tests/plugins/comm/test_comm_mpi.c: the comm CONFORMANCE suite: every member of a comm plugin (comm ABI v2,
// include/dsmoe/comm_plugin.h) against naive references, on 1, 2 and 4 ranks (tests/plugins/comm/comm_mpi.cmake).
// This file has the table, data movement, groups, errors and main; comm_mpi_reductions.c the reductions
// and the stream contract; comm_conformance_suite.h what they share.
//
// Point it at any comm plugin:
//     DSMOE_CONFORMANCE_COMM=nccl ctest -L conformance
// DSMOE_CONFORMANCE_COMM names the plugin (file libdsmoe_comm_<name>.so) for every entry; without it
// each ctest entry tests its own (DSMOE_CONFORMANCE_DEFAULT_COMM: "mpi" or "mpistream"; "mpi" if unset).
// DSMOE_CONFORMANCE_PLUGIN_DIRS (':'-separated) says where to look; default $DSMOE_PLUGIN_PATH, then
// <build>/lib/dsmoe, then <build>/tests/plugins. The suite needs no core: it opens the file with dlopen, builds bootstraps over
// its own MPI communicators and gives the plugin its own host queue (tests/comm_conformance.h). A
// plugin whose mem_kinds lacks DSMOE_MEM_HOST is skipped (exit 77): the buffers here are host memory.
//
// What each check relies on:
// - every plugin: results against naive references (float sums within the error bound of summation,
//   in double); invalid arguments refused at the call with DSMOE_ERR_INVALID, nothing enqueued;
//   STREAM_ORDERED: nothing in the receive buffer and work in the queue after the call, inputs read
//   only when the queue runs (they are written after the call), results there after the queue ran;
//   host-progressed: results there on return, the queue untouched, a NULL stream accepted.
// - DETERMINISTIC: float sums bitwise the same on every rank, on repeat, in place, and reduce_scatter's
//   block bitwise allreduce's.
// - NONBLOCKING: allreduce_start/request_test/request_wait bitwise the blocking in-place allreduce.
// - a plugin that declares the INT setting "max_count" runs every case twice: at its default, and at
//   5, which sends every block above 5 bytes through the paths meant for blocks above INT_MAX.
// - this repo's plugins ("mpi", "mpistream"): float sums bitwise the sum in rank order 0, 1, ...,
//   p-1, and the texts of their error messages.
//
// Only rank 0 prints cmocka's output. A rank that sees a wrong value prints it on its own stderr, and
// every check is combined over ranks (MPI_Allreduce on MPI_COMM_WORLD, not the plugin under test)
// before asserting, so all ranks fail the same test together and nobody waits in a collective alone.
#define _GNU_SOURCE
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <mpi.h>

#include "comm_conformance_suite.h" // the shared state and checks (comm_conformance.h with it)
#ifdef CONF_VIA_LOADER
#include "plugin_loader.h" // dsmoe_plugin_load_comm, through the adapters
#endif
#include "comm_inputs.h"            // comm_pat, comm_value

const dsmoe_comm_plugin_v2 *P;
const char *plugin_name;
int mpi_family;
int stream_ordered, deterministic;
int max_count_param = -1;
int rank, size;
FILE *rank_err;
// In a sanitized build (DSMOE_SANITIZE) its reports go to rank_err too; NULL without a sanitizer runtime.
extern void __sanitizer_set_report_fd(void *fd) __attribute__((weak));
conf_queue Q;
dsmoe_comm_stream S;
conf_boot world_boot;
variant V[2];
int n_variants;

// ------------------------------------------------------------------------------------------------
// helpers (comm_conformance_suite.h)

void all_ok_(int ok, const char *what, const char *file, int line) {
    if (!ok) fprintf(rank_err, "[rank %d of %d] %s:%d: %s\n", rank, size, file, line, what), fflush(rank_err);
    int all = ok;
    MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all) {
        print_error("%s:%d: failed on at least one rank: %s\n", file, line, ok ? "(see that rank's stderr)" : what);
        _fail(file, line);
    }
}

dsmoe_status queue_flush(variant *v, dsmoe_comm_group *g) {
    if (!stream_ordered) return Q.n == 0 ? DSMOE_OK : DSMOE_ERR_INTERNAL;
    conf_queue_run(&Q);
    float z = 0, y = 0;
    dsmoe_status s = P->allreduce(v->ctx, g, &z, &y, 0, DSMOE_FLOAT32, DSMOE_SUM, &S);
    conf_queue_run(&Q);
    return s;
}

int same_on_all_ranks(const void *buf, size_t bytes) {
    char *r0 = malloc(bytes + 1);
    memcpy(r0, buf, bytes);
    MPI_Bcast(r0, (int)bytes, MPI_BYTE, 0, MPI_COMM_WORLD);
    int same = memcmp(r0, buf, bytes) == 0;
    free(r0);
    return same;
}


// ------------------------------------------------------------------------------------------------
// the table

static void test_table(void **state) {
    ALL_OK(P->api_version == DSMOE_COMM_API_VERSION && strcmp(P->name, plugin_name) == 0 && P->description &&
               P->description[0],
           "table: api_version %u, name '%s' (file for '%s'), description", P->api_version, P->name, plugin_name);
    ALL_OK((P->caps & ~(uint32_t)7) == 0, "unknown caps bits 0x%x", P->caps);
    int trio = !!P->allreduce_start + !!P->request_test + !!P->request_wait;
    ALL_OK(trio == ((P->caps & DSMOE_CCAP_NONBLOCKING) ? 3 : 0), "NONBLOCKING cap and %d of the trio", trio);
    ALL_OK(!(stream_ordered && (P->caps & DSMOE_CCAP_NONBLOCKING)), "NONBLOCKING is for host-progressed plugins");
    ALL_OK(!P->mpi_abi || strcmp(P->mpi_abi, DSMOE_MPI_ABI_STRING) == 0, "mpi_abi '%s', this MPI is '%s'",
           P->mpi_abi, DSMOE_MPI_ABI_STRING);
    uint32_t mpi_caps = stream_ordered ? DSMOE_CCAP_STREAM_ORDERED | DSMOE_CCAP_DETERMINISTIC
                                       : DSMOE_CCAP_DETERMINISTIC | DSMOE_CCAP_NONBLOCKING;
    ALL_OK(!mpi_family || (P->mpi_abi && P->caps == mpi_caps),
           "%s: caps 0x%x, mpi_abi %s", P->name, P->caps, P->mpi_abi ? P->mpi_abi : "NULL");
    ALL_OK(P->n_params >= 0 && (P->n_params == 0 || P->params), "n_params %d, params %p", P->n_params,
           (const void *)P->params);
    for (int i = 0; i < P->n_params; i++) {
        const dsmoe_param_decl *d = &P->params[i];
        int ok = d->name && d->name[0] && strspn(d->name, "abcdefghijklmnopqrstuvwxyz0123456789_") == strlen(d->name) &&
                 d->type >= DSMOE_PARAM_INT && d->type <= DSMOE_PARAM_ENUM && d->default_value && d->help &&
                 d->help[0] && (d->type != DSMOE_PARAM_ENUM || (d->choices && strstr(d->choices, d->default_value)));
        ALL_OK(ok, "setting %d ('%s'): name [a-z0-9_]+, type, default, help, choices of an ENUM", i,
               d->name ? d->name : "NULL");
    }
}

// ------------------------------------------------------------------------------------------------
// data movement

static void test_alltoall(void **state) {
    const size_t sizes[] = {0, 1, 10, 13, 64}; // 10 = 2 whole pieces of 5; 13 and 64 leave a remainder
    for (int v = 0; v < n_variants; v++)
        for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; t++) {
            size_t b = sizes[t], all = b * size + 1;
            uint8_t *send = malloc(all), *recv = malloc(all), *before = malloc(all);
            // A stream-ordered collective reads its inputs when the queue reaches it: they come late.
            for (int late = 0; late < 1 + stream_ordered; late++)
                for (int j = 0; j < size; j++)
                    for (size_t k = 0; k < b; k++) send[j * b + k] = stream_ordered && !late ? 0x5A : comm_pat(rank, j, k);
            memset(recv, 0xEE, all);
            memcpy(before, recv, all);
            ALL_STATUS(&V[v], P->alltoall(V[v].ctx, V[v].world, send, recv, b, &S), "alltoall");
            EXPECT_PENDING(recv, before, all, "alltoall");
            for (int j = 0; j < size; j++)
                for (size_t k = 0; k < b; k++) send[j * b + k] = comm_pat(rank, j, k);
            FLUSH(&V[v], V[v].world);
            int bad = 0;
            for (int i = 0; i < size; i++)
                for (size_t k = 0; k < b; k++) bad += recv[i * b + k] != comm_pat(i, rank, k);
            ALL_OK(bad == 0 && recv[b * size] == 0xEE, "alltoall %zu bytes (%s): %d wrong bytes", b, V[v].label, bad);
            free(send), free(recv), free(before);
        }
}

// Bytes rank `from` sends to rank `to`: 0, 4, 8 or 12, some pairs 0, self included.
static size_t vcount(int from, int to) { return (size_t)((from * 5 + to * 3) % 4) * 4; }

// Sends with blocks in reverse rank order and gaps of sgap bytes, receives in rank order with gaps of
// 2 bytes that must stay untouched. The count arrays are the plugin's only during the call: they are
// scribbled on right after it.
static void alltoallv_case(variant *v, size_t (*count)(int, int), size_t sgap) {
    size_t sc[64], sd[64], rc[64], rd[64], arg[4][64], stotal = 0, rtotal = 0;
    for (int j = size - 1; j >= 0; j--) sd[j] = stotal, sc[j] = count(rank, j), stotal += sc[j] + sgap;
    for (int i = 0; i < size; i++) rd[i] = rtotal, rc[i] = count(i, rank), rtotal += rc[i] + 2;
    memcpy(arg[0], sc, sizeof sc), memcpy(arg[1], sd, sizeof sd);
    memcpy(arg[2], rc, sizeof rc), memcpy(arg[3], rd, sizeof rd);
    uint8_t *send = malloc(stotal + 1), *recv = malloc(rtotal + 1), *before = malloc(rtotal + 1);
    memset(send, stream_ordered ? 0x5A : 0x11, stotal + 1);
    memset(recv, 0xEE, rtotal + 1);
    memcpy(before, recv, rtotal + 1);
    for (int j = 0; j < size && !stream_ordered; j++)
        for (size_t k = 0; k < sc[j]; k++) send[sd[j] + k] = comm_pat(rank, j, k);
    ALL_STATUS(v, P->alltoallv(v->ctx, v->world, send, arg[0], arg[1], recv, arg[2], arg[3], &S), "alltoallv");
    memset(arg, 0xFF, sizeof arg);
    EXPECT_PENDING(recv, before, rtotal + 1, "alltoallv");
    for (int j = 0; j < size; j++)
        for (size_t k = 0; k < sc[j]; k++) send[sd[j] + k] = comm_pat(rank, j, k);
    FLUSH(v, v->world);
    int bad = 0;
    for (int i = 0; i < size; i++) {
        for (size_t k = 0; k < rc[i]; k++) bad += recv[rd[i] + k] != comm_pat(i, rank, k);
        bad += recv[rd[i] + rc[i]] != 0xEE || recv[rd[i] + rc[i] + 1] != 0xEE; // the gap
    }
    ALL_OK(bad == 0, "alltoallv (%s, send gap %zu): %d wrong bytes", v->label, sgap, bad);
    free(send), free(recv), free(before);
}

static size_t zero_count(int from, int to) { return 0; }
static size_t one_count(int from, int to) { return 1; }

static void test_alltoallv(void **state) {
    if (!P->alltoallv) skip(); // optional member
    for (int v = 0; v < n_variants; v++) {
        alltoallv_case(&V[v], vcount, 3);
        alltoallv_case(&V[v], zero_count, 1);
    }
    // Under max_count = 5 only rank 0's send displacements pass the limit (gaps of 10): ranks must
    // agree on one path, or rank 0's pairwise exchange would wait forever for the others' Alltoallv.
    if (n_variants > 1) alltoallv_case(&V[1], one_count, rank == 0 ? 10 : 0);
}

static void test_allgather(void **state) {
    const size_t sizes[] = {0, 1, 13};
    for (int v = 0; v < n_variants; v++)
        for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; t++) {
            size_t b = sizes[t], all = b * size + 1;
            uint8_t *send = malloc(b + 1), *recv = malloc(all), *before = malloc(all);
            for (size_t k = 0; k < b; k++) send[k] = stream_ordered ? 0x5A : comm_pat(rank, 0, k);
            memset(recv, 0xEE, all);
            memcpy(before, recv, all);
            ALL_STATUS(&V[v], P->allgather(V[v].ctx, V[v].world, send, recv, b, &S), "allgather");
            EXPECT_PENDING(recv, before, all, "allgather");
            for (size_t k = 0; k < b; k++) send[k] = comm_pat(rank, 0, k);
            FLUSH(&V[v], V[v].world);
            int bad = 0;
            for (int i = 0; i < size; i++)
                for (size_t k = 0; k < b; k++) bad += recv[i * b + k] != comm_pat(i, 0, k);
            ALL_OK(bad == 0 && recv[b * size] == 0xEE, "allgather %zu bytes (%s): %d wrong", b, V[v].label, bad);
            free(send), free(recv), free(before);
        }
}

static void test_broadcast(void **state) {
    if (!P->broadcast) skip(); // optional member
    const size_t sizes[] = {0, 7, 13};
    int roots[2] = {size - 1, 0}; // a non-zero root first when there is one
    for (int v = 0; v < n_variants; v++)
        for (int r = 0; r < 2; r++)
            for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; t++) {
                size_t b = sizes[t];
                int root = rank == roots[r];
                uint8_t buf[16], before[16];
                for (size_t k = 0; k < sizeof buf; k++)
                    buf[k] = root ? (stream_ordered ? 0x5A : comm_pat(roots[r], 9, k)) : 0xCD;
                memcpy(before, buf, sizeof buf);
                ALL_STATUS(&V[v], P->broadcast(V[v].ctx, V[v].world, buf, b, roots[r], &S), "broadcast");
                EXPECT_PENDING(buf, before, sizeof buf, "broadcast");
                for (size_t k = 0; k < sizeof buf && root; k++) buf[k] = comm_pat(roots[r], 9, k);
                FLUSH(&V[v], V[v].world);
                int bad = 0;
                for (size_t k = 0; k < b; k++) bad += buf[k] != comm_pat(roots[r], 9, k);
                for (size_t k = b; k < sizeof buf && !root; k++) bad += buf[k] != 0xCD;
                ALL_OK(bad == 0, "broadcast %zu bytes from %d (%s): %d wrong", b, roots[r], V[v].label, bad);
            }
    if (P->barrier) ALL_STATUS(&V[0], P->barrier(V[0].ctx, V[0].world), "barrier");
}

// ------------------------------------------------------------------------------------------------
// groups

// Float SUM over the world ranks `members` (gsize of them, in group order) of comm_value(., i), i < n.
static int group_sum_ok(const float *out, const int *members, int gsize, size_t n) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        float ref = (float)comm_value(members[0], i);
        double refd = ref, sumabs = fabs(refd);
        for (int k = 1; k < gsize; k++) {
            float x = (float)comm_value(members[k], i);
            ref += x, refd += x, sumabs += fabs((double)x);
        }
        bad += !(fabs((double)out[i] - refd) <= 2.0 * gsize * FLT_EPSILON * sumabs + 1e-300) ||
               (mpi_family && memcmp(&out[i], &ref, sizeof ref) != 0);
    }
    return bad == 0;
}

// Even and odd world ranks (not contiguous) form two groups, then the world in reverse order, then
// the even ranks alone while the odd ranks make no call. The test's bootstraps are freed right after
// group_create (they are valid during the call only).
static void test_split_groups(void **state) {
    variant *v = &V[0];
    int color = rank % 2, gsize = (size - color + 1) / 2, members[64];
    for (int k = 0; k < gsize; k++) members[k] = color + 2 * k;
    MPI_Comm half;
    MPI_Comm_split(MPI_COMM_WORLD, color, rank, &half);
    conf_boot hb;
    conf_boot_make(&hb, half);
    dsmoe_comm_group *g = NULL;
    ALL_STATUS(v, P->group_create(v->ctx, &hb.b, &g), "group_create");
    conf_boot_free(&hb);
    ALL_OK(P->group_rank(g) == rank / 2 && P->group_size(g) == gsize, "group rank %d size %d, expected %d of %d",
           P->group_rank(g), P->group_size(g), rank / 2, gsize);
    enum { N = 101, B = 5 };
    float mine[N], out[N], rs_send[32 * B], rs_out[B], whole[32 * B];
    for (int i = 0; i < N; i++) mine[i] = (float)comm_value(rank, (size_t)i);
    ALL_STATUS(v, P->allreduce(v->ctx, g, mine, out, N, DSMOE_FLOAT32, DSMOE_SUM, &S), "allreduce in group");
    FLUSH(v, g);
    ALL_OK(group_sum_ok(out, members, gsize, N), "float SUM over the %s ranks", color ? "odd" : "even");
    uint8_t send[32 * 3], recv[32 * 3];
    for (int j = 0; j < gsize; j++)
        for (size_t k = 0; k < 3; k++) send[j * 3 + k] = comm_pat(rank, members[j], k);
    ALL_STATUS(v, P->alltoall(v->ctx, g, send, recv, 3, &S), "alltoall in group");
    FLUSH(v, g);
    int bad = 0;
    for (int i = 0; i < gsize; i++)
        for (size_t k = 0; k < 3; k++) bad += recv[i * 3 + k] != comm_pat(members[i], rank, k);
    ALL_OK(bad == 0, "alltoall in the %s group: %d wrong", color ? "odd" : "even", bad);
    for (int i = 0; i < gsize * B; i++) rs_send[i] = (float)comm_value(rank, (size_t)i);
    ALL_STATUS(v, P->reduce_scatter(v->ctx, g, rs_send, rs_out, B, DSMOE_FLOAT32, DSMOE_SUM, &S), "reduce_scatter");
    ALL_STATUS(v, P->allreduce(v->ctx, g, rs_send, whole, (size_t)gsize * B, DSMOE_FLOAT32, DSMOE_SUM, &S),
               "allreduce");
    FLUSH(v, g);
    ALL_OK(!deterministic || memcmp(rs_out, whole + (rank / 2) * B, sizeof rs_out) == 0,
           "DETERMINISTIC reduce_scatter in the %s group is not allreduce's block", color ? "odd" : "even");
    P->group_destroy(v->ctx, g);

    // The world in reverse order: group rank i is world rank size-1-i.
    MPI_Comm rev;
    MPI_Comm_split(MPI_COMM_WORLD, 0, size - 1 - rank, &rev);
    conf_boot rb;
    conf_boot_make(&rb, rev);
    ALL_STATUS(v, P->group_create(v->ctx, &rb.b, &g), "group_create (reversed)");
    conf_boot_free(&rb);
    ALL_OK(P->group_rank(g) == size - 1 - rank && P->group_size(g) == size, "reversed: group rank %d size %d",
           P->group_rank(g), P->group_size(g));
    uint8_t s2[64 * 2], r2[64 * 2], gat[64 * 2];
    for (int j = 0; j < size; j++)
        for (size_t k = 0; k < 2; k++) s2[j * 2 + k] = comm_pat(rank, size - 1 - j, k); // block j: group rank j
    ALL_STATUS(v, P->alltoall(v->ctx, g, s2, r2, 2, &S), "alltoall (reversed)");
    ALL_STATUS(v, P->allgather(v->ctx, g, s2, gat, 2, &S), "allgather (reversed)");
    FLUSH(v, g);
    bad = 0;
    for (int i = 0; i < size; i++)
        for (size_t k = 0; k < 2; k++)
            bad += r2[i * 2 + k] != comm_pat(size - 1 - i, rank, k) || gat[i * 2 + k] != comm_pat(size - 1 - i, size - 1, k);
    ALL_OK(bad == 0, "alltoall/allgather in the reversed world: %d wrong", bad);
    P->group_destroy(v->ctx, g);

    // The even ranks alone: group_create and collectives involve the members only.
    MPI_Comm evens;
    MPI_Comm_split(MPI_COMM_WORLD, color ? MPI_UNDEFINED : 0, rank, &evens);
    int ok = 1;
    if (!color) {
        conf_boot eb;
        conf_boot_make(&eb, evens);
        ok = P->group_create(v->ctx, &eb.b, &g) == DSMOE_OK;
        conf_boot_free(&eb);
        int32_t wr = rank, sum = -1, want = 0;
        for (int k = 0; k < gsize; k++) want += members[k];
        ok = ok && P->allreduce(v->ctx, g, &wr, &sum, 1, DSMOE_INT32, DSMOE_SUM, &S) == DSMOE_OK;
        ok = ok && queue_flush(v, g) == DSMOE_OK && sum == want;
        if (ok) P->group_destroy(v->ctx, g);
    }
    ALL_OK(ok, "a group of the even ranks alone: %s", P->last_error(v->ctx));

    // A group of one.
    MPI_Comm self;
    MPI_Comm_dup(MPI_COMM_SELF, &self);
    conf_boot sb;
    conf_boot_make(&sb, self);
    ALL_STATUS(v, P->group_create(v->ctx, &sb.b, &g), "group_create (self)");
    conf_boot_free(&sb);
    ALL_OK(P->group_rank(g) == 0 && P->group_size(g) == 1, "self group");
    float x[3] = {1.5f, -2.0f, 3.25f}, y[3], z[3];
    ALL_STATUS(v, P->allreduce(v->ctx, g, x, y, 3, DSMOE_FLOAT32, DSMOE_SUM, &S), "allreduce (self)");
    ALL_STATUS(v, P->reduce_scatter(v->ctx, g, x, z, 3, DSMOE_FLOAT32, DSMOE_SUM, &S), "reduce_scatter (self)");
    FLUSH(v, g);
    ALL_OK(memcmp(x, y, sizeof x) == 0 && memcmp(x, z, sizeof x) == 0, "a reduction over one rank is the input");
    P->group_destroy(v->ctx, g);
    P->group_destroy(v->ctx, NULL);
}

// ------------------------------------------------------------------------------------------------
// errors (all local: every rank refuses the same call before communicating, and enqueues nothing)

static void test_errors(void **state) {
    dsmoe_comm_ctx *ctx = V[0].ctx;
    dsmoe_comm_group *w = V[0].world;
    const char *msg = "";
#define REFUSED(call, text)                                                                        \
    (msg = "", (call) == DSMOE_ERR_INVALID && Q.n == 0 &&                                          \
                   (!mpi_family || strstr(msg = P->last_error(ctx), text) != NULL))
    uint8_t buf[64] = {0};
    if (P->broadcast)
        ALL_OK(REFUSED(P->broadcast(ctx, w, buf, 8, size, &S), "broadcast: root"), "root out of range: %s", msg);
    ALL_OK(REFUSED(P->allreduce(ctx, w, buf, buf + 4, 1, (dsmoe_dtype)99, DSMOE_SUM, &S), "unknown dtype 99"),
           "allreduce, bad dtype: %s", msg);
    ALL_OK(REFUSED(P->allreduce(ctx, w, buf, buf + 4, 1, DSMOE_INT32, (dsmoe_reduce_op)7, &S), "unknown op 7"),
           "allreduce, bad op: %s", msg);
    ALL_OK(REFUSED(P->reduce_scatter(ctx, w, buf, buf + 32, 1, (dsmoe_dtype)99, DSMOE_SUM, &S), "unknown dtype 99"),
           "reduce_scatter, bad dtype: %s", msg);
    if (P->alltoallv)
        ALL_OK(REFUSED(P->alltoallv(ctx, w, buf, NULL, NULL, buf, NULL, NULL, &S), "alltoallv"), "NULL counts: %s",
               msg);
    ALL_OK(REFUSED(P->alltoall(ctx, NULL, buf, buf, 1, &S), "group is NULL"), "NULL group: %s", msg);
    ALL_OK(REFUSED(P->allgather(ctx, w, NULL, buf, 1, &S), "a buffer is NULL"), "NULL buffer: %s", msg);
    ALL_OK(REFUSED(P->group_create(ctx, NULL, &(dsmoe_comm_group *){NULL}), "bootstrap"), "NULL bootstrap: %s", msg);

    // A bootstrap whose world_ranks name another process as the caller: every member refuses it
    // together (nobody is left waiting in MPI). Only this repo's plugins read world_ranks for sure.
    if (mpi_family && size >= 2) {
        MPI_Comm c;
        MPI_Comm_dup(MPI_COMM_WORLD, &c);
        conf_boot bb;
        conf_boot_make(&bb, c);
        for (int i = 0; i < size; i++) bb.world_ranks[i] = (i + 1) % size;
        ALL_OK(REFUSED(P->group_create(ctx, &bb.b, &(dsmoe_comm_group *){NULL}), "world_ranks["),
               "rotated world_ranks: %s", msg);
        conf_boot_free(&bb);
    }
    // Only members 0 and 1 swapped: the others see nothing wrong by themselves and must refuse with
    // them, not wait for them in MPI.
    if (mpi_family && size >= 3) {
        MPI_Comm c;
        MPI_Comm_dup(MPI_COMM_WORLD, &c);
        conf_boot bb;
        conf_boot_make(&bb, c);
        bb.world_ranks[0] = 1, bb.world_ranks[1] = 0;
        ALL_OK(REFUSED(P->group_create(ctx, &bb.b, &(dsmoe_comm_group *){NULL}), rank < 2 ? "world_ranks[" : "member 0"),
               "world_ranks with members 0 and 1 swapped: %s", msg);
        conf_boot_free(&bb);
    }

    // An MPI error comes back as a status with MPI's words. To cause one, ranks 0 and 1 break the
    // contract on purpose, on a context of their own: rank 1 expects 7 bytes of an 8-byte broadcast.
    // Host-progressed, the group stays usable; stream-ordered, the error surfaces after the queue ran
    // and sticks: the next call returns it without enqueueing anything.
    if (mpi_family && size >= 2) {
        MPI_Comm pair;
        MPI_Comm_split(MPI_COMM_WORLD, rank < 2 ? 0 : MPI_UNDEFINED, rank, &pair);
        int ok = 1;
        if (rank < 2) {
            dsmoe_comm_ctx *ec = NULL;
            dsmoe_comm_options opt = {.world = &world_boot.b};
            char errbuf[256];
            conf_boot pb;
            conf_boot_make(&pb, pair);
            dsmoe_comm_group *g = NULL;
            ok = P->init(&opt, &ec, errbuf, sizeof errbuf) == DSMOE_OK && P->group_create(ec, &pb.b, &g) == DSMOE_OK;
            conf_boot_free(&pb);
            dsmoe_status bs = ok ? P->broadcast(ec, g, buf, rank == 0 ? 8 : 7, 0, &S) : DSMOE_ERR_INTERNAL;
            if (stream_ordered) {
                ok &= bs == DSMOE_OK;
                conf_queue_run(&Q);
                if (rank == 1) bs = P->broadcast(ec, g, buf, 7, 0, &S);
                if (Q.n) ok = 0, Q.n = 0; // queued despite the error: dropped (leaked), or it waits for rank 0
            }
            if (rank == 1)
                ok &= bs == DSMOE_ERR_SYSTEM && strstr(P->last_error(ec), "MPI_Bcast of 7 bytes from root 0 over 2 "
                                                                        "ranks failed: MPI_ERR_TRUNCATE") != NULL;
            if (ok && !stream_ordered && P->barrier) ok = P->barrier(ec, g) == DSMOE_OK;
            P->group_destroy(ec, g);
            P->finalize(ec);
        }
        ALL_OK(ok, "truncated broadcast: see rank 1's message");
    }

    // A setting out of range is refused by init, with the message in errbuf.
    if (max_count_param >= 0) {
        const char *values[16];
        for (int i = 0; i < P->n_params && i < 16; i++) values[i] = P->params[i].default_value;
        const char *tries[3] = {"0", "x", "5K"}; // 5K = 5000 is fine
        for (int t = 0; t < 3; t++) {
            values[max_count_param] = tries[t];
            dsmoe_comm_options opt = {.param_values = values, .n_param_values = P->n_params, .world = &world_boot.b};
            char errbuf[256] = "";
            dsmoe_comm_ctx *c = (dsmoe_comm_ctx *)1;
            dsmoe_status s = P->init(&opt, &c, errbuf, sizeof errbuf);
            int want_ok = t == 2, ok = want_ok ? s == DSMOE_OK && c : s == DSMOE_ERR_INVALID && c == NULL;
            char expect[64];
            snprintf(expect, sizeof expect, "max_count='%s'", tries[t]);
            ok = ok && (want_ok || !mpi_family || strstr(errbuf, expect));
            ALL_OK(ok, "init with max_count '%s': %s, %s", tries[t], dsmoe_status_name(s), errbuf);
            if (s == DSMOE_OK) P->finalize(c);
        }
    }
    P->finalize(NULL);
#undef REFUSED
}

// ------------------------------------------------------------------------------------------------

#define DIE(...)                                                                                   \
    do {                                                                                           \
        if (rank == 0) fprintf(stderr, "test_comm_mpi: " __VA_ARGS__), fputc('\n', stderr);        \
        MPI_Finalize();                                                                            \
        return 1;                                                                                  \
    } while (0)

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    rank_err = stderr;
    if (rank != 0) { // keep this rank's own stderr for its messages; drop its copy of cmocka's report
        rank_err = fdopen(dup(2), "w");
        if (__sanitizer_set_report_fd) __sanitizer_set_report_fd((void *)(intptr_t)fileno(rank_err)); // sanitized build
        if (!freopen("/dev/null", "w", stdout) || !freopen("/dev/null", "w", stderr)) return 1;
    }
    if (size > 32) DIE("this test handles up to 32 ranks");

    const char *name = getenv("DSMOE_CONFORMANCE_COMM");
    if (!name || !*name) name = getenv("DSMOE_CONFORMANCE_DEFAULT_COMM");
    if (!name || !*name) name = "mpi";
    const char *dirs = getenv("DSMOE_CONFORMANCE_PLUGIN_DIRS"), *path_env = getenv("DSMOE_PLUGIN_PATH");
    char dir_list[4096];
    snprintf(dir_list, sizeof dir_list, "%s:%s", path_env ? path_env : "", DSMOE_CONFORMANCE_DEFAULT_DIRS);
    if (!dirs || !*dirs) dirs = dir_list; // DSMOE_PLUGIN_PATH first, as the core's search path
    char path[4096] = "", why[8192] = "";
#ifdef CONF_VIA_LOADER
    // Through the core's loader (test_comm_adapted, tests/plugins/loader/loader.cmake): a plugin of an
    // older ABI then runs behind its adapter, which the suite holds to the v2 contract.
    dsmoe_plugin_handle handle;
    dsmoe_err lerr = {0};
    memset(&handle, 0, sizeof handle);
    if (dsmoe_plugin_load_comm(name, dirs, &P, &handle, &lerr) != DSMOE_OK) DIE("%s", lerr.msg);
    snprintf(path, sizeof path, "%.3900s (comm ABI %d%s)", handle.path, handle.api_version,
             handle.adapter ? " through the core's adapter" : "");
    (void)why;
#else
    void *handle;
    P = conf_load_comm(name, dirs, &handle, path, sizeof path, why, sizeof why);
    if (!P) DIE("%s", why);
#endif
    if (!P->init || !P->finalize || !P->last_error || !P->group_create || !P->group_destroy || !P->group_rank ||
        !P->group_size || !P->alltoall || !P->allreduce || !P->allgather || !P->reduce_scatter)
        DIE("%s: a required member of the table is NULL", path);
    if (!(P->mem_kinds & DSMOE_MEM_HOST)) {
        if (rank == 0) printf("comm plugin '%s' takes no host memory (mem_kinds 0x%x); this suite uses host "
                              "buffers: skipped\n", name, P->mem_kinds);
        MPI_Finalize();
        return 77;
    }
    if (P->n_params > 16) DIE("%s declares %d settings; this test handles up to 16", path, P->n_params);
    plugin_name = name;
    mpi_family = strcmp(name, "mpi") == 0 || strcmp(name, "mpistream") == 0;
    stream_ordered = (P->caps & DSMOE_CCAP_STREAM_ORDERED) != 0;
    deterministic = (P->caps & DSMOE_CCAP_DETERMINISTIC) != 0;
    for (int i = 0; i < P->n_params && P->params; i++)
        if (P->params[i].name && strcmp(P->params[i].name, "max_count") == 0 && P->params[i].type == DSMOE_PARAM_INT)
            max_count_param = i;
    if (rank == 0)
        printf("comm conformance: '%s' from %s on %d ranks: %s%s%s\n", name, path, size,
               stream_ordered ? "stream-ordered" : "host-progressed", deterministic ? ", deterministic" : "",
               P->caps & DSMOE_CCAP_NONBLOCKING ? ", non-blocking" : "");

    MPI_Comm wc;
    MPI_Comm_dup(MPI_COMM_WORLD, &wc);
    conf_boot_make(&world_boot, wc);
    S = (dsmoe_comm_stream){.native = NULL, .enqueue_host = conf_queue_enqueue, .owner = &Q};
    n_variants = max_count_param >= 0 ? 2 : 1;
    V[0].label = "default settings";
    V[1].label = "max_count 5";
    const char *values[16];
    for (int i = 0; i < P->n_params && i < 16; i++) values[i] = P->params[i].default_value;
    if (max_count_param >= 0) values[max_count_param] = "5";
    char errbuf[1024];
    for (int v = 0; v < n_variants; v++) {
        dsmoe_comm_options opt = {.param_values = v ? values : NULL, .n_param_values = v ? P->n_params : 0,
                                  .world = &world_boot.b};
        if (P->init(&opt, &V[v].ctx, errbuf, sizeof errbuf) != DSMOE_OK) DIE("init (%s): %s", V[v].label, errbuf);
        if (strcmp(P->last_error(V[v].ctx), "") != 0) DIE("last_error is not empty after init");
        if (P->group_create(V[v].ctx, &world_boot.b, &V[v].world) != DSMOE_OK)
            DIE("group_create (%s): %s", V[v].label, P->last_error(V[v].ctx));
    }

    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_alltoall),
        cmocka_unit_test(test_alltoallv),
        cmocka_unit_test(test_allgather),
        cmocka_unit_test(test_broadcast),
        cmocka_unit_test(test_allreduce_float_sum),
        cmocka_unit_test(test_allreduce_exact_ops),
        cmocka_unit_test(test_16bit_floats),
        cmocka_unit_test(test_reduce_scatter),
        cmocka_unit_test(test_allreduce_start),
        cmocka_unit_test(test_stream_contract),
        cmocka_unit_test(test_split_groups),
        cmocka_unit_test(test_errors),
    };
    char group_name[128];
    snprintf(group_name, sizeof group_name, "comm conformance '%s'", name);
    int failed = _cmocka_run_group_tests(group_name, tests, sizeof tests / sizeof tests[0], NULL, NULL);

    conf_queue_run(&Q);
    for (int v = 0; v < n_variants; v++) {
        P->group_destroy(V[v].ctx, V[v].world);
        P->finalize(V[v].ctx);
    }
    conf_boot_free(&world_boot);
    conf_queue_free(&Q);
#ifdef CONF_VIA_LOADER
    dsmoe_plugin_unload(&handle);
#else
    dlclose(handle);
#endif
    MPI_Finalize();
    return failed ? 1 : 0;
}
