// plugins/cpu/cpu_elementwise.c: the element-wise and small ops of the cpu plugin: bias, axpy,
// multiplicative noise, the reductions (sum of squares, finiteness), parameter initialisation and the
// multi-tensor AdamW.
// defines: cpu_bias_add, cpu_bias_backward, cpu_axpy, cpu_mul_uniform_noise, cpu_all_finite (these
//          float32 or bfloat16), cpu_sum_squares, cpu_init_tensor, cpu_adamw
//
// Contracts are include/dsmoe/kernel_plugin.h's. Invariants: forward outputs are assigned, backward
// outputs accumulate (+=); each output element is one thread's, and the reductions use a blocking that
// depends on n only (sum_squares, bias_backward), so no result depends on the thread count. The
// per-element math is version 1's, unchanged.
#include <math.h>
#include <string.h>

#include "dsmoe/rng.h"    // dsmoe_rng_uniform, dsmoe_rng_normal
#include "cpu_internal.h" // CPU_BEGIN, CPU_ACT_DTYPE, CPU_REQUIRE
#include "cpu_math.h"     // cpu_bias_chunk_as, CPU_COL_CHUNK, cpu_widen, cpu_store_as

// bias_add, bias_backward, axpy and the noise take bfloat16 as well: each element's float32 expression
// is the same in both dtypes (one instance each, bf a constant), on a value widened exactly in a
// register and rounded once when stored, so a bf16 result is the float32 op on the widened tensors,
// rounded (tests/plugins/kernel/test_cpu_bf16_rows.c); all_finite reads bfloat16 bits.

// Row r of out += bias. Called with a constant bf inside the parallel loop: a parallel region inside an
// inlined function is outlined once, with bf a run-time value.
static inline __attribute__((always_inline)) void bias_add_row(void *out, size_t at, const float *bias, int n, int bf) {
    for (int j = 0; j < n; j++)
        cpu_store_as(out, at + j, cpu_widen(out, at + j, bf) + bias[j], bf);
}

dsmoe_status cpu_bias_add(cpu_ctx *ctx, cpu_queue *q, void *out, dsmoe_dtype dt, const float *bias, int rows, int n) {
    CPU_BEGIN(ctx, q, "bias_add");
    CPU_ACT_DTYPE(ctx, "bias_add", "dt", dt);
    CPU_REQUIRE(ctx, rows >= 0 && n >= 0, "cpu: bias_add: rows=%d n=%d: expected >= 0", rows, n);
    if ((long)rows * n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && bias, "cpu: bias_add: NULL %s", out ? "bias" : "out");
    const int bf = dt == DSMOE_BFLOAT16;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * n >= CPU_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        if (bf)
            bias_add_row(out, (size_t)r * n, bias, n, 1);
        else
            bias_add_row(out, (size_t)r * n, bias, n, 0);
    }
    return DSMOE_OK;
}

// Columns are split in fixed chunks; the thread owning a chunk sums its rows in order (cpu_bias_chunk),
// so the result is the same for any thread count.
dsmoe_status cpu_bias_backward(cpu_ctx *ctx, cpu_queue *q, float *dbias, const void *dout, dsmoe_dtype dt, int rows,
                               int n) {
    CPU_BEGIN(ctx, q, "bias_backward");
    CPU_ACT_DTYPE(ctx, "bias_backward", "dt", dt);
    CPU_REQUIRE(ctx, rows >= 0 && n >= 0, "cpu: bias_backward: rows=%d n=%d: expected >= 0", rows, n);
    if ((long)rows * n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dbias && dout, "cpu: bias_backward: NULL %s", dbias ? "dout" : "dbias");
    const int chunks = (n + CPU_COL_CHUNK - 1) / CPU_COL_CHUNK, bf = dt == DSMOE_BFLOAT16;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * n >= CPU_PAR_MIN)
    for (int ch = 0; ch < chunks; ch++) {
        int j0 = ch * CPU_COL_CHUNK, w = n - j0 < CPU_COL_CHUNK ? n - j0 : CPU_COL_CHUNK;
        if (bf)
            cpu_bias_chunk_as(dbias, dout, rows, n, j0, w, 1);
        else
            cpu_bias_chunk_as(dbias, dout, rows, n, j0, w, 0);
    }
    return DSMOE_OK;
}

// y[i0, i1) += alpha x[i0, i1).
static inline __attribute__((always_inline)) void axpy_span(void *y, float alpha, const void *x, size_t i0, size_t i1,
                                                            int bf) {
    for (size_t i = i0; i < i1; i++)
        cpu_store_as(y, i, cpu_widen(y, i, bf) + alpha * cpu_widen(x, i, bf), bf);
}

#define AXPY_BLOCK 16384 // elements a thread takes at a time

