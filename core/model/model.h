// core/model/model.h: the GPT-MoE model: parameters in one slab, forward and backward through the plugins.
// defines: dsmoe_model, dsmoe_param_tensor, dsmoe_model_create, dsmoe_model_forward,
//          dsmoe_model_backward, dsmoe_model_reduce_grads, dsmoe_model_grad_norm
//
// GPT as in GPT-2 / nanoGPT: learned token and position embeddings, pre-LayerNorm blocks (eps from the
// deck), causal multi-head attention with biases on QKV and output projection, an FFN of
// Linear(M,F) -> GELU(tanh) -> Linear(F,M), a final LayerNorm, logits = lnf @ wte^T (tied). On MoE layers
// the FFN is an MoE layer (core/model/moe_layer.h); with moe.residual it is the Residual MoE of DeepSpeed-MoE:
// out = moe(x) * coef[:,0] + mlp(x) * coef[:,1], coef = softmax(Linear(M,2)(x)).
//
// Invariants: parameter and gradient slabs are kernel-plugin memory with identical layouts;
// replicated tensors come first, then the expert tensors of each MoE layer, contiguous per layer (this
// rank's shard of the E experts: rows [ep_rank*E_local, (ep_rank+1)*E_local) of the stacked (E, ...)
// tensor, ep_rank and E_local = E/ep of that layer's moe.expert_parallel).
// Tensor names and layouts are those of docs/checkpoint.md.
#ifndef DSMOE_MODEL_H
#define DSMOE_MODEL_H
#include "config.h"
#include "moe_layer.h"
#include "runtime.h"

#define DSMOE_MAX_NDIM 4

typedef struct dsmoe_param_tensor {
    char name[96];
    int ndim;
    int64_t shape[DSMOE_MAX_NDIM]; // global shape (expert tensors: leading dimension E)
    size_t offset;                 // first element in the local slab
    size_t numel;                  // local elements
    size_t shard_begin;            // first local element's index in the global tensor
    int decay;                     // AdamW weight decay applies (weights, not biases or LayerNorm)
    int expert_layer;              // MoE layer index when sharded over an EP group, else -1
    float init_std;                // normal(0, std); 0 = constant init_value
    float init_value;
} dsmoe_param_tensor;

// Results of one forward (host values).
typedef struct dsmoe_forward_result {
    double loss_sum;      // sum over this rank's tokens of the cross-entropy (nats)
    int tokens;           // tokens it covers
    double aux_sum;       // sum over MoE layers of l_aux
    long routed, dropped; // over all MoE layers
    double kd_sum;        // with a teacher (dsmoe_model_set_teacher): sum over the tokens of KL(teacher || student)
} dsmoe_forward_result;

typedef struct dsmoe_model dsmoe_model;

// Builds the model for micro-batches of B sequences of cfg->seq_len tokens on this rank, creating the
// EP and EDP groups (collective over the world). Parameters are zero until init or load. B = 0: the
// parameters only (no gradients, no activations; forward and backward refuse): generation's model,
// which runs through model_infer.h.
dsmoe_status dsmoe_model_create(const dsmoe_config *cfg, dsmoe_runtime *rt, int B, dsmoe_model **model,
                                dsmoe_err *err);
// A model that only runs forwards (a distillation teacher, in eval mode): no gradient slab, no loss, no
// backward scratch. Its forward takes targets = NULL, enqueues the work and returns without waiting: the
// logits (dsmoe_model_logits) are ready for whatever is enqueued after it on the same runtime.
dsmoe_status dsmoe_model_create_forward_only(const dsmoe_config *cfg, dsmoe_runtime *rt, int B, dsmoe_model **model,
                                             dsmoe_err *err);
void dsmoe_model_free(dsmoe_model *model);

// Parameter table (for init, checkpoints and logs).
int dsmoe_model_tensor_count(const dsmoe_model *model);
const dsmoe_param_tensor *dsmoe_model_tensor(const dsmoe_model *model, int i);
size_t dsmoe_model_local_params(const dsmoe_model *model);
size_t dsmoe_model_global_params(const dsmoe_model *model);
float *dsmoe_model_params(dsmoe_model *model); // slab (plugin memory)
float *dsmoe_model_grads(dsmoe_model *model);  // slab (plugin memory)
size_t dsmoe_model_replicated_params(const dsmoe_model *model); // slab elements [0, n) are replicated
// Bytes of kernel memory the model holds: parameters, gradients, activations and backward scratch
// (the MoE layers' capacity buffers come on top and grow with dropless capacity).
size_t dsmoe_model_bytes(const dsmoe_model *model);
// Expert parallelism of MoE layer moe_layer (0 <= moe_layer < cfg->n_moe_layers): layers with the
// same moe.expert_parallel share one set of groups.
dsmoe_comm_group *dsmoe_model_edp_group(const dsmoe_model *model, int moe_layer); // ranks holding the same expert shards
int dsmoe_model_ep_size(const dsmoe_model *model, int moe_layer);
dsmoe_ctl_group *dsmoe_model_ep_ctl(const dsmoe_model *model, int moe_layer); // the EP group's ranks, in order
// The layer's expert tensors occupy slab elements [*begin, *end).
void dsmoe_model_expert_range(const dsmoe_model *model, int moe_layer, size_t *begin, size_t *end);
const dsmoe_config *dsmoe_model_config(const dsmoe_model *model);
dsmoe_runtime *dsmoe_model_runtime(const dsmoe_model *model);

