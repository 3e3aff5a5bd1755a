# scripts/gpu-check-steps.sh: the checks of scripts/gpu-check (sourced by it, not run): one function
# check_<step> per step, with what it needs alone (decks, comparisons, the MFU formula). They use the
# runner's helpers (timed, result, fig, note, pick, dry, emu, step_budget, py, kern_so) and its variables
# (B, REPORT, KERN, NCCL, DRY); the top of scripts/gpu-check says what each step shows and costs.
# shellcheck shell=bash

check_info() {
  if dry; then
    result info SKIP "(dry) no GPU: nvidia-smi, nvcc and the PyTorch ceilings not run; $(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    return
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > "$REPORT/info.log" 2>&1
  local rc=$?
  (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>&1 | tail -1 >> "$REPORT/info.log"
  result info "$(pass_if $rc)" "$(head -1 "$REPORT/info.log"); $(tail -1 "$REPORT/info.log"); host $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  # The ceilings of this card as it is (METHOD.md): random operands, CUDA events, median of 10.
  timed 60 ceilings.log env -u LD_LIBRARY_PATH python3 - <<'EOF'
import torch
assert torch.cuda.is_available(), "PyTorch sees no GPU"
def bench(fn, n=10, w=3):
    for _ in range(w): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[n // 2]
n = 8192
x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16); y = torch.randn_like(x)
bf16 = 2 * n**3 / bench(lambda: x @ y) / 1e12
torch.backends.cuda.matmul.allow_tf32 = False
x, y = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
fp32 = 2 * n**3 / bench(lambda: x @ y) / 1e12
src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
bw = 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e9
print(f"ceilings (torch {torch.__version__}, {torch.cuda.get_device_name()}, median of 10 after 3 warm-ups): "
      f"bf16 matmul {n}^3 {bf16:.0f} TFLOP/s, fp32 (no TF32) {fp32:.1f} TFLOP/s, 1 GiB device copy {bw:.0f} GB/s (read + write)")
print(f"bf16_tflops={bf16:.1f} fp32_tflops={fp32:.2f} copy_gbs={bw:.0f}")
EOF
  rc=$?
  CEIL_BF16=$(sed -n 's/.*bf16_tflops=\([0-9.]*\).*/\1/p' "$REPORT/ceilings.log")
  CEIL_FP32=$(sed -n 's/.*fp32_tflops=\([0-9.]*\).*/\1/p' "$REPORT/ceilings.log")
  result ceilings "$(pass_if $rc)" "$(why_rc $rc): $(grep -m1 '^ceilings' "$REPORT/ceilings.log" || tail_of ceilings.log 2)"
}

check_table() {
  local t="$B/tests/test_cuda_table"
  [ -x "$t" ] || { result table SKIP "no test_cuda_table in the bundle"; return; }
  DSMOE_CUDA_PLUGIN="$(kern_so cuda)" timed "$(pick 30 60)" table.log "$t"
  local rc=$?
  if [ $rc = 77 ] && [ "$DRY" = 1 ]; then result table SKIP "(dry) exit 77: the table and init's refusal checked, the rest needs a GPU"
  elif [ $rc = 0 ]; then result table PASS "test_cuda_table: $(grep -E 'PASSED' "$REPORT/table.log" | tail -1)"
  else result table FAIL "$(why_rc $rc) (77 = skipped, on a GPU machine): $(tail_of table.log)"; fi
}

# conformance_env <command...>: the suite with the candidate $KERN against the bundled cpu plugin.
conformance_env() {
  DSMOE_CONFORMANCE_KERNEL=$KERN DSMOE_CONFORMANCE_KERNEL_PATH="$(kern_so $KERN)" \
    DSMOE_CONFORMANCE_REFERENCE_PATH="$B/lib/dsmoe/libdsmoe_kernel_cpu.so" "$@"
}

check_conformance() {
  local t="$B/tests/test_kernel_conformance"
  [ -x "$t" ] || { result conformance SKIP "no test_kernel_conformance in the bundle"; return; }
  conformance_env timed "$(pick 120 240)" conformance.log "$t"
  local rc=$?
  grep -E '^FAIL' "$REPORT/conformance.log" | head -40 >> "$REPORT/report.md"
  result conformance "$(pass_if $rc)" "$(why_rc $rc)$([ $rc = 77 ] && echo ' (skipped: no device?)'): $(grep -E 'conformance .* passed' "$REPORT/conformance.log" | tail -1 || tail_of conformance.log 2)"
  grep -m1 -E '^# candidate [a-z0-9_]+ \(' "$REPORT/conformance.log" | fig
  # The fused gate (kernel ABI 3), new since the last GPU run: its checks over every case.
  echo "fused gate: $(grep -c '^PASS gate\[' "$REPORT/conformance.log") checks passed, $(grep -c '^FAIL gate\[' "$REPORT/conformance.log") failed, over $(grep -E '^(PASS|FAIL) gate\[' "$REPORT/conformance.log" | sed 's/\].*//' | sort -u | wc -l) cases (S=150001, E=600 and S=5000 among them)" | fig
  # TF32 (kernel.cuda.tf32, off by default): the GEMM groups again with it on, float32 GEMMs held to the
  # suite's TF32 tolerance (tests/conformance/conformance.h, TOL_TF32).
  DSMOE_CONFORMANCE_SETTINGS=tf32=true DSMOE_CONFORMANCE_GROUPS=gemm,grouped,wgrad,fd,inference \
    conformance_env timed "$(pick 60 120)" conformance-tf32.log "$t"
  rc=$?
  grep -E '^FAIL' "$REPORT/conformance-tf32.log" | head -20 >> "$REPORT/report.md"
  result "conformance tf32" "$(pass_if $rc)" "$(why_rc $rc): $(grep -E 'conformance .* passed' "$REPORT/conformance-tf32.log" | tail -1 || tail_of conformance-tf32.log 2)"
  [ "$KERN" = cuda ] || return 0
  # kernel.cuda.attention_tensor_cores (on by default since the 2026-12-04 run): the attention group again
  # with it off, bfloat16 cases on the CUDA-core kernels.
  DSMOE_CONFORMANCE_SETTINGS=attention_tensor_cores=false DSMOE_CONFORMANCE_GROUPS=attention \
    conformance_env timed "$(pick 60 120)" conformance-attention-tc.log "$t"
  rc=$?
  grep -E '^FAIL' "$REPORT/conformance-attention-tc.log" | head -20 >> "$REPORT/report.md"
  result "conformance attention_tc" "$(pass_if $rc)" "$(why_rc $rc): $(grep -E 'conformance .* passed' "$REPORT/conformance-attention-tc.log" | tail -1 || tail_of conformance-attention-tc.log 2)"
  # kernel.cuda.fused_epilogues (off by default until this passes on a GPU): the groups that call
  # gemm_grouped again with the epilogues inside cuBLASLt.
  DSMOE_CONFORMANCE_SETTINGS=fused_epilogues=true DSMOE_CONFORMANCE_GROUPS=grouped,fd,inference,sticky,errors \
    conformance_env timed "$(pick 60 120)" conformance-fused.log "$t"
  rc=$?
  grep -E '^FAIL' "$REPORT/conformance-fused.log" | head -20 >> "$REPORT/report.md"
  result "conformance fused" "$(pass_if $rc)" "$(why_rc $rc): $(grep -E 'conformance .* passed' "$REPORT/conformance-fused.log" | tail -1 || tail_of conformance-fused.log 2)"
  # kernel.cuda.expert_rows_max (kernels/gemm_rows.cu, new since the last GPU run; 16 by default): at 256
  # every forward-layout grouped GEMM of the suite (m_max 6 to 150) runs on it.
  DSMOE_CONFORMANCE_SETTINGS=expert_rows_max=256 DSMOE_CONFORMANCE_GROUPS=grouped,fd,inference \
    conformance_env timed "$(pick 60 120)" conformance-rows.log "$t"
  rc=$?
  grep -E '^FAIL' "$REPORT/conformance-rows.log" | head -20 >> "$REPORT/report.md"
  result "conformance rows" "$(pass_if $rc)" "$(why_rc $rc): $(grep -E 'conformance .* passed' "$REPORT/conformance-rows.log" | tail -1 || tail_of conformance-rows.log 2)"
  # kernel.cuda.decode_split_keys (new since the last GPU run; 128 by default, which splits the suite's
  # longest cache in 2): at 8 its caches split into up to 25 runs, rows ending in different runs.
  DSMOE_CONFORMANCE_SETTINGS=decode_split_keys=8 DSMOE_CONFORMANCE_GROUPS=inference \
    conformance_env timed "$(pick 30 60)" conformance-split.log "$t"
  rc=$?
  grep -E '^FAIL' "$REPORT/conformance-split.log" | head -20 >> "$REPORT/report.md"
  result "conformance split" "$(pass_if $rc)" "$(why_rc $rc): $(grep -E 'conformance .* passed' "$REPORT/conformance-split.log" | tail -1 || tail_of conformance-split.log 2)"
}

check_sanitize() {
  if dry; then result sanitize SKIP "(dry) compute-sanitizer needs a GPU"; return; fi
  local t="$B/tests/test_kernel_conformance" cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  [ -n "$cs" ] && [ -x "$t" ] || { result sanitize SKIP "no compute-sanitizer or no suite"; return; }
  # sanitize_one <tool> <groups or "all"> <limit> [candidate settings k=v,...]
  sanitize_one() {
    local tool=$1 groups=$2 lim=$3 settings=${4:-} log="sanitize-$1-${2//,/-}${4:+-${4//[=,]/-}}.log"
    [ -n "$settings" ] && export DSMOE_CONFORMANCE_SETTINGS=$settings
    if [ "$groups" = all ]; then conformance_env timed "$lim" "$log" "$cs" --tool "$tool" --error-exitcode 9 "$t"
    else DSMOE_CONFORMANCE_GROUPS=$groups conformance_env timed "$lim" "$log" "$cs" --tool "$tool" --error-exitcode 9 "$t"; fi
    local rc=$?
    unset DSMOE_CONFORMANCE_SETTINGS
    result "sanitize $tool ($groups${settings:+, $settings})" "$(pass_if $rc)" \
      "$(why_rc $rc): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$REPORT/$log" | tail -1); $(grep -E 'conformance .* passed' "$REPORT/$log" | tail -1)"
  }
  # First what is new since the last GPU run (2026-11-30): the fused gate's grid-wide barriers
  # (kernels/gating_fused.cu) under synccheck; the fused gate, distillation (loss_mix) and the embedding
  # with positions (layers, inference) under memcheck and racecheck. Then the whole suite, time allowing.
  local new=gating,loss_mix,layers,inference
  sanitize_one synccheck gating 120
  sanitize_one memcheck "$new" 150
  sanitize_one racecheck "$new" 150
  # The settings that are off by default: WMMA attention (shared-memory tiles and scratch shared by the
  # warps of a block) and the cuBLASLt grouped GEMMs.
  sanitize_one racecheck attention 90 attention_tensor_cores=true
  sanitize_one memcheck attention,grouped 90 attention_tensor_cores=true,fused_epilogues=true
  sanitize_one memcheck grouped,inference 90 expert_rows_max=256,decode_split_keys=8
  local tool
  for tool in memcheck racecheck; do
    if [ "${GPU_CHECK_SANITIZE_ALL:-0}" = 1 ] || [ "$(left)" -ge 200 ]; then sanitize_one $tool all 300
    else result "sanitize $tool (all)" SKIP "$(left) s left of the budget or before GPU_CHECK_DEADLINE (GPU_CHECK_SANITIZE_ALL=1 runs it)"; fi
  done
}

