// tests/parallel/test_placement.c (4 ranks): the collective start-up placement on a described node
// (HWLOC_XMLFILE = inputs/topologies/test-4gpu.xml: 4 NUMA nodes of 2 cores, 4 fake GPUs whose ordinals
// run against the NUMA order): the topology is loaded once and shared, each rank gets its own NUMA node's
// cores, the GPU on its NUMA node (from a kernel-plugin table that lists the 4 devices), and the rows
// reach rank 0. A second table gives each rank only its own device (CUDA_VISIBLE_DEVICES per task).
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <mpi.h>

#include "config.h"
#include "placement.h"

static const char *const all_busids[4] = {"0000:C1:00.0", "0000:81:00.0", "0000:41:00.0", "0000:01:00.0"};
static int own_device_only = 0, world_rank = 0;

static dsmoe_status fake_count(int *count) {
    *count = own_device_only ? 1 : 4;
    return DSMOE_OK;
}
static dsmoe_status fake_busid(int ordinal, char *buf, size_t len) {
    // With one device per rank, rank r sees the GPU on NUMA node r (ordinal 3 - r of the full list).
    snprintf(buf, len, "%s", all_busids[own_device_only ? 3 - world_rank : ordinal]);
    return DSMOE_OK;
}
static const dsmoe_kernel_plugin_v3 fake_gpus = {
    .api_version = DSMOE_KERNEL_API_VERSION, .name = "fakegpus", .device_count = fake_count,
    .device_pci_bus_id = fake_busid};

static dsmoe_config config(const char *bind) {
    dsmoe_config cfg;
    dsmoe_err err = {0};
    char over[64];
    snprintf(over, sizeof over, "topology.bind=%s", bind);
    char *argv[] = {over};
    if (dsmoe_config_load_text("", "t.deck", argv, 1, (char *[]){NULL}, 4, &cfg, NULL, &err) != DSMOE_OK)
        fail_msg("%s", err.msg);
    return cfg;
}

static void test_each_rank_its_numa_node_and_gpu(void **state) {
    (void)state;
    dsmoe_config cfg = config("auto");
    dsmoe_placement *pl = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_placement_create(&cfg, &pl, &err), DSMOE_OK);
    int r = world_rank;
    char want[16];
    snprintf(want, sizeof want, "%d-%d", 2 * r, 2 * r + 1);
    assert_string_equal(pl->me.cpus, want);
    assert_int_equal(pl->me.cores, 2);
    assert_int_equal(pl->me.bound_by, DSMOE_BOUND_BY_DSMOE); // decided (not applied: a described node)
    assert_int_equal(pl->me.node, 0);
    assert_int_equal(pl->me.local, r);
    assert_int_equal(pl->me.slot, r);
    assert_int_equal(pl->nodes, 1);
    assert_int_equal(pl->n_thread_cpus, 2);
    assert_int_equal(pl->thread_cpus[0], 2 * r);

    int device = -1;
    assert_int_equal(dsmoe_placement_choose_device(pl, &fake_gpus, &device, &err), DSMOE_OK);
    assert_int_equal(device, 3 - r);
    assert_int_equal(pl->me.numa, r);
    static const char *const near[4] = {"0000:01:00.0", "0000:41:00.0", "0000:81:00.0", "0000:c1:00.0"};
    assert_string_equal(pl->me.gpu_busid, near[r]); // lower-cased
    if (r == 0) {
        for (int i = 0; i < 4; i++) {
            assert_int_equal(pl->all[i].rank, i);
            assert_int_equal(pl->all[i].gpu, 3 - i);
        }
        char *text = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&text, &len);
        dsmoe_placement_print(f, pl, &cfg);
        fclose(f);
        assert_non_null(strstr(text, "placement: 4 ranks on 1 node; node 0: 2 packages, 4 NUMA nodes, 8 cores, 8 PUs"));
        assert_non_null(strstr(text, "dsmoe bound each rank to its own cores (topology.bind = auto): 4 ranks over 8 cores"));
        assert_non_null(strstr(text, "0000:c1:00.0")); // rank 3's row
        free(text);
    }
    dsmoe_placement_free(pl);
}

