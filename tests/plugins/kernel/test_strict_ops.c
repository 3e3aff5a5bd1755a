// tests/plugins/kernel/test_strict_ops.c: every compute and copy member of the strict kernel plugin against the cpu
// plugin it wraps, bit for bit. One sequence of calls (every op, inputs from a fixed random sequence)
// runs on a strict context and on a cpu context; then every buffer is copied back and compared. On
// strict nothing runs until the single wait at the end, so this also shows that strict copies each
// call's host inputs (descriptors, parameter structs, the AdamW list, the sample counters): the test
// scribbles over them right after each call. A wrong argument order in one of strict's closures, or
// a closure that reads a host input late, makes a named buffer differ.
#include <dlfcn.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "dsmoe/kernel_plugin.h"
#include "strict_test.h"

#define F32 DSMOE_FLOAT32
#define SCRIBBLE(x) memset(&(x), 0xAB, sizeof(x)) // the callee must have consumed it

// The buffers of one run, in allocation order (the same in both runs).
typedef struct {
    const char *name;
    void *d;
    size_t bytes;
    unsigned char *h; // copied back after the wait
} rbuf;

typedef struct {
    const dsmoe_kernel_plugin_v3 *T;
    dsmoe_kernel_ctx *c;
    dsmoe_kernel_queue *q;
    rbuf b[192];
    int n;
} runner;

#define DO(call) OK(r->T, r->c, call)

// A device buffer holding host (or zeroed when host is NULL).
static void *put(runner *r, const char *name, const void *host, size_t bytes) {
    assert_true(r->n < (int)(sizeof r->b / sizeof *r->b));
    void *d = dev(r->T, r->c, bytes, host ? 0 : DSMOE_ALLOC_ZERO);
    if (host && bytes) DO(r->T->copy_to_device(r->c, r->q, d, host, bytes));
    r->b[r->n++] = (rbuf){name, d, bytes, NULL};
    return d;
}

static float *fr(runner *r, const char *name, size_t n) { // random floats in [-1, 1)
    float *h = malloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++)
        h[i] = rnd();
    float *d = put(r, name, h, n * sizeof *h);
    free(h);
    return d;
}

static void *zr(runner *r, const char *name, size_t bytes) { return put(r, name, NULL, bytes); }

// The grouped GEMMs' groups: their counts, rows (m_max) and columns, shared with the comparison below.
static const int32_t GROUP_COUNTS[3] = {2, 0, 3};
enum { GROUP_ROWS = 3, GROUP_COLS = 4 };

