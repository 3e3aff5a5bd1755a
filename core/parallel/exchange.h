// core/parallel/exchange.h: the all-to-all of an expert-parallel (EP) group, flat or hierarchical (DeepSpeed-MoE
// §4), built on the comm plugin's collectives so that every comm backend gets both.
// defines: dsmoe_a2a_algo, dsmoe_a2a_plan, dsmoe_a2a_plan_compute, dsmoe_a2a_choose, dsmoe_a2a_algo_name,
//          dsmoe_a2a_node_layout, dsmoe_a2a_leaders, dsmoe_exchange, dsmoe_exchange_create, dsmoe_exchange_free,
//          dsmoe_exchange_reserve, dsmoe_exchange_alltoall, dsmoe_exchange_alltoallv_rows, dsmoe_exchange_plan,
//          dsmoe_exchange_last
//
// Rank r of a group of p ranks with G ranks per node is (node n, local index g) = (r / G, r % G); there
// are N = p / G nodes. Flat: one comm-plugin alltoall, p - 1 messages per rank. Hierarchical:
//   1. pack: send (N, G) blocks -> ws (G, N) blocks: what goes to local index g' is made contiguous;
//   2. alltoall in the node (G ranks, N blocks per peer): ws -> recv; now local rank g holds, from every
//      rank of its node, the blocks for the ranks with local index g on every node, as (G_src, N_dst);
//   3. pack: recv (G_src, N_dst) -> ws (N_dst, G_src);
//   4. alltoall among the N ranks with local index g (G blocks per peer): ws -> recv. Block n*G + g_src
//      of recv now came from rank (n, g_src): exactly the flat layout, so no unpack is needed.
// (G - 1) + (N - 1) messages per rank instead of p - 1; the bytes that cross nodes are the same as
// flat ((p - G) blocks), the intra-node bytes are added on top (about twice the volume in all).
// Packing is done with the kernel plugin's 2-D copies (one per block row), so buffers may be device memory;
// every step is enqueued on the runtime's queue, collectives through CCOLL (runtime.h).
#ifndef DSMOE_EXCHANGE_H
#define DSMOE_EXCHANGE_H
#include <stddef.h>
#include <stdint.h>
#include "runtime.h"
#include "util.h"

typedef enum { DSMOE_A2A_FLAT = 0, DSMOE_A2A_HIERARCHICAL = 1, DSMOE_A2A_AUTO = 2 } dsmoe_a2a_algo;

// AUTO picks hierarchical when the group spans more than one node, has more than one rank per node,
// and the message per peer is below this many bytes (latency-bound); otherwise flat. 64 KiB is the
// usual eager/rendezvous region of MPI transports; past it, the doubled volume costs more than the
// saved message start-ups. A guess to be measured on real clusters (bench/bench_alltoall.c).
#define DSMOE_A2A_AUTO_MAX_BYTES ((size_t)64 * 1024)

// What one all-to-all does on one rank (the same on every rank of the group). Messages to oneself
// are not counted: they are local copies.
typedef struct dsmoe_a2a_plan {
    dsmoe_a2a_algo algo;         // resolved: FLAT or HIERARCHICAL, never AUTO
    int ranks, ranks_per_node, nodes; // p, G, N
    size_t bytes_per_peer;       // the call's `bytes`
    int64_t messages;            // messages this rank sends (0 when bytes_per_peer == 0)
    int64_t inter_node_messages; // of which to another node
    uint64_t bytes_sent;         // bytes this rank sends to other ranks
    uint64_t inter_node_bytes;   // of which to another node
    uint64_t packed_bytes;       // bytes copied locally by the packing steps
} dsmoe_a2a_plan;

// "flat", "hierarchical", "auto".
const char *dsmoe_a2a_algo_name(dsmoe_a2a_algo algo);

// The algorithm AUTO resolves to for p ranks, G per node and `bytes` per peer (FLAT and HIERARCHICAL
// resolve to themselves). Pure.
dsmoe_a2a_algo dsmoe_a2a_choose(dsmoe_a2a_algo algo, int p, int G, size_t bytes);

// Pure: fills *plan for an all-to-all of `bytes` per peer over p ranks with G per node (G divides p).
// Flat: p - 1 messages of `bytes`. Hierarchical: G - 1 messages of N*bytes, then N - 1 of G*bytes.
dsmoe_status dsmoe_a2a_plan_compute(dsmoe_a2a_algo algo, int p, int G, size_t bytes, dsmoe_a2a_plan *plan,
                                    dsmoe_err *err);

