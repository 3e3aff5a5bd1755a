// core/drivers/generate.h: the generation driver (run.mode = generate, docs/inference.md).
// defines: dsmoe_generate_run, dsmoe_generate_check
//
// Every rank reads the prompt file and takes prompts i with i % ranks == its rank (data parallelism);
// the ranks step together, one forward per step, so that the MoE layers' all-to-all meets (a rank with
// no work left joins with no tokens). Each rank runs continuous batching: generate.batch slots; a new
// prompt takes a free slot and is prefilled (generate.prefill_tokens a step, so long prompts do not stall
// the others); each step then decodes one token for every sequence whose prompt is in; a sequence that
// ends (max_new_tokens, a stop sequence, the end-of-text token, the context limit) frees its slot at
// once. Sampling streams are keyed by the prompt's seed (its own, or generate.seed with its index) and
// the token's index in its completion: the same tokens whatever batch, rank or layout the prompt gets.
// Rank 0 gathers the completions and writes them in prompt order, atomically. A run.signals signal stops
// every rank at one step (the step agreement carries it); the finished completions go to
// <output>.partial, from which generate.resume goes on (generate_partial.h).
#ifndef DSMOE_GENERATE_H
#define DSMOE_GENERATE_H
#include "config.h"
#include "runtime.h"

// Runs the deck's generation to completion, or until a run.signals signal (*stopped_signal: which; 0 when
// none): every rank stops at the same step and rank 0 writes the finished completions to <output>.partial
// (generate_partial.h), for generate.resume to go on from. Collective; on failure every rank returns the
// error.
dsmoe_status dsmoe_generate_run(const dsmoe_config *cfg, const char *config_text, dsmoe_runtime *rt, int *stopped_signal,
                                dsmoe_err *err);
// dsmoe --check of a generate deck: everything the run checks before its first step (tokenizer files,
// the prompt file, the output's directory, the checkpoint verified against the deck's model); writes
// nothing (preflight.h's probe). Collective.
dsmoe_status dsmoe_generate_check(const dsmoe_config *cfg, dsmoe_runtime *rt, dsmoe_err *err);

#endif
