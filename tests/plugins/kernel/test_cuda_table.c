// tests/plugins/kernel/test_cuda_table.c: the cuda kernel plugin's table and glue (plugins/cuda/), loaded with dlopen
// from the build tree as the core would load it.
// Everywhere: the table (version, name, kinds, caps, dtypes, every member set), the declared settings
// (well-formed names, defaults valid for their types), the device queries, and init's refusals of bad
// settings, which come before any CUDA call. Without a device: init must fail cleanly, naming the
// reason, and the rest is skipped (exit 77). With a device: memory and copies (a 1 MiB round trip
// through every copy member, checked byte by byte against the host pattern), zeroing, pinned host memory,
// the order of host functions on a queue, events, the pool limit, and sticky errors (a bad free, and a
// count fault raised by the grouped GEMM's kernel, a routing table with a slot held twice).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "dsmoe/kernel_plugin.h"

#define PLUGIN_FILE DSMOE_BUILD_PLUGIN_DIRS "/libdsmoe_kernel_cuda.so"

static const dsmoe_kernel_plugin_v3 *P;
static char no_device_reason[512]; // init's message when there is no device

static void assert_contains_(const char *haystack, const char *needle, const char *file, int line) {
    if (!haystack || !strstr(haystack, needle)) {
        print_error("message:  %s\nexpected: ...%s...\n", haystack ? haystack : "(null)", needle);
        _fail(file, line);
    }
}
#define assert_contains(h, n) assert_contains_((h), (n), __FILE__, __LINE__)

// ---------------------------------------------------------------------------------------------------
// The table

#define MEMBER(m) {#m, offsetof(dsmoe_kernel_plugin_v3, m)}
static const struct {
    const char *name;
    size_t offset;
} members[] = {
    MEMBER(init), MEMBER(finalize), MEMBER(last_error), MEMBER(describe), MEMBER(device_count),
    MEMBER(device_pci_bus_id), MEMBER(mem_info), MEMBER(attention_bytes), MEMBER(default_queue),
    MEMBER(queue_create), MEMBER(queue_destroy), MEMBER(queue_native), MEMBER(queue_enqueue_host),
    MEMBER(queue_synchronize), MEMBER(synchronize), MEMBER(event_create), MEMBER(event_destroy),
    MEMBER(event_record), MEMBER(queue_wait_event), MEMBER(event_synchronize), MEMBER(event_query), MEMBER(alloc),
    MEMBER(free), MEMBER(host_alloc), MEMBER(host_free), MEMBER(copy_to_device), MEMBER(copy_to_host), MEMBER(copy),
    MEMBER(copy_2d), MEMBER(zero), MEMBER(gemm), MEMBER(gemm_grouped), MEMBER(gemm_grouped_wgrad), MEMBER(bias_add),
    MEMBER(bias_backward), MEMBER(axpy), MEMBER(mul_uniform_noise), MEMBER(sum_squares), MEMBER(all_finite),
    MEMBER(convert), MEMBER(init_tensor), MEMBER(embedding_forward), MEMBER(embedding_backward),
    MEMBER(layernorm_forward), MEMBER(layernorm_backward), MEMBER(gelu_forward), MEMBER(gelu_backward),
    MEMBER(attention_forward), MEMBER(attention_backward), MEMBER(crossentropy_forward),
    MEMBER(crossentropy_backward), MEMBER(gate_route), MEMBER(gate_assign), MEMBER(gate_backward),
    MEMBER(moe_dispatch), MEMBER(moe_dispatch_backward), MEMBER(moe_combine), MEMBER(moe_combine_backward),
    MEMBER(residual_mix_forward), MEMBER(residual_mix_backward), MEMBER(adamw), MEMBER(kv_append),
    MEMBER(attention_cached), MEMBER(sample), MEMBER(distill_forward), MEMBER(distill_backward), MEMBER(gate),
};

static void test_table(void **state) {
    assert_int_equal(P->api_version, 3);
    assert_int_equal(P->api_version, DSMOE_KERNEL_API_VERSION);
    assert_string_equal(P->name, "cuda");
    assert_non_null(P->description);
    assert_true(strlen(P->description) > 0);
    assert_int_equal(P->mem_kind, DSMOE_MEM_CUDA);
    assert_int_equal(P->caps, DSMOE_KCAP_ASYNC | DSMOE_KCAP_BF16 | DSMOE_KCAP_FUSED_EPILOGUE |
                                  DSMOE_KCAP_DETERMINISTIC | DSMOE_KCAP_INFERENCE | DSMOE_KCAP_DISTILL);
    assert_int_equal(P->dtypes, DSMOE_DTYPE_BIT(DSMOE_FLOAT32) | DSMOE_DTYPE_BIT(DSMOE_BFLOAT16));
    // The list above is every function pointer of the table: from init to gate, nothing left out.
    size_t n = sizeof members / sizeof members[0];
    assert_int_equal(offsetof(dsmoe_kernel_plugin_v3, gate) + sizeof P->gate - offsetof(dsmoe_kernel_plugin_v3, init),
                     n * sizeof P->init);
    for (size_t i = 0; i < n; i++) {
        void (*fp)(void);
        memcpy(&fp, (const char *)P + members[i].offset, sizeof fp);
        if (!fp)
            fail_msg("member %s is NULL (this plugin sets every member)", members[i].name);
    }
}

