// core/parallel/placement.c: binding, GPU choice and the placement table at start-up. See placement.h.
#define _GNU_SOURCE
#include "placement.h"

#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SET_TEXT 512  // a set of PUs as a list, for people ("0-63,128-191"); long odd sets end in "..."
#define WIRE_TEXT 2048 // a set as hwloc's hex words, between ranks: 11 characters per 32 PUs, 5952 PUs

static void list_of(hwloc_const_bitmap_t set, char *buf, size_t n) {
    if (hwloc_bitmap_list_snprintf(buf, n, set) >= (int)n && n > 4) strcpy(buf + n - 4, "...");
}

// Sets travel between ranks in hex, which has a bound length (a list of scattered PUs has none).
static void to_wire(hwloc_const_bitmap_t set, char buf[WIRE_TEXT]) {
    if (hwloc_bitmap_snprintf(buf, WIRE_TEXT, set) >= WIRE_TEXT) buf[0] = '\0'; // > 5952 PUs: unknown
}

int dsmoe_placement_slots(int n, const int *node, const int *local, int *slot) {
    int nodes = 0;
    for (int i = 0; i < n; i++) nodes = node[i] + 1 > nodes ? node[i] + 1 : nodes;
    int *count = calloc((size_t)nodes, sizeof *count);
    for (int i = 0; i < n; i++) count[node[i]]++;
    int same = 1;
    for (int k = 1; k < nodes; k++) same &= count[k] == count[0];
    for (int i = 0; i < n; i++) slot[i] = same ? node[i] * count[0] + local[i] : i;
    free(count);
    return same;
}

// ---------------------------------------------------------------------------------------------------
// Topology: loaded by the node's first rank, sent to the others as XML.

static dsmoe_status share_topology(MPI_Comm node, dsmoe_topo **topo, dsmoe_err *err) {
    int local;
    MPI_Comm_rank(node, &local);
    char *xml = NULL;
    size_t len = 0;
    long head[2] = {-1, 0}; // XML length (-1: the leader failed), leader's topology is this system
    dsmoe_status s = DSMOE_OK;
    if (local == 0) {
        s = dsmoe_topo_load(NULL, topo, err);
        if (s == DSMOE_OK) s = dsmoe_topo_export_xml(*topo, &xml, &len, err);
        if (s == DSMOE_OK) head[0] = (long)len, head[1] = dsmoe_topo_is_this_system(*topo);
    }
    MPI_Bcast(head, 2, MPI_LONG, 0, node);
    if (head[0] < 0) {
        free(xml);
        if (local == 0) return s;
        dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "the node's first rank could not load the topology; its message ends the job");
        err->scope = DSMOE_SCOPE_PEER; // not a failure of this rank: the leader's message is the one to print
        return DSMOE_ERR_SYSTEM;
    }
    if (local != 0) xml = malloc((size_t)head[0] + 1);
    MPI_Bcast(xml, (int)head[0] + 1, MPI_CHAR, 0, node);
    if (local != 0) s = dsmoe_topo_load_xml(xml, (size_t)head[0], (int)head[1], topo, err);
    free(xml);
    return s;
}

// ---------------------------------------------------------------------------------------------------
// Binding

// The set this process started with: the launcher's binding, or everything it is allowed. On a
// described machine (HWLOC_XMLFILE, HWLOC_SYNTHETIC) nothing is bound: the whole allowed set.
static void initial_binding(const dsmoe_topo *topo, hwloc_cpuset_t set) {
    hwloc_topology_t t = dsmoe_topo_hwloc(topo);
    hwloc_bitmap_copy(set, hwloc_topology_get_allowed_cpuset(t));
    if (!dsmoe_topo_is_this_system(topo)) return;
    hwloc_cpuset_t cur = hwloc_bitmap_alloc();
    if (hwloc_get_cpubind(t, cur, HWLOC_CPUBIND_PROCESS) == 0 && !hwloc_bitmap_iszero(cur))
        hwloc_bitmap_and(set, set, cur);
    hwloc_bitmap_free(cur);
}

