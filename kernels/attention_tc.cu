// kernels/attention_tc.cu: causal attention on tensor cores, bfloat16 (setting attention_tensor_cores).
// defines: dsmoe_cu_attention_tc_applies, dsmoe_cu_attention_tc_forward, dsmoe_cu_attention_tc_backward
//
// The same computation and the same saved state as attention.cu (the row log-sum-exps, float32 (B, NH,
// T); the backward recomputes p = exp(s - lse)), with every product of two tiles on WMMA 16x16x16
// bfloat16 fragments accumulating in float32: attention.cu's CUDA-core kernels run the 350M-class model's
// attention at a few TFLOP/s, some twenty times slower than its GEMMs.
//
// Tiling: a block of 4 warps owns 64 rows (16 a warp: queries in the forward and dq, keys in dk/dv) and
// walks the other side 64 rows at a time through bfloat16 tiles in shared memory. A warp's score tile
// S (16, 64) = own (16, D) @ other^T goes through float32 shared scratch to the softmax, done by lane
// pairs: lane l takes row l / 2, columns 32 (l % 2) .. +31, and the pair combines maxima and sums with
// one xor shuffle (both lanes get the same bits). The probabilities (and in the backward dS) go back to
// shared memory as bfloat16, the A operand of the next product. So p is rounded to bfloat16 before it
// multiplies v (the row sum l uses the float32 p), as flash attention on tensor cores does: about 2^-9
// relative per term, the order of the output's own rounding.
// Forward: the output accumulator needs a per-row rescale when the running maximum grows, which a
// fragment's private layout does not allow, so P V of each tile lands in float32 scratch and each lane
// adds it to its own row half, o = o * corr + pv, in registers. Backward: dq, dk and dv are plain sums
// over tiles and stay in accumulator fragments (mma_sync onto themselves) until the end.
// Every sum has a fixed order and every output element one writer: deterministic, as attention.cu.
//
// Applies to bfloat16 activations with D a multiple of 16 up to 128 (dsmoe_cu_attention_tc_applies);
// other shapes and float32 keep attention.cu's kernels (float32 results must stay within 1e-5 of the cpu
// plugin, which bfloat16 operands would not).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <mma.h>

#include "attention.h"
#include "cuda_common.cuh" // dsmoe_ld, dsmoe_st, DSMOE_CU_DYNAMIC_SHARED, dsmoe_cu_launch

using namespace nvcuda;

// bfloat16 WMMA needs compute capability 8.0: a build for older GPUs (CMAKE_CUDA_ARCHITECTURES) keeps the
// kernels' symbols with bodies that trap, and init refuses attention_tensor_cores on such a device.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define TC_DEVICE_OK 1
#else
#define TC_DEVICE_OK 0
#endif

#define TC_WARPS 4
#define TC_THREADS (TC_WARPS * 32)
#define TC_ROWS 16                  // rows a warp owns (one fragment tall)
#define TC_BQ (TC_WARPS * TC_ROWS)  // rows a block owns
#define TC_BK 64                    // rows of the other side per tile
#define TC_SS (TC_BK + 4)           // float scratch row stride (a multiple of 4, as WMMA wants for float)
#define TC_PS (TC_BK + 8)           // bfloat16 probability row stride (a multiple of 8)
#define TC_MAX_D 128

typedef __nv_bfloat16 bf16;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_acc;

// Row stride of a bfloat16 (rows, D) tile: D + 8 keeps every fragment's first element 32-byte aligned
// (16 rows * (D + 8) * 2 bytes is a multiple of 32) and shifts consecutive rows by 16 bytes of banks.
__host__ __device__ static inline int tc_ds(int D) { return D + 8; }
// Float row stride of a warp's (16, D) output scratch.
__host__ __device__ static inline int tc_os(int D) { return D + 4; }
__host__ __device__ static inline size_t tc_round(size_t b) { return (b + 127) & ~(size_t)127; }

// What a kernel keeps in shared memory: `tiles` bfloat16 (64, D) tiles, then per warp `fscr` float
// (16, max(TC_SS, D + 4)) scratches and `pscr` bfloat16 (16, TC_PS) ones, then `rows` floats. One
// constant per kernel, read by both the launch (tc_layout's total) and the kernel (tc_carve).
struct tc_plan {
    int tiles, fscr, pscr, rows;
};
#define TC_PLAN_FORWARD (tc_plan{3, 1, 1, 0})
#define TC_PLAN_DQ (tc_plan{4, 2, 1, 0})
#define TC_PLAN_DKV (tc_plan{4, 2, 2, 2 * TC_BK}) // rows: lse and Di of a query tile

