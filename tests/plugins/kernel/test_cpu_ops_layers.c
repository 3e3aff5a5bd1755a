// tests/plugins/kernel/test_cpu_ops_layers.c: the GPT layer ops of the cpu kernel plugin (embedding, layer norm,
// GELU, attention, cross-entropy, residual mix) and its inference ops (KV cache, cached attention,
// sampling), through the plugin's table (cpu_plugin_test.h).
// References: forwards against naive loops in double; every backward against central finite
// differences of loss = sum(out * w) for a fixed random w, computed in double; cached attention against
// attention_forward on the whole sequence; sampling against greedy argmax and a naive inverse-CDF
// sampler written here from the header's rules, and token frequencies against the probabilities.
// Backward outputs must accumulate: gradient buffers start at GRAD_BASE and the test subtracts it.
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "dsmoe/rng.h"
#include "cpu_plugin_test.h"

#define GRAD_BASE 0.25f
#define F32 DSMOE_FLOAT32

// Small shapes: B=2 T=5 M=8 NH=2 V=11.
enum { B = 2, T = 5, M = 8, NH = 2, V = 11, S = B * T };
static float *w_out;   // (S, 3M) host: the weights of the loss sum(out * w); big enough for every op here
static float *d_w_out; // the same on the device: the dout of every backward

static int32_t tokens[S] = {3, 0, 10, 3, 7, 5, 3, 10, 1, 0}; // repeats: scatter order matters

static void put(void *dev, const void *host, size_t bytes) { OK(P->copy_to_device(C, Q, dev, host, bytes)); }

// A device gradient buffer of n floats, all GRAD_BASE.
static float *grad_buf(size_t n) {
    float *h = malloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++)
        h[i] = GRAD_BASE;
    float *d = dev_put(C, h, n * sizeof *h);
    free(h);
    return d;
}

// Downloads a device gradient into a new host array.
static float *get_new(const float *dev, size_t n) {
    float *h = malloc(n * sizeof *h);
    dev_get(C, h, dev, n * sizeof *h);
    return h;
}

// Finite differences: for each host x[i], (loss(x + h) - loss(x - h)) / 2h against the analytic
// gradient (grad - GRAD_BASE); loss() uploads x. Float forwards limit the agreement to about 5e-5 here
// (tolerance 2e-4 + 1e-3 relative); a wrong formula is off by the size of the gradient.
typedef double (*loss_fn)(void);
static void check_grad(const char *what, float *x, const float *grad, size_t n, loss_fn loss) {
    const double h = 1e-2;
    double *num = malloc(n * sizeof *num);
    float *ana = malloc(n * sizeof *ana);
    double maxabs = 0;
    for (size_t i = 0; i < n; i++) {
        float save = x[i];
        x[i] = save + (float)h;
        double lp = loss();
        x[i] = save - (float)h;
        double lm = loss();
        x[i] = save;
        num[i] = (lp - lm) / (2 * h);
        ana[i] = grad[i] - GRAD_BASE;
        maxabs = fmax(maxabs, fabs(num[i]));
    }
    loss(); // leave the device holding x
    if (maxabs < 1e-3)
        fail_msg("%s: the gradient is all (near) zero: the check would prove nothing", what);
    assert_close(what, ana, num, n, 2e-4, 1e-3);
    free(num);
    free(ana);
}

// A bad token or target is found while running: the call reports it, and the context keeps it, so a
// context of its own is used.
static void expect_sticky(dsmoe_status (*run)(dsmoe_kernel_ctx *c), const char *needle) {
    dsmoe_kernel_ctx *c = cpt_ctx(1);
    assert_int_equal(run(c), DSMOE_ERR_INVALID);
    assert_int_equal(P->synchronize(c), DSMOE_ERR_INVALID);
    if (!strstr(P->last_error(c), needle))
        fail_msg("message '%s' lacks '%s'", P->last_error(c), needle);
    P->finalize(c);
}

// --- embedding ---
static float *e_wte, *e_wpe, *de_out, *de_wte, *de_wpe;
static int32_t *de_tok;
static double e_loss(void) {
    float out[S * M];
    put(de_wte, e_wte, V * M * 4), put(de_wpe, e_wpe, T * M * 4);
    OK(P->embedding_forward(C, Q, de_out, F32, de_tok, de_wte, F32, de_wpe, NULL, B, T, M, V, T));
    dev_get(C, out, de_out, sizeof out);
    return dot_d(out, w_out, S * M);
}

static dsmoe_status bad_embedding(dsmoe_kernel_ctx *c) {
    int32_t bad[S];
    memcpy(bad, tokens, sizeof bad);
    bad[4] = V;
    dsmoe_kernel_queue *q = P->default_queue(c);
    void *tok = dev_put(c, bad, sizeof bad), *g = dev_zeros(c, (V + T) * M * 4), *d = dev_zeros(c, S * M * 4);
    dsmoe_status st = P->embedding_backward(c, q, g, (float *)g + V * M, d, F32, tok, B, T, M, V);
    dev_free(c, tok), dev_free(c, g), dev_free(c, d);
    return st;
}

