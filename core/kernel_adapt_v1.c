// core/kernel_adapt_v1.c: a kernel plugin of ABI 1 behind a v2 table (the loader's adapter).
// defines: dsmoe_kernel_adapt_v1
//
// v1 is synchronous as the host sees it: host outputs are valid when a member returns, and v1
// synchronize() waits for whatever a device plugin still runs. So v2's asynchronous model is trivial
// here: the default queue (the only one: no queue_create) is the in-order stream of v1 calls, an event
// is complete as soon as it is recorded, event_synchronize / event_query / synchronize call v1
// synchronize, and queue_enqueue_host runs fn at once (everything before it has run). What v2 keeps on
// the device and v1 returned to the host (grouped-GEMM counts, gating counts and load-balancing sums,
// sum_squares, all_finite) goes through small host arrays and the v1 copy members; init_tensor computes
// on the host and copies.
//
// Only float32 activations: another dtype is DSMOE_ERR_UNSUPPORTED with a message. The grouped-GEMM
// epilogues are fused here out of v1 calls, in the order the v1 core made them (h = gemm; h += b1;
// act = gelu(h); and dh = 0 + gelu'(h) * da), so a run through the adapter is bitwise a v1 run.
//
// Where v1 cannot meet v2, the adapter says so rather than pretends: alloc() alignment is the v1
// plugin's (>= 64 bytes, not 256) and every buffer comes zeroed whatever the flags; no inference
// members, no mem_info, no convert; a count outside [0, m_max] is found on the host when the counts are
// copied, and returned at once and by every later call (sticky, as v2 wants).
//
// v2 init() gets no table pointer, so each adapted table has its own init: one trampoline per slot of a
// fixed array (DSMOE_ADAPT_V1_SLOTS, 8 adapted kernel plugins loaded at once). Every other member gets
// the context, which holds the v1 table.
#include "plugin_adapt.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/rng.h" // dsmoe_rng_normal, for init_tensor

// ------------------------------------------------------------------------------------------------
// the adapter object, its slot, and the context

typedef struct kadapter {
    dsmoe_plugin_adapter base; // first: what the loader sees
    int slot;
    const dsmoe_kernel_plugin_v1 *v1;
    dsmoe_kernel_plugin_v2 table;
} kadapter;

static dsmoe_adapt_slots slots = DSMOE_ADAPT_SLOTS_INIT;

// What a v2 dsmoe_kernel_ctx * points to when it comes from an adapted table.
typedef struct actx {
    const dsmoe_kernel_plugin_v1 *v1;
    dsmoe_kernel_ctx *in;     // the v1 plugin's own context
    char queue;               // its address is the default queue
    dsmoe_status sticky;      // non-OK after a bad count: returned by every later call
    char error[1024];         // last_error()
    // Host staging, grown on demand.
    int32_t *hi32;            // (cap_i32) counts, or kept and first choices
    size_t cap_i32;
    double *hf64;             // (cap_f64) load-balancing sums
    size_t cap_f64;
    float *hf32;              // (cap_f32) aux gradient, init_tensor values
    size_t cap_f32;
    int *m;                   // (cap_groups) grouped-GEMM rows and the v1 pointer arrays
    const float **a, **b;
    float **c;
    int cap_groups;
    void *scratch;            // (scratch_bytes) device: DGELU's gradient before it replaces c
    size_t scratch_bytes;
} actx;

#define ACTX(ctx) ((actx *)(ctx))

static dsmoe_status fail(actx *x, dsmoe_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static dsmoe_status fail(actx *x, dsmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->error, sizeof x->error, fmt, ap);
    va_end(ap);
    return s;
}

// Keeps the v1 plugin's message when a v1 call fails, so last_error() reports it.
static dsmoe_status v1_status(actx *x, dsmoe_status s) {
    if (s != DSMOE_OK) snprintf(x->error, sizeof x->error, "%s", x->v1->last_error(x->in));
    return s;
}
#define V1(x, member, ...) v1_status((x), (x)->v1->member((x)->in, __VA_ARGS__))
#define TRY(call)                                                                                  \
    do {                                                                                           \
        dsmoe_status try_s_ = (call);                                                              \
        if (try_s_ != DSMOE_OK) return try_s_;                                                     \
    } while (0)
// Every queued member starts here: the context is unusable after a sticky error.
#define ENTER(ctx)                                                                                 \
    actx *x = ACTX(ctx);                                                                           \
    if (x->sticky != DSMOE_OK) return x->sticky
#define NEED_F32(op, dt)                                                                           \
    if ((dt) != DSMOE_FLOAT32) return unsupported(x, (op), (dt))
#define ENTER_F32(ctx, op, dt)                                                                     \
    ENTER(ctx);                                                                                    \
    NEED_F32(op, dt)

static dsmoe_status unsupported(actx *x, const char *op, dsmoe_dtype dt) {
    return fail(x, DSMOE_ERR_UNSUPPORTED,
                "%s: %s: %s data: kernel plugin '%s' speaks ABI 1 (run through an adapter), which has float32 only",
                x->v1->name, op, dsmoe_dtype_name(dt), x->v1->name);
}

