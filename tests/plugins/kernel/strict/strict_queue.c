// tests/plugins/kernel/strict/strict_queue.c: the deferred queues of the strict plugin. Every enqueuing member
// builds a closure (strict_op: the member's name, its arguments copied, the buffers it touches) and
// appends it to its queue; nothing runs until a synchronizing call runs a queue up to the point it
// needs (strict_plugin.c has the list and the memory rules). An event is a position in a queue (the
// number of ops enqueued on it when it was recorded); queue_wait_event is a closure that, when it runs,
// first runs the other queue up to that position.
// defines: strict_op_new, strict_ref, strict_ref_opt, strict_ref_bound, strict_ref_host,
//          strict_hold_until_queues_pass, strict_dtype,
//          strict_check, strict_submit, strict_enter, strict_mat_bytes, strict_run_all, strict_pending_at,
//          strict_fill_queue_members
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "strict_internal.h"

// ---------------------------------------------------------------------------------------------------
// Building closures. Checks record the FIRST enqueue-time error in op->status (and its message in
// c->err); strict_submit then returns it and drops the closure, so a member reads as a list of checks.

strict_op *strict_op_new(dsmoe_kernel_ctx *c, const char *name, strict_run_fn run, size_t args_bytes) {
    strict_op *op = calloc(1, sizeof *op + args_bytes);
    if (!op) {
        strict_fail(c, DSMOE_ERR_NOMEM, "%s: no host memory for the closure", name);
        return NULL;
    }
    op->name = name;
    op->run = run;
    return op;
}

static void op_error(dsmoe_kernel_ctx *c, strict_op *op, dsmoe_status s, const char *fmt, va_list ap) {
    if (op->status != DSMOE_OK) return;
    char msg[768];
    vsnprintf(msg, sizeof msg, fmt, ap);
    op->status = strict_fail(c, s, "%s: %s", op->name, msg);
}

void strict_check(dsmoe_kernel_ctx *c, strict_op *op, int cond, const char *fmt, ...) {
    if (cond) return;
    va_list ap;
    va_start(ap, fmt);
    op_error(c, op, DSMOE_ERR_INVALID, fmt, ap);
    va_end(ap);
}

static void check_status(dsmoe_kernel_ctx *c, strict_op *op, dsmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    op_error(c, op, s, fmt, ap);
    va_end(ap);
}

void strict_dtype(dsmoe_kernel_ctx *c, strict_op *op, dsmoe_dtype dt, const char *what) {
    if ((unsigned)dt < 32 && (strict_dtypes & DSMOE_DTYPE_BIT(dt))) return;
    check_status(c, op, DSMOE_ERR_UNSUPPORTED, "%s dtype %s (%d) is not one this plugin supports", what,
                 dsmoe_dtype_name(dt), (int)dt);
}

size_t strict_mat_bytes(size_t rows, size_t cols, size_t ld, size_t esize) {
    if (rows == 0 || cols == 0) return 0;
    return ((rows - 1) * ld + cols) * esize;
}

static void add_ref(dsmoe_kernel_ctx *c, strict_op *op, strict_alloc *a, size_t off, size_t len, const char *what) {
    if (op->n_refs == op->cap_refs) {
        int cap = op->cap_refs ? 2 * op->cap_refs : 8;
        strict_range *r = realloc(op->refs, (size_t)cap * sizeof *r);
        if (!r) {
            check_status(c, op, DSMOE_ERR_NOMEM, "no host memory for the closure");
            return;
        }
        op->refs = r;
        op->cap_refs = cap;
    }
    op->refs[op->n_refs++] = (strict_range){a, off, len, what};
}

// [p, p + bytes) must lie in one live allocation of the wanted kind (host = 1: host_alloc memory); with
// bound, bytes is an upper bound, clipped at the buffer's end. NULL is allowed only when optional or
// empty.
static void ref_kind(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what, int host,
                     int optional, int bound) {
    if (op->status != DSMOE_OK) return;
    if (!p) {
        strict_check(c, op, optional || bytes == 0, "%s is NULL", what); // a device never reads an empty one
        return;
    }
    strict_alloc *a = strict_find(c, p);
    if (!a || a->host != host) {
        strict_check(c, op, 0, "%s (%p) is not inside a live buffer from %s()%s", what, p,
                     host ? "host_alloc" : "alloc",
                     a ? (a->host ? ": it is host_alloc memory" : ": it is device memory from alloc()") : "");
        return;
    }
    if (a->freed) {
        strict_check(c, op, 0, "%s (%p) is in a buffer already freed (use after free)", what, p);
        return;
    }
    size_t off = (size_t)((const char *)p - a->base);
    if (bound && bytes > a->bytes - off) bytes = a->bytes - off;
    if (bytes > a->bytes || off > a->bytes - bytes) {
        strict_check(c, op, 0, "%s: %zu bytes at offset %zu overrun its buffer of %zu bytes", what, bytes, off,
                     a->bytes);
        return;
    }
    add_ref(c, op, a, off, bytes, what);
}

