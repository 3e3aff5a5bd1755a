// core/drivers/watchdog.h: run.watchdog: a rank that makes no progress for that long (a peer stopped,
// hung or lost, so a collective never completes) ends the job with a message naming what it was doing,
// instead of waiting (and spinning) until the walltime.
// defines: dsmoe_watchdog_start, dsmoe_watchdog_beat, dsmoe_watchdog_stop, DSMOE_EXIT_WATCHDOG
//
// The drivers call dsmoe_watchdog_beat at every point of progress (each training step and micro-step,
// evaluation batch, checkpoint, generation step), naming the phase they enter. A thread of this rank
// checks every second; when the last beat is older than the limit it prints
//   dsmoe: error: watchdog: rank 3 made no progress for 600 s in "forward (micro-step 2)" of step 1234 ...
// and ends the whole job (the control plane's abort), exit code DSMOE_EXIT_WATCHDOG. A stopped rank
// cannot report: the others do, as their collectives wait on it.
#ifndef DSMOE_WATCHDOG_H
#define DSMOE_WATCHDOG_H
#include "util.h"

#define DSMOE_EXIT_WATCHDOG 70 // EX_SOFTWARE

// Starts the thread (seconds <= 0: nothing). rank: for the message. Local.
dsmoe_status dsmoe_watchdog_start(double seconds, int rank, dsmoe_err *err);
// Progress: `what` (a static or long-lived string) at step `step` (-1: none). Cheap; any thread.
void dsmoe_watchdog_beat(const char *what, long step);
void dsmoe_watchdog_stop(void);

#endif
