// tests/headers/check_entry.c: loads a kernel plugin and checks its entry against the header, as the
// loader would first: the v2 symbol exists and returns a table with api_version
// DSMOE_KERNEL_API_VERSION and the expected name. Usage: check_entry <plugin.so> <name>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "dsmoe/kernel_plugin.h"

int main(int argc, char **argv) {
    if (argc != 3) return fprintf(stderr, "usage: check_entry <plugin.so> <name>\n"), 2;
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) return fprintf(stderr, "FAIL: dlopen %s: %s\n", argv[1], dlerror()), 1;
    dsmoe_kernel_plugin_entry_fn entry;
    *(void **)&entry = dlsym(h, DSMOE_KERNEL_PLUGIN_SYMBOL);
    if (!entry) return fprintf(stderr, "FAIL: %s lacks %s\n", argv[1], DSMOE_KERNEL_PLUGIN_SYMBOL), 1;
    const dsmoe_kernel_plugin_v3 *t = entry();
    if (!t) return fprintf(stderr, "FAIL: %s() returned NULL\n", DSMOE_KERNEL_PLUGIN_SYMBOL), 1;
    if (t->api_version != DSMOE_KERNEL_API_VERSION)
        return fprintf(stderr, "FAIL: api_version %u, expected %d\n", t->api_version, DSMOE_KERNEL_API_VERSION), 1;
    if (!t->name || strcmp(t->name, argv[2]) != 0)
        return fprintf(stderr, "FAIL: name '%s', expected '%s'\n", t->name ? t->name : "(null)", argv[2]), 1;
    printf("%s: %s() -> api_version %u, name '%s'\n", argv[1], DSMOE_KERNEL_PLUGIN_SYMBOL, t->api_version, t->name);
    dlclose(h);
    return 0;
}
