// tests/sanitize/probe.c: the sanitized build's self-check (tests/sanitize/sanitize.cmake). An MPI
// program that makes one bug of its own on purpose, so that ctest can show that the bug is reported
// while everything Open MPI and hwloc leave behind is not (the suppressions of tests/sanitize/lsan.supp
// must stay narrow enough for our own bugs to fail their tests).
//   probe clean   MPI_Init, a collective, a topology loaded and destroyed, MPI_Finalize: no report
//   probe leak    the same and a leak of 4242 bytes here: exactly that leak is reported
//   probe oob     a heap read one past the end on the last rank: AddressSanitizer reports it
//   probe ubsan   a signed overflow on the last rank: UndefinedBehaviorSanitizer reports it
//   probe hwloc   a topology never destroyed: reported, though hwloc_topology_load's own leaks are not
#include <hwloc.h>
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *volatile sink; // keeps the compiler from removing the bugs

__attribute__((noinline)) static void probe_leak(void) {
    char *p = malloc(4242);
    memset(p, 1, 4242);
    sink = p;
    sink = NULL;
}

__attribute__((noinline)) static int probe_oob(void) {
    char *p = malloc(42);
    memset(p, 2, 42);
    sink = p;
    int c = ((volatile char *)sink)[42];
    free(p);
    return c;
}

__attribute__((noinline)) static int probe_ubsan(int x) {
    return x + INT_MAX; // overflows for x > 0
}

static hwloc_topology_t load_topology(void) {
    hwloc_topology_t t;
    if (hwloc_topology_init(&t) != 0 || hwloc_topology_load(t) != 0) {
        fprintf(stderr, "probe: hwloc cannot load this machine's topology\n");
        exit(2);
    }
    return t;
}

__attribute__((noinline)) static void probe_hwloc(void) {
    sink = load_topology(); // and never destroyed
    sink = NULL;
}

// LeakSanitizer scans stacks conservatively: a pointer left in a dead frame would keep a leak reachable.
__attribute__((noinline)) static void scrub_stack(void) {
    volatile char junk[1 << 16];
    memset((char *)junk, 0, sizeof junk);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (strcmp(mode, "clean") && strcmp(mode, "leak") && strcmp(mode, "oob") && strcmp(mode, "ubsan") &&
        strcmp(mode, "hwloc")) {
        fprintf(stderr, "usage: %s clean|leak|oob|ubsan|hwloc\n", argv[0]);
        return 2;
    }
    MPI_Init(&argc, &argv);
    int rank, size, sum = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    hwloc_topology_destroy(load_topology());
    if (strcmp(mode, "hwloc") == 0) probe_hwloc();
    scrub_stack();
    int last = rank == size - 1, out = 0;
    if (strcmp(mode, "leak") == 0 && rank == 0) probe_leak();
    if (strcmp(mode, "oob") == 0 && last) out = probe_oob();
    if (strcmp(mode, "ubsan") == 0 && last) out = probe_ubsan(argc);
    MPI_Finalize();
    printf("probe %s: rank %d of %d done (%d)\n", mode, rank, size, out + sum - sum);
    return 0;
}
