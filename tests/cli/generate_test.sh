#!/usr/bin/env bash
# run.mode = generate end to end on 1 to 8 ranks (docs/inference.md). A short training run of a small top-1
# MoE model (4 experts, byte vocabulary) writes a checkpoint; then:
# - greedy generation of text and JSON-lines prompts gives the same tokens on 1 rank and on 4 ranks with
#   ep 4, ep 2 x data 2, the hierarchical all-to-all forced (ranks_per_node 2), tensor slicing 2 and 4,
#   ep 2 x tensor 2 with and without the coordinated all-to-all, expert-slicing (ep 2 x tensor 2, and 8
#   ranks for 4 experts: ep 4 x tensor 2), and whatever generate.batch is; and on the strict kernel plugin
#   (1 rank; 4 ranks, ep 2 x tensor 2 over ncclsim, stream-ordered), the ordering a GPU would impose; and
#   on the cuda plugin run by the CUDA emulator (1 rank; 2 ranks with ep 2), where the build has it;
# - seeded sampling (temperature, top-k, top-p) gives each prompt the same tokens whatever its batch or
#   rank, and another seed gives other tokens;
# - in bf16 (run.precision) the greedy tokens do not depend on the layout either (tensor slicing included);
# - the log's progress lines and summary (counts, rates, latency percentiles, time breakdown) agree with
#   the output file;
# - a tensor-slicing layout that does not fit the model is refused on 2 ranks before any work.
# What needs one rank only (the output's fields, stop sequences, the BPE tokenizer, bad input) is
# tests/cli/generate_io_test.sh, which runs beside the multi-rank tests.
# Usage: generate_test.sh <dsmoe> <mpiexec> [mpiexec flags ...]
set -u
dsmoe=$1 mpiexec=$2
shift 2
mpiflags=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/generate_lib.sh" generate_test

# The cuda plugin on the CUDA emulator (tests/cuda_emu/), where the build has it: its own layouts below.
emu_layouts=()
if [ -f "$plugins/cuda_emu/libdsmoe_kernel_cuda.so" ]; then
  emu_layouts=("1 run.kernel_backend=cuda run.plugin_path=$plugins/cuda_emu"
               "2 moe.expert_parallel=2 run.kernel_backend=cuda run.plugin_path=$plugins/cuda_emu")
fi

for f in txt jsonl; do
  gen_ref "$f" || continue
  # The layouts, all of them on the JSON-lines prompts (their per-prompt settings take more paths) and
  # the first on the text prompts: the format is parsed before any layout matters, and the text parsing
  # runs in the reference generation above. DSMOE_TEST_LAYOUT_FORMATS="txt jsonl" runs all on both.
  all_layouts=1 n_layout=0
  [[ " ${DSMOE_TEST_LAYOUT_FORMATS:-jsonl} " == *" $f "* ]] || all_layouts=0
  for layout in "4 moe.expert_parallel=4" "4 moe.expert_parallel=2" \
                "4 moe.expert_parallel=4 moe.alltoall=hierarchical moe.ranks_per_node=2" "1 generate.batch=5" \
                "2 generate.batch=1" "2 generate.tensor_parallel=2" "4 generate.tensor_parallel=2 moe.expert_parallel=2" \
                "4 generate.tensor_parallel=2 moe.expert_parallel=2 generate.coordinated_alltoall=false" \
                "4 generate.tensor_parallel=4" "4 generate.tensor_parallel=2 moe.expert_parallel=2 generate.expert_slicing=true" \
                "8 generate.tensor_parallel=2 moe.expert_parallel=4 generate.expert_slicing=true" \
                "1 run.kernel_backend=strict run.plugin_path=$plugins" \
                "4 generate.tensor_parallel=2 moe.expert_parallel=2 run.kernel_backend=strict run.comm_backend=ncclsim run.plugin_path=$plugins" \
                "${emu_layouts[@]}"; do
    set -- $layout
    r=$1
    shift
    n_layout=$((n_layout + 1))
    [ "$all_layouts" = 1 ] || [ "$n_layout" = 1 ] || continue
    name="$f-np$r-$(echo "$*" | tr ' =./' '_-__')"
    gen "$r" "$work/$name" generate.prompts="$work/prompts.$f" generate.prefill_tokens=8 "$@"
    [ $? = 0 ] || { fail "generate $name: exit $gen_rc"; show "$work/$name.log"; continue; }
    [ "$(tokens_of "$work/$name")" = "$(tokens_of "$work/ref.$f")" ] && ok ||
      { fail "generate $name: greedy tokens differ from 1 rank"; diff <(tokens_of "$work/ref.$f") <(tokens_of "$work/$name") | head -4; }
  done
