// core/parallel/topology.c: loading a node's topology and the pure decisions made on it. See topology.h.
#define _GNU_SOURCE
#include "topology.h"

#include <stdlib.h>
#include <string.h>

struct dsmoe_topo {
    hwloc_topology_t t;
};

// ---------------------------------------------------------------------------------------------------
// Loading

// The settings every load shares: important I/O devices only (GPUs, NICs; loading every PCI bridge
// costs milliseconds per rank for nothing), and the PUs we may not use kept, so that a restriction by
// the batch system is visible.
static dsmoe_status topo_begin(dsmoe_topo **topo, unsigned long extra_flags, dsmoe_err *err) {
    *topo = calloc(1, sizeof **topo);
    if (!*topo) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory loading the topology");
    if (hwloc_topology_init(&(*topo)->t) != 0) {
        free(*topo);
        *topo = NULL;
        return dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "hwloc_topology_init failed");
    }
    hwloc_topology_set_io_types_filter((*topo)->t, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    hwloc_topology_set_flags((*topo)->t, HWLOC_TOPOLOGY_FLAG_INCLUDE_DISALLOWED | extra_flags);
    return DSMOE_OK;
}

static dsmoe_status topo_fail(dsmoe_topo **topo, dsmoe_err *err, const char *what, const char *source) {
    hwloc_topology_destroy((*topo)->t);
    free(*topo);
    *topo = NULL;
    return dsmoe_err_set(err, DSMOE_ERR_INVALID, "hwloc: cannot %s '%s' (%s)", what, source,
                         strncmp(what, "read", 4) == 0 ? "expected an hwloc XML file, e.g. from `lstopo --of xml`"
                                                       : "expected an hwloc synthetic description such as "
                                                         "\"pack:2 numa:2 core:8 pu:2\"");
}

dsmoe_status dsmoe_topo_load(const char *source, dsmoe_topo **topo, dsmoe_err *err) {
    DSMOE_TRY(topo_begin(topo, 0, err));
    if (source && strncmp(source, "synthetic:", 10) == 0) {
        if (hwloc_topology_set_synthetic((*topo)->t, source + 10) != 0)
            return topo_fail(topo, err, "use the synthetic topology", source + 10);
    } else if (source && *source) {
        if (hwloc_topology_set_xml((*topo)->t, source) != 0) return topo_fail(topo, err, "read the topology file", source);
    }
    if (hwloc_topology_load((*topo)->t) != 0) {
        const char *env = getenv("HWLOC_XMLFILE") ? getenv("HWLOC_XMLFILE") : getenv("HWLOC_SYNTHETIC");
        return topo_fail(topo, err, source && strncmp(source, "synthetic:", 10) == 0 ? "use the synthetic topology"
                                                                                        : "read the topology file",
                         source && *source ? source : env ? env : "this machine");
    }
    return DSMOE_OK;
}

// A source the program sets wins over HWLOC_XMLFILE / HWLOC_SYNTHETIC (hwloc 2.9), so every rank of a
// node gets the first rank's topology whatever its own environment says.
dsmoe_status dsmoe_topo_load_xml(const char *xml, size_t len, int this_system, dsmoe_topo **topo, dsmoe_err *err) {
    DSMOE_TRY(topo_begin(topo, this_system ? HWLOC_TOPOLOGY_FLAG_IS_THISSYSTEM : 0, err));
    if (hwloc_topology_set_xmlbuffer((*topo)->t, xml, (int)len + 1) != 0 || hwloc_topology_load((*topo)->t) != 0)
        return topo_fail(topo, err, "read the topology file", "(XML sent by the node's first rank)");
    return DSMOE_OK;
}

dsmoe_status dsmoe_topo_export_xml(const dsmoe_topo *topo, char **xml, size_t *len, dsmoe_err *err) {
    char *buf;
    int n;
    if (hwloc_topology_export_xmlbuffer(topo->t, &buf, &n, 0) != 0)
        return dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "hwloc: cannot export the topology as XML");
    *xml = malloc((size_t)n + 1);
    if (*xml) {
        memcpy(*xml, buf, (size_t)n);
        (*xml)[n] = '\0';
        *len = strlen(*xml);
    }
    hwloc_free_xmlbuffer(topo->t, buf);
    return *xml ? DSMOE_OK : dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory exporting the topology");
}

