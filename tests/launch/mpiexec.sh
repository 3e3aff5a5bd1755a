#!/usr/bin/env bash
# dsmoe launched by mpiexec -n 4 and as a singleton: the launcher line, the placement table, exit code,
# final checkpoint, and the losses of a one-process reference; CPU binding by dsmoe, kept from mpiexec,
# or off. Also the warning for srun without PMIx (faked environment).
# Usage: mpiexec.sh <dsmoe> <source dir> <mpiexec> [mpiexec flags...]
source "$(dirname "$0")/common.sh"
shift 2
mpiexec=("$@")

reference "$work/ref" 4

OMP_NUM_THREADS=1 timeout 60 "${mpiexec[@]}" -n 4 "$dsmoe" "$deck" run.output_dir="$work/mpi" >"$work/mpi.log" 2>&1
rc=$?
[ $rc -eq 0 ] && ok || { fail "mpiexec -n 4: exit $rc"; show "$work/mpi.log"; }
has mpiexec "$work/mpi.log" "^dsmoe [^ ]+: 4 ranks on 1 node \(4 per node; rank 0 on [^)]+\), launched by mpiexec \(Open MPI\)$"
has mpiexec "$work/mpi.log" "^model: .* micro-batch 2 x 16 tokens, 1 micro-steps per step"
finished mpiexec "$work/mpi" 6
same_metrics mpiexec "$work/ref/metrics.csv" "$work/mpi/metrics.csv"

# The start-up placement table: one row per rank, and the experts of the MoE layer (4 experts, ep 1).
has placement "$work/mpi.log" "^placement: 4 ranks on 1 node; node 0: [0-9]+ packages?, [0-9]+ NUMA nodes?, [0-9]+ cores"
has placement "$work/mpi.log" "^binding: (not bound: 4 ranks on [0-9]+ cores? of node 0|dsmoe bound each rank|kept the binding)"
for r in 0 1 2 3; do has placement "$work/mpi.log" "^ +$r +0 +$r +[^ ]+ +$r +[0-9,-]+ +[0-9]+ +(no|dsmoe|launcher) +[0-9]+ +- +-$"; done
has placement "$work/mpi.log" "^experts: MoE layer 1: 4 experts, ep 1 \(4 per rank\), 4 EP groups of 1 rank, each over 1 node"

# Binding: mpiexec without binding -> dsmoe binds each of 2 ranks to its own cores (and reads it back:
# a binding that did not take is an error); mpiexec --bind-to core -> dsmoe keeps it; topology.bind =
# none -> nobody binds.
if [ "$(nproc)" -ge 2 ]; then
  OMP_NUM_THREADS=1 timeout 60 "${mpiexec[@]}" --bind-to none -n 2 "$dsmoe" "$deck" run.output_dir="$work/b1" \
    train.steps=1 >"$work/bind-none.log" 2>&1 || { fail "bind: mpiexec --bind-to none: exit $?"; show "$work/bind-none.log"; }
  has bind-by-dsmoe "$work/bind-none.log" "^binding: dsmoe bound each rank to its own cores \(topology.bind = auto\): 2 ranks over [0-9]+ cores$"
  has bind-by-dsmoe "$work/bind-none.log" "1 OpenMP thread pinned to one CPU each"
  a=$(awk '$1 == 0 && $2 == 0 && $8 == "dsmoe" { print $6 }' "$work/bind-none.log")
  b=$(awk '$1 == 1 && $2 == 0 && $8 == "dsmoe" { print $6 }' "$work/bind-none.log")
  [ -n "$a" ] && [ -n "$b" ] && [ "$a" != "$b" ] && ok || { fail "bind-by-dsmoe: ranks 0 and 1 on '$a' and '$b'"; show "$work/bind-none.log"; }
  OMP_NUM_THREADS=1 timeout 60 "${mpiexec[@]}" --bind-to core --map-by core -n 2 "$dsmoe" "$deck" \
    run.output_dir="$work/b2" train.steps=1 >"$work/bind-core.log" 2>&1 || { fail "bind: --bind-to core: exit $?"; show "$work/bind-core.log"; }
  has bind-kept "$work/bind-core.log" "^binding: kept the binding the launcher made \(topology.bind = auto; cores overrides it\)$"
  has bind-kept "$work/bind-core.log" "^ +1 +0 +1 +[^ ]+ +1 +[0-9,-]+ +[0-9]+ +launcher "
  OMP_NUM_THREADS=1 timeout 60 "${mpiexec[@]}" --bind-to none -n 2 "$dsmoe" "$deck" run.output_dir="$work/b3" \
    train.steps=1 topology.bind=none >"$work/bind-off.log" 2>&1 || { fail "bind: none: exit $?"; show "$work/bind-off.log"; }
  has bind-none "$work/bind-off.log" "^binding: topology.bind = none: the binding is left as the ranks started$"
  has bind-none "$work/bind-off.log" "^ +1 +0 +1 +[^ ]+ +1 +[0-9,-]+ +[0-9]+ +no "
  # A job restricted to CPU 0 (as a batch system's cpuset would): a warning, not an error; 2 ranks on the
  # one core are oversubscribed, so dsmoe does not bind them.
  if command -v taskset >/dev/null; then
    OMP_NUM_THREADS=1 timeout 60 taskset -c 0 "${mpiexec[@]}" --bind-to none -n 2 "$dsmoe" "$deck" \
      run.output_dir="$work/b4" train.steps=1 >"$work/bind-restricted.log" 2>&1 ||
      { fail "bind: taskset -c 0: exit $?"; show "$work/bind-restricted.log"; }
    has bind-restricted "$work/bind-restricted.log" "^binding: warning: the ranks of node 0 may use 1 of its [0-9]+ PUs \(0\): the batch system or launcher restricted them, which is normal under Slurm$"
    has bind-restricted "$work/bind-restricted.log" "^binding: not bound: 2 ranks on 1 core of node 0"
  fi
fi

# The reference run was a singleton: it says so.
has singleton "$work/ref.log" "^dsmoe [^ ]+: 1 rank on 1 node \(1 per node; rank 0 on [^)]+\), singleton \(no launcher\)$"

# What a job's tasks see when srun starts them without PMIx: each is a singleton in a 4-task step.
env SLURM_JOB_ID=99 SLURM_STEP_ID=3 SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_NUM_NODES=1 \
  SLURM_STEP_TASKS_PER_NODE=4 "$dsmoe" --check "$deck" >"$work/nopmix.log" 2>&1
has srun-without-pmix "$work/nopmix.log" "launched by srun: Slurm job 99 step 3, 1 node, tasks per node 4$"
has srun-without-pmix "$work/nopmix.log" "^dsmoe: warning: srun started 4 tasks but MPI sees 1 rank: launch with srun --mpi=pmix$"

report
