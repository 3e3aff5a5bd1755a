// tests/plugins/kernel/test_cpu_bf16_rows.c: the cpu plugin's bfloat16 ops, which read and write
// bfloat16 rows themselves rather than float32 copies of whole tensors (cpu_ops.c, cpu_elementwise.c,
// cpu_attention.c, cpu_gating.c, cpu_infer.c): layer norm, bias_add, bias_backward, axpy, the softmax
// cross-entropy, the residual-MoE mix, the embedding, GELU, the gate's noise, all_finite, causal
// attention, MoE dispatch and combine and their backwards, the KV cache append and cached attention,
// sampling (the GEMMs and conversions are test_cpu_bf16.c's).
//
// The contract for a bfloat16 op is float32 arithmetic on the bfloat16 values with each result rounded
// once. The reference is the plugin's own float32 op on the widened values, rounded by a rounding
// written from the definition (bf16_ref.h): a different code path (float32 tensors, no widening inside
// the op), so the check is bit for bit. Rows and positions a call must not write hold a sentinel or
// earlier values. Each case runs on a 2-thread and a 1-thread context: the bits must not depend on the
// thread count.
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cpu_plugin_test.h"
#include "plugins/kernel/bf16_ref.h" // ref_f2bf, to_bf16, SENTINEL_BITS

#define F32 DSMOE_FLOAT32
#define BF16 DSMOE_BFLOAT16

// host bf16 (n) of a device buffer
static uint16_t *get16(dsmoe_kernel_ctx *c, const void *d, size_t n) {
    uint16_t *h = malloc(n * 2);
    dev_get(c, h, d, n * 2);
    return h;
}

// Runs a case on the shared 2-thread context, then on a fresh 1-thread one.
static void on_both_contexts(void (*run)(dsmoe_kernel_ctx *)) {
    run(C);
    dsmoe_kernel_ctx *one = cpt_ctx(1);
    run(one);
    P->finalize(one);
}

// ---------------------------------------------------------------------------------------------------
// Layer norm, bias, axpy, the loss and the residual-MoE mix on bfloat16 rows: (S, M) with M not a multiple of the 64-column
// chunks of the column sums, and S * M above the size at which the ops go parallel. float32 outputs
// (mean, rstd, the weight and bias gradients, the losses and probabilities, the mix's coefficients and
// their gradient) must be the float32 op's bits; bfloat16 ones its rounded bits.

enum { RS = 101, RM = 200 };

// A device copy of n host floats rounded to bfloat16 (x keeps the rounded values), as bf16 and as float32.
static void up_pair(dsmoe_kernel_ctx *c, float *x, size_t n, void **b16, float **f32) {
    uint16_t *h = to_bf16(x, n);
    *b16 = dev_put(c, h, n * 2);
    *f32 = dev_put(c, x, n * 4);
    free(h);
}

static void same_rounded_dev(dsmoe_kernel_ctx *c, const char *what, const void *b16, const float *f32, size_t n) {
    uint16_t *h = get16(c, b16, n);
    float *f = malloc(n * sizeof *f);
    dev_get(c, f, f32, n * sizeof *f);
    for (size_t i = 0; i < n; i++)
        if (h[i] != ref_f2bf(f[i]))
            fail_msg("%s: element %zu (row %zu): bfloat16 0x%04x, expected 0x%04x (float32 %.9g)", what, i, i / RM,
                     h[i], ref_f2bf(f[i]), f[i]);
    free(h), free(f);
}

static void same_floats_dev(dsmoe_kernel_ctx *c, const char *what, const float *a, const float *b, size_t n) {
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    dev_get(c, x, a, n * sizeof *x);
    dev_get(c, y, b, n * sizeof *y);
    for (size_t i = 0; i < n; i++)
        if (memcmp(x + i, y + i, sizeof *x))
            fail_msg("%s: element %zu is %.9g from bfloat16 rows, %.9g from the float32 op", what, i, x[i], y[i]);
    free(x), free(y);
}

// f32 (n) = the widened values of b16 (n): a float32 tensor that an earlier bf16 call rounded, so that
// the next call starts from the same values in both dtypes.
static void resync(dsmoe_kernel_ctx *c, float *f32, const void *b16, size_t n) {
    uint16_t *h = get16(c, b16, n);
    float *w = malloc(n * sizeof *w);
    for (size_t i = 0; i < n; i++) w[i] = bf2f(h[i]);
    OKC(c, P->copy_to_device(c, P->default_queue(c), f32, w, n * 4));
    free(w), free(h);
}

