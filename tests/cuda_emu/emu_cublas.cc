// tests/cuda_emu/emu_cublas.cc: a CPU stand-in for the part of cuBLAS the cuda plugin uses, for tests only.
//
// The plugin (plugins/cuda/*.c, kernels/*.cu) is built with the host compiler and linked against this file
// instead of libcublas, so that it runs without a GPU. Assumed: "device memory" is host memory (matrices and
// the pointer arrays of cublasGemmBatchedEx are read directly); a GEMM is checked at the call and computed
// in the handle's stream's order (emu_streams.h: deferred on a created stream), the workspace only recorded;
// alpha and beta are host floats whatever the pointer mode, read at the call; a handle is used by one thread
// at a time.
//
// GEMMs as cuBLAS documents them: column-major, C = alpha op(A) op(B) + beta C. Each element accumulates in
// float32 over k in increasing order, then alpha * acc + beta * c in float32 is stored (bfloat16 rounded to
// nearest even). With beta == 0, C is not read (NaN left in C does not leak); with k == 0 or alpha == 0,
// A and B are not read and C becomes beta * C (as reference BLAS). Float inputs are rounded to TF32
// (10 mantissa bits, nearest even) for CUBLAS_COMPUTE_32F_FAST_TF32, and for CUBLAS_COMPUTE_32F under
// CUBLAS_TF32_TENSOR_OP_MATH, as tensor cores would; to bfloat16 for _FAST_16BF. Types: A, B, C all CUDA_R_32F, or A, B CUDA_R_16BF with C
// CUDA_R_16BF or CUDA_R_32F; other types, and compute types but CUBLAS_COMPUTE_32F{,_PEDANTIC,_FAST_TF32,
// _FAST_16BF}, give CUBLAS_STATUS_NOT_SUPPORTED. The summation order is not a GPU's, so results match cuBLAS
// to rounding, not bitwise; whether multiply-adds are fused follows the compiler flags (-ffp-contract, -march).
// No C++ runtime is used (no exceptions, operator new or containers): C test programs link it without libstdc++.
//
// Test hook: DSMOE_EMU_FAIL_CUBLAS_CREATE=1 in the environment makes cublasCreate fail with
// CUBLAS_STATUS_ALLOC_FAILED (as on a device out of memory), to exercise the plugin's error path.
#include <cublas_v2.h>

#include "emu_runtime.h" // dsmoe_emu_set_last_error
#include "emu_streams.h" // dsmoe_emu_enqueue

#include <cstdint>
#include <cstdlib>
#include <cstring>

struct cublasContext {
    cudaStream_t stream;
    cublasMath_t math;
    void *workspace;
    size_t workspace_bytes;
};

namespace {

float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) // NaN: keep the sign and high payload, force quiet (never inf)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// Rounds f to nearest even with the low `drop` mantissa bits cleared (13: TF32, 16: bfloat16); inf and NaN
// are left alone (clearing a NaN's low bits could make it inf).
float round_mantissa(float f, int drop) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u)
        return f;
    u += ((1u << (drop - 1)) - 1u) + ((u >> drop) & 1u);
    u &= ~((1u << drop) - 1u);
    std::memcpy(&f, &u, sizeof f);
    return f;
}

float load(const float *p, size_t i) { return p[i]; }
float load(const uint16_t *p, size_t i) { return bf16_to_float(p[i]); }
void store(float *p, size_t i, float v) { p[i] = v; }
void store(uint16_t *p, size_t i, float v) { p[i] = float_to_bf16(v); }

// Register tile of the product: MR rows of op(A) by NR columns of op(B). 8 x 4 floats keeps the
// accumulators, an A slice and a broadcast B value within the 16 SSE registers of baseline x86-64.
constexpr int MR = 8, NR = 4;
typedef float vmr __attribute__((vector_size(MR * sizeof(float))));

