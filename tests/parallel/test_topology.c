// tests/parallel/test_topology.c: the pure decisions of core/parallel/topology.c and
// core/parallel/placement.c on described nodes (hwloc synthetic descriptions, and
// inputs/topologies/test-4gpu.xml with four fake GPUs whose ordinals run against the NUMA order),
// against sets worked out by hand from the rules in topology.h.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config.h"
#include "placement.h"
#include "topology.h"

#define TEST_4GPU DSMOE_TEST_SOURCE_DIR "/inputs/topologies/test-4gpu.xml"

static dsmoe_topo *load(const char *source) {
    dsmoe_topo *t = NULL;
    dsmoe_err err = {0};
    if (dsmoe_topo_load(source, &t, &err) != DSMOE_OK) fail_msg("%s", err.msg);
    return t;
}

// Spreads n ranks over the topology's allowed set (or area_text) and compares with want[i] (hwloc lists).
static void expect_spread(dsmoe_topo *t, const char *area_text, int n, const char *const *want) {
    hwloc_cpuset_t area = hwloc_bitmap_alloc(), sets[64];
    if (area_text) hwloc_bitmap_list_sscanf(area, area_text);
    else hwloc_bitmap_copy(area, hwloc_topology_get_allowed_cpuset(dsmoe_topo_hwloc(t)));
    for (int i = 0; i < n; i++) sets[i] = hwloc_bitmap_alloc();
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_topo_spread(t, area, n, sets, &err), DSMOE_OK);
    for (int i = 0; i < n; i++) {
        char got[256];
        hwloc_bitmap_list_snprintf(got, sizeof got, sets[i]);
        if (strcmp(got, want[i]) != 0) fail_msg("%d ranks: rank %d got PUs %s, expected %s", n, i, got, want[i]);
        hwloc_bitmap_free(sets[i]);
    }
    hwloc_bitmap_free(area);
}

// 2 packages x 2 NUMA nodes x 4 cores x 2 PUs: PU os indexes follow the synthetic order, so NUMA node i
// holds PUs 8i..8i+7 and core j PUs 2j, 2j+1.
static void test_spread_over_packages_and_numa(void **state) {
    (void)state;
    dsmoe_topo *t = load("synthetic:pack:2 numa:2 core:4 pu:2");
    expect_spread(t, NULL, 1, (const char *[]){"0-31"});
    expect_spread(t, NULL, 2, (const char *[]){"0-15", "16-31"});            // a package each
    expect_spread(t, NULL, 4, (const char *[]){"0-7", "8-15", "16-23", "24-31"}); // a NUMA node each
    // 3 ranks: package 0 gets floor(3*16/32) = 1 rank, package 1 the other 2, one NUMA node each.
    expect_spread(t, NULL, 3, (const char *[]){"0-15", "16-23", "24-31"});
    // 8 ranks: 2 per NUMA node, each a contiguous pair of cores (both hyperthreads).
    expect_spread(t, NULL, 8, (const char *[]){"0-3", "4-7", "8-11", "12-15", "16-19", "20-23", "24-27", "28-31"});
    // 32 ranks on 16 cores: two per core, sharing its PUs.
    const char *two_per_core[32];
    char buf[32][16];
    for (int i = 0; i < 32; i++) {
        snprintf(buf[i], sizeof buf[i], "%d-%d", 2 * (i / 2), 2 * (i / 2) + 1);
        two_per_core[i] = buf[i];
    }
    expect_spread(t, NULL, 32, two_per_core);
    // A batch system left NUMA nodes 0 and 2: one rank on each, never across.
    expect_spread(t, "0-7,16-23", 2, (const char *[]){"0-7", "16-23"});
    // Only part of a NUMA node (cores 0-2 of node 0): 2 ranks split its 3 cores at the weight midpoints.
    expect_spread(t, "0-5", 2, (const char *[]){"0-1", "2-5"});
    dsmoe_topo_free(t);
}