// A position past the table: pos[1] + T > n_pos.
static dsmoe_status bad_embedding_pos(dsmoe_kernel_ctx *c) {
    int32_t pos[B] = {0, 4};
    dsmoe_kernel_queue *q = P->default_queue(c);
    void *tok = dev_put(c, tokens, sizeof tokens), *p = dev_put(c, pos, sizeof pos);
    float *w = dev_zeros(c, (V + (T + 3)) * M * 4), *o = dev_zeros(c, S * M * 4);
    dsmoe_status st = P->embedding_forward(c, q, o, F32, tok, w, F32, w + V * M, p, B, T, M, V, T + 3);
    dev_free(c, tok), dev_free(c, p), dev_free(c, w), dev_free(c, o);
    return st;
}

static uint16_t bf16_of(float f) { // round to nearest even (finite values)
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// Sequences at their own positions (pos), and a bfloat16 table: out[b, t] = wte[token] + wpe[pos[b] + t],
// with wte's bfloat16 values widened exactly.
static void test_embedding_positions_bf16(void **state) {
    (void)state;
    enum { NP = T + 3 };
    float *wte = rnd_fill(V * M, 1), *wpe = rnd_fill(NP * M, 1), out[S * M];
    uint16_t wte16[V * M];
    for (int i = 0; i < V * M; i++) wte16[i] = bf16_of(wte[i]);
    int32_t pos[B] = {3, 1};
    void *dtok = dev_put(C, tokens, sizeof tokens), *dpos = dev_put(C, pos, sizeof pos);
    void *dw32 = dev_put(C, wte, V * M * 4), *dw16 = dev_put(C, wte16, sizeof wte16), *dpe = dev_put(C, wpe, NP * M * 4);
    float *dout = dev_new(C, S * M * 4, 0);
    for (int k = 0; k < 2; k++) {
        OK(P->embedding_forward(C, Q, dout, F32, dtok, k ? dw16 : dw32, k ? DSMOE_BFLOAT16 : F32, dpe, dpos, B, T, M,
                                V, NP));
        dev_get(C, out, dout, sizeof out);
        for (int r = 0; r < S; r++)
            for (int j = 0; j < M; j++) {
                uint32_t u = (uint32_t)wte16[tokens[r] * M + j] << 16;
                float e16;
                memcpy(&e16, &u, 4);
                float want = (k ? e16 : wte[tokens[r] * M + j]) + wpe[(pos[r / T] + r % T) * M + j];
                if (out[r * M + j] != want) fail_msg("%s wte: row %d col %d: %g, expected %g", k ? "bf16" : "fp32", r, j,
                                                     out[r * M + j], want);
            }
    }
    dev_free(C, dtok), dev_free(C, dpos), dev_free(C, dw32), dev_free(C, dw16), dev_free(C, dpe), dev_free(C, dout);
    free(wte), free(wpe);
}

static void test_embedding(void **state) {
    e_wte = rnd_fill(V * M, 1), e_wpe = rnd_fill(T * M, 1);
    de_out = dev_new(C, S * M * 4, 0), de_wte = dev_new(C, V * M * 4, 0), de_wpe = dev_new(C, T * M * 4, 0);
    de_tok = dev_put(C, tokens, sizeof tokens);
    float *dwte = grad_buf(V * M), *dwpe = grad_buf(T * M), out[S * M];
    e_loss();
    dev_get(C, out, de_out, sizeof out);
    for (int r = 0; r < S; r++)
        for (int j = 0; j < M; j++)
            assert_true(out[r * M + j] == e_wte[tokens[r] * M + j] + e_wpe[(r % T) * M + j]);
    OK(P->embedding_backward(C, Q, dwte, dwpe, d_w_out, F32, de_tok, B, T, M, V));
    float *gte = get_new(dwte, V * M), *gpe = get_new(dwpe, T * M);
    check_grad("embedding dwte", e_wte, gte, V * M, e_loss);
    check_grad("embedding dwpe", e_wpe, gpe, T * M, e_loss);
    expect_sticky(bad_embedding, "tokens[4]=11");
    expect_sticky(bad_embedding_pos, "pos[1]=4");
    free(e_wte), free(e_wpe), free(gte), free(gpe);
    dev_free(C, de_out), dev_free(C, de_wte), dev_free(C, de_wpe), dev_free(C, de_tok), dev_free(C, dwte),
        dev_free(C, dwpe);
}

// --- layer norm ---
static float *ln_in, *ln_w, *ln_b, *dln_out, *dln_mean, *dln_rstd, *dln_in, *dln_w, *dln_b;
static double ln_loss(void) {
    float out[S * M];
    put(dln_in, ln_in, S * M * 4), put(dln_w, ln_w, M * 4), put(dln_b, ln_b, M * 4);
    OK(P->layernorm_forward(C, Q, dln_out, dln_mean, dln_rstd, dln_in, F32, dln_w, dln_b, S, M, 1e-5f));
    dev_get(C, out, dln_out, sizeof out);
    return dot_d(out, w_out, S * M);
}

static void test_layernorm(void **state) {
    ln_in = rnd_fill(S * M, 1), ln_w = rnd_fill(M, 1), ln_b = rnd_fill(M, 1);
    for (int i = 0; i < S * M; i++)
        ln_in[i] = 2.0f * ln_in[i] + 0.5f; // mean away from 0, spread 2
    dln_out = dev_new(C, S * M * 4, 0), dln_mean = dev_new(C, S * 4, 0), dln_rstd = dev_new(C, S * 4, 0);
    dln_in = dev_new(C, S * M * 4, 0), dln_w = dev_new(C, M * 4, 0), dln_b = dev_new(C, M * 4, 0);
    ln_loss();
    float out[S * M];
    dev_get(C, out, dln_out, sizeof out);
    double want[S * M];
    for (int s = 0; s < S; s++) {
        double mu = 0, var = 0;
        for (int j = 0; j < M; j++)
            mu += ln_in[s * M + j] / (double)M;
        for (int j = 0; j < M; j++)
            var += (ln_in[s * M + j] - mu) * (ln_in[s * M + j] - mu) / M;
        for (int j = 0; j < M; j++)
            want[s * M + j] = (ln_in[s * M + j] - mu) / sqrt(var + 1e-5) * ln_w[j] + ln_b[j];
    }
    assert_close("layernorm_forward", out, want, S * M, 1e-5, 1e-5);
    float *din = grad_buf(S * M), *dw = grad_buf(M), *db = grad_buf(M);
    OK(P->layernorm_backward(C, Q, din, dw, db, d_w_out, dln_in, F32, dln_w, dln_mean, dln_rstd, S, M));
    float *gin = get_new(din, S * M), *gw = get_new(dw, M), *gb = get_new(db, M);
    check_grad("layernorm din", ln_in, gin, S * M, ln_loss);
    check_grad("layernorm dweight", ln_w, gw, M, ln_loss);
    check_grad("layernorm dbias", ln_b, gb, M, ln_loss);
    free(ln_in), free(ln_w), free(ln_b), free(gin), free(gw), free(gb);
    void *bufs[] = {dln_out, dln_mean, dln_rstd, dln_in, dln_w, dln_b, din, dw, db};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        dev_free(C, bufs[i]);
}

// --- GELU ---
static float *ge_in, *dge_out, *dge_in;
static double ge_loss(void) {
    float out[S * M];
    put(dge_in, ge_in, S * M * 4);
    OK(P->gelu_forward(C, Q, dge_out, dge_in, F32, S * M));
    dev_get(C, out, dge_out, sizeof out);
    return dot_d(out, w_out, S * M);
}

static void test_gelu(void **state) {
    ge_in = rnd_fill(S * M, 4); // cover the curved part, [-4, 4)
    dge_out = dev_new(C, S * M * 4, 0), dge_in = dev_new(C, S * M * 4, 0);
    ge_loss();
    float out[S * M];
    dev_get(C, out, dge_out, sizeof out);
    double want[S * M];
    for (int i = 0; i < S * M; i++) {
        double x = ge_in[i];
        want[i] = 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    }
    assert_close("gelu_forward", out, want, S * M, 1e-6, 1e-5);
    float *din = grad_buf(S * M);
    OK(P->gelu_backward(C, Q, din, dge_in, d_w_out, F32, S * M));
    float *gin = get_new(din, S * M);
    check_grad("gelu din", ge_in, gin, S * M, ge_loss);
    free(ge_in), free(gin);
    dev_free(C, dge_out), dev_free(C, dge_in), dev_free(C, din);
}

// --- attention ---
static const dsmoe_attention_shape at_shape = {.B = B, .T = T, .M = M, .NH = NH, .dt = F32};
static float *at_qkv, *dat_out, *dat_saved, *dat_qkv;
static double at_loss(void) {
    float out[S * M];
    put(dat_qkv, at_qkv, S * 3 * M * 4);
    OK(P->attention_forward(C, Q, dat_out, dat_saved, dat_qkv, &at_shape));
    dev_get(C, out, dat_out, sizeof out);
    return dot_d(out, w_out, S * M);
}

// out (rows of T, M) of causal attention in double over qkv (B*T, 3M).
static void naive_attention(const float *qkv, int nb, int nt, double *out, double *att) {
    const int hs = M / NH;
    for (int b = 0; b < nb; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < nt; t++) {
                const float *q = qkv + (b * nt + t) * 3 * M + h * hs;
                double pre[64], mx = -1e300, sum = 0, a[64];
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k = qkv + (b * nt + t2) * 3 * M + M + h * hs;
                    pre[t2] = dot_d(q, k, hs) / sqrt(hs);
                    mx = fmax(mx, pre[t2]);
                }
                for (int t2 = 0; t2 <= t; t2++)
                    sum += exp(pre[t2] - mx);
                for (int t2 = 0; t2 < nt; t2++)
                    a[t2] = t2 <= t ? exp(pre[t2] - mx) / sum : 0.0;
                if (att)
                    memcpy(att + ((b * NH + h) * nt + t) * nt, a, nt * sizeof(double));
                for (int i = 0; i < hs; i++) {
                    double o = 0;
                    for (int t2 = 0; t2 <= t; t2++)
                        o += a[t2] * qkv[(b * nt + t2) * 3 * M + 2 * M + h * hs + i];
                    out[(b * nt + t) * M + h * hs + i] = o;
                }
            }
}

