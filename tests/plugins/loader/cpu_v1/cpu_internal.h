// plugins/cpu/cpu_internal.h: what the files of the cpu plugin share.
// cpu_plugin.c owns the table, the context, memory, BLAS and the dense ops; cpu_gating.c owns gating,
// dispatch and combine.
#ifndef DSMOE_CPU_INTERNAL_H
#define DSMOE_CPU_INTERNAL_H
#include <stdarg.h>
#include <stdio.h>
#include "dsmoe/kernel_plugin.h"

struct dsmoe_kernel_ctx {
    int threads;            // OpenMP threads used by our loops, and BLAS threads
    char error[1024];       // last_error()
    char description[512];  // describe()
};

// Records a message in ctx->error and returns status.
static inline dsmoe_status cpu_fail(dsmoe_kernel_ctx *ctx, dsmoe_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
    return status;
}

// --- cpu_gating.c ---
dsmoe_status cpu_gate_route(dsmoe_kernel_ctx *ctx, const dsmoe_gating_params *p, const float *logits,
                            float *probs, int32_t *choice, int32_t *host_counts);
dsmoe_status cpu_gate_assign(dsmoe_kernel_ctx *ctx, const dsmoe_gating_params *p, int C, const float *probs,
                             const int32_t *choice, int32_t *slot, float *weight, int32_t *host_kept,
                             double *host_prob_sum, int32_t *host_first_count);
dsmoe_status cpu_gate_backward(dsmoe_kernel_ctx *ctx, const dsmoe_gating_params *p, float *dlogits,
                               const float *probs, const int32_t *choice, const int32_t *slot,
                               const float *dweight, const float *host_aux_grad);
dsmoe_status cpu_moe_dispatch(dsmoe_kernel_ctx *ctx, float *buf, const float *x, const int32_t *choice,
                              const int32_t *slot, int S, int K, int E, int C, int M);
dsmoe_status cpu_moe_dispatch_backward(dsmoe_kernel_ctx *ctx, float *dx, const float *dbuf,
                                       const int32_t *choice, const int32_t *slot, int S, int K, int E, int C,
                                       int M);
dsmoe_status cpu_moe_combine(dsmoe_kernel_ctx *ctx, float *out, const float *y, const int32_t *choice,
                             const int32_t *slot, const float *weight, int S, int K, int E, int C, int M);
dsmoe_status cpu_moe_combine_backward(dsmoe_kernel_ctx *ctx, float *dy, float *dweight, const float *dout,
                                      const float *y, const int32_t *choice, const int32_t *slot,
                                      const float *weight, int S, int K, int E, int C, int M);

#endif
