// tests/cuda_emu/emu_device.cc: the fiber scheduler of the CUDA emulator (emu_device.h has the model).
// Fibers switch with a small x86-64 routine that saves the callee-saved registers and the stack pointer:
// swapcontext would make a system call at every barrier of every thread.
#include "emu_device.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cxxabi.h>
#include <vector>

#include "emu_runtime.h" // dsmoe_emu_set_last_error, dsmoe_emu_dynamic_shared_limit
#include "emu_streams.h" // dsmoe_emu_enqueue

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

// AddressSanitizer must be told of every stack switch, or it takes a fiber's frames for overflows of the
// host thread's stack.
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#ifdef EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#define EMU_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define EMU_FINISH_SWITCH(save, bottom_old, size_old) __sanitizer_finish_switch_fiber(save, bottom_old, size_old)
#else
#define EMU_START_SWITCH(save, bottom, size) ((void)0)
#define EMU_FINISH_SWITCH(save, bottom_old, size_old) ((void)0)
#endif

// Kernel code runs on one host thread at a time: a launch holds emu_lock for its whole run, and the blocks
// of a cooperative launch (each on a host thread of its own) hand it over at grid.sync(). So the ids below
// and `running` are plain globals, set by whichever thread holds the lock.
static pthread_mutex_t emu_lock = PTHREAD_MUTEX_INITIALIZER;
dsmoe_emu_ids dsmoe_emu_now;

// ---------------------------------------------------------------------------------------------------
// Fiber switch: dsmoe_emu_switch(&save, load) pushes rbp, rbx, r12-r15, stores rsp in *save, loads
// `load` as rsp, pops the same registers and returns on the other stack. A new fiber's stack is laid
// out as if it had been switched away from just before dsmoe_emu_fiber_entry.

extern "C" void dsmoe_emu_switch(void **save, void *load);
extern "C" void dsmoe_emu_fiber_entry(void);
extern "C" void dsmoe_emu_fiber_main(void);
asm(".text\n"
    ".p2align 4\n"
    ".globl dsmoe_emu_switch\n"
    ".hidden dsmoe_emu_switch\n"
    ".type dsmoe_emu_switch,@function\n"
    "dsmoe_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size dsmoe_emu_switch, .-dsmoe_emu_switch\n"
    ".globl dsmoe_emu_fiber_entry\n"
    ".hidden dsmoe_emu_fiber_entry\n"
    ".type dsmoe_emu_fiber_entry,@function\n"
    "dsmoe_emu_fiber_entry:\n"
    "  andq $-16, %rsp\n"
    "  call dsmoe_emu_fiber_main\n"
    "  ud2\n"
    ".size dsmoe_emu_fiber_entry, .-dsmoe_emu_fiber_entry\n");

// Kernels keep small arrays on the stack; a guard page below each stack turns an overflow into SIGSEGV.
#define EMU_STACK_BYTES (256u * 1024u)

enum wait_kind { RUNNABLE, AT_BARRIER, AT_WARP, AT_GRID, EXITED };
enum barrier_op { BAR_SYNC, BAR_COUNT, BAR_OR, BAR_AND };
enum warp_op { WARP_SYNC, WARP_BALLOT, WARP_SHUFFLE };

struct fiber {
    void *sp;
    char *stack; // mmap'ed: guard page + EMU_STACK_BYTES
    uint3 idx;
    int lane, warp;
    wait_kind wait;
    int op; // barrier_op or warp_op
    unsigned mask;
    int pred, src;
    uint64_t bits, result;
    const char *name; // a named warp operation's (dsmoe_emu_warp_collective), NULL for the others
    void *asan_fake_stack;
};

struct grid_state {
    pthread_barrier_t barrier;
};

// What the block's fibers wait at, counted as they arrive, so that the last one to arrive completes a
// barrier or warp operation at once and the scheduler never scans for it.
struct block_state {
    const char *kernel;
    fiber *f;
    int n;
    uint3 block_idx;
    dim3 block_dim, grid_dim;
    void (*body)(void *);
    void *ctx;
    void *scheduler_sp;
    const void *scheduler_stack; // its bottom and size, for AddressSanitizer
    size_t scheduler_stack_bytes;
    void *scheduler_fake_stack;
    fiber *current;
    void *dynamic_shared;
    grid_state *grid;
    int exited, at_barrier, at_grid, barrier_op, barrier_true;
    int warp_waiting[32]; // lanes of each warp at a warp operation
};

