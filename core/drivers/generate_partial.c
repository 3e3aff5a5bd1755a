// core/drivers/generate_partial.c: see generate_partial.h. Layout: the header, written and read; then one
// finished prompt's line read and checked against the prompt file; then the whole file.
#include "generate_partial.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PARTIAL_MAX_BYTES ((size_t)1 << 40)

// ---------------------------------------------------------------------------------------------------
// the header

void dsmoe_partial_header(dsmoe_buf *b, const char *checkpoint, int step, const char *prompts, int prompt_count) {
    char num[64];
    static const char open[] = "{\"dsmoe_partial\":1,\"checkpoint\":";
    dsmoe_buf_put(b, open, sizeof open - 1);
    dsmoe_json_write_string(b, checkpoint, strlen(checkpoint));
    int n = snprintf(num, sizeof num, ",\"step\":%d,\"prompts\":", step);
    dsmoe_buf_put(b, num, (size_t)n);
    dsmoe_json_write_string(b, prompts, strlen(prompts));
    n = snprintf(num, sizeof num, ",\"prompt_count\":%d}\n", prompt_count);
    dsmoe_buf_put(b, num, (size_t)n);
}

static dsmoe_status read_header(dsmoe_json *j, dsmoe_partial *p, dsmoe_buf *key) {
    enum { H_MARK = 1, H_CKPT = 2, H_STEP = 4, H_PROMPTS = 8, H_COUNT = 16, H_ALL = 31 };
    int have = 0, more;
    int64_t v;
    for (more = dsmoe_json_begin(j, '{', "'{' (the header of a stopped generation's .partial file)"); more > 0;
         more = dsmoe_json_next(j, '}')) {
        dsmoe_json_ws(j);
        const char *kat = j->p;
        DSMOE_TRY(dsmoe_json_key(j, key));
        int bit = strcmp(key->p, "dsmoe_partial") == 0  ? H_MARK
                  : strcmp(key->p, "checkpoint") == 0   ? H_CKPT
                  : strcmp(key->p, "step") == 0         ? H_STEP
                  : strcmp(key->p, "prompts") == 0      ? H_PROMPTS
                  : strcmp(key->p, "prompt_count") == 0 ? H_COUNT
                                                        : 0;
        if (!bit || (have & bit))
            return dsmoe_json_errorf(j, kat, DSMOE_ERR_IO, "%s \"%s\" in the header (expected dsmoe_partial, "
                                     "checkpoint, step, prompts, prompt_count, once each)", bit ? "repeated" : "unknown",
                                     key->p);
        have |= bit;
        if (bit == H_MARK) DSMOE_TRY(dsmoe_json_int(j, 1, 1, 0, &v));
        else if (bit == H_CKPT) DSMOE_TRY(dsmoe_json_string_dup(j, &p->checkpoint));
        else if (bit == H_PROMPTS) DSMOE_TRY(dsmoe_json_skip(j));
        else DSMOE_TRY(dsmoe_json_int(j, bit == H_STEP ? 0 : 1, INT32_MAX, 0, &v));
        if (bit == H_STEP) p->step = (int)v;
        if (bit == H_COUNT) p->prompt_count = (int)v;
    }
    if (more < 0) return j->status;
    DSMOE_TRY(dsmoe_json_end(j, "the end of the line after the header"));
    if (have != H_ALL) return dsmoe_json_errorf(j, j->start, DSMOE_ERR_IO, "the header lacks a field (it needs "
                                                "dsmoe_partial, checkpoint, step, prompts, prompt_count)");
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// one finished prompt

// The line's "index", checked against the prompt it names: its "id" and "prompt_tokens" must be that
// prompt's. Other fields are the output's and are kept as written.
static dsmoe_status read_record(dsmoe_json *j, const dsmoe_prompt_list *prompts, const char *prompts_name, dsmoe_buf *key,
                                dsmoe_buf *id, int *id_string, int *index) {
    enum { R_INDEX = 1, R_ID = 2, R_TOKENS = 4 };
    int have = 0, more;
    int64_t v, n_tokens = 0;
    const char *id_at = NULL;
    *index = -1;
    for (more = dsmoe_json_begin(j, '{', "'{' (a finished prompt's output line)"); more > 0; more = dsmoe_json_next(j, '}')) {
        DSMOE_TRY(dsmoe_json_key(j, key));
        dsmoe_json_ws(j);
        if (strcmp(key->p, "index") == 0) {
            DSMOE_TRY(dsmoe_json_int(j, 0, prompts->n - 1, 0, &v));
            *index = (int)v, have |= R_INDEX;
        } else if (strcmp(key->p, "prompt_tokens") == 0) {
            DSMOE_TRY(dsmoe_json_int(j, 1, INT32_MAX, 0, &n_tokens));
            have |= R_TOKENS;
        } else if (strcmp(key->p, "id") == 0) {
            id_at = j->p;
            *id_string = dsmoe_json_peek(j) == '"';
            if (*id_string) {
                DSMOE_TRY(dsmoe_json_string(j, id));
            } else {
                DSMOE_TRY(dsmoe_json_int(j, INT64_MIN, INT64_MAX, 0, &v));
                char num[32];
                int n = snprintf(num, sizeof num, "%" PRId64, v);
                id->len = 0;
                dsmoe_buf_put(id, num, (size_t)n);
            }
            have |= R_ID;
        } else {
            DSMOE_TRY(dsmoe_json_skip(j));
        }
    }
    if (more < 0) return j->status;
    DSMOE_TRY(dsmoe_json_end(j, "the end of the line after the object"));
    if (have != (R_INDEX | R_ID | R_TOKENS))
        return dsmoe_json_errorf(j, j->start, DSMOE_ERR_IO, "an output line needs \"index\", \"id\" and \"prompt_tokens\"");
    const dsmoe_prompt *p = &prompts->items[*index];
    if (*id_string != p->id_is_string || id->len != strlen(p->id) || memcmp(id->p, p->id, id->len) != 0)
        return dsmoe_json_errorf(j, id_at, DSMOE_ERR_INVALID, "prompt %d has id %s%.80s%s here but %s%.80s%s in %s: this "
                                 "is not the output of that prompt file", *index, *id_string ? "\"" : "", id->p,
                                 *id_string ? "\"" : "", p->id_is_string ? "\"" : "", p->id, p->id_is_string ? "\"" : "",
                                 prompts_name);
    if (n_tokens != p->n_tokens)
        return dsmoe_json_errorf(j, j->start, DSMOE_ERR_INVALID, "prompt %d has %" PRId64 " prompt tokens here but %d "
                                 "in %s: this is not the output of that prompt file", *index, n_tokens, p->n_tokens,
                                 prompts_name);
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// the file

dsmoe_status dsmoe_partial_read(const char *path, const dsmoe_prompt_list *prompts, const char *prompts_name,
                                dsmoe_partial *out, dsmoe_err *err) {
    memset(out, 0, sizeof *out);
    char *text = NULL;
    size_t len = 0;
    DSMOE_TRY(dsmoe_read_regular_file(path, "stopped generation's .partial file", PARTIAL_MAX_BYTES, &text, &len, err));
    dsmoe_status s = dsmoe_partial_read_mem(path, text, len, prompts, prompts_name, out, err);
    free(text);
    return s;
}

dsmoe_status dsmoe_partial_read_mem(const char *path, const char *text, size_t len, const dsmoe_prompt_list *prompts,
                                    const char *prompts_name, dsmoe_partial *out, dsmoe_err *err) {
    memset(out, 0, sizeof *out);
    dsmoe_buf key = {0}, id = {0}, lines = {0};
    int *line_of = NULL; // (prompt_count) the line that finished each prompt, for a repeat's message
    dsmoe_status s = DSMOE_OK;
    int line = 1;
    for (const char *p = text, *end = text + len; s == DSMOE_OK && p < end; line++) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        dsmoe_json j;
        dsmoe_json_init(&j, p, (size_t)(eol - p), path, line, err);
        j.end_name = "the end of the line";
        if (line == 1) {
            s = read_header(&j, out, &key);
            if (s == DSMOE_OK && out->prompt_count != prompts->n)
                s = dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s:1: the stopped generation had %d prompts, but %s has %d: "
                                  "not the prompt file it was generating", path, out->prompt_count, prompts_name,
                                  prompts->n);
            out->done = s == DSMOE_OK ? calloc((size_t)prompts->n, 1) : NULL;
            line_of = s == DSMOE_OK ? calloc((size_t)prompts->n, sizeof *line_of) : NULL;
            if (s == DSMOE_OK && (!out->done || !line_of)) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory", path);
        } else {
            int index, id_string = 0;
            s = read_record(&j, prompts, prompts_name, &key, &id, &id_string, &index);
            if (s == DSMOE_OK && out->done[index])
                s = dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s:%d: prompt %d is finished here and on line %d", path, line,
                                  index, line_of[index]);
            char prefix[32];
            int n_prefix = snprintf(prefix, sizeof prefix, "{\"index\":%d,", index);
            if (s == DSMOE_OK && (eol - p < n_prefix || memcmp(p, prefix, (size_t)n_prefix) != 0))
                s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s:%d: expected the line as dsmoe writes it, starting %s", path,
                                  line, prefix);
            if (s == DSMOE_OK) {
                const char *last = eol;
                while (last > p && (last[-1] == ' ' || last[-1] == '\t' || last[-1] == '\r')) last--;
                out->done[index] = 1, line_of[index] = line, out->n_done++;
                dsmoe_buf_put(&lines, p, (size_t)(last - p));
                dsmoe_buf_put(&lines, "\n", 1);
            }
        }
        p = eol + 1;
    }
    if (s == DSMOE_OK && line == 1) s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s is empty: expected the header line", path);
    if (s == DSMOE_OK && lines.oom) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory", path);
    free(key.p), free(id.p), free(line_of);
    out->lines = lines.p, out->lines_len = lines.len;
    if (s != DSMOE_OK) dsmoe_partial_free(out);
    return s;
}

void dsmoe_partial_free(dsmoe_partial *p) {
    free(p->checkpoint);
    free(p->done);
    free(p->lines);
    memset(p, 0, sizeof *p);
}
