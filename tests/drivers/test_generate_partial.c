// tests/drivers/test_generate_partial.c: a stopped generation's <output>.partial (core/drivers/
// generate_partial.c) read back against a prompt file of five prompts: the header written by
// dsmoe_partial_header reads back; kept lines come back as written (less a CR); each kind of damage or
// mismatch is refused with its exact message, naming the file and line, and leaves nothing allocated.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "generate_partial.h"
#include "prompts.h"
#include "tokenizer.h"

static const char prompt_file[] = "{\"prompt\": \"ab\", \"id\": \"p0\"}\n" // 2 tokens, id "p0"
                                  "{\"tokens\": [1, 2, 3]}\n"             // 3, id 2 (its line)
                                  "{\"prompt\": \"x\", \"id\": -7}\n"     // 1, id -7
                                  "{\"prompt\": \"hello\"}\n";            // 5, id 4
static dsmoe_tokenizer *tok;
static dsmoe_prompt_list *prompts;

static int setup(void **state) {
    (void)state;
    dsmoe_err err = {0};
    dsmoe_prompt_defaults d = {.max_new_tokens = 4, .top_p = 1};
    if (dsmoe_tokenizer_open_bytes(256, &tok, &err) != DSMOE_OK) return -1;
    return dsmoe_prompts_read_mem("prompts.jsonl", prompt_file, sizeof prompt_file - 1, DSMOE_PROMPT_FILE_AUTO, tok, &d,
                                  64, &prompts, &err) == DSMOE_OK ? 0 : -1;
}

static int done(void **state) {
    (void)state;
    dsmoe_prompts_free(prompts);
    dsmoe_tokenizer_free(tok);
    return 0;
}

// The header as dsmoe writes it, for a checkpoint name that needs escaping.
static char *header(int count) {
    dsmoe_buf b = {0};
    dsmoe_partial_header(&b, "ck \"1\".safetensors", 300, "prompts.jsonl", count);
    return b.p;
}

#define LINE0 "{\"index\":0,\"id\":\"p0\",\"prompt\":\"ab\",\"prompt_tokens\":2,\"tokens\":[1]}"
#define LINE3 "{\"index\":3,\"id\":4,\"prompt\":\"hello\",\"prompt_tokens\":5,\"tokens\":[2,3]}"

static void expect_refused(const char *text, const char *msg) {
    dsmoe_partial p;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_partial_read_mem("o.partial", text, strlen(text), prompts, "prompts.jsonl", &p, &err) != DSMOE_OK, 1);
    if (!strstr(err.msg, msg)) fail_msg("message\n  got:      %s\n  expected: ...%s...", err.msg, msg);
    assert_null(p.done);
    assert_null(p.lines);
    assert_null(p.checkpoint);
}

static void test_reads_back(void **state) {
    (void)state;
    char *h = header(4), text[1024];
    assert_string_equal(h, "{\"dsmoe_partial\":1,\"checkpoint\":\"ck \\\"1\\\".safetensors\",\"step\":300,"
                           "\"prompts\":\"prompts.jsonl\",\"prompt_count\":4}\n");
    snprintf(text, sizeof text, "%s%s\r\n%s\n", h, LINE3, LINE0); // any order; a CR is dropped
    dsmoe_partial p;
    dsmoe_err err = {0};
    if (dsmoe_partial_read_mem("o.partial", text, strlen(text), prompts, "prompts.jsonl", &p, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    assert_string_equal(p.checkpoint, "ck \"1\".safetensors");
    assert_int_equal(p.step, 300);
    assert_int_equal(p.prompt_count, 4);
    assert_int_equal(p.n_done, 2);
    const uint8_t want_done[4] = {1, 0, 0, 1};
    assert_memory_equal(p.done, want_done, 4);
    assert_int_equal(p.lines_len, strlen(LINE3 "\n" LINE0 "\n"));
    assert_memory_equal(p.lines, LINE3 "\n" LINE0 "\n", p.lines_len);
    dsmoe_partial_free(&p);
    // the header alone: nothing finished
    if (dsmoe_partial_read_mem("o.partial", h, strlen(h), prompts, "prompts.jsonl", &p, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(p.n_done, 0);
    assert_null(p.lines);
    dsmoe_partial_free(&p);
    free(h);
}

static void test_refused(void **state) {
    (void)state;
    char *h = header(4), *h5 = header(5), text[1024];
    expect_refused("", "o.partial is empty: expected the header line");
    expect_refused(LINE0 "\n", "o.partial:1:2: unknown \"index\" in the header");
    expect_refused("{\"dsmoe_partial\":1}\n", "o.partial:1:1: the header lacks a field");
    expect_refused("{\"dsmoe_partial\":2,\"checkpoint\":\"c\",\"step\":1,\"prompts\":\"p\",\"prompt_count\":4}\n",
                   "o.partial:1:18: expected an integer in [1, 1]");
    snprintf(text, sizeof text, "%s%s\n", h5, LINE0);
    expect_refused(text, "o.partial:1: the stopped generation had 5 prompts, but prompts.jsonl has 4");
    snprintf(text, sizeof text, "%s%s\n%s\n", h, LINE0, LINE0);
    expect_refused(text, "o.partial:3: prompt 0 is finished here and on line 2");
    snprintf(text, sizeof text, "%s{\"index\":3,\"id\":\"4\",\"prompt_tokens\":5}\n", h); // a string, not the integer 4
    expect_refused(text, "o.partial:2:17: prompt 3 has id \"4\" here but 4 in prompts.jsonl");
    snprintf(text, sizeof text, "%s{\"index\":1,\"id\":2,\"prompt_tokens\":4}\n", h);
    expect_refused(text, "o.partial:2:1: prompt 1 has 4 prompt tokens here but 3 in prompts.jsonl");
    snprintf(text, sizeof text, "%s{\"id\":2,\"index\":1,\"prompt_tokens\":3}\n", h);
    expect_refused(text, "o.partial:2: expected the line as dsmoe writes it, starting {\"index\":1,");
    snprintf(text, sizeof text, "%s{\"index\":4,\"id\":2,\"prompt_tokens\":3}\n", h);
    expect_refused(text, "o.partial:2:10: expected an integer in [0, 3]");
    snprintf(text, sizeof text, "%s{\"index\":1,\"prompt_tokens\":3}\n", h);
    expect_refused(text, "o.partial:2:1: an output line needs \"index\", \"id\" and \"prompt_tokens\"");
    snprintf(text, sizeof text, "%s%s", h, "{\"index\":0,\"id\":\"p0\",\"prompt_tokens\":2"); // cut short
    expect_refused(text, "o.partial:2:");
    free(h), free(h5);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_reads_back), cmocka_unit_test(test_refused)};
    return cmocka_run_group_tests(tests, setup, done);
}
