// tests/nccl_double/nccl_double.c: a TEST DOUBLE of the NCCL and CUDA runtime calls backends/nccl makes
// (the declarations are include/nccl.h and include/cuda_runtime_api.h beside this file), implemented
// over MPI on host memory, so that the nccl plugin's own logic (groups, ids, offsets, variable blocks,
// error paths) runs on 1-4 ranks of one machine without a GPU (NCCL cannot put two ranks of one
// communicator on one GPU). Built only for tests (tests/plugins/comm/nccl.cmake): never installed.
//
// What it does differently from NCCL, on purpose:
// - "device" pointers are host pointers; streams and events are ignored: every operation has run when
//   the call returns (cudaEventQuery is always done).
// - A communicator is an MPI communicator over the members' world ranks. ncclGetUniqueId writes the
//   caller's world rank and a serial number; ncclCommInitRank sends each member's world rank to that
//   creator (point to point on MPI_COMM_WORLD, tags from the serial), which sends back the list, then
//   MPI_Comm_create_group (collective over the members only).
// - Sums are done in rank order on the host, or from the last rank down with DSMOE_NCCLSIM_SUM_ORDER=
//   reverse (the real NCCL's order is not fixed; the plugin does not claim determinism, so the tests
//   accept any order within the summation error bound, and the core's fixed-order sums must give the
//   same bits whatever the order).
// - Failure: every wait polls its MPI requests with a deadline of DSMOE_NCCLSIM_TIMEOUT seconds (60 by
//   default). Past it, or when MPI fails, the communicator's asynchronous error becomes
//   ncclRemoteError (ncclSystemError for an MPI failure), ncclGetLastError says what waited, and the
//   call returns that error: a peer that stopped shows up as NCCL reports a lost peer.
// - ncclCommAbort only marks the communicator aborted and never frees it (the job is ending anyway).
// - Non-blocking communicators (ncclCommInitRankConfig with config.blocking = 0): the set-up, every
//   collective, ncclGroupEnd and ncclCommFinalize do their work at once, as above, then return
//   ncclInProgress, and ncclCommGetAsyncError reads ncclInProgress for the next
//   DSMOE_NCCLSIM_INPROGRESS_POLLS queries (3 by default) before it gives the outcome: a caller must
//   poll the state until it settles, as NCCL requires.
// - DSMOE_NCCLSIM_LINGER_MS=<ms>: a call whose wait failed stays inside for that long after it has set
//   the asynchronous error, as a call that is slow to notice: what lets a watchdog thread see the error
//   while the caller is still inside the call.
//
// What it checks, because NCCL would not tell (it frees the communicator, or blocks, or corrupts): a
// breach prints "ncclsim: NCCL MISUSE: ..." and aborts the process, so the test fails at the breach.
// - no call on a communicator after ncclCommAbort (NCCL has freed it; ncclCommDestroy frees it here too,
//   so a use after that is for the sanitized build's AddressSanitizer);
// - no call but ncclCommGetAsyncError while a non-blocking communicator's state reads ncclInProgress;
// - no two threads inside calls on one communicator at once, and no ncclCommAbort from one thread
//   while another is inside a call on it (NCCL frees what that call is using);
// - no ncclCommDestroy of a non-blocking communicator that was not finalised (NCCL would block in it).
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mpi.h>

#include "cuda_runtime_api.h"
#include "nccl.h"

#define EXPORT __attribute__((visibility("default")))
#define ID_MAGIC 0x6e73696du // "msin"

struct ncclComm {
    MPI_Comm mpi;
    int rank, size;
    atomic_int async;   // ncclResult_t
    atomic_int aborted;
    char msg[512];      // ncclGetLastError
    struct ncclComm *next_aborted;
    int nonblocking, finalized;
    atomic_int in_progress; // queries of the state still to read ncclInProgress
    atomic_int in_call;     // threads inside a call on it (more than 1 is a misuse)
    const char *in_what;    // the call they are in
};

typedef struct sim_id {
    uint32_t magic;
    int creator, serial; // world rank of the caller of ncclGetUniqueId, its count of ids
} sim_id;

static char init_msg[512]; // ncclGetLastError(NULL)

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double timeout_s(void) {
    const char *t = getenv("DSMOE_NCCLSIM_TIMEOUT");
    double v = t && *t ? atof(t) : 60.0;
    return v > 0 ? v : 60.0;
}

