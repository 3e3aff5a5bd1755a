// core/drivers/preflight.c: see preflight.h.
#include "preflight.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "checkpoint.h"
#include "train.h" // dsmoe_lr_at

// Nothing is created but the probe file: a directory that does not exist yet is probed in its nearest
// existing ancestor (where the run will create it).
dsmoe_status dsmoe_probe_dir(const char *dir, const char *key, dsmoe_err *err) {
    char at[4096];
    if (!dir[0]) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s is empty", key);
    if (strlen(dir) >= sizeof at) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s = %s: path too long", key, dir);
    snprintf(at, sizeof at, "%s", dir);
    struct stat st;
    for (;;) {
        if (stat(at, &st) == 0) break;
        if (errno != ENOENT)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "%s = %s: cannot reach %s: %s", key, dir, at, strerror(errno));
        char *slash = strrchr(at, '/');
        if (!slash) {
            snprintf(at, sizeof at, ".");
        } else if (slash == at) {
            at[1] = '\0';
        } else {
            *slash = '\0';
        }
    }
    if (!S_ISDIR(st.st_mode))
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s = %s: %s exists and is not a directory", key, dir, at);
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/.dsmoe-probe.%ld", at, (long)getpid());
    FILE *f = fopen(probe, "w");
    if (!f)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s = %s: cannot create a file in %s: %s", key, dir, at, strerror(errno));
    fclose(f);
    remove(probe);
    return DSMOE_OK;
}

static const char *size_text(double bytes, char *buf, size_t n) {
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024.0 && u < 4) bytes /= 1024.0, u++;
    snprintf(buf, n, u ? "%.1f %s" : "%.0f %s", bytes, unit[u]);
    return buf;
}

dsmoe_status dsmoe_preflight_train(const dsmoe_config *c, const dsmoe_dataset *ds, int rank, uint64_t checkpoint_bytes,
                                   dsmoe_err *err) {
    // Evaluation runs at the end of training (and every train.eval_every steps), and is all of eval.
    int evaluates = c->mode == DSMOE_MODE_EVAL || c->steps > 0;
    if (evaluates && c->data_source != DSMOE_DATA_SYNTHETIC && dsmoe_dataset_windows(ds, DSMOE_SPLIT_VALID) == 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "data.valid_fraction = %g holds out no validation sequence of %s, "
                             "and %s evaluates on it (train.eval_batches = %d): set data.valid_fraction above 0",
                             (double)c->valid_fraction, c->data_path, c->mode == DSMOE_MODE_EVAL ? "run.mode = eval"
                             : "training", c->eval_batches);
    if (rank != 0 || c->mode != DSMOE_MODE_TRAIN) return DSMOE_OK;
    DSMOE_TRY(dsmoe_probe_dir(c->output_dir, "run.output_dir", err));
    int checkpoints = c->checkpoint_final || c->checkpoint_every > 0;
    char dir[2048];
    dsmoe_checkpoint_dir_of(c, dir, sizeof dir);
    if (checkpoints) DSMOE_TRY(dsmoe_probe_dir(dir, c->checkpoint_dir[0] ? "checkpoint.dir" : "checkpoint.dir (default)", err));
    // metrics.file is opened (created or appended to) at the start; its directory must be there.
    if (c->metrics_file[0]) {
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", c->metrics_file);
        char *slash = strrchr(parent, '/');
        if (slash == parent) slash[1] = '\0';
        else if (slash) *slash = '\0';
        else snprintf(parent, sizeof parent, ".");
        if (access(parent, W_OK | X_OK) != 0)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot open metrics file %s: %s", c->metrics_file, strerror(errno));
    }
    struct statvfs fs;
    if (checkpoints && checkpoint_bytes > 0 && statvfs(dir, &fs) == 0) {
        uint64_t room = (uint64_t)fs.f_bavail * (uint64_t)fs.f_frsize;
        char a[32], b[32];
        if (room < checkpoint_bytes) {
            fprintf(stderr, "dsmoe: warning: the file system of the checkpoint directory %s has %s free, less than one "
                    "checkpoint (%s): saves will fail unless room is made (checkpoint.max_failures = %d)\n", dir,
                    size_text((double)room, a, sizeof a), size_text((double)checkpoint_bytes, b, sizeof b),
                    c->checkpoint_max_failures);
            fflush(stderr);
        }
    }
    return DSMOE_OK;
}

