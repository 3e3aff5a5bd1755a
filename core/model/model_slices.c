// core/model/model_slices.c: what generation's model holds. With tensor slicing, dsmoe_infer_create
// (model_infer.c) copies this rank's slices of the sliced weights into buffers it owns
// (dsmoe_slices_take), then the model keeps of its slabs only the tensors some op still reads whole
// (dsmoe_model_keep_unsliced); in bfloat16, dsmoe_model_drop_gemm_masters then frees the float32 masters
// of what only GEMMs read. dsmoe_model_param_use and dsmoe_slices_bytes count the same from the config
// alone (dsmoe --plan, dsmoe_infer_estimate, the tests).
// Layout of this file: which tensor is what, the counts from the config, the slices, keeping tensors.
//
// Tensor slicing of width W, this rank's part t (Megatron): c_attn keeps the rows of heads
// [t NH/W, (t+1) NH/W) in each of its q, k and v blocks, with their bias (column-parallel); c_proj those
// columns (row-parallel: its bias is added once, after the tensor group's sum, so it stays whole); the
// dense FFN (and a residual MoE's MLP) rows [t F/W, (t+1) F/W) of c_fc with their bias, and those columns
// of c_proj. With expert-slicing the same for each local expert (w1 rows, b1, w2 columns), and b2 on
// tensor rank 0 only (zeros elsewhere: the group's sum adds it once). Weight slices are of the model's
// dt (the GEMM operands), bias slices float32. A GEMM on a slice reads the same values with another
// leading dimension: the numbers are those of the strided views of the whole weights.
#include "model_internal.h" // struct dsmoe_model, dsmoe_slices

#include <stdint.h> // SIZE_MAX, uintptr_t
#include <stdlib.h>
#include <string.h>

#define F32 DSMOE_FLOAT32

// ----------------------------------------------------------------------------------------------------
// which tensor is what

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

// The weight matrices that only GEMMs read (generation reads their dt copies in params_lp); every other
// tensor is read in float32 by some op (embedding, layer norm, bias, router). The tied embedding wte
// counts among them: the embedding reads its GEMM operand copy too (embedding_forward takes wte in the
// activation dtype).
static int gemm_only(const char *name) {
    static const char *const suffix[] = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                         "mlp.c_proj.weight", "moe.coefficient.weight", "moe.experts.c_fc.weight",
                                         "moe.experts.c_proj.weight"};
    if (strcmp(name, "wte.weight") == 0) return 1;
    for (size_t i = 0; i < sizeof suffix / sizeof suffix[0]; i++)
        if (ends_with(name, suffix[i])) return 1;
    return 0;
}

// The tensors tensor slicing of width W reads only as this rank's slice (the slices hold them).
static int sliced(const char *name, int W, int experts) {
    static const char *const dense[] = {"attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                                        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight"};
    static const char *const expert[] = {"moe.experts.c_fc.weight", "moe.experts.c_fc.bias",
                                         "moe.experts.c_proj.weight", "moe.experts.c_proj.bias"};
    if (W <= 1) return 0;
    for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++)
        if (ends_with(name, dense[i])) return 1;
    for (size_t i = 0; experts && i < sizeof expert / sizeof expert[0]; i++)
        if (ends_with(name, expert[i])) return 1;
    return 0;
}

// ----------------------------------------------------------------------------------------------------
// the counts from the config

// Weight matrices of `mats` elements and vectors of `vecs` (a part of one tensor kind): into the slices
// or kept.
static void use(dsmoe_param_use *u, int is_sliced, uint64_t mats, uint64_t vecs) {
    if (is_sliced) u->sliced += mats + vecs;
    else u->gemm_only += mats, u->other += vecs;
}