static void test_spread_uneven(void **state) {
    (void)state;
    dsmoe_topo *t = load("synthetic:numa:2 core:8 pu:1");
    // 3 ranks on 2 NUMA nodes of 8 cores: 1 and 2 ranks (8, 4 and 4 cores); nobody straddles.
    expect_spread(t, NULL, 3, (const char *[]){"0-7", "8-11", "12-15"});
    // 5 ranks: NUMA 0 gets floor(5*8/16) = 2, NUMA 1 gets 3; 8 cores over 3 ranks by midpoints: 3, 2, 3.
    expect_spread(t, NULL, 5, (const char *[]){"0-3", "4-7", "8-10", "11-12", "13-15"});
    dsmoe_err err = {0};
    hwloc_cpuset_t area = hwloc_bitmap_alloc(), set = hwloc_bitmap_alloc();
    hwloc_bitmap_list_sscanf(area, "100-101");
    assert_int_equal(dsmoe_topo_spread(t, area, 1, &set, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "the allowed CPUs '100-101' hold no PU of the topology"));
    hwloc_bitmap_free(area);
    hwloc_bitmap_free(set);
    dsmoe_topo_free(t);
}

static void test_thread_cpus_one_per_core_first(void **state) {
    (void)state;
    dsmoe_topo *t = load("synthetic:pack:2 numa:2 core:4 pu:2");
    hwloc_cpuset_t set = hwloc_bitmap_alloc();
    hwloc_bitmap_list_sscanf(set, "0-5");
    int cpus[16], n = dsmoe_topo_thread_cpus(t, set, cpus, 16);
    int want[] = {0, 2, 4, 1, 3, 5}; // first PU of cores 0, 1, 2, then their second PUs
    assert_int_equal(n, 6);
    assert_memory_equal(cpus, want, sizeof want);
    assert_int_equal(dsmoe_topo_cores_in(t, set), 3);
    hwloc_bitmap_free(set);
    dsmoe_topo_free(t);
}

// test-4gpu.xml: 2 packages x 2 NUMA nodes x 2 cores x 1 PU (NUMA i = PUs 2i, 2i+1), 1 GiB per NUMA
// node; cuda0 0000:c1:00.0 on NUMA 3, cuda1 0000:81:00.0 on NUMA 2, cuda2 0000:41:00.0 on NUMA 1, cuda3
// 0000:01:00.0 on NUMA 0, 16 GB each.
static const char busids[4][16] = {"0000:c1:00.0", "0000:81:00.0", "0000:41:00.0", "0000:01:00.0"};

static void choose(dsmoe_topo *t, int n, int *gpu) {
    hwloc_cpuset_t sets[16];
    for (int i = 0; i < n; i++) sets[i] = hwloc_bitmap_alloc();
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_topo_spread(t, hwloc_topology_get_allowed_cpuset(dsmoe_topo_hwloc(t)), n, sets, &err),
                     DSMOE_OK);
    dsmoe_topo_choose_gpus(t, n, (const hwloc_const_cpuset_t *)sets, 4, busids, gpu);
    for (int i = 0; i < n; i++) hwloc_bitmap_free(sets[i]);
}

static void test_gpus_by_locality(void **state) {
    (void)state;
    dsmoe_topo *t = load(TEST_4GPU);
    char found[8][16];
    assert_int_equal(dsmoe_topo_list_gpus(t, found, 8), 4);
    dsmoe_topo_gpu_info gi;
    dsmoe_topo_gpu(t, "0000:c1:00.0", &gi);
    assert_true(gi.found);
    char loc[64];
    hwloc_bitmap_list_snprintf(loc, sizeof loc, gi.locality);
    assert_string_equal(loc, "6-7"); // NUMA 3
    assert_true(gi.memory_bytes == 16ull << 30);
    hwloc_bitmap_free(gi.locality);
    dsmoe_topo_gpu(t, "0000:99:00.0", &gi); // not in the topology: local to everything
    assert_false(gi.found);
    hwloc_bitmap_list_snprintf(loc, sizeof loc, gi.locality);
    assert_string_equal(loc, "0-7");
    hwloc_bitmap_free(gi.locality);

    int gpu[8];
    choose(t, 4, gpu); // rank i on NUMA i takes the GPU on NUMA i: ordinals run backwards
    assert_memory_equal(gpu, ((int[]){3, 2, 1, 0}), 4 * sizeof(int));
    choose(t, 8, gpu); // two per GPU, neighbours together
    assert_memory_equal(gpu, ((int[]){3, 3, 2, 2, 1, 1, 0, 0}), 8 * sizeof(int));
    // 2 ranks, a package each: two local GPUs tie (2 PUs shared each), the lower ordinal wins.
    choose(t, 2, gpu);
    assert_memory_equal(gpu, ((int[]){2, 0}), 2 * sizeof(int));

    hwloc_cpuset_t set = hwloc_bitmap_alloc();
    hwloc_bitmap_list_sscanf(set, "0-1");
    assert_int_equal(dsmoe_topo_numa_of(t, set, NULL), 0);
    assert_int_equal(dsmoe_topo_numa_of(t, set, "0000:c1:00.0"), 3); // host buffers next to the GPU
    hwloc_bitmap_free(set);
    assert_true(dsmoe_topo_numa_memory(t, 2) == 1ull << 30);
    assert_true(dsmoe_topo_memory(t) == 4ull << 30);
    char desc[256];
    dsmoe_topo_describe(t, desc, sizeof desc);
    assert_non_null(strstr(desc, "2 packages, 4 NUMA nodes, 8 cores, 8 PUs, 4.0 GiB, 4 GPUs"));
    dsmoe_topo_free(t);
}

