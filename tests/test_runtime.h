// tests/test_runtime.h: MPI and the cpu + mpi plugins for a test program (header-only).
#ifndef DSMOE_TEST_RUNTIME_H
#define DSMOE_TEST_RUNTIME_H
#include <stdio.h>

#include <mpi.h>

#include "runtime.h"

// MPI_Init and the runtime on one compute thread; on failure prints why, finalizes MPI, returns -1.
static int test_runtime_start(int *argc, char ***argv, dsmoe_runtime *rt) {
    MPI_Init(argc, argv);
    dsmoe_err err = {0};
    if (dsmoe_runtime_open("cpu", "mpi", "", 1, rt, &err) != DSMOE_OK) {
        fprintf(stderr, "runtime: %s\n", err.msg);
        MPI_Finalize();
        return -1;
    }
    return 0;
}

#endif
