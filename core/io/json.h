// core/io/json.h: a small strict JSON reader (a cursor over bytes), the JSON string writer, UTF-8
// decoding and whole-file reading, for safetensors headers, tokenizer vocabularies and prompt files.
// defines: dsmoe_buf, dsmoe_buf_put, dsmoe_json, dsmoe_json_init, dsmoe_json_fail, dsmoe_json_errorf,
//          dsmoe_json_where, dsmoe_json_ws, dsmoe_json_peek, dsmoe_json_expect, dsmoe_json_begin,
//          dsmoe_json_next, dsmoe_json_key, dsmoe_json_string, dsmoe_json_string_dup, dsmoe_json_int,
//          dsmoe_json_u64, dsmoe_json_number, dsmoe_json_bool, dsmoe_json_null, dsmoe_json_skip,
//          dsmoe_json_end, dsmoe_json_write_string, dsmoe_utf8_next, dsmoe_read_regular_file
//
// The reader is RFC 8259 JSON read strictly: numbers without leading zeros, strings without raw control
// characters, \u escapes with surrogate pairs joined (a lone surrogate is an error), no trailing commas.
// It allocates nothing but the strings it is asked for, which go into a caller's reusable dsmoe_buf.
// A failure sets the cursor's status and err to "<where>: expected <what>, found <what is there>", where
// <where> is "<name>:<line>:<column>" (column in bytes, from 1) or, for binary formats that count bytes,
// "<name>: <byte_label> at byte <N>".
#ifndef DSMOE_JSON_H
#define DSMOE_JSON_H
#include <stddef.h>
#include <stdint.h>
#include "util.h"

// A growable byte string, always NUL-terminated after a put (p may hold NULs of its own: use len).
// `oom` sticks once an allocation fails; the bytes then stop growing. Free with free(b.p).
typedef struct dsmoe_buf {
    char *p;
    size_t len, cap;
    int oom;
} dsmoe_buf;

void dsmoe_buf_put(dsmoe_buf *b, const void *s, size_t n);

// Cursor flags.
enum {
    DSMOE_JSON_NO_NUL = 1u << 0,      // \u0000 in a string is an error (for readers that keep C strings)
    DSMOE_JSON_NO_LITERALS = 1u << 1, // dsmoe_json_skip refuses true, false and null
    DSMOE_JSON_UTF8 = 1u << 2,        // raw bytes in strings must be valid UTF-8 (otherwise passed through)
};
// dsmoe_json_int / dsmoe_json_u64 flags: also take a fraction or exponent whose value is whole (2.0, 1e3).
#define DSMOE_JSON_WHOLE 1u

typedef struct dsmoe_json {
    const char *start, *p, *end; // the text [start, end); p is the next byte to read
    const char *name;            // the source, first in messages
    int line;                    // the source line `start` is on
    const char *byte_label;      // NULL: positions as name:line:col; else "name: <byte_label> at byte N"
    size_t byte_base;            // with byte_label: the source offset of `start`
    const char *end_name;        // how messages call the end of the text ("the end of the input")
    unsigned flags;              // DSMOE_JSON_NO_NUL | ...
    int max_depth;               // dsmoe_json_skip's nesting limit (64)
    dsmoe_status status;         // of the last failure (DSMOE_ERR_IO, or DSMOE_ERR_NOMEM)
    dsmoe_err *err;              // where failures are reported; may be NULL
} dsmoe_json;

// A cursor over len bytes of text from `name`, starting on `line`, with the defaults above.
void dsmoe_json_init(dsmoe_json *j, const char *text, size_t len, const char *name, int line, dsmoe_err *err);

