// plugins/cpu/cpu_plugin.c: the "cpu" expert-kernel plugin: its table, context, host memory, GEMM
// through OpenBLAS, and the element-wise ops and the optimizer. The GPT layer ops are in cpu_ops.c,
// gating, dispatch and combine in cpu_gating.c.
// defines: DSMOE_KERNEL_PLUGIN_ENTRY (dsmoe_kernel_plugin_entry_v1), the only exported symbol
//
// Contracts are the comments in include/dsmoe/kernel_plugin.h. Invariants of this file: buffers are
// host memory (mem_kind DSMOE_MEM_HOST) so every op runs synchronously and synchronize() is a no-op;
// forward outputs are assigned, backward outputs accumulate (+=); a result never depends on the
// thread count (reductions use a fixed blocking, see sum_squares and bias_backward).
#define _GNU_SOURCE // sched_setaffinity, CPU_SET
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h> // cblas_sgemm, openblas_set_num_threads, openblas_get_config, openblas_get_parallel

#include "dsmoe/rng.h" // dsmoe_rng_uniform
#include "cpu_ops.h"   // CPU_REQUIRE, CPU_PAR_MIN, the cpu_ops.c ops

// ---------------------------------------------------------------------------------------------------
// Context

// Threads: options->threads, else the first number of OMP_NUM_THREADS ("4" or "4,2"), else 1.
static dsmoe_status resolve_threads(const dsmoe_kernel_options *opt, int *threads, char *errbuf, size_t errlen) {
    if (opt && opt->threads < 0) {
        snprintf(errbuf, errlen, "cpu: init: threads=%d: expected 0 (automatic) or a positive count", opt->threads);
        return DSMOE_ERR_INVALID;
    }
    if (opt && opt->threads > 0) {
        *threads = opt->threads;
        return DSMOE_OK;
    }
    const char *env = getenv("OMP_NUM_THREADS");
    if (!env || !*env) {
        *threads = 1;
        return DSMOE_OK;
    }
    char *end;
    long v = strtol(env, &end, 10);
    if (end == env || v < 1 || v > 4096 || (*end && *end != ',')) {
        snprintf(errbuf, errlen, "cpu: init: OMP_NUM_THREADS='%s': expected a positive thread count", env);
        return DSMOE_ERR_INVALID;
    }
    *threads = (int)v;
    return DSMOE_OK;
}

static const char *blas_threading_name(int parallel) {
    switch (parallel) {
    case 0: return "sequential";
    case 1: return "pthreads";
    case 2: return "OpenMP";
    }
    return "unknown";
}

// Pins OpenMP thread t to thread_cpus[t % n] (options contract). libgomp keeps its team threads for later
// regions of the same size, which is every region of this plugin (num_threads(ctx->threads)), so the
// pinning holds for the run. Fills errbuf and returns non-OK when the OS refuses a CPU.
static dsmoe_status pin_threads(int threads, const int *cpus, int n, char *errbuf, size_t errlen) {
    int failed_cpu = -1;
#pragma omp parallel num_threads(threads)
    {
        int cpu = cpus[omp_get_thread_num() % n];
        cpu_set_t one;
        CPU_ZERO(&one);
        if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_SET(cpu, &one);
        if (cpu < 0 || cpu >= CPU_SETSIZE || sched_setaffinity(0, sizeof one, &one) != 0) {
#pragma omp critical
            failed_cpu = cpu;
        }
    }
    if (failed_cpu == -1) return DSMOE_OK;
    snprintf(errbuf, errlen, "cpu: init: cannot pin a compute thread to CPU %d (options.thread_cpus): not a CPU "
             "this process may use", failed_cpu);
    return DSMOE_ERR_INVALID;
}

// GEMM output tiles (rows, columns), each one single-threaded BLAS call: see the GEMM section.
#define GEMM_TILE_M 256
#define GEMM_TILE_N 256