// A device float32 buffer holding host[0 .. n), twice (one for each dtype's call).
static void up_twice(dsmoe_kernel_ctx *c, const float *host, size_t n, float **a, float **b) {
    *a = dev_put(c, host, n * 4);
    *b = dev_put(c, host, n * 4);
}

static void row_ops_on(dsmoe_kernel_ctx *c) {
    dsmoe_kernel_queue *q = P->default_queue(c);
    const size_t n = (size_t)RS * RM;
    cpt_rng_state = 21;
    float *x = rnd_fill(n, 3), *g = rnd_fill(n, 1), *d0 = rnd_fill(n, 1), *y0 = rnd_fill(n, 2);
    float *w = rnd_fill(RM, 1), *bias = rnd_fill(RM, 1), *acc0 = rnd_fill(RM, 1);
    for (int j = 0; j < RM; j++) w[j] += 1.0f;
    void *bx, *bg, *bd, *by, *bo = dev_new(c, n * 2, 0);
    float *fx, *fg, *fd, *fy, *fo = dev_new(c, n * 4, 0);
    up_pair(c, x, n, &bx, &fx);
    up_pair(c, g, n, &bg, &fg);
    up_pair(c, d0, n, &bd, &fd);
    up_pair(c, y0, n, &by, &fy);
    float *dw = dev_put(c, w, RM * 4), *dbias = dev_put(c, bias, RM * 4);
    float *mean16 = dev_new(c, RS * 4, 0), *rstd16 = dev_new(c, RS * 4, 0);
    float *mean32 = dev_new(c, RS * 4, 0), *rstd32 = dev_new(c, RS * 4, 0);

    OKC(c, P->layernorm_forward(c, q, bo, mean16, rstd16, bx, BF16, dw, dbias, RS, RM, 1e-5f));
    OKC(c, P->layernorm_forward(c, q, fo, mean32, rstd32, fx, F32, dw, dbias, RS, RM, 1e-5f));
    same_rounded_dev(c, "layernorm_forward out", bo, fo, n);
    same_floats_dev(c, "layernorm_forward mean", mean16, mean32, RS);
    same_floats_dev(c, "layernorm_forward rstd", rstd16, rstd32, RS);

    float *gw16, *gw32, *gb16, *gb32; // accumulated into, from the same start
    up_twice(c, acc0, RM, &gw16, &gw32);
    up_twice(c, acc0, RM, &gb16, &gb32);
    OKC(c, P->layernorm_backward(c, q, bd, gw16, gb16, bg, bx, BF16, dw, mean32, rstd32, RS, RM));
    OKC(c, P->layernorm_backward(c, q, fd, gw32, gb32, fg, fx, F32, dw, mean32, rstd32, RS, RM));
    same_rounded_dev(c, "layernorm_backward din", bd, fd, n);
    same_floats_dev(c, "layernorm_backward dweight", gw16, gw32, RM);
    same_floats_dev(c, "layernorm_backward dbias", gb16, gb32, RM);

    OKC(c, P->bias_add(c, q, by, BF16, dbias, RS, RM));
    OKC(c, P->bias_add(c, q, fy, F32, dbias, RS, RM));
    same_rounded_dev(c, "bias_add", by, fy, n);

    OKC(c, P->bias_backward(c, q, gb16, bg, BF16, RS, RM));
    OKC(c, P->bias_backward(c, q, gb32, fg, F32, RS, RM));
    same_floats_dev(c, "bias_backward", gb16, gb32, RM);

    resync(c, fy, by, n); // y from here on: the bf16 result, in both dtypes
    OKC(c, P->axpy(c, q, by, 0.37f, bx, BF16, n - 5)); // the last 5 elements must keep their values
    OKC(c, P->axpy(c, q, fy, 0.37f, fx, F32, n - 5));
    same_rounded_dev(c, "axpy", by, fy, n);

    // The loss over (RS, RM) logits: x as logits (rows of 3 * rnd), targets spread over the classes.
    int32_t tg[RS];
    for (int s = 0; s < RS; s++) tg[s] = (s * 37) % RM;
    int32_t *dtg = dev_put(c, tg, sizeof tg);
    float *loss16 = dev_new(c, RS * 4, 0), *loss32 = dev_new(c, RS * 4, 0);
    float *p16 = dev_new(c, n * 4, 0), *p32 = dev_new(c, n * 4, 0);
    OKC(c, P->crossentropy_forward(c, q, loss16, p16, bx, BF16, dtg, RS, RM));
    OKC(c, P->crossentropy_forward(c, q, loss32, p32, fx, F32, dtg, RS, RM));
    same_floats_dev(c, "crossentropy_forward losses", loss16, loss32, RS);
    same_floats_dev(c, "crossentropy_forward probs", p16, p32, n);
    resync(c, fd, bd, n); // din from above, accumulated into
    OKC(c, P->crossentropy_backward(c, q, bd, BF16, p32, dtg, 1.0f / RS, RS, RM));
    OKC(c, P->crossentropy_backward(c, q, fd, F32, p32, dtg, 1.0f / RS, RS, RM));
    same_rounded_dev(c, "crossentropy_backward", bd, fd, n);

    // The residual-MoE mix of x (moe) and g (mlp) into o, and back into d and y.
    float *lg = rnd_fill(2 * RS, 2), *co16 = dev_new(c, 2 * RS * 4, 0), *co32 = dev_new(c, 2 * RS * 4, 0);
    float *dlg = dev_put(c, lg, 2 * RS * 4), *dl16, *dl32;
    up_twice(c, lg, 2 * RS, &dl16, &dl32);
    OKC(c, P->residual_mix_forward(c, q, bo, co16, bx, bg, BF16, dlg, RS, RM));
    OKC(c, P->residual_mix_forward(c, q, fo, co32, fx, fg, F32, dlg, RS, RM));
    same_rounded_dev(c, "residual_mix_forward out", bo, fo, n);
    same_floats_dev(c, "residual_mix_forward coef", co16, co32, 2 * RS);
    resync(c, fd, bd, n);
    resync(c, fy, by, n);
    OKC(c, P->residual_mix_backward(c, q, bd, by, dl16, bo, bx, bg, BF16, co32, RS, RM));
    resync(c, fo, bo, n); // dout as the bfloat16 call read it
    OKC(c, P->residual_mix_backward(c, q, fd, fy, dl32, fo, fx, fg, F32, co32, RS, RM));
    same_rounded_dev(c, "residual_mix_backward dmoe", bd, fd, n);
    same_rounded_dev(c, "residual_mix_backward dmlp", by, fy, n);
    same_floats_dev(c, "residual_mix_backward dcoef_logits", dl16, dl32, 2 * RS);
    free(lg);

    void *bufs[] = {bx, bg, bd, by, bo, fx, fg, fd, fy, fo, dw, dbias, mean16, rstd16, mean32, rstd32,
                    gw16, gw32, gb16, gb32, dtg, loss16, loss32, p16, p32, co16, co32, dlg, dl16, dl32};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) dev_free(c, bufs[i]);
    free(x), free(g), free(d0), free(y0), free(w), free(bias), free(acc0);
}

