// plugins/cpu/cpu_ops.h: what cpu_plugin.c (the table) needs from cpu_ops.c (the GPT layer ops), and
// the argument checks and threading rules both files share.
// defines: CPU_REQUIRE, CPU_PAR_MIN, cpu_blas_single_threaded, cpu_embedding_*, cpu_layernorm_*,
//          cpu_gelu_*, cpu_attention_*, cpu_crossentropy_*, cpu_residual_mix_*
//
// Threading rules of the dense ops: every parallel loop is `num_threads(ctx->threads)` and gives each
// output element to exactly one thread; a sum over rows is computed by the thread that owns the
// output column (or row), in index order. So no result depends on the thread count.
#ifndef DSMOE_CPU_OPS_H
#define DSMOE_CPU_OPS_H
#include "cpu_internal.h"

// Loops over fewer than this many floats run on one thread: a fork/join costs a few microseconds.
#define CPU_PAR_MIN 16384

// Returns DSMOE_ERR_INVALID with the formatted message when cond is false. The message names the op
// and what was expected: "cpu: gemm: lda=3 < k=5 (a is (m, k), not transposed)".
#define CPU_REQUIRE(ctx, cond, ...)                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            return cpu_fail((ctx), DSMOE_ERR_INVALID, __VA_ARGS__);                                \
    } while (0)

// --- cpu_plugin.c ---
// Puts OpenBLAS in single-threaded mode (if something changed it): every BLAS call of this plugin is
// single-threaded, and our OpenMP loops spread the calls (see the GEMM section of cpu_plugin.c).
void cpu_blas_single_threaded(void);

// --- cpu_ops.c ---
dsmoe_status cpu_embedding_forward(dsmoe_kernel_ctx *ctx, float *out, const int32_t *tokens, const float *wte,
                                   const float *wpe, int B, int T, int M);
dsmoe_status cpu_embedding_backward(dsmoe_kernel_ctx *ctx, float *dwte, float *dwpe, const float *dout,
                                    const int32_t *tokens, int B, int T, int M, int V);
dsmoe_status cpu_layernorm_forward(dsmoe_kernel_ctx *ctx, float *out, float *mean, float *rstd, const float *in,
                                   const float *weight, const float *bias, int S, int M, float eps);
dsmoe_status cpu_layernorm_backward(dsmoe_kernel_ctx *ctx, float *din, float *dweight, float *dbias,
                                    const float *dout, const float *in, const float *weight, const float *mean,
                                    const float *rstd, int S, int M);
dsmoe_status cpu_gelu_forward(dsmoe_kernel_ctx *ctx, float *out, const float *in, size_t n);
dsmoe_status cpu_gelu_backward(dsmoe_kernel_ctx *ctx, float *din, const float *in, const float *dout, size_t n);
dsmoe_status cpu_attention_forward(dsmoe_kernel_ctx *ctx, float *out, float *att, const float *qkv, int B, int T,
                                   int M, int NH);
dsmoe_status cpu_attention_backward(dsmoe_kernel_ctx *ctx, float *dqkv, float *scratch, const float *dout,
                                    const float *qkv, const float *att, int B, int T, int M, int NH);
dsmoe_status cpu_crossentropy_forward(dsmoe_kernel_ctx *ctx, float *losses, float *probs, const float *logits,
                                      const int32_t *targets, int S, int V);
dsmoe_status cpu_crossentropy_backward(dsmoe_kernel_ctx *ctx, float *dlogits, const float *probs,
                                       const int32_t *targets, float dloss, int S, int V);
dsmoe_status cpu_residual_mix_forward(dsmoe_kernel_ctx *ctx, float *out, float *coef, const float *moe,
                                      const float *mlp, const float *coef_logits, int S, int M);
dsmoe_status cpu_residual_mix_backward(dsmoe_kernel_ctx *ctx, float *dmoe, float *dmlp, float *dcoef_logits,
                                       const float *dout, const float *moe, const float *mlp, const float *coef,
                                       int S, int M);

#endif
