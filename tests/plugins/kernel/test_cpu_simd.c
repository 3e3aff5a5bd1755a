// tests/plugins/kernel/test_cpu_simd.c: the cpu plugin's `simd` setting (plugins/cpu/cpu_vec.c). The GELU
// kernels in the build's vectors and in AVX-512 give the same bits in every op and GEMM epilogue that
// uses them (gelu_forward in and out of place, gelu_backward, gemm_grouped's BIAS_GELU and DGELU with
// float32 and bfloat16 c), on random values and on the edge cases (signed zeros, subnormals, the
// saturated tails, infinities, NaN); the fused epilogues give gelu_forward's and gelu_backward's bits
// in each variant; the results agree with GELU in double precision; describe() names the variant; and
// simd = avx512 is refused with the setting's name on a CPU without AVX-512.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "cpu_plugin_test.h"

#define F32 DSMOE_FLOAT32
#define BF16 DSMOE_BFLOAT16

static int have_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

// NV values: the edge cases, then uniform in [-12, 12) (past both tails of tanh), then small ones.
// NV is not a multiple of a vector or of the op's blocks, so every loop runs its remainder too.
enum { NV = 3 * 4096 + 77 };
static float *inputs(void) {
    static const float edge[] = {0.0f, -0.0f, 1e-40f, -1e-40f, 1e-30f, -1e-30f, 5.0f, -5.0f, 9.0f, -9.0f,
                                 10.5f, -10.5f, 20.0f, -20.0f, 87.0f, -87.0f, 1e30f, -1e30f, INFINITY, -INFINITY,
                                 NAN};
    float *v = rnd_fill(NV, 12.0f);
    memcpy(v, edge, sizeof edge);
    for (size_t i = NV - 1000; i < NV; i++)
        v[i] *= 1e-3f;
    return v;
}

// What one context computes, on the host.
typedef struct results {
    float *fwd, *fwd_inplace, *bwd;             // (NV) each
    float *c_gelu, *aux_gelu, *c_dgelu, *prod;  // (G, MM, NN) float32 grouped GEMM
    uint16_t *c_gelu16, *aux_gelu16, *c_dgelu16; // the same in bfloat16
} results;

// Grouped GEMMs: G groups over G weights, the second with fewer rows than m_max, k past a few vectors.
enum { G = 2, MM = 40, NN = 300, KK = 24 };
static const int32_t counts[G] = {MM, MM - 7};

static void grouped(dsmoe_kernel_ctx *c, dsmoe_dtype dt, dsmoe_epilogue epi, const void *a, const void *b,
                    const float *bias, void *aux, void *out) {
    size_t es = dt == BF16 ? 2 : 4, cs = (size_t)MM * NN;
    void *da = dev_put(c, a, G * (size_t)MM * KK * es), *db = dev_put(c, b, G * (size_t)NN * KK * es);
    void *dc = dev_zeros(c, G * cs * es), *daux = dev_put(c, aux, G * cs * es);
    float *dbias = dev_put(c, bias, G * NN * 4);
    int32_t *dm = dev_put(c, counts, sizeof counts);
    dsmoe_grouped_gemm g = {.groups = G, .counts = dm, .m_max = MM, .n = NN, .k = KK, .alpha = 1.0f, .beta = 0.0f,
                            .a = da, .a_type = dt, .lda = KK, .a_stride = (size_t)MM * KK, .b = db, .b_type = dt,
                            .ldb = KK, .b_stride = (size_t)NN * KK, .b_groups = G, .trans_b = 1, .c = dc,
                            .c_type = dt, .ldc = NN, .c_stride = cs, .epilogue = epi, .bias = dbias,
                            .bias_stride = NN, .aux = daux};
    OKC(c, P->gemm_grouped(c, P->default_queue(c), &g));
    dev_get(c, out, dc, G * cs * es);
    if (epi == DSMOE_EPI_BIAS_GELU)
        dev_get(c, aux, daux, G * cs * es);
    dev_free(c, da), dev_free(c, db), dev_free(c, dc), dev_free(c, daux), dev_free(c, dbias), dev_free(c, dm);
}

static uint16_t *to_bf16(const float *f, size_t n) { // truncation: any bfloat16 values will do
    uint16_t *h = malloc(n * 2);
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &f[i], 4);
        h[i] = (uint16_t)(u >> 16);
    }
    return h;
}

