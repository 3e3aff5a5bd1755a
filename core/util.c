// core/util.c: see util.h.
#define _GNU_SOURCE
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

dsmoe_status dsmoe_err_set(dsmoe_err *err, dsmoe_status status, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->status = status;
        err->scope = DSMOE_SCOPE_LOCAL;
    }
    return status;
}

void *dsmoe_malloc(size_t bytes, const char *what, dsmoe_err *err) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory allocating %zu bytes for %s", bytes, what);
    return p;
}

void *dsmoe_calloc(size_t n, size_t size, const char *what, dsmoe_err *err) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory allocating %zu x %zu bytes for %s", n, size, what);
    return p;
}

static dsmoe_status fsync_parent_dir(const char *path, dsmoe_err *err) {
    char *copy = strdup(path);
    if (!copy) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory");
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    free(copy);
    if (fd < 0) return DSMOE_OK; // not every filesystem lets us open a directory; the rename stands
    fsync(fd);
    close(fd);
    return DSMOE_OK;
}

dsmoe_status dsmoe_write_file_atomic(const char *path, const void *data, size_t len, dsmoe_err *err) {
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= sizeof tmp)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: path too long", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot write %s: %s", tmp, strerror(e));
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        int e = errno;
        unlink(tmp);
        return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot flush %s: %s", tmp, strerror(e));
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(e));
    }
    return fsync_parent_dir(path, err);
}

dsmoe_status dsmoe_mkdir_p(const char *path, dsmoe_err *err) {
    char buf[4096];
    if (!path || !*path) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "cannot create a directory: the path is empty");
    if (strlen(path) >= sizeof buf) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: path too long", path);
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot create directory %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot create directory %s: %s", buf, strerror(errno));
    struct stat st;
    if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode))
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s exists and is not a directory", buf);
    return DSMOE_OK;
}

