// core/model/model_parallel.c: the model's expert-parallel (EP) and expert-data-parallel (EDP) groups, and
// what the optimizer needs of them: gradient reduction over the data-parallel ranks (overlapped with the
// backward in model.c when it can be) and the global gradient norm. See model.h.
#include <math.h>

#include "model_internal.h"

// ----------------------------------------------------------------------------------------------------
// groups

// EP groups are contiguous blocks of ep slots; EDP groups the strided sets (DeepSpeed's layout, over
// slots rather than world ranks so that groups follow the nodes: placement.h). With tensor slicing of
// width tp (generation only), slot = data rank * tp + tensor rank, and the groups are made the same way
// over the data ranks of each tensor rank (the ranks that hold the same part of every dense block).
static dsmoe_status create_ep_groups(dsmoe_runtime *rt, int ep, int tp, ep_groups *g, dsmoe_err *err) {
    int d = rt->slot / tp, t = rt->slot % tp;
    g->ep = ep;
    DSMOE_TRY(dsmoe_rt_group_split(rt, (d / ep) * tp + t, d, &g->ep_g, err));
    DSMOE_TRY(dsmoe_rt_group_split(rt, (d % ep) * tp + t, d, &g->edp_g, err));
    g->ep_rank = rt->comm->group_rank(g->ep_g.comm);
    return DSMOE_OK;
}

// One set of groups per distinct EP size among the MoE layers (PR-MoE: 32 experts with ep 32 and 64
// with ep 64 share nothing); every rank walks the same layers in the same order, so the splits match.
dsmoe_status dsmoe_model_create_groups(dsmoe_model *m, dsmoe_err *err) {
    const dsmoe_config *c = m->cfg;
    for (int mi = 0; mi < c->n_moe_layers; mi++) {
        int ep = c->expert_parallel[mi], k = 0;
        while (k < m->n_epg && m->epg[k].ep != ep) k++;
        if (k == m->n_epg) {
            m->n_epg++;
            int tp = c->mode == DSMOE_MODE_GENERATE ? c->gen_tensor_parallel : 1;
            DSMOE_TRY(create_ep_groups(m->rt, ep, tp, &m->epg[k], err));
        }
        m->epg_of_moe[mi] = k;
    }
    return DSMOE_OK;
}

// Per MoE layer mi (0 <= mi < n_moe_layers; the caller checks).
dsmoe_comm_group *dsmoe_model_edp_group(const dsmoe_model *m, int mi) { return m->epg[m->epg_of_moe[mi]].edp_g.comm; }
int dsmoe_model_ep_size(const dsmoe_model *m, int mi) { return m->epg[m->epg_of_moe[mi]].ep; }
dsmoe_ctl_group *dsmoe_model_ep_ctl(const dsmoe_model *m, int mi) { return m->epg[m->epg_of_moe[mi]].ep_g.ctl; }
void dsmoe_model_expert_range(const dsmoe_model *m, int mi, size_t *begin, size_t *end) {
    *begin = m->expert_begin[mi];
    *end = m->expert_end[mi];
}

// ----------------------------------------------------------------------------------------------------
// optimizer side

void dsmoe_model_set_reduce_in_backward(dsmoe_model *m, int on) { m->reduce_in_backward = on; }

dsmoe_status dsmoe_model_reduce_grads(dsmoe_model *m, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    if (rt->world_size == 1) return DSMOE_OK;
    if (m->n_started == 0) {
        CCOLL(rt, allreduce, rt->world, DSMOE_IN_PLACE, m->grads, m->n_replicated, DSMOE_FLOAT32, DSMOE_SUM);
    } else {
        // The blocks went out during the backward; what is left is wte/wpe and ln_f. The fixed-order
        // sum adds each element in rank order whatever the range, so the bits match one big call.
        // Blocks whose backward had not finished when the backward returned start now, in order.
        DSMOE_TRY(dsmoe_model_start_block_reductions(m, 1, err));
        if (m->n_started != m->L)
            return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "model reduce_grads: %d of %d blocks started", m->n_started,
                                 m->L);
        CCOLL(rt, allreduce, rt->world, DSMOE_IN_PLACE, m->grads, m->block_begin[0], DSMOE_FLOAT32, DSMOE_SUM);
        size_t tail = m->block_begin[m->L];
        CCOLL(rt, allreduce, rt->world, DSMOE_IN_PLACE, m->grads + tail, m->n_replicated - tail, DSMOE_FLOAT32,
              DSMOE_SUM);
        for (int l = m->L - 1; l >= 0; l--) { // start order, the same on every rank
            dsmoe_comm_request *r = m->reqs[l];
            m->reqs[l] = NULL;
            if (r) CCALL(rt, request_wait, r);
        }
        m->n_started = 0;
        m->n_recorded = 0;
    }
    // Each MoE layer's expert tensors sit together in the slab and are summed over its own EDP group.
    for (int mi = 0; mi < m->cfg->n_moe_layers; mi++) {
        dsmoe_comm_group *edp = m->epg[m->epg_of_moe[mi]].edp_g.comm;
        size_t n = m->expert_end[mi] - m->expert_begin[mi];
        if (n > 0 && rt->comm->group_size(edp) > 1)
            CCOLL(rt, allreduce, edp, DSMOE_IN_PLACE, m->grads + m->expert_begin[mi], n, DSMOE_FLOAT32, DSMOE_SUM);
    }
    return DSMOE_OK;
}