// Copies the logical matrix X (R x K, element (r, p) at src[r + p*ld] when r_contig, else at src[p + r*ld])
// into float panels of W rows, p-major within a panel: dst[(r / W * K + p) * W + r % W], so that the tile
// loop reads both operands contiguously. Rows past R are zero; drop > 0 rounds as round_mantissa.
template <typename T>
void pack(const T *src, int ld, int R, int K, bool r_contig, int W, int drop, float *dst) {
    const size_t panels = ((size_t)R + W - 1) / W;
    if (r_contig) {
        for (int p = 0; p < K; p++) {
            const T *col = src + (size_t)p * ld;
            for (int r = 0; r < R; r++)
                dst[((size_t)(r / W) * K + p) * W + r % W] = load(col, (size_t)r);
        }
    } else {
        for (int r = 0; r < R; r++) {
            const T *row = src + (size_t)r * ld;
            float *d = dst + (size_t)(r / W) * K * W + r % W;
            for (int p = 0; p < K; p++)
                d[(size_t)p * W] = load(row, (size_t)p);
        }
    }
    for (int r = R; r < (int)(panels * W); r++)
        for (int p = 0; p < K; p++)
            dst[((size_t)(r / W) * K + p) * W + r % W] = 0.0f;
    if (drop > 0)
        for (size_t i = 0, e = panels * W * K; i < e; i++)
            dst[i] = round_mantissa(dst[i], drop);
}

void pack_any(const void *src, cudaDataType t, int ld, int R, int K, bool r_contig, int W, int drop, float *dst) {
    if (t == CUDA_R_16BF)
        pack((const uint16_t *)src, ld, R, K, r_contig, W, drop, dst);
    else
        pack((const float *)src, ld, R, K, r_contig, W, drop, dst);
}

// acc[c][r] = sum over p in increasing order of a[p][r] * b[p][c]. The vector type makes the element-wise
// multiply-adds explicit: each lane is the scalar sum in the same order, so -O2 suffices to vectorise.
void tile(int k, const float *a, const float *b, float acc[NR][MR]) {
    vmr c0 = {}, c1 = {}, c2 = {}, c3 = {};
    for (int p = 0; p < k; p++) {
        vmr av;
        std::memcpy(&av, a + (size_t)p * MR, sizeof av);
        const float *bp = b + (size_t)p * NR;
        c0 += av * bp[0];
        c1 += av * bp[1];
        c2 += av * bp[2];
        c3 += av * bp[3];
    }
    std::memcpy(acc[0], &c0, sizeof c0);
    std::memcpy(acc[1], &c1, sizeof c1);
    std::memcpy(acc[2], &c2, sizeof c2);
    std::memcpy(acc[3], &c3, sizeof c3);
}

// One GEMM's arguments once checked.
struct Gemm {
    bool ta, tb; // op(A), op(B) transposed
    int m, n, k, lda, ldb, ldc;
    float alpha, beta;
    cudaDataType at, bt, ct;
    int drop; // input rounding (round_mantissa), 0 for none
};

size_t type_bytes(cudaDataType t) { return t == CUDA_R_16BF ? 2 : 4; }
bool has_product(const Gemm &g) { return g.k > 0 && g.alpha != 0.0f; }

// ap and bp hold the packed operands: (m rounded up to MR) * k and (n rounded up to NR) * k floats.
template <typename TC>
void gemm_into(const Gemm &g, const void *A, const void *B, TC *C, float *ap, float *bp) {
    if (!has_product(g)) { // no product: C = beta * C, C unread when beta == 0
        if (g.beta == 1.0f)
            return;
        for (int j = 0; j < g.n; j++)
            for (int i = 0; i < g.m; i++) {
                size_t at = (size_t)j * g.ldc + i;
                store(C, at, g.beta == 0.0f ? 0.0f : g.beta * load(C, at));
            }
        return;
    }
    // op(A) (m x k): element (i, p) is A[i + p*lda] (N) or A[p + i*lda] (T); op(B)^T (n x k): element (j, p)
    // is B[p + j*ldb] (N) or B[j + p*ldb] (T).
    const int mp = (g.m + MR - 1) / MR, np = (g.n + NR - 1) / NR;
    pack_any(A, g.at, g.lda, g.m, g.k, !g.ta, MR, g.drop, ap);
    pack_any(B, g.bt, g.ldb, g.n, g.k, g.tb, NR, g.drop, bp);
    float acc[NR][MR];
    for (int jb = 0; jb < np; jb++) {
        const int j0 = jb * NR, nc = g.n - j0 < NR ? g.n - j0 : NR;
        for (int ib = 0; ib < mp; ib++) {
            const int i0 = ib * MR, nr = g.m - i0 < MR ? g.m - i0 : MR;
            tile(g.k, ap + (size_t)ib * g.k * MR, bp + (size_t)jb * g.k * NR, acc);
            for (int c = 0; c < nc; c++) {
                size_t at = (size_t)(j0 + c) * g.ldc + i0;
                for (int r = 0; r < nr; r++) {
                    float v = g.alpha * acc[c][r];
                    if (g.beta != 0.0f)
                        v += g.beta * load(C, at + r);
                    store(C, at + r, v);
                }
            }
        }
    }
}

