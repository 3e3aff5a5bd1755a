// tests/plugins/comm/test_comm_staged.c: the core's host staging adapter (core/plugins/comm_staged.c) in front
// of the mpi plugin, with a kernel plugin whose host crossings are counted (the cpu plugin's table with
// counting copy_to_host, copy_to_device and host_alloc). A group of one member stages nothing: every
// collective is the identity (checked element by element, in place and out of place) with no crossing,
// and a reduction the mpi plugin refuses (bfloat16 sums) is still refused. A group of several members
// still goes through the host (crossings counted) and sums right. Run on 1 and 2 ranks.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <mpi.h>

#include "runtime.h"
#include "test_runtime.h" // test_runtime_start

static dsmoe_runtime rt;
static const dsmoe_comm_plugin_v2 *staged; // the adapter's table over rt's mpi context
static dsmoe_comm_ctx *staged_ctx;

// ------------------------------------------------------------------------------------------------
// the counting kernel plugin

static dsmoe_kernel_plugin_v3 counted;
static long to_host, to_device, host_allocs;

static dsmoe_status count_to_host(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q, void *dst, const void *src, size_t n) {
    to_host++;
    return rt.kern->copy_to_host(c, q, dst, src, n);
}
static dsmoe_status count_to_device(dsmoe_kernel_ctx *c, dsmoe_kernel_queue *q, void *dst, const void *src, size_t n) {
    to_device++;
    return rt.kern->copy_to_device(c, q, dst, src, n);
}
static dsmoe_status count_host_alloc(dsmoe_kernel_ctx *c, size_t bytes, void **p) {
    host_allocs++;
    return rt.kern->host_alloc(c, bytes, p);
}

static long crossings(void) { return to_host + to_device + host_allocs; }

// ------------------------------------------------------------------------------------------------
// helpers

enum { N = 1000 };

static void fill(float *v, int n, int rank, int salt) {
    for (int i = 0; i < n; i++) v[i] = (float)(rank * 100000 + salt * 1000 + i) * 0.5f;
}

// The results of a collective are valid after the queue's work (the adapter's copies are queued).
static void wait_queue(void) {
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_rt_wait(&rt, &err), DSMOE_OK);
}

static void assert_floats_equal(const float *a, const float *b, int n) {
    for (int i = 0; i < n; i++)
        if (a[i] != b[i]) fail_msg("element %d: %g, expected %g", i, (double)a[i], (double)b[i]);
}

// ------------------------------------------------------------------------------------------------
// one member: the identity, and no host crossing

