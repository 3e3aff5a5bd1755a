// kernels/nn.cu: token + position embedding, layer norm and softmax cross-entropy of the cuda plugin
// (kernels/nn.h), each forward beside its backward.
// defines: dsmoe_cu_embedding_forward, dsmoe_cu_embedding_backward, dsmoe_cu_layernorm_forward,
//          dsmoe_cu_layernorm_backward, dsmoe_cu_crossentropy_forward, dsmoe_cu_crossentropy_backward
//
// The reference is plugins/cpu/cpu_ops.c. Each launcher makes the cpu function's checks in its order;
// each kernel evaluates the cpu loop body's expression (float32 on values loaded as float32, bfloat16
// stores round to nearest even), and the per-row statistics the cpu plugin sums in double (layer-norm
// mean and variance, the two layer-norm backward sums, the softmax sum) are summed in double here too.
//
// Invariants: forward outputs are assigned, backward outputs accumulate (+=). Every sum has an order
// that depends on the shape only (no floating-point atomics), so results are bitwise reproducible:
// - row statistics: one block per row, dsmoe_block_sum (fixed shuffle order);
// - dwte: the rows are sorted by (token id, row) (a radix sort of distinct keys: one possible result),
//   then one block per token id adds its rows in row order onto dwte, as the cpu plugin does;
// - dwpe: one block per position adds the batch's rows in batch order, as the cpu plugin does;
// - dweight, dbias: float32 partials over fixed row chunks, then added in chunk order.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <cub/device/device_radix_sort.cuh> // cub::DeviceRadixSort::SortKeys (embedding backward)

#include "cuda_common.cuh" // dsmoe_ld, dsmoe_st, dsmoe_cu_raise, dsmoe_block_sum/max, dsmoe_exp_fast, DSMOE_CU_DISPATCH
#include "nn.h"

#define NN_ROW_THREADS 256 // a block per row (embedding, layer norm, cross-entropy backward)
#define NN_CE_THREADS 512  // a block per row of V logits (V up to ~50k)

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

static dsmoe_status invalid(const dsmoe_cu_env *env, const char *op, const char *what) {
    return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %s", op, what);
}

// ---------------------------------------------------------------------------------------------------
// Embedding: out (B*T, M) = wte[tokens] + wpe[t]

// One block per row r = b*T + t; sequence b starts at position pos[b] (0 without pos).
template <typename T, typename W>
__global__ void embedding_forward_kernel(T *out, const int32_t *tokens, const W *wte, const float *wpe,
                                         const int32_t *pos, int T_, int M, int V, int n_pos, dsmoe_cu_fault *fault) {
    const int r = blockIdx.x;
    const int tok = tokens[r];
    const int p0 = pos ? pos[r / T_] : 0;
    if (tok < 0 || tok >= V) { // bad data: the row is left as it was
        if (threadIdx.x == 0)
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_TOKEN_RANGE, r, tok);
        return;
    }
    if (p0 < 0 || p0 > n_pos - T_) {
        if (threadIdx.x == 0 && r % T_ == 0)
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_KV_RANGE, r / T_, (long long)p0 + T_);
        return;
    }
    const W *e = wte + (size_t)tok * M;
    const float *p = wpe + (size_t)(p0 + r % T_) * M;
    for (int j = threadIdx.x; j < M; j += blockDim.x)
        dsmoe_st(out, (size_t)r * M + j, dsmoe_ld(e, j) + p[j]);
}

