// core/plugins/op_profile.c: the per-call profile of op_profile.h.
#include "op_profile.h"

#include <stdint.h>
#include <stdio.h>
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
// every rank's rows, merged on rank 0 by call site

// A call site as the ranks name it to each other: the same text on every rank (addresses differ).
typedef struct table_key {
    char kind[8], op[64], site[112];
} table_key;

struct dsmoe_prof_table {
    int ranks;
    size_t keys, cap;
    table_key *key;
    long *calls;      // (cap, ranks)
    double *seconds;  // (cap, ranks)
    dsmoe_prof_totals *tot; // (ranks)
};

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static const char *kind_of(const dsmoe_prof_site *s) { return s->comm ? "comm" : "kernel"; }

// This rank's profile as text: "T wall_s calls_s windows calls", then "R kind op site calls seconds" a
// site, tab-separated (seconds with 17 digits: the merge adds no rounding). NULL when out of memory.
static char *serialise(const dsmoe_op_profile *p, size_t *len) {
    size_t cap = 256 + (p ? p->used : 0) * 256, n = 0;
    char *text = malloc(cap);
    if (!text) return NULL;
    dsmoe_prof_totals t = dsmoe_prof_totals_of(p);
    n += (size_t)snprintf(text, cap, "T\t%.17g\t%.17g\t%ld\t%ld\n", t.wall_s, t.calls_s, t.windows, t.calls);
    for (size_t i = 0; p && i < p->cap; i++) {
        const prof_row *r = &p->rows[i];
        if (!r->site) continue;
        int k = snprintf(text + n, cap - n, "R\t%s\t%.63s\t%.80s:%d\t%ld\t%.17g\n", kind_of(r->site), r->site->op,
                         base_name(r->site->file), r->site->line, r->calls, r->seconds);
        if (k < 0 || (size_t)k >= cap - n) { // 256 bytes a row always fit: a site's names are bounded above
            free(text);
            return NULL;
        }
        n += (size_t)k;
    }
    *len = n;
    return text;
}

void dsmoe_prof_table_free(dsmoe_prof_table *t) {
    if (!t) return;
    free(t->key);
    free(t->calls);
    free(t->seconds);
    free(t->tot);
    free(t);
}

// The index of key k, added (zero for every rank) when new; hint: where to look first (ranks list
// their sites in the same order as a rule). -1 when out of memory.
static long key_index(dsmoe_prof_table *t, const table_key *k, size_t hint) {
    for (size_t j = 0; j < t->keys; j++) {
        size_t i = (hint + j) % t->keys;
        if (!strcmp(t->key[i].site, k->site) && !strcmp(t->key[i].op, k->op) && !strcmp(t->key[i].kind, k->kind))
            return (long)i;
    }
    if (t->keys == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 64, R = (size_t)t->ranks;
        table_key *key = realloc(t->key, cap * sizeof *key);
        if (key) t->key = key;
        long *calls = realloc(t->calls, cap * R * sizeof *calls);
        if (calls) t->calls = calls;
        double *seconds = realloc(t->seconds, cap * R * sizeof *seconds);
        if (seconds) t->seconds = seconds;
        if (!key || !calls || !seconds) return -1;
        t->cap = cap;
    }
    size_t i = t->keys++;
    t->key[i] = *k;
    for (int r = 0; r < t->ranks; r++) t->calls[i * (size_t)t->ranks + r] = 0, t->seconds[i * (size_t)t->ranks + r] = 0;
    return (long)i;
}