// Grows *p to hold n elements of elem bytes (n >= 1 is kept, so a 0-sized request still gets memory).
static dsmoe_status grow(actx *x, void **p, size_t *cap, size_t n, size_t elem, const char *what) {
    if (n < 1) n = 1;
    if (*cap >= n) return DSMOE_OK;
    void *q = realloc(*p, n * elem);
    if (!q) return fail(x, DSMOE_ERR_NOMEM, "kernel v1 adapter: cannot allocate %zu bytes of host %s", n * elem, what);
    *p = q;
    *cap = n;
    return DSMOE_OK;
}

static dsmoe_status grow_groups(actx *x, int groups) {
    if (x->cap_groups >= groups) return DSMOE_OK;
    int n = groups;
    int *m = realloc(x->m, (size_t)n * sizeof *m);
    if (m) x->m = m;
    const float **a = realloc(x->a, (size_t)n * sizeof *a);
    if (a) x->a = a;
    const float **b = realloc(x->b, (size_t)n * sizeof *b);
    if (b) x->b = b;
    float **c = realloc(x->c, (size_t)n * sizeof *c);
    if (c) x->c = c;
    if (!m || !a || !b || !c)
        return fail(x, DSMOE_ERR_NOMEM, "kernel v1 adapter: cannot allocate the group arrays for %d groups", groups);
    x->cap_groups = n;
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// lifecycle

static dsmoe_status adapt_init(int slot, const dsmoe_kernel_options *opt, dsmoe_kernel_ctx **out, char *errbuf,
                               size_t errlen) {
    *out = NULL;
    const dsmoe_kernel_plugin_v1 *v1 = dsmoe_adapt_slot_v1(&slots, slot);
    if (!v1) {
        snprintf(errbuf, errlen, "kernel v1 adapter: init of slot %d, whose plugin was unloaded", slot);
        return DSMOE_ERR_INTERNAL;
    }
    actx *x = calloc(1, sizeof *x);
    if (!x) {
        snprintf(errbuf, errlen, "kernel v1 adapter: cannot allocate a context for plugin '%s'", v1->name);
        return DSMOE_ERR_NOMEM;
    }
    // v1 options are v2's first five members; the logger and settings have no v1 counterpart.
    dsmoe_kernel_options_v1 o1 = {0};
    if (opt)
        o1 = (dsmoe_kernel_options_v1){.threads = opt->threads, .device = opt->device, .verbose = opt->verbose,
                                       .thread_cpus = opt->thread_cpus, .n_thread_cpus = opt->n_thread_cpus};
    dsmoe_status s = v1->init(opt ? &o1 : NULL, &x->in, errbuf, errlen);
    if (s != DSMOE_OK) {
        free(x);
        return s;
    }
    x->v1 = v1;
    *out = (dsmoe_kernel_ctx *)x;
    return DSMOE_OK;
}

#define INIT_SLOT(i)                                                                               \
    static dsmoe_status init_slot_##i(const dsmoe_kernel_options *o, dsmoe_kernel_ctx **c, char *e, size_t n) { \
        return adapt_init(i, o, c, e, n);                                                          \
    }
INIT_SLOT(0) INIT_SLOT(1) INIT_SLOT(2) INIT_SLOT(3) INIT_SLOT(4) INIT_SLOT(5) INIT_SLOT(6) INIT_SLOT(7)
typedef dsmoe_status (*init_fn)(const dsmoe_kernel_options *, dsmoe_kernel_ctx **, char *, size_t);
static const init_fn init_slots[] = {init_slot_0, init_slot_1, init_slot_2, init_slot_3,
                                     init_slot_4, init_slot_5, init_slot_6, init_slot_7};
_Static_assert(sizeof init_slots / sizeof init_slots[0] == DSMOE_ADAPT_V1_SLOTS, "one init trampoline per slot");

static void k_finalize(dsmoe_kernel_ctx *ctx) {
    if (!ctx) return;
    actx *x = ACTX(ctx);
    x->v1->free(x->in, x->scratch);
    x->v1->finalize(x->in);
    free(x->hi32), free(x->hf64), free(x->hf32);
    free(x->m), free(x->a), free(x->b), free(x->c);
    free(x);
}

static const char *k_last_error(dsmoe_kernel_ctx *ctx) {
    return ctx ? ACTX(ctx)->error : "kernel v1 adapter: no context";
}

static const char *k_describe(dsmoe_kernel_ctx *ctx) { return ACTX(ctx)->v1->describe(ACTX(ctx)->in); }