// Runs batch GEMMs of one shape, operands(b, &A, &B, &C) giving batch b's matrices; the packing buffers are
// shared by the batches. A and B are asked for only when there is a product (they may be NULL otherwise).
template <typename Operands>
cublasStatus_t run(const Gemm &g, int batch, Operands operands) {
    if (g.m == 0 || g.n == 0 || batch == 0)
        return CUBLAS_STATUS_SUCCESS;
    float *ap = nullptr, *bp = nullptr;
    if (has_product(g)) {
        ap = (float *)std::malloc(((size_t)g.m + MR - 1) / MR * MR * g.k * sizeof(float));
        bp = (float *)std::malloc(((size_t)g.n + NR - 1) / NR * NR * g.k * sizeof(float));
        if (!ap || !bp) {
            std::free(ap);
            std::free(bp);
            return CUBLAS_STATUS_ALLOC_FAILED;
        }
    }
    for (int b = 0; b < batch; b++) {
        const void *A = nullptr, *B = nullptr;
        void *C = nullptr;
        operands(b, &A, &B, &C);
        if (g.ct == CUDA_R_16BF)
            gemm_into(g, A, B, (uint16_t *)C, ap, bp);
        else
            gemm_into(g, A, B, (float *)C, ap, bp);
    }
    std::free(ap);
    std::free(bp);
    return CUBLAS_STATUS_SUCCESS;
}

// A GEMM call as queued on the handle's stream: strided (arrays NULL) or batched (its pointer arrays, in
// device memory, read when it runs).
struct Job {
    Gemm g;
    int batch;
    const void *A, *B;
    void *C;
    long long sa, sb, sc; // strides in bytes
    const void *const *Aarray, *const *Barray;
    void *const *Carray;
};

void job_run(void *arg) {
    const Job *j = (const Job *)arg;
    const bool product = has_product(j->g); // else A and B may be NULL: no offsets formed from them
    cublasStatus_t st = run(j->g, j->batch, [j, product](int b, const void **a, const void **bb, void **c) {
        if (j->Carray) {
            if (product) {
                *a = j->Aarray[b];
                *bb = j->Barray[b];
            }
            *c = j->Carray[b];
            return;
        }
        if (product) {
            *a = (const char *)j->A + b * j->sa;
            *bb = (const char *)j->B + b * j->sb;
        }
        *c = (char *)j->C + b * j->sc;
    });
    if (st != CUBLAS_STATUS_SUCCESS) // the packing buffers: out of host memory while the stream ran
        dsmoe_emu_set_last_error(cudaErrorMemoryAllocation);
    std::free(arg);
}

cublasStatus_t enqueue(cublasHandle_t h, const Job &job) {
    Job *j = (Job *)std::malloc(sizeof *j);
    if (!j)
        return CUBLAS_STATUS_ALLOC_FAILED;
    *j = job;
    dsmoe_emu_enqueue(h->stream, job_run, j);
    return CUBLAS_STATUS_SUCCESS;
}

bool valid_op(cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }
int max1(int v) { return v > 1 ? v : 1; }

