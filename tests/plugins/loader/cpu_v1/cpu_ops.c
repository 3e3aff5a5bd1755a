// plugins/cpu/cpu_ops.c: the GPT layer ops of the cpu plugin: embedding, layer norm, GELU, causal
// attention, softmax cross-entropy and the residual-MoE mix, each forward beside its backward.
// defines: cpu_embedding_*, cpu_layernorm_*, cpu_gelu_*, cpu_attention_*, cpu_crossentropy_*,
//          cpu_residual_mix_*
//
// Contracts are the comments in include/dsmoe/kernel_plugin.h; karpathy/llm.c's train_gpt2.c is the
// model for the math. Invariants: forward outputs are assigned, backward outputs accumulate (+=);
// tensors are row-major and contiguous; every output element is written by one thread, and sums over
// rows run in row order inside the thread that owns the column (threading rules in cpu_ops.h).
// Per-row statistics (mean, variance, softmax sums) are accumulated in double: they cost little next
// to the GEMMs and keep float rounding out of the finite-difference tests. `omp simd` reductions have
// a lane count fixed at compile time, so their order, and results, do not depend on the thread.
#include <math.h>
#include <omp.h>
#include <string.h>

#include <cblas.h> // cblas_sgemm, for attention (called single-threaded, see cpu_blas_single_threaded)

#include "cpu_ops.h" // CPU_REQUIRE, CPU_PAR_MIN, cpu_blas_single_threaded, the declarations of this file

// Reductions over rows split the columns into chunks of this many floats; each chunk is one thread's.
#define COL_CHUNK 64

// exp(x) for float, vectorizable (glibc's expf is a call the compiler cannot vectorize; it made GELU
// and the softmaxes 5-10x slower). Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial
// for exp(r), 2^n built in the exponent bits; within 2 ulp of expf. x is clamped to [-87, 88], so
// exp of very negative x gives about 1.6e-38 rather than 0: a softmax entry that small is 0 in any
// sum with its row maximum (which is 1).
static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f; // ln2 split in two for an exact n*ln2
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

// ---------------------------------------------------------------------------------------------------
// Embedding: out (B*T, M) = wte[tokens] + wpe[t]

dsmoe_status cpu_embedding_forward(dsmoe_kernel_ctx *ctx, float *out, const int32_t *tokens, const float *wte,
                                   const float *wpe, int B, int T, int M) {
    CPU_REQUIRE(ctx, B >= 0 && T >= 0 && M >= 0, "cpu: embedding_forward: B=%d T=%d M=%d: expected >= 0", B, T, M);
    int rows = B * T;
    if ((long)rows * M == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && tokens && wte && wpe, "cpu: embedding_forward: NULL out, tokens, wte or wpe");
    // V is not known here; a negative token is still certainly wrong.
    for (int r = 0; r < rows; r++)
        CPU_REQUIRE(ctx, tokens[r] >= 0, "cpu: embedding_forward: tokens[%d]=%d: expected >= 0", r, tokens[r]);
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * M >= CPU_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        const float *e = wte + (size_t)tokens[r] * M, *p = wpe + (size_t)(r % T) * M;
        float *o = out + (size_t)r * M;
        for (int j = 0; j < M; j++)
            o[j] = e[j] + p[j];
    }
    return DSMOE_OK;
}

