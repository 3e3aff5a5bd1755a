// tests/plugins/kernel/test_strict.c: the strict kernel plugin (tests/plugins/kernel/strict) does what the core's tests rely
// on it for: results bitwise the cpu plugin's once waited for (and a naive GEMM in double agrees), work
// deferred until a call that waits (stale host buffers, callbacks run late and in order), cross-queue
// events honoured exactly, device memory that faults when touched while work on it is queued (in a
// forked child: SIGSEGV), poisoned unzeroed memory, sticky run-time errors, enqueue-time errors at once,
// frees deferred until every queue has run its work queued before them (host callbacks too), and the
// knobs (BREAK, EAGER_HOST_FN, ALWAYS_CLOSED, NO_PROTECT). The fault tests' children print strict's
// violation lines on stderr: that is expected.
// Both plugins are dlopen'ed from the build tree; no dsmoe_core. The fault tests run first, before this
// process starts any OpenMP threads, because a forked child of a process with a thread pool may hang.
#include <dlfcn.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "dsmoe/kernel_plugin.h"
#include "strict_test.h"

static int all_bytes(const void *p, size_t n, unsigned char v) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != v) return 0;
    return 1;
}

// Runs fn in a forked child; returns the signal that ended it, or 1000 + its exit code.
static int in_child(void (*fn)(void)) {
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        signal(SIGSEGV, SIG_DFL); // cmocka's handler would carry on with the next test in the child
        signal(SIGBUS, SIG_DFL);
        fn();
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    return WIFSIGNALED(status) ? WTERMSIG(status) : 1000 + WEXITSTATUS(status);
}

// ---------------------------------------------------------------------------------------------------
// (3) Memory the host cannot touch, in forked children (one thread: see the top of the file).

static volatile float sink;

// Reads a buffer with work queued on it: must fault.
static void child_read_queued(void) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 1);
    float *buf = dev(S, ctx, 4096, DSMOE_ALLOC_ZERO);
    if (S->synchronize(ctx) != DSMOE_OK) _exit(2);
    sink = ((volatile float *)buf)[3]; // open: nothing queued on it, a wait has run
    if (S->zero(ctx, S->default_queue(ctx), buf, 4096) != DSMOE_OK) _exit(3);
    sink = ((volatile float *)buf)[3]; // the zero is queued: faults
    _exit(0);
}

// Writes, likewise.
static void child_write_queued(void) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 1);
    float *buf = dev(S, ctx, 100, 0), host[25] = {0};
    if (S->synchronize(ctx) != DSMOE_OK) _exit(2);
    ((volatile float *)buf)[0] = 1.0f; // open
    if (S->copy_to_host(ctx, S->default_queue(ctx), host, buf, sizeof host) != DSMOE_OK) _exit(3);
    ((volatile float *)buf)[0] = 1.0f;
    _exit(0);
}

// Reads a fresh buffer before any wait: faults (a device may still be zeroing it).
static void child_read_fresh(void) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 1);
    float *buf = dev(S, ctx, 64, DSMOE_ALLOC_ZERO);
    sink = ((volatile float *)buf)[0];
    _exit(0);
}

// After the wait for the work on a buffer, a host-progressed collective may read and write it (the
// open window), also while work on OTHER buffers is queued; re-enqueuing work on it closes it again.
static void child_window(void) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 1);
    dsmoe_kernel_queue *q = S->default_queue(ctx);
    float *buf = dev(S, ctx, 64, 0), *other = dev(S, ctx, 64, 0), one = 1.0f;
    if (S->copy_to_device(ctx, q, buf, &one, sizeof one) != DSMOE_OK) _exit(2);
    if (wait_queue(S, ctx, q) != DSMOE_OK) _exit(3);
    if (((volatile float *)buf)[0] != 1.0f) _exit(4);
    if (S->zero(ctx, q, other, 64) != DSMOE_OK) _exit(5);
    ((volatile float *)buf)[1] = 2.0f; // still open: the queued work is on `other`
    if (S->zero(ctx, q, buf, 64) != DSMOE_OK) _exit(6);
    sink = ((volatile float *)buf)[0]; // closed again: faults
    _exit(0);
}

