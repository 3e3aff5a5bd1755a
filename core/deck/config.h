// core/deck/config.h: the resolved configuration of a run, and the registry of every tunable.
// defines: dsmoe_config, dsmoe_capacity, dsmoe_config_load, dsmoe_config_print, dsmoe_config_to_text, dsmoe_config_print_keys,
//          dsmoe_config_key_count, dsmoe_config_key, dsmoe_deck_read_file, dsmoe_deck_parse and the deck
//          value syntax (core/deck/deck.c)
//
// Every key is declared once in config.c (name, type, default, range, help) and documented in
// docs/deck.md. A key's value comes from, in rising priority: its default, the deck, the environment
// (DSMOE_<KEY> with dots as underscores, upper case: train.steps -> DSMOE_TRAIN_STEPS), the command
// line (key=value after the deck). The source that won is recorded and printed.
#ifndef DSMOE_CONFIG_H
#define DSMOE_CONFIG_H
#include <math.h> // ceil, for dsmoe_capacity
#include "dsmoe/types.h" // dsmoe_dtype
#include "util.h"

#define DSMOE_MAX_MOE_LAYERS 256

typedef enum { DSMOE_MODE_TRAIN = 0, DSMOE_MODE_EVAL = 1, DSMOE_MODE_GENERATE = 2 } dsmoe_run_mode;
// generate.prompt_format and generate.tokenizer (same order as their value lists).
typedef enum { DSMOE_PROMPTS_AUTO = 0, DSMOE_PROMPTS_TEXT = 1, DSMOE_PROMPTS_JSONL = 2 } dsmoe_prompt_format;
typedef enum {
    DSMOE_TOKENIZER_AUTO = 0, DSMOE_TOKENIZER_BYTES = 1, DSMOE_TOKENIZER_BPE = 2, DSMOE_TOKENIZER_IDS = 3
} dsmoe_tokenizer_kind;
typedef enum { DSMOE_DATA_SYNTHETIC = 0, DSMOE_DATA_TEXT = 1, DSMOE_DATA_MEGATRON = 2 } dsmoe_data_source;
typedef enum { DSMOE_LR_COSINE = 0, DSMOE_LR_CONSTANT = 1, DSMOE_LR_LINEAR = 2 } dsmoe_lr_schedule;
typedef enum { DSMOE_PRECISION_FP32 = 0, DSMOE_PRECISION_BF16 = 1 } dsmoe_precision;

// One plugin setting as given (deck or command line); the environment is read when the plugin loads.
#define DSMOE_PLUGIN_SETTINGS_MAX 32
typedef struct dsmoe_plugin_setting {
    char kind[8];     // "kernel" or "comm"
    char plugin[64];  // the plugin's name
    char key[64];
    char value[256];
    int cmdline;      // 1 = command line, 0 = deck
    int line;         // deck line
    char deck[256];   // the deck's name, for messages
} dsmoe_plugin_setting;

