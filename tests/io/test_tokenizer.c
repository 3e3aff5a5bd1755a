// tests/io/test_tokenizer.c: the byte and GPT-2 BPE tokenizers (core/io/tokenizer.c).
// A small vocab.json / merges.txt written here (GPT-2's byte-to-unicode map re-implemented below from
// encoder.py), with encodings worked out by hand from the merge ranks; GPT-2's pre-tokenisation pattern
// against hand-split examples; round trips of arbitrary bytes (invalid UTF-8, NUL, newlines, non-ASCII
// letters and digits) through both tokenizers; every error of the files, each naming file and line; the
// real GPT-2 files when DSMOE_GPT2_DIR (or a known location) has them, skipped otherwise.
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

#include "tokenizer.h"

#include "test_tmpdir.h" // dir, path_of, write_bytes, teardown

static int setup(void **state) {
    (void)state;
    return tmpdir_create("tok");
}

// ---------------------------------------------------------------------------------------------------
// The small pair. Ids: byte b = b; then the merge results and two special entries:
//   256 he   257 ll   258 hell   259 hello   260 Ġw   261 or   262 Ġwor   263 ld   264 Ġworld
//   265 <|endoftext|>   266 wo   267 "<sp ace>" (a key outside the byte alphabet)
// merges.txt, rank = order: h e | l l | he ll | hell o | Ġ w | o r | Ġw or | l d | Ġwor ld | w o
// (Ġ is GPT-2's symbol for the space byte.) model.vocab is 300: ids 268..299 are padding.

#define MODEL_VOCAB 300

static int printable(int b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); }

// GPT-2's bytes_to_unicode(): printable bytes are themselves, the others U+0100 on in byte order.
static int gpt2_cp(int b) {
    if (printable(b)) return b;
    int n = 0;
    for (int c = 0; c < b; c++) n += !printable(c);
    return 256 + n;
}

static char vocab[1 << 16];
static size_t vlen;

static void vput(const char *s) {
    size_t n = strlen(s);
    assert_true(vlen + n < sizeof vocab);
    memcpy(vocab + vlen, s, n + 1);
    vlen += n;
}

// The JSON key of raw token bytes: each byte's symbol as UTF-8, '"' and '\' escaped.
static void put_key(const char *raw, size_t n) {
    vput("\"");
    for (size_t i = 0; i < n; i++) {
        int cp = gpt2_cp((unsigned char)raw[i]);
        char u[4] = {0};
        if (cp == '"' || cp == '\\') u[0] = '\\', u[1] = (char)cp;
        else if (cp < 0x80) u[0] = (char)cp;
        else u[0] = (char)(0xC0 | cp >> 6), u[1] = (char)(0x80 | (cp & 63));
        vput(u);
    }
    vput("\"");
}

// vocab.json with every byte but `skip_byte` (-1: none), the merge tokens, and `extra` entries (",..." text).
static void build_vocab(int skip_byte, const char *extra) {
    vlen = 0;
    vocab[0] = '\0';
    vput("{");
    char num[32];
    for (int b = 0; b < 256; b++) {
        if (b == skip_byte) continue;
        char c = (char)b;
        if (vlen > 1) vput(", ");
        put_key(&c, 1);
        snprintf(num, sizeof num, ": %d", b);
        vput(num);
    }
    static const char *merged[] = {"he", "ll", "hell", "hello", " w", "or", " wor", "ld", " world"};
    for (int i = 0; i < 9; i++) {
        vput(",\n ");
        put_key(merged[i], strlen(merged[i]));
        snprintf(num, sizeof num, ": %d", 256 + i);
        vput(num);
    }
    vput(", \"<|endoftext|>\": 265, \"wo\": 266, \"<sp ace>\": 267");
    vput(extra);
    vput("}\n");
}

static const char merges_txt[] = "#version: 0.2\nh e\nl l\nhe ll\nhell o\n\xC4\xA0 w\no r\n\xC4\xA0w or\nl d\n\xC4\xA0wor ld\nw o\n";

static dsmoe_tokenizer *open_pair(const char *merges, int model_vocab) {
    write_bytes(path_of("v.json"), vocab, vlen);
    write_bytes(path_of("m.txt"), merges, strlen(merges));
    dsmoe_tokenizer *t = NULL;
    dsmoe_err err = {0};
    if (dsmoe_tokenizer_open_bpe(path_of("v.json"), path_of("m.txt"), model_vocab, &t, &err) != DSMOE_OK)
        fail_msg("open: %s", err.msg);
    return t;
}

