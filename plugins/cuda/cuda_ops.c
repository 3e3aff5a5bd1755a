// plugins/cuda/cuda_ops.c: every compute member of the cuda plugin, each forwarded to its launcher in
// kernels/ (dsmoe_cu_<member>, the member's arguments after the queue, with the queue's env first:
// kernels/cuda_env.h).
// defines: cu_attention_bytes and cu_gemm ... cu_sample (the table in cuda_plugin.c lists them)
//
// The glue around each launch (CU_OP): a context with a sticky error refuses the op; the queue must be
// the context's; the cuBLAS handle is bound to the queue's stream and workspace (the launchers assume
// env->cublas works on env->stream); a launcher's message gets the plugin's prefix. A launcher that
// reports a CUDA failure (DSMOE_ERR_SYSTEM: its launch failed, or an earlier kernel broke the device)
// breaks the context; any other refusal (a shape, a dtype, scratch memory) leaves it usable.
#include <string.h>

#include "attention.h"
#include "distill.h"
#include "elementwise.h"
#include "gating.h"
#include "gemm.h"
#include "nn.h"

#include "cuda_internal.h"

// The runtime's last-error slot is shared by every library of the process on this thread (a comm
// plugin's CUDA calls too): a launcher checks it after its launches, so a stale error someone else left
// is cleared first. A device fault is not lost by this: CUDA returns it again from every later call.
static dsmoe_status op_begin(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const char *op) {
    CU_TRY(cu_begin(ctx, q, op));
    CU_TRY(cu_bind_blas(ctx, q, op));
    (void)cudaGetLastError();
    ctx->launch_msg[0] = '\0';
    return DSMOE_OK;
}

// Launchers write "<op>: <what>" (dsmoe_cu_fail); the op is added when a message does not start with it.
static dsmoe_status op_end(dsmoe_kernel_ctx *ctx, const char *op, dsmoe_status st) {
    if (st == DSMOE_OK)
        return DSMOE_OK;
    (void)cudaGetLastError(); // e.g. a scratch cudaMallocAsync that failed: not the next op's error
    const char *m = ctx->launch_msg[0] ? ctx->launch_msg : "the launcher failed without a message";
    size_t n = strlen(op);
    int named = strncmp(m, op, n) == 0 && m[n] == ':';
    if (st == DSMOE_ERR_SYSTEM)
        return named ? cu_sticky(ctx, st, "cuda: %s", m) : cu_sticky(ctx, st, "cuda: %s: %s", op, m);
    return named ? cu_fail(ctx, st, "cuda: %s", m) : cu_fail(ctx, st, "cuda: %s: %s", op, m);
}

