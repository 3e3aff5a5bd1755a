// bench/bench_bandwidth.c: the decode bench's memory bandwidth (bench_bandwidth.h), in the memory the
// kernel plugin's buffers live in. bench_decode.c measures it before each timed repeat, under the same
// load, and keeps the best.
//
// Host memory (the plugin declares DSMOE_KCAP_HOST_MEMORY: cpu): a STREAM triad a[i] = b[i] + s*c[i] on
// three double arrays of 4x the last-level cache each (at least 64 MiB), with the decode's thread count,
// counting 3 arrays as STREAM does: with write-allocate the memory would move 4, but here the 3-array
// rate about equals what the same threads read alone (the read-only sum printed beside it), so a 4th
// array of traffic does not happen (the stores do not read their lines first, or it costs nothing).
// Measured twice, on arrays of 4 KiB pages (as malloc gives them, and as the plugin's memory is) and on
// arrays that ask for transparent huge pages: a hardware prefetcher stops at a page boundary, so 4 KiB
// pages cost one thread much of its bandwidth. The last-level cache size comes from
// /sys/devices/system/cpu/cpu0/cache (sysconf's on some AMD virtual machines is 10x the real one), else
// sysconf.
//
// Device memory (any other plugin: cuda; strict, which never declares HOST_MEMORY, stands in for it on
// a machine without a GPU): the host cannot touch the plugin's memory, and host DRAM's rate says nothing
// about a GPU's HBM, so the plugin moves the bytes itself. Two buffers from its alloc(), each
//   min(1 GiB, free / 4, and where the buffers are host memory (mem_kind DSMOE_MEM_HOST: strict) the
//   triad's size max(4 x last-level cache, 64 MiB)), rounded down to 2 MiB, at least 2 MiB:
// 1 GiB is 20x the L2 of an H100 or H200 (50 MB), so a copy streams from HBM; free is the plugin's
// mem_info (left out where it has none), and a quarter of it each leaves half of what was free to the
// rest of the run; host-memory buffers take no more than the triad would, which is enough to stream
// past the host's cache. A sample is a copy a to b then b to a (the plugin's `copy`, in order on the
// decode's queue), timed on the host from an idle context to the return of queue_synchronize: the
// plugin has no event timer, and two copies of a large buffer make the launch and the wait a small part
// of it. Each copy counts 2 x its bytes (read + write), as BabelStream's Copy does. The first round trip
// (page faults, first use of the copy path) is not timed. Under strict the figure is mostly strict's
// page protection, not memory: each run of a queue reopens the pages (mprotect), which the copy then
// faults in one by one; DSMOE_STRICT_NO_PROTECT=1 leaves the memcpy it runs.
// defines: bench_llc_bytes, bench_triad_*, bench_devcopy_* (bench_bandwidth.h)
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h> // madvise
#include <unistd.h>   // sysconf

#include "bench_bandwidth.h"
#include "util.h" // dsmoe_now_seconds

#define MIB ((size_t)1 << 20)

size_t bench_llc_bytes(const char **source) {
    size_t best = 0;
    int best_level = 0;
    for (int i = 0; i < 16; i++) {
        char path[128], type[32] = "", size[32] = "";
        int level = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", i);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        int ok = fscanf(f, "%d", &level) == 1;
        fclose(f);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/type", i);
        if ((f = fopen(path, "r"))) {
            ok = ok && fscanf(f, "%31s", type) == 1;
            fclose(f);
        }
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
        if ((f = fopen(path, "r"))) {
            ok = ok && fscanf(f, "%31s", size) == 1;
            fclose(f);
        }
        if (!ok || !strcmp(type, "Instruction") || level < best_level) continue;
        char *end;
        double v = strtod(size, &end);
        double mult = *end == 'K' ? 1024.0 : *end == 'M' ? 1048576.0 : *end == 'G' ? 1073741824.0 : 1.0;
        if (v > 0) {
            best = (size_t)(v * mult);
            best_level = level;
        }
    }
    if (best) {
        *source = "sysfs cpu0/cache";
        return best;
    }
    long s = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (s <= 0) s = sysconf(_SC_LEVEL2_CACHE_SIZE);
    *source = s > 0 ? "sysconf" : "unknown, assumed 32 MiB";
    return s > 0 ? (size_t)s : 32 * MIB;
}

// The triad's arrays, and the device copy's cap where its buffers are host memory.
static size_t triad_bytes(size_t llc) { return 4 * llc > 64 * MIB ? 4 * llc : 64 * MIB; }

// ----------------------------------------------------------------------------------------------------
// host memory: the STREAM triad

const char *bench_triad_init(bench_triad *bw, size_t llc, int threads, int huge) {
    const size_t page2m = 2 * MIB;
    size_t bytes = (triad_bytes(llc) + page2m - 1) / page2m * page2m;
    memset(bw, 0, sizeof *bw);
    bw->n = bytes / sizeof(double);
    double **arrays[3] = {&bw->a, &bw->b, &bw->c};
    for (int i = 0; i < 3; i++) {
        *arrays[i] = huge ? aligned_alloc(page2m, bytes) : malloc(bytes);
        if (!*arrays[i]) {
            bench_triad_free(bw);
            return "bandwidth arrays: out of memory";
        }
        if (huge) madvise(*arrays[i], bytes, MADV_HUGEPAGE); // a hint: ignored where THP is off
    }
    bw->triad_s = bw->read_s = INFINITY;
    long n = (long)bw->n;
    double *a = bw->a, *b = bw->b, *c = bw->c;
#pragma omp parallel for num_threads(threads) schedule(static) // first touch by the threads that use the pages
    for (long i = 0; i < n; i++) {
        a[i] = 0.0;
        b[i] = 1.0;
        c[i] = 2.0;
    }
    return NULL;
}

