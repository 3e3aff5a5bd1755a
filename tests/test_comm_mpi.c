// tests/test_comm_mpi.c: the "mpi" comm plugin (backends/mpi/comm_mpi.c), loaded by name through the
// loader, run by ctest on 1, 2 and 4 ranks (tests/comm_mpi.cmake).
//
// Each test runs twice: with the plugin's real limits, and with DSMOE_COMM_MPI_MAX_COUNT=5, which
// sends every block above 5 bytes through the derived-datatype and pairwise paths meant for blocks
// above INT_MAX (too big to test here), and cuts reductions into pieces of 5 elements.
//
// Only rank 0 prints cmocka's output. A rank that sees a wrong value prints it on its own stderr, and
// every check is combined over ranks (MPI_Allreduce on MPI_COMM_WORLD, not the plugin under test)
// before asserting, so all ranks fail the same test together and nobody waits in a collective alone.
#define _GNU_SOURCE
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

#include "plugin_loader.h"

static const dsmoe_comm_plugin_v1 *P;
static int rank, size;
static FILE *rank_err; // this rank's real stderr

typedef struct variant {
    const char *label;
    dsmoe_comm_ctx *ctx;
    dsmoe_comm_group *world;
} variant;
static variant V[2]; // [0] real limits, [1] max_count = 5

// ------------------------------------------------------------------------------------------------
// helpers

static void all_ok_(int ok, const char *what, const char *file, int line) {
    if (!ok) fprintf(rank_err, "[rank %d of %d] %s:%d: %s\n", rank, size, file, line, what), fflush(rank_err);
    int all = ok;
    MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all) {
        print_error("%s:%d: failed on at least one rank: %s\n", file, line, ok ? "(see that rank's stderr)" : what);
        _fail(file, line);
    }
}
#define ALL_OK(ok, ...)                                                                            \
    do {                                                                                           \
        char what_[1024];                                                                          \
        snprintf(what_, sizeof what_, __VA_ARGS__);                                                \
        all_ok_((ok), what_, __FILE__, __LINE__);                                                  \
    } while (0)
#define ALL_STATUS(v, s, op) ALL_OK((s) == DSMOE_OK, "%s (%s): %s", op, (v)->label, P->last_error((v)->ctx))

static uint8_t pat(int from, int to, size_t k) { return (uint8_t)(from * 73 + to * 31 + (int)(k * 7) + 1); }

static uint64_t mix(uint64_t x) { // splitmix64 finaliser
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Rank r's element i: signs and exponents spread over 2^-20..2^20, so the order of a sum shows in
// its bits.
static double value(int r, size_t i) {
    uint64_t h = mix((uint64_t)r * 1000003u + i);
    double m = 0.5 + (double)(h & 0xffffff) / 16777216.0;
    return ((h >> 40) & 1 ? -1.0 : 1.0) * ldexp(m, (int)((h >> 24) % 41) - 20);
}

// ------------------------------------------------------------------------------------------------
// data movement

static void test_alltoall(void **state) {
    const size_t sizes[] = {0, 1, 10, 13, 64}; // 10 = 2 whole pieces of 5; 13 and 64 leave a remainder
    for (int v = 0; v < 2; v++)
        for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; t++) {
            size_t b = sizes[t];
            uint8_t *send = malloc(b * size + 1), *recv = malloc(b * size + 1);
            for (int j = 0; j < size; j++)
                for (size_t k = 0; k < b; k++) send[j * b + k] = pat(rank, j, k);
            memset(recv, 0xEE, b * size + 1);
            ALL_STATUS(&V[v], P->alltoall(V[v].ctx, V[v].world, send, recv, b), "alltoall");
            int bad = 0;
            for (int i = 0; i < size; i++)
                for (size_t k = 0; k < b; k++) bad += recv[i * b + k] != pat(i, rank, k);
            ALL_OK(bad == 0 && recv[b * size] == 0xEE, "alltoall %zu bytes (%s): %d wrong bytes", b, V[v].label, bad);
            free(send), free(recv);
        }
}

// Bytes rank `from` sends to rank `to`: 0, 4, 8 or 12, some pairs 0, self included.
static size_t vcount(int from, int to) { return (size_t)((from * 5 + to * 3) % 4) * 4; }

