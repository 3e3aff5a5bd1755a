// kernels/elementwise.cu: the element-wise and small ops of the cuda plugin (kernels/elementwise.h).
// defines: dsmoe_cu_bias_add, dsmoe_cu_bias_backward, dsmoe_cu_axpy, dsmoe_cu_mul_uniform_noise,
//          dsmoe_cu_sum_squares, dsmoe_cu_all_finite, dsmoe_cu_convert, dsmoe_cu_init_tensor,
//          dsmoe_cu_gelu_forward, dsmoe_cu_gelu_backward, dsmoe_cu_residual_mix_forward,
//          dsmoe_cu_residual_mix_backward
//
// The reference is the cpu plugin: cpu_elementwise.c (bias, axpy, noise, reductions, init), cpu_ops.c
// (GELU, residual mix), cpu_memory.c (convert). Each launcher makes the cpu function's checks in the
// cpu function's order, and each kernel evaluates the cpu loop body's expression in the same order
// (float32 arithmetic on values loaded as float32; bfloat16 stores round to nearest even).
//
// Invariants: forward outputs are assigned, backward outputs accumulate (+=). Element-wise kernels
// walk their elements with a grid-stride loop (the grid is capped, any n works). Every reduction has a
// partition that depends on the shape only and sums in a fixed order (no floating-point atomics), so
// results are bitwise reproducible run to run and device to device.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "cuda_common.cuh" // dsmoe_ld, dsmoe_st, dsmoe_block_sum, DSMOE_CU_DISPATCH, dsmoe_cu_blocks
#include "dsmoe/rng.h"     // dsmoe_rng_uniform, dsmoe_rng_normal (host and device)
#include "elementwise.h"

#define EW_THREADS 256

// Index of this thread in a 1-D grid, and the grid's stride, as size_t (n may exceed 2^32).
#define EW_FOR(i, n)                                                                                       \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// ---------------------------------------------------------------------------------------------------
// bias_add, bias_backward

template <typename T>
__global__ void bias_add_kernel(T *out, const float *bias, size_t total, int n) {
    EW_FOR(i, total) dsmoe_st(out, i, dsmoe_ld(out, i) + bias[i % (size_t)n]);
}

extern "C" dsmoe_status dsmoe_cu_bias_add(const dsmoe_cu_env *env, void *out, dsmoe_dtype dt, const float *bias,
                                          int rows, int n) {
    static const char op[] = "bias_add";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (rows < 0 || n < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: rows=%d n=%d: expected >= 0", op, rows, n);
    if (rows == 0 || n == 0)
        return DSMOE_OK;
    if (!out || !bias)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL %s", op, out ? "bias" : "out");
    size_t total = (size_t)rows * n;
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(bias_add_kernel<T>, dsmoe_cu_blocks(total, EW_THREADS), EW_THREADS, 0, env->stream, (T *)out,
                        bias, total, n);
    });
    return dsmoe_cu_check_launch(env, op);
}

// Column sums: a block is BB_COLS columns x one chunk of rows; thread (x, y) sums rows y, y + BB_ROWS, ...
// of its chunk in order into a float, then row 0 of the block adds the BB_ROWS partials in order. The
// chunking depends on `rows` only: at most BB_MAX_CHUNKS chunks of at least BB_CHUNK_ROWS rows.
#define BB_COLS 32
#define BB_ROWS 8
#define BB_CHUNK_ROWS 256
#define BB_MAX_CHUNKS 64

// accumulate: dst is dbias (n) and gets +=; else dst is partial (chunks, n), assigned.
template <typename T>
__global__ void bias_colsum_kernel(float *dst, int accumulate, const T *dout, int rows, int n, int chunk_rows) {
    __shared__ float part[BB_ROWS][BB_COLS + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * BB_COLS + tx;
    const int r0 = blockIdx.y * chunk_rows, r1 = min(rows, r0 + chunk_rows);
    float acc = 0.0f;
    if (col < n)
        for (int r = r0 + ty; r < r1; r += BB_ROWS)
            acc += dsmoe_ld(dout, (size_t)r * n + col);
    part[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && col < n) {
        float s = 0.0f;
        for (int k = 0; k < BB_ROWS; k++)
            s += part[k][tx];
        if (accumulate)
            dst[col] += s;
        else
            dst[(size_t)blockIdx.y * n + col] = s;
    }
}

// dbias (n) += sum over chunks (in chunk order) of partial (chunks, n).
__global__ void bias_partials_kernel(float *dbias, const float *partial, int chunks, int n) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int c = 0; c < chunks; c++)
            s += partial[(size_t)c * n + j];
        dbias[j] += s;
    }
}

