// plugins/cpu/cpu_plugin.c: the "cpu" expert-kernel plugin (kernel ABI version 3): its table, its
// context and settings, and its host queues and events. The ops live in the other cpu_*.c files
// (cpu_internal.h lists them).
// defines: DSMOE_KERNEL_PLUGIN_ENTRY (dsmoe_kernel_plugin_entry_v3), the only exported symbol
//
// Contracts are the comments in include/dsmoe/kernel_plugin.h. Invariants of this plugin: buffers are
// host memory (mem_kind DSMOE_MEM_HOST); every op runs on the calling thread (spread over the
// context's OpenMP threads) before it returns, so a queue is an in-order host queue that is always
// drained and an event is always complete; the first data error found while running is sticky
// (cpu_internal.h); a result never depends on the thread count.
#define _GNU_SOURCE // sched_setaffinity, CPU_SET
#include <omp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h> // openblas_get_config, openblas_get_parallel

#include "cpu_bf16.h"     // cpu_bf16_detect, cpu_dnnl_init, the bf16 members
#include "cpu_internal.h" // the context, the ops
#include "cpu_distill.h"  // cpu_distill_forward, cpu_distill_backward

// ---------------------------------------------------------------------------------------------------
// Settings (types.h, "plugin-declared settings"): [kernel.cpu] in a deck, DSMOE_KERNEL_CPU_<KEY>.

enum { PARAM_POISON, PARAM_SMALL_ROWS, PARAM_SIMD, N_PARAMS };

static const dsmoe_param_decl cpu_params[N_PARAMS] = {
    [PARAM_POISON] = {"poison", DSMOE_PARAM_BOOL, "0",
                      "fill alloc() memory not asked zeroed with 0xFF bytes (NaN), to catch reads of unset memory",
                      NULL},
    [PARAM_SMALL_ROWS] = {"small_rows", DSMOE_PARAM_INT, "8",
                          "float32 GEMMs x @ w^T (and expert groups) of at most this many rows, and cached attention "
                          "of at most this many new tokens, run as dot products that read each weight (each cached "
                          "key and value) once, at memory speed (decode); 0 = OpenBLAS always, bitwise as ABI-1 "
                          "versions of this plugin; at most 16",
                          NULL},
    [PARAM_SIMD] = {"simd", DSMOE_PARAM_ENUM, "auto",
                    "vectors of the GELU kernels (op and GEMM epilogues): avx512 (512-bit; refused on a CPU "
                    "without AVX-512), build (the build's target, DSMOE_CPU_ARCH), auto = avx512 where the CPU "
                    "has it; the same bits either way",
                    "auto|avx512|build"},
};

// Setting i's text: the value the core passed, or the declared default (no values, or not as many as
// the settings: param_bool refuses that).
static const char *param_text(const dsmoe_kernel_options *opt, int i) {
    if (opt && opt->param_values && opt->n_param_values == N_PARAMS && opt->param_values[i])
        return opt->param_values[i];
    return cpu_params[i].default_value;
}

// The value of a BOOL setting as the core passes it ("1" or "0"), the usual spellings accepted too;
// the declared default without values.
static int param_bool(const dsmoe_kernel_options *opt, int i, int *out, char *errbuf, size_t errlen) {
    if (opt && opt->param_values && opt->n_param_values != N_PARAMS) {
        snprintf(errbuf, errlen, "cpu: init: %d setting values for the plugin's %d settings", opt->n_param_values,
                 N_PARAMS);
        return -1;
    }
    const char *v = param_text(opt, i);
    static const char *yes[] = {"1", "true", "yes", "on"}, *no[] = {"0", "false", "no", "off"};
    for (int k = 0; k < 4; k++) {
        if (!strcmp(v, yes[k]))
            return *out = 1, 0;
        if (!strcmp(v, no[k]))
            return *out = 0, 0;
    }
    snprintf(errbuf, errlen, "cpu: init: setting %s='%s': expected a boolean (1/0, true/false, yes/no, on/off)",
             cpu_params[i].name, v);
    return -1;
}

