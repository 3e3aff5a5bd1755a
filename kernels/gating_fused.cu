// kernels/gating_fused.cu: route + assign of one MoE layer in one kernel launch (version 3's `gate`), for a
// capacity C the host knows before routing (kernels/gating.h).
// defines: dsmoe_cu_gate_fused
//
// Contract: probs, choice, counts, slot, weight, kept and aux_sums are bit for bit those of
// dsmoe_cu_gate_route followed by dsmoe_cu_gate_assign (kernels/gating.cu) with the same p and C, and
// the same errors (argument checks before any work, op name "gate"; the same data fault, which a routed
// table cannot raise). Both run the same device code, kernels/gating_device.cuh, in the same arithmetic
// order; only the mapping of that code onto threads differs, and none of the results depend on it:
//
//   phase 1  one block a chunk of PS_CHUNK (= the block size) tokens, grid-stride over the chunks: each
//            thread routes one token (gate_route_token, the route kernel's body), __syncthreads, then the
//            block forms the chunk's P_e partials (gate_psum_rows / gate_psum_combine: PS_ROWS
//            interleaved double partials, then their sum in order, as psum_partial_kernel) into the
//            scratch psum (chunks, E). No counts here (see below).
//   grid.sync()
//   phase 2  one block an expert, e = blockIdx.x, += gridDim.x: gate_assign_expert, the assign kernel's
//            body (block-wide prefix ranks, RTS radix select; uniform over the block), which also writes
//            P_e (psum in chunk order), N_e, S, kept[e], and counts[e] = its tokens at every level.
//   grid.sync()
//   phase 3  one thread a token, grid-stride: gate_weight_token, the weight kernel's body.
//
// counts: route counts with integer atomics on a zeroed array, which in one launch would need a
// zeroing phase and a third grid barrier. The assign phase already counts every expert's tokens at each
// level (n, the same integer), so counts[e] = n_0 + n_1 there: no atomics, no zeroing, same values.
//
// Grid: cooperative (cudaLaunchCooperativeKernel) so that grid.sync() is legal; its blocks must all be
// resident at once, so the grid is min(max(chunks, E), blocks per SM (the occupancy API) x SMs) blocks
// of FUSED_THREADS; every loop is grid-stride, so any grid size gives the same results. The launch
// bounds ask for 2 blocks per SM: ptxas caps the kernel at 64 registers (512 x 64 = half the register
// file of sm_80 / sm_90; 5.2 KB of static shared memory), so the grid may reach 2 x SMs; left to its
// own choice ptxas also picks 64 but spills more. Every thread of a block reaches each __syncthreads
// (loop bounds are uniform over the block, token guards hold no barrier), and every thread of the grid
// reaches both grid.sync() (no early return).
// Fallback: when the device cannot launch cooperatively (cudaDevAttrCooperativeLaunch = 0), no block
// fits on an SM, or the launch is refused as too large (e.g. an MPS client limited to fewer SMs), the
// launcher runs dsmoe_cu_gate_route then dsmoe_cu_gate_assign instead: the same results, more launches.
//
// Invariants: all outputs assigned (counts, kept, aux_sums also for S = 0); stream-ordered on
// env->stream (scratch by cudaMallocAsync / cudaFreeAsync), never synchronising; no floating-point
// atomics; deterministic.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"   // dsmoe_cu_fault
#include "gating.h"
#include "gating_device.cuh" // gate_route_token, gate_assign_expert, gate_psum_*, gate_weight_token

namespace cg = cooperative_groups;

#define FUSED_THREADS 512                    // one block: a chunk of tokens (phase 1), an expert (phase 2)
#define FUSED_MIN_BLOCKS 2                   // per SM: registers capped at 64 (see the header comment)
#define FUSED_COLS (FUSED_THREADS / PS_ROWS) // experts per pass of the P_e partials (phase 1)
static_assert(FUSED_THREADS == PS_CHUNK, "phase 1 gives a thread one token of the block's chunk");
static_assert(FUSED_THREADS % 32 == 0 && FUSED_THREADS <= 1024, "block-wide scans need whole warps");
static_assert(FUSED_THREADS % PS_ROWS == 0, "phase 1 splits the block into PS_ROWS rows of FUSED_COLS");