void dsmoe_topo_free(dsmoe_topo *topo) {
    if (!topo) return;
    hwloc_topology_destroy(topo->t);
    free(topo);
}

hwloc_topology_t dsmoe_topo_hwloc(const dsmoe_topo *topo) { return topo->t; }
int dsmoe_topo_is_this_system(const dsmoe_topo *topo) { return hwloc_topology_is_thissystem(topo->t); }

int dsmoe_topo_cores_in(const dsmoe_topo *topo, hwloc_const_cpuset_t set) {
    hwloc_obj_type_t type = hwloc_get_nbobjs_by_type(topo->t, HWLOC_OBJ_CORE) > 0 ? HWLOC_OBJ_CORE : HWLOC_OBJ_PU;
    int n = 0;
    for (hwloc_obj_t o = NULL; (o = hwloc_get_next_obj_by_type(topo->t, type, o));)
        n += hwloc_bitmap_intersects(o->cpuset, set);
    return n;
}

uint64_t dsmoe_topo_memory(const dsmoe_topo *topo) {
    uint64_t total = 0;
    for (hwloc_obj_t o = NULL; (o = hwloc_get_next_obj_by_type(topo->t, HWLOC_OBJ_NUMANODE, o));)
        total += o->attr->numanode.local_memory;
    return total;
}

uint64_t dsmoe_topo_numa_memory(const dsmoe_topo *topo, int os_index) {
    for (hwloc_obj_t o = NULL; (o = hwloc_get_next_obj_by_type(topo->t, HWLOC_OBJ_NUMANODE, o));)
        if ((int)o->os_index == os_index) return o->attr->numanode.local_memory;
    return 0;
}

// The GPUs a topology lists: PCI devices of class 0x03xx (display) from NVIDIA/AMD/Intel with a
// co-processor or GPU OS device below, or any 3D controller (0x0302).
static int is_gpu_pcidev(hwloc_obj_t o) {
    if (o->type != HWLOC_OBJ_PCI_DEVICE) return 0;
    if (o->attr->pcidev.class_id == 0x0302) return 1;
    for (hwloc_obj_t c = o->io_first_child; c; c = c->next_sibling)
        if (c->type == HWLOC_OBJ_OS_DEVICE &&
            (c->attr->osdev.type == HWLOC_OBJ_OSDEV_COPROC || c->attr->osdev.type == HWLOC_OBJ_OSDEV_GPU))
            return 1;
    return 0;
}

int dsmoe_topo_list_gpus(const dsmoe_topo *topo, char (*busids)[16], int max) {
    int n = 0;
    for (hwloc_obj_t o = NULL; (o = hwloc_get_next_pcidev(topo->t, o));) {
        if (!is_gpu_pcidev(o)) continue;
        if (n < max)
            snprintf(busids[n], 16, "%04x:%02x:%02x.%01x", o->attr->pcidev.domain, o->attr->pcidev.bus,
                     o->attr->pcidev.dev, o->attr->pcidev.func);
        n++;
    }
    return n < max ? n : max;
}

void dsmoe_topo_describe(const dsmoe_topo *topo, char *buf, size_t n) {
    hwloc_topology_t t = topo->t;
    int packs = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PACKAGE), numas = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE);
    int cores = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_CORE), pus = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PU);
    char busids[64][16];
    int gpus = dsmoe_topo_list_gpus(topo, busids, 64);
    size_t k = (size_t)snprintf(buf, n, "%d package%s, %d NUMA node%s, %d cores, %d PUs", packs, packs == 1 ? "" : "s",
                                numas, numas == 1 ? "" : "s", cores, pus);
    uint64_t mem = dsmoe_topo_memory(topo);
    if (mem && k < n) k += (size_t)snprintf(buf + k, n - k, ", %.1f GiB", (double)mem / (1 << 30));
    if (k < n) k += (size_t)snprintf(buf + k, n - k, ", %d GPU%s", gpus, gpus == 1 ? "" : "s");
    if (gpus > 0 && k < n) {
        dsmoe_topo_gpu_info gi;
        dsmoe_topo_gpu(topo, busids[0], &gi);
        if (gi.name[0]) k += (size_t)snprintf(buf + k, n - k, " (%s)", gi.name);
        hwloc_bitmap_free(gi.locality);
    }
}

