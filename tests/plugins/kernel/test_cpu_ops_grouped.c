// tests/plugins/kernel/test_cpu_ops_grouped.c: the grouped GEMMs of the cpu kernel plugin: gemm_grouped with each
// epilogue and gemm_grouped_wgrad with shared weights and fused bias gradients, through the plugin's
// table (cpu_plugin_test.h), with per-group counts in device memory.
// References: naive loops in double (GEMM, bias, GELU and its derivative in double); and, bitwise, the
// separate calls the fused forms replace (gemm_grouped without epilogue, then bias_add, gelu_forward,
// or zero + gelu_backward per group; one wgrad call per group in ascending order, then bias_backward):
// the core may use either form, and training must give the same bits. Counts cover 0 and m_max;
// sizes cross the plugin's 256x256 GEMM tiles. A count above m_max is a sticky error. Groups with no rows
// are not read at all (their weights on pages with no access).
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h> // the untouchable experts of test_grouped_reads_only_routed_experts
#include <unistd.h>

#include <cmocka.h>

#include "cpu_plugin_test.h"

#define F32 DSMOE_FLOAT32
#define SENTINEL 12345.0f // rows at and beyond a group's count must keep it

static float *sentinel_fill(size_t n) {
    float *f = malloc(n * sizeof *f);
    for (size_t i = 0; i < n; i++)
        f[i] = SENTINEL;
    return f;
}

// ---------------------------------------------------------------------------------------------------
// gemm_grouped without epilogue: one tile per group, and groups spanning several tiles with partial
// edges; a group of count 0 is left alone.

static void test_gemm_grouped(void **state) {
    enum { G = 3 };
    struct { int n, k; int32_t m[G]; } cases[2] = {{6, 9, {5, 0, 7}}, {270, 5, {300, 0, 9}}};
    for (int cs = 0; cs < 2; cs++)
        for (int tb = 0; tb < 2; tb++) {
            const int32_t *m = cases[cs].m;
            int n = cases[cs].n, k = cases[cs].k, mmax = m[0] > m[2] ? m[0] : m[2];
            int ldb = tb ? k : n;
            size_t as = (size_t)mmax * k, bs = (size_t)k * n, cs_ = (size_t)mmax * n;
            float *a = rnd_fill(G * as, 1), *b = rnd_fill(G * bs, 1), *c = rnd_fill(G * cs_, 1);
            float *got = malloc(G * cs_ * 4);
            float *da = dev_put(C, a, G * as * 4), *db = dev_put(C, b, G * bs * 4), *dc = dev_put(C, c, G * cs_ * 4);
            int32_t *dm = dev_put(C, m, sizeof cases[cs].m);
            dsmoe_grouped_gemm g = {.groups = G, .counts = dm, .m_max = mmax, .n = n, .k = k, .alpha = -1.5f,
                                    .beta = 0.5f, .a = da, .a_type = F32, .lda = k, .a_stride = as, .b = db,
                                    .b_type = F32, .ldb = ldb, .b_stride = bs, .b_groups = G, .trans_b = tb, .c = dc,
                                    .c_type = F32, .ldc = n, .c_stride = cs_};
            OK(P->gemm_grouped(C, Q, &g));
            dev_get(C, got, dc, G * cs_ * 4);
            for (int gi = 0; gi < G; gi += 2) {
                double *want = malloc(sizeof(double) * cs_);
                const float *ag = a + gi * as, *bg = b + gi * bs, *cg = c + gi * cs_;
                for (int i = 0; i < m[gi]; i++)
                    for (int j = 0; j < n; j++) {
                        double s = 0;
                        for (int p = 0; p < k; p++)
                            s += (double)ag[i * k + p] * (tb ? bg[j * k + p] : bg[p * n + j]);
                        want[i * n + j] = -1.5 * s + 0.5 * cg[i * n + j];
                    }
                char what[64];
                snprintf(what, sizeof what, "gemm_grouped n=%d trans_b=%d group %d", n, tb, gi);
                assert_close(what, got + gi * cs_, want, (size_t)m[gi] * n, 1e-5, 1e-5);
                assert_memory_equal(got + gi * cs_ + (size_t)m[gi] * n, c + gi * cs_ + (size_t)m[gi] * n,
                                    (cs_ - (size_t)m[gi] * n) * 4); // rows past the count untouched
                free(want);
            }
            assert_memory_equal(got + cs_, c + cs_, cs_ * 4); // count 0 leaves c alone
            free(a), free(b), free(c), free(got);
            dev_free(C, da), dev_free(C, db), dev_free(C, dc), dev_free(C, dm);
        }
}