static block_state *running;
static thread_local std::vector<fiber> *fiber_pool; // stacks kept for the host thread's next block

static const char *kernel_name(const void *kernel, char *buf, size_t len) {
    Dl_info info = {};
    // Only an exported symbol that starts at the kernel is its name: with hidden visibility most kernels
    // have none, and dladdr would name the nearest exported function before them instead.
    if (dladdr(kernel, &info) && info.dli_sname && info.dli_saddr == kernel) {
        int status = 0;
        char *d = abi::__cxa_demangle(info.dli_sname, NULL, NULL, &status);
        snprintf(buf, len, "%s", d && status == 0 ? d : info.dli_sname);
        free(d);
    } else {
        snprintf(buf, len, "the kernel at %p (offset %#lx in %s; no exported symbol)", kernel,
                 info.dli_fbase ? (unsigned long)((const char *)kernel - (const char *)info.dli_fbase) : 0ul,
                 info.dli_fname ? info.dli_fname : "?");
    }
    return buf;
}

[[noreturn]] static void kernel_bug(const block_state *b, const char *what) {
    fprintf(stderr, "dsmoe CUDA emulator: %s, block (%u,%u,%u) of (%u,%u,%u) x (%u,%u,%u) threads: %s\n", b->kernel,
            b->block_idx.x, b->block_idx.y, b->block_idx.z, b->grid_dim.x, b->grid_dim.y, b->grid_dim.z,
            b->block_dim.x, b->block_dim.y, b->block_dim.z, what);
    fflush(stderr);
    abort();
}

static void set_block_ids(const block_state *b) {
    dsmoe_emu_now.block_idx = b->block_idx;
    dsmoe_emu_now.block_dim = make_uint3(b->block_dim.x, b->block_dim.y, b->block_dim.z);
    dsmoe_emu_now.grid_dim = make_uint3(b->grid_dim.x, b->grid_dim.y, b->grid_dim.z);
}

// ---------------------------------------------------------------------------------------------------
// Completing barriers and warp operations (by the fiber that arrives last, or exits last)

// The block barrier completes when every fiber that has not exited waits at it.
static int barrier_complete(block_state *b) {
    if (!b->at_barrier || b->at_barrier + b->exited != b->n)
        return 0;
    const uint64_t result = b->barrier_op == BAR_COUNT ? (uint64_t)b->barrier_true
                            : b->barrier_op == BAR_OR  ? (uint64_t)(b->barrier_true > 0)
                            : b->barrier_op == BAR_AND ? (uint64_t)(b->barrier_true == b->at_barrier)
                                                       : 0;
    for (int i = 0; i < b->n; i++)
        if (b->f[i].wait == AT_BARRIER) {
            b->f[i].result = result;
            b->f[i].wait = RUNNABLE;
        }
    b->at_barrier = b->barrier_true = 0;
    return 1;
}

// Lanes of warp w that a full mask names: the warp's lanes that exist (a block need not fill its last).
static unsigned warp_lanes(const block_state *b, int w) {
    const int lanes = b->n - w * 32 < 32 ? b->n - w * 32 : 32;
    return lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
}

// What a fiber waiting at a warp operation waits at, for messages.
static const char *warp_op_text(const fiber &f) {
    return f.name ? f.name : f.op == WARP_SYNC ? "__syncwarp" : f.op == WARP_BALLOT ? "__ballot_sync" : "a shuffle";
}
static int same_name(const char *a, const char *b) { return a == b || (a && b && !strcmp(a, b)); }

