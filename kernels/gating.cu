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
// The loop bodies live in kernels/gating_device.cuh, shared with the fused route + assign of
// kernels/gating_fused.cu (version 3's `gate`), which must give these kernels' results bit for bit.
//
// Invariants: route and assign assign their outputs, backward accumulates (+=). No floating-point
// atomics: float sums run in a fixed order; counts use integer atomics (order-independent). The only
// ways a choice can differ from the cpu's are the last-ulp differences of CUDA's expf (probs) and of
// its double log (Gumbel noise) against glibc: they matter only for near-ties (see docs/gating.md).
#include <cuda_runtime.h>
#include <float.h>

#include "cuda_common.cuh"   // dsmoe_cu_raise
#include "gating.h"
#include "gating_device.cuh" // the route, assign and weight bodies, GATE_TAG_*, PS_ROWS, PS_CHUNK

#define GATE_THREADS 128   // per-token kernels: one thread a token
#define ASSIGN_THREADS 512 // assign: one block an expert, a multiple of 32
#define PS_COLS 32         // P_e partial sums: a block is PS_COLS experts x PS_ROWS row threads over one chunk

static unsigned token_blocks(int S) { return (unsigned)((S + GATE_THREADS - 1) / GATE_THREADS); }

// ------------------------------------------------------------------------------------------------
// route: softmax, top-1 / top-2 choice, counts

// One thread a token (gate_route_token). counts (E) was zeroed on the stream before.
static __global__ void route_kernel(dsmoe_gating_params p, const float *logits, float *probs, int32_t *choice,
                                    int32_t *counts) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s < p.S)
        gate_route_token(p, s, logits, probs, choice, counts);
}

extern "C" dsmoe_status dsmoe_cu_gate_route(const dsmoe_cu_env *env, const dsmoe_gating_params *p, const float *logits,
                                            float *probs, int32_t *choice, int32_t *counts) {
    static const char op[] = "gate_route";
    dsmoe_status st = gate_check_params(env, op, p);
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
    dsmoe_cu_launch(route_kernel, token_blocks(p->S), GATE_THREADS, 0, env->stream, *p, logits, probs, choice, counts);
    return dsmoe_cu_check_launch(env, op);
}

// ------------------------------------------------------------------------------------------------
// assign: capacity, slots, weights, the load-balancing sums

// One block per expert (gate_assign_expert; counts are route's, not written here).
static __global__ void __launch_bounds__(ASSIGN_THREADS)
    assign_kernel(dsmoe_gating_params p, int C, const int32_t *choice, int32_t *slot, int32_t *kept,
                  double *aux_sums, const double *psum, int chunks) {
    __shared__ gate_assign_smem sm;
    gate_assign_expert(p, C, (int)blockIdx.x, choice, slot, kept, aux_sums, psum, chunks, NULL, &sm);
}

// psum (chunks, E) = per chunk of PS_CHUNK tokens, sum over its tokens of probs[s, e] in double:
// thread (x, y) sums rows y, y + PS_ROWS, ... in order, then row 0 adds the PS_ROWS partials in order.
static __global__ void psum_partial_kernel(double *psum, const float *probs, int S, int E) {
    __shared__ double part[PS_ROWS][PS_COLS + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, col = blockIdx.y * PS_COLS + tx;
    const int r0 = blockIdx.x * PS_CHUNK, r1 = min(S, r0 + PS_CHUNK);
    part[ty][tx] = col < E ? gate_psum_rows(probs, E, col, r0, r1, ty) : 0.0;
    __syncthreads();
    if (ty == 0 && col < E)
        psum[(size_t)blockIdx.x * E + col] = gate_psum_combine(&part[0][tx], PS_COLS + 1);
}

// One thread a token (gate_weight_token).
static __global__ void weight_kernel(dsmoe_gating_params p, const float *probs, const int32_t *choice, int32_t *slot,
                                     float *weight, dsmoe_cu_fault *fault) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s < p.S)
        gate_weight_token(p, s, probs, choice, slot, weight, fault);
}

extern "C" dsmoe_status dsmoe_cu_gate_assign(const dsmoe_cu_env *env, const dsmoe_gating_params *p, int C,
                                             const float *probs, const int32_t *choice, int32_t *slot, float *weight,
                                             int32_t *kept, double *aux_sums) {
    static const char op[] = "gate_assign";
    dsmoe_status st = gate_check_params(env, op, p);
    if (st != DSMOE_OK)
        return st;
    const int S = p->S, E = p->E;
    if ((st = gate_check_assign(env, op, S, C, probs, choice, slot, weight, kept, aux_sums)) != DSMOE_OK)
        return st;
    // kept and aux_sums are assigned even for S = 0: assign_kernel runs with no tokens and no chunks.
    const int chunks = (S + PS_CHUNK - 1) / PS_CHUNK;
    double *psum = NULL; // (chunks, E)
    if (chunks > 0) {
        if ((st = dsmoe_cu_scratch(env, (void **)&psum, (size_t)chunks * E * sizeof *psum, op)) != DSMOE_OK)
            return st;
        const dim3 grid((unsigned)chunks, (unsigned)((E + PS_COLS - 1) / PS_COLS)), block(PS_COLS, PS_ROWS);
        dsmoe_cu_launch(psum_partial_kernel, grid, block, 0, env->stream, psum, probs, S, E);
    }
    dsmoe_cu_launch(assign_kernel, (unsigned)E, ASSIGN_THREADS, 0, env->stream, *p, C, choice, slot, kept, aux_sums,
                    psum, chunks);
    if (psum)
        cudaFreeAsync(psum, env->stream);
    if (S > 0)
        dsmoe_cu_launch(weight_kernel, token_blocks(S), GATE_THREADS, 0, env->stream, *p, probs, choice, slot, weight,
                        env->fault);
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
    dsmoe_status st = gate_check_params(env, op, p);
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
    if ((st = dsmoe_cu_scratch(env, (void **)&daux_g, (size_t)E * sizeof *daux_g, op)) != DSMOE_OK)
        return st;
    dsmoe_cu_launch(aux_grad_kernel, (unsigned)((E + GATE_THREADS - 1) / GATE_THREADS), GATE_THREADS, 0, env->stream,
                    daux_g, aux_sums, E, daux);
    dsmoe_cu_launch(gate_backward_kernel, token_blocks(S), GATE_THREADS, 0, env->stream, *p, dlogits, probs, choice,
                    slot, dweight, daux_g, env->fault);
    cudaFreeAsync(daux_g, env->stream);
    return dsmoe_cu_check_launch(env, op);
}
