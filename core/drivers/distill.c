// core/drivers/distill.c: see distill.h.
#include "distill.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "safetensors.h"

struct dsmoe_teacher {
    dsmoe_config cfg; // the model keeps a pointer to it
    dsmoe_model *model;
    int *layer_map;   // (student layers) distill.init_layers, or NULL
};

// distill.init_layers: one teacher block index per student block. map may be NULL (only checks).
static dsmoe_status parse_layer_map(const dsmoe_config *c, const dsmoe_config *t, int *map, dsmoe_err *err) {
    const char *p = c->distill_init_layers;
    int n = 0;
    while (*p) {
        char *end;
        while (*p == ' ' || *p == '\t') p++;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v >= t->layers)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "distill.init_layers = %s: item %d is not a teacher block "
                                 "in [0, %d) (the teacher has %d layers)", c->distill_init_layers, n + 1, t->layers,
                                 t->layers);
        if (n < c->layers && map) map[n] = (int)v;
        n++;
        p = end;
        while (*p == ' ' || *p == '\t') p++;
        if (*p == ',') p++;
        else if (*p)
            return dsmoe_err_set(err, DSMOE_ERR_INVALID, "distill.init_layers = %s: expected comma-separated block "
                                 "numbers", c->distill_init_layers);
    }
    if (n != c->layers)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "distill.init_layers = %s names %d blocks; the student has "
                             "model.layers = %d: give one teacher block per student block", c->distill_init_layers, n,
                             c->layers);
    return DSMOE_OK;
}

// The teacher's deck text: distill.teacher_deck, else the "deck" metadata of the teacher checkpoint.
static dsmoe_status teacher_deck_text(const dsmoe_config *c, char **text, char *where, size_t where_len,
                                      dsmoe_err *err) {
    *text = NULL;
    if (c->distill_teacher_deck[0]) {
        snprintf(where, where_len, "teacher deck %s (distill.teacher_deck)", c->distill_teacher_deck);
        size_t len;
        dsmoe_err e = {0};
        if (dsmoe_deck_read_file(c->distill_teacher_deck, text, &len, &e) != DSMOE_OK)
            return dsmoe_err_set(err, e.status, "distill.teacher_deck: %s", e.msg);
        return DSMOE_OK;
    }
    snprintf(where, where_len, "the deck stored in teacher checkpoint %s", c->distill_teacher);
    dsmoe_st_file *f = NULL;
    dsmoe_err e = {0};
    if (dsmoe_st_open(c->distill_teacher, &f, &e) != DSMOE_OK)
        return dsmoe_err_set(err, e.status, "distill.teacher = %s: %s", c->distill_teacher, e.msg);
    const char *deck = dsmoe_st_meta(f, "deck");
    dsmoe_status s = DSMOE_OK;
    if (!deck || !deck[0])
        s = dsmoe_err_set(err, DSMOE_ERR_INVALID, "distill.teacher = %s holds no deck in its metadata: set "
                          "distill.teacher_deck to the deck that trained it", c->distill_teacher);
    else if (!(*text = strdup(deck)))
        s = dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory reading the teacher's deck");
    dsmoe_st_close(f);
    return s;
}

dsmoe_status dsmoe_teacher_config_load(const dsmoe_config *c, int world_size, dsmoe_config *t, char *where,
                                       size_t where_len, dsmoe_err *err) {
    char where_buf[1200];
    if (!where) {
        where = where_buf;
        where_len = sizeof where_buf;
    }
    char *text = NULL;
    DSMOE_TRY(teacher_deck_text(c, &text, where, where_len, err));
    // The teacher follows the student's batch and precision and is not itself distilling; the student's
    // DSMOE_* environment overrides are the student's, so none is applied here.
    char ov[6][96];
    snprintf(ov[0], sizeof ov[0], "run.mode=eval");
    snprintf(ov[1], sizeof ov[1], "run.precision=%s", c->precision == DSMOE_PRECISION_BF16 ? "bf16" : "fp32");
    snprintf(ov[2], sizeof ov[2], "train.batch=%d", c->batch);
    snprintf(ov[3], sizeof ov[3], "train.micro_batch=%d", c->micro_batch);
    snprintf(ov[4], sizeof ov[4], "distill.teacher=");
    snprintf(ov[5], sizeof ov[5], "checkpoint.resume=");
    char *overrides[6];
    for (int i = 0; i < 6; i++) overrides[i] = ov[i];
    char *no_env[] = {NULL};
    dsmoe_err e = {0};
    dsmoe_status s = dsmoe_config_load_text(text, where, overrides, 6, no_env, world_size, t, NULL, &e);
    free(text);
    if (s != DSMOE_OK) return dsmoe_err_set(err, s, "distillation teacher: %s", e.msg);
    if (t->vocab != c->vocab || t->seq_len != c->seq_len)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "distill.teacher = %s: the teacher has model.vocab = %d and model.seq_len = %d (%s); the "
                             "student has %d and %d: a student must share the teacher's vocabulary and sequence length",
                             c->distill_teacher, t->vocab, t->seq_len, where, c->vocab, c->seq_len);
    if (c->distill_init_layers[0]) DSMOE_TRY(parse_layer_map(c, t, NULL, err));
    return DSMOE_OK;
}

