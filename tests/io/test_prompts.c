// tests/io/test_prompts.c: the prompt file (core/io/prompts.c). Text lines (CRLF, empty lines, a last line
// without a newline) and JSON lines (every field, defaults, ids, stop sequences with \u0000), the format
// chosen by the name, the context limit (error, or max_new_tokens clipped), and every error, each
// message checked for its file:line (and column for JSON).
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <sys/stat.h>
#include <unistd.h>

#include "prompts.h"

#include "test_tmpdir.h" // dir, path_of, write_bytes, teardown

static dsmoe_tokenizer *bytes256, *bytes300, *ids64;

static int setup(void **state) {
    (void)state;
    dsmoe_err err = {0};
    if (dsmoe_tokenizer_open_bytes(256, &bytes256, &err) != DSMOE_OK) return -1;
    if (dsmoe_tokenizer_open_bytes(300, &bytes300, &err) != DSMOE_OK) return -1;
    if (dsmoe_tokenizer_open_ids(64, &ids64, &err) != DSMOE_OK) return -1;
    return tmpdir_create("prompts");
}

static int done(void **state) {
    dsmoe_tokenizer_free(bytes256);
    dsmoe_tokenizer_free(bytes300);
    dsmoe_tokenizer_free(ids64);
    return teardown(state);
}

static const dsmoe_prompt_defaults defaults = {
    .max_new_tokens = 8, .temperature = 0.5, .top_k = 3, .top_p = 0.9, .seed = 42, .stop = "\n\n", .stop_len = 2};

static dsmoe_prompt_list *read_ok(const char *name, const char *text, int format, const dsmoe_prompt_defaults *d, int context) {
    dsmoe_prompt_list *l = NULL;
    dsmoe_err err = {0};
    if (dsmoe_prompts_read_mem(name, text, strlen(text), format, bytes256, d, context, &l, &err) != DSMOE_OK)
        fail_msg("%s: %s", name, err.msg);
    return l;
}

static void expect_tokens(const dsmoe_prompt *p, const char *bytes, int n) {
    assert_int_equal(p->n_tokens, n);
    for (int i = 0; i < n; i++) assert_int_equal(p->tokens[i], (unsigned char)bytes[i]);
}

static void expect_defaults(const dsmoe_prompt *p) {
    assert_int_equal(p->max_new_tokens, 8);
    assert_true(p->temperature == 0.5);
    assert_int_equal(p->top_k, 3);
    assert_true(p->top_p == 0.9);
    assert_true(p->seed == 42);
    assert_int_equal(p->has_seed, 0);
}

static void test_text(void **state) {
    (void)state;
    dsmoe_prompt_list *l = read_ok("p.txt", "hello\r\nworld\n\n  x\na\rb", DSMOE_PROMPT_FILE_AUTO, &defaults, 64);
    assert_int_equal(l->n, 4);
    const int lines[] = {1, 2, 4, 5};
    const char *ids[] = {"1", "2", "4", "5"};
    for (int i = 0; i < 4; i++) {
        const dsmoe_prompt *p = &l->items[i];
        assert_int_equal(p->line, lines[i]);
        assert_string_equal(p->id, ids[i]);
        assert_int_equal(p->id_is_string, 0);
        expect_defaults(p);
        assert_int_equal(p->n_stop, 1);
        assert_int_equal(p->stop_len[0], 2);
        assert_memory_equal(p->stop[0], "\n\n", 2);
    }
    expect_tokens(&l->items[0], "hello", 5); // the CR of CRLF dropped
    expect_tokens(&l->items[1], "world", 5);
    expect_tokens(&l->items[2], "  x", 3);   // leading spaces are the prompt's
    expect_tokens(&l->items[3], "a\rb", 3);  // a CR inside a line is kept; no final newline needed
    dsmoe_prompts_free(l);
    // A JSON line read as text is a prompt of its bytes.
    l = read_ok("p.txt", "{\"prompt\": \"a\"}\n", DSMOE_PROMPT_FILE_AUTO, &defaults, 64);
    assert_int_equal(l->items[0].n_tokens, 15);
    dsmoe_prompts_free(l);
    // No default stop sequence.
    dsmoe_prompt_defaults d = defaults;
    d.stop = NULL, d.stop_len = 0;
    l = read_ok("p.txt", "a\n", DSMOE_PROMPT_FILE_TEXT, &d, 64);
    assert_int_equal(l->items[0].n_stop, 0);
    dsmoe_prompts_free(l);
}

