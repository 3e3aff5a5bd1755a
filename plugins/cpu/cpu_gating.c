// plugins/cpu/cpu_gating.c: MoE gating (route, assign and their backward), dispatch and combine for
// the cpu plugin. The rules (DeepSpeed's top1gating/top2gating) and their formulas are in
// docs/gating.md; the contracts are the comments on the gate_* and moe_* members of
// include/dsmoe/kernel_plugin.h.
// defines: cpu_gate_route, cpu_gate_assign, cpu_gate, cpu_gate_backward, cpu_moe_dispatch,
//          cpu_moe_dispatch_backward, cpu_moe_combine, cpu_moe_combine_backward
//
// Everything goes through the token -> (expert, slot) table: choice (S, K) and slot (S, K), slot -1 =
// dropped. Dispatch, combine and their backward cost O(S*K*M); no one-hot (S, E, C) tensor exists.
// Invariants: forward outputs are assigned; backward outputs accumulate (+=) except where marked
// (assigns). Every parallel loop gives each output row to one thread and reduces inside a row in a
// fixed order, so results do not depend on the thread count. Gating itself (route, assign) is
// O(S*E) and O(S*K): small next to dispatch and combine, and assign is a sequential prefix count.
// The table, counts and load-balancing sums are device data: an entry out of range is bad data, the
// context's sticky error (cpu_sticky), not a bad call. Gating is float32 by contract; dispatch and combine
// take float32 or bfloat16 activations. float32 results are bitwise version 1's.
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/rng.h" // dsmoe_rng_key, dsmoe_rng_gumbel, dsmoe_rng_uniform
#include "cpu_internal.h"
#include "cpu_bf16.h" // cpu_bf2f, cpu_bf16_to_f32, cpu_f32_to_bf16 (cpu_stage_rows: cpu_internal.h)
#include "cpu_math.h" // cpu_dot_lanes

// Purpose tags of the counter-RNG keys (docs/gating.md, "Random numbers"); a device plugin must use
// the same ones so that every plugin makes the same choices.
#define GATE_TAG_GUMBEL 0x47554D42ull // "GUMB": key = dsmoe_rng_key(seed, tag, level, 0)
#define GATE_TAG_RTS 0x525453ull      // "RTS":  key = dsmoe_rng_key(seed, tag, level, 0)

// Loops over fewer than this many floats run on one thread: a fork costs a few microseconds.
#define GATE_PARALLEL_MIN_WORK 32768

// ------------------------------------------------------------------------------------------------
// argument checks

static int gate_threads(const cpu_ctx *ctx) { return ctx->threads > 0 ? ctx->threads : omp_get_max_threads(); }

#define GATE_NEED(ptr, op)                                                                         \
    do {                                                                                           \
        if ((ptr) == NULL) return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: %s is NULL", op, #ptr); \
    } while (0)

static dsmoe_status check_gating_params(cpu_ctx *ctx, const char *op, const dsmoe_gating_params *p) {
    if (p == NULL) return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: gating params are NULL", op);
    if (p->S < 0) return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: S = %d tokens, expected >= 0", op, p->S);
    if (p->E < 1) return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: E = %d experts, expected >= 1", op, p->E);
    if (p->K != 1 && p->K != 2)
        return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: K = %d, expected 1 or 2 (top-1 or top-2 gating)", op, p->K);
    if (p->K > p->E)
        return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: K = %d exceeds E = %d experts", op, p->K, p->E);
    if (p->noise < DSMOE_NOISE_NONE || p->noise > DSMOE_NOISE_RSAMPLE)
        return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: noise policy %d, expected 0 (none), 1 (jitter) or 2 (rsample)",
                        op, p->noise);
    return DSMOE_OK;
}