static void test_one_member_stages_nothing(void **state) {
    (void)state;
    dsmoe_err err = {0};
    dsmoe_rt_group self;
    assert_int_equal(dsmoe_rt_group_split(&rt, rt.world_rank, 0, &self, &err), DSMOE_OK); // every rank alone
    assert_int_equal(staged->group_size(self.comm), 1);
    float *a, *b, want[N], got[N];
    assert_int_equal(dsmoe_rt_alloc(&rt, N * sizeof(float), 0, (void **)&a, "a", &err), DSMOE_OK);
    assert_int_equal(dsmoe_rt_alloc(&rt, N * sizeof(float), 0, (void **)&b, "b", &err), DSMOE_OK);
    long before = crossings();

    fill(a, N, rt.world_rank, 1); // cpu plugin memory is host memory: the test may write it directly
    memset(b, 0xff, N * sizeof(float));
    assert_int_equal(staged->alltoall(staged_ctx, self.comm, a, b, N * sizeof(float), &rt.stream), DSMOE_OK);
    wait_queue();
    fill(want, N, rt.world_rank, 1);
    memcpy(got, b, sizeof got);
    assert_floats_equal(got, want, N);

    fill(a, N, rt.world_rank, 2);
    assert_int_equal(staged->allreduce(staged_ctx, self.comm, a, b, N, DSMOE_FLOAT32, DSMOE_SUM, &rt.stream), DSMOE_OK);
    wait_queue();
    fill(want, N, rt.world_rank, 2);
    memcpy(got, b, sizeof got);
    assert_floats_equal(got, want, N);
    assert_int_equal(staged->allreduce(staged_ctx, self.comm, DSMOE_IN_PLACE, a, N, DSMOE_FLOAT32, DSMOE_MAX,
                                       &rt.stream), DSMOE_OK);
    wait_queue();
    memcpy(got, a, sizeof got);
    assert_floats_equal(got, want, N);

    fill(a, N, rt.world_rank, 3);
    assert_int_equal(staged->allgather(staged_ctx, self.comm, a, b, N * sizeof(float), &rt.stream), DSMOE_OK);
    assert_int_equal(staged->reduce_scatter(staged_ctx, self.comm, a, b, N, DSMOE_FLOAT32, DSMOE_SUM, &rt.stream),
                     DSMOE_OK);
    wait_queue();
    fill(want, N, rt.world_rank, 3);
    memcpy(got, b, sizeof got);
    assert_floats_equal(got, want, N);

    // alltoallv: one block of 300 floats from a + 100 to b + 500; the rest of b keeps its values.
    fill(a, N, rt.world_rank, 4);
    memset(b, 0, N * sizeof(float));
    size_t sc = 300 * sizeof(float), sd = 100 * sizeof(float), rc = sc, rd = 500 * sizeof(float);
    assert_int_equal(staged->alltoallv(staged_ctx, self.comm, a, &sc, &sd, b, &rc, &rd, &rt.stream), DSMOE_OK);
    wait_queue();
    memcpy(got, b, sizeof got);
    for (int i = 0; i < N; i++)
        assert_true(got[i] == (i >= 500 && i < 800 ? ((float *)a)[i - 400] : 0.0f));

    fill(a, N, rt.world_rank, 5);
    assert_int_equal(staged->broadcast(staged_ctx, self.comm, a, N * sizeof(float), 0, &rt.stream), DSMOE_OK);
    wait_queue();
    fill(want, N, rt.world_rank, 5);
    memcpy(got, a, sizeof got);
    assert_floats_equal(got, want, N);

    assert_int_equal(crossings(), before); // not one byte through the host

    // What the mpi plugin refuses, the adapter refuses for one member too (and names it).
    assert_int_equal(staged->allreduce(staged_ctx, self.comm, DSMOE_IN_PLACE, a, N, DSMOE_BFLOAT16, DSMOE_SUM,
                                       &rt.stream), DSMOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(staged->last_error(staged_ctx), "allreduce"));
    assert_int_equal(crossings(), before);

    rt.kern->free(rt.kctx, a);
    rt.kern->free(rt.kctx, b);
    dsmoe_rt_group_free(&rt, &self);
}

// Several members: the host staging as before (crossings counted), sums right.
static void test_several_members_stage(void **state) {
    (void)state;
    if (rt.world_size < 2) skip();
    dsmoe_err err = {0};
    float *a;
    assert_int_equal(dsmoe_rt_alloc(&rt, N * sizeof(float), 0, (void **)&a, "a", &err), DSMOE_OK);
    for (int i = 0; i < N; i++) a[i] = (float)((rt.world_rank + 1) * i);
    long before = to_host;
    assert_int_equal(staged->allreduce(staged_ctx, rt.world, DSMOE_IN_PLACE, a, N, DSMOE_FLOAT32, DSMOE_SUM, &rt.stream),
                     DSMOE_OK);
    wait_queue();
    assert_true(to_host > before);
    double ranks = rt.world_size, sum_of_factors = ranks * (ranks + 1) / 2; // (1 + 2 + ... + p)
    for (int i = 0; i < N; i++) assert_true(a[i] == (float)(sum_of_factors * i));
    rt.kern->free(rt.kctx, a);
}

int main(int argc, char **argv) {
    if (test_runtime_start(&argc, &argv, &rt) != 0) return 1;
    counted = *rt.kern;
    counted.copy_to_host = count_to_host;
    counted.copy_to_device = count_to_device;
    counted.host_alloc = count_host_alloc;
    dsmoe_err err = {0};
    if (dsmoe_comm_staged_open(rt.comm, rt.cctx, &counted, rt.kctx, rt.q, &staged, &staged_ctx, &err) != DSMOE_OK) {
        fprintf(stderr, "staged open: %s\n", err.msg);
        return 1;
    }
    // The runtime ends through the adapter, which finalises the mpi context it wraps.
    rt.comm = staged;
    rt.cctx = staged_ctx;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_member_stages_nothing),
        cmocka_unit_test(test_several_members_stage),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return failed;
}
