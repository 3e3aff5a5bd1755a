// tests/plugins/test_loader.c: core/plugins/plugin_loader.c against the real mpi comm plugin of the build tree and the
// fake plugins of tests/plugins/ (built into DSMOE_FAKE_PLUGIN_DIR by tests/plugins/loader.cmake): v2 files load
// natively, v1 files through the adapters (the caller sees a v2 table either way), other versions are
// refused with both numbers, and every rule of a v2 table is refused with the member named. Damaged
// copies of a real plugin (cut at several lengths, patched to another machine) are refused before
// dlopen, and a run.plugin_path / DSMOE_PLUGIN_PATH entry that is not a readable directory is an
// error rather than a skip. Every
// rejection is checked by its status and the exact words of its message.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
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

// <mpi.h> first: MPI_ABI is then this build's DSMOE_MPI_ABI_STRING, what the loader must compare with.
#include <mpi.h>

#include "plugin_loader.h"
#include "dsmoe/v1/comm_plugin_v1.h"   // the v1 tables, to compare the adapted ones with
#include "dsmoe/v1/kernel_plugin_v1.h"

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

// The real mpi plugin, whichever version it speaks: the caller gets a v2 table either way.
static void test_load_mpi_by_name(void **state) {
    const dsmoe_comm_plugin_v2 *p = NULL;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_comm("mpi", NULL, &p, &h, &err), DSMOE_OK);
    assert_non_null(p);
    assert_non_null(h.dl);
    assert_string_equal(h.path, BUILD "/libdsmoe_comm_mpi.so");
    assert_string_equal(p->name, "mpi");
    assert_int_equal(p->api_version, DSMOE_COMM_API_VERSION);
    assert_true(h.api_version == 1 || h.api_version == 2);
    assert_int_equal(h.adapter != NULL, h.api_version == 1);
    assert_int_equal(p->mem_kinds, DSMOE_MEM_HOST);
    dsmoe_plugin_unload(&h);
    assert_null(h.dl);
    assert_null(h.adapter);
    dsmoe_plugin_unload(&h); // twice, and NULL: no-ops
    dsmoe_plugin_unload(NULL);
}

static void test_env_path_honoured(void **state) {
    const dsmoe_kernel_plugin_v3 *k = NULL;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    setenv("DSMOE_PLUGIN_PATH", ":" FAKE ":", 1); // empty entries are dropped
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", NULL, &k, &h, &err), DSMOE_OK);
    assert_string_equal(h.path, FAKE "/libdsmoe_kernel_fakecuda.so");
    assert_int_equal(h.api_version, 3); // natively: no adapter
    assert_null(h.adapter);
    assert_int_equal(k->api_version, DSMOE_KERNEL_API_VERSION);
    assert_int_equal(k->mem_kind, DSMOE_MEM_CUDA);
    assert_null(k->device_count); // the optional members may be NULL
    assert_null(k->device_pci_bus_id);
    assert_null(k->queue_create);
    assert_null(k->sample);
    dsmoe_plugin_unload(&h);

    unsetenv("DSMOE_PLUGIN_PATH");
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", NULL, &k, &h, &err), DSMOE_ERR_IO);
    assert_null(k);
    assert_contains(err.msg, "kernel plugin 'fakecuda' not found");
}

static void test_extra_beats_env_beats_build(void **state) {
    const dsmoe_comm_plugin_v2 *p;
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
    const dsmoe_kernel_plugin_v3 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", fmt("%s:%s", dir_c, FAKE), &k, &h, &err),
                     DSMOE_ERR_SYSTEM);
    assert_contains(err.msg, fmt("kernel plugin 'fakecuda' found at %s/libdsmoe_kernel_fakecuda.so but failed "
                                 "to load: ", dir_c));
    assert_null(k);
    assert_null(h.dl);
    dsmoe_plugin_unload(&h); // a refused handle holds nothing
}

// ------------------------------------------------------------------------------------------------
// versions: kernel v3 and comm v2 natively, older ones through the adapters, anything else refused
// with both numbers

// The table the file itself returns under symbol, looked up here independently of the loader.
static const void *file_table(dsmoe_plugin_handle *h, const char *symbol) {
    const void *(*entry)(void) = (const void *(*)(void))dlsym(h->dl, symbol);
    assert_non_null(entry);
    return entry();
}

