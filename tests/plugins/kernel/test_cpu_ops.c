// tests/plugins/kernel/test_cpu_ops.c: the cpu kernel plugin's table, lifecycle, memory, queues and events, errors
// (immediate and sticky), dtype refusals, plain GEMM, element-wise ops, initialisation and AdamW.
// The plugin is dlopen'ed from the build tree as the core loads it; data moves only through its copy
// members and is read after a synchronize (cpu_plugin_test.h). References: naive loops in double,
// hand-computed AdamW steps and bfloat16 bit patterns, dsmoe_rng_* evaluated here. The GPT layer ops and
// the inference ops are in test_cpu_ops_layers.c, the grouped GEMMs in test_cpu_ops_grouped.c, the
// compute threads (their count, results independent of it, pinning) in test_cpu_threads.c.
// Backward outputs must accumulate: gradient buffers start at GRAD_BASE and the test subtracts it.
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
#include "cpu_plugin_test.h"

#define GRAD_BASE 0.25f
#define F32 DSMOE_FLOAT32

// A host array of n floats equal to v.
static float *const_fill(size_t n, float v) {
    float *f = malloc((n ? n : 1) * sizeof *f);
    for (size_t i = 0; i < n; i++)
        f[i] = v;
    return f;
}

static void expect_error(dsmoe_kernel_ctx *c, dsmoe_status got, dsmoe_status want, const char *needle1,
                         const char *needle2) {
    if (got != want)
        fail_msg("status %s, expected %s (message '%s')", dsmoe_status_name(got), dsmoe_status_name(want),
                 P->last_error(c));
    const char *msg = P->last_error(c);
    if (!strstr(msg, needle1) || (needle2 && !strstr(msg, needle2)))
        fail_msg("message '%s' lacks '%s'%s%s", msg, needle1, needle2 ? " or " : "", needle2 ? needle2 : "");
}

// ---------------------------------------------------------------------------------------------------
// Table, lifecycle

static void test_table(void **state) {
    assert_int_equal(P->api_version, DSMOE_KERNEL_API_VERSION);
    assert_string_equal(P->name, "cpu");
    assert_int_equal(P->mem_kind, DSMOE_MEM_HOST);
    assert_int_equal(P->caps, DSMOE_KCAP_BF16 | DSMOE_KCAP_FUSED_EPILOGUE | DSMOE_KCAP_DETERMINISTIC |
                                  DSMOE_KCAP_HOST_MEMORY | DSMOE_KCAP_INFERENCE | DSMOE_KCAP_DISTILL);
    assert_int_equal(P->dtypes, DSMOE_DTYPE_BIT(DSMOE_FLOAT32) | DSMOE_DTYPE_BIT(DSMOE_BFLOAT16));
    assert_int_equal(P->n_params, 3);
    assert_string_equal(P->params[0].name, "poison");
    assert_int_equal(P->params[0].type, DSMOE_PARAM_BOOL);
    assert_string_equal(P->params[0].default_value, "0");
    assert_string_equal(P->params[1].name, "small_rows");
    assert_int_equal(P->params[1].type, DSMOE_PARAM_INT);
    assert_string_equal(P->params[1].default_value, "8");
    assert_string_equal(P->params[2].name, "simd");
    assert_int_equal(P->params[2].type, DSMOE_PARAM_ENUM);
    assert_string_equal(P->params[2].default_value, "auto");
    assert_string_equal(P->params[2].choices, "auto|avx512|build");
    assert_null(P->device_count);
    assert_null(P->device_pci_bus_id);
    // Every other member from init to the end is required (inference included: DSMOE_KCAP_INFERENCE).
    const char *base = (const char *)P;
    for (size_t off = offsetof(dsmoe_kernel_plugin_v3, init); off < sizeof *P; off += sizeof(void (*)(void))) {
        if (off == offsetof(dsmoe_kernel_plugin_v3, device_pci_bus_id) ||
            off == offsetof(dsmoe_kernel_plugin_v3, device_count))
            continue;
        void (*fn)(void);
        memcpy(&fn, base + off, sizeof fn);
        if (!fn)
            fail_msg("member at offset %zu is NULL", off);
    }
    const char *d = P->describe(C);
    if (!strstr(d, "OpenBLAS") || !strstr(d, "2 OpenMP threads") || !strstr(d, "poisoned"))
        fail_msg("describe() = '%s': expected the BLAS library, '2 OpenMP threads' and the poison setting", d);
    assert_string_equal(P->last_error(C), "");
}

// ---------------------------------------------------------------------------------------------------
// Memory