// Every member once, in an order where later ops use earlier results.
static void run_ops(runner *r) {
    const dsmoe_kernel_plugin_v3 *T = r->T;
    dsmoe_kernel_ctx *c = r->c;
    dsmoe_kernel_queue *q = r->q;
    rng_state = 99;
    enum { m = 3, n = 4, k = 5, G = 3, MM = 3, N = 10, B = 2, Tt = 3, M = 4, V = 5, S = 6, E = 4, K = 2, Cap = 3 };

    // --- GEMMs: both operands transposed with beta; grouped with each epilogue; weight gradients
    float *a = fr(r, "gemm.a", k * m), *b = fr(r, "gemm.b", n * k), *cm = fr(r, "gemm.c", m * n);
    DO(T->gemm(c, q, 1, 1, m, n, k, 0.5f, a, F32, m, b, F32, k, 0.25f, cm, F32, n));
    _Static_assert(G == 3 && (int)MM == (int)GROUP_ROWS && (int)n == (int)GROUP_COLS, "GROUP_COUNTS describes these groups");
    int32_t cnt_h[G];
    memcpy(cnt_h, GROUP_COUNTS, sizeof cnt_h);
    int32_t *counts = put(r, "grouped.counts", cnt_h, sizeof cnt_h);
    float *ga = fr(r, "grouped.a", G * MM * k), *gb = fr(r, "grouped.b", G * n * k);
    float *gbias = fr(r, "grouped.bias", G * n), *gc = zr(r, "grouped.c", G * MM * n * 4);
    float *gaux = zr(r, "grouped.aux", G * MM * n * 4);
    dsmoe_grouped_gemm g = {.groups = G, .counts = counts, .m_max = MM, .n = n, .k = k, .alpha = 1, .beta = 0,
                            .a = ga, .a_type = F32, .lda = k, .a_stride = MM * k,
                            .b = gb, .b_type = F32, .ldb = k, .b_stride = n * k, .b_groups = G, .trans_b = 1,
                            .c = gc, .c_type = F32, .ldc = n, .c_stride = MM * n,
                            .epilogue = DSMOE_EPI_BIAS_GELU, .bias = gbias, .bias_stride = n, .aux = gaux};
    dsmoe_grouped_gemm g2 = g;
    DO(T->gemm_grouped(c, q, &g));
    SCRIBBLE(g);
    g2.b = fr(r, "grouped_dgelu.b", k * n), g2.ldb = n, g2.b_stride = 0, g2.b_groups = 1, g2.trans_b = 0;
    g2.c = fr(r, "grouped_dgelu.c", G * MM * n), g2.beta = 0.5f, g2.epilogue = DSMOE_EPI_DGELU, g2.bias = NULL;
    dsmoe_grouped_gemm g3 = g2;
    g3.c = fr(r, "grouped_bias.c", G * MM * n), g3.epilogue = DSMOE_EPI_BIAS, g3.bias = gbias, g3.aux = NULL;
    DO(T->gemm_grouped(c, q, &g2));
    SCRIBBLE(g2);
    DO(T->gemm_grouped(c, q, &g3));
    SCRIBBLE(g3);
    dsmoe_grouped_wgrad w = {.groups = G, .counts = counts, .m_max = MM, .n = n, .k = k, .alpha = 1,
                             .dy = fr(r, "wgrad.dy", G * MM * n), .dy_type = F32, .dy_stride = MM * n,
                             .x = ga, .x_type = F32, .x_stride = MM * k,
                             .dw = fr(r, "wgrad.dw", G * n * k), .dw_stride = n * k, .b_groups = G,
                             .dbias = fr(r, "wgrad.dbias", G * n), .dbias_stride = n};
    DO(T->gemm_grouped_wgrad(c, q, &w));
    SCRIBBLE(w);

    // --- element-wise and small ops
    float *bo = fr(r, "bias_add.out", m * n), *x = fr(r, "x", N), *y = fr(r, "axpy.y", N);
    DO(T->bias_add(c, q, bo, F32, fr(r, "bias_add.bias", n), m, n));
    DO(T->bias_backward(c, q, fr(r, "bias_backward.dbias", n), bo, F32, m, n));
    DO(T->axpy(c, q, y, 0.75f, x, F32, N));
    DO(T->mul_uniform_noise(c, q, zr(r, "mul_uniform_noise.out", N * 4), x, F32, N, 0.1f, 9, 4));
    DO(T->sum_squares(c, q, x, N, zr(r, "sum_squares.out", sizeof(double))));
    if (T->all_finite) DO(T->all_finite(c, q, x, F32, N, zr(r, "all_finite.out", 4)));
    if (T->convert && (T->dtypes & DSMOE_DTYPE_BIT(DSMOE_BFLOAT16))) {
        void *h16 = zr(r, "convert.bf16", N * 2);
        DO(T->convert(c, q, h16, DSMOE_BFLOAT16, x, F32, N));
        DO(T->convert(c, q, zr(r, "convert.back", N * 4), F32, h16, DSMOE_BFLOAT16, N));
    }
    dsmoe_init_params ip = {.key = 3, .offset = 100, .std = 0.02f};
    DO(T->init_tensor(c, q, zr(r, "init_tensor.dst", 16 * 4), 16, &ip));
    SCRIBBLE(ip);
    float *s2 = fr(r, "copy_2d.src", 15); // 3 rows of 5 floats; 3 of them copied into rows of 4
    DO(T->copy_2d(c, q, zr(r, "copy_2d.dst", 3 * 16), 16, s2, 20, 12, 3));
    DO(T->copy(c, q, zr(r, "copy.dst", 15 * 4), s2, 15 * 4));
    DO(T->zero(c, q, y + 2, 3 * 4));

    // --- embedding, layer norm, GELU
    int32_t tok_h[B * Tt] = {0, 4, 2, 2, 1, 3};
    int32_t *tok = put(r, "embedding.tokens", tok_h, sizeof tok_h);
    float *wte = fr(r, "embedding.wte", V * M), *wpe = fr(r, "embedding.wpe", (Tt + 2) * M);
    int32_t pos_h[B] = {2, 0};
    int32_t *pos = put(r, "embedding.pos", pos_h, sizeof pos_h);
    DO(T->embedding_forward(c, q, zr(r, "embedding_forward.out", B * Tt * M * 4), F32, tok, wte, F32, wpe, NULL, B, Tt,
                            M, V, Tt));
    DO(T->embedding_forward(c, q, zr(r, "embedding_forward.pos.out", B * Tt * M * 4), F32, tok, wte, F32, wpe, pos, B,
                            Tt, M, V, Tt + 2));
    DO(T->embedding_backward(c, q, fr(r, "embedding_backward.dwte", V * M), fr(r, "embedding_backward.dwpe", Tt * M),
                             fr(r, "embedding_backward.dout", B * Tt * M), F32, tok, B, Tt, M, V));
    float *lin = fr(r, "layernorm.in", S * M), *lw = fr(r, "layernorm.weight", M), *lb = fr(r, "layernorm.bias", M);
    float *lmean = zr(r, "layernorm.mean", S * 4), *lrstd = zr(r, "layernorm.rstd", S * 4);
    DO(T->layernorm_forward(c, q, zr(r, "layernorm_forward.out", S * M * 4), lmean, lrstd, lin, F32, lw, lb, S, M,
                            1e-5f));
    DO(T->layernorm_backward(c, q, fr(r, "layernorm_backward.din", S * M), fr(r, "layernorm_backward.dweight", M),
                             fr(r, "layernorm_backward.dbias", M), fr(r, "layernorm_backward.dout", S * M), lin, F32,
                             lw, lmean, lrstd, S, M));
    DO(T->gelu_forward(c, q, zr(r, "gelu_forward.out", N * 4), x, F32, N));
    DO(T->gelu_backward(c, q, fr(r, "gelu_backward.din", N), x, fr(r, "gelu_backward.dout", N), F32, N));

    // --- attention
    dsmoe_attention_shape sh = {.B = B, .T = Tt, .M = M, .NH = 2, .dt = F32}, sh1 = sh;
    size_t saved_b = 0, ws_b = 0;
    DO(T->attention_bytes(c, &sh, &saved_b, &ws_b));
    float *qkv = fr(r, "attention.qkv", B * Tt * 3 * M), *ao = zr(r, "attention_forward.out", B * Tt * M * 4);
    void *saved = zr(r, "attention_forward.saved", saved_b);
    DO(T->attention_forward(c, q, ao, saved, qkv, &sh1));
    SCRIBBLE(sh1);
    DO(T->attention_backward(c, q, fr(r, "attention_backward.dqkv", B * Tt * 3 * M),
                             zr(r, "attention_backward.workspace", ws_b), fr(r, "attention_backward.dout", B * Tt * M),
                             qkv, ao, saved, &sh));
    SCRIBBLE(sh);

    // --- cross-entropy
    int32_t tg_h[S] = {1, 0, 4, 2, 3, 3};
    int32_t *tg = put(r, "crossentropy.targets", tg_h, sizeof tg_h);
    float *probs = zr(r, "crossentropy_forward.probs", S * V * 4);
    DO(T->crossentropy_forward(c, q, zr(r, "crossentropy_forward.losses", S * 4), probs,
                               fr(r, "crossentropy.logits", S * V), F32, tg, S, V));
    DO(T->crossentropy_backward(c, q, fr(r, "crossentropy_backward.dlogits", S * V), F32, probs, tg, 0.5f, S, V));

    // --- gating (noise and RTS on, so the parameter struct matters), dispatch, combine
    dsmoe_gating_params gp = {.S = S, .E = E, .K = K, .noise = DSMOE_NOISE_RSAMPLE, .random_selection = 1,
                              .training = 1, .seed = 11, .token_offset = 3}, gp1 = gp, gp2 = gp, gp3 = gp;
    float *gprobs = zr(r, "gate_route.probs", S * E * 4), *weight = zr(r, "gate_assign.weight", S * K * 4);
    int32_t *choice = zr(r, "gate_route.choice", S * K * 4), *slot = zr(r, "gate_assign.slot", S * K * 4);
    double *aux = zr(r, "gate_assign.aux_sums", (2 * E + 1) * sizeof(double));
    DO(T->gate_route(c, q, &gp1, fr(r, "gate.logits", S * E), gprobs, choice, zr(r, "gate_route.counts", E * 4)));
    SCRIBBLE(gp1);
    DO(T->gate_assign(c, q, &gp2, Cap, gprobs, choice, slot, weight, zr(r, "gate_assign.kept", E * 4), aux));
    SCRIBBLE(gp2);
    DO(T->gate_backward(c, q, &gp3, fr(r, "gate_backward.dlogits", S * E), gprobs, choice, slot,
                        fr(r, "gate_backward.dweight", S * K), aux, 0.01f));
    SCRIBBLE(gp3);
    float *ebuf = zr(r, "moe_dispatch.buf", E * Cap * M * 4);
    DO(T->moe_dispatch(c, q, ebuf, fr(r, "moe_dispatch.x", S * M), F32, choice, slot, S, K, E, Cap, M));
    DO(T->moe_dispatch_backward(c, q, fr(r, "moe_dispatch_backward.dx", S * M), fr(r, "moe_dispatch_backward.dbuf",
                                E * Cap * M), F32, choice, slot, S, K, E, Cap, M));
    DO(T->moe_combine(c, q, zr(r, "moe_combine.out", S * M * 4), ebuf, F32, choice, slot, weight, S, K, E, Cap, M));
    DO(T->moe_combine_backward(c, q, zr(r, "moe_combine_backward.dy", E * Cap * M * 4),
                               zr(r, "moe_combine_backward.dweight", S * K * 4), fr(r, "moe_combine_backward.dout", S * M),
                               ebuf, F32, choice, slot, weight, S, K, E, Cap, M));

    // --- residual mix
    float *coef = zr(r, "residual_mix_forward.coef", S * 2 * 4);
    float *rmoe = fr(r, "residual_mix.moe", S * M), *rmlp = fr(r, "residual_mix.mlp", S * M);
    DO(T->residual_mix_forward(c, q, zr(r, "residual_mix_forward.out", S * M * 4), coef, rmoe, rmlp, F32,
                               fr(r, "residual_mix.coef_logits", S * 2), S, M));
    DO(T->residual_mix_backward(c, q, fr(r, "residual_mix_backward.dmoe", S * M),
                                fr(r, "residual_mix_backward.dmlp", S * M),
                                fr(r, "residual_mix_backward.dcoef_logits", S * 2),
                                fr(r, "residual_mix_backward.dout", S * M), rmoe, rmlp, F32, coef, S, M));

    // --- AdamW over two tensors (m, v start at 0: v must not be negative)
    dsmoe_adamw_params hp = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .grad_scale = 0.5f, .t = 3};
    dsmoe_adamw_tensor at[2] = {
        {fr(r, "adamw.param0", 10), fr(r, "adamw.grad0", 10), zr(r, "adamw.m0", 40), zr(r, "adamw.v0", 40), 10, 0.1f},
        {fr(r, "adamw.param1", 7), fr(r, "adamw.grad1", 7), zr(r, "adamw.m1", 28), zr(r, "adamw.v1", 28), 7, 0.0f},
    };
    DO(T->adamw(c, q, &hp, at, 2));
    SCRIBBLE(hp);
    SCRIBBLE(at);

    // --- inference group
    if (T->kv_append) {
        enum { TM = 4 };
        int32_t pos_h[B] = {0, 2};
        int32_t *pos = put(r, "kv.pos", pos_h, sizeof pos_h);
        float *kc = zr(r, "kv_append.k_cache", B * TM * M * 4), *vc = zr(r, "kv_append.v_cache", B * TM * M * 4);
        float *kq = fr(r, "kv.qkv", B * 3 * M);
        DO(T->kv_append(c, q, kc, vc, kq, F32, pos, B, 1, M, 2, TM));
        DO(T->attention_cached(c, q, zr(r, "attention_cached.out", B * M * 4), kq, kc, vc, F32, pos, B, 1, M, 2, TM));
        uint64_t ctr[2] = {10, 20};
        dsmoe_sampling_params sp = {.temperature = 0.8f, .top_k = 3, .top_p = 0.9f, .seed = 5};
        DO(T->sample(c, q, zr(r, "sample.tokens", 2 * 4), fr(r, "sample.logits", 2 * V), F32, 2, V, &sp, ctr));
        SCRIBBLE(sp);
        SCRIBBLE(ctr);
    }
}