static int env_int(const char *name, int fallback) {
    const char *t = getenv(name);
    return t && *t ? atoi(t) : fallback;
}

static void linger(void) {
    int ms = env_int("DSMOE_NCCLSIM_LINGER_MS", 0);
    if (ms > 0) nanosleep(&(struct timespec){ms / 1000, (ms % 1000) * 1000000L}, NULL);
}

__attribute__((format(printf, 1, 2), noreturn)) static void misuse(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    int me = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    fprintf(stderr, "ncclsim: NCCL MISUSE on world rank %d: %s\n", me, line);
    fflush(stderr);
    abort();
}

// The checks at the start of every call on comm but the state queries (see the top).
static void enter(ncclComm_t comm, const char *what) {
    if (!comm) return;
    if (atomic_load(&comm->aborted)) misuse("%s on a communicator after ncclCommAbort (NCCL has freed it)", what);
    if (atomic_load(&comm->in_progress) > 0)
        misuse("%s while the communicator's state reads ncclInProgress (poll ncclCommGetAsyncError until it "
               "settles first)", what);
    if (atomic_fetch_add(&comm->in_call, 1) != 0)
        misuse("%s while another thread is inside %s on the same communicator", what, comm->in_what);
    comm->in_what = what;
}

// The end of a call that succeeded (r) or failed: a non-blocking communicator reads ncclInProgress for a
// while, then r.
static ncclResult_t leave(ncclComm_t comm, ncclResult_t r) {
    if (!comm) return r;
    atomic_fetch_sub(&comm->in_call, 1);
    if (!comm->nonblocking || r == ncclInvalidArgument || r == ncclInvalidUsage) return r;
    if (r != ncclSuccess) atomic_store(&comm->async, r);
    atomic_store(&comm->in_progress, env_int("DSMOE_NCCLSIM_INPROGRESS_POLLS", 3));
    return ncclInProgress;
}

// Waits for n requests; on a deadline or an MPI error marks comm (if any) with the asynchronous error.
static ncclResult_t wait_reqs_status(ncclComm_t comm, MPI_Request *reqs, int n, MPI_Status *statuses,
                                     const char *what) {
    double t0 = now_s(), limit = timeout_s();
    int done = 0;
    while (!done) {
        int rc = MPI_Testall(n, reqs, &done, statuses ? statuses : MPI_STATUSES_IGNORE);
        char *msg = comm ? comm->msg : init_msg;
        size_t len = comm ? sizeof comm->msg : sizeof init_msg;
        if (rc != MPI_SUCCESS) {
            snprintf(msg, len, "ncclsim: %s: MPI failed (code %d)", what, rc);
            if (comm) atomic_store(&comm->async, ncclSystemError);
            linger();
            return ncclSystemError;
        }
        if (!done && now_s() - t0 > limit) {
            snprintf(msg, len, "ncclsim: %s: no answer from a peer within %g s (DSMOE_NCCLSIM_TIMEOUT)", what, limit);
            if (comm) atomic_store(&comm->async, ncclRemoteError);
            linger();
            return ncclRemoteError;
        }
        if (!done) nanosleep(&(struct timespec){0, 200000L}, NULL);
    }
    return ncclSuccess;
}

static ncclResult_t wait_reqs(ncclComm_t comm, MPI_Request *reqs, int n, const char *what) {
    return wait_reqs_status(comm, reqs, n, NULL, what);
}

static ncclResult_t usable(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    return (ncclResult_t)atomic_load(&comm->async);
}

// ------------------------------------------------------------------------------------------------
// element types and reductions (host, in rank order)

static size_t esize(ncclDataType_t t) {
    switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    }
    return 0;
}

static float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float f;
    if (e == 0) {
        f = ldexpf((float)m, -24);
        return sign ? -f : f;
    }
    uint32_t x = e == 31 ? sign | 0x7f800000u | (m << 13) : sign | ((e - 15 + 127) << 23) | (m << 13);
    memcpy(&f, &x, 4);
    return f;
}

