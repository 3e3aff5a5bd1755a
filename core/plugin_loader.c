// core/plugin_loader.c: see plugin_loader.h.
//
// Loading a plugin is: search path -> the first existing libdsmoe_<kind>_<name>.so -> dlopen(RTLD_NOW |
// RTLD_LOCAL) -> dlsym(entry symbol) -> entry() -> table checks. Each step that can fail has its own
// message and status, because the user's fix differs for each (set a path, rebuild the plugin against
// this dsmoe, fix a plugin bug). Only after the version check is any field past api_version read: a
// table of another version may have another layout.
//
// Versioning: a future ABI v2 exports dsmoe_<kind>_plugin_v2; the loader will try it first and fall back
// to the v1 symbol through an adapter (one small file per old version, as NCCL does). Today v1 is the
// only version, so each kind tries exactly one symbol.
#define _GNU_SOURCE
#include "plugin_loader.h"

#include <dirent.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef DSMOE_BUILD_PLUGIN_DIRS
#define DSMOE_BUILD_PLUGIN_DIRS ""
#endif
#ifndef DSMOE_INSTALL_PLUGIN_DIR
#define DSMOE_INSTALL_PLUGIN_DIR ""
#endif

#define SEARCH_PATH_MAX 16384 // longest search path we keep (all directories, ':'-joined)

// ------------------------------------------------------------------------------------------------
// search path

// Appends dir (dlen bytes, not terminated) to the ':'-list in buf unless it is empty, already listed,
// or does not fit whole (a cut directory name would mislead more than a missing one).
static void path_add(char *buf, size_t len, const char *dir, size_t dlen) {
    if (dlen == 0) return;
    for (const char *p = buf; *p;) {
        const char *end = strchr(p, ':');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == dlen && memcmp(p, dir, dlen) == 0) return;
        p += n + (end != NULL);
    }
    size_t used = strlen(buf), sep = used > 0;
    if (used + sep + dlen + 1 > len) return;
    if (sep) buf[used++] = ':';
    memcpy(buf + used, dir, dlen);
    buf[used + dlen] = '\0';
}

static void path_add_list(char *buf, size_t len, const char *list) {
    if (!list) return;
    while (*list) {
        const char *end = strchr(list, ':');
        size_t n = end ? (size_t)(end - list) : strlen(list);
        path_add(buf, len, list, n);
        list += n + (end != NULL);
    }
}

// <dir of the executable>/../lib/dsmoe, written as <parent of that dir>/lib/dsmoe.
static void path_add_exe_rule(char *buf, size_t len) {
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) return;
    exe[n] = '\0';
    char *slash = strrchr(exe, '/'); // cut the file name
    if (!slash) return;
    *slash = '\0';
    slash = strrchr(exe, '/'); // cut the directory the executable is in
    if (!slash) return;
    *slash = '\0';
    char dir[4096 + 16];
    snprintf(dir, sizeof dir, "%s/lib/dsmoe", exe);
    path_add(buf, len, dir, strlen(dir));
}

void dsmoe_plugin_search_path(const char *extra_path, char *buf, size_t len) {
    if (!buf || len == 0) return;
    buf[0] = '\0';
    path_add_list(buf, len, extra_path);
    path_add_list(buf, len, getenv("DSMOE_PLUGIN_PATH"));
    // The executable's own tree first: an installed dsmoe must not pick up plugins from the build tree
    // it was compiled in (in the build tree both rules name the same directory).
    path_add_exe_rule(buf, len);
    path_add_list(buf, len, DSMOE_BUILD_PLUGIN_DIRS);
    path_add_list(buf, len, DSMOE_INSTALL_PLUGIN_DIR);
}

// ------------------------------------------------------------------------------------------------
// "not found": what is there instead

#define MAX_LISTED 32

typedef struct name_list {
    int n;
    char names[MAX_LISTED][64];
} name_list;

static int cmp_names(const void *a, const void *b) { return strcmp(a, b); }

