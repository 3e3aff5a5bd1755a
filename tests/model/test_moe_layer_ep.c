// tests/model/test_moe_layer_ep.c: the MoE layer (core/model/moe_layer.c) on 2 and 4 ranks, ep = ranks, through
// the real plugins. Rank scope of l_aux: each rank's result equals a one-rank layer (all experts local,
// on a group made from MPI_COMM_SELF) run on that rank's tokens; expert gradients summed over ranks
// agree. Batch scope: l_aux and every gradient equal those of one rank holding all ranks' tokens. The
// hierarchical all-to-all gives the flat one's results bit for bit; the node-layout rules hold. The same
// in bfloat16 (cfg.dt) against a bfloat16 one-rank layer, with the float32 tolerances: the layout moves
// rows and sums gradients in another order, which bfloat16 changes no more than float32.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dsmoe/rng.h"
#include "moe_layer_testutil.h"

// ----------------------------------------------------------------------------------------------------
// expert parallelism: ep = world size against a one-rank layer per rank

// The largest value of v over all ranks (every rank then asserts on the same number).
static double all_max(double v) {
    double r;
    MPI_Allreduce(&v, &r, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return r;
}

static void expect_close(const char *what, const float *got, const float *want, size_t n, double rel) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        md = d > md || isnan(d) ? (isnan(d) ? INFINITY : d) : md;
        mr = fabs(want[i]) > mr ? fabs(want[i]) : mr;
    }
    md = all_max(md);
    mr = all_max(mr);
    if (!(md <= rel * mr + 1e-6)) fail_msg("%s: max difference %.3g (max |reference| %.3g)", what, md, mr);
}

typedef struct ep_case {
    const char *name;
    int E_per_rank, K, dropless, rts, noise, training;
    float cf;
    dsmoe_dtype dt; // the layer's activations: FLOAT32 (0) or BFLOAT16
} ep_case;

enum { EP_S = 24, EP_M = 8, EP_F = 12 };

// The tokens of rank r (every rank can make any rank's): rank 0 never picks expert E-1 (with the
// router below, a strongly negative score), so it sends that expert nothing, while the other ranks do.
static void ep_tokens(float *x, int r) {
    fill_normal(x, (size_t)EP_S * EP_M, dsmoe_rng_key(dsmoe_rng_key(302, (uint64_t)r, 0, 0), 1, 0, 0), 1.0f);
    for (int t = 0; t < EP_S; t++) x[t * EP_M] = r == 0 ? -3.0f - fabsf(x[t * EP_M]) : 0.3f * x[t * EP_M];
}

static void ep_dout(float *d, int r) { fill_normal(d, (size_t)EP_S * EP_M, dsmoe_rng_key(303, (uint64_t)r, 0, 0), 1.0f); }

// S tokens (a multiple of EP_S: ranks' blocks in rank order), the shared weights.
static problem ep_problem(const ep_case *c, int S, int first_rank) {
    int E = c->E_per_rank * world_size;
    problem p = problem_make(S, EP_M, EP_F, E, c->K, 301, 1);
    for (int e = 0; e < E; e++) p.wg[e * EP_M] = e == E - 1 ? 3.0f : 0.0f;
    for (int b = 0; b < S / EP_S; b++) ep_tokens(p.x + (size_t)b * EP_S * EP_M, first_rank + b);
    return p;
}

// What one forward + backward gave on this rank, on the host.
typedef struct ep_result {
    dsmoe_moe_stats st;
    int load[64];
    float *out, *dx; // (S, M)
    float *g[5];     // dwg (E, M), dw1, db1, dw2, db2 of the local experts
    size_t n[5];
    dsmoe_a2a_plan plan; // what the layer's last all-to-all did
} ep_result;

static void ep_result_free(ep_result *r) {
    free(r->out);
    free(r->dx);
    for (int i = 0; i < 5; i++) free(r->g[i]);
}

