// tests/plugins/comm/comm_conformance_suite.h: what the two files of the comm conformance suite share
// (test_comm_mpi.c: the table, data movement, groups, errors and main; comm_mpi_reductions.c: the
// reductions and the queue contract): the plugin under test, its variants and queue, and the checks
// combined over ranks. Private to that program.
#ifndef DSMOE_COMM_CONFORMANCE_SUITE_H
#define DSMOE_COMM_CONFORMANCE_SUITE_H
#include <stdio.h>
#include <string.h>

#include "comm_conformance.h" // conf_load_comm, conf_boot, conf_queue

extern const dsmoe_comm_plugin_v2 *P;
extern const char *plugin_name;
extern int mpi_family;      // "mpi" or "mpistream": their rank-order sums and messages are checked
extern int stream_ordered, deterministic;
extern int max_count_param; // index of the plugin's "max_count" setting, -1 if none
extern int rank, size;
extern FILE *rank_err;      // this rank's real stderr
extern conf_queue Q;        // the kernel queue every collective is given
extern dsmoe_comm_stream S; // {NULL, conf_queue_enqueue, &Q}
extern conf_boot world_boot;

typedef struct variant {
    const char *label;
    dsmoe_comm_ctx *ctx;
    dsmoe_comm_group *world;
} variant;
extern variant V[2]; // [0] settings at their defaults (param_values NULL), [1] max_count = 5
extern int n_variants;

// ok on this rank; fails the test on every rank when any rank's ok is 0 (what: this rank's words).
void all_ok_(int ok, const char *what, const char *file, int line);
#define ALL_OK(ok, ...)                                                                            \
    do {                                                                                           \
        char what_[1024];                                                                          \
        snprintf(what_, sizeof what_, __VA_ARGS__);                                                \
        all_ok_((ok), what_, __FILE__, __LINE__);                                                  \
    } while (0)
#define ALL_STATUS(v, s, op) ALL_OK((s) == DSMOE_OK, "%s (%s): %s", op, (v)->label, P->last_error((v)->ctx))

// Right after a collective on buf (bytes) whose content was `before`: a stream-ordered plugin has only
// enqueued it (buf untouched, the queue not empty); a host-progressed one has done it, queue untouched.
#define EXPECT_PENDING(buf, before, bytes, what)                                                   \
    ALL_OK(stream_ordered ? Q.n > 0 && memcmp((buf), (before), (bytes)) == 0 : Q.n == 0, "%s: %s", what, \
           !stream_ordered ? "a host-progressed plugin enqueued work"                              \
           : Q.n == 0      ? "a stream-ordered plugin enqueued nothing"                            \
                           : "the buffer changed before the queue ran")

// The test's "synchronize": runs the queue, then asks for a sticky error with a zero-count allreduce
// on g. Local (callers combine it over ranks).
dsmoe_status queue_flush(variant *v, dsmoe_comm_group *g);
#define FLUSH(v, g) ALL_STATUS(v, queue_flush(v, g), "running the queued collectives")

// buf (bytes) equal on every rank (rank 0's, sent with MPI on the world).
int same_on_all_ranks(const void *buf, size_t bytes);

// comm_mpi_reductions.c
void test_allreduce_float_sum(void **state);
void test_allreduce_exact_ops(void **state);
void test_16bit_floats(void **state);
void test_reduce_scatter(void **state);
void test_allreduce_start(void **state);
void test_stream_contract(void **state);
#endif