// Sends with blocks in reverse rank order and gaps of sgap bytes, receives in rank order with gaps of
// 2 bytes that must stay untouched.
static void alltoallv_case(variant *v, size_t (*count)(int, int), size_t sgap) {
    size_t sc[64], sd[64], rc[64], rd[64], stotal = 0, rtotal = 0;
    for (int j = size - 1; j >= 0; j--) sd[j] = stotal, sc[j] = count(rank, j), stotal += sc[j] + sgap;
    for (int i = 0; i < size; i++) rd[i] = rtotal, rc[i] = count(i, rank), rtotal += rc[i] + 2;
    uint8_t *send = malloc(stotal + 1), *recv = malloc(rtotal + 1);
    memset(send, 0x11, stotal + 1);
    memset(recv, 0xEE, rtotal + 1);
    for (int j = 0; j < size; j++)
        for (size_t k = 0; k < sc[j]; k++) send[sd[j] + k] = pat(rank, j, k);
    ALL_STATUS(v, P->alltoallv(v->ctx, v->world, send, sc, sd, recv, rc, rd), "alltoallv");
    int bad = 0;
    for (int i = 0; i < size; i++) {
        for (size_t k = 0; k < rc[i]; k++) bad += recv[rd[i] + k] != pat(i, rank, k);
        bad += recv[rd[i] + rc[i]] != 0xEE || recv[rd[i] + rc[i] + 1] != 0xEE; // the gap
    }
    ALL_OK(bad == 0, "alltoallv (%s, send gap %zu): %d wrong bytes", v->label, sgap, bad);
    free(send), free(recv);
}

static size_t zero_count(int from, int to) { return 0; }
static size_t one_count(int from, int to) { return 1; }

static void test_alltoallv(void **state) {
    for (int v = 0; v < 2; v++) {
        alltoallv_case(&V[v], vcount, 3);
        alltoallv_case(&V[v], zero_count, 1);
    }
}

// Under max_count = 5 only rank 0's send displacements pass the limit (gaps of 10): ranks must agree
// on one path, or rank 0's pairwise exchange would wait forever for the others' MPI_Alltoallv.
static void test_alltoallv_agrees_on_path(void **state) {
    alltoallv_case(&V[1], one_count, rank == 0 ? 10 : 0);
}

static void test_allgather(void **state) {
    const size_t sizes[] = {0, 1, 13};
    for (int v = 0; v < 2; v++)
        for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; t++) {
            size_t b = sizes[t];
            uint8_t *send = malloc(b + 1), *recv = malloc(b * size + 1);
            for (size_t k = 0; k < b; k++) send[k] = pat(rank, 0, k);
            memset(recv, 0xEE, b * size + 1);
            ALL_STATUS(&V[v], P->allgather(V[v].ctx, V[v].world, send, recv, b), "allgather");
            int bad = 0;
            for (int i = 0; i < size; i++)
                for (size_t k = 0; k < b; k++) bad += recv[i * b + k] != pat(i, 0, k);
            ALL_OK(bad == 0 && recv[b * size] == 0xEE, "allgather %zu bytes (%s): %d wrong", b, V[v].label, bad);
            free(send), free(recv);
        }
}

static void test_broadcast(void **state) {
    const size_t sizes[] = {0, 7, 13};
    int roots[2] = {size - 1, 0}; // a non-zero root first when there is one
    for (int v = 0; v < 2; v++)
        for (int r = 0; r < 2; r++)
            for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; t++) {
                size_t b = sizes[t];
                uint8_t buf[16];
                for (size_t k = 0; k < sizeof buf; k++) buf[k] = rank == roots[r] ? pat(roots[r], 9, k) : 0xCD;
                ALL_STATUS(&V[v], P->broadcast(V[v].ctx, V[v].world, buf, b, roots[r]), "broadcast");
                int bad = 0;
                for (size_t k = 0; k < b; k++) bad += buf[k] != pat(roots[r], 9, k);
                for (size_t k = b; k < sizeof buf && rank != roots[r]; k++) bad += buf[k] != 0xCD;
                ALL_OK(bad == 0, "broadcast %zu bytes from %d (%s): %d wrong", b, roots[r], V[v].label, bad);
            }
    ALL_STATUS(&V[0], P->barrier(V[0].ctx, V[0].world), "barrier");
}

// ------------------------------------------------------------------------------------------------
// reductions

