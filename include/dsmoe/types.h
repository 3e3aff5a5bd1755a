// dsmoe/types.h: what both plugin ABIs (kernel_plugin.h, comm_plugin.h) share: element types, reduction
// operators, plugin-declared settings and the logger callback. Plain C, usable from C++ and CUDA.
#ifndef DSMOE_TYPES_H
#define DSMOE_TYPES_H
#include <stddef.h>
#include <stdint.h>
#include "dsmoe/status.h"

#ifdef __cplusplus
#define DSMOE_EXTERN_C_BEGIN extern "C" {
#define DSMOE_EXTERN_C_END }
#else
#define DSMOE_EXTERN_C_BEGIN
#define DSMOE_EXTERN_C_END
#endif

DSMOE_EXTERN_C_BEGIN

// Element types. Values are part of the ABI (they travel in tables and masks): never renumber.
typedef enum dsmoe_dtype {
    DSMOE_FLOAT32 = 0,
    DSMOE_FLOAT64 = 1,
    DSMOE_INT32 = 2,
    DSMOE_INT64 = 3,
    DSMOE_UINT8 = 4,
    DSMOE_BFLOAT16 = 5, // bfloat16: the upper 16 bits of a float32, round-to-nearest-even when narrowing
    DSMOE_FLOAT16 = 6,  // IEEE binary16
} dsmoe_dtype;

// Bit of a dtype in a dtype mask (a plugin's `dtypes` member).
#define DSMOE_DTYPE_BIT(t) (1u << (unsigned)(t))

// Bytes per element; 0 for an unknown value.
static inline size_t dsmoe_dtype_size(dsmoe_dtype t) {
    switch (t) {
    case DSMOE_FLOAT32: case DSMOE_INT32: return 4;
    case DSMOE_FLOAT64: case DSMOE_INT64: return 8;
    case DSMOE_UINT8: return 1;
    case DSMOE_BFLOAT16: case DSMOE_FLOAT16: return 2;
    }
    return 0;
}

static inline const char *dsmoe_dtype_name(dsmoe_dtype t) {
    switch (t) {
    case DSMOE_FLOAT32: return "float32";
    case DSMOE_FLOAT64: return "float64";
    case DSMOE_INT32: return "int32";
    case DSMOE_INT64: return "int64";
    case DSMOE_UINT8: return "uint8";
    case DSMOE_BFLOAT16: return "bfloat16";
    case DSMOE_FLOAT16: return "float16";
    }
    return "unknown";
}

typedef enum dsmoe_reduce_op {
    DSMOE_SUM = 0,
    DSMOE_MAX = 1,
    DSMOE_MIN = 2,
} dsmoe_reduce_op;

// --- plugin-declared settings ----------------------------------------------------------------------
// A plugin lists the settings it owns in its table (`params`, `n_params`). The core registers them
// beside its own keys: the deck sets them in a [kernel.<name>] or [comm.<name>] section, the environment
// as DSMOE_KERNEL_<NAME>_<KEY> / DSMOE_COMM_<NAME>_<KEY>, the command line as kernel.<name>.<key>=v;
// they appear in --help keys and in the resolved-configuration print with their source. The core checks
// the type (and the choices of an ENUM) with file:line errors before init, and passes the resolved
// values to init as strings in declaration order (dsmoe_*_options.param_values).
typedef enum dsmoe_param_type {
    DSMOE_PARAM_INT = 0,    // decimal integer, K/M/G suffixes allowed
    DSMOE_PARAM_FLOAT = 1,  // decimal number, K/M/G suffixes allowed (passed to init for strtod: "1500" for "1.5K")
    DSMOE_PARAM_BOOL = 2,   // true/false, yes/no, on/off, 1/0 (passed to init as "1" or "0")
    DSMOE_PARAM_STRING = 3,
    DSMOE_PARAM_ENUM = 4,   // one of `choices`
} dsmoe_param_type;

typedef struct dsmoe_param_decl {
    const char *name;          // lower-case key, [a-z0-9_]+ (e.g. "gemm_tile")
    dsmoe_param_type type;
    const char *default_value; // as text, valid for the type
    const char *help;          // one line: what it does, units
    const char *choices;       // ENUM: '|'-separated values ("auto|on|off"); NULL otherwise
} dsmoe_param_decl;

// --- logging ---------------------------------------------------------------------------------------
typedef enum dsmoe_log_level { DSMOE_LOG_ERROR = 0, DSMOE_LOG_WARN = 1, DSMOE_LOG_INFO = 2, DSMOE_LOG_DEBUG = 3 } dsmoe_log_level;

// The core's logger: a plugin writes one line (no trailing newline) through it instead of stderr, so
// that output carries the rank and obeys the run's verbosity. Thread-safe; may be NULL (then the plugin
// stays silent or writes to stderr itself).
typedef void (*dsmoe_log_fn)(void *user, dsmoe_log_level level, const char *line);

DSMOE_EXTERN_C_END

#endif
