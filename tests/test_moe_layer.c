// tests/test_moe_layer.c: the MoE layer (core/moe_layer.c) through the real plugins (cpu kernels, mpi
// comm). On one rank: forward against an independent naive reference in double (softmax, top-k,
// capacity in token order, per-token expert FFN with tanh-GELU), and every gradient against central
// finite differences of L = sum(r * out) + daux * l_aux computed through that reference in double.
// On 2 and 4 ranks (ep = ranks): each rank's result equals a one-rank layer (all experts local, on a
// group made from MPI_COMM_SELF) run on that rank's tokens; expert gradients summed over ranks agree.
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

#include "dsmoe/rng.h"
#include "moe_layer.h"
#include "runtime.h"

// The jitter sub-key the layer derives from step->seed (docs/moe-layer.md), written again here.
#define TAG_JITTER 0x4A495454ull

static dsmoe_runtime rt;
static dsmoe_comm_group *self_group; // a group of one (MPI_COMM_SELF): the ep = 1 reference layer
static int world_rank, world_size;

// ----------------------------------------------------------------------------------------------------
// host problems and kernel buffers

typedef struct problem {
    int S, M, F, E, K;
    float *x;  // (S, M)
    float *wg; // (E, M)
    float *w1; // (E, F, M)
    float *b1; // (E, F)
    float *w2; // (E, M, F)
    float *b2; // (E, M)
} problem;

static float *host_alloc(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    assert_non_null(p);
    return p;
}

static void fill_normal(float *p, size_t n, uint64_t key, float std) {
    for (size_t i = 0; i < n; i++) p[i] = std * dsmoe_rng_normal(key, i);
}

// Weights from `wkey` (the same on every rank), tokens from `xkey`.
static problem problem_make(int S, int M, int F, int E, int K, uint64_t wkey, uint64_t xkey) {
    problem p = {.S = S, .M = M, .F = F, .E = E, .K = K};
    p.x = host_alloc((size_t)S * M);
    p.wg = host_alloc((size_t)E * M);
    p.w1 = host_alloc((size_t)E * F * M);
    p.b1 = host_alloc((size_t)E * F);
    p.w2 = host_alloc((size_t)E * M * F);
    p.b2 = host_alloc((size_t)E * M);
    fill_normal(p.x, (size_t)S * M, dsmoe_rng_key(xkey, 1, 0, 0), 1.0f);
    fill_normal(p.wg, (size_t)E * M, dsmoe_rng_key(wkey, 2, 0, 0), 1.0f / sqrtf((float)M));
    fill_normal(p.w1, (size_t)E * F * M, dsmoe_rng_key(wkey, 3, 0, 0), 1.0f / sqrtf((float)M));
    fill_normal(p.b1, (size_t)E * F, dsmoe_rng_key(wkey, 4, 0, 0), 0.2f);
    fill_normal(p.w2, (size_t)E * M * F, dsmoe_rng_key(wkey, 5, 0, 0), 1.0f / sqrtf((float)F));
    fill_normal(p.b2, (size_t)E * M, dsmoe_rng_key(wkey, 6, 0, 0), 0.2f);
    return p;
}

static void problem_free(problem *p) {
    free(p->x);
    free(p->wg);
    free(p->w1);
    free(p->b1);
    free(p->w2);
    free(p->b2);
}

static float *dev_copy(const float *host, size_t n) {
    void *d = NULL;
    assert_int_equal(rt.kern->alloc(rt.kctx, n * sizeof(float), &d), DSMOE_OK);
    if (n) assert_int_equal(rt.kern->copy_to_device(rt.kctx, d, host, n * sizeof(float)), DSMOE_OK);
    return d;
}

static float *dev_fill(size_t n, float v) {
    float *h = host_alloc(n);
    for (size_t i = 0; i < n; i++) h[i] = v;
    float *d = dev_copy(h, n);
    free(h);
    return d;
}

