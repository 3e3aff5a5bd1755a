// core/io/checkpoint.h: model checkpoints as one safetensors file (docs/checkpoint.md).
// defines: dsmoe_checkpoint_save, dsmoe_checkpoint_load, dsmoe_checkpoint_load_mapped, dsmoe_checkpoint_verify,
//          dsmoe_checkpoint_position, dsmoe_checkpoint_deck, dsmoe_checkpoint_find_latest, dsmoe_checkpoint_list, dsmoe_checkpoint_remove_stale
//
// One file per checkpoint, global tensor names whatever the rank layout: parameters under their
// model names, AdamW moments as "optim.exp_avg.<name>" and "optim.exp_avg_sq.<name>", and metadata
// (format, step, next training sample, seed, the resolved deck, the model's shape). Expert shards are
// gathered over the EP group and rank 0 writes; on load every rank maps the file and copies only its
// own shard. Files are written atomically (temporary name, fsync, rename); only checkpoints named
// step_<8 digits>.safetensors in the directory are ever pruned.
#ifndef DSMOE_CHECKPOINT_H
#define DSMOE_CHECKPOINT_H
#include "config.h"
#include "model.h"
#include "optimizer.h"

typedef struct dsmoe_train_position {
    int step;                 // optimizer steps completed
    uint64_t next_sample;     // next training sample index
    uint64_t seed;            // run.seed the run was started with
    // The training split the run reads (dsmoe_dataset_windows, dsmoe_dataset_tokens): windows decide the
    // sample order, so a resume over other counts reads another order. has_data = 0: not recorded (a
    // checkpoint of an older dsmoe).
    uint64_t data_windows, data_tokens;
    int has_data;
    // The seed of the data order (and of the synthetic corpus): data.seed, or run.seed when that is 0.
    // has_data_seed = 0: not recorded (an older dsmoe).
    uint64_t data_seed;
    int has_data_seed;
    // The evaluation after this step was cut short by a walltime signal (train.c): a resume runs it first
    // and fills the step's validation loss into metrics.csv.
    int eval_cut;
} dsmoe_train_position;

// Collective. Writes <dir>/step_<step>.safetensors and prunes to `keep` newest. *path_out (may be NULL)
// receives the file name (on rank 0).
dsmoe_status dsmoe_checkpoint_save(dsmoe_model *model, dsmoe_optimizer *opt, const dsmoe_config *cfg,
                                   const char *config_text,
                                   const dsmoe_train_position *pos, const char *dir, int keep,
                                   char *path_out, size_t path_len, dsmoe_err *err);

// Loads parameters (and, if opt is not NULL, the AdamW moments) and the position from path. Collective
// over the world: every rank maps the file and takes its shard, and the ranks agree on the file's checks
// before any is overwritten (a failure is collective, with rank 0's message when rank 0 found it).
// The whole file is verified, by rank 0, before anything is overwritten (a refused file leaves model, opt and pos
// as they were): refuses a file that is not a dsmoe checkpoint, whose header is malformed, whose
// tensors fail their CRC32C or hold NaN/Inf, whose step/next_sample/seed are not numbers in range
// (step <= INT_MAX), or whose tensors are missing or have other shapes than the deck's model, naming
// the file and the tensor or field. A file without checksums (older dsmoe) loads with a warning (rank 0).
// When path is what dsmoe_checkpoint_find_latest returned last, rank 0 first says which newer files it
// skipped and removes stale temporaries in that directory.
dsmoe_status dsmoe_checkpoint_load(dsmoe_model *model, dsmoe_optimizer *opt, const dsmoe_config *cfg,
                                   const char *path, dsmoe_train_position *pos, dsmoe_err *err);

// Parameters only, from a checkpoint of another model (a distillation teacher's, core/drivers/distill.h):
// block l of the model takes the tensors of the file's block layer_map[l] ("h.<l>." names), every other
// tensor the one of the same name; each must exist with the model's shape (else an error naming both).
// The file is verified whole first, and nothing is copied unless every tensor fits. Local.
dsmoe_status dsmoe_checkpoint_load_mapped(dsmoe_model *model, const char *path, const int *layer_map,
                                          dsmoe_err *err);
// Verifies path as dsmoe_checkpoint_load would (format, metadata, every tensor's checksum and values,
// the deck's model shape) without a model: for --check. Local; fills *pos.
dsmoe_status dsmoe_checkpoint_verify(const dsmoe_config *cfg, const char *path, dsmoe_train_position *pos,
                                     dsmoe_err *err);

// The position recorded in path (format, version and metadata checked; the header alone is read, not the
// tensors): for --check, which does not verify a training run's file whole. Local.
dsmoe_status dsmoe_checkpoint_position(const char *path, dsmoe_train_position *pos, dsmoe_err *err);

// The resolved deck of the run that wrote path (its "deck" metadata, the header alone read) into a
// malloc'ed *text (the caller frees it); NULL when the file has none. Local.
dsmoe_status dsmoe_checkpoint_deck(const char *path, char **text, dsmoe_err *err);

// Newest step_*.safetensors in dir that verifies (as dsmoe_checkpoint_load does, but for the model's
// shape) into path; DSMOE_OK with path[0] = 0 when there is none; DSMOE_ERR_IO, with why the newest
// was refused, when there are some and none verifies. Reads every candidate whole; local, no output.
dsmoe_status dsmoe_checkpoint_find_latest(const char *dir, char *path, size_t len, dsmoe_err *err);

// The steps of the step_<8 digits>.safetensors files in dir, ascending, however many: *steps is malloc'ed
// (the caller frees it; NULL when there are none). A directory that does not exist holds none. Local.
dsmoe_status dsmoe_checkpoint_list(const char *dir, int **steps, int *n, dsmoe_err *err);

// Removes step_<8 digits>.safetensors.tmp.<pid> files in dir whose process is gone (saves that were
// interrupted), printing a line for each. Call on one rank; dsmoe_checkpoint_save does (rank 0).
void dsmoe_checkpoint_remove_stale(const char *dir);

#endif
