// tests/cuda_emu/test_emu_gemm_rows.c: the cuda plugin's grouped GEMM of few rows (kernels/gemm_rows.cu),
// run by the plugin built for the CUDA emulator ($DSMOE_CUDA_PLUGIN), where device memory is host memory:
// so the experts' weights can lie on pages with no access (mprotect PROT_NONE), as the cpu plugin's test
// does, and a read of any weight of an expert that received no token ends the test with a segmentation
// fault. That is what the kernel is for: at decode, only the experts that received tokens are read (cuBLAS,
// whose batched GEMM computes every group at m_max rows, would fault here). The results against a
// double-precision reference, float32 and bfloat16 (c float32 and bfloat16), with 1 row (decode) and 11
// (two passes of the kernel's 8-row chunks), k a whole number of 16-byte vectors and not (its scalar
// loads), with every epilogue; rows from the count on and the other experts' outputs are not written.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>

#include "dsmoe/kernel_plugin.h"

static const dsmoe_kernel_plugin_v3 *P;
static dsmoe_kernel_ctx *C;

#define OK(call)                                                                                   \
    do {                                                                                           \
        dsmoe_status ok_s_ = (call);                                                               \
        if (ok_s_ != DSMOE_OK)                                                                     \
            fail_msg("%s: %s: %s", #call, dsmoe_status_name(ok_s_), P->last_error(C));             \
    } while (0)

static float rnd(uint64_t *s) { // in [-1, 1)
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xFFFFFF) / 8388608.0f - 1.0f;
}

static uint16_t to_bf16(float f) { // round to nearest even
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static double gelu(double x) { return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }

static double gelu_grad(double x) {
    double th = tanh(0.7978845608028654 * (x + 0.044715 * x * x * x));
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x);
}

typedef struct rows_case {
    int bf16, c_bf16, rows, k;
    dsmoe_epilogue epi;
    float beta;
} rows_case;

