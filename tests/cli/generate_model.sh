# tests/cli/generate_model.sh: the inference tests' model and inputs (sourced, not run), shared by
# tests/cli/generate_test.sh and scripts/gpu-check's generate step, so that both generate from the same
# model: a 2-layer top-1 MoE (4 experts, byte vocabulary) trained 300 steps on English-like text, so
# that completions are mostly printable ASCII (stop sequences are picked from them).
# defines: generate_model_files <dir> [python command...]: writes <dir>/model.deck (training into
# <dir>/train), <dir>/corpus.txt and the prompt files <dir>/prompts.txt and <dir>/prompts.jsonl.

generate_model_files() {
  local dir=$1
  shift
  local python=("$@")
  [ ${#python[@]} -gt 0 ] || python=(python3)
  cat >"$dir/model.deck" <<DECK
[run]
output_dir = $dir/train
log_every = 50
[model]
vocab = 256
seq_len = 48
layers = 2
hidden = 32
heads = 4
[moe]
experts = 4
[train]
steps = 300
batch = 8
lr = 5e-3
eval_batches = 1
[data]
source = text
path = $dir/corpus.txt
[generate]
max_new_tokens = 12
DECK
  "${python[@]}" - "$dir/corpus.txt" <<'PY' || return 1
import random, sys
random.seed(5)
words = "the a of and to in is it that for on with as was by at be this from or an are expert model token layer".split()
with open(sys.argv[1], "w") as f:
    for _ in range(3000):
        f.write(" ".join(random.choice(words) for _ in range(12)) + ".\n")
PY
  # Prompts: plain text lines, and JSON lines with text, token ids and settings of their own.
  printf 'Hello\nthe quick brown fox\na\n\x01\x02 bytes\nMoE\n' >"$dir/prompts.txt"
  cat >"$dir/prompts.jsonl" <<'JSONL'
{"prompt": "first prompt", "id": "p1"}
{"tokens": [72, 105, 33], "max_new_tokens": 5}
{"prompt": "tab\there", "id": 7, "stop": ["zz"]}
{"prompt": "longer prompt that takes a few prefill chunks", "max_new_tokens": 3}
{"prompt": "x"}
JSONL
}
