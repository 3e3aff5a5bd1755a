// core/drivers/plan.h: `dsmoe --plan deck`: what a job would look like, without running it.
// defines: dsmoe_plan_run
//
// Given a deck, a node (plan.topology: an hwloc XML file, a synthetic description, or this machine) and a
// size (plan.nodes x plan.ranks_per_node), prints the groups, the placement of ranks and experts, the
// memory of each rank (parameters, gradients, optimizer state, activations, MoE buffers: the same numbers
// a run allocates, core/drivers/memplan.h) against what a rank has, and the all-to-all messages and bytes per
// step for the flat and the hierarchical exchange. No MPI and no plugin: it plans for machines that are
// not here, in milliseconds.
#ifndef DSMOE_PLAN_H
#define DSMOE_PLAN_H
#include <stdio.h>
#include "util.h"

// Returns DSMOE_OK when the plan fits, DSMOE_ERR_NOMEM (with err saying by how much, and what to change)
// when a rank needs more memory than it has, another status for a bad deck or topology.
dsmoe_status dsmoe_plan_run(const char *deck_path, char *const *overrides, int n_overrides, FILE *out,
                            dsmoe_err *err);

#endif
