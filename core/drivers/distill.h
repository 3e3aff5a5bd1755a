// core/drivers/distill.h: the teacher of knowledge distillation (Mixture-of-Students, docs/distill.md).
// defines: dsmoe_teacher, dsmoe_teacher_config_load, dsmoe_teacher_check, dsmoe_teacher_open, dsmoe_teacher_forward,
//          dsmoe_teacher_init_student, dsmoe_teacher_close, dsmoe_distill_on_at
//
// The teacher is a dsmoe checkpoint with its deck (distill.teacher_deck, or the deck stored in the
// checkpoint). It runs forward only, in eval mode (no noise, its moe.eval_capacity_factor), with no
// gradients or optimizer state, on the student's micro-batches, in the student's run.precision and on
// the student's ranks (its own moe.expert_parallel, which must suit the rank count as the student's does).
#ifndef DSMOE_DISTILL_H
#define DSMOE_DISTILL_H
#include "config.h"
#include "model.h"
#include "runtime.h"

typedef struct dsmoe_teacher dsmoe_teacher;

// The teacher's configuration for the student config `student` on world_size ranks (0 = not known):
// its deck, with the student's precision and batch imposed, checked against the student (the same
// model.vocab and model.seq_len). Local; names the deck (file, or "deck in <checkpoint>") in errors.
// *where (may be NULL) receives that name.
dsmoe_status dsmoe_teacher_config_load(const dsmoe_config *student, int world_size, dsmoe_config *teacher,
                                       char *where, size_t where_len, dsmoe_err *err);

// dsmoe --check: the teacher's deck (as dsmoe_teacher_config_load) and its checkpoint verified against
// it, without building a model. Local; say = 1 prints the verdict (rank 0).
dsmoe_status dsmoe_teacher_check(const dsmoe_config *student, int world_size, int say, dsmoe_err *err);

// Collective: loads the teacher for the student config (whose distill.teacher is set) as a forward-only
// model of micro-batch B on rt, and verifies and loads its checkpoint (failures agreed on every rank).
dsmoe_status dsmoe_teacher_open(const dsmoe_config *student, dsmoe_runtime *rt, int B, dsmoe_teacher **teacher,
                                dsmoe_err *err);
// Enqueues the teacher's forward of (B*T) host input ids: *logits (S, V) of the activation dtype is
// valid for work enqueued after it on rt. token_offset: as dsmoe_model_forward's.
dsmoe_status dsmoe_teacher_forward(dsmoe_teacher *teacher, const int32_t *inputs, uint64_t token_offset,
                                   const void **logits, dsmoe_err *err);
// Local (the caller agrees on the outcome): distill.init_layers set, the student's parameters from the teacher checkpoint (block i from the
// teacher's block init_layers[i], the other tensors by name; shapes must match); else nothing.
dsmoe_status dsmoe_teacher_init_student(const dsmoe_teacher *teacher, dsmoe_model *student, dsmoe_err *err);
const dsmoe_config *dsmoe_teacher_cfg(const dsmoe_teacher *teacher);
void dsmoe_teacher_close(dsmoe_teacher *teacher);

// Whether 0-based step `step` distils (distill.stop_step: the last step that does, 1-based; 0 = all).
static inline int dsmoe_distill_on_at(const dsmoe_config *c, int step) {
    return dsmoe_config_distills(c) && (c->distill_stop_step == 0 || step < c->distill_stop_step);
}
#endif
