#!/usr/bin/env bash
# The v1 kernel adapter end to end: trains inputs/ci-short.deck (kept tiny by overrides, with
# checkpoints) once with the cpu plugin of ABI 1 (tests/plugins/loader/cpu_v1, run through
# core/plugins/kernel_adapt_v1.c) and once with the cpu plugin of this tree (ABI 3), for top-1 and top-2
# gating and for residual MoE with jitter noise and random token selection, and asserts that the runs agree to the last bit: every metrics column but the timings, as
# text, and every checkpoint byte for byte. The deck drops tokens, so the ABI-3 run routes with the fused
# `gate` and the ABI-1 run with route + assign: this also shows that the core's two gating paths agree.
#
# Both runs use the same deck, overrides and output directory (one after the other), so the resolved
# configuration stored in the checkpoints is the same text: the v1 plugin is chosen by DSMOE_PLUGIN_PATH
# (not a deck key), and its file is named libdsmoe_kernel_cpu.so like the ABI-3 one. Where the files still
# differ, the script says whether the tensor data or only the stored deck differs (the ABI-3 plugin's own
# settings, e.g. [kernel.cpu] poison, may appear in the resolved configuration; the v1 plugin has none):
# the tensor data and every other header byte must be identical in any case.
#
# The ABI-3 plugin runs with its setting small_rows = 0 (through the environment, which leaves the deck
# text alike): its default computes GEMMs of up to 8 rows as dot products, whose last bits differ from
# the OpenBLAS tiles that v1 used for them.
#
# The v1 comm adapter likewise: 2 ranks with expert parallelism 2, without and with ZeRO-1 (the
# all-to-alls, the gradients' allreduce, ZeRO-1's allgather of the parameters), once with the mpi plugin
# of ABI 1 (tests/plugins/loader/mpi_v1, through core/plugins/comm_adapt_v1.c) and once with this tree's:
# both add floats in rank order, so the runs must agree to the last bit too. (The core calls no
# reduce_scatter; the adapter's, composed from v1's allreduce, is held to the conformance suite by
# test_comm_mpiv1_np*.)
#
# Usage: v1_adapter_test.sh <dsmoe binary> <source dir> <dir of the v1 libdsmoe_kernel_cpu.so>
#        [<dir of the v1 libdsmoe_comm_mpi.so> <mpiexec> [mpiexec flags...]]
set -u
dsmoe=$1
src=$2
v1dir=$3
commv1dir=${4:-}
mpiexec=()
[ $# -ge 5 ] && mpiexec=("${@:5}")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
work=$(mktemp -d /tmp/dsmoe_v1adapt.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
unset DSMOE_PLUGIN_PATH
failures=0
pass=0

fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { pass=$((pass + 1)); }

if [ ! -f "$v1dir/libdsmoe_kernel_cpu.so" ]; then
  echo "FAIL: no $v1dir/libdsmoe_kernel_cpu.so (build the target dsmoe_kernel_cpuv1)"
  exit 1
fi

deck="$src/inputs/ci-short.deck"
out="$work/out"
common=(run.output_dir="$out" run.log_every=1 train.steps=4 train.batch=4 train.eval_every=2 train.eval_batches=1
        checkpoint.every=2 checkpoint.keep=2)

# The plugin each run loads, as --check reports it: the v1 file through DSMOE_PLUGIN_PATH, else not.
check_v1=$(DSMOE_PLUGIN_PATH="$v1dir" "$dsmoe" --check "$deck" "${common[@]}" 2>&1)
grep -qF "$v1dir/libdsmoe_kernel_cpu.so" <<<"$check_v1" && ok ||
  { fail "--check with DSMOE_PLUGIN_PATH=$v1dir does not name $v1dir/libdsmoe_kernel_cpu.so"; echo "$check_v1" | tail -20; }
check_v2=$("$dsmoe" --check "$deck" "${common[@]}" 2>&1)
if grep -qF "$v1dir/" <<<"$check_v2"; then fail "--check without DSMOE_PLUGIN_PATH names the v1 plugin"; else ok; fi

# train <label> [env...] -- [overrides...]: one run; its output directory becomes $work/<label>.
# $launch, when set, runs it (mpiexec -n 2).
launch=()
train() {
  local label=$1
  shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  rm -rf "$out"
  if ! env "${envs[@]}" "${launch[@]}" "$dsmoe" "$deck" "${common[@]}" "$@" > "$work/$label.log" 2>&1; then
    fail "$label: training failed"
    tail -20 "$work/$label.log"
    return 1
  fi
  mv "$out" "$work/$label"
}

# The metrics without the columns that measure time (tokens_per_s, elapsed_s, anything *_s).
metrics_columns() {
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) keep[i] = ($i != "tokens_per_s" && $i !~ /_s$/) }
           { line = ""; for (i = 1; i <= NF; i++) if (keep[i]) line = line $i ","; print line }' "$1"
}

