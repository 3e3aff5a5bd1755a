// core/deck/config.c: the loader that resolves a run's configuration through the key registry (its
// printers are in config_print.c).
// defines: dsmoe_config_load, dsmoe_config_load_text, dsmoe_config_key_count, dsmoe_config_key,
//          dsmoe_config_find_key, dsmoe_config_same_section, dsmoe_config_env_name, dsmoe_config_range_text,
//          dsmoe_config_is_moe_layer, dsmoe_config_capacity, dsmoe_config_sources_free
//
// Every key is declared once in config_keys.c (the Open MPI MCA pattern): name, type, default text,
// field of dsmoe_config, range, help. Loading applies, in rising priority, the defaults, the deck
// (core/deck/deck.c reads its text), the environment and the command line; each source parses its text
// into the field at once (so a type error names that source), and records itself. Ranges and
// cross-key rules are checked once at the end on the winning values, and an error names the source
// of the key being checked (or, when that key kept its default, the other key's). docs/deck.md
// documents every key; tests/deck/test_deck.c compares that page with this table.
#define _GNU_SOURCE
#include "config.h"
#include "config_keys.h" // the table

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

// The registry (config_keys.c) under short names.
static const key_def *const keys = dsmoe_config_keys;
static const char *const *const type_names = dsmoe_config_type_names;
#define N_KEYS dsmoe_config_n_keys

int dsmoe_config_key_count(void) { return N_KEYS; }

dsmoe_config_key_info dsmoe_config_key(int i) {
    dsmoe_config_key_info info = {0};
    if (i < 0 || i >= N_KEYS) return info;
    info.name = keys[i].name;
    info.type = type_names[keys[i].type];
    info.default_text = keys[i].def;
    info.help = keys[i].help;
    return info;
}

int dsmoe_config_find_key(const char *name) {
    for (int k = 0; k < N_KEYS; k++)
        if (strcmp(keys[k].name, name) == 0) return k;
    return -1;
}

int dsmoe_config_same_section(const char *a, const char *b) {
    size_t na = strcspn(a, "."), nb = strcspn(b, ".");
    return na == nb && strncmp(a, b, na) == 0;
}

// The closest key within distance 3: first in name's own section, then anywhere, where a key also
// matches on its short name ("steps" or "model.steps" -> "train.steps").
static int suggest_key(const char *name) {
    int best = -1, best_d = 4;
    for (int k = 0; k < N_KEYS; k++) {
        int d = dsmoe_edit_distance(name, keys[k].name);
        if (dsmoe_config_same_section(name, keys[k].name) && d < best_d) best = k, best_d = d;
    }
    if (best >= 0) return best;
    const char *dot = strchr(name, '.');
    const char *short_name = dot ? dot + 1 : name;
    for (int k = 0; k < N_KEYS; k++) {
        int d = dsmoe_edit_distance(name, keys[k].name);
        int ds = dsmoe_edit_distance(short_name, strchr(keys[k].name, '.') + 1);
        if (ds < d) d = ds;
        if (d < best_d) best = k, best_d = d;
    }
    return best;
}

// "kernel.NAME" or "comm.NAME" (a plugin's settings); *len_kind = length of the kind.
static int is_plugin_section(const char *name) {
    size_t n = strcspn(name, ".");
    if (!name[n] || !name[n + 1] || strchr(name + n + 1, '.')) return 0;
    return (n == 6 && !strncmp(name, "kernel", 6)) || (n == 4 && !strncmp(name, "comm", 4));
}

static int is_section(const char *name) {
    if (is_plugin_section(name)) return 1;
    for (int k = 0; k < N_KEYS; k++)
        if (strlen(name) == strcspn(keys[k].name, ".") && dsmoe_config_same_section(name, keys[k].name)) return 1;
    return 0;
}

// DSMOE_<KEY> with dots as underscores, upper case.
void dsmoe_config_env_name(int k, char *buf, size_t n) {
    size_t i = (size_t)snprintf(buf, n, "DSMOE_");
    for (const char *p = keys[k].name; *p && i + 1 < n; p++) buf[i++] = *p == '.' ? '_' : (char)toupper((unsigned char)*p);
    buf[i] = '\0';
}

void dsmoe_config_range_text(const key_def *kd, char *buf, size_t n) {
    const range *r = &kd->r;
    if (r->lo_kind && r->hi_kind && (kd->type == K_INT) && r->lo_kind == '[' && r->hi_kind == ']' && r->hi == r->lo + 1)
        snprintf(buf, n, "%g or %g", r->lo, r->hi);
    else if (r->lo_kind && r->hi_kind)
        snprintf(buf, n, "in %c%g, %g%c", r->lo_kind, r->lo, r->hi, r->hi_kind);
    else if (r->lo_kind)
        snprintf(buf, n, "%s %g", r->lo_kind == '[' ? ">=" : ">", r->lo);
    else
        buf[0] = '\0';
}

// ---------------------------------------------------------------------------------------------------
// Sources and the loader state

