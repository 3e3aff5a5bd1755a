// tests/deck/test_deck_text.c: the deck as text (core/deck/config_print.c, core/deck/deck.c): the printed
// configuration loads back to the same struct (fixed and random configurations), deck files are read
// byte-exactly whatever their line ends and from pipes, and numbers are exact (no wrap, no hex).
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "deck_test.h"
#include "test_tmpdir.h"


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

// A duration in [0, 3 days), whole or with up to 17 significant digits, in one of its units.
static void put_duration(char **p, const char *key) {
    static const char *const units[] = {"", "s", "min", "h"};
    int u = rint_in(0, 3), whole = rint_in(0, 1);
    double v = runit() * (u == 3 ? 72 : u == 2 ? 4320 : 259200);
    if (whole) *p += sprintf(*p, "%s = %.0f%s\n", key, floor(v), units[u]);
    else *p += sprintf(*p, "%s = %.*g%s\n", key, rint_in(1, 17), v, units[u]);
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
    put_duration(&p, "watchdog");
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
    p += sprintf(p, "[generate]\n");
    put_duration(&p, "save_every");
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
    char *argv[] = {"run.output_dir= a#b\"c\\d${X}$ ", "checkpoint.dir=", "train.lr=0.1", "train.weight_decay=3.3e-7",
                    "run.watchdog=0.2", "generate.save_every=0.5h"};
    if (dsmoe_config_load_text("", "t.deck", argv, 6, no_env, 1, &c, NULL, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    assert_string_equal(c.output_dir, " a#b\"c\\d${X}$ ");
    round_trip(&c, NULL, 1);
    text = dsmoe_config_to_text(&c, NULL);
    assert_string_equal(line_of(text, "output_dir = "), "output_dir = \" a#b\\\"c\\\\d\\${X}\\$ \"");
    assert_string_equal(line_of(text, "lr = "), "lr = 0.1");
    assert_string_equal(line_of(text, "watchdog = "), "watchdog = 0.2s"); // durations: the fewest digits
    assert_string_equal(line_of(text, "save_every = "), "save_every = 1800s");
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

static int setup(void **state) {
    (void)state;
    return tmpdir_create("deck");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_print_round_trip),
        cmocka_unit_test(test_print_round_trip_random),
        cmocka_unit_test(test_print_keys),
        cmocka_unit_test(test_read_bytes),
        cmocka_unit_test(test_line_endings),
        cmocka_unit_test(test_read_pipes),
        cmocka_unit_test(test_integers),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
