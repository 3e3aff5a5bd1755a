// core/drivers/generate_partial.h: the finished part of a generation that a run.signals signal stopped,
// <output>.partial, and reading it back for generate.resume (docs/inference.md "Stopping and resuming").
// defines: dsmoe_partial, dsmoe_partial_header, dsmoe_partial_read, dsmoe_partial_read_mem, dsmoe_partial_free
//
// The file is JSON lines: first a header naming what the stopped run generated with (the checkpoint by
// its absolute path, where it resolves),
//   {"dsmoe_partial":1,"checkpoint":"<path>","step":N,"prompts":"<path>","prompt_count":n}
// then one output line per finished prompt, exactly as the complete output has it (generate_output.h),
// in prompt order. A resumed run keeps those lines as they are and generates the other prompts: each
// prompt's tokens depend on its own sampling stream only, so the merged output is the one an
// uninterrupted run writes (timings aside).
#ifndef DSMOE_GENERATE_PARTIAL_H
#define DSMOE_GENERATE_PARTIAL_H
#include <stddef.h>
#include <stdint.h>

#include "json.h" // dsmoe_buf
#include "prompts.h"
#include "util.h"

typedef struct dsmoe_partial {
    char *checkpoint;     // the stopped run's checkpoint, as it named it
    int step;             // that checkpoint's step
    int prompt_count;     // prompts in its prompt file
    uint8_t *done;        // (prompt_count) 1: finished, its line in `lines`
    int n_done;
    char *lines;          // the finished prompts' output lines, each ending in '\n', in prompt order
    size_t lines_len;
} dsmoe_partial;

// Appends the header line (with its '\n').
void dsmoe_partial_header(dsmoe_buf *b, const char *checkpoint, int step, const char *prompts, int prompt_count);

// Reads the partial file at `path` against the run's prompts (read from prompts_name). Refused, naming path:line(:column): an
// unreadable file, a first line that is not the header, bad JSON, a line without "index", "id" or
// "prompt_tokens", a line that does not start {"index":N, as dsmoe writes it (the output is assembled by
// that prefix), an index outside the prompt file or given twice, an id or a prompt length that is not
// that prompt's (another prompt file), a prompt count that is not this prompt file's. Kept lines lose
// trailing blanks (a CR).
dsmoe_status dsmoe_partial_read(const char *path, const dsmoe_prompt_list *prompts, const char *prompts_name,
                                dsmoe_partial *out, dsmoe_err *err);
// The same on len bytes in memory, named `name` in messages.
dsmoe_status dsmoe_partial_read_mem(const char *name, const char *text, size_t len, const dsmoe_prompt_list *prompts,
                                    const char *prompts_name, dsmoe_partial *out, dsmoe_err *err);
void dsmoe_partial_free(dsmoe_partial *p);

#endif
