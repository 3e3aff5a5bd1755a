// plugins/cpu/cpu_infer.c: the inference members of the cpu plugin: the per-layer KV cache, attention
// of a query block over it, and token sampling.
// defines: cpu_kv_append, cpu_attention_cached, cpu_sample
//
// Contracts are include/dsmoe/kernel_plugin.h's ("inference"). Layout: k_cache, v_cache (B, NH, T_max,
// D), D = M / NH, so that head (b, h)'s keys are one (T_max, D) row-major block. Cached attention runs
// the math of attention_forward (cpu_ops.c) on that block: the same BLAS calls with the scale as alpha,
// the same masked softmax, so a prefill from position 0 gives what attention_forward gives. Positions
// (pos) are device data: one outside its bound is the sticky error. Sampling radix-sorts a row's logits
// (probability order is logit order): O(V) a row.
//
// bfloat16 caches, activations and logits are read in place: a decode step touches positions
// [0, pos + T_new) of a cache that holds T_max, and a whole-cache float32 copy per call made every step
// cost O(T_max) (at a 1024-token context a bf16 decode ran slower than float32). kv_append copies bf16
// rows as they are; attention_cached widens each (b, h)'s q rows and its first pos + T_new keys and
// values into the thread's float32 scratch (or, for a decode step, in registers) and runs the float32
// arithmetic on them, then rounds the (T_new, D) output once: bit for bit the float32 op on the widened
// tensors, rounded (tests/plugins/kernel/test_cpu_bf16_rows.c).
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h> // cblas_sgemm (single-threaded, see cpu_blas_single_threaded)

#include "dsmoe/rng.h"    // dsmoe_rng_uniform
#include "cpu_bf16.h"     // cpu_bf16_to_f32, cpu_f32_to_bf16
#include "cpu_internal.h" // CPU_BEGIN, CPU_ACT_DTYPE, CPU_REQUIRE, cpu_sticky, cpu_stage_reserve, ...
#include "cpu_math.h"     // cpu_dot_lanes_as, cpu_widen

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

// Token t of sequence b: its key and value rows of every head go to position pos[b] + t. A copy, so
// either dtype moves as bytes.
dsmoe_status cpu_kv_append(cpu_ctx *ctx, cpu_queue *q, void *k_cache, void *v_cache, const void *qkv_, dsmoe_dtype dt,
                           const int32_t *pos, int B, int T_new, int M, int NH, int T_max) {
    CPU_BEGIN(ctx, q, "kv_append");
    CPU_ACT_DTYPE(ctx, "kv_append", "dt", dt);
    CPU_TRY(check_cache(ctx, "kv_append", B, T_new, M, NH, T_max));
    if (B == 0 || T_new == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, k_cache && v_cache && qkv_ && pos, "cpu: kv_append: NULL k_cache, v_cache, qkv or pos");
    CPU_TRY(check_pos(ctx, "kv_append", pos, B, T_new, T_max));
    const size_t es = dt == DSMOE_BFLOAT16 ? 2 : 4;
    const char *qkv = qkv_;
    char *kc = k_cache, *vc = v_cache;
    const int D = M / NH, rows = B * T_new;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * M >= CPU_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        int b = r / T_new, t = r % T_new;
        const char *k = qkv + ((size_t)r * 3 * M + M) * es, *v = k + M * es; // (M) each: the heads side by side
        for (int h = 0; h < NH; h++) {
            size_t at = (((size_t)b * NH + h) * T_max + (size_t)(pos[b] + t)) * D * es;
            memcpy(kc + at, k + (size_t)h * D * es, (size_t)D * es);
            memcpy(vc + at, v + (size_t)h * D * es, (size_t)D * es);
        }
    }
    return DSMOE_OK;
}

// One (b, h) unit of cached attention: q (T_new, D) with leading dimension ldq, the unit's first tk keys
// and values (tk, D) of a cache block in the cache's dtype, out (T_new, D) float32 with leading dimension
// ldo; first = pos[b], so query t sees keys [0, first + t]. a (T_new, tk) holds the scores, then the
// probabilities.
typedef struct cached_unit {
    const float *q;
    int ldq, T_new, tk, first, D;
    const void *k, *v; // (tk, D) of k_cache and v_cache, bfloat16 when bf
    int bf;
    float scale;
    float *a, *out;
    int ldo;
} cached_unit;

