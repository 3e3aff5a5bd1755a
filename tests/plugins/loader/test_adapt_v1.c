// tests/plugins/loader/test_adapt_v1.c: core/plugins/kernel_adapt_v1.c driving a real v1 plugin: the cpu plugin
// of ABI 1 frozen in tests/plugins/loader/cpu_v1 (built by tests/plugins/loader/loader.cmake into DSMOE_CPU_V1_DIR),
// loaded through the loader, used only through the adapted v3 table. Every result is compared with a naive reference in
// double written here: the grouped GEMM with each epilogue (and the rows it must not touch), the weight
// gradients with bias, gating route / assign / backward, and the small members the adapter builds from
// v1 calls (sum_squares, init_tensor, copy_2d, adamw), gelu_backward, all_finite, and the queue and event
// members the adapter makes itself. Tolerance: 1e-5 relative to the magnitude of the
// terms summed (float accumulation of a few dozen terms is far inside it).
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

#include "dsmoe/rng.h"
#include "plugin_loader.h"

static const dsmoe_kernel_plugin_v3 *K;
static dsmoe_plugin_handle H;
static dsmoe_kernel_ctx *CTX;
static dsmoe_kernel_queue *Q;

#define OK(call)                                                                                   \
    do {                                                                                           \
        dsmoe_status s_ = (call);                                                                  \
        if (s_ != DSMOE_OK) fail_msg("%s failed (%s): %s", #call, dsmoe_status_name(s_), K->last_error(CTX)); \
    } while (0)

static int setup(void **state) {
    dsmoe_err err = {0};
    if (dsmoe_plugin_load_kernel("cpu", DSMOE_CPU_V1_DIR, &K, &H, &err) != DSMOE_OK) {
        fprintf(stderr, "loading the v1 cpu plugin: %s\n", err.msg);
        return -1;
    }
    char why[512];
    dsmoe_kernel_options opt = {.threads = 2};
    if (K->init(&opt, &CTX, why, sizeof why) != DSMOE_OK) {
        fprintf(stderr, "init: %s\n", why);
        return -1;
    }
    Q = K->default_queue(CTX);
    return 0;
}

static int teardown(void **state) {
    K->finalize(CTX);
    dsmoe_plugin_unload(&H);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// helpers

static uint64_t lcg = 0x9E3779B97F4A7C15ull;
static float rnd(float lo, float hi) { // uniform in [lo, hi): a fixed stream, no dependence on the plugin
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return lo + (hi - lo) * (float)((lcg >> 40) * (1.0 / 16777216.0));
}
static float *rnd_array(size_t n, float lo, float hi) {
    float *a = malloc(n * sizeof *a);
    for (size_t i = 0; i < n; i++) a[i] = rnd(lo, hi);
    return a;
}

static void *up(const void *host, size_t bytes) {
    void *d;
    OK(K->alloc(CTX, bytes, 0, &d));
    OK(K->copy_to_device(CTX, Q, d, host, bytes));
    return d;
}
static void down(void *host, const void *dev, size_t bytes) {
    OK(K->copy_to_host(CTX, Q, host, dev, bytes));
    dsmoe_kernel_event *ev;
    OK(K->event_create(CTX, &ev));
    OK(K->event_record(CTX, ev, Q));
    OK(K->event_synchronize(CTX, ev)); // host results are valid after an event (v2's model)
    K->event_destroy(CTX, ev);
}

// |got - ref| <= 1e-5 * (|ref| + scale): scale is the magnitude of what was summed into ref.
static void expect_close(const char *what, size_t i, double got, double ref, double scale) {
    double tol = 1e-5 * (fabs(ref) + scale) + 1e-30;
    if (!(fabs(got - ref) <= tol)) fail_msg("%s[%zu] = %.9g, expected %.9g (tolerance %.3g)", what, i, got, ref, tol);
}

static double gelu(double x) { return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x))); }
static double gelu_grad(double x) {
    double th = tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x));
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * sqrt(2.0 / M_PI) * (1.0 + 3.0 * 0.044715 * x * x);
}

// ------------------------------------------------------------------------------------------------
// grouped GEMM with each epilogue

enum { G = 5, BG = 3, C = 7, N = 9, KK = 6 };
static const int32_t counts_host[G] = {3, 0, 7, 1, 5};