// A page shared by queued and idle bytes (the gradient slab: one block's all-reduce runs while another
// block's backward is queued): the idle bytes may be touched, the queued ones may not.
static void child_shared_page(int touch_queued) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 1);
    float *slab = dev(S, ctx, 3 * 4096, DSMOE_ALLOC_ZERO);
    if (S->synchronize(ctx) != DSMOE_OK) _exit(2);
    if (S->zero(ctx, S->default_queue(ctx), slab + 100, 50 * sizeof(float)) != DSMOE_OK) _exit(3); // bytes 400..599
    ((volatile float *)slab)[10] = 1.0f;  // same page, idle bytes: let through
    sink = ((volatile float *)slab)[160]; // just past the queued range
    sink = ((volatile float *)slab)[2000]; // another page
    if (touch_queued) sink = ((volatile float *)slab)[120]; // inside the queued range: faults
    if (S->synchronize(ctx) != DSMOE_OK) _exit(4);
    if (((volatile float *)slab)[10] != 1.0f || ((volatile float *)slab)[120] != 0.0f) _exit(5);
    _exit(0);
}
static void child_shared_page_idle(void) { child_shared_page(0); }
static void child_shared_page_queued(void) { child_shared_page(1); }

// DSMOE_STRICT_ALWAYS_CLOSED: even after a wait, the host may not touch device memory.
static void child_always_closed(void) {
    dsmoe_kernel_ctx *ctx = strict_ctx_with("DSMOE_STRICT_ALWAYS_CLOSED", "1", 1);
    float *buf = dev(S, ctx, 64, DSMOE_ALLOC_ZERO);
    if (S->synchronize(ctx) != DSMOE_OK) _exit(2);
    sink = ((volatile float *)buf)[0];
    _exit(0);
}

// DSMOE_STRICT_NO_PROTECT: the same read as child_read_queued goes through (so the faults above come
// from the protection, not from a bad pointer).
static void child_no_protect(void) {
    dsmoe_kernel_ctx *ctx = strict_ctx_with("DSMOE_STRICT_NO_PROTECT", "1", 1);
    float *buf = dev(S, ctx, 4096, DSMOE_ALLOC_ZERO);
    if (S->zero(ctx, S->default_queue(ctx), buf, 4096) != DSMOE_OK) _exit(3);
    sink = ((volatile float *)buf)[3];
    _exit(0);
}

static void test_memory_faults(void **state) {
    assert_int_equal(in_child(child_read_queued), SIGSEGV);
    assert_int_equal(in_child(child_write_queued), SIGSEGV);
    assert_int_equal(in_child(child_read_fresh), SIGSEGV);
    assert_int_equal(in_child(child_window), SIGSEGV);
    assert_int_equal(in_child(child_shared_page_idle), 1000);
    assert_int_equal(in_child(child_shared_page_queued), SIGSEGV);
    assert_int_equal(in_child(child_always_closed), SIGSEGV);
    assert_int_equal(in_child(child_no_protect), 1000);
}

// ---------------------------------------------------------------------------------------------------
// (0) The table

static void test_table(void **state) {
    assert_int_equal(S->api_version, DSMOE_KERNEL_API_VERSION);
    assert_string_equal(S->name, "strict");
    assert_int_equal(S->mem_kind, DSMOE_MEM_HOST);
    assert_true(S->caps & DSMOE_KCAP_ASYNC);
    assert_false(S->caps & DSMOE_KCAP_HOST_MEMORY);
    assert_int_equal(S->caps & ~(uint32_t)DSMOE_KCAP_ASYNC, P->caps & ~(uint32_t)(DSMOE_KCAP_HOST_MEMORY | DSMOE_KCAP_ASYNC));
    assert_int_equal(S->dtypes, P->dtypes);
    assert_int_equal(S->n_params, P->n_params);
    assert_non_null(S->queue_create);
    assert_null(S->queue_native(NULL, NULL));
    int inference = !!(S->caps & DSMOE_KCAP_INFERENCE);
    assert_int_equal(S->kv_append != NULL, inference);
    assert_int_equal(S->sample != NULL, inference);
}

// ---------------------------------------------------------------------------------------------------
// (1) Results: bitwise the cpu plugin's, read after an event; and (2) stale before it.

enum { SQ = 5, MQ = 7, KQ = 6, EQ = MQ, TOPK = 2, CAP = 2 };

