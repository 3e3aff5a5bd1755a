// tests/cuda_emu/emu_cublaslt.cc: a CPU stand-in for the part of cuBLASLt the cuda plugin uses, for tests only.
//
// Linked into the plugin built for the emulator instead of libcublasLt, beside emu_cublas.cc. Assumed as there:
// "device memory" is host memory; a cublasLtMatmul is checked at the call, its descriptors copied then (alpha
// and beta read then too, host pointer mode only), and computed in the given stream's order (emu_streams.h:
// deferred on a created stream), its matrices, bias and aux read and written when it runs; the workspace is
// never used (every algorithm needs 0 bytes); a handle serves any thread.
//
// Emulated: handles; matmul descriptors (compute and scale types, TRANSA, TRANSB, EPILOGUE, BIAS_POINTER,
// BIAS_BATCH_STRIDE, BIAS_DATA_TYPE, EPILOGUE_AUX_POINTER, _AUX_LD, _AUX_BATCH_STRIDE, _AUX_DATA_TYPE,
// POINTER_MODE); matrix layouts (TYPE, ORDER, ROWS, COLS, LD, BATCH_COUNT, STRIDED_BATCH_OFFSET); preferences
// (MAX_WORKSPACE_BYTES, REDUCTION_SCHEME_MASK: the emulated algorithm never splits k, so any mask admits it,
// MIN_ALIGNMENT_{A,B,C,D}_BYTES, 256 by default); cublasLtMatmulAlgoGetHeuristic (one algorithm, which
// records the preference's minimum alignments) and cublasLtMatmul. Another attribute, or a size that is not
// the attribute's, gives CUBLAS_STATUS_INVALID_VALUE at the set. Descriptor state lives inside the header's
// fixed-size opaque structs (static_assert), copied in and out with memcpy, tagged so that one never created
// is refused (CUBLAS_STATUS_INVALID_VALUE); the *Init_internal functions behind cublasLt*Init fill them too.
//
// The product: column-major, D = epilogue(alpha op(A) op(B) + beta C) per batch b, every operand advanced by
// its layout's STRIDED_BATCH_OFFSET, bias by BIAS_BATCH_STRIDE, aux by EPILOGUE_AUX_BATCH_STRIDE (elements).
// Computed by emu_gemm.h's engine, as emu_cublas.cc's GEMMs: with CUBLASLT_EPILOGUE_DEFAULT the bits are those
// of cublasGemmStridedBatchedEx on the same operands and compute type (cuBLAS in its default math mode).
// Epilogues, on v (float32) at row i and column j of D: BIAS v += bias[i]; GELU v = gelu(v); GELU_AUX
// aux[i + j*ld] = v, v = gelu(v); GELU_BIAS and GELU_AUX_BIAS the same after v += bias[i]; DGELU
// v = gelu'(aux[i + j*ld]) * v. gelu is the tanh approximation, as kernels/gemm.cu writes it. aux is stored in
// its type (bfloat16 rounded to nearest even), D likewise. Others (RELU*, *BGRAD*): CUBLAS_STATUS_NOT_SUPPORTED.
//
// Checked by cublasLtMatmulAlgoGetHeuristic and again by cublasLtMatmul, in this order:
// - CUBLAS_STATUS_NOT_INITIALIZED: no handle;
// - CUBLAS_STATUS_INVALID_VALUE: (the heuristic) requestedAlgoCount < 1, no results array or count, no
//   preference; a descriptor missing or never created, TRANSA/TRANSB not N, T or C, shapes that do not fit
//   (A m x k for N, k x m for T; B k x n or n x k; m x n from D), batch counts that differ or are below 1,
//   ld < max(1, rows);
// - CUBLAS_STATUS_NOT_SUPPORTED: a pointer mode but HOST, an order but CUBLASLT_ORDER_COL, C's layout not D's
//   (type, rows, cols, ld, batch count and stride), sizes beyond int32, types but A, B, C, D all CUDA_R_32F or
//   A, B CUDA_R_16BF with C = D CUDA_R_16BF or CUDA_R_32F, scale type but CUDA_R_32F, compute types but
//   CUBLAS_COMPUTE_32F and _PEDANTIC (inputs as they are: cuBLASLt has no math mode), _FAST_TF32 (inputs
//   rounded to TF32) and _FAST_16BF (to bfloat16), both float32 only, as emu_cublas.cc; an epilogue not listed
//   above; for the bias epilogues, no bias pointer or a bias type but D's (BIAS_DATA_TYPE -1, the default),
//   CUDA_R_32F, or CUDA_R_16BF with D bfloat16; for GELU_AUX, GELU_AUX_BIAS and DGELU (cuBLASLt's documented
//   constraints), no aux pointer, an aux type but D's (-1 is D's), an aux ld not a multiple of 8 or below m,
//   an aux batch stride not a multiple of 8 when there are several batches.
// The heuristic then gives one result (state CUBLAS_STATUS_SUCCESS, workspace 0, wavesCount 1), or
// CUBLAS_STATUS_NOT_SUPPORTED with 0 results, as the library does when it has no kernel. cublasLtMatmul (a NULL
// algo: the default preferences) further refuses with CUBLAS_STATUS_INVALID_VALUE: alpha or beta NULL, an algo
// that no heuristic gave, a NULL D (m, n > 0), C (beta != 0) or A, B (k > 0, alpha != 0); and, stricter than
// the library (which would fault or misbehave on a GPU), so that a plugin that does not declare its alignments
// fails in tests: any batch's A, B (when read), C (when read) or D address not a multiple of the algo's minimum
// alignment for it, or a bias or aux base pointer not a multiple of 16 bytes.
//
// Test hook: DSMOE_EMU_LT_NO_ALGO=1 in the environment (read at each call) makes cublasLtMatmulAlgoGetHeuristic
// answer CUBLAS_STATUS_NOT_SUPPORTED with 0 algorithms once the checks pass, as a library without a kernel for
// the problem.
// Out of host memory while a matmul runs (packing): cudaErrorMemoryAllocation as the last error (emu_runtime.h).
// No C++ runtime is used (no exceptions, operator new or containers): C test programs link it without libstdc++.
#include <cublasLt.h>
#include <cublas_api.h>