// v1 keeps attention probabilities (B, NH, T, T) for the backward and wants a scratch of the same size.
static dsmoe_status k_attention_bytes(dsmoe_kernel_ctx *ctx, const dsmoe_attention_shape *shape, size_t *saved,
                                      size_t *workspace) {
    if (!shape || !saved || !workspace)
        return ctx ? fail(ACTX(ctx), DSMOE_ERR_INVALID, "attention_bytes: NULL shape or output") : DSMOE_ERR_INVALID;
    if (shape->dt != DSMOE_FLOAT32)
        return ctx ? unsupported(ACTX(ctx), "attention_bytes", shape->dt) : DSMOE_ERR_UNSUPPORTED;
    if (shape->B < 0 || shape->T < 0 || shape->NH < 0)
        return ctx ? fail(ACTX(ctx), DSMOE_ERR_INVALID, "attention_bytes: B=%d T=%d NH=%d: expected >= 0", shape->B,
                          shape->T, shape->NH)
                   : DSMOE_ERR_INVALID;
    *saved = *workspace = (size_t)shape->B * shape->NH * shape->T * shape->T * sizeof(float);
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// queues and events: the default queue, one synchronous stream

static dsmoe_kernel_queue *k_default_queue(dsmoe_kernel_ctx *ctx) { return (dsmoe_kernel_queue *)&ACTX(ctx)->queue; }

static void *k_queue_native(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) { return NULL; }

static dsmoe_status k_queue_enqueue_host(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void (*fn)(void *arg),
                                         void *arg) {
    ENTER(ctx);
    if (!fn) return fail(x, DSMOE_ERR_INVALID, "queue_enqueue_host: NULL fn");
    fn(arg);
    return DSMOE_OK;
}

static dsmoe_status k_synchronize(dsmoe_kernel_ctx *ctx) {
    ENTER(ctx);
    return v1_status(x, x->v1->synchronize(x->in));
}

static dsmoe_status k_queue_synchronize(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) { return k_synchronize(ctx); }

static dsmoe_status k_event_create(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event **ev) {
    ENTER(ctx);
    *ev = malloc(1);
    return *ev ? DSMOE_OK : fail(x, DSMOE_ERR_NOMEM, "kernel v1 adapter: event_create: out of memory");
}

static void k_event_destroy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev) { free(ev); }

static dsmoe_status k_event_record(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, dsmoe_kernel_queue *q) {
    ENTER(ctx);
    return DSMOE_OK;
}

static dsmoe_status k_queue_wait_event(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, dsmoe_kernel_event *ev) {
    ENTER(ctx);
    return DSMOE_OK;
}

static dsmoe_status k_event_synchronize(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev) { return k_synchronize(ctx); }

// Blocks in v1 synchronize (a v1 device plugin has no way to ask without waiting), then reports done.
static dsmoe_status k_event_query(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, int *done) {
    *done = 0;
    TRY(k_synchronize(ctx));
    *done = 1;
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// memory

// flags are ignored: v1 alloc always zeroes.
static dsmoe_status k_alloc(dsmoe_kernel_ctx *ctx, size_t bytes, uint32_t flags, void **ptr) {
    ENTER(ctx);
    return V1(x, alloc, bytes, ptr);
}

static void k_free(dsmoe_kernel_ctx *ctx, void *ptr) { ACTX(ctx)->v1->free(ACTX(ctx)->in, ptr); }

static dsmoe_status k_host_alloc(dsmoe_kernel_ctx *ctx, size_t bytes, void **ptr) {
    ENTER(ctx);
    size_t rounded = bytes == 0 ? 64 : (bytes + 63) & ~(size_t)63;
    *ptr = rounded < bytes ? NULL : aligned_alloc(64, rounded);
    if (!*ptr) return fail(x, DSMOE_ERR_NOMEM, "kernel v1 adapter: host_alloc: cannot allocate %zu bytes", bytes);
    return DSMOE_OK;
}

static void k_host_free(dsmoe_kernel_ctx *ctx, void *ptr) { free(ptr); }

static dsmoe_status k_copy_to_device(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src,
                                     size_t bytes) {
    ENTER(ctx);
    return V1(x, copy_to_device, dst, src, bytes);
}

static dsmoe_status k_copy_to_host(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src,
                                   size_t bytes) {
    ENTER(ctx);
    return V1(x, copy_to_host, dst, src, bytes);
}

static dsmoe_status k_copy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes) {
    ENTER(ctx);
    return V1(x, copy, dst, src, bytes);
}

// Row by row with v1 copy, or one copy when both sides are contiguous.
static dsmoe_status k_copy_2d(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t dpitch, const void *src,
                              size_t spitch, size_t width, size_t rows) {
    ENTER(ctx);
    if (width == 0 || rows == 0) return DSMOE_OK;
    if (dpitch < width || spitch < width)
        return fail(x, DSMOE_ERR_INVALID, "copy_2d: dpitch=%zu spitch=%zu: expected both >= width=%zu", dpitch, spitch,
                    width);
    if (dpitch == width && spitch == width) return V1(x, copy, dst, src, width * rows);
    for (size_t r = 0; r < rows; r++)
        TRY(V1(x, copy, (char *)dst + r * dpitch, (const char *)src + r * spitch, width));
    return DSMOE_OK;
}

static dsmoe_status k_zero(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t bytes) {
    ENTER(ctx);
    return V1(x, zero, dst, bytes);
}

// ------------------------------------------------------------------------------------------------
// GEMM