static void test_row_ops(void **state) { on_both_contexts(row_ops_on); }

// ---------------------------------------------------------------------------------------------------
// The embedding (a float32 and a bfloat16 table, tokens repeated so that dwte rows gather several
// rows), GELU and its backward (over several of the op's blocks and a ragged end), the gate's noise, and
// all_finite on bfloat16 bits.

enum { EB = 3, ET = 41, EV = 50, EN_POS = 64 };

static void elementwise_on(dsmoe_kernel_ctx *c) {
    dsmoe_kernel_queue *q = P->default_queue(c);
    const size_t rows = (size_t)EB * ET, n = rows * RM;
    cpt_rng_state = 29;
    float *wte = rnd_fill((size_t)EV * RM, 1), *wpe = rnd_fill((size_t)EN_POS * RM, 1), *g = rnd_fill(n, 1);
    uint16_t *wte16 = to_bf16(wte, (size_t)EV * RM); // wte keeps the rounded values
    int32_t tok[EB * ET], pos[EB] = {0, 7, EN_POS - ET};
    for (size_t r = 0; r < rows; r++) tok[r] = (int32_t)((r * 13) % EV);
    int32_t *dtok = dev_put(c, tok, sizeof tok), *dpos = dev_put(c, pos, sizeof pos);
    float *dwpe = dev_put(c, wpe, (size_t)EN_POS * RM * 4);
    void *dwte16 = dev_put(c, wte16, (size_t)EV * RM * 2);
    float *dwte32 = dev_put(c, wte, (size_t)EV * RM * 4);
    void *bo = dev_new(c, n * 2, 0);
    float *fo = dev_new(c, n * 4, 0);
    for (int table = 0; table < 2; table++) { // a bfloat16, then a float32 table
        const void *w = table ? (const void *)dwte32 : dwte16;
        dsmoe_dtype wdt = table ? F32 : BF16;
        OKC(c, P->embedding_forward(c, q, bo, BF16, dtok, w, wdt, dwpe, dpos, EB, ET, RM, EV, EN_POS));
        OKC(c, P->embedding_forward(c, q, fo, F32, dtok, w, wdt, dwpe, dpos, EB, ET, RM, EV, EN_POS));
        same_rounded_dev(c, table ? "embedding_forward (float32 wte)" : "embedding_forward (bfloat16 wte)", bo, fo,
                         n);
    }
    void *bg;
    float *fg, *gte16, *gte32, *gpe16, *gpe32;
    up_pair(c, g, n, &bg, &fg);
    up_twice(c, wte, (size_t)EV * RM, &gte16, &gte32); // accumulated into from nonzero values
    up_twice(c, wpe, (size_t)EN_POS * RM, &gpe16, &gpe32);
    OKC(c, P->embedding_backward(c, q, gte16, gpe16, bg, BF16, dtok, EB, ET, RM, EV));
    OKC(c, P->embedding_backward(c, q, gte32, gpe32, fg, F32, dtok, EB, ET, RM, EV));
    same_floats_dev(c, "embedding_backward dwte", gte16, gte32, (size_t)EV * RM);
    same_floats_dev(c, "embedding_backward dwpe", gpe16, gpe32, (size_t)ET * RM);

    // GELU over n - 3 elements: the last 3 must keep their values.
    void *bx, *bd;
    float *fx, *fd;
    float *x = rnd_fill(n, 4), *d0 = rnd_fill(n, 1);
    up_pair(c, x, n, &bx, &fx);
    up_pair(c, d0, n, &bd, &fd);
    OKC(c, P->gelu_forward(c, q, bd, bx, BF16, n - 3));
    OKC(c, P->gelu_forward(c, q, fd, fx, F32, n - 3));
    same_rounded_dev(c, "gelu_forward", bd, fd, n);
    resync(c, fd, bd, n); // din accumulates into the forward's output
    OKC(c, P->gelu_backward(c, q, bd, bx, bg, BF16, n - 3));
    OKC(c, P->gelu_backward(c, q, fd, fx, fg, F32, n - 3));
    same_rounded_dev(c, "gelu_backward", bd, fd, n);

    OKC(c, P->mul_uniform_noise(c, q, bo, bx, BF16, n, 0.01f, 77, 1000));
    OKC(c, P->mul_uniform_noise(c, q, fo, fx, F32, n, 0.01f, 77, 1000));
    same_rounded_dev(c, "mul_uniform_noise", bo, fo, n);

    // all_finite reads bfloat16 bits: Inf and NaN anywhere, the largest finite value is finite.
    const uint16_t cases[][3] = {{0x3f80, 0x7f7f, 0xff7f}, {0x3f80, 0x7f80, 0x0000}, {0xff80, 0x0001, 0x0000},
                                 {0x0000, 0x8000, 0x7fc1}};
    const int32_t want[] = {1, 0, 0, 0};
    int32_t *dflag = dev_new(c, 4, 0);
    for (int k = 0; k < 4; k++) {
        void *dcase = dev_put(c, cases[k], sizeof cases[k]);
        int32_t flag = -1;
        OKC(c, P->all_finite(c, q, dcase, BF16, 3, dflag));
        dev_get(c, &flag, dflag, 4);
        if (flag != want[k]) fail_msg("all_finite case %d: %d, expected %d", k, flag, want[k]);
        dev_free(c, dcase);
    }
    void *bufs[] = {dtok, dpos, dwpe, dwte16, dwte32, bo, fo, bg, fg, gte16, gte32, gpe16, gpe32, bx, bd, fx, fd,
                    dflag};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) dev_free(c, bufs[i]);
    free(wte), free(wpe), free(g), free(wte16), free(x), free(d0);
}

