// tests/plugins/kernel/strict/strict_ops_moe.c: the strict plugin's MoE members (gating, dispatch, combine,
// residual mix) and the optional inference group (KV cache, cached attention, sampling). Same three
// parts per member as strict_ops_dense.c: argument struct, run function (calls the cpu plugin), member.
// defines: strict_fill_moe_members
#include <stdlib.h>
#include <string.h>

#include "strict_internal.h"

#define ES(dt) dsmoe_dtype_size(dt)
#define Z(x) ((size_t)(x))
#define F32 Z(4)
#define CPU(member) c->cpu->member

// ---------------------------------------------------------------------------------------------------
// Gating: the parameter struct is copied; every output stays on the device.

typedef struct {
    dsmoe_gating_params p;
    int C;
    float daux;
    const void *i1, *i2, *i3, *i4, *i5; // inputs in the member's order
    void *o1, *o2, *o3, *o4, *o5, *o6, *o7; // outputs in the member's order
} gate_args;

static dsmoe_status run_gate_route(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(gate_args);
    return CPU(gate_route)(c->cc, c->cq, &a->p, a->i1, a->o1, a->o2, a->o3);
}

static dsmoe_status run_gate_assign(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(gate_args);
    return CPU(gate_assign)(c->cc, c->cq, &a->p, a->C, a->i1, a->i2, a->o1, a->o2, a->o3, a->o4);
}

static dsmoe_status run_gate(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(gate_args);
    return CPU(gate)(c->cc, c->cq, &a->p, a->C, a->i1, a->o1, a->o2, a->o3, a->o4, a->o5, a->o6, a->o7);
}

static dsmoe_status run_gate_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(gate_args);
    return CPU(gate_backward)(c->cc, c->cq, &a->p, a->o1, a->i1, a->i2, a->i3, a->i4, a->i5, a->daux);
}

// Copies p and checks it; the sizes S, E, K are then a->p's.
static int gate_params(dsmoe_kernel_ctx *ctx, strict_op *op, const dsmoe_gating_params *p) {
    strict_check(ctx, op, p != NULL, "the gating parameters are NULL");
    if (!p) return 0;
    ((gate_args *)(void *)op->args)->p = *p;
    strict_check(ctx, op, p->S >= 0 && p->E >= 1 && (p->K == 1 || p->K == 2), "bad gating sizes (S %d, E %d, K %d)",
                 p->S, p->E, p->K);
    return op->status == DSMOE_OK;
}

// The buffers gate_route uses, and those gate_assign uses (gate uses both).
static void route_refs(dsmoe_kernel_ctx *ctx, strict_op *op, const dsmoe_gating_params *p, const float *logits,
                       const float *probs, const int32_t *choice, const int32_t *counts) {
    size_t S = Z(p->S), E = Z(p->E), K = Z(p->K);
    strict_ref(ctx, op, logits, S * E * F32, "logits");
    strict_ref(ctx, op, probs, S * E * F32, "probs");
    strict_ref(ctx, op, choice, S * K * 4, "choice");
    strict_ref(ctx, op, counts, E * 4, "counts");
}
static void assign_refs(dsmoe_kernel_ctx *ctx, strict_op *op, const dsmoe_gating_params *p, const float *probs,
                        const int32_t *choice, const int32_t *slot, const float *weight, const int32_t *kept,
                        const double *aux_sums) {
    size_t S = Z(p->S), E = Z(p->E), K = Z(p->K);
    strict_ref(ctx, op, probs, S * E * F32, "probs");
    strict_ref(ctx, op, choice, S * K * 4, "choice");
    strict_ref(ctx, op, slot, S * K * 4, "slot");
    strict_ref(ctx, op, weight, S * K * F32, "weight");
    strict_ref(ctx, op, kept, E * 4, "kept");
    strict_ref(ctx, op, aux_sums, (2 * E + 1) * sizeof(double), "aux_sums");
}

