// kernels/cuda_env.c: the error helpers of kernels/cuda_env.h (host code, shared by every launcher).
#include "cuda_env.h"
#include <stdarg.h>
#include <stdio.h>

dsmoe_status dsmoe_cu_fail(const dsmoe_cu_env *env, dsmoe_status st, const char *fmt, ...) {
    if (env && env->msg && env->msg_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(env->msg, env->msg_len, fmt, ap);
        va_end(ap);
    }
    return st;
}

dsmoe_status dsmoe_cu_check(const dsmoe_cu_env *env, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return DSMOE_OK;
    return dsmoe_cu_fail(env, e == cudaErrorMemoryAllocation ? DSMOE_ERR_NOMEM : DSMOE_ERR_SYSTEM, "%s: %s (%s)",
                         what, cudaGetErrorString(e), cudaGetErrorName(e));
}

void dsmoe_cu_trim_pools(int device, void *alloc_pool) {
    cudaMemPool_t pool;
    if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess) (void)cudaMemPoolTrimTo(pool, 0);
    if (alloc_pool) (void)cudaMemPoolTrimTo((cudaMemPool_t)alloc_pool, 0);
    (void)cudaGetLastError();
}

dsmoe_status dsmoe_cu_scratch(const dsmoe_cu_env *env, void **p, size_t bytes, const char *what) {
    if (bytes == 0) bytes = 1;
    cudaError_t e = cudaMallocAsync(p, bytes, env->stream);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        dsmoe_cu_trim_pools(env->device, env->alloc_pool);
        e = cudaMallocAsync(p, bytes, env->stream);
    }
    if (e == cudaSuccess) return DSMOE_OK;
    *p = NULL;
    (void)cudaGetLastError(); // the failed allocation must not be reported again by a launch check
    return dsmoe_cu_fail(env, e == cudaErrorMemoryAllocation ? DSMOE_ERR_NOMEM : DSMOE_ERR_SYSTEM,
                         "%s: cannot allocate %zu bytes of scratch on device %d: %s (%s)", what, bytes, env->device,
                         cudaGetErrorString(e), cudaGetErrorName(e));
}

dsmoe_status dsmoe_cu_check_launch(const dsmoe_cu_env *env, const char *op) {
    return dsmoe_cu_check(env, cudaGetLastError(), op);
}
