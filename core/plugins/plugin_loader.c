// core/plugins/plugin_loader.c: see plugin_loader.h.
//
// Loading a plugin is: search path -> the first existing libdsmoe_<kind>_<name>.so -> dlopen(RTLD_NOW |
// RTLD_LOCAL) -> dlsym(the newest entry symbol, else each older one) -> entry() -> table checks -> for an
// older table, its adapter. Each step that can fail has its own message and status, because the user's fix
// differs for each (set a path, rebuild the plugin against this dsmoe, fix a plugin bug). Only after the
// version check is any field past api_version read: a table of another version has another layout.
//
// A v1 table is checked by the v1 rules (every member but the device pair set), then wrapped by its
// adapter (core/plugins/plugin_adapt.h); the adapted table goes through the newest version's checks like
// any other, so an adapter that forgot a member is caught here rather than by a crash. A v2 kernel table
// is the prefix of a v3 one (dsmoe/kernel_plugin.h): the loader copies that prefix into a v3 table whose
// later members stay NULL, and checks the copy as v3.
#define _GNU_SOURCE
// <mpi.h> before the plugin headers: DSMOE_MPI_ABI_STRING (dsmoe/comm_plugin.h) then names the MPI this
// dsmoe is built with, which a comm plugin's mpi_abi must equal.
#include <mpi.h>

#include "plugin_loader.h"
#include "plugin_adapt.h" // dsmoe_kernel_adapt_v1, dsmoe_comm_adapt_v1, the v1 tables
#include "plugin_files.h" // the search path, the listing, the ELF check

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

_Static_assert(sizeof(DSMOE_MPI_ABI_STRING) > 1, "<mpi.h> must come before dsmoe/comm_plugin.h in this file");

// ------------------------------------------------------------------------------------------------
// finding, opening and rejecting

// The versions this dsmoe speaks natively; every older one down to 1 loads through an adapter.
#define KERNEL_ABI_NEWEST 3
#define COMM_ABI_NEWEST 2
#define ABI_PROBE_MAX 32 // unknown future versions looked for, to name them in the message

static void handle_reset(dsmoe_plugin_handle *h) {
    h->dl = NULL;
    h->path[0] = '\0';
    h->api_version = 0;
    h->adapter = NULL;
}

static void handle_release(dsmoe_plugin_handle *h) {
    if (h->adapter) {
        dsmoe_plugin_adapter *a = h->adapter;
        a->release(a);
    }
    h->adapter = NULL;
    if (h->dl) dlclose(h->dl);
    h->dl = NULL;
}

// Closes what was opened and reports why the plugin at h->path was refused.
static dsmoe_status reject(dsmoe_plugin_handle *h, dsmoe_err *err, dsmoe_status status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static dsmoe_status reject(dsmoe_plugin_handle *h, dsmoe_err *err, dsmoe_status status, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->status = status;
    }
    handle_release(h);
    h->api_version = 0;
    return status;
}

// A directory the user listed (run.plugin_path, $DSMOE_PLUGIN_PATH) that is missing, not a directory or
// unreadable is an error, not a skip: silently falling through to the bundled plugin runs other code
// than the user asked for. `source` names where the list came from. The built-in rules stay silent.
static dsmoe_status check_user_dirs(const char *kind, const char *name, const char *list, const char *source,
                                    dsmoe_err *err) {
    for (const char *p = list ? list : ""; *p;) {
        const char *end = strchr(p, ':');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        char dir[4096];
        const char *why = NULL;
        char buf[160];
        struct stat st;
        DIR *d;
        if (n == 0) {
            // empty entries are dropped (path_add)
        } else if (n >= sizeof dir) {
            why = "is longer than 4095 bytes";
        } else {
            memcpy(dir, p, n);
            dir[n] = '\0';
            if (stat(dir, &st) != 0) {
                snprintf(buf, sizeof buf, errno == ENOENT || errno == ENOTDIR ? "does not exist" : "cannot be read (%s)",
                         strerror(errno));
                why = buf;
            } else if (!S_ISDIR(st.st_mode)) {
                why = "is not a directory";
            } else if ((d = opendir(dir)) == NULL) {
                snprintf(buf, sizeof buf, "cannot be read (%s)", strerror(errno));
                why = buf;
            } else {
                closedir(d);
            }
        }
        if (why)
            return dsmoe_err_set(err, DSMOE_ERR_IO, "%s plugin '%s': the directory '%.*s' listed in %s %s; fix or "
                                 "remove that entry", kind, name, (int)(n < 4096 ? n : 4096), p, source, why);
        p += n + (end != NULL);
    }
    return DSMOE_OK;
}