static dsmoe_status k_gemm(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, int trans_a, int trans_b, int m, int n, int k,
                           float alpha, const void *a, dsmoe_dtype a_type, int lda, const void *b, dsmoe_dtype b_type,
                           int ldb, float beta, void *c, dsmoe_dtype c_type, int ldc) {
    ENTER(ctx);
    NEED_F32("gemm", a_type);
    NEED_F32("gemm", b_type);
    NEED_F32("gemm", c_type);
    return V1(x, gemm, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// x->m (groups) = the device counts, each checked against [0, m_max] (a bad one is sticky).
static dsmoe_status fetch_counts(actx *x, const char *op, const int32_t *counts, int groups, int m_max) {
    TRY(grow_groups(x, groups));
    TRY(grow(x, (void **)&x->hi32, &x->cap_i32, (size_t)groups, sizeof(int32_t), "counts"));
    TRY(V1(x, copy_to_host, x->hi32, counts, (size_t)groups * sizeof(int32_t)));
    for (int g = 0; g < groups; g++) {
        if (x->hi32[g] < 0 || x->hi32[g] > m_max) {
            x->sticky = DSMOE_ERR_INVALID;
            return fail(x, DSMOE_ERR_INVALID, "%s: counts[%d] = %d: expected 0 <= count <= m_max = %d", op, g,
                        (int)x->hi32[g], m_max);
        }
        x->m[g] = x->hi32[g];
    }
    return DSMOE_OK;
}

static dsmoe_status ensure_scratch(actx *x, size_t bytes) {
    if (x->scratch && x->scratch_bytes >= bytes) return DSMOE_OK;
    x->v1->free(x->in, x->scratch);
    x->scratch = NULL;
    x->scratch_bytes = 0;
    TRY(V1(x, alloc, bytes, &x->scratch));
    x->scratch_bytes = bytes;
    return DSMOE_OK;
}

// The epilogue on group gi's `rows` rows: one v1 call per op when the rows are contiguous (ldc == n),
// else one per row. The v1 core's order: BIAS_GELU is c += b; aux = c; c = gelu(aux). DGELU is
// scratch = 0; scratch += gelu'(aux) * c; c = scratch (v1 gelu_backward accumulates, and c is its input).
static dsmoe_status epilogue(actx *x, const dsmoe_grouped_gemm *g, int gi, int rows) {
    int n = g->n, w = gi % g->b_groups, whole = g->ldc == n;
    int blocks = whole ? 1 : rows, brows = whole ? rows : 1;
    size_t belems = (size_t)brows * n, bbytes = belems * sizeof(float);
    float *c = (float *)g->c + (size_t)gi * g->c_stride;
    float *aux = g->aux ? (float *)g->aux + (size_t)gi * g->c_stride : NULL;
    const float *bias = g->bias ? g->bias + (size_t)w * g->bias_stride : NULL;
    if (g->epilogue == DSMOE_EPI_DGELU) TRY(ensure_scratch(x, bbytes));
    for (int r = 0; r < blocks; r++) {
        float *cb = c + (size_t)r * g->ldc, *ab = aux ? aux + (size_t)r * g->ldc : NULL;
        switch (g->epilogue) {
        case DSMOE_EPI_NONE: break;
        case DSMOE_EPI_BIAS: TRY(V1(x, bias_add, cb, bias, brows, n)); break;
        case DSMOE_EPI_BIAS_GELU:
            TRY(V1(x, bias_add, cb, bias, brows, n));
            TRY(V1(x, copy, ab, cb, bbytes));
            TRY(V1(x, gelu_forward, cb, ab, belems));
            break;
        case DSMOE_EPI_DGELU:
            TRY(V1(x, zero, x->scratch, bbytes));
            TRY(V1(x, gelu_backward, x->scratch, ab, cb, belems));
            TRY(V1(x, copy, cb, x->scratch, bbytes));
            break;
        }
    }
    return DSMOE_OK;
}

static dsmoe_status k_gemm_grouped(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_gemm *g) {
    ENTER(ctx);
    if (!g) return fail(x, DSMOE_ERR_INVALID, "gemm_grouped: NULL descriptor");
    NEED_F32("gemm_grouped", g->a_type);
    NEED_F32("gemm_grouped", g->b_type);
    NEED_F32("gemm_grouped", g->c_type);
    if (g->groups < 0 || g->m_max < 0 || (g->groups > 0 && g->b_groups < 1))
        return fail(x, DSMOE_ERR_INVALID, "gemm_grouped: groups=%d m_max=%d b_groups=%d: expected groups, m_max >= 0 "
                    "and b_groups >= 1", g->groups, g->m_max, g->b_groups);
    if (g->epilogue < DSMOE_EPI_NONE || g->epilogue > DSMOE_EPI_DGELU)
        return fail(x, DSMOE_ERR_INVALID, "gemm_grouped: epilogue %d: expected a dsmoe_epilogue", (int)g->epilogue);
    int needs_bias = g->epilogue == DSMOE_EPI_BIAS || g->epilogue == DSMOE_EPI_BIAS_GELU;
    int needs_aux = g->epilogue == DSMOE_EPI_BIAS_GELU || g->epilogue == DSMOE_EPI_DGELU;
    if ((needs_bias && !g->bias) || (needs_aux && !g->aux))
        return fail(x, DSMOE_ERR_INVALID, "gemm_grouped: epilogue %d without its %s", (int)g->epilogue,
                    needs_bias && !g->bias ? "bias" : "aux buffer");
    if (g->groups == 0) return DSMOE_OK;
    TRY(fetch_counts(x, "gemm_grouped", g->counts, g->groups, g->m_max));
    for (int gi = 0; gi < g->groups; gi++) {
        x->a[gi] = (const float *)g->a + (size_t)gi * g->a_stride;
        x->b[gi] = (const float *)g->b + (size_t)(gi % g->b_groups) * g->b_stride;
        x->c[gi] = (float *)g->c + (size_t)gi * g->c_stride;
    }
    TRY(V1(x, gemm_grouped, g->groups, 0, g->trans_b, x->m, g->n, g->k, g->alpha, x->a, g->lda, x->b, g->ldb, g->beta,
           x->c, g->ldc));
    if (g->epilogue == DSMOE_EPI_NONE) return DSMOE_OK;
    for (int gi = 0; gi < g->groups; gi++)
        if (x->m[gi] > 0) TRY(epilogue(x, g, gi, x->m[gi]));
    return DSMOE_OK;
}

// One v1 call per group in ascending g (groups sharing a weight add in that order), then the bias.
static dsmoe_status k_gemm_grouped_wgrad(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_grouped_wgrad *g) {
    ENTER(ctx);
    if (!g) return fail(x, DSMOE_ERR_INVALID, "gemm_grouped_wgrad: NULL descriptor");
    NEED_F32("gemm_grouped_wgrad", g->dy_type);
    NEED_F32("gemm_grouped_wgrad", g->x_type);
    if (g->groups < 0 || g->m_max < 0 || (g->groups > 0 && g->b_groups < 1))
        return fail(x, DSMOE_ERR_INVALID, "gemm_grouped_wgrad: groups=%d m_max=%d b_groups=%d: expected groups, "
                    "m_max >= 0 and b_groups >= 1", g->groups, g->m_max, g->b_groups);
    if (g->groups == 0) return DSMOE_OK;
    TRY(fetch_counts(x, "gemm_grouped_wgrad", g->counts, g->groups, g->m_max));
    for (int gi = 0; gi < g->groups; gi++) {
        int rows = x->m[gi], w = gi % g->b_groups;
        if (rows == 0) continue;
        const float *dy = (const float *)g->dy + (size_t)gi * g->dy_stride;
        const float *xs = (const float *)g->x + (size_t)gi * g->x_stride;
        float *dw = g->dw + (size_t)w * g->dw_stride;
        TRY(V1(x, gemm_grouped_wgrad, 1, &rows, g->n, g->k, g->alpha, &dy, &xs, &dw));
        if (g->dbias) TRY(V1(x, bias_backward, g->dbias + (size_t)w * g->dbias_stride, dy, rows, g->n));
    }
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// element-wise and small ops

static dsmoe_status k_bias_add(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt,
                               const float *bias, int rows, int n) {
    ENTER_F32(ctx, "bias_add", dt);
    return V1(x, bias_add, out, bias, rows, n);
}

static dsmoe_status k_bias_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dbias, const void *dout,
                                    dsmoe_dtype dt, int rows, int n) {
    ENTER_F32(ctx, "bias_backward", dt);
    return V1(x, bias_backward, dbias, dout, rows, n);
}

static dsmoe_status k_axpy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *y, float alpha, const void *xs,
                           dsmoe_dtype dt, size_t n) {
    ENTER_F32(ctx, "axpy", dt);
    return V1(x, axpy, y, alpha, xs, n);
}

static dsmoe_status k_mul_uniform_noise(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in,
                                        dsmoe_dtype dt, size_t n, float eps, uint64_t seed, uint64_t offset) {
    ENTER_F32(ctx, "mul_uniform_noise", dt);
    return V1(x, mul_uniform_noise, out, in, n, eps, seed, offset);
}

static dsmoe_status k_sum_squares(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const float *xs, size_t n,
                                  double *out) {
    ENTER(ctx);
    double h = 0.0;
    TRY(V1(x, sum_squares, xs, n, &h));
    return V1(x, copy_to_device, out, &h, sizeof h);
}

static dsmoe_status k_all_finite(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const void *xs, dsmoe_dtype dt,
                                 size_t n, int32_t *out) {
    ENTER_F32(ctx, "all_finite", dt);
    int h = 0;
    TRY(V1(x, all_finite, xs, n, &h));
    int32_t v = h;
    return V1(x, copy_to_device, out, &v, sizeof v);
}

// On the host in pieces, then copied: the values are dsmoe/rng.h's host code, as v2 asks.
#define INIT_PIECE 65536
static dsmoe_status k_init_tensor(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dst, size_t n,
                                  const dsmoe_init_params *p) {
    ENTER(ctx);
    if (!p) return fail(x, DSMOE_ERR_INVALID, "init_tensor: NULL params");
    if (n == 0) return DSMOE_OK;
    TRY(grow(x, (void **)&x->hf32, &x->cap_f32, n < INIT_PIECE ? n : INIT_PIECE, sizeof(float), "init values"));
    for (size_t i0 = 0; i0 < n; i0 += INIT_PIECE) {
        size_t len = n - i0 < INIT_PIECE ? n - i0 : INIT_PIECE;
        for (size_t i = 0; i < len; i++)
            x->hf32[i] = p->std > 0.0f ? p->std * dsmoe_rng_normal(p->key, p->offset + i0 + i) : p->value;
        TRY(V1(x, copy_to_device, dst + i0, x->hf32, len * sizeof(float)));
    }
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// the GPT layer ops: straight through (v1 cannot check a token against V on the device; it checks >= 0)

static dsmoe_status k_embedding_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, dsmoe_dtype dt,
                                        const int32_t *tokens, const float *wte, const float *wpe, int B, int T, int M,
                                        int V) {
    ENTER_F32(ctx, "embedding_forward", dt);
    return V1(x, embedding_forward, out, tokens, wte, wpe, B, T, M);
}

static dsmoe_status k_embedding_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *dwte, float *dwpe,
                                         const void *dout, dsmoe_dtype dt, const int32_t *tokens, int B, int T, int M,
                                         int V) {
    ENTER_F32(ctx, "embedding_backward", dt);
    return V1(x, embedding_backward, dwte, dwpe, dout, tokens, B, T, M, V);
}

