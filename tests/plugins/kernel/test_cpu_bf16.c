// tests/plugins/kernel/test_cpu_bf16.c: bfloat16 in the cpu kernel plugin, through its table (cpu_plugin_test.h):
// conversions, GEMMs and grouped GEMMs with bf16 operands, and their independence of the thread count.
// The ops that read bf16 rows in place are test_cpu_bf16_rows.c's.
// ctest runs it twice (tests/plugins/kernel/cpu_bf16.cmake): as the machine is, and with oneDNN held below its bf16
// ISA (ONEDNN_MAX_CPU_ISA) so that the emulated GEMMs are tested too; DSMOE_TEST_BF16_PATH says
// which path describe() must name.
//
// References, independent of the plugin:
// - conversion: a scalar float32 -> bfloat16 written from the definition (the two neighbours by
//   truncation, the nearer one, a tie to the even mantissa, overflow past the largest finite value +
//   half an ulp to Inf, NaN quiet), on edge cases and on every upper-16-bit pattern with random
//   lower halves; widening on all 65536 patterns.
// - GEMMs: loops in double on the bf16 values. Tolerance, from the arithmetic: products of two
//   bfloat16 are exact in float32 (8 + 8 significant bits), so a float32 result differs from the exact
//   one by the float32 additions and scalings only. Any summation order of k terms plus alpha, beta and
//   a bias (at most k + 3 roundings in a chain) stays within gamma(k + 3) * S, S = |alpha| sum |a b| +
//   |beta c| + |bias|, gamma(j) = j u / (1 - j u), u = 2^-24 (Higham, Accuracy and Stability, 3.1).
//   A bfloat16 result adds one rounding of half a bfloat16 ulp (8 significant bits): at most 2^-8 of
//   the float32 value. GELU's derivative is below 1.13 in size, so it passes the pre-activation error
//   on times 1.13, plus 2e-6 (1 + |x|) for the plugin's float32 tanh (about 1e-7 absolute) and the
//   float32 evaluation; gelu'(x) c likewise, with |gelu'(x)|.
// - thread independence: the same calls on a 1-thread and a 2-thread context, and again on the
//   2-thread one, give the same bits.
#include <cpuid.h>
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
#include "plugins/kernel/bf16_ref.h" // ref_f2bf, to_bf16, SENTINEL_BITS

#define F32 DSMOE_FLOAT32
#define BF16 DSMOE_BFLOAT16

// ---------------------------------------------------------------------------------------------------
// Conversions

static void convert_check(const float *src, size_t n) {
    float *d_src = dev_put(C, src, n * sizeof *src);
    uint16_t *d_dst = dev_new(C, n * 2, 0), *got = malloc(n * 2);
    OK(P->convert(C, Q, d_dst, BF16, d_src, F32, n));
    dev_get(C, got, d_dst, n * 2);
    for (size_t i = 0; i < n; i++) {
        uint16_t want = ref_f2bf(src[i]);
        int ok = got[i] == want;
        if (isnan(src[i])) // NaN: a quiet NaN of the same sign (payload unspecified by the contract)
            ok = (got[i] & 0x7f80) == 0x7f80 && (got[i] & 0x40) && (got[i] & 0x8000) == (want & 0x8000);
        if (!ok)
            fail_msg("convert float32 0x%08x: got bfloat16 0x%04x, expected 0x%04x (element %zu)", f_bits(src[i]),
                     got[i], want, i);
    }
    dev_free(C, d_src);
    dev_free(C, d_dst);
    free(got);
}

