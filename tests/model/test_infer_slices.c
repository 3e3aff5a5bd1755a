// tests/model/test_infer_slices.c (2 ranks): what a rank of a tensor group holds in generation
// (core/model/model_slices.c). With generate.tensor_parallel = 2, once dsmoe_infer_create (and in bf16
// dsmoe_model_drop_gemm_masters) has run, dsmoe_model_bytes + dsmoe_infer_bytes is exactly the count
// computed here from the config: the tensors read whole (replicated ones; the local experts unless
// expert-sliced; bf16: weight matrices at 2 bytes, the rest at 4) + 1/2 of the sliced ones (c_attn rows
// and bias, attention c_proj columns, the dense FFN's c_fc rows and bias and c_proj columns; with
// expert-slicing each local expert's w1 rows, b1 and w2 columns, and its whole b2) + the KV cache + the
// per-call buffers; the --plan estimate says the same; and the logits equal those of the unsliced model
// (W = 1, each rank alone) on the same parameters: 1e-5 relative in fp32 (only the summation order of
// the row-parallel GEMMs differs), within bfloat16 rounding in bf16. For fp32 and bf16, dense, top-2,
// residual (pyramid) MoE, coordinated all-to-all and expert-slicing.
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <mpi.h>

#include "config.h"
#include "dsmoe/rng.h"
#include "model.h"
#include "model_infer.h"
#include "runtime.h"
#include "test_runtime.h" // test_runtime_start

static dsmoe_runtime rt;

enum { T = 12, NSEQ = 2, ROWS = 2 * T, W = 2, CALLS = 9 };

static const char *base_deck =
    "[model]\nvocab = 32\nseq_len = 12\nhidden = 16\nheads = 2\nffn_hidden = 24\ninit_std = 0.3\n"
    "[moe]\nmin_capacity = 0\n"
    "[run]\nmode = generate\n";

static void load_config(const char *extra, int tp, dsmoe_config *cfg) {
    char buf[1024], *ov[16];
    int n = 0;
    snprintf(buf, sizeof buf, "model.layers=2 generate.tensor_parallel=%d %s", tp, extra);
    for (char *tok = strtok(buf, " "); tok && n < 16; tok = strtok(NULL, " ")) ov[n++] = tok;
    dsmoe_err err = {0};
    if (dsmoe_config_load_text(base_deck, "test.deck", ov, n, (char *const[]){NULL}, 2, cfg, NULL, &err) != DSMOE_OK)
        fail_msg("config: %s", err.msg);
}

// What a rank holds, counted tensor by tensor from the config (docs/checkpoint.md's shapes): whole =
// parameters of a model as loaded (elements), held = bytes of the tensors read whole once generation
// runs, slices = bytes of this rank's 1/W of the sliced ones. a: bytes of a GEMM operand element.
typedef struct expect {
    size_t whole, held, slices;
} expect;

static expect count(const dsmoe_config *c, int w, int expert_slicing, size_t a) {
    size_t M = (size_t)c->hidden, F = (size_t)c->ffn_hidden, f = sizeof(float), Wz = (size_t)w;
    size_t mat = a == 2 ? 2 : f; // a weight matrix read whole: bf16 keeps its copy alone, fp32 its master
    expect e = {0};
    e.whole = (size_t)c->vocab * M + (size_t)c->seq_len * M + 2 * M; // wte, wpe, ln_f
    e.held = (size_t)c->vocab * M * mat + (size_t)c->seq_len * M * f + 2 * M * f;
    for (int l = 0; l < c->layers; l++) {
        int mi = -1, moe = dsmoe_config_is_moe_layer(c, l, &mi), dense = !moe || c->residual;
        // ln_1, ln_2 and the biases added after the tensor group's sums (attention c_proj, MLP c_proj).
        size_t vecs = 4 * M + M + (dense ? M : 0);
        e.whole += vecs + 3 * M * M + 3 * M + M * M + (dense ? 2 * F * M + F : 0);
        e.held += vecs * f;
        e.slices += (3 * M * M + M * M) / Wz * a + 3 * M / Wz * f; // c_attn rows + c_proj columns, c_attn bias
        if (dense) e.slices += 2 * F * M / Wz * a + F / Wz * f;    // c_fc rows, c_proj columns, c_fc bias
        if (!moe) continue;
        size_t E = (size_t)c->experts[mi], El = E / (size_t)c->expert_parallel[mi];
        e.whole += E * M + (c->residual ? 2 * M + 2 : 0) + El * (2 * F * M + F + M);
        e.held += E * M * f + (c->residual ? 2 * M * mat + 2 * f : 0); // router, coefficient
        if (expert_slicing) e.slices += El * (2 * F * M / Wz * a + F / Wz * f + M * f); // b2 whole (rank 0's, or 0)
        else e.held += El * (2 * F * M * mat + (F + M) * f);
    }
    return e;
}

