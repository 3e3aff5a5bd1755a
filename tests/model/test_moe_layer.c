// tests/model/test_moe_layer.c: the MoE layer (core/model/moe_layer.c) on one rank, through the real plugins (cpu
// kernels, mpi comm): forward against an independent naive reference in double (softmax, top-k,
// capacity in token order, per-token expert FFN with tanh-GELU), and every gradient against central
// finite differences of L = sum(r * out) + daux * l_aux computed through that reference in double.
// bfloat16 (cfg.dt): output against the reference and a float32 layer, dx and every weight gradient
// against the float32 layer, all on the same bf16-rounded values, within bounds from the roundings; the
// gating (probabilities, choices, slots, l_aux) equal to the float32 layer's.
// Expert parallelism on 2 and 4 ranks: tests/model/test_moe_layer_ep.c.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h" // dsmoe_capacity
#include "dsmoe/rng.h"
#include "moe_layer_testutil.h"

// The jitter sub-key the layer derives from step->seed (docs/moe-layer.md), written again here.
#define TAG_JITTER 0x4A495454ull

// ----------------------------------------------------------------------------------------------------
// naive reference in double

typedef struct ref_in {
    int S, M, F, E, K;
    int C;          // capacity, or -1 = dropless (the max over experts of the tokens choosing them)
    const float *u; // (S, M) jitter factors of the gate input, or NULL
    double *x, *wg, *w1, *b1, *w2, *b2; // the problem's values in double (FD perturbs these)
} ref_in;

typedef struct ref_out {
    double aux;
    int C;
    long kept;
    int choice[256 * 2], slot[256 * 2], load[64];
    double min_gap; // smallest gap between consecutive sorted probabilities among the top K+1
} ref_out;

static double gelu(double v) { return 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))); }

static void ref_forward(const ref_in *in, double *out, ref_out *o) {
    int S = in->S, M = in->M, F = in->F, E = in->E, K = in->K;
    assert_true(S <= 256 && E <= 64 && E <= 16);
    double probs[256][16], h[64], ffn[64];
    int count[64] = {0}, used[64] = {0}, first[64] = {0};
    o->min_gap = 1.0;
    for (int s = 0; s < S; s++) {
        double logit[16], mx = -INFINITY, sum = 0;
        for (int e = 0; e < E; e++) {
            double acc = 0;
            for (int m = 0; m < M; m++) {
                double xg = in->x[s * M + m] * (in->u ? (double)in->u[s * M + m] : 1.0);
                acc += xg * in->wg[e * M + m];
            }
            logit[e] = acc;
            if (acc > mx) mx = acc;
        }
        for (int e = 0; e < E; e++) sum += (probs[s][e] = exp(logit[e] - mx));
        for (int e = 0; e < E; e++) probs[s][e] /= sum;
        int c0 = 0, c1 = -1;
        for (int e = 1; e < E; e++)
            if (probs[s][e] > probs[s][c0]) c0 = e;
        for (int e = 0; e < E; e++)
            if (e != c0 && (c1 < 0 || probs[s][e] > probs[s][c1])) c1 = e;
        o->choice[s * K] = c0;
        if (K == 2) o->choice[s * K + 1] = c1;
        for (int k = 0; k < K; k++) count[o->choice[s * K + k]]++;
        first[c0]++;
        // Gaps among the top K+1 probabilities: choices must not flip between float and double.
        double p0 = probs[s][c0], p1 = probs[s][c1], p2 = -1;
        for (int e = 0; e < E; e++)
            if (e != c0 && e != c1 && probs[s][e] > p2) p2 = probs[s][e];
        double g = p0 - p1;
        if (K == 2 && E > 2 && p1 - p2 < g) g = p1 - p2;
        if (g < o->min_gap) o->min_gap = g;
    }
    int C = in->C;
    if (C < 0) {
        C = 0;
        for (int e = 0; e < E; e++) C = count[e] > C ? count[e] : C;
    }
    o->C = C;
    // Level 0 for every token, then level 1; kept tokens take the next slot in token order.
    for (int k = 0; k < K; k++)
        for (int s = 0; s < S; s++) {
            int e = o->choice[s * K + k];
            o->slot[s * K + k] = used[e] < C ? used[e]++ : -1;
        }
    o->kept = 0;
    for (int e = 0; e < E; e++) o->kept += (o->load[e] = used[e]);
    double aux = 0;
    for (int e = 0; e < E; e++) {
        double me = 0;
        for (int s = 0; s < S; s++) me += probs[s][e];
        aux += me / S * ((double)first[e] / S);
    }
    o->aux = E * aux;
    for (int s = 0; s < S; s++) {
        double g[2] = {0, 0}, wt[2] = {0, 0};
        for (int k = 0; k < K; k++)
            if (o->slot[s * K + k] >= 0) g[k] = probs[s][o->choice[s * K + k]];
        if (K == 1) {
            wt[0] = g[0];
        } else {
            double den = g[0] + g[1] > FLT_EPSILON ? g[0] + g[1] : FLT_EPSILON;
            wt[0] = g[0] / den;
            wt[1] = g[1] / den;
        }
        for (int m = 0; m < M; m++) out[s * M + m] = 0;
        for (int k = 0; k < K; k++) {
            if (o->slot[s * K + k] < 0) continue;
            int e = o->choice[s * K + k];
            const double *w1 = in->w1 + (size_t)e * F * M, *w2 = in->w2 + (size_t)e * M * F;
            for (int f = 0; f < F; f++) {
                double acc = in->b1[e * F + f];
                for (int m = 0; m < M; m++) acc += w1[f * M + m] * in->x[s * M + m];
                h[f] = gelu(acc);
            }
            for (int m = 0; m < M; m++) {
                double acc = in->b2[e * M + m];
                for (int f = 0; f < F; f++) acc += w2[m * F + f] * h[f];
                ffn[m] = acc;
            }
            for (int m = 0; m < M; m++) out[s * M + m] += wt[k] * ffn[m];
        }
    }
}

