#!/usr/bin/env bash
# The strict training test must be able to fail: with the strict plugin told to drop one kind of op
# (DSMOE_STRICT_BREAK: a missing event, a copy that never lands), strict_train.sh must report the strict
# runs as differing from cpu or failing, while the cpu runs themselves still pass.
# usage: strict_break.sh <strict_train.sh> <dsmoe> <test plugin dir> <mpiexec> [mpiexec flags...]
set -u
script=$1
shift
failures=0
for op in event_record copy_to_host; do
  out=$(STRICT_BREAK=$op STRICT_ONLY="base ep2" bash "$script" "$@" 2>&1)
  rc=$?
  [ $rc = 77 ] && { echo "skip: $out" | tail -1; exit 77; }
  strict_fails=$(grep -c '^FAIL: .*strict' <<<"$out")
  cpu_fails=$(grep -c '^FAIL: cpu_' <<<"$out")
  if [ $rc != 0 ] && [ "$strict_fails" -gt 0 ] && [ "$cpu_fails" = 0 ]; then
    echo "ok: DSMOE_STRICT_BREAK=$op: $strict_fails strict checks fail, as they must"
  else
    echo "FAIL: DSMOE_STRICT_BREAK=$op: exit $rc, $strict_fails strict failures, $cpu_fails cpu failures:"
    tail -8 <<<"$out"
    failures=$((failures + 1))
  fi
done
[ $failures = 0 ]