static int valid_name(const char *s) {
    if (!s || !*s)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
            return 0;
    return 1;
}

// What the core accepts for an INT: a decimal integer, or one with a K/M/G/T suffix (docs: types.h).
static int valid_int(const char *s) {
    char *end;
    strtod(s, &end);
    if (end == s)
        return 0;
    if (*end && strchr("KkMGT", *end))
        end += 1 + (end[1] == 'i');
    return *end == '\0';
}

static int valid_bool(const char *s) {
    static const char *ok[] = {"1", "0", "true", "false", "yes", "no", "on", "off"};
    for (size_t i = 0; i < 8; i++)
        if (!strcmp(s, ok[i]))
            return 1;
    return 0;
}

static void test_params(void **state) {
    assert_int_equal(P->n_params, 7);
    assert_non_null(P->params);
    for (int i = 0; i < P->n_params; i++) {
        const dsmoe_param_decl *d = &P->params[i];
        if (!valid_name(d->name))
            fail_msg("params[%d].name '%s' is not [a-z0-9_]+", i, d->name ? d->name : "(null)");
        for (int j = 0; j < i; j++)
            if (!strcmp(P->params[j].name, d->name))
                fail_msg("params[%d] and params[%d] are both '%s'", j, i, d->name);
        assert_non_null(d->help);
        assert_true(strlen(d->help) > 10);
        assert_non_null(d->default_value);
        assert_null(d->choices); // no ENUM among them
        if (d->type == DSMOE_PARAM_INT && !valid_int(d->default_value))
            fail_msg("%s: default '%s' is not an integer", d->name, d->default_value);
        if (d->type == DSMOE_PARAM_BOOL && !valid_bool(d->default_value))
            fail_msg("%s: default '%s' is not a boolean", d->name, d->default_value);
    }
    // The settings the plugin promises (notes and docs name them), in declaration order.
    assert_string_equal(P->params[0].name, "tf32");
    assert_int_equal(P->params[0].type, DSMOE_PARAM_BOOL);
    assert_string_equal(P->params[0].default_value, "false");
    assert_string_equal(P->params[1].name, "pool_limit_bytes");
    assert_int_equal(P->params[1].type, DSMOE_PARAM_INT);
    assert_string_equal(P->params[1].default_value, "0");
    assert_string_equal(P->params[2].name, "cublas_workspace_bytes");
    assert_int_equal(P->params[2].type, DSMOE_PARAM_INT);
    assert_string_equal(P->params[2].default_value, "33554432");
    assert_string_equal(P->params[4].name, "attention_tensor_cores");
    assert_string_equal(P->params[4].default_value, "true");
    assert_string_equal(P->params[5].name, "expert_rows_max");
    assert_int_equal(P->params[5].type, DSMOE_PARAM_INT);
    assert_string_equal(P->params[5].default_value, "16");
    assert_string_equal(P->params[6].name, "decode_split_keys");
    assert_int_equal(P->params[6].type, DSMOE_PARAM_INT);
    assert_string_equal(P->params[6].default_value, "128");
}