static uint16_t f2h(float f) { // round to nearest even
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); // rounds to infinity
    if (ax < 0x38800000u) {                                   // below 2^-14: subnormal or zero
        float a;
        memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f));
    }
    uint32_t h = ((((ax >> 23) - 127 + 15)) << 10) | ((ax & 0x7fffff) >> 13), rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static float b2f(uint16_t b) {
    uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static uint16_t f2b(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

#define RED(T, a, b) (op == ncclSum ? (T)((a) + (b)) : op == ncclMax ? ((a) > (b) ? (a) : (b)) : ((a) < (b) ? (a) : (b)))
#define RED_LOOP(T)                                                                                \
    do {                                                                                           \
        T *A = acc;                                                                                \
        const T *X = x;                                                                            \
        for (size_t i = 0; i < n; i++) A[i] = RED(T, A[i], X[i]);                                  \
    } while (0)

// acc (n) = acc op x, elementwise. Integer sums wrap (unsigned arithmetic).
static int reduce_into(ncclDataType_t t, ncclRedOp_t op, void *acc, const void *x, size_t n) {
    if (op != ncclSum && op != ncclMax && op != ncclMin) return -1;
    switch (t) {
    case ncclInt8: if (op == ncclSum) RED_LOOP(uint8_t); else RED_LOOP(int8_t); break;
    case ncclUint8: RED_LOOP(uint8_t); break;
    case ncclInt32: if (op == ncclSum) RED_LOOP(uint32_t); else RED_LOOP(int32_t); break;
    case ncclUint32: RED_LOOP(uint32_t); break;
    case ncclInt64: if (op == ncclSum) RED_LOOP(uint64_t); else RED_LOOP(int64_t); break;
    case ncclUint64: RED_LOOP(uint64_t); break;
    case ncclFloat32: RED_LOOP(float); break;
    case ncclFloat64: RED_LOOP(double); break;
    case ncclFloat16:
    case ncclBfloat16: {
        uint16_t *A = acc;
        const uint16_t *X = x;
        for (size_t i = 0; i < n; i++) {
            float a = t == ncclFloat16 ? h2f(A[i]) : b2f(A[i]), b = t == ncclFloat16 ? h2f(X[i]) : b2f(X[i]);
            float r = RED(float, a, b);
            A[i] = t == ncclFloat16 ? f2h(r) : f2b(r);
        }
        break;
    }
    default: return -1;
    }
    return 0;
}

// ------------------------------------------------------------------------------------------------
// communicators

EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId) {
    static int serial;
    if (!uniqueId) return ncclInvalidArgument;
    sim_id id = {ID_MAGIC, 0, serial++};
    MPI_Comm_rank(MPI_COMM_WORLD, &id.creator);
    memset(uniqueId, 0, sizeof *uniqueId);
    memcpy(uniqueId->internal, &id, sizeof id);
    return ncclSuccess;
}

static pthread_mutex_t aborted_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ncclComm *aborted_list;

// config NULL: blocking, as ncclCommInitRank. DSMOE_NCCLSIM_FAIL_INIT=<world rank>: the set-up fails
// there after its part of the handshake (the other members' set-ups succeed), reported through the
// state of a non-blocking communicator, or at once.
EXPORT ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank,
                                           ncclConfig_t *config) {
    if (config && (config->magic != 0xcafebeef || config->size != sizeof *config)) {
        snprintf(init_msg, sizeof init_msg, "ncclsim: ncclCommInitRankConfig: the config was not set from "
                 "NCCL_CONFIG_INITIALIZER");
        return ncclInvalidArgument;
    }
    int nonblocking = config && config->blocking == 0;
    sim_id id;
    memcpy(&id, commId.internal, sizeof id);
    if (!comm || nranks < 1 || rank < 0 || rank >= nranks || id.magic != ID_MAGIC) {
        snprintf(init_msg, sizeof init_msg, "ncclsim: ncclCommInitRank: bad arguments (rank %d of %d, id %s)", rank,
                 nranks, id.magic == ID_MAGIC ? "ok" : "not from ncclGetUniqueId");
        return ncclInvalidArgument;
    }
    *comm = NULL;
    int me, tag = 20000 + (id.serial % 4000) * 2;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    int *world = malloc((size_t)nranks * sizeof *world), mine[2] = {rank, me};
    MPI_Request *reqs = malloc((size_t)nranks * sizeof *reqs);
    ncclResult_t r = ncclSuccess;
    if (me == id.creator) { // collect (rank, world rank) of every member, then send the list back
        world[rank] = me;
        for (int k = 0; k < nranks - 1 && r == ncclSuccess; k++) {
            int got[2] = {-1, -1};
            MPI_Irecv(got, 2, MPI_INT, MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, &reqs[0]);
            r = wait_reqs(NULL, reqs, 1, "ncclCommInitRank: gathering the members");
            if (r == ncclSuccess && (got[0] < 0 || got[0] >= nranks)) r = ncclInvalidUsage;
            if (r == ncclSuccess) world[got[0]] = got[1];
        }
        int n = 0;
        for (int k = 0; k < nranks && r == ncclSuccess; k++)
            if (k != rank) MPI_Isend(world, nranks, MPI_INT, world[k], tag + 1, MPI_COMM_WORLD, &reqs[n++]);
        if (r == ncclSuccess) r = wait_reqs(NULL, reqs, n, "ncclCommInitRank: sending the member list");
    } else {
        MPI_Isend(mine, 2, MPI_INT, id.creator, tag, MPI_COMM_WORLD, &reqs[0]);
        MPI_Irecv(world, nranks, MPI_INT, id.creator, tag + 1, MPI_COMM_WORLD, &reqs[1]);
        r = wait_reqs(NULL, reqs, 2, "ncclCommInitRank: waiting for the id's creator");
    }
    free(reqs);
    struct ncclComm *c = calloc(1, sizeof *c);
    if (r == ncclSuccess && !c) r = ncclSystemError;
    if (r == ncclSuccess) {
        MPI_Group wg, mg;
        MPI_Comm_group(MPI_COMM_WORLD, &wg);
        MPI_Group_incl(wg, nranks, world, &mg);
        int rc = MPI_Comm_create_group(MPI_COMM_WORLD, mg, tag, &c->mpi);
        MPI_Group_free(&mg), MPI_Group_free(&wg);
        if (rc != MPI_SUCCESS) r = ncclSystemError;
        else MPI_Comm_set_errhandler(c->mpi, MPI_ERRORS_RETURN);
    }
    free(world);
    if (r != ncclSuccess) {
        free(c);
        return r;
    }
    c->rank = rank, c->size = nranks, c->nonblocking = nonblocking;
    atomic_init(&c->async, ncclSuccess);
    atomic_init(&c->aborted, 0);
    atomic_init(&c->in_progress, 0);
    atomic_init(&c->in_call, 1);
    *comm = c;
    const char *fail_rank = getenv("DSMOE_NCCLSIM_FAIL_INIT");
    if (fail_rank && atoi(fail_rank) == me) {
        snprintf(c->msg, sizeof c->msg, "ncclsim: ncclCommInitRankConfig: set-up failed on purpose "
                 "(DSMOE_NCCLSIM_FAIL_INIT=%d)", me);
        r = ncclSystemError;
    }
    return leave(c, r);
}