// Float SUM: every rank must get exactly the float (double) sum taken in rank order 0, 1, ..., p-1,
// and the same bits again when repeated; in place too.
#define SUM_CASE(T, DT)                                                                            \
    do {                                                                                           \
        T *mine = malloc(n * sizeof(T) + 1), *out = malloc(n * sizeof(T) + 1);                     \
        T *again = malloc(n * sizeof(T) + 1), *ref = malloc(n * sizeof(T) + 1);                   \
        for (size_t i = 0; i < n; i++) {                                                           \
            mine[i] = (T)value(rank, i);                                                           \
            ref[i] = (T)value(0, i);                                                               \
            for (int q = 1; q < size; q++) ref[i] += (T)value(q, i);                               \
        }                                                                                          \
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, mine, out, n, DT, DSMOE_SUM), "allreduce");   \
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, mine, again, n, DT, DSMOE_SUM), "allreduce"); \
        int bad = 0, unstable = 0;                                                                 \
        for (size_t i = 0; i < n; i++) {                                                           \
            bad += memcmp(&out[i], &ref[i], sizeof(T)) != 0;                                       \
            unstable += memcmp(&out[i], &again[i], sizeof(T)) != 0;                                \
        }                                                                                          \
        ALL_OK(bad == 0 && unstable == 0, "%s SUM of %zu (%s): %d differ from the rank-order sum, %d "  \
               "differ on repeat", #T, n, v->label, bad, unstable);                                \
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, DSMOE_IN_PLACE, mine, n, DT, DSMOE_SUM), "allreduce"); \
        ALL_OK(memcmp(mine, ref, n * sizeof(T)) == 0, "%s SUM of %zu in place (%s)", #T, n, v->label); \
        if (size >= 3 && n >= 1000) { /* the data must be able to catch another order */           \
            int differs = 0;                                                                       \
            for (size_t i = 0; i < n; i++) {                                                       \
                T rev = (T)value(size - 1, i);                                                     \
                for (int q = size - 2; q >= 0; q--) rev += (T)value(q, i);                         \
                differs += memcmp(&rev, &ref[i], sizeof(T)) != 0;                                  \
            }                                                                                      \
            ALL_OK(differs > 0, "%s: test data is not order-sensitive", #T);                       \
        }                                                                                          \
        free(mine), free(out), free(again), free(ref);                                             \
    } while (0)

// Element counts per variant (world, then the sub-group): 3 < 4 ranks gives empty chunks.
static const size_t sum_sizes[2][5] = {{0, 1, 3, 1000, 4097}, {0, 3, 37}};
static const size_t n_sum_sizes[2] = {5, 3};

static void test_allreduce_float_sum_fixed_order(void **state) {
    for (int vi = 0; vi < 2; vi++) {
        variant *v = &V[vi];
        for (size_t t = 0; t < n_sum_sizes[vi]; t++) {
            size_t n = sum_sizes[vi][t];
            SUM_CASE(float, DSMOE_FLOAT32);
            SUM_CASE(double, DSMOE_FLOAT64);
        }
    }
}

static void test_allreduce_exact_ops(void **state) {
    const size_t n = 23;
    for (int vi = 0; vi < 2; vi++) {
        variant *v = &V[vi];
        int32_t i32[23], max32[23], sum32[23];
        int64_t i64[23], min64[23];
        uint8_t u8[23], maxu8[23];
        float f[23], maxf[23];
        for (size_t i = 0; i < n; i++) {
            max32[i] = INT32_MIN, sum32[i] = 0, min64[i] = INT64_MAX, maxu8[i] = 0, maxf[i] = -INFINITY;
            for (int q = 0; q < size; q++) {
                int32_t a = (int32_t)((q * 37 + (int)i * 11) % 101) - 50;
                int64_t b = ((int64_t)((q * 13 + (int)i * 7) % 29) - 14) * (INT64_C(1) << 40);
                uint8_t c = (uint8_t)(q * 91 + i * 17);
                float d = (float)value(q, i);
                if (q == rank) i32[i] = a, i64[i] = b, u8[i] = c, f[i] = d;
                max32[i] = a > max32[i] ? a : max32[i];
                sum32[i] += a;
                min64[i] = b < min64[i] ? b : min64[i];
                maxu8[i] = c > maxu8[i] ? c : maxu8[i];
                maxf[i] = d > maxf[i] ? d : maxf[i];
            }
        }
        int32_t o32[23];
        int64_t o64[23];
        uint8_t ou8[23];
        float of[23];
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, i32, o32, n, DSMOE_INT32, DSMOE_MAX), "allreduce");
        ALL_OK(memcmp(o32, max32, sizeof o32) == 0, "INT32 MAX (%s)", v->label);
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, i32, o32, n, DSMOE_INT32, DSMOE_SUM), "allreduce");
        ALL_OK(memcmp(o32, sum32, sizeof o32) == 0, "INT32 SUM (%s)", v->label);
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, DSMOE_IN_PLACE, i64, n, DSMOE_INT64, DSMOE_MIN), "allreduce");
        memcpy(o64, i64, sizeof o64);
        ALL_OK(memcmp(o64, min64, sizeof o64) == 0, "INT64 MIN in place (%s)", v->label);
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, u8, ou8, n, DSMOE_UINT8, DSMOE_MAX), "allreduce");
        ALL_OK(memcmp(ou8, maxu8, sizeof ou8) == 0, "UINT8 MAX (%s)", v->label);
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, f, of, n, DSMOE_FLOAT32, DSMOE_MAX), "allreduce");
        ALL_OK(memcmp(of, maxf, sizeof of) == 0, "FLOAT32 MAX (%s)", v->label);
    }
}


