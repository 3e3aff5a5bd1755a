// tests/conformance/ops_layers.c: conformance checks of the GPT layer ops: embedding, layer norm, GELU,
// causal attention (with attention_bytes), cross-entropy, the residual-MoE mix, and the inference group
// (KV cache append, cached attention against a full attention on the prefix, sampling).
// defines: cf_group_layers, cf_group_attention, cf_group_loss_mix, cf_group_inference
//
// Backward checks take their saved statistics (layer-norm mean and rstd, softmax probabilities, mix
// coefficients) from the host, the same on both sides, so that a backward is judged on its own.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "conformance.h"

static const char *dtn(dsmoe_dtype t) { return t == CF_BF16 ? "bf16" : "f32"; }
static int n_dtypes(void) { return cf_cand_dtype(CF_BF16) ? 2 : 1; }
static const dsmoe_dtype DTS[2] = {CF_F32, CF_BF16};

// The candidate's determinism (DSMOE_KCAP_DETERMINISTIC): two identical calls give the same bits.
static void same_bits(const char *what, const cf_buf *a, const cf_buf *b) {
    size_t bytes = a->n * dsmoe_dtype_size(a->dt);
    const unsigned char *x = cf_get_raw(a, 0, bytes), *y = cf_get_raw(b, 0, bytes);
    for (size_t i = 0; i < bytes; i++)
        if (x[i] != y[i]) {
            cf_fail(what, "DSMOE_KCAP_DETERMINISTIC: a second identical call differs at element %zu",
                    i / dsmoe_dtype_size(a->dt));
            return;
        }
    cf_pass(what, "bitwise equal over two identical calls (n=%zu)", a->n);
}
static int deterministic(void) { return (cf_sides[0].T->caps & DSMOE_KCAP_DETERMINISTIC) != 0; }

// ---------------------------------------------------------------------------------------------------
// embedding

typedef struct emb_case {
    int B, T, M, V;
    dsmoe_dtype dt;
} emb_case;

// Tokens with many repeats (a third of them the same id) and both ends of the vocabulary.
static int32_t *tokens(int n, int V) {
    int32_t *t = cf_randint(n, 0, V - 1);
    for (int i = 0; i < n; i += 3)
        t[i] = 5 % V;
    t[1] = 0, t[n - 1] = V - 1;
    return t;
}

// Each sequence from its own position (pos), and the table wte in float32 and, for bfloat16 activations,
// in bfloat16 too (generation's tied embedding).
static void v_embedding_forward(const void *arg) {
    const emb_case *E = arg;
    int rows = E->B * E->T, n_pos = E->T + 5;
    int32_t *pos_h = cf_randint(E->B, 0, n_pos - E->T);
    cf_buf tok = cf_up_i32("tokens", tokens(rows, E->V), rows), pos = cf_up_i32("pos", pos_h, E->B);
    cf_buf wpe = cf_up("wpe", cf_rand((size_t)n_pos * E->M, 1), (size_t)n_pos * E->M, CF_F32);
    for (int k = 0; k < (E->dt == CF_F32 ? 1 : 2); k++) {
        dsmoe_dtype wdt = k ? E->dt : CF_F32;
        cf_buf wte = cf_up(k ? "wte (dt)" : "wte", cf_rand((size_t)E->V * E->M, 1), (size_t)E->V * E->M, wdt);
        cf_buf out = cf_out("out", (size_t)rows * E->M, E->dt);
        out.cols = E->M;
        CF_SIDES OP(embedding_forward, P(out), DT(E->dt), P(tok), P(wte), DT(wdt), P(wpe), P(pos), E->B, E->T, E->M,
                    E->V, n_pos);
        cf_cmp(&out, NULL, NULL, cf_tol_for(E->dt, TOL_EW));
    }
}

static void v_embedding_backward(const void *arg) {
    const emb_case *E = arg;
    int rows = E->B * E->T;
    size_t nte = (size_t)E->V * E->M, npe = (size_t)E->T * E->M;
    cf_buf tok = cf_up_i32("tokens", tokens(rows, E->V), rows);
    cf_buf dout = cf_up("dout", cf_rand((size_t)rows * E->M, 1), (size_t)rows * E->M, E->dt);
    cf_buf dwte = cf_up("dwte", cf_rand(nte, 1), nte, CF_F32), dwpe = cf_up("dwpe", cf_rand(npe, 1), npe, CF_F32);
    cf_buf dwte2 = cf_up("dwte(2nd)", dwte.h, nte, CF_F32), dwpe2 = cf_up("dwpe(2nd)", dwpe.h, npe, CF_F32);
    dwte.cols = dwpe.cols = E->M;
    CF_SIDES OP(embedding_backward, P(dwte), P(dwpe), P(dout), DT(E->dt), P(tok), E->B, E->T, E->M, E->V);
    cf_tol tol = E->dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED;
    cf_cmp(&dwte, dwte.h, NULL, tol);
    cf_cmp(&dwpe, dwpe.h, NULL, tol);
    if (deterministic()) {
        int side = 0;
        OP(embedding_backward, P(dwte2), P(dwpe2), P(dout), DT(E->dt), P(tok), E->B, E->T, E->M, E->V);
        same_bits("dwte(determinism)", &dwte, &dwte2);
        same_bits("dwpe(determinism)", &dwpe, &dwpe2);
    }
}