static double ref_loss(const ref_in *in, const double *r, double daux, double *scratch) {
    ref_out o;
    ref_forward(in, scratch, &o);
    double L = daux * o.aux;
    for (int i = 0; i < in->S * in->M; i++) L += r[i] * scratch[i];
    return L;
}

static double *to_double(const float *p, size_t n) {
    double *d = malloc((n ? n : 1) * sizeof(double));
    assert_non_null(d);
    for (size_t i = 0; i < n; i++) d[i] = p[i];
    return d;
}

// ----------------------------------------------------------------------------------------------------
// one-rank checks against the reference

typedef struct fd_case {
    const char *name;
    int S, M, F, E, K;
    float cf;         // capacity factor (training) ; eval uses eval_cf
    float eval_cf;
    int min_capacity;
    int dropless;
    int noise;        // DSMOE_NOISE_*
    int training;
    int expect_drops; // 1: the data must drop some choices, 0: none, -1: either
} fd_case;

// Max |got - want| over n, and max |want|.
static void diff(const float *got, const double *want, size_t n, double *maxdiff, double *maxref) {
    *maxdiff = 0;
    *maxref = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(got[i] - want[i]);
        if (d > *maxdiff || isnan(d)) *maxdiff = isnan(d) ? INFINITY : d;
        if (fabs(want[i]) > *maxref) *maxref = fabs(want[i]);
    }
}

// Central differences of L over every entry of `param` (n, in double), against the layer's gradient
// (float, with `prefill` subtracted: the layer accumulates into buffers that held it).
static void check_grad(const char *what, const fd_case *c, ref_in *in, double *param, size_t n, const float *got,
                       float prefill, const double *r, double daux, double *scratch) {
    const double h = 1e-5;
    double worst = 0, maxfd = 0;
    size_t worst_i = 0;
    double *fd = malloc(n * sizeof(double));
    assert_non_null(fd);
    for (size_t i = 0; i < n; i++) {
        double keep = param[i];
        param[i] = keep + h;
        double lp = ref_loss(in, r, daux, scratch);
        param[i] = keep - h;
        double lm = ref_loss(in, r, daux, scratch);
        param[i] = keep;
        fd[i] = (lp - lm) / (2 * h);
        if (fabs(fd[i]) > maxfd) maxfd = fabs(fd[i]);
    }
    for (size_t i = 0; i < n; i++) {
        double d = fabs(((double)got[i] - prefill) - fd[i]);
        if (d > worst || isnan(d)) {
            worst = isnan(d) ? INFINITY : d;
            worst_i = i;
        }
    }
    // Float rounding in the layer (sums of a few dozen products, plus the prefill) against the double
    // reference: 1e-4 of the largest gradient is far above rounding and far below any real mistake.
    double tol = 1e-4 * maxfd + 2e-6;
    if (!(worst <= tol))
        fail_msg("%s: d%s[%zu] = %.7g, finite difference %.7g (max |fd| %.3g, tolerance %.3g)", c->name, what,
                 worst_i, (double)got[worst_i] - prefill, fd[worst_i], maxfd, tol);
    assert_true(maxfd > 0 || n == 0);
    free(fd);
}

