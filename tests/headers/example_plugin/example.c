// tests/headers/example_plugin/example.c: the smallest kernel plugin that the loader reads past its
// version check: a v2 table naming itself "example". It computes nothing (every member NULL), so the
// loader's table check would refuse it; it exists to prove the package's build rules (name, visibility).
#include "dsmoe/kernel_plugin.h"

// A helper with external linkage: hidden visibility must keep it out of the dynamic symbol table.
int example_helper(int x);
int example_helper(int x) { return x + 1; }

static const dsmoe_kernel_plugin_v3 table = {
    .api_version = DSMOE_KERNEL_API_VERSION,
    .name = "example",
    .description = "out-of-tree example built with find_package(dsmoe)",
    .mem_kind = DSMOE_MEM_HOST,
    .dtypes = DSMOE_DTYPE_BIT(DSMOE_FLOAT32),
};

DSMOE_PLUGIN_EXPORT const dsmoe_kernel_plugin_v3 *DSMOE_KERNEL_PLUGIN_ENTRY(void) { return &table; }
