#!/usr/bin/env bash
# Swapping comm backends without a rebuild, end to end (docs/nccl.md): the same dsmoe binary trains the
# same deck with run.comm_backend = mpi and with ncclsim (the nccl plugin's own code over the NCCL test
# double: stream-ordered, its collectives run from the kernel queue), and with ncclsim under the strict
# kernel plugin (deferred queues, memory closed while work on it is queued: the ordering a GPU would
# have), and with mpi_cuda (device buffers straight to a CUDA-aware MPI, here a test double of one). The double adds floats from the last rank down (DSMOE_NCCLSIM_SUM_ORDER=reverse), another order
# than the mpi plugin's rank order, as NCCL's algorithms may; ncclsim does not declare
# DSMOE_CCAP_DETERMINISTIC, so with run.fixed_order_sums (the default) the core adds in rank order itself
# (core/plugins/comm_ordered.c) and the metrics must be the same bytes as mpi's, timing columns aside. With
# run.fixed_order_sums = false the plugin's own sums are used, and on 4 ranks the metrics must differ
# (the check would see it if the core's path were not taken).
# Then failure: one rank of an ncclsim run stopped (SIGSTOP, a peer that hangs with its connections
# open) must end the other within seconds with a message: the plugin's when it waited in a collective,
# the core's watchdog's when it waited between steps; one killed (SIGKILL) must end the job within seconds.
# Usage: comm_swap_test.sh <dsmoe> <test plugin dir> <mpiexec> [mpiexec flags ...]
set -u
dsmoe=$1
plugins=$2
mpiexec=$3
shift 3
mpiflags=("$@")
work=$(mktemp -d /tmp/dsmoe_comm_swap.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
unset DSMOE_PLUGIN_PATH
export OMP_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1 OMP_WAIT_POLICY=passive
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export DSMOE_NCCLSIM_SUM_ORDER=reverse # the mpi plugin does not read it
source "$(dirname "${BASH_SOURCE[0]}")/../cli/lib.sh" # fail, ok, show, finish

deck="$work/small.deck"
cat >"$deck" <<DECK
[run]
seed = 7
log_every = 2
[model]
vocab = 64
seq_len = 32
layers = 4
hidden = 64
heads = 4
[moe]
experts = 4
every = 2
top_k = 2
capacity_factor = 1.25
[train]
steps = 12
batch = 8
lr = 3e-3
warmup_steps = 2
eval_every = 6
eval_batches = 1
[data]
synthetic_sources = 4
synthetic_branching = 4
[checkpoint]
every = 0
DECK

# train <name> <ranks> key=value...: one run into $work/<name>, with the variables of train_env.
train_env=()
train() {
  local name=$1 ranks=$2
  shift 2
  timeout -k 5 240 env "${train_env[@]}" "$mpiexec" "${mpiflags[@]}" -n "$ranks" "$dsmoe" "$deck" run.output_dir="$work/$name" \
    run.plugin_path="$plugins" "$@" >"$work/$name.log" 2>&1 ||
    { fail "$name: exit $?"; show "$work/$name.log"; return 1; }
}

# metrics_sans_timing <metrics.csv>: the file without its timing columns (tokens_per_s, elapsed_s).
metrics_sans_timing() {
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) skip[i] = ($i == "tokens_per_s" || $i == "elapsed_s") }
           { line = ""; for (i = 1; i <= NF; i++) if (!skip[i]) line = line $i ","; print line }' "$1"
}

# same <name> <reference>: the same metrics, every step present in both.
same() {
  local a="$work/$1/metrics.csv" b="$work/$2/metrics.csv"
  [ -f "$a" ] && [ -f "$b" ] || { fail "$1 vs $2: a metrics.csv is missing"; return; }
  [ "$(wc -l <"$b")" -gt 6 ] || { fail "$2: fewer metrics rows than steps logged"; return; }
  if diff <(metrics_sans_timing "$a") <(metrics_sans_timing "$b") >"$work/$1.diff"; then ok
  else fail "$1 differs from $2 (timing columns aside):"; head -6 "$work/$1.diff"; fi
}