typedef struct loader {
    dsmoe_config cfg;
    const char *deck;
    struct {
        int src, line;
        char *text; // the winning value's text, for messages
    } at[DSMOE_CONFIG_MAX_KEYS];
    dsmoe_experts_list ex, ep; // moe.experts, moe.expert_parallel as written
} loader;

static void loader_free(loader *L) {
    if (!L) return;
    for (int k = 0; k < N_KEYS; k++) free(L->at[k].text);
    free(L);
}

// The location prefix of a message about key k: its source, or other's when k kept its default.
static const char *where(const loader *L, int k, int other, char *buf, size_t n) {
    if (L->at[k].src == SRC_DEFAULT && other >= 0 && L->at[other].src != SRC_DEFAULT) k = other;
    char env[96];
    switch (L->at[k].src) {
    case SRC_DECK: snprintf(buf, n, "%s:%d: ", L->deck, L->at[k].line); break;
    case SRC_ENV: dsmoe_config_env_name(k, env, sizeof env); snprintf(buf, n, "environment %s: ", env); break;
    case SRC_CMDLINE: snprintf(buf, n, "command line: "); break;
    default: snprintf(buf, n, "%s: ", L->deck); break;
    }
    return buf;
}

// ---------------------------------------------------------------------------------------------------
// Values: text -> field

// Parses text into key k's field and records (src, line) as its source; the key's checks on
// ranges and other keys come later, in validate().
static dsmoe_status set_value(loader *L, int k, const char *text, int src, int line, dsmoe_err *err) {
    const key_def *kd = &keys[k];
    char *field = (char *)&L->cfg + kd->off;
    const char *why = NULL;
    char whybuf[160];
    int prev_src = L->at[k].src, prev_line = L->at[k].line;
    L->at[k].src = src, L->at[k].line = line; // so where() names this source
    int64_t iv = 0;
    double dv;
    switch (kd->type) {
    case K_INT: {
        int rc = dsmoe_deck_parse_int(text, &iv);
        if (rc == -1) why = "expected an integer";
        else if (rc != 0 || iv < INT_MIN || iv > INT_MAX) why = "does not fit in a 32-bit integer";
        else *(int *)field = (int)iv;
        break;
    }
    case K_U64: {
        int rc = dsmoe_deck_parse_u64(text, (uint64_t *)field);
        if (rc == -1) why = "expected an integer >= 0";
        else if (rc != 0) why = "does not fit in a 64-bit integer";
        break;
    }
    case K_FLOAT: {
        int rc = dsmoe_deck_parse_float(text, (float *)field);
        if (rc == -1) why = "expected a number";
        else if (rc != 0) why = "does not fit in a float";
        break;
    }
    case K_DURATION:
        if (dsmoe_parse_duration(text, &dv) != 0) why = "expected a duration (e.g. 30, 30s, 5min, 2h)";
        else *(double *)field = dv;
        break;
    case K_BOOL:
        if (dsmoe_deck_parse_bool(text, (int *)field) != 0) why = "expected a boolean (true/false, yes/no, on/off, 1/0)";
        break;
    case K_ENUM: {
        int v = -1;
        for (int i = 0; kd->values[i]; i++)
            if (strcmp(text, kd->values[i]) == 0) v = i;
        if (v >= 0) {
            *(int *)field = v;
            break;
        }
        size_t m = (size_t)snprintf(whybuf, sizeof whybuf, "expected one of");
        for (int i = 0; kd->values[i] && m < sizeof whybuf; i++)
            m += (size_t)snprintf(whybuf + m, sizeof whybuf - m, "%s %s", i ? "," : "", kd->values[i]);
        why = whybuf;
        break;
    }
    case K_STRING:
        for (const char *p = text; *p && !why; p++)
            if ((unsigned char)*p < 0x20 || *p == 0x7f) why = "contains a control character";
        if (!why && strlen(text) >= kd->size) {
            snprintf(whybuf, sizeof whybuf, "is too long (at most %zu characters)", kd->size - 1);
            why = whybuf;
        }
        if (!why) {
            memset(field, 0, kd->size);
            memcpy(field, text, strlen(text));
        }
        break;
    case K_EXPERTS:
        dsmoe_deck_parse_experts(text, &L->ex, &why);
        break;
    case K_EP_LIST:
        if (dsmoe_deck_parse_experts(text, &L->ep, &why) == 0 && L->ep.all && L->ep.count[0] < 1)
            why = "must be >= 1";
        else if (why && strncmp(why, "expected", 8) == 0)
            why = "expected a rank count (e.g. 8) or a list of 'ep xN' items (e.g. 32 x10, 64 x2)";
        else if (why && strncmp(why, "an expert count", 15) == 0)
            why = "every expert-parallel size must be >= 1";
        break;
    }
    if (why) {
        char pre[1200];
        dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s%s = %s: %s", where(L, k, -1, pre, sizeof pre), kd->name, text, why);
        L->at[k].src = prev_src, L->at[k].line = prev_line;
        return DSMOE_ERR_INVALID;
    }
    char *copy = strdup(text);
    if (!copy) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory storing %s", kd->name);
    free(L->at[k].text);
    L->at[k].text = copy;
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Sources: deck, environment, command line

static dsmoe_status unknown_key(const char *pre, const char *name, dsmoe_err *err) {
    int s = suggest_key(name);
    if (s >= 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%sunknown key '%s' (did you mean '%s'?)", pre, name, keys[s].name);
    return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%sunknown key '%s' (dsmoe --help keys lists them)", pre, name);
}

// Records "kernel.NAME.KEY" / "comm.NAME.KEY" = value (the plugin's declarations check it later); a
// deck key given twice is an error, a command-line one replaces the earlier value.
static dsmoe_status add_plugin_setting(loader *L, const char *pre, const char *name, const char *value, int cmdline,
                                       int line, dsmoe_err *err) {
    const char *dot = strrchr(name, '.');
    char section[128];
    snprintf(section, sizeof section, "%.*s", (int)(dot - name), name);
    const char *key = dot + 1;
    size_t kind_len = strcspn(section, ".");
    if (!*key || strlen(key) >= sizeof L->cfg.plugin_settings[0].key || strlen(section + kind_len + 1) >= 64)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s'%s': expected kernel.<plugin>.<setting> or "
                             "comm.<plugin>.<setting> with names of at most 63 characters", pre, name);
    if (strlen(value) >= sizeof L->cfg.plugin_settings[0].value)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s%s = %s: the value is too long (at most 255 characters)", pre,
                             name, value);
    dsmoe_plugin_setting *ps = NULL;
    for (int i = 0; i < L->cfg.n_plugin_settings; i++) {
        dsmoe_plugin_setting *p = &L->cfg.plugin_settings[i];
        if (strncmp(p->kind, section, kind_len) || strcmp(p->plugin, section + kind_len + 1) || strcmp(p->key, key)) continue;
        if (!cmdline && !p->cmdline)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s%s given twice (first at line %d)", pre, name, p->line);
        ps = p;
    }
    if (!ps) {
        if (L->cfg.n_plugin_settings == DSMOE_PLUGIN_SETTINGS_MAX)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s%s: more than %d plugin settings", pre, name,
                                 DSMOE_PLUGIN_SETTINGS_MAX);
        ps = &L->cfg.plugin_settings[L->cfg.n_plugin_settings++];
    }
    snprintf(ps->kind, sizeof ps->kind, "%.*s", (int)kind_len, section);
    snprintf(ps->plugin, sizeof ps->plugin, "%s", section + kind_len + 1);
    snprintf(ps->key, sizeof ps->key, "%s", key);
    snprintf(ps->value, sizeof ps->value, "%s", value);
    ps->cmdline = cmdline;
    ps->line = line;
    snprintf(ps->deck, sizeof ps->deck, "%s", L->deck);
    return DSMOE_OK;
}

