// tests/fuzz/make_seeds.c: writes the seed corpora of tests/fuzz/seeds/ (deck, safetensors, megatron), so
// that no binary seed is written by hand. Each seed is loaded once here with the reader it feeds, and
// must load or be refused as its name says (ok-*, bad-*), or this program fails: the checked-in seeds
// keep meaning what they say as the readers change. docs/testing.md says when to run it:
//     cmake --build <fuzz build> --target dsmoe_fuzz_make_seeds
//     <fuzz build>/tests/fuzz/dsmoe_fuzz_make_seeds tests/fuzz/seeds
#include "fuzz_common.h"

#include <inttypes.h>

#include "config.h"
#include "data.h"
#include "safetensors.h"

static const char *out_dir;
static int failures;

static void save(const char *kind, const char *name, const void *data, size_t n) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", out_dir, kind);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/%s", out_dir, kind, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) {
        fprintf(stderr, "make_seeds: cannot write %s\n", path);
        exit(1);
    }
}

// The seed's name says whether its reader takes it: "ok-..." must load, "bad-..." must be refused.
static void expect(const char *kind, const char *name, int loaded, const char *msg) {
    int want = strncmp(name, "ok-", 3) == 0;
    printf("%-12s %-36s %s%s%s\n", kind, name, loaded ? "loads" : "refused: ", loaded ? "" : msg,
           loaded == want ? "" : "   <-- UNEXPECTED");
    if (loaded != want) failures++;
}

// ---------------------------------------------------------------------------------------------------
// Decks: the syntax of docs/deck.md, line endings, plugin sections, extreme numbers. (tests/decks and
// inputs/ are seeds too, read in place: tests/fuzz/fuzz.cmake.)

static void deck(const char *name, const char *text, size_t n) {
    save("deck", name, text, n);
    char *copy = strndup(text, n);
    dsmoe_config *cfg = malloc(sizeof *cfg);
    dsmoe_err err = {0};
    // As fuzz_deck.c loads it: for 0, 1 and 6 ranks; "ok" when one of them loads.
    int ok = 0;
    for (int ws = 0; ws <= 6 && !ok && !memchr(text, 0, n); ws += ws ? 5 : 1) {
        memset(&err, 0, sizeof err);
        ok = dsmoe_config_load_text(copy, name, NULL, 0, fuzz_deck_env, ws, cfg, NULL, &err) == DSMOE_OK;
    }
    expect("deck", name, ok, err.msg[0] ? err.msg : "NUL byte");
    free(cfg);
    free(copy);
}
#define DECK(name, literal) deck(name, literal, sizeof literal - 1)

static const char syntax_deck[] =
    "run.seed = 18446744073709551615   # a qualified key before any section\n"
    "[run]\n"
    "output_dir = ${HOME}/runs/${JOB:-local}-${FUZZ_N}\n"
    "plugin_path = \"/opt/a:/opt/b # kept\":\\\n"
    "              /opt/c\n"
    "signals = \"TERM,USR1\"\n"
    "[model]\n"
    "vocab = 1Ki\n"
    "seq_len = 1.5K\n"
    "layers = 6\n"
    "hidden = 120e-1\n"
    "heads = +3\n"
    "init_std = 2e-2\n"
    "[moe]\n"
    "every = 2\n"
    "experts = 4 x2, \\\n"
    "          8\n"
    "expert_parallel = 2 x2, 4\n"
    "top_k = 2\n"
    "capacity_factor = 1.25\n"
    "drop_tokens = OFF\n"
    "\t token_selection = random\n"
    "noise = rsample\n"
    "[train]\n"
    "batch = 16\n"
    "micro_batch = 4\n"
    "lr = 6e-4\n"
    "lr_schedule = linear\n"
    "[data]\n"
    "source = text\n"
    "path = \"${FUZZ_S},b\\\"c\\\\d\\${HOME}\"\n"
    "valid_fraction = 0.1\n"
    "[checkpoint]\n"
    "dir = ${EMPTY:-ckpt}\n"
    "resume = auto\n";

static const char plugins_deck[] =
    "[model]\nvocab = 64\nseq_len = 8\nlayers = 2\nhidden = 16\nheads = 2\n"
    "[moe]\nexperts = 0\n"
    "[kernel.cpu]\npoison = yes\n"
    "[comm.mpi]\nmax_count = 4Ki\n"
    "[kernel.cuda]\ntf32 = on\n";

