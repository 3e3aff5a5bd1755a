// tests/model/test_train_bf16.c: run.precision = bf16 through the training driver on the synthetic corpus, each
// against float32 or against itself: convergence to the corpus's loss bound beside fp32, bitwise
// determinism (also over run.threads), resume == uninterrupted (bitwise), checkpoints that continue across
// precisions and keep float32 masters, the MoE variants (residual, jitter, top-2, dropless) beside fp32, and
// what the config refuses.
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "train_testutil.h" // rt, tmpdir, small_deck, load_ranks, load, train_on, assert_same_checkpoint

// inputs/quickstart.deck's model, corpus and schedule; no logging, checkpoints or evaluation on the way.
static const char *quick_deck =
    "[run]\nseed = 1234\nlog_every = 1000\n"
    "[model]\nvocab = 64\nseq_len = 64\nlayers = 4\nhidden = 128\nheads = 4\n"
    "[moe]\nexperts = 8\nevery = 2\ntop_k = 1\ncapacity_factor = 1.25\neval_capacity_factor = 2.0\n"
    "aux_loss_coeff = 0.01\n"
    "[train]\nbatch = 16\nlr = 3e-3\nmin_lr = 3e-4\nwarmup_steps = 20\neval_every = 0\neval_batches = 4\n"
    "[data]\nsynthetic_sources = 4\nsynthetic_branching = 4\n"
    "[checkpoint]\nkeep = 10\n";

static void assert_finite(const double *h, int n, const char *what) {
    for (int i = 0; i < n; i++)
        if (!isfinite(h[i])) fail_msg("%s: loss of step %d is %g", what, i + 1, h[i]);
}

static double rel_diff(double a, double ref) { return fabs(a - ref) / fabs(ref); }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ----------------------------------------------------------------------------------------------------

// The quickstart model, 200 steps from the same seed in both precisions: bf16 lands where fp32 does, and
// near the synthetic corpus's loss bound (test_train.c's margins: nothing beats the bound by more than
// sampling noise, and 200 steps get within 0.15 nats of it). A claim about the numbers, which the
// sanitizers do not change: the sanitized build skips it, since the other tests here take every bf16
// training path under them (with it this program took 227 s there on CI, without it 11 s).
#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED_BUILD 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED_BUILD 1
#endif
#endif
static void test_converges_like_fp32(void **state) {
    (void)state;
#ifdef SANITIZED_BUILD
    printf("skipped in the sanitized build: convergence is the plain build's check\n");
    skip();
#endif
    dsmoe_train_result r32, r16;
    double t0 = now();
    train_ok(quick_deck, "run.output_dir=%s/conv32 train.steps=200 checkpoint.final=false", &r32, NULL, tmpdir);
    double t1 = now();
    train_ok(quick_deck, "run.output_dir=%s/conv16 train.steps=200 checkpoint.final=false run.precision=bf16", &r16,
             NULL, tmpdir);
    double t2 = now();
    printf("quickstart model, 200 steps: validation loss fp32 %.4f (%.1f s), bf16 %.4f (%.1f s), %.2f%% apart; "
           "synthetic bound %.4f\n", r32.valid_loss, t1 - t0, r16.valid_loss, t2 - t1,
           100 * rel_diff(r16.valid_loss, r32.valid_loss), r16.loss_bound);
    assert_true(isfinite(r32.valid_loss) && isfinite(r16.valid_loss));
    assert_true(r16.loss_bound > 0);
    assert_true(r16.valid_loss != r32.valid_loss); // bf16 did run in bf16
    assert_true(rel_diff(r16.valid_loss, r32.valid_loss) <= 0.02);
    assert_true(r16.valid_loss >= r16.loss_bound - 0.02);
    assert_true(r16.valid_loss <= r16.loss_bound + 0.15);
}

