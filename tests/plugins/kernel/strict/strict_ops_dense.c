// tests/plugins/kernel/strict/strict_ops_dense.c: the strict plugin's dense compute members (GEMMs, element-wise
// ops, embedding, layer norm, GELU, attention, cross-entropy, AdamW). Each member is three parts: the
// argument struct its closure carries, the run function that calls the cpu plugin with it, and the
// member itself, which copies the arguments, checks sizes and dtypes, declares every buffer it touches
// (with its extent where the arguments give it) and submits the closure (strict_queue.c).
// defines: strict_fill_dense_members
#include <stdlib.h>
#include <string.h>

#include "strict_internal.h"

#define ES(dt) dsmoe_dtype_size(dt)
#define Z(x) ((size_t)(x))
#define F32 Z(4)
#define CPU(member) c->cpu->member

// ---------------------------------------------------------------------------------------------------
// GEMM

typedef struct {
    int ta, tb, m, n, k;
    float alpha, beta;
    const void *a, *b;
    void *c;
    dsmoe_dtype at, bt, ct;
    int lda, ldb, ldc;
} gemm_args;

static dsmoe_status run_gemm(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(gemm_args);
    return CPU(gemm)(c->cc, c->cq, a->ta, a->tb, a->m, a->n, a->k, a->alpha, a->a, a->at, a->lda, a->b, a->bt, a->ldb,
                     a->beta, a->c, a->ct, a->ldc);
}

static dsmoe_status s_gemm(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, int ta, int tb, int m, int n, int k,
                           float alpha, const void *A, dsmoe_dtype at, int lda, const void *B, dsmoe_dtype bt, int ldb,
                           float beta, void *Cm, dsmoe_dtype ct, int ldc) {
    STRICT_BEGIN(ctx, q, "gemm", run_gemm, gemm_args);
    *a = (gemm_args){ta, tb, m, n, k, alpha, beta, A, B, Cm, at, bt, ct, lda, ldb, ldc};
    strict_check(ctx, op, m >= 0 && n >= 0 && k >= 0, "negative size (m %d, n %d, k %d)", m, n, k);
    // Stored shapes: a is (m, k), or (k, m) when transposed; likewise b (k, n) / (n, k); c (m, n).
    int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
    strict_check(ctx, op, lda >= (ac > 1 ? ac : 1) && ldb >= (bc > 1 ? bc : 1) && ldc >= (n > 1 ? n : 1),
                 "a leading dimension is below its row length (lda %d, ldb %d, ldc %d)", lda, ldb, ldc);
    strict_dtype(ctx, op, at, "a");
    strict_dtype(ctx, op, bt, "b");
    strict_dtype(ctx, op, ct, "c");
    strict_ref(ctx, op, A, strict_mat_bytes(Z(ar), Z(ac), Z(lda), ES(at)), "a");
    strict_ref(ctx, op, B, strict_mat_bytes(Z(br), Z(bc), Z(ldb), ES(bt)), "b");
    strict_ref(ctx, op, Cm, strict_mat_bytes(Z(m), Z(n), Z(ldc), ES(ct)), "c");
    return strict_submit(ctx, q, op);
}

// The grouped GEMMs: the descriptor is copied. The extents of its operands are upper bounds (every group
// with m_max rows), clipped at the buffer's end: the rows past a group's count are never touched, so
// they need not exist for the last group.

// Bytes spanned by `count` blocks `stride` elements apart, the last one `last` elements long.
static size_t span(size_t count, size_t stride, size_t last, size_t esize) {
    return count == 0 || last == 0 ? 0 : ((count - 1) * stride + last) * esize;
}

// Rows counts[g] .. m_max - 1 of c_g (and of aux_g with BIAS_GELU) are unspecified after the call (the
// ABI lets a plugin compute the whole capacity): they become NaN, so that a caller reading them fails.
static void poison_beyond_counts(const dsmoe_grouped_gemm *a, void *m, size_t es) {
    for (int g = 0; g < a->groups; g++) {
        int cnt = a->counts[g];
        if (cnt < 0 || cnt > a->m_max) continue; // the cpu plugin's sticky error already
        for (int i = cnt; i < a->m_max; i++)
            memset((char *)m + ((size_t)g * a->c_stride + (size_t)i * (size_t)a->ldc) * es, STRICT_POISON,
                   (size_t)a->n * es);
    }
}

