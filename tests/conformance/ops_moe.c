// tests/conformance/ops_moe.c: conformance checks of MoE gating (route, assign, the fused gate, backward;
// docs/gating.md),
// dispatch and combine with their backward, and the error paths: dtypes refused at once, and bad device
// data (a token, target, count or position out of range, a routing table with a bad entry or a slot
// held twice) surfacing as a sticky error.
// defines: cf_group_gating, cf_group_dispatch, cf_group_errors, cf_group_sticky
//
// The discrete outputs (choice, slot, kept, counts, the N and S of aux_sums) must be equal exactly;
// logits are spread (distinct levels at least 0.4 apart per row) so that no probability comparison is
// near a tie, or exactly tied where a case asks for ties. Ops downstream of gating take the REFERENCE's
// table (choice, slot, weight) as input on both sides, so each op is judged on its own.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "conformance.h"

static const char *dtn(dsmoe_dtype t) { return t == CF_BF16 ? "bf16" : "f32"; }

typedef struct gate_case {
    int S, E, K, noise, rts, training, C;
    uint64_t offset;
    int aux_zero; // gate_backward with S_tot = 0 (no load-balancing gradient)
    int ties;     // 1: exact ties in the logits; 2: sharp logits (spread_logits)
} gate_case;

static dsmoe_gating_params params(const gate_case *g) {
    return (dsmoe_gating_params){.S = g->S, .E = g->E, .K = g->K, .noise = g->noise, .random_selection = g->rts,
                                 .training = g->training, .seed = 0x5EED0000ull + (uint64_t)g->E * 131 + g->C,
                                 .token_offset = g->offset};
}

// Logits (S, E): per row a random permutation of E levels 0.6 apart, plus U(-0.1, 0.1). With `ties`,
// exact ties that the lowest index must win (docs/gating.md) on every plugin alike: equal logits give
// equal probabilities whatever the exp, so unlike near-ties they cannot differ between plugins. Every
// third row then has all E logits equal, and the next its two largest equal. With ties = 2 (sharp): the
// first choice is expert s % 2 and the second 2 + s % (E - 2), 20 apart (the second's probability about
// 2e-9), so that a small capacity drops most first choices and keeps the second ones: top-2's weight is
// then g / FLT_EPSILON, the clamped denominator of docs/gating.md, and its gradient the clamp's branch.
static float *spread_logits(int S, int E, int ties) {
    float *h = cf_host((size_t)S * E * sizeof *h + 1);
    int *perm = cf_host((size_t)E * sizeof *perm);
    for (int s = 0; s < S; s++) {
        for (int e = 0; e < E; e++)
            perm[e] = e;
        for (int e = E - 1; e > 0; e--) {
            int j = (int)(cf_rand_u64() % (uint64_t)(e + 1)), t = perm[e];
            perm[e] = perm[j], perm[j] = t;
        }
        for (int e = 0; e < E; e++)
            h[(size_t)s * E + perm[e]] = 0.6f * (e - E / 2) + 0.2f * cf_uniform() - 0.1f;
    }
    for (int s = 0; ties == 2 && s < S; s++) {
        float *row = h + (size_t)s * E;
        for (int e = 0; e < E; e++)
            row[e] = -40.0f + 0.2f * cf_uniform();
        row[s % 2] = 0.0f, row[2 + s % (E - 2)] = -20.0f + 0.2f * cf_uniform();
    }
    for (int s = 0; ties == 1 && s < S; s++) {
        float *row = h + (size_t)s * E;
        int top = 0, second = -1;
        for (int e = 1; e < E; e++)
            if (row[e] > row[top]) top = e;
        for (int e = 0; e < E; e++)
            if (e != top && (second < 0 || row[e] > row[second])) second = e;
        if (s % 3 == 0)
            for (int e = 0; e < E; e++) row[e] = 0.25f;
        else if (s % 3 == 1 && second >= 0)
            row[second] = row[top];
    }
    return h;
}

// The reference's route + assign of a case (run on the reference side only): host copies.
typedef struct table {
    float *probs, *weight;
    int32_t *choice, *slot, *kept;
    double *aux;
    int dropped;
} table;