EXPORT ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank) {
    return ncclCommInitRankConfig(comm, nranks, commId, rank, NULL);
}

// Nothing to flush (every operation has run): settles at once, or after the polls when non-blocking.
EXPORT ncclResult_t ncclCommFinalize(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    enter(comm, "ncclCommFinalize");
    comm->finalized = 1;
    return leave(comm, ncclSuccess);
}

EXPORT ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    enter(comm, "ncclCommDestroy");
    if (comm->nonblocking && !comm->finalized)
        misuse("ncclCommDestroy of a non-blocking communicator that was not finalised (NCCL would block in it "
               "until its peers are done; call ncclCommFinalize and let it settle first)");
    MPI_Comm_free(&comm->mpi);
    free(comm);
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    if (atomic_load(&comm->aborted)) misuse("ncclCommAbort of a communicator already aborted (NCCL has freed it)");
    if (atomic_load(&comm->in_call) > 0)
        misuse("ncclCommAbort while another thread is inside %s on the same communicator (NCCL frees what that "
               "call is using)", comm->in_what);
    atomic_store(&comm->aborted, 1);
    pthread_mutex_lock(&aborted_lock);
    comm->next_aborted = aborted_list;
    aborted_list = comm;
    pthread_mutex_unlock(&aborted_lock);
    return ncclSuccess;
}

