// tests/model/test_gating.c: MoE gating of the cpu plugin (plugins/cpu/cpu_gating.c), and the argument
// and table checks of gating, dispatch and combine, through the plugin's table: the built plugin is
// dlopen'ed as the core loads it (cpu_plugin_test.h), and every call below moves its host arrays in and
// out with the copy members (gating_calls.h). Expected values come from hand computation (small cases
// written out below), from an independent naive implementation of docs/gating.md (ref_assign), from
// dsmoe_rng_* evaluated here, and from central finite differences. Dispatch and combine against naive
// loops, and 1 against 2 compute threads: tests/model/test_dispatch_combine.c.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/rng.h"
#include "cpu_plugin_test.h" // P, cpt_load, cpt_ctx, dev_*, OKC
#include "gating_calls.h"    // run_gate_*, run_dispatch*, run_combine*, params, fill_uniform

// The key tags docs/gating.md fixes (written again here, not taken from the plugin).
#define TAG_GUMBEL 0x47554D42ull
#define TAG_RTS 0x525453ull

static dsmoe_kernel_ctx *g_ctx; // the plugin's context, 1 compute thread

// (cpu_plugin_test.h's C names it too, but C is the capacity in the cases below.)
static dsmoe_kernel_ctx *ctx1(void) { return g_ctx; }

typedef struct gate_out {
    float probs[64 * 8];
    int32_t choice[64 * 2], slot[64 * 2], counts[8], kept[8], first[8];
    float weight[64 * 2];
    double psum[8];
    double aux_sums[2 * 8 + 1]; // as gate_assign wrote them: [psum, first, S]
    float aux; // l_aux of these tokens alone, formed here from psum and first as the layer does
} gate_out;

// l_aux = E * sum_e (P_e / S) * (N_e / S) from gate_assign's sums (docs/gating.md, section 3).
static float aux_of(const dsmoe_gating_params *p, const double *psum, const int32_t *first) {
    double a = 0;
    for (int e = 0; e < p->E && p->S > 0; e++) a += (psum[e] / p->S) * ((double)first[e] / p->S);
    return (float)(p->E * a);
}

static void route_assign(const dsmoe_gating_params *p, int C, const float *logits, gate_out *o) {
    dsmoe_kernel_ctx *ctx = ctx1();
    OKC(ctx, run_gate_route(ctx, p, logits, o->probs, o->choice, o->counts));
    OKC(ctx, run_gate_assign(ctx, p, C, o->probs, o->choice, o->slot, o->weight, o->kept, o->aux_sums));
    for (int e = 0; e < p->E; e++) {
        o->psum[e] = o->aux_sums[e];
        o->first[e] = (int32_t)o->aux_sums[p->E + e];
        assert_true(o->first[e] == o->aux_sums[p->E + e]); // a count
    }
    assert_true(o->aux_sums[2 * p->E] == p->S);
    o->aux = aux_of(p, o->psum, o->first);
}

static void assert_ints(const int32_t *got, const int32_t *want, int n, const char *what) {
    for (int i = 0; i < n; i++)
        if (got[i] != want[i]) fail_msg("%s[%d] = %d, expected %d", what, i, got[i], want[i]);
}

static void assert_floats(const float *got, const double *want, int n, double tol, const char *what) {
    for (int i = 0; i < n; i++)
        if (fabs(got[i] - want[i]) > tol) fail_msg("%s[%d] = %.9g, expected %.9g", what, i, got[i], want[i]);
}

// Softmax in double, for expected probabilities.
static void softmax_d(const float *l, int E, double *out) {
    double mx = l[0], sum = 0;
    for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
    for (int e = 0; e < E; e++) sum += out[e] = exp(l[e] - mx);
    for (int e = 0; e < E; e++) out[e] /= sum;
}

// ------------------------------------------------------------------------------------------------
// hand-computed cases

// Top-1, S=6, E=2. A = (ln 3, 0) -> probs (3/4, 1/4) chooses 0; B = (0, ln 3) chooses 1.
// Tokens A A B A B B: expert 0 gets tokens 0, 1, 3 and expert 1 gets 2, 4, 5.
static void fill_ab(float *logits, const char *pattern) {
    for (int s = 0; pattern[s]; s++) {
        logits[2 * s] = pattern[s] == 'A' ? logf(3.0f) : 0.0f;
        logits[2 * s + 1] = pattern[s] == 'A' ? 0.0f : logf(3.0f);
    }
}

