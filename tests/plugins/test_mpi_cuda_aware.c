// tests/plugins/test_mpi_cuda_aware.c: the mpi plugin's cuda_aware setting on an MPI that is not CUDA-aware
// (Debian's Open MPI; the test skips with 77 where MPIX_Query_cuda_support says yes): "on" is refused
// at init with a message naming the library (MPI_Get_library_version) and the ways out; "auto" and
// "off" start and keep host memory; another value is refused by name.
#include <stdio.h>
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
    if (aware) {
        printf("this MPI is CUDA-aware: the refusal cannot be tested here\n");
        MPI_Finalize();
        return 77;
    }
    void *handle;
    char path[4096], why[8192], lib[MPI_MAX_LIBRARY_VERSION_STRING] = "";
    int len = 0, failed = 0;
    MPI_Get_library_version(lib, &len);
    char *nl = strchr(lib, '\n');
    if (nl) *nl = 0;
    const dsmoe_comm_plugin_v2 *P = conf_load_comm("mpi", DSMOE_CONFORMANCE_DEFAULT_DIRS, &handle, path, sizeof path,
                                                   why, sizeof why);
    if (!P) return fprintf(stderr, "%s\n", why), 1;
    int k = -1;
    for (int i = 0; i < P->n_params; i++)
        if (strcmp(P->params[i].name, "cuda_aware") == 0) k = i;
    if (k != 1 || P->n_params != 2) return fprintf(stderr, "mpi plugin: no cuda_aware setting at index 1\n"), 1;
    MPI_Comm wc;
    MPI_Comm_dup(MPI_COMM_WORLD, &wc);
    conf_boot boot;
    conf_boot_make(&boot, wc);
    const char *tries[4] = {"on", "auto", "off", "maybe"};
    for (int t = 0; t < 4; t++) {
        const char *values[2] = {P->params[0].default_value, tries[t]};
        dsmoe_comm_options opt = {.param_values = values, .n_param_values = 2, .world = &boot.b};
        dsmoe_comm_ctx *ctx = (dsmoe_comm_ctx *)1;
        char err[1024] = "";
        dsmoe_status s = P->init(&opt, &ctx, err, sizeof err);
        int ok;
        if (t == 0)
            ok = s == DSMOE_ERR_UNSUPPORTED && !ctx && strstr(err, "cuda_aware=on") && strstr(err, lib) &&
                 strstr(err, "not CUDA-aware") && strstr(err, "nccl") && strstr(err, "staging");
        else if (t == 3)
            ok = s == DSMOE_ERR_INVALID && !ctx && strstr(err, "cuda_aware='maybe'");
        else
            ok = s == DSMOE_OK && ctx && P->mem_kinds == DSMOE_MEM_HOST;
        printf("cuda_aware=%s: %s (%s) %s\n", tries[t], ok ? "ok" : "WRONG", dsmoe_status_name(s), err);
        failed += !ok;
        if (s == DSMOE_OK) P->finalize(ctx);
    }
    conf_boot_free(&boot);
    dlclose(handle);
    MPI_Finalize();
    return failed ? 1 : 0;
}
