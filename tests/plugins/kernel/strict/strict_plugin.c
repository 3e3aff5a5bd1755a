// tests/plugins/kernel/strict/strict_plugin.c: the "strict" kernel plugin (ABI v3), a TEST plugin. It proves,
// on a machine without a GPU, that the dsmoe core never relies on a kernel plugin being synchronous or
// on plugin memory being host-readable. It computes nothing itself: every op runs the cpu plugin
// (libdsmoe_kernel_cpu.so, through its v2 table), so its results are the cpu plugin's bit for bit; but
// WHEN and WHERE the work happens is as hostile as include/dsmoe/kernel_plugin.h allows:
//
// 1. Deferred queues. Every member that takes a queue (the ops, copies, zero, queue_enqueue_host,
//    queue_wait_event) records a closure and returns at once. Host inputs are copied into it: scalars,
//    descriptor and parameter structs, the AdamW tensor list, the sample counters, and the source of a
//    copy_to_device from ordinary memory (one from host_alloc memory is read when it runs). Nothing runs
//    until a call that waits runs a queue, in order: event_synchronize and event_query (up to the event;
//    a query always drives the queue, as the header allows, so it answers done), queue_synchronize and
//    queue_destroy (that queue), synchronize and finalize (every queue). A queue_wait_event, when its
//    queue reaches it, first runs the other queue up to the event (a cycle is a sticky error). An
//    event_record marks the position; event_create/destroy never wait. So copy_to_host writes its host
//    buffer only when the queue runs: a core that reads it without waiting sees stale data. free and
//    host_free run nothing either: a buffer is released once every queue has run the work queued
//    before the free (host callbacks too, such as a stream-ordered comm plugin's collectives).
// 2. Memory the host cannot touch. Each buffer is its own mmap. The window rule for device (alloc)
//    memory, per byte:
//    - a fresh buffer is closed (PROT_NONE) until the next call that waits;
//    - enqueuing an op closes the bytes it reads or writes (their pages), until a call that waits has
//      run it; running a queue opens everything (the cpu plugin works on the buffers directly);
//    - when a call that waits returns, bytes without queued work are OPEN (read/write).
//    A host access to bytes that queued work still has to use therefore dies with SIGSEGV, after a
//    line on stderr naming the op and argument; an access right after the wait for that work works.
//    mem_kind is DSMOE_MEM_HOST for exactly that second case: a host-progressed comm plugin (mpi)
//    reads and writes the buffers of a collective the core started after waiting for the kernels that
//    produce them, while kernels on OTHER bytes, even of the same buffer, may be queued (the core's
//    overlapped gradient all-reduce). Pages cannot tell bytes apart: strict_protect.c's SIGSEGV handler
//    lets an access to a closed page through when no queued range holds the byte touched.
//    DSMOE_STRICT_ALWAYS_CLOSED=1 keeps device memory closed except while a queue runs (any host access
//    is a violation: for stream-ordered comm plugins, whose collectives run inside the queue), but
//    inside a collective of the fake CUDA-aware MPI when it is preloaded (tests/plugins/
//    fake_cuda_aware_mpi.c, strict_protect.c): MPI there may touch bytes without queued work.
//    DSMOE_STRICT_MEM_KIND=device declares DSMOE_MEM_CUDA instead: the core then reaches a host comm
//    plugin (mpi) only through its pinned host staging (core/plugins/comm_staged.c), as with a GPU plugin; use
//    it with DSMOE_STRICT_ALWAYS_CLOSED=1, so that no host access to device memory goes unnoticed.
//    DSMOE_STRICT_NO_PROTECT=1 turns mprotect off (debugging; the queues stay deferred). host_alloc
//    memory is never protected.
//    DSMOE_STRICT_EAGER_HOST_FN=1 runs a queue up to a queue_enqueue_host callback when the callback is
//    enqueued. Use it with stream-ordered comm plugins, whose callbacks are collectives: a real device
//    runs a queued collective while its host is blocked elsewhere (say in a host-side MPI call the
//    other ranks reach only after that collective), but strict runs it only when the host waits, so
//    ranks that wait at different points around host-side collectives would deadlock under strict
//    alone. (Work queued after the callback stays deferred.)
// 3. Poison. alloc() without DSMOE_ALLOC_ZERO, host_alloc() and freed buffers are filled with 0xFF
//    bytes: NaN in every float type, -1 in int32 and int64. So are the rows gemm_grouped leaves
//    unspecified (from a group's count to m_max of c, and of aux with BIAS_GELU; strict_ops_dense.c),
//    the one place where strict's results differ from the cpu plugin's.
// 4. Errors. At enqueue time, returned at once: a NULL or destroyed queue, an unsupported dtype, a
//    negative size, a tensor pointer outside every live alloc() buffer (or overrunning it, where the
//    extent follows from the arguments), a use after free, device memory as the host side of a copy.
//    When a closure runs, its failure (the cpu op's status, including shape errors the cpu plugin finds
//    only then) is STICKY: returned by the call that ran it and by every call after; last_error names the
//    op and carries the cpu plugin's message. A bad free is sticky too.
// 5. DSMOE_STRICT_BREAK=<member>[,<member>...] silently DROPS those ops when they would run, to show that
//    the tests catch a missing synchronization: event_record (the event reads as completed at once, so
//    waits return early), copy_to_host (never writes), queue_wait_event (no cross-queue order), gemm...
//
// The cpu plugin is $DSMOE_STRICT_CPU_PLUGIN, else the build tree's (DSMOE_STRICT_CPU_PLUGIN_DEFAULT).
// Its settings are declared as strict's own ([kernel.strict] in a deck) and passed through to its init;
// strict's dtypes and its BF16 / FUSED_EPILOGUE / DETERMINISTIC / INFERENCE caps are the cpu plugin's,
// plus ASYNC; never HOST_MEMORY. Everything runs on the calling thread, queue_enqueue_host callbacks too.
// defines: DSMOE_KERNEL_PLUGIN_ENTRY (the only exported symbol), strict_fail, strict_dtypes
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "strict_internal.h"