static dsmoe_status s_gate_route(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                                 const float *logits, float *probs, int32_t *choice, int32_t *counts) {
    STRICT_BEGIN(ctx, q, "gate_route", run_gate_route, gate_args);
    a->i1 = logits, a->o1 = probs, a->o2 = choice, a->o3 = counts;
    if (gate_params(ctx, op, p)) route_refs(ctx, op, p, logits, probs, choice, counts);
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_gate_assign(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p, int C,
                                  const float *probs, const int32_t *choice, int32_t *slot, float *weight,
                                  int32_t *kept, double *aux_sums) {
    STRICT_BEGIN(ctx, q, "gate_assign", run_gate_assign, gate_args);
    a->C = C, a->i1 = probs, a->i2 = choice, a->o1 = slot, a->o2 = weight, a->o3 = kept, a->o4 = aux_sums;
    strict_check(ctx, op, C >= 0, "negative capacity %d", C);
    if (gate_params(ctx, op, p)) assign_refs(ctx, op, p, probs, choice, slot, weight, kept, aux_sums);
    return strict_submit(ctx, q, op);
}

// Route + assign: the union of the two members' buffers; probs and choice are written, then read.
static dsmoe_status s_gate(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p, int C,
                           const float *logits, float *probs, int32_t *choice, int32_t *counts, int32_t *slot,
                           float *weight, int32_t *kept, double *aux_sums) {
    STRICT_BEGIN(ctx, q, "gate", run_gate, gate_args);
    a->C = C, a->i1 = logits, a->o1 = probs, a->o2 = choice, a->o3 = counts, a->o4 = slot, a->o5 = weight;
    a->o6 = kept, a->o7 = aux_sums;
    strict_check(ctx, op, C >= 0, "negative capacity %d", C);
    if (gate_params(ctx, op, p)) { // probs and choice are named by both: each reference is held and dropped alone
        route_refs(ctx, op, p, logits, probs, choice, counts);
        assign_refs(ctx, op, p, probs, choice, slot, weight, kept, aux_sums);
    }
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_gate_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                                    float *dlogits, const float *probs, const int32_t *choice, const int32_t *slot,
                                    const float *dweight, const double *aux_sums, float daux) {
    STRICT_BEGIN(ctx, q, "gate_backward", run_gate_backward, gate_args);
    a->o1 = dlogits, a->i1 = probs, a->i2 = choice, a->i3 = slot, a->i4 = dweight, a->i5 = aux_sums, a->daux = daux;
    if (gate_params(ctx, op, p)) {
        size_t S = Z(p->S), E = Z(p->E), K = Z(p->K);
        strict_ref(ctx, op, dlogits, S * E * F32, "dlogits");
        strict_ref(ctx, op, probs, S * E * F32, "probs");
        strict_ref(ctx, op, choice, S * K * 4, "choice");
        strict_ref(ctx, op, slot, S * K * 4, "slot");
        strict_ref(ctx, op, dweight, S * K * F32, "dweight");
        strict_ref(ctx, op, aux_sums, (2 * E + 1) * sizeof(double), "aux_sums");
    }
    return strict_submit(ctx, q, op);
}

// ---------------------------------------------------------------------------------------------------
// Dispatch and combine through the (S, K) choice and slot tables; expert buffers are (E, C, M).

typedef struct {
    void *o1, *o2;                        // outputs in the member's order
    const void *i1, *i2, *i3, *i4, *i5; // inputs in the member's order
    dsmoe_dtype dt;
    int S, K, E, C, M;
} moe_args;

static dsmoe_status run_moe_dispatch(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(moe_args);
    return CPU(moe_dispatch)(c->cc, c->cq, a->o1, a->i1, a->dt, a->i2, a->i3, a->S, a->K, a->E, a->C, a->M);
}

static dsmoe_status run_moe_dispatch_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(moe_args);
    return CPU(moe_dispatch_backward)(c->cc, c->cq, a->o1, a->i1, a->dt, a->i2, a->i3, a->S, a->K, a->E, a->C, a->M);
}

static dsmoe_status run_moe_combine(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(moe_args);
    return CPU(moe_combine)(c->cc, c->cq, a->o1, a->i1, a->dt, a->i2, a->i3, a->i4, a->S, a->K, a->E, a->C, a->M);
}

static dsmoe_status run_moe_combine_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(moe_args);
    return CPU(moe_combine_backward)(c->cc, c->cq, a->o1, a->o2, a->i1, a->i2, a->dt, a->i3, a->i4, a->i5, a->S, a->K,
                                     a->E, a->C, a->M);
}

