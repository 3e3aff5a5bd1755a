// core/model/model_infer.c: the model's forward for new tokens over a KV cache (see model_infer.h).
// Layout of this file: the state and its buffers, then one block (attention over the cache, the FFN),
// then the whole forward and sampling. The math mirrors model.c's forward op for op.
//
// Tensor slicing (width W = generate.tensor_parallel, this rank's part t): attention keeps heads
// [t*NH/W, (t+1)*NH/W) — their rows of c_attn (Megatron's column-parallel Linear) and columns of c_proj
// (row-parallel: a partial sum, all-reduced over the tensor group before the bias); the dense FFN likewise
// keeps F/W hidden columns. The slices are copies the state owns (model_slices.c), taken at create, after
// which the model frees its whole sliced weights: a rank holds 1/W of them. Every rank of a tensor group
// holds the same tokens, so the replicated parts (embedding, layer norms, residual coefficients, the
// head) give the same bits on each. The coordinated all-to-all: in a MoE layer tensor rank t takes
// only rows [t*q, (t+1)*q), q = ceil(rows/W), through gate, exchange and experts, and the tensor group
// all-gathers the outputs. Expert-slicing instead: every tensor rank runs every row, on its F/W columns
// of each local expert (slices too: rows of w1 and b1, columns of w2; b2 on tensor rank 0 only), and
// the group sums the partial outputs: the router, and so the routing, is the same on every tensor rank.
#include "model_infer.h"
#include "model_buffers.h"  // dsmoe_moe_buffers: the MoE layers' buffer tables (for the estimate)
#include "model_internal.h" // struct dsmoe_model: parameters, groups, layer kinds

#include <stdlib.h>
#include <string.h>

#define F32 DSMOE_FLOAT32

// Precision: activations, the KV cache and the GEMMs' weight operands are of the model's dt
// (run.precision); in bfloat16 the weights are the model's bfloat16 copy (params_lp), taken once at
// create, and so are the tensor slices of them. The tensor group's partial sums are float32 whatever dt:
// the row-parallel GEMMs write them to a float32 staging buffer (sum32), all-reduced, then narrowed once;
// expert-slicing's partial outputs come out of the MoE layer in dt and are widened for the sum.

struct dsmoe_infer {
    dsmoe_model *m;
    dsmoe_runtime *rt;
    int slots, t_max, R; // sequences, positions per sequence, rows per call
    int M, NH, F, V, L;
    int W, t;            // tensor-slicing width and this rank's part
    int NHt, Mt, Ft;     // this rank's heads, their width (NHt * D) and FFN columns
    int coordinated;     // W > 1 and the MoE layers split the rows over the tensor group
    int sliced;          // W > 1 and every expert's FFN is split over the tensor group
    dsmoe_slices sl;     // W > 1: this rank's slices of the sliced weights (model_internal.h)
    int Rm;              // rows a MoE layer runs per call (R, or ceil(R / W) when coordinated)
    dsmoe_rt_group tp;   // the tensor group (W > 1)
    int *len;            // (slots) host: positions cached
    dsmoe_moe_layer **moe; // (n_moe) layers sized for Rm rows, sharing the model's EP groups; MoE layers of
                           // the same experts and ep share one (its buffers serve them in turn: weights
                           // come with each call)
    int *moe_owner;        // (n_moe) 1 where moe[i] is first of its kind (freed once)

    dsmoe_dtype dt;      // the model's activation dtype
    size_t esz;          // its size

    // kernel memory (void *: elements of dt; float *: float32)
    void **k_cache, **v_cache; // (L) each (slots, NHt, t_max, D)
    float *sum32;         // (R, M) W > 1: partial sums of the tensor group, float32
    void *x, *mid;        // (R, M) residual stream in, and after attention
    void *ln, *ffn_out, *moe_out, *mlp_out; // (R, M); moe_out (W * Rm, M) when coordinated
    void *moe_share;      // (Rm, M) coordinated: this tensor rank's MoE outputs, before the all-gather
    void *atty;           // (R, Mt)
    void *qkv;            // (R, 3Mt)
    void *fch, *fch_gelu; // (R, Ft)
    float *coef_logits, *coef; // (R, 2)
    void *last, *lnf;     // (slots, M) each sequence's last row, and its final layer norm
    void *logits;         // (slots, V)
    int32_t *tokens;      // (R)
    int32_t *ffn_rows;    // (1) this call's rows: the count of the dense FFN's one-group GEMM
    int32_t *pos;         // (slots) position of each sequence's first new token
    int32_t *sampled;     // (slots)
    int32_t *host_pos;    // (slots) ordinary host memory: copy_to_device consumes it at the call
    int32_t *host_sampled; // (slots) host_alloc
    int n_last;           // sequences of the last forward
    size_t bytes;
};

