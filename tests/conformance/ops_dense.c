// tests/conformance/ops_dense.c: conformance checks of the GEMMs (plain, grouped with epilogues, grouped
// weight gradients), the element-wise and small ops (bias, axpy, noise, reductions, finiteness,
// conversion, initialisation) and the multi-tensor AdamW.
// defines: cf_group_gemm, cf_group_grouped, cf_group_wgrad, cf_group_elementwise, cf_group_adamw
//
// Memory an op must not touch holds a sentinel (SENTINEL, exact in bfloat16) and is compared bit for
// bit; memory an op must not READ (padding columns, rows beyond a group's count, unused gaps between
// groups) holds NaN, so that reading it poisons a result that is compared.
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "conformance.h"

#define SENTINEL (-768.0f)
static const char *dtn(dsmoe_dtype t) { return t == CF_BF16 ? "bf16" : t == CF_F32 ? "f32" : dsmoe_dtype_name(t); }

// A (rows, cols) block with leading dimension ld: random in [-scale, scale), `pad` in the other columns.
static float *padded(size_t rows, size_t cols, size_t ld, float scale, float pad) {
    float *h = cf_fill(rows * ld, pad);
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++)
            h[r * ld + c] = scale * (2.0f * cf_uniform() - 1.0f);
    return h;
}

static unsigned char *region(size_t total, size_t rows, size_t cols, size_t ld, size_t offset) {
    unsigned char *m = cf_host(total ? total : 1);
    for (size_t r = 0; r < rows; r++)
        memset(m + offset + r * ld, 1, cols);
    return m;
}

// Candidate determinism (DSMOE_KCAP_DETERMINISTIC): two runs of the same call give the same bits.
static void same_bits(const char *what, const cf_buf *a, const cf_buf *b) {
    if (!(cf_sides[0].T->caps & DSMOE_KCAP_DETERMINISTIC)) return;
    size_t bytes = a->n * dsmoe_dtype_size(a->dt);
    const unsigned char *x = cf_get_raw(a, 0, bytes), *y = cf_get_raw(b, 0, bytes);
    for (size_t i = 0; i < bytes; i++)
        if (x[i] != y[i]) {
            cf_fail(what, "DSMOE_KCAP_DETERMINISTIC: a second identical call differs at byte %zu (element %zu)", i,
                    i / dsmoe_dtype_size(a->dt));
            return;
        }
    cf_pass(what, "bitwise equal over two identical calls (n=%zu)", a->n);
}

// ---------------------------------------------------------------------------------------------------
// gemm: c (m, n) = alpha op(a) op(b) + beta c

typedef struct gemm_case {
    int ta, tb, m, n, k, pad;
    float alpha, beta;
    dsmoe_dtype dt, ct; // a and b; c
} gemm_case;

static void v_gemm(const void *arg) {
    const gemm_case *G = arg;
    int ar = G->ta ? G->k : G->m, ac = G->ta ? G->m : G->k; // a as stored
    int br = G->tb ? G->n : G->k, bc = G->tb ? G->k : G->n;
    int lda = (ac > 0 ? ac : 1) + G->pad, ldb = (bc > 0 ? bc : 1) + G->pad, ldc = G->n + G->pad;
    float *ha = padded(ar, ac, lda, 1.0f, NAN), *hb = padded(br, bc, ldb, 1.0f, NAN);
    // c: random where it is read (beta != 0), NaN where BLAS must not read it (beta == 0), the sentinel
    // in the padding columns the GEMM must not write
    float *hc = padded(G->m, G->n, ldc, 1.0f, SENTINEL);
    if (G->beta == 0.0f)
        for (int r = 0; r < G->m; r++)
            for (int j = 0; j < G->n; j++)
                hc[(size_t)r * ldc + j] = NAN;
    cf_buf a = cf_up("a", ha, (size_t)ar * lda, G->dt), b = cf_up("b", hb, (size_t)br * ldb, G->dt);
    cf_buf c = cf_up("c", hc, (size_t)G->m * ldc, G->ct);
    c.cols = ldc;
    CF_SIDES {
        const dsmoe_kernel_plugin_v3 *T = cf_sides[side].T;
        dsmoe_status st = T->gemm(cf_sides[side].c, cf_sides[side].q, G->ta, G->tb, G->m, G->n, G->k, G->alpha, P(a),
                                  DT(G->dt), lda, P(b), DT(G->dt), ldb, G->beta, P(c), DT(G->ct), ldc);
        if (side == 0 && st == DSMOE_ERR_UNSUPPORTED && G->dt != G->ct)
            cf_abandon_skip("mixed operand types %s/%s refused as unsupported: %s", dtn(G->dt), dtn(G->ct),
                            T->last_error(cf_sides[0].c));
        cf_op(side, "gemm", st);
    }
    unsigned char *mask = region(c.n, G->m, G->n, ldc, 0);
    cf_tol tol = G->ct == CF_BF16 ? TOL_BF16 : G->dt == CF_BF16 ? TOL_F32_OF_BF16 : cf_tol_gemm(G->dt, TOL_RED);
    cf_cmp(&c, NULL, mask, tol);
    cf_cmp_untouched(&c, mask, SENTINEL);
}