static void expect_ids(dsmoe_tokenizer *t, const char *text, size_t len, const int32_t *want, size_t n) {
    int32_t *ids;
    size_t got;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_tokenizer_encode(t, text, len, &ids, &got, &err), DSMOE_OK);
    int same = got == n;
    for (size_t i = 0; same && i < n; i++) same = ids[i] == want[i];
    if (!same) {
        char g[512] = "", w[512] = "";
        for (size_t i = 0; i < got && i < 40; i++) snprintf(g + strlen(g), sizeof g - strlen(g), "%d ", ids[i]);
        for (size_t i = 0; i < n; i++) snprintf(w + strlen(w), sizeof w - strlen(w), "%d ", want[i]);
        fail_msg("encode \"%s\": got [%s], expected [%s]", text, g, w);
    }
    free(ids);
}
#define EXPECT(t, text, ...)                                                                                            \
    do {                                                                                                               \
        const int32_t want_[] = {__VA_ARGS__};                                                                         \
        expect_ids(t, text, sizeof text - 1, want_, sizeof want_ / sizeof want_[0]);                                  \
    } while (0)

static void test_hand_worked(void **state) {
    (void)state;
    build_vocab(-1, "");
    dsmoe_tokenizer *t = open_pair(merges_txt, MODEL_VOCAB);
    assert_string_equal(dsmoe_tokenizer_describe(t), "GPT-2 BPE: 268 tokens, 10 merges (model.vocab 300)");
    assert_int_equal(dsmoe_tokenizer_vocab(t), MODEL_VOCAB);
    assert_int_equal(dsmoe_tokenizer_eot(t), 265);
    // "hello": h e l l o -(0: h e)-> he l l o -(1: l l)-> he ll o -(2)-> hell o -(3)-> hello.
    // " world": Ġ w o r l d; ranks present 4 (Ġ w), 5 (o r), 7 (l d), 9 (w o): 4 -> Ġw o r l d, then
    // 5 -> Ġw or l d, then 6 (Ġw or) -> Ġwor l d, then 7 -> Ġwor ld, then 8 -> Ġworld.
    EXPECT(t, "hello world", 259, 264);
    EXPECT(t, "hell", 258);
    EXPECT(t, "help", 256, 'l', 'p');             // he l p: no merge of (he, l) or (l, p)
    EXPECT(t, "lll", 257, 'l');                   // (l l) taken leftmost first
    EXPECT(t, "llll", 257, 257);                  // every occurrence, left to right
    EXPECT(t, "wor", 'w', 261);                   // (o r) rank 5 before (w o) rank 9: w or, no (w, or)
    EXPECT(t, "wo", 266);
    EXPECT(t, " wor", 262);                       // Ġ w o r -> Ġw o r -> Ġw or -> Ġwor
    EXPECT(t, "he's", 256, '\'', 's');            // pieces "he" "'s"
    EXPECT(t, "  hello", ' ', ' ', 259);          // pieces " " " hello"; (Ġ h) has no merge
    EXPECT(t, "hello\nworld", 259, '\n', 'w', 261, 263); // world: 5 -> w or l d, 7 -> w or ld
    EXPECT(t, "<|endoftext|>", '<', '|', 'e', 'n', 'd', 'o', 'f', 't', 'e', 'x', 't', '|', '>'); // not special in text
    int32_t *ids;
    size_t n;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_tokenizer_encode(t, "", 0, &ids, &n, &err), DSMOE_OK);
    assert_int_equal(n, 0);
    free(ids);

    const uint8_t *b;
    size_t len;
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, 264, &b, &len, &err), DSMOE_OK);
    assert_int_equal(len, 6);
    assert_memory_equal(b, " world", 6);
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, 265, &b, &len, &err), DSMOE_OK);
    assert_memory_equal(b, "<|endoftext|>", 13);
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, 267, &b, &len, &err), DSMOE_OK); // outside the alphabet: its UTF-8
    assert_int_equal(len, 8);
    assert_memory_equal(b, "<sp ace>", 8);
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, 268, &b, &len, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "unknown token id 268"));
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, 300, &b, &len, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "unknown token id 300"));
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, -1, &b, &len, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "unknown token id -1"));
    const int32_t seq[] = {259, 264, 265, 10};
    char *text;
    assert_int_equal(dsmoe_tokenizer_decode(t, seq, 4, &text, &len, &err), DSMOE_OK);
    assert_int_equal(len, 25);
    assert_memory_equal(text, "hello world<|endoftext|>\n", 25);
    free(text);
    const int32_t bad[] = {259, 299};
    assert_int_equal(dsmoe_tokenizer_decode(t, bad, 2, &text, &len, &err), DSMOE_ERR_INVALID);
    assert_null(text);
    assert_non_null(strstr(err.msg, "token 1 of 2: unknown token id 299"));
    dsmoe_tokenizer_free(t);
}

