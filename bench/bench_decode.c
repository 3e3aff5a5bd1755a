// bench/bench_decode.c: decode speed of the inference forward (core/model/model_infer.h) against the
// memory-bandwidth bound, both measured in the same run.
//
// usage: dsmoe_bench_decode [--layers L] [--hidden M] [--heads NH] [--experts E] [--top-k K] [--batch B]
//                           [--prompt P] [--new N] [--threads T] [--vocab V] [--ffn F] [--warmup w]
//                           [--repeats r] [--reference 0|1] [--kernel NAME] [--precision fp32|bf16]
//                           [--temperature t] [--sample-top-k k] [--top-p p]
// Defaults: 4 256 4 8 1 1 64 32 1 256 4*M 2 3 1 cpu fp32 0 0 1. --precision bf16 runs the model with
// run.precision = bf16 (docs/precision.md): the weight matrices are read as bfloat16 and the KV cache
// holds bfloat16, so the bytes below count 2 per element for those (biases, layer norms, the router and
// the embedding rows stay float32); the float32 --reference is then not run. MoE on every other layer (layers 2, 4, ...),
// random weights (dsmoe_model_init_params), E = 0 a dense model.
//
// A run, `repeats` times: the bandwidth (below), then reset the B slots, prefill P random tokens per
// sequence in one forward, then N decode steps; a step is one dsmoe_infer_forward with one token per
// sequence and a dsmoe_infer_sample, whose token the next step feeds (greedy, or with --temperature
// t > 0 drawn from the top k logits (0 = all) and the top-p mass: the cost of sampling a vocabulary
// of V, which a decode step pays once per sequence). The first w steps are
// not timed (first use of the one-row buffers). Figures are the best repeat (other jobs on a shared
// machine only add time). On an asynchronous (device) plugin a step's wall time still holds all its
// device work: the forward enqueues every op on the runtime's one queue, and dsmoe_infer_sample copies
// the sampled tokens to the host and waits for an event recorded after that copy on the same queue
// (core/model/model_infer.c) before the host reads them, so the clock stops only after the step has run
// on the device; the prefill likewise, from a synchronized start. Then a separate profiled pass (the
// forward's `times`, which waits after every part, so it is never the timed one) gives the breakdown,
// and, with --reference 1, the step's weight GEMMs alone (see below).
//
// Bandwidth (bench_bandwidth.c, whose top says how and why), in the memory the plugin's buffers live
// in, decided by the plugin's caps. Host memory (DSMOE_KCAP_HOST_MEMORY: cpu): a STREAM triad with the
// decode's thread count on arrays of 4x the last-level cache, best of 5 per repeat, counting 3 arrays,
// on 4 KiB pages (as the plugin's memory is) and on transparent huge pages; the bound takes the faster:
// what the machine can deliver. Device memory (any other plugin: cuda, or strict standing in for it
// without a GPU): the plugin's own `copy` between two of its buffers (1 GiB each, less where memory is
// short or is host memory), best of 5 round trips per repeat, counting read + write: the HBM rate of a
// GPU, not the host's DRAM. The last-level cache is a host fact: on device memory it sizes nothing but
// the buffers of a host-memory stand-in (strict), and the bench makes no claim about a device cache.
//
// Bytes one decode step must read (float32 unless --precision bf16), from the model's shapes (checked against the model's
// parameter count): per layer the attention weights (LayerNorms, QKV and projection with biases); on
// dense layers the FFN; on MoE layers the router and the experts the step's tokens selected; the final
// LayerNorm and the tied embedding (V, M) for the logits; the embedding rows of the B tokens; and the
// KV cache that attention reads: 2 x L x B x (positions cached after the append) x M. Which experts a
// step selected is not visible outside dsmoe_infer_forward, so an MoE layer counts min(E, B*K)
// experts: exact at B = 1 (K experts), an upper bound above (it makes the bound larger, so the
// efficiency is at most this high); the expectation under uniform routing is printed beside it.
// Activations (a few rows) stay in cache and are not counted. The bound is the mean over the timed
// steps of bytes / bandwidth. The step's floating-point work (GEMMs, attention) is printed too: at a
// large B the step is compute-bound and the bandwidth efficiency says little.
//
// The last line is
//   ms_per_token=<x> tokens_per_s=<y> bound_ms=<z> efficiency=<z/x>
// with x the wall time of one decode step (every sequence gets one token; what a sequence waits per
// token), y = B / x, z the bound of one step.
//
// Reference (--reference 1): the weight matrices one step multiplies (those counted above, at B rows;
// an MoE layer's min(E, B*K) experts share the B*K rows) times random rows: through the plugin's gemm
// as the forward calls it and, on host-memory plugins, through OpenBLAS directly (sgemv for one row,
// else sgemm with its own threading) and through a hand loop that reads each weight row once and dots it with
// the B rows (B <= 16); OpenBLAS and the loop read the plugin's memory, which only a host-memory plugin
// lets the host do. Each shape on a sweep of copies 4x the last-level cache (host memory) or as large as
// the device copy's buffers (device memory), so that it comes from memory, not cache, then the step's
// own matrices in order. GB/s of weights against the bandwidth's show whether the GEMM path reads at
// memory speed.
#include "bench_args.h"      // bench_parse_int, bench_parse_real, bench_flag_value
#include "bench_bandwidth.h" // bench_llc_bytes, bench_triad_*, bench_devcopy_*
#include <cblas.h> // cblas_sgemv, cblas_sgemm, openblas_set_num_threads: the native reference
#include <math.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "dsmoe/rng.h"
#include "model.h"
#include "model_infer.h"
#include "runtime.h"

