// bench/bench_dnnl.h: the bfloat16 GEMM reference the benchmarks share (dsmoe_bench_gemm, dsmoe_bench_moe):
// the six GEMMs of one MoE expert FFN step, each a oneDNN matmul with every size fixed when it is made
// (oneDNN then picks its brgemm kernels), run with oneDNN's own OpenMP threading on `threads` threads.
// Built only when the cpu plugin has oneDNN (DSMOE_BENCH_ONEDNN); without it there is no bf16 reference.
// defines: bench_dnnl_ffn, bench_dnnl_ffn_io, bench_dnnl_start, bench_dnnl_impl, bench_dnnl_version,
//          bench_dnnl_ffn_make, bench_dnnl_ffn_run, bench_dnnl_ffn_free
//
// Every function returns NULL on success, else a message for the caller to print before it exits
// (benchmarks stop at the first failure).
#ifndef DSMOE_BENCH_DNNL_H
#define DSMOE_BENCH_DNNL_H

// The six matmuls of one expert with m rows (opaque: the header needs no dnnl.h).
typedef struct bench_dnnl_ffn bench_dnnl_ffn;

// One expert's tensors, row-major, bfloat16 (uint16 bits) except the weight gradients. Outputs may
// alias inputs of a later matmul (bench_moe reuses its buffers so: dy = y, dh = h, dx = y).
typedef struct bench_dnnl_ffn_io {
    const void *x, *w1, *w2; // (m, M), (F, M), (M, F)
    void *h, *y;             // (m, F) = x w1^T, (m, M) = h w2^T
    const void *dy;          // (m, M)
    void *dh, *dx;           // (m, F) = dy w2, (m, M) = dh w1
    float *dw1, *dw2;        // (F, M) += dh^T x, (M, F) += dy^T h
} bench_dnnl_ffn_io;

// The CPU engine and a stream; the matmuls made after it and every run use `threads` OpenMP threads.
const char *bench_dnnl_start(int threads);
// oneDNN's implementation name of the last matmul made ("brg:avx512_core_bf16", ...), and its version.
const char *bench_dnnl_impl(void);
void bench_dnnl_version(int *major, int *minor, int *patch);

// *f = the six matmuls for m rows, hidden M, ffn F (m, M, F >= 1).
const char *bench_dnnl_ffn_make(bench_dnnl_ffn **f, int m, int M, int F);
// In the order of a training step: h, y, then with backward dh, dw2, dw1, dx (each waits for the stream;
// io's backward members are unused without it).
const char *bench_dnnl_ffn_run(const bench_dnnl_ffn *f, const bench_dnnl_ffn_io *io, int backward);
void bench_dnnl_ffn_free(bench_dnnl_ffn *f); // NULL is fine

#endif
