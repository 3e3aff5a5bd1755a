// core/io/safetensors.c: see safetensors.h and docs/checkpoint.md (section "The file format").
// The writer streams header and tensors into `<path>.tmp.<pid>`, fsyncs, renames over path and fsyncs
// the directory, so a checkpoint of hundreds of MB never sits in one buffer and an existing file is
// replaced whole or not at all. The CRC32C of each tensor is computed over the bytes as they are written
// and lands in the header's metadata: the header is written first with placeholders of the same width
// and rewritten in place once the data is out, before the fsync. The reader maps the file read-only and
// parses the JSON header with the strict reader of json.h (objects, arrays, strings with escapes, numbers;
// true/false/null and \u0000 are refused).
// Assumes a little-endian host (x86-64, AArch64): tensor bytes are written and exposed as they are.
#define _GNU_SOURCE
#include "safetensors.h"

#include "json.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const struct {
    const char *name;
    size_t size;
} dtypes[] = {
    [DSMOE_ST_F32] = {"F32", 4}, [DSMOE_ST_F64] = {"F64", 8}, [DSMOE_ST_I32] = {"I32", 4},
    [DSMOE_ST_I64] = {"I64", 8}, [DSMOE_ST_U8] = {"U8", 1},   [DSMOE_ST_F16] = {"F16", 2},
    [DSMOE_ST_BF16] = {"BF16", 2}, [DSMOE_ST_I16] = {"I16", 2}, [DSMOE_ST_I8] = {"I8", 1},
    [DSMOE_ST_BOOL] = {"BOOL", 1},
};
#define N_DTYPES ((int)(sizeof dtypes / sizeof dtypes[0]))
#define KNOWN_DTYPES "F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL"

const char *dsmoe_st_dtype_name(dsmoe_st_dtype dtype) {
    return (int)dtype >= 0 && (int)dtype < N_DTYPES ? dtypes[dtype].name : "?";
}

// Bytes of a tensor; 0 with *overflow set when the count does not fit in 63 bits.
static uint64_t tensor_bytes(dsmoe_st_dtype dtype, int ndim, const int64_t *shape, int *overflow) {
    unsigned __int128 n = dtypes[dtype].size;
    *overflow = 0;
    for (int d = 0; d < ndim; d++)
        if (shape[d] == 0) return 0;
    for (int d = 0; d < ndim && !*overflow; d++) {
        n *= (uint64_t)shape[d];
        *overflow = n > (unsigned __int128)INT64_MAX;
    }
    return *overflow ? 0 : (uint64_t)n;
}

// CRC32C, slicing by 8: crc_table[k][b] is the CRC of byte b followed by k zero bytes, so eight bytes
// are folded per step with eight lookups.
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][b] = c;
    }
    for (int k = 1; k < 8; k++)
        for (int b = 0; b < 256; b++) crc_table[k][b] = (crc_table[k - 1][b] >> 8) ^ crc_table[0][crc_table[k - 1][b] & 0xff];
}

uint32_t dsmoe_crc32c(uint32_t crc, const void *data, size_t n) {
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = data;
    uint32_t c = ~crc;
    for (; n >= 8; n -= 8, p += 8) { // little-endian host (see the top of this file)
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;
        c = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^ crc_table[5][(w >> 16) & 0xff] ^
            crc_table[4][(w >> 24) & 0xff] ^ crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
            crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
    }
    for (; n > 0; n--, p++) c = (c >> 8) ^ crc_table[0][(c ^ *p) & 0xff];
    return ~c;
}

// Makes room for element n of the array *pp (capacity *cap, doubling); -1 when out of memory.
static int grow(void *pp, int n, int *cap, size_t elem) {
    if (n < *cap) return 0;
    int c = *cap ? 2 * *cap : 16;
    void *p = realloc(*(void **)pp, (size_t)c * elem);
    if (!p) return -1;
    *(void **)pp = p;
    *cap = c;
    return 0;
}

