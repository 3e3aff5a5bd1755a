// core/drivers/generate_output.c: see generate_output.h. Layout: a completion as it grows, then one
// output line, then the gather, the file and the summary on rank 0.
#include "generate_output.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "json.h" // dsmoe_buf, dsmoe_json_write_string

// ----------------------------------------------------------------------------------------------------
// a completion

static int grow(void **p, size_t elem, size_t need, size_t *cap) {
    if (need <= *cap) return 1;
    size_t n = *cap ? *cap : 16;
    while (n < need) n *= 2;
    void *q = realloc(*p, n * elem);
    if (!q) return 0;
    *p = q;
    *cap = n;
    return 1;
}

dsmoe_status dsmoe_completion_add(dsmoe_completion *c, int32_t token, double latency_ms, const dsmoe_tokenizer *tok,
                                  dsmoe_err *err) {
    const uint8_t *bytes;
    size_t len;
    DSMOE_TRY(dsmoe_tokenizer_token_bytes(tok, token, &bytes, &len, err));
    size_t cap_lat = c->cap_tokens;
    if (!grow((void **)&c->latency_ms, sizeof *c->latency_ms, c->n_tokens + 1, &cap_lat) ||
        !grow((void **)&c->tokens, sizeof *c->tokens, c->n_tokens + 1, &c->cap_tokens) ||
        !grow((void **)&c->text, 1, c->text_len + len + 1, &c->cap_text))
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory for a completion");
    c->tokens[c->n_tokens] = token;
    c->latency_ms[c->n_tokens++] = latency_ms;
    memcpy(c->text + c->text_len, bytes, len);
    c->text_len += len;
    c->text[c->text_len] = 0;
    c->last_len = len;
    return DSMOE_OK;
}

// The completion ends before the earliest match of any stop sequence: one token may complete several
// ("hell" completes "ll" and "he"), and the text must not keep one of them.
int dsmoe_completion_stop(dsmoe_completion *c, const dsmoe_prompt *p) {
    size_t cut = SIZE_MAX;
    for (int i = 0; i < p->n_stop; i++) {
        const char *s = p->stop[i];
        size_t n = p->stop_len[i];
        if (n == 0 || n > c->text_len) continue;
        // Earlier text held no stop sequence, so a match ends within the newest token's bytes.
        size_t first = c->text_len >= c->last_len + n - 1 ? c->text_len - c->last_len - n + 1 : 0;
        for (size_t start = first; start + n <= c->text_len && start < cut; start++)
            if (memcmp(c->text + start, s, n) == 0) {
                cut = start;
                break;
            }
    }
    if (cut == SIZE_MAX) return 0;
    c->text_len = cut;
    c->text[cut] = 0;
    return 1;
}

void dsmoe_completion_end_token(dsmoe_completion *c) {
    c->text_len -= c->last_len;
    c->last_len = 0;
    if (c->text) c->text[c->text_len] = 0;
}