extern "C" dsmoe_status dsmoe_cu_embedding_forward(const dsmoe_cu_env *env, void *out, dsmoe_dtype dt,
                                                   const int32_t *tokens, const void *wte, dsmoe_dtype wte_dt,
                                                   const float *wpe, const int32_t *pos, int B, int T, int M, int V,
                                                   int n_pos) {
    static const char op[] = "embedding_forward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (wte_dt != DSMOE_FLOAT32 && wte_dt != dt)
        return dsmoe_cu_fail(env, DSMOE_ERR_UNSUPPORTED, "%s: wte is %s: expected float32 or the activations' type",
                             op, dsmoe_dtype_name(wte_dt));
    if (B < 0 || T < 0 || M < 0 || V <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: B=%d T=%d M=%d V=%d: expected B, T, M >= 0 and V > 0", op,
                             B, T, M, V);
    if ((long long)B * T > INT32_MAX)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: B*T=%lld rows: more than INT32_MAX", op, (long long)B * T);
    const int rows = B * T;
    if (rows == 0 || M == 0)
        return DSMOE_OK;
    if (!out || !tokens || !wte || !wpe)
        return invalid(env, op, "NULL out, tokens, wte or wpe");
    DSMOE_CU_DISPATCH(dt, Tv, {
        if (wte_dt == DSMOE_FLOAT32)
            dsmoe_cu_launch(embedding_forward_kernel<Tv, float>, (unsigned)rows, NN_ROW_THREADS, 0, env->stream,
                            (Tv *)out, tokens, (const float *)wte, wpe, pos, T, M, V, n_pos, env->fault);
        else
            dsmoe_cu_launch(embedding_forward_kernel<Tv, Tv>, (unsigned)rows, NN_ROW_THREADS, 0, env->stream, (Tv *)out,
                            tokens, (const Tv *)wte, wpe, pos, T, M, V, n_pos, env->fault);
    });
    return dsmoe_cu_check_launch(env, op);
}

// Sort keys: (token id << 32) | row, so that sorting groups the rows of a token in row order. A bad
// token raises and gets the id V, sorted after every real one and skipped.
__global__ void embedding_keys_kernel(uint64_t *keys, const int32_t *tokens, int rows, int V, dsmoe_cu_fault *fault) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        int tok = tokens[r];
        if (tok < 0 || tok >= V) {
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_TOKEN_RANGE, r, tok);
            tok = V;
        }
        keys[r] = ((uint64_t)(uint32_t)tok << 32) | (uint32_t)r;
    }
}

// One block per sorted position i; the block where a token's run of keys starts adds the run's dout rows,
// in row order, onto dwte[token] (the other blocks return at once). The run's rows are staged in shared
// memory EMB_TILE at a time; each thread owns EMB_COLS columns (j0 + c * EMB_TILE + x: coalesced) and
// has EMB_COLS independent loads per row in flight, which is what keeps a long run (a frequent token,
// thousands of rows added one after the other) from being bound by memory latency.
#define EMB_TILE 256 // = blockDim.x
#define EMB_COLS 4
template <typename T>
__global__ void __launch_bounds__(EMB_TILE) embedding_dwte_kernel(float *dwte, const T *dout, const uint64_t *sorted,
                                                                  int rows, int M, int V) {
    __shared__ uint32_t run[EMB_TILE];
    const int i = blockIdx.x, x = threadIdx.x;
    const uint32_t tok = (uint32_t)(sorted[i] >> 32);
    if (tok >= (uint32_t)V || (i > 0 && (uint32_t)(sorted[i - 1] >> 32) == tok))
        return; // block-uniform: bad tokens (id V), or not the start of a run
    float *d = dwte + (size_t)tok * M;
    for (int j0 = 0; j0 < M; j0 += EMB_COLS * EMB_TILE) {
        float acc[EMB_COLS];
#pragma unroll
        for (int c = 0; c < EMB_COLS; c++) {
            int j = j0 + c * EMB_TILE + x;
            acc[c] = j < M ? d[j] : 0.0f;
        }
        for (int k0 = i;; k0 += EMB_TILE) {
            const int k = k0 + x;
            const bool in_run = k < rows && (uint32_t)(sorted[k] >> 32) == tok;
            __syncthreads(); // the previous tile has been read
            run[x] = in_run ? (uint32_t)sorted[k] : 0u;
            // the run is a prefix of the tile (keys are sorted), so its length is the count
            const int n = __syncthreads_count(in_run);
#pragma unroll 4
            for (int kk = 0; kk < n; kk++) {
                const size_t base = (size_t)run[kk] * M;
#pragma unroll
                for (int c = 0; c < EMB_COLS; c++) {
                    int j = j0 + c * EMB_TILE + x;
                    if (j < M)
                        acc[c] += dsmoe_ld(dout, base + j);
                }
            }
            if (n < EMB_TILE)
                break;
        }
#pragma unroll
        for (int c = 0; c < EMB_COLS; c++) {
            int j = j0 + c * EMB_TILE + x;
            if (j < M)
                d[j] = acc[c];
        }
    }
}

