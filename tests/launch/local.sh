#!/usr/bin/env bash
# jobscripts/local-mpirun.sh: 4 ranks (default) and DSMOE_RANKS=2 on this machine, each run checked for
# its launcher line, exit code, final checkpoint and the losses of a one-process reference made with
# the same per-rank micro-batch.
# Usage: local.sh <dsmoe> <source dir>
source "$(dirname "$0")/common.sh"
script=$src/jobscripts/local-mpirun.sh
export DSMOE=$dsmoe

for ranks in 4 2; do
  reference "$work/ref$ranks" "$ranks"
  if [ "$ranks" = 4 ]; then unset DSMOE_RANKS; else export DSMOE_RANKS=$ranks; fi
  (cd "$work" && timeout 60 bash "$script" "$deck" run.output_dir="$work/local$ranks") >"$work/local$ranks.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] && ok || { fail "local-mpirun.sh ($ranks ranks): exit $rc"; show "$work/local$ranks.log"; }
  has local$ranks "$work/local$ranks.log" "^dsmoe local: $ranks ranks x [0-9]+ threads on [0-9]+ cores: $dsmoe $deck run.output_dir=$work/local$ranks$"
  has local$ranks "$work/local$ranks.log" "^dsmoe [^ ]+: $ranks ranks on 1 node \($ranks per node; rank 0 on [^)]+\), launched by mpiexec \(Open MPI\)$"
  has local$ranks "$work/local$ranks.log" "^dsmoe local: mpirun exited with 0$"
  finished local$ranks "$work/local$ranks" 6
  same_metrics local$ranks "$work/ref$ranks/metrics.csv" "$work/local$ranks/metrics.csv"
done

# USR1 to the script (as a batch system would send it) reaches every rank through mpirun: dsmoe writes
# the checkpoint of the step it stops at and exits 75, and so does the script.
export DSMOE_RANKS=2
(cd "$work" && exec timeout 120 bash "$script" "$deck" run.output_dir="$work/usr1" train.steps=100000) \
  >"$work/usr1.log" 2>&1 &
pid=$!
for _ in $(seq 1200); do # until the first logged step: the ranks' handlers are set
  [ -f "$work/usr1/metrics.csv" ] && [ "$(wc -l <"$work/usr1/metrics.csv")" -gt 1 ] && break
  sleep 0.05
done
pkill -USR1 -P "$pid" -x bash 2>/dev/null || kill -USR1 "$pid" # the script (timeout's child)
wait "$pid"
rc=$?
[ $rc -eq 75 ] && ok || { fail "local-mpirun.sh after USR1: exit $rc, expected 75"; show "$work/usr1.log"; }
has usr1 "$work/usr1.log" "^stopped: SIGUSR1 at step [0-9]+ of 100000"
has usr1 "$work/usr1.log" "^dsmoe local: mpirun exited with 75$"
pkill -KILL -f -- "run.output_dir=$work/usr1 " 2>/dev/null # an mpirun the script left running, had it failed to pass USR1 on

report