static void test_memory(void **state) {
    void *a = dev_new(C, 1000, 0), *b = dev_zeros(C, 1000), *z0 = dev_new(C, 0, 0), *z1 = dev_new(C, 0, 0);
    assert_true(z0 && z1 && z0 != z1);
    assert_int_equal((uintptr_t)a % 256, 0);
    assert_int_equal((uintptr_t)b % 256, 0);
    assert_int_equal((uintptr_t)z0 % 256, 0);
    unsigned char host[1000], back[1000];
    dev_get(C, back, b, 1000);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(back[i], 0);
    // Without DSMOE_ALLOC_ZERO the bytes are undefined: this context poisons them, so nothing that
    // forgets the flag can pass by luck.
    dev_get(C, back, a, 1000);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(back[i], 0xFF);
    for (int i = 0; i < 1000; i++)
        host[i] = (unsigned char)(i * 7);
    OK(P->copy_to_device(C, Q, a, host, 1000));
    OK(P->copy(C, Q, b, a, 1000));
    OK(P->zero(C, Q, a, 500));
    dev_get(C, back, b, 1000);
    assert_memory_equal(back, host, 1000);
    dev_get(C, back, a, 1000);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(back[i], i < 500 ? 0 : host[i]);
    void *p = (void *)1;
    assert_int_equal(P->alloc(C, 16, 0x80, &p), DSMOE_ERR_INVALID);
    assert_null(p);
    assert_int_equal(P->copy(C, Q, NULL, a, 8), DSMOE_ERR_INVALID);
    OK(P->copy(C, Q, NULL, NULL, 0));
    void *h;
    OK(P->host_alloc(C, 100, &h));
    assert_int_equal((uintptr_t)h % 64, 0);
    memset(h, 3, 100);
    OK(P->copy_to_device(C, Q, a, h, 100));
    dev_get(C, back, a, 100);
    assert_int_equal(back[99], 3);
    P->host_free(C, h);
    P->host_free(C, NULL);
    P->free(C, NULL);
    dev_free(C, a), dev_free(C, b), dev_free(C, z0), dev_free(C, z1);
}

// 5 rows of 7 floats from a source of pitch 13 floats (from its column 2) to a destination of pitch 9.
static void test_copy_2d(void **state) {
    enum { R = 5, W = 7, SP = 13, DP = 9 };
    float *src = rnd_fill(R * SP, 1), *dst = const_fill(R * DP, -1.0f), got[R * DP];
    float *ds = dev_put(C, src, sizeof(float) * R * SP), *dd = dev_put(C, dst, sizeof(float) * R * DP);
    OK(P->copy_2d(C, Q, dd, DP * sizeof(float), ds + 2, SP * sizeof(float), W * sizeof(float), R));
    dev_get(C, got, dd, sizeof got);
    for (int r = 0; r < R; r++)
        for (int j = 0; j < DP; j++)
            if (got[r * DP + j] != (j < W ? src[r * SP + 2 + j] : -1.0f))
                fail_msg("copy_2d: row %d column %d = %g", r, j, got[r * DP + j]);
    assert_int_equal(P->copy_2d(C, Q, dd, 4, ds, 64, 8, 2), DSMOE_ERR_INVALID); // dpitch < width
    assert_non_null(strstr(P->last_error(C), "dpitch=4"));
    OK(P->copy_2d(C, Q, dd, 64, ds, 64, 8, 0));
    dev_free(C, ds), dev_free(C, dd);
    free(src), free(dst);
}

// ---------------------------------------------------------------------------------------------------
// Queues, events, sizes

static void bump(void *arg) { ++*(int *)arg; }

