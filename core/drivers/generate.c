// core/drivers/generate.c: see generate.h. Layout: the run's inputs (tokenizer, prompts, checkpoint,
// output) checked before any work, then one sequence's life (admit, feed, take a token, finish), then
// the step loop, then the results (gathered, written, summarised).
#include "generate.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "control.h"
#include "dsmoe/rng.h"
#include "generate_output.h"
#include "generate_partial.h"
#include "model.h"
#include "model_infer.h"
#include "plan.h"      // dsmoe_plan_bytes
#include "preflight.h" // dsmoe_probe_dir, dsmoe_checkpoint_dir_of
#include "prompts.h"
#include "signals.h"
#include "tokenizer.h"
#include "watchdog.h"

// One of this rank's prompts.
typedef struct gen_seq {
    int index;               // in the prompt file (its sampling stream and its place in the output)
    const dsmoe_prompt *p;
    int slot;                // running: its KV-cache slot; -1 before and after
    int fed;                 // prompt tokens fed so far
    int32_t next;            // the token the next step feeds once the prompt is in
    dsmoe_sampling_params sp;
    dsmoe_completion out;    // tokens, bytes, latencies, finish reason (generate_output.h)
    double t_admit, t_last;
} gen_seq;

typedef struct generator {
    const dsmoe_config *cfg;
    dsmoe_runtime *rt;
    int rank, ranks;
    int W, t;                    // tensor-slicing width and this rank's part (its group holds the same prompts)
    int data_rank, data_ranks;   // which share of the prompts: slot / W of ranks / W
    int context;                 // positions per sequence
    int vocab_drawn;             // sampling draws ids [0, vocab_drawn): those the tokenizer decodes
    int32_t eos;                 // the id that ends a completion; -1: none
    dsmoe_tokenizer *tok;
    dsmoe_prompt_list *prompts;  // the whole file (every rank reads it)
    char output[4096], checkpoint[4096];
    char partial_path[4200];     // <output>.partial: where a stop writes, what generate.resume reads
    dsmoe_partial partial;       // generate.resume: the stopped run's finished prompts (prompt_count 0: none)
    int stop_signal, stop_ranks; // a run.signals signal stopped the run: which, and how many ranks got one
    int64_t done_all;            // prompts finished by this run on every rank, as of the last step
    int step;                    // the checkpoint's
    double t_start, t_saved;     // the step loop's start; the last generate.save_every save
    dsmoe_model *model;
    dsmoe_infer *inf;
    gen_seq *mine;               // this rank's prompts, in file order
    int n_mine, next_mine;       // next_mine: the first not yet admitted
    int *slot_owner;             // (generate.batch) index into mine, or -1
    dsmoe_infer_times times;
    long tokens_out;             // completion tokens generated here
    int done;                    // prompts finished here
} generator;

// ----------------------------------------------------------------------------------------------------
// inputs, checked before any work

// generate.stop: C escapes \n \t \r \\ \0xx are not needed; other backslashes are an error.
static dsmoe_status unescape_stop(const char *in, char *out, size_t cap, size_t *len, dsmoe_err *err) {
    size_t n = 0;
    for (const char *p = in; *p; p++) {
        char c = *p;
        if (c == '\\') {
            p++;
            if (*p == 'n') c = '\n';
            else if (*p == 't') c = '\t';
            else if (*p == 'r') c = '\r';
            else if (*p == '\\') c = '\\';
            else
                return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.stop = \"%s\": unknown escape '\\%c' (expected "
                                     "\\n, \\t, \\r or \\\\)", in, *p ? *p : '0');
        }
        if (n + 1 >= cap) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.stop is too long");
        out[n++] = c;
    }
    out[n] = 0;
    *len = n;
    return DSMOE_OK;
}

