// kernels/gemm.cu: the GEMM family of the cuda plugin (kernels/gemm.h) on cuBLAS.
// defines: dsmoe_cu_gemm, dsmoe_cu_gemm_grouped, dsmoe_cu_gemm_grouped_wgrad (gemm_lt.cu: the fused path)
//
// The reference is plugins/cpu/cpu_gemm.c: same checks, same formulas, same "=" / "+=" rules, same
// order of the weight-gradient sums over groups. Row-major operands (the ABI) go to column-major cuBLAS
// as the transposed product: C^T (n, m) = op(B)^T (n, k) @ op(A)^T (k, m), where a row-major matrix with
// leading dimension ld is the column-major transpose with the same ld, so no data moves.
//
// Grouped calls never read the device counts on the host (no synchronisation, no host loop over
// experts): the GEMMs run over m_max rows per group, and kernels that read the counts decide which rows
// count. Rows beyond a count may hold anything (NaN included); they only feed scratch rows that are never
// stored (gemm_grouped with a bfloat16 c here; with a float32 c, and in gemm_lt.cu, they are stored, which
// the ABI allows) or are replaced by zeros before the GEMM (wgrad). The price is that the GEMMs do
// m_max rows of work per group whatever the counts are (wasted when the experts are far from full; at
// few rows a group, gemm_rows.cu takes the call and reads only what the counts need).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh" // dsmoe_ld, dsmoe_st, dsmoe_cu_raise, DSMOE_CU_DISPATCH
#include "gemm.h"
#include "gemm_common.cuh" // gemm_dtype_bytes, gemm_cuda_type, gemm_compute_type, gemm_check_blas

// ---------------------------------------------------------------------------------------------------
// Host helpers: dtypes, cuBLAS status, scratch.

// cuBLAS batch counts above this go in several calls (the grid's y and z dimensions are 16-bit).
#define GEMM_MAX_BATCH 65535
// Grid bounds of the row kernels below (rows are visited with a grid-stride loop).
#define GEMM_MAX_ROW_BLOCKS 2048
#define GEMM_MAX_GRID_Y 65535

static int imax1(int v) { return v > 1 ? v : 1; }
static int imin(int a, int b) { return a < b ? a : b; }

// The operand types cuBLAS computes for us: all float32, or a/b bfloat16 with c float32 or bfloat16.
static dsmoe_status check_types(const dsmoe_cu_env *env, const char *op, const char *a_name, dsmoe_dtype a_type,
                                const char *b_name, dsmoe_dtype b_type, const char *c_name, dsmoe_dtype c_type) {
    const char *names[3] = {a_name, b_name, c_name};
    dsmoe_dtype types[3] = {a_type, b_type, c_type};
    for (int i = 0; i < 3; i++)
        if (names[i] && types[i] != DSMOE_FLOAT32 && types[i] != DSMOE_BFLOAT16)
            return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: %s %s is not supported (float32 or bfloat16)", op,
                                 names[i], dsmoe_dtype_name(types[i]));
    if (a_type != b_type)
        return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: %s %s with %s %s: the operands must have one dtype", op,
                             a_name, dsmoe_dtype_name(a_type), b_name, dsmoe_dtype_name(b_type));
    if (c_name && a_type == DSMOE_FLOAT32 && c_type != DSMOE_FLOAT32)
        return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: float32 operands with %s %s: expected float32", op,
                             c_name, dsmoe_dtype_name(c_type));
    return DSMOE_OK;
}


// Checks the shape arguments of a row-major GEMM: op(a) (m, k), op(b) (k, n), c (m, n). As cpu_gemm.c's.
static dsmoe_status check_dims(const dsmoe_cu_env *env, const char *op, int ta, int tb, int m, int n, int k, int lda,
                               int ldb, int ldc) {
    if (m < 0 || n < 0 || k < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: m=%d n=%d k=%d: expected sizes >= 0", op, m, n, k);
    int a_cols = ta ? m : k, b_cols = tb ? k : n;
    if (lda < imax1(a_cols))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: lda=%d < %d (a is stored (%s) = (%d, %d))", op, lda,
                             imax1(a_cols), ta ? "k, m" : "m, k", ta ? k : m, a_cols);
    if (ldb < imax1(b_cols))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: ldb=%d < %d (b is stored (%s) = (%d, %d))", op, ldb,
                             imax1(b_cols), tb ? "n, k" : "k, n", tb ? n : k, b_cols);
    if (ldc < imax1(n))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: ldc=%d < n=%d", op, ldc, imax1(n));
    return DSMOE_OK;
}