// Checks the sizes (a bad call) and every entry of the table (bad data: sticky): choice in [0, E), slot
// in [-1, C). O(S*K), cheap next to the O(S*K*M) copy that a bad entry would send out of bounds.
static dsmoe_status check_table(cpu_ctx *ctx, const char *op, const int32_t *choice, const int32_t *slot, int S,
                                int K, int E, int C, int M) {
    if (S < 0 || E < 1 || C < 0 || M < 0)
        return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: S = %d, E = %d, C = %d, M = %d; expected S >= 0, E >= 1, C >= 0, M >= 0",
                        op, S, E, C, M);
    if ((K != 1 && K != 2) || K > E)
        return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: K = %d with E = %d, expected K in {1, 2} and K <= E", op, K, E);
    if (S > 0) {
        GATE_NEED(choice, op);
        GATE_NEED(slot, op);
    }
    for (size_t i = 0; i < (size_t)S * K; i++) {
        if (choice[i] < 0 || choice[i] >= E)
            return cpu_sticky(ctx, DSMOE_ERR_INVALID, "cpu: %s: choice[%zu] (token %zu, k %zu) = %d, expected [0, %d)", op,
                              i, i / K, i % K, choice[i], E);
        if (slot[i] < -1 || slot[i] >= C)
            return cpu_sticky(ctx, DSMOE_ERR_INVALID, "cpu: %s: slot[%zu] (token %zu, k %zu) = %d, expected [-1, %d) for C = %d",
                              op, i, i / K, i % K, slot[i], C, C);
    }
    return DSMOE_OK;
}

// src (E*C) = index s*K + k of the choice that owns each (expert, slot), -1 when unused. Also proves
// that no two choices share a slot, which the parallel writers below rely on.
static dsmoe_status slot_owners(cpu_ctx *ctx, const char *op, const int32_t *choice, const int32_t *slot,
                                int S, int K, int C, int E, int32_t **src_out) {
    size_t rows = (size_t)E * C;
    int32_t *src = malloc((rows ? rows : 1) * sizeof *src);
    if (src == NULL) return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: %s: no memory for the %zu-slot owner map", op, rows);
    for (size_t r = 0; r < rows; r++) src[r] = -1;
    for (size_t i = 0; i < (size_t)S * K; i++) {
        if (slot[i] < 0) continue;
        size_t r = (size_t)choice[i] * C + slot[i];
        if (src[r] >= 0) {
            dsmoe_status st = cpu_sticky(ctx, DSMOE_ERR_INVALID,
                                         "cpu: %s: tokens %d and %zu both hold slot %d of expert %d (a table from gate_assign never does)",
                                         op, src[r] / K, i / K, slot[i], choice[i]);
            free(src);
            return st;
        }
        src[r] = (int32_t)i;
    }
    *src_out = src;
    return DSMOE_OK;
}