void dsmoe_checkpoint_dir_of(const dsmoe_config *c, char *dir, size_t len) {
    if (c->checkpoint_dir[0]) snprintf(dir, len, "%s", c->checkpoint_dir);
    else snprintf(dir, len, "%s/checkpoints", c->output_dir);
}

int dsmoe_preflight_checks_later_checkpoints(const dsmoe_config *c) {
    return c->mode == DSMOE_MODE_TRAIN && strcmp(c->resume, "auto") != 0 && dsmoe_config_may_checkpoint(c);
}

dsmoe_status dsmoe_preflight_later_checkpoints(const dsmoe_config *c, int start_step, dsmoe_err *err) {
    if (!dsmoe_preflight_checks_later_checkpoints(c)) return DSMOE_OK;
    char dir[2048];
    dsmoe_checkpoint_dir_of(c, dir, sizeof dir);
    int *steps, n;
    DSMOE_TRY(dsmoe_checkpoint_list(dir, &steps, &n, err));
    int later = 0;
    for (int i = 0; i < n; i++) later += steps[i] > start_step;
    int first = later ? steps[n - later] : 0, last = later ? steps[n - 1] : 0; // ascending: the later ones end it
    free(steps);
    if (later == 0) return DSMOE_OK;
    char files[96];
    if (later == 1) snprintf(files, sizeof files, "step_%08d.safetensors", last);
    else snprintf(files, sizeof files, "%d files, step_%08d to step_%08d.safetensors", later, first, last);
    const char *where = c->checkpoint_dir[0] ? "checkpoint.dir" : "run.output_dir (or checkpoint.dir)";
    // Pruning keeps the newest steps and resume = auto takes the newest: a run whose own checkpoints are
    // older than files already there would lose its own first, and a requeue would jump to the others.
    if (start_step == 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "checkpoint directory %s already holds checkpoints of an earlier run (%s), and "
                             "checkpoint.resume = \"\" starts a new one: its checkpoints would mix with them, "
                             "checkpoint.keep = %d would prune its own first, and a requeued job (resume = auto) "
                             "would go on from theirs. Set checkpoint.resume = auto to continue that run, choose "
                             "another %s for a new one, or remove those files",
                             dir, files, c->checkpoint_keep, where);
    return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                         "checkpoint directory %s holds checkpoints later than step %d, where checkpoint.resume = %s "
                         "goes on (%s): this run's checkpoints would mix with them, checkpoint.keep = %d would "
                         "prune its own first, and a requeued job (resume = auto) would go on from theirs. To go "
                         "on from step %d, move those files out of %s or choose another %s; to continue from "
                         "the newest, set checkpoint.resume = auto",
                         dir, start_step, c->resume, files, c->checkpoint_keep, start_step, dir, where);
}

void dsmoe_preflight_resumed_data(const dsmoe_dataset *ds, int warn, dsmoe_train_position *pos) {
    uint64_t windows = dsmoe_dataset_windows(ds, DSMOE_SPLIT_TRAIN), tokens = dsmoe_dataset_tokens(ds, DSMOE_SPLIT_TRAIN);
    if (warn && pos->has_data && (pos->data_windows != windows || pos->data_tokens != tokens)) {
        fprintf(stderr, "dsmoe: warning: the training split differs from the one the checkpoint's run read: %" PRIu64
                " tokens in %" PRIu64 " windows, where it had %" PRIu64 " in %" PRIu64 " (the corpus or "
                "data.valid_fraction changed): from step %d on, samples come in another order than that run's\n",
                tokens, windows, pos->data_tokens, pos->data_windows, pos->step);
        fflush(stderr);
    }
    pos->data_windows = windows;
    pos->data_tokens = tokens;
    pos->has_data = 1;
}

