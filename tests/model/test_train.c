// tests/model/test_train.c: the training driver end to end on the synthetic corpus: convergence toward the
// corpus's loss bound, bitwise determinism, resume == uninterrupted (bitwise), checkpoint refusals,
// listing a directory of thousands of checkpoints, and the learning-rate schedule.
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "train_testutil.h" // rt, tmpdir, small_deck, load, train_on, assert_same_checkpoint, train_test_main

static dsmoe_status train(const char *deck, const char *extra, dsmoe_train_result *res, double *history,
                          dsmoe_err *err) {
    return train_on(&rt, deck, extra, res, history, err);
}

static void test_lr_schedule(void **state) {
    (void)state;
    dsmoe_config cfg;
    char *text = NULL;
    load(small_deck, "train.lr=1.0 train.min_lr=0.1 train.warmup_steps=4 train.decay_steps=14 train.steps=20", &cfg, &text);
    free(text);
    assert_float_equal(dsmoe_lr_at(&cfg, 0), 0.25, 1e-6);
    assert_float_equal(dsmoe_lr_at(&cfg, 3), 1.0, 1e-6);
    assert_float_equal(dsmoe_lr_at(&cfg, 4), 1.0, 1e-6);            // decay starts at warm-up's end
    assert_float_equal(dsmoe_lr_at(&cfg, 9), 0.1 + 0.9 * 0.5, 1e-6); // half way: cos(pi/2) = 0
    assert_float_equal(dsmoe_lr_at(&cfg, 14), 0.1, 1e-6);
    assert_float_equal(dsmoe_lr_at(&cfg, 19), 0.1, 1e-6);            // held at min_lr after decay_steps
}

static void test_deterministic(void **state) {
    (void)state;
    double h1[12], h2[12];
    dsmoe_train_result r;
    dsmoe_err err = {0};
    char extra[1024];
    snprintf(extra, sizeof extra, "run.output_dir=%s/det1 train.steps=12", tmpdir);
    assert_int_equal(train(small_deck, extra, &r, h1, &err), DSMOE_OK);
    snprintf(extra, sizeof extra, "run.output_dir=%s/det2 train.steps=12", tmpdir);
    assert_int_equal(train(small_deck, extra, &r, h2, &err), DSMOE_OK);
    assert_memory_equal(h1, h2, sizeof h1);
    for (int i = 0; i < 12; i++) assert_true(isfinite(h1[i]));
}

// Resume at step 6 continues exactly as the run that never stopped.
static void test_resume_equals_uninterrupted(void **state) {
    (void)state;
    double full[12], first[12], second[12];
    dsmoe_train_result rf, r1, r2;
    dsmoe_err err = {0};
    char extra[1024];
    snprintf(extra, sizeof extra, "run.output_dir=%s/full train.steps=12", tmpdir);
    assert_int_equal(train(small_deck, extra, &rf, full, &err), DSMOE_OK);
    snprintf(extra, sizeof extra, "run.output_dir=%s/split train.steps=6", tmpdir);
    assert_int_equal(train(small_deck, extra, &r1, first, &err), DSMOE_OK);
    snprintf(extra, sizeof extra, "run.output_dir=%s/split train.steps=12 checkpoint.resume=auto", tmpdir);
    assert_int_equal(train(small_deck, extra, &r2, second, &err), DSMOE_OK);
    assert_int_equal(r2.steps_done, 12);
    assert_memory_equal(full, first, 6 * sizeof(double));
    assert_memory_equal(full + 6, second + 6, 6 * sizeof(double));
    assert_same_checkpoint(rf.checkpoint, r2.checkpoint);
}

static void test_bad_checkpoints_refused(void **state) {
    (void)state;
    dsmoe_train_result r;
    dsmoe_err err = {0};
    char extra[8192], path[512], cmd[8192];
    snprintf(extra, sizeof extra, "run.output_dir=%s/bad train.steps=1", tmpdir);
    assert_int_equal(train(small_deck, extra, &r, NULL, &err), DSMOE_OK);
    // A different model shape.
    snprintf(extra, sizeof extra, "run.output_dir=%s/bad2 model.hidden=64 checkpoint.resume=%s",
             tmpdir, r.checkpoint);
    assert_int_not_equal(train(small_deck, extra, &r, NULL, &err), DSMOE_OK);
    assert_non_null(strstr(err.msg, "holds a different model"));
    assert_non_null(strstr(err.msg, "hidden=64"));
    // A truncated file.
    snprintf(path, sizeof path, "%s/truncated.safetensors", tmpdir);
    snprintf(cmd, sizeof cmd, "head -c 3000 %s > %s", r.checkpoint, path);
    assert_int_equal(system(cmd), 0);
    snprintf(extra, sizeof extra, "run.output_dir=%s/bad3 checkpoint.resume=%s", tmpdir, path);
    assert_int_not_equal(train(small_deck, extra, &r, NULL, &err), DSMOE_OK);
    assert_non_null(strstr(err.msg, "truncated.safetensors"));
    // Not a checkpoint at all.
    snprintf(path, sizeof path, "%s/text.safetensors", tmpdir);
    FILE *f = fopen(path, "w");
    fputs("this is not a checkpoint\n", f);
    fclose(f);
    snprintf(extra, sizeof extra, "run.output_dir=%s/bad4 checkpoint.resume=%s", tmpdir, path);
    assert_int_not_equal(train(small_deck, extra, &r, NULL, &err), DSMOE_OK);
    assert_non_null(strstr(err.msg, "text.safetensors"));
}