// One block per position t: dwpe[t] += dout rows b*T + t, b in order.
template <typename T>
__global__ void embedding_dwpe_kernel(float *dwpe, const T *dout, int B, int T_, int M) {
    const int t = blockIdx.x;
    float *d = dwpe + (size_t)t * M;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        float acc = d[j];
#pragma unroll 8
        for (int b = 0; b < B; b++)
            acc += dsmoe_ld(dout, ((size_t)b * T_ + t) * M + j);
        d[j] = acc;
    }
}

// Bits of the sort key: the row (32) and token ids up to V (the bad-token id).
static int key_bits(int V) {
    int bits = 1;
    while (bits < 31 && ((uint32_t)V >> bits) != 0)
        bits++;
    return 32 + bits;
}

extern "C" dsmoe_status dsmoe_cu_embedding_backward(const dsmoe_cu_env *env, float *dwte, float *dwpe,
                                                    const void *dout, dsmoe_dtype dt, const int32_t *tokens, int B,
                                                    int T, int M, int V) {
    static const char op[] = "embedding_backward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (B < 0 || T < 0 || M < 0 || V <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: B=%d T=%d M=%d V=%d: expected B, T, M >= 0 and V > 0", op,
                             B, T, M, V);
    if ((long long)B * T > INT32_MAX)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: B*T=%lld rows: more than INT32_MAX", op, (long long)B * T);
    const int rows = B * T;
    if (rows == 0 || M == 0)
        return DSMOE_OK;
    if (!dwte || !dwpe || !dout || !tokens)
        return invalid(env, op, "NULL dwte, dwpe, dout or tokens");

    // scratch: keys (rows), sorted keys (rows), the sort's temporary storage
    const int end_bit = key_bits(V);
    size_t sort_bytes = 0;
    st = dsmoe_cu_check(env,
                        cub::DeviceRadixSort::SortKeys(NULL, sort_bytes, (const uint64_t *)NULL, (uint64_t *)NULL,
                                                       rows, 0, end_bit, env->stream),
                        "embedding_backward: cub sort (size)");
    if (st != DSMOE_OK)
        return st;
    const size_t key_bytes = align256((size_t)rows * sizeof(uint64_t));
    char *scratch = NULL;
    st = dsmoe_cu_scratch(env, (void **)&scratch, 2 * key_bytes + align256(sort_bytes), "embedding_backward");
    if (st != DSMOE_OK)
        return st;
    uint64_t *keys = (uint64_t *)scratch, *sorted = (uint64_t *)(scratch + key_bytes);
    void *sort_tmp = scratch + 2 * key_bytes;

    dsmoe_cu_launch(embedding_keys_kernel, dsmoe_cu_blocks((size_t)rows, NN_ROW_THREADS), NN_ROW_THREADS, 0,
                    env->stream, keys, tokens, rows, V, env->fault);
    st = dsmoe_cu_check(env,
                        cub::DeviceRadixSort::SortKeys(sort_tmp, sort_bytes, (const uint64_t *)keys, sorted, rows, 0,
                                                       end_bit, env->stream),
                        "embedding_backward: cub sort");
    if (st == DSMOE_OK) {
        DSMOE_CU_DISPATCH(dt, Tv, {
            dsmoe_cu_launch(embedding_dwte_kernel<Tv>, (unsigned)rows, EMB_TILE, 0, env->stream, dwte, (const Tv *)dout,
                            sorted, rows, M, V);
            dsmoe_cu_launch(embedding_dwpe_kernel<Tv>, (unsigned)T, NN_ROW_THREADS, 0, env->stream, dwpe,
                            (const Tv *)dout, B, T, M);
        });
        st = dsmoe_cu_check_launch(env, op);
    }
    dsmoe_status fst = dsmoe_cu_check(env, cudaFreeAsync(scratch, env->stream), "embedding_backward: cudaFreeAsync");
    return st != DSMOE_OK ? st : fst;
}

// ---------------------------------------------------------------------------------------------------
// Layer norm over the last dimension: out = (in - mean) * rstd * weight + bias, variance biased

