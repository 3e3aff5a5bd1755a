// core/io/data.c: see data.h (the contract) and docs/data.md (the rules, with the bound's formula).
// Three corpora behind one map "sample index -> window of T+1 tokens":
//   synthetic: K Markov chains over the chain tokens [K, V), tables built at open time from the seed;
//   text:      byte-level files, concatenated;
//   megatron:  MMIDIDX .bin/.idx pairs (docs/data.md, "Megatron-LM indexed datasets"), memory-mapped and fully validated at open time.
// Every random choice is a pure function of (seed, tag, index) through dsmoe/rng.h, so any sample is
// computed in O(T * branching) (synthetic) or O(T + log segments) (files) with no state.
#define _GNU_SOURCE
#include "data.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dsmoe/rng.h"

// Purpose tags for dsmoe_rng_key: chain tables, the two splits' samples, the window permutation.
enum {
    TAG_CHAIN = 0x636861696eull,        // "chain"
    TAG_TRAIN = 0x747261696eull,        // "train"
    TAG_VALID = 0x76616c6964ull,        // "valid"
    TAG_PERM = 0x7065726dull,           // "perm"
};
#define SYNTH_MAX_ENTRIES (1ull << 26) // K*(V-K)*branching table entries (12 bytes each)

typedef struct segment {
    const uint8_t *base; // (count * itemsize) bytes inside a mapping
    uint64_t start;      // stream index of base's first token
    uint64_t count;      // tokens
    int code;            // MMIDIDX dtype code of the tokens (text: 1, uint8)
} segment;

typedef struct mapping {
    void *addr;
    size_t len;
} mapping;

struct dsmoe_dataset {
    int source, V, T;
    uint64_t seed;
    char desc[512];
    // synthetic
    int K, N, B;    // sources, chain states (V - K), successors per state
    int32_t *succ;  // (K, N, B) successor state of each edge, in [0, N)
    double *cum;    // (K, N, B) cumulative edge probabilities; the last of each row is exactly 1
    double bound;   // dsmoe_dataset_loss_bound
    // file corpora
    mapping *maps;
    int n_maps;
    segment *segs; // sorted by start, none empty
    int n_segs;
    uint64_t n_tokens;
    uint64_t split_start[2], split_tokens[2], split_windows[2];
};

// ---------------------------------------------------------------------------------------------------
// Random numbers derived from dsmoe/rng.h

// Uniform in [0, 1) with 53 random bits.
static double uniform01(uint64_t key, uint64_t counter) {
    return (double)(dsmoe_rng_u64(key, counter) >> 11) * (1.0 / 9007199254740992.0);
}

// Uniform integer in [0, n) (multiply-shift; the bias is below 2^-32 for n < 2^32).
static uint64_t uniform_below(uint64_t key, uint64_t counter, uint64_t n) {
    return (uint64_t)(((unsigned __int128)dsmoe_rng_u64(key, counter) * n) >> 64);
}

// A keyed bijection of [0, n): a balanced 6-round Feistel network on 2h bits (4^h >= n), walking the
// cycle until the value falls inside [0, n). Expected walks < 4 because 4^h < 4n. No table: O(1).
static uint64_t permute(uint64_t x, uint64_t n, uint64_t key) {
    if (n <= 1) return 0;
    int h = 1;
    while (h < 32 && ((uint64_t)1 << (2 * h)) < n) h++;
    uint64_t mask = ((uint64_t)1 << h) - 1;
    do {
        uint64_t L = x >> h, R = x & mask;
        for (uint64_t r = 0; r < 6; r++) {
            uint64_t t = L ^ (dsmoe_rng_u64(key, (r << 32) | R) & mask);
            L = R;
            R = t;
        }
        x = (L << h) | R;
    } while (x >= n);
    return x;
}

// ---------------------------------------------------------------------------------------------------
// Synthetic corpus

