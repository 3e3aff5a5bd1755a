// core/drivers/train.c: see train.h. Host-side statistics (losses, expert loads) are reduced by the control plane:
// they are a few numbers in host memory, whatever memory the comm plugin works on.
#define _GNU_SOURCE
#include "train.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "checkpoint.h"
#include "data.h"
#include "distill.h"
#include "dsmoe/rng.h"
#include "memplan.h"
#include "model.h"
#include "optimizer.h"
#include "preflight.h"
#include "run_lock.h"
#include "signals.h"
#include "train_metrics.h"
#include "watchdog.h"

float dsmoe_lr_at(const dsmoe_config *c, int step) {
    if (c->warmup_steps > 0 && step < c->warmup_steps) return c->lr * (float)(step + 1) / (float)c->warmup_steps;
    if (c->lr_schedule == DSMOE_LR_CONSTANT) return c->lr;
    int decay_end = c->decay_steps > 0 ? c->decay_steps : c->steps;
    double span = (double)(decay_end - c->warmup_steps);
    double p = span > 0 ? (double)(step - c->warmup_steps) / span : 1.0;
    p = p < 0 ? 0 : p > 1 ? 1 : p;
    double f = c->lr_schedule == DSMOE_LR_COSINE ? 0.5 * (1.0 + cos(M_PI * p)) : 1.0 - p;
    return (float)(c->min_lr + (c->lr - c->min_lr) * f);
}

// ----------------------------------------------------------------------------------------------------
// per-run state

typedef struct trainer {
    const dsmoe_config *cfg;
    dsmoe_runtime *rt;
    dsmoe_model *model;
    dsmoe_teacher *teacher;   // distill.teacher: forward only (core/drivers/distill.h); else NULL
    dsmoe_optimizer *opt;
    dsmoe_dataset *data;
    int B, T, accum;          // micro-batch sequences per rank, sequence length, micro-steps per step
    int32_t *window;          // (T+1) host
    int32_t *inputs, *targets; // (B*T) host
    int64_t *loads;           // (n_moe, max E) kept tokens per expert over the step, all ranks
    int *train_capacity;      // (n_moe) each MoE layer's capacity in the step's last training forward (an
                              // evaluation after the step runs at its own capacity)
    int max_e;
    dsmoe_metrics_file metrics; // rank 0
    int failed_saves;         // consecutive failed checkpoint saves (every rank: saves share their status)
    char ckpt_dir[1200];
    dsmoe_run_lock *lock;     // rank 0 of a training run: run.output_dir and ckpt_dir are this run's (run_lock.h)
    int rank;
    dsmoe_op_profile *prof;   // train.profile: set as rt->prof for the run, recording the steps after the first
    int prof_first, prof_last; // the steps (1-based) the profile covers; prof_first = 0: none yet
} trainer;

// Statistics of one step or evaluation, summed over micro-batches and ranks.
typedef struct step_stats {
    double loss_sum, tokens, aux_sum, micro_count, routed, dropped;
    double kd_sum; // sum over tokens of KL(teacher || student) at the temperature (distilling steps)
} step_stats;

static dsmoe_status load_micro_batch(trainer *tr, dsmoe_split split, uint64_t first_sample, dsmoe_err *err) {
    int T = tr->T;
    for (int b = 0; b < tr->B; b++) {
        DSMOE_TRY(dsmoe_dataset_sample(tr->data, split, first_sample + (uint64_t)b, tr->window, err));
        memcpy(tr->inputs + (size_t)b * T, tr->window, (size_t)T * sizeof(int32_t));
        memcpy(tr->targets + (size_t)b * T, tr->window + 1, (size_t)T * sizeof(int32_t));
    }
    return DSMOE_OK;
}

