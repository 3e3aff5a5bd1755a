// tests/plugins/kernel/strict/strict_protect.c: the window rules of strict's device memory (strict_plugin.c
// states them) at page granularity, and the SIGSEGV handler that makes them byte-exact.
//
// Every queued op counts, per page, the byte ranges it reads or writes; a page with a count is
// PROT_NONE. Pages cannot tell bytes apart, and the core legitimately lets a host-progressed collective
// work on one part of a buffer while kernels are queued on another (the gradient slab: block l's
// all-reduce runs while block l-1's backward is queued): when such a page faults, the handler looks for
// a queued range holding the very byte touched. None: the page is opened and the access goes on
// (until an op touching the page is enqueued again). One: a real violation, which is reported on
// stderr (the op, the argument, the offset) before the process dies with SIGSEGV as it would have.
// On x86-64 a page let through is closed again right after the one instruction that faulted (the trap
// flag single-steps it; SIGTRAP re-protects), so the next access to it is checked again; elsewhere it
// stays open until the next enqueue touching it.
// A fresh buffer (no call that waits since its alloc) and DSMOE_STRICT_ALWAYS_CLOSED make every touch a
// violation, but for one case: a CUDA-aware MPI reads and writes device memory inside its collectives,
// and the test double of one (tests/plugins/comm/fake_cuda_aware_mpi.c, preloaded) tells strict when a thread
// is inside one. There, an access to bytes without queued work is let through (its page stays open, no
// single step) and every page so opened closes when the collective returns; bytes with queued work are
// still a violation. The handler chains to the one installed before it (Open MPI's backtrace printer, cmocka's)
// for faults outside strict memory and after a violation's message.
// defines: strict_pages_init, strict_range_add, strict_range_drop, strict_open_all, strict_settle_pages,
//          strict_protect_attach, strict_protect_detach
#define _GNU_SOURCE // sigaction's SA_SIGINFO under -std=c11
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include "strict_internal.h"

// ---------------------------------------------------------------------------------------------------
// Pages

// Sets pages [first, last] of a to open (or closed), one mprotect per run of pages that change.
static void set_pages(dsmoe_kernel_ctx *c, strict_alloc *a, size_t first, size_t last, int open) {
    if (a->host || !c->protect) return;
    size_t p = first;
    while (p <= last) {
        if (a->page_open[p] == open) {
            p++;
            continue;
        }
        size_t q = p;
        while (q + 1 <= last && a->page_open[q + 1] != open)
            q++;
        if (mprotect(a->base + p * c->page, (q - p + 1) * c->page, open ? PROT_READ | PROT_WRITE : PROT_NONE) != 0) {
            if (!c->sticky)
                c->sticky = strict_fail(c, DSMOE_ERR_SYSTEM, "mprotect of %zu pages failed: %s (too many mappings? "
                                        "see vm.max_map_count)", q - p + 1, strerror(errno));
            return;
        }
        memset(a->page_open + p, open, q - p + 1);
        p = q + 1;
    }
    if (!open) a->all_open = 0;
}

static void set_all(dsmoe_kernel_ctx *c, strict_alloc *a, int open) {
    if (a->host) return;
    if (open && a->all_open) return;
    set_pages(c, a, 0, a->n_pages - 1, open);
    if (open && !c->sticky) a->all_open = 1;
}

dsmoe_status strict_pages_init(dsmoe_kernel_ctx *c, strict_alloc *a) {
    a->n_pages = a->map_bytes / c->page;
    a->all_open = 1;
    if (a->host) return DSMOE_OK;
    a->page_pending = calloc(a->n_pages, sizeof *a->page_pending);
    a->page_open = malloc(a->n_pages);
    if (!a->page_pending || !a->page_open) return DSMOE_ERR_NOMEM;
    memset(a->page_open, 1, a->n_pages);
    a->fresh = 1;
    set_all(c, a, 0); // closed until a call that waits: a device may still be zeroing it
    return c->sticky;
}

void strict_range_add(dsmoe_kernel_ctx *c, const strict_range *r) {
    strict_alloc *a = r->a;
    a->pending++;
    if (a->host || r->len == 0) return;
    size_t first = r->off / c->page, last = (r->off + r->len - 1) / c->page;
    for (size_t p = first; p <= last; p++)
        a->page_pending[p]++;
    set_pages(c, a, first, last, 0);
}