static void test_queues_events(void **state) {
    assert_non_null(Q);
    assert_ptr_equal(P->default_queue(C), Q);
    assert_null(P->queue_native(C, Q));
    dsmoe_kernel_queue *q2;
    OK(P->queue_create(C, &q2));
    assert_true(q2 && q2 != Q);
    int hits = 0;
    OK(P->queue_enqueue_host(C, q2, bump, &hits));
    OK(P->queue_synchronize(C, q2));
    assert_int_equal(hits, 1);
    // Work on q2, ordered before Q's copy by an event.
    float v = 5.0f, got = 0.0f;
    float *d = dev_put(C, &v, sizeof v);
    dsmoe_kernel_event *ev, *never;
    OK(P->event_create(C, &ev));
    OK(P->event_create(C, &never));
    OK(P->zero(C, q2, d, sizeof v));
    OK(P->event_record(C, ev, q2));
    OK(P->queue_wait_event(C, Q, ev));
    OK(P->copy_to_host(C, Q, &got, d, sizeof got));
    OK(P->event_record(C, ev, Q));
    OK(P->event_synchronize(C, ev));
    assert_true(got == 0.0f);
    int done = 0;
    OK(P->event_query(C, ev, &done));
    assert_int_equal(done, 1);
    done = 0;
    OK(P->event_query(C, never, &done)); // never recorded: complete
    assert_int_equal(done, 1);
    OK(P->synchronize(C));
    // A queue of another context, or none, is refused (and is not a sticky error).
    dsmoe_kernel_ctx *c2 = cpt_ctx(1);
    dsmoe_kernel_queue *q_other = P->default_queue(c2);
    dsmoe_kernel_event *ev_other;
    OKC(c2, P->event_create(c2, &ev_other));
    expect_error(C, P->zero(C, q_other, d, 4), DSMOE_ERR_INVALID, "zero", "not one of this context's queues");
    expect_error(C, P->zero(C, NULL, d, 4), DSMOE_ERR_INVALID, "zero", "NULL");
    expect_error(C, P->event_synchronize(C, ev_other), DSMOE_ERR_INVALID, "event_synchronize", NULL);
    OK(P->synchronize(C));
    dsmoe_kernel_queue *leak;
    OKC(c2, P->queue_create(c2, &leak)); // finalize frees what the caller left
    P->finalize(c2);
    P->event_destroy(C, ev);
    P->event_destroy(C, never);
    P->event_destroy(C, NULL);
    P->queue_destroy(C, q2);
    P->queue_destroy(C, Q); // the default queue is the context's: not destroyed
    assert_ptr_equal(P->default_queue(C), Q);
    OK(P->zero(C, Q, d, 4));
    dev_free(C, d);

    size_t free_b = 0, total_b = 0;
    OK(P->mem_info(C, &free_b, &total_b));
    assert_true(total_b > ((size_t)1 << 20) && free_b > 0 && free_b <= total_b);

    // attention_bytes before init (ctx NULL) and after: the probabilities and the backward's scratch.
    dsmoe_attention_shape sh = {.B = 2, .T = 5, .M = 8, .NH = 2, .dt = F32};
    size_t saved = 0, ws = 0;
    OK(P->attention_bytes(NULL, &sh, &saved, &ws));
    assert_int_equal(saved, 2 * 2 * 5 * 5 * sizeof(float));
    assert_int_equal(ws, 2 * 2 * 5 * 5 * sizeof(float));
    saved = ws = 0;
    OK(P->attention_bytes(C, &sh, &saved, &ws));
    assert_int_equal(saved, 400);
    assert_int_equal(ws, 400);
    sh.NH = 3;
    assert_int_equal(P->attention_bytes(NULL, &sh, &saved, &ws), DSMOE_ERR_INVALID);
    sh.NH = 2, sh.dt = DSMOE_FLOAT16;
    assert_int_equal(P->attention_bytes(NULL, &sh, &saved, &ws), DSMOE_ERR_UNSUPPORTED);
}

// ---------------------------------------------------------------------------------------------------
// Errors: other dtypes refused at once (not sticky); bad data sticky

