// plugins/cpu/cpu_memory.c: memory of the cpu plugin: plain host memory for both alloc() and
// host_alloc() (and cpu_block for the plugin's own scratch), the copy members (all synchronous memcpy),
// type conversion and mem_info.
// defines: cpu_alloc, cpu_free, cpu_host_alloc, cpu_host_free, cpu_copy_to_device, cpu_copy_to_host,
//          cpu_copy, cpu_copy_2d, cpu_zero, cpu_convert, cpu_mem_info, cpu_block
//
// alloc() memory is zeroed only with DSMOE_ALLOC_ZERO. Without it the bytes are whatever the allocator
// returns, or 0xFF (NaN floats, -1 ints) with the plugin's `poison` setting, which tests turn on so
// that a reader of memory nobody wrote fails loudly instead of seeing lucky zeros.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h> // madvise
#include <unistd.h>   // sysconf

#include "cpu_bf16.h"     // cpu_f32_to_bf16_par, cpu_bf16_to_f32_par
#include "cpu_internal.h" // CPU_BEGIN, CPU_REQUIRE, cpu_fail

// alloc() alignment: the contract's 256 (a CUDA allocation's), more than any vector load needs.
#define CPU_ALLOC_ALIGN 256
// host_alloc() alignment: a cache line, and an AVX-512 vector.
#define CPU_HOST_ALIGN 64
// alloc() of at least CPU_HUGE_MIN bytes is aligned to 2 MiB and asks for transparent huge pages (a
// hint: ignored where THP is off). Streaming a weight matrix through 4 KiB pages costs a core much of its
// memory bandwidth (hardware prefetchers stop at page boundaries): a decode step reads every weight once.
#define CPU_HUGE_PAGE ((size_t)2 << 20)
#define CPU_HUGE_MIN ((size_t)4 << 20)

// aligned_alloc wants a multiple of the alignment; 0 bytes still gets a unique block.
static void *aligned_block(size_t bytes, size_t align, size_t *rounded) {
    *rounded = bytes == 0 ? align : (bytes + align - 1) & ~(align - 1);
    if (*rounded < bytes)
        return NULL;
    return aligned_alloc(align, *rounded);
}

void *cpu_block(size_t bytes, size_t *rounded) {
    size_t align = bytes >= CPU_HUGE_MIN ? CPU_HUGE_PAGE : CPU_ALLOC_ALIGN;
    void *p = aligned_block(bytes, align, rounded);
    if (p && align == CPU_HUGE_PAGE)
        (void)madvise(p, *rounded, MADV_HUGEPAGE); // before the first touch, so the pages come huge
    return p;
}

dsmoe_status cpu_alloc(cpu_ctx *ctx, size_t bytes, uint32_t flags, void **ptr) {
    CPU_REQUIRE(ctx, ptr, "cpu: alloc: NULL ptr");
    *ptr = NULL;
    if (ctx->sticky != DSMOE_OK)
        return ctx->sticky;
    CPU_REQUIRE(ctx, (flags & ~(uint32_t)DSMOE_ALLOC_ZERO) == 0, "cpu: alloc: unknown flags 0x%x", flags);
    size_t rounded;
    void *p = cpu_block(bytes, &rounded);
    if (!p)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: alloc: cannot allocate %zu bytes of host memory", bytes);
    if (flags & DSMOE_ALLOC_ZERO)
        memset(p, 0, rounded);
    else if (ctx->poison)
        memset(p, 0xFF, rounded);
    *ptr = p;
    return DSMOE_OK;
}

// Every op has run when free is called (they are synchronous), so the buffer goes at once.
void cpu_free(cpu_ctx *ctx, void *ptr) { free(ptr); }

dsmoe_status cpu_host_alloc(cpu_ctx *ctx, size_t bytes, void **ptr) {
    CPU_REQUIRE(ctx, ptr, "cpu: host_alloc: NULL ptr");
    size_t rounded;
    *ptr = aligned_block(bytes, CPU_HOST_ALIGN, &rounded);
    if (!*ptr)
        return cpu_fail(ctx, DSMOE_ERR_NOMEM, "cpu: host_alloc: cannot allocate %zu bytes", bytes);
    return DSMOE_OK;
}

void cpu_host_free(cpu_ctx *ctx, void *ptr) { free(ptr); }

static dsmoe_status copy_bytes(cpu_ctx *ctx, cpu_queue *q, const char *op, void *dst, const void *src, size_t bytes) {
    CPU_BEGIN(ctx, q, op);
    if (bytes == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dst && src, "cpu: %s: NULL %s with bytes=%zu", op, dst ? "source" : "destination", bytes);
    memmove(dst, src, bytes);
    return DSMOE_OK;
}

