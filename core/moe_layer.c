// core/moe_layer.c: one MoE layer, forward and backward (see moe_layer.h and docs/moe-layer.md).
//
// Pipeline (forward): router GEMM -> gate_route -> capacity -> gate_assign -> l_aux (its sums reduced
// over the scope) -> dispatch (E, C, M) -> all-to-all -> expert FFN as grouped GEMMs over (source rank,
// local expert) -> all-to-all back -> combine. The backward walks the same steps in reverse.
//
// Invariants: every buffer is kernel-plugin memory except the host_* arrays and the group pointer
// tables; forward outputs are assigned, gradients accumulate (+=) into the caller's buffers. Buffers of
// capacity size hold rows of kept tokens only: a group's rows beyond its kept count are never read
// (the GEMMs, bias and GELU run on m = kept rows; combine and dispatch-backward only visit kept slots),
// so those rows are never cleared between steps.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"    // dsmoe_capacity
#include "dsmoe/rng.h" // dsmoe_rng_key
#include "moe_layer.h"

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
    float *dxj;       // (S, M) d(gate input) before the jitter factor (noise = JITTER only)
    int32_t *cnt;     // (2, E) staging of kept counts and the dropless maximum for the comm plugin
    double *aux_stage; // (2E + 1) staging of l_aux's sums for the comm plugin

    // Capacity buffers: (E, C, width) = (ep, E_local, C, width), sized for cap.
    float *send;      // (E, C, M) tokens by destination expert; backward: dy by expert, then dx rows home
    float *recv;      // (ep, E_local, C, M) tokens by source rank (kept for dw1)
    float *h;         // (ep, E_local, C, F) fc pre-activation (kept for the GELU backward)
    float *act;       // (ep, E_local, C, F) gelu(h) (kept for dw2); backward: dh
    float *da;        // (ep, E_local, C, F) backward: d(act)
    float *yexp;      // (ep, E_local, C, M) expert outputs by source; backward: dy, then dbuf by source
    float *yhome;     // (E, C, M) expert outputs of this rank's tokens (kept for dweight)

    // Host arrays.
    int32_t *host_counts;   // (E) tokens choosing each expert (gate_route)
    int32_t *host_kept;     // (E) tokens this rank keeps per expert (gate_assign)
    int32_t *host_recv;     // (ep, E_local) kept counts the sources sent for my experts
    int32_t *host_first;    // (E) first choices per expert on this rank (gate_assign)
    double *aux_sums;       // (2E + 1) l_aux's sums over the scope: P (E), N (E), S_tot
    float *aux_grad;        // (E) backward: d(daux * l_aux)/d probs[s,e] for this rank's tokens
    int *expert_load;       // (E) stats copy of host_kept
    int *gm;                // (E) group rows: group g = src * E_local + el
    const float **ga, **gb; // (E) group operands
    float **gc;             // (E) group outputs

    // What the backward needs of the last forward.
    int have_forward;
    int C;
    int jittered;
    uint64_t jitter_key, jitter_offset;
    dsmoe_gating_params gp;
    const float *x;         // the caller's x (must stay unchanged until the backward)
};

// ----------------------------------------------------------------------------------------------------
// buffers

static dsmoe_status layer_alloc(dsmoe_moe_layer *L, size_t bytes, void **p, const char *what, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    if (rt->kern->alloc(rt->kctx, bytes, p) != DSMOE_OK)
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "moe layer: allocating %s (%zu bytes) with kernel plugin '%s': %s",
                             what, bytes, rt->kern->name, rt->kern->last_error(rt->kctx));
    return DSMOE_OK;
}

static void free_capacity_buffers(dsmoe_moe_layer *L) {
    float **bufs[] = {&L->send, &L->recv, &L->h, &L->act, &L->da, &L->yexp, &L->yhome};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        L->rt->kern->free(L->rt->kctx, *bufs[i]);
        *bufs[i] = NULL;
    }
    L->cap = 0;
}

