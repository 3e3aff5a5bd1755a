// core/model/model_buffers.h: the one list of the buffers the model and its MoE layers allocate. The code
// that allocates (core/model/model.c alloc_buffers, core/model/moe_layer.c create_buffers and ensure_capacity) and
// the memory plan that predicts it from the config alone (core/drivers/memplan.c) both walk these lists, so
// the two cannot drift; tests/drivers/test_memplan.c checks the sum against the real allocation byte for byte.
// defines: dsmoe_buf_class, dsmoe_buffer, dsmoe_buffer_fn, dsmoe_model_sizes, dsmoe_model_buffers,
//          dsmoe_moe_sizes, dsmoe_moe_buffer_set, dsmoe_moe_buffers
//
// A walk calls fn once per buffer, in allocation order, and stops at the first status fn returns that
// is not DSMOE_OK. Each buffer names where it lives (field: a byte offset into the owner's struct, which
// only the owner, with its private struct, turns into a pointer) and its size in bytes (64-bit: a plan
// for a machine that is not here may exceed this one's size_t). Pure: no plugin, nothing allocated.
#ifndef DSMOE_MODEL_BUFFERS_H
#define DSMOE_MODEL_BUFFERS_H
#include <stddef.h>
#include <stdint.h>
#include "config.h"

// What a buffer is, for the plan's accounting and for who frees it.
typedef enum dsmoe_buf_class {
    DSMOE_BUF_PARAMS,  // the model's parameter slab (fp32, this rank's local parameters)
    DSMOE_BUF_GRADS,   // the model's gradient slab (same layout)
    DSMOE_BUF_ACT,     // activations, attention state, backward scratch, the norm sums (the rest of
                       // dsmoe_model_bytes); a MoE layer's per-token router buffers
    DSMOE_BUF_TOKENS,  // the model's int32 token and target ids: kernel memory outside dsmoe_model_bytes
    DSMOE_BUF_CAPACITY, // a MoE layer's (E, C, width) capacity buffers, sized for C slots per expert
    DSMOE_BUF_HOST,    // host_alloc staging: host memory, in no estimate of kernel memory
} dsmoe_buf_class;

typedef struct dsmoe_buffer {
    const char *name; // what it holds and its shape, e.g. "activation ln1 (S, M)" (the allocation's tag)
    int cls;          // dsmoe_buf_class
    int layer;        // model: the block it belongs to (block_acts), -1 for the model's own; MoE: -1
    size_t field;     // layer >= 0: offsetof(block_acts, f); else offsetof(owner struct, f)
    uint64_t bytes;
} dsmoe_buffer;

typedef dsmoe_status (*dsmoe_buffer_fn)(const dsmoe_buffer *b, void *ctx, dsmoe_err *err);

// ----------------------------------------------------------------------------------------------------
// the model (table in core/model/model_buffers.c; owner struct dsmoe_model, per block block_acts)

typedef struct dsmoe_model_sizes {
    int B;                 // micro-batch: S = B * seq_len tokens; 0 = parameters only (no gradient slab)
    int forward_only;      // a model that never runs a backward or a loss (a distillation teacher): no
                           // gradient slab, no loss probabilities, no backward scratch
    int distill;           // a student: the distillation term's buffers (docs/distill.md)
    uint64_t local_params; // this rank's parameter slab (replicated + its expert shards)
    uint64_t att_saved;    // attention state each block saves for the backward (kernel attention_bytes)
    uint64_t att_ws;       // attention_backward's workspace, one for the model
} dsmoe_model_sizes;

// Every buffer of a model of cfg (its blocks' kinds: dense, MoE, residual MoE) with sizes z, in the
// order core/model/model.c allocates them; block buffers come block by block (layer = the block).
dsmoe_status dsmoe_model_buffers(const dsmoe_config *cfg, const dsmoe_model_sizes *z, dsmoe_buffer_fn fn, void *ctx,
                                 dsmoe_err *err);

// ----------------------------------------------------------------------------------------------------
// one MoE layer (tables in core/model/moe_layer.c, beside the private struct dsmoe_moe_layer they point into)

typedef struct dsmoe_moe_sizes {
    uint64_t S, M, F, E, K; // tokens per rank, hidden, expert hidden, experts (global), top-k
    int jitter;             // noise = jitter: the gate input's jittered copy and its gradient
    int act_bytes;          // bytes per activation element: 4 (float32; 0 means 4) or 2 (bfloat16: the gate
                            // input's float32 copy and its gradient are added)
    uint64_t C;             // capacity slots per expert (the capacity set only)
} dsmoe_moe_sizes;

