// core/model/model_internal.h: the model's data, shared by model.c (parameters, buffers, forward, backward),
// model_parallel.c (expert-parallel groups, gradient reduction, norm), model_slices.c (tensor slices and
// what generation's model keeps) and model_infer.c. Not for other modules: they use model.h.
// defines: block_params, block_acts, ep_groups, struct dsmoe_model, dsmoe_model_create_groups,
//          dsmoe_block_slices, dsmoe_slices, dsmoe_slices_take, dsmoe_slices_free, dsmoe_slices_bytes,
//          dsmoe_model_keep_unsliced
#ifndef DSMOE_MODEL_INTERNAL_H
#define DSMOE_MODEL_INTERNAL_H
#include "model.h"

typedef struct block_params {
    float *ln1w, *ln1b;         // (M)
    float *qkvw, *qkvb;         // (3M, M), (3M)
    float *attprojw, *attprojb; // (M, M), (M)
    float *ln2w, *ln2b;         // (M)
    float *fcw, *fcb;           // (F, M), (F)  dense FFN, or the residual MLP of a residual MoE layer
    float *fcprojw, *fcprojb;   // (M, F), (M)
    float *coefw, *coefb;       // (2, M), (2)  residual MoE coefficient
    dsmoe_moe_weights moe;      // router and this rank's experts (with w1_lp, w2_lp: their GEMM operands)
    // The weight matrices as GEMM operands (parameter views only): the float32 masters, or with a dt other
    // than float32 their copies in params_lp. NULL where the block has no such tensor.
    const void *qkvw_op, *attprojw_op, *fcw_op, *fcprojw_op, *coefw_op;
} block_params;

// The buffers of block_acts and of struct dsmoe_model's activation and scratch pointers are listed,
// with their sizes, in core/model/model_buffers.c: model.c allocates and frees by that table, memplan.c sums it.
// `void *` buffers hold activations of the model's dt (run.precision); `float *` ones are float32 always.
typedef struct block_acts {
    void *ln1;            // (S, M)
    float *ln1_mean, *ln1_rstd; // (S)
    void *qkv;            // (S, 3M)
    void *atty;           // (S, M)
    void *att;            // attention state saved for the backward (the plugin's attention_bytes)
    void *resid_mid;      // (S, M) x + attention
    void *ln2;            // (S, M)
    float *ln2_mean, *ln2_rstd; // (S)
    void *fch;            // (S, F) dense FFN pre-activation
    void *fch_gelu;       // (S, F)
    void *mlp_out;        // (S, M) dense FFN output (residual MoE: the MLP branch)
    void *moe_out;        // (S, M)
    float *coef_logits;   // (S, 2)
    float *coef;          // (S, 2)
    void *ffn_out;        // (S, M) what is added to the residual stream
} block_acts;

// The groups of one expert-parallel size (created once per distinct moe.expert_parallel value).
typedef struct ep_groups {
    int ep, ep_rank;
    dsmoe_rt_group ep_g;  // contiguous blocks of ep slots (placement.h)
    dsmoe_rt_group edp_g; // strided sets {i, i+ep, ...}
} ep_groups;

struct dsmoe_model {
    const dsmoe_config *cfg;
    dsmoe_runtime *rt;
    int B, T, S, M, NH, F, V, L;
    ep_groups *epg;               // (n_epg) one per distinct EP size, in order of first MoE layer
    int n_epg;
    int *epg_of_moe;              // (n_moe) index into epg
    size_t *expert_begin, *expert_end; // (n_moe) each MoE layer's expert tensors in the slab
    size_t *block_begin;          // (L+1) block l's replicated tensors are [block_begin[l], block_begin[l+1])

