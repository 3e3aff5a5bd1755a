#!/usr/bin/env bash
# Walltime signals (run.signals, docs/parallel.md): a tiny deck trains many steps on 1 and 2 ranks and is
# sent SIGUSR1 / SIGTERM mid-run: to the process, to mpiexec (Open MPI forwards USR1 to every rank), and
# to one rank of two only (the ranks must agree). Each must exit 75 after writing the checkpoint of the
# step it names; a resume to the end must give the uninterrupted run's final tensors bit for bit and its
# metrics.csv (timing columns aside) with every step once. Also: a signal during a long evaluation ends it
# and stops at its step, a second signal exits 76 at once, a run killed (SIGKILL) after its last
# checkpoint.every resumes without duplicate rows, run.signals = "" leaves a signal's default action, and
# a bad name is a deck error.
# Usage: signal_test.sh <dsmoe> <source dir> <mpiexec> [mpiexec flags ...]
set -u
dsmoe=$1
src=$2
mpiexec=$3
shift 3
mpiflags=("$@")
work=$(mktemp -d /tmp/dsmoe_signal.XXXXXX)
trap 'release_held; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
unset DSMOE_PLUGIN_PATH
export OMP_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1 OMP_WAIT_POLICY=passive
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
steps=1500
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # fail, ok, show, expect, finish
source "$src/tests/held_signal.sh"               # launch, hold, wait_pending, release_held

deck="$work/tiny.deck"
cat >"$deck" <<DECK
[run]
log_every = 1
[model]
vocab = 32
seq_len = 8
layers = 2
hidden = 16
heads = 2
[moe]
experts = 4
[train]
steps = $steps
batch = 4
eval_every = 100
eval_batches = 1
[data]
synthetic_sources = 2
synthetic_branching = 2
[checkpoint]
keep = 3
DECK


# wait_rows <metrics.csv> <rows>: until the run has logged that many steps (60 s at most).
wait_rows() {
  for _ in $(seq 1200); do
    [ -f "$1" ] && [ "$(wc -l <"$1")" -gt "$2" ] && return 0
    sleep 0.05
  done
  return 1
}

# send_held <name> <out> <target: launcher|all|rank1> <signal>...: each signal sent to the target while
# the run's ranks (PIDs in <out>.log.pid.*) are held, until it is pending at every rank it should reach;
# then the ranks go on. The run is 1500 steps of under a millisecond: without the hold a signal forwarded
# by mpiexec, or sent by a test script the machine ran late, could come after the last step.
send_held() {
  local name=$1 out=$2 target=$3 ranks to receivers sig last
  shift 3
  ranks=$(cat "$out.log".pid.*)
  hold $ranks || { release_held; fail "$name: the run ended before it could be held"; return 1; }
  last=$(tail -1 "$out/metrics.csv" | cut -d, -f1)
  [ "$last" != "$steps" ] || fail "$name: the run had logged its last step before it was held"
  case $target in
    launcher) to=$pid receivers=$ranks ;; # the singleton itself, or mpiexec, which forwards it to every rank
    all) to=$ranks receivers=$ranks ;;
    rank1) to=$(cat "$out.log.pid.1") receivers=$to ;;
  esac
  for sig; do
    kill -"$sig" $to
    wait_pending "$sig" 30 $receivers || fail "$name: SIG$sig pending at $pending of $(echo $receivers | wc -w) ranks after 30 s"
  done
  release_held
}

# tensors <checkpoint>: the safetensors data section (every tensor's bytes, after the JSON header, which
# also holds the deck and so differs between a fresh and a resumed run).
tensors() {
  local n
  n=$(od -An -tu8 -N8 "$1" | tr -d ' ')
  tail -c +$((8 + n + 1)) "$1"
}

