// core/deck/config_keys.c: the registry of every deck key (the Open MPI MCA pattern): name, type, default
// text, field of dsmoe_config, range, help. config.c loads, checks and prints through it; docs/deck.md
// documents every key and tests/deck/test_deck.c compares that page with this table.
#include "config_keys.h"

const char *const dsmoe_config_type_names[] = {"int", "int", "float", "bool", "enum", "string", "duration", "list", "list"};

static const char *const v_mode[] = {"train", "eval", "generate", NULL};
static const char *const v_prompt_format[] = {"auto", "text", "jsonl", NULL}; // = dsmoe_prompt_format
static const char *const v_tokenizer[] = {"auto", "bytes", "bpe", "ids", NULL}; // = dsmoe_tokenizer_kind
static const char *const v_selection[] = {"position", "random", NULL};
static const char *const v_noise[] = {"none", "jitter", "rsample", NULL}; // = dsmoe_noise_policy
static const char *const v_schedule[] = {"cosine", "constant", "linear", NULL};
const char *const dsmoe_config_v_source[] = {"synthetic", "text", "megatron", NULL};
static const char *const v_aux_scope[] = {"batch", "rank", NULL};                 // = dsmoe_aux_scope
static const char *const v_alltoall[] = {"flat", "hierarchical", "auto", NULL};   // = dsmoe_a2a_algo
static const char *const v_bind[] = {"auto", "cores", "none", NULL};                 // = dsmoe_bind_policy
static const char *const v_precision[] = {"fp32", "bf16", NULL};                     // = dsmoe_precision

#define FIELD(f) offsetof(dsmoe_config, f), sizeof(((dsmoe_config *)0)->f)
#define KEY(name, type, def, f, r, help) {name, type, def, FIELD(f), r, NULL, help}
#define ENUM(name, def, f, values, help) {name, K_ENUM, def, FIELD(f), ANY, values, help}