static void test_kernel_v1_through_adapter(void **state) {
    const dsmoe_kernel_plugin_v3 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &k, &h, &err), DSMOE_OK);
    assert_int_equal(h.api_version, 1);
    assert_non_null(h.adapter);
    const dsmoe_kernel_plugin_v1 *v1 = file_table(&h, DSMOE_KERNEL_PLUGIN_SYMBOL_V1);
    assert_int_equal(v1->api_version, 1);
    // The caller's table is a v3 table, apart from the file's: the adapter's, naming the v1 plugin.
    assert_ptr_not_equal((const void *)k, (const void *)v1);
    assert_int_equal(k->api_version, DSMOE_KERNEL_API_VERSION);
    assert_string_equal(k->name, "fakev1");
    assert_ptr_equal(k->description, v1->description);
    assert_int_equal(k->mem_kind, DSMOE_MEM_CUDA);
    assert_int_equal(k->caps, DSMOE_KCAP_FUSED_EPILOGUE | DSMOE_KCAP_DETERMINISTIC);
    assert_int_equal(k->dtypes, DSMOE_DTYPE_BIT(DSMOE_FLOAT32));
    assert_int_equal(k->n_params, 0);
    assert_null(k->kv_append); // no inference in v1
    assert_null(k->gate);      // nor fused gating: the core composes route and assign
    assert_null(k->queue_create); // the default queue only
    assert_null(k->device_count);
    assert_non_null(k->init);
    assert_non_null(k->gemm_grouped);
    assert_non_null(k->adamw);

    // Every adapted table has its own init (a per-slot trampoline), up to DSMOE_ADAPT_V1_SLOTS at once.
    dsmoe_plugin_handle more[8];
    const dsmoe_kernel_plugin_v3 *km[8];
    for (int i = 0; i < 7; i++) {
        assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &km[i], &more[i], &err), DSMOE_OK);
        assert_ptr_not_equal(km[i]->init, k->init);
        for (int j = 0; j < i; j++) assert_ptr_not_equal(km[i]->init, km[j]->init);
    }
    assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &km[7], &more[7], &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_fakev1.so: kernel plugin 'fakev1' speaks ABI 1 and cannot be "
                                  "adapted to ABI 3: 8 kernel plugins of ABI 1 are loaded already");
    assert_null(km[7]);
    assert_null(more[7].adapter);
    dsmoe_plugin_unload(&more[3]); // frees a slot
    assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &km[7], &more[7], &err), DSMOE_OK);
    dsmoe_plugin_unload(&more[7]);
    for (int i = 0; i < 7; i++) dsmoe_plugin_unload(&more[i]);
    dsmoe_plugin_unload(&h);

    // The optional device pair passes straight through (same signature in both versions).
    assert_int_equal(dsmoe_plugin_load_kernel("v1device", FAKE, &k, &h, &err), DSMOE_OK);
    v1 = file_table(&h, DSMOE_KERNEL_PLUGIN_SYMBOL_V1);
    assert_non_null(k->device_count);
    assert_ptr_equal(k->device_count, v1->device_count);
    assert_ptr_equal(k->device_pci_bus_id, v1->device_pci_bus_id);
    dsmoe_plugin_unload(&h);

    // v1 tables are checked by the v1 rules before they are adapted.
    assert_int_equal(dsmoe_plugin_load_kernel("v1halfdevice", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_v1halfdevice.so: kernel plugin 'v1halfdevice' sets device_count "
                                  "but not device_pci_bus_id; expected both (a device plugin) or neither");
    assert_null(h.adapter);
    assert_int_equal(dsmoe_plugin_load_kernel("v1nullmember", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_v1nullmember.so: kernel plugin 'v1nullmember' (ABI 1) leaves "
                                  "required member scale NULL");
    assert_null(k);
}

static void test_comm_v1_through_adapter(void **state) {
    const dsmoe_comm_plugin_v2 *c;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_comm("commv1", FAKE, &c, &h, &err), DSMOE_OK);
    assert_int_equal(h.api_version, 1);
    assert_non_null(h.adapter);
    const dsmoe_comm_plugin_v1 *v1 = file_table(&h, DSMOE_COMM_PLUGIN_SYMBOL_V1);
    assert_ptr_not_equal((const void *)c, (const void *)v1);
    assert_int_equal(c->api_version, DSMOE_COMM_API_VERSION);
    assert_string_equal(c->name, "commv1");
    assert_int_equal(c->mem_kinds, DSMOE_MEM_HOST);
    assert_int_equal(c->caps, DSMOE_CCAP_DETERMINISTIC); // host-progressed, blocking only
    assert_non_null(c->mpi_abi);
    assert_string_equal(c->mpi_abi, MPI_ABI);
    assert_non_null(c->reduce_scatter); // required in v2: set, and answers "unsupported"
    assert_non_null(c->alltoallv);
    assert_non_null(c->barrier);
    assert_null(c->allreduce_start);
    assert_null(c->request_wait);
    dsmoe_plugin_unload(&h);

    assert_int_equal(dsmoe_plugin_load_comm("commv1nb", FAKE, &c, &h, &err), DSMOE_OK);
    assert_int_equal(c->caps, DSMOE_CCAP_DETERMINISTIC | DSMOE_CCAP_NONBLOCKING);
    assert_non_null(c->allreduce_start);
    assert_non_null(c->request_test);
    assert_non_null(c->request_wait);
    dsmoe_plugin_unload(&h);

    assert_int_equal(dsmoe_plugin_load_comm("v1nullmember", FAKE, &c, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_comm_v1nullmember.so: comm plugin 'v1nullmember' (ABI 1) leaves "
                                  "required member alltoallv NULL");
    assert_int_equal(dsmoe_plugin_load_comm("v1halfnb", FAKE, &c, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, "comm plugin 'v1halfnb' (ABI 1) leaves required member request_wait NULL");
    assert_null(c);
    assert_null(h.dl);
}

// A v2 table is read as the prefix of a v3 one: every v2 member is the file's own, gate (set in the
// file's struct past the prefix, which a real v2 plugin does not have) is NULL.
static void test_kernel_v2_prefix(void **state) {
    const dsmoe_kernel_plugin_v3 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakev2", FAKE, &k, &h, &err), DSMOE_OK);
    assert_int_equal(h.api_version, 2);
    assert_non_null(h.adapter);
    const dsmoe_kernel_plugin_v3 *file = file_table(&h, DSMOE_KERNEL_PLUGIN_SYMBOL_V2);
    assert_int_equal(file->api_version, 2);
    assert_non_null(file->gate);
    assert_ptr_not_equal((const void *)k, (const void *)file);
    assert_int_equal(k->api_version, DSMOE_KERNEL_API_VERSION);
    assert_ptr_equal(k->name, file->name);
    assert_int_equal(k->caps, file->caps);
    assert_int_equal(k->dtypes, file->dtypes);
    assert_int_equal(k->n_params, 2);
    assert_ptr_equal(k->init, file->init);
    assert_ptr_equal(k->gate_route, file->gate_route);
    assert_ptr_equal(k->sample, file->sample);
    assert_ptr_equal(k->distill_backward, file->distill_backward); // the prefix's last member
    assert_null(k->gate);
    dsmoe_plugin_unload(&h);
    assert_null(h.adapter);
    assert_null(h.dl);
}

static void test_unknown_versions(void **state) {
    const dsmoe_kernel_plugin_v3 *k;
    const dsmoe_comm_plugin_v2 *c;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("badversion", FAKE, &k, &h, &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_badversion.so: the plugin speaks kernel ABI 4; this dsmoe speaks "
                                  "3 (and 2 and 1 through adapters)");
    assert_null(k);
    assert_int_equal(dsmoe_plugin_load_kernel("v4only", FAKE, &k, &h, &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_v4only.so: the plugin speaks kernel ABI 4 (it exports "
                                  "dsmoe_kernel_plugin_entry_v4 only); this dsmoe speaks 3 (and 2 and 1 through "
                                  "adapters)");
    assert_int_equal(dsmoe_plugin_load_kernel("v3saysv2", FAKE, &k, &h, &err), DSMOE_ERR_INTERNAL);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_v3saysv2.so: dsmoe_kernel_plugin_entry_v3() returned a table of "
                                  "kernel ABI 2; expected 3");
    assert_int_equal(dsmoe_plugin_load_comm("badversion", FAKE, &c, &h, &err), DSMOE_ERR_UNSUPPORTED);
    assert_contains(err.msg, FAKE "/libdsmoe_comm_badversion.so: the plugin speaks comm ABI 3; this dsmoe speaks 2 "
                                  "(and 1 through adapters)");
    assert_null(c);
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
    const dsmoe_kernel_plugin_v3 *k;
    const dsmoe_comm_plugin_v2 *c;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    char path[4096];
    dsmoe_plugin_search_path(FAKE, path, sizeof path);

    assert_int_equal(dsmoe_plugin_load_kernel("foo", FAKE, &k, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, fmt("kernel plugin 'foo' not found: no libdsmoe_kernel_foo.so in %s; available: %s;",
                                 path, expected_available("kernel", path)));
    // The fakes are among them, in order (cpu and others come and go with other targets).
    assert_contains(expected_available("kernel", path), "badversion");
    assert_contains(expected_available("kernel", path), "nullmember, nulltable");
    assert_contains(expected_available("kernel", path), "undefined, v1device, v1halfdevice");
    assert_contains(err.msg, "run.plugin_path or DSMOE_PLUGIN_PATH");
    assert_null(strstr(err.msg, "did you mean"));

    assert_int_equal(dsmoe_plugin_load_kernel("fakecdua", FAKE, &k, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, "(did you mean 'fakecuda'?)");

    assert_int_equal(dsmoe_plugin_load_comm("ucx", FAKE, &c, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, fmt("comm plugin 'ucx' not found: no libdsmoe_comm_ucx.so in %s; available: %s;",
                                 path, expected_available("comm", path)));
    assert_contains(expected_available("comm", path), "badversion, capnonb, commv1");
    // (mpistream, the stream-ordered test comm plugin, may sit between mpi and nbhalf)
    assert_contains(expected_available("comm", path), "cudaonly, fakempi, mpi");
    assert_contains(expected_available("comm", path), "nbhalf");
}

static void test_failed_to_load(void **state) {
    const dsmoe_kernel_plugin_v3 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("undefined", FAKE, &k, &h, &err), DSMOE_ERR_SYSTEM);
    assert_contains(err.msg, "kernel plugin 'undefined' found at " FAKE "/libdsmoe_kernel_undefined.so but "
                             "failed to load: ");
    assert_contains(err.msg, "undefined symbol: dsmoe_test_symbol_that_no_library_defines"); // dlerror's words
    assert_null(h.dl);

    // Refused before dlopen, by its first bytes.
    assert_int_equal(dsmoe_plugin_load_kernel("text", dir_c, &k, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, fmt("kernel plugin 'text' found at %s/libdsmoe_kernel_text.so but is not a loadable "
                                 "shared object: not an ELF file", dir_c));
    assert_null(h.dl);
}

// ------------------------------------------------------------------------------------------------
// damaged files: refused by the ELF check, before dlopen could die of SIGBUS in them

static unsigned char *read_whole(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*n);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, *n, f), *n);
    fclose(f);
    return b;
}

static void write_whole(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, n, f), n);
    fclose(f);
}

// Writes the first n bytes of img as libdsmoe_kernel_damaged.so in dir_a, loads it, expects `text`.
static void expect_damaged(const unsigned char *img, size_t n, const char *text) {
    const dsmoe_kernel_plugin_v3 *k = (void *)1;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    char *file = fmt("%s/libdsmoe_kernel_damaged.so", dir_a);
    write_whole(file, img, n);
    assert_int_equal(dsmoe_plugin_load_kernel("damaged", dir_a, &k, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, fmt("kernel plugin 'damaged' found at %s but is not a loadable shared object: %s", file,
                                 text));
    assert_null(k);
    assert_null(h.dl);
    unlink(file);
}

static void test_damaged_elf(void **state) {
    size_t n;
    unsigned char *img = read_whole(FAKE "/libdsmoe_kernel_fakecuda.so", &n);
    // The layout, read here on its own (the test's reference): where the header, the program header
    // table and the PT_LOAD segments end.
    Elf64_Ehdr eh;
    memcpy(&eh, img, sizeof eh);
    assert_true(n > sizeof eh);
    assert_int_equal(eh.e_phentsize, sizeof(Elf64_Phdr));
    size_t ph_end = (size_t)eh.e_phoff + (size_t)eh.e_phnum * sizeof(Elf64_Phdr);
    size_t last_end = 0, last_off = 0;
    for (int i = 0; i < eh.e_phnum; i++) {
        Elf64_Phdr ph;
        memcpy(&ph, img + eh.e_phoff + (size_t)i * sizeof ph, sizeof ph);
        if (ph.p_type == PT_LOAD && ph.p_offset + ph.p_filesz > last_end)
            last_end = (size_t)(ph.p_offset + ph.p_filesz), last_off = (size_t)ph.p_offset;
    }
    assert_true(last_end > last_off + 2 && last_end <= n);

    expect_damaged(img, 0, "not an ELF file");
    expect_damaged(img, 3, "not an ELF file");
    expect_damaged(img, 10, "truncated: the ELF header ends at byte 64 but the file has 10 bytes");
    expect_damaged(img, 40, "truncated: the ELF header ends at byte 64 but the file has 40 bytes");
    expect_damaged(img, sizeof eh, fmt("truncated: the program header table ends at byte %zu but the file has %zu "
                                       "bytes", ph_end, sizeof eh)); // header only
    size_t mid_ph = (size_t)eh.e_phoff + sizeof(Elf64_Phdr) + 10;
    expect_damaged(img, mid_ph, fmt("truncated: the program header table ends at byte %zu but the file has %zu "
                                    "bytes", ph_end, mid_ph));
    // Cut inside the last segment, and one byte short of its end: the first PT_LOAD (in table order)
    // that reaches past the cut is named.
    size_t cuts[] = {(last_off + last_end) / 2, last_end - 1};
    for (int c = 0; c < 2; c++) {
        int first = -1;
        size_t end = 0;
        for (int i = 0; i < eh.e_phnum && first < 0; i++) {
            Elf64_Phdr ph;
            memcpy(&ph, img + eh.e_phoff + (size_t)i * sizeof ph, sizeof ph);
            if (ph.p_type == PT_LOAD && ph.p_offset + ph.p_filesz > cuts[c])
                first = i, end = (size_t)(ph.p_offset + ph.p_filesz);
        }
        assert_true(first >= 0);
        expect_damaged(img, cuts[c], fmt("truncated: PT_LOAD segment %d ends at byte %zu but the file has %zu bytes",
                                         first, end, cuts[c]));
    }

    // Whole, but not for this process: another machine, another class, not a shared object.
    unsigned char *alt = malloc(n);
    assert_non_null(alt);
    memcpy(alt, img, n);
    uint16_t machine = EM_AARCH64 == EM_X86_64 ? 0 : (eh.e_machine == EM_AARCH64 ? EM_X86_64 : EM_AARCH64);
    memcpy(alt + offsetof(Elf64_Ehdr, e_machine), &machine, sizeof machine);
    expect_damaged(alt, n, fmt("built for another machine (e_machine %u; this machine is %u)", machine,
                               eh.e_machine));
    memcpy(alt, img, n);
    alt[EI_CLASS] = ELFCLASS32;
    expect_damaged(alt, n, "built for another word size (ELF class 1;");
    memcpy(alt, img, n);
    uint16_t exec = ET_EXEC;
    memcpy(alt + offsetof(Elf64_Ehdr, e_type), &exec, sizeof exec);
    expect_damaged(alt, n, "not a shared object (e_type 2;");

    // The whole copy loads: the check refuses nothing a good file has.
    write_whole(fmt("%s/libdsmoe_kernel_fakecuda.so", dir_a), img, n);
    const dsmoe_kernel_plugin_v3 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", dir_a, &k, &h, &err), DSMOE_OK);
    dsmoe_plugin_unload(&h);
    unlink(fmt("%s/libdsmoe_kernel_fakecuda.so", dir_a));
    free(alt);
    free(img);
}

// ------------------------------------------------------------------------------------------------
// the user's directories: an entry that is not a readable directory is an error, not a skip

static void test_bad_user_dirs(void **state) {
    const dsmoe_comm_plugin_v2 *c = (void *)1;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    char missing[256], file[256], locked[256]; // own buffers: fmt's rotate
    snprintf(missing, sizeof missing, "%s/missing", tmp_root);
    snprintf(file, sizeof file, "%s/libdsmoe_comm_mpi.so", dir_a); // a link to a file: not a directory
    snprintf(locked, sizeof locked, "%s/locked", tmp_root);
    // mpi would load from the build dir: the bad entry must not be skipped to reach it.
    assert_int_equal(dsmoe_plugin_load_comm("mpi", fmt("%s:%s", dir_b, missing), &c, &h, &err), DSMOE_ERR_IO);
    assert_string_equal(err.msg, fmt("comm plugin 'mpi': the directory '%s' listed in run.plugin_path does not "
                                     "exist; fix or remove that entry", missing));
    assert_null(c);
    assert_null(h.dl);
    assert_int_equal(dsmoe_plugin_load_comm("mpi", file, &c, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, fmt("the directory '%s' listed in run.plugin_path is not a directory", file));
    assert_int_equal(dsmoe_plugin_load_comm("mpi", fmt("%s/x", file), &c, &h, &err), DSMOE_ERR_IO); // ENOTDIR
    assert_contains(err.msg, fmt("the directory '%s/x' listed in run.plugin_path does not exist", file));

    setenv("DSMOE_PLUGIN_PATH", fmt("%s:%s", dir_b, missing), 1);
    assert_int_equal(dsmoe_plugin_load_comm("mpi", dir_a, &c, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, fmt("the directory '%s' listed in the environment variable DSMOE_PLUGIN_PATH does "
                                 "not exist", missing));
    setenv("DSMOE_PLUGIN_PATH", file, 1);
    assert_int_equal(dsmoe_plugin_load_comm("mpi", NULL, &c, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, "listed in the environment variable DSMOE_PLUGIN_PATH is not a directory");
    unsetenv("DSMOE_PLUGIN_PATH");

    // Unreadable: as root (the CI containers) mode 000 does not stop opendir, so there the directory
    // is simply searched; as anyone else it is refused.
    assert_int_equal(mkdir(locked, 0755), 0);
    assert_int_equal(chmod(locked, 0), 0);
    dsmoe_status s = dsmoe_plugin_load_comm("mpi", locked, &c, &h, &err);
    if (geteuid() != 0) {
        assert_int_equal(s, DSMOE_ERR_IO);
        assert_contains(err.msg, fmt("the directory '%s' listed in run.plugin_path cannot be read (", locked));
    } else {
        assert_int_equal(s, DSMOE_OK);
        assert_string_equal(h.path, BUILD "/libdsmoe_comm_mpi.so");
        dsmoe_plugin_unload(&h);
    }
    chmod(locked, 0755);
    rmdir(locked);

    // The built-in rules stay silent (the install dir of a build tree does not exist), and so does
    // dsmoe_plugin_list: it lists what is there.
    assert_int_equal(dsmoe_plugin_load_comm("mpi", "", &c, &h, &err), DSMOE_OK);
    dsmoe_plugin_unload(&h);
    char names[4][64];
    assert_true(dsmoe_plugin_list("comm", missing, names, 4) >= 1);
}

static void test_missing_symbol(void **state) {
    const dsmoe_kernel_plugin_v3 *k;
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("nosym", FAKE, &k, &h, &err), DSMOE_ERR_IO);
    assert_contains(err.msg, FAKE "/libdsmoe_kernel_nosym.so is not a dsmoe kernel plugin: no symbol "
                                  "dsmoe_kernel_plugin_entry_v3 (nor of an older version down to _v1) found");
    assert_null(k);
    assert_null(h.dl);
}

// One refusal: status, and the message after "<FAKE>/libdsmoe_<kind>_<name>.so: ".
#define REFUSED_KERNEL(name, status, text)                                                         \
    do {                                                                                           \
        const dsmoe_kernel_plugin_v3 *k_ = (const void *)1;                                        \
        assert_int_equal(dsmoe_plugin_load_kernel(name, FAKE, &k_, &h, &err), status);             \
        assert_contains(err.msg, FAKE "/libdsmoe_kernel_" name ".so: " text);                      \
        assert_null(k_);                                                                           \
        assert_null(h.dl);                                                                         \
    } while (0)
#define REFUSED_COMM(name, status, text)                                                           \
    do {                                                                                           \
        const dsmoe_comm_plugin_v2 *c_ = (const void *)1;                                          \
        assert_int_equal(dsmoe_plugin_load_comm(name, FAKE, &c_, &h, &err), status);               \
        assert_contains(err.msg, FAKE "/libdsmoe_comm_" name ".so: " text);                        \
        assert_null(c_);                                                                           \
        assert_null(h.dl);                                                                         \
    } while (0)

static void test_bad_tables(void **state) {
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    REFUSED_KERNEL("nulltable", DSMOE_ERR_INTERNAL, "dsmoe_kernel_plugin_entry_v3() returned NULL");
    REFUSED_KERNEL("v2nullmember", DSMOE_ERR_INTERNAL,
                   "kernel plugin 'v2nullmember' leaves required member gemm_grouped NULL");
    REFUSED_KERNEL("nullmember", DSMOE_ERR_INTERNAL, "kernel plugin 'nullmember' leaves required member gemm_grouped NULL");
    REFUSED_KERNEL("nulldescription", DSMOE_ERR_INTERNAL,
                   "kernel plugin 'nulldescription' leaves required member description NULL");
    REFUSED_KERNEL("misnamed", DSMOE_ERR_INTERNAL, "the table calls itself kernel plugin 'other' but the file is for 'misnamed'");
    REFUSED_KERNEL("zerokind", DSMOE_ERR_INTERNAL, "kernel plugin 'zerokind' declares mem_kind no memory (0x0)");
    REFUSED_KERNEL("halfdevice", DSMOE_ERR_INTERNAL, "kernel plugin 'halfdevice' sets device_count but not "
                   "device_pci_bus_id; expected both (a device plugin) or neither");
    REFUSED_KERNEL("halfqueue", DSMOE_ERR_INTERNAL, "kernel plugin 'halfqueue' sets queue_destroy but not "
                   "queue_create; expected both");
    REFUSED_KERNEL("badparam", DSMOE_ERR_INTERNAL, "kernel plugin 'badparam' declares setting 1 ('mode'): an ENUM "
                   "without choices");

    REFUSED_COMM("nullmember", DSMOE_ERR_INTERNAL, "comm plugin 'nullmember' leaves required member reduce_scatter NULL");
    REFUSED_COMM("zerokinds", DSMOE_ERR_INTERNAL, "comm plugin 'zerokinds' declares mem_kinds 0");
}

// The optional groups: all or none, and with their capability bits.
static void test_optional_groups(void **state) {
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    const dsmoe_kernel_plugin_v3 *k;
    assert_int_equal(dsmoe_plugin_load_kernel("fakefull", FAKE, &k, &h, &err), DSMOE_OK);
    assert_non_null(k->sample);
    assert_non_null(k->queue_create);
    assert_non_null(k->gate);
    assert_int_equal(k->n_params, 2);
    dsmoe_plugin_unload(&h);

    REFUSED_KERNEL("halfinference", DSMOE_ERR_INTERNAL, "kernel plugin 'halfinference' sets some inference members "
                   "but leaves attention_cached NULL");
    REFUSED_KERNEL("capnoinference", DSMOE_ERR_INTERNAL, "kernel plugin 'capnoinference' declares "
                   "DSMOE_KCAP_INFERENCE but leaves kv_append NULL");
    REFUSED_KERNEL("infnocache", DSMOE_ERR_INTERNAL, "kernel plugin 'infnocache' declares DSMOE_KCAP_INFERENCE but "
                   "leaves attention_cached NULL");
    REFUSED_KERNEL("inferencenocap", DSMOE_ERR_INTERNAL, "kernel plugin 'inferencenocap' sets kv_append, "
                   "attention_cached and sample but does not declare DSMOE_KCAP_INFERENCE in caps (0x2)");
    REFUSED_KERNEL("nofloat32", DSMOE_ERR_INTERNAL, "kernel plugin 'nofloat32' declares dtypes 0x2 without float32");
    REFUSED_KERNEL("bf16nocap", DSMOE_ERR_INTERNAL, "kernel plugin 'bf16nocap' lists bfloat16 in dtypes but does not "
                   "declare DSMOE_KCAP_BF16");
    REFUSED_KERNEL("capnobf16", DSMOE_ERR_INTERNAL, "kernel plugin 'capnobf16' declares DSMOE_KCAP_BF16 but not "
                   "bfloat16 in dtypes");

    const dsmoe_comm_plugin_v2 *c;
    assert_int_equal(dsmoe_plugin_load_comm("nobarrier", FAKE, &c, &h, &err), DSMOE_OK); // optional in v2
    assert_null(c->barrier);
    dsmoe_plugin_unload(&h);
    REFUSED_COMM("nbnocap", DSMOE_ERR_INTERNAL, "comm plugin 'nbnocap' sets allreduce_start, request_test and "
                 "request_wait but does not declare DSMOE_CCAP_NONBLOCKING in caps (0x0)");
    REFUSED_COMM("capnonb", DSMOE_ERR_INTERNAL, "comm plugin 'capnonb' declares DSMOE_CCAP_NONBLOCKING but leaves "
                 "allreduce_start NULL");
    REFUSED_COMM("nbhalf", DSMOE_ERR_INTERNAL, "comm plugin 'nbhalf' declares DSMOE_CCAP_NONBLOCKING but leaves "
                 "request_test NULL");
}

// A comm plugin built against another MPI is refused naming both; one built against ours loads.
static void test_mpi_abi(void **state) {
    dsmoe_plugin_handle h;
    dsmoe_err err = {0};
    REFUSED_COMM("fakempi", DSMOE_ERR_UNSUPPORTED, "comm plugin 'fakempi' was built against MPI 'Fake MPI 9.9' but "
                 "this dsmoe uses MPI '" MPI_ABI "'");
    const dsmoe_comm_plugin_v2 *c;
    assert_int_equal(dsmoe_plugin_load_comm("ownmpi", FAKE, &c, &h, &err), DSMOE_OK);
    assert_string_equal(c->mpi_abi, MPI_ABI);
    dsmoe_plugin_unload(&h);
    assert_int_equal(dsmoe_plugin_load_comm("cudaonly", FAKE, &c, &h, &err), DSMOE_OK); // NULL: no MPI calls
    assert_null(c->mpi_abi);
    dsmoe_plugin_unload(&h);
}

static void test_invalid_names(void **state) {
    const dsmoe_comm_plugin_v2 *c;
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
    const dsmoe_kernel_plugin_v3 *cuda, *cudav1;
    const dsmoe_comm_plugin_v2 *mpi, *cudaonly, *commv1;
    dsmoe_plugin_handle hk, hk1, hm, hc, hc1;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_load_kernel("fakecuda", FAKE, &cuda, &hk, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_kernel("fakev1", FAKE, &cudav1, &hk1, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_comm("mpi", NULL, &mpi, &hm, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_comm("cudaonly", FAKE, &cudaonly, &hc, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_load_comm("commv1", FAKE, &commv1, &hc1, &err), DSMOE_OK);

    assert_int_equal(dsmoe_plugin_check_pair(cuda, mpi, &err), DSMOE_ERR_INVALID);
    assert_string_equal(err.msg, "kernel plugin 'fakecuda' allocates CUDA memory but comm plugin 'mpi' accepts only "
                                 "host memory; choose run.comm_backend = nccl or a CUDA-aware MPI build");
    assert_int_equal(dsmoe_plugin_check_pair(cuda, cudaonly, &err), DSMOE_OK);
    // Adapted tables pair like any other.
    assert_int_equal(dsmoe_plugin_check_pair(cudav1, cudaonly, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(cudav1, commv1, &err), DSMOE_ERR_INVALID);
    assert_contains(err.msg, "kernel plugin 'fakev1' allocates CUDA memory but comm plugin 'commv1' accepts only host");

    // Tables made here, for the kinds no loadable plugin has.
    dsmoe_kernel_plugin_v3 host = {.api_version = 2, .name = "cpu", .mem_kind = DSMOE_MEM_HOST};
    assert_int_equal(dsmoe_plugin_check_pair(&host, mpi, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(&host, commv1, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(&host, cudaonly, &err), DSMOE_ERR_INVALID);
    assert_contains(err.msg, "kernel plugin 'cpu' allocates host memory but comm plugin 'cudaonly' accepts only "
                             "CUDA memory; choose run.comm_backend = mpi");
    dsmoe_comm_plugin_v2 odd = {.api_version = 2, .name = "odd", .mem_kinds = DSMOE_MEM_HOST | 0x8u};
    assert_int_equal(dsmoe_plugin_check_pair(cuda, &odd, &err), DSMOE_ERR_INVALID);
    assert_contains(err.msg, "accepts only host or unknown (0x8) memory");
    odd.mem_kinds = DSMOE_MEM_HOST | DSMOE_MEM_CUDA;
    assert_int_equal(dsmoe_plugin_check_pair(cuda, &odd, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(&host, &odd, &err), DSMOE_OK);
    assert_int_equal(dsmoe_plugin_check_pair(NULL, mpi, &err), DSMOE_ERR_INVALID);

    dsmoe_plugin_unload(&hk);
    dsmoe_plugin_unload(&hk1);
    dsmoe_plugin_unload(&hm);
    dsmoe_plugin_unload(&hc);
    dsmoe_plugin_unload(&hc1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_search_path_order),
        cmocka_unit_test(test_load_mpi_by_name),
        cmocka_unit_test(test_env_path_honoured),
        cmocka_unit_test(test_extra_beats_env_beats_build),
        cmocka_unit_test(test_first_file_wins_even_if_broken),
        cmocka_unit_test(test_kernel_v1_through_adapter),
        cmocka_unit_test(test_kernel_v2_prefix),
        cmocka_unit_test(test_comm_v1_through_adapter),
        cmocka_unit_test(test_unknown_versions),
        cmocka_unit_test(test_not_found_lists_dirs_and_available),
        cmocka_unit_test(test_failed_to_load),
        cmocka_unit_test(test_missing_symbol),
        cmocka_unit_test(test_damaged_elf),
        cmocka_unit_test(test_bad_user_dirs),
        cmocka_unit_test(test_bad_tables),
        cmocka_unit_test(test_optional_groups),
        cmocka_unit_test(test_mpi_abi),
        cmocka_unit_test(test_invalid_names),
        cmocka_unit_test(test_pair_check),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
