// tests/cuda_emu/emu_gemm.h: the GEMM engine of the CUDA emulator, shared by its cuBLAS (emu_cublas.cc) and
// its cuBLASLt (emu_cublaslt.cc) so that the same product gives the same bits through either. Test-only; C++,
// header-only (inline functions and templates: one instantiation per element type and epilogue in a program).
//
// Column-major, D = epilogue(alpha op(A) op(B) + beta C), C and D with the same leading dimension (cuBLAS's
// in-place C is D == C). Each element accumulates in float32 over k in increasing order (8 x 4 register
// tiles of packed float panels), then v = alpha * acc + beta * c in float32; the epilogue maps (i, j, v) to
// the value stored, once (bfloat16 rounded to nearest even). With beta == 0, C is not read; with k == 0 or
// alpha == 0, A and B are not read and v = beta * c. Inputs are optionally rounded (Gemm::drop: 13 bits for
// TF32, 16 for bfloat16) when packed. No C++ runtime: no exceptions, operator new or containers.
#ifndef DSMOE_TESTS_CUDA_EMU_GEMM_H
#define DSMOE_TESTS_CUDA_EMU_GEMM_H
#include <library_types.h> // cudaDataType

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace dsmoe_emu_gemm {

inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) // NaN: keep the sign and high payload, force quiet (never inf)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// Rounds f to nearest even with the low `drop` mantissa bits cleared (13: TF32, 16: bfloat16); inf and NaN
// are left alone (clearing a NaN's low bits could make it inf).
inline float round_mantissa(float f, int drop) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u)
        return f;
    u += ((1u << (drop - 1)) - 1u) + ((u >> drop) & 1u);
    u &= ~((1u << drop) - 1u);
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline float load(const float *p, size_t i) { return p[i]; }
inline float load(const uint16_t *p, size_t i) { return bf16_to_float(p[i]); }
inline void store(float *p, size_t i, float v) { p[i] = v; }
inline void store(uint16_t *p, size_t i, float v) { p[i] = float_to_bf16(v); }

// Element size of the two types the emulator computes with (CUDA_R_16BF, CUDA_R_32F).
inline size_t type_bytes(cudaDataType t) { return t == CUDA_R_16BF ? 2 : 4; }

// Register tile of the product: MR rows of op(A) by NR columns of op(B). 8 x 4 floats keeps the
// accumulators, an A slice and a broadcast B value within the 16 SSE registers of baseline x86-64.
constexpr int MR = 8, NR = 4;
typedef float vmr __attribute__((vector_size(MR * sizeof(float))));

// Copies the logical matrix X (R x K, element (r, p) at src[r + p*ld] when r_contig, else at src[p + r*ld])
// into float panels of W rows, p-major within a panel: dst[(r / W * K + p) * W + r % W], so that the tile
// loop reads both operands contiguously. Rows past R are zero; drop > 0 rounds as round_mantissa.
template <typename T>
void pack(const T *src, int ld, int R, int K, bool r_contig, int W, int drop, float *dst) {
    const size_t panels = ((size_t)R + W - 1) / W;
    if (r_contig) {
        for (int p = 0; p < K; p++) {
            const T *col = src + (size_t)p * ld;
            for (int r = 0; r < R; r++)
                dst[((size_t)(r / W) * K + p) * W + r % W] = load(col, (size_t)r);
        }
    } else {
        for (int r = 0; r < R; r++) {
            const T *row = src + (size_t)r * ld;
            float *d = dst + (size_t)(r / W) * K * W + r % W;
            for (int p = 0; p < K; p++)
                d[(size_t)p * W] = load(row, (size_t)p);
        }
    }
    for (int r = R; r < (int)(panels * W); r++)
        for (int p = 0; p < K; p++)
            dst[((size_t)(r / W) * K + p) * W + r % W] = 0.0f;
    if (drop > 0)
        for (size_t i = 0, e = panels * W * K; i < e; i++)
            dst[i] = round_mantissa(dst[i], drop);
}

inline void pack_any(const void *src, cudaDataType t, int ld, int R, int K, bool r_contig, int W, int drop,
                     float *dst) {
    if (t == CUDA_R_16BF)
        pack((const uint16_t *)src, ld, R, K, r_contig, W, drop, dst);
    else
        pack((const float *)src, ld, R, K, r_contig, W, drop, dst);
}

// acc[c][r] = sum over p in increasing order of a[p][r] * b[p][c]. The vector type makes the element-wise
// multiply-adds explicit: each lane is the scalar sum in the same order, so -O2 suffices to vectorise.
inline void tile(int k, const float *a, const float *b, float acc[NR][MR]) {
    vmr c0 = {}, c1 = {}, c2 = {}, c3 = {};
    for (int p = 0; p < k; p++) {
        vmr av;
        std::memcpy(&av, a + (size_t)p * MR, sizeof av);
        const float *bp = b + (size_t)p * NR;
        c0 += av * bp[0];
        c1 += av * bp[1];
        c2 += av * bp[2];
        c3 += av * bp[3];
    }
    std::memcpy(acc[0], &c0, sizeof c0);
    std::memcpy(acc[1], &c1, sizeof c1);
    std::memcpy(acc[2], &c2, sizeof c2);
    std::memcpy(acc[3], &c3, sizeof c3);
}

