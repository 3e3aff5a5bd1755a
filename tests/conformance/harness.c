// tests/conformance/harness.c: the conformance suite's harness (conformance.h): the two plugin contexts,
// checks with their own seeds and allocations, buffers on both sides, comparisons and the result lines.
// defines: cf_sides, cf_res, cf_tol_scale, cf_open*, cf_close*, cf_run, cf_check_name, cf_pass, cf_fail,
//          cf_skip, cf_note, cf_abort, cf_abandon_skip, cf_op, cf_cand_dtype, cf_host, cf_rand*, cf_fill,
//          cf_uniform, cf_bf16 helpers, cf_up*, cf_out, cf_scratch, cf_zeros, cf_get*, cf_cmp*, cf_tol_for,
//          cf_tol_gemm, cf_tf32, cf_setting_on, cf_forget_buffers
//
// A check is abandoned with longjmp (a FAIL or SKIP line first); its host memory and buffers are kept in
// lists and freed when cf_run ends, so one wrong op never stops the next check. A context whose
// synchronize reports a sticky error after a check is finalized and made again.
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h> // strcasecmp
#include <unistd.h> // alarm

#include "conformance.h"

cf_side cf_sides[2];
cf_shared *cf_res;
double cf_tol_scale = 1.0;
int cf_tf32;

// --- the running check ---------------------------------------------------------------------------

#define CF_MAX_ALLOCS 512

static struct {
    int active;
    jmp_buf jb;
    char name[200];
    int failed;                    // a FAIL line was printed for it
    void *host[CF_MAX_ALLOCS];     // cf_host blocks
    int n_host;
    void *dev[2][CF_MAX_ALLOCS];   // buffers per side
    int n_dev[2];
    uint64_t rng;
} ck;

const char *cf_check_name(void) { return ck.active ? ck.name : "(between checks)"; }

static void line(const char *tag, const char *what, const char *fmt, va_list ap) {
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    const char *name = ck.active ? ck.name : cf_res->current;
    if (what && *what)
        printf("%s %s.%s %s\n", tag, name, what, msg);
    else
        printf("%s %s %s\n", tag, name, msg);
    fflush(stdout);
}

void cf_pass(const char *what, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    line("PASS", what, fmt, ap);
    va_end(ap);
    cf_res->passed++;
}

void cf_fail(const char *what, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    line("FAIL", what, fmt, ap);
    va_end(ap);
    cf_res->failed++;
    ck.failed = 1;
}

void cf_skip(const char *what, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    line("SKIP", what, fmt, ap);
    va_end(ap);
    cf_res->skipped++;
}

void cf_note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("# ");
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}

_Noreturn void cf_abort(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    line("FAIL", "", fmt, ap);
    va_end(ap);
    cf_res->failed++;
    ck.failed = 1;
    if (!ck.active) { // a harness bug: checks are the only callers
        fprintf(stderr, "conformance: cf_abort outside a check\n");
        exit(1);
    }
    longjmp(ck.jb, 1);
}

_Noreturn void cf_abandon_skip(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    line("SKIP", "", fmt, ap);
    va_end(ap);
    cf_res->skipped++;
    if (!ck.active) exit(1);
    longjmp(ck.jb, 1);
}

void cf_op(int side, const char *member, dsmoe_status s) {
    cf_side *S = &cf_sides[side];
    if (s == DSMOE_OK) return;
    if (s == CF_MISSING) cf_abort("%s %s has no %s (NULL in its table)", S->role, S->name, member);
    cf_abort("%s %s: %s returned '%s': %s", S->role, S->name, member, dsmoe_status_name(s),
             S->c ? S->T->last_error(S->c) : "(no context)");
}

int cf_cand_dtype(dsmoe_dtype dt) {
    const dsmoe_kernel_plugin_v3 *T = cf_sides[0].T;
    if (!(T->dtypes & DSMOE_DTYPE_BIT(dt))) return 0;
    return dt != CF_BF16 || (T->caps & DSMOE_KCAP_BF16);
}

// --- contexts ------------------------------------------------------------------------------------