// The tensors of build_table (model.c), kind by kind.
void dsmoe_model_param_use(const dsmoe_config *c, int W, int expert_slicing, dsmoe_param_use *u) {
    uint64_t M = (uint64_t)c->hidden, F = (uint64_t)c->ffn_hidden;
    int ts = W > 1, es = W > 1 && expert_slicing;
    memset(u, 0, sizeof *u);
    u->gemm_only += (uint64_t)c->vocab * M;          // wte
    u->other += (uint64_t)c->seq_len * M + 2 * M;     // wpe, ln_f
    for (int l = 0; l < c->layers; l++) {
        int mi = -1, moe = dsmoe_config_is_moe_layer(c, l, &mi);
        u->other += 5 * M;                            // ln_1, ln_2, c_proj's bias
        use(u, ts, 4 * M * M, 3 * M);                 // c_attn and c_proj weights, c_attn's bias
        if (!moe || c->residual) {
            use(u, ts, 2 * M * F, F);                 // the dense FFN (or the residual MLP)
            u->other += M;                            // its c_proj's bias
        }
        if (!moe) continue;
        uint64_t E = (uint64_t)c->experts[mi], El = E / (uint64_t)c->expert_parallel[mi];
        u->other += E * M;                            // the router
        if (c->residual) u->gemm_only += 2 * M, u->other += 2; // the coefficient
        use(u, es, El * 2 * M * F, El * (F + M));     // this rank's experts
    }
}

uint64_t dsmoe_model_gemm_only_params(const dsmoe_config *c) {
    dsmoe_param_use u;
    dsmoe_model_param_use(c, 1, 0, &u);
    return u.gemm_only;
}

uint64_t dsmoe_model_generate_param_bytes(const dsmoe_config *c, int W, int expert_slicing) {
    dsmoe_param_use u;
    dsmoe_model_param_use(c, W, expert_slicing, &u);
    uint64_t gemm = dsmoe_dtype_size(dsmoe_config_act_dtype(c)); // fp32: the masters serve the GEMMs
    return u.gemm_only * gemm + u.other * sizeof(float);
}

uint64_t dsmoe_slices_bytes(const dsmoe_config *c, int W, int experts) {
    if (W <= 1) return 0;
    uint64_t M = (uint64_t)c->hidden, Mt = M / (uint64_t)W, Ft = (uint64_t)c->ffn_hidden / (uint64_t)W,
             a = dsmoe_dtype_size(dsmoe_config_act_dtype(c)), f = sizeof(float), bytes = 0;
    for (int l = 0; l < c->layers; l++) {
        int mi = -1, moe = dsmoe_config_is_moe_layer(c, l, &mi);
        bytes += 3 * Mt * M * a + 3 * Mt * f + M * Mt * a;                        // c_attn, its bias, c_proj
        if (!moe || c->residual) bytes += Ft * M * a + Ft * f + M * Ft * a;        // c_fc, its bias, c_proj
        if (moe && experts) {
            uint64_t El = (uint64_t)(c->experts[mi] / c->expert_parallel[mi]);
            bytes += El * ((Ft * M + M * Ft) * a + (Ft + M) * f);                  // w1, w2, b1, b2
        }
    }
    return bytes;
}

// ----------------------------------------------------------------------------------------------------
// the slices

static dsmoe_status slice_alloc(dsmoe_runtime *rt, dsmoe_slices *sl, size_t bytes, void *field, const char *what,
                                dsmoe_err *err) {
    void *p = NULL;
    DSMOE_TRY(dsmoe_rt_alloc(rt, bytes ? bytes : 1, 0, &p, what, err));
    memcpy(field, &p, sizeof p);
    sl->bytes += bytes;
    return DSMOE_OK;
}