    // Overlapped gradient all-reduce: on the backward flagged by dsmoe_model_set_reduce_in_backward,
    // block l's replicated range is started right after block l's backward; reduce_grads waits.
    int can_overlap;              // train.overlap_grad_reduce, the plugin has allreduce_start, world > 1
    int reduce_in_backward;       // the next backward is the last of the step
    dsmoe_comm_request **reqs;    // (L) started requests, NULL when not started
    dsmoe_kernel_event **block_done; // (L) recorded after block l's backward (host-progressed overlap)
    int n_started;                // blocks whose reduction has started (in order L-1, L-2, ...)
    int n_recorded;               // blocks whose backward has been enqueued (and event recorded)

    dsmoe_param_tensor *tensors;
    int n_tensors, cap_tensors;
    size_t n_local, n_replicated; // replicated tensors occupy [0, n_replicated)
    size_t n_global;
    float *params, *grads; // (n_local) each (AdamW state lives in core/model/optimizer.c)
    dsmoe_dtype dt;        // activations and GEMM operands (run.precision)
    size_t esz;            // bytes of one dt element
    void *params_lp;       // (n_local) dt != float32: params rounded to dt, the GEMMs' weight operands;
                           // refreshed from params at every forward (params change under the optimizer,
                           // a checkpoint load and ZeRO's gather: one conversion covers them all)

    float *wte, *wpe, *lnfw, *lnfb;
    const void *wte_op;     // wte as the head's GEMM operand (block_params' *_op)
    // Generation (model_slices.c): once tensor slicing has taken its slices (dsmoe_model_keep_unsliced) or
    // the float32 GEMM masters went (dsmoe_model_drop_gemm_masters), params is NULL and the tensors still
    // read whole live in params_kept (float32) and a params_lp of just those (dt); held32 / heldlp give
    // each tensor's offset there (SIZE_MAX: not held; NULL arrays: the slabs as created).
    float *params_kept;
    size_t *held32, *heldlp;  // (n_tensors)
    int slice_W;              // > 1: the sliced tensors went to an inference state's slices of this width
    int slice_experts;        // ... the local experts' too (expert-slicing)
    int masters_dropped;      // dsmoe_model_drop_gemm_masters has run
    float *dwte, *dwpe, *dlnfw, *dlnfb;
    block_params *blocks, *dblocks; // (L) parameter and gradient views
    int *moe_of_layer;              // (L) MoE index or -1
    dsmoe_moe_layer **moe;          // (n_moe)
    dsmoe_moe_stats *moe_stats;     // (n_moe)

    // activations of the last forward
    void *resid;           // (L+1, S, M) residual stream at each block input, and the final output
    block_acts *acts;      // (L)
    void *lnf;             // (S, M)
    float *lnf_mean, *lnf_rstd; // (S), (S)
    void *logits;          // (S, V)
    float *probs;          // (S, V) softmax of logits
    float *losses;         // (S)
    int32_t *tokens, *targets; // (S) plugin memory
    int32_t *dense_rows;   // (1) plugin memory: S, the count of the dense FFN's one-group GEMMs (set each forward)
    float *host_losses;    // (S) host_alloc memory: copied at the end of the forward, read after a wait
    // knowledge distillation (a student: docs/distill.md)
    float *kd_losses;      // (S) each token's KL(teacher || student) at the temperature
    float *kd_diff;        // (S, V) softmax(student / T) - softmax(teacher / T), for the backward
    float *host_kd_losses; // (S) host_alloc copy of kd_losses
    const void *teacher_logits; // (S, V) the teacher's logits for the next forward (NULL = no distillation)
    float kd_temperature, kd_weight; // the temperature, and each token's KL weight in the loss
    int kd_active;          // the last forward computed the distillation term

