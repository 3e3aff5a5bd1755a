// tests/drivers/test_memplan.c: core/drivers/memplan.c's prediction against the real allocation, and against counts
// worked out by hand.
// - Real: the kernel plugin's alloc/free are wrapped to count live bytes; for small configs (dense,
//   top-1, top-2 with capacity factors, residual, PR-MoE, ZeRO 0 and 1, several micro-steps, jitter
//   buffers, hierarchical and auto all-to-all workspaces, dropless, bf16) the model and optimizer are created
//   on every rank and the estimate must match dsmoe_model_local/global/replicated_params,
//   dsmoe_model_bytes, dsmoe_optimizer_bytes and the counted bytes exactly; one training forward and
//   backward (zero parameters: every token picks the same experts, so dropless reaches C = S) must
//   reach the predicted peak exactly and drop-token runs must not grow.
// - Hand: one small model's parameters term by term, its capacity buffers and ZeRO-1 shards; the paper's
//   350M+MoE-128 (13B), 1.3B+MoE-128 (52B) and 350M+PR-MoE-32/64 (4B); ZeRO-1 shards over all ranks
//   adding up to the whole model; the configs the model refuses.
#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <mpi.h>

#include "config.h"
#include "dsmoe/rng.h"
#include "memplan.h"
#include "model.h"
#include "optimizer.h"
#include "runtime.h"
#include "test_runtime.h" // test_runtime_start

static dsmoe_runtime rt;

// ----------------------------------------------------------------------------------------------------
// counting kernel allocator

static const dsmoe_kernel_plugin_v3 *real_kern;
static dsmoe_kernel_plugin_v3 counting_kern;
static struct { void *p; size_t n; } recs[8192];
static int n_recs;
static uint64_t live; // bytes held through the kernel plugin

static dsmoe_status count_alloc(dsmoe_kernel_ctx *ctx, size_t bytes, uint32_t flags, void **ptr) {
    dsmoe_status s = real_kern->alloc(ctx, bytes, flags, ptr);
    if (s != DSMOE_OK) return s;
    if (n_recs == (int)(sizeof recs / sizeof recs[0])) {
        fprintf(stderr, "test_memplan: more than %d live allocations\n", n_recs);
        abort();
    }
    recs[n_recs].p = *ptr;
    recs[n_recs++].n = bytes;
    live += bytes;
    return s;
}

static void count_free(dsmoe_kernel_ctx *ctx, void *ptr) {
    if (ptr) {
        int i = 0;
        while (i < n_recs && recs[i].p != ptr) i++;
        if (i == n_recs) {
            fprintf(stderr, "test_memplan: free of %p, which the counter never saw\n", ptr);
            abort();
        }
        live -= recs[i].n;
        recs[i] = recs[--n_recs];
    }
    real_kern->free(ctx, ptr);
}

// ----------------------------------------------------------------------------------------------------
// configs

static const char *small_deck =
    "[model]\nvocab = 32\nseq_len = 8\nlayers = 4\nhidden = 16\nheads = 2\nffn_hidden = 24\n"
    "[train]\nbatch = 8\n";

// small_deck with ';'-separated key=value overrides, resolved for world_size ranks (0 = not known).
static dsmoe_status load(const char *deck, const char *extra, int world_size, dsmoe_config *cfg, dsmoe_err *err) {
    char buf[1024], *ov[32];
    int n = 0;
    snprintf(buf, sizeof buf, "%s", extra);
    for (char *tok = strtok(buf, ";"); tok && n < 32; tok = strtok(NULL, ";")) ov[n++] = tok;
    return dsmoe_config_load_text(deck, "test.deck", ov, n, (char *const[]){NULL}, world_size, cfg, NULL, err);
}

static void load_ok(const char *deck, const char *extra, int world_size, dsmoe_config *cfg) {
    dsmoe_err err = {0};
    if (load(deck, extra, world_size, cfg, &err) != DSMOE_OK) fail_msg("config %s: %s", extra, err.msg);
}