// One gemm_grouped call on fresh data and its check against the reference. ldc > N exercises the
// adapter's row-wise epilogue; rows >= count and columns >= N of c (and aux) must be left as they were.
static void run_grouped(dsmoe_epilogue epi, int trans_b, int ldc, float beta) {
    const float alpha = 0.75f;
    size_t a_n = (size_t)G * C * KK, b_n = (size_t)BG * N * KK, c_n = (size_t)G * C * ldc;
    float *a = rnd_array(a_n, -1, 1), *b = rnd_array(b_n, -1, 1), *bias = rnd_array((size_t)BG * N, -1, 1);
    float *c0 = rnd_array(c_n, -1, 1), *aux0 = rnd_array(c_n, -3, 3);
    float *c = malloc(c_n * sizeof *c), *aux = malloc(c_n * sizeof *aux);
    void *da = up(a, a_n * 4), *db = up(b, b_n * 4), *dbias = up(bias, (size_t)BG * N * 4);
    void *dc = up(c0, c_n * 4), *daux = up(aux0, c_n * 4), *dcounts = up(counts_host, sizeof counts_host);
    int ldb = trans_b ? KK : N;
    dsmoe_grouped_gemm g = {
        .groups = G, .counts = dcounts, .m_max = C, .n = N, .k = KK, .alpha = alpha, .beta = beta,
        .a = da, .a_type = DSMOE_FLOAT32, .lda = KK, .a_stride = (size_t)C * KK,
        .b = db, .b_type = DSMOE_FLOAT32, .ldb = ldb, .b_stride = (size_t)N * KK, .b_groups = BG, .trans_b = trans_b,
        .c = dc, .c_type = DSMOE_FLOAT32, .ldc = ldc, .c_stride = (size_t)C * ldc,
        .epilogue = epi, .bias = dbias, .bias_stride = N, .aux = daux,
    };
    OK(K->gemm_grouped(CTX, Q, &g));
    down(c, dc, c_n * 4);
    down(aux, daux, c_n * 4);

    char what[64];
    snprintf(what, sizeof what, "c (epilogue %d, trans_b %d, ldc %d)", (int)epi, trans_b, ldc);
    for (int gi = 0; gi < G; gi++) {
        int w = gi % BG;
        const float *ag = a + (size_t)gi * C * KK, *bw = b + (size_t)w * N * KK;
        for (int i = 0; i < C; i++)
            for (int j = 0; j < ldc; j++) {
                size_t at = (size_t)gi * C * ldc + (size_t)i * ldc + j;
                if (i >= counts_host[gi] || j >= N) { // not to be touched
                    if (c[at] != c0[at] || aux[at] != aux0[at]) fail_msg("%s: group %d row %d col %d was written", what, gi, i, j);
                    continue;
                }
                double s = 0.0, mag = 0.0;
                for (int p = 0; p < KK; p++) {
                    double t = (double)ag[(size_t)i * KK + p] * (trans_b ? bw[(size_t)j * KK + p] : bw[(size_t)p * N + j]);
                    s += t, mag += fabs(t);
                }
                double pre = alpha * s + beta * (double)c0[at], pmag = alpha * mag + fabs(beta * (double)c0[at]);
                double bj = bias[(size_t)w * N + j];
                switch (epi) {
                case DSMOE_EPI_NONE: expect_close(what, at, c[at], pre, pmag); break;
                case DSMOE_EPI_BIAS: expect_close(what, at, c[at], pre + bj, pmag + fabs(bj)); break;
                case DSMOE_EPI_BIAS_GELU:
                    expect_close("aux (pre-activation)", at, aux[at], pre + bj, pmag + fabs(bj));
                    expect_close(what, at, c[at], gelu(pre + bj), 1.2 * (pmag + fabs(bj)));
                    break;
                case DSMOE_EPI_DGELU:
                    if (aux[at] != aux0[at]) fail_msg("DGELU wrote aux[%zu]", at);
                    expect_close(what, at, c[at], gelu_grad(aux0[at]) * pre, 1.2 * pmag + fabs(pre));
                    break;
                }
            }
    }
    void *bufs[] = {da, db, dbias, dc, daux, dcounts};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) K->free(CTX, bufs[i]);
    free(a), free(b), free(bias), free(c0), free(aux0), free(c), free(aux);
}

