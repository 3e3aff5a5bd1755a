// dsmoe/kernel_plugin.h: the ABI of expert-kernel plugins (cpu, cuda, ...).
//
// A kernel plugin is a shared object that exports one function, DSMOE_KERNEL_PLUGIN_ENTRY:
// `DSMOE_PLUGIN_EXPORT const dsmoe_kernel_plugin_v1 *DSMOE_KERNEL_PLUGIN_ENTRY(void)`. The returned table starts with api_version; the core refuses
// a table whose version it does not speak, naming both numbers.
//
// Conventions that hold for every member (read once, assumed below):
// - Pointers named like tensors are buffers from this plugin's alloc() (its mem_kind), never host
//   pointers, unless documented "host". Offsets into such buffers (p + n) are valid buffers.
// - Shapes are given in comments as (rows, cols), row-major, contiguous. S = tokens, M = hidden,
//   F = FFN hidden, E = experts, C = expert capacity, K = top-k, V = vocabulary, B = batch, T = sequence,
//   NH = heads.
// - Forward outputs are assigned (=). Backward outputs ACCUMULATE (+=) into their gradient buffers, for
//   parameters and activations alike; the caller zeroes them. Exceptions are marked "(assigns)".
// - Results must not depend on the thread count: reductions use a fixed blocking.
// - Calls may be asynchronous on devices; synchronize() waits. Host outputs are valid on return.
// - Errors: a member returns a dsmoe_status; last_error() then gives a one-line message.
#ifndef DSMOE_KERNEL_PLUGIN_H
#define DSMOE_KERNEL_PLUGIN_H
#include <stddef.h>
#include <stdint.h>
#include "dsmoe/status.h"

#define DSMOE_KERNEL_API_VERSION 1
#define DSMOE_KERNEL_PLUGIN_ENTRY dsmoe_kernel_plugin_entry_v1
#define DSMOE_KERNEL_PLUGIN_SYMBOL "dsmoe_kernel_plugin_entry_v1"

typedef struct dsmoe_kernel_ctx dsmoe_kernel_ctx; // opaque, owned by the plugin