void cf_group_gemm(void) {
    gemm_case cases[32];
    int n = 0;
    for (int t = 0; t < 4; t++)
        for (int beta = 0; beta < 2; beta++)
            cases[n++] = (gemm_case){t >> 1, t & 1, 37, 53, 29, 3, 0.75f, (float)beta, CF_F32, CF_F32};
    cases[n++] = (gemm_case){0, 0, 257, 130, 300, 0, 1.0f, 0.0f, CF_F32, CF_F32};
    cases[n++] = (gemm_case){1, 0, 130, 257, 300, 1, 0.5f, 1.0f, CF_F32, CF_F32};
    cases[n++] = (gemm_case){0, 1, 1, 64, 100, 0, 1.0f, 0.0f, CF_F32, CF_F32};
    cases[n++] = (gemm_case){0, 0, 64, 1, 100, 2, 1.0f, 1.0f, CF_F32, CF_F32};
    cases[n++] = (gemm_case){0, 0, 5, 7, 0, 1, 1.0f, 0.5f, CF_F32, CF_F32}; // k = 0: c = beta c
    if (cf_cand_dtype(CF_BF16)) {
        for (int t = 0; t < 4; t++)
            cases[n++] = (gemm_case){t >> 1, t & 1, 37, 53, 29, 3, 0.75f, (float)(t & 1), CF_BF16, CF_BF16};
        cases[n++] = (gemm_case){0, 0, 257, 130, 300, 0, 1.0f, 0.0f, CF_BF16, CF_BF16};
        cases[n++] = (gemm_case){0, 1, 37, 53, 29, 1, 1.0f, 1.0f, CF_BF16, CF_F32}; // mixed: skipped if refused
    }
    for (int i = 0; i < n; i++) {
        const gemm_case *G = &cases[i];
        char name[160];
        snprintf(name, sizeof name, "gemm[%s%s%s,%c%c,%dx%dx%d,ld+%d,alpha=%g,beta=%g]", dtn(G->dt),
                 G->ct != G->dt ? "->" : "", G->ct != G->dt ? dtn(G->ct) : "", G->ta ? 'T' : 'N', G->tb ? 'T' : 'N',
                 G->m, G->n, G->k, G->pad, G->alpha, G->beta);
        cf_run(name, v_gemm, G);
    }
}

// ---------------------------------------------------------------------------------------------------
// gemm_grouped: per group c_g = alpha a_g op(b_w) + beta c_g, then the epilogue, rows < counts[g] only

typedef struct gg_case {
    int groups, m_max, n, k, bg, tb, epi, pad;
    float alpha, beta;
    int counts[8];
    dsmoe_dtype dt;
} gg_case;

static const char *epi_name[] = {"NONE", "BIAS", "BIAS_GELU", "DGELU"};

