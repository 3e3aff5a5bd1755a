// tests/conformance/conformance.h: the harness of the kernel-plugin conformance suite
// (tests/plugins/kernel/test_kernel_conformance.c runs it): a CANDIDATE plugin (strict, cpu, cuda, ...) and the cpu
// plugin as the REFERENCE run the same ops on the same inputs; every output is copied back and compared.
// Files: harness.c (sides, buffers, comparisons, result lines), ops_dense.c (GEMMs, element-wise ops,
// conversion, initialisation, AdamW), ops_layers.c (embedding, layer norm, GELU, attention,
// cross-entropy, residual mix, inference ops), ops_moe.c (gating, dispatch, combine, error paths),
// ops_fd.c (the candidate's backward ops against finite differences of its own forward ops).
//
// How a check is written (one "check" = one op variant, run by cf_run; its outputs print one line each):
//   static void v_axpy(const void *arg) {
//       float *hx = cf_rand(n, 1), *hy = cf_rand(n, 1);
//       cf_buf x = cf_up("x", hx, n, dt), y = cf_up("y", hy, n, dt); // uploaded to both sides
//       CF_SIDES OP(axpy, P(y), 0.5f, P(x), DT(dt), n);             // the op on both sides
//       cf_cmp(&y, y.h, NULL, TOL_EW);                             // +=: compared as deltas from y.h
//   }
// Inside CF_SIDES, `side` is 0 (candidate) or 1 (reference); P(b) is b's buffer on that side, DT(t) the
// dtype that side computes in (the reference computes bfloat16 work in float32 on the same rounded
// inputs). OP() calls a member with (ctx, queue, ...) and abandons the check with a FAIL line if it does
// not return DSMOE_OK (or the member is NULL). Results are read only through cf_cmp*, which copy back
// and wait on an event: the candidate is treated as fully asynchronous and its memory is never touched
// by the host. Every host allocation and buffer of a check is freed when it ends (also when abandoned).
#ifndef DSMOE_CONFORMANCE_H
#define DSMOE_CONFORMANCE_H
#include <stddef.h>
#include <stdint.h>

#include "dsmoe/kernel_plugin.h"

#define CF_F32 DSMOE_FLOAT32
#define CF_BF16 DSMOE_BFLOAT16
#define CF_MISSING ((dsmoe_status)-1) // a member that is NULL in the table

// One plugin under test: its table, file, and the context of the current group.
typedef struct cf_side {
    const char *role; // "candidate" or "reference"
    const char *name; // the plugin's name (table)
    const char *path; // the file it was loaded from
    const dsmoe_kernel_plugin_v3 *T;
    dsmoe_kernel_ctx *c;
    dsmoe_kernel_queue *q;
    dsmoe_kernel_event *ev;
    const char *settings; // "key=value,..." applied over the declared defaults at init (may be NULL)
} cf_side;

extern cf_side cf_sides[2]; // [0] candidate, [1] reference

// Counters and the current check, in memory shared with the parent process when groups run forked.
typedef struct cf_shared {
    int passed, failed, skipped;
    char current[256]; // the check running now (for a crash or time-out message)
    int started;       // checks of the current group entered so far
    int skip;          // a group restarted after a crash skips its first `skip` checks
    int timeout_s;     // per check (alarm); 0 = none
} cf_shared;
extern cf_shared *cf_res;

// A tensor on both sides. dt is the candidate's element type; the reference holds float32 where dt is
// bfloat16 (same values), the same type otherwise. h: the values uploaded, as float (rounded to dt), or
// NULL. rows/cols only label mismatches ("row 3, col 7").
typedef struct cf_buf {
    const char *name;
    void *p[2];
    size_t n;
    dsmoe_dtype dt;
    float *h;
    size_t cols;
} cf_buf;

// Tolerance of a comparison: |got - want| <= afrac * max|want| + rtol * |want|, per element (max over
// the elements compared). For bfloat16 outputs the reference is rounded to bfloat16 first.
typedef struct cf_tol {
    double rtol, afrac;
} cf_tol;

// --- lifecycle (harness.c) ---
dsmoe_status cf_open(cf_side *s, char *err, size_t len);   // init with the declared defaults (+ settings)
int cf_setting_on(const cf_side *s, const char *name);      // its setting `name`, as init gets it, is true/1/yes/on
void cf_close(cf_side *s);                                  // finalize (NULL ctx: nothing)
int cf_open_both(void);                                    // 0 or -1 with a FAIL line
void cf_close_both(void);
// Runs one check: fixed seed from the name, fn(arg), frees what the check allocated; afterwards a
// context left with a sticky error is reported and re-created.
void cf_run(const char *name, void (*fn)(const void *), const void *arg);
const char *cf_check_name(void);
// The check's buffers on `side` belong to a context that was replaced: not freed at the end.
void cf_forget_buffers(int side);