// ----------------------------------------------------------------------------------------------------
// state

// Element i of an activation buffer.
static void *at(const dsmoe_infer *s, void *p, size_t i) { return (char *)p + i * s->esz; }

static dsmoe_status alloc_dev(dsmoe_infer *s, size_t bytes, void *field, const char *what, dsmoe_err *err) {
    void *p = NULL;
    DSMOE_TRY(dsmoe_rt_alloc(s->rt, bytes ? bytes : 1, 0, &p, what, err));
    memcpy(field, &p, sizeof p);
    s->bytes += bytes;
    return DSMOE_OK;
}

static dsmoe_status alloc_host(dsmoe_infer *s, size_t bytes, void *field, dsmoe_err *err) {
    void *p = NULL;
    if (s->rt->kern->host_alloc(s->rt->kctx, bytes, &p) != DSMOE_OK)
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "inference: host_alloc of %zu bytes with kernel plugin '%s': %s",
                             bytes, s->rt->kern->name, s->rt->kern->last_error(s->rt->kctx));
    memcpy(field, &p, sizeof p);
    return DSMOE_OK;
}

dsmoe_status dsmoe_infer_create(dsmoe_model *m, int slots, int t_max, int max_rows, int tensor_parallel,
                                int moe_mode, dsmoe_infer **out, dsmoe_err *err) {
    *out = NULL;
    const dsmoe_config *cfg = m->cfg;
    if (slots < 1 || max_rows < 1 || t_max < 1 || t_max > cfg->seq_len)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: %d slots of %d positions, %d rows a call: expected "
                             "slots, rows >= 1 and 1 <= positions <= model.seq_len (%d)", slots, t_max, max_rows,
                             cfg->seq_len);
    int W = tensor_parallel;
    if (W < 1 || m->rt->world_size % W || cfg->heads % W || cfg->ffn_hidden % W)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: tensor slicing over %d ranks: it must divide the %d "
                             "ranks, model.heads (%d) and model.ffn_hidden (%d)", W, m->rt->world_size, cfg->heads,
                             cfg->ffn_hidden);
    if (m->slice_W)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: the model's sliced weights went to an earlier "
                             "inference state (tensor slicing over %d ranks): it holds only their slices", m->slice_W);
    if (W > 1 && m->B != 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: tensor slicing over %d ranks frees the model's whole "
                             "sliced weights: it needs a parameters-only model (B = 0), not one that trains", W);
    dsmoe_infer *s = calloc(1, sizeof *s);
    if (!s) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "inference: out of memory");
    *out = s;
    s->m = m;
    s->rt = m->rt;
    s->dt = m->dt;
    s->esz = m->esz;
    // The weights' dt copy, once: generation does not change them.
    // (After dsmoe_model_drop_gemm_masters the masters are gone and the copy is already current.)
    if (s->dt != F32 && m->params) KCALL(s->rt, convert, m->params_lp, s->dt, m->params, F32, m->n_local);
    s->slots = slots;
    s->t_max = t_max;
    s->R = max_rows;
    s->M = m->M, s->NH = m->NH, s->F = m->F, s->V = m->V, s->L = m->L;
    s->W = W;
    s->t = m->rt->slot % W;
    s->NHt = m->NH / W, s->Mt = m->M / W, s->Ft = m->F / W;
    s->coordinated = W > 1 && moe_mode == DSMOE_TENSOR_MOE_COORDINATED;
    s->sliced = W > 1 && moe_mode == DSMOE_TENSOR_MOE_SLICED;
    s->Rm = s->coordinated ? (max_rows + W - 1) / W : max_rows;
    int n_moe = cfg->n_moe_layers;
    s->len = calloc((size_t)slots, sizeof *s->len);
    s->host_pos = calloc((size_t)slots, sizeof *s->host_pos);
    s->moe = calloc((size_t)(n_moe ? n_moe : 1), sizeof *s->moe);
    s->moe_owner = calloc((size_t)(n_moe ? n_moe : 1), sizeof *s->moe_owner);
    s->k_cache = calloc((size_t)s->L, sizeof *s->k_cache);
    s->v_cache = calloc((size_t)s->L, sizeof *s->v_cache);
    if (!s->len || !s->host_pos || !s->moe || !s->moe_owner || !s->k_cache || !s->v_cache)
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "inference: out of memory");
    if (W > 1) // collective over the world: the tensor groups are consecutive slots
        DSMOE_TRY(dsmoe_rt_group_split(s->rt, m->rt->slot / W, m->rt->slot, &s->tp, err));

    size_t R = (size_t)max_rows, M = (size_t)s->M, Mt = (size_t)s->Mt, Ft = (size_t)s->Ft, V = (size_t)s->V,
           B = (size_t)slots;
    size_t E = s->esz;
    size_t cache = B * Mt * (size_t)t_max * E; // (slots, NHt, t_max, D)
    for (int l = 0; l < s->L; l++) {
        DSMOE_TRY(alloc_dev(s, cache, &s->k_cache[l], "KV cache keys (slots, NH, T, D)", err));
        DSMOE_TRY(alloc_dev(s, cache, &s->v_cache[l], "KV cache values (slots, NH, T, D)", err));
    }
    if (W > 1) DSMOE_TRY(alloc_dev(s, R * M * sizeof(float), &s->sum32, "tensor-group partial sums (R, M)", err));
    size_t RM = R * M * E;
    DSMOE_TRY(alloc_dev(s, RM, &s->x, "inference residual (R, M)", err));
    DSMOE_TRY(alloc_dev(s, RM, &s->mid, "inference residual after attention (R, M)", err));
    DSMOE_TRY(alloc_dev(s, RM, &s->ln, "inference layer norm (R, M)", err));
    DSMOE_TRY(alloc_dev(s, R * Mt * E, &s->atty, "inference attention output (R, Mt)", err));
    DSMOE_TRY(alloc_dev(s, RM, &s->ffn_out, "inference FFN output (R, M)", err));
    DSMOE_TRY(alloc_dev(s, (size_t)W * (size_t)s->Rm * M * E, &s->moe_out, "inference MoE output (R, M)", err));
    DSMOE_TRY(alloc_dev(s, RM, &s->mlp_out, "inference MLP output (R, M)", err));
    if (s->coordinated)
        DSMOE_TRY(alloc_dev(s, (size_t)s->Rm * M * E, &s->moe_share, "inference MoE share (R/W, M)", err));
    DSMOE_TRY(alloc_dev(s, 3 * R * Mt * E, &s->qkv, "inference qkv (R, 3Mt)", err));
    DSMOE_TRY(alloc_dev(s, R * Ft * E, &s->fch, "inference fc (R, Ft)", err));
    DSMOE_TRY(alloc_dev(s, R * Ft * E, &s->fch_gelu, "inference gelu (R, Ft)", err));
    DSMOE_TRY(alloc_dev(s, R * 2 * sizeof(float), &s->coef_logits, "inference coefficient logits (R, 2)", err));
    DSMOE_TRY(alloc_dev(s, R * 2 * sizeof(float), &s->coef, "inference coefficients (R, 2)", err));
    DSMOE_TRY(alloc_dev(s, B * M * E, &s->last, "inference last rows (slots, M)", err));
    DSMOE_TRY(alloc_dev(s, B * M * E, &s->lnf, "inference final layer norm (slots, M)", err));
    DSMOE_TRY(alloc_dev(s, B * V * E, &s->logits, "inference logits (slots, V)", err));
    DSMOE_TRY(alloc_dev(s, R * sizeof(int32_t), &s->tokens, "inference token ids (R)", err));
    DSMOE_TRY(alloc_dev(s, sizeof(int32_t), &s->ffn_rows, "inference FFN row count", err));
    DSMOE_TRY(alloc_dev(s, B * sizeof(int32_t), &s->pos, "inference positions (slots)", err));
    DSMOE_TRY(alloc_dev(s, B * sizeof(int32_t), &s->sampled, "inference sampled ids (slots)", err));
    DSMOE_TRY(alloc_host(s, B * sizeof(int32_t), &s->host_sampled, err));

    // The MoE layers, sized for Rm rows, on the model's groups (collective over each EP group); one per
    // distinct (experts, ep), in the same order on every rank.
    for (int l = 0; l < s->L; l++) {
        int mi = m->moe_of_layer[l], same = -1;
        if (mi < 0) continue;
        for (int j = 0; j < mi && same < 0; j++)
            if (cfg->experts[j] == cfg->experts[mi] && m->epg_of_moe[j] == m->epg_of_moe[mi]) same = j;
        if (same >= 0) {
            s->moe[mi] = s->moe[same];
            continue;
        }
        s->moe_owner[mi] = 1;
        const ep_groups *g = &m->epg[m->epg_of_moe[mi]];
        dsmoe_moe_config mc = {
            .S = s->Rm, .M = s->M, .F = s->sliced ? s->Ft : s->F, .E = cfg->experts[mi], .K = cfg->top_k,
            .capacity_factor = cfg->capacity_factor, .eval_capacity_factor = cfg->eval_capacity_factor,
            .min_capacity = cfg->min_capacity, .drop_tokens = 1, .random_token_selection = 0,
            .noise = cfg->noise, .jitter_eps = cfg->jitter_eps, .ep = g->ep, .ep_group = g->ep_g.comm,
            .ep_ctl = g->ep_g.ctl, .alltoall = cfg->alltoall, .ranks_per_node = cfg->ranks_per_node,
            .aux_scope = DSMOE_AUX_SCOPE_RANK, .aux_group = NULL, .dt = s->dt,
        };
        DSMOE_TRY(dsmoe_moe_layer_create(s->rt, &mc, &s->moe[mi], err));
    }
    // Tensor slicing: this rank's slices, copied from the whole weights; then the model frees what it
    // held of them whole (the peak is here: the whole weights and the slices).
    if (W > 1) {
        DSMOE_TRY(dsmoe_slices_take(m, W, s->t, s->sliced, &s->sl, err));
        s->bytes += s->sl.bytes;
        DSMOE_TRY(dsmoe_model_keep_unsliced(m, W, s->sliced, err));
    }
    return DSMOE_OK;
}