# The quickstart model, short: 50 steps, a checkpoint at 25 and 50, a log line every step. On the
# emulator (about 150 tokens/s at the quickstart's size on 2 cores) the model and batch are smaller:
# hidden 64, sequences of 32, batches of 4.
train_deck() {
  local small=()
  emu && small=(-e 's/^hidden = .*/hidden = 64/' -e 's/^seq_len = .*/seq_len = 32/' -e 's/^batch = .*/batch = 4/')
  sed -e 's/^steps = .*/steps = 50/' -e 's/^log_every = .*/log_every = 1/' -e 's/^eval_every = .*/eval_every = 25/' \
      -e 's/^every = 200/every = 25/' "${small[@]}" "$B/inputs/quickstart.deck" > "$1"
}

# Compares the loss column (2nd) of two metrics.csv files (a resumed run's has no header) on the steps
# both have from min_step on: max relative difference <= tol, and the same steps in both.
losses_close() { # losses_close A B TOL [MIN_STEP]; python3 without the bundle's libraries
  py - "$1" "$2" "$3" "${4:-0}" <<'EOF'
import sys
def losses(path, lo):
    out = {}
    for line in open(path):
        f = line.strip().split(',')
        if len(f) > 1 and f[0].isdigit() and int(f[0]) >= lo:
            out[int(f[0])] = float(f[1])
    return out
lo = int(sys.argv[4])
a, b, tol = losses(sys.argv[1], lo), losses(sys.argv[2], lo), float(sys.argv[3])
steps = sorted(set(a) & set(b))
worst = max((abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in steps), default=float('inf'))
print(f"steps {steps[0] if steps else '-'}-{steps[-1] if steps else '-'} ({len(steps)}): max relative loss difference {worst:.3e} (tolerance {tol:g})")
sys.exit(0 if steps and set(a) == set(b) and worst <= tol else 1)
EOF
}