static dsmoe_status run_gemm_grouped(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(dsmoe_grouped_gemm);
    dsmoe_status st = CPU(gemm_grouped)(c->cc, c->cq, a);
    if (st != DSMOE_OK || a->m_max == 0 || a->n == 0) return st;
    size_t es = a->c_type == DSMOE_BFLOAT16 ? 2 : 4;
    poison_beyond_counts(a, a->c, es);
    if (a->epilogue == DSMOE_EPI_BIAS_GELU) poison_beyond_counts(a, a->aux, es);
    return st;
}

static dsmoe_status s_gemm_grouped(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_gemm *g) {
    STRICT_BEGIN(ctx, q, "gemm_grouped", run_gemm_grouped, dsmoe_grouped_gemm);
    strict_check(ctx, op, g != NULL, "the descriptor is NULL");
    if (g) {
        *a = *g;
        strict_check(ctx, op, g->groups >= 0 && g->m_max >= 0 && g->n >= 0 && g->k >= 0,
                     "negative size (groups %d, m_max %d, n %d, k %d)", g->groups, g->m_max, g->n, g->k);
        strict_check(ctx, op, g->groups == 0 || g->b_groups >= 1, "b_groups %d < 1", g->b_groups);
        strict_check(ctx, op, g->epilogue >= DSMOE_EPI_NONE && g->epilogue <= DSMOE_EPI_DGELU, "epilogue %d unknown",
                     (int)g->epilogue);
        strict_dtype(ctx, op, g->a_type, "a");
        strict_dtype(ctx, op, g->b_type, "b");
        strict_dtype(ctx, op, g->c_type, "c");
        int bias = g->epilogue == DSMOE_EPI_BIAS || g->epilogue == DSMOE_EPI_BIAS_GELU;
        int aux = g->epilogue == DSMOE_EPI_BIAS_GELU || g->epilogue == DSMOE_EPI_DGELU;
        if (op->status) return strict_submit(ctx, q, op);
        size_t G = Z(g->groups), W = Z(g->groups < g->b_groups ? g->groups : g->b_groups); // weights used
        size_t cn = span(G, g->c_stride, strict_mat_bytes(Z(g->m_max), Z(g->n), Z(g->ldc), 1), ES(g->c_type));
        strict_ref(ctx, op, g->counts, G * 4, "counts");
        strict_ref_bound(ctx, op, g->a, span(G, g->a_stride, strict_mat_bytes(Z(g->m_max), Z(g->k), Z(g->lda), 1),
                                             ES(g->a_type)), "a");
        strict_ref_bound(ctx, op, g->b, span(W, g->b_stride, g->trans_b ? strict_mat_bytes(Z(g->n), Z(g->k), Z(g->ldb), 1)
                                                                         : strict_mat_bytes(Z(g->k), Z(g->n), Z(g->ldb), 1),
                                             ES(g->b_type)), "b");
        strict_ref_bound(ctx, op, g->c, cn, "c");
        if (bias) strict_ref_bound(ctx, op, g->bias, span(W, g->bias_stride, Z(g->n), F32), "bias");
        if (aux) strict_ref_bound(ctx, op, g->aux, cn, "aux");
    }
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_gemm_grouped_wgrad(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(dsmoe_grouped_wgrad);
    return CPU(gemm_grouped_wgrad)(c->cc, c->cq, a);
}

static dsmoe_status s_gemm_grouped_wgrad(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_wgrad *g) {
    STRICT_BEGIN(ctx, q, "gemm_grouped_wgrad", run_gemm_grouped_wgrad, dsmoe_grouped_wgrad);
    strict_check(ctx, op, g != NULL, "the descriptor is NULL");
    if (g) {
        *a = *g;
        strict_check(ctx, op, g->groups >= 0 && g->m_max >= 0 && g->n >= 0 && g->k >= 0,
                     "negative size (groups %d, m_max %d, n %d, k %d)", g->groups, g->m_max, g->n, g->k);
        strict_check(ctx, op, g->groups == 0 || g->b_groups >= 1, "b_groups %d < 1", g->b_groups);
        strict_dtype(ctx, op, g->dy_type, "dy");
        strict_dtype(ctx, op, g->x_type, "x");
        if (op->status) return strict_submit(ctx, q, op);
        size_t G = Z(g->groups), W = Z(g->groups < g->b_groups ? g->groups : g->b_groups), mm = Z(g->m_max);
        strict_ref(ctx, op, g->counts, G * 4, "counts");
        strict_ref_bound(ctx, op, g->dy, span(G, g->dy_stride, mm * Z(g->n), ES(g->dy_type)), "dy");
        strict_ref_bound(ctx, op, g->x, span(G, g->x_stride, mm * Z(g->k), ES(g->x_type)), "x");
        strict_ref_bound(ctx, op, g->dw, span(W, g->dw_stride, Z(g->n) * Z(g->k), F32), "dw");
        if (g->dbias) strict_ref_bound(ctx, op, g->dbias, span(W, g->dbias_stride, Z(g->n), F32), "dbias");
    }
    return strict_submit(ctx, q, op);
}

// ---------------------------------------------------------------------------------------------------
// Element-wise and small ops

typedef struct {
    void *out;          // out, y, dst, dbias
    const void *in;     // in, x, bias, dout, src
    dsmoe_dtype dt, dt2; // dt2: convert's source type
    size_t n;
    int rows, cols;
    float f;            // alpha, eps
    uint64_t seed, offset;
    dsmoe_init_params init;
} ew_args;

static dsmoe_status run_bias_add(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ew_args);
    return CPU(bias_add)(c->cc, c->cq, a->out, a->dt, a->in, a->rows, a->cols);
}

