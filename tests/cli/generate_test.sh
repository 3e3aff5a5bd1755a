#!/usr/bin/env bash
# run.mode = generate end to end (docs/inference.md). A short training run of a small top-1 MoE model
# (4 experts, byte vocabulary) writes a checkpoint; then:
# - greedy generation of text and JSON-lines prompts gives the same tokens on 1 rank and on 4 ranks with
#   ep 4, ep 2 x data 2, the hierarchical all-to-all forced (ranks_per_node 2), tensor slicing 2 and 4,
#   ep 2 x tensor 2 with and without the coordinated all-to-all, expert-slicing (ep 2 x tensor 2, and 8
#   ranks for 4 experts: ep 4 x tensor 2), and whatever generate.batch is; and on the strict kernel plugin
#   (1 rank; 4 ranks, ep 2 x tensor 2 over ncclsim, stream-ordered), the ordering a GPU would impose;
# - seeded sampling (temperature, top-k, top-p) gives each prompt the same tokens whatever its batch or
#   rank, and another seed gives other tokens;
# - in bf16 (run.precision) the greedy tokens do not depend on the layout either (tensor slicing included);
# - the output is one JSON object per prompt in file order, with the fields docs/inference.md lists;
#   its completion decodes from its tokens; a stop sequence ends a completion and is cut from its text;
# - the log's progress lines and summary (counts, rates, latency percentiles, time breakdown) agree with
#   the output file;
# - bad input (empty prompt file, malformed JSON line, unknown token id, a prompt longer than the
#   context, tokenizer files that do not fit model.vocab, a corrupt or mismatched checkpoint, no
#   checkpoint) is refused before any work, naming the file (and line), and an output file already there
#   is left as it was.
# Usage: generate_test.sh <dsmoe> <mpiexec> [mpiexec flags ...]
set -u
dsmoe=$1
mpiexec=$2
shift 2
mpiflags=("$@")
work=$(mktemp -d /tmp/dsmoe_generate.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
unset DSMOE_PLUGIN_PATH
# The test plugins (strict: deferred queues and memory closed to the host, as a GPU's; ncclsim: the nccl
# plugin over its test double), beside the build's bin/.
plugins=$(cd "$(dirname "$dsmoe")/../tests/plugins" 2>/dev/null && pwd)
export OMP_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # fail, ok, show, expect, finish

source "$(dirname "${BASH_SOURCE[0]}")/generate_model.sh" # generate_model_files
deck="$work/model.deck"
generate_model_files "$work"
# Every run has a time limit, and a run that ignores SIGTERM is killed 10 s later (timeout -k): a hung
# launcher must fail its own check, not the whole test at ctest's limit.
timeout -k 10 180 "$dsmoe" "$deck" >"$work/train.log" 2>&1 ||
  { fail "training the model: exit $? (124: over 180 s)"; show "$work/train.log"; finish generate_test; exit 1; }
ckpt=$(ls "$work"/train/checkpoints/step_*.safetensors | tail -1)

# gen <ranks> <out> key=value...: generate from the checkpoint; the log beside the output.
gen() {
  local ranks=$1 out=$2
  shift 2
  if [ "$ranks" = 1 ]; then
    timeout -k 10 120 "$dsmoe" "$deck" run.mode=generate checkpoint.resume="$ckpt" generate.output="$out" "$@" >"$out.log" 2>&1
  else
    timeout -k 10 120 "$mpiexec" "${mpiflags[@]}" -n "$ranks" "$dsmoe" "$deck" run.mode=generate checkpoint.resume="$ckpt" \
      generate.output="$out" "$@" >"$out.log" 2>&1
  fi
  gen_rc=$? # what the fail messages report (124: over the time limit)
  return $gen_rc
}

# tokens_of <out.jsonl>: each line's index and tokens, one line per prompt.
tokens_of() { python3 -c 'import json,sys
for l in open(sys.argv[1]): r=json.loads(l); print(r["index"], r["tokens"])' "$1" 2>&1; }

for f in txt jsonl; do
  gen 1 "$work/ref.$f" generate.prompts="$work/prompts.$f" generate.batch=2 generate.prefill_tokens=8
  [ $? = 0 ] && ok || { fail "generate $f on 1 rank: exit $gen_rc"; show "$work/ref.$f.log"; continue; }
  # The output: valid JSON lines in file order, every field, completion text = its tokens' bytes (byte
  # vocabulary) unless a stop sequence cut it, finish reasons that hold.
  python3 - "$work/ref.$f" "$work/prompts.$f" <<'PY' && ok || fail "generate $f: output fields"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n = sum(1 for l in open(sys.argv[2], 'rb') if l.strip())
assert len(rows) == n, (len(rows), n)
keys = {"index", "id", "prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason",
        "time_to_first_token_ms", "tokens", "token_latencies_ms"}
for i, r in enumerate(rows):
    assert set(r) == keys, set(r) ^ keys
    assert r["index"] == i
    assert r["completion_tokens"] == len(r["tokens"]) == len(r["token_latencies_ms"]) >= 1
    assert r["finish_reason"] in ("length", "stop"), r["finish_reason"]
    text = bytes(r["tokens"]).decode("utf-8", "replace")
    if r["finish_reason"] == "length":
        assert r["completion"] == text, (r["completion"], text)
    else:
        assert text.startswith(r["completion"]) and len(r["completion"]) < len(text)
    assert r["time_to_first_token_ms"] >= 0 and all(x >= 0 for x in r["token_latencies_ms"])
print("ok")
PY
  # The layouts, all of them on the JSON-lines prompts (their per-prompt settings take more paths) and
  # the first on the text prompts: the format is parsed before any layout matters, and the text parsing
  # runs in the reference generation above. DSMOE_GENERATE_LAYOUT_FORMATS="txt jsonl" runs all on both.
  all_layouts=1 n_layout=0
  [[ " ${DSMOE_GENERATE_LAYOUT_FORMATS:-jsonl} " == *" $f "* ]] || all_layouts=0
  for layout in "4 moe.expert_parallel=4" "4 moe.expert_parallel=2" \
                "4 moe.expert_parallel=4 moe.alltoall=hierarchical moe.ranks_per_node=2" "1 generate.batch=5" \
                "2 generate.batch=1" "2 generate.tensor_parallel=2" "4 generate.tensor_parallel=2 moe.expert_parallel=2" \
                "4 generate.tensor_parallel=2 moe.expert_parallel=2 generate.coordinated_alltoall=false" \
                "4 generate.tensor_parallel=4" "4 generate.tensor_parallel=2 moe.expert_parallel=2 generate.expert_slicing=true" \
                "8 generate.tensor_parallel=2 moe.expert_parallel=4 generate.expert_slicing=true" \
                "1 run.kernel_backend=strict run.plugin_path=$plugins" \
                "4 generate.tensor_parallel=2 moe.expert_parallel=2 run.kernel_backend=strict run.comm_backend=ncclsim run.plugin_path=$plugins"; do
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
# may pick another token, so at least 95% of the positions must agree (wrong slices agree on almost none).
same_share() { python3 - "$1" "$2" <<'PY'
import json, sys
a, b = ([json.loads(l)["tokens"] for l in open(f)] for f in sys.argv[1:3])
n = sum(len(x) for x in a)
same = sum(x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb))
print(f"{same}/{n}")
sys.exit(0 if len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b)) and same >= 0.95 * n else 1)
PY
}
gen 1 "$work/bf16" generate.prompts="$work/prompts.txt" generate.batch=2 generate.prefill_tokens=8 run.precision=bf16
if [ $? != 0 ]; then
  fail "generate bf16 on 1 rank: exit $gen_rc"; show "$work/bf16.log"
