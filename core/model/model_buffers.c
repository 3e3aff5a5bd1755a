// core/model/model_buffers.c: the model's buffer table (see model_buffers.h). core/model/model.c allocates and frees
// by it, core/drivers/memplan.c sums it: a buffer added, removed or resized here changes both.
#include "model_buffers.h"
#include "model_internal.h" // struct dsmoe_model, block_acts: the fields the rows point at

#include <stddef.h>

dsmoe_status dsmoe_buffer_row_emit(const dsmoe_buffer_row *r, const uint64_t *d, int layer, dsmoe_buffer_fn fn,
                                   void *ctx, dsmoe_err *err) {
    uint64_t unit = r->unit == DSMOE_UNIT_ACT ? d[DSMOE_D_ACT] : r->unit;
    uint64_t bytes = unit * r->mult * d[r->dim[0]] * d[r->dim[1]] * d[r->dim[2]];
    dsmoe_buffer b = {.name = r->name, .cls = r->cls, .layer = layer, .field = r->field, .bytes = bytes};
    return fn(&b, ctx, err);
}

// ----------------------------------------------------------------------------------------------------
// the table, in allocation order

#define MODEL(f) offsetof(struct dsmoe_model, f)
#define BLOCK(f) offsetof(block_acts, f)
#define ROW DSMOE_BUFFER_ROW
enum { ANY = DSMOE_BLOCK_ANY, DENSE_FFN = DSMOE_BLOCK_DENSE | DSMOE_BLOCK_RESIDUAL_MOE,
       MOE = DSMOE_BLOCK_MOE | DSMOE_BLOCK_RESIDUAL_MOE, RESIDUAL = DSMOE_BLOCK_RESIDUAL_MOE,
       LOWP = DSMOE_MODEL_IF_LOWP, BWD = DSMOE_MODEL_IF_BACKWARD, KD = DSMOE_MODEL_IF_DISTILL,
       A = DSMOE_UNIT_ACT };

static const dsmoe_buffer_row rows[] = {
    //  name (and allocation tag)               class   when       unit, mult, dims    field
    ROW("parameters (local)",                    PARAMS, 0,         4, 1, PARAMS, 1, 1, MODEL(params)),
    ROW("gradients (local)",                     GRADS,  0,         4, 1, PARAMS, 1, 1, MODEL(grads)),
    ROW("GEMM weights (local, bf16)",            PARAMS, LOWP,      2, 1, PARAMS, 1, 1, MODEL(params_lp)),
    ROW("residual stream (L+1, S, M)",           ACT,    0,         A, 1, L1,     S, M, MODEL(resid)),
    // each block (block_acts): the FFN's buffers only where the block has that FFN
    ROW("activation ln1 (S, M)",                 ACT,    ANY,       A, 1, S,      M, 1, BLOCK(ln1)),
    ROW("activation ln1_mean (S)",               ACT,    ANY,       4, 1, S,      1, 1, BLOCK(ln1_mean)),
    ROW("activation ln1_rstd (S)",               ACT,    ANY,       4, 1, S,      1, 1, BLOCK(ln1_rstd)),
    ROW("activation qkv (S, 3M)",                ACT,    ANY,       A, 3, S,      M, 1, BLOCK(qkv)),
    ROW("activation atty (S, M)",                ACT,    ANY,       A, 1, S,      M, 1, BLOCK(atty)),
    ROW("attention state (attention_bytes)",     ACT,    ANY,       1, 1, ATT,    1, 1, BLOCK(att)),
    ROW("activation resid_mid (S, M)",           ACT,    ANY,       A, 1, S,      M, 1, BLOCK(resid_mid)),
    ROW("activation ln2 (S, M)",                 ACT,    ANY,       A, 1, S,      M, 1, BLOCK(ln2)),
    ROW("activation ln2_mean (S)",               ACT,    ANY,       4, 1, S,      1, 1, BLOCK(ln2_mean)),
    ROW("activation ln2_rstd (S)",               ACT,    ANY,       4, 1, S,      1, 1, BLOCK(ln2_rstd)),
    ROW("activation ffn_out (S, M)",             ACT,    ANY,       A, 1, S,      M, 1, BLOCK(ffn_out)),
    ROW("activation fch (S, F)",                 ACT,    DENSE_FFN, A, 1, S,      F, 1, BLOCK(fch)),
    ROW("activation fch_gelu (S, F)",            ACT,    DENSE_FFN, A, 1, S,      F, 1, BLOCK(fch_gelu)),
    ROW("activation mlp_out (S, M)",             ACT,    DENSE_FFN, A, 1, S,      M, 1, BLOCK(mlp_out)),
    ROW("activation moe_out (S, M)",             ACT,    MOE,       A, 1, S,      M, 1, BLOCK(moe_out)),
    ROW("activation coef_logits (S, 2)",         ACT,    RESIDUAL,  4, 2, S,      1, 1, BLOCK(coef_logits)),
    ROW("activation coef (S, 2)",                ACT,    RESIDUAL,  4, 2, S,      1, 1, BLOCK(coef)),
    // the head
    ROW("activation lnf (S, M)",                 ACT,    0,         A, 1, S,      M, 1, MODEL(lnf)),
    ROW("activation lnf_mean (S)",               ACT,    0,         4, 1, S,      1, 1, MODEL(lnf_mean)),
    ROW("activation lnf_rstd (S)",               ACT,    0,         4, 1, S,      1, 1, MODEL(lnf_rstd)),
    ROW("logits (S, V)",                         ACT,    0,         A, 1, S,      V, 1, MODEL(logits)),
    ROW("probabilities (S, V)",                  ACT,    BWD,       4, 1, S,      V, 1, MODEL(probs)),
    ROW("losses (S)",                            ACT,    0,         4, 1, S,      1, 1, MODEL(losses)),
    ROW("distillation losses (S)",               ACT,    KD,        4, 1, S,      1, 1, MODEL(kd_losses)),
    ROW("distillation gradient q - p (S, V)",    ACT,    KD,        4, 1, S,      V, 1, MODEL(kd_diff)),
    // input staging, kernel memory not counted among the model's bytes
    ROW("token ids",                             TOKENS, 0,         4, 1, S,      1, 1, MODEL(tokens)),
    ROW("target ids",                            TOKENS, 0,         4, 1, S,      1, 1, MODEL(targets)),
    ROW("dense FFN row count",                   TOKENS, 0,         4, 1, 1,      1, 1, MODEL(dense_rows)),
    ROW("gradient norm sums (n_moe + 2) double", ACT,    0,         8, 1, NORM,   1, 1, MODEL(norm_dev)),
    ROW("host losses (S)",                       HOST,   0,         4, 1, S,      1, 1, MODEL(host_losses)),
    ROW("host distillation losses (S)",          HOST,   KD,        4, 1, S,      1, 1, MODEL(host_kd_losses)),
    ROW("host gradient norm sums (n_moe + 2)",   HOST,   0,         8, 1, NORM,   1, 1, MODEL(norm_host)),
    // backward scratch, shared by the blocks
    ROW("gradient dresid (S, M)",                ACT,    BWD,       A, 1, S,      M, 1, MODEL(dresid)),
    ROW("gradient dln (S, M)",                   ACT,    BWD,       A, 1, S,      M, 1, MODEL(dln)),
    ROW("gradient datty (S, M)",                 ACT,    BWD,       A, 1, S,      M, 1, MODEL(datty)),
    ROW("gradient dmoe (S, M)",                  ACT,    BWD,       A, 1, S,      M, 1, MODEL(dmoe)),
    ROW("gradient dmlp (S, M)",                  ACT,    BWD,       A, 1, S,      M, 1, MODEL(dmlp)),
    ROW("gradient dqkv (S, 3M)",                 ACT,    BWD,       A, 3, S,      M, 1, MODEL(dqkv)),
    ROW("gradient dfch (S, F)",                  ACT,    BWD,       A, 1, S,      F, 1, MODEL(dfch)),
    ROW("gradient dcoef (S, 2)",                 ACT,    BWD,       4, 2, S,      1, 1, MODEL(dcoef)),
    ROW("gradient dcoef as a GEMM operand (S, 2)", ACT,  LOWP | BWD, A, 2, S,      1, 1, MODEL(dcoef_lp)),
    ROW("attention workspace (attention_bytes)", ACT,    BWD,       1, 1, ATT_WS, 1, 1, MODEL(datt_workspace)),
    ROW("gradient dlogits (S, V)",               ACT,    BWD,       A, 1, S,      V, 1, MODEL(dlogits)),
};
#undef ROW