static dsmoe_status s_bias_add(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt,
                               const float *bias, int rows, int n) {
    STRICT_BEGIN(ctx, q, "bias_add", run_bias_add, ew_args);
    *a = (ew_args){.out = out, .in = bias, .dt = dt, .rows = rows, .cols = n};
    strict_check(ctx, op, rows >= 0 && n >= 0, "negative size (rows %d, n %d)", rows, n);
    strict_dtype(ctx, op, dt, "out");
    strict_ref(ctx, op, out, Z(rows) * Z(n) * ES(dt), "out");
    strict_ref(ctx, op, bias, Z(n) * F32, "bias");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_bias_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ew_args);
    return CPU(bias_backward)(c->cc, c->cq, a->out, a->in, a->dt, a->rows, a->cols);
}

static dsmoe_status s_bias_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dbias, const void *dout,
                                    dsmoe_dtype dt, int rows, int n) {
    STRICT_BEGIN(ctx, q, "bias_backward", run_bias_backward, ew_args);
    *a = (ew_args){.out = dbias, .in = dout, .dt = dt, .rows = rows, .cols = n};
    strict_check(ctx, op, rows >= 0 && n >= 0, "negative size (rows %d, n %d)", rows, n);
    strict_dtype(ctx, op, dt, "dout");
    strict_ref(ctx, op, dbias, Z(n) * F32, "dbias");
    strict_ref(ctx, op, dout, Z(rows) * Z(n) * ES(dt), "dout");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_axpy(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ew_args);
    return CPU(axpy)(c->cc, c->cq, a->out, a->f, a->in, a->dt, a->n);
}

static dsmoe_status s_axpy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *y, float alpha, const void *x,
                           dsmoe_dtype dt, size_t n) {
    STRICT_BEGIN(ctx, q, "axpy", run_axpy, ew_args);
    *a = (ew_args){.out = y, .in = x, .dt = dt, .n = n, .f = alpha};
    strict_dtype(ctx, op, dt, "x");
    strict_ref(ctx, op, y, n * ES(dt), "y");
    strict_ref(ctx, op, x, n * ES(dt), "x");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_mul_uniform_noise(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ew_args);
    return CPU(mul_uniform_noise)(c->cc, c->cq, a->out, a->in, a->dt, a->n, a->f, a->seed, a->offset);
}

