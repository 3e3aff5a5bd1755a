// plugins/cuda/cuda_plugin.c: the "cuda" expert-kernel plugin (kernel ABI version 3): its table, its
// settings, the context's life (init, finalize, last_error, describe) and the device queries the core
// makes before init. Queues and events are cuda_queue.c, memory cuda_memory.c, the compute members
// cuda_ops.c (each forwards to its launcher in kernels/).
// defines: DSMOE_KERNEL_PLUGIN_ENTRY (dsmoe_kernel_plugin_entry_v3), the only exported symbol
//
// A context drives one device (options.device): a stream-ordered memory pool, one cuBLAS handle, the
// fault record the kernels write bad data into, and a default queue. Everything is
// asynchronous (DSMOE_KCAP_ASYNC): the core waits with events.
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

// ---------------------------------------------------------------------------------------------------
// Settings (types.h, "plugin-declared settings"): [kernel.cuda] in a deck, DSMOE_KERNEL_CUDA_<KEY>.

enum { PARAM_TF32, PARAM_POOL_LIMIT, PARAM_WORKSPACE, PARAM_FUSED, PARAM_ATT_TC, PARAM_ROWS, PARAM_SPLIT, N_PARAMS };

static const dsmoe_param_decl cuda_params[N_PARAMS] = {
    [PARAM_TF32] = {"tf32", DSMOE_PARAM_BOOL, "false",
                    "float32 GEMMs use TF32 tensor cores (faster, ~1e-3 relative error)", NULL},
    [PARAM_POOL_LIMIT] = {"pool_limit_bytes", DSMOE_PARAM_INT, "0",
                          "most bytes of device memory the run's buffers may hold at once (K/M/G suffixes); "
                          "0 = as much as the device has", NULL},
    [PARAM_WORKSPACE] = {"cublas_workspace_bytes", DSMOE_PARAM_INT, "33554432",
                         "cuBLAS workspace of each queue, bytes (K/M/G suffixes; cuBLAS suggests 32 MiB on Hopper)",
                         NULL},
    [PARAM_FUSED] = {"fused_epilogues", DSMOE_PARAM_BOOL, "false",
                     "grouped GEMMs (the experts, the dense FFN's first) apply bias, GELU and its backward inside cuBLASLt (one "
                     "pass over the output, "
                     "no float32 scratch); where cuBLASLt has no kernel for a shape the separate epilogue runs",
                     NULL},
    [PARAM_ATT_TC] = {"attention_tensor_cores", DSMOE_PARAM_BOOL, "true",
                      "bfloat16 attention (forward and backward) on tensor cores when the head dimension is a "
                      "multiple of 16 up to 128; otherwise, and in float32, the CUDA-core kernels", NULL},
    [PARAM_ROWS] = {"expert_rows_max", DSMOE_PARAM_INT, "16",
                    "expert GEMMs (forward) whose capacity is at most this many rows (decode, small batches) run on "
                    "dsmoe's kernel: an expert that received no token reads none of its weights, and only the rows "
                    "received are computed (cuBLAS computes every expert at full capacity); 0 = always cuBLAS, at "
                    "most 256", NULL},
    [PARAM_SPLIT] = {"decode_split_keys", DSMOE_PARAM_INT, "128",
                     "cached attention of up to 16 new tokens a sequence (decode) splits the cache into runs of this "
                     "many keys, one block each, joined in a fixed order: a long context is read by many "
                     "multiprocessors at once instead of one per head; the results depend on this value and the "
                     "context length, not on the device; 0 = never split, at most 1048576", NULL},
};

// The text of setting i: the core's resolved value, else the declared default (init called without
// values, as by a test).
static const char *param_text(const dsmoe_kernel_options *opt, int i) {
    if (opt && opt->param_values && opt->param_values[i])
        return opt->param_values[i];
    return cuda_params[i].default_value;
}

