// tests/cuda_emu/test_emu_cublaslt.cc: the CUDA emulator's cuBLASLt (emu_cublaslt.cc) against references
// computed another way: for every emulated epilogue, in float32, bfloat16 and bfloat16 in / float32 out, both
// bias types, op(A) and op(B) N and T, 3 batches with every operand, bias and aux at its own nonzero stride, beta
// 0 (C full of NaN, which must not leak) and 0.5, in place or not, D (and aux when written) against a triple loop
// in double with the epilogue applied in double, within float32's or bfloat16's rounding; D's and aux's padding
// left alone. A plain (DEFAULT) matmul gives the bits of the emulated cublasGemmStridedBatchedEx on the same
// operands. Then the refusals: the documented aux constraints, epilogues not emulated, misaligned pointers against
// the declared alignments, the DSMOE_EMU_LT_NO_ALGO hook, bad attributes and layouts. Every matmul runs on a
// created stream, so that its deferred execution shows: nothing is computed before the synchronisation.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "emu_streams.h" // dsmoe_emu_deferred

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "emu_check.h" // CHECK, failures, checks

static cudaStream_t stream;
static cublasLtHandle_t lt;

// ---------------------------------------------------------------------------------------------------
// Host access to device buffers (the emulator's device memory is host memory).

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint16_t to_bf16(float f) { // nearest even; the test's values are finite
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static size_t esize(cudaDataType t) { return t == CUDA_R_16BF ? 2 : 4; }

static double get(const void *p, cudaDataType t, size_t i) {
    return t == CUDA_R_16BF ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static void put(void *p, cudaDataType t, size_t i, float v) {
    if (t == CUDA_R_16BF)
        ((uint16_t *)p)[i] = to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static bool untouched(const void *p, cudaDataType t, size_t i) { // still the 0xFF bytes it was filled with
    return t == CUDA_R_16BF ? ((const uint16_t *)p)[i] == 0xffffu : ((const uint32_t *)p)[i] == 0xffffffffu;
}

static std::vector<void *> allocations;
static void *dalloc(size_t bytes) { // 0xFF bytes: NaN in both types
    void *p = nullptr;
    CHECK(cudaMalloc(&p, bytes) == cudaSuccess && p, "cudaMalloc(%zu)", bytes);
    memset(p, 0xff, bytes);
    allocations.push_back(p);
    return p;
}
static void free_all() {
    for (void *p : allocations) cudaFree(p);
    allocations.clear();
}

static uint32_t seed = 12345;
static float rnd(float lo, float hi) {
    seed = seed * 1664525u + 1013904223u;
    return lo + (hi - lo) * (float)(seed >> 8) / 16777216.0f;
}

// The largest power of two up to 256 that divides every batch's address: what a plugin declares.
static uint32_t align_of(const void *p, int64_t stride_bytes, int batch) {
    uint32_t a = 256;
    for (int b = 0; b < batch; b++)
        while (((uintptr_t)p + (uint64_t)(b * stride_bytes)) % a != 0) a /= 2;
    return a;
}

template <typename T> static cublasStatus_t dset(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a, T v) {
    return cublasLtMatmulDescSetAttribute(d, a, &v, sizeof v);
}
template <typename T> static cublasStatus_t lset(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t a, T v) {
    return cublasLtMatrixLayoutSetAttribute(l, a, &v, sizeof v);
}
template <typename T>
static cublasStatus_t pset(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t a, T v) {
    return cublasLtMatmulPreferenceSetAttribute(p, a, &v, sizeof v);
}

// ---------------------------------------------------------------------------------------------------
// One problem's descriptors: A, B, C and D layouts from the shape, column-major, batched.

struct Shape {
    cudaDataType ab, cd;
    bool ta, tb;
    int m, n, k, batch;
    int64_t lda, ldb, ldc, sa, sb, sc; // elements
};

struct Descs {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    ~Descs() {
        cublasLtMatmulDescDestroy(op);
        cublasLtMatrixLayoutDestroy(a);
        cublasLtMatrixLayoutDestroy(b);
        cublasLtMatrixLayoutDestroy(c);
        cublasLtMatrixLayoutDestroy(d);
        cublasLtMatmulPreferenceDestroy(pref);
    }
};

static cublasLtMatrixLayout_t layout(cudaDataType t, uint64_t rows, uint64_t cols, int64_t ld, int batch, int64_t s) {
    cublasLtMatrixLayout_t l = nullptr;
    bool ok = cublasLtMatrixLayoutCreate(&l, t, rows, cols, ld) == CUBLAS_STATUS_SUCCESS &&
              lset(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, (int32_t)batch) == CUBLAS_STATUS_SUCCESS &&
              lset(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, (int64_t)s) == CUBLAS_STATUS_SUCCESS;
    CHECK(ok, "a layout and its batch attributes");
    return l;
}

static void make(Descs &L, const Shape &s, cublasComputeType_t compute, uint32_t epilogue) {
    bool ok = cublasLtMatmulDescCreate(&L.op, compute, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
              dset(L.op, CUBLASLT_MATMUL_DESC_TRANSA, (int32_t)(s.ta ? CUBLAS_OP_T : CUBLAS_OP_N)) == 0 &&
              dset(L.op, CUBLASLT_MATMUL_DESC_TRANSB, (int32_t)(s.tb ? CUBLAS_OP_T : CUBLAS_OP_N)) == 0 &&
              dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue) == 0 &&
              cublasLtMatmulPreferenceCreate(&L.pref) == CUBLAS_STATUS_SUCCESS &&
              pset(L.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, (uint64_t)0) == 0;
    CHECK(ok, "the matmul descriptor and preference");
    L.a = layout(s.ab, s.ta ? s.k : s.m, s.ta ? s.m : s.k, s.lda, s.batch, s.sa);
    L.b = layout(s.ab, s.tb ? s.n : s.k, s.tb ? s.k : s.n, s.ldb, s.batch, s.sb);
    L.c = layout(s.cd, s.m, s.n, s.ldc, s.batch, s.sc);
    L.d = layout(s.cd, s.m, s.n, s.ldc, s.batch, s.sc);
}

static cublasStatus_t heuristic(Descs &L, cublasLtMatmulHeuristicResult_t *r, int *found) {
    memset(r, 0, sizeof *r);
    *found = -1;
    return cublasLtMatmulAlgoGetHeuristic(lt, L.op, L.a, L.b, L.c, L.d, L.pref, 1, r, found);
}

// A shape with padded leading dimensions and batch strides (multiples of 8 elements, as the aux rules need).
static Shape shape(cudaDataType ab, cudaDataType cd, bool ta, bool tb, int m, int n, int k, int batch) {
    Shape s{ab, cd, ta, tb, m, n, k, batch, 0, 0, 0, 0, 0, 0};
    s.lda = (ta ? k : m) + 3;
    s.ldb = (tb ? n : k) + 2;
    s.ldc = m + 5;
    s.sa = (s.lda * (ta ? m : k) + 13) / 8 * 8;
    s.sb = (s.ldb * (tb ? k : n) + 11) / 8 * 8;
    s.sc = (s.ldc * n + 9) / 8 * 8;
    return s;
}

// Random operands in device buffers: A, B in [-1, 1]; C too when read, else NaN.
struct Operands {
    void *A, *B, *C;
};

static Operands operands(const Shape &s, bool c_read) {
    const size_t na = (size_t)s.sa * s.batch + 8, nb = (size_t)s.sb * s.batch + 8, nc = (size_t)s.sc * s.batch + 8;
    Operands o{dalloc(na * esize(s.ab)), dalloc(nb * esize(s.ab)), dalloc(nc * esize(s.cd))};
    for (size_t i = 0; i < na; i++) put(o.A, s.ab, i, rnd(-1, 1));
    for (size_t i = 0; i < nb; i++) put(o.B, s.ab, i, rnd(-1, 1));
    if (c_read)
        for (size_t i = 0; i < nc; i++) put(o.C, s.cd, i, rnd(-1, 1));
    return o;
}

// The preference's minimum alignments: those of every batch's address, as a plugin declares them.
static void declare_alignments(Descs &L, const Shape &s, const Operands &o, const void *D) {
    const uint32_t align[4] = {align_of(o.A, s.sa * (int64_t)esize(s.ab), s.batch),
                               align_of(o.B, s.sb * (int64_t)esize(s.ab), s.batch),
                               align_of(o.C, s.sc * (int64_t)esize(s.cd), s.batch),
                               align_of(D, s.sc * (int64_t)esize(s.cd), s.batch)};
    const cublasLtMatmulPreferenceAttributes_t which[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++) CHECK(pset(L.pref, which[i], align[i]) == 0, "alignment %d", i);
}

static double op_a(const Shape &s, const void *A, int b, int i, int p) {
    return get(A, s.ab, (size_t)b * s.sa + (s.ta ? (size_t)p + (size_t)i * s.lda : (size_t)i + (size_t)p * s.lda));
}
static double op_b(const Shape &s, const void *B, int b, int p, int j) {
    return get(B, s.ab, (size_t)b * s.sb + (s.tb ? (size_t)j + (size_t)p * s.ldb : (size_t)p + (size_t)j * s.ldb));
}

static double gelu_d(double x) {
    const double c = 0.7978845608028654;
    return 0.5 * x * (1.0 + tanh(c * (x + 0.044715 * x * x * x)));
}
static double gelu_grad_d(double x) {
    const double c = 0.7978845608028654, th = tanh(c * (x + 0.044715 * x * x * x));
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * x * x);
}

// ---------------------------------------------------------------------------------------------------
// The epilogues against the double-precision reference.

struct Epi {
    uint32_t e;
    const char *name;
    bool bias, gelu, aux_out, dgelu;
};
static const Epi epilogues[] = {
    {CUBLASLT_EPILOGUE_DEFAULT, "DEFAULT", false, false, false, false},
    {CUBLASLT_EPILOGUE_BIAS, "BIAS", true, false, false, false},
    {CUBLASLT_EPILOGUE_GELU, "GELU", false, true, false, false},
    {CUBLASLT_EPILOGUE_GELU_AUX, "GELU_AUX", false, true, true, false},
    {CUBLASLT_EPILOGUE_GELU_BIAS, "GELU_BIAS", true, true, false, false},
    {CUBLASLT_EPILOGUE_GELU_AUX_BIAS, "GELU_AUX_BIAS", true, true, true, false},
    {CUBLASLT_EPILOGUE_DGELU, "DGELU", false, false, false, true},
};

static const char *type_name(int t) { return t == -1 ? "D's" : t == CUDA_R_16BF ? "bf16" : "f32"; }

static void run_case(const Shape &s, const Epi &E, int bias_type, float alpha, float beta, bool in_place) {
    char name[160];
    snprintf(name, sizeof name, "%s/%s %s bias %s ta=%d tb=%d m=%d n=%d k=%d batch=%d alpha=%g beta=%g%s",
             type_name(s.ab), type_name(s.cd), E.name, type_name(bias_type), s.ta, s.tb, s.m, s.n, s.k, s.batch,
             alpha, beta, in_place ? " in place" : "");
    const bool c_read = beta != 0.0f || in_place;
    Operands o = operands(s, c_read);
    const size_t nd = (size_t)s.sc * s.batch + 8;
    void *D = in_place ? o.C : dalloc(nd * esize(s.cd));
    std::vector<double> c0(nd);
    for (size_t i = 0; i < nd; i++) c0[i] = c_read ? get(o.C, s.cd, i) : 0.0;
    const cudaDataType bt = bias_type == -1 ? s.cd : (cudaDataType)bias_type, at = s.cd;
    const int64_t bias_stride = (s.m + 7) / 8 * 8 + 8, aux_ld = (s.m + 7) / 8 * 8 + 8, aux_stride = aux_ld * s.n + 16;
    void *bias = dalloc((size_t)bias_stride * s.batch * esize(bt));
    void *aux = dalloc((size_t)aux_stride * s.batch * esize(at));
    for (int64_t i = 0; i < bias_stride * s.batch; i++) put(bias, bt, (size_t)i, rnd(-1, 1));
    if (E.dgelu)
        for (int64_t i = 0; i < aux_stride * s.batch; i++) put(aux, at, (size_t)i, rnd(-3, 3));

    Descs L;
    make(L, s, CUBLAS_COMPUTE_32F, E.e);
    if (E.bias) {
        CHECK(dset(L.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, (const void *)bias) == 0 &&
                  dset(L.op, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, bias_stride) == 0,
              "%s: bias attributes", name);
        if (bias_type != -1)
            CHECK(dset(L.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, (int32_t)bias_type) == 0, "%s: bias type", name);
    }
    if (E.aux_out || E.dgelu)
        CHECK(dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux) == 0 &&
                  dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, aux_ld) == 0 &&
                  dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, aux_stride) == 0 &&
                  dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, (int32_t)-1) == 0,
              "%s: aux attributes", name);
    declare_alignments(L, s, o, D);
    cublasLtMatmulHeuristicResult_t r;
    int found;
    cublasStatus_t st = heuristic(L, &r, &found);
    CHECK(st == CUBLAS_STATUS_SUCCESS && found == 1 && r.state == CUBLAS_STATUS_SUCCESS && r.workspaceSize == 0,
          "%s: heuristic %d, %d found", name, (int)st, found);
    if (st != CUBLAS_STATUS_SUCCESS || found != 1) return;
    st = cublasLtMatmul(lt, L.op, &alpha, o.A, L.a, o.B, L.b, &beta, o.C, L.c, D, L.d, &r.algo, nullptr, 0, stream);
    CHECK(st == CUBLAS_STATUS_SUCCESS, "%s: cublasLtMatmul %d", name, (int)st);
    if (st != CUBLAS_STATUS_SUCCESS) return;
    if (dsmoe_emu_deferred() && !in_place)
        CHECK(untouched(D, s.cd, 0), "%s: D computed before the stream was synchronised", name);
    CHECK(cudaStreamSynchronize(stream) == cudaSuccess, "%s: synchronisation", name);

    const double rel_d = s.cd == CUDA_R_16BF ? 1.0 / 256 : 0.0;
    int bad = 0;
    for (int b = 0; b < s.batch; b++)
        for (int j = 0; j < s.n; j++) {
            for (int i = 0; i < s.m; i++) {
                double acc = 0, mag = 0;
                for (int p = 0; p < s.k; p++) {
                    const double t = op_a(s, o.A, b, i, p) * op_b(s, o.B, b, p, j);
                    acc += t;
                    mag += fabs(t);
                }
                const size_t at_c = (size_t)b * s.sc + (size_t)i + (size_t)j * s.ldc;
                double v = alpha * acc, c = beta != 0.0f ? beta * c0[at_c] : 0.0;
                v += c;
                mag = fabs(alpha) * mag + fabs(c);
                if (E.bias) {
                    const double bv = get(bias, bt, (size_t)b * bias_stride + i);
                    v += bv;
                    mag += fabs(bv);
                }
                const size_t at_aux = (size_t)b * aux_stride + (size_t)i + (size_t)j * aux_ld;
                const double pre = v;
                if (E.gelu) v = gelu_d(pre);
                if (E.dgelu) v = gelu_grad_d(get(aux, at, at_aux)) * v;
                const double got = get(D, s.cd, at_c), tol = rel_d * fabs(v) + 1e-5 * (mag + 1.0);
                if (!(fabs(got - v) <= tol) && bad++ < 3)
                    printf("  %s: D[b=%d](%d, %d) = %.9g, expected %.9g (tolerance %.2g)\n", name, b, i, j, got, v,
                           tol);
                if (E.aux_out) {
                    const double ga = get(aux, at, at_aux), tol_a = rel_d * fabs(pre) + 1e-5 * (mag + 1.0);
                    if (!(fabs(ga - pre) <= tol_a) && bad++ < 3)
                        printf("  %s: aux[b=%d](%d, %d) = %.9g, expected %.9g\n", name, b, i, j, ga, pre);
                }
            }
            for (int i = s.m; i < s.ldc && !in_place; i++)
                if (!untouched(D, s.cd, (size_t)b * s.sc + (size_t)i + (size_t)j * s.ldc) && bad++ < 3)
                    printf("  %s: D's padding written at b=%d (%d, %d)\n", name, b, i, j);
            for (int64_t i = s.m; i < aux_ld && E.aux_out; i++)
                if (!untouched(aux, at, (size_t)(b * aux_stride + i + j * aux_ld)) && bad++ < 3)
                    printf("  %s: aux's padding written at b=%d (%d, %d)\n", name, b, (int)i, j);
        }
    CHECK(bad == 0, "%s: %d elements wrong", name, bad);
    free_all();
}

