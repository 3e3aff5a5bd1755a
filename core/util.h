// core/util.h: error reporting, checked allocation and atomic file writes for the core.
// defines: dsmoe_err, dsmoe_err_set, DSMOE_TRY, dsmoe_malloc, dsmoe_write_file_atomic,
//          dsmoe_now_seconds, dsmoe_format_hms, dsmoe_parse_size, dsmoe_parse_duration, dsmoe_mkdir_p
// Library functions return dsmoe_status and, on failure, leave one human-readable message in a
// dsmoe_err the caller passed (file, line or key, what was expected). Only main() and tests exit.
#ifndef DSMOE_UTIL_H
#define DSMOE_UTIL_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include "dsmoe/status.h"

// Which ranks share a failure, so that main() prints it once (collective) or ends the job from the
// rank that failed (local) while the others wait to be ended (peer).
typedef enum { DSMOE_SCOPE_LOCAL = 0, DSMOE_SCOPE_COLLECTIVE = 1, DSMOE_SCOPE_PEER = 2 } dsmoe_err_scope;

typedef struct dsmoe_err {
    dsmoe_status status;
    int scope; // dsmoe_err_scope; dsmoe_err_set makes it LOCAL
    char msg[2048];
} dsmoe_err;

// Sets err (if not NULL) and returns status, so callers can `return dsmoe_err_set(...)`.
dsmoe_status dsmoe_err_set(dsmoe_err *err, dsmoe_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

// Collective over MPI_COMM_WORLD: every rank learns whether any rank failed. If all failed, err's scope
// becomes COLLECTIVE; if some failed, those keep LOCAL and the others get PEER with a message saying so.
// Returns the status this rank must act on (non-OK when any rank failed).
dsmoe_status dsmoe_errors_agree(dsmoe_status status, dsmoe_err *err);

// Propagates a failing status (the callee already filled err).
#define DSMOE_TRY(call)                                                                            \
    do {                                                                                           \
        dsmoe_status dsmoe_try_s_ = (call);                                                        \
        if (dsmoe_try_s_ != DSMOE_OK) return dsmoe_try_s_;                                         \
    } while (0)

// For main() and tests: print file:line, the message and a hint, then exit(1).
#define DSMOE_CHECK(cond, ...)                                                                     \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "dsmoe: check failed at %s:%d: ", __FILE__, __LINE__);                 \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

// malloc that sets err on failure (names what was being allocated).
void *dsmoe_malloc(size_t bytes, const char *what, dsmoe_err *err);
void *dsmoe_calloc(size_t n, size_t size, const char *what, dsmoe_err *err);

// Writes `len` bytes to path through `path.tmp.<pid>`: write, fsync, rename, fsync the directory.
// On failure the old file at path is untouched and the temporary is removed.
dsmoe_status dsmoe_write_file_atomic(const char *path, const void *data, size_t len, dsmoe_err *err);

// Creates a directory and its parents (like mkdir -p).
dsmoe_status dsmoe_mkdir_p(const char *path, dsmoe_err *err);

// Monotonic wall clock in seconds.
double dsmoe_now_seconds(void);
// Seconds as m:ss or h:mm:ss (progress lines).
void dsmoe_format_hms(double seconds, char *buf, size_t len);

// "12", "4K", "1.5M", "2G" (powers of 1000; "Ki", "Mi", "Gi" are powers of 1024) -> value.
// Decimal only: no blanks, no hex ("0x1p4"), no "inf"/"nan". Returns 0 on success, -1 if text is not
// such a number (or is not finite as a double).
int dsmoe_parse_scaled(const char *text, double *out);
// The same syntax read exactly as an integer: [+-]digits[.digits][e[+-]digits][K|M|G|T[i]], whose value
// must be whole ("1.5K" = 1500, "1e3" = 1000, "2.5" is not). Computed in integers, never through a
// double, so nothing rounds or wraps: *negative and *magnitude (|value| <= UINT64_MAX) get the value.
// Returns 0, -1 when text is not such a whole number, -2 when |value| > UINT64_MAX.
int dsmoe_parse_int_strict(const char *text, int *negative, uint64_t *magnitude);
// "30", "30s", "5min", "2h", "1.5h" -> seconds. Returns 0 on success, -1 otherwise.
int dsmoe_parse_duration(const char *text, double *out);

// Levenshtein distance, for did-you-mean suggestions.
int dsmoe_edit_distance(const char *a, const char *b);

#endif