else
  ok
  for layout in "4 moe.expert_parallel=2" "1 generate.batch=5" "2 generate.tensor_parallel=2" \
                "4 moe.expert_parallel=2 generate.tensor_parallel=2"; do
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

# The JSON-lines prompts' own settings: max_new_tokens 5 and 3; a stop sequence "zz" never drawn here
# leaves the length limit.
python3 - "$work/ref.jsonl" <<'PY' && ok || fail "per-prompt settings not applied"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [r["id"] for r in rows] == ["p1", 2, 7, 4, 5], [r["id"] for r in rows]
assert rows[1]["completion_tokens"] == 5 and rows[1]["prompt_tokens"] == 3 and rows[1]["prompt"] == "Hi!"
assert rows[3]["completion_tokens"] == 3
assert rows[0]["completion_tokens"] == 12
PY

# A stop sequence taken from a greedy completion (two printable characters that first occur after its
# third byte, in the first completion that has them) ends it there and is cut from the text.
pick=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); t=bytes(r["tokens"])
    for i in range(3, len(t)-1):
        if all(32 <= b < 127 and b != 92 for b in t[i:i+2]) and t.find(t[i:i+2]) == i:
            print(r["index"], t[i:i+2].hex()); sys.exit()' "$work/ref.txt")
if [ -z "$pick" ]; then
  fail "no printable pair in the greedy completions to stop at"; head -3 "$work/ref.txt"
else
  read -r line stop <<<"$pick"
  stop_text=$(printf "$(echo "$stop" | sed 's/../\\x&/g')")
  gen 1 "$work/stop.txt" generate.prompts="$work/prompts.txt" generate.stop="$stop_text"
  python3 - "$work/stop.txt" "$work/ref.txt" "$stop" "$line" <<'PY' && ok || fail "generate.stop did not end the completion"