static void free_dev(dsmoe_infer *s, void *p) {
    if (p) s->rt->kern->free(s->rt->kctx, p);
}

void dsmoe_infer_free(dsmoe_infer *s) {
    if (!s) return;
    for (int i = 0; s->moe && s->moe_owner && i < s->m->cfg->n_moe_layers; i++)
        if (s->moe_owner[i]) dsmoe_moe_layer_free(s->moe[i]);
    for (int l = 0; l < s->L; l++) {
        if (s->k_cache) free_dev(s, s->k_cache[l]);
        if (s->v_cache) free_dev(s, s->v_cache[l]);
    }
    dsmoe_slices_free(s->rt, s->dt, &s->sl);
    if (s->W > 1) dsmoe_rt_group_free(s->rt, &s->tp);
    void *dev[] = {s->sum32, s->x, s->mid, s->ln, s->atty, s->ffn_out, s->moe_out, s->moe_share, s->mlp_out, s->qkv, s->fch,
                   s->fch_gelu,
                   s->coef_logits, s->coef, s->last, s->lnf, s->logits, s->tokens, s->ffn_rows, s->pos, s->sampled};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) free_dev(s, dev[i]);
    if (s->host_sampled) s->rt->kern->host_free(s->rt->kctx, s->host_sampled);
    free(s->k_cache);
    free(s->v_cache);
    free(s->moe);
    free(s->moe_owner);
    free(s->len);
    free(s->host_pos);
    free(s);
}

