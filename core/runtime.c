// core/runtime.c: opening and closing the pair of plugins every layer runs on. See runtime.h.
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
    return dsmoe_plugin_check_pair(rt->kern, rt->comm, err);
}

// Each rank on its own: initialising them.
static dsmoe_status init_local(const dsmoe_kernel_options *opt, dsmoe_runtime *rt, dsmoe_err *err) {
    char msg[1024] = "";
    dsmoe_status s = rt->kern->init(opt, &rt->kctx, msg, sizeof msg);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "kernel plugin '%s' (%s): init with threads=%d device=%d failed: %s", rt->kern->name,
                             rt->kernel_handle.path, opt->threads, opt->device, msg);
    msg[0] = '\0';
    s = rt->comm->init(&rt->cctx, msg, sizeof msg);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "comm plugin '%s' (%s): init failed: %s", rt->comm->name,
                             rt->comm_handle.path, msg);
    return DSMOE_OK;
}

// Collective: the world group.
static dsmoe_status open_world(dsmoe_runtime *rt, dsmoe_err *err) {
    dsmoe_status s = rt->comm->group_create(rt->cctx, MPI_COMM_WORLD, &rt->world);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "comm plugin '%s': group_create(MPI_COMM_WORLD) failed: %s", rt->comm->name,
                             rt->comm->last_error(rt->cctx));
    rt->world_rank = rt->comm->group_rank(rt->world);
    rt->world_size = rt->comm->group_size(rt->world);
    return DSMOE_OK;
}

dsmoe_status dsmoe_runtime_open_placed(const char *kernel_name, const char *comm_name, const char *plugin_path,
                                       int threads, dsmoe_placement *pl, dsmoe_runtime *rt, dsmoe_err *err) {
    memset(rt, 0, sizeof *rt);
    if (!kernel_name || !*kernel_name || !comm_name || !*comm_name)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "dsmoe_runtime_open: empty %s plugin name",
                             !kernel_name || !*kernel_name ? "kernel" : "comm");
    int mpi_up = 0;
    MPI_Initialized(&mpi_up);
    if (!mpi_up)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "dsmoe_runtime_open: MPI is not initialised (call MPI_Init first)");
    dsmoe_kernel_options opt = {.threads = threads, .device = 0, .verbose = 0};
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
    }
    if (s == DSMOE_OK) s = dsmoe_errors_agree(init_local(&opt, rt, err), err);
    if (s == DSMOE_OK) s = open_world(rt, err);
    if (s == DSMOE_OK) {
        rt->slot = pl ? pl->me.slot : rt->world_rank;
        if (pl) MPI_Comm_size(pl->node_comm, &rt->node_ranks);
    }
    if (s != DSMOE_OK) dsmoe_runtime_close(rt);
    return s;
}

dsmoe_status dsmoe_runtime_open(const char *kernel_name, const char *comm_name, const char *plugin_path,
                                int threads, dsmoe_runtime *rt, dsmoe_err *err) {
    return dsmoe_runtime_open_placed(kernel_name, comm_name, plugin_path, threads, NULL, rt, err);
}

void dsmoe_runtime_close(dsmoe_runtime *rt) {
    if (!rt) return;
    if (rt->comm) {
        if (rt->world) rt->comm->group_destroy(rt->cctx, rt->world);
        if (rt->cctx) rt->comm->finalize(rt->cctx);
    }
    if (rt->kern && rt->kctx) rt->kern->finalize(rt->kctx);
    dsmoe_plugin_unload(&rt->comm_handle);
    dsmoe_plugin_unload(&rt->kernel_handle);
    memset(rt, 0, sizeof *rt);
}
