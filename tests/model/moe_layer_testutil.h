// tests/model/moe_layer_testutil.h: what tests/model/test_moe_layer.c (one rank) and tests/model/test_moe_layer_ep.c
// (expert parallel) share: the runtime, host problems, kernel buffers (float32 and bfloat16), the layer
// configuration, and one forward + backward pass.
// defines: problem, problem_make, moe_test_open, moe_test_close, pass_result, pass_run and the helpers below
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
void weights_free(dsmoe_moe_weights *w); // and w1_lp, w2_lp when set

// bfloat16 on the host, written from the definition (the upper 16 bits of a float32, round to nearest
// even; the test values are finite): what a bfloat16 layer's inputs and weights hold.
uint16_t bf16_bits(float f);
float bf16_value(uint16_t h);
float bf16_round(float f);
void bf16_round_all(float *p, size_t n); // in place
// A bfloat16 device buffer of the (already bf16-exact, or then rounded) host values, and back.
void *dev_copy_bf16(const float *host, size_t n);
void to_host_bf16(float *host, const void *dev, size_t n);
// Rounds x, w1 and w2 of p to bfloat16 in place (the router and the biases stay float32, as in a
// bfloat16 model), so that a float32 layer and a bfloat16 layer see the same values.
void problem_round_bf16(problem *p);
// Sets w->w1_lp and w->w2_lp: bfloat16 copies of experts [e0, e0 + El) of p's w1 and w2.
void weights_add_bf16(dsmoe_moe_weights *w, const problem *p, int e0, int El);

// A layer on `group` (self_group or rt.world, with its communicator), flat all-to-all, l_aux over
// the same group.
dsmoe_moe_config layer_config(const problem *p, int ep, dsmoe_comm_group *group);
dsmoe_moe_layer *layer_make(const dsmoe_moe_config *cfg); // fails the test on error

// One forward + backward of layer L (of dt) on the host values of p (all its experts), with dout rh and
// daux: x, dout and dx in dt (bf16-exact host values pass unchanged into a bfloat16 layer); dx starts at
// dx_pre, the gradients at g_pre. Results on the host (g: dwg, dw1, db1, dw2, db2; st.expert_load
// points into load).
typedef struct pass_result {
    dsmoe_moe_stats st;
    int load[64];
    float *out, *dx, *g[5];
    size_t n[5];
} pass_result;
void pass_run(dsmoe_moe_layer *L, dsmoe_dtype dt, const problem *p, const float *rh, const dsmoe_moe_step *step,
              float dx_pre, float g_pre, float daux, pass_result *r);
void pass_free(pass_result *r);

#endif
