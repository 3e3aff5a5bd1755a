#!/usr/bin/env bash
# dsmoe under `srun --cpu-bind` in the local Slurm (task/affinity): Slurm's binding is kept and shown in
# the start-up table (rank 0 on CPU 1, rank 1 on CPU 0: the reverse of what dsmoe would choose), and
# topology.bind = cores replaces it with dsmoe's own. Skips (77) when no local Slurm runs, or when the
# machine has fewer than 2 CPUs.
# Usage: slurm_cpubind.sh <dsmoe> <source dir>
source "$(dirname "$0")/common.sh"
slurm=$src/scripts/slurm-local
"$slurm" status || { echo "SKIP: no local Slurm (scripts/slurm-local start)"; exit 77; }
[ "$(nproc)" -ge 2 ] || { echo "SKIP: needs 2 CPUs"; exit 77; }
eval "$("$slurm" env)"
cd "$work" || exit 1

# Slurm itself: map_cpu puts task 0 on CPU 1 and task 1 on CPU 0.
timeout 30 srun -n 2 --immediate=20 --time=1 --cpu-bind=map_cpu:1,0 \
  bash -c 'echo "task $SLURM_PROCID $(grep Cpus_allowed_list /proc/self/status)"' >"$work/probe.log" 2>&1
has slurm-binds "$work/probe.log" "^task 0 Cpus_allowed_list:[[:space:]]+1$"
has slurm-binds "$work/probe.log" "^task 1 Cpus_allowed_list:[[:space:]]+0$"

run() { # run <name> [key=value ...]
  local name=$1
  shift
  OMP_NUM_THREADS=1 timeout 60 srun --mpi=pmix -n 2 --immediate=20 --time=2 --cpu-bind=map_cpu:1,0 \
    --job-name="dsmoe-cpubind-test" --kill-on-bad-exit=1 "$dsmoe" "$deck" train.steps=2 \
    run.output_dir="$work/$name" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] && ok || { fail "$name: srun exit $rc"; show "$work/$name.log"; }
}

run kept
has kept "$work/kept.log" "^binding: kept the binding the launcher made \(topology.bind = auto; cores overrides it\)$"
has kept "$work/kept.log" "^ +0 +0 +0 +[^ ]+ +0 +1 +1 +launcher "
has kept "$work/kept.log" "^ +1 +0 +1 +[^ ]+ +1 +0 +1 +launcher "
has kept "$work/kept.log" "1 OpenMP thread pinned to one CPU each"

run replaced topology.bind=cores
has replaced "$work/replaced.log" "^binding: dsmoe bound each rank to its own cores \(topology.bind = cores\): 2 ranks over 2 cores$"
has replaced "$work/replaced.log" "^ +0 +0 +0 +[^ ]+ +0 +0 +1 +dsmoe "
has replaced "$work/replaced.log" "^ +1 +0 +1 +[^ ]+ +1 +1 +1 +dsmoe "

[ "$failures" -eq 0 ] || "$slurm" logs
report
