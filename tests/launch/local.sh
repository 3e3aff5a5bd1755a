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

report
