// tests/model/test_infer.c: the KV-cache forward (core/model/model_infer.c) against the model's full forward:
// feeding sequences in pieces (prefill chunks, token by token, two sequences of different lengths in one
// call, a slot reused) gives the logits the full forward gives at the same positions, within 1e-5
// relative, on dense, top-1, top-2 (also with two MoE layers sharing buffers), residual and
// pyramid-residual models; greedy sampling picks the
// reference's argmax; bad calls are refused. With run.precision = bf16 the KV-cache forward (bfloat16
// weights, activations and cache) stays within a bfloat16 tolerance of the float32 full forward of the
// same parameters, and its buffers are the estimate's, at 2 bytes per activation.
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <mpi.h>

#include "config.h"
#include "dsmoe/rng.h"
#include "model.h"
#include "model_infer.h"
#include "runtime.h"
#include "test_runtime.h" // test_runtime_start

static dsmoe_runtime rt;

enum { T = 12, NSEQ = 2 };

// The full forward's capacity (eval_capacity_factor 8) drops nothing, like the inference forward's.
static const char *base_deck =
    "[model]\nvocab = 32\nseq_len = 12\nhidden = 16\nheads = 2\nffn_hidden = 24\ninit_std = 0.3\n"
    "[moe]\nmin_capacity = 0\neval_capacity_factor = 8\n"
    "[train]\nbatch = 1\n";

static void load_config(const char *extra, dsmoe_config *cfg) {
    char buf[1024], *ov[16];
    int n = 0;
    snprintf(buf, sizeof buf, "model.layers=2 %s", extra);
    for (char *tok = strtok(buf, " "); tok && n < 16; tok = strtok(NULL, " ")) ov[n++] = tok;
    dsmoe_err err = {0};
    if (dsmoe_config_load_text(base_deck, "test.deck", ov, n, (char *const[]){NULL}, 1, cfg, NULL, &err) != DSMOE_OK)
        fail_msg("config: %s", err.msg);
}

static void to_host(float *dst, const float *src, size_t n) {
    rt.kern->copy_to_host(rt.kctx, rt.q, dst, src, n * sizeof(float));
    dsmoe_err err = {0};
    if (dsmoe_rt_wait(&rt, &err) != DSMOE_OK) fail_msg("wait: %s", err.msg);
}

// max |got - want| over the row, relative to max(1, max |want|).
static double row_error(const float *got, const float *want, int V) {
    double d = 0.0, scale = 1.0;
    for (int v = 0; v < V; v++) {
        d = fmax(d, fabs((double)got[v] - want[v]));
        scale = fmax(scale, fabs((double)want[v]));
    }
    return d / scale;
}

static int argmax(const float *z, int V) {
    int best = 0;
    for (int v = 1; v < V; v++)
        if (z[v] > z[best]) best = v;
    return best;
}

// One call of the schedule: for each sequence, how many new tokens (0 = not in this call).
typedef struct call { int count[NSEQ]; } call;