static void test_top1_capacity_token_order(void **state) {
    (void)state;
    float logits[12];
    fill_ab(logits, "AABABB");
    dsmoe_gating_params p = params(6, 2, 1);
    gate_out o;

    route_assign(&p, 2, logits, &o); // C = 2: the third token of each expert overflows
    assert_ints(o.choice, (int32_t[]){0, 0, 1, 0, 1, 1}, 6, "choice");
    assert_ints(o.counts, (int32_t[]){3, 3}, 2, "counts");
    assert_ints(o.slot, (int32_t[]){0, 1, 0, -1, 1, -1}, 6, "slot");
    assert_ints(o.kept, (int32_t[]){2, 2}, 2, "kept");
    assert_floats(o.weight, (double[]){0.75, 0.75, 0.75, 0, 0.75, 0}, 6, 1e-6, "weight"); // not renormalised
    assert_floats(o.probs, (double[]){0.75, 0.25, 0.75, 0.25, 0.25, 0.75}, 6, 1e-6, "probs");
    // P = (3*3/4 + 3*1/4, the same) = (3, 3), N = (3, 3): l_aux = 2 * (3/6 * 3/6 * 2) = 1.
    assert_ints(o.first, (int32_t[]){3, 3}, 2, "first");
    assert_true(fabs(o.psum[0] - 3.0) < 1e-6 && fabs(o.psum[1] - 3.0) < 1e-6);
    assert_floats(&o.aux, (double[]){1.0}, 1, 1e-6, "aux");

    // Capacity above the counts (min capacity): nothing dropped, slots still in token order.
    route_assign(&p, 4, logits, &o);
    assert_ints(o.slot, (int32_t[]){0, 1, 0, 2, 1, 2}, 6, "slot C=4");
    assert_ints(o.kept, (int32_t[]){3, 3}, 2, "kept C=4");
    // Dropless: C = max count = 3 keeps everything.
    route_assign(&p, 3, logits, &o);
    assert_ints(o.slot, (int32_t[]){0, 1, 0, 2, 1, 2}, 6, "slot dropless");
    assert_floats(o.weight, (double[]){0.75, 0.75, 0.75, 0.75, 0.75, 0.75}, 6, 1e-6, "weight dropless");
    // C = 0 drops everything; l_aux does not see capacity.
    route_assign(&p, 0, logits, &o);
    assert_ints(o.slot, (int32_t[]){-1, -1, -1, -1, -1, -1}, 6, "slot C=0");
    assert_ints(o.kept, (int32_t[]){0, 0}, 2, "kept C=0");
    assert_floats(o.weight, (double[]){0, 0, 0, 0, 0, 0}, 6, 0, "weight C=0");
    assert_ints(o.first, (int32_t[]){3, 3}, 2, "first C=0"); // counted before capacity drops
    assert_floats(&o.aux, (double[]){1.0}, 1, 1e-6, "aux C=0");
}