static void run_fd_case(const fd_case *c, uint64_t seed) {
    problem p = problem_make(c->S, c->M, c->F, c->E, c->K, dsmoe_rng_key(seed, 10, 0, 0), dsmoe_rng_key(seed, 11, 0, 0));
    dsmoe_moe_config cfg = layer_config(&p, 1, self_group);
    cfg.capacity_factor = c->cf;
    cfg.eval_capacity_factor = c->eval_cf;
    cfg.min_capacity = c->min_capacity;
    cfg.drop_tokens = !c->dropless;
    cfg.noise = c->noise;
    cfg.jitter_eps = c->noise == DSMOE_NOISE_JITTER ? 0.2f : 0.0f;
    dsmoe_moe_layer *L = layer_make(&cfg);
    dsmoe_moe_weights w = weights_dev(&p, 0, p.E);
    size_t SM = (size_t)p.S * p.M;
    float *x = dev_copy(p.x, SM), *out = dev_fill(SM, 7.0f);
    dsmoe_moe_step step = {.training = c->training, .seed = seed * 31 + 7, .token_offset = 1000};
    dsmoe_moe_stats st;
    dsmoe_err err = {0};
    if (dsmoe_moe_forward(L, &w, x, out, &step, &st, &err) != DSMOE_OK) fail_msg("%s: forward: %s", c->name, err.msg);

    // Reference, with the jitter factors the layer's stream gives (the plugin's formula in float).
    float *u = NULL;
    if (c->noise == DSMOE_NOISE_JITTER && c->training) {
        u = host_alloc(SM);
        uint64_t key = dsmoe_rng_key(step.seed, TAG_JITTER, 0, 0);
        for (size_t i = 0; i < SM; i++)
            u[i] = 1.0f - cfg.jitter_eps + 2.0f * cfg.jitter_eps * dsmoe_rng_uniform(key, step.token_offset * p.M + i);
    }
    int C = c->dropless ? -1
                        : (int)fmax(ceil((double)p.S / p.E * p.K * (c->training ? c->cf : c->eval_cf)),
                                    (double)c->min_capacity);
    ref_in in = {.S = p.S, .M = p.M, .F = p.F, .E = p.E, .K = p.K, .C = C, .u = u,
                 .x = to_double(p.x, SM), .wg = to_double(p.wg, (size_t)p.E * p.M),
                 .w1 = to_double(p.w1, (size_t)p.E * p.F * p.M), .b1 = to_double(p.b1, (size_t)p.E * p.F),
                 .w2 = to_double(p.w2, (size_t)p.E * p.M * p.F), .b2 = to_double(p.b2, (size_t)p.E * p.M)};
    double *ref = malloc(SM * sizeof(double)), *scratch = malloc(SM * sizeof(double));
    ref_out o;
    ref_forward(&in, ref, &o);
    if (o.min_gap < 1e-3) fail_msg("%s: test data has a near tie (gap %.2g): choose another seed", c->name, o.min_gap);

    // Forward: output, stats.
    float *got = host_alloc(SM);
    to_host(got, out, SM);
    double md, mr;
    diff(got, ref, SM, &md, &mr);
    if (!(md <= 1e-5 * mr + 1e-6)) fail_msg("%s: forward max |out - ref| = %.3g (max |ref| %.3g)", c->name, md, mr);
    assert_int_equal(st.capacity, o.C);
    assert_int_equal(st.routed, (long)p.S * p.K);
    assert_int_equal(st.dropped, (long)p.S * p.K - o.kept);
    for (int e = 0; e < p.E; e++) assert_int_equal(st.expert_load[e], o.load[e]);
    if (!(fabs(st.aux_loss - o.aux) <= 1e-5 * fabs(o.aux))) fail_msg("%s: aux %.8g vs %.8g", c->name, st.aux_loss, o.aux);
    if (c->expect_drops == 1 && st.dropped == 0) fail_msg("%s: the data was meant to drop choices", c->name);
    if (c->expect_drops == 0 && st.dropped != 0) fail_msg("%s: %ld choices dropped, expected none", c->name, st.dropped);
    if (c->expect_drops == 1) {
        int zero_row_seen = 0; // a token dropped by every choice gets 0
        for (int s = 0; s < p.S && !zero_row_seen; s++) {
            int kept = 0;
            for (int k = 0; k < p.K; k++) kept += o.slot[s * p.K + k] >= 0;
            if (!kept) {
                zero_row_seen = 1;
                for (int m = 0; m < p.M; m++) assert_true(got[s * p.M + m] == 0.0f);
            }
        }
    }

    // Backward of L = sum r * out + daux * l_aux into buffers prefilled with constants.
    const float prefill = 0.5f, dx_prefill = 0.25f;
    const double daux = 0.7;
    float *rh = host_alloc(SM);
    fill_normal(rh, SM, dsmoe_rng_key(seed, 12, 0, 0), 1.0f);
    double *r = to_double(rh, SM);
    float *dout = dev_copy(rh, SM), *dx = dev_fill(SM, dx_prefill);
    dsmoe_moe_weights g = grads_dev(&p, p.E, prefill);
    if (dsmoe_moe_backward(L, &w, &g, dout, dx, (float)daux, &err) != DSMOE_OK)
        fail_msg("%s: backward: %s", c->name, err.msg);
    struct { const char *what; double *param; float *dev; size_t n; float pre; } gs[] = {
        {"x", in.x, dx, SM, dx_prefill},
        {"wg", in.wg, g.wg, (size_t)p.E * p.M, prefill},
        {"w1", in.w1, g.w1, (size_t)p.E * p.F * p.M, prefill},
        {"b1", in.b1, g.b1, (size_t)p.E * p.F, prefill},
        {"w2", in.w2, g.w2, (size_t)p.E * p.M * p.F, prefill},
        {"b2", in.b2, g.b2, (size_t)p.E * p.M, prefill},
    };
    for (size_t i = 0; i < sizeof gs / sizeof gs[0]; i++) {
        float *gh = host_alloc(gs[i].n);
        to_host(gh, gs[i].dev, gs[i].n);
        check_grad(gs[i].what, c, &in, gs[i].param, gs[i].n, gh, gs[i].pre, r, daux, scratch);
        free(gh);
    }
    // A second backward without a forward is refused.
    assert_int_not_equal(dsmoe_moe_backward(L, &w, &g, dout, dx, (float)daux, &err), DSMOE_OK);

    weights_free(&g);
    weights_free(&w);
    float *bufs[] = {x, out, dout, dx};
    for (int i = 0; i < 4; i++) rt.kern->free(rt.kctx, bufs[i]);
    double *dbl[] = {in.x, in.wg, in.w1, in.b1, in.w2, in.b2, ref, scratch, r};
    for (int i = 0; i < 9; i++) free(dbl[i]);
    free(u);
    free(got);
    free(rh);
    problem_free(&p);
    dsmoe_moe_layer_free(L);
}

