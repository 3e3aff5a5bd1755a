// core/io/checkpoint.c: see checkpoint.h. A file is verified whole (header, metadata ranges, every tensor's
// CRC32C, finite values) before any parameter is overwritten, so a damaged checkpoint leaves the model as
// it was; checkpoint.resume = auto takes the newest file that verifies. Host-side gathers go through the control plane (control.h): checkpoint data is staged
// in host memory whatever the kernel plugin, and the comm plugin may accept device memory only.
#define _GNU_SOURCE
#include "checkpoint.h"


#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "safetensors.h"
#include "watchdog.h" // dsmoe_watchdog_beat: a load or save of a large file is progress

#define CKPT_FORMAT "dsmoe-checkpoint"
#define CKPT_VERSION "1"

static const char *kind_prefix[3] = {"", "optim.exp_avg.", "optim.exp_avg_sq."};


// The model's shape as metadata, compared on load so a mismatch is named before any tensor is read.
static void shape_string(const dsmoe_config *c, char *buf, size_t len) {
    int n = snprintf(buf, len, "vocab=%d seq_len=%d layers=%d hidden=%d heads=%d ffn_hidden=%d every=%d residual=%d experts=",
                     c->vocab, c->seq_len, c->layers, c->hidden, c->heads, c->ffn_hidden, c->moe_every, c->residual);
    for (int i = 0; i < c->n_moe_layers && n > 0 && (size_t)n < len; i++)
        n += snprintf(buf + n, len - (size_t)n, "%s%d", i ? "," : "", c->experts[i]);
    if (c->n_moe_layers == 0 && n > 0 && (size_t)n < len) snprintf(buf + n, len - (size_t)n, "0");
}

// Every rank learns the outcome: rank 0's status and message if rank 0 failed (it writes the file),
// else whether any other rank failed while staging its shard.
static dsmoe_status share_status(const dsmoe_runtime *rt, dsmoe_status s, dsmoe_err *err) {
    return dsmoe_ctl_root_status(rt->world_ctl, s, "another rank failed while staging the checkpoint", err);
}

static int is_checkpoint_name(const char *name, int *step) {
    int n = 0;
    if (sscanf(name, "step_%8d.safetensors%n", step, &n) != 1) return 0;
    return n == (int)strlen(name) && strlen(name) == strlen("step_00000000.safetensors");
}

static int cmp_int(const void *a, const void *b) {
    return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b);
}

// What dsmoe_checkpoint_find_latest skipped, said by rank 0 when that file is loaded (find_latest does
// not know the rank and runs on every rank).
static char latest_path[4096], skipped_note[8192];

// step_<8 digits>.safetensors.tmp.<pid> (safetensors.c's temporary) of a save that never finished.
static int is_stale_tmp(const char *name, long *pid) {
    const char *mid = ".safetensors.tmp.";
    if (strncmp(name, "step_", 5) != 0 || strlen(name) <= 13 + strlen(mid)) return 0;
    for (int k = 5; k < 13; k++)
        if (name[k] < '0' || name[k] > '9') return 0;
    if (strncmp(name + 13, mid, strlen(mid)) != 0) return 0;
    const char *digits = name + 13 + strlen(mid);
    for (const char *q = digits; *q; q++)
        if (*q < '0' || *q > '9') return 0;
    *pid = strtol(digits, NULL, 10);
    // A live process on this host may be writing it (another save into the same directory): left alone.
    return *pid > 0 && *pid != (long)getpid() && kill((pid_t)*pid, 0) != 0 && errno == ESRCH;
}

void dsmoe_checkpoint_remove_stale(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    long pid;
    while ((e = readdir(d)))
        if (is_stale_tmp(e->d_name, &pid)) {
            char path[4400];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if (unlink(path) == 0)
                printf("checkpoint: removed %s, left by an interrupted save (process %ld)\n", path, pid);
        }
    closedir(d);
}

