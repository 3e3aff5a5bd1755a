// core/plugins/op_profile.c: the per-call profile of op_profile.h.
#include "op_profile.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h" // dsmoe_rt_wait

typedef struct prof_row {
    const dsmoe_prof_site *site; // NULL: a free slot
    long calls;
    double seconds;
} prof_row;

struct dsmoe_op_profile {
    prof_row *rows; // open addressing on the site's address; cap is a power of two, at most half full
    size_t cap, used;
    int recording, in_call;
    double window_t0, call_t0;
    dsmoe_prof_totals tot;
};

dsmoe_status dsmoe_prof_create(dsmoe_op_profile **out, dsmoe_err *err) {
    dsmoe_op_profile *p = calloc(1, sizeof *p);
    prof_row *rows = calloc(256, sizeof *rows);
    if (!p || !rows) {
        free(p);
        free(rows);
        *out = NULL;
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "op profile: out of memory");
    }
    p->rows = rows;
    p->cap = 256;
    *out = p;
    return DSMOE_OK;
}

void dsmoe_prof_free(dsmoe_op_profile *p) {
    if (!p) return;
    free(p->rows);
    free(p);
}

static size_t slot_of(const dsmoe_prof_site *site, size_t cap) {
    uintptr_t h = (uintptr_t)site;
    h ^= h >> 17;
    h *= (uintptr_t)0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 7) & (cap - 1);
}

// The row of site, made on first use; NULL only when the table cannot grow (the call then goes
// untimed: it shows in the outside line, which a profile must not fail a run over).
static prof_row *row_of(dsmoe_op_profile *p, const dsmoe_prof_site *site) {
    for (size_t i = slot_of(site, p->cap);; i = (i + 1) & (p->cap - 1)) {
        if (p->rows[i].site == site) return &p->rows[i];
        if (!p->rows[i].site) break;
    }
    if (2 * (p->used + 1) > p->cap) {
        size_t cap = 2 * p->cap;
        prof_row *rows = calloc(cap, sizeof *rows);
        if (!rows) return NULL;
        for (size_t i = 0; i < p->cap; i++) {
            if (!p->rows[i].site) continue;
            size_t j = slot_of(p->rows[i].site, cap);
            while (rows[j].site) j = (j + 1) & (cap - 1);
            rows[j] = p->rows[i];
        }
        free(p->rows);
        p->rows = rows;
        p->cap = cap;
    }
    size_t i = slot_of(site, p->cap);
    while (p->rows[i].site) i = (i + 1) & (p->cap - 1);
    p->rows[i].site = site;
    p->used++;
    return &p->rows[i];
}

dsmoe_status dsmoe_prof_record(const dsmoe_runtime *rt, int on, dsmoe_err *err) {
    dsmoe_op_profile *p = rt->prof;
    if (!p || !on == !p->recording) return DSMOE_OK;
    DSMOE_TRY(dsmoe_rt_wait(rt, err));
    double now = dsmoe_now_seconds();
    if (on) {
        p->window_t0 = now;
    } else {
        p->tot.wall_s += now - p->window_t0;
        p->tot.windows++;
    }
    p->recording = on;
    p->in_call = 0;
    return DSMOE_OK;
}

dsmoe_status dsmoe_prof_enter(const dsmoe_runtime *rt, dsmoe_err *err) {
    dsmoe_op_profile *p = rt->prof;
    if (!p || !p->recording) return DSMOE_OK;
    DSMOE_TRY(dsmoe_rt_wait(rt, err));
    p->call_t0 = dsmoe_now_seconds();
    p->in_call = 1;
    return DSMOE_OK;
}

dsmoe_status dsmoe_prof_leave(const dsmoe_runtime *rt, const dsmoe_prof_site *site, dsmoe_err *err) {
    dsmoe_op_profile *p = rt->prof;
    if (!p || !p->recording || !p->in_call) return DSMOE_OK;
    DSMOE_TRY(dsmoe_rt_wait(rt, err));
    double dt = dsmoe_now_seconds() - p->call_t0;
    p->in_call = 0;
    prof_row *r = row_of(p, site);
    if (!r) return DSMOE_OK;
    r->calls++;
    r->seconds += dt;
    p->tot.calls++;
    p->tot.calls_s += dt;
    return DSMOE_OK;
}

dsmoe_prof_totals dsmoe_prof_totals_of(const dsmoe_op_profile *p) {
    dsmoe_prof_totals t = {0};
    return p ? p->tot : t;
}

// ----------------------------------------------------------------------------------------------------
// reports

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static int by_seconds_desc(const void *a, const void *b) {
    const prof_row *x = a, *y = b;
    if (x->seconds != y->seconds) return x->seconds < y->seconds ? 1 : -1;
    if (x->site->comm != y->site->comm) return x->site->comm - y->site->comm;
    int c = strcmp(x->site->op, y->site->op);
    if (c) return c;
    c = strcmp(x->site->file, y->site->file);
    return c ? c : x->site->line - y->site->line;
}

// The used rows, copied out and sorted (caller frees); *n their count. NULL with *n = 0 when empty.
static prof_row *sorted_rows(const dsmoe_op_profile *p, size_t *n) {
    *n = 0;
    prof_row *out = p->used ? malloc(p->used * sizeof *out) : NULL;
    if (!out) return NULL;
    for (size_t i = 0; i < p->cap; i++)
        if (p->rows[i].site) out[(*n)++] = p->rows[i];
    qsort(out, *n, sizeof *out, by_seconds_desc);
    return out;
}

static const char *kind_of(const dsmoe_prof_site *s) { return s->comm ? "comm" : "kernel"; }

static double share(double s, double wall) { return wall > 0 ? 100.0 * s / wall : 0.0; }

