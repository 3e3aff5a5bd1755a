// tests/plugins/loader/test_loader_search.c: how core/plugins/plugin_loader.c finds a plugin, and what it says when it
// cannot find or load one, against the real mpi comm plugin of the build tree and the fake plugins of
// tests/plugins/ (built into DSMOE_FAKE_PLUGIN_DIR by tests/plugins/loader/loader.cmake): the search path's order
// (extra path, DSMOE_PLUGIN_PATH, build dir, install dir), the first file found winning even when it is
// broken, a name not found listing the directories searched and the plugins available, a file that
// fails to dlopen named with dlerror's words. Damaged copies of a real plugin (cut at several lengths,
// patched to another machine) are refused before dlopen, a run.plugin_path / DSMOE_PLUGIN_PATH entry
// that is not a readable directory is an error rather than a skip, and an invalid name is refused.
// Every rejection is checked by its status and the exact words of its message. What a loaded table must
// hold is tested by test_loader_tables.c.
#define _GNU_SOURCE
#include <elf.h>
#include <glob.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "loader_test.h"

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

// ------------------------------------------------------------------------------------------------
// names: one path component of ordinary characters, refused before any directory is searched

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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_search_path_order),
        cmocka_unit_test(test_load_mpi_by_name),
        cmocka_unit_test(test_env_path_honoured),
        cmocka_unit_test(test_extra_beats_env_beats_build),
        cmocka_unit_test(test_first_file_wins_even_if_broken),
        cmocka_unit_test(test_not_found_lists_dirs_and_available),
        cmocka_unit_test(test_failed_to_load),
        cmocka_unit_test(test_damaged_elf),
        cmocka_unit_test(test_bad_user_dirs),
        cmocka_unit_test(test_invalid_names),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