# 2 ranks: 2 experts each (all-to-all), dense weights data-parallel (all-reduce), ZeRO-1 (reduce-scatter,
# all-gather). 4 ranks: expert-data-parallel pairs too, and the hierarchical all-to-all over 2 pretend nodes.
two=(moe.expert_parallel=2 train.zero_stage=1)
four=(moe.expert_parallel=2 train.zero_stage=1 moe.alltoall=hierarchical moe.ranks_per_node=2)
train mpi2 2 "${two[@]}" run.comm_backend=mpi
train nccl2 2 "${two[@]}" run.comm_backend=ncclsim && same nccl2 mpi2
train strict_nccl2 2 "${two[@]}" run.comm_backend=ncclsim run.kernel_backend=strict && same strict_nccl2 mpi2
train mpi4 4 "${four[@]}" run.comm_backend=mpi
train nccl4 4 "${four[@]}" run.comm_backend=ncclsim && same nccl4 mpi4
if train nccl4_own 4 "${four[@]}" run.comm_backend=ncclsim run.fixed_order_sums=false; then
  if diff -q <(metrics_sans_timing "$work/nccl4_own/metrics.csv") <(metrics_sans_timing "$work/mpi4/metrics.csv") \
    >/dev/null; then fail "nccl4_own: the plugin's reverse-order sums gave mpi's metrics: the check cannot see the order"
  else ok; fi
fi
# The CUDA-aware mode: mpi_cuda under the test double of a CUDA-aware MPI (preloaded: it says yes to
# MPIX_Query_cuda_support), on strict declaring device memory that stays closed to the host except inside
# that MPI's collectives. Device buffers go straight to MPI, no host staging; MPI's sums are in its own
# order, so the core's fixed-order sums are in front.
train_env=(LD_PRELOAD="$plugins/libdsmoe_fake_cuda_aware_mpi.so" OMPI_MCA_btl_vader_single_copy_mechanism=none
           DSMOE_STRICT_MEM_KIND=device DSMOE_STRICT_ALWAYS_CLOSED=1)
train strict_cuda_mpi4 4 "${four[@]}" run.comm_backend=mpi_cuda run.kernel_backend=strict && same strict_cuda_mpi4 mpi4
train_env=()
# Without the double, this machine's MPI is not CUDA-aware: every rank refuses mpi_cuda at start-up, so the
# error is collective: printed once (rank 0), exit status 1, no MPI_Abort.
timeout -k 5 60 "$mpiexec" "${mpiflags[@]}" -n 2 "$dsmoe" "$deck" run.output_dir="$work/refused" \
  run.plugin_path="$plugins" run.comm_backend=mpi_cuda >"$work/refused.log" 2>&1
rc=$?
if [ $rc = 1 ] && [ "$(grep -c "^dsmoe: error: comm plugin 'mpi_cuda' (.*): init failed: .* is not CUDA-aware" \
  "$work/refused.log")" = 1 ] && ! grep -q "error on rank\|MPI_ABORT" "$work/refused.log"; then ok
else fail "mpi_cuda on an MPI that is not CUDA-aware: exit $rc, expected 1 and the refusal printed once"
  show "$work/refused.log"; fi
# Each run says which plugin it loaded (the swap happened, not a fallback), and whose sums it uses.
grep -q "comm ncclsim ($plugins/libdsmoe_comm_ncclsim.so; float sums in the core's fixed rank order" "$work/nccl2.log" &&
  ok || fail "nccl2's log does not name $plugins/libdsmoe_comm_ncclsim.so with the core's fixed-order sums"