static dsmoe_status s_mul_uniform_noise(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in,
                                        dsmoe_dtype dt, size_t n, float eps, uint64_t seed, uint64_t offset) {
    STRICT_BEGIN(ctx, q, "mul_uniform_noise", run_mul_uniform_noise, ew_args);
    *a = (ew_args){.out = out, .in = in, .dt = dt, .n = n, .f = eps, .seed = seed, .offset = offset};
    strict_dtype(ctx, op, dt, "out");
    strict_ref(ctx, op, out, n * ES(dt), "out");
    strict_ref(ctx, op, in, n * ES(dt), "in");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_sum_squares(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ew_args);
    return CPU(sum_squares)(c->cc, c->cq, a->in, a->n, a->out);
}

static dsmoe_status s_sum_squares(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const float *x, size_t n, double *out) {
    STRICT_BEGIN(ctx, q, "sum_squares", run_sum_squares, ew_args);
    *a = (ew_args){.out = out, .in = x, .n = n};
    strict_ref(ctx, op, x, n * F32, "x");
    strict_ref(ctx, op, out, sizeof(double), "out");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_all_finite(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ew_args);
    return CPU(all_finite)(c->cc, c->cq, a->in, a->dt, a->n, a->out);
}

// all_finite and convert may take types beyond the activation dtypes: a known type is enough here, the
// cpu plugin decides when the op runs.
static dsmoe_status s_all_finite(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const void *x, dsmoe_dtype dt, size_t n,
                                 int32_t *out) {
    STRICT_BEGIN(ctx, q, "all_finite", run_all_finite, ew_args);
    *a = (ew_args){.out = out, .in = x, .dt = dt, .n = n};
    strict_check(ctx, op, ES(dt) != 0, "unknown dtype %d", (int)dt);
    strict_ref(ctx, op, x, n * ES(dt), "x");
    strict_ref(ctx, op, out, 4, "out");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_convert(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ew_args);
    return CPU(convert)(c->cc, c->cq, a->out, a->dt, a->in, a->dt2, a->n);
}

static dsmoe_status s_convert(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, dsmoe_dtype dst_type,
                              const void *src, dsmoe_dtype src_type, size_t n) {
    STRICT_BEGIN(ctx, q, "convert", run_convert, ew_args);
    *a = (ew_args){.out = dst, .in = src, .dt = dst_type, .dt2 = src_type, .n = n};
    strict_check(ctx, op, ES(dst_type) != 0 && ES(src_type) != 0, "unknown dtype (dst %d, src %d)", (int)dst_type,
                 (int)src_type);
    strict_ref(ctx, op, dst, n * ES(dst_type), "dst");
    strict_ref(ctx, op, src, n * ES(src_type), "src");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_init_tensor(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ew_args);
    return CPU(init_tensor)(c->cc, c->cq, a->out, a->n, &a->init);
}

static dsmoe_status s_init_tensor(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dst, size_t n,
                                  const dsmoe_init_params *p) {
    STRICT_BEGIN(ctx, q, "init_tensor", run_init_tensor, ew_args);
    *a = (ew_args){.out = dst, .n = n};
    strict_check(ctx, op, p != NULL, "the parameters are NULL");
    if (p) a->init = *p;
    strict_ref(ctx, op, dst, n * F32, "dst");
    return strict_submit(ctx, q, op);
}

// ---------------------------------------------------------------------------------------------------
// Embedding, layer norm, GELU

typedef struct {
    void *o1, *o2, *o3;            // outputs (out/din, mean/dweight/dwte, rstd/dbias/dwpe)
    const void *i1, *i2, *i3, *i4, *i5; // inputs in the member's order
    dsmoe_dtype dt, dt2; // dt2: embedding_forward's wte
    int B, T, M, V, n_pos; // S = B for layer norm
    size_t n;
    float f;
} layer_args;

static dsmoe_status run_embedding_forward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(layer_args);
    return CPU(embedding_forward)(c->cc, c->cq, a->o1, a->dt, a->i1, a->i2, a->dt2, a->i3, a->i4, a->B, a->T, a->M,
                                  a->V, a->n_pos);
}

