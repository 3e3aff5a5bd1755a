// plugins/cpu/cpu_gemm_bf16.c: the cpu plugin's GEMMs with bfloat16 operands: plain and grouped (with the
// bias / bias + GELU / GELU-backward epilogues, c float32 or bfloat16), and the grouped weight
// gradients (float32 dw and dbias). cpu_gemm.c checks the arguments and calls in here.
// defines: cpu_bf16_gemm_run, cpu_bf16_wgrad_run, cpu_bf16_free_slots
//
// Each output tile (CPU_BF16_TILE_M x CPU_BF16_TILE_N, clipped at the edges) is one single-threaded
// product, and the tiles of all groups are spread over the context's threads (as cpu_gemm.c does for
// float32). The product is a oneDNN matmul when ctx->dnnl is up (cpu_dnnl.c), else it is emulated:
// float32 OpenBLAS on the tile's operands converted in blocks of EMU_KC along k (exact: every bfloat16
// is a float32). Accumulation is float32 either way.
//
// Determinism: a tile's shape and position depend on (m[g], n) only, its product runs on one thread in
// a fixed order, and the epilogue is element-wise; the weight gradient adds the groups of a weight in
// ascending g inside each tile. So the bits do not depend on the thread count, nor on anything but the
// inputs.
//
// c float32: the product writes c itself (beta applied by oneDNN or BLAS), the epilogue runs in place.
// c bfloat16: the product writes the thread's float32 tile, then c = alpha a b + beta c, the bias, the
// GELU and its derivative are computed in float32 and rounded once to bfloat16 (aux likewise, rounded
// from the same float32 pre-activation the GELU was taken of).
#include <omp.h>
#include <stdlib.h>

#include <cblas.h> // cblas_sgemm (emulated products)

#include "cpu_bf16.h" // cpu_bf16_job, cpu_dnnl_*, conversions
#include "cpu_math.h" // CPU_COL_CHUNK

// Emulated products convert this many k at a time (bounds the scratch for long k, e.g. a weight
// gradient over many tokens).
#define EMU_KC 512

// Per compute thread: the float32 tile of a bfloat16 c, and the float32 operand blocks of emulation.
struct cpu_bf16_slot {
    float *tile; // (CPU_BF16_TILE_M, CPU_BF16_TILE_N)
    float *ea;   // (CPU_BF16_TILE_M, EMU_KC), emulation only
    float *eb;   // (EMU_KC, CPU_BF16_TILE_N), emulation only
};

void cpu_bf16_free_slots(cpu_ctx *ctx) {
    if (!ctx->bf16_slots)
        return;
    for (int t = 0; t < ctx->threads; t++) {
        free(ctx->bf16_slots[t].tile);
        free(ctx->bf16_slots[t].ea);
        free(ctx->bf16_slots[t].eb);
    }
    free(ctx->bf16_slots);
    ctx->bf16_slots = NULL;
}

// Allocated on the first bf16 GEMM, before any parallel loop, so that a loop never fails for memory.
static dsmoe_status ensure_slots(cpu_ctx *ctx, const char *op) {
    if (ctx->bf16_slots)
        return DSMOE_OK;
    const size_t tile = (size_t)CPU_BF16_TILE_M * CPU_BF16_TILE_N * sizeof(float);
    const size_t ea = (size_t)CPU_BF16_TILE_M * EMU_KC * sizeof(float);
    const size_t eb = (size_t)EMU_KC * CPU_BF16_TILE_N * sizeof(float);
    ctx->bf16_slots = calloc((size_t)ctx->threads, sizeof *ctx->bf16_slots);
    int ok = ctx->bf16_slots != NULL;
    for (int t = 0; ok && t < ctx->threads; t++) {
        struct cpu_bf16_slot *s = &ctx->bf16_slots[t];
        ok = (s->tile = aligned_alloc(64, tile)) != NULL;
        if (ok && !ctx->dnnl)
            ok = (s->ea = aligned_alloc(64, ea)) && (s->eb = aligned_alloc(64, eb));
    }
    if (ok)
        return DSMOE_OK;
    cpu_bf16_free_slots(ctx);
    return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: %s: cannot allocate the bfloat16 GEMM scratch of %d threads", op,
                    ctx->threads);
}

