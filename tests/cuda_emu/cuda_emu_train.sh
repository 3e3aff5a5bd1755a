#!/usr/bin/env bash
# Training on the cuda plugin run by the CUDA emulator (tests/cuda_emu/: the plugin's own code, its kernels
# as host fibers) against the cpu plugin: the same deck with run.kernel_backend = cuda and cpu must give
# the same losses, aux losses and gradient norms to 1e-4 relative in float32 (the cuda plugin's GEMMs,
# reductions and fused multiply-adds round differently, so not bitwise) and 3e-2 in bfloat16, on 1 rank
# and on 2 ranks sharing the emulated device; a checkpoint written by the cuda plugin resumes on cpu and
# the reverse, ending where the uninterrupted run ends. The same multi-rank runs over the nccl plugin built
# for the emulator (tests/plugins/comm/nccl_emu.cmake: device buffers straight to the plugin, no host staging)
# must give the very bits of cuda over mpi (host staging): both add floats in the core's fixed rank order.
# 4 ranks add the hierarchical all-to-all. With kernel.cuda.fused_epilogues (cuBLASLt's epilogues) and
# kernel.cuda.attention_tensor_cores (WMMA) the cpu plugin's losses again. The emulator defers each stream's work until it is needed
# (tests/cuda_emu/emu_streams.h), except in the nccl runs, whose NCCL double ignores streams.
# usage: cuda_emu_train.sh <dsmoe> <directory of the emulated libdsmoe_kernel_cuda.so> <mpiexec> [flags...]
set -u
dsmoe=$1 emudir=$2
shift 2
mpiexec=("$@")
work=$(mktemp -d /tmp/dsmoe_cuda_emu.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
source "$(dirname "${BASH_SOURCE[0]}")/../cli/lib.sh" # fail, ok, show, finish
passed() { echo "ok: $*"; ok; }

if [ ! -f "$emudir/libdsmoe_kernel_cuda.so" ]; then echo "skip: no emulated cuda plugin in $emudir"; exit 77; fi

deck="$work/e.deck"
cat > "$deck" <<DECK
[run]
log_every = 1
[model]
vocab = 32
seq_len = 16
layers = 4
hidden = 32
heads = 2
[moe]
experts = 8
every = 2
capacity_factor = 1.0
min_capacity = 2
[train]
steps = 6
batch = 8
lr = 3e-3
warmup_steps = 1
eval_every = 3
eval_batches = 1
[data]
synthetic_sources = 2
synthetic_branching = 2
[checkpoint]
every = 3
keep = 3
final = true
DECK

# run <name> <ranks> [key=value ...]: the emulated plugin is found first (DSMOE_PLUGIN_PATH), so
# run.kernel_backend = cuda loads it; cpu is found in the build tree as always.
run() {
  local name=$1 n=$2
  shift 2
  if ! "${mpiexec[@]}" -n "$n" -x DSMOE_PLUGIN_PATH="$emudir" -x DSMOE_EMU_STREAMS="${EMU_STREAMS:-deferred}" \
    "$dsmoe" "$deck" run.output_dir="$work/$name" "$@" \
    > "$work/$name.log" 2>&1; then
    fail "$name: dsmoe on $n ranks failed"; show "$work/$name.log"; return 1
  fi
}

# close <a metrics.csv> <b metrics.csv> <relative tolerance>: loss, aux_loss and grad_norm of every row,
# and valid_loss where both have it; prints the largest relative difference, fails past the tolerance.
close() {
  awk -F, -v tol="$3" '
    FNR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    NR == FNR { a[FNR] = $0; next }
    { split(a[FNR], x, ","); n++
      split("loss aux_loss grad_norm valid_loss", names, " ")
      for (j in names) { c = col[names[j]]; if (!c || x[c] == "" || $c == "") continue
        d = x[c] - $c; if (d < 0) d = -d; s = x[c] < 0 ? -x[c] : x[c]; r = s > 0 ? d / s : d
        if (r > worst) { worst = r; where = names[j] " at row " FNR } } }
    END { if (n == 0) { print "no rows"; exit 1 }
          printf "%d steps, largest relative difference %.3g (%s)\n", n, worst, where; exit worst > tol }' "$1" "$2"
}

# same <name> <ranks> <tolerance> [key=value ...]: cpu against the emulated cuda plugin, both over mpi.
# With NCCL_TOO=1 the cuda run is repeated over the emulator's nccl plugin (cuda_nccl_<name>), which must
# give the same metrics bit for bit, timing aside.
same() {
  local name=$1 n=$2 tol=$3
  shift 3
  run "cpu_$name" "$n" run.kernel_backend=cpu "$@" && run "cuda_$name" "$n" run.kernel_backend=cuda "$@" || return
  grep -q 'dsmoe CUDA emulator' "$work/cuda_$name.log" ||
    { fail "$name: the cuda run did not load the emulator"; return; }
  local r what="$name on $n rank(s), cuda (emulated) vs cpu"
  r=$(close "$work/cpu_$name/metrics.csv" "$work/cuda_$name/metrics.csv" "$tol") && passed "$what: $r" || fail "$what: $r"
  [ "${NCCL_TOO:-0}" = 1 ] || return 0
  # The double's calls ignore streams: the emulator's must have finished their work (tests/plugins/comm/nccl_emu.cmake).
  EMU_STREAMS=immediate run "cuda_nccl_$name" "$n" run.kernel_backend=cuda "$@" run.comm_backend=nccl &&
    unstaged_nccl "cuda_nccl_$name" || return
  if diff <(metrics_sans_timing "$work/cuda_nccl_$name/metrics.csv") <(metrics_sans_timing "$work/cuda_$name/metrics.csv") \
    > "$work/cuda_nccl_$name.diff"; then passed "$name on $n ranks: cuda over nccl (unstaged) = cuda over mpi (staged), every bit"
  else fail "$name: cuda over nccl differs from cuda over mpi:"; head -4 "$work/cuda_nccl_$name.diff"; fi
}

# unstaged_nccl <run>: the run paired cuda and nccl as on a GPU: the emulator's nccl plugin, the core's
# fixed-order sums, no host staging.
unstaged_nccl() {
  grep -q "comm nccl ($emudir/libdsmoe_comm_nccl.so; float sums in the core's fixed rank order" "$work/$1.log" &&
    ! grep -q 'pinned host staging' "$work/$1.log" && return 0
  fail "$1: the log does not name $emudir/libdsmoe_comm_nccl.so, unstaged, with the core's fixed-order sums"
  return 1
}

# metrics_sans_timing <metrics.csv>: the file without its timing columns (tokens_per_s, elapsed_s).
metrics_sans_timing() {
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) skip[i] = ($i == "tokens_per_s" || $i == "elapsed_s") }
           { line = ""; for (i = 1; i <= NF; i++) if (!skip[i]) line = line $i ","; print line }' "$1"
}

