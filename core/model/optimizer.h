// core/model/optimizer.h: AdamW with optional ZeRO stage 1 (optimizer state sharded over data parallel).
// defines: dsmoe_optimizer, dsmoe_optimizer_create, dsmoe_optimizer_step, dsmoe_optimizer_get_state,
//          dsmoe_optimizer_set_state, dsmoe_optimizer_bytes
//
// The model's parameter slab has the replicated tensors (identical on every rank), then each MoE
// layer's expert shards (identical across that layer's expert-data-parallel group). With zero_stage 0
// every rank keeps both AdamW moments for its whole slab. With zero_stage 1 each of these ranges is cut
// into equal chunks over the group that holds it identically (all ranks for the replicated range, the
// layer's EDP group for its experts); a rank keeps the moments of its chunks only, updates only those
// parameters, and the updated chunks are all-gathered. AdamW is element-wise, so both stages give
// bit-identical parameters.
#ifndef DSMOE_OPTIMIZER_H
#define DSMOE_OPTIMIZER_H
#include "model.h"

typedef struct dsmoe_optimizer dsmoe_optimizer;

// Collective over the world. Moments start at zero.
dsmoe_status dsmoe_optimizer_create(dsmoe_model *model, int zero_stage, dsmoe_optimizer **opt, dsmoe_err *err);
void dsmoe_optimizer_free(dsmoe_optimizer *opt);

// Collective. One AdamW step (t = 1-based step count) with gradients scaled by grad_scale, using the
// deck's betas, eps and weight decay (not on biases and LayerNorm).
dsmoe_status dsmoe_optimizer_step(dsmoe_optimizer *opt, float lr, float grad_scale, int t, dsmoe_err *err);

// Collective. Moment `which` (0 = exp_avg, 1 = exp_avg_sq) in the parameter slab's layout, into `full`
// (kernel memory, dsmoe_model_local_params floats), gathering the shards.
dsmoe_status dsmoe_optimizer_get_state(dsmoe_optimizer *opt, int which, float *full, dsmoe_err *err);
// Takes this rank's part of moment `which` from a buffer in the slab's layout (kernel memory).
dsmoe_status dsmoe_optimizer_set_state(dsmoe_optimizer *opt, int which, const float *full, dsmoe_err *err);

// Bytes of optimizer state this rank holds.
size_t dsmoe_optimizer_bytes(const dsmoe_optimizer *opt);

// ZeRO-1's all-gather of the updated parameters goes in pieces of this many elements per rank (of a
// chunk of `chunk` per rank over `size` ranks): at most DSMOE_ZERO_GATHER_ELEMS in the landing buffer.
#ifndef DSMOE_ZERO_GATHER_ELEMS // tests build optimizer.c with a tiny one to exercise the pieces
#define DSMOE_ZERO_GATHER_ELEMS ((size_t)64 << 20)
#endif
static inline size_t dsmoe_zero_piece(size_t chunk, int size) {
    size_t most = DSMOE_ZERO_GATHER_ELEMS / (size_t)(size > 0 ? size : 1);
    if (most == 0) most = 1;
    return chunk < most ? chunk : most;
}

#endif