static dsmoe_status k_layernorm_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *mean,
                                        float *rstd, const void *in, dsmoe_dtype dt, const float *weight,
                                        const float *bias, int S, int M, float eps) {
    ENTER_F32(ctx, "layernorm_forward", dt);
    return V1(x, layernorm_forward, out, mean, rstd, in, weight, bias, S, M, eps);
}

static dsmoe_status k_layernorm_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, float *dweight,
                                         float *dbias, const void *dout, const void *in, dsmoe_dtype dt,
                                         const float *weight, const float *mean, const float *rstd, int S, int M) {
    ENTER_F32(ctx, "layernorm_backward", dt);
    return V1(x, layernorm_backward, din, dweight, dbias, dout, in, weight, mean, rstd, S, M);
}

static dsmoe_status k_gelu_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *in,
                                   dsmoe_dtype dt, size_t n) {
    ENTER_F32(ctx, "gelu_forward", dt);
    return V1(x, gelu_forward, out, in, n);
}

static dsmoe_status k_gelu_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *din, const void *in,
                                    const void *dout, dsmoe_dtype dt, size_t n) {
    ENTER_F32(ctx, "gelu_backward", dt);
    return V1(x, gelu_backward, din, in, dout, n);
}

// saved = v1's att (B, NH, T, T) probabilities; workspace = v1's scratch of the same size.
static dsmoe_status k_attention_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, void *saved,
                                        const void *qkv, const dsmoe_attention_shape *s) {
    ENTER(ctx);
    if (!s) return fail(x, DSMOE_ERR_INVALID, "attention_forward: NULL shape");
    NEED_F32("attention_forward", s->dt);
    return V1(x, attention_forward, out, saved, qkv, s->B, s->T, s->M, s->NH);
}

