// tests/model/test_dispatch_combine.c: dispatch, combine and their backwards of the cpu plugin
// (plugins/cpu/cpu_gating.c) against naive loops over the token->(expert, slot) table, with dropped tokens
// and empty slots; and 1 against 2 compute threads, bit for bit, for these ops and the gating ops on
// shapes that cross every parallel threshold. The plugin is dlopen'ed as the core loads it
// (cpu_plugin_test.h); calls move host arrays in and out with the copy members (gating_calls.h).
// tests/model/test_gating.c holds the gating's hand-computed cases, its reference and the argument checks.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_plugin_test.h" // P, cpt_load, cpt_ctx, dev_*, OKC
#include "gating_calls.h"    // run_gate_*, run_dispatch*, run_combine*, params, fill_uniform

static dsmoe_kernel_ctx *g_ctx[2]; // 1 and 2 compute threads

static dsmoe_kernel_ctx *ctx_threads(int threads) { return g_ctx[threads - 1]; }

// ------------------------------------------------------------------------------------------------
// dispatch and combine against naive loops; thread-count independence

typedef struct moe_run {
    float *buf, *out, *round, *dx, *dy, *dweight; // outputs
} moe_run;

static float *falloc(size_t n) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    assert_non_null(x);
    return x;
}

static void fill_const(float *x, size_t n, float v) {
    for (size_t i = 0; i < n; i++) x[i] = v;
}

// Runs all four ops on the table with `threads` threads; outputs prefilled with garbage (assigns) or
// with `acc` (dx accumulates). Rows of unused slots in buf and dy are unspecified (the plugin may
// leave them): only the used rows are compared.
static void run_moe(int threads, const int32_t *choice, const int32_t *slot, const float *weight, const float *x,
                    const float *y, const float *dout, const float *acc, int S, int K, int E, int C, int M, moe_run *r) {
    dsmoe_kernel_ctx *ctx = ctx_threads(threads);
    size_t nb = (size_t)E * C * M, nx = (size_t)S * M;
    r->buf = falloc(nb), r->out = falloc(nx), r->round = falloc(nx), r->dx = falloc(nx), r->dy = falloc(nb);
    r->dweight = falloc((size_t)S * K);
    fill_const(r->buf, nb, 7.0f), fill_const(r->out, nx, 7.0f), fill_const(r->round, nx, 7.0f);
    fill_const(r->dy, nb, 7.0f), fill_const(r->dweight, (size_t)S * K, 7.0f);
    memcpy(r->dx, acc, nx * sizeof *acc);
    OKC(ctx, run_dispatch(ctx, r->buf, x, choice, slot, S, K, E, C, M));
    OKC(ctx, run_combine(ctx, r->round, r->buf, choice, slot, weight, S, K, E, C, M));
    OKC(ctx, run_combine(ctx, r->out, y, choice, slot, weight, S, K, E, C, M));
    OKC(ctx, run_dispatch_backward(ctx, r->dx, y, choice, slot, S, K, E, C, M));
    OKC(ctx, run_combine_backward(ctx, r->dy, r->dweight, dout, y, choice, slot, weight, S, K, E, C, M));
}

static void free_run(moe_run *r) {
    free(r->buf), free(r->out), free(r->round), free(r->dx), free(r->dy), free(r->dweight);
}