static dsmoe_status open_text(generator *g, dsmoe_err *err) {
    const dsmoe_config *c = g->cfg;
    int bpe = c->gen_tokenizer == DSMOE_TOKENIZER_BPE || (c->gen_tokenizer == DSMOE_TOKENIZER_AUTO && c->gen_vocab_file[0]);
    if (bpe) {
        if (!c->gen_vocab_file[0] || !c->gen_merges_file[0])
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.tokenizer = bpe needs generate.vocab_file and "
                                 "generate.merges_file (GPT-2 vocab.json and merges.txt)");
        DSMOE_TRY(dsmoe_tokenizer_open_bpe(c->gen_vocab_file, c->gen_merges_file, c->vocab, &g->tok, err));
    } else if (c->gen_tokenizer == DSMOE_TOKENIZER_IDS || (c->gen_tokenizer == DSMOE_TOKENIZER_AUTO && c->vocab < 256)) {
        DSMOE_TRY(dsmoe_tokenizer_open_ids(c->vocab, &g->tok, err)); // (auto: no text tokenizer fits the model)
    } else {
        DSMOE_TRY(dsmoe_tokenizer_open_bytes(c->vocab, &g->tok, err));
    }
    if (!c->gen_prompts[0])
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "run.mode = generate needs generate.prompts (a prompt file)");
    char stop[256];
    size_t stop_len = 0;
    DSMOE_TRY(unescape_stop(c->gen_stop, stop, sizeof stop, &stop_len, err));
    dsmoe_prompt_defaults d = {
        .max_new_tokens = c->gen_max_new_tokens, .temperature = c->gen_temperature, .top_k = c->gen_top_k,
        .top_p = c->gen_top_p, .seed = c->gen_seed ? c->gen_seed : c->seed, .stop = stop_len ? stop : NULL,
        .stop_len = stop_len,
    };
    int format = c->gen_prompt_format == DSMOE_PROMPTS_TEXT    ? DSMOE_PROMPT_FILE_TEXT
                 : c->gen_prompt_format == DSMOE_PROMPTS_JSONL ? DSMOE_PROMPT_FILE_JSONL
                                                               : DSMOE_PROMPT_FILE_AUTO;
    return dsmoe_prompts_read(c->gen_prompts, format, g->tok, &d, g->context, &g->prompts, err);
}

// generate.resume: the finished prompts of the stopped run in <output>.partial, when there is one.
static dsmoe_status open_partial(generator *g, dsmoe_err *err) {
    snprintf(g->partial_path, sizeof g->partial_path, "%s.partial", g->output);
    if (!g->cfg->gen_resume || access(g->partial_path, F_OK) != 0) return DSMOE_OK; // (said at the start)
    DSMOE_TRY(dsmoe_partial_read(g->partial_path, g->prompts, g->cfg->gen_prompts, &g->partial, err));
    if (g->rank != 0) { // only rank 0 writes the kept lines; the others need to know which prompts are done
        free(g->partial.lines);
        g->partial.lines = NULL, g->partial.lines_len = 0;
    }
    return DSMOE_OK;
}

static int same_file(const char *a, const char *b) {
    struct stat x, y;
    return stat(a, &x) == 0 && stat(b, &y) == 0 && x.st_dev == y.st_dev && x.st_ino == y.st_ino;
}

// checkpoint.resume: a file, or auto = the newest that verifies in checkpoint.dir; when resuming a stopped
// generation, the checkpoint it was generating with (auto takes it, another file is refused).
static dsmoe_status find_checkpoint(generator *g, dsmoe_err *err) {
    const dsmoe_config *c = g->cfg;
    if (g->partial.prompt_count) {
        if (strcmp(c->resume, "auto") != 0 && !same_file(c->resume, g->partial.checkpoint))
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.resume: %s was generated with checkpoint %s, and "
                                 "checkpoint.resume %s%s%s (set checkpoint.resume = auto to go on with the stopped "
                                 "run's, or remove %s to start over)", g->partial_path, g->partial.checkpoint,
                                 c->resume[0] ? "= " : "is not set", c->resume,
                                 c->resume[0] ? " is another file" : "", g->partial_path);
        snprintf(g->checkpoint, sizeof g->checkpoint, "%s", g->partial.checkpoint);
        return DSMOE_OK;
    }
    char dir[2048];
    dsmoe_checkpoint_dir_of(c, dir, sizeof dir);
    if (strcmp(c->resume, "auto") == 0) { // rank 0 chooses, reading the candidates; the caller broadcasts it
        if (g->rank != 0) return DSMOE_OK;
        DSMOE_TRY(dsmoe_checkpoint_find_latest(dir, g->checkpoint, sizeof g->checkpoint, err));
    } else {
        snprintf(g->checkpoint, sizeof g->checkpoint, "%s", c->resume);
    }
    if (!g->checkpoint[0])
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "run.mode = generate needs a checkpoint: set checkpoint.resume "
                             "to a file or to auto (%s)", c->resume[0] ? "none verifies in the checkpoint directory"
                                                                      : "it is empty");
    return DSMOE_OK;
}