// Warp w's operation completes when every lane of its mask waits at it; `last` has just arrived.
static int warp_complete(block_state *b, int w, const fiber *last) {
    fiber *lane = b->f + (size_t)w * 32;
    const unsigned mask = last->mask & warp_lanes(b, w);
    if (b->warp_waiting[w] < __builtin_popcount(mask))
        return 0;
    const fiber *first = last;
    unsigned ballot = 0;
    for (int j = 0; j < 32; j++) {
        if (!(mask >> j & 1u))
            continue;
        if (lane[j].wait != AT_WARP)
            return 0;
        if (lane[j].mask != first->mask || lane[j].op != first->op || !same_name(lane[j].name, first->name)) {
            char what[256];
            snprintf(what, sizeof what,
                     "lanes of one warp wait at different warp operations (or masks): warp %d lane %d at %s "
                     "(mask %#x), lane %d at %s (mask %#x)",
                     w, j, warp_op_text(lane[j]), lane[j].mask, first->lane, warp_op_text(*first), first->mask);
            kernel_bug(b, what);
        }
        if (lane[j].pred)
            ballot |= 1u << j;
    }
    for (int j = 0; j < 32; j++) {
        if (!(mask >> j & 1u))
            continue;
        if (lane[j].op == WARP_SHUFFLE) {
            const int src = lane[j].src;
            if (src < 0 || src >= 32 || !(mask >> src & 1u))
                kernel_bug(b, "a shuffle reads a lane outside its mask");
            lane[j].result = lane[src].bits;
        } else {
            lane[j].result = ballot;
        }
        lane[j].wait = RUNNABLE;
    }
    b->warp_waiting[w] -= __builtin_popcount(mask);
    return 1;
}

// ---------------------------------------------------------------------------------------------------
// The fibers' side: wait at something, return when it has completed.

static void yield(void) {
    block_state *b = running;
    fiber *f = b->current;
    EMU_START_SWITCH(&f->asan_fake_stack, b->scheduler_stack, b->scheduler_stack_bytes);
    dsmoe_emu_switch(&f->sp, b->scheduler_sp); // back here once the scheduler resumes us
    EMU_FINISH_SWITCH(f->asan_fake_stack, NULL, NULL);
}

extern "C" void dsmoe_emu_fiber_main(void) {
    block_state *b = running;
    EMU_FINISH_SWITCH(NULL, &b->scheduler_stack, &b->scheduler_stack_bytes);
    b->body(b->ctx);
    b->current->wait = EXITED;
    b->exited++;
    barrier_complete(b); // the others may all wait at a barrier already
    EMU_START_SWITCH(NULL, b->scheduler_stack, b->scheduler_stack_bytes); // NULL: this stack is done
    dsmoe_emu_switch(&b->current->sp, b->scheduler_sp);
    abort(); // an exited fiber is never resumed
}

static fiber *self(const char *what) {
    if (!running || !running->current) {
        fprintf(stderr, "dsmoe CUDA emulator: %s called outside a kernel\n", what);
        abort();
    }
    return running->current;
}

static int block_barrier(barrier_op op, int pred) {
    block_state *b = running;
    fiber *f = self("__syncthreads");
    if (b->at_barrier && op != b->barrier_op)
        kernel_bug(b, "threads of the block wait at different kinds of __syncthreads");
    f->wait = AT_BARRIER;
    b->barrier_op = op;
    b->at_barrier++;
    b->barrier_true += pred != 0;
    if (!barrier_complete(b))
        yield();
    return (int)f->result;
}

extern "C" void dsmoe_emu_syncthreads(void) { block_barrier(BAR_SYNC, 0); }
extern "C" int dsmoe_emu_syncthreads_count(int pred) { return block_barrier(BAR_COUNT, pred); }
extern "C" int dsmoe_emu_syncthreads_or(int pred) { return block_barrier(BAR_OR, pred); }
extern "C" int dsmoe_emu_syncthreads_and(int pred) { return block_barrier(BAR_AND, pred); }

static uint64_t warp_wait(warp_op op, unsigned mask, int pred, uint64_t bits, int src, const char *name) {
    block_state *b = running;
    fiber *f = self("a warp operation");
    if (!(mask >> f->lane & 1u))
        kernel_bug(b, "a lane called a warp operation whose mask does not include it");
    f->wait = AT_WARP;
    f->op = op;
    f->mask = mask;
    f->pred = pred != 0;
    f->bits = bits;
    f->src = src;
    f->name = name;
    b->warp_waiting[f->warp]++;
    if (!warp_complete(b, f->warp, f))
        yield();
    return f->result;
}

extern "C" void dsmoe_emu_syncwarp(unsigned mask) { warp_wait(WARP_SYNC, mask, 0, 0, 0, NULL); }
extern "C" unsigned dsmoe_emu_ballot(unsigned mask, int pred) {
    return (unsigned)warp_wait(WARP_BALLOT, mask, pred, 0, 0, NULL);
}
extern "C" uint64_t dsmoe_emu_shuffle(unsigned mask, uint64_t bits, int src) {
    return warp_wait(WARP_SHUFFLE, mask, 0, bits, src, NULL);
}

