// tests/fuzz/fuzz_common.h: what the fuzz targets share: a scratch directory for the files the readers
// open, and the way a target reports a broken property (a message, then abort(), which libFuzzer records
// as a crash with the input). Header-only; docs/testing.md says how the targets are built and run.
#ifndef DSMOE_FUZZ_COMMON_H
#define DSMOE_FUZZ_COMMON_H
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

// A broken property of the code under test: says which, then aborts (a finding).
__attribute__((noreturn, format(printf, 1, 2))) static inline void fuzz_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fuzz: property violated: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    abort();
}

// The harness itself cannot go on (no scratch space): not a finding about dsmoe, so exit, not abort.
__attribute__((noreturn, format(printf, 1, 2))) static inline void fuzz_setup_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fuzz: harness error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    _exit(2);
}

static char fuzz_dir_path[512];

static inline void fuzz_dir_remove(void) {
    char cmd[600];
    if (!fuzz_dir_path[0]) return;
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fuzz_dir_path);
    if (system(cmd) != 0) fprintf(stderr, "fuzz: could not remove %s\n", fuzz_dir_path);
}

// The process's scratch directory, made on first use in $TMPDIR, else /dev/shm (the files are rewritten
// for every input: memory is faster than a disk), else /tmp. Removed at a normal exit; after a finding
// (abort) it stays, which is why tests/fuzz/run_fuzz.sh points TMPDIR at a directory it removes.
static inline const char *fuzz_dir(void) {
    if (fuzz_dir_path[0]) return fuzz_dir_path;
    const char *tmp = getenv("TMPDIR");
    const char *bases[3] = {tmp && tmp[0] ? tmp : "/dev/shm", "/dev/shm", "/tmp"};
    for (int i = 0; i < 3; i++) {
        snprintf(fuzz_dir_path, sizeof fuzz_dir_path, "%s/dsmoe_fuzz.XXXXXX", bases[i]);
        if (mkdtemp(fuzz_dir_path)) {
            atexit(fuzz_dir_remove);
            return fuzz_dir_path;
        }
    }
    fuzz_dir_path[0] = '\0';
    fuzz_setup_error("cannot create a scratch directory in /dev/shm, $TMPDIR or /tmp: %s", strerror(errno));
}

// <scratch>/name in one of 4 rotating buffers.
static inline const char *fuzz_path(const char *name) {
    static char buf[4][600];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", fuzz_dir(), name);
    return buf[k];
}

// Replaces <scratch>/name with the n bytes at data; returns its path.
static inline const char *fuzz_write(const char *name, const void *data, size_t n) {
    const char *path = fuzz_path(name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) fuzz_setup_error("cannot create %s: %s", path, strerror(errno));
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fuzz_setup_error("cannot write %s: %s", path, strerror(errno));
        p += w, n -= (size_t)w;
    }
    if (close(fd) != 0) fuzz_setup_error("cannot close %s: %s", path, strerror(errno));
    return path;
}

// The environment a fuzzed deck's ${VAR} references see (fuzz_deck.c, make_seeds.c); no DSMOE_* override,
// so the deck alone decides the configuration.
__attribute__((unused)) static char *const fuzz_deck_env[] = {"HOME=/home/fuzz", "FUZZ_N=4", "FUZZ_S=a b#c", "EMPTY=", NULL};

// Little-endian readers for the input's own header fields.
static inline uint32_t fuzz_u16(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static inline uint32_t fuzz_u32(const uint8_t *p) { return fuzz_u16(p) | fuzz_u16(p + 2) << 16; }

#endif
