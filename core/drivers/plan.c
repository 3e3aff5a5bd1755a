// core/drivers/plan.c: `dsmoe --plan deck`. See plan.h.
#define _GNU_SOURCE
#include "plan.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"    // dsmoe_config_load, dsmoe_config_capacity
#include "distill.h"   // dsmoe_teacher_config_load
#include "exchange.h"  // dsmoe_a2a_plan_compute, dsmoe_a2a_choose
#include "plugin_loader.h" // dsmoe_plugin_load_kernel: attention_bytes
#include "memplan.h"   // dsmoe_mem_estimate_rank
#include "placement.h" // dsmoe_rank_place, dsmoe_placement_print_ranks, dsmoe_placement_print_experts
#include "topology.h"

const char *dsmoe_plan_bytes(double bytes) {
    static char bufs[16][32];
    static int next;
    char *b = bufs[next++ % 16];
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024.0 && u < 4) bytes /= 1024.0, u++;
    if (u == 0) snprintf(b, 32, "%.0f B", bytes);
    else snprintf(b, 32, "%.2f %s", bytes, unit[u]);
    return b;
}

// A relative plan.topology is looked up from the working directory, then from the deck's directory (so
// that a deck next to its node file works from anywhere).
static void resolve_topology_path(const char *deck_path, const char *topo, char *out, size_t n) {
    snprintf(out, n, "%s", topo);
    if (!topo[0] || topo[0] == '/' || strncmp(topo, "synthetic:", 10) == 0 || access(topo, R_OK) == 0) return;
    const char *slash = strrchr(deck_path, '/');
    if (slash) snprintf(out, n, "%.*s/%s", (int)(slash - deck_path), deck_path, topo);
    if (access(out, R_OK) != 0) snprintf(out, n, "%s", topo); // the error then names what the deck says
}

// Parameter counts for people: "27264", "4.12 M", "52.473 B".
static const char *count(uint64_t n) {
    static char bufs[4][32];
    static int next;
    char *b = bufs[next++ % 4];
    if (n >= 1000000000ull) snprintf(b, 32, "%.3f B", (double)n / 1e9);
    else if (n >= 1000000ull) snprintf(b, 32, "%.2f M", (double)n / 1e6);
    else snprintf(b, 32, "%llu", (unsigned long long)n);
    return b;
}

// The rows of one node (node 0) as a run would place them: dsmoe's binding over the whole node, GPUs
// by locality when the kernel backend drives devices. Other nodes are copies with their node index.
static dsmoe_status place_node(const dsmoe_topo *topo, int rpn, int use_gpus, dsmoe_rank_place *rows,
                               dsmoe_err *err) {
    hwloc_topology_t t = dsmoe_topo_hwloc(topo);
    hwloc_cpuset_t *sets = calloc((size_t)rpn, sizeof *sets);
    for (int i = 0; i < rpn; i++) sets[i] = hwloc_bitmap_alloc();
    dsmoe_status s = dsmoe_topo_spread(topo, hwloc_topology_get_allowed_cpuset(t), rpn, sets, err);
    char busids[256][16];
    int ndev = use_gpus ? dsmoe_topo_list_gpus(topo, busids, 256) : 0;
    int *gpu = malloc(sizeof(int) * (size_t)rpn);
    if (s == DSMOE_OK) dsmoe_topo_choose_gpus(topo, rpn, (const hwloc_const_cpuset_t *)sets, ndev, busids, gpu);
    for (int i = 0; i < rpn && s == DSMOE_OK; i++) {
        dsmoe_rank_place *p = &rows[i];
        memset(p, 0, sizeof *p);
        p->rank = p->slot = i;
        p->local = i;
        snprintf(p->host, sizeof p->host, "node0");
        hwloc_bitmap_list_snprintf(p->cpus, sizeof p->cpus, sets[i]);
        p->cores = dsmoe_topo_cores_in(topo, sets[i]);
        p->bound_by = DSMOE_BOUND_BY_DSMOE;
        p->gpu = gpu[i];
        if (p->gpu >= 0) snprintf(p->gpu_busid, sizeof p->gpu_busid, "%s", busids[p->gpu]);
        p->numa = dsmoe_topo_numa_of(topo, sets[i], p->gpu_busid);
    }
    for (int i = 0; i < rpn; i++) hwloc_bitmap_free(sets[i]);
    free(sets);
    free(gpu);
    return s;
}