// Initialises every parameter from the counter RNG keyed by (seed, tensor name, global element
// index): the same values whatever the rank count or expert layout.
dsmoe_status dsmoe_model_init_params(dsmoe_model *model, uint64_t seed, dsmoe_err *err);
// Generation in bfloat16 (a parameters-only model, B = 0, whose bfloat16 weight copy is current, e.g.
// after dsmoe_infer_create): frees the float32 masters of the weight matrices that only GEMMs read, and
// the bfloat16 copies of the other tensors (no op reads them), keeping each tensor once: GEMM-only ones
// as bfloat16, the rest (layer norms, biases, position embedding, routers) as float32, in slabs of their
// own: the parameters then take about 2 bytes each instead of 6. Tensors tensor slicing took
// (dsmoe_infer_create with W > 1) are not held at all. The model can no longer train, save or load:
// dsmoe_model_params gives NULL. Source: core/model/model_slices.c.
dsmoe_status dsmoe_model_drop_gemm_masters(dsmoe_model *model, dsmoe_err *err);
// Elements of this rank's parameters of a model of cfg (ep per MoE layer as cfg says) by what generation
// does with them, with tensor slicing of width W (1: none) and expert_slicing: sliced ones go to the
// inference state's slices (dsmoe_infer_create; counted whole here: the slices hold 1/W of them),
// gemm_only ones stay as GEMM operands (bfloat16 alone once the masters go), the other ones as float32.
// sliced + gemm_only + other = dsmoe_model_local_params.
typedef struct dsmoe_param_use {
    uint64_t sliced, gemm_only, other;
} dsmoe_param_use;
void dsmoe_model_param_use(const dsmoe_config *cfg, int W, int expert_slicing, dsmoe_param_use *u);
// Its gemm_only with W = 1 (what dsmoe_model_drop_gemm_masters frees in float32 on one tensor rank).
uint64_t dsmoe_model_gemm_only_params(const dsmoe_config *cfg);
// Bytes of the parameter slabs generation's model keeps once dsmoe_infer_create (W, expert_slicing) and,
// in bfloat16, dsmoe_model_drop_gemm_masters have run (dsmoe_model_bytes is that plus a few small
// buffers; the slices are the inference state's: dsmoe_infer_estimate's slice_bytes).
uint64_t dsmoe_model_generate_param_bytes(const dsmoe_config *cfg, int W, int expert_slicing);

// Forward of one micro-batch: inputs and targets are HOST (B*T) int32. training selects noise and
// the capacity factor; step_seed keys the noise of this step and micro-batch; token_offset is the
// global index of this rank's first token (noise counters). Activations are kept for backward.
dsmoe_status dsmoe_model_forward(dsmoe_model *model, const int32_t *inputs, const int32_t *targets,
                                 int training, uint64_t step_seed, uint64_t token_offset,
                                 dsmoe_forward_result *result, dsmoe_err *err);
// MoE statistics of the last forward for MoE layer i (NULL if out of range).
const dsmoe_moe_stats *dsmoe_model_moe_stats(const dsmoe_model *model, int i);
// Logits (S, V) of the last forward, kernel memory of the activation dtype (dsmoe_config_act_dtype:
// float32 unless run.precision = bf16), valid until the next forward.
const void *dsmoe_model_logits(const dsmoe_model *model);

// Backward of the last forward, accumulating into the gradient slab: dloss is the weight of each
// token's cross-entropy in the total loss, daux the weight of each layer's l_aux.
dsmoe_status dsmoe_model_backward(dsmoe_model *model, float dloss, float daux, dsmoe_err *err);
dsmoe_status dsmoe_model_zero_grads(dsmoe_model *model, dsmoe_err *err);
// Knowledge distillation (a model of a config that distils, dsmoe_config_distills): the forwards that
// follow also compute each token's KL(softmax(teacher / T) || softmax(student / T)) against
// teacher_logits (S, V), kernel memory of the activation dtype, written before each forward on the same
// runtime (result.kd_sum), and their backwards add weight * that KL's gradient: weight is the weight
// of each token's KL in the total loss. teacher_logits = NULL: plain training again.
dsmoe_status dsmoe_model_set_teacher(dsmoe_model *model, const void *teacher_logits, float temperature, float weight,
                                     dsmoe_err *err);

// Sums gradients over the data-parallel ranks: replicated tensors over all ranks, expert tensors over
// their layer's expert-data-parallel group. (The loss weights already divide by the global token count.)
dsmoe_status dsmoe_model_reduce_grads(dsmoe_model *model, dsmoe_err *err);
// on = 1: the next dsmoe_model_backward is the step's last micro-step, so it starts each block's
// replicated-gradient all-reduce as soon as that block's backward is done (train.overlap_grad_reduce,
// world > 1, a comm plugin with allreduce_start; else no effect) and dsmoe_model_reduce_grads waits
// for them. Set 0 for earlier micro-steps: their gradients are still accumulating.
void dsmoe_model_set_reduce_in_backward(dsmoe_model *model, int on);
// Global gradient L2 norm, identical on every rank.
dsmoe_status dsmoe_model_grad_norm(dsmoe_model *model, double *norm, dsmoe_err *err);

#endif
