// kernels/nn.h: the GPT layer ops of the cuda plugin around the blocks: token + position embedding,
// layer norm, softmax cross-entropy, each forward beside its backward.
// Launchers follow kernels/cuda_env.h: the arguments of the ABI member (include/dsmoe/kernel_plugin.h)
// after `q`, with `env` first; they validate, return DSMOE_OK at once for empty work, enqueue on
// env->stream and never synchronise.
// defines: dsmoe_cu_embedding_forward, dsmoe_cu_embedding_backward, dsmoe_cu_layernorm_forward,
//          dsmoe_cu_layernorm_backward, dsmoe_cu_crossentropy_forward, dsmoe_cu_crossentropy_backward
//          (kernels/nn.cu)
//
// The reference is the cpu plugin (plugins/cpu/cpu_ops.c): same checks, formulas and "=" / "+=" rules.
// Activations (`dt`) are float32 or bfloat16, computed in float32; weights, gradients of weights,
// statistics, probabilities and losses are float32. A token (target) outside [0, V) is bad data: the
// kernel raises DSMOE_CU_FAULT_TOKEN_RANGE (a = index in tokens, b = the id) or
// DSMOE_CU_FAULT_TARGET_RANGE (a = row, b = the id) and skips that row.
#ifndef DSMOE_KERNELS_NN_H
#define DSMOE_KERNELS_NN_H
#include "cuda_env.h"

DSMOE_EXTERN_C_BEGIN

// out (B*T, M) of type dt = wte[tokens[b*T + t]] + wpe[pos[b] + t]; tokens (B*T) int32, wte (V, M) of
// wte_dt (float32 or dt), wpe (n_pos, M), pos (B) device int32 or NULL (0).
dsmoe_status dsmoe_cu_embedding_forward(const dsmoe_cu_env *env, void *out, dsmoe_dtype dt, const int32_t *tokens,
                                        const void *wte, dsmoe_dtype wte_dt, const float *wpe, const int32_t *pos,
                                        int B, int T, int M, int V, int n_pos);

// dwte (V, M) += dout rows (B*T, M) of each token id, added in row order; dwpe (T, M) += dout rows of
// each position, added in batch order. Needs scratch of about 16 bytes per row (a sort by token id).
dsmoe_status dsmoe_cu_embedding_backward(const dsmoe_cu_env *env, float *dwte, float *dwpe, const void *dout,
                                         dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M, int V);

// out (S, M) = (in - mean) * rstd * weight + bias, biased variance; mean, rstd (S) float32 (either may be
// NULL when no backward follows), the row sums in float64.
dsmoe_status dsmoe_cu_layernorm_forward(const dsmoe_cu_env *env, void *out, float *mean, float *rstd, const void *in,
                                        dsmoe_dtype dt, const float *weight, const float *bias, int S, int M,
                                        float eps);

// din (S, M) +=, dweight, dbias (M, float32) += (sums over rows: float32 partials over fixed row chunks,
// then added in chunk order).
dsmoe_status dsmoe_cu_layernorm_backward(const dsmoe_cu_env *env, void *din, float *dweight, float *dbias,
                                         const void *dout, const void *in, dsmoe_dtype dt, const float *weight,
                                         const float *mean, const float *rstd, int S, int M);

// probs (S, V) float32 = softmax(logits (S, V) of type dt); losses (S) = log(sum exp(z - max)) -
// (z[target] - max), in float64 from the float64 row sum.
dsmoe_status dsmoe_cu_crossentropy_forward(const dsmoe_cu_env *env, float *losses, float *probs, const void *logits,
                                           dsmoe_dtype dt, const int32_t *targets, int S, int V);

// dlogits (S, V) of type dt += dloss * (probs - onehot(targets)).
dsmoe_status dsmoe_cu_crossentropy_backward(const dsmoe_cu_env *env, void *dlogits, dsmoe_dtype dt, const float *probs,
                                            const int32_t *targets, float dloss, int S, int V);

DSMOE_EXTERN_C_END

#endif