static dsmoe_status reduce_stats(const trainer *tr, step_stats *st, dsmoe_err *err) {
    double v[7] = {st->loss_sum, st->tokens, st->aux_sum, st->micro_count, st->routed, st->dropped, st->kd_sum};
    DSMOE_TRY(dsmoe_ctl_allreduce_f64(tr->rt->world_ctl, v, 7, err));
    *st = (step_stats){v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
    return DSMOE_OK;
}

static void add_forward(step_stats *st, const dsmoe_forward_result *r) {
    st->loss_sum += r->loss_sum;
    st->tokens += r->tokens;
    st->aux_sum += r->aux_sum;
    st->micro_count += 1;
    st->routed += (double)r->routed;
    st->dropped += (double)r->dropped;
    st->kd_sum += r->kd_sum;
}

// Mean validation loss over eval_batches global batches of the validation split. layer_stats (when not
// NULL): per MoE layer i, [i * (max_e + 2) + e] = tokens kept by expert e, then routed and dropped choices,
// summed over the pass and the ranks. stop_at (when not NULL: the evaluation of a training run): before
// each batch the ranks agree on walltime signals, and on one the pass ends there, *loss = NaN, *stop_at =
// the batch (else -1), so that the step's checkpoint is not held up by a long evaluation.
static dsmoe_status evaluate(trainer *tr, double *loss, int64_t *layer_stats, step_stats *total, int *stop_at,
                             dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    step_stats st = {0};
    int W = tr->max_e + 2;
    if (stop_at) *stop_at = -1;
    for (int batch = 0; batch < c->eval_batches; batch++) {
        int signo, ranks = 0;
        if (stop_at) DSMOE_TRY(dsmoe_signals_agree(tr->rt->world_ctl, &signo, &ranks, err));
        if (ranks > 0) {
            *stop_at = batch;
            *loss = NAN;
            return DSMOE_OK;
        }
        for (int j = 0; j < tr->accum; j++) {
            uint64_t pos = (uint64_t)(j * tr->rt->world_size + tr->rt->world_rank) * (uint64_t)tr->B;
            uint64_t sample = (uint64_t)batch * c->batch + pos;
            DSMOE_TRY(load_micro_batch(tr, DSMOE_SPLIT_VALID, sample, err));
            dsmoe_watchdog_beat("evaluation", -1);
            // Token offset = the token's index in the pass: each batch draws its own RTS priorities (with
            // pos alone every batch would keep the same positions of an over-full expert), every pass the same.
            dsmoe_forward_result r;
            DSMOE_TRY(dsmoe_model_forward(tr->model, tr->inputs, tr->targets, 0, 0, sample * (uint64_t)tr->T, &r, err));
            add_forward(&st, &r);
            for (int i = 0; layer_stats && i < c->n_moe_layers; i++) {
                const dsmoe_moe_stats *ms = dsmoe_model_moe_stats(tr->model, i);
                for (int e = 0; e < c->experts[i]; e++) layer_stats[i * W + e] += ms->expert_load[e];
                layer_stats[i * W + tr->max_e] += ms->routed;
                layer_stats[i * W + tr->max_e + 1] += ms->dropped;
            }
        }
    }
    DSMOE_TRY(reduce_stats(tr, &st, err));
    if (layer_stats && c->n_moe_layers)
        DSMOE_TRY(dsmoe_ctl_allreduce_i64(tr->rt->world_ctl, layer_stats, c->n_moe_layers * W, err));
    *loss = st.loss_sum / st.tokens;
    if (total) *total = st;
    return DSMOE_OK;
}

// run.mode = eval: loss, perplexity and dropped share in the log; each MoE layer's expert load in
// metrics.file (default <run.output_dir>/eval.csv), one row per (layer, expert), written atomically.
static dsmoe_status evaluate_checkpoint(trainer *tr, double *loss, dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    int W = tr->max_e + 2, n_moe = c->n_moe_layers;
    int64_t *ls = dsmoe_calloc((size_t)(n_moe ? n_moe : 1) * (size_t)W, sizeof *ls, "eval statistics", err);
    if (!ls) return DSMOE_ERR_NOMEM;
    step_stats st;
    dsmoe_status s = evaluate(tr, loss, ls, &st, NULL, err);
    if (s == DSMOE_OK && tr->rank == 0) {
        printf("eval: validation loss %.4f, perplexity %.3f over %d batches (%.0f tokens)", *loss, exp(*loss),
               c->eval_batches, st.tokens);
        if (n_moe) printf(", %.2f%% of expert choices dropped (moe.eval_capacity_factor %g)",
                          st.routed > 0 ? 100.0 * st.dropped / st.routed : 0.0, (double)c->eval_capacity_factor);
        printf("\n");
    }
    char path[2048], *text = NULL;
    size_t len = 0;
    FILE *f = NULL;
    if (s == DSMOE_OK && tr->rank == 0) {
        if (c->metrics_file[0]) snprintf(path, sizeof path, "%s", c->metrics_file);
        else snprintf(path, sizeof path, "%s/eval.csv", c->output_dir);
        f = open_memstream(&text, &len);
        if (!f) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "eval: out of memory for %s", path);
    }
    if (f) {
        fprintf(f, "moe_layer,block,experts,capacity_factor,routed,dropped,dropped_frac,expert,tokens,share\n");
        for (int i = 0, l = 0; i < n_moe; i++) {
            int mi = -1;
            while (l < c->layers && !(dsmoe_config_is_moe_layer(c, l, &mi) && mi == i)) l++;
            const int64_t *v = ls + (size_t)i * W;
            int64_t routed = v[tr->max_e], dropped = v[tr->max_e + 1], kept = routed - dropped;
            for (int e = 0; e < c->experts[i]; e++)
                fprintf(f, "%d,%d,%d,%g,%" PRId64 ",%" PRId64 ",%.6f,%d,%" PRId64 ",%.6f\n", i, l, c->experts[i],
                        (double)c->eval_capacity_factor, routed, dropped, routed ? (double)dropped / routed : 0.0, e,
                        v[e], kept ? (double)v[e] / kept : 0.0);
        }
        fclose(f);
        s = dsmoe_mkdir_p(c->output_dir, err);
        if (s == DSMOE_OK) s = dsmoe_write_file_atomic(path, text, len, err);
        if (s == DSMOE_OK) printf("eval: expert loads in %s\n", path);
        free(text);
    }
    free(ls);
    s = dsmoe_ctl_root_status(tr->rt->world_ctl, s, "another rank failed", err);
    if (s != DSMOE_OK) err->scope = DSMOE_SCOPE_COLLECTIVE;
    return s;
}

