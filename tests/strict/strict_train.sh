#!/usr/bin/env bash
# The whole training path on the strict asynchronous kernel plugin (tests/plugins/kernel/strict) must give the
# same bits as on the cpu plugin: losses, gradient norms, expert loads (metrics.csv without its timing
# columns) and the checkpoint files. strict queues every op until a wait, keeps its memory unreadable
# by the host while work is queued (or always, with the stream-ordered comm plugin) and poisons fresh
# allocations, so a missing wait, a host read of plugin memory or a read of unzeroed memory changes the
# numbers or crashes. Run with the host-progressed "mpi" comm plugin and with the stream-ordered
# "mpistream" one (collectives run inside the kernel queue).
# usage: strict_train.sh <dsmoe> <test plugin dir> <mpiexec> [mpiexec flags...]
# Environment: STRICT_BREAK=<op> passes DSMOE_STRICT_BREAK to the strict runs (the test must then fail);
# STRICT_ONLY="base ep2" runs only those configurations (tests/strict/strict_break.sh, and the sanitized
# build's subset in tests/strict/strict_train.cmake).
set -u
dsmoe=$1 plugdir=$2
shift 2
mpiexec=("$@")
work=$(mktemp -d /tmp/dsmoe_strict.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
failures=0 pass=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { echo "ok: $*"; pass=$((pass + 1)); }

if [ ! -f "$plugdir/libdsmoe_kernel_strict.so" ]; then echo "skip: no strict plugin in $plugdir"; exit 77; fi

deck="$work/s.deck"
cat > "$deck" <<DECK
[run]
log_every = 1
plugin_path = $plugdir
[model]
vocab = 32
seq_len = 16
layers = 4
hidden = 32
heads = 2
[moe]
experts = 8
every = 2
capacity_factor = 1.0
min_capacity = 2
[train]
steps = 4
batch = 8
lr = 3e-3
warmup_steps = 1
eval_every = 2
eval_batches = 1
[data]
synthetic_sources = 2
synthetic_branching = 2
[checkpoint]
every = 2
keep = 3
final = true
DECK

# run <name> <ranks> [key=value ...]
run() {
  local name=$1 n=$2
  shift 2
  local env=()
  case "$name" in strict*) [ -n "${STRICT_BREAK:-}" ] && env=(-x DSMOE_STRICT_BREAK="$STRICT_BREAK");; esac
  if ! "${mpiexec[@]}" -n "$n" "${env[@]}" "$dsmoe" "$deck" run.output_dir="$work/$name" "$@" > "$work/$name.log" 2>&1; then
    fail "$name: dsmoe on $n ranks failed"; tail -15 "$work/$name.log"; return 1
  fi
}

# The tensor bytes of a safetensors file (after its 8-byte length and JSON header, which records the deck).
tensors() { local n; n=$(od -An -t u8 -N 8 "$1" | tr -d ' '); tail -c +$((9 + n)) "$1"; }

# metrics without the timing columns (tokens_per_s, elapsed_s)
numbers() { awk -F, 'BEGIN { OFS = "," } { $6 = ""; $8 = ""; print }' "$1"; }

# The configurations that also run on mpi_cuda (the CUDA-aware mode: device buffers straight to MPI) under
# the test double of a CUDA-aware MPI (tests/plugins/comm/fake_cuda_aware_mpi.c, preloaded).
mpi_cuda_configs=" ep2_zero1 bf16_ep2_zero1 "
fake_cuda_mpi="$plugdir/libdsmoe_fake_cuda_aware_mpi.so"

