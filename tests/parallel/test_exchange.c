// tests/parallel/test_exchange.c: the EP all-to-all (core/parallel/exchange.c) through the real plugins
// (cpu kernels, mpi comm), on 4 and 8 ranks.
// - Pure functions: message and byte counts against hand-computed values (p=8, G=2: 1 + 3 = 4 messages
//   instead of 7), the AUTO rule at its threshold, node layouts that are and are not node-contiguous.
// - Results: for payloads of 0, 1, 3, 17, 64, 1000, 4099 and 64 KiB + 5 bytes per peer, flat,
//   hierarchical and auto, with ranks_per_node 1, 2, 4, 8 where it divides (and 0: the real nodes), give
//   byte-identical results equal both to MPI_Alltoall on host buffers and to the payload formula itself
//   (byte k of the block from rank s to rank d is a pure function of (s, d, k)); send is left unchanged,
//   and the last-call report equals the pure plan. Also on EP groups that are halves of the world.
// - Errors: a ranks_per_node that does not divide the group, a negative one, ranks that disagree.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe/rng.h"
#include "exchange.h"
#include "runtime.h"

static dsmoe_runtime rt;
static int world_rank, world_size;

static const size_t sizes[] = {0, 1, 3, 17, 64, 1000, 4099, 64 * 1024 + 5};
#define NSIZES (sizeof sizes / sizeof sizes[0])

// ----------------------------------------------------------------------------------------------------
// pure functions

static dsmoe_a2a_plan plan_of(dsmoe_a2a_algo algo, int p, int G, size_t b) {
    dsmoe_a2a_plan plan;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_a2a_plan_compute(algo, p, G, b, &plan, &err), DSMOE_OK);
    return plan;
}

static void test_plan_counts(void **state) {
    (void)state;
    // p=8, G=2 (N=4), 100 bytes per peer. Flat: 7 messages of 100, 6 of them to other nodes.
    dsmoe_a2a_plan f = plan_of(DSMOE_A2A_FLAT, 8, 2, 100);
    assert_int_equal(f.algo, DSMOE_A2A_FLAT);
    assert_int_equal(f.messages, 7);
    assert_int_equal(f.inter_node_messages, 6);
    assert_int_equal(f.bytes_sent, 700);
    assert_int_equal(f.inter_node_bytes, 600);
    assert_int_equal(f.packed_bytes, 0);
    // Hierarchical: 1 message of 4 blocks in the node, 3 of 2 blocks across: 4 messages, 1000 bytes,
    // the same 600 bytes across nodes as flat; two packs of the 800-byte buffer.
    dsmoe_a2a_plan h = plan_of(DSMOE_A2A_HIERARCHICAL, 8, 2, 100);
    assert_int_equal(h.algo, DSMOE_A2A_HIERARCHICAL);
    assert_int_equal(h.nodes, 4);
    assert_int_equal(h.messages, 4);
    assert_int_equal(h.inter_node_messages, 3);
    assert_int_equal(h.bytes_sent, 1000);
    assert_int_equal(h.inter_node_bytes, 600);
    assert_int_equal(h.packed_bytes, 1600);
    // p=8, G=4 (N=2): 3 messages of 2 blocks + 1 of 4 blocks.
    h = plan_of(DSMOE_A2A_HIERARCHICAL, 8, 4, 100);
    assert_int_equal(h.messages, 4);
    assert_int_equal(h.inter_node_messages, 1);
    assert_int_equal(h.bytes_sent, 3 * 200 + 400);
    assert_int_equal(h.inter_node_bytes, 400);
    // p=64, G=8: 7 + 7 = 14 messages instead of 63; 7*8 + 7*8 = 112 blocks instead of 63.
    h = plan_of(DSMOE_A2A_HIERARCHICAL, 64, 8, 1);
    assert_int_equal(h.messages, 14);
    assert_int_equal(h.bytes_sent, 112);
    assert_int_equal(plan_of(DSMOE_A2A_FLAT, 64, 8, 1).messages, 63);
    // Degenerate layouts: hierarchical is flat over the one non-trivial group, no packing.
    h = plan_of(DSMOE_A2A_HIERARCHICAL, 8, 1, 10);
    assert_int_equal(h.messages, 7);
    assert_int_equal(h.bytes_sent, 70);
    assert_int_equal(h.packed_bytes, 0);
    h = plan_of(DSMOE_A2A_HIERARCHICAL, 8, 8, 10);
    assert_int_equal(h.messages, 7);
    assert_int_equal(h.inter_node_messages, 0);
    assert_int_equal(h.packed_bytes, 0);
    // Nothing to send: no message.
    assert_int_equal(plan_of(DSMOE_A2A_HIERARCHICAL, 8, 2, 0).messages, 0);
    assert_int_equal(plan_of(DSMOE_A2A_FLAT, 8, 2, 0).bytes_sent, 0);
    // One rank: nothing leaves it.
    assert_int_equal(plan_of(DSMOE_A2A_FLAT, 1, 1, 10).messages, 0);
}

