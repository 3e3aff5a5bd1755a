// core/parallel/topology.h: one node's hardware as hwloc (2.x) sees it, and the pure decisions made on it: which
// cores each rank of the node runs on, which GPU it drives, which NUMA node holds its host buffers.
// defines: dsmoe_topo, dsmoe_topo_load, dsmoe_topo_load_xml, dsmoe_topo_export_xml, dsmoe_topo_free,
//          dsmoe_topo_hwloc, dsmoe_topo_describe, dsmoe_topo_spread, dsmoe_topo_gpu, dsmoe_topo_choose_gpus,
//          dsmoe_topo_numa_of, dsmoe_topo_thread_cpus, dsmoe_topo_cores_in
//
// Topologies are loaded with the I/O filter KEEP_IMPORTANT (GPUs and NICs, not every bridge) and with
// disallowed PUs kept, so that a batch system's restriction shows as allowed < complete. hwloc's own
// environment (HWLOC_XMLFILE, HWLOC_SYNTHETIC) replaces the machine: that is how tests and plans
// describe nodes that are not here. Nothing here binds or talks MPI (core/parallel/placement.c does both).
#ifndef DSMOE_TOPOLOGY_H
#define DSMOE_TOPOLOGY_H
#include <stddef.h>
#include <stdint.h>
#include <hwloc.h>
#include "util.h"

typedef struct dsmoe_topo dsmoe_topo;

// source NULL or "" = this machine (or what HWLOC_XMLFILE / HWLOC_SYNTHETIC say); "synthetic:<desc>" =
// an hwloc synthetic description ("pack:2 numa:2 core:8 pu:2"); anything else = an hwloc XML file.
dsmoe_status dsmoe_topo_load(const char *source, dsmoe_topo **topo, dsmoe_err *err);
// From an XML buffer another rank exported. this_system = 1 when the exporter loaded the real machine
// this process runs on (binding then acts; on a described machine it does nothing).
dsmoe_status dsmoe_topo_load_xml(const char *xml, size_t len, int this_system, dsmoe_topo **topo, dsmoe_err *err);
// malloc'd XML text of the topology (*len without the terminating NUL).
dsmoe_status dsmoe_topo_export_xml(const dsmoe_topo *topo, char **xml, size_t *len, dsmoe_err *err);
void dsmoe_topo_free(dsmoe_topo *topo);

hwloc_topology_t dsmoe_topo_hwloc(const dsmoe_topo *topo);
int dsmoe_topo_is_this_system(const dsmoe_topo *topo);
// "2 packages, 8 NUMA nodes, 64 cores, 128 PUs, 512.0 GiB, 8 GPUs (NVIDIA A100-SXM4-80GB)".
void dsmoe_topo_describe(const dsmoe_topo *topo, char *buf, size_t n);
// Cores (objects of type Core, or PUs where a topology has no cores) that intersect set.
int dsmoe_topo_cores_in(const dsmoe_topo *topo, hwloc_const_cpuset_t set);

// Binding of n ranks over `area` (the PUs the node's ranks may use): fills sets[0..n) (allocated by the
// caller). Recursively from the machine down: at an object holding k ranks whose children (those with
// PUs in area) number m, k >= m spreads the ranks over the children in proportion to their PUs in area
// (child j gets floor(k*cum_j/W) - floor(k*cum_{j-1}/W)), k < m gives each rank a contiguous run of
// children of about equal weight and stops there; a Core, a PU or a leaf gives every rank it holds all of
// its PUs in area (oversubscription: ranks share). So 2 ranks on 2 packages get one package each, 4 ranks
// on 2x2 NUMA nodes one NUMA node each, 3 ranks on 2 NUMA nodes of 8 cores get 8, 4 and 4 cores, and no
// rank's set straddles a package or NUMA node unless ranks outnumber them. Returns DSMOE_ERR_INVALID when
// area holds no PU of the topology.
dsmoe_status dsmoe_topo_spread(const dsmoe_topo *topo, hwloc_const_cpuset_t area, int n, hwloc_cpuset_t *sets,
                               dsmoe_err *err);

// What the topology knows of the GPU at PCI bus id busid ("0000:07:00.0"): found (0/1), the cpuset
// of its nearest non-I/O ancestor (the cores it is local to; the whole machine when not found),
// its memory in bytes (hwloc's CUDAGlobalMemorySize info; 0 = unknown) and name ("" = unknown).
typedef struct dsmoe_topo_gpu_info {
    int found;
    hwloc_cpuset_t locality; // owned by the caller: hwloc_bitmap_free
    uint64_t memory_bytes;
    char name[96];
} dsmoe_topo_gpu_info;
void dsmoe_topo_gpu(const dsmoe_topo *topo, const char *busid, dsmoe_topo_gpu_info *info);
// Every GPU the topology itself lists (OS devices of hwloc's CUDA/NVML backends, or a described node's
// fake ones), in topology order: up to max bus ids into busids[i] (16 bytes each). Returns the count.
int dsmoe_topo_list_gpus(const dsmoe_topo *topo, char (*busids)[16], int max);

// GPU per rank: n ranks with cpusets sets, ndev devices with PCI bus ids busids (device ordinal =
// index). Each device takes at most ceil(n / ndev) ranks; rank by rank in order, a rank takes, among
// devices with room, the one whose locality shares the most PUs with its set, then the least used,
// then the lowest ordinal. gpu[i] receives the ordinal (-1 when ndev == 0).
void dsmoe_topo_choose_gpus(const dsmoe_topo *topo, int n, const hwloc_const_cpuset_t *sets, int ndev,
                            const char (*busids)[16], int *gpu);

// The NUMA node (OS index) for a rank's host buffers: the one local to its GPU when it has one, else the
// one holding most of its set (ties: the lowest OS index); -1 when the topology has no NUMA node.
int dsmoe_topo_numa_of(const dsmoe_topo *topo, hwloc_const_cpuset_t set, const char *gpu_busid);
// Memory of NUMA node os_index in bytes (0 = unknown).
uint64_t dsmoe_topo_numa_memory(const dsmoe_topo *topo, int os_index);
// Total memory of the machine in bytes (0 = unknown).
uint64_t dsmoe_topo_memory(const dsmoe_topo *topo);

// OS CPU ids to pin compute threads to inside set, one per core first (the first PU of each core in
// topology order), then the second PUs, and so on; returns the count (<= max).
int dsmoe_topo_thread_cpus(const dsmoe_topo *topo, hwloc_const_cpuset_t set, int *cpus, int max);

#endif