// Finds and opens libdsmoe_<kind>_<name>.so; h->path names the file.
static dsmoe_status open_plugin(const char *kind, const char *name, const char *extra_path, dsmoe_plugin_handle *h,
                                dsmoe_err *err) {
    // The name becomes part of a file name: keep it to one path component of ordinary characters.
    size_t nlen = name ? strlen(name) : 0;
    if (nlen == 0 || nlen > 63 || strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789_-") != nlen)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "%s plugin name '%s' is invalid: expected 1-63 characters of a-z, 0-9, '_' or '-'",
                             kind, name ? name : "(null)");
    DSMOE_TRY(check_user_dirs(kind, name, extra_path, "run.plugin_path", err));
    DSMOE_TRY(check_user_dirs(kind, name, getenv("DSMOE_PLUGIN_PATH"), "the environment variable DSMOE_PLUGIN_PATH",
                              err));
    char *path = malloc(SEARCH_PATH_MAX);
    if (!path) return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory building the plugin search path");
    dsmoe_plugin_search_path(extra_path, path, SEARCH_PATH_MAX);

    int found = 0;
    for (const char *p = path; *p && !found;) {
        const char *end = strchr(p, ':');
        int n = (int)(end ? (size_t)(end - p) : strlen(p));
        struct stat st;
        if (snprintf(h->path, sizeof h->path, "%.*s/libdsmoe_%s_%s.so", n, p, kind, name) < (int)sizeof h->path &&
            stat(h->path, &st) == 0 && S_ISREG(st.st_mode))
            found = 1;
        p += n + (end != NULL);
    }
    if (!found) {
        h->path[0] = '\0';
        dsmoe_status s = dsmoe_plugin_not_found(kind, name, path, err);
        free(path);
        return s;
    }
    free(path);

    char why[256];
    if (dsmoe_plugin_check_elf(h->path, why, sizeof why))
        return reject(h, err, DSMOE_ERR_IO, "%s plugin '%s' found at %s but is not a loadable shared object: %s",
                      kind, name, h->path, why);
    // RTLD_NOW: an unresolved symbol fails here, with dlerror naming it, not at the first call.
    // RTLD_LOCAL: two plugins may define the same internal names.
    dlerror();
    h->dl = dlopen(h->path, RTLD_NOW | RTLD_LOCAL);
    if (!h->dl) {
        const char *why = dlerror();
        return reject(h, err, DSMOE_ERR_SYSTEM, "%s plugin '%s' found at %s but failed to load: %s", kind, name,
                      h->path, why ? why : "unknown dlopen error");
    }
    return DSMOE_OK;
}

// "2 and 1" for newest 3: the versions that load through adapters, for messages.
static const char *older_versions(int newest) { return newest == 3 ? "2 and 1" : "1"; }

// Looks up dsmoe_<kind>_plugin_entry_v<newest>, else each older one down to _v1; *version = the version
// of the symbol found. A file with none but the symbol of a newer version is refused naming it.
static dsmoe_status find_entry(const char *kind, int newest, dsmoe_plugin_handle *h, void **entry, int *version,
                               char *symbol, size_t symlen, dsmoe_err *err) {
    *entry = NULL;
    for (int v = newest; v >= 1 && !*entry; v--) {
        snprintf(symbol, symlen, "dsmoe_%s_plugin_entry_v%d", kind, v);
        dlerror();
        *entry = dlsym(h->dl, symbol);
        *version = v;
    }
    if (*entry) return DSMOE_OK;
    for (int v = newest + 1; v <= ABI_PROBE_MAX; v++) {
        snprintf(symbol, symlen, "dsmoe_%s_plugin_entry_v%d", kind, v);
        if (dlsym(h->dl, symbol))
            return reject(h, err, DSMOE_ERR_UNSUPPORTED,
                          "%s: the plugin speaks %s ABI %d (it exports %s only); this dsmoe speaks %d (and %s through "
                          "adapters); rebuild the plugin against this dsmoe's include/dsmoe headers",
                          h->path, kind, v, symbol, newest, older_versions(newest));
    }
    return reject(h, err, DSMOE_ERR_IO,
                  "%s is not a dsmoe %s plugin: no symbol dsmoe_%s_plugin_entry_v%d (nor of an older version down to "
                  "_v1) found",
                  h->path, kind, kind, newest);
}

// Checks what every table starts with: present, of a version we speak, the version its symbol names.
// Only api_version is read before the version is known: every table version starts with it.
static dsmoe_status check_version(const char *kind, int newest, const char *symbol, int symbol_version,
                                  const void *table, dsmoe_plugin_handle *h, dsmoe_err *err) {
    if (!table)
        return reject(h, err, DSMOE_ERR_INTERNAL, "%s: %s() returned NULL: the plugin refused to load", h->path,
                      symbol);
    uint32_t version = *(const uint32_t *)table;
    if (version < 1 || version > (uint32_t)newest)
        return reject(h, err, DSMOE_ERR_UNSUPPORTED,
                      "%s: the plugin speaks %s ABI %u; this dsmoe speaks %d (and %s through adapters); rebuild the "
                      "plugin against this dsmoe's include/dsmoe headers",
                      h->path, kind, (unsigned)version, newest, older_versions(newest));
    if ((int)version != symbol_version)
        return reject(h, err, DSMOE_ERR_INTERNAL,
                      "%s: %s() returned a table of %s ABI %u; expected %d, the version in the symbol's name",
                      h->path, symbol, kind, (unsigned)version, symbol_version);
    h->api_version = (int)version;
    return DSMOE_OK;
}