// cuBLAS's argument checks, in its order: handle, values, then what is supported.
cublasStatus_t check(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                     const void *alpha, cudaDataType at, int lda, cudaDataType bt, int ldb, const void *beta,
                     cudaDataType ct, int ldc, int batch, cublasComputeType_t compute, Gemm *g) {
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!valid_op(ta) || !valid_op(tb) || m < 0 || n < 0 || k < 0 || batch < 0 || !alpha || !beta)
        return CUBLAS_STATUS_INVALID_VALUE;
    const bool ta_t = ta != CUBLAS_OP_N, tb_t = tb != CUBLAS_OP_N; // C is T for real types
    if (lda < max1(ta_t ? k : m) || ldb < max1(tb_t ? n : k) || ldc < max1(m))
        return CUBLAS_STATUS_INVALID_VALUE;
    const bool f32 = at == CUDA_R_32F && bt == CUDA_R_32F && ct == CUDA_R_32F;
    const bool bf16 = at == CUDA_R_16BF && bt == CUDA_R_16BF && (ct == CUDA_R_16BF || ct == CUDA_R_32F);
    int drop;
    switch (compute) {
    case CUBLAS_COMPUTE_32F:
        drop = f32 && (h->math & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH ? 13 : 0;
        break;
    case CUBLAS_COMPUTE_32F_PEDANTIC:
        drop = 0;
        break;
    case CUBLAS_COMPUTE_32F_FAST_TF32:
        drop = 13;
        break;
    case CUBLAS_COMPUTE_32F_FAST_16BF:
        drop = 16;
        break;
    default:
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (!(f32 || (bf16 && (compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC))))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    *g = Gemm{ta_t, tb_t, m, n, k, lda, ldb, ldc, *(const float *)alpha, *(const float *)beta, at, bt, ct, drop};
    return CUBLAS_STATUS_SUCCESS;
}

struct status_text {
    cublasStatus_t status;
    const char *name, *text;
};

const status_text statuses[] = {
    {CUBLAS_STATUS_SUCCESS, "CUBLAS_STATUS_SUCCESS", "the operation completed successfully"},
    {CUBLAS_STATUS_NOT_INITIALIZED, "CUBLAS_STATUS_NOT_INITIALIZED", "the library was not initialized"},
    {CUBLAS_STATUS_ALLOC_FAILED, "CUBLAS_STATUS_ALLOC_FAILED", "the resource allocation failed"},
    {CUBLAS_STATUS_INVALID_VALUE, "CUBLAS_STATUS_INVALID_VALUE", "an invalid numeric value was used as an argument"},
    {CUBLAS_STATUS_ARCH_MISMATCH, "CUBLAS_STATUS_ARCH_MISMATCH", "an absent device architectural feature is required"},
    {CUBLAS_STATUS_MAPPING_ERROR, "CUBLAS_STATUS_MAPPING_ERROR", "an access to GPU memory space failed"},
    {CUBLAS_STATUS_EXECUTION_FAILED, "CUBLAS_STATUS_EXECUTION_FAILED", "the GPU program failed to execute"},
    {CUBLAS_STATUS_INTERNAL_ERROR, "CUBLAS_STATUS_INTERNAL_ERROR", "an internal operation failed"},
    {CUBLAS_STATUS_NOT_SUPPORTED, "CUBLAS_STATUS_NOT_SUPPORTED", "the functionality requested is not supported"},
    {CUBLAS_STATUS_LICENSE_ERROR, "CUBLAS_STATUS_LICENSE_ERROR", "an error was detected when checking the license"},
};

const status_text *find_status(cublasStatus_t s) {
    for (const status_text &t : statuses)
        if (t.status == s)
            return &t;
    return nullptr;
}

} // namespace

extern "C" {

cublasStatus_t cublasCreate(cublasHandle_t *handle) {
    if (!handle)
        return CUBLAS_STATUS_INVALID_VALUE;
    const char *fail = std::getenv("DSMOE_EMU_FAIL_CUBLAS_CREATE");
    cublasHandle_t h = fail && std::strcmp(fail, "1") == 0 ? nullptr : (cublasHandle_t)std::malloc(sizeof *h);
    if (!h)
        return CUBLAS_STATUS_ALLOC_FAILED;
    *h = cublasContext{nullptr, CUBLAS_DEFAULT_MATH, nullptr, 0};
    *handle = h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    std::free(handle);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetVersion(cublasHandle_t, int *version) {
    if (!version)
        return CUBLAS_STATUS_INVALID_VALUE;
    *version = 130100;
    return CUBLAS_STATUS_SUCCESS;
}

// As cuBLAS: a new stream drops the user workspace (back to the library's default pool).
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    handle->workspace = nullptr;
    handle->workspace_bytes = 0;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t *stream) {
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!stream)
        return CUBLAS_STATUS_INVALID_VALUE;
    *stream = handle->stream;
    return CUBLAS_STATUS_SUCCESS;
}