static void test_plan_auto_and_errors(void **state) {
    (void)state;
    size_t t = DSMOE_A2A_AUTO_MAX_BYTES;
    assert_int_equal(t, 65536);
    assert_int_equal(plan_of(DSMOE_A2A_AUTO, 8, 2, t - 1).algo, DSMOE_A2A_HIERARCHICAL);
    assert_int_equal(plan_of(DSMOE_A2A_AUTO, 8, 2, t).algo, DSMOE_A2A_FLAT);
    assert_int_equal(plan_of(DSMOE_A2A_AUTO, 8, 1, 1).algo, DSMOE_A2A_FLAT); // one rank per node
    assert_int_equal(plan_of(DSMOE_A2A_AUTO, 8, 8, 1).algo, DSMOE_A2A_FLAT); // one node
    assert_int_equal(plan_of(DSMOE_A2A_AUTO, 8, 4, 1).messages, 4);
    assert_int_equal(dsmoe_a2a_choose(DSMOE_A2A_HIERARCHICAL, 8, 2, 1 << 30), DSMOE_A2A_HIERARCHICAL);
    assert_int_equal(dsmoe_a2a_choose(DSMOE_A2A_FLAT, 8, 2, 1), DSMOE_A2A_FLAT);
    assert_string_equal(dsmoe_a2a_algo_name(DSMOE_A2A_HIERARCHICAL), "hierarchical");

    dsmoe_a2a_plan plan;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_a2a_plan_compute(DSMOE_A2A_FLAT, 8, 3, 1, &plan, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "divide"));
    assert_int_equal(dsmoe_a2a_plan_compute(DSMOE_A2A_FLAT, 8, 0, 1, &plan, &err), DSMOE_ERR_INVALID);
    assert_int_equal(dsmoe_a2a_plan_compute((dsmoe_a2a_algo)7, 8, 2, 1, &plan, &err), DSMOE_ERR_INVALID);
    assert_int_equal(dsmoe_a2a_plan_compute(DSMOE_A2A_FLAT, 8, 2, SIZE_MAX / 4, &plan, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "overflows"));
}

static void test_node_layout(void **state) {
    (void)state;
    dsmoe_err err = {0};
    int G = -1;
    const int two[] = {0, 0, 2, 2, 4, 4, 6, 6}, one_node[] = {0, 0, 0, 0}, singles[] = {0, 1, 2, 3};
    assert_int_equal(dsmoe_a2a_node_layout(two, 8, &G, &err), DSMOE_OK);
    assert_int_equal(G, 2);
    assert_int_equal(dsmoe_a2a_node_layout(one_node, 4, &G, &err), DSMOE_OK);
    assert_int_equal(G, 4);
    assert_int_equal(dsmoe_a2a_node_layout(singles, 4, &G, &err), DSMOE_OK);
    assert_int_equal(G, 1);
    // Round-robin placement (ranks 0 and 2 on one node): not contiguous.
    const int round_robin[] = {0, 1, 0, 1};
    assert_int_equal(dsmoe_a2a_node_layout(round_robin, 4, &G, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "rank 1 of 4"));
    // Unequal nodes: 2 + 2 + 4 ranks, and 2 + 2 + 1 (the first node's size does not divide 5).
    const int unequal[] = {0, 0, 2, 2, 4, 4, 4, 4}, ragged[] = {0, 0, 2, 2, 4};
    assert_int_equal(dsmoe_a2a_node_layout(unequal, 8, &G, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "rank 6 of 8"));
    assert_int_equal(dsmoe_a2a_node_layout(ragged, 5, &G, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "does not divide"));
}

