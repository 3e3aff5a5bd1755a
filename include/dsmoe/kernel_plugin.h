// dsmoe/kernel_plugin.h: ABI version 3 of expert-kernel plugins (cpu, cuda, ...). docs/plugins.md
// explains it member by member. Older plugins still load: version 2 is version 3 without the members
// after distill_backward (the loader reads a v2 table as that prefix and leaves the rest NULL), and
// version 1 (include/dsmoe/v1/kernel_plugin_v1.h) runs through an adapter (core/plugins/kernel_adapt_v1.c).
// A published version's table never changes: new members go at the end, under a new version.
//
// A kernel plugin is a shared object that exports one function, DSMOE_KERNEL_PLUGIN_ENTRY:
// `DSMOE_PLUGIN_EXPORT const dsmoe_kernel_plugin_v3 *DSMOE_KERNEL_PLUGIN_ENTRY(void)`. The table starts
// with api_version; the loader refuses a version it does not speak, naming both numbers.
//
// The asynchronous model (read once, assumed below):
// - Work runs on QUEUES (a CUDA stream, or the cpu plugin's in-order host queue). Every op takes the
//   queue it is enqueued on and may return before it has run. Ops on one queue run in call order; ops on
//   different queues are ordered only by events (event_record on one, queue_wait_event on the other).
// - Host inputs are consumed before the call returns: scalars, parameter structs, descriptor structs and
//   the arrays they point to (unless documented "device"), and the source of copy_to_device from
//   ordinary (not host_alloc) memory. The caller may reuse them at once.
// - Device memory (everything from alloc()) is never read or written by the host: the core moves data
//   only with the copy members. A plugin may hand out memory the host cannot touch at all.
// - Host-visible results (copy_to_host into host memory) are valid only after an event recorded after
//   them has completed (event_synchronize / event_query) or after queue_synchronize / synchronize.
// - Errors: a member returns DSMOE_OK when the work was accepted. An error found while enqueuing (bad
//   shape, unsupported dtype) is returned at once. An error found while running (bad data: a token id
//   out of range, a count above its bound; a device fault) is STICKY: it is returned by the next
//   event_synchronize, event_query, queue_synchronize or synchronize on that context, and by every call
//   after it; last_error() gives the message. The context is unusable afterwards.
// - Threading: one host thread at a time per context (the core uses one). Different contexts are
//   independent.
//
// Conventions for the ops:
// - Pointers named like tensors are buffers from this plugin's alloc() (its mem_kind); offsets into
//   such buffers (p + n) are valid buffers. Shapes are (rows, cols), row-major, contiguous unless a
//   leading dimension is given. S = tokens, M = hidden, F = FFN hidden, E = experts, C = expert capacity,
//   K = top-k, V = vocabulary, B = batch, T = sequence, NH = heads, D = M / NH.
// - dtype: activation tensors and GEMM operands carry a dsmoe_dtype (`dt` is the type of every
//   activation tensor of the op unless the comment says float32). Master weights, optimizer state,
//   gating (logits, probs, weights), layer-norm statistics, losses and reductions are float32 (or
//   float64 where stated). A plugin declares the activation dtypes it supports in `dtypes` (float32
//   always); another dtype is refused at once with DSMOE_ERR_UNSUPPORTED. Accumulation is float32.
// - Forward outputs are assigned (=). Backward outputs ACCUMULATE (+=) into their gradient buffers;
//   the caller zeroes them. Exceptions are marked "(assigns)".
// - Results do not depend on the thread count, and with DSMOE_KCAP_DETERMINISTIC not on anything but
//   the inputs: reductions use a fixed order.
#ifndef DSMOE_KERNEL_PLUGIN_H
#define DSMOE_KERNEL_PLUGIN_H
#include <stddef.h>
#include <stdint.h>
#include "dsmoe/types.h"

DSMOE_EXTERN_C_BEGIN

#define DSMOE_KERNEL_API_VERSION 3
#define DSMOE_KERNEL_PLUGIN_ENTRY dsmoe_kernel_plugin_entry_v3
#define DSMOE_KERNEL_PLUGIN_SYMBOL "dsmoe_kernel_plugin_entry_v3"

typedef struct dsmoe_kernel_ctx dsmoe_kernel_ctx;     // opaque, owned by the plugin
typedef struct dsmoe_kernel_queue dsmoe_kernel_queue; // opaque: an in-order queue of work
typedef struct dsmoe_kernel_event dsmoe_kernel_event; // opaque: a point in a queue

