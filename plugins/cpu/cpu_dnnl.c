// plugins/cpu/cpu_dnnl.c: oneDNN in the cpu plugin: bf16 matmul primitives with every size given at run
// time, cached per kind, each run single-threaded on the calling compute thread. Without oneDNN at
// build time (DSMOE_CPU_ONEDNN undefined) the functions are stubs and bf16 GEMMs are emulated.
// defines: cpu_dnnl_built, cpu_dnnl_init, cpu_dnnl_fini, cpu_dnnl_get, cpu_dnnl_run
//
// Why single-threaded primitives on our tiles rather than oneDNN's own threading: the contract wants
// results independent of the thread count, and oneDNN chooses its blocking, and for some shapes splits
// K over threads, from the thread count it runs with. A primitive made and run with one thread, on a
// tile whose shape depends on (m, n) only, computes each output element in the same order whatever
// the context's thread count (cpu_gemm_bf16.c spreads the tiles). oneDNN runs on OpenMP (libgomp, as
// this plugin): a primitive run inside our parallel region would run on one thread anyway; each run
// also sets its thread's OpenMP team size to 1 so that this holds with one compute thread too.
//
// Why all sizes at run time: grouped GEMMs have per-expert row counts that change every step, so a
// primitive per shape would be made (and JIT-compiled) over and over. With run-time sizes oneDNN 2.6
// picks its GEMM-based matmul (gemm:jit, AVX512-BF16 vdpbf16ps kernels, or AMX), which measured as
// fast on 256 x 512 tiles as its brgemm matmul on whole expert GEMMs (bench/bench_gemm.c, docs/
// performance.md). A kind is (transposes, leading dimensions, alpha, beta): a handful per model.
#include <stdio.h>
#include <stdlib.h>

#include "cpu_bf16.h" // cpu_mm_key, cpu_isa_bf16

#ifndef DSMOE_CPU_ONEDNN

int cpu_dnnl_built(void) { return 0; }

dsmoe_status cpu_dnnl_init(cpu_ctx *ctx, const cpu_isa_bf16 *isa, char *what, size_t len, char *errbuf,
                           size_t errlen) {
    snprintf(what, len, "bfloat16 GEMMs emulated (slow: float32 OpenBLAS on converted operands; the plugin was "
             "built without oneDNN)");
    return DSMOE_OK;
}

void cpu_dnnl_fini(cpu_ctx *ctx) {}

dsmoe_status cpu_dnnl_get(cpu_ctx *ctx, const cpu_mm_key *key, cpu_mm **mm) {
    return cpu_fail(ctx, DSMOE_ERR_INTERNAL, "cpu: oneDNN matmul asked for, but the plugin has no oneDNN");
}

int cpu_dnnl_run(cpu_ctx *ctx, const cpu_mm *mm, int slot, int m, int n, int k, const uint16_t *a,
                 const uint16_t *b, float *c) {
    return -1;
}

#else

#include <dnnl.h>
#include <omp.h>

struct cpu_mm {
    cpu_mm_key key;
    dnnl_primitive_t prim;
    struct cpu_mm *next;
};

struct cpu_dnnl {
    dnnl_engine_t engine;
    dnnl_stream_t *streams; // (threads): one per compute thread
    int n_streams;
    cpu_mm *cache; // every kind made so far, newest first
    int cached;
};

// Kinds kept at most; past it the cache starts over (a model has a handful of kinds).
#define CPU_DNNL_CACHE_MAX 256

int cpu_dnnl_built(void) { return 1; }

static const char *isa_name(dnnl_cpu_isa_t isa) {
    switch (isa) {
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_sse41: return "sse41";
    default: return "an unknown ISA";
    }
}

// Row-major (rows, cols) with leading dimension ld, stored transposed when trans; dims may be run-time.
static dnnl_status_t md_2d(dnnl_memory_desc_t *md, int64_t rows, int64_t cols, int ld, int trans,
                           dnnl_data_type_t dt) {
    dnnl_dims_t dims = {rows, cols}, strides = {trans ? 1 : ld, trans ? ld : 1};
    return dnnl_memory_desc_init_by_strides(md, 2, dims, dt, strides);
}