// "F32 [2, 2]" for messages.
static void describe_shape(char *buf, size_t cap, dsmoe_st_dtype dtype, int ndim, const int64_t *shape) {
    size_t at = (size_t)snprintf(buf, cap, "%s [", dsmoe_st_dtype_name(dtype));
    for (int d = 0; d < ndim && at < cap; d++) at += (size_t)snprintf(buf + at, cap - at, "%s%" PRId64, d ? ", " : "", shape[d]);
    if (at < cap) snprintf(buf + at, cap - at, "]");
}

// ---------------------------------------------------------------------------------------------------
// Writing

typedef struct st_entry {
    char *name;
    dsmoe_st_dtype dtype;
    int ndim;
    int64_t shape[DSMOE_ST_MAX_DIMS];
    const void *data; // borrowed until commit
    uint64_t nbytes;
    uint32_t crc;     // of the bytes written (commit)
} st_entry;

struct dsmoe_st_writer {
    st_entry *t;
    int n, cap;
    char **meta; // (nm, 2): key, value
    int nm, capm;
};

dsmoe_st_writer *dsmoe_st_writer_new(void) { return calloc(1, sizeof(dsmoe_st_writer)); }

void dsmoe_st_writer_free(dsmoe_st_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++) free(w->t[i].name);
    for (int i = 0; i < 2 * w->nm; i++) free(w->meta[i]);
    free(w->t);
    free(w->meta);
    free(w);
}

dsmoe_status dsmoe_st_writer_add(dsmoe_st_writer *w, const char *name, dsmoe_st_dtype dtype, int ndim,
                                 const int64_t *shape, const void *data, dsmoe_err *err) {
    if (!name || !name[0] || strcmp(name, "__metadata__") == 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: tensor name '%s' is not allowed", name ? name : "(null)");
    if ((int)dtype < 0 || (int)dtype >= N_DTYPES)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: tensor '%s': unknown dtype %d", name, (int)dtype);
    if (ndim < 0 || ndim > DSMOE_ST_MAX_DIMS || (ndim > 0 && !shape))
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: tensor '%s': %d dimensions, expected 0..%d", name,
                             ndim, DSMOE_ST_MAX_DIMS);
    for (int d = 0; d < ndim; d++)
        if (shape[d] < 0)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: tensor '%s': dimension %d is %" PRId64, name, d, shape[d]);
    int overflow;
    uint64_t nbytes = tensor_bytes(dtype, ndim, shape, &overflow);
    if (overflow) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: tensor '%s': shape too large", name);
    for (int i = 0; i < w->n; i++)
        if (strcmp(w->t[i].name, name) == 0)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: tensor '%s' added twice", name);
    if (grow(&w->t, w->n, &w->cap, sizeof *w->t) != 0)
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory adding tensor '%s'", name);
    st_entry *e = &w->t[w->n];
    *e = (st_entry){.name = strdup(name), .dtype = dtype, .ndim = ndim, .data = data, .nbytes = nbytes};
    if (!e->name) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory adding tensor '%s'", name);
    for (int d = 0; d < ndim; d++) e->shape[d] = shape[d];
    w->n++;
    return DSMOE_OK;
}

dsmoe_status dsmoe_st_writer_meta(dsmoe_st_writer *w, const char *key, const char *value, dsmoe_err *err) {
    if (!key || !value) return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: metadata key and value must not be NULL");
    if (strncmp(key, DSMOE_ST_CRC_PREFIX, strlen(DSMOE_ST_CRC_PREFIX)) == 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: metadata key '%s': the prefix " DSMOE_ST_CRC_PREFIX
                             " is the writer's (tensor checksums)", key);
    for (int i = 0; i < w->nm; i++)
        if (strcmp(w->meta[2 * i], key) == 0)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: metadata key '%s' set twice", key);
    char *k = strdup(key), *v = strdup(value);
    if (!k || !v || grow(&w->meta, w->nm, &w->capm, 2 * sizeof *w->meta) != 0) {
        free(k), free(v);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory adding metadata '%s'", key);
    }
    w->meta[2 * w->nm] = k;
    w->meta[2 * w->nm + 1] = v;
    w->nm++;
    return DSMOE_OK;
}