static void run(dsmoe_kernel_ctx *c, const float *v, const float *dv, results *r) {
    dsmoe_kernel_queue *q = P->default_queue(c);
    size_t bytes = NV * 4, cs = (size_t)G * MM * NN;
    float *din = dev_put(c, v, bytes), *dd = dev_put(c, dv, bytes), *dout = dev_new(c, bytes, 0);
    r->fwd = malloc(bytes), r->fwd_inplace = malloc(bytes), r->bwd = malloc(bytes);
    OKC(c, P->gelu_forward(c, q, dout, din, F32, NV));
    dev_get(c, r->fwd, dout, bytes);
    float *acc = dev_put(c, dv, bytes); // gelu_backward accumulates: din += gelu'(x) * dout
    OKC(c, P->gelu_backward(c, q, acc, din, dd, F32, NV));
    dev_get(c, r->bwd, acc, bytes);
    OKC(c, P->gelu_forward(c, q, din, din, F32, NV));
    dev_get(c, r->fwd_inplace, din, bytes);
    dev_free(c, din), dev_free(c, dd), dev_free(c, dout), dev_free(c, acc);

    // Operands from the values (the edge cases land in the bias, so the pre-activations hold them).
    cpt_rng_state = 99;
    float *a = rnd_fill((size_t)G * MM * KK, 1.0f), *b = rnd_fill((size_t)G * NN * KK, 0.5f);
    float *bias = malloc(G * NN * 4), *aux_in = malloc(cs * 4);
    for (size_t j = 0; j < (size_t)G * NN; j++)
        bias[j] = v[(j * 7) % NV];
    for (size_t i = 0; i < cs; i++)
        aux_in[i] = v[(i * 13) % NV];
    r->c_gelu = malloc(cs * 4), r->aux_gelu = malloc(cs * 4), r->c_dgelu = malloc(cs * 4), r->prod = malloc(cs * 4);
    float *nobias = calloc(G * NN, 4);
    grouped(c, F32, DSMOE_EPI_NONE, a, b, nobias, aux_in, r->prod);
    memcpy(r->aux_gelu, aux_in, cs * 4);
    grouped(c, F32, DSMOE_EPI_BIAS_GELU, a, b, bias, r->aux_gelu, r->c_gelu);
    float *aux_copy = malloc(cs * 4);
    memcpy(aux_copy, aux_in, cs * 4);
    grouped(c, F32, DSMOE_EPI_DGELU, a, b, bias, aux_copy, r->c_dgelu);

    uint16_t *a16 = to_bf16(a, (size_t)G * MM * KK), *b16 = to_bf16(b, (size_t)G * NN * KK);
    r->aux_gelu16 = to_bf16(aux_in, cs), r->c_gelu16 = malloc(cs * 2), r->c_dgelu16 = malloc(cs * 2);
    uint16_t *aux16 = to_bf16(aux_in, cs);
    grouped(c, BF16, DSMOE_EPI_BIAS_GELU, a16, b16, bias, r->aux_gelu16, r->c_gelu16);
    grouped(c, BF16, DSMOE_EPI_DGELU, a16, b16, bias, aux16, r->c_dgelu16);
    free(a), free(b), free(bias), free(aux_in), free(nobias), free(aux_copy), free(a16), free(b16), free(aux16);
}

static void free_results(results *r) {
    free(r->fwd), free(r->fwd_inplace), free(r->bwd), free(r->c_gelu), free(r->aux_gelu), free(r->c_dgelu);
    free(r->prod), free(r->c_gelu16), free(r->aux_gelu16), free(r->c_dgelu16);
}

// Rows below the counts of a (G, MM, NN) result: the part the epilogue wrote.
static void same_rows(const char *what, const void *x, const void *y, size_t es) {
    for (int g = 0; g < G; g++) {
        size_t off = (size_t)g * MM * NN * es, len = (size_t)counts[g] * NN * es;
        if (memcmp((const char *)x + off, (const char *)y + off, len))
            fail_msg("%s: group %d differs", what, g);
    }
}

static void same(const char *what, const void *x, const void *y, size_t bytes) {
    if (memcmp(x, y, bytes)) {
        for (size_t i = 0; i < bytes / 4; i++)
            if (memcmp((const float *)x + i, (const float *)y + i, 4))
                fail_msg("%s: element %zu: %.9g against %.9g", what, i, ((const float *)x)[i], ((const float *)y)[i]);
        fail_msg("%s differs", what);
    }
}