#include "emu_gemm.h"    // the GEMM engine, shared with emu_cublas.cc
#include "emu_runtime.h" // dsmoe_emu_set_last_error
#include "emu_streams.h" // dsmoe_emu_enqueue

#include <math.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

struct cublasLtContext {
    int unused;
};

namespace {

using namespace dsmoe_emu_gemm;

#define GEMM_GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)
#define GEMM_GELU_CUBE 0.044715f

// As kernels/cuda_common.cuh's dsmoe_cu_gelu and dsmoe_cu_gelu_grad (cuBLASLt's own are the same tanh form).
float gemm_gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(GEMM_GELU_SCALE * (x + GEMM_GELU_CUBE * x * x * x)));
}

float gemm_gelu_grad(float x) {
    float th = tanhf(GEMM_GELU_SCALE * (x + GEMM_GELU_CUBE * x * x * x));
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GEMM_GELU_SCALE * (1.0f + 3.0f * GEMM_GELU_CUBE * x * x);
}

// The descriptors' state, each held in the first bytes of its opaque struct; tag tells a created one.
constexpr uint32_t kDescTag = 0x64734d44u, kLayoutTag = 0x64734d4cu, kPrefTag = 0x64734d50u, kAlgoTag = 0x64734d41u;

struct Desc {
    uint32_t tag;
    int32_t compute, scale, pointer_mode, transa, transb;
    uint32_t epilogue;
    int32_t bias_type, aux_type; // -1: D's
    const void *bias;
    void *aux;
    int64_t bias_stride, aux_ld, aux_stride; // elements
};

struct Layout {
    uint32_t tag;
    int32_t type, order, batch;
    uint64_t rows, cols;
    int64_t ld, stride; // elements
};

enum { kA, kB, kC, kD };

struct Pref {
    uint32_t tag, reduction;
    uint64_t workspace;
    uint32_t align[4]; // bytes, kA .. kD
};

struct Algo {
    uint32_t tag;
    uint32_t align[4];
};