static void v_grouped(const void *arg) {
    const gg_case *G = arg;
    const int groups = G->groups, mm = G->m_max, n = G->n, k = G->k, pad = G->pad;
    const int lda = k + pad, bcols = G->tb ? k : n, brows = G->tb ? n : k, ldb = bcols + pad, ldc = n + pad;
    const size_t as = (size_t)mm * lda + pad, bs = (size_t)brows * ldb + pad, cs = (size_t)mm * ldc + pad;
    const size_t bias_s = (size_t)n + pad;
    const int has_bias = G->epi == DSMOE_EPI_BIAS || G->epi == DSMOE_EPI_BIAS_GELU;
    float *ha = cf_fill(groups * as, NAN), *hb = cf_fill(G->bg * bs, NAN), *hbias = cf_fill(G->bg * bias_s, NAN);
    float *hc = cf_fill(groups * cs, SENTINEL);
    float *haux = cf_fill(groups * cs, G->epi == DSMOE_EPI_DGELU ? NAN : SENTINEL);
    // mask: compared (rows below the count); writable: every group's m_max rows of n columns (rows from the
    // count on are unspecified afterwards: a plugin may compute the whole capacity); the rest is untouched.
    unsigned char *mask = cf_host(groups * cs), *writable = cf_host(groups * cs);
    for (int g = 0; g < groups; g++)
        for (int r = 0; r < mm; r++)
            memset(writable + g * cs + (size_t)r * ldc, 1, (size_t)n);
    for (int g = 0; g < groups; g++)
        for (int r = 0; r < G->counts[g]; r++) {
            for (int j = 0; j < k; j++)
                ha[g * as + (size_t)r * lda + j] = 2.0f * cf_uniform() - 1.0f;
            for (int j = 0; j < n; j++) {
                size_t i = g * cs + (size_t)r * ldc + j;
                mask[i] = 1;
                hc[i] = G->beta != 0.0f ? 2.0f * cf_uniform() - 1.0f : NAN; // beta = 0: c is not read
                if (G->epi == DSMOE_EPI_DGELU) haux[i] = 6.0f * cf_uniform() - 3.0f;
            }
        }
    for (int w = 0; w < G->bg; w++) {
        for (int r = 0; r < brows; r++)
            for (int j = 0; j < bcols; j++)
                hb[w * bs + (size_t)r * ldb + j] = 2.0f * cf_uniform() - 1.0f;
        for (int j = 0; j < n; j++)
            hbias[w * bias_s + j] = 2.0f * cf_uniform() - 1.0f;
    }
    int32_t cnt[8];
    for (int g = 0; g < groups; g++)
        cnt[g] = G->counts[g];
    cf_buf counts = cf_up_i32("counts", cnt, groups);
    cf_buf a = cf_up("a", ha, groups * as, G->dt), b = cf_up("b", hb, G->bg * bs, G->dt);
    cf_buf bias = cf_up("bias", hbias, G->bg * bias_s, CF_F32);
    cf_buf c = cf_up("c", hc, groups * cs, G->dt), aux = cf_up("aux", haux, groups * cs, G->dt);
    c.cols = aux.cols = ldc;
    CF_SIDES {
        dsmoe_grouped_gemm d = {.groups = groups, .counts = P(counts), .m_max = mm, .n = n, .k = k,
                                .alpha = G->alpha, .beta = G->beta,
                                .a = P(a), .a_type = DT(G->dt), .lda = lda, .a_stride = as,
                                .b = P(b), .b_type = DT(G->dt), .ldb = ldb, .b_stride = bs, .b_groups = G->bg,
                                .trans_b = G->tb,
                                .c = P(c), .c_type = DT(G->dt), .ldc = ldc, .c_stride = cs,
                                .epilogue = (dsmoe_epilogue)G->epi,
                                .bias = has_bias ? P(bias) : NULL, .bias_stride = bias_s,
                                .aux = G->epi >= DSMOE_EPI_BIAS_GELU ? P(aux) : NULL};
        OP(gemm_grouped, &d);
        SCRIBBLE(d);
    }
    cf_tol tol = cf_tol_for(G->dt, cf_tol_gemm(G->dt, TOL_RED));
    cf_cmp(&c, NULL, mask, tol);
    cf_cmp_untouched(&c, writable, SENTINEL); // padding columns, gaps between groups
    if (G->epi == DSMOE_EPI_BIAS_GELU) {
        cf_cmp(&aux, NULL, mask, tol);
        cf_cmp_untouched(&aux, writable, SENTINEL);
    }
}

