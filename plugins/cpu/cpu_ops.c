// plugins/cpu/cpu_ops.c: the GPT layer ops of the cpu plugin other than attention (cpu_attention.c):
// embedding, layer norm, GELU, softmax cross-entropy and the residual-MoE mix, each forward beside its
// backward.
// defines: cpu_embedding_*, cpu_layernorm_*, cpu_gelu_*, cpu_crossentropy_*, cpu_residual_mix_*
//
// Contracts are the comments in include/dsmoe/kernel_plugin.h; karpathy/llm.c's train_gpt2.c is the
// model for the math, and every float32 result is bitwise version 1's. Every op takes bfloat16 rows
// itself as well, widened and rounded a row (or an element) at a time. Invariants: forward outputs are
// assigned, backward outputs accumulate (+=); tensors are row-major and contiguous; every output element
// is written by one thread, and sums over rows run in row order inside the thread that owns the column
// (threading rules in cpu_internal.h).
// Bad data (a token or target out of range) is a sticky error (cpu_sticky).
// Per-row statistics (mean, variance, softmax sums) are accumulated in double: they cost little next
// to the GEMMs and keep float rounding out of the finite-difference tests. `omp simd` reductions have
// a lane count fixed at compile time, so their order, and results, do not depend on the thread.
#include <math.h>
#include <omp.h>
#include <string.h>

#include "cpu_bf16.h"     // cpu_bf16_to_f32, cpu_f32_to_bf16
#include "cpu_internal.h" // CPU_BEGIN, CPU_ACT_DTYPE, CPU_REQUIRE, cpu_sticky, cpu_stage_rows
#include "cpu_math.h"     // cpu_exp_fast, CPU_COL_CHUNK, cpu_widen, cpu_store_as

// ---------------------------------------------------------------------------------------------------
// Embedding: out (B*T, M) = wte[tokens] + wpe[t]

// tokens (rows) are device data: one out of [0, V) is the sticky error.
static dsmoe_status check_tokens(cpu_ctx *ctx, const char *op, const char *what, const int32_t *tokens, int rows,
                                 int V) {
    for (int r = 0; r < rows; r++)
        if (tokens[r] < 0 || tokens[r] >= V)
            return cpu_sticky(ctx, DSMOE_ERR_INVALID, "cpu: %s: %s[%d]=%d: expected in [0, %d)", op, what, r,
                              tokens[r], V);
    return DSMOE_OK;
}

// out and wte may each be float32 or bfloat16: a bfloat16 wte is widened, the float32 sum rounded once
// into a bfloat16 out. One body, instantiated with constant dtypes (a loop that tested them per element
// would not vectorise).
static inline __attribute__((always_inline)) void embed_row(void *out, size_t o, const void *wte, size_t e,
                                                            const float *p, int M, int bf_wte, int bf_out) {
    for (int j = 0; j < M; j++)
        cpu_store_as(out, o + j, cpu_widen(wte, e + j, bf_wte) + p[j], bf_out);
}

dsmoe_status cpu_embedding_forward(cpu_ctx *ctx, cpu_queue *q, void *out, dsmoe_dtype dt, const int32_t *tokens,
                                   const void *wte, dsmoe_dtype wte_dt, const float *wpe, const int32_t *pos, int B,
                                   int T, int M, int V, int n_pos) {
    CPU_BEGIN(ctx, q, "embedding_forward");
    CPU_ACT_DTYPE(ctx, "embedding_forward", "dt", dt);
    CPU_ACT_DTYPE(ctx, "embedding_forward", "wte", wte_dt);
    CPU_REQUIRE(ctx, B >= 0 && T >= 0 && M >= 0 && V > 0, "cpu: embedding_forward: B=%d T=%d M=%d V=%d: expected "
                "B, T, M >= 0 and V > 0", B, T, M, V);
    int rows = B * T;
    if ((long)rows * M == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && tokens && wte && wpe, "cpu: embedding_forward: NULL out, tokens, wte or wpe");
    CPU_TRY(check_tokens(ctx, "embedding_forward", "tokens", tokens, rows, V));
    for (int b = 0; b < B; b++) {
        int p0 = pos ? pos[b] : 0;
        if (p0 < 0 || p0 > n_pos - T)
            return cpu_sticky(ctx, DSMOE_ERR_INVALID, "cpu: embedding_forward: pos[%d]=%d with T=%d: expected "
                              "positions in [0, n_pos=%d)", b, p0, T, n_pos);
    }
    const int bf_out = dt == DSMOE_BFLOAT16, bf_wte = wte_dt == DSMOE_BFLOAT16;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * M >= CPU_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        const float *p = wpe + (size_t)((pos ? pos[r / T] : 0) + r % T) * M;
        size_t e = (size_t)tokens[r] * M, o = (size_t)r * M;
        switch (bf_out * 2 + bf_wte) {
        case 0: embed_row(out, o, wte, e, p, M, 0, 0); break;
        case 1: embed_row(out, o, wte, e, p, M, 1, 0); break;
        case 2: embed_row(out, o, wte, e, p, M, 0, 1); break;
        default: embed_row(out, o, wte, e, p, M, 1, 1); break;
        }
    }
    return DSMOE_OK;
}