// Rank 0: the output's directory exists and takes a file before any work.
static dsmoe_status probe_output(generator *g, dsmoe_err *err) {
    const dsmoe_config *c = g->cfg;
    if (c->gen_output[0]) snprintf(g->output, sizeof g->output, "%s", c->gen_output);
    else snprintf(g->output, sizeof g->output, "%s/generations.jsonl", c->output_dir);
    if (g->rank != 0) return DSMOE_OK;
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", g->output);
    char *slash = strrchr(dir, '/');
    if (slash == dir) slash[1] = '\0';
    else if (slash) *slash = '\0';
    else snprintf(dir, sizeof dir, ".");
    return dsmoe_probe_dir(dir, c->gen_output[0] ? "generate.output's directory" : "run.output_dir", err);
}

// ----------------------------------------------------------------------------------------------------
// one sequence's life

static void admit(generator *g, gen_seq *q, int slot, double now) {
    q->slot = slot;
    q->fed = 0;
    q->t_admit = q->t_last = now;
    g->slot_owner[slot] = (int)(q - g->mine);
    dsmoe_infer_reset(g->inf, slot);
}

static void finish(generator *g, gen_seq *q, const char *reason) {
    q->out.finish = reason;
    g->slot_owner[q->slot] = -1;
    q->slot = -1;
    g->done++;
}