check_train() {
  local w="$REPORT/train" deck
  mkdir -p "$w"
  deck="$w/q.deck"
  train_deck "$deck"
  timed "$(pick 40 120)" train-cpu.log dsmoe "$deck" run.output_dir="$w/cpu" run.kernel_backend=cpu ||
    { result train FAIL "cpu run failed: $(err_of train-cpu.log)"; return; }
  timed "$(pick 40 120)" train-$KERN.log dsmoe "$deck" run.output_dir="$w/$KERN" run.kernel_backend=$KERN ||
    { result train FAIL "$KERN run failed: $(err_of train-$KERN.log)"; return; }
  local cmp
  cmp=$(losses_close "$w/$KERN/metrics.csv" "$w/cpu/metrics.csv" 1e-4)
  result train "$(pass_if $?)" "50 steps $KERN vs cpu, fp32: $cmp"
  grep -E '^step +50/' "$REPORT/train-$KERN.log" | fig
  if [ "$KERN" = cuda ]; then # the expert GEMMs' epilogues inside cuBLASLt (kernel.cuda.fused_epilogues)
    if DSMOE_KERNEL_CUDA_FUSED_EPILOGUES=1 timed "$(pick 40 120)" train-$KERN-fused.log dsmoe "$deck" \
         run.output_dir="$w/$KERN-fused" run.kernel_backend=$KERN; then
      cmp=$(losses_close "$w/$KERN-fused/metrics.csv" "$w/cpu/metrics.csv" 1e-4)
      result "train fused" "$(pass_if $?)" "50 steps $KERN (fused_epilogues) vs cpu, fp32: $cmp"
    else
      result "train fused" FAIL "$(err_of train-$KERN-fused.log)"
    fi
  fi
  # Cross resume: the step-25 checkpoint of each run continued on the other backend.
  local from to
  for from in $KERN cpu; do
    to=$([ $from = cpu ] && echo $KERN || echo cpu)
    mkdir -p "$w/${from}2$to/checkpoints"
    cp "$w/$from"/checkpoints/step_00000025.safetensors "$w/${from}2$to/checkpoints/" 2>/dev/null ||
      { result "resume $from->$to" FAIL "no step-25 checkpoint from $from"; continue; }
    timed "$(pick 40 120)" "resume-${from}2$to.log" dsmoe "$deck" run.output_dir="$w/${from}2$to" run.kernel_backend=$to checkpoint.resume=auto ||
      { result "resume $from->$to" FAIL "$(err_of "resume-${from}2$to.log")"; continue; }
    cmp=$(losses_close "$w/${from}2$to/metrics.csv" "$w/$to/metrics.csv" 1e-4 26)
    result "resume $from->$to" "$(pass_if $?)" "steps 26-50 against the $to run: $cmp"
  done
}

# bf16 on the device against bf16 on the cpu plugin, 50 quickstart steps: every step's loss within 5e-2
# relative. The two round at the same places and differ only in how bfloat16 GEMMs and ops accumulate
# (cuBLAS against oneDNN and the cpu loops): an early difference of one bf16 rounding (2^-8) shifts the
# trajectory a little, and per-step losses differ most where the loss falls fastest. bf16 against fp32
# on the cpu plugin, the same mechanism with larger roundings, differs by up to 2.5% per step (step 45
# of these 50, measured on the dry run's CPU, 2026-12-01), so 2% could fail a correct plugin; 5% is
# tests/model/test_train_bf16.c's bound for the MoE variants against fp32. It is about 0.1 nats, while
# the 50 steps take the loss from 4.2 to 2.0: a wrong op (a missing scale, a wrong expert) shows. The
# op-level correctness in bf16 is the conformance suite's; check_train holds fp32 to 1e-4. The bf16
# against fp32 difference on the cpu plugin (check_train's run) is printed beside it for scale.
check_train_bf16() {
  local w="$REPORT/train_bf16" deck
  mkdir -p "$w"
  deck="$w/q.deck"
  train_deck "$deck"
  timed "$(pick 40 120)" train-bf16-cpu.log dsmoe "$deck" run.output_dir="$w/cpu" run.kernel_backend=cpu run.precision=bf16 ||
    { result train_bf16 FAIL "cpu run failed: $(err_of train-bf16-cpu.log)"; return; }
  timed "$(pick 40 120)" train-bf16-$KERN.log dsmoe "$deck" run.output_dir="$w/$KERN" run.kernel_backend=$KERN run.precision=bf16 ||
    { result train_bf16 FAIL "$KERN run failed: $(err_of train-bf16-$KERN.log)"; return; }
  local cmp
  cmp=$(losses_close "$w/$KERN/metrics.csv" "$w/cpu/metrics.csv" 5e-2)
  result train_bf16 "$(pass_if $?)" "50 steps $KERN vs cpu, bf16: $cmp"
  grep -E '^step +50/' "$REPORT/train-bf16-$KERN.log" | fig
  if [ "$KERN" = cuda ]; then # attention on tensor cores and the expert GEMMs' epilogues in cuBLASLt
    if DSMOE_KERNEL_CUDA_ATTENTION_TENSOR_CORES=1 DSMOE_KERNEL_CUDA_FUSED_EPILOGUES=1 timed "$(pick 40 120)" \
         train-bf16-$KERN-tc.log dsmoe "$deck" run.output_dir="$w/$KERN-tc" run.kernel_backend=$KERN run.precision=bf16; then
      cmp=$(losses_close "$w/$KERN-tc/metrics.csv" "$w/cpu/metrics.csv" 5e-2)
      result "train_bf16 tc" "$(pass_if $?)" "50 steps $KERN (attention_tensor_cores, fused_epilogues) vs cpu, bf16: $cmp"
    else
      result "train_bf16 tc" FAIL "$(err_of train-bf16-$KERN-tc.log)"
    fi
  fi
  [ -f "$REPORT/train/cpu/metrics.csv" ] &&
    echo "for scale, bf16 against fp32 on the cpu plugin: $(losses_close "$w/cpu/metrics.csv" "$REPORT/train/cpu/metrics.csv" 1)" | fig
  return 0
}