// ---------------------------------------------------------------------------------------------------
// layer norm

typedef struct ln_case {
    int S, M;
    float eps, offset, scale; // inputs offset + scale * U(-1, 1)
    dsmoe_dtype dt;
} ln_case;

static float *ln_input(const ln_case *L) {
    float *h = cf_rand((size_t)L->S * L->M, L->scale);
    for (size_t i = 0; i < (size_t)L->S * L->M; i++)
        h[i] += L->offset;
    cf_round_dt(h, (size_t)L->S * L->M, L->dt);
    return h;
}

static void v_layernorm_forward(const void *arg) {
    const ln_case *L = arg;
    cf_buf in = cf_up("in", ln_input(L), (size_t)L->S * L->M, L->dt);
    float *hw = cf_rand(L->M, 0.5f);
    for (int j = 0; j < L->M; j++)
        hw[j] += 1.0f;
    cf_buf w = cf_up("weight", hw, L->M, CF_F32), b = cf_up("bias", cf_rand(L->M, 0.5f), L->M, CF_F32);
    cf_buf out = cf_out("out", (size_t)L->S * L->M, L->dt), mean = cf_out("mean", L->S, CF_F32);
    cf_buf rstd = cf_out("rstd", L->S, CF_F32);
    out.cols = L->M;
    CF_SIDES OP(layernorm_forward, P(out), P(mean), P(rstd), P(in), DT(L->dt), P(w), P(b), L->S, L->M, L->eps);
    cf_cmp(&out, NULL, NULL, cf_tol_for(L->dt, TOL_RED));
    cf_cmp(&mean, NULL, NULL, L->dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED);
    cf_cmp(&rstd, NULL, NULL, L->dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED);
}

static void v_layernorm_backward(const void *arg) {
    const ln_case *L = arg;
    size_t n = (size_t)L->S * L->M;
    float *hin = ln_input(L), *hm = cf_host(L->S * 4), *hr = cf_host(L->S * 4);
    for (int s = 0; s < L->S; s++) { // the statistics as the forward gives them (two passes in double)
        double sum = 0, var = 0;
        for (int j = 0; j < L->M; j++)
            sum += hin[(size_t)s * L->M + j];
        double mu = sum / L->M;
        for (int j = 0; j < L->M; j++)
            var += (hin[(size_t)s * L->M + j] - mu) * (hin[(size_t)s * L->M + j] - mu);
        hm[s] = (float)mu, hr[s] = (float)(1.0 / sqrt(var / L->M + L->eps));
    }
    cf_buf in = cf_up("in", hin, n, L->dt), dout = cf_up("dout", cf_rand(n, 1), n, L->dt);
    cf_buf w = cf_up("weight", cf_rand(L->M, 1.5f), L->M, CF_F32);
    cf_buf mean = cf_up("mean", hm, L->S, CF_F32), rstd = cf_up("rstd", hr, L->S, CF_F32);
    cf_buf din = cf_up("din", cf_rand(n, 1), n, L->dt);
    cf_buf dw = cf_up("dweight", cf_rand(L->M, 1), L->M, CF_F32), db = cf_up("dbias", cf_rand(L->M, 1), L->M, CF_F32);
    din.cols = L->M;
    CF_SIDES OP(layernorm_backward, P(din), P(dw), P(db), P(dout), P(in), DT(L->dt), P(w), P(mean), P(rstd), L->S,
                L->M);
    cf_cmp(&din, din.h, NULL, cf_tol_for(L->dt, TOL_RED));
    cf_cmp(&dw, dw.h, NULL, L->dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED);
    cf_cmp(&db, db.h, NULL, L->dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED);
}

// ---------------------------------------------------------------------------------------------------
// GELU (tanh approximation)

static float *gelu_input(size_t n, dsmoe_dtype dt) {
    static const float planted[] = {0.0f, -0.0f, 1e-20f, -1e-20f, 10.0f, -10.0f, 20.0f, -20.0f, 3.0f, -3.0f,
                                    0.5f, -0.5f, 4.5f, -4.5f, 1e-3f, -1e-3f};
    float *h = cf_rand(n, 4);
    memcpy(h, planted, sizeof planted);
    cf_round_dt(h, n, dt);
    return h;
}

static void v_gelu_forward(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    size_t n = 10007;
    cf_buf in = cf_up("in", gelu_input(n, dt), n, dt), out = cf_out("out", n, dt);
    CF_SIDES OP(gelu_forward, P(out), P(in), DT(dt), n);
    cf_cmp(&out, NULL, NULL, cf_tol_for(dt, TOL_EW));
}