// What one rank may use, and where that number comes from. A device backend's rank holds its tensors in
// its GPU's memory: without a GPU in the topology that is unknown (0), not the node's host memory.
static uint64_t rank_budget(const dsmoe_config *c, const dsmoe_topo *topo, const dsmoe_rank_place *p, int rpn,
                            int device_backend, char *why, size_t n) {
    if (c->plan_memory_per_rank > 0) {
        snprintf(why, n, "plan.memory_per_rank");
        return c->plan_memory_per_rank;
    }
    if (device_backend && p->gpu < 0) {
        snprintf(why, n, "no GPU for it in the topology, and the %s backend keeps a rank's tensors in GPU memory",
                 c->kernel_backend);
        return 0;
    }
    if (p->gpu >= 0) {
        dsmoe_topo_gpu_info gi;
        dsmoe_topo_gpu(topo, p->gpu_busid, &gi);
        hwloc_bitmap_free(gi.locality);
        snprintf(why, n, "the memory of its GPU %s%s%s%s", p->gpu_busid, gi.name[0] ? " (" : "", gi.name,
                 gi.name[0] ? ")" : "");
        return gi.memory_bytes;
    }
    uint64_t node = dsmoe_topo_memory(topo);
    snprintf(why, n, "the node's %s over its %d ranks", dsmoe_plan_bytes(node), rpn);
    return node / (uint64_t)rpn;
}

// The error of a plan that cannot check memory: `why` is rank_budget's.
static dsmoe_status unknown_budget(dsmoe_err *err, const char *deck_path, const char *why) {
    return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: how much memory a rank has is unknown (%s): set "
                         "plan.memory_per_rank, or plan.topology to an hwloc XML file of the nodes the job runs on "
                         "(lstopo node.xml there)", deck_path, why);
}

// What the fit check compares with a rank's memory. Dropless capacity is data-dependent: its peak (C up
// to every token) is a bound, not a need, so it takes the allocation at start plus the checkpoint
// staging; with drops the peak is exact.
static uint64_t need_of(const dsmoe_config *c, const dsmoe_mem_estimate *e) {
    return c->drop_tokens ? e->peak_bytes : e->total_bytes + e->checkpoint_bytes;
}

// A distillation teacher's memory on rank `rank` (0 when the run does not distil). Its deck comes from
// distill.teacher_deck or the checkpoint: when neither can be read here, the plan says so and leaves it out.
static uint64_t teacher_need(FILE *out, const dsmoe_config *c, int ranks, int rank, int rpn,
                             const dsmoe_kernel_plugin_v3 *kern) {
    if (!dsmoe_config_distills(c)) return 0;
    dsmoe_config *t = malloc(sizeof *t);
    dsmoe_err e = {0};
    uint64_t bytes = 0;
    char where[1200];
    if (!t) return 0;
    if (dsmoe_teacher_config_load(c, ranks, t, where, sizeof where, &e) == DSMOE_OK)
        dsmoe_mem_teacher_bytes(t, ranks, rank, rpn, kern, &bytes, &e);
    if (e.status != DSMOE_OK)
        fprintf(out, "note: the distillation teacher is not counted: %s\n", e.msg);
    else
        fprintf(out, "  distillation teacher (%s): %d layers, forward only (parameters, activations, MoE buffers; no "
                "gradients or optimizer state): %s\n", where, t->layers, dsmoe_plan_bytes(bytes));
    free(t);
    return bytes;
}

// The largest train.micro_batch below the deck's that fits rank `rank` (a divisor of the sequences each
// rank takes per step, so the global batch stays), 0 when none does.
static int fitting_micro_batch(const dsmoe_config *c, int ranks, int rpn, int rank, uint64_t budget,
                               const dsmoe_kernel_plugin_v3 *kern) {
    dsmoe_config *t = malloc(sizeof *t);
    int found = 0;
    if (!t) return 0;
    *t = *c;
    for (int B = c->micro_batch - 1; B >= 1 && !found; B--) {
        if ((c->batch / ranks) % B != 0) continue;
        t->micro_batch = B;
        dsmoe_mem_estimate e;
        dsmoe_err ignored = {0};
        if (dsmoe_mem_estimate_rank_for(t, ranks, rank, rpn, kern, &e, &ignored) == DSMOE_OK && need_of(t, &e) <= budget)
            found = B;
    }
    free(t);
    return found;
}