const key_def dsmoe_config_keys[] = {
    ENUM("run.mode", "train", mode, v_mode, "train, evaluate a checkpoint on the validation split, or generate text from a checkpoint"),
    KEY("run.seed", K_U64, "1234", seed, GE(0), "seed of every random stream (initialisation, data, noise)"),
    KEY("run.output_dir", K_STRING, "dsmoe_out", output_dir, ANY, "directory for metrics, checkpoints and resolved.deck"),
    KEY("run.threads", K_INT, "0", threads, GE(0), "compute threads per rank; 0 = OMP_NUM_THREADS, else one per core of the rank's binding (topology.bind), else 1; more than the binding's CPUs runs, with a warning"),
    ENUM("run.precision", "fp32", precision, v_precision,
         "fp32, or bf16: bfloat16 activations and GEMM operands with fp32 accumulation, fp32 master weights, "
         "gradients, optimizer state, gating, layer-norm statistics and loss (docs/precision.md)"),
    KEY("run.log_every", K_INT, "10", log_every, GE(1), "steps between progress lines"),
    KEY("run.kernel_backend", K_STRING, "cpu", kernel_backend, ANY, "expert-kernel plugin (libdsmoe_kernel_<name>.so)"),
    KEY("run.comm_backend", K_STRING, "mpi", comm_backend, ANY, "communication plugin (libdsmoe_comm_<name>.so)"),
    KEY("run.plugin_path", K_STRING, "", plugin_path, ANY, "extra plugin directories, ':'-separated"),
    KEY("run.fixed_order_sums", K_BOOL, "true", fixed_order_sums, ANY,
        "float32/float64 sums of a comm plugin that does not promise a fixed order (nccl) go through the core's "
        "rank-order path (data movement plus additions on the kernel plugin): the same bits in every run; false = "
        "the plugin's own sums (faster, not bitwise reproducible)"),
    KEY("run.watchdog", K_DURATION, "30min", watchdog, GE(0),
        "a rank that makes no progress this long (a peer stopped, hung or gone) ends the job with exit code 70, "
        "naming the step and phase; 0 = off"),
    KEY("run.signals", K_STRING, "USR1,TERM", signals, ANY,
        "signals that make every rank write a checkpoint at the next step boundary and exit with 75 (a generation: "
        "its finished completions; a second signal exits at once with 76): names from HUP INT QUIT USR1 USR2 TERM "
        "XCPU, comma-separated; '' = none"),

    KEY("model.vocab", K_INT, "256", vocab, GE(2), "vocabulary size (tokens 0 .. vocab-1)"),
    KEY("model.seq_len", K_INT, "128", seq_len, GE(1), "tokens per sequence (context length)"),
    KEY("model.layers", K_INT, "4", layers, GE(1), "transformer blocks"),
    KEY("model.hidden", K_INT, "128", hidden, GE(1), "model width; must be divisible by model.heads"),
    KEY("model.heads", K_INT, "4", heads, GE(1), "attention heads"),
    KEY("model.ffn_hidden", K_INT, "0", ffn_hidden, GE(0), "FFN and expert hidden width; 0 = 4*hidden"),
    KEY("model.init_std", K_FLOAT, "0.02", init_std, GT(0), "standard deviation of the normal weight initialisation"),
    KEY("model.ln_eps", K_FLOAT, "1e-5", ln_eps, GT(0), "LayerNorm epsilon"),

    KEY("moe.experts", K_EXPERTS, "0", experts, ANY,
        "experts per MoE layer: one count for every MoE layer, or a list of 'count xN' items whose total "
        "must equal the number of MoE layers; 0 = dense model"),
    KEY("moe.every", K_INT, "2", moe_every, GE(1), "layer i (1-based) is an MoE layer when i % every == 0"),
    KEY("moe.top_k", K_INT, "1", top_k, IN('[', 1, 2, ']'), "experts per token (top-1 or top-2 gating); <= every layer's experts"),
    KEY("moe.capacity_factor", K_FLOAT, "1.0", capacity_factor, GT(0), "expert capacity factor in training"),
    KEY("moe.eval_capacity_factor", K_FLOAT, "1.0", eval_capacity_factor, GT(0), "expert capacity factor in evaluation"),
    KEY("moe.min_capacity", K_INT, "4", min_capacity, GE(0), "smallest expert capacity"),
    KEY("moe.drop_tokens", K_BOOL, "true", drop_tokens, ANY, "drop tokens over capacity; false = dropless"),
    ENUM("moe.token_selection", "position", random_token_selection, v_selection,
         "which tokens an over-full expert keeps: position order, or random = Random Token Selection"),
    ENUM("moe.noise", "none", noise, v_noise, "gate noise in training: none, jitter (multiplicative on the gate input) or rsample (Gumbel)"),
    KEY("moe.jitter_eps", K_FLOAT, "0.01", jitter_eps, IN('(', 0, 1, ')'), "jitter noise: input scaled by U(1-eps, 1+eps)"),
    KEY("moe.aux_loss_coeff", K_FLOAT, "0.01", aux_loss_coeff, GE(0), "weight of the load-balancing loss"),
    KEY("moe.residual", K_BOOL, "false", residual, ANY,
        "Residual MoE: dense MLP + one expert mixed by a learned coefficient (PR-MoE with a pyramid "
        "experts list); requires top_k = 1"),
    KEY("moe.expert_parallel", K_EP_LIST, "1", expert_parallel, ANY,
        "ranks per expert-parallel group, per MoE layer like moe.experts (one value for every MoE layer, or "
        "'ep xN' items); each must divide the number of ranks and its layer's experts"),
    ENUM("moe.aux_loss_scope", "batch", aux_loss_scope, v_aux_scope, "tokens the load-balancing loss is computed over: batch = each micro-step's tokens on all ranks (the same loss on any number of ranks), rank = each rank's own tokens (DeepSpeed)"),
    ENUM("moe.alltoall", "auto", alltoall, v_alltoall, "expert all-to-all: flat, hierarchical (inside nodes, then across), or auto (hierarchical for small messages on several nodes; flat when the ranks are not node-contiguous)"),
    KEY("moe.ranks_per_node", K_INT, "0", ranks_per_node, GE(0), "ranks per node for the hierarchical all-to-all; 0 = the real nodes, > 0 pretends (tests)"),

    ENUM("topology.bind", "auto", bind, v_bind, "CPU binding of each rank: auto = keep a binding the launcher made (srun --cpu-bind, mpirun --bind-to), else bind each rank to its own cores spread over packages and NUMA nodes; cores = always bind dsmoe's way; none = leave it to the OS"),

    KEY("plan.nodes", K_INT, "1", plan_nodes, GE(1), "dsmoe --plan: nodes of the planned job, each like plan.topology"),
    KEY("plan.ranks_per_node", K_INT, "0", plan_ranks_per_node, GE(0), "dsmoe --plan: ranks per node; 0 = one per GPU of the topology (one per core when it has none or run.kernel_backend = cpu)"),
    KEY("plan.topology", K_STRING, "", plan_topology, ANY, "dsmoe --plan: the node: an hwloc XML file, synthetic:<hwloc synthetic description>, or '' = this machine (or HWLOC_XMLFILE / HWLOC_SYNTHETIC)"),
    KEY("plan.memory_per_rank", K_U64, "0", plan_memory_per_rank, GE(0), "dsmoe --plan: bytes each rank may use (80Gi); 0 = its GPU's memory (unknown for a GPU backend on a topology without GPUs: set this), or the node's memory / ranks per node on a host-memory backend"),
    KEY("plan.memory_bandwidth", K_U64, "0", plan_memory_bandwidth, GE(0), "dsmoe --plan of a generate deck: bytes/s a rank reads from its memory; 0 = 2T for a GPU rank, 10G for a CPU core"),
    KEY("plan.node_bandwidth", K_U64, "0", plan_node_bandwidth, GE(0), "dsmoe --plan of a generate deck: bytes/s a rank sends to ranks of its node; 0 = 150G for GPU ranks (NVLink), 5G for CPU ranks"),
    KEY("plan.network_bandwidth", K_U64, "0", plan_network_bandwidth, GE(0), "dsmoe --plan of a generate deck: bytes/s a rank sends to other nodes; 0 = 25G (one 200 Gb/s port per GPU)"),
    KEY("plan.node_latency", K_FLOAT, "2e-6", plan_node_latency, GE(0), "dsmoe --plan of a generate deck: seconds per message inside a node"),
    KEY("plan.network_latency", K_FLOAT, "5e-6", plan_network_latency, GE(0), "dsmoe --plan of a generate deck: seconds per message between nodes"),

    KEY("train.steps", K_INT, "100", steps, GE(0), "optimizer steps"),
    KEY("train.batch", K_INT, "8", batch, GE(1), "global batch: sequences per optimizer step over all ranks"),
    KEY("train.micro_batch", K_INT, "0", micro_batch, GE(0), "sequences per rank per forward/backward; 0 = batch / ranks"),
    KEY("train.lr", K_FLOAT, "3e-4", lr, GE(0), "peak learning rate"),
    KEY("train.min_lr", K_FLOAT, "0", min_lr, GE(0), "learning rate at the end of the decay; <= train.lr"),
    KEY("train.warmup_steps", K_INT, "0", warmup_steps, GE(0), "steps of linear warm-up from 0 to train.lr"),
    ENUM("train.lr_schedule", "cosine", lr_schedule, v_schedule, "decay after warm-up"),
    KEY("train.decay_steps", K_INT, "0", decay_steps, GE(0), "step at which the decay reaches min_lr; 0 = steps"),
    KEY("train.beta1", K_FLOAT, "0.9", beta1, IN('[', 0, 1, ')'), "AdamW beta1"),
    KEY("train.beta2", K_FLOAT, "0.95", beta2, IN('[', 0, 1, ')'), "AdamW beta2"),
    KEY("train.adam_eps", K_FLOAT, "1e-8", adam_eps, GT(0), "AdamW epsilon"),
    KEY("train.weight_decay", K_FLOAT, "0.1", weight_decay, GE(0), "AdamW decoupled weight decay (weights only)"),
    KEY("train.grad_clip", K_FLOAT, "1.0", grad_clip, GE(0), "global gradient-norm clip; 0 = off"),
    KEY("train.zero_stage", K_INT, "0", zero_stage, IN('[', 0, 1, ']'), "ZeRO stage: 0 = every rank keeps the whole AdamW state; 1 = it is sharded over the data-parallel ranks (expert state over the expert-data-parallel group)"),
    KEY("train.overlap_grad_reduce", K_BOOL, "true", overlap_grad_reduce, ANY, "start each block's gradient all-reduce during the backward of a step's last micro-batch (same bits as false)"),
    KEY("train.eval_every", K_INT, "0", eval_every, GE(0), "steps between validation passes; 0 = only at the end"),
    KEY("train.eval_batches", K_INT, "4", eval_batches, GE(1), "global batches per validation pass"),
    KEY("train.profile", K_BOOL, "false", train_profile, ANY, "time every kernel op and collective of the steps after the first, by call site (a wait before and after each call: slower, nothing overlaps); at the end rank 0 prints the table (mean, min and max over the ranks) and writes every rank's rows to <run.output_dir>/profile.tsv"),

    ENUM("data.source", "synthetic", data_source, dsmoe_config_v_source, "synthetic corpus, text files, or a Megatron indexed dataset"),
    KEY("data.path", K_STRING, "", data_path, ANY, "text files (comma-separated) or Megatron prefix(es); required for text and megatron"),
    KEY("data.valid_fraction", K_FLOAT, "0.05", valid_fraction, IN('[', 0, 0.5, ']'), "share of the data held out for validation"),
    KEY("data.synthetic_sources", K_INT, "4", synthetic_sources, GE(1), "synthetic corpus: source tokens; < model.vocab / 2"),
    KEY("data.synthetic_branching", K_INT, "4", synthetic_branching, GE(1),
        "synthetic corpus: successors per token; <= model.vocab - data.synthetic_sources"),
    KEY("data.seed", K_U64, "0", data_seed, GE(0), "seed of the data order and synthetic corpus; 0 = run.seed"),

    KEY("checkpoint.every", K_INT, "0", checkpoint_every, GE(0), "steps between checkpoints; 0 = only the final one"),
    KEY("checkpoint.keep", K_INT, "2", checkpoint_keep, GE(1), "newest checkpoints kept"),
    KEY("checkpoint.dir", K_STRING, "", checkpoint_dir, ANY, "'' = <run.output_dir>/checkpoints"),
    KEY("checkpoint.resume", K_STRING, "", resume, ANY,
        "'' = fresh start, auto = newest checkpoint in checkpoint.dir if any, or a file path; a fresh start "
        "or a file refuses a checkpoint.dir that holds later checkpoints"),
    KEY("checkpoint.final", K_BOOL, "true", checkpoint_final, ANY, "write a checkpoint at the end"),
    KEY("checkpoint.allow_seed_change", K_BOOL, "false", allow_seed_change, ANY,
        "resume a checkpoint written with another run.seed (the data order and noise then change); false = refused"),
    KEY("checkpoint.max_failures", K_INT, "3", checkpoint_max_failures, GE(1),
        "failed saves in a row that end the run (exit 74); a failed final save always does"),

    KEY("metrics.file", K_STRING, "", metrics_file, ANY, "'' = <run.output_dir>/metrics.csv (eval.csv with run.mode = eval)"),

    KEY("distill.teacher", K_STRING, "", distill_teacher, ANY,
        "knowledge distillation from a teacher (Mixture-of-Students, docs/distill.md): the teacher's dsmoe "
        "checkpoint; '' = off"),
    KEY("distill.teacher_deck", K_STRING, "", distill_teacher_deck, ANY,
        "the teacher's deck; '' = the deck stored in the teacher checkpoint"),
    KEY("distill.temperature", K_FLOAT, "1.0", distill_temperature, GT(0),
        "softmax temperature T of both models' logits in the distillation term"),
    KEY("distill.alpha", K_FLOAT, "1.0", distill_alpha, GE(0),
        "weight of the cross-entropy with the data while distilling"),
    KEY("distill.beta", K_FLOAT, "1.0", distill_beta, GE(0),
        "weight of the distillation term T^2 KL(softmax(teacher/T) || softmax(student/T))"),
    KEY("distill.stop_step", K_INT, "0", distill_stop_step, GE(0),
        "staged distillation: the last step that distils; later steps train on the plain loss; 0 = every step"),
    KEY("distill.init_layers", K_STRING, "", distill_init_layers, ANY,
        "start the student from the teacher: the teacher block (0-based) of each student block, comma-separated, "
        "one per model.layers (embeddings and final layer norm copied too); '' = from scratch"),

    KEY("generate.prompts", K_STRING, "", gen_prompts, ANY, "run.mode = generate: the prompt file (text lines or JSON lines)"),
    ENUM("generate.prompt_format", "auto", gen_prompt_format, v_prompt_format,
         "auto = jsonl for a .jsonl or .json file, else text; text = one prompt a line; jsonl = one JSON object a line"),
    KEY("generate.output", K_STRING, "", gen_output, ANY, "'' = <run.output_dir>/generations.jsonl"),
    ENUM("generate.tokenizer", "auto", gen_tokenizer, v_tokenizer,
         "auto = bpe when generate.vocab_file is set, else bytes when model.vocab >= 256, else ids; bpe = GPT-2 "
         "byte-level BPE; ids = no text: prompts as token ids (JSON lines' \"tokens\"), completions as ids"),
    KEY("generate.vocab_file", K_STRING, "", gen_vocab_file, ANY, "GPT-2 BPE vocab.json"),
    KEY("generate.merges_file", K_STRING, "", gen_merges_file, ANY, "GPT-2 BPE merges.txt"),
    KEY("generate.batch", K_INT, "8", gen_batch, GE(1), "sequences each rank decodes together (continuous batching)"),
    KEY("generate.prefill_tokens", K_INT, "256", gen_prefill_tokens, GE(1), "prompt tokens each rank prefills per step (longer prompts take several steps)"),
    KEY("generate.max_new_tokens", K_INT, "64", gen_max_new_tokens, GE(1), "tokens generated per prompt unless it says otherwise"),
    KEY("generate.temperature", K_FLOAT, "0", gen_temperature, GE(0), "sampling temperature; 0 = greedy"),
    KEY("generate.top_k", K_INT, "0", gen_top_k, GE(0), "sample from the k most likely tokens; 0 = all"),
    KEY("generate.top_p", K_FLOAT, "1.0", gen_top_p, IN('(', 0, 1, ']'), "nucleus sampling: the smallest set of tokens with this much probability"),
    KEY("generate.seed", K_U64, "0", gen_seed, GE(0), "seed of the sampling streams (each prompt's own, by its index); 0 = run.seed"),
    KEY("generate.stop", K_STRING, "", gen_stop, ANY, "a stop sequence for every prompt (C escapes \\n \\t \\\\); '' = none"),
    KEY("generate.eos_token", K_INT, "-1", gen_eos_token, GE(-1),
        "the token id that ends a completion (finish_reason eos); -1 = the tokenizer's: <|endoftext|> of a BPE "
        "vocab.json, none for bytes and ids"),
    KEY("generate.context", K_INT, "0", gen_context, GE(0), "context limit: prompt + completion tokens; 0 = model.seq_len"),
    KEY("generate.capacity_factor", K_FLOAT, "0", gen_capacity_factor, GE(0), "expert capacity factor while generating; 0 = no token is dropped"),
    KEY("generate.profile", K_BOOL, "true", gen_profile, ANY, "time breakdown (attention, gating, all-to-all, experts, other): a wait after each part"),
    KEY("generate.tensor_parallel", K_INT, "1", gen_tensor_parallel, GE(1),
        "tensor-slicing width: the attention heads and the dense FFN of every block are split over this many "
        "consecutive ranks (Megatron style); must divide the ranks, model.heads and model.ffn_hidden"),
    KEY("generate.coordinated_alltoall", K_BOOL, "true", gen_coordinated, ANY,
        "with tensor slicing: each tensor rank sends only its share of the tokens through the MoE layers' "
        "all-to-all, then the tensor group all-gathers them (DeepSpeed-MoE's parallelism-coordinated all-to-all)"),
    KEY("generate.expert_slicing", K_BOOL, "false", gen_expert_slicing, ANY,
        "with tensor slicing: split every expert's FFN over the tensor group too (model.ffn_hidden / "
        "generate.tensor_parallel columns each, the partial outputs summed), instead of the coordinated all-to-all"),
    KEY("generate.resume", K_BOOL, "false", gen_resume, ANY,
        "continue a generation a run.signals signal stopped: keep the prompts finished in <output>.partial, "
        "generate the others with the stopped run's checkpoint (checkpoint.resume = auto takes it)"),
    KEY("generate.save_every", K_DURATION, "0", gen_save_every, GE(0),
        "seconds between saves of the finished completions to <output>.partial, for generate.resume after a "
        "crash or a kill; 0 = only when a run.signals signal stops the run"),
};
const int dsmoe_config_n_keys = (int)(sizeof dsmoe_config_keys / sizeof dsmoe_config_keys[0]);
_Static_assert(sizeof dsmoe_config_keys / sizeof dsmoe_config_keys[0] <= DSMOE_CONFIG_MAX_KEYS,
               "more keys than DSMOE_CONFIG_MAX_KEYS: raise it in config_keys.h");