typedef struct {
    float c[SQ * MQ], ln[SQ * MQ], mean[SQ], rstd[SQ], probs[SQ * EQ], weight[SQ * TOPK];
    int32_t choice[SQ * TOPK], counts[EQ], slot[SQ * TOPK], kept[EQ];
    double aux[2 * EQ + 1];
} seq_out;

typedef struct {
    float a[SQ * KQ], b[KQ * MQ], w[MQ], bias[MQ];
} seq_in;

// gemm -> layernorm -> gate_route -> gate_assign, all outputs copied back, then an event waited for.
// With check_stale, the host copies must still hold their sentinel bytes just before the wait.
static void run_sequence(const dsmoe_kernel_plugin_v3 *T, const seq_in *in, seq_out *out, int check_stale) {
    dsmoe_kernel_ctx *ctx = make_ctx(T, 2);
    dsmoe_kernel_queue *q = T->default_queue(ctx);
    float *a = dev(T, ctx, sizeof in->a, 0), *b = dev(T, ctx, sizeof in->b, 0), *c = dev(T, ctx, sizeof out->c, 0);
    float *w = dev(T, ctx, sizeof in->w, 0), *bias = dev(T, ctx, sizeof in->bias, 0);
    float *ln = dev(T, ctx, sizeof out->ln, 0), *mean = dev(T, ctx, sizeof out->mean, 0);
    float *rstd = dev(T, ctx, sizeof out->rstd, 0), *probs = dev(T, ctx, sizeof out->probs, 0);
    float *weight = dev(T, ctx, sizeof out->weight, 0);
    int32_t *choice = dev(T, ctx, sizeof out->choice, 0), *counts = dev(T, ctx, sizeof out->counts, 0);
    int32_t *slot = dev(T, ctx, sizeof out->slot, 0), *kept = dev(T, ctx, sizeof out->kept, 0);
    double *aux = dev(T, ctx, sizeof out->aux, 0);
    OK(T, ctx, T->copy_to_device(ctx, q, a, in->a, sizeof in->a));
    OK(T, ctx, T->copy_to_device(ctx, q, b, in->b, sizeof in->b));
    OK(T, ctx, T->copy_to_device(ctx, q, w, in->w, sizeof in->w));
    OK(T, ctx, T->copy_to_device(ctx, q, bias, in->bias, sizeof in->bias));
    OK(T, ctx, T->gemm(ctx, q, 0, 0, SQ, MQ, KQ, 1.0f, a, DSMOE_FLOAT32, KQ, b, DSMOE_FLOAT32, MQ, 0.0f, c,
                       DSMOE_FLOAT32, MQ));
    OK(T, ctx, T->layernorm_forward(ctx, q, ln, mean, rstd, c, DSMOE_FLOAT32, w, bias, SQ, MQ, 1e-5f));
    dsmoe_gating_params gp = {.S = SQ, .E = EQ, .K = TOPK, .noise = DSMOE_NOISE_NONE, .seed = 7};
    OK(T, ctx, T->gate_route(ctx, q, &gp, ln, probs, choice, counts));
    OK(T, ctx, T->gate_assign(ctx, q, &gp, CAP, probs, choice, slot, weight, kept, aux));
    memset(out, 0x5A, sizeof *out);
    OK(T, ctx, T->copy_to_host(ctx, q, out->c, c, sizeof out->c));
    OK(T, ctx, T->copy_to_host(ctx, q, out->ln, ln, sizeof out->ln));
    OK(T, ctx, T->copy_to_host(ctx, q, out->mean, mean, sizeof out->mean));
    OK(T, ctx, T->copy_to_host(ctx, q, out->rstd, rstd, sizeof out->rstd));
    OK(T, ctx, T->copy_to_host(ctx, q, out->probs, probs, sizeof out->probs));
    OK(T, ctx, T->copy_to_host(ctx, q, out->weight, weight, sizeof out->weight));
    OK(T, ctx, T->copy_to_host(ctx, q, out->choice, choice, sizeof out->choice));
    OK(T, ctx, T->copy_to_host(ctx, q, out->counts, counts, sizeof out->counts));
    OK(T, ctx, T->copy_to_host(ctx, q, out->slot, slot, sizeof out->slot));
    OK(T, ctx, T->copy_to_host(ctx, q, out->kept, kept, sizeof out->kept));
    OK(T, ctx, T->copy_to_host(ctx, q, out->aux, aux, sizeof out->aux));
    if (check_stale && !all_bytes(out, sizeof *out, 0x5A))
        fail_msg("%s: host results were written before any wait", T->name);
    OK(T, ctx, wait_queue(T, ctx, q));
    void *bufs[] = {a, b, c, w, bias, ln, mean, rstd, probs, weight, choice, counts, slot, kept, aux};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        T->free(ctx, bufs[i]);
    OK(T, ctx, T->synchronize(ctx));
    T->finalize(ctx);
}

