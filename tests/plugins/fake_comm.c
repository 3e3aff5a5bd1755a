// tests/plugins/fake_comm.c: comm plugins for tests/test_loader.c, one variant per build
// (tests/loader.cmake):
//   FAKE_NAME="x"            the file is libdsmoe_comm_x.so and the table's name
//   FAKE_API_VERSION=n       the table's api_version (default DSMOE_COMM_API_VERSION)
//   FAKE_MEM_KINDS=k         mem_kinds (default DSMOE_MEM_CUDA: a stand-in for nccl)
//   FAKE_NULL_MEMBER         alltoallv is NULL
// The members are never called: each is a `void (void)` stub cast to the member's type.
#include <stddef.h>
#include "dsmoe/comm_plugin.h"

#ifndef FAKE_API_VERSION
#define FAKE_API_VERSION DSMOE_COMM_API_VERSION
#endif
#ifndef FAKE_MEM_KINDS
#define FAKE_MEM_KINDS DSMOE_MEM_CUDA
#endif

static void fake_stub(void) {}
#define STUB(m) .m = (__typeof__(((dsmoe_comm_plugin_v1 *)0)->m))fake_stub

static const dsmoe_comm_plugin_v1 fake_table = {
    .api_version = FAKE_API_VERSION,
    .name = FAKE_NAME,
    .description = "fake comm plugin for the loader tests",
    .mem_kinds = FAKE_MEM_KINDS,
    STUB(init), STUB(finalize), STUB(last_error), STUB(group_create), STUB(group_destroy),
    STUB(group_rank), STUB(group_size), STUB(alltoall),
#ifndef FAKE_NULL_MEMBER
    STUB(alltoallv),
#endif
    STUB(allreduce), STUB(allgather), STUB(broadcast), STUB(barrier),
};

DSMOE_PLUGIN_EXPORT const dsmoe_comm_plugin_v1 *DSMOE_COMM_PLUGIN_ENTRY(void) { return &fake_table; }
