// core/drivers/signals.c: see signals.h. The handler is async-signal-safe: it sets a flag, or on the
// second signal writes a line and _exits.
#include "signals.h"

#include <ctype.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "train.h" // the exit codes


static const struct {
    const char *name;
    int signo;
} signal_names[] = {{"HUP", SIGHUP}, {"INT", SIGINT}, {"QUIT", SIGQUIT}, {"USR1", SIGUSR1},
                    {"USR2", SIGUSR2}, {"TERM", SIGTERM}, {"XCPU", SIGXCPU}};
#define N_SIGNAL_NAMES (int)(sizeof signal_names / sizeof signal_names[0])

static volatile sig_atomic_t stop_signal; // the first signal received; 0 = none
// Set once the checkpoint of a signal's stop is written: the rank is only exiting (with 75) from then on,
// and a further signal is ignored. srun --kill-on-bad-exit sends SIGTERM to the ranks still running when
// the first one exits with 75; that must not turn their 75 into 76.
static volatile sig_atomic_t stop_checkpoint_written;
void dsmoe_signals_stop_written(void) { stop_checkpoint_written = 1; }
static int signals_installed;             // the same on every rank: the deck decides

const char *dsmoe_signal_name(int signo) {
    for (int i = 0; i < N_SIGNAL_NAMES; i++)
        if (signal_names[i].signo == signo) return signal_names[i].name;
    return "?";
}

// Async-signal-safe: a flag, or write(2) and _exit(2) on the second signal. The count is an atomic
// addition: the process's threads (MPI's, OpenMP's) take signals too, and two signals arriving together
// (pending while the process was stopped) can run the handler in two threads at once; a test of the flag
// followed by a store would let both through as "the first".
static int signals_seen; // signals received so far (atomic)
static void on_stop_signal(int signo) {
    if (stop_checkpoint_written) return;
    if (__atomic_fetch_add(&signals_seen, 1, __ATOMIC_SEQ_CST) > 0) {
        static const char msg[] = "dsmoe: second signal: exiting at once (76), without a checkpoint of this step\n";
        ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void)w;
        _exit(DSMOE_EXIT_SIGNAL_TWICE);
    }
    stop_signal = signo;
}

dsmoe_status dsmoe_signals_parse(const char *list, int *signos, int max, int *n, dsmoe_err *err) {
    *n = 0;
    const char *p = list;
    while (*p) {
        while (*p == ',' || isspace((unsigned char)*p)) p++;
        if (!*p) break;
        size_t len = strcspn(p, ", \t\n");
        char word[32];
        snprintf(word, sizeof word, "%.*s", (int)(len < sizeof word - 1 ? len : sizeof word - 1), p);
        p += len;
        if (strcasecmp(word, "none") == 0) continue;
        const char *bare = strncasecmp(word, "SIG", 3) == 0 ? word + 3 : word;
        int signo = 0;
        for (int i = 0; i < N_SIGNAL_NAMES; i++)
            if (strcasecmp(bare, signal_names[i].name) == 0) signo = signal_names[i].signo;
        if (!signo || len >= sizeof word)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "run.signals = %s: '%s' is not one of HUP INT QUIT USR1 USR2 TERM XCPU", list, word);
        int seen = 0;
        for (int i = 0; i < *n; i++) seen |= signos[i] == signo;
        if (!seen && *n < max) signos[(*n)++] = signo;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_signals_install(const dsmoe_config *cfg, dsmoe_err *err) {
    int signos[N_SIGNAL_NAMES], n;
    DSMOE_TRY(dsmoe_signals_parse(cfg->signals, signos, N_SIGNAL_NAMES, &n, err));
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART; // MPI and file I/O carry on; the loop looks at the flag between steps
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < n; i++)
        if (sigaction(signos[i], &sa, NULL) != 0)
            return dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "cannot handle SIG%s", dsmoe_signal_name(signos[i]));
    signals_installed = n > 0;
    return DSMOE_OK;
}

int dsmoe_signals_pending(void) { return signals_installed ? (int)stop_signal : 0; }

dsmoe_status dsmoe_signals_agree(dsmoe_ctl_group *world, int *signo, int *ranks, dsmoe_err *err) {
    *signo = *ranks = 0;
    if (!signals_installed) return DSMOE_OK;
    int mine = stop_signal;
    int64_t v[1 + N_SIGNAL_NAMES] = {mine != 0};
    for (int i = 0; i < N_SIGNAL_NAMES; i++) v[1 + i] = signal_names[i].signo == mine;
    DSMOE_TRY(dsmoe_ctl_allreduce_i64(world, v, 1 + N_SIGNAL_NAMES, err));
    *ranks = (int)v[0];
    *signo = mine;
    for (int i = 0; i < N_SIGNAL_NAMES && !*signo; i++)
        if (v[1 + i]) *signo = signal_names[i].signo;
    return DSMOE_OK;
}