// "kernel.NAME.KEY" or "comm.NAME.KEY".
static int is_plugin_key(const char *name) {
    const char *dot = strrchr(name, '.');
    if (!dot) return 0;
    char section[128];
    snprintf(section, sizeof section, "%.*s", (int)(dot - name), name);
    return is_plugin_section(section);
}

static dsmoe_status on_deck_entry(void *user, const char *section, const char *key, const char *value, int line,
                                  dsmoe_err *err) {
    loader *L = user;
    char pre[1100], name[256];
    snprintf(pre, sizeof pre, "%s:%d: ", L->deck, line);
    if (!key) {
        if (is_section(section)) return DSMOE_OK;
        const char *best = NULL;
        int best_d = 4;
        for (int k = 0; k < N_KEYS; k++) {
            char sec[64];
            snprintf(sec, sizeof sec, "%.*s", (int)strcspn(keys[k].name, "."), keys[k].name);
            int d = dsmoe_edit_distance(section, sec);
            if (d < best_d) best_d = d, best = keys[k].name;
        }
        if (best)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%sunknown section '[%s]' (did you mean '[%.*s]'?)", pre,
                                 section, (int)strcspn(best, "."), best);
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%sunknown section '[%s]'", pre, section);
    }
    // A dotted key is fully qualified; a plain one belongs to the current section.
    if (strchr(key, '.') || !section[0]) snprintf(name, sizeof name, "%s", key);
    else snprintf(name, sizeof name, "%s.%s", section, key);
    if (is_plugin_key(name)) return add_plugin_setting(L, pre, name, value, 0, line, err);
    int k = dsmoe_config_find_key(name);
    if (k < 0) return unknown_key(pre, name, err);
    if (L->at[k].src == SRC_DECK)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s%s given twice (first at line %d)", pre, name, L->at[k].line);
    return set_value(L, k, value, SRC_DECK, line, err);
}

