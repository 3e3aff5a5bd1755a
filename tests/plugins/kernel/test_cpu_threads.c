// tests/plugins/kernel/test_cpu_threads.c: the cpu kernel plugin's compute threads: how init resolves their
// count (options.threads, OMP_NUM_THREADS, refusals of bad values and settings), that results do not
// depend on it (the same calls on a 1-thread and a 2-thread context, bitwise), and the pinning of
// options.thread_cpus. The plugin is dlopen'ed from the build tree as the core loads it
// (cpu_plugin_test.h); data moves only through its copy members.
#define _GNU_SOURCE // sched_getaffinity, CPU_*
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

#include "cpu_plugin_test.h"

#define F32 DSMOE_FLOAT32

static void test_thread_resolution(void **state) {
    char err[256];
    dsmoe_kernel_ctx *c = NULL;
    dsmoe_kernel_options opt = {.threads = 0};
    char *saved = getenv("OMP_NUM_THREADS") ? strdup(getenv("OMP_NUM_THREADS")) : NULL;
    setenv("OMP_NUM_THREADS", "3,1", 1);
    assert_int_equal(P->init(&opt, &c, err, sizeof err), DSMOE_OK);
    assert_non_null(strstr(P->describe(c), "3 OpenMP threads"));
    assert_null(strstr(P->describe(c), "poisoned")); // the setting's default is off
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
    static const char *const bad[] = {"maybe", "8", "auto", "x"};
    dsmoe_kernel_options popt = {.threads = 1, .param_values = bad, .n_param_values = 3};
    assert_int_equal(P->init(&popt, &c, err, sizeof err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err, "poison='maybe'"));
    static const char *const big[] = {"0", "17", "auto"}; // at most 16 (CPU_SMALL_ROWS_MAX)
    popt.param_values = big;
    assert_int_equal(P->init(&popt, &c, err, sizeof err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err, "small_rows='17'"));
    popt.param_values = bad;
    popt.n_param_values = 4; // values that do not match the declared settings
    assert_int_equal(P->init(&popt, &c, err, sizeof err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err, "4 setting values"));
    if (saved) {
        setenv("OMP_NUM_THREADS", saved, 1);
        free(saved);
    } else {
        unsetenv("OMP_NUM_THREADS");
    }
    P->finalize(NULL);
}

// ---------------------------------------------------------------------------------------------------
// Thread-count independence: the same calls on a 1-thread and a 2-thread context, bitwise. Shapes are
// large enough that every op takes its parallel path.