// One GEMM's arguments once checked. ldc is C's and D's.
struct Gemm {
    bool ta, tb; // op(A), op(B) transposed
    int m, n, k, lda, ldb, ldc;
    float alpha, beta;
    cudaDataType at, bt, ct; // ct: C's and D's
    int drop;                // input rounding (round_mantissa), 0 for none
};

inline bool has_product(const Gemm &g) { return g.k > 0 && g.alpha != 0.0f; }

// The epilogue of a plain GEMM. An epilogue is a type with `static constexpr bool identity` and
// `float operator()(int i, int j, float v) const` giving what element (i, j) of D stores.
struct NoEpilogue {
    static constexpr bool identity = true;
    float operator()(int, int, float v) const { return v; }
};

// ap and bp hold the packed operands: (m rounded up to MR) * k and (n rounded up to NR) * k floats.
template <typename TC, typename Epilogue>
void gemm_into(const Gemm &g, const void *A, const void *B, const TC *C, TC *D, float *ap, float *bp,
               const Epilogue &epi) {
    if (!has_product(g)) { // no product: D = epilogue(beta * C), C unread when beta == 0
        if (Epilogue::identity && g.beta == 1.0f && (const void *)C == (const void *)D)
            return;
        for (int j = 0; j < g.n; j++)
            for (int i = 0; i < g.m; i++) {
                size_t at = (size_t)j * g.ldc + i;
                store(D, at, epi(i, j, g.beta == 0.0f ? 0.0f : g.beta * load(C, at)));
            }
        return;
    }
    // op(A) (m x k): element (i, p) is A[i + p*lda] (N) or A[p + i*lda] (T); op(B)^T (n x k): element (j, p)
    // is B[p + j*ldb] (N) or B[j + p*ldb] (T).
    const int mp = (g.m + MR - 1) / MR, np = (g.n + NR - 1) / NR;
    pack_any(A, g.at, g.lda, g.m, g.k, !g.ta, MR, g.drop, ap);
    pack_any(B, g.bt, g.ldb, g.n, g.k, g.tb, NR, g.drop, bp);
    float acc[NR][MR];
    for (int jb = 0; jb < np; jb++) {
        const int j0 = jb * NR, nc = g.n - j0 < NR ? g.n - j0 : NR;
        for (int ib = 0; ib < mp; ib++) {
            const int i0 = ib * MR, nr = g.m - i0 < MR ? g.m - i0 : MR;
            tile(g.k, ap + (size_t)ib * g.k * MR, bp + (size_t)jb * g.k * NR, acc);
            for (int c = 0; c < nc; c++) {
                size_t at = (size_t)(j0 + c) * g.ldc + i0;
                for (int r = 0; r < nr; r++) {
                    float v = g.alpha * acc[c][r];
                    if (g.beta != 0.0f)
                        v += g.beta * load(C, at + r);
                    store(D, at + r, epi(i0 + r, j0 + c, v));
                }
            }
        }
    }
}

// One batch's matrices. A and B may be NULL when there is no product, C when beta == 0.
struct Mats {
    const void *A, *B, *C;
    void *D;
};

// Runs batch GEMMs of one shape: operands(b) gives batch b's Mats, epilogue_of(b) its epilogue; the packing
// buffers are shared by the batches. False when they could not be allocated (nothing computed).
template <typename Operands, typename EpilogueOf>
bool run(const Gemm &g, int batch, Operands operands, EpilogueOf epilogue_of) {
    if (g.m == 0 || g.n == 0 || batch == 0)
        return true;
    float *ap = nullptr, *bp = nullptr;
    if (has_product(g)) {
        ap = (float *)std::malloc(((size_t)g.m + MR - 1) / MR * MR * g.k * sizeof(float));
        bp = (float *)std::malloc(((size_t)g.n + NR - 1) / NR * NR * g.k * sizeof(float));
        if (!ap || !bp) {
            std::free(ap);
            std::free(bp);
            return false;
        }
    }
    for (int b = 0; b < batch; b++) {
        const Mats x = operands(b);
        if (g.ct == CUDA_R_16BF)
            gemm_into(g, x.A, x.B, (const uint16_t *)x.C, (uint16_t *)x.D, ap, bp, epilogue_of(b));
        else
            gemm_into(g, x.A, x.B, (const float *)x.C, (float *)x.D, ap, bp, epilogue_of(b));
    }
    std::free(ap);
    std::free(bp);
    return true;
}

} // namespace dsmoe_emu_gemm

#endif
