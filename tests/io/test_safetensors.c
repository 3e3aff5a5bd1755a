// tests/io/test_safetensors.c: the safetensors writer and reader (core/io/safetensors.c).
// Round trips of every dtype, 0-d and empty tensors and escaped names/metadata; the writer's exact bytes
// for a small file against a hand-written expectation; a file written byte by byte here (unpadded,
// with \u escapes and surrogate pairs) read back; each kind of corrupt file refused with its message;
// failed commits (temporary unwritable, disk full, path is a directory) leave the old file untouched;
// CRC32C against the standard check value and a bit-at-a-time reference; checksums recorded by the writer
// and every damage to a written file (a flipped data byte, a header length 4 or 1 short, a truncation, a
// checksum lost or orphaned) refused with the file and the tensor named.
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"

#include "test_tmpdir.h" // dir, path_of, write_bytes, teardown

static int setup(void **state) {
    (void)state;
    return tmpdir_create("st");
}

static size_t read_bytes(const char *path, char *buf, size_t cap) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    size_t n = fread(buf, 1, cap, f);
    fclose(f);
    return n;
}

// A file: u64 LE header length, the header text as given (no padding added), then data.
static void write_st(const char *path, const char *header, const void *data, size_t n) {
    size_t h = strlen(header);
    char *buf = malloc(8 + h + n);
    for (int i = 0; i < 8; i++) buf[i] = (char)((uint64_t)h >> (8 * i));
    memcpy(buf + 8, header, h);
    if (n) memcpy(buf + 8 + h, data, n);
    write_bytes(path, buf, 8 + h + n);
    free(buf);
}

static void expect_open_error(const char *name, const char *header, size_t data_bytes, const char *msg) {
    char data[256] = {0};
    assert_true(data_bytes <= sizeof data);
    const char *p = path_of(name);
    write_st(p, header, data, data_bytes);
    dsmoe_st_file *f = NULL;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_st_open(p, &f, &err);
    if (s == DSMOE_OK) fail_msg("%s opened, expected: %s", name, msg);
    assert_null(f);
    if (!strstr(err.msg, msg)) fail_msg("message\n  got:      %s\n  expected: ...%s...", err.msg, msg);
}

// CRC32C one bit at a time, straight from the definition (reflected polynomial 0x82F63B78).
static uint32_t crc32c_bitwise(const void *data, size_t n) {
    const uint8_t *p = data;
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
    }
    return ~c;
}

// ---------------------------------------------------------------------------------------------------

