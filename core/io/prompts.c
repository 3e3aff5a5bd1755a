// core/io/prompts.c: see prompts.h and docs/text.md. The file is read whole, split into lines (LF; a CR
// before it is dropped), and each line becomes a pending prompt whose tokens, id and stop sequences go
// into growing arenas; pointers into them are set once every line has been read, so nothing moves
// under a caller. Checks that span lines (no prompt at all, repeated ids) come last, still before any
// work.
#define _GNU_SOURCE
#include "prompts.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "json.h"

#define PROMPT_FILE_MAX ((size_t)1 << 30)
#define KNOWN_FIELDS "prompt, tokens, id, max_new_tokens, temperature, top_k, top_p, seed, stop"

typedef struct pending { // one prompt while the file is read: offsets into the reader's arenas
    int line;
    size_t tok_off;
    int n_tokens;
    size_t id_off;       // in text, NUL-terminated
    int id_is_string;
    int max_new_tokens, top_k, has_seed;
    double temperature, top_p;
    uint64_t seed;
    int stop_first, n_stop; // in stop_off / stop_len
} pending;

typedef struct reader {
    const char *name;
    dsmoe_tokenizer *tok;
    const dsmoe_prompt_defaults *d;
    int context;
    dsmoe_err *err;
    pending *items;
    int n, cap;
    int32_t *toks;     // every prompt's tokens
    size_t n_toks, cap_toks;
    dsmoe_buf text;    // ids (NUL-terminated) and stop sequences
    size_t *stop_off, *stop_len;
    int n_stops, cap_stops;
    int default_stop;  // index of the default stop sequence, -1 when none
    dsmoe_buf key, prompt; // JSON scratch
} reader;

typedef struct store { // what a dsmoe_prompt_list owns besides its items
    int32_t *toks;
    char *text;
    const char **stop;
    size_t *stop_len;
} store;

// Makes room for one more element of *p (n used, *cap allocated); -1 when out of memory.
static int grow(void *p, size_t n, size_t *cap, size_t elem) {
    if (n < *cap) return 0;
    size_t c = *cap ? 2 * *cap : 64;
    void *q = realloc(*(void **)p, c * elem);
    if (!q) return -1;
    *(void **)p = q;
    *cap = c;
    return 0;
}

static dsmoe_status nomem(reader *r) { return dsmoe_err_set(r->err, DSMOE_ERR_NOMEM, "%s: out of memory reading prompts", r->name); }

static dsmoe_status push_token(reader *r, int32_t id) {
    if (grow(&r->toks, r->n_toks, &r->cap_toks, sizeof *r->toks) != 0) return nomem(r);
    r->toks[r->n_toks++] = id;
    return DSMOE_OK;
}

static dsmoe_status push_stop(reader *r, const char *s, size_t n) {
    size_t cap = (size_t)r->cap_stops;
    if (grow(&r->stop_off, (size_t)r->n_stops, &cap, sizeof *r->stop_off) != 0) return nomem(r);
    size_t cap2 = (size_t)r->cap_stops;
    if (grow(&r->stop_len, (size_t)r->n_stops, &cap2, sizeof *r->stop_len) != 0) return nomem(r);
    r->cap_stops = (int)(cap < cap2 ? cap : cap2);
    r->stop_off[r->n_stops] = r->text.len;
    r->stop_len[r->n_stops++] = n;
    dsmoe_buf_put(&r->text, s, n);
    return r->text.oom ? nomem(r) : DSMOE_OK;
}

// A new pending prompt of `line` with the defaults.
static pending *new_prompt(reader *r, int line) {
    size_t cap = (size_t)r->cap;
    if (grow(&r->items, (size_t)r->n, &cap, sizeof *r->items) != 0) return NULL;
    r->cap = (int)cap;
    pending *p = &r->items[r->n++];
    const dsmoe_prompt_defaults *d = r->d;
    *p = (pending){.line = line, .tok_off = r->n_toks, .max_new_tokens = d->max_new_tokens, .top_k = d->top_k,
                   .temperature = d->temperature, .top_p = d->top_p, .seed = d->seed,
                   .stop_first = r->default_stop, .n_stop = r->default_stop >= 0};
    return p;
}