# same <config name> <ranks> [key=value ...]: cpu+mpi against strict+mpi, strict+mpistream, strict
# declaring device memory + mpi through the core's pinned host staging ("staged") and, for
# mpi_cuda_configs, strict declaring device memory + mpi_cuda under the fake CUDA-aware MPI.
same() {
  local name=$1 n=$2 comms="mpi mpistream staged"
  shift 2
  [ -n "${STRICT_ONLY:-}" ] && [[ " $STRICT_ONLY " != *" $name "* ]] && return
  [[ "$mpi_cuda_configs" == *" $name "* ]] && comms="$comms mpi_cuda"
  run "cpu_$name" "$n" run.kernel_backend=cpu run.comm_backend=mpi "$@" || return
  for comm in $comms; do
    local s="strict_${comm}_$name"
    # mpistream runs collectives inside the strict queue: memory stays closed outside it, and a host
    # callback drives its queue (as a device would run it without a host wait).
    # staged: the strict plugin declares device memory, so mpi reaches it only through host staging.
    # mpi_cuda: memory closed to the host but inside the fake MPI's collectives (strict_protect.c).
    unset DSMOE_STRICT_ALWAYS_CLOSED DSMOE_STRICT_EAGER_HOST_FN DSMOE_STRICT_MEM_KIND LD_PRELOAD
    case "$comm" in
      mpistream) export DSMOE_STRICT_ALWAYS_CLOSED=1 DSMOE_STRICT_EAGER_HOST_FN=1;;
      staged) export DSMOE_STRICT_ALWAYS_CLOSED=1 DSMOE_STRICT_MEM_KIND=device;;
      mpi_cuda) export DSMOE_STRICT_ALWAYS_CLOSED=1 DSMOE_STRICT_MEM_KIND=device LD_PRELOAD="$fake_cuda_mpi" \
                  OMPI_MCA_btl_vader_single_copy_mechanism=none;;
    esac
    run "$s" "$n" run.kernel_backend=strict run.comm_backend=${comm/staged/mpi} "$@" || continue
    if ! diff <(numbers "$work/cpu_$name/metrics.csv") <(numbers "$work/$s/metrics.csv") > "$work/$s.diff"; then
      fail "$name on $n rank(s), strict + $comm: metrics differ from cpu"; head -6 "$work/$s.diff"; continue
    fi
    local c bad=0
    for c in "$work/cpu_$name"/checkpoints/*.safetensors; do
      cmp -s <(tensors "$c") <(tensors "$work/$s/checkpoints/$(basename "$c")") || { bad=1; echo "  differs: $(basename "$c")"; }
    done
    [ $bad = 0 ] && ok "$name on $n rank(s), strict + $comm: metrics and checkpoints bitwise equal to cpu" \
      || fail "$name on $n rank(s), strict + $comm: checkpoints differ"
  done
  unset DSMOE_STRICT_ALWAYS_CLOSED DSMOE_STRICT_EAGER_HOST_FN DSMOE_STRICT_MEM_KIND LD_PRELOAD
}

same base 1
same ep2 2 moe.expert_parallel=2
same ep2_zero1 4 moe.expert_parallel=2 train.zero_stage=1 train.overlap_grad_reduce=true
same no_overlap 2 train.overlap_grad_reduce=false
same dropless_top2 2 moe.expert_parallel=2 moe.drop_tokens=false moe.top_k=2
same residual_rts 2 moe.residual=true moe.token_selection=random
same pyramid 4 'moe.experts=4 x1, 8 x1' 'moe.expert_parallel=2 x1, 4 x1'
same hier 4 moe.expert_parallel=4 moe.alltoall=hierarchical moe.ranks_per_node=2 moe.noise=jitter
# bfloat16 activations (run.precision): the conversions and the widened gate input are ops like any other.
same bf16_ep2_zero1 4 run.precision=bf16 moe.expert_parallel=2 train.zero_stage=1 train.overlap_grad_reduce=true
same bf16_residual_jitter 2 run.precision=bf16 moe.residual=true moe.noise=jitter moe.drop_tokens=false
same bf16_top2 2 run.precision=bf16 moe.expert_parallel=2 moe.top_k=2
# Distillation (Mixture-of-Students): a 2-layer student of the base run's final checkpoint, its teacher
# forward-only on the same queue, KD on steps 1-3 (the KL and its gradient are plugin ops too).
if [ -z "${STRICT_ONLY:-}" ]; then
  same distill_bf16_ep2 2 run.precision=bf16 moe.expert_parallel=2 model.layers=2 \
    distill.teacher="$work/cpu_base/checkpoints/step_00000004.safetensors" distill.temperature=2 distill.stop_step=3
fi
# Resume: the step-2 checkpoint of the strict run, resumed on strict, ends where cpu ends.
if [ -z "${STRICT_ONLY:-}" ] && [ -f "$work/strict_mpi_ep2/checkpoints/step_00000002.safetensors" ]; then
  mkdir -p "$work/strict_resume/checkpoints"
  cp "$work/strict_mpi_ep2/checkpoints/step_00000002.safetensors" "$work/strict_resume/checkpoints/"
  run strict_resume 2 run.kernel_backend=strict moe.expert_parallel=2 checkpoint.resume=auto \
    && cmp -s <(tensors "$work/cpu_ep2/checkpoints/step_00000004.safetensors") \
              <(tensors "$work/strict_resume/checkpoints/step_00000004.safetensors") \
    && ok "strict resume from step 2 ends bitwise where cpu ends" || fail "strict resume differs from cpu"
fi

echo "$pass passed, $failures failed"
[ "$failures" = 0 ]
