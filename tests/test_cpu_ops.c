// tests/test_cpu_ops.c: the dense ops of the cpu kernel plugin against independent references.
// The plugin is dlopen'ed from the build tree, as the core loads it. References: naive loops in double
// (GEMM, layer norm, attention, cross-entropy, mixes), central finite differences for every backward
// (loss = sum(out * w) for a fixed random w, computed in double), hand-computed AdamW steps, and
// bitwise comparison of a 1-thread and a 2-thread context for the reductions.
// Backward outputs must accumulate: gradient buffers start at GRAD_BASE and the test subtracts it.
#define _GNU_SOURCE // sched_getaffinity, CPU_*
#include <dlfcn.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "dsmoe/kernel_plugin.h"
#include "dsmoe/rng.h"

#define PLUGIN_FILE DSMOE_BUILD_PLUGIN_DIRS "/libdsmoe_kernel_cpu.so"
#define GRAD_BASE 0.25f

static void *dl;
static const dsmoe_kernel_plugin_v1 *P;
static dsmoe_kernel_ctx *C; // 2 threads, so the parallel paths run

#define OK(call)                                                                                   \
    do {                                                                                           \
        dsmoe_status ok_s_ = (call);                                                               \
        if (ok_s_ != DSMOE_OK)                                                                     \
            fail_msg("%s failed: %s: %s", #call, dsmoe_status_name(ok_s_), P->last_error(C));      \
    } while (0)

// Frees plugin buffers.
#define FREE_ALL(...)                                                                              \
    do {                                                                                           \
        float *fa_[] = {__VA_ARGS__};                                                              \
        for (size_t i_ = 0; i_ < sizeof fa_ / sizeof *fa_; i_++)                                   \
            P->free(C, fa_[i_]);                                                                   \
    } while (0)

// ---------------------------------------------------------------------------------------------------
// Helpers

static uint64_t rng_state = 12345;
static float rnd(void) { // uniform in [-1, 1)
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(rng_state >> 40) / 8388608.0f - 1.0f;
}

static float *fbuf(size_t n, float fill_random) { // plugin buffer; random if fill_random, else zero
    void *p;
    if (P->alloc(C, n * sizeof(float), &p) != DSMOE_OK)
        fail_msg("alloc %zu floats: %s", n, P->last_error(C));
    float *f = p;
    if (fill_random)
        for (size_t i = 0; i < n; i++)
            f[i] = rnd();
    return f;
}

static float *gbuf(size_t n) { // gradient buffer starting at GRAD_BASE
    float *f = fbuf(n, 0);
    for (size_t i = 0; i < n; i++)
        f[i] = GRAD_BASE;
    return f;
}

static void assert_close(const char *what, const float *got, const double *want, size_t n, double atol, double rtol) {
    double worst = 0;
    size_t wi = 0;
    for (size_t i = 0; i < n; i++) {
        double diff = fabs(got[i] - want[i]), err = diff == 0 ? 0 : diff / (atol + rtol * fabs(want[i]));
        if (!(err <= worst)) { // catches NaN
            worst = err;
            wi = i;
        }
    }
    if (!(worst <= 1.0))
        fail_msg("%s: element %zu is %.9g, expected %.9g (tolerance %g + %g*|expected|)", what, wi, got[wi], want[wi],
                 atol, rtol);
}

// Finite differences: for each x[i], (loss(x + h) - loss(x - h)) / 2h against the analytic gradient
// (grad - GRAD_BASE). Float forwards limit the agreement to about 5e-5 here (tolerance 2e-4 + 1e-3
// relative); a wrong formula is off by the size of the gradient.
typedef double (*loss_fn)(void);
static void check_grad(const char *what, float *x, const float *grad, size_t n, loss_fn loss) {
    const double h = 1e-2;
    double *num = malloc(n * sizeof *num);
    float *ana = malloc(n * sizeof *ana);
    double maxabs = 0;
    for (size_t i = 0; i < n; i++) {
        float save = x[i];
        x[i] = save + (float)h;
        double lp = loss();
        x[i] = save - (float)h;
        double lm = loss();
        x[i] = save;
        num[i] = (lp - lm) / (2 * h);
        ana[i] = grad[i] - GRAD_BASE;
        maxabs = fmax(maxabs, fabs(num[i]));
    }
    if (maxabs < 1e-3)
        fail_msg("%s: the gradient is all (near) zero: the check would prove nothing", what);
    assert_close(what, ana, num, n, 2e-4, 1e-3);
    free(num);
    free(ana);
}

static double dot_d(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

// ---------------------------------------------------------------------------------------------------
// Setup, table, lifecycle, memory

static int setup(void **state) {
    dl = dlopen(PLUGIN_FILE, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        fprintf(stderr, "cannot load %s: %s\n", PLUGIN_FILE, dlerror());
        return -1;
    }
    dsmoe_kernel_plugin_entry_fn entry = (dsmoe_kernel_plugin_entry_fn)dlsym(dl, DSMOE_KERNEL_PLUGIN_SYMBOL);
    if (!entry)
        return -1;
    P = entry();
    char err[256];
    dsmoe_kernel_options opt = {.threads = 2};
    return P->init(&opt, &C, err, sizeof err) == DSMOE_OK ? 0 : -1;
}

static int teardown(void **state) {
    P->finalize(C);
    dlclose(dl);
    return 0;
}

static void test_table(void **state) {
    assert_int_equal(P->api_version, DSMOE_KERNEL_API_VERSION);
    assert_string_equal(P->name, "cpu");
    assert_int_equal(P->mem_kind, DSMOE_MEM_HOST);
    assert_null(P->device_count);
    assert_null(P->device_pci_bus_id);
    // Every other member from init to the end is required.
    const char *base = (const char *)P;
    for (size_t off = offsetof(dsmoe_kernel_plugin_v1, init); off < sizeof *P; off += sizeof(void (*)(void))) {
        if (off == offsetof(dsmoe_kernel_plugin_v1, device_pci_bus_id) ||
            off == offsetof(dsmoe_kernel_plugin_v1, device_count))
            continue;
        void (*fn)(void);
        memcpy(&fn, base + off, sizeof fn);
        if (!fn)
            fail_msg("member at offset %zu is NULL", off);
    }
    const char *d = P->describe(C);
    if (!strstr(d, "OpenBLAS") || !strstr(d, "2 OpenMP threads"))
        fail_msg("describe() = '%s': expected the BLAS library and '2 OpenMP threads'", d);
    assert_string_equal(P->last_error(C), "");
}

static void test_thread_resolution(void **state) {
    char err[256];
    dsmoe_kernel_ctx *c = NULL;
    dsmoe_kernel_options opt = {.threads = 0};
    char *saved = getenv("OMP_NUM_THREADS") ? strdup(getenv("OMP_NUM_THREADS")) : NULL;
    setenv("OMP_NUM_THREADS", "3,1", 1);
    assert_int_equal(P->init(&opt, &c, err, sizeof err), DSMOE_OK);
    assert_non_null(strstr(P->describe(c), "3 OpenMP threads"));
    P->finalize(c);
    unsetenv("OMP_NUM_THREADS");
    assert_int_equal(P->init(NULL, &c, err, sizeof err), DSMOE_OK);
    assert_non_null(strstr(P->describe(c), "1 OpenMP thread"));
    assert_null(strstr(P->describe(c), "1 OpenMP threads"));
    P->finalize(c);
    setenv("OMP_NUM_THREADS", "many", 1);
    assert_int_equal(P->init(&opt, &c, err, sizeof err), DSMOE_ERR_INVALID);
    assert_null(c);
    assert_non_null(strstr(err, "OMP_NUM_THREADS='many'"));
    opt.threads = -2;
    assert_int_equal(P->init(&opt, &c, err, sizeof err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err, "threads=-2"));
    if (saved) {
        setenv("OMP_NUM_THREADS", saved, 1);
        free(saved);
    } else {
        unsetenv("OMP_NUM_THREADS");
    }
    P->finalize(NULL);
}

static void test_memory(void **state) {
    void *a, *b, *z0, *z1;
    OK(P->alloc(C, 1000, &a));
    OK(P->alloc(C, 1000, &b));
    OK(P->alloc(C, 0, &z0));
    OK(P->alloc(C, 0, &z1));
    assert_true(z0 && z1 && z0 != z1);
    assert_int_equal((uintptr_t)a % 64, 0);
    assert_int_equal((uintptr_t)z0 % 64, 0);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(((unsigned char *)a)[i], 0);
    unsigned char host[1000], back[1000];
    for (int i = 0; i < 1000; i++)
        host[i] = (unsigned char)(i * 7);
    OK(P->copy_to_device(C, a, host, 1000));
    OK(P->copy(C, b, a, 1000));
    OK(P->zero(C, a, 500));
    OK(P->copy_to_host(C, back, b, 1000));
    OK(P->synchronize(C));
    assert_memory_equal(back, host, 1000);
    OK(P->copy_to_host(C, back, a, 1000));
    for (int i = 0; i < 1000; i++)
        assert_int_equal(back[i], i < 500 ? 0 : host[i]);
    FREE_ALL(a, b, z0, z1, NULL);
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
    int sizes[3][3] = {{7, 5, 3}, {37, 29, 41}, {300, 517, 33}}; // the last spans 2x3 tiles
    for (int sz = 0; sz < 3; sz++)
        for (int t = 0; t < 4; t++) {
            int m = sizes[sz][0], n = sizes[sz][1], k = sizes[sz][2], ta = t >> 1, tb = t & 1;
            int lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2; // padded leading dimensions
            float *a = fbuf((size_t)(ta ? k : m) * lda, 1), *b = fbuf((size_t)(tb ? n : k) * ldb, 1);
            float *c = fbuf((size_t)m * ldc, 1);
            double *want = malloc(sizeof(double) * m * n);
            naive_gemm(ta, tb, m, n, k, 0.7, a, lda, b, ldb, 0.3, c, ldc, want);
            float pad = c[n + 1]; // a padding column must stay untouched
            OK(P->gemm(C, ta, tb, m, n, k, 0.7f, a, lda, b, ldb, 0.3f, c, ldc));
            for (int i = 0; i < m; i++) {
                char what[64];
                snprintf(what, sizeof what, "gemm %c%c %dx%dx%d row %d", ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, i);
                assert_close(what, c + (size_t)i * ldc, want + (size_t)i * n, n, 1e-5, 1e-5);
            }
            assert_true(c[n + 1] == pad);
            free(want);
            FREE_ALL(a, b, c);
        }
    float *x = fbuf(64, 1), *y = fbuf(64, 1);
    double half[64];
    for (int i = 0; i < 64; i++)
        half[i] = 0.5 * y[i];
    OK(P->gemm(C, 0, 0, 8, 8, 0, 1.0f, x, 1, x, 8, 0.5f, y, 8)); // k = 0: c = beta c
    assert_close("gemm k=0", y, half, 64, 0, 1e-7);
    assert_int_equal(P->gemm(C, 0, 0, 4, 4, 5, 1.0f, x, 4, x, 4, 0.0f, x, 4), DSMOE_ERR_INVALID);
    assert_non_null(strstr(P->last_error(C), "lda=4"));
    FREE_ALL(x, y);
}

// Two shapes: one tile per group, and groups spanning several 256x256 tiles with partial edges.
static void test_gemm_grouped(void **state) {
    enum { G = 3 };
    struct { int n, k, m[G]; } cases[2] = {{6, 9, {5, 0, 7}}, {270, 5, {300, 0, 9}}};
    for (int cs = 0; cs < 2; cs++)
        for (int t = 0; t < 4; t++) {
            int n = cases[cs].n, k = cases[cs].k, *m = cases[cs].m, mmax = m[0] > m[2] ? m[0] : m[2];
            int ta = t >> 1, tb = t & 1, lda = ta ? mmax : k, ldb = tb ? k : n;
            float *a[G], *b[G], *c[G];
            double *want[G];
            for (int g = 0; g < G; g++) {
                a[g] = fbuf((size_t)mmax * k, 1);
                b[g] = fbuf((size_t)k * n, 1);
                c[g] = fbuf((size_t)mmax * n, 1);
                want[g] = malloc(sizeof(double) * mmax * n);
                naive_gemm(ta, tb, m[g], n, k, -1.5, a[g], lda, b[g], ldb, 0.5, c[g], n, want[g]);
            }
            float *c1 = malloc(sizeof(float) * mmax * n);
            memcpy(c1, c[1], sizeof(float) * mmax * n);
            OK(P->gemm_grouped(C, G, ta, tb, m, n, k, -1.5f, (const float *const *)a, lda, (const float *const *)b,
                               ldb, 0.5f, c, n));
            assert_close("gemm_grouped group 0", c[0], want[0], (size_t)m[0] * n, 1e-5, 1e-5);
            assert_close("gemm_grouped group 2", c[2], want[2], (size_t)m[2] * n, 1e-5, 1e-5);
            assert_memory_equal(c1, c[1], sizeof(float) * mmax * n); // m = 0 leaves c alone
            free(c1);
            for (int g = 0; g < G; g++) {
                FREE_ALL(a[g], b[g], c[g]);
                free(want[g]);
            }
        }
}

// dw (300, 260) spans 2x2 tiles with partial edges.
static void test_gemm_grouped_wgrad(void **state) {
    enum { G = 3, N = 300, K = 260, MMAX = 6 };
    int m[G] = {4, 0, 6};
    float *dy[G], *x[G], *dw[G];
    double *want[G];
    for (int g = 0; g < G; g++) {
        dy[g] = fbuf(MMAX * N, 1);
        x[g] = fbuf(MMAX * K, 1);
        dw[g] = fbuf(N * K, 1);
        want[g] = malloc(sizeof(double) * N * K);
        for (int i = 0; i < N; i++)
            for (int j = 0; j < K; j++) {
                double sum = 0;
                for (int r = 0; r < m[g]; r++)
                    sum += (double)dy[g][r * N + i] * x[g][r * K + j];
                want[g][i * K + j] = dw[g][i * K + j] + 0.5 * sum;
            }
    }
    OK(P->gemm_grouped_wgrad(C, G, m, N, K, 0.5f, (const float *const *)dy, (const float *const *)x, dw));
    for (int g = 0; g < G; g++) {
        assert_close("gemm_grouped_wgrad", dw[g], want[g], N * K, 1e-6, 1e-5);
        FREE_ALL(dy[g], x[g], dw[g]);
        free(want[g]);
    }
}

// ---------------------------------------------------------------------------------------------------
// Element-wise and small ops

static void test_bias(void **state) {
    enum { R = 37, N = 130 }; // 130 columns: two full chunks of 64 and a partial one
    float *out = fbuf(R * N, 1), *bias = fbuf(N, 1), *db = gbuf(N);
    double want[R * N], wantb[N];
    for (int j = 0; j < N; j++) {
        wantb[j] = GRAD_BASE;
        for (int r = 0; r < R; r++) {
            want[r * N + j] = out[r * N + j] + bias[j];
            wantb[j] += out[r * N + j];
        }
    }
    OK(P->bias_backward(C, db, out, R, N));
    OK(P->bias_add(C, out, bias, R, N));
    assert_close("bias_add", out, want, R * N, 1e-7, 1e-6);
    assert_close("bias_backward", db, wantb, N, 1e-5, 1e-5);
    FREE_ALL(out, bias, db);
}

static void test_vector_ops(void **state) {
    enum { N = 100003 };
    float *x = fbuf(N, 1), *y = fbuf(N, 1);
    double *want = malloc(N * sizeof *want), ss = 0;
    for (int i = 0; i < N; i++) {
        want[i] = 2.0 * (y[i] - 0.5 * x[i]);
        ss += (double)x[i] * x[i];
    }
    OK(P->axpy(C, y, -0.5f, x, N));
    OK(P->scale(C, y, 2.0f, N));
    assert_close("axpy, scale", y, want, N, 1e-6, 1e-6);
    double got;
    OK(P->sum_squares(C, x, N, &got));
    assert_true(fabs(got - ss) <= 1e-12 * ss);
    OK(P->sum_squares(C, x, 0, &got));
    assert_true(got == 0.0);
    int fin;
    OK(P->all_finite(C, x, N, &fin));
    assert_int_equal(fin, 1);
    float bad[3] = {INFINITY, -INFINITY, NAN};
    for (int k = 0; k < 3; k++) {
        float save = x[N - 17 * k - 1];
        x[N - 17 * k - 1] = bad[k];
        OK(P->all_finite(C, x, N, &fin));
        assert_int_equal(fin, 0);
        x[N - 17 * k - 1] = save;
    }
    x[0] = 3.4e38f; // large but finite
    OK(P->all_finite(C, x, N, &fin));
    assert_int_equal(fin, 1);
    free(want);
    FREE_ALL(x, y);
}

static void test_uniform_noise(void **state) {
    enum { N = 5000 };
    const float eps = 0.1f;
    float *in = fbuf(N, 1), *a = fbuf(N, 0), *b = fbuf(N, 0), *s = fbuf(N, 0);
    OK(P->mul_uniform_noise(C, a, in, N, eps, 42, 1000));
    OK(P->mul_uniform_noise(C, b, in, N, eps, 42, 1000));
    assert_memory_equal(a, b, N * sizeof(float));
    OK(P->mul_uniform_noise(C, s, in, N, eps, 42, 1001)); // the stream shifted by one
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
    OK(P->mul_uniform_noise(C, b, in, N, eps, 43, 1000));
    assert_true(memcmp(a, b, N * sizeof(float)) != 0);
    OK(P->mul_uniform_noise(C, in, in, N, 0.0f, 7, 0)); // eps = 0 is the identity, in place
    OK(P->mul_uniform_noise(C, b, in, N, 0.0f, 7, 0));
    assert_memory_equal(b, in, N * sizeof(float));
    FREE_ALL(in, a, b, s);
}

// Two AdamW steps worked by hand, with betas exact in float (0.875, 0.96875), lr 0.1, eps 1e-8,
// weight decay 0.01, grad scale 0.5.
// element 0: p = 1, grads 2 then -1 (scaled: 1, -0.5).
//   t=1: m = 0.125, v = 0.03125, mhat = vhat = 1, p = 1 - 0.1 (1/(1+1e-8) + 0.01) = 0.899000001
//   t=2: m = 0.109375 - 0.0625 = 0.046875, v = 0.0302734375 + 0.0078125 = 0.0380859375,
//        mhat = 0.046875 / (1 - 0.875^2) = 0.2, vhat = 0.0380859375 / (1 - 0.96875^2) = 0.619047619,
//        p = 0.899000001 - 0.1 (0.2 / (0.786795792 + 1e-8) + 0.00899000001) = 0.87268144495
// element 1: p = -2, grads 0: only decay, p = -2 (1 - 0.001) = -1.998, then -1.996002.
static void test_adamw(void **state) {
    float *p = fbuf(2, 0), *g = fbuf(2, 0), *m = fbuf(2, 0), *v = fbuf(2, 0);
    p[0] = 1.0f;
    p[1] = -2.0f;
    g[0] = 2.0f;
    OK(P->adamw_update(C, p, g, m, v, 2, 0.1f, 0.875f, 0.96875f, 1e-8f, 0.01f, 0.5f, 1));
    double want1[2] = {0.899000001, -1.998}, m1[2] = {0.125, 0}, v1[2] = {0.03125, 0};
    assert_close("adamw p t=1", p, want1, 2, 0, 2e-7);
    assert_close("adamw m t=1", m, m1, 2, 0, 1e-7);
    assert_close("adamw v t=1", v, v1, 2, 0, 1e-7);
    g[0] = -1.0f;
    OK(P->adamw_update(C, p, g, m, v, 2, 0.1f, 0.875f, 0.96875f, 1e-8f, 0.01f, 0.5f, 2));
    double want2[2] = {0.87268144495, -1.996002}, m2[2] = {0.046875, 0}, v2[2] = {0.0380859375, 0};
    assert_close("adamw p t=2", p, want2, 2, 0, 2e-7);
    assert_close("adamw m t=2", m, m2, 2, 0, 1e-7);
    assert_close("adamw v t=2", v, v2, 2, 0, 1e-7);
    assert_int_equal(P->adamw_update(C, p, g, m, v, 2, 0.1f, 0.875f, 0.96875f, 1e-8f, 0.01f, 0.5f, 0),
                     DSMOE_ERR_INVALID);
    FREE_ALL(p, g, m, v);
}

// ---------------------------------------------------------------------------------------------------
// Layer ops: forward against naive double code, backward against finite differences.
// Small shapes: B=2 T=5 M=8 NH=2 V=11.

enum { B = 2, T = 5, M = 8, NH = 2, V = 11, S = B * T };
static float *w_out; // (S, 3M) weights of the loss sum(out * w); big enough for every op here

static int32_t tokens[S] = {3, 0, 10, 3, 7, 5, 3, 10, 1, 0}; // repeats: scatter order matters

// --- embedding ---
static float *e_out, *e_wte, *e_wpe;
static double e_loss(void) {
    OK(P->embedding_forward(C, e_out, tokens, e_wte, e_wpe, B, T, M));
    return dot_d(e_out, w_out, S * M);
}

static void test_embedding(void **state) {
    e_out = fbuf(S * M, 0);
    e_wte = fbuf(V * M, 1);
    e_wpe = fbuf(T * M, 1);
    float *dwte = gbuf(V * M), *dwpe = gbuf(T * M);
    e_loss();
    for (int r = 0; r < S; r++)
        for (int j = 0; j < M; j++)
            assert_true(e_out[r * M + j] == e_wte[tokens[r] * M + j] + e_wpe[(r % T) * M + j]);
    OK(P->embedding_backward(C, dwte, dwpe, w_out, tokens, B, T, M, V));
    check_grad("embedding dwte", e_wte, dwte, V * M, e_loss);
    check_grad("embedding dwpe", e_wpe, dwpe, T * M, e_loss);
    int32_t bad[S];
    memcpy(bad, tokens, sizeof bad);
    bad[4] = V;
    assert_int_equal(P->embedding_backward(C, dwte, dwpe, w_out, bad, B, T, M, V), DSMOE_ERR_INVALID);
    assert_non_null(strstr(P->last_error(C), "tokens[4]=11"));
    FREE_ALL(e_out, e_wte, e_wpe, dwte, dwpe);
}

// --- layer norm ---
static float *ln_out, *ln_mean, *ln_rstd, *ln_in, *ln_w, *ln_b;
static double ln_loss(void) {
    OK(P->layernorm_forward(C, ln_out, ln_mean, ln_rstd, ln_in, ln_w, ln_b, S, M, 1e-5f));
    return dot_d(ln_out, w_out, S * M);
}

static void test_layernorm(void **state) {
    ln_out = fbuf(S * M, 0), ln_mean = fbuf(S, 0), ln_rstd = fbuf(S, 0);
    ln_in = fbuf(S * M, 1), ln_w = fbuf(M, 1), ln_b = fbuf(M, 1);
    for (int i = 0; i < S * M; i++)
        ln_in[i] = 2.0f * ln_in[i] + 0.5f; // mean away from 0, spread 2
    ln_loss();
    double want[S * M];
    for (int s = 0; s < S; s++) {
        double mu = 0, var = 0;
        for (int j = 0; j < M; j++)
            mu += ln_in[s * M + j] / (double)M;
        for (int j = 0; j < M; j++)
            var += (ln_in[s * M + j] - mu) * (ln_in[s * M + j] - mu) / M;
        for (int j = 0; j < M; j++)
            want[s * M + j] = (ln_in[s * M + j] - mu) / sqrt(var + 1e-5) * ln_w[j] + ln_b[j];
    }
    assert_close("layernorm_forward", ln_out, want, S * M, 1e-5, 1e-5);
    float *din = gbuf(S * M), *dw = gbuf(M), *db = gbuf(M);
    OK(P->layernorm_backward(C, din, dw, db, w_out, ln_in, ln_w, ln_mean, ln_rstd, S, M));
    check_grad("layernorm din", ln_in, din, S * M, ln_loss);
    check_grad("layernorm dweight", ln_w, dw, M, ln_loss);
    check_grad("layernorm dbias", ln_b, db, M, ln_loss);
    FREE_ALL(ln_out, ln_mean, ln_rstd, ln_in, ln_w, ln_b, din, dw, db);
}

// --- GELU ---
static float *ge_out, *ge_in;
static double ge_loss(void) {
    OK(P->gelu_forward(C, ge_out, ge_in, S * M));
    return dot_d(ge_out, w_out, S * M);
}

static void test_gelu(void **state) {
    ge_out = fbuf(S * M, 0);
    ge_in = fbuf(S * M, 1);
    for (int i = 0; i < S * M; i++)
        ge_in[i] *= 4.0f; // cover the curved part, [-4, 4)
    ge_loss();
    double want[S * M];
    for (int i = 0; i < S * M; i++) {
        double x = ge_in[i];
        want[i] = 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    }
    assert_close("gelu_forward", ge_out, want, S * M, 1e-6, 1e-5);
    float *din = gbuf(S * M);
    OK(P->gelu_backward(C, din, ge_in, w_out, S * M));
    check_grad("gelu din", ge_in, din, S * M, ge_loss);
    FREE_ALL(ge_out, ge_in, din);
}

// --- attention ---
static float *at_out, *at_att, *at_qkv;
static double at_loss(void) {
    OK(P->attention_forward(C, at_out, at_att, at_qkv, B, T, M, NH));
    return dot_d(at_out, w_out, S * M);
}

static void test_attention(void **state) {
    const int hs = M / NH;
    at_out = fbuf(S * M, 0), at_att = fbuf(B * NH * T * T, 1), at_qkv = fbuf(S * 3 * M, 1);
    for (int i = 0; i < S * 3 * M; i++)
        at_qkv[i] *= 2.0f; // sharper softmax
    at_loss();
    double want[S * M], want_att[B * NH * T * T];
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = at_qkv + (b * T + t) * 3 * M + h * hs;
                double pre[T], mx = -1e300, sum = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k = at_qkv + (b * T + t2) * 3 * M + M + h * hs;
                    pre[t2] = dot_d(q, k, hs) / sqrt(hs);
                    mx = fmax(mx, pre[t2]);
                }
                for (int t2 = 0; t2 <= t; t2++)
                    sum += exp(pre[t2] - mx);
                double *a = want_att + ((b * NH + h) * T + t) * T;
                for (int t2 = 0; t2 < T; t2++)
                    a[t2] = t2 <= t ? exp(pre[t2] - mx) / sum : 0.0;
                for (int i = 0; i < hs; i++) {
                    double o = 0;
                    for (int t2 = 0; t2 <= t; t2++)
                        o += a[t2] * at_qkv[(b * T + t2) * 3 * M + 2 * M + h * hs + i];
                    want[(b * T + t) * M + h * hs + i] = o;
                }
            }
    assert_close("attention_forward out", at_out, want, S * M, 1e-6, 1e-5);
    assert_close("attention_forward att", at_att, want_att, B * NH * T * T, 1e-7, 1e-5); // zeros exact
    float *dqkv = gbuf(S * 3 * M), *scratch = fbuf(B * NH * T * T, 1);
    OK(P->attention_backward(C, dqkv, scratch, w_out, at_qkv, at_att, B, T, M, NH));
    check_grad("attention dqkv", at_qkv, dqkv, S * 3 * M, at_loss);
    assert_int_equal(P->attention_forward(C, at_out, at_att, at_qkv, B, T, M, 3), DSMOE_ERR_INVALID);
    FREE_ALL(at_out, at_att, at_qkv, dqkv, scratch);
}

