// core/drivers/train.h: the training and evaluation driver.
// defines: dsmoe_train_run, dsmoe_train_check, dsmoe_train_result, dsmoe_lr_at,
//          DSMOE_EXIT_SIGNAL_CHECKPOINT, DSMOE_EXIT_SIGNAL_TWICE, DSMOE_EXIT_SAVE_FAILED, DSMOE_EXIT_METRICS_FAILED
//
// One optimizer step = the deck's global batch (train.batch sequences) split over the ranks and
// micro-batches: rank r, micro-step j takes samples step*batch + (j*ranks + r)*micro_batch + [0, micro_batch).
// The loss is the mean cross-entropy over the batch's tokens plus aux_loss_coeff * the mean over
// (rank, micro-batch) of sum over MoE layers of l_aux. Noise keys depend on (seed, step) and the
// token's position in the global batch only, so the same deck gives the same numbers on any rank
// count where the math allows.
#ifndef DSMOE_TRAIN_H
#define DSMOE_TRAIN_H
#include "config.h"
#include "runtime.h"

typedef struct dsmoe_train_result {
    int steps_done;          // optimizer steps completed, counting resumed ones
    double last_loss;        // mean training loss of the last step (without aux)
    double last_aux;         // mean sum of l_aux of the last step
    double last_kd;          // distilling: mean KL(teacher || student) per token of the last step; else NaN
    double valid_loss;       // last validation loss (NaN if none was computed)
    double loss_bound;       // synthetic corpus: the achievable minimum; else -1
    double *loss_history;    // (steps) if the caller set it: training loss of each step run here
    char checkpoint[4096];   // the last checkpoint written ("" if none)
    int stopped_signal;      // 0, or training stopped on a run.signals signal after steps_done, whose
                             // checkpoint is written: this rank's signal, else one another rank got
    int save_failed;         // the run failed because checkpoint saves failed (DSMOE_EXIT_SAVE_FAILED)
    int metrics_failed;      // writing metrics.file failed (every rank knows): DSMOE_EXIT_METRICS_FAILED
} dsmoe_train_result;

// Walltime signals (core/drivers/signals.h): a checkpoint, then this code; a second signal: the next.
#define DSMOE_EXIT_SIGNAL_CHECKPOINT 75 // EX_TEMPFAIL: "try again", as sysexits.h has it
#define DSMOE_EXIT_SIGNAL_TWICE 76
// Output failures (docs/parallel.md). A failed checkpoint save keeps the older ones and training goes on;
// checkpoint.max_failures failed saves in a row, or a failed final save (or a walltime signal's), end the
// run with this code and the reason. A failed metrics.file write is reported once, training goes on
// without rows, and a run that otherwise exits 0 exits with DSMOE_EXIT_METRICS_FAILED.
#define DSMOE_EXIT_SAVE_FAILED 74    // EX_IOERR
#define DSMOE_EXIT_METRICS_FAILED 73 // EX_CANTCREAT: the output file could not be written
// Learning rate for a 0-based step: linear warm-up, then cosine/linear decay to min_lr, or constant.
float dsmoe_lr_at(const dsmoe_config *cfg, int step);

// dsmoe --check of a train or eval deck: the data opens (files of the right kind) and the checks of
// dsmoe_preflight_train hold. Collective.
dsmoe_status dsmoe_train_check(const dsmoe_config *cfg, dsmoe_runtime *rt, dsmoe_err *err);

// Runs cfg->mode (train or eval) to completion. config_text is the resolved deck (saved beside outputs
// and in checkpoints). Collective; on failure every rank returns the error.
dsmoe_status dsmoe_train_run(const dsmoe_config *cfg, const char *config_text, dsmoe_runtime *rt,
                             dsmoe_train_result *result, dsmoe_err *err);

#endif
