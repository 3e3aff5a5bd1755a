// tests/plugins/kernel/test_kernel_conformance.c: the conformance suite of kernel plugins (ABI v3,
// include/dsmoe/kernel_plugin.h). A CANDIDATE plugin runs every compute member on random inputs (fixed
// seeds) and the cpu plugin, the REFERENCE, runs the same; every output comes back through the copy
// members after an event wait and is compared: exactly where the contract is exact (gating choices,
// slots, counts, sampled tokens, conversions, memory an op must not touch), within a tolerance elsewhere
// (float32 against float32; bfloat16 candidates against the cpu plugin in float32 on the same rounded
// inputs). The harness and the checks are in tests/conformance/ (conformance.h explains them).
//
// Environment:
//   DSMOE_CONFORMANCE_KERNEL=<name>       the candidate (default "strict"): libdsmoe_kernel_<name>.so found
//                                         in $DSMOE_PLUGIN_PATH, <exe>/../lib/dsmoe, <exe>/plugins, <exe>,
//                                         then the build tree's plugin directories
//   DSMOE_CONFORMANCE_KERNEL_PATH=<file>  the candidate's file itself (a bundled run on another machine)
//   DSMOE_CONFORMANCE_REFERENCE_PATH=<file> the cpu plugin (default: found like a candidate named cpu,
//                                         first beside the candidate's file)
//   DSMOE_CONFORMANCE_SETTINGS=k=v,...    candidate settings over its declared defaults; when its setting
//                                         tf32 is on (true, 1, yes or on) the float32 GEMMs are held to
//                                         TOL_TF32 and the finite differences through GEMMs are skipped
//                                         (conformance.h)
//   DSMOE_CONFORMANCE_GROUPS=a,b          run only these groups (names below)
//   DSMOE_CONFORMANCE_FORK=0|1            run each group in child processes (default 1): a crash, a hang
//                                         or a device fault then costs one check, not the run. (Seen on
//                                         an H200: children of a parent that only dlopen'ed a CUDA library
//                                         use the GPU, a child's illegal address leaves the next child's
//                                         GPU work intact, and compute-sanitizer follows forked children.)
//   DSMOE_CONFORMANCE_TIMEOUT=<s>         per check (default 60)
//   DSMOE_CONFORMANCE_TOL_SCALE=<x>       multiplies every tolerance (default 1; exact checks stay exact)
// Output: "PASS check.output max_abs=.. max_rel=..", "FAIL check.output first mismatch at i=.. got ..
// want ..", "SKIP ...", "# notes", then "conformance <name> vs cpu: N passed, M failed (K skipped)".
// Exit: 0 when nothing failed; 77 when the candidate's file does not exist or it is a device plugin
// and this machine has no device; 1 otherwise.
#define _GNU_SOURCE // strsignal
#include <dlfcn.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#ifdef CONF_VIA_LOADER
#include "plugin_loader.h" // dsmoe_plugin_load_kernel, through the adapters
#endif
#include <unistd.h>

#include "conformance/conformance.h"

#ifndef DSMOE_CONFORMANCE_PLUGIN_DIR
#define DSMOE_CONFORMANCE_PLUGIN_DIR ""
#endif
#ifndef DSMOE_CONFORMANCE_TEST_PLUGIN_DIR
#define DSMOE_CONFORMANCE_TEST_PLUGIN_DIR ""
#endif

typedef struct group {
    const char *name;
    void (*fn)(void);
} group;

static const group groups[] = {
    {"gemm", cf_group_gemm},           {"grouped", cf_group_grouped},       {"wgrad", cf_group_wgrad},
    {"elementwise", cf_group_elementwise}, {"layers", cf_group_layers},   {"attention", cf_group_attention},
    {"loss_mix", cf_group_loss_mix},   {"adamw", cf_group_adamw},           {"gating", cf_group_gating},
    {"dispatch", cf_group_dispatch},   {"inference", cf_group_inference},   {"errors", cf_group_errors},
    {"sticky", cf_group_sticky},       {"fd", cf_group_fd},
};