static dsmoe_mem_estimate estimate_ok(const dsmoe_config *cfg, int W, int rank, int rpn) {
    dsmoe_mem_estimate est;
    dsmoe_err err = {0};
    if (dsmoe_mem_estimate_rank(cfg, W, rank, rpn, &est, &err) != DSMOE_OK) fail_msg("estimate: %s", err.msg);
    return est;
}

// ----------------------------------------------------------------------------------------------------
// the estimate against the real allocation

typedef struct real_case {
    const char *name;
    const char *extra; // overrides; "EP" below is appended as moe.expert_parallel
    int ep;            // 0: none; 1: ep = ranks; 2: ep = min(2, ranks); 3: PR-MoE "2 x1, 4 x1" on 4 ranks
    int rpn;           // append moe.ranks_per_node = 2 when it divides the ranks, else 1
} real_case;

static const real_case real_cases[] = {
    {"dense, ZeRO 0", "moe.experts=0", 0, 0},
    {"dense, ZeRO 1, micro_batch 1", "moe.experts=0;train.zero_stage=1;train.batch=16;train.micro_batch=1", 0, 0},
    {"top-1 every 2nd layer, ep = ranks", "moe.experts=4", 1, 0},
    {"top-1, ep 2, ZeRO 1", "moe.experts=4;train.zero_stage=1", 2, 0},
    {"2 experts, ep 2, odd sizes, ZeRO 1 (uneven shards)", "moe.experts=2;model.ffn_hidden=25;model.vocab=33;"
     "train.zero_stage=1", 2, 0},
    {"top-2, cf 1.5, eval cf 2, min capacity 0, ZeRO 1",
     "moe.experts=4;moe.top_k=2;moe.capacity_factor=1.5;moe.eval_capacity_factor=2.0;moe.min_capacity=0;"
     "train.zero_stage=1", 1, 0},
    {"every layer MoE, train cf 2 > eval cf 0.5", "moe.experts=4;moe.every=1;moe.capacity_factor=2.0;"
     "moe.eval_capacity_factor=0.5;moe.min_capacity=1", 1, 0},
    {"residual MoE, ep 2", "moe.experts=4;moe.residual=true", 2, 0},
    {"residual MoE, jitter, ZeRO 1", "moe.experts=4;moe.residual=true;moe.noise=jitter;train.zero_stage=1", 1, 0},
    {"bf16: residual MoE, jitter, ZeRO 1", "run.precision=bf16;moe.experts=4;moe.residual=true;moe.noise=jitter;"
     "train.zero_stage=1", 1, 0},
    {"PR-MoE 4/8, ZeRO 0", "moe.experts=4 x1, 8 x1;moe.residual=true", 3, 0},
    {"distillation student (its KL buffers), bf16, ep 2", "moe.experts=4;run.precision=bf16;distill.teacher=t.safetensors",
     2, 0},
    {"PR-MoE 4/8, ZeRO 1, micro_batch 1",
     "moe.experts=4 x1, 8 x1;moe.residual=true;train.zero_stage=1;train.batch=16;train.micro_batch=1", 3, 0},
    {"hierarchical all-to-all", "moe.experts=4;moe.alltoall=hierarchical", 1, 1},
    {"auto all-to-all, dropless top-2, ZeRO 1",
     "moe.experts=4;moe.top_k=2;moe.drop_tokens=false;moe.alltoall=auto;train.zero_stage=1", 1, 1},
    {"auto all-to-all, 64 KiB messages and more", "moe.experts=4;moe.alltoall=auto;model.seq_len=512;model.layers=2;"
     "train.batch=32;train.micro_batch=8", 1, 1},
    {"auto, dropless, 4096 experts: 64 KiB slot rows, the reserve stops below the limit",
     "moe.experts=4096;moe.drop_tokens=false;moe.alltoall=auto;model.ffn_hidden=4;model.layers=2", 1, 1},
    {"hierarchical, dropless", "moe.experts=8;moe.drop_tokens=false;moe.alltoall=hierarchical", 1, 1},
    {"dropless top-1, flat", "moe.experts=8;moe.drop_tokens=false;moe.alltoall=flat", 2, 0},
};

