#!/usr/bin/env bash
# scripts/plot on metrics files this test writes itself, with known values (docs/plots.md): every PNG is
# produced, valid and of the asked size; the plotted data (read back from --save-script) equal the values
# written, the heat map's cells equal share x experts computed here; absent columns give "skipped" lines;
# the loss bound comes from --bound, a log in the run directory, or is reported missing; each malformed
# file exits non-zero naming the file and line, and writes nothing.
# Usage: plot_test.sh <source dir>. Exit 77 (skipped) without gnuplot or python3.
set -u
src=$1
plot="$src/scripts/plot"
png_check="$src/tests/plot/png_check.py"
command -v python3 > /dev/null || { echo "SKIPPED: python3 not found (scripts/plot is Python)"; exit 77; }
command -v gnuplot > /dev/null || { echo "SKIPPED: gnuplot not found (Debian: apt-get install gnuplot-nox)"; exit 77; }
work=$(mktemp -d /tmp/dsmoe_plot.XXXXXX)
trap 'rm -rf "$work"' EXIT
source "$src/tests/cli/lib.sh" # fail, ok, finish

ALL_PLOTS="loss lr grad_norm tokens_per_s dropped expert_load"

# run_plot <name> <expected exit: 0|nonzero> -- args...: runs scripts/plot; its output is in $out.
run_plot() {
  local name=$1 want=$2
  shift 3
  out=$(python3 "$plot" "$@" 2>&1)
  local rc=$?
  if [ "$want" = 0 ] && [ $rc -ne 0 ]; then fail "$name: exit $rc, expected 0"; echo "$out" | tail -20; return 1; fi
  if [ "$want" != 0 ] && [ $rc -eq 0 ]; then fail "$name: exit 0, expected non-zero"; echo "$out" | tail -20; return 1; fi
  ok
}
# has <name> <fixed string>: $out contains it.
has() {
  if grep -qF -- "$2" <<<"$out"; then ok; else fail "$1: output lacks '$2'"; echo "$out" | sed 's/^/  | /'; fi
}
# pngs <name> <dir> <width> <height> <plots...>: exactly these PNGs in dir, each valid and of that size.
pngs() {
  local name=$1 dir=$2 w=$3 h=$4
  shift 4
  local p why
  for p in "$@"; do
    if why=$(python3 "$png_check" "$dir/$p.png" "$w" "$h" 2>&1); then ok; else fail "$name: $p.png: $why"; fi
  done
  local want got
  want=$(printf '%s.png\n' "$@" | sort)
  got=$(cd "$dir" && ls | sort)
  [ "$want" = "$got" ] && ok || fail "$name: $dir holds [$(echo $got)], expected [$(echo $want)]"
}
# block <script> <name>: the rows of the first gnuplot data block $name in the script.
block() { awk -v b="\$$2 << EOD" '$0 == b {on = 1; next} on && $0 == "EOD" {exit} on' "$1"; }
# same_rows <name> <expected rows> <actual rows>: the same numbers, row by row (relative 1e-12).
same_rows() {
  if awk 'NR == FNR {want[FNR] = $0; n = FNR; next}
          {if (FNR > n) exit 1; split(want[FNR], a); if (NF != length(a)) exit 1
           for (i = 1; i <= NF; i++) {d = $i - a[i]; if (d < 0) d = -d; m = a[i] < 0 ? -a[i] : a[i]
                                     if (d > 1e-12 * (m > 1 ? m : 1)) exit 1}; got = FNR}
          END {exit got != n}' <(echo "$2") <(echo "$3"); then ok
  else fail "$1: rows differ"; paste <(echo "$2") <(echo "$3") | sed 's/^/  want | got: /' | head -20; fi
}
# cell <script> <x> <y>: the heat map's value at step x, row y.
cell() { block "$1" load | awk -v x="$2" -v y="$3" '$1 == x && $2 == y {print $3; found = 1} END {exit !found}'; }
# calc <awk expression>: its value to 17 digits.
calc() { awk "BEGIN {printf \"%.17g\", $1}"; }
# near <name> <got> <want>: |got - want| <= 1e-9.
near() {
  if awk -v g="$2" -v w="$3" 'BEGIN {d = g - w; exit !(g != "" && (d < 0 ? -d : d) <= 1e-9)}'; then ok
  else fail "$1: got '$2', expected $3"; fi
}