#ifndef DSMOE_STRICT_CPU_PLUGIN_DEFAULT
#error "DSMOE_STRICT_CPU_PLUGIN_DEFAULT (the cpu plugin's path) must be defined by the build"
#endif

uint32_t strict_dtypes = DSMOE_DTYPE_BIT(DSMOE_FLOAT32);

// Writes the message of a failing call (kept while a sticky error stands: that one is the message).
dsmoe_status strict_fail(dsmoe_kernel_ctx *c, dsmoe_status s, const char *fmt, ...) {
    if (c->sticky) return s;
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(c->err, sizeof c->err, "strict: ");
    vsnprintf(c->err + n, sizeof c->err - (size_t)n, fmt, ap);
    va_end(ap);
    return s;
}

// ---------------------------------------------------------------------------------------------------
// The wrapped cpu plugin: opened once per process (the entry needs its dtypes and caps).

static const dsmoe_kernel_plugin_v3 *cpu_table;
static char cpu_error[1024];

static const dsmoe_kernel_plugin_v3 *load_cpu(void) {
    if (cpu_table) return cpu_table;
    const char *path = getenv("DSMOE_STRICT_CPU_PLUGIN");
    if (!path || !*path) path = DSMOE_STRICT_CPU_PLUGIN_DEFAULT;
    void *dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        snprintf(cpu_error, sizeof cpu_error, "strict: cannot load the cpu plugin it wraps: %s (set "
                 "DSMOE_STRICT_CPU_PLUGIN to its path)", dlerror());
        return NULL;
    }
    dsmoe_kernel_plugin_entry_fn entry = (dsmoe_kernel_plugin_entry_fn)dlsym(dl, DSMOE_KERNEL_PLUGIN_SYMBOL);
    const dsmoe_kernel_plugin_v3 *t = entry ? entry() : NULL;
    if (!t || t->api_version != DSMOE_KERNEL_API_VERSION || !t->init || !t->finalize || !t->last_error ||
        !t->describe || !t->default_queue || !t->queue_synchronize || !t->attention_bytes) {
        snprintf(cpu_error, sizeof cpu_error, "strict: %s is not a kernel plugin of ABI version %d with the "
                 "members strict needs (%s)", path, DSMOE_KERNEL_API_VERSION,
                 !entry ? "no " DSMOE_KERNEL_PLUGIN_SYMBOL : !t ? "its entry returned NULL" : "version or member");
        dlclose(dl);
        return NULL;
    }
    cpu_table = t; // the handle stays open for the process (the cpu plugin is linked nodelete anyway)
    return t;
}

