// tests/io/test_json.c: the JSON reader and writer (core/io/json.c). Strings with every escape, surrogate
// pairs and \u0000 (visible through the length, refused with NO_NUL); integers at the int64 and uint64
// edges, strictness (leading zeros, fractions) and DSMOE_JSON_WHOLE; numbers; literals; skip's nesting
// limit; positions in messages as line:column and as byte offsets; the writer's escapes against
// hand-written literals, invalid UTF-8 included; the UTF-8 decoder; whole-file reading refusing FIFOs,
// directories, missing and oversized files.
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

#include "json.h"

#include "test_tmpdir.h" // dir, path_of, write_bytes, teardown

static int setup(void **state) {
    (void)state;
    return tmpdir_create("json");
}

static dsmoe_err err;

static dsmoe_json cursor(const char *text, unsigned flags) {
    dsmoe_json j;
    dsmoe_json_init(&j, text, strlen(text), "t.json", 1, &err);
    j.flags = flags;
    return j;
}

static void expect_msg(const char *msg) {
    if (!strstr(err.msg, msg)) fail_msg("message\n  got:      %s\n  expected: ...%s...", err.msg, msg);
}

static void test_strings(void **state) {
    (void)state;
    dsmoe_buf b = {0};
    dsmoe_json j = cursor("\"a\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00z\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_OK);
    // a " \ / BS FF LF CR TAB, U+00E9 = C3 A9, U+1F600 = F0 9F 98 80 (the pair D83D DE00), z
    const char want[] = "a\"\\/\b\f\n\r\t\xC3\xA9\xF0\x9F\x98\x80z";
    assert_int_equal(b.len, sizeof want - 1);
    assert_memory_equal(b.p, want, sizeof want - 1);
    assert_true(j.p == j.end);

    j = cursor("\"x\\u0000y\"", 0); // visible to the caller through the length
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_OK);
    assert_int_equal(b.len, 3);
    assert_memory_equal(b.p, "x\0y", 3);
    j = cursor("\"x\\u0000y\"", DSMOE_JSON_NO_NUL);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    expect_msg("t.json:1:4: expected u and four hex digits (not 0000), found 'u'");

    // Hex digits are 0-9, a-f, A-F only: bytes 0x10-0x19 are not the digits they become with the case bit
    // set (nor "g", "G" or ":"), and upper case reads as lower.
    j = cursor("\"\\u00\x16" "1\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    expect_msg("t.json:1:3: expected u and four hex digits, found 'u'");
    j = cursor("\"\\u00G1\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    j = cursor("\"\\u00:1\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    j = cursor("\"\\u00E9\\u00eA\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_OK);
    assert_int_equal(b.len, 4);
    assert_memory_equal(b.p, "\xC3\xA9\xC3\xAA", 4);
    j = cursor("\"\\udc00\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    expect_msg("expected no lone low surrogate");
    j = cursor("\"\\ud800x\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    expect_msg("expected the low half of a \\u surrogate pair");
    j = cursor("\"a\tb\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    expect_msg("t.json:1:3: expected a string character (control characters must be escaped), found byte 0x09");
    j = cursor("\"\\q\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    expect_msg("expected an escape");
    j = cursor("\"abc", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    expect_msg("t.json:1:5: expected the closing quote of a string, found the end of the input");

    // Raw bytes: passed through, or checked as UTF-8 with DSMOE_JSON_UTF8.
    j = cursor("\"\xC3\xA9\xFF\"", 0);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_OK);
    assert_int_equal(b.len, 3);
    j = cursor("\"\xC3\xA9\xFF\"", DSMOE_JSON_UTF8);
    assert_int_equal(dsmoe_json_string(&j, &b), DSMOE_ERR_IO);
    expect_msg("t.json:1:4: expected valid UTF-8 in a string, found byte 0xff");

    char *dup = NULL;
    j = cursor("  \"k\" : 1", 0);
    assert_int_equal(dsmoe_json_key(&j, &b), DSMOE_OK);
    assert_string_equal(b.p, "k");
    j = cursor("\"dup\"", 0);
    assert_int_equal(dsmoe_json_string_dup(&j, &dup), DSMOE_OK);
    assert_string_equal(dup, "dup");
    free(dup);
    free(b.p);
}

static void test_integers(void **state) {
    (void)state;
    int64_t v;
    uint64_t u;
    dsmoe_json j = cursor("0", 0);
    assert_int_equal(dsmoe_json_int(&j, INT64_MIN, INT64_MAX, 0, &v), DSMOE_OK);
    assert_int_equal(v, 0);
    j = cursor(" -17 ", 0);
    assert_int_equal(dsmoe_json_int(&j, INT64_MIN, INT64_MAX, 0, &v), DSMOE_OK);
    assert_int_equal(v, -17);
    j = cursor("9223372036854775807", 0);
    assert_int_equal(dsmoe_json_int(&j, INT64_MIN, INT64_MAX, 0, &v), DSMOE_OK);
    assert_true(v == INT64_MAX);
    j = cursor("-9223372036854775808", 0);
    assert_int_equal(dsmoe_json_int(&j, INT64_MIN, INT64_MAX, 0, &v), DSMOE_OK);
    assert_true(v == INT64_MIN);
    j = cursor("9223372036854775808", 0);
    assert_int_equal(dsmoe_json_int(&j, INT64_MIN, INT64_MAX, 0, &v), DSMOE_ERR_IO);
    expect_msg("t.json:1:19: expected an integer below 2^63, found '8'");
    j = cursor("18446744073709551615", 0);
    assert_int_equal(dsmoe_json_u64(&j, UINT64_MAX, 0, &u), DSMOE_OK);
    assert_true(u == UINT64_MAX);
    j = cursor("18446744073709551616", 0);
    assert_int_equal(dsmoe_json_u64(&j, UINT64_MAX, 0, &u), DSMOE_ERR_IO);
    expect_msg("expected an integer below 2^64");
    j = cursor("-1", 0);
    assert_int_equal(dsmoe_json_int(&j, 0, 10, 0, &v), DSMOE_ERR_IO);
    expect_msg("t.json:1:1: expected a non-negative integer, found '-'");
    j = cursor("012", 0);
    assert_int_equal(dsmoe_json_int(&j, 0, 100, 0, &v), DSMOE_ERR_IO);
    expect_msg("expected a non-negative integer, found '0'");
    j = cursor("1.0", 0);
    assert_int_equal(dsmoe_json_int(&j, 0, 100, 0, &v), DSMOE_ERR_IO);
    expect_msg("t.json:1:2: expected an integer, found '.'");
    j = cursor("11", 0);
    assert_int_equal(dsmoe_json_int(&j, 0, 10, 0, &v), DSMOE_ERR_IO);
    expect_msg("t.json:1:1: expected an integer in [0, 10], found 11");
    // DSMOE_JSON_WHOLE: fractions and exponents of whole values.
    j = cursor("2.0", 0);
    assert_int_equal(dsmoe_json_int(&j, 0, 100, DSMOE_JSON_WHOLE, &v), DSMOE_OK);
    assert_int_equal(v, 2);
    j = cursor("1e3", 0);
    assert_int_equal(dsmoe_json_int(&j, 0, 10000, DSMOE_JSON_WHOLE, &v), DSMOE_OK);
    assert_int_equal(v, 1000);
    j = cursor("-2.5e1", 0);
    assert_int_equal(dsmoe_json_int(&j, -100, 100, DSMOE_JSON_WHOLE, &v), DSMOE_OK);
    assert_int_equal(v, -25);
    j = cursor("1.5", 0);
    assert_int_equal(dsmoe_json_int(&j, 0, 100, DSMOE_JSON_WHOLE, &v), DSMOE_ERR_IO);
    expect_msg("expected a whole number");
    j = cursor("-3.0", 0);
    assert_int_equal(dsmoe_json_u64(&j, UINT64_MAX, DSMOE_JSON_WHOLE, &u), DSMOE_ERR_IO);
    expect_msg("expected a non-negative integer");
}

static void test_numbers_literals(void **state) {
    (void)state;
    double d;
    int b;
    dsmoe_json j = cursor("-0.25", 0);
    assert_int_equal(dsmoe_json_number(&j, &d), DSMOE_OK);
    assert_true(d == -0.25);
    j = cursor("1.5e-3", 0);
    assert_int_equal(dsmoe_json_number(&j, &d), DSMOE_OK);
    assert_true(d == 1.5e-3);
    j = cursor("1e999", 0);
    assert_int_equal(dsmoe_json_number(&j, &d), DSMOE_ERR_IO);
    expect_msg("expected a finite number");
    j = cursor("1.", 0);
    assert_int_equal(dsmoe_json_number(&j, &d), DSMOE_ERR_IO);
    expect_msg("t.json:1:3: expected a digit, found the end of the input");
    j = cursor(".5", 0);
    assert_int_equal(dsmoe_json_number(&j, &d), DSMOE_ERR_IO);
    expect_msg("t.json:1:1: expected a number, found '.'");
    j = cursor("true false nul", 0);
    assert_int_equal(dsmoe_json_bool(&j, &b), DSMOE_OK);
    assert_int_equal(b, 1);
    assert_int_equal(dsmoe_json_bool(&j, &b), DSMOE_OK);
    assert_int_equal(b, 0);
    assert_int_equal(dsmoe_json_null(&j), 0); // "nul" is not null; nothing read
    assert_int_equal(dsmoe_json_bool(&j, &b), DSMOE_ERR_IO);
    expect_msg("t.json:1:12: expected true or false, found 'n'");
    j = cursor(" null", 0);
    assert_int_equal(dsmoe_json_null(&j), 1);
}

static void test_structure_and_skip(void **state) {
    (void)state;
    // {"a": [1, {"b": null}], "c": "x"} walked by hand: begin / key / next.
    dsmoe_json j = cursor("{\"a\": [1, {\"b\": null}], \"c\": \"x\"}", 0);
    dsmoe_buf k = {0};
    int more, keys = 0;
    for (more = dsmoe_json_begin(&j, '{', "'{'"); more > 0; more = dsmoe_json_next(&j, '}')) {
        assert_int_equal(dsmoe_json_key(&j, &k), DSMOE_OK);
        assert_string_equal(k.p, keys == 0 ? "a" : "c");
        assert_int_equal(dsmoe_json_skip(&j), DSMOE_OK);
        keys++;
    }
    assert_int_equal(more, 0);
    assert_int_equal(keys, 2);
    assert_int_equal(dsmoe_json_end(&j, "the end"), DSMOE_OK);
    j = cursor("[]", 0);
    assert_int_equal(dsmoe_json_begin(&j, '[', "'['"), 0);
    j = cursor("[1,]", 0);
    assert_int_equal(dsmoe_json_begin(&j, '[', "'['"), 1);
    assert_int_equal(dsmoe_json_skip(&j), DSMOE_OK);
    assert_int_equal(dsmoe_json_next(&j, ']'), 1);
    assert_int_equal(dsmoe_json_skip(&j), DSMOE_ERR_IO); // no trailing commas
    expect_msg("t.json:1:4: expected a JSON value, found ']'");
    j = cursor("[1 2]", 0);
    assert_int_equal(dsmoe_json_begin(&j, '[', "'['"), 1);
    assert_int_equal(dsmoe_json_skip(&j), DSMOE_OK);
    assert_int_equal(dsmoe_json_next(&j, ']'), -1);
    expect_msg("t.json:1:4: expected ',' or ']', found '2'");

    // 64 levels of nesting are skipped, 65 are not.
    char deep[200];
    for (int levels = 64; levels <= 65; levels++) {
        memset(deep, '[', (size_t)levels);
        memset(deep + levels, ']', (size_t)levels);
        deep[2 * levels] = '\0';
        j = cursor(deep, 0);
        assert_int_equal(dsmoe_json_skip(&j), levels == 64 ? DSMOE_OK : DSMOE_ERR_IO);
    }
    expect_msg("t.json:1:65: expected at most 64 levels of nesting, found '['");
    j = cursor("[true]", DSMOE_JSON_NO_LITERALS);
    assert_int_equal(dsmoe_json_skip(&j), DSMOE_ERR_IO);
    expect_msg("expected a string, number, array or object, found 't'");
    j = cursor("[01]", 0);
    assert_int_equal(dsmoe_json_skip(&j), DSMOE_ERR_IO);
    expect_msg("t.json:1:2: expected a number without leading zeros");
    free(k.p);
}

static void test_positions(void **state) {
    (void)state;
    // Line and column (bytes, from 1) of the failure, the cursor starting on line 7.
    const char *text = "{\n  \"a\": 1,\n  \"b\" x\n}";
    dsmoe_json j;
    dsmoe_json_init(&j, text, strlen(text), "f.jsonl", 7, &err);
    dsmoe_buf k = {0};
    assert_int_equal(dsmoe_json_begin(&j, '{', "'{'"), 1);
    assert_int_equal(dsmoe_json_key(&j, &k), DSMOE_OK);
    assert_int_equal(dsmoe_json_skip(&j), DSMOE_OK);
    assert_int_equal(dsmoe_json_next(&j, '}'), 1);
    assert_int_equal(dsmoe_json_key(&j, &k), DSMOE_ERR_IO);
    expect_msg("f.jsonl:9:7: expected ':', found 'x'");
    char where[64];
    dsmoe_json_where(&j, text + 2, where, sizeof where);
    assert_string_equal(where, "f.jsonl:8:1");
    // Byte offsets for binary formats: the text starts at byte 8 of the file.
    dsmoe_json_init(&j, "{x", 2, "f.safetensors", 1, &err);
    j.byte_label = "bad JSON header", j.byte_base = 8, j.end_name = "the end of the header";
    assert_int_equal(dsmoe_json_begin(&j, '{', "'{'"), 1);
    assert_int_equal(dsmoe_json_key(&j, &k), DSMOE_ERR_IO);
    assert_string_equal(err.msg, "f.safetensors: bad JSON header at byte 9: expected a string, found 'x'");
    assert_int_equal(dsmoe_json_errorf(&j, j.start, DSMOE_ERR_INVALID, "custom %d", 5), DSMOE_ERR_INVALID);
    assert_string_equal(err.msg, "f.safetensors: bad JSON header at byte 8: custom 5");
    free(k.p);
}

static void expect_written(const char *in, size_t n, const char *want) {
    dsmoe_buf b = {0};
    dsmoe_json_write_string(&b, in, n);
    if (b.len != strlen(want) || memcmp(b.p, want, b.len) != 0) fail_msg("wrote %s, expected %s", b.p, want);
    free(b.p);
}

static void test_writer(void **state) {
    (void)state;
    expect_written("plain", 5, "\"plain\"");
    expect_written("", 0, "\"\"");
    expect_written("q\"b\\n\nr\rt\t", 10, "\"q\\\"b\\\\n\\nr\\rt\\t\"");
    expect_written("\x01\x1f\x7f", 3, "\"\\u0001\\u001f\x7f\"");     // DEL is valid JSON as it is
    expect_written("a\0b", 3, "\"a\\u0000b\"");
    expect_written("\xC3\xA9\xF0\x9F\x98\x80", 6, "\"\xC3\xA9\xF0\x9F\x98\x80\""); // valid UTF-8 as it is
    expect_written("\xFF", 1, "\"\\ufffd\"");
    expect_written("\xC0\x80", 2, "\"\\ufffd\\ufffd\"");                 // overlong NUL: two bad bytes
    expect_written("\xED\xA0\x80", 3, "\"\\ufffd\\ufffd\\ufffd\"");      // a surrogate
    expect_written("\xE2\x82", 2, "\"\\ufffd\\ufffd\"");                  // cut short
    expect_written("\xF4\x90\x80\x80", 4, "\"\\ufffd\\ufffd\\ufffd\\ufffd\""); // above U+10FFFF
    expect_written("x\xE2\x82\xAC", 4, "\"x\xE2\x82\xAC\"");             // U+20AC
    // What the writer writes reads back, for valid UTF-8.
    const char *s = "a\"\\\n\x01\xC3\xA9";
    dsmoe_buf b = {0}, r = {0};
    dsmoe_json_write_string(&b, s, strlen(s));
    dsmoe_json j;
    dsmoe_json_init(&j, b.p, b.len, "w", 1, &err);
    assert_int_equal(dsmoe_json_string(&j, &r), DSMOE_OK);
    assert_int_equal(r.len, strlen(s));
    assert_memory_equal(r.p, s, r.len);
    free(b.p), free(r.p);
}

static void test_utf8(void **state) {
    (void)state;
    uint32_t cp;
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"A", 1, &cp), 1);
    assert_int_equal(cp, 0x41);
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"\xDF\xBF", 2, &cp), 2);
    assert_int_equal(cp, 0x7FF);
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"\xEF\xBF\xBF", 3, &cp), 3);
    assert_int_equal(cp, 0xFFFF);
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"\xF4\x8F\xBF\xBF", 4, &cp), 4);
    assert_int_equal(cp, 0x10FFFF);
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"\x80", 1, &cp), 0);
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"\xC1\xBF", 2, &cp), 0);     // overlong
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"\xE0\x9F\xBF", 3, &cp), 0); // overlong
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"\xF0\x8F\xBF\xBF", 4, &cp), 0);
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"\xED\xBF\xBF", 3, &cp), 0); // surrogate
    assert_int_equal(dsmoe_utf8_next((const uint8_t *)"\xEF\xBF\xBF", 2, &cp), 0); // cut short
}

