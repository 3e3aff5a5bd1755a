// plugins/cpu/cpu_bf16_ops.c: the bfloat16 members of the cpu plugin's ops that do not take bfloat16
// rows themselves (embedding, GELU as an op, the gate's noise, sampling; all_finite reads the bits), and
// the context's scratch arena. Those that do: the GEMMs, convert, MoE dispatch and combine
// (cpu_gating.c), the KV cache's two (cpu_infer.c), attention (cpu_attention.c), layer norm, the loss
// and the residual-MoE mix (cpu_ops.c), bias_add, bias_backward and axpy (cpu_elementwise.c): the ops of
// every layer, or that read only part of a tensor, or whose copies would be the largest (the loss's
// (S, V) logits, attention's 8 x (S, M)). The table (cpu_plugin.c) points at these; float32 (and any
// type the plugin refuses) goes straight to the float32 op, which checks and refuses as before.
// defines: cpu_bf16_<op> for the ops listed in the table section of cpu_plugin.c, cpu_stage_reserve,
//          cpu_stage_rows, cpu_stage_release, cpu_bf16_stage_free
//
// A bf16 call stages its tensors: each bfloat16 input is converted to a float32 copy, the float32 op
// runs on the copies, and each output is rounded back to bfloat16 (round to nearest even) when it
// succeeded. Outputs that accumulate (+=) are staged both ways; outputs that are assigned only back.
// So the bf16 result is exactly the float32 op on the bf16 inputs, rounded once: what the kernel
// contract asks (float32 accumulation) and what the conformance suite's reference computes. It costs
// a float32 copy of every bf16 tensor of the call and the conversions (vectorised, over the threads):
// these ops are memory-bound either way, and the GEMMs, where bf16 pays, run natively
// (cpu_gemm_bf16.c). all_finite reads bfloat16 bits directly.
//
// The copies live in the context's staging arena (ctx->stage), one after another: it grows to the
// largest call's need and is kept until finalize. Allocating them per call cost more than the copies
// themselves: glibc hands blocks of megabytes back to the kernel on free, so every call page-faulted
// its copies afresh (about 10 000 faults per W1 MoE step, docs/performance.md). One arena per context
// is enough because a context's ops never overlap: each runs to its end before it returns, from the
// one host thread that owns the context (docs/plugins.md), and no op calls another bf16 op.
//
// Shapes are checked by the float32 op: a negative size or a NULL pointer stages nothing, and the
// op's own message names the problem.
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_bf16.h" // conversions

typedef enum { ST_IN, ST_OUT, ST_INOUT } st_role;

typedef struct st_arg {
    const void *p; // the caller's bfloat16 tensor
    size_t n;      // elements
    st_role role;
    float *f; // its float32 copy in the arena (p itself when nothing was staged)
} st_arg;

// Product of sizes; 0 when one is negative (the float32 op reports it).
static size_t count(int k, ...) {
    va_list ap;
    va_start(ap, k);
    size_t n = 1;
    for (int i = 0; i < k; i++) {
        long d = va_arg(ap, long);
        n = d < 0 ? 0 : n * (size_t)d;
    }
    va_end(ap);
    return n;
}
#define N1(a) count(1, (long)(a))
#define N2(a, b) count(2, (long)(a), (long)(b))
#define N3(a, b, c) count(3, (long)(a), (long)(b), (long)(c))
#define N4(a, b, c, d) count(4, (long)(a), (long)(b), (long)(c), (long)(d))

#define ST_ALIGN 64 // each copy starts on a cache line (and an AVX-512 vector)
// The arena keeps at most this much: a call that needs more (the loss's (S, V) logits of a large
// vocabulary) gets its own block for the call, so that the plugin never holds gigabytes the memory plan
// (docs/precision.md) does not count; such a call's work dwarfs its page faults anyway.
#define CPU_STAGE_KEEP ((size_t)64 << 20)
#define ST_MAX 8    // tensors one op may stage (STAGED checks it at compile time; 5 today)