static void test_convert_edges(void **state) {
    static const uint32_t edge[] = {
        0x3f808000u, 0x3f818000u, 0x3f808001u, 0xbf808000u, 0x3f7f8000u, // ties both ways, carry into exponent
        0x3f80ffffu, 0x3f807fffu, 0x7f7f7fffu, 0x7f7f8000u, 0xff7f8000u, // max finite: stays, or rounds to Inf
        0x7f7fffffu, 0x7f800000u, 0xff800000u, 0x00000000u, 0x80000000u, // Inf, zeros
        0x00000001u, 0x00008000u, 0x00018000u, 0x00008001u, 0x007fffffu, // subnormals (to a subnormal or zero)
        0x807fffffu, 0x007f8000u, 0x00800000u, 0x7fc00000u, 0x7f800001u, // ... to the smallest normal; NaNs
        0xffc00001u, 0x7fbfffffu, 0xff800001u, 0x00010000u, 0x80008000u};
    size_t ne = sizeof edge / sizeof *edge;
    // Each edge alone (tail path), then in a run of 64 ordinary values (vector blocks with it inside)
    float *v = malloc(64 * sizeof *v);
    for (size_t e = 0; e < ne; e++) {
        float one = bits_f(edge[e]);
        convert_check(&one, 1);
        for (int i = 0; i < 64; i++)
            v[i] = 1.0f + (float)i / 64;
        v[e % 64] = one;
        convert_check(v, 64);
    }
    free(v);
    // Every upper half with 32 random lower halves: all signs, exponents, NaN classes; subnormal
    // blocks are contiguous (a vector block with a subnormal is redone by the integer rule).
    size_t n = 65536 * 32;
    float *all = malloc(n * sizeof *all);
    for (size_t i = 0; i < n; i++) {
        cpt_rng_state = cpt_rng_state * 6364136223846793005ull + 1442695040888963407ull;
        all[i] = bits_f((uint32_t)(i / 32) << 16 | (uint32_t)(cpt_rng_state >> 48));
    }
    convert_check(all, n);
    free(all);
    // Widening is exact on all 65536 patterns
    uint16_t *h = malloc(65536 * 2);
    for (int i = 0; i < 65536; i++)
        h[i] = (uint16_t)i;
    uint16_t *d_h = dev_put(C, h, 65536 * 2);
    float *d_f = dev_new(C, 65536 * 4, 0), *f = malloc(65536 * 4);
    OK(P->convert(C, Q, d_f, F32, d_h, BF16, 65536));
    dev_get(C, f, d_f, 65536 * 4);
    for (int i = 0; i < 65536; i++)
        if (f_bits(f[i]) != (uint32_t)i << 16)
            fail_msg("convert bfloat16 0x%04x: got float32 0x%08x", i, f_bits(f[i]));
    dev_free(C, d_h);
    dev_free(C, d_f);
    free(h);
    free(f);
}

// ---------------------------------------------------------------------------------------------------
// GEMM checks

static double gamma_u(int j) {
    double u = ldexp(1.0, -24);
    return j * u / (1 - j * u);
}

// got (m, n), ldc, float32 or bfloat16, against want: within tol (the float32 result's bound) plus,
// for a bfloat16 result, its rounding (half an ulp: at most 2^-8 of the value).
static void check_close(const char *what, const void *got, dsmoe_dtype ct, int m, int n, int ldc, const double *want,
                        const double *tol) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            size_t at = (size_t)i * ldc + j, o = (size_t)i * n + j;
            double g = ct == BF16 ? bf2f(((const uint16_t *)got)[at]) : ((const float *)got)[at];
            double w = want[o], t = ct == BF16 ? tol[o] + ldexp(fabs(w) + tol[o], -8) : tol[o];
            if (!(fabs(g - w) <= t))
                fail_msg("%s: (%d, %d) = %.9g, expected %.9g within %.3g (%s c)", what, i, j, g, w, t,
                         ct == BF16 ? "bfloat16" : "float32");
        }
}

static void check_untouched(const char *what, const uint16_t *c, size_t from, size_t to) {
    for (size_t i = from; i < to; i++)
        if (c[i] != SENTINEL_BITS)
            fail_msg("%s: element %zu was written (0x%04x)", what, i, c[i]);
}

// c bytes as stored: float32 or bfloat16 (a bfloat16 c starts as the bf16 rounding of c0).
static void *c_host(const float *c0, size_t n, dsmoe_dtype ct) {
    if (ct == F32) {
        float *c = malloc(n * 4);
        memcpy(c, c0, n * 4);
        return c;
    }
    uint16_t *c = malloc(n * 2);
    for (size_t i = 0; i < n; i++)
        c[i] = ref_f2bf(c0[i]);
    return c;
}

