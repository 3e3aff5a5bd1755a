// kernels/gating_device.cuh: the gating code that the separate kernels (kernels/gating.cu: route, assign)
// and the fused one (kernels/gating_fused.cu: gate) both run, so that the two give the same bits: the
// per-token route body, the per-expert assign body (with its block-wide scans and the RTS radix select),
// the per-chunk partial sums of P_e, the per-token weight body, and the host-side argument checks.
// defines (static, one copy per including .cu): gate_check_params, gate_check_assign,
//          gate_route_token,
//          gate_assign_expert, gate_psum_rows, gate_psum_combine, gate_weight_token
//
// The rules are docs/gating.md; the reference is plugins/cpu/cpu_gating.c (see kernels/gating.cu for
// how the choices stay the cpu's). Block-wide functions (gate_assign_expert) must be called by every
// thread of the block with the same arguments: they hold __syncthreads. Per-token and per-chunk
// functions hold none.
#ifndef DSMOE_KERNELS_GATING_DEVICE_CUH
#define DSMOE_KERNELS_GATING_DEVICE_CUH
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "cuda_common.cuh" // dsmoe_cu_raise, dsmoe_block_sum
#include "dsmoe/rng.h"     // dsmoe_rng_key, dsmoe_rng_gumbel, dsmoe_rng_uniform (host and device)
#include "gating.h"

// Purpose tags of the RNG keys: the cpu plugin's (cpu_gating.c), so every plugin draws the same numbers.
#define GATE_TAG_GUMBEL 0x47554D42ull // "GUMB": key = dsmoe_rng_key(seed, tag, level, 0)
#define GATE_TAG_RTS 0x525453ull      // "RTS":  key = dsmoe_rng_key(seed, tag, level, 0)

// P_e is summed per chunk of PS_CHUNK tokens, each chunk as PS_ROWS interleaved partials then their sum
// in order: the chunking depends on S only, so every kernel that follows it gets the same P_e bits.
#define PS_ROWS 8
#define PS_CHUNK 512

// ------------------------------------------------------------------------------------------------
// host: argument checks and scratch (op = the member's name, for the messages)

static inline dsmoe_status gate_check_params(const dsmoe_cu_env *env, const char *op, const dsmoe_gating_params *p) {
    if (p == NULL)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: gating params are NULL", op);
    if (p->S < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: S = %d tokens, expected >= 0", op, p->S);
    if (p->E < 1)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: E = %d experts, expected >= 1", op, p->E);
    if (p->K != 1 && p->K != 2)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: K = %d, expected 1 or 2 (top-1 or top-2 gating)", op, p->K);
    if (p->K > p->E)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: K = %d exceeds E = %d experts", op, p->K, p->E);
    if (p->noise < DSMOE_NOISE_NONE || p->noise > DSMOE_NOISE_RSAMPLE)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID,
                             "%s: noise policy %d, expected 0 (none), 1 (jitter) or 2 (rsample)", op, p->noise);
    return DSMOE_OK;
}

// The checks of assign's arguments after the params (gate_assign, and gate after its own).
static inline dsmoe_status gate_check_assign(const dsmoe_cu_env *env, const char *op, int S, int C, const void *probs,
                                             const void *choice, const void *slot, const void *weight,
                                             const void *kept, const void *aux_sums) {
    if (C < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: capacity C = %d, expected >= 0", op, C);
    if (!kept || !aux_sums)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op, !kept ? "kept" : "aux_sums");
    if (S > 0 && (!probs || !choice || !slot || !weight))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op,
                             !probs ? "probs" : !choice ? "choice" : !slot ? "slot" : "weight");
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// route: softmax, top-1 / top-2 choice, counts

// Lowest index wins ties (strict >), as torch.argmax; skip = an expert to leave out, or -1.
static __device__ int argmax_row(const float *v, int E, int skip) {
    int best = -1;
    float bv = -INFINITY;
    for (int e = 0; e < E; e++) {
        if (e == skip)
            continue;
        if (best < 0 || v[e] > bv)
            best = e, bv = v[e];
    }
    return best;
}

