// bench/bench_bandwidth.h: the memory bandwidth that the decode bench (bench/bench_decode.c) divides a
// step's bytes by, measured in the memory the kernel plugin's buffers live in: a STREAM triad on host
// arrays for a plugin whose memory is host memory (caps DSMOE_KCAP_HOST_MEMORY: cpu), a device-to-device
// copy through the plugin's own members for any other (cuda; the test plugin strict on a machine without
// a GPU). bench_bandwidth.c's top says how each is measured and why.
// defines: bench_llc_bytes, bench_triad, bench_triad_init, bench_triad_measure, bench_triad_bytes_per_s,
//          bench_triad_read_bytes_per_s, bench_triad_free, bench_devcopy, bench_devcopy_init,
//          bench_devcopy_measure, bench_devcopy_bytes_per_s, bench_devcopy_free
//
// Functions that can fail return NULL on success, else a message for the caller to print before it exits
// (benchmarks stop at the first failure).
#ifndef DSMOE_BENCH_BANDWIDTH_H
#define DSMOE_BENCH_BANDWIDTH_H
#include <stddef.h>

#include "dsmoe/kernel_plugin.h"

// The host's last-level cache bytes; *source says where the figure came from.
size_t bench_llc_bytes(const char **source);

// --- host memory: the STREAM triad -------------------------------------------------------------------

typedef struct bench_triad {
    size_t n;               // doubles per array
    double *a, *b, *c;      // (n) each
    double triad_s, read_s; // best seconds so far
} bench_triad;

// Three arrays of max(4 x llc, 64 MiB), first touched by `threads` threads; huge: they ask for
// transparent huge pages (madvise), which the plugin's memory does not.
const char *bench_triad_init(bench_triad *bw, size_t llc, int threads, int huge);
// Best of `reps` triads and read-only sums on `threads` threads, kept across calls.
void bench_triad_measure(bench_triad *bw, int threads, int reps);
double bench_triad_bytes_per_s(const bench_triad *bw);      // counting 3 arrays, as STREAM does
double bench_triad_read_bytes_per_s(const bench_triad *bw); // the read-only sum's, one array
void bench_triad_free(bench_triad *bw);

// --- device memory: a copy through the plugin ------------------------------------------------------

typedef struct bench_devcopy {
    const dsmoe_kernel_plugin_v3 *kern;
    dsmoe_kernel_ctx *kctx;
    dsmoe_kernel_queue *q;
    size_t bytes;  // of each buffer
    void *a, *b;   // (bytes) each, plugin memory
    double best_s; // best seconds so far of one sample (a to b, then b to a)
    char rule[128]; // which cap set `bytes` (printed beside the figure)
} bench_devcopy;

// Two buffers on kern's memory, sized by the rule at the top of bench_bandwidth.c (llc: the host's
// last-level cache), and one untimed round trip; the copies go on queue q.
const char *bench_devcopy_init(bench_devcopy *c, const dsmoe_kernel_plugin_v3 *kern, dsmoe_kernel_ctx *kctx,
                               dsmoe_kernel_queue *q, size_t llc);
// Best of `reps` samples, kept across calls.
const char *bench_devcopy_measure(bench_devcopy *c, int reps);
double bench_devcopy_bytes_per_s(const bench_devcopy *c); // counting read + write of each copy
void bench_devcopy_free(bench_devcopy *c);

#endif