// Byte offsets of a plan's regions for head dimension D, each 128-byte aligned.
struct tc_layout {
    size_t tile_elems;  // bfloat16 elements of one tile
    size_t fscr_floats; // floats of one float scratch
    size_t fscr_bytes, pscr_bytes; // a warp's float, bfloat16 scratches
    size_t warps_at, rows_at, total;
};
__host__ __device__ static inline tc_layout tc_layout_of(int D, tc_plan p) {
    tc_layout l;
    l.tile_elems = (size_t)TC_BQ * tc_ds(D);
    l.fscr_floats = (size_t)TC_ROWS * (TC_SS > tc_os(D) ? TC_SS : tc_os(D));
    l.fscr_bytes = tc_round((size_t)p.fscr * l.fscr_floats * sizeof(float));
    l.pscr_bytes = tc_round((size_t)p.pscr * TC_ROWS * TC_PS * sizeof(bf16));
    l.warps_at = tc_round((size_t)p.tiles * l.tile_elems * sizeof(bf16));
    l.rows_at = l.warps_at + TC_WARPS * (l.fscr_bytes + l.pscr_bytes);
    l.total = l.rows_at + tc_round((size_t)p.rows * sizeof(float));
    return l;
}

// The dynamic shared memory's element: 128-byte alignment for the carve below (WMMA wants 32).
struct alignas(128) tc_smem_unit {
    char bytes[128];
};

#if TC_DEVICE_OK
// The block's shared memory as `plan` lays it out, this warp's scratches.
struct tc_smem_map {
    bf16 *tile[4];
    float *fscr[2];
    bf16 *pscr[2];
    float *rows;
};
__device__ static inline tc_smem_map tc_carve(char *base, int D, tc_plan plan) {
    const tc_layout l = tc_layout_of(D, plan);
    tc_smem_map m;
    for (int i = 0; i < 4; i++) m.tile[i] = (bf16 *)base + (i < plan.tiles ? i : 0) * l.tile_elems;
    char *w = base + l.warps_at + (size_t)(threadIdx.x >> 5) * (l.fscr_bytes + l.pscr_bytes);
    for (int i = 0; i < 2; i++) m.fscr[i] = (float *)w + i * l.fscr_floats;
    for (int i = 0; i < 2; i++) m.pscr[i] = (bf16 *)(w + l.fscr_bytes) + i * TC_ROWS * TC_PS;
    m.rows = (float *)(base + l.rows_at);
    return m;
}

// dst (64, ds) <- rows [0, n) of src (row stride ld), columns [0, D); rows n .. 63 are zero. Whole block;
// 16-byte vectors (D is a multiple of 16, the row offsets of qkv are multiples of 8 elements).
__device__ static inline void tc_load(bf16 *dst, const bf16 *src, size_t ld, int n, int D) {
    const int ds = tc_ds(D), vecs = D / 8;
    for (int idx = threadIdx.x; idx < TC_BQ * vecs; idx += blockDim.x) {
        const int r = idx / vecs, c = (idx - r * vecs) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < n) v = *(const uint4 *)(src + (size_t)r * ld + c);
        *(uint4 *)(dst + (size_t)r * ds + c) = v;
    }
}

// scr (16, TC_SS) float = own rows (16, D) @ other^T, other = the tile's 64 rows (64, D): the scores of
// this warp's rows against a tile. One warp.
template <int NC>
__device__ static inline void tc_scores(float *scr, const bf16 *own, const bf16 *other) {
    constexpr int D = NC * 16;
    const int ds = tc_ds(D);
    frag_a a;
    frag_b_col b;
    frag_acc acc;
#pragma unroll
    for (int n = 0; n < TC_BK / 16; n++) {
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int k = 0; k < NC; k++) {
            wmma::load_matrix_sync(a, own + k * 16, ds);
            wmma::load_matrix_sync(b, other + (size_t)n * 16 * ds + k * 16, ds); // (d, row) at other[row*ds + d]
            wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(scr + n * 16, acc, TC_SS, wmma::mem_row_major);
    }
}