static void test_aux_loss_hand(void **state) {
    (void)state;
    gate_out o;
    // A A A B: me = (2.5/4, 1.5/4), ce = (3/4, 1/4): l_aux = 2 * (0.625*0.75 + 0.375*0.25) = 1.125.
    float l1[8];
    fill_ab(l1, "AAAB");
    dsmoe_gating_params p = params(4, 2, 1);
    route_assign(&p, 1, l1, &o);
    assert_ints(o.first, (int32_t[]){3, 1}, 2, "first AAAB");
    assert_true(fabs(o.psum[0] - 2.5) < 1e-6 && fabs(o.psum[1] - 1.5) < 1e-6);
    assert_floats(&o.aux, (double[]){1.125}, 1, 1e-6, "aux AAAB");
    assert_ints(o.slot, (int32_t[]){0, -1, -1, 0}, 4, "slot AAAB C=1");

    // E = 3: (0,0,0) -> 1/3 each, chooses 0 (tie); (ln2,0,0) -> (1/2,1/4,1/4) chooses 0;
    // (0,0,ln2) -> (1/4,1/4,1/2) chooses 2. me = (13/36, 10/36, 13/36), ce = (2/3, 0, 1/3):
    // l_aux = 3 * (13/36 * 2/3 + 13/36 * 1/3) = 13/12.
    float l2[9] = {0, 0, 0, logf(2.0f), 0, 0, 0, 0, logf(2.0f)};
    p = params(3, 3, 1);
    route_assign(&p, 3, l2, &o);
    assert_ints(o.choice, (int32_t[]){0, 0, 2}, 3, "choice E=3");
    assert_ints(o.counts, (int32_t[]){2, 0, 1}, 3, "counts E=3");
    assert_ints(o.first, (int32_t[]){2, 0, 1}, 3, "first E=3");
    // P = (13/12, 10/12, 13/12) (the means times S = 3).
    assert_true(fabs(o.psum[0] - 13.0 / 12) < 1e-6 && fabs(o.psum[1] - 10.0 / 12) < 1e-6 &&
                fabs(o.psum[2] - 13.0 / 12) < 1e-6);
    assert_floats(&o.aux, (double[]){13.0 / 12.0}, 1, 1e-6, "aux E=3");
}

static void test_ties_lowest_index(void **state) {
    (void)state;
    float logits[4 * 4] = {0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 5, 5, 5, 5};
    gate_out o;
    dsmoe_gating_params p = params(4, 4, 1);
    route_assign(&p, 4, logits, &o);
    assert_ints(o.choice, (int32_t[]){0, 2, 0, 0}, 4, "top-1 ties");
    p = params(4, 4, 2);
    route_assign(&p, 8, logits, &o);
    assert_ints(o.choice, (int32_t[]){0, 1, 2, 3, 0, 2, 0, 1}, 8, "top-2 ties");
    assert_ints(o.counts, (int32_t[]){3, 2, 2, 1}, 4, "counts ties");
    assert_floats(o.weight, (double[]){0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5}, 8, 1e-6, "weight ties");
}

// Top-2, S=5, E=3, C=2. (first, second) choices: t0 (0,1), t1 (1,0), t2 (0,1), t3 (0,2), t4 (0,1).
// Level 0 first: expert 0 keeps t0 -> 0, t2 -> 1 and drops t3, t4; expert 1 keeps t1 -> 0.
// Level 1 after ALL of level 0: expert 1 has one slot left: t0 -> 1 (after t1, although t0 < t1),
// t2 and t4 dropped; expert 0 is full: t1 dropped; expert 2: t3 -> 0.
static void test_top2_queueing_and_renormalisation(void **state) {
    (void)state;
    float logits[5 * 3] = {2, 1, 0, 1, 2, 0, 3, 1.5f, 0, 2, 0, 1, 2, 1, 0};
    gate_out o;
    dsmoe_gating_params p = params(5, 3, 2);
    route_assign(&p, 2, logits, &o);
    assert_ints(o.choice, (int32_t[]){0, 1, 1, 0, 0, 1, 0, 2, 0, 1}, 10, "choice");
    assert_ints(o.counts, (int32_t[]){5, 4, 1}, 3, "counts");
    assert_ints(o.first, (int32_t[]){4, 1, 0}, 3, "first"); // level 0 only, unlike counts
    assert_ints(o.slot, (int32_t[]){0, 1, 0, -1, 1, -1, -1, 0, -1, -1}, 10, "slot");
    assert_ints(o.kept, (int32_t[]){2, 2, 1}, 3, "kept");
    // t0 keeps both: p0/p1 = e, so w = (1/(1+e^-1), e^-1/(1+e^-1)). t1, t2 lose the second choice
    // and keep g1/(g1+0) = 1; t3 loses the first and keeps 1 for the second; t4 loses both: 0, 0.
    double a = 1.0 / (1.0 + exp(-1.0));
    assert_floats(o.weight, (double[]){a, 1 - a, 1, 0, 1, 0, 0, 1, 0, 0}, 10, 1e-6, "weight");
    // l_aux = E * sum_e mean(probs[:,e]) * mean(first == e), ce = (4/5, 1/5, 0).
    double me[3] = {0, 0, 0}, g[3];
    for (int s = 0; s < 5; s++) {
        softmax_d(logits + 3 * s, 3, g);
        for (int e = 0; e < 3; e++) me[e] += g[e] / 5;
    }
    double aux = 3 * (me[0] * 0.8 + me[1] * 0.2);
    assert_floats(&o.aux, &aux, 1, 1e-6, "aux");

    // Dropless, C = max count = 5: level-1 slots start after every level-0 token of the expert.
    route_assign(&p, 5, logits, &o);
    assert_ints(o.slot, (int32_t[]){0, 1, 0, 4, 1, 2, 2, 0, 3, 3}, 10, "slot dropless");
    assert_ints(o.kept, (int32_t[]){5, 4, 1}, 3, "kept dropless");
    for (int s = 0; s < 5; s++) assert_true(fabsf(o.weight[2 * s] + o.weight[2 * s + 1] - 1.0f) < 1e-6f);

    // The denominator is clamped at FLT_EPSILON (DeepSpeed: clamp(min=finfo.eps)). E = 3, C = 1:
    // t0 (2,0,1) keeps 0 then 2; t1 (0,-20,-30) loses 0 (full) and keeps 1, whose probability
    // g = e^-20 / (1 + e^-20 + e^-30) is below FLT_EPSILON: its weight is g / FLT_EPSILON, not 1.
    float tiny[2 * 3] = {2, 0, 1, 0, -20, -30};
    p = params(2, 3, 2);
    route_assign(&p, 1, tiny, &o);
    assert_ints(o.choice, (int32_t[]){0, 2, 0, 1}, 4, "choice tiny");
    assert_ints(o.slot, (int32_t[]){0, 0, -1, 0}, 4, "slot tiny");
    double gt = exp(-20.0) / (1 + exp(-20.0) + exp(-30.0));
    assert_floats(o.weight, (double[]){a, 1 - a, 0, gt / FLT_EPSILON}, 4, 1e-6, "weight tiny");
}