static void test_epilogues(void) {
    struct Types {
        cudaDataType ab, cd;
        int bias[3], nbias;
    };
    const Types types[] = {{CUDA_R_32F, CUDA_R_32F, {-1, CUDA_R_32F}, 2},
                           {CUDA_R_16BF, CUDA_R_16BF, {-1, CUDA_R_32F, CUDA_R_16BF}, 3},
                           {CUDA_R_16BF, CUDA_R_32F, {-1, CUDA_R_32F}, 2}};
    int idx = 0;
    for (const Types &t : types)
        for (const Epi &E : epilogues)
            for (float beta : {0.0f, 0.5f}) {
                const bool ta = idx & 1, tb = (idx >> 1) & 1;
                run_case(shape(t.ab, t.cd, ta, tb, 37, 19, 45, 3), E, t.bias[idx % t.nbias], 1.25f, beta, false);
                idx++;
            }
    // Both bias types with every bias epilogue in bfloat16; in place; one batch; no product (k = 0, alpha = 0).
    for (const Epi &E : epilogues)
        if (E.bias) {
            run_case(shape(CUDA_R_16BF, CUDA_R_16BF, true, false, 21, 9, 30, 3), E, CUDA_R_16BF, 1.0f, 0.5f, false);
            run_case(shape(CUDA_R_16BF, CUDA_R_16BF, false, true, 21, 9, 30, 3), E, CUDA_R_32F, 1.0f, 0.0f, false);
        }
    run_case(shape(CUDA_R_32F, CUDA_R_32F, true, false, 33, 17, 20, 3), epilogues[0], -1, 1.0f, 0.5f, true);
    run_case(shape(CUDA_R_16BF, CUDA_R_16BF, false, false, 33, 17, 20, 3), epilogues[5], -1, 0.75f, 0.5f, true);
    run_case(shape(CUDA_R_32F, CUDA_R_32F, false, false, 64, 32, 64, 1), epilogues[5], -1, 1.0f, 0.0f, false);
    run_case(shape(CUDA_R_32F, CUDA_R_32F, false, false, 20, 7, 0, 3), epilogues[4], -1, 1.0f, 0.5f, false);
    run_case(shape(CUDA_R_16BF, CUDA_R_16BF, true, true, 20, 7, 12, 3), epilogues[5], -1, 0.0f, 0.5f, false);
    run_case(shape(CUDA_R_32F, CUDA_R_32F, true, false, 20, 7, 12, 3), epilogues[6], -1, 0.0f, 0.0f, false);
}