// Aborted communicators are kept, so that a later use is still seen, and freed when the library is
// unloaded (their MPI communicators are Open MPI's to free at MPI_Finalize).
__attribute__((destructor)) static void free_aborted(void) {
    while (aborted_list) {
        struct ncclComm *c = aborted_list;
        aborted_list = c->next_aborted;
        free(c);
    }
}

// NCCL allows this at any time, from any thread: it is how a call in progress and a failed peer are seen.
EXPORT ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError) {
    if (!comm || !asyncError) return ncclInvalidArgument;
    if (atomic_load(&comm->aborted)) misuse("ncclCommGetAsyncError on a communicator after ncclCommAbort");
    int left = atomic_load(&comm->in_progress);
    while (left > 0 && !atomic_compare_exchange_weak(&comm->in_progress, &left, left - 1)) {}
    *asyncError = left > 0 ? ncclInProgress : (ncclResult_t)atomic_load(&comm->async);
    return ncclSuccess;
}

EXPORT const char *ncclGetErrorString(ncclResult_t result) {
    switch (result) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

EXPORT const char *ncclGetLastError(ncclComm_t comm) { return comm ? comm->msg : init_msg; }

// ------------------------------------------------------------------------------------------------
// collectives (run at once)

// out (count) = op over the p blocks (bytes each) of `blocks`: in rank order, or from the last rank down
// with DSMOE_NCCLSIM_SUM_ORDER=reverse (a float sum in another order, as NCCL's algorithms give: what the
// core's fixed-order sums must not depend on). `blocks` is scratch.
static void sum_blocks(ncclDataType_t t, ncclRedOp_t op, char *blocks, int p, size_t bytes, size_t count, void *out) {
    const char *order = getenv("DSMOE_NCCLSIM_SUM_ORDER");
    if (order && !strcmp(order, "reverse")) {
        char *acc = blocks + (size_t)(p - 1) * bytes;
        for (int q = p - 2; q >= 0; q--) reduce_into(t, op, acc, blocks + (size_t)q * bytes, count);
        memcpy(out, acc, bytes);
        return;
    }
    for (int q = 1; q < p; q++) reduce_into(t, op, blocks, blocks + (size_t)q * bytes, count);
    memcpy(out, blocks, bytes);
}

static ncclResult_t all_reduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                               ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    ncclResult_t r = usable(comm);
    size_t es = esize(datatype), bytes = count * es;
    if (r != ncclSuccess) return r;
    if (!es || bytes > 0x7fffffff || reduce_into(datatype, op, NULL, NULL, 0) != 0) return ncclInvalidArgument;
    char *all = malloc((size_t)comm->size * bytes + 1);
    MPI_Request req;
    MPI_Iallgather(sendbuff, (int)bytes, MPI_BYTE, all, (int)bytes, MPI_BYTE, comm->mpi, &req);
    r = wait_reqs(comm, &req, 1, "ncclAllReduce");
    if (r == ncclSuccess) {
        sum_blocks(datatype, op, all, comm->size, bytes, count, recvbuff);
    }
    free(all);
    return r;
}

static ncclResult_t reduce_scatter(const void *sendbuff, void *recvbuff, size_t recvcount,
                                   ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    ncclResult_t r = usable(comm);
    size_t es = esize(datatype), bytes = recvcount * es;
    if (r != ncclSuccess) return r;
    if (!es || bytes > 0x7fffffff || reduce_into(datatype, op, NULL, NULL, 0) != 0) return ncclInvalidArgument;
    char *blocks = malloc((size_t)comm->size * bytes + 1); // block `rank` of every rank, by rank
    MPI_Request req;
    MPI_Ialltoall(sendbuff, (int)bytes, MPI_BYTE, blocks, (int)bytes, MPI_BYTE, comm->mpi, &req);
    r = wait_reqs(comm, &req, 1, "ncclReduceScatter");
    if (r == ncclSuccess) {
        sum_blocks(datatype, op, blocks, comm->size, bytes, recvcount, recvbuff);
    }
    free(blocks);
    return r;
}

