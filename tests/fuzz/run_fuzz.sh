#!/usr/bin/env bash
# Runs one libFuzzer target for a fixed time and says what it did (docs/testing.md). The ctest tests
# fuzz_<name> (tests/fuzz/fuzz.cmake) and scripts/fuzz call it.
# Usage: run_fuzz.sh <target binary> <seconds> <corpus dir | -> <artifact dir> [seed dir or file ...]
#   corpus dir   where the inputs that libFuzzer finds are kept (scripts/fuzz: a persistent one);
#                "-": a temporary one
#   artifact dir where a crash, leak, timeout or out-of-memory input is written (crash-<sha1>, ...)
#   seeds        files, and the files directly in directories, copied into the corpus first (the
#                originals are never written)
# Exit 0 when the target ran the whole time without a finding; otherwise libFuzzer's status, after the
# command that reproduces the finding.
set -u
exe=$1 seconds=$2 corpus=$3 artifacts=$4
shift 4
name=$(basename "$exe")
# The target's scratch files (fuzz_common.h) go here too, in memory when /dev/shm is writable.
base=${TMPDIR:-/tmp}
[ -z "${TMPDIR:-}" ] && [ -w /dev/shm ] && base=/dev/shm
tmp=$(mktemp -d "$base/dsmoe_${name}.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/scratch"
if [ "$corpus" = "-" ]; then
  corpus=$tmp/corpus
fi
mkdir -p "$corpus" "$artifacts"
for s in "$@"; do
  if [ -d "$s" ]; then
    find "$s" -maxdepth 1 -type f -exec cp -f -t "$corpus" {} +
  elif [ -f "$s" ]; then
    cp -f -- "$s" "$corpus/"
  fi
done
chmod -R u+w "$corpus"
before=$(ls "$artifacts" | wc -l)
# -timeout: one input running this long is a finding (a hang); -rss_limit_mb: so is a process this big.
start=$SECONDS
TMPDIR=$tmp/scratch "$exe" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=3072 -print_final_stats=1 \
  -artifact_prefix="$artifacts/" "$corpus" >"$tmp/log" 2>&1
rc=$?
# The log without the progress lines and the dictionary libFuzzer recommends.
grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse|RELOAD)|# Uses: [0-9]+$|recommended dictionary' "$tmp/log" | tail -n 60
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$tmp/log" | tail -n 1)
echo "$name: ${execs:-?} executions in $((SECONDS - start)) s, corpus $(ls "$corpus" | wc -l) inputs ($corpus), exit $rc"
if [ "$rc" -ne 0 ] || [ "$(ls "$artifacts" | wc -l)" -ne "$before" ]; then
  echo "$name: FINDING: inputs in $artifacts:"
  ls -t "$artifacts" | head -n 5 | sed "s|^|  $artifacts/|"
  echo "$name: reproduce with: $exe <input>   (runs that one input; add -runs=100 to repeat it)"
  [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