// Frees scratch (stream-ordered) and passes st on; an error of the free itself is reported only when
// everything else went well.
static dsmoe_status scratch_free(const dsmoe_cu_env *env, void *p, dsmoe_status st, const char *op) {
    if (!p)
        return st;
    cudaError_t e = cudaFreeAsync(p, env->stream);
    if (st != DSMOE_OK)
        return st;
    return dsmoe_cu_check(env, e, op);
}

// ---------------------------------------------------------------------------------------------------
// Device code: the small kernels (GELU is dsmoe_cu_gelu, cuda_common.cuh).

__device__ __forceinline__ bool count_ok(int c, int m_max) { return c >= 0 && c <= m_max; }

// Raises the fault for every count outside [0, m_max] (for calls that have no other kernel reading them).
__global__ void check_counts_kernel(const int32_t *counts, int groups, int m_max, dsmoe_cu_fault *fault) {
    for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += gridDim.x * blockDim.x)
        if (!count_ok(counts[g], m_max))
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_COUNT_RANGE, g, counts[g]);
}

static void launch_check_counts(const dsmoe_cu_env *env, const int32_t *counts, int groups, int m_max) {
    dsmoe_cu_launch(check_counts_kernel, dsmoe_cu_blocks((size_t)groups, 256), 256, 0, env->stream, counts, groups,
                    m_max, env->fault);
}

// c (m, n) = beta * c (c = 0 when beta == 0, as BLAS: c is not read): a GEMM with k == 0.
template <typename T>
__global__ void scale_rows_kernel(T *c, int m, int n, int ldc, float beta) {
    for (int i = blockIdx.x; i < m; i += gridDim.x)
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            size_t at = (size_t)i * ldc + j;
            dsmoe_st(c, at, beta == 0.0f ? 0.0f : beta * dsmoe_ld(c, at));
        }
}

// ---------------------------------------------------------------------------------------------------
// Plain GEMM.

extern "C" dsmoe_status dsmoe_cu_gemm(const dsmoe_cu_env *env, int trans_a, int trans_b, int m, int n, int k,
                                      float alpha, const void *a, dsmoe_dtype a_type, int lda, const void *b,
                                      dsmoe_dtype b_type, int ldb, float beta, void *c, dsmoe_dtype c_type, int ldc) {
    static const char op[] = "gemm";
    dsmoe_status st = check_types(env, op, "a_type", a_type, "b_type", b_type, "c_type", c_type);
    if (st != DSMOE_OK)
        return st;
    if ((st = check_dims(env, op, trans_a, trans_b, m, n, k, lda, ldb, ldc)) != DSMOE_OK)
        return st;
    if (m == 0 || n == 0)
        return DSMOE_OK;
    if (!c || (k > 0 && (!a || !b)))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL %s with m=%d n=%d k=%d", op, !c ? "c" : !a ? "a" : "b",
                             m, n, k);
    if (k == 0) { // no product: c = beta * c, done here (a and b may be NULL)
        if (beta == 1.0f)
            return DSMOE_OK;
        unsigned blocks = (unsigned)imin(m, GEMM_MAX_ROW_BLOCKS);
        DSMOE_CU_DISPATCH(c_type, T, {
            dsmoe_cu_launch(scale_rows_kernel<T>, blocks, 256, 0, env->stream, (T *)c, m, n, ldc, beta);
        });
        return dsmoe_cu_check_launch(env, op);
    }
    // Row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T: b first, then a.
    cublasStatus_t bs = cublasGemmEx((cublasHandle_t)env->cublas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                     trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b, gemm_cuda_type(b_type), ldb, a,
                                     gemm_cuda_type(a_type), lda, &beta, c, gemm_cuda_type(c_type), ldc,
                                     gemm_compute_type(env, a_type), CUBLAS_GEMM_DEFAULT);
    if ((st = gemm_check_blas(env, bs, op, "cublasGemmEx")) != DSMOE_OK)
        return st;
    return dsmoe_cu_check_launch(env, op);
}

