// tests/moe_layer_testutil.h: what tests/test_moe_layer.c (one rank) and tests/test_moe_layer_ep.c
// (expert parallel) share: the runtime, host problems, kernel buffers, and the layer configuration.
// defines: problem, problem_make, moe_test_open, moe_test_close and the helpers below
#ifndef DSMOE_MOE_LAYER_TESTUTIL_H
#define DSMOE_MOE_LAYER_TESTUTIL_H
#include <stddef.h>
#include <stdint.h>
#include "moe_layer.h"
#include "runtime.h"

extern dsmoe_runtime rt;
extern dsmoe_comm_group *self_group; // a group of one: the ep = 1 reference layer
extern dsmoe_ctl_group *self_ctl;     // its control-plane group
extern int world_rank, world_size;

// MPI_Init, the cpu + mpi runtime and self_group; 0 on success (messages on stderr).
int moe_test_open(int *argc, char ***argv);
void moe_test_close(void);

typedef struct problem {
    int S, M, F, E, K;
    float *x;  // (S, M)
    float *wg; // (E, M)
    float *w1; // (E, F, M)
    float *b1; // (E, F)
    float *w2; // (E, M, F)
    float *b2; // (E, M)
} problem;

float *host_alloc(size_t n); // zeroed; fails the test when out of memory
void fill_normal(float *p, size_t n, uint64_t key, float std);
// Weights from `wkey` (the same on every rank), tokens from `xkey`.
problem problem_make(int S, int M, int F, int E, int K, uint64_t wkey, uint64_t xkey);
void problem_free(problem *p);

float *dev_copy(const float *host, size_t n);
float *dev_fill(size_t n, float v);
void to_host(float *host, const float *dev, size_t n);
// Kernel-memory weights of experts [e0, e0 + El) of p (the router is always whole), or gradient
// buffers of those shapes filled with `fill` (to check that the backward accumulates).
dsmoe_moe_weights weights_dev(const problem *p, int e0, int El);
dsmoe_moe_weights grads_dev(const problem *p, int El, float fill);
void weights_free(dsmoe_moe_weights *w);

// A layer on `group` (self_group or rt.world, with its communicator), flat all-to-all, l_aux over
// the same group.
dsmoe_moe_config layer_config(const problem *p, int ep, dsmoe_comm_group *group);
dsmoe_moe_layer *layer_make(const dsmoe_moe_config *cfg); // fails the test on error

#endif