// DSMOE_<SECTION>_<KEY> overrides a key. A variable with a section's prefix that names no key is an error,
// as an unknown key of the deck is: a misspelt override would otherwise change nothing, silently. Other
// DSMOE_ variables (DSMOE_PLUGIN_PATH, a job script's DSMOE_DECK) are not overrides.
static dsmoe_status apply_env(loader *L, char *const *envp, dsmoe_err *err) {
    for (char *const *e = envp; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || strncmp(*e, "DSMOE_", 6) != 0) continue;
        size_t n = (size_t)(eq - *e);
        int key = -1, section = -1; // the key it names; a key whose section prefix it has
        for (int k = 0; k < N_KEYS && key < 0; k++) {
            char name[96];
            dsmoe_config_env_name(k, name, sizeof name);
            size_t prefix = strlen("DSMOE_") + strcspn(keys[k].name, ".") + 1; // "DSMOE_TRAIN_"
            if (strlen(name) == n && strncmp(*e, name, n) == 0) key = k;
            else if (n > prefix && strncmp(*e, name, prefix) == 0) section = k;
        }
        if (key >= 0) {
            DSMOE_TRY(set_value(L, key, eq + 1, SRC_ENV, 0, err));
            continue;
        }
        if (section < 0) continue;
        char wanted[128]; // DSMOE_TRAIN_STEPZ as train.stepz, for the suggestion
        size_t sn = strcspn(keys[section].name, "."), i = 0;
        for (const char *p = *e + 6; p < eq && i + 1 < sizeof wanted; p++, i++)
            wanted[i] = i == sn ? '.' : (char)tolower((unsigned char)*p);
        wanted[i] = '\0';
        char pre[160];
        snprintf(pre, sizeof pre, "environment %.*s: ", (int)n, *e);
        return unknown_key(pre, wanted, err);
    }
    return DSMOE_OK;
}

// "key=value", the key fully qualified, the value literal (the shell has already expanded it);
// a key given twice takes the later value.
static dsmoe_status apply_cmdline(loader *L, char *const *argv, int n, dsmoe_err *err) {
    for (int i = 0; i < n; i++) {
        const char *eq = strchr(argv[i], '=');
        if (!eq)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "command line: '%s': expected key=value", argv[i]);
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(eq - argv[i]), argv[i]);
        if (is_plugin_key(name)) {
            DSMOE_TRY(add_plugin_setting(L, "command line: ", name, eq + 1, 1, 0, err));
            continue;
        }
        int k = dsmoe_config_find_key(name);
        if (k < 0) return unknown_key("command line: ", name, err);
        DSMOE_TRY(set_value(L, k, eq + 1, SRC_CMDLINE, 0, err));
    }
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Validation on the winning values

#define KIDX(name) dsmoe_config_find_key(name)

static dsmoe_status check_range(loader *L, int k, dsmoe_err *err) {
    const key_def *kd = &keys[k];
    const range *r = &kd->r;
    if (!r->lo_kind && !r->hi_kind) return DSMOE_OK;
    const char *field = (const char *)&L->cfg + kd->off;
    double v = kd->type == K_INT        ? *(const int *)field
             : kd->type == K_U64      ? (double)*(const uint64_t *)field
             : kd->type == K_DURATION ? *(const double *)field
                                      : (double)*(const float *)field;
    int ok = (r->lo_kind != '[' || v >= r->lo) && (r->lo_kind != '(' || v > r->lo) &&
             (r->hi_kind != ']' || v <= r->hi) && (r->hi_kind != ')' || v < r->hi);
    if (ok) return DSMOE_OK;
    char pre[1200], rt[96];
    dsmoe_config_range_text(kd, rt, sizeof rt);
    return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s%s = %s: must be %s", where(L, k, -1, pre, sizeof pre), kd->name,
                         L->at[k].text, rt);
}

// Fills cfg->n_moe_layers and cfg->experts[] from the moe.experts list.
static dsmoe_status resolve_experts(loader *L, dsmoe_err *err) {
    dsmoe_config *c = &L->cfg;
    int ke = KIDX("moe.experts"), kl = KIDX("model.layers");
    char pre[1200];
    const char *txt = L->at[ke].text;
    memset(c->experts, 0, sizeof c->experts);
    c->n_moe_layers = 0;
    if (L->ex.all && L->ex.count[0] == 0) return DSMOE_OK; // dense
    int n = c->layers / c->moe_every;
    if (n == 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%smoe.experts = %s: no layer is an MoE layer (model.layers = %d, moe.every = %d)",
                             where(L, ke, kl, pre, sizeof pre), txt, c->layers, c->moe_every);
    if (n > DSMOE_MAX_MOE_LAYERS)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "%smoe.experts = %s: model.layers = %d with moe.every = %d gives %d MoE layers, more than "
                             "DSMOE_MAX_MOE_LAYERS (%d)", where(L, ke, kl, pre, sizeof pre), txt, c->layers,
                             c->moe_every, n, DSMOE_MAX_MOE_LAYERS);
    int total = 0;
    for (int i = 0; i < L->ex.n; i++) total += L->ex.reps[i];
    if (!L->ex.all && total != n)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "%smoe.experts = %s: the list covers %d MoE layers but model.layers = %d with moe.every = %d gives %d",
                             where(L, ke, kl, pre, sizeof pre), txt, total, c->layers, c->moe_every, n);
    c->n_moe_layers = n;
    for (int i = 0, l = 0; i < L->ex.n; i++)
        for (int r = 0; r < (L->ex.all ? n : L->ex.reps[i]); r++) c->experts[l++] = L->ex.count[i];
    return DSMOE_OK;
}