static void test_attention(void **state) {
    size_t saved_b, ws_b;
    OK(P->attention_bytes(C, &at_shape, &saved_b, &ws_b));
    assert_int_equal(saved_b, B * NH * T * T * sizeof(float)); // the cpu plugin saves the probabilities
    at_qkv = rnd_fill(S * 3 * M, 2); // sharper softmax
    dat_out = dev_new(C, S * M * 4, 0), dat_saved = dev_new(C, saved_b, 0), dat_qkv = dev_new(C, S * 3 * M * 4, 0);
    at_loss();
    float out[S * M], att[B * NH * T * T];
    dev_get(C, out, dat_out, sizeof out);
    dev_get(C, att, dat_saved, sizeof att);
    double want[S * M], want_att[B * NH * T * T];
    naive_attention(at_qkv, B, T, want, want_att);
    assert_close("attention_forward out", out, want, S * M, 1e-6, 1e-5);
    assert_close("attention_forward saved probabilities", att, want_att, B * NH * T * T, 1e-7, 1e-5); // zeros exact
    float *dqkv = grad_buf(S * 3 * M), *ws = dev_new(C, ws_b, 0); // the workspace starts as garbage
    OK(P->attention_backward(C, Q, dqkv, ws, d_w_out, dat_qkv, dat_out, dat_saved, &at_shape));
    float *g = get_new(dqkv, S * 3 * M);
    check_grad("attention dqkv", at_qkv, g, S * 3 * M, at_loss);
    dsmoe_attention_shape bad = at_shape;
    bad.NH = 3;
    assert_int_equal(P->attention_forward(C, Q, dat_out, dat_saved, dat_qkv, &bad), DSMOE_ERR_INVALID);
    free(at_qkv), free(g);
    dev_free(C, dat_out), dev_free(C, dat_saved), dev_free(C, dat_qkv), dev_free(C, dqkv), dev_free(C, ws);
}

