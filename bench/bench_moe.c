// bench/bench_moe.c: speed of one MoE layer (core/model/moe_layer.c) on one rank, in float32 or bfloat16,
// against the best GEMM rate at that precision on the same expert shapes, measured in the same run.
//
// usage: dsmoe_bench_moe [--tokens N] [--hidden M] [--ffn F] [--experts E] [--top-k K] [--threads T]
//                        [--passes fwd|fwd+bwd] [--precision fp32|bf16] [--iters n] [--warmup n]
//                        [--balanced 0|1] [--capacity-factor f] [--kernel NAME]
// Defaults: 4096 768 3072 8 1 1 fwd+bwd fp32, 5 iterations after 1 warm-up, balanced router, cf 1.0, cpu.
//
// --precision bf16 makes the layer with dt = DSMOE_BFLOAT16: x, out, dout and dx are bfloat16 device
// buffers, and the expert GEMMs read bfloat16 copies of w1 and w2 (w1_lp, w2_lp, made by the plugin's
// convert from the float32 masters, as the model does once per step for all its weights: that
// conversion is timed apart and is not part of the layer step). Gradients stay float32.
//
// Each iteration times, back to back (so that the machine's load hits all three alike):
//   1. one layer step: dsmoe_moe_forward (+ dsmoe_moe_backward);
//   2. the gating, dispatch and combine members alone on the same data (gate_route, gate_assign,
//      moe_dispatch, moe_combine; with the backward also moe_combine_backward, moe_dispatch_backward,
//      gate_backward; in bf16 also the layer's conversions of the gate input to float32 and of its
//      gradient back, with the axpy into dx): their share of the layer time;
//   3. the plugin's gemm on the expert shapes of the step (per expert, rows = the tokens it kept; the
//      same transposes as the layer: 2 GEMMs forward, 4 more backward; in bf16 bfloat16 operands, the
//      weight gradients float32), one stage after the other (each over all experts, timed on its own,
//      in the layer's order): the plugin's GEMM rate, and per stage what the layer's grouped call of
//      that stage can be held against (--profile 1 times those calls).
// After them the same GEMMs run in the library with its own threading: OpenBLAS cblas_sgemm for fp32
// (a plugin with host memory only), oneDNN matmul as dsmoe_bench_gemm runs it for bf16 (bench_dnnl.c;
// only when built with oneDNN). The reference rate is the faster of the plugin's and the library's.
// The best iteration of each is reported (other jobs on a shared machine only add time), and the
// medians on an earlier line. Useful flops = 2*rows*M*F per expert GEMM over the kept
// rows plus the router GEMMs (2*S*M*E forward, twice that backward). The last line is
//   ms_per_step=<x> gflops=<useful> sgemm_gflops=<y> efficiency=<useful/y>
// where y is the reference GEMM rate at the precision run (the name is kept for scripts).
//
// --balanced 1 (default) routes tokens evenly so the experts run at full useful load: token s has its
// first choice s mod E and its second choice spread over the other experts, written into x's first E
// columns (a bump) and read by a router that is the identity on those columns plus small noise.
// --balanced 0 uses random x and a random router (natural imbalance, some tokens dropped).
#include "bench_args.h" // bench_parse_int, bench_flag_value
#include <cblas.h> // cblas_sgemm, openblas_set_num_threads: the native BLAS reference
#ifdef DSMOE_BENCH_ONEDNN
#include "bench_dnnl.h" // bench_dnnl_start, bench_dnnl_ffn_make, bench_dnnl_ffn_run: the bf16 reference
#endif
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/rng.h"
#include "moe_layer.h"
#include "runtime.h"

// NVTX ranges named "layer" around the timed layer steps (forward + backward), so that a profiler can
// take only those: ncu --nvtx --nvtx-include "layer/" (scripts/gpu-check's kernels step). Header-only;
// with no tool attached a range costs nothing.
#ifdef DSMOE_BENCH_NVTX
#include <nvtx3/nvToolsExt.h>
#define LAYER_RANGE_BEGIN() nvtxRangePushA("layer")
#define LAYER_RANGE_END() nvtxRangePop()
#else
#define LAYER_RANGE_BEGIN() ((void)0)
#define LAYER_RANGE_END() ((void)0)
#endif

typedef struct opts {
    int S, M, F, E, K, threads, bwd, iters, warmup, balanced, profile;
    double cf;
    const char *kernel;
    dsmoe_dtype dt; // --precision: DSMOE_FLOAT32 or DSMOE_BFLOAT16
} opts;