// ------------------------------------------------------------------------------------------------
// naive reference of assign (docs/gating.md), for RTS and random cross-checks

static void ref_assign(const dsmoe_gating_params *p, int C, const float *probs, const int32_t *choice,
                       int32_t *slot, float *weight, int32_t *kept, double *psum, int32_t *first, double *aux) {
    const int S = p->S, E = p->E, K = p->K;
    int used[64] = {0};
    for (int k = 0; k < K; k++) {
        uint64_t key = dsmoe_rng_key(p->seed, TAG_RTS, (uint64_t)k, 0);
        for (int e = 0; e < E; e++) {
            int room = C - used[e];
            char taken[4096] = {0};
            if (!p->random_selection) { // the first `room` tokens in token order
                for (int s = 0, n = 0; s < S; s++)
                    if (choice[s * K + k] == e) taken[s] = n++ < room;
            } else { // `room` times: the untaken token of largest priority, lowest index on ties
                for (int r = 0; r < room; r++) {
                    int best = -1;
                    float bu = -1;
                    for (int s = 0; s < S; s++) {
                        if (choice[s * K + k] != e || taken[s]) continue;
                        float u = dsmoe_rng_uniform(key, p->token_offset + (uint64_t)s);
                        if (u > bu) best = s, bu = u;
                    }
                    if (best >= 0) taken[best] = 1;
                }
            }
            for (int s = 0; s < S; s++)
                if (choice[s * K + k] == e) slot[s * K + k] = taken[s] ? used[e]++ : -1;
        }
    }
    for (int e = 0; e < E; e++) kept[e] = used[e];
    for (int s = 0; s < S; s++) {
        float g[2];
        for (int k = 0; k < K; k++) g[k] = slot[s * K + k] >= 0 ? probs[s * E + choice[s * K + k]] : 0.0f;
        float den = K == 1 ? 1.0f : fmaxf(g[0] + g[1], FLT_EPSILON);
        for (int k = 0; k < K; k++) weight[s * K + k] = g[k] / den;
    }
    *aux = 0;
    for (int e = 0; e < E; e++) {
        double me = 0, ce = 0;
        for (int s = 0; s < S; s++) me += probs[s * E + e], ce += choice[s * K] == e;
        psum[e] = me;
        first[e] = (int32_t)ce;
        *aux += E * (me / S) * (ce / S);
    }
}

