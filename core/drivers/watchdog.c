// core/drivers/watchdog.c: see watchdog.h. The beat is two atomics (time and phase) that the checking
// thread reads; nothing here blocks the drivers.
#include "watchdog.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "control.h" // dsmoe_ctl_abort

static struct {
    pthread_t thread;
    int running;
    double limit;
    int rank;
    _Atomic double last;           // dsmoe_now_seconds() of the last beat
    _Atomic(const char *) what;    // the phase entered then
    _Atomic long step;
    atomic_int stop;
} wd;

static void *watch(void *arg) {
    (void)arg;
    while (!atomic_load(&wd.stop)) {
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
        double idle = dsmoe_now_seconds() - atomic_load(&wd.last);
        if (idle < wd.limit || atomic_load(&wd.stop)) continue;
        const char *what = atomic_load(&wd.what);
        long step = atomic_load(&wd.step);
        char at[64] = "";
        if (step >= 0) snprintf(at, sizeof at, " of step %ld", step);
        fprintf(stderr, "dsmoe: error: watchdog: rank %d made no progress for %.0f s in \"%s\"%s (run.watchdog = %g): "
                "a rank it waits for is stopped, hung or gone; ending the job with exit code %d\n", wd.rank, idle,
                what ? what : "start-up", at, wd.limit, DSMOE_EXIT_WATCHDOG);
        fflush(stderr);
        dsmoe_ctl_abort(DSMOE_EXIT_WATCHDOG);
    }
    return NULL;
}

dsmoe_status dsmoe_watchdog_start(double seconds, int rank, dsmoe_err *err) {
    if (seconds <= 0 || wd.running) return DSMOE_OK;
    wd.limit = seconds;
    wd.rank = rank;
    atomic_store(&wd.stop, 0);
    dsmoe_watchdog_beat("start-up", -1);
    if (pthread_create(&wd.thread, NULL, watch, NULL) != 0)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "run.watchdog: cannot start its thread");
    wd.running = 1;
    return DSMOE_OK;
}

void dsmoe_watchdog_beat(const char *what, long step) {
    atomic_store(&wd.what, what);
    atomic_store(&wd.step, step);
    atomic_store(&wd.last, dsmoe_now_seconds());
}

void dsmoe_watchdog_stop(void) {
    if (!wd.running) return;
    atomic_store(&wd.stop, 1);
    pthread_join(wd.thread, NULL);
    wd.running = 0;
}
