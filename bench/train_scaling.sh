#!/usr/bin/env bash
# Training throughput of the quickstart model on 1, 2 and 4 ranks (data parallel, one thread per rank).
# usage: bench/train_scaling.sh [build dir] [steps] [rank counts...]
# Prints one line per rank count: ranks, tokens/s over the steps after the first logged interval.
set -euo pipefail
build=${1:-build}
steps=${2:-40}
shift $(( $# > 2 ? 2 : $# ))
ranks=("${@:-1 2 4}")
[ ${#ranks[@]} -eq 1 ] && read -r -a ranks <<<"${ranks[0]}"
src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d /tmp/dsmoe_scaling.XXXXXX)
trap 'rm -rf "$out"' EXIT
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMP_NUM_THREADS=1
echo "quickstart model, $steps steps, global batch 16 x 64 tokens, $(nproc --all) cores"
for n in "${ranks[@]}"; do
  mpiexec --oversubscribe -n "$n" "$build/bin/dsmoe" "$src/inputs/quickstart.deck" train.steps="$steps" \
    run.log_every=10 train.eval_every=0 checkpoint.final=false checkpoint.every=0 run.output_dir="$out/r$n" \
    > "$out/r$n.log" 2>&1
  # metrics.csv: tokens_per_s is column 6; skip the first row (warm-up).
  tps=$(awk -F, 'NR > 2 { s += $6; n++ } END { printf "%.0f", n ? s / n : 0 }' "$out/r$n/metrics.csv")
  echo "ranks=$n tokens_per_s=$tps"
done
