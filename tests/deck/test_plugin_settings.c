// tests/deck/test_plugin_settings.c: a plugin's declared settings resolved against the deck, the
// environment and the command line (core/deck/plugin_settings.c), with declarations of every type (the
// plugins of this tree declare no FLOAT or STRING): values as init receives them, the order of
// precedence with each value's origin, and each kind of refusal with its message.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "plugin_settings.h"

static const dsmoe_param_decl decls[] = {
    {"n", DSMOE_PARAM_INT, "8", "rows", NULL},
    {"scale", DSMOE_PARAM_FLOAT, "0.5", "a factor", NULL},
    {"on", DSMOE_PARAM_BOOL, "no", "a switch", NULL},
    {"path", DSMOE_PARAM_STRING, "/tmp/x", "a file", NULL},
    {"mode", DSMOE_PARAM_ENUM, "auto", "how", "auto|fast|safe"},
};
enum { N_DECLS = sizeof decls / sizeof decls[0] };

static char *const no_env[] = {NULL};
// The kernel plugins there are (as the runtime lists them, the resolved one among them): my-plugin-x's
// variables start with my-plugin's prefix.
static const char *const plugins_here[] = {"my-plugin", "my-plugin-x", "other", NULL};
static int listed; // calls of list_here
static const char *const *list_here(const char *kind, void *user) {
    (void)kind, (void)user;
    listed++;
    return plugins_here;
}

// A configuration holding the given settings of the "my-plugin" kernel plugin: "key=value" from the
// deck t.deck (its line: 10 + the index) or, with a leading '!', from the command line.
static dsmoe_config *config_with(const char *const *given, int n) {
    dsmoe_config *c = calloc(1, sizeof *c);
    assert_non_null(c);
    for (int i = 0; i < n; i++) {
        dsmoe_plugin_setting *s = &c->plugin_settings[c->n_plugin_settings++];
        const char *g = given[i];
        s->cmdline = g[0] == '!';
        g += s->cmdline;
        const char *dot = strchr(g, '.'), *eq = strchr(g, '=');
        // "kind.plugin.key=value" when it names another plugin, else "key=value" of kernel.my-plugin
        if (dot && dot < eq) {
            const char *dot2 = strchr(dot + 1, '.');
            snprintf(s->kind, sizeof s->kind, "%.*s", (int)(dot - g), g);
            snprintf(s->plugin, sizeof s->plugin, "%.*s", (int)(dot2 - dot - 1), dot + 1);
            snprintf(s->key, sizeof s->key, "%.*s", (int)(eq - dot2 - 1), dot2 + 1);
        } else {
            snprintf(s->kind, sizeof s->kind, "kernel");
            snprintf(s->plugin, sizeof s->plugin, "my-plugin");
            snprintf(s->key, sizeof s->key, "%.*s", (int)(eq - g), g);
        }
        snprintf(s->value, sizeof s->value, "%s", eq + 1);
        s->line = 10 + i;
        snprintf(s->deck, sizeof s->deck, "t.deck");
    }
    return c;
}

static void resolve_ok(const dsmoe_config *c, char *const *envp, dsmoe_plugin_values *v) {
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_plugin_settings_resolve(c, "kernel", "my-plugin", decls, N_DECLS, envp, list_here, NULL, v, &err);
    if (s != DSMOE_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(v->n, N_DECLS);
}

// The value of `given` (one setting of the command line) for the declaration it names, or its error.
static void value_is(const char *given, int index, const char *want) {
    const char *one[1] = {given};
    dsmoe_config *c = config_with(one, 1);
    dsmoe_plugin_values v;
    resolve_ok(c, no_env, &v);
    if (strcmp(v.values[index], want) != 0) fail_msg("%s: got \"%s\", expected \"%s\"", given, v.values[index], want);
    assert_string_equal(v.origin[index], "command line");
    dsmoe_plugin_values_free(&v);
    free(c);
}

static void refused_with(const char *given, char *const *envp, const char *msg) {
    const char *one[1] = {given};
    dsmoe_config *c = config_with(one, given ? 1 : 0);
    dsmoe_plugin_values v;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_plugin_settings_resolve(c, "kernel", "my-plugin", decls, N_DECLS, envp, list_here, NULL, &v, &err);
    assert_int_equal(s, DSMOE_ERR_INVALID);
    if (!strstr(err.msg, msg)) fail_msg("%s:\n  got:      %s\n  expected: ...%s...", given, err.msg, msg);
    assert_int_equal(v.n, 0); // nothing half-resolved is left
    assert_null(v.values);
    free(c);
}

static void test_defaults(void **state) {
    (void)state;
    dsmoe_plugin_values v;
    resolve_ok(NULL, no_env, &v);
    const char *want[N_DECLS] = {"8", "0.5", "0", "/tmp/x", "auto"};
    for (int i = 0; i < N_DECLS; i++) {
        assert_string_equal(v.values[i], want[i]);
        assert_string_equal(v.origin[i], "default");
    }
    char *text = dsmoe_plugin_values_text(&v);
    assert_non_null(text);
    assert_string_equal(text, "[kernel.my-plugin]\n"
                              "n = 8  # default: rows\n"
                              "scale = 0.5  # default: a factor\n"
                              "on = 0  # default: a switch\n"
                              "path = /tmp/x  # default: a file\n"
                              "mode = auto  # default: how\n");
    free(text);
    dsmoe_plugin_values_free(&v);
    // No declarations: nothing to resolve, and no text.
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_settings_resolve(NULL, "comm", "none", NULL, 0, no_env, NULL, NULL, &v, &err), DSMOE_OK);
    assert_int_equal(v.n, 0);
    text = dsmoe_plugin_values_text(&v);
    assert_string_equal(text, "");
    free(text);
}