dsmoe_status dsmoe_checkpoint_list(const char *dir, int **steps, int *n, dsmoe_err *err) {
    *steps = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? DSMOE_OK
                                   : dsmoe_err_set(err, DSMOE_ERR_IO, "cannot read checkpoint directory %s: %s", dir,
                                                   strerror(errno));
    int cap = 0, step;
    struct dirent *e;
    while ((e = readdir(d)))
        if (is_checkpoint_name(e->d_name, &step)) {
            if (*n == cap) {
                cap = cap ? 2 * cap : 64;
                int *grown = realloc(*steps, (size_t)cap * sizeof **steps);
                if (!grown) {
                    closedir(d);
                    free(*steps);
                    *steps = NULL;
                    *n = 0;
                    return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory listing checkpoint directory %s", dir);
                }
                *steps = grown;
            }
            (*steps)[(*n)++] = step;
        }
    closedir(d);
    if (*n) qsort(*steps, (size_t)*n, sizeof **steps, cmp_int);
    return DSMOE_OK;
}

static void prune(const char *dir, int keep) {
    int *steps, n;
    if (dsmoe_checkpoint_list(dir, &steps, &n, NULL) != DSMOE_OK) return;
    for (int i = 0; i + keep < n; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/step_%08d.safetensors", dir, steps[i]);
        unlink(path);
    }
    free(steps);
}

static dsmoe_status verify_file(const dsmoe_st_file *f, const char *path, dsmoe_train_position *pos, dsmoe_err *err);

dsmoe_status dsmoe_checkpoint_find_latest(const char *dir, char *path, size_t len, dsmoe_err *err) {
    path[0] = latest_path[0] = skipped_note[0] = '\0';
    int *steps, n;
    DSMOE_TRY(dsmoe_checkpoint_list(dir, &steps, &n, err));
    size_t at = 0;
    dsmoe_err first = {0}; // why the newest was refused
    for (int i = n - 1; i >= 0; i--) {
        char p[4096];
        snprintf(p, sizeof p, "%s/step_%08d.safetensors", dir, steps[i]);
        dsmoe_st_file *f = NULL;
        dsmoe_err why = {0};
        dsmoe_train_position pos;
        dsmoe_status s = dsmoe_st_open(p, &f, &why);
        if (s == DSMOE_OK) s = verify_file(f, p, &pos, &why);
        dsmoe_st_close(f);
        if (s == DSMOE_OK) {
            snprintf(path, len, "%s", p);
            snprintf(latest_path, sizeof latest_path, "%s", p);
            free(steps);
            return DSMOE_OK;
        }
        if (i == n - 1) first = why;
        if (at < sizeof skipped_note)
            at += (size_t)snprintf(skipped_note + at, sizeof skipped_note - at, "checkpoint: skipped %s, which does not "
                                   "verify: %s\n", p, why.msg);
    }
    free(steps);
    if (n == 0) return DSMOE_OK;
    return dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint.resume = auto: none of the %d checkpoints in %s verifies; the "
                         "newest: %s", n, dir, first.msg);
}


// Saving streams: tensor j of the file (kind j / n, tensor j % n; kinds are the parameters and the two
// AdamW moments) is staged just before rank 0 writes it, so rank 0 holds one global tensor in host
// memory, not the model three times (586 GiB for 52B parameters). Every rank stages every j in the same
// order, because staging is collective: a moment is gathered over the ZeRO shards when its kind begins,
// and an expert tensor is gathered over its layer's EP group. Only the first EP group of each size
// (slots [0, ep), placement.h) gathers: world rank 0 is slot 0 and the other groups hold copies.
typedef struct stager {
    dsmoe_model *m;
    dsmoe_optimizer *opt;
    int kind;        // the kind `moment` holds (0: none yet)
    float *moment;   // (local params) kernel memory: a moment in the parameters' layout
    float *host;     // (largest global tensor) rank 0: what it writes next
    float *shard;    // (largest local expert tensor) host: a shard on its way to rank 0
} stager;

