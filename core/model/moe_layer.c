// core/model/moe_layer.c: one MoE layer, forward and backward (see moe_layer.h and docs/moe-layer.md).
//
// Pipeline (forward): router GEMM -> gate_route -> capacity -> gate_assign (one fused `gate` op where the
// plugin has it and the capacity comes from the token count) -> l_aux (its sums reduced over the scope)
// -> dispatch (E, C, M) -> all-to-all -> expert FFN as grouped GEMMs over (source rank, local expert)
// -> all-to-all back -> combine. The backward walks the same steps in reverse.
//
// Invariants: every buffer is kernel-plugin memory except the host staging (host_alloc, read only after
// a wait); the counts stay on the device (the grouped GEMMs read them there); forward outputs are
// assigned, gradients accumulate (+=) into the caller's buffers. Buffers of capacity size hold rows of
// kept tokens only: a group's rows beyond its kept count are never read (the grouped GEMMs and their
// epilogues run on m = kept rows; combine and dispatch-backward only visit kept slots), so those rows are
// never cleared between steps.
//
// Precision: x, out and the capacity buffers are of cfg.dt (float32 or bfloat16), as are the expert
// GEMMs' operands (w1_lp, w2_lp in bfloat16); the expert weight gradients are float32. Gating is float32
// throughout: in bfloat16 the gate input is widened into xg32 first, and the router's input gradient is
// formed in float32 and narrowed once before it is added to dx.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"    // dsmoe_capacity
#include "dsmoe/rng.h" // dsmoe_rng_key
#include "model_buffers.h" // dsmoe_moe_buffers: the tables below
#include "moe_layer.h"

#define F32 DSMOE_FLOAT32

// Purpose tags of the sub-keys derived from step->seed (docs/moe-layer.md lists them).
#define MOE_TAG_JITTER 0x4A495454u // "JITT": multiplicative jitter on the gate input
#define MOE_TAG_GATING 0x47415445u // "GATE": the gating params' seed (Gumbel noise, RTS)

struct dsmoe_moe_layer {
    const dsmoe_runtime *rt;
    dsmoe_moe_config cfg;
    int ep, ep_rank, E_local;
    int cap; // capacity the C-sized buffers hold
    dsmoe_exchange *ex;          // the EP group's all-to-all (owned)
    dsmoe_comm_group *aux_group; // BATCH scope: l_aux's sums are reduced over it (not owned)

    // Per-token buffers, sized at create.
    float *logits;    // (S, E); the backward reuses it for dlogits
    float *probs;     // (S, E)
    int32_t *choice;  // (S, K)
    int32_t *slot;    // (S, K)
    float *weight;    // (S, K)
    float *dweight;   // (S, K)
    float *xj;        // (S, M) jittered gate input (noise = JITTER only); the backward reuses it
    float *dxj;       // (S, M) d(gate input) before the jitter factor (noise = JITTER, or bfloat16)
    float *xg32;      // (S, M) bfloat16 only: the gate input widened to float32; the backward reuses
                      // it for the gate input's gradient narrowed to bfloat16
    int32_t *counts;  // (E) tokens choosing each expert (gate_route), then the dropless maximum in [0]
    int32_t *kept;    // (E) slots this rank fills per expert (gate_assign), sent with the tokens
    int32_t *recv_cnt; // (ep, E_local) kept counts the sources sent for my experts: the GEMMs' rows
    double *aux;      // (2E + 1) l_aux's sums: P (E), N (E), S_tot; reduced over the scope in place

    // Capacity buffers: (E, C, width) = (ep, E_local, C, width), sized for cap; elements of cfg.dt.
    void *send;       // (E, C, M) tokens by destination expert; backward: dy by expert, then dx rows home
    void *recv;       // (ep, E_local, C, M) tokens by source rank (kept for dw1)
    void *h;          // (ep, E_local, C, F) fc pre-activation (kept for the GELU backward)
    void *act;        // (ep, E_local, C, F) gelu(h) (kept for dw2)
    void *da;         // (ep, E_local, C, F) backward: dh = gelu'(h) * d(act)
    void *yexp;       // (ep, E_local, C, M) expert outputs by source; backward: dy, then dbuf by source
    void *yhome;      // (E, C, M) expert outputs of this rank's tokens (kept for dweight)
    dsmoe_dtype dt;   // cfg.dt
    size_t esz;       // its size in bytes

    // Host staging (host_alloc), valid after a wait: [kept (E) int32 | pad | aux (2E + 1) double], and
    // the dropless counts.
    void *stage;
    int32_t *stage_counts; // (E)
    int *expert_load;      // (E) stats copy of kept

    // What the backward needs of the last forward.
    int have_forward;
    int S_last; // tokens of the last forward
    int C;
    int jittered;
    uint64_t jitter_key, jitter_offset;
    dsmoe_gating_params gp;
    const void *x;          // the caller's x (must stay unchanged until the backward)
};

// ----------------------------------------------------------------------------------------------------
// buffers: the layer's two tables (core/drivers/memplan.c sums the same rows through dsmoe_moe_buffers)

#define LAYER(f) offsetof(struct dsmoe_moe_layer, f)
#define ROW DSMOE_BUFFER_ROW
enum { JITTER = DSMOE_MOE_IF_JITTER, LOWP = DSMOE_MOE_IF_LOWP, A = DSMOE_UNIT_ACT };