// A few query rows (T_new <= small_rows: decode): scores as dot products (cpu_dot_lanes_as) and out as
// a running sum over the keys in order, reading each key and value row once, straight from the cache,
// where BLAS would pack them all first (at 1 to 8 rows the packing cost more than the product) and a
// bfloat16 cache would need a float32 copy. One body for both dtypes (bf is a constant in each
// instance): a bf16 value is widened exactly in a register and the same float32 sums follow, so a bf16
// result is the float32 one on the widened cache, rounded.
static inline __attribute__((always_inline)) void attend_few_as(const cached_unit *U, int bf) {
    const int T_new = U->T_new, tk = U->tk, D = U->D;
    const size_t es = bf ? 2 : 4;
    for (int j = 0; j < tk; j++) {
        const void *kj = (const char *)U->k + (size_t)j * D * es;
        for (int t = 0; t < T_new; t++)
            U->a[(size_t)t * tk + j] = U->scale * cpu_dot_lanes_as(U->q + (size_t)t * U->ldq, kj, D, bf);
    }
    cpu_causal_softmax_rows(U->a, T_new, tk, U->first);
    for (int t = 0; t < T_new; t++) {
        const float *at = U->a + (size_t)t * tk;
        float *o = U->out + (size_t)t * U->ldo;
        memset(o, 0, (size_t)D * sizeof *o);
        for (int j = 0; j <= U->first + t; j++) { // keys past the query's position have probability 0
            const void *vj = (const char *)U->v + (size_t)j * D * es;
            const float w = at[j];
#pragma omp simd
            for (int d = 0; d < D; d++)
                o[d] += w * cpu_widen(vj, (size_t)d, bf);
        }
    }
}

static void attend_few(const cached_unit *U) {
    if (U->bf)
        attend_few_as(U, 1);
    else
        attend_few_as(U, 0);
}

// More query rows (a prefill): the two products as BLAS GEMMs over the whole (tk, D) blocks, as
// attention_forward does; bfloat16 blocks are widened whole into kf and vf first.
static void attend_many(const cached_unit *U, float *kf, float *vf) {
    const int T_new = U->T_new, tk = U->tk, D = U->D;
    const float *k = U->k, *v = U->v;
    if (U->bf) {
        cpu_bf16_to_f32(kf, U->k, (size_t)tk * D);
        cpu_bf16_to_f32(vf, U->v, (size_t)tk * D);
        k = kf, v = vf;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T_new, tk, D, U->scale, U->q, U->ldq, k, D, 0.0f, U->a, tk);
    cpu_causal_softmax_rows(U->a, T_new, tk, U->first);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T_new, D, tk, 1.0f, U->a, tk, v, D, 0.0f, U->out, U->ldo);
}

