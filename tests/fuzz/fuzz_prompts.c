// tests/fuzz/fuzz_prompts.c: the prompt file reader (core/io/prompts.c) with a byte tokenizer whose
// model.vocab is 300 (ids 256..299 are unknown). The input is a prompt file, read as JSON lines (with
// max_new_tokens over the context an error, then clipped) and as text lines (clipped). A refusal must
// name the file. Every accepted list must keep what prompts.h promises: at least one prompt, lines rising, ids
// present and unique, 1+ known tokens, max_new_tokens >= 1 within the context, settings in range, stop
// sequences non-empty; in text form, each prompt's tokens are exactly its line's bytes.
#include "fuzz_common.h"

#include <math.h>

#include "prompts.h"

#define CONTEXT 64

static int by_id(const void *a, const void *b) {
    return strcmp((*(const dsmoe_prompt *const *)a)->id, (*(const dsmoe_prompt *const *)b)->id);
}

// Line `line` (from 1) of data: its start and length without LF or the CR before it.
static const uint8_t *line_of(const uint8_t *data, size_t size, int line, size_t *len) {
    const uint8_t *p = data, *end = data + size;
    for (int l = 1; l < line && p < end; l++) {
        const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
        p = nl ? nl + 1 : end;
    }
    const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
    *len = (size_t)((nl ? nl : end) - p);
    if (*len && p[*len - 1] == '\r') (*len)--;
    return p;
}

static void check_list(const dsmoe_prompt_list *l, const dsmoe_prompt_defaults *d, const dsmoe_tokenizer *tok, int text,
                       const uint8_t *data, size_t size) {
    if (l->n < 1 || !l->items) fuzz_fail("accepted a list of %d prompts", l->n);
    const dsmoe_prompt **order = malloc((size_t)l->n * sizeof *order);
    if (!order) fuzz_setup_error("out of memory");
    for (int i = 0; i < l->n; i++) {
        const dsmoe_prompt *p = &l->items[i];
        order[i] = p;
        if (p->line < 1 || (i && p->line <= l->items[i - 1].line)) fuzz_fail("prompt %d: line %d after %d", i, p->line, i ? l->items[i - 1].line : 0);
        if (!p->id || !p->id[0]) fuzz_fail("line %d: no id", p->line);
        if (!p->id_is_string) {
            char *end;
            errno = 0;
            strtoll(p->id, &end, 10);
            if (*end || errno) fuzz_fail("line %d: numeric id '%s' is not an integer", p->line, p->id);
        }
        if (p->n_tokens < 1 || !p->tokens) fuzz_fail("line %d: %d tokens", p->line, p->n_tokens);
        for (int k = 0; k < p->n_tokens; k++) {
            const uint8_t *b;
            size_t n;
            if (dsmoe_tokenizer_token_bytes(tok, p->tokens[k], &b, &n, NULL) != DSMOE_OK)
                fuzz_fail("line %d: token %d is id %d, unknown", p->line, k, p->tokens[k]);
        }
        if (p->max_new_tokens < 1 || (long)p->n_tokens + p->max_new_tokens > CONTEXT)
            fuzz_fail("line %d: %d tokens + max_new_tokens %d, context %d", p->line, p->n_tokens, p->max_new_tokens, CONTEXT);
        if (!(p->temperature >= 0) || !isfinite(p->temperature)) fuzz_fail("line %d: temperature %g", p->line, p->temperature);
        if (p->top_k < 0) fuzz_fail("line %d: top_k %d", p->line, p->top_k);
        if (!(p->top_p > 0 && p->top_p <= 1)) fuzz_fail("line %d: top_p %g", p->line, p->top_p);
        if (!p->has_seed && p->seed != d->seed) fuzz_fail("line %d: seed %llu without \"seed\"", p->line, (unsigned long long)p->seed);
        if (p->n_stop < 0 || (p->n_stop && (!p->stop || !p->stop_len))) fuzz_fail("line %d: %d stop sequences", p->line, p->n_stop);
        for (int k = 0; k < p->n_stop; k++)
            if (!p->stop[k] || p->stop_len[k] == 0) fuzz_fail("line %d: stop sequence %d is empty", p->line, k);
        if (text) { // the prompt is its line's bytes, one token each
            size_t len;
            const uint8_t *s = line_of(data, size, p->line, &len);
            if ((size_t)p->n_tokens != len) fuzz_fail("line %d: %d tokens for %zu bytes", p->line, p->n_tokens, len);
            for (size_t k = 0; k < len; k++)
                if (p->tokens[k] != s[k]) fuzz_fail("line %d: token %zu is %d, the byte is %d", p->line, k, p->tokens[k], s[k]);
            if (p->n_stop != 1 || p->stop_len[0] != d->stop_len || memcmp(p->stop[0], d->stop, d->stop_len) != 0)
                fuzz_fail("line %d: not the default stop sequence", p->line);
        }
    }
    qsort(order, (size_t)l->n, sizeof *order, by_id);
    for (int i = 1; i < l->n; i++)
        if (strcmp(order[i - 1]->id, order[i]->id) == 0) fuzz_fail("lines %d and %d share the id '%s'", order[i - 1]->line, order[i]->line, order[i]->id);
    free(order);
}

static void run(const uint8_t *data, size_t size, int format, int clip, const dsmoe_tokenizer *tok) {
    const dsmoe_prompt_defaults d = {.max_new_tokens = 16, .temperature = 0.7, .top_k = 40, .top_p = 0.95,
                                     .seed = 1234, .stop = "\n\n", .stop_len = 2, .clip_to_context = clip};
    const char *name = format == DSMOE_PROMPT_FILE_TEXT ? "fuzz.txt" : "fuzz.jsonl";
    dsmoe_prompt_list *l = (dsmoe_prompt_list *)(uintptr_t)1;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_prompts_read_mem(name, (const char *)data, size, format, (dsmoe_tokenizer *)tok, &d, CONTEXT, &l, &err);
    if (s != DSMOE_OK) {
        if (l) fuzz_fail("refused (%s) but the list is not NULL", err.msg);
        if (strncmp(err.msg, name, strlen(name)) != 0) fuzz_fail("a refusal that does not name the file: %s", err.msg);
        return;
    }
    check_list(l, &d, tok, format == DSMOE_PROMPT_FILE_TEXT, data, size);
    dsmoe_prompts_free(l);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static dsmoe_tokenizer *tok;
    if (!tok) {
        dsmoe_err err = {0};
        if (dsmoe_tokenizer_open_bytes(300, &tok, &err) != DSMOE_OK) fuzz_setup_error("%s", err.msg);
    }
    run(data, size, DSMOE_PROMPT_FILE_JSONL, 0, tok);
    run(data, size, DSMOE_PROMPT_FILE_JSONL, 1, tok);
    run(data, size, DSMOE_PROMPT_FILE_TEXT, 1, tok);
    return 0;
}