// Expert-slicing of MoE layer mi (block l): the local experts' (E_local, Ft, M), (E_local, Ft),
// (E_local, M, Ft) and (E_local, M) tensors. w2's columns are not contiguous: one 2-D copy per expert.
static dsmoe_status slice_experts(dsmoe_model *m, dsmoe_slices *sl, int l, int mi, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    size_t M = (size_t)m->M, F = (size_t)m->F, Ft = F / (size_t)sl->W, f0 = (size_t)sl->t * Ft, E = m->esz;
    const dsmoe_moe_weights *w = &m->blocks[l].moe;
    dsmoe_moe_weights *o = &sl->ew[mi];
    size_t El = (size_t)(m->cfg->experts[mi] / m->epg[m->epg_of_moe[mi]].ep);
    const char *w1_src = m->dt == F32 ? (const char *)w->w1 : w->w1_lp;
    const char *w2_src = m->dt == F32 ? (const char *)w->w2 : w->w2_lp;
    if (!w1_src || !w2_src || !w->b1 || !w->b2)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "tensor slicing: block %d's experts are no longer whole in the "
                             "model", l);
    void *w1, *w2;
    DSMOE_TRY(slice_alloc(rt, sl, El * Ft * M * E, &w1, "expert slice of w1 (E_local, F/W, M)", err));
    DSMOE_TRY(slice_alloc(rt, sl, El * Ft * sizeof(float), &o->b1, "expert slice of b1 (E_local, F/W)", err));
    DSMOE_TRY(slice_alloc(rt, sl, El * M * Ft * E, &w2, "expert slice of w2 (E_local, M, F/W)", err));
    DSMOE_TRY(slice_alloc(rt, sl, El * M * sizeof(float), &o->b2, "expert bias b2 of tensor rank 0 (E_local, M)", err));
    if (m->dt == F32) o->w1 = w1, o->w2 = w2;
    else o->w1_lp = w1, o->w2_lp = w2;
    for (size_t e = 0; e < El; e++) {
        KCALL(rt, copy, (char *)w1 + e * Ft * M * E, w1_src + (e * F + f0) * M * E, Ft * M * E);
        KCALL(rt, copy, o->b1 + e * Ft, w->b1 + e * F + f0, Ft * sizeof(float));
        KCALL(rt, copy_2d, (char *)w2 + e * M * Ft * E, Ft * E, w2_src + (e * M * F + f0) * E, F * E, Ft * E, M);
    }
    if (sl->t == 0) KCALL(rt, copy, o->b2, w->b2, El * M * sizeof(float));
    else KCALL(rt, zero, o->b2, El * M * sizeof(float));
    return DSMOE_OK;
}

// A block's attention and dense FFN slices.
static dsmoe_status slice_block(dsmoe_model *m, dsmoe_slices *sl, int l, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    const block_params *p = &m->blocks[l];
    dsmoe_block_slices *b = &sl->blocks[l];
    size_t M = (size_t)m->M, Mt = M / (size_t)sl->W, h0 = (size_t)sl->t * Mt, E = m->esz;
    size_t F = (size_t)m->F, Ft = F / (size_t)sl->W, f0 = (size_t)sl->t * Ft;
    int dense = m->moe_of_layer[l] < 0 || m->cfg->residual;
    if (!p->qkvw_op || !p->qkvb || !p->attprojw_op || (dense && (!p->fcw_op || !p->fcb || !p->fcprojw_op)))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "tensor slicing: block %d's weights are no longer whole in the "
                             "model (an earlier inference state took its slices)", l);
    const char *qkvw = p->qkvw_op, *attprojw = p->attprojw_op;
    DSMOE_TRY(slice_alloc(rt, sl, 3 * Mt * M * E, &b->qkvw, "tensor slice of c_attn (3Mt, M)", err));
    DSMOE_TRY(slice_alloc(rt, sl, 3 * Mt * sizeof(float), &b->qkvb, "tensor slice of c_attn's bias (3Mt)", err));
    DSMOE_TRY(slice_alloc(rt, sl, M * Mt * E, &b->attprojw, "tensor slice of attention c_proj (M, Mt)", err));
    // q, k and v each keep rows [h0, h0 + Mt) of their (M, M) block; c_proj those columns of its M rows.
    for (size_t part = 0; part < 3; part++) {
        size_t row = part * M + h0;
        KCALL(rt, copy, (char *)b->qkvw + part * Mt * M * E, qkvw + row * M * E, Mt * M * E);
        KCALL(rt, copy, b->qkvb + part * Mt, p->qkvb + row, Mt * sizeof(float));
    }
    KCALL(rt, copy_2d, b->attprojw, Mt * E, attprojw + h0 * E, M * E, Mt * E, M);
    if (!dense) return DSMOE_OK;
    DSMOE_TRY(slice_alloc(rt, sl, Ft * M * E, &b->fcw, "tensor slice of the MLP's c_fc (Ft, M)", err));
    DSMOE_TRY(slice_alloc(rt, sl, Ft * sizeof(float), &b->fcb, "tensor slice of the MLP's c_fc bias (Ft)", err));
    DSMOE_TRY(slice_alloc(rt, sl, M * Ft * E, &b->fcprojw, "tensor slice of the MLP's c_proj (M, Ft)", err));
    KCALL(rt, copy, b->fcw, (const char *)p->fcw_op + f0 * M * E, Ft * M * E);
    KCALL(rt, copy, b->fcb, p->fcb + f0, Ft * sizeof(float));
    KCALL(rt, copy_2d, b->fcprojw, Ft * E, (const char *)p->fcprojw_op + f0 * E, F * E, Ft * E, M);
    return DSMOE_OK;
}