// Row s of source k: `B` distinct successors by Floyd's sampling (O(B) with the `mark` scratch of N
// bytes, left all zero), weights -log(u) normalised (a Dirichlet(1) draw), stored as cumulative sums.
static void build_row(dsmoe_dataset *ds, int k, int s, uint8_t *mark) {
    int N = ds->N, B = ds->B;
    uint64_t key = dsmoe_rng_key(ds->seed, TAG_CHAIN, (uint64_t)k, (uint64_t)s);
    int32_t *succ = ds->succ + ((size_t)k * N + s) * B;
    double *cum = ds->cum + ((size_t)k * N + s) * B;
    for (int j = N - B, n = 0; j < N; j++, n++) {
        int t = (int)uniform_below(key, (uint64_t)n, (uint64_t)j + 1);
        succ[n] = mark[t] ? j : t;
        mark[succ[n]] = 1;
    }
    double total = 0;
    for (int j = 0; j < B; j++) {
        mark[succ[j]] = 0;
        cum[j] = -log(1.0 - uniform01(key, (uint64_t)(B + j))); // 1 - u is in (0, 1]: finite
        if (cum[j] < 1e-300) cum[j] = 1e-300;                    // every successor stays possible
        total += cum[j];
    }
    double acc = 0;
    for (int j = 0; j < B; j++) {
        acc += cum[j] / total;
        cum[j] = acc;
    }
    cum[B - 1] = 1.0;
}

static double edge_prob(const double *cum, int j) { return j == 0 ? cum[0] : cum[j] - cum[j - 1]; }

// Exact expected optimal loss (docs/data.md): prediction 0 costs log N (uniform first chain token);
// prediction t >= 1 conditions on the chain state after t-1 steps from the uniform start, so it costs
// sum_s q_{t-1}(s) H_k(s) with q_0 uniform and q_{m+1} = q_m P_k. Propagation stops once q is a fixed
// point to 1e-15 (L1): every later position then costs the same.
static dsmoe_status synthetic_bound(dsmoe_dataset *ds, dsmoe_err *err) {
    int N = ds->N, B = ds->B, T = ds->T;
    double *H = dsmoe_malloc((size_t)N * sizeof(double), "synthetic entropies", err);
    double *q = dsmoe_malloc((size_t)N * sizeof(double), "synthetic state distribution", err);
    double *qn = dsmoe_malloc((size_t)N * sizeof(double), "synthetic state distribution", err);
    if (!H || !q || !qn) {
        free(H), free(q), free(qn);
        return DSMOE_ERR_NOMEM;
    }
    double total = 0;
    for (int k = 0; k < ds->K; k++) {
        const int32_t *succ = ds->succ + (size_t)k * N * B;
        const double *cum = ds->cum + (size_t)k * N * B;
        for (int s = 0; s < N; s++) {
            double h = 0;
            for (int j = 0; j < B; j++) {
                double p = edge_prob(cum + (size_t)s * B, j);
                if (p > 0) h -= p * log(p);
            }
            H[s] = h;
        }
        for (int s = 0; s < N; s++) q[s] = 1.0 / N;
        double sum = log((double)N), c = 0;
        int converged = 0;
        for (int t = 1; t < T; t++) {
            if (!converged) {
                c = 0;
                for (int s = 0; s < N; s++) c += q[s] * H[s];
                memset(qn, 0, (size_t)N * sizeof(double));
                for (int s = 0; s < N; s++)
                    for (int j = 0; j < B; j++) qn[succ[(size_t)s * B + j]] += q[s] * edge_prob(cum + (size_t)s * B, j);
                double diff = 0;
                for (int s = 0; s < N; s++) diff += fabs(qn[s] - q[s]);
                double *tmp = q;
                q = qn;
                qn = tmp;
                converged = diff < 1e-15;
            }
            sum += c;
        }
        total += sum / T;
    }
    ds->bound = total / ds->K;
    free(H), free(q), free(qn);
    return DSMOE_OK;
}