// Collective whatever happened before on this rank (a failed rank still takes part, with garbage, so
// that nobody waits): returns the first failure; *data = the host copy on rank 0.
static dsmoe_status stage_tensor(void *user, int j, const void **data, dsmoe_err *err) {
    stager *g = user;
    dsmoe_model *m = g->m;
    dsmoe_runtime *rt = dsmoe_model_runtime(m);
    int n = dsmoe_model_tensor_count(m), kind = j / n;
    const dsmoe_param_tensor *t = dsmoe_model_tensor(m, j % n);
    dsmoe_watchdog_beat("checkpoint save", -1);
    dsmoe_status s = DSMOE_OK;
    if (kind > 0 && g->kind != kind) {
        s = dsmoe_optimizer_get_state(g->opt, kind - 1, g->moment, err);
        g->kind = kind;
    }
    const float *slab = (kind ? g->moment : dsmoe_model_params(m)) + t->offset;
    int ep = t->expert_layer < 0 ? 1 : dsmoe_model_ep_size(m, t->expert_layer);
    // Host copies are valid after a wait on the queue (dsmoe/kernel_plugin.h).
    if (ep == 1) {
        if (g->host && s == DSMOE_OK && rt->kern->copy_to_host(rt->kctx, rt->q, g->host, slab, t->numel * sizeof(float)) != DSMOE_OK)
            s = dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "copying %s to host: %s", t->name, rt->kern->last_error(rt->kctx));
        if (g->host && s == DSMOE_OK) s = dsmoe_rt_wait(rt, err);
    } else if (rt->slot < ep) {
        if (s == DSMOE_OK && rt->kern->copy_to_host(rt->kctx, rt->q, g->shard, slab, t->numel * sizeof(float)) != DSMOE_OK)
            s = dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "copying %s to host: %s", t->name, rt->kern->last_error(rt->kctx));
        if (s == DSMOE_OK) s = dsmoe_rt_wait(rt, err);
        dsmoe_err gerr = {0};
        if (dsmoe_ctl_gather_spaced(dsmoe_model_ep_ctl(m, t->expert_layer), g->shard, t->numel, g->host, &gerr) !=
                DSMOE_OK && s == DSMOE_OK)
            s = dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "gathering %s: %s", t->name, gerr.msg);
    }
    *data = g->host;
    return s;
}

// The writer's table: every tensor of every kind, data deferred to stage_tensor, and the metadata.
static dsmoe_status describe_file(dsmoe_model *m, const dsmoe_config *cfg, const char *config_text,
                                  const dsmoe_train_position *pos, dsmoe_st_writer *w, dsmoe_err *err) {
    for (int kind = 0; kind < 3; kind++)
        for (int i = 0; i < dsmoe_model_tensor_count(m); i++) {
            const dsmoe_param_tensor *t = dsmoe_model_tensor(m, i);
            char name[160];
            snprintf(name, sizeof name, "%s%s", kind_prefix[kind], t->name);
            DSMOE_TRY(dsmoe_st_writer_add(w, name, DSMOE_ST_F32, t->ndim, t->shape, NULL, err));
        }
    char num[64], shape[1024];
    shape_string(cfg, shape, sizeof shape);
    DSMOE_TRY(dsmoe_st_writer_meta(w, "format", CKPT_FORMAT, err));
    DSMOE_TRY(dsmoe_st_writer_meta(w, "format_version", CKPT_VERSION, err));
    snprintf(num, sizeof num, "%d", pos->step);
    DSMOE_TRY(dsmoe_st_writer_meta(w, "step", num, err));
    snprintf(num, sizeof num, "%" PRIu64, pos->next_sample);
    DSMOE_TRY(dsmoe_st_writer_meta(w, "next_sample", num, err));
    snprintf(num, sizeof num, "%" PRIu64, pos->seed);
    DSMOE_TRY(dsmoe_st_writer_meta(w, "seed", num, err));
    if (pos->has_data) {
        snprintf(num, sizeof num, "%" PRIu64, pos->data_windows);
        DSMOE_TRY(dsmoe_st_writer_meta(w, "data_train_windows", num, err));
        snprintf(num, sizeof num, "%" PRIu64, pos->data_tokens);
        DSMOE_TRY(dsmoe_st_writer_meta(w, "data_train_tokens", num, err));
    }
    if (pos->has_data_seed) {
        snprintf(num, sizeof num, "%" PRIu64, pos->data_seed);
        DSMOE_TRY(dsmoe_st_writer_meta(w, "data_seed", num, err));
    }
    if (pos->eval_cut) DSMOE_TRY(dsmoe_st_writer_meta(w, "eval_cut_short", "1", err));
    DSMOE_TRY(dsmoe_st_writer_meta(w, "model", shape, err));
    return dsmoe_st_writer_meta(w, "deck", config_text ? config_text : "", err);
}

