// plugins/cuda/cuda_internal.h: what the glue files of the cuda plugin share: the context, its queues
// (CUDA streams) and events, the error rules, and the functions the table in cuda_plugin.c points at.
// Files: cuda_plugin.c (settings, init/finalize, device queries, the table), cuda_queue.c (queues,
// events, synchronisation, the fault record, binding cuBLAS to a queue), cuda_memory.c (the buffer
// pool, pinned host memory, copies), cuda_ops.c (every compute member, forwarded to its launcher in
// kernels/). The launchers and what they receive (dsmoe_cu_env) are kernels/cuda_env.h.
//
// Errors (include/dsmoe/kernel_plugin.h, "Errors"):
// - cu_fail: a bad call found before any work (NULL, shape, dtype, an allocation that does not fit):
//   returned, the context stays usable.
// - cu_sticky: the context is broken: a data fault raised by a kernel (read from the fault record after a
//   synchronisation), or a CUDA error that is not the caller's argument (a device fault, a failed
//   launch). The first one is kept in ctx->sticky and returned by every later call.
// Every member that calls CUDA first makes ctx->device current: the core may call from a thread whose
// current device is another one.
#ifndef DSMOE_CUDA_INTERNAL_H
#define DSMOE_CUDA_INTERNAL_H
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <cublas_v2.h>
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "cuda_env.h" // dsmoe_cu_env, dsmoe_cu_fault (kernels/)
#include "dsmoe/kernel_plugin.h"

// An in-order queue: one non-blocking stream, and the env its launchers get.
struct dsmoe_kernel_queue {
    dsmoe_kernel_ctx *ctx;           // the owner (members check that a queue belongs to their context)
    cudaStream_t stream;             // non-blocking: never ordered with the legacy default stream
    cudaEvent_t tail;                // free(): records this queue's end for the default queue to wait on
    dsmoe_cu_env env;                // env.stream = stream; env.blas_workspace made at the first op
    struct dsmoe_kernel_queue *next; // ctx's list of queues made by queue_create
};

struct dsmoe_kernel_event {
    dsmoe_kernel_ctx *ctx;
    cudaEvent_t ev;                  // cudaEventDisableTiming
    struct dsmoe_kernel_event *next; // ctx's list, freed by finalize if the caller did not
};

// A buffer this context handed out (alloc or host_alloc), so that free can check and account for it
// and finalize can release what the caller did not. Open addressing on the pointer.
typedef struct cu_block {
    void *p;      // NULL = empty slot
    size_t bytes; // what was allocated (256 for alloc(0))
    int host;     // 1 = host_alloc (pinned host), 0 = alloc (the device pool)
} cu_block;

typedef struct cu_blocks {
    cu_block *slot;
    size_t cap;          // a power of two, or 0
    size_t n;            // used slots
    size_t device_bytes; // sum of the device blocks' bytes (what pool_limit_bytes bounds)
} cu_blocks;

// copy_to_device from pageable host memory goes through pinned slots used in turn (cuda_memory.c): a
// slot's `done` event is recorded after the copy that read it, and the slot is refilled only after that.
#define CU_STAGE_SLOTS 8
#define CU_STAGE_MAX ((size_t)4 << 20) // a slot grows up to this; a larger copy takes the driver's path
typedef struct cu_stage {
    void *p;          // pinned host memory (cudaHostAlloc), or NULL
    size_t cap;       // its bytes
    cudaEvent_t done; // recorded after the copy that reads p; NULL until the slot's first use
} cu_stage;

struct dsmoe_kernel_ctx {
    int device;              // CUDA ordinal
    char device_name[256];
    int cc_major, cc_minor;  // compute capability
    int sm_count;
    size_t total_mem;        // bytes of device memory
    int cublas_version;      // e.g. 130100 = 13.1.0

    // settings
    int tf32;                // float32 GEMMs may use TF32 tensor cores
    int fused;               // grouped GEMMs through cuBLASLt's fused epilogues (kernels/gemm_lt.cu)
    int attention_tc;        // bfloat16 attention on tensor cores (kernels/attention_tc.cu)
    int attention_tc_dropped; // asked for, but the device has no bfloat16 tensor cores (before sm_80)
    int expert_rows_max;     // grouped GEMMs of at most this many rows a group on kernels/gemm_rows.cu; 0 = never
    int decode_split_keys;   // cached attention (decode) splits its keys in runs of this many; 0 = never
    size_t pool_limit;       // bytes alloc() may hold at once; 0 = the device's memory is the limit
    size_t workspace_bytes;  // cuBLAS workspace per queue