static dsmoe_status open_synthetic(dsmoe_dataset *ds, const dsmoe_dataset_options *opt, dsmoe_err *err) {
    int K = opt->synthetic_sources, B = opt->synthetic_branching, V = opt->vocab;
    if (K < 1 || 2 * (int64_t)K >= V)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "synthetic corpus: data.synthetic_sources = %d must be in [1, model.vocab / 2) "
                             "(model.vocab = %d)", K, V);
    if (B < 1 || B > V - K)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "synthetic corpus: data.synthetic_branching = %d must be in [1, %d] "
                             "(model.vocab - data.synthetic_sources)", B, V - K);
    ds->K = K, ds->N = V - K, ds->B = B;
    uint64_t entries = (uint64_t)K * (uint64_t)ds->N * (uint64_t)B;
    if (entries > SYNTH_MAX_ENTRIES)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "synthetic corpus: data.synthetic_sources x (model.vocab - sources) x "
                             "data.synthetic_branching = %" PRIu64 " table entries, more than the %llu allowed: "
                             "lower data.synthetic_branching", entries, SYNTH_MAX_ENTRIES);
    ds->succ = dsmoe_malloc(entries * sizeof(int32_t), "synthetic successor table", err);
    ds->cum = dsmoe_malloc(entries * sizeof(double), "synthetic probability table", err);
    uint8_t *mark = dsmoe_calloc((size_t)ds->N, 1, "synthetic scratch", err);
    if (!ds->succ || !ds->cum || !mark) {
        free(mark);
        return DSMOE_ERR_NOMEM;
    }
    for (int k = 0; k < K; k++)
        for (int s = 0; s < ds->N; s++) build_row(ds, k, s, mark);
    free(mark);
    DSMOE_TRY(synthetic_bound(ds, err));
    snprintf(ds->desc, sizeof ds->desc,
             "synthetic: %d sources x %d successors over %d chain tokens (vocab %d), windows of %d, seed %" PRIu64,
             K, B, ds->N, V, ds->T + 1, ds->seed);
    return DSMOE_OK;
}

// window[0] = source marker; window[1] uniform chain token; window[t+1] ~ P_k(. | window[t]).
// Counters of the sample's key: 0 source, 1 first token, t+1 the step into window[t+1].
static void sample_synthetic(const dsmoe_dataset *ds, dsmoe_split split, uint64_t i, int32_t *out) {
    int N = ds->N, B = ds->B, K = ds->K;
    uint64_t key = dsmoe_rng_key(ds->seed, split == DSMOE_SPLIT_TRAIN ? TAG_TRAIN : TAG_VALID, i, 0);
    int k = (int)uniform_below(key, 0, (uint64_t)K);
    int s = (int)uniform_below(key, 1, (uint64_t)N);
    out[0] = k;
    out[1] = K + s;
    const int32_t *succ = ds->succ + (size_t)k * N * B;
    const double *cum = ds->cum + (size_t)k * N * B;
    for (int t = 1; t < ds->T; t++) {
        double u = uniform01(key, (uint64_t)t + 1);
        const double *row = cum + (size_t)s * B;
        int j = 0;
        while (u >= row[j]) j++; // row[B-1] == 1 > u stops it
        s = succ[(size_t)s * B + j];
        out[t + 1] = K + s;
    }
}