// Decides every node rank's set (each rank computes the same from the gathered start sets) and applies
// its own. started: (n * WIRE_TEXT) the start sets (to_wire), in local order.
static dsmoe_status bind_node(dsmoe_placement *pl, int policy, const char *started, int n, dsmoe_err *err) {
    hwloc_topology_t t = dsmoe_topo_hwloc(pl->topo);
    hwloc_cpuset_t area = hwloc_bitmap_alloc(), *sets = calloc((size_t)n, sizeof *sets);
    int launcher_bound = 0, local = pl->me.local;
    for (int i = 0; i < n; i++) {
        sets[i] = hwloc_bitmap_alloc();
        hwloc_bitmap_sscanf(sets[i], started + (size_t)i * WIRE_TEXT);
        hwloc_bitmap_or(area, area, sets[i]);
    }
    for (int i = 0; i < n; i++) launcher_bound |= !hwloc_bitmap_isequal(sets[i], area);

    hwloc_const_cpuset_t complete = hwloc_get_root_obj(t)->complete_cpuset;
    if (!hwloc_bitmap_isequal(area, complete)) {
        char a[SET_TEXT];
        list_of(area, a, sizeof a);
        snprintf(pl->restricted, sizeof pl->restricted,
                 "the ranks of node %d may use %d of its %d PUs (%s): the batch system or launcher restricted "
                 "them, which is normal under Slurm", pl->me.node, hwloc_bitmap_weight(area),
                 hwloc_bitmap_weight(complete), a);
    }

    dsmoe_status s = DSMOE_OK;
    int area_cores = dsmoe_topo_cores_in(pl->topo, area);
    // More ranks than cores: pinning them would stop the OS from moving a rank that waits (MPI polls)
    // off a core another needs; mpirun does not bind then either. topology.bind = cores still does.
    int oversubscribed = n > area_cores;
    if (policy == DSMOE_BIND_NONE || (policy == DSMOE_BIND_AUTO && (launcher_bound || oversubscribed))) {
        pl->me.bound_by = launcher_bound && !hwloc_bitmap_isequal(sets[local], area) ? DSMOE_BOUND_BY_LAUNCHER
                                                                                      : DSMOE_BOUND_NOT;
        if (policy == DSMOE_BIND_NONE)
            snprintf(pl->node_note, sizeof pl->node_note, "topology.bind = none: the binding is left as the ranks started");
        else if (launcher_bound)
            snprintf(pl->node_note, sizeof pl->node_note, "kept the binding the launcher made (topology.bind = auto; "
                     "cores overrides it)");
        else
            snprintf(pl->node_note, sizeof pl->node_note, "not bound: %d ranks on %d core%s of node %d (oversubscribed; "
                     "topology.bind = cores binds them anyway)", n, area_cores, area_cores == 1 ? "" : "s", pl->me.node);
    } else {
        s = dsmoe_topo_spread(pl->topo, area, n, sets, err);
        pl->me.bound_by = DSMOE_BOUND_BY_DSMOE;
        snprintf(pl->node_note, sizeof pl->node_note,
                 "dsmoe bound each rank to its own cores (topology.bind = %s): %d rank%s over %d core%s%s",
                 policy == DSMOE_BIND_AUTO ? "auto" : "cores", n, n == 1 ? "" : "s", area_cores,
                 area_cores == 1 ? "" : "s", n > area_cores ? " (oversubscribed: ranks share cores)" : "");
        if (s == DSMOE_OK && dsmoe_topo_is_this_system(pl->topo) &&
            hwloc_set_cpubind(t, sets[local], HWLOC_CPUBIND_PROCESS) != 0) {
            char a[SET_TEXT];
            list_of(sets[local], a, sizeof a);
            s = dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "binding rank %d to PUs %s failed (hwloc_set_cpubind); "
                              "topology.bind = none runs unbound", pl->world_rank, a);
        }
        // Read it back: the table must show where the rank runs, not where we asked it to.
        if (s == DSMOE_OK && dsmoe_topo_is_this_system(pl->topo)) {
            hwloc_cpuset_t now = hwloc_bitmap_alloc();
            if (hwloc_get_cpubind(t, now, HWLOC_CPUBIND_PROCESS) == 0 && !hwloc_bitmap_isequal(now, sets[local])) {
                char a[SET_TEXT], b[SET_TEXT];
                list_of(sets[local], a, sizeof a);
                list_of(now, b, sizeof b);
                s = dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "rank %d was bound to PUs %s but runs on %s; topology.bind = "
                                  "none runs unbound", pl->world_rank, a, b);
            }
            hwloc_bitmap_free(now);
        }
    }
    if (s == DSMOE_OK) {
        hwloc_bitmap_copy(pl->set, sets[local]);
        list_of(pl->set, pl->me.cpus, sizeof pl->me.cpus);
        pl->me.cores = dsmoe_topo_cores_in(pl->topo, pl->set);
        if (pl->me.bound_by != DSMOE_BOUND_NOT)
            pl->n_thread_cpus = dsmoe_topo_thread_cpus(pl->topo, pl->set, pl->thread_cpus, 1024);
    }
    for (int i = 0; i < n; i++) hwloc_bitmap_free(sets[i]);
    free(sets);
    hwloc_bitmap_free(area);
    return s;
}