// A barrier of the whole warp for an operation that needs its 32 lanes converged (include/mma.h's WMMA):
// named, so that it completes only with the same operation in every lane and a kernel bug names it.
extern "C" void dsmoe_emu_warp_collective(const char *name) {
    block_state *b = running;
    fiber *f = self(name);
    if (warp_lanes(b, f->warp) != 0xffffffffu) {
        char what[256];
        snprintf(what, sizeof what, "%s needs the 32 lanes of a warp; warp %d of the block has %d threads", name,
                 f->warp, b->n - f->warp * 32);
        kernel_bug(b, what);
    }
    warp_wait(WARP_SYNC, 0xffffffffu, 0, 0, 0, name);
}

// A kernel bug found outside the scheduler (include/mma.h's argument checks): named as the scheduler's own.
extern "C" [[noreturn]] void dsmoe_emu_kernel_bug(const char *what) {
    (void)self(what);
    kernel_bug(running, what);
}

extern "C" void dsmoe_emu_grid_sync(void) {
    block_state *b = running;
    fiber *f = self("grid.sync()");
    if (!b->grid)
        kernel_bug(b, "grid.sync() in a kernel that was not launched cooperatively");
    if (b->exited)
        kernel_bug(b, "grid.sync() after some threads of the block exited");
    f->wait = AT_GRID;
    if (++b->at_grid < b->n) {
        yield();
        return;
    }
    // The block's last thread: every block of the grid gets here; the others' threads need the lock.
    pthread_mutex_unlock(&emu_lock);
    pthread_barrier_wait(&b->grid->barrier);
    pthread_mutex_lock(&emu_lock);
    running = b;
    set_block_ids(b);
    dsmoe_emu_now.thread_idx = f->idx;
    for (int i = 0; i < b->n; i++)
        b->f[i].wait = RUNNABLE;
    b->at_grid = 0;
}

extern "C" void *dsmoe_emu_dynamic_shared(void) {
    (void)self("dynamic shared memory");
    return running->dynamic_shared;
}

// ---------------------------------------------------------------------------------------------------
// The scheduler's side

// Why nothing can run while some fibers have not exited: a kernel bug, named as precisely as we can.
[[noreturn]] static void stuck(block_state *b) {
    for (int w = 0; w * 32 < b->n; w++)
        for (int j = 0; j < 32 && w * 32 + j < b->n; j++) {
            const fiber &f = b->f[w * 32 + j];
            if (f.wait != AT_WARP)
                continue;
            for (int k = 0; k < 32 && w * 32 + k < b->n; k++)
                if ((f.mask >> k & 1u) && b->f[w * 32 + k].wait == EXITED) {
                    char what[256];
                    snprintf(what, sizeof what,
                             "a warp operation's mask names a lane that has exited: warp %d lane %d waits at %s "
                             "(mask %#x), lane %d has exited",
                             w, j, warp_op_text(f), f.mask, k);
                    kernel_bug(b, what);
                }
        }
    if (b->at_grid)
        kernel_bug(b, "threads wait at grid.sync() while others wait elsewhere");
    char what[384];
    int len = snprintf(what, sizeof what,
                       "deadlock: threads wait at barriers or warp operations that cannot complete (a __syncthreads "
                       "or a warp operation some threads do not reach)");
    for (int i = 0; i < b->n; i++)
        if (b->f[i].wait == AT_WARP) { // the first warp operation waited at, to name it
            snprintf(what + len, sizeof what - (size_t)len, "; warp %d lane %d waits at %s (mask %#x)", i / 32,
                     i % 32, warp_op_text(b->f[i]), b->f[i].mask);
            break;
        }
    kernel_bug(b, what);
}

static void make_stacks(size_t n) {
    if (!fiber_pool)
        fiber_pool = new std::vector<fiber>();
    const long page = sysconf(_SC_PAGESIZE);
    while (fiber_pool->size() < n) {
        fiber f = {};
        char *m = (char *)mmap(NULL, EMU_STACK_BYTES + (size_t)page, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            perror("dsmoe CUDA emulator: mmap (fiber stack)");
            abort();
        }
        mprotect(m, (size_t)page, PROT_NONE);
        f.stack = m + page;
        fiber_pool->push_back(f);
    }
}