void cpu_bf16_stage_free(cpu_ctx *ctx) {
    free(ctx->stage);
    free(ctx->stage_once);
    ctx->stage = ctx->stage_once = NULL;
    ctx->stage_bytes = 0;
}

// The arena holds at least `bytes`. A smaller one is freed first (its contents are dead between
// calls), so growing never holds both.
// *base: where the call's copies go.
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
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: %s: cannot allocate %zu bytes of float32 scratch", op, bytes);
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

static dsmoe_status stage(cpu_ctx *ctx, const char *op, st_arg *a, int na) {
    size_t off[ST_MAX], total = 0;
    for (int i = 0; i < na; i++) {
        a[i].f = (float *)a[i].p;
        off[i] = total;
        if (!a[i].p || a[i].n == 0)
            continue;
        size_t room = SIZE_MAX - total;
        if (room < ST_ALIGN || a[i].n > (room - ST_ALIGN) / sizeof(float))
            return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: %s: float32 copies of %zu bfloat16 values overflow "
                            "size_t", op, a[i].n);
        total += (a[i].n * sizeof(float) + ST_ALIGN - 1) & ~(size_t)(ST_ALIGN - 1);
    }
    char *base;
    CPU_TRY(cpu_stage_reserve(ctx, op, total, (void **)&base));
    for (int i = 0; i < na; i++) {
        if (!a[i].p || a[i].n == 0)
            continue;
        a[i].f = (float *)(base + off[i]);
        if (a[i].role != ST_OUT)
            cpu_bf16_to_f32_par(ctx, a[i].f, a[i].p, a[i].n);
    }
    return DSMOE_OK;
}

// Rounds the outputs back when the op succeeded; returns the op's status. The arena stays; a call's own
// block goes.
static dsmoe_status unstage(cpu_ctx *ctx, st_arg *a, int na, dsmoe_status s) {
    for (int i = 0; i < na && s == DSMOE_OK; i++)
        if (a[i].role != ST_IN && a[i].f != a[i].p)
            cpu_f32_to_bf16_par(ctx, (uint16_t *)a[i].p, a[i].f, a[i].n);
    cpu_stage_release(ctx);
    return s;
}

// Runs `call` (the float32 op on A[i].f) on the staged arguments A of a bfloat16 op.
#define STAGED(op, call)                                                                           \
    do {                                                                                           \
        CPU_BEGIN(ctx, q, op);                                                                     \
        _Static_assert(sizeof A / sizeof A[0] <= ST_MAX, "more staged tensors than ST_MAX");       \
        int na_ = (int)(sizeof A / sizeof A[0]);                                                   \
        CPU_TRY(stage(ctx, op, A, na_));                                                           \
        return unstage(ctx, A, na_, (call));                                                       \
    } while (0)

// The staged arguments A of an op: its bfloat16 tensors with their sizes and roles.
#define IN(p, n) {(p), (n), ST_IN, NULL}
#define OUT(p, n) {(p), (n), ST_OUT, NULL}
#define INOUT(p, n) {(p), (n), ST_INOUT, NULL}

#define F32 DSMOE_FLOAT32
#define IS_BF16(dt) ((dt) == DSMOE_BFLOAT16)

// ---------------------------------------------------------------------------------------------------
// Element-wise and small ops

dsmoe_status cpu_bf16_mul_uniform_noise(cpu_ctx *ctx, cpu_queue *q, void *out, const void *in, dsmoe_dtype dt,
                                        size_t n, float eps, uint64_t seed, uint64_t offset) {
    if (!IS_BF16(dt))
        return cpu_mul_uniform_noise(ctx, q, out, in, dt, n, eps, seed, offset);
    st_arg A[] = {OUT(out, n), IN(in, n)};
    STAGED("mul_uniform_noise", cpu_mul_uniform_noise(ctx, q, A[0].f, A[1].f, F32, n, eps, seed, offset));
}

