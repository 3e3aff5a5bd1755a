// bench/bench_alltoall.c: flat against hierarchical all-to-all (core/parallel/exchange.c) over one EP group of all
// ranks, with real or pretend nodes, over a range of message sizes per peer.
//
// usage: dsmoe_bench_alltoall [--ranks-per-node G] [--min-bytes B] [--max-bytes B] [--iters n] [--warmup n]
//                             [--kernel NAME] [--comm NAME]
// Defaults: G = 2 (pretend nodes; 0 = the real shared-memory nodes), 1Ki to 4Mi bytes per peer in
// powers of 4, 20 iterations after 3 warm-ups (a quarter of the iterations, at least 3, from 1 MiB up),
// cpu kernels, mpi comm.
//
// Each iteration runs, back to back so that the machine's load hits both alike, one flat and one
// hierarchical call (alternating which goes first), each after a barrier; a call's time is that of the
// slowest rank. Reported per size: the median time per call of each, their ratio, and from the plan
// (exchange.h) the messages and bytes each rank sends (all / to other nodes) and what AUTO would pick.
// After the timed calls the two results are compared byte for byte (check=ok).
#include "bench_args.h" // bench_parse_int, bench_flag_value
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/rng.h"
#include "exchange.h"
#include "runtime.h"

typedef struct opts {
    int rpn, iters, warmup;
    double min_bytes, max_bytes;
    const char *kernel, *comm;
} opts;

static void usage(FILE *f) {
    fprintf(f, "usage: dsmoe_bench_alltoall [--ranks-per-node G] [--min-bytes B] [--max-bytes B] [--iters n]\n"
               "                            [--warmup n] [--kernel NAME] [--comm NAME]\n"
               "defaults: --ranks-per-node 2 (0 = real nodes) --min-bytes 1Ki --max-bytes 4Mi --iters 20 --warmup 3\n"
               "          --kernel cpu --comm mpi; sizes go up in powers of 4\n");
}

static int parse_int(const char *flag, const char *v, int lo, int *out) {
    return bench_parse_int("dsmoe_bench_alltoall", flag, v, lo, 1000000000, out);
}

static int parse_bytes(const char *flag, const char *v, double *out) {
    if (dsmoe_parse_scaled(v, out) != 0 || *out < 1 || *out > 1e12) {
        fprintf(stderr, "dsmoe_bench_alltoall: %s %s: expected a size such as 1024, 4Ki or 4Mi\n", flag, v);
        return -1;
    }
    return 0;
}

static int parse_args(int argc, char **argv, opts *o) {
    *o = (opts){.rpn = 2, .iters = 20, .warmup = 3, .min_bytes = 1024, .max_bytes = 4 << 20, .kernel = "cpu",
                .comm = "mpi"};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        }
        const char *v = bench_flag_value("dsmoe_bench_alltoall", argc, argv, &i);
        if (!v) return -1;
        int rc = 0;
        if (!strcmp(a, "--ranks-per-node")) rc = parse_int(a, v, 0, &o->rpn);
        else if (!strcmp(a, "--iters")) rc = parse_int(a, v, 1, &o->iters);
        else if (!strcmp(a, "--warmup")) rc = parse_int(a, v, 0, &o->warmup);
        else if (!strcmp(a, "--min-bytes")) rc = parse_bytes(a, v, &o->min_bytes);
        else if (!strcmp(a, "--max-bytes")) rc = parse_bytes(a, v, &o->max_bytes);
        else if (!strcmp(a, "--kernel")) o->kernel = v;
        else if (!strcmp(a, "--comm")) o->comm = v;
        else {
            fprintf(stderr, "dsmoe_bench_alltoall: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
        if (rc) return -1;
    }
    return 0;
}

// ----------------------------------------------------------------------------------------------------
// helpers (the bench ends the job on failure, naming the call)

static dsmoe_runtime rt;

