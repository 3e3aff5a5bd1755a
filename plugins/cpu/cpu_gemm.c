// plugins/cpu/cpu_gemm.c: GEMM for the cpu plugin through OpenBLAS: plain, grouped with epilogues
// (bias, bias + GELU, GELU backward), and the grouped weight gradients with their bias gradients.
// Every member checks its arguments here; bfloat16 operands then go to cpu_gemm_bf16.c (oneDNN).
// defines: cpu_blas_single_threaded, cpu_gemm, cpu_gemm_grouped, cpu_gemm_grouped_wgrad
//
// Contracts are include/dsmoe/kernel_plugin.h's (dsmoe_grouped_gemm, dsmoe_grouped_wgrad). Invariant
// (with the setting small_rows = 0; see rows_dot below for what its default changes):
// every float32 result is bitwise what version 1 of this plugin gave for the separate calls it
// replaces: a grouped GEMM with an epilogue = v1's gemm_grouped, then bias_add, then gelu_forward (or
// zero + gelu_backward) per group; a grouped wgrad = v1's gemm_grouped_wgrad one group at a time in
// ascending group order, and its dbias = v1's bias_backward per group in the same order. Same 256x256
// tiles, same BLAS calls, and the epilogue math is cpu_math.h's, shared with the element-wise ops.
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h> // cblas_sgemm, openblas_set_num_threads, openblas_get_num_threads

#include "cpu_bf16.h"     // cpu_bf16_job, cpu_bf16_gemm_run, cpu_bf16_wgrad_run
#include "cpu_internal.h" // CPU_BEGIN, CPU_REQUIRE, cpu_sticky
#include "cpu_math.h"     // cpu_bias_chunk, cpu_dot_lanes

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

// Operand types (kernel_plugin.h, gemm): a and b float32 or bfloat16 and the same; c float32 or a's.
static dsmoe_status check_gemm_types(cpu_ctx *ctx, const char *op, const char *an, dsmoe_dtype at, const char *bn,
                                     dsmoe_dtype bt, const char *cn, dsmoe_dtype ct) {
    if (at != DSMOE_FLOAT32 && at != DSMOE_BFLOAT16)
        return cpu_fail(ctx, DSMOE_ERR_UNSUPPORTED, "cpu: %s: %s is %s: expected float32 or bfloat16", op, an,
                        dsmoe_dtype_name(at));
    if (bt != at)
        return cpu_fail(ctx, DSMOE_ERR_UNSUPPORTED, "cpu: %s: %s is %s but %s is %s: expected the same type", op, an,
                        dsmoe_dtype_name(at), bn, dsmoe_dtype_name(bt));
    if (cn && ct != DSMOE_FLOAT32 && ct != at)
        return cpu_fail(ctx, DSMOE_ERR_UNSUPPORTED, "cpu: %s: %s is %s with %s %s: expected float32 or %s's type", op,
                        cn, dsmoe_dtype_name(ct), an, dsmoe_dtype_name(at), an);
    return DSMOE_OK;
}