// ----------------------------------------------------------------------------------------------------
// exchanges against MPI_Alltoall and the payload formula

// Byte k of the block that group rank src sends to group rank dst, for a given size and group tag.
static unsigned char payload(uint64_t key, int p, int src, int dst, size_t k) {
    return (unsigned char)(dsmoe_rng_u64(key, ((uint64_t)src * p + dst) * 1000003ull + k) >> 17);
}

typedef struct bufs {
    unsigned char *h_send, *h_ref, *h_out; // host (p, b)
    void *send, *recv;                     // kernel buffers (p, b)
} bufs;

static bufs bufs_make(size_t total) {
    bufs B = {malloc(total + 1), malloc(total + 1), malloc(total + 1), NULL, NULL};
    assert_true(B.h_send && B.h_ref && B.h_out);
    assert_int_equal(rt.kern->alloc(rt.kctx, total, 0, &B.send), DSMOE_OK);
    assert_int_equal(rt.kern->alloc(rt.kctx, total, 0, &B.recv), DSMOE_OK);
    return B;
}

static void bufs_free(bufs *B) {
    free(B->h_send);
    free(B->h_ref);
    free(B->h_out);
    rt.kern->free(rt.kctx, B->send);
    rt.kern->free(rt.kctx, B->recv);
}

static void assert_bytes_equal(const unsigned char *got, const unsigned char *want, size_t n, const char *what,
                               int p, size_t b) {
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i])
            fail_msg("%s: byte %zu (block %zu, offset %zu) is %u, expected %u (p=%d, %zu bytes per peer)", what, i,
                     i / b, i % b, got[i], want[i], p, b);
}

// Runs `ex` on every size; compares with MPI_Alltoall over comm and with the formula.
static void check_exchange(dsmoe_exchange *ex, MPI_Comm comm, uint64_t tag, const char *label) {
    int p, me;
    MPI_Comm_size(comm, &p);
    MPI_Comm_rank(comm, &me);
    for (size_t si = 0; si < NSIZES; si++) {
        size_t b = sizes[si], total = (size_t)p * b;
        uint64_t key = dsmoe_rng_key(0xE8C4A96Eull, tag, b, 0);
        bufs B = bufs_make(total);
        for (int d = 0; d < p; d++)
            for (size_t k = 0; k < b; k++) B.h_send[(size_t)d * b + k] = payload(key, p, me, d, k);
        memset(B.h_ref, 0xAB, total);
        assert_int_equal(MPI_Alltoall(B.h_send, (int)b, MPI_BYTE, B.h_ref, (int)b, MPI_BYTE, comm), MPI_SUCCESS);
        // The reference itself against the formula: block s came from rank s.
        for (int s = 0; s < p; s++)
            for (size_t k = 0; k < b; k++)
                if (B.h_ref[(size_t)s * b + k] != payload(key, p, s, me, k))
                    fail_msg("MPI_Alltoall disagrees with the payload formula at block %d byte %zu", s, k);

        assert_int_equal(rt.kern->copy_to_device(rt.kctx, rt.q, B.send, B.h_send, total), DSMOE_OK);
        memset(B.h_out, 0xCD, total); // recv starts as garbage: a block the exchange misses shows
        assert_int_equal(rt.kern->copy_to_device(rt.kctx, rt.q, B.recv, B.h_out, total), DSMOE_OK);
        dsmoe_err err = {0};
        dsmoe_status s = dsmoe_exchange_alltoall(ex, B.send, B.recv, b, &err);
        if (s != DSMOE_OK) fail_msg("%s, %zu bytes: %s", label, b, err.msg);
        assert_int_equal(rt.kern->copy_to_host(rt.kctx, rt.q, B.h_out, B.recv, total), DSMOE_OK);
        assert_int_equal(rt.kern->synchronize(rt.kctx), DSMOE_OK);
        char what[160];
        snprintf(what, sizeof what, "%s (rank %d)", label, me);
        assert_bytes_equal(B.h_out, B.h_ref, total, what, p, b);
        // send is untouched (the packs go to the workspace).
        assert_int_equal(rt.kern->copy_to_host(rt.kctx, rt.q, B.h_out, B.send, total), DSMOE_OK);
        assert_int_equal(rt.kern->synchronize(rt.kctx), DSMOE_OK);
        snprintf(what, sizeof what, "%s (rank %d): send buffer after the call", label, me);
        assert_bytes_equal(B.h_out, B.h_send, total, what, p, b);
        // The report of the call is the pure plan for this layout and size.
        const dsmoe_a2a_plan *last = dsmoe_exchange_last(ex);
        dsmoe_a2a_plan want;
        dsmoe_exchange_plan(ex, b, &want);
        assert_memory_equal(last, &want, sizeof want);
        assert_int_equal(last->bytes_per_peer, b);
        bufs_free(&B);
    }
}

