// tests/sanitize/mpi_unowned.c: linked into every executable of the sanitized build (cmake/sanitize.cmake
// wraps MPI_Init, MPI_Init_thread and MPI_Finalize with the linker's --wrap): what Open MPI allocates
// inside those calls, on the calling thread, is left out of LeakSanitizer's report.
//
// Why: Open MPI keeps thousands of blocks from MPI_Init that it never frees, and more from
// MPI_Finalize. Suppressing them by name (tests/sanitize/lsan.supp) needs the whole allocation stack,
// unwound at every malloc of the run (fast_unwind_on_malloc=0: Open MPI's components are unloaded by
// MPI_Finalize and only the library frames under them name the owner), and each of them symbolized at
// exit. That made a one-rank dsmoe 2.5x slower to start and stop than without the leak check. No dsmoe
// code runs inside these calls (no keyval or error-handler callback is registered before or during
// them), so nothing of ours is hidden; blocks allocated by other threads (Open MPI's progress thread,
// dsmoe's watchdog) stay checked, and lsan.supp still covers Open MPI's allocations in the calls between.
//
// __real_* are weak: an executable that never calls MPI (a fuzz target, a unit test of the deck parser)
// links this object without MPI, and its wrappers are never called.
#include <stddef.h>

void __lsan_disable(void); // the LeakSanitizer runtime (linked into every executable of this build)
void __lsan_enable(void);

int __real_MPI_Init(int *argc, char ***argv) __attribute__((weak));
int __real_MPI_Init_thread(int *argc, char ***argv, int required, int *provided) __attribute__((weak));
int __real_MPI_Finalize(void) __attribute__((weak));

int __wrap_MPI_Init(int *argc, char ***argv);
int __wrap_MPI_Init_thread(int *argc, char ***argv, int required, int *provided);
int __wrap_MPI_Finalize(void);

int __wrap_MPI_Init(int *argc, char ***argv) {
    __lsan_disable();
    int rc = __real_MPI_Init(argc, argv);
    __lsan_enable();
    return rc;
}

int __wrap_MPI_Init_thread(int *argc, char ***argv, int required, int *provided) {
    __lsan_disable();
    int rc = __real_MPI_Init_thread(argc, argv, required, provided);
    __lsan_enable();
    return rc;
}

int __wrap_MPI_Finalize(void) {
    __lsan_disable();
    int rc = __real_MPI_Finalize();
    __lsan_enable();
    return rc;
}
