// tests/fuzz/fuzz_megatron.c: the Megatron-LM indexed dataset reader (core/io/data.c, data.source =
// megatron), as training opens data.path.
//
// The input is an 8-byte header, then the .idx, then the .bin:
//   bytes 0-1  model.vocab - 2 (little-endian)       byte 2   model.seq_len - 1 (mod 32)
//   byte 3     bits 0-1: data.valid_fraction 0, 0.1, 0.5 or 0.9; bit 2: the prefix listed twice
//              ("p,p"); bits 3-7: data.seed
//   bytes 4-7  length of the .idx part (little-endian; the rest of the input when larger)
// When dsmoe_dataset_open accepts the pair, the split token counts must add up to the tokens of the .bin
// (decoded here from the .idx dtype, independently of the reader), and every sampled window must be the
// T+1 tokens of the stream that start at a multiple of T inside its split; over one epoch of a small
// split the windows are each visited once (the sample order is a permutation).
#include "fuzz_common.h"

#include "data.h"

#define MAX_CHECKED 64 // samples checked per split

static const double fractions[4] = {0.0, 0.1, 0.5, 0.9};

// The token stream of the .bin as the dtype code says (Megatron's codes: 1 uint8, 2 int8, 3 int16,
// 4 int32, 5 int64, 8 uint16); NULL for a code that holds no integer tokens.
static int64_t *decode(const uint8_t *bin, size_t blen, int code, size_t *n) {
    static const int isz[9] = {0, 1, 1, 2, 4, 8, 0, 0, 2};
    if (code < 1 || code > 8 || !isz[code]) return NULL;
    *n = blen / (size_t)isz[code];
    int64_t *t = malloc((*n + 1) * sizeof *t);
    if (!t) fuzz_setup_error("out of memory");
    for (size_t i = 0; i < *n; i++) {
        const uint8_t *p = bin + i * (size_t)isz[code];
        uint64_t u = 0;
        for (int b = 0; b < isz[code]; b++) u |= (uint64_t)p[b] << (8 * b);
        switch (code) {
        case 1: case 8: t[i] = (int64_t)u; break;
        case 2: t[i] = (int8_t)u; break;
        case 3: t[i] = (int16_t)u; break;
        case 4: t[i] = (int32_t)u; break;
        default: t[i] = (int64_t)u; break;
        }
    }
    return t;
}