same base 1 1e-4
same residual_rts 1 1e-4 moe.residual=true moe.token_selection=random
same dropless_top2_jitter 1 1e-4 moe.drop_tokens=false moe.top_k=2 moe.noise=jitter
same bf16 1 3e-2 run.precision=bf16
# 2 ranks with ep 2 sharing the one device (over mpi) give the losses of 1 rank: dropless, so that capacity
# per rank drops no other tokens; the jitter's keys do not depend on the layout.
if run cuda_dropless_ep2 2 run.kernel_backend=cuda moe.drop_tokens=false moe.top_k=2 moe.noise=jitter \
  moe.expert_parallel=2; then
  r=$(close "$work/cuda_dropless_top2_jitter/metrics.csv" "$work/cuda_dropless_ep2/metrics.csv" 1e-4) &&
    passed "dropless top-2 + jitter, cuda: 2 ranks with ep 2 on the one device = 1 rank: $r" ||
    fail "dropless top-2 + jitter, cuda, 2 ranks with ep 2 against 1 rank: $r"
fi
# Two ranks share the one emulated device, as ranks share a GPU over the mpi comm plugin (host staging),
# and then over nccl (which on a GPU wants a device per rank; the double does not).
# The double adds floats from the last rank down, which on 4 ranks gives other bits than mpi's rank order
# (the mpi plugin does not read the variable): every bit the same shows that the core's fixed-order sums,
# done by the cuda plugin's own kernels on device memory, were used.
export DSMOE_NCCLSIM_SUM_ORDER=reverse
NCCL_TOO=1
same ep2_zero1 2 1e-4 moe.expert_parallel=2 train.zero_stage=1
same bf16_ep2_zero1 2 3e-2 run.precision=bf16 moe.expert_parallel=2 train.zero_stage=1
# 4 ranks: expert-data-parallel pairs and the hierarchical all-to-all over 2 pretend nodes.
same hier4 4 1e-4 moe.expert_parallel=2 train.zero_stage=1 moe.alltoall=hierarchical moe.ranks_per_node=2
NCCL_TOO=0

