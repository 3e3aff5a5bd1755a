// bench/bench_args.h: the command-line pieces every benchmark program shares (header-only, like the
// tests' helpers): integer and real flags checked against a range, and "--flag value" pairs.
#ifndef DSMOE_BENCH_ARGS_H
#define DSMOE_BENCH_ARGS_H
#include <stdio.h>
#include <stdlib.h>

// *out = v as an integer in [lo, hi]; otherwise "<prog>: <flag> <v>: expected an integer >= lo" and -1.
static inline int bench_parse_int(const char *prog, const char *flag, const char *v, int lo, long hi, int *out) {
    char *end;
    long x = strtol(v, &end, 10);
    if (*v == '\0' || *end != '\0' || x < lo || x > hi) {
        fprintf(stderr, "%s: %s %s: expected an integer >= %d\n", prog, flag, v, lo);
        return -1;
    }
    *out = (int)x;
    return 0;
}

// *out = v as a number in [lo, hi] (lo itself excluded when open_lo); otherwise "<prog>: <flag> <v>:
// expected a number in ..." and -1.
static inline int bench_parse_real(const char *prog, const char *flag, const char *v, double lo, double hi,
                                   int open_lo, double *out) {
    char *end;
    double x = strtod(v, &end);
    if (*v == '\0' || *end != '\0' || !(x >= lo && x <= hi) || (open_lo && x == lo)) {
        fprintf(stderr, "%s: %s %s: expected a number in %c%g, %g]\n", prog, flag, v, open_lo ? '(' : '[', lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

// The value after flag argv[*i] (advancing *i), or NULL after "<prog>: <flag> needs a value".
static inline const char *bench_flag_value(const char *prog, int argc, char **argv, int *i) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "%s: %s needs a value\n", prog, argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

#endif