static const char *cand_name = "strict";
static int timeout_s = 60;

static int file_exists(const char *p) { return p && *p && access(p, F_OK) == 0; }

// The directories a plugin file is looked for in, in order (see the top of the file).
static int search_dirs(char dirs[][PATH_MAX], int max) {
    int n = 0;
    const char *env = getenv("DSMOE_PLUGIN_PATH");
    if (env && *env) {
        char buf[4096];
        snprintf(buf, sizeof buf, "%s", env);
        for (char *d = strtok(buf, ":"); d && n < max; d = strtok(NULL, ":"))
            snprintf(dirs[n++], PATH_MAX, "%s", d);
    }
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
        if (n < max) snprintf(dirs[n++], PATH_MAX, "%.3000s/../lib/dsmoe", exe);
        if (n < max) snprintf(dirs[n++], PATH_MAX, "%.3000s/plugins", exe);
        if (n < max) snprintf(dirs[n++], PATH_MAX, "%.3000s", exe);
    }
    if (n < max && DSMOE_CONFORMANCE_PLUGIN_DIR[0] != 0) snprintf(dirs[n++], PATH_MAX, "%s", DSMOE_CONFORMANCE_PLUGIN_DIR);
    if (n < max && DSMOE_CONFORMANCE_TEST_PLUGIN_DIR[0] != 0)
        snprintf(dirs[n++], PATH_MAX, "%s", DSMOE_CONFORMANCE_TEST_PLUGIN_DIR);
    return n;
}

// Finds libdsmoe_kernel_<name>.so: first in `first_dir` (may be NULL), then the search directories.
static int find_plugin(const char *name, const char *first_dir, char *out, size_t len, char *tried, size_t tlen) {
    char dirs[16][PATH_MAX];
    int n = 0;
    if (first_dir && *first_dir) snprintf(dirs[n++], PATH_MAX, "%s", first_dir);
    n += search_dirs(dirs + n, 16 - n);
    tried[0] = 0;
    for (int i = 0; i < n; i++) {
        snprintf(out, len, "%.3000s/libdsmoe_kernel_%.100s.so", dirs[i], name);
        if (file_exists(out)) return 1;
        size_t used = strlen(tried);
        snprintf(tried + used, tlen - used, "%s%.400s", used ? ":" : "", dirs[i]);
    }
    return 0;
}

static const dsmoe_kernel_plugin_v3 *load(const char *path, char *err, size_t len) {
    void *dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        snprintf(err, len, "dlopen: %s", dlerror());
        return NULL;
    }
    dsmoe_kernel_plugin_entry_fn entry = (dsmoe_kernel_plugin_entry_fn)dlsym(dl, DSMOE_KERNEL_PLUGIN_SYMBOL);
    if (!entry) {
        snprintf(err, len, "no %s symbol", DSMOE_KERNEL_PLUGIN_SYMBOL);
        return NULL;
    }
    const dsmoe_kernel_plugin_v3 *T = entry();
    if (!T) snprintf(err, len, "%s returned NULL", DSMOE_KERNEL_PLUGIN_SYMBOL);
    else if (T->api_version != DSMOE_KERNEL_API_VERSION)
        snprintf(err, len, "api_version %u, this suite speaks %d", T->api_version, DSMOE_KERNEL_API_VERSION), T = NULL;
    return T;
}

#ifdef CONF_VIA_LOADER
// test_kernel_conformance_adapted (tests/plugins/loader/loader.cmake): the candidate through the core's
// loader, from its file's directory, so that a plugin of an older ABI runs behind its adapter and the
// adapted table is what the suite holds to the contract. Never unloaded: forked children share it.
static const dsmoe_kernel_plugin_v3 *load_candidate(const char *name, const char *path, char *err, size_t len) {
    static dsmoe_plugin_handle handle;
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    const dsmoe_kernel_plugin_v3 *T = NULL;
    dsmoe_err e = {0};
    if (dsmoe_plugin_load_kernel(name, dir, &T, &handle, &e) != DSMOE_OK) {
        snprintf(err, len, "the core's loader: %.900s", e.msg);
        return NULL;
    }
    if (strcmp(handle.path, path) != 0) {
        snprintf(err, len, "the core's loader took %.450s, not %.450s", handle.path, path);
        return NULL;
    }
    cf_note("candidate loaded through the core's loader: kernel ABI %d%s", handle.api_version,
            handle.adapter ? ", run through its adapter" : "");
    return T;
}
#endif

