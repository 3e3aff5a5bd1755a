// bench/bench_gemm.c: the cpu kernel plugin's grouped GEMM stages of an MoE expert FFN, forward and
// backward, in float32 and bfloat16, against the best library rate on the same shapes in the same run.
//
// usage: dsmoe_bench_gemm [--threads T] [--tokens N] [--hidden M] [--ffn F] [--experts E]
//                         [--precision fp32|bf16|both] [--reps n] [--warmup n] [--plugin FILE]
// Defaults: W1 = 4096 tokens, 768 -> 3072 -> 768, 8 experts (top-1, balanced: 512 rows each), 1 thread,
// both precisions, 5 reps after 1 warm-up, the build tree's libdsmoe_kernel_cpu.so.
//
// One step, through the plugin's table (dlopen, as the core loads it; every call synchronous):
//   convert  (bf16 only) the float32 master weights W1, W2 to bfloat16 copies (mixed-precision training
//            does this every step)
//   fc1      h = gelu(x W1^T + b1), aux = the pre-activation   gemm_grouped, BIAS_GELU
//   fc2      y = h W2^T + b2                                   gemm_grouped, BIAS
//   fc2.dx   dh = (dy W2) * gelu'(aux)                         gemm_grouped, DGELU
//   fc2.dw   dW2 += dy^T h, db2 += sum dy                      gemm_grouped_wgrad
//   fc1.dw   dW1 += dh^T x, db1 += sum dh                      gemm_grouped_wgrad
//   fc1.dx   dx = dh W1                                        gemm_grouped
// Activations are of the precision's type, weight gradients float32. The reference runs the six GEMMs
// per expert (no epilogues) straight in the library with its own threading on --threads threads:
// OpenBLAS cblas_sgemm for fp32, oneDNN matmul (its brgemm kernels; activations bf16, weight gradients
// float32 with beta 1; bench_dnnl.c, shared with dsmoe_bench_moe) for bf16. Each rep runs fp32 step,
// bf16 step, then the references, back to back, so that the machine's load hits all alike; the best rep
// of each is reported (other jobs only ever add time). GEMM flops = 6 * 2 * tokens * M * F. The last line is
//   precision=<p> ms_per_step=<x> gflops=<y> ref_gflops=<z> efficiency=<y/z> bf16_over_fp32=<ratio>
// (the ratio of the bf16 step to the fp32 step; nan unless both ran). With --precision both the fp32
// line comes first.
#include "bench_args.h" // bench_parse_int, bench_flag_value
#include <cblas.h> // cblas_sgemm, openblas_set_num_threads: the float32 reference
#include <dlfcn.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef DSMOE_BENCH_ONEDNN
#include "bench_dnnl.h" // bench_dnnl_start, bench_dnnl_ffn_make, bench_dnnl_ffn_run: the bf16 reference
#endif

#include "dsmoe/kernel_plugin.h"

typedef struct opts {
    int threads, S, M, F, E, reps, warmup, fp32, bf16;
    const char *plugin;
} opts;

static const dsmoe_kernel_plugin_v3 *P;
static dsmoe_kernel_ctx *K;
static dsmoe_kernel_queue *Q;

static void die(const char *what, const char *msg) {
    fprintf(stderr, "dsmoe_bench_gemm: %s: %s\n", what, msg);
    exit(1);
}

