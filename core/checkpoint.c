// core/checkpoint.c: see checkpoint.h. Host-side gathers use MPI directly: checkpoint data is staged
// in host memory whatever the kernel plugin, and the comm plugin may accept device memory only.
#define _GNU_SOURCE
#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "safetensors.h"

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
static dsmoe_status share_status(dsmoe_status s, dsmoe_err *err) {
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    int codes[2] = {rank == 0 ? (int)s : 0, s != DSMOE_OK};
    MPI_Allreduce(MPI_IN_PLACE, codes, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (codes[0] != DSMOE_OK) {
        MPI_Bcast(err->msg, (int)sizeof err->msg, MPI_CHAR, 0, MPI_COMM_WORLD);
        err->status = (dsmoe_status)codes[0];
        return err->status;
    }
    if (codes[1] && s == DSMOE_OK) return dsmoe_err_set(err, DSMOE_ERR_IO, "another rank failed while staging the checkpoint");
    return s;
}

static int is_checkpoint_name(const char *name, int *step) {
    int n = 0;
    if (sscanf(name, "step_%8d.safetensors%n", step, &n) != 1) return 0;
    return n == (int)strlen(name) && strlen(name) == strlen("step_00000000.safetensors");
}

static int cmp_int(const void *a, const void *b) {
    return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b);
}

static void prune(const char *dir, int keep) {
    DIR *d = opendir(dir);
    if (!d) return;
    int steps[4096], n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 4096)
        if (is_checkpoint_name(e->d_name, &steps[n])) n++;
    closedir(d);
    qsort(steps, (size_t)n, sizeof steps[0], cmp_int);
    for (int i = 0; i + keep < n; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/step_%08d.safetensors", dir, steps[i]);
        unlink(path);
    }
}

dsmoe_status dsmoe_checkpoint_find_latest(const char *dir, char *path, size_t len, dsmoe_err *err) {
    path[0] = '\0';
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? DSMOE_OK
                                   : dsmoe_err_set(err, DSMOE_ERR_IO, "cannot read checkpoint directory %s: %s", dir,
                                                   strerror(errno));
    int best = -1, step;
    struct dirent *e;
    while ((e = readdir(d)))
        if (is_checkpoint_name(e->d_name, &step) && step > best) best = step;
    closedir(d);
    if (best >= 0) snprintf(path, len, "%s/step_%08d.safetensors", dir, best);
    return DSMOE_OK;
}

// Gathers every rank's shard of n floats to rank 0 of comm, rank r's at dst + r*n. MPI counts are ints:
// a shard may pass 2^31 elements (6.7B+MoE-128 at ep 2), so it goes in pieces of at most 2^30, each
// received as one block of a type whose extent is a whole shard, which puts rank r's piece at
// r*n + offset without an int displacement.
static int gather_shards(const float *shard, size_t n, float *dst, MPI_Comm comm) {
    const size_t most = (size_t)1 << 30;
    int rc = MPI_SUCCESS;
    for (size_t at = 0; at < n && rc == MPI_SUCCESS; at += most) {
        int piece = (int)(n - at < most ? n - at : most);
        MPI_Datatype block, spaced;
        MPI_Type_contiguous(piece, MPI_FLOAT, &block);
        MPI_Type_create_resized(block, 0, (MPI_Aint)(n * sizeof(float)), &spaced);
        MPI_Type_commit(&spaced);
        rc = MPI_Gather(shard + at, piece, MPI_FLOAT, dst ? dst + at : NULL, 1, spaced, 0, comm);
        MPI_Type_free(&spaced);
        MPI_Type_free(&block);
    }
    return rc;
}

