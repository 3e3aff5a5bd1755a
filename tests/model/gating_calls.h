// tests/model/gating_calls.h: the cpu kernel plugin's gating, dispatch and combine members on host arrays,
// for tests/model/test_gating.c and test_dispatch_combine.c: each call uploads its inputs, runs the member
// on the context's default queue, and downloads its outputs after a synchronize. Include after
// cpu_plugin_test.h. With the gating parameters and test data both tests start from.
// defines: run_gate_route, run_gate_assign, run_gate_backward, run_dispatch, run_dispatch_backward,
//          run_combine, run_combine_backward, params, fill_uniform
#ifndef DSMOE_GATING_CALLS_H
#define DSMOE_GATING_CALLS_H
#include <stddef.h>
#include <stdint.h>

#include "dsmoe/kernel_plugin.h"
#include "dsmoe/rng.h"

// Training, no noise, no random selection, seed 1234, tokens from 0.
static inline dsmoe_gating_params params(int S, int E, int K) {
    dsmoe_gating_params p = {.S = S, .E = E, .K = K, .noise = DSMOE_NOISE_NONE, .random_selection = 0,
                             .training = 1, .seed = 1234, .token_offset = 0};
    return p;
}

// Deterministic test data: uniform in [lo, hi).
static inline void fill_uniform(float *x, size_t n, uint64_t key, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * dsmoe_rng_uniform(key, i);
}

// Outputs are uploaded first too where the test prefills them, so that "assigns" and "accumulates"
// both show. A NULL host array passes a NULL device pointer (for the argument checks). Sizes come from the
// arguments, clamped at 0 so that invalid ones reach the plugin's checks.

static inline size_t nz(long n) { return n > 0 ? (size_t)n : 0; }

static inline void *up(dsmoe_kernel_ctx *c, const void *h, size_t bytes) { return h ? dev_put(c, h, bytes) : NULL; }

static inline void *out_buf(dsmoe_kernel_ctx *c, const void *h, size_t bytes) {
    return h ? dev_new(c, bytes, 0) : NULL;
}

static inline void down(dsmoe_kernel_ctx *c, void *h, const void *d, size_t bytes) {
    if (h) dev_get(c, h, d, bytes);
}

static inline dsmoe_status run_gate_route(dsmoe_kernel_ctx *c, const dsmoe_gating_params *p, const float *logits,
                                          float *probs, int32_t *choice, int32_t *counts) {
    size_t S = p ? nz(p->S) : 0, E = p ? nz(p->E) : 0, K = p ? nz(p->K) : 0;
    void *dl = up(c, logits, S * E * 4), *dp = out_buf(c, probs, S * E * 4), *dc = out_buf(c, choice, S * K * 4);
    void *dn = out_buf(c, counts, E * 4);
    dsmoe_status st = P->gate_route(c, P->default_queue(c), p, dl, dp, dc, dn);
    if (st == DSMOE_OK) down(c, probs, dp, S * E * 4), down(c, choice, dc, S * K * 4), down(c, counts, dn, E * 4);
    dev_free(c, dl), dev_free(c, dp), dev_free(c, dc), dev_free(c, dn);
    return st;
}

// aux_sums (2E + 1): [P_e, N_e, S] as gate_assign writes them.
static inline dsmoe_status run_gate_assign(dsmoe_kernel_ctx *c, const dsmoe_gating_params *p, int cap,
                                           const float *probs, const int32_t *choice, int32_t *slot, float *weight,
                                           int32_t *kept, double *aux_sums) {
    size_t S = p ? nz(p->S) : 0, E = p ? nz(p->E) : 0, K = p ? nz(p->K) : 0, na = (2 * E + 1) * 8;
    void *dp = up(c, probs, S * E * 4), *dc = up(c, choice, S * K * 4), *ds = out_buf(c, slot, S * K * 4);
    void *dw = out_buf(c, weight, S * K * 4), *dk = out_buf(c, kept, E * 4), *da = out_buf(c, aux_sums, na);
    dsmoe_status st = P->gate_assign(c, P->default_queue(c), p, cap, dp, dc, ds, dw, dk, da);
    if (st == DSMOE_OK) {
        down(c, slot, ds, S * K * 4), down(c, weight, dw, S * K * 4);
        down(c, kept, dk, E * 4), down(c, aux_sums, da, na);
    }
    dev_free(c, dp), dev_free(c, dc), dev_free(c, ds), dev_free(c, dw), dev_free(c, dk), dev_free(c, da);
    return st;
}

