// tests/plugins/kernel/strict_test.h: what the tests of the strict kernel plugin share (test_strict.c,
// test_strict_ops.c): both plugins' tables, loaded from the build tree as the core loads them; contexts
// with the default settings; device buffers; waiting through an event; a fixed random sequence.
// Header-only: each test is one program. Include after <cmocka.h>.
// defines: S, P, OK, open_plugin, make_ctx, strict_ctx_with, dev, wait_queue, rnd, setup, teardown
#ifndef DSMOE_STRICT_TEST_H
#define DSMOE_STRICT_TEST_H
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "dsmoe/kernel_plugin.h"

static const dsmoe_kernel_plugin_v3 *S, *P; // strict, cpu
static void *dl_strict, *dl_cpu;

#define OK(T, ctx, call)                                                                               \
    do {                                                                                               \
        dsmoe_status ok_s_ = (call);                                                                   \
        if (ok_s_ != DSMOE_OK)                                                                         \
            fail_msg("%s failed: %s: %s", #call, dsmoe_status_name(ok_s_), (T)->last_error(ctx));      \
    } while (0)

static const dsmoe_kernel_plugin_v3 *open_plugin(const char *path, void **dl) {
    *dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!*dl) {
        fprintf(stderr, "cannot load %s: %s\n", path, dlerror());
        return NULL;
    }
    dsmoe_kernel_plugin_entry_fn entry = (dsmoe_kernel_plugin_entry_fn)dlsym(*dl, DSMOE_KERNEL_PLUGIN_SYMBOL);
    return entry ? entry() : NULL;
}

// A context with the plugin's default settings (as the core would resolve them with nothing set).
static dsmoe_kernel_ctx *make_ctx(const dsmoe_kernel_plugin_v3 *T, int threads) {
    const char *vals[64];
    assert_true(T->n_params <= 64);
    for (int i = 0; i < T->n_params; i++)
        vals[i] = T->params[i].default_value;
    dsmoe_kernel_options opt = {.threads = threads,
                                .param_values = T->n_params ? vals : NULL,
                                .n_param_values = T->n_params};
    dsmoe_kernel_ctx *ctx = NULL;
    char err[512] = "";
    dsmoe_status s = T->init(&opt, &ctx, err, sizeof err);
    if (s != DSMOE_OK) fail_msg("%s init: %s: %s", T->name, dsmoe_status_name(s), err);
    return ctx;
}

// A strict context with DSMOE_STRICT_<knob> set during its init (knobs are read there).
__attribute__((unused)) static dsmoe_kernel_ctx *strict_ctx_with(const char *var, const char *value, int threads) {
    if (var) setenv(var, value, 1);
    dsmoe_kernel_ctx *ctx = make_ctx(S, threads);
    if (var) unsetenv(var);
    return ctx;
}

static void *dev(const dsmoe_kernel_plugin_v3 *T, dsmoe_kernel_ctx *ctx, size_t bytes, uint32_t flags) {
    void *p = NULL;
    OK(T, ctx, T->alloc(ctx, bytes, flags, &p));
    return p;
}

// Waits through an event recorded now on q (what the core does before reading host results).
static dsmoe_status wait_queue(const dsmoe_kernel_plugin_v3 *T, dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) {
    dsmoe_kernel_event *ev;
    OK(T, ctx, T->event_create(ctx, &ev));
    dsmoe_status s = T->event_record(ctx, ev, q);
    if (s == DSMOE_OK) s = T->event_synchronize(ctx, ev);
    T->event_destroy(ctx, ev);
    return s;
}

static uint64_t rng_state = 12345;
static float rnd(void) { // uniform in [-1, 1)
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(rng_state >> 40) / 8388608.0f - 1.0f;
}

// Group setup: both plugins loaded, no strict knob inherited from the environment.
static int setup(void **state) {
    unsetenv("DSMOE_STRICT_BREAK");
    unsetenv("DSMOE_STRICT_NO_PROTECT");
    unsetenv("DSMOE_STRICT_ALWAYS_CLOSED");
    unsetenv("DSMOE_STRICT_CPU_PLUGIN");
    S = open_plugin(DSMOE_STRICT_PLUGIN_FILE, &dl_strict);
    P = open_plugin(DSMOE_CPU_PLUGIN_FILE, &dl_cpu);
    return S && P ? 0 : -1;
}

static int teardown(void **state) {
    dlclose(dl_strict);
    dlclose(dl_cpu);
    return 0;
}

#endif
