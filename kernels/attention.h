// kernels/attention.h: the attention family of the cuda plugin: causal multi-head self-attention
// (forward, backward, the byte counts of their state) in attention.cu, and the inference members (KV
// cache append, attention of a query block over the cache, token sampling) in decode.cu. Launchers
// follow kernels/cuda_env.h: the arguments of the ABI member (include/dsmoe/kernel_plugin.h) after `q`,
// with `env` first; attention_bytes takes no env (it is callable before init).
// defines: dsmoe_cu_attention_bytes, dsmoe_cu_attention_forward, dsmoe_cu_attention_backward,
//          dsmoe_cu_kv_append, dsmoe_cu_attention_cached, dsmoe_cu_sample, dsmoe_cu_attention_rows
//
// Attention is flash-style in what it keeps: the forward saves only the log-sum-exp of every score
// row, float32 (B, NH, T), and the backward recomputes the probabilities from it; its workspace holds
// Di = dot(dout, out) of every row, float32 (B, NH, T). Head dimensions D = M / NH up to
// DSMOE_CU_ATTENTION_MAX_D; a larger one is DSMOE_ERR_UNSUPPORTED. Activations are float32 or bfloat16
// (compute in float32). Every output element has one writer and fixed-order sums: deterministic.
#ifndef DSMOE_KERNELS_ATTENTION_H
#define DSMOE_KERNELS_ATTENTION_H
#include "cuda_env.h"

DSMOE_EXTERN_C_BEGIN

#define DSMOE_CU_ATTENTION_MAX_D 256

// *saved = B*NH*T*4 (the row log-sum-exps), *workspace = B*NH*T*4 (the backward's Di). A bad shape
// gives DSMOE_ERR_INVALID, a dtype other than float32 / bfloat16 or D > DSMOE_CU_ATTENTION_MAX_D gives
// DSMOE_ERR_UNSUPPORTED (no message: there is no env).
dsmoe_status dsmoe_cu_attention_bytes(const dsmoe_attention_shape *shape, size_t *saved, size_t *workspace);

// out (B*T, M) = softmax(q k^T / sqrt(D), causal) v per head; saved = the row log-sum-exps.
dsmoe_status dsmoe_cu_attention_forward(const dsmoe_cu_env *env, void *out, void *saved, const void *qkv,
                                        const dsmoe_attention_shape *shape);

// dqkv (B*T, 3M) +=; workspace (attention_bytes') is overwritten; out and saved from the forward.
dsmoe_status dsmoe_cu_attention_backward(const dsmoe_cu_env *env, void *dqkv, void *workspace, const void *dout,
                                         const void *qkv, const void *out, const void *saved,
                                         const dsmoe_attention_shape *shape);

// k_cache, v_cache (B, NH, T_max, D): token t of sequence b goes to position pos[b] + t (pos device).
dsmoe_status dsmoe_cu_kv_append(const dsmoe_cu_env *env, void *k_cache, void *v_cache, const void *qkv, dsmoe_dtype dt,
                                const int32_t *pos, int B, int T_new, int M, int NH, int T_max);

// out (B*T_new, M): query t of sequence b attends to cache positions 0 .. pos[b] + t.
dsmoe_status dsmoe_cu_attention_cached(const dsmoe_cu_env *env, void *out, const void *qkv, const void *k_cache,
                                       const void *v_cache, dsmoe_dtype dt, const int32_t *pos, int B, int T_new,
                                       int M, int NH, int T_max);

// tokens (rows) int32 drawn from logits (rows, V) as the cpu plugin's sample (plugins/cpu/cpu_infer.c).
dsmoe_status dsmoe_cu_sample(const dsmoe_cu_env *env, int32_t *tokens, const void *logits, dsmoe_dtype dt, int rows,
                             int V, const dsmoe_sampling_params *p, const uint64_t *counters);

// ---------------------------------------------------------------------------------------------------
// Internal to the family: the tensor-core kernels (attention_tc.cu) that attention_forward/_backward
// hand bfloat16 to when env->attention_tc is set and D = M / NH is a multiple of 16 up to 128. Same
// saved state (lse) and workspace (Di, which attention.cu's di kernel writes before the backward).
int dsmoe_cu_attention_tc_applies(const dsmoe_cu_env *env, dsmoe_dtype dt, int M, int NH);
dsmoe_status dsmoe_cu_attention_tc_forward(const dsmoe_cu_env *env, void *out, float *lse, const void *qkv, int B,
                                           int T, int M, int NH);
dsmoe_status dsmoe_cu_attention_tc_backward(const dsmoe_cu_env *env, void *dqkv, const float *di, const void *dout,
                                            const void *qkv, const float *lse, int B, int T, int M, int NH);

// Internal to the family (attention.cu defines it, decode.cu uses it for attention_cached): one causal
// attention pass over rows of queries, each attending to its keys 0 .. first + t of its (b, h), where
// first = pos[b] (pos device; then pos[b] must lie in [0, T_max - T_q], else the sticky
// DSMOE_CU_FAULT_KV_RANGE and the sequence is skipped) or 0 when pos is NULL. Strides are in elements.
typedef struct dsmoe_cu_attention_rows_desc {
    int B, NH, T_q, D;
    dsmoe_dtype dt;
    const void *q; size_t q_ld;   // query t of (b, h): q + (b*T_q + t) q_ld + h D
    const void *k, *v;            // key j of (b, h): k + b kv_sb + h kv_sh + j kv_ld (v alike)
    size_t kv_sb, kv_sh, kv_ld;
    const int32_t *pos; int T_max; // (B) device, or NULL (first = 0)
    void *out; size_t out_ld;     // (b*T_q + t) out_ld + h D
    float *lse;                   // (B, NH, T_q) float32 row log-sum-exps, or NULL
} dsmoe_cu_attention_rows_desc;

// Enqueues the pass on env->stream (the desc is consumed before return). Checks only D and dt.
dsmoe_status dsmoe_cu_attention_rows(const dsmoe_cu_env *env, const dsmoe_cu_attention_rows_desc *d, const char *op);

DSMOE_EXTERN_C_END

#endif