static dsmoe_status check_name(const char *kind, const char *name, const char *table_name,
                               dsmoe_plugin_handle *h, dsmoe_err *err) {
    if (!table_name)
        return reject(h, err, DSMOE_ERR_INTERNAL, "%s: %s plugin table has no name (required member name is NULL)",
                      h->path, kind);
    if (strcmp(table_name, name) != 0)
        return reject(h, err, DSMOE_ERR_INTERNAL,
                      "%s: the table calls itself %s plugin '%s' but the file is for '%s'; the name in the "
                      "table must match libdsmoe_%s_<name>.so",
                      h->path, kind, table_name, name, kind);
    return DSMOE_OK;
}

// The settings a v2 plugin declares (dsmoe/types.h): the core registers them as <kind>.<name>.<key>,
// so a malformed entry is refused here, before any deck is read against it.
static dsmoe_status check_params(const char *kind, const char *name, const dsmoe_param_decl *params, int n_params,
                                 dsmoe_plugin_handle *h, dsmoe_err *err) {
    if (n_params < 0 || (n_params > 0) != (params != NULL))
        return reject(h, err, DSMOE_ERR_INTERNAL,
                      "%s: %s plugin '%s' declares n_params = %d with params %s; expected params non-NULL exactly "
                      "when n_params > 0",
                      h->path, kind, name, n_params, params ? "set" : "NULL");
    for (int i = 0; i < n_params; i++) {
        const dsmoe_param_decl *p = &params[i];
        size_t len = p->name ? strlen(p->name) : 0;
        const char *why = NULL;
        if (len == 0 || strspn(p->name, "abcdefghijklmnopqrstuvwxyz0123456789_") != len)
            why = "its name is not a lower-case key of [a-z0-9_]+";
        else if (p->type < DSMOE_PARAM_INT || p->type > DSMOE_PARAM_ENUM)
            why = "its type is not a DSMOE_PARAM_* value";
        else if (!p->default_value)
            why = "default_value is NULL";
        else if (!p->help)
            why = "help is NULL";
        else if ((p->type == DSMOE_PARAM_ENUM) != (p->choices != NULL))
            why = p->choices ? "choices are set but the type is not DSMOE_PARAM_ENUM" : "an ENUM without choices";
        if (why)
            return reject(h, err, DSMOE_ERR_INTERNAL, "%s: %s plugin '%s' declares setting %d ('%s'): %s", h->path,
                          kind, name, i, p->name ? p->name : "(null)", why);
        for (int j = 0; j < i; j++)
            if (strcmp(params[j].name, p->name) == 0)
                return reject(h, err, DSMOE_ERR_INTERNAL, "%s: %s plugin '%s' declares setting '%s' twice", h->path,
                              kind, name, p->name);
    }
    return DSMOE_OK;
}

// "sets a but not b; expected both or neither" for a pair of optional members that come together.
static dsmoe_status check_both_or_neither(const char *kind, const char *name, int has_a, const char *a, int has_b,
                                          const char *b, const char *why, dsmoe_plugin_handle *h, dsmoe_err *err) {
    if (has_a == has_b) return DSMOE_OK;
    return reject(h, err, DSMOE_ERR_INTERNAL, "%s: %s plugin '%s' sets %s but not %s; expected both (%s) or neither",
                  h->path, kind, name, has_a ? a : b, has_a ? b : a, why);
}

// ------------------------------------------------------------------------------------------------
// memory kinds

// Names a DSMOE_MEM_* bitmask for messages: "host", "CUDA", "host or CUDA", unknown bits in hex.
static const char *mem_kinds_name(uint32_t kinds, char *buf, size_t len) {
    static const struct { uint32_t bit; const char *name; } known[] = {
        {DSMOE_MEM_HOST, "host"},
        {DSMOE_MEM_CUDA, "CUDA"},
    };
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        if (!(kinds & known[i].bit)) continue;
        used += (size_t)snprintf(buf + used, used < len ? len - used : 0, "%s%s", used ? " or " : "", known[i].name);
        kinds &= ~known[i].bit;
    }
    if (kinds) snprintf(buf + used, used < len ? len - used : 0, "%sunknown (0x%x)", used ? " or " : "", kinds);
    else if (used == 0) snprintf(buf, len, "no");
    return buf;
}

static int single_bit(uint32_t x) { return x != 0 && (x & (x - 1)) == 0; }