// CU_OP_AS: a member whose launcher has another name (gate: dsmoe_cu_gate_fused).
#define CU_OP_AS(member, launcher, ...)                                                            \
    do {                                                                                           \
        CU_TRY(op_begin(ctx, q, #member));                                                         \
        return op_end(ctx, #member, launcher(&q->env, __VA_ARGS__));                               \
    } while (0)
#define CU_OP(member, ...) CU_OP_AS(member, dsmoe_cu_##member, __VA_ARGS__)

// Callable before init (ctx may be NULL): the launcher needs no env, only the shape.
dsmoe_status cu_attention_bytes(dsmoe_kernel_ctx *ctx, const dsmoe_attention_shape *shape, size_t *saved,
                                size_t *workspace) {
    if (!shape || !saved || !workspace)
        return ctx ? cu_fail(ctx, DSMOE_ERR_INVALID, "cuda: attention_bytes: NULL shape, saved or workspace")
                   : DSMOE_ERR_INVALID;
    dsmoe_status st = dsmoe_cu_attention_bytes(shape, saved, workspace);
    if (st != DSMOE_OK && ctx)
        return cu_fail(ctx, st, "cuda: attention_bytes: B=%d T=%d M=%d NH=%d dtype %s: not a shape the attention "
                       "kernels take (%s)", shape->B, shape->T, shape->M, shape->NH, dsmoe_dtype_name(shape->dt),
                       dsmoe_status_name(st));
    return st;
}

// --- GEMM -------------------------------------------------------------------------------------------

dsmoe_status cu_gemm(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, int trans_a, int trans_b, int m, int n, int k,
                     float alpha, const void *a, dsmoe_dtype a_type, int lda, const void *b, dsmoe_dtype b_type,
                     int ldb, float beta, void *c, dsmoe_dtype c_type, int ldc) {
    CU_OP(gemm, trans_a, trans_b, m, n, k, alpha, a, a_type, lda, b, b_type, ldb, beta, c, c_type, ldc);
}

dsmoe_status cu_gemm_grouped(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_gemm *g) {
    CU_OP(gemm_grouped, g);
}

dsmoe_status cu_gemm_grouped_wgrad(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_wgrad *g) {
    CU_OP(gemm_grouped_wgrad, g);
}

// --- element-wise and small ops ----------------------------------------------------------------------

dsmoe_status cu_bias_add(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt, const float *bias,
                         int rows, int n) {
    CU_OP(bias_add, out, dt, bias, rows, n);
}

dsmoe_status cu_bias_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dbias, const void *dout,
                              dsmoe_dtype dt, int rows, int n) {
    CU_OP(bias_backward, dbias, dout, dt, rows, n);
}

dsmoe_status cu_axpy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *y, float alpha, const void *x, dsmoe_dtype dt,
                     size_t n) {
    CU_OP(axpy, y, alpha, x, dt, n);
}

dsmoe_status cu_mul_uniform_noise(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in,
                                  dsmoe_dtype dt, size_t n, float eps, uint64_t seed, uint64_t offset) {
    CU_OP(mul_uniform_noise, out, in, dt, n, eps, seed, offset);
}

dsmoe_status cu_sum_squares(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const float *x, size_t n, double *out) {
    CU_OP(sum_squares, x, n, out);
}

dsmoe_status cu_all_finite(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const void *x, dsmoe_dtype dt, size_t n,
                           int32_t *out) {
    CU_OP(all_finite, x, dt, n, out);
}

dsmoe_status cu_convert(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, dsmoe_dtype dst_type, const void *src,
                        dsmoe_dtype src_type, size_t n) {
    CU_OP(convert, dst, dst_type, src, src_type, n);
}

dsmoe_status cu_init_tensor(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dst, size_t n,
                            const dsmoe_init_params *p) {
    CU_OP(init_tensor, dst, n, p);
}

// --- the GPT layers ----------------------------------------------------------------------------------

dsmoe_status cu_embedding_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt,
                                  const int32_t *tokens, const void *wte, dsmoe_dtype wte_dt, const float *wpe,
                                  const int32_t *pos, int B, int T, int M, int V, int n_pos) {
    CU_OP(embedding_forward, out, dt, tokens, wte, wte_dt, wpe, pos, B, T, M, V, n_pos);
}

dsmoe_status cu_embedding_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dwte, float *dwpe,
                                   const void *dout, dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M,
                                   int V) {
    CU_OP(embedding_backward, dwte, dwpe, dout, dt, tokens, B, T, M, V);
}

dsmoe_status cu_layernorm_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *mean, float *rstd,
                                  const void *in, dsmoe_dtype dt, const float *weight, const float *bias, int S,
                                  int M, float eps) {
    CU_OP(layernorm_forward, out, mean, rstd, in, dt, weight, bias, S, M, eps);
}

dsmoe_status cu_layernorm_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, float *dweight,
                                   float *dbias, const void *dout, const void *in, dsmoe_dtype dt,
                                   const float *weight, const float *mean, const float *rstd, int S, int M) {
    CU_OP(layernorm_backward, din, dweight, dbias, dout, in, dt, weight, mean, rstd, S, M);
}

dsmoe_status cu_gelu_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in, dsmoe_dtype dt,
                             size_t n) {
    CU_OP(gelu_forward, out, in, dt, n);
}

dsmoe_status cu_gelu_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, const void *in,
                              const void *dout, dsmoe_dtype dt, size_t n) {
    CU_OP(gelu_backward, din, in, dout, dt, n);
}

dsmoe_status cu_attention_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, void *saved,
                                  const void *qkv, const dsmoe_attention_shape *shape) {
    CU_OP(attention_forward, out, saved, qkv, shape);
}

dsmoe_status cu_attention_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dqkv, void *workspace,
                                   const void *dout, const void *qkv, const void *out, const void *saved,
                                   const dsmoe_attention_shape *shape) {
    CU_OP(attention_backward, dqkv, workspace, dout, qkv, out, saved, shape);
}

dsmoe_status cu_crossentropy_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *losses, float *probs,
                                     const void *logits, dsmoe_dtype dt, const int32_t *targets, int S, int V) {
    CU_OP(crossentropy_forward, losses, probs, logits, dt, targets, S, V);
}

dsmoe_status cu_crossentropy_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dlogits, dsmoe_dtype dt,
                                      const float *probs, const int32_t *targets, float dloss, int S, int V) {
    CU_OP(crossentropy_backward, dlogits, dt, probs, targets, dloss, S, V);
}

// --- knowledge distillation ----------------------------------------------------------------------------

dsmoe_status cu_distill_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *losses, float *diff,
                                const void *student, const void *teacher, dsmoe_dtype dt, float temperature, int S,
                                int V) {
    CU_OP(distill_forward, losses, diff, student, teacher, dt, temperature, S, V);
}

