// core/plugins/runtime.h: the loaded backends every layer computes and communicates through.
// defines: dsmoe_runtime, dsmoe_rt_group, dsmoe_runtime_open, dsmoe_runtime_close, dsmoe_rt_wait, KCALL, CCALL,
//          CCOLL
#ifndef DSMOE_RUNTIME_H
#define DSMOE_RUNTIME_H
#include "dsmoe/comm_plugin.h"
#include "dsmoe/kernel_plugin.h"
#include "control.h"       // dsmoe_ctl_group
#include "op_profile.h"    // dsmoe_op_profile, KCALL and CCOLL timing
#include "plugin_loader.h" // dsmoe_plugin_handle
#include "plugin_settings.h" // dsmoe_plugin_values
#include "util.h"

// The asynchronous model (dsmoe/kernel_plugin.h): the core enqueues every kernel op on `q` and never
// reads plugin memory with the host. Host-visible results (copy_to_host) are read after dsmoe_rt_wait.
// Collectives go through CCOLL: a stream-ordered comm plugin gets them on q at once; before a
// host-progressed one the core waits for q (an event), so the plugin reads finished buffers.
typedef struct dsmoe_runtime {
    const dsmoe_kernel_plugin_v3 *kern; // expert-kernel plugin (a v1 file runs through the adapter)
    dsmoe_kernel_ctx *kctx;
    dsmoe_kernel_queue *q;              // the compute queue (the plugin's default queue)
    dsmoe_kernel_event *ev;             // the core's wait point on q (dsmoe_rt_wait)
    const dsmoe_comm_plugin_v2 *comm;   // communication plugin
    dsmoe_comm_ctx *cctx;
    dsmoe_comm_stream stream;           // q as the comm plugin sees it
    int stream_ordered;                 // comm caps & DSMOE_CCAP_STREAM_ORDERED
    int comm_staged;                    // comm is the host staging adapter in front of a host-memory plugin
    int comm_ordered;                   // comm is the fixed-order sums adapter (run.fixed_order_sums)
    int world_rank, world_size;
    int slot;                           // place in node-major order (placement.h); EP groups are contiguous
                                        // runs of slots. = world_rank unless a placement says otherwise
    int node;                           // this rank's node (placement, else found once at open)
    int node_ranks;                     // ranks on this rank's node (placement); 0 = not known (one node)
    dsmoe_ctl_group *world_ctl;         // the world's control-plane group (host statistics, splits)
    dsmoe_comm_group *world;            // all ranks (the data-parallel group)
    dsmoe_plugin_handle kernel_handle;  // the loaded files (path for messages; dlclose'd by close)
    dsmoe_plugin_handle comm_handle;
    dsmoe_plugin_values kernel_settings; // the plugins' resolved settings (what their init got)
    dsmoe_plugin_values comm_settings;
    dsmoe_op_profile *prof;             // NULL, or the per-call profile KCALL and CCOLL feed (op_profile.h;
                                        // owned by whoever set it, e.g. the training driver)
} dsmoe_runtime;

// A group of ranks as both planes see it: the control-plane group (set-up, host statistics) and the comm
// plugin's group (tensors), with the same members in the same order.
typedef struct dsmoe_rt_group {
    dsmoe_ctl_group *ctl;
    dsmoe_comm_group *comm;
} dsmoe_rt_group;

// Collective over the world: the ranks with the same color, ordered by key, as both planes' groups.
dsmoe_status dsmoe_rt_group_split(const dsmoe_runtime *rt, int color, int key, dsmoe_rt_group *g, dsmoe_err *err);
// Collective over the group (waits for q first: no queued collective may still use it). Zeroes *g.
void dsmoe_rt_group_free(const dsmoe_runtime *rt, dsmoe_rt_group *g);

// Waits until everything enqueued on q so far has run (an event recorded now, then waited on); host
// buffers filled by copy_to_host before it are then valid. Returns the plugin's sticky error if any.
dsmoe_status dsmoe_rt_wait(const dsmoe_runtime *rt, dsmoe_err *err);
// What a collective needs before it is called: nothing for a stream-ordered comm plugin or the host
// staging adapter (comm_staged.c orders its own copies on q), dsmoe_rt_wait for a host-progressed one.
dsmoe_status dsmoe_rt_before_collective(const dsmoe_runtime *rt, dsmoe_err *err);
// Allocates kernel-plugin memory (flags DSMOE_ALLOC_*), naming `what` in the error.
dsmoe_status dsmoe_rt_alloc(const dsmoe_runtime *rt, size_t bytes, uint32_t flags, void **p, const char *what,
                            dsmoe_err *err);

// Loads the kernel plugin `kernel_name` and the comm plugin `comm_name` (searching plugin_path first,
// see plugin_loader.h; NULL or "" = the default path), checks that their memory kinds meet, inits
// both (threads: 0 = the plugin decides), creates the world group from MPI_COMM_WORLD and fills
// world_rank/world_size. MPI must already be initialised; collective over MPI_COMM_WORLD. On failure
// everything opened so far is closed again and *rt is left zeroed.
dsmoe_status dsmoe_runtime_open(const char *kernel_name, const char *comm_name, const char *plugin_path,
                                int threads, dsmoe_runtime *rt, dsmoe_err *err);