static void sb_str(dsmoe_buf *b, const char *s) { dsmoe_buf_put(b, s, strlen(s)); }

// A JSON string literal (json.h: quote, backslash and control characters escaped; a byte that is not
// UTF-8 as \ufffd, which names and metadata, made from UTF-8 decks, never hold).
static void sb_json(dsmoe_buf *b, const char *s) { dsmoe_json_write_string(b, s, strlen(s)); }

// The header: JSON padded with spaces so that 8 + length is a multiple of 8; offsets in insertion order.
// The metadata ends with "crc32c.<name>": "<8 hex digits>" per tensor (fixed width: the header is
// rebuilt with the real values after the data is written, and must keep its length).
static int build_header(const dsmoe_st_writer *w, dsmoe_buf *b) {
    char num[64];
    sb_str(b, "{");
    if (w->nm > 0 || w->n > 0) {
        sb_str(b, "\"__metadata__\":{");
        for (int i = 0; i < w->nm; i++) {
            if (i) sb_str(b, ",");
            sb_json(b, w->meta[2 * i]);
            sb_str(b, ":");
            sb_json(b, w->meta[2 * i + 1]);
        }
        for (int i = 0; i < w->n; i++) {
            dsmoe_buf key = {0};
            sb_str(&key, DSMOE_ST_CRC_PREFIX);
            sb_str(&key, w->t[i].name);
            if (key.oom) b->oom = 1;
            if (i || w->nm) sb_str(b, ",");
            if (!key.oom) sb_json(b, key.p);
            free(key.p);
            snprintf(num, sizeof num, ":\"%08" PRIx32 "\"", w->t[i].crc);
            sb_str(b, num);
        }
        sb_str(b, "}");
    }
    uint64_t off = 0;
    for (int i = 0; i < w->n; i++) {
        const st_entry *e = &w->t[i];
        sb_str(b, ",");
        sb_json(b, e->name);
        sb_str(b, ":{\"dtype\":\"");
        sb_str(b, dtypes[e->dtype].name);
        sb_str(b, "\",\"shape\":[");
        for (int d = 0; d < e->ndim; d++) {
            snprintf(num, sizeof num, "%s%" PRId64, d ? "," : "", e->shape[d]);
            sb_str(b, num);
        }
        snprintf(num, sizeof num, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off, off + e->nbytes);
        sb_str(b, num);
        off += e->nbytes;
    }
    sb_str(b, "}");
    while ((8 + b->len) % 8) sb_str(b, " ");
    return b->oom ? -1 : 0;
}

static int write_all(int fd, const void *data, uint64_t len) {
    const char *p = data;
    while (len > 0) {
        ssize_t n = write(fd, p, len > (1u << 30) ? (1u << 30) : (size_t)len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (n == 0) errno = EIO;
            return -1;
        }
        p += n;
        len -= (uint64_t)n;
    }
    return 0;
}

dsmoe_status dsmoe_st_writer_commit(dsmoe_st_writer *w, const char *path, dsmoe_err *err) {
    return dsmoe_st_writer_commit_stream(w, path, NULL, NULL, err);
}