static void caps_text(const dsmoe_kernel_plugin_v3 *T, char *buf, size_t len) {
    static const char *names[] = {"ASYNC", "BF16", "FUSED_EPILOGUE", "DETERMINISTIC", "INFERENCE", "HOST_MEMORY"};
    buf[0] = 0;
    for (int i = 0; i < 6; i++)
        if (T->caps & (1u << i)) snprintf(buf + strlen(buf), len - strlen(buf), "%s%s", buf[0] ? "|" : "", names[i]);
    snprintf(buf + strlen(buf), len - strlen(buf), "; dtypes");
    for (int t = 0; t <= DSMOE_FLOAT16; t++)
        if (T->dtypes & DSMOE_DTYPE_BIT(t)) snprintf(buf + strlen(buf), len - strlen(buf), " %s", dsmoe_dtype_name(t));
}

// The table itself: required members, optional groups all-or-none, dtypes and caps agree. Calling a
// NULL member would crash the suite, so every op also checks before calling (OP()).
static void check_table(const dsmoe_kernel_plugin_v3 *T) {
    snprintf(cf_res->current, sizeof cf_res->current, "table[%s]", cand_name);
    const char *missing[64];
    int nm = 0;
#define REQ(m)                                                                                          \
    if (!T->m) missing[nm++] = #m;
    REQ(init) REQ(finalize) REQ(last_error) REQ(describe) REQ(attention_bytes) REQ(default_queue)
    REQ(queue_native) REQ(queue_enqueue_host) REQ(queue_synchronize) REQ(synchronize) REQ(event_create)
    REQ(event_destroy) REQ(event_record) REQ(queue_wait_event) REQ(event_synchronize) REQ(event_query) REQ(alloc)
    REQ(free) REQ(host_alloc) REQ(host_free) REQ(copy_to_device) REQ(copy_to_host) REQ(copy) REQ(copy_2d) REQ(zero)
    REQ(gemm) REQ(gemm_grouped) REQ(gemm_grouped_wgrad) REQ(bias_add) REQ(bias_backward) REQ(axpy)
    REQ(mul_uniform_noise) REQ(sum_squares) REQ(init_tensor) REQ(embedding_forward) REQ(embedding_backward)
    REQ(layernorm_forward) REQ(layernorm_backward) REQ(gelu_forward) REQ(gelu_backward) REQ(attention_forward)
    REQ(attention_backward) REQ(crossentropy_forward) REQ(crossentropy_backward) REQ(gate_route) REQ(gate_assign)
    REQ(gate_backward) REQ(moe_dispatch) REQ(moe_dispatch_backward) REQ(moe_combine) REQ(moe_combine_backward)
    REQ(residual_mix_forward) REQ(residual_mix_backward) REQ(adamw)
#undef REQ
    if (nm) {
        char list[1024] = "";
        for (int i = 0; i < nm; i++)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "", missing[i]);
        cf_fail("required", "NULL required member(s): %s", list);
    } else {
        cf_pass("required", "every required member is set");
    }
    int inf = !!T->kv_append + !!T->attention_cached + !!T->sample, cap = !!(T->caps & DSMOE_KCAP_INFERENCE);
    if ((inf != 0 && inf != 3) || (inf == 3) != cap)
        cf_fail("inference", "%d of kv_append/attention_cached/sample set with DSMOE_KCAP_INFERENCE %s", inf,
                cap ? "set" : "clear");
    else
        cf_pass("inference", "%s", cap ? "all three members with the cap" : "none, no cap");
    if (!!T->device_count != !!T->device_pci_bus_id)
        cf_fail("device", "device_count and device_pci_bus_id must be both set or both NULL");
    int bfbit = !!(T->dtypes & DSMOE_DTYPE_BIT(DSMOE_BFLOAT16)), bfcap = !!(T->caps & DSMOE_KCAP_BF16);
    if (!(T->dtypes & DSMOE_DTYPE_BIT(DSMOE_FLOAT32)) || bfbit != bfcap)
        cf_fail("dtypes", "dtypes 0x%x: float32 must be set, the bfloat16 bit must agree with DSMOE_KCAP_BF16 (%s)",
                T->dtypes, bfcap ? "set" : "clear");
    else
        cf_pass("dtypes", "0x%x", T->dtypes);
}