#define KCHECK(call)                                                                               \
    do {                                                                                           \
        if ((call) != DSMOE_OK)                                                                    \
            die(#call, P->last_error(K));                                                          \
    } while (0)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void usage(FILE *f) {
    fprintf(f, "usage: dsmoe_bench_gemm [--threads T] [--tokens N] [--hidden M] [--ffn F] [--experts E]\n"
               "                        [--precision fp32|bf16|both] [--reps n] [--warmup n] [--plugin FILE]\n"
               "defaults: --threads 1 --tokens 4096 --hidden 768 --ffn 3072 --experts 8 --precision both --reps 5\n"
               "          --warmup 1 --plugin %s/libdsmoe_kernel_cpu.so\n",
            DSMOE_BENCH_PLUGIN_DIR);
}

static int parse_int(const char *flag, const char *v, int lo, int *out) {
    return bench_parse_int("dsmoe_bench_gemm", flag, v, lo, 1000000000, out);
}

static int parse_args(int argc, char **argv, opts *o) {
    *o = (opts){.threads = 1, .S = 4096, .M = 768, .F = 3072, .E = 8, .reps = 5, .warmup = 1, .fp32 = 1, .bf16 = 1,
                .plugin = DSMOE_BENCH_PLUGIN_DIR "/libdsmoe_kernel_cpu.so"};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        }
        const char *v = bench_flag_value("dsmoe_bench_gemm", argc, argv, &i);
        if (!v) return -1;
        int rc = 0;
        if (!strcmp(a, "--threads")) rc = parse_int(a, v, 1, &o->threads);
        else if (!strcmp(a, "--tokens")) rc = parse_int(a, v, 1, &o->S);
        else if (!strcmp(a, "--hidden")) rc = parse_int(a, v, 1, &o->M);
        else if (!strcmp(a, "--ffn")) rc = parse_int(a, v, 1, &o->F);
        else if (!strcmp(a, "--experts")) rc = parse_int(a, v, 1, &o->E);
        else if (!strcmp(a, "--reps")) rc = parse_int(a, v, 1, &o->reps);
        else if (!strcmp(a, "--warmup")) rc = parse_int(a, v, 0, &o->warmup);
        else if (!strcmp(a, "--plugin")) o->plugin = v;
        else if (!strcmp(a, "--precision")) {
            o->fp32 = !strcmp(v, "fp32") || !strcmp(v, "both");
            o->bf16 = !strcmp(v, "bf16") || !strcmp(v, "both");
            if (!o->fp32 && !o->bf16) {
                fprintf(stderr, "dsmoe_bench_gemm: --precision %s: expected fp32, bf16 or both\n", v);
                return -1;
            }
        } else {
            fprintf(stderr, "dsmoe_bench_gemm: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
        if (rc)
            return -1;
    }
    if (o->S % o->E) {
        fprintf(stderr, "dsmoe_bench_gemm: --tokens %d: expected a multiple of --experts %d (balanced experts)\n",
                o->S, o->E);
        return -1;
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// Buffers (plugin memory: host memory for cpu, so the references read the same arrays)

static void *dev(size_t bytes) {
    void *p = NULL;
    KCHECK(P->alloc(K, bytes, DSMOE_ALLOC_ZERO, &p));
    return p;
}

static uint64_t rng = 88172645463325252ull;
// n values uniform in [-scale, scale) as dt (float32, or bfloat16 through the plugin's convert).
static void *dev_uniform(size_t n, float scale, dsmoe_dtype dt) {
    float *h = malloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        h[i] = scale * ((float)(rng >> 40) / 8388608.0f - 1.0f);
    }
    float *f = dev(n * sizeof(float));
    KCHECK(P->copy_to_device(K, Q, f, h, n * sizeof(float)));
    free(h);
    if (dt == DSMOE_FLOAT32)
        return f;
    void *b = dev(n * 2);
    KCHECK(P->convert(K, Q, b, dt, f, DSMOE_FLOAT32, n));
    P->free(K, f);
    return b;
}

// One precision's tensors; expert e's slice of each at e * (its per-expert size).
typedef struct ffn {
    dsmoe_dtype dt;
    float *w1m, *w2m;       // (E, F, M), (E, M, F) float32 masters (bf16: converted each step)
    void *w1, *w2;          // the weights the GEMMs read (dt)
    float *b1, *b2;         // (E, F), (E, M)
    void *x, *h, *pre, *y;  // (E, C, M), (E, C, F), (E, C, F), (E, C, M)
    void *dy, *dh, *dx;     // (E, C, M), (E, C, F), (E, C, M)
    float *dw1, *dw2, *db1, *db2;
    int32_t *counts;        // (E) device
} ffn;

static void ffn_init(ffn *f, const opts *o, dsmoe_dtype dt) {
    size_t E = o->E, C = o->S / o->E, M = o->M, F = o->F, es = dt == DSMOE_FLOAT32 ? 4 : 2;
    f->dt = dt;
    f->w1m = dev_uniform(E * F * M, 0.05f, DSMOE_FLOAT32);
    f->w2m = dev_uniform(E * M * F, 0.05f, DSMOE_FLOAT32);
    f->w1 = dt == DSMOE_FLOAT32 ? (void *)f->w1m : dev(E * F * M * es);
    f->w2 = dt == DSMOE_FLOAT32 ? (void *)f->w2m : dev(E * M * F * es);
    f->b1 = dev_uniform(E * F, 0.1f, DSMOE_FLOAT32);
    f->b2 = dev_uniform(E * M, 0.1f, DSMOE_FLOAT32);
    f->x = dev_uniform(E * C * M, 1.0f, dt);
    f->dy = dev_uniform(E * C * M, 1.0f, dt);
    f->h = dev(E * C * F * es), f->pre = dev(E * C * F * es), f->y = dev(E * C * M * es);
    f->dh = dev(E * C * F * es), f->dx = dev(E * C * M * es);
    f->dw1 = dev(E * F * M * 4), f->dw2 = dev(E * M * F * 4), f->db1 = dev(E * F * 4), f->db2 = dev(E * M * 4);
    int32_t *c = malloc(E * sizeof *c);
    for (size_t e = 0; e < E; e++)
        c[e] = (int32_t)C;
    f->counts = dev(E * sizeof *c);
    KCHECK(P->copy_to_device(K, Q, f->counts, c, E * sizeof *c));
    KCHECK(P->synchronize(K));
    free(c);
}

enum { ST_CONVERT, ST_FC1, ST_FC2, ST_FC2_DX, ST_FC2_DW, ST_FC1_DW, ST_FC1_DX, N_STAGES };
static const char *stage_names[N_STAGES] = {"convert", "fc1", "fc2", "fc2.dx", "fc2.dw", "fc1.dw", "fc1.dx"};

// One step through the plugin; t[s] = seconds of each stage.
static void ffn_step(const ffn *f, const opts *o, double *t) {
    const int E = o->E, C = o->S / o->E, M = o->M, F = o->F;
    const dsmoe_dtype dt = f->dt;
    const size_t CM = (size_t)C * M, CF = (size_t)C * F, FM = (size_t)F * M;
    double t0 = now();
    if (dt != DSMOE_FLOAT32) {
        KCHECK(P->convert(K, Q, f->w1, dt, f->w1m, DSMOE_FLOAT32, (size_t)E * FM));
        KCHECK(P->convert(K, Q, f->w2, dt, f->w2m, DSMOE_FLOAT32, (size_t)E * FM));
    }
    KCHECK(P->synchronize(K));
    double t1 = now();
    t[ST_CONVERT] = t1 - t0;
    dsmoe_grouped_gemm g = {.groups = E, .counts = f->counts, .m_max = C, .alpha = 1.0f, .a_type = dt, .b_type = dt,
                            .b_groups = E, .c_type = dt};
    dsmoe_grouped_gemm fc1 = g, fc2 = g, fc2dx = g, fc1dx = g;
    fc1.n = F, fc1.k = M, fc1.a = f->x, fc1.lda = M, fc1.a_stride = CM, fc1.b = f->w1, fc1.ldb = M, fc1.b_stride = FM;
    fc1.trans_b = 1, fc1.c = f->h, fc1.ldc = F, fc1.c_stride = CF, fc1.epilogue = DSMOE_EPI_BIAS_GELU;
    fc1.bias = f->b1, fc1.bias_stride = F, fc1.aux = f->pre;
    fc2.n = M, fc2.k = F, fc2.a = f->h, fc2.lda = F, fc2.a_stride = CF, fc2.b = f->w2, fc2.ldb = F, fc2.b_stride = FM;
    fc2.trans_b = 1, fc2.c = f->y, fc2.ldc = M, fc2.c_stride = CM, fc2.epilogue = DSMOE_EPI_BIAS;
    fc2.bias = f->b2, fc2.bias_stride = M;
    fc2dx.n = F, fc2dx.k = M, fc2dx.a = f->dy, fc2dx.lda = M, fc2dx.a_stride = CM, fc2dx.b = f->w2, fc2dx.ldb = F;
    fc2dx.b_stride = FM, fc2dx.c = f->dh, fc2dx.ldc = F, fc2dx.c_stride = CF, fc2dx.epilogue = DSMOE_EPI_DGELU;
    fc2dx.aux = f->pre;
    fc1dx.n = M, fc1dx.k = F, fc1dx.a = f->dh, fc1dx.lda = F, fc1dx.a_stride = CF, fc1dx.b = f->w1, fc1dx.ldb = M;
    fc1dx.b_stride = FM, fc1dx.c = f->dx, fc1dx.ldc = M, fc1dx.c_stride = CM;
    dsmoe_grouped_wgrad w2 = {.groups = E, .counts = f->counts, .m_max = C, .n = M, .k = F, .alpha = 1.0f,
                              .dy = f->dy, .dy_type = dt, .dy_stride = CM, .x = f->h, .x_type = dt, .x_stride = CF,
                              .dw = f->dw2, .dw_stride = FM, .b_groups = E, .dbias = f->db2, .dbias_stride = M};
    dsmoe_grouped_wgrad w1 = {.groups = E, .counts = f->counts, .m_max = C, .n = F, .k = M, .alpha = 1.0f,
                              .dy = f->dh, .dy_type = dt, .dy_stride = CF, .x = f->x, .x_type = dt, .x_stride = CM,
                              .dw = f->dw1, .dw_stride = FM, .b_groups = E, .dbias = f->db1, .dbias_stride = F};
    const dsmoe_grouped_gemm *gg[N_STAGES] = {NULL, &fc1, &fc2, &fc2dx, NULL, NULL, &fc1dx};
    for (int s = ST_FC1; s < N_STAGES; s++) {
        double a = now();
        if (gg[s])
            KCHECK(P->gemm_grouped(K, Q, gg[s]));
        else
            KCHECK(P->gemm_grouped_wgrad(K, Q, s == ST_FC2_DW ? &w2 : &w1));
        KCHECK(P->synchronize(K));
        t[s] = now() - a;
    }
}

// ---------------------------------------------------------------------------------------------------
// References: the six GEMMs per expert in the library, its own threading

static double ref_fp32(const ffn *f, const opts *o) {
    const int E = o->E, C = o->S / o->E, M = o->M, F = o->F;
    const size_t CM = (size_t)C * M, CF = (size_t)C * F, FM = (size_t)F * M;
    const float *x = f->x, *dy = f->dy, *w1 = f->w1, *w2 = f->w2;
    float *h = f->h, *y = f->y, *dh = f->dh, *dx = f->dx;
    openblas_set_num_threads(o->threads);
    double t0 = now();
    for (int e = 0; e < E; e++) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, C, F, M, 1.0f, x + e * CM, M, w1 + e * FM, M, 0.0f,
                    h + e * CF, F);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, C, M, F, 1.0f, h + e * CF, F, w2 + e * FM, F, 0.0f,
                    y + e * CM, M);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, C, F, M, 1.0f, dy + e * CM, M, w2 + e * FM, F, 0.0f,
                    dh + e * CF, F);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, M, F, C, 1.0f, dy + e * CM, M, h + e * CF, F, 1.0f,
                    f->dw2 + e * FM, F);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, F, M, C, 1.0f, dh + e * CF, F, x + e * CM, M, 1.0f,
                    f->dw1 + e * FM, M);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, C, M, F, 1.0f, dh + e * CF, F, w1 + e * FM, M, 0.0f,
                    dx + e * CM, M);
    }
    double t = now() - t0;
    openblas_set_num_threads(1);
    return t;
}

