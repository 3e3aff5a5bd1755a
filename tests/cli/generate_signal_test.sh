#!/usr/bin/env bash
# A generation stopped by a walltime signal, and resumed (run.signals, generate.resume; docs/inference.md
# "Stopping and resuming"). The small model of generate_model.sh generates a few thousand prompts (greedy
# and sampled, of several lengths); a signal mid-run, to the process or to one rank of two, must stop every
# rank at one step with exit 75, leave the finished completions in <output>.partial (its header, then
# exactly the finished prompts, as many as the stop line says) and an output already there as it was;
# resuming (on another layout, with another batch) must write the output an uninterrupted run writes,
# timings aside, and remove the .partial. A run killed outright resumes from its last generate.save_every
# save. Refused before any work: a resume with another checkpoint,
# another prompt file, a .partial whose line names another prompt's id. Without a .partial, a resume
# generates every prompt.
# Usage: generate_signal_test.sh <dsmoe> <source dir> <mpiexec> [mpiexec flags ...]
set -u
dsmoe=$1 src=$2 mpiexec=$3
shift 3
mpiflags=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/generate_lib.sh" generate_signal_test # work, deck, ckpt, gen, expect
source "$src/tests/held_signal.sh"                                             # launch, hold, wait_pending, release_held
trap 'release_held; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
export OMP_WAIT_POLICY=passive

n=1500
python3 - "$work/many.jsonl" "$n" <<'PY'
import json, sys
words = "the a of and to in is it that expert model token layer".split()
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        r = {"prompt": " ".join(words[(i * 7 + k) % len(words)] for k in range(1 + i % 4)), "max_new_tokens": 8 + i % 13}
        if i % 3 == 1: r.update(temperature=0.8, top_p=0.9)
        if i % 5 == 0: r["id"] = "q%d" % i
        f.write(json.dumps(r) + "\n")
PY
head -n 100 "$work/many.jsonl" >"$work/fewer.jsonl"
args=(run.mode=generate checkpoint.resume="$ckpt" generate.prompts="$work/many.jsonl" run.log_every=1)

# The reference: uninterrupted, batch 4.
gen 1 "$work/ref.jsonl" generate.prompts="$work/many.jsonl" generate.batch=4 ||
  { fail "reference generation: exit $gen_rc"; show "$work/ref.jsonl.log"; finish generate_signal_test; exit 1; }

# same_output <name> <out.jsonl> [reference]: every line equals the reference's, the timing fields aside.
same_output() {
  python3 - "$2" "${3:-$work/ref.jsonl}" <<'PY' && ok || fail "$1: the output differs from the uninterrupted run's"
import json, sys
strip = lambda l: {k: v for k, v in json.loads(l).items() if k not in ("time_to_first_token_ms", "token_latencies_ms")}
a, b = [[strip(l) for l in open(f)] for f in sys.argv[1:]]
assert len(a) == len(b), (len(a), len(b))
bad = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
assert not bad, (len(bad), bad[:3], a[bad[0]], b[bad[0]])
PY
}

# stopped <name> <ranks> <target: launcher|rank1> <out> key=value...: a generation signalled (USR1) once
# it has finished some prompts, held while the signal reaches the ranks; expects exit 75, the stop line,
# the .partial with exactly the finished prompts; sets `finished`.
stopped() {
  local name=$1 ranks=$2 target=$3 out=$4 rc to receivers pids i
  shift 4
  launch "$ranks" "$out.log" "${args[@]}" generate.output="$out" "$@"
  for i in $(seq 1200); do grep -qE "^generate: [1-9][0-9]*/$n prompts" "$out.log" 2>/dev/null && break; sleep 0.02; done
  pids=$(cat "$out.log".pid.* 2>/dev/null)
  hold $pids || { release_held; fail "$name: the run ended before it could be held"; }
  case $target in
    launcher) to=$pid receivers=$pids ;;
    rank1) to=$(cat "$out.log.pid.1") receivers=$to ;;
  esac
  kill -USR1 $to
  wait_pending USR1 30 $receivers || fail "$name: SIGUSR1 pending at $pending ranks after 30 s"
  release_held
  wait $pid
  rc=$?
  [ $rc = 75 ] && ok || { fail "$name: exit $rc after SIGUSR1, expected 75"; show "$out.log"; return 1; }
  finished=$(sed -nE "s/^stopped: SIGUSR1 after ([0-9]+) of $n prompts \\((1) of $ranks ranks? got a signal\\).*$(basename "$out").partial; exit code 75.*/\\1/p" "$out.log")
  [ -n "$finished" ] && [ "$finished" -ge 1 ] && [ "$finished" -lt $n ] && ok ||
    { fail "$name: no 'stopped: SIGUSR1 after K of $n prompts (1 of $ranks ...)' line with 0 < K < $n"; show "$out.log"; return 1; }
  # The header names the checkpoint and the prompt count; then the finished prompts, each the reference's.
  python3 - "$out.partial" "$work/ref.jsonl" "$ckpt" "$n" "$finished" <<'PY' && ok || fail "$name: the .partial file"
import json, sys
path, ref, ckpt, n, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
lines = open(path).read().split("\n")
assert lines[-1] == "", "no final newline"
h = json.loads(lines[0])
assert h == {"dsmoe_partial": 1, "checkpoint": ckpt, "step": 300, "prompts": h["prompts"], "prompt_count": n}, h
rows = [json.loads(l) for l in lines[1:-1]]
assert len(rows) == k, (len(rows), k)
idx = [r["index"] for r in rows]
assert idx == sorted(set(idx)), "not in prompt order, or repeated"
strip = lambda r: {x: v for x, v in r.items() if x not in ("time_to_first_token_ms", "token_latencies_ms")}
want = [json.loads(l) for l in open(ref)]
assert all(strip(r) == strip(want[r["index"]]) for r in rows)
PY
}