static void v_gelu_backward(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    size_t n = 10007;
    cf_buf in = cf_up("in", gelu_input(n, dt), n, dt), dout = cf_up("dout", cf_rand(n, 1), n, dt);
    cf_buf din = cf_up("din", cf_rand(n, 1), n, dt);
    CF_SIDES OP(gelu_backward, P(din), P(in), P(dout), DT(dt), n);
    cf_cmp(&din, din.h, NULL, cf_tol_for(dt, TOL_EW));
}

void cf_group_layers(void) {
    char name[160];
    for (int d = 0; d < n_dtypes(); d++) {
        dsmoe_dtype dt = DTS[d];
        static emb_case ec[2][2] = {{{3, 17, 96, 13, CF_F32}, {2, 64, 768, 300, CF_F32}},
                                    {{3, 17, 96, 13, CF_BF16}, {2, 64, 768, 300, CF_BF16}}};
        for (int i = 0; i < 2; i++) {
            const emb_case *E = &ec[d][i];
            snprintf(name, sizeof name, "embedding_forward[%s,B=%d,T=%d,M=%d,V=%d]", dtn(dt), E->B, E->T, E->M, E->V);
            cf_run(name, v_embedding_forward, E);
            snprintf(name, sizeof name, "embedding_backward[%s,B=%d,T=%d,M=%d,V=%d,repeated_tokens]", dtn(dt), E->B,
                     E->T, E->M, E->V);
            cf_run(name, v_embedding_backward, E);
        }
        static ln_case lc[2][3] = {{{37, 96, 1e-5f, 0, 1, CF_F32}, {5, 1031, 1e-5f, 0, 1, CF_F32},
                                    {16, 256, 1e-5f, 1.0f, 0.01f, CF_F32}},
                                   {{37, 96, 1e-5f, 0, 1, CF_BF16}, {5, 1031, 1e-5f, 0, 1, CF_BF16}, {0}}};
        for (int i = 0; i < (d ? 2 : 3); i++) {
            const ln_case *L = &lc[d][i];
            char what[64];
            snprintf(what, sizeof what, "S=%d,M=%d,eps=%g%s", L->S, L->M, L->eps,
                     L->offset != 0 ? ",offset_mean=1,spread=0.01" : "");
            snprintf(name, sizeof name, "layernorm_forward[%s,%s]", dtn(dt), what);
            cf_run(name, v_layernorm_forward, L);
            snprintf(name, sizeof name, "layernorm_backward[%s,%s]", dtn(dt), what);
            cf_run(name, v_layernorm_backward, L);
        }
        snprintf(name, sizeof name, "gelu_forward[%s,n=10007]", dtn(dt));
        cf_run(name, v_gelu_forward, &DTS[d]);
        snprintf(name, sizeof name, "gelu_backward[%s,n=10007]", dtn(dt));
        cf_run(name, v_gelu_backward, &DTS[d]);
    }
}

// ---------------------------------------------------------------------------------------------------
// attention

typedef struct att_case {
    int B, T, M, NH;
    dsmoe_dtype dt;
} att_case;

// attention_backward chains four GEMMs through the softmax backward, dpre = a * (da - rowsum(a * da)),
// a difference of nearly equal numbers where the probabilities peak, so a flash-style kernel (which
// recomputes the probabilities from row statistics, in another order) and the cpu plugin's BLAS calls
// round differently there. Measured: the cpu plugin's own float32 error against float64 math, in this
// metric (afrac = rtol / 10), is 0.6e-6 .. 1.3e-6 for the first three shapes below (forward 1e-6 .. 1.7e-6),
// so a second correct float32 implementation stays below ~3e-6; 2e-4 (2x the GEMMs') keeps a 50x margin
// and still catches a 0.1% error in a term (the 1e-3 a GEMM-heavy backward is sometimes given would
// not). bfloat16: every GEMM operand of the backward (p, dp, ds) may be rounded to bfloat16 on the way.
#define TOL_ATT_BWD ((cf_tol){2e-4, 2e-5})
#define TOL_ATT_BWD_BF16 ((cf_tol){3e-2, 2e-2})

static void sizes(const dsmoe_attention_shape *sh, size_t saved[2], size_t ws[2]) {
    CF_SIDES {
        dsmoe_attention_shape s = *sh;
        s.dt = DT(sh->dt);
        cf_op(side, "attention_bytes",
              cf_sides[side].T->attention_bytes(cf_sides[side].c, &s, &saved[side], &ws[side]));
    }
}