static dsmoe_status cpu_init(const dsmoe_kernel_options *opt, dsmoe_kernel_ctx **out, char *errbuf, size_t errlen) {
    *out = NULL;
    int threads;
    dsmoe_status s = resolve_threads(opt, &threads, errbuf, errlen);
    if (s != DSMOE_OK)
        return s;
    dsmoe_kernel_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        snprintf(errbuf, errlen, "cpu: init: cannot allocate the context (%zu bytes)", sizeof *ctx);
        return DSMOE_ERR_NOMEM;
    }
    ctx->threads = threads;
    cpu_blas_single_threaded();
    if (opt && opt->thread_cpus && opt->n_thread_cpus > 0) {
        s = pin_threads(threads, opt->thread_cpus, opt->n_thread_cpus, errbuf, errlen);
        if (s != DSMOE_OK) {
            free(ctx);
            return s;
        }
    }
    // openblas_get_config() is e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64 " (the
    // trailing space is OpenBLAS's).
    char blas[256];
    snprintf(blas, sizeof blas, "%s", openblas_get_config());
    for (size_t n = strlen(blas); n > 0 && blas[n - 1] == ' '; n--)
        blas[n - 1] = '\0';
    int parallel = openblas_get_parallel();
    snprintf(ctx->description, sizeof ctx->description,
             "cpu: %s (%s build, called single-threaded on %dx%d GEMM tiles), %d OpenMP thread%s%s", blas,
             blas_threading_name(parallel), GEMM_TILE_M, GEMM_TILE_N, threads, threads == 1 ? "" : "s",
             opt && opt->thread_cpus && opt->n_thread_cpus > 0 ? " pinned to one CPU each" : "");
    if (opt && opt->verbose)
        fprintf(stderr, "dsmoe: kernel plugin %s\n", ctx->description);
    *out = ctx;
    return DSMOE_OK;
}

static void cpu_finalize(dsmoe_kernel_ctx *ctx) { free(ctx); }

static const char *cpu_last_error(dsmoe_kernel_ctx *ctx) { return ctx ? ctx->error : "cpu: no context"; }

static const char *cpu_describe(dsmoe_kernel_ctx *ctx) { return ctx->description; }

// ---------------------------------------------------------------------------------------------------
// Memory: plain host memory, 64-byte aligned (a cache line, and an AVX-512 vector).

static dsmoe_status cpu_alloc(dsmoe_kernel_ctx *ctx, size_t bytes, void **ptr) {
    *ptr = NULL;
    // aligned_alloc wants a multiple of the alignment; 0 bytes still gets a unique 64-byte block.
    size_t rounded = bytes == 0 ? 64 : (bytes + 63) & ~(size_t)63;
    if (rounded < bytes)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: alloc: %zu bytes is too large", bytes);
    void *p = aligned_alloc(64, rounded);
    if (!p)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: alloc: cannot allocate %zu bytes of host memory", bytes);
    memset(p, 0, rounded);
    *ptr = p;
    return DSMOE_OK;
}

static void cpu_free(dsmoe_kernel_ctx *ctx, void *ptr) { free(ptr); }

static dsmoe_status cpu_copy(dsmoe_kernel_ctx *ctx, void *dst, const void *src, size_t bytes) {
    if (bytes == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dst && src, "cpu: copy: NULL %s with bytes=%zu", dst ? "source" : "destination", bytes);
    memmove(dst, src, bytes);
    return DSMOE_OK;
}

static dsmoe_status cpu_zero(dsmoe_kernel_ctx *ctx, void *dst, size_t bytes) {
    if (bytes == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dst, "cpu: zero: NULL buffer with bytes=%zu", bytes);
    memset(dst, 0, bytes);
    return DSMOE_OK;
}

static dsmoe_status cpu_synchronize(dsmoe_kernel_ctx *ctx) { return DSMOE_OK; }