# 1 rank, an output already there: it is left as it was; the resume (batch 2) completes it.
out="$work/one.jsonl"
echo '{"kept": true}' >"$out"
if stopped usr1-1rank 1 launcher "$out" generate.batch=2; then
  [ "$(cat "$out")" = '{"kept": true}' ] && ok || fail "usr1-1rank: a stop changed the existing output"
  expect check-resume 0 "resuming $out.partial: $finished of $n prompts finished there, $((n - finished)) left" -- \
    "$dsmoe" --check "$deck" "${args[@]}" generate.output="$out" generate.resume=true
  gen 1 "$out" "${args[@]:2}" generate.batch=2 generate.resume=true checkpoint.resume=auto
  [ $gen_rc = 0 ] && ok || { fail "usr1-1rank: resume exit $gen_rc"; show "$out.log"; }
  grep -q "resuming $out.partial: $finished of $n prompts finished there" "$out.log" && ok || fail "usr1-1rank: no 'resuming' line"
  grep -q "^generate: $((n - finished)) prompts, " "$out.log" && ok || fail "usr1-1rank: the summary does not count this run's prompts"
  same_output usr1-1rank "$out"
  [ ! -e "$out.partial" ] && ok || fail "usr1-1rank: the .partial is still there"
fi

# 2 ranks (ep 2), the signal to rank 1 only: both stop at one step. Resumed on 1 rank.
out="$work/two.jsonl"
if stopped usr1-one-rank-of-2 2 rank1 "$out" moe.expert_parallel=2 generate.batch=2; then
  # Refused before any work: another checkpoint file, another prompt file, a line of another prompt.
  cp "$ckpt" "$work/copy.safetensors"
  expect resume-other-checkpoint nonzero "generate.resume: .*two.jsonl.partial was generated with checkpoint .*, and checkpoint.resume = .*copy.safetensors is another file" -- \
    "$dsmoe" "$deck" "${args[@]}" generate.output="$out" generate.resume=true checkpoint.resume="$work/copy.safetensors"
  expect resume-no-checkpoint nonzero "generate.resume: .*two.jsonl.partial was generated with checkpoint .*, and checkpoint.resume is not set \\(set" -- \
    "$dsmoe" "$deck" "${args[@]}" generate.output="$out" generate.resume=true checkpoint.resume=
  expect resume-other-prompts nonzero "two.jsonl.partial:1: the stopped generation had $n prompts, but .*fewer.jsonl has 100" -- \
    "$dsmoe" "$deck" "${args[@]}" generate.output="$out" generate.resume=true generate.prompts="$work/fewer.jsonl"
  cp "$out.partial" "$work/keep.partial"
  sed -i '2s/"id":[^,]*,/"id":"elsewhere",/' "$out.partial"
  expect resume-damaged nonzero "two.jsonl.partial:2:[0-9]+: prompt 0 has id \"elsewhere\" here but \"q0\" in .*many.jsonl" -- \
    "$dsmoe" "$deck" "${args[@]}" generate.output="$out" generate.resume=true
  cp "$work/keep.partial" "$out.partial"
  gen 1 "$out" "${args[@]:2}" generate.resume=true
  [ $gen_rc = 0 ] && ok || { fail "usr1-one-rank-of-2: resume exit $gen_rc"; show "$out.log"; }
  same_output usr1-one-rank-of-2 "$out"
fi

# Killed outright (SIGKILL: nothing is written then) after generate.save_every saved some finished prompts:
# the resume (on 2 ranks, ep 2) goes on from the last save.
out="$work/killed.jsonl"
launch 1 "$out.log" "${args[@]}" generate.output="$out" generate.batch=2 generate.save_every=0.05
for i in $(seq 1500); do grep -qE "^generate: saved [1-9][0-9]* finished prompts to $out.partial" "$out.log" && break; sleep 0.02; done
kill -KILL $pid
wait $pid
saved=$(sed -nE "s/^generate: saved ([0-9]+) finished prompts to .*/\1/p" "$out.log" | tail -1)
if [ -n "$saved" ] && [ "$saved" -ge 1 ] && [ "$(($(wc -l <"$out.partial") - 1))" -ge "$saved" ]; then
  ok
  gen 2 "$out" "${args[@]:2}" generate.resume=true moe.expert_parallel=2 checkpoint.resume=auto
  [ $gen_rc = 0 ] && ok || { fail "killed: resume exit $gen_rc"; show "$out.log"; }
  same_output killed "$out"
else
  fail "killed: no 'generate: saved K finished prompts' line with K >= 1 and a .partial that holds them"; show "$out.log"
fi

# generate.resume without a .partial: every prompt (the first 100 of the file: the reference's first 100
# lines), said so.
gen 1 "$work/fresh.jsonl" "${args[@]:2}" generate.resume=true generate.prompts="$work/fewer.jsonl"
grep -q "generate.resume: no $work/fresh.jsonl.partial, so every prompt is generated" "$work/fresh.jsonl.log" && ok ||
  fail "resume without a .partial: no note"
head -n 100 "$work/ref.jsonl" >"$work/ref100.jsonl"
same_output fresh "$work/fresh.jsonl" "$work/ref100.jsonl"
finish generate_signal_test