// Grows the capacity buffers to hold C slots per expert (never shrinks: dropless C varies by step).
static dsmoe_status ensure_capacity(dsmoe_moe_layer *L, int C, dsmoe_err *err) {
    if (C <= L->cap && L->send) return DSMOE_OK;
    free_capacity_buffers(L);
    size_t rows = (size_t)L->cfg.E * (size_t)C, M = (size_t)L->cfg.M, F = (size_t)L->cfg.F;
    struct { float **p; size_t n; const char *what; } b[] = {
        {&L->send, rows * M, "dispatch buffer (E, C, M)"}, {&L->recv, rows * M, "receive buffer (ep, E_local, C, M)"},
        {&L->h, rows * F, "expert pre-activation (ep, E_local, C, F)"},
        {&L->act, rows * F, "expert activation (ep, E_local, C, F)"},
        {&L->da, rows * F, "expert activation gradient (ep, E_local, C, F)"},
        {&L->yexp, rows * M, "expert output (ep, E_local, C, M)"}, {&L->yhome, rows * M, "returned output (E, C, M)"},
    };
    for (size_t i = 0; i < sizeof b / sizeof b[0]; i++) {
        dsmoe_status s = layer_alloc(L, b[i].n * sizeof(float), (void **)b[i].p, b[i].what, err);
        if (s != DSMOE_OK) {
            free_capacity_buffers(L);
            return s;
        }
    }
    // The exchange's packing workspace for blocks of this size (the largest the layer sends).
    DSMOE_TRY(dsmoe_exchange_reserve(L->ex, (size_t)L->E_local * (size_t)C * M * sizeof(float), err));
    L->cap = C;
    return DSMOE_OK;
}

void dsmoe_moe_layer_free(dsmoe_moe_layer *L) {
    if (!L) return;
    const dsmoe_runtime *rt = L->rt;
    free_capacity_buffers(L);
    void *bufs[] = {L->logits, L->probs, L->choice, L->slot, L->weight, L->dweight, L->xj, L->dxj, L->cnt,
                    L->aux_stage};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) rt->kern->free(rt->kctx, bufs[i]);
    dsmoe_exchange_free(L->ex); // collective over the EP group
    free(L->host_counts);
    free(L->host_kept);
    free(L->host_recv);
    free(L->host_first);
    free(L->aux_sums);
    free(L->aux_grad);
    free(L->expert_load);
    free(L->gm);
    free(L->ga);
    free(L->gb);
    free(L->gc);
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
    // An unset MPI_Comm is MPI_COMM_NULL, or 0 from a zeroed struct (not a valid handle in any MPI).
    if (c->ep_comm == MPI_COMM_NULL || c->ep_comm == (MPI_Comm)0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: ep_comm is not set (the EP group's communicator, ep=%d)",
                             c->ep);
    int cs = 0;
    if (MPI_Comm_size(c->ep_comm, &cs) != MPI_SUCCESS || cs != c->ep)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: ep=%d but ep_comm has %d ranks", c->ep, cs);
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
    if (c->noise == DSMOE_NOISE_JITTER && !(c->jitter_eps >= 0.0f && c->jitter_eps < 1.0f))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe layer: jitter_eps=%g: expected 0 <= eps < 1",
                             (double)c->jitter_eps);
    return DSMOE_OK;
}