// bfloat16 bits: exponent all ones = Inf or NaN.
dsmoe_status cpu_bf16_all_finite(cpu_ctx *ctx, cpu_queue *q, const void *x_, dsmoe_dtype dt, size_t n, int32_t *out) {
    if (!IS_BF16(dt))
        return cpu_all_finite(ctx, q, x_, dt, n, out);
    CPU_BEGIN(ctx, q, "all_finite");
    CPU_REQUIRE(ctx, out, "cpu: all_finite: NULL out");
    CPU_REQUIRE(ctx, x_ || n == 0, "cpu: all_finite: NULL x with n=%zu", n);
    const uint16_t *x = x_;
    uint32_t bad = 0;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) reduction(| : bad) if (n >= CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++)
        bad |= (x[i] & 0x7f80u) == 0x7f80u;
    *out = !bad;
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// GPT layer ops

dsmoe_status cpu_bf16_embedding_forward(cpu_ctx *ctx, cpu_queue *q, void *out, dsmoe_dtype dt, const int32_t *tokens,
                                        const void *wte, dsmoe_dtype wte_dt, const float *wpe, const int32_t *pos,
                                        int B, int T, int M, int V, int n_pos) {
    if (!IS_BF16(dt))
        return cpu_embedding_forward(ctx, q, out, dt, tokens, wte, wte_dt, wpe, pos, B, T, M, V, n_pos);
    st_arg A[] = {OUT(out, N3(B, T, M))}; // wte is read as it is (cpu_embedding_forward widens bfloat16 rows)
    STAGED("embedding_forward",
           cpu_embedding_forward(ctx, q, A[0].f, F32, tokens, wte, wte_dt, wpe, pos, B, T, M, V, n_pos));
}

dsmoe_status cpu_bf16_embedding_backward(cpu_ctx *ctx, cpu_queue *q, float *dwte, float *dwpe, const void *dout,
                                         dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M, int V) {
    if (!IS_BF16(dt))
        return cpu_embedding_backward(ctx, q, dwte, dwpe, dout, dt, tokens, B, T, M, V);
    st_arg A[] = {IN(dout, N3(B, T, M))};
    STAGED("embedding_backward", cpu_embedding_backward(ctx, q, dwte, dwpe, A[0].f, F32, tokens, B, T, M, V));
}

dsmoe_status cpu_bf16_gelu_forward(cpu_ctx *ctx, cpu_queue *q, void *out, const void *in, dsmoe_dtype dt, size_t n) {
    if (!IS_BF16(dt))
        return cpu_gelu_forward(ctx, q, out, in, dt, n);
    st_arg A[] = {OUT(out, n), IN(in, n)};
    STAGED("gelu_forward", cpu_gelu_forward(ctx, q, A[0].f, A[1].f, F32, n));
}

dsmoe_status cpu_bf16_gelu_backward(cpu_ctx *ctx, cpu_queue *q, void *din, const void *in, const void *dout,
                                    dsmoe_dtype dt, size_t n) {
    if (!IS_BF16(dt))
        return cpu_gelu_backward(ctx, q, din, in, dout, dt, n);
    st_arg A[] = {INOUT(din, n), IN(in, n), IN(dout, n)};
    STAGED("gelu_backward", cpu_gelu_backward(ctx, q, A[0].f, A[1].f, A[2].f, F32, n));
}

// ---------------------------------------------------------------------------------------------------
// Inference (kv_append and attention_cached read bfloat16 caches in place: cpu_infer.c)

dsmoe_status cpu_bf16_sample(cpu_ctx *ctx, cpu_queue *q, int32_t *tokens, const void *logits, dsmoe_dtype dt, int rows,
                             int V, const dsmoe_sampling_params *p, const uint64_t *counters) {
    if (!IS_BF16(dt))
        return cpu_sample(ctx, q, tokens, logits, dt, rows, V, p, counters);
    st_arg A[] = {IN(logits, N2(rows, V))};
    STAGED("sample", cpu_sample(ctx, q, tokens, A[0].f, F32, rows, V, p, counters));
}