// --- cross-entropy ---
static float *ce_logits, *dce_loss, *dce_probs, *dce_logits;
static int32_t *dce_targets;
static const float ce_dloss = 0.7f;
static int32_t ce_targets[S] = {0, 10, 4, 4, 9, 1, 2, 3, 7, 5};
static double ce_loss(void) {
    float l[S];
    put(dce_logits, ce_logits, S * V * 4);
    OK(P->crossentropy_forward(C, Q, dce_loss, dce_probs, dce_logits, F32, dce_targets, S, V));
    dev_get(C, l, dce_loss, sizeof l);
    double sum = 0;
    for (int s = 0; s < S; s++)
        sum += ce_dloss * (double)l[s];
    return sum;
}

static dsmoe_status bad_crossentropy(dsmoe_kernel_ctx *c) {
    int32_t bad[S] = {0};
    bad[3] = -1;
    void *t = dev_put(c, bad, sizeof bad), *buf = dev_zeros(c, (S + 2 * S * V) * 4);
    float *f = buf;
    dsmoe_status st = P->crossentropy_forward(c, P->default_queue(c), f, f + S, f + S + S * V, F32, t, S, V);
    dev_free(c, t), dev_free(c, buf);
    return st;
}

static void test_crossentropy(void **state) {
    ce_logits = rnd_fill(S * V, 12);
    for (int i = 0; i < S * V; i++)
        ce_logits[i] += 50.0f; // offset: max subtraction matters; probs down to 1e-10
    dce_loss = dev_new(C, S * 4, 0), dce_probs = dev_new(C, S * V * 4, 0), dce_logits = dev_new(C, S * V * 4, 0);
    dce_targets = dev_put(C, ce_targets, sizeof ce_targets);
    ce_loss();
    float probs[S * V], losses[S];
    dev_get(C, probs, dce_probs, sizeof probs);
    dev_get(C, losses, dce_loss, sizeof losses);
    double want_p[S * V], want_l[S];
    for (int s = 0; s < S; s++) {
        double sum = 0;
        for (int i = 0; i < V; i++)
            sum += exp(ce_logits[s * V + i] - 50.0);
        for (int i = 0; i < V; i++)
            want_p[s * V + i] = exp(ce_logits[s * V + i] - 50.0) / sum;
        want_l[s] = -log(want_p[s * V + ce_targets[s]]);
    }
    assert_close("crossentropy probs", probs, want_p, S * V, 1e-15, 1e-6); // also checks the plugin's exp
    assert_close("crossentropy losses", losses, want_l, S, 1e-6, 1e-5);
    float *dl = grad_buf(S * V);
    OK(P->crossentropy_backward(C, Q, dl, F32, dce_probs, dce_targets, ce_dloss, S, V));
    float *g = get_new(dl, S * V);
    check_grad("crossentropy dlogits", ce_logits, g, S * V, ce_loss);
    expect_sticky(bad_crossentropy, "targets[3]=-1");
    free(ce_logits), free(g);
    dev_free(C, dce_loss), dev_free(C, dce_probs), dev_free(C, dce_logits), dev_free(C, dce_targets), dev_free(C, dl);
}