static void test_gemm_grouped_epilogues(void **state) {
    const dsmoe_epilogue epis[] = {DSMOE_EPI_NONE, DSMOE_EPI_BIAS, DSMOE_EPI_BIAS_GELU, DSMOE_EPI_DGELU};
    for (size_t e = 0; e < sizeof epis / sizeof epis[0]; e++)
        for (int trans_b = 0; trans_b <= 1; trans_b++) {
            run_grouped(epis[e], trans_b, N, 0.0f);
            run_grouped(epis[e], trans_b, N + 3, 0.5f);
        }
}

// dw[w] (N, KK) += alpha * sum over groups g of w of dy_g^T x_g; dbias[w] (N) += column sums of dy_g.
static void test_gemm_grouped_wgrad(void **state) {
    const int bg = 2;
    const float alpha = 0.5f;
    size_t dy_n = (size_t)G * C * N, x_n = (size_t)G * C * KK, dw_n = (size_t)bg * N * KK;
    float *dy = rnd_array(dy_n, -1, 1), *x = rnd_array(x_n, -1, 1);
    float *dw0 = rnd_array(dw_n, -1, 1), *db0 = rnd_array((size_t)bg * N, -1, 1);
    float *dw = malloc(dw_n * 4), *db = malloc((size_t)bg * N * 4);
    void *ddy = up(dy, dy_n * 4), *dx = up(x, x_n * 4), *ddw = up(dw0, dw_n * 4), *ddb = up(db0, (size_t)bg * N * 4);
    void *dcounts = up(counts_host, sizeof counts_host);
    dsmoe_grouped_wgrad g = {
        .groups = G, .counts = dcounts, .m_max = C, .n = N, .k = KK, .alpha = alpha,
        .dy = ddy, .dy_type = DSMOE_FLOAT32, .dy_stride = (size_t)C * N,
        .x = dx, .x_type = DSMOE_FLOAT32, .x_stride = (size_t)C * KK,
        .dw = ddw, .dw_stride = (size_t)N * KK, .b_groups = bg, .dbias = ddb, .dbias_stride = N,
    };
    OK(K->gemm_grouped_wgrad(CTX, Q, &g));
    down(dw, ddw, dw_n * 4);
    down(db, ddb, (size_t)bg * N * 4);
    for (int w = 0; w < bg; w++)
        for (int i = 0; i < N; i++) {
            double sb = db0[w * N + i], mb = fabs(sb);
            for (int gi = w; gi < G; gi += bg)
                for (int r = 0; r < counts_host[gi]; r++) {
                    double t = dy[(size_t)gi * C * N + (size_t)r * N + i];
                    sb += t, mb += fabs(t);
                }
            expect_close("dbias", (size_t)w * N + i, db[w * N + i], sb, mb);
            for (int j = 0; j < KK; j++) {
                size_t at = (size_t)w * N * KK + (size_t)i * KK + j;
                double s = 0.0, m = 0.0;
                for (int gi = w; gi < G; gi += bg)
                    for (int r = 0; r < counts_host[gi]; r++) {
                        double t = (double)dy[(size_t)gi * C * N + (size_t)r * N + i] * x[(size_t)gi * C * KK + (size_t)r * KK + j];
                        s += t, m += fabs(t);
                    }
                expect_close("dw", at, dw[at], dw0[at] + alpha * s, fabs(dw0[at]) + alpha * m);
            }
        }
    void *bufs[] = {ddy, dx, ddw, ddb, dcounts};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) K->free(CTX, bufs[i]);
    free(dy), free(x), free(dw0), free(db0), free(dw), free(db);
}

// ------------------------------------------------------------------------------------------------
// gating (no noise, capacity by token order: docs/gating.md)