static void v_attention_forward(const void *arg) {
    const att_case *A = arg;
    dsmoe_attention_shape sh = {A->B, A->T, A->M, A->NH, A->dt};
    size_t saved[2], ws[2], s0 = 0, w0 = 0;
    sizes(&sh, saved, ws);
    // callable before init: with ctx NULL, the same numbers
    dsmoe_status st = cf_sides[0].T->attention_bytes(NULL, &sh, &s0, &w0);
    if (st != DSMOE_OK || s0 != saved[0] || w0 != ws[0])
        cf_fail("attention_bytes", "with ctx NULL: '%s', saved %zu workspace %zu; with a context: saved %zu "
                "workspace %zu", dsmoe_status_name(st), s0, w0, saved[0], ws[0]);
    else
        cf_pass("attention_bytes", "candidate saved=%zu workspace=%zu (also with ctx NULL); reference saved=%zu "
                "workspace=%zu", saved[0], ws[0], saved[1], ws[1]);
    size_t nq = (size_t)A->B * A->T * 3 * A->M, no = (size_t)A->B * A->T * A->M;
    cf_buf qkv = cf_up("qkv", cf_rand(nq, 2), nq, A->dt), out = cf_out("out", no, A->dt);
    cf_buf sv = cf_scratch("saved", saved[0], saved[1]);
    out.cols = A->M;
    CF_SIDES {
        dsmoe_attention_shape s = sh;
        s.dt = DT(A->dt);
        OP(attention_forward, P(out), P(sv), P(qkv), &s);
        SCRIBBLE(s);
    }
    cf_cmp(&out, NULL, NULL, cf_tol_for(A->dt, TOL_RED));
}

static void v_attention_backward(const void *arg) {
    const att_case *A = arg;
    dsmoe_attention_shape sh = {A->B, A->T, A->M, A->NH, A->dt};
    size_t saved[2], ws[2];
    sizes(&sh, saved, ws);
    size_t nq = (size_t)A->B * A->T * 3 * A->M, no = (size_t)A->B * A->T * A->M;
    cf_buf qkv = cf_up("qkv", cf_rand(nq, 2), nq, A->dt), out = cf_out("out", no, A->dt);
    cf_buf sv = cf_scratch("saved", saved[0], saved[1]), wk = cf_scratch("workspace", ws[0], ws[1]);
    cf_buf dout = cf_up("dout", cf_rand(no, 1), no, A->dt), dqkv = cf_up("dqkv", cf_rand(nq, 1), nq, A->dt);
    cf_buf dqkv2 = cf_up("dqkv(2nd)", dqkv.h, nq, A->dt);
    dqkv.cols = 3 * A->M;
    CF_SIDES {
        dsmoe_attention_shape s = sh;
        s.dt = DT(A->dt);
        OP(attention_forward, P(out), P(sv), P(qkv), &s); // each side's own out and saved state
        OP(attention_backward, P(dqkv), P(wk), P(dout), P(qkv), P(out), P(sv), &s);
        SCRIBBLE(s);
    }
    cf_cmp(&dqkv, dqkv.h, NULL, A->dt == CF_BF16 ? TOL_ATT_BWD_BF16 : TOL_ATT_BWD);
    if (deterministic()) {
        int side = 0;
        dsmoe_attention_shape s = sh;
        OP(attention_backward, P(dqkv2), P(wk), P(dout), P(qkv), P(out), P(sv), &s);
        same_bits("dqkv(determinism)", &dqkv, &dqkv2);
    }
}

void cf_group_attention(void) {
    // D = 16, 64, 32 and 128; T = 200 walks 4 tiles of 64 rows with a partial last one.
    static const att_case shapes[4] = {{2, 33, 64, 4, CF_F32}, {2, 33, 256, 4, CF_F32}, {1, 130, 64, 2, CF_F32},
                                       {1, 200, 256, 2, CF_F32}};
    char name[160];
    for (int d = 0; d < n_dtypes(); d++)
        for (int i = 0; i < 4; i++) {
            static att_case cases[2][4];
            att_case *A = &cases[d][i];
            *A = shapes[i];
            A->dt = DTS[d];
            snprintf(name, sizeof name, "attention_forward[%s,B=%d,T=%d,NH=%d,D=%d]", dtn(A->dt), A->B, A->T, A->NH,
                     A->M / A->NH);
            cf_run(name, v_attention_forward, A);
            snprintf(name, sizeof name, "attention_backward[%s,B=%d,T=%d,NH=%d,D=%d]", dtn(A->dt), A->B, A->T, A->NH,
                     A->M / A->NH);
            cf_run(name, v_attention_backward, A);
        }
}

// ---------------------------------------------------------------------------------------------------
// cross-entropy and residual mix

enum { CE_S = 19, CE_V = 5003, RM_S = 37, RM_M = 200 };

