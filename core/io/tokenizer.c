// core/io/tokenizer.c: see tokenizer.h and docs/text.md. Tokens are kept as raw byte strings: GPT-2's
// byte-to-unicode alphabet exists only in the files, and is undone as they are read, so encoding works
// on bytes throughout and a merge is a pair of token ids. Encoding a piece follows encoder.py's bpe()
// (the lowest-ranked pair present, merged at every occurrence left to right, until no pair has a rank)
// with a heap of (rank, position) instead of a rescan per merge: O(n log n) in the piece's length n, so
// a megabyte without a break costs what it must and no more; pieces up to CACHE_WORD bytes are cached.
#define _GNU_SOURCE
#include "tokenizer.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

#define FILE_MAX_BYTES ((size_t)1 << 30)
#define CACHE_SLOTS (1u << 16)     // word cache: open addressing, cleared when half full
#define CACHE_WORD 256             // longest piece cached, bytes
#define CACHE_ARENA (16u << 20)    // bytes of cached pieces before the cache is cleared

typedef struct merge_slot {
    uint64_t pair;   // (left id << 32 | right id)
    uint32_t rank;   // UINT32_MAX: empty slot
    int32_t result;
} merge_slot;

typedef struct cache_slot {
    uint64_t hash;
    uint32_t off, len; // the piece in cache_bytes; len 0: empty
    uint32_t ids, n;   // its tokens in cache_ids
} cache_slot;

typedef struct ivec {
    int32_t *p;
    size_t n, cap;
} ivec;

struct dsmoe_tokenizer {
    int bpe;             // 0: bytes or ids
    int has_text;        // 0: ids (every token's bytes are empty)
    int model_vocab;
    int n_tokens, n_merges;
    int32_t eot;
    char describe[160];
    dsmoe_buf bytes;     // every token's bytes, back to back
    uint32_t *tok_off;   // (model_vocab) offset in bytes
    int32_t *tok_len;    // (model_vocab) -1: no token has this id
    int32_t byte_id[256];
    merge_slot *merges;  // (merge_cap) open addressing
    size_t merge_cap;
    // encoding state: the word cache and the scratch of one piece (n symbols)
    cache_slot *cache;
    uint32_t cache_count;
    dsmoe_buf cache_bytes;
    ivec cache_ids;
    int32_t *sym, *prv, *nxt; // (n) symbol ids (-1: merged into its left), the linked list
    uint64_t *heap;           // (3n) rank << 32 | position
    uint32_t *batch;          // (3n) positions of one rank
    size_t scratch_cap;
};

static uint64_t mix64(uint64_t x) { // splitmix64's finaliser
    x ^= x >> 30, x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27, x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t hash_bytes(const void *data, size_t n, uint64_t seed) { // FNV-1a, mixed
    const uint8_t *p = data;
    uint64_t h = 0xcbf29ce484222325ull ^ seed;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return mix64(h);
}

static int ivec_push(ivec *v, int32_t x) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? 2 * v->cap : 256;
        int32_t *p = realloc(v->p, cap * sizeof *p);
        if (!p) return -1;
        v->p = p, v->cap = cap;
    }
    v->p[v->n++] = x;
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// Pre-tokenisation

int dsmoe_uc_class(uint32_t cp) {
    if (cp < 0x80) {
        if (cp >= 'a' && cp <= 'z') return DSMOE_UC_L;
        if (cp >= 'A' && cp <= 'Z') return DSMOE_UC_L;
        if (cp >= '0' && cp <= '9') return DSMOE_UC_N;
        if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return DSMOE_UC_S;
        return DSMOE_UC_OTHER;
    }
    int lo = 0, hi = dsmoe_uc_n_ranges - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < dsmoe_uc_ranges[mid].lo) hi = mid - 1;
        else if (cp > dsmoe_uc_ranges[mid].hi) lo = mid + 1;
        else return (int)dsmoe_uc_ranges[mid].cls;
    }
    return DSMOE_UC_OTHER;
}

// The class of the character at s[i] and its length in bytes; an invalid byte is one "other" character.
static int char_at(const uint8_t *s, size_t n, size_t i, uint32_t *cp, size_t *len) {
    int l = dsmoe_utf8_next(s + i, n - i, cp);
    if (l == 0) return *len = 1, *cp = 0xFFFFFFFFu, DSMOE_UC_OTHER;
    *len = (size_t)l;
    return dsmoe_uc_class(*cp);
}