// --- cross-entropy ---
static float *ce_loss_buf, *ce_probs, *ce_logits;
static const float ce_dloss = 0.7f;
static int32_t ce_targets[S] = {0, 10, 4, 4, 9, 1, 2, 3, 7, 5};
static double ce_loss(void) {
    OK(P->crossentropy_forward(C, ce_loss_buf, ce_probs, ce_logits, ce_targets, S, V));
    double l = 0;
    for (int s = 0; s < S; s++)
        l += ce_dloss * (double)ce_loss_buf[s];
    return l;
}

static void test_crossentropy(void **state) {
    ce_loss_buf = fbuf(S, 0), ce_probs = fbuf(S * V, 0), ce_logits = fbuf(S * V, 1);
    for (int i = 0; i < S * V; i++)
        ce_logits[i] = 12.0f * ce_logits[i] + 50.0f; // offset: max subtraction matters; probs down to 1e-10
    ce_loss();
    double want_p[S * V], want_l[S];
    for (int s = 0; s < S; s++) {
        double sum = 0;
        for (int i = 0; i < V; i++)
            sum += exp(ce_logits[s * V + i] - 50.0);
        for (int i = 0; i < V; i++)
            want_p[s * V + i] = exp(ce_logits[s * V + i] - 50.0) / sum;
        want_l[s] = -log(want_p[s * V + ce_targets[s]]);
    }
    assert_close("crossentropy probs", ce_probs, want_p, S * V, 1e-15, 1e-6); // also checks the plugin's exp
    assert_close("crossentropy losses", ce_loss_buf, want_l, S, 1e-6, 1e-5);
    float *dl = gbuf(S * V);
    OK(P->crossentropy_backward(C, dl, ce_probs, ce_targets, ce_dloss, S, V));
    check_grad("crossentropy dlogits", ce_logits, dl, S * V, ce_loss);
    int32_t bad[S] = {0};
    bad[3] = -1;
    assert_int_equal(P->crossentropy_forward(C, ce_loss_buf, ce_probs, ce_logits, bad, S, V), DSMOE_ERR_INVALID);
    assert_non_null(strstr(P->last_error(C), "targets[3]=-1"));
    FREE_ALL(ce_loss_buf, ce_probs, ce_logits, dl);
}

