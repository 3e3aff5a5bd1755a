// dsmoe/status.h: status codes shared by the core and every plugin.
// Library code and plugins return a dsmoe_status; only main() and tests abort.
#ifndef DSMOE_STATUS_H
#define DSMOE_STATUS_H

typedef enum dsmoe_status {
    DSMOE_OK = 0,
    DSMOE_ERR_INVALID = 1,     // invalid usage: bad argument, shape, or value (the caller's fault)
    DSMOE_ERR_NOMEM = 2,       // an allocation failed
    DSMOE_ERR_SYSTEM = 3,      // the OS or a library below us failed (errno, MPI, BLAS, driver)
    DSMOE_ERR_INTERNAL = 4,    // a bug in dsmoe or the plugin
    DSMOE_ERR_UNSUPPORTED = 5, // valid request this component cannot do
    DSMOE_ERR_IO = 6,          // a file is missing, unreadable, truncated or malformed
} dsmoe_status;

static inline const char *dsmoe_status_name(dsmoe_status s) {
    switch (s) {
    case DSMOE_OK: return "ok";
    case DSMOE_ERR_INVALID: return "invalid usage";
    case DSMOE_ERR_NOMEM: return "out of memory";
    case DSMOE_ERR_SYSTEM: return "system error";
    case DSMOE_ERR_INTERNAL: return "internal error";
    case DSMOE_ERR_UNSUPPORTED: return "unsupported";
    case DSMOE_ERR_IO: return "I/O or format error";
    }
    return "unknown status";
}

// Memory kinds: where a buffer lives. A kernel plugin allocates one kind; a comm plugin accepts a
// set of kinds. The core refuses a pair whose kinds do not meet.
enum {
    DSMOE_MEM_HOST = 1u << 0, // ordinary host memory
    DSMOE_MEM_CUDA = 1u << 1, // CUDA device memory
};

// Marks a plugin's entry function as exported (plugins build with hidden visibility).
#define DSMOE_PLUGIN_EXPORT __attribute__((visibility("default")))

#endif