// Runs the sequence on T, copies every buffer back, waits once.
static void run_on(runner *r, const dsmoe_kernel_plugin_v3 *T) {
    memset(r, 0, sizeof *r);
    r->T = T;
    r->c = make_ctx(T, 2);
    r->q = T->default_queue(r->c);
    run_ops(r);
    for (int i = 0; i < r->n; i++) {
        r->b[i].h = malloc(r->b[i].bytes ? r->b[i].bytes : 1);
        DO(T->copy_to_host(r->c, r->q, r->b[i].h, r->b[i].d, r->b[i].bytes));
    }
    DO(wait_queue(T, r->c, r->q));
}

static void done(runner *r) {
    for (int i = 0; i < r->n; i++) {
        r->T->free(r->c, r->b[i].d);
        free(r->b[i].h);
    }
    DO(r->T->synchronize(r->c));
    r->T->finalize(r->c);
}

// gemm_grouped's outputs (c, and aux with BIAS_GELU): rows from a group's count to m_max are unspecified
// after the call; the strict plugin fills them with NaN bytes (STRICT_POISON), the cpu plugin leaves them.
// So the rows below the counts are compared, and strict's others must be all poison. 1 when they agree.
static int grouped_output(const char *name) {
    return !strcmp(name, "grouped.c") || !strcmp(name, "grouped.aux") || !strcmp(name, "grouped_dgelu.c") ||
           !strcmp(name, "grouped_bias.c");
}

