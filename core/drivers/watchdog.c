// core/drivers/watchdog.c: see watchdog.h. The beat is two atomics (time and phase) that the checking
// thread reads; nothing here blocks the drivers. The thread waits on a condition variable, not in a
// sleep, so that stopping it at exit is immediate: a sleeping thread would add up to a second to every
// run's end.
#include "watchdog.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "control.h" // dsmoe_ctl_abort

static struct {
    pthread_t thread;
    pthread_mutex_t lock; // guards stop, with wake
    pthread_cond_t wake;  // on CLOCK_MONOTONIC: signalled by dsmoe_watchdog_stop
    int stop;
    int running;
    double limit;
    int rank;
    _Atomic double last;           // dsmoe_now_seconds() of the last beat
    _Atomic(const char *) what;    // the phase entered then
    _Atomic long step;
} wd = {.lock = PTHREAD_MUTEX_INITIALIZER};

// Waits one second, or less when told to stop; returns whether to stop.
static int wait_a_second(void) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += 1;
    pthread_mutex_lock(&wd.lock);
    while (!wd.stop && pthread_cond_timedwait(&wd.wake, &wd.lock, &until) != ETIMEDOUT) {}
    int stop = wd.stop;
    pthread_mutex_unlock(&wd.lock);
    return stop;
}

static void *watch(void *arg) {
    (void)arg;
    while (!wait_a_second()) {
        double idle = dsmoe_now_seconds() - atomic_load(&wd.last);
        if (idle < wd.limit) continue;
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
    wd.stop = 0;
    dsmoe_watchdog_beat("start-up", -1);
    pthread_condattr_t attr;
    int rc = pthread_condattr_init(&attr);
    if (rc == 0) {
        rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        if (rc == 0) rc = pthread_cond_init(&wd.wake, &attr);
        pthread_condattr_destroy(&attr);
    }
    if (rc != 0) return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "run.watchdog: cannot make its condition variable");
    if (pthread_create(&wd.thread, NULL, watch, NULL) != 0) {
        pthread_cond_destroy(&wd.wake);
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "run.watchdog: cannot start its thread");
    }
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
    pthread_mutex_lock(&wd.lock);
    wd.stop = 1;
    pthread_cond_signal(&wd.wake);
    pthread_mutex_unlock(&wd.lock);
    pthread_join(wd.thread, NULL);
    pthread_cond_destroy(&wd.wake);
    wd.running = 0;
}
