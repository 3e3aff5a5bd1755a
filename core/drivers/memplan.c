// core/drivers/memplan.c: see memplan.h. The model's and the MoE layers' buffers are summed from the tables
// their allocating code walks (core/model/model_buffers.h), so they follow any change there. The other
// sections mirror one allocating file (the exchange's workspace, the optimizer's shards): a change of
// what that file allocates must be made here too (tests/drivers/test_memplan.c counts the real allocation and
// will fail). Element counts are uint64_t from the first multiplication on.
#include "memplan.h"
#include "model_buffers.h" // dsmoe_model_buffers: the model's buffers, the list core/model/model.c allocates
#include "optimizer.h" // dsmoe_zero_piece

#include <limits.h>
#include <stdlib.h>

#include "exchange.h" // dsmoe_a2a_node_layout, DSMOE_A2A_*: the same layout rule the MoE layer applies

#define F32 ((uint64_t)sizeof(float))

// ----------------------------------------------------------------------------------------------------
// parameters (core/model/model.c build_table)

// One expert: c_fc (F, M) + (F), c_proj (M, F) + (M); also the dense FFN of a block.
static uint64_t ffn_params(const dsmoe_config *c) {
    uint64_t M = (uint64_t)c->hidden, F = (uint64_t)c->ffn_hidden;
    return 2 * F * M + F + M;
}

void dsmoe_mem_param_counts(const dsmoe_config *c, dsmoe_param_counts *out) {
    uint64_t M = (uint64_t)c->hidden, V = (uint64_t)c->vocab, T = (uint64_t)c->seq_len;
    uint64_t rep = V * M + T * M + 2 * M, expert = 0; // wte, wpe, ln_f
    for (int l = 0; l < c->layers; l++) {
        int mi = -1;
        int moe = dsmoe_config_is_moe_layer(c, l, &mi);
        rep += 4 * M * M + 8 * M; // ln_1, c_attn (3M, M) + (3M), attn c_proj (M, M) + (M), ln_2
        if (!moe || c->residual) rep += ffn_params(c);
        if (moe) {
            uint64_t E = (uint64_t)c->experts[mi];
            rep += E * M;                        // gate (E, M), no bias
            if (c->residual) rep += 2 * M + 2;   // coefficient (2, M) + (2)
            expert += E * ffn_params(c);
        }
    }
    *out = (dsmoe_param_counts){.replicated = rep, .expert = expert, .total = rep + expert};
}

// ----------------------------------------------------------------------------------------------------
// checks: what config.c checks once the rank count is known, and what the model and MoE layer refuse