// c (mm, nn) float32 = alpha op(a) op(b) + beta c by float32 BLAS on converted blocks of k.
static void emu_tile(struct cpu_bf16_slot *S, int ta, int tb, int mm, int nn, int k, float alpha, const uint16_t *a,
                     int lda, const uint16_t *b, int ldb, float beta, float *c, int ldc) {
    for (int k0 = 0; k0 < k; k0 += EMU_KC) {
        int kc = k - k0 < EMU_KC ? k - k0 : EMU_KC;
        if (ta) // a stored (k, m): ea (kc, mm)
            for (int l = 0; l < kc; l++)
                cpu_bf16_to_f32(S->ea + (size_t)l * mm, a + (size_t)(k0 + l) * lda, (size_t)mm);
        else // ea (mm, kc)
            for (int i = 0; i < mm; i++)
                cpu_bf16_to_f32(S->ea + (size_t)i * kc, a + (size_t)i * lda + k0, (size_t)kc);
        if (tb) // b stored (n, k): eb (nn, kc)
            for (int j = 0; j < nn; j++)
                cpu_bf16_to_f32(S->eb + (size_t)j * kc, b + (size_t)j * ldb + k0, (size_t)kc);
        else // eb (kc, nn)
            for (int l = 0; l < kc; l++)
                cpu_bf16_to_f32(S->eb + (size_t)l * nn, b + (size_t)(k0 + l) * ldb, (size_t)nn);
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, mm, nn, kc, alpha,
                    S->ea, ta ? mm : kc, S->eb, tb ? kc : nn, k0 ? 1.0f : beta, c, ldc);
    }
}

