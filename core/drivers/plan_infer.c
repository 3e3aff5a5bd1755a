// core/drivers/plan_infer.c: dsmoe --plan of a run.mode = generate deck (plan.h): memory per rank with
// the KV cache, the all-to-all of one decode step (flat, hierarchical, coordinated) and an estimated
// per-token latency on the planned machine, with every hardware figure printed beside the key that sets it.
//
// The latency model, per decode step (every sequence of a rank's batch gets one token):
//   memory:   the bytes a rank must read / plan.memory_bandwidth: its slice of the dense weights, the
//             experts its tokens reach (expected number, tokens spread evenly), the head, the KV cache;
//   exchange: per MoE layer the counts' all-to-all, then the routed rows out and back (only the rows that
//             hold tokens travel: expected messages and bytes, tokens spread evenly over the experts),
//             each message costing the latency of its path (node or network) and its bytes / that path's
//             bandwidth, serially (no overlap);
//   tensor:   per block two ring all-reduces of the rows (attention and dense FFN), 2 (W - 1) messages of
//             rows x M / W floats inside the node; coordinated: one all-gather per MoE layer.
// It ignores compute (decode is bandwidth-bound), kernel launch costs and overlap: a floor, not a forecast.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "exchange.h"    // dsmoe_a2a_plan_compute
#include "memplan.h"     // dsmoe_mem_estimate_rank_for
#include "model_infer.h" // dsmoe_infer_estimate
#include "plan.h"

// Rates in decimal units, as hardware sheets give them (GB/s).
static const char *rate(double bytes_per_s) {
    static char buf[4][32];
    static int k;
    char *b = buf[k++ % 4];
    const char *unit[] = {"B/s", "kB/s", "MB/s", "GB/s", "TB/s"};
    int u = 0;
    while (bytes_per_s >= 1000.0 && u < 4) bytes_per_s /= 1000.0, u++;
    snprintf(b, 32, "%.3g %s", bytes_per_s, unit[u]);
    return b;
}

typedef struct hw {
    double mem_bw, node_bw, net_bw, node_lat, net_lat;
    int mem_assumed, node_assumed, net_assumed;
} hw;

// One MoE layer's exchanges in one decode step (expected values): the counts (a fixed all-to-all of
// E_local int32 to each peer), then the routed rows out and back. Each of a rank's `tokens` picks K
// distinct experts of E uniformly, so it misses a peer's E_local experts with probability
// q1 = prod_{i<K} (E - E_local - i) / (E - i), and a peer gets no row from the rank with q = q1^tokens.
// Flat: a message to each peer with a row. Hierarchical: step 2 sends node-mate g' nothing only when no
// rank (n', g') gets a row (q^N), step 4 sends node n' nothing only when none of my node-mates has a row for
// its rank (q^G); before them the node's ranks all-gather their sizes (a ring: G - 1 messages of p int64).
typedef struct expected_a2a {
    double rows_per_peer;           // rows a rank sends each peer, each way
    double messages, inter_messages; // counts + rows out + rows back
    double bytes, inter_bytes;
} expected_a2a;

static dsmoe_status decode_exchange(dsmoe_a2a_algo algo, int p, int G, int E, int K, double tokens, double row_bytes,
                                    expected_a2a *x, dsmoe_err *err) {
    int El = E / p, N = p / G;
    dsmoe_a2a_plan counts;
    DSMOE_TRY(dsmoe_a2a_plan_compute(algo, p, G, (size_t)El * sizeof(int32_t), &counts, err));
    double q1 = 1.0;
    for (int i = 0; i < K; i++) q1 *= E - El - i > 0 ? (double)(E - El - i) / (E - i) : 0.0;
    double q = pow(q1, tokens), b = tokens * K * (double)El / E * row_bytes;
    *x = (expected_a2a){.rows_per_peer = tokens * K * (double)El / E};
    double msgs, inter_msgs, bytes, inter_bytes;
    if (counts.algo == DSMOE_A2A_FLAT) {
        msgs = (p - 1) * (1 - q), inter_msgs = (p - G) * (1 - q);
        bytes = (p - 1) * b, inter_bytes = (p - G) * b;
    } else {
        msgs = (G - 1) * (1 - pow(q, N)) + (N - 1) * (1 - pow(q, G)), inter_msgs = (N - 1) * (1 - pow(q, G));
        bytes = (double)(G - 1) * N * b + (double)(N - 1) * G * b, inter_bytes = (double)(N - 1) * G * b;
        x->messages += G - 1, x->bytes += (double)(G - 1) * p * sizeof(int64_t); // the size all-gather
    }
    x->messages += (double)counts.messages + 2 * msgs;
    x->inter_messages = (double)counts.inter_node_messages + 2 * inter_msgs;
    x->bytes += (double)counts.bytes_sent + 2 * bytes;
    x->inter_bytes = (double)counts.inter_node_bytes + 2 * inter_bytes;
    return DSMOE_OK;
}