// Per-token buffers and host staging, allocated at create.
static const dsmoe_buffer_row router_rows[] = {
    //  name (and allocation tag)                class   when    unit, mult, dims  field
    ROW("router logits (S, E)",                    ACT,    0,      4, 1, S,     E, 1, LAYER(logits)),
    ROW("router probabilities (S, E)",             ACT,    0,      4, 1, S,     E, 1, LAYER(probs)),
    ROW("choices (S, K)",                          ACT,    0,      4, 1, S,     K, 1, LAYER(choice)),
    ROW("slots (S, K)",                            ACT,    0,      4, 1, S,     K, 1, LAYER(slot)),
    ROW("combine weights (S, K)",                  ACT,    0,      4, 1, S,     K, 1, LAYER(weight)),
    ROW("combine weight gradients (S, K)",         ACT,    0,      4, 1, S,     K, 1, LAYER(dweight)),
    ROW("route counts (E)",                        ACT,    0,      4, 1, E,     1, 1, LAYER(counts)),
    ROW("kept counts (E)",                         ACT,    0,      4, 1, E,     1, 1, LAYER(kept)),
    ROW("received counts (ep, E_local)",           ACT,    0,      4, 1, E,     1, 1, LAYER(recv_cnt)),
    ROW("l_aux sums (2E + 1)",                     ACT,    0,      8, 1, AUX,   1, 1, LAYER(aux)),
    ROW("jittered gate input (S, M)",              ACT,    JITTER, 4, 1, S,     M, 1, LAYER(xj)),
    ROW("gate input gradient (S, M)",              ACT,    JITTER | LOWP, 4, 1, S, M, 1, LAYER(dxj)),
    ROW("gate input in float32 (S, M)",            ACT,    LOWP,   4, 1, S,     M, 1, LAYER(xg32)),
    ROW("host staging: kept counts, l_aux sums",   HOST,   0,      1, 1, STAGE, 1, 1, LAYER(stage)),
    ROW("host staging: dropless counts (E)",       HOST,   0,      4, 1, E,     1, 1, LAYER(stage_counts)),
};

// (E, C, width) = (ep, E_local, C, width), sized for C slots per expert.
static const dsmoe_buffer_row capacity_rows[] = {
    ROW("dispatch buffer (E, C, M)",                       CAPACITY, 0, A, 1, E, C, M, LAYER(send)),
    ROW("receive buffer (ep, E_local, C, M)",              CAPACITY, 0, A, 1, E, C, M, LAYER(recv)),
    ROW("expert pre-activation (ep, E_local, C, F)",       CAPACITY, 0, A, 1, E, C, F, LAYER(h)),
    ROW("expert activation (ep, E_local, C, F)",           CAPACITY, 0, A, 1, E, C, F, LAYER(act)),
    ROW("expert activation gradient (ep, E_local, C, F)",  CAPACITY, 0, A, 1, E, C, F, LAYER(da)),
    ROW("expert output (ep, E_local, C, M)",               CAPACITY, 0, A, 1, E, C, M, LAYER(yexp)),
    ROW("returned output (E, C, M)",                       CAPACITY, 0, A, 1, E, C, M, LAYER(yhome)),
};
#undef ROW

// Byte offset of the l_aux sums in the host staging (after the kept counts, 8-aligned).
static size_t stage_aux_offset(int E) { return ((size_t)E * sizeof(int32_t) + 7) & ~(size_t)7; }

dsmoe_status dsmoe_moe_buffers(dsmoe_moe_buffer_set set, const dsmoe_moe_sizes *z, dsmoe_buffer_fn fn, void *ctx,
                               dsmoe_err *err) {
    uint64_t d[DSMOE_D_COUNT] = {0};
    d[DSMOE_D_1] = 1;
    d[DSMOE_D_S] = z->S, d[DSMOE_D_M] = z->M, d[DSMOE_D_F] = z->F, d[DSMOE_D_E] = z->E, d[DSMOE_D_K] = z->K;
    d[DSMOE_D_C] = z->C;
    d[DSMOE_D_AUX] = 2 * z->E + 1;
    d[DSMOE_D_STAGE] = stage_aux_offset((int)z->E) + (2 * z->E + 1) * sizeof(double);
    d[DSMOE_D_ACT] = z->act_bytes ? (uint64_t)z->act_bytes : 4;
    int when = (z->jitter ? JITTER : 0) | (d[DSMOE_D_ACT] != 4 ? LOWP : 0);
    const dsmoe_buffer_row *rows = set == DSMOE_MOE_ROUTER ? router_rows : capacity_rows;
    size_t n = set == DSMOE_MOE_ROUTER ? sizeof router_rows / sizeof router_rows[0]
                                       : sizeof capacity_rows / sizeof capacity_rows[0];
    for (size_t i = 0; i < n; i++)
        if (rows[i].when == 0 || (rows[i].when & when)) DSMOE_TRY(dsmoe_buffer_row_emit(&rows[i], d, -1, fn, ctx, err));
    return DSMOE_OK;
}

static dsmoe_moe_sizes layer_sizes(const dsmoe_moe_layer *L, int C) {
    const dsmoe_moe_config *c = &L->cfg;
    return (dsmoe_moe_sizes){.S = (uint64_t)c->S, .M = (uint64_t)c->M, .F = (uint64_t)c->F, .E = (uint64_t)c->E,
                             .K = (uint64_t)c->K, .jitter = c->noise == DSMOE_NOISE_JITTER, .C = (uint64_t)C,
                             .act_bytes = (int)dsmoe_dtype_size(c->dt)};
}