void dsmoe_prof_print(const dsmoe_op_profile *p, FILE *out, const char *title, int by_site, int max_rows) {
    size_t n = 0;
    prof_row *rows = p ? sorted_rows(p, &n) : NULL;
    // Unless by_site, the sites of one member become one row (kind + name): rows[0..m) after this.
    size_t m = by_site ? n : 0;
    for (size_t i = 0; !by_site && i < n; i++) {
        size_t j = 0;
        while (j < m && !(rows[j].site->comm == rows[i].site->comm && !strcmp(rows[j].site->op, rows[i].site->op)))
            j++;
        if (j == m) {
            rows[m++] = rows[i];
        } else {
            rows[j].calls += rows[i].calls;
            rows[j].seconds += rows[i].seconds;
        }
    }
    qsort(rows, m, sizeof *rows, by_seconds_desc);
    dsmoe_prof_totals t = dsmoe_prof_totals_of(p);
    fprintf(out, "%s: %ld window%s, %.3f ms of wall time, %ld timed calls\n", title, t.windows,
            t.windows == 1 ? "" : "s", t.wall_s * 1e3, t.calls);
    char(*names)[160] = m ? malloc(m * sizeof *names) : NULL;
    int w = 28; // the name column: as wide as the longest name
    for (size_t i = 0; names && i < m; i++) {
        if (by_site)
            snprintf(names[i], sizeof names[i], "%s %s:%d", rows[i].site->op, base_name(rows[i].site->file),
                     rows[i].site->line);
        else
            snprintf(names[i], sizeof names[i], "%s", rows[i].site->op);
        int len = (int)strlen(names[i]);
        if (len > w) w = len;
    }
    fprintf(out, "  %-6s %-*s %9s %12s %12s %7s\n", "kind", w, by_site ? "member at call site" : "member", "calls",
            "total ms", "mean us", "share");
    size_t shown = max_rows > 0 && (size_t)max_rows < m ? (size_t)max_rows : m;
    for (size_t i = 0; names && i < shown; i++)
        fprintf(out, "  %-6s %-*s %9ld %12.3f %12.1f %6.1f%%\n", kind_of(rows[i].site), w, names[i], rows[i].calls,
                rows[i].seconds * 1e3, rows[i].calls ? rows[i].seconds / rows[i].calls * 1e6 : 0.0,
                share(rows[i].seconds, t.wall_s));
    if (shown < m) {
        long calls = 0;
        double s = 0;
        for (size_t i = shown; i < m; i++) calls += rows[i].calls, s += rows[i].seconds;
        char rest[64];
        snprintf(rest, sizeof rest, "(%zu more %s)", m - shown, by_site ? "sites" : "members");
        fprintf(out, "  %-6s %-*s %9ld %12.3f %12s %6.1f%%\n", "", w, rest, calls, s * 1e3, "", share(s, t.wall_s));
    }
    fprintf(out, "  %-6s %-*s %9ld %12.3f %12s %6.1f%%\n", "", w, "all timed calls", t.calls, t.calls_s * 1e3, "",
            share(t.calls_s, t.wall_s));
    fprintf(out, "  %-6s %-*s %9s %12.3f %12s %6.1f%%\n", "", w, "outside the timed calls", "",
            (t.wall_s - t.calls_s) * 1e3, "", share(t.wall_s - t.calls_s, t.wall_s));
    free(names);
    free(rows);
}

dsmoe_status dsmoe_prof_write_tsv(const dsmoe_op_profile *p, const char *path, dsmoe_err *err) {
    size_t n = 0, len = 0, cap = 4096;
    prof_row *rows = sorted_rows(p, &n);
    if (n && !rows) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory for the profile", path);
    char *text = malloc(cap);
    dsmoe_prof_totals t = dsmoe_prof_totals_of(p);
    for (size_t i = 0; text && i <= n + 1; i++) {
        char line[512];
        int k;
        if (i == 0)
            k = snprintf(line, sizeof line, "kind\top\tsite\tcalls\ttotal_ms\tmean_us\tshare\n");
        else if (i <= n)
            k = snprintf(line, sizeof line, "%s\t%s\t%s:%d\t%ld\t%.6f\t%.3f\t%.4f\n", kind_of(rows[i - 1].site),
                         rows[i - 1].site->op, base_name(rows[i - 1].site->file), rows[i - 1].site->line,
                         rows[i - 1].calls, rows[i - 1].seconds * 1e3,
                         rows[i - 1].calls ? rows[i - 1].seconds / rows[i - 1].calls * 1e6 : 0.0,
                         share(rows[i - 1].seconds, t.wall_s) / 100.0);
        else
            k = snprintf(line, sizeof line, "wall\t(%ld windows)\t\t%ld\t%.6f\t\t1\noutside\t(not in a timed call)\t\t\t%.6f\t\t%.4f\n",
                         t.windows, t.calls, t.wall_s * 1e3, (t.wall_s - t.calls_s) * 1e3,
                         share(t.wall_s - t.calls_s, t.wall_s) / 100.0);
        if (k < 0) k = 0;
        if ((size_t)k >= sizeof line) k = (int)sizeof line - 1;
        if (len + (size_t)k + 1 > cap) {
            char *grown = realloc(text, 2 * cap + (size_t)k);
            if (!grown) {
                free(text);
                text = NULL;
                break;
            }
            text = grown;
            cap = 2 * cap + (size_t)k;
        }
        memcpy(text + len, line, (size_t)k + 1);
        len += (size_t)k;
    }
    free(rows);
    if (!text) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory for the profile", path);
    dsmoe_status s = dsmoe_write_file_atomic(path, text, len, err);
    free(text);
    return s;
}