static_assert(sizeof(Desc) <= sizeof(cublasLtMatmulDescOpaque_t), "Desc fits its opaque struct");
static_assert(sizeof(Layout) <= sizeof(cublasLtMatrixLayoutOpaque_t), "Layout fits its opaque struct");
static_assert(sizeof(Pref) <= sizeof(cublasLtMatmulPreferenceOpaque_t), "Pref fits its opaque struct");
static_assert(sizeof(Algo) <= sizeof(cublasLtMatmulAlgo_t), "Algo fits its opaque struct");

// Reads the state of a descriptor; false when there is none or it was never created.
template <typename S, typename O>
bool get(const O *o, uint32_t tag, S *s) {
    if (!o)
        return false;
    std::memcpy(s, o, sizeof *s);
    return s->tag == tag;
}

template <typename S, typename O>
void put(O *o, const S &s) {
    std::memset(o, 0, sizeof *o);
    std::memcpy(o, &s, sizeof s);
}

// An attribute's value from (buf, size), false when size is not the attribute's.
template <typename T>
bool take(const void *buf, size_t size, T *v) {
    if (!buf || size != sizeof *v)
        return false;
    std::memcpy(v, buf, sizeof *v);
    return true;
}

// Allocates an opaque struct for Create, state s in it.
template <typename O, typename S>
cublasStatus_t create(O **out, const S &s) {
    if (!out)
        return CUBLAS_STATUS_INVALID_VALUE;
    O *o = (O *)std::malloc(sizeof(O));
    if (!o)
        return CUBLAS_STATUS_ALLOC_FAILED;
    put(o, s);
    *out = o;
    return CUBLAS_STATUS_SUCCESS;
}

Desc new_desc(cublasComputeType_t compute, cudaDataType_t scale) {
    return Desc{kDescTag, (int32_t)compute, (int32_t)scale, CUBLASLT_POINTER_MODE_HOST, CUBLAS_OP_N, CUBLAS_OP_N,
                CUBLASLT_EPILOGUE_DEFAULT, -1, -1, nullptr, nullptr, 0, 0, 0};
}

Layout new_layout(cudaDataType type, uint64_t rows, uint64_t cols, int64_t ld) {
    return Layout{kLayoutTag, (int32_t)type, CUBLASLT_ORDER_COL, 1, rows, cols, ld, 0};
}

Pref new_pref() { return Pref{kPrefTag, CUBLASLT_REDUCTION_SCHEME_MASK, 0, {256, 256, 256, 256}}; }

// What an epilogue does, from its value; false for one not emulated.
struct EpiKind {
    bool bias, gelu, aux_out, dgelu;
};

bool epi_kind(uint32_t e, EpiKind *k) {
    switch (e) {
    case CUBLASLT_EPILOGUE_DEFAULT: *k = EpiKind{false, false, false, false}; return true;
    case CUBLASLT_EPILOGUE_BIAS: *k = EpiKind{true, false, false, false}; return true;
    case CUBLASLT_EPILOGUE_GELU: *k = EpiKind{false, true, false, false}; return true;
    case CUBLASLT_EPILOGUE_GELU_AUX: *k = EpiKind{false, true, true, false}; return true;
    case CUBLASLT_EPILOGUE_GELU_BIAS: *k = EpiKind{true, true, false, false}; return true;
    case CUBLASLT_EPILOGUE_GELU_AUX_BIAS: *k = EpiKind{true, true, true, false}; return true;
    case CUBLASLT_EPILOGUE_DGELU: *k = EpiKind{false, false, false, true}; return true;
    default: return false;
    }
}

// A checked matmul: the engine's Gemm, then what the epilogue and the batches need.
struct Problem {
    Gemm g;
    int batch;
    EpiKind epi;
    int64_t stride[4]; // elements, kA .. kD
    const void *bias;
    void *aux;
    bool bias_bf16, aux_bf16;
    int64_t bias_stride, aux_ld, aux_stride; // elements
};