static void test_bitwise_as_cpu(void **state) {
    seq_in in;
    for (size_t i = 0; i < sizeof in / sizeof(float); i++)
        ((float *)&in)[i] = rnd();
    seq_out got, want;
    run_sequence(S, &in, &got, 1);
    run_sequence(P, &in, &want, 0);
    // An independent check of the first op, so that two equally wrong plugins cannot pass.
    for (int i = 0; i < SQ; i++)
        for (int j = 0; j < MQ; j++) {
            double ref = 0;
            for (int k = 0; k < KQ; k++)
                ref += (double)in.a[i * KQ + k] * in.b[k * MQ + j];
            if (!(fabs(got.c[i * MQ + j] - ref) <= 1e-5 + 1e-5 * fabs(ref)))
                fail_msg("gemm c[%d,%d] = %.9g, naive %.9g", i, j, got.c[i * MQ + j], ref);
        }
    const char *names[] = {"c", "ln", "mean", "rstd", "probs", "weight", "choice", "counts", "slot", "kept", "aux"};
    size_t offs[] = {offsetof(seq_out, c), offsetof(seq_out, ln), offsetof(seq_out, mean), offsetof(seq_out, rstd),
                     offsetof(seq_out, probs), offsetof(seq_out, weight), offsetof(seq_out, choice),
                     offsetof(seq_out, counts), offsetof(seq_out, slot), offsetof(seq_out, kept),
                     offsetof(seq_out, aux), sizeof(seq_out)};
    for (int i = 0; i < 11; i++)
        if (memcmp((char *)&got + offs[i], (char *)&want + offs[i], offs[i + 1] - offs[i]) != 0)
            fail_msg("%s differs from the cpu plugin's", names[i]);
    int kept_total = 0;
    for (int e = 0; e < EQ; e++)
        kept_total += got.kept[e];
    assert_true(kept_total > 0 && kept_total <= SQ * TOPK); // the gating really ran
}

// (2) copy_to_host writes nothing until a wait; the copy_to_device source is consumed at the call, but
// a host_alloc source is read when the queue runs.
static void test_stale_until_wait(void **state) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 2);
    dsmoe_kernel_queue *q = S->default_queue(ctx);
    float src[64], host[64], *buf = dev(S, ctx, sizeof src, DSMOE_ALLOC_ZERO);
    for (int i = 0; i < 64; i++)
        src[i] = (float)i;
    memset(host, 0x5A, sizeof host);
    OK(S, ctx, S->copy_to_device(ctx, q, buf, src, sizeof src));
    src[0] = -1.0f; // the caller may reuse its buffer at once
    OK(S, ctx, S->copy_to_host(ctx, q, host, buf, sizeof host));
    assert_true(all_bytes(host, sizeof host, 0x5A));
    OK(S, ctx, wait_queue(S, ctx, q));
    for (int i = 0; i < 64; i++)
        assert_true(host[i] == (float)i);

    float *pinned;
    OK(S, ctx, S->host_alloc(ctx, sizeof src, (void **)&pinned));
    assert_true(all_bytes(pinned, sizeof src, 0xFF)); // poisoned, and host-readable
    pinned[0] = 1.0f;
    OK(S, ctx, S->copy_to_device(ctx, q, buf, pinned, sizeof src));
    pinned[0] = 2.0f; // not allowed by the header: strict shows what a device would copy
    OK(S, ctx, S->copy_to_host(ctx, q, host, buf, sizeof host));
    S->host_free(ctx, pinned); // after the copy that reads it
    OK(S, ctx, S->queue_synchronize(ctx, q));
    assert_true(host[0] == 2.0f);
    S->free(ctx, buf);
    S->finalize(ctx);
}