void cf_group_grouped(void) {
    gg_case cases[48];
    int n = 0;
    const gg_case base = {5, 24, 40, 33, 5, 0, 0, 2, 0.9f, 0.0f, {0, 24, 7, 1, 21}, CF_F32};
    for (int epi = 0; epi < 4; epi++)
        for (int tb = 0; tb < 2; tb++)
            for (int beta = 0; beta < 2; beta++) {
                gg_case c = base;
                c.epi = epi, c.tb = tb, c.beta = (float)beta, c.bg = (tb ^ beta) ? 2 : 5; // b_groups < groups too
                cases[n++] = c;
            }
    cases[n++] = (gg_case){3, 150, 200, 96, 3, 1, DSMOE_EPI_BIAS_GELU, 0, 1.0f, 0.0f, {150, 0, 77}, CF_F32};
    cases[n++] = (gg_case){3, 150, 200, 96, 1, 0, DSMOE_EPI_DGELU, 1, 1.0f, 1.0f, {77, 150, 0}, CF_F32};
    cases[n++] = (gg_case){4, 8, 16, 8, 4, 0, DSMOE_EPI_BIAS, 1, 1.0f, 1.0f, {0, 0, 0, 0}, CF_F32}; // no rows
    // ldc and the group stride multiples of 8 (a cuBLASLt epilogue's aux needs them), weights in rounds of
    // 2 over 5 groups (the last round shorter): the shapes a fused-epilogue path takes.
    const gg_case lt = {5, 24, 40, 33, 2, 0, 0, 8, 1.0f, 0.0f, {3, 24, 0, 17, 9}, CF_F32};
    for (int epi = 0; epi < 4; epi++)
        for (int tb = 0; tb < 2; tb++) {
            gg_case c = lt;
            c.epi = epi, c.tb = tb, c.beta = (float)tb;
            cases[n++] = c;
        }
    if (cf_cand_dtype(CF_BF16)) {
        for (int epi = 0; epi < 4; epi++)
            for (int v = 0; v < 2; v++) {
                gg_case c = base;
                c.dt = CF_BF16, c.epi = epi, c.tb = !v, c.beta = (float)v, c.bg = v ? 5 : 2;
                cases[n++] = c;
            }
        cases[n++] = (gg_case){3, 150, 200, 96, 3, 1, DSMOE_EPI_BIAS_GELU, 0, 1.0f, 0.0f, {150, 0, 77}, CF_BF16};
        for (int epi = 0; epi < 4; epi++) {
            gg_case c = lt;
            c.dt = CF_BF16, c.epi = epi, c.tb = epi & 1, c.beta = (float)!(epi & 1);
            cases[n++] = c;
        }
    }
    for (int i = 0; i < n; i++) {
        const gg_case *G = &cases[i];
        char name[200], cnt[64] = "";
        for (int g = 0; g < G->groups; g++)
            snprintf(cnt + strlen(cnt), sizeof cnt - strlen(cnt), "%s%d", g ? "/" : "", G->counts[g]);
        snprintf(name, sizeof name, "gemm_grouped[%s,%s,tb=%d,beta=%g,G=%d,bg=%d,mmax=%d,n=%d,k=%d,counts=%s]",
                 dtn(G->dt), epi_name[G->epi], G->tb, G->beta, G->groups, G->bg, G->m_max, G->n, G->k, cnt);
        cf_run(name, v_grouped, G);
    }
}

// ---------------------------------------------------------------------------------------------------
// gemm_grouped_wgrad: dw_w += alpha dy_g^T x_g, dbias_w += column sums of dy_g, rows < counts[g] only

typedef struct wg_case {
    int groups, m_max, n, k, bg, dbias, pad;
    float alpha;
    int counts[8];
    dsmoe_dtype dt;
} wg_case;

static void v_wgrad(const void *arg) {
    const wg_case *G = arg;
    const int groups = G->groups, mm = G->m_max, n = G->n, k = G->k, pad = G->pad;
    const size_t dys = (size_t)mm * n + pad, xs = (size_t)mm * k + pad, dws = (size_t)n * k + pad, dbs = (size_t)n + pad;
    float *hdy = cf_fill(groups * dys, NAN), *hx = cf_fill(groups * xs, NAN); // rows >= counts: garbage NaN
    for (int g = 0; g < groups; g++)
        for (int r = 0; r < G->counts[g]; r++) {
            for (int j = 0; j < n; j++)
                hdy[g * dys + (size_t)r * n + j] = 2.0f * cf_uniform() - 1.0f;
            for (int j = 0; j < k; j++)
                hx[g * xs + (size_t)r * k + j] = 2.0f * cf_uniform() - 1.0f;
        }
    int W = G->bg < groups ? G->bg : groups; // weights that receive a group
    float *hdw = cf_fill(G->bg * dws, SENTINEL), *hdb = cf_fill(G->bg * dbs, SENTINEL);
    unsigned char *mw = cf_host(G->bg * dws), *mb = cf_host(G->bg * dbs);
    for (int w = 0; w < W; w++) {
        for (size_t i = 0; i < (size_t)n * k; i++)
            hdw[w * dws + i] = 2.0f * cf_uniform() - 1.0f, mw[w * dws + i] = 1;
        for (int j = 0; j < n; j++)
            hdb[w * dbs + j] = 2.0f * cf_uniform() - 1.0f, mb[w * dbs + j] = 1;
    }
    int32_t cnt[8];
    for (int g = 0; g < groups; g++)
        cnt[g] = G->counts[g];
    cf_buf counts = cf_up_i32("counts", cnt, groups);
    cf_buf dy = cf_up("dy", hdy, groups * dys, G->dt), x = cf_up("x", hx, groups * xs, G->dt);
    cf_buf dw = cf_up("dw", hdw, G->bg * dws, CF_F32), db = cf_up("dbias", hdb, G->bg * dbs, CF_F32);
    cf_buf dw2 = cf_up("dw(2nd)", hdw, G->bg * dws, CF_F32), db2 = cf_up("dbias(2nd)", hdb, G->bg * dbs, CF_F32);
    dw.cols = k;
    int runs = (cf_sides[0].T->caps & DSMOE_KCAP_DETERMINISTIC) ? 2 : 1;
    CF_SIDES for (int run = 0; run < (side == 0 ? runs : 1); run++) {
        dsmoe_grouped_wgrad d = {.groups = groups, .counts = P(counts), .m_max = mm, .n = n, .k = k, .alpha = G->alpha,
                                 .dy = P(dy), .dy_type = DT(G->dt), .dy_stride = dys,
                                 .x = P(x), .x_type = DT(G->dt), .x_stride = xs,
                                 .dw = run ? P(dw2) : P(dw), .dw_stride = dws, .b_groups = G->bg,
                                 .dbias = G->dbias ? (run ? P(db2) : P(db)) : NULL, .dbias_stride = dbs};
        OP(gemm_grouped_wgrad, &d);
        SCRIBBLE(d);
    }
    cf_tol tol = G->dt == CF_BF16 ? TOL_F32_OF_BF16 : cf_tol_gemm(G->dt, TOL_RED);
    cf_cmp(&dw, dw.h, mw, tol);
    cf_cmp_untouched(&dw, mw, SENTINEL);
    cf_cmp(&db, db.h, mb, tol);
    cf_cmp_untouched(&db, mb, SENTINEL);
    if (runs == 2) {
        same_bits("dw(determinism)", &dw, &dw2);
        if (G->dbias) same_bits("dbias(determinism)", &db, &db2);
    }
}