void dsmoe_format_hms(double seconds, char *buf, size_t len) {
    long t = (long)(seconds + 0.5);
    if (t >= 3600) snprintf(buf, len, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else snprintf(buf, len, "%ld:%02ld", t / 60, t % 60);
}

double dsmoe_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// The decimal syntax shared by dsmoe_parse_scaled and dsmoe_parse_int_strict: [+-]digits[.digits]
// [(e|E)[+-]digits] then an optional K/M/G/T with an optional 'i'. Fills the pieces; -1 if text is not
// of that form (strtod alone would also take blanks, hex floats, "inf" and "nan").
typedef struct decimal_parts {
    int negative;
    const char *int_digits, *frac_digits; // runs of digits (may be empty, not both)
    size_t n_int, n_frac;
    long exp10;                           // the exponent as written (clamped to +-100000)
    int suffix;                           // 0, or 'K', 'M', 'G', 'T'
    int binary;                           // the suffix has 'i' (powers of 1024)
    size_t number_len;                    // bytes of text before the suffix
} decimal_parts;

static int scan_decimal(const char *text, decimal_parts *d) {
    memset(d, 0, sizeof *d);
    const char *p = text;
    if (*p == '+' || *p == '-') d->negative = *p++ == '-';
    d->int_digits = p;
    while (*p >= '0' && *p <= '9') p++;
    d->n_int = (size_t)(p - d->int_digits);
    if (*p == '.') {
        d->frac_digits = ++p;
        while (*p >= '0' && *p <= '9') p++;
        d->n_frac = (size_t)(p - d->frac_digits);
    }
    if (d->n_int + d->n_frac == 0) return -1;
    if (*p == 'e' || *p == 'E') {
        p++;
        int eneg = 0;
        if (*p == '+' || *p == '-') eneg = *p++ == '-';
        if (!(*p >= '0' && *p <= '9')) return -1;
        long e = 0;
        for (; *p >= '0' && *p <= '9'; p++) e = e < 100000 ? e * 10 + (*p - '0') : e;
        d->exp10 = eneg ? -e : e;
    }
    d->number_len = (size_t)(p - text);
    if (*p) {
        switch (*p) {
        case 'K': case 'k': d->suffix = 'K'; break;
        case 'M': d->suffix = 'M'; break;
        case 'G': d->suffix = 'G'; break;
        case 'T': d->suffix = 'T'; break;
        default: return -1;
        }
        p++;
        if (*p == 'i') d->binary = 1, p++;
        if (*p) return -1;
    }
    return 0;
}

static double suffix_multiplier(const decimal_parts *d) {
    int k = d->suffix == 'K' ? 1 : d->suffix == 'M' ? 2 : d->suffix == 'G' ? 3 : d->suffix == 'T' ? 4 : 0;
    double m = 1.0;
    for (int i = 0; i < k; i++) m *= d->binary ? 1024.0 : 1000.0;
    return m;
}

int dsmoe_parse_scaled(const char *text, double *out) {
    decimal_parts d;
    if (scan_decimal(text, &d) != 0) return -1;
    char num[512];
    if (d.number_len >= sizeof num) return -1;
    memcpy(num, text, d.number_len);
    num[d.number_len] = '\0';
    errno = 0;
    double v = strtod(num, NULL);
    if (errno == ERANGE && v != 0.0 && !isfinite(v)) return -1;
    v *= suffix_multiplier(&d);
    if (!isfinite(v)) return -1;
    *out = v;
    return 0;
}

int dsmoe_parse_int_strict(const char *text, int *negative, uint64_t *magnitude) {
    decimal_parts d;
    if (scan_decimal(text, &d) != 0) return -1;
    // The significant digits as one integer D, and the power of ten e10 that scales it: value =
    // D * 10^e10 * suffix. Leading zeros are dropped and trailing zeros move into e10, so D has at
    // most 20 digits whenever the value can fit 64 bits.
    size_t n = d.n_int + d.n_frac, first = n, last = 0;
#define DIGIT(i) ((i) < d.n_int ? d.int_digits[(i)] : d.frac_digits[(i) - d.n_int])
    for (size_t i = 0; i < n; i++)
        if (DIGIT(i) != '0') {
            if (first == n) first = i;
            last = i;
        }
    *negative = d.negative;
    if (first == n) return *magnitude = 0, 0;
    int k = d.suffix == 'K' ? 1 : d.suffix == 'M' ? 2 : d.suffix == 'G' ? 3 : d.suffix == 'T' ? 4 : 0;
    long e10 = d.exp10 - (long)d.n_frac + (long)(n - 1 - last) + (d.binary ? 0 : 3 * k);
    size_t nd = last - first + 1;
    if (nd > 20) return e10 >= 0 ? -2 : -1; // > UINT64_MAX already, or a fraction (its last digit is not 0)
    unsigned __int128 v = 0;
    for (size_t i = first; i <= last; i++) v = v * 10 + (unsigned)(DIGIT(i) - '0');
#undef DIGIT
    if (d.binary) v <<= 10 * k; // D < 10^20 < 2^67, times at most 2^40: fits 128 bits
    const unsigned __int128 max = UINT64_MAX;
    for (; e10 > 0; e10--)
        if ((v *= 10) > max) return -2;
    for (; e10 < 0; e10++) {
        if (v % 10 != 0) return -1; // not whole (after 39 divisions v is 0 or was not whole)
        v /= 10;
    }
    if (v > max) return -2;
    *magnitude = (uint64_t)v;
    return 0;
}

int dsmoe_parse_duration(const char *text, double *out) {
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (end == text || errno != 0 || !isfinite(v) || v < 0) return -1;
    double mult;
    if (*end == '\0' || strcmp(end, "s") == 0) mult = 1;
    else if (strcmp(end, "min") == 0 || strcmp(end, "m") == 0) mult = 60;
    else if (strcmp(end, "h") == 0) mult = 3600;
    else return -1;
    *out = v * mult;
    return 0;
}

int dsmoe_edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 64 || lb > 64) return 1000;
    int row[65];
    for (size_t j = 0; j <= lb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int prev = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int cur = row[j];
            int sub = prev + (a[i - 1] != b[j - 1]);
            int del = row[j] + 1, ins = row[j - 1] + 1;
            row[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
            prev = cur;
        }
    }
    return row[lb];
}