size_t dsmoe_pretokenize_next(const uint8_t *s, size_t n, size_t at) {
    uint32_t c0, c;
    size_t l0, l;
    int k = char_at(s, n, at, &c0, &l0);
    if (c0 == '\'' && at + 1 < n) { // 's|'t|'re|'ve|'m|'ll|'d (case-sensitive, as GPT-2's pattern)
        uint8_t a = s[at + 1], b = at + 2 < n ? s[at + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return at + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return at + 3;
    }
    size_t j = at;
    if (c0 == ' ' && at + 1 < n) { // " ?X+": the space joins a following letter, number or other run
        int k1 = char_at(s, n, at + 1, &c, &l);
        if (k1 != DSMOE_UC_S) j = at + 1, k = k1;
    }
    if (k != DSMOE_UC_S) { // \p{L}+ | \p{N}+ | [^\s\p{L}\p{N}]+ from j
        while (j < n && char_at(s, n, j, &c, &l) == k) j += l;
        return j;
    }
    size_t last = at; // \s+(?!\S): the run, less its last character when a non-space follows; else \s+
    for (j = at; j < n && char_at(s, n, j, &c, &l) == DSMOE_UC_S; j += l) last = j;
    if (j == n) return n;
    return last > at ? last : j;
}

// ---------------------------------------------------------------------------------------------------
// Opening: the byte alphabet, token storage, lookups

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes stand for themselves, the other 68 for U+0100..0143.
static void byte_alphabet(uint32_t b2u[256], int16_t u2b[324]) {
    int extra = 0;
    for (int i = 0; i < 324; i++) u2b[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        b2u[b] = printable ? (uint32_t)b : 256u + (uint32_t)extra++;
        u2b[b2u[b]] = (int16_t)b;
    }
}

// A symbol of the files (UTF-8, in the alphabet) as bytes, appended to out; -1 when a character is not in
// the alphabet (out then holds part of it).
static int unalphabet(const char *s, size_t n, const int16_t u2b[324], dsmoe_buf *out) {
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int l = dsmoe_utf8_next((const uint8_t *)s + i, n - i, &cp);
        if (l == 0 || cp >= 324 || u2b[cp] < 0) return -1;
        uint8_t b = (uint8_t)u2b[cp];
        dsmoe_buf_put(out, &b, 1);
        i += (size_t)l;
    }
    return 0;
}

// Appends code point u as UTF-8 (raw: the byte u as it is).
static void put_cp(dsmoe_buf *b, uint32_t u, int raw) {
    char c[2] = {(char)(u < 0x80 || raw ? u : 0xC0 | u >> 6), (char)(0x80 | (u & 63))}; // u < U+0800
    dsmoe_buf_put(b, c, u < 0x80 || raw ? 1 : 2);
}

// bytes as a quoted, escaped and shortened JSON string for messages, in a rotating buffer.
static const char *show(const void *bytes, size_t n) {
    static __thread char buf[4][120];
    static __thread int k;
    k = (k + 1) % 4;
    dsmoe_buf b = {0};
    dsmoe_json_write_string(&b, bytes, n < 60 ? n : 60);
    snprintf(buf[k], sizeof buf[k], "%s%s", b.p ? b.p : "\"\"", n > 60 ? " (shortened)" : "");
    free(b.p);
    return buf[k];
}

static dsmoe_status alloc_tokens(dsmoe_tokenizer *t, int model_vocab, dsmoe_err *err) {
    t->model_vocab = model_vocab;
    t->eot = -1;
    t->tok_off = calloc((size_t)model_vocab, sizeof *t->tok_off);
    t->tok_len = malloc((size_t)model_vocab * sizeof *t->tok_len);
    if (!t->tok_off || !t->tok_len) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for %d token ids", model_vocab);
    for (int i = 0; i < model_vocab; i++) t->tok_len[i] = -1;
    return DSMOE_OK;
}

static void set_token(dsmoe_tokenizer *t, int32_t id, const void *bytes, size_t n) {
    t->tok_off[id] = (uint32_t)t->bytes.len;
    t->tok_len[id] = (int32_t)n;
    dsmoe_buf_put(&t->bytes, bytes, n);
}

