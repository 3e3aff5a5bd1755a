// core/plugins/plugin_adapt.c: the slot table both v1 adapters bind their init trampolines to (plugin_adapt.h).
#include "plugin_adapt.h"

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