void cf_group_wgrad(void) {
    wg_case cases[16];
    int n = 0;
    cases[n++] = (wg_case){5, 24, 40, 33, 5, 1, 2, 1.0f, {0, 24, 7, 1, 13}, CF_F32};
    cases[n++] = (wg_case){5, 24, 40, 33, 2, 1, 2, 0.5f, {0, 24, 7, 1, 13}, CF_F32};
    cases[n++] = (wg_case){5, 24, 40, 33, 2, 0, 2, 1.0f, {3, 0, 24, 24, 1}, CF_F32};
    cases[n++] = (wg_case){4, 300, 96, 130, 4, 1, 1, 1.0f, {300, 0, 123, 1}, CF_F32};
    cases[n++] = (wg_case){6, 64, 48, 40, 1, 1, 0, 1.0f, {64, 3, 0, 64, 17, 64}, CF_F32};
    if (cf_cand_dtype(CF_BF16)) {
        cases[n++] = (wg_case){5, 24, 40, 33, 5, 1, 2, 1.0f, {0, 24, 7, 1, 13}, CF_BF16};
        cases[n++] = (wg_case){5, 24, 40, 33, 2, 1, 2, 0.5f, {0, 24, 7, 1, 13}, CF_BF16};
        cases[n++] = (wg_case){4, 300, 96, 130, 4, 1, 1, 1.0f, {300, 0, 123, 1}, CF_BF16};
    }
    for (int i = 0; i < n; i++) {
        const wg_case *G = &cases[i];
        char name[200], cnt[64] = "";
        for (int g = 0; g < G->groups; g++)
            snprintf(cnt + strlen(cnt), sizeof cnt - strlen(cnt), "%s%d", g ? "/" : "", G->counts[g]);
        snprintf(name, sizeof name, "gemm_grouped_wgrad[%s,G=%d,bg=%d,mmax=%d,n=%d,k=%d,alpha=%g,%s,counts=%s]",
                 dtn(G->dt), G->groups, G->bg, G->m_max, G->n, G->k, G->alpha, G->dbias ? "dbias" : "no_dbias", cnt);
        cf_run(name, v_wgrad, G);
    }
}

// ---------------------------------------------------------------------------------------------------
// element-wise and small ops

typedef struct ew_case {
    int rows, n;
    dsmoe_dtype dt;
    int which; // variant of the op (see each)
} ew_case;

static void v_bias_add(const void *arg) {
    const ew_case *E = arg;
    cf_buf out = cf_up("out", cf_rand((size_t)E->rows * E->n, 1), (size_t)E->rows * E->n, E->dt);
    cf_buf bias = cf_up("bias", cf_rand(E->n, 1), E->n, CF_F32);
    out.cols = E->n;
    CF_SIDES OP(bias_add, P(out), DT(E->dt), P(bias), E->rows, E->n);
    cf_cmp(&out, out.h, NULL, cf_tol_for(E->dt, TOL_EW));
}