// Sizes and the common buffers: tokens (S, M), experts (E, C, M), tables (S, K).
static void moe_sizes(dsmoe_kernel_ctx *ctx, strict_op *op, dsmoe_dtype dt, int S, int K, int E, int C, int M,
                      const int32_t *choice, const int32_t *slot, size_t *tok, size_t *exp) {
    moe_args *a = (moe_args *)(void *)op->args;
    a->dt = dt, a->S = S, a->K = K, a->E = E, a->C = C, a->M = M;
    strict_check(ctx, op, S >= 0 && (K == 1 || K == 2) && E >= 1 && C >= 0 && M >= 0,
                 "bad sizes (S %d, K %d, E %d, C %d, M %d)", S, K, E, C, M);
    strict_dtype(ctx, op, dt, "dt");
    *tok = op->status ? 0 : Z(S) * Z(M) * ES(dt);
    *exp = op->status ? 0 : Z(E) * Z(C) * Z(M) * ES(dt);
    size_t tab = op->status ? 0 : Z(S) * Z(K) * 4;
    strict_ref(ctx, op, choice, tab, "choice");
    strict_ref(ctx, op, slot, tab, "slot");
}

static dsmoe_status s_moe_dispatch(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *buf, const void *x,
                                   dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, int S, int K, int E,
                                   int C, int M) {
    STRICT_BEGIN(ctx, q, "moe_dispatch", run_moe_dispatch, moe_args);
    a->o1 = buf, a->i1 = x, a->i2 = choice, a->i3 = slot;
    size_t tok, exp;
    moe_sizes(ctx, op, dt, S, K, E, C, M, choice, slot, &tok, &exp);
    strict_ref(ctx, op, buf, exp, "buf");
    strict_ref(ctx, op, x, tok, "x");
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_moe_dispatch_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dx, const void *dbuf,
                                            dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, int S, int K,
                                            int E, int C, int M) {
    STRICT_BEGIN(ctx, q, "moe_dispatch_backward", run_moe_dispatch_backward, moe_args);
    a->o1 = dx, a->i1 = dbuf, a->i2 = choice, a->i3 = slot;
    size_t tok, exp;
    moe_sizes(ctx, op, dt, S, K, E, C, M, choice, slot, &tok, &exp);
    strict_ref(ctx, op, dx, tok, "dx");
    strict_ref(ctx, op, dbuf, exp, "dbuf");
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_moe_combine(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *y,
                                  dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, const float *weight,
                                  int S, int K, int E, int C, int M) {
    STRICT_BEGIN(ctx, q, "moe_combine", run_moe_combine, moe_args);
    a->o1 = out, a->i1 = y, a->i2 = choice, a->i3 = slot, a->i4 = weight;
    size_t tok, exp;
    moe_sizes(ctx, op, dt, S, K, E, C, M, choice, slot, &tok, &exp);
    strict_ref(ctx, op, out, tok, "out");
    strict_ref(ctx, op, y, exp, "y");
    strict_ref(ctx, op, weight, op->status ? 0 : Z(S) * Z(K) * F32, "weight");
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_moe_combine_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dy, float *dweight,
                                           const void *dout, const void *y, dsmoe_dtype dt, const int32_t *choice,
                                           const int32_t *slot, const float *weight, int S, int K, int E, int C,
                                           int M) {
    STRICT_BEGIN(ctx, q, "moe_combine_backward", run_moe_combine_backward, moe_args);
    a->o1 = dy, a->o2 = dweight, a->i1 = dout, a->i2 = y, a->i3 = choice, a->i4 = slot, a->i5 = weight;
    size_t tok, exp;
    moe_sizes(ctx, op, dt, S, K, E, C, M, choice, slot, &tok, &exp);
    size_t sk = op->status ? 0 : Z(S) * Z(K) * F32;
    strict_ref(ctx, op, dy, exp, "dy");
    strict_ref(ctx, op, dweight, sk, "dweight");
    strict_ref(ctx, op, dout, tok, "dout");
    strict_ref(ctx, op, y, exp, "y");
    strict_ref(ctx, op, weight, sk, "weight");
    return strict_submit(ctx, q, op);
}

// ---------------------------------------------------------------------------------------------------
// Residual MoE mixing

static dsmoe_status run_residual_mix_forward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(moe_args);
    return CPU(residual_mix_forward)(c->cc, c->cq, a->o1, a->o2, a->i1, a->i2, a->dt, a->i3, a->S, a->M);
}