done

# The log against the output, on 2 data-parallel ranks (the summary gathers every rank's latencies):
# progress lines whose counts only grow up to the prompt count; the summary's prompt and token counts
# and rates; its percentiles recomputed from the JSON lines (times to first token; per-token latency =
# every gap after a sequence's first token; linear interpolation between the sorted values, as
# docs/inference.md says); the time breakdown adding up to 100%.
gen 2 "$work/sum.jsonl" generate.prompts="$work/prompts.txt" generate.batch=1 generate.prefill_tokens=8 run.log_every=1
if [ $? = 0 ]; then
  summary_failed() { fail "generate: log and summary do not match the output"; show "$work/sum.jsonl.log"; }
  python3 - "$work/sum.jsonl" "$work/sum.jsonl.log" <<'PY' && ok || summary_failed
import json, re, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
log = open(sys.argv[2]).read()
num = r"([0-9.]+)"
def pct(v, q):  # linear interpolation between order statistics
    v = sorted(v); x = q * (len(v) - 1); lo = int(x); f = x - lo
    return v[lo] * (1 - f) + v[lo + 1] * f if lo + 1 < len(v) else v[lo]
n, toks = len(rows), sum(r["completion_tokens"] for r in rows)
prog = [tuple(map(int, m)) for m in re.findall(r"^generate: (\d+)/(\d+) prompts \| (\d+) tokens \| [0-9.]+ tokens/s \| "
                                                r"[0-9:]+ elapsed \| ETA [0-9:?]+$", log, re.M)]
assert prog, "no progress line"
assert all(p[1] == n and p[0] <= n and p[2] <= toks for p in prog), prog
assert all(a[0] <= b[0] and a[2] <= b[2] for a, b in zip(prog, prog[1:])), prog
m = re.search(r"^generate: (\d+) prompts, (\d+) tokens in %s s: %s prompts/s, %s tokens/s$" % (num, num, num), log, re.M)
assert m, "no summary line"
assert (int(m[1]), int(m[2])) == (n, toks), (m[0], n, toks)
el = float(m[3])
for count, rate in ((n, float(m[4])), (toks, float(m[5]))):  # the elapsed time is printed to 0.01 s
    assert count / (el + 0.005) - 0.05 <= rate <= count / max(el - 0.005, 1e-9) + 0.05, (m[0], count, rate)
m = re.search(r"^generate: time to first token p50 %s ms, p90 %s ms, p99 %s ms; per-token latency p50 %s ms, "
              r"p90 %s ms, p99 %s ms$" % ((num,) * 6), log, re.M)
assert m, "no latency line"
ttft = [r["time_to_first_token_ms"] for r in rows]
gaps = [x for r in rows for x in r["token_latencies_ms"][1:]]
assert all(abs(r["token_latencies_ms"][0] - r["time_to_first_token_ms"]) <= 0.001 for r in rows)
want = [pct(ttft, q) for q in (0.5, 0.9, 0.99)] + [pct(gaps, q) for q in (0.5, 0.9, 0.99)]
got = [float(x) for x in m.groups()]
# the JSON rounds to 0.001 ms, the log to 0.01 ms
assert all(abs(g - w) <= 0.0051 + 0.001 for g, w in zip(got, want)), (got, want)
m = re.search(r"^generate: time \(mean over ranks\) attention %s s \(%s%%\), gating %s s \(%s%%\), all-to-all %s s "
              r"\(%s%%\), experts %s s \(%s%%\), other %s s \(%s%%\)$" % ((num,) * 10), log, re.M)
assert m, "no time breakdown"
assert abs(sum(float(m[i]) for i in (2, 4, 6, 8, 10)) - 100) <= 0.3, m[0]
PY
else
  fail "generate on 2 ranks for the summary: exit $gen_rc"; show "$work/sum.jsonl.log"
fi

