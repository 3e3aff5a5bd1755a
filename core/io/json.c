// core/io/json.c: see json.h. A recursive-descent reader over a byte range that never reads past `end`
// (the text needs no terminating NUL), and the string writer. Positions in messages are computed only
// when something fails, so reading keeps no line count.
#define _GNU_SOURCE
#include "json.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void dsmoe_buf_put(dsmoe_buf *b, const void *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (b->len + n + 1 > cap) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p, b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

int dsmoe_utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t c = s[0];
    if (c < 0x80) return *cp = c, 1;
    int len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    if (len == 0 || (size_t)len > n) return 0;
    uint32_t u = c & (0x7Fu >> len);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        u = u << 6 | (s[i] & 0x3Fu);
    }
    // overlong forms, surrogates, beyond U+10FFFF
    if ((len == 3 && u < 0x800) || (len == 4 && (u < 0x10000 || u > 0x10FFFF)) || (u >= 0xD800 && u < 0xE000)) return 0;
    *cp = u;
    return len;
}

// ---------------------------------------------------------------------------------------------------
// Cursor and messages

void dsmoe_json_init(dsmoe_json *j, const char *text, size_t len, const char *name, int line, dsmoe_err *err) {
    *j = (dsmoe_json){.start = text, .p = text, .end = text + len, .name = name, .line = line, .max_depth = 64,
                      .end_name = "the end of the input", .status = DSMOE_OK, .err = err};
}

void dsmoe_json_where(const dsmoe_json *j, const char *at, char *buf, size_t cap) {
    if (j->byte_label) {
        snprintf(buf, cap, "%s: %s at byte %zu", j->name, j->byte_label, (size_t)(at - j->start) + j->byte_base);
        return;
    }
    int line = j->line;
    const char *bol = j->start;
    for (const char *q = j->start; q < at; q++)
        if (*q == '\n') line++, bol = q + 1;
    snprintf(buf, cap, "%s:%d:%zu", j->name, line, (size_t)(at - bol) + 1);
}

static dsmoe_status vfail(dsmoe_json *j, const char *at, dsmoe_status status, const char *fmt, va_list ap) {
    char where[1200], what[800];
    dsmoe_json_where(j, at, where, sizeof where);
    vsnprintf(what, sizeof what, fmt, ap);
    j->status = status;
    return dsmoe_err_set(j->err, status, "%s: %s", where, what);
}

dsmoe_status dsmoe_json_errorf(dsmoe_json *j, const char *at, dsmoe_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(j, at, status, fmt, ap);
    va_end(ap);
    return status;
}

dsmoe_status dsmoe_json_fail(dsmoe_json *j, const char *expected) {
    char found[64];
    if (j->p >= j->end) snprintf(found, sizeof found, "%s", j->end_name);
    else if ((unsigned char)*j->p >= 0x20 && (unsigned char)*j->p < 0x7f) snprintf(found, sizeof found, "'%c'", *j->p);
    else snprintf(found, sizeof found, "byte 0x%02x", (unsigned char)*j->p);
    return dsmoe_json_errorf(j, j->p, DSMOE_ERR_IO, "expected %s, found %s", expected, found);
}

static dsmoe_status oom(dsmoe_json *j) {
    return dsmoe_json_errorf(j, j->p, DSMOE_ERR_NOMEM, "out of memory reading JSON");
}

// ---------------------------------------------------------------------------------------------------
// Structure