// ---------------------------------------------------------------------------------------------------
// gemm: every transpose pair, padded leading dimensions, alpha, beta 0 (c holds NaN, not read) and
// beta != 0, c float32 and bfloat16, k = 0; sizes cross the 256 x 512 tiles.

static void gemm_case(int ta, int tb, int m, int n, int k, float alpha, float beta, dsmoe_dtype ct) {
    int lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 5, ldc = n + 7;
    size_t na = (size_t)(ta ? k : m) * lda, nb = (size_t)(tb ? n : k) * ldb, nc = (size_t)m * ldc;
    float *a = rnd_fill(na, 1.0f), *b = rnd_fill(nb, 1.0f), *c0 = rnd_fill(nc, 1.0f);
    if (beta == 0.0f)
        for (size_t i = 0; i < nc; i++)
            c0[i] = NAN;
    uint16_t *ah = to_bf16(a, na), *bh = to_bf16(b, nb);
    void *ch = c_host(c0, nc, ct);
    size_t es = dsmoe_dtype_size(ct);
    double *want = malloc((size_t)m * n * sizeof *want + 1), *S = malloc((size_t)m * n * sizeof *S + 1);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double acc = 0, mag_ = 0;
            for (int l = 0; l < k; l++) {
                double p = (double)(ta ? a[(size_t)l * lda + i] : a[(size_t)i * lda + l]) *
                           (tb ? b[(size_t)j * ldb + l] : b[(size_t)l * ldb + j]);
                acc += p, mag_ += fabs(p);
            }
            size_t at = (size_t)i * ldc + j;
            double cin = beta == 0.0f ? 0 : ct == BF16 ? bf2f(((uint16_t *)ch)[at]) : c0[at];
            want[(size_t)i * n + j] = alpha * acc + beta * cin;
            S[(size_t)i * n + j] = gamma_u(k + 3) * (fabs(alpha) * mag_ + fabs(beta * cin));
        }
    void *da = dev_put(C, ah, na * 2), *db = dev_put(C, bh, nb * 2), *dc = dev_put(C, ch, nc * es);
    void *got = malloc(nc * es);
    OK(P->gemm(C, Q, ta, tb, m, n, k, alpha, da, BF16, lda, db, BF16, ldb, beta, dc, ct, ldc));
    dev_get(C, got, dc, nc * es);
    char what[96];
    snprintf(what, sizeof what, "gemm ta=%d tb=%d %dx%dx%d alpha=%g beta=%g", ta, tb, m, n, k, alpha, beta);
    check_close(what, got, ct, m, n, ldc, want, S);
    if (ct == BF16) // the padding columns of c keep their values
        for (int i = 0; i < m; i++)
            for (int j = n; j < ldc; j++)
                if (((uint16_t *)got)[(size_t)i * ldc + j] != ((uint16_t *)ch)[(size_t)i * ldc + j])
                    fail_msg("%s: padding (%d, %d) of c was written", what, i, j);
    dev_free(C, da), dev_free(C, db), dev_free(C, dc);
    free(a), free(b), free(c0), free(ah), free(bh), free(ch), free(want), free(S), free(got);
}

static void test_gemm(void **state) {
    for (int t = 0; t < 4; t++) {
        gemm_case(t >> 1, t & 1, 300, 600, 200, 0.75f, 0.0f, BF16);
        gemm_case(t >> 1, t & 1, 300, 600, 200, 1.0f, 0.5f, F32);
        gemm_case(t >> 1, t & 1, 37, 53, 29, 1.0f, 1.0f, BF16);
    }
    gemm_case(0, 0, 260, 520, 1000, 1.0f, 0.0f, F32); // long k
    gemm_case(0, 1, 17, 33, 0, 1.0f, 0.5f, BF16);     // k = 0: c = beta c
    gemm_case(1, 0, 17, 33, 0, 1.0f, 0.0f, F32);
}