static dsmoe_status check_kernel_mem_kind(const char *name, uint32_t kind, dsmoe_plugin_handle *h, dsmoe_err *err) {
    if (single_bit(kind)) return DSMOE_OK;
    char kinds[96];
    return reject(h, err, DSMOE_ERR_INTERNAL,
                  "%s: kernel plugin '%s' declares mem_kind %s memory (0x%x); expected exactly one DSMOE_MEM_* bit",
                  h->path, name, mem_kinds_name(kind, kinds, sizeof kinds), (unsigned)kind);
}

static dsmoe_status check_comm_mem_kinds(const char *name, uint32_t kinds, dsmoe_plugin_handle *h, dsmoe_err *err) {
    if (kinds != 0) return DSMOE_OK;
    return reject(h, err, DSMOE_ERR_INTERNAL,
                  "%s: comm plugin '%s' declares mem_kinds 0; expected a set of DSMOE_MEM_* bits", h->path, name);
}

#define COUNT_ONE(m) +1
#define RETURN_IF_NULL(m)                                                                          \
    if (!t->m) return #m;
#define FN_SIZE sizeof(void (*)(void))

// ------------------------------------------------------------------------------------------------
// kernel plugins, ABI 3 (and 2, its prefix)

// The static assert below fails the build when the ABI grows a member not listed in one of these.
#define KERNEL_REQUIRED(X)                                                                         \
    X(init) X(finalize) X(last_error) X(describe) X(attention_bytes) X(default_queue) X(queue_native) \
    X(queue_enqueue_host) X(queue_synchronize) X(synchronize) X(event_create) X(event_destroy)       \
    X(event_record) X(queue_wait_event) X(event_synchronize) X(event_query) X(alloc) X(free)         \
    X(host_alloc) X(host_free) X(copy_to_device) X(copy_to_host) X(copy) X(copy_2d) X(zero) X(gemm)  \
    X(gemm_grouped) X(gemm_grouped_wgrad) X(bias_add) X(bias_backward) X(axpy) X(mul_uniform_noise)  \
    X(sum_squares) X(init_tensor) X(embedding_forward) X(embedding_backward) X(layernorm_forward)    \
    X(layernorm_backward) X(gelu_forward) X(gelu_backward) X(attention_forward)                      \
    X(attention_backward) X(crossentropy_forward) X(crossentropy_backward) X(gate_route)            \
    X(gate_assign) X(gate_backward) X(moe_dispatch) X(moe_dispatch_backward) X(moe_combine)          \
    X(moe_combine_backward) X(residual_mix_forward) X(residual_mix_backward) X(adamw)
// "(optional)" in the header; device_count/device_pci_bus_id and queue_create/queue_destroy go in pairs.
#define KERNEL_OPTIONAL(X)                                                                         \
    X(device_count) X(device_pci_bus_id) X(mem_info) X(queue_create) X(queue_destroy) X(all_finite) X(convert)
// Version 3's members, each optional.
#define KERNEL_V3_OPTIONAL(X) X(gate)
// All or none, present exactly with DSMOE_KCAP_INFERENCE.
#define KERNEL_INFERENCE(X) X(kv_append) X(attention_cached) X(sample)
// Both or neither, present exactly with DSMOE_KCAP_DISTILL.
#define KERNEL_DISTILL(X) X(distill_forward) X(distill_backward)

_Static_assert(sizeof(dsmoe_kernel_plugin_v3) ==
                   offsetof(dsmoe_kernel_plugin_v3, init) +
                       (0 KERNEL_REQUIRED(COUNT_ONE) KERNEL_OPTIONAL(COUNT_ONE) KERNEL_INFERENCE(COUNT_ONE)
                        KERNEL_DISTILL(COUNT_ONE) KERNEL_V3_OPTIONAL(COUNT_ONE)) * FN_SIZE,
               "dsmoe_kernel_plugin_v3 changed: list every new member in KERNEL_REQUIRED, _OPTIONAL, _INFERENCE, "
               "_DISTILL or _V3_OPTIONAL");
// A v2 table ends where version 3's members start: the prefix the loader copies.
_Static_assert(DSMOE_KERNEL_PLUGIN_V2_BYTES ==
                   offsetof(dsmoe_kernel_plugin_v3, init) +
                       (0 KERNEL_REQUIRED(COUNT_ONE) KERNEL_OPTIONAL(COUNT_ONE) KERNEL_INFERENCE(COUNT_ONE)
                        KERNEL_DISTILL(COUNT_ONE)) * FN_SIZE,
               "the version-2 prefix of dsmoe_kernel_plugin_v3 changed: a v2 table never changes");

static const char *kernel_missing_member(const dsmoe_kernel_plugin_v3 *t) {
    if (!t->description) return "description";
    KERNEL_REQUIRED(RETURN_IF_NULL)
    return NULL;
}

