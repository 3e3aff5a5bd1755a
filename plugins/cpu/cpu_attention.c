// plugins/cpu/cpu_attention.c: causal multi-head self-attention of the cpu plugin, forward beside
// backward, in float32 or bfloat16, and the masked softmax cached attention shares (cpu_infer.c).
// defines: cpu_attention_bytes, cpu_attention_forward, cpu_attention_backward, cpu_causal_softmax_rows
//
// Contracts are include/dsmoe/kernel_plugin.h's. qkv (B*T, 3M) = per token [q | k | v]; head h uses
// columns [h*hs, (h+1)*hs) of each part, hs = M/NH. saved = att (B, NH, T, T): the softmax
// probabilities, float32 in either dtype. Work units are (b, h) pairs, each a few single-threaded BLAS
// GEMMs on (T, hs) views of its head; a pair owns its rows of out and dqkv, so pairs run in parallel and
// no result depends on the thread count. The float32 results are bitwise version 1's.
//
// bfloat16: a unit widens its head's (T, hs) blocks (q, k, v; in the backward dout and the dq, dk, dv it
// accumulates into) into the thread's part of the context's arena, runs the same float32 code on them,
// and rounds its output blocks once: the float32 op on the widened tensors, rounded
// (tests/plugins/kernel/test_cpu_bf16_rows.c), with 4 (forward) or 7 (backward) x T x hs floats per
// thread instead of float32 copies of whole tensors (8 x S x M floats in the backward, once the largest
// scratch of a training step).
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <cblas.h> // cblas_sgemm (called single-threaded, see cpu_blas_single_threaded)

#include "cpu_bf16.h"     // cpu_bf16_to_f32, cpu_f32_to_bf16
#include "cpu_internal.h" // CPU_BEGIN, CPU_ACT_DTYPE, CPU_REQUIRE, cpu_blas_single_threaded, cpu_stage_rows
#include "cpu_math.h"     // cpu_exp_fast

static dsmoe_status check_attention(cpu_ctx *ctx, const char *op, const dsmoe_attention_shape *sh) {
    CPU_REQUIRE(ctx, sh, "cpu: %s: NULL shape", op);
    CPU_ACT_DTYPE(ctx, op, "shape.dt", sh->dt);
    CPU_REQUIRE(ctx, sh->B >= 0 && sh->T >= 0 && sh->M > 0 && sh->NH > 0, "cpu: %s: B=%d T=%d M=%d NH=%d: expected "
                "B, T >= 0 and M, NH > 0", op, sh->B, sh->T, sh->M, sh->NH);
    CPU_REQUIRE(ctx, sh->M % sh->NH == 0, "cpu: %s: M=%d is not a multiple of NH=%d", op, sh->M, sh->NH);
    return DSMOE_OK;
}

// saved = the probabilities (B, NH, T, T); workspace = the backward's (B, NH, T, T) scratch; float32 in
// either dtype. ctx may be NULL (--plan asks before init): then a bad shape gives its status without a
// message.
dsmoe_status cpu_attention_bytes(cpu_ctx *ctx, const dsmoe_attention_shape *shape, size_t *saved,
                                 size_t *workspace) {
    if (!ctx) {
        if (!shape || !saved || !workspace)
            return DSMOE_ERR_INVALID;
        if (shape->dt != DSMOE_FLOAT32 && shape->dt != DSMOE_BFLOAT16)
            return DSMOE_ERR_UNSUPPORTED;
        if (shape->B < 0 || shape->T < 0 || shape->M <= 0 || shape->NH <= 0 || shape->M % shape->NH)
            return DSMOE_ERR_INVALID;
    } else {
        CPU_REQUIRE(ctx, saved && workspace, "cpu: attention_bytes: NULL saved or workspace");
        CPU_TRY(check_attention(ctx, "attention_bytes", shape));
    }
    size_t n = (size_t)shape->B * (size_t)shape->NH * (size_t)shape->T * (size_t)shape->T * sizeof(float);
    *saved = n;
    *workspace = n;
    return DSMOE_OK;
}

