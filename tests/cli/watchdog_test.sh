#!/usr/bin/env bash
# run.watchdog (docs/parallel.md): a rank stopped (SIGSTOP) in the middle of training leaves the other
# waiting in a collective; its watchdog ends the whole job after run.watchdog seconds with exit code 70 and
# a message naming the rank, the phase and the step, instead of hanging until the walltime. A healthy run
# with a short watchdog is not disturbed, and run.watchdog = 0 starts no watchdog.
# Usage: watchdog_test.sh <dsmoe> <mpiexec> [mpiexec flags ...]
set -u
dsmoe=$1
mpiexec=$2
shift 2
mpiflags=("$@")
work=$(mktemp -d /tmp/dsmoe_watchdog.XXXXXX)
trap 'for f in "$work"/*.pid.*; do [ -f "$f" ] && kill -CONT "$(cat "$f")" 2>/dev/null; done; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
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
steps = 100000
batch = 4
eval_every = 100000
eval_batches = 1
[data]
synthetic_sources = 2
synthetic_branching = 2
[checkpoint]
final = false
DECK

# Two ranks, each writing its pid; wait for training rows, stop rank 1, and time the end.
log="$work/stop.log"
"$mpiexec" "${mpiflags[@]}" -n 2 bash -c 'echo $$ >"$0.pid.$OMPI_COMM_WORLD_RANK"; exec "$@"' "$log" "$dsmoe" "$deck" \
  run.output_dir="$work/stop" run.watchdog=4s >"$log" 2>&1 &
launcher=$!
for _ in $(seq 1200); do [ -f "$work/stop/metrics.csv" ] && [ "$(wc -l <"$work/stop/metrics.csv")" -gt 5 ] && break; sleep 0.05; done
kill -STOP "$(cat "$log.pid.1")"
t0=$(date +%s)
for _ in $(seq 600); do kill -0 $launcher 2>/dev/null || break; sleep 0.1; done
if kill -0 $launcher 2>/dev/null; then
  fail "the job still runs 60 s after a rank was stopped (run.watchdog = 4s)"
  kill -CONT "$(cat "$log.pid.1")"; kill -KILL $launcher
else
  wait $launcher
  rc=$?
  took=$(($(date +%s) - t0))
  [ $rc = 70 ] && ok || { fail "stopped rank: exit $rc, expected 70"; show "$log"; }
  [ $took -ge 3 ] && [ $took -le 30 ] && ok || fail "stopped rank: the job ended after $took s (watchdog 4 s)"
  grep -Eq "dsmoe: error: watchdog: rank 0 made no progress for [0-9]+ s in \"[a-z ]+\" of step [0-9]+ \(run.watchdog = 4\)" "$log" && ok ||
    { fail "no watchdog message from rank 0 naming the phase and step"; show "$log"; }
fi
kill -CONT "$(cat "$log.pid.1")" 2>/dev/null
kill -KILL "$(cat "$log.pid.1")" 2>/dev/null

# A healthy short run with a 2 s watchdog completes (beats keep it quiet); run.watchdog = 0 too.
expect healthy 0 "step 20/20" -- "$mpiexec" "${mpiflags[@]}" -n 2 "$dsmoe" "$deck" run.output_dir="$work/h" \
  run.watchdog=2s train.steps=20
expect off 0 "step 5/5" -- "$dsmoe" "$deck" run.output_dir="$work/o" run.watchdog=0 train.steps=5
expect bad-duration nonzero "run.watchdog = soon: expected a duration" -- "$dsmoe" --check "$deck" run.watchdog=soon
finish watchdog_test