static void assert_matches_ref(const dsmoe_gating_params *p, int C, const gate_out *o) {
    int32_t slot[128], kept[8], first[8];
    float weight[128];
    double aux, w[128], psum[8];
    ref_assign(p, C, o->probs, o->choice, slot, weight, kept, psum, first, &aux);
    assert_ints(o->slot, slot, p->S * p->K, "slot vs reference");
    assert_ints(o->kept, kept, p->E, "kept vs reference");
    assert_ints(o->first, first, p->E, "first vs reference");
    for (int e = 0; e < p->E; e++)
        if (fabs(o->psum[e] - psum[e]) > 1e-9 * p->S) fail_msg("psum[%d] = %.12g, expected %.12g", e, o->psum[e], psum[e]);
    for (int i = 0; i < p->S * p->K; i++) w[i] = weight[i];
    assert_floats(o->weight, w, p->S * p->K, 1e-6, "weight vs reference");
    assert_floats(&o->aux, &aux, 1, 1e-5, "aux vs reference");
}

// RTS, top-1: 12 tokens choose expert 0 and 4 choose expert 1, C = 3. The kept set of each expert
// is the 3 tokens of largest dsmoe_rng_uniform(key_rts(0), offset + s), computed here by hand;
// slots go in token order among the kept.
static void test_rts_top1(void **state) {
    (void)state;
    const int S = 16, C = 3;
    float logits[16 * 2];
    for (int s = 0; s < S; s++) logits[2 * s] = s % 4 == 3 ? 0.0f : 1.0f, logits[2 * s + 1] = s % 4 == 3 ? 1.0f : 0.0f;
    int differs = 0;
    for (uint64_t seed = 1; seed <= 20; seed++) {
        dsmoe_gating_params p = params(S, 2, 1);
        p.random_selection = 1;
        p.seed = seed;
        p.token_offset = 1000 + seed;
        gate_out o;
        route_assign(&p, C, logits, &o);
        uint64_t key = dsmoe_rng_key(seed, TAG_RTS, 0, 0);
        for (int e = 0; e < 2; e++) {
            // rank of each token of e by priority (number of tokens of e that beat it)
            int n_slot = 0;
            for (int s = 0; s < S; s++) {
                if (o.choice[s] != e) continue;
                float us = dsmoe_rng_uniform(key, p.token_offset + s);
                int beaten_by = 0;
                for (int t = 0; t < S; t++) {
                    if (o.choice[t] != e || t == s) continue;
                    float ut = dsmoe_rng_uniform(key, p.token_offset + t);
                    beaten_by += ut > us || (ut == us && t < s);
                }
                int want = beaten_by < C ? n_slot++ : -1;
                if (o.slot[s] != want) fail_msg("seed %d token %d: slot %d, expected %d", (int)seed, s, o.slot[s], want);
                if (want >= 0) assert_true(o.weight[s] == o.probs[2 * s + e]);
                else assert_true(o.weight[s] == 0.0f);
            }
            assert_int_equal(n_slot, C);
        }
        assert_ints(o.kept, (int32_t[]){3, 3}, 2, "kept");
        // Position order would keep the first three tokens of expert 0: 0, 1, 2.
        differs += o.slot[0] < 0 || o.slot[1] < 0 || o.slot[2] < 0;
        assert_matches_ref(&p, C, &o);
        p.random_selection = 0;
        route_assign(&p, C, logits, &o);
        assert_ints(o.slot, (int32_t[]){0, 1, 2, 0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, -1}, S, "position order");
    }
    assert_true(differs > 0);
}

// RTS and position order, top-1 and top-2, random logits, several capacities: against ref_assign.
static void test_assign_against_reference(void **state) {
    (void)state;
    float logits[48 * 5];
    for (int trial = 0; trial < 24; trial++) {
        dsmoe_gating_params p = params(48, 5, 1 + trial % 2);
        p.random_selection = (trial / 2) % 2;
        p.seed = 77 + trial;
        p.token_offset = 48 * trial;
        fill_uniform(logits, 48 * 5, 500 + trial, -2, 2);
        int C = (int[]){0, 3, 7, 12, 20, 48}[trial / 4];
        gate_out o;
        route_assign(&p, C, logits, &o);
        assert_matches_ref(&p, C, &o);
    }
}