dsmoe_status dsmoe_preflight_resumed_seeds(const dsmoe_config *c, const char *path, int rank, dsmoe_train_position *pos,
                                           dsmoe_err *err) {
    const uint64_t data_seed = dsmoe_config_data_seed(c);
    if (pos->seed != c->seed) {
        if (!c->allow_seed_change)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "checkpoint %s was written by a run with run.seed = %" PRIu64
                                 "; this deck has run.seed = %" PRIu64 ": resuming would change the noise streams (and "
                                 "the data order, when data.seed = 0). Set run.seed = %" PRIu64 ", or "
                                 "checkpoint.allow_seed_change = true to go on with %" PRIu64, path, pos->seed, c->seed,
                                 pos->seed, c->seed);
        if (rank == 0)
            printf("resume: run.seed changes from %" PRIu64 " to %" PRIu64 " (checkpoint.allow_seed_change): the noise "
                   "(and the data order, when data.seed = 0) differ from here on\n", pos->seed, c->seed);
    }
    if (pos->has_data_seed && pos->data_seed != data_seed) {
        if (!c->allow_seed_change)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "checkpoint %s was written by a run whose data order had seed "
                                 "%" PRIu64 " (data.seed, or run.seed when data.seed = 0); this deck's has %" PRIu64
                                 ": resuming would change the data order. Set data.seed = %" PRIu64 ", or "
                                 "checkpoint.allow_seed_change = true to go on with %" PRIu64, path, pos->data_seed,
                                 data_seed, pos->data_seed, data_seed);
        if (rank == 0)
            printf("resume: the data order's seed changes from %" PRIu64 " to %" PRIu64
                   " (checkpoint.allow_seed_change): the data order differs from here on\n", pos->data_seed, data_seed);
    }
    pos->seed = c->seed, pos->data_seed = data_seed, pos->has_data_seed = 1;
    return DSMOE_OK;
}

void dsmoe_preflight_resumed_schedule(const dsmoe_config *c, const char *path, int step) {
    char *text = NULL;
    dsmoe_err err = {0};
    dsmoe_config *was = calloc(1, sizeof *was);
    char *no_env[] = {NULL};
    int read = was && dsmoe_checkpoint_deck(path, &text, &err) == DSMOE_OK && text &&
               dsmoe_config_load_text(text, "the checkpoint's deck", NULL, 0, no_env, 0, was, NULL, &err) == DSMOE_OK;
    float now = dsmoe_lr_at(c, step), then = read ? dsmoe_lr_at(was, step) : now;
    if (read && fabsf(now - then) > 1e-6f * fmaxf(fabsf(now), fabsf(then))) {
        char keys[512] = "";
        size_t at = 0;
#define SCHEDULE_KEY(name, fmt, field)                                                                        \
    if (was->field != c->field && at < sizeof keys)                                                        \
        at += (size_t)snprintf(keys + at, sizeof keys - at, "%s" name " " fmt " -> " fmt, at ? ", " : "", \
                               was->field, c->field);
        SCHEDULE_KEY("train.steps", "%d", steps)
        SCHEDULE_KEY("train.lr", "%g", lr)
        SCHEDULE_KEY("train.min_lr", "%g", min_lr)
        SCHEDULE_KEY("train.warmup_steps", "%d", warmup_steps)
        SCHEDULE_KEY("train.decay_steps", "%d", decay_steps)
#undef SCHEDULE_KEY
        static const char *schedules[] = {"cosine", "constant", "linear"};
        if (was->lr_schedule != c->lr_schedule && at < sizeof keys)
            at += (size_t)snprintf(keys + at, sizeof keys - at, "%strain.lr_schedule %s -> %s", at ? ", " : "",
                                   schedules[was->lr_schedule % 3], schedules[c->lr_schedule % 3]);
        fflush(stdout); // after the "resumed from" line
        fprintf(stderr, "dsmoe: warning: the learning-rate schedule is not the one the checkpoint's run had (%s): "
                "step %d runs at %.3e where that run's would have been %.3e", keys, step + 1, now, then);
        if (was->decay_steps == 0 && c->decay_steps == 0 && was->steps != c->steps && c->lr_schedule != DSMOE_LR_CONSTANT)
            fprintf(stderr, " (the decay ends at train.steps; train.decay_steps = %d keeps that run's)", was->steps);
        fprintf(stderr, "\n");
        fflush(stderr);
    }
    free(text);
    free(was);
}
