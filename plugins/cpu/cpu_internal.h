// plugins/cpu/cpu_internal.h: what the files of the cpu plugin share: the context, its host queue,
// the error rules, and the declarations of every op (the table in cpu_plugin.c points at them).
// Files: cpu_plugin.c (table, context, queues, events), cpu_memory.c (memory, copies, conversions),
// cpu_scratch.c (the scratch arena), cpu_gemm.c (GEMM, grouped GEMM with epilogues, weight gradients),
// cpu_bf16.c, cpu_dnnl.c and cpu_gemm_bf16.c (bfloat16: cpu_bf16.h lists them), cpu_elementwise.c
// (bias, vector ops, reductions, AdamW, init), cpu_ops.c (GPT layer ops), cpu_attention.c (causal
// attention), cpu_gating.c (gating, dispatch, combine), cpu_infer.c (KV cache, cached attention,
// sampling), cpu_vec.c (GELU row kernels in two vector widths).
// cpu_math.h holds the inline float math that must be the same code wherever it runs (GELU in its op and
// in the GEMM epilogue, both through cpu_vec.c).
//
// The queue model of this plugin: every op runs synchronously on the calling thread, spread over the
// context's OpenMP threads, before it returns; a queue is an in-order host queue that is always
// drained, and events are always complete. Errors (include/dsmoe/kernel_plugin.h, "Errors"):
// - cpu_fail: a bad call found before any work (shape, NULL, dtype): returned, nothing else changes.
// - cpu_sticky: bad data found while running (a token out of range, a count above its bound): the
//   first one is remembered in ctx->sticky and returned by that call and by every later call.
// Threading rules of the ops: every parallel loop is `num_threads(ctx->threads)` and gives each output
// element to exactly one thread; a sum over rows is computed by the thread that owns the output column
// (or row), in index order. So no result depends on the thread count.
#ifndef DSMOE_CPU_INTERNAL_H
#define DSMOE_CPU_INTERNAL_H
#include <stdarg.h>
#include <stdio.h>
#include "dsmoe/kernel_plugin.h"

#include "cpu_vec.h" // cpu_vec

struct dsmoe_kernel_queue {
    dsmoe_kernel_ctx *ctx;           // the owner (ops check that a queue belongs to their context)
    struct dsmoe_kernel_queue *next; // ctx's list of queues made by queue_create
};

struct dsmoe_kernel_event {
    dsmoe_kernel_ctx *ctx;
    struct dsmoe_kernel_event *next; // ctx's list of events, freed by finalize if the caller did not
};

struct dsmoe_kernel_ctx {
    int threads;                     // OpenMP threads used by our loops (BLAS runs single-threaded per tile)
    int poison;                      // alloc() without DSMOE_ALLOC_ZERO fills with 0xFF bytes (NaN floats)
    int small_rows;                  // float32 GEMMs a @ b^T of at most this many rows (per group) run as
                                     // dot products (cpu_gemm.c rows_dot); 0 = OpenBLAS tiles always
    const cpu_vec *vec;              // the GELU kernels of the `simd` setting (cpu_vec.c)
    dsmoe_status sticky;             // first error found while running; DSMOE_OK when none
    dsmoe_kernel_queue queue;        // the default queue
    dsmoe_kernel_queue *queues;      // made by queue_create
    dsmoe_kernel_event *events;      // made by event_create
    char error[1024];                // last_error()
    char description[768];           // describe()
    struct cpu_dnnl *dnnl;           // oneDNN for bf16 GEMMs (cpu_dnnl.c); NULL: they are emulated
    struct cpu_bf16_slot *bf16_slots; // (threads) scratch of bf16 GEMMs (cpu_gemm_bf16.c), made on first use
    void *stage;                     // the scratch arena (cpu_scratch.c): bf16 ops' widened rows, cached
                                     // attention's blocks, sampling's sort space; grown to the
    size_t stage_bytes;              // largest call's need up to CPU_STAGE_KEEP, kept until the context goes
    void *stage_once;                // a call's scratch beyond CPU_STAGE_KEEP: freed when it returns
};

// Loops over fewer than this many floats run on one thread: a fork/join costs a few microseconds.
#define CPU_PAR_MIN 16384

// Records a message in ctx->error and returns status (an error found before any work ran).
static inline dsmoe_status cpu_fail(dsmoe_kernel_ctx *ctx, dsmoe_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
    return status;
}

// A data error found while running: the first one becomes the context's sticky error. Returns it.
static inline dsmoe_status cpu_sticky(dsmoe_kernel_ctx *ctx, dsmoe_status status, const char *fmt, ...) {
    if (ctx->sticky != DSMOE_OK)
        return ctx->sticky;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
    ctx->sticky = status;
    return status;
}