static void usage(FILE *f) {
    fprintf(f, "usage: dsmoe_bench_moe [--tokens N] [--hidden M] [--ffn F] [--experts E] [--top-k K] [--threads T]\n"
               "                       [--passes fwd|fwd+bwd] [--precision fp32|bf16] [--iters n] [--warmup n]\n"
               "                       [--balanced 0|1] [--capacity-factor f] [--kernel NAME] [--profile 0|1]\n"
               "defaults: --tokens 4096 --hidden 768 --ffn 3072 --experts 8 --top-k 1 --threads 1 --passes fwd+bwd\n"
               "          --precision fp32 --iters 5 --warmup 1 --balanced 1 --capacity-factor 1.0 --kernel cpu\n"
               "--precision bf16: bfloat16 activations and expert GEMM operands (float32 accumulation, master\n"
               "weights and gradients); the reference is the best bf16 GEMM rate on the same shapes (the plugin's\n"
               "gemm, oneDNN matmul)\n"
               "--profile 1: after the timed iterations, one more layer step with every kernel op and collective\n"
               "timed (core/plugins/op_profile.h: a wait before and after each), printed by call site\n");
}

static int parse_int(const char *flag, const char *v, int lo, int *out) {
    return bench_parse_int("dsmoe_bench_moe", flag, v, lo, 1000000000, out);
}

static int parse_args(int argc, char **argv, opts *o) {
    *o = (opts){.S = 4096, .M = 768, .F = 3072, .E = 8, .K = 1, .threads = 1, .bwd = 1, .iters = 5, .warmup = 1,
                .balanced = 1, .cf = 1.0, .kernel = "cpu", .dt = DSMOE_FLOAT32};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        }
        const char *v = bench_flag_value("dsmoe_bench_moe", argc, argv, &i);
        if (!v) return -1;
        int rc = 0;
        if (!strcmp(a, "--tokens")) rc = parse_int(a, v, 1, &o->S);
        else if (!strcmp(a, "--hidden")) rc = parse_int(a, v, 1, &o->M);
        else if (!strcmp(a, "--ffn")) rc = parse_int(a, v, 1, &o->F);
        else if (!strcmp(a, "--experts")) rc = parse_int(a, v, 1, &o->E);
        else if (!strcmp(a, "--top-k")) rc = parse_int(a, v, 1, &o->K);
        else if (!strcmp(a, "--threads")) rc = parse_int(a, v, 1, &o->threads);
        else if (!strcmp(a, "--iters")) rc = parse_int(a, v, 1, &o->iters);
        else if (!strcmp(a, "--warmup")) rc = parse_int(a, v, 0, &o->warmup);
        else if (!strcmp(a, "--balanced")) rc = parse_int(a, v, 0, &o->balanced);
        else if (!strcmp(a, "--profile")) rc = parse_int(a, v, 0, &o->profile);
        else if (!strcmp(a, "--kernel")) o->kernel = v;
        else if (!strcmp(a, "--capacity-factor")) {
            char *end;
            o->cf = strtod(v, &end);
            if (*end || !(o->cf > 0)) {
                fprintf(stderr, "dsmoe_bench_moe: --capacity-factor %s: expected a number > 0\n", v);
                return -1;
            }
        } else if (!strcmp(a, "--precision")) {
            if (!strcmp(v, "fp32")) o->dt = DSMOE_FLOAT32;
            else if (!strcmp(v, "bf16")) o->dt = DSMOE_BFLOAT16;
            else {
                fprintf(stderr, "dsmoe_bench_moe: --precision %s: expected fp32 or bf16\n", v);
                return -1;
            }
        } else if (!strcmp(a, "--passes")) {
            if (!strcmp(v, "fwd")) o->bwd = 0;
            else if (!strcmp(v, "fwd+bwd")) o->bwd = 1;
            else {
                fprintf(stderr, "dsmoe_bench_moe: --passes %s: expected fwd or fwd+bwd\n", v);
                return -1;
            }
        } else {
            fprintf(stderr, "dsmoe_bench_moe: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
        if (rc) return -1;
    }
    if (o->K > 2 || o->K > o->E) {
        fprintf(stderr, "dsmoe_bench_moe: --top-k %d: expected 1 or 2, at most --experts\n", o->K);
        return -1;
    }
    if (o->balanced && o->E > o->M) {
        fprintf(stderr, "dsmoe_bench_moe: --balanced 1 needs --experts <= --hidden\n");
        return -1;
    }
    return 0;
}

// ----------------------------------------------------------------------------------------------------
// kernel memory helpers (the bench exits on failure, naming the call)

static dsmoe_runtime rt;
static dsmoe_kernel_queue *kq; // rt.q, the compute queue: every kernel call of this bench runs on it
#define F32 DSMOE_FLOAT32

