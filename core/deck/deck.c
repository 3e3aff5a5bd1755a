// core/deck/deck.c: the deck reader: physical lines -> entries ("[section]" or "key = value").
// defines: dsmoe_deck_read_file, dsmoe_deck_parse, dsmoe_deck_parse_int, dsmoe_deck_parse_u64,
//          dsmoe_deck_parse_float, dsmoe_deck_parse_bool, dsmoe_deck_parse_experts,
//          dsmoe_deck_format_float, dsmoe_deck_format_double, dsmoe_deck_format_string
//
// The syntax (docs/deck.md):
//   - '#' outside double quotes starts a comment that runs to the end of the physical line;
//   - a physical line whose last character (after the comment is dropped) is '\' continues on the
//     next: the backslash and the next line's leading blanks are removed, and the entry keeps the
//     line number of its first physical line;
//   - lines end in LF, CRLF or a lone CR; a leading UTF-8 byte-order mark is skipped; the text must be
//     UTF-8 (and, read from a file, hold no NUL byte): anything else is an error naming the line;
//   - "[name]" opens a section; "key = value" splits at the first '=', both sides trimmed;
//   - in a value, ${VAR} is the environment variable VAR (unset = error), ${VAR:-text} is VAR, or
//     text when VAR is unset or empty; double quotes group text (they are removed) and inside them
//     \" \\ \$ stand for " \ $. Keys and section names are never substituted.
// A quote must close on the physical line it opens; comments are dropped before substitution, so a
// '#' inside a variable's value is data.
#define _GNU_SOURCE
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

extern char **environ;

// A growable byte string (always NUL-terminated once anything was put in it).
typedef struct strbuf {
    char *p;
    size_t len, cap;
} strbuf;

static int sb_put(strbuf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static const char *env_lookup(char *const *envp, const char *name, size_t n) {
    for (char *const *e = envp; e && *e; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=') return *e + n + 1;
    return NULL;
}

// Cuts s at the first '#' outside double quotes; -1 if a quote is left open.
static int strip_comment(char *s) {
    int in_q = 0;
    for (char *p = s; *p; p++) {
        if (in_q && *p == '\\' && p[1]) {
            p++;
        } else if (*p == '"') {
            in_q = !in_q;
        } else if (*p == '#' && !in_q) {
            *p = '\0';
            break;
        }
    }
    return in_q ? -1 : 0;
}

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r')) s[--n] = '\0';
    return s;
}

#define DECK_ERR(st, ...) dsmoe_err_set(err, st, __VA_ARGS__)

// The offset of the first byte of s[0..n) that does not belong to well-formed UTF-8 (no overlong
// forms, surrogates or code points above U+10FFFF), or n when all of it is.
static size_t utf8_invalid_at(const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
        if (len == 0 || i + len > n) return i;
        unsigned lo = 0x80, hi = 0xbf; // the allowed range of the second byte
        if (c == 0xe0) lo = 0xa0;      // overlong 3-byte
        if (c == 0xed) hi = 0x9f;      // surrogates
        if (c == 0xf0) lo = 0x90;      // overlong 4-byte
        if (c == 0xf4) hi = 0x8f;      // above U+10FFFF
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t j = 2; j < len; j++)
            if (s[i + j] < 0x80 || s[i + j] > 0xbf) return i;
        i += len;
    }
    return n;
}

// ---------------------------------------------------------------------------------------------------
// Reading a deck file

#define DECK_MAX_BYTES ((size_t)64 << 20) // far above any deck; stops a wrong file or endless pipe early
#define DECK_PIPE_IDLE_MS 30000           // a pipe that gives nothing for this long is refused

