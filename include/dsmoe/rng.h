// dsmoe/rng.h: the counter-based random numbers every part of dsmoe uses.
// A random value is a pure function of (key, counter): no hidden state, so a value does not depend on
// which rank, thread or device computes it, and "RNG state" in a checkpoint is just the seed and step.
// Keys are derived from the run seed and a purpose tag with dsmoe_rng_key(); counters are global
// indices (parameter element, global token index, sample index).
//
// Device code: every function is DSMOE_HD (__host__ __device__ under nvcc), so a CUDA kernel draws the
// same numbers. The integer mixing and dsmoe_rng_uniform / _uniform_pos are exact on any device. The
// normal and Gumbel samples go through log, sqrt and cos: CUDA's double-precision log and cos are not
// correctly rounded (1-2 ulp), so a device sample may differ from the host's in the last bits of the
// double before the cast to float (rarely in the float). Where that matters (parameter initialisation,
// Gumbel choices near a tie), compare against the cpu plugin with a tolerance, or initialise on the host.
#ifndef DSMOE_RNG_H
#define DSMOE_RNG_H
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define DSMOE_HD __host__ __device__
#else
#define DSMOE_HD
#endif

// splitmix64 finaliser: a bijective 64-bit mix with full avalanche.
static inline DSMOE_HD uint64_t dsmoe_mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Derive a stream key from a parent key and up to three tags (purpose, layer, step, ...).
static inline DSMOE_HD uint64_t dsmoe_rng_key(uint64_t parent, uint64_t a, uint64_t b, uint64_t c) {
    return dsmoe_mix64(dsmoe_mix64(dsmoe_mix64(parent ^ 0x5851F42D4C957F2Dull) ^ a) ^
                       dsmoe_mix64(b + 0x632BE59BD9B4E019ull) ^ dsmoe_mix64(c + 0x2545F4914F6CDD1Dull));
}

static inline DSMOE_HD uint64_t dsmoe_rng_u64(uint64_t key, uint64_t counter) {
    return dsmoe_mix64(key ^ dsmoe_mix64(counter));
}

// Uniform in [0, 1), 24 random bits (exactly representable in float).
static inline DSMOE_HD float dsmoe_rng_uniform(uint64_t key, uint64_t counter) {
    return (float)(dsmoe_rng_u64(key, counter) >> 40) * (1.0f / 16777216.0f);
}

// Uniform in (0, 1): never 0, safe under log().
static inline DSMOE_HD float dsmoe_rng_uniform_pos(uint64_t key, uint64_t counter) {
    return ((float)(dsmoe_rng_u64(key, counter) >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// Standard normal by Box-Muller over two counters (2*counter, 2*counter+1), computed in double.
static inline DSMOE_HD float dsmoe_rng_normal(uint64_t key, uint64_t counter) {
    double u1 = ((double)(dsmoe_rng_u64(key, 2 * counter) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    double u2 = (double)(dsmoe_rng_u64(key, 2 * counter + 1) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// Gumbel(0, 1) sample: -log(-log(u)).
static inline DSMOE_HD float dsmoe_rng_gumbel(uint64_t key, uint64_t counter) {
    double u = ((double)(dsmoe_rng_u64(key, counter) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    return (float)(-log(-log(u)));
}

#endif