static void print_groups(FILE *out, const dsmoe_config *c, int ranks) {
    fprintf(out, "groups: data parallel over all %d ranks (each takes %d of the %d sequences of a step, %d per "
            "micro-step)\n", ranks, c->batch / ranks, c->batch, c->micro_batch);
}

// Messages and bytes per rank per optimizer step for one group of MoE layers sharing (experts, ep).
static void print_alltoall(FILE *out, const dsmoe_config *c, int rpn, int micro_steps, dsmoe_err *err) {
    int S = c->micro_batch * c->seq_len;
    fprintf(out, "all-to-all per rank per optimizer step (%d micro-step%s x 4 exchanges per MoE layer: dispatch and "
            "combine, forward and backward; capacity at moe.capacity_factor%s):\n", micro_steps,
            micro_steps == 1 ? "" : "s", c->drop_tokens ? "" : "; dropless: at least this, the busiest expert decides");
    fprintf(out, "  %-20s %-13s %12s %10s %12s %12s %14s  %s\n", "MoE layers", "algorithm", "per peer", "messages",
            "sent", "to nodes", "sent to nodes", "auto picks");
    for (int i = 0; i < c->n_moe_layers; i++) {
        int E = c->experts[i], ep = c->expert_parallel[i], count = 0, seen = 0;
        for (int j = 0; j < i; j++) seen |= c->experts[j] == E && c->expert_parallel[j] == ep;
        if (seen) continue;
        for (int j = 0; j < c->n_moe_layers; j++) count += c->experts[j] == E && c->expert_parallel[j] == ep;
        int C = dsmoe_config_capacity(c, S, E, 1);
        size_t bytes = (size_t)(E / ep) * (size_t)C * (size_t)c->hidden * sizeof(float);
        // The EP group's ranks per node: a group that fits a node is inside one (slots are node-major); a
        // larger one takes whole nodes.
        int G = rpn % ep == 0 ? ep : ep % rpn == 0 ? rpn : 1; // 1: nodes hold uneven parts: flat only
        double per_step = 4.0 * micro_steps * count;
        char label[32];
        snprintf(label, sizeof label, "%d x (%d, ep %d)", count, E, ep);
        if (ep == 1) {
            fprintf(out, "  %-20s none: with ep 1 every rank holds all the layer's experts\n", label);
            continue;
        }
        dsmoe_a2a_algo pick = dsmoe_a2a_choose(DSMOE_A2A_AUTO, ep, G, bytes);
        for (int a = 0; a < 2; a++) {
            dsmoe_a2a_plan p;
            if (a == 1 && (G == 1 || G == ep)) {
                fprintf(out, "  %-20s %-13s %s\n", "", "hierarchical",
                        G == ep ? "= flat: the group is inside one node" : "n/a: nodes hold uneven parts of the group");
                continue;
            }
            if (dsmoe_a2a_plan_compute(a ? DSMOE_A2A_HIERARCHICAL : DSMOE_A2A_FLAT, ep, G, bytes, &p, err) != DSMOE_OK)
                continue;
            fprintf(out, "  %-20s %-13s %12s %10.0f %12s %12.0f %14s  %s\n", a ? "" : label, a ? "hierarchical" : "flat",
                    dsmoe_plan_bytes((double)bytes), per_step * (double)p.messages, dsmoe_plan_bytes(per_step * (double)p.bytes_sent),
                    per_step * (double)p.inter_node_messages, dsmoe_plan_bytes(per_step * (double)p.inter_node_bytes),
                    a ? "" : dsmoe_a2a_algo_name(pick));
        }
    }
}