# same_run <name> <reference dir> <dir>: final checkpoint bitwise, metrics without the timing columns
# (tokens_per_s, elapsed_s), each step once.
same_run() {
  local name=$1 ck
  ck=$(printf 'checkpoints/step_%08d.safetensors' $steps)
  if [ ! -s "$2/$ck" ] || [ ! -s "$3/$ck" ]; then fail "$name: missing $2/$ck or $3/$ck"; return; fi
  if cmp -s <(tensors "$2/$ck") <(tensors "$3/$ck"); then ok; else fail "$name: final tensors differ from the uninterrupted run"; fi
  if [ "$(tensors "$3/$ck" | wc -c)" -gt 1000 ]; then ok; else fail "$name: $3/$ck has no tensor data"; fi
  if cmp -s <(cut -d, -f6,8 --complement "$2/metrics.csv") <(cut -d, -f6,8 --complement "$3/metrics.csv"); then ok
  else fail "$name: metrics.csv differs from the uninterrupted run"
    diff <(cut -d, -f1-5 "$2/metrics.csv") <(cut -d, -f1-5 "$3/metrics.csv") | head -5; fi
  local dups rows
  dups=$(tail -n +2 "$3/metrics.csv" | cut -d, -f1 | sort | uniq -d | head -3 | tr '\n' ' ')
  rows=$(tail -n +2 "$3/metrics.csv" | wc -l)
  [ -z "$dups" ] && [ "$rows" = $steps ] && ok || fail "$name: metrics.csv has $rows rows, repeated steps: '$dups'"
}

# interrupted <name> <ranks> <reference dir> <signal> <target: launcher|all|rank1>: signal mid-run,
# expect 75 and the named step's checkpoint, resume to the end, compare with the reference.
interrupted() {
  local name=$1 ranks=$2 ref=$3 sig=$4 target=$5 out="$work/$1" rc step
  launch "$ranks" "$out.log" run.output_dir="$out"
  if ! wait_rows "$out/metrics.csv" 5; then fail "$name: no metrics rows"; kill -KILL $pid; wait $pid; show "$out.log"; return; fi
  send_held "$name" "$out" "$target" "$sig"
  wait $pid
  rc=$?
  [ $rc = 75 ] && ok || { fail "$name: exit $rc after SIG$sig, expected 75"; show "$out.log"; return; }
  step=$(sed -nE "s/^stopped: SIG$sig at step ([0-9]+) of $steps \(([0-9]) of $ranks ranks got a signal\).*exit code 75.*/\1/p" "$out.log")
  if [ -z "$step" ]; then fail "$name: no 'stopped: SIG$sig at step N' line"; show "$out.log"; return; fi
  [ "$step" -ge 5 ] && [ "$step" -lt $steps ] && ok || fail "$name: stopped at step $step"
  [ -s "$(printf '%s/checkpoints/step_%08d.safetensors' "$out" "$step")" ] && ok || fail "$name: no checkpoint of step $step"
  [ "$(tail -1 "$out/metrics.csv" | cut -d, -f1)" = "$step" ] && ok || fail "$name: metrics.csv does not end at step $step"
  if [ "$target" = rank1 ]; then
    grep -q "(1 of 2 ranks got a signal)" "$out.log" && ok || fail "$name: not '1 of 2 ranks'"
  fi
  launch "$ranks" "$out.resume.log" run.output_dir="$out" checkpoint.resume=auto
  wait $pid
  rc=$?
  [ $rc = 0 ] && ok || { fail "$name: resume exit $rc"; show "$out.resume.log"; return; }
  grep -q "resumed from .*step_$(printf %08d "$step").safetensors at step $step" "$out.resume.log" && ok ||
    fail "$name: did not resume from step $step"
  same_run "$name" "$ref" "$out"
}

# References: uninterrupted runs on 1 and 2 ranks (capacity is per rank, so they differ).
reference() {
  launch $1 "$work/ref$1.log" run.output_dir="$work/ref$1"
  wait $pid || { fail "reference run on $1 ranks: exit $?"; show "$work/ref$1.log"; }
}
reference 1
interrupted usr1-1rank 1 "$work/ref1" USR1 launcher
# In the sanitized build (cmake/sanitize.cmake) the leak check unwinds the whole stack at every malloc,
# which makes dsmoe about 3x slower. The runs above keep it: the exits after a whole run, after a stop
# and after a resume. The runs below take the same paths on 2 ranks and with other signals and targets,
# under ASan and UBSan without it.
if [[ "${ASAN_OPTIONS:-}" == *detect_leaks=1:fast_unwind_on_malloc=0* ]]; then
  export ASAN_OPTIONS=${ASAN_OPTIONS/detect_leaks=1:fast_unwind_on_malloc=0/detect_leaks=0}
