#!/usr/bin/env bash
# The dsmoe command as a user meets it: --version, --help, --check, deck and plugin errors (message and
# exit code), a short training run's outputs (resolved deck, metrics CSV, pruned checkpoints), resume,
# eval mode, a new run among an earlier run's checkpoints, a second run in a busy directory, a bad data
# file, and the warning for more threads than CPUs. Usage: cli_test.sh <dsmoe binary> <source dir>
set -u
dsmoe=$1
src=$2
work=$(mktemp -d /tmp/dsmoe_cli.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
unset DSMOE_PLUGIN_PATH
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh" # fail, ok, show, expect, finish

tiny="$work/tiny.deck"
cat > "$tiny" <<DECK
[run]
output_dir = $work/out
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
steps = 4
batch = 4
eval_every = 2
eval_batches = 1
[data]
synthetic_sources = 2
synthetic_branching = 2
[checkpoint]
every = 1
keep = 2
DECK

expect version 0 "kernel plugin ABI 3 \(symbol dsmoe_kernel_plugin_entry_v3; ABI 2 and 1 through adapters\)" -- "$dsmoe" --version
expect help 0 "usage: dsmoe" -- "$dsmoe" --help
expect help-keys 0 "moe.capacity_factor" -- "$dsmoe" --help keys
expect help-keys-plugins 0 "kernel.cpu.poison = 0 +\(bool\)" -- "$dsmoe" --help keys
expect no-args nonzero "usage: dsmoe" -- "$dsmoe"
# Plugin settings ([kernel.NAME] / [comm.NAME]): deck, environment and command line in rising priority,
# checked against the plugin's declarations; another plugin's section is left alone.
psdeck="$work/psettings.deck"
{ cat "$tiny"; printf '[kernel.cpu]\npoison = yes\n[kernel.cuda]\ntf32 = on\n'; } > "$psdeck"
expect setting-deck 0 "setting: kernel.cpu.poison = 1 \(deck $psdeck:[0-9]+\)" -- "$dsmoe" --check "$psdeck"
expect setting-env 0 "setting: kernel.cpu.poison = 0 \(environment DSMOE_KERNEL_CPU_POISON\)" -- \
  env DSMOE_KERNEL_CPU_POISON=off "$dsmoe" --check "$psdeck"
expect setting-cmdline 0 "setting: comm.mpi.max_count = 4096 \(command line\)" -- \
  env DSMOE_KERNEL_CPU_POISON=off "$dsmoe" --check "$psdeck" comm.mpi.max_count=4Ki
expect setting-type nonzero "command line: kernel.cpu.poison = maybe: expected a boolean" -- \
  "$dsmoe" --check "$psdeck" kernel.cpu.poison=maybe
# A variable under the loaded plugin's prefix that names none of its settings (a typo) is refused; the
# cuda plugin's are not the cpu plugin's business.
expect setting-env-typo nonzero "environment DSMOE_KERNEL_CPU_POISSON: kernel plugin 'cpu' has no setting 'poisson' \(did you mean DSMOE_KERNEL_CPU_POISON\?\)" -- \
  env DSMOE_KERNEL_CPU_POISSON=1 "$dsmoe" --check "$psdeck"
expect setting-env-other 0 "deck .* is valid" -- env DSMOE_KERNEL_CUDA_TF32S=1 "$dsmoe" --check "$psdeck"
printf '[kernel.cpu]\npoisson = 1\n' >> "$psdeck"
expect setting-unknown nonzero "$psdeck:[0-9]+: kernel plugin 'cpu' has no setting 'poisson' \(its settings: poison, small_rows, simd\)" -- \
  "$dsmoe" --check "$psdeck"
expect check-quickstart 0 "deck .*quickstart.deck is valid" -- "$dsmoe" --check "$src/inputs/quickstart.deck"
expect check-missing nonzero "cannot open deck '$work/nope.deck'" -- "$dsmoe" --check "$work/nope.deck"

printf '[model]\nhiden = 3\n' > "$work/typo.deck"
expect deck-typo nonzero "typo.deck:2: unknown key 'model.hiden' \(did you mean 'model.hidden'\?\)" -- "$dsmoe" --check "$work/typo.deck"
expect override-bad nonzero "command line: .*train.steps" -- "$dsmoe" --check "$tiny" train.steps=many
expect env-bad nonzero "environment DSMOE_TRAIN_STEPS" -- env DSMOE_TRAIN_STEPS=x "$dsmoe" --check "$tiny"
expect kernel-missing nonzero "kernel plugin 'gpu9' not found: no libdsmoe_kernel_gpu9.so in .*available: cpu" -- "$dsmoe" --check "$tiny" run.kernel_backend=gpu9
expect comm-missing nonzero "comm plugin 'ucx' not found.*available: mpi" -- "$dsmoe" --check "$tiny" run.comm_backend=ucx

# A short run: log lines, outputs, checkpoint pruning.
expect train 0 "step 4/4 \| loss [0-9.]+ \(bound [0-9.]+\) \| aux [0-9.]+ \| drop +[0-9.]+% \| lr .* tok/s .* ETA .*valid [0-9.]+" -- "$dsmoe" "$tiny"
[ -f "$work/out/resolved.deck" ] && grep -q "^steps = 4 .*# deck $tiny" "$work/out/resolved.deck" && ok || fail "resolved.deck missing or without sources"
head -1 "$work/out/metrics.csv" | grep -q "^step,loss,aux_loss,lr,grad_norm,tokens_per_s,dropped_frac,elapsed_s,valid_loss,moe0_capacity,moe0_drop,moe0_load_e0,moe0_load_e1,moe0_load_e2,moe0_load_e3$" \
  && ok || fail "metrics.csv header: $(head -1 "$work/out/metrics.csv")"
[ "$(($(wc -l < "$work/out/metrics.csv") - 1))" = 4 ] && ok || fail "metrics.csv should have 4 rows"
# moe0_capacity is the training capacity, also on rows with an evaluation (whose capacity differs):
# ceil(moe.capacity_factor 1.0 x 32 tokens / 4 experts) = 8; the evaluation's would be 16.
"$dsmoe" "$tiny" run.output_dir="$work/capacity" moe.eval_capacity_factor=2.0 train.eval_every=1 \
  checkpoint.every=0 checkpoint.final=false > "$work/capacity.log" 2>&1
caps=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "moe0_capacity") c = i; next } { printf "%s ", $c }' \
  "$work/capacity/metrics.csv")
