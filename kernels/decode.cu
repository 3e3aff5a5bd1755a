// kernels/decode.cu: the inference members of the cuda plugin (kernels/attention.h): the per-layer KV
// cache, attention of a query block over it, and token sampling.
// defines: dsmoe_cu_kv_append, dsmoe_cu_attention_cached, dsmoe_cu_sample
//
// The reference is plugins/cpu/cpu_infer.c. Cache layout k_cache, v_cache (B, NH, T_max, D), D = M / NH:
// head (b, h)'s keys are one (T_max, D) row-major block. Positions (pos) are device data: a sequence
// whose pos[b] is outside [0, T_max - T_new] raises DSMOE_CU_FAULT_KV_RANGE (a = b, b = pos + T_new) and
// is skipped; the context's sticky error reports it. Cached attention is attention_forward's pass
// (dsmoe_cu_attention_rows in attention.cu) with the cache as keys and pos[b] as the first position.
//
// Sampling reproduces cpu_infer.c's procedure, candidate order included, so that the same uniform gives
// the same token: candidates sorted by logit descending (NaN counts as -Inf, -0 equals +0), equal logits
// by lower id; weights exp((z - z_max) / T) in double; cut to the first top_k, then to the shortest
// prefix whose running weight reaches top_p of the total; the token is the first whose running weight
// exceeds u * (kept total), u = dsmoe_rng_uniform(seed, counters[r]). Here the candidates are sorted as
// unique 64-bit keys (descending-logit bits above the id) with CUB's segmented radix sort, and the
// running weights are prefix sums in a fixed partition (chunk sums, then a sequential scan of the
// chunks), so they equal the cpu plugin's sequential doubles up to rounding: a token can differ only when
// u * total falls within a few ulp of a boundary between two candidates.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>

#include <cub/device/device_segmented_radix_sort.cuh>

#include "attention.h"
#include "cuda_common.cuh" // dsmoe_ld, dsmoe_cu_raise, DSMOE_CU_DISPATCH, dsmoe_cu_check_dtype
#include "dsmoe/rng.h"     // dsmoe_rng_uniform

// ---------------------------------------------------------------------------------------------------
// KV cache

// The shape checks of cpu_infer.c's check_cache.
static dsmoe_status check_cache(const dsmoe_cu_env *env, const char *op, dsmoe_dtype dt, int B, int T_new, int M,
                                int NH, int T_max) {
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK) return st;
    if (B < 0 || T_new < 0 || M <= 0 || NH <= 0 || T_max < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: B=%d T_new=%d M=%d NH=%d T_max=%d: expected B, T_new, T_max "
                             ">= 0 and M, NH > 0", op, B, T_new, M, NH, T_max);
    if (M % NH) return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: M=%d is not a multiple of NH=%d", op, M, NH);
    if (T_new > T_max) return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: T_new=%d > T_max=%d", op, T_new, T_max);
    return DSMOE_OK;
}

// One block per token row r = b*T_new + t (grid-stride): its k and v columns of every head go to
// position pos[b] + t of the cache. Raw element copies (no conversion).
template <typename T>
__global__ void kv_append_kernel(T *kc, T *vc, const T *qkv, const int32_t *pos, int B, int T_new, int M, int NH,
                                 int T_max, dsmoe_cu_fault *fault) {
    const int D = M / NH;
    const size_t rows = (size_t)B * T_new;
    for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int b = (int)(r / T_new), t = (int)(r % T_new), p = pos[b];
        if (p < 0 || p > T_max - T_new) {
            if (t == 0 && threadIdx.x == 0) dsmoe_cu_raise(fault, DSMOE_CU_FAULT_KV_RANGE, b, (long long)p + T_new);
            continue;
        }
        const T *k = qkv + r * 3 * (size_t)M + M, *v = k + M; // (M) each: the heads side by side
        for (int c = threadIdx.x; c < M; c += blockDim.x) {
            const int h = c / D, d = c % D;
            const size_t at = (((size_t)b * NH + h) * T_max + (size_t)(p + t)) * D + d;
            kc[at] = k[c];
            vc[at] = v[c];
        }
    }
}