// Masked softmax of `rows` rows of a (rows, ld) block in place: row t keeps columns [0, first + t],
// the rest of its ld columns become 0. Attention: first = 0 (causal); cached attention: first = the
// position of the block's first query.
void cpu_causal_softmax_rows(float *a, int rows, int ld, int first) {
    for (int t = 0; t < rows; t++) {
        float *row = a + (size_t)t * ld, maxv = -INFINITY;
        int last = first + t;
        for (int t2 = 0; t2 <= last; t2++)
            maxv = row[t2] > maxv ? row[t2] : maxv;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int t2 = 0; t2 <= last; t2++) {
            row[t2] = cpu_exp_fast(row[t2] - maxv);
            sum += row[t2];
        }
        float inv = (float)(1.0 / sum);
        for (int t2 = 0; t2 <= last; t2++)
            row[t2] *= inv;
        for (int t2 = last + 1; t2 < ld; t2++)
            row[t2] = 0.0f;
    }
}

// A (T, hs) head view: float32 in place (ld as in the tensor), or bfloat16 widened into w (ld hs).
typedef struct head_view {
    float *p;
    int ld;
} head_view;

// w: the thread's scratch blocks (NULL for float32), the view's is block `slot`.
static head_view head_in(int bf, const void *base, size_t at, int ld, int T, int hs, float *ws, int slot) {
    if (!bf)
        return (head_view){(float *)base + at, ld};
    float *w = ws + (size_t)slot * T * hs;
    for (int t = 0; t < T; t++)
        cpu_bf16_to_f32(w + (size_t)t * hs, (const uint16_t *)base + at + (size_t)t * ld, (size_t)hs);
    return (head_view){w, hs};
}

// Rounds a widened view back into the bfloat16 tensor; nothing for float32 (written in place).
static void head_out(int bf, void *base, size_t at, int ld, int T, int hs, head_view v) {
    if (!bf)
        return;
    for (int t = 0; t < T; t++)
        cpu_f32_to_bf16((uint16_t *)base + at + (size_t)t * ld, v.p + (size_t)t * hs, (size_t)hs);
}

// Per (b, h): a = softmax(scale q k^T, causal), out = a v. The full (T, T) product is computed and the
// upper triangle masked: twice the causal work, at BLAS speed.
dsmoe_status cpu_attention_forward(cpu_ctx *ctx, cpu_queue *q, void *out, void *saved, const void *qkv,
                                   const dsmoe_attention_shape *shape) {
    CPU_BEGIN(ctx, q, "attention_forward");
    CPU_TRY(check_attention(ctx, "attention_forward", shape));
    const int B = shape->B, T = shape->T, M = shape->M, NH = shape->NH;
    if (B == 0 || T == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && saved && qkv, "cpu: attention_forward: NULL out, saved or qkv");
    const int hs = M / NH, ld = 3 * M, units = B * NH, bf = shape->dt == DSMOE_BFLOAT16;
    const size_t blk = (size_t)T * hs;
    float *att = saved, *scratch; // scratch: (threads, 4 blocks) q, k, v, out
    CPU_TRY(cpu_stage_rows(ctx, "attention_forward", bf, ctx->threads, 4 * blk, &scratch));
    float scale = 1.0f / sqrtf((float)hs);
    cpu_blas_single_threaded();
#pragma omp parallel for num_threads(ctx->threads) schedule(dynamic, 1) if (units > 1 && (long)T * T * hs >= 4096)
    for (int u = 0; u < units; u++) {
        int h = u % NH, b = u / NH;
        size_t head = (size_t)b * T * ld + (size_t)h * hs, o_at = (size_t)b * T * M + (size_t)h * hs;
        float *w = bf ? scratch + (size_t)omp_get_thread_num() * 4 * blk : NULL;
        head_view qv = head_in(bf, qkv, head, ld, T, hs, w, 0), kv = head_in(bf, qkv, head + M, ld, T, hs, w, 1);
        head_view vv = head_in(bf, qkv, head + 2 * (size_t)M, ld, T, hs, w, 2);
        head_view ov = bf ? (head_view){w + 3 * blk, hs} : (head_view){(float *)out + o_at, M};
        float *a = att + (size_t)u * T * T; // (T, T) block (b, h) of att
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, qv.p, qv.ld, kv.p, kv.ld, 0.0f, a, T);
        cpu_causal_softmax_rows(a, T, T, 0);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, a, T, vv.p, vv.ld, 0.0f, ov.p, ov.ld);
        head_out(bf, out, o_at, M, T, hs, ov);
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}

