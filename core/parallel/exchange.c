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
    void *ws2;                 // the variable exchange's second workspace (as large as ws)
    size_t ws2_bytes;
    // The variable exchange (dsmoe_exchange_alltoallv_rows): host arrays of p counts and displacements,
    // and, when hierarchical, the bytes every rank of my node sends to every rank (G, p), gathered
    // through the device (sizes_dev) into sizes (host_alloc).
    size_t *sc, *sd, *rc, *rd, *po; // (p + 1) each
    int64_t *sizes, *sizes_dev; // (G, p); sizes_dev (G + 1, p)
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

// Local: the host arrays of the variable exchange (its kernel buffers come at its first call: training
// never makes one).
static dsmoe_status create_variable_state(dsmoe_exchange *ex, dsmoe_err *err) {
    size_t n = (size_t)ex->p + 1;
    ex->sc = dsmoe_calloc(5 * n, sizeof *ex->sc, "exchange: variable counts", err);
    if (!ex->sc) return DSMOE_ERR_NOMEM;
    ex->sd = ex->sc + n, ex->rc = ex->sd + n, ex->rd = ex->rc + n, ex->po = ex->rd + n;
    return DSMOE_OK;
}

// The hierarchical variable exchange's gathered sizes, at its first call.
static dsmoe_status alloc_sizes(dsmoe_exchange *ex, dsmoe_err *err) {
    const dsmoe_runtime *rt = ex->rt;
    if (ex->sizes) return DSMOE_OK;
    size_t bytes = (size_t)ex->G * (size_t)ex->p * sizeof(int64_t);
    // (G + 1, p): the last row is what this rank contributes (the all-gather's buffers must not overlap)
    if (!ex->sizes_dev)
        DSMOE_TRY(dsmoe_rt_alloc(rt, bytes + (size_t)ex->p * sizeof(int64_t), 0, (void **)&ex->sizes_dev,
                                 "exchange: gathered sizes (G, p)", err));
    void *h = NULL;
    if (rt->kern->host_alloc(rt->kctx, bytes, &h) != DSMOE_OK)
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "exchange: host staging of %zu bytes with kernel plugin '%s': %s",
                             bytes, rt->kern->name, rt->kern->last_error(rt->kctx));
    ex->sizes = h;
    return DSMOE_OK;
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
    if (s == DSMOE_OK) s = create_variable_state(ex, err);
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
    rt->kern->free(rt->kctx, ex->ws2);
    rt->kern->free(rt->kctx, ex->sizes_dev);
    if (ex->sizes) rt->kern->host_free(rt->kctx, ex->sizes);
    free(ex->sc);
    free(ex);
}

// ---------------------------------------------------------------------------------------------------
// the exchange

