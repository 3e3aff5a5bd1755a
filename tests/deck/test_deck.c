// tests/deck/test_deck.c: the deck parser and the configuration registry (core/deck/config.c, core/deck/deck.c).
// Good decks parse to hand-written values; each kind of bad deck gives its exact message; overrides
// win in the documented order; the printed configuration loads back to the same struct; the key
// table and docs/deck.md list the same keys with the same types and defaults.
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "config.h"
#include "test_tmpdir.h"

#define DECKS DSMOE_TEST_SOURCE_DIR "/tests/decks/"

static char *const no_env[] = {NULL};

// Loads deck text named "t.deck" with no environment.
static dsmoe_status load_t(const char *text, int ws, dsmoe_config *cfg, dsmoe_err *err) {
    return dsmoe_config_load_text(text, "t.deck", NULL, 0, no_env, ws, cfg, NULL, err);
}

static void expect_full(const char *text, char *const *argv, int n, char *const *envp, int ws, const char *msg) {
    dsmoe_config cfg;
    dsmoe_err err = {0};
    dsmoe_status st = dsmoe_config_load_text(text, "t.deck", argv, n, envp ? envp : no_env, ws, &cfg, NULL, &err);
    if (st == DSMOE_OK) fail_msg("deck loaded, expected: %s\n--- deck:\n%s", msg, text);
    assert_int_equal(st, DSMOE_ERR_INVALID);
    if (strcmp(err.msg, msg) != 0) fail_msg("message\n  got:      %s\n  expected: %s", err.msg, msg);
}

static void expect_error(const char *text, int ws, const char *msg) { expect_full(text, NULL, 0, NULL, ws, msg); }

// The line of text that starts with prefix (static buffer), or fails.
static const char *line_of(const char *text, const char *prefix) {
    static char line[512];
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (strncmp(p, prefix, strlen(prefix)) == 0) {
            size_t n = strcspn(p, "\n");
            snprintf(line, sizeof line, "%.*s", (int)n, p);
            return line;
        }
    }
    fail_msg("no line starts with '%s' in:\n%s", prefix, text);
    return NULL;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

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

// ---------------------------------------------------------------------------------------------------
// Printing

static void round_trip(const dsmoe_config *c, const dsmoe_config_sources *src, int ws) {
    char *text = dsmoe_config_to_text(c, src);
    assert_non_null(text);
    dsmoe_config back;
    dsmoe_err err = {0};
    memset(&back, 0xab, sizeof back);
    if (dsmoe_config_load_text(text, "printed.deck", NULL, 0, no_env, ws, &back, NULL, &err) != DSMOE_OK)
        fail_msg("%s\n--- printed:\n%s", err.msg, text);
    if (memcmp(c, &back, sizeof back) != 0) fail_msg("printed deck loads differently:\n%s", text);
    char *again = dsmoe_config_to_text(&back, NULL), *plain = dsmoe_config_to_text(c, NULL);
    assert_string_equal(again, plain);
    free(again);
    free(plain);
    free(text);
}