// Start of every call that takes a queue: a sticky error ends the context; q must be one of its queues.
static inline dsmoe_status cpu_begin(dsmoe_kernel_ctx *ctx, const dsmoe_kernel_queue *q, const char *op) {
    if (!ctx)
        return DSMOE_ERR_INVALID;
    if (ctx->sticky != DSMOE_OK)
        return ctx->sticky;
    if (!q || q->ctx != ctx)
        return cpu_fail(ctx, DSMOE_ERR_INVALID, "cpu: %s: the queue is %s", op,
                        q ? "not one of this context's queues" : "NULL");
    return DSMOE_OK;
}

// The ops compute in float32 (bfloat16 tensors are widened as they are read, and the bf16 GEMMs run in
// cpu_gemm_bf16.c); an op that takes float32 only refuses anything else before any work.
static inline dsmoe_status cpu_dtype(dsmoe_kernel_ctx *ctx, const char *op, const char *arg, dsmoe_dtype dt) {
    if (dt == DSMOE_FLOAT32)
        return DSMOE_OK;
    return cpu_fail(ctx, DSMOE_ERR_UNSUPPORTED, "cpu: %s: %s is %s: this plugin's activations are float32 or "
                    "bfloat16", op, arg, dsmoe_dtype_name(dt));
}

#define CPU_TRY(call)                                                                              \
    do {                                                                                           \
        dsmoe_status try_s_ = (call);                                                              \
        if (try_s_ != DSMOE_OK)                                                                    \
            return try_s_;                                                                         \
    } while (0)

#define CPU_BEGIN(ctx, q, op) CPU_TRY(cpu_begin((ctx), (q), (op)))
#define CPU_DTYPE(ctx, op, arg, dt) CPU_TRY(cpu_dtype((ctx), (op), (arg), (dt)))
// For the ops whose activations may be float32 or bfloat16.
#define CPU_ACT_DTYPE(ctx, op, arg, dt)                                                            \
    CPU_TRY((dt) == DSMOE_BFLOAT16 ? DSMOE_OK : cpu_dtype((ctx), (op), (arg), (dt)))

// Returns DSMOE_ERR_INVALID with the formatted message when cond is false. The message names the op
// and what was expected: "cpu: gemm: lda=3 < k=5 (a is (m, k), not transposed)".
#define CPU_REQUIRE(ctx, cond, ...)                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            return cpu_fail((ctx), DSMOE_ERR_INVALID, __VA_ARGS__);                                \
    } while (0)

typedef dsmoe_kernel_ctx cpu_ctx;
typedef dsmoe_kernel_queue cpu_queue;

// --- cpu_memory.c ---
dsmoe_status cpu_alloc(cpu_ctx *ctx, size_t bytes, uint32_t flags, void **ptr);
void cpu_free(cpu_ctx *ctx, void *ptr);
dsmoe_status cpu_host_alloc(cpu_ctx *ctx, size_t bytes, void **ptr);
void cpu_host_free(cpu_ctx *ctx, void *ptr);
dsmoe_status cpu_copy_to_device(cpu_ctx *ctx, cpu_queue *q, void *dst, const void *src, size_t bytes);
dsmoe_status cpu_copy_to_host(cpu_ctx *ctx, cpu_queue *q, void *dst, const void *src, size_t bytes);
dsmoe_status cpu_copy(cpu_ctx *ctx, cpu_queue *q, void *dst, const void *src, size_t bytes);
dsmoe_status cpu_copy_2d(cpu_ctx *ctx, cpu_queue *q, void *dst, size_t dpitch, const void *src, size_t spitch,
                         size_t width, size_t rows);
dsmoe_status cpu_zero(cpu_ctx *ctx, cpu_queue *q, void *dst, size_t bytes);
dsmoe_status cpu_convert(cpu_ctx *ctx, cpu_queue *q, void *dst, dsmoe_dtype dst_type, const void *src,
                         dsmoe_dtype src_type, size_t n);
dsmoe_status cpu_mem_info(cpu_ctx *ctx, size_t *free_bytes, size_t *total_bytes);
// Host memory for the plugin's own scratch, aligned and huge-page hinted as alloc()'s (neither zeroed nor
// poisoned): *rounded gets its size. free() releases it; NULL when out of memory.
void *cpu_block(size_t bytes, size_t *rounded);