void dsmoe_json_ws(dsmoe_json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

int dsmoe_json_peek(dsmoe_json *j) {
    dsmoe_json_ws(j);
    return j->p < j->end ? (unsigned char)*j->p : -1;
}

dsmoe_status dsmoe_json_expect(dsmoe_json *j, char c, const char *what) {
    dsmoe_json_ws(j);
    if (j->p < j->end && *j->p == c) {
        j->p++;
        return DSMOE_OK;
    }
    return dsmoe_json_fail(j, what);
}

int dsmoe_json_begin(dsmoe_json *j, char open, const char *what) {
    if (dsmoe_json_expect(j, open, what) != DSMOE_OK) return -1;
    dsmoe_json_ws(j);
    if (j->p < j->end && *j->p == (open == '[' ? ']' : '}')) return j->p++, 0;
    return 1;
}

int dsmoe_json_next(dsmoe_json *j, char close) {
    dsmoe_json_ws(j);
    if (j->p < j->end && *j->p == ',') return j->p++, 1;
    return dsmoe_json_expect(j, close, close == ']' ? "',' or ']'" : "',' or '}'") == DSMOE_OK ? 0 : -1;
}

dsmoe_status dsmoe_json_end(dsmoe_json *j, const char *what) {
    dsmoe_json_ws(j);
    return j->p == j->end ? DSMOE_OK : dsmoe_json_fail(j, what);
}

// ---------------------------------------------------------------------------------------------------
// Strings

static int hex4(const char *p, const char *end, unsigned *out) {
    *out = 0;
    for (int i = 0; i < 4; i++) {
        char c = p + i < end ? p[i] : 0;
        int v = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (v < 0) return -1;
        *out = *out * 16 + (unsigned)v;
    }
    return 0;
}

static void put_utf8(dsmoe_buf *b, unsigned u) {
    char c[4];
    int n = u < 0x80 ? 1 : u < 0x800 ? 2 : u < 0x10000 ? 3 : 4;
    static const unsigned char lead[5] = {0, 0x00, 0xC0, 0xE0, 0xF0};
    for (int i = n - 1; i > 0; i--, u >>= 6) c[i] = (char)(0x80 | (u & 63));
    c[0] = (char)(lead[n] | u);
    dsmoe_buf_put(b, c, (size_t)n);
}

// One escape sequence at p ('\\') appended to b.
static dsmoe_status escape(dsmoe_json *j, dsmoe_buf *b) {
    const char *esc = j->p + 1 < j->end ? strchr("\"\\/bfnrt", j->p[1]) : NULL;
    if (esc && *esc) {
        dsmoe_buf_put(b, &"\"\\/\b\f\n\r\t"[esc - "\"\\/bfnrt"], 1);
        j->p += 2;
        return DSMOE_OK;
    }
    j->p++;
    unsigned u, lo;
    if (j->p >= j->end || *j->p != 'u') return dsmoe_json_fail(j, "an escape (\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)");
    if (hex4(j->p + 1, j->end, &u) != 0 || (u == 0 && (j->flags & DSMOE_JSON_NO_NUL)))
        return dsmoe_json_fail(j, j->flags & DSMOE_JSON_NO_NUL ? "u and four hex digits (not 0000)" : "u and four hex digits");
    j->p += 5;
    if (u >= 0xDC00 && u < 0xE000) return dsmoe_json_fail(j, "no lone low surrogate");
    if (u >= 0xD800 && u < 0xDC00) { // a surrogate pair encodes one code point above U+FFFF
        if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u' || hex4(j->p + 2, j->end, &lo) != 0 || lo < 0xDC00 ||
            lo > 0xDFFF)
            return dsmoe_json_fail(j, "the low half of a \\u surrogate pair");
        j->p += 6;
        u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
    }
    put_utf8(b, u);
    return DSMOE_OK;
}