static void decks(void) {
    DECK("ok-syntax.deck", syntax_deck);
    DECK("ok-plugins.deck", plugins_deck);
    DECK("ok-empty.deck", "");
    DECK("ok-crlf.deck", "[model]\r\nvocab = 64\r\nhidden = 32\r\n\r\n[train]\r\nsteps = 2K # c\r\n");
    DECK("ok-cr.deck", "[model]\rvocab = 64\rhidden = 32\r[train]\rsteps = 3\r");
    DECK("ok-bom-utf8.deck", "\xef\xbb\xbf[run]\noutput_dir = \"runs/\xc3\xa9\xe2\x9c\x93 \xf0\x9f\x98\x80\"\n");
    DECK("ok-dense.deck", "model.layers = 1\nmoe.experts = 0\nplan.memory_per_rank = 16Gi\ndata.seed = 0\n");
    DECK("bad-unset-var.deck", "[run]\noutput_dir = ${NOT_SET}\n");
    DECK("bad-twice.deck", "[train]\nsteps = 1\ntrain.steps = 2\n");
    DECK("bad-hex.deck", "[train]\nsteps = 0x10\n");
    DECK("bad-wrap.deck", "[moe]\nexperts = -4294967288\n");
    DECK("bad-overflow.deck", "[model]\nhidden = 600000000\n");
    DECK("bad-quote.deck", "[run]\noutput_dir = \"open\n");
    DECK("bad-nul.deck", "[model]\nvocab = 6\0004\n");
    DECK("bad-latin1.deck", "[run]\noutput_dir = caf\xe9\n");
    DECK("bad-section.deck", "[modle]\nvocab = 64\n");
}

// ---------------------------------------------------------------------------------------------------
// Safetensors: files of the writer (with checksums), of other writers (none, padding), and damage.

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)len + 1);
    if (!b || fread(b, 1, (size_t)len, f) != (size_t)len) exit(1);
    fclose(f);
    *n = (size_t)len;
    return b;
}

static void st_seed(const char *name, const uint8_t *b, size_t n) {
    save("safetensors", name, b, n);
    const char *path = fuzz_write("check.safetensors", b, n);
    dsmoe_st_file *f = NULL;
    dsmoe_err err = {0};
    int ok = dsmoe_st_open(path, &f, &err) == DSMOE_OK;
    for (int i = 0; ok && i < dsmoe_st_count(f); i++) ok = dsmoe_st_verify(f, dsmoe_st_at(f, i), &err) == DSMOE_OK;
    if (f) dsmoe_st_close(f);
    expect("safetensors", name, ok, err.msg);
}

// A file written by dsmoe's writer: n tensors of the given dtypes and shapes, data a counting pattern.
static uint8_t *st_written(int n, const dsmoe_st_dtype *dt, const int *ndim, const int64_t (*shape)[4], size_t *len) {
    static uint8_t pattern[4096];
    for (size_t i = 0; i < sizeof pattern; i++) pattern[i] = (uint8_t)(i * 37 + 11);
    dsmoe_st_writer *w = dsmoe_st_writer_new();
    dsmoe_err err = {0};
    char name[32];
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, i % 2 ? "layer.%d.weight" : "h.%d.\"b\"\\", i);
        if (dsmoe_st_writer_add(w, name, dt[i], ndim[i], shape[i], pattern, &err) != DSMOE_OK) exit(1);
    }
    if (dsmoe_st_writer_meta(w, "step", "12", &err) != DSMOE_OK || dsmoe_st_writer_meta(w, "format", "pt", &err) != DSMOE_OK)
        exit(1);
    const char *path = fuzz_path("written.safetensors");
    if (dsmoe_st_writer_commit(w, path, &err) != DSMOE_OK) {
        fprintf(stderr, "make_seeds: %s\n", err.msg);
        exit(1);
    }
    dsmoe_st_writer_free(w);
    return slurp(path, len);
}