// --- cpu_scratch.c: the context's scratch arena ---
// *base gets at least `bytes`, 64-byte aligned, valid until the next reserve on ctx (the arena grows to
// the largest need up to 64 MiB and is kept; a larger need gets a block of its own). Call
// cpu_stage_release when the op is done with it (frees such a block). One op at a time per context:
// ops never overlap (docs/plugins.md).
dsmoe_status cpu_stage_reserve(cpu_ctx *ctx, const char *op, size_t bytes, void **base);
// The per-thread float32 rows of an op that widens bfloat16 itself: threads x per_thread floats of the
// arena, thread i's at *rows + i * per_thread; *rows = NULL (nothing reserved) when !bf.
dsmoe_status cpu_stage_rows(cpu_ctx *ctx, const char *op, int bf, int threads, size_t per_thread, float **rows);
void cpu_stage_release(cpu_ctx *ctx);
// Frees ctx's arena (finalize calls it; an op after it grows a new one).
void cpu_stage_free(cpu_ctx *ctx);

// --- cpu_gemm.c ---
// Puts OpenBLAS in single-threaded mode (if something changed it): every BLAS call of this plugin is
// single-threaded, and our OpenMP loops spread the calls (see cpu_gemm.c).
void cpu_blas_single_threaded(void);
// The output tile of every GEMM of this plugin (rows, columns): one single-threaded BLAS call each.
#define CPU_GEMM_TILE_M 256
#define CPU_GEMM_TILE_N 256
#define CPU_SMALL_ROWS_MAX 16 // the largest small_rows setting: past it, BLAS's packing pays for itself
dsmoe_status cpu_gemm(cpu_ctx *ctx, cpu_queue *q, int trans_a, int trans_b, int m, int n, int k, float alpha,
                      const void *a, dsmoe_dtype a_type, int lda, const void *b, dsmoe_dtype b_type, int ldb,
                      float beta, void *c, dsmoe_dtype c_type, int ldc);
dsmoe_status cpu_gemm_grouped(cpu_ctx *ctx, cpu_queue *q, const dsmoe_grouped_gemm *g);
dsmoe_status cpu_gemm_grouped_wgrad(cpu_ctx *ctx, cpu_queue *q, const dsmoe_grouped_wgrad *g);

// --- cpu_elementwise.c ---
dsmoe_status cpu_bias_add(cpu_ctx *ctx, cpu_queue *q, void *out, dsmoe_dtype dt, const float *bias, int rows, int n);
dsmoe_status cpu_bias_backward(cpu_ctx *ctx, cpu_queue *q, float *dbias, const void *dout, dsmoe_dtype dt, int rows,
                               int n);
dsmoe_status cpu_axpy(cpu_ctx *ctx, cpu_queue *q, void *y, float alpha, const void *x, dsmoe_dtype dt, size_t n);
dsmoe_status cpu_mul_uniform_noise(cpu_ctx *ctx, cpu_queue *q, void *out, const void *in, dsmoe_dtype dt, size_t n,
                                   float eps, uint64_t seed, uint64_t offset);
dsmoe_status cpu_sum_squares(cpu_ctx *ctx, cpu_queue *q, const float *x, size_t n, double *out);
dsmoe_status cpu_all_finite(cpu_ctx *ctx, cpu_queue *q, const void *x, dsmoe_dtype dt, size_t n, int32_t *out);
dsmoe_status cpu_init_tensor(cpu_ctx *ctx, cpu_queue *q, float *dst, size_t n, const dsmoe_init_params *p);
dsmoe_status cpu_adamw(cpu_ctx *ctx, cpu_queue *q, const dsmoe_adamw_params *hp, const dsmoe_adamw_tensor *tensors,
                       int n);

// --- cpu_attention.c ---
// Masked softmax of `rows` rows of a (rows, ld) block in place: row t keeps columns [0, first + t].
void cpu_causal_softmax_rows(float *a, int rows, int ld, int first);
dsmoe_status cpu_attention_bytes(cpu_ctx *ctx, const dsmoe_attention_shape *shape, size_t *saved, size_t *workspace);
dsmoe_status cpu_attention_forward(cpu_ctx *ctx, cpu_queue *q, void *out, void *saved, const void *qkv,
                                   const dsmoe_attention_shape *shape);
dsmoe_status cpu_attention_backward(cpu_ctx *ctx, cpu_queue *q, void *dqkv, void *workspace, const void *dout,
                                    const void *qkv, const void *out, const void *saved,
                                    const dsmoe_attention_shape *shape);

// --- cpu_ops.c ---
dsmoe_status cpu_embedding_forward(cpu_ctx *ctx, cpu_queue *q, void *out, dsmoe_dtype dt, const int32_t *tokens,
                                   const void *wte, dsmoe_dtype wte_dt, const float *wpe, const int32_t *pos, int B,
                                   int T, int M, int V, int n_pos);
dsmoe_status cpu_embedding_backward(cpu_ctx *ctx, cpu_queue *q, float *dwte, float *dwpe, const void *dout,
                                    dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M, int V);
dsmoe_status cpu_layernorm_forward(cpu_ctx *ctx, cpu_queue *q, void *out, float *mean, float *rstd, const void *in,
                                   dsmoe_dtype dt, const float *weight, const float *bias, int S, int M, float eps);