dsmoe_status dsmoe_json_string(dsmoe_json *j, dsmoe_buf *out) {
    DSMOE_TRY(dsmoe_json_expect(j, '"', "a string"));
    out->len = 0;
    dsmoe_buf_put(out, "", 0);
    while (j->p < j->end && *j->p != '"') {
        const char *run = j->p; // plain bytes are copied a run at a time
        while (j->p < j->end && *j->p != '"' && *j->p != '\\' && (unsigned char)*j->p >= 0x20) {
            uint32_t cp;
            int n = (unsigned char)*j->p < 0x80 || !(j->flags & DSMOE_JSON_UTF8)
                        ? 1 : dsmoe_utf8_next((const uint8_t *)j->p, (size_t)(j->end - j->p), &cp);
            if (n == 0) {
                dsmoe_buf_put(out, run, (size_t)(j->p - run));
                return dsmoe_json_fail(j, "valid UTF-8 in a string");
            }
            j->p += n;
        }
        dsmoe_buf_put(out, run, (size_t)(j->p - run));
        if (j->p >= j->end || *j->p == '"') break;
        if ((unsigned char)*j->p < 0x20) return dsmoe_json_fail(j, "a string character (control characters must be escaped)");
        DSMOE_TRY(escape(j, out));
    }
    if (j->p >= j->end) return dsmoe_json_fail(j, "the closing quote of a string");
    if (out->oom) return oom(j);
    j->p++;
    return DSMOE_OK;
}

dsmoe_status dsmoe_json_key(dsmoe_json *j, dsmoe_buf *key) {
    DSMOE_TRY(dsmoe_json_string(j, key));
    return dsmoe_json_expect(j, ':', "':'");
}

dsmoe_status dsmoe_json_string_dup(dsmoe_json *j, char **out) {
    dsmoe_buf b = {0};
    dsmoe_status s = dsmoe_json_string(j, &b);
    if (s != DSMOE_OK || !out) free(b.p);
    else *out = b.p;
    return s;
}

// ---------------------------------------------------------------------------------------------------
// Numbers and literals

static const char *digits(const dsmoe_json *j, const char *q) {
    while (q < j->end && *q >= '0' && *q <= '9') q++;
    return q;
}

// The end of the number at p, -?(0|[1-9]digits)(.digits)?([eE][+-]?digits)?; NULL with *bad at the
// offending byte and *why what was expected there when there is none.
static const char *number_end(const dsmoe_json *j, const char **bad, const char **why) {
    const char *q = j->p + (j->p < j->end && *j->p == '-'), *d = digits(j, q);
    *why = "a digit";
    if (d == q) return *bad = d, NULL;
    if (*q == '0' && d - q > 1) return *bad = q, *why = "a number without leading zeros", NULL;
    if (d < j->end && *d == '.') {
        q = d + 1, d = digits(j, q);
        if (d == q) return *bad = d, NULL;
    }
    if (d < j->end && (*d | 0x20) == 'e') {
        q = d + 1 + (d + 1 < j->end && (d[1] == '+' || d[1] == '-'));
        d = digits(j, q);
        if (d == q) return *bad = d, NULL;
    }
    return d;
}

// -?digits into (*neg, *mag), below 2^63 (2^64 with wide) in magnitude; p is left after the number and
// *start at it.
static dsmoe_status integer(dsmoe_json *j, int allow_neg, int wide, unsigned flags, int *neg, uint64_t *mag,
                            const char **start) {
    dsmoe_json_ws(j);
    *start = j->p;
    const char *what = allow_neg ? "an integer" : "a non-negative integer";
    const char *big = wide ? "an integer below 2^64" : "an integer below 2^63";
    uint64_t limit = wide ? UINT64_MAX : (uint64_t)INT64_MAX;
    if (flags & DSMOE_JSON_WHOLE) { // exact, through the deck's integer syntax (a superset of JSON's)
        const char *bad, *why, *e = number_end(j, &bad, &why);
        char text[400];
        if (!e) return j->p = bad, dsmoe_json_fail(j, why);
        if ((size_t)(e - j->p) >= sizeof text) return dsmoe_json_fail(j, "a number of fewer than 400 characters");
        memcpy(text, j->p, (size_t)(e - j->p));
        text[e - j->p] = '\0';
        int rc = dsmoe_parse_int_strict(text, neg, mag);
        if (rc == -1) return dsmoe_json_fail(j, "a whole number");
        if (*neg && *mag != 0 && !allow_neg) return dsmoe_json_fail(j, what);
        if (rc == -2 || *mag > limit + (uint64_t)*neg) return dsmoe_json_fail(j, big);
        *neg = *neg && *mag != 0;
        j->p = e;
        return DSMOE_OK;
    }
    *neg = j->p < j->end && *j->p == '-' && allow_neg;
    j->p += *neg;
    const char *first = j->p;
    uint64_t v = 0;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        uint64_t d = (uint64_t)(*j->p - '0');
        if (v > (limit + (uint64_t)*neg - d) / 10) return dsmoe_json_fail(j, big);
        v = v * 10 + d;
        j->p++;
    }
    if (j->p == first || (j->p - first > 1 && *first == '0')) {
        j->p = *start;
        return dsmoe_json_fail(j, what);
    }
    if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E')) return dsmoe_json_fail(j, "an integer");
    *mag = v;
    return DSMOE_OK;
}

