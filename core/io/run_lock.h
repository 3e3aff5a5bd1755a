// core/io/run_lock.h: one training run per directory. Two runs that share run.output_dir or the checkpoint
// directory (the same job submitted twice, a requeued job whose first instance still runs on a node that
// lost contact) would write checkpoints and metrics among each other's, and each would prune the other's
// checkpoints. A training run holds a lock on a file `.dsmoe.lock` in each of those directories from before
// its first step to its end; a second run that finds one held is refused, told which process holds it.
// defines: dsmoe_run_lock, dsmoe_run_lock_take, dsmoe_run_lock_release, dsmoe_run_lock_probe
//
// The lock is an open-file-description lock (fcntl F_OFD_SETLK; a POSIX record lock where the system has
// none): the kernel (or the file server) drops it when the holding process ends, however it ends, so a
// killed run leaves no stale lock to clear by hand. The file itself stays, holding the last holder's
// description (pid, host, batch job, start time), which is only read to name a live holder. A file system
// that takes no locks (a Lustre mount without -o flock, some NFS set-ups) gets a warning and no lock.
// Locks are local to a file server's view: on a file system mounted with node-local locks (Lustre
// localflock) a run on another node is not seen.
#ifndef DSMOE_RUN_LOCK_H
#define DSMOE_RUN_LOCK_H
#include "config.h"

typedef struct dsmoe_run_lock dsmoe_run_lock;

// Creates each directory (as the run would) and locks <dir>/.dsmoe.lock in it: `dirs` are n paths, `keys`
// the settings that name them ("run.output_dir", ...), for messages; a path that appears twice is locked
// once. DSMOE_ERR_INVALID when another process holds a lock, naming the key, the directory and the
// holder's description; DSMOE_ERR_IO when a directory or the file cannot be made. A warning on stderr,
// and DSMOE_OK, where the file system refuses locks. On success *lock owns the locks (release it at the
// end; a process that ends without releasing loses them all the same). Call on one rank.
dsmoe_status dsmoe_run_lock_take(const char *const *dirs, const char *const *keys, int n, dsmoe_run_lock **lock,
                                 dsmoe_err *err);

// Drops the locks (NULL is a no-op). The files stay.
void dsmoe_run_lock_release(dsmoe_run_lock *lock);

// For dsmoe --check, which creates nothing: is one of the n directories' lock held by a live run now?
// Returns 1 and writes "<key> = <dir> is in use by another training run (<holder>; the lock of <file>)"
// into msg (len bytes) for the first that is; 0 when none is (a missing directory or lock file, or a
// file system without locks, holds none).
int dsmoe_run_lock_probe(const char *const *dirs, const char *const *keys, int n, char *msg, size_t len);

#endif
