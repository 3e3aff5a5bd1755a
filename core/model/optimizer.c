// core/model/optimizer.c: see optimizer.h.
#include "optimizer.h"

#include <stdlib.h>
#include <string.h>

// ZeRO-1 gathers the updated parameters in pieces of at most this many elements per rank per call, so
// the landing buffer stays near DSMOE_ZERO_GATHER_ELEMS floats (256 MiB) whatever the model: one landing
// buffer for a whole range would be a full fp32 copy of the replicated parameters on every rank and give
// back most of what sharding the moments saves. dsmoe_zero_piece (optimizer.h) is the rule.

// One range of the slab and the part of it this rank owns.
typedef struct shard {
    size_t range_begin, range_end; // the range in the slab
    size_t chunk;                  // elements per rank (the last rank's chunk may be short)
    size_t piece;                  // elements per rank per all-gather call (dsmoe_zero_piece)
    size_t begin, end;             // owned elements, in slab coordinates
    size_t state_offset;           // where the owned moments start in m and v
    dsmoe_comm_group *group;       // ranks holding the range identically (NULL: not sharded)
    int size;
} shard;

struct dsmoe_optimizer {
    dsmoe_model *model;
    dsmoe_runtime *rt;
    int zero_stage;
    shard *shards;     // (n_shards) replicated, then one per MoE layer's experts
    int n_shards;
    float *m, *v;      // (owned elements) moments
    float *gather;     // (max piece * size) all-gather landing buffer, zero_stage 1 only
    float *send;       // (max piece) padded send piece
    size_t n_state;
};

static void plan_shard(shard *s, size_t begin, size_t end, dsmoe_comm_group *group, const dsmoe_runtime *rt,
                       size_t state_offset) {
    s->range_begin = begin;
    s->range_end = end;
    s->group = group;
    s->size = group ? rt->comm->group_size(group) : 1;
    int rank = group ? rt->comm->group_rank(group) : 0;
    size_t n = end - begin;
    s->chunk = (n + (size_t)s->size - 1) / (size_t)s->size;
    s->piece = dsmoe_zero_piece(s->chunk, s->size);
    size_t lo = begin + (size_t)rank * s->chunk, hi = lo + s->chunk;
    s->begin = lo < end ? lo : end;
    s->end = hi < end ? hi : end;
    s->state_offset = state_offset;
}

dsmoe_status dsmoe_optimizer_create(dsmoe_model *model, int zero_stage, dsmoe_optimizer **out, dsmoe_err *err) {
    dsmoe_optimizer *o = calloc(1, sizeof *o);
    *out = o;
    if (!o) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory creating the optimizer");
    o->model = model;
    o->rt = dsmoe_model_runtime(model);
    o->zero_stage = zero_stage;
    dsmoe_runtime *rt = o->rt;
    size_t n_rep = dsmoe_model_replicated_params(model);
    int sharded = zero_stage >= 1, n_moe = dsmoe_model_config(model)->n_moe_layers;
    o->n_shards = 1 + n_moe;
    o->shards = calloc((size_t)o->n_shards, sizeof *o->shards);
    if (!o->shards) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory creating the optimizer");
    // Each MoE layer's experts are identical over that layer's EDP group (its own EP size), so each
    // layer is its own shard.
    plan_shard(&o->shards[0], 0, n_rep, sharded ? rt->world : NULL, rt, 0);
    o->n_state = o->shards[0].end - o->shards[0].begin;
    for (int mi = 0; mi < n_moe; mi++) {
        size_t b, e;
        dsmoe_model_expert_range(model, mi, &b, &e);
        shard *s = &o->shards[1 + mi];
        plan_shard(s, b, e, sharded ? dsmoe_model_edp_group(model, mi) : NULL, rt, o->n_state);
        o->n_state += s->end - s->begin;
    }
    DSMOE_TRY(dsmoe_rt_alloc(rt, o->n_state * sizeof(float), DSMOE_ALLOC_ZERO, (void **)&o->m, "AdamW m", err));
    DSMOE_TRY(dsmoe_rt_alloc(rt, o->n_state * sizeof(float), DSMOE_ALLOC_ZERO, (void **)&o->v, "AdamW v", err));
    if (sharded) {
        size_t most = 0, chunk = 0;
        for (int k = 0; k < o->n_shards; k++) {
            if (o->shards[k].size <= 1) continue; // nothing to gather (allgather_range returns at once)
            size_t g = o->shards[k].piece * (size_t)o->shards[k].size;
            most = g > most ? g : most;
            chunk = o->shards[k].piece > chunk ? o->shards[k].piece : chunk;
        }
        DSMOE_TRY(dsmoe_rt_alloc(rt, most * sizeof(float), 0, (void **)&o->gather, "ZeRO gather buffer", err));
        DSMOE_TRY(dsmoe_rt_alloc(rt, chunk * sizeof(float), 0, (void **)&o->send, "ZeRO send buffer", err));
    }
    return DSMOE_OK;
}

void dsmoe_optimizer_free(dsmoe_optimizer *o) {
    if (!o) return;
    dsmoe_runtime *rt = o->rt;
    rt->kern->free(rt->kctx, o->m);
    rt->kern->free(rt->kctx, o->v);
    rt->kern->free(rt->kctx, o->gather);
    rt->kern->free(rt->kctx, o->send);
    free(o->shards);
    free(o);
}

