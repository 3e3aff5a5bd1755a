// bench/bench_dnnl.c: the oneDNN bfloat16 matmuls of the benchmarks' GEMM reference (bench_dnnl.h).
//
// Each matmul has all its sizes and strides fixed when it is made, so oneDNN may pick its brgemm kernels
// (the plugin's own matmuls take run-time sizes and get `gemm:jit`): the best rate the library offers
// on these shapes. Activations are bfloat16 in and out; the weight gradients are float32 with a sum
// post-op (beta 1), as the plugin's gemm_grouped_wgrad accumulates them.
#include <dnnl.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "bench_dnnl.h"

typedef struct mm {
    dnnl_primitive_t prim;
    dnnl_memory_desc_t a, b, c;
} mm;

enum { MM_H, MM_Y, MM_DH, MM_DW2, MM_DW1, MM_DX, N_MM };

struct bench_dnnl_ffn {
    mm mm[N_MM];
};

static dnnl_engine_t engine;
static dnnl_stream_t stream;
static int n_threads = 1;
static const char *impl = "?";

const char *bench_dnnl_start(int threads) {
    n_threads = threads;
    omp_set_num_threads(threads);
    if (dnnl_engine_create(&engine, dnnl_cpu, 0) || dnnl_stream_create(&stream, engine, dnnl_stream_default_flags))
        return "oneDNN: cannot create the CPU engine and stream";
    return NULL;
}

const char *bench_dnnl_impl(void) {
    return impl;
}

void bench_dnnl_version(int *major, int *minor, int *patch) {
    const dnnl_version_t *v = dnnl_version();
    *major = v->major, *minor = v->minor, *patch = v->patch;
}

// A (rows, cols) matrix with leading dimension ld, stored transposed when trans.
static int md2(dnnl_memory_desc_t *md, int rows, int cols, int ld, int trans, dnnl_data_type_t dt) {
    dnnl_dims_t d = {rows, cols}, s = {trans ? 1 : ld, trans ? ld : 1};
    return dnnl_memory_desc_init_by_strides(md, 2, d, dt, s) != dnnl_success;
}

// c (m, n) = op(a) (m, k) op(b) (k, n); wgrad: c float32 += (else bfloat16 =).
static const char *mm_make(mm *r, int m, int n, int k, int ta, int lda, int tb, int ldb, int ldc, int wgrad) {
    if (md2(&r->a, m, k, lda, ta, dnnl_bf16) || md2(&r->b, k, n, ldb, tb, dnnl_bf16) ||
        md2(&r->c, m, n, ldc, 0, wgrad ? dnnl_f32 : dnnl_bf16))
        return "oneDNN: cannot describe the reference matmul's memory";
    dnnl_matmul_desc_t d;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    int bad = dnnl_matmul_desc_init(&d, &r->a, &r->b, NULL, &r->c) || dnnl_primitive_attr_create(&attr) ||
              dnnl_post_ops_create(&po) || (wgrad && dnnl_post_ops_append_sum(po, 1.0f)) ||
              dnnl_primitive_attr_set_post_ops(attr, po) || dnnl_primitive_desc_create(&pd, &d, attr, engine, NULL) ||
              dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) ||
              dnnl_primitive_create(&r->prim, pd);
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    if (po)
        dnnl_post_ops_destroy(po);
    if (attr)
        dnnl_primitive_attr_destroy(attr);
    return bad ? "oneDNN: cannot make the reference matmul" : NULL;
}

const char *bench_dnnl_ffn_make(bench_dnnl_ffn **out, int m, int M, int F) {
    bench_dnnl_ffn *f = calloc(1, sizeof *f);
    if (!f)
        return "out of memory";
    omp_set_num_threads(n_threads); // oneDNN sizes a primitive's work by the threads it sees when made
    const char *e;
    if ((e = mm_make(&f->mm[MM_H], m, F, M, 0, M, 1, M, F, 0)) ||     // h = x W1^T
        (e = mm_make(&f->mm[MM_Y], m, M, F, 0, F, 1, F, M, 0)) ||     // y = h W2^T
        (e = mm_make(&f->mm[MM_DH], m, F, M, 0, M, 0, F, F, 0)) ||    // dh = dy W2
        (e = mm_make(&f->mm[MM_DW2], M, F, m, 1, M, 0, F, F, 1)) ||   // dW2 += dy^T h
        (e = mm_make(&f->mm[MM_DW1], F, M, m, 1, F, 0, M, M, 1)) ||   // dW1 += dh^T x
        (e = mm_make(&f->mm[MM_DX], m, M, F, 0, F, 0, M, M, 0))) {    // dx = dh W1
        bench_dnnl_ffn_free(f);
        return e;
    }
    *out = f;
    return NULL;
}

static const char *mm_run(const mm *r, const void *a, const void *b, void *c) {
    dnnl_memory_t am = NULL, bm = NULL, cm = NULL;
    int bad = dnnl_memory_create(&am, &r->a, engine, (void *)a) || dnnl_memory_create(&bm, &r->b, engine, (void *)b) ||
              dnnl_memory_create(&cm, &r->c, engine, c);
    if (!bad) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
        bad = dnnl_primitive_execute(r->prim, stream, 3, args) || dnnl_stream_wait(stream);
    }
    if (am)
        dnnl_memory_destroy(am);
    if (bm)
        dnnl_memory_destroy(bm);
    if (cm)
        dnnl_memory_destroy(cm);
    return bad ? "oneDNN: the reference matmul failed" : NULL;
}

const char *bench_dnnl_ffn_run(const bench_dnnl_ffn *f, const bench_dnnl_ffn_io *io, int backward) {
    // The kernel plugin sets the OpenMP default around its own oneDNN calls: take ours back.
    omp_set_num_threads(n_threads);
    const char *e;
    if ((e = mm_run(&f->mm[MM_H], io->x, io->w1, io->h)) || (e = mm_run(&f->mm[MM_Y], io->h, io->w2, io->y)))
        return e;
    if (backward &&
        ((e = mm_run(&f->mm[MM_DH], io->dy, io->w2, io->dh)) || (e = mm_run(&f->mm[MM_DW2], io->dy, io->h, io->dw2)) ||
         (e = mm_run(&f->mm[MM_DW1], io->dh, io->x, io->dw1)) || (e = mm_run(&f->mm[MM_DX], io->dh, io->w1, io->dx))))
        return e;
    return NULL;
}

void bench_dnnl_ffn_free(bench_dnnl_ffn *f) {
    if (!f)
        return;
    for (int i = 0; i < N_MM; i++)
        if (f->mm[i].prim)
            dnnl_primitive_destroy(f->mm[i].prim);
    free(f);
}