static void run_gating(int K_) {
    enum { S = 13, E = 4, CAP = 4 };
    const float daux = 0.3f;
    float *logits = rnd_array((size_t)S * E, -2, 2);
    float probs[S * E], weight[S * 2], dlogits[S * E];
    int32_t choice[S * 2], slot[S * 2], counts[E], kept[E];
    double aux[2 * E + 1];
    void *dlog = up(logits, sizeof(float) * S * E), *dprobs, *dchoice, *dcounts, *dslot, *dweight, *dkept, *daux_s;
    OK(K->alloc(CTX, sizeof probs, 0, &dprobs));
    OK(K->alloc(CTX, sizeof choice, 0, &dchoice));
    OK(K->alloc(CTX, sizeof counts, 0, &dcounts));
    OK(K->alloc(CTX, sizeof slot, 0, &dslot));
    OK(K->alloc(CTX, sizeof weight, 0, &dweight));
    OK(K->alloc(CTX, sizeof kept, 0, &dkept));
    OK(K->alloc(CTX, sizeof aux, 0, &daux_s));
    dsmoe_gating_params p = {.S = S, .E = E, .K = K_, .noise = DSMOE_NOISE_NONE, .seed = 42, .token_offset = 100};
    OK(K->gate_route(CTX, Q, &p, dlog, dprobs, dchoice, dcounts));
    OK(K->gate_assign(CTX, Q, &p, CAP, dprobs, dchoice, dslot, dweight, dkept, daux_s));
    down(probs, dprobs, sizeof(float) * S * E);
    down(choice, dchoice, sizeof(int32_t) * S * K_);
    down(counts, dcounts, sizeof counts);
    down(slot, dslot, sizeof(int32_t) * S * K_);
    down(weight, dweight, sizeof(float) * S * K_);
    down(kept, dkept, sizeof kept);
    down(aux, daux_s, sizeof aux);

    // Reference: softmax in double; top-K by probs (lowest index on ties); slots level by level in
    // token order; weights (normalised over the kept pair for K = 2); the load-balancing sums.
    double rp[S * E], P[E] = {0};
    int rc[S * 2], rs[S * 2], rcount[E] = {0}, base[E] = {0}, first[E] = {0};
    for (int s = 0; s < S; s++) {
        double mx = -INFINITY, sum = 0.0;
        for (int e = 0; e < E; e++) mx = fmax(mx, logits[s * E + e]);
        for (int e = 0; e < E; e++) sum += rp[s * E + e] = exp(logits[s * E + e] - mx);
        for (int e = 0; e < E; e++) rp[s * E + e] /= sum, P[e] += rp[s * E + e];
        for (int k = 0; k < K_; k++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if ((k == 0 || e != rc[s * K_]) && (best < 0 || rp[s * E + e] > rp[s * E + best])) best = e;
            rc[s * K_ + k] = best;
            rcount[best]++;
        }
        first[rc[s * K_]]++;
    }
    for (int k = 0; k < K_; k++)
        for (int s = 0; s < S; s++) {
            int e = rc[s * K_ + k];
            rs[s * K_ + k] = base[e] < CAP ? base[e]++ : -1;
        }
    for (int i = 0; i < S * E; i++) expect_close("probs", (size_t)i, probs[i], rp[i], 0.0);
    for (int i = 0; i < S * K_; i++) {
        if (choice[i] != rc[i]) fail_msg("choice[%d] = %d, expected %d", i, choice[i], rc[i]);
        if (slot[i] != rs[i]) fail_msg("slot[%d] = %d, expected %d", i, slot[i], rs[i]);
    }
    for (int e = 0; e < E; e++) {
        if (counts[e] != rcount[e]) fail_msg("counts[%d] = %d, expected %d", e, counts[e], rcount[e]);
        if (kept[e] != base[e]) fail_msg("kept[%d] = %d, expected %d", e, kept[e], base[e]);
        expect_close("aux_sums P", (size_t)e, aux[e], P[e], 0.0);
        if (aux[E + e] != first[e]) fail_msg("aux_sums N[%d] = %g, expected %d", e, aux[E + e], first[e]);
    }
    if (aux[2 * E] != S) fail_msg("aux_sums S = %g, expected %d", aux[2 * E], S);
    double rw[S * 2], den[S];
    for (int s = 0; s < S; s++) {
        double g[2] = {0, 0};
        for (int k = 0; k < K_; k++) g[k] = rs[s * K_ + k] >= 0 ? rp[s * E + rc[s * K_ + k]] : 0.0;
        den[s] = K_ == 1 ? 1.0 : fmax(g[0] + g[1], FLT_EPSILON);
        for (int k = 0; k < K_; k++) {
            rw[s * K_ + k] = g[k] / den[s];
            expect_close("weight", (size_t)(s * K_ + k), weight[s * K_ + k], rw[s * K_ + k], 0.0);
        }
    }

    // Backward with sums "reduced over 3 ranks" (N and S tripled), uploaded here: the adapter must
    // read them from the device buffer.
    double red[2 * E + 1];
    for (int e = 0; e < E; e++) red[e] = 3 * P[e], red[E + e] = 3.0 * first[e];
    red[2 * E] = 3.0 * S;
    OK(K->copy_to_device(CTX, Q, daux_s, red, sizeof red));
    float *dw = rnd_array((size_t)S * K_, -1, 1), *dl0 = rnd_array((size_t)S * E, -1, 1);
    void *ddw = up(dw, sizeof(float) * S * K_), *ddl = up(dl0, sizeof(float) * S * E);
    OK(K->gate_backward(CTX, Q, &p, ddl, dprobs, dchoice, dslot, ddw, daux_s, daux));
    down(dlogits, ddl, sizeof dlogits);
    double St = red[2 * E];
    for (int s = 0; s < S; s++) {
        double dg[E], dot = 0.0, mag = 0.0;
        for (int e = 0; e < E; e++) dg[e] = (double)daux * E * red[E + e] / (St * St);
        double wdot = 0.0; // sum_k dweight * g_k over kept k
        for (int k = 0; k < K_; k++)
            if (rs[s * K_ + k] >= 0) wdot += dw[s * K_ + k] * rp[s * E + rc[s * K_ + k]];
        for (int k = 0; k < K_; k++) {
            if (rs[s * K_ + k] < 0) continue;
            int e = rc[s * K_ + k];
            dg[e] += K_ == 1 ? dw[s * K_] : dw[s * K_ + k] / den[s] - wdot / (den[s] * den[s]);
        }
        for (int e = 0; e < E; e++) dot += rp[s * E + e] * dg[e], mag += rp[s * E + e] * fabs(dg[e]);
        for (int e = 0; e < E; e++) {
            size_t at = (size_t)s * E + e;
            double ref = dl0[at] + rp[at] * (dg[e] - dot);
            expect_close("dlogits", at, dlogits[at], ref, fabs(dl0[at]) + rp[at] * (fabs(dg[e]) + mag) * 4);
        }
    }
    void *bufs[] = {dlog, dprobs, dchoice, dcounts, dslot, dweight, dkept, daux_s, ddw, ddl};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) K->free(CTX, bufs[i]);
    free(logits), free(dw), free(dl0);
}

