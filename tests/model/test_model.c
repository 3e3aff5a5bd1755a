// tests/model/test_model.c: whole-model gradients of tiny GPT-MoE models against central finite differences,
// through the real plugins (cpu kernels, mpi comm): dense, MoE top-1, top-2 (with dropped tokens),
// residual MoE, PR-MoE (different expert counts per layer), and jitter noise held fixed.
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
#include "runtime.h"
#include "test_runtime.h" // test_runtime_start

static dsmoe_runtime rt;

static const char *base_deck =
    "[model]\nvocab = 16\nseq_len = 6\nhidden = 8\nheads = 2\nffn_hidden = 12\ninit_std = 0.3\n"
    "[moe]\nmin_capacity = 0\naux_loss_coeff = 0.1\n"
    "[train]\nbatch = 2\n";

typedef struct fd_case {
    const char *extra; // key=value overrides, space-separated (model.layers defaults to 2 here)
    int training;
} fd_case;

// base_deck plus command-line style overrides ("moe.experts=4 moe.top_k=2").
static void load_config(const char *extra, dsmoe_config *cfg) {
    char buf[1024], *ov[16];
    int n = 0;
    snprintf(buf, sizeof buf, "model.layers=2 moe.capacity_factor=1.0 %s", extra);
    for (char *tok = strtok(buf, " "); tok && n < 16; tok = strtok(NULL, " ")) ov[n++] = tok;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_config_load_text(base_deck, "test.deck", ov, n, (char *const[]){NULL}, 1, cfg, NULL, &err);
    if (s != DSMOE_OK) fail_msg("config: %s", err.msg);
}

// L = mean cross-entropy + aux_coeff * sum of l_aux (what backward differentiates).
static double total_loss(dsmoe_model *m, const dsmoe_config *cfg, const int32_t *in, const int32_t *tg, int training) {
    dsmoe_forward_result r;
    dsmoe_err err = {0};
    if (dsmoe_model_forward(m, in, tg, training, 77, 0, &r, &err) != DSMOE_OK) fail_msg("forward: %s", err.msg);
    return r.loss_sum / r.tokens + cfg->aux_loss_coeff * r.aux_sum;
}

static float get_param(float *slab, size_t i) {
    float v;
    rt.kern->copy_to_host(rt.kctx, rt.q, &v, slab + i, sizeof v);
    rt.kern->synchronize(rt.kctx);
    return v;
}
static void set_param(float *slab, size_t i, float v) { rt.kern->copy_to_device(rt.kctx, rt.q, slab + i, &v, sizeof v); }

static void check_gradients(const fd_case *c) {
    dsmoe_config cfg;
    load_config(c->extra, &cfg);
    dsmoe_model *m = NULL;
    dsmoe_err err = {0};
    int B = 2;
    assert_int_equal(dsmoe_model_create(&cfg, &rt, B, &m, &err), DSMOE_OK);
    assert_int_equal(dsmoe_model_init_params(m, 5, &err), DSMOE_OK);
    int S = B * cfg.seq_len;
    int32_t in[64], tg[64];
    for (int s = 0; s < S; s++) {
        in[s] = (int32_t)(dsmoe_rng_u64(11, (uint64_t)s) % (uint64_t)cfg.vocab);
        tg[s] = (int32_t)(dsmoe_rng_u64(12, (uint64_t)s) % (uint64_t)cfg.vocab);
    }
    assert_int_equal(dsmoe_model_zero_grads(m, &err), DSMOE_OK);
    total_loss(m, &cfg, in, tg, c->training);
    assert_int_equal(dsmoe_model_backward(m, 1.0f / (float)S, cfg.aux_loss_coeff, &err), DSMOE_OK);
    float *params = dsmoe_model_params(m), *grads = dsmoe_model_grads(m);
    int checked = 0, skipped = 0;
    for (int ti = 0; ti < dsmoe_model_tensor_count(m); ti++) {
        const dsmoe_param_tensor *t = dsmoe_model_tensor(m, ti);
        for (int j = 0; j < 3; j++) {
            size_t idx = t->offset + (size_t)(dsmoe_rng_u64(ti, (uint64_t)j) % t->numel);
            float p0 = get_param(params, idx);
            double fd[2];
            const float hs[2] = {1e-2f, 5e-3f};
            for (int k = 0; k < 2; k++) {
                set_param(params, idx, p0 + hs[k]);
                double lp = total_loss(m, &cfg, in, tg, c->training);
                set_param(params, idx, p0 - hs[k]);
                double lm = total_loss(m, &cfg, in, tg, c->training);
                fd[k] = (lp - lm) / (2.0 * hs[k]);
            }
            set_param(params, idx, p0);
            double g = get_param(grads, idx);
            // Two step sizes that disagree mean a routing decision flipped inside the interval.
            if (fabs(fd[0] - fd[1]) > 2e-4 + 0.02 * fabs(fd[1])) {
                skipped++;
                continue;
            }
            checked++;
            if (fabs(g - fd[1]) > 3e-4 + 0.03 * fabs(fd[1]))
                fail_msg("%s [%zu]: analytic %.6g vs finite difference %.6g (deck extra: %s)", t->name,
                         idx - t->offset, g, fd[1], c->extra);
        }
    }
    // Most entries must be smooth points, or the test proves nothing.
    assert_true(checked >= 5 * skipped);
    assert_true(checked > 20);
    dsmoe_model_free(m);
}

