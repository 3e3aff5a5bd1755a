// tests/io/test_data.c: the datasets (core/io/data.c).
// Synthetic: determinism, token ranges, transition rows (exactly `branching` successors summing to 1,
// sampled at their stated frequencies), the exact loss bound against a Monte-Carlo estimate of the true
// conditional log-likelihood, and the branching-1 closed form. Text: windows equal the file bytes, the
// validation split is the tail, files concatenate. Megatron: .bin/.idx pairs written here by a small
// independent writer (every integer dtype, several prefixes, the multimodal modes array) read back as
// the token stream; each corruption refused with its message. The window order is a bijection per epoch.
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <math.h>
#include <unistd.h>
#include <sys/stat.h>

#include "data.h"

#include "test_tmpdir.h" // dir, path_of, write_bytes, teardown

static int setup(void **state) {
    (void)state;
    return tmpdir_create("data");
}

static void patch(const char *path, long off, const void *data, size_t n) {
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    assert_int_equal(fseek(f, off, SEEK_SET), 0);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static dsmoe_dataset *open_ok(const dsmoe_dataset_options *o) {
    dsmoe_dataset *ds = NULL;
    dsmoe_err err = {0};
    if (dsmoe_dataset_open(o, &ds, &err) != DSMOE_OK) fail_msg("open failed: %s", err.msg);
    return ds;
}

// Opening fails and the message holds every given fragment (NULL-terminated list).
static void expect_open_error(const dsmoe_dataset_options *o, ...) {
    dsmoe_dataset *ds = NULL;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_dataset_open(o, &ds, &err);
    if (s == DSMOE_OK) fail_msg("dataset opened, expected an error");
    assert_null(ds);
    va_list ap;
    va_start(ap, o);
    for (const char *frag; (frag = va_arg(ap, const char *));)
        if (!strstr(err.msg, frag)) fail_msg("message\n  got:      %s\n  expected: ...%s...", err.msg, frag);
    va_end(ap);
}

static dsmoe_dataset_options synth(int V, int K, int B, int T, uint64_t seed) {
    return (dsmoe_dataset_options){.source = 0, .vocab = V, .seq_len = T, .seed = seed, .synthetic_sources = K,
                                   .synthetic_branching = B};
}

// ---------------------------------------------------------------------------------------------------
// Synthetic corpus

static void test_synthetic_deterministic(void **state) {
    enum { T = 32 };
    dsmoe_dataset_options o = synth(64, 4, 3, T, 1234);
    dsmoe_dataset *a = open_ok(&o), *b = open_ok(&o);
    o.seed = 1235;
    dsmoe_dataset *c = open_ok(&o);
    dsmoe_err err = {0};
    static int32_t w[100][T + 1];
    int32_t x[T + 1], y[T + 1];
    for (int i = 0; i < 100; i++) {
        assert_int_equal(dsmoe_dataset_sample(a, DSMOE_SPLIT_TRAIN, (uint64_t)i, w[i], &err), DSMOE_OK);
        assert_int_equal(dsmoe_dataset_sample(b, DSMOE_SPLIT_TRAIN, (uint64_t)i, x, &err), DSMOE_OK);
        assert_memory_equal(w[i], x, sizeof x); // another open, same seed: same window
        assert_int_equal(dsmoe_dataset_sample(a, DSMOE_SPLIT_TRAIN, (uint64_t)i, y, &err), DSMOE_OK);
        assert_memory_equal(w[i], y, sizeof y); // asking twice: same window
        assert_int_equal(dsmoe_dataset_sample(a, DSMOE_SPLIT_VALID, (uint64_t)i, y, &err), DSMOE_OK);
        assert_true(memcmp(w[i], y, sizeof y) != 0); // the validation split draws other samples
        assert_int_equal(dsmoe_dataset_sample(c, DSMOE_SPLIT_TRAIN, (uint64_t)i, y, &err), DSMOE_OK);
        assert_true(memcmp(w[i], y, sizeof y) != 0); // another seed: other chains and samples
        for (int j = 0; j < i; j++) assert_true(memcmp(w[i], w[j], sizeof x) != 0);
    }
    assert_int_equal(dsmoe_dataset_sample(a, DSMOE_SPLIT_TRAIN, UINT64_MAX, x, &err), DSMOE_OK);
    assert_int_equal(dsmoe_dataset_windows(a, DSMOE_SPLIT_TRAIN), UINT64_MAX);
    assert_int_equal(dsmoe_dataset_tokens(a, DSMOE_SPLIT_TRAIN), 0);
    assert_string_equal(dsmoe_dataset_describe(a),
                        "synthetic: 4 sources x 3 successors over 60 chain tokens (vocab 64), windows of 33, seed 1234");
    dsmoe_dataset_close(a);
    dsmoe_dataset_close(b);
    dsmoe_dataset_close(c);
}

// Tokens in range; each row has exactly B successors summing to 1; the sampler follows those rows
// (empirical frequencies within 5 sigma of the stated probabilities); sources and starts are uniform.
static void test_synthetic_chains(void **state) {
    enum { V = 20, K = 3, B = 4, N = V - K, T = 16, S = 20000 };
    dsmoe_dataset_options o = synth(V, K, B, T, 7);
    dsmoe_dataset *ds = open_ok(&o);
    for (int k = 0; k < K; k++)
        for (int f = K; f < V; f++) {
            int nz = 0;
            double sum = 0;
            for (int t = K; t < V; t++) {
                double p = dsmoe_dataset_transition(ds, k, f, t);
                assert_true(p >= 0 && p <= 1);
                nz += p > 0;
                sum += p;
            }
            assert_int_equal(nz, B);
            assert_true(fabs(sum - 1) < 1e-12);
        }
    assert_true(dsmoe_dataset_transition(ds, K, K, K) < 0);
    assert_true(dsmoe_dataset_transition(ds, 0, 0, K) < 0);
    static long edges[K][N][N], from[K][N];
    long src[K] = {0}, first[N] = {0};
    int32_t w[T + 1];
    dsmoe_err err = {0};
    for (int i = 0; i < S; i++) {
        assert_int_equal(dsmoe_dataset_sample(ds, DSMOE_SPLIT_TRAIN, (uint64_t)i, w, &err), DSMOE_OK);
        assert_true(w[0] >= 0 && w[0] < K);
        src[w[0]]++;
        first[w[1] - K]++;
        for (int t = 1; t <= T; t++) assert_true(w[t] >= K && w[t] < V);
        for (int t = 1; t < T; t++) {
            assert_true(dsmoe_dataset_transition(ds, w[0], w[t], w[t + 1]) > 0);
            edges[w[0]][w[t] - K][w[t + 1] - K]++;
            from[w[0]][w[t] - K]++;
        }
    }
    for (int k = 0; k < K; k++) assert_true(fabs(src[k] - (double)S / K) < 5 * sqrt((double)S / K));
    for (int s = 0; s < N; s++) assert_true(fabs(first[s] - (double)S / N) < 5 * sqrt((double)S / N));
    for (int k = 0; k < K; k++)
        for (int f = 0; f < N; f++)
            for (int t = 0; t < N; t++) {
                double p = dsmoe_dataset_transition(ds, k, f + K, t + K), n = (double)from[k][f];
                double sd = sqrt(n * p * (1 - p)) + 1;
                if (fabs(edges[k][f][t] - n * p) > 5 * sd)
                    fail_msg("source %d edge %d->%d: %ld of %.0f, expected p = %.4f", k, f, t, edges[k][f][t], n, p);
            }
    dsmoe_dataset_close(ds);
}

// The exact bound against the mean true conditional loss of sampled windows.
static void check_bound_mc(int V, int K, int B, int T, int S, uint64_t seed) {
    dsmoe_dataset_options o = synth(V, K, B, T, seed);
    dsmoe_dataset *ds = open_ok(&o);
    int32_t *w = malloc((size_t)(T + 1) * sizeof *w);
    double sum = 0, sq = 0;
    dsmoe_err err = {0};
    for (int i = 0; i < S; i++) {
        assert_int_equal(dsmoe_dataset_sample(ds, DSMOE_SPLIT_VALID, (uint64_t)i, w, &err), DSMOE_OK);
        double l = log((double)(V - K)); // the first chain token is uniform
        for (int t = 1; t < T; t++) l -= log(dsmoe_dataset_transition(ds, w[0], w[t], w[t + 1]));
        l /= T;
        sum += l;
        sq += l * l;
    }
    double mean = sum / S, se = sqrt((sq / S - mean * mean) / (S - 1)), bound = dsmoe_dataset_loss_bound(ds);
    printf("V=%d K=%d B=%d T=%d: bound %.5f, Monte-Carlo %.5f +- %.5f (%d windows)\n", V, K, B, T, bound, mean, se, S);
    assert_true(se < 0.01);
    assert_true(fabs(mean - bound) < 4 * se);
    assert_true(bound < log((double)(V - K))); // below the uniform predictor
    free(w);
    dsmoe_dataset_close(ds);
}

static void test_synthetic_bound(void **state) {
    check_bound_mc(40, 3, 3, 24, 20000, 11);
    check_bound_mc(64, 4, 8, 128, 4000, 12);  // long windows: the state distribution reaches stationarity
    check_bound_mc(12, 2, 2, 6, 40000, 13);   // short windows: far from stationarity
    // branching 1: deterministic chains, only the uniform first token costs anything
    dsmoe_dataset_options o = synth(100, 5, 1, 16, 3);
    dsmoe_dataset *ds = open_ok(&o);
    assert_true(fabs(dsmoe_dataset_loss_bound(ds) - log(95.0) / 16) < 1e-12);
    dsmoe_dataset_close(ds);
    // T = 1: a window is marker and first token
    o = synth(50, 2, 4, 1, 3);
    ds = open_ok(&o);
    assert_true(fabs(dsmoe_dataset_loss_bound(ds) - log(48.0)) < 1e-12);
    dsmoe_dataset_close(ds);
}

static void test_synthetic_options(void **state) {
    dsmoe_dataset_options o = synth(64, 32, 4, 8, 1);
    expect_open_error(&o, "data.synthetic_sources = 32 must be in [1, model.vocab / 2) (model.vocab = 64)", NULL);
    o = synth(64, 4, 61, 8, 1);
    expect_open_error(&o, "data.synthetic_branching = 61 must be in [1, 60]", NULL);
    o = synth(64, 4, 4, 0, 1);
    expect_open_error(&o, "model.seq_len = 0", NULL);
}

// ---------------------------------------------------------------------------------------------------
// Text files

static dsmoe_dataset_options text(const char *path, int T, float vf) {
    return (dsmoe_dataset_options){.source = 1, .path = path, .vocab = 256, .seq_len = T, .valid_fraction = vf, .seed = 5};
}

static void test_text(void **state) {
    enum { N = 1000, T = 16 };
    unsigned char bytes[N];
    for (int i = 0; i < N; i++) bytes[i] = (unsigned char)((i * 131 + (i >> 3)) & 255);
    write_bytes(path_of("all.txt"), bytes, N);
    write_bytes(path_of("a.txt"), bytes, 600);
    write_bytes(path_of("b.txt"), bytes + 600, N - 600);
    write_bytes(path_of("empty.txt"), "", 0);
    char two[1200];
    snprintf(two, sizeof two, "%s, %s,%s", path_of("a.txt"), path_of("empty.txt"), path_of("b.txt"));
    dsmoe_dataset_options o1 = text(path_of("all.txt"), T, 0.1f), o2 = text(two, T, 0.1f);
    dsmoe_dataset *one = open_ok(&o1), *cat = open_ok(&o2);
    // 1000 tokens: the last 100 are validation; (900-1)/16 = 56 train and (100-1)/16 = 6 valid windows
    assert_int_equal(dsmoe_dataset_tokens(one, DSMOE_SPLIT_TRAIN), 900);
    assert_int_equal(dsmoe_dataset_tokens(one, DSMOE_SPLIT_VALID), 100);
    assert_int_equal(dsmoe_dataset_windows(one, DSMOE_SPLIT_TRAIN), 56);
    assert_int_equal(dsmoe_dataset_windows(one, DSMOE_SPLIT_VALID), 6);
    assert_string_equal(dsmoe_dataset_describe(cat), "text: 3 files, 1000 tokens (bytes), 56 train windows / 6 valid windows of 17");
    assert_true(dsmoe_dataset_loss_bound(one) == -1);
    dsmoe_err err = {0};
    int32_t w[T + 1], v[T + 1];
    for (int split = 0; split < 2; split++) {
        int W = split ? 6 : 56, base = split ? 900 : 0, seen[56] = {0};
        for (int i = 0; i < W; i++) {
            assert_int_equal(dsmoe_dataset_sample(one, (dsmoe_split)split, (uint64_t)i, w, &err), DSMOE_OK);
            assert_int_equal(dsmoe_dataset_sample(cat, (dsmoe_split)split, (uint64_t)i, v, &err), DSMOE_OK);
            assert_memory_equal(w, v, sizeof w); // files concatenate into the same stream
            int found = -1; // the window's place in the split, from its bytes
            for (int k = 0; k < W && found < 0; k++) {
                int match = 1;
                for (int t = 0; t <= T; t++) match &= w[t] == bytes[base + k * T + t];
                if (match) found = k;
            }
            assert_true(found >= 0);
            seen[found]++;
        }
        for (int k = 0; k < W; k++) assert_int_equal(seen[k], 1);
    }
    dsmoe_dataset_close(one);
    dsmoe_dataset_close(cat);

    dsmoe_dataset_options o = text(path_of("all.txt"), T, 0.001f); // 1 token held out: raised to one window
    dsmoe_dataset *ds = open_ok(&o);
    assert_int_equal(dsmoe_dataset_tokens(ds, DSMOE_SPLIT_VALID), T + 1);
    assert_int_equal(dsmoe_dataset_windows(ds, DSMOE_SPLIT_VALID), 1);
    assert_int_equal(dsmoe_dataset_sample(ds, DSMOE_SPLIT_VALID, 3, w, &err), DSMOE_OK);
    for (int t = 0; t <= T; t++) assert_int_equal(w[t], bytes[N - T - 1 + t]);
    dsmoe_dataset_close(ds);
    // floor(n x the decimal written), exactly: float's 0.35 and 0.45 lie below them, and 1000 x 0.35 or
    // 700 x 0.35 (a 700-token prefix of it) computed in binary fall short of 350, 245.
    write_bytes(path_of("seven.txt"), bytes, 700);
    const struct { const char *file; float vf; int valid; } exact[] = {
        {"all.txt", 0.35f, 350}, {"all.txt", 0.45f, 450}, {"seven.txt", 0.35f, 245}, {"seven.txt", 0.3f, 210},
        {"all.txt", 0.123f, 123}, {"all.txt", 0.0625f, 62},
    };
    for (size_t i = 0; i < sizeof exact / sizeof exact[0]; i++) {
        o = text(path_of(exact[i].file), T, exact[i].vf);
        ds = open_ok(&o);
        assert_int_equal(dsmoe_dataset_tokens(ds, DSMOE_SPLIT_VALID), exact[i].valid);
        dsmoe_dataset_close(ds);
    }
    o = text(path_of("all.txt"), T, 0);
    ds = open_ok(&o);
    assert_int_equal(dsmoe_dataset_windows(ds, DSMOE_SPLIT_TRAIN), (N - 1) / T);
    assert_int_equal(dsmoe_dataset_sample(ds, DSMOE_SPLIT_VALID, 0, w, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "no validation split"));
    dsmoe_dataset_close(ds);

    o = text(path_of("all.txt"), T, 0.1f);
    o.vocab = 255;
    expect_open_error(&o, "model.vocab = 255 must be at least 256", NULL);
    o = text(path_of("missing.txt"), T, 0.1f);
    expect_open_error(&o, "cannot open ", "missing.txt", NULL);
    o = text("", T, 0.1f);
    expect_open_error(&o, "data.path is empty", NULL);
    o = text(path_of("a.txt,"), T, 0.1f);
    expect_open_error(&o, "empty file name", NULL);
    o = text(path_of("all.txt"), 500, 0.1f); // 100 valid tokens, raised to 501, + 501 for training > 1000
    expect_open_error(&o, "data.path = ", "all.txt: the corpus is too small: it has 1000 tokens, but one training window "
                          "of model.seq_len + 1 = 501 tokens plus the validation split needs 1002", NULL);
}

// ---------------------------------------------------------------------------------------------------
// Megatron indexed datasets

// The .idx and .bin of docs/data.md ("Megatron-LM indexed datasets"), written field by field. modes != 0 appends the multimodal array.
static void write_megatron(const char *prefix, int code, const int64_t *tokens, const int32_t *lengths, int nseq,
                           const int64_t *docs, int ndocs, int modes) {
    static const int isz[9] = {0, 1, 1, 2, 4, 8, 8, 4, 2};
    char p[600];
    size_t ntok = 0;
    for (int i = 0; i < nseq; i++) ntok += (size_t)lengths[i];
    unsigned char *bin = calloc(ntok * 8 + 1, 1);
    for (size_t i = 0; i < ntok; i++)
        for (int b = 0; b < isz[code]; b++) bin[i * (size_t)isz[code] + (size_t)b] = (unsigned char)((uint64_t)tokens[i] >> (8 * b));
    snprintf(p, sizeof p, "%s.bin", prefix);
    write_bytes(p, bin, ntok * (size_t)isz[code]);
    free(bin);
    size_t n = 34 + 12 * (size_t)nseq + 8 * (size_t)ndocs + (modes ? (size_t)nseq : 0);
    unsigned char *idx = calloc(n, 1), *q = idx;
    memcpy(q, "MMIDIDX\0\0", 9), q += 9;
    uint64_t u[4] = {1, 0, (uint64_t)nseq, (uint64_t)ndocs};
    memcpy(q, &u[0], 8), q += 8;
    *q++ = (unsigned char)code;
    memcpy(q, &u[2], 16), q += 16;
    memcpy(q, lengths, 4 * (size_t)nseq), q += 4 * (size_t)nseq;
    int64_t ptr = 0;
    for (int i = 0; i < nseq; i++, q += 8) {
        memcpy(q, &ptr, 8);
        ptr += (int64_t)lengths[i] * isz[code];
    }
    memcpy(q, docs, 8 * (size_t)ndocs), q += 8 * (size_t)ndocs;
    if (modes) memset(q, 0, (size_t)nseq);
    snprintf(p, sizeof p, "%s.idx", prefix);
    write_bytes(p, idx, n);
    free(idx);
}

static dsmoe_dataset_options mega(const char *path, int V, int T, float vf) {
    return (dsmoe_dataset_options){.source = 2, .path = path, .vocab = V, .seq_len = T, .valid_fraction = vf, .seed = 9};
}

// All windows of epoch 0 of the train split, sorted by position: they must tile the stream.
static void expect_stream(dsmoe_dataset *ds, const int64_t *stream, int T) {
    uint64_t W = dsmoe_dataset_windows(ds, DSMOE_SPLIT_TRAIN);
    int32_t *w = malloc((size_t)(T + 1) * sizeof *w);
    int *seen = calloc(W, sizeof *seen);
    dsmoe_err err = {0};
    for (uint64_t i = 0; i < W; i++) {
        assert_int_equal(dsmoe_dataset_sample(ds, DSMOE_SPLIT_TRAIN, i, w, &err), DSMOE_OK);
        int found = 0;
        for (uint64_t k = 0; k < W && !found; k++) {
            int match = 1;
            for (int t = 0; t <= T; t++) match &= w[t] == stream[k * (uint64_t)T + (uint64_t)t];
            if (match) found = 1, seen[k]++;
        }
        assert_true(found);
    }
    for (uint64_t k = 0; k < W; k++) assert_int_equal(seen[k], 1);
    free(w);
    free(seen);
}

static void test_megatron(void **state) {
    // prefix A (uint16): documents {seq 0, seq 1}, {seq 2}; prefix B (int32): one document of 2 sequences
    int64_t ta[] = {1, 65535, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, tb[] = {70000, 13, 14, 15, 16, 17, 99999, 18};
    int32_t la[] = {5, 0, 7}, lb[] = {3, 5};
    int64_t da[] = {0, 2, 3}, db[] = {0, 2};
    char pa[512], pb[512], both[1100];
    snprintf(pa, sizeof pa, "%s", path_of("a_text_document"));
    snprintf(pb, sizeof pb, "%s", path_of("b"));
    write_megatron(pa, 8, ta, la, 3, da, 3, 0);
    write_megatron(pb, 4, tb, lb, 2, db, 2, 1); // with the multimodal modes array
    snprintf(both, sizeof both, "%s,%s", pa, pb);
    int64_t stream[20];
    memcpy(stream, ta, sizeof ta);
    memcpy(stream + 12, tb, sizeof tb);
    dsmoe_dataset_options o = mega(both, 100000, 3, 0.2f);
    dsmoe_dataset *ds = open_ok(&o);
    // 20 tokens: 4 held out for validation; (16-1)/3 = 5 train windows, (4-1)/3 = 1 valid window
    assert_string_equal(dsmoe_dataset_describe(ds),
                        "megatron: 2 prefixes, 3 documents, 20 tokens (mixed dtypes), 5 train windows / 1 valid windows of 4");
    expect_stream(ds, stream, 3);
    int32_t w[4];
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_dataset_sample(ds, DSMOE_SPLIT_VALID, 0, w, &err), DSMOE_OK);
    for (int t = 0; t < 4; t++) assert_int_equal(w[t], stream[16 + t]);
    dsmoe_dataset_close(ds);

    o = mega(pa, 65536, 2, 0);
    ds = open_ok(&o);
    assert_string_equal(dsmoe_dataset_describe(ds),
                        "megatron: 1 prefix, 2 documents, 12 tokens (uint16), 5 train windows / 0 valid windows of 3");
    expect_stream(ds, ta, 2);
    dsmoe_dataset_close(ds);

    // every integer dtype carries the same small tokens (int8 and int16 signed, so keep them below 127)
    int64_t small[] = {0, 1, 2, 126, 100, 50, 7};
    int32_t ls[] = {4, 3};
    int64_t ds2[] = {0, 1, 2};
    for (int code = 1; code <= 8; code++) {
        if (code == 6 || code == 7) continue;
        char p[600];
        snprintf(p, sizeof p, "%s/dtype%d", dir, code);
        write_megatron(p, code, small, ls, 2, ds2, 3, 0);
        o = mega(p, 127, 2, 0);
        ds = open_ok(&o);
        expect_stream(ds, small, 2);
        dsmoe_dataset_close(ds);
    }
}

static void test_megatron_errors(void **state) {
    int64_t t[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    int32_t l[] = {5, 0, 7};
    int64_t d[] = {0, 2, 3};
    char p[512], idx[600], bin[600];
    snprintf(p, sizeof p, "%s", path_of("bad"));
    snprintf(idx, sizeof idx, "%s.idx", p);
    snprintf(bin, sizeof bin, "%s.bin", p);
    dsmoe_dataset_options o = mega(p, 64, 2, 0);
#define FRESH() write_megatron(p, 8, t, l, 3, d, 3, 0)
    FRESH();
    dsmoe_dataset_close(open_ok(&o));

    patch(idx, 0, "GPT2", 4);
    expect_open_error(&o, "bad.idx: bad magic: found 47 50 54 32 49 44 58 00 00 (\"GPT2IDX..\"), expected 4d 4d 49 44 49 "
                          "44 58 00 00", "---> HINT:", "Megatron-LM's tools/preprocess_data.py", NULL);
    FRESH();
    uint64_t v2 = 2;
    patch(idx, 9, &v2, 8);
    expect_open_error(&o, "bad.idx: version 2, expected 1", NULL);
    FRESH();
    patch(idx, 17, "\x09", 1);
    expect_open_error(&o, "bad.idx: unknown dtype code 9", NULL);
    patch(idx, 17, "\x07", 1);
    expect_open_error(&o, "bad.idx: dtype code 7 (float32) holds no token ids", NULL);
    FRESH();
    assert_int_equal(truncate(idx, 34 + 36 + 24 - 8), 0); // one document index short
    expect_open_error(&o, "bad.idx: 86 bytes, but sequence_count 3 and document_count 3 need 94 (or 97 with the multimodal",
                      NULL);
    assert_int_equal(truncate(idx, 20), 0);
    expect_open_error(&o, "bad.idx: truncated: 20 bytes, the header alone needs 34", NULL);
    FRESH();
    int64_t far = 1000;
    patch(idx, 34 + 12 + 16, &far, 8); // pointer of sequence 2
    expect_open_error(&o, "bad.idx: sequence 2 (pointer 1000, 7 tokens of 2 bytes) runs past the end of", "bad.bin (24 bytes)",
                      NULL);
    FRESH();
    assert_int_equal(truncate(bin, 22), 0);
    expect_open_error(&o, "bad.idx: sequence 2 (pointer 10, 7 tokens of 2 bytes) runs past the end of", "bad.bin (22 bytes)",
                      NULL);
    FRESH();
    int64_t gap = 12;
    patch(idx, 34 + 12 + 8, &gap, 8); // sequence 1 (empty) away from where sequence 0 ends
    expect_open_error(&o, "bad.idx: sequence 1 starts at byte 12 of", "expected 10", NULL);
    FRESH();
    int32_t neg = -3;
    patch(idx, 34 + 4, &neg, 4);
    expect_open_error(&o, "bad.idx: sequence 1 has negative length -3", NULL);
    FRESH();
    int64_t bad_doc = 4;
    patch(idx, 34 + 36 + 16, &bad_doc, 8);
    expect_open_error(&o, "bad.idx: document_indices[2] = 4", NULL);
    FRESH();
    int64_t short_end = 2;
    patch(idx, 34 + 36 + 16, &short_end, 8); // the last document ends before the last sequence
    expect_open_error(&o, "bad.idx: document_indices must end with sequence_count 3 (found 2)", NULL);
    FRESH();
    FILE *more = fopen(bin, "ab"); // the .bin of another, longer corpus
    assert_non_null(more);
    assert_int_equal(fwrite("\1\0\2\0", 1, 4, more), 4);
    assert_int_equal(fclose(more), 0);
    expect_open_error(&o, "bad.bin: 28 bytes, but ", "bad.idx describes 24 (the .bin does not belong to this .idx)", NULL);
    FRESH();
    uint16_t big = 70;
    patch(bin, 2 * 7, &big, 2); // token 2 of sequence 2
    expect_open_error(&o, "bad.bin: sequence 2 holds token 70 (position 2), outside [0, model.vocab = 64)", NULL);
    int64_t negs[] = {3, -5, 4};
    int32_t ln[] = {3};
    int64_t dn[] = {0, 1};
    write_megatron(path_of("neg"), 3, negs, ln, 1, dn, 2, 0); // int16
    dsmoe_dataset_options on = mega(path_of("neg"), 64, 1, 0);
    expect_open_error(&on, "neg.bin: sequence 0 holds token -5 (position 1), outside [0, model.vocab = 64)", NULL);
    FRESH();
    o.seq_len = 12; // 12 tokens, one window needs 13
    expect_open_error(&o, "the corpus is too small: it has 12 tokens, but one training window of model.seq_len + 1 = 13 "
                          "tokens needs 13", NULL);
    o.seq_len = 2;
    unlink(bin);
    expect_open_error(&o, "cannot open ", "bad.bin", NULL);
    o = mega(path_of("nothing"), 64, 2, 0);
    expect_open_error(&o, "cannot open ", "nothing.idx", NULL);
    assert_int_equal(mkdir(path_of("dir.idx"), 0700), 0); // a directory where the .idx should be
    o = mega(path_of("dir"), 64, 2, 0);
    expect_open_error(&o, "dir.idx: not a regular file", NULL);
#undef FRESH
}

// Windows of an epoch are a permutation: every window exactly once, a different order each epoch.
static void test_permutation(void **state) {
    static const int sizes[] = {1, 2, 3, 5, 17, 64, 1000, 4097};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        int W = sizes[s], n = 2 * W + 1;
        int64_t *tok = malloc((size_t)n * sizeof *tok), docs[2] = {0, 1};
        for (int i = 0; i < n; i++) tok[i] = i; // a window's first token names it
        int32_t len = n, w[3];
        char p[600];
        snprintf(p, sizeof p, "%s/perm%d", dir, W);
        write_megatron(p, 4, tok, &len, 1, docs, 2, 0);
        dsmoe_dataset_options o = mega(p, n, 2, 0);
        dsmoe_dataset *ds = open_ok(&o);
        assert_int_equal(dsmoe_dataset_windows(ds, DSMOE_SPLIT_TRAIN), W);
        int *order = malloc(2 * (size_t)W * sizeof *order), *seen = malloc((size_t)W * sizeof *seen);
        dsmoe_err err = {0};
        for (int e = 0; e < 2; e++) {
            memset(seen, 0, (size_t)W * sizeof *seen);
            for (int i = 0; i < W; i++) {
                assert_int_equal(dsmoe_dataset_sample(ds, DSMOE_SPLIT_TRAIN, (uint64_t)(e * W + i), w, &err), DSMOE_OK);
                assert_true(w[0] % 2 == 0 && w[1] == w[0] + 1 && w[2] == w[0] + 2);
                order[e * W + i] = w[0] / 2;
                seen[w[0] / 2]++;
            }
            for (int k = 0; k < W; k++) assert_int_equal(seen[k], 1);
        }
        if (W >= 17) {
            int same = 1, identity = 1;
            for (int i = 0; i < W; i++) same &= order[i] == order[W + i], identity &= order[i] == i;
            assert_false(same);
            assert_false(identity);
        }
        free(order), free(seen), free(tok);
        dsmoe_dataset_close(ds);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synthetic_deterministic), cmocka_unit_test(test_synthetic_chains),
        cmocka_unit_test(test_synthetic_bound),         cmocka_unit_test(test_synthetic_options),
        cmocka_unit_test(test_text),                    cmocka_unit_test(test_megatron),
        cmocka_unit_test(test_megatron_errors),         cmocka_unit_test(test_permutation),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