// Capabilities (the `caps` member): what the core and the tests may rely on.
enum {
    DSMOE_KCAP_ASYNC = 1u << 0,         // ops may return before they run (events are needed)
    DSMOE_KCAP_BF16 = 1u << 1,          // bfloat16 activations and GEMM operands (also in `dtypes`)
    DSMOE_KCAP_FUSED_EPILOGUE = 1u << 2, // grouped GEMM fuses bias / GELU / GELU-backward itself
    DSMOE_KCAP_DETERMINISTIC = 1u << 3, // bitwise reproducible results for the same inputs
    DSMOE_KCAP_INFERENCE = 1u << 4,     // the KV-cache members and sample are present
    DSMOE_KCAP_HOST_MEMORY = 1u << 5,   // alloc() memory is host-addressable (cpu); never assumed by the core
    DSMOE_KCAP_DISTILL = 1u << 6,       // distill_forward and distill_backward are present
};

// Flags of alloc().
enum {
    DSMOE_ALLOC_ZERO = 1u << 0, // the buffer is zeroed (ordered before any later work on any queue)
};

// Init options; read during init only (the pointers need not outlive it).
typedef struct dsmoe_kernel_options {
    int threads;    // compute threads; 0 = the plugin decides (OMP_NUM_THREADS, else 1)
    int device;     // device ordinal for device plugins; ignored by cpu
    int verbose;    // 0 quiet, 1 report what was chosen (BLAS, threads, device) once through log
    // OS CPU ids (host) to pin compute threads to: thread t on thread_cpus[t % n_thread_cpus]. NULL =
    // leave the threads where the OS puts them (inside the process's binding).
    const int *thread_cpus;
    int n_thread_cpus;
    dsmoe_log_fn log; // may be NULL
    void *log_user;
    // The plugin's own settings, resolved by the core: param_values[i] is the text value of params[i]
    // (n_param_values == n_params). NULL when the plugin declares none.
    const char *const *param_values;
    int n_param_values;
} dsmoe_kernel_options;

typedef enum dsmoe_noise_policy {
    DSMOE_NOISE_NONE = 0,
    DSMOE_NOISE_JITTER = 1,  // multiplicative U(1-eps, 1+eps) on the gate input (done by the caller)
    DSMOE_NOISE_RSAMPLE = 2, // Gumbel noise on logits when choosing experts
} dsmoe_noise_policy;

// Gating of one MoE layer on S tokens. See docs/gating.md for the exact rules.
typedef struct dsmoe_gating_params {
    int S;                 // tokens on this rank
    int E;                 // experts of the layer (global count)
    int K;                 // 1 or 2
    int noise;             // dsmoe_noise_policy; RSAMPLE acts in gate_route, only when training
    int random_selection;  // 1 = Random Token Selection picks the kept tokens, 0 = by token order
    int training;          // 0 disables all noise
    uint64_t seed;         // counter-RNG key for this layer and step (dsmoe/rng.h)
    uint64_t token_offset; // global index of this rank's first token: noise counter = offset + s
} dsmoe_gating_params;

// Epilogues of the grouped GEMM, applied to each group's rows after c = alpha a op(b) + beta c.
typedef enum dsmoe_epilogue {
    DSMOE_EPI_NONE = 0,
    DSMOE_EPI_BIAS = 1,       // c += bias[w]                             (bias (n) per weight w)
    DSMOE_EPI_BIAS_GELU = 2,  // aux = c + bias[w]; c = gelu(aux)          (aux saves the pre-activation)
    DSMOE_EPI_DGELU = 3,      // c = gelu'(aux) * c                        (aux: the saved pre-activation)
} dsmoe_epilogue;