static __global__ void __launch_bounds__(FUSED_THREADS, FUSED_MIN_BLOCKS)
    gate_fused_kernel(dsmoe_gating_params p, int C, const float *logits, float *probs, int32_t *choice,
                      int32_t *counts, int32_t *slot, float *weight, int32_t *kept, double *aux_sums, double *psum,
                      dsmoe_cu_fault *fault) {
    __shared__ double part[PS_ROWS][FUSED_COLS + 1]; // phase 1: one pass of the chunk's P_e partials
    __shared__ gate_assign_smem sm;                  // phase 2
    cg::grid_group grid = cg::this_grid();
    const int S = p.S, E = p.E, tid = threadIdx.x;
    const int chunks = (S + PS_CHUNK - 1) / PS_CHUNK;

    // Phase 1: route, and P_e per chunk. A chunk's probs are this block's own writes: __syncthreads
    // makes them visible to the block.
    const int tx = tid % FUSED_COLS, ty = tid / FUSED_COLS;
    for (int c = blockIdx.x; c < chunks; c += gridDim.x) {
        const int r0 = c * PS_CHUNK, r1 = S - r0 < PS_CHUNK ? S : r0 + PS_CHUNK;
        if (tid < r1 - r0)
            gate_route_token(p, r0 + tid, logits, probs, choice, NULL);
        __syncthreads();
        for (int e0 = 0; e0 < E; e0 += FUSED_COLS) {
            const int col = e0 + tx;
            part[ty][tx] = col < E ? gate_psum_rows(probs, E, col, r0, r1, ty) : 0.0;
            __syncthreads();
            if (ty == 0 && col < E)
                psum[(size_t)c * E + col] = gate_psum_combine(&part[0][tx], FUSED_COLS + 1);
            __syncthreads(); // part is read before the next pass (or chunk) writes it
        }
    }
    grid.sync(); // choice and psum of every chunk are visible to the grid

    // Phase 2: assign, one block an expert; every thread of the block takes the same e.
    for (int e = blockIdx.x; e < E; e += gridDim.x)
        gate_assign_expert(p, C, e, choice, slot, kept, aux_sums, psum, chunks, counts, &sm);
    grid.sync(); // every slot is visible to the grid

    // Phase 3: weights, one thread a token (64-bit index: s + stride may pass INT_MAX).
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long s = (long long)blockIdx.x * blockDim.x + tid; s < S; s += stride)
        gate_weight_token(p, (int)s, probs, choice, slot, weight, fault);
}

// Blocks of the cooperative grid for this call, or 0 when a cooperative launch cannot be used here (the
// caller falls back). A failed query is a CUDA error: *st is set.
static int fused_grid(const dsmoe_cu_env *env, const char *op, int work, dsmoe_status *st) {
    int coop = 0, sms = env->sm_count, per_sm = 0;
    *st = dsmoe_cu_check(env, cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, env->device), op);
    if (*st != DSMOE_OK || !coop)
        return 0;
    if (sms <= 0) {
        *st = dsmoe_cu_check(env, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, env->device), op);
        if (*st != DSMOE_OK)
            return 0;
    }
    *st = dsmoe_cu_check(
        env, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gate_fused_kernel, FUSED_THREADS, 0), op);
    if (*st != DSMOE_OK || per_sm <= 0 || sms <= 0)
        return 0;
    const long long resident = (long long)per_sm * sms;
    return (int)(work < resident ? work : resident);
}

extern "C" dsmoe_status dsmoe_cu_gate_fused(const dsmoe_cu_env *env, const dsmoe_gating_params *p, int C,
                                            const float *logits, float *probs, int32_t *choice, int32_t *counts,
                                            int32_t *slot, float *weight, int32_t *kept, double *aux_sums) {
    static const char op[] = "gate";
    // The checks of route and assign together, before anything is enqueued.
    dsmoe_status st = gate_check_params(env, op, p);
    if (st != DSMOE_OK)
        return st;
    const int S = p->S, E = p->E;
    if (!counts || (S > 0 && !logits))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op, !counts ? "counts" : "logits");
    if ((st = gate_check_assign(env, op, S, C, probs, choice, slot, weight, kept, aux_sums)) != DSMOE_OK)
        return st;

    const int chunks = (S + PS_CHUNK - 1) / PS_CHUNK;
    const int work = chunks > E ? chunks : E; // >= 1: phase 2 has E >= 1 experts
    const int grid = fused_grid(env, op, work, &st);
    if (st != DSMOE_OK)
        return st;
    if (grid > 0) {
        double *psum = NULL; // (chunks, E)
        if (chunks > 0 &&
            (st = dsmoe_cu_scratch(env, (void **)&psum, (size_t)chunks * E * sizeof *psum, op)) != DSMOE_OK)
            return st;
        dsmoe_gating_params pp = *p;
        dsmoe_cu_fault *fault = env->fault;
        cudaError_t e = dsmoe_cu_launch_cooperative(gate_fused_kernel, dim3((unsigned)grid), dim3(FUSED_THREADS), 0,
                                                    env->stream, pp, C, logits, probs, choice, counts, slot, weight,
                                                    kept, aux_sums, psum, fault);
        if (psum)
            cudaFreeAsync(psum, env->stream); // stream-ordered: after the kernel, or at once if it never ran
        if (e == cudaSuccess)
            return dsmoe_cu_check_launch(env, op);
        if (e != cudaErrorCooperativeLaunchTooLarge)
            return dsmoe_cu_check(env, e, op);
        (void)cudaGetLastError(); // a refused configuration, not a device fault: fall back
    }
    // Fallback (no cooperative launch here): the separate kernels, the same results.
    if ((st = dsmoe_cu_gate_route(env, p, logits, probs, choice, counts)) != DSMOE_OK)
        return st;
    return dsmoe_cu_gate_assign(env, p, C, probs, choice, slot, weight, kept, aux_sums);
}
