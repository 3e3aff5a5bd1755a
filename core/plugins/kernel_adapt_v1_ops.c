// core/plugins/kernel_adapt_v1_ops.c: the compute members of the kernel v1 adapter (core/plugins/kernel_adapt_v1.c
// explains the adapter): float32 only; grouped GEMMs and their epilogues fused out of v1 calls in the
// v1 core's order; what v2 keeps on the device goes through small host arrays and the v1 copies.
// defines: kav1_fill_ops
#include "kernel_adapt_v1.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/rng.h" // dsmoe_rng_normal, for init_tensor

// ------------------------------------------------------------------------------------------------
// GEMM

static dsmoe_status k_gemm(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, int trans_a, int trans_b, int m, int n, int k,
                           float alpha, const void *a, dsmoe_dtype a_type, int lda, const void *b, dsmoe_dtype b_type,
                           int ldb, float beta, void *c, dsmoe_dtype c_type, int ldc) {
    ENTER(ctx);
    NEED_F32("gemm", a_type);
    NEED_F32("gemm", b_type);
    NEED_F32("gemm", c_type);
    return V1(x, gemm, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// x->hi32 (n) = the device int32 at dev; *bad = the index of the first outside [lo, hi], or -1. The
// device data v2 checks while running (counts, token ids, positions) is checked so, on the host; the
// caller makes a bad value sticky, as v2 wants.
static dsmoe_status fetch_i32(actx *x, const int32_t *dev, size_t n, long lo, long hi, const char *what, long *bad) {
    *bad = -1;
    TRY(kav1_grow(x, (void **)&x->hi32, &x->cap_i32, n, sizeof(int32_t), what));
    TRY(V1(x, copy_to_host, x->hi32, dev, n * sizeof(int32_t)));
    for (size_t i = 0; i < n && *bad < 0; i++)
        if (x->hi32[i] < lo || x->hi32[i] > hi) *bad = (long)i;
    return DSMOE_OK;
}

// x->m (groups) = the device counts, each checked against [0, m_max] (a bad one is sticky).
static dsmoe_status fetch_counts(actx *x, const char *op, const int32_t *counts, int groups, int m_max) {
    long g;
    TRY(kav1_grow_groups(x, groups));
    TRY(fetch_i32(x, counts, (size_t)groups, 0, m_max, "counts", &g));
    if (g >= 0) {
        x->sticky = DSMOE_ERR_INVALID;
        return kav1_fail(x, DSMOE_ERR_INVALID, "%s: counts[%ld] = %d: expected 0 <= count <= m_max = %d", op, g,
                         (int)x->hi32[g], m_max);
    }
    for (int i = 0; i < groups; i++) x->m[i] = x->hi32[i];
    return DSMOE_OK;
}

static dsmoe_status ensure_scratch(actx *x, size_t bytes) {
    if (x->scratch && x->scratch_bytes >= bytes) return DSMOE_OK;
    x->v1->free(x->in, x->scratch);
    x->scratch = NULL;
    x->scratch_bytes = 0;
    TRY(V1(x, alloc, bytes, &x->scratch));
    x->scratch_bytes = bytes;
    return DSMOE_OK;
}

// The epilogue on group gi's `rows` rows: one v1 call per op when the rows are contiguous (ldc == n),
// else one per row. The v1 core's order: BIAS_GELU is c += b; aux = c; c = gelu(aux). DGELU is
// scratch = 0; scratch += gelu'(aux) * c; c = scratch (v1 gelu_backward accumulates, and c is its input).
static dsmoe_status epilogue(actx *x, const dsmoe_grouped_gemm *g, int gi, int rows) {
    int n = g->n, w = gi % g->b_groups, whole = g->ldc == n;
    int blocks = whole ? 1 : rows, brows = whole ? rows : 1;
    size_t belems = (size_t)brows * n, bbytes = belems * sizeof(float);
    float *c = (float *)g->c + (size_t)gi * g->c_stride;
    float *aux = g->aux ? (float *)g->aux + (size_t)gi * g->c_stride : NULL;
    const float *bias = g->bias ? g->bias + (size_t)w * g->bias_stride : NULL;
    if (g->epilogue == DSMOE_EPI_DGELU) TRY(ensure_scratch(x, bbytes));
    for (int r = 0; r < blocks; r++) {
        float *cb = c + (size_t)r * g->ldc, *ab = aux ? aux + (size_t)r * g->ldc : NULL;
        switch (g->epilogue) {
        case DSMOE_EPI_NONE: break;
        case DSMOE_EPI_BIAS: TRY(V1(x, bias_add, cb, bias, brows, n)); break;
        case DSMOE_EPI_BIAS_GELU:
            TRY(V1(x, bias_add, cb, bias, brows, n));
            TRY(V1(x, copy, ab, cb, bbytes));
            TRY(V1(x, gelu_forward, cb, ab, belems));
            break;
        case DSMOE_EPI_DGELU:
            TRY(V1(x, zero, x->scratch, bbytes));
            TRY(V1(x, gelu_backward, x->scratch, ab, cb, belems));
            TRY(V1(x, copy, cb, x->scratch, bbytes));
            break;
        }
    }
    return DSMOE_OK;
}

static dsmoe_status k_gemm_grouped(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_gemm *g) {
    ENTER(ctx);
    if (!g) return kav1_fail(x, DSMOE_ERR_INVALID, "gemm_grouped: NULL descriptor");
    NEED_F32("gemm_grouped", g->a_type);
    NEED_F32("gemm_grouped", g->b_type);
    NEED_F32("gemm_grouped", g->c_type);
    if (g->groups < 0 || g->m_max < 0 || (g->groups > 0 && g->b_groups < 1))
        return kav1_fail(x, DSMOE_ERR_INVALID, "gemm_grouped: groups=%d m_max=%d b_groups=%d: expected groups, m_max >= 0 "
                    "and b_groups >= 1", g->groups, g->m_max, g->b_groups);
    if (g->epilogue < DSMOE_EPI_NONE || g->epilogue > DSMOE_EPI_DGELU)
        return kav1_fail(x, DSMOE_ERR_INVALID, "gemm_grouped: epilogue %d: expected a dsmoe_epilogue", (int)g->epilogue);
    int needs_bias = g->epilogue == DSMOE_EPI_BIAS || g->epilogue == DSMOE_EPI_BIAS_GELU;
    int needs_aux = g->epilogue == DSMOE_EPI_BIAS_GELU || g->epilogue == DSMOE_EPI_DGELU;
    if ((needs_bias && !g->bias) || (needs_aux && !g->aux))
        return kav1_fail(x, DSMOE_ERR_INVALID, "gemm_grouped: epilogue %d without its %s", (int)g->epilogue,
                    needs_bias && !g->bias ? "bias" : "aux buffer");
    if (g->groups == 0) return DSMOE_OK;
    TRY(fetch_counts(x, "gemm_grouped", g->counts, g->groups, g->m_max));
    for (int gi = 0; gi < g->groups; gi++) {
        x->a[gi] = (const float *)g->a + (size_t)gi * g->a_stride;
        x->b[gi] = (const float *)g->b + (size_t)(gi % g->b_groups) * g->b_stride;
        x->c[gi] = (float *)g->c + (size_t)gi * g->c_stride;
    }
    TRY(V1(x, gemm_grouped, g->groups, 0, g->trans_b, x->m, g->n, g->k, g->alpha, x->a, g->lda, x->b, g->ldb, g->beta,
           x->c, g->ldc));
    if (g->epilogue == DSMOE_EPI_NONE) return DSMOE_OK;
    for (int gi = 0; gi < g->groups; gi++)
        if (x->m[gi] > 0) TRY(epilogue(x, g, gi, x->m[gi]));
    return DSMOE_OK;
}

// One v1 call per group in ascending g (groups sharing a weight add in that order), then the bias.
static dsmoe_status k_gemm_grouped_wgrad(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_wgrad *g) {
    ENTER(ctx);
    if (!g) return kav1_fail(x, DSMOE_ERR_INVALID, "gemm_grouped_wgrad: NULL descriptor");
    NEED_F32("gemm_grouped_wgrad", g->dy_type);
    NEED_F32("gemm_grouped_wgrad", g->x_type);
    if (g->groups < 0 || g->m_max < 0 || (g->groups > 0 && g->b_groups < 1))
        return kav1_fail(x, DSMOE_ERR_INVALID, "gemm_grouped_wgrad: groups=%d m_max=%d b_groups=%d: expected groups, "
                    "m_max >= 0 and b_groups >= 1", g->groups, g->m_max, g->b_groups);
    if (g->groups == 0) return DSMOE_OK;
    TRY(fetch_counts(x, "gemm_grouped_wgrad", g->counts, g->groups, g->m_max));
    for (int gi = 0; gi < g->groups; gi++) {
        int rows = x->m[gi], w = gi % g->b_groups;
        if (rows == 0) continue;
        const float *dy = (const float *)g->dy + (size_t)gi * g->dy_stride;
        const float *xs = (const float *)g->x + (size_t)gi * g->x_stride;
        float *dw = g->dw + (size_t)w * g->dw_stride;
        TRY(V1(x, gemm_grouped_wgrad, 1, &rows, g->n, g->k, g->alpha, &dy, &xs, &dw));
        if (g->dbias) TRY(V1(x, bias_backward, g->dbias + (size_t)w * g->dbias_stride, dy, rows, g->n));
    }
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// element-wise and small ops

static dsmoe_status k_bias_add(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt,
                               const float *bias, int rows, int n) {
    ENTER_F32(ctx, "bias_add", dt);
    return V1(x, bias_add, out, bias, rows, n);
}

static dsmoe_status k_bias_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dbias, const void *dout,
                                    dsmoe_dtype dt, int rows, int n) {
    ENTER_F32(ctx, "bias_backward", dt);
    return V1(x, bias_backward, dbias, dout, rows, n);
}

static dsmoe_status k_axpy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *y, float alpha, const void *xs,
                           dsmoe_dtype dt, size_t n) {
    ENTER_F32(ctx, "axpy", dt);
    return V1(x, axpy, y, alpha, xs, n);
}

static dsmoe_status k_mul_uniform_noise(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in,
                                        dsmoe_dtype dt, size_t n, float eps, uint64_t seed, uint64_t offset) {
    ENTER_F32(ctx, "mul_uniform_noise", dt);
    return V1(x, mul_uniform_noise, out, in, n, eps, seed, offset);
}

static dsmoe_status k_sum_squares(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const float *xs, size_t n,
                                  double *out) {
    ENTER(ctx);
    double h = 0.0;
    TRY(V1(x, sum_squares, xs, n, &h));
    return V1(x, copy_to_device, out, &h, sizeof h);
}

static dsmoe_status k_all_finite(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const void *xs, dsmoe_dtype dt,
                                 size_t n, int32_t *out) {
    ENTER_F32(ctx, "all_finite", dt);
    int h = 0;
    TRY(V1(x, all_finite, xs, n, &h));
    int32_t v = h;
    return V1(x, copy_to_device, out, &v, sizeof v);
}

// On the host in pieces, then copied: the values are dsmoe/rng.h's host code, as v2 asks.
#define INIT_PIECE 65536
static dsmoe_status k_init_tensor(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dst, size_t n,
                                  const dsmoe_init_params *p) {
    ENTER(ctx);
    if (!p) return kav1_fail(x, DSMOE_ERR_INVALID, "init_tensor: NULL params");
    if (n == 0) return DSMOE_OK;
    TRY(kav1_grow(x, (void **)&x->hf32, &x->cap_f32, n < INIT_PIECE ? n : INIT_PIECE, sizeof(float), "init values"));
    for (size_t i0 = 0; i0 < n; i0 += INIT_PIECE) {
        size_t len = n - i0 < INIT_PIECE ? n - i0 : INIT_PIECE;
        for (size_t i = 0; i < len; i++)
            x->hf32[i] = p->std > 0.0f ? p->std * dsmoe_rng_normal(p->key, p->offset + i0 + i) : p->value;
        TRY(V1(x, copy_to_device, dst + i0, x->hf32, len * sizeof(float)));
    }
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// the GPT layer ops: straight through (v1 cannot check a token against V on the device; it checks >= 0)

// ------------------------------------------------------------------------------------------------
// members that read device data (token ids, targets, routing tables)
//
// v2 makes bad data a sticky error; a v1 member reports it at the call (DSMOE_ERR_INVALID) and the
// context goes on. So here the arguments v2 refuses at the call are checked first (not sticky), and an
// INVALID the v1 member returns after that is bad data: sticky. v1's embedding_forward is not told V, so
// its token ids are checked here, on a host copy (fetch_i32: B * T int32, small beside the embedding).

#define ARGS(op, ok)                                                                               \
    if (!(ok)) return kav1_fail(x, DSMOE_ERR_INVALID, "%s: invalid arguments (%s)", (op), #ok)

static dsmoe_status data_status(actx *x, dsmoe_status s) {
    if (s == DSMOE_ERR_INVALID) x->sticky = s;
    return s;
}
#define V1_DATA(x, member, ...) data_status((x), V1(x, member, __VA_ARGS__))

// v1 embeds every sequence from position 0: with pos, one v1 call per sequence, its wpe rows offset by
// pos[b] (fetched from the device).
static dsmoe_status k_embedding_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt,
                                        const int32_t *tokens, const void *wte, dsmoe_dtype wte_dt, const float *wpe,
                                        const int32_t *pos, int B, int T, int M, int V, int n_pos) {
    ENTER_F32(ctx, "embedding_forward", dt);
    NEED_F32("embedding_forward", wte_dt);
    ARGS("embedding_forward", B >= 0 && T >= 0 && M > 0 && V > 0 &&
         (B == 0 || T == 0 || (out && tokens && wte && wpe)));
    long bad = -1;
    if (B > 0 && T > 0) TRY(fetch_i32(x, tokens, (size_t)B * T, 0, (long)V - 1, "token ids", &bad));
    if (bad >= 0) {
        x->sticky = DSMOE_ERR_INVALID;
        return kav1_fail(x, DSMOE_ERR_INVALID, "embedding_forward: tokens[%ld]=%d: expected in [0, V=%d)", bad,
                         (int)x->hi32[bad], V);
    }
    if (!pos || B <= 0 || T <= 0) {
        if (T > n_pos) return kav1_fail(x, DSMOE_ERR_INVALID, "embedding_forward: T=%d > n_pos=%d", T, n_pos);
        return V1(x, embedding_forward, out, tokens, wte, wpe, B, T, M);
    }
    TRY(fetch_i32(x, pos, (size_t)B, 0, (long)n_pos - T, "positions", &bad));
    if (bad >= 0) {
        x->sticky = DSMOE_ERR_INVALID;
        return kav1_fail(x, DSMOE_ERR_INVALID, "embedding_forward: pos[%ld]=%d with T=%d: expected positions in "
                         "[0, n_pos=%d)", bad, (int)x->hi32[bad], T, n_pos);
    }
    for (int b = 0; b < B; b++)
        TRY(V1(x, embedding_forward, (float *)out + (size_t)b * T * M, tokens + (size_t)b * T, wte,
               wpe + (size_t)x->hi32[b] * M, 1, T, M));
    return DSMOE_OK;
}

static dsmoe_status k_embedding_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dwte, float *dwpe,
                                         const void *dout, dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M,
                                         int V) {
    ENTER_F32(ctx, "embedding_backward", dt);
    ARGS("embedding_backward", B >= 0 && T >= 0 && M > 0 && V > 0 &&
         (B == 0 || T == 0 || (dwte && dwpe && dout && tokens)));
    return V1_DATA(x, embedding_backward, dwte, dwpe, dout, tokens, B, T, M, V);
}

static dsmoe_status k_layernorm_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *mean,
                                        float *rstd, const void *in, dsmoe_dtype dt, const float *weight,
                                        const float *bias, int S, int M, float eps) {
    ENTER_F32(ctx, "layernorm_forward", dt);
    return V1(x, layernorm_forward, out, mean, rstd, in, weight, bias, S, M, eps);
}