// ---------------------------------------------------------------------------------------------------
// Grouped GEMM: acc (groups, m_max, n) float32 = alpha * a_g @ op(b_w) by cuBLAS over all m_max rows,
// then grouped_epilogue stores the rows below counts[g] into c (and aux). A float32 c is its own acc:
// cuBLAS writes alpha * a_g @ op(b_w) + beta * c into all m_max rows of c (the rows from the count on are
// unspecified by the ABI), and the epilogue then runs in place on the rows below the count; without an
// epilogue nothing is left to do but check the counts. A bfloat16 c keeps the float32 scratch, as it is
// rounded once, after the epilogue.

// Pointer arrays of a pointer-batched GEMM (groups sharing weights: w = g % b_groups), in column-major
// cuBLAS order: ptrs[0, G) = op(b_w) operands, ptrs[G, 2G) = a_g, ptrs[2G, 3G) = acc_g.
__global__ void grouped_pointers_kernel(const void **ptrs, int groups, const char *b, size_t b_stride_bytes,
                                        int b_groups, const char *a, size_t a_stride_bytes, float *acc,
                                        size_t acc_stride) {
    for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += gridDim.x * blockDim.x) {
        ptrs[g] = b + (size_t)(g % b_groups) * b_stride_bytes;
        ptrs[groups + g] = a + (size_t)g * a_stride_bytes;
        ptrs[2 * (size_t)groups + g] = acc + (size_t)g * acc_stride;
    }
}

// What the epilogue kernel needs (by value: the descriptor is host memory).
template <typename TC>
struct epilogue_args {
    const int32_t *counts;
    int groups, m_max, n, b_groups;
    float beta;
    const float *acc; // (groups, m_max, n) alpha * a_g op(b_w); NULL when k == 0 (no product) or in place
    int in_place;     // c (float32) already holds alpha * a_g op(b_w) + beta * c: only the epilogue is left
    TC *c;
    int ldc;
    size_t c_stride;
    int epi;
    const float *bias; // (b_groups, bias_stride) BIAS, BIAS_GELU
    size_t bias_stride;
    TC *aux; // like c: BIAS_GELU (written), DGELU (read)
    dsmoe_cu_fault *fault;
};

// Rows i < counts[g] of every group: c = acc + beta * c, then the epilogue, each as cpu_gemm.c's
// epilogue_tile computes it. Blocks walk rows (grid-stride over x), threads walk columns; groups on y.
// With bfloat16 c, BIAS_GELU takes GELU of the float32 pre-activation and stores that pre-activation's
// rounding in aux (what DGELU reads back), as the cpu plugin's epilogue does: c is rounded once.
template <typename TC>
__global__ void grouped_epilogue_kernel(epilogue_args<TC> p) {
    for (int g = blockIdx.y; g < p.groups; g += gridDim.y) {
        int cnt = p.counts[g];
        if (!count_ok(cnt, p.m_max)) {
            if (blockIdx.x == 0 && threadIdx.x == 0)
                dsmoe_cu_raise(p.fault, DSMOE_CU_FAULT_COUNT_RANGE, g, cnt);
            continue;
        }
        const float *bias = p.bias ? p.bias + (size_t)(g % p.b_groups) * p.bias_stride : NULL;
        for (int i = blockIdx.x; i < cnt; i += gridDim.x) {
            const float *acc = p.acc ? p.acc + ((size_t)g * p.m_max + i) * p.n : NULL;
            size_t row = (size_t)g * p.c_stride + (size_t)i * p.ldc;
            for (int j = threadIdx.x; j < p.n; j += blockDim.x) {
                float v = acc ? acc[j] : 0.0f;
                if (p.in_place)
                    v = dsmoe_ld(p.c, row + j);
                else if (p.beta != 0.0f) // BLAS: with beta == 0, c is not read (it may hold NaN)
                    v += p.beta * dsmoe_ld(p.c, row + j);
                if (p.epi == DSMOE_EPI_BIAS) {
                    v += bias[j];
                } else if (p.epi == DSMOE_EPI_BIAS_GELU) {
                    v += bias[j];
                    dsmoe_st(p.aux, row + j, v);
                    v = dsmoe_cu_gelu(v);
                } else if (p.epi == DSMOE_EPI_DGELU) {
                    v = dsmoe_cu_gelu_grad(dsmoe_ld(p.aux, row + j)) * v;
                }
                dsmoe_st(p.c, row + j, v);
            }
        }
    }
}