// Fills cfg->expert_parallel[] from the moe.expert_parallel list (after resolve_experts): a bare
// value fills every entry, so a dense model keeps it too; a list must cover the MoE layers exactly.
static dsmoe_status resolve_expert_parallel(loader *L, dsmoe_err *err) {
    dsmoe_config *c = &L->cfg;
    int kp = KIDX("moe.expert_parallel"), ke = KIDX("moe.experts");
    char pre[1200];
    memset(c->expert_parallel, 0, sizeof c->expert_parallel);
    if (L->ep.all) {
        for (int i = 0; i < DSMOE_MAX_MOE_LAYERS; i++) c->expert_parallel[i] = L->ep.count[0];
        return DSMOE_OK;
    }
    int total = 0;
    for (int i = 0; i < L->ep.n; i++) total += L->ep.reps[i];
    if (total != c->n_moe_layers)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%smoe.expert_parallel = %s: the list covers %d MoE layers but "
                             "the model has %d (moe.experts = %s)", where(L, kp, ke, pre, sizeof pre),
                             L->at[kp].text, total, c->n_moe_layers, L->at[ke].text);
    for (int i = 0, l = 0; i < L->ep.n; i++)
        for (int r = 0; r < L->ep.reps[i]; r++) c->expert_parallel[l++] = L->ep.count[i];
    // Past the MoE layers the last value repeats, so "4 x2" and "4" resolve (and print) alike.
    for (int l = c->n_moe_layers; l > 0 && l < DSMOE_MAX_MOE_LAYERS; l++) c->expert_parallel[l] = c->expert_parallel[l - 1];
    return DSMOE_OK;
}

// Overflow-checked uint64_t arithmetic for the derived sizes: a flag, once set, stays set.
static uint64_t mul_u64(uint64_t a, uint64_t b, int *over) {
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r)) *over = 1;
    return r;
}
static uint64_t add_u64(uint64_t a, uint64_t b, int *over) {
    uint64_t r;
    if (__builtin_add_overflow(a, b, &r)) *over = 1;
    return r;
}

// Bytes of the parameters with their gradients and AdamW moments (4 fp32 copies), counted as
// core/drivers/memplan.c counts the model's tensors; 0 when that does not fit in int64_t (then nothing
// that sizes or allocates them could either).
static uint64_t state_bytes(const dsmoe_config *c) {
    int over = 0;
    uint64_t M = (uint64_t)c->hidden, F = (uint64_t)c->ffn_hidden, V = (uint64_t)c->vocab, T = (uint64_t)c->seq_len;
    uint64_t ffn = add_u64(mul_u64(mul_u64(2, F, &over), M, &over), F + M, &over); // c_fc, c_proj
    uint64_t n = add_u64(mul_u64(V + T, M, &over), 2 * M, &over);                  // wte, wpe, ln_f
    // In closed form over the layers (a deck may ask for billions of them: no loop over layers here); MoE
    // layer mi is layer (mi + 1) * moe.every - 1 (dsmoe_config_is_moe_layer).
    uint64_t L = (uint64_t)c->layers, n_moe = 0;
    n = add_u64(n, mul_u64(L, add_u64(mul_u64(4 * M, M, &over), 8 * M, &over), &over), &over); // attention, norms
    for (int mi = 0; mi < c->n_moe_layers && (uint64_t)(mi + 1) * (uint64_t)c->moe_every <= L; mi++, n_moe++) {
        n = add_u64(n, mul_u64((uint64_t)c->experts[mi], add_u64(ffn, M, &over), &over), &over);
        if (c->residual) n = add_u64(n, 2 * M + 2, &over);
    }
    n = add_u64(n, mul_u64(L - n_moe + (c->residual ? n_moe : 0), ffn, &over), &over); // dense FFNs
    uint64_t bytes = mul_u64(n, 4 * sizeof(float), &over);
    return over || bytes > INT64_MAX ? 0 : bytes;
}

// Elements of one micro-step's activations (an upper bound of core/drivers/memplan.c's count, with backward
// scratch), times 4 bytes; 0 when that does not fit in int64_t.
static uint64_t activation_bytes(const dsmoe_config *c, uint64_t B) {
    int over = 0;
    uint64_t S = mul_u64(B, (uint64_t)c->seq_len, &over), L = (uint64_t)c->layers;
    uint64_t per = add_u64(mul_u64(L + 18, (uint64_t)c->hidden, &over), mul_u64(2 * L + 2, (uint64_t)c->ffn_hidden, &over),
                           &over);
    per = add_u64(per, add_u64(mul_u64(4, (uint64_t)c->vocab, &over), 8 * L + 8, &over), &over);
    uint64_t bytes = mul_u64(mul_u64(S, per, &over), sizeof(float), &over);
    return over || bytes > INT64_MAX ? 0 : bytes;
}