static void case_overrides(const real_case *c, int W, char *buf, size_t n) {
    int len = snprintf(buf, n, "%s", c->extra);
    if (c->ep == 1) len += snprintf(buf + len, n - (size_t)len, ";moe.expert_parallel=%d", W);
    if (c->ep == 2) len += snprintf(buf + len, n - (size_t)len, ";moe.expert_parallel=%d", W < 2 ? W : 2);
    if (c->ep == 3) {
        if (W == 4) len += snprintf(buf + len, n - (size_t)len, ";moe.expert_parallel=2 x1, 4 x1");
        else len += snprintf(buf + len, n - (size_t)len, ";moe.expert_parallel=%d", W < 4 ? W : 4);
    }
    if (c->rpn) snprintf(buf + len, n - (size_t)len, ";moe.ranks_per_node=%d", W % 2 == 0 ? 2 : 1);
}

static void check_real_case(const real_case *rc) {
    int W = rt.world_size, rank = rt.world_rank;
    char extra[1024];
    case_overrides(rc, W, extra, sizeof extra);
    dsmoe_config cfg, cfg0;
    load_ok(small_deck, extra, W, &cfg);
    load_ok(small_deck, extra, 0, &cfg0); // as dsmoe --plan loads it: micro_batch not resolved yet
    dsmoe_mem_estimate est = estimate_ok(&cfg, W, rank, 0); // every rank of this machine is on one node
    dsmoe_mem_estimate est0 = estimate_ok(&cfg0, W, rank, 0);
    assert_memory_equal(&est, &est0, sizeof est);

    // B and the micro-steps as train.c derives them.
    assert_int_equal(est.micro_batch, cfg.micro_batch);
    assert_int_equal(est.micro_steps, cfg.batch / (cfg.micro_batch * W));

    uint64_t live0 = live;
    dsmoe_model *m = NULL;
    dsmoe_optimizer *opt = NULL;
    dsmoe_err err = {0};
    if (dsmoe_model_create(&cfg, &rt, cfg.micro_batch, &m, &err) != DSMOE_OK) fail_msg("%s: model: %s", rc->name, err.msg);
    uint64_t live1 = live;
    if (dsmoe_optimizer_create(m, cfg.zero_stage, &opt, &err) != DSMOE_OK)
        fail_msg("%s: optimizer: %s", rc->name, err.msg);
    uint64_t live2 = live;

    assert_int_equal(est.global_params, dsmoe_model_global_params(m));
    assert_int_equal(est.local_params, dsmoe_model_local_params(m));
    assert_int_equal(est.replicated_params, dsmoe_model_replicated_params(m));
    // bf16 keeps a bfloat16 copy of the weights for the GEMMs beside the fp32 masters (2 bytes a parameter).
    uint64_t lp = cfg.precision == DSMOE_PRECISION_BF16 ? 2 : 0;
    assert_int_equal(est.param_bytes, (4 + lp) * dsmoe_model_local_params(m));
    assert_int_equal(est.grad_bytes, 4 * dsmoe_model_local_params(m));
    assert_int_equal(est.model_bytes, dsmoe_model_bytes(m));
    assert_int_equal(est.activation_bytes, dsmoe_model_bytes(m) - (8 + lp) * dsmoe_model_local_params(m));
    assert_int_equal(est.optimizer_bytes, dsmoe_optimizer_bytes(opt));
    // What the model (with its MoE layers and their exchanges) and the optimizer took from the plugin.
    uint64_t S = (uint64_t)cfg.micro_batch * (uint64_t)cfg.seq_len;
    uint64_t staging = (2 * S + 1) * sizeof(int32_t); // token ids, target ids, the dense FFN's row count
    assert_int_equal(est.token_bytes, staging);
    assert_int_equal(est.moe_router_bytes + est.moe_buffer_bytes + est.exchange_bytes,
                     live1 - live0 - dsmoe_model_bytes(m) - staging);
    assert_int_equal(est.optimizer_bytes + est.optimizer_scratch_bytes, live2 - live1);
    assert_int_equal(est.total_bytes, live2 - live0);
    if (cfg.zero_stage == 0) assert_int_equal(est.optimizer_bytes, 2 * 4 * est.local_params); // two fp32 moments
    if (cfg.n_moe_layers == 0) assert_int_equal(est.moe_router_bytes + est.moe_buffer_bytes + est.exchange_bytes, 0);
    if (!cfg.drop_tokens) assert_int_equal(est.moe_buffer_bytes, 0);
    if (cfg.precision == DSMOE_PRECISION_BF16) {
        // Against the same deck in fp32: the masters, gradients and AdamW state keep their size, the weights
        // gain their bfloat16 copy, the capacity buffers (all activations) halve, and each MoE layer's gate
        // gains its float32 input copy (S, M) and, without jitter (whose gradient buffer it shares), that
        // input's gradient.
        dsmoe_config c32;
        char extra32[1100];
        snprintf(extra32, sizeof extra32, "%s;run.precision=fp32", extra);
        load_ok(small_deck, extra32, W, &c32);
        dsmoe_mem_estimate e32 = estimate_ok(&c32, W, rank, 0);
        uint64_t SM = (uint64_t)cfg.micro_batch * (uint64_t)cfg.seq_len * (uint64_t)cfg.hidden;
        assert_int_equal(est.param_bytes, e32.param_bytes + 2 * e32.local_params);
        assert_int_equal(est.grad_bytes, e32.grad_bytes);
        assert_int_equal(est.optimizer_bytes, e32.optimizer_bytes);
        assert_int_equal(2 * est.moe_buffer_bytes, e32.moe_buffer_bytes);
        assert_int_equal(est.moe_router_bytes,
                         e32.moe_router_bytes + (uint64_t)cfg.n_moe_layers * (cfg.noise == DSMOE_NOISE_JITTER ? 1 : 2) *
                                                    SM * sizeof(float));
        assert_true(est.activation_bytes < e32.activation_bytes);
    }

    // One training micro-step on zero parameters: every gate is uniform, so every token picks experts
    // 0 (and 1): a dropless layer grows to C = S, its predicted peak; capacity layers do not grow. The
    // model's buffers are not zeroed when made (reused memory may hold anything, and then some tokens go
    // elsewhere), so the parameters are zeroed here.
    assert_int_equal(rt.kern->zero(rt.kctx, rt.q, dsmoe_model_params(m), dsmoe_model_local_params(m) * sizeof(float)),
                     DSMOE_OK);
    int32_t *in = malloc(S * sizeof *in), *tg = malloc(S * sizeof *tg);
    assert_non_null(in);
    assert_non_null(tg);
    for (uint64_t s = 0; s < S; s++) {
        in[s] = (int32_t)(dsmoe_rng_u64(31, s + 1000 * (uint64_t)rank) % (uint64_t)cfg.vocab);
        tg[s] = (int32_t)(dsmoe_rng_u64(32, s + 1000 * (uint64_t)rank) % (uint64_t)cfg.vocab);
    }
    dsmoe_forward_result res;
    if (dsmoe_model_forward(m, in, tg, 1, 5, 0, &res, &err) != DSMOE_OK) fail_msg("%s: forward: %s", rc->name, err.msg);
    if (dsmoe_model_backward(m, 1.0f / (float)S, 0.01f, &err) != DSMOE_OK)
        fail_msg("%s: backward: %s", rc->name, err.msg);
    for (int i = 0; i < cfg.n_moe_layers; i++) {
        int C = dsmoe_model_moe_stats(m, i)->capacity;
        if (cfg.drop_tokens) {
            assert_int_equal(C, dsmoe_config_capacity(&cfg, (int)S, cfg.experts[i], 1));
            assert_true(C <= est.capacity_max);
        } else {
            assert_int_equal(C, (int)S);
        }
    }
    free(in);
    free(tg);
    assert_int_equal(live - live0, est.peak_bytes - est.checkpoint_bytes);
    if (cfg.drop_tokens) assert_int_equal(live - live0, est.total_bytes);

    dsmoe_optimizer_free(opt);
    dsmoe_model_free(m);
    assert_int_equal(live, live0);

    // The same config as a distillation teacher: a forward-only model, its MoE layers and exchanges.
    uint64_t teacher = 0;
    if (dsmoe_mem_teacher_bytes(&cfg, W, rank, 0, NULL, &teacher, &err) != DSMOE_OK)
        fail_msg("%s: teacher estimate: %s", rc->name, err.msg);
    if (dsmoe_model_create_forward_only(&cfg, &rt, cfg.micro_batch, &m, &err) != DSMOE_OK)
        fail_msg("%s: forward-only model: %s", rc->name, err.msg);
    assert_int_equal(teacher, live - live0);
    assert_null(dsmoe_model_grads(m));
    // Its parameters and activations, without the training model's gradients, probabilities and scratch.
    assert_true(dsmoe_model_bytes(m) < est.model_bytes - est.grad_bytes);
    dsmoe_model_free(m);
    assert_int_equal(live, live0);
}