// BOOL: the core passes "1" or "0"; the usual spellings are accepted too.
static int parse_bool(const char *v, int *out) {
    static const char *yes[] = {"1", "true", "yes", "on"}, *no[] = {"0", "false", "no", "off"};
    for (int k = 0; k < 4; k++) {
        if (!strcmp(v, yes[k]))
            return *out = 1, 0;
        if (!strcmp(v, no[k]))
            return *out = 0, 0;
    }
    return -1;
}

// A byte count >= 0, as the core reads INT settings: a decimal integer, or a number with K, M, G or T
// (10^3 ...) or Ki, Mi, Gi, Ti (2^10 ...) that comes out whole. The core normalises values to plain
// integers; the suffixes matter only for the defaults and for a caller without the core.
static int parse_bytes(const char *v, size_t *out) {
    char *end;
    errno = 0;
    long long i = strtoll(v, &end, 10);
    if (end != v && *end == '\0' && errno == 0) {
        if (i < 0)
            return -1;
        *out = (size_t)i;
        return 0;
    }
    errno = 0;
    double d = strtod(v, &end);
    if (end == v || errno != 0 || !isfinite(d))
        return -1;
    double mult = 1;
    if (*end) {
        int k = *end == 'K' || *end == 'k' ? 1 : *end == 'M' ? 2 : *end == 'G' ? 3 : *end == 'T' ? 4 : 0;
        if (!k)
            return -1;
        end++;
        int binary = *end == 'i';
        end += binary;
        if (*end)
            return -1;
        for (int j = 0; j < k; j++)
            mult *= binary ? 1024.0 : 1000.0;
    }
    d *= mult;
    if (d < 0 || d != floor(d) || d >= 9.2e18)
        return -1;
    *out = (size_t)d;
    return 0;
}

