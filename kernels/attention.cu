// kernels/attention.cu: causal multi-head self-attention of the cuda plugin (kernels/attention.h).
// defines: dsmoe_cu_attention_bytes, dsmoe_cu_attention_forward, dsmoe_cu_attention_backward,
//          dsmoe_cu_attention_rows (attention_tc.cu: the tensor-core kernels they hand bfloat16 to)
//
// The reference is plugins/cpu/cpu_ops.c (cpu_attention_*): qkv (B*T, 3M) holds per token [q | k | v],
// head h uses columns [h*D, (h+1)*D) of each part, scale = 1/sqrt(D), query t sees keys 0 .. t. The cpu
// plugin keeps the (T, T) probabilities; this one keeps the row log-sum-exps (B, NH, T) and recomputes
// the probabilities in the backward, p = exp(s - lse), so its state is O(B NH T).
//
// Tiling: a block of 4 warps owns ATT_BQ = 16 rows (4 a warp: queries in the forward and dq, keys in
// dk/dv) held in shared memory, and walks the other side 32 rows at a time through shared tiles loaded
// by the whole block (float32, zero-padded to Dp = D rounded up to 4). Lane j scores row j of the tile
// against the warp's 4 rows (float4 dot products in column order), the 4 per-lane values go through a
// shared float4 slot, and each lane accumulates its own columns d = lane + 32 i of the 4 rows over the
// tile's rows in order. Softmax reductions across lanes are xor-shuffle butterflies (every lane gets the
// same bits). So every sum has a fixed order and every output element has exactly one writer: bitwise
// reproducible, no atomics. CUDA cores in float32 (no tensor cores: float32 results must match the cpu
// plugin to ~1e-5); H200, B=8 T=1024 M=768 NH=12: forward 2.9 ms, backward 6.2 ms (fp32 and bf16).
//
// Backward (dqkv +=), from the saved lse and Di = dot(dout, out) of each query row:
//   p = exp(scale q.k - lse), dp = dout.v, ds = p (dp - Di);
//   dq[t] += scale sum_{j<=t} ds k[j]  (blocks own query rows, walk keys 0 .. t)
//   dk[j] += scale sum_{t>=j} ds q[t], dv[j] += sum_{t>=j} p dout[t]  (blocks own key rows, walk queries j .. T-1)
// Di uses the stored `out` (bfloat16 when dt is): with bf16 this alone moves dq/dk by ~1e-2 of their rms.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "attention.h"
#include "cuda_common.cuh" // dsmoe_ld, dsmoe_st, dsmoe_cu_raise, DSMOE_CU_DISPATCH, dsmoe_cu_check_dtype

#define ATT_WARPS 4                      // warps per block
#define ATT_R 4                          // rows per warp (the float4 of a probability slot)
#define ATT_BQ (ATT_WARPS * ATT_R)       // rows a block owns
#define ATT_BK 32                        // rows of the other side per shared tile: one per lane
#define ATT_THREADS (ATT_WARPS * 32)
// Blocks per multiprocessor the register budget aims at (NI = 8 spills when asked for more than 2).
#define ATT_MIN_BLOCKS(NI) ((NI) <= 2 ? 4 : (NI) == 4 ? 3 : 2)

// ---------------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Rows [0, rows) of a shared tile (row stride `stride` floats) from src (row stride ld elements): row r
// < n holds src row r in columns [0, D), everything else of columns [0, Dp) is 0 (so that the float4
// dot products below may run over Dp = D rounded up to 4). Called by the whole block. A thread issues U
// loads before it stores any: each store waits for its load, so with U = 1 a tile of 32 rows of 128
// costs a thread 32 trips to memory in series. Where blocks are few (decode: B NH blocks, or B NH
// splits) nothing hides that latency, and an H200 spent about 35 us a tile so (cached attention of 160
// positions at batch 1: 180 us a layer); U = 8 makes it 4 trips.
template <int U = 1, typename T>
__device__ __forceinline__ void load_tile(float *dst, int stride, int rows, const T *src, size_t ld, int n, int D,
                                          int Dp) {
    const int total = rows * Dp;
    for (int base = threadIdx.x; base < total; base += U * blockDim.x) {
        float x[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int idx = base + u * (int)blockDim.x, r = idx / Dp, d = idx - r * Dp;
            x[u] = idx < total && r < n && d < D ? dsmoe_ld(src + (size_t)r * ld, d) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int idx = base + u * (int)blockDim.x, r = idx / Dp, d = idx - r * Dp;
            if (idx < total) dst[r * stride + d] = x[u];
        }
    }
}