// ---------------------------------------------------------------------------------------------------
// Epilogues: 6 groups over 3 weights (w = g % 3), counts with 0 and m_max, m_max and n past one tile.

enum { EG = 6, EW = 3, EMAX = 300, EN = 300, EK = 40 };
static const int32_t ecounts[EG] = {EMAX, 0, 257, 1, EMAX, 100};

// The same grouped GEMM as two forms: fused (epilogue in the call) and separate (no epilogue, then the
// element-wise ops per group). Returns c and aux of both, on the host.
typedef struct epi_run {
    float *c, *aux; // (EG, EMAX, EN) each
} epi_run;

static void run_epilogue(dsmoe_epilogue epi, int fused, const float *a, const float *b, const float *bias,
                         const float *c0, const float *aux0, epi_run *out) {
    size_t as = (size_t)EMAX * EK, bs = (size_t)EN * EK, cs = (size_t)EMAX * EN;
    float *da = dev_put(C, a, EG * as * 4), *db = dev_put(C, b, EW * bs * 4), *dbias = dev_put(C, bias, EW * EN * 4);
    float *dc = dev_put(C, c0, EG * cs * 4), *daux = dev_put(C, aux0, EG * cs * 4);
    int32_t *dm = dev_put(C, ecounts, sizeof ecounts);
    dsmoe_grouped_gemm g = {.groups = EG, .counts = dm, .m_max = EMAX, .n = EN, .k = EK, .alpha = 0.75f,
                            .beta = epi == DSMOE_EPI_NONE ? 0.5f : 0.0f, .a = da, .a_type = F32, .lda = EK,
                            .a_stride = as, .b = db, .b_type = F32, .ldb = EK, .b_stride = bs, .b_groups = EW,
                            .trans_b = 1, .c = dc, .c_type = F32, .ldc = EN, .c_stride = cs,
                            .epilogue = fused ? epi : DSMOE_EPI_NONE, .bias = dbias, .bias_stride = EN, .aux = daux};
    if (!fused && epi == DSMOE_EPI_BIAS_GELU)
        g.c = daux; // the GEMM result is the pre-activation
    float *tmp = dev_new(C, cs * 4, 0);
    OK(P->gemm_grouped(C, Q, &g));
    for (int gi = 0; gi < EG && !fused; gi++) {
        size_t rows = (size_t)ecounts[gi], off = gi * cs;
        const float *bw = dbias + (gi % EW) * EN;
        if (rows == 0)
            continue;
        if (epi == DSMOE_EPI_BIAS) {
            OK(P->bias_add(C, Q, dc + off, F32, bw, (int)rows, EN));
        } else if (epi == DSMOE_EPI_BIAS_GELU) {
            OK(P->bias_add(C, Q, daux + off, F32, bw, (int)rows, EN));
            OK(P->gelu_forward(C, Q, dc + off, daux + off, F32, rows * EN));
        } else if (epi == DSMOE_EPI_DGELU) {
            OK(P->copy(C, Q, tmp, dc + off, rows * EN * 4));
            OK(P->zero(C, Q, dc + off, rows * EN * 4));
            OK(P->gelu_backward(C, Q, dc + off, daux + off, tmp, F32, rows * EN));
        }
    }
    out->c = malloc(EG * cs * 4), out->aux = malloc(EG * cs * 4);
    dev_get(C, out->c, dc, EG * cs * 4);
    dev_get(C, out->aux, daux, EG * cs * 4);
    dev_free(C, da), dev_free(C, db), dev_free(C, dbias), dev_free(C, dc), dev_free(C, daux), dev_free(C, dm);
    dev_free(C, tmp);
}

