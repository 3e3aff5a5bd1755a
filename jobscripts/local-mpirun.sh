#!/usr/bin/env bash
# dsmoe on one machine (a workstation, a cloud VM, an interactive node) with mpirun, no batch system:
#
#   jobscripts/local-mpirun.sh [DECK] [section.key=value ...]
#   DSMOE_RANKS=2 jobscripts/local-mpirun.sh inputs/quickstart.deck train.steps=50 run.output_dir=qs_2ranks
#
# DSMOE_RANKS ranks (default 4; must divide train.batch), each with the machine's cores shared out as
# OpenMP threads (DSMOE_THREADS overrides). DSMOE names the dsmoe binary (default build/bin/dsmoe of
# this checkout); MPIEXEC the launcher (default mpirun). Lines marked SITE are what a machine may change.
set -uo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
deck=${1:-$here/inputs/quickstart.deck}
[ $# -gt 0 ] && shift
dsmoe=${DSMOE:-$here/build/bin/dsmoe}
ranks=${DSMOE_RANKS:-4}
cores=$(nproc)

# SITE: the environment dsmoe was built with, e.g. `module load openmpi` or `spack load openmpi`.

threads=${DSMOE_THREADS:-$(( cores / ranks ))}
[ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=$threads OMP_PLACES=cores OMP_PROC_BIND=close

opts=()
# Open MPI refuses to run as root (containers, fresh VMs) unless told.
[ "$(id -u)" = 0 ] && opts+=(--allow-run-as-root)
if [ $(( ranks * threads )) -gt "$cores" ]; then
  # More ranks x threads than cores: let ranks share cores and, rather than spin waiting for messages,
  # give the core up (otherwise a waiting rank starves the one it waits for).
  opts+=(--oversubscribe --bind-to none --mca mpi_yield_when_idle 1)
  export OMP_WAIT_POLICY=passive
else
  # SITE: each rank on its own $threads cores; --map-by ppr:N:socket:PE=T spreads ranks over sockets.
  opts+=(--map-by "slot:PE=$threads" --bind-to core)
fi

echo "dsmoe local: $ranks ranks x $threads threads on $cores cores: $dsmoe $deck $*"
# mpirun in the background, so that a USR1 sent to this script (by a batch system around it, or by hand)
# can be passed on: mpirun forwards it to every rank, and dsmoe writes a checkpoint and exits 75
# (docs/parallel.md). Without this, USR1 would end the script and leave mpirun running.
"${MPIEXEC:-mpirun}" -n "$ranks" "${opts[@]}" "$dsmoe" "$deck" "$@" &
launcher=$!
got_usr1=0
trap 'got_usr1=1; kill -USR1 "$launcher" 2>/dev/null' USR1
while :; do
  got_usr1=0
  rc=0
  wait "$launcher" || rc=$?
  [ "$got_usr1" = 1 ] || break # wait returned because the trap ran, not because mpirun ended: wait again
done
echo "dsmoe local: mpirun exited with $rc"
exit "$rc"