static void test_dtype_refusal(void **state) {
    const dsmoe_dtype f16 = DSMOE_FLOAT16; // float32 and bfloat16 are taken (test_cpu_bf16.c)
    void *d = dev_zeros(C, 4096);
    int32_t *z = d;
    expect_error(C, P->gemm(C, Q, 0, 0, 2, 2, 2, 1.0f, d, f16, 2, d, F32, 2, 0.0f, d, F32, 2), DSMOE_ERR_UNSUPPORTED,
                 "gemm", "float16");
    expect_error(C, P->gemm(C, Q, 0, 0, 2, 2, 2, 1.0f, d, F32, 2, d, F32, 2, 0.0f, d, DSMOE_FLOAT16, 2),
                 DSMOE_ERR_UNSUPPORTED, "gemm", "float16");
    dsmoe_grouped_gemm g = {.groups = 1, .counts = z, .m_max = 2, .n = 2, .k = 2, .alpha = 1.0f, .a = d, .lda = 2,
                            .b = d, .ldb = 2, .b_groups = 1, .c = d, .c_type = f16, .ldc = 2};
    expect_error(C, P->gemm_grouped(C, Q, &g), DSMOE_ERR_UNSUPPORTED, "gemm_grouped", "float16");
    dsmoe_grouped_wgrad w = {.groups = 1, .counts = z, .m_max = 2, .n = 2, .k = 2, .alpha = 1.0f, .dy = d,
                             .x = d, .x_type = f16, .dw = d, .b_groups = 1};
    expect_error(C, P->gemm_grouped_wgrad(C, Q, &w), DSMOE_ERR_UNSUPPORTED, "gemm_grouped_wgrad", "float16");
    expect_error(C, P->bias_add(C, Q, d, f16, d, 2, 2), DSMOE_ERR_UNSUPPORTED, "bias_add", "float16");
    expect_error(C, P->bias_backward(C, Q, d, d, f16, 2, 2), DSMOE_ERR_UNSUPPORTED, "bias_backward", "float16");
    expect_error(C, P->axpy(C, Q, d, 1.0f, d, f16, 4), DSMOE_ERR_UNSUPPORTED, "axpy", "float16");
    expect_error(C, P->mul_uniform_noise(C, Q, d, d, f16, 4, 0.1f, 1, 0), DSMOE_ERR_UNSUPPORTED, "mul_uniform_noise",
                 "float16");
    expect_error(C, P->all_finite(C, Q, d, f16, 4, z), DSMOE_ERR_UNSUPPORTED, "all_finite", "float16");
    expect_error(C, P->embedding_forward(C, Q, d, f16, z, d, F32, d, NULL, 1, 1, 2, 4, 1), DSMOE_ERR_UNSUPPORTED,
                 "embedding_forward", "float16");
    expect_error(C, P->layernorm_forward(C, Q, d, d, d, d, f16, d, d, 1, 4, 1e-5f), DSMOE_ERR_UNSUPPORTED,
                 "layernorm_forward", "float16");
    expect_error(C, P->gelu_forward(C, Q, d, d, f16, 4), DSMOE_ERR_UNSUPPORTED, "gelu_forward", "float16");
    expect_error(C, P->gelu_backward(C, Q, d, d, d, f16, 4), DSMOE_ERR_UNSUPPORTED, "gelu_backward", "float16");
    dsmoe_attention_shape sh = {.B = 1, .T = 2, .M = 4, .NH = 2, .dt = f16};
    expect_error(C, P->attention_forward(C, Q, d, d, d, &sh), DSMOE_ERR_UNSUPPORTED, "attention_forward", "float16");
    expect_error(C, P->crossentropy_forward(C, Q, d, d, d, f16, z, 1, 4), DSMOE_ERR_UNSUPPORTED,
                 "crossentropy_forward", "float16");
    expect_error(C, P->moe_dispatch(C, Q, d, d, f16, z, z, 1, 1, 1, 1, 4), DSMOE_ERR_UNSUPPORTED, "moe_dispatch",
                 "float16");
    expect_error(C, P->moe_combine(C, Q, d, d, f16, z, z, d, 1, 1, 1, 1, 4), DSMOE_ERR_UNSUPPORTED, "moe_combine",
                 "float16");
    expect_error(C, P->residual_mix_forward(C, Q, d, d, d, d, f16, d, 1, 4), DSMOE_ERR_UNSUPPORTED,
                 "residual_mix_forward", "float16");
    expect_error(C, P->kv_append(C, Q, d, d, d, f16, z, 1, 1, 4, 2, 4), DSMOE_ERR_UNSUPPORTED, "kv_append", "float16");
    expect_error(C, P->attention_cached(C, Q, d, d, d, d, f16, z, 1, 1, 4, 2, 4), DSMOE_ERR_UNSUPPORTED,
                 "attention_cached", "float16");
    dsmoe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    expect_error(C, P->sample(C, Q, z, d, f16, 1, 4, &sp, NULL), DSMOE_ERR_UNSUPPORTED, "sample", "float16");
    expect_error(C, P->convert(C, Q, d, DSMOE_INT32, d, F32, 4), DSMOE_ERR_UNSUPPORTED, "convert", "int32");
    OK(P->synchronize(C)); // refusals are not sticky
    OK(P->zero(C, Q, d, 16));
    dev_free(C, d);
}

// A token out of range is found while running: that call and every later one report it.
static void test_sticky_error(void **state) {
    dsmoe_kernel_ctx *c = cpt_ctx(1);
    dsmoe_kernel_queue *q = P->default_queue(c);
    int32_t tok[4] = {0, 3, 11, 2};
    float *wte = dev_zeros(c, 11 * 4 * sizeof(float)), *wpe = dev_zeros(c, 4 * 4 * sizeof(float));
    float *out = dev_new(c, 16 * sizeof(float), 0);
    int32_t *dtok = dev_put(c, tok, sizeof tok);
    expect_error(c, P->embedding_forward(c, q, out, F32, dtok, wte, F32, wpe, NULL, 1, 4, 4, 11, 4), DSMOE_ERR_INVALID,
                 "embedding_forward", "tokens[2]=11");
    assert_int_equal(P->synchronize(c), DSMOE_ERR_INVALID);
    assert_int_equal(P->queue_synchronize(c, q), DSMOE_ERR_INVALID);
    dsmoe_kernel_event *ev = NULL;
    assert_int_equal(P->event_create(c, &ev), DSMOE_ERR_INVALID);
    assert_int_equal(P->zero(c, q, out, 4), DSMOE_ERR_INVALID);
    assert_int_equal(P->gelu_forward(c, q, out, wte, F32, 4), DSMOE_ERR_INVALID);
    assert_non_null(strstr(P->last_error(c), "tokens[2]=11")); // the first error stays the message
    dev_free(c, wte), dev_free(c, wpe), dev_free(c, out), dev_free(c, dtok);
    P->finalize(c);
}

// ---------------------------------------------------------------------------------------------------
// GEMM against a naive triple loop

// c (m, n) = alpha op(a) op(b) + beta c, in double; a stored (m, k) or (k, m) with lda, likewise b.
static void naive_gemm(int ta, int tb, int m, int n, int k, double alpha, const float *a, int lda, const float *b,
                       int ldb, double beta, const float *c, int ldc, double *out) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int p = 0; p < k; p++)
                s += (double)(ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
            out[i * n + j] = alpha * s + beta * c[i * ldc + j];
        }
}