// --- residual mix ---
static float *rm_moe, *rm_mlp, *rm_logits, *drm_out, *drm_coef, *drm_moe, *drm_mlp, *drm_logits;
static double rm_loss(void) {
    float out[S * M];
    put(drm_moe, rm_moe, S * M * 4), put(drm_mlp, rm_mlp, S * M * 4), put(drm_logits, rm_logits, S * 2 * 4);
    OK(P->residual_mix_forward(C, Q, drm_out, drm_coef, drm_moe, drm_mlp, F32, drm_logits, S, M));
    dev_get(C, out, drm_out, sizeof out);
    return dot_d(out, w_out, S * M);
}

static void test_residual_mix(void **state) {
    rm_moe = rnd_fill(S * M, 1), rm_mlp = rnd_fill(S * M, 1), rm_logits = rnd_fill(S * 2, 1);
    drm_out = dev_new(C, S * M * 4, 0), drm_coef = dev_new(C, S * 2 * 4, 0), drm_moe = dev_new(C, S * M * 4, 0);
    drm_mlp = dev_new(C, S * M * 4, 0), drm_logits = dev_new(C, S * 2 * 4, 0);
    rm_loss();
    float out[S * M], coef[S * 2];
    dev_get(C, out, drm_out, sizeof out);
    dev_get(C, coef, drm_coef, sizeof coef);
    double want[S * M], want_c[S * 2];
    for (int s = 0; s < S; s++) {
        double c0 = 1 / (1 + exp((double)rm_logits[2 * s + 1] - rm_logits[2 * s]));
        want_c[2 * s] = c0;
        want_c[2 * s + 1] = 1 - c0;
        for (int j = 0; j < M; j++)
            want[s * M + j] = rm_moe[s * M + j] * c0 + rm_mlp[s * M + j] * (1 - c0);
    }
    assert_close("residual_mix coef", coef, want_c, S * 2, 1e-7, 1e-6);
    assert_close("residual_mix out", out, want, S * M, 1e-6, 1e-5);
    float *dmoe = grad_buf(S * M), *dmlp = grad_buf(S * M), *dlog = grad_buf(S * 2);
    OK(P->residual_mix_backward(C, Q, dmoe, dmlp, dlog, d_w_out, drm_moe, drm_mlp, F32, drm_coef, S, M));
    float *g1 = get_new(dmoe, S * M), *g2 = get_new(dmlp, S * M), *g3 = get_new(dlog, S * 2);
    check_grad("residual_mix dmoe", rm_moe, g1, S * M, rm_loss);
    check_grad("residual_mix dmlp", rm_mlp, g2, S * M, rm_loss);
    check_grad("residual_mix dcoef_logits", rm_logits, g3, S * 2, rm_loss);
    free(rm_moe), free(rm_mlp), free(rm_logits), free(g1), free(g2), free(g3);
    void *bufs[] = {drm_out, drm_coef, drm_moe, drm_mlp, drm_logits, dmoe, dmlp, dlog};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        dev_free(C, bufs[i]);
}

// ---------------------------------------------------------------------------------------------------
// Inference: KV cache and cached attention against attention_forward on the whole sequence

enum { IB = 2, IT = 7, ITM = 9, ID = M / NH }; // sequences, their length, the cache's T_max, head size

// Appends tokens [t0, t0 + n) of sequence b (rows of full, (IB*IT, 3M)) at position t0 with B = 1 on the
// sequence's cache slice, then checks attention_cached for those tokens against want (IB*IT, M).
static void append_alone(float *kc, float *vc, const float *full, int b, int t0, int n, const double *want) {
    int32_t *pos = dev_put(C, &t0, sizeof t0);
    float *blk = dev_put(C, full + ((size_t)b * IT + t0) * 3 * M, (size_t)n * 3 * M * 4);
    float *out = dev_new(C, (size_t)n * M * 4, 0), got[IT * M];
    size_t slice = (size_t)b * NH * ITM * ID;
    OK(P->kv_append(C, Q, kc + slice, vc + slice, blk, F32, pos, 1, n, M, NH, ITM));
    OK(P->attention_cached(C, Q, out, blk, kc + slice, vc + slice, F32, pos, 1, n, M, NH, ITM));
    dev_get(C, got, out, (size_t)n * M * 4);
    char what[80];
    snprintf(what, sizeof what, "attention_cached sequence %d tokens %d..%d", b, t0, t0 + n - 1);
    assert_close(what, got, want + ((size_t)b * IT + t0) * M, (size_t)n * M, 1e-6, 1e-5);
    dev_free(C, pos), dev_free(C, blk), dev_free(C, out);
}