// --- residual mix ---
static float *rm_out, *rm_coef, *rm_moe, *rm_mlp, *rm_logits;
static double rm_loss(void) {
    OK(P->residual_mix_forward(C, rm_out, rm_coef, rm_moe, rm_mlp, rm_logits, S, M));
    return dot_d(rm_out, w_out, S * M);
}

static void test_residual_mix(void **state) {
    rm_out = fbuf(S * M, 0), rm_coef = fbuf(S * 2, 0), rm_moe = fbuf(S * M, 1), rm_mlp = fbuf(S * M, 1);
    rm_logits = fbuf(S * 2, 1);
    rm_loss();
    double want[S * M], want_c[S * 2];
    for (int s = 0; s < S; s++) {
        double c0 = 1 / (1 + exp((double)rm_logits[2 * s + 1] - rm_logits[2 * s]));
        want_c[2 * s] = c0;
        want_c[2 * s + 1] = 1 - c0;
        for (int j = 0; j < M; j++)
            want[s * M + j] = rm_moe[s * M + j] * c0 + rm_mlp[s * M + j] * (1 - c0);
    }
    assert_close("residual_mix coef", rm_coef, want_c, S * 2, 1e-7, 1e-6);
    assert_close("residual_mix out", rm_out, want, S * M, 1e-6, 1e-5);
    float *dmoe = gbuf(S * M), *dmlp = gbuf(S * M), *dlog = gbuf(S * 2);
    OK(P->residual_mix_backward(C, dmoe, dmlp, dlog, w_out, rm_moe, rm_mlp, rm_coef, S, M));
    check_grad("residual_mix dmoe", rm_moe, dmoe, S * M, rm_loss);
    check_grad("residual_mix dmlp", rm_mlp, dmlp, S * M, rm_loss);
    check_grad("residual_mix dcoef_logits", rm_logits, dlog, S * 2, rm_loss);
    FREE_ALL(rm_out, rm_coef, rm_moe, rm_mlp, rm_logits, dmoe, dmlp, dlog);
}

