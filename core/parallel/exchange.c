// core/parallel/exchange.c: flat and hierarchical all-to-all over the comm plugin (see exchange.h for the steps).
// Assumed throughout: every rank of the group calls with the same arguments (the core agrees sizes
// before an exchange), so every rank takes the same branch and issues the same collectives.
#include "exchange.h"

#include <stdlib.h>
#include <string.h>

struct dsmoe_exchange {
    const dsmoe_runtime *rt;
    dsmoe_a2a_algo algo;       // as asked at create (may be AUTO)
    int p, G, N, rank;         // group size, ranks per node, nodes, my rank in the group
    dsmoe_ctl_group *ctl;      // the caller's control-plane group (not owned)
    dsmoe_ctl_group *intra_ctl, *inter_ctl; // control-plane halves of intra and inter (owned)
    dsmoe_comm_group *group;   // all p ranks
    dsmoe_comm_group *intra;   // the G ranks of my node, ordered by local index (NULL when algo is FLAT)
    dsmoe_comm_group *inter;   // the N ranks with my local index, ordered by node (NULL when algo is FLAT)
    void *ws;                  // (p, bytes) kernel buffer for the packed blocks
    size_t ws_bytes;
    dsmoe_a2a_plan last;
};

// ---------------------------------------------------------------------------------------------------
// pure planning

const char *dsmoe_a2a_algo_name(dsmoe_a2a_algo algo) {
    switch (algo) {
    case DSMOE_A2A_FLAT: return "flat";
    case DSMOE_A2A_HIERARCHICAL: return "hierarchical";
    case DSMOE_A2A_AUTO: return "auto";
    }
    return "unknown";
}

dsmoe_a2a_algo dsmoe_a2a_choose(dsmoe_a2a_algo algo, int p, int G, size_t bytes) {
    if (algo != DSMOE_A2A_AUTO) return algo;
    int nodes = G > 0 ? p / G : 1;
    return nodes > 1 && G > 1 && bytes < DSMOE_A2A_AUTO_MAX_BYTES ? DSMOE_A2A_HIERARCHICAL : DSMOE_A2A_FLAT;
}