static dsmoe_status bad_position(dsmoe_kernel_ctx *c) {
    int32_t pos[2] = {3, 8}; // 8 + 2 > T_max = 9
    void *dpos = dev_put(c, pos, sizeof pos), *buf = dev_zeros(c, 2 * IB * NH * ITM * ID * 4 + IB * 2 * 3 * M * 4);
    float *kc = buf, *vc = kc + IB * NH * ITM * ID, *qkv = vc + IB * NH * ITM * ID;
    dsmoe_status st = P->kv_append(c, P->default_queue(c), kc, vc, qkv, F32, dpos, IB, 2, M, NH, ITM);
    dev_free(c, dpos), dev_free(c, buf);
    return st;
}

static void test_kv_cache_attention(void **state) {
    float *full = rnd_fill(IB * IT * 3 * M, 2); // (IB*IT, 3M)
    double want[IB * IT * M];
    naive_attention(full, IB, IT, want, NULL);
    // attention_forward on the whole sequences is the reference the cached path must give.
    dsmoe_attention_shape sh = {.B = IB, .T = IT, .M = M, .NH = NH, .dt = F32};
    float *dfull = dev_put(C, full, IB * IT * 3 * M * 4), *fwd = dev_new(C, IB * IT * M * 4, 0);
    float *saved = dev_new(C, IB * NH * IT * IT * 4, 0), fwd_h[IB * IT * M];
    OK(P->attention_forward(C, Q, fwd, saved, dfull, &sh));
    dev_get(C, fwd_h, fwd, sizeof fwd_h);
    assert_close("attention_forward (reference of the cache)", fwd_h, want, IB * IT * M, 1e-6, 1e-5);
    double fwd_d[IB * IT * M];
    for (int i = 0; i < IB * IT * M; i++)
        fwd_d[i] = fwd_h[i];

    // Caches not zeroed (poisoned NaN): reading a position nobody appended would show.
    size_t cache = (size_t)IB * NH * ITM * ID;
    float *kc = dev_new(C, cache * 4, 0), *vc = dev_new(C, cache * 4, 0);
    append_alone(kc, vc, full, 0, 0, 4, fwd_d); // sequence 0: a prefill of 4
    append_alone(kc, vc, full, 1, 0, 2, fwd_d); // sequence 1: a prefill of 2
    // Then decode steps of both together, each at its own position: (4, 2), (5, 3), (6, 4).
    for (int step = 0; step < 3; step++) {
        int32_t pos[IB] = {4 + step, 2 + step};
        float rows[IB * 3 * M], got[IB * M];
        for (int b = 0; b < IB; b++)
            memcpy(rows + b * 3 * M, full + ((size_t)b * IT + pos[b]) * 3 * M, 3 * M * 4);
        int32_t *dpos = dev_put(C, pos, sizeof pos);
        float *blk = dev_put(C, rows, sizeof rows), *out = dev_new(C, sizeof got, 0);
        OK(P->kv_append(C, Q, kc, vc, blk, F32, dpos, IB, 1, M, NH, ITM));
        OK(P->attention_cached(C, Q, out, blk, kc, vc, F32, dpos, IB, 1, M, NH, ITM));
        dev_get(C, got, out, sizeof got);
        for (int b = 0; b < IB; b++) {
            char what[64];
            snprintf(what, sizeof what, "decode step %d sequence %d (position %d)", step, b, pos[b]);
            assert_close(what, got + b * M, fwd_d + ((size_t)b * IT + pos[b]) * M, M, 1e-6, 1e-5);
        }
        dev_free(C, dpos), dev_free(C, blk), dev_free(C, out);
    }
    // The cache itself: (B, NH, T_max, D), exact copies of the appended keys and values.
    float *kh = get_new(kc, cache), *vh = get_new(vc, cache);
    int len[IB] = {7, 5};
    for (int b = 0; b < IB; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < len[b]; t++)
                for (int d = 0; d < ID; d++) {
                    size_t at = (((size_t)b * NH + h) * ITM + t) * ID + d, row = ((size_t)b * IT + t) * 3 * M;
                    assert_true(kh[at] == full[row + M + h * ID + d]);
                    assert_true(vh[at] == full[row + 2 * M + h * ID + d]);
                }
    expect_sticky(bad_position, "pos[1]=8");
    free(full), free(kh), free(vh);
    dev_free(C, dfull), dev_free(C, fwd), dev_free(C, saved), dev_free(C, kc), dev_free(C, vc);
}

// ---------------------------------------------------------------------------------------------------
// Sampling

// The header's rules written out naively: order by probability (= logit, NaN as -Inf) descending,
// lower id first on ties; keep the top_k; keep the shortest prefix reaching top_p of their mass; the
// token whose cumulative mass first exceeds u * (kept mass). O(V^2) selection, no sort.
static float logit_or_minus_inf(float z) { return isnan(z) ? -INFINITY : z; }