import json, sys
line = int(sys.argv[4])
r = json.loads(open(sys.argv[1]).readlines()[line]); ref = json.loads(open(sys.argv[2]).readlines()[line])
stop = bytes.fromhex(sys.argv[3])
t = bytes(ref["tokens"]); cut = t.find(stop)
assert r["finish_reason"] == "stop", r["finish_reason"]
assert r["completion"] == t[:cut].decode("utf-8", "replace"), (r["completion"], t[:cut])
assert r["tokens"] == ref["tokens"][:len(r["tokens"])]
PY
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

# An output in directories that do not exist yet: they are made at the end (probed at the start).
expect new-output-dir 0 "wrote $work/new/dir/out.jsonl" -- "$dsmoe" "$deck" run.mode=generate checkpoint.resume="$ckpt" \
  generate.prompts="$work/prompts.txt" generate.output="$work/new/dir/out.jsonl"
[ "$(wc -l <"$work/new/dir/out.jsonl" 2>/dev/null)" = 5 ] && ok || fail "new-output-dir: no output with 5 lines"

# dsmoe --check of a generate deck reads the prompts and verifies the checkpoint; a bad prompt file fails it.
expect check-generate 0 "checkpoint .*$(basename "$ckpt") verifies \(step 300\)" -- \
  "$dsmoe" --check "$deck" run.mode=generate checkpoint.resume="$ckpt" generate.prompts="$work/prompts.jsonl"
printf '{"prompt": 3}\n' >"$work/check.jsonl"
expect check-generate-bad nonzero "check.jsonl:1" -- \
  "$dsmoe" --check "$deck" run.mode=generate checkpoint.resume="$ckpt" generate.prompts="$work/check.jsonl"

# A GPT-2 BPE tokenizer end to end: a byte-level vocab.json (the 256 byte symbols, a few merged tokens,
# <|endoftext|>) and merges.txt made here, a model of vocabulary 300 trained for a few steps; the
# prompts' token counts equal those of a reference BPE written here from GPT-2's definition, the prompt
# text comes back, and every completion decodes from its tokens through the same vocabulary.
python3 - "$work" <<'PY' || fail "writing the BPE files"
import json, sys
w = sys.argv[1]
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
cs = bs[:]
n = 0
for b in range(256):
    if b not in bs: bs.append(b); cs.append(256 + n); n += 1
byte_sym = {b: chr(c) for b, c in zip(bs, cs)}
vocab = {byte_sym[b]: b for b in range(256)}
merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("\u0120", "t"), ("\u0120t", "he"), ("o", "\u0120")]
for a, b in merges: vocab[a + b] = len(vocab)
vocab["<|endoftext|>"] = len(vocab)
json.dump(vocab, open(w + "/vocab.json", "w"), ensure_ascii=False)
open(w + "/merges.txt", "w").write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
json.dump({"byte_sym": byte_sym, "merges": merges}, open(w + "/bpe_ref.json", "w"))
PY
printf 'hello the world\nthe hell\no the\n' >"$work/bpe_prompts.txt"
bpedeck=(model.vocab=300 run.output_dir="$work/bpe" train.steps=5 data.synthetic_sources=8)
timeout -k 10 180 "$dsmoe" "$deck" "${bpedeck[@]}" >"$work/bpe_train.log" 2>&1 || { fail "training the BPE model: exit $?"; show "$work/bpe_train.log"; }
expect bpe-generate 0 "GPT-2 BPE" -- "$dsmoe" "$deck" "${bpedeck[@]}" run.mode=generate checkpoint.resume=auto \
  generate.prompts="$work/bpe_prompts.txt" generate.vocab_file="$work/vocab.json" generate.merges_file="$work/merges.txt" \
  generate.output="$work/bpe.jsonl" generate.max_new_tokens=6
python3 - "$work" <<'PY' && ok || fail "BPE generation: prompts or completions do not match the reference tokenizer"
import json, re, sys
w = sys.argv[1]
ref = json.load(open(w + "/bpe_ref.json")); vocab = json.load(open(w + "/vocab.json"))
sym = {int(k): v for k, v in ref["byte_sym"].items()}
ranks = {tuple(m): i for i, m in enumerate(ref["merges"])}
def bpe(word):
    parts = [sym[b] for b in word.encode()]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        r, i = min(pairs)
        if r == 1 << 30: break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [vocab[p] for p in parts]
def encode(text):  # GPT-2's split for lower-case ASCII words and single spaces
    return [t for piece in re.findall(r" ?[a-z]+| ?[^a-z ]+|\s+", text) for t in bpe(piece)]