static table ref_table(const gate_case *g) {
    int S = g->S, E = g->E, K = g->K, side = 1;
    cf_buf logits = cf_up("ref.logits", spread_logits(S, E, g->ties), (size_t)S * E, CF_F32);
    cf_buf probs = cf_out("ref.probs", (size_t)S * E, CF_F32), choice = cf_out("ref.choice", (size_t)S * K, DSMOE_INT32);
    cf_buf counts = cf_out("ref.counts", E, DSMOE_INT32), slot = cf_out("ref.slot", (size_t)S * K, DSMOE_INT32);
    cf_buf weight = cf_out("ref.weight", (size_t)S * K, CF_F32), kept = cf_out("ref.kept", E, DSMOE_INT32);
    cf_buf aux = cf_out("ref.aux_sums", 2 * (size_t)E + 1, DSMOE_FLOAT64);
    dsmoe_gating_params p = params(g);
    OP(gate_route, &p, P(logits), P(probs), P(choice), P(counts));
    OP(gate_assign, &p, g->C, P(probs), P(choice), P(slot), P(weight), P(kept), P(aux));
    table t = {cf_get(&probs, 1), cf_get(&weight, 1), cf_get_raw(&choice, 1, (size_t)S * K * 4),
               cf_get_raw(&slot, 1, (size_t)S * K * 4), cf_get_raw(&kept, 1, (size_t)E * 4),
               cf_get_raw(&aux, 1, (2 * (size_t)E + 1) * 8), 0};
    for (int i = 0; i < S * K; i++)
        t.dropped += t.slot[i] < 0;
    return t;
}

static void v_gate_route(const void *arg) {
    const gate_case *g = arg;
    int S = g->S, E = g->E, K = g->K;
    cf_buf logits = cf_up("logits", spread_logits(S, E, g->ties), (size_t)S * E, CF_F32);
    cf_buf probs = cf_out("probs", (size_t)S * E, CF_F32), choice = cf_out("choice", (size_t)S * K, DSMOE_INT32);
    cf_buf counts = cf_out("counts", E, DSMOE_INT32);
    probs.cols = E, choice.cols = K;
    CF_SIDES {
        dsmoe_gating_params p = params(g);
        OP(gate_route, &p, P(logits), P(probs), P(choice), P(counts));
        SCRIBBLE(p);
    }
    cf_cmp(&probs, NULL, NULL, TOL_EW);
    cf_cmp_i32(&choice, NULL);
    cf_cmp_i32(&counts, NULL);
}

static void v_gate_assign(const void *arg) {
    const gate_case *g = arg;
    int S = g->S, E = g->E, K = g->K;
    table t = ref_table(g);
    cf_buf probs = cf_up("probs", t.probs, (size_t)S * E, CF_F32), choice = cf_up_i32("choice", t.choice, (size_t)S * K);
    cf_buf slot = cf_out("slot", (size_t)S * K, DSMOE_INT32), weight = cf_out("weight", (size_t)S * K, CF_F32);
    cf_buf kept = cf_out("kept", E, DSMOE_INT32), aux = cf_out("aux_sums", 2 * (size_t)E + 1, DSMOE_FLOAT64);
    slot.cols = weight.cols = K;
    CF_SIDES {
        dsmoe_gating_params p = params(g);
        OP(gate_assign, &p, g->C, P(probs), P(choice), P(slot), P(weight), P(kept), P(aux));
        SCRIBBLE(p);
    }
    cf_note("%s: the reference dropped %d of %d choices", cf_check_name(), t.dropped, S * K);
    cf_cmp_i32(&slot, NULL);
    cf_cmp(&weight, NULL, NULL, TOL_EW);
    cf_cmp_i32(&kept, NULL);
    // P_e: identical float probabilities summed in double (only the order may differ); N_e and S: exact
    cf_cmp_f64(&aux, "aux_sums.P", 0, E, 1e-12, 0);
    cf_cmp_f64(&aux, "aux_sums.N,S", E, E + 1, 0, 0);
}

// Bytes of b on the candidate equal to those of c (the candidate's gate against its own route + assign).
static void same_bytes(const char *what, const cf_buf *b, const cf_buf *c, size_t bytes) {
    const unsigned char *x = cf_get_raw(b, 0, bytes), *y = cf_get_raw(c, 0, bytes);
    size_t i = 0;
    while (i < bytes && x[i] == y[i]) i++;
    if (i == bytes)
        cf_pass(what, "%zu bytes equal", bytes);
    else
        cf_fail(what, "byte %zu of %zu differs (0x%02x, route + assign 0x%02x)", i, bytes, x[i], y[i]);
}

