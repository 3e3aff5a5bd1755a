// core/io/safetensors.h: reading and writing safetensors files (docs/checkpoint.md, section "The file format").
// defines: dsmoe_st_writer_*, dsmoe_st_file_*
//
// Layout: u64 little-endian header length N, N bytes of JSON, then the data buffer. The JSON maps each
// tensor name to {"dtype", "shape", "data_offsets": [begin, end)} relative to the data buffer, plus
// "__metadata__": {string: string}. We pad the header with spaces so data starts 8-byte aligned.
// The writer records a CRC32C of every tensor's bytes as metadata "crc32c.<name>" = 8 hex digits; the
// reader checks them with dsmoe_st_verify (files without them, from older dsmoe or other writers, open).
#ifndef DSMOE_SAFETENSORS_H
#define DSMOE_SAFETENSORS_H
#include <stddef.h>
#include <stdint.h>
#include "util.h"

#define DSMOE_ST_MAX_DIMS 8

typedef enum { DSMOE_ST_F32 = 0, DSMOE_ST_F64, DSMOE_ST_I32, DSMOE_ST_I64, DSMOE_ST_U8,
               DSMOE_ST_F16, DSMOE_ST_BF16, DSMOE_ST_I16, DSMOE_ST_I8, DSMOE_ST_BOOL } dsmoe_st_dtype;

// --- writing: collect tensors (copied or borrowed host pointers) and metadata, then commit ----------
typedef struct dsmoe_st_writer dsmoe_st_writer;
dsmoe_st_writer *dsmoe_st_writer_new(void);
// Adds a tensor; data (host, row-major) must stay valid until commit (it is not copied). data NULL
// (with bytes to write) defers the data to dsmoe_st_writer_commit_stream's source.
dsmoe_status dsmoe_st_writer_add(dsmoe_st_writer *w, const char *name, dsmoe_st_dtype dtype, int ndim,
                                 const int64_t *shape, const void *data, dsmoe_err *err);
dsmoe_status dsmoe_st_writer_meta(dsmoe_st_writer *w, const char *key, const char *value, dsmoe_err *err);
// Writes the file atomically (temporary name, fsync, rename): an existing file at path is never
// damaged. Tensors are written in insertion order.
dsmoe_status dsmoe_st_writer_commit(dsmoe_st_writer *w, const char *path, dsmoe_err *err);
// The same, with the data of deferred tensors coming from source, asked for tensor i (insertion order)
// just before it is written: *data (host, the tensor's bytes) must stay valid until the next call.
// Files larger than memory are written this way. source is called for every deferred tensor, in order,
// even after the file could not be created or written (callers may run collectives in it); its first
// failure, or the write's, is returned.
typedef dsmoe_status (*dsmoe_st_source_fn)(void *user, int i, const void **data, dsmoe_err *err);
dsmoe_status dsmoe_st_writer_commit_stream(dsmoe_st_writer *w, const char *path, dsmoe_st_source_fn source,
                                           void *user, dsmoe_err *err);
void dsmoe_st_writer_free(dsmoe_st_writer *w);

// --- reading: maps the file, validates the whole header -------------------------------------------
typedef struct dsmoe_st_file dsmoe_st_file;

typedef struct dsmoe_st_tensor {
    const char *name;
    dsmoe_st_dtype dtype;
    int ndim;
    int64_t shape[DSMOE_ST_MAX_DIMS];
    const void *data;   // points into the mapping; little-endian, may be unaligned for non-8-aligned files
    size_t nbytes;
    int has_crc;        // the header records crc (metadata "crc32c.<name>")
    uint32_t crc;
} dsmoe_st_tensor;

#define DSMOE_ST_CRC_PREFIX "crc32c."

// CRC32C (Castagnoli, reflected polynomial 0x82F63B78) of n bytes continuing crc (0 to start):
// dsmoe_crc32c(0, "123456789", 9) = 0xE3069283.
uint32_t dsmoe_crc32c(uint32_t crc, const void *data, size_t n);

// Opens and validates: header length within the file and ending at the JSON's closing brace or at the
// padding after it (< 8 spaces up to a multiple of 8), valid JSON, known dtypes, offsets inside the data
// buffer and matching dtype x shape, the tensors tiling the data buffer (no overlap, no gap, nothing
// after the last), checksums for every tensor or for none. Errors name the file and the tensor or offset.
// Tensor bytes are not read: dsmoe_st_verify checks them.
dsmoe_status dsmoe_st_open(const char *path, dsmoe_st_file **f, dsmoe_err *err);
void dsmoe_st_close(dsmoe_st_file *f);
int dsmoe_st_count(const dsmoe_st_file *f);
const dsmoe_st_tensor *dsmoe_st_at(const dsmoe_st_file *f, int i);
// NULL when absent.
const dsmoe_st_tensor *dsmoe_st_find(const dsmoe_st_file *f, const char *name);
// NULL when absent.
const char *dsmoe_st_meta(const dsmoe_st_file *f, const char *key);
const char *dsmoe_st_dtype_name(dsmoe_st_dtype dtype);
// 1 when every tensor has a recorded checksum, 0 when none has (dsmoe_st_open refuses a mix).
int dsmoe_st_has_checksums(const dsmoe_st_file *f);
// Reads t's bytes and compares their CRC32C with the recorded one: DSMOE_ERR_IO naming the file and the
// tensor when they differ; DSMOE_OK when they match or t has no recorded checksum.
dsmoe_status dsmoe_st_verify(const dsmoe_st_file *f, const dsmoe_st_tensor *t, dsmoe_err *err);

#endif
