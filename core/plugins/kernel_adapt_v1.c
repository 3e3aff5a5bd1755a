// core/plugins/kernel_adapt_v1.c: a kernel plugin of ABI 1 behind a v3 table (the loader's adapter).
// defines: dsmoe_kernel_adapt_v1 (the compute members are in kernel_adapt_v1_ops.c)
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
// members, no mem_info, no convert. Bad data is returned at once and by every later call (sticky, as v2
// wants): a count outside [0, m_max] or a token id outside [0, V) is found on a host copy (v1's
// embedding_forward is not told V), and an error a v1 member that reads token ids, targets or a routing
// table reports after the adapter's own argument checks (kernel_adapt_v1_ops.c).
//
// v2 init() gets no table pointer, so each adapted table has its own init: one trampoline per slot of a
// fixed array (DSMOE_ADAPT_V1_SLOTS, 8 adapted kernel plugins loaded at once). Every other member gets
// the context, which holds the v1 table.
#include "kernel_adapt_v1.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ------------------------------------------------------------------------------------------------
// the adapter object, its slot, and the context

typedef struct kadapter {
    dsmoe_plugin_adapter base; // first: what the loader sees
    int slot;
    const dsmoe_kernel_plugin_v1 *v1;
    dsmoe_kernel_plugin_v3 table;
} kadapter;

static dsmoe_adapt_slots slots = DSMOE_ADAPT_SLOTS_INIT;

// ------------------------------------------------------------------------------------------------
// helpers shared with kernel_adapt_v1_ops.c (kernel_adapt_v1.h)

dsmoe_status kav1_fail(actx *x, dsmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->error, sizeof x->error, fmt, ap);
    va_end(ap);
    return s;
}

// Keeps the v1 plugin's message when a v1 call fails, so last_error() reports it.
dsmoe_status kav1_v1_status(actx *x, dsmoe_status s) {
    if (s != DSMOE_OK) snprintf(x->error, sizeof x->error, "%s", x->v1->last_error(x->in));
    return s;
}

dsmoe_status kav1_unsupported(actx *x, const char *op, dsmoe_dtype dt) {
    return kav1_fail(x, DSMOE_ERR_UNSUPPORTED,
                "%s: %s: %s data: kernel plugin '%s' speaks ABI 1 (run through an adapter), which has float32 only",
                x->v1->name, op, dsmoe_dtype_name(dt), x->v1->name);
}

// Grows *p to hold n elements of elem bytes (n >= 1 is kept, so a 0-sized request still gets memory).
dsmoe_status kav1_grow(actx *x, void **p, size_t *cap, size_t n, size_t elem, const char *what) {
    if (n < 1) n = 1;
    if (*cap >= n) return DSMOE_OK;
    void *q = realloc(*p, n * elem);
    if (!q) return kav1_fail(x, DSMOE_ERR_NOMEM, "kernel v1 adapter: cannot allocate %zu bytes of host %s", n * elem, what);
    *p = q;
    *cap = n;
    return DSMOE_OK;
}

dsmoe_status kav1_grow_groups(actx *x, int groups) {
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
        return kav1_fail(x, DSMOE_ERR_NOMEM, "kernel v1 adapter: cannot allocate the group arrays for %d groups", groups);
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
        return ctx ? kav1_fail(ACTX(ctx), DSMOE_ERR_INVALID, "attention_bytes: NULL shape or output") : DSMOE_ERR_INVALID;
    if (shape->dt != DSMOE_FLOAT32)
        return ctx ? kav1_unsupported(ACTX(ctx), "attention_bytes", shape->dt) : DSMOE_ERR_UNSUPPORTED;
    if (shape->B < 0 || shape->T < 0 || shape->NH < 0)
        return ctx ? kav1_fail(ACTX(ctx), DSMOE_ERR_INVALID, "attention_bytes: B=%d T=%d NH=%d: expected >= 0", shape->B,
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
    if (!fn) return kav1_fail(x, DSMOE_ERR_INVALID, "queue_enqueue_host: NULL fn");
    fn(arg);
    return DSMOE_OK;
}

static dsmoe_status k_synchronize(dsmoe_kernel_ctx *ctx) {
    ENTER(ctx);
    return kav1_v1_status(x, x->v1->synchronize(x->in));
}

static dsmoe_status k_queue_synchronize(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) { return k_synchronize(ctx); }

static dsmoe_status k_event_create(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event **ev) {
    ENTER(ctx);
    *ev = malloc(1);
    return *ev ? DSMOE_OK : kav1_fail(x, DSMOE_ERR_NOMEM, "kernel v1 adapter: event_create: out of memory");
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
    if (!*ptr) return kav1_fail(x, DSMOE_ERR_NOMEM, "kernel v1 adapter: host_alloc: cannot allocate %zu bytes", bytes);
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
        return kav1_fail(x, DSMOE_ERR_INVALID, "copy_2d: dpitch=%zu spitch=%zu: expected both >= width=%zu", dpitch, spitch,
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
// the adapted table

static void release(dsmoe_plugin_adapter *self) {
    kadapter *a = (kadapter *)self;
    dsmoe_adapt_slot_release(&slots, a->slot, a);
    free(a);
}

dsmoe_status dsmoe_kernel_adapt_v1(const dsmoe_kernel_plugin_v1 *v1, const dsmoe_kernel_plugin_v3 **table,
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
    a->table = (dsmoe_kernel_plugin_v3){
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

        // No inference members (and no DSMOE_KCAP_INFERENCE): v1 has no KV cache or sampling.
    };
    kav1_fill_ops(&a->table);
    *table = &a->table;
    *adapter = &a->base;
    return DSMOE_OK;
}