// Runs the schedule on a fresh model of cfg (random parameters) with an inference state of width
// tp, writing each call's logits (float32; bf16 widened) to out (CALLS x NSEQ x V); checks the memory
// when tp > 1.
static void run(const dsmoe_config *cfg, int tp, const char *what, float *out) {
    dsmoe_err err = {0};
    int V = cfg->vocab, bf16 = cfg->precision == DSMOE_PRECISION_BF16;
    size_t a = bf16 ? 2 : 4;
    dsmoe_model *m = NULL;
    assert_int_equal(dsmoe_model_create(cfg, &rt, 0, &m, &err), DSMOE_OK);
    // Every parameter, biases and layer norms too, drawn from its slab index (the layouts of W = 1 and 2
    // are the same: ep 1), so that a bias added twice or never shows.
    size_t n_local = dsmoe_model_local_params(m);
    float *host = malloc(n_local * sizeof(float));
    for (size_t i = 0; i < n_local; i++) host[i] = 0.3f * (2.0f * dsmoe_rng_uniform(9, i) - 1.0f);
    rt.kern->copy_to_device(rt.kctx, rt.q, dsmoe_model_params(m), host, n_local * sizeof(float));
    assert_int_equal(dsmoe_rt_wait(&rt, &err), DSMOE_OK);
    free(host);
    int moe_mode = dsmoe_tensor_moe_of(cfg), es = tp > 1 && moe_mode == DSMOE_TENSOR_MOE_SLICED;
    expect e = count(cfg, tp, es, a);
    // The model's buffers besides the parameters: the gradient-norm sums, (n_moe + 2) doubles.
    size_t other = (size_t)(cfg->n_moe_layers + 2) * sizeof(double);
    assert_int_equal(dsmoe_model_local_params(m), e.whole);
    assert_int_equal(dsmoe_model_bytes(m), e.whole * (4 + (bf16 ? 2 : 0)) + other); // as loaded: the peak
    dsmoe_infer *inf = NULL;
    if (dsmoe_infer_create(m, NSEQ, T, ROWS, tp, moe_mode, &inf, &err) != DSMOE_OK) fail_msg("%s: create: %s", what, err.msg);
    if (bf16) assert_int_equal(dsmoe_model_drop_gemm_masters(m, &err), DSMOE_OK);
    if (tp > 1) {
        dsmoe_infer_sizes z;
        dsmoe_infer_estimate(cfg, NSEQ, T, ROWS, tp, moe_mode, &z);
        size_t cache = (size_t)cfg->layers * 2 * NSEQ * (size_t)(cfg->hidden / tp) * T * a;
        size_t got = dsmoe_model_bytes(m) + dsmoe_infer_bytes(inf), want = e.held + other + e.slices + cache + z.row_bytes;
        if (rt.world_rank == 0)
            print_message("%s: rank holds %zu bytes of parameters (%zu whole, %zu in slices), from %zu as loaded\n", what,
                      e.held + e.slices, e.held, e.slices, e.whole * (4 + (bf16 ? 2 : 0)));
        if (got != want)
            fail_msg("%s: model %zu + inference %zu bytes = %zu, expected %zu (held whole %zu, slices %zu, cache %zu, "
                     "rows %zu)", what, dsmoe_model_bytes(m), dsmoe_infer_bytes(inf), got, want, e.held, e.slices,
                     cache, (size_t)z.row_bytes);
        assert_null(dsmoe_model_params(m));
        assert_int_equal(dsmoe_infer_slice_bytes(inf), e.slices);
        // dsmoe --plan's figures, from the config alone.
        assert_int_equal(z.slice_bytes, e.slices);
        assert_int_equal(z.cache_bytes, cache);
        assert_int_equal(dsmoe_infer_bytes(inf), z.cache_bytes + z.slice_bytes + z.row_bytes);
        assert_int_equal(dsmoe_model_generate_param_bytes(cfg, tp, es), e.held);
        // The sliced weights are gone from the model: a second inference state cannot have them.
        dsmoe_infer *again = NULL;
        assert_int_equal(dsmoe_infer_create(m, NSEQ, T, ROWS, 1, 0, &again, &err), DSMOE_ERR_INVALID);
        assert_non_null(strstr(err.msg, "earlier inference state"));
        dsmoe_infer_free(again);
    }

    // Prefill chunks of different lengths together, then token by token, one sequence alone.
    static const int schedule[CALLS][NSEQ] = {{5, 3}, {1, 1}, {1, 0}, {0, 2}, {2, 1}, {1, 1}, {1, 2}, {1, 1}, {0, 1}};
    int32_t seq[NSEQ][T];
    for (int q = 0; q < NSEQ; q++)
        for (int t = 0; t < T; t++) seq[q][t] = (int32_t)(dsmoe_rng_u64(31 + (uint64_t)q, (uint64_t)t) % (uint64_t)V);
    int fed[NSEQ] = {0};
    void *raw = malloc((size_t)NSEQ * V * a);
    for (int c = 0; c < CALLS; c++) {
        int slot[NSEQ], cnt[NSEQ], n = 0, rows = 0;
        int32_t tokens[ROWS];
        for (int q = 0; q < NSEQ; q++) {
            if (!schedule[c][q]) continue;
            slot[n] = q, cnt[n] = schedule[c][q];
            for (int j = 0; j < cnt[n]; j++) tokens[rows++] = seq[q][fed[q] + j];
            fed[q] += cnt[n++];
        }
        if (dsmoe_infer_forward(inf, n, slot, cnt, tokens, rows, 0.0f, NULL, &err) != DSMOE_OK)
            fail_msg("%s: call %d: %s", what, c, err.msg);
        rt.kern->copy_to_host(rt.kctx, rt.q, raw, dsmoe_infer_logits(inf), (size_t)n * V * a);
        assert_int_equal(dsmoe_rt_wait(&rt, &err), DSMOE_OK);
        float *o = out + (size_t)c * NSEQ * V;
        for (size_t i = 0; i < (size_t)n * V; i++) {
            if (!bf16) {
                o[i] = ((float *)raw)[i];
                continue;
            }
            uint32_t u = (uint32_t)((uint16_t *)raw)[i] << 16;
            memcpy(&o[i], &u, sizeof u);
        }
    }
    free(raw);
    dsmoe_infer_free(inf);
    dsmoe_model_free(m);
}

