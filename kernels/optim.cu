// kernels/optim.cu: the multi-tensor AdamW of the cuda plugin (kernels/elementwise.h).
// defines: dsmoe_cu_adamw
//
// The reference is cpu_adamw (plugins/cpu/cpu_elementwise.c): the same checks, the bias corrections
// computed on the host in double and rounded to float as it does, and the same per-element expression in
// the same order. Every element is one thread's, so the result does not depend on the launch shape.
//
// The tensor list is host memory and must be consumed before return: it travels to the device inside
// the kernel's parameters, ADAMW_CHUNK tensors per launch (an adamw_batch is about 1.8 KB, below the 4 KB
// every CUDA version accepts). Within a launch, tensor k owns the blocks [block0, block0 + nblocks) (a
// prefix over the tensors' block counts, computed here); a block finds its tensor by a scan over at most
// ADAMW_CHUNK entries and walks the tensor with a stride of nblocks blocks.
#include <cuda_runtime.h>
#include <math.h>

#include "cuda_common.cuh" // dsmoe_cu_check_launch, dsmoe_cu_fail
#include "elementwise.h"

#define ADAMW_CHUNK 32
#define ADAMW_THREADS 256
#define ADAMW_ELEMS_PER_BLOCK (ADAMW_THREADS * 4)
#define ADAMW_MAX_BLOCKS_PER_TENSOR 16384 // bigger tensors take several elements per thread

typedef struct adamw_entry {
    float *param;
    const float *grad;
    float *m, *v;
    size_t n;
    float weight_decay;
    int block0, nblocks; // this tensor's blocks in the launch
} adamw_entry;

typedef struct adamw_batch {
    adamw_entry t[ADAMW_CHUNK];
    int count;
    float lr, beta1, beta2, eps, grad_scale;
    float c1, c2; // bias corrections 1 - beta^t, from double
} adamw_batch;

// __grid_constant__: the batch is read in place in the parameter space (a dynamic index would otherwise
// copy it to local memory).
__global__ void adamw_kernel(const __grid_constant__ adamw_batch b) {
    int k = 0;
    while (k + 1 < b.count && (int)blockIdx.x >= b.t[k + 1].block0)
        k++;
    const adamw_entry *e = &b.t[k];
    float *param = e->param, *m = e->m, *v = e->v;
    const float *grad = e->grad;
    const float weight_decay = e->weight_decay, beta1 = b.beta1, beta2 = b.beta2;
    const size_t stride = (size_t)e->nblocks * blockDim.x;
    for (size_t i = (size_t)(blockIdx.x - e->block0) * blockDim.x + threadIdx.x; i < e->n; i += stride) {
        float g = grad[i] * b.grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] -= b.lr * ((mi / b.c1) / (sqrtf(vi / b.c2) + b.eps) + weight_decay * param[i]);
    }
}

extern "C" dsmoe_status dsmoe_cu_adamw(const dsmoe_cu_env *env, const dsmoe_adamw_params *hp,
                                       const dsmoe_adamw_tensor *tensors, int n) {
    static const char op[] = "adamw";
    if (!hp)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: NULL hyper-parameters", op);
    if (n < 0 || (!tensors && n > 0))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: %d tensors at %p: expected a list of n >= 0", op, n,
                             (const void *)tensors);
    const float beta1 = hp->beta1, beta2 = hp->beta2;
    const int t = hp->t;
    if (t < 1)
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: t=%d: expected the step number, >= 1", op, t);
    if (!(beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f))
        return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: beta1=%g beta2=%g: expected each in [0, 1)", op,
                             (double)beta1, (double)beta2);
    for (int i = 0; i < n; i++) {
        const dsmoe_adamw_tensor *x = &tensors[i];
        if (x->n > 0 && !(x->param && x->grad && x->m && x->v))
            return dsmoe_cu_fail(env, DSMOE_ERR_INVALID, "%s: tensor %d: NULL param, grad, m or v with n=%zu", op, i,
                                 x->n);
    }
    adamw_batch b;
    b.lr = hp->lr;
    b.beta1 = beta1;
    b.beta2 = beta2;
    b.eps = hp->eps;
    b.grad_scale = hp->grad_scale;
    // As cpu_adamw: in double (beta2^t for t in the thousands loses digits in float), then rounded.
    b.c1 = (float)(1.0 - pow((double)beta1, (double)t));
    b.c2 = (float)(1.0 - pow((double)beta2, (double)t));
    for (int i = 0; i < n;) {
        b.count = 0;
        int blocks = 0;
        for (; i < n && b.count < ADAMW_CHUNK; i++) {
            const dsmoe_adamw_tensor *x = &tensors[i];
            if (x->n == 0)
                continue;
            size_t nb = (x->n + ADAMW_ELEMS_PER_BLOCK - 1) / ADAMW_ELEMS_PER_BLOCK;
            if (nb > ADAMW_MAX_BLOCKS_PER_TENSOR)
                nb = ADAMW_MAX_BLOCKS_PER_TENSOR;
            adamw_entry *e = &b.t[b.count++];
            e->param = x->param;
            e->grad = x->grad;
            e->m = x->m;
            e->v = x->v;
            e->n = x->n;
            e->weight_decay = x->weight_decay;
            e->block0 = blocks;
            e->nblocks = (int)nb;
            blocks += (int)nb;
        }
        if (b.count == 0)
            break; // only empty tensors were left
        dsmoe_cu_launch(adamw_kernel, (unsigned)blocks, ADAMW_THREADS, 0, env->stream, b);
        dsmoe_status st = dsmoe_cu_check_launch(env, op);
        if (st != DSMOE_OK)
            return st;
    }
    return DSMOE_OK;
}