// ------------------------------------------------------------------------------------------------
// noise

static int argmax_excl(const double *v, int E, int skip) {
    int b = -1;
    for (int e = 0; e < E; e++)
        if (e != skip && (b < 0 || v[e] > v[b])) b = e;
    return b;
}

static void test_rsample(void **state) {
    (void)state;
    const int S = 64, E = 4;
    float logits[64 * 4];
    fill_uniform(logits, (size_t)S * E, 9, -0.5f, 0.5f);
    for (int K = 1; K <= 2; K++) {
        gate_out clean, noisy, evalo;
        dsmoe_gating_params p = params(S, E, K);
        p.token_offset = 4096;
        route_assign(&p, S, logits, &clean);
        p.noise = DSMOE_NOISE_RSAMPLE;
        p.training = 0;
        route_assign(&p, S, logits, &evalo);
        assert_ints(evalo.choice, clean.choice, S * K, "rsample, not training");
        p.training = 1;
        route_assign(&p, S, logits, &noisy);
        assert_memory_equal(noisy.probs, clean.probs, sizeof(float) * S * E); // probs never see noise
        int changed = 0;
        uint64_t key = dsmoe_rng_key(p.seed, TAG_GUMBEL, (uint64_t)(K - 1), 0);
        for (int s = 0; s < S; s++) {
            double g[4], z[4];
            softmax_d(logits + s * E, E, g);
            for (int e = 0; e < E; e++)
                z[e] = logits[s * E + e] + dsmoe_rng_gumbel(key, (p.token_offset + s) * E + e);
            if (K == 1) { // the choice itself is sampled
                assert_int_equal(noisy.choice[s], argmax_excl(z, E, -1));
                changed += noisy.choice[s] != clean.choice[s];
            } else { // first = argmax probs, second sampled among the others
                int first = argmax_excl(g, E, -1);
                assert_int_equal(noisy.choice[2 * s], first);
                assert_int_equal(clean.choice[2 * s + 1], argmax_excl(g, E, first));
                assert_int_equal(noisy.choice[2 * s + 1], argmax_excl(z, E, first));
                changed += noisy.choice[2 * s + 1] != clean.choice[2 * s + 1];
            }
        }
        assert_true(changed > 0);
    }
}

// ------------------------------------------------------------------------------------------------
// gate_backward against central finite differences

// L = sum r[s,k] weight[s,k] + sum_{s,e} c[e] probs[s,e] with the choices of `choice` held fixed.
static double gate_loss(const dsmoe_gating_params *p, int C, const float *logits, const int32_t *choice,
                        const float *r, const float *c) {
    gate_out o;
    route_assign(p, C, logits, &o);
    for (int i = 0; i < p->S * p->K; i++)
        if (o.choice[i] != choice[i]) fail_msg("a finite-difference step flipped choice %d: pick other logits", i);
    double L = 0;
    for (int e = 0; e < p->E; e++) L += (double)c[e] * o.psum[e];
    for (int i = 0; i < p->S * p->K; i++) L += (double)r[i] * o.weight[i];
    return L;
}