// "<where p is>: expected <expected>, found <the byte at p, or end_name>"; returns j->status (DSMOE_ERR_IO).
dsmoe_status dsmoe_json_fail(dsmoe_json *j, const char *expected);
// "<where at is>: <message>" with the given status; for a reader's own checks on what it read.
dsmoe_status dsmoe_json_errorf(dsmoe_json *j, const char *at, dsmoe_status status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
// The position of `at` as messages give it ("file:3:14"), into buf.
void dsmoe_json_where(const dsmoe_json *j, const char *at, char *buf, size_t cap);

void dsmoe_json_ws(dsmoe_json *j);
// The next byte after whitespace, or -1 at the end.
int dsmoe_json_peek(dsmoe_json *j);
dsmoe_status dsmoe_json_expect(dsmoe_json *j, char c, const char *what);
// Opens an object ('{') or array ('['): 1 when a member follows, 0 when it is empty (and closed), -1 on
// error. `what` is the expectation in the message ("'{' (tensor info)").
int dsmoe_json_begin(dsmoe_json *j, char open, const char *what);
// After a member: 1 on ',' (another member follows), 0 on the closing bracket, -1 otherwise (error set).
// So: for (more = begin(...); more > 0; more = next(...)) { ... } if (more < 0) return j->status;
int dsmoe_json_next(dsmoe_json *j, char close);
// An object member's key and the ':' after it, into key (cleared first).
dsmoe_status dsmoe_json_key(dsmoe_json *j, dsmoe_buf *key);

// A string as UTF-8 into out (cleared first; out->len counts an escaped \u0000 when the cursor allows it).
dsmoe_status dsmoe_json_string(dsmoe_json *j, dsmoe_buf *out);
// A string into a new malloc'd C string, *out (NULL out: skip it). Meant for cursors with NO_NUL.
dsmoe_status dsmoe_json_string_dup(dsmoe_json *j, char **out);
// An integer in [min, max]: -?digits, no leading zeros, no fraction or exponent (unless flags has
// DSMOE_JSON_WHOLE). Messages: "a non-negative integer" (min >= 0 and no digits, or a '-'), "an integer",
// "an integer below 2^63" (too large), "an integer in [min, max]".
dsmoe_status dsmoe_json_int(dsmoe_json *j, int64_t min, int64_t max, unsigned flags, int64_t *out);
// An integer in [0, max] read in full 64 bits (seeds).
dsmoe_status dsmoe_json_u64(dsmoe_json *j, uint64_t max, unsigned flags, uint64_t *out);
// Any finite number.
dsmoe_status dsmoe_json_number(dsmoe_json *j, double *out);
dsmoe_status dsmoe_json_bool(dsmoe_json *j, int *out);
// 1 when a `null` was read, 0 when the next value is something else (nothing read).
int dsmoe_json_null(dsmoe_json *j);
// Skips one value, nested at most max_depth levels.
dsmoe_status dsmoe_json_skip(dsmoe_json *j);
// Only whitespace is left; `what` is the expectation ("the end of the line").
dsmoe_status dsmoe_json_end(dsmoe_json *j, const char *what);

// Appends s (n bytes) as a JSON string literal: '"' and '\' escaped, \n \r \t as such, other bytes below
// 0x20 as \u00XX (lower-case hex), valid UTF-8 (DEL included) as it is, and each byte that does not start
// a valid UTF-8 sequence as \ufffd (U+FFFD, the replacement character). The result is valid UTF-8 JSON;
// a string holding invalid UTF-8 does not read back to the same bytes.
void dsmoe_json_write_string(dsmoe_buf *b, const void *s, size_t n);

// The valid UTF-8 sequence at s (n bytes available): its length 1..4 and its code point in *cp; 0 when
// s[0] starts none (a continuation byte, an overlong form, a surrogate, above U+10FFFF, cut short).
int dsmoe_utf8_next(const uint8_t *s, size_t n, uint32_t *cp);

// Reads a whole regular file (at most max_bytes) into a malloc'd, NUL-terminated *data of *len bytes.
// Anything else is refused before a byte is read: a FIFO or socket (it could be read once only, or wait
// forever), a device, a directory. `what` names the file's role in messages ("prompt file").
dsmoe_status dsmoe_read_regular_file(const char *path, const char *what, size_t max_bytes, char **data,
                                     size_t *len, dsmoe_err *err);

#endif