static void test_elementwise(void **state) { on_both_contexts(elementwise_on); }

// ---------------------------------------------------------------------------------------------------
// Causal attention on bfloat16 heads: out rounded, the saved probabilities (float32) bitwise, and the
// gradient accumulated into a nonzero dqkv, rounded. T * T * hs is above the size at which units go
// parallel.

enum { AB = 2, AT = 37, AM = 64, ANH = 4 };

static void attention_on(dsmoe_kernel_ctx *c) {
    dsmoe_kernel_queue *q = P->default_queue(c);
    const dsmoe_attention_shape sh16 = {AB, AT, AM, ANH, BF16}, sh32 = {AB, AT, AM, ANH, F32};
    size_t saved, ws, saved32, ws32;
    OKC(c, P->attention_bytes(c, &sh16, &saved, &ws));
    OKC(c, P->attention_bytes(c, &sh32, &saved32, &ws32));
    if (saved != saved32 || ws != ws32)
        fail_msg("attention_bytes: bfloat16 %zu + %zu bytes, float32 %zu + %zu: the saved state is float32 in both",
                 saved, ws, saved32, ws32);
    const size_t nqkv = (size_t)AB * AT * 3 * AM, nout = (size_t)AB * AT * AM;
    cpt_rng_state = 31;
    float *qkv = rnd_fill(nqkv, 2), *dout = rnd_fill(nout, 1), *d0 = rnd_fill(nqkv, 1);
    void *bq, *bg, *bd, *bo = dev_new(c, nout * 2, 0);
    float *fq, *fg, *fd, *fo = dev_new(c, nout * 4, 0);
    up_pair(c, qkv, nqkv, &bq, &fq);
    up_pair(c, dout, nout, &bg, &fg);
    up_pair(c, d0, nqkv, &bd, &fd);
    float *s16 = dev_new(c, saved, 0), *s32 = dev_new(c, saved, 0), *w16 = dev_new(c, ws, 0), *w32 = dev_new(c, ws, 0);
    OKC(c, P->attention_forward(c, q, bo, s16, bq, &sh16));
    OKC(c, P->attention_forward(c, q, fo, s32, fq, &sh32));
    same_rounded_dev(c, "attention_forward out", bo, fo, nout);
    same_floats_dev(c, "attention_forward saved probabilities", s16, s32, saved / 4);
    resync(c, fo, bo, nout); // out as the backward sees it
    OKC(c, P->attention_backward(c, q, bd, w16, bg, bq, bo, s16, &sh16));
    OKC(c, P->attention_backward(c, q, fd, w32, fg, fq, fo, s32, &sh32));
    same_rounded_dev(c, "attention_backward dqkv", bd, fd, nqkv);
    void *bufs[] = {bq, bg, bd, bo, fq, fg, fd, fo, s16, s32, w16, w32};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) dev_free(c, bufs[i]);
    free(qkv), free(dout), free(d0);
}