void strict_range_drop(dsmoe_kernel_ctx *c, const strict_range *r) {
    strict_alloc *a = r->a;
    if (!a->host && r->len > 0) {
        size_t first = r->off / c->page, last = (r->off + r->len - 1) / c->page;
        for (size_t p = first; p <= last; p++)
            a->page_pending[p]--;
    }
    if (--a->pending == 0 && a->freed) strict_release(c, a);
}

void strict_open_all(dsmoe_kernel_ctx *c) {
    for (int i = 0; i < c->n_allocs; i++)
        set_all(c, c->allocs[i], 1);
}

// After a call that waits: pages without queued work open (closed with DSMOE_STRICT_ALWAYS_CLOSED).
void strict_settle_pages(dsmoe_kernel_ctx *c) {
    for (int i = 0; i < c->n_allocs; i++) {
        strict_alloc *a = c->allocs[i];
        if (a->host) continue;
        a->fresh = 0;
        if (c->always_closed) set_all(c, a, 0);
        else if (a->pending == 0) set_all(c, a, 1);
        else
            for (size_t p = 0, q; p < a->n_pages; p = q + 1) { // runs of pages with the same wish
                int open = a->page_pending[p] == 0;
                for (q = p; q + 1 < a->n_pages && (a->page_pending[q + 1] == 0) == open; q++) {}
                set_pages(c, a, p, q, open);
            }
    }
}

// ---------------------------------------------------------------------------------------------------
// The fault handler (process-wide: installed with the first protected context, removed with the last)

#define MAX_LIVE 64
static dsmoe_kernel_ctx *live[MAX_LIVE];
static int n_live;
static struct sigaction old_segv, old_trap;
static int installed;

// The previous handler; then, if it returned, the default action (a fault repeats and kills).
static void chain(const struct sigaction *old, int sig, siginfo_t *si, void *uc) {
    if ((old->sa_flags & SA_SIGINFO) && old->sa_sigaction) old->sa_sigaction(sig, si, uc);
    else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) old->sa_handler(sig);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, NULL);
}

#if defined(__x86_64__) && defined(REG_EFL)
#define STRICT_SINGLE_STEP 1
#define TRAP_FLAG 0x100
// Pages the faulting instruction of this thread was let through on (an access may straddle two).
static _Thread_local struct {
    dsmoe_kernel_ctx *c;
    strict_alloc *a;
    size_t p;
} stepping[4];
static _Thread_local int n_stepping;

// After the single-stepped instruction: its pages close again if queued work still covers them.
static void on_trap(int sig, siginfo_t *si, void *ucv) {
    if (n_stepping == 0) {
        chain(&old_trap, sig, si, ucv);
        return;
    }
    for (int i = 0; i < n_stepping; i++) {
        dsmoe_kernel_ctx *c = stepping[i].c;
        strict_alloc *a = stepping[i].a;
        size_t p = stepping[i].p;
        if (a->page_pending[p] > 0 && a->page_open[p] && mprotect(a->base + p * c->page, c->page, PROT_NONE) == 0)
            a->page_open[p] = 0;
    }
    n_stepping = 0;
    ((ucontext_t *)ucv)->uc_mcontext.gregs[REG_EFL] &= ~(greg_t)TRAP_FLAG;
}
#endif

static void say(const char *msg) {
    size_t n = strlen(msg);
    while (n > 0) {
        ssize_t w = write(2, msg, n);
        if (w <= 0) return;
        msg += w;
        n -= (size_t)w;
    }
}

// The device buffer whose mapping (page-rounded) holds addr, or NULL.
static strict_alloc *mapped(const dsmoe_kernel_ctx *c, const char *addr) {
    int lo = 0, hi = c->n_allocs; // first with base > addr
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (c->allocs[mid]->base <= addr) lo = mid + 1;
        else hi = mid;
    }
    strict_alloc *a = lo > 0 ? c->allocs[lo - 1] : NULL;
    return a && !a->host && addr < a->base + a->map_bytes ? a : NULL;
}

// The fake CUDA-aware MPI's window, when it is preloaded (found at the first attach; our hook is
// removed at the last detach, before this library may be unloaded).
static int (*mpi_in_collective)(void);
static void (*mpi_on_leave)(void (*)(void));

// Its collective returned: pages opened for it close again.
static void mpi_window_closed(void) {
    for (int i = 0; i < n_live; i++) {
        dsmoe_kernel_ctx *c = live[i];
        if (!c->mpi_opened) continue;
        c->mpi_opened = 0;
        for (int k = 0; k < c->n_allocs; k++)
            set_all(c, c->allocs[k], 0);
    }
}

