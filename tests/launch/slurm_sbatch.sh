#!/usr/bin/env bash
# `sbatch --wait jobscripts/slurm.sbatch DECK key=value ...` in the local Slurm, as a user submits it:
# the job's exit code is sbatch's; the script runs in the submit directory, passes the overrides on,
# sets OMP_NUM_THREADS from --cpus-per-task, launches 4 ranks with srun; its USR1 trap (what
# --signal=B:USR1@300 sends before the time limit; sent here with scancel while the ranks are held)
# forwards it through srun, all 4 ranks checkpoint and the job exits 75 (DSMOE_REQUEUE=0: no scontrol
# requeue here); a second job with checkpoint.resume=auto finishes, and the losses match a one-process
# reference with every step once. A job with a missing deck fails with its message.
# Skips (77) when no local Slurm runs (the slurm_start fixture starts it).
# Usage: slurm_sbatch.sh <dsmoe> <source dir>
source "$(dirname "$0")/common.sh"
source "$src/tests/held_signal.sh" # hold, wait_pending, release_held
slurm=$src/scripts/slurm-local
"$slurm" status || { echo "SKIP: no local Slurm (scripts/slurm-local start)"; exit 77; }
eval "$("$slurm" env)"
script=$src/jobscripts/slurm.sbatch
export DSMOE=$dsmoe
# The local node declares 8 CPUs on fewer cores, so CPU binding cannot be real here.
export DSMOE_CPU_BIND=none
# The requeue itself is left out: a requeued job waits for the scheduler well past this test's time.
export DSMOE_REQUEUE=0

# submit <name> <args...>: sbatch --wait in the background; sets job (id), sb (sbatch's PID).
submit() {
  local name=$1 i
  shift
  # The job's own limit (--time=2, minutes) ends a stuck job first; the shell's is a backstop past it (a
  # sanitized build on a slow machine took 47 s for the resume job). The script asks for USR1 300 s before
  # the limit, which for a 2-minute job Slurm sends within seconds: before srun has launched the ranks
  # (the signal reaches none of them, and the trap forwards only once) or before dsmoe has its handler
  # (the ranks die of it). So every job here gets it 10 s before the limit; the test sends its own.
  SBATCH_SIGNAL=B:USR1@10 timeout -k 10 150 sbatch --wait --parsable --time=2 --job-name="dsmoe-$name-test" "$script" "$@" \
    >"$work/$name.sbatch" 2>&1 &
  sb=$!
  job=
  for i in $(seq 100); do
    job=$(grep -Eo '^[0-9]+' "$work/$name.sbatch" 2>/dev/null | head -1)
    [ -n "$job" ] && break
    sleep 0.1
  done
}

# collect <name>: wait for sbatch; sets rc; cancels the job if sbatch timed out.
collect() {
  wait "$sb"
  rc=$?
  if [ $rc -eq 124 ]; then
    fail "$1: sbatch --wait timed out; job $job cancelled"
    scancel "$job" 2>/dev/null
  fi
}

# signal_held <job>: USR1 to the batch shell, as Slurm sends it, with the job's ranks held (SIGSTOP) until
# it is pending at every rank. Its path (scancel, slurmctld, the shell's trap, srun, each task) took
# longer than a fast machine's whole 600-step run (3 s) in one CI run, which then ended without a stop.
signal_held() {
  local ranks
  ranks=$(scontrol listpids "$1" 2>/dev/null | awk '$3 == "0" && $4 != "-" { print $1 }')
  if [ "$(echo $ranks | wc -w)" != 4 ]; then fail "job $1: scontrol listpids gave rank PIDs '$ranks', expected 4"; return; fi
  hold $ranks || { release_held; fail "job $1: the ranks ended before they could be held: make the run longer"; return; }
  scancel --batch --signal=USR1 "$1" && ok || fail "scancel --batch --signal=USR1 $1"
  wait_pending USR1 30 $ranks
  [ $pending -gt 0 ] && ok || fail "job $1: USR1 reached no rank in 30 s"
  release_held
}
trap 'release_held; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