extern "C" dsmoe_status dsmoe_cu_bias_backward(const dsmoe_cu_env *env, float *dbias, const void *dout,
                                               dsmoe_dtype dt, int rows, int n) {
    static const char op[] = "bias_backward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (rows < 0 || n < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: rows=%d n=%d: expected >= 0", op, rows, n);
    if (rows == 0 || n == 0)
        return DSMOE_OK;
    if (!dbias || !dout)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL %s", op, dbias ? "dout" : "dbias");
    int chunks = (rows + BB_CHUNK_ROWS - 1) / BB_CHUNK_ROWS;
    if (chunks > BB_MAX_CHUNKS)
        chunks = BB_MAX_CHUNKS;
    const int chunk_rows = (rows + chunks - 1) / chunks;
    const dim3 grid((unsigned)((n + BB_COLS - 1) / BB_COLS), (unsigned)chunks), block(BB_COLS, BB_ROWS);
    float *partial = NULL;
    if (chunks > 1 &&
        (st = dsmoe_cu_scratch(env, (void **)&partial, (size_t)chunks * n * sizeof(float), op)) != DSMOE_OK)
        return st;
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(bias_colsum_kernel<T>, grid, block, 0, env->stream, chunks > 1 ? partial : dbias, chunks == 1,
                        (const T *)dout, rows, n, chunk_rows);
    });
    if (chunks > 1) {
        dsmoe_cu_launch(bias_partials_kernel, dsmoe_cu_blocks((size_t)n, EW_THREADS), EW_THREADS, 0, env->stream, dbias,
                        partial, chunks, n);
        cudaFreeAsync(partial, env->stream);
    }
    return dsmoe_cu_check_launch(env, op);
}

// ---------------------------------------------------------------------------------------------------
// axpy, mul_uniform_noise

template <typename T>
__global__ void axpy_kernel(T *y, float alpha, const T *x, size_t n) {
    EW_FOR(i, n) dsmoe_st(y, i, dsmoe_ld(y, i) + alpha * dsmoe_ld(x, i));
}

extern "C" dsmoe_status dsmoe_cu_axpy(const dsmoe_cu_env *env, void *y, float alpha, const void *x, dsmoe_dtype dt,
                                      size_t n) {
    static const char op[] = "axpy";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (n == 0)
        return DSMOE_OK;
    if (!x || !y)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL %s with n=%zu", op, y ? "x" : "y", n);
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(axpy_kernel<T>, dsmoe_cu_blocks(n, EW_THREADS), EW_THREADS, 0, env->stream, (T *)y, alpha,
                        (const T *)x, n);
    });
    return dsmoe_cu_check_launch(env, op);
}

// out may alias in (the backward is done in place on the gradient): each element is read, then written,
// by one thread.
template <typename T>
__global__ void mul_uniform_noise_kernel(T *out, const T *in, size_t n, float eps, uint64_t seed, uint64_t offset) {
    EW_FOR(i, n) dsmoe_st(out, i, dsmoe_ld(in, i) * (1.0f - eps + 2.0f * eps * dsmoe_rng_uniform(seed, offset + i)));
}

extern "C" dsmoe_status dsmoe_cu_mul_uniform_noise(const dsmoe_cu_env *env, void *out, const void *in, dsmoe_dtype dt,
                                                   size_t n, float eps, uint64_t seed, uint64_t offset) {
    static const char op[] = "mul_uniform_noise";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (n == 0)
        return DSMOE_OK;
    if (!out || !in)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL %s with n=%zu", op, out ? "in" : "out", n);
    if (!(eps >= 0.0f && eps < 1.0f))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: eps=%g: expected 0 <= eps < 1", op, (double)eps);
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(mul_uniform_noise_kernel<T>, dsmoe_cu_blocks(n, EW_THREADS), EW_THREADS, 0, env->stream,
                        (T *)out, (const T *)in, n, eps, seed, offset);
    });
    return dsmoe_cu_check_launch(env, op);
}