// The value of an INT setting in [lo, hi] (the core has checked it is an integer); the default without values.
static int param_int(const dsmoe_kernel_options *opt, int i, int lo, int hi, int *out, char *errbuf, size_t errlen) {
    const char *v = param_text(opt, i);
    char *end;
    long x = strtol(v, &end, 10);
    if (end == v || *end || x < lo || x > hi) {
        snprintf(errbuf, errlen, "cpu: init: setting %s='%s': expected an integer in [%d, %d]", cpu_params[i].name, v,
                 lo, hi);
        return -1;
    }
    *out = (int)x;
    return 0;
}

// The GELU kernels an ENUM value of `simd` names (the core has checked it is one of the choices).
static int param_simd(const dsmoe_kernel_options *opt, const cpu_vec **out, char *errbuf, size_t errlen) {
    const char *v = param_text(opt, PARAM_SIMD);
    int have = cpu_vec_have_avx512();
    if (!strcmp(v, "auto")) {
        *out = have ? &cpu_vec_avx512 : &cpu_vec_build;
    } else if (!strcmp(v, "build")) {
        *out = &cpu_vec_build;
    } else if (!strcmp(v, "avx512") && have) {
        *out = &cpu_vec_avx512;
    } else if (!strcmp(v, "avx512")) {
        snprintf(errbuf, errlen, "cpu: init: setting simd='avx512': this CPU (or its OS) has no AVX-512F/DQ/BW/VL; "
                 "use simd = auto or build");
        return -1;
    } else {
        snprintf(errbuf, errlen, "cpu: init: setting simd='%s': expected auto, avx512 or build", v);
        return -1;
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// Context

// Threads: options->threads, else the first number of OMP_NUM_THREADS ("4" or "4,2"), else 1.
static dsmoe_status resolve_threads(const dsmoe_kernel_options *opt, int *threads, char *errbuf, size_t errlen) {
    if (opt && opt->threads < 0) {
        snprintf(errbuf, errlen, "cpu: init: threads=%d: expected 0 (automatic) or a positive count", opt->threads);
        return DSMOE_ERR_INVALID;
    }
    if (opt && opt->threads > 0) {
        *threads = opt->threads;
        return DSMOE_OK;
    }
    const char *env = getenv("OMP_NUM_THREADS");
    if (!env || !*env) {
        *threads = 1;
        return DSMOE_OK;
    }
    char *end;
    long v = strtol(env, &end, 10);
    if (end == env || v < 1 || v > 4096 || (*end && *end != ',')) {
        snprintf(errbuf, errlen, "cpu: init: OMP_NUM_THREADS='%s': expected a positive thread count", env);
        return DSMOE_ERR_INVALID;
    }
    *threads = (int)v;
    return DSMOE_OK;
}

static const char *blas_threading_name(int parallel) {
    switch (parallel) {
    case 0: return "sequential";
    case 1: return "pthreads";
    case 2: return "OpenMP";
    }
    return "unknown";
}

// Pins OpenMP thread t to thread_cpus[t % n] (options contract). libgomp keeps its team threads for later
// regions of the same size, which is every region of this plugin (num_threads(ctx->threads)), so the
// pinning holds for the run. Fills errbuf and returns non-OK when the OS refuses a CPU.
static dsmoe_status pin_threads(int threads, const int *cpus, int n, char *errbuf, size_t errlen) {
    int failed_cpu = -1;
#pragma omp parallel num_threads(threads)
    {
        int cpu = cpus[omp_get_thread_num() % n];
        cpu_set_t one;
        CPU_ZERO(&one);
        if (cpu >= 0 && cpu < CPU_SETSIZE)
            CPU_SET(cpu, &one);
        if (cpu < 0 || cpu >= CPU_SETSIZE || sched_setaffinity(0, sizeof one, &one) != 0) {
#pragma omp critical
            failed_cpu = cpu;
        }
    }
    if (failed_cpu == -1)
        return DSMOE_OK;
    snprintf(errbuf, errlen, "cpu: init: cannot pin a compute thread to CPU %d (options.thread_cpus): not a CPU "
             "this process may use", failed_cpu);
    return DSMOE_ERR_INVALID;
}

static void log_line(const dsmoe_kernel_options *opt, dsmoe_log_level level, const char *line) {
    if (opt->log)
        opt->log(opt->log_user, level, line);
    else
        fprintf(stderr, "dsmoe: %s\n", line);
}

static dsmoe_status cpu_init(const dsmoe_kernel_options *opt, dsmoe_kernel_ctx **out, char *errbuf, size_t errlen) {
    *out = NULL;
    int threads, poison, small_rows;
    const cpu_vec *vec;
    dsmoe_status s = resolve_threads(opt, &threads, errbuf, errlen);
    if (s != DSMOE_OK)
        return s;
    if (param_bool(opt, PARAM_POISON, &poison, errbuf, errlen) ||
        param_int(opt, PARAM_SMALL_ROWS, 0, CPU_SMALL_ROWS_MAX, &small_rows, errbuf, errlen) ||
        param_simd(opt, &vec, errbuf, errlen))
        return DSMOE_ERR_INVALID;
    dsmoe_kernel_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        snprintf(errbuf, errlen, "cpu: init: cannot allocate the context (%zu bytes)", sizeof *ctx);
        return DSMOE_ERR_NOMEM;
    }
    ctx->threads = threads;
    ctx->poison = poison;
    ctx->small_rows = small_rows;
    ctx->vec = vec;
    ctx->sticky = DSMOE_OK;
    ctx->queue.ctx = ctx;
    cpu_blas_single_threaded();
    int pinned = opt && opt->thread_cpus && opt->n_thread_cpus > 0;
    if (pinned && (s = pin_threads(threads, opt->thread_cpus, opt->n_thread_cpus, errbuf, errlen)) != DSMOE_OK) {
        free(ctx);
        return s;
    }
    // bfloat16 GEMMs: oneDNN on the CPU's bf16 units, else emulated (cpu_dnnl.c says which and why).
    cpu_isa_bf16 isa;
    cpu_bf16_detect(&isa);
    char bf16[320];
    if ((s = cpu_dnnl_init(ctx, &isa, bf16, sizeof bf16, errbuf, errlen)) != DSMOE_OK) {
        free(ctx);
        return s;
    }
    // openblas_get_config() is e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64 " (the
    // trailing space is OpenBLAS's).
    char blas[256];
    snprintf(blas, sizeof blas, "%s", openblas_get_config());
    for (size_t n = strlen(blas); n > 0 && blas[n - 1] == ' '; n--)
        blas[n - 1] = '\0';
    snprintf(ctx->description, sizeof ctx->description,
             "cpu: %s (%s build, called single-threaded on %dx%d GEMM tiles; dot products up to %d rows) for float32, "
             "%s, GELU on %s, %d OpenMP thread%s%s%s",
             blas, blas_threading_name(openblas_get_parallel()), CPU_GEMM_TILE_M, CPU_GEMM_TILE_N, small_rows, bf16,
             vec->vectors, threads,
             threads == 1 ? "" : "s", pinned ? " pinned to one CPU each" : "",
             poison ? ", unzeroed allocations poisoned" : "");
    if (opt && opt->verbose) {
        char line[sizeof ctx->description + 32];
        snprintf(line, sizeof line, "kernel plugin %s", ctx->description);
        log_line(opt, DSMOE_LOG_INFO, line);
        if (!ctx->dnnl) {
            snprintf(line, sizeof line, "kernel plugin cpu: %s", bf16);
            log_line(opt, DSMOE_LOG_WARN, line);
        }
    }
    *out = ctx;
    return DSMOE_OK;
}

static void cpu_finalize(dsmoe_kernel_ctx *ctx) {
    if (!ctx)
        return;
    while (ctx->queues) {
        dsmoe_kernel_queue *next = ctx->queues->next;
        free(ctx->queues);
        ctx->queues = next;
    }
    while (ctx->events) {
        dsmoe_kernel_event *next = ctx->events->next;
        free(ctx->events);
        ctx->events = next;
    }
    cpu_bf16_free_slots(ctx);
    cpu_stage_free(ctx); // the scratch arena (cpu_scratch.c)
    cpu_dnnl_fini(ctx);
    free(ctx);
}

static const char *cpu_last_error(dsmoe_kernel_ctx *ctx) { return ctx ? ctx->error : "cpu: no context"; }

static const char *cpu_describe(dsmoe_kernel_ctx *ctx) { return ctx->description; }

// ---------------------------------------------------------------------------------------------------
// Queues and events: work never waits, so these only keep the contract's bookkeeping and errors.

static dsmoe_kernel_queue *cpu_default_queue(dsmoe_kernel_ctx *ctx) { return &ctx->queue; }

static dsmoe_status cpu_queue_create(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue **q) {
    CPU_REQUIRE(ctx, q, "cpu: queue_create: NULL q");
    *q = NULL;
    if (ctx->sticky != DSMOE_OK)
        return ctx->sticky;
    dsmoe_kernel_queue *n = calloc(1, sizeof *n);
    if (!n)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: queue_create: out of memory");
    n->ctx = ctx;
    n->next = ctx->queues;
    ctx->queues = n;
    *q = n;
    return DSMOE_OK;
}

static void cpu_queue_destroy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) {
    for (dsmoe_kernel_queue **p = &ctx->queues; *p; p = &(*p)->next)
        if (*p == q) {
            *p = q->next;
            free(q);
            return;
        }
}

