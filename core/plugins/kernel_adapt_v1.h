// core/plugins/kernel_adapt_v1.h: what the two files of the kernel v1 adapter share (kernel_adapt_v1.c: the
// lifecycle, queues, memory and the table; kernel_adapt_v1_ops.c: the compute members). Internal to them.
// defines: actx, ACTX, V1, TRY, ENTER, ENTER_F32, kav1_fail, kav1_v1_status, kav1_unsupported, kav1_grow,
//          kav1_grow_groups, kav1_fill_ops
#ifndef DSMOE_KERNEL_ADAPT_V1_H
#define DSMOE_KERNEL_ADAPT_V1_H
#include "plugin_adapt.h"

// What a v2 dsmoe_kernel_ctx * points to when it comes from an adapted table.
typedef struct actx {
    const dsmoe_kernel_plugin_v1 *v1;
    dsmoe_kernel_ctx *in;     // the v1 plugin's own context
    char queue;               // its address is the default queue
    dsmoe_status sticky;      // non-OK after bad data: returned by every later call
    char error[1024];         // last_error()
    // Host staging, grown on demand.
    int32_t *hi32;            // (cap_i32) counts, or kept and first choices
    size_t cap_i32;
    double *hf64;             // (cap_f64) load-balancing sums
    size_t cap_f64;
    float *hf32;              // (cap_f32) aux gradient, init_tensor values
    size_t cap_f32;
    int *m;                   // (cap_groups) grouped-GEMM rows and the v1 pointer arrays
    const float **a, **b;
    float **c;
    int cap_groups;
    void *scratch;            // (scratch_bytes) device: DGELU's gradient before it replaces c
    size_t scratch_bytes;
} actx;

#define ACTX(ctx) ((actx *)(ctx))

// Sets last_error() and returns s.
dsmoe_status kav1_fail(actx *x, dsmoe_status s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
// Keeps the v1 plugin's message when a v1 call fails, so last_error() reports it.
dsmoe_status kav1_v1_status(actx *x, dsmoe_status s);
// A dtype other than float32: v1 has no other.
dsmoe_status kav1_unsupported(actx *x, const char *op, dsmoe_dtype dt);
// Grows *p to hold n elements of elem bytes (n >= 1 is kept, so a 0-sized request still gets memory).
dsmoe_status kav1_grow(actx *x, void **p, size_t *cap, size_t n, size_t elem, const char *what);
// Grows the grouped-GEMM row and pointer arrays to `groups`.
dsmoe_status kav1_grow_groups(actx *x, int groups);
// Fills the compute members of the adapted table (kernel_adapt_v1_ops.c).
void kav1_fill_ops(dsmoe_kernel_plugin_v3 *t);

#define V1(x, member, ...) kav1_v1_status((x), (x)->v1->member((x)->in, __VA_ARGS__))
#define TRY(call)                                                                                  \
    do {                                                                                           \
        dsmoe_status try_s_ = (call);                                                              \
        if (try_s_ != DSMOE_OK) return try_s_;                                                     \
    } while (0)
// Every queued member starts with ENTER: the context is unusable after a sticky error.
#define ENTER(ctx)                                                                                 \
    actx *x = ACTX(ctx);                                                                           \
    if (x->sticky != DSMOE_OK) return x->sticky
#define NEED_F32(op, dt)                                                                           \
    if ((dt) != DSMOE_FLOAT32) return kav1_unsupported(x, (op), (dt))
#define ENTER_F32(ctx, op, dt)                                                                     \
    ENTER(ctx);                                                                                    \
    NEED_F32(op, dt)

#endif
