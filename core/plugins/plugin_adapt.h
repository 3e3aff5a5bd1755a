// core/plugins/plugin_adapt.h: the adapters the loader wraps old plugins in (kernel v1 and v2 -> v3,
// comm v1 -> v2).
// defines: dsmoe_plugin_adapter, dsmoe_kernel_adapt_v1, dsmoe_kernel_adapt_v2, dsmoe_comm_adapt_v1,
//          DSMOE_ADAPT_V1_SLOTS, dsmoe_adapt_slots, dsmoe_adapt_slot_claim, dsmoe_adapt_slot_v1,
//          dsmoe_adapt_slot_release
//
// An adapter turns a v1 table (include/dsmoe/v1/) into a table of the newest version (kernel v3, comm v2)
// whose members call the v1 ones, so the rest of the core only ever sees the newest. One small file per
// old version, as NCCL does: core/plugins/kernel_adapt_v1.c and core/plugins/comm_adapt_v1.c. A kernel v2
// table needs no calls wrapped: it is copied as the prefix of a v3 one (plugin_adapt.c). The adapter
// object owns the table it presents; the loader keeps it in dsmoe_plugin_handle.adapter and releases it
// when the plugin is unloaded.
#ifndef DSMOE_PLUGIN_ADAPT_H
#define DSMOE_PLUGIN_ADAPT_H
#include <pthread.h>
#include <stddef.h>
#include <mpi.h> // before the comm headers: dsmoe_comm_plugin_v1 has MPI_Comm, DSMOE_MPI_ABI_STRING expands
#include "dsmoe/kernel_plugin.h"
#include "dsmoe/comm_plugin.h"
#include "dsmoe/v1/kernel_plugin_v1.h"
#include "dsmoe/v1/comm_plugin_v1.h"

// v2 init() gets no table pointer, so each adapted table has its own init trampoline bound to a fixed
// slot that names its v1 table. This many v1 plugins of each kind can be loaded at once.
#define DSMOE_ADAPT_V1_SLOTS 8

// The slots of one kind (core/plugins/plugin_adapt.c): which adapter holds each and its v1 table. Thread-safe.
typedef struct dsmoe_adapt_slots {
    pthread_mutex_t lock;
    const void *owner[DSMOE_ADAPT_V1_SLOTS];
    const void *v1[DSMOE_ADAPT_V1_SLOTS];
} dsmoe_adapt_slots;
#define DSMOE_ADAPT_SLOTS_INIT {.lock = PTHREAD_MUTEX_INITIALIZER}

// A free slot for owner and its v1 table, or -1 when all are in use.
int dsmoe_adapt_slot_claim(dsmoe_adapt_slots *s, const void *owner, const void *v1);
// The v1 table of slot i, NULL when it was released.
const void *dsmoe_adapt_slot_v1(dsmoe_adapt_slots *s, int i);
// Frees slot i if owner still holds it.
void dsmoe_adapt_slot_release(dsmoe_adapt_slots *s, int i, const void *owner);

// The part of every adapter the loader sees: release() frees the adapter and its slot (after every
// context made through its table has been finalized).
typedef struct dsmoe_plugin_adapter {
    void (*release)(struct dsmoe_plugin_adapter *self);
} dsmoe_plugin_adapter;

// Wraps v1 (already checked by the loader) in a table of the newest version (kernel v3, comm v2): *table
// points into *adapter. On failure (all slots in use, no memory) returns non-OK with a message in errbuf
// and sets both to NULL.
dsmoe_status dsmoe_kernel_adapt_v1(const dsmoe_kernel_plugin_v1 *v1, const dsmoe_kernel_plugin_v3 **table,
                                   dsmoe_plugin_adapter **adapter, char *errbuf, size_t errlen);
// Copies a version-2 kernel table (the DSMOE_KERNEL_PLUGIN_V2_BYTES-byte prefix of a v3 one) into a v3
// table owned by *adapter, whose version-3 members are NULL. No trampolines: the v2 members already take
// v3's arguments. On failure (no memory) returns non-OK with a message in errbuf and sets both to NULL.
dsmoe_status dsmoe_kernel_adapt_v2(const void *v2, const dsmoe_kernel_plugin_v3 **table,
                                   dsmoe_plugin_adapter **adapter, char *errbuf, size_t errlen);
dsmoe_status dsmoe_comm_adapt_v1(const dsmoe_comm_plugin_v1 *v1, const dsmoe_comm_plugin_v2 **table,
                                 dsmoe_plugin_adapter **adapter, char *errbuf, size_t errlen);

#endif