static void test_real_allocation(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof real_cases / sizeof real_cases[0]; i++) check_real_case(&real_cases[i]);
}

// ----------------------------------------------------------------------------------------------------
// by hand

// vocab 32, seq_len 8, hidden 16, ffn 24, 4 layers, 4 experts on layers 2 and 4.
static void test_small_model_by_hand(void **state) {
    (void)state;
    dsmoe_config cfg;
    load_ok(small_deck, "moe.experts=4;moe.expert_parallel=2;train.zero_stage=1", 4, &cfg);
    uint64_t wte = 32 * 16, wpe = 8 * 16, lnf = 2 * 16;
    uint64_t attn = 2 * 16 + (3 * 16 * 16 + 3 * 16) + (16 * 16 + 16) + 2 * 16; // ln_1, c_attn, c_proj, ln_2 = 1152
    uint64_t ffn = (24 * 16 + 24) + (16 * 24 + 16);                              // c_fc, c_proj = 808
    uint64_t gate = 4 * 16;
    uint64_t replicated = wte + wpe + lnf + 4 * attn + 2 * ffn + 2 * gate;      // 7024
    uint64_t experts = 2 * 4 * ffn;                                              // 6464
    assert_int_equal(replicated, 7024);
    dsmoe_param_counts pc;
    dsmoe_mem_param_counts(&cfg, &pc);
    assert_int_equal(pc.replicated, replicated);
    assert_int_equal(pc.expert, experts);
    assert_int_equal(pc.total, replicated + experts);

    // Rank 3 of 4, ep 2: 2 of the 4 experts of each MoE layer; B = 8 / 4 = 2, S = 16.
    dsmoe_mem_estimate e = estimate_ok(&cfg, 4, 3, 0);
    assert_int_equal(e.micro_batch, 2);
    assert_int_equal(e.micro_steps, 1);
    assert_int_equal(e.local_params, replicated + 2 * 2 * ffn); // 10256
    // ZeRO-1: replicated 7024 over 4 ranks = 1756 each; each layer's 1616 expert elements over its EDP
    // group of 2 ranks = 808 each. gather: the largest chunk * group size (7024), send: the largest chunk.
    assert_int_equal(e.optimizer_bytes, 2 * 4 * (1756 + 2 * 808));
    assert_int_equal(e.optimizer_scratch_bytes, 4 * (7024 + 1756));
    // Capacity C = max(ceil(16 / 4 * 1 * 1.0), 4) = 4 per expert: (E, C, M) x4 + (E, C, F) x3 per layer.
    assert_int_equal(e.capacity_max, 4);
    assert_int_equal(e.moe_buffer_bytes, 2 * 4 * (4 * 4 * 16 + 3 * 4 * 24) * 4);
    // Router: logits, probs (16, 4); choice, slot, weight, dweight (16, 1); route, kept and received counts
    // (3, 4) int32; l_aux sums (9) doubles.
    assert_int_equal(e.moe_router_bytes, 2 * ((2 * 16 * 4 + 4 * 16 + 3 * 4) * 4 + 9 * 8));
    assert_int_equal(e.exchange_bytes, 0); // one node
    // Checkpoint staging streams: rank 3 (slot 3, outside the first EP group of 2) holds nothing; rank 0
    // the largest global tensor, the experts' c_fc (4, 24, 16), and its shard (2, 24, 16) in flight.
    assert_int_equal(e.checkpoint_host_bytes, 0);
    dsmoe_mem_estimate e0;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 4, 0, 0, &e0, &err), DSMOE_OK);
    assert_int_equal(e0.checkpoint_host_bytes, 4 * (4 * 24 * 16 + 2 * 24 * 16));
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 4, 1, 0, &e0, &err), DSMOE_OK);
    assert_int_equal(e0.checkpoint_host_bytes, 4 * 2 * 24 * 16);

    // Residual: the MoE layers keep their dense FFN and gain the coefficient Linear(16, 2).
    load_ok(small_deck, "moe.experts=4;moe.residual=true", 1, &cfg);
    dsmoe_mem_param_counts(&cfg, &pc);
    assert_int_equal(pc.replicated, replicated + 2 * ffn + 2 * (2 * 16 + 2));
    assert_int_equal(pc.expert, experts);
}