// Copies every tensor of one kind to host on world rank 0, which writes: its replicated tensors, and the
// expert shards gathered over the EP group of the tensor's layer (its own moe.expert_parallel). World
// rank 0 is slot 0 (placement.h), rank 0 of the first EP group of every size; the other groups hold
// copies of the same experts and skip the gather, and no rank but 0 stages anything (host is NULL
// there): a 52B-parameter model would otherwise need 624 GB of host memory on every rank.
// slab: the parameters, or a moment in the parameters' layout.
static dsmoe_status stage_host(dsmoe_model *m, const float *slab, float *host, dsmoe_err *err) {
    dsmoe_runtime *rt = dsmoe_model_runtime(m);
    size_t off = 0;
    for (int i = 0; i < dsmoe_model_tensor_count(m); i++) {
        const dsmoe_param_tensor *t = dsmoe_model_tensor(m, i);
        size_t global = 1;
        for (int d = 0; d < t->ndim; d++) global *= (size_t)t->shape[d];
        int ep = t->expert_layer < 0 ? 1 : dsmoe_model_ep_size(m, t->expert_layer);
        if (ep == 1) {
            if (host) KCALL(rt, copy_to_host, host + off, slab + t->offset, t->numel * sizeof(float));
        } else if (rt->slot < ep) {
            float *shard = dsmoe_malloc(t->numel * sizeof(float), "checkpoint shard", err);
            if (!shard) return err->status;
            dsmoe_status s = rt->kern->copy_to_host(rt->kctx, shard, slab + t->offset, t->numel * sizeof(float));
            if (s == DSMOE_OK && gather_shards(shard, t->numel, host ? host + off : NULL,
                                               dsmoe_model_ep_comm(m, t->expert_layer)) != MPI_SUCCESS)
                s = dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "MPI_Gather of %s failed", t->name);
            else if (s != DSMOE_OK)
                dsmoe_err_set(err, s, "copying %s to host: %s", t->name, rt->kern->last_error(rt->kctx));
            free(shard);
            if (s != DSMOE_OK) return s;
        }
        off += global;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_checkpoint_save(dsmoe_model *m, dsmoe_optimizer *opt, const dsmoe_config *cfg, const char *config_text,
                                   const dsmoe_train_position *pos, const char *dir, int keep, char *path_out,
                                   size_t path_len, dsmoe_err *err) {
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    size_t global = dsmoe_model_global_params(m);
    float *host = NULL;
    dsmoe_st_writer *w = NULL;
    char path[4096] = "";
    dsmoe_status s = DSMOE_OK;
    if (rank == 0) {
        host = dsmoe_malloc(3 * global * sizeof(float), "checkpoint staging", err);
        if (!host) s = err->status;
    }
    // The moments come in the parameters' layout whatever the ZeRO sharding (a collective gather).
    float *moment = NULL;
    dsmoe_runtime *rt = dsmoe_model_runtime(m);
    if (s == DSMOE_OK && (s = rt->kern->alloc(rt->kctx, dsmoe_model_local_params(m) * sizeof(float), (void **)&moment)) != DSMOE_OK)
        dsmoe_err_set(err, s, "allocating checkpoint staging: %s", rt->kern->last_error(rt->kctx));
    // The staging below is collective (gathers): a rank that could not allocate must not leave the
    // others waiting in it.
    s = share_status(s, err);
    for (int kind = 0; kind < 3 && s == DSMOE_OK; kind++) {
        if (kind > 0) s = dsmoe_optimizer_get_state(opt, kind - 1, moment, err);
        if (s == DSMOE_OK) s = stage_host(m, kind ? moment : dsmoe_model_params(m), host ? host + kind * global : NULL, err);
    }
    rt->kern->free(rt->kctx, moment);
    if (rank == 0 && s == DSMOE_OK) {
        w = dsmoe_st_writer_new();
        if (!w) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for the checkpoint writer");
        for (int kind = 0; kind < 3 && s == DSMOE_OK; kind++) {
            size_t off = 0;
            for (int i = 0; i < dsmoe_model_tensor_count(m) && s == DSMOE_OK; i++) {
                const dsmoe_param_tensor *t = dsmoe_model_tensor(m, i);
                char name[160];
                snprintf(name, sizeof name, "%s%s", kind_prefix[kind], t->name);
                s = dsmoe_st_writer_add(w, name, DSMOE_ST_F32, t->ndim, t->shape, host + kind * global + off, err);
                size_t n = 1;
                for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
                off += n;
            }
        }
        char num[64], shape[1024];
        shape_string(cfg, shape, sizeof shape);
        if (s == DSMOE_OK) s = dsmoe_st_writer_meta(w, "format", CKPT_FORMAT, err);
        if (s == DSMOE_OK) s = dsmoe_st_writer_meta(w, "format_version", CKPT_VERSION, err);
        snprintf(num, sizeof num, "%d", pos->step);
        if (s == DSMOE_OK) s = dsmoe_st_writer_meta(w, "step", num, err);
        snprintf(num, sizeof num, "%" PRIu64, pos->next_sample);
        if (s == DSMOE_OK) s = dsmoe_st_writer_meta(w, "next_sample", num, err);
        snprintf(num, sizeof num, "%" PRIu64, pos->seed);
        if (s == DSMOE_OK) s = dsmoe_st_writer_meta(w, "seed", num, err);
        if (s == DSMOE_OK) s = dsmoe_st_writer_meta(w, "model", shape, err);
        if (s == DSMOE_OK) s = dsmoe_st_writer_meta(w, "deck", config_text ? config_text : "", err);
        if (s == DSMOE_OK) s = dsmoe_mkdir_p(dir, err);
        snprintf(path, sizeof path, "%s/step_%08d.safetensors", dir, pos->step);
        if (s == DSMOE_OK) s = dsmoe_st_writer_commit(w, path, err);
        if (s == DSMOE_OK) prune(dir, keep);
        dsmoe_st_writer_free(w);
    }
    free(host);
    if (path_out) snprintf(path_out, path_len, "%s", path);
    // A failed write (rank 0) is everyone's error, with rank 0's message: the run stops cleanly.
    s = share_status(s, err);
    if (s != DSMOE_OK) err->scope = DSMOE_SCOPE_COLLECTIVE;
    return s;
}

static dsmoe_status parse_u64_meta(const dsmoe_st_file *f, const char *path, const char *key, uint64_t *out,
                                   dsmoe_err *err) {
    const char *v = dsmoe_st_meta(f, key);
    char *end;
    if (!v || !*v) return dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint %s: metadata '%s' is missing", path, key);
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (*end || errno) return dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint %s: metadata '%s' = '%s' is not a number", path, key, v);
    *out = x;
    return DSMOE_OK;
}

dsmoe_status dsmoe_checkpoint_load(dsmoe_model *m, dsmoe_optimizer *opt, const dsmoe_config *cfg, const char *path,
                                   dsmoe_train_position *pos, dsmoe_err *err) {
    dsmoe_runtime *rt = dsmoe_model_runtime(m);
    dsmoe_st_file *f = NULL;
    DSMOE_TRY(dsmoe_st_open(path, &f, err));
    dsmoe_status s = DSMOE_OK;
    int with_optimizer = opt != NULL;
    float *moment = NULL; // a moment in the parameters' layout, handed to the optimizer
    if (with_optimizer && (s = rt->kern->alloc(rt->kctx, dsmoe_model_local_params(m) * sizeof(float), (void **)&moment)) != DSMOE_OK)
        dsmoe_err_set(err, s, "allocating checkpoint staging: %s", rt->kern->last_error(rt->kctx));
    const char *fmt = dsmoe_st_meta(f, "format"), *ver = dsmoe_st_meta(f, "format_version");
    char shape[1024];
    shape_string(cfg, shape, sizeof shape);
    const char *file_shape = dsmoe_st_meta(f, "model");
    uint64_t step = 0;
    if (!fmt || strcmp(fmt, CKPT_FORMAT) != 0)
        s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s is not a dsmoe checkpoint (metadata format = '%s', expected '%s')",
                          path, fmt ? fmt : "(none)", CKPT_FORMAT);
    else if (!ver || strcmp(ver, CKPT_VERSION) != 0)
        s = dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint %s has format version '%s'; this dsmoe reads version %s", path,
                          ver ? ver : "(none)", CKPT_VERSION);
    else if (!file_shape || strcmp(file_shape, shape) != 0)
        s = dsmoe_err_set(err, DSMOE_ERR_INVALID,
                          "checkpoint %s holds a different model:\n  checkpoint: %s\n  deck:       %s", path,
                          file_shape ? file_shape : "(none)", shape);
    if (s == DSMOE_OK) s = parse_u64_meta(f, path, "step", &step, err);
    if (s == DSMOE_OK) s = parse_u64_meta(f, path, "next_sample", &pos->next_sample, err);
    if (s == DSMOE_OK) s = parse_u64_meta(f, path, "seed", &pos->seed, err);
    pos->step = (int)step;
    for (int kind = 0; kind < (with_optimizer ? 3 : 1) && s == DSMOE_OK; kind++) {
        for (int i = 0; i < dsmoe_model_tensor_count(m) && s == DSMOE_OK; i++) {
            const dsmoe_param_tensor *t = dsmoe_model_tensor(m, i);
            char name[160];
            snprintf(name, sizeof name, "%s%s", kind_prefix[kind], t->name);
            const dsmoe_st_tensor *ft = dsmoe_st_find(f, name);
            if (!ft) {
                s = dsmoe_err_set(err, DSMOE_ERR_IO, "checkpoint %s: tensor '%s' is missing", path, name);
                break;
            }
            int same = ft->dtype == DSMOE_ST_F32 && ft->ndim == t->ndim;
            for (int d = 0; same && d < t->ndim; d++) same = ft->shape[d] == t->shape[d];
            if (!same) {
                char want[128] = "", got[128] = "";
                for (int d = 0; d < t->ndim; d++)
                    snprintf(want + strlen(want), sizeof want - strlen(want), "%s%" PRId64, d ? ", " : "", t->shape[d]);
                for (int d = 0; d < ft->ndim; d++)
                    snprintf(got + strlen(got), sizeof got - strlen(got), "%s%" PRId64, d ? ", " : "", ft->shape[d]);
                s = dsmoe_err_set(err, DSMOE_ERR_INVALID, "checkpoint %s: tensor '%s' is %s [%s], the deck's model needs F32 [%s]",
                                  path, name, dsmoe_st_dtype_name(ft->dtype), got, want);
                break;
            }
            // Staged through an aligned host copy: mapped data need not be 4-byte aligned.
            float *tmp = dsmoe_malloc(t->numel * sizeof(float), "checkpoint load", err);
            if (!tmp) { s = err->status; break; }
            memcpy(tmp, (const char *)ft->data + t->shard_begin * sizeof(float), t->numel * sizeof(float));
            float *dest = kind ? moment : dsmoe_model_params(m);
            s = rt->kern->copy_to_device(rt->kctx, dest + t->offset, tmp, t->numel * sizeof(float));
            if (s != DSMOE_OK) dsmoe_err_set(err, s, "loading %s: %s", name, rt->kern->last_error(rt->kctx));
            free(tmp);
        }
        if (kind > 0 && s == DSMOE_OK) s = dsmoe_optimizer_set_state(opt, kind - 1, moment, err);
    }
    rt->kern->free(rt->kctx, moment);
    dsmoe_st_close(f);
    return s; // local: the caller agrees on the outcome
}