// ---------------------------------------------------------------------------------------------------
// gemm_grouped: shared weights (b_groups < groups), padded strides and leading dimensions, counts 0,
// 1, m_max and across tiles; rows past a count hold NaN in a (must not matter) and a sentinel in c
// (must stay); epilogues in bfloat16 and float32.

typedef struct gg_case {
    int tb, epi;
    float alpha, beta;
    dsmoe_dtype ct;
} gg_case;

static void grouped_case(const gg_case *T) {
    enum { G = 5, BG = 3, MMAX = 300, N = 520, K = 96 };
    static const int32_t counts[G] = {300, 0, 257, 1, 44};
    const int lda = K + 2, ldb = (T->tb ? K : N) + 3, ldc = N + 4;
    const size_t a_stride = (size_t)MMAX * lda + 11, b_stride = (size_t)(T->tb ? N : K) * ldb + 13;
    const size_t c_stride = (size_t)MMAX * ldc + 17, na = G * a_stride, nb = BG * b_stride, nc = G * c_stride;
    const size_t es = dsmoe_dtype_size(T->ct);
    const int bias = T->epi == DSMOE_EPI_BIAS || T->epi == DSMOE_EPI_BIAS_GELU;
    float *a = rnd_fill(na, 1.0f), *b = rnd_fill(nb, 1.0f), *c0 = rnd_fill(nc, 1.0f), *bs = rnd_fill(BG * N, 1.0f);
    float *aux0 = rnd_fill(nc, 2.0f);
    for (int g = 0; g < G; g++)
        for (size_t i = (size_t)counts[g] * lda; i < (size_t)MMAX * lda; i++)
            a[g * a_stride + i] = NAN;
    uint16_t *ah = to_bf16(a, na), *bh = to_bf16(b, nb);
    void *ch = c_host(c0, nc, T->ct), *auxh = c_host(aux0, nc, T->ct);
    if (T->ct == BF16) // rows past the counts hold the sentinel
        for (int g = 0; g < G; g++)
            for (size_t i = (size_t)counts[g] * ldc; i < c_stride; i++)
                ((uint16_t *)ch)[g * c_stride + i] = SENTINEL_BITS;
    void *da = dev_put(C, ah, na * 2), *db = dev_put(C, bh, nb * 2), *dc = dev_put(C, ch, nc * es);
    void *daux = dev_put(C, auxh, nc * es), *dbias = dev_put(C, bs, BG * N * 4);
    void *dcounts = dev_put(C, counts, sizeof counts);
    dsmoe_grouped_gemm gg = {.groups = G, .counts = dcounts, .m_max = MMAX, .n = N, .k = K, .alpha = T->alpha,
                             .beta = T->beta, .a = da, .a_type = BF16, .lda = lda, .a_stride = a_stride, .b = db,
                             .b_type = BF16, .ldb = ldb, .b_stride = b_stride, .b_groups = BG, .trans_b = T->tb,
                             .c = dc, .c_type = T->ct, .ldc = ldc, .c_stride = c_stride, .epilogue = T->epi,
                             .bias = dbias, .bias_stride = N, .aux = daux};
    OK(P->gemm_grouped(C, Q, &gg));
    void *got = malloc(nc * es), *gaux = malloc(nc * es);
    dev_get(C, got, dc, nc * es);
    dev_get(C, gaux, daux, nc * es);
    size_t mn = (size_t)MMAX * N;
    double *pre = malloc(mn * sizeof *pre), *tpre = malloc(mn * sizeof *tpre);
    double *want = malloc(mn * sizeof *want), *tol = malloc(mn * sizeof *tol);
    for (int g = 0; g < G; g++) {
        int w = g % BG, m = counts[g];
        const float *ag = a + g * a_stride, *bw = b + w * b_stride;
        for (int i = 0; i < m; i++)
            for (int j = 0; j < N; j++) {
                double acc = 0, s = 0;
                for (int l = 0; l < K; l++) {
                    double p = (double)ag[(size_t)i * lda + l] *
                               (T->tb ? bw[(size_t)j * ldb + l] : bw[(size_t)l * ldb + j]);
                    acc += p, s += fabs(p);
                }
                size_t at = g * c_stride + (size_t)i * ldc + j, o = (size_t)i * N + j;
                double cin = T->beta == 0.0f ? 0 : T->ct == BF16 ? bf2f(((uint16_t *)ch)[at]) : c0[at];
                double bj = bias ? bs[w * N + j] : 0;
                pre[o] = T->alpha * acc + T->beta * cin + bj;
                tpre[o] = gamma_u(K + 3) * (fabs(T->alpha) * s + fabs(T->beta * cin) + fabs(bj));
                want[o] = pre[o], tol[o] = tpre[o];
                if (T->epi == DSMOE_EPI_BIAS_GELU) { // |gelu'| < 1.13; float32 tanh and evaluation
                    want[o] = gelu_d(pre[o]);
                    tol[o] = 1.13 * tpre[o] + 2e-6 * (1 + fabs(pre[o]));
                } else if (T->epi == DSMOE_EPI_DGELU) { // gelu'(aux) * c, aux as stored
                    double x = T->ct == BF16 ? bf2f(((uint16_t *)auxh)[at]) : aux0[at];
                    want[o] = gelu_grad_d(x) * pre[o];
                    tol[o] = fabs(gelu_grad_d(x)) * tpre[o] + 2e-6 * (1 + fabs(x)) * fabs(pre[o]);
                }
            }
        char what[128];
        snprintf(what, sizeof what, "gemm_grouped tb=%d epi=%d alpha=%g beta=%g %s group %d (count %d)", T->tb,
                 T->epi, T->alpha, T->beta, dsmoe_dtype_name(T->ct), g, m);
        size_t off = g * c_stride * es;
        check_close(what, (char *)got + off, T->ct, m, N, ldc, want, tol);
        if (T->epi == DSMOE_EPI_BIAS_GELU) // aux = the pre-activation
            check_close(what, (char *)gaux + off, T->ct, m, N, ldc, pre, tpre);
        if (T->ct == BF16)
            check_untouched(what, (uint16_t *)got + g * c_stride, (size_t)m * ldc, c_stride);
    }
    dev_free(C, da), dev_free(C, db), dev_free(C, dc), dev_free(C, daux), dev_free(C, dbias), dev_free(C, dcounts);
    free(a), free(b), free(c0), free(bs), free(aux0), free(ah), free(bh), free(ch), free(auxh);
    free(got), free(gaux), free(pre), free(tpre), free(want), free(tol);
}

