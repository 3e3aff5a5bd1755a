// core/deck/plugin_settings.h: a plugin's declared settings (dsmoe_param_decl, dsmoe/types.h) resolved from
// the deck's [kernel.NAME] / [comm.NAME] sections, the environment and the command line.
// defines: dsmoe_plugin_values, dsmoe_plugin_settings_resolve, dsmoe_plugin_values_free,
//          dsmoe_plugin_values_text
#ifndef DSMOE_PLUGIN_SETTINGS_H
#define DSMOE_PLUGIN_SETTINGS_H
#include "config.h"
#include "dsmoe/types.h"
#include "util.h"

// The resolved values of one plugin's settings, in declaration order (what init receives).
typedef struct dsmoe_plugin_values {
    const char *kind, *plugin;      // "kernel" / "comm", the plugin's name (borrowed)
    const dsmoe_param_decl *params; // the plugin's declarations (borrowed from its table)
    int n;
    char **values;                  // (n) normalised text: INT and FLOAT in decimal (suffix applied), BOOL "1"/"0"
    char **origin;                  // (n) "default", "deck q.deck:12", "environment DSMOE_KERNEL_CUDA_TF32",
                                    // "command line"
} dsmoe_plugin_values;

// Resolves the settings `params` (n_params) of plugin `plugin` of `kind` ("kernel" or "comm"): the
// default, then the deck, then DSMOE_<KIND>_<PLUGIN>_<KEY> in envp (NULL = environ; '-' in a name
// reads as '_'), then the command line. cfg may be NULL (defaults and environment only). A setting
// given for this plugin that it does not declare, or a value of the wrong type, is an error naming
// where it was given (*out is then empty: n 0); so is a variable DSMOE_<KIND>_<PLUGIN>_<X> whose X is
// no setting of the plugin, unless it lies under the prefix of one of the plugins of the kind there are,
// whose names may extend this one's (mpi and mpi_cuda): others(kind, others_user) lists them
// (NULL-terminated), called only when such a variable is found (listing may read directories on every
// rank); others NULL = none. Settings of other plugins are left alone (a deck may carry several).
typedef const char *const *(*dsmoe_plugin_names_fn)(const char *kind, void *user);
dsmoe_status dsmoe_plugin_settings_resolve(const dsmoe_config *cfg, const char *kind, const char *plugin,
                                           const dsmoe_param_decl *params, int n_params, char *const *envp,
                                           dsmoe_plugin_names_fn others, void *others_user, dsmoe_plugin_values *out,
                                           dsmoe_err *err);
void dsmoe_plugin_values_free(dsmoe_plugin_values *v);
// Deck text of the resolved values: "[kernel.cuda]\ntf32 = 0  # default: ...\n"; "" when there are none.
// Returns a malloc'd string (NULL on allocation failure).
char *dsmoe_plugin_values_text(const dsmoe_plugin_values *v);

#endif