// The pointer fields are reached by the tables' offsets; memcpy, not a (void **) cast, reads and writes
// them, as their types differ.
static dsmoe_status alloc_one(const dsmoe_buffer *b, void *ctx, dsmoe_err *err) {
    dsmoe_moe_layer *L = ctx;
    const dsmoe_runtime *rt = L->rt;
    void *p = NULL;
    if (b->cls == DSMOE_BUF_HOST) {
        if (rt->kern->host_alloc(rt->kctx, (size_t)b->bytes, &p) != DSMOE_OK)
            return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "moe layer: host staging with kernel plugin '%s': %s",
                                 rt->kern->name, rt->kern->last_error(rt->kctx));
    } else {
        DSMOE_TRY(dsmoe_rt_alloc(rt, (size_t)b->bytes, 0, &p, b->name, err));
    }
    memcpy((char *)L + b->field, &p, sizeof p);
    return DSMOE_OK;
}

static dsmoe_status free_one(const dsmoe_buffer *b, void *ctx, dsmoe_err *err) {
    (void)err;
    dsmoe_moe_layer *L = ctx;
    void *p, *none = NULL;
    memcpy(&p, (char *)L + b->field, sizeof p);
    if (b->cls == DSMOE_BUF_HOST) L->rt->kern->host_free(L->rt->kctx, p);
    else L->rt->kern->free(L->rt->kctx, p);
    memcpy((char *)L + b->field, &none, sizeof none);
    return DSMOE_OK;
}

static void free_capacity_buffers(dsmoe_moe_layer *L) {
    dsmoe_moe_sizes z = layer_sizes(L, 0);
    dsmoe_moe_buffers(DSMOE_MOE_CAPACITY, &z, free_one, L, NULL);
    L->cap = 0;
}

// Grows the capacity buffers to hold C slots per expert (never shrinks: dropless C varies by step).
static dsmoe_status ensure_capacity(dsmoe_moe_layer *L, int C, dsmoe_err *err) {
    if (C <= L->cap && L->send) return DSMOE_OK;
    free_capacity_buffers(L);
    dsmoe_moe_sizes z = layer_sizes(L, C);
    dsmoe_status s = dsmoe_moe_buffers(DSMOE_MOE_CAPACITY, &z, alloc_one, L, err);
    if (s != DSMOE_OK) {
        free_capacity_buffers(L);
        return s;
    }
    // The exchange's packing workspace for blocks of this size (the largest the layer sends).
    size_t M = (size_t)L->cfg.M;
    DSMOE_TRY(dsmoe_exchange_reserve(L->ex, (size_t)L->E_local * (size_t)C * M * L->esz, err));
    L->cap = C;
    return DSMOE_OK;
}

void dsmoe_moe_layer_free(dsmoe_moe_layer *L) {
    if (!L) return;
    free_capacity_buffers(L);
    dsmoe_moe_sizes z = layer_sizes(L, 0);
    dsmoe_moe_buffers(DSMOE_MOE_ROUTER, &z, free_one, L, NULL);
    dsmoe_exchange_free(L->ex); // collective over the EP group
    free(L->expert_load);
    free(L);
}

static dsmoe_status check_config(const dsmoe_runtime *rt, const dsmoe_moe_config *c, dsmoe_err *err) {
    if (c->S < 0 || c->M <= 0 || c->F <= 0 || c->E <= 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: S=%d M=%d F=%d E=%d: expected S >= 0 and M, F, E > 0",
                             c->S, c->M, c->F, c->E);
    if (c->K != 1 && c->K != 2)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: top-k K=%d: expected 1 or 2", c->K);
    if (c->K > c->E)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: top-k K=%d exceeds the %d experts", c->K, c->E);
    if (c->ep <= 0 || c->E % c->ep != 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: ep=%d: expected a positive divisor of E=%d", c->ep, c->E);
    if (!c->ep_group)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: ep_group is NULL (ep=%d)", c->ep);
    int gs = rt->comm->group_size(c->ep_group);
    if (gs != c->ep)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: ep=%d but the EP group has %d ranks", c->ep, gs);
    if (!c->ep_ctl)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: ep_ctl is not set (the EP group's control group, ep=%d)",
                             c->ep);
    if (dsmoe_ctl_size(c->ep_ctl) != c->ep)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: ep=%d but ep_ctl has %d ranks", c->ep,
                             dsmoe_ctl_size(c->ep_ctl));
    if (c->alltoall < DSMOE_A2A_FLAT || c->alltoall > DSMOE_A2A_AUTO || c->ranks_per_node < 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "moe layer: alltoall=%d ranks_per_node=%d: expected a dsmoe_a2a_algo (0 flat, 1 "
                             "hierarchical, 2 auto) and ranks_per_node >= 0", c->alltoall, c->ranks_per_node);
    if (c->aux_scope != DSMOE_AUX_SCOPE_BATCH && c->aux_scope != DSMOE_AUX_SCOPE_RANK)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: aux_scope=%d: expected 0 (batch) or 1 (rank)",
                             c->aux_scope);
    if (c->drop_tokens && (!(c->capacity_factor > 0.0f) || !(c->eval_capacity_factor > 0.0f)))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "moe layer: capacity_factor=%g eval_capacity_factor=%g: expected both > 0",
                             (double)c->capacity_factor, (double)c->eval_capacity_factor);
    if (c->min_capacity < 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: min_capacity=%d: expected >= 0", c->min_capacity);
    if (c->noise < DSMOE_NOISE_NONE || c->noise > DSMOE_NOISE_RSAMPLE)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: noise=%d: expected a dsmoe_noise_policy (0, 1, 2)",
                             c->noise);
    if (c->dt != DSMOE_FLOAT32 && c->dt != DSMOE_BFLOAT16)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: dt=%d: expected float32 or bfloat16", (int)c->dt);
    if (c->dt != DSMOE_FLOAT32 && !(rt->kern->dtypes & DSMOE_DTYPE_BIT(c->dt)))
        return dsmoe_err_set(err, DSMOE_ERR_UNSUPPORTED, "moe layer: kernel plugin '%s' does not take %s activations",
                             rt->kern->name, dsmoe_dtype_name(c->dt));
    if (c->noise == DSMOE_NOISE_JITTER && !(c->jitter_eps >= 0.0f && c->jitter_eps < 1.0f))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: jitter_eps=%g: expected 0 <= eps < 1",
                             (double)c->jitter_eps);
    return DSMOE_OK;
}