# ---------------------------------------------------------------------------------------------------
# A training run's directory as dsmoe leaves it: a metrics file with two MoE layers of 4 and 2 experts,
# a row every 10 steps, validation at steps 20 and 40; a resolved deck saying the corpus is synthetic;
# the run's log with the bound line.
run="$work/run"
mkdir -p "$run"
header="step,loss,aux_loss,lr,grad_norm,tokens_per_s,dropped_frac,elapsed_s,valid_loss"
header+=",moe0_capacity,moe0_drop,moe0_load_e0,moe0_load_e1,moe0_load_e2,moe0_load_e3"
header+=",moe1_capacity,moe1_drop,moe1_load_e0,moe1_load_e1"
cat > "$run/metrics.csv" <<CSV
$header
10,4.5,2.01,1.0e-04,2.5,1000.0,0.100000,1.0,,20,0.050000,0.10000,0.20000,0.30000,0.40000,20,0.150000,0.25000,0.75000
20,3.25,2.02,2.0e-04,1.5,1100.0,0.080000,2.0,3.125,20,0.040000,0.40000,0.30000,0.20000,0.10000,20,0.120000,0.60000,0.40000
30,2.75,2.03,3.0e-04,1.25,1200.0,0.060000,3.0,,20,0.030000,0.25000,0.25000,0.25000,0.25000,20,0.090000,0.50000,0.50000
40,2.5,2.04,4.0e-04,1.0,nan,0.040000,4.0,2.375,20,0.020000,0.70000,0.10000,0.10000,0.10000,20,0.060000,0.10000,0.90000
CSV
printf '[run]\nmode = train  # default\n\n[data]\nsource = synthetic                      # default\n' > "$run/resolved.deck"
printf 'data: synthetic: 4 sources\ndata: achievable loss bound 1.2345 nats/token\nstep 10/40 | loss 4.5000\n' > "$run/train.log"

run_plot "known values" 0 -- "$run" --size 640x360 --save-script "$work/known.gp" && {
  pngs "known values" "$run/plots" 640 360 $ALL_PLOTS
  for p in $ALL_PLOTS; do has "known values" "plot: wrote $run/plots/$p.png"; done
  has "known values: bound from the log" "(bound 1.2345 from $run/train.log)"
  grep -qF "1.2345 with lines" "$work/known.gp" && ok || fail "known values: the bound line is not plotted"
  csv() { awk -F, -v c="$1" 'NR == 1 {for (i = 1; i <= NF; i++) if ($i == c) k = i; next} $k != "" {print $1, $k}' \
          "$run/metrics.csv" | sed 's/ nan$/ NaN/'; }
  same_rows "loss block" "$(csv loss)" "$(block "$work/known.gp" train)"
  same_rows "valid block: the two evaluated steps only" "$(printf '20 3.125\n40 2.375')" "$(block "$work/known.gp" valid)"
  same_rows "lr/grad_norm block" "$(csv grad_norm)" "$(awk '/^set output .*grad_norm.png/ {on = 1} on' "$work/known.gp" |
                                                       block /dev/stdin d)"
  same_rows "moe1 drop block" "$(csv moe1_drop)" "$(block "$work/known.gp" moe1)"
  # The heat map: rows moe0 e0-e3 (y 0-3) then moe1 e0-e1 (y 4-5); one-step bins from 10 to 40; a
  # value is the share times the layer's expert count; a step without a row shows the nearest row.
  [ "$(block "$work/known.gp" load | wc -l)" -eq $((31 * 6)) ] && ok || fail "heat map: not 31 bins x 6 rows"
  near "heat map moe0 e0 step 10" "$(cell "$work/known.gp" 10.0 0.0)" "$(calc '0.1 * 4')"
  near "heat map moe0 e3 step 40" "$(cell "$work/known.gp" 40.0 3.0)" "$(calc '0.1 * 4')"
  near "heat map moe1 e1 step 20" "$(cell "$work/known.gp" 20.0 5.0)" "$(calc '0.4 * 2')"
  near "heat map moe1 e0 step 24 (row 20)" "$(cell "$work/known.gp" 24.0 4.0)" "$(calc '0.6 * 2')"
  near "heat map moe1 e0 step 26 (row 30)" "$(cell "$work/known.gp" 26.0 4.0)" "$(calc '0.5 * 2')"
  grep -qF "set arrow from graph 0, first 3.5 to graph 1, first 3.5" "$work/known.gp" && ok ||
    fail "heat map: no separator between the layers at 3.5"
}