// Node index (nodes numbered by their first world rank), local index, slot, and ranks per node: one
// all-gather of (the node's first world rank, local index). MPI_Comm_split_type orders a node's ranks by
// world rank, so its local index 0 is its first.
static void number_nodes(dsmoe_placement *pl) {
    int W = pl->world_size, mine[2] = {pl->world_rank, 0};
    MPI_Comm_rank(pl->node_comm, &mine[1]);
    MPI_Bcast(&mine[0], 1, MPI_INT, 0, pl->node_comm);
    int *all = malloc(sizeof(int) * 2 * (size_t)W), *node = malloc(sizeof(int) * (size_t)W);
    int *local = malloc(sizeof(int) * (size_t)W), *slot = malloc(sizeof(int) * (size_t)W);
    int *count = calloc((size_t)W, sizeof(int));
    MPI_Allgather(mine, 2, MPI_INT, all, 2, MPI_INT, MPI_COMM_WORLD);
    pl->nodes = 0;
    for (int r = 0; r < W; r++) // a node's first rank is met before its others: number nodes as met
        node[r] = all[2 * r] == r ? pl->nodes++ : node[all[2 * r]];
    for (int r = 0; r < W; r++) local[r] = all[2 * r + 1], count[node[r]]++;
    pl->min_node_ranks = W;
    pl->max_node_ranks = 0;
    for (int k = 0; k < pl->nodes; k++) {
        pl->min_node_ranks = count[k] < pl->min_node_ranks ? count[k] : pl->min_node_ranks;
        pl->max_node_ranks = count[k] > pl->max_node_ranks ? count[k] : pl->max_node_ranks;
    }
    dsmoe_placement_slots(W, node, local, slot);
    pl->me.node = node[pl->world_rank];
    pl->me.local = local[pl->world_rank];
    pl->me.slot = slot[pl->world_rank];
    free(count);
    free(slot);
    free(local);
    free(node);
    free(all);
}