// The plugin's settings as init gets them: declared defaults, then "key=value" pairs of s->settings over
// them (unknown keys: a note when `note`). Returns their count (at most 64); vals point into store.
static int resolve_settings(const cf_side *s, const char *vals[64], char store[64][128], int note) {
    int np = s->T->n_params < 64 ? s->T->n_params : 64;
    for (int i = 0; i < np; i++)
        vals[i] = s->T->params[i].default_value;
    if (!s->settings || !*s->settings) return np;
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", s->settings);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        char *eq = strchr(tok, '=');
        int found = 0;
        if (eq) {
            *eq = 0;
            for (int i = 0; i < np; i++)
                if (!strcmp(s->T->params[i].name, tok)) {
                    snprintf(store[i], 128, "%s", eq + 1);
                    vals[i] = store[i];
                    found = 1;
                }
        }
        if (!found && note) cf_note("%s %s: setting '%s' is not one of its settings: ignored", s->role, s->name, tok);
    }
    return np;
}

int cf_setting_on(const cf_side *s, const char *name) {
    const char *vals[64];
    static char store[64][128];
    int np = resolve_settings(s, vals, store, 0);
    for (int i = 0; i < np; i++)
        if (!strcmp(s->T->params[i].name, name) && vals[i])
            return !strcasecmp(vals[i], "true") || !strcmp(vals[i], "1") || !strcasecmp(vals[i], "yes") ||
                   !strcasecmp(vals[i], "on");
    return 0;
}

dsmoe_status cf_open(cf_side *s, char *err, size_t len) {
    const char *vals[64];
    static char store[2][64][128];
    int np = resolve_settings(s, vals, store[s == &cf_sides[0] ? 0 : 1], 1);
    dsmoe_kernel_options opt = {.threads = 0, .param_values = np ? vals : NULL, .n_param_values = np};
    s->c = NULL;
    s->q = NULL;
    s->ev = NULL;
    err[0] = 0;
    dsmoe_status st = s->T->init(&opt, &s->c, err, len);
    if (st != DSMOE_OK || !s->c) {
        s->c = NULL;
        if (!err[0]) snprintf(err, len, "init returned '%s' without a message", dsmoe_status_name(st));
        return st != DSMOE_OK ? st : DSMOE_ERR_INTERNAL;
    }
    s->q = s->T->default_queue(s->c);
    st = s->T->event_create(s->c, &s->ev);
    if (st != DSMOE_OK || !s->q) {
        snprintf(err, len, "%s", !s->q ? "default_queue is NULL" : s->T->last_error(s->c));
        s->T->finalize(s->c);
        s->c = NULL;
        return st != DSMOE_OK ? st : DSMOE_ERR_INTERNAL;
    }
    return DSMOE_OK;
}

void cf_close(cf_side *s) {
    if (!s->c) return;
    if (s->ev) s->T->event_destroy(s->c, s->ev);
    s->T->finalize(s->c);
    s->c = NULL;
    s->q = NULL;
    s->ev = NULL;
}

int cf_open_both(void) {
    for (int i = 0; i < 2; i++) {
        if (cf_sides[i].c) continue;
        char err[1024];
        dsmoe_status st = cf_open(&cf_sides[i], err, sizeof err);
        if (st != DSMOE_OK) {
            cf_fail("", "%s %s: init failed: %s: %s", cf_sides[i].role, cf_sides[i].name, dsmoe_status_name(st), err);
            return -1;
        }
    }
    return 0;
}

void cf_close_both(void) {
    cf_close(&cf_sides[0]);
    cf_close(&cf_sides[1]);
}

// --- random numbers (xorshift64*, seeded per check from its name) ----------------------------------

uint64_t cf_rand_u64(void) {
    ck.rng ^= ck.rng >> 12;
    ck.rng ^= ck.rng << 25;
    ck.rng ^= ck.rng >> 27;
    return ck.rng * 0x2545F4914F6CDD1Dull;
}

float cf_uniform(void) { return (float)(cf_rand_u64() >> 40) * (1.0f / 16777216.0f); }