static void test_attention(void **state) { on_both_contexts(attention_on); }

// ---------------------------------------------------------------------------------------------------
// MoE dispatch and combine on bfloat16 rows: the float32 op on the widened tensors with each result
// rounded once (the reference rounding), bit for bit; rows of unused slots keep what they held; 1 and 2
// threads agree.

enum { MS = 37, MK = 2, ME = 5, MC = 16, MM = 70, MROWS = ME * MC };

// Two distinct experts per token, slots in token order up to the capacity, and some choices dropped:
// 80 slots, fewer used, so some rows stay unused.
static void moe_table(int32_t *choice, int32_t *slot) {
    int used[ME] = {0};
    for (int s = 0; s < MS; s++)
        for (int k = 0; k < MK; k++) {
            int e = (s * 3 + k * 2) % ME, i = s * MK + k;
            choice[i] = e;
            slot[i] = used[e] < MC && (s + k) % 7 != 3 ? used[e]++ : -1;
        }
}

// The float32 result f (n), rounded, against the bfloat16 result h; rows (of MM) with used[r] == 0 must
// hold SENTINEL_BITS instead (used NULL: every row is written).
static void same_rounded(const char *what, const uint16_t *h, const float *f, size_t n, const int *used) {
    for (size_t i = 0; i < n; i++) {
        uint16_t want = used && !used[i / MM] ? SENTINEL_BITS : ref_f2bf(f[i]);
        if (h[i] != want)
            fail_msg("%s: element %zu (row %zu): bfloat16 0x%04x, expected 0x%04x", what, i, i / MM, h[i], want);
    }
}