dsmoe_status dsmoe_tokenizer_open_bytes(int model_vocab, dsmoe_tokenizer **out, dsmoe_err *err) {
    *out = NULL;
    if (model_vocab < 256)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "the byte tokenizer needs model.vocab >= 256 (one id per byte), "
                             "but model.vocab is %d", model_vocab);
    dsmoe_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory opening the byte tokenizer");
    dsmoe_status s = alloc_tokens(t, model_vocab, err);
    for (int b = 0; s == DSMOE_OK && b < 256; b++) {
        uint8_t c = (uint8_t)b;
        set_token(t, b, &c, 1);
        t->byte_id[b] = b;
    }
    if (s == DSMOE_OK && t->bytes.oom) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory opening the byte tokenizer");
    if (s != DSMOE_OK) return dsmoe_tokenizer_free(t), s;
    t->n_tokens = 256;
    t->has_text = 1;
    snprintf(t->describe, sizeof t->describe, "bytes (model.vocab %d)", model_vocab);
    *out = t;
    return DSMOE_OK;
}

dsmoe_status dsmoe_tokenizer_open_ids(int model_vocab, dsmoe_tokenizer **out, dsmoe_err *err) {
    *out = NULL;
    if (model_vocab < 1) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "model.vocab is %d: expected >= 1", model_vocab);
    dsmoe_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory opening the token-id tokenizer");
    dsmoe_status s = alloc_tokens(t, model_vocab, err);
    if (s != DSMOE_OK) return dsmoe_tokenizer_free(t), s;
    for (int id = 0; id < model_vocab; id++) t->tok_len[id] = 0; // known, no bytes (tok_off stays 0)
    t->n_tokens = model_vocab;
    snprintf(t->describe, sizeof t->describe, "token ids only (model.vocab %d)", model_vocab);
    *out = t;
    return DSMOE_OK;
}

// The table from token bytes to ids while the files are read: (cap) slots of ids, -1 empty. Special
// tokens (keys outside the alphabet) are kept apart from byte-alphabet ones by the hash seed and a flag.
typedef struct lookup {
    int32_t *slot;
    uint8_t *special; // (model_vocab)
    size_t cap;
} lookup;

static uint64_t lookup_hash(const void *b, size_t n, int special) { return hash_bytes(b, n, special ? 0x5bd1e995u : 0); }

// The id of bytes (alphabet or special), or -1; *at is its slot or the empty one where it would go.
static int32_t lookup_find(const dsmoe_tokenizer *t, const lookup *lk, const void *b, size_t n, int special, size_t *at) {
    size_t mask = lk->cap - 1, i = lookup_hash(b, n, special) & mask;
    for (;; i = (i + 1) & mask) {
        int32_t id = lk->slot[i];
        if (id < 0) return *at = i, -1;
        if ((size_t)t->tok_len[id] == n && lk->special[id] == special &&
            (n == 0 || memcmp(t->bytes.p + t->tok_off[id], b, n) == 0)) // (b may be NULL when n is 0)
            return *at = i, id;
    }
}

static merge_slot *merge_find(const dsmoe_tokenizer *t, int32_t a, int32_t b) {
    uint64_t pair = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    size_t mask = t->merge_cap - 1;
    for (size_t i = mix64(pair) & mask;; i = (i + 1) & mask) {
        merge_slot *m = &t->merges[i];
        if (m->rank == UINT32_MAX || m->pair == pair) return m;
    }
}

// ---------------------------------------------------------------------------------------------------
// Opening: vocab.json

typedef struct out_of_range { // the first entry with an id outside [0, model_vocab), reported at the end
    int64_t id;
    char where[1200], key[120];
} out_of_range;