// One grouped GEMM (dsmoe_kernel_plugin_v3.gemm_grouped). Group g has m[g] = counts[g] rows
// (0 <= m[g] <= m_max) and uses weight w = g % b_groups:
//   c_g (m[g], n) = alpha * a_g (m[g], k) @ op(b_w) + beta * c_g, then the epilogue,
// with a_g = a + g * a_stride (elements), c_g = c + g * c_stride, aux_g = aux + g * c_stride (leading
// dimension ldc), b_w = b + w * b_stride, op(b_w) = b_w^T when trans_b (b_w is (n, k), ldb) else b_w
// ((k, n), ldb), bias_w = bias + w * bias_stride (float32). Rows m[g] .. m_max - 1 of c_g (and of aux_g
// with BIAS_GELU) hold unspecified values afterwards (a plugin may compute all m_max rows, as a batched
// GEMM over the capacity does, or leave them; the caller reads none of them; DGELU may read aux there), and
// rows m[g] .. m_max - 1 of a_g do not affect rows below m[g] (a plugin may read them, so a_g holds
// m_max rows; their values may be anything, NaN included). Padding columns (n .. ldc - 1) and the gaps
// between groups are not written. counts is DEVICE memory (the per-expert token counts stay on the
// device); a count outside [0, m_max] is a sticky error. The struct is host memory, consumed before return.
// A bfloat16 c is rounded once: the product, beta * c and the epilogue are float32, BIAS_GELU takes gelu
// of the float32 pre-activation and aux holds that pre-activation rounded; DGELU reads aux as stored.
typedef struct dsmoe_grouped_gemm {
    int groups;
    const int32_t *counts; // (groups) device
    int m_max;             // host upper bound of every count (the expert capacity C)
    int n, k;
    float alpha, beta;
    const void *a; dsmoe_dtype a_type; int lda; size_t a_stride;
    const void *b; dsmoe_dtype b_type; int ldb; size_t b_stride; int b_groups; int trans_b;
    void *c; dsmoe_dtype c_type; int ldc; size_t c_stride;
    dsmoe_epilogue epilogue;
    const float *bias; size_t bias_stride; // BIAS, BIAS_GELU
    void *aux;                             // BIAS_GELU (written), DGELU (read); type c_type
} dsmoe_grouped_gemm;

// Weight gradients of a grouped GEMM (gemm_grouped_wgrad): for every group g in ascending order, with
// w = g % b_groups: dw_w (n, k) += alpha * dy_g^T (n, m[g]) @ x_g (m[g], k), and when dbias is not NULL
// dbias_w (n) += sum of the m[g] rows of dy_g. dy_g = dy + g * dy_stride (rows of n, leading dim n),
// x_g = x + g * x_stride (rows of k, leading dim k), dw_w = dw + w * dw_stride, dbias_w = dbias +
// w * dbias_stride. Groups sharing a weight are added in ascending g, so the sum has a fixed order.
typedef struct dsmoe_grouped_wgrad {
    int groups;
    const int32_t *counts; // (groups) device
    int m_max;
    int n, k;
    float alpha;
    const void *dy; dsmoe_dtype dy_type; size_t dy_stride;
    const void *x; dsmoe_dtype x_type; size_t x_stride;
    float *dw; size_t dw_stride; int b_groups; // float32 gradients
    float *dbias; size_t dbias_stride;          // may be NULL
} dsmoe_grouped_wgrad;

// One tensor of a multi-tensor AdamW update (adamw): every array is float32 device memory of n elements.
typedef struct dsmoe_adamw_tensor {
    float *param;
    const float *grad;
    float *m, *v;
    size_t n;
    float weight_decay; // 0 for tensors without decay
} dsmoe_adamw_tensor;

// AdamW hyper-parameters: g = grad * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// param -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * param). t >= 1.
typedef struct dsmoe_adamw_params {
    float lr, beta1, beta2, eps, grad_scale;
    int t;
} dsmoe_adamw_params;

// Device-side parameter initialisation (init_tensor): dst[i] = std * dsmoe_rng_normal(key, offset + i)
// when std > 0, else value (dsmoe/rng.h, computed as its host code does: see docs/plugins.md on the last
// bits of device math).
typedef struct dsmoe_init_params {
    uint64_t key, offset;
    float std, value;
} dsmoe_init_params;

// Attention shape (attention_bytes and the attention members).
typedef struct dsmoe_attention_shape {
    int B, T, M, NH;
    dsmoe_dtype dt;
} dsmoe_attention_shape;

// Token sampling (sample): per row r of the logits, the token drawn with key `seed` and counter
// counters[r] (host array of rows, consumed before return) so that a sequence's stream does not depend
// on the batch it is in. temperature 0 = greedy (argmax, ties to the lowest id); else softmax of
// logits / temperature restricted to the top_k largest (0 = all) and then to the smallest set whose
// probability reaches top_p (1 = all), drawn by inverse CDF of dsmoe_rng_uniform(seed, counter). The
// candidates are in the order of descending logit, ties by ascending token id (NaN as -inf): top_k keeps
// the first top_k of that order, top_p its shortest prefix, and the inverse CDF walks it, so every
// plugin draws the same token for the same logits.
typedef struct dsmoe_sampling_params {
    float temperature;
    int top_k;
    float top_p;
    uint64_t seed;
} dsmoe_sampling_params;