static void moe_rows_on(dsmoe_kernel_ctx *c) {
    dsmoe_kernel_queue *q = P->default_queue(c);
    int32_t choice[MS * MK], slot[MS * MK];
    moe_table(choice, slot);
    int used[MROWS] = {0};
    for (int i = 0; i < MS * MK; i++)
        if (slot[i] >= 0) used[choice[i] * MC + slot[i]] = 1;
    cpt_rng_state = 5;
    float *x = rnd_fill(MS * MM, 2), *y = rnd_fill(MROWS * MM, 2), *dout = rnd_fill(MS * MM, 1);
    float *dx0 = rnd_fill(MS * MM, 1), *w = rnd_fill(MS * MK, 1);
    uint16_t *x16 = to_bf16(x, MS * MM), *y16 = to_bf16(y, MROWS * MM), *dout16 = to_bf16(dout, MS * MM);
    uint16_t *dx16 = to_bf16(dx0, MS * MM), sent[MROWS * MM];
    for (int i = 0; i < MROWS * MM; i++) sent[i] = SENTINEL_BITS;
    int32_t *dch = dev_put(c, choice, sizeof choice), *dsl = dev_put(c, slot, sizeof slot);
    float *dw = dev_put(c, w, MS * MK * 4), *dwt = dev_new(c, MS * MK * 4, 0), *dwt32 = dev_new(c, MS * MK * 4, 0);
    void *bx = dev_put(c, x16, MS * MM * 2), *by = dev_put(c, y16, MROWS * MM * 2), *bdo = dev_put(c, dout16, MS * MM * 2);
    float *fx = dev_put(c, x, MS * MM * 4), *fy = dev_put(c, y, MROWS * MM * 4), *fdo = dev_put(c, dout, MS * MM * 4);
    void *bbuf = dev_put(c, sent, sizeof sent), *bdx = dev_put(c, dx16, MS * MM * 2), *bout = dev_new(c, MS * MM * 2, 0);
    float *fbuf = dev_zeros(c, MROWS * MM * 4), *fdx = dev_put(c, dx0, MS * MM * 4), *fout = dev_new(c, MS * MM * 4, 0);
    float *host = malloc(MROWS * MM * 4), *host_w = malloc(MS * MK * 4), *got_w = malloc(MS * MK * 4);

    OKC(c, P->moe_dispatch(c, q, bbuf, bx, BF16, dch, dsl, MS, MK, ME, MC, MM));
    OKC(c, P->moe_dispatch(c, q, fbuf, fx, F32, dch, dsl, MS, MK, ME, MC, MM));
    uint16_t *h = get16(c, bbuf, MROWS * MM);
    dev_get(c, host, fbuf, MROWS * MM * 4);
    same_rounded("moe_dispatch", h, host, MROWS * MM, used);
    free(h);

    OKC(c, P->moe_dispatch_backward(c, q, bdx, by, BF16, dch, dsl, MS, MK, ME, MC, MM));
    OKC(c, P->moe_dispatch_backward(c, q, fdx, fy, F32, dch, dsl, MS, MK, ME, MC, MM));
    h = get16(c, bdx, MS * MM);
    dev_get(c, host, fdx, MS * MM * 4);
    same_rounded("moe_dispatch_backward", h, host, MS * MM, NULL);
    free(h);

    OKC(c, P->moe_combine(c, q, bout, by, BF16, dch, dsl, dw, MS, MK, ME, MC, MM));
    OKC(c, P->moe_combine(c, q, fout, fy, F32, dch, dsl, dw, MS, MK, ME, MC, MM));
    h = get16(c, bout, MS * MM);
    dev_get(c, host, fout, MS * MM * 4);
    same_rounded("moe_combine", h, host, MS * MM, NULL);
    free(h);

    OKC(c, P->copy_to_device(c, q, bbuf, sent, sizeof sent)); // dy: unused rows keep the sentinel
    OKC(c, P->moe_combine_backward(c, q, bbuf, dwt, bdo, by, BF16, dch, dsl, dw, MS, MK, ME, MC, MM));
    OKC(c, P->moe_combine_backward(c, q, fbuf, dwt32, fdo, fy, F32, dch, dsl, dw, MS, MK, ME, MC, MM));
    h = get16(c, bbuf, MROWS * MM);
    dev_get(c, host, fbuf, MROWS * MM * 4);
    same_rounded("moe_combine_backward dy", h, host, MROWS * MM, used);
    dev_get(c, got_w, dwt, MS * MK * 4);
    dev_get(c, host_w, dwt32, MS * MK * 4);
    if (memcmp(got_w, host_w, MS * MK * 4))
        fail_msg("moe_combine_backward: dweight from bfloat16 rows differs from the float32 op's on the same values");
    free(h);

    void *bufs[] = {dch, dsl, dw, dwt, dwt32, bx, by, bdo, fx, fy, fdo, bbuf, bdx, bout, fbuf, fdx, fout};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) dev_free(c, bufs[i]);
    free(x), free(y), free(dout), free(dx0), free(w), free(x16), free(y16), free(dout16), free(dx16);
    free(host), free(host_w), free(got_w);
}

static void test_moe_rows(void **state) { on_both_contexts(moe_rows_on); }

// ---------------------------------------------------------------------------------------------------
// KV cache and cached attention on bfloat16 caches: a ragged prefill (sequences at different positions,
// 12 tokens each: more than the context's small_rows of 8, so BLAS GEMMs over widened blocks), then a
// step of 3 tokens and a decode step of 1 (dot products over KV_BLOCK = 64 rows widened at a time; one
// sequence is past position 64, so over more than one block). The float32 outputs themselves are held
// to attention computed here in double from the float32 caches. kv_append must write exactly the float32
// op's positions; attention_cached's output must be the float32 op's on the same cache contents, rounded
// once.