dsmoe_status dsmoe_placement_create(const dsmoe_config *cfg, dsmoe_placement **out, dsmoe_err *err) {
    *out = NULL;
    dsmoe_placement *pl = calloc(1, sizeof *pl);
    if (!pl) return dsmoe_errors_agree(dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory (placement)"), err);
    MPI_Comm_rank(MPI_COMM_WORLD, &pl->world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &pl->world_size);
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &pl->node_comm);
    pl->me.rank = pl->world_rank;
    pl->me.gpu = -1;
    pl->me.numa = -1;
    gethostname(pl->me.host, sizeof pl->me.host - 1);
    number_nodes(pl);
    // A pretend node layout (moe.ranks_per_node, tests) numbers ranks in world order.
    if (cfg->ranks_per_node > 0) pl->me.slot = pl->world_rank;
    pl->set = hwloc_bitmap_alloc();

    dsmoe_status s = dsmoe_errors_agree(share_topology(pl->node_comm, &pl->topo, err), err);
    if (s == DSMOE_OK) {
        int n;
        MPI_Comm_size(pl->node_comm, &n);
        char mine[WIRE_TEXT], *started = malloc((size_t)n * WIRE_TEXT);
        hwloc_cpuset_t start = hwloc_bitmap_alloc();
        initial_binding(pl->topo, start);
        to_wire(start, mine);
        hwloc_bitmap_free(start);
        MPI_Allgather(mine, WIRE_TEXT, MPI_CHAR, started, WIRE_TEXT, MPI_CHAR, pl->node_comm);
        s = dsmoe_errors_agree(bind_node(pl, cfg->bind, started, n, err), err);
        free(started);
    }
    if (s != DSMOE_OK) {
        dsmoe_placement_free(pl);
        return s;
    }
    *out = pl;
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// GPUs

// Linux's MPOL_PREFERRED: allocate on NUMA node `node` while it has room, elsewhere after. hwloc's
// HWLOC_MEMBIND_BIND is MPOL_BIND, which would end a rank whose model outgrows one NUMA node (the OOM
// killer), where first touch would have spilled over; hwloc has no "preferred" policy. Best effort: a
// refusal (no NUMA support in the kernel) leaves the default policy.
static void prefer_numa_node(int node) {
#if defined(__linux__) && defined(SYS_set_mempolicy)
    enum { MPOL_PREFERRED_ = 1 };
    unsigned long mask[16] = {0};
    if (node < 0 || node >= (int)(sizeof mask * 8)) return;
    mask[node / (8 * (int)sizeof(unsigned long))] |= 1ul << (node % (8 * (int)sizeof(unsigned long)));
    syscall(SYS_set_mempolicy, MPOL_PREFERRED_, mask, (unsigned long)(sizeof mask * 8 + 1));
#else
    (void)node;
#endif
}

// This rank's device list from the plugin (before init). On failure err names the plugin and member.
static dsmoe_status list_devices(const dsmoe_kernel_plugin_v3 *kern, int *ndev, char (**busids)[16], dsmoe_err *err) {
    *ndev = 0;
    *busids = NULL;
    if (!kern->device_count) return DSMOE_OK;
    if (kern->device_count(ndev) != DSMOE_OK || *ndev < 0)
        return dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "kernel plugin '%s': device_count failed", kern->name);
    *busids = calloc((size_t)(*ndev > 0 ? *ndev : 1), 16);
    for (int d = 0; d < *ndev; d++) {
        char buf[64] = "";
        if (kern->device_pci_bus_id(d, buf, sizeof buf) != DSMOE_OK)
            return dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "kernel plugin '%s': device_pci_bus_id(%d) failed", kern->name, d);
        for (char *p = buf; *p; p++) *p = (char)(*p >= 'A' && *p <= 'F' ? *p - 'A' + 'a' : *p);
        if (strlen(buf) != 12 || buf[4] != ':' || buf[7] != ':' || buf[10] != '.')
            return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "kernel plugin '%s': device_pci_bus_id(%d) gave '%s'; expected "
                                 "a PCI bus id dddd:bb:dd.f", kern->name, d, buf);
        memcpy((*busids)[d], buf, 13);
    }
    return DSMOE_OK;
}