// aux = 1: the coefficients are those of a * l_aux (the layer's, c_e = a * E * N_e / S^2: gate_assign's
// aux_sums with daux = a); else an arbitrary vector of both signs, passed as aux_sums that give it
// (N_e = c_e / E, S_tot = 1, daux = 1). The plugin forms c from aux_sums by the header's formula; the
// reference uses the same formula on the same numbers.
static void check_gate_backward(int K, int C, int all_kinds, int aux) {
    const int S = 8, E = 4;
    dsmoe_gating_params p = params(S, E, K);
    // Logits with gaps of at least 0.3 between sorted entries, so that steps of h cannot flip choices.
    float logits[8 * 4], r[8 * 2], c[4];
    for (int s = 0; s < S; s++)
        for (int e = 0; e < E; e++) logits[s * E + e] = 0.45f * (float)((s * 7 + e * 3 + (s % 3) * e) % 5) - 0.8f + 0.05f * e;
    fill_uniform(r, (size_t)S * K, 31 + K, -1, 1);
    const float a = 0.7f;
    gate_out o;
    route_assign(&p, C, logits, &o);
    double sums[2 * 4 + 1];
    float daux = aux ? a : 1.0f;
    if (aux) {
        memcpy(sums, o.aux_sums, sizeof sums);
    } else {
        fill_uniform(c, E, 41 + K, -2, 2);
        for (int e = 0; e < E; e++) sums[e] = 0.0, sums[E + e] = (double)c[e] / E;
        sums[2 * E] = 1.0;
    }
    for (int e = 0; e < E; e++) c[e] = (float)((double)daux * E * sums[E + e] / (sums[2 * E] * sums[2 * E]));
    int first_only = 0, second_only = 0, both = 0;
    for (int s = 0; s < S && K == 2; s++) {
        first_only += o.slot[2 * s] >= 0 && o.slot[2 * s + 1] < 0;
        second_only += o.slot[2 * s] < 0 && o.slot[2 * s + 1] >= 0;
        both += o.slot[2 * s] >= 0 && o.slot[2 * s + 1] >= 0;
    }
    if (all_kinds) assert_true(first_only > 0 && second_only > 0 && both > 0); // every top-2 weight formula
    int dropped = 0;
    for (int i = 0; i < S * K; i++) dropped += o.slot[i] < 0;
    assert_true(dropped > 0);

    float dl[8 * 4];
    for (int i = 0; i < S * E; i++) dl[i] = 0.25f; // backward accumulates
    OKC(ctx1(), run_gate_backward(ctx1(), &p, dl, o.probs, o.choice, o.slot, r, sums, daux));
    const float h = 1e-2f;
    for (int i = 0; i < S * E; i++) {
        float keep = logits[i];
        logits[i] = keep + h;
        double lp = gate_loss(&p, C, logits, o.choice, r, c);
        logits[i] = keep - h;
        double lm = gate_loss(&p, C, logits, o.choice, r, c);
        logits[i] = keep;
        double fd = (lp - lm) / (2.0 * h), an = dl[i] - 0.25;
        if (fabs(fd - an) > 1e-3) fail_msg("K=%d dlogits[%d] (s %d, e %d) = %.6g, finite difference %.6g", K, i, i / E, i % E, an, fd);
    }
    if (aux) { // the same coefficients are the gradient of a * l_aux (N held fixed): FD of l_aux itself
        for (int i = 0; i < S * E; i++) dl[i] = 0.0f;
        const float zero[16] = {0};
        OKC(ctx1(), run_gate_backward(ctx1(), &p, dl, o.probs, o.choice, o.slot, zero, sums, daux));
        for (int i = 0; i < S * E; i++) {
            float keep = logits[i];
            gate_out op, om;
            logits[i] = keep + h, route_assign(&p, C, logits, &op);
            logits[i] = keep - h, route_assign(&p, C, logits, &om);
            logits[i] = keep;
            double fd = a * ((double)op.aux - om.aux) / (2.0 * h);
            if (fabs(fd - dl[i]) > 1e-3) fail_msg("K=%d d(a l_aux)/dlogits[%d] = %.6g, finite difference %.6g", K, i, dl[i], fd);
        }
    }
}

static void test_gate_backward_fd(void **state) {
    (void)state;
    check_gate_backward(1, 1, 0, 1);
    check_gate_backward(1, 2, 0, 0);
    check_gate_backward(2, 2, 1, 1);
    check_gate_backward(2, 3, 0, 0);
}

// ------------------------------------------------------------------------------------------------
// argument checks

static void expect_invalid(dsmoe_kernel_ctx *ctx, dsmoe_status st, const char *needle) {
    assert_int_equal(st, DSMOE_ERR_INVALID);
    const char *msg = P->last_error(ctx);
    if (strstr(msg, needle) == NULL) fail_msg("message \"%s\" lacks \"%s\"", msg, needle);
}