// (4) Unzeroed memory is poison (0xFF: NaN floats, -1 ints); ALLOC_ZERO memory is 0.
static void test_poison(void **state) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 2);
    dsmoe_kernel_queue *q = S->default_queue(ctx);
    enum { N = 1000 };
    float *raw = dev(S, ctx, N * sizeof(float), 0), *zeroed = dev(S, ctx, N * sizeof(float), DSMOE_ALLOC_ZERO);
    float h1[N], h2[N];
    OK(S, ctx, S->copy_to_host(ctx, q, h1, raw, sizeof h1));
    OK(S, ctx, S->copy_to_host(ctx, q, h2, zeroed, sizeof h2));
    OK(S, ctx, S->synchronize(ctx));
    assert_true(all_bytes(h1, sizeof h1, 0xFF));
    assert_true(isnan(h1[0]) && isnan(h1[N - 1]));
    assert_true(((int32_t *)h1)[5] == -1);
    assert_true(all_bytes(h2, sizeof h2, 0));
    // A zero-byte buffer is a unique valid pointer.
    void *e1 = dev(S, ctx, 0, 0), *e2 = dev(S, ctx, 0, 0);
    assert_true(e1 != e2 && ((uintptr_t)e1 % 256) == 0);
    S->free(ctx, e1);
    S->free(ctx, e2);
    S->free(ctx, raw);
    S->free(ctx, zeroed);
    S->finalize(ctx);
}

// (5) Cross-queue order: the default queue waits for q2's event, and only up to it.
static int flag;
static void set_flag(void *arg) { flag = *(int *)arg; }

static void test_cross_queue(void **state) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 2);
    dsmoe_kernel_queue *q1 = S->default_queue(ctx), *q2;
    OK(S, ctx, S->queue_create(ctx, &q2));
    float data[32], host[32], *x = dev(S, ctx, sizeof data, 0), *y = dev(S, ctx, sizeof data, 0);
    for (int i = 0; i < 32; i++)
        data[i] = 0.5f * (float)i + 1.0f;
    dsmoe_kernel_event *ev;
    OK(S, ctx, S->event_create(ctx, &ev));
    static int one = 1;
    flag = 0;
    OK(S, ctx, S->copy_to_device(ctx, q2, x, data, sizeof data));
    OK(S, ctx, S->event_record(ctx, ev, q2));
    OK(S, ctx, S->queue_enqueue_host(ctx, q2, set_flag, &one)); // after the event: must not run yet
    OK(S, ctx, S->queue_wait_event(ctx, q1, ev));
    OK(S, ctx, S->copy(ctx, q1, y, x, sizeof data));
    OK(S, ctx, S->copy_to_host(ctx, q1, host, y, sizeof host));
    OK(S, ctx, wait_queue(S, ctx, q1));
    assert_memory_equal(host, data, sizeof data);
    assert_int_equal(flag, 0);
    int done = 0;
    OK(S, ctx, S->event_query(ctx, ev, &done));
    assert_int_equal(done, 1);
    S->queue_destroy(ctx, q2); // runs the rest of q2
    assert_int_equal(flag, 1);
    S->event_destroy(ctx, ev);
    S->free(ctx, x);
    S->free(ctx, y);
    S->finalize(ctx);
}