// acc_g (m_max, n; leading dimension ld, groups acc_stride apart) = alpha * a_g (m_max, k) @ op(b_w) +
// beta * acc_g for every group: one strided-batched call when every group has its own weight (b_groups >=
// groups), else one pointer-batched call (weights shared).
static dsmoe_status grouped_product(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *G, float *acc, int ld,
                                    size_t acc_stride, float beta, void **ptrs) {
    static const char op[] = "gemm_grouped";
    cublasHandle_t h = (cublasHandle_t)env->cublas;
    const int groups = G->groups, m_max = G->m_max, n = G->n, k = G->k;
    const cublasOperation_t opb = G->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cudaDataType ab = gemm_cuda_type(G->a_type);
    const cublasComputeType_t ct = gemm_compute_type(env, G->a_type);
    const size_t es = gemm_dtype_bytes(G->a_type);
    dsmoe_status st;
    if (G->b_groups >= groups) {
        for (int g0 = 0; g0 < groups; g0 += GEMM_MAX_BATCH) {
            int batch = imin(GEMM_MAX_BATCH, groups - g0);
            cublasStatus_t bs = cublasGemmStridedBatchedEx(
                h, opb, CUBLAS_OP_N, n, m_max, k, &G->alpha, (const char *)G->b + g0 * G->b_stride * es, ab, G->ldb,
                (long long)G->b_stride, (const char *)G->a + g0 * G->a_stride * es, ab, G->lda, (long long)G->a_stride,
                &beta, acc + g0 * acc_stride, CUDA_R_32F, ld, (long long)acc_stride, batch, ct, CUBLAS_GEMM_DEFAULT);
            if ((st = gemm_check_blas(env, bs, op, "cublasGemmStridedBatchedEx")) != DSMOE_OK)
                return st;
        }
        return DSMOE_OK;
    }
    size_t bytes = 3 * (size_t)groups * sizeof(void *);
    if ((st = dsmoe_cu_scratch(env, ptrs, bytes, op)) != DSMOE_OK)
        return st;
    const void **p = (const void **)*ptrs;
    dsmoe_cu_launch(grouped_pointers_kernel, dsmoe_cu_blocks((size_t)groups, 256), 256, 0, env->stream, p, groups,
                    (const char *)G->b, G->b_stride * es, G->b_groups, (const char *)G->a, G->a_stride * es, acc,
                    acc_stride);
    if ((st = dsmoe_cu_check_launch(env, op)) != DSMOE_OK)
        return st;
    for (int g0 = 0; g0 < groups; g0 += GEMM_MAX_BATCH) {
        int batch = imin(GEMM_MAX_BATCH, groups - g0);
        cublasStatus_t bs = cublasGemmBatchedEx(h, opb, CUBLAS_OP_N, n, m_max, k, &G->alpha, p + g0, ab, G->ldb,
                                                p + groups + g0, ab, G->lda, &beta, (void *const *)(p + 2 * groups + g0),
                                                CUDA_R_32F, ld, batch, ct, CUBLAS_GEMM_DEFAULT);
        if ((st = gemm_check_blas(env, bs, op, "cublasGemmBatchedEx")) != DSMOE_OK)
            return st;
    }
    return DSMOE_OK;
}

