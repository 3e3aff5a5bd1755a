// tests/plugins/loader/fake_kernel.c: kernel plugins that the loader must refuse (or accept), for
// tests/plugins/loader/test_loader_search.c and test_loader_tables.c. One source, one variant per build
// (tests/plugins/loader/loader.cmake):
//   FAKE_NAME="x"            the file is libdsmoe_kernel_x.so; the table says FAKE_TABLE_NAME (default x)
//   FAKE_V1                  an ABI 1 table (dsmoe/v1/kernel_plugin_v1.h) under the v1 entry symbol
//   FAKE_API_VERSION=n       the table's api_version (default: the version of the table's type)
//   FAKE_ENTRY=sym           export the entry as sym instead of the version's symbol (e.g. _v2, _v4, _v0)
//   FAKE_MEM_KIND=k          mem_kind (default DSMOE_MEM_CUDA: a stand-in for a device plugin)
//   FAKE_CAPS=c, FAKE_DTYPES=d   v2/v3 caps (default 0) and dtypes (default float32 only)
//   FAKE_FULL                v3: every optional member set (give it FAKE_CAPS with DSMOE_KCAP_INFERENCE); a
//                            v2 plugin is this table with FAKE_API_VERSION=2 and the v2 symbol (its prefix)
//   FAKE_CLEAR=m             member m is NULL (after FAKE_FULL)
//   FAKE_SET=m, FAKE_SET2=m  member m is set (a stub)
//   FAKE_PARAMS              v2/v3: declares two settings; with FAKE_BAD_PARAM the second is an ENUM without choices
//   FAKE_RETURN_NULL         the entry returns NULL
//   FAKE_UNDEFINED           the entry calls a function no library defines: dlopen(RTLD_NOW) fails
// The members are never called: each is a `void (void)` stub cast to the member's type (calling one
// through that type would be undefined), which is all the loader's checks look at.
#include <stddef.h>
#ifdef FAKE_V1
#include "dsmoe/v1/kernel_plugin_v1.h"
typedef dsmoe_kernel_plugin_v1 fake_table_t;
#define FAKE_DEFAULT_VERSION DSMOE_KERNEL_API_VERSION_V1
#define FAKE_DEFAULT_ENTRY dsmoe_kernel_plugin_entry_v1
#else
#include "dsmoe/kernel_plugin.h"
typedef dsmoe_kernel_plugin_v3 fake_table_t;
#define FAKE_DEFAULT_VERSION DSMOE_KERNEL_API_VERSION
#define FAKE_DEFAULT_ENTRY DSMOE_KERNEL_PLUGIN_ENTRY
#endif

#ifndef FAKE_TABLE_NAME
#define FAKE_TABLE_NAME FAKE_NAME
#endif
#ifndef FAKE_API_VERSION
#define FAKE_API_VERSION FAKE_DEFAULT_VERSION
#endif
#ifndef FAKE_ENTRY
#define FAKE_ENTRY FAKE_DEFAULT_ENTRY
#endif
#ifndef FAKE_MEM_KIND
#define FAKE_MEM_KIND DSMOE_MEM_CUDA
#endif
#ifndef FAKE_CAPS
#define FAKE_CAPS 0
#endif
#ifndef FAKE_DTYPES
#define FAKE_DTYPES DSMOE_DTYPE_BIT(DSMOE_FLOAT32)
#endif

static void fake_stub(void) {}
#define STUB(m) .m = (__typeof__(((fake_table_t *)0)->m))fake_stub
#define SET(t, m) (t).m = (__typeof__((t).m))fake_stub