// dlogits accumulates (uploaded, then downloaded).
static inline dsmoe_status run_gate_backward(dsmoe_kernel_ctx *c, const dsmoe_gating_params *p, float *dlogits,
                                             const float *probs, const int32_t *choice, const int32_t *slot,
                                             const float *dweight, const double *aux_sums, float daux) {
    size_t S = p ? nz(p->S) : 0, E = p ? nz(p->E) : 0, K = p ? nz(p->K) : 0;
    void *dd = up(c, dlogits, S * E * 4), *dp = up(c, probs, S * E * 4), *dc = up(c, choice, S * K * 4);
    void *ds = up(c, slot, S * K * 4), *dw = up(c, dweight, S * K * 4), *da = up(c, aux_sums, (2 * E + 1) * 8);
    dsmoe_status st = P->gate_backward(c, P->default_queue(c), p, dd, dp, dc, ds, dw, da, daux);
    if (st == DSMOE_OK) down(c, dlogits, dd, S * E * 4);
    dev_free(c, dd), dev_free(c, dp), dev_free(c, dc), dev_free(c, ds), dev_free(c, dw), dev_free(c, da);
    return st;
}

// The four table ops; every output is uploaded first (the test's prefill) and downloaded after.
enum { OP_DISPATCH, OP_DISPATCH_BACKWARD, OP_COMBINE, OP_COMBINE_BACKWARD };

static inline dsmoe_status run_table_op(dsmoe_kernel_ctx *c, int op, float *out, float *dweight, const float *in,
                                        const float *y, const int32_t *choice, const int32_t *slot,
                                        const float *weight, int S, int K, int E, int Cap, int M) {
    size_t sm = nz(S) * nz(M), ecm = nz(E) * nz(Cap) * nz(M), sk = nz(S) * nz(K);
    // out: buf (E, C, M) for dispatch, dx (S, M), combine's out (S, M), dy (E, C, M); in: x, dbuf, -, dout
    size_t n_out = op == OP_DISPATCH || op == OP_COMBINE_BACKWARD ? ecm : sm;
    size_t n_in = op == OP_DISPATCH_BACKWARD ? ecm : sm;
    void *dout = up(c, out, n_out * 4), *ddw = up(c, dweight, sk * 4), *din = up(c, in, n_in * 4);
    void *dy = up(c, y, ecm * 4);
    void *dc = up(c, choice, sk * 4), *ds = up(c, slot, sk * 4), *dw = up(c, weight, sk * 4);
    dsmoe_kernel_queue *q = P->default_queue(c);
    dsmoe_status st;
    const dsmoe_dtype f = DSMOE_FLOAT32;
    if (op == OP_DISPATCH) st = P->moe_dispatch(c, q, dout, din, f, dc, ds, S, K, E, Cap, M);
    else if (op == OP_DISPATCH_BACKWARD) st = P->moe_dispatch_backward(c, q, dout, din, f, dc, ds, S, K, E, Cap, M);
    else if (op == OP_COMBINE) st = P->moe_combine(c, q, dout, dy, f, dc, ds, dw, S, K, E, Cap, M);
    else st = P->moe_combine_backward(c, q, dout, ddw, din, dy, f, dc, ds, dw, S, K, E, Cap, M);
    if (st == DSMOE_OK) down(c, out, dout, n_out * 4), down(c, dweight, ddw, sk * 4);
    dev_free(c, dout), dev_free(c, ddw), dev_free(c, din), dev_free(c, dy), dev_free(c, dc), dev_free(c, ds),
        dev_free(c, dw);
    return st;
}

static inline dsmoe_status run_dispatch(dsmoe_kernel_ctx *c, float *buf, const float *x, const int32_t *choice,
                                        const int32_t *slot, int S, int K, int E, int Cap, int M) {
    return run_table_op(c, OP_DISPATCH, buf, NULL, x, NULL, choice, slot, NULL, S, K, E, Cap, M);
}

static inline dsmoe_status run_dispatch_backward(dsmoe_kernel_ctx *c, float *dx, const float *dbuf,
                                                 const int32_t *choice, const int32_t *slot, int S, int K, int E,
                                                 int Cap, int M) {
    return run_table_op(c, OP_DISPATCH_BACKWARD, dx, NULL, dbuf, NULL, choice, slot, NULL, S, K, E, Cap, M);
}

static inline dsmoe_status run_combine(dsmoe_kernel_ctx *c, float *out, const float *y, const int32_t *choice,
                                       const int32_t *slot, const float *weight, int S, int K, int E, int Cap, int M) {
    return run_table_op(c, OP_COMBINE, out, NULL, NULL, y, choice, slot, weight, S, K, E, Cap, M);
}

static inline dsmoe_status run_combine_backward(dsmoe_kernel_ctx *c, float *dy, float *dweight, const float *dout,
                                                const float *y, const int32_t *choice, const int32_t *slot,
                                                const float *weight, int S, int K, int E, int Cap, int M) {
    return run_table_op(c, OP_COMBINE_BACKWARD, dy, dweight, dout, y, choice, slot, weight, S, K, E, Cap, M);
}

#endif