typedef struct opts {
    int L, M, NH, E, K, B, P, N, threads, V, F, warmup, repeats, reference, bf16, sample_top_k;
    double temperature, top_p;
    const char *kernel;
} opts;

static void usage(FILE *f) {
    fprintf(f, "usage: dsmoe_bench_decode [--layers L] [--hidden M] [--heads NH] [--experts E] [--top-k K]\n"
               "                          [--batch B] [--prompt P] [--new N] [--threads T] [--vocab V] [--ffn F]\n"
               "                          [--warmup w] [--repeats r] [--reference 0|1] [--kernel NAME]\n"
               "                          [--precision fp32|bf16] [--temperature t] [--sample-top-k k] [--top-p p]\n"
               "defaults: --layers 4 --hidden 256 --heads 4 --experts 8 --top-k 1 --batch 1 --prompt 64 --new 32\n"
               "          --threads 1 --vocab 256 --ffn 4*hidden --warmup 2 --repeats 3 --reference 1 --kernel cpu\n"
               "          --precision fp32 --temperature 0 (greedy) --sample-top-k 0 (all) --top-p 1\n");
}

static int parse_int(const char *flag, const char *v, int lo, int *out) {
    return bench_parse_int("dsmoe_bench_decode", flag, v, lo, 100000000, out);
}

