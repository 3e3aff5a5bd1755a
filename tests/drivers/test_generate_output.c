// tests/drivers/test_generate_output.c: where a completion ends (core/drivers/generate_output.c,
// dsmoe_completion_stop): before the earliest match of any stop sequence, when the newest token's bytes
// complete one or several of them (a BPE token "hell" completes both "ll" and "he"), whatever order the
// prompt lists them in; a sequence across the token boundary is found, text before the token is not
// searched again.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "generate_output.h"

// The completion "<before><token>" whose newest token has the bytes of `token`, against `stops`; returns
// where the text was cut (its length after the call), or -1 when no stop sequence matched.
static long cut_at(const char *before, const char *token, const char *const *stops, int n_stops) {
    size_t lens[8];
    for (int i = 0; i < n_stops; i++) lens[i] = strlen(stops[i]);
    dsmoe_prompt p = {.n_stop = n_stops, .stop = stops, .stop_len = lens};
    char text[64];
    snprintf(text, sizeof text, "%s%s", before, token);
    dsmoe_completion c = {.text = text, .text_len = strlen(text), .cap_text = sizeof text, .last_len = strlen(token)};
    if (!dsmoe_completion_stop(&c, &p)) {
        assert_int_equal(c.text_len, strlen(text)); // nothing cut
        return -1;
    }
    assert_int_equal(text[c.text_len], 0);
    return (long)c.text_len;
}

static void test_earliest_match_wins(void **state) {
    (void)state;
    const char *ll_he[] = {"ll", "he"}, *he_ll[] = {"he", "ll"};
    assert_int_equal(cut_at("x", "hell", ll_he, 2), 1); // "he" starts first, though listed second
    assert_int_equal(cut_at("x", "hell", he_ll, 2), 1);
    const char *ll_only[] = {"ll"};
    assert_int_equal(cut_at("x", "hell", ll_only, 1), 3);
    // Across the token boundary, and at the text's start.
    const char *cx[] = {"zz", "cx"};
    assert_int_equal(cut_at("abc", "xyz", cx, 2), 2);
    const char *whole[] = {"hell"};
    assert_int_equal(cut_at("", "hell", whole, 1), 0);
    // A stop sequence that lies wholly in earlier text was found when that text was new: not searched.
    const char *ab[] = {"ab"};
    assert_int_equal(cut_at("ab", "c", ab, 1), -1);
    const char *none[] = {"q", "longer than the text"};
    assert_int_equal(cut_at("x", "hell", none, 2), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_earliest_match_wins),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
