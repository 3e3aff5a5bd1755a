// core/train.c: see train.h. Host-side statistics (losses, expert loads) are reduced by the control plane:
// they are a few numbers in host memory, whatever memory the comm plugin works on.
#define _GNU_SOURCE
#include "train.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "data.h"
#include "dsmoe/rng.h"
#include "memplan.h"
#include "model.h"
#include "optimizer.h"

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
    dsmoe_optimizer *opt;
    dsmoe_dataset *data;
    int B, T, accum;          // micro-batch sequences per rank, sequence length, micro-steps per step
    int32_t *window;          // (T+1) host
    int32_t *inputs, *targets; // (B*T) host
    int64_t *loads;           // (n_moe, max E) kept tokens per expert over the step, all ranks
    int max_e;
    FILE *metrics;
    char ckpt_dir[1200];
    int rank;
} trainer;

// Statistics of one step or evaluation, summed over micro-batches and ranks.
typedef struct step_stats {
    double loss_sum, tokens, aux_sum, micro_count, routed, dropped;
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
    double v[6] = {st->loss_sum, st->tokens, st->aux_sum, st->micro_count, st->routed, st->dropped};
    DSMOE_TRY(dsmoe_ctl_allreduce_f64(tr->rt->world_ctl, v, 6, err));
    *st = (step_stats){v[0], v[1], v[2], v[3], v[4], v[5]};
    return DSMOE_OK;
}

static void add_forward(step_stats *st, const dsmoe_forward_result *r) {
    st->loss_sum += r->loss_sum;
    st->tokens += r->tokens;
    st->aux_sum += r->aux_sum;
    st->micro_count += 1;
    st->routed += (double)r->routed;
    st->dropped += (double)r->dropped;
}

// Mean validation loss over eval_batches global batches of the validation split.
static dsmoe_status evaluate(trainer *tr, double *loss, dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    step_stats st = {0};
    for (int batch = 0; batch < c->eval_batches; batch++) {
        for (int j = 0; j < tr->accum; j++) {
            uint64_t pos = (uint64_t)(j * tr->rt->world_size + tr->rt->world_rank) * (uint64_t)tr->B;
            DSMOE_TRY(load_micro_batch(tr, DSMOE_SPLIT_VALID, (uint64_t)batch * c->batch + pos, err));
            dsmoe_forward_result r;
            DSMOE_TRY(dsmoe_model_forward(tr->model, tr->inputs, tr->targets, 0, 0, pos * (uint64_t)tr->T, &r, err));
            add_forward(&st, &r);
        }
    }
    DSMOE_TRY(reduce_stats(tr, &st, err));
    *loss = st.loss_sum / st.tokens;
    return DSMOE_OK;
}

static void metrics_header(trainer *tr) {
    if (!tr->metrics) return;
    fprintf(tr->metrics, "step,loss,aux_loss,lr,grad_norm,tokens_per_s,dropped_frac,elapsed_s,valid_loss");
    for (int i = 0; i < tr->cfg->n_moe_layers; i++) {
        fprintf(tr->metrics, ",moe%d_capacity,moe%d_drop", i, i);
        for (int e = 0; e < tr->cfg->experts[i]; e++) fprintf(tr->metrics, ",moe%d_load_e%d", i, e);
    }
    fprintf(tr->metrics, "\n");
}