reference "$work/ref" 4 train.steps=600
cd "$work" || exit 1

submit train "$deck" train.steps=600 moe.expert_parallel=2 run.output_dir=sbatch_out
[ -n "$job" ] && ok || { fail "no job id from sbatch"; cat "$work/train.sbatch"; }
log=$work/dsmoe-$job.out
# Once training runs, USR1 the batch shell as the time limit would. Not before: a signal that came while
# srun was still launching the step reached no rank (a sanitized build on a loaded machine took over 30 s
# to reach its first step, and the job then ran to the end). The wait is bounded by the job's own limit.
started=0
for i in $(seq 1300); do
  grep -q '^step ' "$log" 2>/dev/null && { started=1; break; }
  kill -0 "$sb" 2>/dev/null || break
  sleep 0.1
done
if [ $started = 0 ]; then
  fail "job $job logged no training step before sbatch ended or 130 s passed"
  tail -20 "$log" 2>/dev/null | sed 's/^/  | /'
else
  signal_held "$job"
fi
collect train
[ $rc -eq 75 ] && ok || { fail "sbatch --wait: exit $rc, expected 75 (checkpoint on USR1)"; cat "$work/train.sbatch"; }
has sbatch "$log" "^dsmoe job $job: 1 node\(s\) localhost, 4 tasks, 2 threads each: $dsmoe $deck train.steps=600 moe.expert_parallel=2 run.output_dir=sbatch_out$"
has sbatch "$log" "^dsmoe [^ ]+: 4 ranks on 1 node \(4 per node; rank 0 on [^)]+\), launched by srun: Slurm job $job step 0, 1 node, tasks per node 4, 2 CPUs per task$"
has sbatch "$log" "2 OpenMP threads"
has sbatch-usr1 "$log" "^dsmoe job $job: [0-9:]+ SIGUSR1: walltime nearly over: asking dsmoe for a checkpoint$"
# srun forwards the signal to each task on its own: the ranks agree at the next step boundary on those
# it had reached by then (3 of 4 in one run), and one is enough to stop them all.
has sbatch-usr1 "$log" "^stopped: SIGUSR1 at step [0-9]+ of 600 \([1-4] of 4 ranks got a signal\): exit code 75"
has sbatch-usr1 "$log" "^dsmoe job $job: srun exited with 75$"
has sbatch "$work/sbatch_out/resolved.deck" "^expert_parallel = 2 +# command line$"
step=$(sed -nE 's/^stopped: SIGUSR1 at step ([0-9]+) .*/\1/p' "$log")
[ -n "$step" ] && finished sbatch-usr1 "$work/sbatch_out" "$step"

submit resume "$deck" train.steps=600 moe.expert_parallel=2 run.output_dir=sbatch_out checkpoint.resume=auto
collect resume
[ $rc -eq 0 ] && ok || { fail "sbatch --wait (resume): exit $rc"; cat "$work/resume.sbatch"; }
has sbatch-resume "$work/dsmoe-$job.out" "^resumed from .*step_0*$step.safetensors at step $step "
has sbatch-resume "$work/dsmoe-$job.out" "^dsmoe job $job: srun exited with 0$"
finished sbatch "$work/sbatch_out" 600
same_metrics sbatch "$work/ref/metrics.csv" "$work/sbatch_out/metrics.csv"
dups=$(tail -n +2 "$work/sbatch_out/metrics.csv" | cut -d, -f1 | sort | uniq -d | head -3)
[ -z "$dups" ] && ok || fail "sbatch: steps logged twice in metrics.csv: $dups"

submit missing "$work/nope.deck"
collect missing
[ $rc -ne 0 ] && [ $rc -ne 124 ] && ok || fail "a job without its deck: sbatch exit $rc, expected a failure"
has sbatch-missing "$work/dsmoe-$job.out" "cannot open deck '$work/nope.deck'"
has sbatch-missing "$work/dsmoe-$job.out" "^dsmoe job $job: srun exited with [1-9]"

[ "$failures" -eq 0 ] || "$slurm" logs
report