static dsmoe_status set_id_number(reader *r, pending *p, int64_t v) {
    char num[32];
    snprintf(num, sizeof num, "%" PRId64, v);
    p->id_off = r->text.len;
    p->id_is_string = 0;
    dsmoe_buf_put(&r->text, num, strlen(num) + 1);
    return r->text.oom ? nomem(r) : DSMOE_OK;
}

// The checks of a prompt once its tokens are in: not empty, within the context.
static dsmoe_status check_prompt(reader *r, pending *p) {
    p->n_tokens = (int)(r->n_toks - p->tok_off);
    if (p->n_tokens == 0) return dsmoe_err_set(r->err, DSMOE_ERR_INVALID, "%s:%d: the prompt is empty (0 tokens)", r->name, p->line);
    if (p->n_tokens >= r->context)
        return dsmoe_err_set(r->err, DSMOE_ERR_INVALID, "%s:%d: the prompt has %d tokens but the context limit is %d tokens: "
                             "no room for a completion (shorten the prompt, or raise generate.context up to model.seq_len)",
                             r->name, p->line, p->n_tokens, r->context);
    if ((int64_t)p->n_tokens + p->max_new_tokens > r->context) {
        if (r->d->clip_to_context) p->max_new_tokens = r->context - p->n_tokens;
        else
            return dsmoe_err_set(r->err, DSMOE_ERR_INVALID, "%s:%d: the prompt's %d tokens + max_new_tokens %d = %" PRId64
                                 " exceed the context limit of %d tokens (shorten the prompt or lower max_new_tokens)",
                                 r->name, p->line, p->n_tokens, p->max_new_tokens,
                                 (int64_t)p->n_tokens + p->max_new_tokens, r->context);
    }
    return DSMOE_OK;
}

static dsmoe_status encode_into(reader *r, const char *text, size_t len) {
    int32_t *ids;
    size_t n;
    DSMOE_TRY(dsmoe_tokenizer_encode(r->tok, text, len, &ids, &n, r->err));
    dsmoe_status s = DSMOE_OK;
    for (size_t i = 0; i < n && s == DSMOE_OK; i++) s = push_token(r, ids[i]);
    free(ids);
    return s;
}

// ---------------------------------------------------------------------------------------------------
// Text lines

static dsmoe_status text_line(reader *r, const char *s, size_t n, int line) {
    if (n == 0) return DSMOE_OK; // empty lines separate nothing and are skipped
    const char *nul = memchr(s, '\0', n);
    if (nul)
        return dsmoe_err_set(r->err, DSMOE_ERR_INVALID, "%s:%d:%zu: NUL byte in a text prompt file (is this the right "
                             "file? JSON lines can hold one as \"\\u0000\")", r->name, line, (size_t)(nul - s) + 1);
    if (!dsmoe_tokenizer_has_text(r->tok))
        return dsmoe_err_set(r->err, DSMOE_ERR_INVALID, "%s:%d: a text prompt, but the tokenizer is %s, without text "
                             "(generate.tokenizer): give the prompts as JSON lines with \"tokens\" (ids)", r->name, line,
                             dsmoe_tokenizer_describe(r->tok));
    pending *p = new_prompt(r, line);
    if (!p) return nomem(r);
    DSMOE_TRY(set_id_number(r, p, line));
    DSMOE_TRY(encode_into(r, s, n));
    return check_prompt(r, &r->items[r->n - 1]);
}

// ---------------------------------------------------------------------------------------------------
// JSON lines

enum { F_PROMPT = 1, F_TOKENS = 2, F_ID = 4, F_MAX_NEW = 8, F_TEMP = 16, F_TOP_K = 32, F_TOP_P = 64, F_SEED = 128,
       F_STOP = 256 };

// The sampler takes float settings (dsmoe_sampling_params): a value that float turns into infinity, or a
// non-zero one it turns into 0, is refused here, as the deck refuses it, not by the kernel mid-run.
static int fits_float(double v) {
    float f = (float)v;
    return isfinite(f) && (v == 0 || f != 0);
}

static const struct {
    const char *name;
    int bit;
} fields[] = {{"prompt", F_PROMPT}, {"tokens", F_TOKENS}, {"id", F_ID}, {"max_new_tokens", F_MAX_NEW},
              {"temperature", F_TEMP}, {"top_k", F_TOP_K}, {"top_p", F_TOP_P}, {"seed", F_SEED}, {"stop", F_STOP}};

