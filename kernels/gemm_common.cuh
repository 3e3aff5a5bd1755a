// kernels/gemm_common.cuh: host helpers of the GEMM family shared by gemm.cu (cuBLAS) and gemm_lt.cu
// (cuBLASLt): the operand dtypes as cuBLAS names them, the compute type the "tf32" setting selects, and
// a cuBLAS status turned into the launcher's error.
#ifndef DSMOE_KERNELS_GEMM_COMMON_CUH
#define DSMOE_KERNELS_GEMM_COMMON_CUH
#include <cublas_v2.h>

#include "cuda_env.h"

static inline size_t gemm_dtype_bytes(dsmoe_dtype dt) { return dt == DSMOE_BFLOAT16 ? 2 : 4; }
static inline cudaDataType gemm_cuda_type(dsmoe_dtype dt) { return dt == DSMOE_BFLOAT16 ? CUDA_R_16BF : CUDA_R_32F; }

// float32 operands may use TF32 tensor cores when the "tf32" setting allows; bfloat16 ones accumulate in
// float32 (their products are exact in float32).
static inline cublasComputeType_t gemm_compute_type(const dsmoe_cu_env *env, dsmoe_dtype operands) {
    return operands == DSMOE_FLOAT32 && env->allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}

// DSMOE_OK, or "op: call: NAME (text)" as DSMOE_ERR_NOMEM (allocation) or DSMOE_ERR_SYSTEM.
static inline dsmoe_status gemm_check_blas(const dsmoe_cu_env *env, cublasStatus_t st, const char *op,
                                           const char *call) {
    if (st == CUBLAS_STATUS_SUCCESS)
        return DSMOE_OK;
    return dsmoe_cu_fail(env, st == CUBLAS_STATUS_ALLOC_FAILED ? DSMOE_ERR_NOMEM : DSMOE_ERR_SYSTEM, "%s: %s: %s (%s)",
                         op, call, cublasGetStatusName(st), cublasGetStatusString(st));
}

#endif
