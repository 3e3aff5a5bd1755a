// tests/plugins/loader/fake_comm.c: comm plugins for tests/plugins/loader/test_loader_search.c and test_loader_tables.c,
// one variant per build (tests/plugins/loader/loader.cmake):
//   FAKE_NAME="x"            the file is libdsmoe_comm_x.so and the table's name
//   FAKE_V1                  an ABI 1 table (dsmoe/v1/comm_plugin_v1.h, which needs <mpi.h>) under the v1
//                            entry symbol; otherwise v2, which needs no MPI
//   FAKE_API_VERSION=n       the table's api_version (default: the version of the table's type)
//   FAKE_MEM_KINDS=k         mem_kinds (default DSMOE_MEM_CUDA: a stand-in for nccl)
//   FAKE_CAPS=c              v2 caps (default 0)
//   FAKE_MPI_ABI="..."       v2 mpi_abi (default NULL); FAKE_OWN_MPI sets it to this build's
//                            DSMOE_MPI_ABI_STRING (with <mpi.h> included first)
//   FAKE_NONBLOCKING         the allreduce_start / request_test / request_wait trio is set
//   FAKE_CLEAR=m             member m is NULL (after the above)
// The members are never called: each is a `void (void)` stub cast to the member's type.
#include <stddef.h>
#if defined(FAKE_V1) || defined(FAKE_OWN_MPI)
#include <mpi.h> // before the plugin headers, so DSMOE_MPI_ABI_STRING names this MPI
#endif
#ifdef FAKE_V1
#include "dsmoe/v1/comm_plugin_v1.h"
typedef dsmoe_comm_plugin_v1 fake_table_t;
#define FAKE_DEFAULT_VERSION DSMOE_COMM_API_VERSION_V1
#define FAKE_ENTRY dsmoe_comm_plugin_entry_v1
#else
#include "dsmoe/comm_plugin.h"
typedef dsmoe_comm_plugin_v2 fake_table_t;
#define FAKE_DEFAULT_VERSION DSMOE_COMM_API_VERSION
#define FAKE_ENTRY DSMOE_COMM_PLUGIN_ENTRY
#endif

#ifndef FAKE_API_VERSION
#define FAKE_API_VERSION FAKE_DEFAULT_VERSION
#endif
#ifndef FAKE_MEM_KINDS
#define FAKE_MEM_KINDS DSMOE_MEM_CUDA
#endif
#ifndef FAKE_CAPS
#define FAKE_CAPS 0
#endif
#ifdef FAKE_OWN_MPI
#define FAKE_MPI_ABI DSMOE_MPI_ABI_STRING
#endif
#ifndef FAKE_MPI_ABI
#define FAKE_MPI_ABI NULL
#endif

static void fake_stub(void) {}
#define STUB(m) .m = (__typeof__(((fake_table_t *)0)->m))fake_stub

static fake_table_t table = {
    .api_version = FAKE_API_VERSION,
    .name = FAKE_NAME,
    .description = "fake comm plugin for the loader tests",
    .mem_kinds = FAKE_MEM_KINDS,
#ifndef FAKE_V1
    .caps = FAKE_CAPS,
    .mpi_abi = FAKE_MPI_ABI,
    STUB(reduce_scatter),
#endif
    STUB(init), STUB(finalize), STUB(last_error), STUB(group_create), STUB(group_destroy),
    STUB(group_rank), STUB(group_size), STUB(alltoall), STUB(alltoallv), STUB(allreduce), STUB(allgather),
    STUB(broadcast), STUB(barrier),
#ifdef FAKE_NONBLOCKING
    STUB(allreduce_start), STUB(request_test), STUB(request_wait),
#endif
};

DSMOE_PLUGIN_EXPORT const fake_table_t *FAKE_ENTRY(void) {
#ifdef FAKE_CLEAR
    table.FAKE_CLEAR = NULL;
#endif
    return &table;
}