static void metrics_row(trainer *tr, int step, const step_stats *st, float lr, double gnorm, double tok_s,
                        double elapsed, double valid) {
    if (!tr->metrics) return;
    fprintf(tr->metrics, "%d,%.9g,%.9g,%.6e,%.9g,%.1f,%.6f,%.3f,", step, st->loss_sum / st->tokens,
            st->aux_sum / st->micro_count, lr, gnorm, tok_s, st->routed > 0 ? st->dropped / st->routed : 0.0, elapsed);
    if (!isnan(valid)) fprintf(tr->metrics, "%.9g", valid);
    for (int i = 0; i < tr->cfg->n_moe_layers; i++) {
        const dsmoe_moe_stats *ms = dsmoe_model_moe_stats(tr->model, i);
        long kept = 0;
        for (int e = 0; e < tr->cfg->experts[i]; e++) kept += tr->loads[i * tr->max_e + e];
        double routed_layer = st->routed / tr->cfg->n_moe_layers;
        fprintf(tr->metrics, ",%d,%.6f", ms->capacity, routed_layer > 0 ? 1.0 - kept / routed_layer : 0.0);
        for (int e = 0; e < tr->cfg->experts[i]; e++)
            fprintf(tr->metrics, ",%.5f", kept ? (double)tr->loads[i * tr->max_e + e] / kept : 0.0);
    }
    fprintf(tr->metrics, "\n");
    fflush(tr->metrics);
}

static void format_hms(double s, char *buf, size_t len) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, len, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else snprintf(buf, len, "%ld:%02ld", t / 60, t % 60);
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
    memset(st, 0, sizeof *st);
    memset(tr->loads, 0, sizeof(int64_t) * (size_t)(c->n_moe_layers ? c->n_moe_layers : 1) * (size_t)tr->max_e);
    DSMOE_TRY(dsmoe_model_zero_grads(tr->model, err));
    for (int j = 0; j < tr->accum; j++) {
        uint64_t pos = (uint64_t)(j * world + rt->world_rank) * (uint64_t)tr->B; // sample position in the step
        DSMOE_TRY(load_micro_batch(tr, DSMOE_SPLIT_TRAIN, first_sample + pos, err));
        dsmoe_forward_result r;
        DSMOE_TRY(dsmoe_model_forward(tr->model, tr->inputs, tr->targets, 1, step_seed, pos * (uint64_t)tr->T, &r, err));
        add_forward(st, &r);
        for (int i = 0; i < c->n_moe_layers; i++) {
            const dsmoe_moe_stats *ms = dsmoe_model_moe_stats(tr->model, i);
            for (int e = 0; e < c->experts[i]; e++) tr->loads[i * tr->max_e + e] += ms->expert_load[e];
        }
        dsmoe_model_set_reduce_in_backward(tr->model, j == tr->accum - 1);
        DSMOE_TRY(dsmoe_model_backward(tr->model, dloss, daux, err));
    }
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
    if (!tr->window || !tr->inputs || !tr->targets || !tr->loads) return DSMOE_ERR_NOMEM;
    dsmoe_dataset_options dopt = {
        .source = c->data_source, .path = c->data_path, .vocab = c->vocab, .seq_len = c->seq_len,
        .valid_fraction = c->valid_fraction, .seed = c->data_seed ? c->data_seed : c->seed,
        .synthetic_sources = c->synthetic_sources, .synthetic_branching = c->synthetic_branching,
    };
    // Model creation is collective: a data file that fails on some ranks is agreed on first.
    DSMOE_TRY(dsmoe_errors_agree(dsmoe_dataset_open(&dopt, &tr->data, err), err));
    DSMOE_TRY(dsmoe_model_create(c, rt, tr->B, &tr->model, err));
    DSMOE_TRY(dsmoe_optimizer_create(tr->model, c->zero_stage, &tr->opt, err));
    if (c->checkpoint_dir[0]) snprintf(tr->ckpt_dir, sizeof tr->ckpt_dir, "%s", c->checkpoint_dir);
    else snprintf(tr->ckpt_dir, sizeof tr->ckpt_dir, "%s/checkpoints", c->output_dir);
    return DSMOE_OK;
}

static void close_run(trainer *tr) {
    dsmoe_optimizer_free(tr->opt);
    dsmoe_model_free(tr->model);
    dsmoe_dataset_close(tr->data);
    if (tr->metrics) fclose(tr->metrics);
    free(tr->window);
    free(tr->inputs);
    free(tr->targets);
    free(tr->loads);
}