void dsmoe_completion_free(dsmoe_completion *c) {
    free(c->tokens);
    free(c->text);
    free(c->latency_ms);
    memset(c, 0, sizeof *c);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double dsmoe_percentile(double *v, size_t n, double q) {
    if (n == 0) return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    double x = q * (double)(n - 1);
    size_t lo = (size_t)x;
    double f = x - (double)lo;
    return lo + 1 < n ? v[lo] * (1.0 - f) + v[lo + 1] * f : v[lo];
}

// ----------------------------------------------------------------------------------------------------
// one output line

static void put_str(dsmoe_buf *b, const char *s) { dsmoe_buf_put(b, s, strlen(s)); }

static void put_fmt(dsmoe_buf *b, const char *fmt, double v) {
    char tmp[64];
    int n = snprintf(tmp, sizeof tmp, fmt, v);
    dsmoe_buf_put(b, tmp, (size_t)n);
}

static void put_int(dsmoe_buf *b, long long v) {
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%lld", v);
    dsmoe_buf_put(b, tmp, (size_t)n);
}

// {"index", "id", "prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason",
//  "time_to_first_token_ms", "tokens", "token_latencies_ms"} and a newline.
static dsmoe_status put_line(dsmoe_buf *b, int index, const dsmoe_prompt *p, const dsmoe_completion *c,
                             const dsmoe_tokenizer *tok, dsmoe_err *err) {
    char *prompt_text = NULL;
    size_t prompt_len = 0;
    int text = dsmoe_tokenizer_has_text(tok); // else "prompt" and "completion" are null
    if (text) DSMOE_TRY(dsmoe_tokenizer_decode(tok, p->tokens, (size_t)p->n_tokens, &prompt_text, &prompt_len, err));
    put_str(b, "{\"index\":");
    put_int(b, index);
    put_str(b, ",\"id\":");
    if (p->id_is_string) dsmoe_json_write_string(b, p->id, strlen(p->id));
    else put_str(b, p->id);
    put_str(b, ",\"prompt\":");
    if (text) dsmoe_json_write_string(b, prompt_text, prompt_len);
    else put_str(b, "null");
    free(prompt_text);
    put_str(b, ",\"completion\":");
    if (text) dsmoe_json_write_string(b, c->text ? c->text : "", c->text_len);
    else put_str(b, "null");
    put_str(b, ",\"prompt_tokens\":");
    put_int(b, p->n_tokens);
    put_str(b, ",\"completion_tokens\":");
    put_int(b, (long long)c->n_tokens);
    put_str(b, ",\"finish_reason\":\"");
    put_str(b, c->finish ? c->finish : "none");
    put_str(b, "\",\"time_to_first_token_ms\":");
    put_fmt(b, "%.3f", c->ttft_ms);
    put_str(b, ",\"tokens\":[");
    for (size_t i = 0; i < c->n_tokens; i++) {
        if (i) put_str(b, ",");
        put_int(b, c->tokens[i]);
    }
    put_str(b, "],\"token_latencies_ms\":[");
    for (size_t i = 0; i < c->n_tokens; i++) {
        if (i) put_str(b, ",");
        put_fmt(b, "%.3f", c->latency_ms[i]);
    }
    put_str(b, "]}\n");
    return b->oom ? dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory for the output") : DSMOE_OK;
}

// ----------------------------------------------------------------------------------------------------
// the file and the summary

// Rank 0: the output in prompt order from every rank's lines and the kept ones, each of which starts with
// its prompt's index ({"index":N,...); no prompt may have two, and with `complete` every prompt has one.
static dsmoe_status assemble(const char *const part[2], const size_t part_len[2], int n_prompts, int complete,
                             dsmoe_buf *out, dsmoe_err *err) {
    const char **line = calloc((size_t)n_prompts, sizeof *line);
    size_t *len = calloc((size_t)n_prompts, sizeof *len);
    dsmoe_status s = line && len ? DSMOE_OK : dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    for (int k = 0; k < 2; k++)
        for (const char *p = part[k], *end = part[k] ? part[k] + part_len[k] : NULL; s == DSMOE_OK && p < end;) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            long i = -1;
            if (nl && sscanf(p, "{\"index\":%ld", &i) == 1 && i >= 0 && i < n_prompts && !line[i]) {
                line[i] = p;
                len[i] = (size_t)(nl + 1 - p);
                p = nl + 1;
            } else {
                s = dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "generate: a result line for prompt %ld is malformed or "
                                  "repeated", i);
            }
        }
    for (int i = 0; s == DSMOE_OK && i < n_prompts; i++) {
        if (line[i]) dsmoe_buf_put(out, line[i], len[i]);
        else if (complete) s = dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "generate: no result for prompt %d", i);
    }
    free(line);
    free(len);
    if (s == DSMOE_OK && out->oom) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory for the output");
    return s;
}