dsmoe_status dsmoe_checkpoint_save(dsmoe_model *m, dsmoe_optimizer *opt, const dsmoe_config *cfg, const char *config_text,
                                   const dsmoe_train_position *pos, const char *dir, int keep, char *path_out,
                                   size_t path_len, dsmoe_err *err) {
    dsmoe_runtime *rt = dsmoe_model_runtime(m);
    int rank = dsmoe_ctl_rank(rt->world_ctl);
    stager g = {.m = m, .opt = opt};
    size_t most_global = 0, most_shard = 0;
    for (int i = 0; i < dsmoe_model_tensor_count(m); i++) {
        const dsmoe_param_tensor *t = dsmoe_model_tensor(m, i);
        size_t global = 1;
        for (int d = 0; d < t->ndim; d++) global *= (size_t)t->shape[d];
        most_global = global > most_global ? global : most_global;
        int ep = t->expert_layer < 0 ? 1 : dsmoe_model_ep_size(m, t->expert_layer);
        if (ep > 1 && rt->slot < ep && t->numel > most_shard) most_shard = t->numel;
    }
    dsmoe_status s = DSMOE_OK;
    if (rank == 0 && !(g.host = dsmoe_malloc(most_global * sizeof(float), "checkpoint staging", err))) s = err->status;
    if (s == DSMOE_OK && most_shard && !(g.shard = dsmoe_malloc(most_shard * sizeof(float), "checkpoint shard", err)))
        s = err->status;
    if (s == DSMOE_OK && (s = rt->kern->alloc(rt->kctx, dsmoe_model_local_params(m) * sizeof(float), 0, (void **)&g.moment)) != DSMOE_OK)
        dsmoe_err_set(err, s, "allocating checkpoint staging: %s", rt->kern->last_error(rt->kctx));
    // Staging is collective: a rank that could not allocate must not leave the others waiting in it.
    s = share_status(rt, s, err);
    char path[4096] = "";
    if (s == DSMOE_OK) {
        snprintf(path, sizeof path, "%s/step_%08d.safetensors", dir, pos->step);
        dsmoe_st_writer *w = rank == 0 ? dsmoe_st_writer_new() : NULL;
        dsmoe_status ready = rank != 0 ? DSMOE_OK
                             : !w     ? dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for the checkpoint writer")
                                      : describe_file(m, cfg, config_text, pos, w, err);
        if (rank == 0 && ready == DSMOE_OK) ready = dsmoe_mkdir_p(dir, err);
        if (rank == 0 && ready == DSMOE_OK) dsmoe_checkpoint_remove_stale(dir);
        if (rank == 0 && ready == DSMOE_OK) {
            s = dsmoe_st_writer_commit_stream(w, path, stage_tensor, &g, err);
            if (s == DSMOE_OK) prune(dir, keep);
        } else {
            // Not writing (another rank, or rank 0 could not start the file): stage anyway, for the others.
            s = ready;
            for (int j = 0; j < 3 * dsmoe_model_tensor_count(m); j++) {
                const void *ignored;
                dsmoe_status sj = stage_tensor(&g, j, &ignored, s == DSMOE_OK ? err : NULL);
                if (s == DSMOE_OK) s = sj;
            }
        }
        dsmoe_st_writer_free(w);
    }
    rt->kern->free(rt->kctx, g.moment);
    free(g.shard);
    free(g.host);
    if (path_out) snprintf(path_out, path_len, "%s", path);
    // A failed write (rank 0) is everyone's error, with rank 0's message: the run stops cleanly.
    s = share_status(rt, s, err);
    if (s != DSMOE_OK) err->scope = DSMOE_SCOPE_COLLECTIVE;
    return s;
}

static dsmoe_status parse_u64_meta(const dsmoe_st_file *f, const char *path, const char *key, uint64_t *out,
                                   dsmoe_err *err) {
    const char *v = dsmoe_st_meta(f, key);
    char *end;
    if (!v || !*v) return dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint %s: metadata '%s' is missing", path, key);
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10); // strtoull takes a sign and wraps "-1": digits only
    if (*end || errno || v[0] < '0' || v[0] > '9' || x > *out)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint %s: metadata '%s' = '%s' is not a number in [0, %" PRIu64 "]",
                             path, key, v, *out);
    *out = x;
    return DSMOE_OK;
}

