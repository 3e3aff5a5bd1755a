// core/deck.c: the deck reader: physical lines -> entries ("[section]" or "key = value").
// defines: dsmoe_deck_parse, dsmoe_deck_parse_int, dsmoe_deck_parse_bool, dsmoe_deck_parse_experts,
//          dsmoe_deck_format_float, dsmoe_deck_format_string
//
// The syntax (docs/deck.md):
//   - '#' outside double quotes starts a comment that runs to the end of the physical line;
//   - a physical line whose last character (after the comment is dropped) is '\' continues on the
//     next: the backslash and the next line's leading blanks are removed, and the entry keeps the
//     line number of its first physical line;
//   - lines may end in CRLF; a leading UTF-8 byte-order mark is skipped;
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
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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
        const char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p) : strlen(p);
        lineno++;
        phys.len = 0;
        if (sb_put(&phys, p, n)) {
            st = DECK_ERR(DSMOE_ERR_NOMEM, "%s:%d: out of memory", deck, lineno);
            break;
        }
        p += n + (nl ? 1 : 0);
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
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end != s && *end == '\0' && errno == 0) {
        *out = v;
        return 0;
    }
    double d;
    if (dsmoe_parse_scaled(s, &d) != 0 || d != floor(d) || fabs(d) >= 9.2e18) return -1;
    *out = (int64_t)d;
    return 0;
}

int dsmoe_deck_parse_experts(const char *s, dsmoe_experts_list *ex, const char **why) {
    const char *syntax = "expected a count (e.g. 8) or a list of 'count xN' items (e.g. 32 x10, 64 x2)";
    memset(ex, 0, sizeof *ex);
    int total = 0, bare = 0;
    for (const char *p = s;;) {
        char *end;
        while (isspace((unsigned char)*p)) p++;
        if (!isdigit((unsigned char)*p) && *p != '-') return *why = syntax, -1;
        long c = strtol(p, &end, 10), reps = 1;
        p = end;
        while (isspace((unsigned char)*p)) p++;
        if (*p == 'x' || *p == 'X') {
            p++;
            while (isspace((unsigned char)*p)) p++;
            if (!isdigit((unsigned char)*p)) return *why = syntax, -1;
            reps = strtol(p, &end, 10);
            p = end;
            while (isspace((unsigned char)*p)) p++;
        } else {
            bare++;
        }
        if (*p != ',' && *p != '\0') return *why = syntax, -1;
        if (reps < 1) return *why = "a repeat count xN must have N >= 1", -1;
        if (ex->n == DSMOE_MAX_MOE_LAYERS || (total += (int)(reps < 100000 ? reps : 100000)) > DSMOE_MAX_MOE_LAYERS)
            return *why = "the list covers more than DSMOE_MAX_MOE_LAYERS (256) MoE layers", -1;
        ex->count[ex->n] = c < INT_MAX ? (int)c : INT_MAX;
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
