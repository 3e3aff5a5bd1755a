// tests/plugins/comm/comm_mpi_reductions.c: the comm conformance suite's reductions (test_comm_mpi.c has the
// rest and says what each check relies on): float sums against the error bound of summation (and
// bitwise the rank-order sum for this repo's plugins), the exact ops, the 16-bit floats, reduce_scatter,
// the non-blocking allreduce, and the stream contract of every collective.
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

#include <cmocka.h>
#include <mpi.h>

#include "comm_conformance_suite.h" // the shared state and checks
#include "comm_inputs.h"            // comm_pat, comm_value

// ------------------------------------------------------------------------------------------------
// reductions

// Float sums: within the error bound of any order of summation of the double reference (every
// plugin), bitwise the rank-order sum ref (this repo's plugins). Counts the elements that fail.
#define COUNT_BAD_SUMS(T, EPS, out, ref, refd, sumabs, n, bad)                                     \
    do {                                                                                           \
        for (size_t i_ = 0; i_ < (n); i_++) {                                                      \
            double tol_ = 2.0 * size * (EPS) * (sumabs)[i_] + 1e-300;                              \
            (bad) += !(fabs((double)(out)[i_] - (refd)[i_]) <= tol_) ||                            \
                     (mpi_family && memcmp(&(out)[i_], &(ref)[i_], sizeof(T)) != 0);               \
        }                                                                                          \
    } while (0)

// References of the float SUM over ranks of comm_value(q, first + i), i < n: ref in T in rank order,
// refd and sumabs in double.
#define SUM_REFS(T, first, n, ref, refd, sumabs)                                                   \
    do {                                                                                           \
        for (size_t i_ = 0; i_ < (n); i_++) {                                                      \
            (ref)[i_] = (T)comm_value(0, (first) + i_);                                                 \
            (refd)[i_] = (double)(T)comm_value(0, (first) + i_), (sumabs)[i_] = fabs((refd)[i_]);       \
            for (int q_ = 1; q_ < size; q_++) {                                                    \
                T x_ = (T)comm_value(q_, (first) + i_);                                                 \
                (ref)[i_] += x_, (refd)[i_] += (double)x_, (sumabs)[i_] += fabs((double)x_);       \
            }                                                                                      \
        }                                                                                          \
    } while (0)