// train.profile, collective: every rank's profile to rank 0, which prints the table on stdout and writes
// every rank's call sites to <output_dir>/profile.tsv. A failed write is a warning: the run's results are
// whole without it.
static dsmoe_status report_profile(trainer *tr, dsmoe_err *err) {
    if (!tr->prof_first) { // the same on every rank: every rank ran the same steps
        if (tr->rank == 0)
            printf("profile: no step after the run's first: nothing timed (train.profile leaves the first step out)\n");
        return DSMOE_OK;
    }
    dsmoe_prof_table *t;
    DSMOE_TRY(dsmoe_prof_gather(tr->prof, tr->rt->world_ctl, &t, err));
    if (tr->rank != 0) return DSMOE_OK;
    char title[128], path[2100];
    snprintf(title, sizeof title, "profile of steps %d-%d (per call, waits around each)", tr->prof_first,
             tr->prof_last);
    dsmoe_prof_print(t, stdout, title, 0, 20);
    snprintf(path, sizeof path, "%s/profile.tsv", tr->cfg->output_dir);
    dsmoe_err werr = {0};
    if (dsmoe_prof_write_tsv(t, path, &werr) != DSMOE_OK)
        fprintf(stderr, "dsmoe: warning: train.profile: %s\n", werr.msg);
    else
        printf("profile: every rank's call sites in %s\n", path);
    fflush(stdout);
    dsmoe_prof_table_free(t);
    return DSMOE_OK;
}

// A failed save (disk full, I/O error) keeps the older checkpoints and training goes on; the run fails
// (DSMOE_EXIT_SAVE_FAILED) after checkpoint.max_failures failed saves in a row, or when the final one
// fails. dsmoe_checkpoint_save's status is shared by all ranks, so they all count alike.
static dsmoe_status save_checkpoint(trainer *tr, const char *config_text, const dsmoe_train_position *pos, int final,
                                    dsmoe_train_result *res, dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    char path[sizeof res->checkpoint];
    dsmoe_err serr = {0};
    if (dsmoe_checkpoint_save(tr->model, tr->opt, c, config_text, pos, tr->ckpt_dir, c->checkpoint_keep, path,
                              sizeof path, &serr) == DSMOE_OK) {
        tr->failed_saves = 0;
        snprintf(res->checkpoint, sizeof res->checkpoint, "%s", path);
        if (tr->rank == 0) printf("checkpoint: %s\n", res->checkpoint);
        return DSMOE_OK;
    }
    tr->failed_saves++;
    const char *kept = res->checkpoint[0] ? res->checkpoint : "none written by this run";
    int fatal = final || tr->failed_saves >= c->checkpoint_max_failures;
    if (tr->rank == 0 && !fatal) {
        fprintf(stderr, "dsmoe: warning: checkpoint of step %d failed (%d in a row; checkpoint.max_failures = %d): %s; "
                "training goes on (newest checkpoint: %s)\n", pos->step, tr->failed_saves, c->checkpoint_max_failures,
                serr.msg, kept);
        fflush(stderr);
    }
    if (!fatal) return DSMOE_OK;
    res->save_failed = 1;
    dsmoe_err_set(err, DSMOE_ERR_IO, "%s checkpoint of step %d failed (%d in a row; checkpoint.max_failures = %d): %s; "
                  "newest checkpoint: %s; exit code %d", final ? "the final" : "the", pos->step, tr->failed_saves,
                  c->checkpoint_max_failures, serr.msg, kept, DSMOE_EXIT_SAVE_FAILED);
    err->scope = DSMOE_SCOPE_COLLECTIVE;
    return err->status;
}

// ----------------------------------------------------------------------------------------------------
// one optimizer step