// The fused member (optional): against the reference's gate, and bit for bit against the candidate's own
// route + assign on the same logits.
static void v_gate(const void *arg) {
    const gate_case *g = arg;
    if (!CF_HAS(0, gate)) cf_abandon_skip("the candidate has no gate (optional: the core composes route + assign)");
    int S = g->S, E = g->E, K = g->K;
    size_t SE = (size_t)S * E, SK = (size_t)S * K, A = 2 * (size_t)E + 1;
    cf_buf logits = cf_up("logits", spread_logits(S, E, g->ties), SE, CF_F32);
    cf_buf probs = cf_out("probs", SE, CF_F32), choice = cf_out("choice", SK, DSMOE_INT32);
    cf_buf counts = cf_out("counts", E, DSMOE_INT32), slot = cf_out("slot", SK, DSMOE_INT32);
    cf_buf weight = cf_out("weight", SK, CF_F32), kept = cf_out("kept", E, DSMOE_INT32);
    cf_buf aux = cf_out("aux_sums", A, DSMOE_FLOAT64);
    probs.cols = E, choice.cols = slot.cols = weight.cols = K;
    CF_SIDES {
        dsmoe_gating_params p = params(g);
        OP(gate, &p, g->C, P(logits), P(probs), P(choice), P(counts), P(slot), P(weight), P(kept), P(aux));
        SCRIBBLE(p);
    }
    cf_note("%s: the fused op against the reference's", cf_check_name());
    cf_cmp(&probs, NULL, NULL, TOL_EW);
    cf_cmp_i32(&choice, NULL);
    cf_cmp_i32(&counts, NULL);
    cf_cmp_i32(&slot, NULL);
    cf_cmp(&weight, NULL, NULL, TOL_EW);
    cf_cmp_i32(&kept, NULL);
    // The P sums add the candidate's own probabilities (a GPU's expf differs from glibc's in the last bit:
    // up to 3e-8 relative on an H200), so they hold to the probabilities' relative rounding, not 1e-12
    // (gate_assign's sums, from the reference's probabilities, are held to that).
    cf_cmp_f64(&aux, "aux_sums.P", 0, E, 1e-6, 0);
    cf_cmp_f64(&aux, "aux_sums.N,S", E, E + 1, 0, 0);

    cf_buf probs2 = cf_out("probs (route)", SE, CF_F32), choice2 = cf_out("choice (route)", SK, DSMOE_INT32);
    cf_buf counts2 = cf_out("counts (route)", E, DSMOE_INT32), slot2 = cf_out("slot (assign)", SK, DSMOE_INT32);
    cf_buf weight2 = cf_out("weight (assign)", SK, CF_F32), kept2 = cf_out("kept (assign)", E, DSMOE_INT32);
    cf_buf aux2 = cf_out("aux_sums (assign)", A, DSMOE_FLOAT64);
    {
        int side = 0;
        dsmoe_gating_params p = params(g);
        OP(gate_route, &p, P(logits), P(probs2), P(choice2), P(counts2));
        OP(gate_assign, &p, g->C, P(probs2), P(choice2), P(slot2), P(weight2), P(kept2), P(aux2));
    }
    same_bytes("probs = route's", &probs, &probs2, SE * 4);
    same_bytes("choice = route's", &choice, &choice2, SK * 4);
    same_bytes("counts = route's", &counts, &counts2, (size_t)E * 4);
    same_bytes("slot = assign's", &slot, &slot2, SK * 4);
    same_bytes("weight = assign's", &weight, &weight2, SK * 4);
    same_bytes("kept = assign's", &kept, &kept2, (size_t)E * 4);
    same_bytes("aux_sums = assign's", &aux, &aux2, A * 8);
}

static void v_gate_backward(const void *arg) {
    const gate_case *g = arg;
    int S = g->S, E = g->E, K = g->K;
    table t = ref_table(g);
    for (int e = 0; e < E; e++) // as if reduced over two ranks
        t.aux[E + e] *= 2;
    t.aux[2 * E] = g->aux_zero ? 0 : 2.0 * S;
    cf_buf probs = cf_up("probs", t.probs, (size_t)S * E, CF_F32), choice = cf_up_i32("choice", t.choice, (size_t)S * K);
    cf_buf slot = cf_up_i32("slot", t.slot, (size_t)S * K), aux = cf_up_f64("aux_sums", t.aux, 2 * (size_t)E + 1);
    cf_buf dweight = cf_up("dweight", cf_rand((size_t)S * K, 1), (size_t)S * K, CF_F32);
    cf_buf dl = cf_up("dlogits", cf_rand((size_t)S * E, 0.1f), (size_t)S * E, CF_F32);
    dl.cols = E;
    CF_SIDES {
        dsmoe_gating_params p = params(g);
        OP(gate_backward, &p, P(dl), P(probs), P(choice), P(slot), P(dweight), P(aux), 0.3f);
        SCRIBBLE(p);
    }
    cf_cmp(&dl, dl.h, NULL, TOL_RED);
}