    // backward scratch
    void *dresid;           // (S, M) gradient of the residual stream
    void *dln, *datty, *dmoe, *dmlp; // (S, M)
    void *dqkv;             // (S, 3M)
    void *dfch;             // (S, F)
    float *dcoef;           // (S, 2)
    void *dcoef_lp;         // (S, 2) dt != float32: dcoef narrowed, as the coefficient GEMMs' operand
    void *datt_workspace;   // attention_backward's workspace (the plugin's attention_bytes)
    void *dlogits;          // (S, V)
    double *norm_dev;       // (n_moe + 2) device: squared gradient sums, and a staging slot
    double *norm_host;      // (n_moe + 2) host_alloc copy
    int has_forward;
    int forward_only;       // no gradients, no loss, no backward (a distillation teacher)
    int distill;            // the distillation buffers exist
    size_t bytes_allocated; // every buffer above, for the memory report
};

// Tensor slicing's slices for generation (model_slices.c): this rank's part t of W of every sliced weight,
// in buffers the inference state owns; weights of the model's dt (GEMM operands), biases float32.
typedef struct dsmoe_block_slices {
    void *qkvw;     // (3Mt, M) c_attn's rows of this rank's heads, [q | k | v]
    float *qkvb;    // (3Mt)
    void *attprojw; // (M, Mt) attention c_proj's columns of these heads
    void *fcw;      // (Ft, M) the dense FFN's (or residual MLP's) c_fc rows; NULL where the block has none
    float *fcb;     // (Ft)
    void *fcprojw;  // (M, Ft) its c_proj's columns
} dsmoe_block_slices;

typedef struct dsmoe_slices {
    int W, t, experts;          // width, this rank's part, expert-slicing
    dsmoe_block_slices *blocks; // (n_blocks = L) when W > 1
    dsmoe_moe_weights *ew;      // (n_ew = n_moe) expert-slicing: each MoE layer's local experts' F/W columns (w1 and
                                // w2, or w1_lp and w2_lp, by dt; b1; b2: tensor rank 0's, zeros elsewhere); wg NULL
    int n_blocks, n_ew;
    size_t bytes;               // kernel memory of the slices
} dsmoe_slices;

// Copies this rank's slices (part t of W; W = 1: none) from the model's whole weights, and waits.
dsmoe_status dsmoe_slices_take(dsmoe_model *m, int W, int t, int experts, dsmoe_slices *sl, dsmoe_err *err);
void dsmoe_slices_free(dsmoe_runtime *rt, dsmoe_dtype dt, dsmoe_slices *sl);
// What dsmoe_slices_take allocates on a model of c (dsmoe_infer_estimate).
uint64_t dsmoe_slices_bytes(const dsmoe_config *c, int W, int experts);
// After dsmoe_slices_take (W > 1; W = 1: nothing to do): the model frees its whole sliced tensors, keeping
// those read whole in slabs of their own (params NULL from then on). Nothing changes on failure.
dsmoe_status dsmoe_model_keep_unsliced(dsmoe_model *m, int W, int experts, dsmoe_err *err);

// c (rows, n) = a (rows, k) @ op(w) (beta = 0), then the epilogue, as a gemm_grouped of one group whose
// count rows_dev (device) holds = rows; op(w) = w^T (w (n, k)) when trans_w, else w ((k, n)); all of dt.
// The dense FFN's first GEMM (BIAS_GELU) and its GELU backward (DGELU), in training and generation.
dsmoe_status dsmoe_gemm_one_group(dsmoe_runtime *rt, dsmoe_dtype dt, const int32_t *rows_dev, int rows, void *c,
                                  void *aux, const void *a, const void *w, int trans_w, int n, int k,
                                  dsmoe_epilogue epi, const float *bias, dsmoe_err *err);

// Collective: the EP and EDP groups of every distinct moe.expert_parallel (fills epg, n_epg, epg_of_moe).
dsmoe_status dsmoe_model_create_groups(dsmoe_model *m, dsmoe_err *err);
// Starts the overlapped reductions of the blocks whose backward has run (model_parallel.c).
dsmoe_status dsmoe_model_start_block_reductions(dsmoe_model *m, int wait, dsmoe_err *err);

#endif