static dsmoe_status train_step(trainer *tr, int step, uint64_t first_sample, step_stats *st, double *gnorm,
                               dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    dsmoe_runtime *rt = tr->rt;
    int world = rt->world_size;
    float dloss = 1.0f / (float)((double)c->batch * tr->T);
    // batch scope: every rank holds the same global l_aux and the gradient all-reduce sums; rank scope:
    // each rank's own l_aux enters the loss as the mean over ranks.
    float daux = c->aux_loss_coeff / (float)(c->aux_loss_scope == DSMOE_AUX_SCOPE_BATCH ? tr->accum : tr->accum * world);
    uint64_t step_seed = dsmoe_rng_key(c->seed, 0x57e9, (uint64_t)step, 0);
    // Distilling: alpha * CE + beta * T^2 * KL (docs/distill.md); each token's KL weighs beta T^2 / tokens.
    int kd = tr->teacher && dsmoe_distill_on_at(c, step);
    float temp = c->distill_temperature;
    float kd_weight = kd ? c->distill_beta * temp * temp * dloss : 0.0f;
    if (kd) dloss *= c->distill_alpha;
    memset(st, 0, sizeof *st);
    memset(tr->loads, 0, sizeof(int64_t) * (size_t)(c->n_moe_layers ? c->n_moe_layers : 1) * (size_t)tr->max_e);
    DSMOE_TRY(dsmoe_model_zero_grads(tr->model, err));
    for (int j = 0; j < tr->accum; j++) {
        uint64_t pos = (uint64_t)(j * world + rt->world_rank) * (uint64_t)tr->B; // sample position in the step
        DSMOE_TRY(load_micro_batch(tr, DSMOE_SPLIT_TRAIN, first_sample + pos, err));
        dsmoe_forward_result r;
        dsmoe_watchdog_beat("forward", step + 1);
        if (kd) {
            const void *teacher_logits;
            DSMOE_TRY(dsmoe_teacher_forward(tr->teacher, tr->inputs, pos * (uint64_t)tr->T, &teacher_logits, err));
            DSMOE_TRY(dsmoe_model_set_teacher(tr->model, teacher_logits, temp, kd_weight, err));
        }
        DSMOE_TRY(dsmoe_model_forward(tr->model, tr->inputs, tr->targets, 1, step_seed, pos * (uint64_t)tr->T, &r, err));
        add_forward(st, &r);
        for (int i = 0; i < c->n_moe_layers; i++) {
            const dsmoe_moe_stats *ms = dsmoe_model_moe_stats(tr->model, i);
            for (int e = 0; e < c->experts[i]; e++) tr->loads[i * tr->max_e + e] += ms->expert_load[e];
            tr->train_capacity[i] = ms->capacity;
        }
        dsmoe_model_set_reduce_in_backward(tr->model, j == tr->accum - 1);
        dsmoe_watchdog_beat("backward", step + 1);
        DSMOE_TRY(dsmoe_model_backward(tr->model, dloss, daux, err));
    }
    if (kd) DSMOE_TRY(dsmoe_model_set_teacher(tr->model, NULL, 0, 0, err)); // evaluation has no teacher
    dsmoe_watchdog_beat("gradient reduction and optimizer", step + 1);
    DSMOE_TRY(dsmoe_model_reduce_grads(tr->model, err));
    DSMOE_TRY(dsmoe_model_grad_norm(tr->model, gnorm, err));
    if (!isfinite(*gnorm)) {
        // The norm is reduced over all ranks: every rank stops here together.
        dsmoe_err_set(err, DSMOE_ERR_INVALID,
                      "step %d: the gradient norm is not finite (%g)\n---> HINT: lower train.lr, or check the data "
                      "for tokens outside the vocabulary", step + 1, *gnorm);
        err->scope = DSMOE_SCOPE_COLLECTIVE;
        return err->status;
    }
    float scale = c->grad_clip > 0 && *gnorm > c->grad_clip ? (float)(c->grad_clip / *gnorm) : 1.0f;
    DSMOE_TRY(dsmoe_optimizer_step(tr->opt, dsmoe_lr_at(c, step), scale, step + 1, err));
    DSMOE_TRY(reduce_stats(tr, st, err));
    if (c->n_moe_layers > 0) DSMOE_TRY(dsmoe_ctl_allreduce_i64(tr->rt->world_ctl, tr->loads, c->n_moe_layers * tr->max_e, err));
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// the run

static dsmoe_status open_data(const dsmoe_config *c, dsmoe_dataset **ds, dsmoe_err *err) {
    dsmoe_dataset_options dopt = {
        .source = c->data_source, .path = c->data_path, .vocab = c->vocab, .seq_len = c->seq_len,
        .valid_fraction = c->valid_fraction, .seed = dsmoe_config_data_seed(c),
        .synthetic_sources = c->synthetic_sources, .synthetic_branching = c->synthetic_branching,
    };
    return dsmoe_dataset_open(&dopt, ds, err);
}

// A checkpoint's size: the parameters and both AdamW moments, fp32 (docs/checkpoint.md).
static uint64_t checkpoint_bytes(const dsmoe_config *c) {
    dsmoe_param_counts pc;
    dsmoe_mem_param_counts(c, &pc);
    return 3 * pc.total * sizeof(float);
}

static dsmoe_status open_run(trainer *tr, const dsmoe_config *c, dsmoe_runtime *rt, dsmoe_err *err) {
    tr->cfg = c;
    tr->rt = rt;
    tr->rank = rt->world_rank;
    tr->T = c->seq_len;
    tr->B = c->micro_batch; // resolved and checked against batch and ranks by the config
    tr->accum = c->batch / (tr->B * rt->world_size);
    tr->max_e = 1;
    for (int i = 0; i < c->n_moe_layers; i++)
        if (c->experts[i] > tr->max_e) tr->max_e = c->experts[i];
    tr->window = dsmoe_malloc((size_t)(tr->T + 1) * sizeof(int32_t), "token window", err);
    tr->inputs = dsmoe_malloc((size_t)tr->B * tr->T * sizeof(int32_t), "inputs", err);
    tr->targets = dsmoe_malloc((size_t)tr->B * tr->T * sizeof(int32_t), "targets", err);
    tr->loads = dsmoe_calloc((size_t)(c->n_moe_layers ? c->n_moe_layers : 1) * (size_t)tr->max_e, sizeof(int64_t),
                             "expert loads", err);
    tr->train_capacity = dsmoe_calloc((size_t)(c->n_moe_layers ? c->n_moe_layers : 1), sizeof(int), "capacities", err);
    if (!tr->window || !tr->inputs || !tr->targets || !tr->loads || !tr->train_capacity) return DSMOE_ERR_NOMEM;
    // Model creation is collective: a data file, or a check before the first step, that fails on some
    // ranks is agreed on first.
    DSMOE_TRY(dsmoe_errors_agree(open_data(c, &tr->data, err), err));
    DSMOE_TRY(dsmoe_ctl_checks_agree(rt->world_ctl, dsmoe_preflight_train(c, tr->data, tr->rank, checkpoint_bytes(c), err),
                                     err));
    DSMOE_TRY(dsmoe_model_create(c, rt, tr->B, &tr->model, err));
    if (dsmoe_config_distills(c)) DSMOE_TRY(dsmoe_teacher_open(c, rt, tr->B, &tr->teacher, err));
    DSMOE_TRY(dsmoe_optimizer_create(tr->model, c->zero_stage, &tr->opt, err));
    if (c->train_profile) {
        DSMOE_TRY(dsmoe_prof_create(&tr->prof, err));
        rt->prof = tr->prof;
    }
    dsmoe_checkpoint_dir_of(c, tr->ckpt_dir, sizeof tr->ckpt_dir);
    return DSMOE_OK;
}

static void close_run(trainer *tr) {
    dsmoe_run_lock_release(tr->lock);
    if (tr->prof) tr->rt->prof = NULL;
    dsmoe_prof_free(tr->prof);
    dsmoe_optimizer_free(tr->opt);
    dsmoe_teacher_close(tr->teacher);
    dsmoe_model_free(tr->model);
    dsmoe_dataset_close(tr->data);
    if (tr->metrics.f) fclose(tr->metrics.f); // a run that failed: its error is the message
    free(tr->window);
    free(tr->inputs);
    free(tr->targets);
    free(tr->loads);
    free(tr->train_capacity);
}

// The directories a training run locks (run_lock.h), with their keys: run.output_dir (which holds the
// default checkpoint directory), and a checkpoint.dir of its own.
static int locked_dirs(const dsmoe_config *c, const char **dirs, const char **keys) {
    dirs[0] = c->output_dir, keys[0] = "run.output_dir";
    dirs[1] = c->checkpoint_dir, keys[1] = "checkpoint.dir";
    return c->checkpoint_dir[0] && dsmoe_config_may_checkpoint(c) ? 2 : 1;
}

// --check: the data and the directories (preflight); a training run's checkpoint directory holds no
// checkpoint later than where the run starts (the step of checkpoint.resume from its header);
// distill.teacher's deck loads for this rank count and suits the student, and the teacher's checkpoint
// verifies against it (every tensor's checksum); a run that holds the directories now is named.
dsmoe_status dsmoe_train_check(const dsmoe_config *c, dsmoe_runtime *rt, dsmoe_err *err) {
    dsmoe_dataset *ds = NULL;
    dsmoe_status s = open_data(c, &ds, err);
    if (s == DSMOE_OK) s = dsmoe_preflight_train(c, ds, rt->world_rank, checkpoint_bytes(c), err);
    if (s == DSMOE_OK && rt->world_rank == 0) printf("data: %s\n", dsmoe_dataset_describe(ds));
    dsmoe_dataset_close(ds);
    if (s == DSMOE_OK && rt->world_rank == 0 && dsmoe_preflight_checks_later_checkpoints(c)) {
        dsmoe_train_position pos = {0};
        if (c->resume[0]) s = dsmoe_checkpoint_position(c->resume, &pos, err);
        if (s == DSMOE_OK) s = dsmoe_preflight_later_checkpoints(c, pos.step, err);
    }
    if (s == DSMOE_OK && dsmoe_config_distills(c)) s = dsmoe_teacher_check(c, rt->world_size, rt->world_rank == 0, err);
    // A run in progress in the directories refuses this one only while it lasts: a job queued behind it
    // (a dependency, a requeue) starts later, so this is a warning, not a refusal.
    const char *dirs[2], *keys[2];
    char held[1200];
    if (s == DSMOE_OK && c->mode == DSMOE_MODE_TRAIN && rt->world_rank == 0 &&
        dsmoe_run_lock_probe(dirs, keys, locked_dirs(c, dirs, keys), held, sizeof held))
        printf("warning: %s: a run started while it lasts is refused\n", held);
    return dsmoe_ctl_checks_agree(rt->world_ctl, s, err);
}

// Starts fresh, or loads checkpoint.resume ("auto": the newest in the checkpoint dir, if any).
static dsmoe_status start_position(trainer *tr, dsmoe_train_position *pos, int *resumed, dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    char path[4096] = "";
    *resumed = 0;
    // auto: rank 0 chooses for all. Ranks choosing for themselves could load different steps (one that cannot
    // read the newest file takes an older one), and each would read every candidate whole.
    if (strcmp(c->resume, "auto") == 0) {
        dsmoe_status s = tr->rank == 0 ? dsmoe_checkpoint_find_latest(tr->ckpt_dir, path, sizeof path, err) : DSMOE_OK;
        DSMOE_TRY(dsmoe_ctl_root_status(tr->rt->world_ctl, s, "another rank failed", err));
        DSMOE_TRY(dsmoe_ctl_bcast(tr->rt->world_ctl, path, sizeof path, err));
    } else if (c->resume[0]) {
        snprintf(path, sizeof path, "%s", c->resume);
    }
    if (!path[0]) {
        if (c->mode == DSMOE_MODE_EVAL)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "run.mode = eval needs a checkpoint: set checkpoint.resume to a file or to auto "
                                 "(none found in %s)", tr->ckpt_dir);
        *pos = (dsmoe_train_position){.step = 0, .next_sample = 0, .seed = c->seed,
                                      .data_seed = dsmoe_config_data_seed(c), .has_data_seed = 1};
        DSMOE_TRY(dsmoe_model_init_params(tr->model, c->seed, err));
        return tr->teacher ? dsmoe_teacher_init_student(tr->teacher, tr->model, err) : DSMOE_OK;
    }
    DSMOE_TRY(dsmoe_checkpoint_load(tr->model, c->mode == DSMOE_MODE_TRAIN ? tr->opt : NULL, c, path, pos, err));
    if (c->mode == DSMOE_MODE_TRAIN) DSMOE_TRY(dsmoe_preflight_resumed_seeds(c, path, tr->rank, pos, err));
    if (tr->rank == 0) {
        printf("resumed from %s at step %d (next sample %" PRIu64 ")\n", path, pos->step, pos->next_sample);
        fflush(stdout); // a batch log shows it before a long first evaluation or step
    }
    if (tr->rank == 0 && c->mode == DSMOE_MODE_TRAIN) dsmoe_preflight_resumed_schedule(c, path, pos->step);
    *resumed = 1;
    return DSMOE_OK;
}