// A new token of q: latency, its bytes, the stop conditions (q finishes when one holds).
static dsmoe_status take_token(generator *g, gen_seq *q, int32_t token, double now, dsmoe_err *err) {
    const dsmoe_prompt *p = q->p;
    double ms = 1e3 * (now - q->t_last);
    q->t_last = now;
    if (q->out.n_tokens == 0) q->out.ttft_ms = 1e3 * (now - q->t_admit);
    DSMOE_TRY(dsmoe_completion_add(&q->out, token, ms, g->tok, err));
    g->tokens_out++;
    q->next = token;
    long n = (long)q->out.n_tokens;
    if (token == g->eos) dsmoe_completion_end_token(&q->out), finish(g, q, "eos");
    else if (dsmoe_completion_stop(&q->out, p)) finish(g, q, "stop");
    else if (n >= p->max_new_tokens) finish(g, q, "length");
    else if (p->n_tokens + n >= g->context) finish(g, q, "context"); // no position for the next token
    return DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// the results

// Collective. COMPLETE: every prompt into the output. STOP: the finished ones into <output>.partial (a
// signal stopped the run). SAVE: the same, while the run goes on (generate.save_every), with one line
// instead of the summary.
enum { WRITE_COMPLETE, WRITE_STOP, WRITE_SAVE };

static dsmoe_status write_results(generator *g, int what, dsmoe_err *err) {
    const dsmoe_config *c = g->cfg;
    dsmoe_status s = DSMOE_OK;
    dsmoe_buf header = {0};
    if (what != WRITE_COMPLETE) { // the checkpoint by its absolute path: a requeued job may start elsewhere
        char *ckpt = realpath(g->checkpoint, NULL);
        dsmoe_partial_header(&header, ckpt ? ckpt : g->checkpoint, g->step, c->gen_prompts, g->prompts->n);
        free(ckpt);
    }
    dsmoe_generation_report rep = {
        .path = g->output, .partial_path = g->partial_path, .prompts = g->prompts, .tok = g->tok,
        .elapsed = dsmoe_now_seconds() - g->t_start, .times = g->times, .profiled = c->gen_profile,
        .world = g->rt->world_ctl, .partial = what != WRITE_COMPLETE, .quiet = what == WRITE_SAVE, .header = header.p,
        .kept = g->rank == 0 ? g->partial.lines : NULL, .kept_len = g->partial.lines_len,
    };
    if (header.oom) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    rep.completions = malloc((size_t)(g->n_mine ? g->n_mine : 1) * sizeof *rep.completions);
    rep.indices = malloc((size_t)(g->n_mine ? g->n_mine : 1) * sizeof *rep.indices);
    if (!rep.completions || !rep.indices) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    for (int i = 0; s == DSMOE_OK && i < g->n_mine; i++) {
        rep.completions[i] = &g->mine[i].out;
        rep.indices[i] = g->mine[i].index;
    }
    rep.n = g->t == 0 ? g->n_mine : 0; // a tensor group's ranks hold the same completions: one reports
    s = dsmoe_errors_agree(s, err);
    if (s == DSMOE_OK) s = dsmoe_generation_write(&rep, err);
    free(rep.completions);
    free(rep.indices);
    free(header.p);
    return s;
}

// ----------------------------------------------------------------------------------------------------
// the step loop

// This step's call: free slots take waiting prompts; every running sequence feeds its next token, or
// the next chunk of its prompt within generate.prefill_tokens. *busy: work is left here.
static int build_call(generator *g, int *slot, int *count, int32_t *tokens, int *rows, int *busy, double now) {
    const dsmoe_config *c = g->cfg;
    for (int s = 0; s < c->gen_batch && g->next_mine < g->n_mine; s++)
        if (g->slot_owner[s] < 0) admit(g, &g->mine[g->next_mine++], s, now);
    int n = 0, budget = c->gen_prefill_tokens;
    *rows = 0;
    for (int s = 0; s < c->gen_batch; s++) {
        if (g->slot_owner[s] < 0) continue;
        gen_seq *q = &g->mine[g->slot_owner[s]];
        int k;
        if (q->fed < q->p->n_tokens) {
            k = q->p->n_tokens - q->fed;
            if (k > budget) k = budget;
            if (k == 0) continue; // its turn comes next step
            budget -= k;
            memcpy(tokens + *rows, q->p->tokens + q->fed, (size_t)k * sizeof(int32_t));
        } else {
            k = 1;
            tokens[*rows] = q->next;
        }
        slot[n] = s;
        count[n++] = k;
        *rows += k;
    }
    *busy = n > 0 || g->next_mine < g->n_mine;
    return n;
}

// Ranks step together: each step every rank learns the largest row count (the MoE capacity) and
// whether any work is left anywhere, with the progress counters on the way.
typedef struct step_agreement {
    int64_t rows, busy, done, tokens;
    int64_t signo; // this rank's run.signals signal; agreed: the lowest-numbered any rank got
    int64_t signalled; // agreed: how many ranks got one
    int64_t save;  // rank 0's: save the finished completions now (generate.save_every)
} step_agreement;

static dsmoe_status agree(generator *g, step_agreement *mine, step_agreement *all, dsmoe_err *err) {
    step_agreement *v = malloc((size_t)g->ranks * sizeof *v);
    if (!v) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    dsmoe_status s = dsmoe_ctl_allgather(g->rt->world_ctl, mine, v, sizeof *mine, err);
    *all = (step_agreement){0};
    for (int r = 0; s == DSMOE_OK && r < g->ranks; r++) {
        if (v[r].rows > all->rows) all->rows = v[r].rows;
        all->busy += v[r].busy;
        all->done += v[r].done;
        all->tokens += v[r].tokens;
        all->signalled += v[r].signo != 0;
        if (v[r].signo && (!all->signo || v[r].signo < all->signo)) all->signo = v[r].signo;
    }
    all->save = s == DSMOE_OK ? v[0].save : 0;
    all->done /= g->W, all->tokens /= g->W; // a tensor group's ranks count the same prompts
    free(v);
    return s;
}

static dsmoe_status run_steps(generator *g, dsmoe_err *err) {
    const dsmoe_config *c = g->cfg;
    int B = c->gen_batch, R = B + c->gen_prefill_tokens;
    int *slot = malloc((size_t)B * sizeof *slot), *count = malloc((size_t)B * sizeof *count);
    int32_t *tokens = malloc((size_t)R * sizeof *tokens), *drawn = malloc((size_t)B * sizeof *drawn);
    dsmoe_sampling_params *sp = malloc((size_t)B * sizeof *sp);
    uint64_t *counters = malloc((size_t)B * sizeof *counters);
    dsmoe_status s = slot && count && tokens && drawn && sp && counters
                         ? DSMOE_OK
                         : dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    double t_start = g->t_start, t_log = t_start;
    g->t_saved = t_start;
    long steps = 0;
    while (s == DSMOE_OK) {
        int rows, busy, n = build_call(g, slot, count, tokens, &rows, &busy, dsmoe_now_seconds());
        // Rank 0's clock decides when the finished completions are saved (generate.save_every).
        int save = g->rank == 0 && c->gen_save_every > 0 && dsmoe_now_seconds() - g->t_saved >= c->gen_save_every;
        step_agreement me = {rows, busy, g->done, g->tokens_out, dsmoe_signals_pending(), 0, save}, all = {0};
        dsmoe_watchdog_beat("generation step", steps + 1);
        if ((s = agree(g, &me, &all, err)) != DSMOE_OK) break;
        g->done_all = all.done;
        if (all.busy == 0) break; // done: a signal now changes nothing
        if (all.signalled) { // every rank stops at this step: the finished completions are written
            g->stop_signal = me.signo ? (int)me.signo : (int)all.signo;
            g->stop_ranks = (int)all.signalled;
            break;
        }
        if (all.save) {
            if ((s = write_results(g, WRITE_SAVE, err)) != DSMOE_OK) break;
            g->t_saved = dsmoe_now_seconds();
        }
        s = dsmoe_infer_forward(g->inf, n, slot, count, tokens, all.rows > 0 ? (int)all.rows : 1,
                                c->gen_capacity_factor, c->gen_profile ? &g->times : NULL, err);
        if (s != DSMOE_OK) break;
        // Sample for every row (cheap); keep the draws of sequences whose prompt is now in.
        for (int i = 0; i < n; i++) {
            gen_seq *q = &g->mine[g->slot_owner[slot[i]]];
            sp[i] = q->sp;
            counters[i] = (uint64_t)q->out.n_tokens;
        }
        if ((s = dsmoe_infer_sample(g->inf, sp, counters, g->vocab_drawn, drawn, err)) != DSMOE_OK) break;
        double now = dsmoe_now_seconds();
        for (int i = 0; i < n; i++) {
            gen_seq *q = &g->mine[g->slot_owner[slot[i]]];
            if (q->fed < q->p->n_tokens) {
                q->fed += count[i];
                if (q->fed < q->p->n_tokens) continue; // more of the prompt next step
            }
            if ((s = take_token(g, q, drawn[i], now, err)) != DSMOE_OK) break;
        }
        if (s != DSMOE_OK) break;
        steps++;
        if (g->rank == 0 && (now - t_log >= 10.0 || steps % (c->log_every * 10) == 0)) {
            // (prompts a stopped run finished count as done; the rate is this run's)
            double el = now - t_start, rate = all.done > 0 ? el / (double)all.done : 0.0;
            int64_t done = g->partial.n_done + all.done;
            char e1[32], e2[32];
            dsmoe_format_hms(el, e1, sizeof e1);
            dsmoe_format_hms(rate * (double)(g->prompts->n - done), e2, sizeof e2);
            printf("generate: %" PRId64 "/%d prompts | %" PRId64 " tokens | %.1f tokens/s | %s elapsed | ETA %s\n",
                   done, g->prompts->n, all.tokens, (double)all.tokens / el, e1, all.done ? e2 : "?");
            fflush(stdout);
            t_log = now;
        }
    }
    free(slot);
    free(count);
    free(tokens);
    free(drawn);
    free(sp);
    free(counters);
    return s;
}

// ----------------------------------------------------------------------------------------------------
// the run

static dsmoe_status setup(generator *g, dsmoe_err *err) {
    const dsmoe_config *c = g->cfg;
    g->context = c->gen_context ? c->gen_context : c->seq_len;
    if (g->context > c->seq_len)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.context = %d exceeds model.seq_len = %d (the model has "
                             "no position embedding past it)", c->gen_context, c->seq_len);
    DSMOE_TRY(open_text(g, err));
    int holes = 0;
    g->vocab_drawn = dsmoe_tokenizer_id_end(g->tok, &holes);
    if (holes > 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.vocab_file = %s leaves %d ids below its highest (%d) "
                             "without a token: generation could draw one and not decode it", c->gen_vocab_file, holes,
                             g->vocab_drawn - 1);
    g->eos = c->gen_eos_token >= 0 ? c->gen_eos_token : dsmoe_tokenizer_eot(g->tok);
    if (g->eos >= g->vocab_drawn)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.eos_token = %d: generation draws ids below %d only (%s "
                             "tokenizer)", c->gen_eos_token, g->vocab_drawn, dsmoe_tokenizer_describe(g->tok));
    DSMOE_TRY(probe_output(g, err));
    DSMOE_TRY(open_partial(g, err));
    DSMOE_TRY(find_checkpoint(g, err));
    // This rank's share of the prompts left: every prompt, unless a stopped run finished some.
    int n = g->prompts->n, left = n - g->partial.n_done;
    int *todo = malloc((size_t)(left ? left : 1) * sizeof *todo);
    if (!todo) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    for (int i = 0, k = 0; i < n; i++)
        if (!g->partial.done || !g->partial.done[i]) todo[k++] = i;
    g->W = c->gen_tensor_parallel;
    g->t = g->rt->slot % g->W;
    g->data_rank = g->rt->slot / g->W;
    g->data_ranks = g->ranks / g->W;
    g->n_mine = left / g->data_ranks + (g->data_rank < left % g->data_ranks);
    g->mine = calloc((size_t)(g->n_mine ? g->n_mine : 1), sizeof *g->mine);
    g->slot_owner = malloc((size_t)c->gen_batch * sizeof *g->slot_owner);
    if (!g->mine || !g->slot_owner) return free(todo), dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    for (int s = 0; s < c->gen_batch; s++) g->slot_owner[s] = -1;
    for (int i = 0; i < g->n_mine; i++) {
        gen_seq *q = &g->mine[i];
        q->index = todo[g->data_rank + i * g->data_ranks];
        q->p = &g->prompts->items[q->index];
        q->slot = -1;
        // The prompt's stream: its own seed, else generate.seed keyed by its index in the file.
        uint64_t seed = q->p->has_seed ? q->p->seed : dsmoe_rng_key(q->p->seed, 0x6e7, (uint64_t)q->index, 0);
        q->sp = (dsmoe_sampling_params){.temperature = (float)q->p->temperature, .top_k = q->p->top_k,
                                        .top_p = (float)q->p->top_p, .seed = seed};
    }
    free(todo);
    return DSMOE_OK;
}

// generate.resume: the checkpoint must still be the stopped run's (the same file may have been rewritten).
static dsmoe_status check_resumed_step(const generator *g, int step, dsmoe_err *err) {
    if (!g->partial.prompt_count || step == g->partial.step) return DSMOE_OK;
    return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.resume: %s was generated with %s at step %d, which now "
                         "holds step %d (remove %s to start over)", g->partial_path, g->checkpoint, g->partial.step, step,
                         g->partial_path);
}