# -o DIR, the default size, and --bound over the log.
run_plot "-o and --bound" 0 -- "$run" -o "$work/elsewhere" --bound 0.75 --save-script "$work/bound.gp" && {
  pngs "-o and --bound" "$work/elsewhere" 1000 600 $ALL_PLOTS
  has "--bound" "(bound 0.75 from --bound)"
  grep -qF "0.75 with lines" "$work/bound.gp" && ok || fail "--bound: the bound line is not plotted"
}
# The metrics file itself as the argument.
run_plot "metrics file argument" 0 -- "$run/metrics.csv" -o "$work/direct" && pngs "metrics file argument" "$work/direct" 1000 600 $ALL_PLOTS

# Without the log: the synthetic corpus' bound is reported missing, the loss still drawn.
rm "$run/train.log"
run_plot "no log" 0 -- "$run" -o "$work/nolog" --save-script "$work/nolog.gp" && {
  has "no log" "no bound line: the run used the synthetic corpus, but $run holds no log"
  has "no log" "give --bound X or --log FILE"
  grep -q "achievable bound" "$work/nolog.gp" && fail "no log: a bound line is drawn" || ok
}
printf 'x\ndata: achievable loss bound 2.5 nats/token\n' > "$work/job.out"
run_plot "--log" 0 -- "$run" -o "$work/log" --log "$work/job.out" && has "--log" "(bound 2.5 from $work/job.out)"
run_plot "--log missing" nonzero -- "$run" -o "$work/log2" --log "$work/absent.out" && has "--log missing" "$work/absent.out: cannot read the log"
sed -i 's/^source = synthetic/source = text/' "$run/resolved.deck"
run_plot "text corpus" 0 -- "$run" -o "$work/text" && has "text corpus" "no bound line: data.source = text"

# A dense model without grad_norm, and no evaluation yet: those plots are skipped, with the reason.
dense="$work/dense"
mkdir -p "$dense"
printf 'step,loss,lr,tokens_per_s,valid_loss\n1,5.0,1e-4,900.5,\n2,4.0,2e-4,950.5,\n' > "$dense/metrics.csv"
run_plot "dense" 0 -- "$dense" --size 320x200 && {
  pngs "dense" "$dense/plots" 320 200 loss lr tokens_per_s
  has "dense" "plot: skipped grad_norm.png: $dense/metrics.csv has no \`grad_norm\` column"
  has "dense" "plot: skipped dropped.png: $dense/metrics.csv has no \`moe<i>_drop\` or \`dropped_frac\` columns"
  has "dense" "plot: skipped expert_load.png: $dense/metrics.csv has no \`moe<i>_load_e<j>\` columns"
  has "dense" "no validation rows"
}

# One row; a column of nan only (a diverged run) is skipped, not drawn.
one="$work/one"
mkdir -p "$one"
printf 'step,loss,lr,grad_norm\n7,5.0,1e-4,nan\n' > "$one/metrics.csv"
run_plot "one row" 0 -- "$one" --size 300x200 && {
  pngs "one row" "$one/plots" 300 200 loss lr
  has "one row" "plot: skipped grad_norm.png: the \`grad_norm\` column of $one/metrics.csv has no finite value"
}

# A long run: 1200 rows are binned 3 steps a bin (400 columns), a bin the mean of its rows.
long="$work/long"
mkdir -p "$long"
awk 'BEGIN {print "step,loss,moe0_load_e0,moe0_load_e1"
            for (s = 1; s <= 1200; s++) printf "%d,%.3f,%.1f,%.1f\n", s, 5 - s / 1000, (s % 10) / 10, 1 - (s % 10) / 10}' \
  > "$long/metrics.csv"
