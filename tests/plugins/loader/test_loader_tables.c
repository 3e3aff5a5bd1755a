// tests/plugins/loader/test_loader_tables.c: what core/plugins/plugin_loader.c accepts in a plugin's table, against the
// fake plugins of tests/plugins/ (built into DSMOE_FAKE_PLUGIN_DIR by tests/plugins/loader/loader.cmake) and the
// real mpi comm plugin of the build tree: kernel v3 and comm v2 files load natively, kernel v2 files as
// the prefix of a v3 table, v1 files through the adapters (the caller sees a current table either way),
// other versions are refused with both numbers, a file without an entry symbol is not a plugin, and every
// rule of a table (required members, the optional groups and their capability bits, the MPI a comm
// plugin was built against) is refused with the member named; then the kernel/comm memory-kind pair
// check. Every rejection is checked by its status and the exact words of its message. How plugins are
// found, and what a failure to find or load one says, is tested by test_loader_search.c; the group
// setup is the same (loader_test.h), so DSMOE_PLUGIN_PATH is unset here too.
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "loader_test.h"               // <mpi.h> and plugin_loader.h, in that order
#include "dsmoe/v1/comm_plugin_v1.h"   // the v1 tables, to compare the adapted ones with
#include "dsmoe/v1/kernel_plugin_v1.h"

// The table the file itself returns under symbol, looked up here independently of the loader.
static const void *file_table(dsmoe_plugin_handle *h, const char *symbol) {
    const void *(*entry)(void) = (const void *(*)(void))dlsym(h->dl, symbol);
    assert_non_null(entry);
    return entry();
}

// ------------------------------------------------------------------------------------------------
// versions: kernel v3 and comm v2 natively, older ones through the adapters, anything else refused
// with both numbers

