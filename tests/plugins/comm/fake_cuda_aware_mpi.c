// tests/plugins/comm/fake_cuda_aware_mpi.c: a test double of a CUDA-aware MPI, preloaded (LD_PRELOAD) in front
// of this machine's Open MPI, which is not CUDA-aware. Test-only, never installed.
//
// The mpi_cuda comm plugin hands device buffers straight to MPI. Two things make an MPI CUDA-aware, and
// the double fakes both, so that the plugin runs here on the strict kernel plugin's device memory:
// 1. It says so: MPIX_Query_cuda_support() returns 1 (the plugin's init asks; Open MPI's own says 0).
// 2. It may read and write device memory: inside the collectives below, and only there, the strict
//    plugin (tests/plugins/kernel/strict/strict_protect.c) lets the host touch its device memory, as a DMA
//    engine or MPI's own cudaMemcpy would, still refusing bytes that queued work has to use (a missing
//    wait is a violation, as on a GPU). With DSMOE_STRICT_ALWAYS_CLOSED=1 every other host touch of
//    device memory, the plugin's own code included, is a violation: the plugin may not add on the host.
//    strict finds the window through the two functions exported below (dlsym of the process), and
//    closes what it opened when the outermost wrapped call returns.
// The collectives wrapped are those the mpi plugin's code calls on collective buffers; each forwards to
// PMPI_* unchanged. The double links no MPI library itself (PMPI_* resolve in the process that loads
// it), so preloading it into mpiexec, which calls none of them, is harmless.
#include <mpi.h>

#define EXPORT __attribute__((visibility("default")))

static _Thread_local int depth;        // wrapped collectives this thread is inside
static void (*window_closed)(void);    // strict's "close what the window opened"

EXPORT int MPIX_Query_cuda_support(void) { return 1; }

// 1 while this thread is inside a wrapped collective (strict's SIGSEGV handler asks).
EXPORT int dsmoe_fake_cuda_mpi_in_collective(void) { return depth > 0; }

// fn runs when this thread leaves its outermost wrapped collective (strict registers one).
EXPORT void dsmoe_fake_cuda_mpi_on_leave(void (*fn)(void)) { window_closed = fn; }

static void enter(void) { depth++; }

static int leave(int rc) {
    if (--depth == 0 && window_closed) window_closed();
    return rc;
}

EXPORT int MPI_Alltoall(const void *sb, int sc, MPI_Datatype st, void *rb, int rc, MPI_Datatype rt, MPI_Comm comm) {
    enter();
    return leave(PMPI_Alltoall(sb, sc, st, rb, rc, rt, comm));
}

EXPORT int MPI_Alltoallv(const void *sb, const int *sc, const int *sd, MPI_Datatype st, void *rb, const int *rc,
                         const int *rd, MPI_Datatype rt, MPI_Comm comm) {
    enter();
    return leave(PMPI_Alltoallv(sb, sc, sd, st, rb, rc, rd, rt, comm));
}

EXPORT int MPI_Sendrecv(const void *sb, int sc, MPI_Datatype st, int dst, int stag, void *rb, int rc,
                        MPI_Datatype rt, int src, int rtag, MPI_Comm comm, MPI_Status *status) {
    enter();
    return leave(PMPI_Sendrecv(sb, sc, st, dst, stag, rb, rc, rt, src, rtag, comm, status));
}

EXPORT int MPI_Allgather(const void *sb, int sc, MPI_Datatype st, void *rb, int rc, MPI_Datatype rt, MPI_Comm comm) {
    enter();
    return leave(PMPI_Allgather(sb, sc, st, rb, rc, rt, comm));
}

EXPORT int MPI_Bcast(void *buf, int count, MPI_Datatype type, int root, MPI_Comm comm) {
    enter();
    return leave(PMPI_Bcast(buf, count, type, root, comm));
}

EXPORT int MPI_Allreduce(const void *sb, void *rb, int count, MPI_Datatype type, MPI_Op op, MPI_Comm comm) {
    enter();
    return leave(PMPI_Allreduce(sb, rb, count, type, op, comm));
}

EXPORT int MPI_Reduce_scatter_block(const void *sb, void *rb, int count, MPI_Datatype type, MPI_Op op, MPI_Comm comm) {
    enter();
    return leave(PMPI_Reduce_scatter_block(sb, rb, count, type, op, comm));
}

EXPORT int MPI_Reduce(const void *sb, void *rb, int count, MPI_Datatype type, MPI_Op op, int root, MPI_Comm comm) {
    enter();
    return leave(PMPI_Reduce(sb, rb, count, type, op, root, comm));
}
