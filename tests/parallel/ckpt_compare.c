// tests/parallel/ckpt_compare.c: compares two dsmoe checkpoints tensor by tensor.
// usage: ckpt_compare A.safetensors B.safetensors [rtol [all]]
// Prints the largest difference relative to the tensor's scale (|a-b| / max over the tensor of |a|) and
// the tensor it is in; exits 0 when every parameter tensor (with "all", the optimizer moments too) is
// within rtol (default 0: bitwise), 1 otherwise.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s A.safetensors B.safetensors [rtol]\n", argv[0]);
        return 2;
    }
    double rtol = argc > 3 ? atof(argv[3]) : 0.0;
    int all = argc > 4 && strcmp(argv[4], "all") == 0;
    dsmoe_st_file *a, *b;
    dsmoe_err err = {0};
    if (dsmoe_st_open(argv[1], &a, &err) != DSMOE_OK || dsmoe_st_open(argv[2], &b, &err) != DSMOE_OK) {
        fprintf(stderr, "%s\n", err.msg);
        return 2;
    }
    double worst = 0;
    const char *worst_name = "(none)";
    int compared = 0;
    for (int i = 0; i < dsmoe_st_count(a); i++) {
        const dsmoe_st_tensor *ta = dsmoe_st_at(a, i);
        if (!all && strncmp(ta->name, "optim.", 6) == 0) continue;
        const dsmoe_st_tensor *tb = dsmoe_st_find(b, ta->name);
        if (!tb || tb->nbytes != ta->nbytes || ta->dtype != DSMOE_ST_F32) {
            fprintf(stderr, "tensor %s missing or of another size in %s\n", ta->name, argv[2]);
            return 1;
        }
        size_t n = ta->nbytes / sizeof(float);
        // Biases and LayerNorm shifts start at 0: an element-wise relative error there means little.
        double scale = 1e-6;
        for (size_t j = 0; j < n; j++) {
            float x;
            memcpy(&x, (const char *)ta->data + j * sizeof x, sizeof x);
            scale = fmax(scale, fabs(x));
        }
        for (size_t j = 0; j < n; j++) {
            float x, y;
            memcpy(&x, (const char *)ta->data + j * sizeof x, sizeof x);
            memcpy(&y, (const char *)tb->data + j * sizeof y, sizeof y);
            double d = fabs((double)x - (double)y) / scale;
            if (d > worst || isnan(d)) {
                worst = isnan(d) ? INFINITY : d;
                worst_name = ta->name;
            }
        }
        compared++;
    }
    printf("compared %d tensors: max relative difference %.3g (in %s)\n", compared, worst, worst_name);
    dsmoe_st_close(a);
    dsmoe_st_close(b);
    return compared > 0 && worst <= rtol ? 0 : 1;
}
