// tests/plugins/loader/loader_test.h: what the two tests of core/plugins/plugin_loader.c share (test_loader_search.c,
// test_loader_tables.c): where the plugins are (the fake ones of tests/plugins/, the real ones of the
// build tree), this build's MPI, a scratch directory per run with three subdirectories a, b and c set up
// for the search tests, messages checked by their words, and the table a plugin file itself returns.
// Header-only: each test is one program. Include after <cmocka.h>, before any plugin header.
// defines: MPI_ABI, FAKE, BUILD, tmp_root, dir_a, dir_b, dir_c, assert_contains, fmt, symlink_or_die,
// setup, teardown
#ifndef DSMOE_LOADER_TEST_H
#define DSMOE_LOADER_TEST_H
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

// <mpi.h> first: MPI_ABI is then this build's DSMOE_MPI_ABI_STRING, what the loader must compare with.
#include <mpi.h>

#include "plugin_loader.h"

#define MPI_ABI DSMOE_MPI_ABI_STRING
_Static_assert(sizeof(MPI_ABI) > 1, "<mpi.h> must come before the plugin headers");

#define FAKE DSMOE_FAKE_PLUGIN_DIR
#define BUILD DSMOE_BUILD_PLUGIN_DIRS

static char tmp_root[64];                 // a scratch dir per run, removed by teardown
static char dir_a[128], dir_b[128], dir_c[128];

static void assert_contains_(const char *haystack, const char *needle, const char *file, int line) {
    if (!strstr(haystack, needle)) {
        print_error("message:  %s\nexpected: ...%s...\n", haystack, needle);
        _fail(file, line);
    }
}
#define assert_contains(h, n) assert_contains_((h), (n), __FILE__, __LINE__)

static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...) {
    static char bufs[4][8192];
    static int next;
    char *b = bufs[next++ % 4];
    va_list ap;
    va_start(ap, f);
    vsnprintf(b, sizeof bufs[0], f, ap);
    va_end(ap);
    return b;
}

static void symlink_or_die(const char *target, const char *link) {
    if (symlink(target, link) != 0) fail_msg("symlink %s -> %s failed", link, target);
}

static int setup(void **state) {
    unsetenv("DSMOE_PLUGIN_PATH");
    strcpy(tmp_root, "/tmp/dsmoe_test_loader_XXXXXX");
    if (!mkdtemp(tmp_root)) return -1;
    snprintf(dir_a, sizeof dir_a, "%s/a", tmp_root);
    snprintf(dir_b, sizeof dir_b, "%s/b", tmp_root);
    snprintf(dir_c, sizeof dir_c, "%s/c", tmp_root);
    if (mkdir(dir_a, 0755) || mkdir(dir_b, 0755) || mkdir(dir_c, 0755)) return -1;
    // a and b both hold "mpi" (links to the real one): which one loads tells the search order.
    symlink_or_die(BUILD "/libdsmoe_comm_mpi.so", fmt("%s/libdsmoe_comm_mpi.so", dir_a));
    symlink_or_die(BUILD "/libdsmoe_comm_mpi.so", fmt("%s/libdsmoe_comm_mpi.so", dir_b));
    // c holds a "fakecuda" that cannot load, and a "text" that is not a shared object at all.
    symlink_or_die(FAKE "/libdsmoe_kernel_undefined.so", fmt("%s/libdsmoe_kernel_fakecuda.so", dir_c));
    FILE *f = fopen(fmt("%s/libdsmoe_kernel_text.so", dir_c), "w");
    if (!f) return -1;
    fputs("not a shared object\n", f);
    fclose(f);
    return 0;
}

static int teardown(void **state) {
    unlink(fmt("%s/libdsmoe_comm_mpi.so", dir_a));
    unlink(fmt("%s/libdsmoe_comm_mpi.so", dir_b));
    unlink(fmt("%s/libdsmoe_kernel_fakecuda.so", dir_c));
    unlink(fmt("%s/libdsmoe_kernel_text.so", dir_c));
    rmdir(dir_a), rmdir(dir_b), rmdir(dir_c), rmdir(tmp_root);
    return 0;
}

#endif // DSMOE_LOADER_TEST_H