#ifdef DSMOE_BENCH_ONEDNN
// The six bf16 matmuls of an expert (bench_dnnl.c), one set for all experts (all have C rows).
static bench_dnnl_ffn *ref_ffn;

static double ref_bf16(const ffn *f, const opts *o) {
    const int E = o->E, C = o->S / o->E, M = o->M, F = o->F;
    const size_t CM = (size_t)C * M, CF = (size_t)C * F, FM = (size_t)F * M;
    const uint16_t *x = f->x, *dy = f->dy, *w1 = f->w1, *w2 = f->w2;
    uint16_t *h = f->h, *y = f->y, *dh = f->dh, *dx = f->dx;
    double t0 = now();
    for (int e = 0; e < E; e++) {
        bench_dnnl_ffn_io io = {.x = x + e * CM, .w1 = w1 + e * FM, .w2 = w2 + e * FM, .h = h + e * CF,
                                .y = y + e * CM, .dy = dy + e * CM, .dh = dh + e * CF, .dx = dx + e * CM,
                                .dw1 = f->dw1 + e * FM, .dw2 = f->dw2 + e * FM};
        const char *msg = bench_dnnl_ffn_run(ref_ffn, &io, 1);
        if (msg)
            die("bf16 reference", msg);
    }
    return now() - t0;
}
#endif