dsmoe_status cpu_axpy(cpu_ctx *ctx, cpu_queue *q, void *y, float alpha, const void *x, dsmoe_dtype dt, size_t n) {
    CPU_BEGIN(ctx, q, "axpy");
    CPU_ACT_DTYPE(ctx, "axpy", "dt", dt);
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, x && y, "cpu: axpy: NULL %s with n=%zu", y ? "x" : "y", n);
    const int bf = dt == DSMOE_BFLOAT16;
    const long blocks = (long)((n + AXPY_BLOCK - 1) / AXPY_BLOCK);
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (blocks > 1)
    for (long b = 0; b < blocks; b++) {
        size_t i0 = (size_t)b * AXPY_BLOCK, i1 = n - i0 < AXPY_BLOCK ? n : i0 + AXPY_BLOCK;
        if (bf)
            axpy_span(y, alpha, x, i0, i1, 1);
        else
            axpy_span(y, alpha, x, i0, i1, 0);
    }
    return DSMOE_OK;
}

// out may alias in (the backward is often done in place on the gradient).
// out[i] = in[i] times a uniform in [1 - eps, 1 + eps), computed in float32 on the widened value.
static inline __attribute__((always_inline)) void noise_range(void *out, const void *in, size_t i0, size_t i1,
                                                              float eps, uint64_t seed, uint64_t offset, int bf) {
    for (size_t i = i0; i < i1; i++)
        cpu_store_as(out, i, cpu_widen(in, i, bf) * (1.0f - eps + 2.0f * eps * dsmoe_rng_uniform(seed, offset + i)),
                     bf);
}

dsmoe_status cpu_mul_uniform_noise(cpu_ctx *ctx, cpu_queue *q, void *out, const void *in, dsmoe_dtype dt, size_t n,
                                   float eps, uint64_t seed, uint64_t offset) {
    CPU_BEGIN(ctx, q, "mul_uniform_noise");
    CPU_ACT_DTYPE(ctx, "mul_uniform_noise", "dt", dt);
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && in, "cpu: mul_uniform_noise: NULL %s with n=%zu", out ? "in" : "out", n);
    CPU_REQUIRE(ctx, eps >= 0.0f && eps < 1.0f, "cpu: mul_uniform_noise: eps=%g: expected 0 <= eps < 1", (double)eps);
    const int bf = dt == DSMOE_BFLOAT16;
    // A uniform costs tens of nanoseconds: chunks of CPU_PAR_MIN / 8 are worth a thread each.
    const size_t chunk = CPU_PAR_MIN / 8, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (chunks > 1)
    for (size_t c = 0; c < chunks; c++) {
        size_t i0 = c * chunk, i1 = n - i0 < chunk ? n : i0 + chunk;
        if (bf)
            noise_range(out, in, i0, i1, eps, seed, offset, 1);
        else
            noise_range(out, in, i0, i1, eps, seed, offset, 0);
    }
    return DSMOE_OK;
}

// Blocks depend on n only: at least SUMSQ_BLOCK elements, at most SUMSQ_MAX_BLOCKS blocks (so the
// partial sums fit on the stack). Each block is summed in double with four interleaved accumulators in
// a fixed order, then the partials are added in block order.
#define SUMSQ_BLOCK 8192
#define SUMSQ_MAX_BLOCKS 2048

static double sum_squares_block(const float *x, size_t n) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)x[i] * x[i];
        s1 += (double)x[i + 1] * x[i + 1];
        s2 += (double)x[i + 2] * x[i + 2];
        s3 += (double)x[i + 3] * x[i + 3];
    }
    for (; i < n; i++)
        s0 += (double)x[i] * x[i];
    return (s0 + s1) + (s2 + s3);
}

dsmoe_status cpu_sum_squares(cpu_ctx *ctx, cpu_queue *q, const float *x, size_t n, double *out) {
    CPU_BEGIN(ctx, q, "sum_squares");
    CPU_REQUIRE(ctx, out, "cpu: sum_squares: NULL out");
    CPU_REQUIRE(ctx, x || n == 0, "cpu: sum_squares: NULL x with n=%zu", n);
    if (n == 0) {
        *out = 0.0;
        return DSMOE_OK;
    }
    size_t block = (n + SUMSQ_MAX_BLOCKS - 1) / SUMSQ_MAX_BLOCKS;
    if (block < SUMSQ_BLOCK)
        block = SUMSQ_BLOCK;
    int nblocks = (int)((n + block - 1) / block);
    double partial[SUMSQ_MAX_BLOCKS];
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (nblocks > 1)
    for (int b = 0; b < nblocks; b++) {
        size_t i0 = (size_t)b * block, len = n - i0 < block ? n - i0 : block;
        partial[b] = sum_squares_block(x + i0, len);
    }
    double total = 0.0;
    for (int b = 0; b < nblocks; b++)
        total += partial[b];
    *out = total;
    return DSMOE_OK;
}