// Rank 0, before any work: what generate.resume found.
static void say_resumed(const generator *g) {
    if (g->rank != 0 || !g->cfg->gen_resume) return;
    if (g->partial.prompt_count)
        printf("generate: resuming %s: %d of %d prompts finished there, %d left\n", g->partial_path, g->partial.n_done,
               g->prompts->n, g->prompts->n - g->partial.n_done);
    else
        printf("generate: generate.resume: no %s, so every prompt is generated\n", g->partial_path);
}

static void teardown(generator *g) {
    for (int i = 0; i < g->n_mine; i++) dsmoe_completion_free(&g->mine[i].out);
    free(g->mine);
    free(g->slot_owner);
    dsmoe_infer_free(g->inf);
    dsmoe_model_free(g->model);
    dsmoe_prompts_free(g->prompts);
    dsmoe_tokenizer_free(g->tok);
    dsmoe_partial_free(&g->partial);
}

dsmoe_status dsmoe_generate_check(const dsmoe_config *c, dsmoe_runtime *rt, dsmoe_err *err) {
    generator g = {.cfg = c, .rt = rt, .rank = rt->world_rank, .ranks = rt->world_size};
    dsmoe_train_position pos = {0};
    dsmoe_status s = setup(&g, err);
    // Rank 0 verifies the checkpoint (its choice, with auto) for all.
    if (s == DSMOE_OK && g.rank == 0) s = dsmoe_checkpoint_verify(c, g.checkpoint, &pos, err);
    if (s == DSMOE_OK && g.rank == 0) s = check_resumed_step(&g, pos.step, err);
    s = dsmoe_ctl_checks_agree(rt->world_ctl, s, err);
    if (s == DSMOE_OK) say_resumed(&g);
    if (s == DSMOE_OK && g.rank == 0)
        printf("generate: %d prompts from %s (%s tokenizer), checkpoint %s verifies (step %d), output %s\n",
               g.prompts->n, c->gen_prompts, dsmoe_tokenizer_describe(g.tok), g.checkpoint, pos.step, g.output);
    teardown(&g);
    return s;
}