dsmoe_status dsmoe_json_int(dsmoe_json *j, int64_t min, int64_t max, unsigned flags, int64_t *out) {
    int neg;
    uint64_t mag;
    const char *start;
    DSMOE_TRY(integer(j, min < 0, 0, flags, &neg, &mag, &start));
    int64_t v = neg ? (int64_t)(0 - mag) : (int64_t)mag; // mag <= 2^63 when neg: wraps to INT64_MIN exactly
    if (v < min || v > max)
        return dsmoe_json_errorf(j, start, DSMOE_ERR_IO, "expected an integer in [%" PRId64 ", %" PRId64 "], found %" PRId64,
                                 min, max, v);
    *out = v;
    return DSMOE_OK;
}

dsmoe_status dsmoe_json_u64(dsmoe_json *j, uint64_t max, unsigned flags, uint64_t *out) {
    int neg;
    uint64_t mag;
    const char *start;
    DSMOE_TRY(integer(j, 0, 1, flags, &neg, &mag, &start));
    if (mag > max)
        return dsmoe_json_errorf(j, start, DSMOE_ERR_IO, "expected an integer in [0, %" PRIu64 "], found %" PRIu64, max, mag);
    *out = mag;
    return DSMOE_OK;
}

dsmoe_status dsmoe_json_number(dsmoe_json *j, double *out) {
    dsmoe_json_ws(j);
    const char *bad, *why, *e = number_end(j, &bad, &why);
    if (!e) {
        if (bad == j->p + (j->p < j->end && *j->p == '-')) return dsmoe_json_fail(j, "a number");
        j->p = bad;
        return dsmoe_json_fail(j, why);
    }
    char text[400];
    if ((size_t)(e - j->p) >= sizeof text) return dsmoe_json_fail(j, "a number of fewer than 400 characters");
    memcpy(text, j->p, (size_t)(e - j->p));
    text[e - j->p] = '\0';
    double v = strtod(text, NULL); // JSON's syntax is a subset of strtod's in the C locale
    if (!isfinite(v)) return dsmoe_json_fail(j, "a finite number");
    j->p = e;
    *out = v;
    return DSMOE_OK;
}

static int literal(dsmoe_json *j, const char *word) {
    size_t n = strlen(word);
    dsmoe_json_ws(j);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0) return 0;
    j->p += n;
    return 1;
}

dsmoe_status dsmoe_json_bool(dsmoe_json *j, int *out) {
    if (literal(j, "true")) return *out = 1, DSMOE_OK;
    if (literal(j, "false")) return *out = 0, DSMOE_OK;
    return dsmoe_json_fail(j, "true or false");
}

int dsmoe_json_null(dsmoe_json *j) { return literal(j, "null"); }