extern "C" dsmoe_status dsmoe_cu_kv_append(const dsmoe_cu_env *env, void *k_cache, void *v_cache, const void *qkv,
                                           dsmoe_dtype dt, const int32_t *pos, int B, int T_new, int M, int NH,
                                           int T_max) {
    static const char op[] = "kv_append";
    dsmoe_status st = check_cache(env, op, dt, B, T_new, M, NH, T_max);
    if (st != DSMOE_OK) return st;
    if (B == 0 || T_new == 0) return DSMOE_OK;
    if (!k_cache || !v_cache || !qkv || !pos)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL k_cache, v_cache, qkv or pos", op);
    const unsigned blocks = dsmoe_cu_blocks((size_t)B * T_new, 1), threads = M >= 256 ? 256 : 32 * ((M + 31) / 32);
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(kv_append_kernel<T>, blocks, threads, 0, env->stream, (T *)k_cache, (T *)v_cache,
                        (const T *)qkv, pos, B, T_new, M, NH, T_max, env->fault);
    });
    return dsmoe_cu_check_launch(env, op);
}

extern "C" dsmoe_status dsmoe_cu_attention_cached(const dsmoe_cu_env *env, void *out, const void *qkv,
                                                  const void *k_cache, const void *v_cache, dsmoe_dtype dt,
                                                  const int32_t *pos, int B, int T_new, int M, int NH, int T_max) {
    static const char op[] = "attention_cached";
    dsmoe_status st = check_cache(env, op, dt, B, T_new, M, NH, T_max);
    if (st != DSMOE_OK) return st;
    if (B == 0 || T_new == 0) return DSMOE_OK;
    if (!out || !qkv || !k_cache || !v_cache || !pos)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL out, qkv, k_cache, v_cache or pos", op);
    const int D = M / NH;
    dsmoe_cu_attention_rows_desc d;
    d.B = B, d.NH = NH, d.T_q = T_new, d.D = D, d.dt = dt;
    d.q = qkv, d.q_ld = 3 * (size_t)M;
    d.k = k_cache, d.v = v_cache;
    d.kv_sb = (size_t)NH * T_max * D, d.kv_sh = (size_t)T_max * D, d.kv_ld = (size_t)D;
    d.pos = pos, d.T_max = T_max;
    d.out = out, d.out_ld = (size_t)M;
    d.lse = NULL;
    return dsmoe_cu_attention_rows(env, &d, op);
}

// ---------------------------------------------------------------------------------------------------
// Sampling

#define SAMPLE_THREADS 512 // threads of the per-row kernels (a multiple of 32)
#define SAMPLE_ROWS 64     // rows per round: their uniforms travel by value in the scan kernel's arguments

// Pairs (logit, id) by the cpu plugin's greedy rule: the first maximum; NaN never wins (see argmax_kernel).
struct arg_best {
    float v;
    int i; // -1 = none yet
};
__device__ __forceinline__ arg_best better(arg_best a, arg_best b) {
    if (b.i < 0) return a;
    if (a.i < 0) return b;
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

// Greedy, one block per row (grid-stride): cpu_infer.c's argmax_row keeps best = 0 and moves to i when
// z[i] > z[best]. So a NaN at index 0 is the answer (nothing compares greater), any other NaN is never
// taken, and otherwise the answer is the lowest index of the maximum (-0 == +0). The pair reduction is
// a selection (order independent).
template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) argmax_kernel(int32_t *tokens, const T *logits, int rows, int V) {
    __shared__ arg_best warp_best[SAMPLE_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *z = logits + (size_t)r * V;
        arg_best best = {0.0f, -1};
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const float v = dsmoe_ld(z, i);
            if (!isnan(v) && (best.i < 0 || v > best.v)) best = {v, i};
        }
        for (int o = 16; o > 0; o >>= 1) {
            arg_best other = {__shfl_xor_sync(0xffffffffu, best.v, o), __shfl_xor_sync(0xffffffffu, best.i, o)};
            best = better(best, other);
        }
        __syncthreads(); // warp_best may still be read for the previous row
        if (lane == 0) warp_best[warp] = best;
        __syncthreads();
        if (threadIdx.x == 0) {
            arg_best all = warp_best[0];
            for (int w = 1; w < SAMPLE_THREADS / 32; w++) all = better(all, warp_best[w]);
            tokens[r] = isnan(dsmoe_ld(z, 0)) ? 0 : all.i; // z[0] not NaN: all.i >= 0
        }
    }
}

// Candidate keys: ascending key order = descending logit, then ascending id. The logit's bits are made
// order-preserving (NaN -> -Inf, -0 -> +0 so that they tie as the cpu plugin's == does), inverted for
// the descending order, and put above the id's `idbits` bits.
__device__ __forceinline__ uint32_t desc_bits(float z) {
    if (isnan(z)) z = -INFINITY;
    if (z == 0.0f) z = 0.0f;
    uint32_t u = __float_as_uint(z);
    uint32_t asc = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~asc;
}

