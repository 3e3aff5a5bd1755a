// core/deck/config_print.c: the resolved configuration as a deck (every key with the source of its value,
// which loads back to the same configuration), a key's source for messages, and `dsmoe --help keys`.
// defines: dsmoe_config_print, dsmoe_config_to_text, dsmoe_config_source_of, dsmoe_config_print_keys
#define _GNU_SOURCE // open_memstream
#include "config.h"
#include "config_keys.h" // the table, the sources, the key helpers

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const key_def *const keys = dsmoe_config_keys;
static const char *const *const type_names = dsmoe_config_type_names;
#define N_KEYS dsmoe_config_n_keys

// A per-MoE-layer list in the compact form: runs of equal values as "value xN".
static void format_runs(const int *v, int count, char *buf, size_t n) {
    size_t m = 0;
    buf[0] = '\0';
    for (int i = 0; i < count && m < n;) {
        int j = i;
        while (j < count && v[j] == v[i]) j++;
        m += (size_t)snprintf(buf + m, n - m, "%s%d x%d", i ? ", " : "", v[i], j - i);
        i = j;
    }
}

// moe.experts: "0" for a dense model, else the runs.
static void format_experts(const dsmoe_config *c, char *buf, size_t n) {
    if (c->n_moe_layers == 0) snprintf(buf, n, "0");
    else format_runs(c->experts, c->n_moe_layers, buf, n);
}

// moe.expert_parallel: one value when every MoE layer has the same (or the model is dense), else the runs.
static void format_expert_parallel(const dsmoe_config *c, char *buf, size_t n) {
    int same = 1;
    for (int i = 1; i < c->n_moe_layers; i++) same = same && c->expert_parallel[i] == c->expert_parallel[0];
    if (same) snprintf(buf, n, "%d", c->expert_parallel[0]);
    else format_runs(c->expert_parallel, c->n_moe_layers, buf, n);
}

static void format_value(const dsmoe_config *c, int k, char *buf, size_t n) {
    const key_def *kd = &keys[k];
    const char *field = (const char *)c + kd->off;
    switch (kd->type) {
    case K_INT: snprintf(buf, n, "%d", *(const int *)field); break;
    case K_U64: snprintf(buf, n, "%" PRIu64, *(const uint64_t *)field); break;
    case K_FLOAT: dsmoe_deck_format_float(*(const float *)field, buf, n); break;
    case K_DURATION: { // "1800s", "0.2s"
        dsmoe_deck_format_double(*(const double *)field, buf, n);
        size_t len = strlen(buf);
        if (len + 1 < n) buf[len] = 's', buf[len + 1] = '\0';
        break;
    }
    case K_BOOL: snprintf(buf, n, "%s", *(const int *)field ? "true" : "false"); break;
    case K_ENUM: {
        int v = *(const int *)field, count = 0;
        while (kd->values[count]) count++;
        snprintf(buf, n, "%s", v >= 0 && v < count ? kd->values[v] : "?");
        break;
    }
    case K_STRING: dsmoe_deck_format_string(field, buf, n); break;
    case K_EXPERTS: format_experts(c, buf, n); break;
    case K_EP_LIST: format_expert_parallel(c, buf, n); break;
    }
}

dsmoe_status dsmoe_config_print(FILE *out, const dsmoe_config *cfg, const dsmoe_config_sources *sources) {
    fprintf(out, "# dsmoe configuration, every key with where its value came from (a valid deck)\n");
    for (int k = 0; k < N_KEYS; k++) {
        const char *name = keys[k].name, *dot = strchr(name, '.');
        if (k == 0 || !dsmoe_config_same_section(name, keys[k - 1].name)) fprintf(out, "\n[%.*s]\n", (int)(dot - name), name);
        char value[8200]; // data.path may hold 4095 characters, each escaped when quoted
        format_value(cfg, k, value, sizeof value);
        int width = fprintf(out, "%s = %s", dot + 1, value);
        if (!sources) {
            fputc('\n', out);
            continue;
        }
        fprintf(out, "%*s# ", width < 37 ? 40 - width : 3, "");
        char env[96];
        switch (sources->at[k].src) {
        case SRC_DECK:
            fputs("deck ", out);
            for (const char *p = sources->deck; *p; p++) fputc((unsigned char)*p < 0x20 ? '?' : *p, out); // a comment ends at a line end
            fprintf(out, ":%d\n", sources->at[k].line);
            break;
        case SRC_ENV: dsmoe_config_env_name(k, env, sizeof env); fprintf(out, "env %s\n", env); break;
        case SRC_CMDLINE: fprintf(out, "command line\n"); break;
        default: fprintf(out, "default\n"); break;
        }
    }
    return ferror(out) ? DSMOE_ERR_IO : DSMOE_OK;
}

void dsmoe_config_source_of(const dsmoe_config_sources *sources, const char *key, char *buf, size_t n) {
    int k = dsmoe_config_find_key(key);
    char env[96];
    if (k < 0) snprintf(buf, n, "%s", "");
    else if (!sources) snprintf(buf, n, "the default");
    else switch (sources->at[k].src) {
        case SRC_DECK: snprintf(buf, n, "deck %s:%d", sources->deck, sources->at[k].line); break;
        case SRC_ENV: dsmoe_config_env_name(k, env, sizeof env); snprintf(buf, n, "environment %s", env); break;
        case SRC_CMDLINE: snprintf(buf, n, "the command line"); break;
        default: snprintf(buf, n, "the default"); break;
        }
}

char *dsmoe_config_to_text(const dsmoe_config *cfg, const dsmoe_config_sources *sources) {
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    if (!mem) return NULL;
    dsmoe_status st = dsmoe_config_print(mem, cfg, sources);
    if (fclose(mem) != 0 || st != DSMOE_OK) {
        free(text);
        return NULL;
    }
    return text;
}

void dsmoe_config_print_keys(FILE *out) {
    fprintf(out, "dsmoe deck keys (see docs/deck.md). Set one in a deck ([section] then key = value), in the\n"
                 "environment (DSMOE_SECTION_KEY), or on the command line (section.key=value, after the deck).\n");
    for (int k = 0; k < N_KEYS; k++) {
        const key_def *kd = &keys[k];
        const char *dot = strchr(kd->name, '.');
        if (k == 0 || !dsmoe_config_same_section(kd->name, keys[k - 1].name)) fprintf(out, "\n[%.*s]\n", (int)(dot - kd->name), kd->name);
        char extra[160] = "";
        if (kd->type == K_ENUM) {
            size_t m = 0;
            for (int i = 0; kd->values[i] && m < sizeof extra; i++)
                m += (size_t)snprintf(extra + m, sizeof extra - m, "%s%s", i ? " | " : ": ", kd->values[i]);
        } else if (kd->r.lo_kind) {
            extra[0] = ',', extra[1] = ' ';
            dsmoe_config_range_text(kd, extra + 2, sizeof extra - 2);
        }
        fprintf(out, "  %s = %s%s   (%s%s)\n      %s\n", kd->name, kd->def[0] ? "" : "\"\"", kd->def,
                type_names[kd->type], extra, kd->help);
    }
}
