// tests/fuzz/fuzz_deck.c: the deck reader and the configuration (core/deck/deck.c, core/deck/config.c).
// The input is a deck file. It goes through the program's own path: dsmoe_deck_read_file (the bytes come
// back unchanged, or a refusal), then dsmoe_config_load_text for 0, 1 and 6 ranks. Each configuration
// that loads must survive printing: the printed text (with and without the source comments) loads back,
// with no environment, to the same configuration, and prints the same again. Plugin settings
// ([kernel.NAME], [comm.NAME]) are not part of the printed configuration (the loaded plugins print their
// own resolved settings, core/drivers/main.c), so the comparison leaves them out.
#include "fuzz_common.h"

#include "config.h"

static char *const no_env[] = {NULL};

// The first line where a and b differ, for the message.
static void first_difference(const char *a, const char *b, char *out, size_t n) {
    int line = 1;
    const char *la = a, *lb = b;
    for (; *a && *a == *b; a++, b++)
        if (*a == '\n') line++, la = a + 1, lb = b + 1;
    snprintf(out, n, "line %d:\n  before: %.*s\n  after:  %.*s", line, (int)strcspn(la, "\n"), la,
             (int)strcspn(lb, "\n"), lb);
}

static void round_trip(const dsmoe_config *c, const dsmoe_config_sources *src, int ws) {
    char *text = dsmoe_config_to_text(c, src);
    if (!text) fuzz_fail("dsmoe_config_to_text returned NULL");
    dsmoe_config *back = malloc(sizeof *back), *want = malloc(sizeof *want);
    if (!back || !want) fuzz_setup_error("out of memory");
    memset(back, 0xab, sizeof *back);
    dsmoe_err err = {0};
    if (dsmoe_config_load_text(text, "printed.deck", NULL, 0, no_env, ws, back, NULL, &err) != DSMOE_OK)
        fuzz_fail("the printed configuration (%d ranks) does not load: %s\n--- printed:\n%s", ws, err.msg, text);
    *want = *c;
    memset(want->plugin_settings, 0, sizeof want->plugin_settings);
    want->n_plugin_settings = 0;
    char *plain = dsmoe_config_to_text(c, NULL), *again = dsmoe_config_to_text(back, NULL);
    if (!plain || !again) fuzz_fail("dsmoe_config_to_text returned NULL");
    if (strcmp(plain, again) != 0) {
        char where[2048];
        first_difference(plain, again, where, sizeof where);
        fuzz_fail("the printed configuration (%d ranks) loads back differently, %s\n--- printed:\n%s", ws, where, text);
    }
    if (memcmp(want, back, sizeof *back) != 0) {
        size_t at = 0;
        while (((const unsigned char *)want)[at] == ((const unsigned char *)back)[at]) at++;
        fuzz_fail("the printed configuration (%d ranks) prints the same but loads to another struct "
                  "(first differing byte at offset %zu of dsmoe_config)\n--- printed:\n%s", ws, at, text);
    }
    free(plain);
    free(again);
    free(back);
    free(want);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_write("fuzz.deck", data, size);
    char *text = NULL;
    size_t len = 0;
    dsmoe_err err = {0};
    if (dsmoe_deck_read_file(path, &text, &len, &err) != DSMOE_OK) {
        if (text) fuzz_fail("dsmoe_deck_read_file failed but left *text set");
        return 0;
    }
    if (len != size || memcmp(text, data, size) != 0 || text[len] != '\0')
        fuzz_fail("dsmoe_deck_read_file returned %zu bytes that are not the %zu of the file", len, size);
    static const int ranks[3] = {0, 1, 6};
    dsmoe_config *cfg = malloc(sizeof *cfg);
    if (!cfg) fuzz_setup_error("out of memory");
    for (int r = 0; r < 3; r++) {
        dsmoe_config_sources *src = NULL;
        memset(&err, 0, sizeof err);
        dsmoe_status st = dsmoe_config_load_text(text, path, NULL, 0, fuzz_deck_env, ranks[r], cfg, &src, &err);
        if (st != DSMOE_OK) {
            if (src) fuzz_fail("dsmoe_config_load_text failed but returned sources");
            if (!err.msg[0]) fuzz_fail("dsmoe_config_load_text failed (status %d) with no message", (int)st);
            continue;
        }
        round_trip(cfg, src, ranks[r]);  // with the source comments
        round_trip(cfg, NULL, ranks[r]); // and without
        dsmoe_config_sources_free(src);
    }
    free(cfg);
    free(text);
    return 0;
}