// argmax_e (logits[e] + Gumbel(key, token * E + e)), e != skip.
static __device__ int argmax_gumbel(const float *logits, int E, int skip, uint64_t key, uint64_t token) {
    int best = -1;
    float bv = -INFINITY;
    for (int e = 0; e < E; e++) {
        if (e == skip)
            continue;
        float v = logits[e] + dsmoe_rng_gumbel(key, token * (uint64_t)E + (uint64_t)e);
        if (best < 0 || v > bv)
            best = e, bv = v;
    }
    return best;
}

// Token s (< p.S): the cpu loop body. probs row s and choice row s are assigned; each choice adds 1 to
// counts (integer atomics, order-independent) unless counts is NULL (the fused kernel counts in assign).
static __device__ void gate_route_token(const dsmoe_gating_params &p, int s, const float *logits, float *probs,
                                        int32_t *choice, int32_t *counts) {
    const int E = p.E, K = p.K;
    // DeepSpeed: RSample noise picks the top-1 expert; top-2 keeps argmax(probs) first and samples only
    // the second. Noise needs training.
    const int noisy = p.noise == DSMOE_NOISE_RSAMPLE && p.training;
    const float *l = logits + (size_t)s * E; // (E)
    float *g = probs + (size_t)s * E;        // (E)
    float mx = l[0];
    for (int e = 1; e < E; e++)
        mx = l[e] > mx ? l[e] : mx;
    float sum = 0.0f;
    for (int e = 0; e < E; e++) {
        g[e] = expf(l[e] - mx);
        sum += g[e];
    }
    for (int e = 0; e < E; e++)
        g[e] /= sum;
    const uint64_t token = p.token_offset + (uint64_t)s;
    const int first = (K == 1 && noisy) ? argmax_gumbel(l, E, -1, dsmoe_rng_key(p.seed, GATE_TAG_GUMBEL, 0, 0), token)
                                        : argmax_row(g, E, -1);
    choice[(size_t)s * K] = first;
    if (counts)
        atomicAdd(&counts[first], 1);
    if (K == 2) {
        const int second = noisy ? argmax_gumbel(l, E, first, dsmoe_rng_key(p.seed, GATE_TAG_GUMBEL, 1, 0), token)
                                 : argmax_row(g, E, first);
        choice[(size_t)s * K + 1] = second;
        if (counts)
            atomicAdd(&counts[second], 1);
    }
}

// ------------------------------------------------------------------------------------------------
// assign: capacity, slots, the load-balancing sums

// Shared memory of gate_assign_expert (declared __shared__ by the kernel).
typedef struct gate_assign_smem {
    int warp_sums[32];
    int hist[256];
    int pick[2];
} gate_assign_smem;

// Rank of this thread's flag among the flagged threads of the block, in thread order (exclusive), and
// the block's total. Every thread of the block must call it. warp_sums holds 32 ints.
static __device__ __forceinline__ int block_rank(bool flag, int *total, int *warp_sums) {
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads(); // warp_sums may still be read by the previous call
    if (lane == 0)
        warp_sums[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < nwarps; w++) {
        const int c = warp_sums[w];
        before += w < warp ? c : 0;
        all += c;
    }
    *total = all;
    return before + __popc(ballot & ((1u << lane) - 1u));
}

// RTS priority of a token as the exact 24-bit integer behind dsmoe_rng_uniform (a multiple of 2^-24 in
// [0, 1)): the same order as the cpu's float priorities, ties included.
static __device__ __forceinline__ uint32_t rts_priority(uint64_t key, uint64_t token) {
    return (uint32_t)(dsmoe_rng_uniform(key, token) * 16777216.0f);
}

