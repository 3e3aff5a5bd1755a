#!/usr/bin/env bash
# run.mode = generate on one rank (docs/inference.md): the files in and out. A short training run of a small
# top-1 MoE model (4 experts, byte vocabulary) writes a checkpoint; then:
# - the output is one JSON object per prompt in file order, with the fields docs/inference.md lists;
#   its completion decodes from its tokens; the JSON-lines prompts' own settings apply; a stop sequence
#   ends a completion and is cut from its text; an output's missing directories are made;
# - dsmoe --check of a generate deck reads the prompts and verifies the checkpoint;
# - a GPT-2 BPE tokenizer (vocab.json, merges.txt) encodes and decodes as a reference written here;
# - token ids without a tokenizer (generate.tokenizer = ids) draw the byte tokenizer's tokens from the
#   same ids, and serve a model of vocabulary 64, whose prompts can only be ids;
# - generate.eos_token ends a completion at that id (finish_reason eos, the id out of the text);
# - bad input (empty prompt file, malformed JSON line, unknown token id, a prompt longer than the
#   context, tokenizer files that do not fit model.vocab, a corrupt or mismatched checkpoint, no
#   checkpoint) is refused before any work, naming the file (and line), and an output file already there
#   is left as it was.
# The layouts on several ranks are tests/cli/generate_test.sh.
# Usage: generate_io_test.sh <dsmoe>
set -u
dsmoe=$1 mpiexec="" mpiflags=() # one rank: gen never starts a launcher
source "$(dirname "${BASH_SOURCE[0]}")/generate_lib.sh" generate_io_test

for f in txt jsonl; do
  gen_ref "$f" || continue
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
done

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

# Token ids only (generate.tokenizer = ids). On the byte model, the JSON-lines prompts given as their byte
# ids (no stop sequences) draw the same greedy tokens as the byte tokenizer did: the tokenizer changes no
# number. The output has no text (prompt and completion null).
python3 - "$work/prompts.jsonl" "$work/ids.jsonl" <<'PY' || fail "writing the token-id prompts"
import json, sys
with open(sys.argv[2], "w") as out:
    for l in open(sys.argv[1]):
        r = json.loads(l)
        r["tokens"] = r.pop("tokens", None) or list(r.pop("prompt").encode())
        r.pop("stop", None)
        out.write(json.dumps(r) + "\n")
PY
expect ids-generate 0 "token ids only \(model.vocab 256\)" -- "$dsmoe" "$deck" run.mode=generate checkpoint.resume="$ckpt" \
  generate.prompts="$work/ids.jsonl" generate.tokenizer=ids generate.output="$work/ids_out.jsonl" generate.batch=2 \
  generate.prefill_tokens=8
python3 - "$work/ids_out.jsonl" "$work/ref.jsonl" <<'PY' && ok || fail "ids: tokens or fields differ from the byte tokenizer's"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ref = [json.loads(l) for l in open(sys.argv[2])]
assert len(rows) == len(ref) == 5
same = 0
for r, f in zip(rows, ref):
    assert r["prompt"] is None and r["completion"] is None, r
    assert (r["id"], r["prompt_tokens"]) == (f["id"], f["prompt_tokens"]), (r, f)
    if f["finish_reason"] == "length":  # (a stop sequence of the text prompts would have cut it)
        assert (r["tokens"], r["finish_reason"]) == (f["tokens"], "length"), (r["tokens"], f["tokens"])
        same += 1
assert same >= 4, same
PY
# generate.eos_token: a completion ends at the first draw of that id (finish_reason eos), the id kept in
# tokens and its bytes left out of the text. The id is one the reference drew in its first completion
# (past its first token), so every completion is the reference's cut there, or whole where it never drew it.
eos=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["tokens"][2])' "$work/ref.txt")
gen 1 "$work/eos_bytes.jsonl" generate.prompts="$work/prompts.txt" generate.eos_token="$eos" generate.batch=2 \
  generate.prefill_tokens=8 || fail "eos bytes: exit $gen_rc"
