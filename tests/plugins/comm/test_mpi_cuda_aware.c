// tests/plugins/comm/test_mpi_cuda_aware.c: the mpi_cuda comm plugin's init on the MPI it finds.
// - On an MPI that is not CUDA-aware (Debian's Open MPI): init is refused (DSMOE_ERR_UNSUPPORTED) with a
//   message naming the library (MPI_Get_library_version) and the ways out (nccl; mpi with the core's
//   host staging; an MPI built with CUDA support).
// - On one that is (here: with tests/plugins/comm/fake_cuda_aware_mpi.c preloaded): init succeeds.
// Either way the table says what the core relies on: mpi_cuda takes HOST and CUDA memory, is
// host-progressed and does not promise fixed-order sums (MPI's own reductions); mpi keeps HOST memory,
// fixed-order sums and no CUDA setting. DSMOE_EXPECT_CUDA_AWARE=0|1 says which MPI the ctest entry
// meant to run on, so that an entry whose preload went missing fails instead of testing the other case.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_conformance.h" // conf_load_comm, conf_boot
#if defined(OPEN_MPI) && OPEN_MPI
#include <mpi-ext.h>
#endif

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int aware = 0;
#if defined(MPIX_CUDA_AWARE_SUPPORT)
    aware = MPIX_Query_cuda_support() == 1;
#endif
    const char *expect = getenv("DSMOE_EXPECT_CUDA_AWARE");
    if (expect && atoi(expect) != aware) {
        fprintf(stderr, "MPIX_Query_cuda_support says %d, the test entry expects %s (is the fake CUDA-aware MPI "
                "preloaded?)\n", aware, expect);
        MPI_Finalize();
        return 1;
    }
    char lib[MPI_MAX_LIBRARY_VERSION_STRING] = "";
    int len = 0, failed = 0;
    MPI_Get_library_version(lib, &len);
    char *nl = strchr(lib, '\n');
    if (nl) *nl = 0;

    void *handle, *mpi_handle;
    char path[4096], why[8192];
    const dsmoe_comm_plugin_v2 *P = conf_load_comm("mpi_cuda", DSMOE_CONFORMANCE_DEFAULT_DIRS, &handle, path,
                                                   sizeof path, why, sizeof why);
    if (!P) return fprintf(stderr, "%s\n", why), 1;
    const dsmoe_comm_plugin_v2 *M = conf_load_comm("mpi", DSMOE_CONFORMANCE_DEFAULT_DIRS, &mpi_handle, path,
                                                   sizeof path, why, sizeof why);
    if (!M) return fprintf(stderr, "%s\n", why), 1;

    int table_ok = P->mem_kinds == (DSMOE_MEM_HOST | DSMOE_MEM_CUDA) && P->caps == 0 && !P->allreduce_start &&
                   P->n_params == 1 && strcmp(P->params[0].name, "max_count") == 0;
    printf("mpi_cuda table: %s (mem_kinds 0x%x, caps 0x%x, %d settings)\n", table_ok ? "ok" : "WRONG",
           (unsigned)P->mem_kinds, (unsigned)P->caps, P->n_params);
    failed += !table_ok;
    int mpi_ok = M->mem_kinds == DSMOE_MEM_HOST && (M->caps & DSMOE_CCAP_DETERMINISTIC) && M->n_params == 1;
    printf("mpi table: %s (mem_kinds 0x%x, caps 0x%x, %d settings)\n", mpi_ok ? "ok" : "WRONG",
           (unsigned)M->mem_kinds, (unsigned)M->caps, M->n_params);
    failed += !mpi_ok;

    MPI_Comm wc;
    MPI_Comm_dup(MPI_COMM_WORLD, &wc);
    conf_boot boot;
    conf_boot_make(&boot, wc);
    const char *values[1] = {P->params[0].default_value};
    dsmoe_comm_options opt = {.param_values = values, .n_param_values = 1, .world = &boot.b};
    dsmoe_comm_ctx *ctx = (dsmoe_comm_ctx *)1;
    char err[1024] = "";
    dsmoe_status s = P->init(&opt, &ctx, err, sizeof err);
    int ok;
    if (aware)
        ok = s == DSMOE_OK && ctx;
    else
        ok = s == DSMOE_ERR_UNSUPPORTED && !ctx && strstr(err, "comm mpi_cuda: init:") && strstr(err, lib) &&
             strstr(err, "not CUDA-aware") && strstr(err, "run.comm_backend = nccl") &&
             strstr(err, "run.comm_backend = mpi") && strstr(err, "host staging");
    printf("mpi_cuda init on %s MPI (%s): %s (%s) %s\n", aware ? "a CUDA-aware" : "a host-only", lib,
           ok ? "ok" : "WRONG", dsmoe_status_name(s), err);
    failed += !ok;
    if (s == DSMOE_OK) P->finalize(ctx);
    conf_boot_free(&boot);
    dlclose(handle);
    dlclose(mpi_handle);
    MPI_Finalize();
    return failed ? 1 : 0;
}
