// tests/model/moe_layer_testutil.c: see moe_layer_testutil.h.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/rng.h"
#include "moe_layer_testutil.h"

dsmoe_runtime rt;
dsmoe_comm_group *self_group;
dsmoe_ctl_group *self_ctl;
static dsmoe_rt_group self;
int world_rank, world_size;

int moe_test_open(int *argc, char ***argv) {
    MPI_Init(argc, argv);
    dsmoe_err err = {0};
    if (dsmoe_runtime_open("cpu", "mpi", "", 1, &rt, &err) != DSMOE_OK) {
        fprintf(stderr, "runtime: %s\n", err.msg);
        MPI_Finalize();
        return 1;
    }
    world_rank = rt.world_rank;
    world_size = rt.world_size;
    if (dsmoe_rt_group_split(&rt, world_rank, 0, &self, &err) != DSMOE_OK) { // a group of one
        fprintf(stderr, "group of one: %s\n", err.msg);
        MPI_Finalize();
        return 1;
    }
    self_group = self.comm;
    self_ctl = self.ctl;
    return 0;
}

void moe_test_close(void) {
    dsmoe_rt_group_free(&rt, &self);
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
}

float *host_alloc(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    assert_non_null(p);
    return p;
}

void fill_normal(float *p, size_t n, uint64_t key, float std) {
    for (size_t i = 0; i < n; i++) p[i] = std * dsmoe_rng_normal(key, i);
}

problem problem_make(int S, int M, int F, int E, int K, uint64_t wkey, uint64_t xkey) {
    problem p = {.S = S, .M = M, .F = F, .E = E, .K = K};
    p.x = host_alloc((size_t)S * M);
    p.wg = host_alloc((size_t)E * M);
    p.w1 = host_alloc((size_t)E * F * M);
    p.b1 = host_alloc((size_t)E * F);
    p.w2 = host_alloc((size_t)E * M * F);
    p.b2 = host_alloc((size_t)E * M);
    fill_normal(p.x, (size_t)S * M, dsmoe_rng_key(xkey, 1, 0, 0), 1.0f);
    fill_normal(p.wg, (size_t)E * M, dsmoe_rng_key(wkey, 2, 0, 0), 1.0f / sqrtf((float)M));
    fill_normal(p.w1, (size_t)E * F * M, dsmoe_rng_key(wkey, 3, 0, 0), 1.0f / sqrtf((float)M));
    fill_normal(p.b1, (size_t)E * F, dsmoe_rng_key(wkey, 4, 0, 0), 0.2f);
    fill_normal(p.w2, (size_t)E * M * F, dsmoe_rng_key(wkey, 5, 0, 0), 1.0f / sqrtf((float)F));
    fill_normal(p.b2, (size_t)E * M, dsmoe_rng_key(wkey, 6, 0, 0), 0.2f);
    return p;
}

void problem_free(problem *p) {
    free(p->x);
    free(p->wg);
    free(p->w1);
    free(p->b1);
    free(p->w2);
    free(p->b2);
}

float *dev_copy(const float *host, size_t n) {
    void *d = NULL;
    assert_int_equal(rt.kern->alloc(rt.kctx, n * sizeof(float), 0, &d), DSMOE_OK);
    if (n) assert_int_equal(rt.kern->copy_to_device(rt.kctx, rt.q, d, host, n * sizeof(float)), DSMOE_OK);
    return d;
}

float *dev_fill(size_t n, float v) {
    float *h = host_alloc(n);
    for (size_t i = 0; i < n; i++) h[i] = v;
    float *d = dev_copy(h, n);
    free(h);
    return d;
}

void to_host(float *host, const float *dev, size_t n) {
    if (n) assert_int_equal(rt.kern->copy_to_host(rt.kctx, rt.q, host, dev, n * sizeof(float)), DSMOE_OK);
    assert_int_equal(rt.kern->synchronize(rt.kctx), DSMOE_OK); // host copies are valid after a wait
}

