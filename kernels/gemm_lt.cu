// kernels/gemm_lt.cu: the grouped GEMM in one cuBLASLt call per round of weights, its epilogue fused into
// the GEMM (setting fused_epilogues).
// defines: dsmoe_cu_gemm_grouped_lt
//
// gemm.cu's grouped GEMM writes every group's m_max rows of float32 products into scratch and then stores
// the rows below each count with the epilogue in a second kernel: at the GPU-sized layer of
// docs/performance.md that is about 10 GiB of memory traffic a training step on top of the GEMMs. Here
// cuBLASLt applies the epilogue (bias, bias + GELU saving the pre-activation, GELU backward) to the
// accumulator in registers and writes c (and aux) once, in c's dtype. The ABI allows it: rows from a
// count to m_max of c and aux hold unspecified values after the call (they are computed from rows of a
// that may be anything, NaN included), and nothing reads them.
//
// Groups g = r*B .. r*B + W_r - 1 (B = b_groups) form round r and use weights 0 .. W_r - 1: one
// strided-batched call each, W_r = min(B, groups - r*B); with B >= groups one call covers all groups.
// Every round's algorithm is asked of cuBLASLt's heuristic before the first call is enqueued, so that a
// problem cuBLASLt has no kernel for (the aux epilogues need ldc and c_stride multiples of 8; bfloat16
// output with a float32 bias may be refused) falls back to gemm.cu's path with nothing enqueued.
//
// Kept as the ABI says: float32 accumulation (split-K partial sums only in float32: the reduction scheme
// is limited to cuBLASLt's compute-type one, never bfloat16 output), c rounded once, the epilogue on the
// float32 value. cuBLASLt's GELU is the tanh approximation as ours, but its tanh is its own: the fused
// path agrees with gelu_forward to float32 rounding, not bit for bit (gemm.cu's epilogue does).
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <stdint.h>
#include <stdlib.h>

#include "gemm.h"
#include "gemm_common.cuh" // gemm_dtype_bytes, gemm_cuda_type, gemm_compute_type, gemm_check_blas

#define LT_MAX_BATCH 65535 // as cublasGemmStridedBatchedEx's, per call


// The largest power of two up to 256 that divides v (256 when v == 0).
static uint32_t lt_align(uint64_t v) {
    uint32_t a = 256;
    while (a > 1 && v % a)
        a >>= 1;
    return a;
}

// The alignment every batch's matrix keeps: of its base address, of the batch step when there are
// several, and of its leading dimension in bytes (each column starts there).
static uint32_t lt_operand_align(const void *base, size_t stride_elems, int batch, int ld, size_t es) {
    uint32_t a = lt_align((uint64_t)(uintptr_t)base), s = lt_align((uint64_t)ld * es);
    if (s < a)
        a = s;
    if (batch > 1 && (s = lt_align((uint64_t)stride_elems * es)) < a)
        a = s;
    return a;
}

// One round's descriptors, made once per shape (full rounds and a shorter last one share everything but
// pointers and the batch count).
typedef struct lt_round {
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t wl, xl, cl; // op(b) operand (cuBLASLt's A), a (its B), c (C and D)
    cublasLtMatmulPreference_t pref;
} lt_round;

static void lt_round_release(lt_round *R) {
    if (R->pref)
        cublasLtMatmulPreferenceDestroy(R->pref);
    if (R->cl)
        cublasLtMatrixLayoutDestroy(R->cl);
    if (R->xl)
        cublasLtMatrixLayoutDestroy(R->xl);
    if (R->wl)
        cublasLtMatrixLayoutDestroy(R->wl);
    if (R->op)
        cublasLtMatmulDescDestroy(R->op);
}

#define LT_SET(call)                                                                                                 \
    do {                                                                                                             \
        if ((call) != CUBLAS_STATUS_SUCCESS)                                                                         \
            return 0;                                                                                                \
    } while (0)

