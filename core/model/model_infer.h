// core/model/model_infer.h: inference on a model's parameters: a KV cache for a set of sequence slots and
// one forward over the new tokens of any of them (prompts being prefilled and sequences decoding one
// token, in the same call), giving each sequence's next-token logits.
// defines: dsmoe_infer, dsmoe_infer_times, dsmoe_infer_create, dsmoe_infer_free, dsmoe_infer_reset,
//          dsmoe_infer_length, dsmoe_infer_forward, dsmoe_infer_logits, dsmoe_infer_sample, dsmoe_infer_bytes
//
// The math is the model's forward (model.h) for the new tokens only: a token at position p attends to
// the cached keys and values of positions 0 .. p of its own sequence, so feeding a sequence in any
// split (all at once, token by token, or chunks) gives the logits a full forward gives, within the
// rounding of the GEMMs' other row counts. MoE layers run as at evaluation (no noise) with a capacity
// the caller chooses; C >= the tokens of the call drops nothing (docs/inference.md).
//
// Slots: sequence slot s owns rows s of every layer's cache (slots, NH, t_max, D) and has a length (the
// positions cached). A call appends count[i] tokens to slot[i] for each of its n sequences; their rows
// are laid out one sequence after the other. Every rank of an expert-parallel group calls forward
// together, a rank with no sequences too (n = 0), with the same capacity.
#ifndef DSMOE_MODEL_INFER_H
#define DSMOE_MODEL_INFER_H
#include "model.h"

typedef struct dsmoe_infer dsmoe_infer;

// How the MoE layers run under tensor slicing (the W ranks of a tensor group hold the same tokens):
typedef enum {
    DSMOE_TENSOR_MOE_ALL = 0,         // every tensor rank runs every row (the same work W times)
    DSMOE_TENSOR_MOE_COORDINATED = 1, // tensor rank t runs 1/W of the rows, then the group all-gathers
    DSMOE_TENSOR_MOE_SLICED = 2,      // expert-slicing: tensor rank t runs every row on F/W columns of
                                      // each expert, then the group sums the partial outputs
} dsmoe_tensor_moe;
// The deck's choice: generate.expert_slicing, else generate.coordinated_alltoall.
static inline int dsmoe_tensor_moe_of(const dsmoe_config *c) {
    return c->gen_expert_slicing ? DSMOE_TENSOR_MOE_SLICED
           : c->gen_coordinated  ? DSMOE_TENSOR_MOE_COORDINATED
                                 : DSMOE_TENSOR_MOE_ALL;
}

// Seconds by part, summed over forwards that profile (dsmoe_infer_forward's times argument).
typedef struct dsmoe_infer_times {
    double attention; // layer norm, QKV, the cache, attention and its projection
    double gating;    // router GEMM, top-k, dispatch and combine
    double alltoall;  // the MoE layers' exchanges
    double experts;   // the expert FFNs
    double other;     // embedding, dense FFNs, residual mixing, the head, sampling
} dsmoe_infer_times;

// Caches for `slots` sequences of up to t_max positions (<= model.seq_len) and buffers for up to
// max_rows new tokens per call. tensor_parallel: the tensor-slicing width W (1 = none; it divides the
// ranks, heads and FFN width; consecutive slots form a tensor group and get the same calls, and the
// model's EP groups must be made for it: model_parallel.c); moe_mode: dsmoe_tensor_moe (with W > 1).
// Activations, the cache and the GEMMs' weights are of the model's activation dtype (run.precision);
// in bfloat16 the model's parameters must be final (loaded) before create, which takes their bfloat16
// copy once. With W > 1 create copies this rank's slices of the sliced weights (c_attn rows and c_proj
// columns of its heads, F/W columns of the dense FFN, with expert-slicing of each local expert; the
// state owns them), then the model frees those weights whole (dsmoe_model_keep_unsliced, model_slices.c):
// a rank holds 1/W of them from then on, and the model (parameters-only: B = 0) can no longer save, load
// or serve another inference state. Collective over the world.
dsmoe_status dsmoe_infer_create(dsmoe_model *model, int slots, int t_max, int max_rows, int tensor_parallel,
                                int moe_mode, dsmoe_infer **out, dsmoe_err *err);