void cf_group_gating(void) {
    static const gate_case cases[] = {
        {67, 8, 1, DSMOE_NOISE_NONE, 0, 0, 6, 1000, 0, 0},      {67, 8, 1, DSMOE_NOISE_RSAMPLE, 1, 1, 7, 1000, 0, 0},
        {67, 8, 2, DSMOE_NOISE_NONE, 1, 1, 12, 1000, 0, 0},     {67, 8, 2, DSMOE_NOISE_RSAMPLE, 0, 1, 12, 1000, 0, 0},
        {64, 6, 2, DSMOE_NOISE_RSAMPLE, 1, 0, 15, 77, 0, 0},    {64, 8, 2, DSMOE_NOISE_RSAMPLE, 1, 1, 64, 5, 0, 0},
        {200, 16, 1, DSMOE_NOISE_RSAMPLE, 1, 1, 10, 1ull << 40, 0, 0}, {20, 4, 2, DSMOE_NOISE_NONE, 0, 1, 0, 3, 0, 0},
        {67, 8, 2, DSMOE_NOISE_NONE, 0, 1, 12, 1000, 1, 0},
        // Exact ties in the logits: the lowest index wins, top-1 and top-2.
        {67, 8, 1, DSMOE_NOISE_NONE, 0, 1, 12, 1000, 0, 1}, {67, 8, 2, DSMOE_NOISE_NONE, 1, 1, 12, 1000, 0, 1},
        // Top-2 tokens whose first choice is dropped and whose second, kept, has a probability below
        // FLT_EPSILON: the clamped denominator, forward and backward.
        {67, 8, 2, DSMOE_NOISE_NONE, 0, 1, 4, 1000, 0, 2},
        // Sizes that take a device kernel past one block in every phase: a partial last chunk of tokens,
        // several passes over the expert columns, over-full experts under RTS; more token chunks than a
        // GPU's co-resident blocks; more experts than blocks; and no tokens at all.
        {5000, 130, 2, DSMOE_NOISE_RSAMPLE, 1, 1, 40, 1ull << 33, 0, 0},
        {150001, 8, 1, DSMOE_NOISE_NONE, 0, 1, 15000, 9, 0, 0},
        {700, 600, 2, DSMOE_NOISE_NONE, 1, 1, 2, 0, 0, 0},
        {0, 8, 2, DSMOE_NOISE_NONE, 0, 1, 4, 0, 0, 0},
    };
    static const char *noise[] = {"NONE", "JITTER", "RSAMPLE"};
    char name[200];
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const gate_case *g = &cases[i];
        char what[160];
        snprintf(what, sizeof what, "S=%d,E=%d,K=%d,%s,rts=%d,training=%d,C=%d,offset=%llu%s%s", g->S, g->E, g->K,
                 noise[g->noise], g->rts, g->training, g->C, (unsigned long long)g->offset,
                 g->aux_zero ? ",S_tot=0" : "", g->ties == 1 ? ",ties" : g->ties == 2 ? ",sharp" : "");
        if (!g->aux_zero) {
            snprintf(name, sizeof name, "gate_route[%s]", what);
            cf_run(name, v_gate_route, g);
            snprintf(name, sizeof name, "gate_assign[%s]", what);
            cf_run(name, v_gate_assign, g);
            snprintf(name, sizeof name, "gate[%s]", what);
            cf_run(name, v_gate, g);
        }
        snprintf(name, sizeof name, "gate_backward[%s,daux=0.3]", what);
        cf_run(name, v_gate_backward, g);
    }
}

// ---------------------------------------------------------------------------------------------------
// dispatch and combine through the reference's table

typedef struct mix_case {
    gate_case g;
    int M;
    dsmoe_dtype dt;
} mix_case;

// Rows of (E, C, M) that a kept choice owns: mask (E*C*M) and a (E*C) row flag.
static unsigned char *kept_rows(const table *t, const gate_case *g, int M) {
    unsigned char *mask = cf_host((size_t)g->E * g->C * M + 1);
    for (int i = 0; i < g->S * g->K; i++)
        if (t->slot[i] >= 0) memset(mask + ((size_t)t->choice[i] * g->C + t->slot[i]) * M, 1, M);
    return mask;
}

// (E, C, M) values: random in the kept rows, NaN in the others (an op must not read them).
static float *ecm(const unsigned char *mask, size_t n) {
    float *h = cf_rand(n, 1);
    for (size_t i = 0; i < n; i++)
        if (!mask[i]) h[i] = NAN;
    return h;
}

#define TABLE_BUFS                                                                                              \
    const gate_case *g = &X->g;                                                                                 \
    int S = g->S, E = g->E, K = g->K, C = g->C, M = X->M;                                                       \
    size_t necm = (size_t)E * C * M, nsm = (size_t)S * M;                                                       \
    table t = ref_table(g);                                                                                     \
    unsigned char *mask = kept_rows(&t, g, M);                                                                  \
    cf_buf choice = cf_up_i32("choice", t.choice, (size_t)S * K), slot = cf_up_i32("slot", t.slot, (size_t)S * K); \
    (void)necm, (void)nsm, (void)mask

