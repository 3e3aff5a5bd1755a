// core/drivers/plan.h: `dsmoe --plan deck`: what a job would look like, without running it.
// defines: dsmoe_plan_run, dsmoe_plan_generate, dsmoe_plan_bytes
//
// Given a deck, a node (plan.topology: an hwloc XML file, a synthetic description, or this machine) and a
// size (plan.nodes x plan.ranks_per_node), prints the groups, the placement of ranks and experts, the
// memory of each rank (parameters, gradients, optimizer state, activations, MoE buffers: the same numbers
// a run allocates, core/drivers/memplan.h) against what a rank has, and the all-to-all messages and bytes per
// step for the flat and the hierarchical exchange. No MPI and no plugin: it plans for machines that are
// not here, in milliseconds. A run.mode = generate deck gets the generation plan instead of the training
// memory and all-to-all (core/drivers/plan_infer.c).
#ifndef DSMOE_PLAN_H
#define DSMOE_PLAN_H
#include <stdio.h>
#include "config.h"
#include "util.h"

// Returns DSMOE_OK when the plan fits, DSMOE_ERR_NOMEM (with err saying by how much, and what to change)
// when a rank needs more memory than it has, another status for a bad deck or topology.
dsmoe_status dsmoe_plan_run(const char *deck_path, char *const *overrides, int n_overrides, FILE *out,
                            dsmoe_err *err);
// Bytes for people: "512 B", "14.00 KiB", "1.49 GiB". Up to 16 calls may share one printf (a ring of
// buffers: plans are single-threaded).
const char *dsmoe_plan_bytes(double bytes);
// The generation part of a plan of c on `ranks` ranks, rpn per node (use_gpus: GPU ranks), each with
// `budget` bytes (0 = unknown; budget_why says where it comes from): memory with the KV cache, the
// all-to-all of a decode step and an estimated time per token (model in plan_infer.c).
dsmoe_status dsmoe_plan_generate(FILE *out, const dsmoe_config *c, int ranks, int rpn, int use_gpus, uint64_t budget,
                                 const char *budget_why, dsmoe_err *err);

#endif
