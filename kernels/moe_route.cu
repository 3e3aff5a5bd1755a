// kernels/moe_route.cu: MoE dispatch and combine of the cuda plugin, and their backward, through the
// token -> (expert, slot) table of gate_assign (kernels/gating.h).
// defines: dsmoe_cu_moe_dispatch, dsmoe_cu_moe_dispatch_backward, dsmoe_cu_moe_combine,
//          dsmoe_cu_moe_combine_backward
//
// The rules are docs/gating.md section 6; the reference is plugins/cpu/cpu_gating.c. One block per token
// walks the token's K table entries in k order and its M columns in chunks of 16 bytes (4 float32 or 8
// bfloat16 elements; thread t takes chunks t, t + blockDim, ...), with one 16-byte load or store per
// chunk when every row is 16-byte aligned, element by element otherwise: the arithmetic is the same in
// both cases, so results do not depend on alignment. Per element the cpu's expression in the cpu's order
// (dispatch_backward: (dx + dbuf_0) + dbuf_1; combine: w_0 y_0 + w_1 y_1), in float32, rounded once on
// the store. dweight is a float32 dot product: each thread's chunks in order, then dsmoe_block_sum's
// fixed tree; the order depends on M and the dtype only (not bitwise the cpu's 16-lane order).
//
// Invariants: dispatch, combine and combine_backward assign (rows of unused slots are left untouched),
// dispatch_backward accumulates (+=). An entry with choice outside [0, E) or slot outside [-1, C)
// raises DSMOE_CU_FAULT_CHOICE_RANGE (a = token, b = the bad value) and is skipped (its dweight is 0).
// Tables from gate_assign never hold a slot twice. The two ops that write (E, C) rows per entry,
// dispatch and combine_backward, prove it as the cpu plugin does: each kept entry claims its row in an
// owner map (E*C, zeroed on the stream before the launch) with one atomicCAS, and an entry that finds
// its row claimed raises DSMOE_CU_FAULT_SLOT_TWICE (the two tokens, the expert and the slot) and skips
// its write. The map costs a memset of E*C int32 and one CAS per entry; it decides nothing else, so
// results stay deterministic. (dispatch_backward and combine only read rows: a duplicate there is
// harmless to them and reported by the writers of the same step.)
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_common.cuh" // dsmoe_ld, dsmoe_st, dsmoe_cu_raise, dsmoe_block_sum, DSMOE_CU_DISPATCH
#include "gating.h"

#define MR_THREADS 128 // one block per token; the dweight sum order depends on it

namespace {

// Elements of T in one 16-byte chunk.
template <typename T>
struct chunk {
    static constexpr int N = 16 / (int)sizeof(T);
};

// Row (choice * C + slot) of an (E, C, M) buffer for table entry (s, k), or -1 when dropped or invalid
// (thread 0 raises the fault). Every thread of the block gets the same answer.
__device__ __forceinline__ long long table_row(const int32_t *choice, const int32_t *slot, int s, int K, int k,
                                               int E, int C, dsmoe_cu_fault *fault) {
    const size_t i = (size_t)s * K + k;
    const int c = choice[i], sl = slot[i];
    if (c < 0 || c >= E) {
        if (threadIdx.x == 0)
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_CHOICE_RANGE, s, c);
        return -1;
    }
    if (sl < -1 || sl >= C) {
        if (threadIdx.x == 0)
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_CHOICE_RANGE, s, sl);
        return -1;
    }
    return sl < 0 ? -1 : (long long)c * C + sl;
}

// Row r (>= 0) for token s: claimed in owner (token + 1; 0 = free) by thread 0. False, for every
// thread of the block, when another entry holds it already (the fault is raised).
__device__ __forceinline__ bool claim_row(uint32_t *owner, long long r, int s, int C, dsmoe_cu_fault *fault) {
    int twice = 0;
    if (threadIdx.x == 0) {
        const uint32_t held = atomicCAS(&owner[r], 0u, (uint32_t)s + 1u);
        if (held != 0u) {
            const long long t0 = (long long)held - 1, lo = t0 < s ? t0 : s, hi = t0 < s ? s : t0;
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_SLOT_TWICE, (lo << 32) | hi, ((r / C) << 32) | (r % C));
            twice = 1;
        }
    }
    return __syncthreads_or(twice) == 0;
}