static void test_gating_top1(void **state) { run_gating(1); }
static void test_gating_top2(void **state) { run_gating(2); }

// ------------------------------------------------------------------------------------------------
// the members the adapter builds from several v1 calls

static void test_small_members(void **state) {
    // sum_squares: a device double.
    enum { n = 1000 };
    float *x = rnd_array(n, -2, 2);
    void *dx = up(x, sizeof(float) * n), *dsum;
    OK(K->alloc(CTX, sizeof(double), 0, &dsum));
    OK(K->sum_squares(CTX, Q, dx, n, dsum));
    double got, ref = 0.0;
    down(&got, dsum, sizeof got);
    for (int i = 0; i < n; i++) ref += (double)x[i] * x[i];
    expect_close("sum_squares", 0, got, ref, 0.0);

    // init_tensor: dsmoe/rng.h's values (exactly), then the constant fill.
    float init[n];
    dsmoe_init_params ip = {.key = 77, .offset = 5000, .std = 0.02f};
    OK(K->init_tensor(CTX, Q, dx, n, &ip));
    down(init, dx, sizeof init);
    for (int i = 0; i < n; i++)
        if (init[i] != 0.02f * dsmoe_rng_normal(77, 5000 + (uint64_t)i)) fail_msg("init_tensor[%d] = %g", i, init[i]);
    ip = (dsmoe_init_params){.std = 0.0f, .value = 1.5f};
    OK(K->init_tensor(CTX, Q, dx, n, &ip));
    down(init, dx, sizeof init);
    for (int i = 0; i < n; i++)
        if (init[i] != 1.5f) fail_msg("init_tensor value[%d] = %g", i, init[i]);

    // copy_2d: 3 rows of 5 floats from pitch 8 to pitch 6 floats; the gaps stay.
    float src[3 * 8], dst0[3 * 6], dst[3 * 6];
    for (int i = 0; i < 24; i++) src[i] = (float)i;
    for (int i = 0; i < 18; i++) dst0[i] = -1.0f;
    void *dsrc = up(src, sizeof src), *ddst = up(dst0, sizeof dst0);
    OK(K->copy_2d(CTX, Q, ddst, 6 * 4, dsrc, 8 * 4, 5 * 4, 3));
    down(dst, ddst, sizeof dst);
    for (int r = 0; r < 3; r++)
        for (int j = 0; j < 6; j++)
            if (dst[r * 6 + j] != (j < 5 ? src[r * 8 + j] : -1.0f)) fail_msg("copy_2d row %d col %d = %g", r, j, dst[r * 6 + j]);

    // adamw over two tensors, each with its own decay.
    float p0[2][16], g[2][16], pout[16], mout[16];
    dsmoe_adamw_tensor t[2];
    void *dev[2][4];
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < 16; i++) p0[k][i] = rnd(-1, 1), g[k][i] = rnd(-1, 1);
        float zeros[16] = {0};
        dev[k][0] = up(p0[k], sizeof p0[k]), dev[k][1] = up(g[k], sizeof g[k]);
        dev[k][2] = up(zeros, sizeof zeros), dev[k][3] = up(zeros, sizeof zeros);
        t[k] = (dsmoe_adamw_tensor){dev[k][0], dev[k][1], dev[k][2], dev[k][3], 16, k ? 0.1f : 0.0f};
    }
    dsmoe_adamw_params hp = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .grad_scale = 0.5f, .t = 1};
    OK(K->adamw(CTX, Q, &hp, t, 2));
    for (int k = 0; k < 2; k++) {
        down(pout, dev[k][0], sizeof pout);
        down(mout, dev[k][2], sizeof mout);
        for (int i = 0; i < 16; i++) {
            double gg = (double)g[k][i] * 0.5, m = 0.1 * gg, v = 0.05 * gg * gg;
            double upd = (m / 0.1) / (sqrt(v / 0.05) + 1e-8) + t[k].weight_decay * p0[k][i];
            expect_close("adamw m", (size_t)i, mout[i], m, 0.0);
            expect_close("adamw param", (size_t)i, pout[i], p0[k][i] - 1e-2 * upd, fabs(p0[k][i]) + 1e-2 * fabs(upd));
        }
        for (int j = 0; j < 4; j++) K->free(CTX, dev[k][j]);
    }

    // attention_bytes needs no context: v1 saves the (B, NH, T, T) probabilities.
    dsmoe_attention_shape sh = {.B = 2, .T = 8, .M = 16, .NH = 4, .dt = DSMOE_FLOAT32};
    size_t saved = 0, work = 0;
    assert_int_equal(K->attention_bytes(NULL, &sh, &saved, &work), DSMOE_OK);
    assert_int_equal(saved, (size_t)2 * 4 * 8 * 8 * 4);
    assert_int_equal(work, saved);

    // Anything but float32 is refused at once, naming the type.
    sh.dt = DSMOE_BFLOAT16;
    assert_int_equal(K->attention_bytes(CTX, &sh, &saved, &work), DSMOE_ERR_UNSUPPORTED);
    assert_int_equal(K->gelu_forward(CTX, Q, dx, dx, DSMOE_BFLOAT16, n), DSMOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(K->last_error(CTX), "bfloat16 data: kernel plugin 'cpu' speaks ABI 1"));
    OK(K->synchronize(CTX)); // not sticky: the context still works
    void *bufs[] = {dx, dsum, dsrc, ddst};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) K->free(CTX, bufs[i]);
    free(x);
}

