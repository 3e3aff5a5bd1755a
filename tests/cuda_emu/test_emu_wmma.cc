// tests/cuda_emu/test_emu_wmma.cc: the CUDA emulator's WMMA (include/mma.h) on small kernels, against host
// references: bitwise against float32 sums in the documented order (c, then kk increasing), and within
// float32 rounding of double-precision ones. Covers every matrix_a / matrix_b layout with ldm > 16, stores in
// both layouts, accumulator loads, several k-steps accumulated onto one fragment (d aliasing c) and a d apart
// from c, fill_fragment, an element-wise scaling of x[], four warps each on its own tiles in shared memory,
// warps of a cooperative grid across grid.sync();
// that a store is not ordered for the other lanes without a __syncwarp;
// that a lane's x[] is only its share (the mapping a bijection over the warp, and not a layout a kernel could
// guess: an accumulator reused as matrix_a gives a scrambled product); and the kernel bugs it must stop on
// (misaligned pointers, ldm, layouts, lanes passing different arguments, a lane that exits or waits
// elsewhere, a partial warp), each in a child process that must abort with a message naming the operation.
// Built with emu_device.h included first, as kernels/*.cu are, and the emulator's include/ before the
// toolkit's.
#include <math.h>
#include <mma.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "emu_check.h" // CHECK, failures, checks

using namespace nvcuda;

typedef __nv_bfloat16 bf16;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_acc;

// ---------------------------------------------------------------------------------------------------
// Host side: 32-byte aligned buffers, operands, references.

template <typename T> struct buf {
    T *p = nullptr;
    size_t n = 0;
    explicit buf(size_t count, T fill = T()) : n(count) {
        void *m = nullptr;
        if (posix_memalign(&m, 64, count * sizeof(T) + 64) != 0) { perror("posix_memalign"); exit(1); }
        p = (T *)m;
        for (size_t i = 0; i < count; i++) p[i] = fill;
    }
    ~buf() { free(p); }
    buf(const buf &) = delete;
    buf &operator=(const buf &) = delete;
    T &operator[](size_t i) { return p[i]; }
};

static unsigned long long rng = 0x2545F4914F6CDD1Dull;
static float uniform(void) { // in [-1, 1)
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static float bf(float v) { return __bfloat162float(__float2bfloat16(v)); }

// A logical (rows, cols) matrix stored with leading dimension ld, row_major or not.
static size_t at(int r, int c, unsigned ld, bool row_major) {
    return row_major ? (size_t)r * ld + c : (size_t)c * ld + r;
}

// d(r, c) for an m x k by k x n product: float32 in the documented order, and double with the bound of its
// float32 rounding error.
struct refs {
    std::vector<float> f;
    std::vector<double> d, bound;
};
template <typename FA, typename FB, typename FC> static refs reference(int k, FA a, FB b, FC c) {
    refs out;
    for (int r = 0; r < 16; r++)
        for (int col = 0; col < 16; col++) {
            float acc = c(r, col);
            double dacc = c(r, col), mag = fabs(c(r, col));
            for (int kk = 0; kk < k; kk++) {
                acc += a(r, kk) * b(kk, col);
                dacc += (double)a(r, kk) * b(kk, col);
                mag += fabs((double)a(r, kk) * b(kk, col));
            }
            out.f.push_back(acc);
            out.d.push_back(dacc);
            out.bound.push_back(mag * k * 1.2e-7 + 1e-30);
        }
    return out;
}

// Checks the 16x16 tile stored at D (ldd, row_major or not) against the references, times `scale`.
static void check_tile(const char *what, const float *D, unsigned ldd, bool row_major, const refs &ref,
                       float scale = 1.0f) {
    int bad = 0;
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) {
            const float got = D[at(r, c, ldd, row_major)], want = scale * ref.f[r * 16 + c];
            const double dwant = scale * ref.d[r * 16 + c];
            if (bad < 4 && (memcmp(&got, &want, 4) != 0 || fabs(got - dwant) > scale * ref.bound[r * 16 + c])) {
                bad++;
                CHECK(false, "%s: d(%d, %d) = %.9g, float reference %.9g, double %.12g", what, r, c, got, want, dwant);
            }
        }
    CHECK(bad == 0, "%s: the tile differs from the reference", what);
}