static dsmoe_status read_settings(const dsmoe_kernel_options *opt, int *tf32, int *fused, int *att_tc,
                                  int *rows_max, int *split_keys, size_t *pool_limit, size_t *workspace, char *errbuf,
                                  size_t errlen) {
    if (opt && opt->param_values && opt->n_param_values != N_PARAMS) {
        snprintf(errbuf, errlen, "cuda: init: %d setting values for the plugin's %d settings", opt->n_param_values,
                 N_PARAMS);
        return DSMOE_ERR_INVALID;
    }
    static const int bools[3] = {PARAM_TF32, PARAM_FUSED, PARAM_ATT_TC};
    int *flags[3] = {tf32, fused, att_tc};
    const char *v;
    for (int k = 0; k < 3; k++) {
        v = param_text(opt, bools[k]);
        if (parse_bool(v, flags[k])) {
            snprintf(errbuf, errlen, "cuda: init: setting %s='%s': expected a boolean (1/0, true/false, yes/no, "
                     "on/off)", cuda_params[bools[k]].name, v);
            return DSMOE_ERR_INVALID;
        }
    }
    static const int sizes[2] = {PARAM_POOL_LIMIT, PARAM_WORKSPACE};
    size_t *outs[2] = {pool_limit, workspace};
    for (int k = 0; k < 2; k++) {
        v = param_text(opt, sizes[k]);
        if (parse_bytes(v, outs[k])) {
            snprintf(errbuf, errlen, "cuda: init: setting %s='%s': expected a byte count >= 0 (K/M/G suffixes "
                     "allowed)", cuda_params[sizes[k]].name, v);
            return DSMOE_ERR_INVALID;
        }
    }
    static const int ints[2] = {PARAM_ROWS, PARAM_SPLIT};
    static const long int_max[2] = {256, 1048576};
    int *int_outs[2] = {rows_max, split_keys};
    for (int k = 0; k < 2; k++) {
        v = param_text(opt, ints[k]);
        char *end;
        errno = 0;
        long i = strtol(v, &end, 10);
        if (end == v || *end || errno || i < 0 || i > int_max[k]) {
            snprintf(errbuf, errlen, "cuda: init: setting %s='%s': expected an integer in [0, %ld]",
                     cuda_params[ints[k]].name, v, int_max[k]);
            return DSMOE_ERR_INVALID;
        }
        *int_outs[k] = (int)i;
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Context

static void cuda_finalize(dsmoe_kernel_ctx *ctx);

static const char *fmt_size(size_t b, char *buf, size_t len) {
    const size_t MiB = (size_t)1 << 20, GiB = (size_t)1 << 30;
    if (b >= GiB)
        snprintf(buf, len, "%.1f GiB", (double)b / (double)GiB);
    else if (b >= MiB && b % MiB == 0)
        snprintf(buf, len, "%zu MiB", b / MiB);
    else
        snprintf(buf, len, "%zu bytes", b);
    return buf;
}

// Everything after the device is chosen and current. Errors go to ctx->error (init copies them out).
static dsmoe_status cuda_setup(dsmoe_kernel_ctx *ctx) {
    const char *op = "init";
    struct cudaDeviceProp prop;
    CU_TRY(cu_cuda(ctx, cudaGetDeviceProperties(&prop, ctx->device), op, "cudaGetDeviceProperties"));
    snprintf(ctx->device_name, sizeof ctx->device_name, "%s", prop.name);
    ctx->cc_major = prop.major;
    ctx->cc_minor = prop.minor;
    ctx->sm_count = prop.multiProcessorCount;
    ctx->total_mem = prop.totalGlobalMem;
    // attention_tensor_cores is on by default: a GPU without bfloat16 tensor cores (before sm_80, A100)
    // keeps the CUDA-core kernels, and describe() says so.
    ctx->attention_tc_dropped = ctx->attention_tc && ctx->cc_major < 8;
    if (ctx->attention_tc_dropped) ctx->attention_tc = 0;

    // The fault record: mapped pinned memory that kernels write and the host reads after a wait. With
    // unified addressing (every 64-bit platform) the host pointer is the device's too.
    CU_TRY(cu_cuda(ctx, cudaHostAlloc((void **)&ctx->fault, sizeof *ctx->fault, cudaHostAllocMapped |
                   cudaHostAllocPortable), op, "cudaHostAlloc (fault record)"));
    memset(ctx->fault, 0, sizeof *ctx->fault);
    cudaError_t e = cudaHostGetDevicePointer((void **)&ctx->fault_dev, ctx->fault, 0);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (!prop.unifiedAddressing)
            return cu_cuda(ctx, e, op, "cudaHostGetDevicePointer (fault record)");
        ctx->fault_dev = ctx->fault;
    }

    CU_TRY(cu_memory_init(ctx));

    CU_TRY(cu_blas(ctx, cublasCreate(&ctx->blas), op, "cublasCreate"));
    // Not CUBLAS_ATOMICS_ALLOWED (the default is not allowed): results stay bitwise reproducible.
    // DISALLOW_REDUCED_PRECISION_REDUCTION: without it cuBLAS may add split-K partial sums of a bfloat16-output
    // GEMM in bfloat16; the ABI accumulates in float32 and rounds once (as the cpu plugin does).
    cublasMath_t math = (cublasMath_t)((ctx->tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH) |
                                       CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    CU_TRY(cu_blas(ctx, cublasSetMathMode(ctx->blas, math), op, "cublasSetMathMode"));
    CU_TRY(cu_blas(ctx, cublasGetVersion(ctx->blas, &ctx->cublas_version), op, "cublasGetVersion"));
    if (ctx->fused)
        CU_TRY(cu_blas(ctx, cublasLtCreate(&ctx->blaslt), op, "cublasLtCreate"));

    CU_TRY(cu_queue_init(ctx, &ctx->queue));

    char mem[32], pool[64], ws[32], split[32] = "never";
    if (ctx->decode_split_keys)
        snprintf(split, sizeof split, "every %d keys", ctx->decode_split_keys);
    if (ctx->pool_limit)
        snprintf(pool, sizeof pool, "limited to %s", fmt_size(ctx->pool_limit, mem, sizeof mem));
    else
        snprintf(pool, sizeof pool, "up to the device's memory");
    int v = ctx->cublas_version;
    snprintf(ctx->description, sizeof ctx->description,
             "cuda: %s (sm_%d%d, %d SMs, %s), cuBLAS %d.%d.%d, tf32 %s, expert GEMM epilogues %s, expert GEMMs of "
             "up to %d rows on dsmoe's kernel, bf16 attention on %s, decode attention split %s, "
             "stream-ordered buffer pool %s, cuBLAS workspace %s per queue", ctx->device_name, ctx->cc_major,
             ctx->cc_minor, ctx->sm_count, fmt_size(ctx->total_mem, mem, sizeof mem), v / 10000, v / 100 % 100,
             v % 100, ctx->tf32 ? "on" : "off", ctx->fused ? "fused (cuBLASLt)" : "separate", ctx->expert_rows_max,
             ctx->attention_tc ? "tensor cores" : ctx->attention_tc_dropped ? "CUDA cores (tensor cores need sm_80)"
                                                                            : "CUDA cores", split, pool,
             fmt_size(ctx->workspace_bytes, ws, sizeof ws));
    return DSMOE_OK;
}

static dsmoe_status cuda_init(const dsmoe_kernel_options *opt, dsmoe_kernel_ctx **out, char *errbuf, size_t errlen) {
    char scratch[8];
    if (!errbuf || !errlen)
        errbuf = scratch, errlen = sizeof scratch;
    errbuf[0] = '\0';
    if (!out) {
        snprintf(errbuf, errlen, "cuda: init: NULL ctx");
        return DSMOE_ERR_INVALID;
    }
    *out = NULL;
    int tf32, fused, att_tc, rows_max, split_keys;
    size_t pool_limit, workspace;
    dsmoe_status s = read_settings(opt, &tf32, &fused, &att_tc, &rows_max, &split_keys, &pool_limit, &workspace, errbuf,
                                   errlen);
    if (s != DSMOE_OK)
        return s;

    int count = 0, device = opt ? opt->device : 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        (void)cudaGetLastError();
        snprintf(errbuf, errlen, "cuda: init: no CUDA device: %s",
                 e != cudaSuccess ? cudaGetErrorString(e) : "the driver sees 0 devices (CUDA_VISIBLE_DEVICES?)");
        return DSMOE_ERR_UNSUPPORTED;
    }
    if (device < 0 || device >= count) {
        snprintf(errbuf, errlen, "cuda: init: device %d: expected an ordinal in [0, %d) (this process sees %d CUDA "
                 "device%s)", device, count, count, count == 1 ? "" : "s");
        return DSMOE_ERR_INVALID;
    }
    e = cudaSetDevice(device);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(errbuf, errlen, "cuda: init: cudaSetDevice(%d): %s (%s)", device, cudaGetErrorString(e),
                 cudaGetErrorName(e));
        return DSMOE_ERR_SYSTEM;
    }

    dsmoe_kernel_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        snprintf(errbuf, errlen, "cuda: init: cannot allocate the context (%zu bytes)", sizeof *ctx);
        return DSMOE_ERR_NOMEM;
    }
    ctx->device = device;
    ctx->tf32 = tf32;
    ctx->fused = fused;
    ctx->attention_tc = att_tc;
    ctx->expert_rows_max = rows_max;
    ctx->decode_split_keys = split_keys;
    ctx->pool_limit = pool_limit;
    ctx->workspace_bytes = workspace;
    ctx->sticky = DSMOE_OK;
    s = cuda_setup(ctx);
    if (s == DSMOE_OK && ctx->sticky != DSMOE_OK)
        s = ctx->sticky;
    if (s != DSMOE_OK) {
        snprintf(errbuf, errlen, "%s", ctx->error[0] ? ctx->error : "cuda: init failed");
        cuda_finalize(ctx);
        return s;
    }
    if (opt && opt->verbose) {
        char line[800];
        snprintf(line, sizeof line, "kernel plugin %s", ctx->description);
        if (opt->log)
            opt->log(opt->log_user, DSMOE_LOG_INFO, line);
        else
            fprintf(stderr, "dsmoe: %s\n", line);
    }
    *out = ctx;
    return DSMOE_OK;
}