static void to_host(float *host, const float *dev, size_t n) {
    if (n) assert_int_equal(rt.kern->copy_to_host(rt.kctx, host, dev, n * sizeof(float)), DSMOE_OK);
}

// Kernel-memory weights of experts [e0, e0 + El) of p (the router is always whole), or gradient
// buffers of those shapes filled with `fill` (to check that the backward accumulates).
static dsmoe_moe_weights weights_dev(const problem *p, int e0, int El) {
    size_t FM = (size_t)p->F * p->M;
    return (dsmoe_moe_weights){
        .wg = dev_copy(p->wg, (size_t)p->E * p->M), .w1 = dev_copy(p->w1 + e0 * FM, El * FM),
        .b1 = dev_copy(p->b1 + (size_t)e0 * p->F, (size_t)El * p->F), .w2 = dev_copy(p->w2 + e0 * FM, El * FM),
        .b2 = dev_copy(p->b2 + (size_t)e0 * p->M, (size_t)El * p->M)};
}

static dsmoe_moe_weights grads_dev(const problem *p, int El, float fill) {
    size_t FM = (size_t)p->F * p->M;
    return (dsmoe_moe_weights){.wg = dev_fill((size_t)p->E * p->M, fill), .w1 = dev_fill(El * FM, fill),
                               .b1 = dev_fill((size_t)El * p->F, fill), .w2 = dev_fill(El * FM, fill),
                               .b2 = dev_fill((size_t)El * p->M, fill)};
}

static void weights_free(dsmoe_moe_weights *w) {
    float *b[] = {w->wg, w->w1, w->b1, w->w2, w->b2};
    for (int i = 0; i < 5; i++) rt.kern->free(rt.kctx, b[i]);
}

static dsmoe_moe_config layer_config(const problem *p, int ep, dsmoe_comm_group *group) {
    return (dsmoe_moe_config){.S = p->S, .M = p->M, .F = p->F, .E = p->E, .K = p->K, .capacity_factor = 1.0f,
                              .eval_capacity_factor = 1.0f, .min_capacity = 0, .drop_tokens = 1,
                              .random_token_selection = 0, .noise = DSMOE_NOISE_NONE, .jitter_eps = 0.0f,
                              .ep = ep, .ep_group = group};
}

static dsmoe_moe_layer *layer_make(const dsmoe_moe_config *cfg) {
    dsmoe_moe_layer *L = NULL;
    dsmoe_err err = {0};
    if (dsmoe_moe_layer_create(&rt, cfg, &L, &err) != DSMOE_OK) fail_msg("layer create: %s", err.msg);
    return L;
}

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
    assert_null(L);
    problem_free(&p);
}

// ----------------------------------------------------------------------------------------------------
// expert parallelism: ep = world size against a one-rank layer per rank

// The largest value of v over all ranks (every rank then asserts on the same number).
static double all_max(double v) {
    double r;
    MPI_Allreduce(&v, &r, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return r;
}

static void expect_close(const char *what, const float *got, const float *want, size_t n, double rel) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        md = d > md || isnan(d) ? (isnan(d) ? INFINITY : d) : md;
        mr = fabs(want[i]) > mr ? fabs(want[i]) : mr;
    }
    md = all_max(md);
    mr = all_max(mr);
    if (!(md <= rel * mr + 1e-6)) fail_msg("%s: max difference %.3g (max |reference| %.3g)", what, md, mr);
}

typedef struct ep_case {
    const char *name;
    int E_per_rank, K, dropless, rts, noise, training;
    float cf;
} ep_case;