dsmoe_status dsmoe_st_writer_commit_stream(dsmoe_st_writer *w, const char *path, dsmoe_st_source_fn source,
                                           void *user, dsmoe_err *err) {
    char tmp[4200];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= sizeof tmp)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: path too long", path);
    for (int i = 0; i < w->n; i++)
        if (!w->t[i].data && w->t[i].nbytes > 0 && !source)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "safetensors: tensor '%s': data is NULL", w->t[i].name);
    for (int i = 0; i < w->n; i++) w->t[i].crc = 0; // placeholders, rewritten below
    dsmoe_buf hdr = {0};
    int oom = build_header(w, &hdr) != 0;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hdr.len >> (8 * i));
    const char *step = "create";
    int fd = oom ? -1 : open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644), ok = fd >= 0, e = errno;
    if (ok) step = "write", ok = write_all(fd, len8, 8) == 0 && write_all(fd, hdr.p, hdr.len) == 0, e = errno;
    dsmoe_status src = DSMOE_OK;
    for (int i = 0; i < w->n; i++) {
        const void *data = w->t[i].data;
        if (!data && w->t[i].nbytes > 0 && src == DSMOE_OK) src = source(user, i, &data, err);
        else if (!data && w->t[i].nbytes > 0) source(user, i, &data, NULL); // keep the source's collectives going
        if (ok && src == DSMOE_OK) {
            w->t[i].crc = dsmoe_crc32c(0, data, w->t[i].nbytes);
            ok = write_all(fd, data, w->t[i].nbytes) == 0, e = errno;
        }
    }
    if (ok && src == DSMOE_OK) { // the header again, with the checksums, over the placeholders
        dsmoe_buf final = {0};
        step = "write";
        if (build_header(w, &final) != 0 || final.len != hdr.len) ok = 0, oom = 1;
        else if (pwrite(fd, final.p, final.len, 8) != (ssize_t)final.len) ok = 0, e = errno ? errno : EIO;
        free(final.p);
    }
    if (ok && src == DSMOE_OK && fsync(fd) != 0) ok = 0, step = "flush", e = errno;
    free(hdr.p);
    if (fd >= 0 && close(fd) != 0 && ok) ok = 0, step = "flush", e = errno;
    if (ok && src == DSMOE_OK && rename(tmp, path) != 0) ok = 0, step = "rename", e = errno;
    if (!ok || src != DSMOE_OK) {
        if (fd >= 0) unlink(tmp); // never a directory of that name that made open fail
        if (src != DSMOE_OK) return src;
        if (oom) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory building the safetensors header", path);
        return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot %s %s: %s (%s is unchanged)", step, tmp, strerror(e), path);
    }
    char *copy = strdup(path); // make the rename durable; a directory we cannot open is not an error
    int dfd = copy ? open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    if (dfd >= 0) fsync(dfd), close(dfd);
    free(copy);
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Reading: the JSON header (json.h), byte offsets in messages counted from the start of the file

struct dsmoe_st_file {
    char *path;
    void *map;
    size_t len;
    uint64_t hlen;      // the header's declared length: the data buffer is [8 + hlen, len)
    int checksums;      // every tensor has a recorded CRC32C (0: none has)
    dsmoe_st_tensor *t; // (n) in data-offset order
    uint64_t *begin;    // (n) data offsets, for messages
    int n, cap, capb;
    int *by_name;       // (n) indices of t sorted by name
    char **meta;        // (nm, 2) key, value
    int nm, capm;
};

// A non-negative integer (no sign, fraction or exponent) below 2^63.
static dsmoe_status juint(dsmoe_json *j, uint64_t *out) {
    int64_t v;
    DSMOE_TRY(dsmoe_json_int(j, 0, INT64_MAX, 0, &v));
    *out = (uint64_t)v;
    return DSMOE_OK;
}

// [a, b, ...] of non-negative integers, at most max of them.
static dsmoe_status juint_array(dsmoe_json *j, uint64_t *v, int max, int *n, const char *what) {
    *n = 0;
    int more = dsmoe_json_begin(j, '[', what);
    if (more < 0) return DSMOE_ERR_IO;
    for (; more;) {
        if (*n == max) return dsmoe_json_fail(j, max == 2 ? "two offsets" : "at most 8 dimensions");
        DSMOE_TRY(juint(j, &v[(*n)++]));
        if ((more = dsmoe_json_next(j, ']')) < 0) return DSMOE_ERR_IO;
    }
    return DSMOE_OK;
}

static int find_dtype(const char *name) {
    for (int d = 0; d < N_DTYPES; d++)
        if (strcmp(dtypes[d].name, name) == 0) return d;
    return -1;
}