static void check_moe_ops(int S, int E, int K, int C, int M, int rts, int check_threads) {
    dsmoe_gating_params p = params(S, E, K);
    p.random_selection = rts;
    p.seed = 99 + (uint64_t)S;
    size_t nx = (size_t)S * M, nb = (size_t)E * C * M;
    float *logits = falloc((size_t)S * E), *probs = falloc((size_t)S * E), *weight = falloc((size_t)S * K);
    int32_t *choice = malloc(sizeof(int32_t) * S * K), *slot = malloc(sizeof(int32_t) * S * K), counts[64], kept[64];
    double sums[2 * 64 + 1];
    assert_non_null(choice), assert_non_null(slot);
    fill_uniform(logits, (size_t)S * E, 3, -1, 1);
    dsmoe_kernel_ctx *ctx = ctx_threads(1);
    OKC(ctx, run_gate_route(ctx, &p, logits, probs, choice, counts));
    OKC(ctx, run_gate_assign(ctx, &p, C, probs, choice, slot, weight, kept, sums));
    int dropped = 0, used = 0;
    for (int i = 0; i < S * K; i++) dropped += slot[i] < 0;
    for (int e = 0; e < E; e++) used += kept[e];
    assert_true(dropped > 0 && used < E * C); // both dropped tokens and empty slots are exercised

    float *x = falloc(nx), *y = falloc(nb), *dout = falloc(nx), *acc = falloc(nx);
    fill_uniform(x, nx, 11, -1, 1), fill_uniform(y, nb, 12, -1, 1), fill_uniform(dout, nx, 13, -1, 1);
    fill_uniform(acc, nx, 14, -1, 1);
    moe_run r1;
    run_moe(1, choice, slot, weight, x, y, dout, acc, S, K, E, C, M, &r1);

    // naive: a one-hot walk over (s, k) for the forward ops, a walk over (e, c) for dy.
    for (int e = 0; e < E; e++)
        for (int c = 0; c < C; c++) {
            int owner = -1;
            for (int i = 0; i < S * K; i++)
                if (choice[i] == e && slot[i] == c) owner = i;
            for (int m = 0; m < M && owner >= 0; m++) {
                size_t b = ((size_t)e * C + c) * M + m;
                float want_buf = x[(size_t)(owner / K) * M + m];
                float want_dy = weight[owner] * dout[(size_t)(owner / K) * M + m];
                if (r1.buf[b] != want_buf) fail_msg("buf[%d,%d,%d] = %g, expected %g", e, c, m, r1.buf[b], want_buf);
                if (fabsf(r1.dy[b] - want_dy) > 1e-6f) fail_msg("dy[%d,%d,%d] = %g, expected %g", e, c, m, r1.dy[b], want_dy);
            }
        }
    for (int s = 0; s < S; s++) {
        for (int m = 0; m < M; m++) {
            double out = 0, round = 0, dx = acc[(size_t)s * M + m];
            for (int k = 0; k < K; k++) {
                int i = s * K + k;
                if (slot[i] < 0) continue;
                size_t b = ((size_t)choice[i] * C + slot[i]) * M + m;
                out += (double)weight[i] * y[b];
                round += (double)weight[i] * x[(size_t)s * M + m];
                dx += y[b];
            }
            size_t o = (size_t)s * M + m;
            if (fabs(r1.out[o] - out) > 1e-6) fail_msg("out[%d,%d] = %g, expected %g", s, m, r1.out[o], out);
            if (fabs(r1.round[o] - round) > 1e-6) fail_msg("round trip [%d,%d] = %g, expected %g", s, m, r1.round[o], round);
            if (fabs(r1.dx[o] - dx) > 1e-6) fail_msg("dx[%d,%d] = %g, expected %g", s, m, r1.dx[o], dx);
        }
        for (int k = 0; k < K; k++) {
            int i = s * K + k;
            double dw = 0;
            for (int m = 0; m < M && slot[i] >= 0; m++)
                dw += (double)dout[(size_t)s * M + m] * y[((size_t)choice[i] * C + slot[i]) * M + m];
            if (fabs(r1.dweight[i] - dw) > 1e-5 * (1 + fabs(dw))) fail_msg("dweight[%d,%d] = %g, expected %g", s, k, r1.dweight[i], dw);
        }
    }

    if (check_threads) {
        moe_run r2;
        run_moe(2, choice, slot, weight, x, y, dout, acc, S, K, E, C, M, &r2);
        assert_memory_equal(r1.buf, r2.buf, nb * sizeof(float));
        assert_memory_equal(r1.out, r2.out, nx * sizeof(float));
        assert_memory_equal(r1.round, r2.round, nx * sizeof(float));
        assert_memory_equal(r1.dx, r2.dx, nx * sizeof(float));
        assert_memory_equal(r1.dy, r2.dy, nb * sizeof(float));
        assert_memory_equal(r1.dweight, r2.dweight, (size_t)S * K * sizeof(float));
        free_run(&r2);
    }
    free_run(&r1);
    free(logits), free(probs), free(weight), free(choice), free(slot), free(x), free(y), free(dout), free(acc);
}