// Starts fresh, or loads checkpoint.resume ("auto": the newest in the checkpoint dir, if any).
static dsmoe_status start_position(trainer *tr, dsmoe_train_position *pos, int *resumed, dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    char path[4096] = "";
    *resumed = 0;
    if (strcmp(c->resume, "auto") == 0) DSMOE_TRY(dsmoe_checkpoint_find_latest(tr->ckpt_dir, path, sizeof path, err));
    else if (c->resume[0]) snprintf(path, sizeof path, "%s", c->resume);
    if (!path[0]) {
        if (c->mode == DSMOE_MODE_EVAL)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                 "run.mode = eval needs a checkpoint: set checkpoint.resume to a file or to auto "
                                 "(none found in %s)", tr->ckpt_dir);
        *pos = (dsmoe_train_position){.step = 0, .next_sample = 0, .seed = c->seed};
        return dsmoe_model_init_params(tr->model, c->seed, err);
    }
    DSMOE_TRY(dsmoe_checkpoint_load(tr->model, c->mode == DSMOE_MODE_TRAIN ? tr->opt : NULL, c, path, pos, err));
    if (tr->rank == 0) printf("resumed from %s at step %d (next sample %" PRIu64 ")\n", path, pos->step, pos->next_sample);
    *resumed = 1;
    return DSMOE_OK;
}