fi
reference 2
interrupted usr1-mpiexec 2 "$work/ref2" USR1 launcher
interrupted term-1rank 1 "$work/ref1" TERM launcher
interrupted term-ranks 2 "$work/ref2" TERM all
interrupted usr1-one-rank 2 "$work/ref2" USR1 rank1

# A second signal before the first is handled: the handler exits at once with 76.
out="$work/twice"
launch 1 "$out.log" run.output_dir="$out"
wait_rows "$out/metrics.csv" 5
send_held twice "$out" launcher USR1 TERM
wait $pid
rc=$?
[ $rc = 76 ] && ok || { fail "second signal: exit $rc, expected 76"; show "$out.log"; }
grep -q "second signal: exiting at once (76)" "$out.log" && ok || fail "second signal: no message"

# A signal during a long evaluation (2 ranks, 100000 batches: several seconds): the evaluation ends at the
# next batch, the step's checkpoint is written and the run exits 75 at once; the step's row has no
# validation loss yet. The resume (with nothing left to train) runs that evaluation first and fills it into
# the row: then metrics.csv is the uninterrupted run's to that step (timing columns aside). The signal
# comes a second into the evaluation after step 1000.
# Rows every 7 steps: step 1000 is not one of them, and gets its row for the evaluation.
out="$work/eval"
long_eval=(train.eval_every=1000 train.eval_batches=100000 run.log_every=7)
launch 2 "$out.log" run.output_dir="$out" "${long_eval[@]}"
wait_rows "$out/metrics.csv" 142 # step 994
sleep 1
send_held eval "$out" launcher USR1
t0=$SECONDS
wait $pid
rc=$?
[ $rc = 75 ] && ok || { fail "eval: exit $rc after SIGUSR1 during the evaluation, expected 75"; show "$out.log"; }
[ $((SECONDS - t0)) -lt 4 ] && ok || fail "eval: the run took $((SECONDS - t0)) s to stop after the signal"
grep -qE "^eval: the evaluation after step 1000 stopped at batch [1-9][0-9]* of 100000 for a walltime signal" \
  "$out.log" && ok || { fail "eval: no 'evaluation after step 1000 stopped at batch' line"; show "$out.log"; }
grep -q "^stopped: SIGUSR1 at step 1000 of $steps (2 of 2 ranks got a signal)" "$out.log" && ok ||
  fail "eval: not stopped at step 1000"
ck="$out/checkpoints/step_00001000.safetensors"
[ -s "$ck" ] && ok || fail "eval: no checkpoint of step 1000"
valid_at() { awk -F, -v s="$2" 'NR > 1 && $1 == s { print "[" $9 "]" }' "$1"; }
# same_fill <name> <ranks> <out> <ref dir> <step> <key=value>...: the uninterrupted run into <ref dir>; the
# validation loss a resume filled into <out>'s row <step> must be that run's.
same_fill() {
  local name=$1 ranks=$2 out=$3 ref=$4 step=$5 filled want
  shift 5
  launch "$ranks" "$out.ref.log" run.output_dir="$ref" "$@"
  wait $pid || { fail "$name: the uninterrupted run: exit $?"; show "$out.ref.log"; }
  filled=$(valid_at "$out/metrics.csv" "$step") want=$(valid_at "$ref/metrics.csv" "$step")
  [ "$filled" != "[]" ] && [ "$filled" = "$want" ] && ok ||
    fail "$name: step $step's validation loss after the resume is $filled, the uninterrupted run's $want"
}
[ "$(valid_at "$out/metrics.csv" 1000)" = "[]" ] && ok || fail "eval: step 1000's row has a validation loss"
launch 2 "$out.resume.log" run.output_dir="$out" "${long_eval[@]}" train.steps=1000 checkpoint.resume=auto
wait $pid || { fail "eval: resume exit $?"; show "$out.resume.log"; }
same_fill eval 2 "$out" "$work/eval-ref" 1000 "${long_eval[@]}"
cmp -s <(cut -d, -f6,8 --complement "$out/metrics.csv") \
  <(awk -F, 'NR == 1 || $1 <= 1000' "$work/eval-ref/metrics.csv" | cut -d, -f6,8 --complement) &&
  ok || fail "eval: metrics.csv differs from the uninterrupted run's to step 1000 (timing columns aside)"