// The members the core calls on no path a v1 plugin takes (gelu_backward: the core uses the DGELU
// epilogue; all_finite: bf16 runs only), and the queue and event members the adapter builds itself.
static int host_calls[2], host_n;
static void note_host(void *arg) { host_calls[host_n++ % 2] = (int)(intptr_t)arg; }

static void test_other_members(void **state) {
    enum { n = 300 };
    float *in = rnd_array(n, -4, 4), *dout = rnd_array(n, -1, 1), *din0 = rnd_array(n, -1, 1), din[n];
    void *din_d = up(din0, sizeof din), *in_d = up(in, sizeof din), *dout_d = up(dout, sizeof din);
    OK(K->gelu_backward(CTX, Q, din_d, in_d, dout_d, DSMOE_FLOAT32, n));
    down(din, din_d, sizeof din);
    for (int i = 0; i < n; i++) // din += gelu'(in) * dout
        expect_close("gelu_backward", (size_t)i, din[i], din0[i] + gelu_grad(in[i]) * dout[i],
                     fabs(din0[i]) + fabs(dout[i]));

    int32_t finite = -1;
    void *flag;
    OK(K->alloc(CTX, sizeof finite, 0, &flag));
    OK(K->all_finite(CTX, Q, in_d, DSMOE_FLOAT32, n, flag));
    down(&finite, flag, sizeof finite);
    assert_int_equal(finite, 1);
    const float specials[2] = {INFINITY, NAN};
    for (int k = 0; k < 2; k++) {
        in[n / 2] = specials[k];
        OK(K->copy_to_device(CTX, Q, in_d, in, sizeof din));
        OK(K->all_finite(CTX, Q, in_d, DSMOE_FLOAT32, n, flag));
        down(&finite, flag, sizeof finite);
        if (finite != 0) fail_msg("all_finite with %s = %d, expected 0", k ? "NaN" : "Inf", finite);
    }

    // Host functions in queue order, events complete once what came before them ran.
    host_n = 0;
    OK(K->queue_enqueue_host(CTX, Q, note_host, (void *)(intptr_t)1));
    OK(K->queue_enqueue_host(CTX, Q, note_host, (void *)(intptr_t)2));
    assert_int_equal(K->queue_enqueue_host(CTX, Q, NULL, NULL), DSMOE_ERR_INVALID);
    dsmoe_kernel_event *ev;
    int done = -1;
    OK(K->event_create(CTX, &ev));
    OK(K->event_record(CTX, ev, Q));
    OK(K->queue_wait_event(CTX, Q, ev));
    OK(K->event_query(CTX, ev, &done));
    assert_int_equal(done, 1);
    OK(K->queue_synchronize(CTX, Q));
    assert_int_equal(host_n, 2);
    assert_int_equal(host_calls[0], 1);
    assert_int_equal(host_calls[1], 2);
    K->event_destroy(CTX, ev);
    void *bufs[] = {din_d, in_d, dout_d, flag};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) K->free(CTX, bufs[i]);
    free(in), free(dout), free(din0);
}