// ---------------------------------------------------------------------------------------------------
// GEMM: fixed output tiles, one single-threaded OpenBLAS call per tile, tiles spread over our threads.
//
// Why not BLAS's own threading: OpenBLAS splits m and n by the thread count, and its edge kernels sum
// in another order than its full ones, so a 200x300x400 product differs in the last bits between 1
// and 2 threads; the contract wants results independent of the thread count. Tiles whose shape
// depends only on (m, n) make each output element the work of the same single-threaded call whatever
// the thread count. A grouped GEMM puts the tiles of all its groups in one parallel loop, so small
// per-expert groups still fill every thread.
//
// What was measured (2-core AMD EPYC with AVX2, Debian 12; this shared machine varies by 10-30%
// between runs, so only numbers from one session are compared; "(m,n,k)" row-major, GFLOP/s):
//
//   native threading of each library   OpenBLAS pthreads   OpenBLAS OpenMP   oneDNN 2.6 dnnl_sgemm
//   1 thread  (512,3072,768) NN/NT/TN      77-79             68-77             70-76
//   1 thread  (512,768,3072) NN/NT/TN      67-79             77-80             67-77
//   2 threads (512,3072,768) NN/NT/TN     149-157             81-121           105-125
//   2 threads (512,768,3072) NN/NT/TN     145-156            118-120           123-127
//   2 threads (3072,768,512) TN (wgrad)    80-134            118-119           121-127
//   2 threads, six per-expert GEMMs,       117-119           112-121           103-104
//     m = 32 and 128                                                          (30-65 on NN (m,3072,768))
//
// Alone, OpenBLAS's pthreads build is fastest, but between GEMMs OpenMP loops run and the two thread
// pools spin against each other: one expert-MLP step (S=512, M=768, F=3072; 6 GEMMs plus GELU and
// bias loops, forward and backward), medians at 2 threads: pthreads 188 ms, OpenMP build 153 ms,
// oneDNN 162 ms (1 thread: 292 / 274 / 262 ms). With the 256x256 tiles below (BLAS single-threaded,
// so no second thread pool at all) the same step took 143-184 ms with either OpenBLAS build (GEMMs
// 104-133 GFLOP/s); tiles cost about 5-10% at 1 thread (58-66 vs 60-72 GFLOP/s over the shapes
// above). oneDNN's single-thread kernels are no faster and weak on (m,3072,768) NN, the per-expert
// dgrad, and bring a large dependency. So: tiles over OpenBLAS, whichever build pkg-config finds
// (libopenblas-dev); describe() names the build.

// Runs BLAS single-threaded for good: with blas_cpu_number = 1 both builds skip their own threading
// (the OpenMP build also when called outside a parallel region). openblas_set_num_threads also sets
// the calling thread's OpenMP default team size in the OpenMP build; that is put back.
void cpu_blas_single_threaded(void) {
    if (openblas_get_num_threads() != 1) {
        int omp_default = omp_get_max_threads();
        openblas_set_num_threads(1);
        omp_set_num_threads(omp_default);
    }
}

static int imax1(int v) { return v > 1 ? v : 1; }

// Checks the shape arguments of a GEMM: op(a) (m, k), op(b) (k, n), c (m, n), row-major.
static dsmoe_status check_gemm_dims(dsmoe_kernel_ctx *ctx, const char *op, int ta, int tb, int m, int n, int k,
                                    int lda, int ldb, int ldc) {
    CPU_REQUIRE(ctx, m >= 0 && n >= 0 && k >= 0, "cpu: %s: m=%d n=%d k=%d: expected sizes >= 0", op, m, n, k);
    int a_cols = ta ? m : k, b_cols = tb ? k : n;
    CPU_REQUIRE(ctx, lda >= imax1(a_cols), "cpu: %s: lda=%d < %d (a is stored (%s) = (%d, %d))", op, lda,
                imax1(a_cols), ta ? "k, m" : "m, k", ta ? k : m, a_cols);
    CPU_REQUIRE(ctx, ldb >= imax1(b_cols), "cpu: %s: ldb=%d < %d (b is stored (%s) = (%d, %d))", op, ldb,
                imax1(b_cols), tb ? "n, k" : "k, n", tb ? n : k, b_cols);
    CPU_REQUIRE(ctx, ldc >= imax1(n), "cpu: %s: ldc=%d < n=%d", op, ldc, imax1(n));
    return DSMOE_OK;
}