// Rank 0: output_dir, resolved.deck and the metrics file (trimmed on resume, row `step` given fill_valid), with
// its header.
static dsmoe_status open_outputs(trainer *tr, const char *config_text, int resumed, int step, double fill_valid,
                                 dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    char path[2048];
    DSMOE_TRY(dsmoe_mkdir_p(c->output_dir, err));
    snprintf(path, sizeof path, "%s/resolved.deck", c->output_dir);
    DSMOE_TRY(dsmoe_write_file_atomic(path, config_text, strlen(config_text), err));
    if (c->metrics_file[0]) snprintf(path, sizeof path, "%s", c->metrics_file);
    else snprintf(path, sizeof path, "%s/metrics.csv", c->output_dir);
    DSMOE_TRY(dsmoe_metrics_open(&tr->metrics, c, path, resumed, step, fill_valid, err));
    return DSMOE_OK;
}

// A resume from a checkpoint whose own evaluation the signal that stopped its run cut short runs it
// first: *fill_valid goes into the step's row, so that metrics.csv ends up as an uninterrupted run's. A
// signal during it stops the run again at once (res->stopped_signal), nothing written: the checkpoint
// still says so.
static dsmoe_status finish_cut_evaluation(trainer *tr, dsmoe_train_position *pos, double *fill_valid,
                                          dsmoe_train_result *res, dsmoe_err *err) {
    int stop_at;
    DSMOE_TRY(evaluate(tr, fill_valid, NULL, NULL, &stop_at, err));
    if (stop_at >= 0) {
        int signo, ranks;
        DSMOE_TRY(dsmoe_signals_agree(tr->rt->world_ctl, &signo, &ranks, err));
        dsmoe_signals_stop_written();
        if (tr->rank == 0)
            printf("stopped: SIG%s during the evaluation after step %d, which the resume was finishing (%d of %d "
                   "ranks got a signal): exit code %d; the checkpoint it resumed from still holds it\n",
                   dsmoe_signal_name(signo), pos->step, ranks, tr->rt->world_size, DSMOE_EXIT_SIGNAL_CHECKPOINT);
        res->stopped_signal = signo;
        res->steps_done = pos->step;
        return DSMOE_OK;
    }
    if (tr->rank == 0)
        printf("eval: the evaluation after step %d, which a signal cut short: validation loss %.4f (in its row of "
               "metrics.csv)\n", pos->step, *fill_valid);
    pos->eval_cut = 0;
    return DSMOE_OK;
}