// Per (b, h): da = dout v^T; dv += a^T dout; dpre = a * (da - rowsum(a * da)) (softmax backward,
// 0 above the diagonal since a is); dq += scale dpre k; dk += scale dpre^T q. The (b, h) pair owns
// all its rows of dq, dk, dv, so pairs run in parallel; scratch block (b, h) of the workspace holds da,
// then dpre. `out` is not needed (the probabilities are saved).
dsmoe_status cpu_attention_backward(cpu_ctx *ctx, cpu_queue *q, void *dqkv, void *workspace, const void *dout,
                                    const void *qkv, const void *out, const void *saved,
                                    const dsmoe_attention_shape *shape) {
    (void)out;
    CPU_BEGIN(ctx, q, "attention_backward");
    CPU_TRY(check_attention(ctx, "attention_backward", shape));
    const int B = shape->B, T = shape->T, M = shape->M, NH = shape->NH;
    if (B == 0 || T == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dqkv && workspace && dout && qkv && saved,
                "cpu: attention_backward: NULL dqkv, workspace, dout, qkv or saved");
    const int hs = M / NH, ld = 3 * M, units = B * NH, bf = shape->dt == DSMOE_BFLOAT16;
    const size_t blk = (size_t)T * hs;
    float *ws = workspace, *scratch; // scratch: (threads, 7 blocks) q, k, v, dout, dq, dk, dv
    const float *att = saved;
    CPU_TRY(cpu_stage_rows(ctx, "attention_backward", bf, ctx->threads, 7 * blk, &scratch));
    float scale = 1.0f / sqrtf((float)hs);
    cpu_blas_single_threaded();
#pragma omp parallel for num_threads(ctx->threads) schedule(dynamic, 1) if (units > 1 && (long)T * T * hs >= 4096)
    for (int u = 0; u < units; u++) {
        int h = u % NH, b = u / NH;
        size_t head = (size_t)b * T * ld + (size_t)h * hs, g_at = (size_t)b * T * M + (size_t)h * hs;
        float *w = bf ? scratch + (size_t)omp_get_thread_num() * 7 * blk : NULL;
        head_view qv = head_in(bf, qkv, head, ld, T, hs, w, 0), kv = head_in(bf, qkv, head + M, ld, T, hs, w, 1);
        head_view vv = head_in(bf, qkv, head + 2 * (size_t)M, ld, T, hs, w, 2);
        head_view gv = head_in(bf, dout, g_at, M, T, hs, w, 3);
        head_view dq = head_in(bf, dqkv, head, ld, T, hs, w, 4), dk = head_in(bf, dqkv, head + M, ld, T, hs, w, 5);
        head_view dv = head_in(bf, dqkv, head + 2 * (size_t)M, ld, T, hs, w, 6);
        const float *a = att + (size_t)u * T * T;
        float *d = ws + (size_t)u * T * T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.0f, gv.p, gv.ld, vv.p, vv.ld, 0.0f, d, T);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, a, T, gv.p, gv.ld, 1.0f, dv.p, dv.ld);
        for (int t = 0; t < T; t++) {
            const float *ar = a + (size_t)t * T;
            float *dr = d + (size_t)t * T;
            double c = 0.0;
#pragma omp simd reduction(+ : c)
            for (int t2 = 0; t2 <= t; t2++)
                c += (double)ar[t2] * dr[t2];
            for (int t2 = 0; t2 <= t; t2++)
                dr[t2] = ar[t2] * (dr[t2] - (float)c);
            for (int t2 = t + 1; t2 < T; t2++)
                dr[t2] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, scale, d, T, kv.p, kv.ld, 1.0f, dq.p, dq.ld);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, scale, d, T, qv.p, qv.ld, 1.0f, dk.p, dk.ld);
        head_out(bf, dqkv, head, ld, T, hs, dq);
        head_out(bf, dqkv, head + M, ld, T, hs, dk);
        head_out(bf, dqkv, head + 2 * (size_t)M, ld, T, hs, dv);
    }
    cpu_stage_release(ctx);
    return DSMOE_OK;
}
