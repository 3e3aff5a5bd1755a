// tests/nccl_double/test_nccl_fail.c: a failed peer ends an nccl run with a message instead of a hang,
// on the test double (tests/plugins/comm/nccl.cmake runs it on 2 ranks with DSMOE_NCCLSIM_TIMEOUT=2). The last rank
// stops itself (SIGSTOP: it keeps its connections open, as a hung GPU or a dead node behind a live
// socket does, which is what leaves NCCL waiting) in the middle of a loop of all-reduces; every other
// rank must see a comm error naming the abort within seconds, print it, and end the job (MPI_Abort).
// A survivor that finishes the loop prints "NOT DETECTED" (the test fails on that text, or on its
// timeout when a rank hangs).
// With DSMOE_NCCLSIM_FAIL_EVENT_CREATE=<rank> it checks group set-up instead: that rank fails locally
// before the NCCL set-up, and group_create must then fail on every rank at once (none left waiting in
// the set-up), the others naming that member; exit 0 when they all do. DSMOE_NCCLSIM_FAIL_INIT=<rank>
// does the same with a failure of that rank's NCCL set-up itself, after which the others hold a
// communicator that would wait for it: they must abort theirs and name the member. With
// DSMOE_TEST_NCCL_WAIT_TIMEOUT=<s> (the plugin's wait_timeout) and a set-up that never settles
// (DSMOE_NCCLSIM_INPROGRESS_POLLS very large), every rank's group_create must give up after that long,
// saying so.
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm_conformance.h" // conf_load_comm, conf_boot, conf_queue

static int rank;

static void log_line(void *user, dsmoe_log_level level, const char *line) {
    fprintf(stderr, "[rank %d] log: %s\n", rank, line);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
    int size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    void *handle;
    char path[4096], why[8192];
    const dsmoe_comm_plugin_v2 *P = conf_load_comm("ncclsim", DSMOE_CONFORMANCE_DEFAULT_DIRS, &handle, path,
                                                   sizeof path, why, sizeof why);
    if (!P) {
        fprintf(stderr, "%s\n", why);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_Comm wc;
    MPI_Comm_dup(MPI_COMM_WORLD, &wc);
    conf_boot boot;
    conf_boot_make(&boot, wc);
    conf_queue Q = {0};
    dsmoe_comm_stream S = {.native = NULL, .enqueue_host = conf_queue_enqueue, .owner = &Q};
    dsmoe_comm_options opt = {.log = log_line, .world = &boot.b};
    dsmoe_comm_ctx *ctx = NULL;
    dsmoe_comm_group *g = NULL;
    char errbuf[512];
    const char *fail_event = getenv("DSMOE_NCCLSIM_FAIL_EVENT_CREATE"), *fail_init = getenv("DSMOE_NCCLSIM_FAIL_INIT");
    const char *fail_rank = fail_event ? fail_event : fail_init, *wait_timeout = getenv("DSMOE_TEST_NCCL_WAIT_TIMEOUT");
    if (fail_rank || wait_timeout) { // a group set-up that must fail on every rank at once, saying why
        const char *values[2] = {NULL, wait_timeout};
        if (wait_timeout) opt.param_values = values, opt.n_param_values = 2;
        if (P->init(&opt, &ctx, errbuf, sizeof errbuf) != DSMOE_OK) {
            fprintf(stderr, "rank %d: init failed: %s\n", rank, errbuf);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        double t0 = now_s();
        dsmoe_status s = P->group_create(ctx, &boot.b, &g);
        double took = now_s() - t0;
        const char *msg = s == DSMOE_OK ? "(succeeded)" : P->last_error(ctx);
        int bad = fail_rank ? atoi(fail_rank) : -1, in_time = 1;
        char want[160];
        if (wait_timeout) {
            snprintf(want, sizeof want, "ncclCommInitRankConfig (rank %d of %d): still in progress after "
                     "wait_timeout = %s s", rank, size, wait_timeout);
            in_time = took >= atof(wait_timeout) && took < atof(wait_timeout) + 5;
        } else if (rank == bad && fail_event) {
            snprintf(want, sizeof want, "cudaEventCreateWithFlags failed: out of memory");
        } else if (rank == bad) {
            snprintf(want, sizeof want, "ncclCommInitRankConfig (rank %d of %d): unhandled system error: ncclsim: "
                     "ncclCommInitRankConfig: set-up failed on purpose", bad, size);
        } else {
            snprintf(want, sizeof want, "member %d of %d could not %s", bad, size,
                     fail_event ? "set up its side" : "create its NCCL communicator");
        }
        int ok = s != DSMOE_OK && strstr(msg, want) && in_time, all_ok = 0;
        fprintf(stderr, "rank %d: group_create %s after %.1f s: %s\n", rank, ok ? "refused as expected" : "WRONG",
                took, msg);
        MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        if (s == DSMOE_OK) P->group_destroy(ctx, g);
        P->finalize(ctx);
        conf_boot_free(&boot);
        MPI_Finalize();
        return all_ok ? 0 : 1;
    }
    if (P->init(&opt, &ctx, errbuf, sizeof errbuf) != DSMOE_OK || P->group_create(ctx, &boot.b, &g) != DSMOE_OK) {
        fprintf(stderr, "rank %d: setup failed: %s\n", rank, ctx ? P->last_error(ctx) : errbuf);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    enum { N = 1000, STOP_AT = 5 };
    static int buf[N];
    double t_fail = 0;
    for (int it = 0; it < 200; it++) {
        if (it == STOP_AT && rank == size - 1) {
            fprintf(stderr, "rank %d: stopping itself (SIGSTOP) at iteration %d\n", rank, it);
            raise(SIGSTOP);
        }
        for (int i = 0; i < N; i++) buf[i] = rank + i;
        if (it == STOP_AT) t_fail = now_s();
        dsmoe_status s = P->allreduce(ctx, g, DSMOE_IN_PLACE, buf, N, DSMOE_INT32, DSMOE_SUM, &S);
        conf_queue_run(&Q);
        int bad = 0;
        for (int i = 0; i < N && s == DSMOE_OK && it < STOP_AT; i++) bad += buf[i] != size * (size - 1) / 2 + size * i;
        if (bad) fprintf(stderr, "rank %d: iteration %d: %d wrong sums\n", rank, it, bad), MPI_Abort(MPI_COMM_WORLD, 1);
        if (s == DSMOE_OK) {
            float z = 0; // a zero-count call returns an error of the queued one (sticky)
            s = P->allreduce(ctx, g, &z, &z, 0, DSMOE_FLOAT32, DSMOE_SUM, &S);
        }
        if (s != DSMOE_OK) {
            fprintf(stderr, "rank %d: ended after %.1f s: %s\n", rank, t_fail ? now_s() - t_fail : 0.0,
                    P->last_error(ctx));
            fflush(stderr);
            MPI_Abort(MPI_COMM_WORLD, 3);
        }
    }
    fprintf(stderr, "rank %d: NOT DETECTED: 200 all-reduces went through with a stopped peer\n", rank);
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
}