extern "C" dsmoe_status dsmoe_cu_gemm_grouped(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *G) {
    static const char op[] = "gemm_grouped";
    if (!G)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL descriptor", op);
    dsmoe_status st = check_types(env, op, "a_type", G->a_type, "b_type", G->b_type, "c_type", G->c_type);
    if (st != DSMOE_OK)
        return st;
    const int groups = G->groups, m_max = G->m_max, n = G->n, k = G->k;
    if (groups < 0 || m_max < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: groups=%d m_max=%d: expected >= 0", op, groups, m_max);
    if (G->epilogue < DSMOE_EPI_NONE || G->epilogue > DSMOE_EPI_DGELU)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID,
                             "%s: epilogue %d: expected 0 (none), 1 (bias), 2 (bias + GELU) or 3 (GELU backward)", op,
                             (int)G->epilogue);
    if (groups == 0)
        return DSMOE_OK;
    if (G->b_groups < 1)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: b_groups=%d: expected >= 1", op, G->b_groups);
    if ((st = check_dims(env, op, 0, G->trans_b, m_max, n, k, G->lda, G->ldb, G->ldc)) != DSMOE_OK)
        return st;
    if (!G->counts)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL counts with groups=%d", op, groups);
    const int work = m_max > 0 && n > 0;
    if (work && (!G->c || (k > 0 && (!G->a || !G->b))))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL a, b or c with m_max=%d n=%d k=%d", op, m_max, n, k);
    const int bias = G->epilogue == DSMOE_EPI_BIAS || G->epilogue == DSMOE_EPI_BIAS_GELU;
    const int aux = G->epilogue == DSMOE_EPI_BIAS_GELU || G->epilogue == DSMOE_EPI_DGELU;
    if (work && bias && !G->bias)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: epilogue %d needs bias", op, (int)G->epilogue);
    if (work && aux && !G->aux)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: epilogue %d needs aux", op, (int)G->epilogue);
    if (groups > 1 && work && G->c_stride < (size_t)(m_max - 1) * G->ldc + n)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: c_stride=%zu < (m_max-1)*ldc+n = %zu: groups would overlap",
                             op, G->c_stride, (size_t)(m_max - 1) * G->ldc + n);
    if (!work) { // nothing to compute, but a bad count is still the sticky error
        launch_check_counts(env, G->counts, groups, m_max);
        return dsmoe_cu_check_launch(env, op);
    }
    int taken = 0;
    if ((st = dsmoe_cu_gemm_grouped_rows(env, G, &taken)) != DSMOE_OK || taken)
        return st;
    if (env->fused_epilogues) { // rows up to m_max written: the counts are only checked
        if ((st = dsmoe_cu_gemm_grouped_lt(env, G, &taken)) != DSMOE_OK)
            return st;
        if (taken) {
            launch_check_counts(env, G->counts, groups, m_max);
            return dsmoe_cu_check_launch(env, op);
        }
    }

    // (groups, m_max, n) float32 products; with k == 0 there is none (c = beta * c, then the epilogue).
    float *acc = NULL;
    void *ptrs = NULL;
    const int in_place = k > 0 && G->c_type == DSMOE_FLOAT32;
    if (in_place) {
        st = grouped_product(env, G, (float *)G->c, G->ldc, G->c_stride, G->beta, &ptrs);
        st = scratch_free(env, ptrs, st, op);
        if (st == DSMOE_OK && G->epilogue == DSMOE_EPI_NONE) {
            launch_check_counts(env, G->counts, groups, m_max);
            return dsmoe_cu_check_launch(env, op);
        }
    } else if (k > 0) {
        if ((st = dsmoe_cu_scratch(env, (void **)&acc, (size_t)groups * m_max * n * sizeof(float), op)) != DSMOE_OK)
            return st;
        st = grouped_product(env, G, acc, n, (size_t)m_max * n, 0.0f, &ptrs);
        st = scratch_free(env, ptrs, st, op);
    }
    if (st == DSMOE_OK) {
        unsigned threads = n <= 128 ? 128 : 256;
        dim3 grid((unsigned)imin(m_max, GEMM_MAX_ROW_BLOCKS), (unsigned)imin(groups, GEMM_MAX_GRID_Y));
        DSMOE_CU_DISPATCH(G->c_type, TC, {
            epilogue_args<TC> p = {G->counts, groups, m_max, n, G->b_groups, G->beta, acc, in_place, (TC *)G->c,
                                   G->ldc, G->c_stride, (int)G->epilogue, bias ? G->bias : NULL, G->bias_stride,
                                   aux ? (TC *)G->aux : NULL, env->fault};
            dsmoe_cu_launch(grouped_epilogue_kernel<TC>, grid, threads, 0, env->stream, p);
        });
        st = dsmoe_cu_check_launch(env, op);
    }
    return scratch_free(env, acc, st, op);
}

// ---------------------------------------------------------------------------------------------------
// Grouped weight gradients. Round r holds groups r*B .. r*B+W_r-1 (B = b_groups), group r*B + w
// belonging to weight w: their dy and x rows are copied into zero-padded scratch, then one
// strided-batched GEMM over the W_r weights adds alpha * dy^T x into dw (beta = 1). Rounds go in
// ascending r, so each weight receives its groups in ascending g, the cpu plugin's order.