static dsmoe_status create_buffers(dsmoe_moe_layer *L, dsmoe_err *err) {
    size_t S = (size_t)L->cfg.S, E = (size_t)L->cfg.E, K = (size_t)L->cfg.K, M = (size_t)L->cfg.M;
    DSMOE_TRY(layer_alloc(L, S * E * sizeof(float), (void **)&L->logits, "router logits (S, E)", err));
    DSMOE_TRY(layer_alloc(L, S * E * sizeof(float), (void **)&L->probs, "router probabilities (S, E)", err));
    DSMOE_TRY(layer_alloc(L, S * K * sizeof(int32_t), (void **)&L->choice, "choices (S, K)", err));
    DSMOE_TRY(layer_alloc(L, S * K * sizeof(int32_t), (void **)&L->slot, "slots (S, K)", err));
    DSMOE_TRY(layer_alloc(L, S * K * sizeof(float), (void **)&L->weight, "combine weights (S, K)", err));
    DSMOE_TRY(layer_alloc(L, S * K * sizeof(float), (void **)&L->dweight, "combine weight gradients (S, K)", err));
    DSMOE_TRY(layer_alloc(L, 2 * E * sizeof(int32_t), (void **)&L->cnt, "count staging (2, E)", err));
    DSMOE_TRY(layer_alloc(L, (2 * E + 1) * sizeof(double), (void **)&L->aux_stage, "l_aux staging (2E + 1)", err));
    if (L->cfg.noise == DSMOE_NOISE_JITTER) {
        DSMOE_TRY(layer_alloc(L, S * M * sizeof(float), (void **)&L->xj, "jittered gate input (S, M)", err));
        DSMOE_TRY(layer_alloc(L, S * M * sizeof(float), (void **)&L->dxj, "gate input gradient (S, M)", err));
    }
    L->host_counts = dsmoe_calloc(E, sizeof(int32_t), "moe host counts", err);
    L->host_kept = dsmoe_calloc(E, sizeof(int32_t), "moe host kept counts", err);
    L->host_recv = dsmoe_calloc(E, sizeof(int32_t), "moe received counts", err);
    L->host_first = dsmoe_calloc(E, sizeof(int32_t), "moe first-choice counts", err);
    L->aux_sums = dsmoe_calloc(2 * E + 1, sizeof(double), "moe l_aux sums", err);
    L->aux_grad = dsmoe_calloc(E, sizeof(float), "moe l_aux gradient", err);
    L->expert_load = dsmoe_calloc(E, sizeof(int), "moe expert load", err);
    L->gm = dsmoe_calloc(E, sizeof(int), "moe group rows", err);
    L->ga = dsmoe_calloc(E, sizeof(float *), "moe group table", err);
    L->gb = dsmoe_calloc(E, sizeof(float *), "moe group table", err);
    L->gc = dsmoe_calloc(E, sizeof(float *), "moe group table", err);
    if (!L->host_counts || !L->host_kept || !L->host_recv || !L->host_first || !L->aux_sums || !L->aux_grad ||
        !L->expert_load || !L->gm || !L->ga || !L->gb || !L->gc)
        return DSMOE_ERR_NOMEM;
    return DSMOE_OK;
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
    int *leader = dsmoe_calloc((size_t)p, sizeof *leader, "moe layer: node table", err);
    if (!leader) return DSMOE_ERR_NOMEM;
    MPI_Comm node;
    int rank = 0, rc = MPI_Comm_rank(c->ep_comm, &rank);
    int mine = rank;
    if (rc == MPI_SUCCESS) rc = MPI_Comm_split_type(c->ep_comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    if (rc == MPI_SUCCESS) {
        rc = MPI_Allreduce(&rank, &mine, 1, MPI_INT, MPI_MIN, node); // EP rank of my node's first rank
        MPI_Comm_free(&node);
    }
    if (rc == MPI_SUCCESS) rc = MPI_Allgather(&mine, 1, MPI_INT, leader, 1, MPI_INT, c->ep_comm);
    if (rc != MPI_SUCCESS) {
        free(leader);
        return dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "moe layer: finding the nodes of the EP group (MPI error %d)", rc);
    }
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
    return dsmoe_exchange_create(L->rt, c->ep_comm, algo, G, &L->ex, err);
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

// Device plugins may queue work: the comm plugin must see finished buffers.
static dsmoe_status kernel_sync(const dsmoe_runtime *rt, dsmoe_err *err) {
    dsmoe_status s = rt->kern->synchronize(rt->kctx);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "kernel plugin '%s': synchronize failed: %s", rt->kern->name,
                             rt->kern->last_error(rt->kctx));
    return DSMOE_OK;
}