static void free_stacks(void) {
    if (!fiber_pool)
        return;
    const long page = sysconf(_SC_PAGESIZE);
    for (fiber &f : *fiber_pool) munmap(f.stack - page, EMU_STACK_BYTES + (size_t)page);
    delete fiber_pool;
    fiber_pool = NULL;
}

// Runs one block to its end on this host thread.
static void run_block(block_state *b) {
    make_stacks((size_t)b->n);
    b->f = fiber_pool->data();
    const dim3 d = b->block_dim;
    for (int i = 0; i < b->n; i++) {
        fiber &f = b->f[i];
        f.idx = make_uint3((unsigned)i % d.x, ((unsigned)i / d.x) % d.y, (unsigned)i / (d.x * d.y));
        f.lane = i & 31;
        f.warp = i >> 5;
        f.wait = RUNNABLE;
        void **top = (void **)(f.stack + EMU_STACK_BYTES);
        *--top = NULL;                             // keeps the entry's frame 16-byte aligned
        *--top = (void *)dsmoe_emu_fiber_entry;    // where the first switch returns to
        for (int r = 0; r < 6; r++) *--top = NULL; // rbp, rbx, r12-r15
        f.sp = top;
    }
    b->exited = b->at_barrier = b->at_grid = b->barrier_true = 0;
    memset(b->warp_waiting, 0, sizeof b->warp_waiting);
    running = b;
    set_block_ids(b);
    // Warp by warp, each run as far as it can go (to a block barrier or its end) before the next, in
    // alternating orders: a warp that runs ahead of the others past a missing __syncthreads then
    // overwrites shared memory they have yet to read, and lanes that run in the other order expose a
    // missing __syncwarp.
    const int warps = (b->n + 31) / 32;
    for (int pass = 0; b->exited < b->n; pass++) {
        int ran = 0;
        for (int wi = 0; wi < warps; wi++) {
            const int w = pass & 1 ? warps - 1 - wi : wi;
            const int lanes = b->n - w * 32 < 32 ? b->n - w * 32 : 32;
            for (int progress = 1; progress;) {
                progress = 0;
                for (int j = 0; j < lanes; j++) {
                    fiber &f = b->f[w * 32 + (pass & 1 ? lanes - 1 - j : j)];
                    if (f.wait != RUNNABLE)
                        continue;
                    b->current = &f;
                    dsmoe_emu_now.thread_idx = f.idx;
                    EMU_START_SWITCH(&b->scheduler_fake_stack, f.stack, EMU_STACK_BYTES);
                    dsmoe_emu_switch(&b->scheduler_sp, f.sp);
                    EMU_FINISH_SWITCH(b->scheduler_fake_stack, NULL, NULL);
                    running = b; // a grid.sync() in between may have let other blocks run
                    set_block_ids(b);
                    progress = 1;
                    ran++;
                }
            }
        }
        b->current = NULL;
        if (!ran)
            stuck(b);
    }
    running = NULL;
}

// A block's dynamic shared memory: exactly the launch's bytes (under AddressSanitizer a kernel that reads
// or writes past them is reported), 128-byte aligned as a kernel may declare its extern __shared__ array
// (__align__(128)); WMMA fragments need 32. NaN bytes: shared memory starts undefined.
struct shared_block {
    void *p = nullptr;
    shared_block() = default;
    shared_block(const shared_block &) = delete;
    shared_block &operator=(const shared_block &) = delete;
    void make(size_t bytes) {
        if (!bytes) return;
        if (posix_memalign(&p, 128, bytes) != 0) {
            fprintf(stderr, "dsmoe CUDA emulator: cannot allocate %zu bytes of shared memory\n", bytes);
            abort();
        }
        memset(p, 0xff, bytes);
    }
    ~shared_block() { free(p); }
};

struct coop_block {
    block_state state;
    pthread_t thread;
};

static void *coop_main(void *arg) {
    pthread_mutex_lock(&emu_lock);
    run_block(&((coop_block *)arg)->state);
    pthread_mutex_unlock(&emu_lock);
    free_stacks(); // the host thread ends here
    return NULL;
}