// (6) Errors: enqueue-time ones at once and not sticky; a bad token id when the op runs, sticky.
static void test_errors(void **state) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 2);
    dsmoe_kernel_queue *q = S->default_queue(ctx);
    enum { B = 2, T = 3, M = 4, V = 5 };
    float *out = dev(S, ctx, B * T * M * sizeof(float), 0), *wte = dev(S, ctx, V * M * sizeof(float), DSMOE_ALLOC_ZERO);
    float *wpe = dev(S, ctx, T * M * sizeof(float), DSMOE_ALLOC_ZERO), host[4];
    int32_t *tok = dev(S, ctx, B * T * sizeof(int32_t), 0), ids[B * T] = {0, 1, 2, 3, 4, V + 7}; // one out of range

    assert_int_equal(S->gemm(ctx, q, 0, 0, 1, 1, 1, 1.0f, out, (dsmoe_dtype)99, 1, out, DSMOE_FLOAT32, 1, 0.0f, out,
                             DSMOE_FLOAT32, 1), DSMOE_ERR_UNSUPPORTED);
    assert_int_equal(S->zero(ctx, q, host, sizeof host), DSMOE_ERR_INVALID); // host memory as a tensor
    assert_non_null(strstr(S->last_error(ctx), "zero"));
    assert_int_equal(S->zero(ctx, q, out, B * T * M * sizeof(float) + 1), DSMOE_ERR_INVALID); // overrun
    assert_int_equal(S->copy_to_host(ctx, q, out, wte, 4), DSMOE_ERR_INVALID); // device memory as the host side
    assert_int_equal(S->zero(ctx, NULL, out, 4), DSMOE_ERR_INVALID);
    OK(S, ctx, S->synchronize(ctx)); // none of them is sticky

    OK(S, ctx, S->copy_to_device(ctx, q, tok, ids, sizeof ids));
    OK(S, ctx, S->embedding_forward(ctx, q, out, DSMOE_FLOAT32, tok, wte, DSMOE_FLOAT32, wpe, NULL, B, T, M, V, T)); // accepted
    dsmoe_status s = wait_queue(S, ctx, q);
    assert_int_not_equal(s, DSMOE_OK);
    assert_non_null(strstr(S->last_error(ctx), "embedding_forward"));
    assert_int_equal(S->synchronize(ctx), s);
    assert_int_equal(S->zero(ctx, q, out, 4), s);
    void *p = NULL;
    assert_int_equal(S->alloc(ctx, 16, 0, &p), s);
    assert_non_null(strstr(S->last_error(ctx), "embedding_forward"));
    S->finalize(ctx);
}

// (7) Host callbacks run when the queue runs, in order, after the work before them (or, with
// DSMOE_STRICT_EAGER_HOST_FN, when enqueued).
static int cb_log[8], cb_n;
static float *cb_host;
static void cb(void *arg) {
    int id = (int)(intptr_t)arg;
    cb_log[cb_n++] = id == 2 && cb_host[0] == 3.0f ? 20 : id; // 20: callback 2 saw the copy done
}

static void test_host_callbacks(void **state) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 2);
    dsmoe_kernel_queue *q = S->default_queue(ctx);
    float three = 3.0f, host = 0.0f, *buf = dev(S, ctx, sizeof three, 0);
    cb_n = 0;
    cb_host = &host;
    OK(S, ctx, S->queue_enqueue_host(ctx, q, cb, (void *)1));
    OK(S, ctx, S->copy_to_device(ctx, q, buf, &three, sizeof three));
    OK(S, ctx, S->copy_to_host(ctx, q, &host, buf, sizeof host));
    OK(S, ctx, S->queue_enqueue_host(ctx, q, cb, (void *)2));
    OK(S, ctx, S->queue_enqueue_host(ctx, q, cb, (void *)3));
    assert_int_equal(cb_n, 0);
    OK(S, ctx, S->queue_synchronize(ctx, q));
    assert_int_equal(cb_n, 3);
    assert_int_equal(cb_log[0], 1);
    assert_int_equal(cb_log[1], 20);
    assert_int_equal(cb_log[2], 3);
    S->free(ctx, buf);
    S->finalize(ctx);

    // DSMOE_STRICT_EAGER_HOST_FN: a callback runs when enqueued, after the work before it; the work after
    // it stays deferred.
    ctx = strict_ctx_with("DSMOE_STRICT_EAGER_HOST_FN", "1", 2);
    q = S->default_queue(ctx);
    buf = dev(S, ctx, sizeof three, 0);
    cb_n = 0;
    host = 0.0f;
    OK(S, ctx, S->copy_to_device(ctx, q, buf, &three, sizeof three));
    OK(S, ctx, S->copy_to_host(ctx, q, &host, buf, sizeof host));
    assert_true(host == 0.0f);
    OK(S, ctx, S->queue_enqueue_host(ctx, q, cb, (void *)2));
    assert_int_equal(cb_n, 1);
    assert_int_equal(cb_log[0], 20);
    OK(S, ctx, S->zero(ctx, q, buf, sizeof three));
    OK(S, ctx, S->copy_to_host(ctx, q, &host, buf, sizeof host));
    assert_true(host == 3.0f); // deferred again
    OK(S, ctx, S->synchronize(ctx));
    assert_true(host == 0.0f);
    S->free(ctx, buf);
    S->finalize(ctx);
}

