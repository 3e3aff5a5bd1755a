// tests/moe_layer_testutil.c: see moe_layer_testutil.h.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

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
    float *b[] = {w->wg, w->w1, w->b1, w->w2, w->b2};
    for (int i = 0; i < 5; i++) rt.kern->free(rt.kctx, b[i]);
}

dsmoe_moe_config layer_config(const problem *p, int ep, dsmoe_comm_group *group) {
    return (dsmoe_moe_config){.S = p->S, .M = p->M, .F = p->F, .E = p->E, .K = p->K, .capacity_factor = 1.0f,
                              .eval_capacity_factor = 1.0f, .min_capacity = 0, .drop_tokens = 1,
                              .random_token_selection = 0, .noise = DSMOE_NOISE_NONE, .jitter_eps = 0.0f,
                              .ep = ep, .ep_group = group,
                              .ep_ctl = group == self_group ? self_ctl : rt.world_ctl,
                              .alltoall = DSMOE_A2A_FLAT, .ranks_per_node = 0,
                              .aux_scope = DSMOE_AUX_SCOPE_BATCH, .aux_group = group};
}

dsmoe_moe_layer *layer_make(const dsmoe_moe_config *cfg) {
    dsmoe_moe_layer *L = NULL;
    dsmoe_err err = {0};
    if (dsmoe_moe_layer_create(&rt, cfg, &L, &err) != DSMOE_OK) fail_msg("layer create: %s", err.msg);
    return L;
}