// v[0 .. n) = p[0 .. n) as float32 (n <= N); one 16-byte load when vec and the chunk is whole.
template <typename T>
__device__ __forceinline__ void load_chunk(float *v, const T *p, int n, bool vec) {
    constexpr int N = chunk<T>::N;
    if (vec && n == N) {
        const uint4 u = *reinterpret_cast<const uint4 *>(p);
        const T *t = reinterpret_cast<const T *>(&u);
#pragma unroll
        for (int i = 0; i < N; i++)
            v[i] = dsmoe_ld(t, (size_t)i);
    } else {
        for (int i = 0; i < n; i++)
            v[i] = dsmoe_ld(p, (size_t)i);
    }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T *p, const float *v, int n, bool vec) {
    constexpr int N = chunk<T>::N;
    if (vec && n == N) {
        uint4 u;
        T *t = reinterpret_cast<T *>(&u);
#pragma unroll
        for (int i = 0; i < N; i++)
            dsmoe_st(t, (size_t)i, v[i]);
        *reinterpret_cast<uint4 *>(p) = u;
    } else {
        for (int i = 0; i < n; i++)
            dsmoe_st(p, (size_t)i, v[i]);
    }
}

// buf[row(s, k)] = x[s] for each kept (s, k): a bit copy.
template <typename T>
__global__ void dispatch_kernel(T *buf, const T *x, const int32_t *choice, const int32_t *slot, int K, int E, int C,
                                int M, bool vec, uint32_t *owner, dsmoe_cu_fault *fault) {
    const int s = blockIdx.x;
    const T *src = x + (size_t)s * M;
    for (int k = 0; k < K; k++) {
        const long long r = table_row(choice, slot, s, K, k, E, C, fault);
        if (r < 0 || !claim_row(owner, r, s, C, fault))
            continue;
        T *dst = buf + (size_t)r * M;
        if (vec) {
            const uint4 *s4 = reinterpret_cast<const uint4 *>(src);
            uint4 *d4 = reinterpret_cast<uint4 *>(dst);
            for (int q = threadIdx.x; q < M / chunk<T>::N; q += blockDim.x)
                d4[q] = s4[q];
        } else {
            for (int m = threadIdx.x; m < M; m += blockDim.x)
                dst[m] = src[m];
        }
    }
}

// dx[s] += dbuf[row(s, 0)] + ... over kept k in k order, element by element: ((dx + a) + b).
template <typename T>
__global__ void dispatch_backward_kernel(T *dx, const T *dbuf, const int32_t *choice, const int32_t *slot, int K,
                                         int E, int C, int M, bool vec, dsmoe_cu_fault *fault) {
    const int s = blockIdx.x;
    long long rows[2];
    int n_rows = 0;
    for (int k = 0; k < K; k++) {
        const long long r = table_row(choice, slot, s, K, k, E, C, fault);
        if (r >= 0)
            rows[n_rows++] = r;
    }
    if (n_rows == 0)
        return;
    T *d = dx + (size_t)s * M;
    constexpr int N = chunk<T>::N;
    for (int q = threadIdx.x; q < (M + N - 1) / N; q += blockDim.x) {
        const int m0 = q * N, n = min(N, M - m0); // this thread's chunk: elements m0 .. m0 + n
        float acc[N], g[N];
        load_chunk(acc, d + m0, n, vec);
        for (int j = 0; j < n_rows; j++) {
            load_chunk(g, dbuf + (size_t)rows[j] * M + m0, n, vec);
            for (int i = 0; i < n; i++)
                acc[i] += g[i];
        }
        store_chunk(d + m0, acc, n, vec);
    }
}

// out[s] = w_0 y[row 0] (+ w_1 y[row 1]) over kept k in k order; 0 when none is kept.
template <typename T>
__global__ void combine_kernel(T *out, const T *y, const int32_t *choice, const int32_t *slot, const float *weight,
                               int K, int E, int C, int M, bool vec, dsmoe_cu_fault *fault) {
    const int s = blockIdx.x;
    long long rows[2];
    float w[2];
    int n_rows = 0;
    for (int k = 0; k < K; k++) {
        const long long r = table_row(choice, slot, s, K, k, E, C, fault);
        if (r < 0)
            continue;
        rows[n_rows] = r;
        w[n_rows++] = weight[(size_t)s * K + k];
    }
    T *o = out + (size_t)s * M;
    constexpr int N = chunk<T>::N;
    for (int q = threadIdx.x; q < (M + N - 1) / N; q += blockDim.x) {
        const int m0 = q * N, n = min(N, M - m0); // this thread's chunk: elements m0 .. m0 + n
        float v[N], a[N], b[N];
        if (n_rows == 0) {
            for (int i = 0; i < n; i++)
                v[i] = 0.0f; // dropped everywhere: the residual path carries the token
        } else if (n_rows == 1) {
            load_chunk(a, y + (size_t)rows[0] * M + m0, n, vec);
            for (int i = 0; i < n; i++)
                v[i] = w[0] * a[i];
        } else {
            load_chunk(a, y + (size_t)rows[0] * M + m0, n, vec);
            load_chunk(b, y + (size_t)rows[1] * M + m0, n, vec);
            for (int i = 0; i < n; i++)
                v[i] = w[0] * a[i] + w[1] * b[i];
        }
        store_chunk(o + m0, v, n, vec);
    }
}

