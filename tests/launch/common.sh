# Shared by tests/launch/*.sh (sourced): a work directory, pass/fail counting, and the reference a
# launched run is checked against.
#
# The reference: the same deck trained by one process with train.micro_batch = batch / ranks, that is
# the 4-rank run's micro-batches done one after another with gradient accumulation and no launcher
# (equal because inputs/ci-short.deck takes the load-balancing loss over each rank's own tokens).
# Data parallelism over 4 ranks must give the same losses, learning rates and gradient norms; a launcher
# that started 4 separate singletons, or fewer ranks than asked, gives other numbers.
set -u
dsmoe=$1
src=$2
deck=$src/inputs/ci-short.deck
work=$(mktemp -d /tmp/dsmoe_launch.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
unset DSMOE_PLUGIN_PATH OMP_NUM_THREADS
# Open MPI as root (CI containers); a batch system runs jobs as a user and needs neither.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The test machine may have fewer cores than ranks: a rank waiting in MPI or OpenMP yields its core
# rather than spinning (spinning ranks make a 1 s run take a minute).
export OMPI_MCA_mpi_yield_when_idle=1 OMP_WAIT_POLICY=passive
failures=0
passes=0

fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { passes=$((passes + 1)); }

# show <log>: its end, without the resolved-configuration lines.
show() { grep -Ev '^[a-z_0-9]+ += ' "$1" | tail -n 25 | sed 's/^/  | /'; }

# has <name> <file> <extended regex>
has() {
  if grep -Eq -- "$3" "$2"; then ok; else fail "$1: $2 lacks /$3/"; show "$2"; fi
}

# reference <dir> <ranks> [key=value ...]: the one-process run that <ranks> ranks must reproduce.
reference() {
  local dir=$1 ranks=$2
  shift 2
  OMP_NUM_THREADS=1 "$dsmoe" "$deck" train.micro_batch=$((8 / ranks)) run.output_dir="$dir" "$@" \
    >"$dir.log" 2>&1 || { fail "reference run failed"; show "$dir.log"; }
}

# same_metrics <name> <reference metrics.csv> <metrics.csv>: step, loss, aux_loss, lr, grad_norm and
# valid_loss agree (to 2e-5: the all-reduce adds in another order than accumulation) on every step the
# run logged, and the run logged at least 3 steps.
same_metrics() {
  local name=$1 out
  if [ ! -s "$2" ] || [ ! -s "$3" ]; then fail "$name: missing $2 or $3"; return; fi
  out=$(awk -F, 'NR == FNR { if (FNR > 1) ref[$1] = $0; next }
    FNR == 1 { next }
    { n++; if (!($1 in ref)) { print "step " $1 " not in the reference"; bad++; next }
      split(ref[$1], r, ",")
      for (c = 2; c <= 9; c++) {
        if (c >= 6 && c <= 8) continue   # tokens_per_s, dropped_frac (rounded), elapsed_s
        d = $c - r[c]; if (d < 0) d = -d
        if (($c == "") != (r[c] == "") || d > 2e-5) { print "step " $1 " column " c ": " $c " vs reference " r[c]; bad++ }
      } }
    END { if (n < 3) { print "only " n + 0 " rows"; bad++ } exit bad > 0 }' "$2" "$3")
  if [ $? -eq 0 ]; then ok; else fail "$name: metrics differ from the one-process reference:"; echo "$out" | head; fi
}

# finished <name> <output dir> <step>: the final checkpoint of a run is there.
finished() {
  local ck
  ck=$(printf '%s/checkpoints/step_%08d.safetensors' "$2" "$3")
  if [ -s "$ck" ]; then ok; else fail "$1: no checkpoint $ck"; ls -R "$2" 2>&1 | head; fi
}

report() {
  echo "$passes checks passed, $failures failed"
  [ "$failures" -eq 0 ]
  exit $?
}