static void v_dispatch(const void *arg) {
    const mix_case *X = arg;
    TABLE_BUFS;
    cf_buf x = cf_up("x", cf_rand(nsm, 1), nsm, X->dt), buf = cf_out("buf", necm, X->dt);
    buf.cols = M;
    CF_SIDES OP(moe_dispatch, P(buf), P(x), DT(X->dt), P(choice), P(slot), S, K, E, C, M);
    cf_cmp(&buf, NULL, mask, (cf_tol){0, 0}); // copies; rows of unused slots are unspecified
}

static void v_dispatch_backward(const void *arg) {
    const mix_case *X = arg;
    TABLE_BUFS;
    cf_buf dbuf = cf_up("dbuf", ecm(mask, necm), necm, X->dt), dx = cf_up("dx", cf_rand(nsm, 1), nsm, X->dt);
    dx.cols = M;
    CF_SIDES OP(moe_dispatch_backward, P(dx), P(dbuf), DT(X->dt), P(choice), P(slot), S, K, E, C, M);
    cf_cmp(&dx, dx.h, NULL, cf_tol_for(X->dt, TOL_EW));
}

static void v_combine(const void *arg) {
    const mix_case *X = arg;
    TABLE_BUFS;
    cf_buf y = cf_up("y", ecm(mask, necm), necm, X->dt), w = cf_up("weight", t.weight, (size_t)S * K, CF_F32);
    cf_buf out = cf_out("out", nsm, X->dt);
    out.cols = M;
    CF_SIDES OP(moe_combine, P(out), P(y), DT(X->dt), P(choice), P(slot), P(w), S, K, E, C, M);
    cf_cmp(&out, NULL, NULL, cf_tol_for(X->dt, TOL_EW)); // every row, tokens dropped everywhere too (0)
}

static void v_combine_backward(const void *arg) {
    const mix_case *X = arg;
    TABLE_BUFS;
    cf_buf y = cf_up("y", ecm(mask, necm), necm, X->dt), w = cf_up("weight", t.weight, (size_t)S * K, CF_F32);
    cf_buf dout = cf_up("dout", cf_rand(nsm, 1), nsm, X->dt);
    cf_buf dy = cf_out("dy", necm, X->dt), dw = cf_out("dweight", (size_t)S * K, CF_F32);
    dy.cols = M, dw.cols = K;
    CF_SIDES OP(moe_combine_backward, P(dy), P(dw), P(dout), P(y), DT(X->dt), P(choice), P(slot), P(w), S, K, E, C, M);
    cf_cmp(&dy, NULL, mask, cf_tol_for(X->dt, TOL_EW)); // rows of unused slots are unspecified
    cf_cmp(&dw, NULL, NULL, X->dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED);
}

void cf_group_dispatch(void) {
    static mix_case cases[2][2] = {
        {{{67, 8, 2, DSMOE_NOISE_NONE, 0, 1, 10, 0, 0, 0}, 96, CF_F32},
         {{50, 4, 1, DSMOE_NOISE_NONE, 1, 1, 11, 9, 0, 0}, 130, CF_F32}},
        {{{67, 8, 2, DSMOE_NOISE_NONE, 0, 1, 10, 0, 0, 0}, 96, CF_BF16},
         {{50, 4, 1, DSMOE_NOISE_NONE, 1, 1, 11, 9, 0, 0}, 130, CF_BF16}},
    };
    char name[160];
    for (int d = 0; d < (cf_cand_dtype(CF_BF16) ? 2 : 1); d++)
        for (int i = 0; i < 2; i++) {
            const mix_case *X = &cases[d][i];
            char what[100];
            snprintf(what, sizeof what, "%s,S=%d,E=%d,K=%d,C=%d,M=%d", dtn(X->dt), X->g.S, X->g.E, X->g.K, X->g.C, X->M);
            snprintf(name, sizeof name, "moe_dispatch[%s]", what);
            cf_run(name, v_dispatch, X);
            snprintf(name, sizeof name, "moe_dispatch_backward[%s]", what);
            cf_run(name, v_dispatch_backward, X);
            snprintf(name, sizeof name, "moe_combine[%s]", what);
            cf_run(name, v_combine, X);
            snprintf(name, sizeof name, "moe_combine_backward[%s]", what);
            cf_run(name, v_combine_backward, X);
        }
}

// ---------------------------------------------------------------------------------------------------
// errors found while enqueuing: a dtype the plugin does not declare is refused at once (UNSUPPORTED),
// and the context stays usable

