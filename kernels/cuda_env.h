// kernels/cuda_env.h: what every launcher in kernels/ receives from the cuda plugin (plugins/cuda/).
// Plain C, so that the plugin's glue (C) and the device code (CUDA C++) share it.
//
// A launcher mirrors one member of dsmoe_kernel_plugin_v3 (include/dsmoe/kernel_plugin.h): the same
// arguments in the same order, with (ctx, q) replaced by `const dsmoe_cu_env *env`. It checks shapes
// and dtypes (returning DSMOE_ERR_INVALID / _UNSUPPORTED through dsmoe_cu_fail, which writes the
// message), enqueues its kernels on env->stream and returns without synchronising. Scratch memory is
// stream-ordered: cudaMallocAsync / cudaFreeAsync on env->stream (the plugin sets up the pool).
// Errors in the DATA (a token id out of range, a count above its bound) are found by kernels: they
// call dsmoe_cu_raise (kernels/cuda_common.cuh), which records the first fault in env->fault; the
// plugin turns it into a sticky error at the next synchronisation.
#ifndef DSMOE_KERNELS_CUDA_ENV_H
#define DSMOE_KERNELS_CUDA_ENV_H
#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>
#include "dsmoe/kernel_plugin.h"

DSMOE_EXTERN_C_BEGIN

// Data faults a kernel can raise. The first one raised wins; the plugin reports it with its values.
typedef enum dsmoe_cu_fault_code {
    DSMOE_CU_FAULT_NONE = 0,
    DSMOE_CU_FAULT_TOKEN_RANGE = 1,  // a = index, b = the token id (embedding: not in [0, V))
    DSMOE_CU_FAULT_TARGET_RANGE = 2, // a = row, b = the target id (cross-entropy: not in [0, V))
    DSMOE_CU_FAULT_COUNT_RANGE = 3,  // a = group, b = the count (grouped GEMM: not in [0, m_max])
    DSMOE_CU_FAULT_KV_RANGE = 4,     // a = sequence, b = pos + T_new (negative pos, or above T_max)
    DSMOE_CU_FAULT_CHOICE_RANGE = 5, // a = token, b = the expert id or slot (routing table: not in [0, E) / [-1, C))
    DSMOE_CU_FAULT_SLOT_TWICE = 6,   // a = (smaller token << 32) | larger token, b = (expert << 32) | slot: two
                                     // entries of a routing table hold one slot (dispatch, combine_backward)
} dsmoe_cu_fault_code;

// Written by device code (mapped, pinned host memory: the host reads it after a synchronisation, and a
// and b once published says so).
typedef struct dsmoe_cu_fault {
    int32_t code;       // dsmoe_cu_fault_code; 0 = none
    int32_t published;  // 1 once a and b are written (after a system fence): until then the host must
                        // not read them; the kernel that set code sets it within a few instructions
    long long a, b;
} dsmoe_cu_fault;

typedef struct dsmoe_cu_env {
    cudaStream_t stream;   // where the launcher enqueues everything
    dsmoe_cu_fault *fault; // device pointer to the context's fault record
    int device;            // CUDA ordinal
    int sm_count;          // multiprocessors of the device
    int allow_tf32;        // GEMM family: float32 GEMMs may use TF32 tensor cores (setting "tf32")
    void *cublas;          // GEMM family: cublasHandle_t bound to `stream`
    void *cublaslt;        // GEMM family: cublasLtHandle_t (the stream and workspace go with each call)
    int fused_epilogues;   // GEMM family: grouped GEMMs through cuBLASLt's epilogues (setting "fused_epilogues")
    int attention_tc;      // attention: bfloat16 on tensor cores (setting "attention_tensor_cores")
    int expert_rows_max;   // GEMM family: grouped GEMMs of at most this many rows a group on gemm_rows.cu (0: never)
    int decode_split_keys; // attention: cached attention of one query tile splits the keys in runs of this many
                           // (0: never; setting "decode_split_keys")
    void *alloc_pool;      // the plugin's pool for alloc() (cudaMemPool_t): trimmed when scratch finds no room
    void *blas_workspace;  // GEMM family: cuBLAS workspace (blas_workspace_bytes), owned by the plugin
    size_t blas_workspace_bytes;
    char *msg;             // enqueue-time error message buffer (msg_len bytes), owned by the plugin
    size_t msg_len;
} dsmoe_cu_env;

// Writes "op: message" into env->msg and returns st (st != DSMOE_OK). Defined in kernels/cuda_env.c.
dsmoe_status dsmoe_cu_fail(const dsmoe_cu_env *env, dsmoe_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
// After a launch: DSMOE_OK, or DSMOE_ERR_SYSTEM with "<op>: <cudaGetErrorString>" when the launch (or an
// earlier asynchronous error) failed.
dsmoe_status dsmoe_cu_check_launch(const dsmoe_cu_env *env, const char *op);
// Same for the result of a CUDA runtime call.
dsmoe_status dsmoe_cu_check(const dsmoe_cu_env *env, cudaError_t e, const char *what);

// A launcher's scratch: cudaMallocAsync of bytes (at least 1) on env->stream, from the device's default
// pool; freed with cudaFreeAsync on the same stream. Both pools keep the memory they get back (release
// threshold UINT64_MAX), so a full device may have room unused in either: on cudaErrorMemoryAllocation
// both give back what no allocation holds (cudaMemPoolTrimTo) and the allocation is tried once more.
// DSMOE_ERR_NOMEM then names `what` and the size. Defined in kernels/cuda_env.c.
dsmoe_status dsmoe_cu_scratch(const dsmoe_cu_env *env, void **p, size_t bytes, const char *what);
// Gives back to the driver what the device's default pool and `alloc_pool` (may be NULL) hold unused.
void dsmoe_cu_trim_pools(int device, void *alloc_pool);

DSMOE_EXTERN_C_END

#endif
