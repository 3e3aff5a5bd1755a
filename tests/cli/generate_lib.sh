# tests/cli/generate_lib.sh: what tests/cli/generate_test.sh and generate_io_test.sh share (sourced, not
# run, with the script's name as its argument): a work directory, the model of generate_model.sh trained
# there (300 steps, about a second), `gen`, `gen_ref` and `tokens_of`. Expects dsmoe, mpiexec and mpiflags;
# defines work, plugins, deck, ckpt, gen (and gen_rc), gen_ref, tokens_of, and lib.sh's counters.
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
  { fail "training the model: exit $? (124: over 180 s)"; show "$work/train.log"; finish "$1"; exit 1; }
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

# gen_ref <txt|jsonl>: the 1-rank reference generation of prompts.<f> into ref.<f>, counted as a check.
gen_ref() {
  gen 1 "$work/ref.$1" generate.prompts="$work/prompts.$1" generate.batch=2 generate.prefill_tokens=8
  [ $? = 0 ] && ok || { fail "generate $1 on 1 rank: exit $gen_rc"; show "$work/ref.$1.log"; return 1; }
}