typedef struct dsmoe_config {
    // [run]
    int mode;                    // run.mode: dsmoe_run_mode
    uint64_t seed;               // run.seed
    double watchdog;             // run.watchdog: seconds without progress that end the job (0 = off)
    char output_dir[1024];       // run.output_dir
    int precision;               // run.precision: dsmoe_precision
    int threads;                 // run.threads (0 = OMP_NUM_THREADS, else the cores of the binding, else 1)
    int log_every;               // run.log_every (steps)
    char kernel_backend[64];     // run.kernel_backend ("cpu")
    char comm_backend[64];       // run.comm_backend ("mpi")
    char plugin_path[1024];      // run.plugin_path (extra plugin directories, ':'-separated)
    int fixed_order_sums;        // run.fixed_order_sums: the core's rank-order float sums (comm_ordered.c)
    char signals[256];           // run.signals: names of the signals that checkpoint and stop (train.h)

    // [model]
    int vocab;                   // model.vocab
    int seq_len;                 // model.seq_len
    int layers;                  // model.layers
    int hidden;                  // model.hidden
    int heads;                   // model.heads
    int ffn_hidden;              // model.ffn_hidden (resolved: 4*hidden when the deck says 0)
    float init_std;              // model.init_std
    float ln_eps;                // model.ln_eps

    // [moe]
    int moe_every;               // moe.every: layer i (1-based) is MoE iff experts given and i % every == 0
    int n_moe_layers;            // derived: number of MoE layers (0 = dense model)
    int experts[DSMOE_MAX_MOE_LAYERS]; // moe.experts resolved per MoE layer ("8", "32 x10, 64 x2")
    int top_k;                   // moe.top_k (1 or 2)
    float capacity_factor;       // moe.capacity_factor
    float eval_capacity_factor;  // moe.eval_capacity_factor
    int min_capacity;            // moe.min_capacity
    int drop_tokens;             // moe.drop_tokens (0 = dropless)
    int random_token_selection;  // moe.token_selection: 0 position, 1 random (RTS)
    int noise;                   // moe.noise: dsmoe_noise_policy
    float jitter_eps;            // moe.jitter_eps
    float aux_loss_coeff;        // moe.aux_loss_coeff
    int residual;                // moe.residual (Residual MoE / PR-MoE)
    int expert_parallel[DSMOE_MAX_MOE_LAYERS]; // moe.expert_parallel per MoE layer (ranks per EP group), the
                                 // moe.experts list syntax; one bare value fills every entry (dense: [0] too)
    int aux_loss_scope;          // moe.aux_loss_scope: dsmoe_aux_scope (moe_layer.h): 0 batch, 1 rank
    int alltoall;                // moe.alltoall: dsmoe_a2a_algo (exchange.h): 0 flat, 1 hierarchical, 2 auto
    int ranks_per_node;          // moe.ranks_per_node (0 = the real nodes)

    // [topology]
    int bind;                    // topology.bind: dsmoe_bind_policy (placement.h): 0 auto, 1 cores, 2 none

    // [plan] (dsmoe --plan)
    int plan_nodes;              // plan.nodes
    int plan_ranks_per_node;     // plan.ranks_per_node (0 = one per GPU of the topology, else one per core)
    char plan_topology[1024];    // plan.topology ("" = this machine or HWLOC_XMLFILE / HWLOC_SYNTHETIC)
    uint64_t plan_memory_per_rank; // plan.memory_per_rank in bytes (0 = from the topology)
    uint64_t plan_memory_bandwidth;  // plan.memory_bandwidth, bytes/s per rank (0 = assumed by backend)
    uint64_t plan_node_bandwidth;    // plan.node_bandwidth, bytes/s a rank sends inside its node (0 = assumed)
    uint64_t plan_network_bandwidth; // plan.network_bandwidth, bytes/s a rank sends to other nodes (0 = assumed)
    float plan_node_latency;         // plan.node_latency, seconds per message inside a node
    float plan_network_latency;      // plan.network_latency, seconds per message between nodes

    // [train]
    int steps;                   // train.steps
    int batch;                   // train.batch: global batch in sequences per optimizer step
    int micro_batch;             // train.micro_batch: sequences per rank per micro-step
    float lr;                    // train.lr
    float min_lr;                // train.min_lr
    int warmup_steps;            // train.warmup_steps
    int lr_schedule;             // train.lr_schedule: dsmoe_lr_schedule
    int decay_steps;             // train.decay_steps (0 = train.steps)
    float beta1, beta2, adam_eps; // train.beta1, train.beta2, train.adam_eps
    float weight_decay;          // train.weight_decay
    float grad_clip;             // train.grad_clip (0 = off)
    int zero_stage;              // train.zero_stage: 0, or 1 = optimizer state sharded over data parallel
    int overlap_grad_reduce;     // train.overlap_grad_reduce: all-reduce block gradients during the last backward
    int eval_every;              // train.eval_every (0 = only at the end)
    int eval_batches;            // train.eval_batches
    int train_profile;           // train.profile: per-call profile of the steps after the first (op_profile.h)

    // [data]
    int data_source;             // data.source: dsmoe_data_source
    char data_path[4096];        // data.path: text files (comma-separated) or Megatron prefix(es)
    float valid_fraction;        // data.valid_fraction
    int synthetic_sources;       // data.synthetic_sources
    int synthetic_branching;     // data.synthetic_branching
    uint64_t data_seed;          // data.seed (0 = run.seed)

    // [checkpoint]
    int checkpoint_every;        // checkpoint.every (0 = only at the end)
    int checkpoint_keep;         // checkpoint.keep
    char checkpoint_dir[1024];   // checkpoint.dir ("" = <run.output_dir>/checkpoints)
    char resume[1024];           // checkpoint.resume ("" = fresh start, "auto" = newest in dir, or a path)
    int checkpoint_final;        // checkpoint.final (write one at the end)
    int checkpoint_max_failures; // checkpoint.max_failures (failed saves in a row that end the run)
    int allow_seed_change;       // checkpoint.allow_seed_change (resume with another run.seed)

    // [metrics]
    char metrics_file[1024];     // metrics.file ("" = <run.output_dir>/metrics.csv)

    // [distill] (knowledge distillation while training; docs/distill.md)
    char distill_teacher[1024];      // distill.teacher: the teacher checkpoint ("" = off)
    char distill_teacher_deck[1024]; // distill.teacher_deck ("" = the deck in the teacher checkpoint)
    float distill_temperature;       // distill.temperature
    float distill_alpha, distill_beta; // distill.alpha (cross-entropy), distill.beta (T^2 KL)
    int distill_stop_step;           // distill.stop_step: last distilling step (0 = all)
    char distill_init_layers[1024];  // distill.init_layers: teacher block of each student block ("" = none)

    // [generate] (run.mode = generate; docs/inference.md)
    char gen_prompts[4096];      // generate.prompts: the prompt file
    int gen_prompt_format;       // generate.prompt_format: dsmoe_prompt_format
    char gen_output[4096];       // generate.output ("" = <run.output_dir>/generations.jsonl)
    int gen_tokenizer;           // generate.tokenizer: dsmoe_tokenizer_kind
    char gen_vocab_file[4096];   // generate.vocab_file (GPT-2 BPE vocab.json)
    char gen_merges_file[4096];  // generate.merges_file (GPT-2 BPE merges.txt)
    int gen_batch;               // generate.batch: sequences decoded together per rank
    int gen_prefill_tokens;      // generate.prefill_tokens: prompt tokens per rank per step
    int gen_max_new_tokens;      // generate.max_new_tokens (default per prompt)
    float gen_temperature;       // generate.temperature (0 = greedy)
    int gen_top_k;               // generate.top_k (0 = all)
    float gen_top_p;             // generate.top_p
    uint64_t gen_seed;           // generate.seed (0 = run.seed)
    char gen_stop[256];          // generate.stop: one stop sequence, C escapes (\n \t \\)
    int gen_eos_token;           // generate.eos_token: the id that ends a completion (-1 = the tokenizer's)
    int gen_context;             // generate.context (0 = model.seq_len)
    float gen_capacity_factor;   // generate.capacity_factor (0 = no token dropped)
    int gen_profile;             // generate.profile: time breakdown (a wait per part)
    int gen_tensor_parallel;     // generate.tensor_parallel: ranks each dense block is sliced over
    int gen_coordinated;         // generate.coordinated_alltoall: tensor ranks split the MoE layers' tokens
    int gen_expert_slicing;      // generate.expert_slicing: each expert's FFN split over the tensor group
    int gen_resume;              // generate.resume: continue a stopped generation from <output>.partial
    double gen_save_every;       // generate.save_every: seconds between saves of <output>.partial (0 = none)

    // [kernel.NAME] and [comm.NAME]: plugin-declared settings as written in the deck and on the command
    // line, checked against the plugin's declarations when it is loaded (core/deck/plugin_settings.c).
    dsmoe_plugin_setting plugin_settings[DSMOE_PLUGIN_SETTINGS_MAX];
    int n_plugin_settings;
} dsmoe_config;