// One tile: rows [i0, i0+mm) and columns [j0, j0+nn) of c = alpha op(a) op(b) + beta c.
static void gemm_tile(int ta, int tb, int i0, int j0, int mm, int nn, int k, float alpha, const float *a, int lda,
                      const float *b, int ldb, float beta, float *c, int ldc) {
    const float *at = ta ? a + i0 : a + (size_t)i0 * lda;
    const float *bt = tb ? b + (size_t)j0 * ldb : b + j0;
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, mm, nn, k, alpha, at,
                lda, bt, ldb, beta, c + (size_t)i0 * ldc + j0, ldc);
}

// c[g] (m[g], n) = alpha op(a[g]) op(b[g]) + beta c[g] for every group, all tiles in one loop. Callers
// have checked the arguments. first[g] = index of group g's first tile; (groups + 1) ints.
static void gemm_tiled(const dsmoe_kernel_ctx *ctx, int groups, int ta, int tb, const int *m, int n, int k,
                       float alpha, const float *const *a, int lda, const float *const *b, int ldb, float beta,
                       float *const *c, int ldc, long *first) {
    long tn = (n + GEMM_TILE_N - 1) / GEMM_TILE_N;
    first[0] = 0;
    for (int g = 0; g < groups; g++)
        first[g + 1] = first[g] + (m[g] + GEMM_TILE_M - 1) / GEMM_TILE_M * tn;
    long tiles = first[groups];
    cpu_blas_single_threaded();
#pragma omp parallel num_threads(ctx->threads) if (tiles > 1)
    {
        int g = 0;
#pragma omp for schedule(monotonic: dynamic, 1)
        for (long t = 0; t < tiles; t++) {
            while (first[g + 1] <= t) // monotonic: tiles come in increasing order per thread, g only moves forward
                g++;
            long local = t - first[g];
            int i0 = (int)(local / tn) * GEMM_TILE_M, j0 = (int)(local % tn) * GEMM_TILE_N;
            int mm = m[g] - i0 < GEMM_TILE_M ? m[g] - i0 : GEMM_TILE_M;
            int nn = n - j0 < GEMM_TILE_N ? n - j0 : GEMM_TILE_N;
            gemm_tile(ta, tb, i0, j0, mm, nn, k, alpha, a[g], lda, b[g], ldb, beta, c[g], ldc);
        }
    }
}

static dsmoe_status cpu_gemm(dsmoe_kernel_ctx *ctx, int trans_a, int trans_b, int m, int n, int k, float alpha,
                             const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    dsmoe_status s = check_gemm_dims(ctx, "gemm", trans_a, trans_b, m, n, k, lda, ldb, ldc);
    if (s != DSMOE_OK)
        return s;
    if (m == 0 || n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, c && (k == 0 || (a && b)), "cpu: gemm: NULL %s with m=%d n=%d k=%d", !c ? "c" : !a ? "a" : "b",
                m, n, k);
    long first[2];
    gemm_tiled(ctx, 1, trans_a, trans_b, &m, n, k, alpha, &a, lda, &b, ldb, beta, &c, ldc, first);
    return DSMOE_OK;
}

// Groups up to this count keep their tile offsets on the stack.
#define GEMM_STACK_GROUPS 256

static dsmoe_status cpu_gemm_grouped(dsmoe_kernel_ctx *ctx, int groups, int trans_a, int trans_b, const int *m,
                                     int n, int k, float alpha, const float *const *a, int lda,
                                     const float *const *b, int ldb, float beta, float *const *c, int ldc) {
    CPU_REQUIRE(ctx, groups >= 0, "cpu: gemm_grouped: groups=%d: expected >= 0", groups);
    if (groups == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, m && a && b && c, "cpu: gemm_grouped: NULL host array (m, a, b or c) with groups=%d", groups);
    for (int g = 0; g < groups; g++) {
        char op[48];
        snprintf(op, sizeof op, "gemm_grouped group %d", g);
        dsmoe_status s = check_gemm_dims(ctx, op, trans_a, trans_b, m[g], n, k, lda, ldb, ldc);
        if (s != DSMOE_OK)
            return s;
        CPU_REQUIRE(ctx, m[g] == 0 || n == 0 || (c[g] && (k == 0 || (a[g] && b[g]))),
                    "cpu: gemm_grouped: group %d: NULL a, b or c with m=%d n=%d k=%d", g, m[g], n, k);
    }
    if (n == 0)
        return DSMOE_OK;
    long stack_first[GEMM_STACK_GROUPS + 1], *first = stack_first;
    if (groups > GEMM_STACK_GROUPS && !(first = malloc(sizeof(long) * (groups + 1))))
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: gemm_grouped: cannot allocate tile offsets for %d groups", groups);
    gemm_tiled(ctx, groups, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, first);
    if (first != stack_first)
        free(first);
    return DSMOE_OK;
}

