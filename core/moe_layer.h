// core/moe_layer.h: one MoE layer: gate -> dispatch -> exchange -> experts -> exchange -> combine,
// forward and backward, through the kernel and comm plugins.
// defines: dsmoe_moe_layer, dsmoe_moe_layer_create, dsmoe_moe_forward, dsmoe_moe_backward
//
// Experts are split over an expert-parallel (EP) group of `ep` ranks: rank r holds the experts
// [r*E_local, (r+1)*E_local), E_local = E/ep. With ep = 1 the exchange is the comm plugin's all-to-all
// on a group of one (a local copy), so one code path serves every layout.
//
// Capacity: C = max(ceil(S/E * K * cf), min_capacity) from each rank's own S (as DeepSpeed); in
// dropless mode C = the max over the EP group of the tokens any expert received (agreed by an
// all-reduce before any exchange, so ranks never disagree on sizes).
//
// Exchange layout: the dispatch buffer is (E, C, M) = (ep, E_local, C, M): block r goes to rank r. The
// received buffer is (ep, E_local, C, M) indexed by source rank; expert el runs one grouped GEMM over
// the groups (el, source) with m = the kept counts the source reported (exchanged with the tokens), so
// empty slots cost nothing. Outputs travel back the same way.
//
// Activations of the last forward are kept inside the layer for the next backward (one micro-batch
// at a time: forward, backward, forward, ...). Buffers grow when a dropless step needs more.
#ifndef DSMOE_MOE_LAYER_H
#define DSMOE_MOE_LAYER_H
#include "runtime.h"

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
} dsmoe_moe_config;

// Parameters of one layer (pointers into the model's parameter slab, kernel-plugin memory); the
// gradient struct has the same shapes.
typedef struct dsmoe_moe_weights {
    float *wg; // (E, M) router, no bias; replicated on every rank
    float *w1; // (E_local, F, M) expert fc weights (nn.Linear(M, F).weight per expert)
    float *b1; // (E_local, F)
    float *w2; // (E_local, M, F) expert proj weights (nn.Linear(F, M).weight per expert)
    float *b2; // (E_local, M)
} dsmoe_moe_weights;

// Per forward call.
typedef struct dsmoe_moe_step {
    int training;          // noise and capacity_factor vs eval_capacity_factor
    uint64_t seed;         // counter-RNG key for this layer, step and micro-batch
    uint64_t token_offset; // global index of this rank's first token
} dsmoe_moe_step;

// What the last forward measured (host values).
typedef struct dsmoe_moe_stats {
    float aux_loss;        // l_aux of this rank's tokens (before the coefficient)
    int capacity;          // C used
    long routed;           // token choices made (S*K)
    long dropped;          // choices dropped by capacity
    int *expert_load;      // (E) tokens kept per expert on this rank (owned by the layer)
} dsmoe_moe_stats;

typedef struct dsmoe_moe_layer dsmoe_moe_layer;

dsmoe_status dsmoe_moe_layer_create(const dsmoe_runtime *rt, const dsmoe_moe_config *cfg,
                                    dsmoe_moe_layer **layer, dsmoe_err *err);
void dsmoe_moe_layer_free(dsmoe_moe_layer *layer);

// out (S, M) = MoE(x (S, M)); x must stay unchanged until the backward.
dsmoe_status dsmoe_moe_forward(dsmoe_moe_layer *layer, const dsmoe_moe_weights *w, const float *x,
                               float *out, const dsmoe_moe_step *step, dsmoe_moe_stats *stats, dsmoe_err *err);
// Gradients of the last forward: dx (S, M) +=, grads (same shapes as w) +=.
// daux = d(loss)/d(l_aux) (the aux coefficient times the loss scale); the gate gradient includes it.
dsmoe_status dsmoe_moe_backward(dsmoe_moe_layer *layer, const dsmoe_moe_weights *w, dsmoe_moe_weights *grads,
                                const float *dout, float *dx, float daux, dsmoe_err *err);

#endif
