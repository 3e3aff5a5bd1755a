// kernels/distill.h: knowledge distillation's loss of the cuda plugin (Mixture-of-Students,
// docs/distill.md): the temperature-softened KL divergence of the student's logits from the teacher's,
// beside its backward.
// Launchers follow kernels/cuda_env.h: the arguments of the ABI member (include/dsmoe/kernel_plugin.h)
// after `q`, with `env` first; they validate, return DSMOE_OK at once for empty work, enqueue on
// env->stream and never synchronise.
// defines: dsmoe_cu_distill_forward, dsmoe_cu_distill_backward (kernels/distill.cu)
//
// The reference is plugins/cpu/cpu_distill.c: the same checks, the row statistics in the same arithmetic
// (maxima of the scaled logits in float32, the sums of dsmoe_exp_fast in float64, log p and log q in
// float64), so losses and diff agree to rounding; the tests compare them through the conformance suite.
#ifndef DSMOE_KERNELS_DISTILL_H
#define DSMOE_KERNELS_DISTILL_H
#include "cuda_env.h"

DSMOE_EXTERN_C_BEGIN

// With p = softmax(teacher / temperature), q = softmax(student / temperature) over each row of V
// (student, teacher (S, V) of type dt): losses (S) float32 = sum_v p_v (log p_v - log q_v), >= 0, and
// diff (S, V) float32 = q - p. temperature > 0 and finite.
dsmoe_status dsmoe_cu_distill_forward(const dsmoe_cu_env *env, float *losses, float *diff, const void *student,
                                      const void *teacher, dsmoe_dtype dt, float temperature, int S, int V);

// dstudent (S, V) of type dt += scale * diff.
dsmoe_status dsmoe_cu_distill_backward(const dsmoe_cu_env *env, void *dstudent, dsmoe_dtype dt, const float *diff,
                                       float scale, int S, int V);

DSMOE_EXTERN_C_END

#endif
