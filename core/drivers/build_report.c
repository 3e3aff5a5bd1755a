// core/drivers/build_report.c: `dsmoe --config` (build_report.h says what it prints).
// defines: dsmoe_build_report
//
// Two kinds of facts, each labelled with where it came from:
// - what the build saw, compiled in by core/CMakeLists.txt (compiler, flags, the CUDA toolkit and NCCL
//   the GPU plugins were built with) or read from headers (mpi.h, hwloc.h);
// - what this process loads, asked of the libraries themselves: MPI_Get_library_version (allowed before
//   MPI_Init), hwloc_get_api_version, and for each plugin the version calls of the libraries it pulled
//   in. dlsym on a plugin's handle searches the plugin and its dependencies only, so "oneDNN 2.6.3" under
//   the cpu plugin means that plugin loaded libdnnl 2.6.3 here, never a guess from the build machine.
// Plugins are loaded with the same loader as a run (same search path, same checks) and unloaded; none is
// initialised, so a GPU plugin reports on a machine without a GPU.
#define _GNU_SOURCE
#include "build_report.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#include <hwloc.h>
#include <mpi.h>

#include "plugin_loader.h" // dsmoe_plugin_list, dsmoe_plugin_load_*, dsmoe_plugin_search_path

#ifndef DSMOE_VERSION
#define DSMOE_VERSION "unknown"
#endif
#ifndef DSMOE_BUILD_COMPILER
#define DSMOE_BUILD_COMPILER "unknown"
#endif
#ifndef DSMOE_BUILD_TYPE
#define DSMOE_BUILD_TYPE ""
#endif
#ifndef DSMOE_BUILD_C_FLAGS
#define DSMOE_BUILD_C_FLAGS ""
#endif
#ifndef DSMOE_BUILD_CPU_ARCH
#define DSMOE_BUILD_CPU_ARCH ""
#endif
#ifndef DSMOE_BUILD_CPU_ARCH_FLAGS
#define DSMOE_BUILD_CPU_ARCH_FLAGS ""
#endif
#ifndef DSMOE_BUILD_HWLOC_VERSION
#define DSMOE_BUILD_HWLOC_VERSION ""
#endif
#ifndef DSMOE_BUILD_CUDA_VERSION
#define DSMOE_BUILD_CUDA_VERSION ""
#endif
#ifndef DSMOE_BUILD_NCCL_VERSION
#define DSMOE_BUILD_NCCL_VERSION ""
#endif
#ifndef DSMOE_INSTALL_PLUGIN_DIR
#define DSMOE_INSTALL_PLUGIN_DIR ""
#endif

#define KEY_WIDTH 20 // "  key:" padded so that values line up