// Per (b, h): scores (T_new, Tk) = scale q k[0:Tk]^T with Tk = pos[b] + T_new, query t masked after
// position pos[b] + t, softmax, out = a v[0:Tk]. Units run in parallel; each thread's scratch (the
// context's arena) holds a (T_new, Tk_max) score block and, in bfloat16, float32 copies of the unit's q
// and out (T_new, D each) and, for attend_many, of its keys and values (Tk_max, D each).
dsmoe_status cpu_attention_cached(cpu_ctx *ctx, cpu_queue *q, void *out_, const void *qkv_, const void *k_cache,
                                  const void *v_cache, dsmoe_dtype dt, const int32_t *pos, int B, int T_new, int M,
                                  int NH, int T_max) {
    CPU_BEGIN(ctx, q, "attention_cached");
    CPU_ACT_DTYPE(ctx, "attention_cached", "dt", dt);
    CPU_TRY(check_cache(ctx, "attention_cached", B, T_new, M, NH, T_max));
    if (B == 0 || T_new == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out_ && qkv_ && k_cache && v_cache && pos,
                "cpu: attention_cached: NULL out, qkv, k_cache, v_cache or pos");
    CPU_TRY(check_pos(ctx, "attention_cached", pos, B, T_new, T_max));
    const int bf = dt == DSMOE_BFLOAT16, D = M / NH, ld = 3 * M, units = B * NH, few = T_new <= ctx->small_rows;
    const size_t es = bf ? 2 : 4;
    int tk_max = 0;
    for (int b = 0; b < B; b++)
        tk_max = pos[b] + T_new > tk_max ? pos[b] + T_new : tk_max;
    const size_t per_scores = (size_t)T_new * tk_max, per_rows = (size_t)T_new * D;
    const size_t per_kv = few ? 0 : (size_t)tk_max * D;
    const size_t per = per_scores + (bf ? 2 * per_rows + 2 * per_kv : 0);
    float *scratch; // the context's arena: a fresh block per call page-faulted it in on every decode step
    CPU_TRY(cpu_stage_reserve(ctx, "attention_cached", per * ctx->threads * sizeof *scratch, (void **)&scratch));
    float scale = 1.0f / sqrtf((float)D);
    if (!few)
        cpu_blas_single_threaded();
    int par = units > 1 && (long)T_new * tk_max * D >= 4096;
#pragma omp parallel for num_threads(ctx->threads) schedule(dynamic, 1) if (par)
    for (int u = 0; u < units; u++) {
        int h = u % NH, b = u / NH;
        float *mine = scratch + per * omp_get_thread_num();
        size_t q_at = (size_t)b * T_new * ld + (size_t)h * D, o_at = (size_t)b * T_new * M + (size_t)h * D;
        size_t kv_at = (size_t)u * T_max * D * es; // bytes: the unit's (T_max, D) block of each cache
        cached_unit U = {.T_new = T_new, .tk = pos[b] + T_new, .first = pos[b], .D = D,
                         .k = (const char *)k_cache + kv_at, .v = (const char *)v_cache + kv_at, .bf = bf,
                         .scale = scale, .a = mine};
        float *kv = mine + per_scores;
        if (!bf) {
            U.q = (const float *)qkv_ + q_at, U.ldq = ld, U.out = (float *)out_ + o_at, U.ldo = M;
        } else { // q and out as float32 (T_new, D) blocks of the scratch
            float *qf = kv, *of = qf + per_rows;
            kv = of + per_rows;
            for (int t = 0; t < T_new; t++)
                cpu_bf16_to_f32(qf + (size_t)t * D, (const uint16_t *)qkv_ + q_at + (size_t)t * ld, (size_t)D);
            U.q = qf, U.ldq = D, U.out = of, U.ldo = D;
        }
        if (few)
            attend_few(&U);
        else
            attend_many(&U, kv, kv + per_kv);
        if (bf)
            for (int t = 0; t < T_new; t++)
                cpu_f32_to_bf16((uint16_t *)out_ + o_at + (size_t)t * M, U.out + (size_t)t * D, (size_t)D);
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Sampling
//
// A row's candidates in probability order are its logits in descending order, equal ones by lower id
// (NaN counts as -Inf, -0 equals +0). Each is a 64-bit value: a 32-bit key (larger logit = smaller
// key) above its id, so that ascending values are the order, ties by lower id. All V are ordered by a
// stable LSD radix sort on the keys (fed in id order): O(V) a row; a top_k of at most V / 16 keeps the k
// smallest in a heap instead. A comparison sort (qsort) of a row of 32000 logits took 3.6 ms on one
// core: at batch 64, 8 times the rest of a small model's decode step (docs/performance.md, Decode).

// Logit i of a float32 or bfloat16 row, NaN as -Inf.
static inline __attribute__((always_inline)) float logit_at(const void *row, int bf, int i) {
    float z = cpu_widen(row, (size_t)i, bf);
    return isnan(z) ? -INFINITY : z;
}

// Ascending keys are descending logits; -0 and +0 get one key.
static inline uint32_t descending_key(float z) {
    if (z == 0.0f)
        z = 0.0f;
    uint32_t b;
    memcpy(&b, &z, sizeof b);
    uint32_t ascending = b & 0x80000000u ? ~b : b | 0x80000000u;
    return ~ascending;
}

// Restores the max-heap h (n) below position i.
static void sift_down(uint64_t *h, int i, int n) {
    uint64_t v = h[i];
    for (;;) {
        int j = 2 * i + 1;
        if (j >= n)
            break;
        if (j + 1 < n && h[j + 1] > h[j])
            j++;
        if (h[j] <= v)
            break;
        h[i] = h[j];
        i = j;
    }
    h[i] = v;
}

// c (V): key << 32 | id, sorted by key in place, stably; tmp (V) scratch. A pass over a byte that every
// key shares (the sign and exponent byte of logits of one magnitude) moves nothing and is skipped.
static void radix_sort_keys(uint64_t *c, uint64_t *tmp, int V) {
    uint32_t count[4][256];
    memset(count, 0, sizeof count);
    for (int i = 0; i < V; i++)
        for (int d = 0; d < 4; d++)
            count[d][(c[i] >> (32 + 8 * d)) & 255]++;
    uint64_t *src = c, *dst = tmp;
    for (int d = 0; d < 4; d++) {
        uint32_t at[256], sum = 0;
        int shared = 0;
        for (int b = 0; b < 256; b++) {
            shared |= count[d][b] == (uint32_t)V;
            at[b] = sum;
            sum += count[d][b];
        }
        if (shared)
            continue;
        for (int i = 0; i < V; i++)
            dst[at[(src[i] >> (32 + 8 * d)) & 255]++] = src[i];
        uint64_t *t = src;
        src = dst, dst = t;
    }
    if (src != c)
        memcpy(c, src, (size_t)V * sizeof *c);
}

// Candidate i of a row: its key above its id.
static inline __attribute__((always_inline)) uint64_t candidate(const void *row, int bf, int i) {
    return (uint64_t)descending_key(logit_at(row, bf, i)) << 32 | (uint32_t)i;
}

// out (n) = candidates i0 .. i0 + n of the row; bf a constant at each call, so that the loop vectorises.
static inline __attribute__((always_inline)) void candidates_as(uint64_t *out, const void *row, int i0, int n,
                                                                int bf) {
    for (int i = 0; i < n; i++)
        out[i] = candidate(row, bf, i0 + i);
}

static void candidates(uint64_t *out, const void *row, int bf, int i0, int n) {
    if (bf)
        candidates_as(out, row, i0, n, 1);
    else
        candidates_as(out, row, i0, n, 0);
}

#define SAMPLE_BLOCK 1024 // candidates made at a time for the heap (8 KiB: stays in L1)

// c (k) = the k smallest candidates of the row's V, ascending (a top_k much smaller than V: one compare
// per candidate against the largest kept, instead of sorting all V). They are made a block at a time
// into block (SAMPLE_BLOCK): writing all V first and reading them back cost more than the compares.
// The values are unique (the id is in the low bits), so these are exactly the first k of a full sort.
static void select_smallest(const void *row, int bf, int V, int k, uint64_t *c, uint64_t *block) {
    candidates(c, row, bf, 0, k);
    for (int i = k / 2 - 1; i >= 0; i--) // a max-heap of the smallest seen so far
        sift_down(c, i, k);
    for (int i0 = k; i0 < V; i0 += SAMPLE_BLOCK) {
        int n = V - i0 < SAMPLE_BLOCK ? V - i0 : SAMPLE_BLOCK;
        candidates(block, row, bf, i0, n);
        for (int i = 0; i < n; i++)
            if (block[i] < c[0]) {
                c[0] = block[i];
                sift_down(c, 0, k);
            }
    }
    for (int n = k - 1; n > 0; n--) { // heapsort: the largest to the end
        uint64_t t = c[0];
        c[0] = c[n], c[n] = t;
        sift_down(c, 0, n);
    }
}

// Greedy: the first maximum.
static int32_t argmax_row(const void *row, int bf, int V) {
    int32_t best = 0;
    float zbest = cpu_widen(row, 0, bf);
    for (int i = 1; i < V; i++) {
        float z = cpu_widen(row, (size_t)i, bf);
        if (z > zbest)
            best = i, zbest = z;
    }
    return best;
}

// One row by inverse CDF over the sorted candidates c (V): weights w_i = exp((z_i - z_max) / T) in
// double, cut to the first top_k, then to the shortest prefix whose weight reaches top_p of the total;
// the token is the first whose running sum exceeds u * (kept total).
static int32_t sample_row(const void *row, int bf, int V, const dsmoe_sampling_params *p, float u, uint64_t *c,
                          uint64_t *tmp, double *w) {
    int k = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    if (k <= V / 16) {
        select_smallest(row, bf, V, k, c, tmp);
    } else {
        candidates(c, row, bf, 0, V);
        radix_sort_keys(c, tmp, V);
    }
    double zmax = logit_at(row, bf, (int)(uint32_t)c[0]), T = p->temperature, total = 0.0;
    for (int i = 0; i < k; i++)
        total += w[i] = exp(((double)logit_at(row, bf, (int)(uint32_t)c[i]) - zmax) / T);
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
            return (int32_t)(uint32_t)c[i];
    }
    return (int32_t)(uint32_t)c[k - 1]; // rounding left target at the total
}

// bfloat16 logits are read in place (widened one at a time), so a bf16 row samples as the float32 op
// on its widened values.
dsmoe_status cpu_sample(cpu_ctx *ctx, cpu_queue *q, int32_t *tokens, const void *logits, dsmoe_dtype dt, int rows,
                        int V, const dsmoe_sampling_params *p, const uint64_t *counters) {
    CPU_BEGIN(ctx, q, "sample");
    CPU_ACT_DTYPE(ctx, "sample", "dt", dt);
    CPU_REQUIRE(ctx, p, "cpu: sample: NULL sampling params");
    CPU_REQUIRE(ctx, rows >= 0 && V > 0, "cpu: sample: rows=%d V=%d: expected rows >= 0 and V > 0", rows, V);
    CPU_REQUIRE(ctx, p->temperature >= 0.0f && isfinite(p->temperature),
                "cpu: sample: temperature=%g: expected >= 0 (0 = greedy)", (double)p->temperature);
    CPU_REQUIRE(ctx, p->top_k >= 0, "cpu: sample: top_k=%d: expected >= 0 (0 = all)", p->top_k);
    CPU_REQUIRE(ctx, p->top_p > 0.0f && p->top_p <= 1.0f, "cpu: sample: top_p=%g: expected in (0, 1]",
                (double)p->top_p);
    if (rows == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, tokens && logits, "cpu: sample: NULL tokens or logits");
    const int bf = dt == DSMOE_BFLOAT16;
    const size_t row_bytes = (size_t)V * (bf ? 2 : 4);
    if (p->temperature == 0.0f) {
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * V >= CPU_PAR_MIN)
        for (int r = 0; r < rows; r++)
            tokens[r] = argmax_row((const char *)logits + r * row_bytes, bf, V);
        return DSMOE_OK;
    }
    CPU_REQUIRE(ctx, counters, "cpu: sample: NULL counters with temperature %g", (double)p->temperature);
    int nt = rows < ctx->threads ? rows : ctx->threads;
    size_t per = (size_t)V * (2 * sizeof(uint64_t) + sizeof(double));
    char *scratch;
    CPU_TRY(cpu_stage_reserve(ctx, "sample", per * nt, (void **)&scratch));
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int r = 0; r < rows; r++) {
        uint64_t *c = (uint64_t *)(scratch + per * omp_get_thread_num()); // (V)
        uint64_t *tmp = c + V;                                           // (V)
        double *w = (double *)(tmp + V);                                 // (V)
        float u = dsmoe_rng_uniform(p->seed, counters[r]);
        tokens[r] = sample_row((const char *)logits + r * row_bytes, bf, V, p, u, c, tmp, w);
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}