static dsmoe_status check_run(const dsmoe_config *c, int W, int rank, int rpn, int *B, dsmoe_err *err) {
    if (W < 1 || rank < 0 || rank >= W || rpn < 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "memory plan: rank %d of %d ranks, %d per node: expected 0 <= rank < ranks and ranks per "
                             "node >= 0", rank, W, rpn);
    if (c->layers < 1 || c->hidden < 1 || c->heads < 1 || c->hidden % c->heads != 0 || c->ffn_hidden < 1 ||
        c->vocab < 1 || c->seq_len < 1)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "memory plan: model.layers %d, hidden %d, heads %d, ffn_hidden %d, vocab %d, seq_len %d: "
                             "expected positive sizes with hidden divisible by heads (a loaded config resolves "
                             "ffn_hidden = 0 to 4*hidden)", c->layers, c->hidden, c->heads, c->ffn_hidden, c->vocab,
                             c->seq_len);
    if (c->mode == DSMOE_MODE_GENERATE) {
        *B = 0; // generation's model holds parameters only (its batches are the inference state's)
    } else if (c->micro_batch == 0) {
        if (c->batch < 1 || c->batch % W != 0)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "memory plan: train.batch = %d: must be divisible by the %d ranks (train.micro_batch "
                                 "= 0 means train.batch / ranks)", c->batch, W);
        *B = c->batch / W;
    } else {
        int64_t per_step = (int64_t)c->micro_batch * W;
        if (c->micro_batch < 0 || c->batch < 1 || c->batch % per_step != 0)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "memory plan: train.batch = %d: must be divisible by train.micro_batch (%d) x %d ranks "
                                 "= %lld", c->batch, c->micro_batch, W, (long long)per_step);
        *B = c->micro_batch;
    }
    // The model keeps S = B * seq_len, and the kernels' row counts, in an int.
    if ((int64_t)*B * c->seq_len > INT_MAX)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "memory plan: train.micro_batch %d x model.seq_len %d = %lld tokens per micro-step: more "
                             "than the %d the model can index; lower train.micro_batch", *B, c->seq_len,
                             (long long)*B * c->seq_len, INT_MAX);
    if (c->n_moe_layers < 0 || c->n_moe_layers > DSMOE_MAX_MOE_LAYERS)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "memory plan: %d MoE layers: expected 0 .. %d", c->n_moe_layers,
                             DSMOE_MAX_MOE_LAYERS);
    for (int i = 0; i < c->n_moe_layers; i++) {
        int E = c->experts[i], ep = c->expert_parallel[i];
        if (E < 1 || ep < 1 || W % ep != 0 || E % ep != 0)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "memory plan: moe.expert_parallel %d (MoE layer %d, %d experts): must divide both the "
                                 "%d ranks and the layer's experts", ep, i + 1, E, W);
        if (c->top_k < 1 || c->top_k > 2 || c->top_k > E)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "memory plan: moe.top_k = %d: expected 1 or 2 and at most the %d experts of MoE layer %d",
                                 c->top_k, E, i + 1);
    }
    if (c->n_moe_layers > 0 && c->drop_tokens && (!(c->capacity_factor > 0.0f) || !(c->eval_capacity_factor > 0.0f)))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "memory plan: moe.capacity_factor %g and moe.eval_capacity_factor %g: expected both > 0",
                             (double)c->capacity_factor, (double)c->eval_capacity_factor);
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// the model's buffers (core/model/model_buffers.c's table, which core/model/model.c alloc_buffers allocates)

// Attention's saved state (per layer) and backward workspace, in bytes: the kernel plugin's own
// attention_bytes when given (callable before init), else the cpu plugin's probabilities (B, NH, T, T).
static dsmoe_status attention_mem(const dsmoe_config *c, int B, const dsmoe_kernel_plugin_v3 *kern, uint64_t *saved,
                                  uint64_t *ws, dsmoe_err *err) {
    *saved = *ws = (uint64_t)B * (uint64_t)c->heads * (uint64_t)c->seq_len * (uint64_t)c->seq_len * F32;
    if (!kern || !kern->attention_bytes) return DSMOE_OK;
    dsmoe_attention_shape sh = {.B = B, .T = c->seq_len, .M = c->hidden, .NH = c->heads, .dt = DSMOE_FLOAT32};
    size_t a = 0, w = 0;
    dsmoe_status s = kern->attention_bytes(NULL, &sh, &a, &w);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "memory plan: kernel plugin '%s': attention_bytes(B=%d, T=%d, M=%d, NH=%d) failed",
                             kern->name, B, c->seq_len, c->hidden, c->heads);
    *saved = a, *ws = w;
    return DSMOE_OK;
}

// Sums a walk of a buffer table (core/model/model_buffers.h) by class.
typedef struct buf_mem {
    uint64_t params, grads, act, tokens, capacity;
} buf_mem;

static dsmoe_status add_buffer(const dsmoe_buffer *b, void *ctx, dsmoe_err *err) {
    (void)err;
    buf_mem *mm = ctx;
    if (b->cls == DSMOE_BUF_PARAMS) mm->params += b->bytes;
    else if (b->cls == DSMOE_BUF_GRADS) mm->grads += b->bytes;
    else if (b->cls == DSMOE_BUF_ACT) mm->act += b->bytes;
    else if (b->cls == DSMOE_BUF_TOKENS) mm->tokens += b->bytes;
    else if (b->cls == DSMOE_BUF_CAPACITY) mm->capacity += b->bytes;
    return DSMOE_OK; // host staging is not kernel memory
}

// ----------------------------------------------------------------------------------------------------
// MoE layers (core/model/moe_layer.c's tables) and their exchanges (core/parallel/exchange.c reserve, mirrored)

typedef struct moe_mem {
    uint64_t router, buffers, buffers_peak, ws, ws_peak; // bytes
    int cap;                                             // C allocated at create
} moe_mem;

