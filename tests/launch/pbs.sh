#!/usr/bin/env bash
# jobscripts/pbs.qsub run as PBS would run it, with no PBS server: the environment a PBS Pro job gets
# (PBS_JOBID, PBS_NODEFILE listing localhost 4 times as select=1:ncpus=8:mpiprocs=4 does, PBS_O_WORKDIR,
# NCPUS, OMP_NUM_THREADS from ompthreads), the deck and overrides in DSMOE_DECK / DSMOE_ARGS as qsub -v
# passes them. Checks: it runs in PBS_O_WORKDIR, launches 4 ranks with mpiexec, dsmoe reports the PBS
# job and node file, deck keys in the environment reach dsmoe, losses match a one-process reference.
# Then, with a stand-in mpiexec that records its command line, the launch a 2-node job would make
# (8 ranks, 4 per node, NCPUS shared out as threads, binding, DSMOE_* forwarded). Outside a job it fails.
# Usage: pbs.sh <dsmoe> <source dir>
source "$(dirname "$0")/common.sh"
script=$src/jobscripts/pbs.qsub

reference "$work/ref" 4 run.log_every=1
mkdir -p "$work/job"
for i in 1 2 3 4; do echo localhost; done >"$work/nodefile"
pbs_env=(PBS_JOBID=4242.pbs-test PBS_JOBNAME=dsmoe PBS_ENVIRONMENT=PBS_BATCH PBS_O_WORKDIR="$work/job"
         PBS_O_HOST=login1 PBS_NODEFILE="$work/nodefile" NCPUS=8 OMP_NUM_THREADS=2)

# From / : the script must move to PBS_O_WORKDIR itself (a relative output_dir lands there).
# DSMOE_BIND=none: 4 ranks x 2 threads do not fit this machine's cores.
(cd / && env "${pbs_env[@]}" DSMOE="$dsmoe" DSMOE_BIND=none DSMOE_DECK="$deck" \
   DSMOE_ARGS="run.output_dir=pbs_out" DSMOE_RUN_LOG_EVERY=1 timeout 60 bash "$script") >"$work/pbs.log" 2>&1
rc=$?
[ $rc -eq 0 ] && ok || { fail "pbs.qsub: exit $rc"; show "$work/pbs.log"; }
has pbs "$work/pbs.log" "^dsmoe job 4242.pbs-test: 1 node\(s\), 4 ranks \(4 per node\), 2 threads each: $dsmoe $deck run.output_dir=pbs_out$"
has pbs "$work/pbs.log" "^dsmoe [^ ]+: 4 ranks on 1 node \(4 per node; rank 0 on [^)]+\), launched by mpiexec \(Open MPI\): PBS job 4242.pbs-test, 1 node and 4 slots in PBS_NODEFILE, NCPUS 8$"
has pbs "$work/pbs.log" "2 OpenMP threads"
has pbs "$work/pbs.log" "^dsmoe job 4242.pbs-test: mpiexec exited with 0$"
has pbs "$work/job/pbs_out/resolved.deck" "^log_every = 1 +# env DSMOE_RUN_LOG_EVERY$"
finished pbs "$work/job/pbs_out" 6
same_metrics pbs "$work/ref/metrics.csv" "$work/job/pbs_out/metrics.csv"

# A 2-node job (select=2:ncpus=16:mpiprocs=4), launched through a stand-in that records what it got.
for h in node01 node02; do for i in 1 2 3 4; do echo "$h"; done; done >"$work/nodefile2"
cat >"$work/fake-mpiexec" <<FAKE
#!/usr/bin/env bash
echo "OMP_NUM_THREADS=\$OMP_NUM_THREADS" >"$work/fake.env"
printf '%s\n' "\$@" >"$work/fake.args"
FAKE
chmod +x "$work/fake-mpiexec"
(cd / && env -u OMP_NUM_THREADS PBS_JOBID=4243.pbs-test PBS_O_WORKDIR="$work/job" PBS_NODEFILE="$work/nodefile2" \
   NCPUS=16 DSMOE=/opt/dsmoe/bin/dsmoe MPIEXEC="$work/fake-mpiexec" DSMOE_TRAIN_STEPS=50 \
   bash "$script" my.deck train.lr=1e-3) >"$work/pbs2.log" 2>&1
rc=$?
[ $rc -eq 0 ] && ok || { fail "pbs.qsub with 2 nodes: exit $rc"; show "$work/pbs2.log"; }
has pbs-2-nodes "$work/pbs2.log" "^dsmoe job 4243.pbs-test: 2 node\(s\), 8 ranks \(4 per node\), 4 threads each: /opt/dsmoe/bin/dsmoe my.deck train.lr=1e-3$"
has pbs-2-nodes "$work/fake.env" "^OMP_NUM_THREADS=4$"
want="-n 8 --hostfile $work/nodefile2 --map-by ppr:4:node:PE=4 --bind-to core -x OMP_NUM_THREADS -x OMP_PLACES -x OMP_PROC_BIND"
got=$(tr '\n' ' ' <"$work/fake.args" 2>/dev/null)
[[ "$got" == "$want "* ]] && ok || fail "pbs-2-nodes: mpiexec got '$got', expected it to start with '$want'"
grep -qx -- "-x" "$work/fake.args" && grep -qx DSMOE_TRAIN_STEPS "$work/fake.args" && ok ||
  fail "pbs-2-nodes: DSMOE_TRAIN_STEPS not forwarded with -x: $got"
[[ "$got" == *" /opt/dsmoe/bin/dsmoe my.deck train.lr=1e-3 " ]] && ok || fail "pbs-2-nodes: command line ends wrongly: $got"

# Not in a PBS job: a clear failure, no launch.
(cd "$work" && env -u PBS_NODEFILE MPIEXEC="$work/fake-mpiexec" bash "$script") >"$work/nopbs.log" 2>&1 &&
  fail "pbs.qsub outside a job succeeded" || ok
has no-pbs "$work/nopbs.log" "PBS_NODEFILE: not set: submit with qsub"

report