// Checks the shape arguments of a GEMM: op(a) (m, k), op(b) (k, n), c (m, n), row-major.
static dsmoe_status check_gemm_dims(cpu_ctx *ctx, const char *op, int ta, int tb, int m, int n, int k, int lda,
                                    int ldb, int ldc) {
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

// A few rows times a transposed weight, c (mm, nn) = alpha a (mm, k) b (nn, k)^T + beta c: what a decode
// step does (one token per sequence through every weight). OpenBLAS packs both operands for a GEMM,
// which at 1 to 8 rows costs more than the product and leaves it far below memory speed; here each
// weight row is read once and dotted with every row of a. The order of the sums is fixed (16 lane
// accumulators over k, then a fixed tree), so results do not depend on the thread count; they differ in
// the last bits from BLAS's, which is why the setting small_rows = 0 (BLAS always) exists. The dot
// product is cpu_math.h's cpu_dot_lanes (cached attention's scores use it too).
// Weight row j comes from memory once; the rows of a after the first find it in the L1 cache (a row of
// k floats: 4 KiB at k = 1024).
static void rows_dot(int mm, int nn, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                     float *c, int ldc) {
    for (int j = 0; j < nn; j++) {
        const float *w = b + (size_t)j * ldb;
        for (int i = 0; i < mm; i++) {
            float d = cpu_dot_lanes(a + (size_t)i * lda, w, k);
            float *y = c + (size_t)i * ldc + j;
            *y = beta == 0.0f ? alpha * d : alpha * d + beta * *y; // beta 0: c is not read
        }
    }
}

// One (grouped) GEMM as gemm_tiled runs it; a plain gemm is one group. Group g: m[g] rows, a + g *
// a_stride, b + (g % b_groups) * b_stride, c (and aux) + g * c_stride, bias + (g % b_groups) * bias_stride.
typedef struct gemm_job {
    int groups, ta, tb, n, k;
    const int32_t *m; // (groups) rows per group, checked
    float alpha, beta;
    const float *a;
    int lda;
    size_t a_stride;
    const float *b;
    int ldb;
    size_t b_stride;
    int b_groups;
    float *c;
    int ldc;
    size_t c_stride;
    dsmoe_epilogue epi;
    const float *bias;
    size_t bias_stride;
    float *aux;
    int small_rows; // groups of at most this many rows with ta = 0, tb = 1 go through rows_dot
} gemm_job;

// The epilogue on rows [i0, i0+mm), columns [j0, j0+nn) of group g, right after that tile's GEMM (it
// is element-wise, so per tile equals per group). Each form is written as the v1 ops computed it:
// BIAS is bias_add's `c += bias`; BIAS_GELU stores the pre-activation and reads it back as gelu_forward
// did; DGELU zeroes c and accumulates gelu'(aux) * d as zero + gelu_backward did.
static void epilogue_tile(const cpu_vec *vec, const gemm_job *J, int g, int i0, int j0, int mm, int nn) {
    if (J->epi == DSMOE_EPI_NONE)
        return;
    const float *bias = J->bias ? J->bias + (size_t)(g % J->b_groups) * J->bias_stride + j0 : NULL;
    for (int i = i0; i < i0 + mm; i++) {
        size_t row = (size_t)g * J->c_stride + (size_t)i * J->ldc + j0;
        float *c = J->c + row;
        float *aux = J->aux ? J->aux + row : NULL;
        if (J->epi == DSMOE_EPI_BIAS) {
            for (int j = 0; j < nn; j++)
                c[j] += bias[j];
        } else if (J->epi == DSMOE_EPI_BIAS_GELU) {
            for (int j = 0; j < nn; j++)
                aux[j] = c[j] + bias[j];
            vec->gelu(c, aux, (size_t)nn);
        } else { // DSMOE_EPI_DGELU: 0 + gelu'(aux) * c, what zero + gelu_backward gave
            vec->gelu_grad_mul(c, aux, (size_t)nn);
        }
    }
}

// Every tile of every group in one parallel loop, each tile's epilogue after it. Callers have checked
// the job. first[g] = index of group g's first tile; (groups + 1) longs.
static void gemm_tiled(const cpu_ctx *ctx, const gemm_job *J, long *first) {
    long tn = (J->n + CPU_GEMM_TILE_N - 1) / CPU_GEMM_TILE_N;
    first[0] = 0;
    for (int g = 0; g < J->groups; g++)
        first[g + 1] = first[g] + (J->m[g] + CPU_GEMM_TILE_M - 1) / CPU_GEMM_TILE_M * tn;
    long tiles = first[J->groups];
    cpu_blas_single_threaded();
#pragma omp parallel num_threads(ctx->threads) if (tiles > 1)
    {
        int g = 0;
#pragma omp for schedule(monotonic: dynamic, 1)
        for (long t = 0; t < tiles; t++) {
            while (first[g + 1] <= t) // monotonic: tiles come in increasing order per thread, g only moves forward
                g++;
            long local = t - first[g];
            int i0 = (int)(local / tn) * CPU_GEMM_TILE_M, j0 = (int)(local % tn) * CPU_GEMM_TILE_N;
            int mm = J->m[g] - i0 < CPU_GEMM_TILE_M ? J->m[g] - i0 : CPU_GEMM_TILE_M;
            int nn = J->n - j0 < CPU_GEMM_TILE_N ? J->n - j0 : CPU_GEMM_TILE_N;
            const float *ag = J->a + (size_t)g * J->a_stride, *bg = J->b + (size_t)(g % J->b_groups) * J->b_stride;
            float *cg = J->c + (size_t)g * J->c_stride;
            if (!J->ta && J->tb && J->m[g] <= J->small_rows)
                rows_dot(mm, nn, J->k, J->alpha, ag + (size_t)i0 * J->lda, J->lda, bg + (size_t)j0 * J->ldb, J->ldb,
                         J->beta, cg + (size_t)i0 * J->ldc + j0, J->ldc);
            else
                gemm_tile(J->ta, J->tb, i0, j0, mm, nn, J->k, J->alpha, ag, J->lda, bg, J->ldb, J->beta, cg, J->ldc);
            epilogue_tile(ctx->vec, J, g, i0, j0, mm, nn);
        }
    }
}

dsmoe_status cpu_gemm(cpu_ctx *ctx, cpu_queue *q, int trans_a, int trans_b, int m, int n, int k, float alpha,
                      const void *a, dsmoe_dtype a_type, int lda, const void *b, dsmoe_dtype b_type, int ldb,
                      float beta, void *c, dsmoe_dtype c_type, int ldc) {
    CPU_BEGIN(ctx, q, "gemm");
    CPU_TRY(check_gemm_types(ctx, "gemm", "a_type", a_type, "b_type", b_type, "c_type", c_type));
    CPU_TRY(check_gemm_dims(ctx, "gemm", trans_a, trans_b, m, n, k, lda, ldb, ldc));
    if (m == 0 || n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, c && (k == 0 || (a && b)), "cpu: gemm: NULL %s with m=%d n=%d k=%d", !c ? "c" : !a ? "a" : "b",
                m, n, k);
    int32_t rows = m;
    if (a_type == DSMOE_BFLOAT16) {
        cpu_bf16_job B = {.groups = 1, .ta = trans_a, .tb = trans_b, .n = n, .k = k, .m = &rows, .alpha = alpha,
                          .beta = beta, .a = a, .lda = lda, .b = b, .ldb = ldb, .b_groups = 1, .c = c,
                          .c_type = c_type, .ldc = ldc, .epi = DSMOE_EPI_NONE};
        return cpu_bf16_gemm_run(ctx, "gemm", &B);
    }
    gemm_job J = {.groups = 1, .ta = trans_a, .tb = trans_b, .n = n, .k = k, .m = &rows, .alpha = alpha,
                  .beta = beta, .a = a, .lda = lda, .b = b, .ldb = ldb, .b_groups = 1, .c = c, .ldc = ldc,
                  .epi = DSMOE_EPI_NONE, .small_rows = ctx->small_rows};
    long first[2];
    gemm_tiled(ctx, &J, first);
    return DSMOE_OK;
}

// Device counts of a grouped call: each in [0, m_max], else the sticky error (bad data, not a bad call).
static dsmoe_status check_counts(cpu_ctx *ctx, const char *op, const int32_t *counts, int groups, int m_max) {
    for (int g = 0; g < groups; g++)
        if (counts[g] < 0 || counts[g] > m_max)
            return cpu_sticky(ctx, DSMOE_ERR_INVALID, "cpu: %s: counts[%d]=%d: expected in [0, m_max=%d]", op, g,
                              counts[g], m_max);
    return DSMOE_OK;
}

// Groups up to this count keep their tile offsets on the stack.
#define GEMM_STACK_GROUPS 256

dsmoe_status cpu_gemm_grouped(cpu_ctx *ctx, cpu_queue *q, const dsmoe_grouped_gemm *G) {
    static const char op[] = "gemm_grouped";
    CPU_BEGIN(ctx, q, op);
    CPU_REQUIRE(ctx, G, "cpu: gemm_grouped: NULL descriptor");
    CPU_TRY(check_gemm_types(ctx, op, "a_type", G->a_type, "b_type", G->b_type, "c_type", G->c_type));
    const int groups = G->groups, m_max = G->m_max, n = G->n, k = G->k;
    CPU_REQUIRE(ctx, groups >= 0 && m_max >= 0, "cpu: gemm_grouped: groups=%d m_max=%d: expected >= 0", groups, m_max);
    CPU_REQUIRE(ctx, G->epilogue >= DSMOE_EPI_NONE && G->epilogue <= DSMOE_EPI_DGELU,
                "cpu: gemm_grouped: epilogue %d: expected 0 (none), 1 (bias), 2 (bias + GELU) or 3 (GELU backward)",
                (int)G->epilogue);
    if (groups == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, G->b_groups >= 1, "cpu: gemm_grouped: b_groups=%d: expected >= 1", G->b_groups);
    CPU_TRY(check_gemm_dims(ctx, op, 0, G->trans_b, m_max, n, k, G->lda, G->ldb, G->ldc));
    CPU_REQUIRE(ctx, G->counts, "cpu: gemm_grouped: NULL counts with groups=%d", groups);
    int work = m_max > 0 && n > 0;
    CPU_REQUIRE(ctx, !work || (G->c && (k == 0 || (G->a && G->b))),
                "cpu: gemm_grouped: NULL a, b or c with m_max=%d n=%d k=%d", m_max, n, k);
    int bias = G->epilogue == DSMOE_EPI_BIAS || G->epilogue == DSMOE_EPI_BIAS_GELU;
    int aux = G->epilogue == DSMOE_EPI_BIAS_GELU || G->epilogue == DSMOE_EPI_DGELU;
    CPU_REQUIRE(ctx, !work || !bias || G->bias, "cpu: gemm_grouped: epilogue %d needs bias", (int)G->epilogue);
    CPU_REQUIRE(ctx, !work || !aux || G->aux, "cpu: gemm_grouped: epilogue %d needs aux", (int)G->epilogue);
    // Groups run in parallel: their outputs must not overlap.
    CPU_REQUIRE(ctx, groups == 1 || !work || G->c_stride >= (size_t)(m_max - 1) * G->ldc + n,
                "cpu: gemm_grouped: c_stride=%zu < (m_max-1)*ldc+n = %zu: groups would overlap", G->c_stride,
                (size_t)(m_max - 1) * G->ldc + n);
    CPU_TRY(check_counts(ctx, op, G->counts, groups, m_max));
    if (!work)
        return DSMOE_OK;
    if (G->a_type == DSMOE_BFLOAT16) {
        cpu_bf16_job B = {.groups = groups, .ta = 0, .tb = G->trans_b, .n = n, .k = k, .m = G->counts,
                          .alpha = G->alpha, .beta = G->beta, .a = G->a, .lda = G->lda, .a_stride = G->a_stride,
                          .b = G->b, .ldb = G->ldb, .b_stride = G->b_stride, .b_groups = G->b_groups, .c = G->c,
                          .c_type = G->c_type, .ldc = G->ldc, .c_stride = G->c_stride, .epi = G->epilogue,
                          .bias = bias ? G->bias : NULL, .bias_stride = G->bias_stride, .aux = aux ? G->aux : NULL};
        return cpu_bf16_gemm_run(ctx, op, &B);
    }
    long stack_first[GEMM_STACK_GROUPS + 1], *first = stack_first;
    if (groups > GEMM_STACK_GROUPS && !(first = malloc(sizeof(long) * (groups + 1))))
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: gemm_grouped: cannot allocate tile offsets for %d groups", groups);
    gemm_job J = {.groups = groups, .ta = 0, .tb = G->trans_b, .n = n, .k = k, .m = G->counts, .alpha = G->alpha,
                  .beta = G->beta, .a = G->a, .lda = G->lda, .a_stride = G->a_stride, .b = G->b, .ldb = G->ldb,
                  .b_stride = G->b_stride, .b_groups = G->b_groups, .c = G->c, .ldc = G->ldc, .c_stride = G->c_stride,
                  .epi = G->epilogue, .bias = bias ? G->bias : NULL, .bias_stride = G->bias_stride,
                  .aux = aux ? G->aux : NULL, .small_rows = ctx->small_rows};
    gemm_tiled(ctx, &J, first);
    if (first != stack_first)
        free(first);
    return DSMOE_OK;
}

// dw_w (n, k) += alpha * dy_g^T (n, m[g]) @ x_g (m[g], k) over the groups g of weight w: a GEMM with
// op(a) = dy^T, whose inner dimension m[g] differs per group. The tiles of the weights run in
// parallel; inside a tile the groups of its weight are added in ascending g, one BLAS call each with
// beta = 1, exactly v1's per-group calls in v1's order. dbias likewise: per weight and column chunk,
// one bias_backward-style sum per group in ascending g.
dsmoe_status cpu_gemm_grouped_wgrad(cpu_ctx *ctx, cpu_queue *q, const dsmoe_grouped_wgrad *G) {
    static const char op[] = "gemm_grouped_wgrad";
    CPU_BEGIN(ctx, q, op);
    CPU_REQUIRE(ctx, G, "cpu: gemm_grouped_wgrad: NULL descriptor");
    CPU_TRY(check_gemm_types(ctx, op, "dy_type", G->dy_type, "x_type", G->x_type, NULL, DSMOE_FLOAT32));
    const int groups = G->groups, n = G->n, k = G->k, B = G->b_groups;
    CPU_REQUIRE(ctx, groups >= 0 && n >= 0 && k >= 0 && G->m_max >= 0,
                "cpu: gemm_grouped_wgrad: groups=%d m_max=%d n=%d k=%d: expected >= 0", groups, G->m_max, n, k);
    if (groups == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, B >= 1, "cpu: gemm_grouped_wgrad: b_groups=%d: expected >= 1", B);
    CPU_REQUIRE(ctx, G->counts, "cpu: gemm_grouped_wgrad: NULL counts with groups=%d", groups);
    int work = G->m_max > 0 && n > 0;
    CPU_REQUIRE(ctx, !work || (G->dy && (k == 0 || (G->x && G->dw))),
                "cpu: gemm_grouped_wgrad: NULL dy, x or dw with m_max=%d n=%d k=%d", G->m_max, n, k);
    CPU_TRY(check_counts(ctx, op, G->counts, groups, G->m_max));
    if (!work)
        return DSMOE_OK;
    if (G->dy_type == DSMOE_BFLOAT16)
        return cpu_bf16_wgrad_run(ctx, G);
    const int32_t *m = G->counts;
    const float *dy = G->dy, *x = G->x;
    int W = B < groups ? B : groups; // weights that receive a group
    long active = 0, rows = 0;       // weights with work; rows over all groups
    for (int w = 0; w < W; w++) {
        int any = 0;
        for (int g = w; g < groups; g += B)
            any |= m[g] > 0, rows += m[g];
        active += any;
    }
    cpu_blas_single_threaded();
    if (k > 0) {
        long tm = (n + CPU_GEMM_TILE_M - 1) / CPU_GEMM_TILE_M, tn = (k + CPU_GEMM_TILE_N - 1) / CPU_GEMM_TILE_N;
        long per = tm * tn, tiles = per * W;
#pragma omp parallel for num_threads(ctx->threads) schedule(dynamic, 1) if (active * per > 1)
        for (long t = 0; t < tiles; t++) {
            int w = (int)(t / per);
            long local = t % per;
            int i0 = (int)(local / tn) * CPU_GEMM_TILE_M, j0 = (int)(local % tn) * CPU_GEMM_TILE_N;
            int mm = n - i0 < CPU_GEMM_TILE_M ? n - i0 : CPU_GEMM_TILE_M;
            int nn = k - j0 < CPU_GEMM_TILE_N ? k - j0 : CPU_GEMM_TILE_N;
            float *dw = G->dw + (size_t)w * G->dw_stride;
            for (int g = w; g < groups; g += B)
                if (m[g] > 0)
                    gemm_tile(1, 0, i0, j0, mm, nn, m[g], G->alpha, dy + (size_t)g * G->dy_stride, n,
                              x + (size_t)g * G->x_stride, k, 1.0f, dw, k);
        }
    }
    if (G->dbias) {
        int chunks = (n + CPU_COL_CHUNK - 1) / CPU_COL_CHUNK;
        long units = (long)W * chunks;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if (rows * n >= CPU_PAR_MIN && units > 1)
        for (long u = 0; u < units; u++) {
            int w = (int)(u / chunks), j0 = (int)(u % chunks) * CPU_COL_CHUNK;
            int width = n - j0 < CPU_COL_CHUNK ? n - j0 : CPU_COL_CHUNK;
            float *db = G->dbias + (size_t)w * G->dbias_stride;
            for (int g = w; g < groups; g += B)
                if (m[g] > 0)
                    cpu_bias_chunk(db, dy + (size_t)g * G->dy_stride, m[g], n, j0, width);
        }
    }
    return DSMOE_OK;
}