static dsmoe_status s_embedding_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt,
                                        const int32_t *tokens, const void *wte, dsmoe_dtype wte_dt, const float *wpe,
                                        const int32_t *pos, int B, int T, int M, int V, int n_pos) {
    STRICT_BEGIN(ctx, q, "embedding_forward", run_embedding_forward, layer_args);
    *a = (layer_args){.o1 = out, .i1 = tokens, .i2 = wte, .i3 = wpe, .i4 = pos, .dt = dt, .dt2 = wte_dt, .B = B,
                      .T = T, .M = M, .V = V, .n_pos = n_pos};
    strict_check(ctx, op, B >= 0 && T >= 0 && M >= 0 && V >= 0 && n_pos >= 0,
                 "negative size (B %d, T %d, M %d, V %d, n_pos %d)", B, T, M, V, n_pos);
    strict_dtype(ctx, op, dt, "out");
    strict_dtype(ctx, op, wte_dt, "wte");
    strict_ref(ctx, op, out, Z(B) * Z(T) * Z(M) * ES(dt), "out");
    strict_ref(ctx, op, tokens, Z(B) * Z(T) * 4, "tokens");
    strict_ref(ctx, op, wte, Z(V) * Z(M) * ES(wte_dt), "wte");
    strict_ref(ctx, op, wpe, Z(n_pos) * Z(M) * F32, "wpe");
    strict_ref_opt(ctx, op, pos, Z(B) * 4, "pos");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_embedding_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(layer_args);
    return CPU(embedding_backward)(c->cc, c->cq, a->o1, a->o2, a->i1, a->dt, a->i2, a->B, a->T, a->M, a->V);
}

static dsmoe_status s_embedding_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dwte, float *dwpe,
                                         const void *dout, dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M,
                                         int V) {
    STRICT_BEGIN(ctx, q, "embedding_backward", run_embedding_backward, layer_args);
    *a = (layer_args){.o1 = dwte, .o2 = dwpe, .i1 = dout, .i2 = tokens, .dt = dt, .B = B, .T = T, .M = M, .V = V};
    strict_check(ctx, op, B >= 0 && T >= 0 && M >= 0 && V >= 0, "negative size (B %d, T %d, M %d, V %d)", B, T, M, V);
    strict_dtype(ctx, op, dt, "dout");
    strict_ref(ctx, op, dwte, Z(V) * Z(M) * F32, "dwte");
    strict_ref(ctx, op, dwpe, Z(T) * Z(M) * F32, "dwpe");
    strict_ref(ctx, op, dout, Z(B) * Z(T) * Z(M) * ES(dt), "dout");
    strict_ref(ctx, op, tokens, Z(B) * Z(T) * 4, "tokens");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_layernorm_forward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(layer_args);
    return CPU(layernorm_forward)(c->cc, c->cq, a->o1, a->o2, a->o3, a->i1, a->dt, a->i2, a->i3, a->B, a->M, a->f);
}

static dsmoe_status s_layernorm_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *mean,
                                        float *rstd, const void *in, dsmoe_dtype dt, const float *weight,
                                        const float *bias, int S, int M, float eps) {
    STRICT_BEGIN(ctx, q, "layernorm_forward", run_layernorm_forward, layer_args);
    *a = (layer_args){.o1 = out, .o2 = mean, .o3 = rstd, .i1 = in, .i2 = weight, .i3 = bias, .dt = dt, .B = S, .M = M,
                      .f = eps};
    strict_check(ctx, op, S >= 0 && M >= 0, "negative size (S %d, M %d)", S, M);
    strict_dtype(ctx, op, dt, "in");
    strict_ref(ctx, op, out, Z(S) * Z(M) * ES(dt), "out");
    strict_ref_opt(ctx, op, mean, Z(S) * F32, "mean"); // NULL at inference (nothing saved for a backward)
    strict_ref_opt(ctx, op, rstd, Z(S) * F32, "rstd");
    strict_ref(ctx, op, in, Z(S) * Z(M) * ES(dt), "in");
    strict_ref(ctx, op, weight, Z(M) * F32, "weight");
    strict_ref(ctx, op, bias, Z(M) * F32, "bias");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_layernorm_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(layer_args);
    return CPU(layernorm_backward)(c->cc, c->cq, a->o1, a->o2, a->o3, a->i1, a->i2, a->dt, a->i3, a->i4, a->i5, a->B,
                                   a->M);
}

