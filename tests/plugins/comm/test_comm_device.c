// tests/plugins/comm/test_comm_device.c: comm-plugin conformance on DEVICE buffers: every collective of the
// comm ABI v2 (include/dsmoe/comm_plugin.h) on buffers from the kernel plugin's alloc(), filled and read
// only with its copy members on its queue, the collectives called with the stream the core passes
// (dsmoe_runtime_open's rt.stream, after dsmoe_rt_before_collective), as the core does. This is the
// harness for the real `nccl` plugin (device memory only) on a GPU; tests/plugins/comm/test_comm_mpi.c, which
// uses host buffers, skips it. ctest entries: tests/plugins/comm/comm_device.cmake; docs/nccl.md.
//
//     DSMOE_COMM_DEVICE_KERNEL=cuda DSMOE_COMM_DEVICE_COMM=nccl mpiexec -n 1 <build>/tests/test_comm_device
//
// DSMOE_COMM_DEVICE_KERNEL (default cpu) and DSMOE_COMM_DEVICE_COMM (default mpi) name the plugins, found
// on the core's search path (DSMOE_PLUGIN_PATH first; the test-only strict, ncclsim and mpistream live in
// <build>/tests/plugins). A device kernel plugin with a host-memory comm plugin runs through the core's
// host staging (core/plugins/comm_staged.c), as in a real run. The configuration is the core's, from the
// environment, with run.fixed_order_sums = false unless DSMOE_RUN_FIXED_ORDER_SUMS is set: by default the
// core sums floats itself in front of a plugin that does not promise a fixed order (nccl), and the
// plugin's own float sums are what this test is for.
//
// Every case builds its inputs on the host from a formula of (world rank, index), copies them into a
// device buffer with GUARD sentinel bytes on both sides, runs the collective, copies the whole buffers
// back after dsmoe_rt_wait and checks: the received region against a naive host reference (float sums
// within the error bound of any order of summation, computed in double; integer sums, MAX and MIN
// exact; data movement byte for byte), the sentinels (and alltoallv's gaps) untouched, and the input
// buffer unchanged. Groups: the world, pairs of ranks, the world reversed, and the even ranks (the odd
// ones make no call meanwhile), from dsmoe_rt_group_split.
//
// Each case's verdict is combined over ranks with MPI_Allreduce on MPI_COMM_WORLD (not the plugin under
// test) and printed by rank 0; a failing rank prints why on its stderr. Exit: 0 all passed, 1 a case
// failed or the runtime did not open, 77 the pair cannot run here (a plugin file not on the search path,
// a device kernel plugin without a device), said on stderr.
#define _GNU_SOURCE
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "comm_inputs.h"   // comm_pat, comm_value
#include "config.h"        // dsmoe_config_load_text, dsmoe_config_source_of
#include "plugin_loader.h" // dsmoe_plugin_load_kernel, dsmoe_plugin_load_comm (the skip probe)
#include "runtime.h"       // dsmoe_runtime_open_placed, dsmoe_rt_wait, dsmoe_rt_before_collective, dsmoe_rt_group_split

enum { GUARD = 256, SENT = 0xA5, MAX_RANKS = 64 }; // GUARD keeps the region at the allocation's alignment

static dsmoe_runtime rt;
static int wrank, wsize;
static int n_pass, n_fail, n_skip;

// ------------------------------------------------------------------------------------------------
// cases and their verdicts

typedef struct tcase {
    int ok, unsupported; // local: no problem seen; the plugin refused the dtype (DSMOE_ERR_UNSUPPORTED)
    char why[768];       // the first problem on this rank
} tcase;

static void bad(tcase *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bad(tcase *c, const char *fmt, ...) {
    if (c->ok) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->why, sizeof c->why, fmt, ap);
        va_end(ap);
    }
    c->ok = 0;
}