static dsmoe_status create_buffers(dsmoe_moe_layer *L, dsmoe_err *err) {
    dsmoe_moe_sizes z = layer_sizes(L, 0);
    DSMOE_TRY(dsmoe_moe_buffers(DSMOE_MOE_ROUTER, &z, alloc_one, L, err));
    L->expert_load = dsmoe_calloc((size_t)L->cfg.E, sizeof(int), "moe expert load", err);
    return L->expert_load ? DSMOE_OK : DSMOE_ERR_NOMEM;
}

// Ranks per node of the EP group, for the exchange. ranks_per_node > 0 pretends (it must divide ep);
// else the shared-memory nodes, gathered from every rank, must hold equal contiguous runs of EP ranks
// (dsmoe_a2a_node_layout). Every rank sees the same table, so every rank reaches the same verdict:
// *ok = 0 with the reason in *why.
static dsmoe_status node_layout(dsmoe_moe_layer *L, int *G, int *ok, dsmoe_err *why, dsmoe_err *err) {
    const dsmoe_moe_config *c = &L->cfg;
    int p = c->ep;
    *ok = 0;
    if (c->ranks_per_node > 0) {
        if (p % c->ranks_per_node == 0) *G = c->ranks_per_node, *ok = 1;
        else dsmoe_err_set(why, DSMOE_ERR_INVALID, "ranks_per_node %d does not divide the %d ranks of the EP group",
                           c->ranks_per_node, p);
        return DSMOE_OK;
    }
    int *node = dsmoe_calloc((size_t)p, sizeof *node, "moe layer: node table", err);
    int *leader = dsmoe_calloc((size_t)p, sizeof *leader, "moe layer: node table", err);
    dsmoe_status st = node && leader ? dsmoe_ctl_allgather(c->ep_ctl, &L->rt->node, node, sizeof(int), err)
                                     : DSMOE_ERR_NOMEM;
    if (st != DSMOE_OK) {
        free(node);
        free(leader);
        return st;
    }
    dsmoe_a2a_leaders(node, p, leader); // the EP rank of the first rank on each node (rt->node, found once)
    free(node);
    *ok = dsmoe_a2a_node_layout(leader, p, G, why) == DSMOE_OK;
    free(leader);
    return DSMOE_OK;
}

// Collective over the EP group: creates the exchange. A layout unfit for the hierarchical all-to-all
// is an error when it was asked for; AUTO then takes flat (saying so once per process, from EP rank 0),
// and flat needs no layout: G = 1 (every rank its own node) then only shapes the plan's counts.
static dsmoe_status exchange_setup(dsmoe_moe_layer *L, dsmoe_err *err) {
    static int warned; // AUTO's fall-back is said once, not once per layer
    const dsmoe_moe_config *c = &L->cfg;
    dsmoe_a2a_algo algo = (dsmoe_a2a_algo)c->alltoall;
    int G = 1, ok = 0;
    dsmoe_err why = {0};
    DSMOE_TRY(node_layout(L, &G, &ok, &why, err));
    if (!ok) {
        if (algo == DSMOE_A2A_HIERARCHICAL)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: alltoall = hierarchical: %s", why.msg);
        if (algo == DSMOE_A2A_AUTO && L->ep_rank == 0 && !warned) {
            warned = 1;
            fprintf(stderr, "dsmoe: moe layer: alltoall = auto uses the flat all-to-all: %s\n", why.msg);
        }
        algo = DSMOE_A2A_FLAT;
        G = 1;
    }
    return dsmoe_exchange_create(L->rt, c->ep_ctl, algo, G, &L->ex, err);
}

