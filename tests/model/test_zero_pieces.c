// tests/model/test_zero_pieces.c (4 ranks): ZeRO-1's pieced all-gather. This binary links its own copy of
// core/model/optimizer.c built with DSMOE_ZERO_GATHER_ELEMS = 12 (tests/model/zero_pieces.cmake), so every range is
// gathered in pieces of 3 elements per rank (replicated, 4 ranks) or 6 (experts, expert-data-parallel
// groups of 2), with short last pieces and ranks that own fewer elements. Three AdamW steps from the same
// parameters and gradients must leave ZeRO-1's parameters and moments bitwise equal to ZeRO-0's.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <mpi.h>

#include "config.h"
#include "dsmoe/rng.h"
#include "model.h"
#include "optimizer.h"
#include "test_runtime.h"

static dsmoe_runtime rt;

// Gradient of global element g of tensor t: the same on every rank holding it (as after the reduction).
static void fill_grads(dsmoe_model *m, int step) {
    float *grads = dsmoe_model_grads(m);
    for (int i = 0; i < dsmoe_model_tensor_count(m); i++) {
        const dsmoe_param_tensor *t = dsmoe_model_tensor(m, i);
        for (size_t k = 0; k < t->numel; k++)
            grads[t->offset + k] = dsmoe_rng_uniform(1000 + (uint64_t)i * 7 + (uint64_t)step, t->shard_begin + k) - 0.5f;
    }
}

static void test_pieces_equal_whole(void **state) {
    (void)state;
    dsmoe_config cfg;
    dsmoe_err err = {0};
    char *over[] = {"model.vocab=30", "model.seq_len=4", "model.layers=2", "model.hidden=10", "model.heads=2",
                    "moe.experts=4", "moe.expert_parallel=2", "train.batch=4"};
    assert_int_equal(dsmoe_config_load_text("", "t.deck", over, 8, (char *[]){NULL}, 4, &cfg, NULL, &err), DSMOE_OK);
    dsmoe_model *m[2];
    dsmoe_optimizer *opt[2];
    for (int z = 0; z < 2; z++) {
        if (dsmoe_model_create(&cfg, &rt, cfg.micro_batch, &m[z], &err) != DSMOE_OK) fail_msg("%s", err.msg);
        assert_int_equal(dsmoe_model_init_params(m[z], 5, &err), DSMOE_OK);
        assert_int_equal(dsmoe_optimizer_create(m[z], z, &opt[z], &err), DSMOE_OK);
    }
    size_t n = dsmoe_model_local_params(m[0]);
    assert_true(dsmoe_zero_piece(n, 4) == 3); // the pieces really are smaller than the chunks
    for (int step = 1; step <= 3; step++)
        for (int z = 0; z < 2; z++) {
            fill_grads(m[z], step);
            assert_int_equal(dsmoe_optimizer_step(opt[z], 1e-2f, 1.0f, step, &err), DSMOE_OK);
        }
    assert_memory_equal(dsmoe_model_params(m[0]), dsmoe_model_params(m[1]), n * sizeof(float));
    float *full[2] = {malloc(n * sizeof(float)), malloc(n * sizeof(float))};
    for (int which = 0; which < 2; which++) {
        for (int z = 0; z < 2; z++) assert_int_equal(dsmoe_optimizer_get_state(opt[z], which, full[z], &err), DSMOE_OK);
        assert_memory_equal(full[0], full[1], n * sizeof(float));
    }
    // And the parameters moved: the test compares something.
    float *init = malloc(n * sizeof(float));
    dsmoe_model *fresh;
    assert_int_equal(dsmoe_model_create(&cfg, &rt, cfg.micro_batch, &fresh, &err), DSMOE_OK);
    assert_int_equal(dsmoe_model_init_params(fresh, 5, &err), DSMOE_OK);
    memcpy(init, dsmoe_model_params(fresh), n * sizeof(float));
    size_t moved = 0;
    for (size_t i = 0; i < n; i++) moved += init[i] != dsmoe_model_params(m[1])[i];
    assert_true(moved > n / 2);
    dsmoe_model_free(fresh);
    free(init);
    free(full[0]);
    free(full[1]);
    for (int z = 0; z < 2; z++) {
        dsmoe_optimizer_free(opt[z]);
        dsmoe_model_free(m[z]);
    }
}

int main(int argc, char **argv) {
    if (test_runtime_start(&argc, &argv, &rt) != 0) return 1;
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_pieces_equal_whole)};
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return failed;
}
