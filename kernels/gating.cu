// kernels/gating.cu: MoE gating of the cuda plugin: route (softmax, top-1 / top-2 choice, counts),
// assign (capacity, slots, weights, the load-balancing sums) and their backward (kernels/gating.h).
// defines: dsmoe_cu_gate_route, dsmoe_cu_gate_assign, dsmoe_cu_gate_backward
//
// The rules are docs/gating.md; the reference is plugins/cpu/cpu_gating.c, and the choices must be its
// choices bit for bit. So route and backward give one thread a token and run the cpu loop body on it
// unchanged: the same float operations in the same order (row max, expf, a sequential sum, a correctly
// rounded divide; nvcc without fast-math), the same strict-> argmax (lowest index wins ties), the same
// counter-RNG keys and counters. Assign gives one block an expert: it walks the tokens in token order
// in chunks of the block, numbering its tokens with a block-wide prefix count, level 0 for all tokens
// before level 1 (which only needs this expert's level-0 count). Under RTS an over-full expert finds
// the priority threshold by a radix select over the 24-bit priorities (integer histograms), keeps
// every token above it and the lowest tokens at it: the cpu's sort order (priority desc, token asc).
//
// Invariants: route and assign assign their outputs, backward accumulates (+=). No floating-point
// atomics: float sums run in a fixed order; counts use integer atomics (order-independent). The only
// ways a choice can differ from the cpu's are the last-ulp differences of CUDA's expf (probs) and of
// its double log (Gumbel noise) against glibc: they matter only for near-ties (see docs/gating.md).
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>

#include "cuda_common.cuh" // dsmoe_cu_raise, dsmoe_block_sum
#include "dsmoe/rng.h"     // dsmoe_rng_key, dsmoe_rng_gumbel, dsmoe_rng_uniform (host and device)
#include "gating.h"

// Purpose tags of the RNG keys: the cpu plugin's (cpu_gating.c), so every plugin draws the same numbers.
#define GATE_TAG_GUMBEL 0x47554D42ull // "GUMB": key = dsmoe_rng_key(seed, tag, level, 0)
#define GATE_TAG_RTS 0x525453ull      // "RTS":  key = dsmoe_rng_key(seed, tag, level, 0)

#define GATE_THREADS 128   // per-token kernels: one thread a token
#define ASSIGN_THREADS 512 // assign: one block an expert, a multiple of 32
#define PS_COLS 32         // P_e partial sums: a block is PS_COLS experts x PS_ROWS row threads ...
#define PS_ROWS 8
#define PS_CHUNK 512 // ... over one chunk of PS_CHUNK tokens (the chunking depends on S only)

static dsmoe_status check_params(const dsmoe_cu_env *env, const char *op, const dsmoe_gating_params *p) {
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

static dsmoe_status scratch_alloc(const dsmoe_cu_env *env, void **ptr, size_t bytes, const char *op) {
    cudaError_t e = cudaMallocAsync(ptr, bytes ? bytes : 1, env->stream);
    if (e != cudaSuccess) {
        *ptr = NULL;
        return dsmoe_cu_check(env, e, op);
    }
    return DSMOE_OK;
}

static unsigned token_blocks(int S) { return (unsigned)((S + GATE_THREADS - 1) / GATE_THREADS); }

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

// One thread a token: the cpu loop body. counts (E) was zeroed on the stream before.
static __global__ void route_kernel(dsmoe_gating_params p, const float *logits, float *probs, int32_t *choice,
                             int32_t *counts) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= p.S)
        return;
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
    atomicAdd(&counts[first], 1);
    if (K == 2) {
        const int second = noisy ? argmax_gumbel(l, E, first, dsmoe_rng_key(p.seed, GATE_TAG_GUMBEL, 1, 0), token)
                                 : argmax_row(g, E, first);
        choice[(size_t)s * K + 1] = second;
        atomicAdd(&counts[second], 1);
    }
}