// The same, with the plugins' settings resolved from cfg (plugin_settings.h; NULL = defaults and the
// environment) and placed (pl may be NULL = as above): the kernel plugin's device is chosen by pl (nearest
// GPU, placement.h) between loading and init; its compute threads are pinned to pl's thread CPUs when
// the rank is bound; threads == 0 with OMP_NUM_THREADS unset becomes the cores of the rank's binding;
// slot and node_ranks come from pl.
typedef struct dsmoe_placement dsmoe_placement;
dsmoe_status dsmoe_runtime_open_placed(const char *kernel_name, const char *comm_name, const char *plugin_path,
                                       int threads, const dsmoe_config *cfg, dsmoe_placement *pl, dsmoe_runtime *rt,
                                       dsmoe_err *err);
// Destroys the world group (collective), finalizes both plugins and unloads them. Accepts a zeroed
// or partly opened runtime; leaves *rt zeroed.
void dsmoe_runtime_close(dsmoe_runtime *rt);

// The host staging adapter (comm_staged.c): `in` (host memory, initialised as in_ctx) behind a table that
// accepts the kernel plugin's memory too; every collective goes through kern's pinned host memory on q.
// *out / *out_ctx replace the plugin and context; finalizing *out_ctx finalizes in_ctx.
dsmoe_status dsmoe_comm_staged_open(const dsmoe_comm_plugin_v2 *in, dsmoe_comm_ctx *in_ctx,
                                    const dsmoe_kernel_plugin_v3 *kern, dsmoe_kernel_ctx *kctx, dsmoe_kernel_queue *q,
                                    const dsmoe_comm_plugin_v2 **out, dsmoe_comm_ctx **out_ctx, dsmoe_err *err);

// The fixed-order sums adapter (comm_ordered.c): `in` (initialised as in_ctx, without
// DSMOE_CCAP_DETERMINISTIC) behind a table whose float32/float64 SUMs add in rank order on kern's queue q.
// *out / *out_ctx replace the plugin and context; finalizing *out_ctx finalizes in_ctx.
dsmoe_status dsmoe_comm_ordered_open(const dsmoe_comm_plugin_v2 *in, dsmoe_comm_ctx *in_ctx,
                                     const dsmoe_kernel_plugin_v3 *kern, dsmoe_kernel_ctx *kctx, dsmoe_kernel_queue *q,
                                     const dsmoe_comm_plugin_v2 **out, dsmoe_comm_ctx **out_ctx, dsmoe_err *err);

// Enqueues kernel op `op` on rt's queue (the context and queue arguments are supplied); on failure fills
// `err` with the op, the call site and the plugin's message, and returns the status from the enclosing
// function. Use inside functions that return dsmoe_status and have `dsmoe_err *err` in scope. With a
// profile recording (rt->prof, op_profile.h) the call is timed: the queue is waited before and after it.
#define KCALL(rt, op, ...)                                                                         \
    do {                                                                                           \
        DSMOE_PROF_SITE(kcall_site_, op, 0);                                                       \
        if ((rt)->prof) DSMOE_TRY(dsmoe_prof_enter((rt), err));                                    \
        dsmoe_status kcall_s_ = (rt)->kern->op((rt)->kctx, (rt)->q, ##__VA_ARGS__);                \
        if (kcall_s_ != DSMOE_OK)                                                                  \
            return dsmoe_err_set(err, kcall_s_, "kernel plugin '%s': %s failed (%s:%d): %s",        \
                                 (rt)->kern->name, #op, __FILE__, __LINE__,                        \
                                 (rt)->kern->last_error((rt)->kctx));                              \
        if ((rt)->prof) DSMOE_TRY(dsmoe_prof_leave((rt), &kcall_site_, err));                      \
    } while (0)

// The same for comm plugin members that take no stream (group_*, request_*).
#define CCALL(rt, op, ...)                                                                         \
    do {                                                                                           \
        dsmoe_status ccall_s_ = (rt)->comm->op((rt)->cctx, ##__VA_ARGS__);                           \
        if (ccall_s_ != DSMOE_OK)                                                                  \
            return dsmoe_err_set(err, ccall_s_, "comm plugin '%s': %s failed (%s:%d): %s",          \
                                 (rt)->comm->name, #op, __FILE__, __LINE__,                        \
                                 (rt)->comm->last_error((rt)->cctx));                              \
    } while (0)

// A collective: waits for q first when the comm plugin is host-progressed, passes rt's stream last.
// Timed like KCALL while a profile records (a non-blocking one: its issue; its request_wait is not).
#define CCOLL(rt, op, ...)                                                                         \
    do {                                                                                           \
        DSMOE_PROF_SITE(ccoll_site_, op, 1);                                                       \
        if ((rt)->prof) DSMOE_TRY(dsmoe_prof_enter((rt), err));                                    \
        DSMOE_TRY(dsmoe_rt_before_collective((rt), err));                                          \
        CCALL(rt, op, __VA_ARGS__, &(rt)->stream);                                                 \
        if ((rt)->prof) DSMOE_TRY(dsmoe_prof_leave((rt), &ccoll_site_, err));                      \
    } while (0)

#endif