dsmoe_moe_weights weights_dev(const problem *p, int e0, int El) {
    size_t FM = (size_t)p->F * p->M;
    return (dsmoe_moe_weights){
        .wg = dev_copy(p->wg, (size_t)p->E * p->M), .w1 = dev_copy(p->w1 + e0 * FM, El * FM),
        .b1 = dev_copy(p->b1 + (size_t)e0 * p->F, (size_t)El * p->F), .w2 = dev_copy(p->w2 + e0 * FM, El * FM),
        .b2 = dev_copy(p->b2 + (size_t)e0 * p->M, (size_t)El * p->M)};
}

dsmoe_moe_weights grads_dev(const problem *p, int El, float fill) {
    size_t FM = (size_t)p->F * p->M;
    return (dsmoe_moe_weights){.wg = dev_fill((size_t)p->E * p->M, fill), .w1 = dev_fill(El * FM, fill),
                               .b1 = dev_fill((size_t)El * p->F, fill), .w2 = dev_fill(El * FM, fill),
                               .b2 = dev_fill((size_t)El * p->M, fill)};
}

void weights_free(dsmoe_moe_weights *w) {
    void *b[] = {w->wg, w->w1, w->b1, w->w2, w->b2, (void *)w->w1_lp, (void *)w->w2_lp};
    for (int i = 0; i < 7; i++)
        if (b[i]) rt.kern->free(rt.kctx, b[i]);
}

uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t low = u & 0xffffu, hi = u >> 16;
    // Round to nearest, ties to the even pattern; a carry into the exponent is the right next value.
    if (low > 0x8000u || (low == 0x8000u && (hi & 1u))) hi++;
    return (uint16_t)hi;
}

float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float bf16_round(float f) { return bf16_value(bf16_bits(f)); }

void bf16_round_all(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = bf16_round(p[i]);
}

void *dev_copy_bf16(const float *host, size_t n) {
    uint16_t *h = malloc((n ? n : 1) * sizeof *h);
    assert_non_null(h);
    for (size_t i = 0; i < n; i++) h[i] = bf16_bits(host[i]);
    void *d = NULL;
    assert_int_equal(rt.kern->alloc(rt.kctx, (n ? n : 1) * sizeof *h, 0, &d), DSMOE_OK);
    if (n) assert_int_equal(rt.kern->copy_to_device(rt.kctx, rt.q, d, h, n * sizeof *h), DSMOE_OK);
    free(h); // consumed by the copy (ordinary host memory)
    return d;
}

void to_host_bf16(float *host, const void *dev, size_t n) {
    uint16_t *h = malloc((n ? n : 1) * sizeof *h);
    assert_non_null(h);
    if (n) assert_int_equal(rt.kern->copy_to_host(rt.kctx, rt.q, h, dev, n * sizeof *h), DSMOE_OK);
    assert_int_equal(rt.kern->synchronize(rt.kctx), DSMOE_OK);
    for (size_t i = 0; i < n; i++) host[i] = bf16_value(h[i]);
    free(h);
}

void problem_round_bf16(problem *p) {
    size_t FM = (size_t)p->F * p->M;
    bf16_round_all(p->x, (size_t)p->S * p->M);
    bf16_round_all(p->w1, (size_t)p->E * FM);
    bf16_round_all(p->w2, (size_t)p->E * FM);
}

void weights_add_bf16(dsmoe_moe_weights *w, const problem *p, int e0, int El) {
    size_t FM = (size_t)p->F * p->M;
    w->w1_lp = dev_copy_bf16(p->w1 + e0 * FM, El * FM);
    w->w2_lp = dev_copy_bf16(p->w2 + e0 * FM, El * FM);
}