// merges.txt variants: no "#version" line, no final newline, a pair listed twice (its later rank counts).
static void test_merges_forms(void **state) {
    (void)state;
    build_vocab(-1, "");
    dsmoe_tokenizer *t = open_pair("h e\nw o", MODEL_VOCAB); // both lines are merges
    EXPECT(t, "he", 256);
    EXPECT(t, "wo", 266);
    dsmoe_tokenizer_free(t);
    t = open_pair("#version: 0.2\nw o\no r\n", MODEL_VOCAB); // (w o) rank 0 first
    EXPECT(t, "wor", 266, 'r');
    dsmoe_tokenizer_free(t);
    t = open_pair("#version: 0.2\nw o\no r\nw o\n", MODEL_VOCAB); // (w o) now rank 2, after (o r) rank 1
    EXPECT(t, "wor", 'w', 261);
    dsmoe_tokenizer_free(t);
    t = open_pair("#version: 0.2\r\nh e\r\n", MODEL_VOCAB); // CRLF
    EXPECT(t, "he", 256);
    dsmoe_tokenizer_free(t);
}

// ---------------------------------------------------------------------------------------------------
// Pre-tokenisation: pieces joined by '|', split by hand from the pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+

static void expect_split(const char *text, size_t n, const char *want, size_t wn) {
    char got[512] = "";
    size_t k = 0;
    for (size_t at = 0; at < n;) {
        size_t end = dsmoe_pretokenize_next((const uint8_t *)text, n, at);
        assert_true(end > at && end <= n);
        if (at) got[k++] = '|';
        memcpy(got + k, text + at, end - at);
        k += end - at;
        at = end;
    }
    if (k != wn || memcmp(got, want, k) != 0) fail_msg("split \"%s\": got \"%.*s\", expected \"%s\"", text, (int)k, got, want);
}
#define SPLIT(text, want) expect_split(text, sizeof text - 1, want, sizeof want - 1)

static void test_pretokenize(void **state) {
    (void)state;
    SPLIT("Hello world", "Hello| world");
    SPLIT("I'm don't they're we've you'll he'd it's", "I|'m| don|'t| they|'re| we|'ve| you|'ll| he|'d| it|'s");
    SPLIT("'S 'x", "'|S| '|x");               // contractions are lower-case only; "'" is then punctuation
    SPLIT("  hello", " | hello");             // a run of spaces keeps its last one for the word
    SPLIT("hello  ", "hello|  ");             // trailing whitespace: one piece
    SPLIT("a\n\nb", "a|\n|\n|b");             // \s+(?!\S) takes one newline, \s+ the other
    SPLIT("x \n y", "x| \n| y");
    SPLIT("abc123 456x", "abc|123| 456|x");
    SPLIT("Hi!!! ...ok?", "Hi|!!!| ...|ok|?");
    SPLIT("caf\xC3\xA9 na\xC3\xAFve \xCE\xA9mega", "caf\xC3\xA9| na\xC3\xAFve| \xCE\xA9mega"); // é ï Ω are letters
    SPLIT("x\xD9\xA3\xD9\xA4 \xE2\x85\xAB", "x|\xD9\xA3\xD9\xA4| \xE2\x85\xAB");           // ٣٤ (Nd), Ⅻ (Nl) are numbers
    SPLIT("a\xE3\x80\x80" "b", "a|\xE3\x80\x80|b");   // U+3000 is \s, but only U+0020 joins a word
    SPLIT("a\xC2\xA0\xC2\xA0" "b", "a|\xC2\xA0|\xC2\xA0|b"); // NBSP NBSP b: all but the last, then \s+
}