// Makes the primitive of a kind for one thread: oneDNN sizes its work by omp_get_max_threads().
static dnnl_status_t make_prim(struct cpu_dnnl *D, const cpu_mm_key *key, dnnl_primitive_t *prim, const char **impl) {
    const int64_t R = DNNL_RUNTIME_DIM_VAL;
    dnnl_memory_desc_t a, b, c;
    dnnl_matmul_desc_t desc;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t post = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_status_t s;
    int outer = omp_get_max_threads();
    omp_set_num_threads(1);
    if ((s = md_2d(&a, R, R, key->lda, key->ta, dnnl_bf16)) || (s = md_2d(&b, R, R, key->ldb, key->tb, dnnl_bf16)) ||
        (s = md_2d(&c, R, R, key->ldc, 0, dnnl_f32)) || (s = dnnl_matmul_desc_init(&desc, &a, &b, NULL, &c)) ||
        (s = dnnl_primitive_attr_create(&attr)))
        goto done;
    if (key->alpha != 1.0f && (s = dnnl_primitive_attr_set_output_scales(attr, 1, 0, &key->alpha)))
        goto done;
    if (key->beta != 0.0f && ((s = dnnl_post_ops_create(&post)) || (s = dnnl_post_ops_append_sum(post, key->beta)) ||
                              (s = dnnl_primitive_attr_set_post_ops(attr, post))))
        goto done;
    if ((s = dnnl_primitive_desc_create(&pd, &desc, attr, D->engine, NULL)))
        goto done;
    if (impl && (s = dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, impl)))
        goto done;
    s = dnnl_primitive_create(prim, pd);
done:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    if (post)
        dnnl_post_ops_destroy(post);
    if (attr)
        dnnl_primitive_attr_destroy(attr);
    omp_set_num_threads(outer);
    return s;
}

static void free_cache(struct cpu_dnnl *D) {
    while (D->cache) {
        cpu_mm *next = D->cache->next;
        dnnl_primitive_destroy(D->cache->prim);
        free(D->cache);
        D->cache = next;
    }
    D->cached = 0;
}

void cpu_dnnl_fini(cpu_ctx *ctx) {
    struct cpu_dnnl *D = ctx->dnnl;
    if (!D)
        return;
    free_cache(D);
    for (int t = 0; t < D->n_streams; t++)
        if (D->streams[t])
            dnnl_stream_destroy(D->streams[t]);
    free(D->streams);
    if (D->engine)
        dnnl_engine_destroy(D->engine);
    free(D);
    ctx->dnnl = NULL;
}

dsmoe_status cpu_dnnl_init(cpu_ctx *ctx, const cpu_isa_bf16 *isa, char *what, size_t len, char *errbuf,
                           size_t errlen) {
    const dnnl_version_t *v = dnnl_version();
    char lib[64];
    snprintf(lib, sizeof lib, "oneDNN %d.%d.%d", v->major, v->minor, v->patch);
    if (!isa->avx512_bf16 && !isa->amx_bf16) {
        snprintf(what, len, "bfloat16 GEMMs emulated (slow: float32 OpenBLAS on converted operands; the CPU has "
                 "neither AVX512_BF16 nor AMX-BF16, so %s has no bf16 units to use)", lib);
        return DSMOE_OK;
    }
    dnnl_cpu_isa_t eff = dnnl_get_effective_cpu_isa();
    if (((unsigned)eff & dnnl_cpu_isa_avx512_core_bf16) != dnnl_cpu_isa_avx512_core_bf16) {
        snprintf(what, len, "bfloat16 GEMMs emulated (slow: float32 OpenBLAS on converted operands; %s "
                 "dispatches to %s only, below avx512_core_bf16: ONEDNN_MAX_CPU_ISA?)", lib, isa_name(eff));
        return DSMOE_OK;
    }
    struct cpu_dnnl *D = calloc(1, sizeof *D);
    if (!D || !(D->streams = calloc((size_t)ctx->threads, sizeof *D->streams))) {
        free(D);
        snprintf(errbuf, errlen, "cpu: init: cannot allocate oneDNN's state for %d threads", ctx->threads);
        return DSMOE_ERR_NOMEM;
    }
    ctx->dnnl = D;
    D->n_streams = ctx->threads;
    dnnl_status_t s = dnnl_engine_create(&D->engine, dnnl_cpu, 0);
    for (int t = 0; t < ctx->threads && s == dnnl_success; t++)
        s = dnnl_stream_create(&D->streams[t], D->engine, dnnl_stream_default_flags);
    // The implementation oneDNN picks for run-time sizes: a reference one would be far slower than
    // emulation, so it is refused here rather than found in a profile.
    dnnl_primitive_t probe = NULL;
    const char *impl = "";
    cpu_mm_key key = {.lda = 64, .ldb = 64, .ldc = 64, .alpha = 1.0f};
    if (s == dnnl_success)
        s = make_prim(D, &key, &probe, &impl);
    int reference = s == dnnl_success && strncmp(impl, "ref", 3) == 0;
    if (probe)
        dnnl_primitive_destroy(probe);
    if (s != dnnl_success || reference) {
        cpu_dnnl_fini(ctx);
        if (reference)
            snprintf(what, len, "bfloat16 GEMMs emulated (slow: float32 OpenBLAS on converted operands; %s offers "
                     "only its reference matmul '%s' for bf16 here)", lib, impl);
        else
            snprintf(what, len, "bfloat16 GEMMs emulated (slow: float32 OpenBLAS on converted operands; %s failed "
                     "to start: status %d)", lib, (int)s);
        return DSMOE_OK;
    }
    snprintf(what, len, "%s %s (%s, single-threaded on %dx%d tiles) for bfloat16", lib, isa_name(eff), impl,
             CPU_BF16_TILE_M, CPU_BF16_TILE_N);
    return DSMOE_OK;
}

