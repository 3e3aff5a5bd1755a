// core/plugins/runtime.c: opening and closing the pair of plugins every layer runs on. See runtime.h.
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin_loader.h" // dsmoe_plugin_load_kernel, dsmoe_plugin_load_comm, dsmoe_plugin_check_pair
#include "placement.h" // dsmoe_placement_choose_device
#include "runtime.h"

// Each rank on its own: loading the plugins.
static dsmoe_status load_local(const char *kernel_name, const char *comm_name, const char *plugin_path,
                               dsmoe_runtime *rt, dsmoe_err *err) {
    const char *path = plugin_path ? plugin_path : "";
    DSMOE_TRY(dsmoe_plugin_load_kernel(kernel_name, path, &rt->kern, &rt->kernel_handle, err));
    DSMOE_TRY(dsmoe_plugin_load_comm(comm_name, path, &rt->comm, &rt->comm_handle, err));
    // Device memory and a host-memory comm plugin meet through pinned host staging (comm_staged.c).
    if (!(rt->kern->mem_kind & rt->comm->mem_kinds) && (rt->comm->mem_kinds & DSMOE_MEM_HOST) &&
        !(rt->kern->mem_kind & DSMOE_MEM_HOST)) {
        rt->comm_staged = 1;
        return DSMOE_OK;
    }
    return dsmoe_plugin_check_pair(rt->kern, rt->comm, err);
}

// The kernel plugin's host-callback member, as the comm plugin's stream sees it.
static dsmoe_status enqueue_host(void *owner, void (*fn)(void *arg), void *arg) {
    const dsmoe_runtime *rt = owner;
    if (!rt->kern->queue_enqueue_host) return DSMOE_ERR_UNSUPPORTED;
    return rt->kern->queue_enqueue_host(rt->kctx, rt->q, fn, arg);
}

static void log_line(void *user, dsmoe_log_level level, const char *line) {
    const dsmoe_runtime *rt = user;
    static const char *names[] = {"error", "warning", "info", "debug"};
    fprintf(stderr, "dsmoe[%d]: %s: %s\n", rt->world_rank, names[level <= DSMOE_LOG_DEBUG ? level : DSMOE_LOG_DEBUG],
            line);
}

// Each rank on its own: initialising the kernel plugin, its queue and the core's event.
static dsmoe_status init_kernel(dsmoe_kernel_options *opt, dsmoe_runtime *rt, dsmoe_err *err) {
    char msg[1024] = "";
    opt->log = log_line;
    opt->log_user = rt;
    dsmoe_status s = rt->kern->init(opt, &rt->kctx, msg, sizeof msg);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "kernel plugin '%s' (%s): init with threads=%d device=%d failed: %s", rt->kern->name,
                             rt->kernel_handle.path, opt->threads, opt->device, msg);
    rt->q = rt->kern->default_queue(rt->kctx);
    s = rt->kern->event_create(rt->kctx, &rt->ev);
    if (s != DSMOE_OK || !rt->q)
        return dsmoe_err_set(err, s != DSMOE_OK ? s : DSMOE_ERR_INTERNAL, "kernel plugin '%s': %s: %s", rt->kern->name,
                             rt->q ? "event_create failed" : "default_queue returned NULL", rt->kern->last_error(rt->kctx));
    rt->stream = (dsmoe_comm_stream){.native = rt->kern->queue_native ? rt->kern->queue_native(rt->kctx, rt->q) : NULL,
                                     .enqueue_host = rt->kern->queue_enqueue_host ? enqueue_host : NULL, .owner = rt};
    return DSMOE_OK;
}

#define MAX_OTHER_PLUGINS 64

// The plugins of a kind on the search path, listed for dsmoe_plugin_settings_resolve (those whose names
// extend the loaded one's own their environment variables) only when it meets a variable it must place.
typedef struct plugin_names {
    const char *path;
    char names[MAX_OTHER_PLUGINS][64];
    const char *ptrs[MAX_OTHER_PLUGINS + 1]; // NULL-terminated
} plugin_names;

static const char *const *plugins_of(const char *kind, void *user) {
    plugin_names *p = user;
    int n = dsmoe_plugin_list(kind, p->path ? p->path : "", p->names, MAX_OTHER_PLUGINS);
    for (int i = 0; i < n; i++) p->ptrs[i] = p->names[i];
    p->ptrs[n] = NULL;
    return p->ptrs;
}