static int grouped_agrees(const unsigned char *strict, const unsigned char *cpu) {
    const size_t row = GROUP_COLS * sizeof(float);
    for (int g = 0; g < 3; g++)
        for (int i = 0; i < GROUP_ROWS; i++) {
            size_t at = ((size_t)g * GROUP_ROWS + (size_t)i) * row;
            if (i < GROUP_COUNTS[g] ? memcmp(strict + at, cpu + at, row) != 0 : strict[at] != 0xFF ||
                                                                                  memcmp(strict + at, strict + at + 1, row - 1))
                return 0;
        }
    return 1;
}

static void test_every_op_as_cpu(void **state) {
    static runner got, want;
    run_on(&got, S);
    run_on(&want, P);
    assert_int_equal(got.n, want.n);
    int differ = 0;
    for (int i = 0; i < got.n; i++) {
        assert_int_equal(got.b[i].bytes, want.b[i].bytes);
        int same = grouped_output(got.b[i].name) ? grouped_agrees(got.b[i].h, want.b[i].h)
                                                  : memcmp(got.b[i].h, want.b[i].h, got.b[i].bytes) == 0;
        if (!same) {
            print_error("%s differs from the cpu plugin's\n", got.b[i].name);
            differ++;
        }
    }
    // The run did real work: the outputs are not what they were allocated as (zeros here).
    for (int i = 0; i < got.n; i++)
        if (strcmp(got.b[i].name, "gate_assign.kept") == 0) {
            const int32_t *kept = (const int32_t *)got.b[i].h;
            assert_true(kept[0] + kept[1] + kept[2] + kept[3] > 0);
        }
    done(&got);
    done(&want);
    if (differ) fail_msg("%d buffer(s) differ", differ);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_op_as_cpu),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