// A host callback that reads device memory when its queue runs it, as a stream-ordered comm plugin's
// collective does: strict knows nothing of what it touches.
static float cb_seen;
static void read_cb(void *arg) { cb_seen = *(const float *)arg; }

// free is ordered after the queued work using the buffer, without running it; misuse is caught.
static void test_deferred_free(void **state) {
    dsmoe_kernel_ctx *ctx = make_ctx(S, 2);
    dsmoe_kernel_queue *q = S->default_queue(ctx);
    float v = 4.5f, host = 0.0f, *buf = dev(S, ctx, sizeof v, 0);
    OK(S, ctx, S->copy_to_device(ctx, q, buf, &v, sizeof v));
    OK(S, ctx, S->copy_to_host(ctx, q, &host, buf, sizeof host));
    S->free(ctx, buf);
    assert_true(host == 0.0f); // free ran nothing
    assert_int_equal(S->zero(ctx, q, buf, sizeof v), DSMOE_ERR_INVALID); // use after free
    OK(S, ctx, S->synchronize(ctx));
    assert_true(host == 4.5f);
    S->free(ctx, buf); // double free: sticky
    assert_int_not_equal(S->synchronize(ctx), DSMOE_OK);
    assert_non_null(strstr(S->last_error(ctx), "free"));
    S->finalize(ctx);

    // "After all work queued before the call": host callbacks too, on every queue. The buffer's last
    // op (the copy) runs before the callbacks that read it; the release waits for them.
    ctx = make_ctx(S, 2);
    q = S->default_queue(ctx);
    dsmoe_kernel_queue *q2;
    OK(S, ctx, S->queue_create(ctx, &q2));
    for (int on_q2 = 0; on_q2 < 2; on_q2++) {
        buf = dev(S, ctx, sizeof v, 0);
        cb_seen = 0.0f;
        OK(S, ctx, S->copy_to_device(ctx, q, buf, &v, sizeof v));
        OK(S, ctx, wait_queue(S, ctx, q)); // copied; nothing of strict's own is queued on buf any more
        OK(S, ctx, S->queue_enqueue_host(ctx, on_q2 ? q2 : q, read_cb, buf));
        S->free(ctx, buf);
        OK(S, ctx, S->synchronize(ctx));
        assert_true(cb_seen == 4.5f); // neither unmapped (SIGSEGV) nor poisoned (NaN) before it ran
    }
    S->queue_destroy(ctx, q2);
    S->finalize(ctx);
}

// DSMOE_STRICT_BREAK drops ops: a test that waits properly then sees stale data.
static void test_break_knob(void **state) {
    const char *breaks[] = {"copy_to_host", "event_record"};
    for (int i = 0; i < 2; i++) {
        dsmoe_kernel_ctx *ctx = strict_ctx_with("DSMOE_STRICT_BREAK", breaks[i], 2);
        dsmoe_kernel_queue *q = S->default_queue(ctx);
        float v = 8.0f, host = 0.0f, *buf = dev(S, ctx, sizeof v, 0);
        OK(S, ctx, S->copy_to_device(ctx, q, buf, &v, sizeof v));
        OK(S, ctx, S->copy_to_host(ctx, q, &host, buf, sizeof host));
        OK(S, ctx, wait_queue(S, ctx, q));
        assert_true(host == 0.0f); // broken: the wait did not deliver
        OK(S, ctx, S->synchronize(ctx));
        assert_true(host == (i == 0 ? 0.0f : 8.0f)); // a dropped record: the full sync still runs the copy
        S->free(ctx, buf);
        S->finalize(ctx);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory_faults), // first: no OpenMP threads in this process yet
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_bitwise_as_cpu),
        cmocka_unit_test(test_stale_until_wait),
        cmocka_unit_test(test_poison),
        cmocka_unit_test(test_cross_queue),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_host_callbacks),
        cmocka_unit_test(test_deferred_free),
        cmocka_unit_test(test_break_knob),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