// dwte rows are scattered to by every token that names them, so dwte is split by columns: the thread
// owning a column chunk walks all tokens in order. dwpe (T, M): each position owned by one thread.
dsmoe_status cpu_embedding_backward(dsmoe_kernel_ctx *ctx, float *dwte, float *dwpe, const float *dout,
                                    const int32_t *tokens, int B, int T, int M, int V) {
    CPU_REQUIRE(ctx, B >= 0 && T >= 0 && M >= 0 && V > 0, "cpu: embedding_backward: B=%d T=%d M=%d V=%d: "
                "expected B, T, M >= 0 and V > 0", B, T, M, V);
    int rows = B * T;
    if ((long)rows * M == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dwte && dwpe && dout && tokens, "cpu: embedding_backward: NULL dwte, dwpe, dout or tokens");
    for (int r = 0; r < rows; r++)
        CPU_REQUIRE(ctx, tokens[r] >= 0 && tokens[r] < V, "cpu: embedding_backward: tokens[%d]=%d: expected in [0, %d)",
                    r, tokens[r], V);
    int chunks = (M + COL_CHUNK - 1) / COL_CHUNK;
    int par = (long)rows * M >= CPU_PAR_MIN;
#pragma omp parallel num_threads(ctx->threads) if (par)
    {
#pragma omp for schedule(static) nowait
        for (int ch = 0; ch < chunks; ch++) {
            int j0 = ch * COL_CHUNK, w = M - j0 < COL_CHUNK ? M - j0 : COL_CHUNK;
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

dsmoe_status cpu_layernorm_forward(dsmoe_kernel_ctx *ctx, float *out, float *mean, float *rstd, const float *in,
                                   const float *weight, const float *bias, int S, int M, float eps) {
    CPU_REQUIRE(ctx, S >= 0 && M > 0, "cpu: layernorm_forward: S=%d M=%d: expected S >= 0 and M > 0", S, M);
    CPU_REQUIRE(ctx, eps >= 0.0f, "cpu: layernorm_forward: eps=%g: expected >= 0", (double)eps);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && in && weight && bias, "cpu: layernorm_forward: NULL out, in, weight or bias");
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * M >= CPU_PAR_MIN)
    for (int s = 0; s < S; s++) {
        const float *x = in + (size_t)s * M;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < M; j++)
            sum += x[j];
        double mu = sum / M, var = 0.0;
#pragma omp simd reduction(+ : var)
        for (int j = 0; j < M; j++)
            var += (x[j] - mu) * (x[j] - mu);
        float m = (float)mu, r = (float)(1.0 / sqrt(var / M + eps));
        float *o = out + (size_t)s * M;
        for (int j = 0; j < M; j++)
            o[j] = (x[j] - m) * r * weight[j] + bias[j];
        if (mean)
            mean[s] = m;
        if (rstd)
            rstd[s] = r;
    }
    return DSMOE_OK;
}

// din needs two sums per row (row-parallel pass); dweight and dbias need sums over rows
// (column-parallel pass, recomputing the normalized input instead of storing it).
dsmoe_status cpu_layernorm_backward(dsmoe_kernel_ctx *ctx, float *din, float *dweight, float *dbias,
                                    const float *dout, const float *in, const float *weight, const float *mean,
                                    const float *rstd, int S, int M) {
    CPU_REQUIRE(ctx, S >= 0 && M > 0, "cpu: layernorm_backward: S=%d M=%d: expected S >= 0 and M > 0", S, M);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, din && dweight && dbias && dout && in && weight && mean && rstd,
                "cpu: layernorm_backward: NULL argument (din, dweight, dbias, dout, in, weight, mean or rstd)");
    int par = (long)S * M >= CPU_PAR_MIN;
    int chunks = (M + COL_CHUNK - 1) / COL_CHUNK;
#pragma omp parallel num_threads(ctx->threads) if (par)
    {
#pragma omp for schedule(static) nowait
        for (int s = 0; s < S; s++) {
            const float *x = in + (size_t)s * M, *g = dout + (size_t)s * M;
            float m = mean[s], r = rstd[s];
            double dnorm_sum = 0.0, dnorm_norm_sum = 0.0;
#pragma omp simd reduction(+ : dnorm_sum, dnorm_norm_sum)
            for (int j = 0; j < M; j++) {
                float dnorm = weight[j] * g[j];
                dnorm_sum += dnorm;
                dnorm_norm_sum += dnorm * ((x[j] - m) * r);
            }
            float dnorm_mean = (float)(dnorm_sum / M), dnorm_norm_mean = (float)(dnorm_norm_sum / M);
            float *d = din + (size_t)s * M;
            for (int j = 0; j < M; j++) {
                float norm = (x[j] - m) * r;
                d[j] += r * (weight[j] * g[j] - dnorm_mean - norm * dnorm_norm_mean);
            }
        }
#pragma omp for schedule(static)
        for (int ch = 0; ch < chunks; ch++) {
            int j0 = ch * COL_CHUNK, w = M - j0 < COL_CHUNK ? M - j0 : COL_CHUNK;
            float acc_w[COL_CHUNK] = {0}, acc_b[COL_CHUNK] = {0};
            for (int s = 0; s < S; s++) {
                const float *x = in + (size_t)s * M + j0, *g = dout + (size_t)s * M + j0;
                float m = mean[s], r = rstd[s];
                for (int j = 0; j < w; j++) {
                    acc_w[j] += g[j] * ((x[j] - m) * r);
                    acc_b[j] += g[j];
                }
            }
            for (int j = 0; j < w; j++) {
                dweight[j0 + j] += acc_w[j];
                dbias[j0 + j] += acc_b[j];
            }
        }
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as torch
// gelu(approximate="tanh").

#define GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)
#define GELU_CUBE 0.044715f

// tanh(u) = 1 - 2 / (1 + exp(2u)): absolute error about 1e-7 (what GELU needs; tanhf itself was 25 ns
// an element here); saturates to +-1 through exp_fast's clamp.
static inline float tanh_fast(float u) { return 1.0f - 2.0f / (1.0f + exp_fast(2.0f * u)); }

dsmoe_status cpu_gelu_forward(dsmoe_kernel_ctx *ctx, float *out, const float *in, size_t n) {
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && in, "cpu: gelu_forward: NULL %s with n=%zu", out ? "in" : "out", n);
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN / 4)
    for (size_t i = 0; i < n; i++) {
        float x = in[i];
        out[i] = 0.5f * x * (1.0f + tanh_fast(GELU_SCALE * (x + GELU_CUBE * x * x * x)));
    }
    return DSMOE_OK;
}

