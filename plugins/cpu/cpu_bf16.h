// plugins/cpu/cpu_bf16.h: what the bfloat16 files of the cpu plugin share.
//   cpu_bf16.c       the CPU's bf16 units (cpuid) and the vectorised float32 <-> bfloat16 conversions
//   cpu_dnnl.c       oneDNN: the engine, a primitive cache, one stream per compute thread (stubs when
//                    the plugin is built without oneDNN)
//   cpu_gemm_bf16.c  bf16 GEMM, grouped GEMM with epilogues, grouped weight gradients: fixed tiles,
//                    each one single-threaded oneDNN matmul (or, emulated, float32 OpenBLAS on
//                    converted operands)
// docs/plugins.md ("The cpu plugin and bfloat16") says which library runs what, and why results do not
// depend on the thread count.
// defines: cpu_isa_bf16, cpu_f2bf, cpu_bf2f, cpu_bf16_job, CPU_BF16_TILE_M, CPU_BF16_TILE_N, and the
//          functions below
#ifndef DSMOE_CPU_BF16_H
#define DSMOE_CPU_BF16_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cpu_internal.h" // cpu_ctx, dsmoe_status

// The bf16 units cpuid reports (and the OS has enabled).
typedef struct cpu_isa_bf16 {
    int avx512_bf16; // AVX512F + AVX512BW + AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16)
    int amx_bf16;    // AMX-TILE + AMX-BF16
} cpu_isa_bf16;

// float32 -> bfloat16, round to nearest even on the bit pattern; a NaN keeps its sign and top payload
// bits and gets the quiet bit. No branch, so that loops over it vectorise.
static inline uint16_t cpu_f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

static inline float cpu_bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// --- cpu_bf16.c ---
void cpu_bf16_detect(cpu_isa_bf16 *isa);
// One thread, vectorised (AVX512-BF16 when cpu_bf16_detect found it).
void cpu_f32_to_bf16(uint16_t *dst, const float *src, size_t n);
void cpu_bf16_to_f32(float *dst, const uint16_t *src, size_t n);
// Over ctx's threads in fixed chunks.
void cpu_f32_to_bf16_par(const cpu_ctx *ctx, uint16_t *dst, const float *src, size_t n);
void cpu_bf16_to_f32_par(const cpu_ctx *ctx, float *dst, const uint16_t *src, size_t n);

// --- cpu_dnnl.c ---
// One kind of bf16 matmul with every size given at run time: c (m, n) float32 = alpha op(a) op(b) +
// beta c, a and b bfloat16, row-major with these leading dimensions (c is not read when beta == 0).
typedef struct cpu_mm_key {
    int ta, tb;
    int lda, ldb, ldc;
    float alpha, beta;
} cpu_mm_key;
typedef struct cpu_mm cpu_mm; // a oneDNN primitive of one kind

// 1 when the plugin was built with oneDNN.
int cpu_dnnl_built(void);
// Starts oneDNN for ctx when it runs bf16 on bf16 units (isa, and oneDNN's own dispatch, which
// ONEDNN_MAX_CPU_ISA may lower): ctx->dnnl is set, else left NULL. `what` gets the describe() words
// either way ("oneDNN 2.6.3 avx512_core_bf16", or why bf16 GEMMs are emulated).
dsmoe_status cpu_dnnl_init(cpu_ctx *ctx, const cpu_isa_bf16 *isa, char *what, size_t len, char *errbuf,
                           size_t errlen);
void cpu_dnnl_fini(cpu_ctx *ctx);
// The primitive of a kind, made on first use (outside parallel regions: it is created for one thread).
dsmoe_status cpu_dnnl_get(cpu_ctx *ctx, const cpu_mm_key *key, cpu_mm **mm);
// Runs mm on the calling thread, which is compute thread `slot`; 0 on success, else oneDNN's status.
int cpu_dnnl_run(cpu_ctx *ctx, const cpu_mm *mm, int slot, int m, int n, int k, const uint16_t *a,
                 const uint16_t *b, float *c);

// --- cpu_gemm_bf16.c ---
// Output tiles of bf16 GEMMs (rows, columns): one single-threaded matmul each. Wider than float32's
// (cpu_gemm.c): oneDNN's bf16 kernel re-packs its operands per call, and 256 x 512 amortised that best
// on the W1 shapes (bench/bench_gemm.c).
#define CPU_BF16_TILE_M 256
#define CPU_BF16_TILE_N 512

// A checked (grouped) GEMM with bfloat16 a and b (cpu_gemm.c builds it): group g has m[g] rows, a +
// g * a_stride, b + (g % b_groups) * b_stride, c and aux + g * c_stride (c_type: float32 or bfloat16),
// bias + (g % b_groups) * bias_stride (float32). A plain gemm is one group (ta allowed there only).
typedef struct cpu_bf16_job {
    int groups, ta, tb, n, k;
    const int32_t *m; // (groups) rows per group
    float alpha, beta;
    const uint16_t *a;
    int lda;
    size_t a_stride;
    const uint16_t *b;
    int ldb;
    size_t b_stride;
    int b_groups;
    void *c;
    dsmoe_dtype c_type;
    int ldc;
    size_t c_stride;
    dsmoe_epilogue epi;
    const float *bias;
    size_t bias_stride;
    void *aux; // c_type
} cpu_bf16_job;

dsmoe_status cpu_bf16_gemm_run(cpu_ctx *ctx, const char *op, const cpu_bf16_job *J);
// A checked grouped weight gradient with bfloat16 dy and x (cpu_gemm_grouped_wgrad's contract).
dsmoe_status cpu_bf16_wgrad_run(cpu_ctx *ctx, const dsmoe_grouped_wgrad *G);
void cpu_bf16_free_slots(cpu_ctx *ctx);

#endif