// E experts of N outputs, one (USED) routed `rows` tokens; the others hold no token and their weights are
// unreadable.
static void run_case(const rows_case *t) {
    enum { E = 8, N = 40, USED = 5, MMAX = 16 };
    const int rows = t->rows, K = t->k;
    const size_t es = t->bf16 ? 2 : 4, ces = t->c_bf16 ? 2 : 4;
    const long page = sysconf(_SC_PAGESIZE);
    const size_t wbytes = (size_t)N * K * es, stride = (wbytes + (size_t)page - 1) / (size_t)page * (size_t)page;
    unsigned char *w = mmap(NULL, E * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(w != MAP_FAILED);
    uint64_t seed = 0x9E3779B97F4A7C15ull ^ (uint64_t)(t->rows * 131 + t->k * 7 + t->epi * 3 + t->bf16);
    // The operands as the plugin sees them (rounded to bfloat16 where they are), in double for the reference.
    double *wr = malloc(sizeof(double) * N * K), *ar = malloc(sizeof(double) * rows * K);
    double *bias = malloc(sizeof(double) * N), *c0 = malloc(sizeof(double) * rows * N);
    double *aux0 = malloc(sizeof(double) * rows * N);
    for (int i = 0; i < N * K; i++) {
        float v = rnd(&seed);
        if (t->bf16) {
            uint16_t h = to_bf16(v);
            memcpy(w + USED * stride + 2 * (size_t)i, &h, 2);
            wr[i] = from_bf16(h);
        } else {
            memcpy(w + USED * stride + 4 * (size_t)i, &v, 4);
            wr[i] = v;
        }
    }
    for (int e = 0; e < E; e++)
        if (e != USED) assert_int_equal(mprotect(w + e * stride, stride, PROT_NONE), 0);
    // a (E, MMAX, K): the used expert's rows, NaN everywhere else (rows past a count may hold anything).
    const size_t a_elems = (size_t)E * MMAX * K, c_elems = (size_t)E * MMAX * N;
    unsigned char *ha = malloc(a_elems * es), *hc = malloc(c_elems * ces), *haux = malloc(c_elems * ces);
    for (size_t i = 0; i < a_elems; i++) {
        float v = NAN;
        size_t g = i / ((size_t)MMAX * K), r = i / K % MMAX;
        if (g == USED && r < (size_t)rows) v = rnd(&seed), ar[r * K + i % K] = t->bf16 ? from_bf16(to_bf16(v)) : v;
        if (t->bf16) {
            uint16_t h = to_bf16(v);
            memcpy(ha + 2 * i, &h, 2);
        } else {
            memcpy(ha + 4 * i, &v, 4);
        }
    }
    const float sentinel = 12345.0f;
    for (size_t i = 0; i < c_elems; i++) { // c and aux: the sentinel, but in the used rows (beta, DGELU)
        size_t g = i / ((size_t)MMAX * N), r = i / N % MMAX;
        float cv = sentinel, xv = sentinel;
        if (g == USED && r < (size_t)rows) {
            cv = t->beta != 0.0f ? rnd(&seed) : NAN, xv = 3.0f * rnd(&seed);
            if (t->c_bf16) cv = from_bf16(to_bf16(cv)), xv = from_bf16(to_bf16(xv));
            c0[r * N + i % N] = cv, aux0[r * N + i % N] = xv;
            if (t->epi != DSMOE_EPI_DGELU) xv = sentinel;
        }
        if (t->c_bf16) {
            uint16_t hcv = to_bf16(cv), hxv = to_bf16(xv);
            memcpy(hc + 2 * i, &hcv, 2), memcpy(haux + 2 * i, &hxv, 2);
        } else {
            memcpy(hc + 4 * i, &cv, 4), memcpy(haux + 4 * i, &xv, 4);
        }
    }
    float hbias[E * N];
    for (int i = 0; i < E * N; i++) hbias[i] = rnd(&seed);
    for (int j = 0; j < N; j++) bias[j] = hbias[USED * N + j];
    int32_t counts[E] = {0};
    counts[USED] = rows;

    dsmoe_kernel_queue *q = P->default_queue(C);
    void *da, *dc, *daux, *dbias, *dcounts;
    OK(P->alloc(C, a_elems * es, 0, &da));
    OK(P->alloc(C, c_elems * ces, 0, &dc));
    OK(P->alloc(C, c_elems * ces, 0, &daux));
    OK(P->alloc(C, sizeof hbias, 0, &dbias));
    OK(P->alloc(C, sizeof counts, 0, &dcounts));
    OK(P->copy_to_device(C, q, da, ha, a_elems * es));
    OK(P->copy_to_device(C, q, dc, hc, c_elems * ces));
    OK(P->copy_to_device(C, q, daux, haux, c_elems * ces));
    OK(P->copy_to_device(C, q, dbias, hbias, sizeof hbias));
    OK(P->copy_to_device(C, q, dcounts, counts, sizeof counts));
    const dsmoe_dtype ab = t->bf16 ? DSMOE_BFLOAT16 : DSMOE_FLOAT32, ct = t->c_bf16 ? DSMOE_BFLOAT16 : DSMOE_FLOAT32;
    const int bias_epi = t->epi == DSMOE_EPI_BIAS || t->epi == DSMOE_EPI_BIAS_GELU;
    dsmoe_grouped_gemm g = {.groups = E, .counts = dcounts, .m_max = MMAX, .n = N, .k = K, .alpha = 0.75f,
                            .beta = t->beta, .a = da, .a_type = ab, .lda = K, .a_stride = (size_t)MMAX * K,
                            .b = w, .b_type = ab, .ldb = K, .b_stride = stride / es, .b_groups = E, .trans_b = 1,
                            .c = dc, .c_type = ct, .ldc = N, .c_stride = (size_t)MMAX * N, .epilogue = t->epi,
                            .bias = bias_epi ? dbias : NULL, .bias_stride = N,
                            .aux = t->epi >= DSMOE_EPI_BIAS_GELU ? daux : NULL};
    OK(P->gemm_grouped(C, q, &g));
    OK(P->copy_to_host(C, q, hc, dc, c_elems * ces));
    OK(P->copy_to_host(C, q, haux, daux, c_elems * ces));
    OK(P->queue_synchronize(C, q));

    const double tol = t->c_bf16 ? 1.2e-2 : t->bf16 ? 1e-4 : 1e-5; // c's rounding; float32 sums of k terms
    for (size_t i = 0; i < c_elems; i++) {
        size_t gi = i / ((size_t)MMAX * N), r = i / N % MMAX, j = i % N;
        float got, got_aux;
        if (t->c_bf16) {
            uint16_t h, x;
            memcpy(&h, hc + 2 * i, 2), memcpy(&x, haux + 2 * i, 2);
            got = from_bf16(h), got_aux = from_bf16(x);
        } else {
            memcpy(&got, hc + 4 * i, 4), memcpy(&got_aux, haux + 4 * i, 4);
        }
        if (gi != USED || r >= (size_t)rows) { // rows past a count are unspecified: these are never computed
            const float kept = t->c_bf16 ? from_bf16(to_bf16(sentinel)) : sentinel;
            if (got != kept || (t->epi != DSMOE_EPI_DGELU && got_aux != kept))
                fail_msg("k=%d rows=%d: c or aux of group %zu row %zu column %zu written (%g, %g)", K, rows, gi, r, j,
                         got, got_aux);
            continue;
        }
        double v = 0.0;
        for (int kk = 0; kk < K; kk++) v += ar[r * K + kk] * wr[j * K + kk];
        v *= 0.75;
        if (t->beta != 0.0f) v += t->beta * c0[r * N + j];
        double want_aux = NAN;
        if (t->epi == DSMOE_EPI_BIAS) v += bias[j];
        if (t->epi == DSMOE_EPI_BIAS_GELU) v += bias[j], want_aux = v, v = gelu(v);
        if (t->epi == DSMOE_EPI_DGELU) v *= gelu_grad(aux0[r * N + j]);
        if (fabs(got - v) > tol * (1.0 + fabs(v)))
            fail_msg("bf16=%d c_bf16=%d k=%d rows=%d epi=%d: c[%zu][%zu] = %.8g, want %.8g", t->bf16, t->c_bf16, K, rows,
                     (int)t->epi, r, j, got, v);
        if (t->epi == DSMOE_EPI_BIAS_GELU && fabs(got_aux - want_aux) > tol * (1.0 + fabs(want_aux)))
            fail_msg("k=%d rows=%d: aux[%zu][%zu] = %.8g, want %.8g", K, rows, r, j, got_aux, want_aux);
    }
    void *bufs[] = {da, dc, daux, dbias, dcounts};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) P->free(C, bufs[i]);
    munmap(w, E * stride);
    free(wr), free(ar), free(bias), free(c0), free(aux0), free(ha), free(hc), free(haux);
}

