#!/usr/bin/env bash
# ctest fixture for the Slurm tests: `start` brings up the local single-node Slurm (scripts/slurm-local)
# unless one is already running; `stop` stops it (by PID, through slurm-local) when a test run started
# it and no other test run is still using it. Exit 77 (skip) where Slurm cannot run here (not root, not
# installable).
#
# Several build trees may run their suites at once and share the one local cluster, so each run
# registers its marker file in $DSMOE_SLURM_DIR/users, and the last run to leave stops the cluster, if
# a test run started it ($DSMOE_SLURM_DIR/started-by-tests holds that slurmctld's PID). A cluster
# someone started by hand is left running.
# Usage: slurm_fixture.sh start|stop <source dir> <marker file>
set -u
action=$1
slurm=$2/scripts/slurm-local
marker=$3
dir=${DSMOE_SLURM_DIR:-/tmp/dsmoe-slurm}
users=$dir/users

ctld_pid() { awk '$1 == "slurmctld" { print $2 }' "$dir/pids" 2>/dev/null; }

# Other runs still using the cluster: their markers exist (a run killed before its stop leaves one until
# that build tree runs the tests again; it delays a stop, it never stops a cluster in use).
live_users() {
  local m
  [ -f "$users" ] || return 0
  while read -r m; do [ "$m" != "$marker" ] && [ -f "$m" ] && echo "$m"; done <"$users" | sort -u
}

unregister() {
  rm -f "$marker"
  if [ -f "$users" ]; then
    { grep -vxF "$marker" "$users" || true; } >"$users.new" && mv "$users.new" "$users"
  fi
}

case "$action" in
  start)
    [ "$(id -u)" = 0 ] || { echo "SKIP: the local Slurm needs root"; exit 77; }
    mkdir -p "$dir"
    exec 8>"$dir/users.lock"
    flock -w 120 8 || { echo "FAIL: $dir/users.lock held for 2 minutes"; exit 1; }
    unregister
    if "$slurm" status; then
      echo "local Slurm already running: using it"
    else
      "$slurm" start 8>&- # the daemons must not inherit (and so hold) the lock
      rc=$?
      [ $rc -eq 0 ] || exit $rc
      ctld_pid >"$dir/started-by-tests"
    fi
    touch "$marker"
    echo "$marker" >>"$users"
    ;;
  stop)
    [ -f "$marker" ] || { echo "this test run did not use the local Slurm"; exit 0; }
    exec 8>"$dir/users.lock"
    flock -w 120 8 || { echo "FAIL: $dir/users.lock held for 2 minutes"; exit 1; }
    unregister
    others=$(live_users)
    if [ -n "$others" ]; then
      echo "local Slurm still used by the test runs of: $others"
      exit 0
    fi
    if [ "$(cat "$dir/started-by-tests" 2>/dev/null)" != "$(ctld_pid)" ] || [ -z "$(ctld_pid)" ]; then
      echo "local Slurm was not started by a test run: left running"
      exit 0
    fi
    daemons=$(awk '{ print $2 }' "$dir/pids" 2>/dev/null)
    "$slurm" stop || exit 1
    rm -f "$dir/started-by-tests"
    for pid in $daemons; do
      if kill -0 "$pid" 2>/dev/null; then echo "FAIL: daemon $pid still running after stop"; exit 1; fi
    done
    ;;
  *)
    echo "usage: $0 start|stop <source dir> <marker>" >&2
    exit 2
    ;;
esac