inv = {v: k for k, v in vocab.items()}
unsym = {v: k for k, v in sym.items()}
texts = open(w + "/bpe_prompts.txt").read().split("\n")[:3]
rows = [json.loads(l) for l in open(w + "/bpe.jsonl")]
assert len(rows) == 3
for r, t in zip(rows, texts):
    assert r["prompt"] == t, (r["prompt"], t)
    assert r["prompt_tokens"] == len(encode(t)) < len(t.encode()), (r["prompt_tokens"], encode(t), t)
    out = b"".join(bytes(unsym[c] for c in inv[i]) if i in inv and inv[i] != "<|endoftext|>" else inv.get(i, "").encode()
                   for i in r["tokens"])
    if r["finish_reason"] == "length":
        assert r["completion"] == out.decode("utf-8", "replace"), (r["completion"], out)
print("ok")
PY
# Hot sampling over a model vocabulary (300) larger than the tokenizer's (265 ids): never a padding id.
expect bpe-hot 0 "GPT-2 BPE" -- "$dsmoe" "$deck" "${bpedeck[@]}" run.mode=generate checkpoint.resume=auto \
  generate.prompts="$work/bpe_prompts.txt" generate.vocab_file="$work/vocab.json" generate.merges_file="$work/merges.txt" \
  generate.output="$work/bpe_hot.jsonl" generate.max_new_tokens=30 generate.temperature=5
python3 -c 'import json,sys
n = len(json.load(open(sys.argv[2])))
toks = [t for l in open(sys.argv[1]) for t in json.loads(l)["tokens"]]
assert len(toks) >= 60 and max(toks) < n, (max(toks), n)' "$work/bpe_hot.jsonl" "$work/vocab.json" && ok ||
  fail "sampling drew an id the tokenizer cannot decode"

# Bad input: refused before any work, naming the file (and line); an existing output stays as it was.
out="$work/keep.jsonl"
echo '{"kept": true}' >"$out"
bad() { # bad <name> <regex> key=value...
  local name=$1 regex=$2
  shift 2
  expect "$name" nonzero "$regex" -- "$dsmoe" "$deck" run.mode=generate checkpoint.resume="$ckpt" generate.output="$out" "$@"
  [ "$(cat "$out")" = '{"kept": true}' ] && ok || fail "$name: the existing output changed"
}
: >"$work/empty.txt"
printf '{"prompt": "a"}\n{"prompt": "b",}\n' >"$work/malformed.jsonl"
printf '{"tokens": [1, 300]}\n' >"$work/badid.jsonl"
python3 -c 'print("y" * 60)' >"$work/long.txt"
printf '{"a": 0}' >"$work/vocab.json"
printf '#version: 0.2\n' >"$work/merges.txt"
bad empty-prompts "empty.txt.*(no prompt|empty)" generate.prompts="$work/empty.txt"
bad malformed-json "malformed.jsonl:2" generate.prompts="$work/malformed.jsonl"
bad unknown-token "badid.jsonl:1.*300" generate.prompts="$work/badid.jsonl"
bad too-long "long.txt:1.*(context|48)" generate.prompts="$work/long.txt"
bad tokenizer-files "vocab.json" generate.prompts="$work/prompts.txt" generate.vocab_file="$work/vocab.json" \
  generate.merges_file="$work/merges.txt"
bad no-prompts "generate.prompts" generate.prompts=
cp "$ckpt" "$work/corrupt.safetensors"
printf '\x55' | dd of="$work/corrupt.safetensors" bs=1 seek=$(( $(stat -c %s "$ckpt") - 100 )) conv=notrunc status=none
bad corrupt-checkpoint "corrupt.safetensors" generate.prompts="$work/prompts.txt" checkpoint.resume="$work/corrupt.safetensors"
bad mismatched-checkpoint "$(basename "$ckpt") holds a different model" generate.prompts="$work/prompts.txt" model.hidden=64
bad no-checkpoint "checkpoint.resume" generate.prompts="$work/prompts.txt" checkpoint.resume=
expect tensor-heads nonzero "generate.tensor_parallel = 2 does not divide model.heads = 1" -- \
  "$mpiexec" "${mpiflags[@]}" -n 2 "$dsmoe" "$deck" run.mode=generate checkpoint.resume="$ckpt" \
  generate.prompts="$work/prompts.txt" generate.output="$out" generate.tensor_parallel=2 model.heads=1
[ "$(cat "$out")" = '{"kept": true}' ] && ok || fail "tensor-heads: the existing output changed"
expect tensor-training nonzero "generate.tensor_parallel = 2: tensor slicing is for run.mode = generate only" -- \
  "$dsmoe" --check "$deck" generate.tensor_parallel=2
finish generate_test