// Waits for every queue, frees what the caller left (buffers, queues, events), then the handles. Works on
// a half-made context too (init's failure path): every handle is checked before it is released.
static void cuda_finalize(dsmoe_kernel_ctx *ctx) {
    if (!ctx)
        return;
    (void)cudaSetDevice(ctx->device);
    if (ctx->queue.stream)
        (void)cu_wait_all(ctx, "finalize");
    cu_memory_release(ctx);
    // The handle goes before the streams it may be bound to.
    if (ctx->blas)
        (void)cublasDestroy(ctx->blas);
    if (ctx->blaslt)
        (void)cublasLtDestroy(ctx->blaslt);
    ctx->blas = NULL;
    ctx->blaslt = NULL;
    ctx->blas_queue = NULL;
    while (ctx->queues) {
        dsmoe_kernel_queue *next = ctx->queues->next;
        cu_queue_release(ctx, ctx->queues);
        free(ctx->queues);
        ctx->queues = next;
    }
    cu_queue_release(ctx, &ctx->queue);
    while (ctx->events) {
        dsmoe_kernel_event *next = ctx->events->next;
        (void)cudaEventDestroy(ctx->events->ev);
        free(ctx->events);
        ctx->events = next;
    }
    if (ctx->fault)
        (void)cudaFreeHost(ctx->fault);
    (void)cudaGetLastError();
    free(ctx);
}