static void die(const char *what, const char *msg) {
    fprintf(stderr, "dsmoe_bench_moe: %s: %s\n", what, msg);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

#define KCHECK(call)                                                                               \
    do {                                                                                           \
        if ((call) != DSMOE_OK) die(#call, rt.kern->last_error(rt.kctx));                          \
    } while (0)

static void *dev_alloc(size_t bytes) {
    void *p = NULL;
    KCHECK(rt.kern->alloc(rt.kctx, bytes, 0, &p));
    return p;
}

// Uniform in [-a, a), from (key, index).
static float *dev_uniform(size_t n, uint64_t key, float a) {
    float *h = malloc(n * sizeof(float));
    if (!h) die("malloc", "out of memory");
    for (size_t i = 0; i < n; i++) h[i] = a * (2.0f * dsmoe_rng_uniform(key, i) - 1.0f);
    float *d = dev_alloc(n * sizeof(float));
    KCHECK(rt.kern->copy_to_device(rt.kctx, kq, d, h, n * sizeof(float)));
    free(h);
    return d;
}

// The n float32 values of src as dt: src itself for float32, else a new buffer rounded by the plugin's
// convert (src is freed).
static void *dev_as(float *src, size_t n, dsmoe_dtype dt) {
    if (dt == F32) return src;
    void *d = dev_alloc(n * dsmoe_dtype_size(dt));
    KCHECK(rt.kern->convert(rt.kctx, kq, d, dt, src, F32, n));
    KCHECK(rt.kern->synchronize(rt.kctx));
    rt.kern->free(rt.kctx, src);
    return d;
}

// x (S, M) of o->dt; the float32 weights, and in bf16 room for their bfloat16 copies (convert_weights).
static void make_inputs(const opts *o, void **x, dsmoe_moe_weights *w) {
    size_t S = o->S, M = o->M, F = o->F, E = o->E;
    float *hx = malloc(S * M * sizeof(float)), *hg = malloc(E * M * sizeof(float));
    if (!hx || !hg) die("malloc", "out of memory");
    for (size_t i = 0; i < S * M; i++) hx[i] = 2.0f * dsmoe_rng_uniform(11, i) - 1.0f;
    float ga = o->balanced ? 0.01f : 3.0f / sqrtf((float)M);
    for (size_t i = 0; i < E * M; i++) hg[i] = ga * (2.0f * dsmoe_rng_uniform(12, i) - 1.0f);
    if (o->balanced) {
        for (size_t e = 0; e < E; e++) hg[e * M + e] += 1.0f;
        for (size_t s = 0; s < S; s++) {
            size_t e1 = s % E, e2 = E > 1 ? (e1 + 1 + (s / E) % (E - 1)) % E : e1;
            for (size_t e = 0; e < E; e++) hx[s * M + e] *= 0.1f;
            hx[s * M + e1] += 4.0f;
            if (o->K == 2) hx[s * M + e2] += 2.0f;
        }
    }
    float *x32 = dev_alloc(S * M * sizeof(float));
    w->wg = dev_alloc(E * M * sizeof(float));
    KCHECK(rt.kern->copy_to_device(rt.kctx, kq, x32, hx, S * M * sizeof(float)));
    KCHECK(rt.kern->copy_to_device(rt.kctx, kq, w->wg, hg, E * M * sizeof(float)));
    free(hx);
    free(hg);
    *x = dev_as(x32, S * M, o->dt); // the routing bumps (+4, +2) are exact in bfloat16 too
    w->w1 = dev_uniform(E * F * M, 13, 1.0f / sqrtf((float)M));
    w->b1 = dev_uniform(E * F, 14, 0.1f);
    w->w2 = dev_uniform(E * M * F, 15, 1.0f / sqrtf((float)F));
    w->b2 = dev_uniform(E * M, 16, 0.1f);
    w->w1_lp = w->w2_lp = NULL;
    if (o->dt != F32) {
        w->w1_lp = dev_alloc(E * F * M * dsmoe_dtype_size(o->dt));
        w->w2_lp = dev_alloc(E * M * F * dsmoe_dtype_size(o->dt));
    }
}

static double now_synced(void) {
    KCHECK(rt.kern->synchronize(rt.kctx));
    return dsmoe_now_seconds();
}

// bf16: w1_lp, w2_lp = w1, w2 rounded to bfloat16 (what the model does for every weight once per step,
// outside the layer). Returns its seconds.
static double convert_weights(const opts *o, dsmoe_moe_weights *w) {
    size_t n = (size_t)o->E * o->F * o->M;
    double t0 = now_synced();
    KCHECK(rt.kern->convert(rt.kctx, kq, (void *)w->w1_lp, o->dt, w->w1, F32, n));
    KCHECK(rt.kern->convert(rt.kctx, kq, (void *)w->w2_lp, o->dt, w->w2, F32, n));
    return now_synced() - t0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// ----------------------------------------------------------------------------------------------------
// the gating share: the gating, dispatch and combine members alone, on the layer's data

typedef struct gate_bench {
    dsmoe_gating_params gp;
    int C;
    dsmoe_dtype dt;                                      // the activations' type (o->dt)
    float *logits, *probs, *weight, *dweight, *dlogits; // (S, E), (S, E), (S, K), (S, K), (S, E)
    int32_t *choice, *slot;                              // (S, K)
    void *buf, *y, *dy;                                  // (E, C, M) of dt
    void *out, *dout, *dx;                               // (S, M) of dt
    float *xg32, *dxg;                                   // (S, M) bf16 only: gate input widened, its gradient
    void *dxg_lp;                                        // (S, M) bf16 only: dxg narrowed to bfloat16
    int32_t *counts, *kept;                              // (E), device
    double *aux_sums;                                    // (2E + 1), device: l_aux's sums
} gate_bench;

static void gate_bench_init(gate_bench *g, const opts *o, const void *x, const float *wg, int C) {
    size_t S = o->S, M = o->M, E = o->E, K = o->K, rows = E * (size_t)C, es = dsmoe_dtype_size(o->dt);
    g->gp = (dsmoe_gating_params){.S = o->S, .E = o->E, .K = o->K, .noise = DSMOE_NOISE_NONE,
                                  .random_selection = 0, .training = 1, .seed = 1, .token_offset = 0};
    g->C = C;
    g->dt = o->dt;
    g->logits = dev_alloc(S * E * sizeof(float));
    g->probs = dev_alloc(S * E * sizeof(float));
    g->dlogits = dev_alloc(S * E * sizeof(float));
    g->weight = dev_alloc(S * K * sizeof(float));
    g->dweight = dev_alloc(S * K * sizeof(float));
    g->choice = dev_alloc(S * K * sizeof(int32_t));
    g->slot = dev_alloc(S * K * sizeof(int32_t));
    g->buf = dev_alloc(rows * M * es);
    g->y = dev_as(dev_uniform(rows * M, 21, 1.0f), rows * M, o->dt);
    g->dy = dev_alloc(rows * M * es);
    g->out = dev_alloc(S * M * es);
    g->dout = dev_as(dev_uniform(S * M, 22, 1.0f), S * M, o->dt);
    g->dx = dev_alloc(S * M * es);
    g->counts = dev_alloc(E * sizeof(int32_t));
    g->kept = dev_alloc(E * sizeof(int32_t));
    g->aux_sums = dev_alloc((2 * E + 1) * sizeof(double));
    const float *xg = x;
    g->xg32 = g->dxg = NULL;
    g->dxg_lp = NULL;
    if (o->dt != F32) {
        g->xg32 = dev_alloc(S * M * sizeof(float));
        g->dxg = dev_uniform(S * M, 23, 0.01f);
        g->dxg_lp = dev_alloc(S * M * es);
        KCHECK(rt.kern->convert(rt.kctx, kq, g->xg32, F32, x, o->dt, S * M));
        xg = g->xg32;
    }
    KCHECK(rt.kern->gemm(rt.kctx, kq, 0, 1, o->S, o->E, o->M, 1.0f, xg, F32, o->M, wg, F32, o->M, 0.0f, g->logits, F32,
                         o->E));
}

static double gate_bench_run(gate_bench *g, const opts *o, const void *x) {
    int S = o->S, M = o->M, E = o->E, K = o->K, C = g->C;
    const dsmoe_dtype dt = g->dt;
    const float daux = 0.01f; // the l_aux weight; gate_backward forms its gradient from aux_sums
    double t0 = now_synced();
    // bf16: the layer widens the gate input before the router GEMM
    if (dt != F32) KCHECK(rt.kern->convert(rt.kctx, kq, g->xg32, F32, x, dt, (size_t)S * M));
    KCHECK(rt.kern->gate_route(rt.kctx, kq, &g->gp, g->logits, g->probs, g->choice, g->counts));
    KCHECK(rt.kern->gate_assign(rt.kctx, kq, &g->gp, C, g->probs, g->choice, g->slot, g->weight, g->kept,
                                g->aux_sums));
    KCHECK(rt.kern->moe_dispatch(rt.kctx, kq, g->buf, x, dt, g->choice, g->slot, S, K, E, C, M));
    KCHECK(rt.kern->moe_combine(rt.kctx, kq, g->out, g->y, dt, g->choice, g->slot, g->weight, S, K, E, C, M));
    if (o->bwd) {
        KCHECK(rt.kern->moe_combine_backward(rt.kctx, kq, g->dy, g->dweight, g->dout, g->y, dt, g->choice, g->slot,
                                             g->weight, S, K, E, C, M));
        KCHECK(rt.kern->moe_dispatch_backward(rt.kctx, kq, g->dx, g->dy, dt, g->choice, g->slot, S, K, E, C, M));
        KCHECK(rt.kern->zero(rt.kctx, kq, g->dlogits, (size_t)S * E * sizeof(float)));
        KCHECK(rt.kern->gate_backward(rt.kctx, kq, &g->gp, g->dlogits, g->probs, g->choice, g->slot, g->dweight,
                                      g->aux_sums, daux));
        // bf16: the router's input gradient (float32) is narrowed once and added to dx
        if (dt != F32) {
            KCHECK(rt.kern->convert(rt.kctx, kq, g->dxg_lp, dt, g->dxg, F32, (size_t)S * M));
            KCHECK(rt.kern->axpy(rt.kctx, kq, g->dx, 1.0f, g->dxg_lp, dt, (size_t)S * M));
        }
    }
    return now_synced() - t0;
}

// --profile 1: one more layer step with every kernel op and collective timed (op_profile.h), by call site.
static void profile_step(const opts *o, dsmoe_moe_layer *layer, const dsmoe_moe_weights *w, dsmoe_moe_weights *g,
                         const void *x, void *out, const void *dout, void *dx, dsmoe_moe_step *step,
                         dsmoe_moe_stats *st) {
    dsmoe_err err = {0};
    dsmoe_op_profile *prof;
    if (dsmoe_prof_create(&prof, &err) != DSMOE_OK) die("profile", err.msg);
    rt.prof = prof;
    if (dsmoe_prof_record(&rt, 1, &err) != DSMOE_OK) die("profile", err.msg);
    if (dsmoe_moe_forward(layer, w, x, out, step, st, &err) != DSMOE_OK) die("forward", err.msg);
    if (o->bwd && dsmoe_moe_backward(layer, w, g, dout, dx, 0.01f, &err) != DSMOE_OK) die("backward", err.msg);
    if (dsmoe_prof_record(&rt, 0, &err) != DSMOE_OK) die("profile", err.msg);
    rt.prof = NULL;
    dsmoe_prof_table *t;
    if (dsmoe_prof_gather(prof, rt.world_ctl, &t, &err) != DSMOE_OK) die("profile", err.msg);
    dsmoe_prof_print(t, stdout, "profile of one layer step (a wait before and after each call)", 1, 0);
    dsmoe_prof_table_free(t);
    dsmoe_prof_free(prof);
}

// ----------------------------------------------------------------------------------------------------
// the GEMM references: the expert GEMMs of the step, one plain gemm call each

typedef struct gemm_bench {
    dsmoe_dtype dt;               // operands' type (o->dt); the weight gradients are float32
    void *a, *h, *y;              // (R, M), (R, F), (R, M); R = max rows of an expert
    float *dw1, *dw2;             // (F, M), (M, F)
} gemm_bench;

// Expert e's weights as GEMM operands: the float32 masters, or their bfloat16 copies.
static const void *expert_w(const gemm_bench *b, const void *w32, const void *w_lp, size_t e, size_t FM) {
    return b->dt == F32 ? (const char *)w32 + e * FM * sizeof(float)
                        : (const char *)w_lp + e * FM * dsmoe_dtype_size(b->dt);
}

// The layer's expert GEMMs in its order, each stage over all experts and timed on its own (stage[s]
// seconds): forward fc1 (h = x w1^T), fc2 (y = act w2^T); backward fc2's weight gradient (dw2 += dy^T
// act), its data gradient (da = dy w2), fc1's weight gradient (dw1 += dh^T x) and data gradient (dx =
// dh w1). Returns the sum.
enum { STAGES = 6 };
static const char *const stage_name[STAGES] = {"fc1", "fc2", "fc2 weight grad", "fc2 data grad", "fc1 weight grad",
                                                "fc1 data grad"};

static double gemm_bench_run(gemm_bench *b, const opts *o, const dsmoe_moe_weights *w, const int *rows,
                             double stage[STAGES]) {
    int M = o->M, F = o->F;
    size_t FM = (size_t)F * M;
    const dsmoe_dtype dt = b->dt;
    double total = 0;
    for (int s = 0; s < STAGES; s++) {
        stage[s] = 0;
        if (s >= 2 && !o->bwd) continue;
        double t0 = now_synced();
        for (int e = 0; e < o->E; e++) {
            int m = rows[e];
            if (!m) continue;
            const void *w1 = expert_w(b, w->w1, w->w1_lp, e, FM), *w2 = expert_w(b, w->w2, w->w2_lp, e, FM);
            switch (s) {
            case 0: KCHECK(rt.kern->gemm(rt.kctx, kq, 0, 1, m, F, M, 1.0f, b->a, dt, M, w1, dt, M, 0.0f, b->h, dt, F)); break;
            case 1: KCHECK(rt.kern->gemm(rt.kctx, kq, 0, 1, m, M, F, 1.0f, b->h, dt, F, w2, dt, F, 0.0f, b->y, dt, M)); break;
            case 2: KCHECK(rt.kern->gemm(rt.kctx, kq, 1, 0, M, F, m, 1.0f, b->y, dt, M, b->h, dt, F, 1.0f, b->dw2, F32, F)); break;
            case 3: KCHECK(rt.kern->gemm(rt.kctx, kq, 0, 0, m, F, M, 1.0f, b->y, dt, M, w2, dt, F, 0.0f, b->h, dt, F)); break;
            case 4: KCHECK(rt.kern->gemm(rt.kctx, kq, 1, 0, F, M, m, 1.0f, b->h, dt, F, b->a, dt, M, 1.0f, b->dw1, F32, M)); break;
            default: KCHECK(rt.kern->gemm(rt.kctx, kq, 0, 0, m, M, F, 1.0f, b->h, dt, F, w1, dt, M, 0.0f, b->y, dt, M)); break;
            }
        }
        stage[s] = now_synced() - t0;
        total += stage[s];
    }
    return total;
}

// The same GEMMs through the BLAS library directly, with its own threading (host buffers: only for a
// plugin whose memory is host memory, DSMOE_KCAP_HOST_MEMORY). The efficiency is against the faster of
// the two references.
static double native_bench_run(gemm_bench *b, const opts *o, const dsmoe_moe_weights *w, const int *rows) {
    int M = o->M, F = o->F;
    size_t FM = (size_t)F * M;
    float *a = b->a, *h = b->h, *y = b->y;
    double t0 = now_synced();
    for (int e = 0; e < o->E; e++) {
        int m = rows[e];
        if (!m) continue;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, F, M, 1.0f, a, M, w->w1 + e * FM, M, 0.0f, h, F);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, M, F, 1.0f, h, F, w->w2 + e * FM, F, 0.0f, y, M);
        if (!o->bwd) continue;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, F, M, 1.0f, y, M, w->w2 + e * FM, F, 0.0f, h, F);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, M, F, m, 1.0f, y, M, h, F, 1.0f, b->dw2, F);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, F, M, m, 1.0f, h, F, a, M, 1.0f, b->dw1, M);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, M, F, 1.0f, h, F, w->w1 + e * FM, M, 0.0f, y, M);
    }
    return now_synced() - t0;
}