typedef enum dsmoe_moe_buffer_set {
    DSMOE_MOE_ROUTER,   // per-token and per-expert buffers and host staging, allocated once at create
    DSMOE_MOE_CAPACITY, // the (E, C, M|F) buffers, reallocated when C grows
} dsmoe_moe_buffer_set;

// The buffers of one set of a MoE layer of sizes z, in the order core/model/moe_layer.c allocates them.
dsmoe_status dsmoe_moe_buffers(dsmoe_moe_buffer_set set, const dsmoe_moe_sizes *z, dsmoe_buffer_fn fn, void *ctx,
                               dsmoe_err *err);

// ----------------------------------------------------------------------------------------------------
// table rows (for the files that keep a table: core/model/model_buffers.c, core/model/moe_layer.c)

// The sizes a row multiplies; the walker fills d[] from its sizes (d[DSMOE_D_1] = 1).
typedef enum dsmoe_buf_dim {
    DSMOE_D_1, DSMOE_D_S, DSMOE_D_M, DSMOE_D_F, DSMOE_D_V, DSMOE_D_E, DSMOE_D_K, DSMOE_D_C,
    DSMOE_D_L1,        // layers + 1 (the residual stream at every block input and the output)
    DSMOE_D_NORM,      // MoE layers + 2 (the gradient norm's squared sums)
    DSMOE_D_AUX,       // 2E + 1 (l_aux's sums)
    DSMOE_D_STAGE,     // bytes of a MoE layer's host staging (kept counts, padded, then the l_aux sums)
    DSMOE_D_PARAMS,    // local parameters
    DSMOE_D_ATT,       // bytes of a block's saved attention state
    DSMOE_D_ATT_WS,    // bytes of attention's backward workspace
    DSMOE_D_ACT,       // bytes per activation element (the unit of DSMOE_UNIT_ACT rows)
    DSMOE_D_COUNT
} dsmoe_buf_dim;

// Block kinds, the `when` of a model block row (a row applies to the kinds whose bit it has).
enum { DSMOE_BLOCK_DENSE = 1, DSMOE_BLOCK_MOE = 2, DSMOE_BLOCK_RESIDUAL_MOE = 4, DSMOE_BLOCK_ANY = 7 };
// A model row of its own (no block kind) with this bit exists only when activations are not float32
// (run.precision = bf16): the GEMM copy of the weights and the like.
enum { DSMOE_MODEL_IF_LOWP = 0x80,
       DSMOE_MODEL_IF_BACKWARD = 0x40,  // not in a forward-only model (dsmoe_model_sizes.forward_only)
       DSMOE_MODEL_IF_DISTILL = 0x20 };  // only in a distillation student (dsmoe_model_sizes.distill)
// The `when` of a MoE row: 0 = always; else any of the conditions.
enum { DSMOE_MOE_IF_JITTER = 1, DSMOE_MOE_IF_LOWP = 2 };

// The unit of a row whose elements are activations: their dtype's size (run.precision).
#define DSMOE_UNIT_ACT 0

// One buffer: bytes = unit * mult * d[dim[0]] * d[dim[1]] * d[dim[2]] (unused dims are DSMOE_D_1).
typedef struct dsmoe_buffer_row {
    const char *name;
    uint8_t cls;    // dsmoe_buf_class
    uint8_t when;   // model: 0 = the model's own buffer, else the block kinds it applies to; MoE: condition
    uint8_t unit;   // bytes per element (4 fp32 or int32, 8 double, 1 when a dim is already in bytes,
                    // DSMOE_UNIT_ACT: the activation dtype's size, d[DSMOE_D_ACT])
    uint8_t mult;
    uint8_t dim[3]; // dsmoe_buf_dim
    size_t field;   // offset into the owner's struct (block_acts for a block row)
} dsmoe_buffer_row;

// A row in a table: ROW("activation ln1 (S, M)", ACT, DSMOE_BLOCK_ANY, 4, 1, S, M, 1, offsetof(block_acts, ln1)).
#define DSMOE_BUFFER_ROW(name, cls, when, unit, mult, d0, d1, d2, field) \
    {name, DSMOE_BUF_##cls, when, unit, mult, {DSMOE_D_##d0, DSMOE_D_##d1, DSMOE_D_##d2}, field}

// Calls fn for row r of layer `layer` with the sizes d.
dsmoe_status dsmoe_buffer_row_emit(const dsmoe_buffer_row *r, const uint64_t *d, int layer, dsmoe_buffer_fn fn,
                                   void *ctx, dsmoe_err *err);

#endif