static dsmoe_status read_vocab(dsmoe_tokenizer *t, lookup *lk, const char *name, const char *text, size_t len,
                               const uint32_t b2u[256], const int16_t u2b[324], dsmoe_err *err) {
    dsmoe_json j;
    dsmoe_json_init(&j, text, len, name, 1, err);
    j.flags = DSMOE_JSON_UTF8;
    j.end_name = "the end of the file";
    dsmoe_buf key = {0}, raw = {0};
    out_of_range bad = {.id = -1};
    int have_bad = 0, count = 0;
    dsmoe_status s = DSMOE_OK;
    int more = dsmoe_json_begin(&j, '{', "'{' (vocab.json is one object: token -> id)");
    for (; more > 0 && s == DSMOE_OK; more = dsmoe_json_next(&j, '}')) {
        dsmoe_json_ws(&j);
        const char *kat = j.p;
        if ((s = dsmoe_json_key(&j, &key)) != DSMOE_OK) break;
        dsmoe_json_ws(&j);
        const char *vat = j.p;
        int64_t id;
        if ((s = dsmoe_json_int(&j, INT64_MIN, INT64_MAX, 0, &id)) != DSMOE_OK) break;
        count++;
        if (id < 0 || id >= t->model_vocab) {
            if (!have_bad++) {
                bad.id = id;
                dsmoe_json_where(&j, vat, bad.where, sizeof bad.where);
                snprintf(bad.key, sizeof bad.key, "%s", show(key.p, key.len));
            }
            continue;
        }
        raw.len = 0;
        int special = unalphabet(key.p, key.len, u2b, &raw) != 0;
        const char *b = special ? key.p : raw.p;
        size_t n = special ? key.len : raw.len, at;
        if (raw.oom || t->bytes.oom) {
            s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory", name);
        } else if (t->tok_len[id] >= 0) {
            raw.len = 0; // the other key as the file writes it
            const uint8_t *o = (const uint8_t *)t->bytes.p + t->tok_off[id];
            for (int32_t k = 0; k < t->tok_len[id]; k++) put_cp(&raw, lk->special[id] ? o[k] : b2u[o[k]], lk->special[id]);
            s = dsmoe_json_errorf(&j, vat, DSMOE_ERR_IO, "%s has id %" PRId64 ", which %s has already (each id once)",
                                  show(key.p, key.len), id, show(raw.p, raw.len));
        } else if (lookup_find(t, lk, b, n, special, &at) >= 0) {
            s = dsmoe_json_errorf(&j, kat, DSMOE_ERR_IO, "the key %s appears twice", show(key.p, key.len));
        } else {
            set_token(t, (int32_t)id, b, n);
            lk->special[id] = (uint8_t)special;
            lk->slot[at] = (int32_t)id;
        }
    }
    free(key.p), free(raw.p);
    if (s != DSMOE_OK) return s;
    if (more < 0) return j.status;
    DSMOE_TRY(dsmoe_json_end(&j, "the end of the file after the object"));
    if (t->bytes.oom) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory", name);
    if (count > t->model_vocab)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s holds %d tokens but the model's vocabulary (model.vocab) has %d: "
                             "these tokenizer files are not the model's", name, count, t->model_vocab);
    if (have_bad)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: token %s has id %" PRId64 ", outside the model's vocabulary "
                             "[0, %d) (model.vocab): these tokenizer files are not the model's", bad.where, bad.key, bad.id,
                             t->model_vocab);
    t->n_tokens = count;
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Opening: merges.txt

// The id of symbol [s, s+n) of merges line `line`, via its bytes appended to *raw.
static dsmoe_status merge_symbol(dsmoe_tokenizer *t, const lookup *lk, const char *name, int line, const char *s,
                                 size_t n, const int16_t u2b[324], dsmoe_buf *raw, const char *vocab_name,
                                 int32_t *id, dsmoe_err *err) {
    size_t from = raw->len, at;
    if (unalphabet(s, n, u2b, raw) != 0)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s:%d: symbol %s is not written in GPT-2's byte alphabet", name, line,
                             show(s, n));
    if (raw->oom) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory", name);
    *id = lookup_find(t, lk, raw->p + from, raw->len - from, 0, &at);
    if (*id < 0) return dsmoe_err_set(err, DSMOE_ERR_IO, "%s:%d: symbol %s is not in %s", name, line, show(s, n), vocab_name);
    return DSMOE_OK;
}

