// tests/deck/test_deck.c: the deck parser and the configuration registry (core/deck/config.c, core/deck/deck.c).
// Good decks parse to hand-written values; each kind of bad deck gives its exact message; overrides
// win in the documented order; derived quantities and their limits; the key table and docs/deck.md list
// the same keys with the same types and defaults. test_deck_text.c has printing, files and numbers.
#include <inttypes.h>
#include <math.h>

#include "deck_test.h"


// ---------------------------------------------------------------------------------------------------
// Good decks

static void test_defaults(void **state) {
    dsmoe_config c;
    dsmoe_err err = {0};
    if (load_t("", 2, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(c.mode, DSMOE_MODE_TRAIN);
    assert_int_equal(c.seed, 1234);
    assert_string_equal(c.output_dir, "dsmoe_out");
    assert_string_equal(c.kernel_backend, "cpu");
    assert_string_equal(c.comm_backend, "mpi");
    assert_string_equal(c.plugin_path, "");
    assert_int_equal(c.log_every, 10);
    assert_int_equal(c.vocab, 256);
    assert_int_equal(c.layers, 4);
    assert_int_equal(c.hidden, 128);
    assert_int_equal(c.ffn_hidden, 4 * 128); // 0 resolves to 4*hidden
    assert_true(c.init_std == 0.02f && c.ln_eps == 1e-5f);
    assert_int_equal(c.n_moe_layers, 0);     // experts = 0: dense
    assert_int_equal(c.moe_every, 2);
    assert_int_equal(c.top_k, 1);
    assert_int_equal(c.min_capacity, 4);
    assert_int_equal(c.drop_tokens, 1);
    assert_true(c.jitter_eps == 0.01f && c.aux_loss_coeff == 0.01f && c.capacity_factor == 1.0f);
    assert_int_equal(c.steps, 100);
    assert_int_equal(c.batch, 8);
    assert_int_equal(c.micro_batch, 4);      // 0 resolves to batch / ranks
    assert_true(c.lr == 3e-4f && c.min_lr == 0.0f && c.beta1 == 0.9f && c.beta2 == 0.95f && c.adam_eps == 1e-8f);
    assert_int_equal(c.lr_schedule, DSMOE_LR_COSINE);
    assert_int_equal(c.decay_steps, 0);
    assert_int_equal(c.eval_batches, 4);
    assert_int_equal(c.data_source, DSMOE_DATA_SYNTHETIC);
    assert_true(c.valid_fraction == 0.05f);
    assert_int_equal(c.synthetic_sources, 4);
    assert_int_equal(c.data_seed, 0);
    assert_int_equal(c.checkpoint_keep, 2);
    assert_int_equal(c.checkpoint_final, 1);
    assert_string_equal(c.resume, "");
    assert_string_equal(c.metrics_file, "");
}

static void check_good(const dsmoe_config *c) {
    assert_int_equal(c->seed, 42);
    assert_string_equal(c->output_dir, "/scratch/u1/runs/local");
    assert_string_equal(c->plugin_path, "/opt/a:/opt/b # not a comment");
    assert_int_equal(c->threads, 2);
    assert_int_equal(c->vocab, 1024);
    assert_int_equal(c->seq_len, 64);
    assert_int_equal(c->layers, 12);
    assert_int_equal(c->hidden, 96);
    assert_int_equal(c->heads, 6);
    assert_int_equal(c->ffn_hidden, 384);
    assert_true(c->init_std == 0.02f);
    assert_int_equal(c->steps, 2000);
    assert_int_equal(c->moe_every, 2);
    assert_int_equal(c->n_moe_layers, 6);
    const int experts[6] = {8, 8, 16, 16, 16, 32};
    for (int i = 0; i < 6; i++) assert_int_equal(c->experts[i], experts[i]);
    for (int i = 6; i < DSMOE_MAX_MOE_LAYERS; i++) assert_int_equal(c->experts[i], 0);
    assert_int_equal(c->top_k, 2);
    assert_true(c->capacity_factor == 1.25f);
    assert_int_equal(c->drop_tokens, 0);
    assert_int_equal(c->random_token_selection, 1);
    assert_int_equal(c->noise, 2); // DSMOE_NOISE_RSAMPLE
    assert_int_equal(c->expert_parallel[0], 2);
    assert_int_equal(c->batch, 16);
    assert_int_equal(c->micro_batch, 4);
    assert_true(c->lr == 6e-4f && c->min_lr == 6e-5f);
    assert_int_equal(c->lr_schedule, DSMOE_LR_LINEAR);
    assert_int_equal(c->data_source, DSMOE_DATA_TEXT);
    assert_string_equal(c->data_path, "/scratch/u1/a.txt,b c.txt");
    assert_true(c->valid_fraction == 0.1f);
    assert_string_equal(c->resume, "auto");
    assert_int_equal(c->checkpoint_final, 0);
    assert_int_equal(c->log_every, 10); // untouched keys keep their defaults
}

static void test_good_deck(void **state) {
    char *env[] = {"SCRATCH=/scratch/u1", "JOB=", "DSMOE_PLUGIN_PATH=/ignored", NULL};
    dsmoe_config c;
    dsmoe_err err = {0};
    if (dsmoe_config_load(DECKS "good.deck", NULL, 0, env, 2, &c, NULL, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    check_good(&c);
    char *env2[] = {"SCRATCH=/s", "JOB=77", NULL};
    if (dsmoe_config_load(DECKS "good.deck", NULL, 0, env2, 2, &c, NULL, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_string_equal(c.output_dir, "/s/runs/77");
}

static void test_syntax_details(void **state) {
    dsmoe_config c;
    dsmoe_err err = {0};
    char *env[] = {"X=val#ue", NULL};
    const char *deck = "run.output_dir = \"a\\\"b\\\\c\\$d ${X}\"   # escapes inside quotes\n"
                       "run.kernel_backend = c\\\n"
                       "    pu\n" // a continuation joins without a blank
                       "model.hidden = 1e3\n"
                       "model.heads = 8\n"
                       "moe.experts = 16\n"
                       "moe.every = 1\n"
                       "moe.drop_tokens = YES\n"
                       "data.seed = 18446744073709551615\n"
                       "train.lr = 1.5e-4\n"
                       "checkpoint.dir = a=b\n";
    if (dsmoe_config_load_text(deck, "t.deck", NULL, 0, env, 1, &c, NULL, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_string_equal(c.output_dir, "a\"b\\c$d val#ue");
    assert_string_equal(c.kernel_backend, "cpu");
    assert_int_equal(c.hidden, 1000);
    assert_int_equal(c.n_moe_layers, 4); // "16" = 16 on every MoE layer; every = 1: all 4 layers
    for (int i = 0; i < 4; i++) assert_int_equal(c.experts[i], 16);
    assert_int_equal(c.drop_tokens, 1);
    assert_true(c.data_seed == UINT64_MAX);
    assert_true(c.lr == 1.5e-4f);
    assert_string_equal(c.checkpoint_dir, "a=b");
    // a Windows editor's deck: byte-order mark and CRLF line ends
    if (load_t("\xef\xbb\xbfmodel.layers = 6\r\n[train]\r\nsteps = 3\\\r\n  0\r\n", 1, &c, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(c.layers, 6);
    assert_int_equal(c.steps, 30);
}

// ---------------------------------------------------------------------------------------------------
// Bad decks: the exact messages

static void test_unknown_keys(void **state) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s:4: unknown key 'model.hiden' (did you mean 'model.hidden'?)", DECKS "typo.deck");
    dsmoe_config c;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_config_load(DECKS "typo.deck", NULL, 0, no_env, 1, &c, NULL, &err), DSMOE_ERR_INVALID);
    assert_string_equal(err.msg, msg);
    expect_error("[moe]\nevry = 4\n", 1, "t.deck:2: unknown key 'moe.evry' (did you mean 'moe.every'?)");
    // the same section first: data.sed is 1 from data.seed, and 1 from run.seed (earlier in the table) by short name
    expect_error("[data]\nsed = 1\n", 1, "t.deck:2: unknown key 'data.sed' (did you mean 'data.seed'?)");
    expect_error("steps = 5\n", 1, "t.deck:1: unknown key 'steps' (did you mean 'train.steps'?)");
    expect_error("trian.steps = 5\n", 1, "t.deck:1: unknown key 'trian.steps' (did you mean 'train.steps'?)");
    expect_error("[model]\ncompletely_unrelated = 1\n", 1,
                 "t.deck:2: unknown key 'model.completely_unrelated' (dsmoe --help keys lists them)");
    expect_error("[modle]\n", 1, "t.deck:1: unknown section '[modle]' (did you mean '[model]'?)");
}

static void test_bad_values(void **state) {
    expect_error("[model]\nheads = abc\n", 1, "t.deck:2: model.heads = abc: expected an integer");
    expect_error("model.layers = 1.5\n", 1, "t.deck:1: model.layers = 1.5: expected an integer");
    expect_error("model.layers = 3G\n", 1, "t.deck:1: model.layers = 3G: does not fit in a 32-bit integer");
    expect_error("train.lr = fast\n", 1, "t.deck:1: train.lr = fast: expected a number");
    expect_error("moe.residual = maybe\n", 1,
                 "t.deck:1: moe.residual = maybe: expected a boolean (true/false, yes/no, on/off, 1/0)");
    expect_error("run.mode = serve\n", 1, "t.deck:1: run.mode = serve: expected one of train, eval, generate");
    expect_error("\n[train]\nlr_schedule = step\n", 1,
                 "t.deck:3: train.lr_schedule = step: expected one of cosine, constant, linear");
    expect_error("run.seed = -1\n", 1, "t.deck:1: run.seed = -1: expected an integer >= 0");
    expect_error("moe.experts = 8 x\n", 1,
                 "t.deck:1: moe.experts = 8 x: expected a count (e.g. 8) or a list of 'count xN' items (e.g. 32 x10, 64 x2)");
    expect_error("moe.experts = 0 x2\n", 1,
                 "t.deck:1: moe.experts = 0 x2: an expert count must be >= 1 (0 = dense model only as the whole value)");
}

static void test_ranges(void **state) {
    expect_error("moe.top_k = 3\n", 1, "t.deck:1: moe.top_k = 3: must be 1 or 2");
    expect_error("# x\nmoe.jitter_eps = 1\n", 1, "t.deck:2: moe.jitter_eps = 1: must be in (0, 1)");
    expect_error("train.beta2 = 1\n", 1, "t.deck:1: train.beta2 = 1: must be in [0, 1)");
    expect_error("data.valid_fraction = 0.6\n", 1, "t.deck:1: data.valid_fraction = 0.6: must be in [0, 0.5]");
    expect_error("model.vocab = 1\n", 1, "t.deck:1: model.vocab = 1: must be >= 2");
    expect_error("model.init_std = 0\n", 1, "t.deck:1: model.init_std = 0: must be > 0");
    // checked on the winning value: a bad deck value overridden on the command line is fine
    char *fix[] = {"moe.top_k=1"};
    dsmoe_config c;
    dsmoe_err err = {0};
    if (dsmoe_config_load_text("moe.top_k = 3\n", "t.deck", fix, 1, no_env, 1, &c, NULL, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(c.top_k, 1);
    // Durations are doubles: a fraction of a second is in range (it was read as a float's bits, and
    // 0.2 s was refused as below 0).
    if (load_t("run.watchdog = 0.2\ngenerate.save_every = 1.5h\n", 1, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_true(c.watchdog == 0.2 && c.gen_save_every == 5400.0);
    expect_error("run.watchdog = -1\n", 1, "t.deck:1: run.watchdog = -1: expected a duration (e.g. 30, 30s, 5min, 2h)");
}

static void test_deck_syntax_errors(void **state) {
    expect_error("[train]\nsteps = 1\n\ntrain.steps = 2\n", 1, "t.deck:4: train.steps given twice (first at line 2)");
    char msg[1024];
    snprintf(msg, sizeof msg, "%s:6: train.steps given twice (first at line 2)", DECKS "duplicate.deck");
    dsmoe_config c;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_config_load(DECKS "duplicate.deck", NULL, 0, no_env, 1, &c, NULL, &err), DSMOE_ERR_INVALID);
    assert_string_equal(err.msg, msg);
    expect_error("data.path = ${NOPE}/x\n", 1,
                 "t.deck:1: environment variable 'NOPE' is not set (write ${NOPE:-default} to give a default)");
    expect_error("data.path = ${NOPE\n", 1, "t.deck:1: bad variable reference '${NOPE' (write ${NAME} or ${NAME:-default})");
    expect_error("run.output_dir = \"abc\n", 1, "t.deck:1: unterminated quoted string");
    expect_error("\n\nsteps 100\n", 1, "t.deck:3: expected 'key = value' or '[section]', got 'steps 100'");
    expect_error("[model] layers = 2\n", 1, "t.deck:1: expected '[section]', got '[model] layers = 2'");
    assert_int_equal(dsmoe_config_load("/nonexistent/x.deck", NULL, 0, no_env, 1, &c, NULL, &err), DSMOE_ERR_IO);
    assert_string_equal(err.msg, "cannot open deck '/nonexistent/x.deck': No such file or directory");
}

static void test_cross_key_errors(void **state) {
    expect_error("[model]\nhidden = 100\nheads = 6\n", 1, "t.deck:2: model.hidden = 100: must be divisible by model.heads (6)");
    // model.hidden kept its default: the message points at the key that made the conflict
    expect_error("\nmodel.heads = 5\n", 1, "t.deck:2: model.hidden = 128: must be divisible by model.heads (5)");
    expect_error("[model]\nlayers = 8\n[moe]\nexperts = 32 x10, 64 x2\n", 1,
                 "t.deck:4: moe.experts = 32 x10, 64 x2: the list covers 12 MoE layers but model.layers = 8 "
                 "with moe.every = 2 gives 4");
    expect_error("model.layers = 1\nmoe.experts = 8\n", 1,
                 "t.deck:2: moe.experts = 8: no layer is an MoE layer (model.layers = 1, moe.every = 2)");
    expect_error("model.layers = 600\nmoe.every = 1\nmoe.experts = 8\n", 1,
                 "t.deck:3: moe.experts = 8: model.layers = 600 with moe.every = 1 gives 600 MoE layers, more "
                 "than DSMOE_MAX_MOE_LAYERS (256)");
    expect_error("moe.experts = 4 x1, 1 x1\nmoe.top_k = 2\n", 1,
                 "t.deck:2: moe.top_k = 2: must be <= the experts of every MoE layer (MoE layer 2 has 1)");
    expect_error("moe.experts = 4\nmoe.top_k = 2\nmoe.residual = on\n", 1,
                 "t.deck:3: moe.residual = on: requires moe.top_k = 1 (it is 2)");
    expect_error("moe.experts = 8\nmoe.expert_parallel = 4\n", 2,
                 "t.deck:2: moe.expert_parallel = 4 does not divide the 2 ranks of this run");
    expect_error("[moe]\nexperts = 8 x1, 6 x1\nexpert_parallel = 4\n", 4,
                 "t.deck:3: moe.expert_parallel = 4 does not divide the 6 experts of MoE layer 2 (model layer 4)");
    expect_error("train.batch = 10\ntrain.micro_batch = 3\n", 2,
                 "t.deck:1: train.batch = 10: must be divisible by train.micro_batch (3) x 2 ranks = 6 (it would "
                 "need 1.67 accumulation steps)");
    // every key at its default, and still wrong for 3 ranks: the message names the deck only
    expect_error("", 3, "t.deck: train.batch = 8: must be divisible by the 3 ranks of this run (train.micro_batch = 0 "
                        "means train.batch / ranks)");
    expect_error("train.lr = 1e-4\ntrain.min_lr = 1e-3\n", 1, "t.deck:2: train.min_lr = 1e-3: must be <= train.lr (1e-4)");
    expect_error("data.synthetic_sources = 128\n", 1,
                 "t.deck:1: data.synthetic_sources = 128: must be < model.vocab / 2 (model.vocab = 256)");
    expect_error("data.synthetic_branching = 253\n", 1,
                 "t.deck:1: data.synthetic_branching = 253: must be <= model.vocab - data.synthetic_sources (252)");
    expect_error("[data]\nsource = megatron\n", 1, "t.deck:2: data.path is empty: it is required when data.source = megatron");
}

// ---------------------------------------------------------------------------------------------------
// Overrides and sources

static void test_overrides(void **state) {
    const char *deck = "train.steps = 20\nmodel.layers = 6\nmodel.hidden = 64\n";
    char *env[] = {"DSMOE_TRAIN_STEPS=50", "DSMOE_MODEL_LAYERS=2", "DSMOE_PLUGIN_PATH=/not/a/key",
                   "DSMOE_NOT_A_KEY=1", "DSMOE_RUN_PLUGIN_PATH=/p", "HOME=/root", NULL};
    dsmoe_config c;
    dsmoe_err err = {0};
    if (dsmoe_config_load_text(deck, "t.deck", NULL, 0, env, 1, &c, NULL, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(c.steps, 50); // environment beats the deck
    assert_int_equal(c.layers, 2);
    assert_string_equal(c.plugin_path, "/p");
    char *argv[] = {"train.steps=7", "train.batch=4K", "train.steps=9"};
    dsmoe_config_sources *src = NULL;
    if (dsmoe_config_load_text(deck, "t.deck", argv, 3, env, 1, &c, &src, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(c.steps, 9); // the command line beats the environment; its later value wins
    assert_int_equal(c.batch, 4000);
    char *text = dsmoe_config_to_text(&c, src);
    assert_non_null(text);
    assert_true(ends_with(line_of(text, "steps = 9 "), "# command line"));
    assert_true(ends_with(line_of(text, "batch = 4000 "), "# command line"));
    assert_true(ends_with(line_of(text, "layers = 2 "), "# env DSMOE_MODEL_LAYERS"));
    assert_true(ends_with(line_of(text, "hidden = 64 "), "# deck t.deck:3"));
    assert_true(ends_with(line_of(text, "seq_len = 128 "), "# default"));
    free(text);
    dsmoe_config_sources_free(src);

    char *bad_env[] = {"DSMOE_TRAIN_STEPS=x", NULL};
    expect_full("", NULL, 0, bad_env, 1, "environment DSMOE_TRAIN_STEPS: train.steps = x: expected an integer");
    // A variable of a section's prefix that names no key is a misspelt override, refused as the deck's
    // unknown keys are, wherever it stands among the others; one of no section is not an override.
    char *typo_env[] = {"DSMOE_TRAIN_STEPS=5", "DSMOE_TRAIN_STEPZ=3", "DSMOE_DECK=x.deck", NULL};
    expect_full("", NULL, 0, typo_env, 1, "environment DSMOE_TRAIN_STEPZ: unknown key 'train.stepz' (did you mean 'train.steps'?)");
    char *typo_first[] = {"DSMOE_MOE_TOPK=2", "DSMOE_TRAIN_STEPS=5", NULL};
    expect_full("", NULL, 0, typo_first, 1, "environment DSMOE_MOE_TOPK: unknown key 'moe.topk' (did you mean 'moe.top_k'?)");
    char *far_env[] = {"DSMOE_CHECKPOINT_WHATEVER_IT_IS=1", NULL};
    expect_full("", NULL, 0, far_env, 1,
                "environment DSMOE_CHECKPOINT_WHATEVER_IT_IS: unknown key 'checkpoint.whatever_it_is' (dsmoe --help keys lists them)");
    char *bare_section[] = {"DSMOE_TRAIN=1", "DSMOE_TRAIN_=1", "DSMOE_TRAINING_STEPS=1", NULL};
    if (dsmoe_config_load_text("", "t.deck", NULL, 0, bare_section, 1, &c, NULL, &err) != DSMOE_OK) // not overrides
        fail_msg("%s", err.msg);
    char *bad_argv[] = {"train.steps=x"};
    expect_full("", bad_argv, 1, NULL, 1, "command line: train.steps = x: expected an integer");
    char *typo_argv[] = {"train.step=3"};
    expect_full("", typo_argv, 1, NULL, 1, "command line: unknown key 'train.step' (did you mean 'train.steps'?)");
    char *no_eq[] = {"train.steps"};
    expect_full("", no_eq, 1, NULL, 1, "command line: 'train.steps': expected key=value");
    char *cross[] = {"moe.top_k=2"};
    expect_full("moe.experts = 4\nmoe.residual = true\n", cross, 1, NULL, 1,
                "t.deck:2: moe.residual = true: requires moe.top_k = 1 (it is 2)");
    char *ep[] = {"moe.expert_parallel=3"};
    expect_full("moe.experts = 6\n", ep, 1, NULL, 2, "command line: moe.expert_parallel = 3 does not divide the 2 ranks of this run");
}

// Every DSMOE_ variable name a key maps to is distinct (train.eval_every and a key train_eval.every
// would collide).
static void test_env_names_unique(void **state) {
    int n = dsmoe_config_key_count();
    assert_true(n > 50);
    char (*names)[96] = calloc((size_t)n, 96);
    for (int i = 0; i < n; i++) {
        const char *k = dsmoe_config_key(i).name;
        snprintf(names[i], 96, "DSMOE_%s", k);
        for (char *p = names[i]; *p; p++) *p = *p == '.' ? '_' : (char)(*p >= 'a' && *p <= 'z' ? *p - 32 : *p);
        for (int j = 0; j < i; j++) assert_string_not_equal(names[i], names[j]);
    }
    free(names);
    assert_null(dsmoe_config_key(n).name);
}

// Derived values: 4 * hidden, the parameter state and the activations must fit their types.
static void test_derived_overflow(void **state) {
    expect_error("model.hidden = 600000000\n", 1,
                 "t.deck:1: model.hidden = 600000000: model.ffn_hidden = 0 makes the FFN width 4 * model.hidden = "
                 "2400000000, which does not fit in a 32-bit integer");
    // a wide model whose sizes fit loads, resolves ffn_hidden, and prints a deck that loads back
    dsmoe_config c;
    dsmoe_err err = {0};
    if (load_t("model.hidden = 100000000\nmodel.vocab = 16\nmodel.layers = 1\n", 1, &c, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(c.ffn_hidden, 400000000);
    round_trip(&c, NULL, 1);
    // 4 layers of 4 * 600000000^2 attention weights: 5.8e18 parameters, 9.2e19 bytes with grads and AdamW
    expect_error("model.hidden = 600000000\nmodel.ffn_hidden = 4\n", 1,
                 "t.deck:1: model.hidden = 600000000: with model.layers = 4, model.vocab = 256, model.ffn_hidden = 4 "
                 "and moe.experts = 0 the parameters, their gradients and AdamW state (16 bytes each) need more "
                 "than 2^63 bytes");
    expect_error("model.hidden = 8\nmodel.ffn_hidden = 2000000000\nmoe.experts = 2000000000\n", 1,
                 "t.deck:1: model.hidden = 8: with model.layers = 4, model.vocab = 256, model.ffn_hidden = 2000000000 "
                 "and moe.experts = 2000000000 the parameters, their gradients and AdamW state (16 bytes each) need "
                 "more than 2^63 bytes");
    expect_error("model.seq_len = 2000000000\ntrain.batch = 8\n", 2,
                 "t.deck:1: model.seq_len = 2000000000: 4 sequences per micro-step x 2000000000 tokens = 8000000000 "
                 "tokens, more than a 32-bit count holds (lower train.micro_batch or model.seq_len)");
    expect_error("model.vocab = 2000000000\nmodel.seq_len = 2000000000\n", 0,
                 "t.deck:2: model.seq_len = 2000000000: the activations of 1 sequences per micro-step (model.hidden "
                 "= 128, model.ffn_hidden = 512, model.vocab = 2000000000, model.layers = 4) need more than 2^63 bytes");
    // an empty output directory is refused here, not at mkdir time as "cannot create directory : ..."
    expect_error("run.output_dir = \"\"\n", 1, "t.deck:1: run.output_dir is empty: give a directory (the default is dsmoe_out)");
    assert_int_equal(dsmoe_mkdir_p("", &err), DSMOE_ERR_INVALID);
    assert_string_equal(err.msg, "cannot create a directory: the path is empty");
}

// ---------------------------------------------------------------------------------------------------
// Docs and shipped decks

// Rows "| `section.key` | type ... | `default` | ..." of docs/deck.md must match the table exactly.
static void test_docs_list_every_key(void **state) {
    FILE *f = fopen(DSMOE_TEST_SOURCE_DIR "/docs/deck.md", "r");
    assert_non_null(f);
    int n = dsmoe_config_key_count();
    int *seen = calloc((size_t)n, sizeof *seen);
    char line[2048];
    int rows = 0;
    while (fgets(line, sizeof line, f)) {
        char name[128], type[256], def[256];
        if (sscanf(line, "| `%127[a-z0-9_.]` | %255[^|]| %255[^|]|", name, type, def) != 3 || !strchr(name, '.'))
            continue;
        rows++;
        int k = -1;
        for (int i = 0; i < n; i++)
            if (strcmp(dsmoe_config_key(i).name, name) == 0) k = i;
        if (k < 0) fail_msg("docs/deck.md documents '%s', which is not a key", name);
        if (seen[k]++) fail_msg("docs/deck.md documents '%s' twice", name);
        dsmoe_config_key_info info = dsmoe_config_key(k);
        if (strncmp(type, info.type, strlen(info.type)) != 0)
            fail_msg("docs/deck.md: %s has type '%s', the table says %s", name, type, info.type);
        char want[256];
        snprintf(want, sizeof want, "`%s` ", info.default_text[0] ? info.default_text : "\"\"");
        if (strcmp(def, want) != 0) fail_msg("docs/deck.md: %s has default '%s', the table says %s", name, def, want);
    }
    fclose(f);
    for (int i = 0; i < n; i++)
        if (!seen[i]) fail_msg("docs/deck.md does not document %s", dsmoe_config_key(i).name);
    assert_int_equal(rows, n);
    free(seen);
}

// inputs/example-full.deck loads, and sets every key itself (no line of its print says "default");
// inputs/quickstart.deck and tests/decks/pyramid.deck load.
static void test_example_deck(void **state) {
    dsmoe_config c;
    dsmoe_config_sources *src = NULL;
    dsmoe_err err = {0};
    if (dsmoe_config_load(DSMOE_TEST_SOURCE_DIR "/inputs/example-full.deck", NULL, 0, no_env, 1, &c, &src, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    char *text = dsmoe_config_to_text(&c, src);
    if (strstr(text, "# default")) fail_msg("inputs/example-full.deck leaves keys at their defaults:\n%s", text);
    free(text);
    dsmoe_config_sources_free(src);
    for (int ws = 1; ws <= 2; ws++)
        if (dsmoe_config_load(DSMOE_TEST_SOURCE_DIR "/inputs/quickstart.deck", NULL, 0, no_env, ws, &c, NULL, &err) != DSMOE_OK)
            fail_msg("%s", err.msg);
    if (dsmoe_config_load(DECKS "pyramid.deck", NULL, 0, no_env, 4, &c, NULL, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(c.n_moe_layers, 6);
    assert_int_equal(c.experts[3], 4);
    assert_int_equal(c.experts[4], 8);
    assert_int_equal(c.residual, 1);
}

// ---------------------------------------------------------------------------------------------------
// Derived quantities

static void test_moe_layers(void **state) {
    dsmoe_config c;
    dsmoe_err err = {0};
    if (load_t("model.layers = 7\nmoe.every = 3\nmoe.experts = 4 x1, 8 x1\n", 1, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    // 1-based layers 3 and 6 are MoE: 0-based 2 and 5
    const int want[7] = {-1, -1, 0, -1, -1, 1, -1};
    for (int l = 0; l < 7; l++) {
        int mi = 99;
        assert_int_equal(dsmoe_config_is_moe_layer(&c, l, &mi), want[l] >= 0);
        assert_int_equal(mi, want[l]);
    }
    assert_false(dsmoe_config_is_moe_layer(&c, 7, NULL));
    assert_false(dsmoe_config_is_moe_layer(&c, -1, NULL));
    assert_int_equal(c.experts[1], 8);
    if (load_t("model.layers = 4\n", 1, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg); // dense
    for (int l = 0; l < 4; l++) assert_false(dsmoe_config_is_moe_layer(&c, l, NULL));
}

// moe.expert_parallel per MoE layer (PR-MoE): the moe.experts list syntax, one value per MoE layer.
static void test_expert_parallel_list(void **state) {
    dsmoe_config c;
    dsmoe_err err = {0};
    const char *deck = "model.layers = 4\nmoe.experts = 4 x1, 8 x1\nmoe.expert_parallel = 2 x1, 8 x1\n";
    if (load_t(deck, 8, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(c.n_moe_layers, 2);
    assert_int_equal(c.expert_parallel[0], 2);
    assert_int_equal(c.expert_parallel[1], 8);
    char *text = dsmoe_config_to_text(&c, NULL);
    assert_string_equal(line_of(text, "expert_parallel = "), "expert_parallel = 2 x1, 8 x1");
    free(text);
    round_trip(&c, NULL, 8);
    // a bare value is every layer's; a list of equal values prints as one
    if (load_t("model.layers = 6\nmoe.experts = 8\nmoe.expert_parallel = 4\n", 4, &c, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    for (int i = 0; i < 3; i++) assert_int_equal(c.expert_parallel[i], 4);
    dsmoe_config same;
    if (load_t("model.layers = 6\nmoe.experts = 8\nmoe.expert_parallel = 4 x2, 4\n", 4, &same, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    assert_memory_equal(&c, &same, sizeof c);
    text = dsmoe_config_to_text(&same, NULL);
    assert_string_equal(line_of(text, "expert_parallel = "), "expert_parallel = 4");
    free(text);
    round_trip(&same, NULL, 4);
    // 32 experts with ep 32 on 10 layers and 64 with ep 64 on 2, on 64 ranks
    if (load_t("model.layers = 12\nmoe.every = 1\nmoe.experts = 32 x10, 64 x2\nmoe.expert_parallel = 32 x10, 64 x2\n"
               "train.batch = 64\n", 64, &c, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(c.expert_parallel[9], 32);
    assert_int_equal(c.expert_parallel[10], 64);

    expect_error("[moe]\nexperts = 8 x1, 6 x1\nexpert_parallel = 2 x1, 4 x1\n", 4,
                 "t.deck:3: moe.expert_parallel = 2 x1, 4 x1: 4 (MoE layer 2, model layer 4) does not divide the 6 "
                 "experts of that layer");
    expect_error("[moe]\nexperts = 8\nexpert_parallel = 2 x1, 8 x1\n", 4,
                 "t.deck:3: moe.expert_parallel = 2 x1, 8 x1: 8 (MoE layer 2, model layer 4) does not divide the 4 "
                 "ranks of this run");
    expect_error("[moe]\nexperts = 8\nexpert_parallel = 2 x3\n", 2,
                 "t.deck:3: moe.expert_parallel = 2 x3: the list covers 3 MoE layers but the model has 2 "
                 "(moe.experts = 8)");
    expect_error("moe.expert_parallel = 0\n", 1, "t.deck:1: moe.expert_parallel = 0: must be >= 1");
    expect_error("moe.experts = 8\nmoe.expert_parallel = 2 x1, 0 x1\n", 1,
                 "t.deck:2: moe.expert_parallel = 2 x1, 0 x1: every expert-parallel size must be >= 1");
    expect_error("moe.expert_parallel = two\n", 1,
                 "t.deck:1: moe.expert_parallel = two: expected a rank count (e.g. 8) or a list of 'ep xN' items "
                 "(e.g. 32 x10, 64 x2)");
    expect_error("[moe]\nexperts = 8\nexpert_parallel = 4 x1, 2 x1\nalltoall = hierarchical\nranks_per_node = 4\n", 4,
                 "t.deck:5: moe.ranks_per_node = 4 does not divide moe.expert_parallel of MoE layer 2 (2), which "
                 "moe.alltoall = hierarchical needs");
}

static void test_capacity(void **state) {
    dsmoe_config c;
    dsmoe_err err = {0};
    if (load_t("moe.experts = 8\nmoe.eval_capacity_factor = 2\n", 1, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(dsmoe_config_capacity(&c, 128, 8, 1), 16); // 128/8 * 1 * 1.0
    assert_int_equal(dsmoe_config_capacity(&c, 100, 8, 1), 13); // 12.5 rounds up
    assert_int_equal(dsmoe_config_capacity(&c, 128, 8, 0), 32); // eval factor 2
    assert_int_equal(dsmoe_config_capacity(&c, 8, 8, 1), 4);    // 1, raised to min_capacity
    c.top_k = 2;
    assert_int_equal(dsmoe_config_capacity(&c, 100, 8, 1), 25);
    c.top_k = 1;
    c.capacity_factor = 1.1f; // 1.10000002: 100/10*1.1 must still be 11
    assert_int_equal(dsmoe_config_capacity(&c, 100, 10, 1), 11);
    c.capacity_factor = 1.25f;
    assert_int_equal(dsmoe_config_capacity(&c, 100, 10, 1), 13); // 12.5
    c.min_capacity = 0;
    assert_int_equal(dsmoe_config_capacity(&c, 1, 64, 1), 1);
    // The rule on plain numbers, which the MoE layer uses.
    assert_int_equal(dsmoe_capacity(100, 10, 1, 1.1f, 0), 11);
    assert_int_equal(dsmoe_capacity(100, 10, 2, 1.1f, 0), 22);
    assert_int_equal(dsmoe_capacity(100, 8, 1, 1.0f, 0), 13);
    assert_int_equal(dsmoe_capacity(8, 8, 1, 1.0f, 4), 4);
    assert_int_equal(dsmoe_capacity(0, 8, 2, 1.0f, 0), 0);
    assert_int_equal(dsmoe_capacity(2000000000, 1, 2, 2.0f, 0), 2147483647); // clamped to INT32_MAX
}

// moe.aux_loss_scope, moe.alltoall, moe.ranks_per_node: defaults, values, errors.
static void test_moe_exchange_keys(void **state) {
    dsmoe_config c;
    dsmoe_err err = {0};
    if (load_t("", 1, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(c.aux_loss_scope, 0); // batch (DSMOE_AUX_SCOPE_BATCH)
    assert_int_equal(c.alltoall, 2);       // auto (DSMOE_A2A_AUTO)
    assert_int_equal(c.ranks_per_node, 0);
    if (load_t("[moe]\nexperts = 8\nexpert_parallel = 4\naux_loss_scope = rank\nalltoall = hierarchical\n"
               "ranks_per_node = 2\n", 4, &c, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(c.aux_loss_scope, 1); // DSMOE_AUX_SCOPE_RANK
    assert_int_equal(c.alltoall, 1);       // DSMOE_A2A_HIERARCHICAL
    assert_int_equal(c.ranks_per_node, 2);
    if (load_t("moe.alltoall = flat\n", 1, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(c.alltoall, 0);
    expect_error("moe.aux_loss_scope = global\n", 1, "t.deck:1: moe.aux_loss_scope = global: expected one of batch, rank");
    expect_error("moe.alltoall = ring\n", 1, "t.deck:1: moe.alltoall = ring: expected one of flat, hierarchical, auto");
    expect_error("moe.ranks_per_node = -1\n", 1, "t.deck:1: moe.ranks_per_node = -1: must be >= 0");
    expect_error("moe.experts = 8\nmoe.expert_parallel = 4\nmoe.alltoall = hierarchical\nmoe.ranks_per_node = 3\n", 4,
                 "t.deck:4: moe.ranks_per_node = 3 does not divide moe.expert_parallel (4), which moe.alltoall = "
                 "hierarchical needs");
    // auto (the default) takes flat instead at run time: no error here.
    if (load_t("moe.experts = 8\nmoe.expert_parallel = 4\nmoe.ranks_per_node = 3\n", 4, &c, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_good_deck),
        cmocka_unit_test(test_syntax_details),
        cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_ranges),
        cmocka_unit_test(test_deck_syntax_errors),
        cmocka_unit_test(test_cross_key_errors),
        cmocka_unit_test(test_overrides),
        cmocka_unit_test(test_env_names_unique),
        cmocka_unit_test(test_derived_overflow),
        cmocka_unit_test(test_docs_list_every_key),
        cmocka_unit_test(test_example_deck),
        cmocka_unit_test(test_moe_layers),
        cmocka_unit_test(test_expert_parallel_list),
        cmocka_unit_test(test_capacity),
        cmocka_unit_test(test_moe_exchange_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