static dsmoe_status k_attention_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dqkv, void *workspace,
                                         const void *dout, const void *qkv, const void *out, const void *saved,
                                         const dsmoe_attention_shape *s) {
    ENTER(ctx);
    if (!s) return fail(x, DSMOE_ERR_INVALID, "attention_backward: NULL shape");
    NEED_F32("attention_backward", s->dt);
    return V1(x, attention_backward, dqkv, workspace, dout, qkv, saved, s->B, s->T, s->M, s->NH);
}

static dsmoe_status k_crossentropy_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *losses, float *probs,
                                           const void *logits, dsmoe_dtype dt, const int32_t *targets, int S, int V) {
    ENTER_F32(ctx, "crossentropy_forward", dt);
    return V1(x, crossentropy_forward, losses, probs, logits, targets, S, V);
}

static dsmoe_status k_crossentropy_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dlogits,
                                            dsmoe_dtype dt, const float *probs, const int32_t *targets, float dloss,
                                            int S, int V) {
    ENTER_F32(ctx, "crossentropy_backward", dt);
    return V1(x, crossentropy_backward, dlogits, probs, targets, dloss, S, V);
}

// ------------------------------------------------------------------------------------------------
// gating: v1 returns counts and sums to the host; v2 keeps them on the device

static dsmoe_status k_gate_route(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                                 const float *logits, float *probs, int32_t *choice, int32_t *counts) {
    ENTER(ctx);
    if (!p) return fail(x, DSMOE_ERR_INVALID, "gate_route: NULL gating params");
    size_t E = p->E > 0 ? (size_t)p->E : 0;
    TRY(grow(x, (void **)&x->hi32, &x->cap_i32, E, sizeof(int32_t), "counts"));
    TRY(V1(x, gate_route, p, logits, probs, choice, x->hi32));
    return V1(x, copy_to_device, counts, x->hi32, E * sizeof(int32_t));
}

