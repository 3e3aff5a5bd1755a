#!/usr/bin/env bash
# Output failures (docs/deck.md, docs/parallel.md "Walltime signals and exit codes"): saves into a full
# file system (a tmpfs smaller than one checkpoint; root only) keep the older checkpoints, are reported
# with the system's reason, and training goes on until checkpoint.max_failures in a row (or the final
# save) fail: exit 74; the start warns that the checkpoint will not fit. A checkpoint.dir that is a file
# and an unopenable metrics file: the reason, before the first step (and from --check), exit 1.
# metrics.file = /dev/full: reported once with the reason, training completes, reported again, exit 73.
# On 1 rank and on 2 ranks (every rank must agree on the code).
# Usage: save_fail_test.sh <dsmoe> <source dir> <mpiexec> [mpiexec flags ...]
set -u
dsmoe=$1
src=$2
mpiexec=$3
shift 3
mpiflags=("$@")
work=$(mktemp -d /tmp/dsmoe_save_fail.XXXXXX)
mounts=()
trap 'for m in "${mounts[@]}"; do umount "$m"; done; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
unset DSMOE_PLUGIN_PATH
export OMP_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1 OMP_WAIT_POLICY=passive
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # fail, ok, show, expect, finish

deck="$work/tiny.deck"
cat >"$deck" <<DECK
[run]
log_every = 1
[model]
vocab = 32
seq_len = 8
layers = 2
hidden = 16
heads = 2
[moe]
experts = 4
[train]
steps = 6
batch = 4
eval_every = 100
eval_batches = 1
[data]
synthetic_sources = 2
synthetic_branching = 2
[checkpoint]
keep = 3
every = 1
DECK

# dsmoe_run <ranks> <log> args...: runs dsmoe to the end; sets $rc.
dsmoe_run() {
  local ranks=$1 log=$2
  shift 2
  if [ "$ranks" = 1 ]; then timeout 120 "$dsmoe" "$deck" "$@" >"$log" 2>&1
  else timeout 120 "$mpiexec" "${mpiflags[@]}" -n "$ranks" "$dsmoe" "$deck" "$@" >"$log" 2>&1; fi
  rc=$?
}