static void v_bias_backward(const void *arg) {
    const ew_case *E = arg;
    size_t sz = (size_t)E->rows * E->n;
    cf_buf dout = cf_up("dout", cf_rand(sz, 1), sz, E->dt);
    cf_buf db = cf_up("dbias", cf_rand(E->n, 1), E->n, CF_F32), db2 = cf_up("dbias(2nd)", db.h, E->n, CF_F32);
    CF_SIDES OP(bias_backward, P(db), P(dout), DT(E->dt), E->rows, E->n);
    cf_cmp(&db, db.h, NULL, E->dt == CF_BF16 ? TOL_F32_OF_BF16 : TOL_RED);
    if (cf_sides[0].T->caps & DSMOE_KCAP_DETERMINISTIC) {
        int side = 0;
        OP(bias_backward, P(db2), P(dout), DT(E->dt), E->rows, E->n);
        same_bits("dbias(determinism)", &db, &db2);
    }
}

static void v_axpy(const void *arg) {
    const ew_case *E = arg;
    cf_buf y = cf_up("y", cf_rand(E->n, 1), E->n, E->dt), x = cf_up("x", cf_rand(E->n, 1), E->n, E->dt);
    CF_SIDES OP(axpy, P(y), -0.7f, P(x), DT(E->dt), (size_t)E->n);
    cf_cmp(&y, y.h, NULL, cf_tol_for(E->dt, TOL_EW));
}

static void v_noise(const void *arg) {
    const ew_case *E = arg;
    cf_buf in = cf_up("in", cf_rand(E->n, 2), E->n, E->dt), out = cf_out("out", E->n, E->dt);
    CF_SIDES OP(mul_uniform_noise, P(out), P(in), DT(E->dt), (size_t)E->n, 0.1f, 0x1234ull, 5000000000ull);
    cf_cmp(&out, NULL, NULL, cf_tol_for(E->dt, TOL_EW));
}

static void v_sum_squares(const void *arg) {
    const ew_case *E = arg;
    cf_buf x = cf_up("x", cf_rand(E->n, 1.5f), E->n, CF_F32), out = cf_out("out", 1, DSMOE_FLOAT64);
    CF_SIDES OP(sum_squares, P(x), (size_t)E->n, P(out));
    // float32 squares summed in double: only the order differs (a float32 accumulator would not pass)
    cf_cmp_f64(&out, "out", 0, 1, 1e-7, 0);
}

static void v_all_finite(const void *arg) {
    const ew_case *E = arg;
    if (!CF_HAS(0, all_finite)) cf_abandon_skip("the candidate has no all_finite (optional)");
    float *h = cf_rand(E->n, 100);
    if (E->n > 0) h[E->n / 3] = E->dt == CF_BF16 ? 3.0e38f : FLT_MAX; // large but finite
    if (E->which == 1) h[E->n - 1] = INFINITY;
    if (E->which == 2) h[0] = NAN;
    if (E->which == 3) h[E->n / 2] = -INFINITY;
    cf_buf x = cf_up("x", h, E->n, E->dt), out = cf_out("out", 1, DSMOE_INT32);
    CF_SIDES OP(all_finite, P(x), DT(E->dt), (size_t)E->n, P(out));
    cf_cmp_i32(&out, NULL);
}