#ifdef DSMOE_BENCH_ONEDNN
// bf16: the same GEMMs as oneDNN matmuls with oneDNN's own threading (bench_dnnl.c, as dsmoe_bench_gemm
// measures them): one set of matmuls per distinct row count, shared by the experts that have it.
static bench_dnnl_ffn **dnnl_sets; // (E); NULL where an expert kept no rows

static void dnnl_bench_init(const opts *o, const int *rows) {
    const char *msg = bench_dnnl_start(o->threads);
    dnnl_sets = calloc((size_t)o->E, sizeof *dnnl_sets);
    if (!dnnl_sets) die("malloc", "out of memory");
    for (int e = 0; !msg && e < o->E; e++) {
        for (int f = 0; f < e && !dnnl_sets[e]; f++)
            if (rows[f] == rows[e]) dnnl_sets[e] = dnnl_sets[f];
        if (rows[e] && !dnnl_sets[e]) msg = bench_dnnl_ffn_make(&dnnl_sets[e], rows[e], o->M, o->F);
    }
    if (msg) die("bf16 reference", msg);
}

static double dnnl_bench_run(gemm_bench *b, const opts *o, const dsmoe_moe_weights *w, const int *rows) {
    size_t FM = (size_t)o->F * o->M;
    double t0 = now_synced();
    for (int e = 0; e < o->E; e++) {
        if (!rows[e]) continue;
        bench_dnnl_ffn_io io = {.x = b->a, .w1 = expert_w(b, w->w1, w->w1_lp, e, FM),
                                .w2 = expert_w(b, w->w2, w->w2_lp, e, FM), .h = b->h, .y = b->y, .dy = b->y,
                                .dh = b->h, .dx = b->y, .dw1 = b->dw1, .dw2 = b->dw2};
        const char *msg = bench_dnnl_ffn_run(dnnl_sets[e], &io, o->bwd);
        if (msg) die("bf16 reference", msg);
    }
    return now_synced() - t0;
}
#endif

