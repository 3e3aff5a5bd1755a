#!/usr/bin/env bash
# `srun --mpi=pmix -n 4 dsmoe` in the local Slurm: exit code, the launcher line dsmoe prints (srun, the
# job and step, nodes, tasks per node, CPUs per task), the final checkpoint, and the losses of a
# one-process reference. Skips (77) when no local Slurm runs (the slurm_start fixture starts it).
# Usage: slurm_srun.sh <dsmoe> <source dir>
source "$(dirname "$0")/common.sh"
slurm=$src/scripts/slurm-local
"$slurm" status || { echo "SKIP: no local Slurm (scripts/slurm-local start)"; exit 77; }
eval "$("$slurm" env)"

reference "$work/ref" 4
cd "$work" || exit 1
# --immediate: fail rather than queue if the node is busy; --time and timeout: nothing can hang.
OMP_NUM_THREADS=2 timeout 60 srun --mpi=pmix -n 4 --cpus-per-task=2 --immediate=20 --time=2 \
  --job-name=dsmoe-srun-test --kill-on-bad-exit=1 "$dsmoe" "$deck" run.output_dir="$work/srun" \
  >"$work/srun.log" 2>&1
rc=$?
[ $rc -eq 0 ] && ok || { fail "srun: exit $rc"; show "$work/srun.log"; }
has srun "$work/srun.log" "^dsmoe [^ ]+: 4 ranks on 1 node \(4 per node; rank 0 on [^)]+\), launched by srun: Slurm job [0-9]+ step 0, 1 node, tasks per node 4, 2 CPUs per task$"
has srun "$work/srun.log" "2 OpenMP threads"
finished srun "$work/srun" 6
same_metrics srun "$work/ref/metrics.csv" "$work/srun/metrics.csv"

[ "$failures" -eq 0 ] || "$slurm" logs
report