// Time of an expected exchange: each message pays its path's latency, each byte its path's bandwidth.
static double expected_seconds(const expected_a2a *x, const hw *h) {
    return (x->messages - x->inter_messages) * h->node_lat + (x->bytes - x->inter_bytes) / h->node_bw +
           x->inter_messages * h->net_lat + x->inter_bytes / h->net_bw;
}

// An EP group is ep ranks of one tensor rank, W slots apart: G of them share a node (1 when the group's
// ranks are spread one a node, or unevenly).
static int ep_ranks_per_node(int rpn, int W, int ep) {
    int stride_rpn = rpn / W > 0 ? rpn / W : 1;
    return stride_rpn % ep == 0 ? ep : ep % stride_rpn == 0 ? stride_rpn : 1;
}

// The variable exchange's two workspaces (exchange.c), per distinct (experts, ep) of the MoE layers (the
// layers alike share one exchange): p blocks of E_local x rows x M each, when it packs (more than one
// expert a rank, or the hierarchical steps), and the node's gathered sizes when hierarchical.
static uint64_t exchange_workspace_bytes(const dsmoe_config *c, int rpn, int W, uint64_t rows, uint64_t row_bytes) {
    uint64_t total = 0;
    for (int i = 0; i < c->n_moe_layers; i++) {
        int E = c->experts[i], ep = c->expert_parallel[i], seen = 0;
        for (int j = 0; j < i; j++) seen |= c->experts[j] == E && c->expert_parallel[j] == ep;
        if (seen || ep == 1) continue;
        int G = ep_ranks_per_node(rpn, W, ep);
        uint64_t El = (uint64_t)(E / ep), block = El * rows * row_bytes;
        int hier = G > 1 && G < ep && dsmoe_a2a_choose((dsmoe_a2a_algo)c->alltoall, ep, G, block) == DSMOE_A2A_HIERARCHICAL;
        if (El > 1 || hier) total += 2 * (uint64_t)ep * block;
        if (hier) total += (2 * (uint64_t)G + 1) * (uint64_t)ep * sizeof(int64_t);
    }
    return total;
}

