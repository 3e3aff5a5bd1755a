// core/model_parallel.c: the model's expert-parallel (EP) and expert-data-parallel (EDP) groups, and
// what the optimizer needs of them: gradient reduction over the data-parallel ranks (overlapped with the
// backward in model.c when it can be) and the global gradient norm. See model.h.
#include <math.h>

#include "model_internal.h"

// ----------------------------------------------------------------------------------------------------
// groups

// EP groups are contiguous blocks of ep slots; EDP groups the strided sets (DeepSpeed's layout, over
// slots rather than world ranks so that groups follow the nodes: placement.h).
static dsmoe_status create_ep_groups(dsmoe_runtime *rt, int ep, ep_groups *g, dsmoe_err *err) {
    int rank = rt->slot;
    MPI_Comm ep_comm, edp_comm;
    g->ep = ep;
    if (MPI_Comm_split(MPI_COMM_WORLD, rank / ep, rank, &ep_comm) != MPI_SUCCESS ||
        MPI_Comm_split(MPI_COMM_WORLD, rank % ep, rank, &edp_comm) != MPI_SUCCESS)
        return dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "MPI_Comm_split failed creating expert-parallel groups (ep %d)", ep);
    dsmoe_status s = rt->comm->group_create(rt->cctx, ep_comm, &g->ep_group);
    if (s == DSMOE_OK) g->ep_comm = ep_comm; // freed with ep_group in dsmoe_model_free
    else MPI_Comm_free(&ep_comm);
    if (s == DSMOE_OK) s = rt->comm->group_create(rt->cctx, edp_comm, &g->edp_group);
    MPI_Comm_free(&edp_comm);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "comm plugin '%s': group_create failed (ep %d): %s", rt->comm->name, ep,
                             rt->comm->last_error(rt->cctx));
    g->ep_rank = rt->comm->group_rank(g->ep_group);
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
            DSMOE_TRY(create_ep_groups(m->rt, ep, &m->epg[k], err));
        }
        m->epg_of_moe[mi] = k;
    }
    return DSMOE_OK;
}

// Per MoE layer mi (0 <= mi < n_moe_layers; the caller checks).
dsmoe_comm_group *dsmoe_model_edp_group(const dsmoe_model *m, int mi) { return m->epg[m->epg_of_moe[mi]].edp_group; }
int dsmoe_model_ep_rank(const dsmoe_model *m, int mi) { return m->epg[m->epg_of_moe[mi]].ep_rank; }
int dsmoe_model_ep_size(const dsmoe_model *m, int mi) { return m->epg[m->epg_of_moe[mi]].ep; }
MPI_Comm dsmoe_model_ep_comm(const dsmoe_model *m, int mi) { return m->epg[m->epg_of_moe[mi]].ep_comm; }
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
        CCALL(rt, allreduce, rt->world, DSMOE_IN_PLACE, m->grads, m->n_replicated, DSMOE_FLOAT32, DSMOE_SUM);
    } else {
        // The blocks went out during the backward; what is left is wte/wpe and ln_f. The fixed-order
        // sum adds each element in rank order whatever the range, so the bits match one big call.
        if (m->n_started != m->L)
            return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "model reduce_grads: %d of %d blocks started", m->n_started,
                                 m->L);
        CCALL(rt, allreduce, rt->world, DSMOE_IN_PLACE, m->grads, m->block_begin[0], DSMOE_FLOAT32, DSMOE_SUM);
        size_t tail = m->block_begin[m->L];
        CCALL(rt, allreduce, rt->world, DSMOE_IN_PLACE, m->grads + tail, m->n_replicated - tail, DSMOE_FLOAT32,
              DSMOE_SUM);
        for (int l = m->L - 1; l >= 0; l--) { // start order, the same on every rank
            dsmoe_comm_request *r = m->reqs[l];
            m->reqs[l] = NULL;
            CCALL(rt, request_wait, r);
        }
        m->n_started = 0;
    }
    // Each MoE layer's expert tensors sit together in the slab and are summed over its own EDP group.
    for (int mi = 0; mi < m->cfg->n_moe_layers; mi++) {
        dsmoe_comm_group *edp = m->epg[m->epg_of_moe[mi]].edp_group;
        size_t n = m->expert_end[mi] - m->expert_begin[mi];
        if (n > 0 && rt->comm->group_size(edp) > 1)
            CCALL(rt, allreduce, edp, DSMOE_IN_PLACE, m->grads + m->expert_begin[mi], n, DSMOE_FLOAT32, DSMOE_SUM);
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_grad_norm(dsmoe_model *m, double *norm, dsmoe_err *err) {
    dsmoe_runtime *rt = m->rt;
    double replicated = 0, expert = 0;
    KCALL(rt, sum_squares, m->grads, m->n_replicated, &replicated);
    // Expert shards differ across an EP group; replicated gradients are already equal everywhere. Each
    // EP size sums its layers' squares over its own EP group.
    for (int k = 0; k < m->n_epg; k++) {
        double sq = 0;
        for (int mi = 0; mi < m->cfg->n_moe_layers; mi++) {
            if (m->epg_of_moe[mi] != k) continue;
            double layer = 0;
            KCALL(rt, sum_squares, m->grads + m->expert_begin[mi], m->expert_end[mi] - m->expert_begin[mi], &layer);
            sq += layer;
        }
        if (m->epg[k].ep > 1) CCALL(rt, allreduce, m->epg[k].ep_group, DSMOE_IN_PLACE, &sq, 1, DSMOE_FLOAT64, DSMOE_SUM);
        expert += sq;
    }
    *norm = sqrt(replicated + expert);
    return DSMOE_OK;
}