double dsmoe_dataset_transition(const dsmoe_dataset *ds, int source, int32_t from, int32_t to) {
    if (!ds || ds->source != 0 || source < 0 || source >= ds->K) return -1;
    int K = ds->K, N = ds->N, B = ds->B;
    if (from < K || from >= K + N || to < K || to >= K + N) return -1;
    size_t row = ((size_t)source * N + (size_t)(from - K)) * B;
    for (int j = 0; j < B; j++)
        if (ds->succ[row + j] == to - K) return edge_prob(ds->cum + row, j);
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// File corpora: mapping, the segment list, splits

static int itemsize_of(int code) {
    switch (code) {
    case 1: case 2: return 1;
    case 3: case 8: return 2;
    case 4: return 4;
    case 5: return 8;
    }
    return 0;
}

static const char *dtype_name(int code) {
    static const char *names[] = {"?", "uint8", "int8", "int16", "int32", "int64", "float64", "float32", "uint16"};
    return code >= 1 && code <= 8 ? names[code] : "?";
}

static int64_t token_at(const uint8_t *p, int code) {
    switch (code) {
    case 1: return *p;
    case 2: return (int8_t)*p;
    case 3: { int16_t v; memcpy(&v, p, 2); return v; }
    case 8: { uint16_t v; memcpy(&v, p, 2); return v; }
    case 4: { int32_t v; memcpy(&v, p, 4); return v; }
    default: { int64_t v; memcpy(&v, p, 8); return v; }
    }
}

// Whether all n tokens lie in [0, V): one loop per dtype so that the compiler vectorises it.
static int tokens_in_range(const uint8_t *p, uint64_t n, int code, int V) {
#define RANGE(type)                                                                                    \
    do {                                                                                               \
        int64_t lo = 0, hi = 0;                                                                        \
        for (uint64_t i = 0; i < n; i++) {                                                             \
            type v;                                                                                    \
            memcpy(&v, p + i * sizeof v, sizeof v);                                                    \
            lo = v < lo ? v : lo;                                                                      \
            hi = v > hi ? v : hi;                                                                      \
        }                                                                                              \
        return lo >= 0 && hi < V;                                                                      \
    } while (0)
    switch (code) {
    case 1: RANGE(uint8_t);
    case 2: RANGE(int8_t);
    case 3: RANGE(int16_t);
    case 4: RANGE(int32_t);
    case 5: RANGE(int64_t);
    default: RANGE(uint16_t);
    }
#undef RANGE
}

// Maps path read-only (a zero-length file maps to NULL) and records the mapping for close.
static dsmoe_status map_file(dsmoe_dataset *ds, const char *path, const uint8_t **addr, size_t *len, dsmoe_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        int e = errno;
        close(fd);
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: not a regular file%s%s", path, e ? ": " : "", e ? strerror(e) : "");
    }
    *len = (size_t)st.st_size;
    *addr = NULL;
    if (*len > 0) {
        void *p = mmap(NULL, *len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot map %s: %s", path, strerror(e));
        }
        mapping *m = realloc(ds->maps, (size_t)(ds->n_maps + 1) * sizeof *m);
        if (!m) {
            munmap(p, *len);
            close(fd);
            return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory mapping %s", path);
        }
        ds->maps = m;
        ds->maps[ds->n_maps++] = (mapping){p, *len};
        *addr = p;
    }
    close(fd); // the mapping stays valid without the descriptor
    return DSMOE_OK;
}

static dsmoe_status add_segment(dsmoe_dataset *ds, const uint8_t *base, uint64_t count, int code, dsmoe_err *err) {
    if (count == 0) return DSMOE_OK;
    segment *s = realloc(ds->segs, (size_t)(ds->n_segs + 1) * sizeof *s);
    if (!s) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for the segment list");
    ds->segs = s;
    ds->segs[ds->n_segs++] = (segment){base, ds->n_tokens, count, code};
    ds->n_tokens += count;
    return DSMOE_OK;
}

// Calls fn on each comma-separated item of list (spaces around items trimmed; empty items refused).
static dsmoe_status for_each_item(dsmoe_dataset *ds, const char *list, const char *what, int *count,
                                  dsmoe_status (*fn)(dsmoe_dataset *, const char *, void *, dsmoe_err *),
                                  void *ctx, dsmoe_err *err) {
    *count = 0;
    for (const char *p = list;;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        while (n > 0 && (*p == ' ' || *p == '\t')) p++, n--;
        while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t')) n--;
        if (n == 0)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "data.path = '%s': empty %s in the comma-separated list",
                                 list, what);
        if (n >= 4000)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "data.path: a %s of %zu bytes: at most 3999", what, n);
        char item[4096];
        memcpy(item, p, n);
        item[n] = '\0';
        DSMOE_TRY(fn(ds, item, ctx, err));
        (*count)++;
        if (!end) break;
        p = end + 1;
    }
    return DSMOE_OK;
}

static dsmoe_status add_text_file(dsmoe_dataset *ds, const char *path, void *ctx, dsmoe_err *err) {
    const uint8_t *addr;
    size_t len;
    DSMOE_TRY(map_file(ds, path, &addr, &len, err));
    return add_segment(ds, addr, len, 1, err);
}