// For each k: dy[row] = weight[s,k] * dout[s] and dweight[s,k] = dot(dout[s], y[row]) when kept; else
// dweight[s,k] = 0 and dy untouched.
template <typename T>
__global__ void combine_backward_kernel(T *dy, float *dweight, const T *dout, const T *y, const int32_t *choice,
                                        const int32_t *slot, const float *weight, int K, int E, int C, int M,
                                        bool vec, uint32_t *owner, dsmoe_cu_fault *fault) {
    __shared__ float red[32];
    constexpr int N = chunk<T>::N;
    const int s = blockIdx.x;
    const T *d = dout + (size_t)s * M;
    for (int k = 0; k < K; k++) {
        const size_t i = (size_t)s * K + k;
        const long long r = table_row(choice, slot, s, K, k, E, C, fault);
        if (r < 0 || !claim_row(owner, r, s, C, fault)) {
            if (threadIdx.x == 0)
                dweight[i] = 0.0f;
            continue;
        }
        const float w = weight[i];
        const T *yr = y + (size_t)r * M;
        T *dyr = dy + (size_t)r * M;
        float acc = 0.0f;
        for (int q = threadIdx.x; q < (M + N - 1) / N; q += blockDim.x) {
            const int m0 = q * N, n = min(N, M - m0); // this thread's chunk: elements m0 .. m0 + n
            float g[N], yv[N], v[N];
            load_chunk(g, d + m0, n, vec);
            load_chunk(yv, yr + m0, n, vec);
            for (int j = 0; j < n; j++) {
                acc += g[j] * yv[j];
                v[j] = w * g[j];
            }
            store_chunk(dyr + m0, v, n, vec);
        }
        acc = dsmoe_block_sum(acc, red);
        if (threadIdx.x == 0)
            dweight[i] = acc;
    }
}

} // namespace

// ------------------------------------------------------------------------------------------------
// launchers

static size_t dtype_bytes(dsmoe_dtype dt) { return dt == DSMOE_FLOAT32 ? 4 : 2; }

static bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// Rows of M elements of dt all start on 16 bytes when the bases do and a row is a multiple of 16 bytes.
static bool rows_vec(dsmoe_dtype dt, int M, const void *a, const void *b, const void *c) {
    return ((size_t)M * dtype_bytes(dt)) % 16 == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

// The cpu's size checks (check_table), and the table pointers when there are tokens.
static dsmoe_status check_sizes(const dsmoe_cu_env *env, const char *op, dsmoe_dtype dt, const int32_t *choice,
                                const int32_t *slot, int S, int K, int E, int C, int M) {
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (S < 0 || E < 1 || C < 0 || M < 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID,
                             "%s: S = %d, E = %d, C = %d, M = %d; expected S >= 0, E >= 1, C >= 0, M >= 0", op, S, E,
                             C, M);
    if ((K != 1 && K != 2) || K > E)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: K = %d with E = %d, expected K in {1, 2} and K <= E", op, K,
                             E);
    if (S > 0 && (!choice || !slot))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op, !choice ? "choice" : "slot");
    return DSMOE_OK;
}

// The owner map of dispatch and combine_backward (E*C uint32, zeroed), in scratch on env->stream.
static dsmoe_status owner_map(const dsmoe_cu_env *env, const char *op, int E, int C, uint32_t **owner) {
    const size_t bytes = (size_t)E * C * sizeof(uint32_t);
    void *p = NULL;
    dsmoe_status st = dsmoe_cu_scratch(env, &p, bytes, op);
    if (st != DSMOE_OK)
        return st;
    if (bytes > 0 && (st = dsmoe_cu_check(env, cudaMemsetAsync(p, 0, bytes, env->stream), op)) != DSMOE_OK) {
        (void)cudaFreeAsync(p, env->stream);
        return st;
    }
    *owner = (uint32_t *)p;
    return DSMOE_OK;
}

// Every launcher below runs its kernel whenever S > 0, also with M = 0 or C = 0: the kernel checks the
// table's entries (as the cpu plugin does) and moves no data then.