extern "C" dsmoe_status dsmoe_cu_gate_route(const dsmoe_cu_env *env, const dsmoe_gating_params *p, const float *logits,
                                            float *probs, int32_t *choice, int32_t *counts) {
    static const char op[] = "gate_route";
    dsmoe_status st = check_params(env, op, p);
    if (st != DSMOE_OK)
        return st;
    if (counts == NULL)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: counts is NULL", op);
    if (p->S > 0 && (!logits || !probs || !choice))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op,
                             !logits ? "logits" : !probs ? "probs" : "choice");
    // counts is assigned even for S = 0.
    st = dsmoe_cu_check(env, cudaMemsetAsync(counts, 0, (size_t)p->E * sizeof *counts, env->stream), op);
    if (st != DSMOE_OK || p->S == 0)
        return st;
    route_kernel<<<token_blocks(p->S), GATE_THREADS, 0, env->stream>>>(*p, logits, probs, choice, counts);
    return dsmoe_cu_check_launch(env, op);
}

// ------------------------------------------------------------------------------------------------
// assign: capacity, slots, weights, the load-balancing sums

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

// One block per expert e: slots of its tokens, level by level, then kept[e], N_e, P_e (from the
// partial sums, in chunk order) and S. slot entries of invalid choices are left to weight_kernel.
static __global__ void __launch_bounds__(ASSIGN_THREADS)
    assign_kernel(dsmoe_gating_params p, int C, const int32_t *choice, int32_t *slot, int32_t *kept,
                  double *aux_sums, const double *psum, int chunks) {
    __shared__ int warp_sums[32];
    __shared__ int hist[256];
    __shared__ int pick[2];
    const int S = p.S, E = p.E, K = p.K, e = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    int used = 0;  // slots of e taken by earlier levels (they come first)
    int first = 0; // tokens choosing e at level 0, before drops
    for (int k = 0; k < K; k++) {
        const int room = C - used; // >= 0
        int n = 0;                 // tokens choosing e at this level
        if (p.random_selection) {
            for (int s = tid; s < S; s += nt)
                n += choice[(size_t)s * K + k] == e;
            n = dsmoe_block_sum(n, warp_sums);
        }
        if (!p.random_selection || n <= room) {
            // Keep the first `room` in token order (under RTS n <= room: all of them).
            int base = 0;
            for (int s0 = 0; s0 < S; s0 += nt) {
                const int s = s0 + tid;
                const bool mine = s < S && choice[(size_t)s * K + k] == e;
                int total;
                const int r = base + block_rank(mine, &total, warp_sums);
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
                rts_threshold(choice, S, K, k, e, key, p.token_offset, room, hist, pick, &v, &rest);
            int eq_base = 0, keep_base = 0;
            for (int s0 = 0; s0 < S; s0 += nt) {
                const int s = s0 + tid;
                const bool mine = s < S && choice[(size_t)s * K + k] == e;
                const uint32_t pr = mine ? rts_priority(key, p.token_offset + (uint64_t)s) : 0u;
                const bool at = mine && pr == v;
                int n_at, n_keep;
                const int r_at = eq_base + block_rank(at, &n_at, warp_sums);
                const bool keep = mine && (pr > v || (at && r_at < rest));
                const int r = keep_base + block_rank(keep, &n_keep, warp_sums);
                if (mine)
                    slot[(size_t)s * K + k] = keep ? used + r : -1;
                eq_base += n_at;
                keep_base += n_keep;
            }
            used += room;
        }
        if (k == 0)
            first = n;
    }
    if (tid == 0) {
        kept[e] = used;
        double P = 0.0;
        for (int c = 0; c < chunks; c++)
            P += psum[(size_t)c * E + e];
        aux_sums[e] = P;
        aux_sums[(size_t)E + e] = (double)first;
        if (e == 0)
            aux_sums[2 * (size_t)E] = (double)S;
    }
}

// psum (chunks, E) = per chunk of PS_CHUNK tokens, sum over its tokens of probs[s, e] in double:
// thread (x, y) sums rows y, y + PS_ROWS, ... in order, then row 0 adds the PS_ROWS partials in order.
static __global__ void psum_partial_kernel(double *psum, const float *probs, int S, int E) {
    __shared__ double part[PS_ROWS][PS_COLS + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, col = blockIdx.y * PS_COLS + tx;
    const int r0 = blockIdx.x * PS_CHUNK, r1 = min(S, r0 + PS_CHUNK);
    double acc = 0.0;
    if (col < E)
        for (int r = r0 + ty; r < r1; r += PS_ROWS)
            acc += (double)probs[(size_t)r * E + col];
    part[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && col < E) {
        double sum = 0.0;
        for (int j = 0; j < PS_ROWS; j++)
            sum += part[j][tx];
        psum[(size_t)blockIdx.x * E + col] = sum;
    }
}

// One thread a token: weights from the slots (the cpu loop body), and the range check of the choices
// (an invalid one: fault, slot -1, weight 0).
static __global__ void weight_kernel(dsmoe_gating_params p, const float *probs, const int32_t *choice, int32_t *slot,
                              float *weight, dsmoe_cu_fault *fault) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= p.S)
        return;
    const int E = p.E, K = p.K;
    int c[2] = {0, 0}, sl[2] = {-1, -1};
    for (int k = 0; k < K; k++) {
        const size_t i = (size_t)s * K + k;
        c[k] = choice[i];
        if (c[k] < 0 || c[k] >= E) {
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_CHOICE_RANGE, s, c[k]);
            slot[i] = -1;
        } else {
            sl[k] = slot[i];
        }
    }
    const float *g = probs + (size_t)s * E;
    float *w = weight + (size_t)s * K;
    if (K == 1) {
        w[0] = sl[0] >= 0 ? g[c[0]] : 0.0f; // top-1: the gate probability itself
    } else {
        float g1 = sl[0] >= 0 ? g[c[0]] : 0.0f, g2 = sl[1] >= 0 ? g[c[1]] : 0.0f;
        float den = g1 + g2;
        if (den < FLT_EPSILON)
            den = FLT_EPSILON; // both dropped: 0 / eps = 0
        w[0] = g1 / den;
        w[1] = g2 / den;
    }
}