// One "key: value" line, indented by `indent` spaces.
static void kv(FILE *out, int indent, const char *key, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void kv(FILE *out, int indent, const char *key, const char *fmt, ...) {
    int used = fprintf(out, "%*s%s:", indent, "", key);
    fprintf(out, "%*s", used < KEY_WIDTH ? KEY_WIDTH - used : 1, "");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(out, fmt, ap);
    va_end(ap);
    fputc('\n', out);
}

// ------------------------------------------------------------------------------------------------
// the build

static void report_build(FILE *out) {
    fprintf(out, "build\n");
    kv(out, 2, "compiler", "%s", DSMOE_BUILD_COMPILER);
    kv(out, 2, "build type", "%s", DSMOE_BUILD_TYPE[0] ? DSMOE_BUILD_TYPE : "(none)");
    kv(out, 2, "C flags", "%s", DSMOE_BUILD_C_FLAGS[0] ? DSMOE_BUILD_C_FLAGS : "(none)");
    kv(out, 2, "CPU architecture", "%s (DSMOE_CPU_ARCH=%s: the cpu plugin's kernels)", DSMOE_BUILD_CPU_ARCH_FLAGS,
       DSMOE_BUILD_CPU_ARCH);
    kv(out, 2, "plugin dir", "%s (CMAKE_INSTALL_PREFIX of the configure; an installed dsmoe looks in "
       "<its bin>/../lib/dsmoe first)", DSMOE_INSTALL_PLUGIN_DIR);
    if (DSMOE_BUILD_CUDA_VERSION[0])
        kv(out, 2, "CUDA toolkit", "%s (the cuda kernel plugin was built with it)", DSMOE_BUILD_CUDA_VERSION);
    else
        kv(out, 2, "CUDA toolkit", "none (the cuda kernel plugin was not built)");
    if (DSMOE_BUILD_NCCL_VERSION[0])
        kv(out, 2, "NCCL", "%s (the nccl comm plugin was built with it)", DSMOE_BUILD_NCCL_VERSION);
    else
        kv(out, 2, "NCCL", "none (the nccl comm plugin was not built)");
}

// ------------------------------------------------------------------------------------------------
// MPI and hwloc: the core links both

static void report_mpi(FILE *out) {
    fprintf(out, "MPI\n");
#if defined(OMPI_MAJOR_VERSION)
    kv(out, 2, "compiled with", "Open MPI %d.%d.%d (mpi.h), MPI standard %d.%d", OMPI_MAJOR_VERSION,
       OMPI_MINOR_VERSION, OMPI_RELEASE_VERSION, MPI_VERSION, MPI_SUBVERSION);
#elif defined(MPICH_VERSION)
    kv(out, 2, "compiled with", "MPICH %s (mpi.h), MPI standard %d.%d", MPICH_VERSION, MPI_VERSION, MPI_SUBVERSION);
#else
    kv(out, 2, "compiled with", "MPI standard %d.%d (mpi.h)", MPI_VERSION, MPI_SUBVERSION);
#endif
    char lib[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0, version = 0, subversion = 0;
    MPI_Get_library_version(lib, &len);
    lib[len > 0 && len < MPI_MAX_LIBRARY_VERSION_STRING ? len : MPI_MAX_LIBRARY_VERSION_STRING - 1] = '\0';
    lib[strcspn(lib, "\n")] = '\0'; // MPICH's string runs over many lines: the first names the version
    kv(out, 2, "library", "%s (MPI_Get_library_version)", lib);
    MPI_Get_version(&version, &subversion);
    kv(out, 2, "standard", "%d.%d (MPI_Get_version)", version, subversion);
}

static void report_hwloc(FILE *out) {
    unsigned run = hwloc_get_api_version();
    fprintf(out, "hwloc\n");
    kv(out, 2, "compiled with", "%s (pkg-config), API 0x%08x (hwloc.h)",
       DSMOE_BUILD_HWLOC_VERSION[0] ? DSMOE_BUILD_HWLOC_VERSION : "unknown", (unsigned)HWLOC_API_VERSION);
    kv(out, 2, "library", "API 0x%08x (hwloc_get_api_version)%s", run,
       (run >> 16) != (HWLOC_API_VERSION >> 16) ? ": another major version than compiled with" : "");
}

// ------------------------------------------------------------------------------------------------
// plugins: what the table declares

static void names_of_bits(uint32_t bits, const char *const *names, int n, char *buf, size_t len) {
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < 32; i++) {
        if (!(bits & (1u << i))) continue;
        const char *name = i < n && names[i] ? names[i] : NULL;
        int w = name ? snprintf(buf + used, len - used, "%s%s", used ? " " : "", name)
                     : snprintf(buf + used, len - used, "%sbit%d", used ? " " : "", i);
        if (w < 0 || (size_t)w >= len - used) break;
        used += (size_t)w;
    }
    if (!used) snprintf(buf, len, "none");
}

static const char *const mem_names[] = {"host", "cuda"};
static const char *const kcap_names[] = {"async", "bf16", "fused-epilogue", "deterministic", "inference",
                                         "host-memory", "distill"};
static const char *const ccap_names[] = {"stream-ordered", "deterministic", "nonblocking"};

static void report_bits(FILE *out, const char *key, uint32_t bits, const char *const *names, int n) {
    char buf[512];
    names_of_bits(bits, names, n, buf, sizeof buf);
    kv(out, 4, key, "%s (0x%x)", buf, (unsigned)bits);
}

static void report_dtypes(FILE *out, uint32_t dtypes) {
    const char *names[32] = {0};
    for (int t = DSMOE_FLOAT32; t <= DSMOE_FLOAT16; t++) names[t] = dsmoe_dtype_name((dsmoe_dtype)t);
    report_bits(out, "dtypes", dtypes, names, 32);
}

static void report_settings(FILE *out, const dsmoe_param_decl *params, int n) {
    char buf[1024] = "none";
    size_t used = 0;
    for (int i = 0; i < n && used < sizeof buf; i++)
        used += (size_t)snprintf(buf + used, sizeof buf - used, "%s%s", i ? ", " : "", params[i].name);
    kv(out, 4, "settings", "%s", buf);
}

// ------------------------------------------------------------------------------------------------
// plugins: the libraries each one loaded, asked for their versions

// The file a symbol came from, for the report ("?" when dladdr cannot say).
static const char *file_of(void *sym) {
    Dl_info info;
    return sym && dladdr(sym, &info) && info.dli_fname ? info.dli_fname : "?";
}

// oneDNN's dnnl_version_t (dnnl_types.h, stable since oneDNN 1.0): only the leading members are read.
typedef struct {
    int major, minor, patch;
    const char *hash;
} dnnl_version_head;

static void report_libraries(FILE *out, void *dl, const char *description) {
    void *sym;
    // BLAS: the library's own identification where it has one, else the file cblas_sgemm is in.
    if ((sym = dlsym(dl, "openblas_get_config"))) {
        kv(out, 4, "BLAS", "%s (openblas_get_config; %s)", ((char *(*)(void))sym)(), file_of(sym));
    } else if ((sym = dlsym(dl, "bli_info_get_version_str"))) {
        kv(out, 4, "BLAS", "BLIS %s (bli_info_get_version_str; %s)", ((const char *(*)(void))sym)(), file_of(sym));
    } else if ((sym = dlsym(dl, "MKL_Get_Version_String"))) {
        char v[256] = "";
        ((void (*)(char *, int))sym)(v, (int)sizeof v);
        kv(out, 4, "BLAS", "%s (MKL_Get_Version_String; %s)", v, file_of(sym));
    } else if ((sym = dlsym(dl, "cblas_sgemm"))) {
        kv(out, 4, "BLAS", "cblas_sgemm from %s (no version call known for it)", file_of(sym));
    }
    // oneDNN: its version when the plugin loaded it; a description naming oneDNN without the library
    // loaded is said as such rather than given a version.
    int names_dnnl = description && (strcasestr(description, "onednn") || strcasestr(description, "dnnl"));
    if ((sym = dlsym(dl, "dnnl_version"))) {
        const dnnl_version_head *v = ((const dnnl_version_head *(*)(void))sym)();
        int hashed = v->hash && strcmp(v->hash, "N/A") != 0; // distribution builds have no commit
        kv(out, 4, "oneDNN", "%d.%d.%d%s%s%s (dnnl_version; %s)", v->major, v->minor, v->patch,
           hashed ? " (commit " : "", hashed ? v->hash : "", hashed ? ")" : "", file_of(sym));
    } else if (names_dnnl) {
        kv(out, 4, "oneDNN", "named in the description, but the plugin did not load libdnnl: version unknown");
    }
    // CUDA: the runtime and driver versions (the driver's is 0 without a driver), cuBLAS, NCCL. None of
    // these calls touches a device.
    if ((sym = dlsym(dl, "cudaRuntimeGetVersion"))) {
        int v = 0;
        ((int (*)(int *))sym)(&v);
        kv(out, 4, "CUDA runtime", "%d.%d (cudaRuntimeGetVersion; %s)", v / 1000, v % 1000 / 10, file_of(sym));
        void *drv = dlsym(dl, "cudaDriverGetVersion");
        int d = 0;
        if (drv) ((int (*)(int *))drv)(&d);
        if (drv && d > 0) kv(out, 4, "CUDA driver", "%d.%d (cudaDriverGetVersion)", d / 1000, d % 1000 / 10);
        else if (drv) kv(out, 4, "CUDA driver", "none on this machine (cudaDriverGetVersion)");
    }
    if ((sym = dlsym(dl, "cublasGetProperty"))) {
        int v[3] = {0, 0, 0}; // libraryPropertyType: MAJOR_VERSION 0, MINOR_VERSION 1, PATCH_LEVEL 2
        for (int i = 0; i < 3; i++) ((int (*)(int, int *))sym)(i, &v[i]);
        kv(out, 4, "cuBLAS", "%d.%d.%d (cublasGetProperty; %s)", v[0], v[1], v[2], file_of(sym));
    }
    if ((sym = dlsym(dl, "ncclGetVersion"))) {
        int v = 0;
        ((int (*)(int *))sym)(&v);
        // NCCL_VERSION_CODE: major*10000 + minor*100 + patch since 2.9, major*1000 + minor*100 + patch before.
        int major = v >= 10000 ? v / 10000 : v / 1000, minor = v >= 10000 ? v % 10000 / 100 : v % 1000 / 100;
        kv(out, 4, "NCCL", "%d.%d.%d (ncclGetVersion; %s)", major, minor, v % 100, file_of(sym));
    }
}

// ------------------------------------------------------------------------------------------------
// plugins: every one on the search path

static void report_plugin(FILE *out, const char *kind, const char *name) {
    dsmoe_plugin_handle h;
    memset(&h, 0, sizeof h);
    dsmoe_err err = {0};
    const dsmoe_kernel_plugin_v3 *k = NULL;
    const dsmoe_comm_plugin_v2 *c = NULL;
    dsmoe_status s = strcmp(kind, "kernel") == 0 ? dsmoe_plugin_load_kernel(name, "", &k, &h, &err)
                                                 : dsmoe_plugin_load_comm(name, "", &c, &h, &err);
    char key[96];
    snprintf(key, sizeof key, "%.8s %.63s", kind, name);
    if (s != DSMOE_OK) {
        kv(out, 2, key, "refused: %s", err.msg);
        return;
    }
    kv(out, 2, key, "%s", h.path);
    kv(out, 4, "ABI", "%d%s", h.api_version, h.api_version == 1 ? " (through the v1 adapter)" : "");
    const char *description = k ? k->description : c->description;
    kv(out, 4, "description", "%s", description ? description : "(none)");
    if (k) {
        report_bits(out, "memory", k->mem_kind, mem_names, 2);
        report_dtypes(out, k->dtypes);
        report_bits(out, "caps", k->caps, kcap_names, (int)(sizeof kcap_names / sizeof kcap_names[0]));
        report_settings(out, k->params, k->n_params);
    } else {
        report_bits(out, "memory", c->mem_kinds, mem_names, 2);
        report_bits(out, "caps", c->caps, ccap_names, (int)(sizeof ccap_names / sizeof ccap_names[0]));
        report_settings(out, c->params, c->n_params);
        if (c->mpi_abi) kv(out, 4, "MPI ABI", "%s (this dsmoe: %s)", c->mpi_abi, DSMOE_MPI_ABI_STRING);
    }
    report_libraries(out, h.dl, description);
    dsmoe_plugin_unload(&h);
}

static void report_plugins(FILE *out) {
    char path[8192];
    dsmoe_plugin_search_path("", path, sizeof path);
    fprintf(out, "plugins\n");
    kv(out, 2, "search path", "%s", path[0] ? path : "(empty)");
    kv(out, 2, "ABI versions", "kernel %d, comm %d (ABI 1 of both through adapters)", DSMOE_KERNEL_API_VERSION,
       DSMOE_COMM_API_VERSION);
    static const char *const kinds[2] = {"kernel", "comm"};
    for (int j = 0; j < 2; j++) {
        char names[64][64];
        int n = dsmoe_plugin_list(kinds[j], "", names, 64);
        if (n == 0) kv(out, 2, kinds[j], "no plugin on the search path");
        for (int i = 0; i < n; i++) report_plugin(out, kinds[j], names[i]);
    }
}

int dsmoe_build_report(FILE *out) {
    fprintf(out, "dsmoe %s\n", DSMOE_VERSION);
    report_build(out);
    report_mpi(out);
    report_hwloc(out);
    report_plugins(out);
    fflush(out);
    return 0;
}