enum { KB = 3, KNH = 4, KM = 128, KD = KM / KNH, KTMAX = 96, KT1 = 12, KT2 = 3, KFAR = 70 };

// The bf16 cache c16 (B, NH, T_max, D) against the float32 cache c32 rounded: every element.
static void same_cache(const char *what, dsmoe_kernel_ctx *c, const void *c16, const float *c32) {
    size_t n = (size_t)KB * KNH * KTMAX * KD;
    uint16_t *h = get16(c, c16, n);
    float *f = malloc(n * sizeof *f);
    dev_get(c, f, c32, n * sizeof *f);
    for (size_t i = 0; i < n; i++) {
        uint16_t want = ref_f2bf(f[i]);
        if (h[i] != want)
            fail_msg("%s: element %zu (sequence %zu, head %zu, position %zu): bfloat16 0x%04x, expected 0x%04x",
                     what, i, i / ((size_t)KNH * KTMAX * KD), i / ((size_t)KTMAX * KD) % KNH, i / KD % KTMAX, h[i],
                     want);
    }
    free(h), free(f);
}

// Attention of T_new query rows per sequence (q from qkv (B, T_new, 3M)) over the host caches, in double.
static double *naive_cached(const float *qkv, const float *kc, const float *vc, const int32_t *pos, int T_new) {
    double *want = malloc((size_t)KB * T_new * KM * sizeof *want), s[KTMAX];
    for (int b = 0; b < KB; b++)
        for (int h = 0; h < KNH; h++)
            for (int t = 0; t < T_new; t++) {
                const float *qt = qkv + ((size_t)b * T_new + t) * 3 * KM + h * KD;
                const float *k = kc + ((size_t)b * KNH + h) * KTMAX * KD, *v = vc + ((size_t)b * KNH + h) * KTMAX * KD;
                int last = pos[b] + t;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= last; j++) {
                    s[j] = dot_d(qt, k + (size_t)j * KD, KD) / sqrt((double)KD);
                    mx = s[j] > mx ? s[j] : mx;
                }
                for (int j = 0; j <= last; j++) sum += s[j] = exp(s[j] - mx);
                double *o = want + ((size_t)b * T_new + t) * KM + h * KD;
                for (int d = 0; d < KD; d++) {
                    double acc = 0;
                    for (int j = 0; j <= last; j++) acc += s[j] / sum * v[(size_t)j * KD + d];
                    o[d] = acc;
                }
            }
    return want;
}

// One step: T_new tokens per sequence at positions pos, appended to both pairs of caches and attended.
static void kv_step(dsmoe_kernel_ctx *c, const char *what, const int32_t *pos, int T_new, void *k16, void *v16,
                    float *k32, float *v32) {
    dsmoe_kernel_queue *q = P->default_queue(c);
    size_t nq = (size_t)KB * T_new * 3 * KM, no = (size_t)KB * T_new * KM;
    float *qkv = rnd_fill(nq, 2);
    uint16_t *qkv16 = to_bf16(qkv, nq); // qkv now holds the widened values
    int32_t *dpos = dev_put(c, pos, KB * sizeof *pos);
    void *bq = dev_put(c, qkv16, nq * 2), *bo = dev_new(c, no * 2, 0);
    float *fq = dev_put(c, qkv, nq * 4), *fo = dev_new(c, no * 4, 0);
    OKC(c, P->kv_append(c, q, k16, v16, bq, BF16, dpos, KB, T_new, KM, KNH, KTMAX));
    OKC(c, P->kv_append(c, q, k32, v32, fq, F32, dpos, KB, T_new, KM, KNH, KTMAX));
    OKC(c, P->attention_cached(c, q, bo, bq, k16, v16, BF16, dpos, KB, T_new, KM, KNH, KTMAX));
    OKC(c, P->attention_cached(c, q, fo, fq, k32, v32, F32, dpos, KB, T_new, KM, KNH, KTMAX));
    char name[96];
    snprintf(name, sizeof name, "%s: kv_append k_cache", what);
    same_cache(name, c, k16, k32);
    snprintf(name, sizeof name, "%s: kv_append v_cache", what);
    same_cache(name, c, v16, v32);
    uint16_t *h = get16(c, bo, no);
    float *f = malloc(no * sizeof *f);
    dev_get(c, f, fo, no * sizeof *f);
    size_t nc = (size_t)KB * KNH * KTMAX * KD;
    float *hk = malloc(nc * sizeof *hk), *hv = malloc(nc * sizeof *hv);
    dev_get(c, hk, k32, nc * sizeof *hk);
    dev_get(c, hv, v32, nc * sizeof *hv);
    double *want = naive_cached(qkv, hk, hv, pos, T_new);
    snprintf(name, sizeof name, "%s: attention_cached float32 (double reference)", what);
    assert_close(name, f, want, no, 1e-6, 1e-5);
    free(hk), free(hv), free(want);
    snprintf(name, sizeof name, "%s: attention_cached", what);
    for (size_t i = 0; i < no; i++)
        if (!isfinite(f[i]) || h[i] != ref_f2bf(f[i]))
            fail_msg("%s: element %zu (row %zu): bfloat16 0x%04x, expected 0x%04x (float32 %.9g)", name, i, i / KM,
                     h[i], ref_f2bf(f[i]), f[i]);
    void *bufs[] = {dpos, bq, bo, fq, fo};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) dev_free(c, bufs[i]);
    free(qkv), free(qkv16), free(h), free(f);
}