static const char *cuda_last_error(dsmoe_kernel_ctx *ctx) { return ctx ? ctx->error : "cuda: no context"; }

static const char *cuda_describe(dsmoe_kernel_ctx *ctx) { return ctx ? ctx->description : "cuda: no context"; }

// ---------------------------------------------------------------------------------------------------
// Device queries (before init: no context, so no message; a status only)

// No driver or no device is not an error here: there are 0 devices to place ranks on.
static dsmoe_status cuda_device_count(int *count) {
    if (!count)
        return DSMOE_ERR_INVALID;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        n = 0;
    }
    *count = n;
    return DSMOE_OK;
}

// CUDA writes e.g. "0000:3B:00.0" (some versions an 8-digit domain): re-printed as "dddd:bb:dd.f" in lower
// case, the form hwloc and the core compare.
static dsmoe_status cuda_device_pci_bus_id(int ordinal, char *buf, size_t len) {
    if (!buf || len < 13)
        return DSMOE_ERR_INVALID;
    buf[0] = '\0';
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        n = 0;
    }
    if (ordinal < 0 || ordinal >= n)
        return DSMOE_ERR_INVALID;
    char raw[64];
    if (cudaDeviceGetPCIBusId(raw, (int)sizeof raw, ordinal) != cudaSuccess) {
        (void)cudaGetLastError();
        return DSMOE_ERR_SYSTEM;
    }
    unsigned domain, bus, dev, fn;
    if (sscanf(raw, "%x:%x:%x.%x", &domain, &bus, &dev, &fn) != 4)
        return DSMOE_ERR_SYSTEM;
    int w = snprintf(buf, len, "%04x:%02x:%02x.%x", domain, bus, dev, fn);
    if (w < 0 || (size_t)w >= len) {
        buf[0] = '\0';
        return DSMOE_ERR_INVALID;
    }
    return DSMOE_OK;
}

// The device's free and total memory; the pools' reserved memory counts as used.
static dsmoe_status cuda_mem_info(dsmoe_kernel_ctx *ctx, size_t *free_bytes, size_t *total_bytes) {
    CU_TRY(cu_enter(ctx, "mem_info"));
    CU_REQUIRE(ctx, free_bytes && total_bytes, "cuda: mem_info: NULL free_bytes or total_bytes");
    return cu_cuda(ctx, cudaMemGetInfo(free_bytes, total_bytes), "mem_info", "cudaMemGetInfo");
}

// ---------------------------------------------------------------------------------------------------
// The table