// ---------------------------------------------------------------------------------------------------
// One 16x16x16 product per layout combination, stored in either layout.

template <typename LA, typename LB>
__global__ void product_kernel(const bf16 *A, unsigned lda, const bf16 *B, unsigned ldb, float *D, unsigned ldd,
                               int store_layout) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> b;
    frag_acc acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(a, A, lda);
    wmma::load_matrix_sync(b, B, ldb);
    wmma::mma_sync(acc, a, b, acc);
    wmma::store_matrix_sync(D, acc, ldd, (wmma::layout_t)store_layout);
}

template <typename LA, typename LB> static void test_product(const char *name) {
    const bool ra = std::is_same<LA, wmma::row_major>::value, rb = std::is_same<LB, wmma::row_major>::value;
    const unsigned lda = 24, ldb = 40, ldd = 20;
    buf<bf16> A(16 * lda), B(16 * ldb);
    std::vector<float> a(256), b(256);
    for (int i = 0; i < 256; i++) a[i] = bf(uniform()), b[i] = bf(uniform());
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) {
            A[at(r, c, lda, ra)] = __float2bfloat16(a[r * 16 + c]);
            B[at(r, c, ldb, rb)] = __float2bfloat16(b[r * 16 + c]);
        }
    const refs ref = reference(16, [&](int r, int k) { return a[r * 16 + k]; },
                               [&](int k, int c) { return b[k * 16 + c]; }, [](int, int) { return 0.0f; });
    for (int sl = 0; sl < 2; sl++) {
        buf<float> D(16 * ldd, -7.0f);
        cudaError_t e = dsmoe_emu_launch(product_kernel<LA, LB>, dim3(1), dim3(32), 0, 0, 0, A.p, lda, B.p, ldb, D.p,
                                         ldd, sl ? (int)wmma::mem_col_major : (int)wmma::mem_row_major);
        CHECK(e == cudaSuccess, "%s: launch %d", name, (int)e);
        char what[128];
        snprintf(what, sizeof what, "%s, stored %s", name, sl ? "col_major" : "row_major");
        check_tile(what, D.p, ldd, !sl, ref);
        int touched = 0; // the 4 elements of each row (column) between 16 and ldd stay as they were
        for (int r = 0; r < 16; r++)
            for (int c = 16; c < (int)ldd; c++) touched += D[(size_t)r * ldd + c] != -7.0f;
        CHECK(touched == 0, "%s: %d elements outside the tile written", what, touched);
    }
}

// ---------------------------------------------------------------------------------------------------
// A 16x64 by 64x16 product as 4 k-steps onto one accumulator loaded from memory (d aliasing c), optionally
// scaled element-wise at the end; and a d apart from c.

template <typename LB>
__global__ void ksteps_kernel(const bf16 *A, unsigned lda, const bf16 *B, unsigned ldb, const float *C, unsigned ldc,
                              int c_layout, float *D, unsigned ldd, int scale) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> b;
    frag_acc acc;
    wmma::load_matrix_sync(acc, C, ldc, (wmma::layout_t)c_layout);
    const bool rb = std::is_same<LB, wmma::row_major>::value;
    for (int s = 0; s < 4; s++) {
        wmma::load_matrix_sync(a, A + 16 * s, lda);
        wmma::load_matrix_sync(b, B + (rb ? (size_t)16 * s * ldb : (size_t)16 * s), ldb);
        wmma::mma_sync(acc, a, b, acc);
    }
    if (scale)
        for (int i = 0; i < acc.num_elements; i++) acc.x[i] *= 2.0f; // the same for every element: portable
    wmma::store_matrix_sync(D, acc, ldd, wmma::mem_col_major);
}