// Two bf16 runs of one deck give the same bits; so do one and two compute threads. The thread case uses
// the quickstart shape with 512 tokens a micro-step, so that the GEMMs have several of the cpu plugin's
// 256 x 512 bf16 tiles and the 8 experts' grouped GEMMs several groups for the threads to share.
static void test_deterministic(void **state) {
    (void)state;
    double h1[12], h2[12];
    dsmoe_train_result r1, r2;
    train_ok(small_deck, "run.output_dir=%s/det1 train.steps=12 run.precision=bf16", &r1, h1, tmpdir);
    train_ok(small_deck, "run.output_dir=%s/det2 train.steps=12 run.precision=bf16", &r2, h2, tmpdir);
    assert_finite(h1, 12, "bf16");
    assert_memory_equal(h1, h2, sizeof h1);
    assert_same_checkpoint(r1.checkpoint, r2.checkpoint);

    double t1[4], t2[4];
    const char *shape = "train.steps=4 train.micro_batch=8 run.precision=bf16";
    dsmoe_config cfg;
    char *text = NULL, extra[1024];
    snprintf(extra, sizeof extra, "run.output_dir=%s/threads1 run.threads=1 %s", tmpdir, shape);
    load(quick_deck, extra, &cfg, &text);
    free(text);
    assert_int_equal(cfg.threads, 1);
    train_ok(quick_deck, "%s", &r1, t1, extra); // rt runs one compute thread

    snprintf(extra, sizeof extra, "run.output_dir=%s/threads2 run.threads=2 %s", tmpdir, shape);
    load(quick_deck, extra, &cfg, &text);
    free(text);
    dsmoe_runtime rt2;
    dsmoe_err err = {0};
    if (dsmoe_runtime_open("cpu", "mpi", "", cfg.threads, &rt2, &err) != DSMOE_OK) fail_msg("runtime: %s", err.msg);
    dsmoe_status s = train_on(&rt2, quick_deck, extra, &r2, t2, &err);
    dsmoe_runtime_close(&rt2);
    if (s != DSMOE_OK) fail_msg("train with 2 threads: %s", err.msg);
    assert_finite(t1, 4, "bf16, 1 thread");
    assert_memory_equal(t1, t2, sizeof t1);
    assert_same_checkpoint(r1.checkpoint, r2.checkpoint);
}

// A bf16 run stopped at step 6 and resumed continues exactly as the one that never stopped.
static void test_resume_equals_uninterrupted(void **state) {
    (void)state;
    double full[12], first[12], second[12];
    dsmoe_train_result rf, r1, r2;
    train_ok(small_deck, "run.output_dir=%s/full train.steps=12 run.precision=bf16", &rf, full, tmpdir);
    train_ok(small_deck, "run.output_dir=%s/split train.steps=6 run.precision=bf16", &r1, first, tmpdir);
    train_ok(small_deck, "run.output_dir=%s/split train.steps=12 checkpoint.resume=auto run.precision=bf16", &r2,
             second, tmpdir);
    assert_int_equal(r1.steps_done, 6);
    assert_int_equal(r2.steps_done, 12);
    assert_memory_equal(full, first, 6 * sizeof(double));
    assert_memory_equal(full + 6, second + 6, 6 * sizeof(double));
    assert_same_checkpoint(rf.checkpoint, r2.checkpoint);
}

