// core/drivers/generate_output.h: what generation produces: each prompt's completion (tokens, text,
// latencies, why it ended), the JSON-lines output file and the run's summary (docs/inference.md).
// defines: dsmoe_completion, dsmoe_completion_add, dsmoe_completion_stop, dsmoe_completion_end_token,
//          dsmoe_completion_free,
//          dsmoe_generation_report, dsmoe_generation_write, dsmoe_percentile
#ifndef DSMOE_GENERATE_OUTPUT_H
#define DSMOE_GENERATE_OUTPUT_H
#include <stddef.h>
#include <stdint.h>

#include "control.h"
#include "model_infer.h" // dsmoe_infer_times
#include "prompts.h"
#include "tokenizer.h"

typedef struct dsmoe_completion {
    int32_t *tokens;      // (n_tokens) every token drawn, a stop sequence's and the end token included
    size_t n_tokens, cap_tokens;
    char *text;           // (text_len) the completion's bytes, cut before a stop sequence or the end token
    size_t text_len, cap_text;
    size_t last_len;      // bytes of the newest token
    double *latency_ms;   // (n_tokens) [0] = time to first token, then the gap before each next token
    double ttft_ms;       // from the prompt taking its slot to its first token
    const char *finish;   // "length", "stop", "eos", "context" (static strings)
} dsmoe_completion;

// Appends a token, its bytes (the tokenizer's) and its latency.
dsmoe_status dsmoe_completion_add(dsmoe_completion *c, int32_t token, double latency_ms, const dsmoe_tokenizer *tok,
                                  dsmoe_err *err);
// 1 when the text now contains one of the stop sequences (which must end in the newest token's bytes:
// earlier text was checked before); the text is then cut where that stop sequence starts.
int dsmoe_completion_stop(dsmoe_completion *c, const dsmoe_prompt *p);
// The newest token ends the completion (generate.eos_token): its bytes leave the text, as a stop
// sequence's do; it stays in tokens.
void dsmoe_completion_end_token(dsmoe_completion *c);
void dsmoe_completion_free(dsmoe_completion *c);

// The run's results on each rank, for dsmoe_generation_write.
typedef struct dsmoe_generation_report {
    const char *path;                 // the output file (written by rank 0)
    const char *partial_path;         // <path>.partial (generate_partial.h): a stop's finished completions
    const dsmoe_prompt_list *prompts; // the whole prompt file
    const dsmoe_tokenizer *tok;
    dsmoe_completion **completions;   // (n) this rank's, in file order
    int *indices;                     // (n) their prompts' indices in the file
    int n;
    int partial;                      // 1: only the finished completions, into partial_path after `header`
                                      // (a signal's stop, or a save); 0: every prompt, into path
    int quiet;                        // partial: a periodic save (generate.save_every): one line, no summary
    const char *header;               // partial: the partial file's first line
    const char *kept;                 // rank 0: lines finished by an earlier, stopped run (kept_len bytes;
    size_t kept_len;                  // NULL: none), each "{"index":N,..." and a newline
    double elapsed;                   // seconds of the step loop
    dsmoe_infer_times times;          // this rank's breakdown (profiled only)
    int profiled;
    const dsmoe_ctl_group *world;
} dsmoe_generation_report;

// Collective: gathers every rank's completions to rank 0, which writes one JSON line per prompt in file
// order (atomically: a temporary name, fsync, rename), the kept lines among them, and prints the summary
// of this run's finished prompts: prompts/s, tokens/s, time to first token and per-token latency
// percentiles, the time breakdown (the mean over ranks). The complete output removes partial_path.
dsmoe_status dsmoe_generation_write(const dsmoe_generation_report *rep, dsmoe_err *err);

// The q-quantile (0..1) of v (n), by linear interpolation between order statistics; sorts v.
double dsmoe_percentile(double *v, size_t n, double q);

#endif