// Collective over the node even when this rank's plugin failed to list its devices (it then takes part
// with none and returns the failure), so that no rank waits for another in a collective.
static dsmoe_status choose_local(dsmoe_placement *pl, const dsmoe_kernel_plugin_v3 *kern, int *device, dsmoe_err *err) {
    int ndev, n;
    char(*busids)[16];
    dsmoe_status listed = list_devices(kern, &ndev, &busids, err);
    if (listed != DSMOE_OK) ndev = 0;
    MPI_Comm_size(pl->node_comm, &n);
    // Do the node's ranks see the same devices? The same count, and the first rank's list everywhere.
    int lo_hi[2] = {-ndev, ndev}, same;
    MPI_Allreduce(MPI_IN_PLACE, lo_hi, 2, MPI_INT, MPI_MAX, pl->node_comm);
    same = -lo_hi[0] == lo_hi[1];
    if (same && ndev > 0) {
        char(*first)[16] = malloc((size_t)ndev * 16);
        memcpy(first, busids, (size_t)ndev * 16);
        MPI_Bcast(first, ndev * 16, MPI_CHAR, 0, pl->node_comm);
        same = memcmp(first, busids, (size_t)ndev * 16) == 0;
        MPI_Allreduce(MPI_IN_PLACE, &same, 1, MPI_INT, MPI_LAND, pl->node_comm);
        free(first);
    }

    if (ndev == 0) {
        *device = 0;
    } else if (same) {
        // Everyone's set, then the shared choice; each rank keeps its own entry.
        char *sets_text = malloc((size_t)n * WIRE_TEXT), mine[WIRE_TEXT];
        to_wire(pl->set, mine);
        MPI_Allgather(mine, WIRE_TEXT, MPI_CHAR, sets_text, WIRE_TEXT, MPI_CHAR, pl->node_comm);
        hwloc_cpuset_t *sets = calloc((size_t)n, sizeof *sets);
        for (int i = 0; i < n; i++) {
            sets[i] = hwloc_bitmap_alloc();
            hwloc_bitmap_sscanf(sets[i], sets_text + (size_t)i * WIRE_TEXT);
        }
        int *gpu = malloc(sizeof(int) * (size_t)n);
        dsmoe_topo_choose_gpus(pl->topo, n, (const hwloc_const_cpuset_t *)sets, ndev, (const char(*)[16])busids, gpu);
        *device = gpu[pl->me.local];
        for (int i = 0; i < n; i++) hwloc_bitmap_free(sets[i]);
        free(sets);
        free(gpu);
        free(sets_text);
    } else {
        hwloc_const_cpuset_t mine = pl->set;
        dsmoe_topo_choose_gpus(pl->topo, 1, &mine, ndev, (const char(*)[16])busids, device);
    }
    if (ndev > 0) {
        pl->me.gpu = *device;
        snprintf(pl->me.gpu_busid, sizeof pl->me.gpu_busid, "%s", busids[*device]);
    }
    free(busids);
    return listed;
}

// Host buffers on the NUMA node next to the rank's cores and GPU, when there is a choice and the rank
// is bound (an unbound rank moves; first touch places its memory well enough).
static void place_host_memory(dsmoe_placement *pl) {
    pl->me.numa = dsmoe_topo_numa_of(pl->topo, pl->set, pl->me.gpu_busid);
    if (pl->me.numa >= 0 && pl->me.bound_by != DSMOE_BOUND_NOT && dsmoe_topo_is_this_system(pl->topo) &&
        hwloc_get_nbobjs_by_type(dsmoe_topo_hwloc(pl->topo), HWLOC_OBJ_NUMANODE) > 1)
        prefer_numa_node(pl->me.numa);
}

dsmoe_status dsmoe_placement_choose_device(dsmoe_placement *pl, const dsmoe_kernel_plugin_v3 *kern, int *device,
                                           dsmoe_err *err) {
    *device = 0;
    DSMOE_TRY(dsmoe_errors_agree(choose_local(pl, kern, device, err), err));
    place_host_memory(pl);
    if (pl->world_rank == 0) {
        free(pl->all);
        pl->all = calloc((size_t)pl->world_size, sizeof *pl->all);
    }
    MPI_Gather(&pl->me, (int)sizeof pl->me, MPI_BYTE, pl->all, (int)sizeof pl->me, MPI_BYTE, 0, MPI_COMM_WORLD);
    return DSMOE_OK;
}