static int32_t naive_sample(const float *z, int nv, const dsmoe_sampling_params *p, uint64_t counter) {
    int *order = malloc(nv * sizeof *order), *used = calloc(nv, sizeof *used);
    double *w = malloc(nv * sizeof *w);
    for (int i = 0; i < nv; i++) {
        int best = -1;
        for (int j = 0; j < nv; j++)
            if (!used[j] && (best < 0 || logit_or_minus_inf(z[j]) > logit_or_minus_inf(z[best])))
                best = j;
        used[best] = 1, order[i] = best;
    }
    int k = p->top_k > 0 && p->top_k < nv ? p->top_k : nv;
    double total = 0, zmax = logit_or_minus_inf(z[order[0]]);
    for (int i = 0; i < k; i++)
        total += w[i] = exp(((double)logit_or_minus_inf(z[order[i]]) - zmax) / p->temperature);
    if (p->top_p < 1.0f) {
        double cum = 0;
        int n = 0;
        while (n < k && cum < (double)p->top_p * total)
            cum += w[n++];
        k = n, total = cum;
    }
    double target = dsmoe_rng_uniform(p->seed, counter) * total, cum = 0;
    int32_t token = order[k - 1];
    for (int i = 0; i < k; i++)
        if (target < (cum += w[i])) {
            token = order[i];
            break;
        }
    free(order), free(used), free(w);
    return token;
}

static void sample_rows(const float *dlogits, int rows, int nv, const dsmoe_sampling_params *p,
                        const uint64_t *counters, int32_t *out) {
    int32_t *dt = dev_new(C, (size_t)rows * 4, 0);
    OK(P->sample(C, Q, dt, dlogits, F32, rows, nv, p, counters));
    dev_get(C, out, dt, (size_t)rows * 4);
    dev_free(C, dt);
}