# Bytes of a safetensors file: an 8-byte little-endian header length, the JSON header, the tensor data.
header_len() { od -An -t u8 -N 8 "$1" | tr -d ' '; }
header_without_deck() {
  local n
  n=$(header_len "$1")
  tail -c +9 "$1" | head -c "$n" | sed -E 's/"deck":"([^"\\]|\\.)*"//; s/ +$//' # the padding follows the deck's length
}
tensor_data() { tail -c +$((9 + $(header_len "$1"))) "$1"; }

compare() {
  local a=$1 b=$2 what=$3
  # Metrics: same rows, same text in every column but the timings.
  if [ ! -f "$work/$a/metrics.csv" ] || [ ! -f "$work/$b/metrics.csv" ]; then
    fail "$what: metrics.csv missing"
    return
  fi
  [ "$(($(wc -l < "$work/$a/metrics.csv") - 1))" = 4 ] && ok || fail "$what: metrics.csv should have 4 rows"
  head -1 "$work/$a/metrics.csv" | grep -q "^step,loss," && ok || fail "$what: metrics.csv header: $(head -1 "$work/$a/metrics.csv")"
  if diff <(metrics_columns "$work/$a/metrics.csv") <(metrics_columns "$work/$b/metrics.csv") > "$work/metrics.diff"; then
    ok
  else
    fail "$what: the metrics differ (v1 adapter <, ABI-3 cpu >):"
    cat "$work/metrics.diff"
  fi
  # Checkpoints: the same files, identical bytes (or, failing that, identical tensors and header but
  # for the stored deck).
  local la lb
  la=$(cd "$work/$a/checkpoints" 2>/dev/null && ls)
  lb=$(cd "$work/$b/checkpoints" 2>/dev/null && ls)
  [ -n "$la" ] && [ "$la" = "$lb" ] && ok || { fail "$what: checkpoints differ in name: '$la' vs '$lb'"; return; }
  [ "$la" = "$(printf 'step_00000002.safetensors\nstep_00000004.safetensors')" ] && ok || fail "$what: checkpoints: $la"
  for f in $la; do
    local fa="$work/$a/checkpoints/$f" fb="$work/$b/checkpoints/$f"
    if cmp -s "$fa" "$fb"; then
      ok
      continue
    fi
    if ! cmp -s <(tensor_data "$fa") <(tensor_data "$fb"); then
      fail "$what: $f: the tensor data differs ($(cmp <(tensor_data "$fa") <(tensor_data "$fb") 2>&1 | head -1))"
    elif ! cmp -s <(header_without_deck "$fa") <(header_without_deck "$fb"); then
      fail "$what: $f: the tensors are identical but the header differs beyond the stored deck"
    else
      ok
      echo "note: $what: $f: tensors and header identical; only the stored resolved deck differs:"
      diff "$work/$a/resolved.deck" "$work/$b/resolved.deck" | head -10
    fi
  done
}

for topk in 1 2; do
  train "v1_top$topk" DSMOE_PLUGIN_PATH="$v1dir" -- moe.top_k=$topk &&
    train "v2_top$topk" DSMOE_KERNEL_CPU_SMALL_ROWS=0 -- moe.top_k=$topk &&
    compare "v1_top$topk" "v2_top$topk" "top-$topk"
done
# Residual MoE with jitter noise and random token selection: the members the runs above leave out
# (residual_mix forward and backward, mul_uniform_noise).
extra=(moe.residual=true moe.noise=jitter moe.token_selection=random)
train v1_residual DSMOE_PLUGIN_PATH="$v1dir" -- "${extra[@]}" &&
  train v2_residual DSMOE_KERNEL_CPU_SMALL_ROWS=0 -- "${extra[@]}" &&
  compare v1_residual v2_residual "residual, jitter, random token selection"

if [ -n "$commv1dir" ]; then
  if [ ! -f "$commv1dir/libdsmoe_comm_mpi.so" ]; then
    fail "no $commv1dir/libdsmoe_comm_mpi.so (build the target dsmoe_comm_mpiv1)"
  else
    launch=("${mpiexec[@]}" -n 2)
    for zero in 0 1; do
      if train "commv1_zero$zero" DSMOE_PLUGIN_PATH="$commv1dir" -- moe.expert_parallel=2 train.zero_stage=$zero &&
        train "commv2_zero$zero" -- moe.expert_parallel=2 train.zero_stage=$zero; then
        grep -qF "$commv1dir/libdsmoe_comm_mpi.so" "$work/commv1_zero$zero.log" && ok ||
          fail "comm v1, ZeRO $zero: the log does not name $commv1dir/libdsmoe_comm_mpi.so"
        if grep -qF "$commv1dir/" "$work/commv2_zero$zero.log"; then fail "comm v2, ZeRO $zero: the log names the v1 plugin"; else ok; fi
        compare "commv1_zero$zero" "commv2_zero$zero" "comm v1, 2 ranks, ep 2, ZeRO $zero"
      fi
    done
  fi
fi

echo "v1_adapter_test: $pass passed, $failures failed"
[ $failures -eq 0 ]