static dsmoe_status run_hold(dsmoe_kernel_ctx *c, strict_op *op) {
    (void)c, (void)op;
    return DSMOE_OK;
}

// free and host_free release a buffer after ALL work queued before the call, host callbacks included (a
// stream-ordered comm plugin's collective may still read it): every queue with queued work gets a
// closure holding the buffer by an empty range (it touches no byte), so the buffer's pending count
// reaches 0, and strict_range_drop releases it, only once every queue has run past the free.
void strict_hold_until_queues_pass(dsmoe_kernel_ctx *c, strict_alloc *a, const char *name) {
    for (dsmoe_kernel_queue *q = c->queues; q; q = q->next) {
        if (!q->head || q->destroyed) continue;
        strict_op *op = strict_op_new(c, name, run_hold, 0);
        if (!op) return; // strict_op_new made it a sticky error
        add_ref(c, op, a, 0, 0, "the freed buffer");
        strict_submit(c, q, op);
    }
}

void strict_ref(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what) {
    ref_kind(c, op, p, bytes, what, 0, 0, 0);
}
void strict_ref_opt(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what) {
    ref_kind(c, op, p, bytes, what, 0, 1, 0);
}
void strict_ref_bound(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what) {
    ref_kind(c, op, p, bytes, what, 0, 0, 1);
}
void strict_ref_host(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what) {
    ref_kind(c, op, p, bytes, what, 1, 0, 0);
}

dsmoe_status strict_enter(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q, const char *name) {
    if (!c) return DSMOE_ERR_INVALID;
    if (c->sticky) return c->sticky;
    if (!q) return strict_fail(c, DSMOE_ERR_INVALID, "%s: the queue is NULL", name);
    if (q->destroyed) return strict_fail(c, DSMOE_ERR_INVALID, "%s: queue %d was destroyed", name, q->id);
    return DSMOE_OK;
}

static void op_destroy(dsmoe_kernel_ctx *c, strict_op *op) {
    for (int i = 0; i < op->n_refs; i++)
        strict_range_drop(c, &op->refs[i]);
    free(op->refs);
    free(op->extra);
    free(op);
}

dsmoe_status strict_submit(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q, strict_op *op) {
    dsmoe_status s = op->status;
    if (s != DSMOE_OK) {
        op->n_refs = 0; // nothing was counted yet
        op_destroy(c, op);
        return s;
    }
    // Work on these bytes is now queued: the host may not touch them until a call that waits has run it.
    for (int i = 0; i < op->n_refs; i++)
        strict_range_add(c, &op->refs[i]);
    if (q->tail) q->tail->next = op;
    else q->head = op;
    q->tail = op;
    q->enq_seq++;
    return c->sticky; // closing memory can fail (mprotect)
}

// ---------------------------------------------------------------------------------------------------
// Running

static int is_broken(const dsmoe_kernel_ctx *c, const char *name) {
    if (!c->breaks[0]) return 0;
    char key[80];
    snprintf(key, sizeof key, ",%s,", name);
    return strstr(c->breaks, key) != NULL;
}

// Runs one closure; a failure becomes the context's sticky error, named after the op.
static void run_one(dsmoe_kernel_ctx *c, strict_op *op) {
    if (is_broken(c, op->name)) return; // DSMOE_STRICT_BREAK: silently dropped
    dsmoe_status s = op->run(c, op);
    // The cpu plugin may itself be asynchronous: its work must be done before memory closes, an event
    // completes or a host callback runs, and its run-time errors must be pinned on this op.
    if (s == DSMOE_OK && op->cpu) s = c->cpu->queue_synchronize(c->cc, c->cq);
    if (s == DSMOE_OK || c->sticky) return;
    if (op->cpu)
        snprintf(c->err, sizeof c->err, "strict: %s failed when its queue ran: %s: %s", op->name,
                 dsmoe_status_name(s), c->cpu->last_error(c->cc));
    c->sticky = s; // a non-cpu op (a wait) wrote its message through strict_fail
}