bool valid_op(int32_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }
int64_t max1(uint64_t v) { return v > 1 ? (int64_t)v : 1; }
bool same_layout(const Layout &x, const Layout &y) {
    return x.type == y.type && x.order == y.order && x.rows == y.rows && x.cols == y.cols && x.ld == y.ld &&
           x.batch == y.batch && x.stride == y.stride;
}

// The checks of the heuristic and of the matmul (the top comment's list, in its order).
cublasStatus_t check(cublasLtHandle_t h, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t Adesc,
                     cublasLtMatrixLayout_t Bdesc, cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                     Problem *p) {
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    Desc d;
    Layout L[4];
    if (!get(desc, kDescTag, &d) || !get(Adesc, kLayoutTag, &L[kA]) || !get(Bdesc, kLayoutTag, &L[kB]) ||
        !get(Cdesc, kLayoutTag, &L[kC]) || !get(Ddesc, kLayoutTag, &L[kD]))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!valid_op(d.transa) || !valid_op(d.transb))
        return CUBLAS_STATUS_INVALID_VALUE;
    const bool ta = d.transa != CUBLAS_OP_N, tb = d.transb != CUBLAS_OP_N; // C is T for real types
    const uint64_t m = L[kD].rows, n = L[kD].cols, k = ta ? L[kA].rows : L[kA].cols;
    if ((ta ? L[kA].cols : L[kA].rows) != m || (tb ? L[kB].cols : L[kB].rows) != k ||
        (tb ? L[kB].rows : L[kB].cols) != n)
        return CUBLAS_STATUS_INVALID_VALUE;
    for (int i = 0; i < 4; i++)
        if (L[i].batch < 1 || L[i].batch != L[kD].batch || L[i].ld < max1(L[i].rows))
            return CUBLAS_STATUS_INVALID_VALUE;
    if (d.pointer_mode != CUBLASLT_POINTER_MODE_HOST)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    for (int i = 0; i < 4; i++)
        if (L[i].order != CUBLASLT_ORDER_COL || L[i].rows > INT_MAX || L[i].cols > INT_MAX || L[i].ld > INT_MAX)
            return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!same_layout(L[kC], L[kD]))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const int32_t at = L[kA].type, bt = L[kB].type, dt = L[kD].type;
    const bool f32 = at == CUDA_R_32F && bt == CUDA_R_32F && dt == CUDA_R_32F;
    const bool bf16 = at == CUDA_R_16BF && bt == CUDA_R_16BF && (dt == CUDA_R_16BF || dt == CUDA_R_32F);
    int drop;
    switch (d.compute) {
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC: drop = 0; break;
    case CUBLAS_COMPUTE_32F_FAST_TF32: drop = 13; break;
    case CUBLAS_COMPUTE_32F_FAST_16BF: drop = 16; break;
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (d.scale != CUDA_R_32F || !(f32 || (bf16 && drop == 0)))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    EpiKind e;
    if (!epi_kind(d.epilogue, &e))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const int32_t bias_t = d.bias_type == -1 ? dt : d.bias_type, aux_t = d.aux_type == -1 ? dt : d.aux_type;
    if (e.bias && (!d.bias || !(bias_t == CUDA_R_32F || (bias_t == CUDA_R_16BF && dt == CUDA_R_16BF))))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const bool aux = e.aux_out || e.dgelu;
    if (aux && (!d.aux || aux_t != dt || d.aux_ld % 8 != 0 || d.aux_ld < (int64_t)m ||
                (L[kD].batch > 1 && d.aux_stride % 8 != 0)))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    p->g = Gemm{ta, tb, (int)m, (int)n, (int)k, (int)L[kA].ld, (int)L[kB].ld, (int)L[kD].ld, 0.0f, 0.0f,
                (cudaDataType)at, (cudaDataType)bt, (cudaDataType)dt, drop};
    p->batch = L[kD].batch;
    p->epi = e;
    for (int i = 0; i < 4; i++)
        p->stride[i] = L[i].stride;
    p->bias = e.bias ? d.bias : nullptr;
    p->aux = aux ? d.aux : nullptr;
    p->bias_bf16 = bias_t == CUDA_R_16BF;
    p->aux_bf16 = aux_t == CUDA_R_16BF;
    p->bias_stride = d.bias_stride;
    p->aux_ld = d.aux_ld;
    p->aux_stride = d.aux_stride;
    return CUBLAS_STATUS_SUCCESS;
}