static dsmoe_status k_layernorm_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, float *dweight,
                                         float *dbias, const void *dout, const void *in, dsmoe_dtype dt,
                                         const float *weight, const float *mean, const float *rstd, int S, int M) {
    ENTER_F32(ctx, "layernorm_backward", dt);
    return V1(x, layernorm_backward, din, dweight, dbias, dout, in, weight, mean, rstd, S, M);
}

static dsmoe_status k_gelu_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in,
                                   dsmoe_dtype dt, size_t n) {
    ENTER_F32(ctx, "gelu_forward", dt);
    return V1(x, gelu_forward, out, in, n);
}

static dsmoe_status k_gelu_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, const void *in,
                                    const void *dout, dsmoe_dtype dt, size_t n) {
    ENTER_F32(ctx, "gelu_backward", dt);
    return V1(x, gelu_backward, din, in, dout, n);
}

// saved = v1's att (B, NH, T, T) probabilities; workspace = v1's scratch of the same size.
static dsmoe_status k_attention_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, void *saved,
                                        const void *qkv, const dsmoe_attention_shape *s) {
    ENTER(ctx);
    if (!s) return kav1_fail(x, DSMOE_ERR_INVALID, "attention_forward: NULL shape");
    NEED_F32("attention_forward", s->dt);
    return V1(x, attention_forward, out, saved, qkv, s->B, s->T, s->M, s->NH);
}