// A bad table is bad data found while running: the context's sticky error, so each on a context of
// its own, and the next synchronize reports it too.
static void expect_sticky_table(const int32_t *choice, const int32_t *slot, const char *needle) {
    dsmoe_kernel_ctx *c = cpt_ctx(1);
    float buf[8], x[4] = {0};
    expect_invalid(c, run_dispatch(c, buf, x, choice, slot, 2, 2, 2, 2, 2), needle);
    assert_int_equal(P->synchronize(c), DSMOE_ERR_INVALID);
    expect_invalid(c, P->synchronize(c), needle);
    P->finalize(c);
}

static void test_invalid_arguments(void **state) {
    (void)state;
    dsmoe_kernel_ctx *ctx = ctx1();
    float logits[8] = {0}, probs[8], weight[4], buf[64], x[8];
    int32_t choice[4] = {0, 1, 1, 0}, slot[4] = {0, 0, 1, 1}, counts[4], kept[4];
    double sums[2 * 3 + 1];
    dsmoe_gating_params p = params(2, 2, 3);
    expect_invalid(ctx, run_gate_route(ctx, &p, logits, probs, choice, counts), "K = 3");
    p = params(2, 1, 2);
    expect_invalid(ctx, run_gate_route(ctx, &p, logits, probs, choice, counts), "exceeds E = 1");
    p = params(-1, 2, 1);
    expect_invalid(ctx, run_gate_route(ctx, &p, logits, probs, choice, counts), "S = -1");
    p = params(2, 2, 2);
    expect_invalid(ctx, run_gate_assign(ctx, &p, -1, probs, choice, slot, weight, kept, sums), "C = -1");
    expect_invalid(ctx, run_gate_assign(ctx, &p, 2, probs, choice, slot, weight, kept, NULL), "aux_sums is NULL");
    expect_invalid(ctx, run_gate_assign(ctx, &p, 2, probs, choice, slot, weight, NULL, sums), "kept is NULL");
    expect_invalid(ctx, run_gate_backward(ctx, NULL, logits, probs, choice, slot, weight, sums, 1.0f), "params are NULL");
    expect_invalid(ctx, run_gate_backward(ctx, &p, logits, probs, choice, slot, weight, NULL, 1.0f), "aux_sums is NULL");
    expect_invalid(ctx, run_combine(ctx, x, buf, choice, slot, weight, 2, 2, 2, -1, 2), "C = -1");
    OKC(ctx, P->synchronize(ctx)); // bad calls are refused at once, not sticky
    // Tables out of range, or with a slot held twice.
    expect_sticky_table(choice, (int32_t[]){0, 0, 2, 1}, "slot[2]");
    expect_sticky_table((int32_t[]){0, 2, 1, 0}, slot, "choice[1]");
    expect_sticky_table(choice, (int32_t[]){0, 0, 0, 1}, "both hold slot 0");
    OKC(ctx, run_dispatch(ctx, buf, x, choice, slot, 2, 2, 2, 2, 2));
    // No tokens is valid: counts and sums zero (assigned over whatever the buffers held).
    p = params(0, 3, 2);
    OKC(ctx, run_gate_route(ctx, &p, NULL, NULL, NULL, counts));
    assert_ints(counts, (int32_t[]){0, 0, 0}, 3, "counts S=0");
    OKC(ctx, run_gate_assign(ctx, &p, 4, NULL, NULL, NULL, NULL, kept, sums));
    for (int i = 0; i < 7; i++) assert_true(sums[i] == 0.0); // P, N and S
    OKC(ctx, run_gate_backward(ctx, &p, NULL, NULL, NULL, NULL, NULL, sums, 1.0f));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_top1_capacity_token_order),
        cmocka_unit_test(test_aux_loss_hand),
        cmocka_unit_test(test_ties_lowest_index),
        cmocka_unit_test(test_top2_queueing_and_renormalisation),
        cmocka_unit_test(test_rts_top1),
        cmocka_unit_test(test_assign_against_reference),
        cmocka_unit_test(test_rsample),
        cmocka_unit_test(test_gate_backward_fd),
        cmocka_unit_test(test_invalid_arguments),
    };
    if (cpt_load(1) != 0) {
        fprintf(stderr, "test_gating: cannot load or initialise the cpu plugin %s\n", CPT_PLUGIN_FILE);
        return 1;
    }
    g_ctx = C;
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    cpt_unload();
    return rc;
}