static dsmoe_status s_layernorm_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, float *dweight,
                                         float *dbias, const void *dout, const void *in, dsmoe_dtype dt,
                                         const float *weight, const float *mean, const float *rstd, int S, int M) {
    STRICT_BEGIN(ctx, q, "layernorm_backward", run_layernorm_backward, layer_args);
    *a = (layer_args){.o1 = din, .o2 = dweight, .o3 = dbias, .i1 = dout, .i2 = in, .i3 = weight, .i4 = mean,
                      .i5 = rstd, .dt = dt, .B = S, .M = M};
    strict_check(ctx, op, S >= 0 && M >= 0, "negative size (S %d, M %d)", S, M);
    strict_dtype(ctx, op, dt, "in");
    size_t act = Z(S) * Z(M) * ES(dt);
    strict_ref(ctx, op, din, act, "din");
    strict_ref(ctx, op, dweight, Z(M) * F32, "dweight");
    strict_ref(ctx, op, dbias, Z(M) * F32, "dbias");
    strict_ref(ctx, op, dout, act, "dout");
    strict_ref(ctx, op, in, act, "in");
    strict_ref(ctx, op, weight, Z(M) * F32, "weight");
    strict_ref(ctx, op, mean, Z(S) * F32, "mean");
    strict_ref(ctx, op, rstd, Z(S) * F32, "rstd");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_gelu_forward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(layer_args);
    return CPU(gelu_forward)(c->cc, c->cq, a->o1, a->i1, a->dt, a->n);
}

static dsmoe_status s_gelu_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in,
                                   dsmoe_dtype dt, size_t n) {
    STRICT_BEGIN(ctx, q, "gelu_forward", run_gelu_forward, layer_args);
    *a = (layer_args){.o1 = out, .i1 = in, .dt = dt, .n = n};
    strict_dtype(ctx, op, dt, "in");
    strict_ref(ctx, op, out, n * ES(dt), "out");
    strict_ref(ctx, op, in, n * ES(dt), "in");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_gelu_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(layer_args);
    return CPU(gelu_backward)(c->cc, c->cq, a->o1, a->i1, a->i2, a->dt, a->n);
}

static dsmoe_status s_gelu_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, const void *in,
                                    const void *dout, dsmoe_dtype dt, size_t n) {
    STRICT_BEGIN(ctx, q, "gelu_backward", run_gelu_backward, layer_args);
    *a = (layer_args){.o1 = din, .i1 = in, .i2 = dout, .dt = dt, .n = n};
    strict_dtype(ctx, op, dt, "in");
    strict_ref(ctx, op, din, n * ES(dt), "din");
    strict_ref(ctx, op, in, n * ES(dt), "in");
    strict_ref(ctx, op, dout, n * ES(dt), "dout");
    return strict_submit(ctx, q, op);
}

// ---------------------------------------------------------------------------------------------------
// Attention (the saved state and workspace sizes come from the cpu plugin's attention_bytes)

typedef struct {
    void *out, *saved; // forward: out, saved; backward: dqkv, workspace
    const void *dout, *qkv, *fout, *fsaved;
    dsmoe_attention_shape shape;
} attn_args;

static dsmoe_status run_attention_forward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(attn_args);
    return CPU(attention_forward)(c->cc, c->cq, a->out, a->saved, a->qkv, &a->shape);
}

static dsmoe_status run_attention_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(attn_args);
    return CPU(attention_backward)(c->cc, c->cq, a->out, a->saved, a->dout, a->qkv, a->fout, a->fsaved, &a->shape);
}