static const char *kernel_inference_missing(const dsmoe_kernel_plugin_v3 *t) {
    KERNEL_INFERENCE(RETURN_IF_NULL)
    return NULL;
}

// Everything past the header of a v3 kernel table.
static dsmoe_status check_kernel_v3(const char *name, const dsmoe_kernel_plugin_v3 *t, dsmoe_plugin_handle *h,
                                    dsmoe_err *err) {
    const char *missing = kernel_missing_member(t);
    if (missing)
        return reject(h, err, DSMOE_ERR_INTERNAL, "%s: kernel plugin '%s' leaves required member %s NULL", h->path,
                      name, missing);
    DSMOE_TRY(check_both_or_neither("kernel", name, t->device_count != NULL, "device_count",
                                    t->device_pci_bus_id != NULL, "device_pci_bus_id", "a device plugin", h, err));
    DSMOE_TRY(check_both_or_neither("kernel", name, t->queue_create != NULL, "queue_create", t->queue_destroy != NULL,
                                    "queue_destroy", "more queues than the default one", h, err));
    const char *inf_missing = kernel_inference_missing(t);
    int inf_any = t->kv_append || t->attention_cached || t->sample;
    if (t->caps & DSMOE_KCAP_INFERENCE) {
        if (inf_missing)
            return reject(h, err, DSMOE_ERR_INTERNAL,
                          "%s: kernel plugin '%s' declares DSMOE_KCAP_INFERENCE but leaves %s NULL; expected "
                          "kv_append, attention_cached and sample with that capability, or none without it",
                          h->path, name, inf_missing);
    } else if (inf_any) {
        if (inf_missing)
            return reject(h, err, DSMOE_ERR_INTERNAL,
                          "%s: kernel plugin '%s' sets some inference members but leaves %s NULL; expected kv_append, "
                          "attention_cached and sample with DSMOE_KCAP_INFERENCE, or none without it",
                          h->path, name, inf_missing);
        return reject(h, err, DSMOE_ERR_INTERNAL,
                      "%s: kernel plugin '%s' sets kv_append, attention_cached and sample but does not declare "
                      "DSMOE_KCAP_INFERENCE in caps (0x%x); expected both or neither",
                      h->path, name, (unsigned)t->caps);
    }
    DSMOE_TRY(check_both_or_neither("kernel", name, t->distill_forward != NULL, "distill_forward",
                                    t->distill_backward != NULL, "distill_backward", "knowledge distillation", h, err));
    int distill_cap = (t->caps & DSMOE_KCAP_DISTILL) != 0;
    if (distill_cap != (t->distill_forward != NULL))
        return reject(h, err, DSMOE_ERR_INTERNAL,
                      "%s: kernel plugin '%s' %s; expected DSMOE_KCAP_DISTILL in caps exactly when distill_forward "
                      "and distill_backward are set", h->path, name,
                      distill_cap ? "declares DSMOE_KCAP_DISTILL but leaves distill_forward NULL"
                                  : "sets distill_forward and distill_backward but does not declare DSMOE_KCAP_DISTILL");
    if (!(t->dtypes & DSMOE_DTYPE_BIT(DSMOE_FLOAT32)))
        return reject(h, err, DSMOE_ERR_INTERNAL,
                      "%s: kernel plugin '%s' declares dtypes 0x%x without float32; expected "
                      "DSMOE_DTYPE_BIT(DSMOE_FLOAT32) set (every plugin computes in float32)",
                      h->path, name, (unsigned)t->dtypes);
    int bf16_dtype = (t->dtypes & DSMOE_DTYPE_BIT(DSMOE_BFLOAT16)) != 0, bf16_cap = (t->caps & DSMOE_KCAP_BF16) != 0;
    if (bf16_dtype != bf16_cap)
        return reject(h, err, DSMOE_ERR_INTERNAL,
                      "%s: kernel plugin '%s' %s; expected DSMOE_KCAP_BF16 in caps exactly when "
                      "DSMOE_DTYPE_BIT(DSMOE_BFLOAT16) is in dtypes",
                      h->path, name,
                      bf16_cap ? "declares DSMOE_KCAP_BF16 but not bfloat16 in dtypes"
                               : "lists bfloat16 in dtypes but does not declare DSMOE_KCAP_BF16");
    DSMOE_TRY(check_kernel_mem_kind(name, t->mem_kind, h, err));
    return check_params("kernel", name, t->params, t->n_params, h, err);
}

// ------------------------------------------------------------------------------------------------
// kernel plugins, ABI 1 (then adapted)

