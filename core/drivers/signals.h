// core/drivers/signals.h: walltime signals (run.signals, docs/parallel.md "Walltime signals and exit codes").
// defines: dsmoe_signals_parse, dsmoe_signals_install, dsmoe_signals_agree, dsmoe_signals_pending,
//          dsmoe_signals_stop_written, dsmoe_signal_name
//
// The handler only records the signal; at the next step boundary the ranks agree (one host all-reduce)
// whether any got one, write a checkpoint of that step, and dsmoe exits with DSMOE_EXIT_SIGNAL_CHECKPOINT
// (train.h), for a job script to requeue with checkpoint.resume=auto. Generation stops the same way,
// writing the completions it has finished (generate.h). A second signal to a rank ends it at
// once, from the handler, with DSMOE_EXIT_SIGNAL_TWICE (no checkpoint of the current step; earlier ones
// are kept), unless that checkpoint is already written: the rank is then only exiting, and ignores it.
#ifndef DSMOE_SIGNALS_H
#define DSMOE_SIGNALS_H
#include "config.h"
#include "control.h"

// Reads run.signals: names from HUP INT QUIT USR1 USR2 TERM XCPU, any case, with or without SIG,
// separated by commas or blanks; "" or "none" = no signal. Local.
dsmoe_status dsmoe_signals_parse(const char *list, int *signos, int max, int *n, dsmoe_err *err);
// Installs the handler for cfg->signals (process-wide; call once, before training). Local.
dsmoe_status dsmoe_signals_install(const dsmoe_config *cfg, dsmoe_err *err);
// At a step boundary, collective over world: did any rank get a signal? *ranks: how many did; *signo:
// this rank's signal, else the one the others got (the lowest-numbered, should they differ).
dsmoe_status dsmoe_signals_agree(dsmoe_ctl_group *world, int *signo, int *ranks, dsmoe_err *err);
// This rank's signal so far (0: none, or no handler installed), for a loop that agrees on it in a
// collective of its own (generation's step agreement). Local.
int dsmoe_signals_pending(void);
// The stop checkpoint is written: from now on a further signal is ignored (the rank is only exiting).
void dsmoe_signals_stop_written(void);
// "TERM" for SIGTERM ("?" when not one of run.signals' names).
const char *dsmoe_signal_name(int signo);
#endif
