// core/drivers/train_metrics.c: see train_metrics.h.
#define _GNU_SOURCE
#include "train_metrics.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "train.h" // DSMOE_EXIT_METRICS_FAILED

static void metrics_printf(dsmoe_metrics_file *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void metrics_printf(dsmoe_metrics_file *m, const char *fmt, ...) {
    if (!m->f || m->write_errno) return;
    va_list ap;
    va_start(ap, fmt);
    if (vfprintf(m->f, fmt, ap) < 0) m->write_errno = errno ? errno : EIO;
    va_end(ap);
}

// Ends a row (or the header): flushes, and reports the first failure.
static void end_row(dsmoe_metrics_file *m, int step) {
    if (!m->f) return;
    errno = 0;
    if (!m->write_errno && (fflush(m->f) != 0 || ferror(m->f))) m->write_errno = errno ? errno : EIO;
    if (!m->write_errno) return;
    m->failed_step = step;
    fprintf(stderr, "dsmoe: warning: cannot write metrics file %s (%s at step %d): training goes on without its rows; "
            "dsmoe will exit with code %d at the end\n", m->path, strerror(m->write_errno), step,
            DSMOE_EXIT_METRICS_FAILED);
    fflush(stderr);
}

static void header(dsmoe_metrics_file *m, const dsmoe_config *c) {
    metrics_printf(m, "step,loss,aux_loss,lr,grad_norm,tokens_per_s,dropped_frac,elapsed_s,valid_loss");
    if (m->kd_column) metrics_printf(m, ",kd_loss"); // empty on steps that do not distil
    for (int i = 0; i < c->n_moe_layers; i++) {
        metrics_printf(m, ",moe%d_capacity,moe%d_drop", i, i);
        for (int e = 0; e < c->experts[i]; e++) metrics_printf(m, ",moe%d_load_e%d", i, e);
    }
    metrics_printf(m, "\n");
    end_row(m, 0);
}

void dsmoe_metrics_row(dsmoe_metrics_file *m, const dsmoe_config *c, const dsmoe_metrics_values *v) {
    if (!m->f || m->write_errno) return;
    metrics_printf(m, "%d,%.9g,%.9g,%.6e,%.9g,%.1f,%.6f,%.3f,", v->step, v->loss, v->aux_loss, v->lr, v->grad_norm,
                   v->tokens_per_s, v->dropped_frac, v->elapsed_s);
    if (!isnan(v->valid_loss)) metrics_printf(m, "%.9g", v->valid_loss);
    if (m->kd_column) metrics_printf(m, isnan(v->kd_loss) ? "," : ",%.9g", v->kd_loss);
    for (int i = 0; i < c->n_moe_layers; i++) {
        long kept = 0;
        for (int e = 0; e < c->experts[i]; e++) kept += v->loads[i * v->max_e + e];
        double routed = v->routed_per_layer;
        metrics_printf(m, ",%d,%.6f", v->capacity[i], routed > 0 ? 1.0 - kept / routed : 0.0);
        for (int e = 0; e < c->experts[i]; e++)
            metrics_printf(m, ",%.5f", kept ? (double)v->loads[i * v->max_e + e] / kept : 0.0);
    }
    metrics_printf(m, "\n");
    end_row(m, v->step);
}

// On resume, rows after the checkpoint's step come from a run that went on past it (killed later, or
// stopped by a signal after its last checkpoint.every): drop them, and a torn last line, so that each
// step appears once; and fills fill_valid (unless NaN) into row `step`'s empty valid_loss field (the 9th).
// Writes through a temporary file and a rename. *has_header: the file has its header; *kd_column: with a
// kd_loss column.
static dsmoe_status trim(const char *path, int step, double fill_valid, int *has_header, int *kd_column,
                         dsmoe_err *err) {
    *has_header = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return DSMOE_OK; // a new file: the caller writes the header
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = dsmoe_malloc((size_t)len + 1, "metrics file", err);
    if (!text) {
        fclose(f);
        return err->status;
    }
    size_t got = fread(text, 1, (size_t)len, f);
    fclose(f);
    text[got] = '\0';
    size_t keep = 0, at = 0; // keep: bytes of whole lines to keep, all of them at the start of the file
    size_t fill_at = 0;      // where row `step`'s valid_loss field goes (0: nowhere)
    while (at < got) {
        char *nl = memchr(text + at, '\n', got - at);
        if (!nl) break; // torn line
        size_t end = (size_t)(nl - text) + 1;
        if (at == 0 && strncmp(text, "step,", 5) == 0) {
            *has_header = 1;
            *nl = ','; // the last field too ends in a comma
            *kd_column = memmem(text, end, ",kd_loss,", 9) != NULL;
            *nl = '\n';
        } else if (strtol(text + at, NULL, 10) > step) {
            break;
        } else if (strtol(text + at, NULL, 10) == step && !isnan(fill_valid)) {
            size_t c = at;
            for (int commas = 0; c < end && commas < 8; c++) commas += text[c] == ',';
            if (c < end && (text[c] == ',' || text[c] == '\n')) fill_at = c; // the 9th field, empty
        }
        keep = at = end;
    }
    dsmoe_status s = DSMOE_OK;
    if (keep < got) printf("metrics: dropped %zu bytes of rows after step %d from %s\n", got - keep, step, path);
    if (fill_at) {
        char num[32];
        int n = snprintf(num, sizeof num, "%.9g", fill_valid);
        char *out = dsmoe_malloc(keep + (size_t)n, "metrics file", err);
        if (!out) {
            free(text);
            return err->status;
        }
        memcpy(out, text, fill_at);
        memcpy(out + fill_at, num, (size_t)n);
        memcpy(out + fill_at + n, text + fill_at, keep - fill_at);
        s = dsmoe_write_file_atomic(path, out, keep + (size_t)n, err);
        free(out);
    } else if (keep < got) {
        s = dsmoe_write_file_atomic(path, text, keep, err);
    }
    free(text);
    return s;
}

// A new run over a file with rows of an earlier one (a run that ended, or crashed, before a checkpoint it
// could be resumed from: the one-run-per-directory check of checkpoint.md lets it through) keeps those
// rows as <path>.N, the first N free, rather than truncating them: they may be all that says why that run
// failed.
static dsmoe_status keep_earlier(const char *path, dsmoe_err *err) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) return DSMOE_OK; // none, or /dev/null
    char kept[2100];
    for (int i = 1; i <= 9999; i++) {
        snprintf(kept, sizeof kept, "%s.%d", path, i);
        if (access(kept, F_OK) != 0) {
            if (rename(path, kept) != 0)
                return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot keep the earlier run's metrics file %s as %s: %s",
                                     path, kept, strerror(errno));
            printf("metrics: %s held an earlier run's rows: kept as %s\n", path, kept);
            return DSMOE_OK;
        }
    }
    return dsmoe_err_set(err, DSMOE_ERR_IO, "metrics file %s: %s.1 to %s.9999 all exist: move the earlier runs' "
                         "metrics away, or set metrics.file", path, path, path);
}

