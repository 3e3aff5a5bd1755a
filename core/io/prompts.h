// core/io/prompts.h: the prompt file of run.mode = generate (docs/text.md): text lines or JSON lines,
// read, tokenized and checked whole before any work.
// defines: DSMOE_PROMPT_FILE_*, dsmoe_prompt_defaults, dsmoe_prompt, dsmoe_prompt_list, dsmoe_prompts_read,
//          dsmoe_prompts_read_mem, dsmoe_prompts_free
#ifndef DSMOE_PROMPTS_H
#define DSMOE_PROMPTS_H
#include <stddef.h>
#include <stdint.h>
#include "tokenizer.h"
#include "util.h"

// The file's form: text (one prompt per line), jsonl (one JSON object per line), or auto (by the name:
// ".jsonl" or ".json" at the end is jsonl, anything else text).
enum { DSMOE_PROMPT_FILE_AUTO = 0, DSMOE_PROMPT_FILE_TEXT = 1, DSMOE_PROMPT_FILE_JSONL = 2 };

// Each prompt's settings unless its JSON line sets them (the deck's generate.* keys). Checked like the
// deck checks them.
typedef struct dsmoe_prompt_defaults {
    int max_new_tokens;   // >= 1
    double temperature;   // >= 0; 0 = greedy
    int top_k;            // >= 0; 0 = every token
    double top_p;         // in (0, 1]; 1 = every token
    uint64_t seed;        // a prompt's seed unless it gives one (has_seed 0)
    const char *stop;     // one stop sequence of stop_len bytes for every prompt; NULL (or stop_len 0) = none
    size_t stop_len;
    int clip_to_context;  // 0: prompt + max_new_tokens > context is an error; 1: max_new_tokens is lowered
                          // to fit (a prompt that leaves no room for one new token is an error either way)
} dsmoe_prompt_defaults;

typedef struct dsmoe_prompt {
    const char *id;            // the line's "id" (a string's text, or an integer's digits), else its line number
    int id_is_string;          // 1: the id was a JSON string (write it quoted); 0: an integer
    int line;                  // where it is in the file
    const int32_t *tokens;     // (n_tokens) ids, each known to the tokenizer; n_tokens >= 1
    int n_tokens;
    int max_new_tokens;        // >= 1, n_tokens + max_new_tokens <= context
    double temperature;        // >= 0; 0 = greedy
    int top_k;                 // >= 0; 0 = every token
    double top_p;              // in (0, 1]
    uint64_t seed;
    int has_seed;              // the prompt gave "seed" (else seed is the default's)
    int n_stop;                // stop sequences: byte strings (may hold NUL), none empty
    const char *const *stop;   // (n_stop)
    const size_t *stop_len;    // (n_stop)
} dsmoe_prompt;

typedef struct dsmoe_prompt_list {
    dsmoe_prompt *items; // (n) in file order; n >= 1
    int n;
    void *store;         // the memory the items point into
} dsmoe_prompt_list;

// Reads the prompt file at path (a regular file: a FIFO, device or directory is refused) in `format`,
// tokenizes each prompt with tok, applies defaults, and checks everything before returning: every
// error names "<path>:<line>" (and the column, for JSON): no prompts, malformed JSON, an unknown or
// repeated field, both or neither of "prompt" and "tokens", an unknown token id, an empty prompt, a
// prompt that does not fit the context (context_limit tokens, prompt + max_new_tokens), a setting out of
// range, a NUL byte in a text file, two prompts with the same id; with a tokenizer that has no text (the
// ids kind), any text: a text file, a "prompt" field, a stop sequence (of the file or the defaults).
dsmoe_status dsmoe_prompts_read(const char *path, int format, dsmoe_tokenizer *tok, const dsmoe_prompt_defaults *defaults,
                                int context_limit, dsmoe_prompt_list **out, dsmoe_err *err);
// The same on len bytes in memory, named `name` in messages (format AUTO looks at name).
dsmoe_status dsmoe_prompts_read_mem(const char *name, const char *text, size_t len, int format, dsmoe_tokenizer *tok,
                                    const dsmoe_prompt_defaults *defaults, int context_limit, dsmoe_prompt_list **out,
                                    dsmoe_err *err);
void dsmoe_prompts_free(dsmoe_prompt_list *list);

#endif