// The hierarchical all-to-all's workspace: ranks_per_node 2 on 8 ranks, ep 8, E = 8, S = 16, C = 4:
// hierarchical packs ep * E_local * C * M * 4 bytes per layer; auto caps the bytes per peer below 64 KiB.
static void test_exchange_workspace_by_hand(void **state) {
    (void)state;
    dsmoe_config cfg;
    load_ok(small_deck, "moe.experts=8;moe.expert_parallel=8;moe.alltoall=hierarchical;moe.ranks_per_node=2;"
            "train.batch=16", 8, &cfg);
    dsmoe_mem_estimate e = estimate_ok(&cfg, 8, 5, 0);
    assert_int_equal(e.exchange_bytes, 2 * 8 * (1 * 4 * 16 * 4));
    assert_int_equal(e.exchange_peak_bytes, e.exchange_bytes);
    // The real nodes (moe.ranks_per_node 0) of 2 ranks each give the same; of 8 (one node): none.
    load_ok(small_deck, "moe.experts=8;moe.expert_parallel=8;moe.alltoall=hierarchical;train.batch=16", 8, &cfg);
    assert_int_equal(estimate_ok(&cfg, 8, 5, 2).exchange_bytes, e.exchange_bytes);
    assert_int_equal(estimate_ok(&cfg, 8, 5, 0).exchange_bytes, 0);
    assert_int_equal(estimate_ok(&cfg, 8, 5, 8).exchange_bytes, 0);
    // Nodes of 3 ranks cut the EP group unevenly: hierarchical is refused, auto goes flat.
    dsmoe_mem_estimate bad;
    dsmoe_err err = {0};
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 8, 0, 3, &bad, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "hierarchical"));
    load_ok(small_deck, "moe.experts=8;moe.expert_parallel=8;moe.alltoall=auto;train.batch=16", 8, &cfg);
    assert_int_equal(estimate_ok(&cfg, 8, 0, 3).exchange_bytes, 0);
    // Auto with 2 per node: 8 x 1 x 4 x 16 x 4 = 256 bytes per peer, below 64 KiB: packed like hierarchical.
    assert_int_equal(estimate_ok(&cfg, 8, 0, 2).exchange_bytes, 2 * 8 * 256);
    // 2 x 4096 tokens: C = 1024, 64 KiB per peer: auto sends those flat but reserves for just below 64 KiB.
    load_ok(small_deck, "moe.experts=8;moe.expert_parallel=8;moe.alltoall=auto;train.batch=16;model.seq_len=4096", 8,
            &cfg);
    e = estimate_ok(&cfg, 8, 0, 2);
    assert_int_equal(e.capacity_max, 1024);
    assert_int_equal(e.exchange_bytes, 2 * 8 * (64 * 1024 - 1));
    assert_int_equal(e.exchange_peak_bytes, e.exchange_bytes);
}