void cf_run(const char *name, void (*fn)(const void *), const void *arg) {
    if (cf_res->started++ < cf_res->skip) return; // done before the crash this process restarts after
    if (cf_res->timeout_s > 0) alarm((unsigned)cf_res->timeout_s);
    memset(&ck, 0, sizeof ck);
    snprintf(ck.name, sizeof ck.name, "%s", name);
    snprintf(cf_res->current, sizeof cf_res->current, "%s", name);
    uint64_t h = 1469598103934665603ull; // FNV-1a of the name: each check has its own fixed inputs
    for (const char *p = name; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    ck.rng = h | 1;
    ck.active = 1;
    if (cf_open_both() == 0 && setjmp(ck.jb) == 0) fn(arg);
    // Health of both contexts: a sticky error left behind is reported, and the context made again.
    for (int i = 0; i < 2; i++) {
        cf_side *S = &cf_sides[i];
        if (!S->c) continue;
        dsmoe_status st = S->T->synchronize(S->c);
        if (st == DSMOE_OK) {
            for (int k = 0; k < ck.n_dev[i]; k++)
                S->T->free(S->c, ck.dev[i][k]);
            continue;
        }
        if (!ck.failed)
            cf_fail("", "%s %s: synchronize after the check returned '%s': %s", S->role, S->name,
                    dsmoe_status_name(st), S->T->last_error(S->c));
        cf_note("%s %s: the context has a sticky error ('%s'): finalized and made again for the next check",
                S->role, S->name, S->T->last_error(S->c));
        cf_close(S);
        char err[1024];
        if (cf_open(S, err, sizeof err) != DSMOE_OK) cf_note("%s %s: init failed again: %s", S->role, S->name, err);
    }
    for (int k = 0; k < ck.n_host; k++)
        free(ck.host[k]);
    ck.active = 0;
    snprintf(cf_res->current, sizeof cf_res->current, "(between checks after %s)", name);
}

void cf_forget_buffers(int side) { ck.n_dev[side] = 0; }

// --- host memory ---------------------------------------------------------------------------------

void *cf_host(size_t bytes) {
    if (ck.n_host >= CF_MAX_ALLOCS) cf_abort("harness: more than %d host blocks in one check", CF_MAX_ALLOCS);
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) cf_abort("harness: out of host memory (%zu bytes)", bytes);
    ck.host[ck.n_host++] = p;
    return p;
}

float *cf_rand(size_t n, float scale) {
    float *f = cf_host(n * sizeof *f);
    for (size_t i = 0; i < n; i++)
        f[i] = scale * (2.0f * cf_uniform() - 1.0f);
    return f;
}

float *cf_fill(size_t n, float value) {
    float *f = cf_host(n * sizeof *f);
    for (size_t i = 0; i < n; i++)
        f[i] = value;
    return f;
}

int32_t *cf_randint(size_t n, int lo, int hi) {
    int32_t *v = cf_host(n * sizeof *v);
    for (size_t i = 0; i < n; i++)
        v[i] = lo + (int32_t)(cf_rand_u64() % (uint64_t)(hi - lo + 1));
    return v;
}

// bfloat16: the upper half of a float32, round to nearest even; NaN stays a quiet NaN.
uint16_t cf_f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float cf_bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float cf_bf16_round(float f) { return cf_bf2f(cf_f2bf(f)); }

void cf_round_dt(float *h, size_t n, dsmoe_dtype dt) {
    if (dt == CF_BF16)
        for (size_t i = 0; i < n; i++)
            h[i] = cf_bf16_round(h[i]);
}

// --- buffers -------------------------------------------------------------------------------------

static size_t side_bytes(const cf_buf *b, int side) { return b->n * dsmoe_dtype_size(cf_dt(side, b->dt)); }

static void *dev_alloc(int side, size_t bytes, uint32_t flags, const char *name) {
    cf_side *S = &cf_sides[side];
    if (ck.n_dev[side] >= CF_MAX_ALLOCS) cf_abort("harness: more than %d buffers in one check", CF_MAX_ALLOCS);
    void *p = NULL;
    dsmoe_status st = S->T->alloc(S->c, bytes, flags, &p);
    if (st != DSMOE_OK || !p)
        cf_abort("%s %s: alloc(%zu bytes) for %s returned '%s': %s", S->role, S->name, bytes, name,
                 dsmoe_status_name(st), S->T->last_error(S->c));
    ck.dev[side][ck.n_dev[side]++] = p;
    return p;
}

// Copies bytes from a private staging copy, then scribbles over it: copy_to_device from ordinary memory
// must have consumed its source when it returns.
static void upload(int side, void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    void *stage = malloc(bytes);
    if (!stage) cf_abort("harness: out of host memory (%zu bytes)", bytes);
    memcpy(stage, src, bytes);
    cf_side *S = &cf_sides[side];
    dsmoe_status st = S->T->copy_to_device(S->c, S->q, dst, stage, bytes);
    memset(stage, 0xAB, bytes);
    free(stage);
    cf_op(side, "copy_to_device", st);
}