// The room-th largest priority v (1 <= room < tokens of expert e at level k, repeats counted), by a
// radix select over 3 digits of 8 bits, and *rest = how many of the tokens at v are kept (the lowest
// ones): room - (tokens above v). Every thread of the block must call it.
static __device__ void rts_threshold(const int32_t *choice, int S, int K, int k, int e, uint64_t key, uint64_t offset,
                                     int room, int *hist, int *pick, uint32_t *v, int *rest) {
    uint32_t prefix = 0; // the digits found so far
    int want = room;     // rank (1-based, from the top) of the threshold among the tokens matching prefix
    for (int shift = 16; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x)
            hist[i] = 0;
        __syncthreads();
        for (int s = threadIdx.x; s < S; s += blockDim.x) {
            if (choice[(size_t)s * K + k] != e)
                continue;
            const uint32_t pr = rts_priority(key, offset + (uint64_t)s);
            if ((pr >> (shift + 8)) == prefix)
                atomicAdd(&hist[(pr >> shift) & 255u], 1); // integer counts: order-independent
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int above = 0, d = 255;
            for (; d > 0; d--) {
                if (above + hist[d] >= want)
                    break;
                above += hist[d];
            }
            pick[0] = d;
            pick[1] = want - above;
        }
        __syncthreads();
        prefix = (prefix << 8) | (uint32_t)pick[0];
        want = pick[1];
        __syncthreads(); // everyone has read pick before thread 0 writes it again
    }
    *v = prefix;
    *rest = want;
}

// Expert e, by the whole block (every thread, the same e; blockDim.x a multiple of 32, at most 1024):
// slots of its tokens, level by level, then kept[e], N_e, P_e (from psum (chunks, E), in chunk order),
// S (by the block of e = 0), and counts[e] = its tokens over all levels unless counts is NULL. slot
// entries of invalid choices are left to gate_weight_token. sm may be reused by the next call at once.
static __device__ void gate_assign_expert(const dsmoe_gating_params &p, int C, int e, const int32_t *choice,
                                          int32_t *slot, int32_t *kept, double *aux_sums, const double *psum,
                                          int chunks, int32_t *counts, gate_assign_smem *sm) {
    const int S = p.S, E = p.E, K = p.K, tid = threadIdx.x, nt = blockDim.x;
    int used = 0;  // slots of e taken by earlier levels (they come first)
    int first = 0; // tokens choosing e at level 0, before drops
    int all = 0;   // tokens choosing e at any level (route's counts[e])
    for (int k = 0; k < K; k++) {
        const int room = C - used; // >= 0
        int n = 0;                 // tokens choosing e at this level (the same in every thread)
        if (p.random_selection) {
            for (int s = tid; s < S; s += nt)
                n += choice[(size_t)s * K + k] == e;
            n = dsmoe_block_sum(n, sm->warp_sums);
        }
        if (!p.random_selection || n <= room) {
            // Keep the first `room` in token order (under RTS n <= room: all of them).
            int base = 0;
            for (int s0 = 0; s0 < S; s0 += nt) {
                const int s = s0 + tid;
                const bool mine = s < S && choice[(size_t)s * K + k] == e;
                int total;
                const int r = base + block_rank(mine, &total, sm->warp_sums);
                if (mine)
                    slot[(size_t)s * K + k] = r < room ? used + r : -1;
                base += total;
            }
            n = base;
            used += n < room ? n : room;
        } else {
            // RTS, over-full (n > room): keep the `room` of largest priority, equal priorities by token
            // order; the kept take slots used, used + 1, ... in token order.
            const uint64_t key = dsmoe_rng_key(p.seed, GATE_TAG_RTS, (uint64_t)k, 0);
            uint32_t v = 0xFFFFFFFFu; // above every 24-bit priority: room = 0 keeps none
            int rest = 0;
            if (room > 0)
                rts_threshold(choice, S, K, k, e, key, p.token_offset, room, sm->hist, sm->pick, &v, &rest);
            int eq_base = 0, keep_base = 0;
            for (int s0 = 0; s0 < S; s0 += nt) {
                const int s = s0 + tid;
                const bool mine = s < S && choice[(size_t)s * K + k] == e;
                const uint32_t pr = mine ? rts_priority(key, p.token_offset + (uint64_t)s) : 0u;
                const bool at = mine && pr == v;
                int n_at, n_keep;
                const int r_at = eq_base + block_rank(at, &n_at, sm->warp_sums);
                const bool keep = mine && (pr > v || (at && r_at < rest));
                const int r = keep_base + block_rank(keep, &n_keep, sm->warp_sums);
                if (mine)
                    slot[(size_t)s * K + k] = keep ? used + r : -1;
                eq_base += n_at;
                keep_base += n_keep;
            }
            used += room;
        }
        if (k == 0)
            first = n;
        all += n;
    }
    if (tid == 0) {
        kept[e] = used;
        if (counts)
            counts[e] = all;
        double P = 0.0;
        for (int c = 0; c < chunks; c++)
            P += psum[(size_t)c * E + e];
        aux_sums[e] = P;
        aux_sums[(size_t)E + e] = (double)first;
        if (e == 0)
            aux_sums[2 * (size_t)E] = (double)S;
    }
}