dsmoe_status dsmoe_slices_take(dsmoe_model *m, int W, int t, int experts, dsmoe_slices *sl, dsmoe_err *err) {
    memset(sl, 0, sizeof *sl);
    sl->W = W, sl->t = t, sl->experts = W > 1 && experts;
    if (W <= 1) return DSMOE_OK;
    int n_moe = m->cfg->n_moe_layers;
    sl->blocks = calloc((size_t)m->L, sizeof *sl->blocks);
    sl->ew = calloc((size_t)(n_moe ? n_moe : 1), sizeof *sl->ew);
    if (!sl->blocks || !sl->ew) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "tensor slicing: out of memory");
    sl->n_blocks = m->L, sl->n_ew = n_moe;
    for (int l = 0; l < m->L; l++) {
        DSMOE_TRY(slice_block(m, sl, l, err));
        int mi = m->moe_of_layer[l];
        if (sl->experts && mi >= 0) DSMOE_TRY(slice_experts(m, sl, l, mi, err));
    }
    return dsmoe_rt_wait(m->rt, err); // the copies are done before anything frees their sources
}

void dsmoe_slices_free(dsmoe_runtime *rt, dsmoe_dtype dt, dsmoe_slices *sl) {
    void (*fr)(dsmoe_kernel_ctx *, void *) = rt->kern->free;
    for (int l = 0; sl->blocks && l < sl->n_blocks; l++) {
        dsmoe_block_slices *b = &sl->blocks[l];
        void *p[] = {b->qkvw, b->qkvb, b->attprojw, b->fcw, b->fcb, b->fcprojw};
        for (size_t k = 0; k < sizeof p / sizeof p[0]; k++)
            if (p[k]) fr(rt->kctx, p[k]);
    }
    for (int i = 0; sl->ew && i < sl->n_ew; i++) {
        dsmoe_moe_weights *o = &sl->ew[i];
        void *p[] = {dt == F32 ? (void *)o->w1 : (void *)o->w1_lp, o->b1, dt == F32 ? (void *)o->w2 : (void *)o->w2_lp,
                     o->b2};
        for (size_t k = 0; k < sizeof p / sizeof p[0]; k++)
            if (p[k]) fr(rt->kctx, p[k]);
    }
    free(sl->blocks);
    free(sl->ew);
    memset(sl, 0, sizeof *sl);
}

// ----------------------------------------------------------------------------------------------------
// keeping tensors

enum { HOLD_F32 = 1, HOLD_LP = 2 };

// What the model keeps of tensor i: nothing of a sliced one (the slices hold it); the float32 master
// unless it is GEMM-only and the masters went; the dt copy of a GEMM-only one (bfloat16: the copy is
// what the GEMMs read; no op reads the copy of another tensor).
static unsigned hold_of(const dsmoe_model *m, int i) {
    const char *name = m->tensors[i].name;
    if (sliced(name, m->slice_W, m->slice_experts)) return 0;
    int g = gemm_only(name);
    return (g && m->masters_dropped ? 0u : (unsigned)HOLD_F32) | (g && m->dt != F32 ? (unsigned)HOLD_LP : 0u);
}