static void test_thread_independence(void **state) {
    dsmoe_kernel_ctx *ctxs[2] = {cpt_ctx(1), cpt_ctx(2)};
    enum { NS = 3000001, R = 300, NB = 700, LS = 128, LM = 200, EB = 4, ET = 64, EM = 128, EV = 50,
           AB = 2, AT = 32, AM = 64, ANH = 4, GM = 200, GN = 300, GK = 400 };
    float *x = rnd_fill(NS, 1), *ln_in = rnd_fill(LS * LM, 1), *ln_w = rnd_fill(LM, 1);
    float *qkv = rnd_fill(AB * AT * 3 * AM, 1);
    float *ga = rnd_fill(GM * GK, 1), *gb = rnd_fill(GK * GN, 1);
    int32_t etok[EB * ET];
    for (int i = 0; i < EB * ET; i++)
        etok[i] = (i * 7) % 13; // heavy repeats
    dsmoe_attention_shape sh = {.B = AB, .T = AT, .M = AM, .NH = ANH, .dt = F32};
    const size_t sizes[8] = {NB, LS * LM, LM, LM, EV * EM, ET * EM, AB * AT * 3 * AM, GM * GN};
    struct { size_t n; float *h[2]; } outs[8];
    for (int j = 0; j < 8; j++)
        outs[j].n = sizes[j];
    double ss[2];
    for (int k = 0; k < 2; k++) {
        dsmoe_kernel_ctx *c = ctxs[k];
        dsmoe_kernel_queue *q = P->default_queue(c);
        float *dx = dev_put(c, x, (size_t)NS * 4), *dln = dev_put(c, ln_in, LS * LM * 4);
        float *dlw = dev_put(c, ln_w, LM * 4);
        float *mean = dev_new(c, LS * 4, 0), *rstd = dev_new(c, LS * 4, 0), *tmp = dev_new(c, LS * LM * 4, 0);
        float *dqkv_in = dev_put(c, qkv, AB * AT * 3 * AM * 4), *att = dev_new(c, AB * ANH * AT * AT * 4, 0);
        float *aout = dev_new(c, AB * AT * AM * 4, 0), *scratch = dev_new(c, AB * ANH * AT * AT * 4, 0);
        float *dga = dev_put(c, ga, GM * GK * 4), *dgb = dev_put(c, gb, GK * GN * 4);
        int32_t *dtok = dev_put(c, etok, sizeof etok);
        double *dss = dev_new(c, sizeof(double), 0);
        float *o[8];
        for (int j = 0; j < 8; j++) { // backward outputs accumulate: start them at a non-zero value
            float *base = malloc(outs[j].n * 4);
            for (size_t i = 0; i < outs[j].n; i++)
                base[i] = 0.25f;
            o[j] = dev_put(c, base, outs[j].n * 4);
            free(base);
        }
        OKC(c, P->layernorm_forward(c, q, tmp, mean, rstd, dln, F32, dlw, dlw, LS, LM, 1e-5f));
        OKC(c, P->attention_forward(c, q, aout, att, dqkv_in, &sh));
        OKC(c, P->sum_squares(c, q, dx, NS, dss));
        OKC(c, P->bias_backward(c, q, o[0], dx, F32, R, NB));
        OKC(c, P->layernorm_backward(c, q, o[1], o[2], o[3], dx, dln, F32, dlw, mean, rstd, LS, LM));
        OKC(c, P->embedding_backward(c, q, o[4], o[5], dx, F32, dtok, EB, ET, EM, EV));
        OKC(c, P->attention_backward(c, q, o[6], scratch, dx, dqkv_in, aout, att, &sh));
        OKC(c, P->gemm(c, q, 0, 1, GM, GN, GK, 1.0f, dga, F32, GK, dgb, F32, GK, 0.0f, o[7], F32, GN));
        dev_get(c, &ss[k], dss, sizeof(double));
        for (int j = 0; j < 8; j++) {
            outs[j].h[k] = malloc(outs[j].n * 4);
            dev_get(c, outs[j].h[k], o[j], outs[j].n * 4);
            dev_free(c, o[j]);
        }
        void *bufs[] = {dx, dln, dlw, mean, rstd, tmp, dqkv_in, att, aout, scratch, dga, dgb, dtok, dss};
        for (size_t j = 0; j < sizeof bufs / sizeof *bufs; j++)
            dev_free(c, bufs[j]);
    }
    assert_memory_equal(&ss[0], &ss[1], sizeof(double));
    static const char *names[8] = {"bias_backward", "layernorm din", "layernorm dweight", "layernorm dbias",
                                   "embedding dwte", "embedding dwpe", "attention dqkv", "gemm"};
    for (int j = 0; j < 8; j++) {
        if (memcmp(outs[j].h[0], outs[j].h[1], outs[j].n * 4))
            fail_msg("%s differs between 1 and 2 threads", names[j]);
        free(outs[j].h[0]), free(outs[j].h[1]);
    }
    free(x), free(ln_in), free(ln_w), free(qkv), free(ga), free(gb);
    P->finalize(ctxs[0]);
    P->finalize(ctxs[1]);
}

// options.thread_cpus: compute thread t runs on thread_cpus[t % n] for the context's life. Later OpenMP
// regions of the same size reuse the same pool threads (libgomp), so they show the pinning.
static void test_thread_pinning(void **state) {
    (void)state;
    cpu_set_t all;
    CPU_ZERO(&all);
    sched_getaffinity(0, sizeof all, &all);
    if (CPU_COUNT(&all) < 2 || !CPU_ISSET(0, &all) || !CPU_ISSET(1, &all)) {
        fprintf(stderr, "test_thread_pinning: needs CPUs 0 and 1 in this process's affinity\n");
        skip(); // cmocka reports it SKIPPED (not passed)
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
        cmocka_unit_test(test_thread_resolution),
        cmocka_unit_test(test_thread_independence),
        cmocka_unit_test(test_thread_pinning),
    };
    if (cpt_load(2) != 0) {
        fprintf(stderr, "test_cpu_threads: cannot load or initialise the cpu plugin %s\n", CPT_PLUGIN_FILE);
        return 1;
    }
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    cpt_unload();
    return rc;
}
