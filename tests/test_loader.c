// tests/test_loader.c: core/plugin_loader.c against the real mpi comm plugin of the build tree and the
// deliberately broken plugins of tests/plugins/ (built into DSMOE_FAKE_PLUGIN_DIR by tests/loader.cmake).
// Every rejection is checked by its status and the exact words of its message.
#define _GNU_SOURCE
#include <glob.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "plugin_loader.h"

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

// ------------------------------------------------------------------------------------------------
// search path

// The test binary lives in <build>/tests, so the "<exe dir>/../lib/dsmoe" rule names BUILD again and
// is dropped as a duplicate: the path is extra, env, BUILD, install.
static void test_search_path_order(void **state) {
    char buf[4096];
    unsetenv("DSMOE_PLUGIN_PATH");
    dsmoe_plugin_search_path(NULL, buf, sizeof buf);
    assert_string_equal(buf, BUILD ":" DSMOE_TEST_INSTALL_PLUGIN_DIR);

    dsmoe_plugin_search_path("/x/a::/x/b:", buf, sizeof buf); // empty entries are skipped
    assert_string_equal(buf, "/x/a:/x/b:" BUILD ":" DSMOE_TEST_INSTALL_PLUGIN_DIR);

    setenv("DSMOE_PLUGIN_PATH", "/y/c:/x/a", 1); // after the extra path; /x/a is listed once
    dsmoe_plugin_search_path("/x/a:/x/b", buf, sizeof buf);
    assert_string_equal(buf, "/x/a:/x/b:/y/c:" BUILD ":" DSMOE_TEST_INSTALL_PLUGIN_DIR);
    setenv("DSMOE_PLUGIN_PATH", "", 1);
    dsmoe_plugin_search_path("/x/a", buf, sizeof buf);
    assert_string_equal(buf, "/x/a:" BUILD ":" DSMOE_TEST_INSTALL_PLUGIN_DIR);
    unsetenv("DSMOE_PLUGIN_PATH");

    // A short buffer keeps whole directories only.
    char small[12];
    dsmoe_plugin_search_path("/x/a:/x/b", small, sizeof small);
    assert_string_equal(small, "/x/a:/x/b");
    dsmoe_plugin_search_path("/x/a", small, 1);
    assert_string_equal(small, "");
}

// ------------------------------------------------------------------------------------------------
// loading real and fake plugins from the right place

static void test_load_mpi_by_name(void **state) {
    const dsmoe_comm_plugin_v1 *p = NULL;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_comm("mpi", NULL, &p, &h, &err), DSMOE_OK);
    assert_non_null(p);
    assert_non_null(h.dl);
    assert_string_equal(h.path, BUILD "/libdsmoe_comm_mpi.so");
    assert_string_equal(p->name, "mpi");
    assert_int_equal(p->api_version, DSMOE_COMM_API_VERSION);
    assert_int_equal(p->mem_kinds, DSMOE_MEM_HOST);
    dsmoe_plugin_unload(&h);
    assert_null(h.dl);
    dsmoe_plugin_unload(&h); // twice, and NULL: no-ops
    dsmoe_plugin_unload(NULL);
}

static void test_env_path_honoured(void **state) {
    const dsmoe_kernel_plugin_v1 *k = NULL;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    setenv("DSMOE_PLUGIN_PATH", "/nonexistent/dir:" FAKE, 1); // a missing directory is skipped
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", NULL, &k, &h, &err), DSMOE_OK);
    assert_string_equal(h.path, FAKE "/libdsmoe_kernel_fakecuda.so");
    assert_int_equal(k->mem_kind, DSMOE_MEM_CUDA);
    assert_null(k->device_count); // the optional members may be NULL
    assert_null(k->device_pci_bus_id);
    dsmoe_plugin_unload(&h);

    unsetenv("DSMOE_PLUGIN_PATH");
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", NULL, &k, &h, &err), DSMOE_ERR_IO);
    assert_null(k);
    assert_contains(err.msg, "kernel plugin 'fakecuda' not found");
}

static void test_extra_beats_env_beats_build(void **state) {
    const dsmoe_comm_plugin_v1 *p;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    setenv("DSMOE_PLUGIN_PATH", dir_b, 1);
    assert_int_equal(dsmoe_plugin_load_comm("mpi", dir_a, &p, &h, &err), DSMOE_OK);
    assert_string_equal(h.path, fmt("%s/libdsmoe_comm_mpi.so", dir_a));
    dsmoe_plugin_unload(&h);

    assert_int_equal(dsmoe_plugin_load_comm("mpi", NULL, &p, &h, &err), DSMOE_OK); // env beats build dir
    assert_string_equal(h.path, fmt("%s/libdsmoe_comm_mpi.so", dir_b));
    dsmoe_plugin_unload(&h);
    unsetenv("DSMOE_PLUGIN_PATH");
}

