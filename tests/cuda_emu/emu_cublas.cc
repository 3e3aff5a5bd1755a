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
// The GEMM engine is emu_gemm.h's, shared with the cuBLASLt stand-in (emu_cublaslt.cc): the same bits either way.
// No C++ runtime is used (no exceptions, operator new or containers): C test programs link it without libstdc++.
//
// Test hook: DSMOE_EMU_FAIL_CUBLAS_CREATE=1 in the environment makes cublasCreate fail with
// CUBLAS_STATUS_ALLOC_FAILED (as on a device out of memory), to exercise the plugin's error path.
#include <cublas_v2.h>

#include "emu_gemm.h"    // the GEMM engine, shared with emu_cublaslt.cc
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

using namespace dsmoe_emu_gemm;

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
    const auto operands = [j, product](int b) {
        Mats x = {nullptr, nullptr, nullptr, nullptr};
        if (j->Carray) {
            if (product) {
                x.A = j->Aarray[b];
                x.B = j->Barray[b];
            }
            x.D = j->Carray[b];
        } else {
            if (product) {
                x.A = (const char *)j->A + b * j->sa;
                x.B = (const char *)j->B + b * j->sb;
            }
            x.D = (char *)j->C + b * j->sc;
        }
        x.C = x.D; // in place
        return x;
    };
    // Failure: the packing buffers, out of host memory while the stream ran.
    if (!run(j->g, j->batch, operands, [](int) { return NoEpilogue{}; }))
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