// Collective: the comm plugin (its init sees the world's bootstrap) and the world group.
static dsmoe_status open_world(const dsmoe_config *cfg, const char *plugin_path, dsmoe_runtime *rt, dsmoe_err *err) {
    DSMOE_TRY(dsmoe_ctl_world(&rt->world_ctl, err));
    rt->world_rank = dsmoe_ctl_rank(rt->world_ctl);
    rt->world_size = dsmoe_ctl_size(rt->world_ctl);
    dsmoe_bootstrap bs;
    dsmoe_ctl_bootstrap(rt->world_ctl, &bs);
    plugin_names others = {.path = plugin_path};
    dsmoe_status s = dsmoe_errors_agree(dsmoe_plugin_settings_resolve(cfg, "comm", rt->comm->name, rt->comm->params,
                                                                      rt->comm->n_params, NULL, plugins_of, &others,
                                                                      &rt->comm_settings, err),
                                        err);
    if (s != DSMOE_OK) return s;
    dsmoe_comm_options copt = {.log = log_line, .log_user = rt, .world = &bs,
                               .param_values = (const char *const *)rt->comm_settings.values,
                               .n_param_values = rt->comm_settings.n};
    char msg[1024] = "";
    // The message first, then the agreement: a refusal every rank shares is collective (printed once).
    s = rt->comm->init(&copt, &rt->cctx, msg, sizeof msg);
    if (s != DSMOE_OK)
        dsmoe_err_set(err, s, "comm plugin '%s' (%s): init failed: %s", rt->comm->name, rt->comm_handle.path,
                      msg[0] ? msg : "(the plugin gave no message)");
    s = dsmoe_errors_agree(s, err);
    if (s != DSMOE_OK) return s;
    if (rt->comm_staged) {
        const dsmoe_comm_plugin_v2 *inner = rt->comm;
        s = dsmoe_errors_agree(dsmoe_comm_staged_open(inner, rt->cctx, rt->kern, rt->kctx, rt->q, &rt->comm, &rt->cctx, err),
                               err);
        if (s != DSMOE_OK) {
            inner->finalize(rt->cctx);
            rt->cctx = NULL;
            return s;
        }
    }
    // Float sums in the core's fixed order unless the plugin's are already (run.fixed_order_sums).
    if ((!cfg || cfg->fixed_order_sums) && !(rt->comm->caps & DSMOE_CCAP_DETERMINISTIC)) {
        const dsmoe_comm_plugin_v2 *inner = rt->comm;
        s = dsmoe_errors_agree(dsmoe_comm_ordered_open(inner, rt->cctx, rt->kern, rt->kctx, rt->q, &rt->comm, &rt->cctx, err),
                               err);
        if (s != DSMOE_OK) {
            inner->finalize(rt->cctx);
            rt->cctx = NULL;
            return s;
        }
        rt->comm_ordered = 1;
    }
    rt->stream_ordered = (rt->comm->caps & DSMOE_CCAP_STREAM_ORDERED) != 0;
    s = rt->comm->group_create(rt->cctx, &bs, &rt->world);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "comm plugin '%s': group_create(world) failed: %s", rt->comm->name,
                             rt->comm->last_error(rt->cctx));
    return DSMOE_OK;
}

dsmoe_status dsmoe_runtime_open_placed(const char *kernel_name, const char *comm_name, const char *plugin_path,
                                       int threads, const dsmoe_config *cfg, dsmoe_placement *pl, dsmoe_runtime *rt,
                                       dsmoe_err *err) {
    memset(rt, 0, sizeof *rt);
    if (!kernel_name || !*kernel_name || !comm_name || !*comm_name)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "dsmoe_runtime_open: empty %s plugin name",
                             !kernel_name || !*kernel_name ? "kernel" : "comm");
    int mpi_up = 0;
    MPI_Initialized(&mpi_up);
    if (!mpi_up)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "dsmoe_runtime_open: MPI is not initialised (call MPI_Init first)");
    dsmoe_kernel_options opt = {.threads = threads, .device = 0, .verbose = 0};
    MPI_Comm_rank(MPI_COMM_WORLD, &rt->world_rank); // for log lines before the world group exists
    // A plugin that fails on some ranks only must not leave the others in a collective: agree first.
    dsmoe_status s = dsmoe_errors_agree(load_local(kernel_name, comm_name, plugin_path, rt, err), err);
    if (s == DSMOE_OK && pl) {
        s = dsmoe_placement_choose_device(pl, rt->kern, &opt.device, err);
        if (pl->n_thread_cpus > 0) {
            opt.thread_cpus = pl->thread_cpus;
            opt.n_thread_cpus = pl->n_thread_cpus;
        }
        if (threads == 0 && !getenv("OMP_NUM_THREADS") && pl->me.bound_by != DSMOE_BOUND_NOT && pl->me.cores > 0)
            opt.threads = pl->me.cores;
        // More compute threads than CPUs runs (threads take turns on a CPU, each GEMM tile waits for the
        // slowest), but it is slow enough to say so once, from rank 0.
        const char *omp = getenv("OMP_NUM_THREADS");
        int want = opt.threads > 0 ? opt.threads : omp ? atoi(omp) : 1;
        if (pl->n_thread_cpus > 0 && want > pl->n_thread_cpus && rt->world_rank == 0)
            fprintf(stderr, "dsmoe: warning: %d compute threads (%s) on rank 0, whose binding has %d CPUs (%s): the "
                    "threads share CPUs and run slower; set run.threads to at most %d, or 0 (one per core)\n", want,
                    opt.threads > 0 ? "run.threads" : "OMP_NUM_THREADS", pl->n_thread_cpus,
                    pl->me.cpus[0] ? pl->me.cpus : "?", pl->n_thread_cpus);
    }
    if (s == DSMOE_OK) {
        plugin_names others = {.path = plugin_path};
        s = dsmoe_errors_agree(dsmoe_plugin_settings_resolve(cfg, "kernel", rt->kern->name, rt->kern->params,
                                                             rt->kern->n_params, NULL, plugins_of, &others,
                                                             &rt->kernel_settings, err),
                               err);
    }
    opt.param_values = (const char *const *)rt->kernel_settings.values;
    opt.n_param_values = rt->kernel_settings.n;
    if (s == DSMOE_OK) s = dsmoe_errors_agree(init_kernel(&opt, rt, err), err);
    if (s == DSMOE_OK) s = open_world(cfg, plugin_path, rt, err);
    if (s == DSMOE_OK) {
        rt->slot = pl ? pl->me.slot : rt->world_rank;
        if (pl) {
            MPI_Comm_size(pl->node_comm, &rt->node_ranks);
            rt->node = pl->me.node;
        } else {
            s = dsmoe_ctl_node_of_world(&rt->node, err);
        }
    }
    if (s != DSMOE_OK) dsmoe_runtime_close(rt);
    return s;
}