// ---------------------------------------------------------------------------------------------------
// sum_squares, all_finite

// Blocks depend on n only: at least SS_MIN_BLOCK elements each, at most SS_MAX_BLOCKS of them. A block
// sums its contiguous range in double (thread t takes elements t, t + SS_THREADS, ... in order, then
// dsmoe_block_sum's fixed tree); one block then adds the block sums the same way.
#define SS_THREADS 256
#define SS_MIN_BLOCK 8192
#define SS_MAX_BLOCKS 1024

__global__ void sum_squares_blocks_kernel(const float *x, size_t n, size_t chunk, double *dst) {
    __shared__ double shared[32];
    const size_t i0 = (size_t)blockIdx.x * chunk, i1 = min(n, i0 + chunk);
    double s = 0.0;
    for (size_t i = i0 + threadIdx.x; i < i1; i += blockDim.x)
        s += (double)x[i] * x[i];
    s = dsmoe_block_sum(s, shared);
    if (threadIdx.x == 0)
        dst[blockIdx.x] = s;
}

__global__ void sum_partials_kernel(const double *partial, int parts, double *out) {
    __shared__ double shared[32];
    double s = 0.0;
    for (int b = threadIdx.x; b < parts; b += blockDim.x)
        s += partial[b];
    s = dsmoe_block_sum(s, shared);
    if (threadIdx.x == 0)
        out[0] = s;
}