// An integer field in [lo, hi]; `range` says which in the message.
static dsmoe_status int_field(dsmoe_json *j, const char *field, int64_t lo, int64_t hi, const char *range, int *out) {
    dsmoe_json_ws(j);
    const char *at = j->p;
    int64_t v;
    DSMOE_TRY(dsmoe_json_int(j, INT64_MIN, INT64_MAX, 0, &v));
    if (v < lo || v > hi)
        return dsmoe_json_errorf(j, at, DSMOE_ERR_INVALID, "\"%s\" is %" PRId64 ": expected %s", field, v, range);
    *out = (int)v;
    return DSMOE_OK;
}

static dsmoe_status tokens_field(reader *r, dsmoe_json *j) {
    int more;
    for (more = dsmoe_json_begin(j, '[', "'[' (\"tokens\" is an array of token ids)"); more > 0; more = dsmoe_json_next(j, ']')) {
        dsmoe_json_ws(j);
        const char *at = j->p;
        int64_t id;
        const uint8_t *bytes;
        size_t len;
        dsmoe_err why = {0};
        DSMOE_TRY(dsmoe_json_int(j, INT64_MIN, INT64_MAX, 0, &id));
        if (id < 0 || id >= dsmoe_tokenizer_vocab(r->tok))
            return dsmoe_json_errorf(j, at, DSMOE_ERR_INVALID, "token id %" PRId64 " is outside the model's vocabulary "
                                     "[0, %d) (model.vocab)", id, dsmoe_tokenizer_vocab(r->tok));
        if (dsmoe_tokenizer_token_bytes(r->tok, (int32_t)id, &bytes, &len, &why) != DSMOE_OK)
            return dsmoe_json_errorf(j, at, DSMOE_ERR_INVALID, "%s", why.msg);
        DSMOE_TRY(push_token(r, (int32_t)id));
    }
    return more < 0 ? j->status : DSMOE_OK;
}

static dsmoe_status stop_field(reader *r, dsmoe_json *j, pending *p) {
    p->stop_first = r->n_stops, p->n_stop = 0;
    int array = dsmoe_json_peek(j) == '[', more = 1;
    if (array) more = dsmoe_json_begin(j, '[', "'['");
    for (; more > 0; more = array ? dsmoe_json_next(j, ']') : 0) {
        if (dsmoe_json_peek(j) != '"') return dsmoe_json_fail(j, array ? "a string (a stop sequence)" : "a string or an array of strings");
        const char *at = j->p;
        if (!dsmoe_tokenizer_has_text(r->tok)) // ([] is none, and allowed)
            return dsmoe_json_errorf(j, at, DSMOE_ERR_INVALID, "a stop sequence is text, but the tokenizer is %s, "
                                     "without text (generate.tokenizer)", dsmoe_tokenizer_describe(r->tok));
        DSMOE_TRY(dsmoe_json_string(j, &r->key));
        if (r->key.len == 0) return dsmoe_json_errorf(j, at, DSMOE_ERR_INVALID, "a stop sequence is empty (it would stop at once)");
        DSMOE_TRY(push_stop(r, r->key.p, r->key.len));
        p->n_stop++;
    }
    return more < 0 ? j->status : DSMOE_OK;
}

static dsmoe_status id_field(reader *r, dsmoe_json *j, pending *p) {
    int c = dsmoe_json_peek(j);
    const char *at = j->p;
    if (c == '"') {
        DSMOE_TRY(dsmoe_json_string(j, &r->key));
        if (r->key.len == 0 || memchr(r->key.p, '\0', r->key.len))
            return dsmoe_json_errorf(j, at, DSMOE_ERR_INVALID, "\"id\" must be a non-empty string without \\u0000, or an integer");
        p->id_off = r->text.len;
        p->id_is_string = 1;
        dsmoe_buf_put(&r->text, r->key.p, r->key.len + 1);
        return r->text.oom ? nomem(r) : DSMOE_OK;
    }
    if (c != '-' && (c < '0' || c > '9')) return dsmoe_json_fail(j, "a string or an integer (the prompt's id)");
    int64_t v;
    DSMOE_TRY(dsmoe_json_int(j, INT64_MIN, INT64_MAX, 0, &v));
    return set_id_number(r, p, v);
}