// acc[n] (+)= p (16, 64) bfloat16 @ x (64, D): the probabilities (or dS) against a tile's rows.
template <int NC>
__device__ static inline void tc_mul_tile(frag_acc *acc, const bf16 *p, const bf16 *x) {
    constexpr int D = NC * 16;
    const int ds = tc_ds(D);
    frag_a a;
    frag_b_row b;
#pragma unroll
    for (int k = 0; k < TC_BK / 16; k++) {
        wmma::load_matrix_sync(a, p + k * 16, TC_PS);
#pragma unroll
        for (int n = 0; n < NC; n++) {
            wmma::load_matrix_sync(b, x + (size_t)k * 16 * ds + n * 16, ds);
            wmma::mma_sync(acc[n], a, b, acc[n]);
        }
    }
}

#endif

// qkv row offsets of head h: q at h D, k at M + h D, v at 2M + h D (row stride 3M).
struct tc_args {
    int B, T, M, NH, D, tiles;
    const bf16 *qkv, *dout;
    bf16 *out, *dqkv;
    const float *lse_in, *di;
    float *lse;
    float scale;
};

#if TC_DEVICE_OK
__device__ static inline void tc_block(const tc_args &a, int reverse, int *b, int *h, int *base) {
    const int i = (int)(blockIdx.x % (unsigned)a.tiles), tile = reverse ? a.tiles - 1 - i : i;
    const int bh = (int)(blockIdx.x / (unsigned)a.tiles);
    *h = bh % a.NH, *b = bh / a.NH, *base = tile * TC_BQ;
}
#endif

// ---------------------------------------------------------------------------------------------------
// Forward

template <int NC>
__global__ void __launch_bounds__(TC_THREADS) attention_tc_forward_kernel(const tc_args a) {
#if TC_DEVICE_OK
    constexpr int D = NC * 16, HALF = D / 2;
    DSMOE_CU_DYNAMIC_SHARED(tc_smem_unit, smem_units);
    char *smem = (char *)smem_units;
    const tc_smem_map s = tc_carve(smem, D, TC_PLAN_FORWARD);
    int b, h, t_base;
    tc_block(a, 1, &b, &h, &t_base);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, ds = tc_ds(D), M3 = 3 * a.M;
    const int n_own = min(TC_BQ, a.T - t_base), nkeys = t_base + n_own; // keys 0 .. the last own row
    const bf16 *rows = a.qkv + (size_t)b * a.T * M3 + (size_t)h * D;
    bf16 *qs = s.tile[0], *ks = s.tile[1], *vs = s.tile[2];
    float *scr = s.fscr[0];
    bf16 *ps = s.pscr[0];
    tc_load(qs, rows + (size_t)t_base * M3, M3, n_own, D);

    const int r = lane >> 1, half = lane & 1, t = t_base + warp * TC_ROWS + r;
    float o[HALF], m = -INFINITY, l = 0.0f;
#pragma unroll
    for (int i = 0; i < HALF; i++) o[i] = 0.0f;
    for (int j0 = 0; j0 < nkeys; j0 += TC_BK) {
        __syncthreads(); // the previous tiles are consumed
        tc_load(ks, rows + a.M + (size_t)j0 * M3, M3, min(TC_BK, nkeys - j0), D);
        tc_load(vs, rows + 2 * a.M + (size_t)j0 * M3, M3, min(TC_BK, nkeys - j0), D);
        __syncthreads();
        tc_scores<NC>(scr, qs + (size_t)warp * TC_ROWS * ds, ks);
        __syncwarp();
        // Key j is visible to row t when j <= t. Every row sees key 0 in the first tile, so m is finite
        // from then on; rows past T compute what is never stored.
        float sv[32], mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const int j = j0 + half * 32 + c;
            sv[c] = j <= t && j < nkeys ? scr[r * TC_SS + half * 32 + c] * a.scale : -INFINITY;
            mx = fmaxf(mx, sv[c]);
        }
        const float m_new = fmaxf(m, fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1)));
        const float corr = expf(m - m_new); // 0 on the first tile (m = -inf)
        float sum = 0.0f;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const float p = sv[c] == -INFINITY ? 0.0f : expf(sv[c] - m_new);
            sum += p;
            ps[r * TC_PS + half * 32 + c] = __float2bfloat16_rn(p);
        }
        l = l * corr + (sum + __shfl_xor_sync(0xffffffffu, sum, 1));
        m = m_new;
        __syncwarp(); // the probabilities are written; the scores are read
        frag_acc pv[NC];