// Makes both contexts once and prints their describe() lines. 0 = go on, 77 = skip (a device plugin on
// a machine without a device), 1 = the candidate does not start.
static int probe(void) {
    snprintf(cf_res->current, sizeof cf_res->current, "init[%s]", cand_name);
    for (int i = 0; i < 2; i++) {
        cf_side *S = &cf_sides[i];
        char err[1024];
        dsmoe_status st = cf_open(S, err, sizeof err);
        if (st != DSMOE_OK) {
            int count = -1;
            if (i == 0 && S->T->device_count && S->T->device_count(&count) == DSMOE_OK && count == 0) {
                printf("SKIPPED: no device for %s: %s\n", cand_name, err);
                fflush(stdout);
                return 77;
            }
            cf_fail("", "%s %s: init failed: '%s': %s%s", S->role, S->name, dsmoe_status_name(st), err,
                    count > 0 ? " (the machine has a device)" : "");
            return 1;
        }
        int devs = -1;
        if (S->T->device_count) S->T->device_count(&devs);
        const char *d = S->T->describe ? S->T->describe(S->c) : "(no describe member)";
        cf_note("%s %s (%s): %s", S->role, S->name, S->path, d ? d : "(NULL)");
        if (devs >= 0) cf_note("%s %s: device_count = %d", S->role, S->name, devs);
    }
    cf_close_both();
    return 0;
}

static void on_alarm(int sig) {
    (void)sig;
    char msg[512];
    int n = snprintf(msg, sizeof msg, "FAIL %s timed out after %d s (DSMOE_CONFORMANCE_TIMEOUT per check); stopping\n"
                     "conformance %s vs cpu: %d passed, %d failed (%d skipped)\n", cf_res->current, timeout_s,
                     cand_name, cf_res->passed, cf_res->failed + 1, cf_res->skipped);
    if (write(1, msg, (size_t)n) < 0) _exit(1);
    _exit(1);
}

static int group_selected(const char *name) {
    const char *sel = getenv("DSMOE_CONFORMANCE_GROUPS");
    if (!sel || !*sel) return 1;
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", sel);
    for (char *t = strtok(buf, ","); t; t = strtok(NULL, ","))
        if (!strcmp(t, name)) return 1;
    return 0;
}