static dsmoe_status k_attention_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dqkv, void *workspace,
                                         const void *dout, const void *qkv, const void *out, const void *saved,
                                         const dsmoe_attention_shape *s) {
    ENTER(ctx);
    if (!s) return kav1_fail(x, DSMOE_ERR_INVALID, "attention_backward: NULL shape");
    NEED_F32("attention_backward", s->dt);
    return V1(x, attention_backward, dqkv, workspace, dout, qkv, saved, s->B, s->T, s->M, s->NH);
}

static dsmoe_status k_crossentropy_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *losses, float *probs,
                                           const void *logits, dsmoe_dtype dt, const int32_t *targets, int S, int V) {
    ENTER_F32(ctx, "crossentropy_forward", dt);
    ARGS("crossentropy_forward", S >= 0 && V > 0 && (S == 0 || (losses && probs && logits && targets)));
    return V1_DATA(x, crossentropy_forward, losses, probs, logits, targets, S, V);
}

static dsmoe_status k_crossentropy_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dlogits,
                                            dsmoe_dtype dt, const float *probs, const int32_t *targets, float dloss,
                                            int S, int V) {
    ENTER_F32(ctx, "crossentropy_backward", dt);
    ARGS("crossentropy_backward", S >= 0 && V > 0 && (S == 0 || (dlogits && probs && targets)));
    return V1_DATA(x, crossentropy_backward, dlogits, probs, targets, dloss, S, V);
}