// ---------------------------------------------------------------------------------------------------
// Binding

// PUs in both sets (hwloc 2.9 has no weight-of-intersection call).
static int weight_and(hwloc_const_bitmap_t a, hwloc_const_bitmap_t b) {
    hwloc_bitmap_t both = hwloc_bitmap_alloc();
    hwloc_bitmap_and(both, a, b);
    int w = hwloc_bitmap_weight(both);
    hwloc_bitmap_free(both);
    return w < 0 ? 0 : w;
}

static int weight_in(hwloc_obj_t o, hwloc_const_cpuset_t area) { return o->cpuset ? weight_and(o->cpuset, area) : 0; }

static void give(hwloc_obj_t o, hwloc_const_cpuset_t area, hwloc_cpuset_t set) {
    hwloc_bitmap_or(set, set, o->cpuset);
    hwloc_bitmap_and(set, set, area);
}

// Ranks [first, first + k) share object o's PUs in area. See dsmoe_topo_spread.
static void spread(hwloc_obj_t o, hwloc_const_cpuset_t area, int first, int k, hwloc_cpuset_t *sets) {
    if (k <= 0) return;
    hwloc_obj_t *kids = malloc(sizeof *kids * (o->arity > 0 ? o->arity : 1));
    int m = 0, W = 0;
    if (kids && o->type != HWLOC_OBJ_CORE && o->type != HWLOC_OBJ_PU)
        for (hwloc_obj_t c = o->first_child; c && m < (int)o->arity; c = c->next_sibling)
            if (weight_in(c, area) > 0) {
                kids[m++] = c;
                W += weight_in(c, area);
            }
    if (m == 0) { // a core, a PU or a leaf: everyone here shares it
        for (int r = first; r < first + k; r++) give(o, area, sets[r]);
        free(kids);
        return;
    }
    if (m == 1) { // a level that does not split here (a package with one NUMA node, a cache): look below
        spread(kids[0], area, first, k, sets);
        free(kids);
        return;
    }
    if (k >= m) {
        long cum = 0, prev = 0;
        for (int j = 0; j < m; j++) {
            cum += weight_in(kids[j], area);
            long upto = (long)k * cum / W;
            spread(kids[j], area, first + (int)prev, (int)(upto - prev), sets);
            prev = upto;
        }
        free(kids);
        return;
    }
    // Fewer ranks than children: child j goes to the rank its weight's midpoint falls in, so each rank
    // gets a contiguous run of children; a rank left with none (very uneven children) shares its
    // predecessor's run.
    long cum = 0;
    for (int j = 0; j < m; j++) {
        long w = weight_in(kids[j], area);
        int r = (int)(((2 * cum + w) * (long)k) / (2L * W));
        give(kids[j], area, sets[first + r]);
        cum += w;
    }
    for (int r = 1; r < k; r++)
        if (hwloc_bitmap_iszero(sets[first + r])) hwloc_bitmap_copy(sets[first + r], sets[first + r - 1]);
    free(kids);
}

dsmoe_status dsmoe_topo_spread(const dsmoe_topo *topo, hwloc_const_cpuset_t area, int n, hwloc_cpuset_t *sets,
                               dsmoe_err *err) {
    hwloc_obj_t root = hwloc_get_root_obj(topo->t);
    if (!hwloc_bitmap_intersects(root->cpuset, area)) {
        char *a = NULL;
        hwloc_bitmap_list_asprintf(&a, area);
        dsmoe_err_set(err, DSMOE_ERR_INVALID, "binding: the allowed CPUs '%s' hold no PU of the topology", a ? a : "?");
        free(a);
        return DSMOE_ERR_INVALID;
    }
    for (int r = 0; r < n; r++) hwloc_bitmap_zero(sets[r]);
    spread(root, area, 0, n, sets);
    return DSMOE_OK;
}