size_t dsmoe_optimizer_bytes(const dsmoe_optimizer *o) { return 2 * o->n_state * sizeof(float); }

// Every rank's chunk of `slab` (slab coordinates) becomes the whole range on every rank of the group,
// piece by piece: piece j of every rank's chunk lands as (size, piece) and goes to its place in the range.
static dsmoe_status allgather_range(dsmoe_optimizer *o, const shard *s, float *slab, dsmoe_err *err) {
    dsmoe_runtime *rt = o->rt;
    size_t n = s->range_end - s->range_begin;
    if (!s->group || s->size == 1 || n == 0) return DSMOE_OK;
    for (size_t j = 0; j < s->chunk; j += s->piece) {
        size_t p = s->chunk - j < s->piece ? s->chunk - j : s->piece;
        size_t mine = s->begin + j < s->end ? s->end - (s->begin + j) : 0;
        if (mine > p) mine = p;
        if (mine < p) KCALL(rt, zero, o->send, p * sizeof(float));
        if (mine) KCALL(rt, copy, o->send, slab + s->begin + j, mine * sizeof(float));
        CCOLL(rt, allgather, s->group, o->send, o->gather, p * sizeof(float));
        for (int r = 0; r < s->size; r++) {
            size_t at = (size_t)r * s->chunk + j; // offset in the range
            if (at >= n) break;
            size_t len = n - at < p ? n - at : p;
            KCALL(rt, copy, slab + s->range_begin + at, o->gather + (size_t)r * p, len * sizeof(float));
        }
    }
    return DSMOE_OK;
}

// One multi-tensor AdamW call: every (tensor, shard) overlap of this rank, in tensor order.
// The plugin's adamw over the list, through KCALL (its error message, train.profile's timing); the
// caller frees the list whatever the outcome.
static dsmoe_status enqueue_adamw(const dsmoe_runtime *rt, const dsmoe_adamw_params *hp,
                                  const dsmoe_adamw_tensor *list, int n, dsmoe_err *err) {
    KCALL(rt, adamw, hp, list, n);
    return DSMOE_OK;
}

dsmoe_status dsmoe_optimizer_step(dsmoe_optimizer *o, float lr, float grad_scale, int t, dsmoe_err *err) {
    dsmoe_runtime *rt = o->rt;
    const dsmoe_config *c = dsmoe_model_config(o->model);
    float *params = dsmoe_model_params(o->model), *grads = dsmoe_model_grads(o->model);
    int n = 0, n_tensors = dsmoe_model_tensor_count(o->model);
    dsmoe_adamw_tensor *list = dsmoe_calloc((size_t)n_tensors * (size_t)o->n_shards + 1, sizeof *list,
                                            "AdamW tensor list", err);
    if (!list) return err->status;
    for (int i = 0; i < n_tensors; i++) {
        const dsmoe_param_tensor *p = dsmoe_model_tensor(o->model, i);
        for (int k = 0; k < o->n_shards; k++) {
            const shard *s = &o->shards[k];
            size_t lo = p->offset > s->begin ? p->offset : s->begin;
            size_t hi = p->offset + p->numel < s->end ? p->offset + p->numel : s->end;
            if (lo >= hi) continue;
            size_t st = s->state_offset + (lo - s->begin);
            list[n++] = (dsmoe_adamw_tensor){.param = params + lo, .grad = grads + lo, .m = o->m + st, .v = o->v + st,
                                             .n = hi - lo, .weight_decay = p->decay ? c->weight_decay : 0.0f};
        }
    }
    dsmoe_adamw_params hp = {.lr = lr, .beta1 = c->beta1, .beta2 = c->beta2, .eps = c->adam_eps,
                             .grad_scale = grad_scale, .t = t};
    dsmoe_status s = enqueue_adamw(rt, &hp, list, n, err); // the list is consumed before return
    free(list);
    DSMOE_TRY(s);
    for (int k = 0; k < o->n_shards; k++) DSMOE_TRY(allgather_range(o, &o->shards[k], params, err));
    return DSMOE_OK;
}

dsmoe_status dsmoe_optimizer_get_state(dsmoe_optimizer *o, int which, float *full, dsmoe_err *err) {
    dsmoe_runtime *rt = o->rt;
    const float *state = which ? o->v : o->m;
    for (int k = 0; k < o->n_shards; k++) {
        const shard *s = &o->shards[k];
        if (s->end > s->begin)
            KCALL(rt, copy, full + s->begin, state + s->state_offset, (s->end - s->begin) * sizeof(float));
        DSMOE_TRY(allgather_range(o, s, full, err));
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_optimizer_set_state(dsmoe_optimizer *o, int which, const float *full, dsmoe_err *err) {
    dsmoe_runtime *rt = o->rt;
    float *state = which ? o->v : o->m;
    for (int k = 0; k < o->n_shards; k++) {
        const shard *s = &o->shards[k];
        if (s->end > s->begin)
            KCALL(rt, copy, state + s->state_offset, full + s->begin, (s->end - s->begin) * sizeof(float));
    }
    return DSMOE_OK;
}