// One tile's product c (mm, nn) = alpha op(a) op(b) + beta c (c not read when beta == 0); a and b point
// at the tile's first row / column. 0, or oneDNN's failing status.
static int tile_product(cpu_ctx *ctx, const cpu_mm *prim, int slot, int ta, int tb, int mm, int nn, int k,
                        float alpha, const uint16_t *a, int lda, const uint16_t *b, int ldb, float beta, float *c,
                        int ldc) {
    if (k == 0) {
        for (int i = 0; i < mm; i++)
            for (int j = 0; j < nn; j++)
                c[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[(size_t)i * ldc + j];
        return 0;
    }
    if (prim)
        return cpu_dnnl_run(ctx, prim, slot, mm, nn, k, a, b, c);
    emu_tile(&ctx->bf16_slots[slot], ta, tb, mm, nn, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return 0;
}

// The epilogue of a tile whose product is in v (ldv): rows [i0, i0+mm), columns [j0, j0+nn) of group g.
// float32 c: v is c, beta is applied, the epilogue runs in place (as cpu_gemm.c's for float32).
// bfloat16 c: v is the thread's tile holding alpha a b; beta c is added, then rounded into c (and aux).
static void epilogue_tile(const cpu_vec *vec, const cpu_bf16_job *J, float *v, int ldv, int g, int i0, int j0, int mm,
                          int nn) {
    const float *bias = J->bias ? J->bias + (size_t)(g % J->b_groups) * J->bias_stride + j0 : NULL;
    for (int i = 0; i < mm; i++) {
        size_t at = (size_t)g * J->c_stride + (size_t)(i0 + i) * J->ldc + j0;
        float *r = v + (size_t)i * ldv;
        if (J->c_type == DSMOE_FLOAT32) {
            float *aux = J->aux ? (float *)J->aux + at : NULL;
            if (J->epi == DSMOE_EPI_BIAS) {
                for (int j = 0; j < nn; j++)
                    r[j] += bias[j];
            } else if (J->epi == DSMOE_EPI_BIAS_GELU) {
                for (int j = 0; j < nn; j++)
                    aux[j] = r[j] + bias[j];
                vec->gelu(r, aux, (size_t)nn);
            } else if (J->epi == DSMOE_EPI_DGELU) {
                vec->gelu_grad_mul(r, aux, (size_t)nn);
            }
            continue;
        }
        uint16_t *c = (uint16_t *)J->c + at, *aux = J->aux ? (uint16_t *)J->aux + at : NULL;
        if (J->beta != 0.0f)
            for (int j = 0; j < nn; j++)
                r[j] += J->beta * cpu_bf2f(c[j]);
        if (J->epi == DSMOE_EPI_BIAS) {
            for (int j = 0; j < nn; j++)
                r[j] += bias[j];
        } else if (J->epi == DSMOE_EPI_BIAS_GELU) {
            for (int j = 0; j < nn; j++)
                r[j] += bias[j];
            cpu_f32_to_bf16(aux, r, (size_t)nn);
            vec->gelu(r, r, (size_t)nn);
        } else if (J->epi == DSMOE_EPI_DGELU) {
            float x[CPU_BF16_TILE_N]; // the saved pre-activation, widened
            cpu_bf16_to_f32(x, aux, (size_t)nn);
            vec->gelu_grad_mul(r, x, (size_t)nn);
        }
        cpu_f32_to_bf16(c, r, (size_t)nn);
    }
}

// Groups up to this count keep their tile offsets on the stack.
#define BF16_STACK_GROUPS 256

dsmoe_status cpu_bf16_gemm_run(cpu_ctx *ctx, const char *op, const cpu_bf16_job *J) {
    CPU_TRY(ensure_slots(ctx, op));
    const int direct = J->c_type == DSMOE_FLOAT32;
    cpu_mm *prim = NULL;
    if (ctx->dnnl && J->k > 0) {
        cpu_mm_key key = {.ta = J->ta, .tb = J->tb, .lda = J->lda, .ldb = J->ldb,
                          .ldc = direct ? J->ldc : CPU_BF16_TILE_N, .alpha = J->alpha,
                          .beta = direct ? J->beta : 0.0f};
        CPU_TRY(cpu_dnnl_get(ctx, &key, &prim));
    } else {
        cpu_blas_single_threaded();
    }
    long stack_first[BF16_STACK_GROUPS + 1], *first = stack_first;
    if (J->groups > BF16_STACK_GROUPS && !(first = malloc(sizeof(long) * (J->groups + 1))))
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: %s: cannot allocate tile offsets for %d groups", op, J->groups);
    const long tn = (J->n + CPU_BF16_TILE_N - 1) / CPU_BF16_TILE_N;
    first[0] = 0;
    for (int g = 0; g < J->groups; g++)
        first[g + 1] = first[g] + (J->m[g] + CPU_BF16_TILE_M - 1) / CPU_BF16_TILE_M * tn;
    const long tiles = first[J->groups];
    int failed = 0;
#pragma omp parallel num_threads(ctx->threads) if (tiles > 1)
    {
        int g = 0, slot = omp_get_thread_num();
#pragma omp for schedule(monotonic: dynamic, 1)
        for (long t = 0; t < tiles; t++) {
            while (first[g + 1] <= t) // monotonic: tiles come in increasing order per thread, g only moves forward
                g++;
            long local = t - first[g];
            int i0 = (int)(local / tn) * CPU_BF16_TILE_M, j0 = (int)(local % tn) * CPU_BF16_TILE_N;
            int mm = J->m[g] - i0 < CPU_BF16_TILE_M ? J->m[g] - i0 : CPU_BF16_TILE_M;
            int nn = J->n - j0 < CPU_BF16_TILE_N ? J->n - j0 : CPU_BF16_TILE_N;
            const uint16_t *a = J->a + (size_t)g * J->a_stride + (J->ta ? (size_t)i0 : (size_t)i0 * J->lda);
            const uint16_t *b = J->b + (size_t)(g % J->b_groups) * J->b_stride +
                                (J->tb ? (size_t)j0 * J->ldb : (size_t)j0);
            float *v = direct ? (float *)J->c + (size_t)g * J->c_stride + (size_t)i0 * J->ldc + j0
                              : ctx->bf16_slots[slot].tile;
            int ldv = direct ? J->ldc : CPU_BF16_TILE_N;
            int s = tile_product(ctx, prim, slot, J->ta, J->tb, mm, nn, J->k, J->alpha, a, J->lda, b, J->ldb,
                                 direct ? J->beta : 0.0f, v, ldv);
            if (s) {
#pragma omp atomic write
                failed = s;
            } else {
                epilogue_tile(ctx->vec, J, v, ldv, g, i0, j0, mm, nn);
            }
        }
    }
    if (first != stack_first)
        free(first);
    if (failed)
        return cpu_sticky(ctx, DSMOE_ERR_SYSTEM, "cpu: %s: oneDNN bf16 matmul failed while running: status %d", op,
                          failed);
    return DSMOE_OK;
}

// dbias[j0 .. j0+w) += sum over rows of dout (rows, n) bfloat16, rows in order into a float32
// accumulator (cpu_bias_chunk's order).
static void bias_chunk_bf16(float *dbias, const uint16_t *dout, int rows, int n, int j0, int w) {
    float acc[CPU_COL_CHUNK] = {0};
    for (int r = 0; r < rows; r++) {
        const uint16_t *d = dout + (size_t)r * n + j0;
        for (int j = 0; j < w; j++)
            acc[j] += cpu_bf2f(d[j]);
    }
    for (int j = 0; j < w; j++)
        dbias[j0 + j] += acc[j];
}

// dw_w (n, k) += alpha dy_g^T x_g over the groups g of weight w: tiles of dw in parallel, the groups of
// a tile's weight in ascending g, each one product with beta = 1 (cpu_gemm.c's float32 order).
dsmoe_status cpu_bf16_wgrad_run(cpu_ctx *ctx, const dsmoe_grouped_wgrad *G) {
    static const char op[] = "gemm_grouped_wgrad";
    CPU_TRY(ensure_slots(ctx, op));
    const int groups = G->groups, n = G->n, k = G->k, B = G->b_groups;
    const int32_t *m = G->counts;
    const uint16_t *dy = G->dy, *x = G->x;
    int W = B < groups ? B : groups; // weights that receive a group
    long active = 0, rows = 0;
    for (int w = 0; w < W; w++) {
        int any = 0;
        for (int g = w; g < groups; g += B)
            any |= m[g] > 0, rows += m[g];
        active += any;
    }
    int failed = 0;
    if (k > 0) {
        cpu_mm *prim = NULL;
        if (ctx->dnnl) {
            cpu_mm_key key = {.ta = 1, .tb = 0, .lda = n, .ldb = k, .ldc = k, .alpha = G->alpha, .beta = 1.0f};
            CPU_TRY(cpu_dnnl_get(ctx, &key, &prim));
        } else {
            cpu_blas_single_threaded();
        }
        long tm = (n + CPU_BF16_TILE_M - 1) / CPU_BF16_TILE_M, tn = (k + CPU_BF16_TILE_N - 1) / CPU_BF16_TILE_N;
        long per = tm * tn, tiles = per * W;
#pragma omp parallel num_threads(ctx->threads) if (active * per > 1)
        {
            int slot = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
            for (long t = 0; t < tiles; t++) {
                int w = (int)(t / per);
                long local = t % per;
                int i0 = (int)(local / tn) * CPU_BF16_TILE_M, j0 = (int)(local % tn) * CPU_BF16_TILE_N;
                int mm = n - i0 < CPU_BF16_TILE_M ? n - i0 : CPU_BF16_TILE_M;
                int nn = k - j0 < CPU_BF16_TILE_N ? k - j0 : CPU_BF16_TILE_N;
                float *dw = G->dw + (size_t)w * G->dw_stride + (size_t)i0 * k + j0;
                for (int g = w; g < groups; g += B) {
                    if (m[g] == 0)
                        continue;
                    int s = tile_product(ctx, prim, slot, 1, 0, mm, nn, m[g], G->alpha,
                                         dy + (size_t)g * G->dy_stride + i0, n, x + (size_t)g * G->x_stride + j0, k,
                                         1.0f, dw, k);
                    if (s) {
#pragma omp atomic write
                        failed = s;
                        break;
                    }
                }
            }
        }
    }
    if (failed)
        return cpu_sticky(ctx, DSMOE_ERR_SYSTEM, "cpu: %s: oneDNN bf16 matmul failed while running: status %d", op,
                          failed);
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
                    bias_chunk_bf16(db, dy + (size_t)g * G->dy_stride, m[g], n, j0, width);
        }
    }
    return DSMOE_OK;
}