static dsmoe_status json_line(reader *r, const char *s, size_t n, int line) {
    size_t k = 0;
    while (k < n && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r')) k++;
    if (k == n) return DSMOE_OK; // blank lines are skipped
    dsmoe_json j;
    dsmoe_json_init(&j, s, n, r->name, line, r->err);
    j.flags = DSMOE_JSON_UTF8;
    j.end_name = "the end of the line";
    pending *p = new_prompt(r, line);
    if (!p) return nomem(r);
    DSMOE_TRY(set_id_number(r, p, line));
    int have = 0, more;
    r->prompt.len = 0;
    for (more = dsmoe_json_begin(&j, '{', "'{' (each line of a JSON-lines prompt file is one object)"); more > 0;
         more = dsmoe_json_next(&j, '}')) {
        dsmoe_json_ws(&j);
        const char *kat = j.p;
        DSMOE_TRY(dsmoe_json_key(&j, &r->key));
        int bit = 0;
        for (size_t f = 0; f < sizeof fields / sizeof fields[0] && !bit; f++)
            if (strlen(fields[f].name) == r->key.len && memcmp(fields[f].name, r->key.p, r->key.len) == 0) bit = fields[f].bit;
        if (!bit) {
            dsmoe_buf shown = {0};
            dsmoe_json_write_string(&shown, r->key.p, r->key.len < 80 ? r->key.len : 80);
            dsmoe_json_errorf(&j, kat, DSMOE_ERR_INVALID, "unknown field %s (known: " KNOWN_FIELDS ")", shown.p ? shown.p : "");
            free(shown.p);
            return DSMOE_ERR_INVALID;
        }
        if (have & bit) return dsmoe_json_errorf(&j, kat, DSMOE_ERR_INVALID, "field \"%s\" appears twice", r->key.p);
        have |= bit;
        dsmoe_json_ws(&j);
        const char *vat = j.p;
        double v;
        switch (bit) {
        case F_PROMPT:
            if (!dsmoe_tokenizer_has_text(r->tok))
                return dsmoe_json_errorf(&j, vat, DSMOE_ERR_INVALID, "\"prompt\" is text, but the tokenizer is %s, "
                                         "without text (generate.tokenizer): give \"tokens\" (ids)",
                                         dsmoe_tokenizer_describe(r->tok));
            DSMOE_TRY(dsmoe_json_string(&j, &r->prompt));
            break;
        case F_TOKENS: DSMOE_TRY(tokens_field(r, &j)); break;
        case F_ID: DSMOE_TRY(id_field(r, &j, p)); break;
        case F_MAX_NEW: DSMOE_TRY(int_field(&j, "max_new_tokens", 1, INT32_MAX, "an integer in [1, 2147483647]", &p->max_new_tokens)); break;
        case F_TOP_K: DSMOE_TRY(int_field(&j, "top_k", 0, INT32_MAX, "an integer in [0, 2147483647] (0 = every token)", &p->top_k)); break;
        case F_TEMP:
            DSMOE_TRY(dsmoe_json_number(&j, &v));
            if (!(v >= 0)) return dsmoe_json_errorf(&j, vat, DSMOE_ERR_INVALID, "\"temperature\" is %g: expected >= 0 (0 = greedy)", v);
            if (!fits_float(v)) return dsmoe_json_errorf(&j, vat, DSMOE_ERR_INVALID, "\"temperature\" is %g: does not fit in a float", v);
            p->temperature = v;
            break;
        case F_TOP_P:
            DSMOE_TRY(dsmoe_json_number(&j, &v));
            if (!(v > 0 && v <= 1)) return dsmoe_json_errorf(&j, vat, DSMOE_ERR_INVALID, "\"top_p\" is %g: expected a number in (0, 1]", v);
            if (!fits_float(v)) return dsmoe_json_errorf(&j, vat, DSMOE_ERR_INVALID, "\"top_p\" is %g: does not fit in a float", v);
            p->top_p = v;
            break;
        case F_SEED:
            DSMOE_TRY(dsmoe_json_u64(&j, UINT64_MAX, 0, &p->seed));
            p->has_seed = 1;
            break;
        case F_STOP: DSMOE_TRY(stop_field(r, &j, p)); break;
        }
    }
    if (more < 0) return j.status;
    DSMOE_TRY(dsmoe_json_end(&j, "the end of the line after the object"));
    if ((have & (F_PROMPT | F_TOKENS)) == (F_PROMPT | F_TOKENS))
        return dsmoe_err_set(r->err, DSMOE_ERR_INVALID, "%s:%d: the line has both \"prompt\" (text) and \"tokens\" (ids): "
                             "give one", r->name, line);
    if (!(have & (F_PROMPT | F_TOKENS)))
        return dsmoe_err_set(r->err, DSMOE_ERR_INVALID, "%s:%d: the line has neither \"prompt\" (text) nor \"tokens\" (ids)",
                             r->name, line);
    if (have & F_PROMPT) DSMOE_TRY(encode_into(r, r->prompt.p, r->prompt.len));
    return check_prompt(r, &r->items[r->n - 1]);
}

// ---------------------------------------------------------------------------------------------------
// The whole file

static dsmoe_status check_defaults(const dsmoe_prompt_defaults *d, int context, dsmoe_err *err) {
    if (d->max_new_tokens < 1)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.max_new_tokens = %d: expected >= 1", d->max_new_tokens);
    if (!(d->temperature >= 0) || !isfinite(d->temperature))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.temperature = %g: expected >= 0", d->temperature);
    if (d->top_k < 0) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.top_k = %d: expected >= 0", d->top_k);
    if (!(d->top_p > 0 && d->top_p <= 1))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.top_p = %g: expected a number in (0, 1]", d->top_p);
    if (context < 2)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "the context limit is %d tokens: a prompt and a completion need 2 or more",
                             context);
    return DSMOE_OK;
}

