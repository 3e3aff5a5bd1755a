// tests/plugins/kernel/strict/strict_internal.h: what the files of the strict kernel plugin share. What the
// plugin is for, and the rules it enforces, are at the top of strict_plugin.c.
// defines: the context, queue, event, allocation and closure (strict_op) types; the enqueue helpers
// (strict_op_new, strict_ref*, strict_dtype, strict_check, strict_submit) that strict_ops_*.c use.
#ifndef DSMOE_STRICT_INTERNAL_H
#define DSMOE_STRICT_INTERNAL_H
#include <stddef.h>
#include <stdint.h>

#include "dsmoe/kernel_plugin.h"

#define STRICT_POISON 0xFF // a NaN as float32/float64/bf16/fp16, -1 as int32/int64

// One mapping handed out by alloc() (device memory) or host_alloc() (host memory).
typedef struct strict_alloc {
    char *base;       // page-aligned, what alloc returned
    size_t bytes;     // as asked
    size_t map_bytes; // page-rounded, at least one page
    size_t n_pages;
    int host;         // 1: host_alloc memory, never protected
    int fresh;        // device memory no call that waits has opened yet: any host access is a violation
    int all_open;     // every page is PROT_READ|PROT_WRITE (device memory)
    int pending;      // ranges of queued ops in it
    int freed;        // free()/host_free() was called; released when pending drops to 0
    uint32_t *page_pending;   // (n_pages) ranges of queued ops touching each page (device memory)
    unsigned char *page_open; // (n_pages) 1 = the page is PROT_READ|PROT_WRITE now
} strict_alloc;

// Bytes [off, off + len) of an allocation that a queued op reads or writes.
typedef struct strict_range {
    strict_alloc *a;
    size_t off, len;
    const char *what; // the argument's name, for a violation's message
} strict_range;

typedef struct strict_op strict_op;
// Runs a closure: calls the cpu plugin (or does the copy) with the arguments captured at enqueue time.
typedef dsmoe_status (*strict_run_fn)(dsmoe_kernel_ctx *c, strict_op *op);

// A closure: one enqueued member call, run when its queue runs.
struct strict_op {
    strict_op *next;
    const char *name;     // the member's name: errors and DSMOE_STRICT_BREAK
    strict_run_fn run;
    int cpu;              // run calls the cpu plugin: synchronize the cpu context after it
    dsmoe_status status;  // first enqueue-time error found while building the closure
    strict_range *refs;   // what it reads or writes (pending counts, closing pages, violation messages)
    int n_refs, cap_refs;
    void *extra;          // heap copy of host arrays the call passed (adamw tensors, sample counters)
    _Alignas(max_align_t) unsigned char args[]; // the op's argument struct
};

struct dsmoe_kernel_queue {
    dsmoe_kernel_queue *next; // every queue of the context, the default one first
    strict_op *head, *tail;
    uint64_t enq_seq;  // ops enqueued so far
    uint64_t done_seq; // ops run (or dropped) so far: op number i (from 1) has run when done_seq >= i
    int running;       // being run now (a wait on a queue that is running is a dependency cycle)
    int destroyed;     // queue_destroy was called (kept until finalize: waits may still name it)
    int id;            // 0 = default queue
};

struct dsmoe_kernel_event {
    dsmoe_kernel_event *next; // every event of the context
    dsmoe_kernel_queue *q;    // queue of the last record; NULL = never recorded (or record dropped)
    uint64_t seq;             // completed when q->done_seq >= seq
};

struct dsmoe_kernel_ctx {
    const dsmoe_kernel_plugin_v3 *cpu; // the wrapped cpu plugin's v2 table
    dsmoe_kernel_ctx *cc;              // its context
    dsmoe_kernel_queue *cq;            // its default queue: every closure runs there
    dsmoe_kernel_queue *queues;        // ours; the default queue first
    dsmoe_kernel_event *events;
    strict_alloc **allocs;             // live allocations sorted by base
    int n_allocs, cap_allocs;
    size_t page;
    int protect;       // 0 with DSMOE_STRICT_NO_PROTECT=1
    int always_closed; // DSMOE_STRICT_ALWAYS_CLOSED=1
    int mpi_opened;    // always_closed: pages a fake CUDA-aware MPI's collective opened (strict_protect.c)
    int eager_host_fn; // DSMOE_STRICT_EAGER_HOST_FN=1: queue_enqueue_host runs its queue up to the callback
    char breaks[256];  // ",name,name," from DSMOE_STRICT_BREAK ("" = none)
    dsmoe_status sticky;
    char err[1024];
    char desc[1024];
    int n_queues;
};