static void check_case(const char *extra) {
    dsmoe_config cfg;
    load_config(extra, &cfg);
    dsmoe_err err = {0};
    dsmoe_model *m = NULL;
    assert_int_equal(dsmoe_model_create(&cfg, &rt, 1, &m, &err), DSMOE_OK);
    assert_int_equal(dsmoe_model_init_params(m, 9, &err), DSMOE_OK);
    int V = cfg.vocab;

    // References: the full forward of each sequence, logits at every position.
    int32_t seq[NSEQ][T], targets[T] = {0};
    float *ref = malloc((size_t)NSEQ * T * V * sizeof(float));
    for (int q = 0; q < NSEQ; q++) {
        for (int t = 0; t < T; t++) seq[q][t] = (int32_t)(dsmoe_rng_u64(31 + (uint64_t)q, (uint64_t)t) % (uint64_t)V);
        dsmoe_forward_result fr;
        if (dsmoe_model_forward(m, seq[q], targets, 0, 1, 0, &fr, &err) != DSMOE_OK) fail_msg("forward: %s", err.msg);
        assert_int_equal(fr.dropped, 0);
        to_host(ref + (size_t)q * T * V, dsmoe_model_logits(m), (size_t)T * V);
    }

    // Prefill chunks of different lengths together, then token by token, one sequence alone, a chunk
    // beside a single token: every split of the sequences' positions.
    const call schedule[] = {{{5, 3}}, {{1, 1}}, {{1, 0}}, {{0, 2}}, {{2, 1}}, {{1, 1}}, {{1, 2}}, {{1, 1}}, {{0, 1}}};
    dsmoe_infer *inf = NULL;
    assert_int_equal(dsmoe_infer_create(m, NSEQ, T, 2 * T, 1, 0, &inf, &err), DSMOE_OK);
    // dsmoe --plan's estimate of the buffers, from the config alone.
    dsmoe_infer_sizes z;
    dsmoe_infer_estimate(&cfg, NSEQ, T, 2 * T, 1, 0, &z);
    assert_int_equal(dsmoe_infer_bytes(inf), z.cache_bytes + z.slice_bytes + z.row_bytes);
    assert_int_equal(z.cache_bytes, (uint64_t)cfg.layers * 2 * NSEQ * cfg.hidden * T * sizeof(float));
    int fed[NSEQ] = {0};
    float *logits = malloc((size_t)NSEQ * V * sizeof(float));
    double worst = 0.0;
    for (size_t c = 0; c < sizeof schedule / sizeof schedule[0]; c++) {
        int slot[NSEQ], count[NSEQ], n = 0, rows = 0;
        int32_t tokens[2 * T];
        for (int q = 0; q < NSEQ; q++) {
            if (!schedule[c].count[q]) continue;
            slot[n] = q;
            count[n] = schedule[c].count[q];
            for (int j = 0; j < count[n]; j++) tokens[rows++] = seq[q][fed[q] + j];
            n++;
        }
        if (dsmoe_infer_forward(inf, n, slot, count, tokens, rows, 0.0f, NULL, &err) != DSMOE_OK)
            fail_msg("%s: call %zu: %s", extra, c, err.msg);
        to_host(logits, dsmoe_infer_logits(inf), (size_t)n * V);
        for (int i = 0; i < n; i++) {
            int q = slot[i];
            fed[q] += count[i];
            assert_int_equal(dsmoe_infer_length(inf, q), fed[q]);
            double e = row_error(logits + (size_t)i * V, ref + ((size_t)q * T + fed[q] - 1) * V, V);
            if (e > 1e-5) fail_msg("%s: call %zu, sequence %d at position %d: relative error %.3g", extra, c, q,
                                   fed[q] - 1, e);
            worst = fmax(worst, e);
        }
        // Greedy sampling draws the reference's most likely token.
        dsmoe_sampling_params greedy[NSEQ] = {{.temperature = 0.0f, .top_p = 1.0f}, {.temperature = 0.0f, .top_p = 1.0f}};
        uint64_t counters[NSEQ] = {0, 0};
        int32_t drawn[NSEQ];
        assert_int_equal(dsmoe_infer_sample(inf, greedy, counters, V, drawn, &err), DSMOE_OK);
        for (int i = 0; i < n; i++)
            assert_int_equal(drawn[i], argmax(ref + ((size_t)slot[i] * T + fed[slot[i]] - 1) * V, V));
    }
    for (int q = 0; q < NSEQ; q++) assert_int_equal(fed[q], T);

    // A slot reused: sequence 1 whole in slot 0 after a reset.
    dsmoe_infer_reset(inf, 0);
    int slot0 = 0, all = T;
    assert_int_equal(dsmoe_infer_forward(inf, 1, &slot0, &all, seq[1], T, 0.0f, NULL, &err), DSMOE_OK);
    to_host(logits, dsmoe_infer_logits(inf), (size_t)V);
    double e = row_error(logits, ref + ((size_t)1 * T + T - 1) * V, V);
    if (e > 1e-5) fail_msg("%s: reused slot: relative error %.3g", extra, e);
    print_message("%s: worst relative logit error %.3g\n", extra, fmax(worst, e));

    // Refused: past the cache, a slot twice, a token outside the vocabulary, no capacity.
    int one = 1, two[2] = {1, 1}, slots_twice[2] = {1, 1};
    int32_t tok2[2] = {1, 2}, bad = V;
    assert_int_not_equal(dsmoe_infer_forward(inf, 1, &slot0, &one, seq[0], 1, 0.0f, NULL, &err), DSMOE_OK); // slot 0 full
    assert_non_null(strstr(err.msg, "positions"));
    dsmoe_infer_reset(inf, 0);
    dsmoe_infer_reset(inf, 1);
    assert_int_not_equal(dsmoe_infer_forward(inf, 2, slots_twice, two, tok2, 2, 0.0f, NULL, &err), DSMOE_OK);
    assert_non_null(strstr(err.msg, "twice"));
    assert_int_not_equal(dsmoe_infer_forward(inf, 1, &slot0, &one, &bad, 1, 0.0f, NULL, &err), DSMOE_OK);
    assert_non_null(strstr(err.msg, "vocabulary"));
    assert_int_not_equal(dsmoe_infer_forward(inf, 1, &slot0, &one, tok2, 0, 0.0f, NULL, &err), DSMOE_OK); // group < own

    dsmoe_infer_free(inf);
    dsmoe_model_free(m);
    free(ref);
    free(logits);
}

