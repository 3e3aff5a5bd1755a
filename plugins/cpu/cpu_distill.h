// plugins/cpu/cpu_distill.h: knowledge distillation ops of the cpu plugin (cpu_distill.c).
// defines: cpu_distill_forward, cpu_distill_backward
#ifndef DSMOE_CPU_DISTILL_H
#define DSMOE_CPU_DISTILL_H
#include "cpu_internal.h"

dsmoe_status cpu_distill_forward(cpu_ctx *ctx, cpu_queue *q, float *losses, float *diff, const void *student,
                                 const void *teacher, dsmoe_dtype dt, float temperature, int S, int V);
dsmoe_status cpu_distill_backward(cpu_ctx *ctx, cpu_queue *q, void *dstudent, dsmoe_dtype dt, const float *diff,
                                  float scale, int S, int V);
#endif