static void test_dense(void **state) {
    (void)state;
    check_gradients(&(fd_case){"moe.experts=0", 1});
}
static void test_moe_top1(void **state) {
    (void)state;
    check_gradients(&(fd_case){"moe.experts=4 moe.top_k=1", 1});
}
static void test_moe_top2_with_drops(void **state) {
    (void)state;
    check_gradients(&(fd_case){"moe.experts=4 moe.top_k=2 moe.capacity_factor=0.5", 1});
}
static void test_residual_moe(void **state) {
    (void)state;
    check_gradients(&(fd_case){"moe.experts=4 moe.residual=true", 1});
}
static void test_pyramid_residual_moe(void **state) {
    (void)state;
    check_gradients(&(fd_case){"model.layers=4 moe.experts=2x1,4x1 moe.residual=true", 1});
}
static void test_jitter_noise(void **state) {
    (void)state;
    check_gradients(&(fd_case){"moe.experts=4 moe.noise=jitter moe.jitter_eps=0.1", 1});
}
static void test_dropless_eval(void **state) {
    (void)state;
    check_gradients(&(fd_case){"moe.experts=4 moe.top_k=2 moe.drop_tokens=false", 0});
}

// The parameter count matches the architecture's formula.
static void test_parameter_count(void **state) {
    (void)state;
    dsmoe_config cfg;
    load_config("model.layers=4 moe.experts=2x1,4x1 moe.residual=true", &cfg);
    dsmoe_model *m = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_model_create(&cfg, &rt, 1, &m, &err), DSMOE_OK);
    size_t V = 16, T = 6, M = 8, F = 12;
    size_t attn = 2 * M + 3 * M * M + 3 * M + M * M + M + 2 * M;
    size_t mlp = F * M + F + M * F + M;
    size_t expert = F * M + F + M * F + M;
    size_t expect = V * M + T * M + 2 * M + 4 * attn + 4 * mlp /* residual MLP on MoE blocks too */
                    + (2 * M + 2) * 2                           /* coefficients */
                    + (2 + 4) * M                               /* routers */
                    + (2 + 4) * expert;
    assert_int_equal(dsmoe_model_global_params(m), expect);
    dsmoe_model_free(m);
}

int main(int argc, char **argv) {
    if (test_runtime_start(&argc, &argv, &rt) != 0) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dense),
        cmocka_unit_test(test_moe_top1),
        cmocka_unit_test(test_moe_top2_with_drops),
        cmocka_unit_test(test_residual_moe),
        cmocka_unit_test(test_pyramid_residual_moe),
        cmocka_unit_test(test_jitter_noise),
        cmocka_unit_test(test_dropless_eval),
        cmocka_unit_test(test_parameter_count),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return failed;
}