// strict_plugin.c
dsmoe_status strict_fail(dsmoe_kernel_ctx *c, dsmoe_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
extern uint32_t strict_dtypes; // activation dtypes (the cpu plugin's)

// strict_queue.c: closures.
// A new closure for member `name` with an argument struct of args_bytes (zeroed), or NULL (no memory:
// the error is set). The caller fills op->args, declares the buffers it touches, then submits.
strict_op *strict_op_new(dsmoe_kernel_ctx *c, const char *name, strict_run_fn run, size_t args_bytes);
// Declares a device buffer the op touches: [p, p + bytes) inside one live alloc() buffer. An empty one
// (bytes 0) may be NULL; otherwise NULL is an error unless optional.
void strict_ref(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what);
void strict_ref_opt(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what);
// The same with `bytes` an upper bound (clipped at the buffer's end, never an error): the grouped GEMMs,
// whose last group's rows past its count need not exist.
void strict_ref_bound(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what);
// The same for host_alloc memory (the host side of a copy, read or written when the queue runs).
void strict_ref_host(dsmoe_kernel_ctx *c, strict_op *op, const void *p, size_t bytes, const char *what);
// free/host_free: a, already marked freed, is released once every queue has run past this call.
void strict_hold_until_queues_pass(dsmoe_kernel_ctx *c, strict_alloc *a, const char *name);
// The op's activation dtype must be one the plugin declares.
void strict_dtype(dsmoe_kernel_ctx *c, strict_op *op, dsmoe_dtype dt, const char *what);
// Records an enqueue-time error unless cond holds.
void strict_check(dsmoe_kernel_ctx *c, strict_op *op, int cond, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
// Appends op to q, or frees it and returns its enqueue-time error (or the sticky one).
dsmoe_status strict_submit(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q, strict_op *op);
// The start of every enqueuing member: the sticky error, or INVALID for a NULL queue.
dsmoe_status strict_enter(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q, const char *name);
// Bytes of a (rows, cols) matrix with leading dimension ld of esize-byte elements (0 when empty).
size_t strict_mat_bytes(size_t rows, size_t cols, size_t ld, size_t esize);

// strict_queue.c: running.
dsmoe_status strict_run_all(dsmoe_kernel_ctx *c); // every queue to its end, then settles memory
// The queued op with a range holding byte `off` of a, or NULL (the fault handler's question).
const strict_op *strict_pending_at(const dsmoe_kernel_ctx *c, const strict_alloc *a, size_t off,
                                   const strict_range **range);
void strict_fill_queue_members(dsmoe_kernel_plugin_v3 *t);

// strict_mem.c: the allocation table and the memory members.
strict_alloc *strict_find(dsmoe_kernel_ctx *c, const void *p); // the allocation holding p, or NULL
void strict_release(dsmoe_kernel_ctx *c, strict_alloc *a);     // poisons and unmaps a freed buffer
void strict_release_all(dsmoe_kernel_ctx *c);                  // finalize: unmaps every allocation
void strict_fill_mem_members(dsmoe_kernel_plugin_v3 *t);

// strict_protect.c: the window rules (page protection of device memory) and the fault handler.
dsmoe_status strict_pages_init(dsmoe_kernel_ctx *c, strict_alloc *a); // a fresh buffer: all closed
void strict_range_add(dsmoe_kernel_ctx *c, const strict_range *r);    // queued: count it, close its pages
void strict_range_drop(dsmoe_kernel_ctx *c, const strict_range *r);   // ran or dropped: uncount it
void strict_open_all(dsmoe_kernel_ctx *c);    // a queue runs: every device page open
void strict_settle_pages(dsmoe_kernel_ctx *c); // a call that waits returns: the window rule
void strict_protect_attach(dsmoe_kernel_ctx *c); // init: the SIGSEGV handler knows this context
void strict_protect_detach(dsmoe_kernel_ctx *c);

// strict_ops_dense.c, strict_ops_moe.c: the compute members.
void strict_fill_dense_members(dsmoe_kernel_plugin_v3 *t, const dsmoe_kernel_plugin_v3 *cpu);
void strict_fill_moe_members(dsmoe_kernel_plugin_v3 *t, const dsmoe_kernel_plugin_v3 *cpu);
// strict_ops_distill.c: distill_forward and distill_backward (and DSMOE_KCAP_DISTILL) when cpu has them.
void strict_fill_distill_members(dsmoe_kernel_plugin_v3 *t, const dsmoe_kernel_plugin_v3 *cpu);

// Starts an enqueuing member: checks the context and queue, makes the closure `op` with argument struct
// `a` of type T, or returns.
#define STRICT_BEGIN(ctx, q, NAME, RUN, T)                                                               \
    dsmoe_status st_enter_ = strict_enter((ctx), (q), NAME);                                             \
    if (st_enter_ != DSMOE_OK) return st_enter_;                                                         \
    strict_op *op = strict_op_new((ctx), NAME, (RUN), sizeof(T));                                        \
    if (!op) return DSMOE_ERR_NOMEM;                                                                     \
    T *a = (T *)(void *)op->args;                                                                        \
    op->cpu = 1

// The argument struct of a closure, in its run function.
#define STRICT_ARGS(T) const T *a = (const T *)(void *)op->args

#endif