// choice (S, K) from gate_route: every entry in [0, E), else the sticky error.
static dsmoe_status check_choice(cpu_ctx *ctx, const char *op, const int32_t *choice, int S, int K, int E) {
    for (size_t i = 0; i < (size_t)S * K; i++)
        if (choice[i] < 0 || choice[i] >= E)
            return cpu_sticky(ctx, DSMOE_ERR_INVALID, "cpu: %s: choice[%zu] (token %zu) = %d, expected [0, %d)", op, i,
                              i / K, choice[i], E);
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// route: softmax, top-1 / top-2 choice, counts

// Lowest index wins ties (strict >), as torch.argmax; skip = an expert to leave out, or -1.
static int argmax_row(const float *v, int E, int skip) {
    int best = -1;
    float bv = -INFINITY;
    for (int e = 0; e < E; e++) {
        if (e == skip) continue;
        if (best < 0 || v[e] > bv) best = e, bv = v[e];
    }
    return best;
}

// argmax_e (logits[e] + Gumbel(key, (token * E + e))), e != skip.
static int argmax_gumbel(const float *logits, int E, int skip, uint64_t key, uint64_t token) {
    int best = -1;
    float bv = -INFINITY;
    for (int e = 0; e < E; e++) {
        if (e == skip) continue;
        float v = logits[e] + dsmoe_rng_gumbel(key, token * (uint64_t)E + (uint64_t)e);
        if (best < 0 || v > bv) best = e, bv = v;
    }
    return best;
}

dsmoe_status cpu_gate_route(cpu_ctx *ctx, cpu_queue *q, const dsmoe_gating_params *p, const float *logits,
                            float *probs, int32_t *choice, int32_t *counts) {
    CPU_BEGIN(ctx, q, "gate_route");
    CPU_TRY(check_gating_params(ctx, "gate_route", p));
    const int S = p->S, E = p->E, K = p->K;
    GATE_NEED(counts, "gate_route");
    if (S > 0) {
        GATE_NEED(logits, "gate_route");
        GATE_NEED(probs, "gate_route");
        GATE_NEED(choice, "gate_route");
    }
    // DeepSpeed: RSample noise picks the top-1 expert; top-2 keeps argmax(probs) first and samples
    // only the second. Noise needs training (docs/gating.md, "Noise").
    const int noisy = p->noise == DSMOE_NOISE_RSAMPLE && p->training;
    const uint64_t key0 = dsmoe_rng_key(p->seed, GATE_TAG_GUMBEL, 0, 0);
    const uint64_t key1 = dsmoe_rng_key(p->seed, GATE_TAG_GUMBEL, 1, 0);
    const int nt = gate_threads(ctx);

#pragma omp parallel for num_threads(nt) schedule(static) if ((size_t)S * E >= GATE_PARALLEL_MIN_WORK)
    for (int s = 0; s < S; s++) {
        const float *l = logits + (size_t)s * E; // (E)
        float *g = probs + (size_t)s * E;        // (E)
        float mx = l[0];
        for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        float sum = 0.0f;
        for (int e = 0; e < E; e++) {
            g[e] = expf(l[e] - mx);
            sum += g[e];
        }
        for (int e = 0; e < E; e++) g[e] /= sum;
        const uint64_t token = p->token_offset + (uint64_t)s;
        int first = (K == 1 && noisy) ? argmax_gumbel(l, E, -1, key0, token) : argmax_row(g, E, -1);
        choice[(size_t)s * K] = first;
        if (K == 2)
            choice[(size_t)s * K + 1] = noisy ? argmax_gumbel(l, E, first, key1, token) : argmax_row(g, E, first);
    }

    for (int e = 0; e < E; e++) counts[e] = 0;
    for (size_t i = 0; i < (size_t)S * K; i++) counts[choice[i]]++;
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// assign: capacity, slots, weights, the load-balancing sums

typedef struct rts_entry {
    float u;   // priority dsmoe_rng_uniform(key_rts(level), token_offset + s)
    int32_t s; // token
} rts_entry;
_Static_assert(_Alignof(rts_entry) <= _Alignof(int32_t), "rts_entry follows int32_t scratch");

// Larger priority first; equal priorities (24-bit values can repeat) go to the lower token.
static int rts_cmp(const void *a, const void *b) {
    const rts_entry *x = a, *y = b;
    if (x->u != y->u) return x->u > y->u ? -1 : 1;
    return (x->s > y->s) - (x->s < y->s);
}

// Fills slot[s*K + level] for one level. base[e] = slots of expert e already used by earlier levels
// (they come first); kept tokens take slots base[e], base[e]+1, ... in token order. Without RTS an
// expert keeps its first (C - base[e]) tokens; with RTS the (C - base[e]) of largest priority.
// n[e] = tokens choosing e at this level. Scratch: bucket_off (E+1), bucket (S) rts_entry.
static void assign_level(const dsmoe_gating_params *p, int C, int level, const int32_t *choice, int32_t *slot,
                         int32_t *base, const int32_t *n, int32_t *bucket_off, rts_entry *bucket,
                         uint8_t *keep) {
    const int S = p->S, E = p->E, K = p->K;
    if (!p->random_selection) {
        for (int s = 0; s < S; s++) {
            int e = choice[(size_t)s * K + level];
            slot[(size_t)s * K + level] = base[e] < C ? base[e]++ : -1;
        }
        return;
    }
    // RTS: bucket the tokens by expert (token order inside a bucket), sort only the over-full
    // buckets by priority, and mark the winners.
    const uint64_t key = dsmoe_rng_key(p->seed, GATE_TAG_RTS, (uint64_t)level, 0);
    bucket_off[0] = 0;
    for (int e = 0; e < E; e++) bucket_off[e + 1] = bucket_off[e] + n[e];
    for (int s = 0; s < S; s++) {
        int e = choice[(size_t)s * K + level];
        bucket[bucket_off[e]++] = (rts_entry){dsmoe_rng_uniform(key, p->token_offset + (uint64_t)s), s};
    }
    for (int e = E; e > 0; e--) bucket_off[e] = bucket_off[e - 1];
    bucket_off[0] = 0;
    for (int e = 0; e < E; e++) {
        rts_entry *b = bucket + bucket_off[e];
        int room = C - base[e];
        if (n[e] > room) qsort(b, (size_t)n[e], sizeof *b, rts_cmp);
        for (int i = 0; i < n[e]; i++) keep[b[i].s] = i < room;
    }
    for (int s = 0; s < S; s++) {
        int e = choice[(size_t)s * K + level];
        slot[(size_t)s * K + level] = keep[s] ? base[e]++ : -1;
    }
}

dsmoe_status cpu_gate_assign(cpu_ctx *ctx, cpu_queue *q, const dsmoe_gating_params *p, int C, const float *probs,
                             const int32_t *choice, int32_t *slot, float *weight, int32_t *kept, double *aux_sums) {
    CPU_BEGIN(ctx, q, "gate_assign");
    CPU_TRY(check_gating_params(ctx, "gate_assign", p));
    const int S = p->S, E = p->E, K = p->K;
    if (C < 0) return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: gate_assign: capacity C = %d, expected >= 0", C);
    GATE_NEED(kept, "gate_assign");
    GATE_NEED(aux_sums, "gate_assign");
    if (S > 0) {
        GATE_NEED(probs, "gate_assign");
        GATE_NEED(choice, "gate_assign");
        GATE_NEED(slot, "gate_assign");
        GATE_NEED(weight, "gate_assign");
    }
    CPU_TRY(check_choice(ctx, "gate_assign", choice, S, K, E));

    // One scratch block: n (K, E) per-level counts, base (E), bucket_off (E+1), bucket (S), keep (S).
    size_t bytes = ((size_t)K * E + E + E + 1) * sizeof(int32_t) + (size_t)S * (sizeof(rts_entry) + 1);
    char *scratch = malloc(bytes);
    if (scratch == NULL)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: gate_assign: no memory for %zu bytes of scratch (S = %d, E = %d)", bytes, S, E);
    int32_t *n = (int32_t *)scratch;          // (K, E)
    int32_t *base = n + (size_t)K * E;        // (E)
    int32_t *bucket_off = base + E;           // (E + 1)
    rts_entry *bucket = (rts_entry *)(bucket_off + E + 1); // (S), 4-byte aligned like int32_t
    uint8_t *keep = (uint8_t *)(bucket + S); // (S)

    memset(n, 0, (size_t)K * E * sizeof *n);
    for (int s = 0; s < S; s++)
        for (int k = 0; k < K; k++) n[(size_t)k * E + choice[(size_t)s * K + k]]++;
    // Level 1 starts after all of level 0 (DeepSpeed: locations2 += sum(mask1)), so base carries over.
    memset(base, 0, (size_t)E * sizeof *base);
    for (int k = 0; k < K; k++)
        assign_level(p, C, k, choice, slot, base, n + (size_t)k * E, bucket_off, bucket, keep);
    for (int e = 0; e < E; e++) kept[e] = base[e];

    for (int s = 0; s < S; s++) {
        const float *g = probs + (size_t)s * E;
        const int32_t *c = choice + (size_t)s * K;
        const int32_t *sl = slot + (size_t)s * K;
        float *w = weight + (size_t)s * K;
        if (K == 1) {
            w[0] = sl[0] >= 0 ? g[c[0]] : 0.0f; // top-1: the gate probability itself
        } else {
            float g1 = sl[0] >= 0 ? g[c[0]] : 0.0f, g2 = sl[1] >= 0 ? g[c[1]] : 0.0f;
            float den = g1 + g2;
            if (den < FLT_EPSILON) den = FLT_EPSILON; // both dropped: 0 / eps = 0
            w[0] = g1 / den;
            w[1] = g2 / den;
        }
    }

    // The load-balancing loss's sums over this rank's tokens (the caller reduces and forms l_aux):
    // aux_sums = [P_e = sum_s probs[s,e] in double in token order (E), N_e = first choices before
    // capacity drops (E), S].
    double *psum = aux_sums, *first = aux_sums + E;
    for (int e = 0; e < E; e++) {
        psum[e] = 0.0;
        first[e] = (double)n[e];
    }
    aux_sums[2 * (size_t)E] = (double)S;
    for (int s = 0; s < S; s++)
        for (int e = 0; e < E; e++) psum[e] += probs[(size_t)s * E + e];
    free(scratch);
    return DSMOE_OK;
}

// Route + assign in one op (version 3's `gate`). The host has no launches to save, so it is the two
// ops back to back; the arguments of both are checked first, so that a bad call writes nothing.
dsmoe_status cpu_gate(cpu_ctx *ctx, cpu_queue *q, const dsmoe_gating_params *p, int C, const float *logits,
                      float *probs, int32_t *choice, int32_t *counts, int32_t *slot, float *weight, int32_t *kept,
                      double *aux_sums) {
    CPU_BEGIN(ctx, q, "gate");
    CPU_TRY(check_gating_params(ctx, "gate", p));
    if (C < 0) return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: gate: capacity C = %d, expected >= 0", C);
    GATE_NEED(counts, "gate");
    GATE_NEED(kept, "gate");
    GATE_NEED(aux_sums, "gate");
    if (p->S > 0) {
        GATE_NEED(logits, "gate");
        GATE_NEED(probs, "gate");
        GATE_NEED(choice, "gate");
        GATE_NEED(slot, "gate");
        GATE_NEED(weight, "gate");
    }
    CPU_TRY(cpu_gate_route(ctx, q, p, logits, probs, choice, counts));
    return cpu_gate_assign(ctx, q, p, C, probs, choice, slot, weight, kept, aux_sums);
}

// Backward of route + assign. With g = probs[s] and
// L = sum_k dweight[s,k] * weight[s,k] + sum_e aux_grad[e] * g_e, where
// aux_grad[e] = (float)(daux * E * N_e / S_tot^2) from the reduced aux_sums (0 when S_tot is 0):
//   dL/dg_e  = aux_grad[e]                                           (every e: the load-balancing term)
//            + [top-1] dweight[s,0]                       at e = choice[s,0] if kept
//            + [top-2] dweight[s,j] / den - (sum_i dweight[s,i] g_i) / den^2   at each kept e = choice[s,j]
//              with den = g_1 + g_2 over kept choices (only the first term when den is clamped to eps)
//   dlogits += g * (dL/dg - sum_e g_e dL/dg_e)                       (softmax backward)
dsmoe_status cpu_gate_backward(cpu_ctx *ctx, cpu_queue *q, const dsmoe_gating_params *p, float *dlogits,
                               const float *probs, const int32_t *choice, const int32_t *slot, const float *dweight,
                               const double *aux_sums, float daux) {
    CPU_BEGIN(ctx, q, "gate_backward");
    CPU_TRY(check_gating_params(ctx, "gate_backward", p));
    const int S = p->S, E = p->E, K = p->K;
    GATE_NEED(aux_sums, "gate_backward");
    if (S == 0) return DSMOE_OK;
    GATE_NEED(dlogits, "gate_backward");
    GATE_NEED(probs, "gate_backward");
    GATE_NEED(choice, "gate_backward");
    GATE_NEED(slot, "gate_backward");
    GATE_NEED(dweight, "gate_backward");
    CPU_TRY(check_choice(ctx, "gate_backward", choice, S, K, E));
    float *daux_g = malloc((size_t)E * sizeof *daux_g); // (E) dL/dg_e of the aux term, the same for every s
    if (daux_g == NULL) return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: gate_backward: no memory for %d floats", E);
    // The formula (and its evaluation order) the v1 core used on the host.
    const double St = aux_sums[2 * (size_t)E];
    for (int e = 0; e < E; e++) daux_g[e] = St > 0.0 ? (float)((double)daux * E * aux_sums[E + e] / (St * St)) : 0.0f;

    const int nt = gate_threads(ctx);
#pragma omp parallel for num_threads(nt) schedule(static) if ((size_t)S * E >= GATE_PARALLEL_MIN_WORK)
    for (int s = 0; s < S; s++) {
        const float *g = probs + (size_t)s * E;
        const int32_t *c = choice + (size_t)s * K;
        const int32_t *sl = slot + (size_t)s * K;
        const float *dw = dweight + (size_t)s * K;
        float dgk[2] = {0.0f, 0.0f}; // dL/dg at choice[s,k] from the weights (0 when dropped)
        if (K == 1) {
            if (sl[0] >= 0) dgk[0] = dw[0];
        } else {
            float g1 = sl[0] >= 0 ? g[c[0]] : 0.0f, g2 = sl[1] >= 0 ? g[c[1]] : 0.0f;
            float den = g1 + g2;
            if (den < FLT_EPSILON) { // clamped: the denominator is a constant
                dgk[0] = sl[0] >= 0 ? dw[0] / FLT_EPSILON : 0.0f;
                dgk[1] = sl[1] >= 0 ? dw[1] / FLT_EPSILON : 0.0f;
            } else {
                float t = (dw[0] * g1 + dw[1] * g2) / (den * den);
                dgk[0] = sl[0] >= 0 ? dw[0] / den - t : 0.0f;
                dgk[1] = sl[1] >= 0 ? dw[1] / den - t : 0.0f;
            }
        }
        double dot = 0.0; // sum_e g_e dL/dg_e
        for (int e = 0; e < E; e++) dot += (double)g[e] * daux_g[e];
        for (int k = 0; k < K; k++) dot += (double)g[c[k]] * dgk[k];
        float fdot = (float)dot;
        float *dl = dlogits + (size_t)s * E;
        for (int e = 0; e < E; e++) dl[e] += g[e] * (daux_g[e] - fdot);
        for (int k = 0; k < K; k++) dl[c[k]] += g[c[k]] * dgk[k];
    }
    free(daux_g);
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// dispatch and combine through the table

// Dispatch and combine take float32 or bfloat16 activations. bfloat16 runs the float32 arithmetic on
// the widened rows (exact) and rounds each result row once: the bits of the float32 op on the widened
// tensors, rounded, without converting the unused capacity rows. Each thread widens into its own rows of
// a scratch (row_scratch); both paths run the same float32 expressions (combine_row is shared; the
// others are a single add or multiply per element, whatever the operand's width).

// nt threads x per rows of M floats for a bfloat16 call, from the context's arena (cpu_stage_rows); NULL
// (nothing reserved) for float32. cpu_stage_release ends it.
static dsmoe_status row_scratch(cpu_ctx *ctx, const char *op, dsmoe_dtype dt, int nt, int per, int M, float **out) {
    return cpu_stage_rows(ctx, op, dt == DSMOE_BFLOAT16, nt, (size_t)per * M, out);
}

// The calling thread's rows of a row_scratch.
static float *my_rows(float *scratch, int per, int M) { return scratch + (size_t)omp_get_thread_num() * per * M; }

// out (M) = the kept choices' rows weighted (n of them, in k order); 0 when none.
static inline void combine_row(float *o, int n, const float *const *row, const float *w, int M) {
    if (n == 0) {
        memset(o, 0, (size_t)M * sizeof *o); // dropped everywhere: the residual path carries it
    } else if (n == 1) {
        for (int m = 0; m < M; m++) o[m] = w[0] * row[0][m];
    } else {
        for (int m = 0; m < M; m++) o[m] = w[0] * row[0][m] + w[1] * row[1][m];
    }
}

dsmoe_status cpu_moe_dispatch(cpu_ctx *ctx, cpu_queue *q, void *buf, const void *x, dsmoe_dtype dt,
                              const int32_t *choice, const int32_t *slot, int S, int K, int E, int C, int M) {
    CPU_BEGIN(ctx, q, "moe_dispatch");
    CPU_ACT_DTYPE(ctx, "moe_dispatch", "dt", dt);
    dsmoe_status st = check_table(ctx, "moe_dispatch", choice, slot, S, K, E, C, M);
    if (st != DSMOE_OK) return st;
    const size_t rows = (size_t)E * C, es = dt == DSMOE_BFLOAT16 ? 2 : 4, row_bytes = (size_t)M * es;
    if (rows == 0 || M == 0) return DSMOE_OK;
    GATE_NEED(buf, "moe_dispatch");
    if (S > 0) GATE_NEED(x, "moe_dispatch");
    int32_t *src; // (E*C) owner of each (expert, slot)
    st = slot_owners(ctx, "moe_dispatch", choice, slot, S, K, C, E, &src);
    if (st != DSMOE_OK) return st;
    const int nt = gate_threads(ctx);
    // Walk the buffer rather than the tokens: every used (E, C) row is written once; unused rows are
    // left as they are (the contract leaves them unspecified: readers stop at the kept counts). A copy
    // is exact in either dtype.
#pragma omp parallel for num_threads(nt) schedule(static) if (rows * M >= GATE_PARALLEL_MIN_WORK)
    for (size_t r = 0; r < rows; r++)
        if (src[r] >= 0) memcpy((char *)buf + r * row_bytes, (const char *)x + (size_t)(src[r] / K) * row_bytes, row_bytes);
    free(src);
    return DSMOE_OK;
}

dsmoe_status cpu_moe_dispatch_backward(cpu_ctx *ctx, cpu_queue *q, void *dx_, const void *dbuf_, dsmoe_dtype dt,
                                       const int32_t *choice, const int32_t *slot, int S, int K, int E, int C, int M) {
    CPU_BEGIN(ctx, q, "moe_dispatch_backward");
    CPU_ACT_DTYPE(ctx, "moe_dispatch_backward", "dt", dt);
    dsmoe_status st = check_table(ctx, "moe_dispatch_backward", choice, slot, S, K, E, C, M);
    if (st != DSMOE_OK) return st;
    if (S == 0 || M == 0) return DSMOE_OK;
    GATE_NEED(dx_, "moe_dispatch_backward");
    GATE_NEED(dbuf_, "moe_dispatch_backward");
    const int nt = gate_threads(ctx), bf = dt == DSMOE_BFLOAT16;
    float *scratch;
    if ((st = row_scratch(ctx, "moe_dispatch_backward", dt, nt, 1, M, &scratch)) != DSMOE_OK) return st;
    // Per token, its choices in k order: the sum order is fixed whatever the thread count.
#pragma omp parallel for num_threads(nt) schedule(static) if ((size_t)S * K * M >= GATE_PARALLEL_MIN_WORK)
    for (int s = 0; s < S; s++) {
        float *d = bf ? my_rows(scratch, 1, M) : (float *)dx_ + (size_t)s * M; // (M)
        if (bf) cpu_bf16_to_f32(d, (const uint16_t *)dx_ + (size_t)s * M, (size_t)M);
        for (int k = 0; k < K; k++) {
            int32_t sl = slot[(size_t)s * K + k];
            if (sl < 0) continue;
            size_t at = ((size_t)choice[(size_t)s * K + k] * C + sl) * M;
            if (bf) {
                const uint16_t *g = (const uint16_t *)dbuf_ + at; // (M)
                for (int m = 0; m < M; m++) d[m] += cpu_bf2f(g[m]);
            } else {
                const float *g = (const float *)dbuf_ + at; // (M)
                for (int m = 0; m < M; m++) d[m] += g[m];
            }
        }
        if (bf) cpu_f32_to_bf16((uint16_t *)dx_ + (size_t)s * M, d, (size_t)M);
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

dsmoe_status cpu_moe_combine(cpu_ctx *ctx, cpu_queue *q, void *out_, const void *y_, dsmoe_dtype dt,
                             const int32_t *choice, const int32_t *slot, const float *weight, int S, int K, int E,
                             int C, int M) {
    CPU_BEGIN(ctx, q, "moe_combine");
    CPU_ACT_DTYPE(ctx, "moe_combine", "dt", dt);
    dsmoe_status st = check_table(ctx, "moe_combine", choice, slot, S, K, E, C, M);
    if (st != DSMOE_OK) return st;
    if (S == 0 || M == 0) return DSMOE_OK;
    GATE_NEED(out_, "moe_combine");
    GATE_NEED(weight, "moe_combine");
    if ((size_t)E * C > 0) GATE_NEED(y_, "moe_combine");
    const int nt = gate_threads(ctx), bf = dt == DSMOE_BFLOAT16;
    float *scratch; // bfloat16: per thread, the output row and the two kept rows widened
    if ((st = row_scratch(ctx, "moe_combine", dt, nt, 3, M, &scratch)) != DSMOE_OK) return st;
#pragma omp parallel for num_threads(nt) schedule(static) if ((size_t)S * K * M >= GATE_PARALLEL_MIN_WORK)
    for (int s = 0; s < S; s++) {
        float *mine = bf ? my_rows(scratch, 3, M) : NULL;
        float *o = bf ? mine : (float *)out_ + (size_t)s * M; // (M)
        const float *row[2];
        float w[2];
        int n = 0; // kept choices of this token, in k order
        for (int k = 0; k < K; k++) {
            int32_t sl = slot[(size_t)s * K + k];
            if (sl < 0) continue;
            size_t at = ((size_t)choice[(size_t)s * K + k] * C + sl) * M;
            if (bf) {
                cpu_bf16_to_f32(mine + (size_t)(1 + n) * M, (const uint16_t *)y_ + at, (size_t)M);
                row[n] = mine + (size_t)(1 + n) * M;
            } else {
                row[n] = (const float *)y_ + at;
            }
            w[n++] = weight[(size_t)s * K + k];
        }
        combine_row(o, n, row, w, M);
        if (bf) cpu_f32_to_bf16((uint16_t *)out_ + (size_t)s * M, o, (size_t)M);
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

dsmoe_status cpu_moe_combine_backward(cpu_ctx *ctx, cpu_queue *q, void *dy_, float *dweight, const void *dout_,
                                      const void *y_, dsmoe_dtype dt, const int32_t *choice, const int32_t *slot,
                                      const float *weight, int S, int K, int E, int C, int M) {
    CPU_BEGIN(ctx, q, "moe_combine_backward");
    CPU_ACT_DTYPE(ctx, "moe_combine_backward", "dt", dt);
    dsmoe_status st = check_table(ctx, "moe_combine_backward", choice, slot, S, K, E, C, M);
    if (st != DSMOE_OK) return st;
    const size_t rows = (size_t)E * C;
    if (S > 0) {
        GATE_NEED(dweight, "moe_combine_backward");
        GATE_NEED(weight, "moe_combine_backward");
        if (M > 0) GATE_NEED(dout_, "moe_combine_backward");
        if (M > 0 && rows > 0) GATE_NEED(y_, "moe_combine_backward");
    }
    if (rows > 0 && M > 0) GATE_NEED(dy_, "moe_combine_backward");
    int32_t *src; // (E*C) owner of each (expert, slot)
    st = slot_owners(ctx, "moe_combine_backward", choice, slot, S, K, C, E, &src);
    if (st != DSMOE_OK) return st;
    const int nt = gate_threads(ctx), bf = dt == DSMOE_BFLOAT16;
    float *scratch; // bfloat16: per thread, two rows (a dy row; then dout's and y's rows widened)
    if ((st = row_scratch(ctx, "moe_combine_backward", dt, nt, 2, M, &scratch)) != DSMOE_OK) {
        free(src);
        return st;
    }

    // dy (E, C, M) (assigns): each used row once, the scaled dout row; unused rows are left as they are.
#pragma omp parallel for num_threads(nt) schedule(static) if (rows * M >= GATE_PARALLEL_MIN_WORK)
    for (size_t r = 0; r < (M > 0 ? rows : 0); r++) {
        if (src[r] < 0) continue;
        const float w = weight[src[r]];
        size_t from = (size_t)(src[r] / K) * M;
        if (bf) {
            float *d = my_rows(scratch, 2, M);
            const uint16_t *g = (const uint16_t *)dout_ + from; // (M)
            for (int m = 0; m < M; m++) d[m] = w * cpu_bf2f(g[m]);
            cpu_f32_to_bf16((uint16_t *)dy_ + r * M, d, (size_t)M);
        } else {
            float *d = (float *)dy_ + r * M; // (M)
            const float *g = (const float *)dout_ + from; // (M)
            for (int m = 0; m < M; m++) d[m] = w * g[m];
        }
    }
    free(src);

    // dweight (S, K) (assigns): dot(dout[s], y[choice, slot]), 0 when dropped.
#pragma omp parallel for num_threads(nt) schedule(static) if ((size_t)S * K * M >= GATE_PARALLEL_MIN_WORK)
    for (int s = 0; s < S; s++) {
        float *mine = bf ? my_rows(scratch, 2, M) : NULL;
        if (bf && M > 0) cpu_bf16_to_f32(mine, (const uint16_t *)dout_ + (size_t)s * M, (size_t)M);
        for (int k = 0; k < K; k++) {
            size_t i = (size_t)s * K + k;
            if (slot[i] < 0) {
                dweight[i] = 0.0f;
                continue;
            }
            size_t at = ((size_t)choice[i] * C + slot[i]) * M;
            if (bf) {
                cpu_bf16_to_f32(mine + M, (const uint16_t *)y_ + at, (size_t)M);
                dweight[i] = cpu_dot_lanes(mine, mine + M, M);
            } else {
                dweight[i] = cpu_dot_lanes((const float *)dout_ + (size_t)s * M, (const float *)y_ + at, M);
            }
        }
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}