# The final evaluation cut short (1 rank, 200 steps): the run stops with 75 at its last step, its
# checkpoint saying so. The requeued job (nothing left to train) finishes the evaluation; a signal during
# that ends it at once with 75, writing nothing, and the next one fills the row: the uninterrupted run's.
out="$work/final"
final=(train.steps=200 train.eval_every=0 train.eval_batches=100000)
launch 1 "$out.log" run.output_dir="$out" "${final[@]}"
wait_rows "$out/metrics.csv" 199
sleep 1
send_held final "$out" launcher USR1
wait $pid
rc=$?
[ $rc = 75 ] && grep -q "^stopped: SIGUSR1 at step 200 of 200" "$out.log" && ok ||
  { fail "final: exit $rc after SIGUSR1 during the final evaluation, expected 75 at step 200"; show "$out.log"; }
launch 1 "$out.r1.log" run.output_dir="$out" "${final[@]}" checkpoint.resume=auto
for _ in $(seq 300); do grep -q "^resumed from" "$out.r1.log" && break; sleep 0.1; done
sleep 1
r1=$(cat "$out.r1.log.pid.0")
hold "$r1" && kill -USR1 "$r1" && wait_pending USR1 30 "$r1"
release_held
wait $pid
rc=$?
[ $rc = 75 ] && grep -q "^stopped: SIGUSR1 during the evaluation after step 200, which the resume was finishing" \
  "$out.r1.log" && ok || { fail "final: exit $rc after SIGUSR1 during the resume's evaluation, expected 75"; show "$out.r1.log"; }
[ "$(ls "$out/checkpoints")" = step_00000200.safetensors ] && [ "$(valid_at "$out/metrics.csv" 200)" = "[]" ] && ok ||
  fail "final: the stopped resume wrote something: $(ls "$out/checkpoints" | tr '\n' ' ') row 200 $(valid_at "$out/metrics.csv" 200)"
launch 1 "$out.r2.log" run.output_dir="$out" "${final[@]}" checkpoint.resume=auto
wait $pid || { fail "final: second resume exit $?"; show "$out.r2.log"; }
same_fill final 1 "$out" "$work/final-ref" 200 "${final[@]}"

# Killed outright after its last checkpoint.every: rows past that checkpoint are dropped on resume. The
# kill is asynchronous: when it lands just after a checkpoint there is nothing to trim, so try again (a
# fresh run each time) until the metrics end past the last checkpoint.
for attempt in 1 2 3 4 5; do
  out="$work/killed$attempt"
  launch 1 "$out.log" run.output_dir="$out" checkpoint.every=50
  wait_rows "$out/metrics.csv" $((70 + 20 * attempt))
  kill -KILL $pid
  wait $pid
  last=$(tail -1 "$out/metrics.csv" | cut -d, -f1)
  ck=$(ls "$out/checkpoints" 2>/dev/null | grep -E '^step_[0-9]+\.safetensors$' | tail -1)
  [ -n "$ck" ] && [ "$last" -gt "$((10#${ck//[!0-9]/}))" ] && break
done
[ -n "$ck" ] && [ "$last" -gt "$((10#${ck//[!0-9]/}))" ] && ok ||
  fail "killed: expected rows after the last checkpoint ($ck, last row $last) in 5 tries: the test did not test trimming"
launch 1 "$out.resume.log" run.output_dir="$out" checkpoint.every=50 checkpoint.resume=auto
wait $pid || { fail "killed: resume exit $?"; show "$out.resume.log"; }
grep -q "^metrics: dropped .* after step" "$out.resume.log" && ok || fail "killed: resume did not say it dropped rows"
same_run killed "$work/ref1" "$out"

