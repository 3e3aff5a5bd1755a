// core/plugins/plugin_files.c: finding plugin files: the search path, the plugins it holds, and whether a file
// is a whole shared object for this machine before dlopen maps it (plugin_loader.c does the rest).
// defines: dsmoe_plugin_search_path, dsmoe_plugin_list (plugin_loader.h), dsmoe_plugin_not_found,
//          dsmoe_plugin_check_elf (plugin_files.h)
#define _GNU_SOURCE
#include "plugin_files.h"

#include <dirent.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
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

// The ELF identity of a shared object this process can load (checked before dlopen, see check_elf).
_Static_assert(sizeof(void *) == 8, "check_elf reads 64-bit ELF headers only");
#define ELF_CLASS_HERE ELFCLASS64
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ELF_DATA_HERE ELFDATA2LSB
#else
#define ELF_DATA_HERE ELFDATA2MSB
#endif
#if defined(__x86_64__)
#define ELF_MACHINE_HERE EM_X86_64
#elif defined(__aarch64__)
#define ELF_MACHINE_HERE EM_AARCH64
#elif defined(__powerpc64__)
#define ELF_MACHINE_HERE EM_PPC64
#else
#define ELF_MACHINE_HERE 0 // unknown here: e_machine is left to dlopen
#endif


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

#define MAX_LISTED 64

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

int dsmoe_plugin_list(const char *kind, const char *extra_path, char (*names)[64], int max) {
    char path[8192];
    dsmoe_plugin_search_path(extra_path, path, sizeof path);
    name_list found;
    list_available(kind, path, &found);
    int n = found.n < max ? found.n : max;
    for (int i = 0; i < n; i++) memcpy(names[i], found.names[i], sizeof names[i]);
    return n;
}

dsmoe_status dsmoe_plugin_not_found(const char *kind, const char *name, const char *path, dsmoe_err *err) {
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


// Is h->path a whole ELF shared object for this machine? dlopen maps the PT_LOAD segments and touches
// them: a file cut short (a copy or download interrupted) dies by SIGBUS inside dlopen, with no word
// of which file. So the header, the program header table and every PT_LOAD file range must lie within
// the file. Writes the reason into why; 0 when the file passes.
int dsmoe_plugin_check_elf(const char *path, char *why, size_t len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        snprintf(why, len, "cannot be read (%s)", strerror(errno));
        if (fd >= 0) close(fd);
        return 1;
    }
    uint64_t size = (uint64_t)st.st_size;
    Elf64_Ehdr eh;
    memset(&eh, 0, sizeof eh);
    ssize_t got = pread(fd, &eh, sizeof eh, 0);
    int bad = 1;
    if (got < SELFMAG || memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0)
        snprintf(why, len, "not an ELF file (no \\177ELF magic in its first bytes; %llu bytes)",
                 (unsigned long long)size);
    else if (got < EI_NIDENT)
        snprintf(why, len, "truncated: the ELF header ends at byte %zu but the file has %llu bytes", sizeof eh,
                 (unsigned long long)size);
    else if (eh.e_ident[EI_CLASS] != ELF_CLASS_HERE)
        snprintf(why, len, "built for another word size (ELF class %d; this machine is 64-bit, class %d)",
                 eh.e_ident[EI_CLASS], ELF_CLASS_HERE);
    else if (eh.e_ident[EI_DATA] != ELF_DATA_HERE)
        snprintf(why, len, "built for another byte order (ELF data %d; this machine's is %d)", eh.e_ident[EI_DATA],
                 ELF_DATA_HERE);
    else if ((size_t)got < sizeof eh)
        snprintf(why, len, "truncated: the ELF header ends at byte %zu but the file has %llu bytes", sizeof eh,
                 (unsigned long long)size);
    else if (eh.e_type != ET_DYN)
        snprintf(why, len, "not a shared object (e_type %u; expected ET_DYN, %u)", eh.e_type, ET_DYN);
    else if (ELF_MACHINE_HERE && eh.e_machine != ELF_MACHINE_HERE)
        snprintf(why, len, "built for another machine (e_machine %u; this machine is %u)", eh.e_machine,
                 ELF_MACHINE_HERE);
    else if (eh.e_phnum == 0 || eh.e_phentsize != sizeof(Elf64_Phdr))
        snprintf(why, len, "malformed: %u program headers of %u bytes (expected at least one of %zu)", eh.e_phnum,
                 eh.e_phentsize, sizeof(Elf64_Phdr));
    else if (eh.e_phoff > size || (uint64_t)eh.e_phnum * sizeof(Elf64_Phdr) > size - eh.e_phoff)
        snprintf(why, len, "truncated: the program header table ends at byte %llu but the file has %llu bytes",
                 (unsigned long long)eh.e_phoff + (unsigned long long)eh.e_phnum * sizeof(Elf64_Phdr),
                 (unsigned long long)size);
    else
        bad = 0;
    for (int i = 0; !bad && i < eh.e_phnum; i++) {
        Elf64_Phdr ph;
        if (pread(fd, &ph, sizeof ph, (off_t)(eh.e_phoff + (uint64_t)i * sizeof ph)) != (ssize_t)sizeof ph) {
            snprintf(why, len, "cannot be read (%s)", strerror(errno));
            bad = 1;
        } else if (ph.p_type == PT_LOAD && (ph.p_offset > size || ph.p_filesz > size - ph.p_offset)) {
            // p_offset + p_filesz may wrap in a damaged file: print what the header says, saturated.
            uint64_t endb = ph.p_offset + ph.p_filesz < ph.p_offset ? UINT64_MAX : ph.p_offset + ph.p_filesz;
            snprintf(why, len, "truncated: PT_LOAD segment %d ends at byte %llu but the file has %llu bytes", i,
                     (unsigned long long)endb, (unsigned long long)size);
            bad = 1;
        }
    }
    close(fd);
    return bad;
}