// floor(n * f), f taken as the decimal the deck wrote (0.35, not the float's 0.3499999940) and the product
// made exactly: in binary, 700 x 0.35 is 244.99999... in float and double alike. The shortest decimal that
// reads back as f, as mant x 10^-scale, in integers.
static uint64_t floor_fraction(uint64_t n, float f) {
    char buf[32];
    int digits = 1;
    for (; digits < 9; digits++) {
        snprintf(buf, sizeof buf, "%.*e", digits - 1, (double)f);
        if (strtof(buf, NULL) == f) break;
    }
    snprintf(buf, sizeof buf, "%.*e", digits - 1, (double)f); // d.ddde-XX
    const char *e = strchr(buf, 'e');
    uint64_t mant = 0;
    for (const char *p = buf; p < e; p++)
        if (*p >= '0' && *p <= '9') mant = mant * 10 + (uint64_t)(*p - '0');
    int scale = digits - 1 - atoi(e + 1); // f = mant / 10^scale
    if (scale < 0 || scale > 27) return (uint64_t)floor((double)n * f); // not a fraction in [1e-19, 1)
    unsigned __int128 den = 1;
    for (int i = 0; i < scale; i++) den *= 10;
    return (uint64_t)((unsigned __int128)n * mant / den);
}

// The last floor(n * valid_fraction) tokens (at least T+1 when the fraction is > 0) are validation, the
// fraction as the deck wrote it.
static dsmoe_status make_splits(dsmoe_dataset *ds, const char *path, float valid_fraction, dsmoe_err *err) {
    uint64_t n = ds->n_tokens, T = (uint64_t)ds->T;
    if (!(valid_fraction >= 0 && valid_fraction < 1))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "data.valid_fraction = %g must be in [0, 1)", valid_fraction);
    uint64_t nv = floor_fraction(n, valid_fraction);
    if (valid_fraction > 0 && nv < T + 1) nv = T + 1;
    if (n < nv + T + 1)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "data.path = %s: the corpus is too small: it has %" PRIu64 " tokens, but one training window of "
                             "model.seq_len + 1 = %" PRIu64 " tokens%s needs %" PRIu64 "%s",
                             path, n, T + 1, nv ? " plus the validation split" : "", nv + T + 1,
                             nv ? " (lower model.seq_len or data.valid_fraction, or add data)" :
                                  " (lower model.seq_len or add data)");
    ds->split_start[0] = 0;
    ds->split_tokens[0] = n - nv;
    ds->split_start[1] = n - nv;
    ds->split_tokens[1] = nv;
    for (int s = 0; s < 2; s++) ds->split_windows[s] = ds->split_tokens[s] ? (ds->split_tokens[s] - 1) / T : 0;
    return DSMOE_OK;
}

static void copy_tokens(const dsmoe_dataset *ds, uint64_t pos, uint64_t n, int32_t *out) {
    int lo = 0, hi = ds->n_segs - 1; // the last segment starting at or before pos
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (ds->segs[mid].start <= pos) lo = mid;
        else hi = mid - 1;
    }
    for (int si = lo; n > 0; si++) {
        const segment *sg = &ds->segs[si];
        int isz = itemsize_of(sg->code);
        for (uint64_t j = pos - sg->start; j < sg->count && n > 0; j++, n--, pos++)
            *out++ = (int32_t)token_at(sg->base + j * (uint64_t)isz, sg->code);
    }
}

// ---------------------------------------------------------------------------------------------------
// Megatron-LM indexed datasets (docs/data.md, "Megatron-LM indexed datasets"): prefix.idx + prefix.bin

#define IDX_HEADER 34 // magic 9 + version 8 + dtype 1 + sequence_count 8 + document_count 8

typedef struct megatron_ctx {
    int code;      // dtype of the first prefix; -1 once two differ
    uint64_t docs; // documents over all prefixes
} megatron_ctx;

