// core/model/moe_layer.h: one MoE layer: gate -> dispatch -> exchange -> experts -> exchange -> combine,
// forward and backward, through the kernel and comm plugins.
// defines: dsmoe_aux_scope, dsmoe_moe_layer, dsmoe_moe_layer_create, dsmoe_moe_forward, dsmoe_moe_backward,
//          dsmoe_moe_layer_exchange
//
// Experts are split over an expert-parallel (EP) group of `ep` ranks: rank r holds the experts
// [r*E_local, (r+1)*E_local), E_local = E/ep. The all-to-all is core/parallel/exchange.h's (flat, hierarchical or
// auto) over the EP communicator; with ep = 1 it is a local copy, so one code path serves every layout.
//
// Capacity: C = dsmoe_capacity(S, E, K, cf, min_capacity) (config.h: max(ceil(S/E * K * cf),
// min_capacity)) from each rank's own S (as DeepSpeed); in dropless mode C = the max over the EP group
// of the tokens any expert received (agreed by an all-reduce before any exchange, so ranks never
// disagree on sizes).
//
// Load-balancing loss: l_aux = E * sum_e (P_e / S_tot) * (N_e / S_tot), P_e = sum of probs[s,e] and
// N_e = first choices of expert e over the tokens of the scope: with DSMOE_AUX_SCOPE_BATCH the sums
// (and S_tot) are all-reduced over aux_group (the data-parallel group: all ranks) at every forward, so
// every rank holds the same l_aux of the whole micro-step, whatever the number of ranks; with
// DSMOE_AUX_SCOPE_RANK they are this rank's (DeepSpeed's behaviour). In both, the backward gives the
// gradient of l_aux with respect to this rank's tokens only.
//
// Exchange layout: the dispatch buffer is (E, C, M) = (ep, E_local, C, M): block r goes to rank r. The
// received buffer is (ep, E_local, C, M) indexed by source rank; expert el runs one grouped GEMM over
// the groups (el, source) with m = the kept counts the source reported (exchanged with the tokens), so
// empty slots cost nothing. Outputs travel back the same way. In inference (step.inference) with ep > 1
// only the filled rows travel: the kept counts go first, the host reads them (one wait) and
// dsmoe_exchange_alltoallv_rows moves the rows (docs/exchange.md).
//
// Activations of the last forward are kept inside the layer for the next backward (one micro-batch
// at a time: forward, backward, forward, ...). Buffers grow when a dropless step needs more.
#ifndef DSMOE_MOE_LAYER_H
#define DSMOE_MOE_LAYER_H
#include "exchange.h"
#include "runtime.h"

// Which tokens l_aux is computed over (deck key moe.aux_loss_scope, same order).
typedef enum { DSMOE_AUX_SCOPE_BATCH = 0, DSMOE_AUX_SCOPE_RANK = 1 } dsmoe_aux_scope;

typedef struct dsmoe_moe_config {
    int S;                    // tokens per rank per micro-batch (B*T)
    int M;                    // hidden
    int F;                    // expert FFN hidden
    int E;                    // experts (global)
    int K;                    // top-k: 1 or 2
    float capacity_factor;    // used when training
    float eval_capacity_factor; // used when not training
    int min_capacity;
    int drop_tokens;          // 0 = dropless
    int random_token_selection;
    int noise;                // dsmoe_noise_policy
    float jitter_eps;
    int ep;                   // EP group size (divides E)
    dsmoe_comm_group *ep_group; // the caller's EP group (size ep); the layer does not own it
    dsmoe_ctl_group *ep_ctl;  // the same ranks as ep_group, in the same order (control plane: set-up)
    int alltoall;             // dsmoe_a2a_algo: FLAT, HIERARCHICAL or AUTO (AUTO falls back to flat
                              // when the EP ranks are not node-contiguous; HIERARCHICAL then fails)
    int ranks_per_node;       // 0 = the real nodes (rt->node); > 0 pretends
    int aux_scope;            // dsmoe_aux_scope
    dsmoe_comm_group *aux_group; // BATCH: the group l_aux's sums are reduced over; NULL = rt->world
    dsmoe_dtype dt;           // activations (x, out, the capacity buffers) and expert GEMM operands:
                              // FLOAT32 (0) or BFLOAT16. Gating is float32 either way: with BFLOAT16 the
                              // gate input is widened to float32 before the router GEMM (as DeepSpeed)
} dsmoe_moe_config;