void dsmoe_infer_free(dsmoe_infer *inf); // collective, as create
// Kernel memory it holds itself: caches, tensor slices and row buffers (its MoE layers' own buffers
// apart: dsmoe_infer_estimate's moe_bytes).
size_t dsmoe_infer_bytes(const dsmoe_infer *inf);
// Of that, the tensor slices (this rank's parameters that the model no longer holds).
size_t dsmoe_infer_slice_bytes(const dsmoe_infer *inf);

// What dsmoe_infer_create(model of cfg, slots, t_max, max_rows, W, moe_mode) allocates, from the
// config alone (dsmoe --plan): cache + slice + rows = dsmoe_infer_bytes; moe_bytes: its MoE layers'
// router and capacity buffers at their largest (C = the rows a layer runs: nothing dropped), one set per
// distinct (experts, expert_parallel): MoE layers alike share it.
typedef struct dsmoe_infer_sizes {
    uint64_t cache_bytes; // KV cache: 2 x layers x (slots, heads / W, t_max, head width) of the activation dtype
    uint64_t slice_bytes; // W > 1: this rank's slices of the sliced weights: c_attn rows and c_proj columns
                          // of its heads, F/W columns of each dense FFN (and with expert-slicing of every
                          // local expert, with its b2): 1/W of what the model no longer holds
                          // (dsmoe_model_generate_param_bytes)
    uint64_t row_bytes;   // per-call buffers for max_rows tokens (W > 1: the float32 partial sums too), and
                          // the slots' logits
    uint64_t moe_bytes;
    int moe_rows;         // rows a MoE layer runs per call (max_rows, or / W when coordinated)
} dsmoe_infer_sizes;
void dsmoe_infer_estimate(const dsmoe_config *cfg, int slots, int t_max, int max_rows, int tensor_parallel,
                          int moe_mode, dsmoe_infer_sizes *z);

// Empties a slot (its next token is position 0).
void dsmoe_infer_reset(dsmoe_infer *inf, int slot);
int dsmoe_infer_length(const dsmoe_infer *inf, int slot);

// Appends count[i] tokens to slot[i] (i < n; distinct slots, count >= 1, lengths stay <= t_max; tokens
// host, (sum count) in sequence order, each in [0, vocab)) and computes row i of the logits: the next
// token's logits of sequence i. group_rows: the most tokens any rank of this call's EP groups feeds
// (>= this rank's; the same on all of them), from which each MoE layer's capacity C comes: group_rows
// itself when capacity_factor = 0 (no token dropped), else dsmoe_capacity(group_rows, E, K,
// capacity_factor, moe.min_capacity). times: when not NULL, the forward waits after each part and adds
// its seconds (a profile).
dsmoe_status dsmoe_infer_forward(dsmoe_infer *inf, int n, const int *slot, const int *count, const int32_t *tokens,
                                 int group_rows, float capacity_factor, dsmoe_infer_times *times, dsmoe_err *err);
// The last forward's logits (n, V), kernel memory of the activation dtype.
const void *dsmoe_infer_logits(const dsmoe_infer *inf);
// Draws the next token of each sequence of the last forward among ids [0, vocab_drawn) (<= model.vocab:
// the ids a tokenizer can decode): row i per p[i] (temperature 0 = greedy) keyed by p[i].seed and
// counters[i] (the token's index in its completion), so a sequence's tokens do not depend on the others
// in its batch. Waits; tokens (n) host.
dsmoe_status dsmoe_infer_sample(dsmoe_infer *inf, const dsmoe_sampling_params *p, const uint64_t *counters,
                                int vocab_drawn, int32_t *tokens, dsmoe_err *err);

#endif
