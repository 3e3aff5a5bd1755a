#!/usr/bin/env bash
# Generation end to end (run.mode = generate) on 1, 2 and 4 ranks with expert parallelism (ep = ranks),
# one thread per rank: the quickstart model (byte vocabulary) trained briefly, 64 prompts of 16 tokens,
# 32 new tokens each, generate.batch = 8 per rank, greedy. Each rank count runs `repeats` times,
# interleaved (1, 2, 4, 1, 2, 4, ...) so that a load change on a shared machine hits every count alike;
# every run's tokens must equal the 1-rank run's (the script fails otherwise).
# usage: bench/generate_ranks.sh [build dir] [hidden] [repeats] [rank counts...]
# Prints per run: ranks, tokens/s, and (second pass, generate.profile = true) the time breakdown.
set -euo pipefail
build=${1:-build}
hidden=${2:-128}
repeats=${3:-2}
shift $(( $# > 3 ? 3 : $# ))
ranks=("${@:-1 2 4}")
[ ${#ranks[@]} -eq 1 ] && read -r -a ranks <<<"${ranks[0]}"
src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d /tmp/dsmoe_genranks.XXXXXX)
trap 'rm -rf "$out"' EXIT
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMP_NUM_THREADS=1
model=(model.vocab=256 model.hidden="$hidden" model.heads=4 run.output_dir="$out/q")
"$build/bin/dsmoe" "$src/inputs/quickstart.deck" "${model[@]}" train.steps=20 train.eval_every=0 > "$out/train.log" 2>&1
python3 - "$out/p.jsonl" <<'PY'
import random, sys
random.seed(11)
with open(sys.argv[1], "w") as f:
    for i in range(64):
        f.write('{"tokens": [%s]}\n' % ", ".join(str(random.randrange(32, 127)) for _ in range(16)))
PY
echo "quickstart model at hidden $hidden, 64 prompts x 32 new tokens, batch 8 per rank, $(nproc --all) cores," \
     "load $(cut -d' ' -f1-3 /proc/loadavg)"
gen() { # gen <ranks> <tag> <profile>
  mpiexec --oversubscribe -n "$1" "$build/bin/dsmoe" "$src/inputs/quickstart.deck" "${model[@]}" run.mode=generate \
    checkpoint.resume=auto generate.prompts="$out/p.jsonl" generate.output="$out/$2.jsonl" generate.max_new_tokens=32 \
    generate.batch=8 moe.expert_parallel="$1" generate.profile="$3" > "$out/$2.log" 2>&1
  python3 -c 'import json,sys; print([json.loads(l)["tokens"] for l in open(sys.argv[1])])' "$out/$2.jsonl" > "$out/$2.tok"
}
for rep in $(seq 1 "$repeats"); do
  for n in "${ranks[@]}"; do
    gen "$n" "r$n-$rep" false
    [ -f "$out/ref.tok" ] || cp "$out/r$n-$rep.tok" "$out/ref.tok"
    cmp -s "$out/ref.tok" "$out/r$n-$rep.tok" || { echo "ranks=$n: tokens differ from the first run" >&2; exit 1; }
    echo "ranks=$n run=$rep $(grep -o '[0-9.]* tokens/s' "$out/r$n-$rep.log" | tail -1)"
  done
done
for n in "${ranks[@]}"; do
  gen "$n" "p$n" true
  echo "ranks=$n profile: $(grep -o 'attention .*' "$out/p$n.log" | tail -1)"
done