// ---------------------------------------------------------------------------------------------------

typedef struct result {
    double best[N_STAGES], step, ref; // best seconds per stage, best whole step, best reference
} result;

static void report(const char *p, const result *r, const opts *o, double flops, double ratio) {
    printf("%s: best of %d per stage:", p, o->reps);
    for (int s = 0; s < N_STAGES; s++) {
        if (s == ST_CONVERT) {
            if (strcmp(p, "fp32"))
                printf(" %s %.2f ms,", stage_names[s], r->best[s] * 1e3);
            continue;
        }
        printf(" %s %.2f ms (%.1f GFLOP/s)%s", stage_names[s], r->best[s] * 1e3, flops / 6 / r->best[s] * 1e-9,
               s + 1 < N_STAGES ? "," : "");
    }
    printf("\n%s: best step %.2f ms = %.1f GFLOP/s; library reference %.2f ms = %.1f GFLOP/s\n", p, r->step * 1e3,
           flops / r->step * 1e-9, r->ref * 1e3, flops / r->ref * 1e-9);
    printf("precision=%s ms_per_step=%.2f gflops=%.1f ref_gflops=%.1f efficiency=%.3f bf16_over_fp32=%.3f\n", p,
           r->step * 1e3, flops / r->step * 1e-9, flops / r->ref * 1e-9, r->ref / r->step, ratio);
}