// Opaque record of where each key's value came from, for printing.
typedef struct dsmoe_config_sources dsmoe_config_sources;

// Parses the deck at deck_path, applies DSMOE_* environment overrides from envp (NULL = environ) and
// the "key=value" overrides in argv_overrides (n_overrides of them), validates ranges and cross-key
// rules given world_size (number of ranks; 0 = not known yet: the rules that need it are skipped and
// train.micro_batch stays as written), and fills cfg. On failure returns non-OK with a message
// naming the deck file and line (or "command line" / the environment variable) and the key.
// *sources (may be NULL) receives an allocation to free with dsmoe_config_sources_free.
dsmoe_status dsmoe_config_load(const char *deck_path, char *const *argv_overrides, int n_overrides,
                               char *const *envp, int world_size, dsmoe_config *cfg,
                               dsmoe_config_sources **sources, dsmoe_err *err);

// Same, from deck text held in memory (deck_name is what messages call it; deck_text NULL = an empty
// deck). The deck echo is printed by dsmoe_config_print, not here.
dsmoe_status dsmoe_config_load_text(const char *deck_text, const char *deck_name, char *const *argv_overrides,
                                    int n_overrides, char *const *envp, int world_size, dsmoe_config *cfg,
                                    dsmoe_config_sources **sources, dsmoe_err *err);

