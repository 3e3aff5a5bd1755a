#!/usr/bin/env bash
# dsmoe launched by mpiexec -n 4 and as a singleton: the launcher line, exit code, final checkpoint, and
# the losses of a one-process reference. Also the warning for srun without PMIx (faked environment).
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

# The reference run was a singleton: it says so.
has singleton "$work/ref.log" "^dsmoe [^ ]+: 1 rank on 1 node \(1 per node; rank 0 on [^)]+\), singleton \(no launcher\)$"

# What a job's tasks see when srun starts them without PMIx: each is a singleton in a 4-task step.
env SLURM_JOB_ID=99 SLURM_STEP_ID=3 SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_NUM_NODES=1 \
  SLURM_STEP_TASKS_PER_NODE=4 "$dsmoe" --check "$deck" >"$work/nopmix.log" 2>&1
has srun-without-pmix "$work/nopmix.log" "launched by srun: Slurm job 99 step 3, 1 node, tasks per node 4$"
has srun-without-pmix "$work/nopmix.log" "^dsmoe: warning: srun started 4 tasks but MPI sees 1 rank: launch with srun --mpi=pmix$"

report