// dw[g] (n, k) += alpha * dy[g]^T (n, m[g]) @ x[g] (m[g], k): a grouped GEMM with op(a) = dy^T,
// whose inner dimension m[g] differs per group, so the groups are tiled here rather than by
// gemm_tiled (which shares k).
static dsmoe_status cpu_gemm_grouped_wgrad(dsmoe_kernel_ctx *ctx, int groups, const int *m, int n, int k,
                                           float alpha, const float *const *dy, const float *const *x,
                                           float *const *dw) {
    CPU_REQUIRE(ctx, groups >= 0 && n >= 0 && k >= 0, "cpu: gemm_grouped_wgrad: groups=%d n=%d k=%d: expected >= 0",
                groups, n, k);
    if (groups == 0 || n == 0 || k == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, m && dy && x && dw, "cpu: gemm_grouped_wgrad: NULL host array (m, dy, x or dw) with groups=%d",
                groups);
    int active = 0;
    for (int g = 0; g < groups; g++) {
        CPU_REQUIRE(ctx, m[g] >= 0, "cpu: gemm_grouped_wgrad: group %d: m=%d: expected >= 0", g, m[g]);
        CPU_REQUIRE(ctx, m[g] == 0 || (dy[g] && x[g] && dw[g]),
                    "cpu: gemm_grouped_wgrad: group %d: NULL dy, x or dw with m=%d", g, m[g]);
        active += m[g] > 0;
    }
    long tm = (n + GEMM_TILE_M - 1) / GEMM_TILE_M, tn = (k + GEMM_TILE_N - 1) / GEMM_TILE_N, per = tm * tn;
    long tiles = per * groups;
    cpu_blas_single_threaded();
#pragma omp parallel for num_threads(ctx->threads) schedule(dynamic, 1) if (active * per > 1)
    for (long t = 0; t < tiles; t++) {
        int g = (int)(t / per);
        if (m[g] == 0)
            continue;
        long local = t % per;
        int i0 = (int)(local / tn) * GEMM_TILE_M, j0 = (int)(local % tn) * GEMM_TILE_N;
        int mm = n - i0 < GEMM_TILE_M ? n - i0 : GEMM_TILE_M, nn = k - j0 < GEMM_TILE_N ? k - j0 : GEMM_TILE_N;
        gemm_tile(1, 0, i0, j0, mm, nn, m[g], alpha, dy[g], n, x[g], k, 1.0f, dw[g], k);
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Element-wise and small ops

static dsmoe_status cpu_bias_add(dsmoe_kernel_ctx *ctx, float *out, const float *bias, int rows, int n) {
    CPU_REQUIRE(ctx, rows >= 0 && n >= 0, "cpu: bias_add: rows=%d n=%d: expected >= 0", rows, n);
    if ((long)rows * n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && bias, "cpu: bias_add: NULL %s", out ? "bias" : "out");
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * n >= CPU_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        float *o = out + (size_t)r * n;
        for (int j = 0; j < n; j++)
            o[j] += bias[j];
    }
    return DSMOE_OK;
}

// Columns are split in fixed chunks; the thread owning a chunk sums its rows in order, so the result
// is the same for any thread count. A chunk is one thread's unit: 64 floats = 4 cache lines per row.
#define BIAS_CHUNK 64

static dsmoe_status cpu_bias_backward(dsmoe_kernel_ctx *ctx, float *dbias, const float *dout, int rows, int n) {
    CPU_REQUIRE(ctx, rows >= 0 && n >= 0, "cpu: bias_backward: rows=%d n=%d: expected >= 0", rows, n);
    if ((long)rows * n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dbias && dout, "cpu: bias_backward: NULL %s", dbias ? "dout" : "dbias");
    int chunks = (n + BIAS_CHUNK - 1) / BIAS_CHUNK;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)rows * n >= CPU_PAR_MIN)
    for (int ch = 0; ch < chunks; ch++) {
        int j0 = ch * BIAS_CHUNK, w = n - j0 < BIAS_CHUNK ? n - j0 : BIAS_CHUNK;
        float acc[BIAS_CHUNK] = {0};
        for (int r = 0; r < rows; r++) {
            const float *d = dout + (size_t)r * n + j0;
            for (int j = 0; j < w; j++)
                acc[j] += d[j];
        }
        for (int j = 0; j < w; j++)
            dbias[j0 + j] += acc[j];
    }
    return DSMOE_OK;
}