void dsmoe_config_sources_free(dsmoe_config_sources *sources);
// Where key's value came from, for messages: "deck run.deck:3", "environment DSMOE_RUN_SEED",
// "the command line" or "the default" ("" for an unknown key; "the default" when sources is NULL).
void dsmoe_config_source_of(const dsmoe_config_sources *sources, const char *key, char *buf, size_t n);

// Writes the resolved configuration, one "key = value   # source" line per key, as a valid deck.
dsmoe_status dsmoe_config_print(FILE *out, const dsmoe_config *cfg, const dsmoe_config_sources *sources);
// The same text in a malloc'd string (for checkpoints and resolved.deck).
char *dsmoe_config_to_text(const dsmoe_config *cfg, const dsmoe_config_sources *sources);

// True when MoE layer index l (0-based over all layers) is an MoE layer; *moe_index gets its
// position among MoE layers.
int dsmoe_config_is_moe_layer(const dsmoe_config *cfg, int layer, int *moe_index);
// The run trains with knowledge distillation (distill.teacher set, run.mode = train).
static inline int dsmoe_config_distills(const dsmoe_config *cfg) {
    return cfg->distill_teacher[0] != '\0' && cfg->mode == DSMOE_MODE_TRAIN;
}
// A training run may write a checkpoint: every checkpoint.every steps, at the end, or when a run.signals
// signal stops it.
static inline int dsmoe_config_may_checkpoint(const dsmoe_config *cfg) {
    return cfg->checkpoint_every > 0 || cfg->checkpoint_final || cfg->signals[0] != '\0';
}

// The seed of the data order (and of the synthetic corpus): data.seed, or run.seed when that is 0.
static inline uint64_t dsmoe_config_data_seed(const dsmoe_config *cfg) {
    return cfg->data_seed ? cfg->data_seed : cfg->seed;
}

// Capacity of an MoE layer: max(ceil(S/E * k * cf), min_capacity), cf chosen by training.
int dsmoe_config_capacity(const dsmoe_config *cfg, int S, int E, int training);
// The same rule on plain numbers (the MoE layer uses it too): max(ceil(S/E * K * cf), min_capacity),
// clamped to INT32_MAX. cf is a float: 1.1f is 1.10000002, so S/E*K*cf can land a hair above an
// integer that the decimal value gives exactly; a relative 1e-6 (well above float rounding, 6e-8)
// taken off before the ceil absorbs that (cf = 1.1 on 100 tokens over 10 experts: 11, not 12).
static inline int dsmoe_capacity(int S, int E, int K, float cf, int min_capacity) {
    double v = ceil((double)S * K * (double)cf / (double)E * (1.0 - 1e-6));
    int c = v > (double)INT32_MAX ? INT32_MAX : (int)v;
    return c > min_capacity ? c : min_capacity;
}

// Every key with its type, default, range and help, grouped by section (for `dsmoe --help keys`).
void dsmoe_config_print_keys(FILE *out);

// The registry, read-only: key i (0 <= i < dsmoe_config_key_count()) in table order. type is one of
// "int", "float", "bool", "enum", "string", "duration", "list"; default_text is the default as a
// deck would write it ("" for an empty string). Out of range: every field NULL.
typedef struct dsmoe_config_key_info {
    const char *name, *type, *default_text, *help;
} dsmoe_config_key_info;
int dsmoe_config_key_count(void);
dsmoe_config_key_info dsmoe_config_key(int i);