dsmoe_status dsmoe_moe_layer_create(const dsmoe_runtime *rt, const dsmoe_moe_config *cfg, dsmoe_moe_layer **layer,
                                    dsmoe_err *err) {
    *layer = NULL;
    DSMOE_TRY(check_config(rt, cfg, err));
    dsmoe_moe_layer *L = calloc(1, sizeof *L);
    if (!L) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "moe layer: out of memory for the layer struct");
    L->rt = rt;
    L->cfg = *cfg;
    L->ep = cfg->ep;
    L->ep_rank = rt->comm->group_rank(cfg->ep_group);
    L->E_local = cfg->E / cfg->ep;
    L->aux_group = cfg->aux_group ? cfg->aux_group : rt->world;
    L->dt = cfg->dt;
    L->esz = dsmoe_dtype_size(cfg->dt);
    // The collective set-up first, while every rank still takes the same path; then local allocations,
    // with the capacity buffers at their size when tokens are dropped (dropless grows them by step).
    dsmoe_status s = exchange_setup(L, err);
    if (s == DSMOE_OK) s = create_buffers(L, err);
    if (s == DSMOE_OK && cfg->drop_tokens) {
        int ct = dsmoe_capacity(cfg->S, cfg->E, cfg->K, cfg->capacity_factor, cfg->min_capacity);
        int ce = dsmoe_capacity(cfg->S, cfg->E, cfg->K, cfg->eval_capacity_factor, cfg->min_capacity);
        s = ensure_capacity(L, ct > ce ? ct : ce, err);
    }
    if (s != DSMOE_OK) {
        dsmoe_moe_layer_free(L);
        return s;
    }
    *layer = L;
    return DSMOE_OK;
}

const dsmoe_exchange *dsmoe_moe_layer_exchange(const dsmoe_moe_layer *L) { return L->ex; }

// ----------------------------------------------------------------------------------------------------
// capacity and exchange

// Dropless: the largest count any expert received on any rank of the EP group. The host needs it (it
// sizes the buffers and the exchange), so this is the layer's one wait; the maximum is taken by the
// comm plugin on device memory, like every other reduction.
static dsmoe_status capacity_dropless(dsmoe_moe_layer *L, int *C, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int E = L->cfg.E;
    KCALL(rt, copy_to_host, L->stage_counts, L->counts, (size_t)E * sizeof(int32_t));
    DSMOE_TRY(dsmoe_rt_wait(rt, err));
    int32_t mx = 0;
    for (int e = 0; e < E; e++)
        if (L->stage_counts[e] > mx) mx = L->stage_counts[e];
    KCALL(rt, copy_to_device, L->counts, &mx, sizeof mx);
    CCOLL(rt, allreduce, L->cfg.ep_group, DSMOE_IN_PLACE, L->counts, 1, DSMOE_INT32, DSMOE_MAX);
    KCALL(rt, copy_to_host, L->stage_counts, L->counts, sizeof mx);
    DSMOE_TRY(dsmoe_rt_wait(rt, err));
    *C = L->stage_counts[0];
    return DSMOE_OK;
}

// Each rank sends block r of `src` (E_local * C * width elements) to rank r; dst block r comes from rank r.
static dsmoe_status exchange(dsmoe_moe_layer *L, void *dst, const void *src, int width, dsmoe_err *err) {
    size_t bytes = (size_t)L->E_local * (size_t)L->C * (size_t)width * L->esz;
    return dsmoe_exchange_alltoall(L->ex, src, dst, bytes, err);
}

// ----------------------------------------------------------------------------------------------------
// load-balancing loss

// aux (2E + 1) = [P (E), N (E), S_tot] over the scope; gate_assign has written this rank's. BATCH scope:
// all-reduced (SUM in double) over aux_group on the device; the comm plugin's reductions give the same
// result on every rank, so every rank holds the same l_aux.
static dsmoe_status aux_reduce(dsmoe_moe_layer *L, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    if (L->cfg.aux_scope != DSMOE_AUX_SCOPE_BATCH || rt->comm->group_size(L->aux_group) == 1) return DSMOE_OK;
    CCOLL(rt, allreduce, L->aux_group, DSMOE_IN_PLACE, L->aux, 2 * (size_t)L->cfg.E + 1, DSMOE_FLOAT64, DSMOE_SUM);
    return DSMOE_OK;
}

// l_aux = E * sum_e (P_e / S_tot) * (N_e / S_tot); 0 without tokens. v: the staged sums (host).
static double aux_loss(const double *v, int E) {
    double St = v[2 * E], a = 0.0;
    if (!(St > 0.0)) return 0.0;
    for (int e = 0; e < E; e++) a += (v[e] / St) * (v[E + e] / St);
    return E * a;
}

dsmoe_status dsmoe_moe_stats_copy(dsmoe_moe_layer *L, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int E = L->cfg.E;
    KCALL(rt, copy_to_host, L->stage, L->kept, (size_t)E * sizeof(int32_t));
    KCALL(rt, copy_to_host, (char *)L->stage + stage_aux_offset(E), L->aux, (2 * (size_t)E + 1) * sizeof(double));
    return DSMOE_OK;
}

void dsmoe_moe_stats_read(dsmoe_moe_layer *L, dsmoe_moe_stats *stats) {
    int E = L->cfg.E;
    const int32_t *kept = L->stage;
    const double *aux = (const double *)((const char *)L->stage + stage_aux_offset(E));
    long total = 0;
    for (int e = 0; e < E; e++) {
        L->expert_load[e] = kept[e];
        total += kept[e];
    }
    stats->aux_loss = (float)aux_loss(aux, E);
    stats->capacity = L->C;
    stats->routed = (long)L->S_last * L->cfg.K;
    stats->dropped = (long)L->S_last * L->cfg.K - total;
    stats->expert_load = L->expert_load;
}

// ----------------------------------------------------------------------------------------------------
// expert FFN: one grouped call per stage over the groups g = src * E_local + el (rows: the kept count
// from source src, read by the plugin from recv_cnt on the device; weight el = g % E_local)