// A file as another writer makes it: the header text as given, padded with spaces to pad bytes.
static uint8_t *st_raw(const char *header, size_t pad, const uint8_t *data, size_t dlen, size_t *len) {
    size_t h = strlen(header), hl = h > pad ? h : pad;
    uint8_t *b = malloc(8 + hl + dlen);
    uint64_t hl64 = hl;
    memcpy(b, &hl64, 8);
    memcpy(b + 8, header, h);
    memset(b + 8 + h, ' ', hl - h);
    memcpy(b + 8 + hl, data, dlen);
    *len = 8 + hl + dlen;
    return b;
}

static void safetensors(void) {
    size_t n;
    uint8_t *b;
    static const dsmoe_st_dtype dt[10] = {DSMOE_ST_F32, DSMOE_ST_I64, DSMOE_ST_BF16, DSMOE_ST_F16, DSMOE_ST_U8,
                                          DSMOE_ST_I32, DSMOE_ST_F64, DSMOE_ST_I16, DSMOE_ST_I8, DSMOE_ST_BOOL};
    static const int nd[10] = {2, 0, 1, 3, 1, 1, 2, 1, 1, 4};
    static const int64_t sh[10][4] = {{2, 3}, {0}, {4}, {1, 2, 2}, {5}, {0}, {1, 1}, {3}, {2}, {1, 1, 2, 1}};
    b = st_written(3, dt, nd, sh, &n);
    st_seed("ok-checkpoint.safetensors", b, n);
    b[n - 1] ^= 0x10;
    st_seed("bad-bitflip.safetensors", b, n);
    b[n - 1] ^= 0x10;
    st_seed("bad-truncated.safetensors", b, n - 3);
    uint64_t hl;
    memcpy(&hl, b, 8);
    hl -= 3;
    memcpy(b, &hl, 8);
    st_seed("bad-header-short.safetensors", b, n);
    free(b);
    b = st_written(10, dt, nd, sh, &n);
    st_seed("ok-every-dtype.safetensors", b, n);
    free(b);
    b = st_written(0, dt, nd, sh, &n);
    st_seed("ok-no-tensors.safetensors", b, n);
    free(b);

    static const uint8_t data[16] = {0, 0, 128, 63, 0, 0, 0, 64, 1, 2, 3, 4, 5, 6, 7, 8};
    b = st_raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[2,4],\"data_offsets\":[8,16]},"
               "\"__metadata__\":{\"format\":\"pt\",\"step\":\"3\"}}", 0, data, 16, &n);
    st_seed("ok-no-checksums.safetensors", b, n);
    free(b);
    b = st_raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 56, data, 16, &n);
    st_seed("ok-padded.safetensors", b, n);
    free(b);
    b = st_raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"v\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 0, data, 12, &n);
    st_seed("bad-overlap.safetensors", b, n);
    free(b);
    b = st_raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"__metadata__\":{\"crc32c.w\":\"00000000\"}}", 0, data, 8, &n);
    st_seed("bad-crc.safetensors", b, n);
    free(b);
    // A name that is not UTF-8 (the header is JSON, which is UTF-8): found by fuzz_safetensors, whose
    // writer round trip renamed the tensor (the writer escapes such bytes as U+FFFD).
    b = st_raw("{\"h.\xb0\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]}}", 0, data, 8, &n);
    st_seed("bad-name-not-utf8.safetensors", b, n);
    free(b);
    b = st_raw("{\"w\\u0041\\n\":{\"dtype\":\"F8_E4M3\",\"shape\":[8],\"data_offsets\":[0,8]}}", 0, data, 8, &n);
    st_seed("bad-dtype.safetensors", b, n);
    free(b);
}

// ---------------------------------------------------------------------------------------------------
// Megatron: fuzz_megatron.c's input (8-byte header, .idx, .bin) for pairs in each dtype, with and without
// the multimodal modes array, and damaged ones.