static void test_grouped_epilogues(void **state) {
    size_t as = (size_t)EMAX * EK, bs = (size_t)EN * EK, cs = (size_t)EMAX * EN;
    float *a = rnd_fill(EG * as, 1), *b = rnd_fill(EW * bs, 0.3f), *bias = rnd_fill(EW * EN, 1);
    float *c0 = rnd_fill(EG * cs, 1), *aux0 = rnd_fill(EG * cs, 3);
    float *sent = sentinel_fill(EG * cs);
    double *want = malloc(sizeof(double) * cs), *want_aux = malloc(sizeof(double) * cs);
    static const char *names[4] = {"none", "bias", "bias+gelu", "dgelu"};
    for (int epi = DSMOE_EPI_NONE; epi <= DSMOE_EPI_DGELU; epi++) {
        // Rows past a count start as the sentinel (in c, and in aux where the epilogue writes it).
        float *c_in = epi == DSMOE_EPI_NONE ? c0 : sent, *aux_in = epi == DSMOE_EPI_DGELU ? aux0 : sent;
        if (epi == DSMOE_EPI_NONE)
            for (int gi = 0; gi < EG; gi++)
                for (size_t i = (size_t)ecounts[gi] * EN; i < cs; i++)
                    c0[gi * cs + i] = SENTINEL;
        if (epi == DSMOE_EPI_DGELU) // aux rows past the counts must not be read: make them NaN
            for (int gi = 0; gi < EG; gi++)
                for (size_t i = (size_t)ecounts[gi] * EN; i < cs; i++)
                    aux0[gi * cs + i] = NAN;
        epi_run fused, separate;
        run_epilogue(epi, 1, a, b, bias, c_in, aux_in, &fused);
        run_epilogue(epi, 0, a, b, bias, c_in, aux_in, &separate);
        for (int gi = 0; gi < EG; gi++) {
            const float *ag = a + gi * as, *bg = b + (gi % EW) * bs, *bw = bias + (gi % EW) * EN;
            size_t rows = (size_t)ecounts[gi], used = rows * EN;
            for (size_t i = 0; i < rows; i++)
                for (int j = 0; j < EN; j++) {
                    double s = 0.75 * dot_d(ag + i * EK, bg + (size_t)j * EK, EK), r;
                    size_t at = i * EN + j;
                    if (epi == DSMOE_EPI_NONE)
                        r = s + 0.5 * c_in[gi * cs + at];
                    else if (epi == DSMOE_EPI_BIAS)
                        r = s + bw[j];
                    else if (epi == DSMOE_EPI_BIAS_GELU)
                        want_aux[at] = s + bw[j], r = gelu_d(s + bw[j]);
                    else
                        r = gelu_grad_d(aux_in[gi * cs + at]) * s;
                    want[at] = r;
                }
            char what[64];
            snprintf(what, sizeof what, "epilogue %s group %d (count %zu)", names[epi], gi, rows);
            assert_close(what, fused.c + gi * cs, want, used, 1e-5, 1e-4);
            if (epi == DSMOE_EPI_BIAS_GELU)
                assert_close("epilogue bias+gelu aux", fused.aux + gi * cs, want_aux, used, 1e-5, 1e-5);
            // Bitwise the separate calls, and nothing written past the count.
            if (memcmp(fused.c + gi * cs, separate.c + gi * cs, used * 4) ||
                memcmp(fused.aux + gi * cs, separate.aux + gi * cs, used * 4))
                fail_msg("epilogue %s group %d: the fused form differs from the separate calls", names[epi], gi);
            for (size_t i = used; i < cs; i++)
                if (memcmp(&fused.c[gi * cs + i], &c_in[gi * cs + i], 4) ||
                    memcmp(&fused.aux[gi * cs + i], &aux_in[gi * cs + i], 4))
                    fail_msg("epilogue %s group %d: element %zu past the count was written", names[epi], gi, i);
        }
        free(fused.c), free(fused.aux), free(separate.c), free(separate.aux);
    }
    free(a), free(b), free(bias), free(c0), free(aux0), free(sent), free(want), free(want_aux);
}

// ---------------------------------------------------------------------------------------------------
// gemm_grouped_wgrad