// Overlapped reduction (host-progressed plugins with the non-blocking trio): starts the blocks whose
// backward has finished, strictly in the order L-1, L-2, ... (the same on every rank). wait = 1 waits for
// each block's event instead of asking. A stream-ordered plugin enqueues each block's allreduce on the
// queue right after the block's backward instead (model.c), so nothing is left to start here.
dsmoe_status dsmoe_model_start_block_reductions(dsmoe_model *m, int wait, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    while (m->n_started < m->n_recorded) {
        int l = m->L - 1 - m->n_started, done = 1;
        if (wait) {
            dsmoe_status s = rt->kern->event_synchronize(rt->kctx, m->block_done[l]);
            if (s != DSMOE_OK)
                return dsmoe_err_set(err, s, "kernel plugin '%s': waiting for block %d's backward: %s", rt->kern->name,
                                     l, rt->kern->last_error(rt->kctx));
        } else {
            dsmoe_status s = rt->kern->event_query(rt->kctx, m->block_done[l], &done);
            if (s != DSMOE_OK)
                return dsmoe_err_set(err, s, "kernel plugin '%s': event_query: %s", rt->kern->name,
                                     rt->kern->last_error(rt->kctx));
        }
        if (!done) break;
        size_t first = m->block_begin[l], n = m->block_begin[l + 1] - first;
        CCALL(rt, allreduce_start, rt->world, m->grads + first, n, DSMOE_FLOAT32, DSMOE_SUM, &m->reqs[l]);
        m->n_started++;
    }
    // Let MPI progress the blocks already in flight while the next block computes.
    for (int k = m->L - m->n_started; k < m->L; k++) {
        int done = 0;
        if (m->reqs[k]) CCALL(rt, request_test, m->reqs[k], &done);
    }
    return DSMOE_OK;
}

// The squared sums stay on the device (one float64 each: the replicated part, then each MoE layer's
// experts) and are read once after a wait; each EP size's sum is added over its EP group by the comm
// plugin (its fixed-order sum, as for every other reduction), staged in the same device buffer.
dsmoe_status dsmoe_model_grad_norm(dsmoe_model *m, double *norm, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    int n_moe = m->cfg->n_moe_layers;
    KCALL(rt, sum_squares, m->grads, m->n_replicated, m->norm_dev);
    for (int mi = 0; mi < n_moe; mi++)
        KCALL(rt, sum_squares, m->grads + m->expert_begin[mi], m->expert_end[mi] - m->expert_begin[mi],
              m->norm_dev + 1 + mi);
    KCALL(rt, copy_to_host, m->norm_host, m->norm_dev, (size_t)(1 + n_moe) * sizeof(double));
    DSMOE_TRY(dsmoe_rt_wait(rt, err));
    double expert = 0;
    // Expert shards differ across an EP group; replicated gradients are already equal everywhere. Each
    // EP size sums its layers' squares over its own EP group.
    for (int k = 0; k < m->n_epg; k++) {
        double sq = 0;
        for (int mi = 0; mi < n_moe; mi++)
            if (m->epg_of_moe[mi] == k) sq += m->norm_host[1 + mi];
        if (m->epg[k].ep > 1) {
            double *stage = m->norm_dev + 1 + n_moe;
            KCALL(rt, copy_to_device, stage, &sq, sizeof sq);
            CCOLL(rt, allreduce, m->epg[k].ep_g.comm, DSMOE_IN_PLACE, stage, 1, DSMOE_FLOAT64, DSMOE_SUM);
            KCALL(rt, copy_to_host, &m->norm_host[1 + n_moe], stage, sizeof sq);
            DSMOE_TRY(dsmoe_rt_wait(rt, err));
            sq = m->norm_host[1 + n_moe];
        }
        expert += sq;
    }
    *norm = sqrt(m->norm_host[0] + expert);
    return DSMOE_OK;
}