# bfloat16 (run.precision, docs/precision.md): greedy tokens on 4 ranks with ep 2, on 1 rank with another
# batch and with tensor slicing (partial sums in float32, with and without the coordinated all-to-all)
# equal those of 1 rank (the exchange moves bfloat16 rows exactly; gating is float32 on the same widened
# inputs). Expert-slicing rounds each rank's partial expert output to bfloat16 before the sum: a near tie
# may pick another token, and from there on its sequence continues from another text, so one flip costs
# the rest of a sequence (5 of these 60 tokens for a flip at position 7). So: every sequence's first
# token must agree (the prefill's choice, where wrong slices already go astray), and at least 75% of the
# positions (wrong slices agree on almost none).
same_share() { python3 - "$1" "$2" <<'PY'
import json, sys
a, b = ([json.loads(l)["tokens"] for l in open(f)] for f in sys.argv[1:3])
n = sum(len(x) for x in a)
same = sum(x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb))
firsts = all(ta[:1] == tb[:1] for ta, tb in zip(a, b))
print(f"{same}/{n}" + ("" if firsts else " (and a first token differs)"))
sys.exit(0 if len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b)) and firsts and same >= 0.75 * n
         else 1)
PY
}
gen 1 "$work/bf16" generate.prompts="$work/prompts.txt" generate.batch=2 generate.prefill_tokens=8 run.precision=bf16
if [ $? != 0 ]; then
  fail "generate bf16 on 1 rank: exit $gen_rc"; show "$work/bf16.log"
else
  ok
  for layout in "4 moe.expert_parallel=2" "1 generate.batch=5" "2 generate.tensor_parallel=2" \
                "4 moe.expert_parallel=2 generate.tensor_parallel=2" "${emu_layouts[@]}"; do
    set -- $layout
    r=$1
    shift
    name="bf16-np$r-$(echo "$*" | tr ' =./' '_-__')"
    gen "$r" "$work/$name" generate.prompts="$work/prompts.txt" generate.prefill_tokens=8 run.precision=bf16 "$@"
    [ $? = 0 ] || { fail "generate $name: exit $gen_rc"; show "$work/$name.log"; continue; }
    [ "$(tokens_of "$work/$name")" = "$(tokens_of "$work/bf16")" ] && ok ||
      { fail "generate $name: greedy tokens differ from 1 rank"; diff <(tokens_of "$work/bf16") <(tokens_of "$work/$name") | head -4; }
  done
  name=bf16-expert-slicing
  gen 4 "$work/$name" generate.prompts="$work/prompts.txt" generate.prefill_tokens=8 run.precision=bf16 \
    moe.expert_parallel=2 generate.tensor_parallel=2 generate.expert_slicing=true
  if [ $? != 0 ]; then fail "generate $name: exit $gen_rc"; show "$work/$name.log"
  else agree=$(same_share "$work/bf16" "$work/$name") && ok ||
    fail "generate $name: only $agree greedy tokens agree with 1 rank"; fi
fi

# Seeded sampling: the same tokens for each prompt whatever the batch and the ranks; another seed differs.
samp=(generate.temperature=0.9 generate.top_k=40 generate.top_p=0.95 generate.prompts="$work/prompts.txt")
gen 1 "$work/s1" "${samp[@]}" generate.batch=4 generate.seed=7 && gen 1 "$work/s2" "${samp[@]}" generate.batch=1 generate.seed=7 &&
  gen 2 "$work/s3" "${samp[@]}" generate.batch=2 generate.seed=7 && gen 1 "$work/s4" "${samp[@]}" generate.batch=4 generate.seed=8
if [ $? = 0 ]; then
  [ "$(tokens_of "$work/s1")" = "$(tokens_of "$work/s2")" ] && [ "$(tokens_of "$work/s1")" = "$(tokens_of "$work/s3")" ] && ok ||
    fail "seeded sampling depends on the batch or the ranks"
  [ "$(tokens_of "$work/s1")" != "$(tokens_of "$work/s4")" ] && ok || fail "generate.seed changes nothing"
  [ "$(tokens_of "$work/s1")" != "$(tokens_of "$work/ref.txt")" ] && ok || fail "sampling gave the greedy tokens"
else
  fail "seeded sampling runs: exit $?"; show "$work/s1.log"
fi

# A layout that does not fit the model: refused before any work; an existing output stays as it was.
out="$work/keep.jsonl"
echo '{"kept": true}' >"$out"
expect tensor-heads nonzero "generate.tensor_parallel = 2 does not divide model.heads = 1" -- \
  "$mpiexec" "${mpiflags[@]}" -n 2 "$dsmoe" "$deck" run.mode=generate checkpoint.resume="$ckpt" \
  generate.prompts="$work/prompts.txt" generate.output="$out" generate.tensor_parallel=2 model.heads=1
[ "$(cat "$out")" = '{"kept": true}' ] && ok || fail "tensor-heads: the existing output changed"
finish generate_test