// One block per row: the mean, then the variance around it (two passes, in double, as the cpu plugin).
template <typename T>
__global__ void layernorm_forward_kernel(T *out, float *mean, float *rstd, const T *in, const float *weight,
                                         const float *bias, int M, float eps) {
    __shared__ double red[32];
    const size_t row = (size_t)blockIdx.x * M;
    double sum = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x)
        sum += (double)dsmoe_ld(in, row + j);
    const double mu = dsmoe_block_sum(sum, red) / M;
    double var = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        double d = (double)dsmoe_ld(in, row + j) - mu;
        var += d * d;
    }
    var = dsmoe_block_sum(var, red);
    const float m = (float)mu, r = (float)(1.0 / sqrt(var / M + (double)eps));
    for (int j = threadIdx.x; j < M; j += blockDim.x)
        dsmoe_st(out, row + j, (dsmoe_ld(in, row + j) - m) * r * weight[j] + bias[j]);
    if (threadIdx.x == 0) {
        if (mean)
            mean[blockIdx.x] = m;
        if (rstd)
            rstd[blockIdx.x] = r;
    }
}

extern "C" dsmoe_status dsmoe_cu_layernorm_forward(const dsmoe_cu_env *env, void *out, float *mean, float *rstd,
                                                   const void *in, dsmoe_dtype dt, const float *weight,
                                                   const float *bias, int S, int M, float eps) {
    static const char op[] = "layernorm_forward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (S < 0 || M <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: S=%d M=%d: expected S >= 0 and M > 0", op, S, M);
    if (!(eps >= 0.0f))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: eps=%g: expected >= 0", op, (double)eps);
    if (S == 0)
        return DSMOE_OK;
    if (!out || !in || !weight || !bias)
        return invalid(env, op, "NULL out, in, weight or bias");
    DSMOE_CU_DISPATCH(dt, Tv, {
        dsmoe_cu_launch(layernorm_forward_kernel<Tv>, (unsigned)S, NN_ROW_THREADS, 0, env->stream, (Tv *)out, mean,
                        rstd, (const Tv *)in, weight, bias, M, eps);
    });
    return dsmoe_cu_check_launch(env, op);
}

// din, one block per row: the two row sums of the cpu plugin (in double), then the element formula.
template <typename T>
__global__ void layernorm_din_kernel(T *din, const T *dout, const T *in, const float *weight, const float *mean,
                                     const float *rstd, int M) {
    __shared__ double red[32];
    const size_t row = (size_t)blockIdx.x * M;
    const float m = mean[blockIdx.x], r = rstd[blockIdx.x];
    double dnorm_sum = 0.0, dnorm_norm_sum = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        float dnorm = weight[j] * dsmoe_ld(dout, row + j);
        dnorm_sum += (double)dnorm;
        dnorm_norm_sum += (double)(dnorm * ((dsmoe_ld(in, row + j) - m) * r));
    }
    dnorm_sum = dsmoe_block_sum(dnorm_sum, red);
    dnorm_norm_sum = dsmoe_block_sum(dnorm_norm_sum, red);
    const float dnorm_mean = (float)(dnorm_sum / M), dnorm_norm_mean = (float)(dnorm_norm_sum / M);
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        float norm = (dsmoe_ld(in, row + j) - m) * r;
        float g = dsmoe_ld(dout, row + j);
        dsmoe_st(din, row + j, dsmoe_ld(din, row + j) + r * (weight[j] * g - dnorm_mean - norm * dnorm_norm_mean));
    }
}

// dweight, dbias: a block is LN_COLS columns x one chunk of rows; thread (x, y) sums rows y, y + LN_ROWS,
// ... of its chunk in order, then row 0 of the block adds the LN_ROWS partials in order. The chunking
// depends on S only: at most LN_MAX_CHUNKS chunks of at least LN_CHUNK_ROWS rows.
#define LN_COLS 32
#define LN_ROWS 8
#define LN_CHUNK_ROWS 256
#define LN_MAX_CHUNKS 64

