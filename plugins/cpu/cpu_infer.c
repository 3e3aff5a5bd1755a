// plugins/cpu/cpu_infer.c: the inference members of the cpu plugin: the per-layer KV cache, attention
// of a query block over it, and token sampling.
// defines: cpu_kv_append, cpu_attention_cached, cpu_sample
//
// Contracts are include/dsmoe/kernel_plugin.h's ("inference"). Layout: k_cache, v_cache (B, NH, T_max,
// D), D = M / NH, so that head (b, h)'s keys are one (T_max, D) row-major block. Cached attention runs
// the math of attention_forward (cpu_ops.c) on that block: the same BLAS calls with the scale as alpha,
// the same masked softmax, so a prefill from position 0 gives what attention_forward gives. Positions
// (pos) are device data: one outside its bound is the sticky error. Sampling sorts a row's logits
// (probability order is logit order), so it costs O(V log V) a row: fine for a host.
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h> // cblas_sgemm (single-threaded, see cpu_blas_single_threaded)

#include "dsmoe/rng.h"    // dsmoe_rng_uniform
#include "cpu_internal.h" // CPU_BEGIN, CPU_DTYPE, CPU_REQUIRE, cpu_sticky, cpu_causal_softmax_rows

static dsmoe_status check_cache(cpu_ctx *ctx, const char *op, int B, int T_new, int M, int NH, int T_max) {
    CPU_REQUIRE(ctx, B >= 0 && T_new >= 0 && M > 0 && NH > 0 && T_max >= 0, "cpu: %s: B=%d T_new=%d M=%d NH=%d "
                "T_max=%d: expected B, T_new, T_max >= 0 and M, NH > 0", op, B, T_new, M, NH, T_max);
    CPU_REQUIRE(ctx, M % NH == 0, "cpu: %s: M=%d is not a multiple of NH=%d", op, M, NH);
    CPU_REQUIRE(ctx, T_new <= T_max, "cpu: %s: T_new=%d > T_max=%d", op, T_new, T_max);
    return DSMOE_OK;
}

// pos (B) device: each pos[b] >= 0 with pos[b] + T_new <= T_max, else the sticky error.
static dsmoe_status check_pos(cpu_ctx *ctx, const char *op, const int32_t *pos, int B, int T_new, int T_max) {
    for (int b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] > T_max - T_new)
            return cpu_sticky(ctx, DSMOE_ERR_INVALID, "cpu: %s: pos[%d]=%d with T_new=%d: expected in [0, %d] "
                              "(T_max=%d)", op, b, pos[b], T_new, T_max - T_new, T_max);
    return DSMOE_OK;
}

// Token t of sequence b: its key and value rows of every head go to position pos[b] + t.
dsmoe_status cpu_kv_append(cpu_ctx *ctx, cpu_queue *q, void *k_cache, void *v_cache, const void *qkv_, dsmoe_dtype dt,
                           const int32_t *pos, int B, int T_new, int M, int NH, int T_max) {
    CPU_BEGIN(ctx, q, "kv_append");
    CPU_DTYPE(ctx, "kv_append", "dt", dt);
    CPU_TRY(check_cache(ctx, "kv_append", B, T_new, M, NH, T_max));
    if (B == 0 || T_new == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, k_cache && v_cache && qkv_ && pos, "cpu: kv_append: NULL k_cache, v_cache, qkv or pos");
    CPU_TRY(check_pos(ctx, "kv_append", pos, B, T_new, T_max));
    const float *qkv = qkv_;
    float *kc = k_cache, *vc = v_cache;
    const int D = M / NH, rows = B * T_new;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * M >= CPU_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        int b = r / T_new, t = r % T_new;
        const float *k = qkv + (size_t)r * 3 * M + M, *v = k + M; // (M) each: the heads side by side
        for (int h = 0; h < NH; h++) {
            size_t at = (((size_t)b * NH + h) * T_max + (size_t)(pos[b] + t)) * D;
            memcpy(kc + at, k + (size_t)h * D, (size_t)D * sizeof(float));
            memcpy(vc + at, v + (size_t)h * D, (size_t)D * sizeof(float));
        }
    }
    return DSMOE_OK;
}

// Per (b, h): scores (T_new, Tk) = scale q k[0:Tk]^T with Tk = pos[b] + T_new, query t masked after
// position pos[b] + t, softmax, out = a v[0:Tk]. Each thread has one (T_new, Tk_max) score block.
dsmoe_status cpu_attention_cached(cpu_ctx *ctx, cpu_queue *q, void *out_, const void *qkv_, const void *k_cache,
                                  const void *v_cache, dsmoe_dtype dt, const int32_t *pos, int B, int T_new, int M,
                                  int NH, int T_max) {
    CPU_BEGIN(ctx, q, "attention_cached");
    CPU_DTYPE(ctx, "attention_cached", "dt", dt);
    CPU_TRY(check_cache(ctx, "attention_cached", B, T_new, M, NH, T_max));
    if (B == 0 || T_new == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out_ && qkv_ && k_cache && v_cache && pos,
                "cpu: attention_cached: NULL out, qkv, k_cache, v_cache or pos");
    CPU_TRY(check_pos(ctx, "attention_cached", pos, B, T_new, T_max));
    const float *qkv = qkv_, *kc = k_cache, *vc = v_cache;
    float *out = out_;
    const int D = M / NH, ld = 3 * M, units = B * NH;
    int tk_max = 0;
    for (int b = 0; b < B; b++)
        tk_max = pos[b] + T_new > tk_max ? pos[b] + T_new : tk_max;
    size_t per = (size_t)T_new * tk_max;
    float *scores = malloc(per * ctx->threads * sizeof *scores);
    if (!scores)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: attention_cached: no memory for %d score blocks of %zu floats",
                        ctx->threads, per);
    float scale = 1.0f / sqrtf((float)D);
    cpu_blas_single_threaded();
    int par = units > 1 && (long)T_new * tk_max * D >= 4096;