// Copies the shape, checks it and asks the cpu plugin for the saved and workspace sizes.
static void attn_shape(dsmoe_kernel_ctx *ctx, strict_op *op, const dsmoe_attention_shape *shape, size_t *act,
                       size_t *saved, size_t *ws) {
    attn_args *a = (attn_args *)(void *)op->args;
    *act = *saved = *ws = 0;
    strict_check(ctx, op, shape != NULL, "the shape is NULL");
    if (!shape) return;
    a->shape = *shape;
    const dsmoe_attention_shape *s = shape;
    strict_check(ctx, op, s->B >= 0 && s->T >= 0 && s->M >= 0 && s->NH >= 1 && s->M % s->NH == 0,
                 "bad shape (B %d, T %d, M %d, NH %d)", s->B, s->T, s->M, s->NH);
    strict_dtype(ctx, op, s->dt, "shape.dt");
    if (op->status != DSMOE_OK) return;
    dsmoe_status st = ctx->cpu->attention_bytes(ctx->cc, shape, saved, ws);
    strict_check(ctx, op, st == DSMOE_OK, "the cpu plugin's attention_bytes refused the shape: %s",
                 ctx->cpu->last_error(ctx->cc));
    *act = Z(s->B) * Z(s->T) * Z(s->M) * ES(s->dt);
}

static dsmoe_status s_attention_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, void *saved,
                                        const void *qkv, const dsmoe_attention_shape *shape) {
    STRICT_BEGIN(ctx, q, "attention_forward", run_attention_forward, attn_args);
    a->out = out, a->saved = saved, a->qkv = qkv;
    size_t act, sb, wb;
    attn_shape(ctx, op, shape, &act, &sb, &wb);
    strict_ref(ctx, op, out, act, "out");
    strict_ref(ctx, op, saved, sb, "saved");
    strict_ref(ctx, op, qkv, 3 * act, "qkv");
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_attention_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dqkv, void *workspace,
                                         const void *dout, const void *qkv, const void *out, const void *saved,
                                         const dsmoe_attention_shape *shape) {
    STRICT_BEGIN(ctx, q, "attention_backward", run_attention_backward, attn_args);
    a->out = dqkv, a->saved = workspace, a->dout = dout, a->qkv = qkv, a->fout = out, a->fsaved = saved;
    size_t act, sb, wb;
    attn_shape(ctx, op, shape, &act, &sb, &wb);
    strict_ref(ctx, op, dqkv, 3 * act, "dqkv");
    strict_ref(ctx, op, workspace, wb, "workspace");
    strict_ref(ctx, op, dout, act, "dout");
    strict_ref(ctx, op, qkv, 3 * act, "qkv");
    strict_ref(ctx, op, out, act, "out");
    strict_ref(ctx, op, saved, sb, "saved");
    return strict_submit(ctx, q, op);
}

// ---------------------------------------------------------------------------------------------------
// Cross-entropy

typedef struct {
    void *o1; // losses / dlogits
    float *probs_out;
    const void *logits;
    const float *probs;
    const int32_t *targets;
    dsmoe_dtype dt;
    float dloss;
    int S, V;
} ce_args;

static dsmoe_status run_crossentropy_forward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ce_args);
    return CPU(crossentropy_forward)(c->cc, c->cq, a->o1, a->probs_out, a->logits, a->dt, a->targets, a->S, a->V);
}

static dsmoe_status s_crossentropy_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *losses, float *probs,
                                           const void *logits, dsmoe_dtype dt, const int32_t *targets, int S, int V) {
    STRICT_BEGIN(ctx, q, "crossentropy_forward", run_crossentropy_forward, ce_args);
    *a = (ce_args){.o1 = losses, .probs_out = probs, .logits = logits, .targets = targets, .dt = dt, .S = S, .V = V};
    strict_check(ctx, op, S >= 0 && V >= 0, "negative size (S %d, V %d)", S, V);
    strict_dtype(ctx, op, dt, "logits");
    strict_ref(ctx, op, losses, Z(S) * F32, "losses");
    strict_ref(ctx, op, probs, Z(S) * Z(V) * F32, "probs");
    strict_ref(ctx, op, logits, Z(S) * Z(V) * ES(dt), "logits");
    strict_ref(ctx, op, targets, Z(S) * 4, "targets");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_crossentropy_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(ce_args);
    return CPU(crossentropy_backward)(c->cc, c->cq, a->o1, a->dt, a->probs, a->targets, a->dloss, a->S, a->V);
}