// convert, bit for bit (round to nearest even). Buffers are raw 2-byte (FLOAT16-sized) on both sides so
// that the reference also holds bfloat16 bits.
static void v_convert(const void *arg) {
    const ew_case *E = arg;
    if (!CF_HAS(0, convert)) cf_abandon_skip("the candidate has no convert (optional)");
    dsmoe_dtype src_t = E->which == 1 ? CF_BF16 : CF_F32, dst_t = E->which == 0 ? CF_BF16 : CF_F32;
    size_t n;
    cf_buf src, dst;
    if (E->which == 1) { // every bfloat16 bit pattern to float32
        n = 65536;
        uint16_t *h = cf_host(n * 2);
        for (size_t i = 0; i < n; i++)
            h[i] = (uint16_t)i;
        src = cf_out("src", n, DSMOE_FLOAT16);
        CF_SIDES cf_op(side, "copy_to_device",
                       cf_sides[side].T->copy_to_device(cf_sides[side].c, cf_sides[side].q, P(src), h, n * 2));
    } else { // float32: ties, rounding carries, overflow to Inf, denormals, NaN, then random values
        static const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0x3f808001u, 0xbf808000u, 0x3f80ffffu,
                                           0x7f7fffffu, 0x7f7f7fffu, 0xff7fffffu, 0x7f800000u, 0xff800000u,
                                           0x7fc00000u, 0x7f800001u, 0xffc00001u, 0x00000000u, 0x80000000u,
                                           0x00000001u, 0x00008000u, 0x00018000u, 0x007fffffu, 0x00800000u};
        size_t ns = sizeof special / sizeof *special;
        n = 4096;
        float *h = cf_rand(n, 1000);
        for (size_t i = 0; i < ns; i++)
            memcpy(&h[i], &special[i], 4);
        for (size_t i = ns; i < n; i += 7) // exact ties of random values
            h[i] = cf_bf2f(cf_f2bf(h[i])) + ldexpf(1.0f, ilogbf(h[i]) - 8);
        src = cf_out("src", n, CF_F32);
        CF_SIDES cf_op(side, "copy_to_device",
                       cf_sides[side].T->copy_to_device(cf_sides[side].c, cf_sides[side].q, P(src), h, n * 4));
    }
    dst = cf_out("dst", n, dst_t == CF_BF16 ? DSMOE_FLOAT16 : CF_F32);
    CF_SIDES {
        dsmoe_status st = cf_sides[side].T->convert(cf_sides[side].c, cf_sides[side].q, P(dst), dst_t, P(src), src_t, n);
        if (side == 0 && st == DSMOE_ERR_UNSUPPORTED && !cf_cand_dtype(CF_BF16) && (src_t == CF_BF16 || dst_t == CF_BF16))
            cf_abandon_skip("bfloat16 conversion refused, and the candidate does not declare bfloat16");
        cf_op(side, "convert", st);
    }
    size_t es = dst_t == CF_BF16 ? 2 : 4;
    const unsigned char *want = cf_get_raw(&dst, 1, n * es), *got = cf_get_raw(&dst, 0, n * es);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t g = 0, w = 0;
        memcpy(&g, got + i * es, es), memcpy(&w, want + i * es, es);
        int gnan = es == 2 ? (g & 0x7fff) > 0x7f80 : (g & 0x7fffffff) > 0x7f800000u;
        int wnan = es == 2 ? (w & 0x7fff) > 0x7f80 : (w & 0x7fffffff) > 0x7f800000u;
        if (!(g == w || (gnan && wnan)) && bad++ == 0) first = i;
    }
    if (!bad) {
        cf_pass("dst", "bit-exact (NaN as NaN) n=%zu", n);
    } else {
        uint32_t g = 0, w = 0;
        memcpy(&g, got + first * es, es), memcpy(&w, want + first * es, es);
        cf_fail("dst", "first mismatch at i=%zu got 0x%0*x want 0x%0*x; %zu of %zu differ", first, (int)es * 2, g,
                (int)es * 2, w, bad, n);
    }
}

static void v_init_tensor(const void *arg) {
    const ew_case *E = arg;
    dsmoe_init_params ip = {.key = 0xDEADBEEFull, .offset = (1ull << 33) + 7, .std = E->which ? 0.0f : 0.02f,
                            .value = -0.125f};
    cf_buf dst = cf_out("dst", E->n, CF_F32);
    CF_SIDES {
        dsmoe_init_params p = ip;
        OP(init_tensor, P(dst), (size_t)E->n, &p);
        SCRIBBLE(p);
    }
    // normal samples go through log and cos in double: a device may differ in the last float bit
    cf_cmp(&dst, NULL, NULL, E->which ? (cf_tol){0, 0} : (cf_tol){1e-5, 1e-9});
}

