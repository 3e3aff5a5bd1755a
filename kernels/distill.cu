// kernels/distill.cu: the distillation loss of the cuda plugin (kernels/distill.h) and its backward.
// defines: dsmoe_cu_distill_forward, dsmoe_cu_distill_backward
//
// Forward: one block per row, four passes over the two rows of logits (they stay in L2): the maxima of
// student / T and teacher / T; the two sums of exp in float64; then per element log p and log q in
// float64, the KL term p (log p - log q) summed in float64 and diff = q - p. Sums go through
// dsmoe_block_sum (a fixed order): the results are bitwise reproducible. Backward: elementwise.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "cuda_common.cuh" // dsmoe_ld, dsmoe_st, dsmoe_block_sum/max, dsmoe_exp_fast, DSMOE_CU_DISPATCH
#include "distill.h"

#define KD_THREADS 512 // a block per row of V logits (V up to ~50k)
#define KD_EW_THREADS 256

template <typename T>
__global__ void distill_forward_kernel(float *losses, float *diff, const T *student, const T *teacher, float inv_t,
                                       int V) {
    __shared__ float red_f[32];
    __shared__ double red_d[32];
    const size_t row = (size_t)blockIdx.x * V;
    float ms = -INFINITY, mt = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float zs = dsmoe_ld(student, row + i) * inv_t, zt = dsmoe_ld(teacher, row + i) * inv_t;
        ms = zs > ms ? zs : ms;
        mt = zt > mt ? zt : mt;
    }
    ms = dsmoe_block_max(ms, red_f);
    mt = dsmoe_block_max(mt, red_f);
    double ss = 0.0, st = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        ss += (double)dsmoe_exp_fast(dsmoe_ld(student, row + i) * inv_t - ms);
        st += (double)dsmoe_exp_fast(dsmoe_ld(teacher, row + i) * inv_t - mt);
    }
    const double ls = log(dsmoe_block_sum(ss, red_d)), lt = log(dsmoe_block_sum(st, red_d));
    double kl = 0.0;
    float *d = diff + row;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        // log p and log q as (x - max) - log_sum: exact where the probability itself underflows.
        double log_p = (double)(dsmoe_ld(teacher, row + i) * inv_t - mt) - lt;
        double log_q = (double)(dsmoe_ld(student, row + i) * inv_t - ms) - ls;
        double p = exp(log_p);
        kl += p * (log_p - log_q);
        d[i] = (float)(exp(log_q) - p);
    }
    kl = dsmoe_block_sum(kl, red_d);
    if (threadIdx.x == 0) losses[blockIdx.x] = kl > 0.0 ? (float)kl : 0.0f; // rounding may give -1e-17
}

extern "C" dsmoe_status dsmoe_cu_distill_forward(const dsmoe_cu_env *env, float *losses, float *diff,
                                                 const void *student, const void *teacher, dsmoe_dtype dt,
                                                 float temperature, int S, int V) {
    static const char op[] = "distill_forward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (S < 0 || V <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: S=%d V=%d: expected S >= 0 and V > 0", op, S, V);
    if (!(temperature > 0) || !isfinite(temperature))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: temperature = %g: expected a finite number > 0", op,
                             (double)temperature);
    if (S == 0)
        return DSMOE_OK;
    if (!losses || !diff || !student || !teacher)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL losses, diff, student or teacher", op);
    const float inv_t = 1.0f / temperature;
    DSMOE_CU_DISPATCH(dt, Tv, {
        dsmoe_cu_launch(distill_forward_kernel<Tv>, (unsigned)S, KD_THREADS, 0, env->stream, losses, diff,
                        (const Tv *)student, (const Tv *)teacher, inv_t, V);
    });
    return dsmoe_cu_check_launch(env, op);
}

template <typename T>
__global__ void distill_backward_kernel(T *dstudent, const float *diff, float scale, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dsmoe_st(dstudent, i, dsmoe_ld(dstudent, i) + scale * diff[i]);
}

extern "C" dsmoe_status dsmoe_cu_distill_backward(const dsmoe_cu_env *env, void *dstudent, dsmoe_dtype dt,
                                                  const float *diff, float scale, int S, int V) {
    static const char op[] = "distill_backward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (S < 0 || V <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: S=%d V=%d: expected S >= 0 and V > 0", op, S, V);
    if (S == 0)
        return DSMOE_OK;
    if (!dstudent || !diff)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL dstudent or diff", op);
    size_t n = (size_t)S * V;
    DSMOE_CU_DISPATCH(dt, Tv, {
        dsmoe_cu_launch(distill_backward_kernel<Tv>, dsmoe_cu_blocks(n, KD_EW_THREADS), KD_EW_THREADS, 0, env->stream,
                        (Tv *)dstudent, diff, scale, n);
    });
    return dsmoe_cu_check_launch(env, op);
}