# Greedy generation on the device against the cpu plugin, from one checkpoint of the model and with the
# prompt files of tests/cli/generate_test.sh (a 2-layer top-1 MoE with 4 experts, byte vocabulary,
# trained on English-like text). fp32: the very same tokens. bf16: the GEMMs' roundings and accumulation
# orders differ between cuBLAS and oneDNN, so a near tie may pick another token, after which that
# completion goes its own way; at least 90% of the positions must agree (a wrong op agrees on almost
# none), and the report says how many completions are identical.
check_generate() {
  local w="$REPORT/generate"
  mkdir -p "$w"
  source "$B/generate_model.sh" && generate_model_files "$w" py ||
    { result generate FAIL "writing the model's deck and inputs (generate_model.sh)"; return; }
  timed "$(pick 40 120)" generate-train.log dsmoe "$w/model.deck" run.kernel_backend=cpu ||
    { result generate FAIL "training the model on cpu: $(err_of generate-train.log)"; return; }
  local ckpt
  ckpt=$(ls "$w"/train/checkpoints/step_*.safetensors 2>/dev/null | tail -1)
  [ -n "$ckpt" ] || { result generate FAIL "no checkpoint in $w/train/checkpoints"; return; }
  local prec f k rc
  for prec in fp32 bf16; do
    for f in txt jsonl; do
      local failed=""
      for k in cpu $KERN; do
        timed "$(pick 30 90)" "generate-$prec-$f-$k.log" dsmoe "$w/model.deck" run.mode=generate checkpoint.resume="$ckpt" \
          generate.prompts="$w/prompts.$f" generate.output="$w/$prec-$f-$k.jsonl" generate.batch=2 \
          generate.prefill_tokens=8 run.kernel_backend=$k run.precision=$prec
        rc=$?
        [ $rc = 0 ] || { failed="$k: $(why_rc $rc): $(err_of "generate-$prec-$f-$k.log")"; break; }
      done
      [ -z "$failed" ] || { result "generate $prec $f" FAIL "$failed"; continue; }
      local cmp
      cmp=$(py - "$w/$prec-$f-$KERN.jsonl" "$w/$prec-$f-cpu.jsonl" "$([ $prec = fp32 ] && echo 1.0 || echo 0.9)" <<'EOF'
import json, sys
a, b = ({r["index"]: r["tokens"] for r in map(json.loads, open(p))} for p in sys.argv[1:3])
need = float(sys.argv[3])
n = sum(len(t) for t in b.values())
same = sum(x == y for i in b for x, y in zip(a.get(i, []), b[i]))
whole = sum(a.get(i) == b[i] for i in b)
print(f"{whole}/{len(b)} completions identical, {same}/{n} tokens agree position by position"
      + ("" if need == 1.0 else f" (at least {need:.0%} needed)"))
sys.exit(0 if sorted(a) == sorted(b) and n > 0 and same >= need * n and (need < 1.0 or a == b) else 1)
EOF
)
      result "generate $prec $f" "$(pass_if $?)" "greedy, $KERN vs cpu: $cmp"
    done
    grep -E '^generate: [0-9]+ prompts, ' "$REPORT/generate-$prec-txt-$KERN.log" | sed "s/^/$KERN $prec: /" | fig
  done
}

# The nccl plugin needs libnccl.so.2, which the bundle does not carry (closure): the machine's own,
# found on the loader's path, in the CUDA toolkit, or in a Python package (PyTorch's image has the
# nvidia-nccl-cu13 wheel). Sets NCCL_NOTE; returns 1 (and says SKIP) when the plugin does not load.
NCCL_NOTE=""
nccl_ready() {
  local so="$B/lib/dsmoe/libdsmoe_comm_nccl.so" d f
  [ -f "$so" ] || { result nccl SKIP "no libdsmoe_comm_nccl.so in the bundle (the build found no NCCL)"; return 1; }
  loads() { LD_LIBRARY_PATH="$1" python3 -c "import ctypes,sys; ctypes.CDLL(sys.argv[1])" "$so" > "$REPORT/nccl-load.log" 2>&1; }
  if ! loads "$LD_LIBRARY_PATH"; then
    local found=""
    for f in $( (ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF}'
                 ls /usr/local/cuda/lib64/libnccl.so.2* /usr/lib/x86_64-linux-gnu/libnccl.so.2* 2>/dev/null
                 py -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null |
                   while read -r d; do find "$d" -maxdepth 5 -name 'libnccl.so.2*' 2>/dev/null; done
                 timeout 30 find / -xdev -name 'libnccl.so.2*' 2>/dev/null) | awk '!seen[$0]++'); do
      d=$(dirname "$f")
      if [ "$(basename "$f")" != libnccl.so.2 ]; then # only a versioned name: give it the soname
        d="$B/nccl-link"; mkdir -p "$d"; ln -sf "$f" "$d/libnccl.so.2"
      fi
      if loads "$LD_LIBRARY_PATH:$d"; then found=$f; export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; break; fi
    done
    [ -n "$found" ] || { result nccl SKIP "the nccl plugin does not load and no libnccl.so.2 here makes it: $(tail -1 "$REPORT/nccl-load.log")"; return 1; }
  fi
  local lib ver
  lib=$(ldd "$so" 2>/dev/null | awk '/libnccl/ {print $3}')
  ver=$(python3 -c "import ctypes; l = ctypes.CDLL('$lib'); v = ctypes.c_int(); l.ncclGetVersion(ctypes.byref(v)); v = v.value
print(f'{v // 10000}.{v // 100 % 100}.{v % 100}' if v >= 20900 else f'{v // 1000}.{v // 100 % 10}.{v % 100}')" 2>/dev/null)
  NCCL_NOTE="NCCL $ver from $lib"
  return 0
}

