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

dsmoe_status dsmoe_cu_check_launch(const dsmoe_cu_env *env, const char *op) {
    return dsmoe_cu_check(env, cudaGetLastError(), op);
}