static void test_gemm(void **state) {
    // The last spans 2x3 tiles; the 1-, 3- and 8-row ones take the dot-product path as NT (small_rows 8),
    // with k a multiple of its 16 lanes and not, and n over several tiles.
    int sizes[6][3] = {{7, 5, 3}, {37, 29, 41}, {300, 517, 33}, {1, 517, 33}, {3, 1000, 16}, {8, 300, 35}};
    for (int sz = 0; sz < 6; sz++)
        for (int t = 0; t < 4; t++) {
            int m = sizes[sz][0], n = sizes[sz][1], k = sizes[sz][2], ta = t >> 1, tb = t & 1;
            int lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2; // padded leading dimensions
            size_t na = (size_t)(ta ? k : m) * lda, nb = (size_t)(tb ? n : k) * ldb, nc = (size_t)m * ldc;
            float *a = rnd_fill(na, 1), *b = rnd_fill(nb, 1), *c = rnd_fill(nc, 1);
            double *want = malloc(sizeof(double) * m * n);
            naive_gemm(ta, tb, m, n, k, 0.7, a, lda, b, ldb, 0.3, c, ldc, want);
            float *da = dev_put(C, a, na * 4), *db = dev_put(C, b, nb * 4), *dc = dev_put(C, c, nc * 4);
            float pad = c[n + 1]; // a padding column must stay untouched
            OK(P->gemm(C, Q, ta, tb, m, n, k, 0.7f, da, F32, lda, db, F32, ldb, 0.3f, dc, F32, ldc));
            dev_get(C, c, dc, nc * 4);
            for (int i = 0; i < m; i++) {
                char what[64];
                snprintf(what, sizeof what, "gemm %c%c %dx%dx%d row %d", ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, i);
                assert_close(what, c + (size_t)i * ldc, want + (size_t)i * n, n, 1e-5, 1e-5);
            }
            assert_true(c[n + 1] == pad);
            free(want), free(a), free(b), free(c);
            dev_free(C, da), dev_free(C, db), dev_free(C, dc);
        }
    float *x = rnd_fill(64, 1), *y = rnd_fill(64, 1), got[64];
    double half[64];
    for (int i = 0; i < 64; i++)
        half[i] = 0.5 * y[i];
    float *dx = dev_put(C, x, 256), *dy = dev_put(C, y, 256);
    OK(P->gemm(C, Q, 0, 0, 8, 8, 0, 1.0f, dx, F32, 1, dx, F32, 8, 0.5f, dy, F32, 8)); // k = 0: c = beta c
    dev_get(C, got, dy, 256);
    assert_close("gemm k=0", got, half, 64, 0, 1e-7);
    expect_error(C, P->gemm(C, Q, 0, 0, 4, 4, 5, 1.0f, dx, F32, 4, dx, F32, 4, 0.0f, dx, F32, 4), DSMOE_ERR_INVALID,
                 "lda=4", NULL);
    free(x), free(y);
    dev_free(C, dx), dev_free(C, dy);
}

// The dot-product path of a few rows (small_rows): beta = 0 does not read c (NaN there stays out), the
// result does not depend on the thread count, and small_rows = 0 (OpenBLAS) agrees within rounding.
static void test_small_rows(void **state) {
    enum { M = 5, N = 700, K = 301 };
    static const char *const blas_only[] = {"1", "0", "auto"};
    dsmoe_kernel_options o0 = {.threads = 2, .param_values = blas_only, .n_param_values = 3};
    dsmoe_kernel_ctx *ctxs[3] = {cpt_ctx(1), cpt_ctx(2), NULL};
    char err[256];
    if (P->init(&o0, &ctxs[2], err, sizeof err) != DSMOE_OK) fail_msg("init with small_rows 0: %s", err);
    float *a = rnd_fill(M * K, 1), *b = rnd_fill(N * K, 1), *got[3];
    double *want = malloc(sizeof(double) * M * N);
    float *nan = const_fill(M * N, NAN);
    float *zero = const_fill(M * N, 0.0f); // the reference's c: 0 * NaN would be NaN
    naive_gemm(0, 1, M, N, K, 1.5, a, K, b, K, 0.0, zero, N, want);
    free(zero);
    for (int i = 0; i < 3; i++) {
        dsmoe_kernel_ctx *c = ctxs[i];
        float *da = dev_put(c, a, M * K * 4), *db = dev_put(c, b, N * K * 4), *dc = dev_put(c, nan, M * N * 4);
        OKC(c, P->gemm(c, P->default_queue(c), 0, 1, M, N, K, 1.5f, da, F32, K, db, F32, K, 0.0f, dc, F32, N));
        got[i] = malloc(M * N * 4);
        dev_get(c, got[i], dc, M * N * 4);
        dev_free(c, da), dev_free(c, db), dev_free(c, dc);
        assert_close(i == 2 ? "small_rows 0" : "small_rows 8", got[i], want, M * N, 1e-5, 1e-5);
    }
    if (memcmp(got[0], got[1], M * N * 4)) fail_msg("the dot-product path differs between 1 and 2 threads");
    for (int i = 0; i < 3; i++) {
        free(got[i]);
        P->finalize(ctxs[i]);
    }
    free(a), free(b), free(want), free(nan);
}