// The deck reader (core/deck/deck.c), used by config.c. Walks deck text, joining continued lines,
// dropping comments, substituting ${VAR} / ${VAR:-default} from envp (NULL = environ) and removing
// quotes, and calls fn once per "[section]" line (key and value NULL) and once per "key = value"
// line (section is the current one, "" before any). line is the entry's first physical line. The
// first failing fn stops the walk and its status is returned; deck errors read "<deck>:<line>: ...".
typedef dsmoe_status (*dsmoe_deck_entry_fn)(void *user, const char *section, const char *key,
                                            const char *value, int line, dsmoe_err *err);
dsmoe_status dsmoe_deck_parse(const char *text, const char *deck_name, char *const *envp,
                              dsmoe_deck_entry_fn fn, void *user, dsmoe_err *err);

// Reads the deck file at path completely: a regular file, or a pipe / FIFO / stdin ("-", named
// "<stdin>" in messages) read to EOF. A FIFO is opened without blocking: one with no writer, or a
// pipe that gives no data at all (or none for 30 s), is refused, as are directories and devices
// (a terminal, /dev/zero). NUL bytes, invalid UTF-8 and more than 64 MiB are errors; the first two
// name "<path>:<line>" (LF, CRLF and CR end lines). On success *text is a malloc'd NUL-terminated
// copy of the *len bytes (no NUL inside), for dsmoe_config_load_text; on failure *text is NULL.
dsmoe_status dsmoe_deck_read_file(const char *path, char **text, size_t *len, dsmoe_err *err);

// Deck value syntax (core/deck/deck.c), shared by the loader and the printer. Parsers return 0, -1 when
// text is not such a value, and (the numbers) -2 when it is one that does not fit.
// Integer: decimal digits with an optional sign, fraction, exponent and suffix, as
// dsmoe_parse_int_strict reads them ("12", "-3", "4K", "4Ki", "1e3", "1.5K"), whose value is whole;
// computed exactly (no wrap, no rounding, no hex); -2 outside int64_t.
int dsmoe_deck_parse_int(const char *text, int64_t *out);
// The same for 0 .. UINT64_MAX (-1 for a negative value).
int dsmoe_deck_parse_u64(const char *text, uint64_t *out);
// A float: dsmoe_parse_scaled's syntax ("3e-4", "1.5K"); read with strtof when there is no suffix,
// so the printer's shortest digits read back exactly; -2 beyond the float range (or rounded to 0).
int dsmoe_deck_parse_float(const char *text, float *out);
// true/false, yes/no, on/off, 1/0, any case.
int dsmoe_deck_parse_bool(const char *text, int *out);
// moe.experts as written: one bare count for every MoE layer (all = 1; "0" = dense), or items
// "count xN" (a bare count in a list is x1); counts are integers as dsmoe_deck_parse_int reads them
// and must fit 32 bits. On -1, *why says what is wrong. moe.expert_parallel
// uses the same syntax (config.c rejects its 0).
typedef struct dsmoe_experts_list {
    int all, n;
    int count[DSMOE_MAX_MOE_LAYERS], reps[DSMOE_MAX_MOE_LAYERS];
} dsmoe_experts_list;
int dsmoe_deck_parse_experts(const char *text, dsmoe_experts_list *list, const char **why);
// The shortest decimal that reads back as the same float.
void dsmoe_deck_format_float(float f, char *buf, size_t n);
// The same for a double, a whole number below 1e15 in full ("1500", not "1.5e+03").
void dsmoe_deck_format_double(double v, char *buf, size_t n);
// A string as a deck value: bare when that reads back unchanged, else quoted with \" \\ \$ escapes
// (n >= 2 * strlen(s) + 3 holds any string).
void dsmoe_deck_format_string(const char *s, char *buf, size_t n);

// The dtype of activations and GEMM operands for run.precision (master weights, gradients, optimizer
// state, gating and the loss stay float32 whatever it is: docs/precision.md).
static inline dsmoe_dtype dsmoe_config_act_dtype(const dsmoe_config *c) {
    return c->precision == DSMOE_PRECISION_BF16 ? DSMOE_BFLOAT16 : DSMOE_FLOAT32;
}

#endif