gen 1 "$work/eos_ids.jsonl" generate.prompts="$work/ids.jsonl" generate.tokenizer=ids generate.eos_token="$eos" \
  generate.batch=2 generate.prefill_tokens=8 || fail "eos ids: exit $gen_rc"
for t in "bytes txt" "ids jsonl"; do
  set -- $t
  python3 - "$work/eos_$1.jsonl" "$work/ref.$2" "$eos" <<'PY' && ok || fail "generate.eos_token ($1): not cut at the id"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ref = [json.loads(l) for l in open(sys.argv[2])]
eos = int(sys.argv[3])
cut = 0
for r, f in zip(rows, ref):
    if f["finish_reason"] != "length": continue
    want = f["tokens"][:f["tokens"].index(eos) + 1] if eos in f["tokens"] else f["tokens"]
    assert r["tokens"] == want, (r["tokens"], f["tokens"], eos)
    assert r["finish_reason"] == ("eos" if eos in f["tokens"] else "length"), r
    if r["completion"] is not None:
        assert r["completion"] == bytes(want[:-1] if eos in want else want).decode("utf-8", "replace"), r
    cut += eos in f["tokens"]
assert cut >= 1 and (sys.argv[2].endswith(".jsonl") or rows[0]["finish_reason"] == "eos"), (cut, rows[0])
PY
done
expect eos-range nonzero "generate.eos_token = 256: generation draws ids below 256 only" -- "$dsmoe" "$deck" \
  run.mode=generate checkpoint.resume="$ckpt" generate.prompts="$work/prompts.txt" generate.eos_token=256

# A model whose vocabulary (64, the synthetic corpus) no text tokenizer fits: auto chooses ids; every id
# drawn is the model's, and text is refused naming the file and line.
ids64=(model.vocab=64 data.source=synthetic run.output_dir="$work/ids64" train.steps=5)
timeout -k 10 180 "$dsmoe" "$deck" "${ids64[@]}" >"$work/ids64_train.log" 2>&1 ||
  { fail "training the vocabulary-64 model: exit $?"; show "$work/ids64_train.log"; }
printf '{"tokens": [1, 2, 3], "max_new_tokens": 9}\n{"tokens": [63], "temperature": 3, "max_new_tokens": 40}\n' \
  >"$work/ids64.jsonl"
expect ids64-generate 0 "token ids only \(model.vocab 64\)" -- "$dsmoe" "$deck" "${ids64[@]}" run.mode=generate \
  checkpoint.resume=auto generate.prompts="$work/ids64.jsonl" generate.output="$work/ids64_out.jsonl"
python3 -c 'import json,sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [len(r["tokens"]) for r in rows] == [9, 40] and [r["finish_reason"] for r in rows] == ["length"] * 2, rows
assert all(0 <= t < 64 for r in rows for t in r["tokens"]) and rows[0]["prompt"] is None, rows' "$work/ids64_out.jsonl" &&
  ok || fail "ids64: the completions are not 9 and 40 ids of the model"
expect ids64-text nonzero "prompts.txt:1: a text prompt, but the tokenizer is token ids only" -- "$dsmoe" "$deck" \
  "${ids64[@]}" run.mode=generate checkpoint.resume=auto generate.prompts="$work/prompts.txt"
expect ids64-bytes nonzero "byte tokenizer needs model.vocab >= 256" -- "$dsmoe" "$deck" "${ids64[@]}" run.mode=generate \
  checkpoint.resume=auto generate.prompts="$work/ids64.jsonl" generate.tokenizer=bytes

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
expect tensor-training nonzero "generate.tensor_parallel = 2: tensor slicing is for run.mode = generate only" -- \
  "$dsmoe" --check "$deck" generate.tensor_parallel=2
finish generate_io_test