#pragma unroll
        for (int n = 0; n < NC; n++) wmma::fill_fragment(pv[n], 0.0f);
        tc_mul_tile<NC>(pv, ps, vs);
#pragma unroll
        for (int n = 0; n < NC; n++) wmma::store_matrix_sync(scr + n * 16, pv[n], tc_os(D), wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int i = 0; i < HALF; i++) o[i] = o[i] * corr + scr[r * tc_os(D) + half * HALF + i];
        __syncwarp(); // scr is the next tile's score scratch
    }
    if (t >= a.T) return;
    const float inv = 1.0f / l;
    bf16 *out = a.out + ((size_t)b * a.T + t) * a.M + (size_t)h * D + half * HALF;
#pragma unroll
    for (int i = 0; i < HALF; i++) out[i] = __float2bfloat16_rn(o[i] * inv);
    if (half == 0) a.lse[((size_t)b * a.NH + h) * a.T + t] = m + logf(l);
#else
    __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------
// Backward, from lse and Di = dot(dout, out) of each query row (attention.cu's di kernel):
//   p = exp(scale q.k - lse), dp = dout.v, ds = p (dp - Di);
//   dq += scale ds k (blocks own queries), dk += scale ds^T q, dv += p^T dout (blocks own keys).

#if TC_DEVICE_OK
// dqkv columns [col, col + D) of this warp's 16 rows (row0 .. +15, those below T) += scale * acc; via
// the warp's float scratch (16, D + 4).
template <int NC>
__device__ static inline void tc_add_rows(bf16 *dqkv, size_t row_stride, int row0, int T, const frag_acc *acc,
                                          float *scr, float scale) {
    constexpr int D = NC * 16, HALF = D / 2;
    const int lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
#pragma unroll
    for (int n = 0; n < NC; n++) wmma::store_matrix_sync(scr + n * 16, acc[n], tc_os(D), wmma::mem_row_major);
    __syncwarp();
    if (row0 + r < T) {
        bf16 *dst = dqkv + (size_t)(row0 + r) * row_stride + half * HALF;
        const float *src = scr + r * tc_os(D) + half * HALF;
#pragma unroll
        for (int i = 0; i < HALF; i++) dst[i] = __float2bfloat16_rn(__bfloat162float(dst[i]) + scale * src[i]);
    }
    __syncwarp();
}
#endif

// dq of the block's query rows: keys 0 .. the last own row.
template <int NC>
__global__ void __launch_bounds__(TC_THREADS) attention_tc_dq_kernel(const tc_args a) {
#if TC_DEVICE_OK
    constexpr int D = NC * 16;
    DSMOE_CU_DYNAMIC_SHARED(tc_smem_unit, smem_units);
    char *smem = (char *)smem_units;
    const tc_smem_map s = tc_carve(smem, D, TC_PLAN_DQ);
    int b, h, t_base;
    tc_block(a, 1, &b, &h, &t_base);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, ds = tc_ds(D), M3 = 3 * a.M;
    const int n_own = min(TC_BQ, a.T - t_base), nkeys = t_base + n_own;
    const bf16 *rows = a.qkv + (size_t)b * a.T * M3 + (size_t)h * D;
    const bf16 *grows = a.dout + (size_t)b * a.T * a.M + (size_t)h * D;
    bf16 *qs = s.tile[0], *gs = s.tile[1], *ks = s.tile[2], *vs = s.tile[3], *dss = s.pscr[0];
    float *sscr = s.fscr[0], *dpscr = s.fscr[1];
    tc_load(qs, rows + (size_t)t_base * M3, M3, n_own, D);
    tc_load(gs, grows + (size_t)t_base * a.M, a.M, n_own, D);
    const int r = lane >> 1, half = lane & 1, t = t_base + warp * TC_ROWS + r;
    const size_t stat = ((size_t)b * a.NH + h) * a.T + t;
    const float lse = t < a.T ? a.lse_in[stat] : 0.0f, di = t < a.T ? a.di[stat] : 0.0f;

    frag_acc dq[NC];
#pragma unroll
    for (int n = 0; n < NC; n++) wmma::fill_fragment(dq[n], 0.0f);
    for (int j0 = 0; j0 < nkeys; j0 += TC_BK) {
        __syncthreads();
        tc_load(ks, rows + a.M + (size_t)j0 * M3, M3, min(TC_BK, nkeys - j0), D);
        tc_load(vs, rows + 2 * a.M + (size_t)j0 * M3, M3, min(TC_BK, nkeys - j0), D);
        __syncthreads();
        tc_scores<NC>(sscr, qs + (size_t)warp * TC_ROWS * ds, ks);
        tc_scores<NC>(dpscr, gs + (size_t)warp * TC_ROWS * ds, vs); // dp = dout . v
        __syncwarp();
#pragma unroll 8
        for (int c = half * 32; c < half * 32 + 32; c++) {
            const int j = j0 + c;
            const float p = j <= t && j < nkeys && t < a.T ? expf(sscr[r * TC_SS + c] * a.scale - lse) : 0.0f;
            dss[r * TC_PS + c] = __float2bfloat16_rn(p * (dpscr[r * TC_SS + c] - di));
        }
        __syncwarp();
        tc_mul_tile<NC>(dq, dss, ks);
        __syncwarp();
    }
    tc_add_rows<NC>(a.dqkv + (size_t)b * a.T * M3 + (size_t)h * D, M3, t_base + warp * TC_ROWS, a.T, dq, sscr,
                    a.scale);
#else
    __trap();
#endif
}