// One group in a child process: its crash, hang or device fault is one FAIL line here, and the group
// starts again in a new process after the check that died (at most 20 times, and only while checks
// advance), so one broken op costs one check, not the rest of its group.
static void run_forked(const group *g) {
    cf_res->skip = 0;
    for (int attempt = 0; attempt <= 20; attempt++) {
        fflush(stdout);
        cf_res->started = 0;
        snprintf(cf_res->current, sizeof cf_res->current, "%s (starting)", g->name);
        pid_t pid = fork();
        if (pid < 0) {
            printf("FAIL %s: fork failed\n", g->name);
            cf_res->failed++;
            return;
        }
        if (pid == 0) {
            signal(SIGALRM, SIG_DFL); // cf_run arms it per check: the default action ends this process
            g->fn();
            alarm((unsigned)timeout_s);
            cf_close_both();
            fflush(stdout);
            _exit(0);
        }
        int status = 0;
        while (waitpid(pid, &status, 0) < 0)
            ;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return;
        if (WIFSIGNALED(status)) {
            int sig = WTERMSIG(status);
            printf("FAIL %s %s (group %s)\n", cf_res->current,
                   sig == SIGALRM ? "timed out (DSMOE_CONFORMANCE_TIMEOUT per check)" : strsignal(sig), g->name);
        } else {
            printf("FAIL %s: the process of group %s exited with status %d\n", cf_res->current, g->name,
                   WEXITSTATUS(status));
        }
        cf_res->failed++;
        if (cf_res->started <= cf_res->skip) return; // no check advanced: give up on the group
        cf_res->skip = cf_res->started;              // the checks before and the one that died
        printf("# group %s: starting again in a new process after its check %d\n", g->name, cf_res->skip);
    }
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    cf_res = mmap(NULL, sizeof *cf_res, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (cf_res == MAP_FAILED) return 1;
    memset(cf_res, 0, sizeof *cf_res);
    const char *v;
    if ((v = getenv("DSMOE_CONFORMANCE_KERNEL")) && *v) cand_name = v;
    int forked = 1;
    if ((v = getenv("DSMOE_CONFORMANCE_FORK")) && *v) forked = strcmp(v, "0") != 0;
    if ((v = getenv("DSMOE_CONFORMANCE_TIMEOUT")) && atoi(v) > 0) timeout_s = atoi(v);
    cf_res->timeout_s = timeout_s;
    if ((v = getenv("DSMOE_CONFORMANCE_TOL_SCALE")) && atof(v) > 0) cf_tol_scale = atof(v);

    // The candidate's file
    static char cand_path[PATH_MAX], ref_path[PATH_MAX], tried[8192], err[1024];
    const char *given = getenv("DSMOE_CONFORMANCE_KERNEL_PATH");
    if (given && *given) {
        snprintf(cand_path, sizeof cand_path, "%s", given);
        if (!file_exists(cand_path)) {
            printf("SKIPPED: candidate plugin file %s (DSMOE_CONFORMANCE_KERNEL_PATH) does not exist\n", cand_path);
            return 77;
        }
    } else if (!find_plugin(cand_name, NULL, cand_path, sizeof cand_path, tried, sizeof tried)) {
        printf("SKIPPED: no libdsmoe_kernel_%s.so (DSMOE_CONFORMANCE_KERNEL=%s) in %s\n", cand_name, cand_name, tried);
        return 77;
    }
    // The reference: given, else beside the candidate, else searched
    char cand_dir[PATH_MAX];
    snprintf(cand_dir, sizeof cand_dir, "%s", cand_path);
    char *slash = strrchr(cand_dir, '/');
    if (slash) *slash = 0;
    else snprintf(cand_dir, sizeof cand_dir, ".");
    const char *ref_given = getenv("DSMOE_CONFORMANCE_REFERENCE_PATH");
    if (ref_given && *ref_given) snprintf(ref_path, sizeof ref_path, "%s", ref_given);
    else if (!find_plugin("cpu", cand_dir, ref_path, sizeof ref_path, tried, sizeof tried)) {
        printf("FAIL setup: the reference cpu plugin (libdsmoe_kernel_cpu.so) is in none of %s; set "
               "DSMOE_CONFORMANCE_REFERENCE_PATH\nconformance %s vs cpu: 0 passed, 1 failed\n", tried, cand_name);
        return 1;
    }
    // strict wraps the cpu plugin: make it the reference's file unless told otherwise
    if (!strcmp(cand_name, "strict")) setenv("DSMOE_STRICT_CPU_PLUGIN", ref_path, 0);

    const dsmoe_kernel_plugin_v3 *R = load(ref_path, err, sizeof err);
    if (!R) {
        printf("FAIL setup: cannot load the reference %s: %s\nconformance %s vs cpu: 0 passed, 1 failed\n", ref_path,
               err, cand_name);
        return 1;
    }
#ifdef CONF_VIA_LOADER
    const dsmoe_kernel_plugin_v3 *X = load_candidate(cand_name, cand_path, err, sizeof err);
#else
    const dsmoe_kernel_plugin_v3 *X = load(cand_path, err, sizeof err);
#endif
    if (!X) {
        printf("FAIL setup: cannot load the candidate %s: %s\nconformance %s vs cpu: 0 passed, 1 failed\n", cand_path,
               err, cand_name);
        return 1;
    }
    // a file given without a name is named by its table
    const char *named = getenv("DSMOE_CONFORMANCE_KERNEL");
    if (given && *given && !(named && *named) && X->name) cand_name = X->name;
    cf_sides[0] = (cf_side){.role = "candidate", .name = cand_name, .path = cand_path, .T = X,
                            .settings = getenv("DSMOE_CONFORMANCE_SETTINGS")};
    cf_sides[1] = (cf_side){.role = "reference", .name = "cpu", .path = ref_path, .T = R, .settings = "poison=1"};
    cf_tf32 = cf_setting_on(&cf_sides[0], "tf32");
    char caps[256];
    caps_text(X, caps, sizeof caps);
    cf_note("conformance of kernel plugin '%s' (%s) against the cpu plugin (%s)", cand_name, cand_path, ref_path);
    cf_note("candidate table: name '%s', \"%s\"; caps %s", X->name ? X->name : "(null)",
            X->description ? X->description : "(null)", caps);
    cf_note("groups run %s, at most %d s a check; tolerance scale %g",
            forked ? "in child processes" : "in this process", timeout_s, cf_tol_scale);
    if (cf_tf32)
        cf_note("the candidate's settings enable TF32: float32 GEMM outputs within TOL_TF32 (%g + %g of the largest), "
                "finite differences through GEMMs skipped", TOL_TF32.rtol, TOL_TF32.afrac);
    check_table(X);
    if (!X->init || !X->finalize || !X->default_queue || !X->event_create || !X->alloc || !X->copy_to_device ||
        !X->copy_to_host || !X->event_record || !X->event_synchronize || !X->synchronize || !X->last_error) {
        printf("conformance %s vs cpu: %d passed, %d failed (lifecycle members missing: nothing can run)\n", cand_name,
               cf_res->passed, cf_res->failed);
        return 1;
    }

    // Contexts for the describe() lines and the skip decision: in a child when groups are forked, so
    // that this process never initialises a device runtime (CUDA is not fork-safe once initialised).
    int pr;
    if (forked) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            alarm((unsigned)timeout_s); // a device runtime that hangs in init ends this child
            _exit(probe());
        }
        int status = 0;
        while (waitpid(pid, &status, 0) < 0)
            ;
        pr = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
        if (WIFSIGNALED(status)) {
            printf("FAIL init[%s] crashed: %s\n", cand_name, strsignal(WTERMSIG(status)));
            cf_res->failed++;
        }
    } else {
        pr = probe();
    }
    if (pr == 77) return 77;
    if (pr != 0) {
        printf("conformance %s vs cpu: %d passed, %d failed (%d skipped)\n", cand_name, cf_res->passed,
               cf_res->failed ? cf_res->failed : 1, cf_res->skipped);
        return 1;
    }

    signal(SIGALRM, on_alarm);
    for (size_t i = 0; i < sizeof groups / sizeof *groups; i++) {
        if (!group_selected(groups[i].name)) continue;
        cf_note("--- %s ---", groups[i].name);
        if (forked) {
            run_forked(&groups[i]);
        } else {
            cf_res->started = cf_res->skip = 0;
            groups[i].fn();
            alarm((unsigned)timeout_s);
            cf_close_both();
            alarm(0);
        }
    }
    printf("conformance %s vs cpu: %d passed, %d failed (%d skipped)\n", cand_name, cf_res->passed, cf_res->failed,
           cf_res->skipped);
    return cf_res->failed == 0 && cf_res->passed > 0 ? 0 : 1;
}