// The metadata: format, version and the position, ranges checked in 64 bits (a step above INT_MAX is
// refused, not wrapped).
static dsmoe_status read_position(const dsmoe_st_file *f, const char *path, dsmoe_train_position *pos,
                                  dsmoe_err *err) {
    const char *fmt = dsmoe_st_meta(f, "format"), *ver = dsmoe_st_meta(f, "format_version");
    if (!fmt || strcmp(fmt, CKPT_FORMAT) != 0)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s is not a dsmoe checkpoint (metadata format = '%s', expected '%s')",
                             path, fmt ? fmt : "(none)", CKPT_FORMAT);
    if (!ver || strcmp(ver, CKPT_VERSION) != 0)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint %s has format version '%s'; this dsmoe reads version %s", path,
                             ver ? ver : "(none)", CKPT_VERSION);
    uint64_t step = INT_MAX;
    pos->next_sample = INT64_MAX;
    pos->seed = UINT64_MAX;
    DSMOE_TRY(parse_u64_meta(f, path, "step", &step, err));
    DSMOE_TRY(parse_u64_meta(f, path, "next_sample", &pos->next_sample, err));
    DSMOE_TRY(parse_u64_meta(f, path, "seed", &pos->seed, err));
    pos->step = (int)step;
    pos->has_data = dsmoe_st_meta(f, "data_train_windows") != NULL; // absent from older checkpoints
    pos->data_windows = pos->data_tokens = UINT64_MAX;
    if (pos->has_data) {
        DSMOE_TRY(parse_u64_meta(f, path, "data_train_windows", &pos->data_windows, err));
        DSMOE_TRY(parse_u64_meta(f, path, "data_train_tokens", &pos->data_tokens, err));
    }
    pos->has_data_seed = dsmoe_st_meta(f, "data_seed") != NULL;
    pos->data_seed = UINT64_MAX;
    if (pos->has_data_seed) DSMOE_TRY(parse_u64_meta(f, path, "data_seed", &pos->data_seed, err));
    const char *cut = dsmoe_st_meta(f, "eval_cut_short");
    pos->eval_cut = cut && strcmp(cut, "1") == 0;
    return DSMOE_OK;
}

// Everything that can be checked without the model: the metadata, every tensor's checksum and, for F32
// tensors, finite values.
static dsmoe_status verify_file(const dsmoe_st_file *f, const char *path, dsmoe_train_position *pos, dsmoe_err *err) {
    DSMOE_TRY(read_position(f, path, pos, err));
    float chunk[4096];
    for (int i = 0; i < dsmoe_st_count(f); i++) {
        const dsmoe_st_tensor *t = dsmoe_st_at(f, i);
        // Reading a large file from a slow file system is progress: the watchdog sees a beat per tensor.
        dsmoe_watchdog_beat("checkpoint verification", pos->step);
        DSMOE_TRY(dsmoe_st_verify(f, t, err));
        if (t->dtype != DSMOE_ST_F32) continue;
        size_t n = t->nbytes / sizeof(float);
        for (size_t k = 0; k < n; k += 4096) { // through an aligned copy: mapped data may be unaligned
            size_t m = n - k < 4096 ? n - k : 4096;
            memcpy(chunk, (const char *)t->data + k * sizeof(float), m * sizeof(float));
            for (size_t q = 0; q < m; q++)
                if (!isfinite(chunk[q]))
                    return dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint %s: tensor '%s' holds %s at element %zu: refused "
                                         "(a diverged run or damaged data)", path, t->name, isnan(chunk[q]) ? "NaN" :
                                         chunk[q] > 0 ? "+Inf" : "-Inf", k + q);
        }
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_checkpoint_verify(const dsmoe_config *cfg, const char *path, dsmoe_train_position *pos,
                                     dsmoe_err *err) {
    dsmoe_st_file *f = NULL;
    DSMOE_TRY(dsmoe_st_open(path, &f, err));
    dsmoe_status s = verify_file(f, path, pos, err);
    char shape[1024];
    shape_string(cfg, shape, sizeof shape);
    const char *file_shape = dsmoe_st_meta(f, "model");
    if (s == DSMOE_OK && (!file_shape || strcmp(file_shape, shape) != 0))
        s = dsmoe_err_set(err, DSMOE_ERR_INVALID,
                          "checkpoint %s holds a different model:\n  checkpoint: %s\n  deck:       %s", path,
                          file_shape ? file_shape : "(none)", shape);
    dsmoe_st_close(f);
    return s;
}

dsmoe_status dsmoe_checkpoint_position(const char *path, dsmoe_train_position *pos, dsmoe_err *err) {
    dsmoe_st_file *f = NULL;
    DSMOE_TRY(dsmoe_st_open(path, &f, err));
    dsmoe_status s = read_position(f, path, pos, err);
    dsmoe_st_close(f);
    return s;
}

dsmoe_status dsmoe_checkpoint_deck(const char *path, char **text, dsmoe_err *err) {
    *text = NULL;
    dsmoe_st_file *f = NULL;
    DSMOE_TRY(dsmoe_st_open(path, &f, err));
    const char *deck = dsmoe_st_meta(f, "deck");
    dsmoe_status s = DSMOE_OK;
    if (deck && deck[0] && !(*text = strdup(deck)))
        s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "checkpoint %s: out of memory for its deck", path);
    dsmoe_st_close(f);
    return s;
}