// d (n) += dout[g ..], widened when bf (a constant at each call).
static inline __attribute__((always_inline)) void add_row_as(float *d, const void *dout, size_t g, int n, int bf) {
    for (int j = 0; j < n; j++)
        d[j] += cpu_widen(dout, g + j, bf);
}

// dwte rows are scattered to by every token that names them, so dwte is split by columns: the thread
// owning a column chunk walks all tokens in order. dwpe (T, M): each position owned by one thread. A
// bfloat16 dout is widened as it is read.
dsmoe_status cpu_embedding_backward(cpu_ctx *ctx, cpu_queue *q, float *dwte, float *dwpe, const void *dout,
                                    dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M, int V) {
    CPU_BEGIN(ctx, q, "embedding_backward");
    CPU_ACT_DTYPE(ctx, "embedding_backward", "dt", dt);
    CPU_REQUIRE(ctx, B >= 0 && T >= 0 && M >= 0 && V > 0, "cpu: embedding_backward: B=%d T=%d M=%d V=%d: "
                "expected B, T, M >= 0 and V > 0", B, T, M, V);
    int rows = B * T;
    if ((long)rows * M == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dwte && dwpe && dout && tokens, "cpu: embedding_backward: NULL dwte, dwpe, dout or tokens");
    CPU_TRY(check_tokens(ctx, "embedding_backward", "tokens", tokens, rows, V));
    const int bf = dt == DSMOE_BFLOAT16;
    int chunks = (M + CPU_COL_CHUNK - 1) / CPU_COL_CHUNK;
    int par = (long)rows * M >= CPU_PAR_MIN;
#pragma omp parallel num_threads(ctx->threads) if (par)
    {
#pragma omp for schedule(static) nowait
        for (int ch = 0; ch < chunks; ch++) {
            int j0 = ch * CPU_COL_CHUNK, w = M - j0 < CPU_COL_CHUNK ? M - j0 : CPU_COL_CHUNK;
            for (int r = 0; r < rows; r++) {
                float *d = dwte + (size_t)tokens[r] * M + j0;
                size_t g = (size_t)r * M + j0;
                if (bf)
                    add_row_as(d, dout, g, w, 1);
                else
                    add_row_as(d, dout, g, w, 0);
            }
        }
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            float *d = dwpe + (size_t)t * M;
            for (int b = 0; b < B; b++) {
                size_t g = ((size_t)b * T + t) * M;
                if (bf)
                    add_row_as(d, dout, g, M, 1);
                else
                    add_row_as(d, dout, g, M, 0);
            }
        }
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Layer norm over the last dimension: out = (in - mean) * rstd * weight + bias, variance biased (as
// torch). mean and rstd (S) are saved for the backward; either may be NULL when no backward follows.
//
// bfloat16 rows are widened a row at a time into the thread's rows of the context's arena, run through
// the same float32 row function (noinline: one compiled body, whose double reductions vectorise one
// way), and the output row rounded once: the float32 op on the widened tensors, rounded, without
// float32 copies of whole tensors (tests/plugins/kernel/test_cpu_bf16_rows.c). The backward's column
// sums are element-wise, so they read bfloat16 in registers (cpu_widen).

// o (M) = the normalized row x; its mean and 1 / std.
static __attribute__((noinline)) void ln_forward_row(float *o, float *mean, float *rstd, const float *x,
                                                      const float *weight, const float *bias, int M, float eps) {
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < M; j++)
        sum += x[j];
    double mu = sum / M, var = 0.0;
#pragma omp simd reduction(+ : var)
    for (int j = 0; j < M; j++)
        var += (x[j] - mu) * (x[j] - mu);
    float m = (float)mu, r = (float)(1.0 / sqrt(var / M + eps));
    for (int j = 0; j < M; j++)
        o[j] = (x[j] - m) * r * weight[j] + bias[j];
    *mean = m;
    *rstd = r;
}

dsmoe_status cpu_layernorm_forward(cpu_ctx *ctx, cpu_queue *q, void *out_, float *mean, float *rstd, const void *in_,
                                   dsmoe_dtype dt, const float *weight, const float *bias, int S, int M, float eps) {
    CPU_BEGIN(ctx, q, "layernorm_forward");
    CPU_ACT_DTYPE(ctx, "layernorm_forward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && M > 0, "cpu: layernorm_forward: S=%d M=%d: expected S >= 0 and M > 0", S, M);
    CPU_REQUIRE(ctx, eps >= 0.0f, "cpu: layernorm_forward: eps=%g: expected >= 0", (double)eps);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out_ && in_ && weight && bias, "cpu: layernorm_forward: NULL out, in, weight or bias");
    const int bf = dt == DSMOE_BFLOAT16;
    float *rows; // (threads, 2, M): x, out
    CPU_TRY(cpu_stage_rows(ctx, "layernorm_forward", bf, ctx->threads, 2 * (size_t)M, &rows));
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * M >= CPU_PAR_MIN)
    for (int s = 0; s < S; s++) {
        size_t at = (size_t)s * M;
        float m, r;
        if (!bf) {
            ln_forward_row((float *)out_ + at, &m, &r, (const float *)in_ + at, weight, bias, M, eps);
        } else {
            float *x = rows + (size_t)omp_get_thread_num() * 2 * M, *o = x + M;
            cpu_bf16_to_f32(x, (const uint16_t *)in_ + at, (size_t)M);
            ln_forward_row(o, &m, &r, x, weight, bias, M, eps);
            cpu_f32_to_bf16((uint16_t *)out_ + at, o, (size_t)M);
        }
        if (mean)
            mean[s] = m;
        if (rstd)
            rstd[s] = r;
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

// d (M) += the input gradient of row x given its output gradient g.
static __attribute__((noinline)) void ln_backward_row(float *d, const float *x, const float *g, const float *weight,
                                                       float m, float r, int M) {
    double dnorm_sum = 0.0, dnorm_norm_sum = 0.0;
#pragma omp simd reduction(+ : dnorm_sum, dnorm_norm_sum)
    for (int j = 0; j < M; j++) {
        float dnorm = weight[j] * g[j];
        dnorm_sum += dnorm;
        dnorm_norm_sum += dnorm * ((x[j] - m) * r);
    }
    float dnorm_mean = (float)(dnorm_sum / M), dnorm_norm_mean = (float)(dnorm_norm_sum / M);
    for (int j = 0; j < M; j++) {
        float norm = (x[j] - m) * r;
        d[j] += r * (weight[j] * g[j] - dnorm_mean - norm * dnorm_norm_mean);
    }
}

// dweight, dbias columns [j0, j0 + w) += sums over the S rows in order, in w-float accumulators; x and
// g are read as float32 or bfloat16 (bf, a constant in each instance).
static inline __attribute__((always_inline)) void ln_backward_cols(float *dweight, float *dbias, const void *dout,
                                                                   const void *in, const float *mean,
                                                                   const float *rstd, int S, int M, int j0, int w,
                                                                   int bf) {
    float acc_w[CPU_COL_CHUNK] = {0}, acc_b[CPU_COL_CHUNK] = {0};
    for (int s = 0; s < S; s++) {
        size_t at = (size_t)s * M + j0;
        float m = mean[s], r = rstd[s];
        for (int j = 0; j < w; j++) {
            float x = cpu_widen(in, at + j, bf), g = cpu_widen(dout, at + j, bf);
            acc_w[j] += g * ((x - m) * r);
            acc_b[j] += g;
        }
    }
    for (int j = 0; j < w; j++) {
        dweight[j0 + j] += acc_w[j];
        dbias[j0 + j] += acc_b[j];
    }
}

// din needs two sums per row (row-parallel pass); dweight and dbias need sums over rows
// (column-parallel pass, recomputing the normalized input instead of storing it).
dsmoe_status cpu_layernorm_backward(cpu_ctx *ctx, cpu_queue *q, void *din_, float *dweight, float *dbias,
                                    const void *dout_, const void *in_, dsmoe_dtype dt, const float *weight,
                                    const float *mean, const float *rstd, int S, int M) {
    CPU_BEGIN(ctx, q, "layernorm_backward");
    CPU_ACT_DTYPE(ctx, "layernorm_backward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && M > 0, "cpu: layernorm_backward: S=%d M=%d: expected S >= 0 and M > 0", S, M);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, din_ && dweight && dbias && dout_ && in_ && weight && mean && rstd,
                "cpu: layernorm_backward: NULL argument (din, dweight, dbias, dout, in, weight, mean or rstd)");
    const int bf = dt == DSMOE_BFLOAT16;
    float *rows; // (threads, 3, M): x, g, din
    CPU_TRY(cpu_stage_rows(ctx, "layernorm_backward", bf, ctx->threads, 3 * (size_t)M, &rows));
    int par = (long)S * M >= CPU_PAR_MIN;
    int chunks = (M + CPU_COL_CHUNK - 1) / CPU_COL_CHUNK;
#pragma omp parallel num_threads(ctx->threads) if (par)
    {
#pragma omp for schedule(static) nowait
        for (int s = 0; s < S; s++) {
            size_t at = (size_t)s * M;
            if (!bf) {
                ln_backward_row((float *)din_ + at, (const float *)in_ + at, (const float *)dout_ + at, weight,
                                mean[s], rstd[s], M);
            } else {
                float *x = rows + (size_t)omp_get_thread_num() * 3 * M, *g = x + M, *d = g + M;
                cpu_bf16_to_f32(x, (const uint16_t *)in_ + at, (size_t)M);
                cpu_bf16_to_f32(g, (const uint16_t *)dout_ + at, (size_t)M);
                cpu_bf16_to_f32(d, (const uint16_t *)din_ + at, (size_t)M);
                ln_backward_row(d, x, g, weight, mean[s], rstd[s], M);
                cpu_f32_to_bf16((uint16_t *)din_ + at, d, (size_t)M);
            }
        }
#pragma omp for schedule(static)
        for (int ch = 0; ch < chunks; ch++) {
            int j0 = ch * CPU_COL_CHUNK, w = M - j0 < CPU_COL_CHUNK ? M - j0 : CPU_COL_CHUNK;
            if (bf)
                ln_backward_cols(dweight, dbias, dout_, in_, mean, rstd, S, M, j0, w, 1);
            else
                ln_backward_cols(dweight, dbias, dout_, in_, mean, rstd, S, M, j0, w, 0);
        }
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// GELU, tanh approximation, through the context's GELU kernels (cpu_vec.h: the same code as the grouped
// GEMM's epilogue), on blocks of GELU_BLOCK elements spread over the threads. A bfloat16 block is
// widened into the thread's rows of the context's arena, run through the same kernel and rounded back.

#define GELU_BLOCK 4096

dsmoe_status cpu_gelu_forward(cpu_ctx *ctx, cpu_queue *q, void *out, const void *in, dsmoe_dtype dt, size_t n) {
    CPU_BEGIN(ctx, q, "gelu_forward");
    CPU_ACT_DTYPE(ctx, "gelu_forward", "dt", dt);
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && in, "cpu: gelu_forward: NULL %s with n=%zu", out ? "in" : "out", n);
    const int bf = dt == DSMOE_BFLOAT16;
    float *rows;
    CPU_TRY(cpu_stage_rows(ctx, "gelu_forward", bf, ctx->threads, 2 * GELU_BLOCK, &rows));
    const cpu_vec *vec = ctx->vec;
    size_t blocks = (n + GELU_BLOCK - 1) / GELU_BLOCK;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN / 4)
    for (size_t b = 0; b < blocks; b++) {
        size_t at = b * GELU_BLOCK, len = n - at < GELU_BLOCK ? n - at : GELU_BLOCK;
        if (bf) {
            float *x = rows + (size_t)omp_get_thread_num() * 2 * GELU_BLOCK, *y = x + GELU_BLOCK;
            cpu_bf16_to_f32(x, (const uint16_t *)in + at, len);
            vec->gelu(y, x, len);
            cpu_f32_to_bf16((uint16_t *)out + at, y, len);
        } else {
            vec->gelu((float *)out + at, (const float *)in + at, len);
        }
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

dsmoe_status cpu_gelu_backward(cpu_ctx *ctx, cpu_queue *q, void *din, const void *in, const void *dout,
                               dsmoe_dtype dt, size_t n) {
    CPU_BEGIN(ctx, q, "gelu_backward");
    CPU_ACT_DTYPE(ctx, "gelu_backward", "dt", dt);
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, din && in && dout, "cpu: gelu_backward: NULL din, in or dout with n=%zu", n);
    const int bf = dt == DSMOE_BFLOAT16;
    float *rows;
    CPU_TRY(cpu_stage_rows(ctx, "gelu_backward", bf, ctx->threads, 3 * GELU_BLOCK, &rows));
    const cpu_vec *vec = ctx->vec;
    size_t blocks = (n + GELU_BLOCK - 1) / GELU_BLOCK;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN / 4)
    for (size_t b = 0; b < blocks; b++) {
        size_t at = b * GELU_BLOCK, len = n - at < GELU_BLOCK ? n - at : GELU_BLOCK;
        if (bf) {
            float *d = rows + (size_t)omp_get_thread_num() * 3 * GELU_BLOCK, *x = d + GELU_BLOCK, *g = x + GELU_BLOCK;
            cpu_bf16_to_f32(d, (const uint16_t *)din + at, len);
            cpu_bf16_to_f32(x, (const uint16_t *)in + at, len);
            cpu_bf16_to_f32(g, (const uint16_t *)dout + at, len);
            vec->gelu_grad_acc(d, x, g, len);
            cpu_f32_to_bf16((uint16_t *)din + at, d, len);
        } else {
            vec->gelu_grad_acc((float *)din + at, (const float *)in + at, (const float *)dout + at, len);
        }
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Softmax cross-entropy over V classes

// loss = log(sum exp(z - max)) - (z[target] - max): exact even where probs[target] underflows to 0.
// p (V) = softmax of the row z; its loss -log p[target]. bfloat16 logits go through it a widened row at
// a time (the forward), as layer norm's do.
static __attribute__((noinline)) void ce_forward_row(float *p, float *loss, const float *z, int target, int V) {
    float maxv = -INFINITY;
#pragma omp simd reduction(max : maxv)
    for (int i = 0; i < V; i++)
        maxv = z[i] > maxv ? z[i] : maxv;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < V; i++) {
        p[i] = cpu_exp_fast(z[i] - maxv);
        sum += p[i];
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < V; i++)
        p[i] *= inv;
    *loss = (float)(log(sum) - ((double)z[target] - maxv));
}

dsmoe_status cpu_crossentropy_forward(cpu_ctx *ctx, cpu_queue *q, float *losses, float *probs, const void *logits,
                                      dsmoe_dtype dt, const int32_t *targets, int S, int V) {
    CPU_BEGIN(ctx, q, "crossentropy_forward");
    CPU_ACT_DTYPE(ctx, "crossentropy_forward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && V > 0, "cpu: crossentropy_forward: S=%d V=%d: expected S >= 0 and V > 0", S, V);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, losses && probs && logits && targets,
                "cpu: crossentropy_forward: NULL losses, probs, logits or targets");
    CPU_TRY(check_tokens(ctx, "crossentropy_forward", "targets", targets, S, V));
    const int bf = dt == DSMOE_BFLOAT16;
    float *rows; // (threads, V): a widened row of logits
    CPU_TRY(cpu_stage_rows(ctx, "crossentropy_forward", bf, ctx->threads, (size_t)V, &rows));
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * V >= CPU_PAR_MIN / 4)
    for (int s = 0; s < S; s++) {
        size_t at = (size_t)s * V;
        const float *z = (const float *)logits + (bf ? 0 : at);
        if (bf) {
            float *w = rows + (size_t)omp_get_thread_num() * V;
            cpu_bf16_to_f32(w, (const uint16_t *)logits + at, (size_t)V);
            z = w;
        }
        ce_forward_row(probs + at, losses + s, z, targets[s], V);
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

// dlogits += dloss (p - onehot(target)): in float32, each element rounded once in bfloat16 (the target's
// after both terms).
static inline __attribute__((always_inline)) void ce_backward_row(void *d, size_t at, const float *p, int target,
                                                                 float dloss, int V, int bf) {
    for (int i = 0; i < V; i++) {
        float v = cpu_widen(d, at + i, bf) + dloss * p[i];
        if (i == target)
            v -= dloss;
        cpu_store_as(d, at + i, v, bf);
    }
}

dsmoe_status cpu_crossentropy_backward(cpu_ctx *ctx, cpu_queue *q, void *dlogits, dsmoe_dtype dt, const float *probs,
                                       const int32_t *targets, float dloss, int S, int V) {
    CPU_BEGIN(ctx, q, "crossentropy_backward");
    CPU_ACT_DTYPE(ctx, "crossentropy_backward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && V > 0, "cpu: crossentropy_backward: S=%d V=%d: expected S >= 0 and V > 0", S, V);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dlogits && probs && targets, "cpu: crossentropy_backward: NULL dlogits, probs or targets");
    CPU_TRY(check_tokens(ctx, "crossentropy_backward", "targets", targets, S, V));
    const int bf = dt == DSMOE_BFLOAT16;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * V >= CPU_PAR_MIN)
    for (int s = 0; s < S; s++) {
        size_t at = (size_t)s * V;
        if (bf)
            ce_backward_row(dlogits, at, probs + at, targets[s], dloss, V, 1);
        else
            ce_backward_row(dlogits, at, probs + at, targets[s], dloss, V, 0);
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Residual-MoE mix: coef (S, 2) = softmax(coef_logits); out = moe * coef[:,0] + mlp * coef[:,1].
// bfloat16 rows are widened a row at a time and run through the same row functions, as layer norm's.

static __attribute__((noinline)) void mix_forward_row(float *o, const float *a, const float *b, float c0, float c1,
                                                       int M) {
    for (int j = 0; j < M; j++)
        o[j] = a[j] * c0 + b[j] * c1;
}

dsmoe_status cpu_residual_mix_forward(cpu_ctx *ctx, cpu_queue *q, void *out, float *coef, const void *moe,
                                      const void *mlp, dsmoe_dtype dt, const float *coef_logits, int S, int M) {
    CPU_BEGIN(ctx, q, "residual_mix_forward");
    CPU_ACT_DTYPE(ctx, "residual_mix_forward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && M >= 0, "cpu: residual_mix_forward: S=%d M=%d: expected >= 0", S, M);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && coef && moe && mlp && coef_logits,
                "cpu: residual_mix_forward: NULL out, coef, moe, mlp or coef_logits");
    const int bf = dt == DSMOE_BFLOAT16;
    float *rows; // (threads, 3, M): moe, mlp, out
    CPU_TRY(cpu_stage_rows(ctx, "residual_mix_forward", bf, ctx->threads, 3 * (size_t)M, &rows));
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * M >= CPU_PAR_MIN)
    for (int s = 0; s < S; s++) {
        float l0 = coef_logits[2 * s], l1 = coef_logits[2 * s + 1];
        float mx = l0 > l1 ? l0 : l1;
        float e0 = expf(l0 - mx), e1 = expf(l1 - mx);
        float c0 = e0 / (e0 + e1), c1 = e1 / (e0 + e1);
        coef[2 * s] = c0;
        coef[2 * s + 1] = c1;
        size_t at = (size_t)s * M;
        if (!bf) {
            mix_forward_row((float *)out + at, (const float *)moe + at, (const float *)mlp + at, c0, c1, M);
        } else {
            float *a = rows + (size_t)omp_get_thread_num() * 3 * M, *b = a + M, *o = b + M;
            cpu_bf16_to_f32(a, (const uint16_t *)moe + at, (size_t)M);
            cpu_bf16_to_f32(b, (const uint16_t *)mlp + at, (size_t)M);
            mix_forward_row(o, a, b, c0, c1, M);
            cpu_f32_to_bf16((uint16_t *)out + at, o, (size_t)M);
        }
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

// da, db (M) += the row's input gradients; *dc0, *dc1 = dout . moe, dout . mlp.
static __attribute__((noinline)) void mix_backward_row(float *da, float *db, double *dc0, double *dc1,
                                                        const float *g, const float *a, const float *b, float c0,
                                                        float c1, int M) {
    double s0 = 0.0, s1 = 0.0;
    for (int j = 0; j < M; j++) {
        s0 += (double)g[j] * a[j];
        s1 += (double)g[j] * b[j];
        da[j] += g[j] * c0;
        db[j] += g[j] * c1;
    }
    *dc0 = s0;
    *dc1 = s1;
}

// d coef_k = dout . input_k; through the 2-way softmax, dlogit0 = c0 c1 (dcoef0 - dcoef1) = -dlogit1.
dsmoe_status cpu_residual_mix_backward(cpu_ctx *ctx, cpu_queue *q, void *dmoe, void *dmlp, float *dcoef_logits,
                                       const void *dout, const void *moe, const void *mlp, dsmoe_dtype dt,
                                       const float *coef, int S, int M) {
    CPU_BEGIN(ctx, q, "residual_mix_backward");
    CPU_ACT_DTYPE(ctx, "residual_mix_backward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && M >= 0, "cpu: residual_mix_backward: S=%d M=%d: expected >= 0", S, M);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dmoe && dmlp && dcoef_logits && dout && moe && mlp && coef,
                "cpu: residual_mix_backward: NULL argument (dmoe, dmlp, dcoef_logits, dout, moe, mlp or coef)");
    const int bf = dt == DSMOE_BFLOAT16;
    float *rows; // (threads, 5, M): dout, moe, mlp, dmoe, dmlp
    CPU_TRY(cpu_stage_rows(ctx, "residual_mix_backward", bf, ctx->threads, 5 * (size_t)M, &rows));
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * M >= CPU_PAR_MIN)
    for (int s = 0; s < S; s++) {
        float c0 = coef[2 * s], c1 = coef[2 * s + 1];
        size_t at = (size_t)s * M;
        double dc0, dc1;
        if (!bf) {
            mix_backward_row((float *)dmoe + at, (float *)dmlp + at, &dc0, &dc1, (const float *)dout + at,
                             (const float *)moe + at, (const float *)mlp + at, c0, c1, M);
        } else {
            float *g = rows + (size_t)omp_get_thread_num() * 5 * M, *a = g + M, *b = a + M, *da = b + M, *db = da + M;
            const void *in[5] = {dout, moe, mlp, dmoe, dmlp};
            for (int i = 0; i < 5; i++)
                cpu_bf16_to_f32(g + (size_t)i * M, (const uint16_t *)in[i] + at, (size_t)M);
            mix_backward_row(da, db, &dc0, &dc1, g, a, b, c0, c1, M);
            cpu_f32_to_bf16((uint16_t *)dmoe + at, da, (size_t)M);
            cpu_f32_to_bf16((uint16_t *)dmlp + at, db, (size_t)M);
        }
        float dl0 = (float)((double)c0 * c1 * (dc0 - dc1));
        dcoef_logits[2 * s] += dl0;
        dcoef_logits[2 * s + 1] -= dl0;
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}