static void test_jsonl(void **state) {
    (void)state;
    const char *text =
        "{\"prompt\": \"hi\", \"id\": \"first\", \"max_new_tokens\": 4, \"temperature\": 0, \"top_k\": 0, \"top_p\": 1,"
        " \"seed\": 18446744073709551615, \"stop\": [\"a\", \"\\u0000b\"]}\n"
        "\n"
        "{\"tokens\": [104, 0, 255], \"id\": -7}\r\n"
        "  {\"prompt\": \"x\\ny\\u00e9\", \"stop\": \"END\"}  \n"
        "{\"stop\": [], \"prompt\": \"z\", \"seed\": 0}";
    dsmoe_prompt_list *l = read_ok("p.jsonl", text, DSMOE_PROMPT_FILE_AUTO, &defaults, 64);
    assert_int_equal(l->n, 4);
    const dsmoe_prompt *p = &l->items[0];
    assert_int_equal(p->line, 1);
    assert_string_equal(p->id, "first");
    assert_int_equal(p->id_is_string, 1);
    expect_tokens(p, "hi", 2);
    assert_int_equal(p->max_new_tokens, 4);
    assert_true(p->temperature == 0);
    assert_int_equal(p->top_k, 0);
    assert_true(p->top_p == 1);
    assert_true(p->seed == UINT64_MAX);
    assert_int_equal(p->has_seed, 1);
    assert_int_equal(p->n_stop, 2);
    assert_int_equal(p->stop_len[0], 1);
    assert_memory_equal(p->stop[0], "a", 1);
    assert_int_equal(p->stop_len[1], 2);
    assert_memory_equal(p->stop[1], "\0b", 2);

    p = &l->items[1];
    assert_int_equal(p->line, 3);
    assert_string_equal(p->id, "-7");
    assert_int_equal(p->id_is_string, 0);
    expect_tokens(p, "h\0\xff", 3);
    expect_defaults(p);
    assert_int_equal(p->n_stop, 1); // the default

    p = &l->items[2];
    assert_int_equal(p->line, 4);
    assert_string_equal(p->id, "4"); // its line number
    expect_tokens(p, "x\ny\xC3\xA9", 5);
    assert_int_equal(p->n_stop, 1);
    assert_int_equal(p->stop_len[0], 3);
    assert_memory_equal(p->stop[0], "END", 3);

    p = &l->items[3];
    assert_int_equal(p->n_stop, 0); // [] replaces the default: none
    assert_int_equal(p->has_seed, 1);
    assert_true(p->seed == 0);
    dsmoe_prompts_free(l);

    l = read_ok("P.JSON", "{\"prompt\": \"a\"}", DSMOE_PROMPT_FILE_AUTO, &defaults, 64); // by the name, any case
    expect_tokens(&l->items[0], "a", 1);
    dsmoe_prompts_free(l);
    l = read_ok("p.txt", "{\"prompt\": \"a\"}", DSMOE_PROMPT_FILE_JSONL, &defaults, 64); // the format given wins
    expect_tokens(&l->items[0], "a", 1);
    dsmoe_prompts_free(l);
}

static void test_context(void **state) {
    (void)state;
    // 3 tokens + 8 new = 11 > 10: an error by default, max_new_tokens 7 when clipped.
    dsmoe_prompt_defaults d = defaults;
    dsmoe_prompt_list *l = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_prompts_read_mem("p.txt", "ab\nabc\n", 4, DSMOE_PROMPT_FILE_AUTO, bytes256, &d, 10, &l, &err),
                     DSMOE_OK); // "ab\na": 2 + 8 and 1 + 8 fit
    dsmoe_prompts_free(l);
    assert_int_equal(dsmoe_prompts_read_mem("p.txt", "ab\nabc\n", 7, DSMOE_PROMPT_FILE_AUTO, bytes256, &d, 10, &l, &err),
                     DSMOE_ERR_INVALID);
    assert_null(l);
    assert_string_equal(err.msg, "p.txt:2: the prompt's 3 tokens + max_new_tokens 8 = 11 exceed the context limit of 10 "
                        "tokens (shorten the prompt or lower max_new_tokens)");
    d.clip_to_context = 1;
    l = read_ok("p.txt", "ab\nabc\n", DSMOE_PROMPT_FILE_AUTO, &d, 10);
    assert_int_equal(l->items[0].max_new_tokens, 8);
    assert_int_equal(l->items[1].max_new_tokens, 7);
    dsmoe_prompts_free(l);
    assert_int_equal(dsmoe_prompts_read_mem("p.txt", "0123456789", 10, DSMOE_PROMPT_FILE_AUTO, bytes256, &d, 10, &l, &err),
                     DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "p.txt:1: the prompt has 10 tokens but the context limit is 10 tokens: no room"));
}