// The variable exchange (dsmoe_exchange_alltoallv_rows): capacity blocks (p, groups, cap, row) of which
// block (dst, g) of rank src holds rows_of(src, dst, g) rows (some none, some full); the rows received must
// be the sender's, rows past the counts must keep what recv held, and the report must count exactly the
// bytes that cross ranks and nodes (summed over the group: what leaves for another node, whoever forwards).
static int rows_of(uint64_t key, int src, int dst, int g, int cap) {
    uint64_t r = dsmoe_rng_u64(key, ((uint64_t)src * 64 + (uint64_t)dst) * 64 + (uint64_t)g);
    return r % 4 == 0 ? 0 : r % 4 == 1 ? cap : (int)((r >> 8) % (uint64_t)(cap + 1));
}

static void check_exchange_v(dsmoe_exchange *ex, MPI_Comm comm, uint64_t tag, const char *label) {
    int p, me;
    MPI_Comm_size(comm, &p);
    MPI_Comm_rank(comm, &me);
    const int caps[] = {5, 1};
    for (int groups = 1; groups <= 3; groups += 2)
        for (int ci = 0; ci < 2; ci++) {
            int cap = caps[ci];
            size_t row = 7, block = (size_t)groups * cap * row, total = (size_t)p * block;
            uint64_t key = dsmoe_rng_key(0x5A7E0001ull, tag, (uint64_t)groups, (uint64_t)cap);
            int32_t *srows = malloc((size_t)p * groups * sizeof *srows), *rrows = malloc((size_t)p * groups * sizeof *rrows);
            bufs B = bufs_make(total);
            uint64_t want_sent = 0, want_cross = 0; // bytes I send to others; group total crossing nodes
            int64_t want_msgs = 0;
            const dsmoe_a2a_plan *info = dsmoe_exchange_last(ex);
            int G = info->ranks_per_node;
            for (int j = 0; j < p; j++) {
                size_t to_j = 0;
                for (int g = 0; g < groups; g++) {
                    srows[j * groups + g] = rows_of(key, me, j, g, cap);
                    rrows[j * groups + g] = rows_of(key, j, me, g, cap);
                    to_j += (size_t)srows[j * groups + g] * row;
                    for (size_t k = 0; k < (size_t)cap * row; k++)
                        B.h_send[(j * groups + g) * (size_t)cap * row + k] = payload(key, p, me, j, g * 1000 + k);
                }
                if (j != me) want_sent += to_j, want_msgs += to_j > 0;
                if (j / G != me / G) want_cross += to_j;
            }
            memset(B.h_ref, 0xCD, total);
            for (int i = 0; i < p; i++)
                for (int g = 0; g < groups; g++)
                    for (size_t k = 0; k < (size_t)rrows[i * groups + g] * row; k++)
                        B.h_ref[(i * groups + g) * (size_t)cap * row + k] = payload(key, p, i, me, g * 1000 + k);
            assert_int_equal(rt.kern->copy_to_device(rt.kctx, rt.q, B.send, B.h_send, total), DSMOE_OK);
            memset(B.h_out, 0xCD, total);
            assert_int_equal(rt.kern->copy_to_device(rt.kctx, rt.q, B.recv, B.h_out, total), DSMOE_OK);
            dsmoe_err err = {0};
            dsmoe_status s = dsmoe_exchange_alltoallv_rows(ex, B.send, srows, B.recv, rrows, groups, (size_t)cap, row, &err);
            if (s != DSMOE_OK) fail_msg("%s, variable, %d groups: %s", label, groups, err.msg);
            assert_int_equal(rt.kern->copy_to_host(rt.kctx, rt.q, B.h_out, B.recv, total), DSMOE_OK);
            assert_int_equal(rt.kern->synchronize(rt.kctx), DSMOE_OK);
            char what[200];
            snprintf(what, sizeof what, "%s, variable, %d groups of %d rows (rank %d)", label, groups, cap, me);
            assert_bytes_equal(B.h_out, B.h_ref, total, what, p, block);
            info = dsmoe_exchange_last(ex);
            unsigned long long cross[2] = {info->inter_node_bytes, want_cross}, sum[2];
            MPI_Allreduce(cross, sum, 2, MPI_UNSIGNED_LONG_LONG, MPI_SUM, comm);
            if (sum[0] != sum[1]) fail_msg("%s: %llu bytes crossed nodes in all, expected %llu", what, sum[0], sum[1]);
            if (info->algo == DSMOE_A2A_FLAT || info->nodes == 1 || info->ranks_per_node == 1) {
                assert_int_equal(info->bytes_sent, want_sent);
                assert_int_equal(info->messages, want_msgs);
            } else { // forwarding: at most G - 1 + N - 1 messages, and no fewer bytes than the direct ones
                assert_true(info->messages <= (int64_t)(G - 1) + (info->nodes - 1));
            }
            bufs_free(&B);
            free(srows);
            free(rrows);
        }
}