static void test_bad_sources(void **state) {
    (void)state;
    dsmoe_topo *t = NULL;
    dsmoe_err err = {0};
    assert_int_not_equal(dsmoe_topo_load("/nonexistent/node.xml", &t, &err), DSMOE_OK);
    assert_null(t);
    assert_non_null(strstr(err.msg, "'/nonexistent/node.xml'"));
    assert_non_null(strstr(err.msg, "expected an hwloc XML file"));
    assert_int_not_equal(dsmoe_topo_load("synthetic:pack:two", &t, &err), DSMOE_OK);
    assert_non_null(strstr(err.msg, "'pack:two'"));
    assert_non_null(strstr(err.msg, "synthetic description"));
}

static void test_slots_node_major(void **state) {
    (void)state;
    int slot[8];
    // srun -m cyclic over 2 nodes: ranks alternate nodes; slots put each node's ranks together.
    assert_int_equal(dsmoe_placement_slots(4, (int[]){0, 1, 0, 1}, (int[]){0, 0, 1, 1}, slot), 1);
    assert_memory_equal(slot, ((int[]){0, 2, 1, 3}), 4 * sizeof(int));
    // Uneven nodes (3 + 1): world order.
    assert_int_equal(dsmoe_placement_slots(4, (int[]){0, 0, 0, 1}, (int[]){0, 1, 2, 0}, slot), 0);
    assert_memory_equal(slot, ((int[]){0, 1, 2, 3}), 4 * sizeof(int));
}

// The expert table of 8 cyclic ranks on 2 nodes, 8 experts with ep 4: the EP groups follow the nodes.
static void test_expert_table(void **state) {
    (void)state;
    dsmoe_config cfg;
    dsmoe_err err = {0};
    char *over[] = {"moe.experts=8", "moe.expert_parallel=4", "model.layers=4", "train.batch=8"};
    assert_int_equal(dsmoe_config_load_text("", "t.deck", over, 4, (char *[]){NULL}, 8, &cfg, NULL, &err), DSMOE_OK);
    dsmoe_rank_place rows[8];
    memset(rows, 0, sizeof rows);
    int node[8], local[8], slot[8];
    for (int r = 0; r < 8; r++) node[r] = r % 2, local[r] = r / 2;
    dsmoe_placement_slots(8, node, local, slot);
    for (int r = 0; r < 8; r++) rows[r].rank = r, rows[r].node = node[r], rows[r].local = local[r], rows[r].slot = slot[r];
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    dsmoe_placement_print_experts(f, &cfg, rows, 8, 0);
    fclose(f);
    assert_non_null(strstr(text, "experts: MoE layers 1-2: 8 experts, ep 4 (2 per rank), 2 EP groups of 4 ranks, each "
                                 "over 1 node (fewest possible 1); expert-data-parallel groups of 2\n"));
    assert_non_null(strstr(text, "  group 0: r0:e0-1 r2:e2-3 r4:e4-5 r6:e6-7\n"));
    assert_non_null(strstr(text, "  group 1: r1:e0-1 r3:e2-3 r5:e4-5 r7:e6-7\n"));
    free(text);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spread_over_packages_and_numa),
        cmocka_unit_test(test_spread_uneven),
        cmocka_unit_test(test_thread_cpus_one_per_core_first),
        cmocka_unit_test(test_gpus_by_locality),
        cmocka_unit_test(test_bad_sources),
        cmocka_unit_test(test_slots_node_major),
        cmocka_unit_test(test_expert_table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