void bench_triad_free(bench_triad *bw) {
    free(bw->a);
    free(bw->b);
    free(bw->c);
    bw->a = bw->b = bw->c = NULL;
}

// The sum keeps 16 partial sums per thread so that it is not bound by the latency of one chain of
// additions.
void bench_triad_measure(bench_triad *bw, int threads, int reps) {
    long n = (long)bw->n, blocks = n / 16;
    double *a = bw->a, *b = bw->b, *c = bw->c, s = 3.0, sink = 0.0;
    for (int r = 0; r < reps; r++) {
        double t0 = dsmoe_now_seconds();
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long i = 0; i < n; i++) a[i] = b[i] + s * c[i];
        double t = dsmoe_now_seconds() - t0;
        if (t < bw->triad_s) bw->triad_s = t;
        double sum = 0.0;
        t0 = dsmoe_now_seconds();
#pragma omp parallel num_threads(threads) reduction(+ : sum)
        {
            double acc[16] = {0};
#pragma omp for schedule(static)
            for (long i = 0; i < blocks; i++)
                for (int j = 0; j < 16; j++) acc[j] += a[16 * i + j];
            for (int j = 0; j < 16; j++) sum += acc[j];
        }
        t = dsmoe_now_seconds() - t0;
        if (t < bw->read_s) bw->read_s = t;
        sink += sum;
    }
    if (sink == 42.0) printf("\n"); // keeps the sums
}

double bench_triad_bytes_per_s(const bench_triad *bw) { return 3.0 * bw->n * sizeof(double) / bw->triad_s; }

double bench_triad_read_bytes_per_s(const bench_triad *bw) { return bw->n * sizeof(double) / bw->read_s; }

// ----------------------------------------------------------------------------------------------------
// device memory: a copy through the plugin

static char devcopy_msg[512]; // a failure's message: the bench prints it and exits

static const char *devcopy_fail(const bench_devcopy *c, const char *what) {
    snprintf(devcopy_msg, sizeof devcopy_msg, "kernel plugin '%s': %s: %s", c->kern->name, what,
             c->kern->last_error(c->kctx));
    return devcopy_msg;
}

// One sample: a to b, then b to a, enqueued on an idle context; seconds until the queue has run them.
static const char *round_trip(bench_devcopy *c, double *seconds) {
    if (c->kern->synchronize(c->kctx) != DSMOE_OK) return devcopy_fail(c, "synchronize");
    double t0 = dsmoe_now_seconds();
    if (c->kern->copy(c->kctx, c->q, c->b, c->a, c->bytes) != DSMOE_OK) return devcopy_fail(c, "copy");
    if (c->kern->copy(c->kctx, c->q, c->a, c->b, c->bytes) != DSMOE_OK) return devcopy_fail(c, "copy");
    if (c->kern->queue_synchronize(c->kctx, c->q) != DSMOE_OK) return devcopy_fail(c, "queue_synchronize");
    *seconds = dsmoe_now_seconds() - t0;
    return NULL;
}

const char *bench_devcopy_init(bench_devcopy *c, const dsmoe_kernel_plugin_v3 *kern, dsmoe_kernel_ctx *kctx,
                               dsmoe_kernel_queue *q, size_t llc) {
    *c = (bench_devcopy){.kern = kern, .kctx = kctx, .q = q, .bytes = 1024 * MIB, .best_s = INFINITY};
    snprintf(c->rule, sizeof c->rule, "the 1 GiB default");
    if ((kern->mem_kind & DSMOE_MEM_HOST) && triad_bytes(llc) < c->bytes) {
        c->bytes = triad_bytes(llc);
        snprintf(c->rule, sizeof c->rule, "host memory: the triad's size, max(4 x last-level cache, 64 MiB)");
    }
    size_t free_bytes = 0, total_bytes = 0;
    if (kern->mem_info) {
        if (kern->mem_info(kctx, &free_bytes, &total_bytes) != DSMOE_OK) return devcopy_fail(c, "mem_info");
        if (free_bytes / 4 < c->bytes) {
            c->bytes = free_bytes / 4;
            snprintf(c->rule, sizeof c->rule, "a quarter of the %.0f MiB free", free_bytes / 1048576.0);
        }
    }
    c->bytes = c->bytes / (2 * MIB) * (2 * MIB);
    if (c->bytes == 0) {
        snprintf(devcopy_msg, sizeof devcopy_msg, "kernel plugin '%s': %.1f MiB of device memory free: too little "
                 "for two 2 MiB buffers to measure the bandwidth on", kern->name, free_bytes / 1048576.0);
        return devcopy_msg;
    }
    if (kern->alloc(kctx, c->bytes, DSMOE_ALLOC_ZERO, &c->a) != DSMOE_OK) return devcopy_fail(c, "alloc");
    if (kern->alloc(kctx, c->bytes, DSMOE_ALLOC_ZERO, &c->b) != DSMOE_OK) return devcopy_fail(c, "alloc");
    double untimed;
    return round_trip(c, &untimed);
}

const char *bench_devcopy_measure(bench_devcopy *c, int reps) {
    for (int r = 0; r < reps; r++) {
        double t;
        const char *msg = round_trip(c, &t);
        if (msg) return msg;
        if (t < c->best_s) c->best_s = t;
    }
    return NULL;
}

// Two copies a sample, each reading and writing `bytes`.
double bench_devcopy_bytes_per_s(const bench_devcopy *c) { return 2.0 * 2.0 * c->bytes / c->best_s; }

void bench_devcopy_free(bench_devcopy *c) {
    if (c->kern) {
        c->kern->free(c->kctx, c->a);
        c->kern->free(c->kctx, c->b);
    }
    c->a = c->b = NULL;
}
