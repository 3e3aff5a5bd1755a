// core/parallel/placement.h: where each rank runs (node, cores, NUMA node, GPU) and where the experts of each MoE
// layer live, decided once at start-up and printed as a table.
// defines: dsmoe_bind_policy, dsmoe_rank_place, dsmoe_placement, dsmoe_placement_create,
//          dsmoe_placement_choose_device, dsmoe_placement_free, dsmoe_placement_print,
//          dsmoe_placement_print_ranks, dsmoe_placement_print_experts, dsmoe_placement_slots
//
// The topology is loaded by one rank per node and sent to the node's others as XML (loading it costs
// tens of milliseconds and touches /sys; a 128-rank node would do that 128 times). Slots: ranks in
// node-major order (node 0's ranks by local index, then node 1's, ...). Expert-parallel groups are
// contiguous runs of slots, so a group of ep <= ranks-per-node ranks stays inside one node and a larger
// one takes whole nodes (the hierarchical all-to-all's inner step stays on-node) whatever order the
// launcher numbered the ranks in (srun -m cyclic, mpirun --map-by node). With block numbering, the usual
// one, slot = world rank.
#ifndef DSMOE_PLACEMENT_H
#define DSMOE_PLACEMENT_H
#include <stdio.h>
#include <mpi.h>
#include "config.h"
#include "dsmoe/kernel_plugin.h"
#include "topology.h"
#include "util.h"

typedef enum { DSMOE_BIND_AUTO = 0, DSMOE_BIND_CORES = 1, DSMOE_BIND_NONE = 2 } dsmoe_bind_policy;
typedef enum { DSMOE_BOUND_NOT = 0, DSMOE_BOUND_BY_DSMOE = 1, DSMOE_BOUND_BY_LAUNCHER = 2 } dsmoe_bound_by;

// One rank's place: what the start-up table and dsmoe --plan print. Plain data (sent as bytes).
typedef struct dsmoe_rank_place {
    int rank;            // world rank
    int node, local;     // node index (nodes in order of their first world rank), index among its ranks
    int slot;            // node-major position (see above)
    char host[64];
    char cpus[160];      // its PUs as an hwloc list ("0-15,128-143"); "" = not known
    int cores;           // cores in its set
    int bound_by;        // dsmoe_bound_by
    int numa;            // OS index of the NUMA node for its host buffers; -1 = not known
    int gpu;             // device ordinal for the kernel plugin; -1 = none
    char gpu_busid[16];  // PCI bus id of that device
} dsmoe_rank_place;

typedef struct dsmoe_placement {
    dsmoe_topo *topo;               // this node's topology
    int world_rank, world_size, nodes;
    int min_node_ranks, max_node_ranks; // ranks on the emptiest and the fullest node
    MPI_Comm node_comm;             // the ranks of this node (MPI_Comm_split_type SHARED)
    hwloc_cpuset_t set;             // this rank's binding
    dsmoe_rank_place me;
    dsmoe_rank_place *all;          // (world_size) every rank's, on rank 0 after choose_device
    int thread_cpus[1024];          // OS CPU ids for compute threads (kernel options), one per core first
    int n_thread_cpus;
    char node_note[512];            // rank 0's node: how its ranks were bound and why
    char restricted[800];           // "" or the warning that the batch system restricted the CPUs
} dsmoe_placement;

// Collective over MPI_COMM_WORLD: loads and shares each node's topology, gathers the bindings the ranks
// started with, decides and applies this rank's binding under `policy` (config topology.bind) and fills
// me (but the GPU). Failures are agreed (dsmoe_errors_agree) so that every rank returns together.
dsmoe_status dsmoe_placement_create(const dsmoe_config *cfg, dsmoe_placement **pl, dsmoe_err *err);

// Collective: the device each rank drives. Every rank lists the devices the kernel plugin sees
// (device_count / device_pci_bus_id, before init). When a node's ranks see the same list, they share it
// out with dsmoe_topo_choose_gpus (nearest first, at most ceil(ranks / devices) each); when the launcher
// gave each rank its own list (CUDA_VISIBLE_DEVICES per task), each picks the nearest of its own. Sets
// *device (0 for host-only plugins) and me.numa, makes that NUMA node the preferred one for host memory
// when the machine has several and the rank is bound, and gathers every rank's row to rank 0.
dsmoe_status dsmoe_placement_choose_device(dsmoe_placement *pl, const dsmoe_kernel_plugin_v3 *kern, int *device,
                                           dsmoe_err *err);

// Collective (MPI_Comm_free): NULL is a no-op.
void dsmoe_placement_free(dsmoe_placement *pl);

// Rank 0: the start-up table (topology, binding, one row per rank, then the experts of every MoE layer).
void dsmoe_placement_print(FILE *out, const dsmoe_placement *pl, const dsmoe_config *cfg);

// Pure printers shared with dsmoe --plan. rows: n ranks in world-rank order; at most max_rows rows are
// printed (the rest summarised), 0 = all.
void dsmoe_placement_print_ranks(FILE *out, const dsmoe_rank_place *rows, int n, int max_rows);
// Per distinct (experts, ep) of the MoE layers: the EP groups (slots), the nodes each spans against the
// fewest it could, and which experts each rank holds (the first max_groups groups; 0 = all).
void dsmoe_placement_print_experts(FILE *out, const dsmoe_config *cfg, const dsmoe_rank_place *rows, int n,
                                   int max_groups);

// Pure: slots for n ranks given node[i] and local[i] (node-major when every node has the same number of
// ranks, else world order). Returns 1 when node-major, 0 when it fell back to world order.
int dsmoe_placement_slots(int n, const int *node, const int *local, int *slot);

#endif