// ---------------------------------------------------------------------------------------------------
// Thread-count independence: the same calls on a 1-thread and a 2-thread context, bitwise. Shapes are
// large enough that every op takes its parallel path.

static void test_thread_independence(void **state) {
    dsmoe_kernel_ctx *c1, *c2;
    char err[256];
    dsmoe_kernel_options o1 = {.threads = 1}, o2 = {.threads = 2};
    assert_int_equal(P->init(&o1, &c1, err, sizeof err), DSMOE_OK);
    assert_int_equal(P->init(&o2, &c2, err, sizeof err), DSMOE_OK);
    dsmoe_kernel_ctx *ctxs[2] = {c1, c2};

    enum { NS = 3000001, R = 300, NB = 700, LS = 128, LM = 200, EB = 4, ET = 64, EM = 128, EV = 50,
           AB = 2, AT = 32, AM = 64, ANH = 4, GM = 200, GN = 300, GK = 400 };
    float *x = fbuf(NS, 1), *ln_in = fbuf(LS * LM, 1), *ln_w = fbuf(LM, 1), *mean = fbuf(LS, 0), *rstd = fbuf(LS, 0);
    float *ln_tmp = fbuf(LS * LM, 0), *qkv = fbuf(AB * AT * 3 * AM, 1), *att = fbuf(AB * ANH * AT * AT, 0);
    float *a_out = fbuf(AB * AT * AM, 0), *scratch = fbuf(AB * ANH * AT * AT, 0);
    float *ga = fbuf(GM * GK, 1), *gb = fbuf(GK * GN, 1);
    int32_t etok[EB * ET];
    for (int i = 0; i < EB * ET; i++)
        etok[i] = (i * 7) % 13; // heavy repeats
    OK(P->layernorm_forward(C, ln_tmp, mean, rstd, ln_in, ln_w, ln_w, LS, LM, 1e-5f));
    OK(P->attention_forward(C, a_out, att, qkv, AB, AT, AM, ANH));

    double ss[2];
    float *dbias[2], *din[2], *dw[2], *dbl[2], *dwte[2], *dwpe[2], *dqkv[2], *gc[2];
    for (int k = 0; k < 2; k++) {
        dsmoe_kernel_ctx *c = ctxs[k];
        dbias[k] = gbuf(NB), din[k] = gbuf(LS * LM), dw[k] = gbuf(LM), dbl[k] = gbuf(LM);
        dwte[k] = gbuf(EV * EM), dwpe[k] = gbuf(ET * EM), dqkv[k] = gbuf(AB * AT * 3 * AM), gc[k] = fbuf(GM * GN, 0);
        assert_int_equal(P->sum_squares(c, x, NS, &ss[k]), DSMOE_OK);
        assert_int_equal(P->bias_backward(c, dbias[k], x, R, NB), DSMOE_OK);
        assert_int_equal(P->layernorm_backward(c, din[k], dw[k], dbl[k], x, ln_in, ln_w, mean, rstd, LS, LM), DSMOE_OK);
        assert_int_equal(P->embedding_backward(c, dwte[k], dwpe[k], x, etok, EB, ET, EM, EV), DSMOE_OK);
        assert_int_equal(P->attention_backward(c, dqkv[k], scratch, x, qkv, att, AB, AT, AM, ANH), DSMOE_OK);
        assert_int_equal(P->gemm(c, 0, 1, GM, GN, GK, 1.0f, ga, GK, gb, GK, 0.0f, gc[k], GN), DSMOE_OK);
    }
    assert_memory_equal(&ss[0], &ss[1], sizeof(double));
    assert_memory_equal(dbias[0], dbias[1], NB * sizeof(float));
    assert_memory_equal(din[0], din[1], LS * LM * sizeof(float));
    assert_memory_equal(dw[0], dw[1], LM * sizeof(float));
    assert_memory_equal(dbl[0], dbl[1], LM * sizeof(float));
    assert_memory_equal(dwte[0], dwte[1], EV * EM * sizeof(float));
    assert_memory_equal(dwpe[0], dwpe[1], ET * EM * sizeof(float));
    assert_memory_equal(dqkv[0], dqkv[1], AB * AT * 3 * AM * sizeof(float));
    assert_memory_equal(gc[0], gc[1], GM * GN * sizeof(float));
    for (int k = 0; k < 2; k++) {
        FREE_ALL(dbias[k], din[k], dw[k], dbl[k], dwte[k], dwpe[k], dqkv[k], gc[k]);
    }
    FREE_ALL(x, ln_in, ln_w, mean, rstd, ln_tmp, qkv, att, a_out, scratch, ga, gb);
    P->finalize(c1);
    P->finalize(c2);
}

