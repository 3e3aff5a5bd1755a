// tests/fuzz/fuzz_safetensors.c: the safetensors reader (core/io/safetensors.c), as checkpoints are opened.
// The input is a file. When dsmoe_st_open accepts it, every tensor must be what the header promised:
// dtype size x shape = nbytes (counted here, independently), the bytes inside the file's data buffer
// and tiling it, findable by name, its checksum recorded for all tensors or none, and dsmoe_st_verify
// agreeing with a CRC32C computed here. Then the writer gets the same tensors: what it writes must open
// again with the same names, dtypes, shapes and bytes, and verify.
#include "fuzz_common.h"

#include "safetensors.h"

static size_t dtype_size(dsmoe_st_dtype d) {
    switch (d) {
    case DSMOE_ST_F64: case DSMOE_ST_I64: return 8;
    case DSMOE_ST_F32: case DSMOE_ST_I32: return 4;
    case DSMOE_ST_F16: case DSMOE_ST_BF16: case DSMOE_ST_I16: return 2;
    case DSMOE_ST_U8: case DSMOE_ST_I8: case DSMOE_ST_BOOL: return 1;
    }
    return 0;
}

// The bitwise CRC32C (reflected 0x82F63B78), independent of the table-driven one under test.
static uint32_t crc32c_bitwise(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int b = 0; b < 8; b++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return ~c;
}

static int by_address(const void *a, const void *b) {
    const char *x = (*(const dsmoe_st_tensor *const *)a)->data, *y = (*(const dsmoe_st_tensor *const *)b)->data;
    return x < y ? -1 : x > y;
}

// Every tensor of f checked against the file's bytes (data, size); returns the number of tensors.
static int check_file(const dsmoe_st_file *f, const uint8_t *data, size_t size, const char *what) {
    int n = dsmoe_st_count(f);
    if (n < 0) fuzz_fail("%s: %d tensors", what, n);
    // The data buffer starts after the 8-byte length and the header; the tensors tile it exactly.
    uint64_t hlen = 0;
    if (size < 8) fuzz_fail("%s: opened a file of %zu bytes", what, size);
    memcpy(&hlen, data, 8);
    if (hlen > size - 8) fuzz_fail("%s: header length %llu past the end of %zu bytes", what, (unsigned long long)hlen, size);
    const uint8_t *buf = data + 8 + hlen;
    size_t buf_len = size - 8 - (size_t)hlen;
    const dsmoe_st_tensor **order = malloc(((size_t)n + 1) * sizeof *order); // the tensors with bytes
    if (!order) fuzz_setup_error("out of memory");
    int with_crc = 0, m = 0;
    for (int i = 0; i < n; i++) {
        const dsmoe_st_tensor *t = dsmoe_st_at(f, i);
        if (!t || !t->name) fuzz_fail("%s: tensor %d missing", what, i);
        if (dsmoe_st_find(f, t->name) != t) fuzz_fail("%s: dsmoe_st_find('%s') is not tensor %d", what, t->name, i);
        size_t isz = dtype_size(t->dtype);
        if (!isz) fuzz_fail("%s: tensor '%s' has dtype %d", what, t->name, (int)t->dtype);
        if (t->ndim < 0 || t->ndim > DSMOE_ST_MAX_DIMS) fuzz_fail("%s: tensor '%s' has %d dims", what, t->name, t->ndim);
        unsigned __int128 count = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0) fuzz_fail("%s: tensor '%s' dim %d is %lld", what, t->name, d, (long long)t->shape[d]);
            count *= (unsigned __int128)t->shape[d];
            if (count > size) count = (unsigned __int128)size + 1; // no real tensor is that large
        }
        if (count * isz != t->nbytes)
            fuzz_fail("%s: tensor '%s': %zu bytes, but dtype %s x shape needs %llu", what, t->name, t->nbytes,
                      dsmoe_st_dtype_name(t->dtype), (unsigned long long)(count * isz));
        if (t->nbytes > 0 && !t->data) fuzz_fail("%s: tensor '%s' of %zu bytes has no data", what, t->name, t->nbytes);
        if (t->nbytes > 0) order[m++] = t;
        if (t->has_crc) {
            with_crc++;
            uint32_t want = crc32c_bitwise(t->data, t->nbytes);
            if (dsmoe_crc32c(0, t->data, t->nbytes) != want)
                fuzz_fail("%s: dsmoe_crc32c of tensor '%s' differs from the bitwise CRC32C", what, t->name);
            dsmoe_err err = {0};
            dsmoe_status st = dsmoe_st_verify(f, t, &err);
            if ((st == DSMOE_OK) != (want == t->crc))
                fuzz_fail("%s: tensor '%s': verify says %d (%s) but recorded %08x, computed %08x", what, t->name, (int)st,
                          err.msg, t->crc, want);
        } else {
            dsmoe_err err = {0};
            if (dsmoe_st_verify(f, t, &err) != DSMOE_OK)
                fuzz_fail("%s: tensor '%s' has no checksum but does not verify: %s", what, t->name, err.msg);
        }
    }
    if (with_crc != 0 && with_crc != n) fuzz_fail("%s: %d of %d tensors have checksums", what, with_crc, n);
    if (dsmoe_st_has_checksums(f) != (n > 0 && with_crc == n) && n > 0)
        fuzz_fail("%s: dsmoe_st_has_checksums = %d with %d of %d checksums", what, dsmoe_st_has_checksums(f), with_crc, n);
    // In address order they must tile the mapped data buffer, each holding the file's bytes at its offset.
    qsort(order, (size_t)m, sizeof *order, by_address);
    size_t at = 0;
    for (int i = 0; i < m; i++) {
        const uint8_t *p = order[i]->data, *base = order[0]->data;
        if ((size_t)(p - base) != at)
            fuzz_fail("%s: tensor '%s' starts at data offset %td, expected %zu (tensors must tile the data buffer)",
                      what, order[i]->name, p - base, at);
        if (order[i]->nbytes > buf_len - at)
            fuzz_fail("%s: tensor '%s' runs past the data buffer (%zu bytes)", what, order[i]->name, buf_len);
        if (memcmp(p, buf + at, order[i]->nbytes) != 0)
            fuzz_fail("%s: tensor '%s' does not hold the file's bytes at data offset %zu", what, order[i]->name, at);
        at += order[i]->nbytes;
    }
    if (at != buf_len) fuzz_fail("%s: the tensors cover %zu of the data buffer's %zu bytes", what, at, buf_len);
    free(order);
    return n;
}