// ----------------------------------------------------------------------------------------------------

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    opts o;
    if (parse_args(argc, argv, &o)) {
        MPI_Finalize();
        return 2;
    }
    dsmoe_err err = {0};
    if (dsmoe_runtime_open(o.kernel, "mpi", "", o.threads, &rt, &err) != DSMOE_OK) die("runtime", err.msg);
    if (rt.world_size != 1) die("setup", "runs on one rank (start it without mpirun, or with -n 1)");
    kq = rt.q; // the core's compute queue (the plugin's default queue)
    printf("kernel: %s (%s)\n", rt.kern->describe(rt.kctx), rt.kernel_handle.path);
    const int bf16 = o.dt != F32;
    if (bf16 && (!(rt.kern->dtypes & DSMOE_DTYPE_BIT(o.dt)) || !rt.kern->convert))
        die("setup", "--precision bf16: the kernel plugin has no bfloat16 (or no convert)");
    const char *gname = bf16 ? "bf16 gemm" : "sgemm"; // the reference GEMMs in the lines below

    size_t S = o.S, M = o.M, F = o.F, E = o.E, es = dsmoe_dtype_size(o.dt);
    void *x;
    dsmoe_moe_weights w, g = {0};
    make_inputs(&o, &x, &w);
    g.wg = dev_alloc(E * M * sizeof(float));
    g.w1 = dev_alloc(E * F * M * sizeof(float));
    g.b1 = dev_alloc(E * F * sizeof(float));
    g.w2 = dev_alloc(E * M * F * sizeof(float));
    g.b2 = dev_alloc(E * M * sizeof(float));
    void *out = dev_alloc(S * M * es), *dx = dev_alloc(S * M * es);
    void *dout = dev_as(dev_uniform(S * M, 31, 1.0f), S * M, o.dt);
    if (bf16) convert_weights(&o, &w);

    dsmoe_moe_config cfg = {.S = o.S, .M = o.M, .F = o.F, .E = o.E, .K = o.K, .capacity_factor = (float)o.cf,
                            .eval_capacity_factor = (float)o.cf, .min_capacity = 4, .drop_tokens = 1,
                            .random_token_selection = 0, .noise = DSMOE_NOISE_NONE, .jitter_eps = 0.0f,
                            .ep = 1, .ep_group = rt.world, .ep_ctl = rt.world_ctl, .dt = o.dt};
    dsmoe_moe_layer *layer = NULL;
    if (dsmoe_moe_layer_create(&rt, &cfg, &layer, &err) != DSMOE_OK) die("layer", err.msg);
    dsmoe_moe_step step = {.training = 1, .seed = 7, .token_offset = 0};
    dsmoe_moe_stats st;

    // One step to learn the capacity and the kept rows per expert (the data is the same every step).
    if (dsmoe_moe_forward(layer, &w, x, out, &step, &st, &err) != DSMOE_OK) die("forward", err.msg);
    int *rows = calloc(E, sizeof(int)), rmax = 0, rmin = o.S * o.K;
    long kept = 0;
    for (size_t e = 0; e < E; e++) {
        rows[e] = st.expert_load[e];
        kept += rows[e];
        rmax = rows[e] > rmax ? rows[e] : rmax;
        rmin = rows[e] < rmin ? rows[e] : rmin;
    }
    printf("shape: S=%d M=%d F=%d E=%d K=%d C=%d threads=%d passes=%s balanced=%d%s: kept %ld of %ld choices, "
           "rows per expert %d..%d\n",
           o.S, o.M, o.F, o.E, o.K, st.capacity, o.threads, o.bwd ? "fwd+bwd" : "fwd", o.balanced,
           bf16 ? " precision=bf16" : "", kept, st.routed, rmin, rmax);
    gate_bench gb;
    gate_bench_init(&gb, &o, x, w.wg, st.capacity);
    gemm_bench sb = {.dt = o.dt, .a = dev_as(dev_uniform((size_t)rmax * M, 41, 1.0f), (size_t)rmax * M, o.dt),
                     .h = dev_alloc((size_t)rmax * F * es), .y = dev_alloc((size_t)rmax * M * es),
                     .dw1 = dev_alloc(F * M * sizeof(float)), .dw2 = dev_alloc(M * F * sizeof(float))};

    double expert_flops = (o.bwd ? 6.0 : 2.0) * 2.0 * (double)kept * M * F;
    double router_flops = (o.bwd ? 3.0 : 1.0) * 2.0 * (double)S * M * E;
    double *t_layer = calloc(o.iters, sizeof(double)), *t_gate = calloc(o.iters, sizeof(double)),
           *t_gemm = calloc(o.iters, sizeof(double));
    double stage_best[STAGES] = {0}; // each reference stage's best iteration
    double t_conv = INFINITY; // bf16: best weight conversion
    for (int it = -o.warmup; it < o.iters; it++) {
        double tc = bf16 ? convert_weights(&o, &w) : 0.0;
        double t0 = now_synced();
        LAYER_RANGE_BEGIN();
        if (dsmoe_moe_forward(layer, &w, x, out, &step, &st, &err) != DSMOE_OK) die("forward", err.msg);
        if (o.bwd && dsmoe_moe_backward(layer, &w, &g, dout, dx, 0.01f, &err) != DSMOE_OK) die("backward", err.msg);
        double tl = now_synced() - t0;
        LAYER_RANGE_END();
        double tg = gate_bench_run(&gb, &o, x);
        double stage[STAGES];
        double ts = gemm_bench_run(&sb, &o, &w, rows, stage);
        if (it < 0) continue;
        t_layer[it] = tl;
        t_gate[it] = tg;
        t_gemm[it] = ts;
        for (int k = 0; k < STAGES; k++)
            if (it == 0 || stage[k] < stage_best[k]) stage_best[k] = stage[k];
        if (tc < t_conv) t_conv = tc;
        printf("iter %d: layer %.2f ms, gating+dispatch+combine %.2f ms, expert %s %.2f ms", it, tl * 1e3, tg * 1e3,
               gname, ts * 1e3);
        if (bf16) printf(", weight conversion %.2f ms (not in the layer)", tc * 1e3);
        printf("\n");
    }
    // Other jobs on a shared machine only ever add time: the best iteration of each measurement is
    // the stable figure (the medians are printed too).
    double ml = median(t_layer, o.iters), mg = median(t_gate, o.iters), ms = median(t_gemm, o.iters);
    double tl = t_layer[0], tg = t_gate[0], ts = t_gemm[0]; // sorted by median()
    double flops = expert_flops + router_flops;
    // The library reference last, after every layer iteration: its own thread pool must not disturb the
    // layer. fp32: OpenBLAS; bf16: oneDNN (when built with it).
    double tn = INFINITY;
    const char *lib = NULL;
    if ((rt.kern->caps & DSMOE_KCAP_HOST_MEMORY) && !bf16) {
        openblas_set_num_threads(o.threads);
        for (int it = -o.warmup; it < o.iters; it++) {
            double t = native_bench_run(&sb, &o, &w, rows);
            if (it >= 0 && t < tn) tn = t;
        }
        openblas_set_num_threads(1);
        lib = "native BLAS sgemm";
    }