static void v_ce_forward(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    int32_t *tg = cf_randint(CE_S, 0, CE_V - 1);
    tg[0] = 0, tg[1] = CE_V - 1;
    cf_buf logits = cf_up("logits", cf_rand((size_t)CE_S * CE_V, 4), (size_t)CE_S * CE_V, dt);
    cf_buf targets = cf_up_i32("targets", tg, CE_S);
    cf_buf losses = cf_out("losses", CE_S, CF_F32), probs = cf_out("probs", (size_t)CE_S * CE_V, CF_F32);
    probs.cols = CE_V;
    CF_SIDES OP(crossentropy_forward, P(losses), P(probs), P(logits), DT(dt), P(targets), CE_S, CE_V);
    cf_cmp(&losses, NULL, NULL, dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED);
    cf_cmp(&probs, NULL, NULL, dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_EW);
}

static void v_ce_backward(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    float *hp = cf_rand((size_t)CE_S * CE_V, 4);
    for (int s = 0; s < CE_S; s++) { // probabilities: a softmax per row
        float *p = hp + (size_t)s * CE_V;
        double sum = 0;
        for (int i = 0; i < CE_V; i++)
            sum += p[i] = expf(p[i]);
        for (int i = 0; i < CE_V; i++)
            p[i] = (float)(p[i] / sum);
    }
    int32_t *tg = cf_randint(CE_S, 0, CE_V - 1);
    tg[0] = 0, tg[1] = CE_V - 1;
    cf_buf probs = cf_up("probs", hp, (size_t)CE_S * CE_V, CF_F32), targets = cf_up_i32("targets", tg, CE_S);
    cf_buf dl = cf_up("dlogits", cf_rand((size_t)CE_S * CE_V, 0.01f), (size_t)CE_S * CE_V, dt);
    dl.cols = CE_V;
    CF_SIDES OP(crossentropy_backward, P(dl), DT(dt), P(probs), P(targets), 1.0f / CE_S, CE_S, CE_V);
    cf_cmp(&dl, dl.h, NULL, cf_tol_for(dt, TOL_EW));
}

static void v_mix_forward(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    size_t n = (size_t)RM_S * RM_M;
    cf_buf moe = cf_up("moe", cf_rand(n, 1), n, dt), mlp = cf_up("mlp", cf_rand(n, 1), n, dt);
    cf_buf cl = cf_up("coef_logits", cf_rand(RM_S * 2, 3), RM_S * 2, CF_F32);
    cf_buf out = cf_out("out", n, dt), coef = cf_out("coef", RM_S * 2, CF_F32);
    out.cols = RM_M, coef.cols = 2;
    CF_SIDES OP(residual_mix_forward, P(out), P(coef), P(moe), P(mlp), DT(dt), P(cl), RM_S, RM_M);
    cf_cmp(&out, NULL, NULL, cf_tol_for(dt, TOL_EW));
    cf_cmp(&coef, NULL, NULL, TOL_EW);
}

static void v_mix_backward(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    size_t n = (size_t)RM_S * RM_M;
    float *hc = cf_host(RM_S * 2 * sizeof(float));
    for (int s = 0; s < RM_S; s++) {
        float c0 = 0.05f + 0.9f * cf_uniform();
        hc[2 * s] = c0, hc[2 * s + 1] = 1.0f - c0;
    }
    cf_buf moe = cf_up("moe", cf_rand(n, 1), n, dt), mlp = cf_up("mlp", cf_rand(n, 1), n, dt);
    cf_buf dout = cf_up("dout", cf_rand(n, 1), n, dt), coef = cf_up("coef", hc, RM_S * 2, CF_F32);
    cf_buf dmoe = cf_up("dmoe", cf_rand(n, 1), n, dt), dmlp = cf_up("dmlp", cf_rand(n, 1), n, dt);
    cf_buf dcl = cf_up("dcoef_logits", cf_rand(RM_S * 2, 1), RM_S * 2, CF_F32);
    dmoe.cols = dmlp.cols = RM_M, dcl.cols = 2;
    CF_SIDES OP(residual_mix_backward, P(dmoe), P(dmlp), P(dcl), P(dout), P(moe), P(mlp), DT(dt), P(coef), RM_S, RM_M);
    cf_cmp(&dmoe, dmoe.h, NULL, cf_tol_for(dt, TOL_EW));
    cf_cmp(&dmlp, dmlp.h, NULL, cf_tol_for(dt, TOL_EW));
    cf_cmp(&dcl, dcl.h, NULL, dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED);
}

// Knowledge distillation (optional pair, DSMOE_KCAP_DISTILL on both sides): the KL of softened student
// logits from a teacher's, with rows whose teacher is nearly one-hot (terms whose p underflows must give
// 0, never NaN), and its backward at a scale.
enum { KD_S = 13, KD_V = 3001 };

static int has_distill(void) {
    for (int s = 0; s < 2; s++)
        if (!(cf_sides[s].T->caps & DSMOE_KCAP_DISTILL) || !cf_sides[s].T->distill_forward ||
            !cf_sides[s].T->distill_backward)
            return 0;
    return 1;
}