// A count above m_max is the v2 "sticky" error: reported, and by every call after it. On its own
// context, which it leaves unusable.
static void test_bad_count_is_sticky(void **state) {
    dsmoe_kernel_ctx *ctx;
    char why[256];
    dsmoe_kernel_options opt = {.threads = 1};
    assert_int_equal(K->init(&opt, &ctx, why, sizeof why), DSMOE_OK);
    dsmoe_kernel_queue *q = K->default_queue(ctx);
    int32_t bad[2] = {1, C + 1};
    void *dcounts, *buf;
    assert_int_equal(K->alloc(ctx, sizeof bad, 0, &dcounts), DSMOE_OK);
    assert_int_equal(K->alloc(ctx, (size_t)2 * C * N * KK * 4, 0, &buf), DSMOE_OK);
    assert_int_equal(K->copy_to_device(ctx, q, dcounts, bad, sizeof bad), DSMOE_OK);
    dsmoe_grouped_gemm g = {.groups = 2, .counts = dcounts, .m_max = C, .n = N, .k = KK, .alpha = 1,
                            .a = buf, .lda = KK, .a_stride = (size_t)C * KK, .b = buf, .ldb = KK, .b_groups = 1,
                            .trans_b = 1, .c = buf, .ldc = N, .c_stride = (size_t)C * N};
    assert_int_equal(K->gemm_grouped(ctx, q, &g), DSMOE_ERR_INVALID);
    assert_non_null(strstr(K->last_error(ctx), "counts[1] = 8: expected 0 <= count <= m_max = 7"));
    assert_int_equal(K->synchronize(ctx), DSMOE_ERR_INVALID);
    assert_int_equal(K->zero(ctx, q, buf, 4), DSMOE_ERR_INVALID);
    K->free(ctx, buf);
    K->free(ctx, dcounts);
    K->finalize(ctx);
}

static void test_loaded_through_adapter(void **state) {
    assert_int_equal(H.api_version, 1);
    assert_non_null(H.adapter);
    assert_string_equal(H.path, DSMOE_CPU_V1_DIR "/libdsmoe_kernel_cpu.so");
    assert_int_equal(K->api_version, 3);
    assert_int_equal(K->mem_kind, DSMOE_MEM_HOST);
    assert_null(K->gate); // v1 has no fused gating: the core composes route and assign
    assert_non_null(strstr(K->describe(CTX), "cpu: "));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_loaded_through_adapter),
        cmocka_unit_test(test_gemm_grouped_epilogues),
        cmocka_unit_test(test_gemm_grouped_wgrad),
        cmocka_unit_test(test_gating_top1),
        cmocka_unit_test(test_gating_top2),
        cmocka_unit_test(test_small_members),
        cmocka_unit_test(test_other_members),
        cmocka_unit_test(test_bad_count_is_sticky),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
