// tests/drivers/test_op_profile.c: the per-call profile (core/plugins/op_profile.h) through the real cpu
// and mpi plugins: calls counted by call site and only inside windows, the by-member table adding the
// sites of one member, the TSV's totals adding up; and train.profile: the calls of a training run
// against the counts the model's structure gives, with the same losses as the run without it.
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "op_profile.h"
#include "train_testutil.h" // rt, tmpdir, small_deck, load, train_on, train_test_main

// ----------------------------------------------------------------------------------------------------
// reading a profile.tsv back

typedef struct tsv_row {
    char kind[16], op[64], site[128];
    long calls;
    double total_ms;
} tsv_row;

typedef struct tsv {
    tsv_row rows[256];
    int n;
    double wall_ms, outside_ms;
    long wall_calls;
} tsv;

static void read_tsv(const char *path, tsv *t) {
    memset(t, 0, sizeof *t);
    FILE *f = fopen(path, "r");
    if (!f) fail_msg("cannot open %s", path);
    char line[1024];
    assert_non_null(fgets(line, sizeof line, f));
    assert_string_equal(line, "kind\top\tsite\tcalls\ttotal_ms\tmean_us\tshare\n");
    int saw_wall = 0, saw_outside = 0;
    while (fgets(line, sizeof line, f)) {
        char *field[7] = {0};
        int nf = 0;
        for (char *p = line, *tab; nf < 7; p = tab + 1) {
            field[nf++] = p;
            if (!(tab = strpbrk(p, "\t\n"))) break;
            *tab = '\0';
        }
        if (!strcmp(field[0], "wall")) {
            saw_wall = 1;
            t->wall_calls = atol(field[3]);
            t->wall_ms = atof(field[4]);
        } else if (!strcmp(field[0], "outside")) {
            saw_outside = 1;
            t->outside_ms = atof(field[4]);
        } else {
            assert_true(nf == 7 && t->n < 256);
            tsv_row *r = &t->rows[t->n++];
            snprintf(r->kind, sizeof r->kind, "%s", field[0]);
            snprintf(r->op, sizeof r->op, "%s", field[1]);
            snprintf(r->site, sizeof r->site, "%s", field[2]);
            r->calls = atol(field[3]);
            r->total_ms = atof(field[4]);
        }
    }
    fclose(f);
    assert_true(saw_wall && saw_outside);
}

// Calls of op (of that kind) over all sites; *sites gets how many sites it has.
static long calls_of(const tsv *t, const char *kind, const char *op, int *sites) {
    long calls = 0;
    int n = 0;
    for (int i = 0; i < t->n; i++)
        if (!strcmp(t->rows[i].kind, kind) && !strcmp(t->rows[i].op, op)) calls += t->rows[i].calls, n++;
    if (sites) *sites = n;
    return calls;
}

// The timed calls' total, and their count, equal the wall line's and the outside line is the rest.
static void assert_totals(const tsv *t) {
    double sum = 0;
    long calls = 0;
    for (int i = 0; i < t->n; i++) {
        assert_true(t->rows[i].calls > 0 && t->rows[i].total_ms >= 0);
        sum += t->rows[i].total_ms, calls += t->rows[i].calls;
    }
    assert_int_equal(calls, t->wall_calls);
    assert_true(sum <= t->wall_ms + 1e-3);
    assert_true(fabs(t->wall_ms - sum - t->outside_ms) < 1e-3 * t->n + 1e-3);
}

// ----------------------------------------------------------------------------------------------------
// calls at known sites

static float *buf;

static dsmoe_status zero_three_times(dsmoe_err *err) { // one site, three calls
    for (int i = 0; i < 3; i++) KCALL(&rt, zero, buf, 64 * sizeof(float));
    return DSMOE_OK;
}

static dsmoe_status zero_once(dsmoe_err *err) { // another site of the same member
    KCALL(&rt, zero, buf, 64 * sizeof(float));
    return DSMOE_OK;
}

static dsmoe_status sum_once(dsmoe_err *err) {
    CCOLL(&rt, allreduce, rt.world, DSMOE_IN_PLACE, buf, 64, DSMOE_FLOAT32, DSMOE_SUM);
    return DSMOE_OK;
}