static void test_dispatch_combine_naive(void **state) {
    (void)state;
    check_moe_ops(37, 5, 2, 13, 67, 1, 1);
    check_moe_ops(40, 4, 1, 10, 33, 0, 1);
}

// Big enough that every loop crosses the parallel threshold: 1 and 2 threads must agree bit for bit,
// for the gating ops too.
static void test_thread_count_independence(void **state) {
    (void)state;
    const int S = 8192, E = 4, K = 2, C = 3000;
    check_moe_ops(600, E, K, 300, 96, 1, 1);
    dsmoe_gating_params p = params(S, E, K);
    p.noise = DSMOE_NOISE_RSAMPLE;
    p.random_selection = 1;
    float *logits = falloc((size_t)S * E), *dw = falloc((size_t)S * K);
    fill_uniform(logits, (size_t)S * E, 5, -1, 1);
    fill_uniform(dw, (size_t)S * K, 6, -1, 1);
    float *probs[2], *weight[2], *dl[2];
    int32_t *choice[2], *slot[2], counts[2][4], kept[2][4];
    double sums[2][2 * 4 + 1];
    for (int t = 0; t < 2; t++) {
        dsmoe_kernel_ctx *ctx = ctx_threads(t + 1);
        probs[t] = falloc((size_t)S * E), weight[t] = falloc((size_t)S * K), dl[t] = falloc((size_t)S * E);
        choice[t] = malloc(sizeof(int32_t) * S * K), slot[t] = malloc(sizeof(int32_t) * S * K);
        fill_const(dl[t], (size_t)S * E, 0.0f);
        OKC(ctx, run_gate_route(ctx, &p, logits, probs[t], choice[t], counts[t]));
        OKC(ctx, run_gate_assign(ctx, &p, C, probs[t], choice[t], slot[t], weight[t], kept[t], sums[t]));
        OKC(ctx, run_gate_backward(ctx, &p, dl[t], probs[t], choice[t], slot[t], dw, sums[t], 0.3f));
    }
    assert_memory_equal(probs[0], probs[1], sizeof(float) * S * E);
    assert_memory_equal(choice[0], choice[1], sizeof(int32_t) * S * K);
    assert_memory_equal(slot[0], slot[1], sizeof(int32_t) * S * K);
    assert_memory_equal(weight[0], weight[1], sizeof(float) * S * K);
    assert_memory_equal(dl[0], dl[1], sizeof(float) * S * E);
    assert_memory_equal(counts[0], counts[1], sizeof counts[0]);
    assert_memory_equal(kept[0], kept[1], sizeof kept[0]);
    assert_memory_equal(sums[0], sums[1], sizeof sums[0]);
    for (int t = 0; t < 2; t++) free(probs[t]), free(weight[t]), free(dl[t]), free(choice[t]), free(slot[t]);
    free(logits), free(dw);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dispatch_combine_naive),
        cmocka_unit_test(test_thread_count_independence),
    };
    if (cpt_load(1) != 0) {
        fprintf(stderr, "test_dispatch_combine: cannot load or initialise the cpu plugin %s\n", CPT_PLUGIN_FILE);
        return 1;
    }
    g_ctx[0] = C;
    g_ctx[1] = cpt_ctx(2);
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    P->finalize(g_ctx[1]);
    cpt_unload();
    return rc;
}
