// tests/drivers/test_distill.c: knowledge distillation (distill.*, Mixture-of-Students) through the training driver,
// each point against a run computed another way: beta = 0 is plain training bitwise; a student that starts
// as its teacher (the same architecture and weights, no noise, no drops) has a KD term of exactly 0; with
// alpha = 0 a student from scratch drives the KD term toward 0; staged KD stops at distill.stop_step (the
// metrics say so); resuming mid-distillation equals the uninterrupted run bitwise; a shallower student
// with fewer experts trains; and a bad teacher is refused by name before any step.
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill.h"        // dsmoe_teacher_check
#include "train_testutil.h" // rt, tmpdir, small_deck, load, train_on, assert_same_checkpoint

static char teacher[512]; // the teacher's checkpoint, trained once

// Writes small_deck with its first `find` replaced by `replace` to path.
static void write_edited_deck(const char *path, const char *find, const char *replace) {
    const char *at = strstr(small_deck, find);
    assert_non_null(at);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "%.*s%s%s", (int)(at - small_deck), small_deck, replace, at + strlen(find));
    assert_int_equal(fclose(f), 0);
}

// The small deck's model trained 12 steps: a teacher that predicts better than chance.
static int make_teacher(void **state) {
    (void)state;
    dsmoe_train_result res;
    dsmoe_err err = {0};
    char extra[1024];
    snprintf(extra, sizeof extra, "train.steps=12 run.output_dir=%s/teacher", tmpdir);
    if (train_on(&rt, small_deck, extra, &res, NULL, &err) != DSMOE_OK) {
        fprintf(stderr, "teacher: %s\n", err.msg);
        return -1;
    }
    snprintf(teacher, sizeof teacher, "%.*s", (int)sizeof teacher - 1, res.checkpoint);
    return 0;
}

// alpha = 1, beta = 0: the teacher runs and the KD term is computed, but the loss is the plain one.
static void test_beta_zero_is_plain_training(void **state) {
    (void)state;
    dsmoe_train_result plain, kd;
    double h1[8], h2[8];
    train_ok(small_deck, "train.steps=8 run.output_dir=%s/plain", &plain, h1, tmpdir);
    train_ok(small_deck, "train.steps=8 run.output_dir=%s/beta0 distill.teacher=%s distill.beta=0", &kd, h2, tmpdir,
             teacher);
    assert_memory_equal(h1, h2, sizeof h1);
    assert_same_checkpoint(plain.checkpoint, kd.checkpoint);
    assert_true(kd.last_kd > 0); // the term was computed
    assert_true(isnan(plain.last_kd));
}

// A student of the teacher's architecture that starts from the teacher's checkpoint, with no noise and
// capacity for every token in training and evaluation alike, computes the teacher's logits exactly: KL = 0.
static void test_student_equal_to_teacher(void **state) {
    (void)state;
    dsmoe_train_result res;
    char dir[600];
    snprintf(dir, sizeof dir, "%s/same", tmpdir);
    // The teacher's weights as the student's starting point (with its optimizer state), under another name.
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "mkdir -p %s && cp %s %s/start.safetensors", dir, teacher, dir);
    assert_int_equal(system(cmd), 0);
    // The teacher's deck, dropless too (its eval capacity would drop tokens the student keeps).
    char deck[700];
    snprintf(deck, sizeof deck, "%s/dropless-teacher.deck", dir);
    write_edited_deck(deck, "[moe]\n", "[moe]\ndrop_tokens = false\n");
    train_ok(small_deck, "train.steps=13 run.output_dir=%s checkpoint.resume=%s/start.safetensors moe.noise=none "
             "moe.token_selection=position moe.drop_tokens=false distill.teacher=%s distill.alpha=0 "
             "distill.teacher_deck=%s", &res, NULL,
             dir, dir, teacher, deck);
    assert_true(res.last_kd == 0.0);
}

// alpha = 0: the student learns only from the teacher, and the KD term falls toward 0.
static void test_alpha_zero_drives_kd_down(void **state) {
    (void)state;
    dsmoe_train_result first, last;
    train_ok(small_deck, "train.steps=1 run.output_dir=%s/a0_1 distill.teacher=%s distill.alpha=0", &first, NULL,
             tmpdir, teacher);
    train_ok(small_deck, "train.steps=60 train.decay_steps=60 run.output_dir=%s/a0_60 distill.teacher=%s distill.alpha=0",
             &last, NULL,
             tmpdir, teacher);
    if (!(last.last_kd < 0.25 * first.last_kd))
        fail_msg("KD %g after 60 steps, %g after 1: expected below a quarter", last.last_kd, first.last_kd);
}

