// plugins/cpu/cpu_ops.c: the GPT layer ops of the cpu plugin: embedding, layer norm, GELU, causal
// attention, softmax cross-entropy and the residual-MoE mix, each forward beside its backward.
// defines: cpu_embedding_*, cpu_layernorm_*, cpu_gelu_*, cpu_attention_* (and _bytes),
//          cpu_crossentropy_*, cpu_residual_mix_*
//
// Contracts are the comments in include/dsmoe/kernel_plugin.h; karpathy/llm.c's train_gpt2.c is the
// model for the math, and every float32 result is bitwise version 1's. Layer norm takes bfloat16 rows
// itself; the other ops' bfloat16 members stage (cpu_bf16_ops.c). Invariants: forward outputs are
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

#include <cblas.h> // cblas_sgemm, for attention (called single-threaded, see cpu_blas_single_threaded)

#include "cpu_bf16.h"     // cpu_bf2f (a bfloat16 embedding table), the conversions, cpu_stage_reserve
#include "cpu_internal.h" // CPU_BEGIN, CPU_DTYPE, CPU_REQUIRE, cpu_sticky, cpu_blas_single_threaded
#include "cpu_math.h"     // cpu_exp_fast, CPU_COL_CHUNK, cpu_widen

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

// out is float32 here (bfloat16 outputs are staged by cpu_bf16_ops.c); wte may be bfloat16 either way.
dsmoe_status cpu_embedding_forward(cpu_ctx *ctx, cpu_queue *q, void *out_, dsmoe_dtype dt, const int32_t *tokens,
                                   const void *wte, dsmoe_dtype wte_dt, const float *wpe, const int32_t *pos, int B,
                                   int T, int M, int V, int n_pos) {
    CPU_BEGIN(ctx, q, "embedding_forward");
    CPU_DTYPE(ctx, "embedding_forward", "dt", dt);
    if (wte_dt != DSMOE_BFLOAT16)
        CPU_DTYPE(ctx, "embedding_forward", "wte", wte_dt);
    CPU_REQUIRE(ctx, B >= 0 && T >= 0 && M >= 0 && V > 0, "cpu: embedding_forward: B=%d T=%d M=%d V=%d: expected "
                "B, T, M >= 0 and V > 0", B, T, M, V);
    int rows = B * T;
    if ((long)rows * M == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out_ && tokens && wte && wpe, "cpu: embedding_forward: NULL out, tokens, wte or wpe");
    CPU_TRY(check_tokens(ctx, "embedding_forward", "tokens", tokens, rows, V));
    for (int b = 0; b < B; b++) {
        int p0 = pos ? pos[b] : 0;
        if (p0 < 0 || p0 > n_pos - T)
            return cpu_sticky(ctx, DSMOE_ERR_INVALID, "cpu: embedding_forward: pos[%d]=%d with T=%d: expected "
                              "positions in [0, n_pos=%d)", b, p0, T, n_pos);
    }
    float *out = out_;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * M >= CPU_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        const float *p = wpe + (size_t)((pos ? pos[r / T] : 0) + r % T) * M;
        float *o = out + (size_t)r * M;
        if (wte_dt == DSMOE_BFLOAT16) {
            const uint16_t *e = (const uint16_t *)wte + (size_t)tokens[r] * M;
            for (int j = 0; j < M; j++)
                o[j] = cpu_bf2f(e[j]) + p[j];
        } else {
            const float *e = (const float *)wte + (size_t)tokens[r] * M;
            for (int j = 0; j < M; j++)
                o[j] = e[j] + p[j];
        }
    }
    return DSMOE_OK;
}