// Dropless: the largest count any expert received on any rank of the EP group. Staged through kernel
// memory so that a comm plugin that only accepts device memory works too.
static dsmoe_status capacity_dropless(dsmoe_moe_layer *L, int *C, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int32_t mx = 0;
    for (int e = 0; e < L->cfg.E; e++)
        if (L->host_counts[e] > mx) mx = L->host_counts[e];
    KCALL(rt, copy_to_device, L->cnt, &mx, sizeof mx);
    DSMOE_TRY(kernel_sync(rt, err));
    CCALL(rt, allreduce, L->cfg.ep_group, DSMOE_IN_PLACE, L->cnt, 1, DSMOE_INT32, DSMOE_MAX);
    KCALL(rt, copy_to_host, &mx, L->cnt, sizeof mx);
    *C = mx;
    return DSMOE_OK;
}

// Each rank sends block r of `src` (E_local * C * width floats) to rank r; dst block r comes from rank r.
// (The exchange waits for pending kernel work itself.)
static dsmoe_status exchange(dsmoe_moe_layer *L, float *dst, const float *src, int width, dsmoe_err *err) {
    size_t bytes = (size_t)L->E_local * (size_t)L->C * (size_t)width * sizeof(float);
    return dsmoe_exchange_alltoall(L->ex, src, dst, bytes, err);
}