// ---------------------------------------------------------------------------------------------------
// Errors

static void expect_error_with(dsmoe_tokenizer *tok, const char *name, const char *text, size_t len,
                              const dsmoe_prompt_defaults *d, int context, const char *msg) {
    dsmoe_prompt_list *l = NULL;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_prompts_read_mem(name, text, len, DSMOE_PROMPT_FILE_AUTO, tok, d, context, &l, &err);
    if (s == DSMOE_OK) fail_msg("%s: accepted \"%s\", expected: %s", name, text, msg);
    assert_null(l);
    if (!strstr(err.msg, msg)) fail_msg("message\n  got:      %s\n  expected: ...%s...", err.msg, msg);
}

static void expect_error(const char *name, const char *text, const char *msg) {
    expect_error_with(bytes256, name, text, strlen(text), &defaults, 64, msg);
}

static void test_errors(void **state) {
    (void)state;
    expect_error("p.txt", "", "p.txt is empty: no prompts");
    expect_error("p.txt", "\n\r\n\n", "p.txt: no prompts (3 lines, all empty)");
    expect_error("p.jsonl", " \n\t\n", "p.jsonl: no prompts (2 lines, all blank)");
    expect_error_with(bytes256, "p.txt", "ab\0c\n", 5, &defaults, 64, "p.txt:1:3: NUL byte in a text prompt file");
    expect_error("p.jsonl", "{\"prompt\": \"a\"}\n{\"prompt\": \"a\",}", "p.jsonl:2:16: expected a string, found '}'");
    expect_error("p.jsonl", "[1]", "p.jsonl:1:1: expected '{' (each line of a JSON-lines prompt file is one object), found '['");
    expect_error("p.jsonl", "{\"prompt\": \"a\"} x", "p.jsonl:1:17: expected the end of the line after the object, found 'x'");
    expect_error("p.jsonl", "{\"prompt\": \"a\"", "p.jsonl:1:15: expected ',' or '}', found the end of the line");
    expect_error("p.jsonl", "{\"prompt\": \"a\xff\"}", "p.jsonl:1:14: expected valid UTF-8 in a string, found byte 0xff");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"temp\": 1}",
                 "p.jsonl:1:17: unknown field \"temp\" (known: prompt, tokens, id, max_new_tokens, temperature, top_k, "
                 "top_p, seed, stop)");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"prompt\": \"b\"}", "p.jsonl:1:17: field \"prompt\" appears twice");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"tokens\": [1]}", "p.jsonl:1: the line has both \"prompt\" (text) and \"tokens\" (ids)");
    expect_error("p.jsonl", "\n{\"id\": 3}", "p.jsonl:2: the line has neither \"prompt\" (text) nor \"tokens\" (ids)");
    expect_error("p.jsonl", "{\"tokens\": [1, 256]}", "p.jsonl:1:16: token id 256 is outside the model's vocabulary [0, 256) (model.vocab)");
    expect_error("p.jsonl", "{\"tokens\": [-1]}", "p.jsonl:1:13: token id -1 is outside");
    expect_error("p.jsonl", "{\"tokens\": [1.5]}", "p.jsonl:1:14: expected an integer, found '.'");
    expect_error("p.jsonl", "{\"tokens\": 5}", "p.jsonl:1:12: expected '[' (\"tokens\" is an array of token ids), found '5'");
    expect_error_with(bytes300, "p.jsonl", "{\"tokens\": [1, 299]}", 20, &defaults, 64,
                      "p.jsonl:1:16: unknown token id 299: the byte tokenizer knows ids 0..255");
    expect_error("p.jsonl", "{\"prompt\": \"\"}", "p.jsonl:1: the prompt is empty (0 tokens)");
    expect_error("p.jsonl", "{\"tokens\": []}", "p.jsonl:1: the prompt is empty (0 tokens)");
    // Settings out of range, at the value's column.
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"temperature\": -0.5}", "p.jsonl:1:32: \"temperature\" is -0.5: expected >= 0");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"temperature\": \"hot\"}", "p.jsonl:1:32: expected a number, found '\"'");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"top_p\": 0}", "p.jsonl:1:26: \"top_p\" is 0: expected a number in (0, 1]");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"top_p\": 1.5}", "\"top_p\" is 1.5: expected a number in (0, 1]");
    // Values the sampler's floats cannot hold, refused as the deck refuses them (not by the kernel mid-run).
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"temperature\": 1e39}", "p.jsonl:1:32: \"temperature\" is 1e+39: does not fit in a float");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"temperature\": 1e-50}", "\"temperature\" is 1e-50: does not fit in a float");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"top_p\": 1e-50}", "p.jsonl:1:26: \"top_p\" is 1e-50: does not fit in a float");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"top_k\": -1}", "p.jsonl:1:26: \"top_k\" is -1: expected an integer in [0, 2147483647] (0 = every token)");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"max_new_tokens\": 0}", "\"max_new_tokens\" is 0: expected an integer in [1, 2147483647]");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"max_new_tokens\": 3000000000}", "\"max_new_tokens\" is 3000000000: expected");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"seed\": -1}", "p.jsonl:1:25: expected a non-negative integer, found '-'");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"stop\": \"\"}", "p.jsonl:1:25: a stop sequence is empty");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"stop\": 5}", "p.jsonl:1:25: expected a string or an array of strings, found '5'");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"stop\": [\"x\", 1]}", "p.jsonl:1:31: expected a string (a stop sequence), found '1'");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"id\": \"\"}", "p.jsonl:1:23: \"id\" must be a non-empty string");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"id\": \"a\\u0000\"}", "\"id\" must be a non-empty string without \\u0000");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"id\": true}", "p.jsonl:1:23: expected a string or an integer (the prompt's id), found 't'");
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"id\": 1.5}", "p.jsonl:1:24: expected an integer, found '.'");
    // Ids: repeated, or the same as another prompt's line number.
    expect_error("p.jsonl", "{\"prompt\": \"a\", \"id\": \"x\"}\n{\"prompt\": \"b\", \"id\": \"x\"}",
                 "p.jsonl:2: the id x is also the id of line 1");
    expect_error("p.jsonl", "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"id\": 1}", "p.jsonl:2: the id 1 is also the id of line 1");
    // The defaults are checked as the deck checks them.
    dsmoe_prompt_defaults d = defaults;
    d.max_new_tokens = 0;
    expect_error_with(bytes256, "p.txt", "a", 1, &d, 64, "generate.max_new_tokens = 0: expected >= 1");
    d = defaults, d.top_p = 0;
    expect_error_with(bytes256, "p.txt", "a", 1, &d, 64, "generate.top_p = 0: expected a number in (0, 1]");
    d = defaults, d.temperature = -1;
    expect_error_with(bytes256, "p.txt", "a", 1, &d, 64, "generate.temperature = -1: expected >= 0");
    d = defaults, d.top_k = -2;
    expect_error_with(bytes256, "p.txt", "a", 1, &d, 64, "generate.top_k = -2: expected >= 0");
    expect_error_with(bytes256, "p.txt", "a", 1, &defaults, 1, "the context limit is 1 tokens");
    dsmoe_prompt_list *l;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_prompts_read_mem("p", "a", 1, 7, bytes256, &defaults, 64, &l, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "unknown prompt file format 7"));
}