// The sliced run's logits against the unsliced one's. fp32: the slices hold the same values and the
// row-parallel sums only add in another order (1e-5 relative). bf16: the tensor group's partial sums are
// float32 and rounded to bfloat16 once after the sum, the unsliced GEMM rounds its own sum once: the
// outputs can differ by a bfloat16 rounding (2^-8 relative) here and there, which a few layers carry to
// the logits; 3% of the row's largest logit allows that and still fails a wrong slice (errors of order 1).
static void check(const char *extra, int expert_slicing) {
    char with[256], sliced[320];
    for (int p = 0; p < 2; p++) {
        snprintf(with, sizeof with, "%s run.precision=%s", extra, p ? "bf16" : "fp32");
        snprintf(sliced, sizeof sliced, "%s generate.expert_slicing=%s", with, expert_slicing ? "true" : "false");
        dsmoe_config c1, c2;
        load_config(with, 1, &c1);
        load_config(sliced, W, &c2);
        int V = c1.vocab;
        float *ref = calloc((size_t)CALLS * NSEQ * V, sizeof(float)), *got = calloc((size_t)CALLS * NSEQ * V, sizeof(float));
        run(&c1, 1, with, ref);
        run(&c2, W, sliced, got);
        double worst = 0.0, tol = p ? 0.03 : 1e-5;
        for (size_t r = 0; r < (size_t)CALLS * NSEQ; r++) {
            double d = 0.0, scale = 1.0;
            for (int v = 0; v < V; v++) {
                d = fmax(d, fabs((double)got[r * V + v] - ref[r * V + v]));
                scale = fmax(scale, fabs((double)ref[r * V + v]));
            }
            worst = fmax(worst, d / scale);
        }
        if (rt.world_rank == 0)
            print_message("%s: tensor slicing 2 against 1: worst relative logit difference %.3g\n", sliced, worst);
        if (worst > tol) fail_msg("%s: sliced logits differ from the unsliced ones by %.3g (relative)", sliced, worst);
        free(ref);
        free(got);
    }
}

static void test_dense(void **state) { (void)state; check("moe.experts=0", 0); }
static void test_top2_coordinated(void **state) { (void)state; check("moe.experts=4 moe.top_k=2", 0); }
static void test_top2_expert_slicing(void **state) { (void)state; check("moe.experts=4 moe.top_k=2", 1); }
static void test_pyramid_residual(void **state) { (void)state; check("model.layers=4 moe.experts=2x1,4x1 moe.residual=true", 0); }
static void test_pyramid_residual_expert_slicing(void **state) {
    (void)state;
    check("model.layers=4 moe.experts=2x1,4x1 moe.residual=true", 1);
}

int main(int argc, char **argv) {
    if (test_runtime_start(&argc, &argv, &rt) != 0) return 1;
    if (rt.world_size != 2) {
        fprintf(stderr, "test_infer_slices runs on 2 ranks (mpiexec -n 2), not %d\n", rt.world_size);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dense),
        cmocka_unit_test(test_top2_coordinated),
        cmocka_unit_test(test_top2_expert_slicing),
        cmocka_unit_test(test_pyramid_residual),
        cmocka_unit_test(test_pyramid_residual_expert_slicing),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return failed;
}