// aux_sums (2E + 1) = [P (v1's prob sums), N (v1's first-choice counts, as double), S], as the v1 core
// assembled them before reducing.
static dsmoe_status k_gate_assign(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p, int C,
                                  const float *probs, const int32_t *choice, int32_t *slot, float *weight,
                                  int32_t *kept, double *aux_sums) {
    ENTER(ctx);
    if (!p) return fail(x, DSMOE_ERR_INVALID, "gate_assign: NULL gating params");
    size_t E = p->E > 0 ? (size_t)p->E : 0;
    TRY(grow(x, (void **)&x->hi32, &x->cap_i32, 2 * E, sizeof(int32_t), "kept counts"));
    TRY(grow(x, (void **)&x->hf64, &x->cap_f64, 2 * E + 1, sizeof(double), "load-balancing sums"));
    int32_t *hkept = x->hi32, *hfirst = x->hi32 + E;
    double *v = x->hf64;
    TRY(V1(x, gate_assign, p, C, probs, choice, slot, weight, hkept, v, hfirst));
    for (size_t e = 0; e < E; e++) v[E + e] = hfirst[e];
    v[2 * E] = p->S;
    TRY(V1(x, copy_to_device, kept, hkept, E * sizeof(int32_t)));
    return V1(x, copy_to_device, aux_sums, v, (2 * E + 1) * sizeof(double));
}

// v1 wants d(l_aux)/d probs[s,e] per expert on the host: the v1 core's formula on the reduced sums.
static dsmoe_status k_gate_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_gating_params *p,
                                    float *dlogits, const float *probs, const int32_t *choice, const int32_t *slot,
                                    const float *dweight, const double *aux_sums, float daux) {
    ENTER(ctx);
    if (!p) return fail(x, DSMOE_ERR_INVALID, "gate_backward: NULL gating params");
    int E = p->E > 0 ? p->E : 0;
    TRY(grow(x, (void **)&x->hf64, &x->cap_f64, 2 * (size_t)E + 1, sizeof(double), "load-balancing sums"));
    TRY(grow(x, (void **)&x->hf32, &x->cap_f32, (size_t)E, sizeof(float), "aux gradient"));
    const double *v = x->hf64;
    TRY(V1(x, copy_to_host, x->hf64, aux_sums, (2 * (size_t)E + 1) * sizeof(double)));
    double St = v[2 * E];
    for (int e = 0; e < E; e++) x->hf32[e] = St > 0.0 ? (float)((double)daux * E * v[E + e] / (St * St)) : 0.0f;
    return V1(x, gate_backward, p, dlogits, probs, choice, slot, dweight, x->hf32);
}

static dsmoe_status k_moe_dispatch(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *buf, const void *xs,
                                   dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, int S, int K, int E,
                                   int C, int M) {
    ENTER_F32(ctx, "moe_dispatch", dt);
    return V1(x, moe_dispatch, buf, xs, choice, slot, S, K, E, C, M);
}

static dsmoe_status k_moe_dispatch_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dx, const void *dbuf,
                                            dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, int S, int K,
                                            int E, int C, int M) {
    ENTER_F32(ctx, "moe_dispatch_backward", dt);
    return V1(x, moe_dispatch_backward, dx, dbuf, choice, slot, S, K, E, C, M);
}

static dsmoe_status k_moe_combine(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, const void *y,
                                  dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, const float *weight,
                                  int S, int K, int E, int C, int M) {
    ENTER_F32(ctx, "moe_combine", dt);
    return V1(x, moe_combine, out, y, choice, slot, weight, S, K, E, C, M);
}

static dsmoe_status k_moe_combine_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dy, float *dweight,
                                           const void *dout, const void *y, dsmoe_dtype dt, const int32_t *choice,
                                           const int32_t *slot, const float *weight, int S, int K, int E, int C,
                                           int M) {
    ENTER_F32(ctx, "moe_combine_backward", dt);
    return V1(x, moe_combine_backward, dy, dweight, dout, y, choice, slot, weight, S, K, E, C, M);
}

static dsmoe_status k_residual_mix_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *out, float *coef,
                                           const void *moe, const void *mlp, dsmoe_dtype dt, const float *coef_logits,
                                           int S, int M) {
    ENTER_F32(ctx, "residual_mix_forward", dt);
    return V1(x, residual_mix_forward, out, coef, moe, mlp, coef_logits, S, M);
}

static dsmoe_status k_residual_mix_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dmoe, void *dmlp,
                                            float *dcoef_logits, const void *dout, const void *moe, const void *mlp,
                                            dsmoe_dtype dt, const float *coef, int S, int M) {
    ENTER_F32(ctx, "residual_mix_backward", dt);
    return V1(x, residual_mix_backward, dmoe, dmlp, dcoef_logits, dout, moe, mlp, coef, S, M);
}