static void test_refused(void **state) {
    (void)state;
    dsmoe_config cfg;
    dsmoe_mem_estimate e;
    dsmoe_err err = {0};
    load_ok(small_deck, "moe.experts=4;moe.expert_parallel=4;train.batch=24", 0, &cfg);
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 6, 0, 0, &e, &err), DSMOE_ERR_INVALID); // ep 4 on 6 ranks
    assert_non_null(strstr(err.msg, "expert_parallel"));
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 4, 0, 0, &e, &err), DSMOE_OK);
    load_ok(small_deck, "moe.experts=4;moe.expert_parallel=4", 0, &cfg);
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 16, 0, 0, &e, &err), DSMOE_ERR_INVALID); // batch 8 on 16
    assert_non_null(strstr(err.msg, "train.batch"));
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 4, 4, 0, &e, &err), DSMOE_ERR_INVALID); // rank out of range
    load_ok(small_deck, "moe.experts=4;moe.expert_parallel=4;train.micro_batch=3", 0, &cfg);
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 4, 0, 0, &e, &err), DSMOE_ERR_INVALID); // 8 % (3 x 4)
    // What config.c already refuses, refused again for a config struct made some other way.
    load_ok(small_deck, "moe.experts=4;moe.expert_parallel=4", 0, &cfg);
    cfg.experts[1] = 6;
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 4, 0, 0, &e, &err), DSMOE_ERR_INVALID); // 6 experts over 4
    assert_non_null(strstr(err.msg, "MoE layer 2"));
    cfg.experts[1] = 1; // top-2 over 1 expert
    cfg.top_k = 2;
    for (int i = 0; i < cfg.n_moe_layers; i++) cfg.expert_parallel[i] = 1;
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 1, 0, 0, &e, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "top_k"));
    // 2^20 sequences of 2048 tokens: S = 2^31 does not fit the model's int.
    load_ok(small_deck, "model.seq_len=2048;train.batch=1048576", 0, &cfg);
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 1, 0, 0, &e, &err), DSMOE_ERR_INVALID);
    assert_non_null(strstr(err.msg, "micro_batch"));
    assert_int_equal(dsmoe_mem_estimate_rank(&cfg, 2, 0, 0, &e, &err), DSMOE_OK);
}

