// tests/plugins/fake_kernel.c: kernel plugins that the loader must refuse (or, one, accept), for
// tests/test_loader.c. One source, one variant per build (tests/loader.cmake):
//   FAKE_NAME="x"            the file is libdsmoe_kernel_x.so; the table says FAKE_TABLE_NAME (default x)
//   FAKE_API_VERSION=n       the table's api_version (default DSMOE_KERNEL_API_VERSION)
//   FAKE_MEM_KIND=k          mem_kind (default DSMOE_MEM_CUDA: a stand-in for a device plugin)
//   FAKE_NO_SYMBOL           export dsmoe_kernel_plugin_v0 instead of the v1 entry symbol
//   FAKE_RETURN_NULL         the entry returns NULL
//   FAKE_NULL_MEMBER         gemm_grouped is NULL
//   FAKE_UNDEFINED           the entry calls a function no library defines: dlopen(RTLD_NOW) fails
//   FAKE_HALF_DEVICE         device_count set but device_pci_bus_id NULL (the pair is both or neither)
// Otherwise the optional device_count and device_pci_bus_id are NULL.
// The members are never called: each is a `void (void)` stub cast to the member's type (calling one
// through that type would be undefined), which is all the loader's checks look at.
#include <stddef.h>
#include "dsmoe/kernel_plugin.h"

#ifndef FAKE_TABLE_NAME
#define FAKE_TABLE_NAME FAKE_NAME
#endif
#ifndef FAKE_API_VERSION
#define FAKE_API_VERSION DSMOE_KERNEL_API_VERSION
#endif
#ifndef FAKE_MEM_KIND
#define FAKE_MEM_KIND DSMOE_MEM_CUDA
#endif

static void fake_stub(void) {}
#define STUB(m) .m = (__typeof__(((dsmoe_kernel_plugin_v1 *)0)->m))fake_stub

__attribute__((unused)) static const dsmoe_kernel_plugin_v1 fake_table = {
    .api_version = FAKE_API_VERSION,
    .name = FAKE_TABLE_NAME,
    .description = "fake kernel plugin for the loader tests",
    .mem_kind = FAKE_MEM_KIND,
    STUB(init), STUB(finalize), STUB(last_error), STUB(describe),
#ifdef FAKE_HALF_DEVICE
    STUB(device_count),
#endif
    STUB(alloc), STUB(free), STUB(copy_to_device), STUB(copy_to_host), STUB(copy), STUB(zero),
    STUB(synchronize), STUB(gemm),
#ifndef FAKE_NULL_MEMBER
    STUB(gemm_grouped),
#endif
    STUB(gemm_grouped_wgrad), STUB(bias_add), STUB(bias_backward), STUB(axpy), STUB(scale),
    STUB(mul_uniform_noise), STUB(sum_squares), STUB(all_finite), STUB(embedding_forward),
    STUB(embedding_backward), STUB(layernorm_forward), STUB(layernorm_backward), STUB(gelu_forward),
    STUB(gelu_backward), STUB(attention_forward), STUB(attention_backward), STUB(crossentropy_forward),
    STUB(crossentropy_backward), STUB(gate_route), STUB(gate_assign), STUB(gate_backward),
    STUB(moe_dispatch), STUB(moe_dispatch_backward), STUB(moe_combine), STUB(moe_combine_backward),
    STUB(residual_mix_forward), STUB(residual_mix_backward), STUB(adamw_update),
};

#ifdef FAKE_UNDEFINED
extern void dsmoe_test_symbol_that_no_library_defines(void);
#endif

#ifdef FAKE_NO_SYMBOL
#define FAKE_ENTRY dsmoe_kernel_plugin_entry_v0
#else
#define FAKE_ENTRY DSMOE_KERNEL_PLUGIN_ENTRY
#endif

DSMOE_PLUGIN_EXPORT const dsmoe_kernel_plugin_v1 *FAKE_ENTRY(void) {
#ifdef FAKE_UNDEFINED
    dsmoe_test_symbol_that_no_library_defines();
#endif
#ifdef FAKE_RETURN_NULL
    return NULL;
#else
    return &fake_table;
#endif
}