run_plot "long" 0 -- "$long" --size 400x300 --save-script "$work/long.gp" && {
  pngs "long" "$long/plots" 400 300 loss expert_load
  grep -qF "(bins of 3 steps)" "$work/long.gp" && ok || fail "long: the title does not say 'bins of 3 steps'"
  [ "$(block "$work/long.gp" load | wc -l)" -eq $((400 * 2)) ] && ok || fail "long: not 400 bins x 2 rows"
  near "long: bin of steps 1-3, e0" "$(cell "$work/long.gp" 2.0 0.0)" "$(calc '(0.1 + 0.2 + 0.3) / 3 * 2')"
  near "long: bin of steps 1198-1200, e1" "$(cell "$work/long.gp" 1199.0 1.0)" "$(calc '(0.2 + 0.1 + 1.0) / 3 * 2')"
}

# A row still being written (the last line, short, without its newline) is left out with a note.
live="$work/live"
mkdir -p "$live"
printf 'step,loss,lr\n1,5.0,1e-4\n2,4.0,2e-4\n3,3.' > "$live/metrics.csv"
run_plot "live run" 0 -- "$live" --save-script "$work/live.gp" && {
  has "live run" "$live/metrics.csv:4: left out: an incomplete last row"
  same_rows "live run: two rows" "$(printf '1 5.0\n2 4.0')" "$(block "$work/live.gp" train)"
}

# Malformed files: exit 1, a message naming the file and the line, no output directory.
bad="$work/bad.csv"
# malformed <name> <contents (printf format)> <expected message after "bad.csv">
malformed() {
  rm -rf "$work/badout"
  printf "$2" > "$bad"
  run_plot "$1" nonzero -- "$bad" -o "$work/badout" && {
    has "$1" "scripts/plot: error: $bad$3"
    [ ! -e "$work/badout" ] && ok || fail "$1: the output directory was created"
  }
}
malformed "empty file" '' ":1: empty file"
malformed "blank file" '\n\n' ":1: empty file"
malformed "no header" '1,4.5,1e-4\n2,4.0,2e-4\n' ":1: no header"
malformed "header only" 'step,loss\n' ":1: no rows after the header"
malformed "duplicate column" 'step,loss,loss\n1,2,3\n' ":1: column \`loss\` appears twice"
malformed "ragged row (short)" 'step,loss,lr\n1,5.0,1e-4\n2,4.0\n3,3.0,3e-4\n' ":3: 2 fields, but the header (line 1) names 3 columns"
malformed "ragged row (long, last)" 'step,loss,lr\n1,5.0,1e-4\n2,4.0,2e-4,7\n' ":3: 4 fields, but the header (line 1) names 3 columns"
malformed "ragged last row with newline" 'step,loss,lr\n1,5.0,1e-4\n2,4.0\n' ":3: 2 fields"
malformed "non-numeric" 'step,loss,lr\n1,5.0,1e-4\n2,abc,2e-4\n' ":3: column \`loss\` (field 2): \`abc\` is not a number"
malformed "half a number" 'step,loss,lr\n1,5.0,1e-\n' ":2: column \`lr\` (field 3): \`1e-\` is not a number"
malformed "empty line" 'step,loss\n1,5.0\n\n2,4.0\n' ":3: empty line"
malformed "fractional step" 'step,loss\n1.5,5.0\n' ":2: \`step\` is 1.5, not an integer"
malformed "steps going back" 'step,loss\n1,5.0\n3,4.0\n2,3.0\n' ":4: step 2 after step 3"
malformed "binary" 'step,loss\n1,\xff\xfe\n' ":2: not text"
malformed "nothing to plot" 'step,foo\n1,2\n' ": no column to plot"
run_plot "missing file" nonzero -- "$work/nowhere/metrics.csv" -o "$work/badout" &&
  has "missing file" "scripts/plot: error: $work/nowhere/metrics.csv: no such run directory or metrics file"
mkdir -p "$work/emptyrun"
run_plot "run without metrics" nonzero -- "$work/emptyrun" &&
  has "run without metrics" "scripts/plot: error: $work/emptyrun/metrics.csv: cannot read the metrics file: No such file or directory"
run_plot "bad size" nonzero -- "$run" --size 640 && has "bad size" "is not WIDTHxHEIGHT"
run_plot "bad bound" nonzero -- "$run" --bound -1 && has "bad bound" "is not a loss"

finish plot