typedef struct dsmoe_kernel_options {
    int threads;    // compute threads; 0 = the plugin decides (OMP_NUM_THREADS, else 1)
    int device;     // device ordinal for device plugins; ignored by cpu
    int verbose;    // 0 quiet, 1 print what was chosen (BLAS, threads) to stderr once
    // OS CPU ids (host) to pin compute threads to: thread t on thread_cpus[t % n_thread_cpus]. NULL = leave
    // the threads where the OS puts them (inside the process's binding). Read during init only.
    const int *thread_cpus;
    int n_thread_cpus;
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

typedef struct dsmoe_kernel_plugin_v1 {
    uint32_t api_version; // DSMOE_KERNEL_API_VERSION
    const char *name;     // short name, e.g. "cpu"; what decks select
    const char *description; // one line for --version
    uint32_t mem_kind;    // DSMOE_MEM_* of every buffer this plugin allocates

    // --- lifecycle -----------------------------------------------------------------------------
    // Creates a context. On failure *ctx is NULL and the message is written to errbuf (host, errlen).
    dsmoe_status (*init)(const dsmoe_kernel_options *opt, dsmoe_kernel_ctx **ctx, char *errbuf, size_t errlen);
    // Frees the context and everything it owns; NULL is a no-op.
    void (*finalize)(dsmoe_kernel_ctx *ctx);
    // The message of the last failing call on ctx (never NULL; "" when none).
    const char *(*last_error)(dsmoe_kernel_ctx *ctx);
    // One line describing the resolved setup (BLAS library, threads, device). Host string owned by ctx.
    const char *(*describe)(dsmoe_kernel_ctx *ctx);
    // (optional: both or neither; host-only plugins leave them NULL) The devices this plugin can drive
    // on this node, callable before init, so that the core can give each rank the device nearest its
    // cores (core/parallel/placement.c) and pass its ordinal as options.device.
    // *count = number of devices (0 is valid: none here).
    dsmoe_status (*device_count)(int *count);
    // PCI bus id of device `ordinal` (0 <= ordinal < count) as "dddd:bb:dd.f", lower-case hex, in buf
    // (host, len >= 13).
    dsmoe_status (*device_pci_bus_id)(int ordinal, char *buf, size_t len);

    // --- memory --------------------------------------------------------------------------------
    // Allocates `bytes` zeroed bytes aligned to at least 64. bytes == 0 gives a valid unique pointer.
    dsmoe_status (*alloc)(dsmoe_kernel_ctx *ctx, size_t bytes, void **ptr);
    // Frees a buffer from alloc(); NULL is a no-op.
    void (*free)(dsmoe_kernel_ctx *ctx, void *ptr);
    dsmoe_status (*copy_to_device)(dsmoe_kernel_ctx *ctx, void *dst, const void *host_src, size_t bytes);
    dsmoe_status (*copy_to_host)(dsmoe_kernel_ctx *ctx, void *host_dst, const void *src, size_t bytes);
    dsmoe_status (*copy)(dsmoe_kernel_ctx *ctx, void *dst, const void *src, size_t bytes); // device to device
    dsmoe_status (*zero)(dsmoe_kernel_ctx *ctx, void *dst, size_t bytes);
    // Waits for all work queued on ctx.
    dsmoe_status (*synchronize)(dsmoe_kernel_ctx *ctx);

    // --- GEMM (row-major, BLAS semantics) ------------------------------------------------------
    // c (m, n) = alpha * op(a) @ op(b) + beta * c; op(a) is (m, k), op(b) is (k, n);
    // trans_a: a is stored (k, m) with leading dimension lda; likewise trans_b.
    dsmoe_status (*gemm)(dsmoe_kernel_ctx *ctx, int trans_a, int trans_b, int m, int n, int k,
                         float alpha, const float *a, int lda, const float *b, int ldb,
                         float beta, float *c, int ldc);
    // Grouped GEMM: for g in [0, groups): c[g] (m[g], n) = alpha op(a[g]) @ op(b[g]) + beta c[g].
    // m, a, b, c are HOST arrays of length groups; m[g] may differ per group and may be 0 (the
    // per-expert token counts). n, k and the leading dimensions are shared.
    dsmoe_status (*gemm_grouped)(dsmoe_kernel_ctx *ctx, int groups, int trans_a, int trans_b,
                                 const int *m, int n, int k, float alpha,
                                 const float *const *a, int lda, const float *const *b, int ldb,
                                 float beta, float *const *c, int ldc);
    // Grouped GEMM for expert weight gradients: dw[g] (n, k) += alpha * dy[g]^T @ x[g], where
    // dy[g] is (m[g], n) and x[g] is (m[g], k). m, dy, x, dw are HOST arrays; m[g] = 0 leaves dw[g].
    dsmoe_status (*gemm_grouped_wgrad)(dsmoe_kernel_ctx *ctx, int groups, const int *m, int n, int k,
                                       float alpha, const float *const *dy, const float *const *x,
                                       float *const *dw);

    // --- element-wise and small ops ------------------------------------------------------------
    // out (rows, n) += bias (n) broadcast over rows.
    dsmoe_status (*bias_add)(dsmoe_kernel_ctx *ctx, float *out, const float *bias, int rows, int n);
    // dbias (n) += sum over rows of dout (rows, n).
    dsmoe_status (*bias_backward)(dsmoe_kernel_ctx *ctx, float *dbias, const float *dout, int rows, int n);
    // y (n) += alpha * x (n).
    dsmoe_status (*axpy)(dsmoe_kernel_ctx *ctx, float *y, float alpha, const float *x, size_t n);
    // x (n) *= alpha.
    dsmoe_status (*scale)(dsmoe_kernel_ctx *ctx, float *x, float alpha, size_t n);
    // out (n) = in (n) * u, u ~ U(1-eps, 1+eps) drawn with dsmoe_rng_uniform(seed, offset + i).
    // The same call on the gradient is the backward (dx = dout * u): pass the same seed and offset.
    dsmoe_status (*mul_uniform_noise)(dsmoe_kernel_ctx *ctx, float *out, const float *in, size_t n,
                                      float eps, uint64_t seed, uint64_t offset);
    // host_out[0] = sum of x[i]^2 in double, blocking fixed so that it does not depend on threads.
    dsmoe_status (*sum_squares)(dsmoe_kernel_ctx *ctx, const float *x, size_t n, double *host_out);
    // host_out[0] = 1 if every x[i] is finite, else 0.
    dsmoe_status (*all_finite)(dsmoe_kernel_ctx *ctx, const float *x, size_t n, int *host_out);

    // --- embedding: out (B*T, M) = wte[tokens] + wpe[t] ----------------------------------------
    // tokens (B*T) int32 in [0, V).
    dsmoe_status (*embedding_forward)(dsmoe_kernel_ctx *ctx, float *out, const int32_t *tokens,
                                      const float *wte, const float *wpe, int B, int T, int M);
    // dwte (V, M) += scatter of dout rows; dwpe (T, M) += sum over batch. Deterministic order.
    dsmoe_status (*embedding_backward)(dsmoe_kernel_ctx *ctx, float *dwte, float *dwpe, const float *dout,
                                       const int32_t *tokens, int B, int T, int M, int V);

    // --- layer norm over the last dimension, eps given -----------------------------------------
    // out (S, M); mean, rstd (S) saved for backward.
    dsmoe_status (*layernorm_forward)(dsmoe_kernel_ctx *ctx, float *out, float *mean, float *rstd,
                                      const float *in, const float *weight, const float *bias,
                                      int S, int M, float eps);
    dsmoe_status (*layernorm_backward)(dsmoe_kernel_ctx *ctx, float *din, float *dweight, float *dbias,
                                       const float *dout, const float *in, const float *weight,
                                       const float *mean, const float *rstd, int S, int M);

    // --- GELU, tanh approximation (as torch gelu(approximate="tanh")) --------------------------
    dsmoe_status (*gelu_forward)(dsmoe_kernel_ctx *ctx, float *out, const float *in, size_t n);
    dsmoe_status (*gelu_backward)(dsmoe_kernel_ctx *ctx, float *din, const float *in, const float *dout, size_t n);

    // --- causal multi-head self-attention ------------------------------------------------------
    // qkv (B*T, 3M): per token [q | k | v], head h uses columns [h*M/NH, (h+1)*M/NH) of each.
    // out (B*T, M) = concat over heads of softmax(q k^T / sqrt(M/NH), causal) v.
    // att (B, NH, T, T) saves the probabilities (entries above the diagonal are 0).
    dsmoe_status (*attention_forward)(dsmoe_kernel_ctx *ctx, float *out, float *att, const float *qkv,
                                      int B, int T, int M, int NH);
    // dqkv (B*T, 3M) +=; scratch is a buffer of B*NH*T*T floats the op may overwrite.
    dsmoe_status (*attention_backward)(dsmoe_kernel_ctx *ctx, float *dqkv, float *scratch,
                                       const float *dout, const float *qkv, const float *att,
                                       int B, int T, int M, int NH);

    // --- softmax cross-entropy over V classes --------------------------------------------------
    // probs (S, V) = softmax(logits); losses (S) = -log probs[s, targets[s]]. targets int32 in [0, V).
    dsmoe_status (*crossentropy_forward)(dsmoe_kernel_ctx *ctx, float *losses, float *probs,
                                         const float *logits, const int32_t *targets, int S, int V);
    // dlogits (S, V) += dloss * (probs - onehot(targets)); dloss is the same for every row.
    dsmoe_status (*crossentropy_backward)(dsmoe_kernel_ctx *ctx, float *dlogits, const float *probs,
                                          const int32_t *targets, float dloss, int S, int V);

    // --- MoE gating (fp32), dispatch and combine through the token -> (expert, slot) table -------
    // docs/gating.md is the full specification, including the RNG keys and counters a device plugin
    // must use to give the same choices as the cpu plugin.
    // Route: probs (S, E) = softmax(logits); choice (S, K) int32 = chosen experts (first choice =
    // argmax of probs, or for K = 1 of logits + Gumbel noise under RSAMPLE while training; second
    // choice = argmax over the other experts of logits + Gumbel noise under RSAMPLE while training,
    // else of probs; ties go to the lowest index); host_counts (E) int32 = tokens choosing each
    // expert, all k levels together (what dropless capacity is agreed on).
    dsmoe_status (*gate_route)(dsmoe_kernel_ctx *ctx, const dsmoe_gating_params *p, const float *logits,
                               float *probs, int32_t *choice, int32_t *host_counts);
    // Assign: with capacity C, fill slot (S, K) int32 (-1 = dropped) and weight (S, K): level 0 for all
    // tokens first, then level 1 after it; within a level an expert keeps tokens by token order, or by
    // the largest priority dsmoe_rng_uniform(rts key of the level, token_offset + s) under RTS; kept tokens
    // get consecutive slots in token order. weight = probs of a kept choice, 0 when dropped; for K = 2
    // the kept weights are divided by max(sum, FLT_EPSILON). host_kept (E) int32 = slots used per
    // expert. The load-balancing loss's per-expert sums over this rank's tokens (the caller reduces
    // them over ranks and forms l_aux, docs/gating.md section 3): host_prob_sum (E) double =
    // sum_s probs[s,e], summed in double in token order; host_first_count (E) int32 =
    // sum_s [choice[s,0] == e] (first choices before capacity drops). All host outputs assigned.
    dsmoe_status (*gate_assign)(dsmoe_kernel_ctx *ctx, const dsmoe_gating_params *p, int C,
                                const float *probs, const int32_t *choice, int32_t *slot, float *weight,
                                int32_t *host_kept, double *host_prob_sum, int32_t *host_first_count);
    // Backward of route + assign: dlogits (S, E) += d/dlogits of
    // [sum_{s,k} dweight[s,k] * weight[s,k] + sum_{s,e} host_aux_grad[e] * probs[s,e]].
    // host_aux_grad (E) HOST floats: d(loss)/d(probs[s,e]) of the load-balancing loss, the same for
    // every token s (the caller computes it from the reduced sums: daux * E * N_e / S_tot^2).
    dsmoe_status (*gate_backward)(dsmoe_kernel_ctx *ctx, const dsmoe_gating_params *p, float *dlogits,
                                  const float *probs, const int32_t *choice, const int32_t *slot,
                                  const float *dweight, const float *host_aux_grad);
    // Dispatch (assigns): buf (E, C, M) = rows of x (S, M) at their (expert, slot); unused slots 0.
    dsmoe_status (*moe_dispatch)(dsmoe_kernel_ctx *ctx, float *buf, const float *x, const int32_t *choice,
                                 const int32_t *slot, int S, int K, int E, int C, int M);
    // dx (S, M) += dbuf rows of each kept (expert, slot).
    dsmoe_status (*moe_dispatch_backward)(dsmoe_kernel_ctx *ctx, float *dx, const float *dbuf,
                                          const int32_t *choice, const int32_t *slot, int S, int K, int E,
                                          int C, int M);
    // Combine (assigns): out (S, M) = sum over kept k of weight[s,k] * y[choice, slot]; y (E, C, M).
    dsmoe_status (*moe_combine)(dsmoe_kernel_ctx *ctx, float *out, const float *y, const int32_t *choice,
                                const int32_t *slot, const float *weight, int S, int K, int E, int C, int M);
    // dy (E, C, M) (assigns; unused slots 0) = weight * dout; dweight (S, K) (assigns; 0 when
    // dropped) = dot(dout[s], y[choice, slot]).
    dsmoe_status (*moe_combine_backward)(dsmoe_kernel_ctx *ctx, float *dy, float *dweight, const float *dout,
                                         const float *y, const int32_t *choice, const int32_t *slot,
                                         const float *weight, int S, int K, int E, int C, int M);

    // --- residual MoE mixing: coef = softmax(coef_logits (S, 2)) ---------------------------------
    // out (S, M) = moe * coef[:,0] + mlp * coef[:,1]; coef (S, 2) saved.
    dsmoe_status (*residual_mix_forward)(dsmoe_kernel_ctx *ctx, float *out, float *coef, const float *moe,
                                         const float *mlp, const float *coef_logits, int S, int M);
    // dmoe, dmlp (S, M) +=; dcoef_logits (S, 2) +=.
    dsmoe_status (*residual_mix_backward)(dsmoe_kernel_ctx *ctx, float *dmoe, float *dmlp, float *dcoef_logits,
                                          const float *dout, const float *moe, const float *mlp,
                                          const float *coef, int S, int M);

    // --- optimizer: AdamW on n parameters ------------------------------------------------------
    // g = grad * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    // param -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * param). t >= 1.
    dsmoe_status (*adamw_update)(dsmoe_kernel_ctx *ctx, float *param, const float *grad, float *m, float *v,
                                 size_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                                 float grad_scale, int t);
} dsmoe_kernel_plugin_v1;

typedef const dsmoe_kernel_plugin_v1 *(*dsmoe_kernel_plugin_entry_fn)(void);

#endif