//                                    name                     S   M  F  E  K  cf    eval min drop noise  train drops
static void test_top1_drops(void **s) {
    (void)s;
    run_fd_case(&(fd_case){"top1 drops", 24, 6, 10, 4, 1, 1.0f, 1.0f, 0, 0, DSMOE_NOISE_NONE, 1, 1}, 101);
}
static void test_top1_no_drops(void **s) {
    (void)s;
    run_fd_case(&(fd_case){"top1 no drops", 24, 6, 10, 4, 1, 4.0f, 1.0f, 0, 0, DSMOE_NOISE_NONE, 1, 0}, 102);
}
static void test_top2_drops(void **s) {
    (void)s;
    run_fd_case(&(fd_case){"top2 drops", 24, 6, 10, 4, 2, 0.75f, 1.0f, 0, 0, DSMOE_NOISE_NONE, 1, 1}, 103);
}
static void test_top2_no_drops(void **s) {
    (void)s;
    run_fd_case(&(fd_case){"top2 no drops", 24, 6, 10, 4, 2, 2.0f, 1.0f, 0, 0, DSMOE_NOISE_NONE, 1, 0}, 104);
}
static void test_top1_dropless(void **s) {
    (void)s;
    run_fd_case(&(fd_case){"top1 dropless", 24, 6, 10, 4, 1, 1.0f, 1.0f, 0, 1, DSMOE_NOISE_NONE, 1, 0}, 105);
}
static void test_top2_dropless(void **s) {
    (void)s;
    run_fd_case(&(fd_case){"top2 dropless", 24, 6, 10, 4, 2, 1.0f, 1.0f, 0, 1, DSMOE_NOISE_NONE, 1, 0}, 106);
}
// Jitter while training: the gate sees x * u, the experts see x; dx gets the router part times u.
static void test_top2_jitter(void **s) {
    (void)s;
    run_fd_case(&(fd_case){"top2 jitter", 24, 6, 10, 4, 2, 1.0f, 1.0f, 0, 0, DSMOE_NOISE_JITTER, 1, -1}, 107);
}
// Evaluation: eval_capacity_factor (here 0.5, with min_capacity above it for E = 8) and no jitter.
static void test_eval_capacity(void **s) {
    (void)s;
    run_fd_case(&(fd_case){"eval capacity", 32, 6, 10, 8, 1, 4.0f, 0.5f, 3, 0, DSMOE_NOISE_JITTER, 0, 1}, 108);
}