// dw (n, k) per weight on context c; one call with every group (fused) or one call per group in
// ascending order followed by bias_backward (separate). dbias may be NULL.
static void run_wgrad(dsmoe_kernel_ctx *c, int fused, int groups, int nw, const int32_t *m, int mmax, int n, int k,
                      const float *dy, const float *x, float *dw, float *dbias) {
    dsmoe_kernel_queue *q = P->default_queue(c);
    size_t ys = (size_t)mmax * n, xs = (size_t)mmax * k, ws = (size_t)n * k;
    float *ddy = dev_put(c, dy, groups * ys * 4), *dx = dev_put(c, x, groups * xs * 4);
    float *ddw = dev_put(c, dw, nw * ws * 4), *ddb = dbias ? dev_put(c, dbias, (size_t)nw * n * 4) : NULL;
    int32_t *dm = dev_put(c, m, groups * sizeof *m);
    dsmoe_grouped_wgrad g = {.groups = groups, .counts = dm, .m_max = mmax, .n = n, .k = k, .alpha = 0.5f, .dy = ddy,
                             .dy_type = F32, .dy_stride = ys, .x = dx, .x_type = F32, .x_stride = xs, .dw = ddw,
                             .dw_stride = ws, .b_groups = nw, .dbias = ddb, .dbias_stride = n};
    if (fused) {
        OKC(c, P->gemm_grouped_wgrad(c, q, &g));
    } else {
        for (int gi = 0; gi < groups; gi++) {
            dsmoe_grouped_wgrad one = g;
            one.groups = 1, one.b_groups = 1, one.counts = dm + gi, one.dy = ddy + gi * ys, one.x = dx + gi * xs;
            one.dw = ddw + (gi % nw) * ws, one.dbias = NULL;
            OKC(c, P->gemm_grouped_wgrad(c, q, &one));
        }
        for (int gi = 0; gi < groups && ddb; gi++)
            OKC(c, P->bias_backward(c, q, ddb + (gi % nw) * n, ddy + gi * ys, F32, m[gi], n));
    }
    dev_get(c, dw, ddw, nw * ws * 4);
    if (dbias)
        dev_get(c, dbias, ddb, (size_t)nw * n * 4);
    dev_free(c, ddy), dev_free(c, dx), dev_free(c, ddw), dev_free(c, ddb), dev_free(c, dm);
}

// dw_w += 0.5 * sum_{g % nw == w} dy_g^T x_g and dbias_w += row sums, in double.
static void naive_wgrad(int groups, int nw, const int32_t *m, int mmax, int n, int k, const float *dy, const float *x,
                        const float *dw0, const float *db0, double *dw, double *db) {
    for (int w = 0; w < nw; w++)
        for (int i = 0; i < n; i++) {
            double sb = db0 ? db0[w * n + i] : 0;
            for (int gi = w; gi < groups; gi += nw)
                for (int r = 0; r < m[gi]; r++)
                    sb += dy[((size_t)gi * mmax + r) * n + i];
            db[w * n + i] = sb;
            for (int j = 0; j < k; j++) {
                double s = 0;
                for (int gi = w; gi < groups; gi += nw)
                    for (int r = 0; r < m[gi]; r++)
                        s += (double)dy[((size_t)gi * mmax + r) * n + i] * x[((size_t)gi * mmax + r) * k + j];
                dw[((size_t)w * n + i) * k + j] = dw0[((size_t)w * n + i) * k + j] + 0.5 * s;
            }
        }
}

static void check_wgrad(const char *what, int groups, int nw, const int32_t *m, int mmax, int n, int k, int bias) {
    size_t ws = (size_t)n * k;
    float *dy = rnd_fill(groups * (size_t)mmax * n, 1), *x = rnd_fill(groups * (size_t)mmax * k, 1);
    float *dw0 = rnd_fill(nw * ws, 1), *db0 = bias ? rnd_fill((size_t)nw * n, 1) : NULL;
    float *dw1 = malloc(nw * ws * 4), *dw2 = malloc(nw * ws * 4), *db1 = NULL, *db2 = NULL;
    memcpy(dw1, dw0, nw * ws * 4), memcpy(dw2, dw0, nw * ws * 4);
    if (bias) {
        db1 = malloc((size_t)nw * n * 4), db2 = malloc((size_t)nw * n * 4);
        memcpy(db1, db0, (size_t)nw * n * 4), memcpy(db2, db0, (size_t)nw * n * 4);
    }
    double *want = malloc(sizeof(double) * nw * ws), *want_b = malloc(sizeof(double) * nw * n);
    naive_wgrad(groups, nw, m, mmax, n, k, dy, x, dw0, db0, want, want_b);
    run_wgrad(C, 1, groups, nw, m, mmax, n, k, dy, x, dw1, db1);
    run_wgrad(C, 0, groups, nw, m, mmax, n, k, dy, x, dw2, db2);
    char msg[96];
    snprintf(msg, sizeof msg, "%s dw", what);
    assert_close(msg, dw1, want, nw * ws, 1e-5, 1e-5);
    if (memcmp(dw1, dw2, nw * ws * 4))
        fail_msg("%s: dw differs from one call per group in ascending order", what);
    if (bias) {
        snprintf(msg, sizeof msg, "%s dbias", what);
        assert_close(msg, db1, want_b, (size_t)nw * n, 1e-5, 1e-5);
        if (memcmp(db1, db2, (size_t)nw * n * 4))
            fail_msg("%s: dbias differs from bias_backward per group in ascending order", what);
    }
    free(dy), free(x), free(dw0), free(db0), free(dw1), free(dw2), free(db1), free(db2), free(want), free(want_b);
}