size_t dsmoe_infer_bytes(const dsmoe_infer *s) { return s->bytes; }
size_t dsmoe_infer_slice_bytes(const dsmoe_infer *s) { return s->sl.bytes; }

static dsmoe_status add_bytes(const dsmoe_buffer *b, void *ctx, dsmoe_err *err) {
    (void)err;
    *(uint64_t *)ctx += b->bytes;
    return DSMOE_OK;
}

// The same sizes dsmoe_infer_create allocates, in its order (tests/model/test_infer.c compares them).
void dsmoe_infer_estimate(const dsmoe_config *c, int slots, int t_max, int max_rows, int W, int moe_mode,
                          dsmoe_infer_sizes *z) {
    uint64_t R = (uint64_t)max_rows, M = (uint64_t)c->hidden, Mt = M / (uint64_t)W, Ft = (uint64_t)c->ffn_hidden / W,
             V = (uint64_t)c->vocab, B = (uint64_t)slots, L = (uint64_t)c->layers, f = sizeof(float),
             a = dsmoe_dtype_size(dsmoe_config_act_dtype(c)); // activations and the cache
    int coord = W > 1 && moe_mode == DSMOE_TENSOR_MOE_COORDINATED, sliced = W > 1 && moe_mode == DSMOE_TENSOR_MOE_SLICED;
    uint64_t Rm = coord ? (R + (uint64_t)W - 1) / (uint64_t)W : R;
    memset(z, 0, sizeof *z);
    z->moe_rows = (int)Rm;
    z->cache_bytes = L * 2 * B * Mt * (uint64_t)t_max * a;
    z->slice_bytes = dsmoe_slices_bytes(c, W, sliced);
    z->row_bytes = (3 * R * M + R * Mt + R * M + (uint64_t)W * Rm * M + R * M + (coord ? Rm * M : 0) + 3 * R * Mt +
                    2 * R * Ft + 2 * B * M + B * V) * a + 2 * R * 2 * f +
                   (R + 1) * sizeof(int32_t) + 2 * B * sizeof(int32_t);
    if (W > 1) z->row_bytes += R * M * f; // the tensor group's float32 partial sums (R, M)
    for (int i = 0; i < c->n_moe_layers; i++) {
        int seen = 0;
        for (int j = 0; j < i; j++) seen |= c->experts[j] == c->experts[i] && c->expert_parallel[j] == c->expert_parallel[i];
        if (seen) continue; // shares the earlier layer's buffers
        dsmoe_moe_sizes ms = {.S = Rm, .M = M, .F = sliced ? Ft : (uint64_t)c->ffn_hidden, .E = (uint64_t)c->experts[i],
                              .K = (uint64_t)c->top_k, .jitter = 0, .C = Rm, .act_bytes = (int)a};
        // The capacity buffers hold E_local per source rank: (ep, E_local, C, .) = (E, C, .) on every rank.
        dsmoe_moe_buffers(DSMOE_MOE_ROUTER, &ms, add_bytes, &z->moe_bytes, NULL);
        dsmoe_moe_buffers(DSMOE_MOE_CAPACITY, &ms, add_bytes, &z->moe_bytes, NULL);
    }
}
void dsmoe_infer_reset(dsmoe_infer *s, int slot) {
    if (slot >= 0 && slot < s->slots) s->len[slot] = 0;
}
int dsmoe_infer_length(const dsmoe_infer *s, int slot) { return slot >= 0 && slot < s->slots ? s->len[slot] : -1; }
const void *dsmoe_infer_logits(const dsmoe_infer *s) { return s->logits; }