// Dropless capacity varies by step: buffers grow and the result stays right. The second problem sends
// every token to expert 0 (C = S), the third is balanced again (C shrinks inside grown buffers).
static void test_capacity_growth(void **s) {
    (void)s;
    problem p = problem_make(16, 6, 10, 4, 2, 201, 202);
    dsmoe_moe_config cfg = layer_config(&p, 1, self_group);
    cfg.drop_tokens = 0;
    dsmoe_moe_layer *L = layer_make(&cfg);
    size_t SM = (size_t)p.S * p.M;
    int expect_C[3];
    for (int round = 0; round < 3; round++) {
        if (round == 1) {
            for (int t = 0; t < p.S; t++) p.x[t * p.M] = 3.0f + 0.1f * t; // expert 0 wins every token
            for (int e = 0; e < p.E; e++) p.wg[e * p.M] = e == 0 ? 4.0f : 0.0f;
        }
        if (round == 2) fill_normal(p.x, SM, 203, 1.0f);
        dsmoe_moe_weights w = weights_dev(&p, 0, p.E);
        float *x = dev_copy(p.x, SM), *out = dev_fill(SM, 0);
        dsmoe_moe_step step = {.training = 1, .seed = 5, .token_offset = 0};
        dsmoe_moe_stats st;
        dsmoe_err err = {0};
        if (dsmoe_moe_forward(L, &w, x, out, &step, &st, &err) != DSMOE_OK) fail_msg("forward: %s", err.msg);
        ref_in in = {.S = p.S, .M = p.M, .F = p.F, .E = p.E, .K = p.K, .C = -1, .x = to_double(p.x, SM),
                     .wg = to_double(p.wg, (size_t)p.E * p.M), .w1 = to_double(p.w1, (size_t)p.E * p.F * p.M),
                     .b1 = to_double(p.b1, (size_t)p.E * p.F), .w2 = to_double(p.w2, (size_t)p.E * p.M * p.F),
                     .b2 = to_double(p.b2, (size_t)p.E * p.M)};
        double *ref = malloc(SM * sizeof(double));
        ref_out o;
        ref_forward(&in, ref, &o);
        float *got = host_alloc(SM);
        to_host(got, out, SM);
        double md, mr;
        diff(got, ref, SM, &md, &mr);
        if (!(md <= 1e-5 * mr + 1e-6)) fail_msg("round %d: max |out - ref| = %.3g", round, md);
        assert_int_equal(st.capacity, o.C);
        assert_int_equal(st.dropped, 0);
        expect_C[round] = st.capacity;
        double *dbl[] = {in.x, in.wg, in.w1, in.b1, in.w2, in.b2, ref};
        for (int i = 0; i < 7; i++) free(dbl[i]);
        free(got);
        rt.kern->free(rt.kctx, x);
        rt.kern->free(rt.kctx, out);
        weights_free(&w);
        if (round == 1) {
            fill_normal(p.wg, (size_t)p.E * p.M, dsmoe_rng_key(201, 2, 0, 0), 1.0f / sqrtf((float)p.M));
        }
    }
    assert_int_equal(expect_C[1], p.S);
    assert_true(expect_C[0] < p.S && expect_C[2] < p.S);
    dsmoe_moe_layer_free(L);
    problem_free(&p);
}

// Bad configurations are refused with a message.
static void test_bad_config(void **s) {
    (void)s;
    problem p = problem_make(8, 4, 4, 4, 2, 1, 2);
    dsmoe_moe_layer *L = NULL;
    dsmoe_err err = {0};
    dsmoe_moe_config cfg = layer_config(&p, 1, self_group);
    cfg.K = 3;
    assert_int_equal(dsmoe_moe_layer_create(&rt, &cfg, &L, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "top-k"));
    cfg = layer_config(&p, 3, self_group);
    assert_int_equal(dsmoe_moe_layer_create(&rt, &cfg, &L, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "ep=3"));
    cfg = layer_config(&p, 2, self_group); // divides E, but the group has one rank
    assert_int_equal(dsmoe_moe_layer_create(&rt, &cfg, &L, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "group has 1"));
    cfg = layer_config(&p, 1, self_group);
    cfg.ep_ctl = NULL;
    assert_int_equal(dsmoe_moe_layer_create(&rt, &cfg, &L, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "ep_ctl is not set"));
    cfg = layer_config(&p, 1, self_group);
    cfg.aux_scope = 2;
    assert_int_equal(dsmoe_moe_layer_create(&rt, &cfg, &L, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "aux_scope=2"));
    cfg = layer_config(&p, 1, self_group);
    cfg.alltoall = 3;
    assert_int_equal(dsmoe_moe_layer_create(&rt, &cfg, &L, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "alltoall=3"));
    assert_null(L);
    problem_free(&p);
}

// Capacity follows config.h's rule (dsmoe_capacity): a float cf of 1.1 on 100 tokens over 10 experts
// is 11 slots (a plain ceil of 100/10 * 1.10000002 would give 12); 1.25 gives ceil(12.5) = 13.
static void test_capacity_rule(void **s) {
    (void)s;
    problem p = problem_make(100, 4, 4, 10, 1, 21, 22);
    dsmoe_moe_config cfg = layer_config(&p, 1, self_group);
    cfg.capacity_factor = 1.1f;
    cfg.eval_capacity_factor = 1.25f;
    dsmoe_moe_layer *L = layer_make(&cfg);
    dsmoe_moe_weights w = weights_dev(&p, 0, p.E);
    size_t SM = (size_t)p.S * p.M;
    float *x = dev_copy(p.x, SM), *out = dev_fill(SM, 0);
    dsmoe_err err = {0};
    for (int training = 1; training >= 0; training--) {
        dsmoe_moe_step step = {.training = training, .seed = 3, .token_offset = 0};
        dsmoe_moe_stats st;
        if (dsmoe_moe_forward(L, &w, x, out, &step, &st, &err) != DSMOE_OK) fail_msg("forward: %s", err.msg);
        assert_int_equal(st.capacity, training ? 11 : 13);
        assert_int_equal(st.capacity, dsmoe_capacity(p.S, p.E, p.K, training ? 1.1f : 1.25f, 0));
    }
    rt.kern->free(rt.kctx, x);
    rt.kern->free(rt.kctx, out);
    weights_free(&w);
    dsmoe_moe_layer_free(L);
    problem_free(&p);
}

// ----------------------------------------------------------------------------------------------------
// bfloat16 (cfg.dt) against float32 on the same values: x, w1, w2 and dout rounded to bfloat16 on the
// host, so that both layers start from identical numbers and every difference is the bfloat16 layer's
// own rounding of its intermediates.