static uint64_t rd_u64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static dsmoe_status check_magic(const char *idx, const uint8_t *a, size_t len, dsmoe_err *err) {
    static const uint8_t magic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
    size_t n = len < 9 ? len : 9;
    if (n == 9 && memcmp(a, magic, 9) == 0) return DSMOE_OK;
    if (n == len && (n == 0 || memcmp(a, magic, n) == 0)) // a prefix of the magic: merely short
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: truncated: %zu bytes, the header alone needs %d", idx, len, IDX_HEADER);
    char hex[64] = "", txt[16] = "";
    for (size_t i = 0, at = 0; i < n; i++) {
        at += (size_t)snprintf(hex + at, sizeof hex - at, "%s%02x", i ? " " : "", a[i]);
        txt[i] = a[i] >= 0x20 && a[i] < 0x7f ? (char)a[i] : '.';
    }
    return dsmoe_err_set(err, DSMOE_ERR_IO,
                         "%s: bad magic: found %s (\"%s\"), expected 4d 4d 49 44 49 44 58 00 00 (\"MMIDIDX\\0\\0\")\n"
                         "---> HINT: data.source = megatron reads the .bin/.idx pair written by Megatron-LM's "
                         "tools/preprocess_data.py; data.path holds the prefix (without .bin/.idx)",
                         idx, n ? hex : "nothing", txt);
}

