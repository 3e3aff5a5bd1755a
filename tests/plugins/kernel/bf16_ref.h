// tests/plugins/kernel/bf16_ref.h: bfloat16 written from its definition, for the tests of the cpu
// plugin's bfloat16 paths (test_cpu_bf16.c, test_cpu_bf16_rows.c): the reference rounding they hold the
// plugin's conversions and one-rounding results to.
// Header-only. defines: SENTINEL_BITS, bits_f, f_bits, bf2f, mag, ref_f2bf, to_bf16
#ifndef DSMOE_TEST_BF16_REF_H
#define DSMOE_TEST_BF16_REF_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SENTINEL_BITS 0x4640u // 12288.0 as bfloat16: rows a call must not write keep it

// ---------------------------------------------------------------------------------------------------
// bfloat16 from the definition

static float bits_f(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float bf2f(uint16_t h) { return bits_f((uint32_t)h << 16); }

// The value of a bfloat16 pattern of finite magnitude class, in double; 0x7f80 (what follows the largest
// finite value) counts as 2^128, where IEEE rounding puts the overflow threshold.
static double mag(uint16_t h) { return (h & 0x7fff) == 0x7f80 ? ldexp(1.0, 128) : fabs((double)bf2f(h)); }

static uint16_t ref_f2bf(float x) {
    uint32_t u = f_bits(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    if (isnan(x))
        return (uint16_t)(sign | 0x7fc0 | ((u >> 16) & 0x3f)); // quiet, sign and top payload kept
    if (isinf(x))
        return (uint16_t)(sign | 0x7f80);
    uint16_t lo = (uint16_t)((u >> 16) & 0x7fff), hi = (uint16_t)(lo + 1); // magnitudes around |x|
    double ax = fabs((double)x), dlo = ax - mag(lo), dhi = mag(hi) - ax;
    uint16_t pick = dlo < dhi ? lo : dhi < dlo ? hi : (lo & 1) ? hi : lo;
    return (uint16_t)(sign | pick);
}

// bfloat16 bits of n values (rounded by the reference), and the rounded values back in x.
static uint16_t *to_bf16(float *x, size_t n) {
    uint16_t *h = malloc((n ? n : 1) * sizeof *h);
    for (size_t i = 0; i < n; i++) {
        h[i] = ref_f2bf(x[i]);
        x[i] = bf2f(h[i]);
    }
    return h;
}

#endif