static void v_kd_forward(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    size_t n = (size_t)KD_S * KD_V;
    float *ht = cf_rand(n, 4);
    for (int v = 0; v < KD_V; v++) ht[v] = v == 7 ? 60.0f : -60.0f; // row 0: a one-hot teacher at T = 1
    cf_buf st = cf_up("student", cf_rand(n, 4), n, dt), te = cf_up("teacher", ht, n, dt);
    cf_buf losses = cf_out("losses", KD_S, CF_F32), diff = cf_out("diff", n, CF_F32);
    diff.cols = KD_V;
    for (int k = 0; k < 2; k++) {
        float temperature = k ? 2.5f : 1.0f;
        CF_SIDES OP(distill_forward, P(losses), P(diff), P(st), P(te), DT(dt), temperature, KD_S, KD_V);
        cf_cmp(&losses, NULL, NULL, dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED);
        cf_cmp(&diff, NULL, NULL, dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_EW);
    }
}

static void v_kd_backward(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    size_t n = (size_t)KD_S * KD_V;
    cf_buf diff = cf_up("diff", cf_rand(n, 0.001f), n, CF_F32);
    cf_buf ds = cf_up("dstudent", cf_rand(n, 0.01f), n, dt);
    ds.cols = KD_V;
    CF_SIDES OP(distill_backward, P(ds), DT(dt), P(diff), 0.4f / KD_S, KD_S, KD_V);
    cf_cmp(&ds, ds.h, NULL, cf_tol_for(dt, TOL_EW));
}

void cf_group_loss_mix(void) {
    char name[160];
    for (int d = 0; d < n_dtypes(); d++) {
        const char *t = dtn(DTS[d]);
        snprintf(name, sizeof name, "crossentropy_forward[%s,S=%d,V=%d]", t, CE_S, CE_V);
        cf_run(name, v_ce_forward, &DTS[d]);
        snprintf(name, sizeof name, "crossentropy_backward[%s,S=%d,V=%d,dloss=1/S]", t, CE_S, CE_V);
        cf_run(name, v_ce_backward, &DTS[d]);
        snprintf(name, sizeof name, "residual_mix_forward[%s,S=%d,M=%d]", t, RM_S, RM_M);
        cf_run(name, v_mix_forward, &DTS[d]);
        snprintf(name, sizeof name, "residual_mix_backward[%s,S=%d,M=%d]", t, RM_S, RM_M);
        cf_run(name, v_mix_backward, &DTS[d]);
        if (!has_distill()) continue;
        snprintf(name, sizeof name, "distill_forward[%s,S=%d,V=%d,T=1 and 2.5]", t, KD_S, KD_V);
        cf_run(name, v_kd_forward, &DTS[d]);
        snprintf(name, sizeof name, "distill_backward[%s,S=%d,V=%d]", t, KD_S, KD_V);
        cf_run(name, v_kd_backward, &DTS[d]);
    }
}

// ---------------------------------------------------------------------------------------------------
// inference: KV cache and cached attention, sampling

enum { KB = 2, KNH = 4, KM = 64, KTMAX = 40, KP = 20, KT2 = KP + 3 };

static int has_inference(void) {
    for (int s = 0; s < 2; s++)
        if (!(cf_sides[s].T->caps & DSMOE_KCAP_INFERENCE) || !cf_sides[s].T->kv_append ||
            !cf_sides[s].T->attention_cached || !cf_sides[s].T->sample)
            return 0;
    return 1;
}

// Rows [t0, t0+nt) of each sequence of a (KB, tall, 3M) block, as a (KB*nt, 3M) block.
static float *rows_of(const float *all, int tall, int t0, int nt) {
    float *h = cf_host((size_t)KB * nt * 3 * KM * sizeof *h);
    for (int b = 0; b < KB; b++)
        memcpy(h + (size_t)b * nt * 3 * KM, all + ((size_t)b * tall + t0) * 3 * KM, (size_t)nt * 3 * KM * sizeof *h);
    return h;
}

// The reference's attention_forward over (KB, T) tokens: out rows [t0, t0+nt) of each sequence.
static float *full_attention(const float *qkv_rows, int T, int t0, int nt, dsmoe_dtype dt) {
    dsmoe_attention_shape sh = {KB, T, KM, KNH, CF_F32};
    size_t saved, ws;
    int side = 1;
    cf_op(1, "attention_bytes", cf_sides[1].T->attention_bytes(cf_sides[1].c, &sh, &saved, &ws));
    float *hq = cf_host((size_t)KB * T * 3 * KM * sizeof *hq);
    memcpy(hq, qkv_rows, (size_t)KB * T * 3 * KM * sizeof *hq);
    cf_buf q = cf_up("full.qkv", hq, (size_t)KB * T * 3 * KM, dt), out = cf_out("full.out", (size_t)KB * T * KM, CF_F32);
    cf_buf sv = cf_scratch("full.saved", 0, saved);
    OP(attention_forward, P(out), P(sv), P(q), &sh);
    const float *o = cf_get(&out, 1);
    float *want = cf_host((size_t)KB * nt * KM * sizeof *want);
    for (int b = 0; b < KB; b++)
        memcpy(want + (size_t)b * nt * KM, o + ((size_t)b * T + t0) * KM, (size_t)nt * KM * sizeof *want);
    return want;
}