typedef struct bf16_case {
    const char *name;
    int S, M, F, E, K;
    float cf;
    int dropless;
    int noise;
} bf16_case;

// u = 2^-8: one rounding to bfloat16 (8 significant bits, round to nearest even) changes a value by at
// most half an ulp, 2^-8 of it. Products of two bfloat16 are exact in float32 and the GEMMs accumulate
// in float32, so the bfloat16 layer differs from the float32 one only by the roundings of what it
// stores in bfloat16. Forward: act = gelu(h), the expert output y, out (3 roundings on the longest
// path). Backward: dy, dh, the expert input gradient, the top-2 sum into dx, the router's input gradient
// and its add into dx (up to 6 on dx; 2 to 4 on the weight gradients, through dy, act, dh and the
// combine weights' gradient dot(dout, y)). Errors are measured against the largest magnitude of the
// reference tensor, and the roundings' errors mostly cancel in the float32 sums: the bounds are the
// rounding counts rounded up, 4u for the forward and 8u for the gradients (over 105 random problems of
// these shapes the worst seen was 1.8u for out, 2.5u for dx and 1.5u for a weight gradient). A wrong
// expert, weight or missing term is an O(1) error, 30x above the looser bound.
#define BF16_U (1.0 / 256.0)
#define BF16_TOL_FWD (4 * BF16_U)
#define BF16_TOL_GRAD (8 * BF16_U)

// max over n of |(got - pre) - (want - pre)| / max |want - pre|, in double (pre: the prefill of an
// accumulating buffer, or 0).
static double rel_max(const float *got, const float *want, size_t n, float pre) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(((double)got[i] - pre) - ((double)want[i] - pre));
        md = d > md || isnan(d) ? (isnan(d) ? INFINITY : d) : md;
        mr = fmax(mr, fabs((double)want[i] - pre));
    }
    assert_true(mr > 0);
    return md / mr;
}

// The same problem with probe experts: w1 = b1 = w2 = 0 and b2 of expert e the unit vector e (M >= E),
// so every expert outputs its unit vector and out[s, e] is token s's combine weight of expert e (0 when
// not chosen or dropped): the layer's gating made visible. The router and x are p's.
static problem probe_problem(const problem *p) {
    problem q = *p;
    q.w1 = host_alloc((size_t)p->E * p->F * p->M);
    q.b1 = host_alloc((size_t)p->E * p->F);
    q.w2 = host_alloc((size_t)p->E * p->M * p->F);
    q.b2 = host_alloc((size_t)p->E * p->M);
    for (int e = 0; e < p->E; e++) q.b2[e * p->M + e] = 1.0f;
    return q;
}

// The layers' counts and l_aux: equal, as the gating is the same float32 arithmetic on the same values.
static void expect_same_stats(const char *name, const char *what, const pass_result *a, const pass_result *b, int E) {
    if (a->st.capacity != b->st.capacity || a->st.dropped != b->st.dropped || a->st.routed != b->st.routed)
        fail_msg("%s, %s: capacity %d / %d, dropped %ld / %ld", name, what, a->st.capacity, b->st.capacity,
                 a->st.dropped, b->st.dropped);
    for (int e = 0; e < E; e++)
        if (a->load[e] != b->load[e]) fail_msg("%s, %s: expert %d load %d / %d", name, what, e, a->load[e], b->load[e]);
    if (memcmp(&a->st.aux_loss, &b->st.aux_loss, sizeof(float)) != 0)
        fail_msg("%s, %s: l_aux %.9g (bf16) vs %.9g (float32)", name, what, a->st.aux_loss, b->st.aux_loss);
}