static dsmoe_status read_merges(dsmoe_tokenizer *t, const lookup *lk, const char *name, const char *text, size_t len,
                                const int16_t u2b[324], const char *vocab_name, dsmoe_err *err) {
    size_t lines = 1;
    for (size_t i = 0; i < len; i++) lines += text[i] == '\n';
    t->merge_cap = 16;
    while (t->merge_cap < 2 * lines) t->merge_cap *= 2;
    t->merges = malloc(t->merge_cap * sizeof *t->merges);
    if (!t->merges) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory for %zu merges", name, lines);
    for (size_t i = 0; i < t->merge_cap; i++) t->merges[i].rank = UINT32_MAX;
    dsmoe_buf raw = {0};
    dsmoe_status s = DSMOE_OK;
    int line = 1;
    for (const char *p = text, *end = text + len; p < end && s == DSMOE_OK; line++) {
        const char *eol = memchr(p, '\n', (size_t)(end - p)), *q;
        eol = eol ? eol : end;
        q = eol > p && eol[-1] == '\r' ? eol - 1 : eol;
        const char *at = p;
        p = eol + 1;
        if (line == 1 && q - at >= 8 && memcmp(at, "#version", 8) == 0) continue;
        for (const char *c = at; c < q;) { // UTF-8 first, so that messages can quote the symbols
            uint32_t cp;
            int l = dsmoe_utf8_next((const uint8_t *)c, (size_t)(q - c), &cp);
            if (l == 0) s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s:%d:%zu: invalid UTF-8 (byte 0x%02x)", name, line,
                                          (size_t)(c - at) + 1, (unsigned char)*c);
            if (l == 0) break;
            c += l;
        }
        const char *part[3];
        size_t plen[3];
        int np = 0;
        for (const char *c = at; c < q && np < 3;) { // fields split by spaces and tabs, as str.split()
            while (c < q && (*c == ' ' || *c == '\t')) c++;
            if (c == q) break;
            part[np] = c;
            while (c < q && *c != ' ' && *c != '\t') c++;
            plen[np] = (size_t)(c - part[np]), np++;
        }
        if (s == DSMOE_OK && np != 2)
            s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s:%d: expected a merge, two symbols separated by a space, found %s",
                              name, line, np == 0 ? "an empty line" : np == 1 ? "one symbol" : "more than two");
        int32_t a, b;
        raw.len = 0;
        if (s == DSMOE_OK) s = merge_symbol(t, lk, name, line, part[0], plen[0], u2b, &raw, vocab_name, &a, err);
        if (s == DSMOE_OK) s = merge_symbol(t, lk, name, line, part[1], plen[1], u2b, &raw, vocab_name, &b, err);
        if (s != DSMOE_OK) break;
        size_t slot;
        int32_t r = lookup_find(t, lk, raw.p, raw.len, 0, &slot);
        if (r < 0) {
            char both[512];
            snprintf(both, sizeof both, "%.*s%.*s", (int)plen[0], part[0], (int)plen[1], part[1]);
            s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s:%d: the merge of %s and %s makes %s, which is not in %s: every merge "
                              "must make a token", name, line, show(part[0], plen[0]), show(part[1], plen[1]),
                              show(both, strlen(both)), vocab_name);
            break;
        }
        // A pair listed twice keeps its later rank, as GPT-2's dict(zip(merges, range(n))) does.
        merge_slot *m = merge_find(t, a, b);
        *m = (merge_slot){.pair = (uint64_t)(uint32_t)a << 32 | (uint32_t)b, .rank = (uint32_t)t->n_merges, .result = r};
        t->n_merges++;
    }
    free(raw.p);
    return s;
}

