// tests/cpu_plugin_test.h: what the tests of the cpu kernel plugin share (test_cpu_ops*.c, test_gating.c,
// test_dispatch_combine.c): loading the built plugin as the core does (dlopen from the build tree, no
// core library), contexts with the plugin's `poison` setting on (memory not asked zeroed reads as NaN,
// so a test that forgets DSMOE_ALLOC_ZERO fails), moving data through the copy members, and float
// comparisons.
// Header-only: each test is one program. Include after <cmocka.h>.
// defines: P, C, Q, OK, OKC, cpt_load, cpt_unload, cpt_ctx, cpt_ctx_simd, dev_new, dev_zeros, dev_put, dev_get,
//          dev_free, rnd, rnd_fill, assert_close, gelu_d, gelu_grad_d, dot_d
#ifndef DSMOE_CPU_PLUGIN_TEST_H
#define DSMOE_CPU_PLUGIN_TEST_H
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/kernel_plugin.h"

#define CPT_PLUGIN_FILE DSMOE_BUILD_PLUGIN_DIRS "/libdsmoe_kernel_cpu.so"

static void *cpt_dl;
static const dsmoe_kernel_plugin_v3 *P; // the plugin's table
static dsmoe_kernel_ctx *C;             // the shared context (threads from cpt_load), poison on
static dsmoe_kernel_queue *Q;           // its default queue

// Fails the test with the plugin's message unless call returns DSMOE_OK (on context c).
#define OKC(c, call)                                                                               \
    do {                                                                                           \
        dsmoe_status okc_s_ = (call);                                                              \
        if (okc_s_ != DSMOE_OK)                                                                    \
            fail_msg("%s failed: %s: %s", #call, dsmoe_status_name(okc_s_), P->last_error(c));     \
    } while (0)
#define OK(call) OKC(C, call)

// The settings every test context gets: poisoned allocations, the default small_rows (dot products
// for GEMMs of up to 8 rows) and the default simd (the GELU kernels' vectors).
static const char *const cpt_values[] = {"1", "8", "auto"};
#define CPT_N_VALUES 3

// A new context with `threads` compute threads and the settings above, simd = `simd`.
static inline dsmoe_kernel_ctx *cpt_ctx_simd(int threads, const char *simd) {
    const char *values[CPT_N_VALUES] = {cpt_values[0], cpt_values[1], simd};
    dsmoe_kernel_options opt = {.threads = threads, .param_values = values, .n_param_values = CPT_N_VALUES};
    dsmoe_kernel_ctx *c = NULL;
    char err[256];
    if (P->n_params != CPT_N_VALUES || strcmp(P->params[0].name, "poison") != 0 ||
        strcmp(P->params[1].name, "small_rows") != 0 || strcmp(P->params[2].name, "simd") != 0)
        fail_msg("the cpu plugin's settings changed: expected 'poison', 'small_rows' and 'simd'");
    if (P->init(&opt, &c, err, sizeof err) != DSMOE_OK)
        fail_msg("cpu plugin init (%d threads, simd %s): %s", threads, simd, err);
    return c;
}

// A new context with `threads` compute threads and the settings above.
static inline dsmoe_kernel_ctx *cpt_ctx(int threads) { return cpt_ctx_simd(threads, cpt_values[2]); }

// Loads the plugin and makes C; returns 0 or -1 (with a message on stderr).
static inline int cpt_load(int threads) {
    cpt_dl = dlopen(CPT_PLUGIN_FILE, RTLD_NOW | RTLD_LOCAL);
    if (!cpt_dl) {
        fprintf(stderr, "cannot load %s: %s\n", CPT_PLUGIN_FILE, dlerror());
        return -1;
    }
    dsmoe_kernel_plugin_entry_fn entry = (dsmoe_kernel_plugin_entry_fn)dlsym(cpt_dl, DSMOE_KERNEL_PLUGIN_SYMBOL);
    if (!entry) {
        fprintf(stderr, "%s has no %s\n", CPT_PLUGIN_FILE, DSMOE_KERNEL_PLUGIN_SYMBOL);
        return -1;
    }
    P = entry();
    dsmoe_kernel_options opt = {.threads = threads, .param_values = cpt_values, .n_param_values = CPT_N_VALUES};
    char err[256];
    if (P->api_version != DSMOE_KERNEL_API_VERSION || P->init(&opt, &C, err, sizeof err) != DSMOE_OK) {
        fprintf(stderr, "cannot initialise the cpu plugin (api_version %u)\n", P->api_version);
        return -1;
    }
    Q = P->default_queue(C);
    return 0;
}

static inline void cpt_unload(void) {
    P->finalize(C);
    dlclose(cpt_dl);
}

// --- device buffers on context c (all traffic through the copy members) ---

static inline void *dev_new(dsmoe_kernel_ctx *c, size_t bytes, uint32_t flags) {
    void *p = NULL;
    if (P->alloc(c, bytes, flags, &p) != DSMOE_OK)
        fail_msg("alloc %zu bytes: %s", bytes, P->last_error(c));
    return p;
}

static inline void *dev_zeros(dsmoe_kernel_ctx *c, size_t bytes) { return dev_new(c, bytes, DSMOE_ALLOC_ZERO); }

// A new buffer holding host[0 .. bytes).
static inline void *dev_put(dsmoe_kernel_ctx *c, const void *host, size_t bytes) {
    void *d = dev_new(c, bytes, 0);
    OKC(c, P->copy_to_device(c, P->default_queue(c), d, host, bytes));
    return d;
}

// host = dev, valid after the synchronize.
static inline void dev_get(dsmoe_kernel_ctx *c, void *host, const void *dev, size_t bytes) {
    OKC(c, P->copy_to_host(c, P->default_queue(c), host, dev, bytes));
    OKC(c, P->synchronize(c));
}

static inline void dev_free(dsmoe_kernel_ctx *c, void *p) { P->free(c, p); }

// --- host data and comparisons ---

static uint64_t cpt_rng_state = 12345;
static inline float rnd(void) { // uniform in [-1, 1)
    cpt_rng_state = cpt_rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(cpt_rng_state >> 40) / 8388608.0f - 1.0f;
}

// A host array of n floats, uniform in [-scale, scale).
static inline float *rnd_fill(size_t n, float scale) {
    float *f = malloc((n ? n : 1) * sizeof *f);
    for (size_t i = 0; i < n; i++)
        f[i] = scale * rnd();
    return f;
}

static inline void assert_close(const char *what, const float *got, const double *want, size_t n, double atol,
                                double rtol) {
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

// GELU (tanh approximation) and its derivative in double: the references of the ops and epilogues.
static inline double gelu_d(double x) { return 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x))); }

static inline double gelu_grad_d(double x) {
    double u = sqrt(2 / M_PI) * (x + 0.044715 * x * x * x), th = tanh(u);
    return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * sqrt(2 / M_PI) * (1 + 3 * 0.044715 * x * x);
}

static inline double dot_d(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

#endif