// s[r] = dot(own row r (shared, stride Dp), x (shared)) over Dp columns, in column order, r < ATT_R.
__device__ __forceinline__ void dots(float *s, const float *own, int Dp, const float *x) {
    const float4 *x4 = (const float4 *)x;
#pragma unroll
    for (int r = 0; r < ATT_R; r++) s[r] = 0.0f;
    for (int c = 0; c < Dp / 4; c++) {
        const float4 xv = x4[c];
#pragma unroll
        for (int r = 0; r < ATT_R; r++) {
            const float4 av = ((const float4 *)(own + r * Dp))[c];
            s[r] = fmaf(av.x, xv.x, s[r]);
            s[r] = fmaf(av.y, xv.y, s[r]);
            s[r] = fmaf(av.z, xv.z, s[r]);
            s[r] = fmaf(av.w, xv.w, s[r]);
        }
    }
}

// Block index -> (b, h, row tile). Tiles are visited heaviest first (`reverse` where the last rows do
// the most work), which shortens the tail of the grid.
struct att_tile {
    int b, h, tile;
};
__device__ __forceinline__ att_tile block_tile(int NH, int tiles, int reverse, long long blk = blockIdx.x) {
    att_tile r;
    int i = (int)(blk % tiles);
    r.tile = reverse ? tiles - 1 - i : i;
    long long bh = blk / tiles;
    r.h = (int)(bh % NH);
    r.b = (int)(bh / NH);
    return r;
}

// Shared memory of the kernels, in floats: own rows (ATT_BQ, Dp) once or twice, two tiles (ATT_BK, Xs),
// probability slots (ATT_WARPS, ATT_BK, ATT_R) once or twice. Xs = Dp + 4 or + 8, so that Xs / 4 is odd
// and the float4 reads of lane j at row j hit distinct banks.
static inline int padded_d(int D) { return (D + 3) & ~3; }
static inline int tile_stride(int Dp) { return (Dp / 4) % 2 == 0 ? Dp + 4 : Dp + 8; }
static inline size_t att_smem_bytes(int Dp, int own_sets, int slot_sets) {
    return sizeof(float) * ((size_t)own_sets * ATT_BQ * Dp + 2 * (size_t)ATT_BK * tile_stride(Dp) +
                            (size_t)slot_sets * ATT_WARPS * ATT_BK * ATT_R);
}

// ---------------------------------------------------------------------------------------------------
// Forward (also attention_cached's pass, through dsmoe_cu_attention_rows): online softmax over the keys
// of each query row. NI = output column slots per lane (D <= 32 NI).
//
// Split keys (splits > 1; cached attention of one query tile, see dsmoe_cu_attention_rows): block
// (tile, split) walks only keys [split * split_keys, + split_keys) and writes each row's unnormalised
// output, running max and sum to `part`, (B, NH, T_q, splits, D + 2) floats; attention_merge_kernel
// joins the splits in split order. A decode step then runs B NH splits blocks instead of B NH, each
// over split_keys keys instead of all of them. Row t has keys in split s iff s split_keys <= first + t:
// the kernel leaves the others' records unwritten and the merge does not read them.

struct rows_args {
    int B, NH, T_q, D, Dp, Xs, tiles, T_max;
    int splits, split_keys; // splits = 1: no split, part unused
    float *part;
    const void *q, *k, *v;
    size_t q_ld, kv_sb, kv_sh, kv_ld, out_ld;
    const int32_t *pos;
    void *out;
    float *lse;
    float scale;
    dsmoe_cu_fault *fault;
};

