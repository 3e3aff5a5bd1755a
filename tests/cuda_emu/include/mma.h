// tests/cuda_emu/include/mma.h: stands in for CUDA's <mma.h> (WMMA, namespace nvcuda::wmma) when kernels/*.cu
// are built for the CUDA emulator (../emu_device.h has the model). The subset kernels/ uses: the shape
// m16n16k16, __nv_bfloat16 matrix_a / matrix_b fragments (row_major or col_major) and float accumulators;
// fill_fragment, load_matrix_sync, store_matrix_sync and mma_sync. Other shapes and types do not compile.
//
// What is emulated:
// - A fragment's x[] holds only the calling lane's share of its 16x16 tile, as on a GPU: num_elements = 8
//   in every fragment here (8 x 32 lanes = 256 elements). Which element x[i] of lane l is, CUDA leaves
//   unspecified, and a kernel must not rely on it: only operations that treat every element alike
//   (fill_fragment, scaling every x[i], converting them all) are portable. The emulator's mapping is private
//   and deliberately scrambled, different for each of the five fragment kinds (matrix_a / matrix_b, each
//   row_major / col_major, and accumulator), so that a kernel assuming some layout (a row per lane, a GPU's
//   register layout, an accumulator reused as a matrix_a fragment) gets a scrambled result: with k = 32 i + l
//   and f = (M (k ^ (k >> 4)) + A) mod 256, x[i] of lane l is the tile's element (row, col) = (f / 16, f % 16);
//   (M, A) is (167, 89) for matrix_a row_major, (45, 3) matrix_a col_major, (93, 150) matrix_b row_major,
//   (211, 27) matrix_b col_major, (77, 19) accumulator. A bijection over the warp: k -> k ^ (k >> 4) keeps
//   the high nibble and so is invertible, and M is odd.
// - Memory: row_major element (r, c) at p[r * ldm + c], col_major at p[c * ldm + r]; matrix_a is 16 rows x
//   16 (k), matrix_b 16 (k) x 16 columns. mma_sync: d = a b + c, each element c + sum over kk = 0..15 in
//   increasing order of a(r, kk) b(kk, c), in float32 (products of bfloat16 values are exact); d may be c.
// - load_matrix_sync, store_matrix_sync and mma_sync are warp-collective. Each lane publishes its arguments
//   (and for mma_sync its shares of a and b) in its warp's scratch, waits at a named barrier of the whole
//   warp (emu_device.cc's dsmoe_emu_warp_collective: it completes only when all 32 lanes wait at the same
//   operation), checks that every lane passed what it did, reads the shares it needs, and waits at a second
//   barrier, after which the scratch may be reused. Then each lane loads or stores its own elements, as CUDA
//   documents ("waits until all warp lanes have arrived, then loads / stores"). So the lanes' writes before a
//   load_matrix_sync are all done when it reads (a missing __syncwarp there goes unseen), but nothing orders
//   a lane's load or store against another lane's later accesses: a lane that reads what other lanes stored,
//   or overwrites what they load, needs a __syncwarp, as on a GPU, and the first lane on exposes a missing one.
// What is assumed (emu_device.cc's design): one host thread runs kernel code at a time, and a cooperative block
// hands over to the others only once all its threads wait at grid.sync(), so with no warp inside one of these
// operations: one scratch per warp index serves every block of every launch.
// What is checked, as kernel bugs (emu_device.cc names the kernel and block, and aborts; the message names
// the operation): all 32 lanes of a full warp at the same operation (a lane that exited, waits at another
// warp operation or barrier, or a warp of fewer than 32 threads), the same pointer, ldm, layout and fragment
// types in every lane, a pointer that is not null and 32-byte (256-bit) aligned, ldm a multiple of 8 for
// __nv_bfloat16 and of 4 for float (16 bytes, CUDA's requirement), a layout_t that is one of the two.
// No exceptions, allocation or std containers: C programs load the emulated plugin without libstdc++.
#ifndef DSMOE_CUDA_EMU_MMA_H
#define DSMOE_CUDA_EMU_MMA_H
#include "../emu_device.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