dsmoe_status cpu_gelu_backward(dsmoe_kernel_ctx *ctx, float *din, const float *in, const float *dout, size_t n) {
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, din && in && dout, "cpu: gelu_backward: NULL din, in or dout with n=%zu", n);
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN / 4)
    for (size_t i = 0; i < n; i++) {
        float x = in[i];
        float th = tanh_fast(GELU_SCALE * (x + GELU_CUBE * x * x * x));
        float local = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GELU_SCALE * (1.0f + 3.0f * GELU_CUBE * x * x);
        din[i] += local * dout[i];
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Causal multi-head self-attention. qkv (B*T, 3M) = per token [q | k | v]; head h uses columns
// [h*hs, (h+1)*hs) of each part, hs = M/NH. att (B, NH, T, T) holds the softmax probabilities.

static dsmoe_status check_attention(dsmoe_kernel_ctx *ctx, const char *op, int B, int T, int M, int NH) {
    CPU_REQUIRE(ctx, B >= 0 && T >= 0 && M > 0 && NH > 0, "cpu: %s: B=%d T=%d M=%d NH=%d: expected B, T >= 0 and "
                "M, NH > 0", op, B, T, M, NH);
    CPU_REQUIRE(ctx, M % NH == 0, "cpu: %s: M=%d is not a multiple of NH=%d", op, M, NH);
    return DSMOE_OK;
}

// Causal softmax of one (T, T) block in place: row t keeps columns [0, t], the rest become 0.
static void causal_softmax_rows(float *a, int T) {
    for (int t = 0; t < T; t++) {
        float *row = a + (size_t)t * T, maxv = -INFINITY;
        for (int t2 = 0; t2 <= t; t2++)
            maxv = row[t2] > maxv ? row[t2] : maxv;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int t2 = 0; t2 <= t; t2++) {
            row[t2] = exp_fast(row[t2] - maxv);
            sum += row[t2];
        }
        float inv = (float)(1.0 / sum);
        for (int t2 = 0; t2 <= t; t2++)
            row[t2] *= inv;
        for (int t2 = t + 1; t2 < T; t2++)
            row[t2] = 0.0f;
    }
}

// Work units are (b, h) pairs, each three single-threaded GEMMs on strided views of qkv: q, k and v of
// head h are (T, hs) with leading dimension 3M. The full (T, T) product is computed and the upper
// triangle masked: twice the causal work, at BLAS speed.
dsmoe_status cpu_attention_forward(dsmoe_kernel_ctx *ctx, float *out, float *att, const float *qkv, int B, int T,
                                   int M, int NH) {
    dsmoe_status st = check_attention(ctx, "attention_forward", B, T, M, NH);
    if (st != DSMOE_OK)
        return st;
    if (B == 0 || T == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && att && qkv, "cpu: attention_forward: NULL out, att or qkv");
    int hs = M / NH, ld = 3 * M, units = B * NH;
    float scale = 1.0f / sqrtf((float)hs);
    cpu_blas_single_threaded();
#pragma omp parallel for num_threads(ctx->threads) schedule(dynamic, 1) if (units > 1 && (long)T * T * hs >= 4096)
    for (int u = 0; u < units; u++) {
        int h = u % NH, b = u / NH;
        const float *q = qkv + (size_t)b * T * ld + (size_t)h * hs, *k = q + M, *v = q + 2 * (size_t)M;
        float *a = att + (size_t)u * T * T; // (T, T) block (b, h) of att
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q, ld, k, ld, 0.0f, a, T);
        causal_softmax_rows(a, T);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, a, T, v, ld, 0.0f,
                    out + (size_t)b * T * M + (size_t)h * hs, M);
    }
    return DSMOE_OK;
}