template <typename T, int NI>
__global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS(NI)) attention_rows_kernel(const rows_args a) {
    DSMOE_CU_DYNAMIC_SHARED(float4, smem4);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, D = a.D, Dp = a.Dp, Xs = a.Xs;
    float *qs = (float *)smem4, *ks = qs + ATT_BQ * Dp, *vs = ks + ATT_BK * Xs, *ps = vs + ATT_BK * Xs;
    const att_tile bt = block_tile(a.NH, a.tiles, 1, (long long)blockIdx.x / a.splits);
    const int split = (int)(blockIdx.x % a.splits);
    const int b = bt.b, h = bt.h, t_base = bt.tile * ATT_BQ;
    int first = 0;
    if (a.pos) { // block-uniform: the whole block leaves
        int p = a.pos[b];
        if (p < 0 || p > a.T_max - a.T_q) {
            if (threadIdx.x == 0 && h == 0 && bt.tile == 0 && split == 0)
                dsmoe_cu_raise(a.fault, DSMOE_CU_FAULT_KV_RANGE, b, (long long)p + a.T_q);
            return;
        }
        first = p;
    }
    const int n_own = min(ATT_BQ, a.T_q - t_base), nkeys = first + t_base + n_own; // keys 0 .. first + last row
    const int j_lo = split * a.split_keys, j_hi = a.splits > 1 ? min(nkeys, j_lo + a.split_keys) : nkeys;
    if (j_lo >= j_hi) return; // block-uniform: a split past the sequence's keys
    const T *k = (const T *)a.k + (size_t)b * a.kv_sb + (size_t)h * a.kv_sh; // (keys, kv_ld)
    const T *v = (const T *)a.v + (size_t)b * a.kv_sb + (size_t)h * a.kv_sh;
    load_tile<8>(qs, Dp, ATT_BQ, (const T *)a.q + ((size_t)b * a.T_q + t_base) * a.q_ld + (size_t)h * D, a.q_ld, n_own,
                 D, Dp);
    const float *own = qs + warp * ATT_R * Dp;
    float4 *slot = (float4 *)ps + warp * ATT_BK;

    float o[ATT_R][NI], m[ATT_R], l[ATT_R]; // running max and sum of exp(s - m) per row
#pragma unroll
    for (int r = 0; r < ATT_R; r++) {
        m[r] = -INFINITY, l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < NI; i++) o[r][i] = 0.0f;
    }
    for (int j0 = j_lo; j0 < j_hi; j0 += ATT_BK) {
        const int jn = min(ATT_BK, j_hi - j0), j = j0 + lane;
        __syncthreads(); // the previous tiles are consumed
        load_tile<8>(ks, Xs, ATT_BK, k + (size_t)j0 * a.kv_ld, a.kv_ld, jn, D, Dp);
        load_tile<8>(vs, Xs, ATT_BK, v + (size_t)j0 * a.kv_ld, a.kv_ld, jn, D, Dp);
        __syncthreads();
        float s[ATT_R], p[ATT_R];
        dots(s, own, Dp, ks + lane * Xs);
#pragma unroll
        for (int r = 0; r < ATT_R; r++) {
            // Key j is visible to row t when j <= first + t. Without splits every real row sees key 0 in
            // the first tile, so m is finite from then on; with them a row may see no key of a split (m
            // stays -inf, the record is not merged). Rows past T_q compute garbage that is never stored.
            const int t = t_base + warp * ATT_R + r;
            const float sr = j <= first + t && j < j_hi ? s[r] * a.scale : -INFINITY;
            const float m_new = fmaxf(m[r], warp_max(sr));
            const float corr = m_new == -INFINITY ? 1.0f : expf(m[r] - m_new); // 0 while m = -inf
            p[r] = sr == -INFINITY ? 0.0f : expf(sr - m_new);
            l[r] = l[r] * corr + warp_sum(p[r]);
#pragma unroll
            for (int i = 0; i < NI; i++) o[r][i] *= corr;
            m[r] = m_new;
        }
        slot[lane] = make_float4(p[0], p[1], p[2], p[3]);
        __syncwarp();
        for (int jj = 0; jj < jn; jj++) {
            const float4 pj = slot[jj];
            const float *vr = vs + jj * Xs;
#pragma unroll
            for (int i = 0; i < NI; i++) {
                const int d = lane + 32 * i;
                if (d < D) {
                    const float x = vr[d];
                    o[0][i] += pj.x * x;
                    o[1][i] += pj.y * x;
                    o[2][i] += pj.z * x;
                    o[3][i] += pj.w * x;
                }
            }
        }
        __syncwarp(); // slot is rewritten by the next tile
    }
#pragma unroll
    for (int r = 0; r < ATT_R; r++) {
        const int t = t_base + warp * ATT_R + r;
        if (t >= a.T_q) continue;
        if (a.splits > 1) { // the split's record: o unnormalised, m, l
            if (j_lo > first + t) continue;
            float *rec = a.part + ((((size_t)b * a.NH + h) * a.T_q + t) * a.splits + split) * (size_t)(D + 2);
#pragma unroll
            for (int i = 0; i < NI; i++) {
                const int d = lane + 32 * i;
                if (d < D) rec[d] = o[r][i];
            }
            if (lane == 0) rec[D] = m[r], rec[D + 1] = l[r];
            continue;
        }
        const float inv = 1.0f / l[r];
        T *out = (T *)a.out + ((size_t)b * a.T_q + t) * a.out_ld + (size_t)h * D;
#pragma unroll
        for (int i = 0; i < NI; i++) {
            const int d = lane + 32 * i;
            if (d < D) dsmoe_st(out, d, o[r][i] * inv);
        }
        if (a.lse && lane == 0) a.lse[((size_t)b * a.NH + h) * a.T_q + t] = m[r] + logf(l[r]);
    }
}

