// core/plugins/plugin_files.h: the plugin loader's file side (core/plugins/plugin_files.c), internal to the loader.
// defines: dsmoe_plugin_not_found, dsmoe_plugin_check_elf
#ifndef DSMOE_PLUGIN_FILES_H
#define DSMOE_PLUGIN_FILES_H
#include <stddef.h>
#include "plugin_loader.h"

#define SEARCH_PATH_MAX 16384 // longest search path kept (all directories, ':'-joined)

// The "not found" error for plugin `name` of `kind` on `path`, listing the plugins that are there.
dsmoe_status dsmoe_plugin_not_found(const char *kind, const char *name, const char *path, dsmoe_err *err);
// 0 when `path` is a whole ELF shared object for this machine (header, program headers and every
// PT_LOAD range within the file), else non-zero with the reason in why.
int dsmoe_plugin_check_elf(const char *path, char *why, size_t len);

#endif