void dsmoe_placement_free(dsmoe_placement *pl) {
    if (!pl) return;
    if (pl->node_comm != MPI_COMM_NULL && pl->node_comm) MPI_Comm_free(&pl->node_comm);
    if (pl->set) hwloc_bitmap_free(pl->set);
    dsmoe_topo_free(pl->topo);
    free(pl->all);
    free(pl);
}

// ---------------------------------------------------------------------------------------------------
// Tables

static const char *bound_name(int b) {
    return b == DSMOE_BOUND_BY_DSMOE ? "dsmoe" : b == DSMOE_BOUND_BY_LAUNCHER ? "launcher" : "no";
}

void dsmoe_placement_print_ranks(FILE *out, const dsmoe_rank_place *rows, int n, int max_rows) {
    int hw = 4;
    for (int i = 0; i < n; i++) hw = (int)strlen(rows[i].host) > hw ? (int)strlen(rows[i].host) : hw;
    int cw = 4;
    for (int i = 0; i < n; i++) cw = (int)strlen(rows[i].cpus) > cw ? (int)strlen(rows[i].cpus) : cw;
    fprintf(out, "  %5s %5s %5s %-*s %5s %-*s %6s %-8s %4s %-3s %s\n", "rank", "node", "local", hw, "host", "slot",
            cw, "PUs", "cores", "bound by", "NUMA", "GPU", "GPU bus id");
    int shown = max_rows > 0 && n > max_rows ? max_rows : n;
    for (int i = 0; i < shown; i++) {
        const dsmoe_rank_place *p = &rows[i];
        char numa[16] = "-", gpu[16] = "-";
        if (p->numa >= 0) snprintf(numa, sizeof numa, "%d", p->numa);
        if (p->gpu >= 0) snprintf(gpu, sizeof gpu, "%d", p->gpu);
        fprintf(out, "  %5d %5d %5d %-*s %5d %-*s %6d %-8s %4s %-3s %s\n", p->rank, p->node, p->local, hw, p->host,
                p->slot, cw, p->cpus[0] ? p->cpus : "?", p->cores, bound_name(p->bound_by), numa, gpu,
                p->gpu >= 0 ? p->gpu_busid : "-");
    }
    if (shown < n) fprintf(out, "  ... %d more ranks, placed alike on their nodes\n", n - shown);
}

// "1-10" or "1-10, 12" style list of 1-based MoE layer numbers with the same (experts, ep).
static void layer_list(const dsmoe_config *cfg, int E, int ep, char *buf, size_t n) {
    size_t k = 0;
    buf[0] = '\0';
    for (int i = 0; i < cfg->n_moe_layers && k < n; i++) {
        if (cfg->experts[i] != E || cfg->expert_parallel[i] != ep) continue;
        int j = i;
        while (j + 1 < cfg->n_moe_layers && cfg->experts[j + 1] == E && cfg->expert_parallel[j + 1] == ep) j++;
        k += (size_t)snprintf(buf + k, n - k, "%s%d", k ? ", " : "", i + 1);
        if (j > i && k < n) k += (size_t)snprintf(buf + k, n - k, "-%d", j + 1);
        i = j;
    }
}

// Member j of EP group g (core/model/model_parallel.c): groups are blocks of ep slots, or with tensor
// slicing of width tp (generation) blocks of ep data ranks of one tensor rank, slot = data rank * tp + t.
static int ep_member_slot(int g, int j, int ep, int tp) { return ((g / tp) * ep + j) * tp + g % tp; }