static uint8_t *read_all(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    if (!fp) fuzz_setup_error("cannot open %s", path);
    size_t cap = 1 << 16, len = 0;
    uint8_t *b = malloc(cap);
    for (size_t r; b && (r = fread(b + len, 1, cap - len, fp)) > 0;) {
        len += r;
        if (len == cap) b = realloc(b, cap *= 2);
    }
    fclose(fp);
    if (!b) fuzz_setup_error("out of memory");
    *n = len;
    return b;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_write("fuzz.safetensors", data, size);
    dsmoe_st_file *f = NULL;
    dsmoe_err err = {0};
    if (dsmoe_st_open(path, &f, &err) != DSMOE_OK) {
        if (f) fuzz_fail("dsmoe_st_open failed but returned a file");
        if (!err.msg[0]) fuzz_fail("dsmoe_st_open failed with no message");
        return 0;
    }
    int n = check_file(f, data, size, "input");

    // The writer, given what the reader found, writes a file the reader takes back unchanged.
    dsmoe_st_writer *w = dsmoe_st_writer_new();
    if (!w) fuzz_setup_error("out of memory");
    int added = 1;
    for (int i = 0; i < n && added; i++) {
        const dsmoe_st_tensor *t = dsmoe_st_at(f, i);
        added = dsmoe_st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data, &err) == DSMOE_OK;
    }
    if (!added) fuzz_fail("the writer refuses tensor from a file the reader took: %s", err.msg);
    const char *out = fuzz_path("fuzz.out.safetensors");
    if (dsmoe_st_writer_commit(w, out, &err) != DSMOE_OK) fuzz_fail("the writer cannot write it back: %s", err.msg);
    dsmoe_st_writer_free(w);
    dsmoe_st_file *g = NULL;
    if (dsmoe_st_open(out, &g, &err) != DSMOE_OK) fuzz_fail("the file the writer wrote does not open: %s", err.msg);
    size_t wsize;
    uint8_t *written = read_all(out, &wsize);
    if (check_file(g, written, wsize, "written") != n) fuzz_fail("written: %d tensors, expected %d", dsmoe_st_count(g), n);
    if (n > 0 && !dsmoe_st_has_checksums(g)) fuzz_fail("written: the writer recorded no checksums");
    for (int i = 0; i < n; i++) {
        const dsmoe_st_tensor *a = dsmoe_st_at(f, i), *b = dsmoe_st_find(g, a->name);
        if (!b) fuzz_fail("written: tensor '%s' is missing", a->name);
        if (b->dtype != a->dtype || b->ndim != a->ndim || b->nbytes != a->nbytes ||
            memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof a->shape[0]) != 0 ||
            (a->nbytes && memcmp(a->data, b->data, a->nbytes) != 0))
            fuzz_fail("written: tensor '%s' differs from the input's", a->name);
    }
    free(written);
    dsmoe_st_close(g);
    dsmoe_st_close(f);
    return 0;
}