// emu_device.cc
extern "C" {
void dsmoe_emu_warp_collective(const char *name);
[[noreturn]] void dsmoe_emu_kernel_bug(const char *what);
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
// A fixed underlying type (CUDA's has none): a kernel's out-of-range value is then a value that the checks
// below report, not undefined behaviour.
enum layout_t : int { mem_row_major, mem_col_major };

// The emulator's own: not part of CUDA's API, kernels must not use it.
namespace dsmoe_emu {

enum kind { A_ROW, A_COL, B_ROW, B_COL, ACC, NO_KIND };
template <typename Use, typename T, typename Layout> struct kind_of { static const int value = NO_KIND; };
template <> struct kind_of<matrix_a, __nv_bfloat16, row_major> { static const int value = A_ROW; };
template <> struct kind_of<matrix_a, __nv_bfloat16, col_major> { static const int value = A_COL; };
template <> struct kind_of<matrix_b, __nv_bfloat16, row_major> { static const int value = B_ROW; };
template <> struct kind_of<matrix_b, __nv_bfloat16, col_major> { static const int value = B_COL; };
template <> struct kind_of<accumulator, float, void> { static const int value = ACC; };

static inline const char *kind_name(int k) {
    static const char *const names[] = {"matrix_a row_major", "matrix_a col_major", "matrix_b row_major",
                                        "matrix_b col_major", "accumulator", "-"};
    return k >= 0 && k <= NO_KIND ? names[k] : "?";
}

// The tile element (row * 16 + col) that x[i] of lane `lane` holds in a fragment of kind k (the mapping the
// top comment documents).
static inline int element(int k, int lane, int i) {
    static const unsigned mul[5] = {167, 45, 93, 211, 77}, add[5] = {89, 3, 150, 27, 19};
    const unsigned e = (unsigned)(i * 32 + lane);
    return (int)((mul[k] * (e ^ (e >> 4)) + add[k]) & 255u);
}

// What one lane passed to a collective operation; every lane of the warp must pass the same.
struct args {
    const void *p;
    unsigned ldm;
    int layout; // layout_t of an accumulator's load or store, else -1
    int kind, kind2; // the fragments' kinds (kind2: matrix_b's in mma_sync)
};
// One warp's scratch: the arguments by lane, and mma_sync's a and b tiles as published by their lanes.
struct warp_scratch {
    args a[32];
    float ta[256], tb[256];
};
inline warp_scratch scratch[32]; // by warp index within the block (1024 threads at most)

struct me {
    int warp, lane;
};
static inline me whoami(void) {
    const int t = (int)((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x);
    return me{t >> 5, t & 31};
}

[[noreturn]] static inline void bug(const char *op, me m, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
[[noreturn]] static inline void bug(const char *op, me m, const char *fmt, ...) {
    char what[512];
    int len = snprintf(what, sizeof what, "%s: ", op);
    va_list ap;
    va_start(ap, fmt);
    len += vsnprintf(what + len, sizeof what - (size_t)len, fmt, ap);
    va_end(ap);
    if (len < (int)sizeof what) snprintf(what + len, sizeof what - (size_t)len, " (warp %d lane %d)", m.warp, m.lane);
    dsmoe_emu_kernel_bug(what);
}

// One lane's arguments, for messages.
static inline const char *describe(const args &a, char *buf, size_t len) {
    if (a.kind2 >= 0)
        snprintf(buf, len, "%s x %s", kind_name(a.kind), kind_name(a.kind2));
    else
        snprintf(buf, len, "%p, ldm %u, %s%s", a.p, a.ldm, kind_name(a.kind),
                 a.layout == mem_row_major ? " mem_row_major" : a.layout == mem_col_major ? " mem_col_major" : "");
    return buf;
}

// The checks one lane makes of its own arguments before it publishes them.
static inline void check_pointer(const char *op, me m, const void *p, unsigned ldm, unsigned ldm_multiple,
                                 const char *type) {
    if (!p) bug(op, m, "the pointer is null");
    if ((uintptr_t)p % 32u)
        bug(op, m, "the pointer %p is not 32-byte (256-bit) aligned", p);
    if (ldm % ldm_multiple)
        bug(op, m, "ldm %u is not a multiple of %u (16 bytes of %s)", ldm, ldm_multiple, type);
}
static inline void check_layout(const char *op, me m, layout_t layout) {
    if (layout != mem_row_major && layout != mem_col_major)
        bug(op, m, "layout %d is neither mem_row_major nor mem_col_major", (int)layout);
}

// Publishes this lane's arguments and waits for the whole warp at `op`; then lane 0's must equal this
// lane's (every lane checks before it goes on, so a lane that differs is stopped before it touches memory).
// Returns the warp's scratch, which stays this operation's until finish().
static inline warp_scratch &arrive(const char *op, me m, const args &mine) {
    warp_scratch &s = scratch[m.warp];
    s.a[m.lane] = mine;
    dsmoe_emu_warp_collective(op);
    const args &o = s.a[0];
    if (o.p != mine.p || o.ldm != mine.ldm || o.layout != mine.layout || o.kind != mine.kind ||
        o.kind2 != mine.kind2) {
        char d1[128], d2[128];
        bug(op, m,
            "the lanes of the warp pass different arguments (all 32 must pass the same): lane %d: %s; lane 0: %s",
            m.lane, describe(mine, d1, sizeof d1), describe(o, d2, sizeof d2));
    }
    return s;
}
// Every lane is done with the scratch.
static inline void finish(const char *op) { dsmoe_emu_warp_collective(op); }

// The memory offset of the tile's element e (row * 16 + col).
static inline size_t offset(int e, unsigned ldm, bool row_major_) {
    const size_t r = (size_t)(e >> 4), c = (size_t)(e & 15);
    return row_major_ ? r * ldm + c : c * ldm + r;
}

static const char load_op[] = "wmma::load_matrix_sync";
static const char store_op[] = "wmma::store_matrix_sync";
static const char mma_op[] = "wmma::mma_sync";

} // namespace dsmoe_emu

template <typename Use, int m, int n, int k, typename T, typename Layout = void> class fragment {
    static_assert(m == 16 && n == 16 && k == 16, "the CUDA emulator's WMMA has the shape m16n16k16 only");
    static_assert(dsmoe_emu::kind_of<Use, T, Layout>::value != dsmoe_emu::NO_KIND,
                  "the CUDA emulator's WMMA has __nv_bfloat16 matrix_a / matrix_b fragments (row_major or "
                  "col_major) and float accumulators (no layout) only");

  public:
    typedef T element_type;
    typedef T storage_element_type;
    enum { num_elements = 8, num_storage_elements = 8 };
    T x[num_elements]; // this lane's share of the tile, in an unspecified order
};

template <typename Use, int m, int n, int k, typename T, typename Layout>
static inline void fill_fragment(fragment<Use, m, n, k, T, Layout> &f,
                                 const typename fragment<Use, m, n, k, T, Layout>::element_type &v) {
    for (int i = 0; i < fragment<Use, m, n, k, T, Layout>::num_elements; i++) f.x[i] = v;
}

template <typename Use, typename Layout>
static inline void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, Layout> &f, const __nv_bfloat16 *p,
                                    unsigned ldm) {
    using namespace dsmoe_emu;
    const int kd = kind_of<Use, __nv_bfloat16, Layout>::value;
    const me m = whoami();
    check_pointer(load_op, m, p, ldm, 8, "__nv_bfloat16");
    arrive(load_op, m, args{p, ldm, -1, kd, -1});
    finish(load_op);
    const bool rm = kd == A_ROW || kd == B_ROW;
    for (int i = 0; i < 8; i++) f.x[i] = p[offset(element(kd, m.lane, i), ldm, rm)];
}

static inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p, unsigned ldm,
                                    layout_t layout) {
    using namespace dsmoe_emu;
    const me m = whoami();
    check_pointer(load_op, m, p, ldm, 4, "float");
    check_layout(load_op, m, layout);
    arrive(load_op, m, args{p, ldm, (int)layout, ACC, -1});
    finish(load_op);
    for (int i = 0; i < 8; i++) f.x[i] = p[offset(element(ACC, m.lane, i), ldm, layout == mem_row_major)];
}

static inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f, unsigned ldm,
                                     layout_t layout) {
    using namespace dsmoe_emu;
    const me m = whoami();
    check_pointer(store_op, m, p, ldm, 4, "float");
    check_layout(store_op, m, layout);
    arrive(store_op, m, args{p, ldm, (int)layout, ACC, -1});
    finish(store_op);
    for (int i = 0; i < 8; i++) p[offset(element(ACC, m.lane, i), ldm, layout == mem_row_major)] = f.x[i];
}