// Checks every field of prefix.idx against prefix.bin (docs/data.md lists the rules), then the tokens.
static dsmoe_status add_megatron(dsmoe_dataset *ds, const char *prefix, void *vctx, dsmoe_err *err) {
    megatron_ctx *ctx = vctx;
    char idx[4200], bin[4200];
    snprintf(idx, sizeof idx, "%s.idx", prefix);
    snprintf(bin, sizeof bin, "%s.bin", prefix);
    const uint8_t *a, *b;
    size_t alen, blen;
    DSMOE_TRY(map_file(ds, idx, &a, &alen, err));
    int idx_map = ds->n_maps - 1; // the index's mapping, dropped once it is checked
    DSMOE_TRY(check_magic(idx, a, alen, err));
    if (alen < IDX_HEADER)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: truncated: %zu bytes, the header alone needs %d", idx, alen, IDX_HEADER);
    uint64_t version = rd_u64(a + 9);
    if (version != 1)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: version %" PRIu64 ", expected 1 (the MMIDIDX version this reader knows)",
                             idx, version);
    int code = a[17];
    if (code == 6 || code == 7)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: dtype code %d (%s) holds no token ids: expected an integer dtype "
                             "(1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)", idx, code, dtype_name(code));
    int isz = itemsize_of(code);
    if (!isz)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: unknown dtype code %d: expected 1 uint8, 2 int8, 3 int16, 4 int32, "
                             "5 int64 or 8 uint16", idx, code);
    uint64_t S = rd_u64(a + 18), D = rd_u64(a + 26);
    uint64_t want = (S < (1ull << 50) && D < (1ull << 50)) ? IDX_HEADER + 12 * S + 8 * D : UINT64_MAX;
    if (want == UINT64_MAX || (alen != want && alen != want + S))
        return dsmoe_err_set(err, DSMOE_ERR_IO,
                             "%s: %zu bytes, but sequence_count %" PRIu64 " and document_count %" PRIu64 " need %" PRIu64
                             " (or %" PRIu64 " with the multimodal modes array): truncated or not this format",
                             idx, alen, S, D, want, want == UINT64_MAX ? want : want + S);
    DSMOE_TRY(map_file(ds, bin, &b, &blen, err));
    const uint8_t *lengths = a + IDX_HEADER, *pointers = lengths + 4 * S, *docs = pointers + 8 * S;
    uint64_t next = 0; // where the next sequence must start: sequences are contiguous from byte 0
    for (uint64_t i = 0; i < S; i++) {
        int32_t len;
        int64_t ptr;
        memcpy(&len, lengths + 4 * i, 4);
        memcpy(&ptr, pointers + 8 * i, 8);
        if (len < 0)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: sequence %" PRIu64 " has negative length %d", idx, i, len);
        if (ptr < 0 || (uint64_t)ptr > blen || (uint64_t)len * (uint64_t)isz > blen - (uint64_t)ptr)
            return dsmoe_err_set(err, DSMOE_ERR_IO,
                                 "%s: sequence %" PRIu64 " (pointer %" PRId64 ", %d tokens of %d bytes) runs past the end "
                                 "of %s (%zu bytes)", idx, i, ptr, len, isz, bin, blen);
        if ((uint64_t)ptr != next)
            return dsmoe_err_set(err, DSMOE_ERR_IO,
                                 "%s: sequence %" PRIu64 " starts at byte %" PRId64 " of %s, expected %" PRIu64
                                 " (sequences are stored back to back from byte 0)", idx, i, ptr, bin, next);
        next += (uint64_t)len * (uint64_t)isz;
    }
    if (next != blen)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: %zu bytes, but %s describes %" PRIu64 " (the .bin does not belong "
                             "to this .idx)", bin, blen, idx, next);
    int64_t prev = 0, d;
    for (uint64_t i = 0; i < D; i++) {
        memcpy(&d, docs + 8 * i, 8);
        if ((i == 0 && d != 0) || d < prev || (uint64_t)d > S)
            return dsmoe_err_set(err, DSMOE_ERR_IO,
                                 "%s: document_indices[%" PRIu64 "] = %" PRId64 ": expected a non-decreasing list of "
                                 "sequence indices in [0, %" PRIu64 "] starting with 0", idx, i, d, S);
        prev = d;
    }
    if (D == 0 || (uint64_t)prev != S)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: document_indices must end with sequence_count %" PRIu64
                             " (found %s%" PRId64 ")", idx, S, D ? "" : "no entries, ", D ? prev : (int64_t)0);
    // Token range: one fast pass over the whole .bin; only a bad corpus is walked per sequence, so that
    // the message can name the sequence.
    const uint8_t *p = b;
    for (uint64_t i = tokens_in_range(b, next / (uint64_t)isz, code, ds->V) ? S : 0; i < S; i++) {
        int32_t len;
        memcpy(&len, lengths + 4 * i, 4);
        for (int32_t j = 0; j < len; j++, p += isz) {
            int64_t t = token_at(p, code);
            if (t < 0 || t >= ds->V)
                return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                                     "%s: sequence %" PRIu64 " holds token %" PRId64 " (position %d), outside "
                                     "[0, model.vocab = %d): the tokenizer's vocabulary is larger than model.vocab",
                                     bin, i, t, j, ds->V);
        }
    }
    munmap(ds->maps[idx_map].addr, ds->maps[idx_map].len);
    memmove(ds->maps + idx_map, ds->maps + idx_map + 1, (size_t)(ds->n_maps - idx_map - 1) * sizeof *ds->maps);
    ds->n_maps--;
    ctx->docs += D - 1;
    if (ctx->code == 0) ctx->code = code;
    else if (ctx->code != code) ctx->code = -1;
    return add_segment(ds, b, next / (uint64_t)isz, code, err);
}

// ---------------------------------------------------------------------------------------------------
// The public interface