__device__ __forceinline__ float key_logit(uint64_t key, int idbits) {
    uint32_t asc = ~(uint32_t)(key >> idbits);
    return __uint_as_float((asc & 0x80000000u) ? (asc & 0x7fffffffu) : ~asc);
}

// keys (nrows, V): grid (x over V, y = row of the round).
template <typename T>
__global__ void sample_keys_kernel(uint64_t *keys, const T *logits, int V, int idbits) {
    const int r = blockIdx.y;
    const T *z = logits + (size_t)r * V;
    uint64_t *kr = keys + (size_t)r * V;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < V; i += gridDim.x * blockDim.x)
        kr[i] = ((uint64_t)desc_bits(dsmoe_ld(z, i)) << idbits) | (uint64_t)i;
}

__global__ void segment_offsets_kernel(int *offsets, int n, int V) {
    for (int i = threadIdx.x; i <= n; i += blockDim.x) offsets[i] = i * V;
}

struct sample_round {
    int V, idbits, top_k;
    float top_p, temperature;
    float u[SAMPLE_ROWS]; // the rows' uniforms
};

// One block per row of the round, over its sorted keys (V); run (V) doubles of scratch get the running
// weights. Thread t owns the candidates [t c, (t+1) c) of the first k: it writes their weights and its
// chunk sum, thread 0 scans the chunk sums in order, each thread turns its weights into running sums
// from its chunk's offset. The searches take the lowest index that meets the condition.
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_scan_kernel(int32_t *tokens, const uint64_t *keys, double *run,
                                                                     const sample_round s) {
    __shared__ double part[SAMPLE_THREADS];
    __shared__ int found;
    const int r = blockIdx.x, tid = threadIdx.x, V = s.V;
    const uint64_t *kr = keys + (size_t)r * V;
    double *P = run + (size_t)r * V;
    const int k = s.top_k > 0 && s.top_k < V ? s.top_k : V;
    const double zmax = (double)key_logit(kr[0], s.idbits), temp = (double)s.temperature;
    const int c = (k + SAMPLE_THREADS - 1) / SAMPLE_THREADS, lo = min(tid * c, k), hi = min(lo + c, k);
    double sum = 0.0;
    for (int i = lo; i < hi; i++) {
        double w = exp(((double)key_logit(kr[i], s.idbits) - zmax) / temp);
        P[i] = w;
        sum += w;
    }
    part[tid] = sum;
    __syncthreads();
    if (tid == 0) {
        double acc = 0.0;
        for (int j = 0; j < SAMPLE_THREADS; j++) {
            double x = part[j];
            part[j] = acc;
            acc += x;
        }
    }
    __syncthreads();
    double cum = part[tid];
    for (int i = lo; i < hi; i++) {
        cum += P[i];
        P[i] = cum;
    }
    __syncthreads(); // P complete (global writes of the block are visible after the barrier)

    int n = k;
    if (s.top_p < 1.0f) { // the shortest prefix whose running weight reaches top_p of the total
        const double need = (double)s.top_p * P[k - 1];
        if (tid == 0) found = INT_MAX;
        __syncthreads();
        for (int i = lo; i < hi; i++)
            if (P[i] >= need) {
                atomicMin(&found, i);
                break;
            }
        __syncthreads();
        n = found == INT_MAX ? k : found + 1;
        __syncthreads(); // everyone has read found
    }
    const double target = (double)s.u[r] * P[n - 1];
    if (tid == 0) found = INT_MAX;
    __syncthreads();
    for (int i = lo; i < min(hi, n); i++)
        if (target < P[i]) {
            atomicMin(&found, i);
            break;
        }
    __syncthreads();
    if (tid == 0) {
        const int at = found == INT_MAX ? n - 1 : found; // rounding left target at the total
        tokens[r] = (int32_t)(kr[at] & ((1ull << s.idbits) - 1));
    }
}

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