static void on_segv(int sig, siginfo_t *si, void *uc) {
    const char *addr = si->si_addr;
    for (int i = 0; i < n_live; i++) {
        dsmoe_kernel_ctx *c = live[i];
        strict_alloc *a = mapped(c, addr);
        if (!a) continue;
        size_t off = (size_t)(addr - a->base), p = off / c->page;
        if (a->page_open[p]) break; // not closed by us: someone else's fault
        const strict_range *r = NULL;
        const strict_op *op = strict_pending_at(c, a, off, &r);
        int by_mpi = c->always_closed && mpi_in_collective && mpi_in_collective();
        if (!op && !a->fresh && (!c->always_closed || by_mpi)) {
            // Only other bytes of this page have queued work (or none, inside a CUDA-aware MPI's
            // collective): the access is legal, let it through.
            if (mprotect(a->base + p * c->page, c->page, PROT_READ | PROT_WRITE) == 0) {
                a->page_open[p] = 1;
                if (by_mpi && a->page_pending[p] == 0) { // open until the collective returns
                    c->mpi_opened = 1;
                    return;
                }
#ifdef STRICT_SINGLE_STEP
                if (n_stepping < 4) {
                    stepping[n_stepping].c = c, stepping[n_stepping].a = a, stepping[n_stepping].p = p;
                    n_stepping++;
                    ((ucontext_t *)uc)->uc_mcontext.gregs[REG_EFL] |= TRAP_FLAG;
                }
#endif
                return;
            }
        }
        char msg[512];
        if (op)
            snprintf(msg, sizeof msg, "strict: the host touched %p, byte %zu of a %zu-byte buffer from alloc(), while "
                     "the queued %s (argument %s) has still to run on it: a missing wait\n", (const void *)addr, off,
                     a->bytes, op->name, r->what);
        else if (a->fresh)
            snprintf(msg, sizeof msg, "strict: the host touched %p, byte %zu of a %zu-byte buffer from alloc(), before "
                     "any wait since its alloc (a device may still be zeroing it)\n", (const void *)addr, off, a->bytes);
        else
            snprintf(msg, sizeof msg, "strict: the host touched %p, byte %zu of a %zu-byte buffer from alloc(): "
                     "DSMOE_STRICT_ALWAYS_CLOSED forbids any host access to device memory%s\n", (const void *)addr, off,
                     a->bytes, mpi_in_collective ? " outside a collective of the CUDA-aware MPI" : "");
        say(msg);
        break;
    }
    chain(&old_segv, sig, si, uc);
}

void strict_protect_attach(dsmoe_kernel_ctx *c) {
    if (!c->protect || n_live == MAX_LIVE) return;
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, &old_segv) != 0) return;
#ifdef STRICT_SINGLE_STEP
        sa.sa_sigaction = on_trap;
        sigaction(SIGTRAP, &sa, &old_trap);
#endif
        installed = 1;
        mpi_on_leave = (void (*)(void (*)(void)))dlsym(RTLD_DEFAULT, "dsmoe_fake_cuda_mpi_on_leave");
        mpi_in_collective = (int (*)(void))dlsym(RTLD_DEFAULT, "dsmoe_fake_cuda_mpi_in_collective");
        if (mpi_on_leave && mpi_in_collective) mpi_on_leave(mpi_window_closed);
        else mpi_on_leave = NULL, mpi_in_collective = NULL;
    }
    live[n_live++] = c;
}

void strict_protect_detach(dsmoe_kernel_ctx *c) {
    for (int i = 0; i < n_live; i++)
        if (live[i] == c) live[i] = live[--n_live];
    if (installed && n_live == 0) {
        struct sigaction cur;
        // Put the old handler back only if ours is still the one installed (a test harness may have
        // installed its own since).
        if (sigaction(SIGSEGV, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_segv)
            sigaction(SIGSEGV, &old_segv, NULL);
#ifdef STRICT_SINGLE_STEP
        if (sigaction(SIGTRAP, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_trap)
            sigaction(SIGTRAP, &old_trap, NULL);
#endif
        if (mpi_on_leave) mpi_on_leave(NULL);
        mpi_on_leave = NULL, mpi_in_collective = NULL;
        installed = 0;
    }
}