static void test_read_file(void **state) {
    (void)state;
    char *data;
    size_t len;
    write_bytes(path_of("ok.txt"), "abc", 3);
    assert_int_equal(dsmoe_read_regular_file(path_of("ok.txt"), "test file", 100, &data, &len, &err), DSMOE_OK);
    assert_int_equal(len, 3);
    assert_string_equal(data, "abc");
    free(data);
    assert_int_equal(dsmoe_read_regular_file(path_of("ok.txt"), "test file", 2, &data, &len, &err), DSMOE_ERR_INVALID);
    expect_msg("has 3 bytes, more than the 2");
    assert_null(data);
    assert_int_equal(dsmoe_read_regular_file(path_of("missing"), "test file", 100, &data, &len, &err), DSMOE_ERR_IO);
    expect_msg("cannot open test file '");
    assert_int_equal(dsmoe_read_regular_file(dir, "test file", 100, &data, &len, &err), DSMOE_ERR_IO);
    expect_msg("it is a directory, not a regular file");
    assert_int_equal(mkfifo(path_of("fifo"), 0600), 0);
    assert_int_equal(dsmoe_read_regular_file(path_of("fifo"), "test file", 100, &data, &len, &err), DSMOE_ERR_IO);
    expect_msg("it is a FIFO (named pipe), not a regular file");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_strings),   cmocka_unit_test(test_integers), cmocka_unit_test(test_numbers_literals),
        cmocka_unit_test(test_structure_and_skip), cmocka_unit_test(test_positions), cmocka_unit_test(test_writer),
        cmocka_unit_test(test_utf8),      cmocka_unit_test(test_read_file),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
