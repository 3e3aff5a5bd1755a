// kernels/gemm.h: the GEMM family of the cuda plugin on cuBLAS: the plain GEMM, the grouped GEMM of the
// MoE expert stages with its fused epilogues (bias, bias + GELU, GELU backward), and the grouped weight
// (and bias) gradients. Launchers follow kernels/cuda_env.h: the arguments of the ABI member
// (include/dsmoe/kernel_plugin.h: gemm, gemm_grouped, gemm_grouped_wgrad) after `q`, with `env` first.
// defines: dsmoe_cu_gemm, dsmoe_cu_gemm_grouped, dsmoe_cu_gemm_grouped_wgrad (gemm.cu),
//          dsmoe_cu_gemm_grouped_rows (gemm_rows.cu), dsmoe_cu_gemm_grouped_lt (gemm_lt.cu)
//
// Operand dtypes: all float32 (TF32 tensor cores when env->allow_tf32), or a and b bfloat16 with c
// float32 or bfloat16; anything else is DSMOE_ERR_UNSUPPORTED. Accumulation is float32.
#ifndef DSMOE_KERNELS_GEMM_H
#define DSMOE_KERNELS_GEMM_H
#include "cuda_env.h"

DSMOE_EXTERN_C_BEGIN

// c (m, n) = alpha * op(a) @ op(b) + beta * c, row-major with leading dimensions (BLAS semantics: with
// beta == 0, c is not read; with k == 0, c = beta * c).
dsmoe_status dsmoe_cu_gemm(const dsmoe_cu_env *env, int trans_a, int trans_b, int m, int n, int k, float alpha,
                           const void *a, dsmoe_dtype a_type, int lda, const void *b, dsmoe_dtype b_type, int ldb,
                           float beta, void *c, dsmoe_dtype c_type, int ldc);

// dsmoe_grouped_gemm: dsmoe_cu_gemm_grouped_rows where it takes the problem (few rows a group); then,
// with env->fused_epilogues, dsmoe_cu_gemm_grouped_lt where cuBLASLt takes it; otherwise (and as its fallback) one batched cuBLAS GEMM over all groups at m_max rows into
// float32 scratch, then one epilogue kernel that writes only the rows below each group's device count.
dsmoe_status dsmoe_cu_gemm_grouped(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *g);

// The grouped GEMM of few rows on CUDA cores (gemm_rows.cu), for a descriptor dsmoe_cu_gemm_grouped has
// checked: *taken = 1 when it took it (env->expert_rows_max >= m_max > 0, more than one group, trans_b,
// k > 0): an empty group reads nothing of its weights, rows from its count on are not written, and a
// count outside [0, m_max] is the sticky fault. *taken = 0: nothing was enqueued.
dsmoe_status dsmoe_cu_gemm_grouped_rows(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *g, int *taken);

// The grouped GEMM in one cuBLASLt call per round of b_groups groups, the epilogue fused (gemm_lt.cu),
// for a descriptor dsmoe_cu_gemm_grouped has checked. *taken = 0 with DSMOE_OK: cuBLASLt has no kernel
// for it (or k == 0, or the aux epilogue's ldc / c_stride are not multiples of 8) and nothing was
// enqueued. *taken = 1: the GEMMs are enqueued (or the returned error says why not); counts are not
// checked here. Writes every row up to m_max of c (and aux), which the ABI allows.
dsmoe_status dsmoe_cu_gemm_grouped_lt(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *g, int *taken);

// dsmoe_grouped_wgrad: groups are masked into zero-padded scratch, then one strided-batched GEMM per
// round of b_groups groups (ascending), and a fixed-order column-sum kernel for dbias.
dsmoe_status dsmoe_cu_gemm_grouped_wgrad(const dsmoe_cu_env *env, const dsmoe_grouped_wgrad *g);

DSMOE_EXTERN_C_END

#endif