// {"dtype": ..., "shape": [...], "data_offsets": [b, e]} (other keys skipped); fills f->t[f->n].
static dsmoe_status parse_tensor(dsmoe_json *j, dsmoe_st_file *f, char *name) {
    dsmoe_st_tensor *t = &f->t[f->n];
    *t = (dsmoe_st_tensor){.name = name};
    f->n++; // owns name from here on, freed with the file
    uint64_t shape[DSMOE_ST_MAX_DIMS], off[2];
    int have = 0, n_off = 0;
    int more = dsmoe_json_begin(j, '{', "'{' (tensor info)");
    if (more < 0) return DSMOE_ERR_IO;
    for (; more;) {
        char *key;
        DSMOE_TRY(dsmoe_json_string_dup(j, &key));
        int which = strcmp(key, "dtype") == 0 ? 1 : strcmp(key, "shape") == 0 ? 2 : strcmp(key, "data_offsets") == 0 ? 4 : 0;
        free(key);
        DSMOE_TRY(dsmoe_json_expect(j, ':', "':'"));
        if (which & have) return dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: tensor '%s' has a key twice", j->name, name);
        have |= which;
        if (which == 1) {
            char *dt;
            DSMOE_TRY(dsmoe_json_string_dup(j, &dt));
            int d = find_dtype(dt);
            if (d < 0) {
                dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: tensor '%s' has dtype '%s', which dsmoe does not read (known: "
                              KNOWN_DTYPES ")", j->name, name, dt);
                free(dt);
                return DSMOE_ERR_IO;
            }
            free(dt);
            t->dtype = (dsmoe_st_dtype)d;
        } else if (which == 2) {
            DSMOE_TRY(juint_array(j, shape, DSMOE_ST_MAX_DIMS, &t->ndim, "'[' (shape)"));
        } else if (which == 4) {
            DSMOE_TRY(juint_array(j, off, 2, &n_off, "'[' (data_offsets)"));
            if (n_off != 2) return dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: tensor '%s': data_offsets must hold two numbers",
                                                 j->name, name);
        } else {
            DSMOE_TRY(dsmoe_json_skip(j));
        }
        if ((more = dsmoe_json_next(j, '}')) < 0) return DSMOE_ERR_IO;
    }
    if (have != 7)
        return dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: tensor '%s' lacks %s", j->name, name,
                             !(have & 1) ? "dtype" : !(have & 2) ? "shape" : "data_offsets");
    for (int d = 0; d < t->ndim; d++) t->shape[d] = (int64_t)shape[d];
    size_t data_size = f->len - (size_t)(j->end - j->start) - 8;
    char want[256];
    describe_shape(want, sizeof want, t->dtype, t->ndim, t->shape);
    if (off[1] < off[0] || off[1] > data_size)
        return dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: tensor '%s' data_offsets [%" PRIu64 ", %" PRIu64 ") %s the data "
                             "buffer [0, %zu)%s", j->name, name, off[0], off[1], off[1] < off[0] ? "are reversed in" :
                             "run past", data_size, off[1] < off[0] ? "" : " (truncated file?)");
    int overflow;
    uint64_t need = tensor_bytes(t->dtype, t->ndim, t->shape, &overflow);
    if (overflow || need != off[1] - off[0])
        return dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: tensor '%s' data_offsets [%" PRIu64 ", %" PRIu64 ") hold %" PRIu64
                             " bytes but %s needs %s%" PRIu64, j->name, name, off[0], off[1], off[1] - off[0], want,
                             overflow ? "more than " : "", overflow ? (uint64_t)INT64_MAX : need);
    t->data = (const uint8_t *)f->map + 8 + (j->end - j->start) + off[0];
    t->nbytes = (size_t)need;
    f->begin[f->n - 1] = off[0];
    return DSMOE_OK;
}