// Router: the probe experts (probe_problem) make out the combine weights, so the bfloat16 layer's must be
// the float32 layer's rounded once (out is bfloat16), with the same experts chosen and dropped, and both
// must match the double reference's choices and weights. The backward on them carries the float32
// probabilities into the router gradient dwg = dlogits^T x through dweight = dot(dout, y) with y exactly
// the unit vectors in both precisions: the same float32 ops on the same values, so dwg is bitwise equal.
// dx (only the router's part, from 0) is the float32 one rounded once.
static void check_router(const bf16_case *c, const problem *p, dsmoe_moe_layer *L16, dsmoe_moe_layer *L32,
                         const dsmoe_moe_step *step, const float *u, int C, const float *rh) {
    problem q = probe_problem(p);
    size_t SM = (size_t)p->S * p->M;
    pass_result r16, r32;
    pass_run(L32, DSMOE_FLOAT32, &q, rh, step, 0.0f, 0.0f, 0.7f, &r32);
    pass_run(L16, DSMOE_BFLOAT16, &q, rh, step, 0.0f, 0.0f, 0.7f, &r16);
    expect_same_stats(c->name, "router probe", &r16, &r32, p->E);
    ref_in in = {.S = p->S, .M = p->M, .F = p->F, .E = p->E, .K = p->K, .C = C, .u = u,
                 .x = to_double(q.x, SM), .wg = to_double(q.wg, (size_t)p->E * p->M),
                 .w1 = to_double(q.w1, (size_t)p->E * p->F * p->M), .b1 = to_double(q.b1, (size_t)p->E * p->F),
                 .w2 = to_double(q.w2, (size_t)p->E * p->M * p->F), .b2 = to_double(q.b2, (size_t)p->E * p->M)};
    double *ref = malloc(SM * sizeof(double));
    ref_out o;
    ref_forward(&in, ref, &o);
    int chosen = 0;
    for (int s = 0; s < p->S; s++)
        for (int e = 0; e < p->M; e++) {
            size_t i = (size_t)s * p->M + e;
            if ((r32.out[i] != 0.0f) != (ref[i] != 0.0) || fabs(r32.out[i] - ref[i]) > 1e-6)
                fail_msg("%s: token %d, expert %d: float32 weight %.9g, reference %.9g", c->name, s, e, r32.out[i],
                         ref[i]);
            if (memcmp(&r16.out[i], &(float){bf16_round(r32.out[i])}, sizeof(float)) != 0)
                fail_msg("%s: token %d, expert %d: bfloat16 weight %.9g, float32 %.9g rounds to %.9g", c->name, s, e,
                         r16.out[i], r32.out[i], bf16_round(r32.out[i]));
            chosen += r16.out[i] != 0.0f;
        }
    assert_int_equal(chosen, (int)o.kept);
    if (memcmp(r16.g[0], r32.g[0], r32.n[0] * sizeof(float)) != 0) fail_msg("%s: probe dwg differs", c->name);
    for (size_t i = 0; i < SM; i++)
        if (!(fabs((double)r16.dx[i] - r32.dx[i]) <= BF16_U * fabs(r32.dx[i])))
            fail_msg("%s: probe dx[%zu] = %.9g (bf16) vs %.9g", c->name, i, r16.dx[i], r32.dx[i]);
    double *dbl[] = {in.x, in.wg, in.w1, in.b1, in.w2, in.b2, ref};
    for (int i = 0; i < 7; i++) free(dbl[i]);
    pass_free(&r16);
    pass_free(&r32);
    free(q.w1);
    free(q.b1);
    free(q.w2);
    free(q.b2);
}