static int parse_args(int argc, char **argv, opts *o) {
    *o = (opts){.L = 4, .M = 256, .NH = 4, .E = 8, .K = 1, .B = 1, .P = 64, .N = 32, .threads = 1, .V = 256,
                .F = 0, .warmup = 2, .repeats = 3, .reference = 1, .kernel = "cpu", .top_p = 1.0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        }
        const char *v = bench_flag_value("dsmoe_bench_decode", argc, argv, &i);
        if (!v) return -1;
        int rc = 0;
        if (!strcmp(a, "--layers")) rc = parse_int(a, v, 1, &o->L);
        else if (!strcmp(a, "--hidden")) rc = parse_int(a, v, 1, &o->M);
        else if (!strcmp(a, "--heads")) rc = parse_int(a, v, 1, &o->NH);
        else if (!strcmp(a, "--experts")) rc = parse_int(a, v, 0, &o->E);
        else if (!strcmp(a, "--top-k")) rc = parse_int(a, v, 1, &o->K);
        else if (!strcmp(a, "--batch")) rc = parse_int(a, v, 1, &o->B);
        else if (!strcmp(a, "--prompt")) rc = parse_int(a, v, 1, &o->P);
        else if (!strcmp(a, "--new")) rc = parse_int(a, v, 1, &o->N);
        else if (!strcmp(a, "--threads")) rc = parse_int(a, v, 1, &o->threads);
        else if (!strcmp(a, "--vocab")) rc = parse_int(a, v, 2, &o->V);
        else if (!strcmp(a, "--ffn")) rc = parse_int(a, v, 0, &o->F);
        else if (!strcmp(a, "--warmup")) rc = parse_int(a, v, 0, &o->warmup);
        else if (!strcmp(a, "--repeats")) rc = parse_int(a, v, 1, &o->repeats);
        else if (!strcmp(a, "--reference")) rc = parse_int(a, v, 0, &o->reference);
        else if (!strcmp(a, "--kernel")) o->kernel = v;
        else if (!strcmp(a, "--sample-top-k")) rc = parse_int(a, v, 0, &o->sample_top_k);
        else if (!strcmp(a, "--temperature"))
            rc = bench_parse_real("dsmoe_bench_decode", a, v, 0.0, 1e6, 0, &o->temperature);
        else if (!strcmp(a, "--top-p")) rc = bench_parse_real("dsmoe_bench_decode", a, v, 0.0, 1.0, 1, &o->top_p);
        else if (!strcmp(a, "--precision") && (!strcmp(v, "fp32") || !strcmp(v, "bf16"))) o->bf16 = !strcmp(v, "bf16");
        else if (!strcmp(a, "--precision")) {
            fprintf(stderr, "dsmoe_bench_decode: --precision %s: expected fp32 or bf16\n", v);
            return -1;
        }
        else {
            fprintf(stderr, "dsmoe_bench_decode: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
        if (rc) return -1;
    }
    if (o->N <= o->warmup) {
        fprintf(stderr, "dsmoe_bench_decode: --new %d with --warmup %d: expected more new tokens than warm-up steps\n",
                o->N, o->warmup);
        return -1;
    }
    if (o->F == 0) o->F = 4 * o->M;
    if (o->bf16) o->reference = 0; // its GEMMs are float32
    return 0;
}

// ----------------------------------------------------------------------------------------------------
// helpers (the bench exits on failure, naming the call)

static dsmoe_runtime rt;
#define F32 DSMOE_FLOAT32

static void die(const char *what, const char *msg) {
    fprintf(stderr, "dsmoe_bench_decode: %s: %s\n", what, msg);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

#define KCHECK(call)                                                                               \
    do {                                                                                           \
        if ((call) != DSMOE_OK) die(#call, rt.kern->last_error(rt.kctx));                          \
    } while (0)

#define CHECK(call)                                                                                \
    do {                                                                                           \
        if ((call) != DSMOE_OK) die(#call, err.msg);                                               \
    } while (0)

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) die("malloc", "out of memory");
    return p;
}

// Uniform in [-1, 1) from (key, index), in plugin memory.
static float *dev_uniform(size_t n, uint64_t key) {
    float *h = xmalloc(n * sizeof(float)), *d = NULL;
    for (size_t i = 0; i < n; i++) h[i] = 2.0f * dsmoe_rng_uniform(key, i) - 1.0f;
    KCHECK(rt.kern->alloc(rt.kctx, n * sizeof(float), 0, (void **)&d));
    KCHECK(rt.kern->copy_to_device(rt.kctx, rt.q, d, h, n * sizeof(float)));
    KCHECK(rt.kern->synchronize(rt.kctx));
    free(h);
    return d;
}

static double now_synced(void) {
    KCHECK(rt.kern->synchronize(rt.kctx));
    return dsmoe_now_seconds();
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// ----------------------------------------------------------------------------------------------------
// bytes one decode step reads (float32 elements, see the top of the file)

typedef struct step_bytes {
    double attn, dense, router, experts, head, embed, kv;
} step_bytes;

static double total_bytes(const step_bytes *s) {
    return s->attn + s->dense + s->router + s->experts + s->head + s->embed + s->kv;
}

static double experts_per_layer(const opts *o, int E) { return E < o->B * o->K ? E : o->B * o->K; }

// The expected distinct experts of E when B tokens each pick K distinct ones uniformly at random.
static double experts_uniform(const opts *o, int E) { return E * (1.0 - pow(1.0 - (double)o->K / E, o->B)); }

// One step at cached length `cached` before it (the new token goes to position `cached`), for B rows.
// fb: float32 elements (biases, layer norms, the router, the embedding rows); wb: the weight matrices as
// the GEMMs read them and the KV cache (2 bytes with --precision bf16).
static step_bytes count_step(const dsmoe_config *cfg, const opts *o, int cached, int B) {
    double M = cfg->hidden, F = cfg->ffn_hidden, V = cfg->vocab, fb = sizeof(float), wb = o->bf16 ? 2.0 : fb;
    step_bytes s = {0};
    opts ob = *o;
    ob.B = B;
    for (int l = 0; l < cfg->layers; l++) {
        int mi;
        int moe = dsmoe_config_is_moe_layer(cfg, l, &mi);
        s.attn += wb * (3 * M * M + M * M) + fb * (2 * M + 3 * M + M + 2 * M); // ln_1, c_attn, c_proj, ln_2
        if (!moe || cfg->residual) s.dense += wb * (F * M + M * F) + fb * (F + M);
        if (moe) {
            int E = cfg->experts[mi];
            s.router += fb * E * M + (cfg->residual ? wb * 2 * M + fb * 2 : 0);
            s.experts += experts_per_layer(&ob, E) * (wb * (F * M + M * F) + fb * (F + M));
        }
    }
    s.head = fb * 2 * M + wb * V * M;
    s.embed = fb * 2.0 * B * M; // the B rows of wte and of wpe
    s.kv = wb * 2.0 * cfg->layers * B * (cached + 1.0) * M;
    return s;
}

// Floating-point operations of one step (B rows at cached length `cached`): the GEMMs (each token
// through its K experts) and attention's two products over the cache.
static double count_flops(const dsmoe_config *cfg, const opts *o, int cached) {
    double M = cfg->hidden, F = cfg->ffn_hidden, V = cfg->vocab, B = o->B, f = 0.0;
    for (int l = 0; l < cfg->layers; l++) {
        int mi, moe = dsmoe_config_is_moe_layer(cfg, l, &mi);
        f += 2 * B * 4 * M * M + 4 * B * (cached + 1.0) * M;
        if (!moe || cfg->residual) f += 2 * B * 2 * F * M;
        if (moe) f += 2 * B * cfg->experts[mi] * M + 2 * B * cfg->top_k * 2 * F * M;
    }
    return f + 2 * B * V * M;
}

// All parameters from the same shapes: must equal the model's count, or the byte model is wrong.
static size_t count_params(const dsmoe_config *cfg) {
    size_t M = cfg->hidden, F = cfg->ffn_hidden, V = cfg->vocab, T = cfg->seq_len, n = V * M + T * M + 2 * M;
    for (int l = 0; l < cfg->layers; l++) {
        int mi, moe = dsmoe_config_is_moe_layer(cfg, l, &mi);
        n += 2 * M + 3 * M * M + 3 * M + M * M + M + 2 * M;
        if (!moe || cfg->residual) n += F * M + F + M * F + M;
        if (moe) n += (size_t)cfg->experts[mi] * (M + F * M + F + M * F + M) + (cfg->residual ? 2 * M + 2 : 0);
    }
    return n;
}

// ----------------------------------------------------------------------------------------------------
// decode

typedef struct decoder {
    dsmoe_infer *inf;
    int *slot, *one, *prompt_count; // (B) each
    int32_t *prompt;                // (B, P) random tokens
    int32_t *next;                  // (B) the tokens the next step feeds
    uint64_t *counters;             // (B)
    dsmoe_sampling_params *sampling; // (B)
} decoder;

// Prefill, then N steps; step_s (N - warmup) gets the timed steps' seconds; times, when not NULL, the
// profile of the timed steps. Returns the prefill's seconds.
static double decode_pass(decoder *d, const opts *o, double *step_s, dsmoe_infer_times *times) {
    dsmoe_err err = {0};
    for (int b = 0; b < o->B; b++) dsmoe_infer_reset(d->inf, b);
    int rows = o->B * o->P;
    double t0 = now_synced();
    CHECK(dsmoe_infer_forward(d->inf, o->B, d->slot, d->prompt_count, d->prompt, rows, 0.0f, NULL, &err));
    for (int b = 0; b < o->B; b++) d->counters[b] = 0;
    CHECK(dsmoe_infer_sample(d->inf, d->sampling, d->counters, o->V, d->next, &err));
    double prefill = dsmoe_now_seconds() - t0;
    for (int i = 0; i < o->N; i++) {
        int timed = i >= o->warmup;
        for (int b = 0; b < o->B; b++) d->counters[b] = (uint64_t)i + 1;
        t0 = dsmoe_now_seconds();
        CHECK(dsmoe_infer_forward(d->inf, o->B, d->slot, d->one, d->next, o->B, 0.0f, timed ? times : NULL, &err));
        CHECK(dsmoe_infer_sample(d->inf, d->sampling, d->counters, o->V, d->next, &err)); // waits for the queue
        if (timed) step_s[i - o->warmup] = dsmoe_now_seconds() - t0;
    }
    return prefill;
}

// ----------------------------------------------------------------------------------------------------
// reference: the step's weight GEMMs alone

typedef struct wmat {
    const float *w; // (n, k) row-major, plugin memory
    int n, k, rows; // rows of x it multiplies
} wmat;

static const float *tensor(dsmoe_model *m, const char *name) {
    for (int i = 0; i < dsmoe_model_tensor_count(m); i++) {
        const dsmoe_param_tensor *t = dsmoe_model_tensor(m, i);
        if (!strcmp(t->name, name)) return dsmoe_model_params(m) + t->offset;
    }
    die("tensor", name);
    return NULL;
}

// The matrices of one step in the forward's order; returns their count (mats has room for 6L + 1).
static int step_matrices(dsmoe_model *m, const dsmoe_config *cfg, const opts *o, wmat *mats) {
    int n = 0, M = cfg->hidden, F = cfg->ffn_hidden, B = o->B;
    char name[96];
#define W(fmt, l) (snprintf(name, sizeof name, fmt, l), tensor(m, name))
    for (int l = 0; l < cfg->layers; l++) {
        int mi, moe = dsmoe_config_is_moe_layer(cfg, l, &mi);
        mats[n++] = (wmat){W("h.%d.attn.c_attn.weight", l), 3 * M, M, B};
        mats[n++] = (wmat){W("h.%d.attn.c_proj.weight", l), M, M, B};
        if (!moe || cfg->residual) {
            mats[n++] = (wmat){W("h.%d.mlp.c_fc.weight", l), F, M, B};
            mats[n++] = (wmat){W("h.%d.mlp.c_proj.weight", l), M, F, B};
        }
        if (!moe) continue;
        int E = cfg->experts[mi], sel = (int)experts_per_layer(o, E);
        int rows = (B * o->K + sel - 1) / sel;
        mats[n++] = (wmat){W("h.%d.moe.gate.weight", l), E, M, B};
        // the selected experts' two matrices, as one (sel F, M) and one (sel M, F) block: the same bytes
        mats[n++] = (wmat){W("h.%d.moe.experts.c_fc.weight", l), sel * F, M, rows};
        mats[n++] = (wmat){W("h.%d.moe.experts.c_proj.weight", l), sel * M, F, rows};
    }
#undef W
    mats[n++] = (wmat){tensor(m, "wte.weight"), cfg->vocab, M, B};
    return n;
}

// y (rows, n) = x (rows, k) w^T for each row: each weight row read once, dotted with every x row (four
// weight rows at a time, so that four sums are in flight).
static void hand_gemm(const wmat *w, const float *x, float *y, int threads) {
    int n = w->n, k = w->k, rows = w->rows;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int j = 0; j < n; j += 4) {
        const float *w0 = w->w + (size_t)j * k;
        if (j + 4 <= n) {
            for (int r = 0; r < rows; r++) {
                const float *xr = x + (size_t)r * k;
                float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (int i = 0; i < k; i++) {
                    s0 += w0[i] * xr[i];
                    s1 += w0[k + i] * xr[i];
                    s2 += w0[2 * k + i] * xr[i];
                    s3 += w0[3 * k + i] * xr[i];
                }
                float *yr = y + (size_t)r * n + j;
                yr[0] = s0, yr[1] = s1, yr[2] = s2, yr[3] = s3;
            }
        } else {
            for (int jj = j; jj < n; jj++)
                for (int r = 0; r < rows; r++) {
                    float s = 0;
                    for (int i = 0; i < k; i++) s += w->w[(size_t)jj * k + i] * x[(size_t)r * k + i];
                    y[(size_t)r * n + jj] = s;
                }
        }
    }
}

enum { REF_PLUGIN, REF_NATIVE, REF_HAND, REF_WAYS };

static double reference_run(int how, const wmat *mats, int nm, const float *x, float *y, int threads) {
    double t0 = now_synced();
    for (int i = 0; i < nm; i++) {
        const wmat *w = &mats[i];
        if (how == REF_PLUGIN)
            KCHECK(rt.kern->gemm(rt.kctx, rt.q, 0, 1, w->rows, w->n, w->k, 1.0f, x, F32, w->k, w->w, F32, w->k, 0.0f,
                                 y, F32, w->n));
        else if (how == REF_HAND)
            hand_gemm(w, x, y, threads);
        else if (w->rows == 1)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, w->n, w->k, 1.0f, w->w, w->k, x, 1, 0.0f, y, 1);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, w->rows, w->n, w->k, 1.0f, x, w->k, w->w, w->k, 0.0f,
                        y, w->n);
    }
    return now_synced() - t0;
}