// Per (b, h): da = dout v^T; dv += a^T dout; dpre = a * (da - rowsum(a * da)) (softmax backward,
// 0 above the diagonal since a is); dq += scale dpre k; dk += scale dpre^T q. The (b, h) pair owns
// all its rows of dq, dk, dv, so pairs run in parallel; scratch block (b, h) holds da, then dpre.
dsmoe_status cpu_attention_backward(dsmoe_kernel_ctx *ctx, float *dqkv, float *scratch, const float *dout,
                                    const float *qkv, const float *att, int B, int T, int M, int NH) {
    dsmoe_status st = check_attention(ctx, "attention_backward", B, T, M, NH);
    if (st != DSMOE_OK)
        return st;
    if (B == 0 || T == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dqkv && scratch && dout && qkv && att,
                "cpu: attention_backward: NULL dqkv, scratch, dout, qkv or att");
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

static dsmoe_status check_targets(dsmoe_kernel_ctx *ctx, const char *op, const int32_t *targets, int S, int V) {
    for (int s = 0; s < S; s++)
        CPU_REQUIRE(ctx, targets[s] >= 0 && targets[s] < V, "cpu: %s: targets[%d]=%d: expected in [0, %d)", op, s,
                    targets[s], V);
    return DSMOE_OK;
}

// loss = log(sum exp(z - max)) - (z[target] - max): exact even where probs[target] underflows to 0.
dsmoe_status cpu_crossentropy_forward(dsmoe_kernel_ctx *ctx, float *losses, float *probs, const float *logits,
                                      const int32_t *targets, int S, int V) {
    CPU_REQUIRE(ctx, S >= 0 && V > 0, "cpu: crossentropy_forward: S=%d V=%d: expected S >= 0 and V > 0", S, V);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, losses && probs && logits && targets,
                "cpu: crossentropy_forward: NULL losses, probs, logits or targets");
    dsmoe_status st = check_targets(ctx, "crossentropy_forward", targets, S, V);
    if (st != DSMOE_OK)
        return st;
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
            p[i] = exp_fast(z[i] - maxv);
            sum += p[i];
        }
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < V; i++)
            p[i] *= inv;
        losses[s] = (float)(log(sum) - ((double)z[targets[s]] - maxv));
    }
    return DSMOE_OK;
}

dsmoe_status cpu_crossentropy_backward(dsmoe_kernel_ctx *ctx, float *dlogits, const float *probs,
                                       const int32_t *targets, float dloss, int S, int V) {
    CPU_REQUIRE(ctx, S >= 0 && V > 0, "cpu: crossentropy_backward: S=%d V=%d: expected S >= 0 and V > 0", S, V);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dlogits && probs && targets, "cpu: crossentropy_backward: NULL dlogits, probs or targets");
    dsmoe_status st = check_targets(ctx, "crossentropy_backward", targets, S, V);
    if (st != DSMOE_OK)
        return st;
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

dsmoe_status cpu_residual_mix_forward(dsmoe_kernel_ctx *ctx, float *out, float *coef, const float *moe,
                                      const float *mlp, const float *coef_logits, int S, int M) {
    CPU_REQUIRE(ctx, S >= 0 && M >= 0, "cpu: residual_mix_forward: S=%d M=%d: expected >= 0", S, M);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && coef && moe && mlp && coef_logits,
                "cpu: residual_mix_forward: NULL out, coef, moe, mlp or coef_logits");
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
dsmoe_status cpu_residual_mix_backward(dsmoe_kernel_ctx *ctx, float *dmoe, float *dmlp, float *dcoef_logits,
                                       const float *dout, const float *moe, const float *mlp, const float *coef,
                                       int S, int M) {
    CPU_REQUIRE(ctx, S >= 0 && M >= 0, "cpu: residual_mix_backward: S=%d M=%d: expected >= 0", S, M);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dmoe && dmlp && dcoef_logits && dout && moe && mlp && coef,
                "cpu: residual_mix_backward: NULL argument (dmoe, dmlp, dcoef_logits, dout, moe, mlp or coef)");
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