static void test_grouped_wgrad(void **state) {
    // One weight per group, dw (300, 260) spanning 2x2 tiles with partial edges, no bias.
    check_wgrad("wgrad 3 groups", 3, 3, (int32_t[]){4, 0, 6}, 6, 300, 260, 0);
    // Six groups over two weights (g % 2), counts with 0 and m_max, fused dbias over 130 columns (two
    // chunks and a partial one).
    check_wgrad("wgrad 6 groups / 2 weights", 6, 2, (int32_t[]){5, 0, 6, 3, 0, 2}, 6, 130, 70, 1);
    // More weights than groups: weights 3 and 4 get nothing and stay as they were.
    check_wgrad("wgrad 3 groups / 5 weights", 3, 5, (int32_t[]){2, 3, 1}, 3, 20, 9, 1);
}

// ---------------------------------------------------------------------------------------------------
// Errors, thread-count independence

static void test_grouped_errors(void **state) {
    void *buf = dev_zeros(C, 1 << 16);
    float *f = buf;
    int32_t good[2] = {3, 8}, over[2] = {3, 9}, neg[2] = {-1, 0};
    int32_t *dgood = dev_put(C, good, sizeof good);
    dsmoe_grouped_gemm g = {.groups = 2, .counts = dgood, .m_max = 8, .n = 4, .k = 4, .alpha = 1.0f, .a = f,
                            .lda = 4, .a_stride = 32, .b = f, .ldb = 4, .b_groups = 1, .c = f + 1024, .ldc = 4,
                            .c_stride = 32};
    OK(P->gemm_grouped(C, Q, &g));
    // Bad calls are refused at once and are not sticky.
    dsmoe_grouped_gemm bad = g;
    bad.b_groups = 0;
    assert_int_equal(P->gemm_grouped(C, Q, &bad), DSMOE_ERR_INVALID);
    bad = g, bad.epilogue = DSMOE_EPI_BIAS;
    assert_int_equal(P->gemm_grouped(C, Q, &bad), DSMOE_ERR_INVALID);
    assert_non_null(strstr(P->last_error(C), "needs bias"));
    bad = g, bad.c_stride = 16; // the groups' outputs would overlap
    assert_int_equal(P->gemm_grouped(C, Q, &bad), DSMOE_ERR_INVALID);
    OK(P->synchronize(C));
    // A count above m_max (or below 0) is bad data: sticky, reported by synchronize.
    for (int which = 0; which < 2; which++) {
        dsmoe_kernel_ctx *c = cpt_ctx(1);
        void *cb = dev_zeros(c, 1 << 16);
        int32_t *dc = dev_put(c, which ? neg : over, sizeof over);
        dsmoe_grouped_gemm gc = g;
        dsmoe_grouped_wgrad wc = {.groups = 2, .counts = dc, .m_max = 8, .n = 4, .k = 4, .alpha = 1.0f, .dy = cb,
                                  .dy_stride = 32, .x = cb, .x_stride = 32, .dw = (float *)cb + 1024, .b_groups = 2,
                                  .dw_stride = 16};
        gc.counts = dc, gc.a = gc.b = cb, gc.c = (float *)cb + 1024;
        dsmoe_status st = which ? P->gemm_grouped_wgrad(c, P->default_queue(c), &wc)
                                : P->gemm_grouped(c, P->default_queue(c), &gc);
        assert_int_equal(st, DSMOE_ERR_INVALID);
        assert_int_equal(P->synchronize(c), DSMOE_ERR_INVALID);
        assert_int_equal(P->zero(c, P->default_queue(c), cb, 4), DSMOE_ERR_INVALID);
        const char *want = which ? "counts[0]=-1" : "counts[1]=9";
        if (!strstr(P->last_error(c), want))
            fail_msg("message '%s' lacks '%s'", P->last_error(c), want);
        dev_free(c, cb), dev_free(c, dc);
        P->finalize(c);
    }
    dev_free(C, buf), dev_free(C, dgood);
}

