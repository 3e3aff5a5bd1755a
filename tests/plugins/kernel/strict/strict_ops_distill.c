// tests/plugins/kernel/strict/strict_ops_distill.c: the knowledge-distillation pair, deferred like every other
// compute member (the cpu plugin's arithmetic when the queue runs).
// defines: strict_fill_distill_members
#include "strict_internal.h"

#define ES(dt) dsmoe_dtype_size(dt)
#define Z(x) ((size_t)(x))
#define F32 Z(4)
#define CPU(member) c->cpu->member

typedef struct {
    float *losses, *diff_out;
    void *dstudent;
    const void *student, *teacher;
    const float *diff;
    dsmoe_dtype dt;
    float temperature, scale;
    int S, V;
} distill_args;

static dsmoe_status run_distill_forward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(distill_args);
    return CPU(distill_forward)(c->cc, c->cq, a->losses, a->diff_out, a->student, a->teacher, a->dt, a->temperature,
                                a->S, a->V);
}

static dsmoe_status s_distill_forward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, float *losses, float *diff,
                                      const void *student, const void *teacher, dsmoe_dtype dt, float temperature,
                                      int S, int V) {
    STRICT_BEGIN(ctx, q, "distill_forward", run_distill_forward, distill_args);
    *a = (distill_args){.losses = losses, .diff_out = diff, .student = student, .teacher = teacher, .dt = dt,
                        .temperature = temperature, .S = S, .V = V};
    strict_check(ctx, op, S >= 0 && V >= 0, "negative size (S %d, V %d)", S, V);
    strict_dtype(ctx, op, dt, "student and teacher");
    strict_ref(ctx, op, losses, Z(S) * F32, "losses");
    strict_ref(ctx, op, diff, Z(S) * Z(V) * F32, "diff");
    strict_ref(ctx, op, student, Z(S) * Z(V) * ES(dt), "student");
    strict_ref(ctx, op, teacher, Z(S) * Z(V) * ES(dt), "teacher");
    return strict_submit(ctx, q, op);
}

static dsmoe_status run_distill_backward(dsmoe_kernel_ctx *c, strict_op *op) {
    STRICT_ARGS(distill_args);
    return CPU(distill_backward)(c->cc, c->cq, a->dstudent, a->dt, a->diff, a->scale, a->S, a->V);
}

static dsmoe_status s_distill_backward(dsmoe_kernel_ctx *ctx, dsmoe_kernel_queue *q, void *dstudent, dsmoe_dtype dt,
                                       const float *diff, float scale, int S, int V) {
    STRICT_BEGIN(ctx, q, "distill_backward", run_distill_backward, distill_args);
    *a = (distill_args){.dstudent = dstudent, .diff = diff, .dt = dt, .scale = scale, .S = S, .V = V};
    strict_check(ctx, op, S >= 0 && V >= 0, "negative size (S %d, V %d)", S, V);
    strict_dtype(ctx, op, dt, "dstudent");
    strict_ref(ctx, op, dstudent, Z(S) * Z(V) * ES(dt), "dstudent");
    strict_ref(ctx, op, diff, Z(S) * Z(V) * F32, "diff");
    return strict_submit(ctx, q, op);
}

// Present exactly when the cpu plugin has the pair (and then with DSMOE_KCAP_DISTILL).
void strict_fill_distill_members(dsmoe_kernel_plugin_v3 *t, const dsmoe_kernel_plugin_v3 *cpu) {
    int has = cpu && (cpu->caps & DSMOE_KCAP_DISTILL) && cpu->distill_forward && cpu->distill_backward;
    t->distill_forward = has ? s_distill_forward : NULL;
    t->distill_backward = has ? s_distill_backward : NULL;
    if (has) t->caps |= DSMOE_KCAP_DISTILL;
}