dsmoe_status dsmoe_teacher_check(const dsmoe_config *c, int world_size, int say, dsmoe_err *err) {
    dsmoe_config t;
    char where[1200];
    DSMOE_TRY(dsmoe_teacher_config_load(c, world_size, &t, where, sizeof where, err));
    dsmoe_train_position pos;
    dsmoe_err e = {0};
    if (dsmoe_checkpoint_verify(&t, c->distill_teacher, &pos, &e) != DSMOE_OK)
        return dsmoe_err_set(err, e.status, "distill.teacher: %s", e.msg);
    if (say) printf("distill: teacher %s verifies (step %d; %s)\n", c->distill_teacher, pos.step, where);
    return DSMOE_OK;
}

dsmoe_status dsmoe_teacher_open(const dsmoe_config *c, dsmoe_runtime *rt, int B, dsmoe_teacher **out, dsmoe_err *err) {
    *out = NULL;
    dsmoe_teacher *t = calloc(1, sizeof *t);
    if (!t) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for the distillation teacher");
    *out = t;
    char where[1200];
    DSMOE_TRY(dsmoe_errors_agree(dsmoe_teacher_config_load(c, rt->world_size, &t->cfg, where, sizeof where, err), err));
    if (!rt->kern->distill_forward)
        return dsmoe_errors_agree(
            dsmoe_err_set(err, DSMOE_ERR_UNSUPPORTED, "distill.teacher: kernel plugin '%s' has no distillation ops "
                          "(distill_forward, DSMOE_KCAP_DISTILL); use one that has them (cpu)", rt->kern->name), err);
    if (c->distill_init_layers[0]) {
        if (!(t->layer_map = calloc((size_t)c->layers, sizeof *t->layer_map)))
            return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for distill.init_layers");
        DSMOE_TRY(parse_layer_map(c, &t->cfg, t->layer_map, err)); // checked above: cannot fail on one rank only
    }
    DSMOE_TRY(dsmoe_model_create_forward_only(&t->cfg, rt, B, &t->model, err));
    dsmoe_train_position pos;
    dsmoe_err e = {0};
    dsmoe_status s = dsmoe_checkpoint_load(t->model, NULL, &t->cfg, c->distill_teacher, &pos, &e);
    if (s != DSMOE_OK) dsmoe_err_set(err, s, "distill.teacher: %s", e.msg);
    DSMOE_TRY(dsmoe_errors_agree(s, err));
    char stop[64] = "on every step";
    if (c->distill_stop_step) snprintf(stop, sizeof stop, "on steps 1-%d (then the plain loss)", c->distill_stop_step);
    if (rt->world_rank == 0)
        printf("distill: teacher %s (step %d, %zu parameters, %d layers, %d MoE layers; %s), temperature %g, "
               "alpha %g, beta %g, %s\n", c->distill_teacher, pos.step, dsmoe_model_global_params(t->model),
               t->cfg.layers, t->cfg.n_moe_layers, where, (double)c->distill_temperature, (double)c->distill_alpha,
               (double)c->distill_beta, stop);
    return DSMOE_OK;
}

dsmoe_status dsmoe_teacher_forward(dsmoe_teacher *t, const int32_t *inputs, uint64_t token_offset, const void **logits,
                                   dsmoe_err *err) {
    dsmoe_forward_result r;
    DSMOE_TRY(dsmoe_model_forward(t->model, inputs, NULL, 0, 0, token_offset, &r, err));
    *logits = dsmoe_model_logits(t->model);
    return DSMOE_OK;
}

dsmoe_status dsmoe_teacher_init_student(const dsmoe_teacher *t, dsmoe_model *student, dsmoe_err *err) {
    const dsmoe_config *c = dsmoe_model_config(student);
    if (!t->layer_map) return DSMOE_OK;
    dsmoe_err e = {0};
    dsmoe_status s = dsmoe_checkpoint_load_mapped(student, c->distill_teacher, t->layer_map, &e);
    if (s != DSMOE_OK) return dsmoe_err_set(err, s, "distill.init_layers = %s: %s", c->distill_init_layers, e.msg);
    if (dsmoe_model_runtime(student)->world_rank == 0)
        printf("distill: the student starts from the teacher's blocks %s (embeddings and final layer norm too)\n",
               c->distill_init_layers);
    return DSMOE_OK;
}

const dsmoe_config *dsmoe_teacher_cfg(const dsmoe_teacher *t) { return &t->cfg; }

void dsmoe_teacher_close(dsmoe_teacher *t) {
    if (!t) return;
    dsmoe_model_free(t->model);
    free(t->layer_map);
    free(t);
}