// The bytes of host floats as dt on `side`.
static void put_floats(cf_buf *b, int side, const float *host) {
    dsmoe_dtype t = cf_dt(side, b->dt);
    if (t == CF_BF16) {
        uint16_t *h16 = malloc(b->n * sizeof *h16 + 1);
        if (!h16) cf_abort("harness: out of host memory");
        for (size_t i = 0; i < b->n; i++)
            h16[i] = cf_f2bf(host[i]);
        upload(side, b->p[side], h16, b->n * sizeof *h16);
        free(h16);
    } else {
        upload(side, b->p[side], host, b->n * sizeof(float));
    }
}

cf_buf cf_up(const char *name, float *host, size_t n, dsmoe_dtype dt) {
    cf_buf b = {.name = name, .n = n, .dt = dt, .h = host};
    cf_round_dt(host, n, dt);
    for (int side = 0; side < 2; side++) {
        b.p[side] = dev_alloc(side, side_bytes(&b, side), 0, name);
        put_floats(&b, side, host);
    }
    return b;
}

static cf_buf up_raw(const char *name, const void *host, size_t n, dsmoe_dtype dt) {
    cf_buf b = {.name = name, .n = n, .dt = dt};
    for (int side = 0; side < 2; side++) {
        b.p[side] = dev_alloc(side, side_bytes(&b, side), 0, name);
        upload(side, b.p[side], host, side_bytes(&b, side));
    }
    return b;
}

cf_buf cf_up_i32(const char *name, const int32_t *host, size_t n) { return up_raw(name, host, n, DSMOE_INT32); }
cf_buf cf_up_f64(const char *name, const double *host, size_t n) { return up_raw(name, host, n, DSMOE_FLOAT64); }

cf_buf cf_out(const char *name, size_t n, dsmoe_dtype dt) {
    cf_buf b = {.name = name, .n = n, .dt = dt};
    for (int side = 0; side < 2; side++) {
        size_t bytes = side_bytes(&b, side);
        b.p[side] = dev_alloc(side, bytes, 0, name);
        void *ff = malloc(bytes + 1);
        if (!ff) cf_abort("harness: out of host memory");
        memset(ff, 0xFF, bytes);
        upload(side, b.p[side], ff, bytes);
        free(ff);
    }
    return b;
}

cf_buf cf_zeros(const char *name, size_t n, dsmoe_dtype dt) {
    cf_buf b = {.name = name, .n = n, .dt = dt};
    for (int side = 0; side < 2; side++)
        b.p[side] = dev_alloc(side, side_bytes(&b, side), DSMOE_ALLOC_ZERO, name);
    return b;
}

cf_buf cf_scratch(const char *name, size_t bytes_cand, size_t bytes_ref) {
    cf_buf b = {.name = name, .n = 0, .dt = DSMOE_UINT8};
    b.p[0] = dev_alloc(0, bytes_cand, 0, name);
    b.p[1] = dev_alloc(1, bytes_ref, 0, name);
    return b;
}

void *cf_get_raw(const cf_buf *b, int side, size_t bytes) {
    cf_side *S = &cf_sides[side];
    unsigned char *h = cf_host(bytes);
    if (!bytes) return h;
    memset(h, 0xA5, bytes); // a copy that never lands leaves this pattern (no plausible data has it)
    dsmoe_status st = S->T->copy_to_host(S->c, S->q, h, b->p[side], bytes);
    if (st != DSMOE_OK)
        cf_abort("%s %s: copy_to_host of %s returned '%s': %s", S->role, S->name, b->name, dsmoe_status_name(st),
                 S->T->last_error(S->c));
    st = S->T->event_record(S->c, S->ev, S->q);
    if (st == DSMOE_OK) st = S->T->event_synchronize(S->c, S->ev);
    if (st != DSMOE_OK)
        cf_abort("%s %s: waiting for %s (event_record + event_synchronize) returned '%s': %s", S->role, S->name,
                 b->name, dsmoe_status_name(st), S->T->last_error(S->c));
    size_t same = 0;
    while (same < bytes && h[same] == 0xA5)
        same++;
    if (bytes >= 8 && same == bytes)
        cf_abort("%s %s: copy_to_host of %s (%zu bytes) had not written the host buffer when event_synchronize "
                 "returned (an event that completes early, or a copy that is lost)", S->role, S->name, b->name, bytes);
    return h;
}

