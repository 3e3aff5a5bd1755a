// plugins/cpu/cpu_vec.h: the cpu plugin's GELU row kernels in two vector widths (cpu_vec.c says why),
// one table per variant; a context holds the one its `simd` setting chose (ctx->vec). Every op and GEMM
// epilogue that takes a GELU calls through it, so gelu_forward and the fused epilogues stay the same
// compiled expression (cpu_math.h) and give the same bits.
#ifndef DSMOE_CPU_VEC_H
#define DSMOE_CPU_VEC_H
#include <stddef.h>

typedef struct cpu_vec {
    const char *vectors; // for describe(): "AVX-512 vectors" or "the build's vectors"
    // out[j] = gelu(in[j]); out may be in.
    void (*gelu)(float *out, const float *in, size_t n);
    // d[j] = 0 + gelu'(x[j]) * d[j] (the DGELU epilogue: zero, then gelu_backward's accumulation).
    void (*gelu_grad_mul)(float *d, const float *x, size_t n);
    // acc[j] += gelu'(x[j]) * d[j] (gelu_backward); acc is neither x nor d.
    void (*gelu_grad_acc)(float *acc, const float *x, const float *d, size_t n);
} cpu_vec;

extern const cpu_vec cpu_vec_build;  // the build's target (DSMOE_CPU_ARCH)
extern const cpu_vec cpu_vec_avx512; // AVX-512F/DQ/BW/VL; its members are NULL off x86-64
// 1 when this CPU and OS run cpu_vec_avx512.
int cpu_vec_have_avx512(void);
#endif