dsmoe_status dsmoe_tokenizer_open_bpe_mem(const char *vocab_name, const char *vocab, size_t vocab_len,
                                          const char *merges_name, const char *merges, size_t merges_len,
                                          int model_vocab, dsmoe_tokenizer **out, dsmoe_err *err) {
    *out = NULL;
    if (model_vocab < 256)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "a GPT-2 BPE vocabulary needs model.vocab >= 256 (one token per "
                             "byte at least), but model.vocab is %d", model_vocab);
    uint32_t b2u[256];
    int16_t u2b[324];
    byte_alphabet(b2u, u2b);
    dsmoe_tokenizer *t = calloc(1, sizeof *t);
    lookup lk = {0};
    dsmoe_status s = t ? alloc_tokens(t, model_vocab, err) : dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory");
    if (s == DSMOE_OK) {
        t->bpe = 1, t->has_text = 1;
        for (lk.cap = 16; lk.cap < 2 * (size_t)model_vocab + 2;) lk.cap *= 2;
        lk.slot = malloc(lk.cap * sizeof *lk.slot);
        lk.special = calloc((size_t)model_vocab, 1);
        if (!lk.slot || !lk.special) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory reading %s", vocab_name);
        for (size_t i = 0; s == DSMOE_OK && i < lk.cap; i++) lk.slot[i] = -1;
    }
    if (s == DSMOE_OK) s = read_vocab(t, &lk, vocab_name, vocab, vocab_len, b2u, u2b, err);
    for (int b = 0; s == DSMOE_OK && b < 256; b++) { // the 256 byte symbols, where every piece starts
        uint8_t c = (uint8_t)b;
        size_t at;
        t->byte_id[b] = lookup_find(t, &lk, &c, 1, 0, &at);
        if (t->byte_id[b] < 0) {
            dsmoe_buf sym = {0};
            put_cp(&sym, b2u[b], 0);
            s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s has no token for byte 0x%02x (the symbol %s): a GPT-2 byte-level "
                              "vocabulary has one for each of the 256 bytes", vocab_name, b, show(sym.p, sym.len));
            free(sym.p);
        }
    }
    if (s == DSMOE_OK) s = read_merges(t, &lk, merges_name, merges, merges_len, u2b, vocab_name, err);
    if (s == DSMOE_OK) {
        size_t at;
        t->eot = lookup_find(t, &lk, "<|endoftext|>", 13, 0, &at);
        snprintf(t->describe, sizeof t->describe, "GPT-2 BPE: %d tokens, %d merges (model.vocab %d)", t->n_tokens,
                 t->n_merges, model_vocab);
        t->cache = calloc(CACHE_SLOTS, sizeof *t->cache);
        if (!t->cache) s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for the tokenizer's cache");
    }
    free(lk.slot), free(lk.special);
    if (s != DSMOE_OK) return dsmoe_tokenizer_free(t), s;
    *out = t;
    return DSMOE_OK;
}

dsmoe_status dsmoe_tokenizer_open_bpe(const char *vocab_json, const char *merges_txt, int model_vocab,
                                      dsmoe_tokenizer **out, dsmoe_err *err) {
    char *v = NULL, *m = NULL;
    size_t vn = 0, mn = 0;
    *out = NULL;
    dsmoe_status s = dsmoe_read_regular_file(vocab_json, "tokenizer vocabulary", FILE_MAX_BYTES, &v, &vn, err);
    if (s == DSMOE_OK) s = dsmoe_read_regular_file(merges_txt, "tokenizer merges", FILE_MAX_BYTES, &m, &mn, err);
    if (s == DSMOE_OK) s = dsmoe_tokenizer_open_bpe_mem(vocab_json, v, vn, merges_txt, m, mn, model_vocab, out, err);
    free(v), free(m);
    return s;
}

void dsmoe_tokenizer_free(dsmoe_tokenizer *t) {
    if (!t) return;
    free(t->bytes.p), free(t->tok_off), free(t->tok_len), free(t->merges);
    free(t->cache), free(t->cache_bytes.p), free(t->cache_ids.p);
    free(t->sym), free(t->prv), free(t->nxt), free(t->heap), free(t->batch);
    free(t);
}

const char *dsmoe_tokenizer_describe(const dsmoe_tokenizer *t) { return t->describe; }
int dsmoe_tokenizer_vocab(const dsmoe_tokenizer *t) { return t->model_vocab; }
int dsmoe_tokenizer_id_end(const dsmoe_tokenizer *t, int *holes) {
    int end = 0, missing = 0;
    for (int i = 0; i < t->model_vocab; i++)
        if (t->tok_len[i] >= 0) end = i + 1;
    for (int i = 0; i < end; i++) missing += t->tok_len[i] < 0;
    if (holes) *holes = missing;
    return end;
}
int32_t dsmoe_tokenizer_eot(const dsmoe_tokenizer *t) { return t->eot; }
int dsmoe_tokenizer_has_text(const dsmoe_tokenizer *t) { return t->has_text; }

// ---------------------------------------------------------------------------------------------------
// Encoding