// Runs every block of the grid; the caller holds emu_lock.
static void run_grid(const char *name, dim3 grid, dim3 block, size_t shared_bytes, int cooperative,
                     void (*body)(void *), void *ctx) {
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    block_state base = {};
    base.kernel = name;
    base.n = (int)threads;
    base.block_dim = block;
    base.grid_dim = grid;
    base.body = body;
    base.ctx = ctx;
    if (cooperative) {
        // Every block on a host thread of its own, all resident at once as a cooperative launch promises,
        // taking turns with the lock; this thread waits for them without it.
        grid_state gs;
        pthread_barrier_init(&gs.barrier, NULL, (unsigned)blocks);
        std::vector<coop_block> cbs((size_t)blocks);
        std::vector<shared_block> mem((size_t)blocks);
        for (unsigned long long i = 0; i < blocks; i++) {
            mem[i].make(shared_bytes);
            cbs[i].state = base;
            cbs[i].state.block_idx = make_uint3((unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y),
                                                (unsigned)(i / grid.x / grid.y));
            cbs[i].state.grid = &gs;
            cbs[i].state.dynamic_shared = mem[i].p;
            if (pthread_create(&cbs[i].thread, NULL, coop_main, &cbs[i]) != 0) {
                perror("dsmoe CUDA emulator: pthread_create (cooperative block)");
                abort();
            }
        }
        pthread_mutex_unlock(&emu_lock);
        for (unsigned long long i = 0; i < blocks; i++) pthread_join(cbs[i].thread, NULL);
        pthread_mutex_lock(&emu_lock);
        pthread_barrier_destroy(&gs.barrier);
        return;
    }
    // Blocks in a shuffled order: i -> (a*i + c) mod blocks visits every block once when a is coprime
    // with blocks; a and c change from launch to launch.
    static unsigned long long launches;
    const unsigned long long salt = ++launches * 0x9E3779B97F4A7C15ull;
    unsigned long long a = 1 + (salt >> 33) % blocks;
    for (;; a++) {
        unsigned long long x = a, y = blocks;
        while (y) {
            const unsigned long long t = x % y;
            x = y;
            y = t;
        }
        if (x == 1)
            break;
    }
    const unsigned long long c = (salt >> 13) % blocks;
    shared_block shared;
    shared.make(shared_bytes);
    for (unsigned long long i = 0; i < blocks; i++) {
        const unsigned long long k = (a * i + c) % blocks;
        block_state b = base;
        b.block_idx =
            make_uint3((unsigned)(k % grid.x), (unsigned)(k / grid.x % grid.y), (unsigned)(k / grid.x / grid.y));
        b.dynamic_shared = shared.p;
        if (shared_bytes) memset(shared.p, 0xff, shared_bytes); // shared memory starts undefined: NaN bytes
        run_block(&b);
    }
}

// A launch as queued on its stream.
struct launch {
    char name[512];
    dim3 grid, block;
    size_t shared_bytes;
    int cooperative;
    void (*body)(void *);
    void *ctx;
    void (*release)(void *);
};

static void launch_run(void *arg) {
    launch *l = (launch *)arg;
    pthread_mutex_lock(&emu_lock);
    run_grid(l->name, l->grid, l->block, l->shared_bytes, l->cooperative, l->body, l->ctx);
    pthread_mutex_unlock(&emu_lock);
    l->release(l->ctx);
    delete l;
}

extern "C" cudaError_t dsmoe_emu_run(const void *kernel, dim3 grid, dim3 block, size_t shared_bytes,
                                     cudaStream_t stream, int cooperative, void (*body)(void *), void *ctx,
                                     void (*release)(void *)) {
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    cudaError_t e = cudaSuccess;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
        e = cudaErrorInvalidConfiguration;
    else if (shared_bytes > dsmoe_emu_dynamic_shared_limit(kernel))
        e = cudaErrorInvalidValue;
    // The runtime's occupancy answer (2 blocks per SM, 4 SMs) bounds a cooperative grid.
    else if (cooperative && (unsigned long long)grid.x * grid.y * grid.z > 8)
        e = cudaErrorCooperativeLaunchTooLarge;
    if (e != cudaSuccess) {
        release(ctx);
        dsmoe_emu_set_last_error(e);
        return e;
    }
    launch *l = new launch{{0}, grid, block, shared_bytes, cooperative, body, ctx, release};
    kernel_name(kernel, l->name, sizeof l->name);
    dsmoe_emu_enqueue(stream, launch_run, l); // the stream's order (emu_streams.cc)
    return cudaSuccess;
}
