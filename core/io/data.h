// core/io/data.h: training and validation tokens: a synthetic corpus, byte-level text, Megatron-LM
// indexed datasets (.bin/.idx).
// defines: dsmoe_dataset, dsmoe_dataset_open, dsmoe_dataset_close, dsmoe_dataset_sample,
//          dsmoe_dataset_windows, dsmoe_dataset_tokens, dsmoe_dataset_describe, dsmoe_dataset_transition,
//          dsmoe_dataset_loss_bound
//
// A dataset is a deterministic map from a sample index (0, 1, 2, ...) to a window of T+1 tokens
// (inputs = window[0..T-1], targets = window[1..T]). Sample i of a split is the same on every rank and
// in every run: the global batch of step n is samples [n*batch, (n+1)*batch), each rank takes its own
// slice, and "data position" in a checkpoint is just the next sample index.
//
// Synthetic corpus (no file): K sources, each a first-order Markov chain over the chain tokens
// [K, V). A sample is one document: window[0] = K-th marker token k (= the source id, chosen
// uniformly), window[1] ~ uniform over the chain tokens, window[t+1] ~ P_k(. | window[t]). Each row of
// P_k has `branching` distinct successors with random weights. The best achievable mean loss over
// the T predictions is computable exactly: dsmoe_dataset_loss_bound.
//
// File corpora (text, megatron): all tokens are one stream in file order (documents concatenated);
// the last valid_fraction of the stream is the validation split. Windows start at multiples of T
// within a split; the order of windows is a seeded permutation per epoch (epoch = i / windows).
#ifndef DSMOE_DATA_H
#define DSMOE_DATA_H
#include <stdint.h>
#include "util.h"

typedef enum { DSMOE_SPLIT_TRAIN = 0, DSMOE_SPLIT_VALID = 1 } dsmoe_split;

typedef struct dsmoe_dataset dsmoe_dataset; // opaque

typedef struct dsmoe_dataset_options {
    int source;              // dsmoe_data_source (config.h): 0 synthetic, 1 text, 2 megatron
    const char *path;        // text: comma-separated files; megatron: comma-separated prefixes
    int vocab;               // V: every token must be < V (checked when opening, naming the file)
    int seq_len;             // T
    float valid_fraction;    // share of the stream held out (file corpora)
    uint64_t seed;           // permutation / synthetic process seed
    int synthetic_sources;   // K
    int synthetic_branching; // successors per state
} dsmoe_dataset_options;

// Opens (memory-maps) the corpus and checks it completely: magic, version, dtype, counts, lengths and
// pointers against the .bin size, token range. Errors name the file and what was expected.
dsmoe_status dsmoe_dataset_open(const dsmoe_dataset_options *opt, dsmoe_dataset **ds, dsmoe_err *err);
void dsmoe_dataset_close(dsmoe_dataset *ds);

// Writes window i (T+1 tokens, int32) of the split into out.
dsmoe_status dsmoe_dataset_sample(const dsmoe_dataset *ds, dsmoe_split split, uint64_t i, int32_t *out,
                                  dsmoe_err *err);

// Number of distinct windows per epoch in the split (synthetic: UINT64_MAX, it never repeats).
uint64_t dsmoe_dataset_windows(const dsmoe_dataset *ds, dsmoe_split split);
// Total tokens in the split (synthetic: 0).
uint64_t dsmoe_dataset_tokens(const dsmoe_dataset *ds, dsmoe_split split);
// One line describing the corpus, for the log.
const char *dsmoe_dataset_describe(const dsmoe_dataset *ds);

// Synthetic corpus only: the minimum achievable expected cross-entropy (nats per predicted token,
// averaged over the T positions of a window), computed exactly from the chains. Returns -1 for other
// corpora.
double dsmoe_dataset_loss_bound(const dsmoe_dataset *ds);

// Synthetic corpus only: P_source(to | from) for chain tokens from, to in [K, V) (0 when `to` is not
// a successor of `from`); -1 for other corpora or arguments out of range. For tests and analysis.
double dsmoe_dataset_transition(const dsmoe_dataset *ds, int source, int32_t from, int32_t to);

#endif