static void v_unsupported(const void *arg) {
    dsmoe_dtype bad = *(const dsmoe_dtype *)arg;
    cf_buf a = cf_zeros("a", 64, CF_F32), b = cf_zeros("b", 64, CF_F32);
    for (int side = 0; side < 2; side++) {
        cf_side *Sd = &cf_sides[side];
        if (side == 1 && (Sd->T->dtypes & DSMOE_DTYPE_BIT(bad))) continue;
        dsmoe_attention_shape sh = {1, 4, 8, 2, bad};
        for (int i = 0; i < 4; i++) {
            static const char *ops[] = {"gemm", "gelu_forward", "bias_add", "attention_forward"};
            dsmoe_status st;
            switch (i) {
            case 0: st = Sd->T->gemm(Sd->c, Sd->q, 0, 0, 4, 4, 4, 1, P(a), bad, 4, P(b), bad, 4, 0, P(a), bad, 4); break;
            case 1: st = Sd->T->gelu_forward(Sd->c, Sd->q, P(a), P(b), bad, 16); break;
            case 2: st = Sd->T->bias_add(Sd->c, Sd->q, P(a), bad, P(b), 4, 4); break;
            default: st = Sd->T->attention_forward(Sd->c, Sd->q, P(a), P(b), P(a), &sh); break;
            }
            char what[96];
            snprintf(what, sizeof what, "%s(%s)", ops[i], Sd->role);
            if (st == DSMOE_ERR_UNSUPPORTED)
                cf_pass(what, "refused at once: '%s': %s", dsmoe_status_name(st), Sd->T->last_error(Sd->c));
            else
                cf_fail(what, "with dtype %s returned '%s', expected 'unsupported' at once", dsmoe_dtype_name(bad),
                        dsmoe_status_name(st));
        }
    }
    // not sticky: the context still works (and the refused calls wrote nothing that matters here)
    size_t n = 1000;
    cf_buf y = cf_up("after.y", cf_rand(n, 1), n, CF_F32), x = cf_up("after.x", cf_rand(n, 1), n, CF_F32);
    CF_SIDES OP(axpy, P(y), 2.0f, P(x), CF_F32, n);
    cf_cmp(&y, y.h, NULL, TOL_EW);
}

void cf_group_errors(void) {
    static dsmoe_dtype bads[3];
    int n = 0;
    if (!cf_cand_dtype(DSMOE_FLOAT16)) bads[n++] = DSMOE_FLOAT16;
    if (!cf_cand_dtype(CF_BF16)) bads[n++] = CF_BF16;
    if (!(cf_sides[0].T->dtypes & DSMOE_DTYPE_BIT(DSMOE_INT64))) bads[n++] = DSMOE_INT64;
    char name[96];
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "errors[unsupported_dtype=%s]", dsmoe_dtype_name(bads[i]));
        cf_run(name, v_unsupported, &bads[i]);
    }
}

// ---------------------------------------------------------------------------------------------------
// sticky errors: bad device data found while running, in a fresh context per check

typedef struct sticky_case {
    const char *what;
    int kind; // 0 embedding token = V, 1 token = -1, 2 crossentropy target = V, 3 grouped count > m_max, 4 kv pos,
              // 5.. routing tables (route_tables)
} sticky_case;

// Routing tables (S = 4, K = 1, E = 2, C = 2, M = 8) for kinds 5.., each with one bad entry.
enum { RT_S = 4, RT_E = 2, RT_C = 2, RT_M = 8 };
static const int32_t route_tables[4][2][RT_S] = {
    {{0, 1, 0, 1}, {0, 0, 0, 1}}, // 5 dispatch: tokens 0 and 2 both hold slot 0 of expert 0
    {{0, 1, 1, 0}, {1, 0, 0, 0}}, // 6 combine_backward: tokens 1 and 2 both hold slot 0 of expert 1
    {{0, 1, 2, 1}, {0, 0, 1, 1}}, // 7 combine: expert 2 = E
    {{0, 1, 0, 1}, {0, 0, 2, 1}}, // 8 dispatch_backward: slot 2 = C
};

