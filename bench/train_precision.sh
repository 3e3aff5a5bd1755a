#!/usr/bin/env bash
# Training throughput in fp32 and bf16 (run.precision) on one rank: the quickstart model and one 4x
# wider (model.hidden 512 instead of 128: 16x the GEMM work per token). The two precisions run in
# alternation, `rounds` times each, so that a busy machine slows both alike; the median of the rounds
# is reported, with the ratio bf16 / fp32 of tokens/s.
# usage: bench/train_precision.sh [build dir] [steps] [rounds] [threads]
set -euo pipefail
build=${1:-build}
steps=${2:-30}
rounds=${3:-3}
threads=${4:-1}
src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d /tmp/dsmoe_precision.XXXXXX)
trap 'rm -rf "$out"' EXIT
export OMP_NUM_THREADS=$threads

# tokens/s of one run: metrics.csv's column 6, averaged over the rows after the first (warm-up).
run() {
  local tag=$1
  shift
  "$build/bin/dsmoe" "$src/inputs/quickstart.deck" train.steps="$steps" run.log_every=5 train.eval_every=0 \
    checkpoint.final=false checkpoint.every=0 run.threads="$threads" run.output_dir="$out/$tag" "$@" \
    > "$out/$tag.log" 2>&1 || { echo "dsmoe failed ($tag):"; tail -5 "$out/$tag.log"; exit 1; }
  awk -F, 'NR > 2 { s += $6; n++ } END { printf "%.0f\n", n ? s / n : 0 }' "$out/$tag/metrics.csv"
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

echo "one rank, $threads thread(s), $steps steps, micro-batch 16 x 64 tokens, $rounds rounds alternating"
for shape in "quickstart:model.hidden=128" "4x_wider:model.hidden=512"; do
  name=${shape%%:*}
  key=${shape#*:}
  : > "$out/fp32.txt"
  : > "$out/bf16.txt"
  for r in $(seq 1 "$rounds"); do
    run "$name-fp32-$r" "$key" run.precision=fp32 >> "$out/fp32.txt"
    run "$name-bf16-$r" "$key" run.precision=bf16 >> "$out/bf16.txt"
  done
  f=$(median < "$out/fp32.txt")
  b=$(median < "$out/bf16.txt")
  echo "$name ($key): fp32 tokens_per_s=$f bf16 tokens_per_s=$b bf16/fp32=$(awk -v b="$b" -v f="$f" 'BEGIN { printf "%.2f", (f > 0 ? b / f : 0) }')"
done