// options.thread_cpus: compute thread t runs on thread_cpus[t % n] for the context's life. Later OpenMP
// regions of the same size reuse the same pool threads (libgomp), so they show the pinning.
static void test_thread_pinning(void **state) {
    (void)state;
    cpu_set_t all;
    CPU_ZERO(&all);
    sched_getaffinity(0, sizeof all, &all);
    if (CPU_COUNT(&all) < 2 || !CPU_ISSET(0, &all) || !CPU_ISSET(1, &all)) {
        fprintf(stderr, "test_thread_pinning: needs CPUs 0 and 1; skipped\n");
        return;
    }
    int cpus[2] = {1, 0};
    dsmoe_kernel_options opt = {.threads = 2, .thread_cpus = cpus, .n_thread_cpus = 2};
    dsmoe_kernel_ctx *ctx = NULL;
    char err[256];
    assert_int_equal(P->init(&opt, &ctx, err, sizeof err), DSMOE_OK);
    assert_non_null(strstr(P->describe(ctx), "2 OpenMP threads pinned to one CPU each"));
    int on[2] = {-1, -1}, count[2] = {0, 0};
#pragma omp parallel num_threads(2)
    {
        cpu_set_t mine;
        CPU_ZERO(&mine);
        sched_getaffinity(0, sizeof mine, &mine);
        int t = omp_get_thread_num();
        count[t] = CPU_COUNT(&mine);
        on[t] = CPU_ISSET(1, &mine) ? 1 : CPU_ISSET(0, &mine) ? 0 : -1;
        sched_setaffinity(0, sizeof all, &all); // leave the process as it was
    }
    assert_int_equal(count[0], 1);
    assert_int_equal(count[1], 1);
    assert_int_equal(on[0], 1);
    assert_int_equal(on[1], 0);
    int bad = 4096;
    opt.thread_cpus = &bad;
    opt.n_thread_cpus = 1;
    P->finalize(ctx);
    assert_int_equal(P->init(&opt, &ctx, err, sizeof err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err, "cannot pin a compute thread to CPU 4096"));
#pragma omp parallel num_threads(2)
    sched_setaffinity(0, sizeof all, &all);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_thread_resolution),
        cmocka_unit_test(test_memory),
        cmocka_unit_test(test_gemm),
        cmocka_unit_test(test_gemm_grouped),
        cmocka_unit_test(test_gemm_grouped_wgrad),
        cmocka_unit_test(test_bias),
        cmocka_unit_test(test_vector_ops),
        cmocka_unit_test(test_uniform_noise),
        cmocka_unit_test(test_adamw),
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_gelu),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_crossentropy),
        cmocka_unit_test(test_residual_mix),
        cmocka_unit_test(test_thread_independence),
        cmocka_unit_test(test_thread_pinning),
    };
    int rc = setup(NULL);
    if (rc != 0) {
        fprintf(stderr, "test_cpu_ops: cannot load or initialise the cpu plugin %s\n", PLUGIN_FILE);
        return 1;
    }
    w_out = fbuf(S * 3 * M, 1);
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    P->free(C, w_out);
    teardown(NULL);
    return rc;
}