// A grouped GEMM over capacity blocks: a (rows, k) blocks of abuf, weights w (n, k) (trans_b) or (k, n),
// c (rows, n) blocks of cbuf.
static dsmoe_grouped_gemm groups_gemm(const dsmoe_moe_layer *L, const void *abuf, int k, const void *w,
                                      int trans_b, void *cbuf, int n) {
    size_t C = (size_t)L->C;
    return (dsmoe_grouped_gemm){
        .groups = L->cfg.E, .counts = L->recv_cnt, .m_max = L->C, .n = n, .k = k, .alpha = 1.0f, .beta = 0.0f,
        .a = abuf, .a_type = L->dt, .lda = k, .a_stride = C * (size_t)k,
        .b = w, .b_type = L->dt, .ldb = trans_b ? k : n, .b_stride = (size_t)n * (size_t)k, .b_groups = L->E_local,
        .trans_b = trans_b,
        .c = cbuf, .c_type = L->dt, .ldc = n, .c_stride = C * (size_t)n,
    };
}

// y (rows, M) = gelu(x (rows, M) @ w1[el]^T + b1[el]) @ w2[el]^T + b2[el] for every group; x = xbuf
// (recv, or send itself when nothing moves).
// The expert weights as GEMM operands: the float32 masters, or their bfloat16 copies.
static const void *gemm_w1(const dsmoe_moe_layer *L, const dsmoe_moe_weights *w) {
    return L->dt == DSMOE_FLOAT32 ? (const void *)w->w1 : w->w1_lp;
}
static const void *gemm_w2(const dsmoe_moe_layer *L, const dsmoe_moe_weights *w) {
    return L->dt == DSMOE_FLOAT32 ? (const void *)w->w2 : w->w2_lp;
}

static dsmoe_status experts_forward(dsmoe_moe_layer *L, const dsmoe_moe_weights *w, const void *xbuf,
                                    dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int M = L->cfg.M, F = L->cfg.F;
    dsmoe_grouped_gemm fc = groups_gemm(L, xbuf, M, gemm_w1(L, w), 1, L->act, F); // h = x w1^T + b1, act = gelu(h)
    fc.epilogue = DSMOE_EPI_BIAS_GELU;
    fc.bias = w->b1;
    fc.bias_stride = (size_t)F;
    fc.aux = L->h;
    KCALL(rt, gemm_grouped, &fc);
    dsmoe_grouped_gemm proj = groups_gemm(L, L->act, F, gemm_w2(L, w), 1, L->yexp, M); // y = act w2^T + b2
    proj.epilogue = DSMOE_EPI_BIAS;
    proj.bias = w->b2;
    proj.bias_stride = (size_t)M;
    KCALL(rt, gemm_grouped, &proj);
    return DSMOE_OK;
}

// dw[el] (n, k) += dy^T @ x and db[el] (n) += column sums of dy, summed over the groups of expert el in
// ascending group order (a fixed order, whatever the plugin runs concurrently).
static dsmoe_grouped_wgrad groups_wgrad(const dsmoe_moe_layer *L, const void *dybuf, int n, const void *xbuf, int k,
                                        float *dw, float *db) {
    size_t C = (size_t)L->C;
    return (dsmoe_grouped_wgrad){
        .groups = L->cfg.E, .counts = L->recv_cnt, .m_max = L->C, .n = n, .k = k, .alpha = 1.0f,
        .dy = dybuf, .dy_type = L->dt, .dy_stride = C * (size_t)n, .x = xbuf, .x_type = L->dt,
        .x_stride = C * (size_t)k,
        .dw = dw, .dw_stride = (size_t)n * (size_t)k, .b_groups = L->E_local, .dbias = db, .dbias_stride = (size_t)n,
    };
}