static void *cpu_queue_native(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) { return NULL; }

// The queue is always drained, so "when q reaches it" is now.
static dsmoe_status cpu_queue_enqueue_host(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void (*fn)(void *arg),
                                           void *arg) {
    CPU_BEGIN(ctx, q, "queue_enqueue_host");
    CPU_REQUIRE(ctx, fn, "cpu: queue_enqueue_host: NULL fn");
    fn(arg);
    return DSMOE_OK;
}

static dsmoe_status cpu_queue_synchronize(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q) {
    CPU_BEGIN(ctx, q, "queue_synchronize");
    return DSMOE_OK;
}

static dsmoe_status cpu_synchronize(dsmoe_kernel_ctx *ctx) { return ctx ? ctx->sticky : DSMOE_ERR_INVALID; }

static dsmoe_status cpu_event_create(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event **ev) {
    CPU_REQUIRE(ctx, ev, "cpu: event_create: NULL ev");
    *ev = NULL;
    if (ctx->sticky != DSMOE_OK)
        return ctx->sticky;
    dsmoe_kernel_event *e = calloc(1, sizeof *e);
    if (!e)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: event_create: out of memory");
    e->ctx = ctx;
    e->next = ctx->events;
    ctx->events = e;
    *ev = e;
    return DSMOE_OK;
}