static int by_id(const void *a, const void *b, void *ctx) {
    const reader *r = ctx;
    const pending *x = &r->items[*(const int *)a], *y = &r->items[*(const int *)b];
    int c = strcmp(r->text.p + x->id_off, r->text.p + y->id_off);
    return c ? c : (x->line > y->line) - (x->line < y->line);
}

static dsmoe_status check_ids(reader *r) {
    int *idx = malloc((size_t)r->n * sizeof *idx);
    if (!idx) return nomem(r);
    for (int i = 0; i < r->n; i++) idx[i] = i;
    qsort_r(idx, (size_t)r->n, sizeof *idx, by_id, r);
    dsmoe_status s = DSMOE_OK;
    for (int i = 1; i < r->n && s == DSMOE_OK; i++) {
        const pending *a = &r->items[idx[i - 1]], *b = &r->items[idx[i]];
        if (strcmp(r->text.p + a->id_off, r->text.p + b->id_off) == 0)
            s = dsmoe_err_set(r->err, DSMOE_ERR_INVALID, "%s:%d: the id %s is also the id of line %d (ids must differ; a "
                              "prompt without \"id\" is known by its line number)", r->name, b->line,
                              r->text.p + b->id_off, a->line);
    }
    free(idx);
    return s;
}

// The list the caller gets: items pointing into one store that takes over the reader's arenas.
static dsmoe_status build_list(reader *r, dsmoe_prompt_list **out) {
    dsmoe_prompt_list *l = calloc(1, sizeof *l);
    store *st = calloc(1, sizeof *st);
    if (l) l->items = calloc((size_t)r->n, sizeof *l->items);
    if (st) st->stop = malloc((size_t)(r->n_stops ? r->n_stops : 1) * sizeof *st->stop);
    if (!l || !st || !l->items || !st->stop) {
        if (l) free(l->items);
        if (st) free(st->stop);
        free(l), free(st);
        return nomem(r);
    }
    st->toks = r->toks, st->text = r->text.p, st->stop_len = r->stop_len;
    r->toks = NULL, r->text = (dsmoe_buf){0}, r->stop_len = NULL;
    for (int i = 0; i < r->n_stops; i++) st->stop[i] = st->text + r->stop_off[i];
    for (int i = 0; i < r->n; i++) {
        const pending *p = &r->items[i];
        l->items[i] = (dsmoe_prompt){
            .id = st->text + p->id_off, .id_is_string = p->id_is_string, .line = p->line, .tokens = st->toks + p->tok_off,
            .n_tokens = p->n_tokens, .max_new_tokens = p->max_new_tokens, .temperature = p->temperature,
            .top_k = p->top_k, .top_p = p->top_p, .seed = p->seed, .has_seed = p->has_seed, .n_stop = p->n_stop,
            .stop = p->n_stop ? st->stop + p->stop_first : NULL, .stop_len = p->n_stop ? st->stop_len + p->stop_first : NULL};
    }
    l->n = r->n;
    l->store = st;
    *out = l;
    return DSMOE_OK;
}