check_nccl() {
  if emu; then
    NCCL_NOTE="(dry) the nccl plugin built for the emulator, over the NCCL double (MPI on host memory); libnccl not looked for"
    # The NCCL double ignores streams, so the emulator runs each stream's work at once (as
    # tests/cuda_emu/cuda_emu_train.sh does for its nccl runs).
    export DSMOE_EMU_STREAMS=immediate
  elif dry; then NCCL_NOTE="(dry) ncclsim, the NCCL test double over MPI on host memory, for nccl; libnccl not looked for"
  else nccl_ready || return; fi
  note "  $NCCL_NOTE"
  nccl_steps
  unset DSMOE_EMU_STREAMS
}

# check_nccl's three parts, on whichever nccl plugin it set up.
nccl_steps() {
  # (a) The same deck on comm nccl and comm mpi (host staging), 1 rank, 20 steps: with one rank the sums
  # are copies, so the losses agree to rounding of nothing (1e-6 leaves room for none but noise).
  local w="$REPORT/nccl" deck rc
  mkdir -p "$w"
  deck="$w/q.deck"
  train_deck "$deck"
  local c failed=""
  for c in mpi $NCCL; do
    timed "$(pick 40 120)" "nccl-train-$c.log" dsmoe "$deck" run.output_dir="$w/$c" run.kernel_backend=$KERN run.comm_backend=$c \
      train.steps=20 || { failed="comm $c: $(err_of "nccl-train-$c.log")"; break; }
  done
  if [ -n "$failed" ]; then result "nccl train" FAIL "$failed"
  else
    local cmp
    cmp=$(losses_close "$w/$NCCL/metrics.csv" "$w/mpi/metrics.csv" 1e-6)
    result "nccl train" "$(pass_if $?)" "20 steps, kernel $KERN, comm $NCCL vs mpi, 1 rank: $cmp"
  fi
  # (b) dsmoe_bench_alltoall on 1 rank (--ranks-per-node 1: a 1-rank group has one node): every call is
  # one send to itself through NCCL, a device-to-device copy: the bandwidth it moves.
  timed "$(pick 60 120)" nccl-alltoall.log dsmoe_bench_alltoall --kernel $KERN --comm $NCCL --ranks-per-node 1 \
    --min-bytes "$(pick 1Mi 64Ki)" --max-bytes "$(pick 256Mi 4Mi)" --iters 20 --warmup 3
  rc=$?
  local bw
  bw=$(awk 'function b(s) { m = 1; if (s ~ /Ki$/) m = 1024; if (s ~ /Mi$/) m = 1048576; sub(/[KM]i$/, "", s); return s * m }
            $1 ~ /^[0-9.]+([KM]i)?$/ && $3 > 0 { last = sprintf("%s per call in %.1f us (flat; hierarchical %.1f us): %.1f GB/s moved, %.1f GB/s of memory traffic (read + write)", $1, $3, $4, b($1) / $3 / 1e3, 2 * b($1) / $3 / 1e3) }
            END { print last }' "$REPORT/nccl-alltoall.log")
  result "nccl alltoall" "$(pass_if $rc)" "$(why_rc $rc): 1 rank, kernel $KERN, comm $NCCL: ${bw:-no rows}; $(last_or_err $rc nccl-alltoall.log)"
  grep -E '^[0-9.]+([KM]i)? ' "$REPORT/nccl-alltoall.log" | fig
  # (c) The comm conformance cases on device buffers (tests/plugins/comm/test_comm_device.c), 1 rank.
  local t="$B/tests/test_comm_device"
  if [ ! -x "$t" ]; then result "nccl comm_device" SKIP "no test_comm_device in the bundle (not built yet)"; return; fi
  if dry; then DSMOE_STRICT_ALWAYS_CLOSED=1 DSMOE_COMM_DEVICE_KERNEL=$KERN DSMOE_COMM_DEVICE_COMM=$NCCL timed "$(pick 60 120)" nccl-comm-device.log "$t"
  else DSMOE_COMM_DEVICE_KERNEL=$KERN DSMOE_COMM_DEVICE_COMM=$NCCL timed "$(pick 60 120)" nccl-comm-device.log "$t"; fi
  rc=$?
  if [ $rc = 77 ]; then result "nccl comm_device" SKIP "exit 77: $(grep -m1 'skipped' "$REPORT/nccl-comm-device.log")"
  else result "nccl comm_device" "$(pass_if $rc)" "$(why_rc $rc): $(grep -E '^comm-device conformance: [0-9]' "$REPORT/nccl-comm-device.log" | tail -1 || err_of nccl-comm-device.log)"
  fi
  grep -m1 -E '^comm-device conformance: kernel' "$REPORT/nccl-comm-device.log" | fig
  grep -E '^(FAIL|not ok)' "$REPORT/nccl-comm-device.log" | head -20 | fig
}

# bench_one <log> <label> <args...>: one dsmoe_bench_moe run and its result lines.
bench_one() {
  local log=$1 label=$2 rc eff target=""
  shift 2
  timed "$(pick 90 120)" "$log" dsmoe_bench_moe --kernel $KERN "$@"
  rc=$?
  eff=$(sed -n 's/.*efficiency=\([0-9.]*\).*/\1/p' "$REPORT/$log" | tail -1)
  case "$label" in *bf16*) [ -n "$eff" ] && target=" (target 0.70: $(awk -v e="$eff" 'BEGIN { print (e >= 0.70 ? "met" : "NOT met") }'))" ;; esac
  result "bench $label" "$(pass_if $rc)" "$(why_rc $rc): $(last_or_err $rc "$log")$target"
  grep -E '^(medians of|best of|bf16 library reference)' "$REPORT/$log" | fig
  # --profile 1: one more layer step with each plugin call timed, by call site (moe_layer.c's grouped
  # calls against the "by stage" line of the plugin's own gemm above)
  sed -n '/^profile of one layer step/,/outside the timed calls/p' "$REPORT/$log" | fig
}