static void kv_cache_on(dsmoe_kernel_ctx *c) {
    // The caches start with random values, the same in both dtypes: what an earlier context left, which
    // positions below a sequence's first appended one stand for. A write to a wrong position shows as a
    // difference between the two caches.
    size_t n = (size_t)KB * KNH * KTMAX * KD;
    cpt_rng_state = 7;
    float *before = rnd_fill(n, 2);
    uint16_t *before16 = to_bf16(before, n);
    void *k16 = dev_put(c, before16, n * 2), *v16 = dev_put(c, before16, n * 2);
    float *k32 = dev_put(c, before, n * 4), *v32 = dev_put(c, before, n * 4);
    cpt_rng_state = 11;
    const int32_t prefill[KB] = {0, 5, KFAR}, step[KB] = {KT1, 5 + KT1, KFAR + KT1};
    const int32_t decode[KB] = {KT1 + KT2, 5 + KT1 + KT2, KFAR + KT1 + KT2};
    kv_step(c, "ragged prefill", prefill, KT1, k16, v16, k32, v32);
    kv_step(c, "3-token step", step, KT2, k16, v16, k32, v32);
    kv_step(c, "decode", decode, 1, k16, v16, k32, v32);
    dev_free(c, k16), dev_free(c, v16), dev_free(c, k32), dev_free(c, v32);
    free(before), free(before16);
}

static void test_kv_cache(void **state) { on_both_contexts(kv_cache_on); }

// ---------------------------------------------------------------------------------------------------
// Sampling from bfloat16 logits: rows of a vocabulary's size, rounded to bfloat16 (so that many are
// equal and the lower id must win), greedy and three samplers; the tokens must be the float32 op's on
// the widened logits, with the same counters.

enum { SR = 64, SV = 3000 };

static void sample_on(dsmoe_kernel_ctx *c) {
    dsmoe_kernel_queue *q = P->default_queue(c);
    cpt_rng_state = 13;
    float *z = rnd_fill((size_t)SR * SV, 6.0f);
    void *z16;
    float *z32;
    up_pair(c, z, (size_t)SR * SV, &z16, &z32);
    uint64_t counters[SR];
    for (int r = 0; r < SR; r++) counters[r] = 500 + 7 * (uint64_t)r;
    int32_t *t16 = dev_new(c, SR * 4, 0), *t32 = dev_new(c, SR * 4, 0);
    const dsmoe_sampling_params ps[4] = {
        {0.0f, 0, 1.0f, 1}, {1.0f, 0, 1.0f, 2}, {0.7f, 40, 1.0f, 3}, {1.2f, 0, 0.9f, 4}};
    for (int k = 0; k < 4; k++) {
        OKC(c, P->sample(c, q, t16, z16, BF16, SR, SV, &ps[k], counters));
        OKC(c, P->sample(c, q, t32, z32, F32, SR, SV, &ps[k], counters));
        int32_t a[SR], b[SR];
        dev_get(c, a, t16, sizeof a);
        dev_get(c, b, t32, sizeof b);
        for (int r = 0; r < SR; r++)
            if (a[r] != b[r])
                fail_msg("sample setting %d row %d: token %d from bfloat16 logits, %d from the float32 op", k, r, a[r],
                         b[r]);
    }
    dev_free(c, t16), dev_free(c, t32), dev_free(c, z16), dev_free(c, z32);
    free(z);
}

static void test_sample(void **state) { on_both_contexts(sample_on); }

static int setup(void **state) { return cpt_load(2); }
static int teardown(void **state) {
    cpt_unload();
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_row_ops),
        cmocka_unit_test(test_elementwise),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_moe_rows),
        cmocka_unit_test(test_kv_cache),
        cmocka_unit_test(test_sample),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