// ---------------------------------------------------------------------------------------------------
// Element-wise and small ops

static void test_bias(void **state) {
    enum { R = 37, N = 130 }; // 130 columns: two full chunks of 64 and a partial one
    float *out = rnd_fill(R * N, 1), *bias = rnd_fill(N, 1), *db = const_fill(N, GRAD_BASE);
    double want[R * N], wantb[N];
    for (int j = 0; j < N; j++) {
        wantb[j] = GRAD_BASE;
        for (int r = 0; r < R; r++) {
            want[r * N + j] = out[r * N + j] + bias[j];
            wantb[j] += out[r * N + j];
        }
    }
    float *dout = dev_put(C, out, sizeof(float) * R * N), *dbias = dev_put(C, bias, N * 4);
    float *ddb = dev_put(C, db, N * 4);
    OK(P->bias_backward(C, Q, ddb, dout, F32, R, N));
    OK(P->bias_add(C, Q, dout, F32, dbias, R, N));
    dev_get(C, out, dout, sizeof(float) * R * N);
    dev_get(C, db, ddb, N * 4);
    assert_close("bias_add", out, want, R * N, 1e-7, 1e-6);
    assert_close("bias_backward", db, wantb, N, 1e-5, 1e-5);
    free(out), free(bias), free(db);
    dev_free(C, dout), dev_free(C, dbias), dev_free(C, ddb);
}

static void test_vector_ops(void **state) {
    enum { N = 100003 };
    float *x = rnd_fill(N, 1), *y = rnd_fill(N, 1);
    double *want = malloc(N * sizeof *want), ss = 0;
    for (int i = 0; i < N; i++) {
        want[i] = y[i] - 0.5 * x[i];
        ss += (double)x[i] * x[i];
    }
    float *dx = dev_put(C, x, N * 4), *dy = dev_put(C, y, N * 4);
    OK(P->axpy(C, Q, dy, -0.5f, dx, F32, N));
    dev_get(C, y, dy, N * 4);
    assert_close("axpy", y, want, N, 1e-6, 1e-6);
    double got, *dss = dev_new(C, sizeof(double), 0);
    OK(P->sum_squares(C, Q, dx, N, dss));
    dev_get(C, &got, dss, sizeof got);
    assert_true(fabs(got - ss) <= 1e-12 * ss);
    OK(P->sum_squares(C, Q, dx, 0, dss));
    dev_get(C, &got, dss, sizeof got);
    assert_true(got == 0.0);
    int32_t fin, *dfin = dev_new(C, sizeof(int32_t), 0);
    OK(P->all_finite(C, Q, dx, F32, N, dfin));
    dev_get(C, &fin, dfin, sizeof fin);
    assert_int_equal(fin, 1);
    float bad[3] = {INFINITY, -INFINITY, NAN};
    for (int k = 0; k < 3; k++) {
        size_t at = N - 17 * k - 1;
        OK(P->copy_to_device(C, Q, dx + at, &bad[k], sizeof(float)));
        OK(P->all_finite(C, Q, dx, F32, N, dfin));
        dev_get(C, &fin, dfin, sizeof fin);
        assert_int_equal(fin, 0);
        OK(P->copy_to_device(C, Q, dx + at, &x[at], sizeof(float)));
    }
    float big = 3.4e38f; // large but finite
    OK(P->copy_to_device(C, Q, dx, &big, sizeof big));
    OK(P->all_finite(C, Q, dx, F32, N, dfin));
    dev_get(C, &fin, dfin, sizeof fin);
    assert_int_equal(fin, 1);
    free(want), free(x), free(y);
    dev_free(C, dx), dev_free(C, dy), dev_free(C, dss), dev_free(C, dfin);
}