template <typename LB> static void test_ksteps(const char *name, int c_layout, int scale) {
    const bool rb = std::is_same<LB, wmma::row_major>::value;
    const unsigned lda = 72, ldb = rb ? 24 : 72, ldc = 20, ldd = 24;
    buf<bf16> A(16 * lda), B(64 * ldb);
    buf<float> C(16 * ldc), D(16 * ldd, -7.0f);
    std::vector<float> a(16 * 64), b(64 * 16), c(256);
    for (int i = 0; i < 16 * 64; i++) a[i] = bf(uniform()), b[i] = bf(uniform());
    for (int i = 0; i < 256; i++) c[i] = 4.0f * uniform();
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < 64; k++) A[at(r, k, lda, true)] = __float2bfloat16(a[r * 64 + k]);
    for (int k = 0; k < 64; k++)
        for (int col = 0; col < 16; col++) B[at(k, col, ldb, rb)] = __float2bfloat16(b[k * 16 + col]);
    for (int r = 0; r < 16; r++)
        for (int col = 0; col < 16; col++) C[at(r, col, ldc, c_layout == wmma::mem_row_major)] = c[r * 16 + col];
    const refs ref = reference(64, [&](int r, int k) { return a[r * 64 + k]; },
                               [&](int k, int col) { return b[k * 16 + col]; },
                               [&](int r, int col) { return c[r * 16 + col]; });
    cudaError_t e = dsmoe_emu_launch(ksteps_kernel<LB>, dim3(1), dim3(32), 0, 0, 0, A.p, lda, B.p, ldb, C.p, ldc,
                                     c_layout, D.p, ldd, scale);
    CHECK(e == cudaSuccess, "%s: launch %d", name, (int)e);
    check_tile(name, D.p, ldd, false, ref, scale ? 2.0f : 1.0f);
}

__global__ void apart_kernel(const bf16 *A, const bf16 *B, const float *C, float *D, float *C2) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
    frag_acc c, d;
    wmma::load_matrix_sync(a, A, 16);
    wmma::load_matrix_sync(b, B, 16);
    wmma::load_matrix_sync(c, C, 16, wmma::mem_row_major);
    wmma::mma_sync(d, a, b, c);
    wmma::store_matrix_sync(D, d, 16, wmma::mem_row_major);
    wmma::store_matrix_sync(C2, c, 16, wmma::mem_row_major);
}

static void test_apart(void) {
    buf<bf16> A(256), B(256);
    buf<float> C(256), D(256), C2(256);
    std::vector<float> a(256), b(256), c(256);
    for (int i = 0; i < 256; i++) a[i] = bf(uniform()), b[i] = bf(uniform()), c[i] = C[i] = uniform();
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < 16; k++) A[at(r, k, 16, false)] = __float2bfloat16(a[r * 16 + k]);
    for (int i = 0; i < 256; i++) B[i] = __float2bfloat16(b[i]);
    const refs ref = reference(16, [&](int r, int k) { return a[r * 16 + k]; },
                               [&](int k, int col) { return b[k * 16 + col]; },
                               [&](int r, int col) { return c[r * 16 + col]; });
    dsmoe_emu_launch(apart_kernel, dim3(1), dim3(32), 0, 0, 0, A.p, B.p, C.p, D.p, C2.p);
    check_tile("d apart from c", D.p, 16, true, ref);
    CHECK(memcmp(C.p, C2.p, 256 * sizeof(float)) == 0, "mma_sync changed c when d is another fragment");
}

// fill_fragment on every kind: a of ones times b gives b's column sums; an accumulator filled with 1.5.
__global__ void fill_kernel(const bf16 *B, float *D, float *F) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
    frag_acc acc;
    wmma::fill_fragment(a, __float2bfloat16(1.0f));
    wmma::load_matrix_sync(b, B, 16);
    wmma::fill_fragment(acc, 0.5f);
    wmma::mma_sync(acc, a, b, acc);
    wmma::store_matrix_sync(D, acc, 16, wmma::mem_row_major);
    wmma::fill_fragment(acc, 1.5f);
    wmma::store_matrix_sync(F, acc, 16, wmma::mem_col_major);
}