static void heap_push(uint64_t *h, size_t *n, uint64_t x) {
    size_t i = (*n)++;
    for (; i > 0 && h[(i - 1) / 2] > x; i = (i - 1) / 2) h[i] = h[(i - 1) / 2];
    h[i] = x;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], x = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (h[c] >= x) break;
        h[i] = h[c], i = c;
    }
    h[i] = x;
    return top;
}

// Pushes the pair that starts at position i when it has a merge.
static void push_pair(dsmoe_tokenizer *t, size_t *hn, int32_t i) {
    if (i < 0 || t->nxt[i] < 0) return;
    const merge_slot *m = merge_find(t, t->sym[i], t->sym[t->nxt[i]]);
    if (m->rank != UINT32_MAX) heap_push(t->heap, hn, (uint64_t)m->rank << 32 | (uint32_t)i);
}

static int scratch(dsmoe_tokenizer *t, size_t n) {
    if (n <= t->scratch_cap) return 0;
    size_t cap = n > 2 * t->scratch_cap ? n : 2 * t->scratch_cap;
    int32_t *a = realloc(t->sym, cap * sizeof *a), *b = a ? realloc(t->prv, cap * sizeof *b) : NULL;
    if (a) t->sym = a;
    if (b) t->prv = b;
    int32_t *c = b ? realloc(t->nxt, cap * sizeof *c) : NULL;
    if (c) t->nxt = c;
    uint64_t *h = c ? realloc(t->heap, 3 * cap * sizeof *h) : NULL;
    if (h) t->heap = h;
    uint32_t *bt = h ? realloc(t->batch, 3 * cap * sizeof *bt) : NULL;
    if (bt) t->batch = bt;
    if (!bt) return -1;
    t->scratch_cap = cap;
    return 0;
}