// dk and dv of the block's key rows: queries from the first own key to T - 1.
template <int NC>
__global__ void __launch_bounds__(TC_THREADS) attention_tc_dkv_kernel(const tc_args a) {
#if TC_DEVICE_OK
    constexpr int D = NC * 16;
    DSMOE_CU_DYNAMIC_SHARED(tc_smem_unit, smem_units);
    char *smem = (char *)smem_units;
    const tc_smem_map s = tc_carve(smem, D, TC_PLAN_DKV);
    int b, h, j_base;
    tc_block(a, 0, &b, &h, &j_base); // the first key tiles see the most queries
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, ds = tc_ds(D), M3 = 3 * a.M;
    const int n_own = min(TC_BQ, a.T - j_base);
    const bf16 *rows = a.qkv + (size_t)b * a.T * M3 + (size_t)h * D;
    const bf16 *grows = a.dout + (size_t)b * a.T * a.M + (size_t)h * D;
    bf16 *ks = s.tile[0], *vs = s.tile[1], *qs = s.tile[2], *gs = s.tile[3], *pts = s.pscr[0], *dsts = s.pscr[1];
    float *sscr = s.fscr[0], *dpscr = s.fscr[1], *lse_s = s.rows, *di_s = s.rows + TC_BK;
    tc_load(ks, rows + a.M + (size_t)j_base * M3, M3, n_own, D);
    tc_load(vs, rows + 2 * a.M + (size_t)j_base * M3, M3, n_own, D);
    const int r = lane >> 1, half = lane & 1, j = j_base + warp * TC_ROWS + r;
    const float *lse = a.lse_in + ((size_t)b * a.NH + h) * a.T, *di = a.di + ((size_t)b * a.NH + h) * a.T;

    frag_acc dk[NC], dv[NC];
#pragma unroll
    for (int n = 0; n < NC; n++) wmma::fill_fragment(dk[n], 0.0f), wmma::fill_fragment(dv[n], 0.0f);
    for (int t0 = j_base; t0 < a.T; t0 += TC_BK) {
        const int tn = min(TC_BK, a.T - t0);
        __syncthreads();
        tc_load(qs, rows + (size_t)t0 * M3, M3, tn, D);
        tc_load(gs, grows + (size_t)t0 * a.M, a.M, tn, D);
        for (int c = threadIdx.x; c < TC_BK; c += blockDim.x) {
            lse_s[c] = c < tn ? lse[t0 + c] : 0.0f;
            di_s[c] = c < tn ? di[t0 + c] : 0.0f;
        }
        __syncthreads();
        tc_scores<NC>(sscr, ks + (size_t)warp * TC_ROWS * ds, qs);  // s^T: own keys against the queries
        tc_scores<NC>(dpscr, vs + (size_t)warp * TC_ROWS * ds, gs); // dp^T = v . dout
        __syncwarp();
#pragma unroll 8
        for (int c = half * 32; c < half * 32 + 32; c++) {
            const int t = t0 + c;
            const float p = t >= j && c < tn && j < a.T ? expf(sscr[r * TC_SS + c] * a.scale - lse_s[c]) : 0.0f;
            pts[r * TC_PS + c] = __float2bfloat16_rn(p);
            dsts[r * TC_PS + c] = __float2bfloat16_rn(p * (dpscr[r * TC_SS + c] - di_s[c]));
        }
        __syncwarp();
        tc_mul_tile<NC>(dv, pts, gs);
        tc_mul_tile<NC>(dk, dsts, qs);
        __syncwarp();
    }
    bf16 *kv = a.dqkv + (size_t)b * a.T * M3 + (size_t)h * D;
    tc_add_rows<NC>(kv + a.M, M3, j_base + warp * TC_ROWS, a.T, dk, sscr, a.scale);
    tc_add_rows<NC>(kv + 2 * a.M, M3, j_base + warp * TC_ROWS, a.T, dv, sscr, 1.0f);
#else
    __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------
// Host side

#define TC_NC(nc, NC, ...)                                                                                 \
    do {                                                                                                   \
        switch (nc) {                                                                                      \
        case 1: { constexpr int NC = 1; __VA_ARGS__ } break;                                               \
        case 2: { constexpr int NC = 2; __VA_ARGS__ } break;                                               \
        case 3: { constexpr int NC = 3; __VA_ARGS__ } break;                                               \
        case 4: { constexpr int NC = 4; __VA_ARGS__ } break;                                               \
        case 5: { constexpr int NC = 5; __VA_ARGS__ } break;                                               \
        case 6: { constexpr int NC = 6; __VA_ARGS__ } break;                                               \
        case 7: { constexpr int NC = 7; __VA_ARGS__ } break;                                               \
        default: { constexpr int NC = 8; __VA_ARGS__ } break;                                              \
        }                                                                                                  \
    } while (0)

extern "C" int dsmoe_cu_attention_tc_applies(const dsmoe_cu_env *env, dsmoe_dtype dt, int M, int NH) {
    const int D = M / NH;
    return env->attention_tc && dt == DSMOE_BFLOAT16 && D % 16 == 0 && D <= TC_MAX_D;
}

static tc_args tc_make(int B, int T, int M, int NH, unsigned *blocks) {
    tc_args a = {};
    a.B = B, a.T = T, a.M = M, a.NH = NH, a.D = M / NH;
    a.tiles = (T + TC_BQ - 1) / TC_BQ;
    a.scale = 1.0f / sqrtf((float)a.D);
    *blocks = (unsigned)((unsigned long long)B * NH * a.tiles); // attention.cu's check_shape bounds it
    return a;
}

extern "C" dsmoe_status dsmoe_cu_attention_tc_forward(const dsmoe_cu_env *env, void *out, float *lse, const void *qkv,
                                                      int B, int T, int M, int NH) {
    unsigned blocks;
    tc_args a = tc_make(B, T, M, NH, &blocks);
    a.qkv = (const bf16 *)qkv, a.out = (bf16 *)out, a.lse = lse;
    cudaError_t e = cudaSuccess;
    TC_NC(a.D / 16, NC, { e = dsmoe_cu_launch_smem(attention_tc_forward_kernel<NC>, blocks, TC_THREADS, tc_layout_of(a.D, TC_PLAN_FORWARD).total, env->stream, a); });
    if (e != cudaSuccess) return dsmoe_cu_check(env, e, "attention_forward");
    return dsmoe_cu_check_launch(env, "attention_forward");
}

extern "C" dsmoe_status dsmoe_cu_attention_tc_backward(const dsmoe_cu_env *env, void *dqkv, const float *di,
                                                       const void *dout, const void *qkv, const float *lse, int B,
                                                       int T, int M, int NH) {
    unsigned blocks;
    tc_args a = tc_make(B, T, M, NH, &blocks);
    a.qkv = (const bf16 *)qkv, a.dout = (const bf16 *)dout, a.dqkv = (bf16 *)dqkv, a.lse_in = lse, a.di = di;
    cudaError_t e = cudaSuccess;
    // dq and dk/dv write disjoint columns of dqkv; both read di (enqueued before them).
    TC_NC(a.D / 16, NC, {
        e = dsmoe_cu_launch_smem(attention_tc_dq_kernel<NC>, blocks, TC_THREADS, tc_layout_of(a.D, TC_PLAN_DQ).total, env->stream, a);
        if (e == cudaSuccess)
            e = dsmoe_cu_launch_smem(attention_tc_dkv_kernel<NC>, blocks, TC_THREADS, tc_layout_of(a.D, TC_PLAN_DKV).total, env->stream, a);
    });
    if (e != cudaSuccess) return dsmoe_cu_check(env, e, "attention_backward");
    return dsmoe_cu_check_launch(env, "attention_backward");
}