extern "C" dsmoe_status dsmoe_cu_gate_assign(const dsmoe_cu_env *env, const dsmoe_gating_params *p, int C,
                                             const float *probs, const int32_t *choice, int32_t *slot, float *weight,
                                             int32_t *kept, double *aux_sums) {
    static const char op[] = "gate_assign";
    dsmoe_status st = check_params(env, op, p);
    if (st != DSMOE_OK)
        return st;
    const int S = p->S, E = p->E;
    if (C < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: capacity C = %d, expected >= 0", op, C);
    if (!kept || !aux_sums)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op, !kept ? "kept" : "aux_sums");
    if (S > 0 && (!probs || !choice || !slot || !weight))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op,
                             !probs ? "probs" : !choice ? "choice" : !slot ? "slot" : "weight");
    // kept and aux_sums are assigned even for S = 0: assign_kernel runs with no tokens and no chunks.
    const int chunks = (S + PS_CHUNK - 1) / PS_CHUNK;
    double *psum = NULL; // (chunks, E)
    if (chunks > 0) {
        if ((st = scratch_alloc(env, (void **)&psum, (size_t)chunks * E * sizeof *psum, op)) != DSMOE_OK)
            return st;
        const dim3 grid((unsigned)chunks, (unsigned)((E + PS_COLS - 1) / PS_COLS)), block(PS_COLS, PS_ROWS);
        psum_partial_kernel<<<grid, block, 0, env->stream>>>(psum, probs, S, E);
    }
    assign_kernel<<<(unsigned)E, ASSIGN_THREADS, 0, env->stream>>>(*p, C, choice, slot, kept, aux_sums, psum, chunks);
    if (psum)
        cudaFreeAsync(psum, env->stream);
    if (S > 0)
        weight_kernel<<<token_blocks(S), GATE_THREADS, 0, env->stream>>>(*p, probs, choice, slot, weight, env->fault);
    return dsmoe_cu_check_launch(env, op);
}