static void test_grouped_threads(void **state) {
    enum { G = 4, NW = 2, MM = 260, N = 300, K = 64 };
    const int32_t m[G] = {260, 7, 0, 131};
    size_t as = (size_t)MM * K, bs = (size_t)N * K, cs = (size_t)MM * N;
    float *a = rnd_fill(G * as, 1), *b = rnd_fill(NW * bs, 0.2f), *bias = rnd_fill(NW * N, 1);
    float *out[2], *dw[2], *db[2];
    for (int t = 0; t < 2; t++) {
        dsmoe_kernel_ctx *c = cpt_ctx(t + 1);
        dsmoe_kernel_queue *q = P->default_queue(c);
        float *da = dev_put(c, a, G * as * 4), *dbw = dev_put(c, b, NW * bs * 4), *dbias = dev_put(c, bias, NW * N * 4);
        float *dc = dev_zeros(c, G * cs * 4), *daux = dev_zeros(c, G * cs * 4);
        int32_t *dm = dev_put(c, m, sizeof m);
        dsmoe_grouped_gemm g = {.groups = G, .counts = dm, .m_max = MM, .n = N, .k = K, .alpha = 1.0f, .a = da,
                                .lda = K, .a_stride = as, .b = dbw, .ldb = K, .b_stride = bs, .b_groups = NW,
                                .trans_b = 1, .c = dc, .ldc = N, .c_stride = cs, .epilogue = DSMOE_EPI_BIAS_GELU,
                                .bias = dbias, .bias_stride = N, .aux = daux};
        OKC(c, P->gemm_grouped(c, q, &g));
        float *ddw = dev_zeros(c, NW * (size_t)N * K * 4), *ddb = dev_zeros(c, NW * N * 4);
        dsmoe_grouped_wgrad w = {.groups = G, .counts = dm, .m_max = MM, .n = N, .k = K, .alpha = 1.0f, .dy = dc,
                                 .dy_stride = cs, .x = da, .x_stride = as, .dw = ddw, .dw_stride = (size_t)N * K,
                                 .b_groups = NW, .dbias = ddb, .dbias_stride = N};
        OKC(c, P->gemm_grouped_wgrad(c, q, &w));
        out[t] = malloc(G * cs * 4), dw[t] = malloc(NW * (size_t)N * K * 4), db[t] = malloc(NW * N * 4);
        dev_get(c, out[t], dc, G * cs * 4);
        dev_get(c, dw[t], ddw, NW * (size_t)N * K * 4);
        dev_get(c, db[t], ddb, NW * N * 4);
        void *bufs[] = {da, dbw, dbias, dc, daux, dm, ddw, ddb};
        for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
            dev_free(c, bufs[i]);
        P->finalize(c);
    }
    assert_memory_equal(out[0], out[1], G * cs * 4);
    assert_memory_equal(dw[0], dw[1], NW * (size_t)N * K * 4);
    assert_memory_equal(db[0], db[1], NW * N * 4);
    for (int t = 0; t < 2; t++)
        free(out[t]), free(dw[t]), free(db[t]);
    free(a), free(b), free(bias);
}