static void run_ep_case(const ep_case *c) {
    int R = world_size, r = world_rank, E = c->E_per_rank * R, El = c->E_per_rank;
    const int S = 24, M = 8, F = 12;
    problem p = problem_make(S, M, F, E, c->K, 301, dsmoe_rng_key(302, (uint64_t)r, 0, 0));
    // Rank 0 never picks expert E-1 (a strongly negative router score): it sends that expert nothing.
    for (int e = 0; e < E; e++) p.wg[e * M] = e == E - 1 ? 3.0f : 0.0f;
    if (r == 0)
        for (int t = 0; t < S; t++) p.x[t * M] = -3.0f - fabsf(p.x[t * M]);
    else
        for (int t = 0; t < S; t++) p.x[t * M] = 0.3f * p.x[t * M];

    dsmoe_moe_config cfg = layer_config(&p, R, rt.world);
    cfg.capacity_factor = cfg.eval_capacity_factor = c->cf;
    cfg.drop_tokens = !c->dropless;
    cfg.random_token_selection = c->rts;
    cfg.noise = c->noise;
    cfg.jitter_eps = 0.1f;
    dsmoe_moe_config rcfg = cfg;
    rcfg.ep = 1;
    rcfg.ep_group = self_group;
    dsmoe_moe_layer *L = layer_make(&cfg), *Lr = layer_make(&rcfg);
    dsmoe_moe_weights w = weights_dev(&p, r * El, El), wr = weights_dev(&p, 0, E);
    size_t SM = (size_t)S * M, FM = (size_t)F * M;
    float *x = dev_copy(p.x, SM), *out = dev_fill(SM, 0), *out_r = dev_fill(SM, 0);
    dsmoe_moe_step step = {.training = c->training, .seed = 77, .token_offset = (uint64_t)r * S};
    dsmoe_moe_stats st, st_r;
    dsmoe_err err = {0};
    if (dsmoe_moe_forward(L, &w, x, out, &step, &st, &err) != DSMOE_OK) fail_msg("%s: ep forward: %s", c->name, err.msg);
    if (dsmoe_moe_forward(Lr, &wr, x, out_r, &step, &st_r, &err) != DSMOE_OK)
        fail_msg("%s: reference forward: %s", c->name, err.msg);

    float *h = host_alloc(SM), *hr = host_alloc(SM);
    to_host(h, out, SM);
    to_host(hr, out_r, SM);
    expect_close("forward out", h, hr, SM, 1e-6);
    assert_true(all_max(fabs(st.aux_loss - st_r.aux_loss)) <= 1e-6);
    assert_int_equal(st.dropped, st_r.dropped);
    for (int e = 0; e < E; e++) assert_int_equal(st.expert_load[e], st_r.expert_load[e]);
    // Dropless: the EP group agrees on the largest count of any rank.
    assert_int_equal(st.capacity, c->dropless ? (int)all_max(st_r.capacity) : st_r.capacity);
    // The layout this test is about: rank 0 sends nothing to expert E-1, another rank does.
    assert_int_equal(all_max(r == 0 ? st.expert_load[E - 1] : 0), 0);
    assert_true(all_max(r != 0 ? st.expert_load[E - 1] : 0) > 0);

    float *rh = host_alloc(SM);
    fill_normal(rh, SM, dsmoe_rng_key(303, (uint64_t)r, 0, 0), 1.0f);
    float *dout = dev_copy(rh, SM), *dx = dev_fill(SM, 0), *dx_r = dev_fill(SM, 0);
    dsmoe_moe_weights g = grads_dev(&p, El, 0), gr = grads_dev(&p, E, 0);
    if (dsmoe_moe_backward(L, &w, &g, dout, dx, 0.3f, &err) != DSMOE_OK) fail_msg("%s: ep backward: %s", c->name, err.msg);
    if (dsmoe_moe_backward(Lr, &wr, &gr, dout, dx_r, 0.3f, &err) != DSMOE_OK)
        fail_msg("%s: reference backward: %s", c->name, err.msg);
    to_host(h, dx, SM);
    to_host(hr, dx_r, SM);
    expect_close("dx", h, hr, SM, 1e-6);
    float *a = host_alloc((size_t)E * M), *b = host_alloc((size_t)E * M);
    to_host(a, g.wg, (size_t)E * M);
    to_host(b, gr.wg, (size_t)E * M);
    expect_close("dwg (this rank's tokens)", a, b, (size_t)E * M, 1e-6);
    free(a);
    free(b);
    // Expert gradients: the reference's, summed over ranks, against the owner's.
    struct { const char *what; float *ep, *ref; size_t per_expert; } eg[] = {
        {"dw1", g.w1, gr.w1, FM}, {"db1", g.b1, gr.b1, (size_t)F}, {"dw2", g.w2, gr.w2, FM}, {"db2", g.b2, gr.b2, (size_t)M}};
    for (int i = 0; i < 4; i++) {
        size_t n = (size_t)E * eg[i].per_expert, nl = (size_t)El * eg[i].per_expert;
        float *sum = host_alloc(n), *mine = host_alloc(nl);
        to_host(sum, eg[i].ref, n);
        MPI_Allreduce(MPI_IN_PLACE, sum, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        to_host(mine, eg[i].ep, nl);
        expect_close(eg[i].what, mine, sum + (size_t)r * nl, nl, 1e-5);
        free(sum);
        free(mine);
    }

    weights_free(&w);
    weights_free(&wr);
    weights_free(&g);
    weights_free(&gr);
    float *bufs[] = {x, out, out_r, dout, dx, dx_r};
    for (int i = 0; i < 6; i++) rt.kern->free(rt.kctx, bufs[i]);
    free(h);
    free(hr);
    free(rh);
    problem_free(&p);
    dsmoe_moe_layer_free(L);
    dsmoe_moe_layer_free(Lr);
}

static void test_ep_top2_rts_rsample(void **s) {
    (void)s;
    run_ep_case(&(ep_case){"top2 rts rsample", 2, 2, 0, 1, DSMOE_NOISE_RSAMPLE, 1, 1.0f});
}
static void test_ep_top1_dropless_jitter(void **s) {
    (void)s;
    run_ep_case(&(ep_case){"top1 dropless jitter", 1, 1, 1, 0, DSMOE_NOISE_JITTER, 1, 1.0f});
}
static void test_ep_top1_eval(void **s) {
    (void)s;
    run_ep_case(&(ep_case){"top1 eval", 2, 1, 0, 0, DSMOE_NOISE_NONE, 0, 1.5f});
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    dsmoe_err err = {0};
    if (dsmoe_runtime_open("cpu", "mpi", "", 1, &rt, &err) != DSMOE_OK) {
        fprintf(stderr, "runtime: %s\n", err.msg);
        MPI_Finalize();
        return 1;
    }
    world_rank = rt.world_rank;
    world_size = rt.world_size;
    if (rt.comm->group_create(rt.cctx, MPI_COMM_SELF, &self_group) != DSMOE_OK) {
        fprintf(stderr, "group_create(MPI_COMM_SELF): %s\n", rt.comm->last_error(rt.cctx));
        MPI_Finalize();
        return 1;
    }
    const struct CMUnitTest one_rank[] = {
        cmocka_unit_test(test_top1_drops),     cmocka_unit_test(test_top1_no_drops),
        cmocka_unit_test(test_top2_drops),     cmocka_unit_test(test_top2_no_drops),
        cmocka_unit_test(test_top1_dropless),  cmocka_unit_test(test_top2_dropless),
        cmocka_unit_test(test_top2_jitter),    cmocka_unit_test(test_eval_capacity),
        cmocka_unit_test(test_capacity_growth), cmocka_unit_test(test_bad_config),
    };
    const struct CMUnitTest many_ranks[] = {
        cmocka_unit_test(test_ep_top2_rts_rsample),
        cmocka_unit_test(test_ep_top1_dropless_jitter),
        cmocka_unit_test(test_ep_top1_eval),
    };
    int failed = world_size == 1 ? cmocka_run_group_tests_name("moe layer, one rank", one_rank, NULL, NULL)
                                 : cmocka_run_group_tests_name("moe layer, expert parallel", many_ranks, NULL, NULL);
    rt.comm->group_destroy(rt.cctx, self_group);
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return failed;
}