// The file's tensor for (kind, model tensor i), checked against the model: present, F32, same shape.
static dsmoe_status find_tensor(const dsmoe_st_file *f, const char *path, const dsmoe_param_tensor *t, int kind,
                                const dsmoe_st_tensor **out, dsmoe_err *err) {
    char name[160];
    snprintf(name, sizeof name, "%s%s", kind_prefix[kind], t->name);
    const dsmoe_st_tensor *ft = *out = dsmoe_st_find(f, name);
    if (!ft) return dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint %s: tensor '%s' is missing", path, name);
    int same = ft->dtype == DSMOE_ST_F32 && ft->ndim == t->ndim;
    for (int d = 0; same && d < t->ndim; d++) same = ft->shape[d] == t->shape[d];
    if (same) return DSMOE_OK;
    char want[128] = "", got[128] = "";
    for (int d = 0; d < t->ndim; d++)
        snprintf(want + strlen(want), sizeof want - strlen(want), "%s%" PRId64, d ? ", " : "", t->shape[d]);
    for (int d = 0; d < ft->ndim; d++)
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s%" PRId64, d ? ", " : "", ft->shape[d]);
    return dsmoe_err_set(err, DSMOE_ERR_INVALID, "checkpoint %s: tensor '%s' is %s [%s], the deck's model needs F32 [%s]",
                         path, name, dsmoe_st_dtype_name(ft->dtype), got, want);
}

// The model tensor t's shard of the file's tensor ft into dest + t->offset (kernel memory), staged through an
// aligned host copy: mapped data need not be 4-byte aligned.
static dsmoe_status copy_shard(dsmoe_runtime *rt, const dsmoe_param_tensor *t, const dsmoe_st_tensor *ft, float *dest,
                               dsmoe_err *err) {
    float *tmp = dsmoe_malloc(t->numel * sizeof(float), "checkpoint load", err);
    if (!tmp) return err->status;
    memcpy(tmp, (const char *)ft->data + t->shard_begin * sizeof(float), t->numel * sizeof(float));
    dsmoe_status s = rt->kern->copy_to_device(rt->kctx, rt->q, dest + t->offset, tmp, t->numel * sizeof(float));
    if (s != DSMOE_OK) dsmoe_err_set(err, s, "loading %s: %s", ft->name, rt->kern->last_error(rt->kctx));
    free(tmp);
    return s;
}

