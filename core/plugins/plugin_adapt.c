// core/plugins/plugin_adapt.c: the slot table both v1 adapters bind their init trampolines to, and the
// kernel v2 -> v3 copy (plugin_adapt.h).
#include "plugin_adapt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int dsmoe_adapt_slot_claim(dsmoe_adapt_slots *s, const void *owner, const void *v1) {
    pthread_mutex_lock(&s->lock);
    int slot = -1;
    for (int i = 0; i < DSMOE_ADAPT_V1_SLOTS && slot < 0; i++)
        if (!s->owner[i]) slot = i;
    if (slot >= 0) {
        s->owner[slot] = owner;
        s->v1[slot] = v1;
    }
    pthread_mutex_unlock(&s->lock);
    return slot;
}

const void *dsmoe_adapt_slot_v1(dsmoe_adapt_slots *s, int i) {
    pthread_mutex_lock(&s->lock);
    const void *v1 = s->v1[i];
    pthread_mutex_unlock(&s->lock);
    return v1;
}

void dsmoe_adapt_slot_release(dsmoe_adapt_slots *s, int i, const void *owner) {
    pthread_mutex_lock(&s->lock);
    if (s->owner[i] == owner) s->owner[i] = s->v1[i] = NULL;
    pthread_mutex_unlock(&s->lock);
}

// A v2 kernel table as v3: the copy lives as long as the adapter.
typedef struct kernel_v2_copy {
    dsmoe_plugin_adapter base;
    dsmoe_kernel_plugin_v3 table;
} kernel_v2_copy;

static void kernel_v2_copy_release(dsmoe_plugin_adapter *self) { free(self); }

dsmoe_status dsmoe_kernel_adapt_v2(const void *v2, const dsmoe_kernel_plugin_v3 **table,
                                   dsmoe_plugin_adapter **adapter, char *errbuf, size_t errlen) {
    *table = NULL;
    *adapter = NULL;
    kernel_v2_copy *a = calloc(1, sizeof *a); // the v3 members past the prefix stay NULL
    if (!a) {
        snprintf(errbuf, errlen, "out of memory for a copy of its table");
        return DSMOE_ERR_NOMEM;
    }
    memcpy(&a->table, v2, DSMOE_KERNEL_PLUGIN_V2_BYTES);
    a->table.api_version = DSMOE_KERNEL_API_VERSION;
    a->base.release = kernel_v2_copy_release;
    *table = &a->table;
    *adapter = &a->base;
    return DSMOE_OK;
}
