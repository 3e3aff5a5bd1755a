// plugins/cpu/cpu_vec.c: the cpu plugin's GELU row kernels, compiled twice: for the build's target
// (DSMOE_CPU_ARCH, x86-64-v3 by default: 256-bit AVX2 vectors) and for AVX-512 (512-bit vectors),
// which a context picks at init (the setting `simd`; cpu_vec.h).
// defines: cpu_vec_build, cpu_vec_avx512, cpu_vec_have_avx512
//
// Why two: the build's target is portable (a cluster's login and compute nodes may differ), and GELU
// is the one element-wise op whose arithmetic, not memory, bounds it (an exp and a division per
// element). At 256 bits it was about 1 ns an element on a 2-core AMD EPYC with AVX-512, 2x its 512-bit
// time, and a bf16 MoE layer runs it over every expert row twice a step (the fc1 epilogue, the
// GELU-backward epilogue).
//
// Same bits: both variants compile the same loops over cpu_math.h's cpu_gelu and cpu_gelu_grad, whose
// operations are element-wise and correctly rounded, so the results do not depend on the vector width;
// what could differ is the fusing of a multiply and an add into one FMA, so the AVX-512 variant gets
// FMA exactly when the build's target has it (__FMA__ below: x86-64-v3 and up do).
// tests/plugins/kernel/test_cpu_ops.c checks the two bitwise on the ops and the GEMM epilogues.
#include "cpu_vec.h"

#include <stddef.h>

#include "cpu_math.h" // cpu_gelu, cpu_gelu_grad

// The loops of one variant. gelu reads and writes one array when out == in: written as its own loop,
// since a compiler that cannot prove two pointers apart checks them at run time, and equal pointers
// fail that check and would take its scalar fallback.
#define CPU_VEC_LOOPS(suffix, attr)                                                                  \
    attr static void gelu_##suffix(float *out, const float *in, size_t n) {                          \
        if (out == in) {                                                                             \
            for (size_t j = 0; j < n; j++)                                                           \
                out[j] = cpu_gelu(out[j]);                                                           \
            return;                                                                                  \
        }                                                                                            \
        for (size_t j = 0; j < n; j++)                                                               \
            out[j] = cpu_gelu(in[j]);                                                                \
    }                                                                                                \
    attr static void gelu_grad_mul_##suffix(float *d, const float *x, size_t n) {                    \
        for (size_t j = 0; j < n; j++)                                                               \
            d[j] = 0.0f + cpu_gelu_grad(x[j]) * d[j];                                                \
    }                                                                                                \
    attr static void gelu_grad_acc_##suffix(float *acc, const float *x, const float *d, size_t n) {  \
        for (size_t j = 0; j < n; j++)                                                               \
            acc[j] += cpu_gelu_grad(x[j]) * d[j];                                                    \
    }

CPU_VEC_LOOPS(build, )

const cpu_vec cpu_vec_build = {"the build's vectors", gelu_build, gelu_grad_mul_build, gelu_grad_acc_build};

#if defined(__x86_64__)
// x86-64-v4's AVX-512 subsets; GCC's vectoriser keeps 256-bit vectors unless told to prefer 512 (clang
// takes 512 with these features and does not know the option).
#if defined(__FMA__)
#define CPU_VEC_FMA ",fma"
#else
#define CPU_VEC_FMA ""
#endif
#if defined(__clang__)
#define CPU_VEC_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl" CPU_VEC_FMA)))
#else
#define CPU_VEC_AVX512 \
    __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl" CPU_VEC_FMA ",prefer-vector-width=512")))
#endif

CPU_VEC_LOOPS(avx512, CPU_VEC_AVX512)

const cpu_vec cpu_vec_avx512 = {"AVX-512 vectors", gelu_avx512, gelu_grad_mul_avx512, gelu_grad_acc_avx512};

// The compiler's runtime (libgcc, compiler-rt) reads cpuid and checks that the OS saves the ZMM state.
int cpu_vec_have_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#else
const cpu_vec cpu_vec_avx512 = {"AVX-512 vectors", NULL, NULL, NULL};
int cpu_vec_have_avx512(void) { return 0; }
#endif
