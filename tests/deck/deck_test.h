// tests/deck/deck_test.h: what the two deck tests share (test_deck.c: decks and their rules;
// test_deck_text.c: the deck as text: printing, reading files, numbers). Loading deck text with no
// environment, checking a load's exact message, and checking that a printed configuration loads back.
#ifndef DSMOE_DECK_TEST_H
#define DSMOE_DECK_TEST_H
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "config.h"

#define DECKS DSMOE_TEST_SOURCE_DIR "/tests/decks/"

static char *const no_env[] = {NULL};

// Loads deck text named "t.deck" with no environment.
static inline dsmoe_status load_t(const char *text, int ws, dsmoe_config *cfg, dsmoe_err *err) {
    return dsmoe_config_load_text(text, "t.deck", NULL, 0, no_env, ws, cfg, NULL, err);
}

static inline void expect_full(const char *text, char *const *argv, int n, char *const *envp, int ws, const char *msg) {
    dsmoe_config cfg;
    dsmoe_err err = {0};
    dsmoe_status st = dsmoe_config_load_text(text, "t.deck", argv, n, envp ? envp : no_env, ws, &cfg, NULL, &err);
    if (st == DSMOE_OK) fail_msg("deck loaded, expected: %s\n--- deck:\n%s", msg, text);
    assert_int_equal(st, DSMOE_ERR_INVALID);
    if (strcmp(err.msg, msg) != 0) fail_msg("message\n  got:      %s\n  expected: %s", err.msg, msg);
}

static inline void expect_error(const char *text, int ws, const char *msg) { expect_full(text, NULL, 0, NULL, ws, msg); }

// The line of text that starts with prefix (static buffer), or fails.
static inline const char *line_of(const char *text, const char *prefix) {
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

static inline int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}
static inline void round_trip(const dsmoe_config *c, const dsmoe_config_sources *src, int ws) {
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

#endif
