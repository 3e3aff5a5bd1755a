// core/drivers/preflight.h: what a run checks before its first step (and dsmoe --check), so that nothing
// that can be known at the start fails at the end: directories that must take files, the validation
// split that evaluation will read, room for a checkpoint.
// defines: dsmoe_probe_dir, dsmoe_preflight_train, dsmoe_checkpoint_dir_of, dsmoe_preflight_checks_later_checkpoints,
//          dsmoe_preflight_later_checkpoints, dsmoe_preflight_resumed_data, dsmoe_preflight_resumed_seeds,
//          dsmoe_preflight_resumed_schedule
#ifndef DSMOE_PREFLIGHT_H
#define DSMOE_PREFLIGHT_H
#include "checkpoint.h" // dsmoe_train_position
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

// <checkpoint.dir>, or <run.output_dir>/checkpoints.
void dsmoe_checkpoint_dir_of(const dsmoe_config *c, char *dir, size_t len);

// Whether dsmoe_preflight_later_checkpoints applies: a training run that may write a checkpoint (every so
// many steps, at the end, or on a run.signals signal) and does not resume the newest (auto: the only later
// files it passes over are those that do not verify, and it names them).
int dsmoe_preflight_checks_later_checkpoints(const dsmoe_config *c);

// Rank 0 of such a run, which starts at start_step (0: fresh; else the step of the file checkpoint.resume
// names): its checkpoint directory holds no checkpoint of a later step. Such files belong to another run,
// or to the steps this one goes back over: pruning (by step) would remove this run's checkpoints before
// theirs, and resume = auto would later take theirs. Refused, saying what to do; DSMOE_OK for a run it
// does not apply to. Local.
dsmoe_status dsmoe_preflight_later_checkpoints(const dsmoe_config *c, int start_step, dsmoe_err *err);

// A training run at *pos (fresh, or resumed from a checkpoint) that reads the corpus ds: when warn and the
// checkpoint recorded its training split, a warning on stderr if ds's differs in windows or tokens (the
// corpus changed, or data.valid_fraction did): from here on the samples come in another order than the
// interrupted run's. Then *pos records ds's split, for the checkpoints to come.
void dsmoe_preflight_resumed_data(const dsmoe_dataset *ds, int warn, dsmoe_train_position *pos);

// A training run resumed from path at *pos: run.seed keys every noise stream (and the data order when
// data.seed = 0), and the data order's seed (dsmoe_config_data_seed) the order: another of either
// continues a different run, refused naming both values unless checkpoint.allow_seed_change, when rank 0
// says so. Then *pos records c's seeds, for the checkpoints to come. Not checked: a data seed the file
// does not record (an older dsmoe). Local, the same on every rank.
dsmoe_status dsmoe_preflight_resumed_seeds(const dsmoe_config *c, const char *path, int rank, dsmoe_train_position *pos,
                                           dsmoe_err *err);

// Rank 0 of a training run resumed from path at step: a warning on stderr when its learning rate at that
// step differs from the one the checkpoint's run (its recorded deck) would have used, naming the schedule
// keys that changed (a train.steps raised to go on stretches a decay that ends at train.steps). Nothing
// when the file records no deck, or one this dsmoe does not read.
void dsmoe_preflight_resumed_schedule(const dsmoe_config *c, const char *path, int step);

#endif