[ "$caps" = "8 8 8 8 " ] && ok || fail "moe0_capacity per row: '$caps', expected the training capacity 8 on every row"
ckpts=$(cd "$work/out/checkpoints" && ls)
[ "$ckpts" = "$(printf 'step_00000003.safetensors\nstep_00000004.safetensors')" ] && ok || fail "checkpoint.keep=2 left: $ckpts"
# The resolved deck is itself a valid deck: the one that continues the run (as is, it would start a new
# run among this one's checkpoints, refused below).
expect resolved-deck-valid 0 "is valid" -- "$dsmoe" --check "$work/out/resolved.deck" checkpoint.resume=auto

# Resume from the newest checkpoint, and evaluation of a checkpoint.
cp "$work/out/checkpoints/step_00000004.safetensors" "$work/step4.safetensors" # for the schedule checks below
expect resume 0 "resumed from .*step_00000004.safetensors at step 4" -- "$dsmoe" "$tiny" train.steps=6 checkpoint.resume=auto
# Raising train.steps stretches a decay that ends at train.steps: a resume with train.steps 4 -> 6 of a
# copy of the 4-step run says so, with the rate step 5 runs at (metrics.csv's lr) and the one the 4-step
# schedule gives there (its min_lr: the decay was over). With train.decay_steps = 4 it keeps the old
# schedule and says nothing.
mkdir -p "$work/lr/checkpoints" && cp "$work/step4.safetensors" "$work/lr/checkpoints/step_00000004.safetensors"
out=$("$dsmoe" "$tiny" train.steps=6 checkpoint.resume=auto run.output_dir="$work/lr" 2>&1)
min_lr=$(awk '/^min_lr *=/ { print $3 }' "$work/out/resolved.deck")
lr5=$(awk -F, '$1 == 5 { print $4 }' "$work/lr/metrics.csv")
re="warning: the learning-rate schedule is not the one the checkpoint's run had \(train.steps 4 -> 6\): step 5 runs at ([0-9.e+-]+) where that run's would have been ([0-9.e+-]+) \(the decay ends at train.steps; train.decay_steps = 4 keeps that run's\)"
if [[ "$out" =~ $re ]]; then
  python3 -c "import sys; a, b, c, d = map(float, sys.argv[1:]); sys.exit(not (abs(a - c) <= 1e-3 * c and abs(b - d) <= 1e-3 * d))" \
    "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "$lr5" "$min_lr" && ok ||
    fail "lr-schedule warning: rates ${BASH_REMATCH[1]}, ${BASH_REMATCH[2]}; metrics.csv step 5 lr $lr5, min_lr $min_lr"