template <typename LayoutA, typename LayoutB>
static inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d,
                            const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA> &a,
                            const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB> &b,
                            const fragment<accumulator, 16, 16, 16, float> &c) {
    using namespace dsmoe_emu;
    const int ka = kind_of<matrix_a, __nv_bfloat16, LayoutA>::value;
    const int kb = kind_of<matrix_b, __nv_bfloat16, LayoutB>::value;
    const me m = whoami();
    warp_scratch &s = scratch[m.warp];
    // Published before the barrier; arrive() then checks that every lane ran the same mma_sync.
    for (int i = 0; i < 8; i++) {
        s.ta[element(ka, m.lane, i)] = __bfloat162float(a.x[i]); // (row, kk)
        s.tb[element(kb, m.lane, i)] = __bfloat162float(b.x[i]); // (kk, col)
    }
    arrive(mma_op, m, args{nullptr, 0, -1, ka, kb});
    float out[8];
    for (int i = 0; i < 8; i++) {
        const int e = element(ACC, m.lane, i), r = e >> 4, col = e & 15;
        float acc = c.x[i]; // c's and d's mappings are the same: this lane holds c(r, col)
        for (int kk = 0; kk < 16; kk++) acc += s.ta[r * 16 + kk] * s.tb[kk * 16 + col];
        out[i] = acc;
    }
    finish(mma_op);
    for (int i = 0; i < 8; i++) d.x[i] = out[i];
}

} // namespace wmma
} // namespace nvcuda

#endif
