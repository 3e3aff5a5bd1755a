#!/usr/bin/env bash
# scripts/paper-experiment --quick (docs/paper-claims.md): all 23 runs of inputs/paper-claims/ at 4 steps,
# the real-text runs on a small Megatron corpus made here from the repository's docs (no network), then
# check_report.py recomputes the report's numbers from the runs' files. Under 60 s on 2 cores.
# Usage: paper_experiment_test.sh <dsmoe binary> <source dir>. Exit 77 (skipped) without gnuplot or python3.
set -u
dsmoe=$1
src=$2
command -v python3 > /dev/null || { echo "SKIPPED: python3 not found"; exit 77; }
command -v gnuplot > /dev/null || { echo "SKIPPED: gnuplot not found (Debian: apt-get install gnuplot-nox)"; exit 77; }
work=$(mktemp -d /tmp/dsmoe_paper_experiment.XXXXXX)
trap 'rm -rf "$work"' EXIT
unset DSMOE_PLUGIN_PATH

python3 "$src/tests/paper_experiment/make_corpus.py" "$work/corpus" "$src/docs/deck.md" "$src/docs/data.md" \
  "$src/docs/gating.md" || { echo "FAIL: make_corpus.py"; exit 1; }
if ! python3 "$src/scripts/paper-experiment" --quick --dsmoe "$dsmoe" --runs "$work/runs" --docs "$work/docs" \
     --corpus "$work/corpus" > "$work/out.log" 2>&1; then
  echo "FAIL: scripts/paper-experiment --quick failed"; tail -n 30 "$work/out.log"
  for l in "$work"/runs/*/train.log; do grep -q "error" "$l" && { echo "== $l"; tail -n 5 "$l"; }; done
  exit 1
fi
tail -n 1 "$work/out.log"
grep -q "^\*\*Quick mode" "$work/docs/paper-claims.md" || { echo "FAIL: the quick report does not say so"; exit 1; }
python3 "$src/tests/paper_experiment/check_report.py" "$work/docs/paper-claims.md" "$work/runs"
