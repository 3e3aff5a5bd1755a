// core/plugin_loader.h: finds, loads and checks comm and expert-kernel plugins.
// defines: dsmoe_plugin_load_kernel, dsmoe_plugin_load_comm, dsmoe_plugin_check_pair,
//          dsmoe_plugin_search_path
//
// A plugin named NAME of kind KIND ("kernel" or "comm") is the file libdsmoe_KIND_NAME.so. The search
// path, in order: the directories in extra_path (':'-separated: the deck's run.plugin_path), then
// $DSMOE_PLUGIN_PATH (':'-separated), then <dir of the executable>/../lib/dsmoe, then the build tree's
// plugin directories (compiled in as DSMOE_BUILD_PLUGIN_DIRS), then the install dir
// (DSMOE_INSTALL_PLUGIN_DIR). The first file that exists is used: a later directory is never tried
// after a file was found but failed, so the message is about the file the user would expect.
// Rejections are explained: not found (with the directories searched), found but failed to load
// (dlerror), missing entry symbol, ABI version mismatch (found vs expected), or a bad table
// (NULL required member, mismatched name).
#ifndef DSMOE_PLUGIN_LOADER_H
#define DSMOE_PLUGIN_LOADER_H
#include "dsmoe/comm_plugin.h"
#include "dsmoe/kernel_plugin.h"
#include "util.h"

typedef struct dsmoe_plugin_handle {
    void *dl;            // dlopen handle
    char path[4096];     // the file that was loaded
} dsmoe_plugin_handle;

dsmoe_status dsmoe_plugin_load_kernel(const char *name, const char *extra_path,
                                      const dsmoe_kernel_plugin_v1 **plugin, dsmoe_plugin_handle *handle,
                                      dsmoe_err *err);
dsmoe_status dsmoe_plugin_load_comm(const char *name, const char *extra_path,
                                    const dsmoe_comm_plugin_v1 **plugin, dsmoe_plugin_handle *handle,
                                    dsmoe_err *err);
// Refuses a pair whose memory kinds do not meet (kernel buffers must be a kind the comm accepts).
dsmoe_status dsmoe_plugin_check_pair(const dsmoe_kernel_plugin_v1 *kernel, const dsmoe_comm_plugin_v1 *comm,
                                     dsmoe_err *err);
void dsmoe_plugin_unload(dsmoe_plugin_handle *handle);

// Writes the search path for a kind into buf as "dir1:dir2:..." (for messages and --version).
void dsmoe_plugin_search_path(const char *extra_path, char *buf, size_t len);

#endif