// One batch's epilogue: bias and aux at that batch.
struct LtEpilogue {
    static constexpr bool identity = false;
    EpiKind e;
    const void *bias;
    void *aux;
    bool bias_bf16, aux_bf16;
    size_t aux_ld;

    float operator()(int i, int j, float v) const {
        if (e.bias)
            v += bias_bf16 ? load((const uint16_t *)bias, (size_t)i) : load((const float *)bias, (size_t)i);
        const size_t at = (size_t)i + (size_t)j * aux_ld;
        if (e.dgelu)
            return gemm_gelu_grad(aux_bf16 ? load((const uint16_t *)aux, at) : load((const float *)aux, at)) * v;
        if (e.aux_out) {
            if (aux_bf16)
                store((uint16_t *)aux, at, v);
            else
                store((float *)aux, at, v);
        }
        return e.gelu ? gemm_gelu(v) : v;
    }
};

// A matmul as queued on its stream: the problem (alpha and beta in its Gemm) and its pointers.
struct Job {
    Problem p;
    const void *A, *B, *C;
    void *D;
};

const void *at_batch(const void *base, int64_t stride, size_t elem, int b) {
    return base ? (const char *)base + (int64_t)b * stride * (int64_t)elem : nullptr;
}

void job_run(void *arg) {
    const Job *j = (const Job *)arg;
    const Problem &p = j->p;
    const bool product = has_product(p.g), c_read = p.g.beta != 0.0f; // else A, B or C may be NULL
    const size_t ea = type_bytes(p.g.at), eb = type_bytes(p.g.bt), ec = type_bytes(p.g.ct);
    const auto operands = [j, &p, product, c_read, ea, eb, ec](int b) {
        Mats x = {nullptr, nullptr, nullptr, nullptr};
        if (product) {
            x.A = at_batch(j->A, p.stride[kA], ea, b);
            x.B = at_batch(j->B, p.stride[kB], eb, b);
        }
        if (c_read)
            x.C = at_batch(j->C, p.stride[kC], ec, b);
        x.D = (void *)at_batch(j->D, p.stride[kD], ec, b);
        return x;
    };
    bool ok;
    if (!p.epi.bias && !p.epi.gelu && !p.epi.aux_out && !p.epi.dgelu) { // DEFAULT: cuBLAS's very instantiation
        ok = run(p.g, p.batch, operands, [](int) { return NoEpilogue{}; });
    } else {
        const size_t eb_bias = p.bias_bf16 ? 2 : 4, ea_aux = p.aux_bf16 ? 2 : 4;
        ok = run(p.g, p.batch, operands, [&p, eb_bias, ea_aux](int b) {
            return LtEpilogue{p.epi, at_batch(p.bias, p.bias_stride, eb_bias, b),
                              (void *)at_batch(p.aux, p.aux_stride, ea_aux, b), p.bias_bf16, p.aux_bf16,
                              (size_t)p.aux_ld};
        });
    }
    if (!ok) // the packing buffers: out of host memory while the stream ran
        dsmoe_emu_set_last_error(cudaErrorMemoryAllocation);
    std::free(arg);
}

// Whether every batch's address of an operand is a multiple of align bytes (0 taken as 1).
bool aligned(const void *base, int64_t stride, size_t elem, int batch, uint32_t align) {
    const uint64_t a = align ? align : 1;
    for (int b = 0; b < batch; b++)
        if (((uint64_t)(uintptr_t)base + (uint64_t)((int64_t)b * stride * (int64_t)elem)) % a != 0)
            return false;
    return true;
}

bool no_algo_hook() {
    const char *v = std::getenv("DSMOE_EMU_LT_NO_ALGO");
    return v && std::strcmp(v, "1") == 0;
}

} // namespace

