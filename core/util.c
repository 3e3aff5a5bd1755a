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

double dsmoe_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int dsmoe_parse_scaled(const char *text, double *out) {
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (end == text || errno != 0 || !isfinite(v)) return -1;
    double mult = 1.0;
    if (*end) {
        switch (*end) {
        case 'K': case 'k': mult = 1e3; break;
        case 'M': mult = 1e6; break;
        case 'G': mult = 1e9; break;
        case 'T': mult = 1e12; break;
        default: return -1;
        }
        end++;
        if (*end == 'i') {
            mult = mult == 1e3 ? 1024.0 : mult == 1e6 ? 1048576.0 : mult == 1e9 ? 1073741824.0 : 1099511627776.0;
            end++;
        }
        if (*end) return -1;
    }
    *out = v * mult;
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