// ---------------------------------------------------------------------------------------------------
// Lifecycle

static int env_flag(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

// DSMOE_STRICT_BREAK "a, b" -> ",a,b," (strict_queue.c looks names up as ",name,").
static void parse_breaks(char *out, size_t len) {
    const char *v = getenv("DSMOE_STRICT_BREAK");
    out[0] = 0;
    if (!v || !*v) return;
    size_t n = 0;
    out[n++] = ',';
    for (; *v && n + 2 < len; v++)
        if (*v != ' ') out[n++] = *v;
    out[n++] = ',';
    out[n] = 0;
}

static void free_ctx(dsmoe_kernel_ctx *c) {
    strict_protect_detach(c);
    for (dsmoe_kernel_queue *q = c->queues, *next; q; q = next) {
        next = q->next;
        free(q);
    }
    for (dsmoe_kernel_event *ev = c->events, *next; ev; ev = next) {
        next = ev->next;
        free(ev);
    }
    strict_release_all(c);
    free(c);
}

static dsmoe_status s_init(const dsmoe_kernel_options *opt, dsmoe_kernel_ctx **out, char *errbuf, size_t errlen) {
    char scratch[8];
    if (!errbuf || !errlen) errbuf = scratch, errlen = sizeof scratch;
    errbuf[0] = 0;
    if (!out || !opt) {
        snprintf(errbuf, errlen, "strict: init: %s is NULL", out ? "opt" : "ctx");
        return DSMOE_ERR_INVALID;
    }
    *out = NULL;
    const dsmoe_kernel_plugin_v3 *cpu = load_cpu();
    if (!cpu) {
        snprintf(errbuf, errlen, "%s", cpu_error);
        return DSMOE_ERR_IO;
    }
    dsmoe_kernel_ctx *c = calloc(1, sizeof *c);
    if (!c || !(c->queues = calloc(1, sizeof *c->queues))) {
        free(c);
        snprintf(errbuf, errlen, "strict: init: no host memory");
        return DSMOE_ERR_NOMEM;
    }
    c->cpu = cpu;
    c->page = (size_t)sysconf(_SC_PAGESIZE);
    c->protect = !env_flag("DSMOE_STRICT_NO_PROTECT");
    c->always_closed = env_flag("DSMOE_STRICT_ALWAYS_CLOSED");
    c->eager_host_fn = env_flag("DSMOE_STRICT_EAGER_HOST_FN");
    parse_breaks(c->breaks, sizeof c->breaks);
    // Same options (threads, pinning, logger, settings: strict declares the cpu plugin's as its own).
    char cerr[768] = "";
    dsmoe_status s = cpu->init(opt, &c->cc, cerr, sizeof cerr);
    if (s != DSMOE_OK) {
        snprintf(errbuf, errlen, "strict: the cpu plugin it wraps failed to initialise: %s", cerr);
        free_ctx(c);
        return s;
    }
    c->cq = cpu->default_queue(c->cc);
    snprintf(c->desc, sizeof c->desc, "strict: deferred queues%s, device memory %s%s%s; over %s",
             c->eager_host_fn ? " (host callbacks at once: DSMOE_STRICT_EAGER_HOST_FN)" : "",
             !c->protect ? "unprotected (DSMOE_STRICT_NO_PROTECT)"
             : c->always_closed ? "closed except while a queue runs (DSMOE_STRICT_ALWAYS_CLOSED)"
                                : "closed while work on it is queued",
             c->breaks[0] ? ", DROPPING (DSMOE_STRICT_BREAK) " : "", c->breaks[0] ? getenv("DSMOE_STRICT_BREAK") : "",
             cpu->describe(c->cc));
    if (opt->log && (opt->verbose || c->breaks[0]))
        opt->log(opt->log_user, c->breaks[0] ? DSMOE_LOG_WARN : DSMOE_LOG_INFO, c->desc);
    strict_protect_attach(c);
    *out = c;
    return DSMOE_OK;
}

// Waits for all queued work (its errors are dropped: there is no one left to tell), then frees it all.
static void s_finalize(dsmoe_kernel_ctx *c) {
    if (!c) return;
    strict_run_all(c);
    c->cpu->finalize(c->cc);
    free_ctx(c);
}

static const char *s_last_error(dsmoe_kernel_ctx *c) { return c ? c->err : ""; }
static const char *s_describe(dsmoe_kernel_ctx *c) { return c ? c->desc : "strict"; }

static dsmoe_status s_mem_info(dsmoe_kernel_ctx *c, size_t *free_bytes, size_t *total_bytes) {
    if (!c) return DSMOE_ERR_INVALID;
    if (c->sticky) return c->sticky;
    dsmoe_status s = c->cpu->mem_info(c->cc, free_bytes, total_bytes);
    return s ? strict_fail(c, s, "mem_info: %s", c->cpu->last_error(c->cc)) : s;
}

static dsmoe_status s_attention_bytes(dsmoe_kernel_ctx *c, const dsmoe_attention_shape *shape, size_t *saved,
                                      size_t *workspace) {
    const dsmoe_kernel_plugin_v3 *cpu = c ? c->cpu : load_cpu();
    if (!cpu) return DSMOE_ERR_IO;
    if (c && c->sticky) return c->sticky;
    dsmoe_status s = cpu->attention_bytes(c ? c->cc : NULL, shape, saved, workspace);
    if (s && c) strict_fail(c, s, "attention_bytes: %s", cpu->last_error(c->cc));
    return s;
}

// ---------------------------------------------------------------------------------------------------
// The table: filled once, by the entry, from the cpu plugin's (dtypes, caps, settings, optional members).

static dsmoe_kernel_plugin_v3 strict_table;

static void fill_table(void) {
    const dsmoe_kernel_plugin_v3 *cpu = load_cpu(); // NULL: init explains
    dsmoe_kernel_plugin_v3 *t = &strict_table;
    t->api_version = DSMOE_KERNEL_API_VERSION;
    t->name = "strict";
    t->description = "test plugin: the cpu plugin's ops on deferred queues over memory the host cannot touch";
    t->mem_kind = DSMOE_MEM_HOST; // host-progressed comm plugins may use it after a wait (see above)
    const char *kind = getenv("DSMOE_STRICT_MEM_KIND");
    if (kind && !strcmp(kind, "device")) t->mem_kind = DSMOE_MEM_CUDA;
    t->caps = DSMOE_KCAP_ASYNC;
    if (cpu)
        t->caps |= cpu->caps & (DSMOE_KCAP_BF16 | DSMOE_KCAP_FUSED_EPILOGUE | DSMOE_KCAP_DETERMINISTIC |
                                DSMOE_KCAP_INFERENCE);
    t->dtypes = cpu ? cpu->dtypes : DSMOE_DTYPE_BIT(DSMOE_FLOAT32);
    strict_dtypes = t->dtypes;
    t->params = cpu ? cpu->params : NULL;
    t->n_params = cpu ? cpu->n_params : 0;
    t->init = s_init;
    t->finalize = s_finalize;
    t->last_error = s_last_error;
    t->describe = s_describe;
    t->mem_info = cpu && cpu->mem_info ? s_mem_info : NULL;
    t->attention_bytes = s_attention_bytes;
    strict_fill_queue_members(t);
    strict_fill_mem_members(t);
    strict_fill_dense_members(t, cpu);
    strict_fill_moe_members(t, cpu);
    strict_fill_distill_members(t, cpu);
    if (!t->kv_append) t->caps &= ~(uint32_t)DSMOE_KCAP_INFERENCE;
}

DSMOE_PLUGIN_EXPORT const dsmoe_kernel_plugin_v3 *DSMOE_KERNEL_PLUGIN_ENTRY(void) {
    static int filled;
    if (!filled) {
        fill_table();
        filled = 1;
    }
    return &strict_table;
}
