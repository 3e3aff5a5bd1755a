# tests/held_signal.sh (sourced): a signal delivered while the processes that should get it are held
# with SIGSTOP. A test that sends a walltime signal mid-run must not race the run: a tiny run ends in
# under a second, and a signal's path (a launcher forwarding it, a loaded machine scheduling the test
# script late) can take longer than that. A stopped process keeps a caught signal pending, so the test
# stops the ranks, sends the signal, waits until /proc shows it pending at every rank it should reach,
# and continues them: the run then stops at the step it was held in, however slow the path was.

# signal_pending <pid> <signal name>: the signal waits in the process's pending sets (SigPnd: the thread
# group's main thread; ShdPnd: the process's shared set).
signal_pending() {
  local bit m
  bit=$((1 << ($(kill -l "$2") - 1)))
  for m in $(awk '/^(SigPnd|ShdPnd):/ { print $2 }' "/proc/$1/status" 2>/dev/null); do
    [ $((0x$m & bit)) != 0 ] && return 0
  done
  return 1
}

# wait_pending <signal name> <seconds> <pid>...: until the signal is pending at every pid; sets
# `pending` to how many it is pending at, and returns 0 when that is all of them.
wait_pending() {
  local sig=$1 tenths=$(($2 * 10)) p i
  shift 2
  for i in $(seq "$tenths"); do
    pending=0
    for p in "$@"; do signal_pending "$p" "$sig" && pending=$((pending + 1)); done
    [ $pending = $# ] && return 0
    sleep 0.1
  done
  return 1
}

# held: the PIDs stopped now. Whatever a test does, its exit trap calls release_held, so that no rank
# stays stopped behind a failed check.
held=
hold() { held="$*"; kill -STOP "$@"; }
release_held() { [ -z "$held" ] || kill -CONT $held 2>/dev/null; held=; }