static dsmoe_status plan(const char *deck_path, char *const *overrides, int n_overrides, FILE *out, dsmoe_err *err) {
    double t0 = dsmoe_now_seconds();
    dsmoe_config c;
    DSMOE_TRY(dsmoe_config_load(deck_path, overrides, n_overrides, NULL, 0, &c, NULL, err));
    char topo_path[2048];
    resolve_topology_path(deck_path, c.plan_topology, topo_path, sizeof topo_path);
    dsmoe_topo *topo;
    dsmoe_status s = dsmoe_topo_load(topo_path[0] ? topo_path : NULL, &topo, err);
    if (s != DSMOE_OK) {
        char m[sizeof err->msg];
        snprintf(m, sizeof m, "%s", err->msg);
        return dsmoe_err_set(err, s, "%s: plan.topology: %s", deck_path, m);
    }
    // The kernel plugin says whether ranks hold their tensors on GPUs (its mem_kind) and sizes attention's
    // state (attention_bytes works before init). Where it does not load here, any backend but cpu is
    // taken to drive GPUs, the cpu plugin's layout stands in for attention, and the plan says so.
    dsmoe_plugin_handle kh;
    memset(&kh, 0, sizeof kh);
    const dsmoe_kernel_plugin_v3 *kern = NULL;
    dsmoe_err kerr = {0};
    if (dsmoe_plugin_load_kernel(c.kernel_backend, c.plugin_path, &kern, &kh, &kerr) != DSMOE_OK) kern = NULL;
    int device_backend = kern ? kern->mem_kind != DSMOE_MEM_HOST : strcmp(c.kernel_backend, "cpu") != 0;
    char busids[256][16];
    int gpus = dsmoe_topo_list_gpus(topo, busids, 256), use_gpus = device_backend && gpus > 0;
    int cores = dsmoe_topo_cores_in(topo, hwloc_topology_get_allowed_cpuset(dsmoe_topo_hwloc(topo)));
    int rpn = c.plan_ranks_per_node > 0 ? c.plan_ranks_per_node : use_gpus ? gpus : cores;
    int64_t ranks64 = (int64_t)c.plan_nodes * rpn;
    if (ranks64 > (1 << 20)) {
        dsmoe_topo_free(topo);
        dsmoe_plugin_unload(&kh);
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: plan.nodes x ranks per node = %lld ranks: expected at most %d",
                             deck_path, (long long)ranks64, 1 << 20);
    }
    int ranks = (int)ranks64;
    // Now the rank count is known: the full checks (ep divides the ranks, batch splits evenly).
    s = dsmoe_config_load(deck_path, overrides, n_overrides, NULL, ranks, &c, NULL, err);
    dsmoe_rank_place *rows = s == DSMOE_OK ? calloc((size_t)ranks, sizeof *rows) : NULL;
    if (s == DSMOE_OK) s = place_node(topo, rpn, use_gpus, rows, err);
    if (s != DSMOE_OK) {
        free(rows);
        dsmoe_topo_free(topo);
        dsmoe_plugin_unload(&kh);
        return s;
    }
    for (int r = rpn; r < ranks; r++) {
        rows[r] = rows[r % rpn];
        rows[r].rank = rows[r].slot = r;
        rows[r].node = r / rpn;
        snprintf(rows[r].host, sizeof rows[r].host, "node%d", r / rpn);
    }

    char desc[512];
    dsmoe_topo_describe(topo, desc, sizeof desc);
    fprintf(out, "plan: deck %s: %d node%s x %d ranks = %d ranks (%s backend%s)\n", deck_path, c.plan_nodes,
            c.plan_nodes == 1 ? "" : "s", rpn, ranks, c.kernel_backend,
            use_gpus ? ", one GPU per rank where there are enough" : "");
    fprintf(out, "node: %s (%s)\n", desc, topo_path[0] ? topo_path : getenv("HWLOC_XMLFILE") ? getenv("HWLOC_XMLFILE")
                                                        : getenv("HWLOC_SYNTHETIC") ? getenv("HWLOC_SYNTHETIC") : "this machine");
    if (c.mode == DSMOE_MODE_GENERATE)
        fprintf(out, "groups: %d data-parallel groups of %d tensor rank%s; prompts split over the groups\n",
                ranks / c.gen_tensor_parallel, c.gen_tensor_parallel, c.gen_tensor_parallel == 1 ? "" : "s");
    else
        print_groups(out, &c, ranks);
    fprintf(out, "placement (node 0; every node alike; slots are node-major, so rank = slot; GPU = index in the "
            "node's PCI order):\n");
    dsmoe_placement_print_ranks(out, rows, ranks, rpn);
    dsmoe_placement_print_experts(out, &c, rows, ranks, 2);

    if (!kern)
        fprintf(out, "note: kernel plugin '%s' does not load here (%s): attention memory is sized as the cpu plugin's\n",
                c.kernel_backend, kerr.msg);
    if (device_backend && !use_gpus && !(c.plan_memory_per_rank > 0 && c.plan_ranks_per_node > 0))
        fprintf(out, "note: the topology has no GPU; the %s backend wants one per rank (plan.topology = an hwloc XML "
                "file of a GPU node, or plan.memory_per_rank and plan.ranks_per_node)\n", c.kernel_backend);
    // Memory: every rank's (ZeRO shards differ by a few elements), the largest decides.
    dsmoe_mem_estimate worst = {0}, est;
    int worst_rank = 0;
    uint64_t ckpt_host = 0; // rank 0's: it writes checkpoints
    for (int r = 0; r < ranks && s == DSMOE_OK; r++) {
        s = dsmoe_mem_estimate_rank_for(&c, ranks, r, rpn, kern, &est, err);
        if (s == DSMOE_OK && r == 0) ckpt_host = est.checkpoint_host_bytes;
        if (s == DSMOE_OK && (r == 0 || est.total_bytes > worst.total_bytes)) worst = est, worst_rank = r;
    }
    char why[256];
    uint64_t budget =
        s == DSMOE_OK ? rank_budget(&c, topo, &rows[worst_rank], rpn, device_backend, why, sizeof why) : 0;
    uint64_t need = s == DSMOE_OK ? need_of(&c, &worst) : 0;
    uint64_t node_memory = dsmoe_topo_memory(topo);
    int checkpoints = c.checkpoint_final || c.checkpoint_every > 0;
    if (s == DSMOE_OK && c.mode == DSMOE_MODE_GENERATE) {
        s = dsmoe_plan_generate(out, &c, ranks, rpn, use_gpus, budget, why, err);
        fprintf(out, "planned in %.0f ms\n", 1e3 * (dsmoe_now_seconds() - t0));
        if (s == DSMOE_OK && budget == 0) s = unknown_budget(err, deck_path, why);
        free(rows);
        dsmoe_topo_free(topo);
        dsmoe_plugin_unload(&kh);
        return s;
    }
    if (s == DSMOE_OK) {
        fprintf(out, "model: %s parameters (%s in experts), %s on the fullest rank; micro-batch %d x %d tokens, %d "
                "micro-step%s per step\n", count(worst.global_params), count(worst.global_expert_params),
                count(worst.local_params), worst.micro_batch, c.seq_len, worst.micro_steps,
                worst.micro_steps == 1 ? "" : "s");
        fprintf(out, "memory per rank (rank %d, the fullest; %s):\n", worst_rank,
                c.precision == DSMOE_PRECISION_BF16 ? "bf16 activations, fp32 master weights with a bf16 copy "
                                                      "counted in parameters"
                                                    : "fp32");
        fprintf(out, "  parameters %s, gradients %s, AdamW state %s (%s) + %s ZeRO buffers\n", dsmoe_plan_bytes(worst.param_bytes),
                dsmoe_plan_bytes(worst.grad_bytes), dsmoe_plan_bytes(worst.optimizer_bytes),
                c.zero_stage ? "ZeRO-1: sharded" : "ZeRO off: full copy", dsmoe_plan_bytes(worst.optimizer_scratch_bytes));
        fprintf(out, "  activations and scratch %s, MoE buffers %s (capacity %d) + routing %s + exchange %s\n",
                dsmoe_plan_bytes(worst.activation_bytes + worst.token_bytes), dsmoe_plan_bytes(worst.moe_buffer_bytes), worst.capacity_max,
                dsmoe_plan_bytes(worst.moe_router_bytes), dsmoe_plan_bytes(worst.exchange_bytes));
        fprintf(out, "  at start %s; peak %s (checkpoint staging %s%s)\n", dsmoe_plan_bytes(worst.total_bytes),
                dsmoe_plan_bytes(worst.peak_bytes), dsmoe_plan_bytes(worst.checkpoint_bytes),
                c.drop_tokens ? "" : "; dropless: capacity buffers may grow to the peak");
        need += teacher_need(out, &c, ranks, worst_rank, rpn, kern);
        if (budget == 0)
            fprintf(out, "  needs %s, has an unknown amount (%s)\n", dsmoe_plan_bytes(need), why);
        else
            fprintf(out, "  needs %s, has %s (%s): %s\n", dsmoe_plan_bytes(need), dsmoe_plan_bytes(budget), why,
                    need <= budget ? "fits" : "DOES NOT FIT");
        fprintf(out, "  checkpoints: one file of %s (parameters and both AdamW moments) written by rank 0, one "
                "tensor at a time: %s of its node's %s host memory (%s)\n",
                dsmoe_plan_bytes(3.0 * (double)worst.global_params * 4), dsmoe_plan_bytes(ckpt_host), dsmoe_plan_bytes(node_memory),
                !checkpoints ? "checkpoints are off" : ckpt_host <= node_memory ? "fits" : "DOES NOT FIT");
        print_alltoall(out, &c, rpn, worst.micro_steps, err);
    }
    fprintf(out, "planned in %.0f ms\n", 1e3 * (dsmoe_now_seconds() - t0));
    if (s == DSMOE_OK && budget == 0) s = unknown_budget(err, deck_path, why);
    else if (s == DSMOE_OK && checkpoints && node_memory > 0 && ckpt_host > node_memory)
        s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: the plan does not fit: writing a checkpoint stages its largest "
                          "tensor (%s) in rank 0's host memory, and its node has %s; checkpoint.final = false and "
                          "checkpoint.every = 0 train without checkpoints", deck_path, dsmoe_plan_bytes(ckpt_host),
                          dsmoe_plan_bytes(node_memory));
    else if (s == DSMOE_OK && need > budget) {
        char hint[256];
        int B = fitting_micro_batch(&c, ranks, rpn, worst_rank, budget, kern);
        if (B > 0)
            snprintf(hint, sizeof hint, "train.micro_batch = %d fits (%d micro-steps per step, the same batch)", B,
                     c.batch / (B * ranks));
        else if (c.zero_stage == 0)
            snprintf(hint, sizeof hint, "no smaller train.micro_batch fits: try train.zero_stage = 1, more ranks or a "
                     "larger moe.expert_parallel");
        else
            snprintf(hint, sizeof hint, "no smaller train.micro_batch fits: try more ranks or a larger "
                     "moe.expert_parallel");
        s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: the plan does not fit: rank %d needs %s (parameters %s, "
                          "gradients %s, AdamW state %s, activations %s, MoE buffers %s, the rest %s) but has %s (%s); "
                          "%s", deck_path, worst_rank, dsmoe_plan_bytes(need), dsmoe_plan_bytes(worst.param_bytes), dsmoe_plan_bytes(worst.grad_bytes),
                          dsmoe_plan_bytes(worst.optimizer_bytes + worst.optimizer_scratch_bytes),
                          dsmoe_plan_bytes(worst.activation_bytes + worst.token_bytes), dsmoe_plan_bytes(worst.moe_buffer_bytes),
                          dsmoe_plan_bytes(need - worst.param_bytes - worst.grad_bytes - worst.optimizer_bytes -
                                worst.optimizer_scratch_bytes - worst.activation_bytes - worst.token_bytes -
                                worst.moe_buffer_bytes), dsmoe_plan_bytes(budget), why, hint);
    }
    free(rows);
    dsmoe_topo_free(topo);
    dsmoe_plugin_unload(&kh);
    return s;
}

dsmoe_status dsmoe_plan_run(const char *deck_path, char *const *overrides, int n_overrides, FILE *out, dsmoe_err *err) {
    return plan(deck_path, overrides, n_overrides, out, err);
}