dsmoe_status dsmoe_a2a_plan_compute(dsmoe_a2a_algo algo, int p, int G, size_t bytes, dsmoe_a2a_plan *plan,
                                    dsmoe_err *err) {
    if (!plan) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: plan: the output plan is NULL");
    memset(plan, 0, sizeof *plan);
    if (algo < DSMOE_A2A_FLAT || algo > DSMOE_A2A_AUTO)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: plan: algorithm %d is not flat (0), hierarchical (1) "
                             "or auto (2)", (int)algo);
    if (p < 1 || G < 1 || p % G != 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: plan: %d ranks per node must be >= 1 and divide the "
                             "%d ranks of the group", G, p);
    if (bytes > SIZE_MAX / (size_t)p)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: plan: %zu bytes per peer times %d ranks overflows",
                             bytes, p);
    int N = p / G;
    uint64_t b = bytes;
    *plan = (dsmoe_a2a_plan){.algo = dsmoe_a2a_choose(algo, p, G, bytes), .ranks = p, .ranks_per_node = G,
                             .nodes = N, .bytes_per_peer = bytes};
    if (bytes == 0) return DSMOE_OK; // nothing moves: no message is sent
    if (plan->algo == DSMOE_A2A_FLAT) {
        plan->messages = p - 1;
        plan->inter_node_messages = p - G;
        plan->bytes_sent = (uint64_t)(p - 1) * b;
        plan->inter_node_bytes = (uint64_t)(p - G) * b;
    } else {
        // Step 2: G - 1 messages of N blocks in the node; step 4: N - 1 messages of G blocks across.
        plan->messages = (int64_t)(G - 1) + (N - 1);
        plan->inter_node_messages = N - 1;
        plan->bytes_sent = (uint64_t)(G - 1) * N * b + (uint64_t)(N - 1) * G * b;
        plan->inter_node_bytes = (uint64_t)(N - 1) * G * b;
        // With one node or one rank per node the packs are identities and are skipped.
        plan->packed_bytes = G > 1 && N > 1 ? 2 * (uint64_t)p * b : 0;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_a2a_node_layout(const int *leader, int p, int *G, dsmoe_err *err) {
    if (!leader || !G || p < 1)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: node layout: NULL argument or %d ranks", p);
    // G is the size of the first node: every rank whose node's first rank is rank 0.
    int g = 0;
    for (int r = 0; r < p; r++) g += leader[r] == leader[0];
    if (p % g != 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "exchange: the first node holds %d ranks, which does not divide the %d ranks of the EP "
                             "group; nodes must hold equal numbers of its ranks (or set ranks_per_node)", g, p);
    for (int r = 0; r < p; r++) {
        int want = r - r % g;
        if (leader[r] != want)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "exchange: the EP group's ranks are not node-contiguous with equal nodes: rank %d of "
                                 "%d is on the node whose first rank is %d, expected %d (%d ranks per node, as on the "
                                 "first node); place ranks by node (e.g. mpirun --map-by core) or set ranks_per_node",
                                 r, p, leader[r], want, g);
    }
    *G = g;
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// create and free

void dsmoe_a2a_leaders(const int *node, int p, int *leader) {
    for (int r = p - 1; r >= 0; r--) { // descending, so that leader may alias node
        int first = r;
        for (int q = 0; q < r; q++)
            if (node[q] == node[r]) {
                first = q;
                break;
            }
        leader[r] = first;
    }
}

// Finds G from the agreed (node, algo, ranks_per_node) of every rank: every rank sees the same
// table, so every rank reaches the same verdict and an error here is collective.
static dsmoe_status agree_layout(const int *table, int p, int *G, dsmoe_err *err) {
    for (int r = 1; r < p; r++)
        if (table[3 * r + 1] != table[1] || table[3 * r + 2] != table[2])
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "exchange: create: ranks disagree: rank 0 asks for algorithm %s with ranks_per_node "
                                 "%d, rank %d for %s with %d",
                                 dsmoe_a2a_algo_name(table[1]), table[2], r, dsmoe_a2a_algo_name(table[3 * r + 1]),
                                 table[3 * r + 2]);
    int rpn = table[2];
    if (rpn > 0) {
        if (p % rpn != 0)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "exchange: create: ranks_per_node %d does not divide the %d ranks of the EP group",
                                 rpn, p);
        *G = rpn;
        return DSMOE_OK;
    }
    int *leader = malloc((size_t)p * sizeof *leader);
    if (!leader) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "exchange: create: out of memory for %d ranks", p);
    for (int r = 0; r < p; r++) leader[r] = table[3 * r]; // node ids, then each rank's leader
    dsmoe_a2a_leaders(leader, p, leader);
    dsmoe_status s = dsmoe_a2a_node_layout(leader, p, G, err);
    free(leader);
    return s;
}

static dsmoe_status make_group(dsmoe_exchange *ex, dsmoe_ctl_group *ctl, int want_rank, int want_size,
                               dsmoe_comm_group **group, const char *what, dsmoe_err *err) {
    const dsmoe_runtime *rt = ex->rt;
    dsmoe_bootstrap bs;
    dsmoe_ctl_bootstrap(ctl, &bs);
    CCALL(rt, group_create, &bs, group);
    int r = rt->comm->group_rank(*group), n = rt->comm->group_size(*group);
    if (r != want_rank || n != want_size)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL,
                             "exchange: create: the %s group from comm plugin '%s' has me as rank %d of %d; expected "
                             "%d of %d", what, rt->comm->name, r, n, want_rank, want_size);
    return DSMOE_OK;
}

static dsmoe_status create_groups(dsmoe_exchange *ex, dsmoe_err *err) {
    DSMOE_TRY(make_group(ex, ex->ctl, ex->rank, ex->p, &ex->group, "EP", err));
    if (ex->algo == DSMOE_A2A_FLAT) return DSMOE_OK;
    int n = ex->rank / ex->G, g = ex->rank % ex->G;
    DSMOE_TRY(dsmoe_ctl_split(ex->ctl, n, g, &ex->intra_ctl, err));
    DSMOE_TRY(dsmoe_ctl_split(ex->ctl, g, n, &ex->inter_ctl, err));
    DSMOE_TRY(make_group(ex, ex->intra_ctl, g, ex->G, &ex->intra, "intra-node", err));
    return make_group(ex, ex->inter_ctl, n, ex->N, &ex->inter, "inter-node", err);
}