// A file that exists but fails stops the search: the later, loadable fakecuda in FAKE is not tried.
static void test_first_file_wins_even_if_broken(void **state) {
    const dsmoe_kernel_plugin_v1 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", fmt("%s:%s", dir_c, FAKE), &k, &h, &err),
                     DSMOE_ERR_SYSTEM);
    assert_contains(err.msg, fmt("kernel plugin 'fakecuda' found at %s/libdsmoe_kernel_fakecuda.so but failed "
                                 "to load: ", dir_c));
    assert_null(k);
    assert_null(h.dl);
}

// ------------------------------------------------------------------------------------------------
// each rejection, by status and message

static int cmp_name(const void *a, const void *b) { return strcmp(a, b); }

// The plugins of a kind in every directory of path, as the loader should list them: found here with
// glob(3), sorted, each once.
static const char *expected_available(const char *kind, const char *path) {
    static char out[4096];
    char names[64][64];
    int n = 0;
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", path);
    for (char *save = NULL, *dir = strtok_r(copy, ":", &save); dir; dir = strtok_r(NULL, ":", &save)) {
        glob_t g;
        if (glob(fmt("%s/libdsmoe_%s_*.so", dir, kind), 0, NULL, &g) != 0) continue;
        for (size_t i = 0; i < g.gl_pathc && n < 64; i++) {
            const char *base = strrchr(g.gl_pathv[i], '/') + 1 + strlen("libdsmoe__") + strlen(kind);
            snprintf(names[n], sizeof names[n], "%.*s", (int)(strlen(base) - 3), base);
            int dup = 0;
            for (int j = 0; j < n; j++) dup |= strcmp(names[j], names[n]) == 0;
            n += !dup;
        }
        globfree(&g);
    }
    qsort(names, (size_t)n, sizeof names[0], cmp_name);
    out[0] = '\0';
    for (int i = 0; i < n; i++) strcat(strcat(out, i ? ", " : ""), names[i]);
    return out;
}