// Pure: checks a node layout and finds G. leader (p) = for each rank of the group, the group rank of the
// first rank on its node. Valid when every node has the same number of ranks G and holds the contiguous
// ranks [k*G, (k+1)*G). Fills err naming the first rank that breaks it.
dsmoe_status dsmoe_a2a_node_layout(const int *leader, int p, int *G, dsmoe_err *err);

// Pure: leader (p) = for each rank, the first rank with the same node id (node (p), e.g. rt->node of
// every member). leader may alias node.
void dsmoe_a2a_leaders(const int *node, int p, int *leader);

typedef struct dsmoe_exchange dsmoe_exchange; // one per EP group

// Collective over ctl (the EP group's control-plane group; the caller keeps it). Nodes are the runtime's
// (rt->node, found once) unless ranks_per_node > 0 sets G (tests and benchmarks
// pretend to have nodes: 2 on 8 ranks = 4 nodes); G must divide the group size and nodes must hold
// contiguous ranks, else DSMOE_ERR_INVALID on every rank, before any group is made. Every rank must
// pass the same algo and ranks_per_node (checked). Creates the plugin groups: the whole group, and
// unless algo is FLAT the intra-node group and the inter-node group (same local index, one per node).
// A failure after the checks (out of memory, MPI) may be on some ranks only: end the job then.
dsmoe_status dsmoe_exchange_create(const dsmoe_runtime *rt, dsmoe_ctl_group *ctl, dsmoe_a2a_algo algo, int ranks_per_node,
                                   dsmoe_exchange **ex, dsmoe_err *err);
// Collective: destroys the groups and frees the workspace. NULL is a no-op.
void dsmoe_exchange_free(dsmoe_exchange *ex);

// Local: grows the workspace now for calls of up to `bytes` per peer, so that the allocation (which can
// fail on one rank only) happens at set-up rather than inside a collective. Optional: calls grow it too.
dsmoe_status dsmoe_exchange_reserve(dsmoe_exchange *ex, size_t bytes, dsmoe_err *err);

// Collective: the same semantics as the comm plugin's alltoall. send and recv (group size * bytes) are
// kernel-plugin buffers that do not overlap; block j of send goes to rank j and block i of recv comes
// from rank i. Every rank passes the same bytes. send is not modified. Enqueued on the runtime's queue
// after the work that produced send (a host-progressed comm plugin waits for that work first).
dsmoe_status dsmoe_exchange_alltoall(dsmoe_exchange *ex, const void *send, void *recv, size_t bytes, dsmoe_err *err);

// Collective, the variable exchange (inference: only the rows that hold tokens travel, not the capacity
// padding). send and recv are (p, groups, cap, row) kernel buffers of capacity blocks: block (j, g) of send
// holds send_rows[j * groups + g] rows at its start and goes to block (me, g) of rank j; block (i, g) of
// recv receives recv_rows[i * groups + g] rows, which must be what rank i sends me (the caller exchanged
// the counts first); rows past the counts are neither sent nor written. send_rows and recv_rows (p *
// groups) are HOST arrays, read before return. Every rank passes the same groups, cap and row.
// Flat: one comm-plugin alltoallv; with groups > 1 the rows are packed per peer first (and unpacked
// after) with the kernel plugin's copies. Hierarchical: the fixed steps on packed blocks, after a small
// intra-node all-gather of what each rank sends where (so that the forwarding rank knows the sizes) and a
// wait for it. A comm plugin without alltoallv gets the fixed exchange of whole blocks instead.
// dsmoe_exchange_last then counts the messages and bytes that did travel.
dsmoe_status dsmoe_exchange_alltoallv_rows(dsmoe_exchange *ex, const void *send, const int32_t *send_rows, void *recv,
                                           const int32_t *recv_rows, int groups, size_t cap, size_t row,
                                           dsmoe_err *err);

// What a call with `bytes` per peer would do on this group (algo resolved as the call would).
void dsmoe_exchange_plan(const dsmoe_exchange *ex, size_t bytes, dsmoe_a2a_plan *plan);
// What the last successful call did. Before the first call: the layout (ranks, ranks_per_node, nodes)
// and the algorithm small messages would take; the counts are zero.
const dsmoe_a2a_plan *dsmoe_exchange_last(const dsmoe_exchange *ex);

#endif