// Best of `reps` after one warm-up, for the matrices [0, nm) one way.
static double reference_best(int how, const wmat *mats, int nm, const float *x, float *y, const opts *o, int reps) {
    if (how == REF_NATIVE) openblas_set_num_threads(o->threads);
    double best = INFINITY;
    for (int r = -1; r < reps; r++) {
        double t = reference_run(how, mats, nm, x, y, o->threads);
        if (r >= 0 && t < best) best = t;
    }
    if (how == REF_NATIVE) openblas_set_num_threads(1); // the plugin runs BLAS single-threaded
    return best;
}

// Per shape of weight matrix, on a sweep of copies of pool_bytes (4x the last-level cache, or the device
// copy's buffer size: so that every way reads memory, not cache), then the step's own matrices in their
// order: each way's GB/s of weights.
static void reference(dsmoe_model *m, const dsmoe_config *cfg, const opts *o, size_t pool_bytes) {
    int cap = 6 * cfg->layers + 1;
    wmat *mats = xmalloc((size_t)cap * sizeof *mats), *sweep = NULL; // the step's, one shape's copies
    int nm = step_matrices(m, cfg, o, mats), kmax = 0, nmax = 0, rmax = 0;
    double bytes = 0.0;
    for (int i = 0; i < nm; i++) {
        bytes += 4.0 * mats[i].n * mats[i].k;
        kmax = mats[i].k > kmax ? mats[i].k : kmax;
        nmax = mats[i].n > nmax ? mats[i].n : nmax;
        rmax = mats[i].rows > rmax ? mats[i].rows : rmax;
    }
    float *x = dev_uniform((size_t)rmax * kmax, 51), *y = dev_uniform((size_t)rmax * nmax, 52), *pool = NULL;
    KCHECK(rt.kern->alloc(rt.kctx, pool_bytes, DSMOE_ALLOC_ZERO, (void **)&pool));
    const int reps = 3;
    int host = (rt.kern->caps & DSMOE_KCAP_HOST_MEMORY) != 0, ways = !host ? 1 : o->B > 16 ? 2 : 3;
    const char *names[] = {"plugin gemm", "OpenBLAS", "hand loop"};
    printf("reference: x (rows, k) times w (n, k)^T alone (OpenBLAS: sgemv for 1 row, else sgemm), best of %d, GB/s "
           "of weights read; each shape of the step on a %.0f MiB sweep of copies:\n", reps, pool_bytes / 1048576.0);
    char *done = calloc((size_t)nm, 1);
    for (int i = 0; i < nm; i++) {
        if (done[i]) continue;
        int uses = 0;
        for (int j = i; j < nm; j++)
            if (mats[j].n == mats[i].n && mats[j].k == mats[i].k && mats[j].rows == mats[i].rows) done[j] = 1, uses++;
        size_t one = (size_t)mats[i].n * mats[i].k;
        int copies = (int)(pool_bytes / (one * sizeof(float)));
        if (copies < 1) continue; // larger than the sweep: the step's own line below covers it
        sweep = realloc(sweep, (size_t)copies * sizeof *sweep);
        if (!sweep) die("malloc", "out of memory");
        for (int c = 0; c < copies; c++) sweep[c] = (wmat){pool + (size_t)c * one, mats[i].n, mats[i].k, mats[i].rows};
        printf("  rows=%d n=%d k=%d (%d in the step):", mats[i].rows, mats[i].n, mats[i].k, uses);
        for (int how = 0; how < ways; how++)
            printf("%s %s %.1f", how ? "," : "", names[how],
                   4.0 * one * copies / reference_best(how, sweep, copies, x, y, o, reps) * 1e-9);
        printf("\n");
    }
    printf("  the step's %d matrices (%.1f MB):", nm, bytes * 1e-6);
    for (int how = 0; how < ways; how++) {
        double t = reference_best(how, mats, nm, x, y, o, reps);
        printf("%s %s %.2f ms = %.1f GB/s", how ? "," : "", names[how], t * 1e3, bytes / t * 1e-9);
    }
    printf("\n");
    rt.kern->free(rt.kctx, pool);
    rt.kern->free(rt.kctx, x);
    rt.kern->free(rt.kctx, y);
    free(done);
    free(sweep);
    free(mats);
}

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
    printf("kernel: %s (%s)\n", rt.kern->describe(rt.kctx), rt.kernel_handle.path);

    // The model: a deck in memory, shaped by the flags.
    int T = o.P + o.N;
    char ov[12][64];
    int n_ov = 10;
    snprintf(ov[9], sizeof ov[9], "run.precision=%s", o.bf16 ? "bf16" : "fp32");
    snprintf(ov[0], sizeof ov[0], "model.vocab=%d", o.V);
    snprintf(ov[1], sizeof ov[1], "model.seq_len=%d", T);
    snprintf(ov[2], sizeof ov[2], "model.layers=%d", o.L);
    snprintf(ov[3], sizeof ov[3], "model.hidden=%d", o.M);
    snprintf(ov[4], sizeof ov[4], "model.heads=%d", o.NH);
    snprintf(ov[5], sizeof ov[5], "model.ffn_hidden=%d", o.F);
    snprintf(ov[6], sizeof ov[6], "moe.experts=%d", o.E);
    snprintf(ov[7], sizeof ov[7], "moe.every=2");
    snprintf(ov[8], sizeof ov[8], "moe.top_k=%d", o.K);
    char *ovp[10];
    for (int i = 0; i < n_ov; i++) ovp[i] = ov[i];
    dsmoe_config cfg;
    if (dsmoe_config_load_text("[train]\nbatch = 1\n", "bench_decode", ovp, n_ov, (char *const[]){NULL}, 1, &cfg, NULL,
                               &err) != DSMOE_OK)
        die("config", err.msg);
    dsmoe_model *model = NULL;
    CHECK(dsmoe_model_create(&cfg, &rt, 1, &model, &err));
    CHECK(dsmoe_model_init_params(model, 1234, &err));
    size_t params = dsmoe_model_global_params(model);
    if (count_params(&cfg) != params) {
        char msg[160];
        snprintf(msg, sizeof msg, "the byte model counts %zu parameters, the model has %zu", count_params(&cfg),
                 params);
        die("shapes", msg);
    }

    decoder d = {0};
    CHECK(dsmoe_infer_create(model, o.B, T, o.B * o.P, 1, 0, &d.inf, &err)); // no tensor slicing
    d.slot = xmalloc(o.B * sizeof(int));
    d.one = xmalloc(o.B * sizeof(int));
    d.prompt_count = xmalloc(o.B * sizeof(int));
    d.prompt = xmalloc((size_t)o.B * o.P * sizeof(int32_t));
    d.next = xmalloc(o.B * sizeof(int32_t));
    d.counters = xmalloc(o.B * sizeof(uint64_t));
    d.sampling = xmalloc(o.B * sizeof(dsmoe_sampling_params));
    for (int b = 0; b < o.B; b++) {
        d.slot[b] = b, d.one[b] = 1, d.prompt_count[b] = o.P;
        d.sampling[b] = (dsmoe_sampling_params){.temperature = (float)o.temperature, .top_k = o.sample_top_k,
                                                .top_p = (float)o.top_p, .seed = 1};
        for (int t = 0; t < o.P; t++)
            d.prompt[(size_t)b * o.P + t] = (int32_t)(dsmoe_rng_u64(77, (uint64_t)b * o.P + t) % (uint64_t)o.V);
    }

    // What the run reads, and where it stands against the cache.
    const char *llc_src, *msg;
    size_t llc = bench_llc_bytes(&llc_src);
    int host = (rt.kern->caps & DSMOE_KCAP_HOST_MEMORY) != 0; // else device memory: the top of the file
    int timed = o.N - o.warmup;
    step_bytes mean = {0}, one = count_step(&cfg, &o, o.P, 1);
    for (int i = o.warmup; i < o.N; i++) {
        step_bytes s = count_step(&cfg, &o, o.P + i, o.B);
        mean.attn += s.attn / timed, mean.dense += s.dense / timed, mean.router += s.router / timed;
        mean.experts += s.experts / timed, mean.head += s.head / timed, mean.embed += s.embed / timed;
        mean.kv += s.kv / timed;
    }
    double active1 = total_bytes(&one) - one.kv - one.embed; // weights one token reads at batch 1
    printf("shape: layers=%d hidden=%d heads=%d ffn=%d experts=%d top_k=%d (MoE layers:", o.L, o.M, o.NH,
           cfg.ffn_hidden, o.E, o.K);
    for (int l = 0; l < cfg.layers; l++) {
        int mi;
        if (dsmoe_config_is_moe_layer(&cfg, l, &mi)) printf(" %d", l + 1);
    }
    printf(") vocab=%d batch=%d prompt=%d new=%d (the first %d not timed) threads=%d repeats=%d\n", o.V, o.B, o.P,
           o.N, o.warmup, o.threads, o.repeats);
    if (o.temperature > 0.0)
        printf("sampling: temperature %g, top-k %d (0 = all), top-p %g\n", o.temperature, o.sample_top_k, o.top_p);
    else
        printf("sampling: greedy\n");
    printf("weights: %.1f MB (%zu float32 parameters); active per token at batch 1: %.1f MB; ", 4e-6 * params, params,
           active1 * 1e-6);
    if (host)
        printf("last-level cache %.1f MiB (%s): the active weights %s\n", llc / 1048576.0, llc_src,
               active1 > llc ? "do not fit in it" : "fit in it (the bound can be beaten)");
    else // the host's cache does not hold device memory, and no plugin member tells the device's cache size
        printf("in the plugin's device memory (no claim about its cache)\n");
    printf("inference memory: %.1f MB of caches and buffers\n", dsmoe_infer_bytes(d.inf) * 1e-6);
    if (o.E > 0)
        printf("experts read per MoE layer per step: %.0f of %d (min(E, batch*top_k): %s); %.2f expected under "
               "uniform routing\n", experts_per_layer(&o, o.E), o.E, o.B == 1 ? "exact at batch 1" : "an upper bound",
               experts_uniform(&o, o.E));

    // The timed repeats, each after a bandwidth measurement under the same load: on host memory the
    // triad, on 4 KiB pages as malloc gives them (like the model's) and on huge pages; on device memory
    // the plugin's copy.
    bench_triad bw[2] = {0};
    bench_devcopy dc = {0};
    for (int h = 0; host && h < 2; h++)
        if ((msg = bench_triad_init(&bw[h], llc, o.threads, h))) die("bandwidth", msg);
    if (!host && (msg = bench_devcopy_init(&dc, rt.kern, rt.kctx, rt.q, llc))) die("bandwidth", msg);
    double *step_s = xmalloc(timed * sizeof(double)), best = INFINITY, best_median = 0.0, best_prefill = INFINITY;
    for (int r = 0; r < o.repeats; r++) {
        for (int h = 0; host && h < 2; h++) bench_triad_measure(&bw[h], o.threads, 5);
        if (!host && (msg = bench_devcopy_measure(&dc, 5))) die("bandwidth", msg);
        double prefill = decode_pass(&d, &o, step_s, NULL);
        double sum = 0.0;
        for (int i = 0; i < timed; i++) sum += step_s[i];
        qsort(step_s, timed, sizeof *step_s, cmp_double);
        double med = timed % 2 ? step_s[timed / 2] : 0.5 * (step_s[timed / 2 - 1] + step_s[timed / 2]);
        printf("repeat %d: prefill %.1f ms (%.0f tokens/s); %d steps: mean %.3f ms, median %.3f, min %.3f, max %.3f\n",
               r, prefill * 1e3, o.B * o.P / prefill, timed, sum / timed * 1e3, med * 1e3, step_s[0] * 1e3,
               step_s[timed - 1] * 1e3);
        if (sum / timed < best) best = sum / timed, best_median = med;
        if (prefill < best_prefill) best_prefill = prefill;
    }
    // On host memory the bound takes the faster triad: what the machine can deliver to this many threads.
    double bw_plain = 0.0, bps = 0.0;
    size_t pool_bytes = 4 * llc; // the reference's sweep: from memory, not cache
    if (host) {
        double bw_huge = bench_triad_bytes_per_s(&bw[1]);
        bw_plain = bench_triad_bytes_per_s(&bw[0]);
        bps = bw_plain > bw_huge ? bw_plain : bw_huge;
        for (int h = 0; h < 2; h++)
            printf("bandwidth, %s: triad on 3 x %.0f MiB, %d thread%s, best of %d: %.2f GB/s counting 3 arrays "
                   "(STREAM), %.2f counting 4; read-only sum %.2f GB/s\n", h ? "huge pages (madvise)" : "4 KiB pages",
                   bw[h].n * sizeof(double) / 1048576.0, o.threads, o.threads > 1 ? "s" : "", 5 * o.repeats,
                   bench_triad_bytes_per_s(&bw[h]) * 1e-9, bench_triad_bytes_per_s(&bw[h]) * 4.0 / 3.0 * 1e-9,
                   bench_triad_read_bytes_per_s(&bw[h]) * 1e-9);
        bench_triad_free(&bw[0]);
        bench_triad_free(&bw[1]);
    } else {
        bps = bench_devcopy_bytes_per_s(&dc);
        pool_bytes = dc.bytes;
        printf("bandwidth, device copy (plugin copy, 2 x %.0f MiB: %s): %.2f GB/s counting read + write, best of "
               "%d round trips\n", dc.bytes / 1048576.0, dc.rule, bps * 1e-9, 5 * o.repeats);
        bench_devcopy_free(&dc);
    }

    double step_total = total_bytes(&mean), bound = step_total / bps, flops = 0.0;
    for (int i = o.warmup; i < o.N; i++) flops += count_flops(&cfg, &o, o.P + i) / timed;
    const char *part_names[] = {"attention weights", "dense FFNs", "routers", "experts", "head (ln_f + wte)",
                                "embedding rows", "KV cache"};
    double parts[] = {mean.attn, mean.dense, mean.router, mean.experts, mean.head, mean.embed, mean.kv};
    int dom = 0;
    printf("bytes per step (mean of the timed steps): ");
    for (int i = 0; i < 7; i++) {
        printf("%s %.2f MB%s", part_names[i], parts[i] * 1e-6, i < 6 ? ", " : "");
        if (parts[i] > parts[dom]) dom = i;
    }
    printf("; total %.2f MB, %.0f%% of it %s\n", step_total * 1e-6, 100.0 * parts[dom] / step_total, part_names[dom]);

    printf("compute: %.3f GFLOP a step (GEMMs and attention), %.1f GFLOP/s at the best repeat\n", flops * 1e-9,
           flops / best * 1e-9);

    // The profiled pass: where a step's time goes (its waits add time: not the timed figure).
    dsmoe_infer_times tm = {0};
    decode_pass(&d, &o, step_s, &tm);
    double prof = 0.0;
    for (int i = 0; i < timed; i++) prof += step_s[i];
    double parts_s = tm.attention + tm.gating + tm.alltoall + tm.experts + tm.other;
    printf("profile (separate pass, ms per step): attention %.3f, gating %.3f, all-to-all %.3f, experts %.3f, "
           "other %.3f, sampling and the rest %.3f; total %.3f\n", tm.attention / timed * 1e3, tm.gating / timed * 1e3,
           tm.alltoall / timed * 1e3, tm.experts / timed * 1e3, tm.other / timed * 1e3, (prof - parts_s) / timed * 1e3,
           prof / timed * 1e3);
    if (o.reference) reference(model, &cfg, &o, pool_bytes);

    printf("best repeat: %.3f ms per step (median step %.3f ms), prefill %.0f tokens/s, bound %.3f ms = %.2f MB at "
           "%.2f GB/s", best * 1e3, best_median * 1e3, o.B * o.P / best_prefill, bound * 1e3, step_total * 1e-6,
           bps * 1e-9);
    if (host)
        printf(" (the 4 KiB-page triad's %.2f GB/s would give %.3f ms, efficiency %.3f)\n", bw_plain * 1e-9,
               step_total / bw_plain * 1e3, step_total / bw_plain / best);
    else
        printf(" (device copy)\n");
    if (o.E > 0 && o.B > 1) { // the experts a step reads if routing were uniform (their expectation)
        double uniform = step_total - mean.experts * (1.0 - experts_uniform(&o, o.E) / experts_per_layer(&o, o.E));
        printf("with the uniform-routing expectation of experts instead: %.2f MB a step, bound %.3f ms, efficiency "
               "%.3f\n", uniform * 1e-6, uniform / bps * 1e3, uniform / bps / best);
    }
    printf("ms_per_token=%.3f tokens_per_s=%.1f bound_ms=%.3f efficiency=%.3f\n", best * 1e3, o.B / best, bound * 1e3,
           bound / best);
    fflush(stdout);

    dsmoe_infer_free(d.inf);
    dsmoe_model_free(model);
    // The process ends here: the runtime's plugins and buffers go with it.
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return 0;
}