// ------------------------------------------------------------------------------------------------
// backward of route + assign

// daux_g (E) = dL/dprobs[s,e] of daux * l_aux, the same for every token: the cpu's formula and order.
static __global__ void aux_grad_kernel(float *daux_g, const double *aux_sums, int E, float daux) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E)
        return;
    const double St = aux_sums[2 * (size_t)E];
    daux_g[e] = St > 0.0 ? (float)((double)daux * E * aux_sums[(size_t)E + e] / (St * St)) : 0.0f;
}

// One thread a token, the cpu loop body. With g = probs[s]:
//   dL/dg_e  = daux_g[e] + [top-1] dweight[s,0] at a kept choice 0
//            + [top-2] dweight[s,j] / den - (sum_i dweight[s,i] g_i) / den^2 at each kept choice j
//              (den = g_1 + g_2 over kept choices; only the first term when den is clamped to eps)
//   dlogits += g * (dL/dg - sum_e g_e dL/dg_e)
// A token with a choice out of [0, E) raises the fault and is skipped.
static __global__ void gate_backward_kernel(dsmoe_gating_params p, float *dlogits, const float *probs,
                                     const int32_t *choice, const int32_t *slot, const float *dweight,
                                     const float *daux_g, dsmoe_cu_fault *fault) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= p.S)
        return;
    const int E = p.E, K = p.K;
    const int32_t *c = choice + (size_t)s * K;
    const int32_t *sl = slot + (size_t)s * K;
    const float *dw = dweight + (size_t)s * K;
    for (int k = 0; k < K; k++)
        if (c[k] < 0 || c[k] >= E) {
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_CHOICE_RANGE, s, c[k]);
            return;
        }
    const float *g = probs + (size_t)s * E;
    float dgk[2] = {0.0f, 0.0f}; // dL/dg at choice[s,k] from the weights (0 when dropped)
    if (K == 1) {
        if (sl[0] >= 0)
            dgk[0] = dw[0];
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
    for (int e = 0; e < E; e++)
        dot += (double)g[e] * daux_g[e];
    for (int k = 0; k < K; k++)
        dot += (double)g[c[k]] * dgk[k];
    const float fdot = (float)dot;
    float *dl = dlogits + (size_t)s * E;
    for (int e = 0; e < E; e++)
        dl[e] += g[e] * (daux_g[e] - fdot);
    for (int k = 0; k < K; k++)
        dl[c[k]] += g[c[k]] * dgk[k];
}

extern "C" dsmoe_status dsmoe_cu_gate_backward(const dsmoe_cu_env *env, const dsmoe_gating_params *p, float *dlogits,
                                               const float *probs, const int32_t *choice, const int32_t *slot,
                                               const float *dweight, const double *aux_sums, float daux) {
    static const char op[] = "gate_backward";
    dsmoe_status st = check_params(env, op, p);
    if (st != DSMOE_OK)
        return st;
    const int S = p->S, E = p->E;
    if (aux_sums == NULL)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: aux_sums is NULL", op);
    if (S == 0)
        return DSMOE_OK;
    if (!dlogits || !probs || !choice || !slot || !dweight)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op,
                             !dlogits ? "dlogits" : !probs ? "probs" : !choice ? "choice" : !slot ? "slot" : "dweight");
    float *daux_g = NULL; // (E)
    if ((st = scratch_alloc(env, (void **)&daux_g, (size_t)E * sizeof *daux_g, op)) != DSMOE_OK)
        return st;
    aux_grad_kernel<<<(unsigned)((E + GATE_THREADS - 1) / GATE_THREADS), GATE_THREADS, 0, env->stream>>>(
        daux_g, aux_sums, E, daux);
    gate_backward_kernel<<<token_blocks(S), GATE_THREADS, 0, env->stream>>>(*p, dlogits, probs, choice, slot, dweight,
                                                                            daux_g, env->fault);
    cudaFreeAsync(daux_g, env->stream);
    return dsmoe_cu_check_launch(env, op);
}