dsmoe_status dsmoe_checkpoint_load(dsmoe_model *m, dsmoe_optimizer *opt, const dsmoe_config *cfg, const char *path,
                                   dsmoe_train_position *pos, dsmoe_err *err) {
    dsmoe_runtime *rt = dsmoe_model_runtime(m);
    int rank = dsmoe_ctl_rank(rt->world_ctl), kinds = opt ? 3 : 1;
    // Chosen by checkpoint.resume = auto: rank 0 has just verified it whole.
    const int just_verified = rank == 0 && latest_path[0] && strcmp(path, latest_path) == 0;
    if (just_verified) {
        fputs(skipped_note, stdout);
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0';
        dsmoe_checkpoint_remove_stale(slash ? dir : ".");
    }
    dsmoe_st_file *f = NULL;
    dsmoe_status s = dsmoe_st_open(path, &f, err);
    // Read and check everything first: nothing below the checks touches the model. Rank 0 verifies every
    // tensor's checksum and values for all (every rank reading the whole file would make W reads of it on
    // the shared file system), unless it just did; the others read the metadata, and each rank checks the
    // tensors it takes.
    dsmoe_train_position got = {0};
    if (s == DSMOE_OK)
        s = rank == 0 && !just_verified ? verify_file(f, path, &got, err) : read_position(f, path, &got, err);
    char shape[1024];
    shape_string(cfg, shape, sizeof shape);
    const char *file_shape = s == DSMOE_OK ? dsmoe_st_meta(f, "model") : NULL;
    if (s == DSMOE_OK && (!file_shape || strcmp(file_shape, shape) != 0))
        s = dsmoe_err_set(err, DSMOE_ERR_INVALID,
                          "checkpoint %s holds a different model:\n  checkpoint: %s\n  deck:       %s", path,
                          file_shape ? file_shape : "(none)", shape);
    const dsmoe_st_tensor *ft;
    for (int kind = 0; kind < kinds && s == DSMOE_OK; kind++)
        for (int i = 0; i < dsmoe_model_tensor_count(m) && s == DSMOE_OK; i++)
            s = find_tensor(f, path, dsmoe_model_tensor(m, i), kind, &ft, err);
    if (s == DSMOE_OK && rank == 0 && !dsmoe_st_has_checksums(f))
        fprintf(stderr, "warning: checkpoint %s has no checksums (written before dsmoe recorded them): its tensor data "
                "cannot be verified\n", path);
    s = dsmoe_ctl_checks_agree(rt->world_ctl, s, err); // rank 0's verdict on the file is every rank's
    float *moment = NULL; // a moment in the parameters' layout, handed to the optimizer
    if (s == DSMOE_OK && opt && (s = rt->kern->alloc(rt->kctx, dsmoe_model_local_params(m) * sizeof(float), 0, (void **)&moment)) != DSMOE_OK)
        dsmoe_err_set(err, s, "allocating checkpoint staging: %s", rt->kern->last_error(rt->kctx));
    for (int kind = 0; kind < kinds && s == DSMOE_OK; kind++) {
        for (int i = 0; i < dsmoe_model_tensor_count(m) && s == DSMOE_OK; i++) {
            const dsmoe_param_tensor *t = dsmoe_model_tensor(m, i);
            dsmoe_watchdog_beat("checkpoint load", got.step); // (*pos is written at the end)
            s = find_tensor(f, path, t, kind, &ft, err);
            if (s == DSMOE_OK) s = copy_shard(rt, t, ft, kind ? moment : dsmoe_model_params(m), err);
        }
        if (kind > 0 && s == DSMOE_OK) s = dsmoe_optimizer_set_state(opt, kind - 1, moment, err);
    }
    if (s == DSMOE_OK) *pos = got;
    if (moment) rt->kern->free(rt->kctx, moment);
    dsmoe_st_close(f);
    return s; // local: the caller agrees on the outcome
}

dsmoe_status dsmoe_checkpoint_load_mapped(dsmoe_model *m, const char *path, const int *layer_map,
                                          dsmoe_err *err) {
    dsmoe_runtime *rt = dsmoe_model_runtime(m);
    const dsmoe_config *c = dsmoe_model_config(m);
    dsmoe_st_file *f = NULL;
    DSMOE_TRY(dsmoe_st_open(path, &f, err));
    dsmoe_train_position got;
    dsmoe_status s = verify_file(f, path, &got, err);
    int n = dsmoe_model_tensor_count(m);
    const dsmoe_st_tensor **src = calloc((size_t)n, sizeof *src);
    if (s == DSMOE_OK && !src) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory loading %s", path);
    // Every tensor is found and checked before any is copied: a refused file leaves the model as it was.
    for (int i = 0; i < n && s == DSMOE_OK; i++) {
        dsmoe_param_tensor t = *dsmoe_model_tensor(m, i);
        int l = -1, at = 0;
        if (sscanf(t.name, "h.%d.%n", &l, &at) == 1 && at > 0 && l >= 0 && l < c->layers) {
            char name[sizeof t.name];
            snprintf(name, sizeof name, "h.%d.%s", layer_map[l], t.name + at);
            snprintf(t.name, sizeof t.name, "%s", name);
        }
        s = find_tensor(f, path, &t, 0, &src[i], err);
        if (s != DSMOE_OK && l >= 0) {
            char why[sizeof err->msg];
            snprintf(why, sizeof why, "%s", err->msg);
            dsmoe_err_set(err, s, "%s (for the model's %s: its block %d from the file's block %d)", why,
                          dsmoe_model_tensor(m, i)->name, l, layer_map[l]);
        }
    }
    for (int i = 0; i < n && s == DSMOE_OK; i++) {
        dsmoe_watchdog_beat("checkpoint load", 0);
        s = copy_shard(rt, dsmoe_model_tensor(m, i), src[i], dsmoe_model_params(m), err);
    }
    free(src);
    dsmoe_st_close(f);
    return s; // local: the caller agrees on the outcome
}