#ifdef FAKE_V1
__attribute__((unused)) static fake_table_t table = {
    .api_version = FAKE_API_VERSION,
    .name = FAKE_TABLE_NAME,
    .description = "fake v1 kernel plugin for the loader tests",
    .mem_kind = FAKE_MEM_KIND,
    STUB(init), STUB(finalize), STUB(last_error), STUB(describe),
    STUB(alloc), STUB(free), STUB(copy_to_device), STUB(copy_to_host), STUB(copy), STUB(zero),
    STUB(synchronize), STUB(gemm), STUB(gemm_grouped), STUB(gemm_grouped_wgrad), STUB(bias_add),
    STUB(bias_backward), STUB(axpy), STUB(scale), STUB(mul_uniform_noise), STUB(sum_squares), STUB(all_finite),
    STUB(embedding_forward), STUB(embedding_backward), STUB(layernorm_forward), STUB(layernorm_backward),
    STUB(gelu_forward), STUB(gelu_backward), STUB(attention_forward), STUB(attention_backward),
    STUB(crossentropy_forward), STUB(crossentropy_backward), STUB(gate_route), STUB(gate_assign),
    STUB(gate_backward), STUB(moe_dispatch), STUB(moe_dispatch_backward), STUB(moe_combine),
    STUB(moe_combine_backward), STUB(residual_mix_forward), STUB(residual_mix_backward), STUB(adamw_update),
};
#else
#ifdef FAKE_PARAMS
static const dsmoe_param_decl params[2] = {
    {"tile", DSMOE_PARAM_INT, "64", "a GEMM tile edge, in elements", NULL},
#ifdef FAKE_BAD_PARAM
    {"mode", DSMOE_PARAM_ENUM, "auto", "which way", NULL},
#else
    {"mode", DSMOE_PARAM_ENUM, "auto", "which way", "auto|on|off"},
#endif
};
#endif
__attribute__((unused)) static fake_table_t table = {
    .api_version = FAKE_API_VERSION,
    .name = FAKE_TABLE_NAME,
    .description = "fake kernel plugin for the loader tests",
    .mem_kind = FAKE_MEM_KIND,
    .caps = FAKE_CAPS,
    .dtypes = FAKE_DTYPES,
#ifdef FAKE_PARAMS
    .params = params,
    .n_params = 2,
#endif
    STUB(init), STUB(finalize), STUB(last_error), STUB(describe), STUB(attention_bytes),
    STUB(default_queue), STUB(queue_native), STUB(queue_enqueue_host), STUB(queue_synchronize),
    STUB(synchronize), STUB(event_create), STUB(event_destroy), STUB(event_record), STUB(queue_wait_event),
    STUB(event_synchronize), STUB(event_query), STUB(alloc), STUB(free), STUB(host_alloc), STUB(host_free),
    STUB(copy_to_device), STUB(copy_to_host), STUB(copy), STUB(copy_2d), STUB(zero), STUB(gemm),
    STUB(gemm_grouped), STUB(gemm_grouped_wgrad), STUB(bias_add), STUB(bias_backward), STUB(axpy),
    STUB(mul_uniform_noise), STUB(sum_squares), STUB(init_tensor), STUB(embedding_forward),
    STUB(embedding_backward), STUB(layernorm_forward), STUB(layernorm_backward), STUB(gelu_forward),
    STUB(gelu_backward), STUB(attention_forward), STUB(attention_backward), STUB(crossentropy_forward),
    STUB(crossentropy_backward), STUB(gate_route), STUB(gate_assign), STUB(gate_backward), STUB(moe_dispatch),
    STUB(moe_dispatch_backward), STUB(moe_combine), STUB(moe_combine_backward), STUB(residual_mix_forward),
    STUB(residual_mix_backward), STUB(adamw),
#ifdef FAKE_FULL
    STUB(device_count), STUB(device_pci_bus_id), STUB(mem_info), STUB(queue_create), STUB(queue_destroy),
    STUB(all_finite), STUB(convert), STUB(kv_append), STUB(attention_cached), STUB(sample), STUB(gate),
#endif
};
#endif

#ifdef FAKE_UNDEFINED
extern void dsmoe_test_symbol_that_no_library_defines(void);
#endif

DSMOE_PLUGIN_EXPORT const fake_table_t *FAKE_ENTRY(void) {
#ifdef FAKE_UNDEFINED
    dsmoe_test_symbol_that_no_library_defines();
#endif
#ifdef FAKE_CLEAR
    table.FAKE_CLEAR = NULL;
#endif
#ifdef FAKE_SET
    SET(table, FAKE_SET);
#endif
#ifdef FAKE_SET2
    SET(table, FAKE_SET2);
#endif
#ifdef FAKE_RETURN_NULL
    return NULL;
#else
    return &table;
#endif
}