static dsmoe_status s_residual_mix_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *coef,
                                           const void *moe, const void *mlp, dsmoe_dtype dt, const float *coef_logits,
                                           int S, int M) {
    STRICT_BEGIN(ctx, q, "residual_mix_forward", run_residual_mix_forward, moe_args);
    *a = (moe_args){.o1 = out, .o2 = coef, .i1 = moe, .i2 = mlp, .i3 = coef_logits, .dt = dt, .S = S, .M = M};
    strict_check(ctx, op, S >= 0 && M >= 0, "negative size (S %d, M %d)", S, M);
    strict_dtype(ctx, op, dt, "dt");
    size_t act = Z(S) * Z(M) * ES(dt), co = Z(S) * 2 * F32;
    strict_ref(ctx, op, out, act, "out");
    strict_ref(ctx, op, coef, co, "coef");
    strict_ref(ctx, op, moe, act, "moe");
    strict_ref(ctx, op, mlp, act, "mlp");
    strict_ref(ctx, op, coef_logits, co, "coef_logits");
    return strict_submit(ctx, q, op);
}

typedef struct {
    void *dmoe, *dmlp;
    float *dcoef_logits;
    const void *dout, *moe, *mlp;
    const float *coef;
    dsmoe_dtype dt;
    int S, M;
} mix_bwd_args;

static dsmoe_status run_residual_mix_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(mix_bwd_args);
    return CPU(residual_mix_backward)(c->cc, c->cq, a->dmoe, a->dmlp, a->dcoef_logits, a->dout, a->moe, a->mlp, a->dt,
                                      a->coef, a->S, a->M);
}

static dsmoe_status s_residual_mix_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dmoe, void *dmlp,
                                            float *dcoef_logits, const void *dout, const void *moe, const void *mlp,
                                            dsmoe_dtype dt, const float *coef, int S, int M) {
    STRICT_BEGIN(ctx, q, "residual_mix_backward", run_residual_mix_backward, mix_bwd_args);
    *a = (mix_bwd_args){dmoe, dmlp, dcoef_logits, dout, moe, mlp, coef, dt, S, M};
    strict_check(ctx, op, S >= 0 && M >= 0, "negative size (S %d, M %d)", S, M);
    strict_dtype(ctx, op, dt, "dt");
    size_t act = Z(S) * Z(M) * ES(dt), co = Z(S) * 2 * F32;
    strict_ref(ctx, op, dmoe, act, "dmoe");
    strict_ref(ctx, op, dmlp, act, "dmlp");
    strict_ref(ctx, op, dcoef_logits, co, "dcoef_logits");
    strict_ref(ctx, op, dout, act, "dout");
    strict_ref(ctx, op, moe, act, "moe");
    strict_ref(ctx, op, mlp, act, "mlp");
    strict_ref(ctx, op, coef, co, "coef");
    return strict_submit(ctx, q, op);
}

// ---------------------------------------------------------------------------------------------------
// Inference: caches (B, NH, T_max, D) = B * T_max * M elements; pos (B) int32 device.

typedef struct {
    void *o1, *o2; // kv_append: k_cache, v_cache; attention_cached: out
    const void *qkv, *kc, *vc;
    const int32_t *pos;
    dsmoe_dtype dt;
    int B, T_new, M, NH, T_max;
} kv_args;

static dsmoe_status run_kv_append(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(kv_args);
    return CPU(kv_append)(c->cc, c->cq, a->o1, a->o2, a->qkv, a->dt, a->pos, a->B, a->T_new, a->M, a->NH, a->T_max);
}

static dsmoe_status run_attention_cached(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(kv_args);
    return CPU(attention_cached)(c->cc, c->cq, a->o1, a->qkv, a->kc, a->vc, a->dt, a->pos, a->B, a->T_new, a->M, a->NH,
                                 a->T_max);
}

// Checks the sizes; *cache, *tok: bytes of a cache and of (B*T_new, M).
static void kv_sizes(dsmoe_kernel_ctx *ctx, strict_op *op, const kv_args *a, size_t *cache, size_t *tok) {
    strict_check(ctx, op, a->B >= 0 && a->T_new >= 0 && a->M >= 0 && a->NH >= 1 && a->M % a->NH == 0 && a->T_max >= 0,
                 "bad sizes (B %d, T_new %d, M %d, NH %d, T_max %d)", a->B, a->T_new, a->M, a->NH, a->T_max);
    strict_dtype(ctx, op, a->dt, "dt");
    *cache = op->status ? 0 : Z(a->B) * Z(a->T_max) * Z(a->M) * ES(a->dt);
    *tok = op->status ? 0 : Z(a->B) * Z(a->T_new) * Z(a->M) * ES(a->dt);
    strict_ref(ctx, op, a->pos, op->status ? 0 : Z(a->B) * 4, "pos");
    strict_ref(ctx, op, a->qkv, 3 * *tok, "qkv");
}

