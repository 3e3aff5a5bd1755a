// core/deck/plugin_settings.c: resolving a plugin's declared settings. See plugin_settings.h.
//
// The core knows a plugin's settings only once the plugin is loaded, so the configuration loader
// (config.c) keeps what the deck and the command line say under [kernel.NAME] / [comm.NAME] as text,
// and this module checks it against the declarations (name, type, ENUM choices) when the runtime opens
// the plugin: before init, so a bad value stops the run before its first step.
#define _GNU_SOURCE
#include "plugin_settings.h"

#include <ctype.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

// DSMOE_<KIND>_<PLUGIN>_<KEY>, upper case, '-' and '.' as '_'.
static void env_name(const char *kind, const char *plugin, const char *key, char *buf, size_t n) {
    char raw[256];
    snprintf(raw, sizeof raw, "DSMOE_%s_%s_%s", kind, plugin, key);
    size_t i = 0;
    for (const char *p = raw; *p && i + 1 < n; p++)
        buf[i++] = (*p == '-' || *p == '.') ? '_' : (char)toupper((unsigned char)*p);
    buf[i] = '\0';
}

static const char *env_value(char *const *envp, const char *name) {
    size_t n = strlen(name);
    const char *v = NULL;
    for (char *const *e = envp; e && *e; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=') v = *e + n + 1;
    return v;
}

// Checks `text` against the declaration; writes the normalised value into out (len bytes), or the reason
// into why.
static int normalise(const dsmoe_param_decl *d, const char *text, char *out, size_t len, char *why, size_t whylen) {
    int64_t iv;
    double dv;
    int bv;
    switch (d->type) {
    case DSMOE_PARAM_INT:
        if (dsmoe_deck_parse_int(text, &iv) != 0) {
            snprintf(why, whylen, "expected an integer (K/M/G suffixes allowed)");
            return -1;
        }
        snprintf(out, len, "%" PRId64, iv);
        return 0;
    case DSMOE_PARAM_FLOAT:
        if (dsmoe_parse_scaled(text, &dv) != 0 || !isfinite(dv)) {
            snprintf(why, whylen, "expected a number (K/M/G suffixes allowed)");
            return -1;
        }
        dsmoe_deck_format_double(dv, out, len); // the suffix applied, for the plugin's strtod
        return 0;
    case DSMOE_PARAM_BOOL:
        if (dsmoe_deck_parse_bool(text, &bv) != 0) {
            snprintf(why, whylen, "expected a boolean (true/false, yes/no, on/off, 1/0)");
            return -1;
        }
        snprintf(out, len, "%d", bv ? 1 : 0);
        return 0;
    case DSMOE_PARAM_ENUM: {
        const char *c = d->choices ? d->choices : "";
        size_t n = strlen(text);
        while (*c) {
            size_t m = strcspn(c, "|");
            if (m == n && strncmp(c, text, n) == 0) {
                snprintf(out, len, "%s", text);
                return 0;
            }
            c += m + (c[m] == '|');
        }
        snprintf(why, whylen, "expected one of %s", d->choices ? d->choices : "(no choices declared)");
        return -1;
    }
    case DSMOE_PARAM_STRING:
        for (const char *p = text; *p; p++)
            if ((unsigned char)*p < 0x20 || *p == 0x7f) {
                snprintf(why, whylen, "contains a control character");
                return -1;
            }
        snprintf(out, len, "%s", text);
        return 0;
    }
    snprintf(why, whylen, "the plugin declares an unknown type %d", (int)d->type);
    return -1;
}

static int find_param(const dsmoe_param_decl *params, int n, const char *key) {
    for (int i = 0; i < n; i++)
        if (params[i].name && strcmp(params[i].name, key) == 0) return i;
    return -1;
}

static void list_names(const dsmoe_param_decl *params, int n, char *buf, size_t len) {
    size_t k = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && k < len; i++) k += (size_t)snprintf(buf + k, len - k, "%s%s", i ? ", " : "", params[i].name);
    if (n == 0) snprintf(buf, len, "none");
}