extern "C" dsmoe_status dsmoe_cu_moe_dispatch(const dsmoe_cu_env *env, void *buf, const void *x, dsmoe_dtype dt,
                                              const int32_t *choice, const int32_t *slot, int S, int K, int E, int C,
                                              int M) {
    static const char op[] = "moe_dispatch";
    dsmoe_status st = check_sizes(env, op, dt, choice, slot, S, K, E, C, M);
    if (st != DSMOE_OK || S == 0)
        return st;
    if ((size_t)E * C > 0 && M > 0 && (!buf || !x))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op, !buf ? "buf" : "x");
    const bool vec = rows_vec(dt, M, buf, x, x);
    uint32_t *owner = NULL;
    if ((st = owner_map(env, op, E, C, &owner)) != DSMOE_OK)
        return st;
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(dispatch_kernel<T>, (unsigned)S, MR_THREADS, 0, env->stream, (T *)buf, (const T *)x, choice,
                        slot, K, E, C, M, vec, owner, env->fault);
    });
    st = dsmoe_cu_check_launch(env, op);
    (void)cudaFreeAsync(owner, env->stream);
    return st;
}

extern "C" dsmoe_status dsmoe_cu_moe_dispatch_backward(const dsmoe_cu_env *env, void *dx, const void *dbuf,
                                                       dsmoe_dtype dt, const int32_t *choice, const int32_t *slot, int S,
                                                       int K, int E, int C, int M) {
    static const char op[] = "moe_dispatch_backward";
    dsmoe_status st = check_sizes(env, op, dt, choice, slot, S, K, E, C, M);
    if (st != DSMOE_OK || S == 0)
        return st;
    if (M > 0 && (!dx || !dbuf))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op, !dx ? "dx" : "dbuf");
    const bool vec = rows_vec(dt, M, dx, dbuf, dbuf);
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(dispatch_backward_kernel<T>, (unsigned)S, MR_THREADS, 0, env->stream, (T *)dx, (const T *)dbuf,
                        choice, slot, K, E, C, M, vec, env->fault);
    });
    return dsmoe_cu_check_launch(env, op);
}

extern "C" dsmoe_status dsmoe_cu_moe_combine(const dsmoe_cu_env *env, void *out, const void *y, dsmoe_dtype dt,
                                             const int32_t *choice, const int32_t *slot, const float *weight, int S,
                                             int K, int E, int C, int M) {
    static const char op[] = "moe_combine";
    dsmoe_status st = check_sizes(env, op, dt, choice, slot, S, K, E, C, M);
    if (st != DSMOE_OK || S == 0)
        return st;
    if (!weight || (M > 0 && (!out || ((size_t)E * C > 0 && !y))))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op, !weight ? "weight" : !out ? "out" : "y");
    const bool vec = rows_vec(dt, M, out, y, y);
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(combine_kernel<T>, (unsigned)S, MR_THREADS, 0, env->stream, (T *)out, (const T *)y, choice,
                        slot, weight, K, E, C, M, vec, env->fault);
    });
    return dsmoe_cu_check_launch(env, op);
}

extern "C" dsmoe_status dsmoe_cu_moe_combine_backward(const dsmoe_cu_env *env, void *dy, float *dweight,
                                                      const void *dout, const void *y, dsmoe_dtype dt,
                                                      const int32_t *choice, const int32_t *slot, const float *weight,
                                                      int S, int K, int E, int C, int M) {
    static const char op[] = "moe_combine_backward";
    dsmoe_status st = check_sizes(env, op, dt, choice, slot, S, K, E, C, M);
    if (st != DSMOE_OK || S == 0)
        return st;
    const size_t rows = (size_t)E * C;
    if (!dweight || !weight)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op, !dweight ? "dweight" : "weight");
    if (M > 0 && !dout)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: dout is NULL", op);
    if (M > 0 && rows > 0 && (!y || !dy))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s is NULL", op, !y ? "y" : "dy");
    const bool vec = rows_vec(dt, M, dy, dout, y);
    uint32_t *owner = NULL;
    if ((st = owner_map(env, op, E, C, &owner)) != DSMOE_OK)
        return st;
    DSMOE_CU_DISPATCH(dt, T, {
        dsmoe_cu_launch(combine_backward_kernel<T>, (unsigned)S, MR_THREADS, 0, env->stream, (T *)dy, dweight,
                        (const T *)dout, (const T *)y, choice, slot, weight, K, E, C, M, vec, owner, env->fault);
    });
    st = dsmoe_cu_check_launch(env, op);
    (void)cudaFreeAsync(owner, env->stream);
    return st;
}