dsmoe_status cpu_copy_to_device(cpu_ctx *ctx, cpu_queue *q, void *dst, const void *src, size_t bytes) {
    return copy_bytes(ctx, q, "copy_to_device", dst, src, bytes);
}

dsmoe_status cpu_copy_to_host(cpu_ctx *ctx, cpu_queue *q, void *dst, const void *src, size_t bytes) {
    return copy_bytes(ctx, q, "copy_to_host", dst, src, bytes);
}

dsmoe_status cpu_copy(cpu_ctx *ctx, cpu_queue *q, void *dst, const void *src, size_t bytes) {
    return copy_bytes(ctx, q, "copy", dst, src, bytes);
}

dsmoe_status cpu_copy_2d(cpu_ctx *ctx, cpu_queue *q, void *dst, size_t dpitch, const void *src, size_t spitch,
                         size_t width, size_t rows) {
    CPU_BEGIN(ctx, q, "copy_2d");
    CPU_REQUIRE(ctx, dpitch >= width && spitch >= width, "cpu: copy_2d: dpitch=%zu spitch=%zu: expected >= width=%zu",
                dpitch, spitch, width);
    if (width == 0 || rows == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dst && src, "cpu: copy_2d: NULL %s with %zu rows of %zu bytes", dst ? "source" : "destination",
                rows, width);
    for (size_t r = 0; r < rows; r++)
        memcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
    return DSMOE_OK;
}

dsmoe_status cpu_zero(cpu_ctx *ctx, cpu_queue *q, void *dst, size_t bytes) {
    CPU_BEGIN(ctx, q, "zero");
    if (bytes == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dst, "cpu: zero: NULL buffer with bytes=%zu", bytes);
    memset(dst, 0, bytes);
    return DSMOE_OK;
}

// float32 <-> float32 (a copy) and float32 <-> bfloat16 (cpu_bf16.c: round to nearest even, NaN kept a
// quiet NaN, vectorised); other pairs are not needed yet.
dsmoe_status cpu_convert(cpu_ctx *ctx, cpu_queue *q, void *dst, dsmoe_dtype dst_type, const void *src,
                         dsmoe_dtype src_type, size_t n) {
    CPU_BEGIN(ctx, q, "convert");
    int f2f = src_type == DSMOE_FLOAT32 && dst_type == DSMOE_FLOAT32;
    int f2b = src_type == DSMOE_FLOAT32 && dst_type == DSMOE_BFLOAT16;
    int b2f = src_type == DSMOE_BFLOAT16 && dst_type == DSMOE_FLOAT32;
    if (!f2f && !f2b && !b2f)
        return cpu_fail(ctx, DSMOE_ERR_UNSUPPORTED, "cpu: convert: %s to %s is not supported (float32 <-> float32 "
                        "or bfloat16 only)", dsmoe_dtype_name(src_type), dsmoe_dtype_name(dst_type));
    if (n == 0)
        return DSMOE_OK;
    CPU_REQUIRE(ctx, dst && src, "cpu: convert: NULL %s with n=%zu", dst ? "src" : "dst", n);
    if (f2f)
        memmove(dst, src, n * sizeof(float));
    else if (f2b)
        cpu_f32_to_bf16_par(ctx, dst, src, n);
    else
        cpu_bf16_to_f32_par(ctx, dst, src, n);
    return DSMOE_OK;
}

// MemAvailable and MemTotal from /proc/meminfo (what the kernel would give without swapping); sysconf
// where that file is missing. Free is the node's, not this process's share of it.
dsmoe_status cpu_mem_info(cpu_ctx *ctx, size_t *free_bytes, size_t *total_bytes) {
    CPU_REQUIRE(ctx, free_bytes && total_bytes, "cpu: mem_info: NULL free_bytes or total_bytes");
    unsigned long long avail_kb = 0, total_kb = 0;
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f)) {
            unsigned long long v;
            if (sscanf(line, "MemTotal: %llu kB", &v) == 1)
                total_kb = v;
            else if (sscanf(line, "MemAvailable: %llu kB", &v) == 1)
                avail_kb = v;
        }
        fclose(f);
    }
    if (total_kb && avail_kb) {
        *free_bytes = (size_t)(avail_kb * 1024);
        *total_bytes = (size_t)(total_kb * 1024);
        return DSMOE_OK;
    }
    long page = sysconf(_SC_PAGESIZE), pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
    if (page <= 0 || pages <= 0 || avail < 0)
        return cpu_fail(ctx, DSMOE_ERR_SYSTEM, "cpu: mem_info: neither /proc/meminfo nor sysconf gives the "
                        "memory size");
    *free_bytes = (size_t)avail * (size_t)page;
    *total_bytes = (size_t)pages * (size_t)page;
    return DSMOE_OK;
}
