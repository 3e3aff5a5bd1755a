// tests/fuzz/fuzz_bpe.c: the GPT-2 BPE tokenizer files (core/io/tokenizer.c) and its encoder. The input
// is vocab.json, a line "#merges", then merges.txt (no such line: all vocab.json, an empty merges.txt),
// opened with model.vocab 512. A refusal must name one of the files or model.vocab. When the pair opens,
// encoding then decoding must give back the bytes, for a fixed text (every byte value, UTF-8 letters,
// digits, spaces, contractions) and for the input itself; every id must be known; encoding again (now
// through the word cache) must give the same ids; "<|endoftext|>", when present, must be its own bytes;
// and the pre-tokeniser's pieces must tile any input.
#include "fuzz_common.h"

#include "tokenizer.h"

#define MODEL_VOCAB 512

static void round_trip(dsmoe_tokenizer *t, const uint8_t *text, size_t n, const char *what) {
    int32_t *ids, *again;
    size_t m, m2, len;
    char *back;
    dsmoe_err err = {0};
    if (dsmoe_tokenizer_encode(t, text, n, &ids, &m, &err) != DSMOE_OK) fuzz_fail("%s: encode: %s", what, err.msg);
    if (m > n) fuzz_fail("%s: %zu tokens for %zu bytes", what, m, n);
    for (size_t i = 0; i < m; i++) {
        const uint8_t *b;
        size_t l;
        if (dsmoe_tokenizer_token_bytes(t, ids[i], &b, &l, &err) != DSMOE_OK) fuzz_fail("%s: token %zu: %s", what, i, err.msg);
        if (l == 0) fuzz_fail("%s: token %zu (id %d) has no bytes", what, i, ids[i]);
    }
    if (dsmoe_tokenizer_decode(t, ids, m, &back, &len, &err) != DSMOE_OK) fuzz_fail("%s: decode: %s", what, err.msg);
    if (len != n || (n && memcmp(back, text, n) != 0)) fuzz_fail("%s: %zu bytes decode to %zu other bytes", what, n, len);
    if (dsmoe_tokenizer_encode(t, text, n, &again, &m2, &err) != DSMOE_OK) fuzz_fail("%s: encode again: %s", what, err.msg);
    if (m2 != m || (m && memcmp(again, ids, m * sizeof *ids) != 0)) fuzz_fail("%s: a second encoding differs", what);
    free(ids), free(again), free(back);
}

static void check_pieces(const uint8_t *s, size_t n) {
    for (size_t at = 0; at < n;) {
        size_t end = dsmoe_pretokenize_next(s, n, at);
        if (end <= at || end > n) fuzz_fail("pre-tokeniser: piece [%zu, %zu) of %zu bytes", at, end, n);
        at = end;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char sep[] = "\n#merges\n";
    const uint8_t *cut = memmem(data, size, sep, sizeof sep - 1);
    size_t vn = cut ? (size_t)(cut - data) : size;
    const char *merges = cut ? (const char *)cut + sizeof sep - 1 : "";
    size_t mn = cut ? size - vn - (sizeof sep - 1) : 0;
    check_pieces(data, size);
    dsmoe_tokenizer *t = (dsmoe_tokenizer *)(uintptr_t)1;
    dsmoe_err err = {0};
    if (dsmoe_tokenizer_open_bpe_mem("vocab.json", (const char *)data, vn, "merges.txt", merges, mn, MODEL_VOCAB, &t, &err) !=
        DSMOE_OK) {
        if (t) fuzz_fail("refused (%s) but the tokenizer is not NULL", err.msg);
        if (strncmp(err.msg, "vocab.json", 10) != 0 && strncmp(err.msg, "merges.txt", 10) != 0 && !strstr(err.msg, "model.vocab"))
            fuzz_fail("a refusal that names neither file: %s", err.msg);
        return 0;
    }
    int32_t eot = dsmoe_tokenizer_eot(t);
    if (eot >= 0) {
        const uint8_t *b;
        size_t l;
        if (dsmoe_tokenizer_token_bytes(t, eot, &b, &l, NULL) != DSMOE_OK || l != 13 || memcmp(b, "<|endoftext|>", 13) != 0)
            fuzz_fail("<|endoftext|> (id %d) is not its own bytes", eot);
    }
    static uint8_t fixed[512];
    static size_t fixed_n;
    if (!fixed_n) {
        static const char words[] = "Hello world, it's 2024! They'll see\t\tna\xC3\xAFve caf\xC3\xA9 \xE2\x98\x83  \r\n\n"
                                    "\xD9\xA3\xD9\xA4 \xE3\x80\x80x <|endoftext|> ";
        for (int b = 0; b < 256; b++) fixed[fixed_n++] = (uint8_t)b;
        memcpy(fixed + fixed_n, words, sizeof words - 1);
        fixed_n += sizeof words - 1;
    }
    round_trip(t, fixed, fixed_n, "the fixed text");
    round_trip(t, data, size, "the input");
    dsmoe_tokenizer_free(t);
    return 0;
}