static void test_uniform_noise(void **state) {
    enum { N = 5000 };
    const float eps = 0.1f;
    float *in = rnd_fill(N, 1), *a = malloc(N * 4), *b = malloc(N * 4), *s = malloc(N * 4);
    float *din = dev_put(C, in, N * 4), *da = dev_new(C, N * 4, 0), *db = dev_new(C, N * 4, 0);
    float *ds = dev_new(C, N * 4, 0);
    OK(P->mul_uniform_noise(C, Q, da, din, F32, N, eps, 42, 1000));
    OK(P->mul_uniform_noise(C, Q, db, din, F32, N, eps, 42, 1000));
    OK(P->mul_uniform_noise(C, Q, ds, din, F32, N, eps, 42, 1001)); // the stream shifted by one
    dev_get(C, a, da, N * 4), dev_get(C, b, db, N * 4), dev_get(C, s, ds, N * 4);
    assert_memory_equal(a, b, N * sizeof(float));
    assert_true(memcmp(a, s, N * sizeof(float)) != 0);
    double lo = 2, hi = 0;
    for (int i = 0; i < N; i++) {
        double u = (double)a[i] / in[i];
        assert_true(u >= 1 - eps - 1e-6 && u <= 1 + eps + 1e-6);
        lo = fmin(lo, u);
        hi = fmax(hi, u);
        // the plugin may contract to FMAs: equal to the formula within float rounding
        double want = in[i] * (1.0 - eps + 2.0 * eps * dsmoe_rng_uniform(42, 1000 + (uint64_t)i));
        double shifted = in[i] * (1.0 - eps + 2.0 * eps * dsmoe_rng_uniform(42, 1001 + (uint64_t)i));
        assert_true(fabs(a[i] - want) <= 2.5e-7 * fabs(want));
        assert_true(fabs(s[i] - shifted) <= 2.5e-7 * fabs(shifted));
    }
    assert_true(lo < 1 - 0.9 * eps && hi > 1 + 0.9 * eps); // the whole range is used
    OK(P->mul_uniform_noise(C, Q, db, din, F32, N, eps, 43, 1000));
    dev_get(C, b, db, N * 4);
    assert_true(memcmp(a, b, N * sizeof(float)) != 0);
    OK(P->mul_uniform_noise(C, Q, din, din, F32, N, 0.0f, 7, 0)); // eps = 0 is the identity, in place
    dev_get(C, b, din, N * 4);
    assert_memory_equal(b, in, N * sizeof(float));
    free(in), free(a), free(b), free(s);
    dev_free(C, din), dev_free(C, da), dev_free(C, db), dev_free(C, ds);
}

// Two AdamW steps worked by hand, with betas exact in float (0.875, 0.96875), lr 0.1, eps 1e-8,
// weight decay 0.01, grad scale 0.5.
// element 0: p = 1, grads 2 then -1 (scaled: 1, -0.5).
//   t=1: m = 0.125, v = 0.03125, mhat = vhat = 1, p = 1 - 0.1 (1/(1+1e-8) + 0.01) = 0.899000001
//   t=2: m = 0.109375 - 0.0625 = 0.046875, v = 0.0302734375 + 0.0078125 = 0.0380859375,
//        mhat = 0.046875 / (1 - 0.875^2) = 0.2, vhat = 0.0380859375 / (1 - 0.96875^2) = 0.619047619,
//        p = 0.899000001 - 0.1 (0.2 / (0.786795792 + 1e-8) + 0.00899000001) = 0.87268144495
// element 1: p = -2, grads 0: only decay, p = -2 (1 - 0.001) = -1.998, then -1.996002.
// A second tensor of the same list without decay stays at -2; an empty third one is skipped.
static void test_adamw(void **state) {
    float h[2] = {1.0f, -2.0f}, g0[2] = {2.0f, 0.0f}, nd = -2.0f, zero2[2] = {0, 0}, got[2];
    float *p = dev_put(C, h, 8), *g = dev_put(C, g0, 8), *m = dev_zeros(C, 8), *v = dev_zeros(C, 8);
    float *p2 = dev_put(C, &nd, 4), *g2 = dev_put(C, zero2, 4), *m2 = dev_zeros(C, 4), *v2 = dev_zeros(C, 4);
    dsmoe_adamw_tensor list[3] = {{p, g, m, v, 2, 0.01f}, {p2, g2, m2, v2, 1, 0.0f}, {NULL, NULL, NULL, NULL, 0, 0.5f}};
    dsmoe_adamw_params hp = {.lr = 0.1f, .beta1 = 0.875f, .beta2 = 0.96875f, .eps = 1e-8f, .grad_scale = 0.5f, .t = 1};
    OK(P->adamw(C, Q, &hp, list, 3));
    double want1[2] = {0.899000001, -1.998}, m1[2] = {0.125, 0}, v1[2] = {0.03125, 0};
    dev_get(C, got, p, 8);
    assert_close("adamw p t=1", got, want1, 2, 0, 2e-7);
    dev_get(C, got, m, 8);
    assert_close("adamw m t=1", got, m1, 2, 0, 1e-7);
    dev_get(C, got, v, 8);
    assert_close("adamw v t=1", got, v1, 2, 0, 1e-7);
    float gneg = -1.0f;
    OK(P->copy_to_device(C, Q, g, &gneg, 4));
    hp.t = 2;
    OK(P->adamw(C, Q, &hp, list, 3));
    double want2[2] = {0.87268144495, -1.996002}, mw2[2] = {0.046875, 0}, vw2[2] = {0.0380859375, 0};
    dev_get(C, got, p, 8);
    assert_close("adamw p t=2", got, want2, 2, 0, 2e-7);
    dev_get(C, got, m, 8);
    assert_close("adamw m t=2", got, mw2, 2, 0, 1e-7);
    dev_get(C, got, v, 8);
    assert_close("adamw v t=2", got, vw2, 2, 0, 1e-7);
    dev_get(C, got, p2, 4);
    assert_true(got[0] == -2.0f);
    hp.t = 0;
    expect_error(C, P->adamw(C, Q, &hp, list, 3), DSMOE_ERR_INVALID, "t=0", NULL);
    hp.t = 3;
    OK(P->adamw(C, Q, &hp, NULL, 0)); // an empty list
    dev_free(C, p), dev_free(C, g), dev_free(C, m), dev_free(C, v);
    dev_free(C, p2), dev_free(C, g2), dev_free(C, m2), dev_free(C, v2);
}