    cudaMemPool_t pool;        // alloc(): stream-ordered, never released to the OS (threshold UINT64_MAX)
    cublasHandle_t blas;       // one handle, re-bound to the queue of each op (cu_bind_blas)
    cublasLtHandle_t blaslt;   // with `fused` only; stream and workspace are arguments of each call
    dsmoe_kernel_queue *blas_queue; // the queue blas is bound to (stream and workspace); NULL = none yet
    dsmoe_cu_fault *fault;     // the fault record: host view (mapped pinned memory)
    dsmoe_cu_fault *fault_dev; // the same record as device code addresses it (every env.fault)
    cu_blocks blocks;
    cu_stage stage[CU_STAGE_SLOTS];
    int stage_next;            // the slot the next staged copy takes

    dsmoe_status sticky;       // first error that broke the context; DSMOE_OK when none
    dsmoe_kernel_queue queue;  // the default queue: allocations and frees are ordered on it
    dsmoe_kernel_queue *queues; // made by queue_create
    dsmoe_kernel_event *events; // made by event_create

    char launch_msg[1024];   // env.msg of every queue: what a failing launcher wrote
    char error[1400];        // last_error()
    char description[768];   // describe()
};

// --- errors ---------------------------------------------------------------------------------------

// Records a message in ctx->error and returns status (a bad call found before any work ran). A broken
// context keeps its sticky error and message.
static inline dsmoe_status cu_fail(dsmoe_kernel_ctx *ctx, dsmoe_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline dsmoe_status cu_fail(dsmoe_kernel_ctx *ctx, dsmoe_status status, const char *fmt, ...) {
    if (ctx->sticky != DSMOE_OK)
        return ctx->sticky;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
    return status;
}

// The context is broken: the first such error is kept and returned by every later call. Returns it.
static inline dsmoe_status cu_sticky(dsmoe_kernel_ctx *ctx, dsmoe_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline dsmoe_status cu_sticky(dsmoe_kernel_ctx *ctx, dsmoe_status status, const char *fmt, ...) {
    if (ctx->sticky != DSMOE_OK)
        return ctx->sticky;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
    ctx->sticky = status;
    return status;
}

#define CU_TRY(call)                                                                               \
    do {                                                                                           \
        dsmoe_status try_s_ = (call);                                                              \
        if (try_s_ != DSMOE_OK)                                                                    \
            return try_s_;                                                                         \
    } while (0)

// Returns DSMOE_ERR_INVALID with the formatted message when cond is false.
#define CU_REQUIRE(ctx, cond, ...)                                                                 \
    do {                                                                                           \
        if (!(cond))                                                                               \
            return cu_fail((ctx), DSMOE_ERR_INVALID, __VA_ARGS__);                                 \
    } while (0)

// The result of a CUDA runtime call made by `op`: DSMOE_OK; a bad argument (invalid value, pointer,
// pitch or direction: the caller's) as DSMOE_ERR_INVALID; out of memory as DSMOE_ERR_NOMEM; anything
// else (a device fault, a launch failure, a lost driver) as a sticky DSMOE_ERR_SYSTEM. The runtime's
// last-error slot is cleared, so that the next launcher's check does not see this error again.
dsmoe_status cu_cuda(dsmoe_kernel_ctx *ctx, cudaError_t e, const char *op, const char *call);
// Same for a cuBLAS call (set-up only): any failure is DSMOE_ERR_SYSTEM, not sticky.
dsmoe_status cu_blas(dsmoe_kernel_ctx *ctx, cublasStatus_t s, const char *op, const char *call);

// Start of every member without a queue: ctx is not NULL, no sticky error, ctx->device is current.
dsmoe_status cu_enter(dsmoe_kernel_ctx *ctx, const char *op);
// Start of every member that takes a queue: cu_enter, and q is one of ctx's queues.
dsmoe_status cu_begin(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const char *op);

// --- cuda_queue.c ---------------------------------------------------------------------------------
// Creates q's stream and event and fills its env (q is zeroed by the caller); cu_queue_release undoes it
// after waiting for the queue's work (errors ignored: used on teardown).
dsmoe_status cu_queue_init(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q);
void cu_queue_release(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q);
// Binds the cuBLAS handle to q (stream and workspace; the workspace is made at q's first op), as the
// launchers assume (env->cublas works on env->stream).
dsmoe_status cu_bind_blas(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const char *op);
// After a synchronisation: a failed wait (e) or a fault a kernel recorded becomes the sticky error.
dsmoe_status cu_after_wait(dsmoe_kernel_ctx *ctx, cudaError_t e, const char *op, const char *call);
// Waits for every queue of ctx (used by host_free and finalize), then checks faults like cu_after_wait.
dsmoe_status cu_wait_all(dsmoe_kernel_ctx *ctx, const char *op);

dsmoe_kernel_queue *cu_default_queue(dsmoe_kernel_ctx *ctx);
dsmoe_status cu_queue_create(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue **q);
void cu_queue_destroy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q);
void *cu_queue_native(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q);
dsmoe_status cu_queue_enqueue_host(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void (*fn)(void *arg), void *arg);
dsmoe_status cu_queue_synchronize(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q);
dsmoe_status cu_synchronize(dsmoe_kernel_ctx *ctx);
dsmoe_status cu_event_create(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event **ev);
void cu_event_destroy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev);
dsmoe_status cu_event_record(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, dsmoe_kernel_queue *q);
dsmoe_status cu_queue_wait_event(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, dsmoe_kernel_event *ev);
dsmoe_status cu_event_synchronize(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev);
dsmoe_status cu_event_query(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, int *done);