// ----------------------------------------------------------------------------------------------------
// one block

// A profiled forward waits and adds the seconds since *t0 to *part.
static dsmoe_status part_done(const dsmoe_infer *s, int profile, double *part, double *t0, dsmoe_err *err) {
    if (!profile) return DSMOE_OK;
    DSMOE_TRY(dsmoe_rt_wait(s->rt, err));
    double now = dsmoe_now_seconds();
    *part += now - *t0;
    *t0 = now;
    return DSMOE_OK;
}

// out (rows, N) = in (rows, K) @ w (N, K)^T + b (N); b may be NULL. in is of dt, out of ot (dt, or
// float32 for the coefficient logits); w a GEMM operand of dt.
static dsmoe_status linear_as(dsmoe_infer *s, void *out, dsmoe_dtype ot, const void *in, const void *w,
                              const float *b, int rows, int K, int N, dsmoe_err *err) {
    dsmoe_runtime *rt = s->rt;
    KCALL(rt, gemm, 0, 1, rows, N, K, 1.0f, in, s->dt, K, w, s->dt, K, 0.0f, out, ot, N);
    if (b) KCALL(rt, bias_add, out, ot, b, rows, N);
    return DSMOE_OK;
}
static dsmoe_status linear(dsmoe_infer *s, void *out, const void *in, const void *w, const float *b, int rows, int K,
                           int N, dsmoe_err *err) {
    return linear_as(s, out, s->dt, in, w, b, rows, K, N, err);
}

// A row-parallel GEMM's output: out (rows, N) of dt = in (rows, Kt) @ w (N, Kt)^T, w this rank's slice
// (the whole weight when W = 1), summed over the tensor group in float32 when W > 1.
static dsmoe_status row_parallel(dsmoe_infer *s, void *out, const void *in, const void *w, int rows, int Kt, int N,
                                 dsmoe_err *err) {
    dsmoe_runtime *rt = s->rt;
    if (s->W == 1) {
        KCALL(rt, gemm, 0, 1, rows, N, Kt, 1.0f, in, s->dt, Kt, w, s->dt, Kt, 0.0f, out, s->dt, N);
        return DSMOE_OK;
    }
    KCALL(rt, gemm, 0, 1, rows, N, Kt, 1.0f, in, s->dt, Kt, w, s->dt, Kt, 0.0f, s->sum32, F32, N);
    if (rows > 0) CCOLL(rt, allreduce, s->tp.comm, DSMOE_IN_PLACE, s->sum32, (size_t)rows * N, F32, DSMOE_SUM);
    if (s->dt == F32) KCALL(rt, copy, out, s->sum32, (size_t)rows * N * sizeof(float));
    else KCALL(rt, convert, out, s->dt, s->sum32, F32, (size_t)rows * N);
    return DSMOE_OK;
}