// ------------------------------------------------------------------------------------------------
// gating: v1 returns counts and sums to the host; v2 keeps them on the device

static dsmoe_status k_gate_route(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                                 const float *logits, float *probs, int32_t *choice, int32_t *counts) {
    ENTER(ctx);
    if (!p) return kav1_fail(x, DSMOE_ERR_INVALID, "gate_route: NULL gating params");
    size_t E = p->E > 0 ? (size_t)p->E : 0;
    TRY(kav1_grow(x, (void **)&x->hi32, &x->cap_i32, E, sizeof(int32_t), "counts"));
    TRY(V1(x, gate_route, p, logits, probs, choice, x->hi32));
    return V1(x, copy_to_device, counts, x->hi32, E * sizeof(int32_t));
}

// aux_sums (2E + 1) = [P (v1's prob sums), N (v1's first-choice counts, as double), S], as the v1 core
// assembled them before reducing.
static dsmoe_status k_gate_assign(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p, int C,
                                  const float *probs, const int32_t *choice, int32_t *slot, float *weight,
                                  int32_t *kept, double *aux_sums) {
    ENTER(ctx);
    if (!p) return kav1_fail(x, DSMOE_ERR_INVALID, "gate_assign: NULL gating params");
    size_t E = p->E > 0 ? (size_t)p->E : 0;
    TRY(kav1_grow(x, (void **)&x->hi32, &x->cap_i32, 2 * E, sizeof(int32_t), "kept counts"));
    TRY(kav1_grow(x, (void **)&x->hf64, &x->cap_f64, 2 * E + 1, sizeof(double), "load-balancing sums"));
    int32_t *hkept = x->hi32, *hfirst = x->hi32 + E;
    double *v = x->hf64;
    TRY(V1(x, gate_assign, p, C, probs, choice, slot, weight, hkept, v, hfirst));
    for (size_t e = 0; e < E; e++) v[E + e] = hfirst[e];
    v[2 * E] = p->S;
    TRY(V1(x, copy_to_device, kept, hkept, E * sizeof(int32_t)));
    return V1(x, copy_to_device, aux_sums, v, (2 * E + 1) * sizeof(double));
}