// Collects the names of the <kind> plugins (libdsmoe_<kind>_<name>.so) in every directory of path.
static void list_available(const char *kind, const char *path, name_list *out) {
    char prefix[64];
    int plen = snprintf(prefix, sizeof prefix, "libdsmoe_%s_", kind);
    out->n = 0;
    for (const char *p = path; *p;) {
        const char *end = strchr(p, ':');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        char dir[4096];
        if (n < sizeof dir) {
            memcpy(dir, p, n);
            dir[n] = '\0';
            DIR *d = opendir(dir);
            struct dirent *e;
            while (d && (e = readdir(d)) != NULL && out->n < MAX_LISTED) {
                size_t elen = strlen(e->d_name);
                if (strncmp(e->d_name, prefix, (size_t)plen) != 0 || elen <= (size_t)plen + 3 ||
                    strcmp(e->d_name + elen - 3, ".so") != 0)
                    continue;
                size_t nlen = elen - (size_t)plen - 3;
                if (nlen >= sizeof out->names[0]) continue;
                char name[64];
                memcpy(name, e->d_name + plen, nlen);
                name[nlen] = '\0';
                int dup = 0;
                for (int i = 0; i < out->n; i++) dup |= strcmp(out->names[i], name) == 0;
                if (!dup) strcpy(out->names[out->n++], name);
            }
            if (d) closedir(d);
        }
        p += n + (end != NULL);
    }
    qsort(out->names, (size_t)out->n, sizeof out->names[0], cmp_names);
}

static dsmoe_status not_found(const char *kind, const char *name, const char *path, dsmoe_err *err) {
    name_list avail;
    list_available(kind, path, &avail);
    char listed[MAX_LISTED * 66] = "none";
    size_t used = 0;
    const char *closest = NULL;
    int best = 3; // suggest only a near miss (a typo), not any plugin
    for (int i = 0; i < avail.n; i++) {
        used += (size_t)snprintf(listed + used, sizeof listed - used, "%s%s", i ? ", " : "", avail.names[i]);
        int d = dsmoe_edit_distance(name, avail.names[i]);
        if (d < best) best = d, closest = avail.names[i];
    }
    char hint[128] = "";
    if (closest) snprintf(hint, sizeof hint, " (did you mean '%s'?)", closest);
    return dsmoe_err_set(err, DSMOE_ERR_IO,
                         "%s plugin '%s' not found: no libdsmoe_%s_%s.so in %s; available: %s%s; "
                         "add its directory to run.plugin_path or DSMOE_PLUGIN_PATH",
                         kind, name, kind, name, path[0] ? path : "(empty search path)", listed, hint);
}

// ------------------------------------------------------------------------------------------------
// finding, opening and rejecting

static void handle_reset(dsmoe_plugin_handle *h) {
    h->dl = NULL;
    h->path[0] = '\0';
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
    if (h->dl) dlclose(h->dl);
    h->dl = NULL;
    return status;
}

// Finds and opens libdsmoe_<kind>_<name>.so and returns its entry symbol; h->path names the file.
static dsmoe_status open_plugin(const char *kind, const char *name, const char *extra_path, const char *symbol,
                                dsmoe_plugin_handle *h, void **entry, dsmoe_err *err) {
    *entry = NULL;
    // The name becomes part of a file name: keep it to one path component of ordinary characters.
    size_t nlen = name ? strlen(name) : 0;
    if (nlen == 0 || nlen > 63 || strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789_-") != nlen)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                             "%s plugin name '%s' is invalid: expected 1-63 characters of a-z, 0-9, '_' or '-'",
                             kind, name ? name : "(null)");
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
        dsmoe_status s = not_found(kind, name, path, err);
        free(path);
        return s;
    }
    free(path);

    // RTLD_NOW: an unresolved symbol fails here, with dlerror naming it, not at the first call.
    // RTLD_LOCAL: two plugins may define the same internal names.
    dlerror();
    h->dl = dlopen(h->path, RTLD_NOW | RTLD_LOCAL);
    if (!h->dl) {
        const char *why = dlerror();
        return reject(h, err, DSMOE_ERR_SYSTEM, "%s plugin '%s' found at %s but failed to load: %s", kind, name,
                      h->path, why ? why : "unknown dlopen error");
    }
    dlerror();
    *entry = dlsym(h->dl, symbol);
    if (!*entry)
        return reject(h, err, DSMOE_ERR_IO, "%s is not a dsmoe %s plugin: symbol %s not found", h->path, kind,
                      symbol);
    return DSMOE_OK;
}