extern "C" dsmoe_status dsmoe_cu_sum_squares(const dsmoe_cu_env *env, const float *x, size_t n, double *out) {
    static const char op[] = "sum_squares";
    if (!out)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL out", op);
    if (!x && n > 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL x with n=%zu", op, n);
    if (n == 0) // the sum of nothing is still a result
        return dsmoe_cu_check(env, cudaMemsetAsync(out, 0, sizeof(double), env->stream), op);
    size_t blocks = (n + SS_MIN_BLOCK - 1) / SS_MIN_BLOCK;
    if (blocks > SS_MAX_BLOCKS)
        blocks = SS_MAX_BLOCKS;
    const size_t chunk = (n + blocks - 1) / blocks;
    if (blocks == 1) {
        dsmoe_cu_launch(sum_squares_blocks_kernel, 1, SS_THREADS, 0, env->stream, x, n, chunk, out);
        return dsmoe_cu_check_launch(env, op);
    }
    double *partial = NULL;
    dsmoe_status st = dsmoe_cu_scratch(env, (void **)&partial, blocks * sizeof(double), op);
    if (st != DSMOE_OK)
        return st;
    dsmoe_cu_launch(sum_squares_blocks_kernel, (unsigned)blocks, SS_THREADS, 0, env->stream, x, n, chunk, partial);
    dsmoe_cu_launch(sum_partials_kernel, 1, SS_THREADS, 0, env->stream, partial, (int)blocks, out);
    cudaFreeAsync(partial, env->stream);
    return dsmoe_cu_check_launch(env, op);
}

__global__ void set_flag_kernel(int32_t *out, int32_t v) { *out = v; }

// out was set to 1 before; a block that sees a non-finite value stores 0 (every such store writes the
// same value, so the result does not depend on their order). An exponent field of all ones is Inf or
// NaN; bfloat16 widens exactly to float32, so one test serves both types.
template <typename T>
__global__ void all_finite_kernel(const T *x, size_t n, int32_t *out) {
    int bad = 0;
    EW_FOR(i, n) bad |= (__float_as_uint(dsmoe_ld(x, i)) & 0x7f800000u) == 0x7f800000u;
    if (__syncthreads_or(bad) && threadIdx.x == 0)
        *out = 0;
}

extern "C" dsmoe_status dsmoe_cu_all_finite(const dsmoe_cu_env *env, const void *x, dsmoe_dtype dt, size_t n,
                                            int32_t *out) {
    static const char op[] = "all_finite";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (!out)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL out", op);
    if (!x && n > 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL x with n=%zu", op, n);
    dsmoe_cu_launch(set_flag_kernel, 1, 1, 0, env->stream, out, 1);
    if (n > 0) {
        DSMOE_CU_DISPATCH(dt, T, {
            dsmoe_cu_launch(all_finite_kernel<T>, dsmoe_cu_blocks(n, EW_THREADS), EW_THREADS, 0, env->stream,
                            (const T *)x, n, out);
        });
    }
    return dsmoe_cu_check_launch(env, op);
}

// ---------------------------------------------------------------------------------------------------
// convert, init_tensor

template <typename TS, typename TD>
__global__ void convert_kernel(TD *dst, const TS *src, size_t n) {
    EW_FOR(i, n) dsmoe_st(dst, i, dsmoe_ld(src, i)); // bfloat16 -> float32 is exact; the other way is RNE
}

extern "C" dsmoe_status dsmoe_cu_convert(const dsmoe_cu_env *env, void *dst, dsmoe_dtype dst_type, const void *src,
                                         dsmoe_dtype src_type, size_t n) {
    static const char op[] = "convert";
    const int ok_src = src_type == DSMOE_FLOAT32 || src_type == DSMOE_BFLOAT16;
    const int ok_dst = dst_type == DSMOE_FLOAT32 || dst_type == DSMOE_BFLOAT16;
    if (!ok_src || !ok_dst)
        return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED,
                             "%s: %s to %s is not supported (float32 <-> bfloat16, or a copy of either)", op,
                             dsmoe_dtype_name(src_type), dsmoe_dtype_name(dst_type));
    if (n == 0)
        return DSMOE_OK;
    if (!dst || !src)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL %s with n=%zu", op, dst ? "src" : "dst", n);
    const size_t sbytes = n * dsmoe_dtype_size(src_type), dbytes = n * dsmoe_dtype_size(dst_type);
    const char *s = (const char *)src, *d = (const char *)dst;
    if (src_type == dst_type && s == d)
        return DSMOE_OK; // a copy onto itself
    // One thread per element would read and write overlapping bytes in no defined order.
    if (s < d + dbytes && d < s + sbytes)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: dst [%p, +%zu) overlaps src [%p, +%zu)", op, dst, dbytes,
                             src, sbytes);
    if (src_type == dst_type)
        return dsmoe_cu_check(env, cudaMemcpyAsync(dst, src, sbytes, cudaMemcpyDeviceToDevice, env->stream), op);
    const unsigned blocks = dsmoe_cu_blocks(n, EW_THREADS);
    if (src_type == DSMOE_FLOAT32)
        dsmoe_cu_launch(convert_kernel<float, __nv_bfloat16>, blocks, EW_THREADS, 0, env->stream, (__nv_bfloat16 *)dst,
                        (const float *)src, n);
    else
        dsmoe_cu_launch(convert_kernel<__nv_bfloat16, float>, blocks, EW_THREADS, 0, env->stream, (float *)dst,
                        (const __nv_bfloat16 *)src, n);
    return dsmoe_cu_check_launch(env, op);
}

// dsmoe_rng_normal is the host's function compiled for the device (double log, sqrt, cos).
__global__ void init_normal_kernel(float *dst, size_t n, uint64_t key, uint64_t offset, float std) {
    EW_FOR(i, n) dst[i] = std * dsmoe_rng_normal(key, offset + i);
}

__global__ void fill_kernel(float *dst, size_t n, float value) {
    EW_FOR(i, n) dst[i] = value;
}

