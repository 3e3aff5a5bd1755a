// tests/plugins/kernel/test_cpu_distill.c: the cpu plugin's distillation pair (distill_forward, distill_backward)
// against a hand-worked case, a double-precision reference, finite differences of the loss, the
// temperature's scaling, identical models (KL = 0), underflowing teacher probabilities, bfloat16 beside
// float32 on the same rounded logits, and bad arguments.
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cpu_plugin_test.h"

#define F32 DSMOE_FLOAT32
#define BF16 DSMOE_BFLOAT16
enum { S = 6, V = 13 };

// KL(softmax(t / T) || softmax(s / T)) of one row, and q - p, in double.
static double ref_kl(const float *s, const float *t, double T, int n, double *diff) {
    double ms = -INFINITY, mt = -INFINITY, zs = 0, zt = 0;
    for (int v = 0; v < n; v++) ms = fmax(ms, s[v] / T), mt = fmax(mt, t[v] / T);
    for (int v = 0; v < n; v++) zs += exp(s[v] / T - ms), zt += exp(t[v] / T - mt);
    double kl = 0;
    for (int v = 0; v < n; v++) {
        double lp = t[v] / T - mt - log(zt), lq = s[v] / T - ms - log(zs);
        kl += exp(lp) * (lp - lq);
        if (diff) diff[v] = exp(lq) - exp(lp);
    }
    return kl;
}

// Runs the forward on host rows: losses (S), diff (S, V).
static void forward(const void *s, const void *t, dsmoe_dtype dt, float T, int rows, float *losses, float *diff) {
    size_t es = dt == BF16 ? 2 : 4, n = (size_t)rows * V;
    void *ds = dev_put(C, s, n * es), *dtch = dev_put(C, t, n * es);
    float *dl = dev_new(C, (size_t)rows * 4, 0), *dd = dev_new(C, n * 4, 0);
    OK(P->distill_forward(C, Q, dl, dd, ds, dtch, dt, T, rows, V));
    dev_get(C, losses, dl, (size_t)rows * 4);
    if (diff) dev_get(C, diff, dd, n * 4);
    dev_free(C, ds), dev_free(C, dtch), dev_free(C, dl), dev_free(C, dd);
}

static void test_table(void **state) {
    (void)state;
    assert_true(P->caps & DSMOE_KCAP_DISTILL);
    assert_non_null(P->distill_forward);
    assert_non_null(P->distill_backward);
}

// V = 2, by hand: teacher logits (ln 3, 0) give p = (3/4, 1/4); the student's (0, 0) give q = (1/2, 1/2):
// KL = 3/4 ln(3/2) + 1/4 ln(1/2), q - p = (-1/4, 1/4). At T = 2 the teacher's (2 ln 3, 0) give the same p.
static void test_hand_worked(void **state) {
    (void)state;
    const double want = 0.75 * log(1.5) + 0.25 * log(0.5); // 0.1308...
    float s[2] = {0, 0}, t1[2] = {(float)log(3.0), 0}, t2[2] = {(float)(2 * log(3.0)), 0}, l, d[2];
    void *ds = dev_put(C, s, 8), *dt = dev_put(C, t1, 8);
    float *dl = dev_new(C, 4, 0), *dd = dev_new(C, 8, 0);
    for (int pass = 0; pass < 2; pass++) {
        OK(P->copy_to_device(C, Q, dt, pass ? t2 : t1, 8));
        OK(P->distill_forward(C, Q, dl, dd, ds, dt, F32, pass ? 2.0f : 1.0f, 1, 2));
        dev_get(C, &l, dl, 4);
        dev_get(C, d, dd, 8);
        if (fabs(l - want) > 1e-6) fail_msg("T = %d: KL %.9f, expected %.9f", pass + 1, l, want);
        if (fabs(d[0] + 0.25) > 1e-6 || fabs(d[1] - 0.25) > 1e-6)
            fail_msg("T = %d: q - p = (%g, %g), expected (-0.25, 0.25)", pass + 1, d[0], d[1]);
    }
    dev_free(C, ds), dev_free(C, dt), dev_free(C, dl), dev_free(C, dd);
}

// Random rows against the double reference, at three temperatures.
static void test_reference(void **state) {
    (void)state;
    float *s = rnd_fill(S * V, 6), *t = rnd_fill(S * V, 6), losses[S], diff[S * V];
    const float temps[] = {0.5f, 1.0f, 3.0f};
    for (int k = 0; k < 3; k++) {
        forward(s, t, F32, temps[k], S, losses, diff);
        double want_l[S], want_d[S * V];
        for (int r = 0; r < S; r++) want_l[r] = ref_kl(s + r * V, t + r * V, temps[k], V, want_d + r * V);
        assert_close("distill losses", losses, want_l, S, 1e-6, 1e-5);
        assert_close("distill q - p", diff, want_d, S * V, 1e-7, 1e-5);
        for (int r = 0; r < S; r++) assert_true(losses[r] > 0);
    }
    free(s), free(t);
}