static void cpu_event_destroy(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev) {
    for (dsmoe_kernel_event **p = &ctx->events; *p; p = &(*p)->next)
        if (*p == ev) {
            *p = ev->next;
            free(ev);
            return;
        }
}

static dsmoe_status check_event(dsmoe_kernel_ctx *ctx, const dsmoe_kernel_event *ev, const char *op) {
    if (!ctx)
        return DSMOE_ERR_INVALID;
    if (ctx->sticky != DSMOE_OK)
        return ctx->sticky;
    CPU_REQUIRE(ctx, ev && ev->ctx == ctx, "cpu: %s: the event is %s", op, ev ? "not one of this context's" : "NULL");
    return DSMOE_OK;
}

static dsmoe_status cpu_event_record(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, dsmoe_kernel_queue *q) {
    CPU_BEGIN(ctx, q, "event_record");
    return check_event(ctx, ev, "event_record");
}

static dsmoe_status cpu_queue_wait_event(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, dsmoe_kernel_event *ev) {
    CPU_BEGIN(ctx, q, "queue_wait_event");
    return check_event(ctx, ev, "queue_wait_event");
}

static dsmoe_status cpu_event_synchronize(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev) {
    return check_event(ctx, ev, "event_synchronize");
}

static dsmoe_status cpu_event_query(dsmoe_kernel_ctx *ctx, dsmoe_kernel_event *ev, int *done) {
    CPU_TRY(check_event(ctx, ev, "event_query"));
    CPU_REQUIRE(ctx, done, "cpu: event_query: NULL done");
    *done = 1;
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// The table

static const dsmoe_kernel_plugin_v3 cpu_plugin = {
    .api_version = DSMOE_KERNEL_API_VERSION,
    .name = "cpu",
#ifdef DSMOE_CPU_ONEDNN
    .description = "host memory, OpenMP loops, OpenBLAS (float32) and oneDNN (bfloat16 GEMMs)",
#else
    .description = "host memory, OpenMP loops and OpenBLAS (bfloat16 GEMMs emulated: built without oneDNN)",
#endif
    .mem_kind = DSMOE_MEM_HOST,
    // bfloat16 always: without bf16 units (or oneDNN) its GEMMs are emulated, and init says so.
    .caps = DSMOE_KCAP_BF16 | DSMOE_KCAP_FUSED_EPILOGUE | DSMOE_KCAP_DETERMINISTIC | DSMOE_KCAP_HOST_MEMORY |
            DSMOE_KCAP_INFERENCE | DSMOE_KCAP_DISTILL,
    .dtypes = DSMOE_DTYPE_BIT(DSMOE_FLOAT32) | DSMOE_DTYPE_BIT(DSMOE_BFLOAT16),
    .params = cpu_params,
    .n_params = N_PARAMS,

    .init = cpu_init,
    .finalize = cpu_finalize,
    .last_error = cpu_last_error,
    .describe = cpu_describe,
    .device_count = NULL,
    .device_pci_bus_id = NULL,
    .mem_info = cpu_mem_info,
    .attention_bytes = cpu_attention_bytes,

    .default_queue = cpu_default_queue,
    .queue_create = cpu_queue_create,
    .queue_destroy = cpu_queue_destroy,
    .queue_native = cpu_queue_native,
    .queue_enqueue_host = cpu_queue_enqueue_host,
    .queue_synchronize = cpu_queue_synchronize,
    .synchronize = cpu_synchronize,
    .event_create = cpu_event_create,
    .event_destroy = cpu_event_destroy,
    .event_record = cpu_event_record,
    .queue_wait_event = cpu_queue_wait_event,
    .event_synchronize = cpu_event_synchronize,
    .event_query = cpu_event_query,

    .alloc = cpu_alloc,
    .free = cpu_free,
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_host_free,
    .copy_to_device = cpu_copy_to_device,
    .copy_to_host = cpu_copy_to_host,
    .copy = cpu_copy,
    .copy_2d = cpu_copy_2d,
    .zero = cpu_zero,

    .gemm = cpu_gemm,
    .gemm_grouped = cpu_gemm_grouped,
    .gemm_grouped_wgrad = cpu_gemm_grouped_wgrad,

    .bias_add = cpu_bias_add, // every op takes bf16 in place (docs/plugins.md)
    .bias_backward = cpu_bias_backward,
    .axpy = cpu_axpy,
    .mul_uniform_noise = cpu_mul_uniform_noise,
    .sum_squares = cpu_sum_squares,
    .all_finite = cpu_all_finite,
    .convert = cpu_convert,
    .init_tensor = cpu_init_tensor,

    .embedding_forward = cpu_embedding_forward,
    .embedding_backward = cpu_embedding_backward,
    .layernorm_forward = cpu_layernorm_forward,
    .layernorm_backward = cpu_layernorm_backward,
    .gelu_forward = cpu_gelu_forward,
    .gelu_backward = cpu_gelu_backward,
    .attention_forward = cpu_attention_forward,
    .attention_backward = cpu_attention_backward,
    .crossentropy_forward = cpu_crossentropy_forward,
    .crossentropy_backward = cpu_crossentropy_backward,

    .gate_route = cpu_gate_route,
    .gate_assign = cpu_gate_assign,
    .gate_backward = cpu_gate_backward,
    .moe_dispatch = cpu_moe_dispatch,
    .moe_dispatch_backward = cpu_moe_dispatch_backward,
    .moe_combine = cpu_moe_combine,
    .moe_combine_backward = cpu_moe_combine_backward,

    .residual_mix_forward = cpu_residual_mix_forward,
    .residual_mix_backward = cpu_residual_mix_backward,

    .adamw = cpu_adamw,

    .kv_append = cpu_kv_append,
    .attention_cached = cpu_attention_cached,
    .sample = cpu_sample,

    .distill_forward = cpu_distill_forward,
    .distill_backward = cpu_distill_backward,

    .gate = cpu_gate,
};

DSMOE_PLUGIN_EXPORT const dsmoe_kernel_plugin_v3 *DSMOE_KERNEL_PLUGIN_ENTRY(void) { return &cpu_plugin; }