static void test_sites_and_windows(void **state) {
    (void)state;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_rt_alloc(&rt, 64 * sizeof(float), 0, (void **)&buf, "buf", &err), DSMOE_OK);
    dsmoe_op_profile *prof;
    assert_int_equal(dsmoe_prof_create(&prof, &err), DSMOE_OK);
    rt.prof = prof;
    assert_int_equal(zero_once(&err), DSMOE_OK); // not recording: not counted
    assert_int_equal(dsmoe_prof_record(&rt, 1, &err), DSMOE_OK);
    assert_int_equal(zero_three_times(&err), DSMOE_OK);
    assert_int_equal(zero_once(&err), DSMOE_OK);
    assert_int_equal(sum_once(&err), DSMOE_OK);
    assert_int_equal(dsmoe_prof_record(&rt, 0, &err), DSMOE_OK);
    assert_int_equal(zero_once(&err), DSMOE_OK); // between windows: not counted
    assert_int_equal(dsmoe_prof_record(&rt, 1, &err), DSMOE_OK);
    assert_int_equal(sum_once(&err), DSMOE_OK);
    assert_int_equal(dsmoe_prof_record(&rt, 1, &err), DSMOE_OK); // already on: the window goes on
    assert_int_equal(dsmoe_prof_record(&rt, 0, &err), DSMOE_OK);
    rt.prof = NULL;

    dsmoe_prof_totals tot = dsmoe_prof_totals_of(prof);
    assert_int_equal(tot.windows, 2);
    assert_int_equal(tot.calls, 6);
    assert_true(tot.calls_s >= 0 && tot.calls_s <= tot.wall_s);

    char path[512];
    snprintf(path, sizeof path, "%s/sites.tsv", tmpdir);
    assert_int_equal(dsmoe_prof_write_tsv(prof, path, &err), DSMOE_OK);
    tsv t;
    read_tsv(path, &t);
    assert_totals(&t);
    int sites;
    assert_int_equal(calls_of(&t, "kernel", "zero", &sites), 4);
    assert_int_equal(sites, 2);
    assert_int_equal(calls_of(&t, "comm", "allreduce", &sites), 2);
    assert_int_equal(sites, 1);
    assert_int_equal(t.n, 3);
    long zero_calls[2] = {0, 0}; // the loop's site and the single call's, in either order
    int nz = 0;
    for (int i = 0; i < t.n; i++) { // each site names this file and its own line
        assert_non_null(strstr(t.rows[i].site, "test_op_profile.c:"));
        if (!strcmp(t.rows[i].op, "zero")) zero_calls[nz++] = t.rows[i].calls;
    }
    assert_true((zero_calls[0] == 3 && zero_calls[1] == 1) || (zero_calls[0] == 1 && zero_calls[1] == 3));

    // The by-member table has one zero row with both sites' calls; by site, two.
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    dsmoe_prof_print(prof, f, "T", 0, 0);
    fclose(f);
    int zero_rows = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        char kind[16], name[64];
        long calls;
        if (sscanf(line, " %15s %63s %ld", kind, name, &calls) == 3 && !strcmp(name, "zero")) {
            zero_rows++;
            assert_int_equal(calls, 4);
        }
    }
    assert_int_equal(zero_rows, 1);
    free(text);
    text = NULL;
    f = open_memstream(&text, &len);
    dsmoe_prof_print(prof, f, "T", 1, 0);
    fclose(f);
    zero_rows = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) zero_rows += strstr(line, " zero test_op_profile.c:") != NULL;
    assert_int_equal(zero_rows, 2);
    free(text);

    dsmoe_prof_free(prof);
    rt.kern->free(rt.kctx, buf);
}

// ----------------------------------------------------------------------------------------------------
// train.profile

static void test_training_profile(void **state) {
    (void)state;
    enum { STEPS = 4 };
    double plain[STEPS], profiled[STEPS];
    dsmoe_train_result r;
    train_ok(small_deck, "run.output_dir=%s/plain train.steps=%d", &r, plain, tmpdir, STEPS);
    train_ok(small_deck, "run.output_dir=%s/prof train.steps=%d train.profile=true", &r, profiled, tmpdir, STEPS);
    assert_memory_equal(plain, profiled, sizeof plain); // the waits change no number
    assert_null(rt.prof);                                // the driver's profile ends with the run

    // What the model's structure gives: every MoE layer runs 2 grouped GEMMs forward and 2 backward plus
    // 2 grouped weight gradients per micro-step; one adamw per step; steps 2..STEPS are profiled.
    dsmoe_config cfg;
    load(small_deck, "train.steps=4", &cfg, NULL);
    long micro = cfg.batch / cfg.micro_batch, profiled_steps = STEPS - 1;
    assert_true(cfg.n_moe_layers >= 1 && micro >= 2);
    char path[512];
    snprintf(path, sizeof path, "%s/prof/profile.tsv", tmpdir);
    tsv t;
    read_tsv(path, &t);
    assert_totals(&t);
    assert_int_equal(calls_of(&t, "kernel", "gemm_grouped", NULL), profiled_steps * micro * cfg.n_moe_layers * 4);
    assert_int_equal(calls_of(&t, "kernel", "gemm_grouped_wgrad", NULL), profiled_steps * micro * cfg.n_moe_layers * 2);
    assert_int_equal(calls_of(&t, "kernel", "adamw", NULL), profiled_steps);
    assert_int_equal(calls_of(&t, "kernel", "gate", NULL), profiled_steps * micro * cfg.n_moe_layers);
    snprintf(path, sizeof path, "%s/plain/profile.tsv", tmpdir);
    assert_int_equal(access(path, F_OK), -1); // no profile unless asked
}

// One step: nothing after the first, so nothing is timed and no file is written.
static void test_one_step_profiles_nothing(void **state) {
    (void)state;
    dsmoe_train_result r;
    train_ok(small_deck, "run.output_dir=%s/one train.steps=1 train.profile=true", &r, NULL, tmpdir);
    char path[512];
    snprintf(path, sizeof path, "%s/one/profile.tsv", tmpdir);
    assert_int_equal(access(path, F_OK), -1);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sites_and_windows),
        cmocka_unit_test(test_training_profile),
        cmocka_unit_test(test_one_step_profiles_nothing),
    };
    return train_test_main(argc, argv, "test_op_profile", tests, sizeof tests / sizeof tests[0]);
}