// ---------------------------------------------------------------------------------------------------
// DEFAULT against cublasGemmStridedBatchedEx: the same bits.

static void test_bitwise(void) {
    cublasHandle_t h = nullptr;
    CHECK(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS && cublasSetStream(h, stream) == CUBLAS_STATUS_SUCCESS,
          "cublasCreate");
    struct Cfg {
        cudaDataType ab, cd;
        cublasComputeType_t compute;
        float beta;
        bool ta, tb;
    };
    const Cfg cfgs[] = {{CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F, 0.5f, true, false},
                        {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, 0.5f, false, true},
                        {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF, 0.0f, false, false},
                        {CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F, 0.5f, true, true},
                        {CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F_PEDANTIC, 0.0f, true, false},
                        {CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, 0.5f, false, true}};
    for (const Cfg &c : cfgs) {
        const Shape s = shape(c.ab, c.cd, c.ta, c.tb, 37, 19, 45, 3);
        Operands o = operands(s, true);
        const size_t nd = (size_t)s.sc * s.batch + 8, bytes = nd * esize(s.cd);
        void *D = dalloc(bytes), *C2 = dalloc(bytes);
        memcpy(C2, o.C, bytes);
        const float alpha = 1.25f;
        Descs L;
        make(L, s, c.compute, CUBLASLT_EPILOGUE_DEFAULT);
        declare_alignments(L, s, o, D);
        cublasLtMatmulHeuristicResult_t r;
        int found;
        CHECK(heuristic(L, &r, &found) == CUBLAS_STATUS_SUCCESS && found == 1, "compute %d: heuristic", (int)c.compute);
        cublasStatus_t lst = cublasLtMatmul(lt, L.op, &alpha, o.A, L.a, o.B, L.b, &c.beta, o.C, L.c, D, L.d, &r.algo,
                                            nullptr, 0, stream);
        cublasStatus_t bst = cublasGemmStridedBatchedEx(
            h, c.ta ? CUBLAS_OP_T : CUBLAS_OP_N, c.tb ? CUBLAS_OP_T : CUBLAS_OP_N, s.m, s.n, s.k, &alpha, o.A, s.ab,
            (int)s.lda, s.sa, o.B, s.ab, (int)s.ldb, s.sb, &c.beta, C2, s.cd, (int)s.ldc, s.sc, s.batch, c.compute,
            CUBLAS_GEMM_DEFAULT);
        CHECK(lst == CUBLAS_STATUS_SUCCESS && bst == CUBLAS_STATUS_SUCCESS, "compute %d: Lt %d, cuBLAS %d",
              (int)c.compute, (int)lst, (int)bst);
        CHECK(cudaStreamSynchronize(stream) == cudaSuccess, "synchronisation");
        int differ = 0;
        for (int b = 0; b < s.batch; b++)
            for (int j = 0; j < s.n; j++) {
                const size_t off = ((size_t)b * s.sc + (size_t)j * s.ldc) * esize(s.cd);
                differ += memcmp((char *)D + off, (char *)C2 + off, (size_t)s.m * esize(s.cd)) != 0;
            }
        CHECK(differ == 0, "%s/%s compute %d beta %g: %d columns differ from cublasGemmStridedBatchedEx's",
              type_name(c.ab), type_name(c.cd), (int)c.compute, c.beta, differ);
        free_all();
    }
    cublasDestroy(h);
}