static dsmoe_exchange *create_ok(dsmoe_ctl_group *ctl, dsmoe_a2a_algo algo, int rpn) {
    dsmoe_exchange *ex = NULL;
    dsmoe_err err = {0};
    dsmoe_status s = dsmoe_exchange_create(&rt, ctl, algo, rpn, &ex, &err);
    if (s != DSMOE_OK) fail_msg("create %s ranks_per_node %d: %s", dsmoe_a2a_algo_name(algo), rpn, err.msg);
    return ex;
}

// comm (the reference's) and ctl (the exchange's) hold the same ranks in the same order.
static void check_all_algos(MPI_Comm comm, dsmoe_ctl_group *ctl, int rpn, uint64_t tag) {
    int p;
    MPI_Comm_size(comm, &p);
    for (int a = DSMOE_A2A_FLAT; a <= DSMOE_A2A_AUTO; a++) {
        dsmoe_exchange *ex = create_ok(ctl, (dsmoe_a2a_algo)a, rpn);
        const dsmoe_a2a_plan *info = dsmoe_exchange_last(ex);
        if (rpn > 0) assert_int_equal(info->ranks_per_node, rpn);
        assert_int_equal(info->ranks, p);
        assert_int_equal(info->nodes * info->ranks_per_node, p);
        char label[96];
        snprintf(label, sizeof label, "%s, %d ranks, ranks_per_node %d", dsmoe_a2a_algo_name((dsmoe_a2a_algo)a), p,
                 info->ranks_per_node);
        check_exchange(ex, comm, tag, label);
        check_exchange_v(ex, comm, tag, label);
        dsmoe_exchange_free(ex);
    }
}

static void test_pretend_nodes(void **state) {
    (void)state;
    for (int rpn = 1; rpn <= world_size; rpn *= 2)
        if (world_size % rpn == 0) check_all_algos(MPI_COMM_WORLD, rt.world_ctl, rpn, 1);
}

// The auto rule on a layout where it matters: hierarchical below 64 KiB per peer, flat above.
static void test_auto_resolution(void **state) {
    (void)state;
    dsmoe_exchange *ex = create_ok(rt.world_ctl, DSMOE_A2A_AUTO, 2);
    dsmoe_a2a_plan plan;
    dsmoe_exchange_plan(ex, 1000, &plan);
    assert_int_equal(plan.algo, DSMOE_A2A_HIERARCHICAL);
    assert_int_equal(plan.messages, 1 + world_size / 2 - 1);
    dsmoe_exchange_plan(ex, 64 * 1024, &plan);
    assert_int_equal(plan.algo, DSMOE_A2A_FLAT);
    assert_int_equal(plan.messages, world_size - 1);
    dsmoe_exchange_free(ex);
}