// The all-to-all the MoE layer sets up for the EP group of ep slots starting at base (moe_layer.c
// exchange_setup): *algo and *G as dsmoe_exchange_create gets them. Fails where the layer would.
static dsmoe_status exchange_layout(const dsmoe_config *c, int W, int rpn, int ep, int base, int *algo, int *G,
                                    dsmoe_err *err) {
    *algo = c->alltoall;
    *G = 1;
    int ok = 0;
    dsmoe_err why = {0};
    if (c->ranks_per_node > 0) {
        ok = ep % c->ranks_per_node == 0;
        if (ok) *G = c->ranks_per_node;
        else dsmoe_err_set(&why, DSMOE_ERR_INVALID, "ranks_per_node %d does not divide the %d ranks of the EP group",
                           c->ranks_per_node, ep);
    } else {
        // The real nodes: rpn consecutive slots each (all W on one node when rpn is 0).
        int R = rpn > 0 ? rpn : W, *leader = malloc((size_t)ep * sizeof *leader);
        if (!leader) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "memory plan: out of memory for %d ranks", ep);
        for (int r = 0; r < ep; r++) {
            int s = base + r, first = s - s % R;
            leader[r] = (first > base ? first : base) - base;
        }
        ok = dsmoe_a2a_node_layout(leader, ep, G, &why) == DSMOE_OK;
        free(leader);
    }
    if (!ok) {
        if (*algo == DSMOE_A2A_HIERARCHICAL)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "memory plan: moe.alltoall = hierarchical: %s", why.msg);
        *algo = DSMOE_A2A_FLAT;
        *G = 1;
    }
    return DSMOE_OK;
}

// Kernel bytes of one MoE layer's table set (core/model/moe_layer.c's rows): host staging is not counted.
static uint64_t moe_set_bytes(dsmoe_moe_buffer_set set, const dsmoe_moe_sizes *z) {
    buf_mem sum = {0};
    dsmoe_moe_buffers(set, z, add_buffer, &sum, NULL); // add_buffer never fails
    return sum.act + sum.capacity;
}