static void test_sample(void **state) {
    enum { R = 200, SV = 50 };
    float *z = rnd_fill(R * SV, 3);
    z[0 * SV + 7] = z[0 * SV + 3] = 10.0f; // row 0: a tie at the top, greedy takes the lower id
    float *dz = dev_put(C, z, R * SV * 4);
    uint64_t counters[R], rev[R];
    for (int r = 0; r < R; r++)
        counters[r] = 1000 + 3 * (uint64_t)r;
    for (int r = 0; r < R; r++)
        rev[r] = counters[R - 1 - r];
    int32_t got[R], again[R], greedy[R];
    dsmoe_sampling_params greedy_p = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 9};
    sample_rows(dz, R, SV, &greedy_p, NULL, greedy);
    for (int r = 0; r < R; r++) {
        int best = 0;
        for (int i = 1; i < SV; i++)
            best = z[r * SV + i] > z[r * SV + best] ? i : best;
        assert_int_equal(greedy[r], best);
    }
    assert_int_equal(greedy[0], 3);
    // top_k = 1 is greedy whatever the temperature and the draw.
    dsmoe_sampling_params k1 = {.temperature = 1.5f, .top_k = 1, .top_p = 1.0f, .seed = 9};
    sample_rows(dz, R, SV, &k1, counters, got);
    assert_memory_equal(got, greedy, sizeof got);
    // Against the naive sampler, for several settings; the same seed and counters give the same tokens,
    // and a row's token depends on its counter, not on its place in the batch.
    dsmoe_sampling_params ps[4] = {{1.0f, 0, 1.0f, 9}, {0.7f, 5, 1.0f, 10}, {1.3f, 0, 0.8f, 11}, {0.9f, 8, 0.5f, 12}};
    for (int c = 0; c < 4; c++) {
        sample_rows(dz, R, SV, &ps[c], counters, got);
        int differs_from_greedy = 0;
        for (int r = 0; r < R; r++) {
            int32_t want = naive_sample(z + r * SV, SV, &ps[c], counters[r]);
            if (got[r] != want)
                fail_msg("setting %d row %d: token %d, expected %d", c, r, got[r], want);
            differs_from_greedy += got[r] != greedy[r];
        }
        assert_true(differs_from_greedy > 0);
        sample_rows(dz, R, SV, &ps[c], counters, again);
        assert_memory_equal(got, again, sizeof got);
        float *zr = malloc(R * SV * 4);
        for (int r = 0; r < R; r++)
            memcpy(zr + r * SV, z + (R - 1 - r) * SV, SV * 4);
        float *dzr = dev_put(C, zr, R * SV * 4);
        sample_rows(dzr, R, SV, &ps[c], rev, again);
        for (int r = 0; r < R; r++)
            assert_int_equal(again[r], got[R - 1 - r]);
        free(zr);
        dev_free(C, dzr);
    }
    // Frequencies: probabilities (0.1, 0.2, 0.3, 0.4) over 4000 draws; with top_p = 0.5 only the two
    // largest (0.4, 0.3 renormalised).
    enum { N = 4000 };
    float *z4 = malloc(N * 4 * sizeof(float));
    uint64_t *cn = malloc(N * sizeof *cn);
    int32_t *tok = malloc(N * sizeof *tok);
    for (int r = 0; r < N; r++) {
        for (int i = 0; i < 4; i++)
            z4[r * 4 + i] = logf(0.1f * (float)(i + 1));
        cn[r] = (uint64_t)r;
    }
    float *dz4 = dev_put(C, z4, N * 4 * sizeof(float));
    double want[2][4] = {{0.1, 0.2, 0.3, 0.4}, {0, 0, 3.0 / 7, 4.0 / 7}};
    for (int c = 0; c < 2; c++) {
        dsmoe_sampling_params p = {.temperature = 1.0f, .top_k = 0, .top_p = c ? 0.5f : 1.0f, .seed = 21};
        sample_rows(dz4, N, 4, &p, cn, tok);
        int count[4] = {0};
        for (int r = 0; r < N; r++)
            count[tok[r]]++;
        for (int i = 0; i < 4; i++)
            if (fabs(count[i] / (double)N - want[c][i]) > 0.03)
                fail_msg("top_p %g: token %d drawn %d times of %d, expected probability %g", c ? 0.5 : 1.0, i,
                         count[i], N, want[c][i]);
    }
    // A vocabulary-sized row with what the sort must order right: many equal logits (multiples of
    // 1/16), both signs and many exponents (every byte of the sort key varies), -0 beside +0, subnormals,
    // -Inf, NaN (as -Inf) and a huge negative; each setting against the naive sampler.
    enum { BR = 6, BV = 1500 };
    float *zb = malloc(BR * BV * sizeof *zb);
    cpt_rng_state = 5;
    for (int i = 0; i < BR * BV; i++)
        zb[i] = roundf(rnd() * 128.0f) / 16.0f; // in [-8, 8]
    const float special[] = {-0.0f, 0.0f, 1e-40f, -1e-40f, -INFINITY, NAN, -1e30f, 0.0f, -0.0f};
    for (int r = 0; r < BR; r++)
        for (int i = 0; i < (int)(sizeof special / sizeof *special); i++)
            zb[r * BV + 37 * i + r] = special[i];
    float *dzb = dev_put(C, zb, BR * BV * sizeof *zb);
    // top_k 700 is ordered by the whole-row sort, 60 and 1 by the heap of the k best (k <= V / 16).
    dsmoe_sampling_params pb[6] = {{1.0f, 0, 1.0f, 31}, {0.5f, 700, 1.0f, 32}, {2.0f, 0, 0.9f, 33},
                                   {8.0f, 0, 1.0f, 34}, {3.0f, 60, 0.95f, 36}, {1.0f, 1, 1.0f, 37}};
    for (int c = 0; c < 6; c++) {
        int32_t tb[BR];
        sample_rows(dzb, BR, BV, &pb[c], counters, tb);
        for (int r = 0; r < BR; r++) {
            int32_t want = naive_sample(zb + r * BV, BV, &pb[c], counters[r]);
            if (tb[r] != want)
                fail_msg("vocabulary row %d, setting %d: token %d, expected %d", r, c, tb[r], want);
        }
    }
    free(zb);
    dev_free(C, dzb);
    // -0 and +0 are one logit: with top_k = 1 the lower id of the two is drawn, whichever sign it has.
    const float zeros[2][4] = {{-1.0f, -0.0f, 0.0f, -2.0f}, {-1.0f, 0.0f, -0.0f, -2.0f}};
    dsmoe_sampling_params top1 = {1.0f, 1, 1.0f, 35};
    for (int c = 0; c < 2; c++) {
        float *dzz = dev_put(C, zeros[c], sizeof zeros[c]);
        int32_t tz;
        sample_rows(dzz, 1, 4, &top1, counters, &tz);
        assert_int_equal(tz, 1);
        dev_free(C, dzz);
    }

    dsmoe_sampling_params bad = {.temperature = 1.0f, .top_k = 0, .top_p = 0.0f};
    assert_int_equal(P->sample(C, Q, (int32_t *)dz4, dz4, F32, 1, 4, &bad, cn), DSMOE_ERR_INVALID);
    bad = (dsmoe_sampling_params){.temperature = -1.0f, .top_p = 1.0f};
    assert_int_equal(P->sample(C, Q, (int32_t *)dz4, dz4, F32, 1, 4, &bad, cn), DSMOE_ERR_INVALID);
    free(z), free(z4), free(cn), free(tok);
    dev_free(C, dz), dev_free(C, dz4);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_embedding_positions_bf16),
        cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_gelu),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_crossentropy),
        cmocka_unit_test(test_residual_mix),
        cmocka_unit_test(test_kv_cache_attention),
        cmocka_unit_test(test_sample),
    };
    if (cpt_load(2) != 0) {
        fprintf(stderr, "test_cpu_ops_layers: cannot load or initialise the cpu plugin %s\n", CPT_PLUGIN_FILE);
        return 1;
    }
    w_out = rnd_fill(S * 3 * M, 1);
    d_w_out = dev_put(C, w_out, S * 3 * M * 4);
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    dev_free(C, d_w_out);
    free(w_out);
    cpt_unload();
    return rc;
}