static dsmoe_status validate(loader *L, int world_size, dsmoe_err *err) {
    dsmoe_config *c = &L->cfg;
    char pre[1200];
    for (int k = 0; k < N_KEYS; k++) DSMOE_TRY(check_range(L, k, err));
#define FAIL(k, other, ...)                                                                                  \
    do {                                                                                                     \
        const char *p_ = where(L, k, other, pre, sizeof pre);                                                \
        char m_[1024];                                                                                       \
        snprintf(m_, sizeof m_, __VA_ARGS__);                                                                \
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s%s", p_, m_);                                        \
    } while (0)
    int k_hidden = KIDX("model.hidden"), k_heads = KIDX("model.heads");
    if (c->hidden % c->heads != 0)
        FAIL(k_hidden, k_heads, "model.hidden = %s: must be divisible by model.heads (%d)", L->at[k_hidden].text, c->heads);
    int k_ffn = KIDX("model.ffn_hidden");
    if (c->ffn_hidden == 0) {
        if (c->hidden > INT_MAX / 4)
            FAIL(k_hidden, k_ffn, "model.hidden = %s: model.ffn_hidden = 0 makes the FFN width 4 * model.hidden = %lld, "
                 "which does not fit in a 32-bit integer", L->at[k_hidden].text, 4LL * c->hidden);
        c->ffn_hidden = 4 * c->hidden;
    }
    int k_out = KIDX("run.output_dir");
    if (c->output_dir[0] == '\0') FAIL(k_out, -1, "run.output_dir is empty: give a directory (the default is dsmoe_out)");

    int k_lr = KIDX("train.lr"), k_min_lr = KIDX("train.min_lr");
    if (c->min_lr > c->lr)
        FAIL(k_min_lr, k_lr, "train.min_lr = %s: must be <= train.lr (%s)", L->at[k_min_lr].text, L->at[k_lr].text);

    int k_vocab = KIDX("model.vocab"), k_src = KIDX("data.synthetic_sources"), k_br = KIDX("data.synthetic_branching");
    if (2 * (int64_t)c->synthetic_sources >= c->vocab)
        FAIL(k_src, k_vocab, "data.synthetic_sources = %s: must be < model.vocab / 2 (model.vocab = %d)",
             L->at[k_src].text, c->vocab);
    if (c->synthetic_branching > c->vocab - c->synthetic_sources)
        FAIL(k_br, k_vocab, "data.synthetic_branching = %s: must be <= model.vocab - data.synthetic_sources (%d)",
             L->at[k_br].text, c->vocab - c->synthetic_sources);
    int k_path = KIDX("data.path"), k_source = KIDX("data.source");
    if (c->data_source != DSMOE_DATA_SYNTHETIC && c->data_path[0] == '\0')
        FAIL(k_path, k_source, "data.path is empty: it is required when data.source = %s",
             dsmoe_config_v_source[c->data_source]);

    DSMOE_TRY(resolve_experts(L, err));
    int k_ex = KIDX("moe.experts"), k_topk = KIDX("moe.top_k"), k_res = KIDX("moe.residual");
    int k_ep = KIDX("moe.expert_parallel");
    for (int i = 0; i < c->n_moe_layers; i++)
        if (c->top_k > c->experts[i])
            FAIL(k_topk, k_ex, "moe.top_k = %s: must be <= the experts of every MoE layer (MoE layer %d has %d)",
                 L->at[k_topk].text, i + 1, c->experts[i]);
    if (c->residual && c->top_k != 1)
        FAIL(k_res, k_topk, "moe.residual = %s: requires moe.top_k = 1 (it is %d)", L->at[k_res].text, c->top_k);
    DSMOE_TRY(resolve_expert_parallel(L, err));
    // A bare value keeps the one-value messages; a list names the layer whose value fails.
    int ep_all = L->ep.all;
    const char *ep_txt = L->at[k_ep].text;
    // world_size 0: the rank count is not known yet (dsmoe --plan reads it from plan.* keys first).
    if (ep_all && world_size > 0 && world_size % c->expert_parallel[0] != 0)
        FAIL(k_ep, -1, "moe.expert_parallel = %s does not divide the %d ranks of this run", ep_txt, world_size);
    for (int i = 0; i < c->n_moe_layers; i++) {
        int ep = c->expert_parallel[i], ml = (i + 1) * c->moe_every;
        if (world_size > 0 && world_size % ep != 0)
            FAIL(k_ep, -1, "moe.expert_parallel = %s: %d (MoE layer %d, model layer %d) does not divide the %d ranks "
                 "of this run", ep_txt, ep, i + 1, ml, world_size);
        if (c->experts[i] % ep != 0) {
            if (ep_all)
                FAIL(k_ep, k_ex, "moe.expert_parallel = %s does not divide the %d experts of MoE layer %d (model layer %d)",
                     ep_txt, c->experts[i], i + 1, ml);
            FAIL(k_ep, k_ex, "moe.expert_parallel = %s: %d (MoE layer %d, model layer %d) does not divide the %d "
                 "experts of that layer", ep_txt, ep, i + 1, ml, c->experts[i]);
        }
    }

    // Tensor slicing (inference only): ranks are (data rank, tensor rank) with the tensor rank fastest;
    // an expert-parallel group is made of ranks with the same tensor rank.
    int k_tp = KIDX("generate.tensor_parallel"), tp = c->gen_tensor_parallel, k_es = KIDX("generate.expert_slicing");
    const char *tp_txt = L->at[k_tp].text;
    if (c->gen_expert_slicing && tp == 1 && c->mode == DSMOE_MODE_GENERATE)
        FAIL(k_es, k_tp, "generate.expert_slicing = %s: experts are sliced over the tensor group, and "
             "generate.tensor_parallel = 1 has none (set it to the slicing width)", L->at[k_es].text);
    if (tp > 1) {
        if (c->mode != DSMOE_MODE_GENERATE)
            FAIL(k_tp, -1, "generate.tensor_parallel = %s: tensor slicing is for run.mode = generate only (training "
                 "with tensor slicing is not supported)", tp_txt);
        if (world_size > 0 && world_size % tp != 0)
            FAIL(k_tp, -1, "generate.tensor_parallel = %s does not divide the %d ranks of this run", tp_txt, world_size);
        if (c->heads % tp != 0)
            FAIL(k_tp, k_heads, "generate.tensor_parallel = %s does not divide model.heads = %d (attention is split "
                 "by heads)", tp_txt, c->heads);
        if (c->ffn_hidden % tp != 0)  // the dense FFN, and the experts under generate.expert_slicing
            FAIL(k_tp, k_ffn, "generate.tensor_parallel = %s does not divide model.ffn_hidden = %d (the dense FFN is "
                 "split by its hidden columns)", tp_txt, c->ffn_hidden);
        for (int i = 0; world_size > 0 && i < c->n_moe_layers; i++)
            if ((world_size / tp) % c->expert_parallel[i] != 0)
                FAIL(k_ep, k_tp, "moe.expert_parallel = %s: %d (MoE layer %d) does not divide the %d ranks of one "
                     "tensor rank (%d ranks / generate.tensor_parallel %d): an expert-parallel group is made of "
                     "ranks with the same tensor rank", ep_txt, c->expert_parallel[i], i + 1, world_size / tp,
                     world_size, tp);
    }

    int k_a2a = KIDX("moe.alltoall"), k_rpn = KIDX("moe.ranks_per_node");
    for (int i = 0; i < (ep_all ? 1 : c->n_moe_layers); i++)
        if (c->alltoall == 1 /* hierarchical */ && c->ranks_per_node > 0 && c->expert_parallel[i] % c->ranks_per_node != 0) {
            if (ep_all)
                FAIL(k_rpn, k_a2a, "moe.ranks_per_node = %s does not divide moe.expert_parallel (%d), which "
                     "moe.alltoall = hierarchical needs", L->at[k_rpn].text, c->expert_parallel[i]);
            FAIL(k_rpn, k_a2a, "moe.ranks_per_node = %s does not divide moe.expert_parallel of MoE layer %d (%d), "
                 "which moe.alltoall = hierarchical needs", L->at[k_rpn].text, i + 1, c->expert_parallel[i]);
        }

    int k_batch = KIDX("train.batch"), k_micro = KIDX("train.micro_batch");
    if (world_size == 0) {
        // rank-count rules wait for the real count
    } else if (c->mode == DSMOE_MODE_GENERATE) {
        c->micro_batch = 1; // generation has its own batches (generate.batch); the model holds one sequence
    } else if (c->micro_batch == 0) {
        if (c->batch % world_size != 0)
            FAIL(k_batch, k_micro, "train.batch = %s: must be divisible by the %d ranks of this run "
                 "(train.micro_batch = 0 means train.batch / ranks)", L->at[k_batch].text, world_size);
        c->micro_batch = c->batch / world_size;
    } else if (c->batch % ((int64_t)c->micro_batch * world_size) != 0) {
        int64_t per_step = (int64_t)c->micro_batch * world_size;
        FAIL(k_batch, k_micro, "train.batch = %s: must be divisible by train.micro_batch (%d) x %d ranks = %" PRId64
             " (it would need %.3g accumulation steps)", L->at[k_batch].text, c->micro_batch, world_size, per_step,
             (double)c->batch / (double)per_step);
    }

    // Derived sizes, so that a model too large to count fails here with its keys, not as a wrapped
    // size in the allocator or the memory plan.
    int k_layers = KIDX("model.layers");
    if (state_bytes(c) == 0)
        FAIL(k_hidden, k_layers, "model.hidden = %s: with model.layers = %d, model.vocab = %d, model.ffn_hidden = %d "
             "and moe.experts = %s the parameters, their gradients and AdamW state (16 bytes each) need more than "
             "2^63 bytes", L->at[k_hidden].text, c->layers, c->vocab, c->ffn_hidden, L->at[k_ex].text);
    int k_seq = KIDX("model.seq_len");
    uint64_t B = c->micro_batch > 0 ? (uint64_t)c->micro_batch : 1; // 0: world size not known yet, the least
    if ((int64_t)B * c->seq_len > INT_MAX)
        FAIL(k_seq, k_micro, "model.seq_len = %s: %" PRIu64 " sequences per micro-step x %d tokens = %" PRId64 " tokens, "
             "more than a 32-bit count holds (lower train.micro_batch or model.seq_len)", L->at[k_seq].text, B,
             c->seq_len, (int64_t)B * c->seq_len);
    if (activation_bytes(c, B) == 0)
        FAIL(k_seq, k_hidden, "model.seq_len = %s: the activations of %" PRIu64 " sequences per micro-step (model.hidden "
             "= %d, model.ffn_hidden = %d, model.vocab = %d, model.layers = %d) need more than 2^63 bytes",
             L->at[k_seq].text, B, c->hidden, c->ffn_hidden, c->vocab, c->layers);
#undef FAIL
    return DSMOE_OK;
}

// ---------------------------------------------------------------------------------------------------
// Loading

dsmoe_status dsmoe_config_load_text(const char *deck_text, const char *deck_name, char *const *argv_overrides,
                                    int n_overrides, char *const *envp, int world_size, dsmoe_config *cfg,
                                    dsmoe_config_sources **sources, dsmoe_err *err) {
    if (sources) *sources = NULL;
    if (!deck_name) deck_name = "deck";
    if (world_size < 0)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "%s: world size %d: must be >= 0", deck_name, world_size);
    if (!envp) envp = environ;
    loader *L = dsmoe_calloc(1, sizeof *L, "the configuration loader", err);
    if (!L) return DSMOE_ERR_NOMEM;
    L->deck = deck_name;
    dsmoe_status st = DSMOE_OK;
    for (int k = 0; k < N_KEYS && st == DSMOE_OK; k++) st = set_value(L, k, keys[k].def, SRC_DEFAULT, 0, err);
    if (st == DSMOE_OK) st = dsmoe_deck_parse(deck_text, deck_name, envp, on_deck_entry, L, err);
    if (st == DSMOE_OK) st = apply_env(L, envp, err);
    if (st == DSMOE_OK) st = apply_cmdline(L, argv_overrides, n_overrides, err);
    if (st == DSMOE_OK) st = validate(L, world_size, err);
    if (st == DSMOE_OK && sources) {
        dsmoe_config_sources *s = dsmoe_calloc(1, sizeof *s, "the configuration sources", err);
        if (!s) st = DSMOE_ERR_NOMEM;
        else {
            snprintf(s->deck, sizeof s->deck, "%s", deck_name);
            for (int k = 0; k < N_KEYS; k++) s->at[k].src = L->at[k].src, s->at[k].line = L->at[k].line;
            *sources = s;
        }
    }
    if (st == DSMOE_OK) memcpy(cfg, &L->cfg, sizeof *cfg); // memcpy keeps the zeroed padding: cfgs compare
    loader_free(L);
    return st;
}

