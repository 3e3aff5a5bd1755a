// core/plugins/plugin_loader.h: finds, loads and checks comm and expert-kernel plugins.
// defines: dsmoe_plugin_handle, dsmoe_plugin_load_kernel, dsmoe_plugin_load_comm, dsmoe_plugin_check_pair,
//          dsmoe_plugin_unload, dsmoe_plugin_search_path, dsmoe_plugin_list
//
// A plugin named NAME of kind KIND ("kernel" or "comm") is the file libdsmoe_KIND_NAME.so. The search
// path, in order: the directories in extra_path (':'-separated: the deck's run.plugin_path), then
// $DSMOE_PLUGIN_PATH (':'-separated), then <dir of the executable>/../lib/dsmoe, then the build tree's
// plugin directories (compiled in as DSMOE_BUILD_PLUGIN_DIRS), then the install dir
// (DSMOE_INSTALL_PLUGIN_DIR). The first file that exists is used: a later directory is never tried
// after a file was found but failed, so the message is about the file the user would expect. An entry
// of extra_path or $DSMOE_PLUGIN_PATH that is missing, not a directory or unreadable is an error naming
// it and its source (never a silent fall-back to the bundled plugin); the built-in dirs may be missing.
//
// Versions: this dsmoe speaks kernel ABI 3 and comm ABI 2, and every older version through an adapter
// (core/plugins/kernel_adapt_v1.c, core/plugins/comm_adapt_v1.c; a kernel v2 table is copied as the
// prefix of a v3 one, plugin_adapt.c). The loader looks up the newest entry symbol first, then each
// older one, and adapts an older table so that the caller only ever sees the newest table type (v3
// kernel, v2 comm); handle.api_version says which the file speaks. At most DSMOE_ADAPT_V1_SLOTS (8) v1
// plugins of each kind can be loaded at once.
//
// Rejections are explained, each naming the file: not found (with the directories searched), found but
// not a whole ELF shared object for this machine (checked before dlopen, which would die of SIGBUS in
// a truncated file: bad magic, class, byte order, e_type, e_machine, or a program header table or
// PT_LOAD segment past the end of the file), found but failed to load (dlerror), no entry symbol, an ABI version this dsmoe does not speak (both numbers), or
// a bad table: a required member NULL (named), an optional group half set (device_count and
// device_pci_bus_id, queue_create and queue_destroy, the inference members with DSMOE_KCAP_INFERENCE,
// the non-blocking trio with DSMOE_CCAP_NONBLOCKING), dtypes without float32 or a bfloat16 bit that
// disagrees with DSMOE_KCAP_BF16, a bad memory kind, a malformed settings list, a table name that is
// not the file's, or a comm plugin built against another MPI than this dsmoe (both mpi_abi strings).
#ifndef DSMOE_PLUGIN_LOADER_H
#define DSMOE_PLUGIN_LOADER_H
#include "dsmoe/comm_plugin.h"
#include "dsmoe/kernel_plugin.h"
#include "util.h"

typedef struct dsmoe_plugin_handle {
    void *dl;            // dlopen handle
    char path[4096];     // the file that was loaded
    int api_version;     // the ABI version the file speaks (1 = running through the v1 adapter)
    void *adapter;       // adapter state (owned, freed by dsmoe_plugin_unload); NULL for a newest-version file
} dsmoe_plugin_handle;

// On success *plugin is a v3 table valid until dsmoe_plugin_unload(handle); on failure *plugin is NULL,
// handle holds nothing to unload (unloading it is still harmless) and err says why.
dsmoe_status dsmoe_plugin_load_kernel(const char *name, const char *extra_path,
                                      const dsmoe_kernel_plugin_v3 **plugin, dsmoe_plugin_handle *handle,
                                      dsmoe_err *err);
dsmoe_status dsmoe_plugin_load_comm(const char *name, const char *extra_path,
                                    const dsmoe_comm_plugin_v2 **plugin, dsmoe_plugin_handle *handle,
                                    dsmoe_err *err);
// Refuses a pair whose memory kinds do not meet (kernel buffers must be a kind the comm accepts).
dsmoe_status dsmoe_plugin_check_pair(const dsmoe_kernel_plugin_v3 *k, const dsmoe_comm_plugin_v2 *c,
                                     dsmoe_err *err);
// Frees the adapter (if any) and closes the file; every context made through the table must be
// finalized first. NULL and a handle already unloaded are no-ops.
void dsmoe_plugin_unload(dsmoe_plugin_handle *handle);

// The names of the plugins of `kind` ("kernel" or "comm") on the search path, sorted, at most max.
int dsmoe_plugin_list(const char *kind, const char *extra_path, char (*names)[64], int max);

// Writes the search path for a kind into buf as "dir1:dir2:..." (for messages and --version).
void dsmoe_plugin_search_path(const char *extra_path, char *buf, size_t len);

#endif