// accumulate: dw, db are dweight, dbias (M) and get +=; else they are partials (chunks, M), assigned.
template <typename T>
__global__ void layernorm_dparams_kernel(float *dw, float *db, int accumulate, const T *dout, const T *in,
                                         const float *mean, const float *rstd, int S, int M, int chunk_rows) {
    __shared__ float part_w[LN_ROWS][LN_COLS + 1], part_b[LN_ROWS][LN_COLS + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * LN_COLS + tx;
    const int s0 = blockIdx.y * chunk_rows, s1 = min(S, s0 + chunk_rows);
    float acc_w = 0.0f, acc_b = 0.0f;
    if (col < M)
        for (int s = s0 + ty; s < s1; s += LN_ROWS) {
            size_t i = (size_t)s * M + col;
            float g = dsmoe_ld(dout, i);
            acc_w += g * ((dsmoe_ld(in, i) - mean[s]) * rstd[s]);
            acc_b += g;
        }
    part_w[ty][tx] = acc_w;
    part_b[ty][tx] = acc_b;
    __syncthreads();
    if (ty == 0 && col < M) {
        float sw = 0.0f, sb = 0.0f;
        for (int k = 0; k < LN_ROWS; k++) {
            sw += part_w[k][tx];
            sb += part_b[k][tx];
        }
        if (accumulate) {
            dw[col] += sw;
            db[col] += sb;
        } else {
            dw[(size_t)blockIdx.y * M + col] = sw;
            db[(size_t)blockIdx.y * M + col] = sb;
        }
    }
}

// dweight, dbias (M) += the partials (chunks, M) summed in chunk order.
__global__ void layernorm_partials_kernel(float *dweight, float *dbias, const float *pw, const float *pb, int chunks,
                                          int M) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < M; j += gridDim.x * blockDim.x) {
        float sw = 0.0f, sb = 0.0f;
        for (int c = 0; c < chunks; c++) {
            sw += pw[(size_t)c * M + j];
            sb += pb[(size_t)c * M + j];
        }
        dweight[j] += sw;
        dbias[j] += sb;
    }
}

extern "C" dsmoe_status dsmoe_cu_layernorm_backward(const dsmoe_cu_env *env, void *din, float *dweight, float *dbias,
                                                    const void *dout, const void *in, dsmoe_dtype dt,
                                                    const float *weight, const float *mean, const float *rstd, int S,
                                                    int M) {
    static const char op[] = "layernorm_backward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (S < 0 || M <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: S=%d M=%d: expected S >= 0 and M > 0", op, S, M);
    if (S == 0)
        return DSMOE_OK;
    if (!din || !dweight || !dbias || !dout || !in || !weight || !mean || !rstd)
        return invalid(env, op, "NULL argument (din, dweight, dbias, dout, in, weight, mean or rstd)");
    int chunks = (S + LN_CHUNK_ROWS - 1) / LN_CHUNK_ROWS;
    if (chunks > LN_MAX_CHUNKS)
        chunks = LN_MAX_CHUNKS;
    const int chunk_rows = (S + chunks - 1) / chunks;
    float *partial = NULL; // (2, chunks, M): dweight's partials, then dbias's
    if (chunks > 1) {
        st = dsmoe_cu_scratch(env, (void **)&partial, 2 * (size_t)chunks * M * sizeof(float), "layernorm_backward");
        if (st != DSMOE_OK)
            return st;
    }
    const dim3 grid((unsigned)((M + LN_COLS - 1) / LN_COLS), (unsigned)chunks), block(LN_COLS, LN_ROWS);
    DSMOE_CU_DISPATCH(dt, Tv, {
        dsmoe_cu_launch(layernorm_din_kernel<Tv>, (unsigned)S, NN_ROW_THREADS, 0, env->stream, (Tv *)din,
                        (const Tv *)dout, (const Tv *)in, weight, mean, rstd, M);
        if (chunks > 1)
            dsmoe_cu_launch(layernorm_dparams_kernel<Tv>, grid, block, 0, env->stream, partial,
                            partial + (size_t)chunks * M, 0, (const Tv *)dout, (const Tv *)in, mean, rstd, S, M,
                            chunk_rows);
        else
            dsmoe_cu_launch(layernorm_dparams_kernel<Tv>, grid, block, 0, env->stream, dweight, dbias, 1,
                            (const Tv *)dout, (const Tv *)in, mean, rstd, S, M, chunk_rows);
    });
    if (chunks == 1)
        return dsmoe_cu_check_launch(env, op);
    dsmoe_cu_launch(layernorm_partials_kernel, dsmoe_cu_blocks((size_t)M, NN_ROW_THREADS), NN_ROW_THREADS, 0,
                    env->stream, dweight, dbias, partial, partial + (size_t)chunks * M, chunks, M);
    st = dsmoe_cu_check_launch(env, op);
    dsmoe_status fst = dsmoe_cu_check(env, cudaFreeAsync(partial, env->stream), "layernorm_backward: cudaFreeAsync");
    return st != DSMOE_OK ? st : fst;
}

// ---------------------------------------------------------------------------------------------------
// Softmax cross-entropy over V classes