// Runs a layer of cfg (S tokens from p, experts [e0, e0 + El)) forward and backward with dout (S, M)
// and daux 0.3, from token offset `offset`.
static void ep_run(const ep_case *c, const dsmoe_moe_config *cfg, const problem *p, int e0, const float *dout_h,
                   uint64_t offset, ep_result *res) {
    int S = cfg->S, M = p->M, El = p->E / cfg->ep;
    size_t SM = (size_t)S * M;
    dsmoe_moe_layer *L = layer_make(cfg);
    dsmoe_moe_weights w = weights_dev(p, e0, El), g = grads_dev(p, El, 0);
    int lp = cfg->dt == DSMOE_BFLOAT16; // x, out, dout, dx in bfloat16 (the host values rounded)
    if (lp) weights_add_bf16(&w, p, e0, El);
    float *zeros = host_alloc(SM);
    void *x = lp ? dev_copy_bf16(p->x, SM) : dev_copy(p->x, SM), *out = lp ? dev_copy_bf16(zeros, SM) : dev_copy(zeros, SM);
    void *dout = lp ? dev_copy_bf16(dout_h, SM) : dev_copy(dout_h, SM), *dx = lp ? dev_copy_bf16(zeros, SM) : dev_copy(zeros, SM);
    free(zeros);
    dsmoe_moe_step step = {.training = c->training, .seed = 77, .token_offset = offset};
    dsmoe_err err = {0};
    if (dsmoe_moe_forward(L, &w, x, out, &step, &res->st, &err) != DSMOE_OK) fail_msg("%s: forward: %s", c->name, err.msg);
    for (int e = 0; e < p->E; e++) res->load[e] = res->st.expert_load[e];
    if (dsmoe_moe_backward(L, &w, &g, dout, dx, 0.3f, &err) != DSMOE_OK) fail_msg("%s: backward: %s", c->name, err.msg);
    res->plan = *dsmoe_exchange_last(dsmoe_moe_layer_exchange(L));
    res->out = host_alloc(SM);
    res->dx = host_alloc(SM);
    if (lp) {
        to_host_bf16(res->out, out, SM);
        to_host_bf16(res->dx, dx, SM);
    } else {
        to_host(res->out, out, SM);
        to_host(res->dx, dx, SM);
    }
    size_t FM = (size_t)p->F * M;
    float *gd[5] = {g.wg, g.w1, g.b1, g.w2, g.b2};
    size_t n[5] = {(size_t)p->E * M, El * FM, (size_t)El * p->F, El * FM, (size_t)El * M};
    for (int i = 0; i < 5; i++) {
        res->n[i] = n[i];
        res->g[i] = host_alloc(n[i]);
        to_host(res->g[i], gd[i], n[i]);
    }
    weights_free(&w);
    weights_free(&g);
    void *bufs[] = {x, out, dout, dx};
    for (int i = 0; i < 4; i++) rt.kern->free(rt.kctx, bufs[i]);
    dsmoe_moe_layer_free(L);
}

// The hierarchical exchange moves the same bytes to the same places: every result bit for bit.
static void expect_identical(const char *name, const ep_result *a, const ep_result *b, int E) {
    size_t SM = (size_t)EP_S * EP_M;
    int same = memcmp(a->out, b->out, SM * sizeof(float)) == 0 && memcmp(a->dx, b->dx, SM * sizeof(float)) == 0 &&
               a->st.aux_loss == b->st.aux_loss && a->st.capacity == b->st.capacity &&
               a->st.dropped == b->st.dropped && memcmp(a->load, b->load, (size_t)E * sizeof(int)) == 0;
    for (int i = 0; i < 5; i++) same = same && memcmp(a->g[i], b->g[i], a->n[i] * sizeof(float)) == 0;
    if (all_max(!same) > 0) fail_msg("%s: the hierarchical all-to-all changed the results of the flat one", name);
}

static const char *const grad_names[5] = {"dwg", "dw1", "db1", "dw2", "db2"};