dsmoe_status dsmoe_exchange_create(const dsmoe_runtime *rt, dsmoe_ctl_group *ctl, dsmoe_a2a_algo algo, int ranks_per_node,
                                   dsmoe_exchange **out, dsmoe_err *err) {
    if (!out) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: create: the output pointer is NULL");
    *out = NULL;
    if (!rt || !rt->kern || !rt->comm || !ctl)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: create: needs an open runtime and a control group");
    if (algo < DSMOE_A2A_FLAT || algo > DSMOE_A2A_AUTO || ranks_per_node < 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "exchange: create: algorithm %d ranks_per_node %d; expected flat (0), hierarchical (1) "
                             "or auto (2), and ranks_per_node >= 0 (0 = the shared-memory nodes)",
                             (int)algo, ranks_per_node);
    dsmoe_exchange *ex = calloc(1, sizeof *ex);
    if (!ex) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "exchange: create: out of memory");
    *ex = (dsmoe_exchange){.rt = rt, .algo = algo, .ctl = ctl, .rank = dsmoe_ctl_rank(ctl), .p = dsmoe_ctl_size(ctl)};

    // (node, algo, ranks_per_node) of every rank; a rank's leader is the first group rank on its node.
    int mine[3] = {rt->node, (int)algo, ranks_per_node}, *table = malloc(3 * (size_t)ex->p * sizeof *table);
    dsmoe_status s = table ? dsmoe_ctl_allgather(ctl, mine, table, sizeof mine, err)
                           : dsmoe_err_set(err, DSMOE_ERR_NOMEM, "exchange: create: out of memory for %d ranks", ex->p);
    if (s == DSMOE_OK) {
        s = agree_layout(table, ex->p, &ex->G, err);
    }
    free(table);
    if (s == DSMOE_OK) {
        ex->N = ex->p / ex->G;
        s = create_groups(ex, err);
    }
    if (s != DSMOE_OK) {
        dsmoe_exchange_free(ex);
        return s;
    }
    ex->last = (dsmoe_a2a_plan){.algo = dsmoe_a2a_choose(algo, ex->p, ex->G, 0), .ranks = ex->p,
                                .ranks_per_node = ex->G, .nodes = ex->N};
    *out = ex;
    return DSMOE_OK;
}

void dsmoe_exchange_free(dsmoe_exchange *ex) {
    if (!ex) return;
    const dsmoe_runtime *rt = ex->rt;
    rt->kern->synchronize(rt->kctx); // no queued collective may still use the groups
    rt->comm->group_destroy(rt->cctx, ex->inter);
    rt->comm->group_destroy(rt->cctx, ex->intra);
    rt->comm->group_destroy(rt->cctx, ex->group);
    dsmoe_ctl_free(ex->inter_ctl);
    dsmoe_ctl_free(ex->intra_ctl);
    rt->kern->free(rt->kctx, ex->ws);
    free(ex);
}

// ---------------------------------------------------------------------------------------------------
// the exchange

static dsmoe_status grow_workspace(dsmoe_exchange *ex, size_t need, dsmoe_err *err) {
    const dsmoe_runtime *rt = ex->rt;
    if (need <= ex->ws_bytes && ex->ws) return DSMOE_OK;
    rt->kern->free(rt->kctx, ex->ws);
    ex->ws = NULL;
    ex->ws_bytes = 0;
    DSMOE_TRY(dsmoe_rt_alloc(rt, need, 0, &ex->ws, "exchange workspace", err));
    ex->ws_bytes = need;
    return DSMOE_OK;
}

dsmoe_status dsmoe_exchange_reserve(dsmoe_exchange *ex, size_t bytes, dsmoe_err *err) {
    if (!ex) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: reserve: the exchange is NULL");
    if (ex->algo == DSMOE_A2A_FLAT || ex->G == 1 || ex->N == 1) return DSMOE_OK; // never packs
    if (ex->algo == DSMOE_A2A_AUTO && bytes >= DSMOE_A2A_AUTO_MAX_BYTES) bytes = DSMOE_A2A_AUTO_MAX_BYTES - 1;
    if (bytes > SIZE_MAX / (size_t)ex->p)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: reserve: %zu bytes per peer times %d ranks overflows",
                             bytes, ex->p);
    return grow_workspace(ex, (size_t)ex->p * bytes, err);
}

