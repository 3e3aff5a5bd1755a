#!/usr/bin/env bash
# scripts/plot on a real run: 5 steps of inputs/quickstart.deck with its log kept in the run directory
# (as `dsmoe deck | tee RUN_DIR/train.log` does). Every plot is drawn at the default 1000x600 and is a
# valid PNG; the loss bound is the one the log printed; the plotted losses are metrics.csv's; the heat
# map has one row per expert of the resolved deck's MoE layers.
# Usage: plot_run_test.sh <dsmoe binary> <source dir>. Exit 77 (skipped) without gnuplot or python3.
set -u
dsmoe=$1
src=$2
command -v python3 > /dev/null || { echo "SKIPPED: python3 not found (scripts/plot is Python)"; exit 77; }
command -v gnuplot > /dev/null || { echo "SKIPPED: gnuplot not found (Debian: apt-get install gnuplot-nox)"; exit 77; }
work=$(mktemp -d /tmp/dsmoe_plot_run.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
unset DSMOE_PLUGIN_PATH
source "$src/tests/cli/lib.sh" # fail, ok, show, finish

run="$work/run"
mkdir -p "$run"
if ! "$dsmoe" "$src/inputs/quickstart.deck" train.steps=5 run.log_every=1 train.eval_every=5 train.eval_batches=1 \
     checkpoint.every=0 run.output_dir="$run" > "$work/train.log" 2>&1; then
  fail "dsmoe: the 5-step quickstart run failed"; show "$work/train.log"; finish plot_run; exit
fi
mv "$work/train.log" "$run/train.log"
out=$(python3 "$src/scripts/plot" "$run" --save-script "$work/run.gp" 2>&1)
rc=$?
[ $rc -eq 0 ] && ok || { fail "scripts/plot: exit $rc"; echo "$out"; finish plot_run; exit; }
echo "$out"

for p in loss lr grad_norm tokens_per_s dropped expert_load; do
  why=$(python3 "$src/tests/plot/png_check.py" "$run/plots/$p.png" 1000 600 2>&1) && ok || fail "$p.png: $why"
done
grep -q "skipped" <<<"$out" && fail "a plot was skipped" || ok

# The bound: the number the log printed, drawn.
bound=$(sed -n 's/^data: achievable loss bound \([0-9.]*\) nats\/token$/\1/p' "$run/train.log")
[ -n "$bound" ] && ok || fail "the log has no bound line"
grep -qF "(bound $bound from $run/train.log)" <<<"$out" && ok || fail "the loss plot does not report bound $bound"
awk -v b="$bound" '/achievable bound/ && $1 + 0 == b + 0 {f = 1} END {exit !f}' "$work/run.gp" && ok ||
  fail "the bound line $bound is not plotted"

# The training losses plotted are metrics.csv's five rows (steps 1-5); validation only at step 5.
block() { awk -v b="\$$2 << EOD" '$0 == b {on = 1; next} on && $0 == "EOD" {exit} on' "$1"; }
want=$(awk -F, 'NR > 1 {print $1 + 0, $2 + 0}' "$run/metrics.csv")
got=$(block "$work/run.gp" train | awk '{print $1 + 0, $2 + 0}')
[ "$(echo "$want" | wc -l)" -eq 5 ] && [ "$want" = "$got" ] && ok || { fail "loss block differs"; paste <(echo "$want") <(echo "$got"); }
[ "$(block "$work/run.gp" valid | awk '{print $1 + 0}')" = 5 ] && ok || fail "the validation block is not step 5 alone"

# One heat-map row per expert: the resolved deck's experts ("8 x2") on the MoE layers.
experts=$(awk '/^\[moe\]/ {m = 1} m && $1 == "experts" {print $3, ($4 ~ /^x/ ? substr($4, 2) : 1); exit}' "$run/resolved.deck")
rows=$(( ${experts% *} * ${experts#* } ))
[ "$rows" -eq 16 ] && ok || fail "resolved.deck: experts '$experts', expected 8 x2"
[ "$(block "$work/run.gp" load | awk '{print $2}' | sort -u | wc -l)" -eq "$rows" ] && ok ||
  fail "the heat map does not have $rows rows"
finish plot_run