check_bench() {
  local name args prec
  local it=(--iters "$(pick 10 2)" --warmup "$(pick 2 1)")
  for prec in bf16 fp32; do
    for name in W1 gpu; do
      if [ $name = W1 ]; then args=(--tokens "$(pick 4096 512)" --hidden "$(pick 768 128)" --ffn "$(pick 3072 512)" --experts 8 --top-k 1)
      else args=(--tokens "$(pick 32768 1024)" --hidden "$(pick 2048 256)" --ffn "$(pick 8192 1024)" --experts "$(pick 64 16)" --top-k 1); fi
      bench_one "bench-$prec-$name.log" "$prec $name" "${args[@]}" --precision $prec --passes fwd+bwd "${it[@]}" \
        --profile 1
      if [ $prec = bf16 ] && [ "$KERN" = cuda ]; then # the epilogues inside cuBLASLt: no float32 scratch
        DSMOE_KERNEL_CUDA_FUSED_EPILOGUES=1 bench_one "bench-$prec-fused-$name.log" "$prec fused $name" "${args[@]}" \
          --precision $prec --passes fwd+bwd "${it[@]}" --profile 1
        # Which epilogues cuBLASLt took (a bfloat16 output with a float32 bias may be refused, and that
        # GEMM then takes the separate epilogue): one step with cuBLASLt's API trace, its matmul calls
        # counted by epilogue, and what its heuristic said when it refused.
        if ! dry && [ $name = gpu ]; then
          CUBLASLT_LOG_LEVEL=5 CUBLASLT_LOG_FILE="$REPORT/cublaslt-trace-%i.log" DSMOE_KERNEL_CUDA_FUSED_EPILOGUES=1 \
            timed 60 "bench-$prec-fused-trace.log" dsmoe_bench_moe --kernel $KERN "${args[@]}" --precision $prec \
            --passes fwd+bwd --iters 1 --warmup 0 >/dev/null
          echo "cuBLASLt matmuls by epilogue in one step: $(cat "$REPORT"/cublaslt-trace-*.log 2>/dev/null | grep -F '[cublasLtMatmul]' |
            grep -oE 'epilogue=[A-Z_]+' | sort | uniq -c | tr -s ' \n' ' ')" | fig
          cat "$REPORT"/cublaslt-trace-*.log 2>/dev/null | grep -iE 'NOT_SUPPORTED|not supported|failed' | sort | uniq -c | head -5 | fig
          rm -f "$REPORT"/cublaslt-trace-*.log
        fi
      fi
      if [ $prec = fp32 ] && [ "${GPU_CHECK_TF32:-0}" = 1 ]; then
        DSMOE_KERNEL_CUDA_TF32=1 bench_one "bench-tf32-$name.log" "tf32 $name" "${args[@]}" --passes fwd+bwd "${it[@]}" \
          --profile 1
      fi
    done
  done
}

# kernel_table <ncu csv log>: the kernels ncu timed (gpu__time_duration.sum), summed by kernel name
# (template arguments and parameters cut), largest first, with cuBLAS's GEMM kernels against the rest.
kernel_table() {
  py - "$1" <<'EOF'
import csv, io, re, sys
text = open(sys.argv[1], errors="replace").read()
at = text.find('"ID"')
if at < 0: print("no CSV in the ncu log"); sys.exit(1)
rows = list(csv.reader(io.StringIO(text[at:])))
head = rows[0]
col = lambda *names: next((head.index(n) for n in names if n in head), None)
k, mn, mu, mv = col("Kernel Name", "Function Name", "Name"), col("Metric Name"), col("Metric Unit"), col("Metric Value")
if None in (k, mn, mu, mv): print("unexpected CSV columns: " + ", ".join(head)); sys.exit(1)
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}
by = {}
for r in rows[1:]:
    if len(r) <= max(k, mn, mu, mv) or r[mn] != "gpu__time_duration.sum": continue
    name = re.split(r"[<(]", re.sub(r"^void\s+", "", r[k].strip()), 1)[0].strip()[:72] or r[k][:72]
    us = float(r[mv].replace(",", "")) * scale.get(r[mu].strip(), 1.0)
    n, t = by.get(name, (0, 0.0))
    by[name] = (n + 1, t + us)
if not by: print("ncu timed no kernel in the layer range"); sys.exit(1)
total = sum(t for _, t in by.values())
gemm = sum(t for name, (_, t) in by.items() if re.search(r"gemm|xmma|cutlass|cublas", name, re.I))
print(f"{sum(n for n, _ in by.values())} kernels, {total / 1e3:.3f} ms on the GPU: cuBLAS GEMM kernels "
      f"{gemm / 1e3:.3f} ms ({100 * gemm / total:.1f}%), the rest {(total - gemm) / 1e3:.3f} ms")
for name, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]:
    print(f"  {t / 1e3:10.3f} ms {100 * t / total:5.1f}% {n:5d}x  {name}")
EOF
}

# Kernel by kernel, inside one step of the GPU-sized layer (Nsight Compute, bf16 then fp32): ncu times
# every kernel of the bench's "layer" NVTX range (one forward + backward) and kernel_table sums them by
# name: cuBLAS's GEMMs against the plugin's own kernels (epilogues, masking, bias sums, routing). ncu
# needs the GPU's counters (seen on Firecracker machines; gVisor refuses them: then SKIP with its words).
# ncu itself runs without the bundle's libraries; the bench gets them through env.
check_kernels() {
  if dry; then result kernels SKIP "(dry) ncu needs a GPU"; return; fi
  local ncu prec rc log table
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { result kernels SKIP "no ncu on this machine"; return; }
  for prec in bf16 fp32; do
    log="kernels-$prec.log"
    timed 150 "$log" env -u LD_LIBRARY_PATH "$ncu" --nvtx --nvtx-include "layer/" \
      --metrics gpu__time_duration.sum --csv --print-units base --clock-control none \
      env LD_LIBRARY_PATH="$LD_LIBRARY_PATH" "$B/bin/dsmoe_bench_moe" --kernel $KERN --tokens 32768 --hidden 2048 \
      --ffn 8192 --experts 64 --top-k 1 --precision $prec --passes fwd+bwd --iters 1 --warmup 0
    rc=$?
    table=$(kernel_table "$REPORT/$log")
    if [ $rc = 0 ] && [ -n "$table" ] && ! grep -qE '^(no CSV|unexpected|ncu timed no)' <<< "$table"; then
      result "kernels $prec" PASS "$(head -1 <<< "$table")"
      tail -n +2 <<< "$table" | fig
    else
      result "kernels $prec" SKIP "$(why_rc $rc): $(head -1 <<< "$table"); ncu: $(grep -m1 -E '==(ERROR|WARNING)==' "$REPORT/$log" || tail_of "$log" 1)"
    fi
  done
}