// A checkpoint is float32 master weights and AdamW state whatever precision wrote it: the bf16 run's file
// has the fp32 run's tensors (names, float32, sizes), and its weights are not rounded to bfloat16.
static void assert_fp32_checkpoint(const char *bf16_written, const char *fp32_written) {
    dsmoe_st_file *f, *g;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_st_open(bf16_written, &f, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_open(fp32_written, &g, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_count(f), dsmoe_st_count(g));
    uint64_t n = 0, beyond_bf16 = 0;
    for (int i = 0; i < dsmoe_st_count(f); i++) {
        const dsmoe_st_tensor *t = dsmoe_st_at(f, i), *u = dsmoe_st_find(g, t->name);
        if (t->dtype != DSMOE_ST_F32)
            fail_msg("%s: tensor %s is %s, expected F32", bf16_written, t->name, dsmoe_st_dtype_name(t->dtype));
        assert_non_null(u);
        assert_int_equal(u->dtype, DSMOE_ST_F32);
        assert_int_equal(t->nbytes, u->nbytes);
        uint64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) numel *= (uint64_t)t->shape[d];
        assert_int_equal(t->nbytes, numel * sizeof(float));
        for (uint64_t k = 0; k < numel; k++) {
            uint32_t bits;
            memcpy(&bits, (const char *)t->data + k * sizeof bits, sizeof bits);
            n++;
            beyond_bf16 += (bits & 0xffffu) != 0; // a bfloat16 value has a zero low half
        }
    }
    // After 6 AdamW steps in bf16 nearly every weight and moment has moved off the bfloat16 grid (a few
    // elements may sit on it by chance, or be exactly zero); weights kept in bf16 would all be on it.
    printf("bf16-written checkpoint: %llu of %llu float32 elements off the bfloat16 grid\n",
           (unsigned long long)beyond_bf16, (unsigned long long)n);
    assert_true(beyond_bf16 > n * 9 / 10);
    dsmoe_st_close(f);
    dsmoe_st_close(g);
}

// fp32 to step 6, bf16 to 12, fp32 to 18, each resuming the last checkpoint, beside an all-fp32 run.
static void test_continues_across_precisions(void **state) {
    (void)state;
    // decay_steps = 18 in every part: the schedule is the same whatever train.steps says.
    const char *common = "train.decay_steps=18 train.eval_batches=4";
    double ref[18], h1[18], h2[18], h3[18];
    dsmoe_train_result rr, r1, r2, r3;
    train_ok(small_deck, "run.output_dir=%s/mixref train.steps=18 %s", &rr, ref, tmpdir, common);
    train_ok(small_deck, "run.output_dir=%s/mixed train.steps=6 %s", &r1, h1, tmpdir, common);
    train_ok(small_deck, "run.output_dir=%s/mixed train.steps=12 checkpoint.resume=auto run.precision=bf16 %s", &r2, h2,
             tmpdir, common);
    char bf16_ckpt[4096];
    snprintf(bf16_ckpt, sizeof bf16_ckpt, "%s", r2.checkpoint);
    train_ok(small_deck, "run.output_dir=%s/mixed train.steps=18 checkpoint.resume=auto %s", &r3, h3, tmpdir, common);
    assert_int_equal(r1.steps_done, 6);
    assert_int_equal(r2.steps_done, 12);
    assert_int_equal(r3.steps_done, 18);
    assert_finite(h1, 6, "fp32 part");
    assert_finite(h2 + 6, 6, "bf16 part");
    assert_finite(h3 + 12, 6, "fp32 part after bf16");
    assert_true(isfinite(r1.valid_loss) && isfinite(r2.valid_loss) && isfinite(r3.valid_loss));
    assert_memory_equal(ref, h1, 6 * sizeof(double)); // the fp32 part is the reference's start
    // The resumed part ran in bf16 indeed (run.precision is not taken from the checkpoint).
    assert_memory_not_equal(ref + 6, h2 + 6, 6 * sizeof(double));
    // Tolerance: the two runs differ only by 6 steps in bf16 in the middle. bfloat16 rounds each activation
    // and GEMM operand to 2^-9 relative, which moves that part's per-step losses and gradients by well under
    // 1%; AdamW's normalised updates keep the weight difference of the order of lr x (relative gradient
    // change) a step, and 6 further fp32 steps do not amplify it. Measured here: about 0.001% on the
    // validation loss; the 2% bound leaves room for other bf16 GEMM implementations (oneDNN or emulated)
    // while staying well under what the 18 steps move the loss (3.47 = ln 32 to about 2.88).
    printf("fp32 6 -> bf16 12 -> fp32 18: validation loss %.5f; all fp32: %.5f (%.3f%% apart); at step 6 %.5f\n",
           r3.valid_loss, rr.valid_loss, 100 * rel_diff(r3.valid_loss, rr.valid_loss), r1.valid_loss);
    assert_true(rel_diff(r3.valid_loss, rr.valid_loss) <= 0.02);
    assert_fp32_checkpoint(bf16_ckpt, r1.checkpoint);
}