static dsmoe_status parse_metadata(dsmoe_json *j, dsmoe_st_file *f) {
    int more = dsmoe_json_begin(j, '{', "'{' (__metadata__ holds an object of strings)");
    if (more < 0) return DSMOE_ERR_IO;
    for (; more;) {
        if (grow(&f->meta, f->nm, &f->capm, 2 * sizeof *f->meta) != 0)
            return dsmoe_err_set(j->err, DSMOE_ERR_NOMEM, "%s: out of memory reading metadata", j->name);
        char **kv = &f->meta[2 * f->nm];
        kv[0] = kv[1] = NULL;
        f->nm++; // owns what is parsed into kv
        DSMOE_TRY(dsmoe_json_string_dup(j, &kv[0]));
        DSMOE_TRY(dsmoe_json_expect(j, ':', "':'"));
        dsmoe_json_ws(j);
        if (j->p >= j->end || *j->p != '"')
            return dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: __metadata__ '%s' must be a string (at byte %zu)", j->name,
                                 kv[0], (size_t)(j->p - j->start) + 8);
        DSMOE_TRY(dsmoe_json_string_dup(j, &kv[1]));
        for (int i = 0; i < f->nm - 1; i++)
            if (strcmp(f->meta[2 * i], kv[0]) == 0)
                return dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: __metadata__ key '%s' appears twice", j->name, kv[0]);
        if ((more = dsmoe_json_next(j, '}')) < 0) return DSMOE_ERR_IO;
    }
    return DSMOE_OK;
}

static dsmoe_status parse_header(dsmoe_json *j, dsmoe_st_file *f) {
    int more = dsmoe_json_begin(j, '{', "'{'");
    if (more < 0) return DSMOE_ERR_IO;
    for (; more;) {
        char *name;
        DSMOE_TRY(dsmoe_json_string_dup(j, &name));
        dsmoe_status s = dsmoe_json_expect(j, ':', "':'");
        if (s == DSMOE_OK && strcmp(name, "__metadata__") == 0) {
            free(name);
            s = parse_metadata(j, f);
        } else if (s == DSMOE_OK && !name[0]) { // the writer never makes one, and no name can refer to it
            free(name);
            return dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: a tensor with an empty name (at byte %zu of the header)",
                                 j->name, (size_t)(j->p - j->start) + 8);
        } else if (s == DSMOE_OK) {
            if (grow(&f->t, f->n, &f->cap, sizeof *f->t) != 0 || grow(&f->begin, f->n, &f->capb, sizeof *f->begin) != 0) {
                free(name);
                return dsmoe_err_set(j->err, DSMOE_ERR_NOMEM, "%s: out of memory reading the header", j->name);
            }
            s = parse_tensor(j, f, name);
        } else {
            free(name);
        }
        DSMOE_TRY(s);
        if ((more = dsmoe_json_next(j, '}')) < 0) return DSMOE_ERR_IO;
    }
    // The declared length ends at the closing brace or at the format's padding after it: fewer than 8
    // spaces that make the length a multiple of 8. Anything else means the length is wrong (a length a
    // few bytes short would otherwise still parse, and every tensor would be read shifted).
    const char *close = j->p;
    while (j->p < j->end && *j->p == ' ') j->p++;
    if (j->p != j->end) return dsmoe_json_fail(j, "only spaces after the header's closing '}'");
    size_t pad = (size_t)(j->end - close), hlen = (size_t)(j->end - j->start);
    if (pad >= 8 || (pad > 0 && hlen % 8 != 0))
        return dsmoe_err_set(j->err, DSMOE_ERR_IO, "%s: header length %zu leaves %zu padding spaces after the JSON "
                             "(which ends at byte %zu); safetensors pads with fewer than 8 up to a multiple of 8, so the "
                             "length is wrong (damaged file?)", j->name, hlen, pad, (size_t)(close - j->start) + 8);
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Reading: whole-file checks, lookup

static int by_offset(const void *a, const void *b, void *ctx) {
    const dsmoe_st_file *f = ctx;
    int i = *(const int *)a, k = *(const int *)b;
    if (f->begin[i] != f->begin[k]) return f->begin[i] < f->begin[k] ? -1 : 1;
    return (i > k) - (i < k); // ties (empty tensors) keep header order
}

static int by_name(const void *a, const void *b, void *ctx) {
    const dsmoe_st_file *f = ctx;
    return strcmp(f->t[*(const int *)a].name, f->t[*(const int *)b].name);
}