// The rows of <dir>/metrics.csv: kd_loss set on steps 1..3, empty after; a log line would not be checked.
static void test_staged_stop(void **state) {
    (void)state;
    dsmoe_train_result res;
    train_ok(small_deck, "train.steps=6 run.log_every=1 run.output_dir=%s/staged distill.teacher=%s distill.stop_step=3",
             &res, NULL, tmpdir,
             teacher);
    assert_true(isnan(res.last_kd));
    char path[600], line[4096];
    snprintf(path, sizeof path, "%s/staged/metrics.csv", tmpdir);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    assert_non_null(fgets(line, sizeof line, f));
    int col = -1, i = 0;
    for (char *tok = strtok(line, ",\n"); tok; tok = strtok(NULL, ",\n"), i++)
        if (strcmp(tok, "kd_loss") == 0) col = i;
    assert_true(col >= 0);
    int rows = 0;
    while (fgets(line, sizeof line, f)) {
        int step = atoi(line);
        char *p = line;
        for (int c = 0; c < col; c++) p = strchr(p, ',') + 1;
        int empty = *p == ',' || *p == '\n';
        if (step <= 3 && (empty || !(strtod(p, NULL) > 0))) fail_msg("step %d: kd_loss missing: %s", step, line);
        if (step > 3 && !empty) fail_msg("step %d: kd_loss after distill.stop_step = 3: %s", step, line);
        rows++;
    }
    fclose(f);
    assert_int_equal(rows, 6);
}

// 8 steps at once, or 4 then a resume to 8: the same bits (KD on until step 6, so across the resume).
static void test_resume_mid_distillation(void **state) {
    (void)state;
    dsmoe_train_result full, half, rest;
    const char *kd = "distill.temperature=2 distill.alpha=0.5 distill.stop_step=6";
    train_ok(small_deck, "train.steps=8 run.output_dir=%s/full distill.teacher=%s %s",
             &full, NULL, tmpdir, teacher, kd);
    train_ok(small_deck, "train.steps=8 checkpoint.every=4 run.output_dir=%s/half distill.teacher=%s %s", &half, NULL,
             tmpdir, teacher, kd);
    char four[700];
    snprintf(four, sizeof four, "%s/half/checkpoints/step_00000004.safetensors", tmpdir);
    train_ok(small_deck, "train.steps=8 run.output_dir=%s/rest checkpoint.resume=%s distill.teacher=%s %s", &rest, NULL,
             tmpdir, four, teacher, kd);
    assert_same_checkpoint(full.checkpoint, rest.checkpoint);
    assert_same_checkpoint(full.checkpoint, half.checkpoint);
}

// A shallower student with fewer experts (Mixture-of-Students, the teacher has 2 layers and 4 experts):
// its KD term falls as it trains.
static void test_shallower_student(void **state) {
    (void)state;
    dsmoe_train_result a, b;
    train_ok(small_deck, "train.steps=1 model.layers=1 moe.every=1 moe.experts=2 run.output_dir=%s/mos1 distill.teacher=%s",
             &a, NULL, tmpdir,
             teacher);
    train_ok(small_deck, "train.steps=30 model.layers=1 moe.every=1 moe.experts=2 run.output_dir=%s/mos30 distill.teacher=%s",
             &b, NULL,
             tmpdir, teacher);
    assert_true(isfinite(b.valid_loss));
    if (!(b.last_kd < a.last_kd)) fail_msg("KD %g after 30 steps, %g after 1", b.last_kd, a.last_kd);
}

// distill.init_layers: a 1-layer student (MoE on its only block) starts as the teacher's block 1 (its MoE
// block), embeddings and final layer norm; with learning rate 0 its checkpoint holds those tensors bit for bit.
static void test_init_layers(void **state) {
    (void)state;
    dsmoe_train_result res;
    train_ok(small_deck, "train.steps=1 train.lr=0 train.min_lr=0 model.layers=1 moe.every=1 run.output_dir=%s/init "
             "distill.teacher=%s distill.init_layers=1", &res, NULL, tmpdir, teacher);
    dsmoe_st_file *fs, *ft;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_st_open(res.checkpoint, &fs, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_open(teacher, &ft, &err), DSMOE_OK);
    int compared = 0;
    for (int i = 0; i < dsmoe_st_count(fs); i++) {
        const dsmoe_st_tensor *a = dsmoe_st_at(fs, i);
        if (strncmp(a->name, "optim.", 6) == 0) continue;
        char name[160];
        if (strncmp(a->name, "h.0.", 4) == 0) snprintf(name, sizeof name, "h.1.%s", a->name + 4);
        else snprintf(name, sizeof name, "%s", a->name);
        const dsmoe_st_tensor *b = dsmoe_st_find(ft, name);
        if (!b) fail_msg("the teacher has no %s (for the student's %s)", name, a->name);
        assert_int_equal(a->nbytes, b->nbytes);
        if (memcmp(a->data, b->data, a->nbytes) != 0) fail_msg("student %s differs from teacher %s", a->name, name);
        compared++;
    }
    assert_true(compared > 10);
    dsmoe_st_close(fs);
    dsmoe_st_close(ft);
    // A dense student block cannot start as the teacher's MoE block: refused, naming both.
    dsmoe_err e2 = {0};
    char extra[2048];
    snprintf(extra, sizeof extra, "train.steps=1 model.layers=1 moe.experts=0 run.output_dir=%s/init_bad distill.teacher=%s "
             "distill.init_layers=1", tmpdir, teacher);
    assert_int_not_equal(train_on(&rt, small_deck, extra, &res, NULL, &e2), DSMOE_OK);
    if (!strstr(e2.msg, "h.1.mlp") || !strstr(e2.msg, "block 0")) fail_msg("message: %s", e2.msg);
    snprintf(extra, sizeof extra, "train.steps=1 run.output_dir=%s/init_bad distill.teacher=%s distill.init_layers=0,2",
             tmpdir, teacher);
    assert_int_not_equal(train_on(&rt, small_deck, extra, &res, NULL, &e2), DSMOE_OK);
    if (!strstr(e2.msg, "distill.init_layers = 0,2: item 2")) fail_msg("message: %s", e2.msg);
}