# Decode ms/token against the bandwidth bound of the same run (bench/bench_decode.c; on a device plugin
# the bound's bandwidth is the plugin's own device copy): 8 layers of hidden 2048, 8 experts top-1 on
# every other layer, a 128-token prompt and 32 new tokens, at batch 1 and 64.
check_decode() {
  local prec batch rc
  local shape=(--layers "$(pick 8 2)" --hidden "$(pick 2048 128)" --heads "$(pick 16 4)" --experts "$(pick 8 4)" --top-k 1
               --prompt "$(pick 128 16)" --new "$(pick 32 8)" --repeats "$(pick 3 1)")
  # Dry: the bench's bandwidth pass copies 2 x 1 GiB through strict, whose page protection faults every
  # page in again at each run of its queue (30 s a run here); without it, 10 s. The dry run proves the
  # commands and the report lines, not strict's checks (the conformance and train steps do).
  dry && export DSMOE_STRICT_NO_PROTECT=1
  for prec in bf16 fp32; do
    for batch in 1 64; do
      timed "$(pick 60 120)" "decode-$prec-b$batch.log" dsmoe_bench_decode --kernel $KERN "${shape[@]}" --batch $batch \
        --precision $prec --reference "$(pick 1 0)"
      rc=$?
      result "decode $prec batch $batch" "$(pass_if $rc)" "$(why_rc $rc): $(last_or_err $rc "decode-$prec-b$batch.log")"
      grep -E '^(bandwidth|best repeat|profile|  the step)' "$REPORT/decode-$prec-b$batch.log" | fig
    done
    # The expert GEMMs on cuBLAS at full capacity (kernel.cuda.expert_rows_max = 0), every expert's weights
    # read, against the default above, where only the experts that received a token are read.
    if [ "$KERN" = cuda ]; then
      DSMOE_KERNEL_CUDA_EXPERT_ROWS_MAX=0 timed "$(pick 60 120)" "decode-$prec-b1-cublas.log" dsmoe_bench_decode \
        --kernel $KERN "${shape[@]}" --batch 1 --precision $prec --reference 0
      rc=$?
      result "decode $prec batch 1 cublas" "$(pass_if $rc)" "$(why_rc $rc): expert_rows_max = 0: $(last_or_err $rc "decode-$prec-b1-cublas.log")"
      grep -E '^(best repeat|  the step)' "$REPORT/decode-$prec-b1-cublas.log" | fig
    fi
  done
  # A long context at batch 1, bf16: the KV cache is then as large as the weights a step reads. Cached
  # attention split into runs of kernel.cuda.decode_split_keys keys (the default), then not split (0:
  # one block a head walks the whole cache).
  if [ "$KERN" = cuda ]; then
    local long=(--layers "$(pick 8 2)" --hidden "$(pick 2048 128)" --heads "$(pick 16 4)" --experts "$(pick 8 4)"
                --top-k 1 --prompt "$(pick 4096 200)" --new "$(pick 16 4)" --repeats "$(pick 3 1)")
    local split
    for split in 128 0; do
      DSMOE_KERNEL_CUDA_DECODE_SPLIT_KEYS=$split timed "$(pick 60 120)" "decode-bf16-b1-long-split$split.log" \
        dsmoe_bench_decode --kernel $KERN "${long[@]}" --batch 1 --precision bf16 --reference 0
      rc=$?
      result "decode bf16 batch 1 context $(pick 4096 200) split $split" "$(pass_if $rc)" \
        "$(why_rc $rc): decode_split_keys = $split: $(last_or_err $rc "decode-bf16-b1-long-split$split.log")"
      grep -E '^(best repeat|  the step)' "$REPORT/decode-bf16-b1-long-split$split.log" | fig
    done
  fi
  unset DSMOE_STRICT_NO_PROTECT
}

# A GPT-MoE deck on synthetic data: gpt_deck <file> <out dir> <layers> <hidden> <heads> <seq> <vocab> <batch> <steps>
gpt_deck() {
  cat > "$1" <<DECK
[run]
seed = 1
log_every = 1
output_dir = $2
[model]
layers = $3
hidden = $4
heads = $5
seq_len = $6
vocab = $7
[moe]
experts = 16
every = 2
top_k = 1
capacity_factor = 1.25
[train]
steps = $9
batch = $8
lr = 3e-4
warmup_steps = 2
eval_every = 0
eval_batches = 1
[data]
source = synthetic
[checkpoint]
every = 0
final = false
DECK
}

# Model FLOPs utilisation from a training log: mfu <log> <layers> <hidden> <seq> <vocab> <peak TFLOP/s> <peak name> [<measured peak>]
# tokens/s: the median of the per-step rates after 2 warm-up steps, without the last step (its rate
# includes the final evaluation). FLOPs per token (PaLM's MFU): 6 x the active matmul parameters (per
# layer attention 4 M^2; dense FFN 2 M F; MoE layer its router M E and top-1's one expert 2 M F; the
# tied logits V M) plus 12 L M T for attention's score and value products, forward and backward.
mfu() {
  py - "$@" <<'EOF'
import re, statistics, sys
log, L, M, T, V, peak, name = sys.argv[1], *map(int, sys.argv[2:6]), float(sys.argv[6]), sys.argv[7]
measured = float(sys.argv[8]) if len(sys.argv) > 8 and sys.argv[8] else 0.0
E, every, K, F = 16, 2, 1, 4 * M
rates, last, total = {}, 0, ""
for line in open(log):
    m = re.match(r"^step +(\d+)/(\d+) .*\| (\d+) tok/s", line)
    if m: rates[int(m[1])] = int(m[3]); last = int(m[2])
    m = re.match(r"^model: (\d+) parameters", line)
    if m: total = m[1]
steps = [s for s in sorted(rates) if 2 < s < last] or sorted(rates)
if not steps: print("no step lines"); sys.exit(1)
moe = L // every
active = L * 4 * M * M + (L - moe) * 2 * M * F + moe * (M * E + K * 2 * M * F) + V * M
flops = 6 * active + 12 * L * M * T
tok = statistics.median([rates[s] for s in steps])
achieved = tok * flops / 1e12
print(f"{tok:.0f} tokens/s (median of steps {steps[0]}-{steps[-1]});"
      f" {total} parameters, {active / 1e6:.4g}M active in matmuls; {flops / 1e9:.4g} GFLOP per token;"
      f" {achieved:.4g} TFLOP/s = MFU {achieved / peak:.3g} of the {peak:g} TFLOP/s {name}"
      + (f", {achieved / measured:.3g} of the {measured:g} measured in info" if measured else ""))
EOF
}