// On entry yexp holds dy by source; on return yexp holds dbuf (d expert input) by source.
static dsmoe_status experts_backward(dsmoe_moe_layer *L, const dsmoe_moe_weights *w, dsmoe_moe_weights *gw,
                                     dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int M = L->cfg.M, F = L->cfg.F;
    dsmoe_grouped_wgrad g2 = groups_wgrad(L, L->yexp, M, L->act, F, gw->w2, gw->b2); // dw2 += dy^T act, db2 += sum dy
    KCALL(rt, gemm_grouped_wgrad, &g2);
    // dh (rows, F) = gelu'(h) * (dy (rows, M) @ w2[el] (M, F)), into da
    dsmoe_grouped_gemm dact = groups_gemm(L, L->yexp, M, gemm_w2(L, w), 0, L->da, F);
    dact.epilogue = DSMOE_EPI_DGELU;
    dact.aux = L->h;
    KCALL(rt, gemm_grouped, &dact);
    dsmoe_grouped_wgrad g1 = groups_wgrad(L, L->da, F, L->recv, M, gw->w1, gw->b1); // dw1 += dh^T x, db1 += sum dh
    KCALL(rt, gemm_grouped_wgrad, &g1);
    // dbuf (rows, M) = dh (rows, F) @ w1[el] (F, M), into yexp (dy is consumed)
    dsmoe_grouped_gemm dx = groups_gemm(L, L->da, F, gemm_w1(L, w), 0, L->yexp, M);
    KCALL(rt, gemm_grouped, &dx);
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// the layer

// A profiled inference forward (step->times): waits for the queue and adds the wall time since *t0 to
// times[phase] (0 gating, 1 all-to-all, 2 experts).
static dsmoe_status phase_done(const dsmoe_moe_layer *L, const dsmoe_moe_step *step, int phase, double *t0,
                               dsmoe_err *err) {
    if (!step->times) return DSMOE_OK;
    DSMOE_TRY(dsmoe_rt_wait(L->rt, err));
    double now = dsmoe_now_seconds();
    step->times[phase] += now - *t0;
    *t0 = now;
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_forward(dsmoe_moe_layer *L, const dsmoe_moe_weights *w, const void *x, void *out,
                               const dsmoe_moe_step *step, dsmoe_moe_stats *stats, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    const dsmoe_moe_config *c = &L->cfg;
    if (!step) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe forward: NULL step");
    int S = step->inference ? step->tokens : c->S, M = c->M, E = c->E, K = c->K;
    // The expert matrices are read only as GEMM operands: w1 and w2 in float32, their copies in bfloat16
    // (where the masters may be gone: dsmoe_model_drop_gemm_masters).
    int no_mats = L->dt == DSMOE_FLOAT32 ? !w || !w->w1 || !w->w2 : !w || !w->w1_lp || !w->w2_lp;
    if (no_mats || !w->wg || !w->b1 || !w->b2 || !out || (S > 0 && !x))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe forward: NULL weights (or bfloat16 weight copies), x or out");
    if (step->inference && (S < 0 || S > c->S || step->capacity < 1))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe forward: %d tokens, capacity %d: expected 0 .. %d "
                             "tokens and capacity >= 1", S, step->capacity, c->S);
    double t0 = 0.0;
    if (step->times) { // earlier work is not the layer's
        DSMOE_TRY(dsmoe_rt_wait(rt, err));
        t0 = dsmoe_now_seconds();
    }
    L->have_forward = 0;
    L->S_last = S;
    L->x = x;
    L->gp = (dsmoe_gating_params){
        .S = S, .E = E, .K = K, .noise = c->noise, .random_selection = c->random_token_selection,
        .training = step->training, .seed = dsmoe_rng_key(step->seed, MOE_TAG_GATING, 0, 0),
        .token_offset = step->token_offset,
    };

    // Gate input (float32): x, or x * U(1-eps, 1+eps) per element under jitter while training; the
    // counter is the global element index, so a token gets the same noise on any rank.
    const float *xg = x;
    if (L->dt != DSMOE_FLOAT32) {
        KCALL(rt, convert, L->xg32, F32, x, L->dt, (size_t)S * M);
        xg = L->xg32;
    }
    L->jittered = step->training && c->noise == DSMOE_NOISE_JITTER;
    if (L->jittered) {
        L->jitter_key = dsmoe_rng_key(step->seed, MOE_TAG_JITTER, 0, 0);
        L->jitter_offset = step->token_offset * (uint64_t)M;
        KCALL(rt, mul_uniform_noise, L->xj, xg, F32, (size_t)S * M, c->jitter_eps, L->jitter_key, L->jitter_offset);
        xg = L->xj;
    }
    KCALL(rt, gemm, 0, 1, S, E, M, 1.0f, xg, F32, M, w->wg, F32, M, 0.0f, L->logits, F32, E); // (S, E) = xg wg^T
    // A capacity from the token count is known before routing: one fused op where the plugin has it.
    // Dropless agrees on C from every rank's counts, so route and assign stay two ops around that.
    int C = 0;
    const int known = step->inference || c->drop_tokens;
    if (step->inference)
        C = step->capacity;
    else if (c->drop_tokens)
        C = dsmoe_capacity(S, E, K, step->training ? c->capacity_factor : c->eval_capacity_factor, c->min_capacity);
    if (known && rt->kern->gate) {
        DSMOE_TRY(ensure_capacity(L, C, err));
        KCALL(rt, gate, &L->gp, C, L->logits, L->probs, L->choice, L->counts, L->slot, L->weight, L->kept, L->aux);
    } else {
        KCALL(rt, gate_route, &L->gp, L->logits, L->probs, L->choice, L->counts);
        if (!known) DSMOE_TRY(capacity_dropless(L, &C, err));
        DSMOE_TRY(ensure_capacity(L, C, err));
        KCALL(rt, gate_assign, &L->gp, C, L->probs, L->choice, L->slot, L->weight, L->kept, L->aux);
    }
    L->C = C;
    if (!step->inference) DSMOE_TRY(aux_reduce(L, err)); // inference needs no l_aux (nor its collective)

    KCALL(rt, moe_dispatch, L->send, x, L->dt, L->choice, L->slot, S, K, E, C, M); // (E, C, M)
    DSMOE_TRY(phase_done(L, step, 0, &t0, err));
    // Inference with ep = 1: the exchanges would copy the (E, C, M) blocks onto themselves; the experts
    // read send and combine reads yexp in place. (Training keeps the copies: its backward reuses send.)
    int in_place = step->inference && L->ep == 1;
    // Inference with ep > 1 exchanges only the rows that hold tokens (no capacity padding: at decode
    // most slots are empty): the counts go first, and the host reads them (one wait).
    int variable = step->inference && L->ep > 1;
    if (!in_place && !variable) DSMOE_TRY(exchange(L, L->recv, L->send, M, err));
    // recv_cnt (ep, E_local) = the kept counts each source rank reported for my experts
    DSMOE_TRY(dsmoe_exchange_alltoall(L->ex, L->kept, L->recv_cnt, (size_t)L->E_local * sizeof(int32_t), err));
    const int32_t *kept_host = L->stage, *recv_host = L->stage_counts; // (E) and (ep, E_local), variable only
    if (variable) {
        KCALL(rt, copy_to_host, L->stage, L->kept, (size_t)E * sizeof(int32_t));
        KCALL(rt, copy_to_host, L->stage_counts, L->recv_cnt, (size_t)E * sizeof(int32_t));
        DSMOE_TRY(dsmoe_rt_wait(rt, err));
        DSMOE_TRY(dsmoe_exchange_alltoallv_rows(L->ex, L->send, kept_host, L->recv, recv_host, L->E_local, (size_t)C,
                                                (size_t)M * L->esz, err));
    }
    DSMOE_TRY(phase_done(L, step, 1, &t0, err));
    DSMOE_TRY(experts_forward(L, w, in_place ? L->send : L->recv, err));
    DSMOE_TRY(phase_done(L, step, 2, &t0, err));
    if (variable)
        DSMOE_TRY(dsmoe_exchange_alltoallv_rows(L->ex, L->yexp, recv_host, L->yhome, kept_host, L->E_local, (size_t)C,
                                                (size_t)M * L->esz, err));
    else if (!in_place) DSMOE_TRY(exchange(L, L->yhome, L->yexp, M, err));
    DSMOE_TRY(phase_done(L, step, 1, &t0, err));
    KCALL(rt, moe_combine, out, in_place ? L->yexp : L->yhome, L->dt, L->choice, L->slot, L->weight, S, K, E, C, M);
    DSMOE_TRY(phase_done(L, step, 0, &t0, err));

    if (stats) {
        DSMOE_TRY(dsmoe_moe_stats_copy(L, err));
        DSMOE_TRY(dsmoe_rt_wait(rt, err));
        dsmoe_moe_stats_read(L, stats);
    }
    L->have_forward = !step->inference;
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_backward(dsmoe_moe_layer *L, const dsmoe_moe_weights *w, dsmoe_moe_weights *grads,
                                const void *dout, void *dx, float daux, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    const dsmoe_moe_config *c = &L->cfg;
    int S = c->S, M = c->M, E = c->E, K = c->K, C = L->C;
    if (!L->have_forward)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "moe backward: no forward to differentiate (or it failed)");
    if (!w || !grads || !grads->wg || !grads->w1 || !grads->b1 || !grads->w2 || !grads->b2 || (S > 0 && (!dout || !dx)))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe backward: NULL weights, gradients, dout or dx");
    L->have_forward = 0; // the backward consumes saved activations (yexp, da, xj are overwritten)

    // dy (E, C, M) = weight * dout at kept slots; dweight (S, K) = dot(dout, y)
    KCALL(rt, moe_combine_backward, L->send, L->dweight, dout, L->yhome, L->dt, L->choice, L->slot, L->weight, S, K, E,
          C, M);
    DSMOE_TRY(exchange(L, L->yexp, L->send, M, err));
    DSMOE_TRY(experts_backward(L, w, grads, err));
    DSMOE_TRY(exchange(L, L->send, L->yexp, M, err));
    KCALL(rt, moe_dispatch_backward, dx, L->send, L->dt, L->choice, L->slot, S, K, E, C, M);

    // Router: dlogits (in the logits buffer) -> dwg += dlogits^T xg, d(xg) = dlogits @ wg. The l_aux part
    // (daux * E * N_e / S_tot^2 per token) is formed by the plugin from the reduced sums on the device.
    float *dlogits = L->logits;
    KCALL(rt, zero, dlogits, (size_t)S * E * sizeof(float));
    KCALL(rt, gate_backward, &L->gp, dlogits, L->probs, L->choice, L->slot, L->dweight, L->aux, daux);
    const float *xg = L->jittered ? L->xj : L->dt != DSMOE_FLOAT32 ? L->xg32 : (const float *)L->x;
    KCALL(rt, gemm, 1, 0, E, M, S, 1.0f, dlogits, F32, E, xg, F32, M, 1.0f, grads->wg, F32, M);
    if (!L->jittered && L->dt == DSMOE_FLOAT32) {
        KCALL(rt, gemm, 0, 0, S, M, E, 1.0f, dlogits, F32, E, w->wg, F32, M, 1.0f, dx, F32, M);
        return DSMOE_OK;
    }
    // d(xg) in float32; under jitter dx gets d(xg) * u with the forward's u (xj is free now and takes
    // the product); in bfloat16 it is narrowed once (into xg32, free too) and then added to dx.
    KCALL(rt, gemm, 0, 0, S, M, E, 1.0f, dlogits, F32, E, w->wg, F32, M, 0.0f, L->dxj, F32, M);
    const float *dxg = L->dxj;
    if (L->jittered) {
        KCALL(rt, mul_uniform_noise, L->xj, L->dxj, F32, (size_t)S * M, c->jitter_eps, L->jitter_key,
              L->jitter_offset);
        dxg = L->xj;
    }
    if (L->dt == DSMOE_FLOAT32) {
        KCALL(rt, axpy, dx, 1.0f, dxg, F32, (size_t)S * M);
    } else {
        KCALL(rt, convert, L->xg32, L->dt, dxg, F32, (size_t)S * M);
        KCALL(rt, axpy, dx, 1.0f, L->xg32, L->dt, (size_t)S * M);
    }
    return DSMOE_OK;
}