static dsmoe_status moe_layer_mem(const dsmoe_config *c, int mi, int W, int rank, int rpn, uint64_t S, moe_mem *out,
                                  dsmoe_err *err) {
    uint64_t E = (uint64_t)c->experts[mi], K = (uint64_t)c->top_k, M = (uint64_t)c->hidden;
    int ep = c->expert_parallel[mi];
    uint64_t E_local = E / (uint64_t)ep;
    *out = (moe_mem){0};
    dsmoe_moe_sizes z = {.S = S, .M = M, .F = (uint64_t)c->ffn_hidden, .E = E, .K = K,
                         .jitter = c->noise == DSMOE_NOISE_JITTER,
                         .act_bytes = (int)dsmoe_dtype_size(dsmoe_config_act_dtype(c))};
    out->router = moe_set_bytes(DSMOE_MOE_ROUTER, &z);
    // Capacity buffers at the C allocated at create (none when dropless) and at their largest.
    uint64_t cap_peak = S; // dropless: an expert gets at most every token of a rank (top-2 picks two experts)
    if (c->drop_tokens) {
        int ct = dsmoe_capacity((int)S, (int)E, (int)K, c->capacity_factor, c->min_capacity);
        int ce = dsmoe_capacity((int)S, (int)E, (int)K, c->eval_capacity_factor, c->min_capacity);
        out->cap = ct > ce ? ct : ce;
        z.C = (uint64_t)out->cap;
        out->buffers = moe_set_bytes(DSMOE_MOE_CAPACITY, &z);
        cap_peak = (uint64_t)out->cap;
    }
    z.C = cap_peak;
    out->buffers_peak = moe_set_bytes(DSMOE_MOE_CAPACITY, &z);
    int algo, G;
    DSMOE_TRY(exchange_layout(c, W, rpn, ep, rank / ep * ep, &algo, &G, err));
    int N = ep / G;
    if (algo == DSMOE_A2A_FLAT || G == 1 || N == 1) return DSMOE_OK; // never packs
    // ensure_capacity reserves for C slots (at create when tokens are dropped, else when a step needs
    // more); AUTO reserves just below its limit at most (it sends bigger blocks flat). The kept counts
    // travel too (E_local int32 per peer, packed when hierarchical or below the limit), never more than
    // one slot row: they could only set the size of a layer with no slots.
    const uint64_t lim = DSMOE_A2A_AUTO_MAX_BYTES, row = E_local * M * F32, counts = E_local * sizeof(int32_t);
    uint64_t reserve = row * (uint64_t)out->cap, reserve_peak = row * cap_peak;
    if (algo == DSMOE_A2A_AUTO) {
        reserve = reserve < lim ? reserve : lim - 1;
        reserve_peak = reserve_peak < lim ? reserve_peak : lim - 1;
    }
    if ((algo == DSMOE_A2A_HIERARCHICAL || counts < lim) && counts > reserve_peak) reserve_peak = counts;
    out->ws = (uint64_t)ep * reserve;
    out->ws_peak = (uint64_t)ep * reserve_peak;
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// optimizer (core/model/optimizer.c plan_shard): a range of n elements cut into ceil(n / size) chunks

typedef struct shard_mem {
    uint64_t owned, chunk, size;
} shard_mem;

static shard_mem shard(uint64_t n, int size, int rank) {
    shard_mem s = {.chunk = (n + (uint64_t)size - 1) / (uint64_t)size, .size = (uint64_t)size};
    uint64_t lo = (uint64_t)rank * s.chunk;
    s.owned = lo >= n ? 0 : n - lo < s.chunk ? n - lo : s.chunk;
    return s;
}

// ----------------------------------------------------------------------------------------------------
// the estimate

dsmoe_status dsmoe_mem_estimate_rank(const dsmoe_config *c, int W, int rank, int rpn, dsmoe_mem_estimate *est,
                                     dsmoe_err *err) {
    return dsmoe_mem_estimate_rank_for(c, W, rank, rpn, NULL, est, err);
}

dsmoe_status dsmoe_mem_estimate_rank_for(const dsmoe_config *c, int W, int rank, int rpn,
                                         const dsmoe_kernel_plugin_v3 *kern, dsmoe_mem_estimate *est, dsmoe_err *err) {
    *est = (dsmoe_mem_estimate){0};
    int B = 0;
    DSMOE_TRY(check_run(c, W, rank, rpn, &B, err));
    uint64_t S = (uint64_t)B * (uint64_t)c->seq_len;
    est->micro_batch = B;
    est->micro_steps = B > 0 ? c->batch / (B * W) : 0;

    dsmoe_param_counts pc;
    dsmoe_mem_param_counts(c, &pc);
    est->global_params = pc.total;
    est->global_expert_params = pc.expert;
    est->replicated_params = pc.replicated;
    uint64_t local = pc.replicated;
    int zero1 = c->zero_stage >= 1;
    // Optimizer shards: the replicated range over the world, each MoE layer's experts over its EDP
    // group (the W / ep slots rank % ep + k ep; this rank is number rank / ep of them).
    shard_mem rep = shard(pc.replicated, zero1 ? W : 1, zero1 ? rank : 0);
    // ZeRO-1 gathers in pieces (optimizer.h dsmoe_zero_piece): landing (piece, size), send (piece).
    uint64_t rep_piece = dsmoe_zero_piece(rep.chunk, (int)rep.size);
    // A range over one rank is never gathered: no buffer for it.
    uint64_t state = rep.owned, gather = rep.size > 1 ? rep_piece * rep.size : 0, send = rep.size > 1 ? rep_piece : 0;
    for (int mi = 0; mi < c->n_moe_layers; mi++) {
        int ep = c->expert_parallel[mi];
        uint64_t n = (uint64_t)(c->experts[mi] / ep) * ffn_params(c);
        local += n;
        shard_mem s = shard(n, zero1 ? W / ep : 1, zero1 ? rank / ep : 0);
        state += s.owned;
        uint64_t piece = s.size > 1 ? dsmoe_zero_piece(s.chunk, (int)s.size) : 0;
        if (piece * s.size > gather) gather = piece * s.size;
        if (piece > send) send = piece;
    }
    est->local_params = local;
    est->optimizer_bytes = 2 * state * F32;
    est->optimizer_scratch_bytes = zero1 ? (gather + send) * F32 : 0;
    dsmoe_model_sizes z = {.B = B, .distill = B > 0 && dsmoe_config_distills(c), .local_params = local};
    DSMOE_TRY(attention_mem(c, B, kern, &z.att_saved, &z.att_ws, err));
    buf_mem mb = {0};
    DSMOE_TRY(dsmoe_model_buffers(c, &z, add_buffer, &mb, err));
    est->param_bytes = mb.params;
    est->grad_bytes = mb.grads;
    est->activation_bytes = mb.act;
    est->model_bytes = est->param_bytes + est->grad_bytes + est->activation_bytes;
    est->token_bytes = mb.tokens;

    for (int mi = 0; mi < c->n_moe_layers; mi++) {
        moe_mem mm;
        DSMOE_TRY(moe_layer_mem(c, mi, W, rank, rpn, S, &mm, err));
        est->moe_router_bytes += mm.router;
        est->moe_buffer_bytes += mm.buffers;
        est->moe_buffer_peak_bytes += mm.buffers_peak;
        est->exchange_bytes += mm.ws;
        est->exchange_peak_bytes += mm.ws_peak;
        if (mm.cap > est->capacity_max) est->capacity_max = mm.cap;
    }
    est->total_bytes = est->model_bytes + est->token_bytes + est->moe_router_bytes + est->moe_buffer_bytes +
                       est->exchange_bytes + est->optimizer_bytes + est->optimizer_scratch_bytes;
    est->checkpoint_bytes = local * F32; // one moment in the slab's layout (checkpoint.c save and load)
    est->peak_bytes = est->total_bytes - est->moe_buffer_bytes - est->exchange_bytes + est->moe_buffer_peak_bytes +
                      est->exchange_peak_bytes + est->checkpoint_bytes;
    // Checkpoint saves stream (checkpoint.c): rank 0 (slot 0) holds the largest global tensor; the
    // ranks of the first EP group of each size hold their largest expert shard on its way to rank 0.
    uint64_t M = (uint64_t)c->hidden, F = (uint64_t)c->ffn_hidden, most_global, most_shard = 0;
    most_global = (uint64_t)c->vocab * M;                                        // wte
    if ((uint64_t)c->seq_len * M > most_global) most_global = (uint64_t)c->seq_len * M; // wpe
    if (3 * M * M > most_global) most_global = 3 * M * M;                       // c_attn
    if (F * M > most_global) most_global = F * M;                               // a dense c_fc
    for (int mi = 0; mi < c->n_moe_layers; mi++) {
        uint64_t E = (uint64_t)c->experts[mi], ep = (uint64_t)c->expert_parallel[mi];
        if (E * F * M > most_global) most_global = E * F * M;                   // experts' c_fc, c_proj
        if (E * M > most_global) most_global = E * M;                           // gate
        if (ep > 1 && (uint64_t)rank < ep && E / ep * F * M > most_shard) most_shard = E / ep * F * M;
    }
    est->checkpoint_host_bytes = ((rank == 0 ? most_global : 0) + most_shard) * F32;
    return DSMOE_OK;
}

dsmoe_status dsmoe_mem_teacher_bytes(const dsmoe_config *t, int W, int rank, int rpn,
                                     const dsmoe_kernel_plugin_v3 *kern, uint64_t *bytes, dsmoe_err *err) {
    dsmoe_mem_estimate est;
    DSMOE_TRY(dsmoe_mem_estimate_rank_for(t, W, rank, rpn, kern, &est, err));
    // The model's own buffers again, forward only: parameters, activations, no gradients or backward scratch.
    dsmoe_model_sizes z = {.B = est.micro_batch, .forward_only = 1, .local_params = est.local_params};
    DSMOE_TRY(attention_mem(t, est.micro_batch, kern, &z.att_saved, &z.att_ws, err));
    buf_mem mb = {0};
    DSMOE_TRY(dsmoe_model_buffers(t, &z, add_buffer, &mb, err));
    *bytes = mb.params + mb.act + mb.tokens + est.moe_router_bytes + est.moe_buffer_bytes + est.exchange_bytes;
    return DSMOE_OK;
}