// Copies rows i < counts[g] of dy_g (m_max, n) and x_g (m_max, k) into slot w = g - g0 of the scratch,
// zeros in rows i >= counts[g] of BOTH (garbage there may be NaN, and 0 * NaN = NaN). A bad count
// copies no row (the fault is raised by check_counts_kernel).
template <typename T>
__global__ void wgrad_mask_kernel(const int32_t *counts, int g0, int W, int m_max, int n, int k, const T *dy,
                                  size_t dy_stride, const T *x, size_t x_stride, T *dy_s, T *x_s) {
    const T zero = T(0.0f);
    for (int w = blockIdx.y; w < W; w += gridDim.y) {
        int g = g0 + w, cnt = counts[g];
        if (!count_ok(cnt, m_max))
            cnt = 0;
        for (int i = blockIdx.x; i < m_max; i += gridDim.x) {
            T *dst_dy = dy_s + ((size_t)w * m_max + i) * n, *dst_x = x_s + ((size_t)w * m_max + i) * k;
            const T *src_dy = dy + (size_t)g * dy_stride + (size_t)i * n, *src_x = x + (size_t)g * x_stride + (size_t)i * k;
            bool keep = i < cnt;
            for (int j = threadIdx.x; j < n; j += blockDim.x)
                dst_dy[j] = keep ? src_dy[j] : zero;
            for (int j = threadIdx.x; j < k; j += blockDim.x)
                dst_x[j] = keep ? src_x[j] : zero;
        }
    }
}

// dbias_w[j] += for each group g of weight w in ascending g: the sum of dy_g[i][j] over rows i <
// counts[g] in ascending i, summed into a zeroed float32 first (cpu_bias_chunk's order). One thread per
// (weight, column): no atomics, a fixed order.
template <typename T>
__global__ void wgrad_dbias_kernel(const int32_t *counts, int groups, int m_max, int n, int b_groups, int W,
                                   const T *dy, size_t dy_stride, float *dbias, size_t dbias_stride) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n)
        return;
    for (int w = blockIdx.y; w < W; w += gridDim.y) {
        float db = dbias[(size_t)w * dbias_stride + j];
        for (int g = w; g < groups; g += b_groups) {
            int cnt = counts[g];
            if (!count_ok(cnt, m_max))
                continue;
            const T *col = dy + (size_t)g * dy_stride + j;
            float s = 0.0f;
#pragma unroll 8
            for (int i = 0; i < cnt; i++)
                s += dsmoe_ld(col, (size_t)i * n);
            db += s;
        }
        dbias[(size_t)w * dbias_stride + j] = db;
    }
}

static size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }

// dw for every round: scratch holds min(B, groups) slots of dy (m_max, n) then x (m_max, k).
static dsmoe_status wgrad_weights(const dsmoe_cu_env *env, const dsmoe_grouped_wgrad *G, void *scratch, size_t x_off) {
    static const char op[] = "gemm_grouped_wgrad";
    const int groups = G->groups, m_max = G->m_max, n = G->n, k = G->k, B = G->b_groups;
    const cudaDataType ab = gemm_cuda_type(G->dy_type);
    const cublasComputeType_t ct = gemm_compute_type(env, G->dy_type);
    const float beta = 1.0f;
    dsmoe_status st;
    for (int g0 = 0; g0 < groups; g0 += B) {
        const int W = imin(B, groups - g0);
        dim3 grid((unsigned)imin(m_max, GEMM_MAX_ROW_BLOCKS), (unsigned)imin(W, GEMM_MAX_GRID_Y));
        DSMOE_CU_DISPATCH(G->dy_type, T, {
            T *dy_s = (T *)scratch, *x_s = (T *)((char *)scratch + x_off);
            dsmoe_cu_launch(wgrad_mask_kernel<T>, grid, 256, 0, env->stream, G->counts, g0, W, m_max, n, k,
                            (const T *)G->dy, G->dy_stride, (const T *)G->x, G->x_stride, dy_s, x_s);
        });
        if ((st = dsmoe_cu_check_launch(env, op)) != DSMOE_OK)
            return st;
        // Row-major dw_w (n, k) += alpha dy^T x is column-major dw_w^T (k, n) += x^T (k, m_max) @ dy (m_max, n):
        // the scratch x slot read as-is (k, m_max; ld k), the dy slot transposed ((n, m_max); ld n).
        const size_t es = gemm_dtype_bytes(G->dy_type);
        for (int w0 = 0; w0 < W; w0 += GEMM_MAX_BATCH) {
            int batch = imin(GEMM_MAX_BATCH, W - w0);
            const char *x_s = (const char *)scratch + x_off + (size_t)w0 * m_max * k * es;
            const char *dy_s = (const char *)scratch + (size_t)w0 * m_max * n * es;
            cublasStatus_t bs = cublasGemmStridedBatchedEx(
                (cublasHandle_t)env->cublas, CUBLAS_OP_N, CUBLAS_OP_T, k, n, m_max, &G->alpha, x_s, ab, k,
                (long long)m_max * k, dy_s, ab, n, (long long)m_max * n, &beta, G->dw + (size_t)w0 * G->dw_stride,
                CUDA_R_32F, k, (long long)G->dw_stride, batch, ct, CUBLAS_GEMM_DEFAULT);
            if ((st = gemm_check_blas(env, bs, op, "cublasGemmStridedBatchedEx")) != DSMOE_OK)
                return st;
        }
    }
    return DSMOE_OK;
}

