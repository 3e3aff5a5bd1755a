// kernels/gemm_rows.cu: the grouped GEMM of few rows (decode, small batches) on CUDA cores, which reads only
// what the counts say is needed.
// defines: dsmoe_cu_gemm_grouped_rows
//
// Why: cuBLAS's batched GEMM (gemm.cu) computes every group at m_max rows, since the counts stay on the
// device. At decode m_max is a handful of rows and the GEMMs are bound by reading the weights, so cuBLAS
// reads every expert's weights where the tokens went to a few (a top-1 layer at batch 1 needs one expert
// of E). Here each warp reads its group's count first: a group of count 0 reads nothing of its weights,
// and only rows below the count are computed, so the bytes read are those of the experts that received
// tokens (docs/inference.md promises this; the cpu plugin keeps it by reading the counts on the host).
//
// The shape: forward layout only (trans_b: b_w is (n, k), row j of it is output column j's weights, read
// once, contiguously, 16 bytes a lane where the operands allow). A warp owns ROWS_COLS output columns of
// one group and carries ROWS_CHUNK rows of a in registers per pass over k; its lanes split k, then sum
// over the warp by shuffles in a fixed order (deterministic), and the epilogue runs on the sums, as
// gemm.cu's grouped_epilogue_kernel computes it (a bfloat16 c rounded once). Rows from the count on are
// not written (the ABI leaves them unspecified).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh" // dsmoe_ld, dsmoe_ld16, dsmoe_st, dsmoe_cu_raise, dsmoe_cu_gelu
#include "gemm.h"

#define ROWS_WARPS 4 // warps per block
#define ROWS_COLS 2  // output columns per warp
#define ROWS_CHUNK 8 // rows of a per pass over k (ROWS_COLS * ROWS_CHUNK <= 32: one lane per result)
#define ROWS_MAX_GRID_Y 65535

// V elements from p as float32: one (any alignment) or 16 bytes (p 16-byte aligned).
template <int V, typename T>
__device__ __forceinline__ void rows_load(const T *p, float *v) {
    if constexpr (V == 1)
        v[0] = dsmoe_ld(p, 0);
    else
        dsmoe_ld16(p, v);
}

// By value: the descriptor is host memory.
template <typename T, typename TC>
struct rows_args {
    const int32_t *counts;
    int groups, m_max, n, k, b_groups;
    float alpha, beta;
    const T *a;
    int lda;
    size_t a_stride;
    const T *b;
    int ldb;
    size_t b_stride;
    TC *c;
    int ldc;
    size_t c_stride;
    int epi;
    const float *bias; // BIAS, BIAS_GELU
    size_t bias_stride;
    TC *aux; // BIAS_GELU (written), DGELU (read)
    dsmoe_cu_fault *fault;
};

// Blocks: x over column tiles of ROWS_WARPS * ROWS_COLS, y over groups (grid-stride). No barrier: a warp
// whose columns lie past n, or whose group is empty, leaves at once.
template <typename T, typename TC, int V>
__global__ void __launch_bounds__(ROWS_WARPS * 32) grouped_rows_kernel(const rows_args<T, TC> p) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j0 = (blockIdx.x * ROWS_WARPS + warp) * ROWS_COLS;
    for (int g = blockIdx.y; g < p.groups; g += gridDim.y) {
        const int cnt = p.counts[g];
        if (cnt < 0 || cnt > p.m_max) {
            if (blockIdx.x == 0 && threadIdx.x == 0)
                dsmoe_cu_raise(p.fault, DSMOE_CU_FAULT_COUNT_RANGE, g, cnt);
            continue;
        }
        if (cnt == 0 || j0 >= p.n)
            continue;
        const int w = g % p.b_groups;
        const T *ag = p.a + (size_t)g * p.a_stride;
        const T *brow[ROWS_COLS];
        for (int c = 0; c < ROWS_COLS; c++) // a column past n reads column j0's row again, and is not stored
            brow[c] = p.b + (size_t)w * p.b_stride + (size_t)(j0 + c < p.n ? j0 + c : j0) * p.ldb;
        const float *bias = p.bias ? p.bias + (size_t)w * p.bias_stride : NULL;
        for (int r0 = 0; r0 < cnt; r0 += ROWS_CHUNK) {
            const int rows = cnt - r0 < ROWS_CHUNK ? cnt - r0 : ROWS_CHUNK;
            float acc[ROWS_COLS][ROWS_CHUNK];
#pragma unroll
            for (int c = 0; c < ROWS_COLS; c++)
#pragma unroll
                for (int r = 0; r < ROWS_CHUNK; r++)
                    acc[c][r] = 0.0f;
            // Unrolled so that several iterations' loads are in flight at once (at batch 1 a weight row is
            // all a warp waits for).
#pragma unroll 4
            for (int kk = lane * V; kk < p.k; kk += 32 * V) {
                float bv[ROWS_COLS][V];
#pragma unroll
                for (int c = 0; c < ROWS_COLS; c++)
                    rows_load<V>(brow[c] + kk, bv[c]);
#pragma unroll
                for (int r = 0; r < ROWS_CHUNK; r++) {
                    if (r >= rows)
                        break;
                    float av[V];
                    rows_load<V>(ag + (size_t)(r0 + r) * p.lda + kk, av);
#pragma unroll
                    for (int c = 0; c < ROWS_COLS; c++)
#pragma unroll
                        for (int v = 0; v < V; v++)
                            acc[c][r] += bv[c][v] * av[v];
                }
            }
            // Every lane ends with every sum (a butterfly adds the same pairs on both sides: bitwise equal).
#pragma unroll
            for (int c = 0; c < ROWS_COLS; c++)
#pragma unroll
                for (int r = 0; r < ROWS_CHUNK; r++)
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1)
                        acc[c][r] += __shfl_xor_sync(0xffffffffu, acc[c][r], o);
            // Lane c * ROWS_CHUNK + r stores result (row r0 + r, column j0 + c).
#pragma unroll
            for (int c = 0; c < ROWS_COLS; c++)
#pragma unroll
                for (int r = 0; r < ROWS_CHUNK; r++) {
                    const int j = j0 + c;
                    if (lane != c * ROWS_CHUNK + r || r >= rows || j >= p.n)
                        continue;
                    const size_t at = (size_t)g * p.c_stride + (size_t)(r0 + r) * p.ldc + j;
                    float v = p.alpha * acc[c][r];
                    if (p.beta != 0.0f) // BLAS: with beta == 0, c is not read (it may hold NaN)
                        v += p.beta * dsmoe_ld(p.c, at);
                    if (p.epi == DSMOE_EPI_BIAS) {
                        v += bias[j];
                    } else if (p.epi == DSMOE_EPI_BIAS_GELU) {
                        v += bias[j];
                        dsmoe_st(p.aux, at, v);
                        v = dsmoe_cu_gelu(v);
                    } else if (p.epi == DSMOE_EPI_DGELU) {
                        v = dsmoe_cu_gelu_grad(dsmoe_ld(p.aux, at)) * v;
                    }
                    dsmoe_st(p.c, at, v);
                }
        }
    }
}

