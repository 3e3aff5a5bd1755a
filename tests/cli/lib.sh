# tests/cli/lib.sh: what the command-line test scripts share (sourced, not run): the pass/fail counters,
# `expect` for one command's exit status and output (under a time limit), `show` for a log's tail, and `finish` for the
# summary line and the script's exit status.
failures=0
pass=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { pass=$((pass + 1)); }
# The tail of a log without the resolved configuration's key lines.
show() { grep -Ev '^[a-z_0-9]+ += ' "$1" | tail -n 15 | sed 's/^/  | /'; }

# expect <name> <expected exit: 0|nonzero> <regex that must appear in stdout+stderr> -- command...
expect() {
  local name=$1 want=$2 regex=$3
  shift 4
  local out rc
  # A time limit, so that a hung command (a launcher that never returns) fails its own check with exit
  # 124 rather than the whole script at ctest's limit; -k kills one that ignores SIGTERM.
  out=$(timeout -k 10 "${EXPECT_TIMEOUT:-400}" "$@" 2>&1)
  rc=$?
  if [ "$want" = 0 ] && [ $rc -ne 0 ]; then fail "$name: exit $rc, expected 0"; echo "$out" | tail -20; return; fi
  if [ "$want" != 0 ] && [ $rc -eq 0 ]; then fail "$name: exit 0, expected non-zero"; echo "$out" | tail -20; return; fi
  if ! grep -Eq -- "$regex" <<<"$out"; then fail "$name: output lacks /$regex/"; echo "$out" | tail -20; return; fi
  ok
}

# finish <label>: the summary line; the exit status is 0 when nothing failed.
finish() {
  echo "$1: $pass passed, $failures failed"
  [ "$failures" -eq 0 ]
}