static ncclResult_t all_gather(const void *sendbuff, void *recvbuff, size_t sendcount, ncclDataType_t datatype,
                               ncclComm_t comm, cudaStream_t stream) {
    ncclResult_t r = usable(comm);
    size_t bytes = sendcount * esize(datatype);
    if (r != ncclSuccess) return r;
    if (!esize(datatype) || bytes > 0x7fffffff) return ncclInvalidArgument;
    char *all = malloc((size_t)comm->size * bytes + 1);
    MPI_Request req;
    MPI_Iallgather(sendbuff, (int)bytes, MPI_BYTE, all, (int)bytes, MPI_BYTE, comm->mpi, &req);
    r = wait_reqs(comm, &req, 1, "ncclAllGather");
    if (r == ncclSuccess) memcpy(recvbuff, all, (size_t)comm->size * bytes);
    free(all);
    return r;
}

static ncclResult_t broadcast(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                              int root, ncclComm_t comm, cudaStream_t stream) {
    ncclResult_t r = usable(comm);
    size_t bytes = count * esize(datatype);
    if (r != ncclSuccess) return r;
    if (!esize(datatype) || bytes > 0x7fffffff || root < 0 || root >= comm->size) return ncclInvalidArgument;
    if (comm->rank == root && sendbuff != recvbuff) memmove(recvbuff, sendbuff, bytes);
    MPI_Request req;
    MPI_Ibcast(recvbuff, (int)bytes, MPI_BYTE, root, comm->mpi, &req);
    return wait_reqs(comm, &req, 1, "ncclBroadcast");
}

EXPORT ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                                  ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    enter(comm, "ncclAllReduce");
    return leave(comm, all_reduce(sendbuff, recvbuff, count, datatype, op, comm, stream));
}

EXPORT ncclResult_t ncclReduceScatter(const void *sendbuff, void *recvbuff, size_t recvcount,
                                      ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    enter(comm, "ncclReduceScatter");
    return leave(comm, reduce_scatter(sendbuff, recvbuff, recvcount, datatype, op, comm, stream));
}

EXPORT ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount, ncclDataType_t datatype,
                                  ncclComm_t comm, cudaStream_t stream) {
    enter(comm, "ncclAllGather");
    return leave(comm, all_gather(sendbuff, recvbuff, sendcount, datatype, comm, stream));
}

EXPORT ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                                  int root, ncclComm_t comm, cudaStream_t stream) {
    enter(comm, "ncclBroadcast");
    return leave(comm, broadcast(sendbuff, recvbuff, count, datatype, root, comm, stream));
}

// Point to point: recorded between ncclGroupStart and ncclGroupEnd, all posted and waited for at the end.
typedef struct p2p {
    int send;
    void *buf;
    size_t bytes;
    int peer;
    ncclComm_t comm;
} p2p;
static p2p *pending;
static int n_pending, cap_pending, group_depth;

// NCCL matches a group's sends and receives by order and needs each receive's count to equal its send's
// (anything else hangs or corrupts later calls); MPI takes a shorter message into a receive, so the
// received sizes are checked here.
static ncclResult_t flush_p2p(void) {
    ncclResult_t r = ncclSuccess;
    MPI_Request *reqs = malloc((size_t)(n_pending + 1) * sizeof *reqs);
    MPI_Status *statuses = malloc((size_t)(n_pending + 1) * sizeof *statuses);
    for (int k = 0; k < n_pending; k++) { // receives first: a send to self then finds its receive
        p2p *o = &pending[k];
        if (!o->send) MPI_Irecv(o->buf, (int)o->bytes, MPI_BYTE, o->peer, 7, o->comm->mpi, &reqs[k]);
    }
    for (int k = 0; k < n_pending; k++) {
        p2p *o = &pending[k];
        if (o->send) MPI_Isend(o->buf, (int)o->bytes, MPI_BYTE, o->peer, 7, o->comm->mpi, &reqs[k]);
    }
    if (n_pending) r = wait_reqs_status(pending[0].comm, reqs, n_pending, statuses, "ncclSend/ncclRecv group");
    for (int k = 0; k < n_pending && r == ncclSuccess; k++) {
        p2p *o = &pending[k];
        int got = 0;
        if (!o->send && MPI_Get_count(&statuses[k], MPI_BYTE, &got) == MPI_SUCCESS && (size_t)got != o->bytes)
            misuse("ncclRecv of %zu bytes from rank %d met a ncclSend of %d bytes: NCCL needs equal counts", o->bytes,
                   o->peer, got);
    }
    free(statuses);
    free(reqs);
    n_pending = 0;
    return r;
}