// 16-byte loads need every row of a and of b_w to start 16-byte aligned: both bases, both leading
// dimensions and both group strides, and k a whole number of vectors.
static int rows_vectorised(const dsmoe_grouped_gemm *G, size_t es) {
    const size_t vec = 16 / es;
    return (uintptr_t)G->a % 16 == 0 && (uintptr_t)G->b % 16 == 0 && G->k % vec == 0 && G->lda % vec == 0 &&
           G->ldb % vec == 0 && G->a_stride % vec == 0 && G->b_stride % vec == 0;
}

template <typename T, typename TC>
static void rows_launch(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *G, int bias, int aux) {
    const rows_args<T, TC> p = {G->counts, G->groups, G->m_max, G->n, G->k, G->b_groups, G->alpha, G->beta,
                                (const T *)G->a, G->lda, G->a_stride, (const T *)G->b, G->ldb, G->b_stride,
                                (TC *)G->c, G->ldc, G->c_stride, (int)G->epilogue, bias ? G->bias : NULL,
                                G->bias_stride, aux ? (TC *)G->aux : NULL, env->fault};
    const int cols = ROWS_WARPS * ROWS_COLS;
    dim3 grid((unsigned)((G->n + cols - 1) / cols), (unsigned)(G->groups < ROWS_MAX_GRID_Y ? G->groups : ROWS_MAX_GRID_Y));
    if (rows_vectorised(G, sizeof(T)))
        dsmoe_cu_launch(grouped_rows_kernel<T, TC, 16 / sizeof(T)>, grid, ROWS_WARPS * 32, 0, env->stream, p);
    else
        dsmoe_cu_launch(grouped_rows_kernel<T, TC, 1>, grid, ROWS_WARPS * 32, 0, env->stream, p);
}

extern "C" dsmoe_status dsmoe_cu_gemm_grouped_rows(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *G, int *taken) {
    *taken = 0;
    if (env->expert_rows_max <= 0 || G->m_max > env->expert_rows_max || G->groups < 2 || !G->trans_b || G->k <= 0 ||
        G->m_max <= 0 || G->n <= 0)
        return DSMOE_OK;
    *taken = 1;
    const int bias = G->epilogue == DSMOE_EPI_BIAS || G->epilogue == DSMOE_EPI_BIAS_GELU;
    const int aux = G->epilogue == DSMOE_EPI_BIAS_GELU || G->epilogue == DSMOE_EPI_DGELU;
    if (G->a_type == DSMOE_FLOAT32)
        rows_launch<float, float>(env, G, bias, aux);
    else if (G->c_type == DSMOE_FLOAT32)
        rows_launch<__nv_bfloat16, float>(env, G, bias, aux);
    else
        rows_launch<__nv_bfloat16, __nv_bfloat16>(env, G, bias, aux);
    return dsmoe_cu_check_launch(env, "gemm_grouped");
}