// Row-major c_g (m_max, n) = a_g (m_max, k) @ op(b_w) is column-major c^T (n, m_max) = op(b_w)^T (n, k) @
// a_g^T (k, m_max): cuBLASLt's A is the weight (stored (n, k) column-major with ldb when trans_b is 0,
// (k, n) read transposed when it is 1), its B the group's rows, its C = D the group's output. Returns 1
// when every descriptor took its attributes; pointers are set per round (lt_point).
static int lt_round_make(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *G, int W, lt_round *R) {
    const cudaDataType ab = gemm_cuda_type(G->a_type), ct = gemm_cuda_type(G->c_type);
    LT_SET(cublasLtMatmulDescCreate(&R->op, gemm_compute_type(env, G->a_type), CUDA_R_32F));
    const int32_t ta = G->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
    LT_SET(cublasLtMatmulDescSetAttribute(R->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_SET(cublasLtMatmulDescSetAttribute(R->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    uint32_t epi = CUBLASLT_EPILOGUE_DEFAULT;
    if (G->epilogue == DSMOE_EPI_BIAS)
        epi = CUBLASLT_EPILOGUE_BIAS;
    else if (G->epilogue == DSMOE_EPI_BIAS_GELU)
        epi = CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    else if (G->epilogue == DSMOE_EPI_DGELU)
        epi = CUBLASLT_EPILOGUE_DGELU;
    LT_SET(cublasLtMatmulDescSetAttribute(R->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    if (G->epilogue == DSMOE_EPI_BIAS || G->epilogue == DSMOE_EPI_BIAS_GELU) {
        const int32_t bias_type = CUDA_R_32F; // the ABI's bias is float32 whatever c is
        const int64_t bias_stride = (int64_t)G->bias_stride;
        LT_SET(cublasLtMatmulDescSetAttribute(R->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                              sizeof bias_type));
        LT_SET(cublasLtMatmulDescSetAttribute(R->op, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &bias_stride,
                                              sizeof bias_stride));
    }
    if (G->epilogue == DSMOE_EPI_BIAS_GELU || G->epilogue == DSMOE_EPI_DGELU) {
        const int64_t aux_ld = G->ldc, aux_stride = (int64_t)G->c_stride;
        LT_SET(cublasLtMatmulDescSetAttribute(R->op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof aux_ld));
        LT_SET(cublasLtMatmulDescSetAttribute(R->op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, &aux_stride,
                                              sizeof aux_stride));
    }
    const int n = G->n, k = G->k, m_max = G->m_max;
    LT_SET(cublasLtMatrixLayoutCreate(&R->wl, ab, G->trans_b ? k : n, G->trans_b ? n : k, G->ldb));
    LT_SET(cublasLtMatrixLayoutCreate(&R->xl, ab, k, m_max, G->lda));
    LT_SET(cublasLtMatrixLayoutCreate(&R->cl, ct, n, m_max, G->ldc));
    const int32_t batch = W;
    const int64_t strides[3] = {(int64_t)G->b_stride, (int64_t)G->a_stride, (int64_t)G->c_stride};
    cublasLtMatrixLayout_t layouts[3] = {R->wl, R->xl, R->cl};
    for (int i = 0; i < 3; i++) {
        LT_SET(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
        LT_SET(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i],
                                                sizeof strides[i]));
    }
    LT_SET(cublasLtMatmulPreferenceCreate(&R->pref));
    const uint64_t ws = env->blas_workspace ? env->blas_workspace_bytes : 0;
    const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE; // split-K sums in float32, or none
    LT_SET(cublasLtMatmulPreferenceSetAttribute(R->pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    LT_SET(cublasLtMatmulPreferenceSetAttribute(R->pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction,
                                                sizeof reduction));
    return 1;
}

// Round r's operands: weights 0 .. W-1, groups r*B onwards.
typedef struct lt_operands {
    const void *w, *x, *bias;
    void *c, *aux;
} lt_operands;

static lt_operands lt_round_operands(const dsmoe_grouped_gemm *G, int r) {
    const size_t g0 = (size_t)r * (size_t)G->b_groups, ea = gemm_dtype_bytes(G->a_type), ec = gemm_dtype_bytes(G->c_type);
    const int aux = G->epilogue == DSMOE_EPI_BIAS_GELU || G->epilogue == DSMOE_EPI_DGELU;
    const int bias = G->epilogue == DSMOE_EPI_BIAS || G->epilogue == DSMOE_EPI_BIAS_GELU;
    lt_operands o;
    o.w = G->b;
    o.x = (const char *)G->a + g0 * G->a_stride * ea;
    o.bias = bias ? G->bias : NULL;
    o.c = (char *)G->c + g0 * G->c_stride * ec;
    o.aux = aux ? (char *)G->aux + g0 * G->c_stride * ec : NULL;
    return o;
}

// The epilogue's pointers are attributes of the operation descriptor, so each round sets its own.
static int lt_set_pointers(lt_round *R, const lt_operands *o) {
    if (o->bias)
        LT_SET(cublasLtMatmulDescSetAttribute(R->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &o->bias, sizeof o->bias));
    if (o->aux)
        LT_SET(cublasLtMatmulDescSetAttribute(R->op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &o->aux,
                                              sizeof o->aux));
    return 1;
}

// Sets round r's pointers and its operands' alignments, then asks the heuristic: 1 with *algo filled.
static int lt_round_plan(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *G, int W, const lt_operands *o,
                         lt_round *R, cublasLtMatmulAlgo_t *algo) {
    const size_t ea = gemm_dtype_bytes(G->a_type), ec = gemm_dtype_bytes(G->c_type);
    if (!lt_set_pointers(R, o))
        return 0;
    const uint32_t align[4] = {lt_operand_align(o->w, G->b_stride, W, G->ldb, ea),
                               lt_operand_align(o->x, G->a_stride, W, G->lda, ea),
                               lt_operand_align(o->c, G->c_stride, W, G->ldc, ec),
                               lt_operand_align(o->c, G->c_stride, W, G->ldc, ec)};
    static const cublasLtMatmulPreferenceAttributes_t which[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++)
        LT_SET(cublasLtMatmulPreferenceSetAttribute(R->pref, which[i], &align[i], sizeof align[i]));
    cublasLtMatmulHeuristicResult_t result;
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic((cublasLtHandle_t)env->cublaslt, R->op, R->wl, R->xl, R->cl,
                                                       R->cl, R->pref, 1, &result, &found);
    if (st != CUBLAS_STATUS_SUCCESS || found < 1 || result.state != CUBLAS_STATUS_SUCCESS)
        return 0;
    *algo = result.algo;
    return 1;
}

// What cuBLASLt needs before it is asked: a product (k > 0), the aux epilogues' documented leading
// dimension and batch stride (multiples of 8), batch counts it takes in one call.
static int lt_applies(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *G) {
    if (!env->cublaslt || G->k <= 0 || G->b_groups > LT_MAX_BATCH)
        return 0;
    if (G->groups > LT_MAX_BATCH && G->b_groups >= G->groups)
        return 0;
    const int aux = G->epilogue == DSMOE_EPI_BIAS_GELU || G->epilogue == DSMOE_EPI_DGELU;
    if (aux && (G->ldc % 8 || (G->groups > 1 && G->c_stride % 8)))
        return 0;
    return 1;
}

extern "C" dsmoe_status dsmoe_cu_gemm_grouped_lt(const dsmoe_cu_env *env, const dsmoe_grouped_gemm *G, int *taken) {
    static const char op[] = "gemm_grouped";
    *taken = 0;
    if (!lt_applies(env, G))
        return DSMOE_OK;
    const int groups = G->groups, B = G->b_groups < groups ? G->b_groups : groups;
    const int rounds = (groups + B - 1) / B, last_W = groups - (rounds - 1) * B;
    cublasLtMatmulAlgo_t *algos = (cublasLtMatmulAlgo_t *)malloc((size_t)rounds * sizeof *algos);
    if (!algos)
        return dsmoe_cu_fail(env, DSMOE_ERR_NOMEM, "%s: cannot allocate %d cuBLASLt plans", op, rounds);
    lt_round full = {}, last = {};
    int ok = lt_round_make(env, G, B, &full) && (last_W == B || lt_round_make(env, G, last_W, &last));
    for (int r = 0; ok && r < rounds; r++) {
        lt_operands o = lt_round_operands(G, r);
        int W = r == rounds - 1 ? last_W : B;
        ok = lt_round_plan(env, G, W, &o, W == B ? &full : &last, &algos[r]);
    }
    dsmoe_status st = DSMOE_OK;
    for (int r = 0; ok && r < rounds && st == DSMOE_OK; r++) {
        lt_operands o = lt_round_operands(G, r);
        int W = r == rounds - 1 ? last_W : B;
        lt_round *R = W == B ? &full : &last;
        if (!lt_set_pointers(R, &o)) { // planning left the last round's there
            st = dsmoe_cu_fail(env, DSMOE_ERR_SYSTEM, "%s: cuBLASLt refused the round %d pointers", op, r);
            break;
        }
        *taken = 1; // from here on the call is cuBLASLt's, failed or not
        cublasStatus_t bs = cublasLtMatmul((cublasLtHandle_t)env->cublaslt, R->op, &G->alpha, o.w, R->wl, o.x, R->xl,
                                           &G->beta, o.c, R->cl, o.c, R->cl, &algos[r], env->blas_workspace,
                                           env->blas_workspace ? env->blas_workspace_bytes : 0, env->stream);
        st = gemm_check_blas(env, bs, op, "cublasLtMatmul");
    }
    lt_round_release(&full);
    lt_round_release(&last);
    free(algos);
    return st;
}