// L = sum_r w_r KL_r; the backward with scale w / T must give dL/ds (central differences).
static void test_finite_differences(void **state) {
    (void)state;
    const float T = 1.7f, w = 0.8f, base = 0.25f;
    float *s = rnd_fill(S * V, 3), *t = rnd_fill(S * V, 3), losses[S], diff[S * V];
    forward(s, t, F32, T, S, losses, diff);
    float init[S * V];
    for (int i = 0; i < S * V; i++) init[i] = base; // the backward accumulates
    float *dg = dev_put(C, init, sizeof init), *dd = dev_put(C, diff, sizeof diff), g[S * V];
    OK(P->distill_backward(C, Q, dg, F32, dd, w / T, S, V));
    dev_get(C, g, dg, sizeof g);
    const double h = 1e-2;
    double num[S * V], maxabs = 0;
    float ana[S * V];
    for (int i = 0; i < S * V; i++) {
        float save = s[i];
        double lp = 0, lm = 0;
        s[i] = save + (float)h;
        forward(s, t, F32, T, S, losses, NULL);
        for (int r = 0; r < S; r++) lp += w * (double)losses[r];
        s[i] = save - (float)h;
        forward(s, t, F32, T, S, losses, NULL);
        for (int r = 0; r < S; r++) lm += w * (double)losses[r];
        s[i] = save;
        num[i] = (lp - lm) / (2 * h);
        ana[i] = g[i] - base;
        maxabs = fmax(maxabs, fabs(num[i]));
    }
    assert_true(maxabs > 1e-2); // a gradient worth checking
    assert_close("distill dstudent", ana, num, S * V, 2e-4, 1e-3);
    dev_free(C, dg), dev_free(C, dd);
    free(s), free(t);
}

// The same logits: KL and q - p are exactly 0. A teacher probability that underflows (logit -1e4) gives
// a finite KL, equal to the reference (its term is 0).
static void test_identical_and_underflow(void **state) {
    (void)state;
    float *s = rnd_fill(S * V, 5), losses[S], diff[S * V];
    forward(s, s, F32, 1.3f, S, losses, diff);
    for (int r = 0; r < S; r++) assert_true(losses[r] == 0.0f);
    for (int i = 0; i < S * V; i++) assert_true(diff[i] == 0.0f);
    float t[S * V];
    memcpy(t, s, sizeof t);
    for (int r = 0; r < S; r++) t[r * V + r % V] = -1e4f;
    forward(s, t, F32, 1.0f, S, losses, diff);
    double want[S];
    for (int r = 0; r < S; r++) want[r] = ref_kl(s + r * V, t + r * V, 1.0, V, NULL);
    for (int i = 0; i < S * V; i++) assert_true(isfinite(diff[i]));
    assert_close("distill losses (underflow)", losses, want, S, 1e-6, 1e-5);
    free(s);
}

static uint16_t to_bf16(float f) { // round to nearest even (the logits here are finite)
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// bfloat16 logits are widened exactly: the same losses and q - p as float32 on the rounded values; the
// backward into bfloat16 is the float32 sum rounded once.
static void test_bf16(void **state) {
    (void)state;
    float *s = rnd_fill(S * V, 6), *t = rnd_fill(S * V, 6);
    uint16_t sb[S * V], tb[S * V];
    for (int i = 0; i < S * V; i++) sb[i] = to_bf16(s[i]), tb[i] = to_bf16(t[i]), s[i] = from_bf16(sb[i]),
                                    t[i] = from_bf16(tb[i]);
    float l32[S], d32[S * V], l16[S], d16[S * V];
    forward(s, t, F32, 2.0f, S, l32, d32);
    forward(sb, tb, BF16, 2.0f, S, l16, d16);
    assert_memory_equal(l32, l16, sizeof l32);
    assert_memory_equal(d32, d16, sizeof d32);
    uint16_t g0[S * V], g[S * V];
    for (int i = 0; i < S * V; i++) g0[i] = to_bf16(0.5f * s[i]);
    void *dg = dev_put(C, g0, sizeof g0);
    float *dd = dev_put(C, d32, sizeof d32);
    OK(P->distill_backward(C, Q, dg, BF16, dd, 0.3f, S, V));
    dev_get(C, g, dg, sizeof g);
    for (int i = 0; i < S * V; i++)
        if (g[i] != to_bf16(from_bf16(g0[i]) + 0.3f * d32[i]))
            fail_msg("bf16 dstudent[%d] = %g, expected %g", i, from_bf16(g[i]), from_bf16(to_bf16(from_bf16(g0[i]) + 0.3f * d32[i])));
    dev_free(C, dg), dev_free(C, dd);
    free(s), free(t);
}

// Each refusal on a fresh context: errors are sticky.
static void test_bad_arguments(void **state) {
    (void)state;
    for (int k = 0; k < 2; k++) {
        dsmoe_kernel_ctx *c = cpt_ctx(1);
        float *buf = dev_zeros(c, (2 + 3 * V) * 4);
        dsmoe_kernel_queue *q = P->default_queue(c);
        dsmoe_status st = k == 0 ? P->distill_forward(c, q, buf, buf + 2, buf + 2 + V, buf + 2 + 2 * V, F32, 0.0f, 1, V)
                                 : P->distill_backward(c, q, buf, DSMOE_INT32, buf, 1.0f, 1, V);
        assert_int_equal(st, k == 0 ? DSMOE_ERR_INVALID : DSMOE_ERR_UNSUPPORTED);
        const char *want = k == 0 ? "temperature" : "distill_backward";
        if (!strstr(P->last_error(c), want)) fail_msg("message '%s' lacks '%s'", P->last_error(c), want);
        dev_free(c, buf);
        P->finalize(c);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),          cmocka_unit_test(test_hand_worked),
        cmocka_unit_test(test_reference),      cmocka_unit_test(test_finite_differences),
        cmocka_unit_test(test_identical_and_underflow), cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_bad_arguments),
    };
    if (cpt_load(2) != 0) return 1;
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    cpt_unload();
    return failed;
}