else
  fail "lr-schedule warning missing: $(grep -i warning <<<"$out")"
fi
rm -rf "$work/lr" && mkdir -p "$work/lr/checkpoints" && cp "$work/step4.safetensors" "$work/lr/checkpoints/step_00000004.safetensors"
out=$("$dsmoe" "$tiny" train.steps=6 train.decay_steps=4 checkpoint.resume=auto run.output_dir="$work/lr" 2>&1)
grep -q "resumed from" <<<"$out" && ! grep -q "learning-rate schedule" <<<"$out" && ok ||
  fail "lr-schedule kept with train.decay_steps = 4: $(grep -iE "warning|error" <<<"$out")"
expect resume-done 0 "train: nothing to do: the run is at step 6, train.steps = 4 \(raise train.steps to go on\)" -- \
  "$dsmoe" "$tiny" train.steps=4 checkpoint.resume=auto
expect eval 0 "eval: validation loss [0-9.]+, perplexity [0-9.]+ over 1 batches .* of expert choices dropped" -- \
  "$dsmoe" "$tiny" run.mode=eval checkpoint.resume=auto
# eval.csv: one row per expert; per layer the kept tokens add up to routed - dropped and the shares to 1;
# the perplexity is exp(loss) of the printed loss.
awk -F, 'NR > 1 { kept[$1] += $9; share[$1] += $10; routed[$1] = $5; dropped[$1] = $6; n++ }
         END { if (n != 4) exit 1; for (l in kept) if (kept[l] != routed[l] - dropped[l] || share[l] < 0.9999 || share[l] > 1.0001) exit 1 }' \
  "$work/out/eval.csv" && ok || fail "eval.csv: $(cat "$work/out/eval.csv" 2>&1 | head -3)"
expect eval-no-ckpt nonzero "run.mode = eval needs a checkpoint" -- "$dsmoe" "$tiny" run.mode=eval run.output_dir="$work/empty"