// One v1 adamw_update per tensor, in list order.
static dsmoe_status k_adamw(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, const dsmoe_adamw_params *hp,
                            const dsmoe_adamw_tensor *tensors, int n) {
    ENTER(ctx);
    if (!hp || n < 0 || (n > 0 && !tensors))
        return fail(x, DSMOE_ERR_INVALID, "adamw: NULL hyper-parameters or tensor list, or n=%d < 0", n);
    for (int i = 0; i < n; i++) {
        const dsmoe_adamw_tensor *t = &tensors[i];
        TRY(V1(x, adamw_update, t->param, t->grad, t->m, t->v, t->n, hp->lr, hp->beta1, hp->beta2, hp->eps,
               t->weight_decay, hp->grad_scale, hp->t));
    }
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// the adapted table

static void release(dsmoe_plugin_adapter *self) {
    kadapter *a = (kadapter *)self;
    dsmoe_adapt_slot_release(&slots, a->slot, a);
    free(a);
}

dsmoe_status dsmoe_kernel_adapt_v1(const dsmoe_kernel_plugin_v1 *v1, const dsmoe_kernel_plugin_v2 **table,
                                   dsmoe_plugin_adapter **adapter, char *errbuf, size_t errlen) {
    *table = NULL;
    *adapter = NULL;
    kadapter *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(errbuf, errlen, "out of memory for the adapter");
        return DSMOE_ERR_NOMEM;
    }
    int slot = dsmoe_adapt_slot_claim(&slots, a, v1);
    if (slot < 0) {
        free(a);
        snprintf(errbuf, errlen, "%d kernel plugins of ABI 1 are loaded already, the most the adapter runs at once "
                 "(DSMOE_ADAPT_V1_SLOTS); unload one first", DSMOE_ADAPT_V1_SLOTS);
        return DSMOE_ERR_UNSUPPORTED;
    }
    a->base.release = release;
    a->slot = slot;
    a->v1 = v1;
    a->table = (dsmoe_kernel_plugin_v2){
        .api_version = DSMOE_KERNEL_API_VERSION,
        .name = v1->name,
        .description = v1->description,
        .mem_kind = v1->mem_kind,
        // The adapter fuses the epilogues; v1 promised thread-count-independent, fixed-order reductions.
        // No HOST_MEMORY: v1 never promised the host may touch its buffers.
        .caps = DSMOE_KCAP_FUSED_EPILOGUE | DSMOE_KCAP_DETERMINISTIC,
        .dtypes = DSMOE_DTYPE_BIT(DSMOE_FLOAT32),
        .params = NULL,
        .n_params = 0,

        .init = init_slots[slot],
        .finalize = k_finalize,
        .last_error = k_last_error,
        .describe = k_describe,
        .device_count = v1->device_count, // the same signatures, callable before init in both versions
        .device_pci_bus_id = v1->device_pci_bus_id,
        .mem_info = NULL,
        .attention_bytes = k_attention_bytes,

        .default_queue = k_default_queue,
        .queue_create = NULL, // the default queue only: every call has run when it returns anyway
        .queue_destroy = NULL,
        .queue_native = k_queue_native,
        .queue_enqueue_host = k_queue_enqueue_host,
        .queue_synchronize = k_queue_synchronize,
        .synchronize = k_synchronize,
        .event_create = k_event_create,
        .event_destroy = k_event_destroy,
        .event_record = k_event_record,
        .queue_wait_event = k_queue_wait_event,
        .event_synchronize = k_event_synchronize,
        .event_query = k_event_query,

        .alloc = k_alloc,
        .free = k_free,
        .host_alloc = k_host_alloc,
        .host_free = k_host_free,
        .copy_to_device = k_copy_to_device,
        .copy_to_host = k_copy_to_host,
        .copy = k_copy,
        .copy_2d = k_copy_2d,
        .zero = k_zero,

        .gemm = k_gemm,
        .gemm_grouped = k_gemm_grouped,
        .gemm_grouped_wgrad = k_gemm_grouped_wgrad,

        .bias_add = k_bias_add,
        .bias_backward = k_bias_backward,
        .axpy = k_axpy,
        .mul_uniform_noise = k_mul_uniform_noise,
        .sum_squares = k_sum_squares,
        .all_finite = k_all_finite,
        .convert = NULL,
        .init_tensor = k_init_tensor,

        .embedding_forward = k_embedding_forward,
        .embedding_backward = k_embedding_backward,
        .layernorm_forward = k_layernorm_forward,
        .layernorm_backward = k_layernorm_backward,
        .gelu_forward = k_gelu_forward,
        .gelu_backward = k_gelu_backward,
        .attention_forward = k_attention_forward,
        .attention_backward = k_attention_backward,
        .crossentropy_forward = k_crossentropy_forward,
        .crossentropy_backward = k_crossentropy_backward,

        .gate_route = k_gate_route,
        .gate_assign = k_gate_assign,
        .gate_backward = k_gate_backward,
        .moe_dispatch = k_moe_dispatch,
        .moe_dispatch_backward = k_moe_dispatch_backward,
        .moe_combine = k_moe_combine,
        .moe_combine_backward = k_moe_combine_backward,

        .residual_mix_forward = k_residual_mix_forward,
        .residual_mix_backward = k_residual_mix_backward,

        .adamw = k_adamw,
        // No inference members (and no DSMOE_KCAP_INFERENCE): v1 has no KV cache or sampling.
    };
    *table = &a->table;
    *adapter = &a->base;
    return DSMOE_OK;
}