// ---------------------------------------------------------------------------------------------------
// bfloat16 aux rounds to nearest even: pre-activations 1 + j 2^-8 (ties for odd j) stored exactly so.

static void test_aux_rounding(void) {
    const Shape s{CUDA_R_16BF, CUDA_R_16BF, false, false, 8, 4, 2, 1, 8, 2, 8, 0, 0, 0};
    void *A = dalloc(8 * 2 * 2), *B = dalloc(2 * 4 * 2), *bias = dalloc(8 * 2), *aux = dalloc(8 * 4 * 2);
    void *D = dalloc(8 * 4 * 2);
    for (int i = 0; i < 8; i++) {
        put(A, CUDA_R_16BF, (size_t)i, 1.0f);
        put(A, CUDA_R_16BF, (size_t)i + 8, 0.00390625f); // 2^-8
        put(bias, CUDA_R_16BF, (size_t)i, 0.0f);
    }
    for (int j = 0; j < 4; j++) {
        put(B, CUDA_R_16BF, (size_t)j * 2, 1.0f);
        put(B, CUDA_R_16BF, (size_t)j * 2 + 1, (float)j);
    }
    Descs L;
    make(L, s, CUBLAS_COMPUTE_32F, CUBLASLT_EPILOGUE_GELU_AUX_BIAS);
    dset(L.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, (const void *)bias);
    dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
    dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, (int64_t)8);
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t st =
        cublasLtMatmul(lt, L.op, &one, A, L.a, B, L.b, &zero, nullptr, L.c, D, L.d, nullptr, nullptr, 0, stream);
    CHECK(st == CUBLAS_STATUS_SUCCESS, "aux rounding: cublasLtMatmul %d", (int)st);
    cudaStreamSynchronize(stream);
    const uint16_t want[4] = {0x3f80, 0x3f80, 0x3f81, 0x3f82}; // 1, 1 + 2^-8 -> 1, 1 + 2^-7, 1 + 3 2^-8 -> 1 + 2^-6
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 8; i++) {
            const uint16_t got = ((const uint16_t *)aux)[i + j * 8];
            CHECK(got == want[j], "aux (%d, %d) = 0x%04x, expected 0x%04x", i, j, got, want[j]);
        }
    free_all();
}