static const dsmoe_kernel_plugin_v3 cuda_plugin = {
    .api_version = DSMOE_KERNEL_API_VERSION,
    .name = "cuda",
    .description = "NVIDIA GPUs: CUDA kernels, cuBLAS GEMMs, stream-ordered memory",
    .mem_kind = DSMOE_MEM_CUDA,
    .caps = DSMOE_KCAP_ASYNC | DSMOE_KCAP_BF16 | DSMOE_KCAP_FUSED_EPILOGUE | DSMOE_KCAP_DETERMINISTIC |
            DSMOE_KCAP_INFERENCE | DSMOE_KCAP_DISTILL,
    .dtypes = DSMOE_DTYPE_BIT(DSMOE_FLOAT32) | DSMOE_DTYPE_BIT(DSMOE_BFLOAT16),
    .params = cuda_params,
    .n_params = N_PARAMS,

    .init = cuda_init,
    .finalize = cuda_finalize,
    .last_error = cuda_last_error,
    .describe = cuda_describe,
    .device_count = cuda_device_count,
    .device_pci_bus_id = cuda_device_pci_bus_id,
    .mem_info = cuda_mem_info,
    .attention_bytes = cu_attention_bytes,

    .default_queue = cu_default_queue,
    .queue_create = cu_queue_create,
    .queue_destroy = cu_queue_destroy,
    .queue_native = cu_queue_native,
    .queue_enqueue_host = cu_queue_enqueue_host,
    .queue_synchronize = cu_queue_synchronize,
    .synchronize = cu_synchronize,
    .event_create = cu_event_create,
    .event_destroy = cu_event_destroy,
    .event_record = cu_event_record,
    .queue_wait_event = cu_queue_wait_event,
    .event_synchronize = cu_event_synchronize,
    .event_query = cu_event_query,

    .alloc = cu_alloc,
    .free = cu_free,
    .host_alloc = cu_host_alloc,
    .host_free = cu_host_free,
    .copy_to_device = cu_copy_to_device,
    .copy_to_host = cu_copy_to_host,
    .copy = cu_copy,
    .copy_2d = cu_copy_2d,
    .zero = cu_zero,

    .gemm = cu_gemm,
    .gemm_grouped = cu_gemm_grouped,
    .gemm_grouped_wgrad = cu_gemm_grouped_wgrad,

    .bias_add = cu_bias_add,
    .bias_backward = cu_bias_backward,
    .axpy = cu_axpy,
    .mul_uniform_noise = cu_mul_uniform_noise,
    .sum_squares = cu_sum_squares,
    .all_finite = cu_all_finite,
    .convert = cu_convert,
    .init_tensor = cu_init_tensor,

    .embedding_forward = cu_embedding_forward,
    .embedding_backward = cu_embedding_backward,
    .layernorm_forward = cu_layernorm_forward,
    .layernorm_backward = cu_layernorm_backward,
    .gelu_forward = cu_gelu_forward,
    .gelu_backward = cu_gelu_backward,
    .attention_forward = cu_attention_forward,
    .attention_backward = cu_attention_backward,
    .crossentropy_forward = cu_crossentropy_forward,
    .crossentropy_backward = cu_crossentropy_backward,

    .gate_route = cu_gate_route,
    .gate_assign = cu_gate_assign,
    .gate_backward = cu_gate_backward,
    .moe_dispatch = cu_moe_dispatch,
    .moe_dispatch_backward = cu_moe_dispatch_backward,
    .moe_combine = cu_moe_combine,
    .moe_combine_backward = cu_moe_combine_backward,

    .residual_mix_forward = cu_residual_mix_forward,
    .residual_mix_backward = cu_residual_mix_backward,

    .adamw = cu_adamw,

    .kv_append = cu_kv_append,
    .attention_cached = cu_attention_cached,
    .sample = cu_sample,

    .distill_forward = cu_distill_forward,
    .distill_backward = cu_distill_backward,

    .gate = cu_gate,
};

DSMOE_PLUGIN_EXPORT const dsmoe_kernel_plugin_v3 *DSMOE_KERNEL_PLUGIN_ENTRY(void) { return &cuda_plugin; }