// --- cuda_memory.c --------------------------------------------------------------------------------
// Creates ctx->pool (and raises the release threshold of the device's default pool, which the
// launchers' scratch comes from).
dsmoe_status cu_memory_init(dsmoe_kernel_ctx *ctx);
// finalize: frees every buffer the caller left, then the pool (after cu_wait_all).
void cu_memory_release(dsmoe_kernel_ctx *ctx);
dsmoe_status cu_alloc(dsmoe_kernel_ctx *ctx, size_t bytes, uint32_t flags, void **ptr);
void cu_free(dsmoe_kernel_ctx *ctx, void *ptr);
dsmoe_status cu_host_alloc(dsmoe_kernel_ctx *ctx, size_t bytes, void **ptr);
void cu_host_free(dsmoe_kernel_ctx *ctx, void *ptr);
dsmoe_status cu_copy_to_device(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes);
dsmoe_status cu_copy_to_host(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes);
dsmoe_status cu_copy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes);
dsmoe_status cu_copy_2d(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t dpitch, const void *src,
                        size_t spitch, size_t width, size_t rows);
dsmoe_status cu_zero(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t bytes);

// --- cuda_ops.c: every compute member (the table lists them) ----------------------------------------
#define CU_Q dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q
dsmoe_status cu_attention_bytes(dsmoe_kernel_ctx *ctx, const dsmoe_attention_shape *shape, size_t *saved,
                                size_t *workspace);
dsmoe_status cu_gemm(CU_Q, int trans_a, int trans_b, int m, int n, int k, float alpha, const void *a,
                     dsmoe_dtype a_type, int lda, const void *b, dsmoe_dtype b_type, int ldb, float beta, void *c,
                     dsmoe_dtype c_type, int ldc);
dsmoe_status cu_gemm_grouped(CU_Q, const dsmoe_grouped_gemm *g);
dsmoe_status cu_gemm_grouped_wgrad(CU_Q, const dsmoe_grouped_wgrad *g);
dsmoe_status cu_bias_add(CU_Q, void *out, dsmoe_dtype dt, const float *bias, int rows, int n);
dsmoe_status cu_bias_backward(CU_Q, float *dbias, const void *dout, dsmoe_dtype dt, int rows, int n);
dsmoe_status cu_axpy(CU_Q, void *y, float alpha, const void *x, dsmoe_dtype dt, size_t n);
dsmoe_status cu_mul_uniform_noise(CU_Q, void *out, const void *in, dsmoe_dtype dt, size_t n, float eps, uint64_t seed,
                                  uint64_t offset);
dsmoe_status cu_sum_squares(CU_Q, const float *x, size_t n, double *out);
dsmoe_status cu_all_finite(CU_Q, const void *x, dsmoe_dtype dt, size_t n, int32_t *out);
dsmoe_status cu_convert(CU_Q, void *dst, dsmoe_dtype dst_type, const void *src, dsmoe_dtype src_type, size_t n);
dsmoe_status cu_init_tensor(CU_Q, float *dst, size_t n, const dsmoe_init_params *p);
dsmoe_status cu_embedding_forward(CU_Q, void *out, dsmoe_dtype dt, const int32_t *tokens, const void *wte,
                                  dsmoe_dtype wte_dt, const float *wpe, const int32_t *pos, int B, int T, int M, int V,
                                  int n_pos);
dsmoe_status cu_embedding_backward(CU_Q, float *dwte, float *dwpe, const void *dout, dsmoe_dtype dt,
                                   const int32_t *tokens, int B, int T, int M, int V);
dsmoe_status cu_layernorm_forward(CU_Q, void *out, float *mean, float *rstd, const void *in, dsmoe_dtype dt,
                                  const float *weight, const float *bias, int S, int M, float eps);