// The pending list lives as long as the library: freed when it is unloaded (the sanitized build's leak
// check sees a dlclose'd library's memory as lost otherwise).
__attribute__((destructor)) static void free_pending(void) {
    free(pending);
    pending = NULL;
    n_pending = cap_pending = 0;
}

static ncclResult_t record_p2p(int send, const void *buf, size_t count, ncclDataType_t t, int peer, ncclComm_t comm) {
    ncclResult_t r = usable(comm);
    size_t bytes = count * esize(t);
    if (r != ncclSuccess) return r;
    if (!esize(t) || bytes > 0x7fffffff || peer < 0 || peer >= comm->size) return ncclInvalidArgument;
    if (n_pending && pending[0].comm != comm) return ncclInvalidUsage; // one communicator per group here
    if (n_pending == cap_pending) {
        cap_pending = cap_pending ? 2 * cap_pending : 16;
        pending = realloc(pending, (size_t)cap_pending * sizeof *pending);
    }
    pending[n_pending++] = (p2p){send, (void *)buf, bytes, peer, comm};
    return ncclSuccess;
}

// Inside a group the call only records (and returns ncclSuccess, as NCCL does); outside, it runs.
static ncclResult_t add_p2p(int send, const void *buf, size_t count, ncclDataType_t t, int peer, ncclComm_t comm,
                            const char *what) {
    enter(comm, what);
    ncclResult_t r = record_p2p(send, buf, count, t, peer, comm);
    if (group_depth && comm) {
        atomic_fetch_sub(&comm->in_call, 1);
        return r;
    }
    return leave(comm, r == ncclSuccess ? flush_p2p() : r);
}

EXPORT ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer,
                             ncclComm_t comm, cudaStream_t stream) {
    return add_p2p(1, sendbuff, count, datatype, peer, comm, "ncclSend");
}

EXPORT ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                             cudaStream_t stream) {
    return add_p2p(0, recvbuff, count, datatype, peer, comm, "ncclRecv");
}

EXPORT ncclResult_t ncclGroupStart(void) {
    group_depth++;
    return ncclSuccess;
}

// The group's communicator (one here) reads ncclInProgress afterwards when it is non-blocking.
EXPORT ncclResult_t ncclGroupEnd(void) {
    if (group_depth == 0) return ncclInvalidUsage;
    if (--group_depth > 0 || n_pending == 0) return ncclSuccess;
    ncclComm_t comm = pending[0].comm;
    enter(comm, "ncclGroupEnd");
    return leave(comm, flush_p2p());
}

// ------------------------------------------------------------------------------------------------
// the CUDA runtime: nothing is ever pending

// DSMOE_NCCLSIM_FAIL_EVENT_CREATE=<world rank>: event creation fails there (a local failure in the
// middle of a group's set-up, while the other members go on).
EXPORT cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags) {
    if (!event) return cudaErrorInvalidValue;
    const char *fail_rank = getenv("DSMOE_NCCLSIM_FAIL_EVENT_CREATE");
    int me = -1;
    if (fail_rank) MPI_Comm_rank(MPI_COMM_WORLD, &me);
    if (fail_rank && atoi(fail_rank) == me) return cudaErrorMemoryAllocation;
    *event = malloc(1);
    return *event ? cudaSuccess : cudaErrorInvalidValue;
}
EXPORT cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) { return event ? cudaSuccess : cudaErrorInvalidValue; }
EXPORT cudaError_t cudaEventQuery(cudaEvent_t event) { return event ? cudaSuccess : cudaErrorInvalidValue; }
EXPORT cudaError_t cudaEventDestroy(cudaEvent_t event) {
    free(event);
    return cudaSuccess;
}
EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t stream) { return cudaSuccess; }
EXPORT const char *cudaGetErrorString(cudaError_t error) {
    return error == cudaSuccess                 ? "no error"
           : error == cudaErrorNotReady         ? "device not ready"
           : error == cudaErrorMemoryAllocation ? "out of memory"
                                                : "invalid argument";
}