// Where a view into an old slab (n_old elements of esz bytes; tensor i at old_off[i]) points in the new
// one: NULL for a view of a tensor not kept, or a NULL view.
static void *remap(const dsmoe_model *m, const void *p, const void *old, size_t n_old, size_t esz,
                   const size_t *old_off, void *slab, const size_t *new_off) {
    if (!p || !old) return NULL;
    uintptr_t a = (uintptr_t)p, b = (uintptr_t)old;
    if (a < b || a >= b + n_old * esz || (a - b) % esz) return NULL;
    size_t off = (a - b) / esz;
    for (int i = 0; i < m->n_tensors; i++)
        if (old_off[i] == off) return new_off[i] == SIZE_MAX ? NULL : (char *)slab + new_off[i] * esz;
    return NULL; // not a tensor's start: no view points there
}

static dsmoe_status copy_held(dsmoe_model *m, void *dst, const size_t *dst_off, const void *src, const size_t *src_off,
                              size_t esz, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    for (int i = 0; i < m->n_tensors; i++)
        if (dst_off[i] != SIZE_MAX)
            KCALL(rt, copy, (char *)dst + dst_off[i] * esz, (const char *)src + src_off[i] * esz,
                  m->tensors[i].numel * esz);
    return DSMOE_OK;
}

// Points every view (block_params, the MoE weights, the embeddings and ln_f) at its tensor's place in the
// new slabs. In float32 the GEMM operands are the masters themselves.
static void rebind(dsmoe_model *m, const float *old32, size_t n32, const size_t *new32, const void *oldlp, size_t nlp,
                   const size_t *newlp, void *slab32, void *slablp) {
    size_t E = m->esz;
#define R32(p) ((float *)remap(m, (p), old32, n32, sizeof(float), m->held32, slab32, new32))
#define RLP(p) ((const void *)remap(m, (p), oldlp, nlp, E, m->heldlp, slablp, newlp))
    for (int l = 0; l < m->L; l++) {
        block_params *b = &m->blocks[l];
        float **f[] = {&b->ln1w, &b->ln1b, &b->qkvw, &b->qkvb, &b->attprojw, &b->attprojb, &b->ln2w, &b->ln2b,
                       &b->fcw, &b->fcb, &b->fcprojw, &b->fcprojb, &b->coefw, &b->coefb, &b->moe.wg, &b->moe.w1,
                       &b->moe.b1, &b->moe.w2, &b->moe.b2};
        for (size_t k = 0; k < sizeof f / sizeof f[0]; k++) *f[k] = R32(*f[k]);
        if (m->dt == F32) {
            b->qkvw_op = b->qkvw, b->attprojw_op = b->attprojw, b->fcw_op = b->fcw, b->fcprojw_op = b->fcprojw;
            b->coefw_op = b->coefw;
            continue;
        }
        const void **o[] = {&b->qkvw_op, &b->attprojw_op, &b->fcw_op, &b->fcprojw_op, &b->coefw_op, &b->moe.w1_lp,
                            &b->moe.w2_lp};
        for (size_t k = 0; k < sizeof o / sizeof o[0]; k++) *o[k] = RLP(*o[k]);
    }
    m->wte_op = m->dt == F32 ? R32(m->wte) : RLP(m->wte_op);
    m->wte = R32(m->wte), m->wpe = R32(m->wpe), m->lnfw = R32(m->lnfw), m->lnfb = R32(m->lnfb);
#undef R32
#undef RLP
}