int main(int argc, char **argv) {
    opts o;
    if (parse_args(argc, argv, &o))
        return 2;
    omp_set_num_threads(o.threads);
    openblas_set_num_threads(1);
    void *dl = dlopen(o.plugin, RTLD_NOW | RTLD_LOCAL);
    if (!dl)
        die(o.plugin, dlerror());
    dsmoe_kernel_plugin_entry_fn entry = (dsmoe_kernel_plugin_entry_fn)dlsym(dl, DSMOE_KERNEL_PLUGIN_SYMBOL);
    if (!entry || !(P = entry()) || P->api_version != DSMOE_KERNEL_API_VERSION)
        die(o.plugin, "not a kernel plugin of ABI version 3");
    if (!(P->caps & DSMOE_KCAP_HOST_MEMORY))
        die(o.plugin, "the references read the plugin's buffers: a plugin with host memory (cpu) is needed");
    if (o.bf16 && !(P->dtypes & DSMOE_DTYPE_BIT(DSMOE_BFLOAT16)))
        die(o.plugin, "the plugin does not declare bfloat16");
    dsmoe_kernel_options kopt = {.threads = o.threads};
    char err[512];
    if (P->init(&kopt, &K, err, sizeof err) != DSMOE_OK)
        die("init", err);
    Q = P->default_queue(K);
    printf("kernel: %s\n", P->describe(K));
    printf("shape: tokens=%d experts=%d (%d rows each) hidden=%d ffn=%d threads=%d reps=%d\n", o.S, o.E, o.S / o.E,
           o.M, o.F, o.threads, o.reps);

    ffn f32, b16;
    if (o.fp32)
        ffn_init(&f32, &o, DSMOE_FLOAT32);
    if (o.bf16)
        ffn_init(&b16, &o, DSMOE_BFLOAT16);
    int have_bf16_ref = 0;
#ifdef DSMOE_BENCH_ONEDNN
    if (o.bf16) {
        const char *msg = bench_dnnl_start(o.threads);
        if (msg || (msg = bench_dnnl_ffn_make(&ref_ffn, o.S / o.E, o.M, o.F)))
            die("bf16 reference", msg);
        have_bf16_ref = 1;
        int major, minor, patch;
        bench_dnnl_version(&major, &minor, &patch);
        printf("bf16 reference: oneDNN %d.%d.%d matmul '%s', %d threads\n", major, minor, patch, bench_dnnl_impl(),
               o.threads);
    }
#endif
    double flops = 6.0 * 2.0 * o.S * (double)o.M * o.F;
    result r32 = {.step = INFINITY, .ref = INFINITY}, r16 = {.step = INFINITY, .ref = INFINITY};
    for (int s = 0; s < N_STAGES; s++)
        r32.best[s] = r16.best[s] = INFINITY;
    for (int it = -o.warmup; it < o.reps; it++) {
        double t[N_STAGES] = {0}, step;
        for (int p = 0; p < 2; p++) {
            if (!(p ? o.bf16 : o.fp32))
                continue;
            result *r = p ? &r16 : &r32;
            ffn_step(p ? &b16 : &f32, &o, t);
            step = 0;
            for (int s = 0; s < N_STAGES; s++) {
                step += t[s];
                if (it >= 0 && t[s] < r->best[s])
                    r->best[s] = t[s];
            }
            if (it >= 0 && step < r->step)
                r->step = step;
            printf("rep %d %s: step %.2f ms\n", it, p ? "bf16" : "fp32", step * 1e3);
        }
        double ref;
        if (o.fp32 && (ref = ref_fp32(&f32, &o)) < r32.ref && it >= 0)
            r32.ref = ref;
#ifdef DSMOE_BENCH_ONEDNN
        if (o.bf16 && (ref = ref_bf16(&b16, &o)) < r16.ref && it >= 0)
            r16.ref = ref;
#endif
        (void)ref;
        fflush(stdout);
    }
    if (o.bf16 && !have_bf16_ref)
        printf("bf16: no library reference (built without oneDNN)\n");
    double ratio = o.fp32 && o.bf16 ? r16.step / r32.step : NAN;
    if (o.fp32)
        report("fp32", &r32, &o, flops, ratio);
    if (o.bf16)
        report("bf16", &r16, &o, flops, ratio);
    fflush(stdout);
    P->finalize(K);
    return 0;
}
