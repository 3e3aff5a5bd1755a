// core/model/model.c: the GPT-MoE model (see model.h for the architecture and invariants).
// Layout of this file: parameter table, then buffers, then each block's forward beside its backward,
// then the whole model. The groups and the gradient reduction are in model_parallel.c.
#include "model.h"
#include "model_buffers.h"  // dsmoe_model_buffers: the list of buffers alloc_buffers allocates
#include "model_internal.h" // struct dsmoe_model, dsmoe_model_create_groups

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/rng.h"

// Activations and GEMM operands are of m->dt (run.precision); what is float32 whatever the precision
// (parameters, gradients, layer-norm statistics, the residual MoE's coefficients, probabilities and
// losses) names F32. docs/precision.md has the list and the reasons.
#define F32 DSMOE_FLOAT32

// ----------------------------------------------------------------------------------------------------
// parameters

static uint64_t name_hash(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static dsmoe_status add_tensor(dsmoe_model *m, const char *name, int ndim, const int64_t *shape, int decay,
                               int expert_layer, float init_std, float init_value, dsmoe_err *err) {
    if (m->n_tensors == m->cap_tensors) {
        int cap = m->cap_tensors ? 2 * m->cap_tensors : 64;
        dsmoe_param_tensor *t = realloc(m->tensors, (size_t)cap * sizeof *t);
        if (!t) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for the parameter table");
        m->tensors = t;
        m->cap_tensors = cap;
    }
    dsmoe_param_tensor *t = &m->tensors[m->n_tensors++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    size_t global = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        global *= (size_t)shape[i];
    }
    t->decay = decay;
    t->expert_layer = expert_layer;
    t->init_std = init_std;
    t->init_value = init_value;
    if (expert_layer >= 0) {
        const ep_groups *g = &m->epg[m->epg_of_moe[expert_layer]];
        size_t per_expert = global / (size_t)shape[0];
        size_t e_local = (size_t)shape[0] / (size_t)g->ep;
        t->numel = e_local * per_expert;
        t->shard_begin = (size_t)g->ep_rank * t->numel;
    } else {
        t->numel = global;
        t->shard_begin = 0;
    }
    t->offset = m->n_local;
    m->n_local += t->numel;
    m->n_global += global;
    return DSMOE_OK;
}

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

// Declares every tensor: replicated ones in model order, then expert shards. Names: docs/checkpoint.md.
static dsmoe_status build_table(dsmoe_model *m, dsmoe_err *err) {
    const dsmoe_config *c = m->cfg;
    int M = m->M, F = m->F, V = m->V, T = m->T;
    float std = c->init_std, proj_std = c->init_std / sqrtf(2.0f * (float)m->L);
    char n[96];
    DSMOE_TRY(add_tensor(m, "wte.weight", 2, SHAPE(V, M), 1, -1, std, 0, err));
    DSMOE_TRY(add_tensor(m, "wpe.weight", 2, SHAPE(T, M), 1, -1, std, 0, err));
    for (int l = 0; l < m->L; l++) {
        int mi = m->moe_of_layer[l];
        int dense_ffn = mi < 0 || c->residual;
        m->block_begin[l] = m->n_local;
#define T_(suffix, nd, shp, decay, s, v)                                                           \
    do {                                                                                           \
        snprintf(n, sizeof n, "h.%d.%s", l, suffix);                                               \
        DSMOE_TRY(add_tensor(m, n, nd, shp, decay, -1, s, v, err));                                \
    } while (0)
        T_("ln_1.weight", 1, SHAPE(M), 0, 0, 1);
        T_("ln_1.bias", 1, SHAPE(M), 0, 0, 0);
        T_("attn.c_attn.weight", 2, SHAPE(3 * M, M), 1, std, 0);
        T_("attn.c_attn.bias", 1, SHAPE(3 * M), 0, 0, 0);
        T_("attn.c_proj.weight", 2, SHAPE(M, M), 1, proj_std, 0);
        T_("attn.c_proj.bias", 1, SHAPE(M), 0, 0, 0);
        T_("ln_2.weight", 1, SHAPE(M), 0, 0, 1);
        T_("ln_2.bias", 1, SHAPE(M), 0, 0, 0);
        if (dense_ffn) {
            T_("mlp.c_fc.weight", 2, SHAPE(F, M), 1, std, 0);
            T_("mlp.c_fc.bias", 1, SHAPE(F), 0, 0, 0);
            T_("mlp.c_proj.weight", 2, SHAPE(M, F), 1, proj_std, 0);
            T_("mlp.c_proj.bias", 1, SHAPE(M), 0, 0, 0);
        }
        if (mi >= 0) {
            int E = c->experts[mi];
            T_("moe.gate.weight", 2, SHAPE(E, M), 1, std, 0);
            if (c->residual) {
                T_("moe.coefficient.weight", 2, SHAPE(2, M), 1, std, 0);
                T_("moe.coefficient.bias", 1, SHAPE(2), 0, 0, 0);
            }
        }
#undef T_
    }
    m->block_begin[m->L] = m->n_local;
    DSMOE_TRY(add_tensor(m, "ln_f.weight", 1, SHAPE(M), 0, -1, 0, 1, err));
    DSMOE_TRY(add_tensor(m, "ln_f.bias", 1, SHAPE(M), 0, -1, 0, 0, err));
    m->n_replicated = m->n_local;
    for (int l = 0; l < m->L; l++) {
        int mi = m->moe_of_layer[l];
        if (mi < 0) continue;
        int E = c->experts[mi];
        m->expert_begin[mi] = m->n_local;
#define X_(suffix, nd, shp, decay, s)                                                              \
    do {                                                                                           \
        snprintf(n, sizeof n, "h.%d.moe.experts.%s", l, suffix);                                   \
        DSMOE_TRY(add_tensor(m, n, nd, shp, decay, mi, s, 0, err));                                \
    } while (0)
        X_("c_fc.weight", 3, SHAPE(E, F, M), 1, std);
        X_("c_fc.bias", 2, SHAPE(E, F), 0, 0);
        X_("c_proj.weight", 3, SHAPE(E, M, F), 1, proj_std);
        X_("c_proj.bias", 2, SHAPE(E, M), 0, 0);
        m->expert_end[mi] = m->n_local;
#undef X_
    }
    return DSMOE_OK;
}

static float *tensor_ptr(float *slab, const dsmoe_model *m, const char *name) {
    for (int i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return slab + m->tensors[i].offset;
    return NULL;
}

// Points a block_params view (of params or grads) at the slab.
static void bind_views(dsmoe_model *m, float *slab, block_params *bp, float **wte, float **wpe, float **lnfw,
                       float **lnfb) {
    char n[96];
    *wte = tensor_ptr(slab, m, "wte.weight");
    *wpe = tensor_ptr(slab, m, "wpe.weight");
    *lnfw = tensor_ptr(slab, m, "ln_f.weight");
    *lnfb = tensor_ptr(slab, m, "ln_f.bias");
    for (int l = 0; l < m->L; l++) {
        block_params *b = &bp[l];
#define P_(field, suffix)                                                                          \
    do {                                                                                           \
        snprintf(n, sizeof n, "h.%d.%s", l, suffix);                                               \
        b->field = tensor_ptr(slab, m, n);                                                         \
    } while (0)
        P_(ln1w, "ln_1.weight"); P_(ln1b, "ln_1.bias");
        P_(qkvw, "attn.c_attn.weight"); P_(qkvb, "attn.c_attn.bias");
        P_(attprojw, "attn.c_proj.weight"); P_(attprojb, "attn.c_proj.bias");
        P_(ln2w, "ln_2.weight"); P_(ln2b, "ln_2.bias");
        P_(fcw, "mlp.c_fc.weight"); P_(fcb, "mlp.c_fc.bias");
        P_(fcprojw, "mlp.c_proj.weight"); P_(fcprojb, "mlp.c_proj.bias");
        P_(coefw, "moe.coefficient.weight"); P_(coefb, "moe.coefficient.bias");
        P_(moe.wg, "moe.gate.weight");
        P_(moe.w1, "moe.experts.c_fc.weight"); P_(moe.b1, "moe.experts.c_fc.bias");
        P_(moe.w2, "moe.experts.c_proj.weight"); P_(moe.b2, "moe.experts.c_proj.bias");
#undef P_
    }
}

// The GEMM operand of a weight master w (a view into params): w itself, or its copy in params_lp.
static const void *op_of(const dsmoe_model *m, const float *w) {
    if (!w || m->dt == F32) return w;
    return (const char *)m->params_lp + (size_t)(w - m->params) * m->esz;
}

// Binds the parameter views' GEMM operands (block_params *_op, the MoE weights' w1_lp / w2_lp, wte_op).
static void bind_ops(dsmoe_model *m) {
    for (int l = 0; l < m->L; l++) {
        block_params *b = &m->blocks[l];
        b->qkvw_op = op_of(m, b->qkvw), b->attprojw_op = op_of(m, b->attprojw);
        b->fcw_op = op_of(m, b->fcw), b->fcprojw_op = op_of(m, b->fcprojw), b->coefw_op = op_of(m, b->coefw);
        if (m->dt != F32) b->moe.w1_lp = op_of(m, b->moe.w1), b->moe.w2_lp = op_of(m, b->moe.w2);
    }
    m->wte_op = op_of(m, m->wte);
}

// ----------------------------------------------------------------------------------------------------
// buffers

// Every buffer is assigned before it is read (gradients are zeroed by their users), so none is asked to
// be zeroed: a plugin that poisons fresh memory (tests/plugins/kernel/strict) finds a read before a write.
// The pointer fields are reached by the table's offsets; memcpy, not a (void **) cast, reads and writes
// them, as their types differ (float *, int32_t *, double *, void *).
static char *buffer_field(dsmoe_model *m, const dsmoe_buffer *b) {
    return (b->layer >= 0 ? (char *)&m->acts[b->layer] : (char *)m) + b->field;
}

static dsmoe_status alloc_one(const dsmoe_buffer *b, void *ctx, dsmoe_err *err) {
    dsmoe_model *m = ctx;
    dsmoe_runtime *rt = m->rt;
    void *p = NULL;
    if (b->cls == DSMOE_BUF_HOST) {
        if (rt->kern->host_alloc(rt->kctx, (size_t)b->bytes, &p) != DSMOE_OK)
            return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "kernel plugin '%s': host_alloc of staging buffers: %s",
                                 rt->kern->name, rt->kern->last_error(rt->kctx));
    } else {
        DSMOE_TRY(dsmoe_rt_alloc(rt, (size_t)b->bytes, 0, &p, b->name, err));
        // Token ids are input staging, not counted among the model's buffers (memplan.c counts them apart).
        if (b->cls != DSMOE_BUF_TOKENS) m->bytes_allocated += (size_t)b->bytes;
    }
    memcpy(buffer_field(m, b), &p, sizeof p);
    return DSMOE_OK;
}

static dsmoe_status free_one(const dsmoe_buffer *b, void *ctx, dsmoe_err *err) {
    (void)err;
    dsmoe_model *m = ctx;
    dsmoe_runtime *rt = m->rt;
    if (b->layer >= 0 && !m->acts) return DSMOE_OK; // create failed before the blocks existed
    void *p;
    memcpy(&p, buffer_field(m, b), sizeof p);
    if (b->cls == DSMOE_BUF_HOST) rt->kern->host_free(rt->kctx, p);
    else if (p) rt->kern->free(rt->kctx, p); // params is NULL once generation kept only what it reads
    return DSMOE_OK;
}

// Every buffer of core/model/model_buffers.c's table, attention's sized by the kernel plugin.
static dsmoe_status alloc_buffers(dsmoe_model *m, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    dsmoe_attention_shape ash = {.B = m->B, .T = m->T, .M = m->M, .NH = m->NH, .dt = m->dt};
    size_t att_saved = 0, att_ws = 0;
    dsmoe_status as = rt->kern->attention_bytes(rt->kctx, &ash, &att_saved, &att_ws);
    if (as != DSMOE_OK)
        return dsmoe_err_set(err, as, "kernel plugin '%s': attention_bytes: %s", rt->kern->name,
                             rt->kern->last_error(rt->kctx));
    dsmoe_model_sizes z = {.B = m->B, .forward_only = m->forward_only, .distill = m->distill,
                           .local_params = m->n_local, .att_saved = att_saved, .att_ws = att_ws};
    return dsmoe_model_buffers(m->cfg, &z, alloc_one, m, err);
}

// ----------------------------------------------------------------------------------------------------
// building blocks, each forward beside its backward

// Element i of an activation buffer.
static void *act_at(const dsmoe_model *m, void *p, size_t i) { return (char *)p + i * m->esz; }

// out (S, N) = in (S, K) @ w (N, K)^T + b (N); b may be NULL; w is a GEMM operand (block_params *_op).
// out is of type ot (dt, or float32 for the coefficient logits: accumulated in float32 either way).
static dsmoe_status linear_forward_as(dsmoe_model *m, void *out, dsmoe_dtype ot, const void *in, const void *w,
                                      const float *b, int S, int K, int N, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    KCALL(rt, gemm, 0, 1, S, N, K, 1.0f, in, m->dt, K, w, m->dt, K, 0.0f, out, ot, N);
    if (b) KCALL(rt, bias_add, out, ot, b, S, N);
    return DSMOE_OK;
}
static dsmoe_status linear_forward(dsmoe_model *m, void *out, const void *in, const void *w, const float *b, int S,
                                   int K, int N, dsmoe_err *err) {
    return linear_forward_as(m, out, m->dt, in, w, b, S, K, N, err);
}

// din (S, K) +=, dw (N, K) +=, db (N) += (db may be NULL); din may be NULL. dout, in and din are of dt
// (db's sums read dout_db, float32 for the coefficients, else dout); dw and db are float32.
static dsmoe_status linear_backward_db(dsmoe_model *m, void *din, float *dw, float *db, const void *dout,
                                       const void *dout_db, dsmoe_dtype db_type, const void *in, const void *w,
                                       int S, int K, int N, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    KCALL(rt, gemm, 1, 0, N, K, S, 1.0f, dout, m->dt, N, in, m->dt, K, 1.0f, dw, F32, K);
    if (db) KCALL(rt, bias_backward, db, dout_db, db_type, S, N);
    if (din) KCALL(rt, gemm, 0, 0, S, K, N, 1.0f, dout, m->dt, N, w, m->dt, K, 1.0f, din, m->dt, K);
    return DSMOE_OK;
}
static dsmoe_status linear_backward(dsmoe_model *m, void *din, float *dw, float *db, const void *dout, const void *in,
                                    const void *w, int S, int K, int N, dsmoe_err *err) {
    return linear_backward_db(m, din, dw, db, dout, dout, m->dt, in, w, S, K, N, err);
}

// Why grouped (model_internal.h): the GELU of the dense FFN and its bias (BIAS_GELU) or its derivative
// (DGELU) then run in the GEMM's epilogue, where a plugin fuses them (the cpu plugin per output tile, the
// cuda plugin's cuBLASLt path in the GEMM itself), instead of separate passes over (S, F) that also round a
// bfloat16 c again each; in float32 the cpu plugin gives the separate calls' very bits.
dsmoe_status dsmoe_gemm_one_group(dsmoe_runtime *rt, dsmoe_dtype dt, const int32_t *rows_dev, int rows, void *c,
                                  void *aux, const void *a, const void *w, int trans_w, int n, int k,
                                  dsmoe_epilogue epi, const float *bias, dsmoe_err *err) {
    if (rows == 0) return DSMOE_OK;
    dsmoe_grouped_gemm G = {
        .groups = 1, .counts = rows_dev, .m_max = rows, .n = n, .k = k, .alpha = 1.0f, .beta = 0.0f,
        .a = a, .a_type = dt, .lda = k, .a_stride = (size_t)rows * k,
        .b = w, .b_type = dt, .ldb = trans_w ? k : n, .b_stride = (size_t)n * k, .b_groups = 1, .trans_b = trans_w,
        .c = c, .c_type = dt, .ldc = n, .c_stride = (size_t)rows * n,
        .epilogue = epi, .bias = bias, .bias_stride = (size_t)n, .aux = aux,
    };
    KCALL(rt, gemm_grouped, &G);
    return DSMOE_OK;
}

// Dense FFN: out (S, M) = c_proj(gelu(c_fc(x))). fch keeps c_fc's pre-activation (S, F) for the backward,
// fch_gelu its GELU: both from one grouped GEMM with the BIAS_GELU epilogue.
static dsmoe_status mlp_forward(dsmoe_model *m, const block_params *p, block_acts *a, const void *x, void *out,
                                dsmoe_err *err) {
    DSMOE_TRY(dsmoe_gemm_one_group(m->rt, m->dt, m->dense_rows, m->S, a->fch_gelu, a->fch, x, p->fcw_op, 1, m->F,
                                   m->M, DSMOE_EPI_BIAS_GELU, p->fcb, err));
    DSMOE_TRY(linear_forward(m, out, a->fch_gelu, p->fcprojw_op, p->fcprojb, m->S, m->F, m->M, err));
    return DSMOE_OK;
}

// dfch (S, F) = gelu'(fch) * (dout (S, M) @ c_proj's w (M, F)) in one grouped GEMM (DGELU epilogue, assigns),
// between c_proj's weight gradients and c_fc's.
static dsmoe_status mlp_backward(dsmoe_model *m, const block_params *p, block_params *g, block_acts *a,
                                 const void *x, const void *dout, void *dx, dsmoe_err *err) {
    DSMOE_TRY(linear_backward(m, NULL, g->fcprojw, g->fcprojb, dout, a->fch_gelu, p->fcprojw_op, m->S, m->F, m->M,
                              err));
    DSMOE_TRY(dsmoe_gemm_one_group(m->rt, m->dt, m->dense_rows, m->S, m->dfch, a->fch, dout, p->fcprojw_op, 0, m->F,
                                   m->M, DSMOE_EPI_DGELU, NULL, err));
    DSMOE_TRY(linear_backward(m, dx, g->fcw, g->fcb, m->dfch, x, p->fcw_op, m->S, m->M, m->F, err));
    return DSMOE_OK;
}

// Attention sub-block: resid_mid = x + c_proj(attention(c_attn(ln_1(x)))).
static dsmoe_status attn_forward(dsmoe_model *m, const block_params *p, block_acts *a, const void *x,
                                 dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    int S = m->S, M = m->M;
    KCALL(rt, layernorm_forward, a->ln1, a->ln1_mean, a->ln1_rstd, x, m->dt, p->ln1w, p->ln1b, S, M,
          m->cfg->ln_eps);
    DSMOE_TRY(linear_forward(m, a->qkv, a->ln1, p->qkvw_op, p->qkvb, S, M, 3 * M, err));
    dsmoe_attention_shape ash = {.B = m->B, .T = m->T, .M = M, .NH = m->NH, .dt = m->dt};
    KCALL(rt, attention_forward, a->atty, a->att, a->qkv, &ash);
    DSMOE_TRY(linear_forward(m, a->resid_mid, a->atty, p->attprojw_op, p->attprojb, S, M, M, err));
    KCALL(rt, axpy, a->resid_mid, 1.0f, x, m->dt, (size_t)S * M);
    return DSMOE_OK;
}

// dresid holds d(resid_mid) on entry and d(x) on return.
static dsmoe_status attn_backward(dsmoe_model *m, const block_params *p, block_params *g, block_acts *a,
                                  const void *x, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    int S = m->S, M = m->M;
    size_t SM = (size_t)S * M;
    KCALL(rt, zero, m->datty, SM * m->esz);
    KCALL(rt, zero, m->dqkv, 3 * SM * m->esz);
    KCALL(rt, zero, m->dln, SM * m->esz);
    DSMOE_TRY(linear_backward(m, m->datty, g->attprojw, g->attprojb, m->dresid, a->atty, p->attprojw_op, S, M, M, err));
    dsmoe_attention_shape ash = {.B = m->B, .T = m->T, .M = M, .NH = m->NH, .dt = m->dt};
    KCALL(rt, attention_backward, m->dqkv, m->datt_workspace, m->datty, a->qkv, a->atty, a->att, &ash);
    DSMOE_TRY(linear_backward(m, m->dln, g->qkvw, g->qkvb, m->dqkv, a->ln1, p->qkvw_op, S, M, 3 * M, err));
    // The residual path carries dresid through unchanged; layer norm adds its part.
    KCALL(rt, layernorm_backward, m->dresid, g->ln1w, g->ln1b, m->dln, x, m->dt, p->ln1w, a->ln1_mean, a->ln1_rstd,
          S, M);
    return DSMOE_OK;
}

// FFN sub-block: out = resid_mid + ffn(ln_2(resid_mid)), ffn = dense MLP, MoE, or residual MoE.
static dsmoe_status ffn_forward(dsmoe_model *m, int l, const dsmoe_moe_step *step, void *out, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    const block_params *p = &m->blocks[l];
    block_acts *a = &m->acts[l];
    int S = m->S, M = m->M, mi = m->moe_of_layer[l];
    size_t SM = (size_t)S * M;
    KCALL(rt, layernorm_forward, a->ln2, a->ln2_mean, a->ln2_rstd, a->resid_mid, m->dt, p->ln2w, p->ln2b, S, M,
          m->cfg->ln_eps);
    if (mi < 0) {
        DSMOE_TRY(mlp_forward(m, p, a, a->ln2, a->ffn_out, err));
    } else {
        DSMOE_TRY(dsmoe_moe_forward(m->moe[mi], &p->moe, a->ln2, a->moe_out, step, NULL, err));
        if (m->cfg->residual) {
            DSMOE_TRY(mlp_forward(m, p, a, a->ln2, a->mlp_out, err));
            DSMOE_TRY(linear_forward_as(m, a->coef_logits, F32, a->ln2, p->coefw_op, p->coefb, S, M, 2, err));
            KCALL(rt, residual_mix_forward, a->ffn_out, a->coef, a->moe_out, a->mlp_out, m->dt, a->coef_logits, S,
                  M);
        } else {
            KCALL(rt, copy, a->ffn_out, a->moe_out, SM * m->esz);
        }
    }
    KCALL(rt, copy, out, a->resid_mid, SM * m->esz);
    KCALL(rt, axpy, out, 1.0f, a->ffn_out, m->dt, SM);
    return DSMOE_OK;
}

// dresid holds d(out) on entry and d(resid_mid) on return.
static dsmoe_status ffn_backward(dsmoe_model *m, int l, float daux, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    const block_params *p = &m->blocks[l];
    block_params *g = &m->dblocks[l];
    block_acts *a = &m->acts[l];
    int S = m->S, M = m->M, mi = m->moe_of_layer[l];
    size_t SM = (size_t)S * M;
    KCALL(rt, zero, m->dln, SM * m->esz);
    if (mi < 0) {
        DSMOE_TRY(mlp_backward(m, p, g, a, a->ln2, m->dresid, m->dln, err));
    } else if (!m->cfg->residual) {
        DSMOE_TRY(dsmoe_moe_backward(m->moe[mi], &p->moe, &g->moe, m->dresid, m->dln, daux, err));
    } else {
        KCALL(rt, zero, m->dmoe, SM * m->esz);
        KCALL(rt, zero, m->dmlp, SM * m->esz);
        KCALL(rt, zero, m->dcoef, (size_t)S * 2 * sizeof(float));
        KCALL(rt, residual_mix_backward, m->dmoe, m->dmlp, m->dcoef, m->dresid, a->moe_out, a->mlp_out, m->dt,
              a->coef, S, M);
        // The coefficient GEMMs take dcoef as an operand of dt; its bias sums read the float32 values.
        const void *dcoef = m->dcoef;
        if (m->dt != F32) {
            KCALL(rt, convert, m->dcoef_lp, m->dt, m->dcoef, F32, (size_t)S * 2);
            dcoef = m->dcoef_lp;
        }
        DSMOE_TRY(linear_backward_db(m, m->dln, g->coefw, g->coefb, dcoef, m->dcoef, F32, a->ln2, p->coefw_op, S, M, 2,
                                     err));
        DSMOE_TRY(mlp_backward(m, p, g, a, a->ln2, m->dmlp, m->dln, err));
        DSMOE_TRY(dsmoe_moe_backward(m->moe[mi], &p->moe, &g->moe, m->dmoe, m->dln, daux, err));
    }
    KCALL(rt, layernorm_backward, m->dresid, g->ln2w, g->ln2b, m->dln, a->resid_mid, m->dt, p->ln2w, a->ln2_mean,
          a->ln2_rstd, S, M);
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// the model

static dsmoe_status create(const dsmoe_config *cfg, dsmoe_runtime *rt, int B, int forward_only, dsmoe_model **model,
                           dsmoe_err *err) {
    *model = NULL;
    dsmoe_model *m = calloc(1, sizeof *m);
    if (!m) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory creating the model");
    *model = m;
    m->cfg = cfg;
    m->rt = rt;
    // Stream-ordered comm plugins overlap by construction (each block's allreduce is enqueued after its
    // backward); host-progressed ones need the non-blocking trio.
    m->can_overlap = cfg->overlap_grad_reduce && rt->world_size > 1 &&
                     (rt->stream_ordered || (rt->comm->caps & DSMOE_CCAP_NONBLOCKING));
    m->B = B;
    m->forward_only = forward_only;
    m->distill = !forward_only && B > 0 && dsmoe_config_distills(cfg);
    m->T = cfg->seq_len;
    m->S = B * cfg->seq_len;
    m->M = cfg->hidden;
    m->NH = cfg->heads;
    m->F = cfg->ffn_hidden;
    m->V = cfg->vocab;
    m->L = cfg->layers;
    m->dt = dsmoe_config_act_dtype(cfg);
    m->esz = dsmoe_dtype_size(m->dt);
    if (m->dt != F32 && !(rt->kern->dtypes & DSMOE_DTYPE_BIT(m->dt)))
        return dsmoe_err_set(err, DSMOE_ERR_UNSUPPORTED,
                             "run.precision = bf16: kernel plugin '%s' does not take %s activations; use "
                             "run.precision = fp32 or a plugin that does (cpu)",
                             rt->kern->name, dsmoe_dtype_name(m->dt));
    m->blocks = calloc((size_t)m->L, sizeof *m->blocks);
    m->dblocks = calloc((size_t)m->L, sizeof *m->dblocks);
    m->acts = calloc((size_t)m->L, sizeof *m->acts);
    m->moe_of_layer = calloc((size_t)m->L, sizeof *m->moe_of_layer);
    m->block_begin = calloc((size_t)m->L + 1, sizeof *m->block_begin);
    m->reqs = calloc((size_t)m->L + 1, sizeof *m->reqs);
    m->block_done = calloc((size_t)m->L + 1, sizeof *m->block_done);
    int n_moe = cfg->n_moe_layers;
    m->moe = calloc((size_t)(n_moe ? n_moe : 1), sizeof *m->moe);
    m->moe_stats = calloc((size_t)(n_moe ? n_moe : 1), sizeof *m->moe_stats);
    m->epg = calloc((size_t)(n_moe ? n_moe : 1), sizeof *m->epg);
    m->epg_of_moe = calloc((size_t)(n_moe ? n_moe : 1), sizeof *m->epg_of_moe);
    m->expert_begin = calloc((size_t)(n_moe ? n_moe : 1), sizeof *m->expert_begin);
    m->expert_end = calloc((size_t)(n_moe ? n_moe : 1), sizeof *m->expert_end);
    if (!m->blocks || !m->dblocks || !m->acts || !m->moe_of_layer || !m->block_begin || !m->reqs || !m->block_done || !m->moe ||
        !m->moe_stats || !m->epg ||
        !m->epg_of_moe || !m->expert_begin || !m->expert_end)
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory creating the model: model.layers = %d needs %.3g GB "
                             "of host memory for its per-layer tables alone", m->L,
                             (double)m->L * (double)(2 * sizeof *m->blocks + sizeof *m->acts) / 1e9);
    for (int l = 0; l < m->L; l++) {
        int mi = -1;
        m->moe_of_layer[l] = dsmoe_config_is_moe_layer(cfg, l, &mi) ? mi : -1;
    }
    for (int l = 0; l < m->L && m->can_overlap && !rt->stream_ordered; l++)
        if (rt->kern->event_create(rt->kctx, &m->block_done[l]) != DSMOE_OK)
            return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "kernel plugin '%s': event_create: %s", rt->kern->name,
                                 rt->kern->last_error(rt->kctx));
    DSMOE_TRY(dsmoe_model_create_groups(m, err));
    DSMOE_TRY(build_table(m, err));
    DSMOE_TRY(alloc_buffers(m, err));
    bind_views(m, m->params, m->blocks, &m->wte, &m->wpe, &m->lnfw, &m->lnfb);
    bind_ops(m);
    if (m->grads) bind_views(m, m->grads, m->dblocks, &m->dwte, &m->dwpe, &m->dlnfw, &m->dlnfb);
    for (int l = 0; l < m->L; l++) {
        int mi = m->moe_of_layer[l];
        if (mi < 0) continue;
        const ep_groups *g = &m->epg[m->epg_of_moe[mi]];
        dsmoe_moe_config mc = {
            .S = m->S, .M = m->M, .F = m->F, .E = cfg->experts[mi], .K = cfg->top_k,
            .capacity_factor = cfg->capacity_factor, .eval_capacity_factor = cfg->eval_capacity_factor,
            .min_capacity = cfg->min_capacity, .drop_tokens = cfg->drop_tokens,
            .random_token_selection = cfg->random_token_selection, .noise = cfg->noise,
            .jitter_eps = cfg->jitter_eps, .ep = g->ep, .ep_group = g->ep_g.comm, .ep_ctl = g->ep_g.ctl,
            .alltoall = cfg->alltoall, .ranks_per_node = cfg->ranks_per_node, .aux_scope = cfg->aux_loss_scope,
            .aux_group = rt->world, // data parallelism is over all ranks
            .dt = m->dt,
        };
        DSMOE_TRY(dsmoe_moe_layer_create(rt, &mc, &m->moe[mi], err));
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_create(const dsmoe_config *cfg, dsmoe_runtime *rt, int B, dsmoe_model **model,
                                dsmoe_err *err) {
    return create(cfg, rt, B, 0, model, err);
}

dsmoe_status dsmoe_model_create_forward_only(const dsmoe_config *cfg, dsmoe_runtime *rt, int B, dsmoe_model **model,
                                             dsmoe_err *err) {
    if (B <= 0) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "a forward-only model needs a micro-batch (B = %d)", B);
    return create(cfg, rt, B, 1, model, err);
}

void dsmoe_model_free(dsmoe_model *m) {
    if (!m) return;
    dsmoe_runtime *rt = m->rt;
    for (int i = 0; i < m->cfg->n_moe_layers && m->moe; i++) dsmoe_moe_layer_free(m->moe[i]);
    // Sizes do not matter to a free, only which rows exist (B = 0: no gradient slab).
    dsmoe_model_sizes none = {.B = m->B, .forward_only = m->forward_only, .distill = m->distill};
    // Without the per-block arrays (create failed there) nothing was allocated: no walk over every layer.
    if (m->acts) dsmoe_model_buffers(m->cfg, &none, free_one, m, NULL);
    if (m->params_kept) rt->kern->free(rt->kctx, m->params_kept);
    free(m->held32);
    free(m->heldlp);
    for (int k = 0; m->epg && k < m->n_epg; k++) {
        ep_groups *g = &m->epg[k];
        dsmoe_rt_group_free(rt, &g->ep_g);
        dsmoe_rt_group_free(rt, &g->edp_g);
    }
    free(m->epg);
    free(m->epg_of_moe);
    free(m->expert_begin);
    free(m->expert_end);
    for (int l = 0; m->block_done && l < m->L; l++) rt->kern->event_destroy(rt->kctx, m->block_done[l]);
    free(m->block_done);
    free(m->tensors);
    free(m->blocks);
    free(m->dblocks);
    free(m->acts);
    free(m->moe_of_layer);
    free(m->block_begin);
    free(m->reqs);
    free(m->moe);
    free(m->moe_stats);
    free(m);
}

int dsmoe_model_tensor_count(const dsmoe_model *m) { return m->n_tensors; }
const dsmoe_param_tensor *dsmoe_model_tensor(const dsmoe_model *m, int i) {
    return i >= 0 && i < m->n_tensors ? &m->tensors[i] : NULL;
}
size_t dsmoe_model_local_params(const dsmoe_model *m) { return m->n_local; }
size_t dsmoe_model_global_params(const dsmoe_model *m) { return m->n_global; }
float *dsmoe_model_params(dsmoe_model *m) { return m->params; }
float *dsmoe_model_grads(dsmoe_model *m) { return m->grads; }
size_t dsmoe_model_replicated_params(const dsmoe_model *m) { return m->n_replicated; }
size_t dsmoe_model_bytes(const dsmoe_model *m) { return m->bytes_allocated; }
const dsmoe_config *dsmoe_model_config(const dsmoe_model *m) { return m->cfg; }
dsmoe_runtime *dsmoe_model_runtime(const dsmoe_model *m) { return m->rt; }
const void *dsmoe_model_logits(const dsmoe_model *m) { return m->logits; }
const dsmoe_moe_stats *dsmoe_model_moe_stats(const dsmoe_model *m, int i) {
    return i >= 0 && i < m->cfg->n_moe_layers ? &m->moe_stats[i] : NULL;
}

// On the device: each element is a pure function of (seed, tensor name, global index), so a shard gets
// the same values on any rank layout.
dsmoe_status dsmoe_model_init_params(dsmoe_model *m, uint64_t seed, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    for (int i = 0; i < m->n_tensors; i++) {
        const dsmoe_param_tensor *t = &m->tensors[i];
        dsmoe_init_params ip = {.key = dsmoe_rng_key(seed, 0x1417, name_hash(t->name), 0), .offset = t->shard_begin,
                                .std = t->init_std > 0 ? t->init_std : 0.0f, .value = t->init_value};
        KCALL(rt, init_tensor, m->params + t->offset, t->numel, &ip);
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_forward(dsmoe_model *m, const int32_t *inputs, const int32_t *targets, int training,
                                 uint64_t step_seed, uint64_t token_offset, dsmoe_forward_result *res,
                                 dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    if (m->B == 0) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "model forward: a parameters-only model (B = 0)");
    int S = m->S, M = m->M, V = m->V;
    size_t SM = (size_t)S * M;
    if (!targets && !m->forward_only)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "model forward: no targets (only a forward-only model goes without)");
    for (int s = 0; s < S; s++)
        if (inputs[s] < 0 || inputs[s] >= V || (targets && (targets[s] < 0 || targets[s] >= V)))
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "token %d at position %d is outside the vocabulary [0, %d)",
                                 inputs[s] < 0 || inputs[s] >= V ? inputs[s] : targets[s], s, V);
    KCALL(rt, copy_to_device, m->tokens, inputs, (size_t)S * sizeof(int32_t));
    int32_t dense_rows = S; // ordinary host memory: consumed before copy_to_device returns
    KCALL(rt, copy_to_device, m->dense_rows, &dense_rows, sizeof dense_rows);
    if (targets) KCALL(rt, copy_to_device, m->targets, targets, (size_t)S * sizeof(int32_t));
    if (m->dt != F32) KCALL(rt, convert, m->params_lp, m->dt, m->params, F32, m->n_local);
    KCALL(rt, embedding_forward, m->resid, m->dt, m->tokens, m->wte, F32, m->wpe, NULL, m->B, m->T, M, V, m->T);
    for (int l = 0; l < m->L; l++) {
        void *x = act_at(m, m->resid, (size_t)l * SM);
        DSMOE_TRY(attn_forward(m, &m->blocks[l], &m->acts[l], x, err));
        dsmoe_moe_step step = {
            .training = training,
            .seed = dsmoe_rng_key(step_seed, 0x40e, (uint64_t)l, 0),
            .token_offset = token_offset,
        };
        DSMOE_TRY(ffn_forward(m, l, &step, act_at(m, x, SM), err));
    }
    void *xL = act_at(m, m->resid, (size_t)m->L * SM);
    KCALL(rt, layernorm_forward, m->lnf, m->lnf_mean, m->lnf_rstd, xL, m->dt, m->lnfw, m->lnfb, S, M, m->cfg->ln_eps);
    DSMOE_TRY(linear_forward(m, m->logits, m->lnf, m->wte_op, NULL, S, M, V, err));
    memset(res, 0, sizeof *res);
    res->tokens = S;
    if (m->forward_only) return DSMOE_OK; // the logits are all a teacher gives: nothing to wait for
    KCALL(rt, crossentropy_forward, m->losses, m->probs, m->logits, m->dt, m->targets, S, V);
    m->kd_active = m->teacher_logits != NULL;
    if (m->kd_active) {
        KCALL(rt, distill_forward, m->kd_losses, m->kd_diff, m->logits, m->teacher_logits, m->dt, m->kd_temperature,
              S, V);
        KCALL(rt, copy_to_host, m->host_kd_losses, m->kd_losses, (size_t)S * sizeof(float));
    }
    // The losses and the MoE layers' statistics come back to the host once, after one wait.
    KCALL(rt, copy_to_host, m->host_losses, m->losses, (size_t)S * sizeof(float));
    for (int i = 0; i < m->cfg->n_moe_layers; i++) DSMOE_TRY(dsmoe_moe_stats_copy(m->moe[i], err));
    DSMOE_TRY(dsmoe_rt_wait(rt, err));
    for (int i = 0; i < m->cfg->n_moe_layers; i++) dsmoe_moe_stats_read(m->moe[i], &m->moe_stats[i]);
    for (int s = 0; s < S; s++) res->loss_sum += m->host_losses[s];
    for (int s = 0; m->kd_active && s < S; s++) res->kd_sum += m->host_kd_losses[s];
    for (int i = 0; i < m->cfg->n_moe_layers; i++) {
        res->aux_sum += m->moe_stats[i].aux_loss;
        res->routed += m->moe_stats[i].routed;
        res->dropped += m->moe_stats[i].dropped;
    }
    m->has_forward = 1;
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_backward(dsmoe_model *m, float dloss, float daux, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    if (m->forward_only) return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "model backward of a forward-only model");
    if (!m->has_forward) return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "model backward without a forward");
    int S = m->S, M = m->M, V = m->V;
    size_t SM = (size_t)S * M;
    KCALL(rt, zero, m->dlogits, (size_t)S * V * m->esz);
    KCALL(rt, crossentropy_backward, m->dlogits, m->dt, m->probs, m->targets, dloss, S, V);
    // d (weight * KL) / d logits = weight * (q - p) / T.
    if (m->kd_active) KCALL(rt, distill_backward, m->dlogits, m->dt, m->kd_diff, m->kd_weight / m->kd_temperature, S, V);
    KCALL(rt, zero, m->dln, SM * m->esz);
    DSMOE_TRY(linear_backward(m, m->dln, m->dwte, NULL, m->dlogits, m->lnf, m->wte_op, S, M, V, err));
    KCALL(rt, zero, m->dresid, SM * m->esz);
    void *xL = act_at(m, m->resid, (size_t)m->L * SM);
    KCALL(rt, layernorm_backward, m->dresid, m->dlnfw, m->dlnfb, m->dln, xL, m->dt, m->lnfw, m->lnf_mean, m->lnf_rstd,
          S, M);
    int overlap = m->can_overlap && m->reduce_in_backward;
    for (int l = m->L - 1; l >= 0; l--) {
        DSMOE_TRY(ffn_backward(m, l, daux, err));
        DSMOE_TRY(attn_backward(m, &m->blocks[l], &m->dblocks[l], &m->acts[l], act_at(m, m->resid, (size_t)l * SM),
                                err));
        if (!overlap) continue;
        // Block l's gradients are final for this step once its backward has run (nothing later in the
        // backward touches them).
        if (rt->stream_ordered) { // enqueued behind the block's backward; the queue orders it
            size_t first = m->block_begin[l], n = m->block_begin[l + 1] - first;
            CCOLL(rt, allreduce, rt->world, DSMOE_IN_PLACE, m->grads + first, n, DSMOE_FLOAT32, DSMOE_SUM);
            m->n_started++;
            continue;
        }
        // Host-progressed: an event marks the end of block l's backward; blocks start when it completes.
        dsmoe_status rs = rt->kern->event_record(rt->kctx, m->block_done[l], rt->q);
        if (rs != DSMOE_OK)
            return dsmoe_err_set(err, rs, "kernel plugin '%s': event_record: %s", rt->kern->name,
                                 rt->kern->last_error(rt->kctx));
        m->n_recorded++;
        DSMOE_TRY(dsmoe_model_start_block_reductions(m, 0, err));
    }
    KCALL(rt, embedding_backward, m->dwte, m->dwpe, m->dresid, m->dt, m->tokens, m->B, m->T, M, V);
    m->has_forward = 0;
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_set_teacher(dsmoe_model *m, const void *teacher_logits, float temperature, float weight,
                                     dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    if (teacher_logits && !m->distill)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "model: distillation asked of a model built without its buffers");
    if (teacher_logits && !rt->kern->distill_forward)
        return dsmoe_err_set(err, DSMOE_ERR_UNSUPPORTED, "kernel plugin '%s' has no distillation ops (distill_forward, "
                             "DSMOE_KCAP_DISTILL): distill.teacher needs a plugin that has them (cpu)", rt->kern->name);
    if (teacher_logits && !(temperature > 0))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "model: distillation temperature %g: expected > 0", (double)temperature);
    m->teacher_logits = teacher_logits;
    m->kd_temperature = temperature;
    m->kd_weight = weight;
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_zero_grads(dsmoe_model *m, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    if (!m->grads) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "model: a parameters-only model has no gradients");
    KCALL(rt, zero, m->grads, m->n_local * sizeof(float));
    return DSMOE_OK;
}
