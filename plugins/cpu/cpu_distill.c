// plugins/cpu/cpu_distill.c: knowledge distillation's loss, the temperature-softened KL divergence of the
// student's logits from the teacher's, and its backward (the contract is in dsmoe/kernel_plugin.h).
// defines: cpu_distill_forward, cpu_distill_backward
//
// Rows are independent and each is one thread's, summed in a fixed order: the results do not depend on
// the thread count. bfloat16 logits are widened element by element as they are read (no staging copy).
#include "cpu_distill.h"

#include <math.h>

#include "cpu_bf16.h"
#include "cpu_math.h"

static inline float logit_at(const void *z, dsmoe_dtype dt, size_t i) {
    return dt == DSMOE_BFLOAT16 ? cpu_bf2f(((const uint16_t *)z)[i]) : ((const float *)z)[i];
}

// One row of z / temperature: its maximum and log(sum exp(z / temperature - max)), both in float32
// arithmetic on the scaled logits except the sum (double, in index order).
static void row_lse(const void *z, dsmoe_dtype dt, size_t row, int V, float inv_t, float *maxv, double *log_sum) {
    float m = -INFINITY;
    for (int v = 0; v < V; v++) {
        float x = logit_at(z, dt, row + v) * inv_t;
        m = x > m ? x : m;
    }
    double sum = 0.0;
    for (int v = 0; v < V; v++)
        sum += cpu_exp_fast(logit_at(z, dt, row + v) * inv_t - m);
    *maxv = m;
    *log_sum = log(sum);
}

dsmoe_status cpu_distill_forward(cpu_ctx *ctx, cpu_queue *q, float *losses, float *diff, const void *student,
                                 const void *teacher, dsmoe_dtype dt, float temperature, int S, int V) {
    CPU_BEGIN(ctx, q, "distill_forward");
    if (dt != DSMOE_BFLOAT16)
        CPU_DTYPE(ctx, "distill_forward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && V > 0, "cpu: distill_forward: S=%d V=%d: expected S >= 0 and V > 0", S, V);
    CPU_REQUIRE(ctx, temperature > 0 && isfinite(temperature),
                "cpu: distill_forward: temperature = %g: expected a finite number > 0", (double)temperature);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, losses && diff && student && teacher, "cpu: distill_forward: NULL losses, diff, student or teacher");
    const float inv_t = 1.0f / temperature;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)S * V >= CPU_PAR_MIN / 4)
    for (int s = 0; s < S; s++) {
        size_t row = (size_t)s * V;
        float ms, mt;
        double ls, lt;
        row_lse(student, dt, row, V, inv_t, &ms, &ls);
        row_lse(teacher, dt, row, V, inv_t, &mt, &lt);
        float *d = diff + row;
        double kl = 0.0;
        for (int v = 0; v < V; v++) {
            // log p and log q as (x - max) - log_sum: exact where the probability itself underflows.
            double log_p = (double)(logit_at(teacher, dt, row + v) * inv_t - mt) - lt;
            double log_q = (double)(logit_at(student, dt, row + v) * inv_t - ms) - ls;
            double p = exp(log_p);
            kl += p * (log_p - log_q);
            d[v] = (float)(exp(log_q) - p);
        }
        losses[s] = kl > 0.0 ? (float)kl : 0.0f; // >= 0 in exact arithmetic; rounding may give -1e-17
    }
    return DSMOE_OK;
}

dsmoe_status cpu_distill_backward(cpu_ctx *ctx, cpu_queue *q, void *dstudent, dsmoe_dtype dt, const float *diff,
                                  float scale, int S, int V) {
    CPU_BEGIN(ctx, q, "distill_backward");
    if (dt != DSMOE_BFLOAT16)
        CPU_DTYPE(ctx, "distill_backward", "dt", dt);
    CPU_REQUIRE(ctx, S >= 0 && V > 0, "cpu: distill_backward: S=%d V=%d: expected S >= 0 and V > 0", S, V);
    if (S == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dstudent && diff, "cpu: distill_backward: NULL dstudent or diff");
    size_t n = (size_t)S * V;
#pragma omp parallel for num_threads(ctx->threads) schedule(static) if ((long)n >= CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        if (dt == DSMOE_BFLOAT16) {
            uint16_t *y = (uint16_t *)dstudent + i;
            *y = cpu_f2bf(cpu_bf2f(*y) + scale * diff[i]);
        } else {
            ((float *)dstudent)[i] += scale * diff[i];
        }
    }
    return DSMOE_OK;
}