static dsmoe_status bad_call(int side, int kind, cf_buf *bufs) {
    cf_side *Sd = &cf_sides[side];
    const dsmoe_kernel_plugin_v3 *T = Sd->T;
    switch (kind) {
    case 0:
    case 1: return T->embedding_forward(Sd->c, Sd->q, P(bufs[0]), CF_F32, P(bufs[1]), P(bufs[2]), CF_F32, P(bufs[3]),
                                        NULL, 1, 4, 8, 10, 4);
    case 2: return T->crossentropy_forward(Sd->c, Sd->q, P(bufs[0]), P(bufs[2]), P(bufs[3]), CF_F32, P(bufs[1]), 4, 10);
    case 3: {
        dsmoe_grouped_gemm d = {.groups = 2, .counts = P(bufs[1]), .m_max = 4, .n = 8, .k = 8, .alpha = 1,
                                .a = P(bufs[2]), .a_type = CF_F32, .lda = 8, .a_stride = 32,
                                .b = P(bufs[3]), .b_type = CF_F32, .ldb = 8, .b_stride = 0, .b_groups = 1,
                                .c = P(bufs[0]), .c_type = CF_F32, .ldc = 8, .c_stride = 32};
        return T->gemm_grouped(Sd->c, Sd->q, &d);
    }
    case 4: return T->kv_append(Sd->c, Sd->q, P(bufs[0]), P(bufs[2]), P(bufs[3]), CF_F32, P(bufs[1]), 1, 4, 8, 2, 10);
    // routing: choice bufs[1], slot bufs[4], weight bufs[3], dweight bufs[5]
    case 5: return T->moe_dispatch(Sd->c, Sd->q, P(bufs[0]), P(bufs[2]), CF_F32, P(bufs[1]), P(bufs[4]), RT_S, 1, RT_E,
                                   RT_C, RT_M);
    case 6: return T->moe_combine_backward(Sd->c, Sd->q, P(bufs[0]), P(bufs[5]), P(bufs[2]), P(bufs[3]), CF_F32,
                                           P(bufs[1]), P(bufs[4]), P(bufs[3]), RT_S, 1, RT_E, RT_C, RT_M);
    case 7: return T->moe_combine(Sd->c, Sd->q, P(bufs[0]), P(bufs[2]), CF_F32, P(bufs[1]), P(bufs[4]), P(bufs[3]),
                                  RT_S, 1, RT_E, RT_C, RT_M);
    default: return T->moe_dispatch_backward(Sd->c, Sd->q, P(bufs[0]), P(bufs[2]), CF_F32, P(bufs[1]), P(bufs[4]), RT_S,
                                             1, RT_E, RT_C, RT_M);
    }
}

