// tests/plugins/kernel/strict/strict_mem.c: the strict plugin's memory. Every buffer is its own anonymous
// mapping (page-aligned, so >= 256-byte alignment holds), kept in a table sorted by address so that an
// op's pointers can be checked and the bytes it touches found. The pages of device buffers (alloc) are
// PROT_NONE while work on them is queued (strict_protect.c); host buffers (host_alloc) never are. Unzeroed and freed memory is filled with 0xFF bytes (NaN in every float type, -1 in
// the integer ones), so results computed from memory nobody wrote show up.
// defines: strict_find, strict_release, strict_release_all, strict_fill_mem_members
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "strict_internal.h"

// ---------------------------------------------------------------------------------------------------
// The allocation table

// Index of the first allocation whose base is > p.
static int upper_bound(const dsmoe_kernel_ctx *c, const void *p) {
    int lo = 0, hi = c->n_allocs;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if ((const char *)c->allocs[mid]->base <= (const char *)p) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// The allocation holding p; its end counts (p + bytes of an empty view), unless the next one starts there.
strict_alloc *strict_find(dsmoe_kernel_ctx *c, const void *p) {
    int i = upper_bound(c, p) - 1;
    if (i < 0) return NULL;
    strict_alloc *a = c->allocs[i];
    return (size_t)((const char *)p - a->base) <= a->bytes ? a : NULL;
}

static dsmoe_status table_insert(dsmoe_kernel_ctx *c, strict_alloc *a) {
    if (c->n_allocs == c->cap_allocs) {
        int cap = c->cap_allocs ? 2 * c->cap_allocs : 64;
        strict_alloc **t = realloc(c->allocs, (size_t)cap * sizeof *t);
        if (!t) return DSMOE_ERR_NOMEM;
        c->allocs = t;
        c->cap_allocs = cap;
    }
    int i = upper_bound(c, a->base);
    memmove(c->allocs + i + 1, c->allocs + i, (size_t)(c->n_allocs - i) * sizeof *c->allocs);
    c->allocs[i] = a;
    c->n_allocs++;
    return DSMOE_OK;
}

static void table_remove(dsmoe_kernel_ctx *c, strict_alloc *a) {
    int i = upper_bound(c, a->base) - 1;
    if (i < 0 || c->allocs[i] != a) return;
    memmove(c->allocs + i, c->allocs + i + 1, (size_t)(c->n_allocs - i - 1) * sizeof *c->allocs);
    c->n_allocs--;
}

static void free_record(strict_alloc *a) {
    free(a->page_pending);
    free(a->page_open);
    free(a);
}

// Poisons and unmaps a buffer nothing refers to any more (freed, and no queued op uses it).
void strict_release(dsmoe_kernel_ctx *c, strict_alloc *a) {
    table_remove(c, a);
    if (a->host || !c->protect || mprotect(a->base, a->map_bytes, PROT_READ | PROT_WRITE) == 0)
        memset(a->base, STRICT_POISON, a->map_bytes); // a stale pointer into a recycled mapping reads NaN
    munmap(a->base, a->map_bytes);
    free_record(a);
}

void strict_release_all(dsmoe_kernel_ctx *c) {
    for (int i = 0; i < c->n_allocs; i++) {
        munmap(c->allocs[i]->base, c->allocs[i]->map_bytes);
        free_record(c->allocs[i]);
    }
    free(c->allocs);
    c->allocs = NULL;
    c->n_allocs = c->cap_allocs = 0;
}

// ---------------------------------------------------------------------------------------------------
// alloc, free, host_alloc, host_free

static dsmoe_status map_new(dsmoe_kernel_ctx *c, const char *name, size_t bytes, int host, int zero, void **ptr) {
    if (!c) return DSMOE_ERR_INVALID;
    if (!ptr) return strict_fail(c, DSMOE_ERR_INVALID, "%s: ptr is NULL", name);
    *ptr = NULL;
    if (c->sticky) return c->sticky;
    size_t len = bytes ? bytes : 1; // bytes == 0 still gets its own page: a unique pointer
    if (len > SIZE_MAX - c->page) return strict_fail(c, DSMOE_ERR_NOMEM, "%s of %zu bytes: too large", name, bytes);
    len = (len + c->page - 1) / c->page * c->page;
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return strict_fail(c, DSMOE_ERR_NOMEM, "%s of %zu bytes: mmap failed: %s", name, bytes, strerror(errno));
    if (!zero) memset(m, STRICT_POISON, len); // fresh anonymous pages are already zero
    strict_alloc *a = calloc(1, sizeof *a);
    if (a) *a = (strict_alloc){.base = m, .bytes = bytes, .map_bytes = len, .host = host};
    if (!a || table_insert(c, a) != DSMOE_OK) {
        if (a) free_record(a);
        munmap(m, len);
        return strict_fail(c, DSMOE_ERR_NOMEM, "%s: no host memory for the allocation table", name);
    }
    if (strict_pages_init(c, a) != DSMOE_OK) { // device memory starts closed (strict_protect.c)
        table_remove(c, a);
        free_record(a);
        munmap(m, len);
        return c->sticky ? c->sticky : strict_fail(c, DSMOE_ERR_NOMEM, "%s: no host memory for the page table", name);
    }
    *ptr = m;
    return DSMOE_OK;
}

static dsmoe_status s_alloc(dsmoe_kernel_ctx *c, size_t bytes, uint32_t flags, void **ptr) {
    if (c && (flags & ~(uint32_t)DSMOE_ALLOC_ZERO))
        return strict_fail(c, DSMOE_ERR_INVALID, "alloc: unknown flags 0x%x", (unsigned)flags);
    return map_new(c, "alloc", bytes, 0, flags & DSMOE_ALLOC_ZERO, ptr);
}

static dsmoe_status s_host_alloc(dsmoe_kernel_ctx *c, size_t bytes, void **ptr) {
    return map_new(c, "host_alloc", bytes, 1, 0, ptr);
}

// Frees after the work queued before, on every queue: the buffer is released when the last op
// referencing it, and every queue's work queued before the free (strict_hold_until_queues_pass), have
// run. A bad pointer or a second free is a sticky error (a device would fault).
static void free_kind(dsmoe_kernel_ctx *c, void *p, int host, const char *name) {
    if (!c || !p) return;
    strict_alloc *a = strict_find(c, p);
    if (!a || a->base != (char *)p || a->host != host || a->freed) {
        if (!c->sticky)
            c->sticky = strict_fail(c, DSMOE_ERR_INVALID, "%s(%p): %s", name, p,
                                    !a || a->base != (char *)p ? "not the start of a live buffer"
                                    : a->host != host          ? (host ? "device memory from alloc()"
                                                                       : "host memory from host_alloc()")
                                                               : "freed twice");
        return;
    }
    a->freed = 1;
    strict_hold_until_queues_pass(c, a, name);
    if (a->pending == 0) strict_release(c, a);
}

static void s_free(dsmoe_kernel_ctx *c, void *p) { free_kind(c, p, 0, "free"); }
static void s_host_free(dsmoe_kernel_ctx *c, void *p) { free_kind(c, p, 1, "host_free"); }

// ---------------------------------------------------------------------------------------------------
// Copies: done by the plugin itself (memcpy) when the queue runs.

typedef struct {
    void *dst;
    const void *src;
    size_t bytes;
    size_t dpitch, spitch, rows; // copy_2d (bytes = width)
} copy_args;

static dsmoe_status run_copy(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(copy_args);
    if (a->bytes) memcpy(a->dst, a->src, a->bytes);
    return DSMOE_OK;
}

static dsmoe_status run_copy_2d(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(copy_args);
    for (size_t r = 0; r < a->rows && a->bytes; r++)
        memcpy((char *)a->dst + r * a->dpitch, (const char *)a->src + r * a->spitch, a->bytes);
    return DSMOE_OK;
}

static dsmoe_status run_zero(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(copy_args);
    if (a->bytes) memset(a->dst, 0, a->bytes);
    return DSMOE_OK;
}

// Host memory of a copy: host_alloc memory is read or written when the queue runs (and its host_free
// waits for that); device memory there is a usage error; ordinary memory is taken as is.
static strict_alloc *host_side(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what) {
    strict_check(c, op, p || !bytes, "%s is NULL", what);
    strict_alloc *h = p ? strict_find(c, p) : NULL;
    strict_check(c, op, !h || h->host, "%s (%p) is device memory from alloc(): the host may not touch it; use copy",
                 what, p);
    if (h && h->host) strict_ref_host(c, op, p, bytes, what);
    return h;
}

static dsmoe_status s_copy_to_device(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src,
                                     size_t bytes) {
    STRICT_BEGIN(ctx, q, "copy_to_device", run_copy, copy_args);
    op->cpu = 0;
    *a = (copy_args){.dst = dst, .src = src, .bytes = bytes};
    strict_ref(ctx, op, dst, bytes, "dst");
    strict_alloc *h = host_side(ctx, op, src, bytes, "host_src");
    if (op->status == DSMOE_OK && !h && bytes) { // ordinary memory: consumed now, the caller may reuse it
        op->extra = malloc(bytes);
        strict_check(ctx, op, op->extra != NULL, "no host memory for a %zu-byte copy of the source", bytes);
        if (op->extra) a->src = memcpy(op->extra, src, bytes);
    }
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_copy_to_host(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src,
                                   size_t bytes) {
    STRICT_BEGIN(ctx, q, "copy_to_host", run_copy, copy_args);
    op->cpu = 0;
    *a = (copy_args){.dst = dst, .src = src, .bytes = bytes};
    strict_ref(ctx, op, src, bytes, "src");
    host_side(ctx, op, dst, bytes, "host_dst");
    return strict_submit(ctx, q, op);
}

static int overlap(const void *x, size_t xn, const void *y, size_t yn) {
    const char *a = x, *b = y;
    return xn && yn && a < b + yn && b < a + xn;
}

static dsmoe_status s_copy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, const void *src, size_t bytes) {
    STRICT_BEGIN(ctx, q, "copy", run_copy, copy_args);
    op->cpu = 0;
    *a = (copy_args){.dst = dst, .src = src, .bytes = bytes};
    strict_ref(ctx, op, dst, bytes, "dst");
    strict_ref(ctx, op, src, bytes, "src");
    strict_check(ctx, op, !overlap(dst, bytes, src, bytes), "the ranges overlap");
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_copy_2d(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t dpitch, const void *src,
                              size_t spitch, size_t width, size_t rows) {
    STRICT_BEGIN(ctx, q, "copy_2d", run_copy_2d, copy_args);
    op->cpu = 0;
    *a = (copy_args){.dst = dst, .src = src, .bytes = width, .dpitch = dpitch, .spitch = spitch, .rows = rows};
    strict_check(ctx, op, dpitch >= width && spitch >= width, "pitches (dst %zu, src %zu) below the width %zu",
                 dpitch, spitch, width);
    size_t dn = strict_mat_bytes(rows, width, dpitch, 1), sn = strict_mat_bytes(rows, width, spitch, 1);
    strict_ref(ctx, op, dst, dn, "dst");
    strict_ref(ctx, op, src, sn, "src");
    strict_check(ctx, op, !overlap(dst, dn, src, sn), "the ranges overlap");
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_zero(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dst, size_t bytes) {
    STRICT_BEGIN(ctx, q, "zero", run_zero, copy_args);
    op->cpu = 0;
    *a = (copy_args){.dst = dst, .bytes = bytes};
    strict_ref(ctx, op, dst, bytes, "dst");
    return strict_submit(ctx, q, op);
}

void strict_fill_mem_members(dsmoe_kernel_plugin_v3 *t) {
    t->alloc = s_alloc;
    t->free = s_free;
    t->host_alloc = s_host_alloc;
    t->host_free = s_host_free;
    t->copy_to_device = s_copy_to_device;
    t->copy_to_host = s_copy_to_host;
    t->copy = s_copy;
    t->copy_2d = s_copy_2d;
    t->zero = s_zero;
}
