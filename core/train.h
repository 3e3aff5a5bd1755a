// core/train.h: the training and evaluation driver.
// defines: dsmoe_train_run, dsmoe_train_result, dsmoe_lr_at
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
    double valid_loss;       // last validation loss (NaN if none was computed)
    double loss_bound;       // synthetic corpus: the achievable minimum; else -1
    double *loss_history;    // (steps) if the caller set it: training loss of each step run here
    char checkpoint[4096];   // the last checkpoint written ("" if none)
} dsmoe_train_result;

// Learning rate for a 0-based step: linear warm-up, then cosine/linear decay to min_lr, or constant.
float dsmoe_lr_at(const dsmoe_config *cfg, int step);

// Runs cfg->mode (train or eval) to completion. config_text is the resolved deck (saved beside outputs
// and in checkpoints). Collective; on failure every rank returns the error.
dsmoe_status dsmoe_train_run(const dsmoe_config *cfg, const char *config_text, dsmoe_runtime *rt,
                             dsmoe_train_result *result, dsmoe_err *err);

#endif