extern "C" dsmoe_status dsmoe_cu_init_tensor(const dsmoe_cu_env *env, float *dst, size_t n,
                                             const dsmoe_init_params *p) {
    static const char op[] = "init_tensor";
    if (!p)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL params", op);
    if (!dst && n > 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL dst with n=%zu", op, n);
    if (p->std < 0.0f || isnan(p->std))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: std=%g: expected >= 0", op, (double)p->std);
    if (n == 0)
        return DSMOE_OK;
    const unsigned blocks = dsmoe_cu_blocks(n, EW_THREADS);
    if (p->std > 0.0f)
        dsmoe_cu_launch(init_normal_kernel, blocks, EW_THREADS, 0, env->stream, dst, n, p->key, p->offset, p->std);
    else
        dsmoe_cu_launch(fill_kernel, blocks, EW_THREADS, 0, env->stream, dst, n, p->value);
    return dsmoe_cu_check_launch(env, op);
}

// ---------------------------------------------------------------------------------------------------
// GELU (dsmoe_cu_gelu, cuda_common.cuh: the grouped GEMM's BIAS_GELU epilogue uses the same function, so
// that in float32 gelu_forward and the epilogue give the same bits, as the core may use either, and
// gelu_backward into a zeroed din gives the DGELU epilogue's bits; in bfloat16 the epilogue takes GELU of
// the unrounded pre-activation, as the cpu plugin's does: one rounding fewer than bias_add then
// gelu_forward).

template <typename T>
__global__ void gelu_forward_kernel(T *out, const T *in, size_t n) {
    EW_FOR(i, n) dsmoe_st(out, i, dsmoe_cu_gelu(dsmoe_ld(in, i)));
}

template <typename T>
__global__ void gelu_backward_kernel(T *din, const T *in, const T *dout, size_t n) {
    EW_FOR(i, n) dsmoe_st(din, i, dsmoe_ld(din, i) + dsmoe_cu_gelu_grad(dsmoe_ld(in, i)) * dsmoe_ld(dout, i));
}

extern "C" dsmoe_status dsmoe_cu_gelu_forward(const dsmoe_cu_env *env, void *out, const void *in, dsmoe_dtype dt,
                                              size_t n) {
    static const char op[] = "gelu_forward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (n == 0)
        return DSMOE_OK;
    if (!out || !in)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL %s with n=%zu", op, out ? "in" : "out", n);
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(gelu_forward_kernel<T>, dsmoe_cu_blocks(n, EW_THREADS), EW_THREADS, 0, env->stream, (T *)out,
                        (const T *)in, n);
    });
    return dsmoe_cu_check_launch(env, op);
}

extern "C" dsmoe_status dsmoe_cu_gelu_backward(const dsmoe_cu_env *env, void *din, const void *in, const void *dout,
                                               dsmoe_dtype dt, size_t n) {
    static const char op[] = "gelu_backward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (n == 0)
        return DSMOE_OK;
    if (!din || !in || !dout)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL din, in or dout with n=%zu", op, n);
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(gelu_backward_kernel<T>, dsmoe_cu_blocks(n, EW_THREADS), EW_THREADS, 0, env->stream, (T *)din,
                        (const T *)in, (const T *)dout, n);
    });
    return dsmoe_cu_check_launch(env, op);
}

// ---------------------------------------------------------------------------------------------------
// Residual-MoE mix: coef (S, 2) = softmax(coef_logits); out = moe * coef[:,0] + mlp * coef[:,1].
// One block per row (grid-stride over rows), threads over the M columns.

#define RM_MAX_BLOCKS 65535

static unsigned rm_threads(int M) {
    int t = (M + 31) / 32 * 32;
    return (unsigned)(t < 32 ? 32 : t > 256 ? 256 : t);
}

// Every thread computes its row's coefficients (the same bits); thread 0 stores them after the block has
// read the logits, so coef may even alias coef_logits.
template <typename T>
__global__ void residual_mix_forward_kernel(T *out, float *coef, const T *moe, const T *mlp, const float *coef_logits,
                                            int S, int M) {
    for (int s = blockIdx.x; s < S; s += gridDim.x) {
        float l0 = coef_logits[2 * (size_t)s], l1 = coef_logits[2 * (size_t)s + 1];
        float mx = l0 > l1 ? l0 : l1;
        float e0 = expf(l0 - mx), e1 = expf(l1 - mx);
        float c0 = e0 / (e0 + e1), c1 = e1 / (e0 + e1);
        __syncthreads();
        if (threadIdx.x == 0) {
            coef[2 * (size_t)s] = c0;
            coef[2 * (size_t)s + 1] = c1;
        }
        const size_t row = (size_t)s * M;
        for (int j = threadIdx.x; j < M; j += blockDim.x)
            dsmoe_st(out, row + j, dsmoe_ld(moe, row + j) * c0 + dsmoe_ld(mlp, row + j) * c1);
    }
}