// The tokens of one piece (n >= 2 bytes) appended to out.
static int bpe_piece(dsmoe_tokenizer *t, const uint8_t *w, size_t n, ivec *out) {
    if (scratch(t, n) != 0) return -1;
    for (size_t i = 0; i < n; i++) {
        t->sym[i] = t->byte_id[w[i]];
        t->prv[i] = (int32_t)i - 1;
        t->nxt[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    size_t hn = 0;
    for (size_t i = 0; i + 1 < n; i++) push_pair(t, &hn, (int32_t)i);
    while (hn > 0) {
        // Every occurrence of the lowest-ranked pair, left to right; the pairs these merges make wait
        // until all are done, as in encoder.py, where a new pair is seen on the next scan.
        uint32_t rank = (uint32_t)(t->heap[0] >> 32);
        size_t nb = 0, nt = 0;
        while (hn > 0 && (uint32_t)(t->heap[0] >> 32) == rank) t->batch[nb++] = (uint32_t)heap_pop(t->heap, &hn);
        for (size_t k = 0; k < nb; k++) {
            int32_t i = (int32_t)t->batch[k], j;
            if (t->sym[i] < 0 || (j = t->nxt[i]) < 0) continue; // merged away, or now the last symbol
            const merge_slot *m = merge_find(t, t->sym[i], t->sym[j]);
            if (m->rank != rank) continue; // an earlier merge of this batch changed the pair
            t->sym[i] = m->result;
            t->sym[j] = -1;
            t->nxt[i] = t->nxt[j];
            if (t->nxt[j] >= 0) t->prv[t->nxt[j]] = i;
            t->batch[nt++] = (uint32_t)i; // nt <= k: the batch is reused for the merged positions
        }
        for (size_t k = 0; k < nt; k++) {
            int32_t i = (int32_t)t->batch[k];
            push_pair(t, &hn, t->prv[i]);
            push_pair(t, &hn, i);
        }
    }
    for (int32_t i = 0; i >= 0; i = t->nxt[i])
        if (ivec_push(out, t->sym[i]) != 0) return -1;
    return 0;
}

// The tokens of one piece, through the cache.
static int encode_piece(dsmoe_tokenizer *t, const uint8_t *w, size_t n, ivec *out) {
    if (n == 1) return ivec_push(out, t->byte_id[w[0]]);
    if (n > CACHE_WORD) return bpe_piece(t, w, n, out);
    uint64_t h = hash_bytes(w, n, 0);
    size_t mask = CACHE_SLOTS - 1, i = h & mask;
    for (; t->cache[i].len; i = (i + 1) & mask) {
        const cache_slot *c = &t->cache[i];
        if (c->hash == h && c->len == n && memcmp(t->cache_bytes.p + c->off, w, n) == 0) {
            for (uint32_t k = 0; k < c->n; k++)
                if (ivec_push(out, t->cache_ids.p[c->ids + k]) != 0) return -1;
            return 0;
        }
    }
    size_t first = out->n;
    if (bpe_piece(t, w, n, out) != 0) return -1;
    if (t->cache_count >= CACHE_SLOTS / 2 || t->cache_bytes.len + n > CACHE_ARENA) { // start afresh
        memset(t->cache, 0, CACHE_SLOTS * sizeof *t->cache);
        t->cache_count = 0, t->cache_bytes.len = 0, t->cache_ids.n = 0;
        for (i = h & mask; t->cache[i].len; i = (i + 1) & mask) {}
    }
    cache_slot c = {.hash = h, .off = (uint32_t)t->cache_bytes.len, .len = (uint32_t)n, .ids = (uint32_t)t->cache_ids.n,
                    .n = (uint32_t)(out->n - first)};
    dsmoe_buf_put(&t->cache_bytes, w, n);
    for (size_t k = first; k < out->n; k++)
        if (ivec_push(&t->cache_ids, out->p[k]) != 0) return -1;
    if (t->cache_bytes.oom) return -1;
    t->cache[i] = c;
    t->cache_count++;
    return 0;
}

dsmoe_status dsmoe_tokenizer_encode(dsmoe_tokenizer *t, const void *text, size_t len, int32_t **ids, size_t *n,
                                    dsmoe_err *err) {
    *ids = NULL;
    *n = 0;
    if (!t->has_text)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "the token-id tokenizer has no text: give prompts as token ids");
    if (len > INT32_MAX)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "text of %zu bytes to encode: at most %d at a time", len, INT32_MAX);
    const uint8_t *s = text;
    ivec out = {0};
    int rc = 0;
    for (size_t at = 0; at < len && rc == 0;) {
        if (!t->bpe) {
            rc = ivec_push(&out, t->byte_id[s[at++]]);
            continue;
        }
        size_t end = dsmoe_pretokenize_next(s, len, at);
        rc = encode_piece(t, s + at, end - at, &out);
        at = end;
    }
    if (rc != 0) {
        free(out.p);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory encoding %zu bytes of text", len);
    }
    *ids = out.p;
    *n = out.n;
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Decoding

dsmoe_status dsmoe_tokenizer_token_bytes(const dsmoe_tokenizer *t, int32_t id, const uint8_t **bytes, size_t *len,
                                         dsmoe_err *err) {
    if (id < 0 || id >= t->model_vocab || t->tok_len[id] < 0) {
        *bytes = NULL, *len = 0;
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "unknown token id %" PRId32 ": %s", id,
                             id < 0 || id >= t->model_vocab ? "outside the model's vocabulary [0, model.vocab)"
                             : t->bpe ? "the tokenizer's vocab.json has no token with this id (a padding id of model.vocab)"
                                      : "the byte tokenizer knows ids 0..255"); // (ids knows every id)
    }
    *len = (size_t)t->tok_len[id];
    *bytes = *len ? (const uint8_t *)t->bytes.p + t->tok_off[id] : (const uint8_t *)""; // (bytes.p NULL for ids)
    return DSMOE_OK;
}

dsmoe_status dsmoe_tokenizer_decode(const dsmoe_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len,
                                    dsmoe_err *err) {
    *text = NULL;
    *len = 0;
    dsmoe_buf b = {0};
    dsmoe_buf_put(&b, "", 0);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p;
        size_t l;
        dsmoe_status s = dsmoe_tokenizer_token_bytes(t, ids[i], &p, &l, err);
        if (s != DSMOE_OK) {
            free(b.p);
            if (err) {
                char msg[sizeof err->msg];
                snprintf(msg, sizeof msg, "%s", err->msg);
                dsmoe_err_set(err, s, "token %zu of %zu: %s", i, n, msg);
            }
            return s;
        }
        dsmoe_buf_put(&b, p, l);
    }
    if (b.oom) {
        free(b.p);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory decoding %zu tokens", n);
    }
    *text = b.p;
    *len = b.len;
    return DSMOE_OK;
}