for ranks in 1 2; do
  d="$work/r$ranks"
  mkdir -p "$d"

  # 0. checkpoint.dir is a regular file: refused before the first step, and by --check.
  : >"$d/notadir"
  dsmoe_run $ranks "$d/f.log" run.output_dir="$d/f" checkpoint.dir="$d/notadir"
  [ $rc = 1 ] && grep -q "dsmoe: error: checkpoint.dir = $d/notadir: $d/notadir exists and is not a directory" "$d/f.log" &&
    ! grep -q "^step 1/" "$d/f.log" && ok || { fail "$ranks rank(s), checkpoint.dir a file: exit $rc, expected 1 before step 1"; show "$d/f.log"; }
  expect "check-notadir-$ranks" nonzero "checkpoint.dir = $d/notadir: .* is not a directory" -- \
    "$dsmoe" --check "$deck" run.output_dir="$d/f" checkpoint.dir="$d/notadir"

  # A file system with no room for one checkpoint: a 12 KiB tmpfs (a checkpoint here is about 100 KiB).
  mkdir -p "$d/full"
  if ! mount -t tmpfs -o size=12k tmpfs "$d/full" 2>/dev/null; then
    echo "SKIP: cannot mount a tmpfs here (needs root): the full-disk cases are not run"
  else
    mounts+=("$d/full")
    # 1. Every save fails. max_failures = 3: steps 1-3 run (two warnings naming the reason), the third
    # failure ends the run with 74; no step 4. The start said the checkpoint would not fit.
    dsmoe_run $ranks "$d/a.log" run.output_dir="$d/a" checkpoint.dir="$d/full"
    [ $rc = 74 ] && ok || { fail "$ranks rank(s), full checkpoint.dir: exit $rc, expected 74"; show "$d/a.log"; }
    grep -q "dsmoe: warning: the file system of the checkpoint directory $d/full has .* free, less than one checkpoint" "$d/a.log" && ok ||
      { fail "$ranks rank(s): no warning at the start that a checkpoint does not fit"; show "$d/a.log"; }
    [ "$(grep -c "dsmoe: warning: checkpoint of step [12] failed (. in a row; checkpoint.max_failures = 3): .*No space left on device.*training goes on" "$d/a.log")" = 2 ] && ok ||
      { fail "$ranks rank(s): not two warnings for steps 1, 2 with the reason"; show "$d/a.log"; }
    grep -q "dsmoe: error: the checkpoint of step 3 failed (3 in a row; checkpoint.max_failures = 3): .*No space left on device.*newest checkpoint: none written by this run; exit code 74" "$d/a.log" && ok ||
      { fail "$ranks rank(s): no error for step 3 with the reason"; show "$d/a.log"; }
    grep -q "^step 3/6" "$d/a.log" && ! grep -q "^step 4/6" "$d/a.log" && ok ||
      fail "$ranks rank(s): training did not go on to exactly step 3"
    # Nothing but the run's lock (core/io/run_lock.h).
    [ "$(ls -A "$d/full")" = .dsmoe.lock ] && ok || fail "$ranks rank(s): failed saves left files in $d/full: $(ls -A "$d/full")"

    # 2. max_failures larger than the run: every step runs, the final save's failure gives 74.
    dsmoe_run $ranks "$d/b.log" run.output_dir="$d/b" checkpoint.dir="$d/full" checkpoint.max_failures=100
    [ $rc = 74 ] && grep -q "^step 6/6" "$d/b.log" && grep -q "dsmoe: error: the final checkpoint of step 6 failed (6 in a row" "$d/b.log" && ok ||
      { fail "$ranks rank(s), max_failures=100: exit $rc (expected 74 after step 6 with the final save's error)"; show "$d/b.log"; }
    [ "$(wc -l <"$d/b/metrics.csv")" = 7 ] && ok || fail "$ranks rank(s): metrics.csv lacks rows of a run whose saves failed"

    # 3. A run resumed from good checkpoints into the full file system: the older checkpoints are kept,
    # and three failures in a row end the run with 74.
    dsmoe_run $ranks "$d/c0.log" run.output_dir="$d/c0" checkpoint.dir="$d/ck" train.steps=3 # steps 1-3 saved
    dsmoe_run $ranks "$d/c2.log" run.output_dir="$d/c2" checkpoint.dir="$d/full" checkpoint.resume="$d/ck/step_00000003.safetensors" \
      train.steps=9 checkpoint.keep=10
    [ $rc = 74 ] && grep -q "^step 6/9" "$d/c2.log" && ! grep -q "^step 7/9" "$d/c2.log" &&
      grep -q "newest checkpoint: none written by this run; exit code 74" "$d/c2.log" && ok ||
      { fail "$ranks rank(s), resumed into a full file system: exit $rc, expected 74 after step 6"; show "$d/c2.log"; }
    ls "$d/ck"/step_0000000[123].safetensors >/dev/null 2>&1 && ok || fail "$ranks rank(s): older checkpoints lost"
  fi

  # 4. metrics.file = /dev/full: reported once when written (the header, before step 1), training and its
  # checkpoints complete, reported again at the end, exit 73.
  dsmoe_run $ranks "$d/m.log" run.output_dir="$d/m" metrics.file=/dev/full
  [ $rc = 73 ] && ok || { fail "$ranks rank(s), metrics.file=/dev/full: exit $rc, expected 73"; show "$d/m.log"; }
  [ "$(grep -c "dsmoe: warning: cannot write metrics file /dev/full (No space left on device at step 0)" "$d/m.log")" = 1 ] &&
    [ "$(grep -c "dsmoe: warning: metrics file /dev/full is incomplete: writing failed at step 0 (No space left on device): exit code 73" "$d/m.log")" = 1 ] && ok ||
    { fail "$ranks rank(s), /dev/full: not one warning at the start and one at the end"; show "$d/m.log"; }
  grep -q "^step 6/6" "$d/m.log" && [ -f "$d/m/checkpoints/step_00000006.safetensors" ] && ok ||
    fail "$ranks rank(s), /dev/full: training did not complete"

  # 5. A metrics file that cannot be opened: the reason, before the first step, exit 1.
  dsmoe_run $ranks "$d/o.log" run.output_dir="$d/o" metrics.file="$d/no/such/dir/m.csv"
  [ $rc = 1 ] && grep -q "dsmoe: error: cannot open metrics file $d/no/such/dir/m.csv: No such file or directory" "$d/o.log" &&
    ! grep -q "^step 1/" "$d/o.log" && ok || { fail "$ranks rank(s), unopenable metrics file: exit $rc"; show "$d/o.log"; }

  # A healthy run still exits 0.
  dsmoe_run $ranks "$d/h.log" run.output_dir="$d/h"
  [ $rc = 0 ] && ok || { fail "$ranks rank(s), healthy run: exit $rc"; show "$d/h.log"; }
done

finish save_fail_test