dsmoe_status cpu_dnnl_get(cpu_ctx *ctx, const cpu_mm_key *key, cpu_mm **mm) {
    struct cpu_dnnl *D = ctx->dnnl;
    for (cpu_mm *e = D->cache; e; e = e->next)
        if (!memcmp(&e->key, key, sizeof *key)) {
            *mm = e;
            return DSMOE_OK;
        }
    if (D->cached >= CPU_DNNL_CACHE_MAX)
        free_cache(D);
    cpu_mm *e = calloc(1, sizeof *e);
    if (!e)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: cannot allocate a oneDNN cache entry");
    e->key = *key;
    dnnl_status_t s = make_prim(D, key, &e->prim, NULL);
    if (s != dnnl_success) {
        free(e);
        return cpu_fail(ctx, DSMOE_ERR_SYSTEM, "cpu: oneDNN bf16 matmul (trans %d/%d, ld %d/%d/%d, alpha %g, beta %g) "
                        "could not be made: status %d", key->ta, key->tb, key->lda, key->ldb, key->ldc,
                        (double)key->alpha, (double)key->beta, (int)s);
    }
    e->next = D->cache;
    D->cache = e;
    D->cached++;
    *mm = e;
    return DSMOE_OK;
}

int cpu_dnnl_run(cpu_ctx *ctx, const cpu_mm *mm, int slot, int m, int n, int k, const uint16_t *a,
                 const uint16_t *b, float *c) {
    struct cpu_dnnl *D = ctx->dnnl;
    const cpu_mm_key *key = &mm->key;
    dnnl_memory_desc_t ad, bd, cd;
    dnnl_memory_t am = NULL, bm = NULL, cm = NULL;
    dnnl_status_t s;
    int outer = omp_get_max_threads();
    omp_set_num_threads(1);
    if (!(s = md_2d(&ad, m, k, key->lda, key->ta, dnnl_bf16)) &&
        !(s = md_2d(&bd, k, n, key->ldb, key->tb, dnnl_bf16)) &&
        !(s = md_2d(&cd, m, n, key->ldc, 0, dnnl_f32)) && !(s = dnnl_memory_create(&am, &ad, D->engine, (void *)a)) &&
        !(s = dnnl_memory_create(&bm, &bd, D->engine, (void *)b)) &&
        !(s = dnnl_memory_create(&cm, &cd, D->engine, c))) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
        s = dnnl_primitive_execute(mm->prim, D->streams[slot], 3, args);
        if (s == dnnl_success)
            s = dnnl_stream_wait(D->streams[slot]);
    }
    if (am)
        dnnl_memory_destroy(am);
    if (bm)
        dnnl_memory_destroy(bm);
    if (cm)
        dnnl_memory_destroy(cm);
    omp_set_num_threads(outer);
    return (int)s;
}

#endif