// The splits' records of one row (b, h, t) a warp (grid-stride), in split order: m = max m_s, l = sum l_s
// exp(m_s - m), out = sum o_s exp(m_s - m) / l over the splits that hold keys of the row (s split_keys <=
// first + t, each with a finite m_s). A sequence whose pos is out of range was skipped (and reported)
// by the pass; it is skipped here too.
template <typename T>
__global__ void __launch_bounds__(ATT_THREADS) attention_merge_kernel(const rows_args a) {
    const int lane = threadIdx.x & 31, D = a.D;
    const size_t rows = (size_t)a.B * a.NH * a.T_q;
    for (size_t w = (size_t)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5); w < rows; w += (size_t)gridDim.x * ATT_WARPS) {
        const int t = (int)(w % a.T_q), h = (int)(w / a.T_q % a.NH), b = (int)(w / a.T_q / a.NH);
        const int first = a.pos[b];
        if (first < 0 || first > a.T_max - a.T_q) continue;
        const int live = min(a.splits, (first + t) / a.split_keys + 1);
        const float *rec = a.part + w * a.splits * (size_t)(D + 2);
        float m = -INFINITY, l = 0.0f;
        for (int s = 0; s < live; s++) m = fmaxf(m, rec[(size_t)s * (D + 2) + D]);
        for (int s = 0; s < live; s++) {
            const float *r = rec + (size_t)s * (D + 2);
            l += r[D + 1] * expf(r[D] - m);
        }
        const float inv = 1.0f / l;
        T *out = (T *)a.out + ((size_t)b * a.T_q + t) * a.out_ld + (size_t)h * D;
        for (int d = lane; d < D; d += 32) {
            float acc = 0.0f;
            for (int s = 0; s < live; s++) {
                const float *r = rec + (size_t)s * (D + 2);
                acc += r[d] * expf(r[D] - m);
            }
            dsmoe_st(out, d, acc * inv);
        }
        if (a.lse && lane == 0) a.lse[((size_t)b * a.NH + h) * a.T_q + t] = m + logf(l);
    }
}

// ---------------------------------------------------------------------------------------------------
// Backward kernels. qkv, dqkv (B*T, 3M); dout, out (B*T, M); lse, di (B, NH, T).

struct bwd_args {
    int B, T, M, NH, D, Dp, Xs, tiles;
    const void *qkv, *dout, *out;
    void *dqkv;
    const float *lse;
    float *di;
    float scale;
};

// di[b, h, t] = dot(dout[t, head h], out[t, head h]): one warp per (row, head).
template <typename T>
__global__ void __launch_bounds__(ATT_THREADS, 1) attention_di_kernel(const bwd_args a) {
    const int lane = threadIdx.x & 31;
    const size_t n = (size_t)a.B * a.T * a.NH;
    for (size_t w = (size_t)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5); w < n; w += (size_t)gridDim.x * ATT_WARPS) {
        const int h = (int)(w % a.NH);
        const size_t row = w / a.NH; // b*T + t
        const T *g = (const T *)a.dout + row * a.M + (size_t)h * a.D, *o = (const T *)a.out + row * a.M + (size_t)h * a.D;
        float s = 0.0f;
        for (int d = lane; d < a.D; d += 32) s += dsmoe_ld(g, d) * dsmoe_ld(o, d);
        s = warp_sum(s);
        const size_t b = row / a.T, t = row % a.T;
        if (lane == 0) a.di[(b * a.NH + h) * a.T + t] = s;
    }
}