static dsmoe_status run(trainer *tr, const char *config_text, dsmoe_train_result *res, dsmoe_err *err) {
    const dsmoe_config *c = tr->cfg;
    dsmoe_train_position pos;
    int resumed;
    DSMOE_TRY(dsmoe_errors_agree(start_position(tr, &pos, &resumed, err), err));
    res->loss_bound = dsmoe_dataset_loss_bound(tr->data);
    res->valid_loss = NAN;
    if (tr->rank == 0) {
        printf("data: %s\n", dsmoe_dataset_describe(tr->data));
        if (res->loss_bound >= 0) printf("data: achievable loss bound %.4f nats/token\n", res->loss_bound);
        printf("model: %zu parameters (%zu on this rank), %d MoE layers, micro-batch %d x %d tokens, %d micro-steps "
               "per step\n", dsmoe_model_global_params(tr->model), dsmoe_model_local_params(tr->model),
               c->n_moe_layers, tr->B, tr->T, tr->accum);
    }
    // Memory as dsmoe --plan predicts it (core/memplan.h): the same numbers whether planned or running.
    dsmoe_mem_estimate mem;
    dsmoe_err mem_err = {0};
    if (tr->rank == 0 &&
        dsmoe_mem_estimate_rank_for(c, tr->rt->world_size, 0, tr->rt->node_ranks, tr->rt->kern, &mem, &mem_err) ==
            DSMOE_OK) {
        double mib = 1.0 / 1048576.0;
        printf("memory per rank (rank 0): parameters %.1f MiB, gradients %.1f MiB, AdamW state %.1f MiB (%s) + "
               "%.1f MiB ZeRO buffers, activations and scratch %.1f MiB, MoE buffers %.1f MiB, total %.1f MiB (peak "
               "%.1f MiB; dsmoe --plan gives the details)\n", mem.param_bytes * mib, mem.grad_bytes * mib,
               mem.optimizer_bytes * mib,
               c->zero_stage ? "ZeRO-1: sharded over the data-parallel ranks" : "ZeRO off: full copy per rank",
               mem.optimizer_scratch_bytes * mib, (mem.activation_bytes + mem.token_bytes) * mib,
               (mem.moe_buffer_bytes + mem.moe_router_bytes + mem.exchange_bytes) * mib, mem.total_bytes * mib,
               mem.peak_bytes * mib);
    }
    if (tr->rank == 0 && c->n_moe_layers > 0 && c->drop_tokens)
        printf("moe: capacity is computed per rank and micro-batch from its %d tokens (C = %d on layer 0 when "
               "training), as in DeepSpeed: another rank count or train.micro_batch drops other tokens; "
               "moe.drop_tokens = false gives the same results on any layout\n",
               tr->B * tr->T, dsmoe_config_capacity(c, tr->B * tr->T, c->experts[0], 1));
    if (c->mode == DSMOE_MODE_EVAL) {
        DSMOE_TRY(evaluate(tr, &res->valid_loss, err));
        if (tr->rank == 0) printf("eval: validation loss %.4f over %d batches\n", res->valid_loss, c->eval_batches);
        res->steps_done = pos.step;
        return DSMOE_OK;
    }
    if (tr->rank == 0) {
        char path[2048];
        DSMOE_TRY(dsmoe_mkdir_p(c->output_dir, err));
        snprintf(path, sizeof path, "%s/resolved.deck", c->output_dir);
        DSMOE_TRY(dsmoe_write_file_atomic(path, config_text, strlen(config_text), err));
        if (c->metrics_file[0]) snprintf(path, sizeof path, "%s", c->metrics_file);
        else snprintf(path, sizeof path, "%s/metrics.csv", c->output_dir);
        tr->metrics = fopen(path, resumed ? "a" : "w");
        if (!tr->metrics) return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot open metrics file %s", path);
        if (!resumed) metrics_header(tr);
    }
    double t_start = dsmoe_now_seconds(), t_last = t_start;
    int first = pos.step, logged_from = pos.step;
    for (int step = pos.step; step < c->steps; step++) {
        step_stats st;
        double gnorm;
        DSMOE_TRY(train_step(tr, step, pos.next_sample, &st, &gnorm, err));
        pos.step = step + 1;
        pos.next_sample += (uint64_t)c->batch;
        double loss = st.loss_sum / st.tokens;
        res->last_loss = loss;
        res->last_aux = st.aux_sum / st.micro_count;
        if (res->loss_history) res->loss_history[step] = loss;
        int last = pos.step == c->steps;
        double valid = NAN;
        if ((c->eval_every > 0 && pos.step % c->eval_every == 0) || last) {
            DSMOE_TRY(evaluate(tr, &valid, err));
            res->valid_loss = valid;
        }
        if (pos.step % c->log_every == 0 || last || !isnan(valid)) {
            double now = dsmoe_now_seconds(), elapsed = now - t_start;
            double tok_s = (double)(pos.step - logged_from) * c->batch * tr->T / (now - t_last);
            double eta = elapsed / (pos.step - first) * (c->steps - pos.step);
            t_last = now;
            logged_from = pos.step;
            if (tr->rank == 0) {
                char el[32], et[32];
                format_hms(elapsed, el, sizeof el);
                format_hms(eta, et, sizeof et);
                printf("step %*d/%d | loss %.4f", (int)snprintf(NULL, 0, "%d", c->steps), pos.step, c->steps, loss);
                if (res->loss_bound >= 0) printf(" (bound %.4f)", res->loss_bound);
                if (c->n_moe_layers) printf(" | aux %.4f | drop %5.2f%%", res->last_aux, 100.0 * st.dropped / st.routed);
                printf(" | lr %.2e | gnorm %.3f | %.0f tok/s | %s elapsed | ETA %s", dsmoe_lr_at(c, step), gnorm, tok_s, el, et);
                if (!isnan(valid)) printf(" | valid %.4f", valid);
                printf("\n");
                fflush(stdout);
            }
            metrics_row(tr, pos.step, &st, dsmoe_lr_at(c, step), gnorm, tok_s, elapsed, valid);
        }
        if ((c->checkpoint_every > 0 && pos.step % c->checkpoint_every == 0) || (last && c->checkpoint_final)) {
            DSMOE_TRY(dsmoe_checkpoint_save(tr->model, tr->opt, c, config_text, &pos, tr->ckpt_dir, c->checkpoint_keep,
                                            res->checkpoint, sizeof res->checkpoint, err));
            if (tr->rank == 0) printf("checkpoint: %s\n", res->checkpoint);
        }
    }
    res->steps_done = pos.step;
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