// Puts tensors in data-offset order, refuses overlapping data and duplicate names, builds by_name.
static dsmoe_status order_tensors(dsmoe_st_file *f, dsmoe_err *err) {
    int n = f->n;
    int *idx = malloc((size_t)(n ? n : 1) * sizeof(int));
    dsmoe_st_tensor *t = malloc((size_t)(n ? n : 1) * sizeof *t);
    uint64_t *begin = malloc((size_t)(n ? n : 1) * sizeof *begin);
    f->by_name = malloc((size_t)(n ? n : 1) * sizeof(int));
    if (!idx || !t || !begin || !f->by_name) {
        free(idx), free(t), free(begin);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory indexing tensors", f->path);
    }
    for (int i = 0; i < n; i++) idx[i] = i;
    qsort_r(idx, (size_t)n, sizeof(int), by_offset, f);
    for (int i = 0; i < n; i++) t[i] = f->t[idx[i]], begin[i] = f->begin[idx[i]];
    free(f->t), free(f->begin), free(idx);
    f->t = t, f->begin = begin, f->cap = f->capb = n;
    // The non-empty tensors tile the data buffer: each starts where the previous one ends, the first at
    // 0, the last at the end of the file. A gap or trailing bytes mean a wrong header length or a damaged
    // header; safetensors' own reader refuses them too.
    int last = -1; // the non-empty tensor that ends last so far
    uint64_t at = 0, data_size = f->len - 8 - f->hlen;
    for (int i = 0; i < n; i++) {
        if (t[i].nbytes == 0) continue;
        if (last >= 0 && begin[i] < at)
            return dsmoe_err_set(err, DSMOE_ERR_IO,
                                 "%s: tensors '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%" PRIu64 ", %" PRIu64 ") overlap",
                                 f->path, t[last].name, begin[last], begin[last] + t[last].nbytes, t[i].name, begin[i],
                                 begin[i] + t[i].nbytes);
        if (begin[i] > at)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: bytes [%" PRIu64 ", %" PRIu64 ") of the data buffer, before tensor "
                                 "'%s', belong to no tensor (wrong header length or damaged header?)", f->path, at,
                                 begin[i], t[i].name);
        last = i;
        at = begin[i] + t[i].nbytes;
    }
    if (at != data_size)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: the data buffer holds %" PRIu64 " bytes but the tensors end at byte "
                             "%" PRIu64 "%s (wrong header length or damaged file?)", f->path, data_size, at,
                             last >= 0 ? ", after the last one" : "");
    for (int i = 0; i < n; i++) f->by_name[i] = i;
    qsort_r(f->by_name, (size_t)n, sizeof(int), by_name, f);
    for (int i = 1; i < n; i++)
        if (strcmp(t[f->by_name[i]].name, t[f->by_name[i - 1]].name) == 0)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: tensor '%s' appears twice in the header", f->path,
                                 t[f->by_name[i]].name);
    return DSMOE_OK;
}

// Attaches the recorded checksums ("crc32c.<name>" = 8 hex digits) to their tensors: all or none, each
// naming a tensor of the file.
static dsmoe_status read_checksums(dsmoe_st_file *f, dsmoe_err *err) {
    size_t plen = strlen(DSMOE_ST_CRC_PREFIX);
    int found = 0;
    for (int i = 0; i < f->nm; i++) {
        const char *key = f->meta[2 * i], *v = f->meta[2 * i + 1];
        if (strncmp(key, DSMOE_ST_CRC_PREFIX, plen) != 0) continue;
        dsmoe_st_tensor *t = (dsmoe_st_tensor *)dsmoe_st_find(f, key + plen);
        if (!t)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: __metadata__ '%s' is the checksum of tensor '%s', which is not "
                                 "in the file (damaged header?)", f->path, key, key + plen);
        int hex = strlen(v) == 8;
        for (int d = 0; hex && d < 8; d++) hex = strchr("0123456789abcdefABCDEF", v[d]) != NULL;
        if (!hex)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: tensor '%s': checksum '%s' is not 8 hex digits", f->path,
                                 t->name, v);
        unsigned long crc = strtoul(v, NULL, 16);
        t->has_crc = 1;
        t->crc = (uint32_t)crc;
        found++;
    }
    for (int i = 0; found && i < f->n; i++)
        if (!f->t[i].has_crc)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: tensor '%s' has no checksum (__metadata__ '" DSMOE_ST_CRC_PREFIX
                                 "%s') though %d other tensors have one (damaged header?)", f->path, f->t[i].name,
                                 f->t[i].name, found);
    f->checksums = found > 0;
    return DSMOE_OK;
}