// The MoE variants in bf16: each trains (its loss falls from the first step to the last) and stays within
// 5% of the same deck in fp32 at the last step.
static void test_moe_variants(void **state) {
    (void)state;
    static const struct { const char *name, *extra; } variants[] = {
        {"residual MoE", "moe.residual=true"},
        {"jitter noise", "moe.noise=jitter"},
        {"top-2", "moe.top_k=2"},
        {"dropless", "moe.drop_tokens=false"},
    };
    enum { STEPS = 12 };
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        double h32[STEPS], h16[STEPS];
        dsmoe_train_result r32, r16;
        train_ok(small_deck, "run.output_dir=%s/var%zu_32 train.steps=%d checkpoint.final=false %s", &r32, h32,
                 tmpdir, v, STEPS, variants[v].extra);
        train_ok(small_deck, "run.output_dir=%s/var%zu_16 train.steps=%d checkpoint.final=false run.precision=bf16 %s",
                 &r16, h16, tmpdir, v, STEPS, variants[v].extra);
        printf("%-12s loss step 1 -> %d: fp32 %.5f -> %.5f, bf16 %.5f -> %.5f (%.3f%% apart at the end)\n",
               variants[v].name, STEPS, h32[0], h32[STEPS - 1], h16[0], h16[STEPS - 1],
               100 * rel_diff(h16[STEPS - 1], h32[STEPS - 1]));
        assert_finite(h16, STEPS, variants[v].name);
        assert_finite(h32, STEPS, variants[v].name);
        if (memcmp(h16, h32, sizeof h16) == 0) fail_msg("%s: bf16 gave fp32's bits", variants[v].name);
        if (!(h16[STEPS - 1] < h16[0])) fail_msg("%s: bf16 loss did not fall: %g -> %g", variants[v].name, h16[0],
                                                 h16[STEPS - 1]);
        if (rel_diff(h16[STEPS - 1], h32[STEPS - 1]) > 0.05)
            fail_msg("%s: bf16 loss %g, fp32 %g at step %d", variants[v].name, h16[STEPS - 1], h32[STEPS - 1], STEPS);
    }
}

// What the config takes: bf16 generation, also with tensor slicing (its partial sums are float32), and
// bf16 evaluation.
static void test_config(void **state) {
    (void)state;
    dsmoe_config cfg;
    dsmoe_err err = {0};
    assert_int_equal(load_ranks(small_deck, "run.mode=generate run.precision=bf16 generate.tensor_parallel=2", 2,
                                &cfg, NULL, &err), DSMOE_OK);
    assert_int_equal(load_ranks(small_deck, "run.mode=generate run.precision=bf16", 2, &cfg, NULL, &err), DSMOE_OK);
    // Evaluation runs in the run's precision.
    assert_int_equal(load_ranks(small_deck, "run.mode=eval run.precision=bf16", 1, &cfg, NULL, &err), DSMOE_OK);
    assert_int_equal(cfg.precision, DSMOE_PRECISION_BF16);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_resume_equals_uninterrupted),
        cmocka_unit_test(test_continues_across_precisions),
        cmocka_unit_test(test_moe_variants),
        cmocka_unit_test(test_converges_like_fp32),
    };
    return train_test_main(argc, argv, "dsmoe_test_train_bf16", tests, sizeof tests / sizeof tests[0]);
}