dsmoe_status dsmoe_prompts_read_mem(const char *name, const char *text, size_t len, int format, dsmoe_tokenizer *tok,
                                    const dsmoe_prompt_defaults *defaults, int context_limit, dsmoe_prompt_list **out,
                                    dsmoe_err *err) {
    *out = NULL;
    DSMOE_TRY(check_defaults(defaults, context_limit, err));
    if (format == DSMOE_PROMPT_FILE_AUTO) {
        size_t n = strlen(name);
        int jsonl = (n >= 6 && strcasecmp(name + n - 6, ".jsonl") == 0) || (n >= 5 && strcasecmp(name + n - 5, ".json") == 0);
        format = jsonl ? DSMOE_PROMPT_FILE_JSONL : DSMOE_PROMPT_FILE_TEXT;
    }
    if (format != DSMOE_PROMPT_FILE_TEXT && format != DSMOE_PROMPT_FILE_JSONL)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: unknown prompt file format %d", name, format);
    if (len == 0) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s is empty: no prompts", name);
    reader r = {.name = name, .tok = tok, .d = defaults, .context = context_limit, .err = err, .default_stop = -1};
    dsmoe_status s = DSMOE_OK;
    if (defaults->stop && defaults->stop_len > 0 && !dsmoe_tokenizer_has_text(tok))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "generate.stop is text, but the tokenizer is %s, without "
                             "text (generate.tokenizer)", dsmoe_tokenizer_describe(tok));
    if (defaults->stop && defaults->stop_len > 0) {
        s = push_stop(&r, defaults->stop, defaults->stop_len);
        r.default_stop = 0;
    }
    int line = 1;
    for (const char *p = text, *end = text + len; p < end && s == DSMOE_OK; line++) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        eol = eol ? eol : end;
        size_t n = (size_t)(eol - p) - (eol > p && eol[-1] == '\r');
        s = format == DSMOE_PROMPT_FILE_TEXT ? text_line(&r, p, n, line) : json_line(&r, p, n, line);
        p = eol + 1;
    }
    if (s == DSMOE_OK && r.n == 0)
        s = dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: no prompts (%d lines, all %s)", name, line - 1,
                          format == DSMOE_PROMPT_FILE_TEXT ? "empty" : "blank");
    if (s == DSMOE_OK) s = check_ids(&r);
    if (s == DSMOE_OK) s = build_list(&r, out);
    free(r.items), free(r.toks), free(r.text.p), free(r.stop_off), free(r.stop_len), free(r.key.p), free(r.prompt.p);
    return s;
}

dsmoe_status dsmoe_prompts_read(const char *path, int format, dsmoe_tokenizer *tok, const dsmoe_prompt_defaults *defaults,
                                int context_limit, dsmoe_prompt_list **out, dsmoe_err *err) {
    *out = NULL;
    char *text;
    size_t len;
    DSMOE_TRY(check_defaults(defaults, context_limit, err));
    DSMOE_TRY(dsmoe_read_regular_file(path, "prompt file", PROMPT_FILE_MAX, &text, &len, err));
    dsmoe_status s = dsmoe_prompts_read_mem(path, text, len, format, tok, defaults, context_limit, out, err);
    free(text);
    return s;
}

void dsmoe_prompts_free(dsmoe_prompt_list *list) {
    if (!list) return;
    store *st = list->store;
    if (st) free(st->toks), free(st->text), free((void *)st->stop), free(st->stop_len), free(st);
    free(list->items);
    free(list);
}