extern "C" dsmoe_status dsmoe_cu_gemm_grouped_wgrad(const dsmoe_cu_env *env, const dsmoe_grouped_wgrad *G) {
    static const char op[] = "gemm_grouped_wgrad";
    if (!G)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL descriptor", op);
    dsmoe_status st = check_types(env, op, "dy_type", G->dy_type, "x_type", G->x_type, NULL, DSMOE_FLOAT32);
    if (st != DSMOE_OK)
        return st;
    const int groups = G->groups, m_max = G->m_max, n = G->n, k = G->k, B = G->b_groups;
    if (groups < 0 || n < 0 || k < 0 || m_max < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: groups=%d m_max=%d n=%d k=%d: expected >= 0", op, groups,
                             m_max, n, k);
    if (groups == 0)
        return DSMOE_OK;
    if (B < 1)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: b_groups=%d: expected >= 1", op, B);
    if (!G->counts)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL counts with groups=%d", op, groups);
    const int work = m_max > 0 && n > 0;
    if (work && (!G->dy || (k > 0 && (!G->x || !G->dw))))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL dy, x or dw with m_max=%d n=%d k=%d", op, m_max, n, k);
    const int W = imin(B, groups); // weights that receive a group
    // The batched GEMM writes the W weights at once: they must not overlap.
    if (work && k > 0 && W > 1 && G->dw_stride < (size_t)n * k)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: dw_stride=%zu < n*k = %zu: weights would overlap", op,
                             G->dw_stride, (size_t)n * k);
    if (work && G->dbias && W > 1 && G->dbias_stride < (size_t)n)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: dbias_stride=%zu < n=%d: weights would overlap", op,
                             G->dbias_stride, n);
    launch_check_counts(env, G->counts, groups, m_max);
    if ((st = dsmoe_cu_check_launch(env, op)) != DSMOE_OK || !work)
        return st;

    if (k > 0) {
        const size_t es = gemm_dtype_bytes(G->dy_type);
        const size_t x_off = round_up((size_t)W * m_max * n * es, 256); // x slots start 256-byte aligned
        void *scratch = NULL;
        if ((st = dsmoe_cu_scratch(env, &scratch, x_off + (size_t)W * m_max * k * es, op)) != DSMOE_OK)
            return st;
        st = scratch_free(env, scratch, wgrad_weights(env, G, scratch, x_off), op);
        if (st != DSMOE_OK)
            return st;
    }
    if (G->dbias) {
        dim3 grid(dsmoe_cu_blocks((size_t)n, 128), (unsigned)imin(W, GEMM_MAX_GRID_Y));
        DSMOE_CU_DISPATCH(G->dy_type, T, {
            dsmoe_cu_launch(wgrad_dbias_kernel<T>, grid, 128, 0, env->stream, G->counts, groups, m_max, n, B, W,
                            (const T *)G->dy, G->dy_stride, G->dbias, G->dbias_stride);
        });
    }
    return dsmoe_cu_check_launch(env, op);
}