static dsmoe_status skip(dsmoe_json *j, int depth, dsmoe_buf *scratch) {
    dsmoe_json_ws(j);
    if (depth > j->max_depth) {
        char what[64];
        snprintf(what, sizeof what, "at most %d levels of nesting", j->max_depth);
        return dsmoe_json_fail(j, what);
    }
    char c = j->p < j->end ? *j->p : 0;
    if (c == '"') return dsmoe_json_string(j, scratch);
    if (c == '[' || c == '{') {
        int more;
        for (more = dsmoe_json_begin(j, c, "'['"); more > 0; more = dsmoe_json_next(j, c == '[' ? ']' : '}')) {
            if (c == '{') DSMOE_TRY(dsmoe_json_key(j, scratch));
            DSMOE_TRY(skip(j, depth + 1, scratch));
        }
        return more < 0 ? j->status : DSMOE_OK;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        const char *bad, *why, *e = number_end(j, &bad, &why);
        j->p = e ? e : bad;
        return e ? DSMOE_OK : dsmoe_json_fail(j, why);
    }
    if (!(j->flags & DSMOE_JSON_NO_LITERALS) && (literal(j, "true") || literal(j, "false") || literal(j, "null")))
        return DSMOE_OK;
    return dsmoe_json_fail(j, j->flags & DSMOE_JSON_NO_LITERALS ? "a string, number, array or object" : "a JSON value");
}

dsmoe_status dsmoe_json_skip(dsmoe_json *j) {
    dsmoe_buf scratch = {0};
    dsmoe_status s = skip(j, 1, &scratch);
    free(scratch.p);
    return s;
}

// ---------------------------------------------------------------------------------------------------
// Writing

void dsmoe_json_write_string(dsmoe_buf *b, const void *data, size_t n) {
    const uint8_t *s = data;
    dsmoe_buf_put(b, "\"", 1);
    size_t run = 0; // bytes from `run` on are copied as they are when the run ends
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        uint32_t cp;
        int len = c >= 0x20 && c != '"' && c != '\\' ? dsmoe_utf8_next(s + i, n - i, &cp) : 0;
        if (len > 0) {
            i += (size_t)len;
            continue;
        }
        dsmoe_buf_put(b, s + run, i - run);
        char esc[8];
        if (c == '"') dsmoe_buf_put(b, "\\\"", 2);
        else if (c == '\\') dsmoe_buf_put(b, "\\\\", 2);
        else if (c == '\n') dsmoe_buf_put(b, "\\n", 2);
        else if (c == '\r') dsmoe_buf_put(b, "\\r", 2);
        else if (c == '\t') dsmoe_buf_put(b, "\\t", 2);
        else if (c < 0x20) dsmoe_buf_put(b, esc, (size_t)snprintf(esc, sizeof esc, "\\u%04x", c));
        else dsmoe_buf_put(b, "\\ufffd", 6);
        run = ++i;
    }
    if (n > run) dsmoe_buf_put(b, s + run, n - run); // (data may be NULL when n is 0)
    dsmoe_buf_put(b, "\"", 1);
}

// ---------------------------------------------------------------------------------------------------
// Files

dsmoe_status dsmoe_read_regular_file(const char *path, const char *what, size_t max_bytes, char **data,
                                     size_t *len, dsmoe_err *err) {
    *data = NULL;
    *len = 0;
    // O_NONBLOCK: opening a FIFO that no one writes would otherwise wait forever before fstat refuses it.
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot open %s '%s': %s", what, path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot read %s '%s': %s", what, path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot read %s '%s': it is %s, not a regular file", what, path,
                             S_ISDIR(sb.st_mode) ? "a directory" : S_ISFIFO(sb.st_mode) ? "a FIFO (named pipe)" :
                             S_ISSOCK(sb.st_mode) ? "a socket" : "a device");
    }
    if ((uint64_t)sb.st_size > max_bytes) {
        close(fd);
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s '%s' has %lld bytes, more than the %zu this reader takes", what,
                             path, (long long)sb.st_size, max_bytes);
    }
    size_t cap = (size_t)sb.st_size, n = 0;
    char *buf = malloc(cap + 1);
    if (!buf) {
        close(fd);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory reading %s '%s' (%zu bytes)", what, path, cap);
    }
    while (n < cap) { // a file that shrinks meanwhile ends early; one that grows is read to its size at fstat
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            free(buf);
            return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot read %s '%s': %s", what, path, strerror(e));
        }
        if (r == 0) break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = '\0';
    *data = buf;
    *len = n;
    return DSMOE_OK;
}