static void test_kernel_v1_through_adapter(void **state) {
    const dsmoe_kernel_plugin_v3 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &k, &h, &err), DSMOE_OK);
    assert_int_equal(h.api_version, 1);
    assert_non_null(h.adapter);
    const dsmoe_kernel_plugin_v1 *v1 = file_table(&h, DSMOE_KERNEL_PLUGIN_SYMBOL_V1);
    assert_int_equal(v1->api_version, 1);
    // The caller's table is a v3 table, apart from the file's: the adapter's, naming the v1 plugin.
    assert_ptr_not_equal((const void *)k, (const void *)v1);
    assert_int_equal(k->api_version, DSMOE_KERNEL_API_VERSION);
    assert_string_equal(k->name, "fakev1");
    assert_ptr_equal(k->description, v1->description);
    assert_int_equal(k->mem_kind, DSMOE_MEM_CUDA);
    assert_int_equal(k->caps, DSMOE_KCAP_FUSED_EPILOGUE | DSMOE_KCAP_DETERMINISTIC);
    assert_int_equal(k->dtypes, DSMOE_DTYPE_BIT(DSMOE_FLOAT32));
    assert_int_equal(k->n_params, 0);
    assert_null(k->kv_append); // no inference in v1
    assert_null(k->gate);      // nor fused gating: the core composes route and assign
    assert_null(k->queue_create); // the default queue only
    assert_null(k->device_count);
    assert_non_null(k->init);
    assert_non_null(k->gemm_grouped);
    assert_non_null(k->adamw);

    // Every adapted table has its own init (a per-slot trampoline), up to DSMOE_ADAPT_V1_SLOTS at once.
    dsmoe_plugin_handle more[8];
    const dsmoe_kernel_plugin_v3 *km[8];
    for (int i = 0; i < 7; i++) {
        assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &km[i], &more[i], &err), DSMOE_OK);
        assert_ptr_not_equal(km[i]->init, k->init);
        for (int j = 0; j < i; j++) assert_ptr_not_equal(km[i]->init, km[j]->init);
    }
    assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &km[7], &more[7], &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_fakev1.so: kernel plugin 'fakev1' speaks ABI 1 and cannot be "
                                  "adapted to ABI 3: 8 kernel plugins of ABI 1 are loaded already");
    assert_null(km[7]);
    assert_null(more[7].adapter);
    dsmoe_plugin_unload(&more[3]); // frees a slot
    assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &km[7], &more[7], &err), DSMOE_OK);
    dsmoe_plugin_unload(&more[7]);
    for (int i = 0; i < 7; i++) dsmoe_plugin_unload(&more[i]);
    dsmoe_plugin_unload(&h);

    // The optional device pair passes straight through (same signature in both versions).
    assert_int_equal(dsmoe_plugin_load_kernel("v1device", FAKE, &k, &h, &err), DSMOE_OK);
    v1 = file_table(&h, DSMOE_KERNEL_PLUGIN_SYMBOL_V1);
    assert_non_null(k->device_count);
    assert_ptr_equal(k->device_count, v1->device_count);
    assert_ptr_equal(k->device_pci_bus_id, v1->device_pci_bus_id);
    dsmoe_plugin_unload(&h);

    // v1 tables are checked by the v1 rules before they are adapted.
    assert_int_equal(dsmoe_plugin_load_kernel("v1halfdevice", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_v1halfdevice.so: kernel plugin 'v1halfdevice' sets device_count "
                                  "but not device_pci_bus_id; expected both (a device plugin) or neither");
    assert_null(h.adapter);
    assert_int_equal(dsmoe_plugin_load_kernel("v1nullmember", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_v1nullmember.so: kernel plugin 'v1nullmember' (ABI 1) leaves "
                                  "required member scale NULL");
    assert_null(k);
}

static void test_comm_v1_through_adapter(void **state) {
    const dsmoe_comm_plugin_v2 *c;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_comm("commv1", FAKE, &c, &h, &err), DSMOE_OK);
    assert_int_equal(h.api_version, 1);
    assert_non_null(h.adapter);
    const dsmoe_comm_plugin_v1 *v1 = file_table(&h, DSMOE_COMM_PLUGIN_SYMBOL_V1);
    assert_ptr_not_equal((const void *)c, (const void *)v1);
    assert_int_equal(c->api_version, DSMOE_COMM_API_VERSION);
    assert_string_equal(c->name, "commv1");
    assert_int_equal(c->mem_kinds, DSMOE_MEM_HOST);
    assert_int_equal(c->caps, DSMOE_CCAP_DETERMINISTIC); // host-progressed, blocking only
    assert_non_null(c->mpi_abi);
    assert_string_equal(c->mpi_abi, MPI_ABI);
    assert_non_null(c->reduce_scatter); // required in v2: set, and answers "unsupported"
    assert_non_null(c->alltoallv);
    assert_non_null(c->barrier);
    assert_null(c->allreduce_start);
    assert_null(c->request_wait);
    dsmoe_plugin_unload(&h);

    assert_int_equal(dsmoe_plugin_load_comm("commv1nb", FAKE, &c, &h, &err), DSMOE_OK);
    assert_int_equal(c->caps, DSMOE_CCAP_DETERMINISTIC | DSMOE_CCAP_NONBLOCKING);
    assert_non_null(c->allreduce_start);
    assert_non_null(c->request_test);
    assert_non_null(c->request_wait);
    dsmoe_plugin_unload(&h);

    assert_int_equal(dsmoe_plugin_load_comm("v1nullmember", FAKE, &c, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_comm_v1nullmember.so: comm plugin 'v1nullmember' (ABI 1) leaves "
                                  "required member alltoallv NULL");
    assert_int_equal(dsmoe_plugin_load_comm("v1halfnb", FAKE, &c, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, "comm plugin 'v1halfnb' (ABI 1) leaves required member request_wait NULL");
    assert_null(c);
    assert_null(h.dl);
}

// A v2 table is read as the prefix of a v3 one: every v2 member is the file's own, gate (set in the
// file's struct past the prefix, which a real v2 plugin does not have) is NULL.
static void test_kernel_v2_prefix(void **state) {
    const dsmoe_kernel_plugin_v3 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakev2", FAKE, &k, &h, &err), DSMOE_OK);
    assert_int_equal(h.api_version, 2);
    assert_non_null(h.adapter);
    const dsmoe_kernel_plugin_v3 *file = file_table(&h, DSMOE_KERNEL_PLUGIN_SYMBOL_V2);
    assert_int_equal(file->api_version, 2);
    assert_non_null(file->gate);
    assert_ptr_not_equal((const void *)k, (const void *)file);
    assert_int_equal(k->api_version, DSMOE_KERNEL_API_VERSION);
    assert_ptr_equal(k->name, file->name);
    assert_int_equal(k->caps, file->caps);
    assert_int_equal(k->dtypes, file->dtypes);
    assert_int_equal(k->n_params, 2);
    assert_ptr_equal(k->init, file->init);
    assert_ptr_equal(k->gate_route, file->gate_route);
    assert_ptr_equal(k->sample, file->sample);
    assert_ptr_equal(k->distill_backward, file->distill_backward); // the prefix's last member
    assert_null(k->gate);
    dsmoe_plugin_unload(&h);
    assert_null(h.adapter);
    assert_null(h.dl);
}

static void test_unknown_versions(void **state) {
    const dsmoe_kernel_plugin_v3 *k;
    const dsmoe_comm_plugin_v2 *c;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("badversion", FAKE, &k, &h, &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_badversion.so: the plugin speaks kernel ABI 4; this dsmoe speaks "
                                  "3 (and 2 and 1 through adapters)");
    assert_null(k);
    assert_int_equal(dsmoe_plugin_load_kernel("v4only", FAKE, &k, &h, &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_v4only.so: the plugin speaks kernel ABI 4 (it exports "
                                  "dsmoe_kernel_plugin_entry_v4 only); this dsmoe speaks 3 (and 2 and 1 through "
                                  "adapters)");
    assert_int_equal(dsmoe_plugin_load_kernel("v3saysv2", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_v3saysv2.so: dsmoe_kernel_plugin_entry_v3() returned a table of "
                                  "kernel ABI 2; expected 3");
    assert_int_equal(dsmoe_plugin_load_comm("badversion", FAKE, &c, &h, &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_comm_badversion.so: the plugin speaks comm ABI 3; this dsmoe speaks 2 "
                                  "(and 1 through adapters)");
    assert_null(c);
    assert_null(h.dl);
}

// ------------------------------------------------------------------------------------------------
// each rejection of a table, by status and message

static void test_missing_symbol(void **state) {
    const dsmoe_kernel_plugin_v3 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("nosym", FAKE, &k, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_nosym.so is not a dsmoe kernel plugin: no symbol "
                                  "dsmoe_kernel_plugin_entry_v3 (nor of an older version down to _v1) found");
    assert_null(k);
    assert_null(h.dl);
}

// One refusal: status, and the message after "<FAKE>/libdsmoe_<kind>_<name>.so: ".
#define REFUSED_KERNEL(name, status, text)                                                         \
    do {                                                                                           \
        const dsmoe_kernel_plugin_v3 *k_ = (const void *)1;                                        \
        assert_int_equal(dsmoe_plugin_load_kernel(name, FAKE, &k_, &h, &err), status);             \
        assert_contains(err.msg, FAKE "/libdsmoe_kernel_" name ".so: " text);                      \
        assert_null(k_);                                                                           \
        assert_null(h.dl);                                                                         \
    } while (0)
#define REFUSED_COMM(name, status, text)                                                           \
    do {                                                                                           \
        const dsmoe_comm_plugin_v2 *c_ = (const void *)1;                                          \
        assert_int_equal(dsmoe_plugin_load_comm(name, FAKE, &c_, &h, &err), status);               \
        assert_contains(err.msg, FAKE "/libdsmoe_comm_" name ".so: " text);                        \
        assert_null(c_);                                                                           \
        assert_null(h.dl);                                                                         \
    } while (0)

static void test_bad_tables(void **state) {
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    REFUSED_KERNEL("nulltable", DSMOE_ERR_INTERNAL, "dsmoe_kernel_plugin_entry_v3() returned NULL");
    REFUSED_KERNEL("v2nullmember", DSMOE_ERR_INTERNAL,
                   "kernel plugin 'v2nullmember' leaves required member gemm_grouped NULL");
    REFUSED_KERNEL("nullmember", DSMOE_ERR_INTERNAL, "kernel plugin 'nullmember' leaves required member gemm_grouped NULL");
    REFUSED_KERNEL("nulldescription", DSMOE_ERR_INTERNAL,
                   "kernel plugin 'nulldescription' leaves required member description NULL");
    REFUSED_KERNEL("misnamed", DSMOE_ERR_INTERNAL, "the table calls itself kernel plugin 'other' but the file is for 'misnamed'");
    REFUSED_KERNEL("zerokind", DSMOE_ERR_INTERNAL, "kernel plugin 'zerokind' declares mem_kind no memory (0x0)");
    REFUSED_KERNEL("halfdevice", DSMOE_ERR_INTERNAL, "kernel plugin 'halfdevice' sets device_count but not "
                   "device_pci_bus_id; expected both (a device plugin) or neither");
    REFUSED_KERNEL("halfqueue", DSMOE_ERR_INTERNAL, "kernel plugin 'halfqueue' sets queue_destroy but not "
                   "queue_create; expected both");
    REFUSED_KERNEL("badparam", DSMOE_ERR_INTERNAL, "kernel plugin 'badparam' declares setting 1 ('mode'): an ENUM "
                   "without choices");

    REFUSED_COMM("nullmember", DSMOE_ERR_INTERNAL, "comm plugin 'nullmember' leaves required member reduce_scatter NULL");
    REFUSED_COMM("zerokinds", DSMOE_ERR_INTERNAL, "comm plugin 'zerokinds' declares mem_kinds 0");
}

// The optional groups: all or none, and with their capability bits.
static void test_optional_groups(void **state) {
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    const dsmoe_kernel_plugin_v3 *k;
    assert_int_equal(dsmoe_plugin_load_kernel("fakefull", FAKE, &k, &h, &err), DSMOE_OK);
    assert_non_null(k->sample);
    assert_non_null(k->queue_create);
    assert_non_null(k->gate);
    assert_int_equal(k->n_params, 2);
    dsmoe_plugin_unload(&h);

    REFUSED_KERNEL("halfinference", DSMOE_ERR_INTERNAL, "kernel plugin 'halfinference' sets some inference members "
                   "but leaves attention_cached NULL");
    REFUSED_KERNEL("capnoinference", DSMOE_ERR_INTERNAL, "kernel plugin 'capnoinference' declares "
                   "DSMOE_KCAP_INFERENCE but leaves kv_append NULL");
    REFUSED_KERNEL("infnocache", DSMOE_ERR_INTERNAL, "kernel plugin 'infnocache' declares DSMOE_KCAP_INFERENCE but "
                   "leaves attention_cached NULL");
    REFUSED_KERNEL("inferencenocap", DSMOE_ERR_INTERNAL, "kernel plugin 'inferencenocap' sets kv_append, "
                   "attention_cached and sample but does not declare DSMOE_KCAP_INFERENCE in caps (0x2)");
    REFUSED_KERNEL("nofloat32", DSMOE_ERR_INTERNAL, "kernel plugin 'nofloat32' declares dtypes 0x2 without float32");
    REFUSED_KERNEL("bf16nocap", DSMOE_ERR_INTERNAL, "kernel plugin 'bf16nocap' lists bfloat16 in dtypes but does not "
                   "declare DSMOE_KCAP_BF16");
    REFUSED_KERNEL("capnobf16", DSMOE_ERR_INTERNAL, "kernel plugin 'capnobf16' declares DSMOE_KCAP_BF16 but not "
                   "bfloat16 in dtypes");

    const dsmoe_comm_plugin_v2 *c;
    assert_int_equal(dsmoe_plugin_load_comm("nobarrier", FAKE, &c, &h, &err), DSMOE_OK); // optional in v2
    assert_null(c->barrier);
    dsmoe_plugin_unload(&h);
    REFUSED_COMM("nbnocap", DSMOE_ERR_INTERNAL, "comm plugin 'nbnocap' sets allreduce_start, request_test and "
                 "request_wait but does not declare DSMOE_CCAP_NONBLOCKING in caps (0x0)");
    REFUSED_COMM("capnonb", DSMOE_ERR_INTERNAL, "comm plugin 'capnonb' declares DSMOE_CCAP_NONBLOCKING but leaves "
                 "allreduce_start NULL");
    REFUSED_COMM("nbhalf", DSMOE_ERR_INTERNAL, "comm plugin 'nbhalf' declares DSMOE_CCAP_NONBLOCKING but leaves "
                 "request_test NULL");
}

// A comm plugin built against another MPI is refused naming both; one built against ours loads.
static void test_mpi_abi(void **state) {
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    REFUSED_COMM("fakempi", DSMOE_ERR_UNSUPPORTED, "comm plugin 'fakempi' was built against MPI 'Fake MPI 9.9' but "
                 "this dsmoe uses MPI '" MPI_ABI "'");
    const dsmoe_comm_plugin_v2 *c;
    assert_int_equal(dsmoe_plugin_load_comm("ownmpi", FAKE, &c, &h, &err), DSMOE_OK);
    assert_string_equal(c->mpi_abi, MPI_ABI);
    dsmoe_plugin_unload(&h);
    assert_int_equal(dsmoe_plugin_load_comm("cudaonly", FAKE, &c, &h, &err), DSMOE_OK); // NULL: no MPI calls
    assert_null(c->mpi_abi);
    dsmoe_plugin_unload(&h);
}

// ------------------------------------------------------------------------------------------------
// memory-kind pairing

static void test_pair_check(void **state) {
    const dsmoe_kernel_plugin_v3 *cuda, *cudav1;
    const dsmoe_comm_plugin_v2 *mpi, *cudaonly, *commv1;
    dsmoe_plugin_handle hk, hk1, hm, hc, hc1;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", FAKE, &cuda, &hk, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &cudav1, &hk1, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_comm("mpi", NULL, &mpi, &hm, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_comm("cudaonly", FAKE, &cudaonly, &hc, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_comm("commv1", FAKE, &commv1, &hc1, &err), DSMOE_OK);

    assert_int_equal(dsmoe_plugin_check_pair(cuda, mpi, &err), DSMOE_ERR_INVALID);
    assert_string_equal(err.msg, "kernel plugin 'fakecuda' allocates CUDA memory but comm plugin 'mpi' accepts only "
                                 "host memory; choose run.comm_backend = nccl, or mpi_cuda on a CUDA-aware MPI");
    assert_int_equal(dsmoe_plugin_check_pair(cuda, cudaonly, &err), DSMOE_OK);
    // Adapted tables pair like any other.
    assert_int_equal(dsmoe_plugin_check_pair(cudav1, cudaonly, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(cudav1, commv1, &err), DSMOE_ERR_INVALID);
    assert_contains(err.msg, "kernel plugin 'fakev1' allocates CUDA memory but comm plugin 'commv1' accepts only host");

    // Tables made here, for the kinds no loadable plugin has.
    dsmoe_kernel_plugin_v3 host = {.api_version = 2, .name = "cpu", .mem_kind = DSMOE_MEM_HOST};
    assert_int_equal(dsmoe_plugin_check_pair(&host, mpi, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(&host, commv1, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(&host, cudaonly, &err), DSMOE_ERR_INVALID);
    assert_contains(err.msg, "kernel plugin 'cpu' allocates host memory but comm plugin 'cudaonly' accepts only "
                             "CUDA memory; choose run.comm_backend = mpi");
    dsmoe_comm_plugin_v2 odd = {.api_version = 2, .name = "odd", .mem_kinds = DSMOE_MEM_HOST | 0x8u};
    assert_int_equal(dsmoe_plugin_check_pair(cuda, &odd, &err), DSMOE_ERR_INVALID);
    assert_contains(err.msg, "accepts only host or unknown (0x8) memory");
    odd.mem_kinds = DSMOE_MEM_HOST | DSMOE_MEM_CUDA;
    assert_int_equal(dsmoe_plugin_check_pair(cuda, &odd, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(&host, &odd, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(NULL, mpi, &err), DSMOE_ERR_INVALID);

    dsmoe_plugin_unload(&hk);
    dsmoe_plugin_unload(&hk1);
    dsmoe_plugin_unload(&hm);
    dsmoe_plugin_unload(&hc);
    dsmoe_plugin_unload(&hc1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kernel_v1_through_adapter),
        cmocka_unit_test(test_kernel_v2_prefix),
        cmocka_unit_test(test_comm_v1_through_adapter),
        cmocka_unit_test(test_unknown_versions),
        cmocka_unit_test(test_missing_symbol),
        cmocka_unit_test(test_bad_tables),
        cmocka_unit_test(test_optional_groups),
        cmocka_unit_test(test_mpi_abi),
        cmocka_unit_test(test_pair_check),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
