// tests/train_testutil.h: what the training-driver tests (test_train.c, test_train_bf16.c) share: the
// small model's deck, decks loaded with command-line style overrides, a training run (train_ok fails the
// test on an error), a bitwise
// comparison of two checkpoints, and main's set-up (the runtime and a temporary directory). Header-only:
// each test program includes it once.
#ifndef DSMOE_TRAIN_TESTUTIL_H
#define DSMOE_TRAIN_TESTUTIL_H
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <mpi.h>

#include "config.h"
#include "safetensors.h"
#include "test_runtime.h" // test_runtime_start
#include "train.h"

static dsmoe_runtime rt; // one compute thread
static char tmpdir[256];

// A small model: a few milliseconds a step.
static const char *small_deck =
    "[run]\nlog_every = 1000\nseed = 7\n"
    "[model]\nvocab = 32\nseq_len = 16\nlayers = 2\nhidden = 32\nheads = 2\n"
    "[moe]\nexperts = 4\ncapacity_factor = 1.0\nmin_capacity = 2\nnoise = rsample\ntoken_selection = random\n"
    "[train]\nbatch = 4\nmicro_batch = 2\nlr = 3e-3\nwarmup_steps = 3\ndecay_steps = 12\neval_every = 0\neval_batches = 1\n"
    "[data]\nsynthetic_sources = 2\nsynthetic_branching = 2\n"
    "[checkpoint]\nkeep = 10\n";

// deck plus command-line style overrides, space-separated ("train.steps=6 checkpoint.resume=auto"), for
// world_size ranks; *text (may be NULL) gets the resolved configuration.
static inline dsmoe_status load_ranks(const char *deck, const char *extra, int world_size, dsmoe_config *cfg,
                                      char **text, dsmoe_err *err) {
    char buf[8192], *ov[32];
    int n = 0;
    snprintf(buf, sizeof buf, "%s", extra);
    for (char *tok = strtok(buf, " "); tok && n < 32; tok = strtok(NULL, " ")) ov[n++] = tok;
    dsmoe_config_sources *src = NULL;
    dsmoe_status s =
        dsmoe_config_load_text(deck, "test.deck", ov, n, (char *const[]){NULL}, world_size, cfg, &src, err);
    if (s == DSMOE_OK && text) *text = dsmoe_config_to_text(cfg, src);
    dsmoe_config_sources_free(src);
    return s;
}

static inline void load(const char *deck, const char *extra, dsmoe_config *cfg, char **text) {
    dsmoe_err err = {0};
    if (load_ranks(deck, extra, 1, cfg, text, &err) != DSMOE_OK) fail_msg("config: %s", err.msg);
}

// One training run on runtime r; the loss of every step into history (may be NULL).
static inline dsmoe_status train_on(dsmoe_runtime *r, const char *deck, const char *extra, dsmoe_train_result *res,
                                    double *history, dsmoe_err *err) {
    dsmoe_config cfg;
    char *text = NULL;
    load(deck, extra, &cfg, &text);
    memset(res, 0, sizeof *res);
    res->loss_history = history;
    dsmoe_status s = dsmoe_train_run(&cfg, text, r, res, err);
    free(text);
    return s;
}

// Trains and fails the test with the driver's message on an error.
static inline void train_ok(const char *deck, const char *fmt, dsmoe_train_result *res, double *history, ...) {
    char extra[4096];
    va_list ap;
    va_start(ap, history);
    vsnprintf(extra, sizeof extra, fmt, ap);
    va_end(ap);
    dsmoe_err err = {0};
    if (train_on(&rt, deck, extra, res, history, &err) != DSMOE_OK) fail_msg("train %s: %s", extra, err.msg);
}

// Every tensor of two checkpoint files holds the same bytes, and the position is the same.
static inline void assert_same_checkpoint(const char *a, const char *b) {
    dsmoe_st_file *fa, *fb;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_st_open(a, &fa, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_open(b, &fb, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_count(fa), dsmoe_st_count(fb));
    for (int i = 0; i < dsmoe_st_count(fa); i++) {
        const dsmoe_st_tensor *ta = dsmoe_st_at(fa, i), *tb = dsmoe_st_find(fb, ta->name);
        assert_non_null(tb);
        assert_int_equal(ta->nbytes, tb->nbytes);
        if (memcmp(ta->data, tb->data, ta->nbytes) != 0)
            fail_msg("tensor %s differs between %s and %s", ta->name, a, b);
    }
    assert_string_equal(dsmoe_st_meta(fa, "step"), dsmoe_st_meta(fb, "step"));
    assert_string_equal(dsmoe_st_meta(fa, "next_sample"), dsmoe_st_meta(fb, "next_sample"));
    dsmoe_st_close(fa);
    dsmoe_st_close(fb);
}

// main: the runtime, a temporary directory /tmp/<name>.XXXXXX (removed when every test passed), the tests.
static inline int train_test_main(int argc, char **argv, const char *name, const struct CMUnitTest *tests,
                                  size_t n_tests) {
    if (test_runtime_start(&argc, &argv, &rt) != 0) return 1;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/%s.XXXXXX", name);
    if (!mkdtemp(tmpdir)) return 1;
    int failed = _cmocka_run_group_tests(name, tests, n_tests, NULL, NULL);
    dsmoe_runtime_close(&rt);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (!failed) (void)!system(cmd);
    MPI_Finalize();
    return failed;
}

#endif
