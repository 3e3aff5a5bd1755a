// plugins/cpu/cpu_bf16.c: bfloat16 basics of the cpu plugin: which bf16 units the CPU has (cpuid), and
// the float32 <-> bfloat16 conversions every bf16 path of the plugin uses (convert, the GEMM
// epilogues, the blocks of the ops that widen bfloat16 rows).
// defines: cpu_bf16_detect, cpu_f32_to_bf16, cpu_bf16_to_f32, cpu_f32_to_bf16_par, cpu_bf16_to_f32_par
//
// Conversion rule (include/dsmoe/types.h, kernel_plugin.h `convert`): narrowing rounds to nearest, ties
// to even, on the float32 bit pattern (subnormals included: bfloat16 has float32's exponent range, so a
// subnormal float32 rounds to a subnormal bfloat16, not to zero); a NaN stays a NaN with its quiet bit
// set; Inf stays Inf; values that round above the largest bfloat16 become Inf. Widening is exact.
// Two implementations give the same bits: AVX512-BF16's vcvtne2ps2bf16 (32 values an instruction; it
// flushes subnormal inputs to zero, so a block holding one is redone by the integer rule), and the
// integer rule itself in plain C, which the compiler vectorises for any target.
#include <cpuid.h>
#include <immintrin.h>
#include <string.h>

#include "cpu_bf16.h"     // cpu_f2bf, cpu_bf2f, cpu_isa_bf16
#include "cpu_internal.h" // cpu_ctx, CPU_PAR_MIN

// ---------------------------------------------------------------------------------------------------
// The CPU's bf16 units

// XCR0: what the OS saves on a context switch. ZMM state = bits 5 (opmask), 6 and 7 (ZMM registers);
// AMX tile state = bits 17 (TILECFG) and 18 (TILEDATA).
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

// 1 once cpu_bf16_detect found AVX512-BF16 usable: the conversions take the vcvtne2ps2bf16 path.
static int have_avx512_bf16 = -1;

void cpu_bf16_detect(cpu_isa_bf16 *isa) {
    memset(isa, 0, sizeof *isa);
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || __get_cpuid_max(0, NULL) < 7) {
        have_avx512_bf16 = 0;
        return;
    }
    uint64_t xcr0 = xgetbv0();
    int zmm_os = (xcr0 & 0xe6) == 0xe6, amx_os = (xcr0 & 0x60000) == 0x60000;
    __cpuid_count(7, 0, a, b, c, d);
    int avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    __cpuid_count(7, 1, a, b, c, d);
    int avx512_bf16 = (a >> 5) & 1;
    isa->avx512_bf16 = zmm_os && avx512f && avx512bw && avx512_bf16;
    isa->amx_bf16 = amx_os && amx_tile && amx_bf16;
    have_avx512_bf16 = isa->avx512_bf16;
}

// ---------------------------------------------------------------------------------------------------
// Conversions

// The integer rule over a range; written without branches so that it vectorises.
static void f32_to_bf16_int(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++)
        dst[i] = cpu_f2bf(src[i]);
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void f32_to_bf16_avx512(uint16_t *dst,
                                                                                      const float *src,
                                                                                      size_t n) {
    const __m512i exp_mask = _mm512_set1_epi32(0x7f800000), man_mask = _mm512_set1_epi32(0x007fffff);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512i lo = _mm512_loadu_si512(src + i), hi = _mm512_loadu_si512(src + i + 16);
        // subnormal = exponent 0 and mantissa not 0: the instruction would flush it to zero
        __mmask16 sub_lo = _mm512_testn_epi32_mask(lo, exp_mask) & _mm512_test_epi32_mask(lo, man_mask);
        __mmask16 sub_hi = _mm512_testn_epi32_mask(hi, exp_mask) & _mm512_test_epi32_mask(hi, man_mask);
        if (sub_lo | sub_hi) {
            f32_to_bf16_int(dst + i, src + i, 32);
            continue;
        }
        __m512bh r = _mm512_cvtne2ps_pbh(_mm512_castsi512_ps(hi), _mm512_castsi512_ps(lo)); // lo in the low half
        _mm512_storeu_si512(dst + i, (__m512i)r);
    }
    f32_to_bf16_int(dst + i, src + i, n - i);
}

void cpu_f32_to_bf16(uint16_t *dst, const float *src, size_t n) {
    if (have_avx512_bf16 < 0) {
        cpu_isa_bf16 isa;
        cpu_bf16_detect(&isa);
    }
    if (have_avx512_bf16)
        f32_to_bf16_avx512(dst, src, n);
    else
        f32_to_bf16_int(dst, src, n);
}

void cpu_bf16_to_f32(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++)
        dst[i] = cpu_bf2f(src[i]);
}

// Chunks of the threaded conversions: each thread converts whole chunks, the bits do not depend on who.
#define CONVERT_CHUNK 16384

void cpu_f32_to_bf16_par(const cpu_ctx *ctx, uint16_t *dst, const float *src, size_t n) {
    long chunks = (long)((n + CONVERT_CHUNK - 1) / CONVERT_CHUNK);
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (chunks > 1)
    for (long c = 0; c < chunks; c++) {
        size_t i = (size_t)c * CONVERT_CHUNK, len = n - i < CONVERT_CHUNK ? n - i : CONVERT_CHUNK;
        cpu_f32_to_bf16(dst + i, src + i, len);
    }
}

void cpu_bf16_to_f32_par(const cpu_ctx *ctx, float *dst, const uint16_t *src, size_t n) {
    long chunks = (long)((n + CONVERT_CHUNK - 1) / CONVERT_CHUNK);
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (chunks > 1)
    for (long c = 0; c < chunks; c++) {
        size_t i = (size_t)c * CONVERT_CHUNK, len = n - i < CONVERT_CHUNK ? n - i : CONVERT_CHUNK;
        cpu_bf16_to_f32(dst + i, src + i, len);
    }
}