// ---------------------------------------------------------------------------------------------------
// The printed configuration loads back: random valid configurations

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) { // splitmix64: fixed seed, so a failure reproduces
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static int rint_in(int lo, int hi) { return lo + (int)(rnd() % (uint64_t)(hi - lo + 1)); } // [lo, hi]
static double runit(void) { return (double)(rnd() >> 11) / 9007199254740992.0; }             // [0, 1)

// An int written in one of the forms the deck takes for it.
static void put_int(char **p, const char *key, long v) {
    int form = rint_in(0, 5);
    if (form == 1 && v != 0 && v % 1000 == 0) *p += sprintf(*p, "%s = %ldK\n", key, v / 1000);
    else if (form == 2 && v != 0 && v % 1024 == 0) *p += sprintf(*p, "%s = %ldKi\n", key, v / 1024);
    else if (form == 3 && v != 0 && v % 10 == 0) *p += sprintf(*p, "%s = %lde1\n", key, v / 10);
    else if (form == 4) *p += sprintf(*p, "%s = %ld.0\n", key, v);
    else *p += sprintf(*p, "%s = %ld\n", key, v);
}

// A float in [lo, hi) (or, with log, spread over decades), written with enough digits.
static void put_float(char **p, const char *key, double lo, double hi, int log) {
    double u = runit();
    float f = (float)(log ? lo * pow(hi / lo, u) : lo + (hi - lo) * u);
    if (f >= (float)hi) f = (float)lo;
    *p += sprintf(*p, "%s = %.9g\n", key, (double)f);
}

// A string of 0..max characters (at least one when nonempty), with the characters that need quoting.
static void put_string(char **p, const char *key, int max, int nonempty) {
    static const char *const pieces[] = {"a", "Z", "9", "_", "/", ".", "-", " ", "#", "\"", "\\", "$", "${X}", "=",
                                         "[", "]", ":", ",", "'", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80"};
    char v[600] = "", q[1300];
    int n = rint_in(nonempty, max);
    for (int i = 0; i < n; i++) {
        const char *piece = pieces[rint_in(0, (int)(sizeof pieces / sizeof *pieces) - 1)];
        if (strlen(v) + strlen(piece) < sizeof v) strcat(v, piece);
    }
    dsmoe_deck_format_string(v, q, sizeof q);
    *p += sprintf(*p, "%s = %s\n", key, q);
}

// One random configuration that satisfies every rule for world size ws, as deck text.
static void random_deck(char *deck, int ws) {
    static const char *const bools[] = {"true", "false", "yes", "no", "on", "off", "1", "0", "TRUE", "Off"};
    char *p = deck;
    p += sprintf(p, "[run]\nmode = %s\n", rint_in(0, 1) ? "train" : "eval");
    p += sprintf(p, "seed = %" PRIu64 "\n", rnd() >> rint_in(0, 63));
    put_string(&p, "output_dir", 40, 1);
    put_int(&p, "threads", rint_in(0, 64));
    put_int(&p, "log_every", rint_in(1, 5000));
    put_string(&p, "kernel_backend", 10, 0);
    put_string(&p, "comm_backend", 10, 0);
    put_string(&p, "plugin_path", 60, 0);

    int heads = rint_in(1, 16), hidden = heads * rint_in(1, 96), layers = rint_in(1, 48), every = rint_in(1, 4);
    int vocab = rint_in(4, 70000);
    p += sprintf(p, "[model]\n");
    put_int(&p, "vocab", vocab);
    put_int(&p, "seq_len", rint_in(1, 4096));
    put_int(&p, "layers", layers);
    put_int(&p, "hidden", hidden);
    put_int(&p, "heads", heads);
    put_int(&p, "ffn_hidden", rint_in(0, 3) ? 0 : rint_in(1, 100000));
    put_float(&p, "init_std", 1e-6, 10, 1);
    put_float(&p, "ln_eps", 1e-12, 1e-1, 1);

    // experts: dense, one count, or a list over the n MoE layers; ep divides ws and every count
    int n = layers / every, counts[DSMOE_MAX_MOE_LAYERS], kind = n == 0 ? 0 : rint_in(0, 2), min_e = 1 << 30;
    int ep = 1 << rint_in(0, 3);
    while (ws % ep) ep /= 2;
    char ex[4096] = "0";
    if (kind == 1) {
        int e = ep * rint_in(1, 16);
        sprintf(ex, "%d", e);
        min_e = e;
    } else if (kind == 2) {
        size_t m = 0;
        for (int l = 0; l < n;) {
            int e = ep * rint_in(1, 16), r = rint_in(1, n - l);
            for (int j = 0; j < r; j++) counts[l + j] = e;
            m += (size_t)sprintf(ex + m, "%s%d x%d", l ? ", " : "", e, r);
            l += r;
            if (e < min_e) min_e = e;
        }
    }
    int top_k = min_e >= 2 && rint_in(0, 1) ? 2 : 1;
    p += sprintf(p, "[moe]\nexperts = %s\n", ex);
    put_int(&p, "every", every);
    put_int(&p, "top_k", top_k);
    put_float(&p, "capacity_factor", 0.01, 8, 0);
    put_float(&p, "eval_capacity_factor", 0.01, 8, 0);
    put_int(&p, "min_capacity", rint_in(0, 1000));
    p += sprintf(p, "drop_tokens = %s\n", bools[rint_in(0, 9)]);
    p += sprintf(p, "token_selection = %s\n", rint_in(0, 1) ? "position" : "random");
    p += sprintf(p, "noise = %s\n", (const char *[]){"none", "jitter", "rsample"}[rint_in(0, 2)]);
    put_float(&p, "jitter_eps", 1e-4, 0.999, 0);
    put_float(&p, "aux_loss_coeff", 0, 1, 0);
    p += sprintf(p, "residual = %s\n", top_k == 1 && rint_in(0, 1) ? "true" : "false");
    p += sprintf(p, "expert_parallel = %d\n", ep);
    p += sprintf(p, "aux_loss_scope = %s\n", rint_in(0, 1) ? "batch" : "rank");
    int a2a = rint_in(0, 2);
    p += sprintf(p, "alltoall = %s\n", (const char *[]){"flat", "hierarchical", "auto"}[a2a]);
    put_int(&p, "ranks_per_node", a2a == 1 ? (rint_in(0, 1) ? ep : 0) : rint_in(0, 16));

    p += sprintf(p, "[topology]\nbind = %s\n", (const char *[]){"auto", "cores", "none"}[rint_in(0, 2)]);
    p += sprintf(p, "[plan]\n");
    put_int(&p, "nodes", rint_in(1, 4096));
    put_int(&p, "ranks_per_node", rint_in(0, 64));
    put_string(&p, "topology", 30, 0);
    p += sprintf(p, "memory_per_rank = %" PRIu64 "\n", rnd() >> rint_in(0, 63));

    int micro = rint_in(0, 8), batch = (micro ? micro : rint_in(1, 8)) * ws * rint_in(1, 4);
    p += sprintf(p, "[train]\n");
    put_int(&p, "steps", rint_in(0, 1000000));
    put_int(&p, "batch", batch);
    put_int(&p, "micro_batch", micro);
    double u = runit();
    float lr = (float)(1e-6 * pow(1e5, u)), min_lr = (float)(lr * runit());
    p += sprintf(p, "lr = %.9g\nmin_lr = %.9g\n", (double)lr, (double)min_lr);
    put_int(&p, "warmup_steps", rint_in(0, 10000));
    p += sprintf(p, "lr_schedule = %s\n", (const char *[]){"cosine", "constant", "linear"}[rint_in(0, 2)]);
    put_int(&p, "decay_steps", rint_in(0, 100000));
    put_float(&p, "beta1", 0, 0.9999, 0);
    put_float(&p, "beta2", 0, 0.9999, 0);
    put_float(&p, "adam_eps", 1e-30, 1, 1);
    put_float(&p, "weight_decay", 0, 1, 0);
    put_float(&p, "grad_clip", 0, 100, 0);
    put_int(&p, "zero_stage", rint_in(0, 1));
    p += sprintf(p, "overlap_grad_reduce = %s\n", bools[rint_in(0, 9)]);
    put_int(&p, "eval_every", rint_in(0, 1000));
    put_int(&p, "eval_batches", rint_in(1, 100));

    int src = rint_in(0, 2), sources = rint_in(1, (vocab - 1) / 2);
    if (2 * sources >= vocab) sources = 1;
    p += sprintf(p, "[data]\nsource = %s\n", (const char *[]){"synthetic", "text", "megatron"}[src]);
    put_string(&p, "path", 100, src != 0);
    put_float(&p, "valid_fraction", 0, 0.5, 0);
    put_int(&p, "synthetic_sources", sources);
    put_int(&p, "synthetic_branching", rint_in(1, vocab - sources));
    p += sprintf(p, "seed = %" PRIu64 "\n", rnd() >> rint_in(0, 63));

    p += sprintf(p, "[checkpoint]\n");
    put_int(&p, "every", rint_in(0, 1000));
    put_int(&p, "keep", rint_in(1, 10));
    put_string(&p, "dir", 40, 0);
    put_string(&p, "resume", 40, 0);
    p += sprintf(p, "final = %s\n", bools[rint_in(0, 9)]);
    p += sprintf(p, "[metrics]\n");
    put_string(&p, "file", 40, 0);
    (void)counts;
}

static void test_print_round_trip_random(void **state) {
    static char deck[32768];
    int loaded = 0;
    for (int it = 0; it < 400; it++) {
        int ws = 1 << rint_in(0, 3);
        random_deck(deck, ws);
        dsmoe_config c;
        dsmoe_config_sources *src = NULL;
        dsmoe_err err = {0};
        if (dsmoe_config_load_text(deck, "random.deck", NULL, 0, no_env, ws, &c, &src, &err) != DSMOE_OK)
            fail_msg("iteration %d: the generated deck does not load: %s\n--- deck:\n%s", it, err.msg, deck);
        loaded++;
        round_trip(&c, src, ws);   // with the source comments
        round_trip(&c, NULL, ws);  // and without
        dsmoe_config_sources_free(src);
    }
    assert_int_equal(loaded, 400);
}

static void test_print_round_trip(void **state) {
    char *env[] = {"SCRATCH=/scratch/u1", NULL};
    dsmoe_config c;
    dsmoe_config_sources *src = NULL;
    dsmoe_err err = {0};
    if (dsmoe_config_load(DECKS "good.deck", NULL, 0, env, 2, &c, &src, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    char *text = dsmoe_config_to_text(&c, src);
    assert_string_equal(line_of(text, "experts = "), "experts = 8 x2, 16 x3, 32 x1            # deck " DECKS "good.deck:20");
    assert_true(ends_with(line_of(text, "path = "), "# deck " DECKS "good.deck:39"));
    assert_non_null(strstr(text, "\n[moe]\n"));
    free(text);
    round_trip(&c, src, 2);
    dsmoe_config_sources_free(src);

    // strings that need quoting, floats that need digits, a dense model
    char *argv[] = {"run.output_dir= a#b\"c\\d${X}$ ", "checkpoint.dir=", "train.lr=0.1", "train.weight_decay=3.3e-7"};
    if (dsmoe_config_load_text("", "t.deck", argv, 4, no_env, 1, &c, NULL, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_string_equal(c.output_dir, " a#b\"c\\d${X}$ ");
    round_trip(&c, NULL, 1);
    text = dsmoe_config_to_text(&c, NULL);
    assert_string_equal(line_of(text, "output_dir = "), "output_dir = \" a#b\\\"c\\\\d\\${X}\\$ \"");
    assert_string_equal(line_of(text, "lr = "), "lr = 0.1");
    assert_string_equal(line_of(text, "experts = "), "experts = 0");
    free(text);

    // print to a FILE gives the same text as to_text
    FILE *f = tmpfile();
    assert_int_equal(dsmoe_config_print(f, &c, NULL), DSMOE_OK);
    long n = ftell(f);
    rewind(f);
    char *buf = calloc(1, (size_t)n + 1);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    text = dsmoe_config_to_text(&c, NULL);
    assert_string_equal(buf, text);
    free(buf);
    free(text);
}


// ---------------------------------------------------------------------------------------------------
// Reading deck files: bytes, line ends, pipes

// Loads the file at path; on failure returns the status and leaves the message in err.
static dsmoe_status load_file(const char *path, dsmoe_config *c, dsmoe_err *err) {
    return dsmoe_config_load(path, NULL, 0, no_env, 1, c, NULL, err);
}

static void expect_file_error(const char *name, const void *bytes, size_t n, dsmoe_status want, const char *msg_after_path) {
    const char *path = path_of(name);
    write_bytes(path, bytes, n);
    dsmoe_config c;
    dsmoe_err err = {0};
    dsmoe_status st = load_file(path, &c, &err);
    if (st == DSMOE_OK) fail_msg("%s loaded, expected: %s", name, msg_after_path);
    assert_int_equal(st, want);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s%s", path, msg_after_path);
    if (strcmp(err.msg, msg) != 0) fail_msg("message\n  got:      %s\n  expected: %s", err.msg, msg);
}

static void test_read_bytes(void **state) {
    // a NUL byte ends a C string: the loader must see it, not load lines 1-2 as the whole deck
    const char nul[] = "model.layers = 6\ntrain.steps = 3\nmodel.hidden = 6\0004\n";
    expect_file_error("nul.deck", nul, sizeof nul - 1, DSMOE_ERR_INVALID,
                      ":3: NUL byte at column 17: a deck is text (is this the right file?)");
    char zeros[4096] = {0}; // a zero-filled file is not an empty deck
    expect_file_error("zeros.deck", zeros, sizeof zeros, DSMOE_ERR_INVALID,
                      ":1: NUL byte at column 1: a deck is text (is this the right file?)");
    const char latin1[] = "# ok\r\nrun.output_dir = caf\xe9\r\n";
    expect_file_error("latin1.deck", latin1, sizeof latin1 - 1, DSMOE_ERR_INVALID,
                      ":2: invalid UTF-8 (byte 0xe9 at column 21): the deck must be UTF-8 text");
    const char cr_nul[] = "a = 1\rb\000\r"; // lone CRs end lines in the byte check too
    expect_file_error("crnul.deck", cr_nul, sizeof cr_nul - 1, DSMOE_ERR_INVALID,
                      ":2: NUL byte at column 2: a deck is text (is this the right file?)");
    // in memory (dsmoe_config_load_text): invalid UTF-8 named by line; overlong, surrogate, > U+10FFFF
    expect_error("\n\nrun.output_dir = \xc0\xaf\n", 1,
                 "t.deck:3: invalid UTF-8 (byte 0xc0 at column 18): the deck must be UTF-8 text");
    expect_error("run.output_dir = \xed\xa0\x80\n", 1,
                 "t.deck:1: invalid UTF-8 (byte 0xed at column 18): the deck must be UTF-8 text");
    expect_error("run.output_dir = \xf4\x90\x80\x80\n", 1,
                 "t.deck:1: invalid UTF-8 (byte 0xf4 at column 18): the deck must be UTF-8 text");
    expect_error("run.output_dir = \xe2\x82\n", 1, // truncated sequence
                 "t.deck:1: invalid UTF-8 (byte 0xe2 at column 18): the deck must be UTF-8 text");
    // valid UTF-8 of every length passes
    dsmoe_config c;
    dsmoe_err err = {0};
    if (load_t("run.output_dir = caf\xc3\xa9-\xe2\x82\xac-\xf0\x9f\x98\x80\n", 1, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_string_equal(c.output_dir, "caf\xc3\xa9-\xe2\x82\xac-\xf0\x9f\x98\x80");
    // random bytes are refused, not trained on
    unsigned char noise[512];
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < sizeof noise; i++) x ^= x << 13, x ^= x >> 7, x ^= x << 17, noise[i] = (unsigned char)x;
    write_bytes(path_of("noise.deck"), noise, sizeof noise);
    assert_int_equal(load_file(path_of("noise.deck"), &c, &err), DSMOE_ERR_INVALID);
}

// The same deck with LF, CRLF and CR line ends (and a continuation and a comment) loads the same.
static void test_line_endings(void **state) {
    const char *lf = "# comment\n[model]\nlayers = 6\nhidden = 96   # width\nheads = 6\n\n[train]\nsteps = 3\\\n  0\n"
                     "lr = 1e-3\n";
    size_t n = strlen(lf);
    char crlf[512], cr[512];
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (lf[i] == '\n') crlf[m++] = '\r';
        crlf[m++] = lf[i];
        cr[i] = lf[i] == '\n' ? '\r' : lf[i];
    }
    crlf[m] = '\0';
    cr[n] = '\0';
    dsmoe_config a, b, d;
    dsmoe_err err = {0};
    if (load_t(lf, 1, &a, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(a.layers, 6);
    assert_int_equal(a.hidden, 96);
    assert_int_equal(a.steps, 30);
    assert_true(a.lr == 1e-3f);
    if (load_t(crlf, 1, &b, &err) != DSMOE_OK) fail_msg("CRLF: %s", err.msg);
    assert_memory_equal(&a, &b, sizeof a);
    if (load_t(cr, 1, &d, &err) != DSMOE_OK) fail_msg("CR: %s", err.msg);
    assert_memory_equal(&a, &d, sizeof a);
    // from files too, and line numbers count CR and CRLF ends alike
    write_bytes(path_of("cr.deck"), cr, n);
    if (load_file(path_of("cr.deck"), &d, &err) != DSMOE_OK) fail_msg("CR file: %s", err.msg);
    assert_memory_equal(&a, &d, sizeof a);
    expect_error("# a\r\rmodel.heads = x\r", 1, "t.deck:3: model.heads = x: expected an integer");
    expect_error("# 1\r\n# 2\r\nmodel.heads = x\r\n", 1, "t.deck:3: model.heads = x: expected an integer");
    expect_error("# 1\r# 2\n# 3\r\nmodel.heads = x", 1, "t.deck:4: model.heads = x: expected an integer");
}

static void test_read_pipes(void **state) {
    const char *deck = "model.layers = 6\ntrain.steps = 30\n";
    char *text = NULL;
    size_t len = 0;
    dsmoe_err err = {0};
    alarm(20); // a reader that blocks fails the test instead of hanging it
    // stdin as "-": a pipe read to EOF
    int saved = dup(0), fds[2];
    assert_int_equal(pipe(fds), 0);
    assert_int_equal(dup2(fds[0], 0), 0);
    close(fds[0]);
    assert_int_equal(write(fds[1], deck, strlen(deck)), (ssize_t)strlen(deck));
    close(fds[1]);
    dsmoe_config c;
    if (dsmoe_config_load("-", NULL, 0, no_env, 1, &c, NULL, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(c.layers, 6);
    assert_int_equal(c.steps, 30);
    // an empty pipe is refused (stdin of a job that forwards nothing), not read as an empty deck
    assert_int_equal(pipe(fds), 0);
    assert_int_equal(dup2(fds[0], 0), 0);
    close(fds[0]);
    close(fds[1]);
    assert_int_equal(dsmoe_deck_read_file("-", &text, &len, &err), DSMOE_ERR_IO);
    assert_null(text);
    assert_string_equal(err.msg, "cannot read deck '<stdin>': the pipe gave no data (a FIFO with no writer, or an empty pipe)");
    dup2(saved, 0);
    close(saved);

    // a FIFO no one writes: refused at once
    const char *fifo = path_of("deck.fifo");
    assert_int_equal(mkfifo(fifo, 0600), 0);
    time_t t0 = time(NULL);
    assert_int_equal(dsmoe_deck_read_file(fifo, &text, &len, &err), DSMOE_ERR_IO);
    assert_true(time(NULL) - t0 < 5);
    char msg[1024];
    snprintf(msg, sizeof msg, "cannot read deck '%s': the pipe gave no data (a FIFO with no writer, or an empty pipe)", fifo);
    assert_string_equal(err.msg, msg);
    // a FIFO with a writer that writes in pieces: read to its EOF
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(fifo, O_WRONLY); // waits for the reader
        if (fd < 0) _exit(1);
        usleep(100000);
        ssize_t a = write(fd, deck, 10);
        usleep(100000);
        ssize_t b = write(fd, deck + 10, strlen(deck) - 10);
        _exit(a == 10 && b == (ssize_t)strlen(deck) - 10 ? 0 : 1);
    }
    usleep(300000); // the child is waiting in open(): the FIFO has a writer when the reader opens
    dsmoe_status st = dsmoe_deck_read_file(fifo, &text, &len, &err);
    int status = 0;
    waitpid(pid, &status, 0);
    if (st != DSMOE_OK) fail_msg("%s", err.msg);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_equal(len, strlen(deck));
    assert_string_equal(text, deck);
    free(text);

    // a directory and devices that never end or wait for typing are refused
    assert_int_equal(dsmoe_deck_read_file(dir, &text, &len, &err), DSMOE_ERR_IO);
    snprintf(msg, sizeof msg, "cannot read deck '%s': it is a directory", dir);
    assert_string_equal(err.msg, msg);
    assert_int_equal(dsmoe_deck_read_file("/dev/zero", &text, &len, &err), DSMOE_ERR_IO);
    assert_string_equal(err.msg, "cannot read deck '/dev/zero': not a regular file or a pipe (a device: a terminal, "
                                 "/dev/zero or /dev/urandom is not a deck)");
    assert_int_equal(dsmoe_deck_read_file("/dev/urandom", &text, &len, &err), DSMOE_ERR_IO);
    // a regular file: exact bytes, an empty one is an empty deck
    write_bytes(path_of("empty.deck"), "", 0);
    if (dsmoe_deck_read_file(path_of("empty.deck"), &text, &len, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(len, 0);
    assert_string_equal(text, "");
    free(text);
    alarm(0);
}

// ---------------------------------------------------------------------------------------------------
// Numbers: exact, no wrap, no hex

static void expect_int(const char *deck, size_t off, int64_t want) {
    dsmoe_config c;
    dsmoe_err err = {0};
    if (load_t(deck, 1, &c, &err) != DSMOE_OK) fail_msg("%s\n--- deck:\n%s", err.msg, deck);
    int64_t got = off == offsetof(dsmoe_config, seed) || off == offsetof(dsmoe_config, plan_memory_per_rank)
                      ? (int64_t)*(uint64_t *)((char *)&c + off)
                      : *(int *)((char *)&c + off);
    if (got != want) fail_msg("%s: got %" PRId64 ", expected %" PRId64, deck, got, want);
}

static void test_integers(void **state) {
    const size_t steps = offsetof(dsmoe_config, steps), seed = offsetof(dsmoe_config, seed);
    expect_int("train.steps = 1e3\n", steps, 1000); // documented: a whole number in any of the forms
    expect_int("train.steps = 4K\n", steps, 4000);
    expect_int("train.steps = 4k\n", steps, 4000);
    expect_int("train.steps = 4Ki\n", steps, 4096);
    expect_int("train.steps = 1.5K\n", steps, 1500);
    expect_int("train.steps = 0.5Ki\n", steps, 512);
    expect_int("train.steps = 2M\n", steps, 2000000);
    expect_int("train.steps = 1Gi\n", steps, 1073741824);
    expect_int("train.steps = 2147483647\n", steps, 2147483647);
    expect_int("train.steps = +7\n", steps, 7);
    expect_int("train.steps = -0\n", steps, 0);
    expect_int("train.steps = 007\n", steps, 7);
    expect_int("train.steps = 12.000\n", steps, 12);
    expect_int("train.steps = 120e-1\n", steps, 12);
    expect_int("moe.ranks_per_node = 0e999999\n", offsetof(dsmoe_config, ranks_per_node), 0);
    // 64-bit keys exactly, never through a double: 2^53 + 1 and UINT64_MAX
    expect_int("run.seed = 9007199254740993\n", seed, 9007199254740993ll);
    expect_int("run.seed = 18446744073709551615\n", seed, (int64_t)UINT64_MAX);
    expect_int("run.seed = 1.8446744073709551615e19\n", seed, (int64_t)UINT64_MAX);
    expect_int("plan.memory_per_rank = 80Gi\n", offsetof(dsmoe_config, plan_memory_per_rank), 80ll << 30);
    expect_int("plan.memory_per_rank = 16Ti\n", offsetof(dsmoe_config, plan_memory_per_rank), 16ll << 40);

    // hex (integers and floats), blanks, words, fractions
    expect_error("model.hidden = 0x1p4\n", 1, "t.deck:1: model.hidden = 0x1p4: expected an integer");
    expect_error("model.hidden = 0x10\n", 1, "t.deck:1: model.hidden = 0x10: expected an integer");
    expect_error("train.steps = 2.5\n", 1, "t.deck:1: train.steps = 2.5: expected an integer");
    expect_error("train.steps = 1e-3\n", 1, "t.deck:1: train.steps = 1e-3: expected an integer");
    expect_error("train.steps = 1e\n", 1, "t.deck:1: train.steps = 1e: expected an integer");
    expect_error("train.steps = inf\n", 1, "t.deck:1: train.steps = inf: expected an integer");
    expect_error("train.steps = 1_000\n", 1, "t.deck:1: train.steps = 1_000: expected an integer");
    expect_error("train.steps = 4KB\n", 1, "t.deck:1: train.steps = 4KB: expected an integer");
    expect_error("train.steps = \"\"\n", 1, "t.deck:1: train.steps = : expected an integer");
    char *blank[] = {"train.steps= 5"};
    expect_full("", blank, 1, NULL, 1, "command line: train.steps =  5: expected an integer");
    char *hex_env[] = {"DSMOE_TRAIN_STEPS=0x10", NULL};
    expect_full("", NULL, 0, hex_env, 1, "environment DSMOE_TRAIN_STEPS: train.steps = 0x10: expected an integer");
    expect_error("train.lr = 0x1p-4\n", 1, "t.deck:1: train.lr = 0x1p-4: expected a number");
    expect_error("train.lr = nan\n", 1, "t.deck:1: train.lr = nan: expected a number");
    expect_error("train.lr = 1e39\n", 1, "t.deck:1: train.lr = 1e39: does not fit in a float");
    expect_error("train.lr = 1e-60\n", 1, "t.deck:1: train.lr = 1e-60: does not fit in a float");
    // out of range: refused, never wrapped or clamped
    expect_error("train.steps = 2147483648\n", 1, "t.deck:1: train.steps = 2147483648: does not fit in a 32-bit integer");
    expect_error("train.steps = 18446744073709551615\n", 1,
                 "t.deck:1: train.steps = 18446744073709551615: does not fit in a 32-bit integer");
    expect_error("train.steps = 18446744073709551617\n", 1,
                 "t.deck:1: train.steps = 18446744073709551617: does not fit in a 32-bit integer");
    expect_error("train.steps = 1e999999\n", 1, "t.deck:1: train.steps = 1e999999: does not fit in a 32-bit integer");
    expect_error("moe.ranks_per_node = -2147483648\n", 1, "t.deck:1: moe.ranks_per_node = -2147483648: must be >= 0");
    expect_error("run.seed = 18446744073709551616\n", 1, "t.deck:1: run.seed = 18446744073709551616: does not fit in a 64-bit integer");
    expect_error("run.seed = 1.8446744073709551616e19\n", 1,
                 "t.deck:1: run.seed = 1.8446744073709551616e19: does not fit in a 64-bit integer");
    expect_error("run.seed = -1\n", 1, "t.deck:1: run.seed = -1: expected an integer >= 0");
    // moe.experts and its repeat counts
    expect_error("moe.experts = -4294967288\n", 1,
                 "t.deck:1: moe.experts = -4294967288: an expert count must be >= 1 (0 = dense model only as the whole value)");
    expect_error("moe.experts = 18446744073709551615\n", 1,
                 "t.deck:1: moe.experts = 18446744073709551615: a count does not fit in a 32-bit integer");
    expect_error("moe.experts = 2147483648\n", 1, "t.deck:1: moe.experts = 2147483648: a count does not fit in a 32-bit integer");
    expect_error("moe.experts = 0x1p4\n", 1,
                 "t.deck:1: moe.experts = 0x1p4: expected a count (e.g. 8) or a list of 'count xN' items (e.g. 32 x10, 64 x2)");
    expect_error("moe.experts = 8 x4294967297\n", 1,
                 "t.deck:1: moe.experts = 8 x4294967297: the list covers more than DSMOE_MAX_MOE_LAYERS (256) MoE layers");
    expect_error("moe.experts = 8 x-4294967295\n", 1, "t.deck:1: moe.experts = 8 x-4294967295: a repeat count xN must have N >= 1");
    dsmoe_config c;
    dsmoe_err err = {0};
    if (load_t("moe.experts = 1e1 x1, 4Ki x1\n", 1, &c, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_int_equal(c.experts[0], 10);
    assert_int_equal(c.experts[1], 4096);
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

static void test_print_keys(void **state) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    dsmoe_config_print_keys(f);
    fclose(f);
    for (int i = 0; i < dsmoe_config_key_count(); i++) {
        char want[128];
        snprintf(want, sizeof want, "  %s = ", dsmoe_config_key(i).name);
        assert_non_null(strstr(buf, want));
    }
    assert_non_null(strstr(buf, "  moe.top_k = 1   (int, 1 or 2)\n"));
    assert_non_null(strstr(buf, "  run.mode = train   (enum: train | eval | generate)\n"));
    assert_non_null(strstr(buf, "  data.path = \"\"   (string)\n"));
    free(buf);
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

static int setup(void **state) {
    (void)state;
    return tmpdir_create("deck");
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
        cmocka_unit_test(test_print_round_trip),
        cmocka_unit_test(test_read_bytes),
        cmocka_unit_test(test_line_endings),
        cmocka_unit_test(test_read_pipes),
        cmocka_unit_test(test_integers),
        cmocka_unit_test(test_derived_overflow),
        cmocka_unit_test(test_print_round_trip_random),
        cmocka_unit_test(test_print_keys),
        cmocka_unit_test(test_docs_list_every_key),
        cmocka_unit_test(test_example_deck),
        cmocka_unit_test(test_moe_layers),
        cmocka_unit_test(test_expert_parallel_list),
        cmocka_unit_test(test_capacity),
        cmocka_unit_test(test_moe_exchange_keys),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
