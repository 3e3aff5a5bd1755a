// kernels/elementwise.h: the element-wise and small ops of the cuda plugin, and its multi-tensor AdamW.
// Launchers follow kernels/cuda_env.h: the arguments of the ABI member (include/dsmoe/kernel_plugin.h)
// after `q`, with `env` first; they validate, return DSMOE_OK at once for empty work, enqueue on
// env->stream and never synchronise.
// defines: dsmoe_cu_bias_add, dsmoe_cu_bias_backward, dsmoe_cu_axpy, dsmoe_cu_mul_uniform_noise,
//          dsmoe_cu_sum_squares, dsmoe_cu_all_finite, dsmoe_cu_convert, dsmoe_cu_init_tensor,
//          dsmoe_cu_gelu_forward, dsmoe_cu_gelu_backward, dsmoe_cu_residual_mix_forward,
//          dsmoe_cu_residual_mix_backward (kernels/elementwise.cu), dsmoe_cu_adamw (kernels/optim.cu)
//
// The reference is the cpu plugin (plugins/cpu/cpu_elementwise.c, cpu_ops.c, cpu_memory.c, cpu_math.h):
// same checks, formulas and "=" / "+=" rules. Activations (`dt`) are float32 or bfloat16, computed in
// float32; the float32-only arguments stay float. Reductions (bias_backward, sum_squares, the residual
// mix's dot products) use a blocking that depends on the shape only, so results are bitwise reproducible.
#ifndef DSMOE_KERNELS_ELEMENTWISE_H
#define DSMOE_KERNELS_ELEMENTWISE_H
#include "cuda_env.h"

DSMOE_EXTERN_C_BEGIN

// out (rows, n) += bias (n, float32) broadcast over rows.
dsmoe_status dsmoe_cu_bias_add(const dsmoe_cu_env *env, void *out, dsmoe_dtype dt, const float *bias, int rows, int n);

// dbias (n, float32) += column sums of dout (rows, n): float32 partial sums over fixed row chunks, then
// the partials added in chunk order (one pass when the rows fit one chunk).
dsmoe_status dsmoe_cu_bias_backward(const dsmoe_cu_env *env, float *dbias, const void *dout, dsmoe_dtype dt, int rows,
                                    int n);

// y (n) += alpha * x (n), both of type dt.
dsmoe_status dsmoe_cu_axpy(const dsmoe_cu_env *env, void *y, float alpha, const void *x, dsmoe_dtype dt, size_t n);

// out (n) = in (n) * (1 - eps + 2 eps dsmoe_rng_uniform(seed, offset + i)); out may alias in.
dsmoe_status dsmoe_cu_mul_uniform_noise(const dsmoe_cu_env *env, void *out, const void *in, dsmoe_dtype dt, size_t n,
                                        float eps, uint64_t seed, uint64_t offset);

// out[0] (device float64) = sum of x[i]^2 in double: fixed blocks (a function of n), each summed by a
// block of threads in a fixed order, then the block sums in a fixed order. n == 0 writes 0.
dsmoe_status dsmoe_cu_sum_squares(const dsmoe_cu_env *env, const float *x, size_t n, double *out);

// out[0] (device int32) = 1 if every x[i] (type dt) is finite, else 0. n == 0 writes 1.
dsmoe_status dsmoe_cu_all_finite(const dsmoe_cu_env *env, const void *x, dsmoe_dtype dt, size_t n, int32_t *out);

// dst (n, dst_type) = src (n, src_type): float32 <-> bfloat16 (round to nearest even), or a copy of the
// same type (float32 or bfloat16). dst and src must not overlap unless they are the same buffer of the
// same type. Other pairs: DSMOE_ERR_UNSUPPORTED.
dsmoe_status dsmoe_cu_convert(const dsmoe_cu_env *env, void *dst, dsmoe_dtype dst_type, const void *src,
                              dsmoe_dtype src_type, size_t n);

// dst (n, float32) = std * dsmoe_rng_normal(key, offset + i) when std > 0, else value. Device double log
// and cos: matches the host within a few float ulp (docs/plugins.md), not bitwise.
dsmoe_status dsmoe_cu_init_tensor(const dsmoe_cu_env *env, float *dst, size_t n, const dsmoe_init_params *p);

// out (n) = gelu(in), tanh approximation (the same expression as the grouped GEMM's epilogue).
dsmoe_status dsmoe_cu_gelu_forward(const dsmoe_cu_env *env, void *out, const void *in, dsmoe_dtype dt, size_t n);

// din (n) += gelu'(in) * dout.
dsmoe_status dsmoe_cu_gelu_backward(const dsmoe_cu_env *env, void *din, const void *in, const void *dout,
                                    dsmoe_dtype dt, size_t n);

// coef (S, 2) float32 = softmax(coef_logits (S, 2)); out (S, M) = moe * coef[:,0] + mlp * coef[:,1].
dsmoe_status dsmoe_cu_residual_mix_forward(const dsmoe_cu_env *env, void *out, float *coef, const void *moe,
                                           const void *mlp, dsmoe_dtype dt, const float *coef_logits, int S, int M);

// dmoe, dmlp (S, M) += dout * coef[:,k]; dcoef_logits (S, 2) += the 2-way softmax backward of
// (dout . moe, dout . mlp), the dot products in double, one block per row in a fixed order.
dsmoe_status dsmoe_cu_residual_mix_backward(const dsmoe_cu_env *env, void *dmoe, void *dmlp, float *dcoef_logits,
                                            const void *dout, const void *moe, const void *mlp, dsmoe_dtype dt,
                                            const float *coef, int S, int M);

// AdamW over n tensors (host list, consumed before return): the list goes to the device by value in
// chunks of up to ADAMW_CHUNK tensors, one launch per chunk (kernels/optim.cu).
dsmoe_status dsmoe_cu_adamw(const dsmoe_cu_env *env, const dsmoe_adamw_params *hp, const dsmoe_adamw_tensor *tensors,
                            int n);

DSMOE_EXTERN_C_END

#endif