// One step of a cache (kc, vc of T_max positions): rows [t0, t0 + nt) of each sequence of `all` (KB,
// tall, 3M) appended at positions pos, then their cached attention, on both sides; the outputs compared.
static cf_buf kv_step(cf_buf *kc, cf_buf *vc, const float *all, int tall, int t0, int nt, const int32_t *pos,
                      int T_max, const char *name, dsmoe_dtype dt) {
    int32_t at[KB];
    memcpy(at, pos, sizeof at);
    cf_buf p = cf_up_i32("pos", at, KB), q = cf_up("qkv", rows_of(all, tall, t0, nt), (size_t)KB * nt * 3 * KM, dt);
    cf_buf o = cf_out(name, (size_t)KB * nt * KM, dt);
    o.cols = KM;
    CF_SIDES {
        OP(kv_append, P(*kc), P(*vc), P(q), DT(dt), P(p), KB, nt, KM, KNH, T_max);
        OP(attention_cached, P(o), P(q), P(*kc), P(*vc), DT(dt), P(p), KB, nt, KM, KNH, T_max);
    }
    cf_cmp(&o, NULL, NULL, cf_tol_for(dt, TOL_RED));
    return o;
}

// A case's inputs: (KB, tall, 3M) rows of q, k, v uniform in [-scale, scale) (rounded to dt) and an empty
// cache of T_max positions (kc, vc). Skips the case where a side has no inference members.
static float *kv_inputs(int tall, int T_max, float scale, dsmoe_dtype dt, cf_buf *kc, cf_buf *vc) {
    if (!has_inference()) cf_abandon_skip("the candidate or the reference has no inference members");
    float *all = cf_rand((size_t)KB * tall * 3 * KM, scale);
    cf_round_dt(all, (size_t)KB * tall * 3 * KM, dt);
    const int D = KM / KNH;
    size_t ncache = (size_t)KB * KNH * T_max * D;
    *kc = cf_zeros("k_cache", ncache, dt), *vc = cf_zeros("v_cache", ncache, dt);
    kc->cols = vc->cols = D;
    return all;
}

static void v_kv_cache(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    const int tall = KT2 + 1;
    cf_buf kc, vc;
    float *all = kv_inputs(tall, KTMAX, 2, dt, &kc, &vc);
    cf_tol tol = cf_tol_for(dt, TOL_RED);
    // step 1: prefill KP tokens at position 0
    cf_buf o1 = kv_step(&kc, &vc, all, tall, 0, KP, (const int32_t[KB]){0, 0}, KTMAX, "out_prefill", dt);
    cf_cmp_to("out_prefill(vs_attention_forward)", &o1, full_attention(rows_of(all, tall, 0, KP), KP, 0, KP, dt), NULL,
              tol);
    // step 2: three more tokens at position KP: a full attention over KT2 tokens, its last three rows
    cf_buf o2 = kv_step(&kc, &vc, all, tall, KP, 3, (const int32_t[KB]){KP, KP}, KTMAX, "out_step", dt);
    cf_cmp_to("out_step(vs_attention_forward)", &o2, full_attention(rows_of(all, tall, 0, KT2), KT2, KP, 3, dt), NULL,
              tol);
    // step 3: ragged positions (one sequence rewinds to 7)
    kv_step(&kc, &vc, all, tall, KT2, 1, (const int32_t[KB]){KT2, 7}, KTMAX, "out_ragged", dt);
    cf_cmp(&kc, NULL, NULL, (cf_tol){0, 0}); // (B, NH, T_max, D): copies, exact; zeros elsewhere
    cf_cmp(&vc, NULL, NULL, (cf_tol){0, 0});
}

// A long cache, for the cuda plugin's split keys (kernel.cuda.decode_split_keys, 128 by default: 2 splits
// here; the suite's run with 8 gives 25, and a row that sees no key of a split beside one that does): a
// prefill of KLP tokens, then decode steps of 3 tokens and of 1 with ragged positions (one sequence
// rewinds to 31, so that its rows end in different splits).
enum { KLMAX = 200, KLP = 150 };

static void v_kv_long(const void *arg) {
    dsmoe_dtype dt = *(const dsmoe_dtype *)arg;
    const int tall = KLP + 4;
    cf_buf kc, vc;
    float *all = kv_inputs(tall, KLMAX, 4, dt, &kc, &vc);
    kv_step(&kc, &vc, all, tall, 0, KLP, (const int32_t[KB]){0, 0}, KLMAX, "out_prefill", dt);
    kv_step(&kc, &vc, all, tall, KLP, 3, (const int32_t[KB]){KLP, 31}, KLMAX, "out_step3", dt);
    kv_step(&kc, &vc, all, tall, KLP + 3, 1, (const int32_t[KB]){KLP + 3, 34}, KLMAX, "out_step1", dt);
}

