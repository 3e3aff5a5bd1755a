// tests/io/test_run_lock.c: one training run per directory (core/io/run_lock.c). The locks are
// open-file-description locks, which conflict between two opens of a file even in one process, so a
// second take here stands for a second run: refused with the key, the directory and the holder's
// description, which names this process; the same directory under two names is locked once (two locks
// would refuse each other); a release lets the next take in, and the file left behind does not block;
// directories are created; an unusable path is an I/O error naming the key. The probe (dsmoe --check)
// names a holder as a take does, and finds none once it is released.
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <sys/stat.h>
#include <unistd.h>

#include "run_lock.h"

#include "test_tmpdir.h" // dir, path_of, write_bytes, teardown

static int setup(void **state) {
    (void)state;
    return tmpdir_create("run_lock");
}

static void test_second_run_refused(void **state) {
    (void)state;
    dsmoe_err err = {0};
    const char *out = path_of("out"), *ckpt = path_of("scratch/ckpt"); // neither exists yet
    const char *dirs[] = {out, ckpt}, *keys[] = {"run.output_dir", "checkpoint.dir"};
    dsmoe_run_lock *first = NULL, *second = NULL;
    assert_int_equal(dsmoe_run_lock_take(dirs, keys, 2, &first, &err), DSMOE_OK);
    assert_non_null(first);
    struct stat st;
    assert_int_equal(stat(path_of("scratch/ckpt/.dsmoe.lock"), &st), 0);
    FILE *f = fopen(path_of("out/.dsmoe.lock"), "r");
    assert_non_null(f);
    char line[512] = "", pid[64];
    assert_non_null(fgets(line, sizeof line, f));
    fclose(f);
    snprintf(pid, sizeof pid, "pid %ld on ", (long)getpid());
    assert_true(strncmp(line, pid, strlen(pid)) == 0);
    assert_non_null(strstr(line, " UTC\n"));

    // The output directory is held: refused on it, naming it and the holder.
    assert_int_equal(dsmoe_run_lock_take(dirs, keys, 2, &second, &err), DSMOE_ERR_INVALID);
    assert_null(second);
    char want[1024];
    snprintf(want, sizeof want, "run.output_dir = %s is in use by another training run (%s; the lock of %s/.dsmoe.lock)",
             out, strtok(line, "\n"), out);
    assert_non_null(strstr(err.msg, want));
    // Only the checkpoint directory in common: refused on that one.
    const char *other[] = {path_of("out2"), ckpt};
    assert_int_equal(dsmoe_run_lock_take(other, keys, 2, &second, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "checkpoint.dir = "));
    assert_non_null(strstr(err.msg, "/scratch/ckpt is in use by another training run (pid "));
    // The refused take let go of what it had locked (out2): a third takes it.
    const char *third_dirs[] = {path_of("out2")};
    dsmoe_run_lock *third = NULL;
    assert_int_equal(dsmoe_run_lock_take(third_dirs, keys, 1, &third, &err), DSMOE_OK);
    dsmoe_run_lock_release(third);

    // The probe of dsmoe --check sees the holder as a take does, without taking; a directory with no lock
    // file (or none at all) holds none.
    char msg[1200] = "";
    assert_int_equal(dsmoe_run_lock_probe(dirs, keys, 2, msg, sizeof msg), 1);
    assert_non_null(strstr(msg, want));
    char nowhere[600], out2[600]; // path_of's buffers are few: out and ckpt must stay
    snprintf(nowhere, sizeof nowhere, "%s", path_of("nowhere"));
    snprintf(out2, sizeof out2, "%s", other[0]);
    const char *free_dirs[] = {nowhere, out2};
    assert_int_equal(dsmoe_run_lock_probe(free_dirs, keys, 2, msg, sizeof msg), 0);
    const char *second_only[] = {nowhere, ckpt};
    assert_int_equal(dsmoe_run_lock_probe(second_only, keys, 2, msg, sizeof msg), 1);
    assert_non_null(strstr(msg, "checkpoint.dir = "));

    // Released: the next run takes both, with the files still there.
    dsmoe_run_lock_release(first);
    assert_int_equal(dsmoe_run_lock_probe(dirs, keys, 2, msg, sizeof msg), 0);
    assert_int_equal(stat(path_of("out/.dsmoe.lock"), &st), 0);
    assert_int_equal(dsmoe_run_lock_take(dirs, keys, 2, &second, &err), DSMOE_OK);
    dsmoe_run_lock_release(second);
    dsmoe_run_lock_release(NULL);
}

static void test_same_directory_twice(void **state) {
    (void)state;
    dsmoe_err err = {0};
    assert_int_equal(mkdir(path_of("same"), 0755), 0);
    assert_int_equal(symlink(path_of("same"), path_of("alias")), 0);
    const char *dirs[] = {path_of("same"), path_of("alias")}, *keys[] = {"run.output_dir", "checkpoint.dir"};
    dsmoe_run_lock *l = NULL;
    assert_int_equal(dsmoe_run_lock_take(dirs, keys, 2, &l, &err), DSMOE_OK);
    dsmoe_run_lock_release(l);
}

static void test_unusable_directory(void **state) {
    (void)state;
    dsmoe_err err = {0};
    write_bytes(path_of("plain"), "x", 1); // a file where the directory should be
    const char *dirs[] = {path_of("plain")}, *keys[] = {"run.output_dir"};
    dsmoe_run_lock *l = NULL;
    assert_int_equal(dsmoe_run_lock_take(dirs, keys, 1, &l, &err), DSMOE_ERR_IO);
    assert_null(l);
    assert_non_null(strstr(err.msg, path_of("plain")));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_second_run_refused),
        cmocka_unit_test(test_same_directory_twice),
        cmocka_unit_test(test_unusable_directory),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
