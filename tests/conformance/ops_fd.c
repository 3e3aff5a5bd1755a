// tests/conformance/ops_fd.c: the CANDIDATE's backward ops against central finite differences of its
// OWN forward ops, in float32 (the reference plugin takes no part). For a forward f, an input x, a
// direction v and a cotangent g (fixed seeds per check), with phi(x) = <g, f(x)> summed on the host in
// double:
//     a = (phi(x + h v) - phi(x - h v)) / 2h     the forward, twice (every input uploaded afresh)
//     b = <backward(g), v>                        the backward at x, accumulated into zeroed buffers
// and the line "wrt_<input>" passes when |a - b| <= FD_RTOL * max(|a|, |b|) + rounding. One line per
// input, so that a wrong gradient of one input is not averaged with the right ones of the others.
// defines: cf_group_fd
//
// Why h = FD_H * scale (the size of the input's values) and FD_RTOL = 2e-2 cannot fail a correct
// float32 plugin, and still fail a wrong one:
// - Truncation: a central difference is exact for quadratics; its error is h^2/6 * phi''' along v, about
//   (h / l)^2 / 6 relative where l is the length over which the op bends. The inputs here are O(scale)
//   and the ops bend on that scale or not much faster (softmax of logits spread over a few units, GELU
//   of inputs in [-3, 3] bending over ~1, normalisation of rows whose spread is the scale), so 2e-5 ..
//   2e-4 of |a|, and exactly 0 for the ops linear in the input (embedding, bias, dispatch, combine in y).
// - Rounding of the inputs: x +- h v is rounded to float32; b uses the step actually taken
//   (double)(x+) - (x-), so that rounding cancels exactly.
// - Rounding of the forward: each float32 output is within a few ulps of the size of its terms; take
//   |df_i| <= FD_RHO |f_i| with FD_RHO = 4 FLT_EPSILON ~ 5e-7. Then phi is off by at most
//   FD_RHO * sum |g_i f_i| at each point, and the difference quotient by FD_RHO (mag+ + mag-) / 2h. That
//   bound has every error of the same sign: n independent roundings sum to about 1/sqrt(n) of it
//   (n = 7 .. 288 outputs here), which covers the outputs that carry more than 4 ulps (the cancellation in
//   layer norm's x - mean, attention's sums of p v). It is ADDED to the band and printed as "rounding"
//   (relative to max(|a|, |b|)); here it is 2e-4 .. 7e-3, while the measured rel_diff of the cpu plugin
//   is 1e-7 .. 2e-4. A check whose rounding term exceeds half the band FAILs as unable to judge, so
//   the band never exceeds 3% and the floor can never make a check blind.
// So a correct plugin stays >= 10x inside 2e-2, while a gradient scaled by 1.05, a dropped term or a
// backward that does not run (b = 0) fails. A directional derivative sees an error only through its
// projection on v (an error in a few elements moves b by their share): element-wise agreement is the
// other groups' job, against the cpu plugin.
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "conformance.h"

#define FD_H 1e-2f                 // step: h = FD_H * the scale of the input's values
#define FD_RTOL 2e-2               // band, relative to max(|a|, |b|)
#define FD_RHO (4.0 * FLT_EPSILON) // rounding of a float32 output, relative to the size of its terms