// dwte rows are scattered to by every token that names them, so dwte is split by columns: the thread
// owning a column chunk walks all tokens in order. dwpe (T, M): each position owned by one thread.
dsmoe_status cpu_embedding_backward(cpu_ctx *ctx, cpu_queue *q, float *dwte, float *dwpe, const void *dout_,
                                    dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M, int V) {
    CPU_BEGIN(ctx, q, "embedding_backward");
    CPU_DTYPE(ctx, "embedding_backward", "dt", dt);
    CPU_REQUIRE(ctx, B >= 0 && T >= 0 && M >= 0 && V > 0, "cpu: embedding_backward: B=%d T=%d M=%d V=%d: "
                "expected B, T, M >= 0 and V > 0", B, T, M, V);
    int rows = B * T;
    if ((long)rows * M == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dwte && dwpe && dout_ && tokens, "cpu: embedding_backward: NULL dwte, dwpe, dout or tokens");
    CPU_TRY(check_tokens(ctx, "embedding_backward", "tokens", tokens, rows, V));
    const float *dout = dout_;
    int chunks = (M + CPU_COL_CHUNK - 1) / CPU_COL_CHUNK;
    int par = (long)rows * M >= CPU_PAR_MIN;
#pragma omp parallel num_threads(ctx->threads) if (par)
    {
#pragma omp for schedule(static) nowait
        for (int ch = 0; ch < chunks; ch++) {
            int j0 = ch * CPU_COL_CHUNK, w = M - j0 < CPU_COL_CHUNK ? M - j0 : CPU_COL_CHUNK;
            for (int r = 0; r < rows; r++) {
                float *d = dwte + (size_t)tokens[r] * M + j0;
                const float *g = dout + (size_t)r * M + j0;
                for (int j = 0; j < w; j++)
                    d[j] += g[j];
            }
        }
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            float *d = dwpe + (size_t)t * M;
            for (int b = 0; b < B; b++) {
                const float *g = dout + ((size_t)b * T + t) * M;
                for (int j = 0; j < M; j++)
                    d[j] += g[j];
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
// way), and the output row rounded once: the float32 op on the widened tensors, rounded, without the
// whole-tensor float32 copies the staged ops make (tests/plugins/kernel/test_cpu_bf16_rows.c). The
// backward's column sums are element-wise, so they read bfloat16 in registers (cpu_widen).

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

// Rows of `n` floats per thread for a bfloat16 call, from the context's arena; NULL for float32.
static dsmoe_status bf16_rows(cpu_ctx *ctx, const char *op, int bf, size_t n, float **rows) {
    *rows = NULL;
    return bf ? cpu_stage_reserve(ctx, op, (size_t)ctx->threads * n * sizeof(float), (void **)rows) : DSMOE_OK;
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
    CPU_TRY(bf16_rows(ctx, "layernorm_forward", bf, 2 * (size_t)M, &rows));
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
    if (bf)
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
    CPU_TRY(bf16_rows(ctx, "layernorm_backward", bf, 3 * (size_t)M, &rows));
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
    if (bf)
        cpu_stage_release(ctx);
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// GELU, tanh approximation, through the context's GELU kernels (cpu_vec.h: the same code as the grouped
// GEMM's epilogue), on blocks of GELU_BLOCK elements spread over the threads.

#define GELU_BLOCK 4096

dsmoe_status cpu_gelu_forward(cpu_ctx *ctx, cpu_queue *q, void *out_, const void *in_, dsmoe_dtype dt, size_t n) {
    CPU_BEGIN(ctx, q, "gelu_forward");
    CPU_DTYPE(ctx, "gelu_forward", "dt", dt);
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out_ && in_, "cpu: gelu_forward: NULL %s with n=%zu", out_ ? "in" : "out", n);
    float *out = out_;
    const float *in = in_;
    const cpu_vec *vec = ctx->vec;
    size_t blocks = (n + GELU_BLOCK - 1) / GELU_BLOCK;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN / 4)
    for (size_t b = 0; b < blocks; b++) {
        size_t at = b * GELU_BLOCK, len = n - at < GELU_BLOCK ? n - at : GELU_BLOCK;
        vec->gelu(out + at, in + at, len);
    }
    return DSMOE_OK;
}

dsmoe_status cpu_gelu_backward(cpu_ctx *ctx, cpu_queue *q, void *din_, const void *in_, const void *dout_,
                               dsmoe_dtype dt, size_t n) {
    CPU_BEGIN(ctx, q, "gelu_backward");
    CPU_DTYPE(ctx, "gelu_backward", "dt", dt);
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, din_ && in_ && dout_, "cpu: gelu_backward: NULL din, in or dout with n=%zu", n);
    float *din = din_;
    const float *in = in_, *dout = dout_;
    const cpu_vec *vec = ctx->vec;
    size_t blocks = (n + GELU_BLOCK - 1) / GELU_BLOCK;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN / 4)
    for (size_t b = 0; b < blocks; b++) {
        size_t at = b * GELU_BLOCK, len = n - at < GELU_BLOCK ? n - at : GELU_BLOCK;
        vec->gelu_grad_acc(din + at, in + at, dout + at, len);
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Causal multi-head self-attention. qkv (B*T, 3M) = per token [q | k | v]; head h uses columns
// [h*hs, (h+1)*hs) of each part, hs = M/NH. saved = att (B, NH, T, T): the softmax probabilities.

static dsmoe_status check_attention(cpu_ctx *ctx, const char *op, const dsmoe_attention_shape *sh) {
    CPU_REQUIRE(ctx, sh, "cpu: %s: NULL shape", op);
    CPU_DTYPE(ctx, op, "shape.dt", sh->dt);
    CPU_REQUIRE(ctx, sh->B >= 0 && sh->T >= 0 && sh->M > 0 && sh->NH > 0, "cpu: %s: B=%d T=%d M=%d NH=%d: expected "
                "B, T >= 0 and M, NH > 0", op, sh->B, sh->T, sh->M, sh->NH);
    CPU_REQUIRE(ctx, sh->M % sh->NH == 0, "cpu: %s: M=%d is not a multiple of NH=%d", op, sh->M, sh->NH);
    return DSMOE_OK;
}

// saved = the probabilities (B, NH, T, T); workspace = the backward's (B, NH, T, T) scratch. ctx may be
// NULL (--plan asks before init): then a bad shape gives its status without a message.
dsmoe_status cpu_attention_bytes(cpu_ctx *ctx, const dsmoe_attention_shape *shape, size_t *saved,
                                 size_t *workspace) {
    if (!ctx) {
        if (!shape || !saved || !workspace)
            return DSMOE_ERR_INVALID;
        if (shape->dt != DSMOE_FLOAT32)
            return DSMOE_ERR_UNSUPPORTED;
        if (shape->B < 0 || shape->T < 0 || shape->M <= 0 || shape->NH <= 0 || shape->M % shape->NH)
            return DSMOE_ERR_INVALID;
    } else {
        CPU_REQUIRE(ctx, saved && workspace, "cpu: attention_bytes: NULL saved or workspace");
        CPU_TRY(check_attention(ctx, "attention_bytes", shape));
    }
    size_t n = (size_t)shape->B * (size_t)shape->NH * (size_t)shape->T * (size_t)shape->T * sizeof(float);
    *saved = n;
    *workspace = n;
    return DSMOE_OK;
}

// Masked softmax of `rows` rows of a (rows, ld) block in place: row t keeps columns [0, first + t],
// the rest of its ld columns become 0. Attention: first = 0 (causal); cached attention: first = the
// position of the block's first query.
void cpu_causal_softmax_rows(float *a, int rows, int ld, int first) {
    for (int t = 0; t < rows; t++) {
        float *row = a + (size_t)t * ld, maxv = -INFINITY;
        int last = first + t;
        for (int t2 = 0; t2 <= last; t2++)
            maxv = row[t2] > maxv ? row[t2] : maxv;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int t2 = 0; t2 <= last; t2++) {
            row[t2] = cpu_exp_fast(row[t2] - maxv);
            sum += row[t2];
        }
        float inv = (float)(1.0 / sum);
        for (int t2 = 0; t2 <= last; t2++)
            row[t2] *= inv;
        for (int t2 = last + 1; t2 < ld; t2++)
            row[t2] = 0.0f;
    }
}

// Work units are (b, h) pairs, each three single-threaded GEMMs on strided views of qkv: q, k and v of
// head h are (T, hs) with leading dimension 3M. The full (T, T) product is computed and the upper
// triangle masked: twice the causal work, at BLAS speed.
dsmoe_status cpu_attention_forward(cpu_ctx *ctx, cpu_queue *q, void *out_, void *saved, const void *qkv_,
                                   const dsmoe_attention_shape *shape) {
    CPU_BEGIN(ctx, q, "attention_forward");
    CPU_TRY(check_attention(ctx, "attention_forward", shape));
    const int B = shape->B, T = shape->T, M = shape->M, NH = shape->NH;
    if (B == 0 || T == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out_ && saved && qkv_, "cpu: attention_forward: NULL out, saved or qkv");
    float *out = out_, *att = saved;
    const float *qkv = qkv_;
    int hs = M / NH, ld = 3 * M, units = B * NH;
    float scale = 1.0f / sqrtf((float)hs);
    cpu_blas_single_threaded();
#pragma omp parallel for num_threads(ctx->threads) schedule(dynamic, 1) if (units > 1 && (long)T * T * hs >= 4096)
    for (int u = 0; u < units; u++) {
        int h = u % NH, b = u / NH;
        const float *q = qkv + (size_t)b * T * ld + (size_t)h * hs, *k = q + M, *v = q + 2 * (size_t)M;
        float *a = att + (size_t)u * T * T; // (T, T) block (b, h) of att
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q, ld, k, ld, 0.0f, a, T);
        cpu_causal_softmax_rows(a, T, T, 0);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, a, T, v, ld, 0.0f,
                    out + (size_t)b * T * M + (size_t)h * hs, M);
    }
    return DSMOE_OK;
}