// Partial j (0 <= j < PS_ROWS) of P_e over one chunk's rows [r0, r1): rows r0 + j, r0 + j + PS_ROWS, ...
// in order, in double.
static __device__ __forceinline__ double gate_psum_rows(const float *probs, int E, int e, int r0, int r1, int j) {
    double acc = 0.0;
    for (int r = r0 + j; r < r1; r += PS_ROWS)
        acc += (double)probs[(size_t)r * E + e];
    return acc;
}

// The chunk's sum of P_e: its PS_ROWS partials part[0], part[stride], ... added in order.
static __device__ __forceinline__ double gate_psum_combine(const double *part, int stride) {
    double sum = 0.0;
    for (int j = 0; j < PS_ROWS; j++)
        sum += part[(size_t)j * stride];
    return sum;
}

// ------------------------------------------------------------------------------------------------
// weights

// Token s (< p.S): weights from the slots (the cpu loop body), and the range check of the choices (an
// invalid one: fault, slot -1, weight 0).
static __device__ void gate_weight_token(const dsmoe_gating_params &p, int s, const float *probs,
                                         const int32_t *choice, int32_t *slot, float *weight, dsmoe_cu_fault *fault) {
    const int E = p.E, K = p.K;
    const size_t i = (size_t)s * K; // choice[s,0]; choice[s,1] at i + 1
    const int c0 = choice[i], c1 = K == 2 ? choice[i + 1] : 0;
    int sl0 = -1, sl1 = -1; // -1 for an invalid choice too
    if (c0 < 0 || c0 >= E) {
        dsmoe_cu_raise(fault, DSMOE_CU_FAULT_CHOICE_RANGE, s, c0);
        slot[i] = -1;
    } else {
        sl0 = slot[i];
    }
    if (K == 2) {
        if (c1 < 0 || c1 >= E) {
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_CHOICE_RANGE, s, c1);
            slot[i + 1] = -1;
        } else {
            sl1 = slot[i + 1];
        }
    }
    const float *g = probs + (size_t)s * E;
    float *w = weight + i;
    if (K == 1) {
        w[0] = sl0 >= 0 ? g[c0] : 0.0f; // top-1: the gate probability itself
    } else {
        float g1 = sl0 >= 0 ? g[c0] : 0.0f, g2 = sl1 >= 0 ? g[c1] : 0.0f;
        float den = g1 + g2;
        if (den < FLT_EPSILON)
            den = FLT_EPSILON; // both dropped: 0 / eps = 0
        w[0] = g1 / den;
        w[1] = g2 / den;
    }
}

#endif