#define X0 (&cf_sides[0])
#define OP0(member, ...)                                                                                       \
    cf_op(0, #member, X0->T->member ? X0->T->member(X0->c, X0->q, __VA_ARGS__) : CF_MISSING)
#define D0(b) ((b).p[0])

// A candidate-only buffer of n elements of dt holding host (NULL: zeros).
static cf_buf up0(const char *name, const void *host, size_t n, dsmoe_dtype dt) {
    size_t bytes = n * dsmoe_dtype_size(dt);
    cf_buf b = cf_scratch(name, bytes, 0);
    b.n = n, b.dt = dt;
    if (!host) host = cf_host(bytes);
    cf_op(0, "copy_to_device", X0->T->copy_to_device(X0->c, X0->q, b.p[0], host, bytes));
    return b;
}
static cf_buf f0(const char *name, const float *host, size_t n) { return up0(name, host, n, CF_F32); }

// sum of g_i f_i over the mask (NULL: all), in double; *mag += sum of |g_i f_i|.
static double dotg(const float *g, const float *f, size_t n, const unsigned char *mask, double *mag) {
    double s = 0, m = 0;
    for (size_t i = 0; i < n; i++)
        if (!mask || mask[i]) s += (double)g[i] * f[i], m += fabs((double)g[i] * f[i]);
    *mag += m;
    return s;
}

// One input of a function under test.
typedef struct fd_in {
    const char *name;
    float *x;                  // (n) its values at the point of the backward
    size_t n;
    float scale;               // the size of its values: h = FD_H * scale
    const unsigned char *mask; // the elements the op uses (NULL = all): v is 0 elsewhere, grad not read
} fd_in;

// phi(x) = <g, f(x)> computed by the candidate (x: the inputs' values); *mag += sum |g_i f_i|.
typedef double (*fd_phi)(const void *op, float *const *x, double *mag);

// Input i along a random direction: the finite difference of phi against <grad, v>. One line.
static void fd_check(fd_phi phi, const void *op, const fd_in *in, int nin, int i, const float *grad) {
    const fd_in *I = &in[i];
    const float h = FD_H * I->scale;
    float *v = cf_rand(I->n, 1), *xp = cf_host(I->n * sizeof *xp), *xm = cf_host(I->n * sizeof *xm);
    double b = 0;
    for (size_t j = 0; j < I->n; j++) {
        int used = !I->mask || I->mask[j];
        if (!used) v[j] = 0;
        xp[j] = I->x[j] + h * v[j], xm[j] = I->x[j] - h * v[j];
        if (used) b += (double)grad[j] * ((double)xp[j] - xm[j]); // the step actually taken
    }
    float *xs[8];
    for (int k = 0; k < nin; k++)
        xs[k] = in[k].x;
    double magp = 0, magm = 0;
    xs[i] = xp;
    double fp = phi(op, xs, &magp);
    xs[i] = xm;
    double fm = phi(op, xs, &magm);
    double a = (fp - fm) / (2.0 * h);
    b /= 2.0 * h;
    double big = fmax(fabs(a), fabs(b)), noise = FD_RHO * (magp + magm) / (2.0 * h);
    double tol = FD_RTOL * big + noise, rel = big > 0 ? fabs(a - b) / big : 0;
    char what[64];
    snprintf(what, sizeof what, "wrt_%s", I->name);
    if (!(fabs(a - b) <= tol))
        cf_fail(what, "finite difference %.9g, <backward(g), v> %.9g: rel_diff=%.3g > %.3g + rounding %.3g (h=%g, "
                "n=%zu)", a, b, rel, FD_RTOL, big > 0 ? noise / big : noise, h, I->n);
    else if (big == 0 || noise > 0.5 * FD_RTOL * big)
        cf_fail(what, "cannot judge: fd=%.9g bwd=%.9g, rounding floor %.3g is over half the band (a bug of this "
                "check's inputs, or a forward that ignores this input)", a, b, noise);
    else
        cf_pass(what, "fd=%.9g bwd=%.9g rel_diff=%.2e (band %.0e + rounding %.1e; h=%g, n=%zu)", a, b, rel, FD_RTOL,
                noise / big, h, I->n);
}

// ---------------------------------------------------------------------------------------------------
// layer norm, GELU, attention, cross-entropy, residual mix, embedding, bias

enum { LN_S = 5, LN_M = 24, GE_N = 500, CE_S = 7, CE_V = 37, RM_S = 7, RM_M = 16 };
enum { EB_B = 2, EB_T = 5, EB_M = 8, EB_V = 11, BA_R = 9, BA_N = 20 };
#define LN_EPS 1e-5f
#define CE_DLOSS 0.7f
static const dsmoe_attention_shape ATT = {2, 9, 16, 2, CF_F32}; // B, T, M, NH: D = 8

static double ln_phi(const void *g, float *const *x, double *mag) {
    size_t n = (size_t)LN_S * LN_M;
    cf_buf in = f0("in", x[0], n), w = f0("weight", x[1], LN_M), b = f0("bias", x[2], LN_M);
    cf_buf out = f0("out", NULL, n), mean = f0("mean", NULL, LN_S), rstd = f0("rstd", NULL, LN_S);
    OP0(layernorm_forward, D0(out), D0(mean), D0(rstd), D0(in), CF_F32, D0(w), D0(b), LN_S, LN_M, LN_EPS);
    return dotg(g, cf_get(&out, 0), n, NULL, mag);
}

static void v_layernorm(const void *arg) {
    (void)arg;
    size_t n = (size_t)LN_S * LN_M;
    float *hw = cf_rand(LN_M, 0.5f), *g = cf_rand(n, 1);
    for (int j = 0; j < LN_M; j++)
        hw[j] += 1.0f;
    fd_in in[3] = {{"in", cf_rand(n, 1), n, 1, NULL}, {"weight", hw, LN_M, 1.5f, NULL},
                   {"bias", cf_rand(LN_M, 0.5f), LN_M, 0.5f, NULL}};
    cf_buf x = f0("in", in[0].x, n), w = f0("weight", hw, LN_M), b = f0("bias", in[2].x, LN_M);
    cf_buf out = f0("out", NULL, n), mean = f0("mean", NULL, LN_S), rstd = f0("rstd", NULL, LN_S);
    cf_buf dout = f0("dout", g, n), din = f0("din", NULL, n), dw = f0("dweight", NULL, LN_M);
    cf_buf db = f0("dbias", NULL, LN_M);
    OP0(layernorm_forward, D0(out), D0(mean), D0(rstd), D0(x), CF_F32, D0(w), D0(b), LN_S, LN_M, LN_EPS);
    OP0(layernorm_backward, D0(din), D0(dw), D0(db), D0(dout), D0(x), CF_F32, D0(w), D0(mean), D0(rstd), LN_S, LN_M);
    const float *grad[3] = {cf_get(&din, 0), cf_get(&dw, 0), cf_get(&db, 0)};
    for (int i = 0; i < 3; i++)
        fd_check(ln_phi, g, in, 3, i, grad[i]);
}

static double gelu_phi(const void *g, float *const *x, double *mag) {
    cf_buf in = f0("in", x[0], GE_N), out = f0("out", NULL, GE_N);
    OP0(gelu_forward, D0(out), D0(in), CF_F32, GE_N);
    return dotg(g, cf_get(&out, 0), GE_N, NULL, mag);
}

static void v_gelu(const void *arg) {
    (void)arg;
    fd_in in = {"in", cf_rand(GE_N, 3), GE_N, 3, NULL};
    float *g = cf_rand(GE_N, 1);
    cf_buf x = f0("in", in.x, GE_N), dout = f0("dout", g, GE_N), din = f0("din", NULL, GE_N);
    OP0(gelu_backward, D0(din), D0(x), D0(dout), CF_F32, GE_N);
    fd_check(gelu_phi, g, &in, 1, 0, cf_get(&din, 0));
}

static size_t att_bytes(size_t *ws) {
    dsmoe_attention_shape s = ATT;
    size_t saved = 0;
    cf_op(0, "attention_bytes", X0->T->attention_bytes(X0->c, &s, &saved, ws));
    return saved;
}

static cf_buf att_forward(const cf_buf *qkv, cf_buf *saved) {
    size_t ws;
    cf_buf out = f0("out", NULL, (size_t)ATT.B * ATT.T * ATT.M);
    *saved = cf_scratch("saved", att_bytes(&ws), 0);
    dsmoe_attention_shape s = ATT;
    OP0(attention_forward, D0(out), D0(*saved), D0(*qkv), &s);
    return out;
}

static double att_phi(const void *g, float *const *x, double *mag) {
    cf_buf qkv = f0("qkv", x[0], (size_t)ATT.B * ATT.T * 3 * ATT.M), saved;
    cf_buf out = att_forward(&qkv, &saved);
    return dotg(g, cf_get(&out, 0), out.n, NULL, mag);
}

static void v_attention(const void *arg) {
    (void)arg;
    size_t nq = (size_t)ATT.B * ATT.T * 3 * ATT.M, no = (size_t)ATT.B * ATT.T * ATT.M, ws;
    fd_in in = {"qkv", cf_rand(nq, 1), nq, 1, NULL};
    float *g = cf_rand(no, 1);
    cf_buf qkv = f0("qkv", in.x, nq), saved, dout = f0("dout", g, no), dqkv = f0("dqkv", NULL, nq);
    cf_buf out = att_forward(&qkv, &saved);
    att_bytes(&ws);
    cf_buf work = cf_scratch("workspace", ws, 0);
    dsmoe_attention_shape s = ATT;
    OP0(attention_backward, D0(dqkv), D0(work), D0(dout), D0(qkv), D0(out), D0(saved), &s);
    fd_check(att_phi, g, &in, 1, 0, cf_get(&dqkv, 0));
}

// Cross-entropy: phi = sum_s dloss * losses[s], whose gradient crossentropy_backward(dloss) gives.
typedef struct ce_op {
    const int32_t *targets;
    const float *g; // (S) dloss
} ce_op;

static cf_buf ce_forward(const ce_op *O, const float *logits, cf_buf *probs) {
    cf_buf lg = f0("logits", logits, (size_t)CE_S * CE_V), tg = up0("targets", O->targets, CE_S, DSMOE_INT32);
    cf_buf losses = f0("losses", NULL, CE_S);
    *probs = f0("probs", NULL, (size_t)CE_S * CE_V);
    OP0(crossentropy_forward, D0(losses), D0(*probs), D0(lg), CF_F32, D0(tg), CE_S, CE_V);
    return losses;
}

static double ce_phi(const void *op, float *const *x, double *mag) {
    cf_buf probs, losses = ce_forward(op, x[0], &probs);
    return dotg(((const ce_op *)op)->g, cf_get(&losses, 0), CE_S, NULL, mag);
}

static void v_crossentropy(const void *arg) {
    (void)arg;
    size_t n = (size_t)CE_S * CE_V;
    ce_op O = {cf_randint(CE_S, 0, CE_V - 1), cf_fill(CE_S, CE_DLOSS)};
    fd_in in = {"logits", cf_rand(n, 3), n, 3, NULL};
    cf_buf probs, tg = up0("targets", O.targets, CE_S, DSMOE_INT32), dl = f0("dlogits", NULL, n);
    ce_forward(&O, in.x, &probs);
    OP0(crossentropy_backward, D0(dl), CF_F32, D0(probs), D0(tg), CE_DLOSS, CE_S, CE_V);
    fd_check(ce_phi, &O, &in, 1, 0, cf_get(&dl, 0));
}

static cf_buf mix_forward(float *const *x, cf_buf *coef) {
    size_t n = (size_t)RM_S * RM_M;
    cf_buf moe = f0("moe", x[0], n), mlp = f0("mlp", x[1], n), cl = f0("coef_logits", x[2], RM_S * 2);
    cf_buf out = f0("out", NULL, n);
    *coef = f0("coef", NULL, RM_S * 2);
    OP0(residual_mix_forward, D0(out), D0(*coef), D0(moe), D0(mlp), CF_F32, D0(cl), RM_S, RM_M);
    return out;
}

static double mix_phi(const void *g, float *const *x, double *mag) {
    cf_buf coef, out = mix_forward(x, &coef);
    return dotg(g, cf_get(&out, 0), out.n, NULL, mag);
}

static void v_residual_mix(const void *arg) {
    (void)arg;
    size_t n = (size_t)RM_S * RM_M;
    fd_in in[3] = {{"moe", cf_rand(n, 1), n, 1, NULL}, {"mlp", cf_rand(n, 1), n, 1, NULL},
                   {"coef_logits", cf_rand(RM_S * 2, 2), RM_S * 2, 2, NULL}};
    float *g = cf_rand(n, 1), *xs[3] = {in[0].x, in[1].x, in[2].x};
    cf_buf coef, moe = f0("moe", xs[0], n), mlp = f0("mlp", xs[1], n), dout = f0("dout", g, n);
    cf_buf dmoe = f0("dmoe", NULL, n), dmlp = f0("dmlp", NULL, n), dcl = f0("dcoef_logits", NULL, RM_S * 2);
    mix_forward(xs, &coef);
    OP0(residual_mix_backward, D0(dmoe), D0(dmlp), D0(dcl), D0(dout), D0(moe), D0(mlp), CF_F32, D0(coef), RM_S, RM_M);
    const float *grad[3] = {cf_get(&dmoe, 0), cf_get(&dmlp, 0), cf_get(&dcl, 0)};
    for (int i = 0; i < 3; i++)
        fd_check(mix_phi, g, in, 3, i, grad[i]);
}

typedef struct emb_op {
    const int32_t *tokens;
    const float *g;
} emb_op;

static double emb_phi(const void *op, float *const *x, double *mag) {
    const emb_op *O = op;
    size_t no = (size_t)EB_B * EB_T * EB_M;
    cf_buf tok = up0("tokens", O->tokens, EB_B * EB_T, DSMOE_INT32), out = f0("out", NULL, no);
    cf_buf wte = f0("wte", x[0], (size_t)EB_V * EB_M), wpe = f0("wpe", x[1], (size_t)EB_T * EB_M);
    OP0(embedding_forward, D0(out), CF_F32, D0(tok), D0(wte), CF_F32, D0(wpe), NULL, EB_B, EB_T, EB_M, EB_V, EB_T);
    return dotg(O->g, cf_get(&out, 0), no, NULL, mag);
}

static void v_embedding(const void *arg) {
    (void)arg;
    size_t no = (size_t)EB_B * EB_T * EB_M, nte = (size_t)EB_V * EB_M, npe = (size_t)EB_T * EB_M;
    int32_t *t = cf_randint(EB_B * EB_T, 0, EB_V - 1);
    t[0] = t[3] = t[7] = 4; // repeated tokens: their rows of dwte sum
    emb_op O = {t, cf_rand(no, 1)};
    fd_in in[2] = {{"wte", cf_rand(nte, 1), nte, 1, NULL}, {"wpe", cf_rand(npe, 1), npe, 1, NULL}};
    cf_buf tok = up0("tokens", t, EB_B * EB_T, DSMOE_INT32), dout = f0("dout", O.g, no);
    cf_buf dwte = f0("dwte", NULL, nte), dwpe = f0("dwpe", NULL, npe);
    OP0(embedding_backward, D0(dwte), D0(dwpe), D0(dout), CF_F32, D0(tok), EB_B, EB_T, EB_M, EB_V);
    const float *grad[2] = {cf_get(&dwte, 0), cf_get(&dwpe, 0)};
    for (int i = 0; i < 2; i++)
        fd_check(emb_phi, &O, in, 2, i, grad[i]);
}

typedef struct bias_op {
    const float *out0, *g; // (R, N) the values bias_add adds to; the cotangent
} bias_op;

static double bias_phi(const void *op, float *const *x, double *mag) {
    const bias_op *O = op;
    cf_buf out = f0("out", O->out0, (size_t)BA_R * BA_N), bias = f0("bias", x[0], BA_N);
    OP0(bias_add, D0(out), CF_F32, D0(bias), BA_R, BA_N);
    return dotg(O->g, cf_get(&out, 0), out.n, NULL, mag);
}

static void v_bias(const void *arg) {
    (void)arg;
    size_t n = (size_t)BA_R * BA_N;
    bias_op O = {cf_rand(n, 1), cf_rand(n, 1)};
    fd_in in = {"bias", cf_rand(BA_N, 1), BA_N, 1, NULL};
    cf_buf dout = f0("dout", O.g, n), db = f0("dbias", NULL, BA_N);
    OP0(bias_backward, D0(db), D0(dout), CF_F32, BA_R, BA_N);
    fd_check(bias_phi, &O, &in, 1, 0, cf_get(&db, 0));
}

// ---------------------------------------------------------------------------------------------------
// MoE combine and dispatch through a table built here: S tokens, two distinct choices each, slots by
// level then token order; S K > E C, so some choices are dropped (their weight is 0 and fixed)

enum { MX_S = 10, MX_E = 4, MX_K = 2, MX_C = 4, MX_M = 8 };

typedef struct mx_op {
    int32_t choice[MX_S * MX_K], slot[MX_S * MX_K];
    unsigned char rows[MX_E * MX_C * MX_M]; // elements of (E, C, M) a kept choice owns
    const float *g;                          // the cotangent of the output
} mx_op;

static void mx_table(mx_op *O) {
    int used[MX_E] = {0};
    for (int s = 0; s < MX_S; s++) {
        int c0 = (int)(cf_rand_u64() % MX_E);
        O->choice[s * MX_K] = c0, O->choice[s * MX_K + 1] = (c0 + 1 + (int)(cf_rand_u64() % (MX_E - 1))) % MX_E;
    }
    memset(O->rows, 0, sizeof O->rows);
    for (int k = 0; k < MX_K; k++)
        for (int s = 0; s < MX_S; s++) {
            int e = O->choice[s * MX_K + k], sl = used[e] < MX_C ? used[e]++ : -1;
            O->slot[s * MX_K + k] = sl;
            if (sl >= 0) memset(O->rows + ((size_t)e * MX_C + sl) * MX_M, 1, MX_M);
        }
}

#define MX_TABLE(O)                                                                                           \
    cf_buf choice = up0("choice", (O)->choice, MX_S * MX_K, DSMOE_INT32);                                     \
    cf_buf slot = up0("slot", (O)->slot, MX_S * MX_K, DSMOE_INT32)

static double combine_phi(const void *op, float *const *x, double *mag) {
    const mx_op *O = op;
    MX_TABLE(O);
    cf_buf y = f0("y", x[0], (size_t)MX_E * MX_C * MX_M), w = f0("weight", x[1], MX_S * MX_K);
    cf_buf out = f0("out", NULL, (size_t)MX_S * MX_M);
    OP0(moe_combine, D0(out), D0(y), CF_F32, D0(choice), D0(slot), D0(w), MX_S, MX_K, MX_E, MX_C, MX_M);
    return dotg(O->g, cf_get(&out, 0), out.n, NULL, mag);
}

static void v_combine(const void *arg) {
    (void)arg;
    mx_op O;
    mx_table(&O);
    size_t ny = (size_t)MX_E * MX_C * MX_M, no = (size_t)MX_S * MX_M;
    O.g = cf_rand(no, 1);
    float *hy = cf_rand(ny, 1), *hw = cf_host(MX_S * MX_K * sizeof *hw);
    for (size_t i = 0; i < ny; i++)
        if (!O.rows[i]) hy[i] = 0; // rows no choice owns: unused
    for (int i = 0; i < MX_S * MX_K; i++)
        hw[i] = O.slot[i] >= 0 ? 0.1f + 0.9f * cf_uniform() : 0.0f;
    fd_in in[2] = {{"y", hy, ny, 1, O.rows}, {"weight", hw, MX_S * MX_K, 1, NULL}};
    MX_TABLE(&O);
    cf_buf y = f0("y", hy, ny), w = f0("weight", hw, MX_S * MX_K), dout = f0("dout", O.g, no);
    cf_buf dy = f0("dy", NULL, ny), dw = f0("dweight", NULL, MX_S * MX_K);
    OP0(moe_combine_backward, D0(dy), D0(dw), D0(dout), D0(y), CF_F32, D0(choice), D0(slot), D0(w), MX_S, MX_K, MX_E,
        MX_C, MX_M);
    const float *grad[2] = {cf_get(&dy, 0), cf_get(&dw, 0)}; // dy: rows of unused slots unspecified (masked)
    for (int i = 0; i < 2; i++)
        fd_check(combine_phi, &O, in, 2, i, grad[i]);
}

static double dispatch_phi(const void *op, float *const *x, double *mag) {
    const mx_op *O = op;
    MX_TABLE(O);
    cf_buf xb = f0("x", x[0], (size_t)MX_S * MX_M), buf = f0("buf", NULL, (size_t)MX_E * MX_C * MX_M);
    OP0(moe_dispatch, D0(buf), D0(xb), CF_F32, D0(choice), D0(slot), MX_S, MX_K, MX_E, MX_C, MX_M);
    return dotg(O->g, cf_get(&buf, 0), buf.n, O->rows, mag); // rows of unused slots are unspecified
}

static void v_dispatch(const void *arg) {
    (void)arg;
    mx_op O;
    mx_table(&O);
    size_t nb = (size_t)MX_E * MX_C * MX_M, nx = (size_t)MX_S * MX_M;
    float *g = cf_rand(nb, 1);
    for (size_t i = 0; i < nb; i++)
        if (!O.rows[i]) g[i] = 0;
    O.g = g;
    fd_in in = {"x", cf_rand(nx, 1), nx, 1, NULL};
    MX_TABLE(&O);
    cf_buf dbuf = f0("dbuf", g, nb), dx = f0("dx", NULL, nx);
    OP0(moe_dispatch_backward, D0(dx), D0(dbuf), CF_F32, D0(choice), D0(slot), MX_S, MX_K, MX_E, MX_C, MX_M);
    fd_check(dispatch_phi, &O, &in, 1, 0, cf_get(&dx, 0));
}

// ---------------------------------------------------------------------------------------------------
// the experts' FFN as core/model/moe_layer.c runs it: y = gelu(a w1[w]^T + b1[w]) w2[w]^T + b2[w] per group
// (BIAS_GELU, then BIAS); backward: wgrad of w2, b2; the DGELU GEMM dh = gelu'(h) * (dy w2[w]); wgrad of
// w1, b1; the transposed GEMM da = dh w1[w]. Four groups over two weights (w = g % 2), counts with an
// empty and a full group.

enum { GG_G = 4, GG_BG = 2, GG_MM = 6, GG_M = 8, GG_F = 12 };
static const int32_t GG_COUNTS[GG_G] = {5, 0, 3, 6};

// One stage over the groups: a (rows, k) blocks, weights (n, k) when trans_b else (k, n), c (rows, n).
static dsmoe_grouped_gemm gg(const cf_buf *cnt, const cf_buf *a, int k, const cf_buf *w, int trans_b, const cf_buf *c,
                             int n) {
    return (dsmoe_grouped_gemm){
        .groups = GG_G, .counts = D0(*cnt), .m_max = GG_MM, .n = n, .k = k, .alpha = 1.0f, .beta = 0.0f,
        .a = D0(*a), .a_type = CF_F32, .lda = k, .a_stride = (size_t)GG_MM * k,
        .b = D0(*w), .b_type = CF_F32, .ldb = trans_b ? k : n, .b_stride = (size_t)n * k, .b_groups = GG_BG,
        .trans_b = trans_b, .c = D0(*c), .c_type = CF_F32, .ldc = n, .c_stride = (size_t)GG_MM * n};
}

static void gg_wgrad(const cf_buf *cnt, const cf_buf *dy, int n, const cf_buf *x, int k, const cf_buf *dw,
                     const cf_buf *db) {
    dsmoe_grouped_wgrad d = {.groups = GG_G, .counts = D0(*cnt), .m_max = GG_MM, .n = n, .k = k, .alpha = 1.0f,
                             .dy = D0(*dy), .dy_type = CF_F32, .dy_stride = (size_t)GG_MM * n,
                             .x = D0(*x), .x_type = CF_F32, .x_stride = (size_t)GG_MM * k,
                             .dw = D0(*dw), .dw_stride = (size_t)n * k, .b_groups = GG_BG,
                             .dbias = D0(*db), .dbias_stride = (size_t)n};
    OP0(gemm_grouped_wgrad, &d);
}

typedef struct gg_bufs {
    cf_buf cnt, a, w1, b1, w2, b2, act, h, y; // h: the pre-activation (aux), act = gelu(h)
} gg_bufs;

// x: a (G, MM, M), w1 (BG, F, M), b1 (BG, F), w2 (BG, M, F), b2 (BG, M)
static gg_bufs gg_forward(float *const *x) {
    gg_bufs B;
    B.cnt = up0("counts", GG_COUNTS, GG_G, DSMOE_INT32);
    B.a = f0("a", x[0], (size_t)GG_G * GG_MM * GG_M);
    B.w1 = f0("w1", x[1], (size_t)GG_BG * GG_F * GG_M), B.b1 = f0("b1", x[2], (size_t)GG_BG * GG_F);
    B.w2 = f0("w2", x[3], (size_t)GG_BG * GG_M * GG_F), B.b2 = f0("b2", x[4], (size_t)GG_BG * GG_M);
    B.act = f0("act", NULL, (size_t)GG_G * GG_MM * GG_F), B.h = f0("h", NULL, (size_t)GG_G * GG_MM * GG_F);
    B.y = f0("y", NULL, (size_t)GG_G * GG_MM * GG_M);
    dsmoe_grouped_gemm fc = gg(&B.cnt, &B.a, GG_M, &B.w1, 1, &B.act, GG_F);
    fc.epilogue = DSMOE_EPI_BIAS_GELU, fc.bias = D0(B.b1), fc.bias_stride = GG_F, fc.aux = D0(B.h);
    OP0(gemm_grouped, &fc);
    dsmoe_grouped_gemm proj = gg(&B.cnt, &B.act, GG_F, &B.w2, 1, &B.y, GG_M);
    proj.epilogue = DSMOE_EPI_BIAS, proj.bias = D0(B.b2), proj.bias_stride = GG_M;
    OP0(gemm_grouped, &proj);
    return B;
}

typedef struct gg_op {
    const float *g;            // (G, MM, M) cotangent of y, 0 in rows beyond the counts
    const unsigned char *rows; // (G, MM, M) rows below the counts
} gg_op;

static double gg_phi(const void *op, float *const *x, double *mag) {
    const gg_op *O = op;
    gg_bufs B = gg_forward(x);
    return dotg(O->g, cf_get(&B.y, 0), B.y.n, O->rows, mag); // rows beyond the counts are not written
}

static void v_experts(const void *arg) {
    (void)arg;
    // TF32 rounds the GEMMs' operands to 2^-11: the forward's rounding (FD_RHO) would be 4000x float32's,
    // far over the band, so nothing could be judged. The grouped GEMMs and their backward are compared
    // with the reference element by element at TOL_TF32 (ops_dense.c) instead.
    if (cf_tf32) cf_abandon_skip("TF32 GEMMs: their rounding swamps a finite difference (checked in float32)");
    size_t na = (size_t)GG_G * GG_MM * GG_M, nw = (size_t)GG_BG * GG_F * GG_M, nh = (size_t)GG_G * GG_MM * GG_F;
    unsigned char *rows = cf_host(na);
    for (int g = 0; g < GG_G; g++)
        memset(rows + (size_t)g * GG_MM * GG_M, 1, (size_t)GG_COUNTS[g] * GG_M);
    float *ha = cf_rand(na, 1), *gy = cf_rand(na, 1);
    for (size_t i = 0; i < na; i++)
        if (!rows[i]) ha[i] = gy[i] = 0;
    gg_op O = {gy, rows};
    fd_in in[5] = {{"a", ha, na, 1, rows}, {"w1", cf_rand(nw, 0.5f), nw, 0.5f, NULL},
                   {"b1", cf_rand(GG_BG * GG_F, 0.5f), GG_BG * GG_F, 0.5f, NULL},
                   {"w2", cf_rand(nw, 0.5f), nw, 0.5f, NULL},
                   {"b2", cf_rand(GG_BG * GG_M, 1), GG_BG * GG_M, 1, NULL}};
    float *xs[5] = {in[0].x, in[1].x, in[2].x, in[3].x, in[4].x};
    gg_bufs B = gg_forward(xs);
    cf_buf dy = f0("dy", gy, na), dh = f0("dh", NULL, nh), da = f0("da", NULL, na);
    cf_buf dw1 = f0("dw1", NULL, nw), db1 = f0("db1", NULL, GG_BG * GG_F), dw2 = f0("dw2", NULL, nw);
    cf_buf db2 = f0("db2", NULL, GG_BG * GG_M);
    gg_wgrad(&B.cnt, &dy, GG_M, &B.act, GG_F, &dw2, &db2); // dw2 += dy^T act, db2 += sum dy
    dsmoe_grouped_gemm dact = gg(&B.cnt, &dy, GG_M, &B.w2, 0, &dh, GG_F);
    dact.epilogue = DSMOE_EPI_DGELU, dact.aux = D0(B.h);
    OP0(gemm_grouped, &dact);
    gg_wgrad(&B.cnt, &dh, GG_F, &B.a, GG_M, &dw1, &db1); // dw1 += dh^T a, db1 += sum dh
    dsmoe_grouped_gemm dx = gg(&B.cnt, &dh, GG_F, &B.w1, 0, &da, GG_M);
    OP0(gemm_grouped, &dx);
    const float *grad[5] = {cf_get(&da, 0), cf_get(&dw1, 0), cf_get(&db1, 0), cf_get(&dw2, 0), cf_get(&db2, 0)};
    for (int i = 0; i < 5; i++)
        fd_check(gg_phi, &O, in, 5, i, grad[i]);
}

// ---------------------------------------------------------------------------------------------------
// gating: L(logits) = sum_{s,k} dweight[s,k] weight[s,k] + daux l_aux, l_aux = E sum_e (P_e/S)(N_e/S)
// from the aux_sums of the same route + assign (one rank: its sums are the reduced ones). The choices
// and slots must not move under the step: logits spread 0.6 apart per row (+- 0.1), a step <= 0.01.

typedef struct gt_case {
    int S, E, K, C;
    float dweight; // dweight ~ U(-x, x); 0 leaves l_aux alone (its term is ~1% of the weights' otherwise)
} gt_case;
#define GT_DAUX 0.3f

typedef struct gt_op {
    const gt_case *G;
    const float *dweight;        // (S, K)
    const int32_t *choice, *slot; // (S, K) at the point of the backward
} gt_op;

static dsmoe_gating_params gt_params(const gt_case *G) {
    return (dsmoe_gating_params){.S = G->S, .E = G->E, .K = G->K, .noise = DSMOE_NOISE_NONE, .seed = 0xFDull};
}

typedef struct gt_bufs {
    cf_buf probs, choice, slot, weight, aux;
} gt_bufs;

static gt_bufs gt_forward(const gt_case *G, const float *logits) {
    size_t se = (size_t)G->S * G->E, sk = (size_t)G->S * G->K;
    cf_buf lg = f0("logits", logits, se), counts = up0("counts", NULL, G->E, DSMOE_INT32);
    cf_buf kept = up0("kept", NULL, G->E, DSMOE_INT32);
    gt_bufs B = {f0("probs", NULL, se), up0("choice", NULL, sk, DSMOE_INT32), up0("slot", NULL, sk, DSMOE_INT32),
                 f0("weight", NULL, sk), up0("aux_sums", NULL, 2 * (size_t)G->E + 1, DSMOE_FLOAT64)};
    dsmoe_gating_params p = gt_params(G);
    OP0(gate_route, &p, D0(lg), D0(B.probs), D0(B.choice), D0(counts));
    OP0(gate_assign, &p, G->C, D0(B.probs), D0(B.choice), D0(B.slot), D0(B.weight), D0(kept), D0(B.aux));
    return B;
}

static double gt_phi(const void *op, float *const *x, double *mag) {
    const gt_op *O = op;
    const gt_case *G = O->G;
    size_t sk = (size_t)G->S * G->K;
    gt_bufs B = gt_forward(G, x[0]);
    const int32_t *ch = cf_get_raw(&B.choice, 0, sk * 4), *sl = cf_get_raw(&B.slot, 0, sk * 4);
    if (memcmp(ch, O->choice, sk * 4) || memcmp(sl, O->slot, sk * 4))
        cf_abort("the choices or slots moved under the step: the logits lack margin (a bug of this check)");
    const double *aux = cf_get_raw(&B.aux, 0, (2 * (size_t)G->E + 1) * 8);
    double l = 0, St = aux[2 * G->E];
    for (int e = 0; e < G->E; e++)
        l += aux[e] * aux[G->E + e];
    l = St > 0 ? l * G->E / (St * St) : 0;
    *mag += fabs(GT_DAUX * l);
    return dotg(O->dweight, cf_get(&B.weight, 0), sk, NULL, mag) + GT_DAUX * l;
}

static void v_gate(const void *arg) {
    const gt_case *G = arg;
    int S = G->S, E = G->E;
    size_t se = (size_t)S * E, sk = (size_t)S * G->K;
    float *hl = cf_host(se * sizeof *hl);
    for (int s = 0; s < S; s++) { // a random permutation of levels 0.6 apart, + U(-0.1, 0.1)
        int perm[32];
        for (int e = 0; e < E; e++)
            perm[e] = e;
        for (int e = E - 1; e > 0; e--) {
            int j = (int)(cf_rand_u64() % (uint64_t)(e + 1)), t = perm[e];
            perm[e] = perm[j], perm[j] = t;
        }
        for (int e = 0; e < E; e++)
            hl[(size_t)s * E + perm[e]] = 0.6f * (e - E / 2) + 0.2f * cf_uniform() - 0.1f;
    }
    fd_in in = {"logits", hl, se, 1, NULL};
    gt_bufs B = gt_forward(G, hl);
    gt_op O = {G, cf_rand(sk, G->dweight), cf_get_raw(&B.choice, 0, sk * 4), cf_get_raw(&B.slot, 0, sk * 4)};
    int dropped = 0;
    for (size_t i = 0; i < sk; i++)
        dropped += O.slot[i] < 0;
    cf_note("%s: %d of %zu choices dropped", cf_check_name(), dropped, sk);
    cf_buf dweight = f0("dweight", O.dweight, sk), dl = f0("dlogits", NULL, se);
    dsmoe_gating_params p = gt_params(G);
    OP0(gate_backward, &p, D0(dl), D0(B.probs), D0(B.choice), D0(B.slot), D0(dweight), D0(B.aux), GT_DAUX);
    fd_check(gt_phi, &O, &in, 1, 0, cf_get(&dl, 0));
}

// ---------------------------------------------------------------------------------------------------

void cf_group_fd(void) {
    char name[160];
    snprintf(name, sizeof name, "fd_layernorm[f32,S=%d,M=%d,eps=1e-5]", LN_S, LN_M);
    cf_run(name, v_layernorm, NULL);
    snprintf(name, sizeof name, "fd_gelu[f32,n=%d,in=U(-3,3)]", GE_N);
    cf_run(name, v_gelu, NULL);
    snprintf(name, sizeof name, "fd_attention[f32,B=%d,T=%d,NH=%d,D=%d]", ATT.B, ATT.T, ATT.NH, ATT.M / ATT.NH);
    cf_run(name, v_attention, NULL);
    snprintf(name, sizeof name, "fd_crossentropy[f32,S=%d,V=%d,dloss=%g]", CE_S, CE_V, CE_DLOSS);
    cf_run(name, v_crossentropy, NULL);
    snprintf(name, sizeof name, "fd_residual_mix[f32,S=%d,M=%d]", RM_S, RM_M);
    cf_run(name, v_residual_mix, NULL);
    snprintf(name, sizeof name, "fd_embedding[f32,B=%d,T=%d,M=%d,V=%d]", EB_B, EB_T, EB_M, EB_V);
    cf_run(name, v_embedding, NULL);
    snprintf(name, sizeof name, "fd_bias_add[f32,rows=%d,n=%d]", BA_R, BA_N);
    cf_run(name, v_bias, NULL);
    snprintf(name, sizeof name, "fd_moe_combine[f32,S=%d,E=%d,K=%d,C=%d,M=%d]", MX_S, MX_E, MX_K, MX_C, MX_M);
    cf_run(name, v_combine, NULL);
    snprintf(name, sizeof name, "fd_moe_dispatch[f32,S=%d,E=%d,K=%d,C=%d,M=%d]", MX_S, MX_E, MX_K, MX_C, MX_M);
    cf_run(name, v_dispatch, NULL);
    snprintf(name, sizeof name, "fd_experts[f32,BIAS_GELU+BIAS/DGELU+wgrad,G=%d,bg=%d,mmax=%d,M=%d,F=%d,"
             "counts=5,0,3,6]", GG_G, GG_BG, GG_MM, GG_M, GG_F);
    cf_run(name, v_experts, NULL);
    static const gt_case gc[] = {{24, 6, 1, 3, 1}, {24, 6, 2, 6, 1}, {24, 6, 2, 6, 0}};
    for (size_t i = 0; i < sizeof gc / sizeof *gc; i++) {
        snprintf(name, sizeof name, "fd_gate_backward[S=%d,E=%d,K=%d,C=%d,daux=%g%s]", gc[i].S, gc[i].E, gc[i].K,
                 gc[i].C, GT_DAUX, gc[i].dweight == 0 ? ",dweight=0" : "");
        cf_run(name, v_gate, &gc[i]);
    }
}
