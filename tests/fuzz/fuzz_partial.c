// tests/fuzz/fuzz_partial.c: the reader of a stopped generation's <output>.partial
// (core/drivers/generate_partial.c) against a fixed prompt file of five prompts (string and integer ids,
// several lengths), read by the prompt reader with a byte tokenizer. The input is the .partial file. A
// refusal must name the file and leave nothing allocated. An accepted one must keep what
// generate_partial.h promises and what the output's assembly relies on: the header's checkpoint and
// prompt count, one kept line per finished prompt in `lines`, each ending in its one newline, starting
// {"index":N, with N finished, no prompt twice.
#include "fuzz_common.h"

#include "generate_partial.h"
#include "prompts.h"
#include "tokenizer.h"

#define NAME "out.jsonl.partial"

static const char prompt_file[] = "{\"prompt\": \"ab\", \"id\": \"p0\"}\n"
                                  "{\"tokens\": [1, 2, 3]}\n"
                                  "{\"prompt\": \"x\", \"id\": -7}\n"
                                  "{\"prompt\": \"hello\"}\n"
                                  "{\"prompt\": \"q\", \"id\": \"\\u00e9\"}\n";

static dsmoe_tokenizer *tok;
static dsmoe_prompt_list *prompts;

static void setup(void) {
    if (prompts) return;
    dsmoe_err err = {0};
    dsmoe_prompt_defaults d = {.max_new_tokens = 4, .top_p = 1};
    if (dsmoe_tokenizer_open_bytes(256, &tok, &err) != DSMOE_OK ||
        dsmoe_prompts_read_mem("prompts.jsonl", prompt_file, sizeof prompt_file - 1, DSMOE_PROMPT_FILE_AUTO, tok, &d, 64,
                               &prompts, &err) != DSMOE_OK)
        fuzz_setup_error("the fixed prompt file: %s", err.msg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    setup();
    dsmoe_partial p;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_partial_read_mem(NAME, (const char *)data, size, prompts, "prompts.jsonl", &p, &err);
    if (s != DSMOE_OK) {
        if (strncmp(err.msg, NAME, strlen(NAME)) != 0) fuzz_fail("a refusal does not name the file: %s", err.msg);
        if (p.done || p.lines || p.checkpoint) fuzz_fail("a refusal left memory behind");
        return 0;
    }
    if (!p.checkpoint || p.step < 0 || p.prompt_count != prompts->n || !p.done)
        fuzz_fail("accepted a header: checkpoint %p, step %d, prompt_count %d", (void *)p.checkpoint, p.step, p.prompt_count);
    int done = 0;
    for (int i = 0; i < prompts->n; i++) done += p.done[i] ? 1 : 0;
    if (done != p.n_done) fuzz_fail("n_done %d but %d prompts marked done", p.n_done, done);
    uint8_t seen[8] = {0};
    int lines = 0;
    for (const char *q = p.lines, *end = p.lines ? p.lines + p.lines_len : NULL; q < end; lines++) {
        const char *nl = memchr(q, '\n', (size_t)(end - q));
        if (!nl) fuzz_fail("kept line %d does not end in a newline", lines);
        long i = -1;
        if (sscanf(q, "{\"index\":%ld,", &i) != 1 || i < 0 || i >= prompts->n || !p.done[i] || seen[i]++)
            fuzz_fail("kept line %d does not start with the index of a finished prompt, once", lines);
        q = nl + 1;
    }
    if (lines != p.n_done) fuzz_fail("%d kept lines for %d finished prompts", lines, p.n_done);
    dsmoe_partial_free(&p);
    return 0;
}