// v1 wants d(l_aux)/d probs[s,e] per expert on the host: the v1 core's formula on the reduced sums.
static dsmoe_status k_gate_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                                    float *dlogits, const float *probs, const int32_t *choice, const int32_t *slot,
                                    const float *dweight, const double *aux_sums, float daux) {
    ENTER(ctx);
    if (!p) return kav1_fail(x, DSMOE_ERR_INVALID, "gate_backward: NULL gating params");
    int E = p->E > 0 ? p->E : 0;
    TRY(kav1_grow(x, (void **)&x->hf64, &x->cap_f64, 2 * (size_t)E + 1, sizeof(double), "load-balancing sums"));
    TRY(kav1_grow(x, (void **)&x->hf32, &x->cap_f32, (size_t)E, sizeof(float), "aux gradient"));
    const double *v = x->hf64;
    TRY(V1(x, copy_to_host, x->hf64, aux_sums, (2 * (size_t)E + 1) * sizeof(double)));
    double St = v[2 * E];
    for (int e = 0; e < E; e++) x->hf32[e] = St > 0.0 ? (float)((double)daux * E * v[E + e] / (St * St)) : 0.0f;
    return V1(x, gate_backward, p, dlogits, probs, choice, slot, dweight, x->hf32);
}

static dsmoe_status k_moe_dispatch(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *buf, const void *xs,
                                   dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, int S, int K, int E,
                                   int C, int M) {
    ENTER_F32(ctx, "moe_dispatch", dt);
    ARGS("moe_dispatch", S >= 0 && K >= 1 && E >= 1 && C >= 0 && M > 0 && (S == 0 || (buf && xs && choice && slot)));
    return V1_DATA(x, moe_dispatch, buf, xs, choice, slot, S, K, E, C, M);
}