dsmoe_status dsmoe_st_open(const char *path, dsmoe_st_file **out, dsmoe_err *err) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: not a regular file", path);
    }
    if (st.st_size < 8) {
        close(fd);
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: %lld bytes, too short for the 8-byte header length of a safetensors file",
                             path, (long long)st.st_size);
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED) return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot map %s: %s", path, strerror(e));
    dsmoe_st_file *f = calloc(1, sizeof *f);
    if (f) f->path = strdup(path);
    if (!f || !f->path) {
        free(f);
        munmap(map, (size_t)st.st_size);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "%s: out of memory", path);
    }
    f->map = map;
    f->len = (size_t)st.st_size;
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)((const uint8_t *)map)[i] << (8 * i);
    dsmoe_status s = DSMOE_OK;
    if (hlen > f->len - 8)
        s = dsmoe_err_set(err, DSMOE_ERR_IO, "%s: header length %" PRIu64 " runs past the end of the file (%zu bytes): "
                          "truncated, or not a safetensors file", path, hlen, f->len);
    f->hlen = hlen;
    if (s == DSMOE_OK) {
        dsmoe_json j;
        dsmoe_json_init(&j, (const char *)map + 8, hlen, f->path, 1, err);
        j.byte_label = "bad JSON header", j.byte_base = 8, j.end_name = "the end of the header";
        j.flags = DSMOE_JSON_NO_NUL | DSMOE_JSON_NO_LITERALS | DSMOE_JSON_UTF8; // the format is UTF-8 JSON
        s = parse_header(&j, f);
    }
    if (s == DSMOE_OK) s = order_tensors(f, err);
    if (s == DSMOE_OK) s = read_checksums(f, err);
    if (s != DSMOE_OK) {
        dsmoe_st_close(f);
        return s;
    }
    *out = f;
    return DSMOE_OK;
}

void dsmoe_st_close(dsmoe_st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) free((char *)f->t[i].name);
    for (int i = 0; i < 2 * f->nm; i++) free(f->meta[i]);
    if (f->map) munmap(f->map, f->len);
    free(f->t), free(f->begin), free(f->by_name), free(f->meta), free(f->path), free(f);
}

int dsmoe_st_count(const dsmoe_st_file *f) { return f->n; }

const dsmoe_st_tensor *dsmoe_st_at(const dsmoe_st_file *f, int i) { return i >= 0 && i < f->n ? &f->t[i] : NULL; }

const dsmoe_st_tensor *dsmoe_st_find(const dsmoe_st_file *f, const char *name) {
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = strcmp(f->t[f->by_name[mid]].name, name);
        if (c == 0) return &f->t[f->by_name[mid]];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

const char *dsmoe_st_meta(const dsmoe_st_file *f, const char *key) {
    for (int i = 0; i < f->nm; i++)
        if (strcmp(f->meta[2 * i], key) == 0) return f->meta[2 * i + 1];
    return NULL;
}

int dsmoe_st_has_checksums(const dsmoe_st_file *f) { return f->checksums; }

dsmoe_status dsmoe_st_verify(const dsmoe_st_file *f, const dsmoe_st_tensor *t, dsmoe_err *err) {
    if (!t->has_crc) return DSMOE_OK;
    uint32_t crc = dsmoe_crc32c(0, t->data, t->nbytes);
    if (crc != t->crc)
        return dsmoe_err_set(err, DSMOE_ERR_IO, "%s: tensor '%s': its bytes have CRC32C %08" PRIx32 " but the header "
                             "records %08" PRIx32 " (damaged data)", f->path, t->name, crc, t->crc);
    return DSMOE_OK;
}