// ----------------------------------------------------------------------------------------------------
// the paper's sizes

static const char *paper_350m =
    "[model]\nvocab = 50257\nseq_len = 2048\nlayers = 24\nhidden = 1024\nheads = 16\n"
    "[moe]\nevery = 2\nmin_capacity = 4\n[train]\nbatch = 256\nmicro_batch = 1\n";
static const char *paper_1_3b =
    "[model]\nvocab = 50257\nseq_len = 2048\nlayers = 24\nhidden = 2048\nheads = 16\n"
    "[moe]\nevery = 2\nmin_capacity = 4\n[train]\nbatch = 512\nmicro_batch = 1\n";

static void assert_near(double got, double want, double rel) {
    if (fabs(got - want) > rel * want) fail_msg("%.4g is not within %.0f%% of %.4g", got, 100 * rel, want);
}

// Over all ranks, ZeRO-1 shards hold each replicated element once and each expert element once (every
// EDP group covers its layer's local experts, and the ep groups cover all experts).
static void check_shards_cover(const dsmoe_config *cfg, int W) {
    uint64_t state = 0;
    dsmoe_mem_estimate e;
    for (int r = 0; r < W; r++) {
        e = estimate_ok(cfg, W, r, 0);
        state += e.optimizer_bytes / 8;
    }
    assert_int_equal(state, e.global_params);
}

static void print_estimate(const char *what, const dsmoe_mem_estimate *e) {
    double mib = 1.0 / 1048576.0;
    printf("memplan: %s: %.4g params (%.4g on the rank), B %d x %d micro-steps | MiB: params %.0f grads %.0f "
           "AdamW %.0f (+ZeRO scratch %.0f) activations %.0f tokens %.2f MoE capacity %.0f (C %d) MoE router %.0f "
           "exchange %.0f | total %.0f | peak %.0f (checkpoint staging %.0f) | checkpoint host %.0f\n",
           what, (double)e->global_params, (double)e->local_params, e->micro_batch, e->micro_steps,
           e->param_bytes * mib, e->grad_bytes * mib, e->optimizer_bytes * mib, e->optimizer_scratch_bytes * mib,
           e->activation_bytes * mib, e->token_bytes * mib, e->moe_buffer_bytes * mib, e->capacity_max,
           e->moe_router_bytes * mib, e->exchange_bytes * mib, e->total_bytes * mib, e->peak_bytes * mib,
           e->checkpoint_bytes * mib, e->checkpoint_host_bytes * mib);
}