// Checks the first samples of a split against the stream: [start, start + tokens) is the split.
static void check_split(const dsmoe_dataset *ds, dsmoe_split split, const int64_t *stream, size_t stream_n,
                        uint64_t start, uint64_t tokens, int T, int V) {
    const char *name = split == DSMOE_SPLIT_TRAIN ? "train" : "valid";
    uint64_t W = dsmoe_dataset_windows(ds, split);
    int32_t *win = malloc(((size_t)T + 1) * sizeof *win);
    if (!win) fuzz_setup_error("out of memory");
    dsmoe_err err = {0};
    if (W == 0) {
        if (dsmoe_dataset_sample(ds, split, 0, win, &err) == DSMOE_OK)
            fuzz_fail("%s split: no windows, but sample 0 was given", name);
        free(win);
        return;
    }
    if (W > tokens / (uint64_t)T + 1) fuzz_fail("%s split: %llu windows of %d in %llu tokens", name, (unsigned long long)W, T, (unsigned long long)tokens);
    int seen[MAX_CHECKED] = {0};
    uint64_t checked = W < MAX_CHECKED ? W : MAX_CHECKED;
    for (uint64_t i = 0; i < checked + 2; i++) {
        uint64_t at = i < checked ? i : (i - checked + 1) * W + i; // and two samples of later epochs
        if (dsmoe_dataset_sample(ds, split, at, win, &err) != DSMOE_OK)
            fuzz_fail("%s split: sample %llu of %llu windows: %s", name, (unsigned long long)at, (unsigned long long)W, err.msg);
        for (int j = 0; j <= T; j++)
            if (win[j] < 0 || win[j] >= V) fuzz_fail("%s split: sample %llu holds token %d, outside [0, %d)", name, (unsigned long long)at, win[j], V);
        int matches = 0, match = -1;
        for (uint64_t w = 0; w < W; w++) {
            uint64_t o = start + w * (uint64_t)T;
            if (o + (uint64_t)T + 1 > stream_n) break;
            int same = 1;
            for (int j = 0; j <= T && same; j++) same = stream[o + (uint64_t)j] == win[j];
            if (same) matches++, match = (int)w;
        }
        if (!matches) fuzz_fail("%s split: sample %llu is no window of the stream at a multiple of %d", name, (unsigned long long)at, T);
        // A window equal to another cannot be told apart: only unique matches count.
        if (i < checked && W <= MAX_CHECKED && matches == 1 && seen[match]++)
            fuzz_fail("%s split: window %d given twice in the first epoch", name, match);
    }
    free(win);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 8) return 0;
    int V = 2 + (int)fuzz_u16(data), T = 1 + data[2] % 32, twice = (data[3] >> 2) & 1;
    size_t idx_len = fuzz_u32(data + 4);
    if (idx_len > size - 8) idx_len = size - 8;
    const uint8_t *idx = data + 8, *bin = idx + idx_len;
    size_t bin_len = size - 8 - idx_len;
    fuzz_write("p.idx", idx, idx_len);
    fuzz_write("p.bin", bin, bin_len);
    char path[1300];
    const char *prefix = fuzz_path("p");
    snprintf(path, sizeof path, twice ? "%s, %s" : "%s", prefix, prefix);
    dsmoe_dataset_options opt = {.source = 2, .path = path, .vocab = V, .seq_len = T,
                                 .valid_fraction = (float)fractions[data[3] & 3], .seed = 7u + (data[3] >> 3),
                                 .synthetic_sources = 1, .synthetic_branching = 1};
    dsmoe_dataset *ds = NULL;
    dsmoe_err err = {0};
    if (dsmoe_dataset_open(&opt, &ds, &err) != DSMOE_OK) {
        if (ds) fuzz_fail("dsmoe_dataset_open failed but returned a dataset");
        if (!err.msg[0]) fuzz_fail("dsmoe_dataset_open failed with no message");
        return 0;
    }
    if (idx_len < 18) fuzz_fail("opened with a %zu-byte .idx", idx_len);
    size_t n1 = 0;
    int64_t *one = decode(bin, bin_len, idx[17], &n1);
    if (!one) fuzz_fail("opened with dtype code %d", idx[17]);
    size_t n = twice ? 2 * n1 : n1;
    int64_t *stream = malloc((n + 1) * sizeof *stream);
    if (!stream) fuzz_setup_error("out of memory");
    memcpy(stream, one, n1 * sizeof *stream);
    if (twice) memcpy(stream + n1, one, n1 * sizeof *stream);
    for (size_t i = 0; i < n; i++)
        if (stream[i] < 0 || stream[i] >= V) fuzz_fail("opened a .bin with token %lld, outside [0, %d)", (long long)stream[i], V);
    uint64_t tt = dsmoe_dataset_tokens(ds, DSMOE_SPLIT_TRAIN), tv = dsmoe_dataset_tokens(ds, DSMOE_SPLIT_VALID);
    if (tt + tv != n)
        fuzz_fail("train %llu + valid %llu tokens, but the .bin holds %zu", (unsigned long long)tt, (unsigned long long)tv, n);
    if (!dsmoe_dataset_describe(ds)) fuzz_fail("no description");
    check_split(ds, DSMOE_SPLIT_TRAIN, stream, n, 0, tt, T, V);
    check_split(ds, DSMOE_SPLIT_VALID, stream, n, tt, tv, T, V);
    free(stream);
    free(one);
    dsmoe_dataset_close(ds);
    return 0;
}