// An exponent field of all ones is Inf or NaN; testing bits vectorizes where isfinite() may not.
dsmoe_status cpu_all_finite(cpu_ctx *ctx, cpu_queue *q, const void *x, dsmoe_dtype dt, size_t n, int32_t *out) {
    CPU_BEGIN(ctx, q, "all_finite");
    CPU_ACT_DTYPE(ctx, "all_finite", "dt", dt);
    CPU_REQUIRE(ctx, out, "cpu: all_finite: NULL out");
    CPU_REQUIRE(ctx, x || n == 0, "cpu: all_finite: NULL x with n=%zu", n);
    uint32_t bad = 0;
    if (dt == DSMOE_BFLOAT16) {
        const uint16_t *h = x;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) reduction(| : bad) if (n >= CPU_PAR_MIN)
        for (size_t i = 0; i < n; i++)
            bad |= (h[i] & 0x7f80u) == 0x7f80u;
    } else {
        const float *f = x;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) reduction(| : bad) if (n >= CPU_PAR_MIN)
        for (size_t i = 0; i < n; i++) {
            uint32_t bits;
            memcpy(&bits, f + i, sizeof bits);
            bad |= (bits & 0x7f800000u) == 0x7f800000u;
        }
    }
    *out = !bad;
    return DSMOE_OK;
}

dsmoe_status cpu_init_tensor(cpu_ctx *ctx, cpu_queue *q, float *dst, size_t n, const dsmoe_init_params *p) {
    CPU_BEGIN(ctx, q, "init_tensor");
    CPU_REQUIRE(ctx, p, "cpu: init_tensor: NULL params");
    CPU_REQUIRE(ctx, dst || n == 0, "cpu: init_tensor: NULL dst with n=%zu", n);
    CPU_REQUIRE(ctx, !(p->std < 0.0f) && !isnan(p->std), "cpu: init_tensor: std=%g: expected >= 0", (double)p->std);
    const uint64_t key = p->key, offset = p->offset;
    if (p->std > 0.0f) {
        const float std = p->std;
        // Box-Muller in double: some 50 ns an element, so parallel from a few thousand.
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN / 8)
        for (size_t i = 0; i < n; i++)
            dst[i] = std * dsmoe_rng_normal(key, offset + i);
    } else {
        const float value = p->value;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN)
        for (size_t i = 0; i < n; i++)
            dst[i] = value;
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Optimizer: every tensor of the list with version 1's adamw_update math.

dsmoe_status cpu_adamw(cpu_ctx *ctx, cpu_queue *q, const dsmoe_adamw_params *hp, const dsmoe_adamw_tensor *tensors,
                       int n) {
    CPU_BEGIN(ctx, q, "adamw");
    CPU_REQUIRE(ctx, hp, "cpu: adamw: NULL hyper-parameters");
    CPU_REQUIRE(ctx, n >= 0 && (tensors || n == 0), "cpu: adamw: %d tensors at %p: expected a list of n >= 0", n,
                (const void *)tensors);
    const float lr = hp->lr, beta1 = hp->beta1, beta2 = hp->beta2, eps = hp->eps, grad_scale = hp->grad_scale;
    const int t = hp->t;
    CPU_REQUIRE(ctx, t >= 1, "cpu: adamw: t=%d: expected the step number, >= 1", t);
    CPU_REQUIRE(ctx, beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f,
                "cpu: adamw: beta1=%g beta2=%g: expected each in [0, 1)", (double)beta1, (double)beta2);
    for (int i = 0; i < n; i++) {
        const dsmoe_adamw_tensor *x = &tensors[i];
        CPU_REQUIRE(ctx, x->n == 0 || (x->param && x->grad && x->m && x->v),
                    "cpu: adamw: tensor %d: NULL param, grad, m or v with n=%zu", i, x->n);
    }
    // Bias corrections in double: beta2^t for t in the thousands loses digits in float.
    float c1 = (float)(1.0 - pow(beta1, t)), c2 = (float)(1.0 - pow(beta2, t));
    for (int ti = 0; ti < n; ti++) {
        float *param = tensors[ti].param, *m = tensors[ti].m, *v = tensors[ti].v;
        const float *grad = tensors[ti].grad;
        const float weight_decay = tensors[ti].weight_decay;
        const size_t len = tensors[ti].n;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (len >= CPU_PAR_MIN)
        for (size_t i = 0; i < len; i++) {
            float g = grad[i] * grad_scale;
            float mi = beta1 * m[i] + (1.0f - beta1) * g;
            float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
            m[i] = mi;
            v[i] = vi;
            param[i] -= lr * ((mi / c1) / (sqrtf(vi / c2) + eps) + weight_decay * param[i]);
        }
    }
    return DSMOE_OK;
}
