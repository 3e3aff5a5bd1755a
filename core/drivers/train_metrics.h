// core/drivers/train_metrics.h: a training run's metrics file (metrics.file, default
// <run.output_dir>/metrics.csv), written by rank 0: a header, then one row per logged step (docs/deck.md).
// A failed write is not the end of the run (it is worth more than its log): it is reported once, later
// rows are dropped, and the run ends with DSMOE_EXIT_METRICS_FAILED (the caller agrees on that over the
// ranks).
// defines: dsmoe_metrics_file, dsmoe_metrics_values, dsmoe_metrics_open, dsmoe_metrics_row, dsmoe_metrics_close
#ifndef DSMOE_TRAIN_METRICS_H
#define DSMOE_TRAIN_METRICS_H
#include <stdint.h>
#include <stdio.h>

#include "config.h"

typedef struct dsmoe_metrics_file {
    FILE *f;                  // NULL: not open (another rank, or closed)
    char path[2048];
    int write_errno;          // the first failed write's errno (0 = none); no rows after it
    int failed_step;          // the step whose row failed first (0 = the header)
    int kd_column;            // the file has a kd_loss column: this run distils, or the resumed file has one
                              // from when it did (rows keep the file's columns)
} dsmoe_metrics_file;

// One row.
typedef struct dsmoe_metrics_values {
    int step;
    double loss, aux_loss, lr, grad_norm, tokens_per_s, dropped_frac, elapsed_s;
    double valid_loss;        // NaN: no evaluation at this step (an empty field)
    double kd_loss;           // NaN: no distillation at this step (an empty field)
    const int *capacity;      // (n_moe) each MoE layer's training capacity in the step
    const int64_t *loads;     // (n_moe, max_e) kept tokens per expert over the step, all ranks
    int max_e;
    double routed_per_layer;  // token choices routed per MoE layer over the step
} dsmoe_metrics_values;

// Opens path for the run c: a new run moves a file with rows there to <path>.N (the first N free, said on
// stdout) and writes a new one with its header; a run resumed at `step` first
// drops the rows after that step (and a torn last line) from an earlier run that went on past it, through
// a temporary file and a rename, then appends (with the header if the file had none). The rows keep the
// file's columns: a kd_loss column stays (empty) when the resumed run does not distil, and a run that
// distils over a file without one says that its distillation loss goes to the log only. fill_valid (not
// NaN, resumed only) goes into the empty valid_loss field of row `step` (an evaluation a signal cut short,
// run again by the resume), in the same rewrite.
dsmoe_status dsmoe_metrics_open(dsmoe_metrics_file *m, const dsmoe_config *c, const char *path, int resumed, int step,
                                double fill_valid,
                                dsmoe_err *err);

// Appends a row (nothing once a write failed; the first failure is a warning on stderr).
void dsmoe_metrics_row(dsmoe_metrics_file *m, const dsmoe_config *c, const dsmoe_metrics_values *v);

// Closes the file (a no-op when not open) and returns 1 when some write failed, with a warning naming the
// step; steps_done is the step of a failure at close.
int dsmoe_metrics_close(dsmoe_metrics_file *m, int steps_done);

#endif