// Float SUM allreduce: out of place (inputs late for a stream-ordered plugin), again, and in place.
#define SUM_CASE(T, DT, EPS)                                                                       \
    do {                                                                                           \
        size_t bytes = n * sizeof(T) + 1;                                                          \
        T *mine = malloc(bytes), *out = malloc(bytes), *again = malloc(bytes), *inpl = malloc(bytes); \
        T *ref = malloc(bytes), *before = malloc(bytes);                                           \
        double *refd = malloc(n * sizeof(double) + 1), *sumabs = malloc(n * sizeof(double) + 1);  \
        SUM_REFS(T, 0, n, ref, refd, sumabs);                                                      \
        for (size_t i = 0; i < n; i++) mine[i] = stream_ordered ? (T)0.25 : (T)comm_value(rank, i);     \
        memset(out, 0xEE, bytes), memcpy(before, out, bytes);                                      \
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, mine, out, n, DT, DSMOE_SUM, &S), "allreduce"); \
        EXPECT_PENDING(out, before, bytes, "allreduce");                                           \
        for (size_t i = 0; i < n; i++) mine[i] = (T)comm_value(rank, i);                                \
        FLUSH(v, v->world);                                                                        \
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, mine, again, n, DT, DSMOE_SUM, &S), "allreduce"); \
        FLUSH(v, v->world);                                                                        \
        for (size_t i = 0; i < n; i++) inpl[i] = stream_ordered ? (T)0.25 : mine[i];               \
        memcpy(before, inpl, bytes);                                                               \
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, DSMOE_IN_PLACE, inpl, n, DT, DSMOE_SUM, &S), "allreduce"); \
        EXPECT_PENDING(inpl, before, bytes, "allreduce in place");                                 \
        if (stream_ordered) memcpy(inpl, mine, n * sizeof(T)); /* in place: the input is the result */ \
        FLUSH(v, v->world);                                                                        \
        int bad = 0, bad_inpl = 0;                                                                 \
        COUNT_BAD_SUMS(T, EPS, out, ref, refd, sumabs, n, bad);                                    \
        COUNT_BAD_SUMS(T, EPS, inpl, ref, refd, sumabs, n, bad_inpl);                              \
        ALL_OK(bad == 0 && bad_inpl == 0, "%s SUM of %zu (%s): %d wrong, %d wrong in place%s", #T, n, \
               v->label, bad, bad_inpl, mpi_family ? " (rank-order sum expected)" : "");           \
        if (deterministic) {                                                                       \
            int differ = memcmp(out, again, n * sizeof(T)) != 0, differ_inpl = memcmp(out, inpl, n * sizeof(T)) != 0; \
            ALL_OK(!differ && !differ_inpl && same_on_all_ranks(out, n * sizeof(T)),               \
                   "DETERMINISTIC %s SUM of %zu (%s): repeat differs %d, in place differs %d, or ranks differ", \
                   #T, n, v->label, differ, differ_inpl);                                          \
        }                                                                                          \
        if (mpi_family && size >= 3 && n >= 1000) { /* the data must be able to catch another order */ \
            int differs = 0;                                                                       \
            for (size_t i = 0; i < n; i++) {                                                       \
                T rev = (T)comm_value(size - 1, i);                                                     \
                for (int q = size - 2; q >= 0; q--) rev += (T)comm_value(q, i);                         \
                differs += memcmp(&rev, &ref[i], sizeof(T)) != 0;                                  \
            }                                                                                      \
            ALL_OK(differs > 0, "%s: test data is not order-sensitive", #T);                       \
        }                                                                                          \
        free(mine), free(out), free(again), free(inpl), free(ref), free(before), free(refd), free(sumabs); \
    } while (0)

// Element counts per variant: 3 < 4 ranks gives empty chunks; under max_count 5, 37 is 8 pieces.
static const size_t sum_sizes[2][5] = {{0, 1, 3, 1000, 4097}, {0, 3, 37}};
static const size_t n_sum_sizes[2] = {5, 3};

void test_allreduce_float_sum(void **state) {
    for (int vi = 0; vi < n_variants; vi++) {
        variant *v = &V[vi];
        for (size_t t = 0; t < n_sum_sizes[vi]; t++) {
            size_t n = sum_sizes[vi][t];
            SUM_CASE(float, DSMOE_FLOAT32, FLT_EPSILON);
            SUM_CASE(double, DSMOE_FLOAT64, DBL_EPSILON);
        }
    }
}

void test_allreduce_exact_ops(void **state) {
    enum { N = 23 };
    for (int vi = 0; vi < n_variants; vi++) {
        variant *v = &V[vi];
        int32_t i32[N], max32[N], sum32[N], o32[N];
        int64_t i64[N], min64[N];
        uint8_t u8[N], maxu8[N], ou8[N];
        float f[N], maxf[N], of[N];
        for (size_t i = 0; i < N; i++) {
            max32[i] = INT32_MIN, sum32[i] = 0, min64[i] = INT64_MAX, maxu8[i] = 0, maxf[i] = -INFINITY;
            for (int q = 0; q < size; q++) {
                int32_t a = (int32_t)((q * 37 + (int)i * 11) % 101) - 50;
                int64_t b = ((int64_t)((q * 13 + (int)i * 7) % 29) - 14) * (INT64_C(1) << 40);
                uint8_t c = (uint8_t)(q * 91 + i * 17);
                float d = (float)comm_value(q, i);
                if (q == rank) i32[i] = a, i64[i] = b, u8[i] = c, f[i] = d;
                max32[i] = a > max32[i] ? a : max32[i];
                sum32[i] += a;
                min64[i] = b < min64[i] ? b : min64[i];
                maxu8[i] = c > maxu8[i] ? c : maxu8[i];
                maxf[i] = d > maxf[i] ? d : maxf[i];
            }
        }
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, i32, o32, N, DSMOE_INT32, DSMOE_MAX, &S), "allreduce");
        FLUSH(v, v->world);
        ALL_OK(memcmp(o32, max32, sizeof o32) == 0, "INT32 MAX (%s)", v->label);
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, i32, o32, N, DSMOE_INT32, DSMOE_SUM, &S), "allreduce");
        FLUSH(v, v->world);
        ALL_OK(memcmp(o32, sum32, sizeof o32) == 0, "INT32 SUM (%s)", v->label);
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, DSMOE_IN_PLACE, i64, N, DSMOE_INT64, DSMOE_MIN, &S), "allreduce");
        FLUSH(v, v->world);
        ALL_OK(memcmp(i64, min64, sizeof i64) == 0, "INT64 MIN in place (%s)", v->label);
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, u8, ou8, N, DSMOE_UINT8, DSMOE_MAX, &S), "allreduce");
        FLUSH(v, v->world);
        ALL_OK(memcmp(ou8, maxu8, sizeof ou8) == 0, "UINT8 MAX (%s)", v->label);
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, f, of, N, DSMOE_FLOAT32, DSMOE_MAX, &S), "allreduce");
        FLUSH(v, v->world);
        ALL_OK(memcmp(of, maxf, sizeof of) == 0, "FLOAT32 MAX (%s)", v->label);
    }
}