// Bytes that are not UTF-8 are each one "other" character; NUL is other (Cc); \x1c..\x1f are not \s.
static void test_pretokenize_bytes(void **state) {
    (void)state;
    SPLIT("a\xFF\xFE" "b", "a|\xFF\xFE|b");
    SPLIT("a\0b", "a|\0|b");
    SPLIT("x \xFF", "x| \xFF");
    SPLIT("a\x1c" "b", "a|\x1c|b");
    SPLIT("\xE2\x82" "a", "\xE2\x82|a"); // a cut-short sequence: two other bytes
    SPLIT("1\xCC\x81", "1|\xCC\x81");    // a combining mark (Mn) is other, not a letter
}

// ---------------------------------------------------------------------------------------------------
// Round trips

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_rand(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

// Random text: raw bytes, or pieces of UTF-8 letters, digits, spaces, punctuation and the merges' words.
static size_t random_text(char *buf, size_t cap) {
    static const char *pieces[] = {"hello", " world", "he", "ll", " ", "  ", "\n", "\r\n", "\t", "'s", "'ll", "!", "...",
                                   "123", "\xC3\xA9", "\xCE\xA9", "\xD9\xA3", "\xE3\x80\x80", "\xF0\x9F\x98\x80",
                                   "<|endoftext|>", "wor", "\xC2\xA0"};
    size_t n = 0, want = next_rand() % cap;
    while (n < want) {
        uint32_t r = next_rand();
        if (r % 3 == 0) { // raw bytes: invalid UTF-8, NUL, anything
            buf[n++] = (char)(r >> 8);
            continue;
        }
        const char *p = pieces[(r >> 8) % (sizeof pieces / sizeof pieces[0])];
        size_t l = strlen(p);
        if (n + l > want) break;
        memcpy(buf + n, p, l);
        n += l;
    }
    return n;
}

static void round_trip(dsmoe_tokenizer *t, const char *text, size_t n, int32_t max_id) {
    int32_t *ids;
    size_t m, len;
    char *back;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_tokenizer_encode(t, text, n, &ids, &m, &err), DSMOE_OK);
    for (size_t i = 0; i < m; i++) assert_true(ids[i] >= 0 && ids[i] < max_id);
    assert_int_equal(dsmoe_tokenizer_decode(t, ids, m, &back, &len, &err), DSMOE_OK);
    assert_int_equal(len, n);
    if (n) assert_memory_equal(back, text, n);
    free(ids), free(back);
}

static void test_round_trip(void **state) {
    (void)state;
    build_vocab(-1, "");
    dsmoe_tokenizer *bpe = open_pair(merges_txt, MODEL_VOCAB), *bytes;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_tokenizer_open_bytes(256, &bytes, &err), DSMOE_OK);
    static char text[1 << 16];
    for (int i = 0; i < 400; i++) {
        size_t n = random_text(text, i < 390 ? 200 : sizeof text);
        round_trip(bpe, text, n, 268);
        round_trip(bytes, text, n, 256);
    }
    // Every byte value, and a byte tokenizer's ids are the bytes.
    for (int b = 0; b < 256; b++) text[b] = (char)b;
    round_trip(bpe, text, 256, 268);
    int32_t *ids;
    size_t m;
    assert_int_equal(dsmoe_tokenizer_encode(bytes, text, 256, &ids, &m, &err), DSMOE_OK);
    assert_int_equal(m, 256);
    for (int b = 0; b < 256; b++) assert_int_equal(ids[b], b);
    free(ids);
    dsmoe_tokenizer_free(bpe);
    dsmoe_tokenizer_free(bytes);
}

static void test_bytes(void **state) {
    (void)state;
    dsmoe_tokenizer *t = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_tokenizer_open_bytes(255, &t, &err), DSMOE_ERR_INVALID);
    assert_null(t);
    assert_non_null(strstr(err.msg, "needs model.vocab >= 256"));
    assert_int_equal(dsmoe_tokenizer_open_bytes(512, &t, &err), DSMOE_OK);
    assert_string_equal(dsmoe_tokenizer_describe(t), "bytes (model.vocab 512)");
    assert_int_equal(dsmoe_tokenizer_eot(t), -1);
    const uint8_t *b;
    size_t len;
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, 200, &b, &len, &err), DSMOE_OK);
    assert_int_equal(len, 1);
    assert_int_equal(b[0], 200);
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, 256, &b, &len, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "unknown token id 256"));
    assert_int_equal(dsmoe_tokenizer_has_text(t), 1);
    dsmoe_tokenizer_free(t);
}