typedef struct smp_case {
    float temperature;
    int top_k;
    float top_p;
    int rows, V;
    dsmoe_dtype dt;
} smp_case;

static void v_sample(const void *arg) {
    const smp_case *C = arg;
    if (!has_inference()) cf_abandon_skip("the candidate or the reference has no inference members");
    float *h = cf_rand((size_t)C->rows * C->V, 3);
    h[(size_t)1 * C->V + 100] = h[(size_t)1 * C->V + C->V - 100] = 10.0f; // row 1: two equal maxima
    for (int i = 0; i < C->V; i++)
        h[(size_t)2 * C->V + i] = 0.5f; // row 2: all equal
    if (C->rows > 4) {
        // Row 3: the candidate order's corner cases. Exact ties on multiples of 1/16 in [-2, 0], the
        // maximum 0 held by -0 and +0 alike (equal logits: id order), NaN (counts as -Inf), -Inf, and
        // negative subnormals just below the zeros. Row 4: NaN first, which greedy keeps (nothing
        // compares greater) and sampling never draws.
        float *r3 = h + (size_t)3 * C->V;
        for (int i = 0; i < C->V; i++) {
            int k = (int)(((unsigned)i * 7919u) % 33u);
            r3[i] = k == 0 ? (i % 2 ? -0.0f : 0.0f) : -(float)k / 16.0f;
            if (i % 97 == 5) r3[i] = NAN;
            else if (i % 89 == 3) r3[i] = -INFINITY;
            else if (i % 83 == 7) r3[i] = -1e-40f;
        }
        h[(size_t)4 * C->V] = NAN;
    }
    cf_buf logits = cf_up("logits", h, (size_t)C->rows * C->V, C->dt), tokens = cf_out("tokens", C->rows, DSMOE_INT32);
    uint64_t ctr[8] = {0, 1, 2, 12345, 1ull << 40, 7, 99, 3};
    dsmoe_sampling_params sp = {C->temperature, C->top_k, C->top_p, 0x5EEDull};
    CF_SIDES {
        dsmoe_sampling_params p = sp;
        uint64_t c[8];
        memcpy(c, ctr, sizeof c);
        OP(sample, P(tokens), P(logits), DT(C->dt), C->rows, C->V, &p, c);
        SCRIBBLE(p);
        SCRIBBLE(c);
    }
    cf_cmp_i32(&tokens, NULL);
}

void cf_group_inference(void) {
    char name[200];
    static const smp_case sc[] = {{0.0f, 0, 1.0f, 8, 1000, CF_F32},   {0.8f, 40, 0.9f, 8, 1000, CF_F32},
                                  {1.0f, 0, 1.0f, 8, 1000, CF_F32},   {1.3f, 5, 1.0f, 8, 1000, CF_F32},
                                  {0.7f, 0, 0.5f, 8, 1000, CF_F32},   {0.9f, 50, 0.95f, 4, 50257, CF_F32},
                                  {0.0f, 0, 1.0f, 8, 1000, CF_BF16},  {0.8f, 40, 0.9f, 8, 1000, CF_BF16},
                                  {1.0f, 0, 1.0f, 8, 1000, CF_BF16}};
    for (int d = 0; d < n_dtypes(); d++) {
        snprintf(name, sizeof name, "kv_cache[%s,B=%d,NH=%d,D=%d,Tmax=%d,prefill=%d,+3,ragged]", dtn(DTS[d]), KB, KNH,
                 KM / KNH, KTMAX, KP);
        cf_run(name, v_kv_cache, &DTS[d]);
        snprintf(name, sizeof name, "kv_cache[%s,B=%d,NH=%d,D=%d,Tmax=%d,prefill=%d,+3,+1,ragged]", dtn(DTS[d]), KB,
                 KNH, KM / KNH, KLMAX, KLP);
        cf_run(name, v_kv_long, &DTS[d]);
    }
    for (size_t i = 0; i < sizeof sc / sizeof *sc; i++) {
        const smp_case *C = &sc[i];
        if (C->dt == CF_BF16 && !cf_cand_dtype(CF_BF16)) continue;
        if (C->temperature == 0)
            snprintf(name, sizeof name, "sample[%s,greedy,rows=%d,V=%d,ties]", dtn(C->dt), C->rows, C->V);
        else
            snprintf(name, sizeof name, "sample[%s,T=%g,top_k=%d,top_p=%g,rows=%d,V=%d]", dtn(C->dt), C->temperature,
                     C->top_k, C->top_p, C->rows, C->V);
        cf_run(name, v_sample, C);
    }
}