#ifdef DSMOE_BENCH_ONEDNN
    if ((rt.kern->caps & DSMOE_KCAP_HOST_MEMORY) && bf16) {
        dnnl_bench_init(&o, rows);
        for (int it = -o.warmup; it < o.iters; it++) {
            double t = dnnl_bench_run(&sb, &o, &w, rows);
            if (it >= 0 && t < tn) tn = t;
        }
        int major, minor, patch;
        bench_dnnl_version(&major, &minor, &patch);
        printf("bf16 library reference: oneDNN %d.%d.%d matmul '%s'\n", major, minor, patch, bench_dnnl_impl());
        lib = "oneDNN bf16 matmul";
    }
#endif
    if (lib) {
        printf("best of %d: %s (%d threads) on the same GEMMs %.2f ms = %.1f GFLOP/s; through the "
               "plugin %.2f ms = %.1f GFLOP/s\n", o.iters, lib, o.threads, tn * 1e3, expert_flops / tn * 1e-9,
               ts * 1e3, expert_flops / ts * 1e-9);
        if (tn < ts) ts = tn;
    } else if (bf16) {
        printf("bf16: no library reference (needs oneDNN at build time and a plugin with host memory): the "
               "reference is the plugin's gemm alone\n");
    }
    printf("best of %d: expert %s by stage (each over all experts, the layer's order):", o.iters, gname);
    for (int k = 0; k < (o.bwd ? STAGES : 2); k++) printf("%s %s %.2f ms", k ? "," : "", stage_name[k], stage_best[k] * 1e3);
    printf("\n");
    if (o.profile) profile_step(&o, layer, &w, &g, x, out, dout, dx, &step, &st);
    printf("medians of %d: layer %.2f ms, gating+dispatch+combine %.2f ms (%.1f%%), expert %s %.2f ms, "
           "efficiency %.3f\n",
           o.iters, ml * 1e3, mg * 1e3, 100.0 * mg / ml, gname, ms * 1e3, (flops / ml) / (expert_flops / ms));
    printf("best of %d: gating+dispatch+combine %.2f ms = %.1f%% of the layer time; expert %s alone %.2f ms; "
           "layer beyond it %.2f ms (%.1f%%)\n",
           o.iters, tg * 1e3, 100.0 * tg / tl, gname, ts * 1e3, (tl - ts) * 1e3, 100.0 * (tl - ts) / tl);
    if (bf16)
        printf("best of %d: weight conversion to bfloat16 %.2f ms (%.1f%% of the layer step; the model's, not the "
               "layer's)\n", o.iters, t_conv * 1e3, 100.0 * t_conv / tl);
    printf("ms_per_step=%.2f gflops=%.1f sgemm_gflops=%.1f efficiency=%.3f\n", tl * 1e3, flops / tl * 1e-9,
           expert_flops / ts * 1e-9, (flops / tl) / (expert_flops / ts));
    fflush(stdout);

    dsmoe_moe_layer_free(layer);
    // The process ends here: the runtime's plugins and buffers go with it.
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return 0;
}
