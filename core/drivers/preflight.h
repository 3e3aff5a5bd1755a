// core/drivers/preflight.h: what a run checks before its first step (and dsmoe --check), so that nothing
// that can be known at the start fails at the end: directories that must take files, the validation
// split that evaluation will read, room for a checkpoint.
// defines: dsmoe_probe_dir, dsmoe_preflight_train
#ifndef DSMOE_PREFLIGHT_H
#define DSMOE_PREFLIGHT_H
#include "config.h"
#include "data.h"

// dir takes a new file: one is created and removed in it, or, when dir does not exist yet, in its nearest
// existing ancestor (nothing else is created). `key` names the setting in the message
// ("checkpoint.dir = /x: cannot create a file in /x: Read-only file system"). Local.
dsmoe_status dsmoe_probe_dir(const char *dir, const char *key, dsmoe_err *err);

// A train or eval run of c on dataset ds: the validation split when evaluation will read it; on rank 0,
// run.output_dir and the checkpoint directory (when checkpoints will be written) take files, the metrics
// file's directory exists, and a warning (stderr) when the checkpoint directory's file system has less
// room than one checkpoint of checkpoint_bytes. Local: the caller agrees on the outcome.
dsmoe_status dsmoe_preflight_train(const dsmoe_config *c, const dsmoe_dataset *ds, int rank, uint64_t checkpoint_bytes,
                                   dsmoe_err *err);

#endif
