// core/parallel/control.h: the control plane: every MPI call of the core's compute path lives behind this header.
// defines: dsmoe_ctl_group, dsmoe_ctl_world, dsmoe_ctl_split, dsmoe_ctl_free, dsmoe_ctl_rank, dsmoe_ctl_size,
//          dsmoe_ctl_bootstrap, dsmoe_ctl_allgather, dsmoe_ctl_allreduce_f64, dsmoe_ctl_allreduce_i64,
//          dsmoe_ctl_gather_spaced, dsmoe_ctl_root_status, dsmoe_ctl_node_of_world
//
// The rule (docs/architecture.md): MPI is for set-up (group splits, node discovery, bootstraps for the
// comm plugin) and host-side statistics (a few numbers in host memory). Tensors move only through the
// comm plugin. The model, the MoE layer and the exchange name neither MPI nor MPI_Comm: they hold
// dsmoe_ctl_group handles and the comm plugin's groups. (The checkpoint's host staging gather is here too:
// it moves host copies, one tensor at a time, to the rank that writes the file.)
//
// Every function is collective over the group it names unless marked local. A failing MPI call is
// DSMOE_ERR_SYSTEM with MPI's message.
#ifndef DSMOE_CONTROL_H
#define DSMOE_CONTROL_H
#include <stddef.h>
#include <stdint.h>
#include "dsmoe/comm_plugin.h" // dsmoe_bootstrap
#include "util.h"

typedef struct dsmoe_ctl_group dsmoe_ctl_group; // an MPI communicator and its members' world ranks

// The world (a dup of MPI_COMM_WORLD). MPI must be initialised.
dsmoe_status dsmoe_ctl_world(dsmoe_ctl_group **out, dsmoe_err *err);
// Collective over parent: the ranks with the same color, ordered by key (MPI_Comm_split).
dsmoe_status dsmoe_ctl_split(const dsmoe_ctl_group *parent, int color, int key, dsmoe_ctl_group **out, dsmoe_err *err);
// NULL is a no-op.
void dsmoe_ctl_free(dsmoe_ctl_group *g);
int dsmoe_ctl_rank(const dsmoe_ctl_group *g); // local
int dsmoe_ctl_size(const dsmoe_ctl_group *g); // local
// Local: fills a bootstrap over g for the comm plugin (valid while g lives).
void dsmoe_ctl_bootstrap(dsmoe_ctl_group *g, dsmoe_bootstrap *bs);

// recv (size * bytes) = concatenation of every member's send (bytes).
dsmoe_status dsmoe_ctl_allgather(const dsmoe_ctl_group *g, const void *send, void *recv, size_t bytes, dsmoe_err *err);
// buf (bytes) = rank 0's buf on every member.
dsmoe_status dsmoe_ctl_bcast(const dsmoe_ctl_group *g, void *buf, size_t bytes, dsmoe_err *err);
// v (n) = elementwise sum over the members (host statistics; MPI's order of addition).
dsmoe_status dsmoe_ctl_allreduce_f64(const dsmoe_ctl_group *g, double *v, int n, dsmoe_err *err);
dsmoe_status dsmoe_ctl_allreduce_i64(const dsmoe_ctl_group *g, int64_t *v, int n, dsmoe_err *err);
// Rank 0 of g receives dst (size, n) = every member's shard (n floats, host), member r at dst + r * n;
// dst is read only on rank 0 (NULL elsewhere). Pieces of at most 2^30 elements placed by a resized
// datatype, so n may pass 2^31.
dsmoe_status dsmoe_ctl_gather_spaced(const dsmoe_ctl_group *g, const float *shard, size_t n, float *dst,
                                     dsmoe_err *err);

// Rank 0 of g receives every member's bytes (n, different per member) concatenated in rank order into a
// malloc'ed *all (its length in *total; NULL and 0 on other ranks; the caller frees), and each member's
// length in counts (size) when counts is not NULL (rank 0 only). For results of host-side work (text).
dsmoe_status dsmoe_ctl_gather_bytes(const dsmoe_ctl_group *g, const void *send, size_t n, char **all, size_t *total,
                                    size_t *counts, dsmoe_err *err);

// Ends every rank of the job now with `code` (MPI_Abort on the world); from any thread. Does not return.
void dsmoe_ctl_abort(int code) __attribute__((noreturn));

// Every member learns the outcome of a step that rank 0 leads (it writes a file): rank 0's status and
// err message when rank 0 failed; else DSMOE_ERR_IO with `others` when another member failed; else s.
dsmoe_status dsmoe_ctl_root_status(const dsmoe_ctl_group *g, dsmoe_status s, const char *others, dsmoe_err *err);
// The same for checks every rank makes and rank 0 makes more of: a failure comes back marked collective
// (every rank holds the message, rank 0's when it failed: it prints once and the ranks end cleanly). A
// member that failed where rank 0 did not prints its own message first ("dsmoe: error on rank R of W").
dsmoe_status dsmoe_ctl_checks_agree(const dsmoe_ctl_group *g, dsmoe_status s, dsmoe_err *err);

// Collective over the world, once per process: this rank's node, nodes numbered in order of their first
// world rank (the ranks that share memory: MPI_Comm_split_type SHARED).
dsmoe_status dsmoe_ctl_node_of_world(int *node, dsmoe_err *err);

#endif