dsmoe_status cu_layernorm_backward(CU_Q, void *din, float *dweight, float *dbias, const void *dout, const void *in,
                                   dsmoe_dtype dt, const float *weight, const float *mean, const float *rstd, int S,
                                   int M);
dsmoe_status cu_gelu_forward(CU_Q, void *out, const void *in, dsmoe_dtype dt, size_t n);
dsmoe_status cu_gelu_backward(CU_Q, void *din, const void *in, const void *dout, dsmoe_dtype dt, size_t n);
dsmoe_status cu_attention_forward(CU_Q, void *out, void *saved, const void *qkv, const dsmoe_attention_shape *shape);
dsmoe_status cu_attention_backward(CU_Q, void *dqkv, void *workspace, const void *dout, const void *qkv,
                                   const void *out, const void *saved, const dsmoe_attention_shape *shape);
dsmoe_status cu_crossentropy_forward(CU_Q, float *losses, float *probs, const void *logits, dsmoe_dtype dt,
                                     const int32_t *targets, int S, int V);
dsmoe_status cu_crossentropy_backward(CU_Q, void *dlogits, dsmoe_dtype dt, const float *probs, const int32_t *targets,
                                      float dloss, int S, int V);
dsmoe_status cu_distill_forward(CU_Q, float *losses, float *diff, const void *student, const void *teacher,
                                dsmoe_dtype dt, float temperature, int S, int V);
dsmoe_status cu_distill_backward(CU_Q, void *dstudent, dsmoe_dtype dt, const float *diff, float scale, int S, int V);
dsmoe_status cu_gate_route(CU_Q, const dsmoe_gating_params *p, const float *logits, float *probs, int32_t *choice,
                           int32_t *counts);
dsmoe_status cu_gate_assign(CU_Q, const dsmoe_gating_params *p, int C, const float *probs, const int32_t *choice,
                            int32_t *slot, float *weight, int32_t *kept, double *aux_sums);
dsmoe_status cu_gate(CU_Q, const dsmoe_gating_params *p, int C, const float *logits, float *probs, int32_t *choice,
                     int32_t *counts, int32_t *slot, float *weight, int32_t *kept, double *aux_sums);
dsmoe_status cu_gate_backward(CU_Q, const dsmoe_gating_params *p, float *dlogits, const float *probs,
                              const int32_t *choice, const int32_t *slot, const float *dweight,
                              const double *aux_sums, float daux);
dsmoe_status cu_moe_dispatch(CU_Q, void *buf, const void *x, dsmoe_dtype dt, const int32_t *choice,
                             const int32_t *slot, int S, int K, int E, int C, int M);
dsmoe_status cu_moe_dispatch_backward(CU_Q, void *dx, const void *dbuf, dsmoe_dtype dt, const int32_t *choice,
                                      const int32_t *slot, int S, int K, int E, int C, int M);
dsmoe_status cu_moe_combine(CU_Q, void *out, const void *y, dsmoe_dtype dt, const int32_t *choice,
                            const int32_t *slot, const float *weight, int S, int K, int E, int C, int M);
dsmoe_status cu_moe_combine_backward(CU_Q, void *dy, float *dweight, const void *dout, const void *y, dsmoe_dtype dt,
                                     const int32_t *choice, const int32_t *slot, const float *weight, int S, int K,
                                     int E, int C, int M);
dsmoe_status cu_residual_mix_forward(CU_Q, void *out, float *coef, const void *moe, const void *mlp, dsmoe_dtype dt,
                                     const float *coef_logits, int S, int M);
dsmoe_status cu_residual_mix_backward(CU_Q, void *dmoe, void *dmlp, float *dcoef_logits, const void *dout,
                                      const void *moe, const void *mlp, dsmoe_dtype dt, const float *coef, int S,
                                      int M);
dsmoe_status cu_adamw(CU_Q, const dsmoe_adamw_params *hp, const dsmoe_adamw_tensor *tensors, int n);
dsmoe_status cu_kv_append(CU_Q, void *k_cache, void *v_cache, const void *qkv, dsmoe_dtype dt, const int32_t *pos,
                          int B, int T_new, int M, int NH, int T_max);
dsmoe_status cu_attention_cached(CU_Q, void *out, const void *qkv, const void *k_cache, const void *v_cache,
                                 dsmoe_dtype dt, const int32_t *pos, int B, int T_new, int M, int NH, int T_max);
dsmoe_status cu_sample(CU_Q, int32_t *tokens, const void *logits, dsmoe_dtype dt, int rows, int V,
                       const dsmoe_sampling_params *p, const uint64_t *counters);
#undef CU_Q

#endif