// Per (b, h): da = dout v^T; dv += a^T dout; dpre = a * (da - rowsum(a * da)) (softmax backward,
// 0 above the diagonal since a is); dq += scale dpre k; dk += scale dpre^T q. The (b, h) pair owns
// all its rows of dq, dk, dv, so pairs run in parallel; scratch block (b, h) of the workspace holds da,
// then dpre. `out` is not needed (the probabilities are saved).
dsmoe_status cpu_attention_backward(cpu_ctx *ctx, cpu_queue *q, void *dqkv_, void *workspace, const void *dout_,
                                    const void *qkv_, const void *out, const void *saved,
                                    const dsmoe_attention_shape *shape) {
    CPU_BEGIN(ctx, q, "attention_backward");
    CPU_TRY(check_attention(ctx, "attention_backward", shape));
    const int B = shape->B, T = shape->T, M = shape->M, NH = shape->NH;
    if (B == 0 || T == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dqkv_ && workspace && dout_ && qkv_ && saved,
                "cpu: attention_backward: NULL dqkv, workspace, dout, qkv or saved");
    float *dqkv = dqkv_, *scratch = workspace;
    const float *dout = dout_, *qkv = qkv_, *att = saved;
    int hs = M / NH, ld = 3 * M, units = B * NH;
    float scale = 1.0f / sqrtf((float)hs);
    cpu_blas_single_threaded();
#pragma omp parallel for num_threads(ctx->threads) schedule(dynamic, 1) if (units > 1 && (long)T * T * hs >= 4096)
    for (int u = 0; u < units; u++) {
        int h = u % NH, b = u / NH;
        size_t head = (size_t)b * T * ld + (size_t)h * hs;
        const float *q = qkv + head, *k = q + M, *v = q + 2 * (size_t)M;
        float *dq = dqkv + head, *dk = dq + M, *dv = dq + 2 * (size_t)M;
        const float *a = att + (size_t)u * T * T, *g = dout + (size_t)b * T * M + (size_t)h * hs;
        float *d = scratch + (size_t)u * T * T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.0f, g, M, v, ld, 0.0f, d, T);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, a, T, g, M, 1.0f, dv, ld);
        for (int t = 0; t < T; t++) {
            const float *ar = a + (size_t)t * T;
            float *dr = d + (size_t)t * T;
            double c = 0.0;
#pragma omp simd reduction(+ : c)
            for (int t2 = 0; t2 <= t; t2++)
                c += (double)ar[t2] * dr[t2];
            for (int t2 = 0; t2 <= t; t2++)
                dr[t2] = ar[t2] * (dr[t2] - (float)c);
            for (int t2 = t + 1; t2 < T; t2++)
                dr[t2] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, scale, d, T, k, ld, 1.0f, dq, ld);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, scale, d, T, q, ld, 1.0f, dk, ld);
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Softmax cross-entropy over V classes