static void expect_refused(const char *extra, const char *needle) {
    dsmoe_train_result res;
    dsmoe_err err = {0};
    char buf[2048];
    snprintf(buf, sizeof buf, "train.steps=2 run.output_dir=%s/bad %s", tmpdir, extra);
    assert_int_not_equal(train_on(&rt, small_deck, buf, &res, NULL, &err), DSMOE_OK);
    if (!strstr(err.msg, needle)) fail_msg("message '%s' lacks '%s'", err.msg, needle);
    char path[600];
    snprintf(path, sizeof path, "%s/bad/metrics.csv", tmpdir);
    FILE *f = fopen(path, "r"); // refused before any step
    if (f) fclose(f);
    assert_null(f);
}

static void test_bad_teacher(void **state) {
    (void)state;
    char extra[2048];
    snprintf(extra, sizeof extra, "distill.teacher=%s/missing.safetensors", tmpdir);
    expect_refused(extra, "missing.safetensors");
    snprintf(extra, sizeof extra, "distill.teacher=%s model.vocab=48", teacher);
    expect_refused(extra, "model.vocab = 32");
    snprintf(extra, sizeof extra, "distill.teacher=%s model.seq_len=8", teacher);
    expect_refused(extra, "sequence length");
    // A deck that does not describe the checkpoint: its tensors do not fit.
    char deck[600];
    snprintf(deck, sizeof deck, "%s/other.deck", tmpdir);
    write_edited_deck(deck, "hidden = 32", "hidden = 64");
    snprintf(extra, sizeof extra, "distill.teacher=%s distill.teacher_deck=%s", teacher, deck);
    expect_refused(extra, "distill.teacher");

    // dsmoe --check's path: the teacher verifies against its deck without a model; a damaged file or a
    // deck that does not describe it is refused, naming distill.teacher.
    dsmoe_config cfg;
    dsmoe_err err = {0};
    snprintf(extra, sizeof extra, "distill.teacher=%s", teacher);
    load(small_deck, extra, &cfg, NULL);
    if (dsmoe_teacher_check(&cfg, 1, 0, &err) != DSMOE_OK) fail_msg("check of the teacher: %s", err.msg);
    snprintf(extra, sizeof extra, "distill.teacher=%s distill.teacher_deck=%s", teacher, deck);
    load(small_deck, extra, &cfg, NULL);
    assert_int_not_equal(dsmoe_teacher_check(&cfg, 1, 0, &err), DSMOE_OK);
    if (!strstr(err.msg, "distill.teacher")) fail_msg("message: %s", err.msg);
    char damaged[600];
    snprintf(damaged, sizeof damaged, "%s/damaged.safetensors", tmpdir);
    FILE *in = fopen(teacher, "rb"), *out = fopen(damaged, "wb");
    assert_non_null(in);
    assert_non_null(out);
    assert_int_equal(fseek(in, 0, SEEK_END), 0);
    long size = ftell(in), n = 0;
    rewind(in);
    for (int ch; (ch = fgetc(in)) != EOF; n++) fputc(n == size - 100 ? ch ^ 0x40 : ch, out); // one bit of a tensor
    fclose(in);
    fclose(out);
    snprintf(extra, sizeof extra, "distill.teacher=%s", damaged);
    load(small_deck, extra, &cfg, NULL);
    assert_int_not_equal(dsmoe_teacher_check(&cfg, 1, 0, &err), DSMOE_OK);
    if (!strstr(err.msg, "distill.teacher") || !strstr(err.msg, "damaged.safetensors")) fail_msg("message: %s", err.msg);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_beta_zero_is_plain_training, make_teacher),
        cmocka_unit_test(test_student_equal_to_teacher),
        cmocka_unit_test(test_alpha_zero_drives_kd_down),
        cmocka_unit_test(test_staged_stop),
        cmocka_unit_test(test_resume_mid_distillation),
        cmocka_unit_test(test_shallower_student),
        cmocka_unit_test(test_init_layers),
        cmocka_unit_test(test_bad_teacher),
    };
    return train_test_main(argc, argv, "test_distill", tests, sizeof tests / sizeof tests[0]);
}