static void test_round_trip(void **state) {
    float f32[6] = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f};
    double f64 = 3.141592653589793;
    int32_t i32[4] = {-1, 0, 2147483647, -2147483647 - 1};
    int64_t i64[4] = {INT64_MIN, -5, 7, INT64_MAX};
    uint8_t u8[5] = {0, 1, 128, 254, 255}, boolean[3] = {1, 0, 1};
    uint16_t f16[3] = {0x3c00, 0xc000, 0x7bff}, bf16[2] = {0x3f80, 0xbf80};
    int16_t i16[2] = {-32768, 32767};
    int8_t i8[3] = {-128, 0, 127};
    int64_t s23[2] = {2, 3}, s4[1] = {4}, s22[2] = {2, 2}, s5[1] = {5}, s3[1] = {3}, s2[1] = {2}, s03[2] = {0, 3},
            s1111[4] = {1, 1, 3, 1};
    const char *weird = "we\"ird\\name\twith\ncontrol\x01 and \xc3\xbc"; // quote, backslash, tab, newline, ^A, u-umlaut
    struct { const char *name; dsmoe_st_dtype dt; int ndim; const int64_t *shape; const void *data; size_t nbytes; } t[] = {
        {"h.0.attn.c_attn.weight", DSMOE_ST_F32, 2, s23, f32, 24}, {"pi", DSMOE_ST_F64, 0, NULL, &f64, 8},
        {"i32", DSMOE_ST_I32, 1, s4, i32, 16}, {"i64", DSMOE_ST_I64, 2, s22, i64, 32},
        {"u8", DSMOE_ST_U8, 1, s5, u8, 5}, {"f16", DSMOE_ST_F16, 1, s3, f16, 6},
        {"bf16", DSMOE_ST_BF16, 1, s2, bf16, 4}, {"i16", DSMOE_ST_I16, 1, s2, i16, 4},
        {weird, DSMOE_ST_I8, 4, s1111, i8, 3}, {"empty", DSMOE_ST_F32, 2, s03, NULL, 0},
        {"bool", DSMOE_ST_BOOL, 1, s3, boolean, 3},
    };
    int n = (int)(sizeof t / sizeof t[0]);
    dsmoe_st_writer *w = dsmoe_st_writer_new();
    dsmoe_err err = {0};
    for (int i = 0; i < n; i++)
        assert_int_equal(dsmoe_st_writer_add(w, t[i].name, t[i].dt, t[i].ndim, t[i].shape, t[i].data, &err), DSMOE_OK);
    const char *deck = "[model]\nvocab = 64   # \"quoted\" \\ and a tab\there\n\x02";
    assert_int_equal(dsmoe_st_writer_meta(w, "deck", deck, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_writer_meta(w, "k\"ey", "", &err), DSMOE_OK);
    const char *p = path_of("rt.safetensors");
    assert_int_equal(dsmoe_st_writer_commit(w, p, &err), DSMOE_OK);
    dsmoe_st_writer_free(w);

    char raw[4096];
    size_t len = read_bytes(p, raw, sizeof raw);
    uint64_t h = 0;
    for (int i = 0; i < 8; i++) h |= (uint64_t)(uint8_t)raw[i] << (8 * i);
    assert_int_equal((8 + h) % 8, 0);                  // data starts 8-byte aligned
    assert_int_equal(len, 8 + h + 24 + 8 + 16 + 32 + 5 + 6 + 4 + 4 + 3 + 0 + 3);

    dsmoe_st_file *f;
    assert_int_equal(dsmoe_st_open(p, &f, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_count(f), n);
    for (int i = 0; i < n; i++) {
        const dsmoe_st_tensor *r = dsmoe_st_find(f, t[i].name);
        assert_non_null(r);
        assert_string_equal(r->name, t[i].name);
        assert_int_equal(r->dtype, t[i].dt);
        assert_int_equal(r->ndim, t[i].ndim);
        for (int d = 0; d < t[i].ndim; d++) assert_int_equal(r->shape[d], t[i].shape[d]);
        assert_int_equal(r->nbytes, t[i].nbytes);
        if (t[i].nbytes) assert_memory_equal(r->data, t[i].data, t[i].nbytes);
        assert_string_equal(dsmoe_st_at(f, i)->name, t[i].name); // data-offset order, ties in header order
    }
    assert_null(dsmoe_st_find(f, "absent"));
    assert_string_equal(dsmoe_st_meta(f, "deck"), deck);
    assert_string_equal(dsmoe_st_meta(f, "k\"ey"), "");
    assert_null(dsmoe_st_meta(f, "absent"));
    dsmoe_st_close(f);
}

// The writer's exact bytes for one small file, written out by hand.
static void test_writer_bytes(void **state) {
    float x[2] = {1.0f, -2.0f};
    int64_t s2[1] = {2};
    dsmoe_st_writer *w = dsmoe_st_writer_new();
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_st_writer_add(w, "x", DSMOE_ST_F32, 1, s2, x, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_writer_meta(w, "a", "b\n", &err), DSMOE_OK);
    const char *p = path_of("bytes.safetensors");
    assert_int_equal(dsmoe_st_writer_commit(w, p, &err), DSMOE_OK);
    dsmoe_st_writer_free(w);
    const unsigned char data[8] = {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0}; // 1.0f, -2.0f little-endian
    char json[160];
    snprintf(json, sizeof json, "{\"__metadata__\":{\"a\":\"b\\n\",\"crc32c.x\":\"%08x\"},\"x\":{\"dtype\":\"F32\","
             "\"shape\":[2],\"data_offsets\":[0,8]}}", (unsigned)crc32c_bitwise(data, 8));
    size_t hl = strlen(json); // 103: padded with 1 space to 104, so 8 + 104 = 112 is a multiple of 8
    assert_int_equal(hl, 103);
    unsigned char want[8 + 104 + 8] = {104, 0, 0, 0, 0, 0, 0, 0};
    memcpy(want + 8, json, hl);
    memset(want + 8 + hl, ' ', 1);
    memcpy(want + 112, data, 8);
    char got[256];
    assert_int_equal(read_bytes(p, got, sizeof got), sizeof want);
    assert_memory_equal(got, want, sizeof want);
}

// A file made here byte by byte: whitespace, key order, \u escapes, unknown keys, no padding.
static void test_read_handmade(void **state) {
    const char *header = " { \"b\" : {\"data_offsets\":[16, 24], \"shape\":[1],\"dtype\":\"I64\", \"extra\": [1, {\"z\": -2.5e3}]},\n"
                         "\"w\\u00e9\\/\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 16]},\r\n"
                         "\"__metadata__\": {\"smile\": \"\\ud83d\\ude00\", \"t\": \"a\\tb\\\"c\\\\\"}}";
    unsigned char data[24] = {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x80, 0xc0,
                              0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}; // 1, 2, 3, -4 as F32; -2 as I64
    const char *p = path_of("hand.safetensors");
    write_st(p, header, data, sizeof data);
    dsmoe_st_file *f;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_st_open(p, &f, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_count(f), 2);
    const dsmoe_st_tensor *w = dsmoe_st_at(f, 0), *b = dsmoe_st_at(f, 1); // data-offset order
    assert_string_equal(w->name, "w\xc3\xa9/");
    assert_ptr_equal(dsmoe_st_find(f, "w\xc3\xa9/"), w);
    assert_int_equal(w->dtype, DSMOE_ST_F32);
    assert_int_equal(w->ndim, 2);
    assert_int_equal(w->shape[0], 2);
    assert_int_equal(w->shape[1], 2);
    float wv[4];
    memcpy(wv, w->data, 16);
    assert_true(wv[0] == 1.0f && wv[1] == 2.0f && wv[2] == 3.0f && wv[3] == -4.0f);
    assert_string_equal(b->name, "b");
    assert_int_equal(b->dtype, DSMOE_ST_I64);
    int64_t bv;
    memcpy(&bv, b->data, 8);
    assert_int_equal(bv, -2);
    assert_string_equal(dsmoe_st_meta(f, "smile"), "\xf0\x9f\x98\x80");
    assert_string_equal(dsmoe_st_meta(f, "t"), "a\tb\"c\\");
    assert_string_equal(dsmoe_st_dtype_name(b->dtype), "I64");
    assert_int_equal(dsmoe_st_has_checksums(f), 0); // another writer's file: opens, nothing to verify
    assert_int_equal(dsmoe_st_verify(f, w, &err), DSMOE_OK);
    dsmoe_st_close(f);
}

static void test_corrupt(void **state) {
    const char *p = path_of("short.safetensors");
    write_bytes(p, "abc", 3);
    dsmoe_st_file *f = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_st_open(p, &f, &err), DSMOE_ERR_IO);
    assert_non_null(strstr(err.msg, "short.safetensors: 3 bytes, too short"));
    unsigned char big[40] = {0xe8, 0x03}; // header length 1000 in a 40-byte file
    write_bytes(path_of("len.safetensors"), big, sizeof big);
    assert_int_equal(dsmoe_st_open(path_of("len.safetensors"), &f, &err), DSMOE_ERR_IO);
    assert_non_null(strstr(err.msg, "len.safetensors: header length 1000 runs past the end of the file (40 bytes)"));
    assert_int_equal(dsmoe_st_open(path_of("missing.safetensors"), &f, &err), DSMOE_ERR_IO);
    assert_non_null(strstr(err.msg, "cannot open"));

    expect_open_error("json1.safetensors", "{\"x\":{\"dtype\":\"F32\",}", 0,
                      "json1.safetensors: bad JSON header at byte 28: expected a string, found '}'");
    expect_open_error("json2.safetensors", "{\"x\": true}", 0, "bad JSON header at byte 14: expected '{' (tensor info)");
    expect_open_error("json3.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],\"q\":null}}", 4,
                      "expected a string, number, array or object, found 'n'");
    expect_open_error("emptyname.safetensors", "{\"\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}", 4,
                      "a tensor with an empty name");
    expect_open_error("json4.safetensors", "{} x", 0, "expected only spaces after the header's closing '}', found 'x'");
    expect_open_error("json5.safetensors", "{\"a\\q\":1}", 0, "expected an escape");
    expect_open_error("json6.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
                      "expected a non-negative integer, found '-'");
    expect_open_error("json7.safetensors", "", 0, "bad JSON header at byte 8: expected '{', found the end of the header");
    expect_open_error("dtype.safetensors", "{\"x\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
                      "dtype.safetensors: tensor 'x' has dtype 'F8_E4M3', which dsmoe does not read (known: F64 F32");
    expect_open_error("range.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[16],\"data_offsets\":[0,64]}}", 16,
                      "range.safetensors: tensor 'x' data_offsets [0, 64) run past the data buffer [0, 16)");
    expect_open_error("rev.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 16,
                      "tensor 'x' data_offsets [8, 4) are reversed in the data buffer");
    expect_open_error("size.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 16,
                      "size.safetensors: tensor 'x' data_offsets [0, 12) hold 12 bytes but F32 [2, 2] needs 16");
    expect_open_error("overlap.safetensors",
                      "{\"b\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[8,24]},"
                      "\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 24,
                      "overlap.safetensors: tensors 'a' [0, 16) and 'b' [8, 24) overlap");
    expect_open_error("dup.safetensors",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                      "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2,
                      "dup.safetensors: tensor 'a' appears twice in the header");
    expect_open_error("meta.safetensors", "{\"__metadata__\":{\"step\":3}}", 0,
                      "meta.safetensors: __metadata__ 'step' must be a string");
    expect_open_error("lack.safetensors", "{\"x\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "tensor 'x' lacks shape");
    expect_open_error("dims.safetensors", "{\"x\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
                      "expected at most 8 dimensions");
    // The tensors tile the data buffer: a gap, bytes before the first or after the last are refused.
    expect_open_error("gap.safetensors",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                      "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[6,8]}}", 8,
                      "gap.safetensors: bytes [4, 6) of the data buffer, before tensor 'b', belong to no tensor");
    expect_open_error("lead.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[1,5]}}", 5,
                      "lead.safetensors: bytes [0, 1) of the data buffer, before tensor 'a', belong to no tensor");
    expect_open_error("tail.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 5,
                      "tail.safetensors: the data buffer holds 5 bytes but the tensors end at byte 4, after the last one");
    expect_open_error("nodata.safetensors", "{}", 3, "the data buffer holds 3 bytes but the tensors end at byte 0 (");
    // Padding: fewer than 8 spaces, and only up to a multiple of 8.
    expect_open_error("pad8.safetensors", "{}        ", 0, "header length 10 leaves 8 padding spaces after the JSON");
    expect_open_error("pad3.safetensors", "{}   ", 0, "header length 5 leaves 3 padding spaces");
    expect_open_error("tab.safetensors", "{}\t", 0, "expected only spaces after the header's closing '}'");
    // Checksums: for every tensor or for none, each naming a tensor, 8 hex digits.
    expect_open_error("crcpart.safetensors",
                      "{\"__metadata__\":{\"crc32c.a\":\"00000000\"},\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                      "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2,
                      "crcpart.safetensors: tensor 'b' has no checksum (__metadata__ 'crc32c.b') though 1 other");
    expect_open_error("crcorphan.safetensors",
                      "{\"__metadata__\":{\"crc32c.z\":\"00000000\"},\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                      1, "crcorphan.safetensors: __metadata__ 'crc32c.z' is the checksum of tensor 'z', which is not in the file");
    expect_open_error("crchex.safetensors",
                      "{\"__metadata__\":{\"crc32c.a\":\"0000000g\"},\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                      1, "crchex.safetensors: tensor 'a': checksum '0000000g' is not 8 hex digits");
    // Adjacent tensors are fine; an empty tensor inside another's range is not an overlap.
    const char *ok = "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},\"e\":{\"dtype\":\"F32\",\"shape\":[0],"
                     "\"data_offsets\":[2,2]},\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}";
    char data[8] = {0};
    write_st(path_of("ok.safetensors"), ok, data, 8);
    assert_int_equal(dsmoe_st_open(path_of("ok.safetensors"), &f, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_count(f), 3);
    dsmoe_st_close(f);
}

static void test_writer_refuses(void **state) {
    dsmoe_st_writer *w = dsmoe_st_writer_new();
    dsmoe_err err = {0};
    float x = 1;
    int64_t s1[1] = {1}, neg[1] = {-1};
    assert_int_equal(dsmoe_st_writer_add(w, "x", DSMOE_ST_F32, 1, s1, &x, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_writer_add(w, "x", DSMOE_ST_F32, 1, s1, &x, &err), DSMOE_ERR_INVALID);
    assert_string_equal(err.msg, "safetensors: tensor 'x' added twice");
    assert_int_equal(dsmoe_st_writer_add(w, "__metadata__", DSMOE_ST_F32, 1, s1, &x, &err), DSMOE_ERR_INVALID);
    assert_int_equal(dsmoe_st_writer_add(w, "n", DSMOE_ST_F32, 1, neg, &x, &err), DSMOE_ERR_INVALID);
    assert_int_equal(dsmoe_st_writer_add(w, "d", DSMOE_ST_F32, 9, s1, &x, &err), DSMOE_ERR_INVALID);
    assert_int_equal(dsmoe_st_writer_meta(w, "k", "v", &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_writer_meta(w, "k", "w", &err), DSMOE_ERR_INVALID);
    assert_int_equal(dsmoe_st_writer_meta(w, "crc32c.x", "00000000", &err), DSMOE_ERR_INVALID); // the writer's own
    dsmoe_st_writer_free(w);
}

static void commit_one(const char *path, float v, dsmoe_status want, const char *msg) {
    int64_t s1[1] = {1};
    dsmoe_st_writer *w = dsmoe_st_writer_new();
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_st_writer_add(w, "v", DSMOE_ST_F32, 1, s1, &v, &err), DSMOE_OK);
    dsmoe_status s = dsmoe_st_writer_commit(w, path, &err);
    dsmoe_st_writer_free(w);
    assert_int_equal(s, want);
    if (msg && !strstr(err.msg, msg)) fail_msg("message\n  got:      %s\n  expected: ...%s...", err.msg, msg);
}

static int count_entries(const char *d) {
    DIR *dp = opendir(d);
    assert_non_null(dp);
    int n = 0;
    for (struct dirent *e; (e = readdir(dp));) n += e->d_name[0] != '.';
    closedir(dp);
    return n;
}

static void test_failed_commit(void **state) {
    char sub[512], p[600], tmp[700], before[256], after[256];
    snprintf(sub, sizeof sub, "%s/commit", dir);
    assert_int_equal(mkdir(sub, 0755), 0);
    snprintf(p, sizeof p, "%s/ckpt.safetensors", sub);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", p, (long)getpid());
    commit_one(p, 1.0f, DSMOE_OK, NULL);
    size_t n0 = read_bytes(p, before, sizeof before);

    assert_int_equal(mkdir(tmp, 0755), 0); // the temporary cannot be created
    commit_one(p, 2.0f, DSMOE_ERR_IO, "ckpt.safetensors is unchanged");
    assert_int_equal(rmdir(tmp), 0);
    assert_int_equal(read_bytes(p, after, sizeof after), n0);
    assert_memory_equal(before, after, n0);

    assert_int_equal(symlink("/dev/full", tmp), 0); // the disk fills up while writing
    commit_one(p, 3.0f, DSMOE_ERR_IO, "No space left on device");
    assert_int_equal(read_bytes(p, after, sizeof after), n0);
    assert_memory_equal(before, after, n0);
    assert_int_equal(count_entries(sub), 1); // the temporary was removed

    char d[700];
    snprintf(d, sizeof d, "%s/adir", sub); // the path is a directory: the rename fails
    assert_int_equal(mkdir(d, 0755), 0);
    commit_one(d, 4.0f, DSMOE_ERR_IO, "cannot rename");
    struct stat st;
    assert_int_equal(stat(d, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(count_entries(sub), 2);

    commit_one(p, 5.0f, DSMOE_OK, NULL); // a good commit replaces the file
    dsmoe_st_file *f;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_st_open(p, &f, &err), DSMOE_OK);
    float v;
    memcpy(&v, dsmoe_st_find(f, "v")->data, 4);
    assert_true(v == 5.0f);
    dsmoe_st_close(f);
    assert_int_equal(count_entries(sub), 2);
}

// Streamed commit: deferred tensors come from the source, in order, just before they are written; the
// source is called for every one of them even when the file cannot be written or the source failed
// (checkpoint.c runs collectives in it), and a failure leaves the old file alone.
static int calls[8], n_calls, fail_at = -1;
static float streamed[4];

static dsmoe_status source(void *user, int i, const void **data, dsmoe_err *err) {
    (void)user;
    calls[n_calls++] = i;
    for (int k = 0; k < 4; k++) streamed[k] = 10.0f * (float)i + (float)k;
    *data = streamed;
    if (i == fail_at) return dsmoe_err_set(err, DSMOE_ERR_SYSTEM, "source failed at %d", i);
    return DSMOE_OK;
}

static dsmoe_status commit_streamed(const char *path, dsmoe_err *err) {
    static const float a[3] = {1, 2, 3};
    dsmoe_st_writer *w = dsmoe_st_writer_new();
    assert_int_equal(dsmoe_st_writer_add(w, "a", DSMOE_ST_F32, 1, (int64_t[]){3}, a, err), DSMOE_OK);
    assert_int_equal(dsmoe_st_writer_add(w, "b", DSMOE_ST_F32, 1, (int64_t[]){4}, NULL, err), DSMOE_OK);
    assert_int_equal(dsmoe_st_writer_add(w, "c", DSMOE_ST_F32, 1, (int64_t[]){2}, NULL, err), DSMOE_OK);
    n_calls = 0;
    dsmoe_status s = dsmoe_st_writer_commit_stream(w, path, source, NULL, err);
    dsmoe_st_writer_free(w);
    return s;
}

static void test_streamed_commit(void **state) {
    (void)state;
    char sub[512], p[600], tmp[700];
    snprintf(sub, sizeof sub, "%s/stream", dir);
    assert_int_equal(mkdir(sub, 0755), 0);
    snprintf(p, sizeof p, "%s/s.safetensors", sub);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", p, (long)getpid());
    dsmoe_err err = {0};
    assert_int_equal(commit_streamed(p, &err), DSMOE_OK);
    assert_int_equal(n_calls, 2);
    assert_int_equal(calls[0], 1);
    assert_int_equal(calls[1], 2);
    dsmoe_st_file *f;
    assert_int_equal(dsmoe_st_open(p, &f, &err), DSMOE_OK);
    float b[4], c[2], a[3];
    memcpy(a, dsmoe_st_find(f, "a")->data, sizeof a);
    memcpy(b, dsmoe_st_find(f, "b")->data, sizeof b);
    memcpy(c, dsmoe_st_find(f, "c")->data, sizeof c);
    assert_true(a[2] == 3.0f && b[0] == 10.0f && b[3] == 13.0f && c[0] == 20.0f && c[1] == 21.0f);
    dsmoe_st_close(f);
    char before[256], after[256];
    size_t n0 = read_bytes(p, before, sizeof before);

    assert_int_equal(symlink("/dev/full", tmp), 0); // the disk fills: still every source call
    assert_int_equal(commit_streamed(p, &err), DSMOE_ERR_IO);
    assert_int_equal(n_calls, 2);
    assert_int_equal(read_bytes(p, after, sizeof after), n0);
    assert_memory_equal(before, after, n0);

    fail_at = 1; // the source fails: its error, the later tensor still asked for, the file unchanged
    assert_int_equal(commit_streamed(p, &err), DSMOE_ERR_SYSTEM);
    fail_at = -1;
    assert_non_null(strstr(err.msg, "source failed at 1"));
    assert_int_equal(n_calls, 2);
    assert_int_equal(read_bytes(p, after, sizeof after), n0);
    assert_memory_equal(before, after, n0);
    assert_int_equal(count_entries(sub), 1);

    dsmoe_st_writer *w = dsmoe_st_writer_new(); // deferred data needs the streamed commit
    assert_int_equal(dsmoe_st_writer_add(w, "b", DSMOE_ST_F32, 1, (int64_t[]){4}, NULL, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_writer_commit(w, p, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "tensor 'b': data is NULL"));
    dsmoe_st_writer_free(w);
}

static void test_crc32c(void **state) {
    (void)state;
    assert_int_equal(dsmoe_crc32c(0, "123456789", 9), 0xE3069283u); // the standard check value
    assert_int_equal(dsmoe_crc32c(0, "", 0), 0);
    uint8_t buf[1000];
    uint32_t x = 12345;
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)((x = x * 1103515245u + 12345u) >> 24);
    for (size_t off = 0; off < 9; off++) // every alignment and length against the bitwise definition
        for (size_t n = 0; n + off <= sizeof buf; n += 1 + n / 3)
            assert_int_equal(dsmoe_crc32c(0, buf + off, n), crc32c_bitwise(buf + off, n));
    assert_int_equal(dsmoe_crc32c(dsmoe_crc32c(0, buf, 333), buf + 333, 667), crc32c_bitwise(buf, 1000)); // chained
}

// Reads a whole file into a new buffer.
static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc(*n ? *n : 1);
    assert_int_equal(fread(b, 1, *n, f), *n);
    fclose(f);
    return b;
}

// A copy of good with `edit` applied, then opened (and every tensor verified): must fail naming msg.
static void expect_damage(const char *good, const char *name, void (*edit)(char *b, size_t *n), const char *msg) {
    size_t n;
    char *b = slurp(good, &n);
    edit(b, &n);
    const char *p = path_of(name);
    write_bytes(p, b, n);
    free(b);
    dsmoe_st_file *f = NULL;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_st_open(p, &f, &err);
    for (int i = 0; s == DSMOE_OK && i < dsmoe_st_count(f); i++) s = dsmoe_st_verify(f, dsmoe_st_at(f, i), &err);
    dsmoe_st_close(f);
    if (s == DSMOE_OK) fail_msg("%s: damaged copy accepted, expected: %s", name, msg);
    if (!strstr(err.msg, name) || !strstr(err.msg, msg))
        fail_msg("message\n  got:      %s\n  expected: ...%s: ...%s...", err.msg, name, msg);
}

static uint64_t hlen_of(const char *b) {
    uint64_t h = 0;
    for (int i = 0; i < 8; i++) h |= (uint64_t)(uint8_t)b[i] << (8 * i);
    return h;
}
static void set_hlen(char *b, uint64_t h) {
    for (int i = 0; i < 8; i++) b[i] = (char)(h >> (8 * i));
}
static void flip_last(char *b, size_t *n) { b[*n - 1] ^= 0x10; }   // in tensor "b" (written last)
static void flip_first(char *b, size_t *n) { b[8 + hlen_of(b)] ^= 1; (void)n; } // in tensor "a"
static void short4(char *b, size_t *n) { set_hlen(b, hlen_of(b) - 4); (void)n; }
static void short1(char *b, size_t *n) { set_hlen(b, hlen_of(b) - 1); (void)n; }
static void truncate8(char *b, size_t *n) { *n -= 8; (void)b; }

// The writer records a checksum per tensor (the CRC of the bytes written, streamed or not); any damage
// to the file is refused.
static void test_checksums(void **state) {
    (void)state;
    const char *p = path_of("crc.safetensors");
    float a[5] = {1, 2, 3, 4, 5};
    dsmoe_err err = {0};
    char value[16] = "";
    for (int pad = 0; pad < 5;) { // a metadata value that leaves at least 5 padding spaces
        strcat(value, "v");
        dsmoe_st_writer *w = dsmoe_st_writer_new();
        assert_int_equal(dsmoe_st_writer_add(w, "a", DSMOE_ST_F32, 1, (int64_t[]){5}, a, &err), DSMOE_OK);
        assert_int_equal(dsmoe_st_writer_add(w, "e", DSMOE_ST_F32, 1, (int64_t[]){0}, NULL, &err), DSMOE_OK);
        assert_int_equal(dsmoe_st_writer_add(w, "b", DSMOE_ST_F32, 1, (int64_t[]){4}, NULL, &err), DSMOE_OK);
        assert_int_equal(dsmoe_st_writer_meta(w, "k", value, &err), DSMOE_OK);
        n_calls = 0;
        assert_int_equal(dsmoe_st_writer_commit_stream(w, p, source, NULL, &err), DSMOE_OK);
        dsmoe_st_writer_free(w);
        size_t n;
        char *b = slurp(p, &n);
        for (pad = 0; b[8 + hlen_of(b) - 1 - pad] == ' '; pad++) {}
        free(b);
    }
    dsmoe_st_file *f;
    assert_int_equal(dsmoe_st_open(p, &f, &err), DSMOE_OK);
    assert_int_equal(dsmoe_st_has_checksums(f), 1);
    const dsmoe_st_tensor *ta = dsmoe_st_find(f, "a"), *tb = dsmoe_st_find(f, "b"), *te = dsmoe_st_find(f, "e");
    float bwant[4] = {20, 21, 22, 23}; // source(i = 2)
    assert_true(ta->has_crc && tb->has_crc && te->has_crc);
    assert_int_equal(ta->crc, crc32c_bitwise(a, sizeof a));
    assert_int_equal(tb->crc, crc32c_bitwise(bwant, sizeof bwant));
    assert_int_equal(te->crc, 0);
    for (int i = 0; i < 3; i++) assert_int_equal(dsmoe_st_verify(f, dsmoe_st_at(f, i), &err), DSMOE_OK);
    assert_string_equal(dsmoe_st_meta(f, "k"), value);
    dsmoe_st_close(f);

    expect_damage(p, "flip_b.safetensors", flip_last, "tensor 'b': its bytes have CRC32C");
    expect_damage(p, "flip_a.safetensors", flip_first, "tensor 'a': its bytes have CRC32C");
    expect_damage(p, "short4.safetensors", short4, "padding spaces after the JSON");
    expect_damage(p, "short1.safetensors", short1, "padding spaces after the JSON");
    expect_damage(p, "trunc.safetensors", truncate8, "tensor 'b' data_offsets [20, 36) run past the data buffer");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),   cmocka_unit_test(test_writer_bytes), cmocka_unit_test(test_read_handmade),
        cmocka_unit_test(test_corrupt),      cmocka_unit_test(test_writer_refuses),
        cmocka_unit_test(test_failed_commit), cmocka_unit_test(test_streamed_commit),
        cmocka_unit_test(test_crc32c),        cmocka_unit_test(test_checksums),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