// Values as init receives them: INT and FLOAT with their suffixes applied (a FLOAT in the fewest digits
// strtod reads back exactly), BOOL as 1/0, STRING and ENUM as given.
static void test_values(void **state) {
    (void)state;
    value_is("!n=4Ki", 0, "4096");
    value_is("!n=1.5K", 0, "1500");
    value_is("!n=-3", 0, "-3");
    value_is("!scale=1.5K", 1, "1500");
    value_is("!scale=3e-4", 1, "0.0003");
    value_is("!scale=0.1", 1, "0.1");
    value_is("!scale=2Mi", 1, "2097152");
    value_is("!scale=-7.25", 1, "-7.25");
    value_is("!scale=0.30000000000000004", 1, "0.30000000000000004"); // 17 digits needed
    value_is("!on=YES", 2, "1");
    value_is("!on=off", 2, "0");
    value_is("!path=a b/c=d", 3, "a b/c=d");
    value_is("!path=", 3, "");
    value_is("!mode=safe", 4, "safe");
    value_is("!mode=auto", 4, "auto");
}

// The default, then the deck, then the environment, then the command line; each value with its origin.
// The environment's name is upper case with '-' and '.' as '_'. Another plugin's settings are left alone,
// among them those of a plugin whose name extends this one's (my-plugin-x).
static void test_precedence(void **state) {
    (void)state;
    char *const env[] = {"DSMOE_KERNEL_MY_PLUGIN_N=32", "DSMOE_KERNEL_MY_PLUGIN_SCALE=2",
                         "DSMOE_KERNEL_OTHER_N=99", "DSMOE_KERNEL_MY_PLUGIN_X_NN=5", "DSMOE_COMM_MY_PLUGIN_NN=5", NULL};
    const char *given[] = {"n=16", "on=true", "!n=64", "kernel.other.zzz=1", "comm.my-plugin.zzz=1", "mode=fast",
                           "!mode=safe", "scale=4"};
    dsmoe_config *c = config_with(given, 8);
    dsmoe_plugin_values v;
    resolve_ok(c, env, &v);
    assert_string_equal(v.values[0], "64"), assert_string_equal(v.origin[0], "command line");
    assert_string_equal(v.values[1], "2"), assert_string_equal(v.origin[1], "environment DSMOE_KERNEL_MY_PLUGIN_SCALE");
    assert_string_equal(v.values[2], "1"), assert_string_equal(v.origin[2], "deck t.deck:11");
    assert_string_equal(v.values[3], "/tmp/x"), assert_string_equal(v.origin[3], "default");
    assert_string_equal(v.values[4], "safe"), assert_string_equal(v.origin[4], "command line");
    dsmoe_plugin_values_free(&v);
    // Without the command line: the environment beats the deck.
    c->n_plugin_settings = 2;
    resolve_ok(c, env, &v);
    assert_string_equal(v.values[0], "32"), assert_string_equal(v.origin[0], "environment DSMOE_KERNEL_MY_PLUGIN_N");
    dsmoe_plugin_values_free(&v);
    // The plugins there are listed only for a variable that is no setting of this one (my-plugin-x's).
    listed = 0;
    char *const declared_only[] = {"DSMOE_KERNEL_MY_PLUGIN_N=32", "DSMOE_KERNEL_OTHER_N=99", NULL};
    resolve_ok(c, declared_only, &v);
    assert_int_equal(listed, 0);
    dsmoe_plugin_values_free(&v);
    resolve_ok(c, env, &v);
    assert_int_equal(listed, 1);
    dsmoe_plugin_values_free(&v);
    // Without the environment: the deck.
    resolve_ok(c, no_env, &v);
    assert_string_equal(v.values[0], "16"), assert_string_equal(v.origin[0], "deck t.deck:10");
    dsmoe_plugin_values_free(&v);
    free(c);
}