// ranks_per_node 0: the real shared-memory nodes. Expected G counted independently by host name.
static void test_real_nodes(void **state) {
    (void)state;
    char names[MPI_MAX_PROCESSOR_NAME], *all = malloc((size_t)world_size * MPI_MAX_PROCESSOR_NAME);
    assert_non_null(all);
    int len;
    memset(names, 0, sizeof names);
    MPI_Get_processor_name(names, &len);
    MPI_Allgather(names, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, MPI_COMM_WORLD);
    int same = 0;
    for (int r = 0; r < world_size; r++) same += strcmp(all + (size_t)r * MPI_MAX_PROCESSOR_NAME, names) == 0;
    free(all);
    dsmoe_exchange *ex = create_ok(rt.world_ctl, DSMOE_A2A_HIERARCHICAL, 0);
    assert_int_equal(dsmoe_exchange_last(ex)->ranks_per_node, same);
    dsmoe_exchange_free(ex);
    check_all_algos(MPI_COMM_WORLD, rt.world_ctl, 0, 2);
}

// EP groups that are contiguous halves of the world (as model.c builds them), pretend nodes of 2.
static void test_ep_halves(void **state) {
    (void)state;
    MPI_Comm half;
    assert_int_equal(MPI_Comm_split(MPI_COMM_WORLD, world_rank / (world_size / 2), world_rank, &half), MPI_SUCCESS);
    dsmoe_ctl_group *half_ctl = NULL;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_ctl_split(rt.world_ctl, world_rank / (world_size / 2), world_rank, &half_ctl, &err), DSMOE_OK);
    check_all_algos(half, half_ctl, 2, 3 + (uint64_t)(world_rank / (world_size / 2)));
    check_all_algos(half, half_ctl, 1, 5);
    dsmoe_ctl_free(half_ctl);
    MPI_Comm_free(&half);
}

static void expect_create_error(int rpn, const char *needle) {
    dsmoe_exchange *ex = (dsmoe_exchange *)&ex; // must be reset to NULL on failure
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_exchange_create(&rt, rt.world_ctl, DSMOE_A2A_HIERARCHICAL, rpn, &ex, &err),
                     DSMOE_ERR_INVALID);
    assert_null(ex);
    if (!strstr(err.msg, needle)) fail_msg("ranks_per_node %d: message \"%s\" lacks \"%s\"", rpn, err.msg, needle);
}

static void test_create_errors(void **state) {
    (void)state;
    expect_create_error(3, "ranks_per_node 3 does not divide");
    expect_create_error(world_size + 1, "does not divide");
    expect_create_error(-2, "ranks_per_node >= 0");
    // Rank 0 asks for 2 per node, the others for 4 (both divide 4 and 8): every rank must refuse.
    expect_create_error(world_rank == 0 ? 2 : 4, "ranks disagree");
    // The world is still usable: no half-made group is left behind on any rank.
    int one = 1, sum = 0;
    MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    assert_int_equal(sum, world_size);
    // Overlapping buffers are refused before any communication (every rank passes the same).
    dsmoe_exchange *ex = create_ok(rt.world_ctl, DSMOE_A2A_FLAT, 0);
    void *buf;
    assert_int_equal(rt.kern->alloc(rt.kctx, (size_t)world_size * 16 + 8, 0, &buf), DSMOE_OK);
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_exchange_alltoall(ex, buf, (char *)buf + 8, 16, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "overlap"));
    rt.kern->free(rt.kctx, buf);
    dsmoe_exchange_free(ex);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    dsmoe_err err = {0};
    if (dsmoe_runtime_open("cpu", "mpi", "", 1, &rt, &err) != DSMOE_OK) {
        fprintf(stderr, "runtime: %s\n", err.msg);
        MPI_Finalize();
        return 1;
    }
    world_rank = rt.world_rank;
    world_size = rt.world_size;
    if (world_size % 4 != 0) {
        if (world_rank == 0) fprintf(stderr, "test_exchange: run on 4 or 8 ranks (got %d)\n", world_size);
        dsmoe_runtime_close(&rt);
        MPI_Finalize();
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_counts),     cmocka_unit_test(test_plan_auto_and_errors),
        cmocka_unit_test(test_node_layout),     cmocka_unit_test(test_pretend_nodes),
        cmocka_unit_test(test_auto_resolution), cmocka_unit_test(test_real_nodes),
        cmocka_unit_test(test_ep_halves),       cmocka_unit_test(test_create_errors),
    };
    // A failure on some ranks only leaves the others waiting in a collective: ctest's timeout ends it.
    int failed = cmocka_run_group_tests_name("exchange", tests, NULL, NULL);
    int any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return any ? 1 : 0;
}