// ----------------------------------------------------------------------------------------------------
// the walk

static int block_kind(const dsmoe_config *c, int l) {
    int mi = -1;
    if (!dsmoe_config_is_moe_layer(c, l, &mi)) return DSMOE_BLOCK_DENSE;
    return c->residual ? DSMOE_BLOCK_RESIDUAL_MOE : DSMOE_BLOCK_MOE;
}

dsmoe_status dsmoe_model_buffers(const dsmoe_config *c, const dsmoe_model_sizes *z, dsmoe_buffer_fn fn, void *ctx,
                                 dsmoe_err *err) {
    uint64_t d[DSMOE_D_COUNT] = {0};
    d[DSMOE_D_1] = 1;
    d[DSMOE_D_S] = (uint64_t)z->B * (uint64_t)c->seq_len;
    d[DSMOE_D_M] = (uint64_t)c->hidden;
    d[DSMOE_D_F] = (uint64_t)c->ffn_hidden;
    d[DSMOE_D_V] = (uint64_t)c->vocab;
    d[DSMOE_D_L1] = (uint64_t)c->layers + 1;
    d[DSMOE_D_NORM] = (uint64_t)c->n_moe_layers + 2;
    d[DSMOE_D_PARAMS] = z->local_params;
    d[DSMOE_D_ATT] = z->att_saved;
    d[DSMOE_D_ATT_WS] = z->att_ws;
    d[DSMOE_D_ACT] = dsmoe_dtype_size(dsmoe_config_act_dtype(c));
    int lowp = d[DSMOE_D_ACT] != 4;
    const int n = (int)(sizeof rows / sizeof rows[0]);
    for (int i = 0; i < n;) {
        if ((rows[i].when & DSMOE_BLOCK_ANY) == 0) {
            // B = 0 (a model for generation: parameters only) has no gradient slab; its activations are empty.
            // A forward-only model has neither the gradient slab nor the rows a loss or backward needs.
            int grads = rows[i].cls == DSMOE_BUF_GRADS;
            if ((z->B == 0 && grads) || ((rows[i].when & LOWP) && !lowp) ||
                (z->forward_only && (grads || (rows[i].when & BWD))) || ((rows[i].when & KD) && !z->distill)) {
                i++;
                continue;
            }
            DSMOE_TRY(dsmoe_buffer_row_emit(&rows[i++], d, -1, fn, ctx, err));
            continue;
        }
        // A run of block rows: block by block, each block's rows in table order.
        int end = i;
        while (end < n && (rows[end].when & DSMOE_BLOCK_ANY) != 0) end++;
        for (int l = 0; l < c->layers; l++) {
            int kind = block_kind(c, l);
            for (int j = i; j < end; j++)
                if (rows[j].when & kind) DSMOE_TRY(dsmoe_buffer_row_emit(&rows[j], d, l, fn, ctx, err));
        }
        i = end;
    }
    return DSMOE_OK;
}
