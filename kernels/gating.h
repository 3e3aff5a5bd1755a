// kernels/gating.h: MoE gating (route, assign, their backward), dispatch and combine of the cuda plugin.
// Launchers follow kernels/cuda_env.h: the arguments of the ABI member (include/dsmoe/kernel_plugin.h)
// after `q`, with `env` first; they validate, enqueue on env->stream and never synchronise.
// defines: dsmoe_cu_gate_route, dsmoe_cu_gate_assign, dsmoe_cu_gate_backward (kernels/gating.cu),
//          dsmoe_cu_gate_fused (kernels/gating_fused.cu),
//          dsmoe_cu_moe_dispatch, dsmoe_cu_moe_dispatch_backward, dsmoe_cu_moe_combine,
//          dsmoe_cu_moe_combine_backward (kernels/moe_route.cu)
//
// The rules are docs/gating.md; the reference is the cpu plugin (plugins/cpu/cpu_gating.c). The
// choices (choice, slot, kept, counts) are the cpu plugin's on the same inputs and keys: same counter
// RNG streams (dsmoe/rng.h), same float operations in the softmax, same tie rules, same level order.
// Gating tensors are float32; dispatch and combine take float32 or bfloat16 activations (`dt`),
// computed in float32. A table entry out of range (choice not in [0, E), slot not in [-1, C)) is bad
// data: a kernel raises DSMOE_CU_FAULT_CHOICE_RANGE (a = token, b = the bad value) and skips it.
#ifndef DSMOE_KERNELS_GATING_H
#define DSMOE_KERNELS_GATING_H
#include "cuda_env.h"

DSMOE_EXTERN_C_BEGIN

// probs (S, E) = softmax(logits (S, E)); choice (S, K) int32; counts (E) int32 (assigned, also when
// S = 0) = tokens choosing each expert, all levels together.
dsmoe_status dsmoe_cu_gate_route(const dsmoe_cu_env *env, const dsmoe_gating_params *p, const float *logits,
                                 float *probs, int32_t *choice, int32_t *counts);

// Capacity C (host): slot (S, K) int32 (-1 = dropped), weight (S, K), kept (E) int32, aux_sums (2E + 1)
// float64 = [P_e (E), N_e (E), S]. All assigned (kept and aux_sums also when S = 0).
dsmoe_status dsmoe_cu_gate_assign(const dsmoe_cu_env *env, const dsmoe_gating_params *p, int C, const float *probs,
                                  const int32_t *choice, int32_t *slot, float *weight, int32_t *kept,
                                  double *aux_sums);

// Route + assign in one cooperative kernel launch (version 3's `gate`, for a C known before routing):
// probs, choice, counts, slot, weight, kept, aux_sums bit for bit as dsmoe_cu_gate_route followed by
// dsmoe_cu_gate_assign with the same p and C (which it runs instead where a cooperative launch cannot be
// used); op name "gate" in its messages.
dsmoe_status dsmoe_cu_gate_fused(const dsmoe_cu_env *env, const dsmoe_gating_params *p, int C, const float *logits,
                                 float *probs, int32_t *choice, int32_t *counts, int32_t *slot, float *weight,
                                 int32_t *kept, double *aux_sums);

// dlogits (S, E) += the gradient of sum dweight * weight + daux * l_aux (l_aux from the device aux_sums).
dsmoe_status dsmoe_cu_gate_backward(const dsmoe_cu_env *env, const dsmoe_gating_params *p, float *dlogits,
                                    const float *probs, const int32_t *choice, const int32_t *slot,
                                    const float *dweight, const double *aux_sums, float daux);

// buf (E, C, M) rows of kept (expert, slot) = x (S, M) rows (assigned; other rows untouched).
dsmoe_status dsmoe_cu_moe_dispatch(const dsmoe_cu_env *env, void *buf, const void *x, dsmoe_dtype dt,
                                   const int32_t *choice, const int32_t *slot, int S, int K, int E, int C, int M);

// dx (S, M) += dbuf rows of the token's kept choices, in k order.
dsmoe_status dsmoe_cu_moe_dispatch_backward(const dsmoe_cu_env *env, void *dx, const void *dbuf, dsmoe_dtype dt,
                                            const int32_t *choice, const int32_t *slot, int S, int K, int E, int C,
                                            int M);

// out (S, M) = sum over kept k, in k order, of weight[s,k] * y[choice, slot] (assigned; 0 if none kept).
dsmoe_status dsmoe_cu_moe_combine(const dsmoe_cu_env *env, void *out, const void *y, dsmoe_dtype dt,
                                  const int32_t *choice, const int32_t *slot, const float *weight, int S, int K,
                                  int E, int C, int M);

// dy (E, C, M) kept rows = weight * dout (assigned; other rows untouched); dweight (S, K) float32 =
// dot(dout[s], y[choice, slot]) in float32 in a fixed order (assigned; 0 when dropped).
dsmoe_status dsmoe_cu_moe_combine_backward(const dsmoe_cu_env *env, void *dy, float *dweight, const void *dout,
                                           const void *y, dsmoe_dtype dt, const int32_t *choice,
                                           const int32_t *slot, const float *weight, int S, int K, int E, int C,
                                           int M);

DSMOE_EXTERN_C_END

#endif