dsmoe_status dsmoe_plan_generate(FILE *out, const dsmoe_config *c, int ranks, int rpn, int use_gpus, uint64_t budget,
                                 const char *budget_why, dsmoe_err *err) {
    int W = c->gen_tensor_parallel, D = ranks / W, B = c->gen_batch;
    int T = c->gen_context ? c->gen_context : c->seq_len;
    int R = B + c->gen_prefill_tokens;
    uint64_t M = (uint64_t)c->hidden, F = (uint64_t)c->ffn_hidden, V = (uint64_t)c->vocab, f = sizeof(float);
    hw h = {
        .mem_bw = c->plan_memory_bandwidth ? (double)c->plan_memory_bandwidth : use_gpus ? 2e12 : 10e9,
        .node_bw = c->plan_node_bandwidth ? (double)c->plan_node_bandwidth : use_gpus ? 150e9 : 5e9,
        .net_bw = c->plan_network_bandwidth ? (double)c->plan_network_bandwidth : 25e9,
        .node_lat = c->plan_node_latency, .net_lat = c->plan_network_latency,
        .mem_assumed = !c->plan_memory_bandwidth, .node_assumed = !c->plan_node_bandwidth,
        .net_assumed = !c->plan_network_bandwidth,
    };
    fprintf(out, "generate: %d data-parallel group%s x tensor slicing %d; each group decodes %d sequences of up to %d "
            "positions (generate.batch, generate.context); calls of up to %d tokens\n", D, D == 1 ? "" : "s", W, B, T, R);

    // Memory: the model as generation holds it once the inference state exists: the tensors read whole
    // (replicated ones, this rank's experts unless expert-sliced; bf16: the weight matrices as bfloat16
    // alone, dsmoe_model_drop_gemm_masters) and, with tensor slicing, this rank's 1/W slices of the others
    // (the inference state's). The whole weights exist only while the checkpoint loads (the peak).
    dsmoe_mem_estimate est;
    DSMOE_TRY(dsmoe_mem_estimate_rank_for(c, ranks, 0, rpn, NULL, &est, err));
    dsmoe_infer_sizes z;
    dsmoe_infer_estimate(c, B, T, R, W, dsmoe_tensor_moe_of(c), &z);
    z.moe_bytes += exchange_workspace_bytes(c, rpn, W, (uint64_t)z.moe_rows, M * dsmoe_dtype_size(dsmoe_config_act_dtype(c)));
    uint64_t at_load = est.param_bytes;
    int es = W > 1 && dsmoe_tensor_moe_of(c) == DSMOE_TENSOR_MOE_SLICED;
    est.param_bytes = dsmoe_model_generate_param_bytes(c, W, es);
    uint64_t model = est.param_bytes + est.grad_bytes + est.activation_bytes + est.token_bytes;
    uint64_t total = model + z.cache_bytes + z.slice_bytes + z.row_bytes + z.moe_bytes;
    uint64_t peak = total - est.param_bytes + at_load; // the fit: the whole tensors and the slices, at create
    char slices[128] = "";
    if (W > 1)
        snprintf(slices, sizeof slices, "; its 1/%d slices of the attention%s weights %s", W,
                 es ? ", dense FFN and expert" : " and dense FFN", dsmoe_plan_bytes((double)z.slice_bytes));
    fprintf(out, "memory per rank (%s): parameters %s (held whole %s: the replicated tensors%s%s; %s while the "
            "checkpoint loads), the model's other buffers %s, KV cache %s (2 x %d layers x %d sequences x %d positions "
            "x %d wide), per-call buffers %s, MoE buffers %s (%d rows a layer, with the exchange's workspaces); total %s, %s at the peak (the load, "
            "the slices copied) of %s (%s): %s\n",
            c->precision == DSMOE_PRECISION_BF16 ? "bf16: weight matrices as bfloat16, the other tensors float32; bf16 "
                                                   "cache and activations"
                                                 : "fp32",
            dsmoe_plan_bytes((double)(est.param_bytes + z.slice_bytes)), dsmoe_plan_bytes((double)est.param_bytes),
            es ? "" : " and this rank's experts", slices, dsmoe_plan_bytes((double)at_load),
            dsmoe_plan_bytes((double)(model - est.param_bytes)), dsmoe_plan_bytes((double)z.cache_bytes), c->layers, B, T,
            c->hidden / W, dsmoe_plan_bytes((double)z.row_bytes), dsmoe_plan_bytes((double)z.moe_bytes), z.moe_rows,
            dsmoe_plan_bytes((double)total), dsmoe_plan_bytes((double)peak),
            budget ? dsmoe_plan_bytes((double)budget) : "an unknown amount", budget_why,
            budget == 0 ? "unknown" : peak <= budget ? "fits" : "DOES NOT FIT");

    // Bytes one decode step reads on a rank.
    int coord = W > 1 && dsmoe_tensor_moe_of(c) == DSMOE_TENSOR_MOE_COORDINATED && c->n_moe_layers > 0;
    int sliced = W > 1 && dsmoe_tensor_moe_of(c) == DSMOE_TENSOR_MOE_SLICED;
    double tokens_share = coord ? ceil((double)B / W) : (double)B; // rows a rank sends through a MoE layer
    double attn = (double)(4 * M * M + 4 * M) / W + 4.0 * M, dense_ffn = (double)(2 * M * F + F) / W + M;
    // Elements, read at wf bytes (the GEMMs' weights and the cache: 2 in bf16; the few float32 vectors
    // among them are counted at that size too) except the router, float32 in any precision.
    double wf = (double)dsmoe_dtype_size(dsmoe_config_act_dtype(c)), router = 0;
    double weights = 0, experts = 0, kv = 2.0 * c->layers * B * T * (double)(M / W);
    double hit_sum = 0;
    for (int l = 0, mi = 0; l < c->layers; l++) {
        weights += attn;
        if (!dsmoe_config_is_moe_layer(c, l, &mi)) {
            weights += dense_ffn;
            continue;
        }
        int E = c->experts[mi], ep = c->expert_parallel[mi], El = E / ep, K = c->top_k;
        router += (double)E * M;
        weights += c->residual ? dense_ffn + 2.0 * M + 2 : 0;
        // Tokens an EP group sends: ep ranks x their share; each picks K of E experts.
        double group_tokens = (double)ep * tokens_share, hit = El * (1.0 - pow(1.0 - (double)K / E, group_tokens));
        hit_sum += hit;
        experts += hit * ((double)(2 * M * F + F) / (sliced ? W : 1) + M);
    }
    double head = (double)(V * M + 2 * M), bytes_read = (weights + experts + head + kv) * wf + router * f;
    fprintf(out, "decode step, per rank: reads %s: dense weights %s, routers %s, experts %s (%.1f per MoE layer on "
            "average), head %s, KV cache %s at full context\n", dsmoe_plan_bytes(bytes_read), dsmoe_plan_bytes(weights * wf),
            dsmoe_plan_bytes(router * f), dsmoe_plan_bytes(experts * wf), c->n_moe_layers ? hit_sum / c->n_moe_layers : 0.0,
            dsmoe_plan_bytes(head * wf), dsmoe_plan_bytes(kv * wf));

    // All-to-all per decode step, and the estimate under each algorithm. Generation exchanges only the
    // rows that hold tokens (exchange.h: dsmoe_exchange_alltoallv_rows): per MoE layer a fixed exchange of
    // the counts (E_local integers to each peer), then the rows out and back; a peer with no row gets no
    // message. Expected values with tokens spread evenly over the experts.
    double t_mem = bytes_read / h.mem_bw, t_flat = 0, t_hier = 0, t_coord = 0;
    fprintf(out, "all-to-all per decode step per rank (per MoE layer: the counts, then only the routed rows out "
            "and back; %s tokens a rank, expected values):\n", coord ? "1/W of the" : "all its");
    fprintf(out, "  %-20s %-13s %12s %10s %12s %12s %14s\n", "MoE layers", "algorithm", "rows/peer", "messages", "sent",
            "to nodes", "sent to nodes");
    for (int i = 0; i < c->n_moe_layers; i++) {
        int E = c->experts[i], ep = c->expert_parallel[i], n = 0, seen = 0;
        for (int j = 0; j < i; j++) seen |= c->experts[j] == E && c->expert_parallel[j] == ep;
        for (int j = 0; j < c->n_moe_layers; j++) n += c->experts[j] == E && c->expert_parallel[j] == ep;
        int G = ep_ranks_per_node(rpn, W, ep);
        char label[32];
        snprintf(label, sizeof label, "%d x (%d, ep %d)", n, E, ep);
        if (ep == 1) {
            if (!seen) fprintf(out, "  %-20s none: with ep 1 every rank holds all the layer's experts\n", label);
            continue;
        }
        for (int a = 0; a < 2; a++) {
            if (a == 1 && (G == 1 || G == ep)) {
                if (!seen) fprintf(out, "  %-20s %-13s %s\n", "", "hierarchical",
                                   G == ep ? "= flat: the group is inside one node"
                                   : "= flat: one rank of the group per node (or uneven parts)");
                continue;
            }
            expected_a2a x;
            if (decode_exchange(a ? DSMOE_A2A_HIERARCHICAL : DSMOE_A2A_FLAT, ep, G, E, c->top_k, ceil(tokens_share),
                                (double)M * wf, &x, err) != DSMOE_OK)
                return err->status;
            double t = expected_seconds(&x, &h); // this layer (the table prints its kind once, n times)
            if (a == 0) t_flat += t;
            else t_hier += t;
            if (!seen)
                fprintf(out, "  %-20s %-13s %12.3g %10.0f %12s %12.0f %14s\n", a ? "" : label,
                        a ? "hierarchical" : "flat", x.rows_per_peer, n * x.messages, dsmoe_plan_bytes(n * x.bytes),
                        n * x.inter_messages, dsmoe_plan_bytes(n * x.inter_bytes));
        }
        if (G == 1 || G == ep) { // no hierarchical variant: it is the flat one
            expected_a2a x;
            if (decode_exchange(DSMOE_A2A_FLAT, ep, G, E, c->top_k, ceil(tokens_share), (double)M * wf, &x, err) !=
                DSMOE_OK)
                return err->status;
            t_hier += expected_seconds(&x, &h);
        }
    }
    // Tensor slicing: two ring all-reduces of B x M floats per block; coordinated: an all-gather of the MoE
    // outputs per MoE layer.
    double t_tensor = 0, t_gather = 0;
    if (W > 1) {
        double rows_bytes = (double)B * M * f;
        t_tensor = c->layers * 2 * (2.0 * (W - 1) * h.node_lat + 2.0 * (W - 1) / W * rows_bytes / h.node_bw);
        if (coord) t_gather = c->n_moe_layers * ((W - 1) * h.node_lat + (double)(W - 1) / W * rows_bytes / h.node_bw);
        if (sliced) // the experts' partial outputs: one more ring all-reduce per MoE layer
            t_gather = c->n_moe_layers * (2.0 * (W - 1) * h.node_lat + 2.0 * (W - 1) / W * rows_bytes / h.node_bw);
        t_coord = t_flat + t_gather; // the flat exchange on 1/W of the tokens (tokens_share above)
    }
    fprintf(out, "estimated time per decode step (= per token of each sequence): memory %.3f ms", 1e3 * t_mem);
    if (W > 1) fprintf(out, " + tensor all-reduces %.3f ms", 1e3 * t_tensor);
    fprintf(out, "\n");
    if (sliced && c->n_moe_layers > 0)
        fprintf(out, "  + expert-slicing all-reduces %.3f ms + all-to-all: flat %.3f ms -> %.3f ms; hierarchical %.3f ms "
                "-> %.3f ms\n", 1e3 * t_gather, 1e3 * t_flat, 1e3 * (t_mem + t_tensor + t_gather + t_flat), 1e3 * t_hier,
                1e3 * (t_mem + t_tensor + t_gather + t_hier));
    else if (c->n_moe_layers > 0 && !coord)
        fprintf(out, "  + all-to-all: flat %.3f ms -> %.3f ms; hierarchical %.3f ms -> %.3f ms\n", 1e3 * t_flat,
                1e3 * (t_mem + t_tensor + t_flat), 1e3 * t_hier, 1e3 * (t_mem + t_tensor + t_hier));
    else if (coord)
        fprintf(out, "  + coordinated all-to-all (1/%d of the tokens, flat) %.3f ms + all-gather %.3f ms -> %.3f ms\n", W,
                1e3 * t_flat, 1e3 * t_gather, 1e3 * (t_mem + t_tensor + t_coord));
    else
        fprintf(out, "  -> %.3f ms (no MoE layer)\n", 1e3 * (t_mem + t_tensor));
    fprintf(out, "assumed: memory bandwidth %s%s, inside a node %s%s and %.1f us a message, between nodes %s%s "
            "and %.1f us a message (plan.node_latency, plan.network_latency); compute, launches and overlap ignored\n",
            rate(h.mem_bw), h.mem_assumed ? " (plan.memory_bandwidth = 0: assumed)" : " (plan.memory_bandwidth)",
            rate(h.node_bw), h.node_assumed ? " (plan.node_bandwidth = 0: assumed)" : " (plan.node_bandwidth)",
            1e6 * h.node_lat, rate(h.net_bw),
            h.net_assumed ? " (plan.network_bandwidth = 0: assumed)" : " (plan.network_bandwidth)", 1e6 * h.net_lat);
    if (budget > 0 && total > budget)
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "the plan does not fit: a rank needs %s for generation but has %s "
                             "(%s); lower generate.batch or generate.context, or use more ranks", dsmoe_plan_bytes((double)total),
                             dsmoe_plan_bytes((double)budget), budget_why);
    return DSMOE_OK;
}