dsmoe_moe_config layer_config(const problem *p, int ep, dsmoe_comm_group *group) {
    return (dsmoe_moe_config){.S = p->S, .M = p->M, .F = p->F, .E = p->E, .K = p->K, .capacity_factor = 1.0f,
                              .eval_capacity_factor = 1.0f, .min_capacity = 0, .drop_tokens = 1,
                              .random_token_selection = 0, .noise = DSMOE_NOISE_NONE, .jitter_eps = 0.0f,
                              .ep = ep, .ep_group = group,
                              .ep_ctl = group == self_group ? self_ctl : rt.world_ctl,
                              .alltoall = DSMOE_A2A_FLAT, .ranks_per_node = 0,
                              .aux_scope = DSMOE_AUX_SCOPE_BATCH, .aux_group = group, .dt = DSMOE_FLOAT32};
}

dsmoe_moe_layer *layer_make(const dsmoe_moe_config *cfg) {
    dsmoe_moe_layer *L = NULL;
    dsmoe_err err = {0};
    if (dsmoe_moe_layer_create(&rt, cfg, &L, &err) != DSMOE_OK) fail_msg("layer create: %s", err.msg);
    return L;
}

void pass_run(dsmoe_moe_layer *L, dsmoe_dtype dt, const problem *p, const float *rh, const dsmoe_moe_step *step,
              float dx_pre, float g_pre, float daux, pass_result *r) {
    int lp = dt == DSMOE_BFLOAT16;
    size_t SM = (size_t)p->S * p->M;
    dsmoe_moe_weights w = weights_dev(p, 0, p->E);
    if (lp) weights_add_bf16(&w, p, 0, p->E);
    float *dx_pre_h = host_alloc(SM);
    for (size_t i = 0; i < SM; i++) dx_pre_h[i] = dx_pre;
    void *x = lp ? dev_copy_bf16(p->x, SM) : dev_copy(p->x, SM);
    void *out = lp ? dev_copy_bf16(dx_pre_h, SM) : dev_copy(dx_pre_h, SM); // any contents: assigned
    void *dout = lp ? dev_copy_bf16(rh, SM) : dev_copy(rh, SM);
    void *dx = lp ? dev_copy_bf16(dx_pre_h, SM) : dev_copy(dx_pre_h, SM);
    dsmoe_moe_weights g = grads_dev(p, p->E, g_pre);
    dsmoe_err err = {0};
    if (dsmoe_moe_forward(L, &w, x, out, step, &r->st, &err) != DSMOE_OK) fail_msg("forward: %s", err.msg);
    assert_true(p->E <= 64);
    memcpy(r->load, r->st.expert_load, (size_t)p->E * sizeof(int));
    r->st.expert_load = r->load;
    if (dsmoe_moe_backward(L, &w, &g, dout, dx, daux, &err) != DSMOE_OK) fail_msg("backward: %s", err.msg);
    r->out = host_alloc(SM);
    r->dx = host_alloc(SM);
    if (lp) {
        to_host_bf16(r->out, out, SM);
        to_host_bf16(r->dx, dx, SM);
    } else {
        to_host(r->out, out, SM);
        to_host(r->dx, dx, SM);
    }
    size_t FM = (size_t)p->F * p->M;
    size_t n[5] = {(size_t)p->E * p->M, p->E * FM, (size_t)p->E * p->F, p->E * FM, (size_t)p->E * p->M};
    float *gd[5] = {g.wg, g.w1, g.b1, g.w2, g.b2};
    for (int i = 0; i < 5; i++) {
        r->n[i] = n[i];
        r->g[i] = host_alloc(n[i]);
        to_host(r->g[i], gd[i], n[i]);
    }
    weights_free(&g);
    weights_free(&w);
    void *bufs[] = {x, out, dout, dx};
    for (int i = 0; i < 4; i++) rt.kern->free(rt.kctx, bufs[i]);
    free(dx_pre_h);
}

void pass_free(pass_result *r) {
    free(r->out);
    free(r->dx);
    for (int i = 0; i < 5; i++) free(r->g[i]);
}