// "dddd:bb:dd.f", lower-case hex.
static int valid_bus_id(const char *s) {
    static const char shape[] = "xxxx:xx:xx.x";
    if (strlen(s) != sizeof shape - 1)
        return 0;
    for (size_t i = 0; shape[i]; i++) {
        if (shape[i] != 'x' ? s[i] != shape[i] : !((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    }
    return 1;
}

static void test_device_queries(void **state) {
    int n = -1;
    assert_int_equal(P->device_count(&n), DSMOE_OK);
    assert_true(n >= 0);
    assert_int_equal(P->device_count(NULL), DSMOE_ERR_INVALID);
    char buf[64];
    for (int d = 0; d < n; d++) {
        assert_int_equal(P->device_pci_bus_id(d, buf, sizeof buf), DSMOE_OK);
        if (!valid_bus_id(buf))
            fail_msg("device %d: bus id '%s' is not dddd:bb:dd.f in lower-case hex", d, buf);
        assert_int_equal(P->device_pci_bus_id(d, buf, 12), DSMOE_ERR_INVALID); // the contract's len >= 13
    }
    assert_int_not_equal(P->device_pci_bus_id(n, buf, sizeof buf), DSMOE_OK);
    assert_int_not_equal(P->device_pci_bus_id(-1, buf, sizeof buf), DSMOE_OK);
    // attention_bytes is callable before init; NULL arguments are refused, not dereferenced.
    size_t saved, workspace;
    dsmoe_attention_shape shape = {2, 16, 64, 4, DSMOE_FLOAT32};
    assert_int_equal(P->attention_bytes(NULL, NULL, &saved, &workspace), DSMOE_ERR_INVALID);
    assert_int_equal(P->attention_bytes(NULL, &shape, NULL, &workspace), DSMOE_ERR_INVALID);
    assert_int_equal(P->attention_bytes(NULL, &shape, &saved, &workspace), DSMOE_OK);
}

// init with these setting values (tf32, pool_limit_bytes, cublas_workspace_bytes, fused_epilogues; and
// attention_tensor_cores = the same as fused_epilogues, expert_rows_max = rows, decode_split_keys = split):
// the status, the context (finalized here) and the message.
static dsmoe_status init_with6(const char *tf32, const char *pool, const char *ws, const char *fused,
                               const char *rows, const char *split, int n_values, char *err, size_t errlen) {
    const char *values[7] = {tf32, pool, ws, fused, fused, rows, split};
    dsmoe_kernel_options opt = {.device = 0, .param_values = values, .n_param_values = n_values};
    dsmoe_kernel_ctx *ctx = (dsmoe_kernel_ctx *)&opt; // must be overwritten
    err[0] = '\0';
    dsmoe_status s = P->init(&opt, &ctx, err, errlen);
    if (s != DSMOE_OK)
        assert_null(ctx);
    else
        P->finalize(ctx);
    return s;
}

static dsmoe_status init_with4(const char *tf32, const char *pool, const char *ws, const char *fused, int n_values,
                               char *err, size_t errlen) {
    return init_with6(tf32, pool, ws, fused, "16", "128", n_values, err, errlen);
}

static dsmoe_status init_with(const char *tf32, const char *pool, const char *ws, int n_values, char *err,
                              size_t errlen) {
    return init_with4(tf32, pool, ws, "0", n_values, err, errlen);
}

// Settings are read before CUDA is asked anything, so these hold with or without a device.
static void test_bad_settings(void **state) {
    char err[512];
    assert_int_equal(init_with("maybe", "0", "33554432", 7, err, sizeof err), DSMOE_ERR_INVALID);
    assert_contains(err, "tf32='maybe'");
    assert_int_equal(init_with("0", "-5", "33554432", 7, err, sizeof err), DSMOE_ERR_INVALID);
    assert_contains(err, "pool_limit_bytes='-5'");
    assert_int_equal(init_with("0", "0", "12X", 7, err, sizeof err), DSMOE_ERR_INVALID);
    assert_contains(err, "cublas_workspace_bytes='12X'");
    assert_int_equal(init_with("0", "1.5", "0", 7, err, sizeof err), DSMOE_ERR_INVALID); // not whole bytes
    assert_contains(err, "pool_limit_bytes");
    assert_int_equal(init_with4("0", "0", "0", "perhaps", 7, err, sizeof err), DSMOE_ERR_INVALID);
    assert_contains(err, "fused_epilogues='perhaps'");
    assert_int_equal(init_with6("0", "0", "0", "0", "257", "128", 7, err, sizeof err), DSMOE_ERR_INVALID);
    assert_contains(err, "expert_rows_max='257': expected an integer in [0, 256]");
    assert_int_equal(init_with6("0", "0", "0", "0", "8x", "128", 7, err, sizeof err), DSMOE_ERR_INVALID);
    assert_contains(err, "expert_rows_max='8x'");
    assert_int_equal(init_with6("0", "0", "0", "0", "16", "1048577", 7, err, sizeof err), DSMOE_ERR_INVALID);
    assert_contains(err, "decode_split_keys='1048577': expected an integer in [0, 1048576]");
    assert_int_equal(init_with6("0", "0", "0", "0", "16", "-1", 7, err, sizeof err), DSMOE_ERR_INVALID);
    assert_contains(err, "decode_split_keys='-1'");
    assert_int_equal(init_with("0", "0", "0", 6, err, sizeof err), DSMOE_ERR_INVALID);
    assert_contains(err, "6 setting values");
    // Valid spellings get past the settings: OK with a device, the no-device refusal without one.
    dsmoe_status s = init_with4("on", "64Ki", "1M", "yes", 7, err, sizeof err);
    assert_true(s == DSMOE_OK || s == DSMOE_ERR_UNSUPPORTED);
}

static void test_init_without_device(void **state) {
    int n = 0;
    assert_int_equal(P->device_count(&n), DSMOE_OK);
    if (n > 0)
        skip();
    dsmoe_kernel_options opt = {.device = 0};
    dsmoe_kernel_ctx *ctx = (dsmoe_kernel_ctx *)&opt;
    char err[512] = "";
    assert_int_equal(P->init(&opt, &ctx, err, sizeof err), DSMOE_ERR_UNSUPPORTED);
    assert_null(ctx);
    assert_contains(err, "no CUDA device: ");
    assert_true(strlen(err) > strlen("cuda: init: no CUDA device: "));
    assert_int_equal(P->init(NULL, &ctx, err, sizeof err), DSMOE_ERR_UNSUPPORTED); // default options
    P->finalize(NULL);
    assert_non_null(P->last_error(NULL));
    snprintf(no_device_reason, sizeof no_device_reason, "%s", err);
}

// ---------------------------------------------------------------------------------------------------
// With a device

static dsmoe_kernel_ctx *new_ctx(const char *pool_limit) {
    const char *values[7] = {"0", pool_limit, "33554432", "0", "0", "16", "128"};
    dsmoe_kernel_options opt = {.device = 0, .param_values = values, .n_param_values = 7};
    dsmoe_kernel_ctx *ctx = NULL;
    char err[512] = "";
    dsmoe_status s = P->init(&opt, &ctx, err, sizeof err);
    if (s != DSMOE_OK)
        fail_msg("init: %s (%s)", err, dsmoe_status_name(s));
    return ctx;
}

static int gpu_setup(void **state) {
    *state = new_ctx("0");
    return *state ? 0 : -1;
}

static int gpu_teardown(void **state) {
    P->finalize(*state);
    return 0;
}

#define OK(call)                                                                                   \
    do {                                                                                           \
        dsmoe_status ok_s_ = (call);                                                               \
        if (ok_s_ != DSMOE_OK)                                                                     \
            fail_msg("%s: %s: %s", #call, dsmoe_status_name(ok_s_), P->last_error(ctx));           \
    } while (0)

static void test_describe(void **state) {
    dsmoe_kernel_ctx *ctx = *state;
    const char *d = P->describe(ctx);
    assert_contains(d, "cuda: ");
    assert_contains(d, "sm_");
    assert_contains(d, "cuBLAS ");
    assert_contains(d, "tf32 off");
    assert_string_equal(P->last_error(ctx), "");
    size_t free_b = 0, total_b = 0;
    OK(P->mem_info(ctx, &free_b, &total_b));
    assert_true(total_b > ((size_t)1 << 30));
    assert_true(free_b > 0 && free_b <= total_b);
    dsmoe_kernel_queue *q = P->default_queue(ctx);
    assert_non_null(q);
    assert_ptr_equal(P->default_queue(ctx), q);
    assert_non_null(P->queue_native(ctx, q)); // a cudaStream_t, never the legacy stream 0
}

// A byte pattern that no copy bug reproduces by accident (not periodic in any pitch used here).
static uint8_t pattern(size_t i) { return (uint8_t)((i * 2654435761u) >> 13 ^ i >> 7); }

// 1 MiB through copy_to_device (pageable source, overwritten right after the call), copy, an event
// to a second queue, copy_2d into a zeroed pitched buffer, copy_to_host into pinned memory; then zero
// on a range and copy_to_host into pageable memory.
static void test_round_trip(void **state) {
    dsmoe_kernel_ctx *ctx = *state;
    const size_t N = (size_t)1 << 20, rows = 1024, spitch = 1024, width = 1000, dpitch = 1040;
    uint8_t *src = malloc(N), *ref = malloc(N);
    assert_non_null(src);
    assert_non_null(ref);
    for (size_t i = 0; i < N; i++)
        src[i] = ref[i] = pattern(i);
    dsmoe_kernel_queue *q0 = P->default_queue(ctx), *q1 = NULL;
    OK(P->queue_create(ctx, &q1));
    assert_ptr_not_equal(P->queue_native(ctx, q1), P->queue_native(ctx, q0));
    dsmoe_kernel_event *ev0 = NULL, *ev1 = NULL;
    OK(P->event_create(ctx, &ev0));
    OK(P->event_create(ctx, &ev1));
    void *d1, *d2, *d3;
    OK(P->alloc(ctx, N, 0, &d1));
    OK(P->alloc(ctx, N, 0, &d2));
    OK(P->alloc(ctx, rows * dpitch, DSMOE_ALLOC_ZERO, &d3));
    assert_true((uintptr_t)d1 % 256 == 0 && (uintptr_t)d2 % 256 == 0 && (uintptr_t)d3 % 256 == 0);
    uint8_t *h = NULL;
    OK(P->host_alloc(ctx, rows * dpitch, (void **)&h));
    memset(h, 0xCD, rows * dpitch);

    OK(P->copy_to_device(ctx, q0, d1, src, N));
    memset(src, 0xAB, N); // the contract: an ordinary source is consumed before the call returns
    OK(P->copy(ctx, q0, d2, d1, N));
    OK(P->event_record(ctx, ev0, q0));
    OK(P->queue_wait_event(ctx, q1, ev0));
    OK(P->copy_2d(ctx, q1, d3, dpitch, d2, spitch, width, rows));
    OK(P->copy_to_host(ctx, q1, h, d3, rows * dpitch));
    OK(P->event_record(ctx, ev1, q1));
    OK(P->event_synchronize(ctx, ev1));
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < dpitch; c++) {
            uint8_t want = c < width ? ref[r * spitch + c] : 0; // the gaps: DSMOE_ALLOC_ZERO
            if (h[r * dpitch + c] != want)
                fail_msg("copy_2d result row %zu byte %zu: %u, expected %u", r, c, h[r * dpitch + c], want);
        }

    // zero 3 rows in the middle of d3 on q1, then read all of d3 back into pageable memory on q1.
    OK(P->zero(ctx, q1, (uint8_t *)d3 + 5 * dpitch + 7, 3 * dpitch));
    OK(P->copy_to_host(ctx, q1, src, d3, N < rows * dpitch ? N : rows * dpitch));
    OK(P->queue_synchronize(ctx, q1));
    for (size_t i = 0; i < N; i++) {
        size_t r = i / dpitch, c = i % dpitch;
        int zeroed = i >= 5 * dpitch + 7 && i < 8 * dpitch + 7;
        uint8_t want = zeroed || c >= width ? 0 : ref[r * spitch + c];
        if (src[i] != want)
            fail_msg("after zero: byte %zu: %u, expected %u", i, src[i], want);
    }
    // And d1 itself, whole, straight back.
    OK(P->copy_to_host(ctx, q0, src, d1, N));
    OK(P->synchronize(ctx));
    assert_memory_equal(src, ref, N);

    // free right after the last use is enqueued on another queue: the contract orders it after that.
    OK(P->copy(ctx, q1, d2, d1, N));
    P->free(ctx, d1);
    P->free(ctx, d2);
    P->free(ctx, d3);
    P->free(ctx, NULL);
    OK(P->synchronize(ctx));
    P->host_free(ctx, h);
    P->host_free(ctx, NULL);
    P->event_destroy(ctx, ev0);
    P->event_destroy(ctx, ev1);
    P->queue_destroy(ctx, q1);
    OK(P->synchronize(ctx));
    assert_string_equal(P->last_error(ctx), "");
    free(src);
    free(ref);
}

// Many copies from one pageable buffer, rewritten after each call, queued back to back with no wait: each
// must carry the bytes its call saw. The plugin stages such copies through a ring of pinned slots (more
// copies here than slots), so a slot reused before the copy that reads it has run would carry the later
// bytes.
static void test_staged_uploads(void **state) {
    dsmoe_kernel_ctx *ctx = *state;
    enum { COPIES = 40, BYTES = 1000 };
    uint8_t src[BYTES], *back = malloc(COPIES * BYTES);
    assert_non_null(back);
    dsmoe_kernel_queue *q = P->default_queue(ctx);
    void *d;
    OK(P->alloc(ctx, COPIES * BYTES, 0, &d));
    for (size_t c = 0; c < COPIES; c++) {
        for (size_t i = 0; i < BYTES; i++)
            src[i] = pattern(c * BYTES + i);
        OK(P->copy_to_device(ctx, q, (uint8_t *)d + c * BYTES, src, BYTES));
    }
    memset(src, 0xAB, BYTES);
    OK(P->copy_to_host(ctx, q, back, d, COPIES * BYTES));
    OK(P->queue_synchronize(ctx, q));
    for (size_t i = 0; i < COPIES * BYTES; i++)
        if (back[i] != pattern(i))
            fail_msg("copy %zu byte %zu: %u, expected %u", i / BYTES, i % BYTES, back[i], pattern(i));
    P->free(ctx, d);
    free(back);
}

static void test_alloc_edges(void **state) {
    dsmoe_kernel_ctx *ctx = *state;
    void *a = NULL, *b = NULL;
    OK(P->alloc(ctx, 0, 0, &a));
    OK(P->alloc(ctx, 0, 0, &b));
    assert_non_null(a);
    assert_non_null(b);
    assert_ptr_not_equal(a, b);
    P->free(ctx, a);
    P->free(ctx, b);
    void *c = (void *)&a;
    assert_int_equal(P->alloc(ctx, 64, 0x80, &c), DSMOE_ERR_INVALID);
    assert_null(c);
    assert_contains(P->last_error(ctx), "flags");
    // An odd size, zeroed: every byte reads back 0.
    const size_t n = 3 * ((size_t)1 << 20) + 7;
    uint8_t *back = malloc(n);
    assert_non_null(back);
    memset(back, 0x11, n);
    OK(P->alloc(ctx, n, DSMOE_ALLOC_ZERO, &c));
    OK(P->copy_to_host(ctx, P->default_queue(ctx), back, c, n));
    OK(P->queue_synchronize(ctx, P->default_queue(ctx)));
    for (size_t i = 0; i < n; i++)
        if (back[i])
            fail_msg("DSMOE_ALLOC_ZERO buffer byte %zu is %u", i, back[i]);
    // Refusals at enqueue time leave the context usable.
    dsmoe_kernel_queue *q = P->default_queue(ctx);
    assert_int_equal(P->copy_2d(ctx, q, c, 8, c, 16, 16, 2), DSMOE_ERR_INVALID);
    assert_contains(P->last_error(ctx), "dpitch");
    assert_int_equal(P->copy(ctx, NULL, c, c, 0), DSMOE_ERR_INVALID);
    assert_contains(P->last_error(ctx), "queue is NULL");
    assert_int_equal(P->zero(ctx, q, NULL, 4), DSMOE_ERR_INVALID);
    assert_int_equal(P->queue_enqueue_host(ctx, q, NULL, NULL), DSMOE_ERR_INVALID);
    assert_int_equal(P->event_record(ctx, NULL, q), DSMOE_ERR_INVALID);
    OK(P->copy(ctx, q, c, c, 0)); // empty work is fine, even with the same buffer
    OK(P->synchronize(ctx));
    P->free(ctx, c);
    free(back);
    // Events: one never recorded counts as completed; a recorded one completes.
    dsmoe_kernel_event *ev = NULL;
    OK(P->event_create(ctx, &ev));
    OK(P->event_synchronize(ctx, ev));
    int done = -1;
    OK(P->event_query(ctx, ev, &done));
    assert_int_equal(done, 1);
    OK(P->alloc(ctx, (size_t)64 << 20, 0, &c));
    OK(P->zero(ctx, q, c, (size_t)64 << 20));
    OK(P->event_record(ctx, ev, q));
    done = 0;
    for (int i = 0; i < 10000 && !done; i++) {
        OK(P->event_query(ctx, ev, &done));
        if (!done)
            nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    assert_int_equal(done, 1);
    P->free(ctx, c);
    P->event_destroy(ctx, ev);
    OK(P->synchronize(ctx));
}

// Host functions on a queue: each runs after the work before it (the copy into pinned h has landed) and
// before the work after it (the copy from pinned h2 sees what the function wrote), in enqueue order.
typedef struct host_order {
    int n, seq[8];
    int data_ok;
    const uint8_t *h, *ref;
    uint8_t *h2;
    size_t len;
} host_order;
typedef struct host_step {
    host_order *o;
    int id, check, fill;
} host_step;

static void host_step_fn(void *arg) {
    host_step *s = arg;
    host_order *o = s->o;
    if (o->n < 8)
        o->seq[o->n] = s->id;
    o->n++;
    if (s->check)
        o->data_ok = memcmp(o->h, o->ref, o->len) == 0;
    if (s->fill)
        memset(o->h2, s->fill, o->len);
}

static void test_host_functions(void **state) {
    dsmoe_kernel_ctx *ctx = *state;
    const size_t len = (size_t)8 << 20;
    uint8_t *ref = malloc(len), *h = NULL, *h2 = NULL, *h3 = NULL;
    assert_non_null(ref);
    for (size_t i = 0; i < len; i++)
        ref[i] = pattern(i + 17);
    OK(P->host_alloc(ctx, len, (void **)&h));
    OK(P->host_alloc(ctx, len, (void **)&h2));
    OK(P->host_alloc(ctx, len, (void **)&h3));
    memset(h, 0, len);
    memset(h2, 0, len);
    memset(h3, 0, len);
    void *d = NULL;
    OK(P->alloc(ctx, len, 0, &d));
    host_order o = {.h = h, .ref = ref, .h2 = h2, .len = len};
    host_step a = {&o, 1, 1, 0}, b = {&o, 2, 0, 0x5A}, c = {&o, 3, 0, 0};
    dsmoe_kernel_queue *q = P->default_queue(ctx);
    OK(P->copy_to_device(ctx, q, d, ref, len));
    OK(P->copy_to_host(ctx, q, h, d, len));
    OK(P->queue_enqueue_host(ctx, q, host_step_fn, &a));
    OK(P->queue_enqueue_host(ctx, q, host_step_fn, &b));
    OK(P->copy_to_device(ctx, q, d, h2, len));
    OK(P->copy_to_host(ctx, q, h3, d, len));
    OK(P->queue_enqueue_host(ctx, q, host_step_fn, &c));
    OK(P->queue_synchronize(ctx, q));
    assert_int_equal(o.n, 3);
    assert_int_equal(o.seq[0], 1);
    assert_int_equal(o.seq[1], 2);
    assert_int_equal(o.seq[2], 3);
    assert_true(o.data_ok);
    for (size_t i = 0; i < len; i++)
        if (h3[i] != 0x5A)
            fail_msg("byte %zu copied from the host function's buffer is %u, expected 0x5A", i, h3[i]);
    P->free(ctx, d);
    P->host_free(ctx, h);
    P->host_free(ctx, h2);
    P->host_free(ctx, h3);
    free(ref);
}

// pool_limit_bytes bounds what alloc() holds at once; a free gives the room back.
static void test_pool_limit(void **state) {
    dsmoe_kernel_ctx *ctx = new_ctx("1048576");
    assert_contains(P->describe(ctx), "limited to");
    void *a = NULL, *b = NULL, *c = NULL;
    OK(P->alloc(ctx, 512 << 10, 0, &a));
    assert_int_equal(P->alloc(ctx, 768 << 10, 0, &b), DSMOE_ERR_NOMEM);
    assert_null(b);
    assert_contains(P->last_error(ctx), "pool_limit_bytes=1048576");
    OK(P->synchronize(ctx)); // not sticky
    P->free(ctx, a);
    OK(P->alloc(ctx, 768 << 10, 0, &b));
    OK(P->alloc(ctx, 256 << 10, 0, &c)); // exactly the limit
    assert_int_equal(P->alloc(ctx, 0, 0, &a), DSMOE_ERR_NOMEM); // alloc(0) holds 256 bytes
    OK(P->synchronize(ctx));
    P->finalize(ctx); // b and c are the context's to free
}

// attention_tensor_cores needs sm_80 or newer: on an older device (the emulator plays one through
// DSMOE_EMU_COMPUTE_CAPABILITY; a real GPU ignores the variable and its answer follows its own compute
// capability) init keeps the CUDA-core kernels and describe() says why. On sm_80+ the setting is taken and
// describe() names it.
static void test_tensor_cores_need_sm80(void **state) {
    (void)state;
    const char *values[7] = {"0", "0", "33554432", "0", "0", "16", "128"};
    dsmoe_kernel_options opt = {.device = 0, .param_values = values, .n_param_values = 7};
    char err[512] = "";
    dsmoe_kernel_ctx *ctx = NULL;
    setenv("DSMOE_EMU_COMPUTE_CAPABILITY", "7.5", 1);
    OK(P->init(&opt, &ctx, err, sizeof err)); // without the setting any device is taken
    const int old_device = strstr(P->describe(ctx), "(sm_75,") != NULL || strstr(P->describe(ctx), "(sm_7") != NULL;
    P->finalize(ctx);
    ctx = NULL;
    values[4] = "1";
    dsmoe_status s = P->init(&opt, &ctx, err, sizeof err);
    unsetenv("DSMOE_EMU_COMPUTE_CAPABILITY");
    if (!old_device) { // a real device of sm_80 or newer
        assert_int_equal(s, DSMOE_OK);
        assert_contains(P->describe(ctx), "bf16 attention on tensor cores");
        P->finalize(ctx);
        return;
    }
    // On by default, so an older device is not refused: it keeps the CUDA-core kernels, and says so.
    assert_int_equal(s, DSMOE_OK);
    assert_contains(P->describe(ctx), "(sm_75,");
    assert_contains(P->describe(ctx), "bf16 attention on CUDA cores (tensor cores need sm_80)");
    P->finalize(ctx);
    ctx = NULL;
    s = P->init(&opt, &ctx, err, sizeof err); // the emulator's own sm_90
    assert_int_equal(s, DSMOE_OK);
    assert_contains(P->describe(ctx), "bf16 attention on tensor cores");
    P->finalize(ctx);
}

// A bad free breaks the context: the next wait reports it, and every call after it.
static void test_sticky_bad_free(void **state) {
    dsmoe_kernel_ctx *ctx = new_ctx("0");
    void *a = NULL;
    OK(P->alloc(ctx, 4096, 0, &a));
    P->free(ctx, a);
    P->free(ctx, a); // twice
    assert_int_equal(P->synchronize(ctx), DSMOE_ERR_INVALID);
    assert_contains(P->last_error(ctx), "free: ");
    assert_contains(P->last_error(ctx), "freed already");
    assert_int_equal(P->alloc(ctx, 64, 0, &a), DSMOE_ERR_INVALID);
    assert_null(a);
    assert_int_equal(P->queue_synchronize(ctx, P->default_queue(ctx)), DSMOE_ERR_INVALID);
    assert_contains(P->last_error(ctx), "freed already");
    P->finalize(ctx);
}

// A data fault raised by a kernel (the grouped GEMM's count check) becomes sticky at the next wait,
// with the fault's values in words.
static void test_sticky_fault(void **state) {
    dsmoe_kernel_ctx *ctx = new_ctx("0");
    dsmoe_kernel_queue *q = P->default_queue(ctx);
    float *a, *b, *c;
    int32_t *counts;
    const int32_t host_counts[2] = {3, 99}; // 99 > m_max
    OK(P->alloc(ctx, 2 * 4 * 8 * sizeof(float), DSMOE_ALLOC_ZERO, (void **)&a));
    OK(P->alloc(ctx, 8 * 8 * sizeof(float), DSMOE_ALLOC_ZERO, (void **)&b));
    OK(P->alloc(ctx, 2 * 4 * 8 * sizeof(float), DSMOE_ALLOC_ZERO, (void **)&c));
    OK(P->alloc(ctx, sizeof host_counts, 0, (void **)&counts));
    OK(P->copy_to_device(ctx, q, counts, host_counts, sizeof host_counts));
    dsmoe_grouped_gemm g = {
        .groups = 2, .counts = counts, .m_max = 4, .n = 8, .k = 8, .alpha = 1.0f, .beta = 0.0f,
        .a = a, .a_type = DSMOE_FLOAT32, .lda = 8, .a_stride = 32,
        .b = b, .b_type = DSMOE_FLOAT32, .ldb = 8, .b_stride = 0, .b_groups = 1, .trans_b = 0,
        .c = c, .c_type = DSMOE_FLOAT32, .ldc = 8, .c_stride = 32, .epilogue = DSMOE_EPI_NONE,
    };
    OK(P->gemm_grouped(ctx, q, &g));
    assert_int_equal(P->synchronize(ctx), DSMOE_ERR_INVALID);
    const char *m = P->last_error(ctx);
    assert_contains(m, "bad data");
    assert_contains(m, "group 1");
    assert_contains(m, "99");
    // Sticky: every call after it, with the same message.
    int done = 0;
    dsmoe_kernel_event *ev = NULL;
    assert_int_equal(P->event_create(ctx, &ev), DSMOE_ERR_INVALID);
    assert_int_equal(P->copy(ctx, q, a, c, 16), DSMOE_ERR_INVALID);
    assert_int_equal(P->gemm_grouped(ctx, q, &g), DSMOE_ERR_INVALID);
    assert_int_equal(P->queue_synchronize(ctx, q), DSMOE_ERR_INVALID);
    assert_int_equal(P->event_query(ctx, ev, &done), DSMOE_ERR_INVALID);
    assert_string_equal(P->last_error(ctx), m);
    P->finalize(ctx); // frees the four buffers
}

// A routing table with one slot held by two tokens: dispatch raises it, with both tokens, the expert
// and the slot in words (the cpu plugin's words), whichever block claimed the slot first.
static void test_sticky_slot_twice(void **state) {
    enum { S = 6, E = 3, C = 2, M = 8 };
    const int32_t choice[S] = {0, 2, 1, 2, 1, 0}, slot[S] = {0, 1, 0, 0, 1, -1}; // every slot once, token 5 dropped
    int32_t bad_slot[S];
    memcpy(bad_slot, slot, sizeof slot);
    bad_slot[3] = 1; // token 3 takes slot 1 of expert 2, which token 1 holds
    for (int twice = 0; twice < 2; twice++) {
        dsmoe_kernel_ctx *ctx = new_ctx("0");
        dsmoe_kernel_queue *q = P->default_queue(ctx);
        float *x, *buf;
        int32_t *dch, *dsl;
        OK(P->alloc(ctx, S * M * sizeof(float), DSMOE_ALLOC_ZERO, (void **)&x));
        OK(P->alloc(ctx, E * C * M * sizeof(float), DSMOE_ALLOC_ZERO, (void **)&buf));
        OK(P->alloc(ctx, sizeof choice, 0, (void **)&dch));
        OK(P->alloc(ctx, sizeof slot, 0, (void **)&dsl));
        OK(P->copy_to_device(ctx, q, dch, choice, sizeof choice));
        OK(P->copy_to_device(ctx, q, dsl, twice ? bad_slot : slot, sizeof slot));
        OK(P->moe_dispatch(ctx, q, buf, x, DSMOE_FLOAT32, dch, dsl, S, 1, E, C, M));
        if (!twice) { // the valid table twice in a row: the owner map starts empty at every call
            OK(P->moe_dispatch(ctx, q, buf, x, DSMOE_FLOAT32, dch, dsl, S, 1, E, C, M));
            OK(P->synchronize(ctx));
        } else {
            assert_int_equal(P->synchronize(ctx), DSMOE_ERR_INVALID);
            const char *m = P->last_error(ctx);
            assert_contains(m, "bad data");
            assert_contains(m, "tokens 1 and 3 both hold slot 1 of expert 2");
            assert_int_equal(P->moe_dispatch(ctx, q, buf, x, DSMOE_FLOAT32, dch, dsl, S, 1, E, C, M),
                             DSMOE_ERR_INVALID);
        }
        P->finalize(ctx);
    }
}

// The plugin of this build tree, or $DSMOE_CUDA_PLUGIN (scripts/gpu-check runs a copy of the build on
// another machine).
int main(void) {
    const char *file = getenv("DSMOE_CUDA_PLUGIN");
    if (!file || !*file)
        file = PLUGIN_FILE;
    void *dl = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        fprintf(stderr, "test_cuda_table: cannot load %s: %s\n", file, dlerror());
        return 1;
    }
    dsmoe_kernel_plugin_entry_fn entry = (dsmoe_kernel_plugin_entry_fn)dlsym(dl, DSMOE_KERNEL_PLUGIN_SYMBOL);
    if (!entry || !(P = entry())) {
        fprintf(stderr, "test_cuda_table: %s: no %s, or it returned NULL\n", file, DSMOE_KERNEL_PLUGIN_SYMBOL);
        return 1;
    }
    const struct CMUnitTest everywhere[] = {
        cmocka_unit_test(test_table),         cmocka_unit_test(test_params),
        cmocka_unit_test(test_device_queries), cmocka_unit_test(test_bad_settings),
        cmocka_unit_test(test_init_without_device),
    };
    int failed = cmocka_run_group_tests_name("cuda plugin: table and settings", everywhere, NULL, NULL);
    int n = 0;
    P->device_count(&n);
    if (n == 0) {
        printf("test_cuda_table: SKIPPED the GPU part: %s\n", no_device_reason[0] ? no_device_reason : "no CUDA device");
        return failed ? failed : 77;
    }
    const struct CMUnitTest gpu[] = {
        cmocka_unit_test(test_describe),       cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_staged_uploads),
        cmocka_unit_test(test_alloc_edges),    cmocka_unit_test(test_host_functions),
        cmocka_unit_test(test_pool_limit),     cmocka_unit_test(test_tensor_cores_need_sm80),
        cmocka_unit_test(test_sticky_bad_free),
        cmocka_unit_test(test_sticky_fault),   cmocka_unit_test(test_sticky_slot_twice),
    };
    failed += cmocka_run_group_tests_name("cuda plugin: glue on a GPU", gpu, gpu_setup, gpu_teardown);
    return failed;
}
