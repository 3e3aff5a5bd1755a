// core/drivers/memplan.h: the memory one rank of a run allocates, predicted from the config alone.
// defines: dsmoe_param_counts, dsmoe_mem_param_counts, dsmoe_mem_estimate, dsmoe_mem_estimate_rank
//
// Pure: no MPI, no plugin, nothing allocated, O(layers + ranks of an EP group) work; 64-bit sizes
// throughout (1.3B+MoE-128 has 52e9 parameters). `dsmoe --plan` (core/drivers/plan.h) answers with it for
// machines that are not here. The numbers are those of the real allocation, byte for byte:
//   core/model/model.c      parameter and gradient slabs, activations and backward scratch (dsmoe_model_bytes),
//                     and the int32 token and target buffers (kernel memory not in dsmoe_model_bytes);
//   core/model/moe_layer.c  per MoE layer: router buffers (S, E) and (S, K), capacity buffers (E, C, M|F) at the
//                     C allocated at create (max of the train and eval capacity; none yet when dropless);
//   core/parallel/exchange.c   per MoE layer: the hierarchical all-to-all's packing workspace (0 when flat, or on one
//                     node, or one rank per node);
//   core/model/optimizer.c  AdamW m and v of this rank's ZeRO shards (dsmoe_optimizer_bytes) and, with ZeRO-1,
//                     its all-gather landing and send buffers (not in dsmoe_optimizer_bytes).
// Where the lists live: the model's buffers are one table in core/model/model_buffers.c (dsmoe_model_buffers),
// each MoE layer's are two tables in core/model/moe_layer.c (dsmoe_moe_buffers: router, capacity), both
// declared in core/model/model_buffers.h. model.c and moe_layer.c allocate and free by walking them and this
// plan sums the same walks, so the two cannot drift. The exchange's workspace and the optimizer's
// shards are still mirrored in core/drivers/memplan.c from exchange.c and optimizer.c.
// Every one of these is kernel-plugin memory (device memory on a GPU backend). Ranks are slots in
// node-major order (placement.h): EP groups are contiguous runs of ep slots, EDP groups strided sets.
#ifndef DSMOE_MEMPLAN_H
#define DSMOE_MEMPLAN_H
#include <stdint.h>
#include "config.h"
#include "dsmoe/kernel_plugin.h"

// Parameters of the whole model (no rank count needed).
typedef struct dsmoe_param_counts {
    uint64_t replicated; // held by every rank: embeddings, attention, LayerNorms, dense FFNs, gates, coefficients
    uint64_t expert;     // every expert of every MoE layer (sharded over EP groups)
    uint64_t total;      // replicated + expert (= dsmoe_model_global_params)
} dsmoe_param_counts;

// cfg: a loaded config (dsmoe_config_load*). Does not check it: dsmoe_mem_estimate_rank does.
void dsmoe_mem_param_counts(const dsmoe_config *cfg, dsmoe_param_counts *counts);

typedef struct dsmoe_mem_estimate {
    int micro_batch;                  // B: sequences per rank per micro-step (train.micro_batch, 0 = batch / ranks)
    int micro_steps;                  // micro-steps per optimizer step: batch / (B * ranks)
    int capacity_max;                 // largest expert capacity C allocated at create over the MoE layers (0: none)
    uint64_t global_params;           // whole model (dsmoe_model_global_params)
    uint64_t global_expert_params;    // of which experts
    uint64_t local_params;            // this rank's slab: replicated + its expert shards (dsmoe_model_local_params)
    uint64_t replicated_params;       // of which replicated (dsmoe_model_replicated_params)
    uint64_t param_bytes, grad_bytes; // fp32 slabs
    uint64_t optimizer_bytes;         // AdamW m and v of this rank's shards (dsmoe_optimizer_bytes)
    uint64_t optimizer_scratch_bytes; // ZeRO-1 all-gather landing and send chunk buffers (0 with zero_stage 0)
    uint64_t activation_bytes;        // activations + backward scratch (dsmoe_model_bytes - params - grads)
    uint64_t model_bytes;             // dsmoe_model_bytes: params + grads + activations
    uint64_t token_bytes;             // the model's int32 inputs and targets (2 S x 4), the dense FFN's row count (4)
    uint64_t moe_buffer_bytes;        // MoE capacity buffers (E, C, M) x4 + (E, C, F) x3 per layer, at create
    uint64_t moe_router_bytes;        // MoE per-token buffers (logits, probs, choices, ...), all layers
    uint64_t exchange_bytes;          // hierarchical all-to-all workspaces at create, all layers
    uint64_t total_bytes;             // everything above: what the kernel plugin holds once model and optimizer exist
    // What can come on top later in a run.
    uint64_t moe_buffer_peak_bytes;   // capacity buffers at their largest (dropless: C up to S; else = create)
    uint64_t exchange_peak_bytes;     // workspaces at their largest (an upper bound when dropless)
    uint64_t checkpoint_bytes;        // kernel staging of one moment while a checkpoint is saved or loaded
    uint64_t peak_bytes;              // total with the peaks above and the checkpoint staging
    uint64_t checkpoint_host_bytes;   // host memory dsmoe_checkpoint_save stages (it streams): the largest global
                                      // tensor on rank 0, which writes; the largest expert shard on the ranks
                                      // of the first EP group of each size
} dsmoe_mem_estimate;

// What rank world_rank of world_size allocates for cfg. ranks_per_node: ranks on each node of the job
// (node-major), used only when moe.ranks_per_node is 0 (the real nodes) to find the all-to-all's
// layout; 0 = every rank on one node. Fails (DSMOE_ERR_INVALID, saying which key and why) for a config
// the model would refuse on that many ranks: train.batch not divisible, moe.expert_parallel not dividing
// the ranks or a layer's experts, top-k above the experts, a hierarchical all-to-all on a layout it
// cannot use, or a micro-batch whose B * seq_len does not fit the int the model keeps it in.
dsmoe_status dsmoe_mem_estimate_rank(const dsmoe_config *cfg, int world_size, int world_rank, int ranks_per_node,
                                     dsmoe_mem_estimate *est, dsmoe_err *err);
// The same for the kernel plugin `kern` (NULL = the cpu plugin's layout): its attention_bytes, callable
// before init, sizes attention's saved state and workspace (a flash-style GPU kernel keeps O(B NH T)
// where the cpu plugin keeps the (B, NH, T, T) probabilities).
dsmoe_status dsmoe_mem_estimate_rank_for(const dsmoe_config *cfg, int world_size, int world_rank, int ranks_per_node,
                                         const dsmoe_kernel_plugin_v3 *kern, dsmoe_mem_estimate *est, dsmoe_err *err);

// The kernel memory a distillation teacher of config t (core/drivers/distill.h: dsmoe_teacher_config_load
// gives it, with the student's batch) holds on rank `rank`: a forward-only model (parameters, activations,
// token ids; no gradients, backward scratch or optimizer state) and its MoE layers' buffers and exchange.
dsmoe_status dsmoe_mem_teacher_bytes(const dsmoe_config *t, int W, int rank, int rpn,
                                     const dsmoe_kernel_plugin_v3 *kern, uint64_t *bytes, dsmoe_err *err);

#endif