static dsmoe_status cpu_axpy(dsmoe_kernel_ctx *ctx, float *y, float alpha, const float *x, size_t n) {
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, x && y, "cpu: axpy: NULL %s with n=%zu", y ? "x" : "y", n);
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++)
        y[i] += alpha * x[i];
    return DSMOE_OK;
}

static dsmoe_status cpu_scale(dsmoe_kernel_ctx *ctx, float *x, float alpha, size_t n) {
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, x, "cpu: scale: NULL x with n=%zu", n);
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++)
        x[i] *= alpha;
    return DSMOE_OK;
}

// out may alias in (the backward is often done in place on the gradient).
static dsmoe_status cpu_mul_uniform_noise(dsmoe_kernel_ctx *ctx, float *out, const float *in, size_t n, float eps,
                                          uint64_t seed, uint64_t offset) {
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, out && in, "cpu: mul_uniform_noise: NULL %s with n=%zu", out ? "in" : "out", n);
    CPU_REQUIRE(ctx, eps >= 0.0f && eps < 1.0f, "cpu: mul_uniform_noise: eps=%g: expected 0 <= eps < 1", (double)eps);
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN / 8)
    for (size_t i = 0; i < n; i++)
        out[i] = in[i] * (1.0f - eps + 2.0f * eps * dsmoe_rng_uniform(seed, offset + i));
    return DSMOE_OK;
}

// Blocks depend on n only: at least SUMSQ_BLOCK elements, at most SUMSQ_MAX_BLOCKS blocks (so the
// partial sums fit on the stack). Each block is summed in double with four interleaved accumulators in
// a fixed order, then the partials are added in block order.
#define SUMSQ_BLOCK 8192
#define SUMSQ_MAX_BLOCKS 2048

static double sum_squares_block(const float *x, size_t n) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)x[i] * x[i];
        s1 += (double)x[i + 1] * x[i + 1];
        s2 += (double)x[i + 2] * x[i + 2];
        s3 += (double)x[i + 3] * x[i + 3];
    }
    for (; i < n; i++)
        s0 += (double)x[i] * x[i];
    return (s0 + s1) + (s2 + s3);
}

static dsmoe_status cpu_sum_squares(dsmoe_kernel_ctx *ctx, const float *x, size_t n, double *host_out) {
    CPU_REQUIRE(ctx, host_out, "cpu: sum_squares: NULL host_out");
    *host_out = 0.0;
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, x, "cpu: sum_squares: NULL x with n=%zu", n);
    size_t block = (n + SUMSQ_MAX_BLOCKS - 1) / SUMSQ_MAX_BLOCKS;
    if (block < SUMSQ_BLOCK)
        block = SUMSQ_BLOCK;
    int nblocks = (int)((n + block - 1) / block);
    double partial[SUMSQ_MAX_BLOCKS];
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (nblocks > 1)
    for (int b = 0; b < nblocks; b++) {
        size_t i0 = (size_t)b * block, len = n - i0 < block ? n - i0 : block;
        partial[b] = sum_squares_block(x + i0, len);
    }
    double total = 0.0;
    for (int b = 0; b < nblocks; b++)
        total += partial[b];
    *host_out = total;
    return DSMOE_OK;
}