// Runs q until it has run `upto` ops (or is empty). Waits in it may run other queues first.
static dsmoe_status run_queue(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q, uint64_t upto) {
    if (c->sticky) return c->sticky;
    if (q->done_seq >= upto || !q->head) return DSMOE_OK;
    if (q->running) {
        c->sticky = strict_fail(c, DSMOE_ERR_INVALID,
                                "queue %d must run further to complete an event that a queue_wait_event "
                                "ahead of it depends on: a dependency cycle (a device would hang)",
                                q->id);
        return c->sticky;
    }
    strict_open_all(c); // the cpu plugin reads and writes the buffers directly
    q->running = 1;
    while (q->done_seq < upto && q->head && !c->sticky) {
        strict_op *op = q->head;
        q->head = op->next;
        if (!q->head) q->tail = NULL;
        run_one(c, op);
        q->done_seq++;
        op_destroy(c, op);
    }
    q->running = 0;
    return c->sticky;
}

// After a call that waits: a sticky error drops all queued work; then every device page without queued
// work stays open for the host (the window a host-progressed collective needs), the others close.
static dsmoe_status settle(dsmoe_kernel_ctx *c) {
    if (c->sticky)
        for (dsmoe_kernel_queue *q = c->queues; q; q = q->next) {
            while (q->head) {
                strict_op *op = q->head;
                q->head = op->next;
                q->done_seq++;
                op_destroy(c, op);
            }
            q->tail = NULL;
        }
    strict_settle_pages(c);
    return c->sticky;
}

const strict_op *strict_pending_at(const dsmoe_kernel_ctx *c, const strict_alloc *a, size_t off,
                                   const strict_range **range) {
    for (const dsmoe_kernel_queue *q = c->queues; q; q = q->next)
        for (const strict_op *op = q->head; op; op = op->next)
            for (int i = 0; i < op->n_refs; i++) {
                const strict_range *r = &op->refs[i];
                if (r->a == a && off >= r->off && off - r->off < r->len) {
                    *range = r;
                    return op;
                }
            }
    return NULL;
}

dsmoe_status strict_run_all(dsmoe_kernel_ctx *c) {
    for (dsmoe_kernel_queue *q = c->queues; q; q = q->next)
        run_queue(c, q, q->enq_seq);
    return settle(c);
}

// ---------------------------------------------------------------------------------------------------
// Queue members

static dsmoe_kernel_queue *s_default_queue(dsmoe_kernel_ctx *c) { return c ? c->queues : NULL; }

static dsmoe_status s_queue_create(dsmoe_kernel_ctx *c, dsmoe_kernel_queue **out) {
    if (!c || !out) return DSMOE_ERR_INVALID;
    *out = NULL;
    if (c->sticky) return c->sticky;
    dsmoe_kernel_queue *q = calloc(1, sizeof *q);
    if (!q) return strict_fail(c, DSMOE_ERR_NOMEM, "queue_create: no host memory");
    q->id = ++c->n_queues;
    dsmoe_kernel_queue *last = c->queues;
    while (last->next)
        last = last->next;
    last->next = q;
    *out = q;
    return DSMOE_OK;
}

// Runs the queue's work, then marks it destroyed; the record stays until finalize, since a wait
// enqueued elsewhere may still name it (it has run to its end, so the wait never runs it again).
static void s_queue_destroy(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q) {
    if (!c || !q || q == c->queues || q->destroyed) return;
    run_queue(c, q, q->enq_seq);
    settle(c);
    q->destroyed = 1;
}

static void *s_queue_native(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q) { return NULL; }

typedef struct {
    void (*fn)(void *);
    void *arg;
} host_fn_args;

static dsmoe_status run_host_fn(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(host_fn_args);
    a->fn(a->arg);
    return DSMOE_OK;
}

static dsmoe_status s_queue_enqueue_host(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void (*fn)(void *), void *arg) {
    STRICT_BEGIN(ctx, q, "queue_enqueue_host", run_host_fn, host_fn_args);
    op->cpu = 0;
    a->fn = fn;
    a->arg = arg;
    strict_check(ctx, op, fn != NULL, "fn is NULL");
    dsmoe_status s = strict_submit(ctx, q, op);
    if (s != DSMOE_OK || !ctx->eager_host_fn) return s;
    run_queue(ctx, q, q->enq_seq); // DSMOE_STRICT_EAGER_HOST_FN (strict_plugin.c says why)
    return settle(ctx);
}

