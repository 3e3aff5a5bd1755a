// plugins/cpu/cpu_math.h: the float math several files of the cpu plugin share, inline, so that the
// GELU of gelu_forward and the GELU of the grouped GEMM's epilogue are the same expression and give the
// same bits (the core may use either; training must not depend on which): both call cpu_vec.c's row
// kernels, which compile cpu_gelu and cpu_gelu_grad for each vector width.
// defines: cpu_exp_fast, cpu_tanh_fast, cpu_gelu, cpu_gelu_grad, cpu_bias_chunk(_as), CPU_COL_CHUNK,
//          cpu_widen, cpu_store_as, cpu_widen8, cpu_dot_lanes_as, cpu_dot_lanes, CPU_DOT_LANES, cpu_f32x8
//          and the other vector types
#ifndef DSMOE_CPU_MATH_H
#define DSMOE_CPU_MATH_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_bf16.h" // cpu_bf2f, cpu_f2bf

// exp(x) for float, vectorizable (glibc's expf is a call the compiler cannot vectorize; it made GELU
// and the softmaxes 5-10x slower). Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial
// for exp(r), 2^n built in the exponent bits; within 2 ulp of expf. x is clamped to [-87, 88], so
// exp of very negative x gives about 1.6e-38 rather than 0: a softmax entry that small is 0 in any
// sum with its row maximum (which is 1). exp(NaN) is NaN.
static inline float cpu_exp_fast(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f; // ln2 split in two for an exact n*ln2
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    // 2^n in the exponent bits. n (an integer in [-126, 127]) is read from the low mantissa bits of
    // n + 1.5 * 2^23 rather than converted: a NaN x passes the clamp, and converting NaN to an integer
    // is undefined; this way y is NaN and so is the result. Unsigned, so every step is defined.
    float shifted = n + 12582912.0f;
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as torch
// gelu(approximate="tanh").
#define CPU_GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)
#define CPU_GELU_CUBE 0.044715f

// tanh(u) = 1 - 2 / (1 + exp(2u)): absolute error about 1e-7 (what GELU needs; tanhf itself was 25 ns
// an element here); saturates to +-1 through cpu_exp_fast's clamp.
static inline float cpu_tanh_fast(float u) { return 1.0f - 2.0f / (1.0f + cpu_exp_fast(2.0f * u)); }

static inline float cpu_gelu(float x) {
    return 0.5f * x * (1.0f + cpu_tanh_fast(CPU_GELU_SCALE * (x + CPU_GELU_CUBE * x * x * x)));
}

// d gelu(x) / dx. Callers accumulate it as `din += cpu_gelu_grad(x) * dout`, in that form everywhere
// (the epilogue's `c = gelu'(aux) * c` is `0 + gelu'(aux) * c`, what zero-then-gelu_backward gave).
static inline float cpu_gelu_grad(float x) {
    float th = cpu_tanh_fast(CPU_GELU_SCALE * (x + CPU_GELU_CUBE * x * x * x));
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * CPU_GELU_SCALE * (1.0f + 3.0f * CPU_GELU_CUBE * x * x);
}

// Reductions over rows split the columns into chunks of this many floats; each chunk is one thread's
// (64 floats = 4 cache lines per row).
#define CPU_COL_CHUNK 64

// x . w over k floats in a fixed order: 16 lane accumulators over k, then a fixed tree (lanes l and
// l + h for h = 8, 4, 2, 1), so a result does not depend on the thread count or on who calls it (the
// small-row GEMMs of cpu_gemm.c, cached attention's scores in cpu_infer.c). cpu_dot_lanes_as reads w
// as float32, or as bfloat16 bits when bf (a constant wherever it is inlined): each bf16 value widened
// exactly in a register, then the same sums, so the result is the float32 one on the widened row.
// Written with vector types so that the accumulators and the tree stay in registers: as a float[16]
// indexed by the tail loop they went through the stack, and the tree cost a quarter of a head-size-64
// dot.
#define CPU_DOT_LANES 16
typedef float cpu_f32x8 __attribute__((vector_size(32)));
typedef float cpu_f32x4 __attribute__((vector_size(16)));
typedef uint16_t cpu_u16x8 __attribute__((vector_size(16)));
typedef uint32_t cpu_u32x8 __attribute__((vector_size(32)));

// Element i of w (float32, or bfloat16 bits when bf) as a float.
static inline __attribute__((always_inline)) float cpu_widen(const void *w, size_t i, int bf) {
    return bf ? cpu_bf2f(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

// Element i of p (float32, or bfloat16 bits when bf) = v, rounded once when bf.
static inline __attribute__((always_inline)) void cpu_store_as(void *p, size_t i, float v, int bf) {
    if (bf)
        ((uint16_t *)p)[i] = cpu_f2bf(v);
    else
        ((float *)p)[i] = v;
}

// Elements [i, i + 8) of w as floats.
static inline __attribute__((always_inline)) cpu_f32x8 cpu_widen8(const void *w, size_t i, int bf) {
    cpu_f32x8 v;
    if (!bf) {
        memcpy(&v, (const float *)w + i, sizeof v);
        return v;
    }
    cpu_u16x8 h;
    memcpy(&h, (const uint16_t *)w + i, sizeof h);
    cpu_u32x8 u = __builtin_convertvector(h, cpu_u32x8) << 16;
    memcpy(&v, &u, sizeof v);
    return v;
}

// Lanes 0-7 are lo's, 8-15 hi's: 8-wide vectors, which every x86-64 target since AVX holds in one
// register (a 16-wide vector type compiled to memory traffic without AVX-512).
static inline __attribute__((always_inline)) float cpu_dot_lanes_as(const float *x, const void *w, int k, int bf) {
    cpu_f32x8 lo = {0}, hi = {0};
    int k16 = k / CPU_DOT_LANES * CPU_DOT_LANES;
    for (int p = 0; p < k16; p += CPU_DOT_LANES) {
        lo += cpu_widen8(x, (size_t)p, 0) * cpu_widen8(w, (size_t)p, bf);
        hi += cpu_widen8(x, (size_t)p + 8, 0) * cpu_widen8(w, (size_t)p + 8, bf);
    }
    if (k16 < k) { // the tail: lane l takes element k16 + l
        float lane[CPU_DOT_LANES];
        memcpy(lane, &lo, sizeof lo);
        memcpy(lane + 8, &hi, sizeof hi);
        for (int p = k16; p < k; p++)
            lane[p - k16] += x[p] * cpu_widen(w, (size_t)p, bf);
        memcpy(&lo, lane, sizeof lo);
        memcpy(&hi, lane + 8, sizeof hi);
    }
    cpu_f32x8 a8 = lo + hi;
    cpu_f32x4 a4 = __builtin_shufflevector(a8, a8, 0, 1, 2, 3) + __builtin_shufflevector(a8, a8, 4, 5, 6, 7);
    return (a4[0] + a4[2]) + (a4[1] + a4[3]);
}

static inline float cpu_dot_lanes(const float *x, const float *w, int k) { return cpu_dot_lanes_as(x, w, k, 0); }

// dbias[j0 .. j0+w) += sum over rows of dout (rows, n) in those columns, rows in order into a zeroed
// float accumulator, then added: bias_backward, and the grouped wgrad's dbias, one group at a time.
// cpu_bias_chunk_as reads dout as float32, or as bfloat16 bits when bf (a constant wherever it is
// inlined; each value widened exactly, so the sums are the float32 ones on the widened rows).
static inline __attribute__((always_inline)) void cpu_bias_chunk_as(float *dbias, const void *dout, int rows, int n,
                                                                    int j0, int w, int bf) {
    float acc[CPU_COL_CHUNK] = {0};
    for (int r = 0; r < rows; r++) {
        size_t at = (size_t)r * n + j0;
        for (int j = 0; j < w; j++)
            acc[j] += cpu_widen(dout, at + j, bf);
    }
    for (int j = 0; j < w; j++)
        dbias[j0 + j] += acc[j];
}

static inline void cpu_bias_chunk(float *dbias, const float *dout, int rows, int n, int j0, int w) {
    cpu_bias_chunk_as(dbias, dout, rows, n, j0, w, 0);
}

#endif