// dq of the block's query rows: keys 0 .. last row, a tile of keys and values at a time.
template <typename T, int NI>
__global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS(NI)) attention_dq_kernel(const bwd_args a) {
    DSMOE_CU_DYNAMIC_SHARED(float4, smem4);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, D = a.D, Dp = a.Dp, Xs = a.Xs, T_ = a.T;
    float *qs = (float *)smem4, *gs = qs + ATT_BQ * Dp, *ks = gs + ATT_BQ * Dp, *vs = ks + ATT_BK * Xs,
          *ps = vs + ATT_BK * Xs;
    const att_tile bt = block_tile(a.NH, a.tiles, 1);
    const int b = bt.b, h = bt.h, t_base = bt.tile * ATT_BQ, n_own = min(ATT_BQ, T_ - t_base), nkeys = t_base + n_own;
    const size_t ld = 3 * (size_t)a.M;
    const T *base = (const T *)a.qkv + (size_t)b * T_ * ld + (size_t)h * D; // q of (b, h, token 0)
    const T *k = base + a.M, *v = base + 2 * (size_t)a.M;                     // (T, ld)
    load_tile(qs, Dp, ATT_BQ, base + (size_t)t_base * ld, ld, n_own, D, Dp);
    load_tile(gs, Dp, ATT_BQ, (const T *)a.dout + ((size_t)b * T_ + t_base) * a.M + (size_t)h * D, (size_t)a.M, n_own, D, Dp);
    const float *own_q = qs + warp * ATT_R * Dp, *own_g = gs + warp * ATT_R * Dp;
    float4 *slot = (float4 *)ps + warp * ATT_BK;
    float lse[ATT_R], di[ATT_R], dq[ATT_R][NI];
#pragma unroll
    for (int r = 0; r < ATT_R; r++) {
        const int t = t_base + warp * ATT_R + r;
        const size_t stat = ((size_t)b * a.NH + h) * T_ + t;
        lse[r] = t < T_ ? a.lse[stat] : 0.0f;
        di[r] = t < T_ ? a.di[stat] : 0.0f;
#pragma unroll
        for (int i = 0; i < NI; i++) dq[r][i] = 0.0f;
    }
    for (int j0 = 0; j0 < nkeys; j0 += ATT_BK) {
        const int jn = min(ATT_BK, nkeys - j0), j = j0 + lane;
        __syncthreads();
        load_tile(ks, Xs, ATT_BK, k + (size_t)j0 * ld, ld, jn, D, Dp);
        load_tile(vs, Xs, ATT_BK, v + (size_t)j0 * ld, ld, jn, D, Dp);
        __syncthreads();
        float s[ATT_R], dp[ATT_R], ds[ATT_R];
        dots(s, own_q, Dp, ks + lane * Xs);
        dots(dp, own_g, Dp, vs + lane * Xs);
#pragma unroll
        for (int r = 0; r < ATT_R; r++) {
            const int t = t_base + warp * ATT_R + r;
            ds[r] = j <= t && t < T_ ? expf(s[r] * a.scale - lse[r]) * (dp[r] - di[r]) : 0.0f;
        }
        slot[lane] = make_float4(ds[0], ds[1], ds[2], ds[3]);
        __syncwarp();
        for (int jj = 0; jj < jn; jj++) {
            const float4 dsj = slot[jj];
            const float *kr = ks + jj * Xs;
#pragma unroll
            for (int i = 0; i < NI; i++) {
                const int d = lane + 32 * i;
                if (d < D) {
                    const float x = kr[d];
                    dq[0][i] += dsj.x * x;
                    dq[1][i] += dsj.y * x;
                    dq[2][i] += dsj.z * x;
                    dq[3][i] += dsj.w * x;
                }
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < ATT_R; r++) {
        const int t = t_base + warp * ATT_R + r;
        if (t >= T_) continue;
        T *dqr = (T *)a.dqkv + ((size_t)b * T_ + t) * ld + (size_t)h * D;
#pragma unroll
        for (int i = 0; i < NI; i++) {
            const int d = lane + 32 * i;
            if (d < D) dsmoe_st(dqr, d, dsmoe_ld(dqr, d) + a.scale * dq[r][i]);
        }
    }
}

// dk and dv of the block's key rows: queries first key .. T-1, a tile of queries and dout at a time.
template <typename T, int NI>
__global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS(NI)) attention_dkv_kernel(const bwd_args a) {
    DSMOE_CU_DYNAMIC_SHARED(float4, smem4);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, D = a.D, Dp = a.Dp, Xs = a.Xs, T_ = a.T;
    float *kt = (float *)smem4, *vt = kt + ATT_BQ * Dp, *qs = vt + ATT_BQ * Dp, *gs = qs + ATT_BK * Xs,
          *ps = gs + ATT_BK * Xs, *dss = ps + ATT_WARPS * ATT_BK * ATT_R;
    const att_tile bt = block_tile(a.NH, a.tiles, 0);
    const int b = bt.b, h = bt.h, j_base = bt.tile * ATT_BQ, n_own = min(ATT_BQ, T_ - j_base);
    const size_t ld = 3 * (size_t)a.M;
    const T *q = (const T *)a.qkv + (size_t)b * T_ * ld + (size_t)h * D;   // (T, ld)
    const T *g = (const T *)a.dout + (size_t)b * T_ * a.M + (size_t)h * D; // (T, M)
    load_tile(kt, Dp, ATT_BQ, q + (size_t)j_base * ld + a.M, ld, n_own, D, Dp);
    load_tile(vt, Dp, ATT_BQ, q + (size_t)j_base * ld + 2 * (size_t)a.M, ld, n_own, D, Dp);
    const float *lse = a.lse + ((size_t)b * a.NH + h) * T_, *di = a.di + ((size_t)b * a.NH + h) * T_;
    const float *own_k = kt + warp * ATT_R * Dp, *own_v = vt + warp * ATT_R * Dp;
    float4 *pslot = (float4 *)ps + warp * ATT_BK, *dslot = (float4 *)dss + warp * ATT_BK;
    float dk[ATT_R][NI], dv[ATT_R][NI];
#pragma unroll
    for (int r = 0; r < ATT_R; r++)
#pragma unroll
        for (int i = 0; i < NI; i++) dk[r][i] = dv[r][i] = 0.0f;
    for (int t0 = j_base; t0 < T_; t0 += ATT_BK) {
        const int tn = min(ATT_BK, T_ - t0), t = t0 + lane;
        __syncthreads();
        load_tile(qs, Xs, ATT_BK, q + (size_t)t0 * ld, ld, tn, D, Dp);
        load_tile(gs, Xs, ATT_BK, g + (size_t)t0 * a.M, (size_t)a.M, tn, D, Dp);
        __syncthreads();
        const float lse_t = t < T_ ? lse[t] : 0.0f, di_t = t < T_ ? di[t] : 0.0f;
        float s[ATT_R], dp[ATT_R], p[ATT_R], ds[ATT_R];
        dots(s, own_k, Dp, qs + lane * Xs);
        dots(dp, own_v, Dp, gs + lane * Xs);
#pragma unroll
        for (int r = 0; r < ATT_R; r++) {
            const int j = j_base + warp * ATT_R + r;
            const bool vis = t < T_ && t >= j && j < T_;
            p[r] = vis ? expf(s[r] * a.scale - lse_t) : 0.0f;
            ds[r] = vis ? p[r] * (dp[r] - di_t) : 0.0f;
        }
        pslot[lane] = make_float4(p[0], p[1], p[2], p[3]);
        dslot[lane] = make_float4(ds[0], ds[1], ds[2], ds[3]);
        __syncwarp();
        for (int tt = 0; tt < tn; tt++) {
            const float4 pt = pslot[tt], dst = dslot[tt];
            const float *qr = qs + tt * Xs, *gr = gs + tt * Xs;
#pragma unroll
            for (int i = 0; i < NI; i++) {
                const int d = lane + 32 * i;
                if (d < D) {
                    const float gx = gr[d], qx = qr[d];
                    dv[0][i] += pt.x * gx;
                    dv[1][i] += pt.y * gx;
                    dv[2][i] += pt.z * gx;
                    dv[3][i] += pt.w * gx;
                    dk[0][i] += dst.x * qx;
                    dk[1][i] += dst.y * qx;
                    dk[2][i] += dst.z * qx;
                    dk[3][i] += dst.w * qx;
                }
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < ATT_R; r++) {
        const int j = j_base + warp * ATT_R + r;
        if (j >= T_) continue;
        T *dkr = (T *)a.dqkv + ((size_t)b * T_ + j) * ld + (size_t)h * D + a.M, *dvr = dkr + a.M;
#pragma unroll
        for (int i = 0; i < NI; i++) {
            const int d = lane + 32 * i;
            if (d < D) {
                dsmoe_st(dkr, d, dsmoe_ld(dkr, d) + a.scale * dk[r][i]);
                dsmoe_st(dvr, d, dsmoe_ld(dvr, d) + dv[r][i]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Host side

// Column slots per lane for head dimension D: 1, 2, 4 or 8 (D <= 256); 0 when D is too large.
static int slots_for(int D) { return D <= 32 ? 1 : D <= 64 ? 2 : D <= 128 ? 4 : D <= 256 ? 8 : 0; }

#define ATT_SLOTS(ni, NI, ...)                                                                             \
    do {                                                                                                   \
        if ((ni) == 1) { constexpr int NI = 1; __VA_ARGS__ }                                              \
        else if ((ni) == 2) { constexpr int NI = 2; __VA_ARGS__ }                                         \
        else if ((ni) == 4) { constexpr int NI = 4; __VA_ARGS__ }                                         \
        else { constexpr int NI = 8; __VA_ARGS__ }                                                        \
    } while (0)

// Blocks of a (B, NH, row tiles) grid; 0 when it does not fit the grid's x dimension.
static unsigned tile_blocks(int B, int NH, int rows, int *tiles) {
    *tiles = (rows + ATT_BQ - 1) / ATT_BQ;
    unsigned long long n = (unsigned long long)B * (unsigned long long)NH * (unsigned long long)*tiles;
    return n > 0x7fffffffull ? 0u : (unsigned)n;
}

// The shape checks of cpu_ops.c's check_attention, plus this plugin's D bound.
static dsmoe_status check_shape(const dsmoe_cu_env *env, const char *op, const dsmoe_attention_shape *sh) {
    if (!sh) return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL shape", op);
    dsmoe_status st = dsmoe_cu_check_dtype(env, sh->dt, op);
    if (st != DSMOE_OK) return st;
    if (sh->B < 0 || sh->T < 0 || sh->M <= 0 || sh->NH <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: B=%d T=%d M=%d NH=%d: expected B, T >= 0 and M, NH > 0", op,
                             sh->B, sh->T, sh->M, sh->NH);
    if (sh->M % sh->NH)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: M=%d is not a multiple of NH=%d", op, sh->M, sh->NH);
    if (sh->M / sh->NH > DSMOE_CU_ATTENTION_MAX_D)
        return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: head dimension D=M/NH=%d: this plugin supports D <= %d",
                             op, sh->M / sh->NH, DSMOE_CU_ATTENTION_MAX_D);
    int tiles;
    if (sh->B > 0 && sh->T > 0 && !tile_blocks(sh->B, sh->NH, sh->T, &tiles))
        return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: B=%d NH=%d T=%d: too many rows for one grid", op, sh->B,
                             sh->NH, sh->T);
    return DSMOE_OK;
}

extern "C" dsmoe_status dsmoe_cu_attention_bytes(const dsmoe_attention_shape *shape, size_t *saved,
                                                 size_t *workspace) {
    if (!shape || !saved || !workspace) return DSMOE_ERR_INVALID;
    if (shape->dt != DSMOE_FLOAT32 && shape->dt != DSMOE_BFLOAT16) return DSMOE_ERR_UNSUPPORTED;
    if (shape->B < 0 || shape->T < 0 || shape->M <= 0 || shape->NH <= 0 || shape->M % shape->NH)
        return DSMOE_ERR_INVALID;
    if (shape->M / shape->NH > DSMOE_CU_ATTENTION_MAX_D) return DSMOE_ERR_UNSUPPORTED;
    size_t rows = (size_t)shape->B * (size_t)shape->NH * (size_t)shape->T; // lse / Di: one float a row
    *saved = rows * sizeof(float);
    *workspace = rows * sizeof(float);
    return DSMOE_OK;
}

extern "C" dsmoe_status dsmoe_cu_attention_rows(const dsmoe_cu_env *env, const dsmoe_cu_attention_rows_desc *d,
                                                const char *op) {
    dsmoe_status st = dsmoe_cu_check_dtype(env, d->dt, op);
    if (st != DSMOE_OK) return st;
    const int ni = slots_for(d->D);
    if (d->D <= 0 || !ni)
        return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: head dimension D=%d: this plugin supports 1 <= D <= %d", op,
                             d->D, DSMOE_CU_ATTENTION_MAX_D);
    if (d->B == 0 || d->T_q == 0) return DSMOE_OK;
    rows_args a;
    unsigned blocks = tile_blocks(d->B, d->NH, d->T_q, &a.tiles);
    if (!blocks)
        return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: B=%d NH=%d T=%d: too many rows for one grid", op, d->B,
                             d->NH, d->T_q);
    a.B = d->B, a.NH = d->NH, a.T_q = d->T_q, a.D = d->D, a.T_max = d->T_max;
    a.Dp = padded_d(d->D), a.Xs = tile_stride(a.Dp);
    a.q = d->q, a.k = d->k, a.v = d->v;
    a.q_ld = d->q_ld, a.kv_sb = d->kv_sb, a.kv_sh = d->kv_sh, a.kv_ld = d->kv_ld, a.out_ld = d->out_ld;
    a.pos = d->pos, a.out = d->out, a.lse = d->lse, a.fault = env->fault;
    a.scale = 1.0f / sqrtf((float)d->D);
    // Splits: cached attention of one query tile (decode) whose cache may hold more than split_keys keys.
    // Their number follows from T_max and the setting alone, never from the device, so the results do too.
    a.splits = 1, a.split_keys = 0, a.part = NULL;
    const int sk = env->decode_split_keys;
    if (d->pos && sk > 0 && d->T_q <= ATT_BQ && d->T_max > sk) {
        const long long n = (long long)blocks * ((d->T_max + sk - 1) / sk);
        if (n <= 0x7fffffffll) a.splits = (d->T_max + sk - 1) / sk, a.split_keys = sk, blocks = (unsigned)n;
    }
    if (a.splits > 1) {
        const size_t recs = (size_t)d->B * d->NH * d->T_q * a.splits * (size_t)(d->D + 2);
        st = dsmoe_cu_scratch(env, (void **)&a.part, recs * sizeof(float), op);
        if (st != DSMOE_OK) return st;
    }
    const size_t smem = att_smem_bytes(a.Dp, 1, 1);
    const unsigned merge_blocks = dsmoe_cu_blocks(((size_t)d->B * d->NH * d->T_q + ATT_WARPS - 1) / ATT_WARPS, 1);
    cudaError_t e = cudaSuccess;
    DSMOE_CU_DISPATCH(d->dt, T, {
        ATT_SLOTS(ni, NI, {
            e = dsmoe_cu_launch_smem(attention_rows_kernel<T, NI>, blocks, ATT_THREADS, smem, env->stream, a);
        });
        if (e == cudaSuccess && a.splits > 1)
            dsmoe_cu_launch(attention_merge_kernel<T>, merge_blocks, ATT_THREADS, 0, env->stream, a);
    });
    if (e == cudaSuccess) st = dsmoe_cu_check_launch(env, op);
    else st = dsmoe_cu_check(env, e, op);
    if (a.part) {
        dsmoe_status fst = dsmoe_cu_check(env, cudaFreeAsync(a.part, env->stream), "attention: cudaFreeAsync");
        if (st == DSMOE_OK) st = fst;
    }
    return st;
}

extern "C" dsmoe_status dsmoe_cu_attention_forward(const dsmoe_cu_env *env, void *out, void *saved, const void *qkv,
                                                   const dsmoe_attention_shape *shape) {
    static const char op[] = "attention_forward";
    dsmoe_status st = check_shape(env, op, shape);
    if (st != DSMOE_OK) return st;
    const int B = shape->B, T = shape->T, M = shape->M, NH = shape->NH;
    if (B == 0 || T == 0) return DSMOE_OK;
    if (!out || !saved || !qkv) return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL out, saved or qkv", op);
    if (dsmoe_cu_attention_tc_applies(env, shape->dt, M, NH))
        return dsmoe_cu_attention_tc_forward(env, out, (float *)saved, qkv, B, T, M, NH);
    const size_t es = dsmoe_dtype_size(shape->dt);
    dsmoe_cu_attention_rows_desc d;
    d.B = B, d.NH = NH, d.T_q = T, d.D = M / NH, d.dt = shape->dt;
    d.q = qkv, d.q_ld = 3 * (size_t)M;
    d.k = (const char *)qkv + (size_t)M * es, d.v = (const char *)qkv + 2 * (size_t)M * es;
    d.kv_sb = (size_t)T * 3 * M, d.kv_sh = (size_t)(M / NH), d.kv_ld = 3 * (size_t)M;
    d.pos = NULL, d.T_max = T;
    d.out = out, d.out_ld = (size_t)M;
    d.lse = (float *)saved;
    return dsmoe_cu_attention_rows(env, &d, op);
}

extern "C" dsmoe_status dsmoe_cu_attention_backward(const dsmoe_cu_env *env, void *dqkv, void *workspace,
                                                    const void *dout, const void *qkv, const void *out,
                                                    const void *saved, const dsmoe_attention_shape *shape) {
    static const char op[] = "attention_backward";
    dsmoe_status st = check_shape(env, op, shape);
    if (st != DSMOE_OK) return st;
    const int B = shape->B, T = shape->T, M = shape->M, NH = shape->NH;
    if (B == 0 || T == 0) return DSMOE_OK;
    if (!dqkv || !workspace || !dout || !qkv || !out || !saved)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL dqkv, workspace, dout, qkv, out or saved", op);
    bwd_args a;
    a.B = B, a.T = T, a.M = M, a.NH = NH, a.D = M / NH;
    a.Dp = padded_d(a.D), a.Xs = tile_stride(a.Dp);
    a.qkv = qkv, a.dout = dout, a.out = out, a.dqkv = dqkv;
    a.lse = (const float *)saved, a.di = (float *)workspace;
    a.scale = 1.0f / sqrtf((float)a.D);
    const unsigned blocks = tile_blocks(B, NH, T, &a.tiles); // checked by check_shape
    const int ni = slots_for(a.D);
    const unsigned di_blocks = dsmoe_cu_blocks(((size_t)B * T * NH + ATT_WARPS - 1) / ATT_WARPS, 1);
    const size_t smem_dq = att_smem_bytes(a.Dp, 2, 1), smem_dkv = att_smem_bytes(a.Dp, 2, 2);
    cudaError_t e = cudaSuccess;
    if (dsmoe_cu_attention_tc_applies(env, shape->dt, M, NH)) { // bfloat16 on tensor cores (attention_tc.cu)
        dsmoe_cu_launch(attention_di_kernel<__nv_bfloat16>, di_blocks, ATT_THREADS, 0, env->stream, a);
        if ((st = dsmoe_cu_check_launch(env, op)) != DSMOE_OK) return st;
        return dsmoe_cu_attention_tc_backward(env, dqkv, a.di, dout, qkv, a.lse, B, T, M, NH);
    }
    // di first, then dq and dkv (both read di; they write disjoint columns of dqkv).
    DSMOE_CU_DISPATCH(shape->dt, T_, {
        dsmoe_cu_launch(attention_di_kernel<T_>, di_blocks, ATT_THREADS, 0, env->stream, a);
        ATT_SLOTS(ni, NI, {
            e = dsmoe_cu_launch_smem(attention_dq_kernel<T_, NI>, blocks, ATT_THREADS, smem_dq, env->stream, a);
            if (e == cudaSuccess)
                e = dsmoe_cu_launch_smem(attention_dkv_kernel<T_, NI>, blocks, ATT_THREADS, smem_dkv, env->stream, a);
        });
    });
    if (e != cudaSuccess) return dsmoe_cu_check(env, e, op);
    return dsmoe_cu_check_launch(env, op);
}