static void test_one_device_per_rank(void **state) {
    (void)state;
    dsmoe_config cfg = config("cores");
    dsmoe_placement *pl = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_placement_create(&cfg, &pl, &err), DSMOE_OK);
    own_device_only = 1;
    int device = -1;
    assert_int_equal(dsmoe_placement_choose_device(pl, &fake_gpus, &device, &err), DSMOE_OK);
    own_device_only = 0;
    assert_int_equal(device, 0);
    assert_int_equal(pl->me.numa, world_rank);
    dsmoe_placement_free(pl);
}

// The node's first rank loads the topology and the others use its copy: here the others are told to
// load a different node (no GPUs, 2 NUMA nodes) and must still see rank 0's.
static void test_topology_shared_from_first_rank(void **state) {
    (void)state;
    if (world_rank != 0) setenv("HWLOC_XMLFILE", DSMOE_TEST_SOURCE_DIR "/inputs/topologies/test-2numa-nogpu.xml", 1);
    dsmoe_config cfg = config("auto");
    dsmoe_placement *pl = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_placement_create(&cfg, &pl, &err), DSMOE_OK);
    setenv("HWLOC_XMLFILE", DSMOE_TEST_SOURCE_DIR "/inputs/topologies/test-4gpu.xml", 1);
    char desc[256];
    dsmoe_topo_describe(pl->topo, desc, sizeof desc);
    assert_non_null(strstr(desc, "4 NUMA nodes, 8 cores, 8 PUs, 4.0 GiB, 4 GPUs"));
    dsmoe_placement_free(pl);
}

static dsmoe_status bad_busid(int ordinal, char *buf, size_t len) {
    (void)ordinal;
    snprintf(buf, len, "GPU-%d", world_rank);
    return DSMOE_OK;
}
static const dsmoe_kernel_plugin_v3 bad_gpus = {
    .api_version = DSMOE_KERNEL_API_VERSION, .name = "badgpus", .device_count = fake_count,
    .device_pci_bus_id = bad_busid};

// A plugin that reports something else than a bus id: every rank returns, with the plugin named.
static void test_bad_bus_id(void **state) {
    (void)state;
    dsmoe_config cfg = config("auto");
    dsmoe_placement *pl = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_placement_create(&cfg, &pl, &err), DSMOE_OK);
    int device = -1;
    assert_int_equal(dsmoe_placement_choose_device(pl, &bad_gpus, &device, &err), DSMOE_ERR_INTERNAL);
    assert_int_equal(err.scope, DSMOE_SCOPE_COLLECTIVE);
    assert_non_null(strstr(err.msg, "kernel plugin 'badgpus': device_pci_bus_id(0) gave 'GPU-"));
    assert_non_null(strstr(err.msg, "expected a PCI bus id dddd:bb:dd.f"));
    dsmoe_placement_free(pl);
}

static void test_bind_none_keeps_everything(void **state) {
    (void)state;
    dsmoe_config cfg = config("none");
    dsmoe_placement *pl = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_placement_create(&cfg, &pl, &err), DSMOE_OK);
    assert_string_equal(pl->me.cpus, "0-7");
    assert_int_equal(pl->me.bound_by, DSMOE_BOUND_NOT);
    assert_int_equal(pl->n_thread_cpus, 0);
    dsmoe_placement_free(pl);
}

int main(int argc, char **argv) {
    setenv("HWLOC_XMLFILE", DSMOE_TEST_SOURCE_DIR "/inputs/topologies/test-4gpu.xml", 1);
    MPI_Init(&argc, &argv);
    int size;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size != 4) {
        if (world_rank == 0) fprintf(stderr, "test_placement needs 4 ranks\n");
        MPI_Finalize();
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_each_rank_its_numa_node_and_gpu),
        cmocka_unit_test(test_one_device_per_rank),
        cmocka_unit_test(test_topology_shared_from_first_rank),
        cmocka_unit_test(test_bad_bus_id),
        cmocka_unit_test(test_bind_none_keeps_everything),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return failed;
}