static void v_sticky(const void *arg) {
    const sticky_case *K = arg;
    if (K->kind == 4 && !(CF_HAS(0, kv_append) && CF_HAS(1, kv_append)))
        cf_abandon_skip("no inference members");
    cf_close_both(); // fresh contexts: nothing else has run on them
    if (cf_open_both() != 0) cf_abort("cannot make fresh contexts");
    int32_t tok[4] = {1, 2, 3, 4}, cnt[2] = {4, 5};
    if (K->kind == 0 || K->kind == 2) tok[2] = 10; // == V
    if (K->kind == 1) tok[2] = -1;
    if (K->kind == 4) tok[0] = 7;                  // pos + T_new = 11 > T_max = 10
    cf_buf bufs[6];
    bufs[0] = cf_zeros("out", 256, CF_F32);
    if (K->kind >= 5) {
        bufs[1] = cf_up_i32("choice", route_tables[K->kind - 5][0], RT_S);
        bufs[4] = cf_up_i32("slot", route_tables[K->kind - 5][1], RT_S);
        bufs[5] = cf_zeros("dweight", RT_S, CF_F32);
    } else {
        bufs[1] = K->kind == 3 ? cf_up_i32("counts", cnt, 2) : cf_up_i32("tokens", tok, 4);
    }
    bufs[2] = cf_up("in1", cf_rand(256, 1), 256, CF_F32);
    bufs[3] = cf_up("in2", cf_rand(256, 1), 256, CF_F32);
    CF_SIDES { // everything so far is valid: the context is healthy
        dsmoe_status st = cf_sides[side].T->synchronize(cf_sides[side].c);
        if (st != DSMOE_OK) cf_abort("%s: synchronize before the bad call: '%s'", cf_sides[side].role, dsmoe_status_name(st));
    }
    for (int side = 0; side < 2; side++) {
        cf_side *Sd = &cf_sides[side];
        const dsmoe_kernel_plugin_v3 *T = Sd->T;
        char what[64];
        snprintf(what, sizeof what, "%s", Sd->role);
        dsmoe_status s_call = bad_call(side, K->kind, bufs);
        dsmoe_status s_rec = T->event_record(Sd->c, Sd->ev, Sd->q);
        dsmoe_status s_sync = T->event_synchronize(Sd->c, Sd->ev);
        const char *msg = T->last_error(Sd->c);
        char msg_copy[512];
        snprintf(msg_copy, sizeof msg_copy, "%s", msg ? msg : "(NULL)");
        // ... and the context keeps refusing
        int done = 0;
        dsmoe_status s_all = T->synchronize(Sd->c), s_q = T->queue_synchronize(Sd->c, Sd->q);
        dsmoe_status s_query = T->event_query(Sd->c, Sd->ev, &done);
        dsmoe_status s_op = T->axpy(Sd->c, Sd->q, P(bufs[2]), 1.0f, P(bufs[3]), CF_F32, 16);
        dsmoe_status s_sync2 = T->event_synchronize(Sd->c, Sd->ev);
        int ok = s_sync != DSMOE_OK && s_all != DSMOE_OK && s_q != DSMOE_OK && s_query != DSMOE_OK &&
                 s_op != DSMOE_OK && s_sync2 != DSMOE_OK && msg && msg_copy[0];
        if (ok)
            cf_pass(what, "call '%s', event_record '%s', event_synchronize '%s' (\"%s\"); then synchronize, "
                    "queue_synchronize, event_query, axpy, event_synchronize all refuse ('%s')",
                    dsmoe_status_name(s_call), dsmoe_status_name(s_rec), dsmoe_status_name(s_sync), msg_copy,
                    dsmoe_status_name(s_op));
        else
            cf_fail(what, "expected a sticky error: call '%s', event_record '%s', event_synchronize '%s', last_error "
                    "\"%s\"; after it: synchronize '%s', queue_synchronize '%s', event_query '%s', axpy '%s', "
                    "event_synchronize '%s' (all must refuse)", dsmoe_status_name(s_call), dsmoe_status_name(s_rec),
                    dsmoe_status_name(s_sync), msg_copy, dsmoe_status_name(s_all), dsmoe_status_name(s_q),
                    dsmoe_status_name(s_query), dsmoe_status_name(s_op), dsmoe_status_name(s_sync2));
    }
    // Another context of the same plugin is independent: it works while the sticky one is alive (the
    // reference is left alone: its context is sticky too).
    cf_side *X = &cf_sides[0];
    dsmoe_kernel_ctx *broken = X->c;
    dsmoe_kernel_event *broken_ev = X->ev;
    X->c = NULL;
    char err[1024];
    if (cf_open(X, err, sizeof err) != DSMOE_OK) {
        X->c = broken, X->ev = broken_ev, X->q = X->T->default_queue(broken);
        cf_abort("a second candidate context beside the broken one: init failed: %s", err);
    }
    cf_forget_buffers(0); // they belong to the broken context
    enum { N = 1000 };
    float *hy = cf_rand(N, 1), *hx = cf_rand(N, 1), *got = cf_host(N * sizeof(float));
    void *dy = NULL, *dx = NULL;
    dsmoe_status st = X->T->alloc(X->c, N * 4, 0, &dy);
    if (st == DSMOE_OK) st = X->T->alloc(X->c, N * 4, 0, &dx);
    if (st == DSMOE_OK) st = X->T->copy_to_device(X->c, X->q, dy, hy, N * 4);
    if (st == DSMOE_OK) st = X->T->copy_to_device(X->c, X->q, dx, hx, N * 4);
    if (st == DSMOE_OK) st = X->T->axpy(X->c, X->q, dy, 0.5f, dx, CF_F32, N);
    if (st == DSMOE_OK) st = X->T->copy_to_host(X->c, X->q, got, dy, N * 4);
    if (st == DSMOE_OK) st = X->T->event_record(X->c, X->ev, X->q);
    if (st == DSMOE_OK) st = X->T->event_synchronize(X->c, X->ev);
    if (st != DSMOE_OK) {
        cf_fail("other_context", "a fresh candidate context beside the sticky one failed: '%s': %s",
                dsmoe_status_name(st), X->T->last_error(X->c));
    } else {
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < N; i++) {
            float want = hy[i] + 0.5f * hx[i];
            if (!(fabsf(got[i] - want) <= 1e-6f * (1 + fabsf(want))) && bad++ == 0) first = i;
        }
        if (bad)
            cf_fail("other_context", "axpy in a fresh context: first mismatch at i=%zu got %.9g want %.9g", first,
                    got[first], hy[first] + 0.5f * hx[first]);
        else
            cf_pass("other_context", "a fresh context works beside the sticky one (axpy, n=%d)", N);
    }
    X->T->free(X->c, dy);
    X->T->free(X->c, dx);
    // finalize the sticky context: must neither crash nor hang
    if (broken_ev) X->T->event_destroy(broken, broken_ev);
    X->T->finalize(broken);
    cf_close_both(); // the reference's context is sticky: closed, no health check of it after this check
}

void cf_group_sticky(void) {
    static const sticky_case cases[] = {
        {"embedding_forward,token=V", 0},  {"embedding_forward,token=-1", 1}, {"crossentropy_forward,target=V", 2},
        {"gemm_grouped,count>m_max", 3},   {"kv_append,pos+T_new>T_max", 4},
        {"moe_dispatch,slot_held_twice", 5}, {"moe_combine_backward,slot_held_twice", 6},
        {"moe_combine,expert=E", 7},       {"moe_dispatch_backward,slot=C", 8},
    };
    char name[96];
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(name, sizeof name, "sticky[%s]", cases[i].what);
        cf_run(name, v_sticky, &cases[i]);
    }
}
