// core/runtime.c: opening and closing the pair of plugins every layer runs on. See runtime.h.
#include <string.h>

#include "plugin_loader.h" // dsmoe_plugin_load_kernel, dsmoe_plugin_load_comm, dsmoe_plugin_check_pair
#include "runtime.h"

// The steps each rank takes on its own: loading and initialising the plugins.
static dsmoe_status open_local(const char *kernel_name, const char *comm_name, const char *plugin_path, int threads,
                               dsmoe_runtime *rt, dsmoe_err *err) {
    const char *path = plugin_path ? plugin_path : "";
    DSMOE_TRY(dsmoe_plugin_load_kernel(kernel_name, path, &rt->kern, &rt->kernel_handle, err));
    DSMOE_TRY(dsmoe_plugin_load_comm(comm_name, path, &rt->comm, &rt->comm_handle, err));
    DSMOE_TRY(dsmoe_plugin_check_pair(rt->kern, rt->comm, err));

    char msg[1024] = "";
    dsmoe_kernel_options opt = {.threads = threads, .device = 0, .verbose = 0};
    dsmoe_status s = rt->kern->init(&opt, &rt->kctx, msg, sizeof msg);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, s, "kernel plugin '%s' (%s): init with threads=%d failed: %s", rt->kern->name,
                             rt->kernel_handle.path, threads, msg);
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

dsmoe_status dsmoe_runtime_open(const char *kernel_name, const char *comm_name, const char *plugin_path,
                                int threads, dsmoe_runtime *rt, dsmoe_err *err) {
    memset(rt, 0, sizeof *rt);
    if (!kernel_name || !*kernel_name || !comm_name || !*comm_name)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "dsmoe_runtime_open: empty %s plugin name",
                             !kernel_name || !*kernel_name ? "kernel" : "comm");
    int mpi_up = 0;
    MPI_Initialized(&mpi_up);
    if (!mpi_up)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "dsmoe_runtime_open: MPI is not initialised (call MPI_Init first)");
    // A plugin that fails on some ranks only must not leave the others in group_create: agree first.
    dsmoe_status s = dsmoe_errors_agree(open_local(kernel_name, comm_name, plugin_path, threads, rt, err), err);
    if (s == DSMOE_OK) s = open_world(rt, err);
    if (s != DSMOE_OK) dsmoe_runtime_close(rt);
    return s;
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