// Every member but device_count and device_pci_bus_id (optional, both or neither) must be set.
#define KERNEL_V1_REQUIRED(X)                                                                      \
    X(init) X(finalize) X(last_error) X(describe) X(alloc) X(free) X(copy_to_device) X(copy_to_host) \
    X(copy) X(zero) X(synchronize) X(gemm) X(gemm_grouped) X(gemm_grouped_wgrad) X(bias_add)         \
    X(bias_backward) X(axpy) X(scale) X(mul_uniform_noise) X(sum_squares) X(all_finite)             \
    X(embedding_forward) X(embedding_backward) X(layernorm_forward) X(layernorm_backward)           \
    X(gelu_forward) X(gelu_backward) X(attention_forward) X(attention_backward)                     \
    X(crossentropy_forward) X(crossentropy_backward) X(gate_route) X(gate_assign) X(gate_backward)  \
    X(moe_dispatch) X(moe_dispatch_backward) X(moe_combine) X(moe_combine_backward)                 \
    X(residual_mix_forward) X(residual_mix_backward) X(adamw_update)
#define KERNEL_V1_OPTIONAL_COUNT 2 // device_count, device_pci_bus_id

_Static_assert(sizeof(dsmoe_kernel_plugin_v1) ==
                   offsetof(dsmoe_kernel_plugin_v1, init) +
                       (0 KERNEL_V1_REQUIRED(COUNT_ONE) + KERNEL_V1_OPTIONAL_COUNT) * FN_SIZE,
               "dsmoe_kernel_plugin_v1 is frozen: it must not change");

static const char *kernel_v1_missing_member(const dsmoe_kernel_plugin_v1 *t) {
    if (!t->description) return "description";
    KERNEL_V1_REQUIRED(RETURN_IF_NULL)
    return NULL;
}

static dsmoe_status check_kernel_v1(const char *name, const dsmoe_kernel_plugin_v1 *t, dsmoe_plugin_handle *h,
                                    dsmoe_err *err) {
    const char *missing = kernel_v1_missing_member(t);
    if (missing)
        return reject(h, err, DSMOE_ERR_INTERNAL, "%s: kernel plugin '%s' (ABI 1) leaves required member %s NULL",
                      h->path, name, missing);
    DSMOE_TRY(check_both_or_neither("kernel", name, t->device_count != NULL, "device_count",
                                    t->device_pci_bus_id != NULL, "device_pci_bus_id", "a device plugin", h, err));
    return check_kernel_mem_kind(name, t->mem_kind, h, err);
}

// Wraps a checked v1 table; the adapted table must then pass the v3 checks (else the adapter is wrong).
static dsmoe_status adapt_kernel(const char *name, const dsmoe_kernel_plugin_v1 *v1,
                                 const dsmoe_kernel_plugin_v3 **out, dsmoe_plugin_handle *h, dsmoe_err *err) {
    char why[512] = "";
    dsmoe_plugin_adapter *adapter = NULL;
    dsmoe_status s = dsmoe_kernel_adapt_v1(v1, out, &adapter, why, sizeof why);
    if (s != DSMOE_OK)
        return reject(h, err, s, "%s: kernel plugin '%s' speaks ABI 1 and cannot be adapted to ABI %d: %s", h->path,
                      name, KERNEL_ABI_NEWEST, why);
    h->adapter = adapter;
    dsmoe_err inner = {0};
    s = check_kernel_v3(name, *out, h, &inner);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "the v1 kernel adapter built a table the loader refuses (a bug "
                             "in dsmoe's core/plugins/kernel_adapt_v1.c): %s", inner.msg);
    return DSMOE_OK;
}