// Collective over the world: the case passes when it passed on every rank; skipped when every rank's
// plugin refused the dtype (some but not all is a failure).
static void finish(tcase *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void finish(tcase *c, const char *fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    int lo[2] = {c->ok, c->unsupported}, hi[2] = {c->ok, c->unsupported};
    MPI_Allreduce(MPI_IN_PLACE, lo, 2, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, hi, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    int skipped = lo[0] && lo[1], ok = lo[0] && lo[1] == hi[1];
    if (!c->ok) fprintf(stderr, "[rank %d of %d] %s: %s\n", wrank, wsize, name, c->why), fflush(stderr);
    if (!ok && c->ok && lo[1] != hi[1])
        fprintf(stderr, "[rank %d of %d] %s: %s\n", wrank, wsize, name,
                c->unsupported ? "unsupported here, supported on another rank" : "supported here, not on another rank");
    n_skip += skipped, n_pass += ok && !skipped, n_fail += !ok;
    if (wrank == 0) printf("%s %s%s\n", skipped ? "skip" : ok ? "ok  " : "FAIL", name,
                           skipped ? " (the plugin refuses the dtype)" : ok ? "" : " (see the failing ranks' stderr)");
    fflush(stdout);
}

// ------------------------------------------------------------------------------------------------
// device buffers: (GUARD + bytes + GUARD) of kernel-plugin memory, the region at dev + GUARD

typedef struct dbuf {
    uint8_t *dev;  // kernel-plugin memory, never touched by the host
    uint8_t *img;  // (GUARD + bytes + GUARD) host: what was uploaded (sentinels around the payload)
    uint8_t *back; // the same size: what came back (copy_to_host), valid after dsmoe_rt_wait
    size_t bytes;
} dbuf;

static void *at(const dbuf *b) { return b->dev + GUARD; }

// Allocates b and enqueues the upload of SENT GUARD bytes, `payload` (bytes; NULL = all `fill`), SENT.
static void up(tcase *c, dbuf *b, size_t bytes, const void *payload, int fill) {
    size_t all = 2 * (size_t)GUARD + bytes;
    *b = (dbuf){.bytes = bytes, .img = malloc(all), .back = malloc(all)};
    if (!b->img || !b->back) {
        bad(c, "out of host memory");
        return;
    }
    memset(b->img, SENT, all);
    if (payload) memcpy(b->img + GUARD, payload, bytes);
    else memset(b->img + GUARD, fill, bytes);
    memset(b->back, 0, all);
    void *p = NULL;
    if (rt.kern->alloc(rt.kctx, all, 0, &p) != DSMOE_OK) {
        bad(c, "alloc of %zu bytes: %s", all, rt.kern->last_error(rt.kctx));
        return;
    }
    b->dev = p;
    // From ordinary host memory: consumed before return (kernel_plugin.h), img stays ours.
    if (rt.kern->copy_to_device(rt.kctx, rt.q, b->dev, b->img, all) != DSMOE_OK)
        bad(c, "copy_to_device: %s", rt.kern->last_error(rt.kctx));
}

// Enqueues the copy of the whole of b into b->back.
static void down(tcase *c, dbuf *b) {
    if (b->dev && rt.kern->copy_to_host(rt.kctx, rt.q, b->back, b->dev, 2 * (size_t)GUARD + b->bytes) != DSMOE_OK)
        bad(c, "copy_to_host: %s", rt.kern->last_error(rt.kctx));
}

static void wait_queue(tcase *c) {
    dsmoe_err err = {0};
    if (dsmoe_rt_wait(&rt, &err) != DSMOE_OK) bad(c, "%s", err.msg);
}

static void release(dbuf *b) {
    if (b->dev) rt.kern->free(rt.kctx, b->dev);
    free(b->img), free(b->back);
    memset(b, 0, sizeof *b);
}

// The sentinels on both sides of the region are as uploaded.
static void check_guards(tcase *c, const dbuf *b, const char *which) {
    for (size_t k = 0; k < GUARD; k++)
        if (b->back[k] != SENT || b->back[GUARD + b->bytes + k] != SENT) {
            int before = b->back[k] != SENT;
            bad(c, "%s buffer: the sentinel byte %zu bytes %s the region is 0x%02x, not 0x%02x", which,
                before ? GUARD - k : k + 1, before ? "before" : "after",
                before ? b->back[k] : b->back[GUARD + b->bytes + k], SENT);
            return;
        }
}

// An input buffer came back as uploaded (the collective did not write it).
static void check_unchanged(tcase *c, const dbuf *b, const char *which) {
    if (b->img && memcmp(b->back, b->img, 2 * (size_t)GUARD + b->bytes) != 0)
        bad(c, "%s buffer (input) was changed by the collective", which);
}

// Received bytes against the expected ones: the first difference.
static void check_bytes(tcase *c, const dbuf *b, const uint8_t *want, size_t off, size_t n, const char *what) {
    for (size_t k = 0; k < n; k++)
        if (b->back[GUARD + off + k] != want[k]) {
            bad(c, "%s: byte %zu of the region is 0x%02x, expected 0x%02x", what, off + k, b->back[GUARD + off + k],
                want[k]);
            return;
        }
}

// Data movement: the whole region of r is want, its sentinels intact, the input s unchanged.
static void check_moved(tcase *c, const dbuf *r, const uint8_t *want, const dbuf *s, const char *what) {
    if (!c->ok) return;
    check_bytes(c, r, want, 0, r->bytes, what);
    check_guards(c, r, "recv");
    check_unchanged(c, s, "send");
}

// A collective as the core calls it (CCOLL in runtime.h): wait for q first when the plugin is
// host-progressed, then the call with the runtime's stream. A refused dtype is noted, not a failure.
#define COLL(c, op, ...)                                                                           \
    do {                                                                                           \
        dsmoe_err e_ = {0};                                                                        \
        if (!(c)->ok) break;                                                                       \
        if (dsmoe_rt_before_collective(&rt, &e_) != DSMOE_OK) {                                    \
            bad((c), "before the collective: %s", e_.msg);                                         \
            break;                                                                                 \
        }                                                                                          \
        dsmoe_status s_ = rt.comm->op(rt.cctx, __VA_ARGS__, &rt.stream);                           \
        if (s_ == DSMOE_ERR_UNSUPPORTED) (c)->unsupported = 1;                                     \
        else if (s_ != DSMOE_OK)                                                                   \
            bad((c), "%s returned %s: %s", #op, dsmoe_status_name(s_), rt.comm->last_error(rt.cctx)); \
    } while (0)

// ------------------------------------------------------------------------------------------------
// inputs: formulas of (world rank, index) (comm_inputs.h)

static uint16_t to_bf16(float f) { // round to nearest even (finite values)
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static double from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static int is_int(dsmoe_dtype t) { return t == DSMOE_INT32 || t == DSMOE_INT64; }

// Element i of world rank r's input, stored as dtype t at dst.
static void gen(dsmoe_dtype t, int r, size_t i, void *dst) {
    switch (t) {
    case DSMOE_FLOAT32: { float v = (float)comm_value(r, i); memcpy(dst, &v, 4); break; }
    case DSMOE_FLOAT64: { double v = comm_value(r, i); memcpy(dst, &v, 8); break; }
    case DSMOE_INT32: { int32_t v = (int32_t)(((size_t)r * 37 + i * 11) % 101) - 50; memcpy(dst, &v, 4); break; }
    case DSMOE_INT64: {
        int64_t v = ((int64_t)(((size_t)r * 13 + i * 7) % 29) - 14) * (INT64_C(1) << 40) + r;
        memcpy(dst, &v, 8);
        break;
    }
    case DSMOE_BFLOAT16: { uint16_t v = to_bf16((float)comm_value(r, i)); memcpy(dst, &v, 2); break; }
    default: memset(dst, 0, dsmoe_dtype_size(t));
    }
}

static double as_double(dsmoe_dtype t, const void *p) {
    float f;
    double d;
    int32_t i32;
    int64_t i64;
    uint16_t h;
    switch (t) {
    case DSMOE_FLOAT32: memcpy(&f, p, 4); return f;
    case DSMOE_FLOAT64: memcpy(&d, p, 8); return d;
    case DSMOE_INT32: memcpy(&i32, p, 4); return i32;
    case DSMOE_INT64: memcpy(&i64, p, 8); return (double)i64;
    case DSMOE_BFLOAT16: memcpy(&h, p, 2); return from_bf16(h);
    default: return 0;
    }
}

static int64_t as_int(dsmoe_dtype t, const void *p) {
    int32_t i32;
    int64_t i64;
    if (t == DSMOE_INT32) return memcpy(&i32, p, 4), i32;
    return memcpy(&i64, p, 8), i64;
}

static double eps_of(dsmoe_dtype t) {
    return t == DSMOE_FLOAT64 ? DBL_EPSILON : t == DSMOE_BFLOAT16 ? 0x1p-7 : FLT_EPSILON;
}

static const char *op_name(dsmoe_reduce_op op) { return op == DSMOE_SUM ? "SUM" : op == DSMOE_MAX ? "MAX" : "MIN"; }

// The reduction over the members (world ranks, p of them) of element k: exact (integer sums, MAX, MIN)
// into exact (bytes of dtype t), float sums as refd and sumabs (sum of magnitudes) in double.
static void reference(dsmoe_dtype t, dsmoe_reduce_op op, const int *members, int p, size_t k, void *exact,
                      double *refd, double *sumabs) {
    uint8_t x[8];
    int64_t isum = 0;
    *refd = 0, *sumabs = 0;
    for (int q = 0; q < p; q++) {
        gen(t, members[q], k, x);
        if (op == DSMOE_SUM) {
            if (is_int(t)) isum += as_int(t, x);
            *refd += as_double(t, x), *sumabs += fabs(as_double(t, x));
        } else {
            // Compared in int64 or double, both exact for these types; the winner's bytes are copied.
            int above = is_int(t) ? as_int(t, x) > as_int(t, exact) : as_double(t, x) > as_double(t, exact);
            int below = is_int(t) ? as_int(t, x) < as_int(t, exact) : as_double(t, x) < as_double(t, exact);
            if (q == 0 || (op == DSMOE_MAX ? above : below)) memcpy(exact, x, dsmoe_dtype_size(t));
        }
    }
    if (op == DSMOE_SUM && t == DSMOE_INT32) { int32_t v = (int32_t)isum; memcpy(exact, &v, 4); }
    if (op == DSMOE_SUM && t == DSMOE_INT64) memcpy(exact, &isum, 8);
}

// Element k of the region of b (its first elements n) against the reduction of elements first + k.
static void check_reduced(tcase *c, const dbuf *b, dsmoe_dtype t, dsmoe_reduce_op op, const int *members, int p,
                          size_t first, size_t n) {
    size_t es = dsmoe_dtype_size(t);
    for (size_t k = 0; k < n && c->ok; k++) {
        const uint8_t *got = b->back + GUARD + k * es;
        uint8_t want[8];
        double refd, sumabs;
        reference(t, op, members, p, first + k, want, &refd, &sumabs);
        if (op == DSMOE_SUM && (t == DSMOE_FLOAT32 || t == DSMOE_FLOAT64) && (rt.comm->caps & DSMOE_CCAP_DETERMINISTIC)) {
            // A fixed order promised (the mpi plugins, the core's fixed-order adapter): exactly the sum in
            // member order, ((v_0 + v_1) + v_2) + ..., in the type itself.
            uint8_t x[8];
            float f = 0.0f;
            double d = 0.0;
            for (int q = 0; q < p; q++) {
                gen(t, members[q], first + k, x);
                if (t == DSMOE_FLOAT32) f = q ? f + (float)as_double(t, x) : (float)as_double(t, x);
                else d = q ? d + as_double(t, x) : as_double(t, x);
            }
            if (t == DSMOE_FLOAT32 ? memcmp(got, &f, 4) != 0 : memcmp(got, &d, 8) != 0)
                bad(c, "element %zu: %.17g, not the member-order sum %.17g the plugin's DSMOE_CCAP_DETERMINISTIC "
                    "promises", k, as_double(t, got), t == DSMOE_FLOAT32 ? (double)f : d);
        } else if (op == DSMOE_SUM && !is_int(t)) {
            double tol = 2.0 * p * eps_of(t) * sumabs + 1e-300, d = as_double(t, got);
            if (!(fabs(d - refd) <= tol))
                bad(c, "element %zu: %.17g, reference %.17g (bound %.3g)", k, d, refd, tol);
        } else if (memcmp(got, want, es) != 0) {
            bad(c, "element %zu: %.17g, expected exactly %.17g", k, as_double(t, got), as_double(t, want));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// groups

typedef struct grp {
    const char *label;
    dsmoe_rt_group rg;      // the world's: rg.comm = rt.world, no ctl
    int active;             // this rank calls the collectives (the odd ranks sit out "evens")
    int n, me;              // members and this rank's place, computed here (checked against the plugin's)
    int members[MAX_RANKS]; // world rank of each member, in group order
} grp;

// ------------------------------------------------------------------------------------------------
// data movement

static void case_alltoall(const grp *G, size_t b) {
    tcase c = {.ok = 1};
    if (G->active) { // the odd ranks sit out "even ranks", but take part in finish
        size_t all = b * (size_t)G->n;
        uint8_t *send = malloc(all + 1), *want = malloc(all + 1);
        for (int j = 0; j < G->n; j++)
            for (size_t k = 0; k < b; k++)
                send[j * b + k] = comm_pat(wrank, G->members[j], k), want[j * b + k] = comm_pat(G->members[j], wrank, k);
        dbuf s, r;
        up(&c, &s, all, send, 0), up(&c, &r, all, NULL, 0xEE);
        COLL(&c, alltoall, G->rg.comm, at(&s), at(&r), b);
        down(&c, &s), down(&c, &r), wait_queue(&c);
        check_moved(&c, &r, want, &s, "received");
        release(&s), release(&r), free(send), free(want);
    }
    finish(&c, "alltoall %zu bytes per rank, %s", b, G->label);
}

// Bytes rank `from` sends to rank `to` (world ranks): 0, 4, 8 or 12, some pairs 0, self included.
static size_t vcount(int from, int to) { return (size_t)((from * 5 + to * 3) % 4) * 4; }
static size_t zero_count(int from, int to) { return (void)from, (void)to, 0; }

// Sends its blocks in reverse group order with 3 junk bytes between them, receives in group order with
// 2-byte gaps that must keep their value. The count arrays are scribbled on right after the call.
static void case_alltoallv(const grp *G, size_t (*count)(int, int), const char *what) {
    if (!rt.comm->alltoallv) return; // optional member (the same on every rank)
    tcase c = {.ok = 1};
    if (G->active) {
        int p = G->n;
        size_t args[4][MAX_RANKS], sc[MAX_RANKS], sd[MAX_RANKS], rc[MAX_RANKS], rd[MAX_RANKS], st = 0, rtot = 0;
        for (int j = p - 1; j >= 0; j--) sd[j] = st, sc[j] = count(wrank, G->members[j]), st += sc[j] + 3;
        for (int i = 0; i < p; i++) rd[i] = rtot, rc[i] = count(G->members[i], wrank), rtot += rc[i] + 2;
        uint8_t *send = malloc(st + 1), *want = malloc(rtot + 1);
        memset(send, 0x77, st), memset(want, 0xEE, rtot);
        for (int j = 0; j < p; j++)
            for (size_t k = 0; k < sc[j]; k++) send[sd[j] + k] = comm_pat(wrank, G->members[j], k);
        for (int i = 0; i < p; i++)
            for (size_t k = 0; k < rc[i]; k++) want[rd[i] + k] = comm_pat(G->members[i], wrank, k);
        memcpy(args[0], sc, sizeof sc), memcpy(args[1], sd, sizeof sd);
        memcpy(args[2], rc, sizeof rc), memcpy(args[3], rd, sizeof rd);
        dbuf s, r;
        up(&c, &s, st, send, 0), up(&c, &r, rtot, NULL, 0xEE);
        COLL(&c, alltoallv, G->rg.comm, at(&s), args[0], args[1], at(&r), args[2], args[3]);
        memset(args, 0xFF, sizeof args); // host arrays: consumed before return
        down(&c, &s), down(&c, &r), wait_queue(&c);
        check_moved(&c, &r, want, &s, "received (blocks and gaps)");
        release(&s), release(&r), free(send), free(want);
    }
    finish(&c, "alltoallv %s, %s", what, G->label);
}

static void case_allgather(const grp *G, size_t b) {
    tcase c = {.ok = 1};
    if (G->active) {
        size_t all = b * (size_t)G->n;
        uint8_t *send = malloc(b + 1), *want = malloc(all + 1);
        for (size_t k = 0; k < b; k++) send[k] = comm_pat(wrank, 0, k);
        for (int i = 0; i < G->n; i++)
            for (size_t k = 0; k < b; k++) want[i * b + k] = comm_pat(G->members[i], 0, k);
        dbuf s, r;
        up(&c, &s, b, send, 0), up(&c, &r, all, NULL, 0xEE);
        COLL(&c, allgather, G->rg.comm, at(&s), at(&r), b);
        down(&c, &s), down(&c, &r), wait_queue(&c);
        check_moved(&c, &r, want, &s, "gathered");
        release(&s), release(&r), free(send), free(want);
    }
    finish(&c, "allgather %zu bytes per rank, %s", b, G->label);
}

// The root's buffer must come back unchanged, the others' with the root's bytes.
static void case_broadcast(const grp *G, size_t b, int root) {
    if (!rt.comm->broadcast) return; // optional member (the same on every rank)
    tcase c = {.ok = 1};
    if (G->active) {
        uint8_t *want = malloc(b + 1);
        for (size_t k = 0; k < b; k++) want[k] = comm_pat(G->members[root], 200, k);
        dbuf buf;
        up(&c, &buf, b, G->me == root ? want : NULL, 0xCD);
        COLL(&c, broadcast, G->rg.comm, at(&buf), b, root);
        down(&c, &buf), wait_queue(&c);
        if (c.ok) check_bytes(&c, &buf, want, 0, b, "broadcast"), check_guards(&c, &buf, "buffer");
        release(&buf), free(want);
    }
    finish(&c, "broadcast %zu bytes from group rank %d, %s", b, root, G->label);
}

// ------------------------------------------------------------------------------------------------
// reductions

static void case_allreduce(const grp *G, dsmoe_dtype t, dsmoe_reduce_op op, size_t n, int in_place) {
    tcase c = {.ok = 1};
    if (G->active) {
        size_t es = dsmoe_dtype_size(t), bytes = n * es;
        uint8_t *mine = malloc(bytes + 1);
        for (size_t k = 0; k < n; k++) gen(t, wrank, k, mine + k * es);
        dbuf s = {0}, r;
        if (in_place) {
            up(&c, &r, bytes, mine, 0);
            COLL(&c, allreduce, G->rg.comm, DSMOE_IN_PLACE, at(&r), n, t, op);
        } else {
            up(&c, &s, bytes, mine, 0), up(&c, &r, bytes, NULL, 0xEE);
            COLL(&c, allreduce, G->rg.comm, at(&s), at(&r), n, t, op);
        }
        down(&c, &s), down(&c, &r), wait_queue(&c);
        if (c.ok && !c.unsupported) {
            check_reduced(&c, &r, t, op, G->members, G->n, 0, n), check_guards(&c, &r, "recv");
            check_unchanged(&c, &s, "send");
        }
        release(&s), release(&r), free(mine);
    }
    finish(&c, "allreduce %s %s of %zu%s, %s", dsmoe_dtype_name(t), op_name(op), n, in_place ? " in place" : "",
           G->label);
}

// recv (n) = block `me` of the reduction of every member's (p * n) input.
static void case_reduce_scatter(const grp *G, dsmoe_dtype t, dsmoe_reduce_op op, size_t n) {
    tcase c = {.ok = 1};
    if (G->active) {
        size_t es = dsmoe_dtype_size(t), all = n * (size_t)G->n;
        uint8_t *mine = malloc(all * es + 1);
        for (size_t k = 0; k < all; k++) gen(t, wrank, k, mine + k * es);
        dbuf s, r;
        up(&c, &s, all * es, mine, 0), up(&c, &r, n * es, NULL, 0xEE);
        COLL(&c, reduce_scatter, G->rg.comm, at(&s), at(&r), n, t, op);
        down(&c, &s), down(&c, &r), wait_queue(&c);
        if (c.ok && !c.unsupported) {
            check_reduced(&c, &r, t, op, G->members, G->n, (size_t)G->me * n, n), check_guards(&c, &r, "recv");
            check_unchanged(&c, &s, "send");
        }
        release(&s), release(&r), free(mine);
    }
    finish(&c, "reduce_scatter %s %s of %zu per rank, %s", dsmoe_dtype_name(t), op_name(op), n, G->label);
}

// reduce_scatter with DSMOE_IN_PLACE: refused with DSMOE_ERR_INVALID at the call (comm_plugin.h defines
// it for allreduce only), through whatever the runtime puts in front of the plugin, and nothing written.
static void case_reduce_scatter_in_place(const grp *G) {
    tcase c = {.ok = 1};
    if (G->active) {
        size_t n = 3, bytes = n * (size_t)G->n * sizeof(float);
        dbuf r;
        up(&c, &r, bytes, NULL, 0xEE);
        dsmoe_err e = {0};
        if (c.ok && dsmoe_rt_before_collective(&rt, &e) != DSMOE_OK) bad(&c, "before the collective: %s", e.msg);
        dsmoe_status st = c.ok ? rt.comm->reduce_scatter(rt.cctx, G->rg.comm, DSMOE_IN_PLACE, at(&r), n, DSMOE_FLOAT32,
                                                         DSMOE_SUM, &rt.stream)
                               : DSMOE_ERR_INVALID;
        if (st != DSMOE_ERR_INVALID) bad(&c, "returned %s, expected %s", dsmoe_status_name(st),
                                         dsmoe_status_name(DSMOE_ERR_INVALID));
        down(&c, &r), wait_queue(&c);
        if (c.ok) check_unchanged(&c, &r, "recv");
        release(&r);
    }
    finish(&c, "reduce_scatter with DSMOE_IN_PLACE refused, %s", G->label);
}

// ------------------------------------------------------------------------------------------------
// the suites

static const dsmoe_dtype exact_types[2] = {DSMOE_INT32, DSMOE_INT64};
static const dsmoe_reduce_op all_ops[3] = {DSMOE_SUM, DSMOE_MAX, DSMOE_MIN};

static void world_suite(const grp *G) {
    const size_t a2a[] = {0, 1, 13, 1000}, gat[] = {0, 1, 13, 1000}, bc[] = {0, 7, 1000};
    const size_t sum_n[] = {0, 1, 3, 1000, 4097}, rs_n[] = {0, 1, 3, 1000};
    for (size_t i = 0; i < sizeof a2a / sizeof a2a[0]; i++) case_alltoall(G, a2a[i]);
    case_alltoallv(G, vcount, "blocks of 0-12 bytes");
    case_alltoallv(G, zero_count, "every block empty");
    for (size_t i = 0; i < sizeof gat / sizeof gat[0]; i++) case_allgather(G, gat[i]);
    for (int root = 0; root < G->n; root++)
        for (size_t i = 0; i < sizeof bc / sizeof bc[0]; i++) case_broadcast(G, bc[i], root);

    for (size_t i = 0; i < sizeof sum_n / sizeof sum_n[0]; i++)
        case_allreduce(G, DSMOE_FLOAT32, DSMOE_SUM, sum_n[i], 0);
    case_allreduce(G, DSMOE_FLOAT32, DSMOE_SUM, 1000, 1);
    case_allreduce(G, DSMOE_FLOAT32, DSMOE_MAX, 23, 0);
    case_allreduce(G, DSMOE_FLOAT32, DSMOE_MIN, 23, 0);
    for (int o = 0; o < 3; o++) case_allreduce(G, DSMOE_FLOAT64, all_ops[o], o == 0 ? 1000 : 23, 0);
    for (int t = 0; t < 2; t++)
        for (int o = 0; o < 3; o++) case_allreduce(G, exact_types[t], all_ops[o], 23, 0);
    case_allreduce(G, DSMOE_INT64, DSMOE_MIN, 23, 1);
    case_allreduce(G, DSMOE_BFLOAT16, DSMOE_SUM, 1000, 0); // skipped where the plugin refuses bfloat16
    case_allreduce(G, DSMOE_BFLOAT16, DSMOE_MAX, 23, 0);

    for (size_t i = 0; i < sizeof rs_n / sizeof rs_n[0]; i++) case_reduce_scatter(G, DSMOE_FLOAT32, DSMOE_SUM, rs_n[i]);
    case_reduce_scatter(G, DSMOE_FLOAT64, DSMOE_SUM, 13);
    for (int t = 0; t < 2; t++)
        for (int o = 0; o < 3; o++) case_reduce_scatter(G, exact_types[t], all_ops[o], 7);
    case_reduce_scatter(G, DSMOE_FLOAT32, DSMOE_MAX, 5);
    case_reduce_scatter(G, DSMOE_BFLOAT16, DSMOE_SUM, 5);
    case_reduce_scatter_in_place(G);
}

static void group_suite(const grp *G) {
    case_alltoall(G, 13);
    case_alltoallv(G, vcount, "blocks of 0-12 bytes");
    case_allgather(G, 13);
    for (int root = 0; root < G->n; root++) case_broadcast(G, 13, root);
    case_allreduce(G, DSMOE_FLOAT32, DSMOE_SUM, 1000, 0);
    case_allreduce(G, DSMOE_INT64, DSMOE_MIN, 7, 0);
    case_reduce_scatter(G, DSMOE_FLOAT32, DSMOE_SUM, 3);
}

// A split of the world (collective): `color` and `key` as MPI_Comm_split; the members computed here.
static int split(grp *G, const char *label, int color, int key, int active, const int *members, int n) {
    tcase c = {.ok = 1};
    dsmoe_err err = {0};
    *G = (grp){.label = label, .active = active, .n = n};
    memcpy(G->members, members, (size_t)n * sizeof *members);
    for (int i = 0; i < n; i++)
        if (members[i] == wrank) G->me = i;
    if (dsmoe_rt_group_split(&rt, color, key, &G->rg, &err) != DSMOE_OK) bad(&c, "%s", err.msg);
    else if (rt.comm->group_rank(G->rg.comm) != G->me || rt.comm->group_size(G->rg.comm) != G->n)
        bad(&c, "group rank %d of %d, expected %d of %d", rt.comm->group_rank(G->rg.comm),
            rt.comm->group_size(G->rg.comm), G->me, G->n);
    finish(&c, "group_create %s (%d ranks)", label, n);
    return c.ok;
}

// ------------------------------------------------------------------------------------------------

// 1 when the pair cannot run here (a file not on the search path, a device plugin without a device), the
// reason in why; 0 to go on (dsmoe_runtime_open then reports anything else).
static int cannot_run(const char *kernel, const char *comm, char *why, size_t len) {
    const dsmoe_kernel_plugin_v3 *k = NULL;
    const dsmoe_comm_plugin_v2 *cp = NULL;
    dsmoe_plugin_handle kh = {0}, ch = {0};
    dsmoe_err err = {0};
    int skip = 0, count = -1;
    if (dsmoe_plugin_load_kernel(kernel, "", &k, &kh, &err) != DSMOE_OK ||
        dsmoe_plugin_load_comm(comm, "", &cp, &ch, &err) != DSMOE_OK) {
        skip = strstr(err.msg, "not found") != NULL;
        if (skip) snprintf(why, len, "%s", err.msg);
    } else if (k->device_count && (k->device_count(&count) != DSMOE_OK || count == 0)) {
        skip = 1;
        snprintf(why, len, "kernel plugin '%s' (%s) finds no device on this machine", kernel, kh.path);
    }
    dsmoe_plugin_unload(&ch);
    dsmoe_plugin_unload(&kh);
    return skip;
}

static const char *env_or(const char *name, const char *def) {
    const char *v = getenv(name);
    return v && *v ? v : def;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &wrank);
    MPI_Comm_size(MPI_COMM_WORLD, &wsize);
    const char *kernel = env_or("DSMOE_COMM_DEVICE_KERNEL", "cpu"), *comm = env_or("DSMOE_COMM_DEVICE_COMM", "mpi");
    if (wsize > MAX_RANKS) {
        if (wrank == 0) fprintf(stderr, "test_comm_device: at most %d ranks\n", MAX_RANKS);
        MPI_Finalize();
        return 1;
    }
    char why[8192] = "";
    int skip = cannot_run(kernel, comm, why, sizeof why), any_skip = 0;
    MPI_Allreduce(&skip, &any_skip, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any_skip) {
        if (skip)
            fprintf(stderr, "test_comm_device: skipped on rank %d (kernel %s, comm %s): %s\n", wrank, kernel, comm,
                    why);
        MPI_Finalize();
        return 77;
    }
    // The core's configuration from the environment (DSMOE_<KEY>, plugin settings DSMOE_COMM_<NAME>_<KEY>),
    // with the plugin's own float sums unless DSMOE_RUN_FIXED_ORDER_SUMS says otherwise: the core's
    // default puts its fixed-order adapter (comm_ordered.c) in front of a plugin without
    // DSMOE_CCAP_DETERMINISTIC (nccl), and the plugin's allreduce would then never see a float sum.
    static dsmoe_config cfg;
    char src[64], *fixed_off[1] = {"run.fixed_order_sums=false"};
    dsmoe_config_source_of(NULL, "run.fixed_order_sums", src, sizeof src);
    const char *fixed = getenv("DSMOE_RUN_FIXED_ORDER_SUMS");
    int n_over = src[0] && !(fixed && *fixed); // "" = a core without the key (and without the adapter)
    dsmoe_err err = {0};
    if (dsmoe_config_load_text(NULL, "test_comm_device", fixed_off, n_over, NULL, 0, &cfg, NULL, &err) != DSMOE_OK) {
        fprintf(stderr, "test_comm_device: rank %d: configuration: %s\n", wrank, err.msg);
        MPI_Finalize();
        return 1;
    }
    if (dsmoe_runtime_open_placed(kernel, comm, "", 1, &cfg, NULL, &rt, &err) != DSMOE_OK) {
        fprintf(stderr, "test_comm_device: rank %d: dsmoe_runtime_open(kernel %s, comm %s): %s\n", wrank, kernel, comm,
                err.msg);
        MPI_Finalize();
        return 1;
    }
    char sums[128] = "";
    if (n_over) snprintf(sums, sizeof sums, ", float sums: the plugin's own (run.fixed_order_sums = false)");
    else if (fixed && *fixed) snprintf(sums, sizeof sums, ", DSMOE_RUN_FIXED_ORDER_SUMS=%.64s", fixed);
    if (wrank == 0) {
        printf("comm-device conformance: kernel %s (%s memory%s), comm %s (%s%s%s), %d ranks\n", rt.kern->name,
               rt.kern->mem_kind == DSMOE_MEM_CUDA ? "CUDA device" : "host-kind",
               rt.kern->caps & DSMOE_KCAP_ASYNC ? ", asynchronous" : "", comm,
               rt.stream_ordered ? "stream-ordered" : "host-progressed",
               rt.comm_staged ? ", through the core's host staging" : "", sums, wsize);
        printf("  files: %s, %s\n", rt.kernel_handle.path, rt.comm_handle.path);
    }

    grp world = {.label = "world", .rg = {.comm = rt.world}, .active = 1, .n = wsize, .me = wrank};
    for (int i = 0; i < wsize; i++) world.members[i] = i;
    tcase c = {.ok = 1};
    if (rt.comm->group_rank(rt.world) != wrank || rt.comm->group_size(rt.world) != wsize)
        bad(&c, "world group: rank %d of %d", rt.comm->group_rank(rt.world), rt.comm->group_size(rt.world));
    finish(&c, "world group");
    world_suite(&world);

    // Pairs {0,1}, {2,3}, ... (the last alone on an odd count); the world reversed; the even ranks
    // (the odd ranks form a group of their own that makes no call meanwhile).
    int pair[2] = {wrank - wrank % 2, wrank - wrank % 2 + 1}, rev[MAX_RANKS], evens[MAX_RANKS], n_even = 0;
    for (int i = 0; i < wsize; i++) rev[i] = wsize - 1 - i;
    for (int i = wrank % 2; i < wsize; i += 2) evens[n_even++] = i;
    grp g[3];
    const char *labels[3] = {"pairs", "world reversed", "even ranks"};
    int made[3];
    made[0] = split(&g[0], labels[0], wrank / 2, wrank, 1, pair, pair[1] < wsize ? 2 : 1);
    made[1] = split(&g[1], labels[1], 0, wsize - 1 - wrank, 1, rev, wsize);
    made[2] = split(&g[2], labels[2], wrank % 2, wrank, wrank % 2 == 0, evens, n_even);
    for (int k = 0; k < 3; k++) {
        int all_made = made[k];
        MPI_Allreduce(MPI_IN_PLACE, &all_made, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        if (all_made) group_suite(&g[k]);
        dsmoe_rt_group_free(&rt, &g[k].rg);
    }

    dsmoe_runtime_close(&rt);
    if (wrank == 0 && n_skip) printf("comm-device conformance: %d skipped (dtypes the plugin refuses)\n", n_skip);
    if (wrank == 0)
        printf("comm-device conformance: %d passed, %d failed (kernel %s, comm %s, %d ranks)\n", n_pass, n_fail, kernel,
               comm, wsize);
    MPI_Finalize();
    return n_fail ? 1 : 0;
}