void cf_group_elementwise(void) {
    dsmoe_dtype dts[2] = {CF_F32, CF_BF16};
    int ndt = cf_cand_dtype(CF_BF16) ? 2 : 1;
    char name[160];
    for (int d = 0; d < ndt; d++) {
        dsmoe_dtype dt = dts[d];
        ew_case e1 = {37, 129, dt, 0}, e2 = {300, 70, dt, 0}, e3 = {1000, 768, dt, 0}, e4 = {0, 100003, dt, 0};
        ew_case e5 = {0, 10007, dt, 0};
        snprintf(name, sizeof name, "bias_add[%s,rows=37,n=129]", dtn(dt));
        cf_run(name, v_bias_add, &e1);
        snprintf(name, sizeof name, "bias_backward[%s,rows=300,n=70]", dtn(dt));
        cf_run(name, v_bias_backward, &e2);
        snprintf(name, sizeof name, "bias_backward[%s,rows=1000,n=768]", dtn(dt));
        cf_run(name, v_bias_backward, &e3);
        snprintf(name, sizeof name, "axpy[%s,n=100003,alpha=-0.7]", dtn(dt));
        cf_run(name, v_axpy, &e4);
        snprintf(name, sizeof name, "mul_uniform_noise[%s,n=10007,eps=0.1,offset=5e9]", dtn(dt));
        cf_run(name, v_noise, &e5);
        static const char *af[] = {"finite", "+Inf_last", "NaN_first", "-Inf_middle"};
        for (int w = 0; w < 4; w++) {
            ew_case e = {0, 4099, dt, w};
            snprintf(name, sizeof name, "all_finite[%s,n=4099,%s]", dtn(dt), af[w]);
            cf_run(name, v_all_finite, &e);
        }
    }
    ew_case z = {0, 0, CF_F32, 0};
    cf_run("all_finite[f32,n=0]", v_all_finite, &z);
    static const int ns[] = {(1 << 20) + 17, 5, 0};
    for (int i = 0; i < 3; i++) {
        ew_case e = {0, ns[i], CF_F32, 0};
        snprintf(name, sizeof name, "sum_squares[f32,n=%d]", ns[i]);
        cf_run(name, v_sum_squares, &e);
    }
    static const char *cv[] = {"f32->bf16", "bf16->f32(all_65536)", "f32->f32"};
    for (int w = 0; w < 3; w++) {
        ew_case e = {0, 0, CF_F32, w};
        snprintf(name, sizeof name, "convert[%s]", cv[w]);
        cf_run(name, v_convert, &e);
    }
    ew_case i0 = {0, 5003, CF_F32, 0}, i1 = {0, 1000, CF_F32, 1};
    cf_run("init_tensor[std=0.02,offset=2^33+7,n=5003]", v_init_tensor, &i0);
    cf_run("init_tensor[std=0,value=-0.125,n=1000]", v_init_tensor, &i1);
}

// ---------------------------------------------------------------------------------------------------
// adamw: three tensors of different sizes in one call, one without weight decay

static void v_adamw(const void *arg) {
    const int t = *(const int *)arg;
    enum { NT = 3 };
    static const size_t len[NT] = {4097, 37, 300007};
    static const float wd[NT] = {0.1f, 0.0f, 0.01f};
    cf_buf p[NT], g[NT], m[NT], v[NT];
    for (int i = 0; i < NT; i++) {
        static const char *pn[] = {"param0", "param1", "param2"}, *gn[] = {"grad0", "grad1", "grad2"};
        static const char *mn[] = {"m0", "m1", "m2"}, *vn[] = {"v0", "v1", "v2"};
        p[i] = cf_up(pn[i], cf_rand(len[i], 1), len[i], CF_F32);
        g[i] = cf_up(gn[i], cf_rand(len[i], 2), len[i], CF_F32);
        float *hm = t == 1 ? cf_fill(len[i], 0) : cf_rand(len[i], 0.1f), *hv = cf_fill(len[i], 0);
        if (t != 1)
            for (size_t j = 0; j < len[i]; j++)
                hv[j] = 0.01f * cf_uniform(); // second moments are >= 0
        m[i] = cf_up(mn[i], hm, len[i], CF_F32);
        v[i] = cf_up(vn[i], hv, len[i], CF_F32);
    }
    dsmoe_adamw_params hp = {.lr = 0.05f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .grad_scale = 0.5f, .t = t};
    CF_SIDES {
        dsmoe_adamw_tensor list[NT];
        for (int i = 0; i < NT; i++)
            list[i] = (dsmoe_adamw_tensor){P(p[i]), P(g[i]), P(m[i]), P(v[i]), len[i], wd[i]};
        dsmoe_adamw_params h = hp;
        OP(adamw, &h, list, NT);
        SCRIBBLE(h);
        SCRIBBLE(list);
    }
    for (int i = 0; i < NT; i++) {
        cf_cmp(&p[i], p[i].h, NULL, TOL_RED); // the update itself (param - old param), not param
        cf_cmp(&m[i], NULL, NULL, TOL_EW);
        cf_cmp(&v[i], NULL, NULL, TOL_EW);
    }
}

void cf_group_adamw(void) {
    static const int t1 = 1, t7 = 7;
    cf_run("adamw[t=1,m=v=0,n=4097/37/300007,wd=0.1/0/0.01]", v_adamw, &t1);
    cf_run("adamw[t=7,n=4097/37/300007,wd=0.1/0/0.01]", v_adamw, &t7);
}