static void megatron(const char *name, int vocab, int seq_len, int flags, int code, const int64_t *tokens,
                     const int32_t *lengths, int nseq, const int64_t *docs, int ndocs, int modes, int damage) {
    static const int isz[9] = {0, 1, 1, 2, 4, 8, 8, 4, 2};
    size_t ntok = 0;
    for (int i = 0; i < nseq; i++) ntok += (size_t)lengths[i];
    size_t idx_len = 34 + 12 * (size_t)nseq + 8 * (size_t)ndocs + (modes ? (size_t)nseq : 0);
    size_t bin_len = ntok * (size_t)isz[code], n = 8 + idx_len + bin_len;
    uint8_t *b = calloc(n, 1), *q = b;
    uint32_t h[2] = {(uint32_t)(vocab - 2) | (uint32_t)(seq_len - 1) << 16 | (uint32_t)flags << 24, (uint32_t)idx_len};
    memcpy(q, h, 8), q += 8;
    memcpy(q, "MMIDIDX\0\0", 9), q += 9;
    uint64_t u[3] = {1, (uint64_t)nseq, (uint64_t)ndocs};
    memcpy(q, &u[0], 8), q += 8;
    *q++ = (uint8_t)code;
    memcpy(q, &u[1], 16), q += 16;
    memcpy(q, lengths, 4 * (size_t)nseq), q += 4 * (size_t)nseq;
    int64_t ptr = 0;
    for (int i = 0; i < nseq; i++, q += 8) {
        memcpy(q, &ptr, 8);
        ptr += (int64_t)lengths[i] * isz[code];
    }
    memcpy(q, docs, 8 * (size_t)ndocs), q += 8 * (size_t)ndocs;
    for (int i = 0; modes && i < nseq; i++) *q++ = 1;
    for (size_t i = 0; i < ntok; i++, q += isz[code])
        for (int k = 0; k < isz[code]; k++) q[k] = (uint8_t)((uint64_t)tokens[i] >> (8 * k));
    if (damage == 1) b[8 + 34] ^= 0x01; // first length off by one
    if (damage == 2) n -= 1;            // .bin one byte short
    save("megatron", name, b, n);
    fuzz_write("p.idx", b + 8, idx_len);
    fuzz_write("p.bin", b + 8 + idx_len, n - 8 - idx_len);
    static const float fractions[4] = {0.0f, 0.1f, 0.5f, 0.9f};
    dsmoe_dataset_options opt = {.source = 2, .path = fuzz_path("p"), .vocab = vocab, .seq_len = seq_len,
                                 .valid_fraction = fractions[flags & 3], .seed = 7u + ((unsigned)flags >> 3)};
    dsmoe_dataset *ds = NULL;
    dsmoe_err err = {0};
    int ok = dsmoe_dataset_open(&opt, &ds, &err) == DSMOE_OK;
    if (ds) dsmoe_dataset_close(ds);
    expect("megatron", name, ok, err.msg);
    free(b);
}

static void megatrons(void) {
    static const int64_t t[20] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0};
    static const int32_t l3[3] = {5, 9, 6}, l1[1] = {20}, l4[4] = {0, 7, 13, 0};
    static const int64_t d3[3] = {0, 2, 3}, d2[2] = {0, 1}, d4[3] = {0, 1, 4};
    megatron("ok-uint16.bin", 32, 4, 1, 8, t, l3, 3, d3, 3, 0, 0);
    megatron("ok-int32-modes.bin", 20, 3, 2 | 4, 4, t, l1, 1, d2, 2, 1, 0);
    megatron("ok-uint8-empty-seqs.bin", 256, 2, 3, 1, t, l4, 4, d4, 3, 0, 0);
    megatron("ok-int64.bin", 21, 5, 0, 5, t, l3, 3, d3, 3, 0, 0);
    megatron("ok-int16.bin", 40, 1, 1 | 8, 3, t, l1, 1, d2, 2, 0, 0);
    megatron("ok-int8.bin", 20, 7, 2, 2, t, l3, 3, d3, 3, 0, 0);
    megatron("bad-vocab.bin", 10, 4, 1, 8, t, l3, 3, d3, 3, 0, 0);
    megatron("bad-length.bin", 32, 4, 1, 8, t, l3, 3, d3, 3, 0, 1);
    megatron("bad-bin-short.bin", 32, 4, 1, 4, t, l3, 3, d3, 3, 0, 2);
    megatron("bad-float-dtype.bin", 32, 4, 1, 6, t, l3, 3, d3, 3, 0, 0);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s <seeds dir (tests/fuzz/seeds)>\n", argv[0]);
        return 2;
    }
    out_dir = argv[1];
    mkdir(out_dir, 0755);
    decks();
    safetensors();
    megatrons();
    if (failures) fprintf(stderr, "make_seeds: %d seeds did not load or fail as their names say\n", failures);
    return failures ? 1 : 0;
}
