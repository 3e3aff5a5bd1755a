// tests/drivers/test_op_profile.c: the per-call profile (core/plugins/op_profile.h) through the real cpu
// and mpi plugins, on 1 and 2 ranks: calls counted by call site and only inside windows, every rank's
// rows merged on rank 0 (each rank makes its own number of calls at one site), the by-member table
// adding the sites of one member, the TSV's totals adding up per rank; and train.profile: the calls of a
// training run against the counts the model's structure gives, with the same losses as without it.
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
#include "train_testutil.h" // rt, tmpdir, small_deck, load, train_ok, test_runtime_start

// ----------------------------------------------------------------------------------------------------
// reading a profile.tsv back

typedef struct tsv_row {
    int rank;
    char kind[16], op[64], site[128];
    long calls;
    double total_ms;
} tsv_row;

typedef struct tsv {
    tsv_row rows[512];
    int n;
    double wall_ms[8], outside_ms[8];
    long wall_calls[8];
    int saw_wall[8], saw_outside[8];
} tsv;

static void read_tsv(const char *path, tsv *t) {
    memset(t, 0, sizeof *t);
    FILE *f = fopen(path, "r");
    if (!f) fail_msg("cannot open %s", path);
    char line[1024];
    assert_non_null(fgets(line, sizeof line, f));
    assert_string_equal(line, "rank\tkind\top\tsite\tcalls\ttotal_ms\tmean_us\tshare\n");
    while (fgets(line, sizeof line, f)) {
        char *field[8] = {0};
        int nf = 0;
        for (char *p = line, *tab; nf < 8; p = tab + 1) {
            field[nf++] = p;
            if (!(tab = strpbrk(p, "\t\n"))) break;
            *tab = '\0';
        }
        assert_int_equal(nf, 8);
        int r = atoi(field[0]);
        assert_true(r >= 0 && r < 8);
        if (!strcmp(field[1], "wall")) {
            t->saw_wall[r]++;
            t->wall_calls[r] = atol(field[4]);
            t->wall_ms[r] = atof(field[5]);
        } else if (!strcmp(field[1], "outside")) {
            t->saw_outside[r]++;
            t->outside_ms[r] = atof(field[5]);
        } else {
            assert_true(t->n < 512);
            tsv_row *row = &t->rows[t->n++];
            row->rank = r;
            snprintf(row->kind, sizeof row->kind, "%s", field[1]);
            snprintf(row->op, sizeof row->op, "%s", field[2]);
            snprintf(row->site, sizeof row->site, "%s", field[3]);
            row->calls = atol(field[4]);
            row->total_ms = atof(field[5]);
        }
    }
    fclose(f);
}

// Calls of op (of that kind) on rank r over all sites; *sites gets how many sites it has there.
static long calls_of(const tsv *t, int r, const char *kind, const char *op, int *sites) {
    long calls = 0;
    int n = 0;
    for (int i = 0; i < t->n; i++)
        if (t->rows[i].rank == r && !strcmp(t->rows[i].kind, kind) && !strcmp(t->rows[i].op, op))
            calls += t->rows[i].calls, n++;
    if (sites) *sites = n;
    return calls;
}

// Every rank has its wall and outside lines once; its timed calls' total and count equal the wall
// line's, and the outside line is the rest.
static void assert_totals(const tsv *t, int ranks) {
    for (int r = 0; r < ranks; r++) {
        assert_int_equal(t->saw_wall[r], 1);
        assert_int_equal(t->saw_outside[r], 1);
        double sum = 0;
        long calls = 0;
        int n = 0;
        for (int i = 0; i < t->n; i++) {
            if (t->rows[i].rank != r) continue;
            assert_true(t->rows[i].calls > 0 && t->rows[i].total_ms >= 0);
            sum += t->rows[i].total_ms, calls += t->rows[i].calls, n++;
        }
        assert_int_equal(calls, t->wall_calls[r]);
        assert_true(sum <= t->wall_ms[r] + 1e-3);
        assert_true(fabs(t->wall_ms[r] - sum - t->outside_ms[r]) < 1e-6 * n + 2e-6);
    }
    for (int r = ranks; r < 8; r++) assert_int_equal(t->saw_wall[r], 0);
}