static void die(const char *what, const char *msg) {
    fprintf(stderr, "dsmoe_bench_alltoall: %s: %s\n", what, msg);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

#define KCHECK(call)                                                                               \
    do {                                                                                           \
        if ((call) != DSMOE_OK) die(#call, rt.kern->last_error(rt.kctx));                          \
    } while (0)

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Seconds of one call on the slowest rank.
static double timed_call(dsmoe_exchange *ex, const void *send, void *recv, size_t bytes) {
    dsmoe_err err = {0};
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    if (dsmoe_exchange_alltoall(ex, send, recv, bytes, &err) != DSMOE_OK ||
        dsmoe_rt_wait(&rt, &err) != DSMOE_OK) // the call may only be enqueued: time until it has run
        die("dsmoe_exchange_alltoall", err.msg);
    double t = MPI_Wtime() - t0, slowest;
    MPI_Allreduce(&t, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return slowest;
}

static void fmt_bytes(char *buf, size_t len, double b) {
    if (b >= 1 << 20) snprintf(buf, len, "%gMi", b / (1 << 20));
    else if (b >= 1 << 10) snprintf(buf, len, "%gKi", b / (1 << 10));
    else snprintf(buf, len, "%g", b);
}

// ----------------------------------------------------------------------------------------------------

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    opts o;
    if (parse_args(argc, argv, &o) != 0) {
        MPI_Finalize();
        return 2;
    }
    dsmoe_err err = {0};
    if (dsmoe_runtime_open(o.kernel, o.comm, "", 1, &rt, &err) != DSMOE_OK) die("runtime", err.msg);
    int me = rt.world_rank, p = rt.world_size;
    dsmoe_exchange *flat = NULL, *hier = NULL;
    if (dsmoe_exchange_create(&rt, rt.world_ctl, DSMOE_A2A_FLAT, o.rpn, &flat, &err) != DSMOE_OK ||
        dsmoe_exchange_create(&rt, rt.world_ctl, DSMOE_A2A_HIERARCHICAL, o.rpn, &hier, &err) != DSMOE_OK)
        die("dsmoe_exchange_create", err.msg);
    const dsmoe_a2a_plan *info = dsmoe_exchange_last(hier);
    int G = info->ranks_per_node, N = info->nodes;
    size_t max_total = (size_t)p * (size_t)o.max_bytes;
    if (dsmoe_exchange_reserve(hier, (size_t)o.max_bytes, &err) != DSMOE_OK) die("dsmoe_exchange_reserve", err.msg);

    // send (p, max_bytes): bytes from (rank, index); the two receive buffers are compared at the end.
    unsigned char *host = malloc(max_total ? max_total : 1);
    if (!host) die("malloc", "out of host memory");
    for (size_t i = 0; i < max_total; i++) host[i] = (unsigned char)dsmoe_rng_u64(dsmoe_rng_key(77, me, 0, 0), i);
    void *send = NULL, *recv_flat = NULL, *recv_hier = NULL;
    KCHECK(rt.kern->alloc(rt.kctx, max_total, 0, &send));
    KCHECK(rt.kern->alloc(rt.kctx, max_total, 0, &recv_flat));
    KCHECK(rt.kern->alloc(rt.kctx, max_total, 0, &recv_hier));
    KCHECK(rt.kern->copy_to_device(rt.kctx, rt.q, send, host, max_total));
    unsigned char *host2 = malloc(max_total ? max_total : 1);
    if (!host2) die("malloc", "out of host memory");

    double *tf = malloc((size_t)o.iters * sizeof *tf), *th = malloc((size_t)o.iters * sizeof *th);
    if (!tf || !th) die("malloc", "out of host memory");
    if (me == 0) {
        printf("dsmoe_bench_alltoall: %d ranks as %d node%s of %d (%s), kernel %s, comm %s, %d iterations "
               "(fewer from 1Mi), %d warm-up\n",
               p, N, N == 1 ? "" : "s", G, o.rpn > 0 ? "pretend nodes" : "shared-memory nodes", rt.kern->name,
               rt.comm->name, o.iters, o.warmup);
        printf("%-10s %4s %11s %11s %9s %11s %11s %13s %13s %11s %s\n", "bytes/peer", "n", "flat_us", "hier_us",
               "hier/flat", "flat_msgs", "hier_msgs", "flat_sent", "hier_sent", "inter_msgs", "auto");
    }
    for (double bd = o.min_bytes; bd <= o.max_bytes; bd *= 4) {
        size_t bytes = (size_t)bd;
        int n = o.iters; // the large sizes take long on a small machine: a quarter, at least 3
        if (bytes >= (1u << 20)) n = o.iters / 4 >= 3 ? o.iters / 4 : (o.iters < 3 ? o.iters : 3);
        for (int w = 0; w < o.warmup; w++) {
            timed_call(flat, send, recv_flat, bytes);
            timed_call(hier, send, recv_hier, bytes);
        }
        for (int it = 0; it < n; it++) {
            if (it % 2 == 0) {
                tf[it] = timed_call(flat, send, recv_flat, bytes);
                th[it] = timed_call(hier, send, recv_hier, bytes);
            } else {
                th[it] = timed_call(hier, send, recv_hier, bytes);
                tf[it] = timed_call(flat, send, recv_flat, bytes);
            }
        }
        size_t total = (size_t)p * bytes;
        KCHECK(rt.kern->copy_to_host(rt.kctx, rt.q, host, recv_flat, total));
        KCHECK(rt.kern->copy_to_host(rt.kctx, rt.q, host2, recv_hier, total));
        KCHECK(rt.kern->synchronize(rt.kctx));
        int same = memcmp(host, host2, total) == 0, all_same = 0;
        MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        if (!all_same) die("check", "flat and hierarchical results differ");

        dsmoe_a2a_plan pf, ph, pa;
        dsmoe_exchange_plan(flat, bytes, &pf);
        dsmoe_exchange_plan(hier, bytes, &ph);
        if (dsmoe_a2a_plan_compute(DSMOE_A2A_AUTO, p, G, bytes, &pa, &err) != DSMOE_OK) die("plan", err.msg);
        double mf = median(tf, n) * 1e6, mh = median(th, n) * 1e6;
        if (me == 0) {
            char b[32], sf[32], sh[32], inter[32];
            fmt_bytes(b, sizeof b, (double)bytes);
            fmt_bytes(sf, sizeof sf, (double)pf.bytes_sent);
            fmt_bytes(sh, sizeof sh, (double)ph.bytes_sent);
            snprintf(inter, sizeof inter, "%lld/%lld", (long long)pf.inter_node_messages,
                     (long long)ph.inter_node_messages);
            printf("%-10s %4d %11.1f %11.1f %9.2f %11lld %11lld %13s %13s %11s %s\n", b, n, mf, mh, mh / mf,
                   (long long)pf.messages, (long long)ph.messages, sf, sh, inter, dsmoe_a2a_algo_name(pa.algo));
            fflush(stdout);
        }
    }
    if (me == 0) printf("check=ok (flat and hierarchical results identical at every size)\n");

    free(tf);
    free(th);
    free(host);
    free(host2);
    rt.kern->free(rt.kctx, send);
    rt.kern->free(rt.kctx, recv_flat);
    rt.kern->free(rt.kctx, recv_hier);
    dsmoe_exchange_free(hier);
    dsmoe_exchange_free(flat);
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return 0;
}
