// plugins/cpu/cpu_scratch.c: the context's scratch arena: the per-thread float32 rows of the ops that
// widen bfloat16 themselves (layer norm, GELU, the loss, the residual-MoE mix, attention, gating,
// cached attention) and sampling's sort space.
// defines: cpu_stage_reserve, cpu_stage_rows, cpu_stage_release, cpu_stage_free
//
// An op takes its scratch from one block per context that grows to the largest call's need and is
// kept until finalize. Allocating it per call cost more than the work on it: glibc hands blocks of
// megabytes back to the kernel on free, so every call page-faulted its scratch afresh (about 10 000
// faults per W1 MoE step when the bf16 ops made float32 copies of whole tensors, docs/performance.md).
// One arena per context is enough because a context's ops never overlap: each runs to its end before
// it returns, from the one host thread that owns the context (docs/plugins.md), and no op that holds
// the arena calls another that takes it.
#include <stdlib.h>

#include "cpu_internal.h" // cpu_ctx, cpu_block, cpu_fail

// The arena keeps at most this much: a call that needs more (sampling a large batch of a large
// vocabulary) gets its own block for the call, so that the plugin never holds memory the plan
// (docs/precision.md) does not count.
#define CPU_STAGE_KEEP ((size_t)64 << 20)

void cpu_stage_free(cpu_ctx *ctx) {
    free(ctx->stage);
    free(ctx->stage_once);
    ctx->stage = ctx->stage_once = NULL;
    ctx->stage_bytes = 0;
}

// A smaller arena is freed first (its contents are dead between calls), so growing never holds both.
dsmoe_status cpu_stage_reserve(cpu_ctx *ctx, const char *op, size_t bytes, void **base) {
    *base = ctx->stage;
    if (bytes <= ctx->stage_bytes)
        return DSMOE_OK;
    size_t rounded;
    if (bytes > CPU_STAGE_KEEP) {
        *base = ctx->stage_once = cpu_block(bytes, &rounded);
    } else {
        free(ctx->stage);
        ctx->stage_bytes = 0;
        *base = ctx->stage = cpu_block(bytes, &rounded);
        if (ctx->stage) ctx->stage_bytes = rounded;
    }
    if (!*base)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: %s: cannot allocate %zu bytes of scratch", op, bytes);
    return DSMOE_OK;
}

dsmoe_status cpu_stage_rows(cpu_ctx *ctx, const char *op, int bf, int threads, size_t per_thread, float **rows) {
    *rows = NULL;
    if (!bf || per_thread == 0)
        return DSMOE_OK;
    return cpu_stage_reserve(ctx, op, (size_t)threads * per_thread * sizeof(float), (void **)rows);
}

void cpu_stage_release(cpu_ctx *ctx) {
    free(ctx->stage_once);
    ctx->stage_once = NULL;
}