// dst (cols, rows) blocks = src (rows, cols) blocks, a block being `b` bytes: source row r (cols
// contiguous blocks) becomes dst column r, one 2-D copy per row. Host pointer arithmetic only; the copies
// are the kernel plugin's, so src and dst may be device memory.
static dsmoe_status transpose_blocks(const dsmoe_runtime *rt, char *dst, const char *src, int rows, int cols,
                                     size_t b, dsmoe_err *err) {
    for (int r = 0; r < rows; r++)
        KCALL(rt, copy_2d, dst + (size_t)r * b, (size_t)rows * b, src + (size_t)r * cols * b, b, b, (size_t)cols);
    return DSMOE_OK;
}

static dsmoe_status hierarchical(dsmoe_exchange *ex, const char *send, char *recv, size_t b, dsmoe_err *err) {
    const dsmoe_runtime *rt = ex->rt;
    int G = ex->G, N = ex->N;
    // One node, or one rank per node: the other step is an exchange with oneself and both packs are
    // identities, so this is the flat all-to-all over the one group that is not trivial.
    if (N == 1) {
        CCOLL(rt, alltoall, ex->intra, send, recv, b);
        return DSMOE_OK;
    }
    if (G == 1) {
        CCOLL(rt, alltoall, ex->inter, send, recv, b);
        return DSMOE_OK;
    }
    DSMOE_TRY(grow_workspace(ex, (size_t)ex->p * b, err));
    char *ws = ex->ws;
    // send (N, G) -> ws (G, N): the N blocks for local index g' made contiguous.
    DSMOE_TRY(transpose_blocks(rt, ws, send, N, G, b, err));
    // recv (G_src, N_dst) after: from each rank of my node, its blocks for (n', my g) on every node n'.
    CCOLL(rt, alltoall, ex->intra, ws, recv, (size_t)N * b);
    // recv (G_src, N_dst) -> ws (N_dst, G_src): the G blocks for node n' made contiguous.
    DSMOE_TRY(transpose_blocks(rt, ws, recv, G, N, b, err));
    // recv (N_src, G_src): block n*G + g of recv came from rank (n, g), the flat layout.
    CCOLL(rt, alltoall, ex->inter, ws, recv, (size_t)G * b);
    return DSMOE_OK;
}

dsmoe_status dsmoe_exchange_alltoall(dsmoe_exchange *ex, const void *send, void *recv, size_t bytes, dsmoe_err *err) {
    if (!ex) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: alltoall: the exchange is NULL");
    const dsmoe_runtime *rt = ex->rt;
    dsmoe_a2a_plan plan;
    DSMOE_TRY(dsmoe_a2a_plan_compute(ex->algo, ex->p, ex->G, bytes, &plan, err));
    if (bytes == 0) {
        ex->last = plan;
        return DSMOE_OK; // every rank passes the same bytes, so every rank skips
    }
    size_t total = (size_t)ex->p * bytes;
    uintptr_t s0 = (uintptr_t)send, r0 = (uintptr_t)recv;
    if (!send || !recv || (s0 < r0 + total && r0 < s0 + total))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "exchange: alltoall: send %p and recv %p (%zu bytes each) must be non-NULL and must not "
                             "overlap", send, recv, total);
    if (plan.algo == DSMOE_A2A_FLAT) CCOLL(rt, alltoall, ex->group, send, recv, bytes);
    else DSMOE_TRY(hierarchical(ex, send, recv, bytes, err));
    ex->last = plan;
    return DSMOE_OK;
}

void dsmoe_exchange_plan(const dsmoe_exchange *ex, size_t bytes, dsmoe_a2a_plan *plan) {
    if (dsmoe_a2a_plan_compute(ex->algo, ex->p, ex->G, bytes, plan, NULL) != DSMOE_OK)
        *plan = (dsmoe_a2a_plan){.algo = DSMOE_A2A_FLAT, .ranks = ex->p, .ranks_per_node = ex->G, .nodes = ex->N,
                                 .bytes_per_peer = bytes};
}

const dsmoe_a2a_plan *dsmoe_exchange_last(const dsmoe_exchange *ex) { return &ex->last; }