# Plugin settings that change kernels, against the cpu runs above: kernel.cuda.fused_epilogues (the expert
# GEMMs through the emulated cuBLASLt's epilogues, which write every capacity row; ep 2 gives 2 rounds of
# weights per grouped call) and kernel.cuda.attention_tensor_cores (bfloat16 attention on the emulated
# WMMA; D = 16 here).
# variant <setting> <log words> <name> <ranks> <tolerance> [key=value ...]
variant() {
  local setting=$1 words=$2 name=$3 n=$4 tol=$5 r
  shift 5
  run "${setting}_$name" "$n" run.kernel_backend=cuda "kernel.cuda.$setting=true" "$@" || return
  grep -q "$words" "$work/${setting}_$name.log" ||
    { fail "$setting $name: the log does not say '$words'"; return; }
  r=$(close "$work/cpu_$name/metrics.csv" "$work/${setting}_$name/metrics.csv" "$tol") &&
    passed "$name on $n rank(s), cuda with $setting vs cpu: $r" || fail "$setting $name: $r"
}
variant fused_epilogues 'expert GEMM epilogues fused (cuBLASLt)' base 1 1e-4
variant fused_epilogues 'expert GEMM epilogues fused (cuBLASLt)' bf16 1 3e-2 run.precision=bf16
variant fused_epilogues 'expert GEMM epilogues fused (cuBLASLt)' ep2_zero1 2 1e-4 moe.expert_parallel=2 train.zero_stage=1
variant attention_tensor_cores 'bf16 attention on tensor cores' bf16 1 3e-2 run.precision=bf16
variant attention_tensor_cores 'bf16 attention on tensor cores' bf16_ep2_zero1 2 3e-2 run.precision=bf16 \
  moe.expert_parallel=2 train.zero_stage=1

# Resume across plugins: the step-3 checkpoint of one plugin, resumed on the other, ends (step 6) where
# the uninterrupted run of the first ends.
for pair in cuda:cpu cpu:cuda; do
  from=${pair%%:*} to=${pair##*:}
  src="$work/${from}_base/checkpoints/step_00000003.safetensors"
  [ -f "$src" ] || { fail "resume $from -> $to: no step-3 checkpoint from $from"; continue; }
  mkdir -p "$work/resume_$from$to/checkpoints" && cp "$src" "$work/resume_$from$to/checkpoints/"
  run "resume_$from$to" 1 run.kernel_backend="$to" checkpoint.resume=auto || continue
  grep -q 'resum' "$work/resume_$from$to.log" || { fail "resume $from -> $to: the run did not resume"; continue; }
  # the resumed run's metrics hold steps 4-6: compare them with those rows of the uninterrupted run
  r=$(close <(sed -n '1p;5,$p' "$work/${from}_base/metrics.csv") "$work/resume_$from$to/metrics.csv" 1e-4) &&
    passed "a $from checkpoint resumed on $to ends where $from ends: $r" || fail "resume $from -> $to: $r"
done

finish cuda_emu_train