// A checkpoint directory is listed whole, however many files it holds (a run that keeps every checkpoint
// may write thousands): ascending by step, other names left out; and resume = auto takes the newest of
// 5000 names wherever the directory's order puts it. The other 4999 files are empty (they would not
// verify); the newest is a hard link to a real checkpoint.
static void test_many_checkpoints(void **state) {
    (void)state;
    dsmoe_train_result r;
    dsmoe_err err = {0};
    char extra[1024], dir[512], path[1024];
    snprintf(extra, sizeof extra, "run.output_dir=%s/many_src train.steps=1", tmpdir);
    assert_int_equal(train(small_deck, extra, &r, NULL, &err), DSMOE_OK);
    snprintf(dir, sizeof dir, "%s/many", tmpdir);
    assert_int_equal(mkdir(dir, 0755), 0);
    const int count = 5000;
    snprintf(path, sizeof path, "%s/step_%08d.safetensors", dir, count);
    assert_int_equal(link(r.checkpoint, path), 0);
    for (int i = 0; i < count - 1; i++) { // steps 7, 14, ... in an order unlike the sorted one
        int step = 1 + (int)((uint64_t)(i * 7919 % (count - 1)));
        snprintf(path, sizeof path, "%s/step_%08d.safetensors", dir, step);
        FILE *f = fopen(path, "w");
        assert_non_null(f);
        fclose(f);
    }
    const char *others[] = {"step_1.safetensors", "step_00000003.safetensors.tmp.12", "step_0000000x.safetensors",
                            "notes.txt"};
    for (size_t k = 0; k < sizeof others / sizeof others[0]; k++) {
        snprintf(path, sizeof path, "%s/%s", dir, others[k]);
        FILE *f = fopen(path, "w");
        assert_non_null(f);
        fclose(f);
    }
    int *steps = NULL, n = -1;
    assert_int_equal(dsmoe_checkpoint_list(dir, &steps, &n, &err), DSMOE_OK);
    assert_int_equal(n, count);
    for (int i = 0; i < n; i++) assert_int_equal(steps[i], i + 1);
    free(steps);
    char latest[4096];
    assert_int_equal(dsmoe_checkpoint_find_latest(dir, latest, sizeof latest, &err), DSMOE_OK);
    snprintf(path, sizeof path, "%s/step_%08d.safetensors", dir, count);
    assert_string_equal(latest, path);
    snprintf(path, sizeof path, "%s/none", tmpdir);
    assert_int_equal(dsmoe_checkpoint_list(path, &steps, &n, &err), DSMOE_OK);
    assert_int_equal(n, 0);
    assert_null(steps);
}

// Training on the synthetic corpus approaches its computable loss bound.
static void test_converges_to_bound(void **state) {
    (void)state;
    dsmoe_train_result r;
    dsmoe_err err = {0};
    char extra[1024];
    snprintf(extra, sizeof extra,
             "run.output_dir=%s/conv moe.noise=none moe.token_selection=position moe.capacity_factor=2.0 "
             "train.steps=250 train.batch=16 train.micro_batch=16 train.lr=1e-2 train.min_lr=1e-3 "
             "train.warmup_steps=10 train.decay_steps=0 train.eval_batches=4 checkpoint.final=false",
             tmpdir);
    assert_int_equal(train(small_deck, extra, &r, NULL, &err), DSMOE_OK);
    printf("synthetic bound %.4f, validation loss %.4f, uniform %.4f\n", r.loss_bound, r.valid_loss, log(32.0));
    assert_true(r.loss_bound > 0);
    assert_true(r.valid_loss >= r.loss_bound - 0.02); // nothing beats the bound (up to sampling noise)
    assert_true(r.valid_loss <= r.loss_bound + 0.15);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lr_schedule),
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_resume_equals_uninterrupted),
        cmocka_unit_test(test_bad_checkpoints_refused),
        cmocka_unit_test(test_many_checkpoints),
        cmocka_unit_test(test_converges_to_bound),
    };
    return train_test_main(argc, argv, "dsmoe_test_train", tests, sizeof tests / sizeof tests[0]);
}