// One block per row, three passes over the logits (they stay in L2): the maximum, the sum of exp in
// double, then probs = exp * (float)(1 / sum). loss = log(sum) - (z[target] - max), exact even where
// probs[target] underflows. A bad target raises; its loss is NaN.
template <typename T>
__global__ void crossentropy_forward_kernel(float *losses, float *probs, const T *logits, const int32_t *targets,
                                            int V, dsmoe_cu_fault *fault) {
    __shared__ float red_f[32];
    __shared__ double red_d[32];
    const size_t row = (size_t)blockIdx.x * V;
    float maxv = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float z = dsmoe_ld(logits, row + i);
        maxv = z > maxv ? z : maxv;
    }
    maxv = dsmoe_block_max(maxv, red_f);
    double sum = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        sum += (double)dsmoe_exp_fast(dsmoe_ld(logits, row + i) - maxv);
    sum = dsmoe_block_sum(sum, red_d);
    const float inv = (float)(1.0 / sum);
    float *p = probs + row;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        p[i] = dsmoe_exp_fast(dsmoe_ld(logits, row + i) - maxv) * inv;
    if (threadIdx.x == 0) {
        const int tgt = targets[blockIdx.x];
        if (tgt < 0 || tgt >= V) {
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_TARGET_RANGE, blockIdx.x, tgt);
            losses[blockIdx.x] = NAN;
        } else {
            losses[blockIdx.x] = (float)(log(sum) - ((double)dsmoe_ld(logits, row + tgt) - maxv));
        }
    }
}

extern "C" dsmoe_status dsmoe_cu_crossentropy_forward(const dsmoe_cu_env *env, float *losses, float *probs,
                                                      const void *logits, dsmoe_dtype dt, const int32_t *targets,
                                                      int S, int V) {
    static const char op[] = "crossentropy_forward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (S < 0 || V <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: S=%d V=%d: expected S >= 0 and V > 0", op, S, V);
    if (S == 0)
        return DSMOE_OK;
    if (!losses || !probs || !logits || !targets)
        return invalid(env, op, "NULL losses, probs, logits or targets");
    DSMOE_CU_DISPATCH(dt, Tv, {
        dsmoe_cu_launch(crossentropy_forward_kernel<Tv>, (unsigned)S, NN_CE_THREADS, 0, env->stream, losses, probs,
                        (const Tv *)logits, targets, V, env->fault);
    });
    return dsmoe_cu_check_launch(env, op);
}

// One block per row: d += dloss * p, then d -= dloss at the target (the cpu plugin's two steps). A bad
// target raises and leaves the row as it was.
template <typename T>
__global__ void crossentropy_backward_kernel(T *dlogits, const float *probs, const int32_t *targets, float dloss,
                                             int V, dsmoe_cu_fault *fault) {
    const int tgt = targets[blockIdx.x];
    if (tgt < 0 || tgt >= V) {
        if (threadIdx.x == 0)
            dsmoe_cu_raise(fault, DSMOE_CU_FAULT_TARGET_RANGE, blockIdx.x, tgt);
        return;
    }
    const size_t row = (size_t)blockIdx.x * V;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float d = dsmoe_ld(dlogits, row + i) + dloss * probs[row + i];
        if (i == tgt)
            d -= dloss;
        dsmoe_st(dlogits, row + i, d);
    }
}

extern "C" dsmoe_status dsmoe_cu_crossentropy_backward(const dsmoe_cu_env *env, void *dlogits, dsmoe_dtype dt,
                                                       const float *probs, const int32_t *targets, float dloss, int S,
                                                       int V) {
    static const char op[] = "crossentropy_backward";
    dsmoe_status st = dsmoe_cu_check_dtype(env, dt, op);
    if (st != DSMOE_OK)
        return st;
    if (S < 0 || V <= 0)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: S=%d V=%d: expected S >= 0 and V > 0", op, S, V);
    if (S == 0)
        return DSMOE_OK;
    if (!dlogits || !probs || !targets)
        return invalid(env, op, "NULL dlogits, probs or targets");
    DSMOE_CU_DISPATCH(dt, Tv, {
        dsmoe_cu_launch(crossentropy_backward_kernel<Tv>, (unsigned)S, NN_ROW_THREADS, 0, env->stream, (Tv *)dlogits,
                        probs, targets, dloss, V, env->fault);
    });
    return dsmoe_cu_check_launch(env, op);
}