// Refuses NUL bytes and invalid UTF-8, naming the line (LF, CRLF and CR end lines, as in the parser).
static dsmoe_status check_text(const char *name, const char *t, size_t len, dsmoe_err *err) {
    int line = 1;
    for (size_t i = 0; i < len;) {
        size_t n = 0;
        while (i + n < len && t[i + n] != '\n' && t[i + n] != '\r') n++;
        const char *nul = memchr(t + i, '\0', n);
        size_t bad = utf8_invalid_at(t + i, nul ? (size_t)(nul - (t + i)) : n);
        if (nul && bad == (size_t)(nul - (t + i)))
            return DECK_ERR(DSMOE_ERR_INVALID, "%s:%d: NUL byte at column %zu: a deck is text (is this the right file?)",
                            name, line, bad + 1);
        if (bad < n)
            return DECK_ERR(DSMOE_ERR_INVALID, "%s:%d: invalid UTF-8 (byte 0x%02x at column %zu): the deck must be UTF-8 text",
                            name, line, (unsigned char)t[i + bad], bad + 1);
        i += n;
        if (i < len) i += t[i] == '\r' && i + 1 < len && t[i + 1] == '\n' ? 2 : 1;
        line++;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_deck_read_file(const char *path, char **text, size_t *len, dsmoe_err *err) {
    *text = NULL;
    *len = 0;
    int is_stdin = strcmp(path, "-") == 0;
    const char *name = is_stdin ? "<stdin>" : path;
    // O_NONBLOCK: opening a FIFO that no one writes would otherwise wait forever.
    int fd = is_stdin ? STDIN_FILENO : open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) return DECK_ERR(DSMOE_ERR_IO, "cannot open deck '%s': %s", name, strerror(errno));
    struct stat sb;
    dsmoe_status st = DSMOE_OK;
    int pipe_like = 0, flags = fcntl(fd, F_GETFL);
    if (fstat(fd, &sb) != 0 || flags < 0) {
        st = DECK_ERR(DSMOE_ERR_IO, "cannot read deck '%s': %s", name, strerror(errno));
    } else if (S_ISDIR(sb.st_mode)) {
        st = DECK_ERR(DSMOE_ERR_IO, "cannot read deck '%s': it is a directory", name);
    } else if (S_ISFIFO(sb.st_mode) || S_ISSOCK(sb.st_mode)) {
        pipe_like = 1;
    } else if (!S_ISREG(sb.st_mode)) {
        // a terminal would wait for typing, /dev/zero and /dev/urandom never end
        st = DECK_ERR(DSMOE_ERR_IO, "cannot read deck '%s': not a regular file or a pipe (a device: a terminal, "
                      "/dev/zero or /dev/urandom is not a deck)", name);
    }
    strbuf b = {0};
    char buf[65536];
    while (st == DSMOE_OK) {
        // A blocking pipe (stdin) is polled before each read, a non-blocking one (a FIFO we opened)
        // after EAGAIN: its first read then tells "no writer" (0) from "writer, no data yet" (EAGAIN).
        if (pipe_like && !(flags & O_NONBLOCK)) {
            struct pollfd pf = {.fd = fd, .events = POLLIN};
            int pr = poll(&pf, 1, DECK_PIPE_IDLE_MS);
            if (pr < 0 && errno == EINTR) continue;
            if (pr == 0) st = DECK_ERR(DSMOE_ERR_IO, "cannot read deck '%s': no data for %d s from the pipe", name,
                                       DECK_PIPE_IDLE_MS / 1000);
            if (pr <= 0) break;
        }
        ssize_t r = read(fd, buf, sizeof buf);
        if (r > 0) {
            if (b.len + (size_t)r > DECK_MAX_BYTES) {
                st = DECK_ERR(DSMOE_ERR_INVALID, "deck '%s' is larger than %zu MiB: is it a deck?", name, DECK_MAX_BYTES >> 20);
            } else if (sb_put(&b, buf, (size_t)r)) {
                st = DECK_ERR(DSMOE_ERR_NOMEM, "out of memory reading deck '%s'", name);
            }
            continue;
        }
        if (r == 0) {
            if (pipe_like && b.len == 0)
                st = DECK_ERR(DSMOE_ERR_IO, "cannot read deck '%s': the pipe gave no data (a FIFO with no writer, or "
                              "an empty pipe)", name);
            break;
        }
        if (errno == EINTR) continue;
        if (pipe_like && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pf = {.fd = fd, .events = POLLIN};
            int pr = poll(&pf, 1, DECK_PIPE_IDLE_MS);
            if (pr == 0) st = DECK_ERR(DSMOE_ERR_IO, "cannot read deck '%s': no data for %d s from the pipe", name,
                                       DECK_PIPE_IDLE_MS / 1000);
            if (pr < 0 && errno != EINTR) st = DECK_ERR(DSMOE_ERR_IO, "cannot read deck '%s': %s", name, strerror(errno));
            continue;
        }
        st = DECK_ERR(DSMOE_ERR_IO, "cannot read deck '%s': %s", name, strerror(errno));
    }
    if (!is_stdin) close(fd);
    if (st == DSMOE_OK && sb_put(&b, "", 0)) st = DECK_ERR(DSMOE_ERR_NOMEM, "out of memory reading deck '%s'", name);
    if (st == DSMOE_OK) st = check_text(name, b.p, b.len, err);
    if (st != DSMOE_OK) {
        free(b.p);
        return st;
    }
    *text = b.p;
    *len = b.len;
    return DSMOE_OK;
}

// Substitutes ${...}, removes quotes and resolves escapes of one (trimmed) value into out.
static dsmoe_status expand_value(const char *deck, int line, const char *v, char *const *envp, strbuf *out,
                                 dsmoe_err *err) {
    int in_q = 0;
    out->len = 0;
    if (sb_put(out, "", 0)) return DECK_ERR(DSMOE_ERR_NOMEM, "%s:%d: out of memory", deck, line);
    for (const char *p = v; *p; p++) {
        int rc = 0;
        if (*p == '"') {
            in_q = !in_q;
        } else if (in_q && *p == '\\' && (p[1] == '"' || p[1] == '\\' || p[1] == '$')) {
            rc = sb_put(out, ++p, 1);
        } else if (*p == '$' && p[1] == '{') {
            const char *name = p + 2, *q = name;
            while (isalnum((unsigned char)*q) || *q == '_') q++;
            size_t n = (size_t)(q - name);
            const char *def = NULL, *close = q;
            if (*q == ':' && q[1] == '-') {
                def = q + 2;
                close = strchr(def, '}');
            }
            if (n == 0 || isdigit((unsigned char)*name) || !close || *close != '}') {
                const char *end = strchr(p, '}');
                int shown = end ? (int)(end - p + 1) : (int)strlen(p);
                return DECK_ERR(DSMOE_ERR_INVALID,
                                "%s:%d: bad variable reference '%.*s' (write ${NAME} or ${NAME:-default})",
                                deck, line, shown, p);
            }
            const char *val = env_lookup(envp, name, n);
            if (def && (!val || !*val)) {
                rc = sb_put(out, def, (size_t)(close - def));
            } else if (!val) {
                return DECK_ERR(DSMOE_ERR_INVALID,
                                "%s:%d: environment variable '%.*s' is not set (write ${%.*s:-default} to give a default)",
                                deck, line, (int)n, name, (int)n, name);
            } else {
                rc = sb_put(out, val, strlen(val));
            }
            p = close;
        } else {
            rc = sb_put(out, p, 1);
        }
        if (rc) return DECK_ERR(DSMOE_ERR_NOMEM, "%s:%d: out of memory", deck, line);
    }
    if (in_q) return DECK_ERR(DSMOE_ERR_INVALID, "%s:%d: unterminated quoted string", deck, line);
    return DSMOE_OK;
}

// dots: 0 = letters, digits, '_'; 1 = also '.'; 2 = also '.' and '-' (section names such as
// [kernel.NAME], whose NAME is a plugin name).
static int is_name(const char *s, int dots) {
    if (!isalpha((unsigned char)*s) && *s != '_') return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_' && !(dots && *s == '.') && !(dots == 2 && *s == '-')) return 0;
    return 1;
}

// Hands one logical line (comments and continuations already removed) to fn.
static dsmoe_status parse_entry(char *text, const char *deck, int line, char *const *envp, char *section,
                                size_t section_size, strbuf *value, dsmoe_deck_entry_fn fn, void *user,
                                dsmoe_err *err) {
    char *s = trim(text);
    if (*s == '\0') return DSMOE_OK;
    if (*s == '[') {
        char *close = strchr(s, ']');
        if (!close || trim(close + 1)[0] != '\0')
            return DECK_ERR(DSMOE_ERR_INVALID, "%s:%d: expected '[section]', got '%s'", deck, line, s);
        *close = '\0';
        char *name = trim(s + 1);
        if (!is_name(name, 2) || strlen(name) >= section_size)
            return DECK_ERR(DSMOE_ERR_INVALID, "%s:%d: bad section name '[%s]'", deck, line, name);
        strcpy(section, name);
        return fn(user, section, NULL, NULL, line, err);
    }
    char *eq = strchr(s, '=');
    if (!eq)
        return DECK_ERR(DSMOE_ERR_INVALID, "%s:%d: expected 'key = value' or '[section]', got '%s'", deck, line, s);
    *eq = '\0';
    char *key = trim(s);
    if (!is_name(key, 1))
        return DECK_ERR(DSMOE_ERR_INVALID, "%s:%d: bad key name '%s' (letters, digits, '_' and '.')", deck, line, key);
    DSMOE_TRY(expand_value(deck, line, trim(eq + 1), envp, value, err));
    return fn(user, section, key, value->p, line, err);
}

dsmoe_status dsmoe_deck_parse(const char *text, const char *deck_name, char *const *envp,
                              dsmoe_deck_entry_fn fn, void *user, dsmoe_err *err) {
    const char *deck = deck_name ? deck_name : "deck";
    if (!envp) envp = environ;
    if (!text) text = "";
    if (strncmp(text, "\xef\xbb\xbf", 3) == 0) text += 3; // a UTF-8 byte-order mark, as some editors write
    char section[64] = "";
    strbuf phys = {0}, logical = {0}, value = {0};
    dsmoe_status st = DSMOE_OK;
    int lineno = 0, first = 0, continuing = 0;
    for (const char *p = text; *p && st == DSMOE_OK;) {
        size_t n = strcspn(p, "\r\n"); // a line ends at LF, CRLF or a lone CR (old Mac editors)
        lineno++;
        size_t bad = utf8_invalid_at(p, n);
        if (bad < n) {
            st = DECK_ERR(DSMOE_ERR_INVALID, "%s:%d: invalid UTF-8 (byte 0x%02x at column %zu): the deck must be UTF-8 text",
                          deck, lineno, (unsigned char)p[bad], bad + 1);
            break;
        }
        phys.len = 0;
        if (sb_put(&phys, p, n)) {
            st = DECK_ERR(DSMOE_ERR_NOMEM, "%s:%d: out of memory", deck, lineno);
            break;
        }
        p += n;
        if (p[0] == '\r' && p[1] == '\n') p += 2;
        else if (*p) p++;
        if (strip_comment(phys.p) != 0) {
            st = DECK_ERR(DSMOE_ERR_INVALID, "%s:%d: unterminated quoted string", deck, lineno);
            break;
        }
        char *s = phys.p;
        if (continuing) {
            while (*s == ' ' || *s == '\t') s++;
        } else {
            first = lineno;
            logical.len = 0;
        }
        size_t len = strlen(s);
        while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t' || s[len - 1] == '\r')) s[--len] = '\0';
        continuing = len > 0 && s[len - 1] == '\\';
        if (continuing) s[--len] = '\0';
        if (sb_put(&logical, s, len)) {
            st = DECK_ERR(DSMOE_ERR_NOMEM, "%s:%d: out of memory", deck, lineno);
            break;
        }
        if (!continuing || !*p)
            st = parse_entry(logical.p, deck, first, envp, section, sizeof section, &value, fn, user, err);
    }
    free(phys.p);
    free(logical.p);
    free(value.p);
    return st;
}

// ---------------------------------------------------------------------------------------------------
// Value syntax

int dsmoe_deck_parse_int(const char *s, int64_t *out) {
    int neg;
    uint64_t mag;
    int rc = dsmoe_parse_int_strict(s, &neg, &mag);
    if (rc != 0) return rc;
    if (neg ? mag > (uint64_t)INT64_MAX + 1 : mag > (uint64_t)INT64_MAX) return -2;
    *out = neg ? (int64_t)(0 - mag) : (int64_t)mag; // 0 - mag: the two's complement of 2^63 too
    return 0;
}

int dsmoe_deck_parse_u64(const char *s, uint64_t *out) {
    int neg;
    uint64_t mag;
    int rc = dsmoe_parse_int_strict(s, &neg, &mag);
    if (rc != 0) return rc;
    if (neg && mag != 0) return -1;
    *out = mag;
    return 0;
}

int dsmoe_deck_parse_float(const char *s, float *out) {
    double d;
    if (dsmoe_parse_scaled(s, &d) != 0) return -1;
    size_t n = strspn(s, "+-.0123456789eE");
    float f;
    if (s[n] == '\0') {
        // no suffix: strtof itself, so that the printer's shortest digits read back to the same float
        // (through a double, a decimal can round twice and land one float away)
        errno = 0;
        f = strtof(s, NULL);
        if (errno == ERANGE && (f == 0.0f || !isfinite(f))) return -2; // beyond float range, or all of it lost
    } else {
        f = (float)d;
        if (d != 0.0 && f == 0.0f) return -2;
    }
    if (!isfinite(f)) return -2;
    *out = f;
    return 0;
}

// One count of a moe.experts / moe.expert_parallel item: an integer as dsmoe_deck_parse_int reads
// it, from p up to a blank, ',' or 'x'. Returns 0, -1 (syntax) or -2 (beyond 32 bits).
static int experts_number(const char **pp, long *out) {
    const char *p = *pp;
    size_t n = strcspn(p, " \t\r\n,xX");
    char tok[64];
    if (n == 0 || n >= sizeof tok) return n == 0 ? -1 : -2;
    memcpy(tok, p, n);
    tok[n] = '\0';
    int64_t v;
    int rc = dsmoe_deck_parse_int(tok, &v);
    if (rc != 0) return rc;
    if (v > INT_MAX) return -2;
    *out = v < -1 ? -1 : (long)v; // any negative count is refused as < 1, however large
    *pp = p + n;
    return 0;
}

int dsmoe_deck_parse_experts(const char *s, dsmoe_experts_list *ex, const char **why) {
    const char *syntax = "expected a count (e.g. 8) or a list of 'count xN' items (e.g. 32 x10, 64 x2)";
    const char *big = "a count does not fit in a 32-bit integer";
    memset(ex, 0, sizeof *ex);
    int total = 0, bare = 0;
    for (const char *p = s;;) {
        while (isspace((unsigned char)*p)) p++;
        long c, reps = 1;
        int rc = experts_number(&p, &c);
        if (rc != 0) return *why = rc == -2 ? big : syntax, -1;
        while (isspace((unsigned char)*p)) p++;
        if (*p == 'x' || *p == 'X') {
            p++;
            while (isspace((unsigned char)*p)) p++;
            rc = experts_number(&p, &reps);
            if (rc != 0) return *why = rc == -2 ? "the list covers more than DSMOE_MAX_MOE_LAYERS (256) MoE layers" : syntax, -1;
            while (isspace((unsigned char)*p)) p++;
        } else {
            bare++;
        }
        if (*p != ',' && *p != '\0') return *why = syntax, -1;
        if (reps < 1) return *why = "a repeat count xN must have N >= 1", -1;
        if (ex->n == DSMOE_MAX_MOE_LAYERS || reps > DSMOE_MAX_MOE_LAYERS || (total += (int)reps) > DSMOE_MAX_MOE_LAYERS)
            return *why = "the list covers more than DSMOE_MAX_MOE_LAYERS (256) MoE layers", -1;
        ex->count[ex->n] = (int)c;
        ex->reps[ex->n++] = (int)reps;
        if (*p == '\0') break;
        p++;
    }
    ex->all = ex->n == 1 && bare == 1;
    for (int i = 0; i < ex->n; i++)
        if (ex->count[i] < 1 && !(ex->all && ex->count[i] == 0))
            return *why = "an expert count must be >= 1 (0 = dense model only as the whole value)", -1;
    return 0;
}

void dsmoe_deck_format_float(float f, char *buf, size_t n) {
    for (int p = 1; p <= 9; p++) {
        snprintf(buf, n, "%.*g", p, (double)f);
        if (strtof(buf, NULL) == f) return;
    }
}

void dsmoe_deck_format_double(double v, char *buf, size_t n) {
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(buf, n, "%.0f", v);
        return;
    }
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, n, "%.*g", p, v);
        if (strtod(buf, NULL) == v) return;
    }
}

void dsmoe_deck_format_string(const char *s, char *buf, size_t n) {
    size_t len = strlen(s);
    int quote = len == 0 || s[0] == ' ' || s[0] == '\t' || s[len - 1] == ' ' || s[len - 1] == '\t' ||
                strpbrk(s, "#\"\\$") != NULL;
    if (!quote) {
        snprintf(buf, n, "%s", s);
        return;
    }
    size_t j = 0;
    buf[j++] = '"';
    for (const char *p = s; *p && j + 3 < n; p++) {
        if (*p == '"' || *p == '\\' || *p == '$') buf[j++] = '\\';
        buf[j++] = *p;
    }
    buf[j++] = '"';
    buf[j] = '\0';
}

int dsmoe_deck_parse_bool(const char *s, int *out) {
    static const char *const t[] = {"true", "yes", "on", "1"}, *const f[] = {"false", "no", "off", "0"};
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, t[i]) == 0) return *out = 1, 0;
        if (strcasecmp(s, f[i]) == 0) return *out = 0, 0;
    }
    return -1;
}