extern "C" dsmoe_status dsmoe_cu_sample(const dsmoe_cu_env *env, int32_t *tokens, const void *logits, dsmoe_dtype dt,
                                        int rows, int V, const dsmoe_sampling_params *p, const uint64_t *counters) {
    static const char op[] = "sample";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK) return st;
    if (!p) return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL sampling params", op);
    if (rows < 0 || V <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: rows=%d V=%d: expected rows >= 0 and V > 0", op, rows, V);
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: temperature=%g: expected >= 0 (0 = greedy)", op,
                             (double)p->temperature);
    if (p->top_k < 0) return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: top_k=%d: expected >= 0 (0 = all)", op, p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: top_p=%g: expected in (0, 1]", op, (double)p->top_p);
    if (rows == 0) return DSMOE_OK;
    if (!tokens || !logits) return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL tokens or logits", op);

    if (p->temperature == 0.0f) {
        const unsigned blocks = rows < 65535 * 16 ? (unsigned)rows : 65535u * 16u;
        DSMOE_CU_DISPATCH(dt, T, {
            dsmoe_cu_launch(argmax_kernel<T>, blocks, SAMPLE_THREADS, 0, env->stream, tokens, (const T *)logits, rows,
                            V);
        });
        return dsmoe_cu_check_launch(env, op);
    }
    if (!counters)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL counters with temperature %g", op, (double)p->temperature);
    if (V > INT_MAX / SAMPLE_ROWS)
        return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: V=%d: this plugin samples from at most %d candidates", op,
                             V, INT_MAX / SAMPLE_ROWS);

    // Scratch for one round of up to SAMPLE_ROWS rows: two key buffers (the sort's double buffer; the one
    // the sort does not end in receives the running weights), the segment offsets, CUB's temporary.
    const int nr_max = rows < SAMPLE_ROWS ? rows : SAMPLE_ROWS, last = rows % SAMPLE_ROWS;
    int idbits = 1;
    while (idbits < 31 && (1ll << idbits) < (long long)V) idbits++;
    const int end_bit = 32 + idbits;
    size_t cub_bytes = 0;
    for (int pass = 0; pass < 2; pass++) { // the full round and a shorter last one
        const int nr = pass == 0 ? nr_max : last;
        if (nr == 0) continue;
        cub::DoubleBuffer<uint64_t> db(nullptr, nullptr);
        size_t b = 0;
        st = dsmoe_cu_check(env, cub::DeviceSegmentedRadixSort::SortKeys(NULL, b, db, nr * V, nr, (const int *)NULL,
                                                                          (const int *)NULL, 0, end_bit, env->stream),
                            "sample: cub sort (size)");
        if (st != DSMOE_OK) return st;
        cub_bytes = b > cub_bytes ? b : cub_bytes;
    }
    const size_t key_bytes = align256((size_t)nr_max * V * sizeof(uint64_t));
    const size_t off_bytes = align256((size_t)(nr_max + 1) * sizeof(int));
    char *scratch = NULL;
    st = dsmoe_cu_scratch(env, (void **)&scratch, 2 * key_bytes + off_bytes + align256(cub_bytes), "sample");
    if (st != DSMOE_OK) return st;
    uint64_t *buf0 = (uint64_t *)scratch, *buf1 = (uint64_t *)(scratch + key_bytes);
    int *offsets = (int *)(scratch + 2 * key_bytes);
    void *cub_tmp = scratch + 2 * key_bytes + off_bytes;
    dsmoe_cu_launch(segment_offsets_kernel, 1, 256, 0, env->stream, offsets, nr_max, V);

    sample_round s;
    s.V = V, s.idbits = idbits, s.top_k = p->top_k, s.top_p = p->top_p, s.temperature = p->temperature;
    const unsigned key_blocks = (unsigned)((V + 255) / 256 < 1024 ? (V + 255) / 256 : 1024);
    for (int r0 = 0; r0 < rows && st == DSMOE_OK; r0 += SAMPLE_ROWS) {
        const int nr = rows - r0 < SAMPLE_ROWS ? rows - r0 : SAMPLE_ROWS;
        for (int i = 0; i < nr; i++) s.u[i] = dsmoe_rng_uniform(p->seed, counters[r0 + i]);
        DSMOE_CU_DISPATCH(dt, T, {
            dsmoe_cu_launch(sample_keys_kernel<T>, dim3(key_blocks, (unsigned)nr), 256, 0, env->stream, buf0,
                            (const T *)logits + (size_t)r0 * V, V, idbits);
        });
        cub::DoubleBuffer<uint64_t> db(buf0, buf1);
        size_t b = cub_bytes;
        st = dsmoe_cu_check(env, cub::DeviceSegmentedRadixSort::SortKeys(cub_tmp, b, db, nr * V, nr, offsets,
                                                                          offsets + 1, 0, end_bit, env->stream),
                            "sample: cub sort");
        if (st != DSMOE_OK) break;
        dsmoe_cu_launch(sample_scan_kernel, (unsigned)nr, SAMPLE_THREADS, 0, env->stream, tokens + r0, db.Current(),
                        (double *)db.Alternate(), s);
        st = dsmoe_cu_check_launch(env, op);
    }
    dsmoe_status fst = dsmoe_cu_check(env, cudaFreeAsync(scratch, env->stream), "sample: cudaFreeAsync");
    return st != DSMOE_OK ? st : fst;
}