static void test_gemm_grouped(void **state) {
    const gg_case cases[] = {
        {0, DSMOE_EPI_NONE, 1.0f, 0.0f, BF16},      {1, DSMOE_EPI_NONE, 0.5f, 1.0f, BF16},
        {1, DSMOE_EPI_BIAS, 1.0f, 0.0f, BF16},      {0, DSMOE_EPI_BIAS_GELU, 1.0f, 0.0f, BF16},
        {1, DSMOE_EPI_DGELU, 1.0f, 0.0f, BF16},     {0, DSMOE_EPI_NONE, 1.0f, 0.25f, F32},
        {1, DSMOE_EPI_BIAS_GELU, 1.0f, 0.0f, F32}, {0, DSMOE_EPI_DGELU, 0.75f, 0.0f, F32},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        grouped_case(&cases[i]);
}

// ---------------------------------------------------------------------------------------------------
// gemm_grouped_wgrad: groups sharing a weight add in (b_groups < groups), dw and dbias accumulate onto
// what they hold, alpha, counts 0 and across tiles.

static void test_wgrad(void **state) {
    enum { G = 5, BG = 2, MMAX = 300, N = 300, K = 600 };
    static const int32_t counts[G] = {300, 7, 0, 260, 1};
    const size_t dy_stride = (size_t)MMAX * N + 5, x_stride = (size_t)MMAX * K + 9;
    const size_t dw_stride = (size_t)N * K + 3, db_stride = N + 1;
    float *dy = rnd_fill(G * dy_stride, 1.0f), *x = rnd_fill(G * x_stride, 1.0f);
    float *dw0 = rnd_fill(BG * dw_stride, 1.0f), *db0 = rnd_fill(BG * db_stride, 1.0f);
    uint16_t *dyh = to_bf16(dy, G * dy_stride), *xh = to_bf16(x, G * x_stride);
    const float alpha = 0.5f;
    void *ddy = dev_put(C, dyh, G * dy_stride * 2), *dx = dev_put(C, xh, G * x_stride * 2);
    float *ddw = dev_put(C, dw0, BG * dw_stride * 4), *ddb = dev_put(C, db0, BG * db_stride * 4);
    void *dcounts = dev_put(C, counts, sizeof counts);
    dsmoe_grouped_wgrad wg = {.groups = G, .counts = dcounts, .m_max = MMAX, .n = N, .k = K, .alpha = alpha,
                              .dy = ddy, .dy_type = BF16, .dy_stride = dy_stride, .x = dx, .x_type = BF16,
                              .x_stride = x_stride, .dw = ddw, .dw_stride = dw_stride, .b_groups = BG,
                              .dbias = ddb, .dbias_stride = db_stride};
    OK(P->gemm_grouped_wgrad(C, Q, &wg));
    float *dw = malloc(BG * dw_stride * 4), *db = malloc(BG * db_stride * 4);
    dev_get(C, dw, ddw, BG * dw_stride * 4);
    dev_get(C, db, ddb, BG * db_stride * 4);
    double *want = malloc((size_t)N * K * sizeof *want), *tol = malloc((size_t)N * K * sizeof *tol);
    for (int w = 0; w < BG; w++) {
        // roundings in a chain: each group's k = count additions, its alpha and its add into dw
        int steps = 1;
        for (int g = w; g < G; g += BG)
            steps += counts[g] + 2;
        for (int i = 0; i < N; i++)
            for (int j = 0; j < K; j++) {
                double acc = 0, s = 0;
                for (int g = w; g < G; g += BG)
                    for (int r = 0; r < counts[g]; r++) {
                        double p = (double)dy[g * dy_stride + (size_t)r * N + i] * x[g * x_stride + (size_t)r * K + j];
                        acc += p, s += fabs(p);
                    }
                double d0 = dw0[w * dw_stride + (size_t)i * K + j];
                want[(size_t)i * K + j] = d0 + alpha * acc;
                tol[(size_t)i * K + j] = gamma_u(steps) * (fabs(d0) + fabs(alpha) * s);
            }
        char what[64];
        snprintf(what, sizeof what, "gemm_grouped_wgrad dw[%d]", w);
        check_close(what, dw + w * dw_stride, F32, N, K, K, want, tol);
        for (int j = 0; j < N; j++) {
            double acc = 0, s = 0, d0 = db0[w * db_stride + j];
            int rows = 0;
            for (int g = w; g < G; g += BG)
                for (int r = 0; r < counts[g]; r++, rows++)
                    acc += dy[g * dy_stride + (size_t)r * N + j], s += fabs(dy[g * dy_stride + (size_t)r * N + j]);
            want[j] = d0 + acc;
            tol[j] = gamma_u(rows + G + 1) * (fabs(d0) + s);
        }
        snprintf(what, sizeof what, "gemm_grouped_wgrad dbias[%d]", w);
        check_close(what, db + w * db_stride, F32, 1, N, N, want, tol);
        if (dw[w * dw_stride + (size_t)N * K] != dw0[w * dw_stride + (size_t)N * K])
            fail_msg("gemm_grouped_wgrad wrote past dw[%d]", w);
    }
    dev_free(C, ddy), dev_free(C, dx), dev_free(C, ddw), dev_free(C, ddb), dev_free(C, dcounts);
    free(dy), free(x), free(dw0), free(db0), free(dyh), free(xh), free(dw), free(db), free(want), free(tol);
}

// ---------------------------------------------------------------------------------------------------
// Thread independence: gemm (bf16 c), gemm_grouped (bf16 c with bias + GELU) and wgrad (two groups
// per weight) on a 1-thread and a 2-thread context, and the 2-thread one again: the same bits.

typedef struct bits_run {
    uint16_t *c, *gc, *gaux;
    float *dw;
} bits_run;

static bits_run run_all(dsmoe_kernel_ctx *c, const uint16_t *ah, const uint16_t *bh, const float *bias) {
    enum { M = 700, N = 1100, K = 300, G = 4, MMAX = 600 };
    static const int32_t counts[G] = {600, 3, 0, 515};
    dsmoe_kernel_queue *q = P->default_queue(c);
    bits_run r = {malloc((size_t)M * N * 2), malloc((size_t)G * MMAX * N * 2), malloc((size_t)G * MMAX * N * 2),
                  malloc((size_t)G * N * K * 4)};
    void *da = dev_put(c, ah, (size_t)G * MMAX * K * 2), *db = dev_put(c, bh, (size_t)G * K * N * 2);
    void *dc = dev_zeros(c, (size_t)M * N * 2), *dgc = dev_zeros(c, (size_t)G * MMAX * N * 2);
    void *daux = dev_zeros(c, (size_t)G * MMAX * N * 2), *dbias = dev_put(c, bias, (size_t)G * N * 4);
    void *ddw = dev_zeros(c, (size_t)G * N * K * 4), *dcounts = dev_put(c, counts, sizeof counts);
    OKC(c, P->gemm(c, q, 0, 0, M, N, K, 1.0f, da, BF16, K, db, BF16, N, 0.0f, dc, BF16, N));
    dsmoe_grouped_gemm gg = {.groups = G, .counts = dcounts, .m_max = MMAX, .n = N, .k = K, .alpha = 1.0f,
                             .a = da, .a_type = BF16, .lda = K, .a_stride = (size_t)MMAX * K, .b = db, .b_type = BF16,
                             .ldb = N, .b_stride = (size_t)K * N, .b_groups = G, .c = dgc, .c_type = BF16, .ldc = N,
                             .c_stride = (size_t)MMAX * N, .epilogue = DSMOE_EPI_BIAS_GELU, .bias = dbias,
                             .bias_stride = N, .aux = daux};
    OKC(c, P->gemm_grouped(c, q, &gg));
    dsmoe_grouped_wgrad wg = {.groups = G, .counts = dcounts, .m_max = MMAX, .n = N, .k = K, .alpha = 1.0f,
                              .dy = dgc, .dy_type = BF16, .dy_stride = (size_t)MMAX * N, .x = da, .x_type = BF16,
                              .x_stride = (size_t)MMAX * K, .dw = ddw, .dw_stride = (size_t)N * K, .b_groups = 2};
    OKC(c, P->gemm_grouped_wgrad(c, q, &wg));
    dev_get(c, r.c, dc, (size_t)M * N * 2);
    dev_get(c, r.gc, dgc, (size_t)G * MMAX * N * 2);
    dev_get(c, r.gaux, daux, (size_t)G * MMAX * N * 2);
    dev_get(c, r.dw, ddw, (size_t)G * N * K * 4);
    dev_free(c, da), dev_free(c, db), dev_free(c, dc), dev_free(c, dgc), dev_free(c, daux), dev_free(c, dbias);
    dev_free(c, ddw), dev_free(c, dcounts);
    return r;
}

static void same_bits(const char *what, const void *x, const void *y, size_t bytes) {
    if (memcmp(x, y, bytes)) {
        const unsigned char *p = x, *q = y;
        size_t i = 0;
        while (p[i] == q[i])
            i++;
        fail_msg("%s differ (first at byte %zu)", what, i);
    }
}

static void test_thread_independence(void **state) {
    enum { M = 700, N = 1100, K = 300, G = 4, MMAX = 600 };
    size_t na = (size_t)G * MMAX * K, nb = (size_t)G * K * N;
    float *a = rnd_fill(na, 1.0f), *b = rnd_fill(nb, 1.0f), *bias = rnd_fill((size_t)G * N, 1.0f);
    uint16_t *ah = to_bf16(a, na), *bh = to_bf16(b, nb);
    dsmoe_kernel_ctx *c1 = cpt_ctx(1), *c2 = cpt_ctx(2);
    bits_run r1 = run_all(c1, ah, bh, bias), r2 = run_all(c2, ah, bh, bias), r3 = run_all(c2, ah, bh, bias);
    const char *names[2] = {"1 vs 2 threads", "2 threads, run to run"};
    bits_run *other[2] = {&r2, &r3};
    for (int v = 0; v < 2; v++) {
        char what[80];
        const bits_run *x = v ? &r2 : &r1, *y = other[v];
        snprintf(what, sizeof what, "gemm c, %s", names[v]);
        same_bits(what, x->c, y->c, (size_t)M * N * 2);
        snprintf(what, sizeof what, "gemm_grouped c, %s", names[v]);
        same_bits(what, x->gc, y->gc, (size_t)G * MMAX * N * 2);
        snprintf(what, sizeof what, "gemm_grouped aux, %s", names[v]);
        same_bits(what, x->gaux, y->gaux, (size_t)G * MMAX * N * 2);
        snprintf(what, sizeof what, "gemm_grouped_wgrad dw, %s", names[v]);
        same_bits(what, x->dw, y->dw, (size_t)G * N * K * 4);
    }
    bits_run *all[3] = {&r1, &r2, &r3};
    for (int i = 0; i < 3; i++)
        free(all[i]->c), free(all[i]->gc), free(all[i]->gaux), free(all[i]->dw);
    P->finalize(c1);
    P->finalize(c2);
    free(a), free(b), free(bias), free(ah), free(bh);
}

// ---------------------------------------------------------------------------------------------------
// Which path runs: DSMOE_TEST_BF16_PATH = "emulated" (ctest's ONEDNN_MAX_CPU_ISA run) or "auto": oneDNN
// when the plugin was built with it and cpuid shows AVX512_BF16 or AMX-BF16, else emulated. The
// emulated path must also be named as slow in the log.

static char log_seen[1024];
static void log_fn(void *user, dsmoe_log_level level, const char *line) {
    if (level == DSMOE_LOG_WARN)
        snprintf(log_seen, sizeof log_seen, "%s", line);
}

static int cpu_has_bf16_units(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    int amx = (d >> 22) & 1;
    __cpuid_count(7, 1, a, b, c, d);
    return amx || ((a >> 5) & 1);
}

static void test_path(void **state) {
    const char *path = getenv("DSMOE_TEST_BF16_PATH");
    int emulated = (path && !strcmp(path, "emulated")) || !DSMOE_TEST_ONEDNN || !cpu_has_bf16_units();
    static const char *const values[] = {"0", "8", "auto"}; // poison, small_rows, simd
    dsmoe_kernel_options opt = {.threads = 2, .verbose = 1, .log = log_fn, .param_values = values,
                                .n_param_values = 3};
    dsmoe_kernel_ctx *c = NULL;
    char err[256];
    log_seen[0] = '\0';
    if (P->init(&opt, &c, err, sizeof err) != DSMOE_OK)
        fail_msg("init: %s", err);
    const char *d = P->describe(c);
    print_message("describe: %s\n", d);
    if (!strstr(d, "OpenBLAS") || !strstr(d, "for float32"))
        fail_msg("describe() = '%s': expected OpenBLAS named for float32", d);
    if (emulated && (!strstr(d, "bfloat16 GEMMs emulated (slow") || !strstr(log_seen, "emulated (slow")))
        fail_msg("expected the emulated bf16 path named as slow: describe '%s', warning '%s'", d, log_seen);
    if (!emulated && (!strstr(d, "oneDNN") || !strstr(d, "for bfloat16") || log_seen[0]))
        fail_msg("expected oneDNN for bfloat16 GEMMs: describe '%s', warning '%s'", d, log_seen);
    P->finalize(c);
}

static int setup(void **state) { return cpt_load(2); }
static int teardown(void **state) {
    cpt_unload();
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_path),        cmocka_unit_test(test_convert_edges),
        cmocka_unit_test(test_gemm),        cmocka_unit_test(test_gemm_grouped),
        cmocka_unit_test(test_wgrad),       cmocka_unit_test(test_thread_independence),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