# Training throughput: a 350M-class GPT-MoE in bf16 (24 layers, hidden 1024, 16 heads, sequence 2048,
# GPT-2's vocabulary padded to 50304 as Megatron does, 16 experts on every other layer, top-1; batch 8 x
# 2048 tokens, about a second a step), then the fp32 517M model of the 2026-11-30 run (21.9k tokens/s
# then). Peaks: the H200's dense bf16 989 TFLOP/s and fp32 67 TFLOP/s (datasheet, H200.md).
check_throughput() {
  local w="$REPORT/throughput" prec rc
  mkdir -p "$w"
  for prec in bf16 fp32; do
    local L M NH T V Bt peak pname
    if [ $prec = bf16 ]; then
      L=$(pick 24 2) M=$(pick 1024 64) NH=$(pick 16 4) T=$(pick 2048 64) V=$(pick 50304 256) Bt=$(pick 8 4) peak=989 pname="dense bf16 (datasheet)"
    else
      L=$(pick 12 2) M=$(pick 768 64) NH=$(pick 12 4) T=$(pick 1024 64) V=$(pick 8192 256) Bt=$(pick 16 4) peak=67 pname="fp32 (datasheet)"
    fi
    gpt_deck "$w/$prec.deck" "$w/$prec" "$L" "$M" "$NH" "$T" "$V" "$Bt" "$(pick 8 6)"
    timed "$(pick 100 150)" "throughput-$prec.log" dsmoe "$w/$prec.deck" run.kernel_backend=$KERN run.precision=$prec
    rc=$?
    local fig_line=""
    [ $rc = 0 ] && fig_line=$(mfu "$REPORT/throughput-$prec.log" "$L" "$M" "$T" "$V" "$peak" "$pname" \
      "$([ $prec = bf16 ] && echo "$CEIL_BF16" || echo "$CEIL_FP32")")
    result "throughput $prec" "$(pass_if $rc)" "$(why_rc $rc): ${L}x$M, seq $T, vocab $V, batch $Bt: ${fig_line:-$(err_of "throughput-$prec.log")}"
    { grep -E '^model:|^memory per rank' "$REPORT/throughput-$prec.log"; grep -E '^step +[0-9]+/' "$REPORT/throughput-$prec.log" | tail -2; } | fig
    # Where a bf16 step goes: 3 more steps of the same model with train.profile (steps 2-3 timed call by
    # call; a separate run, so the rate above is not slowed by its waits).
    if [ $prec = bf16 ] && [ $rc = 0 ]; then
      timed "$(pick 60 120)" "throughput-$prec-profile.log" dsmoe "$w/$prec.deck" run.kernel_backend=$KERN \
        run.precision=$prec run.output_dir="$w/$prec-profile" train.steps=3 train.profile=true
      rc=$?
      result "throughput $prec profile" "$(pass_if $rc)" "$(why_rc $rc): steps 2-3, every kernel op and collective timed"
      sed -n '/^profile of steps/,/outside the timed calls/p' "$REPORT/throughput-$prec-profile.log" | fig
    fi
    # The same bf16 model with attention on tensor cores and the expert GEMMs' epilogues in cuBLASLt
    # (both off by default until this run has shown them), and where its step goes.
    if [ $prec = bf16 ] && [ "$KERN" = cuda ]; then
      export DSMOE_KERNEL_CUDA_ATTENTION_TENSOR_CORES=1 DSMOE_KERNEL_CUDA_FUSED_EPILOGUES=1
      timed "$(pick 100 150)" "throughput-$prec-tc.log" dsmoe "$w/$prec.deck" run.kernel_backend=$KERN \
        run.precision=$prec run.output_dir="$w/$prec-tc"
      rc=$?
      fig_line=""
      [ $rc = 0 ] && fig_line=$(mfu "$REPORT/throughput-$prec-tc.log" "$L" "$M" "$T" "$V" "$peak" "$pname" "$CEIL_BF16")
      result "throughput $prec tc" "$(pass_if $rc)" "$(why_rc $rc): attention_tensor_cores + fused_epilogues: ${fig_line:-$(err_of "throughput-$prec-tc.log")}"
      grep -E '^step +[0-9]+/' "$REPORT/throughput-$prec-tc.log" | tail -2 | fig
      if [ $rc = 0 ]; then
        timed "$(pick 60 120)" "throughput-$prec-tc-profile.log" dsmoe "$w/$prec.deck" run.kernel_backend=$KERN \
          run.precision=$prec run.output_dir="$w/$prec-tc-profile" train.steps=3 train.profile=true
        sed -n '/^profile of steps/,/outside the timed calls/p' "$REPORT/throughput-$prec-tc-profile.log" | fig
      fi
      unset DSMOE_KERNEL_CUDA_ATTENTION_TENSOR_CORES DSMOE_KERNEL_CUDA_FUSED_EPILOGUES
    fi
  done
}

check_ranks() {
  local w="$REPORT/ranks" deck
  mkdir -p "$w"
  deck="$w/q.deck"
  train_deck "$deck"
  # Dropless: capacity per rank would otherwise drop other tokens on another layout (docs/gating.md).
  timed "$(pick 40 120)" ranks-1.log dsmoe "$deck" run.output_dir="$w/one" run.kernel_backend=$KERN train.steps=20 moe.drop_tokens=false ||
    { result ranks FAIL "1 rank failed: $(err_of ranks-1.log)"; return; }
  timed "$(pick 40 120)" ranks-2.log orterun -n 2 --oversubscribe --bind-to none dsmoe "$deck" run.output_dir="$w/two" \
    run.kernel_backend=$KERN train.steps=20 moe.expert_parallel=2 moe.drop_tokens=false ||
    { result ranks FAIL "2 ranks failed: $(err_of ranks-2.log)"; return; }
  local cmp
  cmp=$(losses_close "$w/two/metrics.csv" "$w/one/metrics.csv" 1e-4)
  result ranks "$(pass_if $?)" "2 ranks ep 2 on one GPU (mpi, host staging) vs 1 rank, 20 steps, kernel $KERN: $cmp"
}