dsmoe_status dsmoe_dataset_open(const dsmoe_dataset_options *opt, dsmoe_dataset **out, dsmoe_err *err) {
    *out = NULL;
    if (opt->seq_len < 1)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "model.seq_len = %d: a window needs at least 1", opt->seq_len);
    if (opt->vocab < 2)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "model.vocab = %d: must be at least 2", opt->vocab);
    dsmoe_dataset *ds = dsmoe_calloc(1, sizeof *ds, "dataset", err);
    if (!ds) return DSMOE_ERR_NOMEM;
    ds->source = opt->source;
    ds->V = opt->vocab;
    ds->T = opt->seq_len;
    ds->seed = opt->seed;
    ds->bound = -1;
    dsmoe_status s = DSMOE_OK;
    const char *path = opt->path ? opt->path : "";
    int items = 0;
    if (opt->source == 0) {
        s = open_synthetic(ds, opt, err);
    } else if (opt->source == 1 || opt->source == 2) {
        const char *kind = opt->source == 1 ? "text" : "megatron";
        megatron_ctx ctx = {0, 0};
        if (!path[0])
            s = dsmoe_err_set(err, DSMOE_ERR_INVALID, "data.path is empty: data.source = %s needs %s", kind,
                              opt->source == 1 ? "text files" : "Megatron prefixes (path/name for name.bin + name.idx)");
        else if (opt->source == 1 && opt->vocab < 256)
            s = dsmoe_err_set(err, DSMOE_ERR_INVALID,
                              "data.source = text uses bytes as tokens: model.vocab = %d must be at least 256", opt->vocab);
        else if (opt->source == 1)
            s = for_each_item(ds, path, "file name", &items, add_text_file, NULL, err);
        else
            s = for_each_item(ds, path, "prefix", &items, add_megatron, &ctx, err);
        if (s == DSMOE_OK) s = make_splits(ds, path, opt->valid_fraction, err);
        if (s == DSMOE_OK) {
            char head[160];
            if (opt->source == 1)
                snprintf(head, sizeof head, "text: %d file%s, %" PRIu64 " tokens (bytes)", items, items == 1 ? "" : "s",
                         ds->n_tokens);
            else
                snprintf(head, sizeof head, "megatron: %d prefix%s, %" PRIu64 " document%s, %" PRIu64 " tokens (%s)", items,
                         items == 1 ? "" : "es", ctx.docs, ctx.docs == 1 ? "" : "s", ds->n_tokens,
                         ctx.code < 0 ? "mixed dtypes" : dtype_name(ctx.code));
            snprintf(ds->desc, sizeof ds->desc, "%s, %" PRIu64 " train windows / %" PRIu64 " valid windows of %d", head,
                     ds->split_windows[0], ds->split_windows[1], ds->T + 1);
        }
    } else {
        s = dsmoe_err_set(err, DSMOE_ERR_INVALID, "data.source = %d: expected 0 (synthetic), 1 (text) or 2 (megatron)",
                          opt->source);
    }
    if (s != DSMOE_OK) {
        dsmoe_dataset_close(ds);
        return s;
    }
    *out = ds;
    return DSMOE_OK;
}

void dsmoe_dataset_close(dsmoe_dataset *ds) {
    if (!ds) return;
    for (int i = 0; i < ds->n_maps; i++) munmap(ds->maps[i].addr, ds->maps[i].len);
    free(ds->maps);
    free(ds->segs);
    free(ds->succ);
    free(ds->cum);
    free(ds);
}

dsmoe_status dsmoe_dataset_sample(const dsmoe_dataset *ds, dsmoe_split split, uint64_t i, int32_t *out,
                                  dsmoe_err *err) {
    if (split != DSMOE_SPLIT_TRAIN && split != DSMOE_SPLIT_VALID)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "dataset sample: unknown split %d", (int)split);
    if (ds->source == 0) {
        sample_synthetic(ds, split, i, out);
        return DSMOE_OK;
    }
    uint64_t W = ds->split_windows[split];
    if (W == 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "no validation split: data.valid_fraction = 0 holds no tokens out (set it above 0 to evaluate)");
    uint64_t epoch = i / W;
    uint64_t key = dsmoe_rng_key(ds->seed, TAG_PERM, (uint64_t)split, epoch);
    uint64_t w = permute(i % W, W, key);
    copy_tokens(ds, ds->split_start[split] + w * (uint64_t)ds->T, (uint64_t)ds->T + 1, out);
    return DSMOE_OK;
}

uint64_t dsmoe_dataset_windows(const dsmoe_dataset *ds, dsmoe_split split) {
    return ds->source == 0 ? UINT64_MAX : ds->split_windows[split == DSMOE_SPLIT_VALID];
}

uint64_t dsmoe_dataset_tokens(const dsmoe_dataset *ds, dsmoe_split split) {
    return ds->source == 0 ? 0 : ds->split_tokens[split == DSMOE_SPLIT_VALID];
}

const char *dsmoe_dataset_describe(const dsmoe_dataset *ds) { return ds->desc; }

double dsmoe_dataset_loss_bound(const dsmoe_dataset *ds) { return ds->source == 0 ? ds->bound : -1; }