static void summary(const dsmoe_generation_report *rep, double *lat, size_t n_lat, double *ttft, size_t n_ttft,
                    long long prompts, long long tokens, const dsmoe_infer_times *t) {
    double el = rep->elapsed > 0 ? rep->elapsed : 1e-9;
    printf("generate: %lld prompts, %lld tokens in %.2f s: %.2f prompts/s, %.1f tokens/s\n", prompts, tokens,
           rep->elapsed, (double)prompts / el, (double)tokens / el);
    printf("generate: time to first token p50 %.2f ms, p90 %.2f ms, p99 %.2f ms; per-token latency p50 %.2f ms, "
           "p90 %.2f ms, p99 %.2f ms\n", dsmoe_percentile(ttft, n_ttft, 0.5), dsmoe_percentile(ttft, n_ttft, 0.9),
           dsmoe_percentile(ttft, n_ttft, 0.99), dsmoe_percentile(lat, n_lat, 0.5), dsmoe_percentile(lat, n_lat, 0.9),
           dsmoe_percentile(lat, n_lat, 0.99));
    if (rep->profiled) {
        double sum = t->attention + t->gating + t->alltoall + t->experts + t->other;
        if (sum <= 0) sum = 1e-9;
        printf("generate: time (mean over ranks) attention %.3f s (%.1f%%), gating %.3f s (%.1f%%), all-to-all %.3f s "
               "(%.1f%%), experts %.3f s (%.1f%%), other %.3f s (%.1f%%)\n", t->attention, 100 * t->attention / sum,
               t->gating, 100 * t->gating / sum, t->alltoall, 100 * t->alltoall / sum, t->experts,
               100 * t->experts / sum, t->other, 100 * t->other / sum);
    }
    fflush(stdout);
}