static dsmoe_status cpu_all_finite(dsmoe_kernel_ctx *ctx, const float *x, size_t n, int *host_out) {
    CPU_REQUIRE(ctx, host_out, "cpu: all_finite: NULL host_out");
    *host_out = 1;
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, x, "cpu: all_finite: NULL x with n=%zu", n);
    // An exponent field of all ones is Inf or NaN; testing bits vectorizes where isfinite() may not.
    uint32_t bad = 0;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) reduction(| : bad) if (n >= CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        bad |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    *host_out = !bad;
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Optimizer

static dsmoe_status cpu_adamw_update(dsmoe_kernel_ctx *ctx, float *param, const float *grad, float *m, float *v,
                                     size_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                                     float grad_scale, int t) {
    CPU_REQUIRE(ctx, t >= 1, "cpu: adamw_update: t=%d: expected the step number, >= 1", t);
    CPU_REQUIRE(ctx, beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f,
                "cpu: adamw_update: beta1=%g beta2=%g: expected each in [0, 1)", (double)beta1, (double)beta2);
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, param && grad && m && v, "cpu: adamw_update: NULL param, grad, m or v with n=%zu", n);
    // Bias corrections in double: beta2^t for t in the thousands loses digits in float.
    float c1 = (float)(1.0 - pow(beta1, t)), c2 = (float)(1.0 - pow(beta2, t));
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (n >= CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float g = grad[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] -= lr * ((mi / c1) / (sqrtf(vi / c2) + eps) + weight_decay * param[i]);
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// The table

static const dsmoe_kernel_plugin_v1 cpu_plugin = {
    .api_version = DSMOE_KERNEL_API_VERSION,
    .name = "cpu",
    .description = "host memory, OpenMP loops and OpenBLAS",
    .mem_kind = DSMOE_MEM_HOST,

    .init = cpu_init,
    .finalize = cpu_finalize,
    .last_error = cpu_last_error,
    .describe = cpu_describe,
    .device_count = NULL,
    .device_pci_bus_id = NULL,

    .alloc = cpu_alloc,
    .free = cpu_free,
    .copy_to_device = cpu_copy,
    .copy_to_host = cpu_copy,
    .copy = cpu_copy,
    .zero = cpu_zero,
    .synchronize = cpu_synchronize,

    .gemm = cpu_gemm,
    .gemm_grouped = cpu_gemm_grouped,
    .gemm_grouped_wgrad = cpu_gemm_grouped_wgrad,

    .bias_add = cpu_bias_add,
    .bias_backward = cpu_bias_backward,
    .axpy = cpu_axpy,
    .scale = cpu_scale,
    .mul_uniform_noise = cpu_mul_uniform_noise,
    .sum_squares = cpu_sum_squares,
    .all_finite = cpu_all_finite,

    .embedding_forward = cpu_embedding_forward,
    .embedding_backward = cpu_embedding_backward,
    .layernorm_forward = cpu_layernorm_forward,
    .layernorm_backward = cpu_layernorm_backward,
    .gelu_forward = cpu_gelu_forward,
    .gelu_backward = cpu_gelu_backward,
    .attention_forward = cpu_attention_forward,
    .attention_backward = cpu_attention_backward,
    .crossentropy_forward = cpu_crossentropy_forward,
    .crossentropy_backward = cpu_crossentropy_backward,

    .gate_route = cpu_gate_route,
    .gate_assign = cpu_gate_assign,
    .gate_backward = cpu_gate_backward,
    .moe_dispatch = cpu_moe_dispatch,
    .moe_dispatch_backward = cpu_moe_dispatch_backward,
    .moe_combine = cpu_moe_combine,
    .moe_combine_backward = cpu_moe_combine_backward,

    .residual_mix_forward = cpu_residual_mix_forward,
    .residual_mix_backward = cpu_residual_mix_backward,

    .adamw_update = cpu_adamw_update,
};

DSMOE_PLUGIN_EXPORT const dsmoe_kernel_plugin_v1 *DSMOE_KERNEL_PLUGIN_ENTRY(void) { return &cpu_plugin; }