// Token ids only: every id of the model is known, none has bytes, and text is refused.
static void test_ids(void **state) {
    (void)state;
    dsmoe_tokenizer *t = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_tokenizer_open_ids(0, &t, &err), DSMOE_ERR_INVALID);
    assert_null(t);
    assert_int_equal(dsmoe_tokenizer_open_ids(64, &t, &err), DSMOE_OK);
    assert_string_equal(dsmoe_tokenizer_describe(t), "token ids only (model.vocab 64)");
    assert_int_equal(dsmoe_tokenizer_has_text(t), 0);
    assert_int_equal(dsmoe_tokenizer_vocab(t), 64);
    assert_int_equal(dsmoe_tokenizer_eot(t), -1);
    int holes = -1;
    assert_int_equal(dsmoe_tokenizer_id_end(t, &holes), 64); // every id may be drawn
    assert_int_equal(holes, 0);
    const uint8_t *b = NULL;
    size_t len = 1;
    for (int32_t id = 0; id < 64; id++) {
        assert_int_equal(dsmoe_tokenizer_token_bytes(t, id, &b, &len, &err), DSMOE_OK);
        assert_int_equal(len, 0);
        assert_non_null(b);
    }
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, 64, &b, &len, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "unknown token id 64: outside the model's vocabulary"));
    assert_int_equal(dsmoe_tokenizer_token_bytes(t, -1, &b, &len, &err), DSMOE_ERR_INVALID);
    const int32_t ids[3] = {0, 63, 7};
    char *text = NULL;
    assert_int_equal(dsmoe_tokenizer_decode(t, ids, 3, &text, &len, &err), DSMOE_OK);
    assert_int_equal(len, 0);
    free(text);
    int32_t *enc = NULL;
    size_t n = 9;
    assert_int_equal(dsmoe_tokenizer_encode(t, "ab", 2, &enc, &n, &err), DSMOE_ERR_INVALID);
    assert_null(enc);
    assert_int_equal(n, 0);
    assert_non_null(strstr(err.msg, "has no text"));
    dsmoe_tokenizer_free(t);
}

// ---------------------------------------------------------------------------------------------------
// Errors

static void expect_open_error(const char *merges, int model_vocab, const char *msg) {
    write_bytes(path_of("v.json"), vocab, vlen);
    write_bytes(path_of("m.txt"), merges, strlen(merges));
    dsmoe_tokenizer *t = NULL;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_tokenizer_open_bpe(path_of("v.json"), path_of("m.txt"), model_vocab, &t, &err);
    if (s == DSMOE_OK) fail_msg("opened, expected: %s", msg);
    assert_null(t);
    if (!strstr(err.msg, msg)) fail_msg("message\n  got:      %s\n  expected: ...%s...", err.msg, msg);
}