float *cf_get(const cf_buf *b, int side) {
    dsmoe_dtype t = cf_dt(side, b->dt);
    void *raw = cf_get_raw(b, side, side_bytes(b, side));
    if (t == CF_F32) return raw;
    float *f = cf_host(b->n * sizeof *f);
    if (t == CF_BF16) {
        for (size_t i = 0; i < b->n; i++)
            f[i] = cf_bf2f(((const uint16_t *)raw)[i]);
    } else {
        cf_abort("harness: cf_get of %s as %s", b->name, dsmoe_dtype_name(t));
    }
    return f;
}

// --- comparisons ---------------------------------------------------------------------------------

cf_tol cf_tol_for(dsmoe_dtype dt, cf_tol f32) { return dt == CF_BF16 ? TOL_BF16 : f32; }

cf_tol cf_tol_gemm(dsmoe_dtype operands, cf_tol tol) {
    if (!cf_tf32 || operands != CF_F32) return tol;
    return (cf_tol){fmax(tol.rtol, TOL_TF32.rtol), fmax(tol.afrac, TOL_TF32.afrac)};
}

static void where(char *buf, size_t len, const cf_buf *b, size_t i) {
    if (b->cols)
        snprintf(buf, len, "i=%zu (row %zu, col %zu)", i, i / b->cols, i % b->cols);
    else
        snprintf(buf, len, "i=%zu", i);
}

static int compare(const char *what, const cf_buf *b, const float *got, const float *want_in, const float *base,
                   const unsigned char *mask, cf_tol tol) {
    size_t n = b->n;
    int bf = b->dt == CF_BF16;
    float *want = cf_host(n * sizeof *want);
    for (size_t i = 0; i < n; i++)
        want[i] = bf ? cf_bf16_round(want_in[i]) : want_in[i];
    double amax = 0;
    size_t compared = 0;
    for (size_t i = 0; i < n; i++) {
        if (mask && !mask[i]) continue;
        double w = base ? (double)want[i] - base[i] : want[i];
        if (isfinite(w) && fabs(w) > amax) amax = fabs(w);
        compared++;
    }
    double atol = tol.afrac * cf_tol_scale * amax, rtol = tol.rtol * cf_tol_scale;
    double max_abs = 0, max_rel = 0;
    size_t bad = 0, first = 0, nan_got = 0;
    for (size_t i = 0; i < n; i++) {
        if (mask && !mask[i]) continue;
        if (isnan(want[i])) { // the inputs are wrong, not the candidate: say so rather than pass NaN == NaN
            char at[96];
            where(at, sizeof at, b, i);
            cf_fail(what, "the REFERENCE produced NaN at %s (a harness bug: the check's inputs)", at);
            return 0;
        }
        nan_got += isnan(got[i]) != 0;
        double g = base ? (double)got[i] - base[i] : got[i], w = base ? (double)want[i] - base[i] : want[i];
        double d = fabs(g - w);
        int ok;
        if (got[i] == want[i]) {
            ok = 1;
            d = 0;
        } else {
            // Accumulators: both sums were rounded to the output type (half an ulp each), which a delta
            // much smaller than its base feels in full (a float32 += with or without a fused multiply-add).
            double extra = base ? fabs((double)want[i]) * (bf ? 1.0 / 128 : (double)FLT_EPSILON) : 0.0;
            ok = d <= atol + rtol * fabs(w) + extra; // false for NaN
        }
        if (!ok && bad++ == 0) first = i;
        if (isfinite(d) && d > max_abs) max_abs = d;
        if (isfinite(d) && fabs(w) > 0 && fabs(w) >= tol.afrac * amax && d / fabs(w) > max_rel) max_rel = d / fabs(w);
    }
    if (!bad) {
        cf_pass(what, "max_abs=%.3g max_rel=%.3g (n=%zu%s)", max_abs, max_rel, compared, base ? ", += deltas" : "");
        return 1;
    }
    char at[96];
    where(at, sizeof at, b, first);
    char extra[160] = "";
    if (base)
        snprintf(extra, sizeof extra, " (+=: delta %.7g, want delta %.7g, from %.7g)", (double)got[first] - base[first],
                 (double)want[first] - base[first], base[first]);
    char nans[48] = "";
    if (nan_got) snprintf(nans, sizeof nans, ", %zu NaN", nan_got);
    cf_fail(what, "first mismatch at %s got %.9g want %.9g%s; %zu of %zu outside %.3g + %.3g*|want|%s, max_abs=%.3g%s",
            at, got[first], want[first], extra, bad, compared, atol, rtol, bf ? " (bfloat16)" : "", max_abs, nans);
    return 0;
}