// bfloat16 and float16: every rank gets DSMOE_OK or every rank DSMOE_ERR_UNSUPPORTED; when supported,
// MAX is exact (positive finite values, whose order is that of their bit patterns).
void test_16bit_floats(void **state) {
    variant *v = &V[0];
    dsmoe_dtype types[2] = {DSMOE_BFLOAT16, DSMOE_FLOAT16};
    for (int t = 0; t < 2; t++) {
        enum { N = 9 };
        uint16_t mine[N], out[N], ref[N], rs_send[64 * 2], rs_out[2];
        for (size_t i = 0; i < N; i++) {
            ref[i] = 0;
            for (int q = 0; q < size; q++) {
                uint16_t h = (uint16_t)(0x0400 + comm_mix((uint64_t)q * 31 + i) % 0x3000); // positive, finite
                if (q == rank) mine[i] = h;
                ref[i] = h > ref[i] ? h : ref[i];
            }
        }
        for (int k = 0; k < 2 * size; k++) rs_send[k] = mine[k % N];
        dsmoe_status s = P->allreduce(v->ctx, v->world, mine, out, N, types[t], DSMOE_MAX, &S);
        dsmoe_status rs = P->reduce_scatter(v->ctx, v->world, rs_send, rs_out, 2, types[t], DSMOE_MAX, &S);
        int lo[2] = {(int)s, (int)rs}, hi[2] = {(int)s, (int)rs};
        MPI_Allreduce(MPI_IN_PLACE, lo, 2, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        MPI_Allreduce(MPI_IN_PLACE, hi, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        ALL_OK(lo[0] == hi[0] && lo[1] == hi[1] && (s == DSMOE_OK || s == DSMOE_ERR_UNSUPPORTED) &&
                   (rs == DSMOE_OK || rs == DSMOE_ERR_UNSUPPORTED),
               "%s: allreduce %s, reduce_scatter %s (OK or unsupported, alike on every rank): %s",
               dsmoe_dtype_name(types[t]), dsmoe_status_name(s), dsmoe_status_name(rs), P->last_error(v->ctx));
        ALL_OK(!mpi_family || (s == DSMOE_ERR_UNSUPPORTED && strstr(P->last_error(v->ctx), dsmoe_dtype_name(types[t]))),
               "mpi plugins refuse %s by name: %s", dsmoe_dtype_name(types[t]), P->last_error(v->ctx));
        FLUSH(v, v->world);
        if (s == DSMOE_OK) ALL_OK(memcmp(out, ref, sizeof ref) == 0, "%s MAX", dsmoe_dtype_name(types[t]));
        if (rs == DSMOE_OK) ALL_OK(rs_out[0] == ref[(2 * rank) % N] && rs_out[1] == ref[(2 * rank + 1) % N],
                                   "%s reduce_scatter MAX", dsmoe_dtype_name(types[t]));
    }
}

// Float SUM reduce_scatter of blocks of n: against the references (inputs late for a stream-ordered
// plugin), the rest of recv untouched; DETERMINISTIC: bitwise on repeat and block `rank` of allreduce.
#define RS_SUM_CASE(T, DT, EPS)                                                                    \
    do {                                                                                           \
        size_t all = (size_t)size * n, bytes = n * sizeof(T) + 1;                                  \
        T *send = malloc(all * sizeof(T) + 1), *whole = malloc(all * sizeof(T) + 1);               \
        T *out = malloc(bytes), *again = malloc(bytes), *ref = malloc(bytes), *before = malloc(bytes); \
        double *refd = malloc(n * sizeof(double) + 1), *sumabs = malloc(n * sizeof(double) + 1);  \
        SUM_REFS(T, (size_t)rank * n, n, ref, refd, sumabs);                                       \
        for (size_t i = 0; i < all; i++) send[i] = stream_ordered ? (T)0.25 : (T)comm_value(rank, i);   \
        memset(out, 0xEE, bytes), memcpy(before, out, bytes);                                      \
        ALL_STATUS(v, P->reduce_scatter(v->ctx, v->world, send, out, n, DT, DSMOE_SUM, &S), "reduce_scatter"); \
        EXPECT_PENDING(out, before, bytes, "reduce_scatter");                                      \
        for (size_t i = 0; i < all; i++) send[i] = (T)comm_value(rank, i);                              \
        FLUSH(v, v->world);                                                                        \
        int bad = 0;                                                                               \
        COUNT_BAD_SUMS(T, EPS, out, ref, refd, sumabs, n, bad);                                    \
        ALL_OK(bad == 0 && ((uint8_t *)out)[n * sizeof(T)] == 0xEE, "reduce_scatter %s SUM of %zu per rank (%s): " \
               "%d wrong%s, or wrote past the block", #T, n, v->label, bad,                        \
               mpi_family ? " (rank-order sum expected)" : "");                                    \
        if (deterministic) {                                                                       \
            ALL_STATUS(v, P->reduce_scatter(v->ctx, v->world, send, again, n, DT, DSMOE_SUM, &S), "reduce_scatter"); \
            ALL_STATUS(v, P->allreduce(v->ctx, v->world, send, whole, all, DT, DSMOE_SUM, &S), "allreduce"); \
            FLUSH(v, v->world);                                                                    \
            int differ = memcmp(out, again, n * sizeof(T)) != 0;                                   \
            int not_block = memcmp(out, whole + (size_t)rank * n, n * sizeof(T)) != 0;             \
            ALL_OK(!differ && !not_block, "DETERMINISTIC reduce_scatter %s SUM of %zu (%s): repeat differs %d, " \
                   "differs from block %d of allreduce %d", #T, n, v->label, differ, rank, not_block); \
        }                                                                                          \
        free(send), free(whole), free(out), free(again), free(ref), free(before), free(refd), free(sumabs); \
    } while (0)

// Exact reduce_scatter (integers, MAX, MIN) of blocks of N: element k of rank q's input is GEN(q, k).
#define RS_EXACT_CASE(T, DT, OP, GEN)                                                              \
    do {                                                                                           \
        T send[64 * N], out[N], ref[N];                                                            \
        for (int k = 0; k < size * N; k++) send[k] = GEN(rank, k);                                 \
        for (int i = 0; i < N; i++) {                                                              \
            ref[i] = GEN(0, rank * N + i);                                                         \
            for (int q = 1; q < size; q++) {                                                       \
                T x = GEN(q, rank * N + i);                                                        \
                ref[i] = OP == DSMOE_SUM ? (T)(ref[i] + x) : OP == DSMOE_MAX ? (x > ref[i] ? x : ref[i]) \
                                                                             : (x < ref[i] ? x : ref[i]); \
            }                                                                                      \
        }                                                                                          \
        ALL_STATUS(v, P->reduce_scatter(v->ctx, v->world, send, out, N, DT, OP, &S), "reduce_scatter"); \
        FLUSH(v, v->world);                                                                        \
        ALL_OK(memcmp(out, ref, sizeof ref) == 0, "reduce_scatter %s %s (%s)", dsmoe_dtype_name(DT), #OP, v->label); \
    } while (0)
#define GEN_I32(q, k) ((int32_t)(((q) * 37 + (k) * 11) % 101) - 50)
#define GEN_I64(q, k) (((int64_t)(((q) * 13 + (k) * 7) % 29) - 14) * (INT64_C(1) << 40))
#define GEN_U8(q, k) ((uint8_t)((q) * 91 + (k) * 17))
#define GEN_F32(q, k) ((float)comm_value((q), (size_t)(k)))
#define GEN_F64(q, k) comm_value((q), (size_t)(k))

static const size_t rs_sizes[2][5] = {{0, 1, 3, 13, 1000}, {0, 3, 7, 12}}; // under max_count 5: 7 = 5 + 2
static const size_t n_rs_sizes[2] = {5, 4};

void test_reduce_scatter(void **state) {
    for (int vi = 0; vi < n_variants; vi++) {
        variant *v = &V[vi];
        for (size_t t = 0; t < n_rs_sizes[vi]; t++) {
            size_t n = rs_sizes[vi][t];
            RS_SUM_CASE(float, DSMOE_FLOAT32, FLT_EPSILON);
            RS_SUM_CASE(double, DSMOE_FLOAT64, DBL_EPSILON);
        }
        enum { N = 7 };
        RS_EXACT_CASE(int32_t, DSMOE_INT32, DSMOE_SUM, GEN_I32);
        RS_EXACT_CASE(int32_t, DSMOE_INT32, DSMOE_MAX, GEN_I32);
        RS_EXACT_CASE(int64_t, DSMOE_INT64, DSMOE_MIN, GEN_I64);
        RS_EXACT_CASE(uint8_t, DSMOE_UINT8, DSMOE_MAX, GEN_U8);
        RS_EXACT_CASE(float, DSMOE_FLOAT32, DSMOE_MAX, GEN_F32);
        RS_EXACT_CASE(double, DSMOE_FLOAT64, DSMOE_MIN, GEN_F64);
    }
}

// allreduce_start + request_test + request_wait: bitwise the blocking in-place allreduce, with two
// requests outstanding at once (each polled while the other, and a blocking collective, run).
void test_allreduce_start(void **state) {
    if (!(P->caps & DSMOE_CCAP_NONBLOCKING)) skip(); // test_table checked the trio is absent
    for (int vi = 0; vi < n_variants; vi++) {
        variant *v = &V[vi];
        for (size_t t = 0; t < n_sum_sizes[vi]; t++) {
            size_t n = sum_sizes[vi][t];
            float *a = malloc(n * sizeof *a + 1), *b = malloc(n * sizeof *b + 1);
            int32_t *ia = malloc(n * sizeof *ia + 4), *ib = malloc(n * sizeof *ib + 4);
            for (size_t i = 0; i < n; i++) {
                a[i] = b[i] = (float)comm_value(rank, i);
                ia[i] = ib[i] = (int32_t)((rank * 37 + (int)i * 11) % 101) - 50;
            }
            dsmoe_comm_group *w = v->world;
            ALL_STATUS(v, P->allreduce(v->ctx, w, DSMOE_IN_PLACE, b, n, DSMOE_FLOAT32, DSMOE_SUM, &S), "allreduce");
            ALL_STATUS(v, P->allreduce(v->ctx, w, DSMOE_IN_PLACE, ib, n, DSMOE_INT32, DSMOE_MAX, &S), "allreduce");
            dsmoe_comm_request *r1 = NULL, *r2 = NULL;
            ALL_STATUS(v, P->allreduce_start(v->ctx, v->world, a, n, DSMOE_FLOAT32, DSMOE_SUM, &r1), "allreduce_start");
            ALL_STATUS(v, P->allreduce_start(v->ctx, v->world, ia, n, DSMOE_INT32, DSMOE_MAX, &r2), "allreduce_start");
            int x = rank, d1 = 0, d2 = 0; // a blocking collective while both are in flight
            ALL_STATUS(v, P->allreduce(v->ctx, w, DSMOE_IN_PLACE, &x, 1, DSMOE_INT32, DSMOE_SUM, &S), "allreduce");
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

// The stream argument: a stream-ordered plugin refuses a missing queue and destroys a group only
// after its queued collectives; a host-progressed one ignores the stream, NULL included.
void test_stream_contract(void **state) {
    variant *v = &V[0];
    float x = (float)(rank + 1), y = 0, want = (float)(size * (size + 1) / 2);
    if (!stream_ordered) {
        ALL_STATUS(v, P->allreduce(v->ctx, v->world, &x, &y, 1, DSMOE_FLOAT32, DSMOE_SUM, NULL), "allreduce, NULL");
        ALL_OK(y == want && Q.n == 0, "host-progressed allreduce with a NULL stream: %g, expected %g", y, want);
        return;
    }
    dsmoe_comm_stream no_host = {.native = NULL, .enqueue_host = NULL, .owner = &Q};
    const dsmoe_comm_stream *bad[2] = {NULL, &no_host};
    for (int k = 0; k < 2; k++) {
        dsmoe_status s = P->allreduce(v->ctx, v->world, &x, &y, 1, DSMOE_FLOAT32, DSMOE_SUM, bad[k]);
        ALL_OK(s == DSMOE_ERR_INVALID && Q.n == 0 &&
                   (!mpi_family || strstr(P->last_error(v->ctx), "needs a kernel queue")),
               "stream-ordered allreduce with %s: %s, %s", k ? "no enqueue_host" : "a NULL stream",
               dsmoe_status_name(s), P->last_error(v->ctx));
    }
    dsmoe_comm_group *g = NULL;
    ALL_STATUS(v, P->group_create(v->ctx, &world_boot.b, &g), "group_create");
    ALL_STATUS(v, P->allreduce(v->ctx, g, &x, &y, 1, DSMOE_FLOAT32, DSMOE_SUM, &S), "allreduce");
    P->group_destroy(v->ctx, g); // "after its enqueued collectives"
    conf_queue_run(&Q);
    ALL_OK(y == want, "a group destroyed with an allreduce queued: %g, expected %g", y, want);
    FLUSH(v, v->world);
}