// Keeps of the model's slabs what hold_of says, in new slabs of just that size (float32 and dt), points
// the views there and frees the old ones. Nothing changes on failure.
static dsmoe_status keep(dsmoe_model *m, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    int n = m->n_tensors, lowp = m->dt != F32;
    size_t E = m->esz;
    if (!m->held32) { // the slabs as created: every tensor in params, and in params_lp in bfloat16
        m->held32 = malloc((size_t)n * sizeof *m->held32);
        m->heldlp = malloc((size_t)n * sizeof *m->heldlp);
        if (!m->held32 || !m->heldlp) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "model: out of memory");
        for (int i = 0; i < n; i++)
            m->held32[i] = m->tensors[i].offset, m->heldlp[i] = lowp ? m->tensors[i].offset : SIZE_MAX;
    }
    size_t *new32 = malloc((size_t)n * sizeof *new32), *newlp = malloc((size_t)n * sizeof *newlp);
    if (!new32 || !newlp) {
        free(new32);
        free(newlp);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "model: out of memory");
    }
    size_t n32 = 0, nlp = 0, old32n = 0, oldlpn = 0;
    dsmoe_status s = DSMOE_OK;
    for (int i = 0; i < n; i++) {
        unsigned h = hold_of(m, i);
        size_t k = m->tensors[i].numel;
        old32n += m->held32[i] != SIZE_MAX ? k : 0;
        oldlpn += m->heldlp[i] != SIZE_MAX ? k : 0;
        if (((h & HOLD_F32) && m->held32[i] == SIZE_MAX) || ((h & HOLD_LP) && m->heldlp[i] == SIZE_MAX))
            s = dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "model: %s is needed and no longer held", m->tensors[i].name);
        new32[i] = h & HOLD_F32 ? n32 : SIZE_MAX;
        newlp[i] = h & HOLD_LP ? nlp : SIZE_MAX;
        n32 += h & HOLD_F32 ? k : 0;
        nlp += h & HOLD_LP ? k : 0;
    }
    float *old32 = m->params ? m->params : m->params_kept;
    void *oldlp = m->params_lp, *slab32 = NULL, *slablp = NULL;
    if (s == DSMOE_OK)
        s = dsmoe_rt_alloc(rt, n32 ? n32 * sizeof(float) : 1, 0, &slab32, "parameters generation reads in float32", err);
    if (s == DSMOE_OK && nlp) s = dsmoe_rt_alloc(rt, nlp * E, 0, &slablp, "GEMM weights generation reads whole", err);
    if (s == DSMOE_OK) s = copy_held(m, slab32, new32, old32, m->held32, sizeof(float), err);
    if (s == DSMOE_OK && nlp) s = copy_held(m, slablp, newlp, oldlp, m->heldlp, E, err);
    if (s == DSMOE_OK) s = dsmoe_rt_wait(rt, err);
    if (s != DSMOE_OK) {
        if (slab32) rt->kern->free(rt->kctx, slab32);
        if (slablp) rt->kern->free(rt->kctx, slablp);
        free(new32);
        free(newlp);
        return s;
    }
    rebind(m, old32, old32n, new32, oldlp, oldlpn, newlp, slab32, slablp);
    if (old32) rt->kern->free(rt->kctx, old32);
    if (oldlp) rt->kern->free(rt->kctx, oldlp);
    m->params = NULL;
    m->params_kept = slab32;
    m->params_lp = slablp;
    free(m->held32);
    free(m->heldlp);
    m->held32 = new32, m->heldlp = newlp;
    m->bytes_allocated = m->bytes_allocated - old32n * sizeof(float) - oldlpn * E + n32 * sizeof(float) + nlp * E;
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_keep_unsliced(dsmoe_model *m, int W, int experts, dsmoe_err *err) {
    if (W <= 1) return DSMOE_OK;
    if (m->B != 0 || m->slice_W)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "model: freeing the sliced weights needs a parameters-only model "
                             "whose weights are still whole");
    m->slice_W = W, m->slice_experts = experts != 0;
    dsmoe_status s = keep(m, err);
    if (s != DSMOE_OK) m->slice_W = 0, m->slice_experts = 0;
    return s;
}

dsmoe_status dsmoe_model_drop_gemm_masters(dsmoe_model *m, dsmoe_err *err) {
    if (m->B != 0 || m->dt == F32 || m->masters_dropped)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "model: dropping the float32 GEMM weights needs a parameters-only "
                             "bfloat16 model that still has them");
    m->masters_dropped = 1;
    dsmoe_status s = keep(m, err);
    if (s != DSMOE_OK) m->masters_dropped = 0;
    return s;
}