dsmoe_status dsmoe_generate_run(const dsmoe_config *c, const char *config_text, dsmoe_runtime *rt, int *stopped_signal,
                                dsmoe_err *err) {
    (void)config_text;
    *stopped_signal = 0;
    generator g = {.cfg = c, .rt = rt, .rank = rt->world_rank, .ranks = rt->world_size};
    // Everything that can fail on the inputs fails here, on every rank, before the model exists.
    dsmoe_status s = dsmoe_ctl_checks_agree(rt->world_ctl, setup(&g, err), err);
    if (s == DSMOE_OK) s = dsmoe_ctl_bcast(rt->world_ctl, g.checkpoint, sizeof g.checkpoint, err); // (auto)
    if (s == DSMOE_OK) say_resumed(&g);
    if (s == DSMOE_OK) s = dsmoe_model_create(c, rt, 0, &g.model, err); // parameters only
    dsmoe_train_position pos = {0};
    if (s == DSMOE_OK) {
        s = dsmoe_errors_agree(dsmoe_checkpoint_load(g.model, NULL, c, g.checkpoint, &pos, err), err);
        if (s == DSMOE_OK) s = check_resumed_step(&g, pos.step, err); // (the same on every rank)
        if (s == DSMOE_OK && g.rank == 0)
            printf("generate: %d prompts from %s, checkpoint %s (step %d), %s tokenizer, %d rank%s x %d sequences, "
                   "context %d\n", g.prompts->n, c->gen_prompts, g.checkpoint, pos.step, dsmoe_tokenizer_describe(g.tok),
                   g.ranks, g.ranks == 1 ? "" : "s", c->gen_batch, g.context);
    }
    // Tensor slicing: create copies this rank's slices, then the model frees the sliced weights whole (the
    // checkpoint's load is the peak); bfloat16: the weight matrices' bfloat16 copy is current, and their
    // float32 masters go. What a rank holds from then on is printed.
    size_t loaded = g.model ? dsmoe_model_bytes(g.model) : 0;
    if (s == DSMOE_OK)
        s = dsmoe_errors_agree(dsmoe_infer_create(g.model, c->gen_batch, g.context, c->gen_batch + c->gen_prefill_tokens,
                                                  g.W, dsmoe_tensor_moe_of(c), &g.inf, err), err);
    if (s == DSMOE_OK && c->precision == DSMOE_PRECISION_BF16)
        s = dsmoe_errors_agree(dsmoe_model_drop_gemm_masters(g.model, err), err);
    if (s == DSMOE_OK && g.rank == 0) {
        size_t held = dsmoe_model_bytes(g.model), slices = dsmoe_infer_slice_bytes(g.inf);
        printf("generate: parameters per rank %s (%s%s held whole", dsmoe_plan_bytes((double)(held + slices)),
               c->precision == DSMOE_PRECISION_BF16 ? "weight matrices as bfloat16: " : "", dsmoe_plan_bytes((double)held));
        if (g.W > 1) printf(", %s as this rank's 1/%d tensor slices", dsmoe_plan_bytes((double)slices), g.W);
        printf("), from %s at load\n", dsmoe_plan_bytes((double)loaded));
    }
    if (s == DSMOE_OK && g.rank == 0 && g.W > 1)
        printf("generate: tensor slicing over %d ranks (%d heads and %d FFN columns each), %d data-parallel groups%s\n",
               g.W, c->heads / g.W, c->ffn_hidden / g.W, g.data_ranks,
               !c->n_moe_layers ? ""
               : c->gen_expert_slicing ? ", expert-slicing (each expert's FFN split over the tensor group)"
               : c->gen_coordinated ? ", coordinated all-to-all (each tensor rank sends 1/width of the tokens, then the "
                                      "group all-gathers)"
                                    : ", every tensor rank sends all tokens to the experts");
    g.t_start = dsmoe_now_seconds();
    g.step = pos.step;
    if (s == DSMOE_OK) s = run_steps(&g, err);
    if (s == DSMOE_OK) s = write_results(&g, g.stop_signal ? WRITE_STOP : WRITE_COMPLETE, err);
    if (s == DSMOE_OK && g.stop_signal) {
        dsmoe_signals_stop_written(); // from here on a signal is ignored: the rank is only exiting
        *stopped_signal = g.stop_signal;
        if (g.rank == 0)
            printf("stopped: SIG%s after %" PRId64 " of %d prompts (%d of %d rank%s got a signal): the finished ones are "
                   "in %s; exit code 75; resume with generate.resume = true\n", dsmoe_signal_name(g.stop_signal),
                   g.partial.n_done + g.done_all, g.prompts->n, g.stop_ranks, g.ranks, g.ranks == 1 ? "" : "s",
                   g.partial_path);
        fflush(stdout);
    }
    teardown(&g);
    return s;
}
