#!/usr/bin/env bash
# The cpu kernel plugin of ABI 3 against the ABI-1 cpu plugin (tests/plugins/loader/cpu_v1, built verbatim from
# the last ABI-1 commit and loaded through the core's adapter) on dsmoe_bench_moe's default W1 shape
# (S=4096 M=768 F=3072 E=8, fwd+bwd, fp32), at 1 and 2 threads. Each run reports its efficiency against the
# same run's sgemm rate (docs/moe-layer.md); the two plugins run in alternation, `rounds` times each, so that
# a busy machine slows both alike. The median and the best efficiency of each are reported.
# usage: bench/abi_w1.sh [build dir] [rounds]
set -euo pipefail
build=${1:-build}
rounds=${2:-3}
v1dir=$build/tests/plugins/cpu_v1
[ -f "$v1dir/libdsmoe_kernel_cpu.so" ] || { echo "no ABI-1 cpu plugin in $v1dir (configure with -DBUILD_TESTING=ON)"; exit 1; }
out=$(mktemp -d /tmp/dsmoe_abi_w1.XXXXXX)
trap 'rm -rf "$out"' EXIT

# efficiency of one run: the last line's efficiency=<x>
run() {
  local abi=$1 threads=$2 log=$out/run.log
  if [ "$abi" = 1 ]; then
    DSMOE_PLUGIN_PATH=$v1dir OMP_NUM_THREADS=$threads "$build/bin/dsmoe_bench_moe" --threads "$threads" > "$log" 2>&1
  else
    DSMOE_PLUGIN_PATH= OMP_NUM_THREADS=$threads "$build/bin/dsmoe_bench_moe" --threads "$threads" > "$log" 2>&1
  fi || { echo "dsmoe_bench_moe failed (ABI $abi, $threads threads):"; tail -5 "$log"; exit 1; }
  tail -1 "$log" | sed -n 's/.*efficiency=\([0-9.]*\).*/\1/p'
}
stats() { sort -n | awk '{ a[NR] = $1 } END { printf "median %.3f  best %.3f  (%d runs)", a[int((NR + 1) / 2)], a[NR], NR }'; }

echo "dsmoe_bench_moe W1 (defaults), fp32, $rounds rounds alternating ABI 1 (adapter) and ABI 3"
for threads in 1 2; do
  : > "$out/e1"
  : > "$out/e2"
  for r in $(seq "$rounds"); do
    run 1 "$threads" >> "$out/e1"
    run 2 "$threads" >> "$out/e2"
  done
  echo "threads $threads  ABI 1 cpu plugin: $(stats < "$out/e1")"
  echo "threads $threads  ABI 3 cpu plugin: $(stats < "$out/e2")"
done