dsmoe_status dsmoe_metrics_open(dsmoe_metrics_file *m, const dsmoe_config *c, const char *path, int resumed, int step,
                                double fill_valid, dsmoe_err *err) {
    memset(m, 0, sizeof *m);
    snprintf(m->path, sizeof m->path, "%s", path);
    if (!resumed) DSMOE_TRY(keep_earlier(m->path, err));
    m->kd_column = dsmoe_config_distills(c);
    int has_header = 0;
    if (resumed) DSMOE_TRY(trim(m->path, step, fill_valid, &has_header, &m->kd_column, err));
    if (has_header && dsmoe_config_distills(c) && !m->kd_column)
        printf("metrics: %s has no kd_loss column (the run it continues did not distil): the distillation loss goes "
               "to the log only\n", m->path);
    m->f = fopen(m->path, resumed ? "a" : "w");
    if (!m->f) return dsmoe_err_set(err, DSMOE_ERR_IO, "cannot open metrics file %s: %s", m->path, strerror(errno));
    if (!has_header) header(m, c);
    return DSMOE_OK;
}

int dsmoe_metrics_close(dsmoe_metrics_file *m, int steps_done) {
    if (m->f) {
        errno = 0;
        if (fclose(m->f) != 0 && !m->write_errno) {
            m->write_errno = errno ? errno : EIO;
            m->failed_step = steps_done;
        }
        m->f = NULL;
    }
    if (m->write_errno)
        fprintf(stderr, "dsmoe: warning: metrics file %s is incomplete: writing failed at step %d (%s): exit code %d\n",
                m->path, m->failed_step, strerror(m->write_errno), DSMOE_EXIT_METRICS_FAILED);
    return m->write_errno != 0;
}