// A tokenizer without text (token ids only): prompts as ids, every id of the model; text is refused
// wherever it appears, naming the line (and column), and "stop": [] (none) is allowed.
static void expect_ids_error(const char *name, const char *text, const dsmoe_prompt_defaults *d, const char *msg) {
    expect_error_with(ids64, name, text, strlen(text), d, 64, msg);
}

static void test_ids_only(void **state) {
    (void)state;
    const dsmoe_prompt_defaults no_stop = {.max_new_tokens = 8, .temperature = 0, .top_p = 1};
    const char *text = "{\"tokens\": [0, 63, 7], \"id\": \"a\"}\n{\"tokens\": [5], \"stop\": [], \"max_new_tokens\": 2}\n";
    dsmoe_prompt_list *l = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_prompts_read_mem("p.jsonl", text, strlen(text), DSMOE_PROMPT_FILE_AUTO, ids64, &no_stop, 64,
                                            &l, &err), DSMOE_OK);
    assert_int_equal(l->n, 2);
    assert_int_equal(l->items[0].n_tokens, 3);
    assert_int_equal(l->items[0].tokens[0], 0);
    assert_int_equal(l->items[0].tokens[1], 63);
    assert_int_equal(l->items[0].tokens[2], 7);
    assert_int_equal(l->items[1].n_tokens, 1);
    assert_int_equal(l->items[1].max_new_tokens, 2);
    assert_int_equal(l->items[1].n_stop, 0);
    dsmoe_prompts_free(l);

    expect_ids_error("p.txt", "hello\n", &no_stop,
                     "p.txt:1: a text prompt, but the tokenizer is token ids only (model.vocab 64), without text");
    expect_ids_error("p.jsonl", "{\"tokens\": [1]}\n{\"id\": 3, \"prompt\": \"hi\"}", &no_stop,
                     "p.jsonl:2:21: \"prompt\" is text, but the tokenizer is token ids only");
    expect_ids_error("p.jsonl", "{\"tokens\": [1], \"stop\": [\"x\"]}", &no_stop,
                     "p.jsonl:1:26: a stop sequence is text");
    expect_ids_error("p.jsonl", "{\"tokens\": [1, 64]}", &no_stop,
                     "p.jsonl:1:16: token id 64 is outside the model's vocabulary [0, 64)");
    expect_ids_error("p.jsonl", "{\"tokens\": [1]}", &defaults, // its stop: "\n\n"
                     "generate.stop is text, but the tokenizer is token ids only");
}