// --- result lines ---
void cf_pass(const char *what, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void cf_fail(const char *what, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void cf_skip(const char *what, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void cf_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
// FAIL line for the current check and abandon it.
_Noreturn void cf_abort(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
// Abandon the current check with a SKIP line (e.g. an optional member the candidate lacks).
_Noreturn void cf_abandon_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// --- calls ---
// Checks the status of a call on `side`; CF_MISSING = member NULL. Abandons the check unless OK.
void cf_op(int side, const char *member, dsmoe_status s);
// Whether a side's table has the member (for optional ones).
#define CF_HAS(side, member) (cf_sides[side].T->member != NULL)
#define CF_SIDES for (int side = 0; side < 2; side++)
#define P(b) ((b).p[side])
#define DT(t) cf_dt(side, (t))
#define OP(member, ...)                                                                                  \
    cf_op(side, #member,                                                                                 \
          cf_sides[side].T->member ? cf_sides[side].T->member(cf_sides[side].c, cf_sides[side].q, __VA_ARGS__) \
                                   : CF_MISSING)
#define SCRIBBLE(x) memset(&(x), 0xAB, sizeof(x)) // a host input the callee must have consumed
static inline dsmoe_dtype cf_dt(int side, dsmoe_dtype t) { return side == 1 && t == CF_BF16 ? CF_F32 : t; }
// Whether the candidate takes dt for activations (declared bit; bfloat16 also needs DSMOE_KCAP_BF16).
int cf_cand_dtype(dsmoe_dtype dt);

// --- host data (freed at the end of the check) ---
void *cf_host(size_t bytes);                         // zeroed
float *cf_rand(size_t n, float scale);               // uniform in [-scale, scale)
float *cf_fill(size_t n, float value);
int32_t *cf_randint(size_t n, int lo, int hi);       // uniform in [lo, hi]
float cf_uniform(void);                              // [0, 1)
uint64_t cf_rand_u64(void);
float cf_bf16_round(float f);                        // round to nearest even, as the plugins' convert
uint16_t cf_f2bf(float f);
float cf_bf2f(uint16_t h);
void cf_round_dt(float *h, size_t n, dsmoe_dtype dt); // in place: bfloat16 rounding, else nothing

// --- buffers on both sides ---
// Uploads n floats as dt (bfloat16 on the candidate, float32 of the same values on the reference); the
// host values are rounded to dt in place first (b.h = host).
cf_buf cf_up(const char *name, float *host, size_t n, dsmoe_dtype dt);
cf_buf cf_up_i32(const char *name, const int32_t *host, size_t n);
cf_buf cf_up_f64(const char *name, const double *host, size_t n);
// n elements of dt, every byte 0xFF on both sides (NaN floats, -1 ints): an assigned output that the op
// must write; comparing an element the op left alone fails.
cf_buf cf_out(const char *name, size_t n, dsmoe_dtype dt);
// Bytes of plugin-private state (attention's saved/workspace): sizes per side, contents undefined.
cf_buf cf_scratch(const char *name, size_t bytes_cand, size_t bytes_ref);
cf_buf cf_zeros(const char *name, size_t n, dsmoe_dtype dt); // DSMOE_ALLOC_ZERO on both

// --- comparisons: one PASS/FAIL line each; 1 when it passed ---
// Floats. base: the values the output held before an accumulating op (+=), compared as deltas from
// base (NULL for an assigned output). mask: compare element i only when mask[i] (NULL = all).
int cf_cmp(const cf_buf *b, const float *base, const unsigned char *mask, cf_tol tol);
// Same, with the reference's values taken from `want` (host floats, n) instead of the reference side.
int cf_cmp_to(const char *what, const cf_buf *b, const float *want, const unsigned char *mask, cf_tol tol);
int cf_cmp_i32(const cf_buf *b, const unsigned char *mask); // exact
// Doubles b[from .. from+count), printed as `label`.
int cf_cmp_f64(const cf_buf *b, const char *label, size_t from, size_t count, double rtol, double afrac);
// The candidate's elements where mask[i] == 0 (mask NULL: all) must still hold the bits of `fill` (a
// float value, as dt): memory the op must not write. Also checked on the reference (a test bug else).
int cf_cmp_untouched(const cf_buf *b, const unsigned char *mask, float fill);
// Copies b back from `side` as floats (bfloat16 widened), after an event wait; abandons on error.
float *cf_get(const cf_buf *b, int side);
void *cf_get_raw(const cf_buf *b, int side, size_t bytes);

// --- tolerances ---
extern double cf_tol_scale; // DSMOE_CONFORMANCE_TOL_SCALE (default 1): multiplies every tolerance
extern int cf_tf32;         // the candidate's setting tf32 is on (its default or tf32=true): float32 GEMMs round inputs
cf_tol cf_tol_for(dsmoe_dtype dt, cf_tol f32);               // f32 as given; bfloat16 outputs: TOL_BF16
cf_tol cf_tol_gemm(dsmoe_dtype operands, cf_tol tol);        // tol, or TOL_TF32 for float32 operands under cf_tf32
#define TOL_EW ((cf_tol){1e-4, 1e-6})     // element-wise float32 math (different exp/tanh implementations)
#define TOL_RED ((cf_tol){1e-4, 1e-5})    // sums and GEMMs in float32 (another summation order)
#define TOL_BF16 ((cf_tol){2e-2, 1e-2})   // bfloat16 outputs (a few bf16 ulps: intermediate roundings)
#define TOL_F32_OF_BF16 ((cf_tol){1e-3, 1e-4}) // float32 outputs of an op on bfloat16 inputs
// float32 GEMM outputs when the candidate rounds the operands to TF32 (10 mantissa bits): each product is
// off by up to 2^-10 relative when the conversion truncates (a bias of the same sign in every product),
// 2^-11 when it rounds. Measured on the emulated cuBLAS over the gemm, grouped and wgrad groups (160
// checks): operands rounded to TF32 pass down to 0.3 of this, truncated down to 0.5 of it; rounded to
// bfloat16 (8 bits) they fail 40 checks at this and 9 still at twice it.
#define TOL_TF32 ((cf_tol){1e-3, 1e-3})

// --- the groups (each runs in one process when groups are forked) ---
void cf_group_gemm(void);
void cf_group_grouped(void);
void cf_group_wgrad(void);
void cf_group_elementwise(void);
void cf_group_layers(void);
void cf_group_attention(void);
void cf_group_loss_mix(void);
void cf_group_adamw(void);
void cf_group_inference(void);
void cf_group_gating(void);
void cf_group_dispatch(void);
void cf_group_errors(void);
void cf_group_sticky(void);
void cf_group_fd(void);

#endif