# A new run, or one going on from an earlier step, in a checkpoint directory that holds later checkpoints
# is refused before its first step, by --check too: pruning by step would remove the new run's own
# checkpoints first, and a requeue (resume = auto) would go on from the others'. The files stay as they
# were. A run that writes no checkpoint, and resume = auto, start there.
ckdir="$work/out/checkpoints"
before=$(cd "$work/out" && md5sum metrics.csv checkpoints/*)
fresh_msg="checkpoint directory $ckdir already holds checkpoints of an earlier run \(2 files, step_00000005 to step_00000006.safetensors\), and checkpoint.resume = \"\" starts a new one.* Set checkpoint.resume = auto to continue that run"
expect fresh-over-earlier nonzero "$fresh_msg" -- "$dsmoe" "$tiny"
expect fresh-over-earlier-check nonzero "$fresh_msg" -- "$dsmoe" --check "$tiny"
rewind_msg="checkpoint directory $ckdir holds checkpoints later than step 5, where checkpoint.resume = $ckdir/step_00000005.safetensors goes on \(step_00000006.safetensors\).* To go on from step 5, move those files out of $ckdir"
expect rewind nonzero "$rewind_msg" -- "$dsmoe" "$tiny" train.steps=8 checkpoint.resume="$ckdir/step_00000005.safetensors"
expect rewind-check nonzero "$rewind_msg" -- \
  "$dsmoe" --check "$tiny" train.steps=8 checkpoint.resume="$ckdir/step_00000005.safetensors"
[ "$(cd "$work/out" && md5sum metrics.csv checkpoints/*)" = "$before" ] && ok ||
  fail "a refused start changed the earlier run's files: $(cd "$work/out" && md5sum metrics.csv checkpoints/*)"
expect no-checkpoints 0 "step 1/1" -- "$dsmoe" "$tiny" train.steps=1 checkpoint.every=0 checkpoint.final=false \
  run.signals="" run.output_dir="$work/nockpt" checkpoint.dir="$ckdir"
expect resume-newest-check 0 "is valid" -- "$dsmoe" --check "$tiny" train.steps=8 checkpoint.resume=auto
# That run left no checkpoint: a second one there starts, and keeps the first one's metrics.csv whole as
# metrics.csv.1 (then .2) instead of truncating it.
first_rows=$(md5sum < "$work/nockpt/metrics.csv")
nockpt_run=("$dsmoe" "$tiny" checkpoint.every=0 checkpoint.final=false run.signals="" run.output_dir="$work/nockpt")
expect metrics-kept 0 "metrics: $work/nockpt/metrics.csv held an earlier run's rows: kept as $work/nockpt/metrics.csv.1" -- \
  "${nockpt_run[@]}" train.steps=2
expect metrics-kept-2 0 "kept as $work/nockpt/metrics.csv.2" -- "${nockpt_run[@]}" train.steps=3
[ "$(md5sum < "$work/nockpt/metrics.csv.1")" = "$first_rows" ] && [ "$(wc -l < "$work/nockpt/metrics.csv.2")" = 3 ] &&
  [ "$(wc -l < "$work/nockpt/metrics.csv")" = 4 ] && ok ||
  fail "metrics-kept: $(wc -l "$work/nockpt"/metrics.csv* | tr '\n' ' ')"

# metrics.csv keeps its columns over a resume that turns distillation off (kd_loss stays, empty) or on
# (no kd_loss column; the log says so): every row has the header's fields. The teacher is step 6 above.
teacher="$ckdir/step_00000006.safetensors"
"$dsmoe" "$tiny" run.output_dir="$work/kd_off" train.steps=2 distill.teacher="$teacher" > "$work/kd_off.log" 2>&1
expect kd-off 0 "step 4/4" -- "$dsmoe" "$tiny" run.output_dir="$work/kd_off" train.steps=4 checkpoint.resume=auto
awk -F, 'NR == 1 { n = NF; for (i = 1; i <= NF; i++) if ($i == "kd_loss") k = i; next }
         NF != n || !k || (NR <= 3) != ($k != "") { bad = 1 } END { exit bad || NR != 5 }' "$work/kd_off/metrics.csv" &&
  ok || fail "kd-off: metrics.csv $(cat "$work/kd_off/metrics.csv" | cut -c1-120)"
"$dsmoe" "$tiny" run.output_dir="$work/kd_on" train.steps=2 > "$work/kd_on.log" 2>&1
expect kd-on 0 "metrics: $work/kd_on/metrics.csv has no kd_loss column \(the run it continues did not distil\)" -- \
  "$dsmoe" "$tiny" run.output_dir="$work/kd_on" train.steps=4 checkpoint.resume=auto distill.teacher="$teacher"
awk -F, 'NR == 1 { n = NF; if ($0 ~ /kd_loss/) bad = 1; next } NF != n { bad = 1 } END { exit bad || NR != 5 }' \
  "$work/kd_on/metrics.csv" && ok || fail "kd-on: metrics.csv $(cat "$work/kd_on/metrics.csv" | cut -c1-120)"

# A training run in a directory another one is using is refused, naming the holder (core/io/run_lock.h);
# when the holder is gone, even killed, the lock file it leaves does not block.
"$dsmoe" "$tiny" run.output_dir="$work/busy" train.steps=1000000 checkpoint.every=0 > "$work/busy.log" 2>&1 &
holder=$!
for _ in $(seq 1 300); do grep -q "^step 1/" "$work/busy.log" && break; sleep 0.1; done
expect busy nonzero "run.output_dir = $work/busy is in use by another training run \(pid $holder on [^,]+, since 20" -- \
  "$dsmoe" "$tiny" run.output_dir="$work/busy" checkpoint.resume=auto
# --check says so and passes: a job queued behind the running one starts after it.
expect busy-check 0 "warning: run.output_dir = $work/busy is in use by another training run \(pid $holder on .*: a run started while it lasts is refused" -- \
  "$dsmoe" --check "$tiny" run.output_dir="$work/busy" checkpoint.resume=auto
kill -9 "$holder"
wait "$holder" 2>/dev/null
expect busy-released 0 "step 1/1" -- "$dsmoe" "$tiny" run.output_dir="$work/busy" train.steps=1 checkpoint.resume=auto
out=$("$dsmoe" --check "$tiny" run.output_dir="$work/busy" checkpoint.resume=auto 2>&1)
grep -q "in use by another" <<<"$out" && fail "busy-check: a lock the holder left when it was killed is reported" || ok

# A corrupt checkpoint is refused and the existing ones stay intact.
head -c 100 "$work/out/checkpoints/step_00000006.safetensors" > "$work/broken.safetensors"
expect bad-ckpt nonzero "broken.safetensors" -- "$dsmoe" "$tiny" checkpoint.resume="$work/broken.safetensors"

# Bad data files name the file.
printf 'MMIDIDX\0\0garbage' > "$work/corpus.idx"; : > "$work/corpus.bin"
expect bad-megatron nonzero "corpus.idx" -- "$dsmoe" "$tiny" data.source=megatron data.path="$work/corpus" model.vocab=300
expect missing-text nonzero "$work/missing.txt" -- "$dsmoe" "$tiny" data.source=text data.path="$work/missing.txt" model.vocab=256

# Byte-level text training works end to end.
for i in $(seq 1 200); do echo "the quick brown fox jumps over the lazy dog $i"; done > "$work/text.txt"
expect text-train 0 "step 4/4" -- "$dsmoe" "$tiny" data.source=text data.path="$work/text.txt" model.vocab=256 run.output_dir="$work/textout"
# A resume over a corpus that changed warns that the sample order changes from there (the checkpoint
# records the training split's tokens and windows); over the same corpus it does not.
text=(data.source=text data.path="$work/text.txt" model.vocab=256 run.output_dir="$work/textout" checkpoint.resume=auto)
if "$dsmoe" "$tiny" "${text[@]}" train.steps=5 2>&1 | grep -q "warning: the training split differs"; then
  fail "text-resume-same: warned about an unchanged corpus"
else
  ok
fi
for i in $(seq 1 50); do echo "a few more lines of text $i"; done >> "$work/text.txt"
expect text-resume-changed 0 "warning: the training split differs from the one the checkpoint's run read: [0-9]+ tokens in [0-9]+ windows, where it had [0-9]+ in [0-9]+ \(the corpus or data.valid_fraction changed\): from step 5 on" -- \
  "$dsmoe" "$tiny" "${text[@]}" train.steps=6
# The counts are the split's before and after: more tokens and windows now, by about 95% of the bytes
# added (data.valid_fraction = 0.05 holds out the rest), at 8 tokens a window.
counts=$("$dsmoe" "$tiny" "${text[@]}" train.steps=6 data.path="$work/text.txt,$work/text.txt" 2>&1 |
  sed -n 's/.*read: \([0-9]*\) tokens in \([0-9]*\) windows, where it had \([0-9]*\) in \([0-9]*\) .*/\1 \2 \3 \4/p')
bytes=$(stat -c %s "$work/text.txt")
read -r t_now w_now t_had w_had <<<"$counts"
if [ -n "$counts" ] && [ $((t_now - t_had)) -ge $((bytes * 94 / 100)) ] && [ $((t_now - t_had)) -le $((bytes * 96 / 100)) ] &&
   [ "$w_now" = $(((t_now - 1) / 8)) ] && [ "$w_had" = $(((t_had - 1) / 8)) ]; then ok
else fail "text-resume-doubled: counts '$counts' for a corpus of 2 x $bytes bytes"; fi

# More compute threads than the binding's CPUs: a warning naming run.threads and the CPU count, then it
# trains (the threads take turns).
expect threads-oversubscribed 0 "warning: 256 compute threads \(run.threads\) on rank 0, whose binding has [0-9]+ CPUs" \
  -- "$dsmoe" "$tiny" run.threads=256 train.steps=1 run.output_dir="$work/threads"
expect threads-fit 0 "step 1/1" -- "$dsmoe" "$tiny" run.threads=1 train.steps=1 run.output_dir="$work/threads1"
if "$dsmoe" "$tiny" run.threads=1 train.steps=1 run.output_dir="$work/threads2" 2>&1 | grep -q "compute threads"; then
  fail "threads-fit: warned about threads with run.threads = 1"
else
  ok
fi

finish cli_test