// The table as text (dsmoe_prof_print), caller frees.
static char *print_table(const dsmoe_prof_table *t, int by_site) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    dsmoe_prof_print(t, f, "T", by_site, 0);
    fclose(f);
    return text;
}

// ----------------------------------------------------------------------------------------------------
// calls at known sites

static float *buf;

static dsmoe_status zero_three_times(dsmoe_err *err) { // one site, three calls
    for (int i = 0; i < 3; i++) KCALL(&rt, zero, buf, 64 * sizeof(float));
    return DSMOE_OK;
}

static dsmoe_status sum_once(dsmoe_err *err) {
    CCOLL(&rt, allreduce, rt.world, DSMOE_IN_PLACE, buf, 64, DSMOE_FLOAT32, DSMOE_SUM);
    return DSMOE_OK;
}

static dsmoe_status zero_n_times(int n, dsmoe_err *err) { // another site of the same member
    for (int i = 0; i < n; i++) KCALL(&rt, zero, buf, 64 * sizeof(float));
    return DSMOE_OK;
}

// Rank r: 3 zero calls at one site, r + 1 at another, 2 all-reduces; calls outside windows do not count.
static void test_sites_and_windows(void **state) {
    (void)state;
    dsmoe_err err = {0};
    const int rank = rt.world_rank, ranks = rt.world_size;
    assert_int_equal(dsmoe_rt_alloc(&rt, 64 * sizeof(float), 0, (void **)&buf, "buf", &err), DSMOE_OK);
    dsmoe_op_profile *prof;
    assert_int_equal(dsmoe_prof_create(&prof, &err), DSMOE_OK);
    rt.prof = prof;
    assert_int_equal(zero_n_times(1, &err), DSMOE_OK); // not recording: not counted
    assert_int_equal(dsmoe_prof_record(&rt, 1, &err), DSMOE_OK);
    assert_int_equal(zero_three_times(&err), DSMOE_OK);
    assert_int_equal(zero_n_times(rank + 1, &err), DSMOE_OK);
    assert_int_equal(sum_once(&err), DSMOE_OK);
    assert_int_equal(dsmoe_prof_record(&rt, 0, &err), DSMOE_OK);
    assert_int_equal(zero_n_times(1, &err), DSMOE_OK); // between windows: not counted
    assert_int_equal(dsmoe_prof_record(&rt, 1, &err), DSMOE_OK);
    assert_int_equal(sum_once(&err), DSMOE_OK);
    assert_int_equal(dsmoe_prof_record(&rt, 1, &err), DSMOE_OK); // already on: the window goes on
    assert_int_equal(dsmoe_prof_record(&rt, 0, &err), DSMOE_OK);
    rt.prof = NULL;

    dsmoe_prof_totals tot = dsmoe_prof_totals_of(prof);
    assert_int_equal(tot.windows, 2);
    assert_int_equal(tot.calls, 3 + rank + 1 + 2);
    assert_true(tot.calls_s >= 0 && tot.calls_s <= tot.wall_s);

    dsmoe_prof_table *t;
    assert_int_equal(dsmoe_prof_gather(prof, rt.world_ctl, &t, &err), DSMOE_OK);
    dsmoe_prof_free(prof);
    rt.kern->free(rt.kctx, buf);
    if (rank != 0) {
        assert_null(t);
        return;
    }
    assert_non_null(t);
    char path[512];
    snprintf(path, sizeof path, "%s/sites.tsv", tmpdir);
    assert_int_equal(dsmoe_prof_write_tsv(t, path, &err), DSMOE_OK);
    tsv f;
    read_tsv(path, &f);
    assert_totals(&f, ranks);
    assert_int_equal(f.n, 3 * ranks);
    for (int r = 0; r < ranks; r++) {
        int sites;
        assert_int_equal(calls_of(&f, r, "kernel", "zero", &sites), 3 + r + 1);
        assert_int_equal(sites, 2);
        assert_int_equal(calls_of(&f, r, "comm", "allreduce", &sites), 2);
        assert_int_equal(sites, 1);
        long zero_calls[2] = {0, 0}; // the loop's site and the other, in either order
        int nz = 0;
        for (int i = 0; i < f.n; i++) {
            if (f.rows[i].rank != r) continue;
            assert_non_null(strstr(f.rows[i].site, "test_op_profile.c:")); // this file and its own line
            if (!strcmp(f.rows[i].op, "zero")) zero_calls[nz++] = f.rows[i].calls;
        }
        assert_true((zero_calls[0] == 3 && zero_calls[1] == r + 1) || (zero_calls[0] == r + 1 && zero_calls[1] == 3));
    }

    // By member: one zero row, its calls the mean over the ranks of 3 + r + 1; by site, two rows.
    char *text = print_table(t, 0);
    if (ranks > 1) assert_non_null(strstr(text, "max ms (rank)"));
    double want = 0;
    for (int r = 0; r < ranks; r++) want += (3.0 + r + 1) / ranks;
    int zero_rows = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        char kind[16], name[64];
        double calls;
        if (sscanf(line, " %15s %63s %lf", kind, name, &calls) == 3 && !strcmp(name, "zero")) {
            zero_rows++;
            assert_float_equal(calls, want, 1e-9);
        }
    }
    assert_int_equal(zero_rows, 1);
    free(text);
    text = print_table(t, 1);
    zero_rows = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
        zero_rows += strstr(line, " zero test_op_profile.c:") != NULL;
    assert_int_equal(zero_rows, 2);
    free(text);
    dsmoe_prof_table_free(t);
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
    if (rt.world_rank != 0) return;                      // rank 0 writes the file

    // What the model's structure gives: every MoE layer runs 2 grouped GEMMs forward and 2 backward plus
    // 2 grouped weight gradients per micro-step, every dense FFN (the MLP branch of a residual MoE block
    // too) 1 grouped GEMM forward (bias + GELU) and 1 backward (GELU's); one adamw per step; steps
    // 2..STEPS are profiled.
    dsmoe_config cfg;
    load(small_deck, "train.steps=4", &cfg, NULL);
    long micro = cfg.batch / (cfg.micro_batch * rt.world_size), profiled_steps = STEPS - 1;
    long dense_ffns = cfg.layers - cfg.n_moe_layers + (cfg.residual ? cfg.n_moe_layers : 0);
    assert_true(cfg.n_moe_layers >= 1 && dense_ffns >= 1 && micro >= 1);
    char path[512];
    snprintf(path, sizeof path, "%s/prof/profile.tsv", tmpdir);
    tsv t;
    read_tsv(path, &t);
    assert_totals(&t, rt.world_size);
    for (int k = 0; k < rt.world_size; k++) {
        assert_int_equal(calls_of(&t, k, "kernel", "gemm_grouped", NULL),
                         profiled_steps * micro * (cfg.n_moe_layers * 4 + dense_ffns * 2));
        assert_int_equal(calls_of(&t, k, "kernel", "gemm_grouped_wgrad", NULL),
                         profiled_steps * micro * cfg.n_moe_layers * 2);
        assert_int_equal(calls_of(&t, k, "kernel", "adamw", NULL), profiled_steps);
        assert_int_equal(calls_of(&t, k, "kernel", "gate", NULL), profiled_steps * micro * cfg.n_moe_layers);
    }
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

// main: as train_test_main, with one temporary directory for all ranks (rank 0's name, broadcast).
int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sites_and_windows),
        cmocka_unit_test(test_training_profile),
        cmocka_unit_test(test_one_step_profiles_nothing),
    };
    if (test_runtime_start(&argc, &argv, &rt) != 0) return 1;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_op_profile.XXXXXX");
    int made = rt.world_rank != 0 || mkdtemp(tmpdir) != NULL;
    MPI_Bcast(&made, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Bcast(tmpdir, sizeof tmpdir, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (!made) return 1;
    int failed = cmocka_run_group_tests(tests, NULL, NULL), rank = rt.world_rank;
    dsmoe_runtime_close(&rt);
    int any_failed = failed != 0;
    MPI_Allreduce(MPI_IN_PLACE, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (!any_failed && rank == 0) {
        char cmd[512];
        snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
        (void)!system(cmd);
    }
    MPI_Finalize();
    return failed;
}