void dsmoe_placement_print_experts(FILE *out, const dsmoe_config *cfg, const dsmoe_rank_place *rows, int n,
                                   int max_groups) {
    int tp = cfg->mode == DSMOE_MODE_GENERATE && n % cfg->gen_tensor_parallel == 0 ? cfg->gen_tensor_parallel : 1;
    if (cfg->n_moe_layers == 0) {
        fprintf(out, "experts: none (dense model)\n");
        return;
    }
    int *by_slot = malloc(sizeof(int) * (size_t)n), max_local = 1;
    for (int i = 0; i < n; i++) by_slot[rows[i].slot] = i;
    for (int i = 0; i < n; i++) max_local = rows[i].local + 1 > max_local ? rows[i].local + 1 : max_local;
    for (int i = 0; i < cfg->n_moe_layers; i++) {
        int E = cfg->experts[i], ep = cfg->expert_parallel[i], seen = 0;
        for (int j = 0; j < i; j++) seen |= cfg->experts[j] == E && cfg->expert_parallel[j] == ep;
        if (seen) continue;
        char layers[256];
        layer_list(cfg, E, ep, layers, sizeof layers);
        int groups = n / ep, per = E / ep, fewest = (ep + max_local - 1) / max_local, worst = 0;
        for (int g = 0; g < groups; g++) {
            int spanned = 0, last = -1;
            for (int j = 0; j < ep; j++) {
                int s = ep_member_slot(g, j, ep, tp);
                if (rows[by_slot[s]].node != last) spanned++, last = rows[by_slot[s]].node;
            }
            worst = spanned > worst ? spanned : worst;
        }
        fprintf(out, "experts: MoE layer%s %s: %d experts, ep %d (%d per rank), %d EP group%s of %d rank%s, each over "
                "%d node%s (fewest possible %d); expert-data-parallel groups of %d\n", strchr(layers, ',') ||
                strchr(layers, '-') ? "s" : "", layers, E, ep, per, groups, groups == 1 ? "" : "s", ep,
                ep == 1 ? "" : "s", worst, worst == 1 ? "" : "s", fewest, n / ep);
        int shown = max_groups > 0 && groups > max_groups ? max_groups : groups;
        for (int g = 0; g < shown; g++) {
            fprintf(out, "  group %d:", g);
            for (int j = 0; j < ep; j++) {
                if (ep > 20 && j == 16) { // long groups: the first 16 and the last
                    fprintf(out, " ...");
                    j = ep - 1;
                }
                const dsmoe_rank_place *p = &rows[by_slot[ep_member_slot(g, j, ep, tp)]];
                int e0 = j * per;
                if (per == 1) fprintf(out, " r%d:e%d", p->rank, e0);
                else fprintf(out, " r%d:e%d-%d", p->rank, e0, e0 + per - 1);
            }
            fprintf(out, "\n");
        }
        if (shown < groups) fprintf(out, "  ... %d more groups alike\n", groups - shown);
    }
    free(by_slot);
}

void dsmoe_placement_print(FILE *out, const dsmoe_placement *pl, const dsmoe_config *cfg) {
    if (pl->world_rank != 0 || !pl->all) return;
    char topo[512];
    dsmoe_topo_describe(pl->topo, topo, sizeof topo);
    fprintf(out, "placement: %d rank%s on %d node%s; node 0: %s%s\n", pl->world_size, pl->world_size == 1 ? "" : "s",
            pl->nodes, pl->nodes == 1 ? "" : "s", topo,
            dsmoe_topo_is_this_system(pl->topo) ? "" : " (described by HWLOC_XMLFILE/HWLOC_SYNTHETIC: binding is not applied)");
    fprintf(out, "binding: %s\n", pl->node_note);
    if (pl->restricted[0]) fprintf(out, "binding: warning: %s\n", pl->restricted);
    dsmoe_placement_print_ranks(out, pl->all, pl->world_size, 0);
    dsmoe_placement_print_experts(out, cfg, pl->all, pl->world_size, 16); // groups alike past 16
    fflush(out);
}