// A variable under this plugin's prefix DSMOE_<KIND>_<PLUGIN>_ must name one of its settings: a typo
// would otherwise leave the default in force without a word. A variable under the longer prefix of
// another plugin (DSMOE_COMM_MPI_CUDA_ of mpi_cuda, beside mpi) is that plugin's.
static dsmoe_status check_env_names(const char *kind, const char *plugin, const dsmoe_param_decl *params, int n,
                                    char *const *envp, dsmoe_plugin_names_fn list_others, void *others_user,
                                    dsmoe_err *err) {
    const char *const *others = NULL;
    int listed = 0;
    char prefix[200], name[200], other[200];
    env_name(kind, plugin, "", prefix, sizeof prefix);
    size_t plen = strlen(prefix);
    for (char *const *e = envp; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (strncmp(*e, prefix, plen) != 0 || !eq || (size_t)(eq - *e) >= sizeof name) continue;
        snprintf(name, sizeof name, "%.*s", (int)(eq - *e), *e);
        int known = 0;
        for (int p = 0; p < n && !known; p++) {
            env_name(kind, plugin, params[p].name, other, sizeof other);
            known = strcmp(other, name) == 0;
        }
        if (!known && !listed && list_others) others = list_others(kind, others_user), listed = 1;
        for (const char *const *o = others; o && *o && !known; o++) {
            env_name(kind, *o, "", other, sizeof other);
            known = strlen(other) > plen && strncmp(name, other, strlen(other)) == 0;
        }
        if (known) continue;
        char key[200], names[512], hint[300] = "";
        size_t k = 0;
        for (const char *c = name + plen; *c && k + 1 < sizeof key; c++) key[k++] = (char)tolower((unsigned char)*c);
        key[k] = '\0';
        int best = -1, best_d = 3;
        for (int p = 0; p < n; p++) {
            int d = dsmoe_edit_distance(key, params[p].name);
            if (d < best_d) best = p, best_d = d;
        }
        if (best >= 0) {
            env_name(kind, plugin, params[best].name, other, sizeof other);
            snprintf(hint, sizeof hint, " (did you mean %s?)", other);
        }
        list_names(params, n, names, sizeof names);
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "environment %s: %s plugin '%s' has no setting '%s'%s; its "
                             "settings: %s", name, kind, plugin, key, hint, names);
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_plugin_settings_resolve(const dsmoe_config *cfg, const char *kind, const char *plugin,
                                           const dsmoe_param_decl *params, int n_params, char *const *envp,
                                           dsmoe_plugin_names_fn others, void *others_user, dsmoe_plugin_values *out,
                                           dsmoe_err *err) {
    memset(out, 0, sizeof *out);
    out->kind = kind;
    out->plugin = plugin;
    out->params = params;
    int n_declared = n_params > 0 && params ? n_params : 0;
    if (!envp) envp = environ;
    // Every given setting of this plugin must be declared.
    for (int i = 0; cfg && i < cfg->n_plugin_settings; i++) {
        const dsmoe_plugin_setting *s = &cfg->plugin_settings[i];
        if (strcmp(s->kind, kind) || strcmp(s->plugin, plugin) || find_param(params, n_declared, s->key) >= 0) continue;
        char names[512], pre[300];
        list_names(params, n_declared, names, sizeof names);
        if (s->cmdline) snprintf(pre, sizeof pre, "command line");
        else snprintf(pre, sizeof pre, "%s:%d", s->deck, s->line);
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: %s plugin '%s' has no setting '%s' (its settings: %s)", pre,
                             kind, plugin, s->key, names);
    }
    DSMOE_TRY(check_env_names(kind, plugin, params, n_declared, envp, others, others_user, err));
    out->n = n_declared;
    if (out->n == 0) return DSMOE_OK;
    out->values = calloc((size_t)out->n, sizeof *out->values);
    out->origin = calloc((size_t)out->n, sizeof *out->origin);
    if (!out->values || !out->origin) {
        dsmoe_plugin_values_free(out);
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory resolving %s plugin '%s' settings", kind, plugin);
    }
    for (int p = 0; p < out->n; p++) {
        const dsmoe_param_decl *d = &params[p];
        const char *text = d->default_value ? d->default_value : "";
        char origin[400] = "default", env[200];
        for (int i = 0; cfg && i < cfg->n_plugin_settings; i++) { // the deck, then the command line
            const dsmoe_plugin_setting *s = &cfg->plugin_settings[i];
            if (s->cmdline || strcmp(s->kind, kind) || strcmp(s->plugin, plugin) || strcmp(s->key, d->name)) continue;
            text = s->value;
            snprintf(origin, sizeof origin, "deck %s:%d", s->deck, s->line);
        }
        env_name(kind, plugin, d->name, env, sizeof env);
        const char *ev = env_value(envp, env);
        if (ev) {
            text = ev;
            snprintf(origin, sizeof origin, "environment %s", env);
        }
        for (int i = 0; cfg && i < cfg->n_plugin_settings; i++) {
            const dsmoe_plugin_setting *s = &cfg->plugin_settings[i];
            if (!s->cmdline || strcmp(s->kind, kind) || strcmp(s->plugin, plugin) || strcmp(s->key, d->name)) continue;
            text = s->value;
            snprintf(origin, sizeof origin, "command line");
        }
        char value[512], why[256];
        if (normalise(d, text, value, sizeof value, why, sizeof why) != 0) {
            dsmoe_status st = dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: %s.%s.%s = %s: %s (%s)", origin, kind, plugin,
                                            d->name, text, why, d->help ? d->help : "");
            dsmoe_plugin_values_free(out);
            return st;
        }
        out->values[p] = strdup(value);
        out->origin[p] = strdup(origin);
        if (!out->values[p] || !out->origin[p]) {
            dsmoe_plugin_values_free(out);
            return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory resolving %s plugin '%s' settings", kind, plugin);
        }
    }
    return DSMOE_OK;
}

void dsmoe_plugin_values_free(dsmoe_plugin_values *v) {
    if (!v) return;
    for (int i = 0; i < v->n; i++) {
        if (v->values) free(v->values[i]);
        if (v->origin) free(v->origin[i]);
    }
    free(v->values);
    free(v->origin);
    v->values = v->origin = NULL;
    v->n = 0;
}

char *dsmoe_plugin_values_text(const dsmoe_plugin_values *v) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    if (v && v->n > 0 && v->values) {
        fprintf(f, "[%s.%s]\n", v->kind, v->plugin);
        for (int i = 0; i < v->n; i++)
            fprintf(f, "%s = %s  # %s: %s\n", v->params[i].name, v->values[i], v->origin[i],
                    v->params[i].help ? v->params[i].help : "");
    }
    fclose(f);
    return text;
}