extern "C" dsmoe_status dsmoe_cu_residual_mix_forward(const dsmoe_cu_env *env, void *out, float *coef,
                                                      const void *moe, const void *mlp, dsmoe_dtype dt,
                                                      const float *coef_logits, int S, int M) {
    static const char op[] = "residual_mix_forward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (S < 0 || M < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: S=%d M=%d: expected >= 0", op, S, M);
    if (S == 0) // M == 0 still assigns coef
        return DSMOE_OK;
    if (!out || !coef || !moe || !mlp || !coef_logits)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL out, coef, moe, mlp or coef_logits", op);
    const unsigned blocks = (unsigned)(S < RM_MAX_BLOCKS ? S : RM_MAX_BLOCKS);
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(residual_mix_forward_kernel<T>, blocks, rm_threads(M), 0, env->stream, (T *)out, coef,
                        (const T *)moe, (const T *)mlp, coef_logits, S, M);
    });
    return dsmoe_cu_check_launch(env, op);
}

// d coef_k = dout . input_k (in double: each thread sums its columns in order, then dsmoe_block_sum);
// through the 2-way softmax, dlogit0 = c0 c1 (dcoef0 - dcoef1) = -dlogit1.
template <typename T>
__global__ void residual_mix_backward_kernel(T *dmoe, T *dmlp, float *dcoef_logits, const T *dout, const T *moe,
                                             const T *mlp, const float *coef, int S, int M) {
    __shared__ double shared[32];
    for (int s = blockIdx.x; s < S; s += gridDim.x) {
        const float c0 = coef[2 * (size_t)s], c1 = coef[2 * (size_t)s + 1];
        const size_t row = (size_t)s * M;
        double dc0 = 0.0, dc1 = 0.0;
        for (int j = threadIdx.x; j < M; j += blockDim.x) {
            float g = dsmoe_ld(dout, row + j), a = dsmoe_ld(moe, row + j), b = dsmoe_ld(mlp, row + j);
            dc0 += (double)g * a;
            dc1 += (double)g * b;
            dsmoe_st(dmoe, row + j, dsmoe_ld(dmoe, row + j) + g * c0);
            dsmoe_st(dmlp, row + j, dsmoe_ld(dmlp, row + j) + g * c1);
        }
        dc0 = dsmoe_block_sum(dc0, shared);
        dc1 = dsmoe_block_sum(dc1, shared);
        if (threadIdx.x == 0) {
            float dl0 = (float)((double)c0 * c1 * (dc0 - dc1));
            dcoef_logits[2 * (size_t)s] += dl0;
            dcoef_logits[2 * (size_t)s + 1] -= dl0;
        }
    }
}

extern "C" dsmoe_status dsmoe_cu_residual_mix_backward(const dsmoe_cu_env *env, void *dmoe, void *dmlp,
                                                       float *dcoef_logits, const void *dout, const void *moe,
                                                       const void *mlp, dsmoe_dtype dt, const float *coef, int S,
                                                       int M) {
    static const char op[] = "residual_mix_backward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (S < 0 || M < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: S=%d M=%d: expected >= 0", op, S, M);
    if (S == 0)
        return DSMOE_OK;
    if (!dmoe || !dmlp || !dcoef_logits || !dout || !moe || !mlp || !coef)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID,
                             "%s: NULL argument (dmoe, dmlp, dcoef_logits, dout, moe, mlp or coef)", op);
    const unsigned blocks = (unsigned)(S < RM_MAX_BLOCKS ? S : RM_MAX_BLOCKS);
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(residual_mix_backward_kernel<T>, blocks, rm_threads(M), 0, env->stream, (T *)dmoe, (T *)dmlp,
                        dcoef_logits, (const T *)dout, (const T *)moe, (const T *)mlp, coef, S, M);
    });
    return dsmoe_cu_check_launch(env, op);
}