static void run_bf16_case(const bf16_case *c, uint64_t seed) {
    problem p = problem_make(c->S, c->M, c->F, c->E, c->K, dsmoe_rng_key(seed, 10, 0, 0), dsmoe_rng_key(seed, 11, 0, 0));
    problem_round_bf16(&p);
    assert_true(p.M >= p.E); // the router probe's unit vectors
    dsmoe_moe_config cfg = layer_config(&p, 1, self_group);
    cfg.capacity_factor = c->cf;
    cfg.drop_tokens = !c->dropless;
    cfg.noise = c->noise;
    cfg.jitter_eps = c->noise == DSMOE_NOISE_JITTER ? 0.2f : 0.0f;
    dsmoe_moe_layer *L32 = layer_make(&cfg);
    cfg.dt = DSMOE_BFLOAT16;
    dsmoe_moe_layer *L16 = layer_make(&cfg);
    size_t SM = (size_t)p.S * p.M;
    dsmoe_moe_step step = {.training = 1, .seed = seed * 31 + 7, .token_offset = 1000};
    float *u = NULL;
    if (c->noise == DSMOE_NOISE_JITTER) {
        u = host_alloc(SM);
        uint64_t key = dsmoe_rng_key(step.seed, TAG_JITTER, 0, 0);
        for (size_t i = 0; i < SM; i++)
            u[i] = 1.0f - cfg.jitter_eps + 2.0f * cfg.jitter_eps * dsmoe_rng_uniform(key, step.token_offset * p.M + i);
    }
    int C = c->dropless ? -1 : (int)ceil((double)p.S / p.E * p.K * c->cf);
    float *rh = host_alloc(SM); // dout, bf16-exact
    fill_normal(rh, SM, dsmoe_rng_key(seed, 12, 0, 0), 1.0f);
    bf16_round_all(rh, SM);

    // Reference forward in double on the rounded values: ties, and the output of both layers.
    ref_in in = {.S = p.S, .M = p.M, .F = p.F, .E = p.E, .K = p.K, .C = C, .u = u,
                 .x = to_double(p.x, SM), .wg = to_double(p.wg, (size_t)p.E * p.M),
                 .w1 = to_double(p.w1, (size_t)p.E * p.F * p.M), .b1 = to_double(p.b1, (size_t)p.E * p.F),
                 .w2 = to_double(p.w2, (size_t)p.E * p.M * p.F), .b2 = to_double(p.b2, (size_t)p.E * p.M)};
    double *ref = malloc(SM * sizeof(double));
    ref_out o;
    ref_forward(&in, ref, &o);
    if (o.min_gap < 1e-3) fail_msg("%s: test data has a near tie (gap %.2g): choose another seed", c->name, o.min_gap);

    check_router(c, &p, L16, L32, &step, u, C, rh);

    const float g_pre = 0.5f, dx_pre = 0.25f; // accumulation into prefilled buffers (0.25: bf16-exact)
    const float daux = 0.7f;
    pass_result r16, r32;
    pass_run(L32, DSMOE_FLOAT32, &p, rh, &step, dx_pre, g_pre, daux, &r32);
    pass_run(L16, DSMOE_BFLOAT16, &p, rh, &step, dx_pre, g_pre, daux, &r16);
    expect_same_stats(c->name, "forward", &r16, &r32, p.E);
    assert_int_equal(r32.st.capacity, o.C);
    assert_int_equal(r32.st.dropped, (long)p.S * p.K - o.kept);
    if (!c->dropless) assert_true(r32.st.dropped > 0); // the cases are meant to drop (cf <= 1)

    double md, mr;
    diff(r32.out, ref, SM, &md, &mr);
    if (!(md <= 1e-5 * mr + 1e-6)) fail_msg("%s: float32 forward max |out - ref| = %.3g (max |ref| %.3g)", c->name, md, mr);
    diff(r16.out, ref, SM, &md, &mr);
    double e_ref = md / mr, e_out = rel_max(r16.out, r32.out, SM, 0.0f);
    printf("  %-24s out: %.2e of max |ref| (vs double), %.2e (vs float32); tolerance %.2e\n", c->name, e_ref, e_out,
           BF16_TOL_FWD);
    if (!(e_ref <= BF16_TOL_FWD && e_out <= BF16_TOL_FWD))
        fail_msg("%s: bfloat16 forward off by %.3g (double reference) / %.3g (float32 layer) of max |out|, tolerance %.3g",
                 c->name, e_ref, e_out, BF16_TOL_FWD);
    const char *names[] = {"dwg", "dw1", "db1", "dw2", "db2"};
    double e_dx = rel_max(r16.dx, r32.dx, SM, dx_pre);
    printf("  %-24s dx %.2e", "", e_dx);
    if (!(e_dx <= BF16_TOL_GRAD)) fail_msg("%s: bfloat16 dx off by %.3g of max |dx|, tolerance %.3g", c->name, e_dx, BF16_TOL_GRAD);
    for (int i = 0; i < 5; i++) {
        double e = rel_max(r16.g[i], r32.g[i], r32.n[i], g_pre);
        printf(" %s %.2e", names[i], e);
        if (!(e <= BF16_TOL_GRAD))
            fail_msg("%s: bfloat16 %s off by %.3g of its largest, tolerance %.3g", c->name, names[i], e, BF16_TOL_GRAD);
    }
    printf("; tolerance %.2e\n", BF16_TOL_GRAD);

    pass_free(&r16);
    pass_free(&r32);
    double *dbl[] = {in.x, in.wg, in.w1, in.b1, in.w2, in.b2, ref};
    for (int i = 0; i < 7; i++) free(dbl[i]);
    free(u);
    free(rh);
    problem_free(&p);
    dsmoe_moe_layer_free(L16);
    dsmoe_moe_layer_free(L32);
}

//                                       name                    S   M   F  E  K  cf     dropless noise
static void test_bf16_top1(void **s) {
    (void)s;
    run_bf16_case(&(bf16_case){"bf16 top1 drops", 48, 16, 32, 8, 1, 1.0f, 0, DSMOE_NOISE_NONE}, 207);
}
static void test_bf16_top2_jitter(void **s) {
    (void)s;
    run_bf16_case(&(bf16_case){"bf16 top2 jitter drops", 48, 16, 32, 8, 2, 0.75f, 0, DSMOE_NOISE_JITTER}, 208);
}
static void test_bf16_top1_dropless_jitter(void **s) {
    (void)s;
    run_bf16_case(&(bf16_case){"bf16 top1 dropless jitter", 48, 16, 32, 8, 1, 1.0f, 1, DSMOE_NOISE_JITTER}, 213);
}
static void test_bf16_top2_dropless(void **s) {
    (void)s;
    run_bf16_case(&(bf16_case){"bf16 top2 dropless", 48, 16, 32, 8, 2, 1.0f, 1, DSMOE_NOISE_NONE}, 223);
}

int main(int argc, char **argv) {
    if (moe_test_open(&argc, &argv) != 0) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_top1_drops),     cmocka_unit_test(test_top1_no_drops),
        cmocka_unit_test(test_top2_drops),     cmocka_unit_test(test_top2_no_drops),
        cmocka_unit_test(test_top1_dropless),  cmocka_unit_test(test_top2_dropless),
        cmocka_unit_test(test_top2_jitter),    cmocka_unit_test(test_eval_capacity),
        cmocka_unit_test(test_capacity_growth), cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_capacity_rule),
        cmocka_unit_test(test_bf16_top1),      cmocka_unit_test(test_bf16_top2_jitter),
        cmocka_unit_test(test_bf16_top1_dropless_jitter), cmocka_unit_test(test_bf16_top2_dropless),
    };
    int failed = cmocka_run_group_tests_name("moe layer, one rank", tests, NULL, NULL);
    moe_test_close();
    return failed;
}
