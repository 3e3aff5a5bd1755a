// tests/comm_inputs.h: the inputs both comm conformance suites (tests/plugins/comm/test_comm_mpi.c on host
// buffers, tests/plugins/comm/test_comm_device.c on a kernel plugin's buffers) build their cases from: byte
// patterns for data movement and float values for sums, formulas of (rank, index) that any rank can
// recompute for its reference.
// defines: comm_pat, comm_value
#ifndef DSMOE_COMM_INPUTS_H
#define DSMOE_COMM_INPUTS_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>

// Byte k of the block rank `from` sends to rank `to`.
static inline uint8_t comm_pat(int from, int to, size_t k) { return (uint8_t)(from * 73 + to * 31 + (int)(k * 7) + 1); }

static inline uint64_t comm_mix(uint64_t x) { // splitmix64 finaliser
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Rank r's element i: signs and exponents spread over 2^-20..2^20, so the order of a sum shows in its
// bits.
static inline double comm_value(int r, size_t i) {
    uint64_t h = comm_mix((uint64_t)r * 1000003u + i);
    double m = 0.5 + (double)(h & 0xffffff) / 16777216.0;
    return ((h >> 40) & 1 ? -1.0 : 1.0) * ldexp(m, (int)((h >> 24) % 41) - 20);
}
#endif