// ---------------------------------------------------------------------------------------------------
// Refusals.

static void expect_heuristic(Descs &L, cublasStatus_t want, const char *what) {
    cublasLtMatmulHeuristicResult_t r;
    int found;
    cublasStatus_t st = heuristic(L, &r, &found);
    CHECK(st == want && found == (want == CUBLAS_STATUS_SUCCESS ? 1 : 0), "%s: heuristic %d (want %d), %d found",
          what, (int)st, (int)want, found);
}

static void test_refusals(void) {
    const float one = 1.0f, zero = 0.0f;
    // Batch strides of 64 elements: every batch 256-byte aligned, so that the default alignments hold but for D.
    Shape s = shape(CUDA_R_32F, CUDA_R_32F, false, false, 10, 6, 8, 3);
    s.sa = (s.sa + 63) / 64 * 64;
    s.sb = (s.sb + 63) / 64 * 64;
    s.sc = (s.sc + 63) / 64 * 64;
    {   // GELU_AUX_BIAS: aux ld 12 (not a multiple of 8), then 16; aux batch stride 4.
        Descs L;
        make(L, s, CUBLAS_COMPUTE_32F, CUBLASLT_EPILOGUE_GELU_AUX_BIAS);
        void *bias = dalloc(256), *aux = dalloc(4096);
        dset(L.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, (const void *)bias);
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, (int64_t)128);
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, (int64_t)12);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "aux ld 12");
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, (int64_t)16);
        expect_heuristic(L, CUBLAS_STATUS_SUCCESS, "aux ld 16");
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, (int64_t)100);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "aux batch stride 100 with 3 batches");
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, (int64_t)128);
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, (int32_t)CUDA_R_16BF);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "aux bfloat16 with D float32");
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, (int32_t)-1);
        dset(L.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, (int32_t)CUDA_R_16BF);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "bias bfloat16 with D float32");
        dset(L.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, (int32_t)CUDA_R_32F);
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, (void *)nullptr);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "no aux pointer");
        dset(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
        dset(L.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, (const void *)nullptr);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "no bias pointer");
        // A bias pointer off 16 bytes: accepted by the heuristic, refused by the matmul.
        dset(L.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, (const void *)((char *)bias + 4));
        Operands o = operands(s, false);
        void *D = dalloc(4096);
        cublasStatus_t st = cublasLtMatmul(lt, L.op, &one, o.A, L.a, o.B, L.b, &zero, o.C, L.c, D, L.d, nullptr,
                                           nullptr, 0, stream);
        CHECK(st == CUBLAS_STATUS_INVALID_VALUE, "a bias pointer 4 bytes off: %d", (int)st);
    }
    const uint32_t refused[] = {CUBLASLT_EPILOGUE_RELU, CUBLASLT_EPILOGUE_RELU_BIAS, CUBLASLT_EPILOGUE_DGELU_BGRAD,
                                CUBLASLT_EPILOGUE_BGRADA, CUBLASLT_EPILOGUE_BGRADB, 0};
    for (uint32_t e : refused) {
        Descs L;
        make(L, s, CUBLAS_COMPUTE_32F, e);
        char what[48];
        snprintf(what, sizeof what, "epilogue %u", e);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, what);
        Operands o = operands(s, false);
        void *D = dalloc(4096);
        cublasStatus_t st = cublasLtMatmul(lt, L.op, &one, o.A, L.a, o.B, L.b, &zero, o.C, L.c, D, L.d, nullptr,
                                           nullptr, 0, stream);
        CHECK(st == CUBLAS_STATUS_NOT_SUPPORTED, "%s: cublasLtMatmul %d", what, (int)st);
    }
    {   // D 4 bytes off: refused with the default alignments, accepted once 4 is declared, and computed right.
        Descs L;
        make(L, s, CUBLAS_COMPUTE_32F, CUBLASLT_EPILOGUE_DEFAULT);
        Operands o = operands(s, false);
        const size_t nd = (size_t)s.sc * s.batch + 8;
        char *D = (char *)dalloc(nd * 4 + 4) + 4;
        cublasLtMatmulHeuristicResult_t r;
        int found;
        CHECK(heuristic(L, &r, &found) == CUBLAS_STATUS_SUCCESS && found == 1, "default preferences");
        cublasStatus_t st = cublasLtMatmul(lt, L.op, &one, o.A, L.a, o.B, L.b, &zero, nullptr, L.c, D, L.d, &r.algo,
                                           nullptr, 0, stream);
        CHECK(st == CUBLAS_STATUS_INVALID_VALUE, "D 4 bytes off, default preferences: %d", (int)st);
        st = cublasLtMatmul(lt, L.op, &one, o.A, L.a, o.B, L.b, &zero, nullptr, L.c, D, L.d, nullptr, nullptr, 0,
                            stream);
        CHECK(st == CUBLAS_STATUS_INVALID_VALUE, "D 4 bytes off, no algo: %d", (int)st);
        pset(L.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, (uint32_t)4);
        CHECK(heuristic(L, &r, &found) == CUBLAS_STATUS_SUCCESS && found == 1, "D alignment 4");
        st = cublasLtMatmul(lt, L.op, &one, o.A, L.a, o.B, L.b, &zero, nullptr, L.c, D, L.d, &r.algo, nullptr, 0,
                            stream);
        CHECK(st == CUBLAS_STATUS_SUCCESS, "D 4 bytes off, D alignment 4: %d", (int)st);
        cudaStreamSynchronize(stream);
        int bad = 0;
        for (int b = 0; b < s.batch; b++)
            for (int j = 0; j < s.n; j++)
                for (int i = 0; i < s.m; i++) {
                    double acc = 0;
                    for (int p = 0; p < s.k; p++) acc += op_a(s, o.A, b, i, p) * op_b(s, o.B, b, p, j);
                    const double got = get(D, CUDA_R_32F, (size_t)b * s.sc + i + (size_t)j * s.ldc);
                    bad += !(fabs(got - acc) <= 1e-5 * (s.k + 1));
                }
        CHECK(bad == 0, "D 4 bytes off, D alignment 4: %d elements wrong", bad);
        // The hook: no algorithm at all.
        setenv("DSMOE_EMU_LT_NO_ALGO", "1", 1);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "DSMOE_EMU_LT_NO_ALGO=1");
        unsetenv("DSMOE_EMU_LT_NO_ALGO");
        expect_heuristic(L, CUBLAS_STATUS_SUCCESS, "DSMOE_EMU_LT_NO_ALGO unset");
        // Attributes: one not emulated, a wrong size; the status texts.
        CHECK(dset(L.op, CUBLASLT_MATMUL_DESC_FILL_MODE, (int32_t)0) == CUBLAS_STATUS_INVALID_VALUE, "FILL_MODE");
        CHECK(dset(L.op, CUBLASLT_MATMUL_DESC_TRANSA, (int64_t)0) == CUBLAS_STATUS_INVALID_VALUE, "TRANSA as int64");
        CHECK(pset(L.pref, CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT, 0.0f) == CUBLAS_STATUS_INVALID_VALUE, "MAX_WAVES");
        CHECK(lset(L.d, CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET, (int64_t)0) == CUBLAS_STATUS_INVALID_VALUE,
              "PLANE_OFFSET");
        CHECK(strcmp(cublasLtGetStatusName(CUBLAS_STATUS_NOT_SUPPORTED), "CUBLAS_STATUS_NOT_SUPPORTED") == 0,
              "cublasLtGetStatusName");
        CHECK(cublasLtGetVersion() == (size_t)CUBLAS_VERSION, "cublasLtGetVersion %zu", cublasLtGetVersion());
        // Descriptors that do not fit: pointer mode, order, C's layout, shapes, batch counts, types.
        dset(L.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, (int32_t)CUBLASLT_POINTER_MODE_DEVICE);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "device pointer mode");
        dset(L.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, (int32_t)CUBLASLT_POINTER_MODE_HOST);
        lset(L.a, CUBLASLT_MATRIX_LAYOUT_ORDER, (int32_t)CUBLASLT_ORDER_ROW);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "row order");
        lset(L.a, CUBLASLT_MATRIX_LAYOUT_ORDER, (int32_t)CUBLASLT_ORDER_COL);
        lset(L.c, CUBLASLT_MATRIX_LAYOUT_LD, (int64_t)(s.ldc + 1));
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "C's ld not D's");
        lset(L.c, CUBLASLT_MATRIX_LAYOUT_LD, (int64_t)s.ldc);
        lset(L.b, CUBLASLT_MATRIX_LAYOUT_ROWS, (uint64_t)(s.k + 1));
        expect_heuristic(L, CUBLAS_STATUS_INVALID_VALUE, "B's rows not k");
        lset(L.b, CUBLASLT_MATRIX_LAYOUT_ROWS, (uint64_t)s.k);
        lset(L.a, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, (int32_t)2);
        expect_heuristic(L, CUBLAS_STATUS_INVALID_VALUE, "batch counts 2 and 3");
        lset(L.a, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, (int32_t)s.batch);
        lset(L.a, CUBLASLT_MATRIX_LAYOUT_LD, (int64_t)(s.m - 1));
        expect_heuristic(L, CUBLAS_STATUS_INVALID_VALUE, "A's ld below its rows");
        lset(L.a, CUBLASLT_MATRIX_LAYOUT_LD, (int64_t)s.lda);
        lset(L.a, CUBLASLT_MATRIX_LAYOUT_TYPE, (uint32_t)CUDA_R_16F);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "A half");
        lset(L.a, CUBLASLT_MATRIX_LAYOUT_TYPE, (uint32_t)CUDA_R_32F);
        expect_heuristic(L, CUBLAS_STATUS_SUCCESS, "all restored");
        cublasLtMatmulHeuristicResult_t rr;
        CHECK(cublasLtMatmulAlgoGetHeuristic(nullptr, L.op, L.a, L.b, L.c, L.d, L.pref, 1, &rr, &found) ==
                  CUBLAS_STATUS_NOT_INITIALIZED, "no handle");
        CHECK(cublasLtMatmulAlgoGetHeuristic(lt, L.op, L.a, L.b, L.c, L.d, L.pref, 0, &rr, &found) ==
                  CUBLAS_STATUS_INVALID_VALUE, "0 algorithms requested");
        cublasLtMatmulAlgo_t junk;
        memset(&junk, 0, sizeof junk);
        st = cublasLtMatmul(lt, L.op, &one, o.A, L.a, o.B, L.b, &zero, nullptr, L.c, D - 4, L.d, &junk, nullptr, 0,
                            stream);
        CHECK(st == CUBLAS_STATUS_INVALID_VALUE, "an algo no heuristic gave: %d", (int)st);
    }
    {   // bfloat16 operands under _FAST_16BF: float32 only, as the emulated cuBLAS.
        Descs L;
        make(L, shape(CUDA_R_16BF, CUDA_R_16BF, false, false, 8, 8, 8, 1), CUBLAS_COMPUTE_32F_FAST_16BF,
             CUBLASLT_EPILOGUE_DEFAULT);
        expect_heuristic(L, CUBLAS_STATUS_NOT_SUPPORTED, "bfloat16 under _FAST_16BF");
    }
    cudaStreamSynchronize(stream);
    free_all();
}

int main(void) {
    if (cudaStreamCreate(&stream) != cudaSuccess || cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) {
        printf("FAIL: cudaStreamCreate or cublasLtCreate\n");
        return 1;
    }
    test_epilogues();
    test_bitwise();
    test_aux_rounding();
    test_refusals();
    cublasLtDestroy(lt);
    cudaStreamDestroy(stream);
    printf("test_emu_cublaslt: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