dsmoe_status dsmoe_plugin_load_kernel(const char *name, const char *extra_path,
                                      const dsmoe_kernel_plugin_v3 **plugin, dsmoe_plugin_handle *handle,
                                      dsmoe_err *err) {
    *plugin = NULL;
    handle_reset(handle);
    DSMOE_TRY(open_plugin("kernel", name, extra_path, handle, err));
    void *sym;
    int sym_version;
    char symbol[64];
    DSMOE_TRY(find_entry("kernel", KERNEL_ABI_NEWEST, handle, &sym, &sym_version, symbol, sizeof symbol, err));
    // Every entry type is `const T *(void)`; the table's own api_version decides the type read.
    const void *table = ((const void *(*)(void))sym)();
    DSMOE_TRY(check_version("kernel", KERNEL_ABI_NEWEST, symbol, sym_version, table, handle, err));
    const dsmoe_kernel_plugin_v3 *t;
    if (handle->api_version == 1) {
        const dsmoe_kernel_plugin_v1 *v1 = table;
        DSMOE_TRY(check_name("kernel", name, v1->name, handle, err));
        DSMOE_TRY(check_kernel_v1(name, v1, handle, err));
        DSMOE_TRY(adapt_kernel(name, v1, &t, handle, err));
    } else if (handle->api_version == 2) {
        // name is the first member after the header every version shares; read through the v3 type,
        // only members of the v2 prefix are touched before the copy.
        const dsmoe_kernel_plugin_v3 *v2 = table;
        DSMOE_TRY(check_name("kernel", name, v2->name, handle, err));
        char why[256] = "";
        dsmoe_plugin_adapter *adapter = NULL;
        dsmoe_status s = dsmoe_kernel_adapt_v2(table, &t, &adapter, why, sizeof why);
        if (s != DSMOE_OK) return reject(handle, err, s, "%s: kernel plugin '%s' (ABI 2): %s", handle->path, name, why);
        handle->adapter = adapter;
        DSMOE_TRY(check_kernel_v3(name, t, handle, err));
    } else {
        t = table;
        DSMOE_TRY(check_name("kernel", name, t->name, handle, err));
        DSMOE_TRY(check_kernel_v3(name, t, handle, err));
    }
    *plugin = t;
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// comm plugins, ABI 2

#define COMM_REQUIRED(X)                                                                           \
    X(init) X(finalize) X(last_error) X(group_create) X(group_destroy) X(group_rank) X(group_size)   \
    X(alltoall) X(allreduce) X(allgather) X(reduce_scatter)
// Each optional on its own (the core has fallbacks).
#define COMM_OPTIONAL(X) X(alltoallv) X(broadcast) X(barrier)
// All or none, present exactly with DSMOE_CCAP_NONBLOCKING: a start without a wait could never finish.
#define COMM_NONBLOCKING(X) X(allreduce_start) X(request_test) X(request_wait)

_Static_assert(sizeof(dsmoe_comm_plugin_v2) ==
                   offsetof(dsmoe_comm_plugin_v2, init) +
                       (0 COMM_REQUIRED(COUNT_ONE) COMM_OPTIONAL(COUNT_ONE) COMM_NONBLOCKING(COUNT_ONE)) * FN_SIZE,
               "dsmoe_comm_plugin_v2 changed: list every new member in COMM_REQUIRED, _OPTIONAL or _NONBLOCKING");

static const char *comm_missing_member(const dsmoe_comm_plugin_v2 *t) {
    if (!t->description) return "description";
    COMM_REQUIRED(RETURN_IF_NULL)
    return NULL;
}

static const char *comm_nonblocking_missing(const dsmoe_comm_plugin_v2 *t) {
    COMM_NONBLOCKING(RETURN_IF_NULL)
    return NULL;
}

static dsmoe_status check_comm_v2(const char *name, const dsmoe_comm_plugin_v2 *t, dsmoe_plugin_handle *h,
                                  dsmoe_err *err) {
    const char *missing = comm_missing_member(t);
    if (missing)
        return reject(h, err, DSMOE_ERR_INTERNAL, "%s: comm plugin '%s' leaves required member %s NULL", h->path, name,
                      missing);
    const char *nb_missing = comm_nonblocking_missing(t);
    int nb_any = t->allreduce_start || t->request_test || t->request_wait;
    if (t->caps & DSMOE_CCAP_NONBLOCKING) {
        if (nb_missing)
            return reject(h, err, DSMOE_ERR_INTERNAL,
                          "%s: comm plugin '%s' declares DSMOE_CCAP_NONBLOCKING but leaves %s NULL; expected "
                          "allreduce_start, request_test and request_wait with that capability, or none without it",
                          h->path, name, nb_missing);
    } else if (nb_any) {
        if (nb_missing)
            return reject(h, err, DSMOE_ERR_INTERNAL,
                          "%s: comm plugin '%s' sets some non-blocking members but leaves %s NULL; expected "
                          "allreduce_start, request_test and request_wait with DSMOE_CCAP_NONBLOCKING, or none "
                          "without it",
                          h->path, name, nb_missing);
        return reject(h, err, DSMOE_ERR_INTERNAL,
                      "%s: comm plugin '%s' sets allreduce_start, request_test and request_wait but does not declare "
                      "DSMOE_CCAP_NONBLOCKING in caps (0x%x); expected both or neither",
                      h->path, name, (unsigned)t->caps);
    }
    DSMOE_TRY(check_comm_mem_kinds(name, t->mem_kinds, h, err));
    // A plugin calling MPI runs on the very library the core initialised: another MPI's handles and
    // constants mean nothing to ours (and may crash far from here).
    if (t->mpi_abi && strcmp(t->mpi_abi, DSMOE_MPI_ABI_STRING) != 0)
        return reject(h, err, DSMOE_ERR_UNSUPPORTED,
                      "%s: comm plugin '%s' was built against MPI '%s' but this dsmoe uses MPI '%s'; rebuild the "
                      "plugin with this dsmoe's MPI (its mpicc)",
                      h->path, name, t->mpi_abi, DSMOE_MPI_ABI_STRING);
    return check_params("comm", name, t->params, t->n_params, h, err);
}

// ------------------------------------------------------------------------------------------------
// comm plugins, ABI 1 (then adapted)

#define COMM_V1_REQUIRED(X)                                                                        \
    X(init) X(finalize) X(last_error) X(group_create) X(group_destroy) X(group_rank) X(group_size)   \
    X(alltoall) X(alltoallv) X(allreduce) X(allgather) X(broadcast) X(barrier)

_Static_assert(sizeof(dsmoe_comm_plugin_v1) ==
                   offsetof(dsmoe_comm_plugin_v1, init) +
                       (0 COMM_V1_REQUIRED(COUNT_ONE) COMM_NONBLOCKING(COUNT_ONE)) * FN_SIZE,
               "dsmoe_comm_plugin_v1 is frozen: it must not change");

static const char *comm_v1_missing_member(const dsmoe_comm_plugin_v1 *t) {
    if (!t->description) return "description";
    COMM_V1_REQUIRED(RETURN_IF_NULL)
    // v1 has no capability bit: the trio is simply all or nothing.
    if (t->allreduce_start || t->request_test || t->request_wait) { COMM_NONBLOCKING(RETURN_IF_NULL) }
    return NULL;
}

static dsmoe_status adapt_comm(const char *name, const dsmoe_comm_plugin_v1 *v1, const dsmoe_comm_plugin_v2 **out,
                               dsmoe_plugin_handle *h, dsmoe_err *err) {
    char why[512] = "";
    dsmoe_plugin_adapter *adapter = NULL;
    dsmoe_status s = dsmoe_comm_adapt_v1(v1, out, &adapter, why, sizeof why);
    if (s != DSMOE_OK)
        return reject(h, err, s, "%s: comm plugin '%s' speaks ABI 1 and cannot be adapted to ABI %d: %s", h->path,
                      name, COMM_ABI_NEWEST, why);
    h->adapter = adapter;
    dsmoe_err inner = {0};
    s = check_comm_v2(name, *out, h, &inner);
    if (s != DSMOE_OK)
        return dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "the v1 comm adapter built a table the loader refuses (a bug "
                             "in dsmoe's core/plugins/comm_adapt_v1.c): %s", inner.msg);
    return DSMOE_OK;
}

