// core/io/run_lock.c: see run_lock.h.
#define _GNU_SOURCE
#include "run_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LOCK_NAME ".dsmoe.lock"
#define MAX_DIRS 4

struct dsmoe_run_lock {
    int fd[MAX_DIRS];
    int n;
};

// 0 when taken; else the errno of the refusal (EAGAIN/EACCES: held elsewhere).
static int lock_file(int fd) {
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
#ifdef F_OFD_SETLK
    if (fcntl(fd, F_OFD_SETLK, &fl) == 0) return 0;
    if (errno != EINVAL) return errno; // EINVAL: a kernel older than OFD locks (3.15)
    fl = (struct flock){.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
#endif
    return fcntl(fd, F_SETLK, &fl) == 0 ? 0 : errno;
}

// "pid 123 on node7, Slurm job 456, since 2026-12-04 00:36:11 UTC": who holds the lock, for a second run.
static void describe_holder(char *buf, size_t len) {
    char host[256] = "?";
    gethostname(host, sizeof host - 1);
    const char *slurm = getenv("SLURM_JOB_ID"), *pbs = getenv("PBS_JOBID");
    char job[160] = "";
    if (slurm) snprintf(job, sizeof job, ", Slurm job %s", slurm);
    else if (pbs) snprintf(job, sizeof job, ", PBS job %s", pbs);
    char when[64] = "?";
    time_t now = time(NULL);
    struct tm tm;
    if (gmtime_r(&now, &tm)) strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &tm);
    snprintf(buf, len, "pid %ld on %s%s, since %s", (long)getpid(), host, job, when);
}

// The holder's description, as it wrote it (its first line), or a note that it wrote none.
static void read_holder(int fd, char *buf, size_t len) {
    ssize_t got = pread(fd, buf, len - 1, 0);
    buf[got > 0 ? got : 0] = '\0';
    buf[strcspn(buf, "\n")] = '\0';
    if (!buf[0]) snprintf(buf, len, "a process that has not written its description yet");
}

dsmoe_status dsmoe_run_lock_take(const char *const *dirs, const char *const *keys, int n, dsmoe_run_lock **lock,
                                 dsmoe_err *err) {
    *lock = NULL;
    dsmoe_run_lock *l = calloc(1, sizeof *l);
    if (!l) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for the run lock");
    dev_t dev[MAX_DIRS];
    ino_t ino[MAX_DIRS];
    dsmoe_status s = DSMOE_OK;
    for (int i = 0; i < n && i < MAX_DIRS && s == DSMOE_OK; i++) {
        struct stat st;
        s = dsmoe_mkdir_p(dirs[i], err);
        if (s != DSMOE_OK) break;
        if (stat(dirs[i], &st) != 0) {
            s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s = %s: %s", keys[i], dirs[i], strerror(errno));
            break;
        }
        int seen = 0; // the same directory under another name: one lock (two would conflict with each other)
        for (int j = 0; j < l->n; j++) seen |= dev[j] == st.st_dev && ino[j] == st.st_ino;
        if (seen) continue;
        char path[4200];
        snprintf(path, sizeof path, "%s/" LOCK_NAME, dirs[i]);
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) {
            s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s = %s: cannot open %s: %s", keys[i], dirs[i], path, strerror(errno));
            break;
        }
        int why = lock_file(fd);
        if (why == EAGAIN || why == EACCES) {
            char holder[512];
            read_holder(fd, holder, sizeof holder);
            close(fd);
            s = dsmoe_err_set(err, DSMOE_ERR_INVALID,
                              "%s = %s is in use by another training run (%s; the lock of %s): two runs in one "
                              "directory would write their checkpoints and metrics among each other's. Wait for "
                              "that run to end, or choose another %s", keys[i], dirs[i], holder, path, keys[i]);
            break;
        }
        if (why != 0) {
            // The file system takes no locks: go on unguarded, and say so.
            fprintf(stderr, "dsmoe: warning: cannot lock %s (%s): nothing keeps a second training run out of %s = %s "
                    "while this one runs\n", path, strerror(why), keys[i], dirs[i]);
            fflush(stderr);
            close(fd);
            continue;
        }
        char me[512];
        describe_holder(me, sizeof me);
        size_t len = strlen(me);
        me[len++] = '\n';
        // Should the description not be written, the lock holds all the same (read_holder says so).
        if (ftruncate(fd, 0) == 0) (void)!pwrite(fd, me, len, 0);
        dev[l->n] = st.st_dev;
        ino[l->n] = st.st_ino;
        l->fd[l->n++] = fd;
    }
    if (s != DSMOE_OK) {
        dsmoe_run_lock_release(l);
        return s;
    }
    *lock = l;
    return DSMOE_OK;
}

// 1 when another process holds a lock on the file fd (open for reading) names.
static int lock_held(int fd) {
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
#ifdef F_OFD_GETLK
    if (fcntl(fd, F_OFD_GETLK, &fl) == 0) return fl.l_type != F_UNLCK;
    if (errno != EINVAL) return 0;
    fl = (struct flock){.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
#endif
    return fcntl(fd, F_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

int dsmoe_run_lock_probe(const char *const *dirs, const char *const *keys, int n, char *msg, size_t len) {
    for (int i = 0; i < n; i++) {
        char path[4200];
        snprintf(path, sizeof path, "%s/" LOCK_NAME, dirs[i]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        int held = lock_held(fd);
        if (held) {
            char holder[512];
            read_holder(fd, holder, sizeof holder);
            snprintf(msg, len, "%s = %s is in use by another training run (%s; the lock of %s)", keys[i], dirs[i],
                     holder, path);
        }
        close(fd);
        if (held) return 1;
    }
    return 0;
}

void dsmoe_run_lock_release(dsmoe_run_lock *lock) {
    if (!lock) return;
    for (int i = 0; i < lock->n; i++) close(lock->fd[i]);
    free(lock);
}