// Rank scope (DeepSpeed's): each rank equals a one-rank layer (all experts, a group from MPI_COMM_SELF)
// on its own tokens; the owner's expert gradients equal the one-rank ones summed over ranks.
static void ep_rank_scope(const ep_case *c, const dsmoe_moe_config *cfg, const ep_result *res) {
    int R = world_size, r = world_rank, E = c->E_per_rank * R, El = c->E_per_rank;
    problem p = ep_problem(c, EP_S, r);
    float *dout = host_alloc((size_t)EP_S * EP_M);
    ep_dout(dout, r);
    dsmoe_moe_config rcfg = *cfg;
    rcfg.ep = 1;
    rcfg.ep_group = rcfg.aux_group = self_group;
    rcfg.ep_ctl = self_ctl;
    ep_result ref;
    ep_run(c, &rcfg, &p, 0, dout, (uint64_t)r * EP_S, &ref);
    size_t SM = (size_t)EP_S * EP_M;
    expect_close("forward out", res->out, ref.out, SM, 1e-6);
    assert_true(all_max(fabs(res->st.aux_loss - ref.st.aux_loss)) <= 1e-6);
    assert_int_equal(res->st.dropped, ref.st.dropped);
    for (int e = 0; e < E; e++) assert_int_equal(res->load[e], ref.load[e]);
    // Dropless: the EP group agrees on the largest count of any rank.
    assert_int_equal(res->st.capacity, c->dropless ? (int)all_max(ref.st.capacity) : ref.st.capacity);
    // The layout this test is about: rank 0 sends nothing to expert E-1, another rank does.
    assert_int_equal(all_max(r == 0 ? res->load[E - 1] : 0), 0);
    assert_true(all_max(r != 0 ? res->load[E - 1] : 0) > 0);
    expect_close("dx", res->dx, ref.dx, SM, 1e-6);
    expect_close("dwg (this rank's tokens)", res->g[0], ref.g[0], res->n[0], 1e-6);
    for (int i = 1; i < 5; i++) {
        size_t per = ref.n[i] / (size_t)E, nl = (size_t)El * per;
        MPI_Allreduce(MPI_IN_PLACE, ref.g[i], (int)ref.n[i], MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        expect_close(grad_names[i], res->g[i], ref.g[i] + (size_t)r * nl, nl, 1e-5);
    }
    ep_result_free(&ref);
    free(dout);
    problem_free(&p);
}

// Batch scope: l_aux and every gradient equal those of ONE rank holding all ranks' tokens (R*S tokens in
// rank order, token offset 0). Nothing may be dropped (the capacity comes from each rank's own S), so
// cfg has a capacity above any count, or is dropless.
static void ep_batch_scope(const ep_case *c, const dsmoe_moe_config *cfg, const ep_result *res) {
    int R = world_size, r = world_rank, E = c->E_per_rank * R, El = c->E_per_rank, St = R * EP_S;
    problem p = ep_problem(c, St, 0);
    size_t SM = (size_t)EP_S * EP_M;
    float *dout = host_alloc((size_t)St * EP_M);
    for (int q = 0; q < R; q++) ep_dout(dout + (size_t)q * SM, q);
    dsmoe_moe_config rcfg = *cfg;
    rcfg.S = St;
    rcfg.ep = 1;
    rcfg.ep_group = rcfg.aux_group = self_group;
    rcfg.ep_ctl = self_ctl;
    ep_result ref;
    ep_run(c, &rcfg, &p, 0, dout, 0, &ref);
    assert_int_equal(ref.st.dropped, 0);
    assert_int_equal(all_max((double)res->st.dropped), 0);
    // The same l_aux on every rank: the batch's.
    if (!(all_max(fabs(res->st.aux_loss - ref.st.aux_loss)) <= 1e-6 * ref.st.aux_loss))
        fail_msg("%s: l_aux %.9g on rank %d, %.9g for one rank holding every token", c->name, res->st.aux_loss, r,
                 ref.st.aux_loss);
    expect_close("forward out (batch)", res->out, ref.out + (size_t)r * SM, SM, 1e-6);
    expect_close("dx (batch)", res->dx, ref.dx + (size_t)r * SM, SM, 1e-6);
    // The router gradient summed over ranks (the data-parallel reduction) is the whole batch's.
    float *dwg = host_alloc(res->n[0]);
    memcpy(dwg, res->g[0], res->n[0] * sizeof(float));
    MPI_Allreduce(MPI_IN_PLACE, dwg, (int)res->n[0], MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    expect_close("dwg summed over ranks (batch)", dwg, ref.g[0], res->n[0], 1e-5);
    free(dwg);
    for (int i = 1; i < 5; i++) {
        size_t nl = (size_t)El * (ref.n[i] / (size_t)E);
        expect_close(grad_names[i], res->g[i], ref.g[i] + (size_t)r * nl, nl, 1e-5);
    }
    ep_result_free(&ref);
    free(dout);
    problem_free(&p);
}

// Each case on the world (ep = ranks): rank scope against per-rank layers, batch scope against one rank
// holding every token, and both again with the hierarchical all-to-all (ranks_per_node 2 on 4 ranks: 2
// pretend nodes; 1 on 2 ranks), which must change nothing.
static void run_ep_case(const ep_case *c) {
    int R = world_size, r = world_rank, E = c->E_per_rank * R, El = c->E_per_rank;
    problem p = ep_problem(c, EP_S, r);
    float *dout = host_alloc((size_t)EP_S * EP_M);
    ep_dout(dout, r);
    dsmoe_moe_config cfg = layer_config(&p, R, rt.world);
    cfg.capacity_factor = cfg.eval_capacity_factor = c->cf;
    cfg.drop_tokens = !c->dropless;
    cfg.random_token_selection = c->rts;
    cfg.noise = c->noise;
    cfg.jitter_eps = 0.1f;
    cfg.dt = c->dt;
    int G = R == 4 ? 2 : 1;

    for (int scope = DSMOE_AUX_SCOPE_BATCH; scope <= DSMOE_AUX_SCOPE_RANK; scope++) {
        dsmoe_moe_config fc = cfg;
        fc.aux_scope = scope;
        // Batch scope is compared with one rank holding every token: no drops (capacity E*K*S/E).
        if (scope == DSMOE_AUX_SCOPE_BATCH && !c->dropless) fc.capacity_factor = fc.eval_capacity_factor = (float)E;
        dsmoe_moe_config hc = fc;
        hc.alltoall = DSMOE_A2A_HIERARCHICAL;
        hc.ranks_per_node = G;
        ep_result flat, hier;
        ep_run(c, &fc, &p, r * El, dout, (uint64_t)r * EP_S, &flat);
        ep_run(c, &hc, &p, r * El, dout, (uint64_t)r * EP_S, &hier);
        assert_int_equal(flat.plan.algo, DSMOE_A2A_FLAT);
        assert_int_equal(hier.plan.algo, DSMOE_A2A_HIERARCHICAL);
        assert_int_equal(hier.plan.nodes, R / G);
        expect_identical(c->name, &flat, &hier, E);
        if (scope == DSMOE_AUX_SCOPE_BATCH) ep_batch_scope(c, &fc, &flat);
        else ep_rank_scope(c, &fc, &flat);
        ep_result_free(&flat);
        ep_result_free(&hier);
    }
    free(dout);
    problem_free(&p);
}

static void test_ep_top2_rts_rsample(void **s) {
    (void)s;
    run_ep_case(&(ep_case){"top2 rts rsample", 2, 2, 0, 1, DSMOE_NOISE_RSAMPLE, 1, 1.0f, DSMOE_FLOAT32});
}
static void test_ep_top1_dropless_jitter(void **s) {
    (void)s;
    run_ep_case(&(ep_case){"top1 dropless jitter", 1, 1, 1, 0, DSMOE_NOISE_JITTER, 1, 1.0f, DSMOE_FLOAT32});
}
// bfloat16 activations: the bf16 layer on ep ranks against a bf16 one-rank layer (the gradients are
// float32 in both; out and dx are bfloat16 values: a row computed differently would show as a whole
// bf16 step, 2^-8 of it, far above the 1e-6 of max |out| allowed).
static void test_ep_bf16_top2_rts_rsample(void **s) {
    (void)s;
    run_ep_case(&(ep_case){"bf16 top2 rts rsample", 2, 2, 0, 1, DSMOE_NOISE_RSAMPLE, 1, 1.0f, DSMOE_BFLOAT16});
}
static void test_ep_bf16_top1_dropless_jitter(void **s) {
    (void)s;
    run_ep_case(&(ep_case){"bf16 top1 dropless jitter", 1, 1, 1, 0, DSMOE_NOISE_JITTER, 1, 1.0f, DSMOE_BFLOAT16});
}
static void test_ep_top1_eval(void **s) {
    (void)s;
    run_ep_case(&(ep_case){"top1 eval", 2, 1, 0, 0, DSMOE_NOISE_NONE, 0, 1.5f, DSMOE_FLOAT32});
}

// The test data makes the scopes differ: rank 0's tokens avoid expert E-1, so its own l_aux is not
// the batch's (else the batch test above could not tell the scopes apart).
static void test_ep_scopes_differ(void **s) {
    (void)s;
    const ep_case c = {"scopes differ", 2, 1, 1, 0, DSMOE_NOISE_NONE, 1, 1.0f, DSMOE_FLOAT32};
    problem p = ep_problem(&c, EP_S, world_rank);
    float *dout = host_alloc((size_t)EP_S * EP_M);
    ep_dout(dout, world_rank);
    dsmoe_moe_config cfg = layer_config(&p, world_size, rt.world);
    cfg.drop_tokens = 0;
    ep_result batch, rank;
    ep_run(&c, &cfg, &p, world_rank * 2, dout, (uint64_t)world_rank * EP_S, &batch);
    cfg.aux_scope = DSMOE_AUX_SCOPE_RANK;
    ep_run(&c, &cfg, &p, world_rank * 2, dout, (uint64_t)world_rank * EP_S, &rank);
    assert_true(all_max(fabs(batch.st.aux_loss - rank.st.aux_loss)) > 1e-2);
    ep_result_free(&batch);
    ep_result_free(&rank);
    free(dout);
    problem_free(&p);
}

// The node layout: AUTO with a layout unfit for the hierarchical all-to-all (ranks_per_node 3 does not
// divide the ranks) takes flat and says so once, on EP rank 0's stderr; HIERARCHICAL refuses it on
// every rank; AUTO on the real nodes (one machine: one node) resolves to flat without a word.
static void test_ep_layout(void **s) {
    (void)s;
    problem p = problem_make(EP_S, EP_M, EP_F, 2 * world_size, 1, 401, 402);
    dsmoe_moe_config cfg = layer_config(&p, world_size, rt.world);
    cfg.alltoall = DSMOE_A2A_AUTO;
    cfg.ranks_per_node = 3;
    char said[2][1024] = {"", ""};
    for (int i = 0; i < 2; i++) { // the second layer must not repeat the message
        fflush(stderr);
        int saved = dup(2);
        FILE *tmp = tmpfile();
        assert_non_null(tmp);
        dup2(fileno(tmp), 2);
        dsmoe_moe_layer *L = layer_make(&cfg);
        fflush(stderr);
        dup2(saved, 2);
        close(saved);
        rewind(tmp);
        size_t n = fread(said[i], 1, sizeof said[i] - 1, tmp);
        said[i][n] = '\0';
        fclose(tmp);
        const dsmoe_a2a_plan *plan = dsmoe_exchange_last(dsmoe_moe_layer_exchange(L));
        assert_int_equal(plan->algo, DSMOE_A2A_FLAT);
        dsmoe_moe_layer_free(L);
    }
    if (world_rank == 0) {
        if (!strstr(said[0], "alltoall = auto uses the flat all-to-all") || !strstr(said[0], "ranks_per_node 3"))
            fail_msg("rank 0 said \"%s\"", said[0]);
    } else if (said[0][0]) {
        fail_msg("rank %d said \"%s\" (only EP rank 0 speaks)", world_rank, said[0]);
    }
    if (said[1][0]) fail_msg("rank %d repeated the fall-back message: \"%s\"", world_rank, said[1]);

    cfg.alltoall = DSMOE_A2A_HIERARCHICAL;
    dsmoe_moe_layer *L = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_moe_layer_create(&rt, &cfg, &L, &err), DSMOE_ERR_INVALID);
    if (!strstr(err.msg, "alltoall = hierarchical") || !strstr(err.msg, "does not divide"))
        fail_msg("message: %s", err.msg);
    assert_null(L);

    cfg.alltoall = DSMOE_A2A_AUTO;
    cfg.ranks_per_node = 0;
    L = layer_make(&cfg);
    const dsmoe_a2a_plan *plan = dsmoe_exchange_last(dsmoe_moe_layer_exchange(L));
    assert_int_equal(plan->nodes, 1);
    assert_int_equal(plan->algo, DSMOE_A2A_FLAT);
    dsmoe_moe_layer_free(L);
    problem_free(&p);
}

// Inference (step.inference): the exchange moves only the rows that hold tokens. Each rank feeds its own
// number of tokens (rank 1 none) with the capacity of the largest, top-2; the output of every rank equals a
// one-rank layer's on the same tokens, flat and hierarchical, with 1 and 2 experts a rank; and the bytes
// the ranks sent one another in the combine are exactly the rows that crossed ranks (the fixed exchange
// would send (ranks - 1) x E_local x C rows from every rank).
static void test_ep_inference_variable(void **s) {
    (void)s;
    int R = world_size, r = world_rank, n = r == 1 ? 0 : r == 2 ? 5 : EP_S, M = EP_M;
    for (int El = 1; El <= 2; El++)
        for (int hier = 0; hier <= 1; hier++) {
            problem p = problem_make(EP_S, M, EP_F, El * R, 2, 501, dsmoe_rng_key(502, (uint64_t)r, 0, 0));
            dsmoe_moe_config cfg = layer_config(&p, R, rt.world);
            cfg.alltoall = hier ? DSMOE_A2A_HIERARCHICAL : DSMOE_A2A_FLAT;
            cfg.ranks_per_node = hier ? (R == 4 ? 2 : 1) : 0;
            dsmoe_moe_config rcfg = cfg;
            rcfg.ep = 1, rcfg.ep_group = rcfg.aux_group = self_group, rcfg.ep_ctl = self_ctl;
            rcfg.alltoall = DSMOE_A2A_FLAT, rcfg.ranks_per_node = 0;
            dsmoe_moe_step step = {.inference = 1, .tokens = n, .capacity = EP_S};
            size_t SM = (size_t)EP_S * M;
            float *out[2], *zeros = host_alloc(SM);
            dsmoe_moe_stats st;
            for (int ref = 0; ref <= 1; ref++) {
                dsmoe_moe_layer *L = layer_make(ref ? &rcfg : &cfg);
                dsmoe_moe_weights w = ref ? weights_dev(&p, 0, El * R) : weights_dev(&p, r * El, El);
                float *x = dev_copy(p.x, SM), *o = dev_copy(zeros, SM);
                dsmoe_err err = {0};
                if (dsmoe_moe_forward(L, &w, x, o, &step, ref ? NULL : &st, &err) != DSMOE_OK)
                    fail_msg("inference forward (%s, %d experts a rank): %s", ref ? "one rank" : "ep", El, err.msg);
                if (!ref) {
                    const dsmoe_a2a_plan *pl = dsmoe_exchange_last(dsmoe_moe_layer_exchange(L));
                    assert_int_equal(pl->algo, hier && R / cfg.ranks_per_node > 1 ? DSMOE_A2A_HIERARCHICAL
                                                                                   : pl->algo);
                    long crossed = 0; // my token rows that went to another rank's experts
                    for (int e = 0; e < El * R; e++) crossed += e / El != r ? st.expert_load[e] : 0;
                    long sums[2] = {crossed * M * (long)sizeof(float), (long)pl->bytes_sent}, tot[2];
                    MPI_Allreduce(sums, tot, 2, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
                    if (!hier && tot[0] != tot[1])
                        fail_msg("%d experts a rank: the combine sent %ld bytes in all, the rows that crossed "
                                 "ranks are %ld bytes", El, tot[1], tot[0]);
                    if (tot[1] <= 0 || tot[1] >= (long)R * (R - 1) * El * EP_S * M * (long)sizeof(float))
                        fail_msg("%d experts a rank: %ld bytes sent; expected some and fewer than the padded "
                                 "blocks", El, tot[1]);
                    assert_int_equal(st.dropped, 0);
                }
                out[ref] = host_alloc(SM);
                to_host(out[ref], o, SM);
                rt.kern->free(rt.kctx, x);
                rt.kern->free(rt.kctx, o);
                weights_free(&w);
                dsmoe_moe_layer_free(L);
            }
            char what[96];
            snprintf(what, sizeof what, "inference out, %s, %d experts a rank", hier ? "hierarchical" : "flat", El);
            expect_close(what, out[0], out[1], (size_t)n * M, 1e-6);
            free(out[0]);
            free(out[1]);
            free(zeros);
            problem_free(&p);
        }
}

int main(int argc, char **argv) {
    if (moe_test_open(&argc, &argv) != 0) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ep_layout),
        cmocka_unit_test(test_ep_top2_rts_rsample),
        cmocka_unit_test(test_ep_top1_dropless_jitter),
        cmocka_unit_test(test_ep_top1_eval),
        cmocka_unit_test(test_ep_bf16_top2_rts_rsample),
        cmocka_unit_test(test_ep_bf16_top1_dropless_jitter),
        cmocka_unit_test(test_ep_scopes_differ),
        cmocka_unit_test(test_ep_inference_variable),
    };
    int failed = world_size < 2 ? (fprintf(stderr, "run on 2 or more ranks\n"), 1)
                                : cmocka_run_group_tests_name("moe layer, expert parallel", tests, NULL, NULL);
    moe_test_close();
    return failed;
}