static dsmoe_status s_kv_append(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *k_cache, void *v_cache,
                                const void *qkv, dsmoe_dtype dt, const int32_t *pos, int B, int T_new, int M, int NH,
                                int T_max) {
    STRICT_BEGIN(ctx, q, "kv_append", run_kv_append, kv_args);
    *a = (kv_args){.o1 = k_cache, .o2 = v_cache, .qkv = qkv, .pos = pos, .dt = dt, .B = B, .T_new = T_new, .M = M,
                   .NH = NH, .T_max = T_max};
    size_t cache, tok;
    kv_sizes(ctx, op, a, &cache, &tok);
    strict_ref(ctx, op, k_cache, cache, "k_cache");
    strict_ref(ctx, op, v_cache, cache, "v_cache");
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_attention_cached(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *qkv,
                                       const void *k_cache, const void *v_cache, dsmoe_dtype dt, const int32_t *pos,
                                       int B, int T_new, int M, int NH, int T_max) {
    STRICT_BEGIN(ctx, q, "attention_cached", run_attention_cached, kv_args);
    *a = (kv_args){.o1 = out, .qkv = qkv, .kc = k_cache, .vc = v_cache, .pos = pos, .dt = dt, .B = B, .T_new = T_new,
                   .M = M, .NH = NH, .T_max = T_max};
    size_t cache, tok;
    kv_sizes(ctx, op, a, &cache, &tok);
    strict_ref(ctx, op, out, tok, "out");
    strict_ref(ctx, op, k_cache, cache, "k_cache");
    strict_ref(ctx, op, v_cache, cache, "v_cache");
    return strict_submit(ctx, q, op);
}

// sample: the parameters and the (rows) host counters are copied into the closure.
typedef struct {
    int32_t *tokens;
    const void *logits;
    dsmoe_dtype dt;
    int rows, V;
    dsmoe_sampling_params p;
} sample_args;

static dsmoe_status run_sample(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(sample_args);
    return CPU(sample)(c->cc, c->cq, a->tokens, a->logits, a->dt, a->rows, a->V, &a->p, op->extra);
}

static dsmoe_status s_sample(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, int32_t *tokens, const void *logits,
                             dsmoe_dtype dt, int rows, int V, const dsmoe_sampling_params *p, const uint64_t *counters) {
    STRICT_BEGIN(ctx, q, "sample", run_sample, sample_args);
    *a = (sample_args){.tokens = tokens, .logits = logits, .dt = dt, .rows = rows, .V = V};
    strict_check(ctx, op, rows >= 0 && V >= 0, "negative size (rows %d, V %d)", rows, V);
    strict_check(ctx, op, p != NULL && (counters != NULL || rows == 0), "the parameters or counters are NULL");
    strict_dtype(ctx, op, dt, "logits");
    if (op->status == DSMOE_OK) {
        a->p = *p;
        if (rows > 0) {
            op->extra = malloc(Z(rows) * sizeof *counters);
            strict_check(ctx, op, op->extra != NULL, "no host memory for the counters");
            if (op->extra) memcpy(op->extra, counters, Z(rows) * sizeof *counters);
        }
    }
    strict_ref(ctx, op, tokens, op->status ? 0 : Z(rows) * 4, "tokens");
    strict_ref(ctx, op, logits, op->status ? 0 : Z(rows) * Z(V) * ES(dt), "logits");
    return strict_submit(ctx, q, op);
}

// The inference group is all or none: present when the cpu plugin has it; so is the fused gate.
void strict_fill_moe_members(dsmoe_kernel_plugin_v3 *t, const dsmoe_kernel_plugin_v3 *cpu) {
    t->gate_route = s_gate_route;
    t->gate_assign = s_gate_assign;
    t->gate = cpu && cpu->gate ? s_gate : NULL;
    t->gate_backward = s_gate_backward;
    t->moe_dispatch = s_moe_dispatch;
    t->moe_dispatch_backward = s_moe_dispatch_backward;
    t->moe_combine = s_moe_combine;
    t->moe_combine_backward = s_moe_combine_backward;
    t->residual_mix_forward = s_residual_mix_forward;
    t->residual_mix_backward = s_residual_mix_backward;
    int inference = cpu && (cpu->caps & DSMOE_KCAP_INFERENCE) && cpu->kv_append && cpu->attention_cached && cpu->sample;
    t->kv_append = inference ? s_kv_append : NULL;
    t->attention_cached = inference ? s_attention_cached : NULL;
    t->sample = inference ? s_sample : NULL;
}