grep -q "comm ncclsim ($plugins/libdsmoe_comm_ncclsim.so)" "$work/nccl4_own.log" && ok ||
  fail "nccl4_own's log does not name $plugins/libdsmoe_comm_ncclsim.so alone"
grep -q "comm mpi_cuda ([^;]*/libdsmoe_comm_mpi_cuda.so; float sums in the core's fixed rank order" \
  "$work/strict_cuda_mpi4.log" && ok ||
  fail "strict_cuda_mpi4's log does not name libdsmoe_comm_mpi_cuda.so, without staging, with the core's sums"

# ------------------------------------------------------------------------------------------------
# failure: a long ncclsim run on 2 ranks, one rank stopped or killed after a few steps

# start_long <name>: in the background, each rank's pid in $work/<name>.pid.<rank>; sets $pid.
start_long() {
  local name=$1
  DSMOE_NCCLSIM_TIMEOUT=2 "$mpiexec" "${mpiflags[@]}" -n 2 bash -c 'echo $$ >"$0.pid.$OMPI_COMM_WORLD_RANK"; exec "$@"' \
    "$work/$name" "$dsmoe" "$deck" run.output_dir="$work/$name" run.plugin_path="$plugins" run.comm_backend=ncclsim \
    moe.expert_parallel=2 train.steps=100000 run.log_every=1 train.eval_every=0 run.watchdog=8 >"$work/$name.log" 2>&1 &
  pid=$!
}

# ends_within <seconds>: waits for $pid to end; sets $rc and $took (seconds); 1 if it did not end.
ends_within() {
  local t0=$SECONDS
  for _ in $(seq $(($1 * 10))); do
    if ! kill -0 $pid 2>/dev/null; then
      wait $pid
      rc=$?
      took=$((SECONDS - t0))
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# rows <name> <n>: until the run has logged n steps (60 s at most).
rows() {
  for _ in $(seq 600); do
    [ -f "$work/$1/metrics.csv" ] && [ "$(wc -l <"$work/$1/metrics.csv")" -gt "$2" ] && return 0
    sleep 0.1
  done
  return 1
}

for how in STOP KILL; do
  name=fail_$how
  start_long $name
  if ! rows $name 3; then fail "$name: no steps logged"; kill -KILL $pid; wait $pid; show "$work/$name.log"; continue; fi
  victim=$(cat "$work/$name.pid.1")
  kill -"$how" "$victim"
  # STOP: where the survivor waits decides who notices. In an NCCL collective: the double's 2 s turn
  # into NCCL's asynchronous error, the plugin's watchdog thread (100 ms) aborts the communicators and
  # the core ends the job with the plugin's message. In the core's host-side statistics (MPI on the
  # control plane, between steps): the core's run.watchdog (8 s here) ends it. Either way, a message.
  if ends_within 30; then
    if [ "$rc" = 0 ]; then fail "$name: the job exited 0 after rank 1 was sent SIG$how"; else ok; fi
    if [ $how = STOP ]; then
      if grep -Eq "error on rank 0 of 2: comm plugin 'ncclsim'.*communicator of this process was aborted" "$work/$name.log"; then
        ok; echo "$name: ended by the nccl plugin's abort"
      elif grep -Eq 'watchdog: rank 0 made no progress for [0-9]+ s in "[a-z ]+" of step [0-9]+' "$work/$name.log"; then
        ok; echo "$name: ended by the core's watchdog (rank 0 waited outside the plugin)"
      else fail "$name: neither the plugin's abort message nor the watchdog's from the surviving rank"; show "$work/$name.log"; fi
    fi
    echo "$name: the job ended ${took}s after rank 1 was sent SIG$how (exit $rc)"
  else
    fail "$name: the job still runs 30 s after rank 1 was sent SIG$how"
    show "$work/$name.log"
    kill -KILL $pid
    wait $pid
  fi
  kill -CONT "$victim" 2>/dev/null
  kill -KILL "$victim" 2>/dev/null
done

finish comm_swap