static dsmoe_status run(trainer *tr, const char *config_text, dsmoe_train_result *res, dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    dsmoe_train_position pos;
    int resumed;
    // Before anything of the run is read or written there: no other training run uses its directories.
    if (c->mode == DSMOE_MODE_TRAIN) {
        const char *dirs[2], *keys[2];
        int n = locked_dirs(c, dirs, keys);
        DSMOE_TRY(dsmoe_ctl_checks_agree(tr->rt->world_ctl, tr->rank != 0 ? DSMOE_OK
                                         : dsmoe_run_lock_take(dirs, keys, n, &tr->lock, err), err));
    }
    DSMOE_TRY(dsmoe_errors_agree(start_position(tr, &pos, &resumed, err), err));
    dsmoe_preflight_resumed_data(tr->data, resumed && c->mode == DSMOE_MODE_TRAIN && tr->rank == 0, &pos);
    DSMOE_TRY(dsmoe_ctl_checks_agree(tr->rt->world_ctl, tr->rank != 0 ? DSMOE_OK
                                     : dsmoe_preflight_later_checkpoints(c, pos.step, err), err));
    res->loss_bound = dsmoe_dataset_loss_bound(tr->data);
    res->valid_loss = NAN;
    if (tr->rank == 0) {
        printf("data: %s\n", dsmoe_dataset_describe(tr->data));
        if (res->loss_bound >= 0) printf("data: achievable loss bound %.4f nats/token\n", res->loss_bound);
        printf("model: %zu parameters (%zu on this rank), %d MoE layers, micro-batch %d x %d tokens, %d micro-steps "
               "per step\n", dsmoe_model_global_params(tr->model), dsmoe_model_local_params(tr->model),
               c->n_moe_layers, tr->B, tr->T, tr->accum);
    }
    // Memory as dsmoe --plan predicts it (core/drivers/memplan.h): the same numbers whether planned or running.
    dsmoe_mem_estimate mem;
    dsmoe_err mem_err = {0};
    if (tr->rank == 0 &&
        dsmoe_mem_estimate_rank_for(c, tr->rt->world_size, 0, tr->rt->node_ranks, tr->rt->kern, &mem, &mem_err) ==
            DSMOE_OK) {
        double mib = 1.0 / 1048576.0;
        printf("memory per rank (rank 0, %s): parameters %.1f MiB, gradients %.1f MiB, AdamW state %.1f MiB (%s) + "
               "%.1f MiB ZeRO buffers, activations and scratch %.1f MiB, MoE buffers %.1f MiB, total %.1f MiB (peak "
               "%.1f MiB; dsmoe --plan gives the details)\n",
               c->precision == DSMOE_PRECISION_BF16 ? "bf16: fp32 masters + bf16 copy in parameters" : "fp32",
               mem.param_bytes * mib, mem.grad_bytes * mib,
               mem.optimizer_bytes * mib,
               c->zero_stage ? "ZeRO-1: sharded over the data-parallel ranks" : "ZeRO off: full copy per rank",
               mem.optimizer_scratch_bytes * mib, (mem.activation_bytes + mem.token_bytes) * mib,
               (mem.moe_buffer_bytes + mem.moe_router_bytes + mem.exchange_bytes) * mib, mem.total_bytes * mib,
               mem.peak_bytes * mib);
        uint64_t tb = 0;
        if (tr->teacher && dsmoe_mem_teacher_bytes(dsmoe_teacher_cfg(tr->teacher), tr->rt->world_size, 0,
                                                   tr->rt->node_ranks, tr->rt->kern, &tb, &mem_err) == DSMOE_OK)
            printf("memory per rank (rank 0): the distillation teacher adds %.1f MiB (parameters, activations and MoE "
                   "buffers; forward only, no gradients or optimizer state)\n", tb * mib);
    }
    if (tr->rank == 0 && c->n_moe_layers > 0 && c->drop_tokens)
        printf("moe: capacity is computed per rank and micro-batch from its %d tokens (C = %d on layer 0 when "
               "training), as in DeepSpeed: another rank count or train.micro_batch drops other tokens; "
               "moe.drop_tokens = false gives the same results on any layout\n",
               tr->B * tr->T, dsmoe_config_capacity(c, tr->B * tr->T, c->experts[0], 1));
    if (c->mode == DSMOE_MODE_EVAL) {
        DSMOE_TRY(evaluate_checkpoint(tr, &res->valid_loss, err));
        res->steps_done = pos.step;
        return DSMOE_OK;
    }
    double fill_valid = NAN;
    if (resumed && pos.eval_cut) {
        DSMOE_TRY(finish_cut_evaluation(tr, &pos, &fill_valid, res, err));
        if (res->stopped_signal) return DSMOE_OK;
    }
    // Rank 0 writes the outputs; every rank learns before the first step whether it could (with its reason).
    dsmoe_status s = tr->rank == 0 ? open_outputs(tr, config_text, resumed, pos.step, fill_valid, err) : DSMOE_OK;
    if ((s = dsmoe_ctl_root_status(tr->rt->world_ctl, s, "another rank failed", err)) != DSMOE_OK) {
        err->scope = DSMOE_SCOPE_COLLECTIVE; // every rank holds rank 0's message: it prints once
        return s;
    }
    if (tr->rank == 0 && pos.step >= c->steps)
        printf("train: nothing to do: the run is at step %d, train.steps = %d (raise train.steps to go on)\n",
               pos.step, c->steps);
    double t_start = dsmoe_now_seconds(), t_last = t_start;
    int first = pos.step, logged_from = pos.step;
    for (int step = pos.step; step < c->steps; step++) {
        step_stats st;
        double gnorm;
        int profiled = tr->prof && step > first; // the run's first step warms up (allocations, caches)
        if (profiled) DSMOE_TRY(dsmoe_prof_record(tr->rt, 1, err));
        DSMOE_TRY(train_step(tr, step, pos.next_sample, &st, &gnorm, err));
        if (profiled) {
            DSMOE_TRY(dsmoe_prof_record(tr->rt, 0, err));
            if (!tr->prof_first) tr->prof_first = step + 1;
            tr->prof_last = step + 1;
        }
        pos.step = step + 1;
        pos.next_sample += (uint64_t)c->batch;
        pos.eval_cut = 0;
        double loss = st.loss_sum / st.tokens;
        res->last_loss = loss;
        res->last_aux = st.aux_sum / st.micro_count;
        int distilled = tr->teacher && dsmoe_distill_on_at(c, step);
        res->last_kd = distilled ? st.kd_sum / st.tokens : NAN;
        if (res->loss_history) res->loss_history[step] = loss;
        int last = pos.step == c->steps;
        double valid = NAN;
        if ((c->eval_every > 0 && pos.step % c->eval_every == 0) || last) {
            int stop_at;
            DSMOE_TRY(evaluate(tr, &valid, NULL, NULL, &stop_at, err));
            res->valid_loss = valid;
            pos.eval_cut = stop_at >= 0;
            if (stop_at >= 0 && tr->rank == 0)
                printf("eval: the evaluation after step %d stopped at batch %d of %d for a walltime signal (the "
                       "resume runs it)\n", pos.step, stop_at, c->eval_batches);
        }
        // A row for a cut evaluation too: the resume fills its validation loss in.
        if (pos.step % c->log_every == 0 || last || !isnan(valid) || pos.eval_cut) {
            double now = dsmoe_now_seconds(), elapsed = now - t_start;
            double tok_s = (double)(pos.step - logged_from) * c->batch * tr->T / (now - t_last);
            double eta = elapsed / (pos.step - first) * (c->steps - pos.step);
            t_last = now;
            logged_from = pos.step;
            if (tr->rank == 0) {
                char el[32], et[32];
                dsmoe_format_hms(elapsed, el, sizeof el);
                dsmoe_format_hms(eta, et, sizeof et);
                printf("step %*d/%d | loss %.4f", (int)snprintf(NULL, 0, "%d", c->steps), pos.step, c->steps, loss);
                if (res->loss_bound >= 0) printf(" (bound %.4f)", res->loss_bound);
                if (distilled) printf(" | kd %.4f", res->last_kd);
                if (c->n_moe_layers) printf(" | aux %.4f | drop %5.2f%%", res->last_aux, 100.0 * st.dropped / st.routed);
                printf(" | lr %.2e | gnorm %.3f | %.0f tok/s | %s elapsed | ETA %s", dsmoe_lr_at(c, step), gnorm, tok_s, el, et);
                if (!isnan(valid)) printf(" | valid %.4f", valid);
                printf("\n");
                fflush(stdout);
            }
            if (tr->rank == 0)
                dsmoe_metrics_row(&tr->metrics, c, &(dsmoe_metrics_values){
                    .step = pos.step, .loss = st.loss_sum / st.tokens, .aux_loss = st.aux_sum / st.micro_count,
                    .lr = dsmoe_lr_at(c, step), .grad_norm = gnorm, .tokens_per_s = tok_s,
                    .dropped_frac = st.routed > 0 ? st.dropped / st.routed : 0.0, .elapsed_s = elapsed,
                    .valid_loss = valid, .kd_loss = distilled ? st.kd_sum / st.tokens : NAN,
                    .capacity = tr->train_capacity, .loads = tr->loads, .max_e = tr->max_e,
                    .routed_per_layer = c->n_moe_layers ? st.routed / c->n_moe_layers : 0.0});
        }
        if (tr->teacher && tr->rank == 0 && c->distill_stop_step == pos.step && !last)
            printf("distill: distillation stopped after step %d: the plain training loss from step %d on\n", pos.step,
                   pos.step + 1);
        int saved = (c->checkpoint_every > 0 && pos.step % c->checkpoint_every == 0) || (last && c->checkpoint_final);
        dsmoe_watchdog_beat("checkpoint save", pos.step);
        if (saved) DSMOE_TRY(save_checkpoint(tr, config_text, &pos, last && c->checkpoint_final, res, err));
        dsmoe_watchdog_beat("step boundary", pos.step);
        // A signal during the last step changes nothing, the run is complete, unless it cut the final
        // evaluation short: then the run stops as at any other step, for the requeued job to finish it.
        int signo, ranks = 0, may_stop = !last || pos.eval_cut;
        if (may_stop) DSMOE_TRY(dsmoe_signals_agree(tr->rt->world_ctl, &signo, &ranks, err));
        if (may_stop && ranks > 0) {
            // The run stops here: this save is its last, and 75 promises its checkpoint.
            if (!saved || tr->failed_saves > 0) DSMOE_TRY(save_checkpoint(tr, config_text, &pos, 1, res, err));
            dsmoe_signals_stop_written();
            if (tr->rank == 0) {
                printf("stopped: SIG%s at step %d of %d (%d of %d ranks got a signal): exit code %d; resume with "
                       "checkpoint.resume=auto\n", dsmoe_signal_name(signo), pos.step, c->steps, ranks,
                       tr->rt->world_size, DSMOE_EXIT_SIGNAL_CHECKPOINT);
                fflush(stdout);
            }
            res->stopped_signal = signo;
            break;
        }
    }
    res->steps_done = pos.step;
    if (tr->prof) DSMOE_TRY(report_profile(tr, err));
    int64_t failed = tr->rank == 0 && dsmoe_metrics_close(&tr->metrics, res->steps_done);
    DSMOE_TRY(dsmoe_ctl_allreduce_i64(tr->rt->world_ctl, &failed, 1, err));
    res->metrics_failed = failed != 0;
    return DSMOE_OK;
}

dsmoe_status dsmoe_train_run(const dsmoe_config *cfg, const char *config_text, dsmoe_runtime *rt,
                             dsmoe_train_result *result, dsmoe_err *err) {
    trainer tr;
    memset(&tr, 0, sizeof tr);
    // Set-up failures (a data file, memory) are agreed on, so a failure every rank shares prints once;
    // failures inside the loop end the job from the rank that failed.
    dsmoe_status s = dsmoe_errors_agree(open_run(&tr, cfg, rt, err), err);
    if (s == DSMOE_OK) s = run(&tr, config_text, result, err);
    close_run(&tr);
    return s;
}