// host_recv (ep, E_local) = the kept counts each source rank reported for my experts.
static dsmoe_status exchange_counts(dsmoe_moe_layer *L, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int E = L->cfg.E;
    KCALL(rt, copy_to_device, L->cnt, L->host_kept, (size_t)E * sizeof(int32_t));
    DSMOE_TRY(dsmoe_exchange_alltoall(L->ex, L->cnt, L->cnt + E, (size_t)L->E_local * sizeof(int32_t), err));
    KCALL(rt, copy_to_host, L->host_recv, L->cnt + E, (size_t)E * sizeof(int32_t));
    for (int g = 0; g < E; g++)
        if (L->host_recv[g] < 0 || L->host_recv[g] > L->C)
            return dsmoe_err_set(err, DSMOE_ERR_INTERNAL,
                                 "moe layer: rank %d of the EP group reported %d kept tokens for expert %d; "
                                 "expected 0..C=%d (ranks disagree on capacity?)",
                                 g / L->E_local, L->host_recv[g], L->ep_rank * L->E_local + g % L->E_local, L->C);
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// load-balancing loss

// aux_sums (2E + 1) = [P (E), N (E), S_tot] over the scope; gate_assign has written this rank's P.
// BATCH scope: all-reduced (SUM in double) over aux_group, staged through kernel memory like the counts;
// the comm plugin's reductions give the same result on every rank, so every rank holds the same l_aux.
static dsmoe_status aux_reduce(dsmoe_moe_layer *L, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int E = L->cfg.E;
    double *v = L->aux_sums;
    for (int e = 0; e < E; e++) v[E + e] = L->host_first[e];
    v[2 * E] = L->cfg.S;
    if (L->cfg.aux_scope != DSMOE_AUX_SCOPE_BATCH || rt->comm->group_size(L->aux_group) == 1) return DSMOE_OK;
    size_t n = 2 * (size_t)E + 1;
    KCALL(rt, copy_to_device, L->aux_stage, v, n * sizeof(double));
    DSMOE_TRY(kernel_sync(rt, err));
    CCALL(rt, allreduce, L->aux_group, DSMOE_IN_PLACE, L->aux_stage, n, DSMOE_FLOAT64, DSMOE_SUM);
    KCALL(rt, copy_to_host, v, L->aux_stage, n * sizeof(double));
    return DSMOE_OK;
}

// l_aux = E * sum_e (P_e / S_tot) * (N_e / S_tot); 0 without tokens.
static double aux_loss(const dsmoe_moe_layer *L) {
    int E = L->cfg.E;
    const double *v = L->aux_sums;
    double St = v[2 * E], a = 0.0;
    if (!(St > 0.0)) return 0.0;
    for (int e = 0; e < E; e++) a += (v[e] / St) * (v[E + e] / St);
    return E * a;
}

// aux_grad (E) = d(daux * l_aux)/d probs[s,e] = daux * E * N_e / S_tot^2, the same for each of this
// rank's tokens s (N is a count: it has no gradient).
static void aux_backward(dsmoe_moe_layer *L, float daux) {
    int E = L->cfg.E;
    const double *v = L->aux_sums;
    double St = v[2 * E];
    for (int e = 0; e < E; e++) L->aux_grad[e] = St > 0.0 ? (float)((double)daux * E * v[E + e] / (St * St)) : 0.0f;
}

// ----------------------------------------------------------------------------------------------------
// expert FFN over the groups g = src * E_local + el (rows: the kept count from source src)

// Group g's block of a capacity buffer of row width `width`.
static inline float *block(const dsmoe_moe_layer *L, float *buf, int g, int width) {
    return buf + (size_t)g * (size_t)L->C * (size_t)width;
}

// Points the group tables at: a = block of abuf, b = expert el's slice of wbase (wstride floats each),
// c = block of cbuf.
static void bind_groups(dsmoe_moe_layer *L, const float *abuf, int awidth, const float *wbase, size_t wstride,
                        float *cbuf, int cwidth) {
    for (int g = 0; g < L->cfg.E; g++) {
        L->gm[g] = L->host_recv[g];
        L->ga[g] = block(L, (float *)abuf, g, awidth);
        L->gb[g] = wbase + (size_t)(g % L->E_local) * wstride;
        L->gc[g] = block(L, cbuf, g, cwidth);
    }
}

// y (rows, M) = gelu(x (rows, M) @ w1[el]^T + b1[el]) @ w2[el]^T + b2[el] for every group.
static dsmoe_status experts_forward(dsmoe_moe_layer *L, const dsmoe_moe_weights *w, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int E = L->cfg.E, M = L->cfg.M, F = L->cfg.F;
    size_t FM = (size_t)F * M;
    bind_groups(L, L->recv, M, w->w1, FM, L->h, F);
    KCALL(rt, gemm_grouped, E, 0, 1, L->gm, F, M, 1.0f, L->ga, M, L->gb, M, 0.0f, L->gc, F);
    for (int g = 0; g < E; g++) {
        if (!L->gm[g]) continue;
        KCALL(rt, bias_add, block(L, L->h, g, F), w->b1 + (size_t)(g % L->E_local) * F, L->gm[g], F);
        KCALL(rt, gelu_forward, block(L, L->act, g, F), block(L, L->h, g, F), (size_t)L->gm[g] * F);
    }
    bind_groups(L, L->act, F, w->w2, FM, L->yexp, M);
    KCALL(rt, gemm_grouped, E, 0, 1, L->gm, M, F, 1.0f, L->ga, F, L->gb, F, 0.0f, L->gc, M);
    for (int g = 0; g < E; g++)
        if (L->gm[g]) KCALL(rt, bias_add, block(L, L->yexp, g, M), w->b2 + (size_t)(g % L->E_local) * M, L->gm[g], M);
    return DSMOE_OK;
}

// dw[el] (n, k) += dy^T @ x summed over the groups of expert el: one wgrad call per source rank, so
// no call names the same dw twice (a device plugin may run the groups of one call concurrently).
static dsmoe_status experts_wgrad(dsmoe_moe_layer *L, const float *dybuf, int n, const float *xbuf, int k, float *dw,
                                  dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int El = L->E_local;
    for (int g = 0; g < L->cfg.E; g++) {
        L->ga[g] = block(L, (float *)dybuf, g, n);
        L->gb[g] = block(L, (float *)xbuf, g, k);
        L->gc[g] = dw + (size_t)(g % El) * (size_t)n * k;
    }
    for (int src = 0; src < L->ep; src++)
        KCALL(rt, gemm_grouped_wgrad, El, L->gm + src * El, n, k, 1.0f, L->ga + src * El, L->gb + src * El,
              L->gc + src * El);
    return DSMOE_OK;
}

// On entry yexp holds dy by source; on return yexp holds dbuf (d expert input) by source.
static dsmoe_status experts_backward(dsmoe_moe_layer *L, const dsmoe_moe_weights *w, dsmoe_moe_weights *gw,
                                     dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    int E = L->cfg.E, El = L->E_local, M = L->cfg.M, F = L->cfg.F;
    size_t FM = (size_t)F * M;
    // da (rows, F) = dy (rows, M) @ w2[el] (M, F)
    bind_groups(L, L->yexp, M, w->w2, FM, L->da, F);
    KCALL(rt, gemm_grouped, E, 0, 0, L->gm, F, M, 1.0f, L->ga, M, L->gb, F, 0.0f, L->gc, F);
    DSMOE_TRY(experts_wgrad(L, L->yexp, M, L->act, F, gw->w2, err)); // dw2 (M, F) += dy^T act
    for (int g = 0; g < E; g++) {
        if (!L->gm[g]) continue;
        size_t n = (size_t)L->gm[g] * F;
        KCALL(rt, bias_backward, gw->b2 + (size_t)(g % El) * M, block(L, L->yexp, g, M), L->gm[g], M);
        // act is not needed any more: it becomes dh = gelu'(h) * da.
        KCALL(rt, zero, block(L, L->act, g, F), n * sizeof(float));
        KCALL(rt, gelu_backward, block(L, L->act, g, F), block(L, L->h, g, F), block(L, L->da, g, F), n);
        KCALL(rt, bias_backward, gw->b1 + (size_t)(g % El) * F, block(L, L->act, g, F), L->gm[g], F);
    }
    DSMOE_TRY(experts_wgrad(L, L->act, F, L->recv, M, gw->w1, err)); // dw1 (F, M) += dh^T x
    // dbuf (rows, M) = dh (rows, F) @ w1[el] (F, M), into yexp (dy is consumed)
    bind_groups(L, L->act, F, w->w1, FM, L->yexp, M);
    KCALL(rt, gemm_grouped, E, 0, 0, L->gm, M, F, 1.0f, L->ga, F, L->gb, M, 0.0f, L->gc, M);
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// the layer

dsmoe_status dsmoe_moe_forward(dsmoe_moe_layer *L, const dsmoe_moe_weights *w, const float *x, float *out,
                               const dsmoe_moe_step *step, dsmoe_moe_stats *stats, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    const dsmoe_moe_config *c = &L->cfg;
    int S = c->S, M = c->M, E = c->E, K = c->K;
    if (!w || !w->wg || !w->w1 || !w->b1 || !w->w2 || !w->b2 || !out || !step || (S > 0 && !x))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe forward: NULL weights, x, out or step");
    L->have_forward = 0;
    L->x = x;
    L->gp = (dsmoe_gating_params){
        .S = S, .E = E, .K = K, .noise = c->noise, .random_selection = c->random_token_selection,
        .training = step->training, .seed = dsmoe_rng_key(step->seed, MOE_TAG_GATING, 0, 0),
        .token_offset = step->token_offset,
    };

    // Gate input: x, or x * U(1-eps, 1+eps) per element under jitter while training; the counter is the
    // global element index, so a token gets the same noise on any rank.
    const float *xg = x;
    L->jittered = step->training && c->noise == DSMOE_NOISE_JITTER;
    if (L->jittered) {
        L->jitter_key = dsmoe_rng_key(step->seed, MOE_TAG_JITTER, 0, 0);
        L->jitter_offset = step->token_offset * (uint64_t)M;
        KCALL(rt, mul_uniform_noise, L->xj, x, (size_t)S * M, c->jitter_eps, L->jitter_key, L->jitter_offset);
        xg = L->xj;
    }
    KCALL(rt, gemm, 0, 1, S, E, M, 1.0f, xg, M, w->wg, M, 0.0f, L->logits, E); // logits (S, E) = xg @ wg^T
    KCALL(rt, gate_route, &L->gp, L->logits, L->probs, L->choice, L->host_counts);

    int C = 0;
    if (c->drop_tokens)
        C = dsmoe_capacity(S, E, K, step->training ? c->capacity_factor : c->eval_capacity_factor, c->min_capacity);
    else
        DSMOE_TRY(capacity_dropless(L, &C, err));
    DSMOE_TRY(ensure_capacity(L, C, err));
    L->C = C;
    KCALL(rt, gate_assign, &L->gp, C, L->probs, L->choice, L->slot, L->weight, L->host_kept, L->aux_sums,
          L->host_first);
    DSMOE_TRY(aux_reduce(L, err));

    KCALL(rt, moe_dispatch, L->send, x, L->choice, L->slot, S, K, E, C, M); // (E, C, M)
    DSMOE_TRY(exchange(L, L->recv, L->send, M, err));
    DSMOE_TRY(exchange_counts(L, err));
    DSMOE_TRY(experts_forward(L, w, err));
    DSMOE_TRY(exchange(L, L->yhome, L->yexp, M, err));
    KCALL(rt, moe_combine, out, L->yhome, L->choice, L->slot, L->weight, S, K, E, C, M);

    if (stats) {
        long kept = 0;
        for (int e = 0; e < E; e++) {
            L->expert_load[e] = L->host_kept[e];
            kept += L->host_kept[e];
        }
        stats->aux_loss = (float)aux_loss(L);
        stats->capacity = C;
        stats->routed = (long)S * K;
        stats->dropped = (long)S * K - kept;
        stats->expert_load = L->expert_load;
    }
    L->have_forward = 1;
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_backward(dsmoe_moe_layer *L, const dsmoe_moe_weights *w, dsmoe_moe_weights *grads,
                                const float *dout, float *dx, float daux, dsmoe_err *err) {
    const dsmoe_runtime *rt = L->rt;
    const dsmoe_moe_config *c = &L->cfg;
    int S = c->S, M = c->M, E = c->E, K = c->K, C = L->C;
    if (!L->have_forward)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "moe backward: no forward to differentiate (or it failed)");
    if (!w || !grads || !grads->wg || !grads->w1 || !grads->b1 || !grads->w2 || !grads->b2 || (S > 0 && (!dout || !dx)))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "moe backward: NULL weights, gradients, dout or dx");
    L->have_forward = 0; // the backward consumes saved activations (act, yexp, xj are overwritten)

    // dy (E, C, M) = weight * dout at kept slots; dweight (S, K) = dot(dout, y)
    KCALL(rt, moe_combine_backward, L->send, L->dweight, dout, L->yhome, L->choice, L->slot, L->weight, S, K, E, C,
          M);
    DSMOE_TRY(exchange(L, L->yexp, L->send, M, err));
    DSMOE_TRY(experts_backward(L, w, grads, err));
    DSMOE_TRY(exchange(L, L->send, L->yexp, M, err));
    KCALL(rt, moe_dispatch_backward, dx, L->send, L->choice, L->slot, S, K, E, C, M);

    // Router: dlogits (in the logits buffer) -> dwg += dlogits^T xg, d(xg) = dlogits @ wg.
    float *dlogits = L->logits;
    KCALL(rt, zero, dlogits, (size_t)S * E * sizeof(float));
    aux_backward(L, daux);
    KCALL(rt, gate_backward, &L->gp, dlogits, L->probs, L->choice, L->slot, L->dweight, L->aux_grad);
    const float *xg = L->jittered ? L->xj : L->x;
    KCALL(rt, gemm, 1, 0, E, M, S, 1.0f, dlogits, E, xg, M, 1.0f, grads->wg, M);
    if (L->jittered) {
        // dx += d(xg) * u with the forward's u; xj is free now and takes the product.
        KCALL(rt, gemm, 0, 0, S, M, E, 1.0f, dlogits, E, w->wg, M, 0.0f, L->dxj, M);
        KCALL(rt, mul_uniform_noise, L->xj, L->dxj, (size_t)S * M, c->jitter_eps, L->jitter_key, L->jitter_offset);
        KCALL(rt, axpy, dx, 1.0f, L->xj, (size_t)S * M);
    } else {
        KCALL(rt, gemm, 0, 0, S, M, E, 1.0f, dlogits, E, w->wg, M, 1.0f, dx, M);
    }
    return DSMOE_OK;
}