static dsmoe_status grow(const dsmoe_runtime *rt, void **ws, size_t *have, size_t need, dsmoe_err *err) {
    if (need <= *have && *ws) return DSMOE_OK;
    rt->kern->free(rt->kctx, *ws);
    *ws = NULL;
    *have = 0;
    DSMOE_TRY(dsmoe_rt_alloc(rt, need ? need : 1, 0, ws, "exchange workspace", err));
    *have = need;
    return DSMOE_OK;
}
static dsmoe_status grow_workspace(dsmoe_exchange *ex, size_t need, dsmoe_err *err) {
    return grow(ex->rt, &ex->ws, &ex->ws_bytes, need, err);
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

// ---------------------------------------------------------------------------------------------------
// the variable exchange: only the rows that hold tokens travel (dsmoe_exchange_alltoallv_rows)

// Bytes rank-block b holds: its groups' rows. rows (blocks * groups) host.
static size_t block_bytes(const int32_t *rows, int b, int groups, size_t row) {
    size_t n = 0;
    for (int g = 0; g < groups; g++) n += (size_t)rows[(size_t)b * groups + g] * row;
    return n;
}

// Capacity blocks (blocks, groups, cap, row) -> packed: block b's groups one after the other, each its
// first rows[b, g] rows; off (blocks + 1) = where each block starts in dst. unpack is the inverse.
static dsmoe_status pack_rows(const dsmoe_runtime *rt, char *dst, const char *src, const int32_t *rows, int blocks,
                              int groups, size_t cap, size_t row, size_t *off, dsmoe_err *err) {
    size_t at = 0;
    for (int b = 0; b < blocks; b++) {
        off[b] = at;
        for (int g = 0; g < groups; g++) {
            size_t n = (size_t)rows[(size_t)b * groups + g] * row;
            if (n) KCALL(rt, copy, dst + at, src + ((size_t)b * groups + g) * cap * row, n);
            at += n;
        }
    }
    off[blocks] = at;
    return DSMOE_OK;
}
static dsmoe_status unpack_rows(const dsmoe_runtime *rt, char *dst, const char *src, const int32_t *rows, int blocks,
                                int groups, size_t cap, size_t row, dsmoe_err *err) {
    size_t at = 0;
    for (int b = 0; b < blocks; b++)
        for (int g = 0; g < groups; g++) {
            size_t n = (size_t)rows[(size_t)b * groups + g] * row;
            if (n) KCALL(rt, copy, dst + ((size_t)b * groups + g) * cap * row, src + at, n);
            at += n;
        }
    return DSMOE_OK;
}

// Flat over grp (p ranks in the group's order). With one group per block, the blocks' first rows are
// already contiguous: the plugin reads and writes the capacity buffers in place.
static dsmoe_status flat_v(dsmoe_exchange *ex, dsmoe_comm_group *grp, const char *send, const int32_t *send_rows,
                           char *recv, const int32_t *recv_rows, int groups, size_t cap, size_t row, dsmoe_err *err) {
    const dsmoe_runtime *rt = ex->rt;
    int p = ex->p;
    size_t block = (size_t)groups * cap * row;
    if (groups == 1) {
        for (int j = 0; j < p; j++) {
            ex->sc[j] = (size_t)send_rows[j] * row, ex->sd[j] = (size_t)j * block;
            ex->rc[j] = (size_t)recv_rows[j] * row, ex->rd[j] = (size_t)j * block;
        }
        CCOLL(rt, alltoallv, grp, send, ex->sc, ex->sd, recv, ex->rc, ex->rd);
        return DSMOE_OK;
    }
    DSMOE_TRY(pack_rows(rt, ex->ws, send, send_rows, p, groups, cap, row, ex->sd, err));
    for (int j = 0; j < p; j++) {
        ex->sc[j] = ex->sd[j + 1] - ex->sd[j];
        ex->rc[j] = block_bytes(recv_rows, j, groups, row);
        ex->rd[j] = j ? ex->rd[j - 1] + ex->rc[j - 1] : 0;
    }
    CCOLL(rt, alltoallv, grp, ex->ws, ex->sc, ex->sd, ex->ws2, ex->rc, ex->rd);
    return unpack_rows(rt, recv, ex->ws2, recv_rows, p, groups, cap, row, err);
}

// Hierarchical with variable blocks: the steps of the fixed one (exchange.h) on packed blocks. Step 2
// sends rank (n', g') what goes to node-mates of g' on every node, so a rank must know what every rank of
// its node sends to every rank: those (G, p) sizes are gathered first (one small intra-node all-gather,
// and the one wait of the call).
static dsmoe_status hierarchical_v(dsmoe_exchange *ex, const char *send, const int32_t *send_rows, char *recv,
                                   const int32_t *recv_rows, int groups, size_t cap, size_t row, dsmoe_err *err) {
    const dsmoe_runtime *rt = ex->rt;
    int G = ex->G, N = ex->N, p = ex->p, g = ex->rank % G;
    char *a = ex->ws, *b = ex->ws2;
    size_t *cur = ex->po;
    // What I send each rank, packed into b at po; gathered over the node into sizes (G, p).
    DSMOE_TRY(pack_rows(rt, b, send, send_rows, p, groups, cap, row, ex->po, err));
    int64_t *mine = ex->sizes + (size_t)g * p;
    for (int j = 0; j < p; j++) mine[j] = (int64_t)(ex->po[j + 1] - ex->po[j]);
    KCALL(rt, copy_to_device, ex->sizes_dev + (size_t)G * p, mine, (size_t)p * sizeof(int64_t));
    CCOLL(rt, allgather, ex->intra, ex->sizes_dev + (size_t)G * p, ex->sizes_dev, (size_t)p * sizeof(int64_t));
    KCALL(rt, copy_to_host, ex->sizes, ex->sizes_dev, (size_t)G * p * sizeof(int64_t));
    DSMOE_TRY(dsmoe_rt_wait(rt, err));
    const int64_t *sz = ex->sizes; // sz[gs * p + j]: bytes rank (my node, gs) sends rank j

    // Step 1: for each local index g', my blocks for (n', g') on every node, one after the other, into a.
    size_t at = 0;
    for (int gd = 0; gd < G; gd++) {
        ex->sd[gd] = at;
        for (int n = 0; n < N; n++) {
            int j = n * G + gd;
            size_t len = ex->po[j + 1] - ex->po[j];
            if (len) KCALL(rt, copy, a + at, b + ex->po[j], len);
            at += len;
        }
        ex->sc[gd] = at - ex->sd[gd];
    }
    // Step 2: from node-mate gs, its blocks for (n', my g) on every node n'.
    for (int gs = 0; gs < G; gs++) {
        ex->rc[gs] = 0;
        for (int n = 0; n < N; n++) ex->rc[gs] += (size_t)sz[(size_t)gs * p + n * G + g];
        ex->rd[gs] = gs ? ex->rd[gs - 1] + ex->rc[gs - 1] : 0;
        cur[gs] = ex->rd[gs];
    }
    int64_t msgs = 0, inter_msgs = 0;
    uint64_t sent = 0, inter_sent = 0, packed = 2 * (uint64_t)at;
    for (int gd = 0; gd < G; gd++)
        if (gd != g && ex->sc[gd]) msgs++, sent += ex->sc[gd];
    CCOLL(rt, alltoallv, ex->intra, a, ex->sc, ex->sd, b, ex->rc, ex->rd);
    // Step 3: for each node n', the blocks for (n', g) from every node-mate, into a.
    at = 0;
    for (int nd = 0; nd < N; nd++) {
        ex->sd[nd] = at;
        for (int gs = 0; gs < G; gs++) {
            size_t len = (size_t)sz[(size_t)gs * p + nd * G + g];
            if (len) KCALL(rt, copy, a + at, b + cur[gs], len);
            cur[gs] += len;
            at += len;
        }
        ex->sc[nd] = at - ex->sd[nd];
    }
    // Step 4: from node n', the blocks of its G ranks for me: rank order, packed.
    for (int ns = 0; ns < N; ns++) {
        ex->rc[ns] = 0;
        for (int gs = 0; gs < G; gs++) ex->rc[ns] += block_bytes(recv_rows, ns * G + gs, groups, row);
        ex->rd[ns] = ns ? ex->rd[ns - 1] + ex->rc[ns - 1] : 0;
    }
    for (int nd = 0; nd < N; nd++)
        if (nd != ex->rank / G && ex->sc[nd]) msgs++, inter_msgs++, sent += ex->sc[nd], inter_sent += ex->sc[nd];
    CCOLL(rt, alltoallv, ex->inter, a, ex->sc, ex->sd, b, ex->rc, ex->rd);
    DSMOE_TRY(unpack_rows(rt, recv, b, recv_rows, p, groups, cap, row, err));
    ex->last = (dsmoe_a2a_plan){.algo = DSMOE_A2A_HIERARCHICAL, .ranks = p, .ranks_per_node = G, .nodes = N,
                                .bytes_per_peer = (size_t)groups * cap * row, .messages = msgs,
                                .inter_node_messages = inter_msgs, .bytes_sent = sent, .inter_node_bytes = inter_sent,
                                .packed_bytes = packed + 2 * (uint64_t)(ex->rd[N - 1] + ex->rc[N - 1])};
    return DSMOE_OK;
}

dsmoe_status dsmoe_exchange_alltoallv_rows(dsmoe_exchange *ex, const void *send, const int32_t *send_rows, void *recv,
                                           const int32_t *recv_rows, int groups, size_t cap, size_t row,
                                           dsmoe_err *err) {
    if (!ex) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: alltoallv: the exchange is NULL");
    const dsmoe_runtime *rt = ex->rt;
    int p = ex->p;
    if (groups < 1 || !send_rows || !recv_rows || (cap && row > SIZE_MAX / cap / (size_t)groups / (size_t)p))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: alltoallv: %d groups of %zu rows of %zu bytes per "
                             "rank: expected groups >= 1, the row counts, and a size that fits", groups, cap, row);
    for (int k = 0; k < p * groups; k++)
        if (send_rows[k] < 0 || (size_t)send_rows[k] > cap || recv_rows[k] < 0 || (size_t)recv_rows[k] > cap)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "exchange: alltoallv: block %d holds %d rows to send and "
                                 "%d received, of %zu", k, send_rows[k], recv_rows[k], cap);
    size_t block = (size_t)groups * cap * row;
    // Without the plugin's variable all-to-all the blocks go whole (rows past the counts are not read).
    if (!rt->comm->alltoallv) return dsmoe_exchange_alltoall(ex, send, recv, block, err);
    if (block == 0) { // every rank passes the same sizes, so every rank skips
        dsmoe_exchange_plan(ex, 0, &ex->last);
        return DSMOE_OK;
    }
    dsmoe_a2a_algo algo = dsmoe_a2a_choose(ex->algo, p, ex->G, block);
    int hier = algo == DSMOE_A2A_HIERARCHICAL && ex->G > 1 && ex->N > 1;
    if (groups > 1 || hier) {
        DSMOE_TRY(grow_workspace(ex, (size_t)p * block, err));
        DSMOE_TRY(grow(rt, &ex->ws2, &ex->ws2_bytes, (size_t)p * block, err));
    }
    if (hier) DSMOE_TRY(alloc_sizes(ex, err));
    if (hier) return hierarchical_v(ex, send, send_rows, recv, recv_rows, groups, cap, row, err);
    // Flat, or hierarchical over one node or one rank per node (then one of its steps is all there is).
    dsmoe_comm_group *grp = algo == DSMOE_A2A_FLAT ? ex->group : ex->N == 1 ? ex->intra : ex->inter;
    DSMOE_TRY(flat_v(ex, grp, send, send_rows, recv, recv_rows, groups, cap, row, err));
    int64_t msgs = 0, inter_msgs = 0;
    uint64_t sent = 0, inter_sent = 0;
    for (int j = 0; j < p; j++)
        if (j != ex->rank && ex->sc[j]) {
            int other_node = j / ex->G != ex->rank / ex->G;
            msgs++, sent += ex->sc[j];
            inter_msgs += other_node, inter_sent += other_node ? ex->sc[j] : 0;
        }
    ex->last = (dsmoe_a2a_plan){.algo = algo, .ranks = p, .ranks_per_node = ex->G, .nodes = ex->N,
                                .bytes_per_peer = block, .messages = msgs, .inter_node_messages = inter_msgs,
                                .bytes_sent = sent, .inter_node_bytes = inter_sent,
                                .packed_bytes = groups > 1 ? 2 * (uint64_t)ex->sd[p] : 0};
    return DSMOE_OK;
}

void dsmoe_exchange_plan(const dsmoe_exchange *ex, size_t bytes, dsmoe_a2a_plan *plan) {
    if (dsmoe_a2a_plan_compute(ex->algo, ex->p, ex->G, bytes, plan, NULL) != DSMOE_OK)
        *plan = (dsmoe_a2a_plan){.algo = DSMOE_A2A_FLAT, .ranks = ex->p, .ranks_per_node = ex->G, .nodes = ex->N,
                                 .bytes_per_peer = bytes};
}

const dsmoe_a2a_plan *dsmoe_exchange_last(const dsmoe_exchange *ex) { return &ex->last; }