extern "C" {

cublasStatus_t cublasLtCreate(cublasLtHandle_t *handle) {
    if (!handle)
        return CUBLAS_STATUS_INVALID_VALUE;
    cublasLtHandle_t h = (cublasLtHandle_t)std::malloc(sizeof *h);
    if (!h)
        return CUBLAS_STATUS_ALLOC_FAILED;
    h->unused = 0;
    *handle = h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    std::free(handle);
    return CUBLAS_STATUS_SUCCESS;
}

size_t cublasLtGetVersion(void) { return CUBLAS_VERSION; }

// The status texts are cuBLAS's (emu_cublas.cc), as the libraries share them.
const char *cublasLtGetStatusName(cublasStatus_t status) { return cublasGetStatusName(status); }
const char *cublasLtGetStatusString(cublasStatus_t status) { return cublasGetStatusString(status); }

cublasStatus_t cublasLtMatmulDescInit_internal(cublasLtMatmulDesc_t desc, size_t size, cublasComputeType_t compute,
                                               cudaDataType_t scale) {
    if (!desc || size < sizeof *desc)
        return CUBLAS_STATUS_ALLOC_FAILED;
    put(desc, new_desc(compute, scale));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc, cublasComputeType_t compute,
                                        cudaDataType_t scale) {
    return create(desc, new_desc(compute, scale));
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
    std::free(desc);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t size) {
    Desc d;
    if (!get(desc, kDescTag, &d))
        return CUBLAS_STATUS_INVALID_VALUE;
    bool ok;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE: ok = take(buf, size, &d.compute); break;
    case CUBLASLT_MATMUL_DESC_SCALE_TYPE: ok = take(buf, size, &d.scale); break;
    case CUBLASLT_MATMUL_DESC_POINTER_MODE: ok = take(buf, size, &d.pointer_mode); break;
    case CUBLASLT_MATMUL_DESC_TRANSA: ok = take(buf, size, &d.transa); break;
    case CUBLASLT_MATMUL_DESC_TRANSB: ok = take(buf, size, &d.transb); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: ok = take(buf, size, &d.epilogue); break;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: ok = take(buf, size, &d.bias); break;
    case CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE: ok = take(buf, size, &d.bias_stride); break;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: ok = take(buf, size, &d.bias_type); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER: ok = take(buf, size, &d.aux); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: ok = take(buf, size, &d.aux_ld); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE: ok = take(buf, size, &d.aux_stride); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE: ok = take(buf, size, &d.aux_type); break;
    default: ok = false;
    }
    if (!ok)
        return CUBLAS_STATUS_INVALID_VALUE;
    put(desc, d);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutInit_internal(cublasLtMatrixLayout_t layout, size_t size, cudaDataType type,
                                                 uint64_t rows, uint64_t cols, int64_t ld) {
    if (!layout || size < sizeof *layout)
        return CUBLAS_STATUS_ALLOC_FAILED;
    put(layout, new_layout(type, rows, cols, ld));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
    return create(layout, new_layout(type, rows, cols, ld));
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
    std::free(layout);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attr,
                                                const void *buf, size_t size) {
    Layout l;
    if (!get(layout, kLayoutTag, &l))
        return CUBLAS_STATUS_INVALID_VALUE;
    bool ok;
    uint32_t type;
    switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_TYPE:
        ok = take(buf, size, &type);
        l.type = (int32_t)type;
        break;
    case CUBLASLT_MATRIX_LAYOUT_ORDER: ok = take(buf, size, &l.order); break;
    case CUBLASLT_MATRIX_LAYOUT_ROWS: ok = take(buf, size, &l.rows); break;
    case CUBLASLT_MATRIX_LAYOUT_COLS: ok = take(buf, size, &l.cols); break;
    case CUBLASLT_MATRIX_LAYOUT_LD: ok = take(buf, size, &l.ld); break;
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: ok = take(buf, size, &l.batch); break;
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: ok = take(buf, size, &l.stride); break;
    default: ok = false;
    }
    if (!ok)
        return CUBLAS_STATUS_INVALID_VALUE;
    put(layout, l);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceInit_internal(cublasLtMatmulPreference_t pref, size_t size) {
    if (!pref || size < sizeof *pref)
        return CUBLAS_STATUS_ALLOC_FAILED;
    put(pref, new_pref());
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref) { return create(pref, new_pref()); }

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
    std::free(pref);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                    size_t size) {
    Pref p;
    if (!get(pref, kPrefTag, &p))
        return CUBLAS_STATUS_INVALID_VALUE;
    bool ok;
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: ok = take(buf, size, &p.workspace); break;
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK: ok = take(buf, size, &p.reduction); break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: ok = take(buf, size, &p.align[kA]); break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: ok = take(buf, size, &p.align[kB]); break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: ok = take(buf, size, &p.align[kC]); break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: ok = take(buf, size, &p.align[kD]); break;
    default: ok = false;
    }
    if (!ok)
        return CUBLAS_STATUS_INVALID_VALUE;
    put(pref, p);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                              cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                              cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                              cublasLtMatmulPreference_t preference, int requestedAlgoCount,
                                              cublasLtMatmulHeuristicResult_t heuristicResultsArray[],
                                              int *returnAlgoCount) {
    if (returnAlgoCount)
        *returnAlgoCount = 0;
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    Pref pref;
    if (requestedAlgoCount <= 0 || !heuristicResultsArray || !returnAlgoCount || !get(preference, kPrefTag, &pref))
        return CUBLAS_STATUS_INVALID_VALUE;
    Problem p;
    cublasStatus_t st = check(handle, desc, Adesc, Bdesc, Cdesc, Ddesc, &p);
    if (st != CUBLAS_STATUS_SUCCESS)
        return st;
    if (no_algo_hook())
        return CUBLAS_STATUS_NOT_SUPPORTED;
    Algo a = {kAlgoTag, {pref.align[kA], pref.align[kB], pref.align[kC], pref.align[kD]}};
    cublasLtMatmulHeuristicResult_t *r = &heuristicResultsArray[0];
    std::memset(r, 0, sizeof *r);
    put(&r->algo, a);
    r->workspaceSize = 0;
    r->state = CUBLAS_STATUS_SUCCESS;
    r->wavesCount = 1.0f;
    *returnAlgoCount = 1;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                              const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo, void *, size_t,
                              cudaStream_t stream) {
    Job job;
    cublasStatus_t st = check(handle, desc, Adesc, Bdesc, Cdesc, Ddesc, &job.p);
    if (st != CUBLAS_STATUS_SUCCESS)
        return st;
    Algo a = {kAlgoTag, {256, 256, 256, 256}};
    if ((algo && !get(algo, kAlgoTag, &a)) || !alpha || !beta)
        return CUBLAS_STATUS_INVALID_VALUE;
    Problem &p = job.p;
    p.g.alpha = *(const float *)alpha;
    p.g.beta = *(const float *)beta;
    if (p.g.m == 0 || p.g.n == 0)
        return CUBLAS_STATUS_SUCCESS;
    const bool product = has_product(p.g), c_read = p.g.beta != 0.0f;
    if (!D || (c_read && !C) || (product && (!A || !B)))
        return CUBLAS_STATUS_INVALID_VALUE;
    const size_t ea = type_bytes(p.g.at), eb = type_bytes(p.g.bt), ec = type_bytes(p.g.ct);
    if ((product && !(aligned(A, p.stride[kA], ea, p.batch, a.align[kA]) &&
                      aligned(B, p.stride[kB], eb, p.batch, a.align[kB]))) ||
        (c_read && !aligned(C, p.stride[kC], ec, p.batch, a.align[kC])) ||
        !aligned(D, p.stride[kD], ec, p.batch, a.align[kD]) || (uintptr_t)p.bias % 16 != 0 ||
        (uintptr_t)p.aux % 16 != 0)
        return CUBLAS_STATUS_INVALID_VALUE;
    job.A = A;
    job.B = B;
    job.C = C;
    job.D = D;
    Job *j = (Job *)std::malloc(sizeof *j);
    if (!j)
        return CUBLAS_STATUS_ALLOC_FAILED;
    *j = job;
    dsmoe_emu_enqueue(stream, job_run, j);
    return CUBLAS_STATUS_SUCCESS;
}

} // extern "C"