#pragma omp parallel for num_threads(ctx->threads) schedule(dynamic, 1) if (par)
    for (int u = 0; u < units; u++) {
        int h = u % NH, b = u / NH, tk = pos[b] + T_new;
        const float *qh = qkv + (size_t)b * T_new * ld + (size_t)h * D;
        const float *kh = kc + (size_t)u * T_max * D, *vh = vc + (size_t)u * T_max * D; // (T_max, D) each
        float *a = scores + per * omp_get_thread_num(); // (T_new, tk)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T_new, tk, D, scale, qh, ld, kh, D, 0.0f, a, tk);
        cpu_causal_softmax_rows(a, T_new, tk, pos[b]);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T_new, D, tk, 1.0f, a, tk, vh, D, 0.0f,
                    out + (size_t)b * T_new * M + (size_t)h * D, M);
    }
    free(scores);
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Sampling

typedef struct cand {
    float z;    // logit (NaN counts as -Inf)
    int32_t id; // token
} cand;

// Larger logit first (= larger probability), equal ones by lower id.
static int cand_cmp(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->z != y->z)
        return x->z > y->z ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

// Greedy: the first maximum.
static int32_t argmax_row(const float *z, int V) {
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (z[i] > z[best])
            best = i;
    return best;
}

// One row by inverse CDF over the sorted candidates: weights w_i = exp((z_i - z_max) / T) in double,
// cut to the first top_k, then to the shortest prefix whose weight reaches top_p of the total; the
// token is the first whose running sum exceeds u * (kept total).
static int32_t sample_row(const float *z, int V, const dsmoe_sampling_params *p, float u, cand *c, double *w) {
    for (int i = 0; i < V; i++)
        c[i] = (cand){isnan(z[i]) ? -INFINITY : z[i], i};
    qsort(c, (size_t)V, sizeof *c, cand_cmp);
    int k = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    double zmax = c[0].z, T = p->temperature, total = 0.0;
    for (int i = 0; i < k; i++)
        total += w[i] = exp(((double)c[i].z - zmax) / T);
    if (p->top_p < 1.0f) {
        double need = (double)p->top_p * total, cum = 0.0;
        int n = 0;
        while (n < k) {
            cum += w[n++];
            if (cum >= need)
                break;
        }
        k = n;
        total = cum;
    }
    double target = (double)u * total, cum = 0.0;
    for (int i = 0; i < k; i++) {
        cum += w[i];
        if (target < cum)
            return c[i].id;
    }
    return c[k - 1].id; // rounding left target at the total
}

dsmoe_status cpu_sample(cpu_ctx *ctx, cpu_queue *q, int32_t *tokens, const void *logits_, dsmoe_dtype dt, int rows,
                        int V, const dsmoe_sampling_params *p, const uint64_t *counters) {
    CPU_BEGIN(ctx, q, "sample");
    CPU_DTYPE(ctx, "sample", "dt", dt);
    CPU_REQUIRE(ctx, p, "cpu: sample: NULL sampling params");
    CPU_REQUIRE(ctx, rows >= 0 && V > 0, "cpu: sample: rows=%d V=%d: expected rows >= 0 and V > 0", rows, V);
    CPU_REQUIRE(ctx, p->temperature >= 0.0f && isfinite(p->temperature),
                "cpu: sample: temperature=%g: expected >= 0 (0 = greedy)", (double)p->temperature);
    CPU_REQUIRE(ctx, p->top_k >= 0, "cpu: sample: top_k=%d: expected >= 0 (0 = all)", p->top_k);
    CPU_REQUIRE(ctx, p->top_p > 0.0f && p->top_p <= 1.0f, "cpu: sample: top_p=%g: expected in (0, 1]",
                (double)p->top_p);
    if (rows == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, tokens && logits_, "cpu: sample: NULL tokens or logits");
    const float *logits = logits_;
    if (p->temperature == 0.0f) {
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * V >= CPU_PAR_MIN)
        for (int r = 0; r < rows; r++)
            tokens[r] = argmax_row(logits + (size_t)r * V, V);
        return DSMOE_OK;
    }
    CPU_REQUIRE(ctx, counters, "cpu: sample: NULL counters with temperature %g", (double)p->temperature);
    int nt = rows < ctx->threads ? rows : ctx->threads;
    size_t per = (size_t)V * (sizeof(cand) + sizeof(double));
    char *scratch = malloc(per * nt);
    if (!scratch)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: sample: no memory for %d rows of %d candidates", nt, V);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int r = 0; r < rows; r++) {
        char *mine = scratch + per * omp_get_thread_num();
        double *w = (double *)mine;               // (V), 8-byte aligned first
        cand *c = (cand *)(mine + V * sizeof *w); // (V)
        float u = dsmoe_rng_uniform(p->seed, counters[r]);
        tokens[r] = sample_row(logits + (size_t)r * V, V, p, u, c, w);
    }
    free(scratch);
    return DSMOE_OK;
}
