// core/deck/config_keys.h: the registry's types, shared by the table (config_keys.c), the loader
// (config.c) and the printers (config_print.c). Internal to the core's configuration code.
// defines: key_def, range, K_* (value types), dsmoe_config_keys, DSMOE_CONFIG_N_KEYS, dsmoe_config_v_source
#ifndef DSMOE_CONFIG_KEYS_H
#define DSMOE_CONFIG_KEYS_H
#include <stddef.h>
#include "config.h"

enum { K_INT, K_U64, K_FLOAT, K_BOOL, K_ENUM, K_STRING, K_DURATION, K_EXPERTS, K_EP_LIST };
extern const char *const dsmoe_config_type_names[]; // "int", "float", ... by K_*

// A numeric range: lo_kind '[' (>=) or '(' (>), hi_kind ']' (<=) or ')' (<), 0 = unbounded.
typedef struct range {
    double lo, hi;
    char lo_kind, hi_kind;
} range;
#define ANY {0, 0, 0, 0}
#define GE(a) {a, 0, '[', 0}
#define GT(a) {a, 0, '(', 0}
#define IN(lk, a, b, hk) {a, b, lk, hk}

typedef struct key_def {
    const char *name;
    int type;
    const char *def;     // default, as a deck would write it
    size_t off, size;    // field in dsmoe_config
    range r;
    const char *const *values; // K_ENUM: names, index = stored value
    const char *help;
} key_def;


// Room for keys in the loader's per-key arrays (config_keys.c checks the table fits at compile time).
#define DSMOE_CONFIG_MAX_KEYS 128

// Every key, in the order `dsmoe --help keys`, the resolved deck and docs/deck.md list them.
extern const key_def dsmoe_config_keys[];
extern const int dsmoe_config_n_keys;
// data.source's names, for a message of the loader.
extern const char *const dsmoe_config_v_source[];

// Where each key's value came from (the loader fills it, the printer reads it).
enum { SRC_DEFAULT, SRC_DECK, SRC_ENV, SRC_CMDLINE };
struct dsmoe_config_sources {
    char deck[1024];
    struct {
        int src, line;
    } at[DSMOE_CONFIG_MAX_KEYS];
};

// Shared by the loader (config.c) and the printers (config_print.c).
int dsmoe_config_find_key(const char *name);                     // index, or -1
int dsmoe_config_same_section(const char *a, const char *b);     // "run.x" and "run.y"
void dsmoe_config_env_name(int k, char *buf, size_t n);          // DSMOE_TRAIN_STEPS for train.steps
void dsmoe_config_range_text(const key_def *kd, char *buf, size_t n); // ">= 1", "in [0, 1)", "" when any

#endif