dsmoe_status cu_distill_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dstudent, dsmoe_dtype dt,
                                 const float *diff, float scale, int S, int V) {
    CU_OP(distill_backward, dstudent, dt, diff, scale, S, V);
}

// --- MoE gating, dispatch, combine ---------------------------------------------------------------------

dsmoe_status cu_gate_route(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                           const float *logits, float *probs, int32_t *choice, int32_t *counts) {
    CU_OP(gate_route, p, logits, probs, choice, counts);
}

dsmoe_status cu_gate_assign(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p, int C,
                            const float *probs, const int32_t *choice, int32_t *slot, float *weight, int32_t *kept,
                            double *aux_sums) {
    CU_OP(gate_assign, p, C, probs, choice, slot, weight, kept, aux_sums);
}

// Route + assign in one launch (kernels/gating_fused.cu).
dsmoe_status cu_gate(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p, int C,
                     const float *logits, float *probs, int32_t *choice, int32_t *counts, int32_t *slot, float *weight,
                     int32_t *kept, double *aux_sums) {
    CU_OP_AS(gate, dsmoe_cu_gate_fused, p, C, logits, probs, choice, counts, slot, weight, kept, aux_sums);
}

dsmoe_status cu_gate_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                              float *dlogits, const float *probs, const int32_t *choice, const int32_t *slot,
                              const float *dweight, const double *aux_sums, float daux) {
    CU_OP(gate_backward, p, dlogits, probs, choice, slot, dweight, aux_sums, daux);
}

dsmoe_status cu_moe_dispatch(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *buf, const void *x, dsmoe_dtype dt,
                             const int32_t *choice, const int32_t *slot, int S, int K, int E, int C, int M) {
    CU_OP(moe_dispatch, buf, x, dt, choice, slot, S, K, E, C, M);
}

dsmoe_status cu_moe_dispatch_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dx, const void *dbuf,
                                      dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, int S, int K, int E,
                                      int C, int M) {
    CU_OP(moe_dispatch_backward, dx, dbuf, dt, choice, slot, S, K, E, C, M);
}

dsmoe_status cu_moe_combine(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *y, dsmoe_dtype dt,
                            const int32_t *choice, const int32_t *slot, const float *weight, int S, int K, int E,
                            int C, int M) {
    CU_OP(moe_combine, out, y, dt, choice, slot, weight, S, K, E, C, M);
}

dsmoe_status cu_moe_combine_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dy, float *dweight,
                                     const void *dout, const void *y, dsmoe_dtype dt, const int32_t *choice,
                                     const int32_t *slot, const float *weight, int S, int K, int E, int C, int M) {
    CU_OP(moe_combine_backward, dy, dweight, dout, y, dt, choice, slot, weight, S, K, E, C, M);
}

// --- residual MoE mixing, optimizer --------------------------------------------------------------------

dsmoe_status cu_residual_mix_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *coef,
                                     const void *moe, const void *mlp, dsmoe_dtype dt, const float *coef_logits,
                                     int S, int M) {
    CU_OP(residual_mix_forward, out, coef, moe, mlp, dt, coef_logits, S, M);
}

dsmoe_status cu_residual_mix_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dmoe, void *dmlp,
                                      float *dcoef_logits, const void *dout, const void *moe, const void *mlp,
                                      dsmoe_dtype dt, const float *coef, int S, int M) {
    CU_OP(residual_mix_backward, dmoe, dmlp, dcoef_logits, dout, moe, mlp, dt, coef, S, M);
}

dsmoe_status cu_adamw(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_adamw_params *hp,
                      const dsmoe_adamw_tensor *tensors, int n) {
    CU_OP(adamw, hp, tensors, n);
}

// --- inference ---------------------------------------------------------------------------------------

dsmoe_status cu_kv_append(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *k_cache, void *v_cache, const void *qkv,
                          dsmoe_dtype dt, const int32_t *pos, int B, int T_new, int M, int NH, int T_max) {
    CU_OP(kv_append, k_cache, v_cache, qkv, dt, pos, B, T_new, M, NH, T_max);
}

dsmoe_status cu_attention_cached(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *qkv,
                                 const void *k_cache, const void *v_cache, dsmoe_dtype dt, const int32_t *pos, int B,
                                 int T_new, int M, int NH, int T_max) {
    CU_OP(attention_cached, out, qkv, k_cache, v_cache, dt, pos, B, T_new, M, NH, T_max);
}

dsmoe_status cu_sample(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, int32_t *tokens, const void *logits,
                       dsmoe_dtype dt, int rows, int V, const dsmoe_sampling_params *p, const uint64_t *counters) {
    CU_OP(sample, tokens, logits, dt, rows, V, p, counters);
}