static void test_fill(void) {
    buf<bf16> B(256);
    buf<float> D(256), F(256);
    std::vector<float> b(256);
    for (int i = 0; i < 256; i++) b[i] = bf(uniform());
    for (int k = 0; k < 16; k++)
        for (int c = 0; c < 16; c++) B[at(k, c, 16, false)] = __float2bfloat16(b[k * 16 + c]);
    const refs ref = reference(16, [](int, int) { return 1.0f; }, [&](int k, int c) { return b[k * 16 + c]; },
                               [](int, int) { return 0.5f; });
    dsmoe_emu_launch(fill_kernel, dim3(1), dim3(32), 0, 0, 0, B.p, D.p, F.p);
    check_tile("fill_fragment", D.p, 16, true, ref);
    int bad = 0;
    for (int i = 0; i < 256; i++) bad += F[i] != 1.5f;
    CHECK(bad == 0, "fill_fragment(acc, 1.5f): %d elements differ", bad);
}

// ---------------------------------------------------------------------------------------------------
// Four warps, each its own tiles through shared memory: copied in by the warp's lanes, loaded, multiplied,
// stored to a float scratch in shared memory, copied out by the lanes (a __syncwarp between each).

struct alignas(32) warp_tiles {
    bf16 a[16 * 24], b[16 * 24];
    float d[16 * 20];
};