// Within one context: the op's results against double precision, and the fused epilogues against the ops.
static void check_one(const char *name, dsmoe_kernel_ctx *c, const float *v, const float *dv, const results *r) {
    double *want = malloc(sizeof(double) * NV), *want_b = malloc(sizeof(double) * NV);
    float *fin_f = malloc(NV * 4), *fin_b = malloc(NV * 4);
    size_t nf = 0;
    for (size_t i = 0; i < NV; i++)
        if (isfinite(v[i]) && fabsf(v[i]) < 100.0f) { // the cube of larger ones leaves float's range
            want[nf] = gelu_d(v[i]), want_b[nf] = dv[i] + gelu_grad_d(v[i]) * dv[i];
            fin_f[nf] = r->fwd[i], fin_b[nf] = r->bwd[i];
            nf++;
        }
    char what[96];
    snprintf(what, sizeof what, "%s: gelu_forward", name);
    assert_close(what, fin_f, want, nf, 1e-6, 1e-5);
    snprintf(what, sizeof what, "%s: gelu_backward", name);
    assert_close(what, fin_b, want_b, nf, 1e-6, 1e-5);
    snprintf(what, sizeof what, "%s: gelu_forward in place", name);
    same(what, r->fwd, r->fwd_inplace, NV * 4);
    free(want), free(want_b), free(fin_f), free(fin_b);

    // BIAS_GELU's c is gelu_forward of the aux it wrote; DGELU's c is gelu_backward's 0 + gelu'(aux) * prod.
    size_t cs = (size_t)G * MM * NN;
    dsmoe_kernel_queue *q = P->default_queue(c);
    float *daux = dev_put(c, r->aux_gelu, cs * 4), *dout = dev_new(c, cs * 4, 0), *host = malloc(cs * 4);
    OKC(c, P->gelu_forward(c, q, dout, daux, F32, cs));
    dev_get(c, host, dout, cs * 4);
    snprintf(what, sizeof what, "%s: BIAS_GELU epilogue against gelu_forward", name);
    same_rows(what, r->c_gelu, host, 4);
    float *aux_in = malloc(cs * 4);
    for (size_t i = 0; i < cs; i++)
        aux_in[i] = v[(i * 13) % NV];
    float *dx = dev_put(c, aux_in, cs * 4), *dprod = dev_put(c, r->prod, cs * 4), *dacc = dev_zeros(c, cs * 4);
    OKC(c, P->gelu_backward(c, q, dacc, dx, dprod, F32, cs));
    dev_get(c, host, dacc, cs * 4);
    snprintf(what, sizeof what, "%s: DGELU epilogue against gelu_backward", name);
    same_rows(what, r->c_dgelu, host, 4);
    dev_free(c, daux), dev_free(c, dout), dev_free(c, dx), dev_free(c, dprod), dev_free(c, dacc);
    free(host), free(aux_in);
}

static void test_simd_same_bits(void **state) {
    (void)state;
    dsmoe_kernel_ctx *build = cpt_ctx_simd(2, "build");
    const char *d = P->describe(build);
    if (!strstr(d, "GELU on the build's vectors"))
        fail_msg("describe() with simd = build: '%s'", d);
    if (!have_avx512()) {
        char err[256];
        const char *values[] = {"1", "8", "avx512"};
        dsmoe_kernel_options opt = {.threads = 1, .param_values = values, .n_param_values = 3};
        dsmoe_kernel_ctx *c = NULL;
        assert_int_equal(P->init(&opt, &c, err, sizeof err), DSMOE_ERR_INVALID);
        assert_null(c);
        assert_non_null(strstr(err, "simd='avx512'"));
        P->finalize(build);
        skip(); // no second variant to compare on this CPU
    }
    dsmoe_kernel_ctx *wide = cpt_ctx_simd(2, "avx512"), *autoc = cpt_ctx_simd(1, "auto");
    d = P->describe(wide);
    if (!strstr(d, "GELU on AVX-512 vectors"))
        fail_msg("describe() with simd = avx512: '%s'", d);
    d = P->describe(autoc);
    if (!strstr(d, "GELU on AVX-512 vectors"))
        fail_msg("describe() with simd = auto on a CPU with AVX-512: '%s'", d);
    P->finalize(autoc);

    cpt_rng_state = 7;
    float *v = inputs(), *dv = rnd_fill(NV, 2.0f);
    results rb, rw;
    run(build, v, dv, &rb);
    run(wide, v, dv, &rw);
    check_one("build", build, v, dv, &rb);
    check_one("avx512", wide, v, dv, &rw);
    size_t cs = (size_t)G * MM * NN;
    same("gelu_forward: build against avx512", rb.fwd, rw.fwd, NV * 4);
    same("gelu_backward: build against avx512", rb.bwd, rw.bwd, NV * 4);
    same_rows("float32 BIAS_GELU c: build against avx512", rb.c_gelu, rw.c_gelu, 4);
    same_rows("float32 BIAS_GELU aux: build against avx512", rb.aux_gelu, rw.aux_gelu, 4);
    same_rows("float32 DGELU c: build against avx512", rb.c_dgelu, rw.c_dgelu, 4);
    same_rows("bfloat16 BIAS_GELU c: build against avx512", rb.c_gelu16, rw.c_gelu16, 2);
    same_rows("bfloat16 BIAS_GELU aux: build against avx512", rb.aux_gelu16, rw.aux_gelu16, 2);
    same_rows("bfloat16 DGELU c: build against avx512", rb.c_dgelu16, rw.c_dgelu16, 2);
    // the check can fail: the values it compares are not all equal to begin with
    int distinct = 0;
    for (size_t i = 1; i < cs && !distinct; i++)
        distinct = rb.c_gelu16[i] != rb.c_gelu16[0];
    assert_true(distinct);
    free_results(&rb), free_results(&rw);
    free(v), free(dv);
    P->finalize(build), P->finalize(wide);
}

static int setup(void **state) {
    (void)state;
    return cpt_load(2);
}

static int teardown(void **state) {
    (void)state;
    cpt_unload();
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_simd_same_bits),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