// cuBLAS requires a 256-byte aligned workspace (cudaMalloc's alignment); checked so that a misaligned one
// fails here as it would on a GPU.
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void *workspace, size_t bytes) {
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if ((uintptr_t)workspace % 256 != 0)
        return CUBLAS_STATUS_INVALID_VALUE;
    handle->workspace = workspace;
    handle->workspace_bytes = bytes;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    const unsigned base = (unsigned)mode & 0xfu, flags = (unsigned)mode & ~0xfu;
    const bool known_base =
        base <= (unsigned)CUBLAS_FP32_EMULATED_BF16X9_MATH || base == (unsigned)CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH;
    if (!known_base || (flags & ~(unsigned)CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION))
        return CUBLAS_STATUS_INVALID_VALUE;
    handle->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t *mode) {
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode)
        return CUBLAS_STATUS_INVALID_VALUE;
    *mode = handle->math;
    return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusName(cublasStatus_t status) {
    const status_text *t = find_status(status);
    return t ? t->name : "<unknown>";
}

const char *cublasGetStatusString(cublasStatus_t status) {
    const status_text *t = find_status(status);
    return t ? t->text : "unknown error";
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void *alpha, const void *A, cudaDataType Atype,
                                          int lda, long long int strideA, const void *B, cudaDataType Btype, int ldb,
                                          long long int strideB, const void *beta, void *C, cudaDataType Ctype,
                                          int ldc, long long int strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t) {
    Gemm g;
    cublasStatus_t st = check(handle, transa, transb, m, n, k, alpha, Atype, lda, Btype, ldb, beta, Ctype, ldc,
                              batchCount, computeType, &g);
    if (st != CUBLAS_STATUS_SUCCESS)
        return st;
    if (g.m == 0 || g.n == 0 || batchCount == 0)
        return CUBLAS_STATUS_SUCCESS;
    const long long ea = (long long)type_bytes(Atype), eb = (long long)type_bytes(Btype);
    const long long ec = (long long)type_bytes(Ctype);
    return enqueue(handle, Job{g, batchCount, A, B, C, strideA * ea, strideB * eb, strideC * ec, nullptr, nullptr,
                               nullptr});
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void *alpha, const void *A, cudaDataType Atype, int lda, const void *B,
                            cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    return cublasGemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0, beta,
                                      C, Ctype, ldc, 0, 1, computeType, algo);
}

cublasStatus_t cublasGemmBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                                   int n, int k, const void *alpha, const void *const Aarray[], cudaDataType Atype,
                                   int lda, const void *const Barray[], cudaDataType Btype, int ldb,
                                   const void *beta, void *const Carray[], cudaDataType Ctype, int ldc,
                                   int batchCount, cublasComputeType_t computeType, cublasGemmAlgo_t) {
    Gemm g;
    cublasStatus_t st = check(handle, transa, transb, m, n, k, alpha, Atype, lda, Btype, ldb, beta, Ctype, ldc,
                              batchCount, computeType, &g);
    if (st != CUBLAS_STATUS_SUCCESS)
        return st;
    if (g.m == 0 || g.n == 0 || batchCount == 0)
        return CUBLAS_STATUS_SUCCESS;
    if (!Carray)
        return CUBLAS_STATUS_INVALID_VALUE;
    return enqueue(handle, Job{g, batchCount, nullptr, nullptr, nullptr, 0, 0, 0, Aarray, Barray, Carray});
}

cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                           int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                           const float *beta, float *C, int ldc) {
    return cublasGemmEx(handle, transa, transb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C,
                        CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

} // extern "C"
