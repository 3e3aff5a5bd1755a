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
"${MPIEXEC:-mpirun}" -n "$ranks" "${opts[@]}" "$dsmoe" "$deck" "$@"
rc=$?
echo "dsmoe local: mpirun exited with $rc"
exit "$rc"