// Each refusal names where the value was given, the whole key, what was expected and the setting's help.
static void test_refused(void **state) {
    (void)state;
    refused_with("!n=2.5", no_env, "command line: kernel.my-plugin.n = 2.5: expected an integer (K/M/G suffixes "
                                     "allowed) (rows)");
    refused_with("n=0x10", no_env, "deck t.deck:10: kernel.my-plugin.n = 0x10: expected an integer");
    refused_with("!n=99999999999999999999", no_env, "kernel.my-plugin.n = 99999999999999999999: expected an integer");
    refused_with("!scale=x", no_env, "command line: kernel.my-plugin.scale = x: expected a number (K/M/G suffixes "
                                       "allowed) (a factor)");
    refused_with("!scale=inf", no_env, "kernel.my-plugin.scale = inf: expected a number");
    refused_with("!scale=nan", no_env, "kernel.my-plugin.scale = nan: expected a number");
    refused_with("!scale=1e999", no_env, "kernel.my-plugin.scale = 1e999: expected a number");
    refused_with("!on=maybe", no_env, "kernel.my-plugin.on = maybe: expected a boolean (true/false, yes/no, on/off, "
                                        "1/0) (a switch)");
    refused_with("!path=a\tb", no_env, "kernel.my-plugin.path = a\tb: contains a control character (a file)");
    refused_with("!mode=fas", no_env, "kernel.my-plugin.mode = fas: expected one of auto|fast|safe (how)");
    refused_with("!mode=auto|fast", no_env, "expected one of auto|fast|safe");
    refused_with("!mode=", no_env, "kernel.my-plugin.mode = : expected one of auto|fast|safe");
    char *const env[] = {"DSMOE_KERNEL_MY_PLUGIN_ON=2", NULL};
    refused_with(NULL, env, "environment DSMOE_KERNEL_MY_PLUGIN_ON: kernel.my-plugin.on = 2: expected a boolean");
    refused_with("nn=1", no_env, "t.deck:10: kernel plugin 'my-plugin' has no setting 'nn' (its settings: n, scale, "
                                   "on, path, mode)");
    refused_with("!nn=1", no_env, "command line: kernel plugin 'my-plugin' has no setting 'nn'");
    // A variable under the plugin's prefix that names none of its settings (a typo would leave the
    // default without a word), with the nearest setting's variable; one under the prefix of a plugin
    // that is not there (my-plugin-y) is this plugin's too.
    char *const typo[] = {"DSMOE_KERNEL_MY_PLUGIN_N=4", "DSMOE_KERNEL_MY_PLUGIN_MODES=fast", NULL};
    refused_with(NULL, typo, "environment DSMOE_KERNEL_MY_PLUGIN_MODES: kernel plugin 'my-plugin' has no setting "
                             "'modes' (did you mean DSMOE_KERNEL_MY_PLUGIN_MODE?); its settings: n, scale, on, path, "
                             "mode");
    char *const far[] = {"DSMOE_KERNEL_MY_PLUGIN_THREADS=4", NULL};
    refused_with(NULL, far, "environment DSMOE_KERNEL_MY_PLUGIN_THREADS: kernel plugin 'my-plugin' has no setting "
                            "'threads'; its settings: n, scale");
    char *const absent[] = {"DSMOE_KERNEL_MY_PLUGIN_Y_MODE=fast", NULL};
    refused_with(NULL, absent, "kernel plugin 'my-plugin' has no setting 'y_mode'");
    // A setting given to a plugin that declares none.
    const char *one[1] = {"x=1"};
    dsmoe_config *c = config_with(one, 1);
    dsmoe_plugin_values v;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_plugin_settings_resolve(c, "kernel", "my-plugin", NULL, 0, no_env, NULL, NULL, &v, &err),
                     DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "has no setting 'x' (its settings: none)"));
    free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults), cmocka_unit_test(test_values), cmocka_unit_test(test_precedence),
        cmocka_unit_test(test_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