static void test_paper_sizes(void **state) {
    (void)state;
    int verbose = rt.world_rank == 0;
    dsmoe_config cfg;
    dsmoe_mem_estimate e;
    char what[160];
    for (int zero = 0; zero <= 1; zero++) {
        char ov[256];
        // 350M+MoE-128 on 128 ranks, ep 128: 13B.
        snprintf(ov, sizeof ov, "moe.experts=128;moe.expert_parallel=128;train.zero_stage=%d", zero);
        load_ok(paper_350m, ov, 128, &cfg);
        e = estimate_ok(&cfg, 128, 0, 8);
        assert_near((double)e.global_params, 13e9, 0.03);
        assert_int_equal(e.local_params, e.replicated_params + 12 * (2 * 4096 * 1024 + 4096 + 1024));
        if (zero) check_shards_cover(&cfg, 128);
        snprintf(what, sizeof what, "350M+MoE-128, 128 ranks, ep 128, B 1, ZeRO %d", zero);
        if (verbose) print_estimate(what, &e);

        // 1.3B+MoE-128 on 128 ranks, ep 128: 52B; micro-batch 1 and 4.
        for (int mb = 1; mb <= 4; mb += 3) {
            snprintf(ov, sizeof ov, "moe.experts=128;moe.expert_parallel=128;train.zero_stage=%d;train.micro_batch=%d",
                     zero, mb);
            load_ok(paper_1_3b, ov, 128, &cfg);
            e = estimate_ok(&cfg, 128, 127, 8);
            assert_near((double)e.global_params, 52e9, 0.03);
            assert_true(e.global_params > UINT32_MAX);
            assert_int_equal(e.micro_steps, 512 / (128 * mb));
            if (zero && mb == 1) check_shards_cover(&cfg, 128);
            snprintf(what, sizeof what, "1.3B+MoE-128, 128 ranks, ep 128, B %d, ZeRO %d", mb, zero);
            if (verbose) print_estimate(what, &e);
        }

        // 350M+PR-MoE-32/64 on 64 ranks: residual, 10 layers of 32 experts (ep 32) then 2 of 64 (ep 64): 4B.
        snprintf(ov, sizeof ov, "moe.experts=32 x10, 64 x2;moe.expert_parallel=32 x10, 64 x2;moe.residual=true;"
                 "train.zero_stage=%d", zero);
        load_ok(paper_350m, ov, 64, &cfg);
        e = estimate_ok(&cfg, 64, 0, 8);
        assert_near((double)e.global_params, 4e9, 0.05);
        assert_int_equal(e.local_params - e.replicated_params, 12 * (2 * 4096 * 1024 + 4096 + 1024));
        if (zero) check_shards_cover(&cfg, 64);
        snprintf(what, sizeof what, "350M+PR-MoE-32/64, 64 ranks, ep 32/64, B 1, ZeRO %d", zero);
        if (verbose) print_estimate(what, &e);
    }
}

int main(int argc, char **argv) {
    if (test_runtime_start(&argc, &argv, &rt) != 0) return 1;
    real_kern = rt.kern;
    counting_kern = *rt.kern;
    counting_kern.alloc = count_alloc;
    counting_kern.free = count_free;
    rt.kern = &counting_kern;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_small_model_by_hand),
        cmocka_unit_test(test_exchange_workspace_by_hand),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_paper_sizes),
        cmocka_unit_test(test_real_allocation),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    rt.kern = real_kern;
    dsmoe_runtime_close(&rt);
    MPI_Finalize();
    return failed;
}