# run.signals = "": USR1 keeps its default action (the process dies of it).
out="$work/nosig"
launch 1 "$out.log" run.output_dir="$out" run.signals=
wait_rows "$out/metrics.csv" 5
send_held nosig "$out" launcher USR1
wait $pid
rc=$?
[ $rc = $((128 + $(kill -l USR1))) ] && ok || fail "run.signals='': exit $rc, expected death by SIGUSR1"

# The PBS job script's own walltime signal: a 12 s walltime with DSMOE_SIGNAL_BEFORE=4 sends USR1 to
# mpiexec after about 8 s; dsmoe exits 75 and the script resubmits itself (a stand-in qsub records how).
# Run by hand with an argument holding a space and a checkpoint.resume: the resubmission must carry the
# arguments whole and resume with auto after them (a later value wins). Then the resubmitted job itself,
# from what qsub recorded: it resumes from the signal's checkpoint and resubmits once more, the resume
# not added twice.
mkdir -p "$work/pbs/bin"
printf 'localhost\nlocalhost\n' >"$work/pbs/nodefile"
cat >"$work/pbs/bin/qsub" <<QSUB
#!/usr/bin/env bash
printf '%s\n' "\$@" >"$work/pbs/qsub.args"
env | grep '^DSMOE' | sort >"$work/pbs/qsub.env"
declare -p DSMOE_ARGS_QUOTED DSMOE_DECK >"$work/pbs/qsub.vars" 2>/dev/null
echo 4243.pbs-test
QSUB
chmod +x "$work/pbs/bin/qsub"
pbs_out="$work/pbs/my out"
pbs_job() { # pbs_job <log> [args...]: the script as a PBS job with a 12 s walltime would run it
  local log=$1
  shift
  (cd / && env PATH="$work/pbs/bin:$PATH" PBS_JOBID=4242.pbs-test PBS_O_WORKDIR="$work/pbs" \
     PBS_NODEFILE="$work/pbs/nodefile" NCPUS=2 PBS_WALLTIME=00:00:12 DSMOE_SIGNAL_BEFORE=4 DSMOE="$dsmoe" \
     DSMOE_BIND=none DSMOE_JOBSCRIPT="$src/jobscripts/pbs.qsub" "$@" timeout 120 bash "$src/jobscripts/pbs.qsub") \
    >"$log" 2>&1
}
# The signal comes 8 s after the start: dsmoe must be training by then (its handlers are set), also on a
# loaded machine. checkpoint.resume= : a new run, given on the command line as a user may.
pbs_job "$work/pbs.log" DSMOE_DECK="$deck" DSMOE_ARGS_QUOTED="$(printf '%q ' "run.output_dir=$pbs_out" \
  train.steps=100000 checkpoint.resume=)"
rc=$?
[ $rc = 75 ] && ok || { fail "pbs.qsub walltime signal: exit $rc, expected 75"; show "$work/pbs.log"; }
grep -q "walltime 12 s: USR1 to dsmoe in" "$work/pbs.log" && ok || fail "pbs.qsub: PBS_WALLTIME 00:00:12 not read as 12 s"
# mpiexec forwards the signal to each rank on its own: at the next step boundary 1 or 2 may have it.
grep -Eq "^stopped: SIGUSR1 at step [0-9]+ of 100000 \([12] of 2 ranks" "$work/pbs.log" && ok ||
  { fail "pbs.qsub: dsmoe did not stop on USR1"; show "$work/pbs.log"; }
grep -q "resubmitted as 4243.pbs-test" "$work/pbs.log" && ok || { fail "pbs.qsub: no resubmission"; show "$work/pbs.log"; }
want=("run.output_dir=$pbs_out" train.steps=100000 checkpoint.resume= checkpoint.resume=auto generate.resume=true)
got=$(source "$work/pbs/qsub.vars" 2>/dev/null && eval "a=($DSMOE_ARGS_QUOTED)" && printf '%s|' "${a[@]}")
[ "$got" = "$(printf '%s|' "${want[@]}")" ] && grep -qx "DSMOE_DECK=$deck" "$work/pbs/qsub.env" &&
  ! grep -q "^DSMOE_ARGS=\|^DSMOE_CHECKPOINT_RESUME=" "$work/pbs/qsub.env" && ok ||
  fail "pbs.qsub: the resubmission's deck or arguments: '$got'; $(cat "$work/pbs/qsub.env" 2>&1)"
