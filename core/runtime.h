// core/runtime.h: the loaded backends every layer computes and communicates through.
// defines: dsmoe_runtime, dsmoe_runtime_open, dsmoe_runtime_close, KCALL, CCALL
#ifndef DSMOE_RUNTIME_H
#define DSMOE_RUNTIME_H
#include "dsmoe/comm_plugin.h"
#include "dsmoe/kernel_plugin.h"
#include "plugin_loader.h" // dsmoe_plugin_handle
#include "util.h"

typedef struct dsmoe_runtime {
    const dsmoe_kernel_plugin_v1 *kern; // expert-kernel plugin
    dsmoe_kernel_ctx *kctx;
    const dsmoe_comm_plugin_v1 *comm;   // communication plugin
    dsmoe_comm_ctx *cctx;
    int world_rank, world_size;
    int slot;                           // place in node-major order (placement.h); EP groups are contiguous
                                        // runs of slots. = world_rank unless a placement says otherwise
    int node_ranks;                     // ranks on this rank's node (placement); 0 = not known (one node)
    dsmoe_comm_group *world;            // all ranks (the data-parallel group)
    dsmoe_plugin_handle kernel_handle;  // the loaded files (path for messages; dlclose'd by close)
    dsmoe_plugin_handle comm_handle;
} dsmoe_runtime;

// Loads the kernel plugin `kernel_name` and the comm plugin `comm_name` (searching plugin_path first,
// see plugin_loader.h; NULL or "" = the default path), checks that their memory kinds meet, inits
// both (threads: 0 = the plugin decides), creates the world group from MPI_COMM_WORLD and fills
// world_rank/world_size. MPI must already be initialised; collective over MPI_COMM_WORLD. On failure
// everything opened so far is closed again and *rt is left zeroed.
dsmoe_status dsmoe_runtime_open(const char *kernel_name, const char *comm_name, const char *plugin_path,
                                int threads, dsmoe_runtime *rt, dsmoe_err *err);
// The same, placed (pl may be NULL = as above): the kernel plugin's device is chosen by pl (nearest
// GPU, placement.h) between loading and init; its compute threads are pinned to pl's thread CPUs when
// the rank is bound; threads == 0 with OMP_NUM_THREADS unset becomes the cores of the rank's binding;
// slot and node_ranks come from pl.
typedef struct dsmoe_placement dsmoe_placement;
dsmoe_status dsmoe_runtime_open_placed(const char *kernel_name, const char *comm_name, const char *plugin_path,
                                       int threads, dsmoe_placement *pl, dsmoe_runtime *rt, dsmoe_err *err);
// Destroys the world group (collective), finalizes both plugins and unloads them. Accepts a zeroed
// or partly opened runtime; leaves *rt zeroed.
void dsmoe_runtime_close(dsmoe_runtime *rt);

// Calls kernel op `op` on rt; on failure fills `err` with the op, the call site and the plugin's
// message, and returns the status from the enclosing function. Use inside functions that return
// dsmoe_status and have `dsmoe_err *err` in scope.
#define KCALL(rt, op, ...)                                                                         \
    do {                                                                                           \
        dsmoe_status kcall_s_ = (rt)->kern->op((rt)->kctx, ##__VA_ARGS__);                           \
        if (kcall_s_ != DSMOE_OK)                                                                  \
            return dsmoe_err_set(err, kcall_s_, "kernel plugin '%s': %s failed (%s:%d): %s",        \
                                 (rt)->kern->name, #op, __FILE__, __LINE__,                        \
                                 (rt)->kern->last_error((rt)->kctx));                              \
    } while (0)

// The same for comm plugin members.
#define CCALL(rt, op, ...)                                                                         \
    do {                                                                                           \
        dsmoe_status ccall_s_ = (rt)->comm->op((rt)->cctx, ##__VA_ARGS__);                           \
        if (ccall_s_ != DSMOE_OK)                                                                  \
            return dsmoe_err_set(err, ccall_s_, "comm plugin '%s': %s failed (%s:%d): %s",          \
                                 (rt)->comm->name, #op, __FILE__, __LINE__,                        \
                                 (rt)->comm->last_error((rt)->cctx));                              \
    } while (0)

#endif