// bfloat16: sequence 0 fed in a prefill chunk then token by token; every row against the float32 full
// forward of the same parameters (a float32 model initialised with the same seed). A bfloat16 rounding
// is 2^-9 relative; a logit is the end of a few dozen rounded products and sums (about 3% of the row's
// largest logit seen here), so 6% allows those and still fails a wrong weight, position or cache row
// (errors of order 1).
static void check_bf16(const char *extra) {
    char with[256];
    snprintf(with, sizeof with, "%s run.precision=bf16", extra);
    dsmoe_config c32, c16;
    load_config(extra, &c32);
    load_config(with, &c16);
    assert_int_equal(dsmoe_config_act_dtype(&c16), DSMOE_BFLOAT16);
    dsmoe_err err = {0};
    dsmoe_model *m32 = NULL, *m16 = NULL;
    assert_int_equal(dsmoe_model_create(&c32, &rt, 1, &m32, &err), DSMOE_OK);
    assert_int_equal(dsmoe_model_create(&c16, &rt, 1, &m16, &err), DSMOE_OK);
    assert_int_equal(dsmoe_model_init_params(m32, 9, &err), DSMOE_OK);
    assert_int_equal(dsmoe_model_init_params(m16, 9, &err), DSMOE_OK);
    int V = c32.vocab;
    int32_t seq[T], targets[T] = {0};
    for (int t = 0; t < T; t++) seq[t] = (int32_t)(dsmoe_rng_u64(31, (uint64_t)t) % (uint64_t)V);
    float *ref = malloc((size_t)T * V * sizeof(float)), *logits = malloc((size_t)V * sizeof(float));
    float *ref16 = malloc((size_t)T * V * sizeof(float));
    dsmoe_forward_result fr;
    assert_int_equal(dsmoe_model_forward(m32, seq, targets, 0, 1, 0, &fr, &err), DSMOE_OK);
    to_host(ref, dsmoe_model_logits(m32), (size_t)T * V);
    // The bfloat16 full forward (logits are bfloat16: widened here) is near it too.
    assert_int_equal(dsmoe_model_forward(m16, seq, targets, 0, 1, 0, &fr, &err), DSMOE_OK);
    uint16_t *raw = malloc((size_t)T * V * sizeof(uint16_t));
    rt.kern->copy_to_host(rt.kctx, rt.q, raw, dsmoe_model_logits(m16), (size_t)T * V * sizeof(uint16_t));
    assert_int_equal(dsmoe_rt_wait(&rt, &err), DSMOE_OK);
    for (size_t i = 0; i < (size_t)T * V; i++) {
        uint32_t u = (uint32_t)raw[i] << 16;
        memcpy(&ref16[i], &u, sizeof u);
    }
    double worst = 0.0;
    for (int t = 0; t < T; t++) worst = fmax(worst, row_error(ref16 + (size_t)t * V, ref + (size_t)t * V, V));
    if (worst > 0.06) fail_msg("%s: bf16 full forward: relative error %.3g against float32", extra, worst);

    // Generation's model: parameters only (B = 0), the same initial values; once the inference state has
    // its bfloat16 copy, the float32 masters of the GEMM-only matrices go, and the bfloat16 copies of the
    // other tensors (no op reads them): each tensor is held once (all that follows runs without the rest).
    dsmoe_model *m0 = NULL;
    assert_int_equal(dsmoe_model_create(&c16, &rt, 0, &m0, &err), DSMOE_OK);
    assert_int_equal(dsmoe_model_init_params(m0, 9, &err), DSMOE_OK);
    assert_int_equal(dsmoe_model_drop_gemm_masters(m16, &err), DSMOE_ERR_INVALID); // B = 1: it trains
    dsmoe_infer *inf = NULL;
    assert_int_equal(dsmoe_infer_create(m0, 1, T, T, 1, 0, &inf, &err), DSMOE_OK);
    size_t before = dsmoe_model_bytes(m0);
    assert_int_equal(dsmoe_model_drop_gemm_masters(m0, &err), DSMOE_OK);
    assert_null(dsmoe_model_params(m0));
    // What went: 4 bytes of every GEMM-only element and 2 of every other one, counted from the config's
    // shapes.
    size_t gemm = dsmoe_model_gemm_only_params(&c16), all = dsmoe_model_local_params(m0);
    assert_int_equal(before - dsmoe_model_bytes(m0), 4 * gemm + 2 * (all - gemm));
    assert_true(gemm > all / 2);
    assert_int_equal(dsmoe_model_drop_gemm_masters(m0, &err), DSMOE_ERR_INVALID); // once
    dsmoe_infer_sizes z;
    dsmoe_infer_estimate(&c16, 1, T, T, 1, 0, &z);
    assert_int_equal(dsmoe_infer_bytes(inf), z.cache_bytes + z.slice_bytes + z.row_bytes);
    assert_int_equal(z.cache_bytes, (uint64_t)c16.layers * 2 * c16.hidden * T * sizeof(uint16_t));

    int slot = 0, fed = 0;
    for (int c = 0; fed < T; c++) {
        int count = c == 0 ? 5 : 1;
        assert_int_equal(dsmoe_infer_forward(inf, 1, &slot, &count, seq + fed, count, 0.0f, NULL, &err), DSMOE_OK);
        fed += count;
        rt.kern->copy_to_host(rt.kctx, rt.q, raw, dsmoe_infer_logits(inf), (size_t)V * sizeof(uint16_t));
        assert_int_equal(dsmoe_rt_wait(&rt, &err), DSMOE_OK);
        for (int v = 0; v < V; v++) {
            uint32_t u = (uint32_t)raw[v] << 16;
            memcpy(&logits[v], &u, sizeof u);
        }
        double e = row_error(logits, ref + (size_t)(fed - 1) * V, V);
        if (e > 0.06) fail_msg("%s: bf16 inference at position %d: relative error %.3g against float32", extra,
                               fed - 1, e);
        worst = fmax(worst, e);
    }
    print_message("%s: bf16: worst relative logit error %.3g against float32\n", extra, worst);
    dsmoe_infer_free(inf);
    dsmoe_model_free(m0);
    dsmoe_model_free(m16);
    dsmoe_model_free(m32);
    free(ref);
    free(ref16);
    free(raw);
    free(logits);
}