typedef struct dsmoe_kernel_plugin_v3 {
    uint32_t api_version;    // DSMOE_KERNEL_API_VERSION (3)
    const char *name;        // short name, e.g. "cpu"; what decks select
    const char *description; // one line for --version
    uint32_t mem_kind;       // DSMOE_MEM_* of every buffer alloc() returns
    uint32_t caps;           // DSMOE_KCAP_*
    uint32_t dtypes;         // DSMOE_DTYPE_BIT mask of activation dtypes; FLOAT32 must be set
    const dsmoe_param_decl *params; // the plugin's settings (types.h); NULL when n_params == 0
    int n_params;

    // --- lifecycle (host, synchronous) ---------------------------------------------------------------
    // Creates a context with its default queue. On failure *ctx is NULL and the message is in errbuf.
    dsmoe_status (*init)(const dsmoe_kernel_options *opt, dsmoe_kernel_ctx **ctx, char *errbuf, size_t errlen);
    // Waits for all queued work, then frees the context and everything it owns; NULL is a no-op.
    void (*finalize)(dsmoe_kernel_ctx *ctx);
    // The message of the last failing call or sticky error on ctx (never NULL; "" when none).
    const char *(*last_error)(dsmoe_kernel_ctx *ctx);
    // One line describing the resolved setup (BLAS, threads, device). Host string owned by ctx.
    const char *(*describe)(dsmoe_kernel_ctx *ctx);
    // (optional: both or neither) Devices this plugin can drive on this node, callable before init, so
    // that the core can give each rank the device nearest its cores (core/parallel/placement.c).
    dsmoe_status (*device_count)(int *count);
    // PCI bus id of device `ordinal` as "dddd:bb:dd.f", lower-case hex, in buf (host, len >= 13).
    dsmoe_status (*device_pci_bus_id)(int ordinal, char *buf, size_t len);
    // (optional) Free and total bytes of the device's memory (--plan and the memory line).
    dsmoe_status (*mem_info)(dsmoe_kernel_ctx *ctx, size_t *free_bytes, size_t *total_bytes);
    // Bytes the attention members need for a shape, callable before init (ctx may be NULL) so that
    // --plan gives the same number the run allocates: *saved = the state attention_forward keeps for the
    // backward (att_saved), *workspace = attention_backward's scratch. Both may be 0.
    dsmoe_status (*attention_bytes)(dsmoe_kernel_ctx *ctx, const dsmoe_attention_shape *shape, size_t *saved,
                                    size_t *workspace);

    // --- queues and events (host calls) ----------------------------------------------------------------
    // The context's default queue (never NULL, owned by ctx).
    dsmoe_kernel_queue *(*default_queue)(dsmoe_kernel_ctx *ctx);
    // (optional) Another in-order queue; destroy waits for its work.
    dsmoe_status (*queue_create)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue **q);
    void (*queue_destroy)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q);
    // The queue's native handle (cudaStream_t for cuda), for a comm plugin that orders collectives on it;
    // NULL for host queues.
    void *(*queue_native)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q);
    // Enqueues fn(arg) on q: it runs on a plugin thread when q reaches it, after the work before it and
    // before the work after it (as cudaLaunchHostFunc). fn must not call this plugin. Host-progressed
    // comm plugins use it to order collectives on a queue.
    dsmoe_status (*queue_enqueue_host)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void (*fn)(void *arg), void *arg);
    // Blocks until all work on q has run; returns a sticky error if there is one.
    dsmoe_status (*queue_synchronize)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q);
    // Blocks until all work on every queue of ctx has run; returns a sticky error if there is one.
    dsmoe_status (*synchronize)(dsmoe_kernel_ctx *ctx);
    dsmoe_status (*event_create)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event **ev);
    // NULL is a no-op. The event may still be pending.
    void (*event_destroy)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev);
    // ev marks the current end of q (re-recording moves it).
    dsmoe_status (*event_record)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, dsmoe_kernel_queue *q);
    // Work enqueued on q after this call waits for ev. Returns at once.
    dsmoe_status (*queue_wait_event)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, dsmoe_kernel_event *ev);
    // Blocks until ev has completed (an event never recorded counts as completed).
    dsmoe_status (*event_synchronize)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev);
    // *done = 1 when ev has completed, else 0; never blocks, but may drive a host queue forward.
    dsmoe_status (*event_query)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, int *done);

    // --- memory -------------------------------------------------------------------------------------
    // Allocates `bytes` aligned to at least 256, zeroed with DSMOE_ALLOC_ZERO, else UNDEFINED (a plugin
    // may fill it with garbage). bytes == 0 gives a valid unique pointer. Host call; not queued.
    dsmoe_status (*alloc)(dsmoe_kernel_ctx *ctx, size_t bytes, uint32_t flags, void **ptr);
    // Frees a buffer from alloc() after all work queued before the call has run; NULL is a no-op.
    void (*free)(dsmoe_kernel_ctx *ctx, void *ptr);
    // Host memory the plugin can copy to and from asynchronously (pinned for cuda); host-readable and
    // writable, but while a copy from or into it is queued the host must not touch it.
    dsmoe_status (*host_alloc)(dsmoe_kernel_ctx *ctx, size_t bytes, void **ptr);
    void (*host_free)(dsmoe_kernel_ctx *ctx, void *ptr); // after queued work; NULL is a no-op
    // dst (device) = host_src (bytes). From ordinary host memory the source is consumed before return;
    // from host_alloc memory it must stay unchanged until q reaches the copy.
    dsmoe_status (*copy_to_device)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *host_src,
                                   size_t bytes);
    // host_dst (bytes) = src (device); valid on the host after an event (see the asynchronous model).
    dsmoe_status (*copy_to_host)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *host_dst, const void *src,
                                 size_t bytes);
    // Device to device; the ranges do not overlap.
    dsmoe_status (*copy)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes);
    // 2-D device copy: `rows` rows of `width` bytes, from src with pitch spitch to dst with pitch dpitch
    // (pitches in bytes, >= width).
    dsmoe_status (*copy_2d)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t dpitch, const void *src,
                            size_t spitch, size_t width, size_t rows);
    dsmoe_status (*zero)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t bytes);

    // --- GEMM (row-major, BLAS semantics, float32 accumulation) ---------------------------------------
    // c (m, n) = alpha * op(a) @ op(b) + beta * c; op(a) is (m, k), op(b) is (k, n); trans_a: a is stored
    // (k, m) with leading dimension lda; likewise trans_b. a and b have the same dtype; c is float32 or
    // that dtype (a plugin refuses other mixes with DSMOE_ERR_UNSUPPORTED).
    dsmoe_status (*gemm)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, int trans_a, int trans_b, int m, int n, int k,
                         float alpha, const void *a, dsmoe_dtype a_type, int lda, const void *b, dsmoe_dtype b_type,
                         int ldb, float beta, void *c, dsmoe_dtype c_type, int ldc);
    // One call for all experts of an MoE layer stage (dsmoe_grouped_gemm above); the core also calls it with one
    // group for a dense FFN's first GEMM (BIAS_GELU) and that GELU's backward (DGELU).
    dsmoe_status (*gemm_grouped)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_gemm *g);
    // Expert weight (and bias) gradients over the groups (dsmoe_grouped_wgrad above).
    dsmoe_status (*gemm_grouped_wgrad)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_wgrad *g);

    // --- element-wise and small ops ------------------------------------------------------------------
    // out (rows, n) += bias (n, float32) broadcast over rows.
    dsmoe_status (*bias_add)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt, const float *bias,
                             int rows, int n);
    // dbias (n, float32) += sum over rows of dout (rows, n), in a fixed order.
    dsmoe_status (*bias_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dbias, const void *dout,
                                  dsmoe_dtype dt, int rows, int n);
    // y (n) += alpha * x (n), both of type dt.
    dsmoe_status (*axpy)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *y, float alpha, const void *x, dsmoe_dtype dt,
                         size_t n);
    // out (n) = in (n) * u, u ~ U(1-eps, 1+eps) drawn with dsmoe_rng_uniform(seed, offset + i). The same
    // call on the gradient is the backward (dx = dout * u): pass the same seed and offset. out may be in.
    dsmoe_status (*mul_uniform_noise)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in,
                                      dsmoe_dtype dt, size_t n, float eps, uint64_t seed, uint64_t offset);
    // out[0] (device float64) = sum of x[i]^2 (float32 x), summed in double with a fixed blocking.
    dsmoe_status (*sum_squares)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const float *x, size_t n, double *out);
    // (optional) out[0] (device int32) = 1 if every x[i] (type dt) is finite, else 0.
    dsmoe_status (*all_finite)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const void *x, dsmoe_dtype dt, size_t n,
                               int32_t *out);
    // (optional) Type conversion: dst (n, dst_type) = src (n, src_type), round-to-nearest-even; a NaN
    // stays a NaN (its payload unspecified). dst and src do not overlap unless they are the same buffer
    // of the same type.
    dsmoe_status (*convert)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, dsmoe_dtype dst_type,
                            const void *src, dsmoe_dtype src_type, size_t n);
    // Parameter initialisation on the device: dst (n, float32) per dsmoe_init_params.
    dsmoe_status (*init_tensor)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dst, size_t n,
                                const dsmoe_init_params *p);

    // --- embedding: out (B*T, M) = wte[tokens[b*T + t]] + wpe[pos[b] + t] ------------------------------
    // tokens (B*T) int32 in [0, V) (out of range: sticky error); wte (V, M) of type wte_dt: float32, or the
    // activation dtype dt (a tied embedding held only as the head's GEMM operand, as bf16 generation does);
    // wpe (n_pos, M) float32. pos (B) int32 in device memory: each sequence's first position (NULL: 0 for
    // every sequence; pos[b] < 0 or pos[b] + T > n_pos: sticky error), so that sequences decoding at
    // different positions embed in one call.
    dsmoe_status (*embedding_forward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt,
                                      const int32_t *tokens, const void *wte, dsmoe_dtype wte_dt, const float *wpe,
                                      const int32_t *pos, int B, int T, int M, int V, int n_pos);
    // dwte (V, M) += scatter of dout rows; dwpe (T, M) += sum over batch. Deterministic order.
    dsmoe_status (*embedding_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dwte, float *dwpe,
                                       const void *dout, dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M,
                                       int V);

    // --- layer norm over the last dimension ---------------------------------------------------------
    // out (S, M) of type dt from in (S, M) of type dt; weight, bias (M) float32; mean, rstd (S) float32
    // saved for the backward (either may be NULL when no backward follows).
    dsmoe_status (*layernorm_forward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *mean,
                                      float *rstd, const void *in, dsmoe_dtype dt, const float *weight,
                                      const float *bias, int S, int M, float eps);
    // din (S, M) +=, dweight, dbias (M, float32) +=.
    dsmoe_status (*layernorm_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, float *dweight,
                                       float *dbias, const void *dout, const void *in, dsmoe_dtype dt,
                                       const float *weight, const float *mean, const float *rstd, int S, int M);

    // --- GELU, tanh approximation (as torch gelu(approximate="tanh")) --------------------------------
    dsmoe_status (*gelu_forward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in,
                                 dsmoe_dtype dt, size_t n);
    // din (n) += gelu'(in) * dout.
    dsmoe_status (*gelu_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, const void *in,
                                  const void *dout, dsmoe_dtype dt, size_t n);

    // --- causal multi-head self-attention ------------------------------------------------------------
    // qkv (B*T, 3M): per token [q | k | v], head h uses columns [h*D, (h+1)*D) of each.
    // out (B*T, M) = concat over heads of softmax(q k^T / sqrt(D), causal) v. saved: attention_bytes'
    // `saved` bytes the backward needs (the plugin's format: probabilities, or row statistics for a
    // flash-style kernel).
    dsmoe_status (*attention_forward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, void *saved,
                                      const void *qkv, const dsmoe_attention_shape *shape);
    // dqkv (B*T, 3M) +=; workspace: attention_bytes' `workspace` bytes the op may overwrite.
    dsmoe_status (*attention_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dqkv, void *workspace,
                                       const void *dout, const void *qkv, const void *out, const void *saved,
                                       const dsmoe_attention_shape *shape);

    // --- softmax cross-entropy over V classes -----------------------------------------------------
    // probs (S, V) float32 = softmax(logits (S, V) of type dt); losses (S) float32 = -log probs[s,
    // targets[s]]. targets int32 in [0, V) (out of range: sticky error).
    dsmoe_status (*crossentropy_forward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *losses, float *probs,
                                         const void *logits, dsmoe_dtype dt, const int32_t *targets, int S, int V);
    // dlogits (S, V) of type dt += dloss * (probs - onehot(targets)); dloss is the same for every row.
    dsmoe_status (*crossentropy_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dlogits, dsmoe_dtype dt,
                                          const float *probs, const int32_t *targets, float dloss, int S, int V);

    // --- MoE gating (float32), dispatch and combine through the token -> (expert, slot) table ----------
    // docs/gating.md is the full specification (the RNG keys and counters a device plugin must use to
    // give the same choices as the cpu plugin). Every output stays on the device.
    // Route: probs (S, E) = softmax(logits); choice (S, K) int32 = chosen experts (first choice = argmax
    // of probs, or for K = 1 of logits + Gumbel noise under RSAMPLE while training; second choice =
    // argmax over the other experts of logits + Gumbel noise under RSAMPLE while training, else of
    // probs; ties go to the lowest index); counts (E) int32 (assigns) = tokens choosing each expert, all
    // k levels together (what dropless capacity is agreed on).
    dsmoe_status (*gate_route)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                               const float *logits, float *probs, int32_t *choice, int32_t *counts);
    // Assign with capacity C (host): slot (S, K) int32 (-1 = dropped) and weight (S, K): level 0 for all
    // tokens first, then level 1; within a level an expert keeps tokens by token order, or by the largest
    // priority dsmoe_rng_uniform(rts key of the level, token_offset + s) under RTS; kept tokens get
    // consecutive slots in token order. weight = probs of a kept choice, 0 when dropped; for K = 2 the
    // kept weights are divided by max(sum, FLT_EPSILON). kept (E) int32 = slots used per expert.
    // aux_sums (2E + 1) float64, the load-balancing loss's sums over this rank's tokens (the caller
    // reduces them over ranks, docs/gating.md section 3): [P_e = sum_s probs[s,e] (E; summed in
    // double in one fixed order, token order on the cpu, chunks of tokens on cuda: within 1e-12
    // relative), N_e = sum_s [choice[s,0] == e] (E, first choices before drops), S]. All assigned.
    dsmoe_status (*gate_assign)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p, int C,
                                const float *probs, const int32_t *choice, int32_t *slot, float *weight,
                                int32_t *kept, double *aux_sums);
    // Backward of route + assign: dlogits (S, E) += d/dlogits of
    // [sum_{s,k} dweight[s,k] * weight[s,k] + daux * l_aux], where the gradient of l_aux =
    // E * sum_e (P_e / S_tot) (N_e / S_tot) flows through this rank's probs only:
    // d/dprobs[s,e] = (float)((double)daux * E * N_e / S_tot^2) from aux_sums (2E + 1, device, already
    // reduced over the scope), 0 when S_tot is 0.
    dsmoe_status (*gate_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                                  float *dlogits, const float *probs, const int32_t *choice, const int32_t *slot,
                                  const float *dweight, const double *aux_sums, float daux);
    // The table's entries are data: a choice outside [0, E), a slot outside [-1, C), or (dispatch and
    // combine_backward, which write one row per entry) a slot held by two entries is a sticky
    // DSMOE_ERR_INVALID naming the token(s).
    // Dispatch (assigns): buf (E, C, M) = rows of x (S, M) at their (expert, slot); rows of a slot no
    // token took are unspecified (readers stop at the kept counts).
    dsmoe_status (*moe_dispatch)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *buf, const void *x, dsmoe_dtype dt,
                                 const int32_t *choice, const int32_t *slot, int S, int K, int E, int C, int M);
    // dx (S, M) += dbuf rows of each kept (expert, slot).
    dsmoe_status (*moe_dispatch_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dx, const void *dbuf,
                                          dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, int S, int K,
                                          int E, int C, int M);
    // Combine (assigns): out (S, M) = sum over kept k of weight[s,k] * y[choice, slot]; y (E, C, M).
    dsmoe_status (*moe_combine)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *y, dsmoe_dtype dt,
                                const int32_t *choice, const int32_t *slot, const float *weight, int S, int K, int E,
                                int C, int M);
    // dy (E, C, M) (assigns; rows of unused slots unspecified) = weight * dout; dweight (S, K) float32 (assigns; 0 when
    // dropped) = dot(dout[s], y[choice, slot]).
    dsmoe_status (*moe_combine_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dy, float *dweight,
                                         const void *dout, const void *y, dsmoe_dtype dt, const int32_t *choice,
                                         const int32_t *slot, const float *weight, int S, int K, int E, int C, int M);

    // --- residual MoE mixing: coef = softmax(coef_logits (S, 2), float32) -----------------------------
    // out (S, M) = moe * coef[:,0] + mlp * coef[:,1]; coef (S, 2) float32 saved.
    dsmoe_status (*residual_mix_forward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *coef,
                                         const void *moe, const void *mlp, dsmoe_dtype dt, const float *coef_logits,
                                         int S, int M);
    // dmoe, dmlp (S, M) +=; dcoef_logits (S, 2) float32 +=.
    dsmoe_status (*residual_mix_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dmoe, void *dmlp,
                                          float *dcoef_logits, const void *dout, const void *moe, const void *mlp,
                                          dsmoe_dtype dt, const float *coef, int S, int M);

    // --- optimizer ---------------------------------------------------------------------------------
    // AdamW over n tensors in one call (the list is host memory, consumed before return).
    dsmoe_status (*adamw)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_adamw_params *hp,
                          const dsmoe_adamw_tensor *tensors, int n);

    // --- inference (optional as a group: all or none, with DSMOE_KCAP_INFERENCE) -----------------------
    // KV cache of one layer: k_cache, v_cache (B, NH, T_max, D) of type dt. Append: for each sequence b,
    // the T_new tokens' keys and values from qkv (B*T_new, 3M) go to positions pos[b] .. pos[b]+T_new-1
    // (pos (B) int32 device; pos[b] + T_new <= T_max, else sticky error).
    dsmoe_status (*kv_append)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *k_cache, void *v_cache,
                              const void *qkv, dsmoe_dtype dt, const int32_t *pos, int B, int T_new, int M, int NH,
                              int T_max);
    // Attention of a query block over the cache: out (B*T_new, M) for query t of sequence b at position
    // pos[b] + t attends causally to cached positions 0 .. pos[b] + t (kv_append first).
    dsmoe_status (*attention_cached)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *qkv,
                                     const void *k_cache, const void *v_cache, dsmoe_dtype dt, const int32_t *pos,
                                     int B, int T_new, int M, int NH, int T_max);
    // tokens (rows) int32 (assigns) drawn from logits (rows, V) of type dt per dsmoe_sampling_params;
    // counters (rows) host, consumed before return.
    dsmoe_status (*sample)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, int32_t *tokens, const void *logits,
                           dsmoe_dtype dt, int rows, int V, const dsmoe_sampling_params *p, const uint64_t *counters);

    // --- knowledge distillation (optional as a pair, with DSMOE_KCAP_DISTILL) -------------------------
    // Temperature-softened KL divergence of a student's logits from a teacher's (docs/distill.md). With
    // p = softmax(teacher / temperature) and q = softmax(student / temperature) over each row of V,
    // student and teacher (S, V) of type dt: losses (S) float32 = sum_v p_v * (log p_v - log q_v) (>= 0;
    // a term whose p_v underflows to 0 is 0, never NaN) and diff (S, V) float32 = q - p, the gradient
    // of each row's KL with respect to student / temperature, saved for the backward. temperature > 0.
    dsmoe_status (*distill_forward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *losses, float *diff,
                                    const void *student, const void *teacher, dsmoe_dtype dt, float temperature,
                                    int S, int V);
    // dstudent (S, V) of type dt += scale * diff: d KL / d student = diff / temperature, so the caller's
    // scale carries 1 / temperature and the weight of each row's KL in the loss.
    dsmoe_status (*distill_backward)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dstudent, dsmoe_dtype dt,
                                     const float *diff, float scale, int S, int V);

    // === version 3: the members below are not in a version-2 table (NULL when one is loaded) =========

    // --- fused gating (optional; NULL: the core calls gate_route, then gate_assign) ---------------------
    // Route and assign of one MoE layer in one op, for a capacity C known before routing (the capacity of
    // dropping layers and of inference, from the token count; not dropless, whose C is agreed from the
    // counts): probs, choice, counts, slot, weight, kept and aux_sums exactly as gate_route followed by
    // gate_assign with the same p and C on this plugin, bit for bit, and the same errors. A device plugin
    // does it in one kernel launch (docs/gating.md, section 8).
    dsmoe_status (*gate)(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p, int C,
                         const float *logits, float *probs, int32_t *choice, int32_t *counts, int32_t *slot,
                         float *weight, int32_t *kept, double *aux_sums);
} dsmoe_kernel_plugin_v3;

// A version-2 table is the first DSMOE_KERNEL_PLUGIN_V2_BYTES bytes of a version-3 one (its symbol:
// DSMOE_KERNEL_PLUGIN_SYMBOL_V2, its api_version 2).
#define DSMOE_KERNEL_API_VERSION_V2 2
#define DSMOE_KERNEL_PLUGIN_SYMBOL_V2 "dsmoe_kernel_plugin_entry_v2"
#define DSMOE_KERNEL_PLUGIN_V2_BYTES offsetof(dsmoe_kernel_plugin_v3, gate)

typedef const dsmoe_kernel_plugin_v3 *(*dsmoe_kernel_plugin_entry_fn)(void);

DSMOE_EXTERN_C_END

#endif
