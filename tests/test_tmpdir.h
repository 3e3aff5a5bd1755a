// tests/test_tmpdir.h: a scratch directory for a cmocka test group, and small file helpers.
// Header-only, for test programs; include after <cmocka.h>.
#ifndef DSMOE_TEST_TMPDIR_H
#define DSMOE_TEST_TMPDIR_H
#include <stdio.h>
#include <stdlib.h>

static char dir[256];

// Creates /tmp/dsmoe_test_<tag>_XXXXXX as `dir`; returns 0 on success (a cmocka setup result).
static int tmpdir_create(const char *tag) {
    snprintf(dir, sizeof dir, "/tmp/dsmoe_test_%s_XXXXXX", tag);
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd);
}

// dir/name in one of 8 rotating buffers (so a few can be used in one call).
static const char *path_of(const char *name) {
    static char buf[8][512];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

#endif