grep -q "DSMOE_ARGS_QUOTED" "$work/pbs/qsub.args" 2>/dev/null && grep -qx "$src/jobscripts/pbs.qsub" "$work/pbs/qsub.args" &&
  ok || fail "pbs.qsub: qsub got $(tr '\n' ' ' <"$work/pbs/qsub.args" 2>&1)"
step1=$(grep -Eo "^stopped: SIGUSR1 at step [0-9]+" "$work/pbs.log" | grep -Eo "[0-9]+$")
# The resubmitted job, with the environment qsub passed on.
cp "$work/pbs/qsub.vars" "$work/pbs/qsub1.vars"
pbs_job "$work/pbs2.log" DSMOE_DECK="$deck" \
  DSMOE_ARGS_QUOTED="$(source "$work/pbs/qsub1.vars" 2>/dev/null; printf '%s' "$DSMOE_ARGS_QUOTED")"
rc=$?
[ $rc = 75 ] && grep -q "^resumed from .*step_0*${step1:-x}.safetensors at step ${step1:-x} " "$work/pbs2.log" && ok ||
  { fail "pbs.qsub resubmitted: exit $rc, expected 75 after resuming from step ${step1:-?}"; show "$work/pbs2.log"; }
got=$(source "$work/pbs/qsub.vars" 2>/dev/null && eval "a=($DSMOE_ARGS_QUOTED)" && printf '%s|' "${a[@]}")
[ "$got" = "$(printf '%s|' "${want[@]}")" ] && ok || fail "pbs.qsub: the second resubmission's arguments: '$got'"

# The Slurm script restarted by a requeue (SLURM_RESTART_COUNT=1), by hand with a stand-in srun that records
# its arguments: checkpoint.resume=auto and generate.resume=true come after the job's own arguments, a
# checkpoint.resume among them included (the later value wins), and an argument with a space stays whole.
mkdir -p "$work/slurm/bin"
cat >"$work/slurm/bin/srun" <<SRUN
#!/usr/bin/env bash
printf '%s\n' "\$@" >"$work/slurm/srun.args"
SRUN
chmod +x "$work/slurm/bin/srun"
(cd / && env PATH="$work/slurm/bin:$PATH" SLURM_SUBMIT_DIR="$work/slurm" SLURM_RESTART_COUNT=1 SLURM_JOB_ID=77 \
   DSMOE=/opt/dsmoe bash "$src/jobscripts/slurm.sbatch" my.deck "run.output_dir=a b" checkpoint.resume=s5.safetensors) \
  >"$work/slurm.log" 2>&1
rc=$?
got=$(sed -n '/^\/opt\/dsmoe$/,$p' "$work/slurm/srun.args" 2>/dev/null | paste -sd'|' -)
[ $rc = 0 ] && [ "$got" = "/opt/dsmoe|my.deck|run.output_dir=a b|checkpoint.resume=s5.safetensors|checkpoint.resume=auto|generate.resume=true" ] &&
  ok || { fail "slurm.sbatch restart: exit $rc, srun got '$got'"; show "$work/slurm.log"; }

out=$("$dsmoe" --check "$deck" run.signals=USR1,KILL 2>&1)
rc=$?
[ $rc = 1 ] && grep -q "run.signals = USR1,KILL: 'KILL' is not one of HUP INT QUIT USR1 USR2 TERM XCPU" <<<"$out" && ok ||
  fail "bad run.signals: exit $rc, $out"
"$dsmoe" --check "$deck" run.signals="sigusr2 xcpu" >/dev/null 2>&1 && ok || fail "run.signals='sigusr2 xcpu' refused"

finish signal_test