static dsmoe_status k_moe_dispatch_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dx, const void *dbuf,
                                            dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, int S, int K,
                                            int E, int C, int M) {
    ENTER_F32(ctx, "moe_dispatch_backward", dt);
    ARGS("moe_dispatch_backward", S >= 0 && K >= 1 && E >= 1 && C >= 0 && M > 0 &&
         (S == 0 || (dx && dbuf && choice && slot)));
    return V1_DATA(x, moe_dispatch_backward, dx, dbuf, choice, slot, S, K, E, C, M);
}

static dsmoe_status k_moe_combine(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *y,
                                  dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, const float *weight,
                                  int S, int K, int E, int C, int M) {
    ENTER_F32(ctx, "moe_combine", dt);
    ARGS("moe_combine", S >= 0 && K >= 1 && E >= 1 && C >= 0 && M > 0 &&
         (S == 0 || (out && y && choice && slot && weight)));
    return V1_DATA(x, moe_combine, out, y, choice, slot, weight, S, K, E, C, M);
}

static dsmoe_status k_moe_combine_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dy, float *dweight,
                                           const void *dout, const void *y, dsmoe_dtype dt, const int32_t *choice,
                                           const int32_t *slot, const float *weight, int S, int K, int E, int C,
                                           int M) {
    ENTER_F32(ctx, "moe_combine_backward", dt);
    ARGS("moe_combine_backward", S >= 0 && K >= 1 && E >= 1 && C >= 0 && M > 0 &&
         (S == 0 || (dy && dweight && dout && y && choice && slot && weight)));
    return V1_DATA(x, moe_combine_backward, dy, dweight, dout, y, choice, slot, weight, S, K, E, C, M);
}