// mid (rows, M) = x + c_proj(attention over the cache(c_attn(ln_1(x)))); sequence i's rows append to its
// slot's cache first, then attend to positions 0 .. their own. Sequences in consecutive slots with as many
// new rows each (a decode step's batch) go in one call: their caches are one (B, NHt, T, D) block, their
// rows and positions consecutive. One call per sequence would leave a GPU all but idle: a decode step's
// call has NHt blocks of work, and a batch of 64 made 64 such calls one after another on the queue.
static dsmoe_status attn_block(dsmoe_infer *s, int l, int n, const int *slot, const int *count, int rows,
                               dsmoe_err *err) {
    dsmoe_runtime *rt = s->rt;
    const block_params *p = &s->m->blocks[l];
    const dsmoe_block_slices *b = s->W > 1 ? &s->sl.blocks[l] : NULL; // this rank's heads, else the whole weights
    int M = s->M, Mt = s->Mt, NHt = s->NHt, T = s->t_max;
    size_t per_slot = (size_t)NHt * (size_t)T * (size_t)(M / s->NH); // one slot's (NHt, T, D)
    KCALL(rt, layernorm_forward, s->ln, NULL, NULL, s->x, s->dt, p->ln1w, p->ln1b, rows, M, s->m->cfg->ln_eps);
    DSMOE_TRY(linear(s, s->qkv, s->ln, b ? b->qkvw : p->qkvw_op, b ? b->qkvb : p->qkvb, rows, M, 3 * Mt, err));
    for (int i = 0, r0 = 0, j; i < n; r0 += (j - i) * count[i], i = j) {
        for (j = i + 1; j < n && count[j] == count[i] && slot[j] == slot[i] + (j - i); j++) {}
        void *k = at(s, s->k_cache[l], (size_t)slot[i] * per_slot), *v = at(s, s->v_cache[l], (size_t)slot[i] * per_slot);
        const void *qkv = at(s, s->qkv, (size_t)r0 * 3 * Mt);
        KCALL(rt, kv_append, k, v, qkv, s->dt, &s->pos[i], j - i, count[i], Mt, NHt, T);
        KCALL(rt, attention_cached, at(s, s->atty, (size_t)r0 * Mt), qkv, k, v, s->dt, &s->pos[i], j - i, count[i],
              Mt, NHt, T);
    }
    // c_proj over this rank's Mt input columns (row-parallel): mid = atty_t @ attprojw[:, t*Mt:(t+1)*Mt]^T,
    // summed over the tensor group, then the bias once and the residual.
    DSMOE_TRY(row_parallel(s, s->mid, s->atty, b ? b->attprojw : p->attprojw_op, rows, Mt, M, err));
    KCALL(rt, bias_add, s->mid, s->dt, p->attprojb, rows, M);
    KCALL(rt, axpy, s->mid, 1.0f, s->x, s->dt, (size_t)rows * M);
    return DSMOE_OK;
}

// Dense FFN of block l: out (rows, M) = c_proj(gelu(c_fc(in))); with tensor slicing this rank's Ft hidden
// columns (its slices: rows of c_fc, columns of c_proj), the partial outputs summed over the tensor group.
// c_fc with its bias and GELU is one grouped GEMM of one group (the BIAS_GELU epilogue), as in training
// (core/model/model.c), so that both round a bfloat16 activation alike; its count is s->ffn_rows.
static dsmoe_status mlp(dsmoe_infer *s, int l, const void *in, void *out, int rows, dsmoe_err *err) {
    dsmoe_runtime *rt = s->rt;
    const block_params *p = &s->m->blocks[l];
    const dsmoe_block_slices *b = s->W > 1 ? &s->sl.blocks[l] : NULL;
    DSMOE_TRY(dsmoe_gemm_one_group(rt, s->dt, s->ffn_rows, rows, s->fch_gelu, s->fch, in, b ? b->fcw : p->fcw_op, 1,
                                   s->Ft, s->M, DSMOE_EPI_BIAS_GELU, b ? b->fcb : p->fcb, err));
    DSMOE_TRY(row_parallel(s, out, s->fch_gelu, b ? b->fcprojw : p->fcprojw_op, rows, s->Ft, s->M, err));
    KCALL(rt, bias_add, out, s->dt, p->fcprojb, rows, s->M);
    return DSMOE_OK;
}