dsmoe_status dsmoe_plugin_load_comm(const char *name, const char *extra_path, const dsmoe_comm_plugin_v2 **plugin,
                                    dsmoe_plugin_handle *handle, dsmoe_err *err) {
    *plugin = NULL;
    handle_reset(handle);
    DSMOE_TRY(open_plugin("comm", name, extra_path, handle, err));
    void *sym;
    int sym_version;
    char symbol[64];
    DSMOE_TRY(find_entry("comm", COMM_ABI_NEWEST, handle, &sym, &sym_version, symbol, sizeof symbol, err));
    const void *table = ((const void *(*)(void))sym)();
    DSMOE_TRY(check_version("comm", COMM_ABI_NEWEST, symbol, sym_version, table, handle, err));
    const dsmoe_comm_plugin_v2 *t;
    if (handle->api_version == 1) {
        const dsmoe_comm_plugin_v1 *v1 = table;
        DSMOE_TRY(check_name("comm", name, v1->name, handle, err));
        const char *missing = comm_v1_missing_member(v1);
        if (missing)
            return reject(handle, err, DSMOE_ERR_INTERNAL,
                          "%s: comm plugin '%s' (ABI 1) leaves required member %s NULL", handle->path, name, missing);
        DSMOE_TRY(check_comm_mem_kinds(name, v1->mem_kinds, handle, err));
        DSMOE_TRY(adapt_comm(name, v1, &t, handle, err));
    } else {
        t = table;
        DSMOE_TRY(check_name("comm", name, t->name, handle, err));
        DSMOE_TRY(check_comm_v2(name, t, handle, err));
    }
    *plugin = t;
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// pairing and unloading

dsmoe_status dsmoe_plugin_check_pair(const dsmoe_kernel_plugin_v3 *k, const dsmoe_comm_plugin_v2 *c, dsmoe_err *err) {
    if (!k || !c)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "dsmoe_plugin_check_pair: %s plugin is NULL",
                             k ? "comm" : "kernel");
    if (k->mem_kind & c->mem_kinds) return DSMOE_OK;
    char kbuf[96], cbuf[96];
    const char *hint;
    if (k->mem_kind & DSMOE_MEM_CUDA)
        hint = "choose run.comm_backend = nccl, or mpi_cuda on a CUDA-aware MPI";
    else if (k->mem_kind & DSMOE_MEM_HOST)
        hint = "choose run.comm_backend = mpi, or a kernel plugin that allocates device memory";
    else
        hint = "choose a comm plugin (run.comm_backend) that accepts this memory kind";
    return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                         "kernel plugin '%s' allocates %s memory but comm plugin '%s' accepts only %s memory; %s",
                         k->name, mem_kinds_name(k->mem_kind, kbuf, sizeof kbuf), c->name,
                         mem_kinds_name(c->mem_kinds, cbuf, sizeof cbuf), hint);
}

void dsmoe_plugin_unload(dsmoe_plugin_handle *handle) {
    if (!handle) return;
    handle_release(handle);
}