// Adds rank r's text (serialise's) to t. DSMOE_ERR_NOMEM, or DSMOE_ERR_INVALID for text it did not write.
static dsmoe_status merge_rank(dsmoe_prof_table *t, int r, char *text, size_t len) {
    size_t hint = 0;
    for (char *line = text, *end = text + len; line < end;) {
        char *nl = memchr(line, '\n', (size_t)(end - line));
        if (!nl) return DSMOE_ERR_INVALID;
        *nl = '\0';
        char *f[6];
        int nf = 0;
        for (char *q = line; nf < 6; q++) {
            f[nf++] = q;
            if (!(q = strchr(q, '\t'))) break;
            *q = '\0';
        }
        if (nf == 5 && !strcmp(f[0], "T")) {
            t->tot[r] = (dsmoe_prof_totals){.wall_s = strtod(f[1], NULL), .calls_s = strtod(f[2], NULL),
                                            .windows = strtol(f[3], NULL, 10), .calls = strtol(f[4], NULL, 10)};
        } else if (nf == 6 && !strcmp(f[0], "R")) {
            table_key k;
            snprintf(k.kind, sizeof k.kind, "%s", f[1]);
            snprintf(k.op, sizeof k.op, "%s", f[2]);
            snprintf(k.site, sizeof k.site, "%s", f[3]);
            long i = key_index(t, &k, hint);
            if (i < 0) return DSMOE_ERR_NOMEM;
            t->calls[(size_t)i * (size_t)t->ranks + r] += strtol(f[4], NULL, 10);
            t->seconds[(size_t)i * (size_t)t->ranks + r] += strtod(f[5], NULL);
            hint = (size_t)i + 1;
        } else {
            return DSMOE_ERR_INVALID;
        }
        line = nl + 1;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_prof_gather(const dsmoe_op_profile *p, const dsmoe_ctl_group *g, dsmoe_prof_table **out,
                               dsmoe_err *err) {
    *out = NULL;
    size_t len = 0;
    char *mine = serialise(p, &len);
    // Every member takes part in the gather, also one that is out of memory (it sends nothing, and the
    // table then says so by a missing rank's zero rows: the failure is reported here as well).
    char *all = NULL;
    size_t total = 0, *counts = NULL;
    int root = dsmoe_ctl_rank(g) == 0, ranks = dsmoe_ctl_size(g);
    if (root && !(counts = calloc((size_t)ranks, sizeof *counts))) {
        free(mine);
        mine = NULL;
    }
    dsmoe_status s = dsmoe_ctl_gather_bytes(g, mine ? mine : "", mine ? len : 0, &all, &total, counts, err);
    int had_room = mine != NULL;
    free(mine);
    if (s != DSMOE_OK || !root) {
        free(counts);
        free(all);
        if (s == DSMOE_OK && !had_room) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "op profile: out of memory");
        return s;
    }
    dsmoe_prof_table *t = calloc(1, sizeof *t);
    if (t) t->ranks = ranks, t->tot = calloc((size_t)ranks, sizeof *t->tot);
    s = t && t->tot && had_room ? DSMOE_OK : DSMOE_ERR_NOMEM;
    size_t at = 0;
    for (int r = 0; s == DSMOE_OK && r < ranks; at += counts[r], r++)
        if ((s = merge_rank(t, r, all + at, counts[r])) == DSMOE_ERR_INVALID)
            dsmoe_err_set(err, s, "op profile: rank %d sent a profile that does not parse", r);
    if (s == DSMOE_ERR_NOMEM) dsmoe_err_set(err, s, "op profile: out of memory merging %d ranks", ranks);
    free(counts);
    free(all);
    if (s != DSMOE_OK) {
        dsmoe_prof_table_free(t);
        return s;
    }
    *out = t;
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// reports

// One line of a report: a site (or all the sites of one member), its seconds and calls on each rank.
typedef struct report_row {
    const table_key *key;
    double *seconds; // (ranks)
    long *calls;     // (ranks)
    double mean_s, mean_calls;
} report_row;

typedef struct report {
    report_row *rows;
    size_t n;
    double *seconds; // the rows' per-rank arrays, (t->keys, ranks) each
    long *calls;
} report;

static int by_mean_desc(const void *a, const void *b) {
    const report_row *x = a, *y = b;
    if (x->mean_s != y->mean_s) return x->mean_s < y->mean_s ? 1 : -1;
    int c = strcmp(x->key->kind, y->key->kind);
    if (c) return -c; // kernel before comm
    c = strcmp(x->key->op, y->key->op);
    return c ? c : strcmp(x->key->site, y->key->site);
}

static void report_free(report *rep) {
    free(rep->rows);
    free(rep->seconds);
    free(rep->calls);
    memset(rep, 0, sizeof *rep);
}

// The rows of t, a row a site (by_site) or a member, sorted by their mean over the ranks, largest first.
static int report_make(const dsmoe_prof_table *t, int by_site, report *rep) {
    size_t R = (size_t)t->ranks, K = t->keys ? t->keys : 1, m = 0;
    *rep = (report){.rows = calloc(K, sizeof *rep->rows), .seconds = calloc(K * R, sizeof *rep->seconds),
                    .calls = calloc(K * R, sizeof *rep->calls)};
    if (!rep->rows || !rep->seconds || !rep->calls) {
        report_free(rep);
        return -1;
    }
    report_row *rows = rep->rows;
    for (size_t i = 0; i < t->keys; i++) {
        size_t j = by_site ? m : 0;
        while (j < m && (strcmp(rows[j].key->kind, t->key[i].kind) || strcmp(rows[j].key->op, t->key[i].op))) j++;
        if (j == m) {
            rows[m] = (report_row){.key = &t->key[i], .seconds = rep->seconds + m * R, .calls = rep->calls + m * R};
            m++;
        }
        for (size_t r = 0; r < R; r++) {
            rows[j].seconds[r] += t->seconds[i * R + r];
            rows[j].calls[r] += t->calls[i * R + r];
        }
    }
    for (size_t j = 0; j < m; j++) {
        for (size_t r = 0; r < R; r++) rows[j].mean_s += rows[j].seconds[r], rows[j].mean_calls += (double)rows[j].calls[r];
        rows[j].mean_s /= (double)R;
        rows[j].mean_calls /= (double)R;
    }
    qsort(rows, m, sizeof *rows, by_mean_desc);
    rep->n = m;
    return 0;
}

static double share(double s, double wall) { return wall > 0 ? 100.0 * s / wall : 0.0; }

// The rank with the smallest (lo) or largest value of v (ranks): the first such rank.
static int arg_extreme(const double *v, int ranks, int largest) {
    int at = 0;
    for (int r = 1; r < ranks; r++)
        if (largest ? v[r] > v[at] : v[r] < v[at]) at = r;
    return at;
}

// "  kind name calls ms us share [min (rank) max (rank)]" with the widths of the header.
static void print_line(FILE *out, int w, int ranks, const char *kind, const char *name, const char *calls, double ms,
                       const char *us, double pct, const double *per_rank_s) {
    fprintf(out, "  %-6s %-*s %10s %12.3f %10s %6.1f%%", kind, w, name, calls, ms, us, pct);
    if (ranks > 1 && per_rank_s) {
        int lo = arg_extreme(per_rank_s, ranks, 0), hi = arg_extreme(per_rank_s, ranks, 1);
        fprintf(out, " %12.3f (%d) %12.3f (%d)", per_rank_s[lo] * 1e3, lo, per_rank_s[hi] * 1e3, hi);
    }
    fputc('\n', out);
}

void dsmoe_prof_print(const dsmoe_prof_table *t, FILE *out, const char *title, int by_site, int max_rows) {
    report rep;
    if (report_make(t, by_site, &rep) != 0) {
        fprintf(out, "%s: out of memory for the report\n", title);
        return;
    }
    const int R = t->ranks;
    double *wall = malloc((size_t)R * sizeof *wall), *timed = malloc((size_t)R * sizeof *timed),
           *outside = malloc((size_t)R * sizeof *outside), *rest = calloc((size_t)R, sizeof *rest);
    char(*names)[192] = malloc((rep.n ? rep.n : 1) * sizeof *names);
    if (!wall || !timed || !outside || !rest || !names) {
        fprintf(out, "%s: out of memory for the report\n", title);
        goto done;
    }
    double mean_wall = 0, mean_timed = 0;
    for (int r = 0; r < R; r++) {
        wall[r] = t->tot[r].wall_s, timed[r] = t->tot[r].calls_s, outside[r] = wall[r] - timed[r];
        mean_wall += wall[r] / R, mean_timed += timed[r] / R;
    }
    int w = 28; // the name column: as wide as the longest name
    for (size_t i = 0; i < rep.n; i++) {
        const table_key *k = rep.rows[i].key;
        snprintf(names[i], sizeof names[i], by_site ? "%s %s" : "%s", k->op, k->site);
        int len = (int)strlen(names[i]);
        if (len > w) w = len;
    }
    if (R == 1) {
        fprintf(out, "%s: %ld window%s, %.3f ms of wall time, %ld timed calls\n", title, t->tot[0].windows,
                t->tot[0].windows == 1 ? "" : "s", wall[0] * 1e3, t->tot[0].calls);
    } else {
        int lo = arg_extreme(wall, R, 0), hi = arg_extreme(wall, R, 1);
        fprintf(out, "%s: %d ranks, %ld window%s, wall time %.3f ms on the mean (min %.3f on rank %d, max %.3f on "
                "rank %d); calls and ms are means over the ranks\n", title, R, t->tot[0].windows,
                t->tot[0].windows == 1 ? "" : "s", mean_wall * 1e3, wall[lo] * 1e3, lo, wall[hi] * 1e3, hi);
    }
    fprintf(out, "  %-6s %-*s %10s %12s %10s %7s", "kind", w, by_site ? "member at call site" : "member", "calls",
            "total ms", "mean us", "share");
    if (R > 1) fprintf(out, " %17s %17s", "min ms (rank)", "max ms (rank)");
    fputc('\n', out);
    size_t shown = max_rows > 0 && (size_t)max_rows < rep.n ? (size_t)max_rows : rep.n;
    double rest_calls = 0;
    for (size_t i = 0; i < rep.n; i++) {
        const report_row *row = &rep.rows[i];
        if (i >= shown) {
            for (int r = 0; r < R; r++) rest[r] += row->seconds[r];
            rest_calls += row->mean_calls;
            continue;
        }
        char calls[32], us[32];
        snprintf(calls, sizeof calls, R == 1 ? "%.0f" : "%.1f", row->mean_calls);
        snprintf(us, sizeof us, "%.1f", row->mean_calls > 0 ? row->mean_s / row->mean_calls * 1e6 : 0.0);
        print_line(out, w, R, row->key->kind, names[i], calls, row->mean_s * 1e3, us, share(row->mean_s, mean_wall),
                   row->seconds);
    }
    if (shown < rep.n) {
        char what[64], calls[32];
        double mean_rest = 0;
        for (int r = 0; r < R; r++) mean_rest += rest[r] / R;
        snprintf(what, sizeof what, "(%zu more %s)", rep.n - shown, by_site ? "sites" : "members");
        snprintf(calls, sizeof calls, R == 1 ? "%.0f" : "%.1f", rest_calls);
        print_line(out, w, R, "", what, calls, mean_rest * 1e3, "", share(mean_rest, mean_wall), rest);
    }
    char all_calls[32];
    double mean_calls = 0;
    for (int r = 0; r < R; r++) mean_calls += (double)t->tot[r].calls / R;
    snprintf(all_calls, sizeof all_calls, R == 1 ? "%.0f" : "%.1f", mean_calls);
    print_line(out, w, R, "", "all timed calls", all_calls, mean_timed * 1e3, "", share(mean_timed, mean_wall), timed);
    print_line(out, w, R, "", "outside the timed calls", "", (mean_wall - mean_timed) * 1e3, "",
               share(mean_wall - mean_timed, mean_wall), outside);
done:
    free(wall), free(timed), free(outside), free(rest), free(names);
    report_free(&rep);
}

dsmoe_status dsmoe_prof_write_tsv(const dsmoe_prof_table *t, const char *path, dsmoe_err *err) {
    report rep;
    char *text = NULL;
    size_t len = 0;
    FILE *f = report_make(t, 1, &rep) == 0 ? open_memstream(&text, &len) : NULL;
    if (!f) {
        if (rep.rows) report_free(&rep);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory for the profile", path);
    }
    fprintf(f, "rank\tkind\top\tsite\tcalls\ttotal_ms\tmean_us\tshare\n");
    for (int r = 0; r < t->ranks; r++) {
        const dsmoe_prof_totals *tot = &t->tot[r];
        for (size_t i = 0; i < rep.n; i++) {
            const report_row *row = &rep.rows[i];
            if (!row->calls[r]) continue;
            fprintf(f, "%d\t%s\t%s\t%s\t%ld\t%.6f\t%.3f\t%.4f\n", r, row->key->kind, row->key->op, row->key->site,
                    row->calls[r], row->seconds[r] * 1e3, row->seconds[r] / (double)row->calls[r] * 1e6,
                    share(row->seconds[r], tot->wall_s) / 100.0);
        }
        fprintf(f, "%d\twall\t(%ld windows)\t\t%ld\t%.6f\t\t1\n", r, tot->windows, tot->calls, tot->wall_s * 1e3);
        fprintf(f, "%d\toutside\t(not in a timed call)\t\t\t%.6f\t\t%.4f\n", r, (tot->wall_s - tot->calls_s) * 1e3,
                share(tot->wall_s - tot->calls_s, tot->wall_s) / 100.0);
    }
    report_free(&rep);
    if (fclose(f) != 0 || !text) {
        free(text);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory for the profile", path);
    }
    dsmoe_status s = dsmoe_write_file_atomic(path, text, len, err);
    free(text);
    return s;
}