static void test_reads_only_routed_experts(void **state) {
    (void)state;
    for (int dt = 0; dt < 3; dt++) // float32; bfloat16 with c float32; bfloat16 with c bfloat16
        for (int rows = 1; rows <= 11; rows += 10)
            for (int kv = 0; kv < 2; kv++)
                for (int epi = 0; epi < 4; epi++) {
                    rows_case t = {.bf16 = dt > 0, .c_bf16 = dt == 2, .rows = rows, .k = kv ? 72 : 37,
                                   .epi = (dsmoe_epilogue)epi, .beta = epi == DSMOE_EPI_DGELU ? 0.0f : (float)(epi & 1)};
                    run_case(&t);
                }
}

int main(void) {
    const char *file = getenv("DSMOE_CUDA_PLUGIN");
    if (!file || !*file) {
        fprintf(stderr, "test_emu_gemm_rows: set DSMOE_CUDA_PLUGIN to the emulated cuda plugin\n");
        return 1;
    }
    void *dl = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    dsmoe_kernel_plugin_entry_fn entry = dl ? (dsmoe_kernel_plugin_entry_fn)dlsym(dl, DSMOE_KERNEL_PLUGIN_SYMBOL) : NULL;
    if (!entry || !(P = entry())) {
        fprintf(stderr, "test_emu_gemm_rows: cannot load %s: %s\n", file, dl ? "no entry symbol" : dlerror());
        return 1;
    }
    char err[512] = "";
    dsmoe_kernel_options opt = {.device = 0}; // the declared defaults: expert_rows_max = 16
    if (P->init(&opt, &C, err, sizeof err) != DSMOE_OK) {
        fprintf(stderr, "test_emu_gemm_rows: init: %s\n", err);
        return 1;
    }
    if (!strstr(P->describe(C), "emulator")) { // device pointers are not host memory on a GPU
        printf("test_emu_gemm_rows: SKIPPED: %s is not the emulator's build\n", file);
        P->finalize(C);
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reads_only_routed_experts),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    P->finalize(C);
    return failed;
}