static void test_not_found_lists_dirs_and_available(void **state) {
    const dsmoe_kernel_plugin_v1 *k;
    const dsmoe_comm_plugin_v1 *c;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    char path[4096];
    dsmoe_plugin_search_path(FAKE, path, sizeof path);

    assert_int_equal(dsmoe_plugin_load_kernel("foo", FAKE, &k, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, fmt("kernel plugin 'foo' not found: no libdsmoe_kernel_foo.so in %s; available: %s;",
                                 path, expected_available("kernel", path)));
    // The fakes are among them, in order (cpu and others come and go with other targets).
    assert_contains(expected_available("kernel", path), "badversion");
    assert_contains(expected_available("kernel", path), "nulltable, undefined, zerokind");
    assert_contains(err.msg, "run.plugin_path or DSMOE_PLUGIN_PATH");
    assert_null(strstr(err.msg, "did you mean"));

    assert_int_equal(dsmoe_plugin_load_kernel("fakecdua", FAKE, &k, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, "(did you mean 'fakecuda'?)");

    assert_int_equal(dsmoe_plugin_load_comm("nccl", FAKE, &c, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, fmt("comm plugin 'nccl' not found: no libdsmoe_comm_nccl.so in %s; available: %s;",
                                 path, expected_available("comm", path)));
    assert_contains(expected_available("comm", path), "badversion, cudaonly, mpi, nullmember");
}

static void test_failed_to_load(void **state) {
    const dsmoe_kernel_plugin_v1 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("undefined", FAKE, &k, &h, &err), DSMOE_ERR_SYSTEM);
    assert_contains(err.msg, "kernel plugin 'undefined' found at " FAKE "/libdsmoe_kernel_undefined.so but "
                             "failed to load: ");
    assert_contains(err.msg, "undefined symbol: dsmoe_test_symbol_that_no_library_defines"); // dlerror's words
    assert_null(h.dl);

    assert_int_equal(dsmoe_plugin_load_kernel("text", dir_c, &k, &h, &err), DSMOE_ERR_SYSTEM);
    assert_contains(err.msg, fmt("kernel plugin 'text' found at %s/libdsmoe_kernel_text.so but failed to load: ",
                                 dir_c));
}

static void test_missing_symbol(void **state) {
    const dsmoe_kernel_plugin_v1 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("nosym", FAKE, &k, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_nosym.so is not a dsmoe kernel plugin: "
                                  "symbol dsmoe_kernel_plugin_entry_v1 not found");
    assert_null(k);
    assert_null(h.dl);
}

static void test_abi_mismatch(void **state) {
    const dsmoe_kernel_plugin_v1 *k;
    const dsmoe_comm_plugin_v1 *c;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("badversion", FAKE, &k, &h, &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_badversion.so: kernel plugin ABI version 7, this dsmoe speaks 1");
    assert_null(k);
    assert_int_equal(dsmoe_plugin_load_comm("badversion", FAKE, &c, &h, &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_comm_badversion.so: comm plugin ABI version 2, this dsmoe speaks 1");
    assert_null(c);
    assert_null(h.dl);
}

static void test_bad_tables(void **state) {
    const dsmoe_kernel_plugin_v1 *k;
    const dsmoe_comm_plugin_v1 *c;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("nulltable", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_nulltable.so: dsmoe_kernel_plugin_entry_v1() returned NULL");

    assert_int_equal(dsmoe_plugin_load_kernel("nullmember", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_nullmember.so: kernel plugin 'nullmember' leaves required "
                                  "member gemm_grouped NULL");
    assert_null(k);

    assert_int_equal(dsmoe_plugin_load_comm("nullmember", FAKE, &c, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_comm_nullmember.so: comm plugin 'nullmember' leaves required "
                                  "member alltoallv NULL");
    assert_null(c);

    assert_int_equal(dsmoe_plugin_load_kernel("misnamed", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_misnamed.so: the table calls itself kernel plugin 'other' "
                                  "but the file is for 'misnamed'");

    assert_int_equal(dsmoe_plugin_load_kernel("zerokind", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_zerokind.so: kernel plugin 'zerokind' declares mem_kind "
                                  "no memory (0x0)");
    assert_null(k);

    assert_int_equal(dsmoe_plugin_load_kernel("halfdevice", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_halfdevice.so: kernel plugin 'halfdevice' sets device_count but "
                                  "not device_pci_bus_id; expected both (a device plugin) or neither");
    assert_null(k);
    assert_null(h.dl);
}

static void test_invalid_names(void **state) {
    const dsmoe_comm_plugin_v1 *c;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    const char *bad[] = {"../mpi", "", "MPI", "a/b", "x y"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(dsmoe_plugin_load_comm(bad[i], dir_a, &c, &h, &err), DSMOE_ERR_INVALID);
        assert_contains(err.msg, fmt("comm plugin name '%s' is invalid", bad[i]));
    }
    assert_int_equal(dsmoe_plugin_load_comm(NULL, dir_a, &c, &h, &err), DSMOE_ERR_INVALID);
}

// ------------------------------------------------------------------------------------------------
// memory-kind pairing

static void test_pair_check(void **state) {
    const dsmoe_kernel_plugin_v1 *cuda;
    const dsmoe_comm_plugin_v1 *mpi, *cudaonly;
    dsmoe_plugin_handle hk, hm, hc;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", FAKE, &cuda, &hk, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_comm("mpi", NULL, &mpi, &hm, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_comm("cudaonly", FAKE, &cudaonly, &hc, &err), DSMOE_OK);

    assert_int_equal(dsmoe_plugin_check_pair(cuda, mpi, &err), DSMOE_ERR_INVALID);
    assert_string_equal(err.msg, "kernel plugin 'fakecuda' allocates CUDA memory but comm plugin 'mpi' accepts only "
                                 "host memory; choose run.comm_backend = nccl or a CUDA-aware MPI build");
    assert_int_equal(dsmoe_plugin_check_pair(cuda, cudaonly, &err), DSMOE_OK);

    // Tables made here, for the kinds no loadable plugin has.
    dsmoe_kernel_plugin_v1 host = {.api_version = 1, .name = "cpu", .mem_kind = DSMOE_MEM_HOST};
    assert_int_equal(dsmoe_plugin_check_pair(&host, mpi, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(&host, cudaonly, &err), DSMOE_ERR_INVALID);
    assert_contains(err.msg, "kernel plugin 'cpu' allocates host memory but comm plugin 'cudaonly' accepts only "
                             "CUDA memory; choose run.comm_backend = mpi");
    dsmoe_comm_plugin_v1 odd = {.api_version = 1, .name = "odd", .mem_kinds = DSMOE_MEM_HOST | 0x8u};
    assert_int_equal(dsmoe_plugin_check_pair(cuda, &odd, &err), DSMOE_ERR_INVALID);
    assert_contains(err.msg, "accepts only host or unknown (0x8) memory");
    odd.mem_kinds = DSMOE_MEM_HOST | DSMOE_MEM_CUDA;
    assert_int_equal(dsmoe_plugin_check_pair(cuda, &odd, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(&host, &odd, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(NULL, mpi, &err), DSMOE_ERR_INVALID);

    dsmoe_plugin_unload(&hk);
    dsmoe_plugin_unload(&hm);
    dsmoe_plugin_unload(&hc);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_search_path_order),
        cmocka_unit_test(test_load_mpi_by_name),
        cmocka_unit_test(test_env_path_honoured),
        cmocka_unit_test(test_extra_beats_env_beats_build),
        cmocka_unit_test(test_first_file_wins_even_if_broken),
        cmocka_unit_test(test_not_found_lists_dirs_and_available),
        cmocka_unit_test(test_failed_to_load),
        cmocka_unit_test(test_missing_symbol),
        cmocka_unit_test(test_abi_mismatch),
        cmocka_unit_test(test_bad_tables),
        cmocka_unit_test(test_invalid_names),
        cmocka_unit_test(test_pair_check),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