static void test_errors(void **state) {
    (void)state;
    dsmoe_tokenizer *t = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_tokenizer_open_bpe(path_of("none.json"), path_of("m.txt"), 300, &t, &err), DSMOE_ERR_IO);
    assert_non_null(strstr(err.msg, "cannot open tokenizer vocabulary '"));
    build_vocab(-1, "");
    write_bytes(path_of("v.json"), vocab, vlen);
    assert_int_equal(mkfifo(path_of("fifo"), 0600), 0);
    assert_int_equal(dsmoe_tokenizer_open_bpe(path_of("v.json"), path_of("fifo"), 300, &t, &err), DSMOE_ERR_IO);
    assert_non_null(strstr(err.msg, "fifo': it is a FIFO (named pipe), not a regular file"));

    vlen = 0;
    vput("{\"a\": 1,}"); // the '}' at column 9
    expect_open_error(merges_txt, 300, "v.json:1:9: expected a string, found '}'");
    vlen = 0;
    vput("[1]");
    expect_open_error(merges_txt, 300, "v.json:1:1: expected '{' (vocab.json is one object: token -> id), found '['");
    vlen = 0;
    vput("{\"\xFF\": 1}");
    expect_open_error(merges_txt, 300, "v.json:1:3: expected valid UTF-8 in a string, found byte 0xff");
    build_vocab(-1, "");
    vput(" x");
    expect_open_error(merges_txt, 300, "expected the end of the file after the object, found 'x'");
    build_vocab(-1, ", \"zz\": 300");
    expect_open_error(merges_txt, 301 - 1, "token \"zz\" has id 300, outside the model's vocabulary [0, 300) (model.vocab)");
    build_vocab(-1, ", \"zz\": -1");
    expect_open_error(merges_txt, 300, "v.json:");
    expect_open_error(merges_txt, 300, "token \"zz\" has id -1, outside");
    build_vocab(-1, ", \"zz\": 1.5");
    expect_open_error(merges_txt, 300, "expected an integer, found '.'");
    build_vocab(-1, ", \"xy\": 256");
    expect_open_error(merges_txt, 300, "\"xy\" has id 256, which \"he\" has already (each id once)");
    build_vocab(-1, ", \"\xC4\xA0q\": 10");
    expect_open_error(merges_txt, 300, "\"\xC4\xA0q\" has id 10, which \"\xC4\x8A\" has already"); // Ċ is byte 10
    build_vocab(-1, ", \"he\": 270");
    expect_open_error(merges_txt, 300, "the key \"he\" appears twice");
    build_vocab(-1, "");
    expect_open_error(merges_txt, 260, "holds 268 tokens but the model's vocabulary (model.vocab) has 260: these tokenizer "
                      "files are not the model's");
    expect_open_error(merges_txt, 200, "needs model.vocab >= 256");
    build_vocab(' ', "");
    expect_open_error(merges_txt, 300, "v.json has no token for byte 0x20 (the symbol \"\xC4\xA0\")");
    build_vocab('z', "");
    expect_open_error(merges_txt, 300, "no token for byte 0x7a (the symbol \"z\")");

    build_vocab(-1, "");
    expect_open_error("#version: 0.2\nh e x\n", 300, "m.txt:2: expected a merge, two symbols separated by a space, found more than two");
    expect_open_error("#version: 0.2\nh e\n\nl l\n", 300, "m.txt:3: expected a merge, two symbols separated by a space, found an empty line");
    expect_open_error("#version: 0.2\nh\n", 300, "m.txt:2: expected a merge, two symbols separated by a space, found one symbol");
    expect_open_error("#version: 0.2\nh e\ne h\n", 300,
                      "m.txt:3: the merge of \"e\" and \"h\" makes \"eh\", which is not in ");
    expect_open_error("#version: 0.2\nhx e\n", 300, "m.txt:2: symbol \"hx\" is not in ");
    expect_open_error("#version: 0.2\nh \xC5\xBF\n", 300, "m.txt:2: symbol \"\xC5\xBF\" is not written in GPT-2's byte alphabet");
    expect_open_error("#version: 0.2\nh e\n\xFF e\n", 300, "m.txt:3:1: invalid UTF-8 (byte 0xff)");
    expect_open_error("#version: 0.2\nh e\n<sp ace>\n", 300, "m.txt:3: symbol \"<sp\" is not in ");
}

// ---------------------------------------------------------------------------------------------------
// The real GPT-2 files, when this machine has them (never downloaded by the test).

static void test_gpt2_files(void **state) {
    (void)state;
    const char *env = getenv("DSMOE_GPT2_DIR");
    const char *dirs[] = {env ? env : "", "/usr/share/dsmoe/gpt2", "/data/gpt2", "/opt/gpt2"};
    char v[1024] = "", m[1024] = "";
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0] && !m[0]; i++) {
        if (!dirs[i][0]) continue;
        snprintf(v, sizeof v, "%s/vocab.json", dirs[i]);
        snprintf(m, sizeof m, "%s/merges.txt", dirs[i]);
        if (access(v, R_OK) != 0 || access(m, R_OK) != 0) m[0] = '\0';
    }
    if (!m[0]) skip(); // set DSMOE_GPT2_DIR to a directory with GPT-2's vocab.json and merges.txt
    dsmoe_tokenizer *t;
    dsmoe_err err = {0};
    if (dsmoe_tokenizer_open_bpe(v, m, 50304, &t, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(dsmoe_tokenizer_eot(t), 50256);
    EXPECT(t, "Hello world", 15496, 995);
    EXPECT(t, " the", 262);
    EXPECT(t, "!", 0);
    dsmoe_tokenizer_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hand_worked), cmocka_unit_test(test_merges_forms), cmocka_unit_test(test_pretokenize),
        cmocka_unit_test(test_pretokenize_bytes), cmocka_unit_test(test_round_trip), cmocka_unit_test(test_bytes), cmocka_unit_test(test_ids),
        cmocka_unit_test(test_errors),      cmocka_unit_test(test_gpt2_files),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