// Checks what every kind's table starts with: present, of our version, named as its file.
// Only api_version is read before the version is known to match.
static dsmoe_status check_header(const char *kind, const char *name, const char *symbol, const void *table,
                                 uint32_t expected, dsmoe_plugin_handle *h, dsmoe_err *err) {
    if (!table)
        return reject(h, err, DSMOE_ERR_INTERNAL, "%s: %s() returned NULL: the plugin refused to load", h->path,
                      symbol);
    // Every table version starts with uint32_t api_version, so this read is valid for any version.
    uint32_t version = *(const uint32_t *)table;
    if (version != expected)
        return reject(h, err, DSMOE_ERR_UNSUPPORTED,
                      "%s: %s plugin ABI version %u, this dsmoe speaks %u; rebuild the plugin against this "
                      "dsmoe's include/dsmoe headers",
                      h->path, kind, (unsigned)version, (unsigned)expected);
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

// ------------------------------------------------------------------------------------------------
// kernel plugins

// Every member but device_count and device_pci_bus_id (optional, both or neither) must be set. The static assert below fails the build
// when the ABI grows a member that is not listed here.
#define KERNEL_REQUIRED(X)                                                                         \
    X(init) X(finalize) X(last_error) X(describe) X(alloc) X(free) X(copy_to_device) X(copy_to_host) \
    X(copy) X(zero) X(synchronize) X(gemm) X(gemm_grouped) X(gemm_grouped_wgrad) X(bias_add)         \
    X(bias_backward) X(axpy) X(scale) X(mul_uniform_noise) X(sum_squares) X(all_finite)             \
    X(embedding_forward) X(embedding_backward) X(layernorm_forward) X(layernorm_backward)           \
    X(gelu_forward) X(gelu_backward) X(attention_forward) X(attention_backward)                     \
    X(crossentropy_forward) X(crossentropy_backward) X(gate_route) X(gate_assign) X(gate_backward)  \
    X(moe_dispatch) X(moe_dispatch_backward) X(moe_combine) X(moe_combine_backward)                 \
    X(residual_mix_forward) X(residual_mix_backward) X(adamw_update)
#define KERNEL_OPTIONAL_COUNT 2 // device_count, device_pci_bus_id

#define COUNT_ONE(m) +1
#define RETURN_IF_NULL(m)                                                                          \
    if (!t->m) return #m;

_Static_assert(sizeof(dsmoe_kernel_plugin_v1) ==
                   offsetof(dsmoe_kernel_plugin_v1, init) +
                       (0 KERNEL_REQUIRED(COUNT_ONE) + KERNEL_OPTIONAL_COUNT) * sizeof(void (*)(void)),
               "dsmoe_kernel_plugin_v1 changed: list every new member in KERNEL_REQUIRED or as optional");

static const char *kernel_missing_member(const dsmoe_kernel_plugin_v1 *t) {
    if (!t->description) return "description";
    KERNEL_REQUIRED(RETURN_IF_NULL)
    return NULL;
}

dsmoe_status dsmoe_plugin_load_kernel(const char *name, const char *extra_path,
                                      const dsmoe_kernel_plugin_v1 **plugin, dsmoe_plugin_handle *handle,
                                      dsmoe_err *err) {
    *plugin = NULL;
    handle_reset(handle);
    void *sym;
    DSMOE_TRY(open_plugin("kernel", name, extra_path, DSMOE_KERNEL_PLUGIN_SYMBOL, handle, &sym, err));
    dsmoe_kernel_plugin_entry_fn entry = (dsmoe_kernel_plugin_entry_fn)sym;
    const dsmoe_kernel_plugin_v1 *t = entry();
    DSMOE_TRY(check_header("kernel", name, DSMOE_KERNEL_PLUGIN_SYMBOL, t, DSMOE_KERNEL_API_VERSION, handle, err));
    DSMOE_TRY(check_name("kernel", name, t->name, handle, err));
    const char *missing = kernel_missing_member(t);
    if (missing)
        return reject(handle, err, DSMOE_ERR_INTERNAL, "%s: kernel plugin '%s' leaves required member %s NULL",
                      handle->path, name, missing);
    if (!t->device_count != !t->device_pci_bus_id)
        return reject(handle, err, DSMOE_ERR_INTERNAL,
                      "%s: kernel plugin '%s' sets %s but not %s; expected both (a device plugin) or neither",
                      handle->path, name, t->device_count ? "device_count" : "device_pci_bus_id",
                      t->device_count ? "device_pci_bus_id" : "device_count");
    if (!single_bit(t->mem_kind)) {
        char kinds[96];
        return reject(handle, err, DSMOE_ERR_INTERNAL,
                      "%s: kernel plugin '%s' declares mem_kind %s memory (0x%x); expected exactly one DSMOE_MEM_* bit",
                      handle->path, name, mem_kinds_name(t->mem_kind, kinds, sizeof kinds), (unsigned)t->mem_kind);
    }
    *plugin = t;
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// comm plugins

#define COMM_REQUIRED(X)                                                                           \
    X(init) X(finalize) X(last_error) X(group_create) X(group_destroy) X(group_rank) X(group_size)   \
    X(alltoall) X(alltoallv) X(allreduce) X(allgather) X(broadcast) X(barrier)

// Members a plugin may leave NULL (the core then falls back to the blocking allreduce).
#define COMM_OPTIONAL(X) X(allreduce_start) X(request_test) X(request_wait)

_Static_assert(sizeof(dsmoe_comm_plugin_v1) ==
                   offsetof(dsmoe_comm_plugin_v1, init) +
                       (0 COMM_REQUIRED(COUNT_ONE) COMM_OPTIONAL(COUNT_ONE)) * sizeof(void (*)(void)),
               "dsmoe_comm_plugin_v1 changed: list every new member in COMM_REQUIRED or COMM_OPTIONAL");

static const char *comm_missing_member(const dsmoe_comm_plugin_v1 *t) {
    if (!t->description) return "description";
    COMM_REQUIRED(RETURN_IF_NULL)
    // The non-blocking trio is all or nothing: a start without a wait could never be finished.
    if (t->allreduce_start || t->request_test || t->request_wait) { COMM_OPTIONAL(RETURN_IF_NULL) }
    return NULL;
}

dsmoe_status dsmoe_plugin_load_comm(const char *name, const char *extra_path, const dsmoe_comm_plugin_v1 **plugin,
                                    dsmoe_plugin_handle *handle, dsmoe_err *err) {
    *plugin = NULL;
    handle_reset(handle);
    void *sym;
    DSMOE_TRY(open_plugin("comm", name, extra_path, DSMOE_COMM_PLUGIN_SYMBOL, handle, &sym, err));
    dsmoe_comm_plugin_entry_fn entry = (dsmoe_comm_plugin_entry_fn)sym;
    const dsmoe_comm_plugin_v1 *t = entry();
    DSMOE_TRY(check_header("comm", name, DSMOE_COMM_PLUGIN_SYMBOL, t, DSMOE_COMM_API_VERSION, handle, err));
    DSMOE_TRY(check_name("comm", name, t->name, handle, err));
    const char *missing = comm_missing_member(t);
    if (missing)
        return reject(handle, err, DSMOE_ERR_INTERNAL, "%s: comm plugin '%s' leaves required member %s NULL",
                      handle->path, name, missing);
    if (t->mem_kinds == 0)
        return reject(handle, err, DSMOE_ERR_INTERNAL,
                      "%s: comm plugin '%s' declares mem_kinds 0; expected a set of DSMOE_MEM_* bits", handle->path,
                      name);
    *plugin = t;
    return DSMOE_OK;
}

// ------------------------------------------------------------------------------------------------
// pairing and unloading

dsmoe_status dsmoe_plugin_check_pair(const dsmoe_kernel_plugin_v1 *kernel, const dsmoe_comm_plugin_v1 *comm,
                                     dsmoe_err *err) {
    if (!kernel || !comm)
        return dsmoe_err_set(err, DSMOE_ERR_INVALID, "dsmoe_plugin_check_pair: %s plugin is NULL",
                             kernel ? "comm" : "kernel");
    if (kernel->mem_kind & comm->mem_kinds) return DSMOE_OK;
    char kbuf[96], cbuf[96];
    const char *hint;
    if (kernel->mem_kind & DSMOE_MEM_CUDA)
        hint = "choose run.comm_backend = nccl or a CUDA-aware MPI build";
    else if (kernel->mem_kind & DSMOE_MEM_HOST)
        hint = "choose run.comm_backend = mpi, or a kernel plugin that allocates device memory";
    else
        hint = "choose a comm plugin (run.comm_backend) that accepts this memory kind";
    return dsmoe_err_set(err, DSMOE_ERR_INVALID,
                         "kernel plugin '%s' allocates %s memory but comm plugin '%s' accepts only %s memory; %s",
                         kernel->name, mem_kinds_name(kernel->mem_kind, kbuf, sizeof kbuf), comm->name,
                         mem_kinds_name(comm->mem_kinds, cbuf, sizeof cbuf), hint);
}

void dsmoe_plugin_unload(dsmoe_plugin_handle *handle) {
    if (!handle) return;
    if (handle->dl) dlclose(handle->dl);
    handle->dl = NULL;
}