static dsmoe_status s_crossentropy_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dlogits,
                                            dsmoe_dtype dt, const float *probs, const int32_t *targets, float dloss,
                                            int S, int V) {
    STRICT_BEGIN(ctx, q, "crossentropy_backward", run_crossentropy_backward, ce_args);
    *a = (ce_args){.o1 = dlogits, .probs = probs, .targets = targets, .dt = dt, .dloss = dloss, .S = S, .V = V};
    strict_check(ctx, op, S >= 0 && V >= 0, "negative size (S %d, V %d)", S, V);
    strict_dtype(ctx, op, dt, "dlogits");
    strict_ref(ctx, op, dlogits, Z(S) * Z(V) * ES(dt), "dlogits");
    strict_ref(ctx, op, probs, Z(S) * Z(V) * F32, "probs");
    strict_ref(ctx, op, targets, Z(S) * 4, "targets");
    return strict_submit(ctx, q, op);
}

// ---------------------------------------------------------------------------------------------------
// AdamW: the tensor list is host memory, copied into the closure.

typedef struct {
    dsmoe_adamw_params hp;
    int n;
} adamw_args;

static dsmoe_status run_adamw(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(adamw_args);
    return CPU(adamw)(c->cc, c->cq, &a->hp, op->extra, a->n);
}

static dsmoe_status s_adamw(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_adamw_params *hp,
                            const dsmoe_adamw_tensor *tensors, int n) {
    STRICT_BEGIN(ctx, q, "adamw", run_adamw, adamw_args);
    a->n = n;
    strict_check(ctx, op, hp != NULL, "the hyper-parameters are NULL");
    strict_check(ctx, op, n >= 0 && (n == 0 || tensors), "bad tensor list (n %d, tensors %p)", n, (const void *)tensors);
    if (hp) a->hp = *hp;
    if (op->status == DSMOE_OK && n > 0) {
        op->extra = malloc(Z(n) * sizeof *tensors);
        strict_check(ctx, op, op->extra != NULL, "no host memory for the tensor list");
        if (op->extra) memcpy(op->extra, tensors, Z(n) * sizeof *tensors);
    }
    for (int i = 0; i < n && op->status == DSMOE_OK; i++) {
        const dsmoe_adamw_tensor *t = &tensors[i];
        strict_ref(ctx, op, t->param, t->n * F32, "param");
        strict_ref(ctx, op, t->grad, t->n * F32, "grad");
        strict_ref(ctx, op, t->m, t->n * F32, "m");
        strict_ref(ctx, op, t->v, t->n * F32, "v");
    }
    return strict_submit(ctx, q, op);
}

void strict_fill_dense_members(dsmoe_kernel_plugin_v3 *t, const dsmoe_kernel_plugin_v3 *cpu) {
    t->gemm = s_gemm;
    t->gemm_grouped = s_gemm_grouped;
    t->gemm_grouped_wgrad = s_gemm_grouped_wgrad;
    t->bias_add = s_bias_add;
    t->bias_backward = s_bias_backward;
    t->axpy = s_axpy;
    t->mul_uniform_noise = s_mul_uniform_noise;
    t->sum_squares = s_sum_squares;
    t->all_finite = !cpu || cpu->all_finite ? s_all_finite : NULL; // optional: present when the cpu's is
    t->convert = !cpu || cpu->convert ? s_convert : NULL;
    t->init_tensor = s_init_tensor;
    t->embedding_forward = s_embedding_forward;
    t->embedding_backward = s_embedding_backward;
    t->layernorm_forward = s_layernorm_forward;
    t->layernorm_backward = s_layernorm_backward;
    t->gelu_forward = s_gelu_forward;
    t->gelu_backward = s_gelu_backward;
    t->attention_forward = s_attention_forward;
    t->attention_backward = s_attention_backward;
    t->crossentropy_forward = s_crossentropy_forward;
    t->crossentropy_backward = s_crossentropy_backward;
    t->adamw = s_adamw;
}