__global__ void warps_kernel(const bf16 *A, const bf16 *B, float *D) {
    __shared__ warp_tiles tiles[4];
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    warp_tiles &t = tiles[w];
    for (int e = lane; e < 256; e += 32) {
        t.a[(e / 16) * 24 + e % 16] = A[w * 256 + e]; // A_w row_major
        t.b[(e % 16) * 24 + e / 16] = B[w * 256 + e]; // B_w (k, c) = B[w * 256 + k * 16 + c], col_major here
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
    frag_acc acc;
    wmma::load_matrix_sync(a, t.a, 24);
    wmma::load_matrix_sync(b, t.b, 24);
    wmma::fill_fragment(acc, 0.0f);
    wmma::mma_sync(acc, a, b, acc);
    wmma::store_matrix_sync(t.d, acc, 20, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) D[w * 256 + e] = t.d[(e / 16) * 20 + e % 16];
}

static void test_warps(void) {
    buf<bf16> A(4 * 256), B(4 * 256);
    buf<float> D(4 * 256, -7.0f);
    std::vector<float> a(4 * 256), b(4 * 256);
    for (int i = 0; i < 4 * 256; i++) a[i] = bf(uniform()), b[i] = bf(uniform());
    for (int i = 0; i < 4 * 256; i++) A[i] = __float2bfloat16(a[i]), B[i] = __float2bfloat16(b[i]);
    cudaError_t e = dsmoe_emu_launch(warps_kernel, dim3(1), dim3(128), 0, 0, 0, A.p, B.p, D.p);
    CHECK(e == cudaSuccess, "4 warps: launch %d", (int)e);
    for (int w = 0; w < 4; w++) {
        const float *aw = &a[w * 256], *bw = &b[w * 256];
        const refs ref = reference(16, [&](int r, int k) { return aw[r * 16 + k]; },
                                   [&](int k, int c) { return bw[k * 16 + c]; }, [](int, int) { return 0.0f; });
        char what[64];
        snprintf(what, sizeof what, "4 warps in shared memory, warp %d", w);
        check_tile(what, D.p + w * 256, 16, true, ref);
    }
}

// A cooperative grid: 4 blocks of 2 warps, each block on a host thread of its own, taking turns at grid.sync()
// between the two products of every warp (the warps' scratches are shared by the blocks' host threads).
__global__ void coop_kernel(const bf16 *A, const bf16 *B, float *D) {
    const int tile = blockIdx.x * 2 + threadIdx.x / 32;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
    frag_acc acc;
    for (int round = 0; round < 2; round++) {
        wmma::load_matrix_sync(a, A + tile * 256, 16);
        wmma::load_matrix_sync(b, B + tile * 256, 16);
        wmma::fill_fragment(acc, 0.0f);
        wmma::mma_sync(acc, a, b, acc);
        wmma::store_matrix_sync(D + (round * 8 + tile) * 256, acc, 16, wmma::mem_row_major);
        if (!round) cooperative_groups::this_grid().sync();
    }
}

static void test_cooperative(void) {
    buf<bf16> A(8 * 256), B(8 * 256);
    buf<float> D(16 * 256, -7.0f);
    std::vector<float> a(8 * 256), b(8 * 256);
    for (int i = 0; i < 8 * 256; i++) a[i] = bf(uniform()), b[i] = bf(uniform());
    for (int i = 0; i < 8 * 256; i++) A[i] = __float2bfloat16(a[i]), B[i] = __float2bfloat16(b[i]);
    cudaError_t e = dsmoe_emu_launch(coop_kernel, dim3(4), dim3(64), 0, 0, 1, A.p, B.p, D.p);
    CHECK(e == cudaSuccess, "cooperative: launch %d", (int)e);
    for (int t = 0; t < 16; t++) {
        const float *at_ = &a[(t % 8) * 256], *bt = &b[(t % 8) * 256];
        const refs ref = reference(16, [&](int r, int k) { return at_[r * 16 + k]; },
                                   [&](int k, int c) { return bt[k * 16 + c]; }, [](int, int) { return 0.0f; });
        char what[64];
        snprintf(what, sizeof what, "cooperative, tile %d round %d", t % 8, t / 8);
        check_tile(what, D.p + t * 256, 16, true, ref);
    }
}

// A store orders nothing for the other lanes: without a __syncwarp, the first lane past store_matrix_sync
// finds the others' elements not yet written (out[lane]: how many of the 256 it found unwritten).
__global__ void store_order_kernel(float *D, int *out, int syncwarp) {
    frag_acc acc;
    wmma::fill_fragment(acc, 1.0f);
    wmma::store_matrix_sync(D, acc, 16, wmma::mem_row_major);
    if (syncwarp) __syncwarp();
    int unwritten = 0;
    for (int e = 0; e < 256; e++) unwritten += D[e] != 1.0f;
    out[threadIdx.x] = unwritten;
}

static void test_store_order(void) {
    for (int sync = 0; sync < 2; sync++) {
        buf<float> D(256, -7.0f);
        buf<int> out(32, -1);
        dsmoe_emu_launch(store_order_kernel, dim3(1), dim3(32), 0, 0, 0, D.p, out.p, sync);
        int most = 0;
        for (int l = 0; l < 32; l++) most = out[l] > most ? out[l] : most;
        if (sync)
            CHECK(most == 0, "store_matrix_sync then __syncwarp: a lane found %d elements unwritten", most);
        else
            CHECK(most >= 256 - 8, "store_matrix_sync without __syncwarp: the first lane on found only %d of the "
                  "others' 248 elements unwritten", most);
    }
}

// ---------------------------------------------------------------------------------------------------
// A lane's share: x[] of every lane together is each element of the tile once, in no layout a kernel
// could guess.

template <typename Use, typename L> __global__ void share_kernel(const bf16 *M, float *out) {
    wmma::fragment<Use, 16, 16, 16, bf16, L> f;
    wmma::load_matrix_sync(f, M, 16);
    const int lane = threadIdx.x;
    for (int i = 0; i < f.num_elements; i++) out[lane * f.num_elements + i] = __bfloat162float(f.x[i]);
}
__global__ void acc_share_kernel(float *D) {
    frag_acc acc;
    for (int i = 0; i < acc.num_elements; i++) acc.x[i] = (float)(threadIdx.x * acc.num_elements + i);
    wmma::store_matrix_sync(D, acc, 16, wmma::mem_row_major);
}
// The mistake a kernel must not make: an accumulator's x[] taken element by element as matrix_a's.
__global__ void reuse_kernel(const float *M, const bf16 *I, float *D) {
    frag_acc acc;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
    wmma::load_matrix_sync(acc, M, 16, wmma::mem_row_major);
    for (int i = 0; i < acc.num_elements; i++) a.x[i] = __float2bfloat16(acc.x[i]);
    wmma::load_matrix_sync(b, I, 16);
    wmma::fill_fragment(acc, 0.0f);
    wmma::mma_sync(acc, a, b, acc);
    wmma::store_matrix_sync(D, acc, 16, wmma::mem_row_major);
}

// out[lane * 8 + i] holds tile element v (row * 16 + col): each of 0..255 once, and not the trivial layouts.
static void check_share(const char *what, const float *out) {
    std::vector<int> seen(256, 0);
    int bad = 0, row_major_order = 0, col_major_order = 0, lane_rows = 0;
    for (int j = 0; j < 256; j++) {
        const int v = (int)out[j];
        if (out[j] != (float)v || v < 0 || v > 255) bad++;
        else seen[v]++;
        row_major_order += v == j;
        col_major_order += v == (j % 16) * 16 + j / 16;
    }
    for (int v = 0; v < 256; v++) bad += seen[v] != 1;
    for (int l = 0; l < 32; l++) { // the 8 elements of a lane in one row, or one column
        int same_row = 1, same_col = 1;
        for (int i = 1; i < 8; i++) {
            same_row &= (int)out[l * 8 + i] / 16 == (int)out[l * 8] / 16;
            same_col &= (int)out[l * 8 + i] % 16 == (int)out[l * 8] % 16;
        }
        lane_rows += same_row || same_col;
    }
    CHECK(bad == 0, "%s: the lanes' x[] are not each element of the tile once (%d wrong)", what, bad);
    CHECK(row_major_order < 32 && col_major_order < 32, "%s: x[] in a guessable order (%d, %d elements in place)",
          what, row_major_order, col_major_order);
    CHECK(lane_rows < 8, "%s: %d lanes hold one row or column", what, lane_rows);
}

static void test_share(void) {
    buf<bf16> M(256), I(256);
    buf<float> out(256), D(256), Mf(256);
    for (int i = 0; i < 256; i++) M[i] = __float2bfloat16((float)i); // integers to 256 are exact in bfloat16
    dsmoe_emu_launch(share_kernel<wmma::matrix_a, wmma::row_major>, dim3(1), dim3(32), 0, 0, 0, M.p, out.p);
    check_share("matrix_a row_major", out.p);
    std::vector<float> a_row(out.p, out.p + 256);
    dsmoe_emu_launch(share_kernel<wmma::matrix_a, wmma::col_major>, dim3(1), dim3(32), 0, 0, 0, M.p, out.p);
    // loaded col_major, element (r, c) is M[c * 16 + r]: transpose back to the tile's index
    for (int j = 0; j < 256; j++) out[j] = (float)(((int)out[j] % 16) * 16 + (int)out[j] / 16);
    check_share("matrix_a col_major", out.p);
    dsmoe_emu_launch(share_kernel<wmma::matrix_b, wmma::row_major>, dim3(1), dim3(32), 0, 0, 0, M.p, out.p);
    check_share("matrix_b row_major", out.p);
    int same = 0;
    for (int j = 0; j < 256; j++) same += out[j] == a_row[j];
    CHECK(same < 32, "matrix_a and matrix_b row_major share %d of 256 places", same);
    dsmoe_emu_launch(share_kernel<wmma::matrix_b, wmma::col_major>, dim3(1), dim3(32), 0, 0, 0, M.p, out.p);
    for (int j = 0; j < 256; j++) out[j] = (float)(((int)out[j] % 16) * 16 + (int)out[j] / 16);
    check_share("matrix_b col_major", out.p);
    dsmoe_emu_launch(acc_share_kernel, dim3(1), dim3(32), 0, 0, 0, D.p);
    // D[e] = lane * 8 + i of the lane holding element e: invert into out[lane * 8 + i] = e
    for (int e = 0; e < 256; e++) {
        const int j = (int)D[e];
        if (j >= 0 && j < 256) out[j] = (float)e;
    }
    check_share("accumulator", out.p);
    // An accumulator reused as matrix_a, times the identity: a GPU-layout assumption, scrambled here.
    for (int i = 0; i < 256; i++) {
        Mf[i] = (float)i;
        I[i] = __float2bfloat16(i / 16 == i % 16 ? 1.0f : 0.0f);
    }
    dsmoe_emu_launch(reuse_kernel, dim3(1), dim3(32), 0, 0, 0, Mf.p, I.p, D.p);
    int in_place = 0;
    for (int i = 0; i < 256; i++) in_place += D[i] == Mf[i];
    CHECK(in_place < 32, "an accumulator reused as matrix_a gave %d of 256 elements in place", in_place);
}

// ---------------------------------------------------------------------------------------------------
// Kernel bugs: the emulator must abort with its message, which names the operation.

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a;
#define LANE ((int)threadIdx.x % 32)

__global__ void misaligned_kernel(const bf16 *A, float *) { frag_a a; wmma::load_matrix_sync(a, A + 8, 16); }
__global__ void bad_ldm_bf16_kernel(const bf16 *A, float *) { frag_a a; wmma::load_matrix_sync(a, A, 20); }
__global__ void null_kernel(const bf16 *, float *) { frag_a a; wmma::load_matrix_sync(a, (const bf16 *)nullptr, 16); }
__global__ void bad_ldm_float_kernel(const bf16 *, float *D) {
    frag_acc acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::store_matrix_sync(D, acc, 18, wmma::mem_row_major);
}
__global__ void misaligned_float_kernel(const bf16 *, float *D) {
    frag_acc acc;
    wmma::load_matrix_sync(acc, D + 4, 16, wmma::mem_col_major);
}
__global__ void bad_layout_kernel(const bf16 *, float *D) {
    frag_acc acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::store_matrix_sync(D, acc, 16, (wmma::layout_t)2);
}
__global__ void different_pointers_kernel(const bf16 *A, float *) {
    frag_a a;
    wmma::load_matrix_sync(a, A + (LANE < 16 ? 0 : 16), 16);
}
__global__ void different_ldm_kernel(const bf16 *, float *D) {
    frag_acc acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::store_matrix_sync(D, acc, LANE == 9 ? 32 : 16, wmma::mem_row_major);
}
__global__ void different_layouts_kernel(const bf16 *, float *D) {
    frag_acc acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::store_matrix_sync(D, acc, 16, LANE == 30 ? wmma::mem_col_major : wmma::mem_row_major);
}
__global__ void different_types_kernel(const bf16 *A, float *) {
    if (LANE < 16) {
        frag_a a;
        wmma::load_matrix_sync(a, A, 16);
    } else {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a;
        wmma::load_matrix_sync(a, A, 16);
    }
}
__global__ void different_mma_kernel(const bf16 *, float *) {
    frag_a a;
    frag_acc acc;
    wmma::fill_fragment(a, __float2bfloat16(1.0f));
    wmma::fill_fragment(acc, 0.0f);
    if (LANE < 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
        wmma::fill_fragment(b, __float2bfloat16(1.0f));
        wmma::mma_sync(acc, a, b, acc);
    } else {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
        wmma::fill_fragment(b, __float2bfloat16(1.0f));
        wmma::mma_sync(acc, a, b, acc);
    }
}
__global__ void lane_exits_kernel(const bf16 *A, float *) {
    if (LANE == 7) return;
    frag_a a;
    wmma::load_matrix_sync(a, A, 16);
}
__global__ void lane_syncwarp_kernel(const bf16 *A, float *) {
    frag_a a;
    if (LANE == 3)
        __syncwarp();
    else
        wmma::load_matrix_sync(a, A, 16);
}
__global__ void lane_syncthreads_kernel(const bf16 *, float *) {
    frag_a a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
    frag_acc acc;
    wmma::fill_fragment(a, __float2bfloat16(1.0f));
    wmma::fill_fragment(b, __float2bfloat16(1.0f));
    wmma::fill_fragment(acc, 0.0f);
    if (LANE == 3)
        __syncthreads();
    else
        wmma::mma_sync(acc, a, b, acc);
}
__global__ void partial_warp_kernel(const bf16 *A, float *) { // launched with 48 threads
    frag_a a;
    wmma::load_matrix_sync(a, A, 16);
}

static bf16 *bug_a;
static float *bug_d;

static void expect_abort(const char *what, void (*kernel)(const bf16 *, float *), int threads,
                         std::vector<const char *> messages) {
    expect_abort_child(what, [kernel, threads] {
        dsmoe_emu_launch(kernel, dim3(1), dim3(threads), 0, 0, 0, (const bf16 *)bug_a, bug_d);
    }, messages.data(), (int)messages.size());
}

static void test_bugs(void) {
    buf<bf16> A(16 * 64, __float2bfloat16(1.0f));
    buf<float> D(16 * 64, 0.0f);
    bug_a = A.p;
    bug_d = D.p;
    expect_abort("misaligned bf16", misaligned_kernel, 32,
                 {"dsmoe CUDA emulator: ", "wmma::load_matrix_sync: the pointer", "is not 32-byte (256-bit) aligned",
                  "(warp 0 lane "});
    expect_abort("bf16 ldm", bad_ldm_bf16_kernel, 32, {"wmma::load_matrix_sync: ldm 20 is not a multiple of 8"});
    expect_abort("null", null_kernel, 32, {"wmma::load_matrix_sync: the pointer is null"});
    expect_abort("float ldm", bad_ldm_float_kernel, 32, {"wmma::store_matrix_sync: ldm 18 is not a multiple of 4"});
    expect_abort("misaligned float", misaligned_float_kernel, 32,
                 {"wmma::load_matrix_sync: the pointer", "is not 32-byte"});
    expect_abort("layout", bad_layout_kernel, 32,
                 {"wmma::store_matrix_sync: layout 2 is neither mem_row_major nor mem_col_major"});
    expect_abort("pointers", different_pointers_kernel, 32,
                 {"wmma::load_matrix_sync: the lanes of the warp pass different arguments"});
    expect_abort("ldm", different_ldm_kernel, 32,
                 {"wmma::store_matrix_sync: the lanes of the warp pass different arguments", "ldm 32"});
    expect_abort("layouts", different_layouts_kernel, 32,
                 {"wmma::store_matrix_sync: the lanes of the warp pass different arguments", "mem_col_major"});
    expect_abort("fragment types", different_types_kernel, 32,
                 {"wmma::load_matrix_sync: the lanes of the warp pass different arguments", "matrix_a col_major"});
    expect_abort("mma_sync fragment types", different_mma_kernel, 32,
                 {"wmma::mma_sync: the lanes of the warp pass different arguments",
                  "matrix_a row_major x matrix_b col_major", "matrix_a row_major x matrix_b row_major"});
    expect_abort("a lane exits", lane_exits_kernel, 32,
                 {"names a lane that has exited", "wmma::load_matrix_sync", "lane 7 has exited"});
    expect_abort("a lane at __syncwarp", lane_syncwarp_kernel, 32,
                 {"different warp operations", "wmma::load_matrix_sync", "__syncwarp"});
    expect_abort("a lane at __syncthreads", lane_syncthreads_kernel, 32, {"deadlock", "wmma::mma_sync"});
    expect_abort("partial warp", partial_warp_kernel, 48,
                 {"wmma::load_matrix_sync needs the 32 lanes of a warp; warp 1 of the block has 16 threads"});
}

int main(void) {
    test_product<wmma::row_major, wmma::row_major>("a row_major x b row_major");
    test_product<wmma::row_major, wmma::col_major>("a row_major x b col_major");
    test_product<wmma::col_major, wmma::row_major>("a col_major x b row_major");
    test_product<wmma::col_major, wmma::col_major>("a col_major x b col_major");
    test_ksteps<wmma::row_major>("4 k-steps, b row_major, c row_major", wmma::mem_row_major, 0);
    test_ksteps<wmma::col_major>("4 k-steps, b col_major, c col_major", wmma::mem_col_major, 0);
    test_ksteps<wmma::col_major>("4 k-steps scaled by 2", wmma::mem_row_major, 1);
    test_apart();
    test_fill();
    test_warps();
    test_cooperative();
    test_store_order();
    test_share();
    test_bugs();
    printf("test_emu_wmma: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