// dst[i] = std * dsmoe_rng_normal(key, offset + i) (rng.h is the specification), or the constant.
static void test_init_tensor(void **state) {
    enum { N = 20001 };
    float *got = malloc(N * 4), *d = dev_new(C, N * 4, 0);
    dsmoe_init_params ip = {.key = 77, .offset = 5000, .std = 0.02f};
    OK(P->init_tensor(C, Q, d, N, &ip));
    dev_get(C, got, d, N * 4);
    double mean = 0, var = 0;
    for (int i = 0; i < N; i++) {
        double want = 0.02 * (double)dsmoe_rng_normal(77, 5000 + (uint64_t)i);
        assert_true(fabs(got[i] - want) <= 1e-7 * fabs(want));
        mean += got[i] / N;
        var += (double)got[i] * got[i] / N;
    }
    assert_true(fabs(mean) < 1e-3 && fabs(sqrt(var) - 0.02) < 1e-3); // a normal of that spread
    ip = (dsmoe_init_params){.std = 0.0f, .value = 1.5f};
    OK(P->init_tensor(C, Q, d, N, &ip));
    dev_get(C, got, d, N * 4);
    for (int i = 0; i < N; i++)
        assert_true(got[i] == 1.5f);
    ip.std = -1.0f;
    expect_error(C, P->init_tensor(C, Q, d, N, &ip), DSMOE_ERR_INVALID, "init_tensor", "std=-1");
    free(got);
    dev_free(C, d);
}

// bfloat16 bit patterns worked by hand: round to nearest, ties to even, NaN kept.
static void test_convert(void **state) {
    uint32_t in_bits[8] = {0x3F800000u, 0x3F808000u, 0x3F818000u, 0x3F808010u, 0xC0200000u, 0x7F7FFFFFu,
                           0xFF800000u, 0x7FC00001u};
    // 1, 1+2^-8 (tie: even 1), 1+3*2^-8 (tie: even 1+2^-6), just above a tie, -2.5, FLT_MAX (to Inf),
    // -Inf, NaN
    uint16_t want[8] = {0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F80, 0xFF80, 0};
    float in[8], back[8];
    memcpy(in, in_bits, sizeof in);
    uint16_t got[8];
    float *din = dev_put(C, in, sizeof in), *dback = dev_new(C, sizeof back, 0);
    uint16_t *dbf = dev_new(C, sizeof got, 0);
    OK(P->convert(C, Q, dbf, DSMOE_BFLOAT16, din, F32, 8));
    OK(P->convert(C, Q, dback, F32, dbf, DSMOE_BFLOAT16, 8));
    dev_get(C, got, dbf, sizeof got);
    dev_get(C, back, dback, sizeof back);
    for (int i = 0; i < 7; i++)
        if (got[i] != want[i])
            fail_msg("convert to bfloat16: 0x%08x gave 0x%04x, expected 0x%04x", in_bits[i], got[i], want[i]);
    assert_true((got[7] & 0x7F80) == 0x7F80 && (got[7] & 0x7F) != 0); // NaN stays NaN
    assert_true(isnan(back[7]));
    for (int i = 0; i < 7; i++) {
        uint32_t b = (uint32_t)want[i] << 16;
        assert_memory_equal(&back[i], &b, 4);
    }
    OK(P->convert(C, Q, dback, F32, din, F32, 3)); // float32 to float32 is a copy
    dev_get(C, back, dback, 3 * sizeof(float));
    assert_memory_equal(back, in, 3 * sizeof(float));
    OK(P->convert(C, Q, dback, F32, dbf, DSMOE_BFLOAT16, 0));
    dev_free(C, din), dev_free(C, dback), dev_free(C, dbf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_memory),
        cmocka_unit_test(test_copy_2d),
        cmocka_unit_test(test_queues_events),
        cmocka_unit_test(test_dtype_refusal),
        cmocka_unit_test(test_sticky_error),
        cmocka_unit_test(test_gemm),
        cmocka_unit_test(test_small_rows),
        cmocka_unit_test(test_bias),
        cmocka_unit_test(test_vector_ops),
        cmocka_unit_test(test_uniform_noise),
        cmocka_unit_test(test_adamw),
        cmocka_unit_test(test_init_tensor),
        cmocka_unit_test(test_convert),
    };
    if (cpt_load(2) != 0) {
        fprintf(stderr, "test_cpu_ops: cannot load or initialise the cpu plugin %s\n", CPT_PLUGIN_FILE);
        return 1;
    }
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    cpt_unload();
    return rc;
}