dsmoe_status dsmoe_config_load(const char *deck_path, char *const *argv_overrides, int n_overrides, char *const *envp,
                               int world_size, dsmoe_config *cfg, dsmoe_config_sources **sources, dsmoe_err *err) {
    if (sources) *sources = NULL;
    char *text = NULL;
    size_t len = 0;
    DSMOE_TRY(dsmoe_deck_read_file(deck_path, &text, &len, err));
    if (strcmp(deck_path, "-") == 0) deck_path = "<stdin>"; // the name dsmoe_deck_read_file's messages use
    dsmoe_status st = dsmoe_config_load_text(text, deck_path, argv_overrides, n_overrides, envp, world_size, cfg,
                                             sources, err);
    free(text);
    return st;
}

void dsmoe_config_sources_free(dsmoe_config_sources *sources) { free(sources); }

// ---------------------------------------------------------------------------------------------------
// Derived quantities

int dsmoe_config_is_moe_layer(const dsmoe_config *cfg, int layer, int *moe_index) {
    int i = layer + 1; // the deck counts layers from 1
    int is = cfg->n_moe_layers > 0 && layer >= 0 && layer < cfg->layers && i % cfg->moe_every == 0 &&
             i / cfg->moe_every <= cfg->n_moe_layers;
    if (moe_index) *moe_index = is ? i / cfg->moe_every - 1 : -1;
    return is;
}

int dsmoe_config_capacity(const dsmoe_config *cfg, int S, int E, int training) {
    return dsmoe_capacity(S, E, cfg->top_k, training ? cfg->capacity_factor : cfg->eval_capacity_factor,
                          cfg->min_capacity);
}