// loss = log(sum exp(z - max)) - (z[target] - max): exact even where probs[target] underflows to 0.
dsmoe_status cpu_crossentropy_forward(cpu_ctx *ctx, cpu_queue *q, float *losses, float *probs, const void *logits_,
                                      dsmoe_dtype dt, const int32_t *targets, int S, int V) {
    CPU_BEGIN(ctx, q, "crossentropy_forward");
    CPU_DTYPE(ctx, "crossentropy_forward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && V > 0, "cpu: crossentropy_forward: S=%d V=%d: expected S >= 0 and V > 0", S, V);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, losses && probs && logits_ && targets,
                "cpu: crossentropy_forward: NULL losses, probs, logits or targets");
    CPU_TRY(check_tokens(ctx, "crossentropy_forward", "targets", targets, S, V));
    const float *logits = logits_;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * V >= CPU_PAR_MIN / 4)
    for (int s = 0; s < S; s++) {
        const float *z = logits + (size_t)s * V;
        float *p = probs + (size_t)s * V;
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
        losses[s] = (float)(log(sum) - ((double)z[targets[s]] - maxv));
    }
    return DSMOE_OK;
}

dsmoe_status cpu_crossentropy_backward(cpu_ctx *ctx, cpu_queue *q, void *dlogits_, dsmoe_dtype dt, const float *probs,
                                       const int32_t *targets, float dloss, int S, int V) {
    CPU_BEGIN(ctx, q, "crossentropy_backward");
    CPU_DTYPE(ctx, "crossentropy_backward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && V > 0, "cpu: crossentropy_backward: S=%d V=%d: expected S >= 0 and V > 0", S, V);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dlogits_ && probs && targets, "cpu: crossentropy_backward: NULL dlogits, probs or targets");
    CPU_TRY(check_tokens(ctx, "crossentropy_backward", "targets", targets, S, V));
    float *dlogits = dlogits_;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * V >= CPU_PAR_MIN)
    for (int s = 0; s < S; s++) {
        float *d = dlogits + (size_t)s * V;
        const float *p = probs + (size_t)s * V;
        for (int i = 0; i < V; i++)
            d[i] += dloss * p[i];
        d[targets[s]] -= dloss;
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Residual-MoE mix: coef (S, 2) = softmax(coef_logits); out = moe * coef[:,0] + mlp * coef[:,1]

dsmoe_status cpu_residual_mix_forward(cpu_ctx *ctx, cpu_queue *q, void *out_, float *coef, const void *moe_,
                                      const void *mlp_, dsmoe_dtype dt, const float *coef_logits, int S, int M) {
    CPU_BEGIN(ctx, q, "residual_mix_forward");
    CPU_DTYPE(ctx, "residual_mix_forward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && M >= 0, "cpu: residual_mix_forward: S=%d M=%d: expected >= 0", S, M);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out_ && coef && moe_ && mlp_ && coef_logits,
                "cpu: residual_mix_forward: NULL out, coef, moe, mlp or coef_logits");
    float *out = out_;
    const float *moe = moe_, *mlp = mlp_;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * M >= CPU_PAR_MIN)
    for (int s = 0; s < S; s++) {
        float l0 = coef_logits[2 * s], l1 = coef_logits[2 * s + 1];
        float mx = l0 > l1 ? l0 : l1;
        float e0 = expf(l0 - mx), e1 = expf(l1 - mx);
        float c0 = e0 / (e0 + e1), c1 = e1 / (e0 + e1);
        coef[2 * s] = c0;
        coef[2 * s + 1] = c1;
        const float *a = moe + (size_t)s * M, *b = mlp + (size_t)s * M;
        float *o = out + (size_t)s * M;
        for (int j = 0; j < M; j++)
            o[j] = a[j] * c0 + b[j] * c1;
    }
    return DSMOE_OK;
}

// d coef_k = dout . input_k; through the 2-way softmax, dlogit0 = c0 c1 (dcoef0 - dcoef1) = -dlogit1.
dsmoe_status cpu_residual_mix_backward(cpu_ctx *ctx, cpu_queue *q, void *dmoe_, void *dmlp_, float *dcoef_logits,
                                       const void *dout_, const void *moe_, const void *mlp_, dsmoe_dtype dt,
                                       const float *coef, int S, int M) {
    CPU_BEGIN(ctx, q, "residual_mix_backward");
    CPU_DTYPE(ctx, "residual_mix_backward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && M >= 0, "cpu: residual_mix_backward: S=%d M=%d: expected >= 0", S, M);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dmoe_ && dmlp_ && dcoef_logits && dout_ && moe_ && mlp_ && coef,
                "cpu: residual_mix_backward: NULL argument (dmoe, dmlp, dcoef_logits, dout, moe, mlp or coef)");
    float *dmoe = dmoe_, *dmlp = dmlp_;
    const float *dout = dout_, *moe = moe_, *mlp = mlp_;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * M >= CPU_PAR_MIN)
    for (int s = 0; s < S; s++) {
        float c0 = coef[2 * s], c1 = coef[2 * s + 1];
        const float *g = dout + (size_t)s * M, *a = moe + (size_t)s * M, *b = mlp + (size_t)s * M;
        float *da = dmoe + (size_t)s * M, *db = dmlp + (size_t)s * M;
        double dc0 = 0.0, dc1 = 0.0;
        for (int j = 0; j < M; j++) {
            dc0 += (double)g[j] * a[j];
            dc1 += (double)g[j] * b[j];
            da[j] += g[j] * c0;
            db[j] += g[j] * c1;
        }
        float dl0 = (float)((double)c0 * c1 * (dc0 - dc1));
        dcoef_logits[2 * s] += dl0;
        dcoef_logits[2 * s + 1] -= dl0;
    }
    return DSMOE_OK;
}