int cf_cmp(const cf_buf *b, const float *base, const unsigned char *mask, cf_tol tol) {
    float *want = cf_get(b, 1);
    float *got = cf_get(b, 0);
    return compare(b->name, b, got, want, base, mask, tol);
}

int cf_cmp_to(const char *what, const cf_buf *b, const float *want, const unsigned char *mask, cf_tol tol) {
    float *got = cf_get(b, 0);
    return compare(what, b, got, want, NULL, mask, tol);
}

int cf_cmp_i32(const cf_buf *b, const unsigned char *mask) {
    const int32_t *want = cf_get_raw(b, 1, b->n * 4), *got = cf_get_raw(b, 0, b->n * 4);
    size_t bad = 0, first = 0, compared = 0;
    for (size_t i = 0; i < b->n; i++) {
        if (mask && !mask[i]) continue;
        compared++;
        if (got[i] != want[i] && bad++ == 0) first = i;
    }
    if (!bad) {
        cf_pass(b->name, "exact (n=%zu)", compared);
        return 1;
    }
    char at[96];
    where(at, sizeof at, b, first);
    cf_fail(b->name, "first mismatch at %s got %d want %d; %zu of %zu differ (exact compare)", at, got[first],
            want[first], bad, compared);
    return 0;
}

int cf_cmp_f64(const cf_buf *b, const char *label, size_t from, size_t count, double rtol, double afrac) {
    const double *want = cf_get_raw(b, 1, b->n * 8), *got = cf_get_raw(b, 0, b->n * 8);
    double amax = 0, max_abs = 0, max_rel = 0;
    for (size_t i = from; i < from + count; i++)
        if (isfinite(want[i]) && fabs(want[i]) > amax) amax = fabs(want[i]);
    double atol = afrac * cf_tol_scale * amax;
    rtol *= cf_tol_scale;
    size_t bad = 0, first = 0;
    for (size_t i = from; i < from + count; i++) {
        double d = fabs(got[i] - want[i]);
        int ok = got[i] == want[i] || d <= atol + rtol * fabs(want[i]);
        if (got[i] == want[i]) d = 0;
        if (!ok && bad++ == 0) first = i;
        if (isfinite(d) && d > max_abs) max_abs = d;
        if (isfinite(d) && want[i] != 0 && d / fabs(want[i]) > max_rel) max_rel = d / fabs(want[i]);
    }
    if (!bad) {
        cf_pass(label, "max_abs=%.3g max_rel=%.3g (n=%zu, float64)", max_abs, max_rel, count);
        return 1;
    }
    cf_fail(label, "first mismatch at i=%zu got %.17g want %.17g; %zu of %zu outside %.3g + %.3g*|want|", first,
            got[first], want[first], bad, count, atol, rtol);
    return 0;
}

int cf_cmp_untouched(const cf_buf *b, const unsigned char *mask, float fill) {
    int ok = 1;
    char what[96];
    snprintf(what, sizeof what, "%s(untouched)", b->name);
    for (int side = 0; side < 2; side++) {
        dsmoe_dtype t = cf_dt(side, b->dt);
        size_t es = dsmoe_dtype_size(t), bad = 0, first = 0, checked = 0;
        const unsigned char *raw = cf_get_raw(b, side, side_bytes(b, side));
        uint32_t f32bits;
        memcpy(&f32bits, &fill, 4);
        uint16_t bfbits = cf_f2bf(fill);
        for (size_t i = 0; i < b->n; i++) {
            if (mask && mask[i]) continue;
            checked++;
            int same = es == 2 ? !memcmp(raw + 2 * i, &bfbits, 2) : !memcmp(raw + 4 * i, &f32bits, 4);
            if (!same && bad++ == 0) first = i;
        }
        if (bad) {
            float v;
            if (es == 2) {
                uint16_t h;
                memcpy(&h, raw + 2 * first, 2);
                v = cf_bf2f(h);
            } else {
                memcpy(&v, raw + 4 * first, 4);
            }
            char at[96];
            where(at, sizeof at, b, first);
            cf_fail(what, "%s wrote memory it must not touch: first at %s holds %.9g, expected the untouched %.9g; %zu "
                    "of %zu such elements changed%s", cf_sides[side].role, at, v, fill, bad, checked,
                    side ? " (the REFERENCE: a harness bug?)" : "");
            ok = 0;
        }
        if (side == 0 && ok) {
            cf_pass(what, "bit-exact (n=%zu)", checked);
        }
    }
    return ok;
}