// x (rows, M) = mid + ffn(ln_2(mid)), ffn = dense MLP, MoE or residual MoE (model.c's ffn_forward).
static dsmoe_status ffn_block(dsmoe_infer *s, int l, int rows, int group_rows, float cf, int profile,
                              dsmoe_infer_times *times, double *t0, dsmoe_err *err) {
    dsmoe_runtime *rt = s->rt;
    const block_params *p = &s->m->blocks[l];
    int M = s->M, mi = s->m->moe_of_layer[l];
    size_t RM = (size_t)rows * M;
    KCALL(rt, layernorm_forward, s->ln, NULL, NULL, s->mid, s->dt, p->ln2w, p->ln2b, rows, M, s->m->cfg->ln_eps);
    if (mi < 0) {
        DSMOE_TRY(mlp(s, l, s->ln, s->ffn_out, rows, err));
    } else {
        DSMOE_TRY(part_done(s, profile, &times->other, t0, err));
        const dsmoe_config *c = s->m->cfg;
        // Coordinated: this tensor rank's share of the rows (the group's rows split W ways).
        int q = s->coordinated ? (rows + s->W - 1) / s->W : rows, first = s->coordinated ? s->t * q : 0;
        int mine = rows - first < q ? rows - first : q, g_rows = s->coordinated ? (group_rows + s->W - 1) / s->W : group_rows;
        if (mine < 0) mine = 0;
        int capacity = cf > 0.0f ? dsmoe_capacity(g_rows, c->experts[mi], c->top_k, cf, c->min_capacity) : g_rows;
        if (capacity < 1) capacity = 1;
        double moe_times[3] = {0};
        dsmoe_moe_step step = {.training = 0, .inference = 1, .tokens = mine, .capacity = capacity,
                               .times = profile ? moe_times : NULL};
        void *moe_out = s->coordinated ? s->moe_share : s->moe_out;
        // Expert-slicing: this rank's slices, and the router where the model holds it now (the model moves
        // the float32 tensors it keeps: dsmoe_model_keep_unsliced, dsmoe_model_drop_gemm_masters).
        dsmoe_moe_weights sliced_w;
        const dsmoe_moe_weights *w = &p->moe;
        if (s->sliced) {
            sliced_w = s->sl.ew[mi];
            sliced_w.wg = p->moe.wg;
            w = &sliced_w;
        }
        DSMOE_TRY(dsmoe_moe_forward(s->moe[mi], w, at(s, s->ln, (size_t)first * M), moe_out, &step, NULL, err));
        if (s->sliced && rows > 0 && s->dt == F32) // the experts' partial outputs, summed over the tensor group
            CCOLL(rt, allreduce, s->tp.comm, DSMOE_IN_PLACE, s->moe_out, (size_t)rows * M, F32, DSMOE_SUM);
        if (s->sliced && rows > 0 && s->dt != F32) { // widened for the sum (the layer's output is of dt)
            KCALL(rt, convert, s->sum32, F32, s->moe_out, s->dt, RM);
            CCOLL(rt, allreduce, s->tp.comm, DSMOE_IN_PLACE, s->sum32, RM, F32, DSMOE_SUM);
            KCALL(rt, convert, s->moe_out, s->dt, s->sum32, F32, RM);
        }
        if (s->coordinated && q > 0) { // every tensor rank's share, in rank order: rows 0 .. rows-1 first
            size_t bytes = (size_t)q * M * s->esz;
            CCOLL(rt, allgather, s->tp.comm, s->moe_share, s->moe_out, bytes);
            if (profile) DSMOE_TRY(dsmoe_rt_wait(rt, err));
        }
        if (profile) {
            DSMOE_TRY(dsmoe_rt_wait(rt, err));
            double now = dsmoe_now_seconds();
            times->gating += moe_times[0];
            times->alltoall += moe_times[1] + (now - *t0 - moe_times[0] - moe_times[1] - moe_times[2]);
            times->experts += moe_times[2];
            *t0 = now;
        }
        if (s->m->cfg->residual) {
            DSMOE_TRY(mlp(s, l, s->ln, s->mlp_out, rows, err));
            DSMOE_TRY(linear_as(s, s->coef_logits, F32, s->ln, p->coefw_op, p->coefb, rows, M, 2, err));
            KCALL(rt, residual_mix_forward, s->ffn_out, s->coef, s->moe_out, s->mlp_out, s->dt, s->coef_logits, rows,
                  M);
        } else {
            KCALL(rt, copy, s->ffn_out, s->moe_out, RM * s->esz);
        }
    }
    KCALL(rt, copy, s->x, s->mid, RM * s->esz);
    KCALL(rt, axpy, s->x, 1.0f, s->ffn_out, s->dt, RM);
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// the forward

dsmoe_status dsmoe_infer_forward(dsmoe_infer *s, int n, const int *slot, const int *count, const int32_t *tokens,
                                 int group_rows, float capacity_factor, dsmoe_infer_times *times, dsmoe_err *err) {
    dsmoe_runtime *rt = s->rt;
    int M = s->M, V = s->V, rows = 0;
    if (n < 0 || n > s->slots || !(capacity_factor >= 0.0f))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: %d sequences, capacity factor %g: expected 0 .. %d "
                             "and a factor >= 0", n, (double)capacity_factor, s->slots);
    for (int i = 0; i < n; i++) {
        if (slot[i] < 0 || slot[i] >= s->slots || count[i] < 1 || count[i] > s->t_max - s->len[slot[i]])
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: sequence %d: slot %d holding %d positions gets "
                                 "%d more: expected a slot in [0, %d), at least 1 token, at most %d positions",
                                 i, slot[i], slot[i] >= 0 && slot[i] < s->slots ? s->len[slot[i]] : -1, count[i],
                                 s->slots, s->t_max);
        for (int j = 0; j < i; j++)
            if (slot[j] == slot[i])
                return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: slot %d appears twice in one call", slot[i]);
        rows += count[i];
    }
    if (rows > s->R || group_rows < rows || group_rows > s->R || group_rows < 1)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: %d tokens in one call, %d in the group's largest: "
                             "expected 1 <= the group's >= this rank's, both <= %d", rows, group_rows, s->R);
    for (int r = 0; r < rows; r++)
        if (tokens[r] < 0 || tokens[r] >= V)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: token id %d is outside the vocabulary [0, %d)",
                                 tokens[r], V);
    int profile = times != NULL;
    dsmoe_infer_times unused;
    if (!profile) times = &unused;
    double t0 = 0.0;
    if (profile) {
        DSMOE_TRY(dsmoe_rt_wait(rt, err));
        t0 = dsmoe_now_seconds();
    }
    if (n > 0) {
        for (int i = 0; i < n; i++) s->host_pos[i] = s->len[slot[i]];
        KCALL(rt, copy_to_device, s->pos, s->host_pos, (size_t)n * sizeof(int32_t));
        KCALL(rt, copy_to_device, s->tokens, tokens, (size_t)rows * sizeof(int32_t));
    }
    int32_t ffn_rows = rows; // ordinary host memory: consumed before copy_to_device returns
    KCALL(rt, copy_to_device, s->ffn_rows, &ffn_rows, sizeof ffn_rows);
    // Embedding: token + position, each sequence from its own position (s->pos): one call when the
    // sequences bring as many tokens each (decoding), else one per sequence. wte is the float32 master, or
    // (its master dropped, dsmoe_model_drop_gemm_masters) its dt copy.
    const void *wte = s->m->wte ? (const void *)s->m->wte : s->m->wte_op;
    dsmoe_dtype wte_dt = s->m->wte ? F32 : s->dt;
    int same = 1;
    for (int i = 1; i < n; i++) same &= count[i] == count[0];
    for (int i = 0, r0 = 0; i < n; r0 += count[i++]) {
        int b = same ? n : 1;
        KCALL(rt, embedding_forward, at(s, s->x, (size_t)r0 * M), s->dt, s->tokens + r0, wte, wte_dt, s->m->wpe,
              s->pos + i, b, count[i], M, V, s->m->cfg->seq_len);
        if (same) break;
    }
    DSMOE_TRY(part_done(s, profile, &times->other, &t0, err));
    for (int l = 0; l < s->L; l++) {
        DSMOE_TRY(attn_block(s, l, n, slot, count, rows, err));
        DSMOE_TRY(part_done(s, profile, &times->attention, &t0, err));
        DSMOE_TRY(ffn_block(s, l, rows, group_rows, capacity_factor, profile, times, &t0, err));
        DSMOE_TRY(part_done(s, profile, &times->other, &t0, err));
    }
    // The head on each sequence's last row only.
    for (int i = 0, r0 = 0; i < n; r0 += count[i++])
        KCALL(rt, copy, at(s, s->last, (size_t)i * M), at(s, s->x, (size_t)(r0 + count[i] - 1) * M), (size_t)M * s->esz);
    if (n > 0) {
        KCALL(rt, layernorm_forward, s->lnf, NULL, NULL, s->last, s->dt, s->m->lnfw, s->m->lnfb, n, M,
              s->m->cfg->ln_eps);
        DSMOE_TRY(linear(s, s->logits, s->lnf, s->m->wte_op, NULL, n, M, V, err));
    }
    DSMOE_TRY(part_done(s, profile, &times->other, &t0, err));
    for (int i = 0; i < n; i++) s->len[slot[i]] += count[i];
    s->n_last = n;
    return DSMOE_OK;
}

dsmoe_status dsmoe_infer_sample(dsmoe_infer *s, const dsmoe_sampling_params *p, const uint64_t *counters,
                                int vocab_drawn, int32_t *tokens, dsmoe_err *err) {
    dsmoe_runtime *rt = s->rt;
    int n = s->n_last;
    if (vocab_drawn < 1 || vocab_drawn > s->V)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "inference: sampling among %d ids of a vocabulary of %d", vocab_drawn,
                             s->V);
    for (int i = 0; i < n; i++) // the row's first vocab_drawn logits
        KCALL(rt, sample, &s->sampled[i], at(s, s->logits, (size_t)i * s->V), s->dt, 1, vocab_drawn, &p[i],
              &counters[i]);
    if (n > 0) KCALL(rt, copy_to_host, s->host_sampled, s->sampled, (size_t)n * sizeof(int32_t));
    DSMOE_TRY(dsmoe_rt_wait(rt, err));
    memcpy(tokens, s->host_sampled, (size_t)n * sizeof(int32_t));
    return DSMOE_OK;
}