static void test_dense(void **state) { (void)state; check_case("moe.experts=0"); }
static void test_bf16_moe_top2(void **state) { (void)state; check_bf16("moe.experts=4 moe.top_k=2"); }
static void test_bf16_residual(void **state) { (void)state; check_bf16("model.layers=4 moe.experts=2x1,4x1 moe.residual=true"); }
static void test_moe_top1(void **state) { (void)state; check_case("moe.experts=4 moe.top_k=1"); }
static void test_moe_top2(void **state) { (void)state; check_case("moe.experts=4 moe.top_k=2"); }
// Two MoE layers of the same shape share one set of buffers in turn.
static void test_moe_layers_sharing(void **state) { (void)state; check_case("model.layers=4 moe.experts=4 moe.top_k=2"); }
static void test_residual_moe(void **state) { (void)state; check_case("moe.experts=4 moe.residual=true"); }
static void test_pyramid_residual_moe(void **state) {
    (void)state;
    check_case("model.layers=4 moe.experts=2x1,4x1 moe.residual=true");
}

int main(int argc, char **argv) {
    if (test_runtime_start(&argc, &argv, &rt) != 0) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dense),
        cmocka_unit_test(test_moe_top1),
        cmocka_unit_test(test_moe_top2),
        cmocka_unit_test(test_moe_layers_sharing),
        cmocka_unit_test(test_residual_moe),
        cmocka_unit_test(test_pyramid_residual_moe),
        cmocka_unit_test(test_bf16_moe_top2),
        cmocka_unit_test(test_bf16_residual),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return failed;
}