static dsmoe_status s_queue_synchronize(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q) {
    if (!c) return DSMOE_ERR_INVALID;
    if (c->sticky) return c->sticky;
    if (!q) return strict_fail(c, DSMOE_ERR_INVALID, "queue_synchronize: the queue is NULL");
    run_queue(c, q, q->enq_seq);
    return settle(c);
}

static dsmoe_status s_synchronize(dsmoe_kernel_ctx *c) {
    if (!c) return DSMOE_ERR_INVALID;
    if (c->sticky) return c->sticky;
    return strict_run_all(c);
}

// ---------------------------------------------------------------------------------------------------
// Events

static dsmoe_status s_event_create(dsmoe_kernel_ctx *c, dsmoe_kernel_event **out) {
    if (!c || !out) return DSMOE_ERR_INVALID;
    *out = NULL;
    if (c->sticky) return c->sticky;
    dsmoe_kernel_event *ev = calloc(1, sizeof *ev);
    if (!ev) return strict_fail(c, DSMOE_ERR_NOMEM, "event_create: no host memory");
    ev->next = c->events;
    c->events = ev;
    *out = ev;
    return DSMOE_OK;
}

// Nothing queued points at an event (a wait copies its queue and position), so it goes at once.
static void s_event_destroy(dsmoe_kernel_ctx *c, dsmoe_kernel_event *ev) {
    if (!c || !ev) return;
    for (dsmoe_kernel_event **p = &c->events; *p; p = &(*p)->next)
        if (*p == ev) {
            *p = ev->next;
            free(ev);
            return;
        }
}

static dsmoe_status s_event_record(dsmoe_kernel_ctx *c, dsmoe_kernel_event *ev, dsmoe_kernel_queue *q) {
    dsmoe_status s = strict_enter(c, q, "event_record");
    if (s != DSMOE_OK) return s;
    if (!ev) return strict_fail(c, DSMOE_ERR_INVALID, "event_record: the event is NULL");
    if (is_broken(c, "event_record")) { // DSMOE_STRICT_BREAK: the event reads as completed at once
        ev->q = NULL;
        return DSMOE_OK;
    }
    ev->q = q;
    ev->seq = q->enq_seq;
    return DSMOE_OK;
}

typedef struct {
    dsmoe_kernel_queue *q; // the event's queue when the wait was enqueued
    uint64_t seq;
} wait_args;

static dsmoe_status run_wait(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(wait_args);
    return run_queue(c, a->q, a->seq);
}

static dsmoe_status s_queue_wait_event(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, dsmoe_kernel_event *ev) {
    STRICT_BEGIN(ctx, q, "queue_wait_event", run_wait, wait_args);
    op->cpu = 0;
    strict_check(ctx, op, ev != NULL, "the event is NULL");
    if (ev) {
        a->q = ev->q ? ev->q : q; // never recorded: completed, nothing to wait for
        a->seq = ev->q ? ev->seq : 0;
    }
    return strict_submit(ctx, q, op);
}

static dsmoe_status s_event_synchronize(dsmoe_kernel_ctx *c, dsmoe_kernel_event *ev) {
    if (!c) return DSMOE_ERR_INVALID;
    if (c->sticky) return c->sticky;
    if (!ev) return strict_fail(c, DSMOE_ERR_INVALID, "event_synchronize: the event is NULL");
    if (ev->q) run_queue(c, ev->q, ev->seq);
    return settle(c);
}

// The header lets a query drive a host queue: it runs the work up to the event, so it is always done.
static dsmoe_status s_event_query(dsmoe_kernel_ctx *c, dsmoe_kernel_event *ev, int *done) {
    if (done) *done = 0;
    if (!c) return DSMOE_ERR_INVALID;
    if (!done) return strict_fail(c, DSMOE_ERR_INVALID, "event_query: done is NULL");
    dsmoe_status s = s_event_synchronize(c, ev);
    *done = s == DSMOE_OK;
    return s;
}

void strict_fill_queue_members(dsmoe_kernel_plugin_v3 *t) {
    t->default_queue = s_default_queue;
    t->queue_create = s_queue_create;
    t->queue_destroy = s_queue_destroy;
    t->queue_native = s_queue_native;
    t->queue_enqueue_host = s_queue_enqueue_host;
    t->queue_synchronize = s_queue_synchronize;
    t->synchronize = s_synchronize;
    t->event_create = s_event_create;
    t->event_destroy = s_event_destroy;
    t->event_record = s_event_record;
    t->queue_wait_event = s_queue_wait_event;
    t->event_synchronize = s_event_synchronize;
    t->event_query = s_event_query;
}