static dsmoe_status k_residual_mix_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *coef,
                                           const void *moe, const void *mlp, dsmoe_dtype dt, const float *coef_logits,
                                           int S, int M) {
    ENTER_F32(ctx, "residual_mix_forward", dt);
    return V1(x, residual_mix_forward, out, coef, moe, mlp, coef_logits, S, M);
}

static dsmoe_status k_residual_mix_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dmoe, void *dmlp,
                                            float *dcoef_logits, const void *dout, const void *moe, const void *mlp,
                                            dsmoe_dtype dt, const float *coef, int S, int M) {
    ENTER_F32(ctx, "residual_mix_backward", dt);
    return V1(x, residual_mix_backward, dmoe, dmlp, dcoef_logits, dout, moe, mlp, coef, S, M);
}

// One v1 adamw_update per tensor, in list order.
static dsmoe_status k_adamw(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_adamw_params *hp,
                            const dsmoe_adamw_tensor *tensors, int n) {
    ENTER(ctx);
    if (!hp || n < 0 || (n > 0 && !tensors))
        return kav1_fail(x, DSMOE_ERR_INVALID, "adamw: NULL hyper-parameters or tensor list, or n=%d < 0", n);
    for (int i = 0; i < n; i++) {
        const dsmoe_adamw_tensor *t = &tensors[i];
        TRY(V1(x, adamw_update, t->param, t->grad, t->m, t->v, t->n, hp->lr, hp->beta1, hp->beta2, hp->eps,
               t->weight_decay, hp->grad_scale, hp->t));
    }
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// the compute members of the adapted table

void kav1_fill_ops(dsmoe_kernel_plugin_v3 *t) {
    t->gemm = k_gemm;
    t->gemm_grouped = k_gemm_grouped;
    t->gemm_grouped_wgrad = k_gemm_grouped_wgrad;
    t->bias_add = k_bias_add;
    t->bias_backward = k_bias_backward;
    t->axpy = k_axpy;
    t->mul_uniform_noise = k_mul_uniform_noise;
    t->sum_squares = k_sum_squares;
    t->all_finite = k_all_finite;
    t->convert = NULL;
    t->init_tensor = k_init_tensor;
    t->embedding_forward = k_embedding_forward;
    t->embedding_backward = k_embedding_backward;
    t->layernorm_forward = k_layernorm_forward;
    t->layernorm_backward = k_layernorm_backward;
    t->gelu_forward = k_gelu_forward;
    t->gelu_backward = k_gelu_backward;
    t->attention_forward = k_attention_forward;
    t->attention_backward = k_attention_backward;
    t->crossentropy_forward = k_crossentropy_forward;
    t->crossentropy_backward = k_crossentropy_backward;
    t->gate_route = k_gate_route;
    t->gate_assign = k_gate_assign;
    t->gate_backward = k_gate_backward;
    t->moe_dispatch = k_moe_dispatch;
    t->moe_dispatch_backward = k_moe_dispatch_backward;
    t->moe_combine = k_moe_combine;
    t->moe_combine_backward = k_moe_combine_backward;
    t->residual_mix_forward = k_residual_mix_forward;
    t->residual_mix_backward = k_residual_mix_backward;
    t->adamw = k_adamw;
}