dsmoe_status dsmoe_generation_write(const dsmoe_generation_report *rep, dsmoe_err *err) {
    int rank = dsmoe_ctl_rank(rep->world), ranks = dsmoe_ctl_size(rep->world);
    dsmoe_buf lines = {0}, lats = {0};
    dsmoe_status s = DSMOE_OK;
    // This run's finished completions: a stop leaves some unfinished, which are dropped.
    int *finished = malloc((size_t)(rep->n ? rep->n : 1) * sizeof *finished), n = 0;
    if (!finished) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    for (int i = 0; i < rep->n; i++)
        if (rep->completions[i]->finish) finished[n++] = i;
    int64_t mine[2] = {0, n}; // tokens, prompts
    // Latencies after the first token of each completion (time to first token is its own statistic),
    // then the times to first token, each list prefixed by its length.
    double n_after = 0, n_first = 0;
    for (int k = 0; k < n && s == DSMOE_OK; k++) {
        const dsmoe_completion *c = rep->completions[finished[k]];
        s = put_line(&lines, rep->indices[finished[k]], &rep->prompts->items[rep->indices[finished[k]]], c, rep->tok, err);
        mine[0] += (int64_t)c->n_tokens;
        n_after += c->n_tokens > 1 ? (double)(c->n_tokens - 1) : 0;
        n_first += c->n_tokens > 0;
    }
    dsmoe_buf_put(&lats, &n_after, sizeof n_after);
    for (int k = 0; k < n; k++)
        if (rep->completions[finished[k]]->n_tokens > 1)
            dsmoe_buf_put(&lats, rep->completions[finished[k]]->latency_ms + 1,
                          (rep->completions[finished[k]]->n_tokens - 1) * sizeof(double));
    dsmoe_buf_put(&lats, &n_first, sizeof n_first);
    for (int k = 0; k < n; k++)
        if (rep->completions[finished[k]]->n_tokens > 0) dsmoe_buf_put(&lats, &rep->completions[finished[k]]->ttft_ms, sizeof(double));
    free(finished);
    if (s == DSMOE_OK && (lines.oom || lats.oom)) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    DSMOE_TRY(dsmoe_errors_agree(s, err));

    char *all_lines = NULL, *all_lats = NULL;
    size_t total_lines = 0, total_lats = 0;
    size_t *counts = calloc((size_t)ranks, sizeof *counts), *lat_counts = calloc((size_t)ranks, sizeof *lat_counts);
    int64_t totals[2] = {mine[0], mine[1]};
    double times[5] = {rep->times.attention, rep->times.gating, rep->times.alltoall, rep->times.experts,
                       rep->times.other};
    s = counts && lat_counts ? DSMOE_OK : dsmoe_err_set(err, DSMOE_ERR_NOMEM, "generate: out of memory");
    if (s == DSMOE_OK) s = dsmoe_ctl_gather_bytes(rep->world, lines.p, lines.len, &all_lines, &total_lines, counts, err);
    if (s == DSMOE_OK) s = dsmoe_ctl_gather_bytes(rep->world, lats.p, lats.len, &all_lats, &total_lats, lat_counts, err);
    if (s == DSMOE_OK) s = dsmoe_ctl_allreduce_i64(rep->world, totals, 2, err);
    if (s == DSMOE_OK) s = dsmoe_ctl_allreduce_f64(rep->world, times, 5, err);
    free(lines.p);
    free(lats.p);

    dsmoe_status w = DSMOE_OK;
    if (s == DSMOE_OK && rank == 0) {
        dsmoe_buf out = {0};
        const char *path = rep->partial ? rep->partial_path : rep->path;
        if (rep->partial) dsmoe_buf_put(&out, rep->header, strlen(rep->header));
        const char *part[2] = {rep->kept, all_lines};
        const size_t part_len[2] = {rep->kept ? rep->kept_len : 0, total_lines};
        w = assemble(part, part_len, rep->prompts->n, !rep->partial, &out, err);
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash && slash != dir) *slash = '\0'; // the directory was probed before any work (preflight.h)
        if (w == DSMOE_OK && slash && slash != dir) w = dsmoe_mkdir_p(dir, err);
        if (w == DSMOE_OK) w = dsmoe_write_file_atomic(path, out.p ? out.p : "", out.len, err);
        long n_lines = 0; // what a periodic save says
        for (size_t i = 0; rep->quiet && i < out.len; i++) n_lines += out.p[i] == '\n';
        free(out.p);
        // The complete output supersedes what a stopped run left (a resumed one's, or a stale one).
        int removed = w == DSMOE_OK && !rep->partial && unlink(rep->partial_path) == 0;
        if (w == DSMOE_OK && rep->quiet) {
            printf("generate: saved %ld finished prompts to %s\n", n_lines - 1, path); // (less the header)
            fflush(stdout);
        } else if (w == DSMOE_OK) {
            // Each rank's part: [n_after, latencies..., n_first, ttfts...] as doubles.
            size_t n_doubles = total_lats / sizeof(double), n_lat = 0, n_ttft = 0;
            double *v = (double *)(void *)all_lats, *lat = malloc((n_doubles + 1) * sizeof *lat),
                   *ttft = malloc((n_doubles + 1) * sizeof *ttft);
            if (lat && ttft) {
                size_t k = 0;
                for (int r = 0; r < ranks; r++) {
                    size_t na = (size_t)v[k++];
                    memcpy(lat + n_lat, v + k, na * sizeof *v);
                    n_lat += na, k += na;
                    size_t nf = (size_t)v[k++];
                    memcpy(ttft + n_ttft, v + k, nf * sizeof *v);
                    n_ttft += nf, k += nf;
                }
                dsmoe_infer_times mean = {times[0] / ranks, times[1] / ranks, times[2] / ranks, times[3] / ranks,
                                          times[4] / ranks};
                printf("generate: wrote %s\n", path);
                if (removed) printf("generate: removed %s (the complete output replaces it)\n", rep->partial_path);
                summary(rep, lat, n_lat, ttft, n_ttft, (long long)totals[1], (long long)totals[0], &mean);
            }
            free(lat);
            free(ttft);
        }
    }
    free(all_lines);
    free(all_lats);
    free(counts);
    free(lat_counts);
    if (s != DSMOE_OK) return s;
    s = dsmoe_ctl_root_status(rep->world, w, "another rank failed", err);
    if (s != DSMOE_OK) err->scope = DSMOE_SCOPE_COLLECTIVE;
    return s;
}
