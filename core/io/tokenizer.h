// core/io/tokenizer.h: text <-> token ids for generation (docs/text.md): the byte vocabulary, and GPT-2's
// byte-level BPE read from the vocab.json + merges.txt pair of Megatron's preprocessing.
// defines: dsmoe_tokenizer, dsmoe_tokenizer_open_bytes, dsmoe_tokenizer_open_bpe, dsmoe_tokenizer_open_bpe_mem,
//          dsmoe_tokenizer_free, dsmoe_tokenizer_describe, dsmoe_tokenizer_vocab, dsmoe_tokenizer_id_end,
//          dsmoe_tokenizer_eot,
//          dsmoe_tokenizer_encode, dsmoe_tokenizer_token_bytes, dsmoe_tokenizer_decode,
//          dsmoe_pretokenize_next, dsmoe_uc_class (and the generated tables of core/io/unicode_tables.c)
//
// Every token is a byte string (empty for the ids kind): decoding concatenates them, so decode(encode(text)) == text for any bytes,
// and completions can be streamed and matched against stop sequences byte by byte. Token ids are
// int32_t in [0, model_vocab); an id with no bytes (beyond the byte vocabulary, or a padding id of a BPE
// model.vocab larger than vocab.json) is an "unknown token id" wherever it is met.
// Encoding keeps a cache in the tokenizer: one thread at a time may encode; token_bytes and decode only
// read, from any number of threads.
#ifndef DSMOE_TOKENIZER_H
#define DSMOE_TOKENIZER_H
#include <stddef.h>
#include <stdint.h>
#include "util.h"

typedef struct dsmoe_tokenizer dsmoe_tokenizer;

// Token id = byte value. Needs model_vocab >= 256 (256 is the byte vocabulary); ids 256.. are unknown.
dsmoe_status dsmoe_tokenizer_open_bytes(int model_vocab, dsmoe_tokenizer **out, dsmoe_err *err);

// GPT-2 byte-level BPE. vocab.json: one JSON object, token (in GPT-2's byte-to-unicode alphabet) -> id;
// merges.txt: "#version" first line (skipped), then one merge "A B" per line, rank = line order.
// Refused, naming the file (and line:column or line): an unreadable or non-regular file, bad JSON, invalid
// UTF-8, a key that appears twice, an id outside [0, model_vocab) or given twice, more entries than
// model_vocab ("model.vocab"), one of the 256 byte symbols missing, a merge line that is not two symbols,
// a merge symbol or result that is not in the vocabulary (each merge must make a token). Entries whose
// key is not in the byte alphabet (added special tokens) decode to the key's UTF-8 and are never made by
// encode; "<|endoftext|>" and every other entry are valid ids.
dsmoe_status dsmoe_tokenizer_open_bpe(const char *vocab_json, const char *merges_txt, int model_vocab,
                                      dsmoe_tokenizer **out, dsmoe_err *err);
// The same from memory; the names are for messages.
dsmoe_status dsmoe_tokenizer_open_bpe_mem(const char *vocab_name, const char *vocab, size_t vocab_len,
                                          const char *merges_name, const char *merges, size_t merges_len,
                                          int model_vocab, dsmoe_tokenizer **out, dsmoe_err *err);
// Token ids only: every id in [0, model_vocab) is known and has no bytes; encode refuses text. For a
// model trained on data tokenized elsewhere (or the synthetic corpus), prompts given as token ids.
dsmoe_status dsmoe_tokenizer_open_ids(int model_vocab, dsmoe_tokenizer **out, dsmoe_err *err);
void dsmoe_tokenizer_free(dsmoe_tokenizer *t);

// "bytes (model.vocab 256)", "GPT-2 BPE: 50257 tokens, 50000 merges (model.vocab 50304)".
const char *dsmoe_tokenizer_describe(const dsmoe_tokenizer *t);
// model_vocab as opened: valid ids are [0, vocab) (those with bytes).
int dsmoe_tokenizer_vocab(const dsmoe_tokenizer *t);
// One past the highest id that has bytes (ids at and above it are the padding of a model vocabulary
// larger than the tokenizer's); *holes (may be NULL): ids below it without bytes.
int dsmoe_tokenizer_id_end(const dsmoe_tokenizer *t, int *holes);
// The id of "<|endoftext|>" in a BPE vocabulary, -1 when there is none (and for bytes and ids).
int32_t dsmoe_tokenizer_eot(const dsmoe_tokenizer *t);
// 0 for the ids kind (no text in or out), 1 otherwise.
int dsmoe_tokenizer_has_text(const dsmoe_tokenizer *t);

// Text (any bytes, len < 2^31) -> a malloc'd array of *n ids (*ids NULL when n is 0). BPE: the text is
// split by GPT-2's pattern (dsmoe_pretokenize_next), each piece's bytes become byte symbols and are merged
// pair by pair, lowest rank first, every occurrence of that pair left to right, as GPT-2's encoder.py
// does. Special tokens are not recognised in text: "<|endoftext|>" encodes as its characters. The ids
// kind refuses any text (DSMOE_ERR_INVALID).
dsmoe_status dsmoe_tokenizer_encode(dsmoe_tokenizer *t, const void *text, size_t len, int32_t **ids, size_t *n,
                                    dsmoe_err *err);
// The bytes of one token (valid while t is open). An id without bytes: DSMOE_ERR_INVALID, "unknown token
// id N ...".
dsmoe_status dsmoe_tokenizer_token_bytes(const dsmoe_tokenizer *t, int32_t id, const uint8_t **bytes, size_t *len,
                                         dsmoe_err *err);
// ids -> their bytes concatenated into a malloc'd *text of *len bytes (NUL-terminated for convenience).
// The first unknown id is an error naming it and its position.
dsmoe_status dsmoe_tokenizer_decode(const dsmoe_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len,
                                    dsmoe_err *err);

// GPT-2's pre-tokenisation, by hand: the end of the piece that starts at s[at] (at < n) under the pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// on UTF-8 text. A byte that starts no valid UTF-8 sequence is one character of the last class (neither
// letter, number nor space), so any bytes split, and valid UTF-8 splits as GPT-2 splits the string.
size_t dsmoe_pretokenize_next(const uint8_t *s, size_t n, size_t at);

// Code point classes (core/io/unicode_tables.c, scripts/gen-unicode-tables.py).
enum { DSMOE_UC_OTHER = 0, DSMOE_UC_L = 1, DSMOE_UC_N = 2, DSMOE_UC_S = 3 };
typedef struct dsmoe_uc_range {
    uint32_t lo;
    uint32_t hi : 24, cls : 8;
} dsmoe_uc_range;
extern const char dsmoe_unicode_version[];
extern const int dsmoe_uc_n_ranges;
extern const dsmoe_uc_range dsmoe_uc_ranges[];
int dsmoe_uc_class(uint32_t cp);

#endif