// allreduce_start + request_test + request_wait: bitwise the blocking in-place allreduce, with two
// requests outstanding at once (each polled while the other, and a blocking collective, run).
static void test_allreduce_start(void **state) {
    ALL_OK(P->allreduce_start && P->request_test && P->request_wait, "mpi plugin lacks the non-blocking trio");
    for (int vi = 0; vi < 2; vi++) {
        variant *v = &V[vi];
        for (size_t t = 0; t < n_sum_sizes[vi]; t++) {
            size_t n = sum_sizes[vi][t];
            float *a = malloc(n * sizeof *a + 1), *b = malloc(n * sizeof *b + 1);
            int32_t *ia = malloc(n * sizeof *ia + 4), *ib = malloc(n * sizeof *ib + 4);
            for (size_t i = 0; i < n; i++) {
                a[i] = b[i] = (float)value(rank, i);
                ia[i] = ib[i] = (int32_t)((rank * 37 + (int)i * 11) % 101) - 50;
            }
            ALL_STATUS(v, P->allreduce(v->ctx, v->world, DSMOE_IN_PLACE, b, n, DSMOE_FLOAT32, DSMOE_SUM), "allreduce");
            ALL_STATUS(v, P->allreduce(v->ctx, v->world, DSMOE_IN_PLACE, ib, n, DSMOE_INT32, DSMOE_MAX), "allreduce");
            dsmoe_comm_request *r1 = NULL, *r2 = NULL;
            ALL_STATUS(v, P->allreduce_start(v->ctx, v->world, a, n, DSMOE_FLOAT32, DSMOE_SUM, &r1), "allreduce_start");
            ALL_STATUS(v, P->allreduce_start(v->ctx, v->world, ia, n, DSMOE_INT32, DSMOE_MAX, &r2), "allreduce_start");
            int x = rank, d1 = 0, d2 = 0; // a blocking collective while both are in flight
            ALL_STATUS(v, P->allreduce(v->ctx, v->world, DSMOE_IN_PLACE, &x, 1, DSMOE_INT32, DSMOE_SUM), "allreduce");
            ALL_OK(x == size * (size - 1) / 2, "blocking allreduce amid requests (%s): %d", v->label, x);
            // Poll: completion order may differ by rank, so the checks are combined only afterwards.
            dsmoe_status ts = DSMOE_OK;
            for (int k = 0; k < 100 && !(d1 && d2) && ts == DSMOE_OK; k++) {
                if (!d2) ts = P->request_test(v->ctx, r2, &d2);
                if (!d1 && ts == DSMOE_OK) ts = P->request_test(v->ctx, r1, &d1);
            }
            ALL_STATUS(v, ts, "request_test");
            ALL_STATUS(v, P->request_wait(v->ctx, r1), "request_wait");
            ALL_STATUS(v, P->request_wait(v->ctx, r2), "request_wait");
            ALL_OK(memcmp(a, b, n * sizeof *a) == 0, "FLOAT32 SUM of %zu via allreduce_start (%s)", n, v->label);
            ALL_OK(memcmp(ia, ib, n * sizeof *ia) == 0, "INT32 MAX of %zu via allreduce_start (%s)", n, v->label);
            free(a), free(b), free(ia), free(ib);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// groups

// Even and odd world ranks form two groups; the caller's communicator is freed at once (the plugin
// keeps its own dup). Sums and exchanges must see only the group's members, in group-rank order.
static void test_split_groups(void **state) {
    variant *v = &V[0];
    int color = rank % 2;
    MPI_Comm half;
    MPI_Comm_split(MPI_COMM_WORLD, color, rank, &half);
    dsmoe_comm_group *g = NULL;
    ALL_STATUS(v, P->group_create(v->ctx, half, &g), "group_create");
    MPI_Comm_free(&half);
    int gsize = (size - color + 1) / 2;
    ALL_OK(P->group_rank(g) == rank / 2 && P->group_size(g) == gsize, "group rank %d size %d, expected %d of %d",
           P->group_rank(g), P->group_size(g), rank / 2, gsize);

    enum { N = 101 };
    float mine[N], out[N], ref[N];
    for (int i = 0; i < N; i++) {
        mine[i] = (float)value(rank, (size_t)i);
        ref[i] = (float)value(color, (size_t)i);
        for (int k = 1; k < gsize; k++) ref[i] += (float)value(color + 2 * k, (size_t)i);
    }
    ALL_STATUS(v, P->allreduce(v->ctx, g, mine, out, N, DSMOE_FLOAT32, DSMOE_SUM), "allreduce in group");
    ALL_OK(memcmp(out, ref, sizeof ref) == 0, "float SUM over the %s ranks", color ? "odd" : "even");

    uint8_t send[4 * 3], recv[4 * 3];
    for (int j = 0; j < gsize; j++)
        for (size_t k = 0; k < 3; k++) send[j * 3 + k] = pat(rank, color + 2 * j, k);
    ALL_STATUS(v, P->alltoall(v->ctx, g, send, recv, 3), "alltoall in group");
    int bad = 0;
    for (int i = 0; i < gsize; i++)
        for (size_t k = 0; k < 3; k++) bad += recv[i * 3 + k] != pat(color + 2 * i, rank, k);
    ALL_OK(bad == 0, "alltoall in the %s group: %d wrong", color ? "odd" : "even", bad);
    P->group_destroy(v->ctx, g);

    // A group of one: MPI_COMM_SELF.
    ALL_STATUS(v, P->group_create(v->ctx, MPI_COMM_SELF, &g), "group_create(self)");
    ALL_OK(P->group_rank(g) == 0 && P->group_size(g) == 1, "self group");
    float x[3] = {1.5f, -2.0f, 3.25f}, y[3];
    ALL_STATUS(v, P->allreduce(v->ctx, g, x, y, 3, DSMOE_FLOAT32, DSMOE_SUM), "allreduce(self)");
    ALL_OK(memcmp(x, y, sizeof x) == 0, "sum over one rank is the input");
    P->group_destroy(v->ctx, g);
    P->group_destroy(v->ctx, NULL);
}

// ------------------------------------------------------------------------------------------------
// errors (all local: every rank rejects the same call before communicating)

static void test_errors(void **state) {
    dsmoe_comm_ctx *ctx = V[0].ctx;
    dsmoe_comm_group *w = V[0].world;
    uint8_t buf[8] = {0};
    ALL_OK(P->broadcast(ctx, w, buf, 8, size) == DSMOE_ERR_INVALID &&
               strstr(P->last_error(ctx), "broadcast: root") != NULL,
           "root out of range: %s", P->last_error(ctx));
    ALL_OK(P->allreduce(ctx, w, buf, buf + 4, 1, (dsmoe_dtype)99, DSMOE_SUM) == DSMOE_ERR_INVALID &&
               strstr(P->last_error(ctx), "unknown dtype 99") != NULL,
           "bad dtype: %s", P->last_error(ctx));
    ALL_OK(P->allreduce(ctx, w, buf, buf + 4, 1, DSMOE_INT32, (dsmoe_reduce_op)7) == DSMOE_ERR_INVALID &&
               strstr(P->last_error(ctx), "unknown op 7") != NULL,
           "bad op: %s", P->last_error(ctx));
    ALL_OK(P->alltoallv(ctx, w, buf, NULL, NULL, buf, NULL, NULL) == DSMOE_ERR_INVALID, "NULL counts");
    ALL_OK(P->alltoall(ctx, NULL, buf, buf, 1) == DSMOE_ERR_INVALID &&
               strstr(P->last_error(ctx), "group is NULL") != NULL,
           "NULL group: %s", P->last_error(ctx));
    ALL_OK(P->allgather(ctx, w, NULL, buf, 1) == DSMOE_ERR_INVALID, "NULL buffer");

    // An MPI error comes back as a status with MPI's words, and leaves the group usable. To cause one,
    // ranks 0 and 1 break the contract on purpose: rank 1 expects 7 bytes of a 13-byte broadcast.
    if (size >= 2) {
        MPI_Comm pair;
        MPI_Comm_split(MPI_COMM_WORLD, rank < 2 ? 0 : MPI_UNDEFINED, rank, &pair);
        int ok = 1;
        if (rank < 2) {
            dsmoe_comm_group *g = NULL;
            ok = P->group_create(ctx, pair, &g) == DSMOE_OK;
            MPI_Comm_free(&pair);
            dsmoe_status bs = ok ? P->broadcast(ctx, g, buf, rank == 0 ? 8 : 7, 0) : DSMOE_ERR_INTERNAL;
            if (rank == 1)
                ok &= bs == DSMOE_ERR_SYSTEM && strstr(P->last_error(ctx), "MPI_Bcast of 7 bytes from root 0 over 2 "
                                                                         "ranks failed: MPI_ERR_TRUNCATE") != NULL;
            if (ok) ok = P->barrier(ctx, g) == DSMOE_OK;
            P->group_destroy(ctx, g);
        }
        ALL_OK(ok, "truncated broadcast: %s", P->last_error(ctx));
    }

    // An out-of-range test knob is refused by init, with the message in errbuf.
    char errbuf[256] = "";
    dsmoe_comm_ctx *bad = (dsmoe_comm_ctx *)1;
    setenv("DSMOE_COMM_MPI_MAX_COUNT", "0", 1);
    dsmoe_status s = P->init(&bad, errbuf, sizeof errbuf);
    unsetenv("DSMOE_COMM_MPI_MAX_COUNT");
    ALL_OK(s == DSMOE_ERR_INVALID && bad == NULL && strstr(errbuf, "DSMOE_COMM_MPI_MAX_COUNT='0'") != NULL,
           "init with a bad knob: %s", errbuf);
    P->finalize(NULL);
}

// ------------------------------------------------------------------------------------------------

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    rank_err = stderr;
    if (rank != 0) { // keep this rank's own stderr for its messages; drop its copy of cmocka's report
        rank_err = fdopen(dup(2), "w");
        if (!freopen("/dev/null", "w", stdout) || !freopen("/dev/null", "w", stderr)) return 1;
    }
    DSMOE_CHECK(size <= 64, "this test handles up to 64 ranks");

    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    DSMOE_CHECK(dsmoe_plugin_load_comm("mpi", NULL, &P, &h, &err) == DSMOE_OK, "%s", err.msg);
    char errbuf[256];
    V[0].label = "real limits";
    V[1].label = "max_count 5";
    for (int v = 0; v < 2; v++) {
        if (v == 1) setenv("DSMOE_COMM_MPI_MAX_COUNT", "5", 1);
        DSMOE_CHECK(P->init(&V[v].ctx, errbuf, sizeof errbuf) == DSMOE_OK, "init: %s", errbuf);
        unsetenv("DSMOE_COMM_MPI_MAX_COUNT");
        DSMOE_CHECK(strcmp(P->last_error(V[v].ctx), "") == 0, "last_error is not empty after init");
        DSMOE_CHECK(P->group_create(V[v].ctx, MPI_COMM_WORLD, &V[v].world) == DSMOE_OK, "group_create: %s",
                    P->last_error(V[v].ctx));
    }

    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alltoall),
        cmocka_unit_test(test_alltoallv),
        cmocka_unit_test(test_alltoallv_agrees_on_path),
        cmocka_unit_test(test_allgather),
        cmocka_unit_test(test_broadcast),
        cmocka_unit_test(test_allreduce_float_sum_fixed_order),
        cmocka_unit_test(test_allreduce_exact_ops),
        cmocka_unit_test(test_allreduce_start),
        cmocka_unit_test(test_split_groups),
        cmocka_unit_test(test_errors),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);

    for (int v = 0; v < 2; v++) {
        P->group_destroy(V[v].ctx, V[v].world);
        P->finalize(V[v].ctx);
    }
    dsmoe_plugin_unload(&h);
    MPI_Finalize();
    return failed ? 1 : 0;
}