// Decode must not pay for experts that receive no tokens: with one token routed to one expert of 8, a
// grouped GEMM (x w^T, as the expert fc runs) must read that expert's weights only. The other experts'
// weights sit on pages with no access (mprotect PROT_NONE): a read of any of them ends the test with a
// segmentation fault. fp32 with 1 row (the plugin's dot-product path) and 9 rows (its tiled path), and
// the weights in bfloat16.
static void test_grouped_reads_only_routed_experts(void **state) {
    (void)state;
    enum { E = 8, N = 96, K = 64, USED = 5 };
    long page = sysconf(_SC_PAGESIZE);
    for (int lp = 0; lp < 2; lp++)
        for (int rows = 1; rows <= 9; rows += 8) {
            size_t esz = lp ? 2 : 4, wbytes = (size_t)N * K * esz;
            size_t stride = (wbytes + (size_t)page - 1) / (size_t)page * (size_t)page; // an expert per page run
            unsigned char *w = mmap(NULL, E * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            assert_true(w != MAP_FAILED);
            float *wf = rnd_fill((size_t)N * K, 1), *a = rnd_fill((size_t)E * rows * K, 1);
            for (size_t i = 0; i < (size_t)N * K; i++) {
                if (!lp) {
                    memcpy(w + USED * stride + 4 * i, &wf[i], 4);
                    continue;
                }
                uint32_t u;
                memcpy(&u, &wf[i], 4);
                uint16_t h = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16); // round to nearest even
                memcpy(w + USED * stride + 2 * i, &h, 2);
                u = (uint32_t)h << 16;
                memcpy(&wf[i], &u, 4); // the reference uses the rounded weights
            }
            for (int e = 0; e < E; e++)
                if (e != USED) assert_int_equal(mprotect(w + e * stride, stride, PROT_NONE), 0);
            int32_t m[E] = {0};
            m[USED] = rows;
            float *da = dev_put(C, a, (size_t)E * rows * K * 4), *dc = dev_zeros(C, (size_t)E * rows * N * 4);
            void *da_lp = NULL;
            if (lp) {
                da_lp = dev_new(C, (size_t)E * rows * K * 2, 0);
                OK(P->convert(C, Q, da_lp, DSMOE_BFLOAT16, da, F32, (size_t)E * rows * K));
            }
            int32_t *dm = dev_put(C, m, sizeof m);
            dsmoe_grouped_gemm g = {.groups = E, .counts = dm, .m_max = rows, .n = N, .k = K, .alpha = 1.0f,
                                    .a = lp ? da_lp : da, .a_type = lp ? DSMOE_BFLOAT16 : F32, .lda = K,
                                    .a_stride = (size_t)rows * K, .b = w, .b_type = lp ? DSMOE_BFLOAT16 : F32,
                                    .ldb = K, .b_stride = stride / esz, .b_groups = E, .trans_b = 1, .c = dc,
                                    .c_type = F32, .ldc = N, .c_stride = (size_t)rows * N};
            OK(P->gemm_grouped(C, Q, &g));
            float *got = malloc((size_t)E * rows * N * 4);
            dev_get(C, got, dc, (size_t)E * rows * N * 4);
            double *want = malloc(sizeof(double) * rows * N);
            float *ar = a + (size_t)USED * rows * K;
            if (lp) // the reference uses the rounded activations too
                for (size_t i = 0; i < (size_t)rows * K; i++) {
                    uint32_t u;
                    memcpy(&u, &ar[i], 4);
                    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16;
                    memcpy(&ar[i], &u, 4);
                }
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < N; j++) want[i * N + j] = dot_d(ar + (size_t)i * K, wf + (size_t)j * K, K);
            char what[64];
            snprintf(what, sizeof what, "expert %d of %d, %d rows, %s", USED, E, rows, lp ? "bf16" : "fp32");
            assert_close(what, got + (size_t)USED * rows * N, want, (size_t)rows * N, lp ? 1e-3 : 1e-5, 1e-4);
            free(got), free(want), free(wf), free(a);
            dev_free(C, da), dev_free(C, dc), dev_free(C, dm);
            if (da_lp) dev_free(C, da_lp);
            munmap(w, E * stride);
        }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemm_grouped),
        cmocka_unit_test(test_grouped_epilogues),
        cmocka_unit_test(test_grouped_wgrad),
        cmocka_unit_test(test_grouped_errors),
        cmocka_unit_test(test_grouped_threads),
        cmocka_unit_test(test_grouped_reads_only_routed_experts),
    };
    if (cpt_load(2) != 0) {
        fprintf(stderr, "test_cpu_ops_grouped: cannot load or initialise the cpu plugin %s\n", CPT_PLUGIN_FILE);
        return 1;
    }
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    cpt_unload();
    return rc;
}