static void test_files(void **state) {
    (void)state;
    dsmoe_prompt_list *l = NULL;
    dsmoe_err err = {0};
    write_bytes(path_of("p.jsonl"), "{\"prompt\": \"ok\"}\n", 17);
    assert_int_equal(dsmoe_prompts_read(path_of("p.jsonl"), DSMOE_PROMPT_FILE_AUTO, bytes256, &defaults, 64, &l, &err), DSMOE_OK);
    assert_int_equal(l->n, 1);
    expect_tokens(&l->items[0], "ok", 2);
    dsmoe_prompts_free(l);
    write_bytes(path_of("bad.jsonl"), "{\"prompt\": \"ok\"}\n{\n", 19);
    assert_int_equal(dsmoe_prompts_read(path_of("bad.jsonl"), DSMOE_PROMPT_FILE_AUTO, bytes256, &defaults, 64, &l, &err),
                     DSMOE_ERR_IO);
    assert_non_null(strstr(err.msg, "bad.jsonl:2:2: expected a string, found the end of the line"));
    write_bytes(path_of("empty.txt"), "", 0);
    assert_int_equal(dsmoe_prompts_read(path_of("empty.txt"), DSMOE_PROMPT_FILE_AUTO, bytes256, &defaults, 64, &l, &err),
                     DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "empty.txt is empty: no prompts"));
    assert_int_equal(dsmoe_prompts_read(path_of("none.txt"), DSMOE_PROMPT_FILE_AUTO, bytes256, &defaults, 64, &l, &err),
                     DSMOE_ERR_IO);
    assert_non_null(strstr(err.msg, "cannot open prompt file '"));
    assert_int_equal(mkfifo(path_of("fifo"), 0600), 0);
    assert_int_equal(dsmoe_prompts_read(path_of("fifo"), DSMOE_PROMPT_FILE_AUTO, bytes256, &defaults, 64, &l, &err), DSMOE_ERR_IO);
    assert_non_null(strstr(err.msg, "fifo': it is a FIFO (named pipe), not a regular file"));
    assert_null(l);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text),   cmocka_unit_test(test_jsonl), cmocka_unit_test(test_context), cmocka_unit_test(test_ids_only),
        cmocka_unit_test(test_errors), cmocka_unit_test(test_files),
    };
    return cmocka_run_group_tests(tests, setup, done);
}