// Parameters of one layer (pointers into the model's parameter slab, kernel-plugin memory); the
// gradient struct has the same shapes (its w1_lp and w2_lp are unused).
typedef struct dsmoe_moe_weights {
    float *wg; // (E, M) router, no bias; replicated on every rank
    float *w1; // (E_local, F, M) expert fc weights (nn.Linear(M, F).weight per expert)
    float *b1; // (E_local, F)
    float *w2; // (E_local, M, F) expert proj weights (nn.Linear(F, M).weight per expert)
    float *b2; // (E_local, M)
    // With dt = BFLOAT16: w1 and w2 rounded to bfloat16 (the GEMM operands; the caller keeps them equal
    // to the float32 masters; a forward-only caller may leave w1 and w2 NULL). Unused with FLOAT32.
    const void *w1_lp, *w2_lp;
} dsmoe_moe_weights;

// Per forward call.
typedef struct dsmoe_moe_step {
    int training;          // noise and capacity_factor vs eval_capacity_factor
    uint64_t seed;         // counter-RNG key for this layer, step and micro-batch
    uint64_t token_offset; // global index of this rank's first token
    // Inference (forward only, no backward follows): the layer runs the first `tokens` rows of x
    // (0 <= tokens <= cfg.S; a rank with none still takes part in the exchange), with C = capacity
    // instead of the capacity factor's (>= 1, the same on every rank of the EP group: the caller agrees
    // on it; C >= the group's largest `tokens` drops nothing, as an expert gets at most one slot per
    // token). times: when not NULL, the layer waits for the queue after each phase and adds the wall
    // seconds of gating, all-to-all and experts (a profile, at the cost of those waits).
    int inference;
    int tokens;
    int capacity;
    double *times; // (3) gating, all-to-all, experts
} dsmoe_moe_step;

// What the last forward measured (host values: valid after dsmoe_moe_stats_copy, a wait on the queue,
// then dsmoe_moe_stats_read).
typedef struct dsmoe_moe_stats {
    float aux_loss;        // l_aux over the scope's tokens (before the coefficient)
    int capacity;          // C used
    long routed;           // token choices made (S*K)
    long dropped;          // choices dropped by capacity
    int *expert_load;      // (E) tokens kept per expert on this rank (owned by the layer)
} dsmoe_moe_stats;

typedef struct dsmoe_moe_layer dsmoe_moe_layer;

dsmoe_status dsmoe_moe_layer_create(const dsmoe_runtime *rt, const dsmoe_moe_config *cfg,
                                    dsmoe_moe_layer **layer, dsmoe_err *err);
void dsmoe_moe_layer_free(dsmoe_moe_layer *layer);

// out (S, M) = MoE(x (S, M)), both of the layer's dt; x must stay unchanged until the backward.
// Nothing here waits for the queue, except a dropless layer (the host must know its capacity to size the
// exchange) and a non-NULL stats (the forward then waits and fills it: tests and benchmarks). The model
// passes NULL and collects every layer's stats after one wait (dsmoe_moe_stats_copy / _read).
dsmoe_status dsmoe_moe_forward(dsmoe_moe_layer *layer, const dsmoe_moe_weights *w, const void *x,
                               void *out, const dsmoe_moe_step *step, dsmoe_moe_stats *stats, dsmoe_err *err);
// Gradients of the last forward: dx (S, M) +=, grads (same shapes as w) +=.
// daux = d(loss)/d(l_aux) (the aux coefficient times the loss scale); the gate gradient includes the
// part of daux * l_aux that flows through this rank's tokens (with BATCH scope, summing the ranks'
// router gradients gives the gradient of the batch l_aux: weight it once, not once per rank).
dsmoe_status dsmoe_moe_backward(dsmoe_moe_layer *layer, const dsmoe_moe_weights *w, dsmoe_moe_weights *grads,
                                const void *dout, void *dx, float daux, dsmoe_err *err);

// Enqueues the copy of the last forward's kept counts and l_aux sums to the layer's host staging.
dsmoe_status dsmoe_moe_stats_copy(dsmoe_moe_layer *layer, dsmoe_err *err);
// After a wait on the queue: fills *stats from the staging (expert_load points into the layer).
void dsmoe_moe_stats_read(dsmoe_moe_layer *layer, dsmoe_moe_stats *stats);

// The layer's exchange (what its last all-to-all did: dsmoe_exchange_last).
const dsmoe_exchange *dsmoe_moe_layer_exchange(const dsmoe_moe_layer *layer);

#endif