dsmoe_status cpu_layernorm_backward(cpu_ctx *ctx, cpu_queue *q, void *din, float *dweight, float *dbias,
                                    const void *dout, const void *in, dsmoe_dtype dt, const float *weight,
                                    const float *mean, const float *rstd, int S, int M);
dsmoe_status cpu_gelu_forward(cpu_ctx *ctx, cpu_queue *q, void *out, const void *in, dsmoe_dtype dt, size_t n);
dsmoe_status cpu_gelu_backward(cpu_ctx *ctx, cpu_queue *q, void *din, const void *in, const void *dout,
                               dsmoe_dtype dt, size_t n);
dsmoe_status cpu_crossentropy_forward(cpu_ctx *ctx, cpu_queue *q, float *losses, float *probs, const void *logits,
                                      dsmoe_dtype dt, const int32_t *targets, int S, int V);
dsmoe_status cpu_crossentropy_backward(cpu_ctx *ctx, cpu_queue *q, void *dlogits, dsmoe_dtype dt, const float *probs,
                                       const int32_t *targets, float dloss, int S, int V);
dsmoe_status cpu_residual_mix_forward(cpu_ctx *ctx, cpu_queue *q, void *out, float *coef, const void *moe,
                                      const void *mlp, dsmoe_dtype dt, const float *coef_logits, int S, int M);
dsmoe_status cpu_residual_mix_backward(cpu_ctx *ctx, cpu_queue *q, void *dmoe, void *dmlp, float *dcoef_logits,
                                       const void *dout, const void *moe, const void *mlp, dsmoe_dtype dt,
                                       const float *coef, int S, int M);

// --- cpu_gating.c ---
dsmoe_status cpu_gate_route(cpu_ctx *ctx, cpu_queue *q, const dsmoe_gating_params *p, const float *logits,
                            float *probs, int32_t *choice, int32_t *counts);
dsmoe_status cpu_gate_assign(cpu_ctx *ctx, cpu_queue *q, const dsmoe_gating_params *p, int C, const float *probs,
                             const int32_t *choice, int32_t *slot, float *weight, int32_t *kept, double *aux_sums);
dsmoe_status cpu_gate(cpu_ctx *ctx, cpu_queue *q, const dsmoe_gating_params *p, int C, const float *logits,
                      float *probs, int32_t *choice, int32_t *counts, int32_t *slot, float *weight, int32_t *kept,
                      double *aux_sums);
dsmoe_status cpu_gate_backward(cpu_ctx *ctx, cpu_queue *q, const dsmoe_gating_params *p, float *dlogits,
                               const float *probs, const int32_t *choice, const int32_t *slot, const float *dweight,
                               const double *aux_sums, float daux);
dsmoe_status cpu_moe_dispatch(cpu_ctx *ctx, cpu_queue *q, void *buf, const void *x, dsmoe_dtype dt,
                              const int32_t *choice, const int32_t *slot, int S, int K, int E, int C, int M);
dsmoe_status cpu_moe_dispatch_backward(cpu_ctx *ctx, cpu_queue *q, void *dx, const void *dbuf, dsmoe_dtype dt,
                                       const int32_t *choice, const int32_t *slot, int S, int K, int E, int C, int M);
dsmoe_status cpu_moe_combine(cpu_ctx *ctx, cpu_queue *q, void *out, const void *y, dsmoe_dtype dt,
                             const int32_t *choice, const int32_t *slot, const float *weight, int S, int K, int E,
                             int C, int M);
dsmoe_status cpu_moe_combine_backward(cpu_ctx *ctx, cpu_queue *q, void *dy, float *dweight, const void *dout,
                                      const void *y, dsmoe_dtype dt, const int32_t *choice, const int32_t *slot,
                                      const float *weight, int S, int K, int E, int C, int M);

// --- cpu_infer.c ---
dsmoe_status cpu_kv_append(cpu_ctx *ctx, cpu_queue *q, void *k_cache, void *v_cache, const void *qkv, dsmoe_dtype dt,
                           const int32_t *pos, int B, int T_new, int M, int NH, int T_max);
dsmoe_status cpu_attention_cached(cpu_ctx *ctx, cpu_queue *q, void *out, const void *qkv, const void *k_cache,
                                  const void *v_cache, dsmoe_dtype dt, const int32_t *pos, int B, int T_new, int M,
                                  int NH, int T_max);
dsmoe_status cpu_sample(cpu_ctx *ctx, cpu_queue *q, int32_t *tokens, const void *logits, dsmoe_dtype dt, int rows,
                        int V, const dsmoe_sampling_params *p, const uint64_t *counters);

#endif