dsmoe_status dsmoe_runtime_open(const char *kernel_name, const char *comm_name, const char *plugin_path,
                                int threads, dsmoe_runtime *rt, dsmoe_err *err) {
    return dsmoe_runtime_open_placed(kernel_name, comm_name, plugin_path, threads, NULL, NULL, rt, err);
}

void dsmoe_runtime_close(dsmoe_runtime *rt) {
    if (!rt) return;
    if (rt->kern && rt->kctx) rt->kern->synchronize(rt->kctx); // no queued collective may outlive its group
    if (rt->comm) {
        if (rt->world) rt->comm->group_destroy(rt->cctx, rt->world);
        if (rt->cctx) rt->comm->finalize(rt->cctx);
    }
    dsmoe_ctl_free(rt->world_ctl);
    if (rt->kern && rt->kctx) {
        rt->kern->event_destroy(rt->kctx, rt->ev);
        rt->kern->finalize(rt->kctx);
    }
    dsmoe_plugin_unload(&rt->comm_handle);
    dsmoe_plugin_unload(&rt->kernel_handle);
    dsmoe_plugin_values_free(&rt->kernel_settings);
    dsmoe_plugin_values_free(&rt->comm_settings);
    memset(rt, 0, sizeof *rt);
}

dsmoe_status dsmoe_rt_wait(const dsmoe_runtime *rt, dsmoe_err *err) {
    dsmoe_status s = rt->kern->event_record(rt->kctx, rt->ev, rt->q);
    if (s == DSMOE_OK) s = rt->kern->event_synchronize(rt->kctx, rt->ev);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "kernel plugin '%s': waiting for queued work: %s", rt->kern->name,
                             rt->kern->last_error(rt->kctx));
    return DSMOE_OK;
}

// The host staging adapter needs no wait either: it reads and writes device buffers only through copies
// it queues on q behind the work before (and waits for those itself), and a one-member group's
// collective is a copy on q alone.
dsmoe_status dsmoe_rt_before_collective(const dsmoe_runtime *rt, dsmoe_err *err) {
    return rt->stream_ordered || rt->comm_staged ? DSMOE_OK : dsmoe_rt_wait(rt, err);
}

dsmoe_status dsmoe_rt_alloc(const dsmoe_runtime *rt, size_t bytes, uint32_t flags, void **p, const char *what,
                            dsmoe_err *err) {
    dsmoe_status s = rt->kern->alloc(rt->kctx, bytes, flags, p);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s == DSMOE_ERR_NOMEM ? s : DSMOE_ERR_NOMEM,
                             "allocating %s (%zu bytes) with kernel plugin '%s': %s", what, bytes, rt->kern->name,
                             rt->kern->last_error(rt->kctx));
    return DSMOE_OK;
}

dsmoe_status dsmoe_rt_group_split(const dsmoe_runtime *rt, int color, int key, dsmoe_rt_group *g, dsmoe_err *err) {
    memset(g, 0, sizeof *g);
    DSMOE_TRY(dsmoe_ctl_split(rt->world_ctl, color, key, &g->ctl, err));
    dsmoe_bootstrap bs;
    dsmoe_ctl_bootstrap(g->ctl, &bs);
    dsmoe_status s = rt->comm->group_create(rt->cctx, &bs, &g->comm);
    if (s != DSMOE_OK) {
        dsmoe_ctl_free(g->ctl);
        g->ctl = NULL;
        return dsmoe_err_set(err, s, "comm plugin '%s': group_create failed (%d ranks): %s", rt->comm->name, bs.size,
                             rt->comm->last_error(rt->cctx));
    }
    return DSMOE_OK;
}

void dsmoe_rt_group_free(const dsmoe_runtime *rt, dsmoe_rt_group *g) {
    if (!g || (!g->ctl && !g->comm)) return;
    rt->kern->synchronize(rt->kctx);
    if (g->comm) rt->comm->group_destroy(rt->cctx, g->comm);
    dsmoe_ctl_free(g->ctl);
    memset(g, 0, sizeof *g);
}