int dsmoe_topo_thread_cpus(const dsmoe_topo *topo, hwloc_const_cpuset_t set, int *cpus, int max) {
    int n = 0;
    hwloc_obj_type_t type = hwloc_get_nbobjs_by_type(topo->t, HWLOC_OBJ_CORE) > 0 ? HWLOC_OBJ_CORE : HWLOC_OBJ_PU;
    for (int level = 0; level < 64 && n < max; level++) {
        int any = 0;
        for (hwloc_obj_t o = NULL; n < max && (o = hwloc_get_next_obj_by_type(topo->t, type, o));) {
            hwloc_bitmap_t mine = hwloc_bitmap_alloc();
            hwloc_bitmap_and(mine, o->cpuset, set);
            int pu = hwloc_bitmap_first(mine);
            for (int i = 0; i < level && pu >= 0; i++) pu = hwloc_bitmap_next(mine, pu);
            if (pu >= 0) {
                cpus[n++] = pu;
                any = 1;
            }
            hwloc_bitmap_free(mine);
        }
        if (!any) break;
    }
    return n;
}

// ---------------------------------------------------------------------------------------------------
// GPUs and NUMA nodes

void dsmoe_topo_gpu(const dsmoe_topo *topo, const char *busid, dsmoe_topo_gpu_info *info) {
    memset(info, 0, sizeof *info);
    info->locality = hwloc_bitmap_dup(hwloc_get_root_obj(topo->t)->cpuset);
    hwloc_obj_t pci = hwloc_get_pcidev_by_busidstring(topo->t, busid);
    if (!pci) return;
    info->found = 1;
    hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(topo->t, pci);
    if (anc && anc->cpuset) hwloc_bitmap_copy(info->locality, anc->cpuset);
    for (hwloc_obj_t c = pci->io_first_child; c; c = c->next_sibling) {
        if (c->type != HWLOC_OBJ_OS_DEVICE) continue;
        const char *mem = hwloc_obj_get_info_by_name(c, "CUDAGlobalMemorySize"); // KiB
        const char *name = hwloc_obj_get_info_by_name(c, "GPUModel");
        if (mem && !info->memory_bytes) info->memory_bytes = strtoull(mem, NULL, 10) * 1024ull;
        if (name && !info->name[0]) snprintf(info->name, sizeof info->name, "%s", name);
    }
}

void dsmoe_topo_choose_gpus(const dsmoe_topo *topo, int n, const hwloc_const_cpuset_t *sets, int ndev,
                            const char (*busids)[16], int *gpu) {
    if (ndev <= 0) {
        for (int i = 0; i < n; i++) gpu[i] = -1;
        return;
    }
    int cap = (n + ndev - 1) / ndev;
    int *used = calloc((size_t)ndev, sizeof *used);
    hwloc_bitmap_t *loc = calloc((size_t)ndev, sizeof *loc);
    for (int d = 0; d < ndev; d++) {
        dsmoe_topo_gpu_info gi;
        dsmoe_topo_gpu(topo, busids[d], &gi);
        loc[d] = gi.locality;
    }
    for (int i = 0; i < n; i++) {
        int best = -1, best_share = -1;
        for (int d = 0; d < ndev; d++) {
            if (used[d] >= cap) continue;
            int share = weight_and(loc[d], sets[i]);
            if (best < 0 || share > best_share || (share == best_share && used[d] < used[best])) {
                best = d;
                best_share = share;
            }
        }
        gpu[i] = best;
        used[best]++;
    }
    for (int d = 0; d < ndev; d++) hwloc_bitmap_free(loc[d]);
    free(loc);
    free(used);
}

int dsmoe_topo_numa_of(const dsmoe_topo *topo, hwloc_const_cpuset_t set, const char *gpu_busid) {
    hwloc_bitmap_t where = hwloc_bitmap_dup(set);
    if (gpu_busid && *gpu_busid) {
        dsmoe_topo_gpu_info gi;
        dsmoe_topo_gpu(topo, gpu_busid, &gi);
        if (gi.found) hwloc_bitmap_copy(where, gi.locality);
        hwloc_bitmap_free(gi.locality);
    }
    int best = -1, best_share = 0;
    for (hwloc_obj_t o = NULL; (o = hwloc_get_next_obj_by_type(topo->t, HWLOC_OBJ_NUMANODE, o));) {
        int share = weight_and(o->cpuset, where);
        if (best < 0 || share > best_share || (share == best_share && (int)o->os_index < best)) {
            best = (int)o->os_index;
            best_share = share;
        }
    }
    hwloc_bitmap_free(where);
    return best;
}
